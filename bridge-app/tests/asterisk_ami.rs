//! The bridge's link to Asterisk's manager interface (AMI): mapped app
//! users' states as custom device states, through a login that may fail,
//! a connection that may drop, and the bridge's shutdown. Asterisk does not
//! run here, so an AMI double stands in (`support/ami_server.rs`), itself
//! checked first against a real AMI client.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::ami_server::AmiServer;
use support::{
    Baresip, BridgeProcess, BrowserPeer, MANAGEMENT_TOKEN, PhoneCodec, SandboxProcess, dial,
    free_port, http_get, repo_root, tempdir,
};

const PCMU_440: PhoneCodec = ("PCMU", 0, 8000, "PCMU/8000", 440);
const AMI_USER: &str = "bridge";
const AMI_SECRET: &str = "ami-s3cret-9f2c";

/// One bridge at a time: each test below starts one, and one a Chromium.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A bridge whose AMI link goes to `ami` (`host:port`).
fn bridge_linked_to(ami: &str, secret: &str, args: &[&str]) -> BridgeProcess {
    BridgeProcess::start_with_environment(
        "127.0.0.1",
        args,
        &[
            ("ASTERISK_AMI", ami),
            ("ASTERISK_AMI_USERNAME", AMI_USER),
            ("ASTERISK_AMI_SECRET", secret),
        ],
    )
}

#[test]
fn the_ami_double_answers_a_real_ami_client_as_asterisk_does() {
    let ami = AmiServer::start(AMI_USER, AMI_SECRET);
    let output = Command::new("node")
        .arg(repo_root().join("tests/ami/client.js"))
        .args([&ami.port.to_string(), AMI_USER, AMI_SECRET])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(
        got["wrongSecret"]["message"], "Authentication failed",
        "{got}"
    );
    assert_eq!(got["login"], "accepted", "{got}");
    assert_eq!(got["ping"]["ping"], "Pong", "{got}");
    assert_eq!(got["setvar"]["response"], "Success", "{got}");
    assert_eq!(got["getvar"]["value"], "INUSE", "{got}");
    assert_eq!(got["notCustom"]["response"], "Error", "{got}");
    assert_eq!(got["unknown"]["response"], "Error", "{got}");
    assert_eq!(got["logoff"]["response"], "Goodbye", "{got}");
    let events = got["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["event"] == "FullyBooted"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["event"] == "DeviceStateChange"
            && e["device"] == "Custom:alice"
            && e["state"] == "INUSE"),
        "{events:?}"
    );
    assert_eq!(
        ami.logins(),
        vec![(AMI_USER.to_owned(), false), (AMI_USER.to_owned(), true)]
    );
}

/// Alice's state follows a phone's call to her app: free, rung, on the
/// call, free again; bob's his own call to a phone; an Asterisk that drops
/// the link gets every state again; a bridge that stops leaves both users
/// unavailable.
#[test]
fn app_users_states_reach_asterisk_as_custom_device_states() {
    let _serial = one_at_a_time();
    let ami = AmiServer::start(AMI_USER, AMI_SECRET);
    let mut bridge = bridge_linked_to(&ami.address(), AMI_SECRET, &[]);
    let within = Duration::from_secs(10);
    for user in ["Custom:alice", "Custom:bob"] {
        assert!(
            ami.wait_for_history(user, &["NOT_INUSE"], within),
            "{user}: {:?}\n{:#?}",
            ami.history(user),
            bridge.logs()
        );
    }

    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut alice = BrowserPeer::start(&sandbox, "alice", "demo", 660);
    alice.command(json!({"op": "autoAnswer", "on": false}));
    let (_phone, signalling) = dial(&bridge, "call.xml", "alice", PCMU_440, 2, "blf", &[]);
    alice.wait_event("incoming call", Duration::from_secs(15));
    assert!(
        ami.wait_for_history("Custom:alice", &["NOT_INUSE", "RINGING"], within),
        "{:?}",
        ami.history("Custom:alice")
    );
    alice.command(json!({"op": "answer"}));
    assert!(
        ami.wait_for_history("Custom:alice", &["RINGING", "INUSE"], within),
        "{:?}",
        ami.history("Custom:alice")
    );
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the SIP call: {output}");
    assert!(
        ami.wait_for_history("Custom:alice", &["INUSE", "NOT_INUSE"], within),
        "{:?}",
        ami.history("Custom:alice")
    );
    assert_eq!(
        ami.history("Custom:bob"),
        ["NOT_INUSE"],
        "bob was not called"
    );

    // Bob calls alice's phone from his app: he is on a call from the start.
    let phone = Baresip::new("alice", "demo", bridge.sip_port, 523, "g711");
    let answering = std::thread::spawn(move || phone.answer_calls(8));
    let registered = bridge.wait_for_log(|l| l.contains("registrar: alice registered"), within);
    assert!(registered.is_some(), "{:#?}", bridge.logs());
    let mut bob = BrowserPeer::start(&sandbox, "bob", "demo", 660);
    bob.command(json!({"op": "call", "to": "alice", "video": false}));
    assert!(
        ami.wait_for_history("Custom:bob", &["NOT_INUSE", "INUSE"], within),
        "{:?}",
        ami.history("Custom:bob")
    );
    bob.wait_event("accepted", Duration::from_secs(15));
    bob.command(json!({"op": "hangUp"}));
    assert!(
        ami.wait_for_history("Custom:bob", &["INUSE", "NOT_INUSE"], within),
        "{:?}",
        ami.history("Custom:bob")
    );

    // Asterisk restarts: the bridge logs in again and tells it everything.
    ami.drop_connections();
    let deadline = std::time::Instant::now() + within;
    while ami.logins().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ami.wait_for_history("Custom:bob", &["NOT_INUSE", "NOT_INUSE"], within),
        "{:?}\n{:#?}",
        ami.history("Custom:bob"),
        bridge.logs()
    );
    assert_eq!(ami.logins().len(), 2, "{:?}", ami.logins());

    // The phone quits (and unregisters) while the bridge is there.
    answering.join().unwrap();
    assert!(bridge.interrupt(), "the bridge stops cleanly");
    for user in ["Custom:alice", "Custom:bob"] {
        assert!(
            ami.wait_for_history(user, &["UNAVAILABLE"], within),
            "{user}: {:?}",
            ami.history(user)
        );
    }
    let logs = bridge.logs().join("\n");
    assert!(!logs.contains(AMI_SECRET), "the AMI secret was logged");
    // The bridge answered Asterisk's MD5 challenges instead.
    let received = ami.received();
    assert!(received.contains("AuthType: MD5"), "{received}");
    assert!(
        !received.contains(AMI_SECRET),
        "the secret crossed the network"
    );
}

#[test]
fn a_refused_ami_login_is_logged_and_the_bridge_goes_on() {
    let _serial = one_at_a_time();
    let ami = AmiServer::start(AMI_USER, AMI_SECRET);
    let wrong_secret = "not-the-ami-secret";
    let management = free_port();
    let listen = format!("127.0.0.1:{management}");
    let mut bridge = bridge_linked_to(&ami.address(), wrong_secret, &["--management", &listen]);
    let refused = bridge.wait_for_log(
        |l| l.contains("login as bridge refused (Authentication failed)"),
        Duration::from_secs(10),
    );
    assert!(refused.is_some(), "{:#?}", bridge.logs());
    assert!(ami.history("Custom:alice").is_empty());
    assert!(bridge.is_running(), "{:#?}", bridge.logs());
    let (status, body) = http_get(management, "/stats", Some(MANAGEMENT_TOKEN));
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["asterisk"]["state"], "login refused", "{stats}");
    assert_eq!(stats["asterisk"]["server"], ami.address(), "{stats}");
    let logs = bridge.logs().join("\n");
    for shown in [&logs, &body] {
        assert!(!shown.contains(wrong_secret), "the AMI secret was shown");
    }
}

/// Something else listens where Asterisk was said to be (a web server):
/// the bridge says so and keeps trying, without crashing or hanging.
#[test]
fn a_server_that_is_not_asterisk_is_named_in_the_log() {
    let _serial = one_at_a_time();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            use std::io::Write;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let mut bridge = bridge_linked_to(&format!("127.0.0.1:{port}"), AMI_SECRET, &[]);
    let named = bridge.wait_for_log(
        |l| l.contains("not an AMI server: it greeted with \"HTTP/1.1 400 Bad Request\""),
        Duration::from_secs(10),
    );
    assert!(named.is_some(), "{:#?}", bridge.logs());
    assert!(bridge.is_running(), "{:#?}", bridge.logs());
}

/// ConnectyCube goes away (here its sandbox, in a process of its own):
/// the mapped user cannot be called, and Asterisk shows it until the
/// chat is back.
#[test]
fn a_user_shows_unavailable_while_connectycube_is_away() {
    let _serial = one_at_a_time();
    let ami = AmiServer::start(AMI_USER, AMI_SECRET);
    let port = free_port();
    let sandbox = SandboxProcess::start(port);
    let config = tempdir().join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "[connectycube]\napi_url = \"{}\"\nchat_url = \"{}\"\n\n\
             [[users]]\nextension = \"carol\"\nlogin = \"carol\"\npassword = \"demo\"\n",
            sandbox.api_url(),
            sandbox.chat_url()
        ),
    )
    .unwrap();
    let bridge = bridge_linked_to(
        &ami.address(),
        AMI_SECRET,
        &["--config", config.to_str().unwrap()],
    );
    let within = Duration::from_secs(10);
    let history = || ami.history("Custom:carol");
    assert!(
        ami.wait_for_history("Custom:carol", &["NOT_INUSE"], within),
        "{:?}\n{:#?}",
        history(),
        bridge.logs()
    );
    drop(sandbox);
    assert!(
        ami.wait_for_history("Custom:carol", &["NOT_INUSE", "UNAVAILABLE"], within),
        "{:?}\n{:#?}",
        history(),
        bridge.logs()
    );
    let _sandbox = SandboxProcess::start(port);
    // The chat tries again with a growing pause (as the SDK does).
    let back = Duration::from_secs(40);
    assert!(
        ami.wait_for_history("Custom:carol", &["UNAVAILABLE", "NOT_INUSE"], back),
        "{:?}\n{:#?}",
        history(),
        bridge.logs()
    );
}

/// Asterisk's manager interface over TLS (`manager.conf`'s `tlsenable`;
/// here a TLS front, socat, before the double): the bridge checks the
/// certificate against `asterisk.tls_ca_file` before it logs in, and
/// refuses one that no authority it trusts signed.
#[test]
fn the_ami_link_runs_over_tls_to_the_certificate_it_trusts() {
    let _serial = one_at_a_time();
    let ami = AmiServer::start(AMI_USER, AMI_SECRET);
    let (certificate, key) = support::self_signed_certificate();
    let port = free_port();
    let front = Command::new("socat")
        .arg(format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            certificate.display(),
            key.display()
        ))
        .arg(format!("TCP:{}", ami.address()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("socat is installed");
    let _front = KilledOnDrop(front);
    let tls = format!("127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(&tls).is_err() {
        assert!(std::time::Instant::now() < deadline, "socat listens");
        std::thread::sleep(Duration::from_millis(50));
    }
    let linked_over_tls = |ca_file: Option<&std::path::Path>| {
        let ca_file = ca_file.map(|p| p.display().to_string());
        let mut environment = vec![
            ("ASTERISK_AMI", tls.as_str()),
            ("ASTERISK_AMI_USERNAME", AMI_USER),
            ("ASTERISK_AMI_SECRET", AMI_SECRET),
            ("ASTERISK_AMI_TLS", "true"),
        ];
        if let Some(path) = &ca_file {
            environment.push(("ASTERISK_AMI_CA_FILE", path));
        }
        BridgeProcess::start_with_environment("127.0.0.1", &[], &environment)
    };

    // Trusting only the public authorities, the bridge never logs in.
    let untrusting = linked_over_tls(None);
    let refused = untrusting.wait_for_log(
        |l| l.contains("TLS: invalid peer certificate"),
        Duration::from_secs(10),
    );
    assert!(refused.is_some(), "{:#?}", untrusting.logs());
    assert!(ami.logins().is_empty(), "{:?}", ami.logins());
    drop(untrusting);

    // Trusting Asterisk's certificate, it logs in and publishes its users.
    let bridge = linked_over_tls(Some(&certificate));
    assert!(
        ami.wait_for_history("Custom:alice", &["NOT_INUSE"], Duration::from_secs(10)),
        "{:?}\n{:#?}",
        ami.history("Custom:alice"),
        bridge.logs()
    );
    assert_eq!(ami.logins().len(), 1, "{:?}", ami.logins());
}

/// A helper process that ends with the test, passed or failed.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
