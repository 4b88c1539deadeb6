//! An Asterisk manager interface (AMI) double for the tests, since Asterisk
//! does not run here: what Asterisk's documentation and its `manager.c`
//! answer to the actions the bridge uses (Challenge, Login with a plain
//! secret or an MD5 key, Ping, Setvar, Getvar, Logoff), the `DEVICE_STATE()` function's custom device states with their
//! `DeviceStateChange` events, and errors for the rest. It is itself tested
//! against a real AMI client (`tests/ami/client.js`, npm `asterisk-manager`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bridge_protocol::ami::{Decoder, Frame, Message, challenge_key};

/// Asterisk 20's AMI version.
const GREETING: &str = "Asterisk Call Manager/9.0.0\r\n";
/// What `DEVICE_STATE()` takes; anything else reads as UNKNOWN.
const DEVICE_STATES: &[&str] = &[
    "UNKNOWN",
    "NOT_INUSE",
    "INUSE",
    "BUSY",
    "INVALID",
    "UNAVAILABLE",
    "RINGING",
    "RINGINUSE",
    "ONHOLD",
];

#[derive(Default)]
struct State {
    /// Custom device states, by device (`Custom:alice`).
    devices: BTreeMap<String, String>,
    /// Every state a Setvar gave each device, in order.
    history: Vec<(String, String)>,
    /// Login attempts: user name and whether they got in.
    logins: Vec<(String, bool)>,
    /// Everything clients sent, as text.
    received: String,
    /// Logged-in sessions that take events.
    listeners: Vec<TcpStream>,
    /// Every connection, so a test can drop them all.
    connections: Vec<TcpStream>,
}

pub struct AmiServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stopped: Arc<AtomicBool>,
}

impl AmiServer {
    /// Listens on a free loopback port for the manager user `username`.
    pub fn start(username: &str, secret: &str) -> AmiServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let stopped = Arc::new(AtomicBool::new(false));
        let credentials = Arc::new((username.to_owned(), secret.to_owned()));
        let (shared, stop) = (state.clone(), stopped.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(copy) = stream.try_clone() {
                    shared.lock().unwrap().connections.push(copy);
                }
                let (state, credentials) = (shared.clone(), credentials.clone());
                std::thread::spawn(move || serve(stream, &state, &credentials));
            }
        });
        AmiServer {
            port,
            state,
            stopped,
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The states Setvar gave `device`, in order.
    pub fn history(&self, device: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        let of_device = state.history.iter().filter(|(d, _)| d == device);
        of_device.map(|(_, s)| s.clone()).collect()
    }

    /// Waits until `device`'s history ends with `states`; false if it does
    /// not within `within`.
    pub fn wait_for_history(&self, device: &str, states: &[&str], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let wanted: Vec<String> = states.iter().map(|s| s.to_string()).collect();
            if self.history(device).ends_with(&wanted) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn logins(&self) -> Vec<(String, bool)> {
        self.state.lock().unwrap().logins.clone()
    }

    /// Everything clients sent so far.
    pub fn received(&self) -> String {
        self.state.lock().unwrap().received.clone()
    }

    /// Closes every connection, as Asterisk restarting does.
    pub fn drop_connections(&self) {
        let mut state = self.state.lock().unwrap();
        for connection in state.connections.drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
        state.listeners.clear();
    }
}

impl Drop for AmiServer {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.drop_connections();
        // Wakes the accepting thread so that it sees the stop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>, credentials: &(String, String)) {
    if stream.write_all(GREETING.as_bytes()).is_err() {
        return;
    }
    let mut decoder = Decoder::for_server();
    let mut session = Session::default();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(read) = stream.read(&mut chunk) else {
            return;
        };
        if read == 0 {
            return;
        }
        decoder.push(&chunk[..read]);
        let text = String::from_utf8_lossy(&chunk[..read]);
        state.lock().unwrap().received.push_str(&text);
        loop {
            let action = match decoder.next_frame() {
                Ok(Some(Frame::Message(action))) => action,
                Ok(Some(Frame::Greeting(_))) => unreachable!("a server's decoder expects none"),
                Ok(None) => break,
                // Asterisk drops a client that sends it garbage.
                Err(_) => return,
            };
            let (response, then) = answer(&action, &mut session, state, credentials);
            if stream
                .write_all(response.encode().unwrap().as_bytes())
                .is_err()
            {
                return;
            }
            match then {
                Then::Continue => {}
                Then::Close => {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                Then::Listen => {
                    let booted = Message::default()
                        .with("Event", "FullyBooted")
                        .with("Privilege", "system,all")
                        .with("Status", "Fully Booted");
                    let _ = stream.write_all(booted.encode().unwrap().as_bytes());
                    if let Ok(copy) = stream.try_clone() {
                        state.lock().unwrap().listeners.push(copy);
                    }
                }
            }
        }
    }
}

/// One client connection's standing.
#[derive(Default)]
struct Session {
    logged_in: bool,
    /// The last `Challenge` given, for an MD5 login.
    challenge: Option<String>,
}

/// What follows a response.
enum Then {
    Continue,
    Close,
    /// A login that takes events.
    Listen,
}

fn answer(
    action: &Message,
    session: &mut Session,
    state: &Mutex<State>,
    (username, secret): &(String, String),
) -> (Message, Then) {
    let response = |kind: &str| {
        let response = Message::default().with("Response", kind);
        match action.get("ActionID") {
            Some(id) => response.with("ActionID", id),
            None => response,
        }
    };
    let saying = |response: Message, why: &str| response.with("Message", why);
    let Some(name) = action.get("Action") else {
        let missing = saying(response("Error"), "Missing action in request");
        return (missing, Then::Continue);
    };
    let name = name.to_ascii_lowercase();
    if !session.logged_in && !matches!(name.as_str(), "login" | "logoff" | "challenge") {
        return (
            saying(response("Error"), "Permission denied"),
            Then::Continue,
        );
    }
    match name.as_str() {
        "challenge" => {
            let md5 = action.get("AuthType").unwrap_or_default();
            if !md5.eq_ignore_ascii_case("MD5") {
                let refused = saying(response("Error"), "Must specify AuthType");
                return (refused, Then::Continue);
            }
            let challenge = format!("{:09}", rand::random::<u32>() % 1_000_000_000);
            session.challenge = Some(challenge.clone());
            let given = response("Success").with("Challenge", &challenge);
            (given, Then::Continue)
        }
        "login" => {
            let user = action.get("Username").unwrap_or_default();
            let md5 = action
                .get("AuthType")
                .is_some_and(|a| a.eq_ignore_ascii_case("MD5"));
            let key_matches = || {
                let challenge = session.challenge.as_deref()?;
                Some(action.get("Key")? == challenge_key(challenge, secret))
            };
            let proven = match md5 {
                true => key_matches().unwrap_or(false),
                false => action.get("Secret") == Some(secret.as_str()),
            };
            let accepted = user == username && proven;
            state
                .lock()
                .unwrap()
                .logins
                .push((user.to_owned(), accepted));
            if !accepted {
                let refused = saying(response("Error"), "Authentication failed");
                return (refused, Then::Close);
            }
            session.logged_in = true;
            let accepted = saying(response("Success"), "Authentication accepted");
            let events = action.get("Events").unwrap_or("on");
            let then = if events.eq_ignore_ascii_case("off") {
                Then::Continue
            } else {
                Then::Listen
            };
            (accepted, then)
        }
        "ping" => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            let pong = response("Success")
                .with("Ping", "Pong")
                .with("Timestamp", &format!("{:.6}", now.as_secs_f64()));
            (pong, Then::Continue)
        }
        "setvar" => {
            let Some(variable) = action.get("Variable").filter(|v| !v.is_empty()) else {
                return (
                    saying(response("Error"), "No variable specified"),
                    Then::Continue,
                );
            };
            let value = action.get("Value").unwrap_or_default();
            if set_variable(state, variable, value) {
                (saying(response("Success"), "Variable Set"), Then::Continue)
            } else {
                let failed = saying(response("Error"), "Failed to set variable");
                (failed, Then::Continue)
            }
        }
        "getvar" => {
            let variable = action.get("Variable").unwrap_or_default();
            let value = device_of(variable)
                .and_then(|device| state.lock().unwrap().devices.get(device).cloned())
                .unwrap_or_else(|| "UNKNOWN".into());
            let got = response("Success")
                .with("Variable", variable)
                .with("Value", &value);
            (got, Then::Continue)
        }
        "logoff" => {
            let goodbye = saying(response("Goodbye"), "Thanks for all the fish.");
            (goodbye, Then::Close)
        }
        _ => {
            let unknown = format!(
                "Invalid/unknown command: {}. Use Action: ListCommands to show available commands.",
                action.get("Action").unwrap_or_default()
            );
            (saying(response("Error"), &unknown), Then::Continue)
        }
    }
}

/// `DEVICE_STATE(Custom:x)` → `Custom:x`.
fn device_of(variable: &str) -> Option<&str> {
    variable
        .strip_prefix("DEVICE_STATE(")
        .and_then(|rest| rest.strip_suffix(')'))
}

/// What Asterisk's `DEVICE_STATE()` write does: custom devices only; the
/// listeners hear of a change.
fn set_variable(state: &Mutex<State>, variable: &str, value: &str) -> bool {
    let Some(device) = device_of(variable) else {
        // A plain global variable: set, and of no interest here.
        return true;
    };
    if !device.starts_with("Custom:") {
        return false;
    }
    let value = if DEVICE_STATES.contains(&value) {
        value
    } else {
        "UNKNOWN"
    };
    let mut state = state.lock().unwrap();
    state.history.push((device.to_owned(), value.to_owned()));
    if state
        .devices
        .insert(device.to_owned(), value.to_owned())
        .as_deref()
        != Some(value)
    {
        let event = Message::default()
            .with("Event", "DeviceStateChange")
            .with("Privilege", "call,all")
            .with("Device", device)
            .with("State", value)
            .encode()
            .unwrap();
        state
            .listeners
            .retain_mut(|listener| listener.write_all(event.as_bytes()).is_ok());
    }
    true
}
