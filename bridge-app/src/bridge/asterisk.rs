//! The link to Asterisk's manager interface (AMI). Each mapped user's state
//! ([`Presence`]) is published as a custom device state — `Setvar` of
//! `DEVICE_STATE(Custom:<extension>)` — so that phones' BLF keys (a
//! dialplan `hint` on `Custom:alice`), queues and the dialplan see whether
//! the app user is free, being rung or on a call, or cannot be reached.
//! After any failure the link logs in again, after a pause that grows to
//! 30 s, and publishes every state anew; calls never wait for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_protocol::ami::{AmiError, Connection, Transport};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::presence::{DeviceState, Presence};

/// How often an idle link asks whether Asterisk is still there.
const PING_EVERY: Duration = Duration::from_secs(20);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);
/// At shutdown, how long marking every user unavailable may take.
const FAREWELL_WITHIN: Duration = Duration::from_secs(2);

pub struct AmiSettings {
    /// `host:port`.
    pub address: String,
    pub transport: Transport,
    pub username: String,
    pub secret: String,
    /// Before the extension in the device's name (`Custom:`).
    pub device_prefix: String,
}

impl AmiSettings {
    fn device(&self, extension: &str) -> String {
        format!("{}{extension}", self.device_prefix)
    }
}

/// What the management API shows of the link.
#[derive(Default)]
struct LinkStatus {
    state: &'static str,
    greeting: Option<String>,
    states_published: u64,
    last_error: Option<String>,
}

pub struct AsteriskLink {
    address: String,
    status: Arc<Mutex<LinkStatus>>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl AsteriskLink {
    /// Starts keeping Asterisk told of `presence`.
    pub fn start(settings: AmiSettings, presence: Arc<Presence>) -> Self {
        let status = Arc::new(Mutex::new(LinkStatus {
            state: "connecting",
            ..LinkStatus::default()
        }));
        let stop = CancellationToken::new();
        let address = settings.address.clone();
        let task = tokio::spawn(keep_linked(
            settings,
            presence,
            status.clone(),
            stop.clone(),
        ));
        AsteriskLink {
            address,
            status,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let status = self.status.lock().unwrap();
        json!({
            "server": self.address,
            "state": status.state,
            "greeting": status.greeting,
            "states_published": status.states_published,
            "last_error": status.last_error,
        })
    }

    /// Marks every user unavailable (the bridge no longer reaches them)
    /// and logs off; an Asterisk that does not answer does not hold up
    /// the bridge's stop.
    pub async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap().take();
        if let Some(mut task) = task
            && tokio::time::timeout(FAREWELL_WITHIN * 2, &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

async fn keep_linked(
    settings: AmiSettings,
    presence: Arc<Presence>,
    status: Arc<Mutex<LinkStatus>>,
    stop: CancellationToken,
) {
    let address = &settings.address;
    let mut retry = FIRST_RETRY;
    loop {
        status.lock().unwrap().state = "connecting";
        let (transport, username) = (&settings.transport, &settings.username);
        let login = tokio::select! {
            login = Connection::login(address, transport, username, &settings.secret) => login,
            () = stop.cancelled() => break,
        };
        let failure = match login {
            Ok(connection) => {
                info!(
                    "Asterisk AMI {address}: logged in as {} ({})",
                    settings.username, connection.greeting
                );
                retry = FIRST_RETRY;
                {
                    let mut status = status.lock().unwrap();
                    status.state = "logged in";
                    status.greeting = Some(connection.greeting.clone());
                }
                match publish(connection, &settings, &presence, &status, &stop).await {
                    Ok(()) => break,
                    Err(e) => {
                        warn!("Asterisk AMI {address}: {e}; logging in again in {retry:?}");
                        e
                    }
                }
            }
            Err(AmiError::LoginRefused(why)) => {
                error!(
                    "Asterisk AMI {address}: login as {} refused ({why}); check asterisk.username \
                     and asterisk.secret (manager.conf); trying again in {LAST_RETRY:?}",
                    settings.username
                );
                retry = LAST_RETRY;
                AmiError::LoginRefused(why)
            }
            Err(e) => {
                warn!("Asterisk AMI {address}: {e}; trying again in {retry:?}");
                e
            }
        };
        {
            let mut status = status.lock().unwrap();
            status.state = match failure {
                AmiError::LoginRefused(_) => "login refused",
                _ => "disconnected",
            };
            status.last_error = Some(failure.to_string());
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = stop.cancelled() => break,
        }
        retry = (retry * 2).min(LAST_RETRY);
    }
    status.lock().unwrap().state = "stopped";
}

/// Publishes every change of `presence` until the link fails (the error)
/// or the bridge stops (`Ok`).
async fn publish(
    mut connection: Connection,
    settings: &AmiSettings,
    presence: &Presence,
    status: &Mutex<LinkStatus>,
    stop: &CancellationToken,
) -> Result<(), AmiError> {
    let mut changes = presence.subscribe();
    // What Asterisk holds: only changes are sent, all of them after a login.
    let mut published: HashMap<String, DeviceState> = HashMap::new();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    // A slow Setvar delays the next ping; it does not make up for it.
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        changes.mark_unchanged();
        for (extension, state) in presence.states() {
            if published.get(&extension) != Some(&state) {
                set_state(&mut connection, settings, &extension, state, status).await?;
                published.insert(extension, state);
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            _ = ping.tick() => {
                let ping = connection.action("Ping");
                let pong = connection.request(ping).await?;
                if !pong.is_success() {
                    return Err(AmiError::Io(format!("Ping answered {:?}", pong.get("Message"))));
                }
            }
            // Asterisk's own messages (events, even with events off) are
            // passed over; a closed or garbled connection ends the link.
            frame = connection.read_frame() => { frame?; }
        }
    }
    let farewell = async {
        for extension in published.keys() {
            let unavailable = DeviceState::Unavailable;
            set_state(&mut connection, settings, extension, unavailable, status).await?;
        }
        let logoff = connection.action("Logoff");
        connection.request(logoff).await.map(drop)
    };
    if let Ok(Err(e)) | Err(e) = tokio::time::timeout(FAREWELL_WITHIN, farewell)
        .await
        .map_err(|_| AmiError::Timeout(FAREWELL_WITHIN))
    {
        warn!(
            "Asterisk AMI {}: users not marked unavailable at shutdown: {e}",
            settings.address
        );
    }
    Ok(())
}

/// `Setvar` of the user's custom device state. Asterisk refusing it (a
/// manager user without the `call` write permission, say) is logged, not
/// retried until the state changes again; a failed link is the error.
async fn set_state(
    connection: &mut Connection,
    settings: &AmiSettings,
    extension: &str,
    state: DeviceState,
    status: &Mutex<LinkStatus>,
) -> Result<(), AmiError> {
    let device = settings.device(extension);
    let action = connection
        .action("Setvar")
        .with("Variable", &format!("DEVICE_STATE({device})"))
        .with("Value", state.asterisk_name());
    let response = connection.request(action).await?;
    if response.is_success() {
        debug!("Asterisk AMI: {device} is {}", state.asterisk_name());
        status.lock().unwrap().states_published += 1;
    } else {
        warn!(
            "Asterisk AMI {}: {device} not set to {}: {}",
            settings.address,
            state.asterisk_name(),
            response.get("Message").unwrap_or("refused")
        );
    }
    Ok(())
}
