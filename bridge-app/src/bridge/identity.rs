//! A ConnectyCube user the bridge acts as: its REST session and its chat
//! connection, kept open for as long as the bridge runs. Call signals for a
//! session the bridge follows go to that session's subscriber; new `call`s
//! go to the bridge's handler of incoming app calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_protocol::connectycube::rest::{PushEvent, RestClient, RestError, UserSession};
use bridge_protocol::connectycube::signaling::{CallSignal, ReceivedSignal, SignalType, user_jid};
use bridge_protocol::connectycube::xmpp::{Chat, ChatConfig, ChatEvent};
use bridge_protocol::connectycube::{AppCredentials, UserCredentials};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::ConnectyCubeSection;

/// A `call` that no session of the bridge follows: someone calls this user.
pub struct IncomingCall {
    pub identity: Arc<Identity>,
    pub received: ReceivedSignal,
}

/// Told `true` whenever the user's chat comes online, `false` whenever it
/// goes offline (while it reconnects, calls cannot be signalled).
pub type ChatStateHook = Box<dyn Fn(bool) + Send + Sync>;

pub struct Identity {
    pub user_id: u64,
    pub login: String,
    app_id: u64,
    chat_domain: String,
    chat: Chat,
    /// Its REST session, for push notifications.
    rest: Arc<UserSession>,
    /// Where its push notifications go (`production`, `development`); none when off.
    push_environment: Option<&'static str>,
    subscribers: Mutex<HashMap<String, mpsc::UnboundedSender<ReceivedSignal>>>,
    chat_state: ChatStateHook,
}

impl Identity {
    /// Signs in as `login` and opens its chat; signals start flowing at once.
    pub async fn sign_in(
        cc: &ConnectyCubeSection,
        login: &str,
        password: &str,
        incoming: mpsc::UnboundedSender<IncomingCall>,
        chat_state: ChatStateHook,
    ) -> Result<Arc<Identity>, String> {
        let app = AppCredentials {
            app_id: cc.app_id,
            auth_key: cc.auth_key.clone(),
            auth_secret: cc.auth_secret.clone(),
        };
        let session = Arc::new(UserSession::new(
            RestClient::new(&cc.api_url, app),
            UserCredentials::Login {
                login: login.to_owned(),
                password: password.to_owned(),
            },
        ));
        let user_id = session
            .session()
            .await
            .map_err(|e| format!("cannot sign in as {login:?}: {e}"))?
            .user_id;
        let source = session.clone();
        let (chat, events) = Chat::start(ChatConfig {
            url: cc.chat_url.clone(),
            domain: cc.chat_domain.clone(),
            user_id,
            app_id: cc.app_id,
            // Each (re)connection signs in again: tokens expire, servers restart.
            password: Arc::new(move || {
                let source = source.clone();
                Box::pin(async move {
                    source.renew().await.map_err(|e| e.to_string())?;
                    source.chat_password().await.map_err(|e| e.to_string())
                })
            }),
            keepalive: Duration::from_secs(30),
        });
        let identity = Arc::new(Identity {
            user_id,
            login: login.to_owned(),
            app_id: cc.app_id,
            chat_domain: cc.chat_domain.clone(),
            chat,
            rest: session,
            push_environment: cc.call_push.environment(),
            subscribers: Mutex::default(),
            chat_state,
        });
        tokio::spawn(dispatch(Arc::downgrade(&identity), events, incoming));
        Ok(identity)
    }

    pub fn send(&self, to: u64, signal: &CallSignal) {
        let jid = user_jid(to, self.app_id, &self.chat_domain);
        let id = format!("{:024x}", rand::random::<u128>() >> 32);
        self.chat.send(&signal.to_stanza(&jid, &id));
    }

    /// Sends `payload` to the devices user `to` subscribed for push
    /// notifications, in the background: a call never waits for it, and a
    /// push that fails costs only the push.
    pub fn push(&self, to: u64, payload: Value) {
        let Some(environment) = self.push_environment else {
            return;
        };
        let (rest, login) = (self.rest.clone(), self.login.clone());
        tokio::spawn(async move {
            let what = payload["signal_type"].as_str().unwrap_or("push").to_owned();
            let event = PushEvent {
                user_ids: &[to],
                environment,
                payload: &payload,
            };
            let sent = async {
                let token = rest.session().await?.token;
                match rest.client().create_event(&token, &event).await {
                    // The session expired: once more with a new one.
                    Err(e) if e.is_session_expired() => {
                        let token = rest.renew().await?.token;
                        rest.client().create_event(&token, &event).await
                    }
                    sent => sent,
                }
            };
            match sent.await {
                Ok(()) => info!("push {what} from {login} to user {to} sent"),
                // ConnectyCube's answer when no device of the user is subscribed.
                Err(RestError::Refused {
                    status: 422, body, ..
                }) => info!("push {what} from {login} to user {to} not sent: {body}"),
                Err(e) => warn!("push {what} from {login} to user {to} failed: {e}"),
            }
        });
    }

    /// Signals of session `session_id` from now on.
    pub fn subscribe(&self, session_id: &str) -> mpsc::UnboundedReceiver<ReceivedSignal> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .unwrap()
            .insert(session_id.to_owned(), sender);
        receiver
    }

    pub fn unsubscribe(&self, session_id: &str) {
        self.subscribers.lock().unwrap().remove(session_id);
    }

    fn route(
        self: &Arc<Self>,
        received: ReceivedSignal,
        incoming: &mpsc::UnboundedSender<IncomingCall>,
    ) {
        let session_id = received.signal.session_id.clone();
        let subscriber = self.subscribers.lock().unwrap().get(&session_id).cloned();
        match subscriber {
            Some(subscriber) => {
                let _ = subscriber.send(received);
            }
            None if received.signal.signal_type == SignalType::Call => {
                let _ = incoming.send(IncomingCall {
                    identity: self.clone(),
                    received,
                });
            }
            None => debug!(
                "{}: {} for session {session_id} that nobody follows",
                self.login,
                received.signal.signal_type.as_str()
            ),
        }
    }
}

async fn dispatch(
    identity: std::sync::Weak<Identity>,
    mut events: mpsc::UnboundedReceiver<ChatEvent>,
    incoming: mpsc::UnboundedSender<IncomingCall>,
) {
    while let Some(event) = events.recv().await {
        let Some(identity) = identity.upgrade() else {
            return;
        };
        match event {
            ChatEvent::Online { jid } => {
                info!("ConnectyCube user {}: chat online as {jid}", identity.login);
                (identity.chat_state)(true);
            }
            ChatEvent::Offline { reason, retry_in } => {
                warn!(
                    "ConnectyCube user {}: chat offline ({reason}), retrying in {retry_in:?}",
                    identity.login
                );
                (identity.chat_state)(false);
            }
            ChatEvent::Stanza(stanza) => match CallSignal::from_stanza(&stanza) {
                Ok(received) => identity.route(received, &incoming),
                Err(e) => debug!("{}: ignored stanza: {e}", identity.login),
            },
        }
    }
}
