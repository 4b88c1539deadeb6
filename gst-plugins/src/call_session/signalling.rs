//! Stand-alone ConnectyCube signalling for a call: sign in with the element's
//! credentials, then place the call (`peer` set) or answer the first one that
//! comes, as the JS SDK 6.1.2 does it (connectycube-protocol.md §4).

use std::sync::{Arc, Weak};
use std::time::Duration;

use bridge_protocol::connectycube::rest::{RestClient, UserSession};
use bridge_protocol::connectycube::signaling::{
    CallSignal, CallType, ReceivedSignal, SignalType, user_jid,
};
use bridge_protocol::connectycube::xmpp::{Chat, ChatConfig, ChatEvent};
use bridge_protocol::connectycube::{AppCredentials, UserCredentials};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{CallEnd, CallSession};
use crate::CAT;

/// The SDK resends `call` this often until it is answered.
const REDIAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct SignallingSettings {
    pub app: AppCredentials,
    pub login: String,
    pub password: String,
    pub api_url: String,
    pub chat_url: String,
    pub chat_domain: String,
    /// User id or login to call; `None` answers the first incoming call.
    pub peer: Option<String>,
    pub answer_timeout: Duration,
}

impl std::fmt::Debug for SignallingSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignallingSettings")
            .field("app", &self.app)
            .field("login", &self.login)
            .field("password", &"<redacted>")
            .field("api_url", &self.api_url)
            .field("chat_url", &self.chat_url)
            .field("peer", &self.peer)
            .finish()
    }
}

pub enum Command {
    /// Every stream of the pipeline is known: negotiation may start.
    MediaReady,
    /// The pipeline is going away: hang up.
    HangUp,
}

pub fn start(
    session: Weak<CallSession>,
    settings: SignallingSettings,
) -> mpsc::UnboundedSender<Command> {
    let (commands, receiver) = mpsc::unbounded_channel();
    crate::RUNTIME.spawn(async move {
        let mut call = Call {
            session,
            settings,
            commands: receiver,
            chat: None,
            user_id: 0,
            active: None,
            media_ready: false,
        };
        if let Err(end) = call.run().await {
            gst::warning!(CAT, "call ended: {}", end.reason);
            if let Some(session) = call.session.upgrade() {
                session.end(end);
            }
        }
        call.hang_up();
    });
    commands
}

/// The call in progress: who, which session id, which type.
struct Active {
    peer: u64,
    session_id: String,
    call_type: CallType,
    caller: u64,
}

struct Call {
    session: Weak<CallSession>,
    settings: SignallingSettings,
    commands: mpsc::UnboundedReceiver<Command>,
    chat: Option<(Chat, mpsc::UnboundedReceiver<ChatEvent>)>,
    user_id: u64,
    active: Option<Active>,
    /// Every local stream is known (it may come while waiting for a call).
    media_ready: bool,
}

impl Call {
    fn session(&self) -> Result<Arc<CallSession>, CallEnd> {
        self.session
            .upgrade()
            .ok_or_else(|| CallEnd::normal("the pipeline is gone"))
    }

    async fn run(&mut self) -> Result<(), CallEnd> {
        let rest = RestClient::new(&self.settings.api_url, self.settings.app.clone());
        let user = Arc::new(UserSession::new(
            rest.clone(),
            UserCredentials::Login {
                login: self.settings.login.clone(),
                password: self.settings.password.clone(),
            },
        ));
        let signed_in = user.session().await.map_err(|e| {
            format!(
                "ConnectyCube sign-in as {:?} failed: {e}",
                self.settings.login
            )
        })?;
        self.user_id = signed_in.user_id;
        let peer = match &self.settings.peer {
            Some(peer) => Some(match peer.parse::<u64>() {
                Ok(id) => id,
                Err(_) => rest
                    .user_id_by_login(&signed_in.token, peer)
                    .await
                    .map_err(|e| format!("no ConnectyCube user {peer:?}: {e}"))?,
            }),
            None => None,
        };
        let password = self.settings.password.clone();
        let (chat, mut events) = Chat::start(ChatConfig {
            url: self.settings.chat_url.clone(),
            domain: self.settings.chat_domain.clone(),
            user_id: self.user_id,
            app_id: self.settings.app.app_id,
            password: Arc::new(move || {
                let password = password.clone();
                Box::pin(async move { Ok(password) })
            }),
            keepalive: Duration::from_secs(30),
        });
        match tokio::time::timeout(Duration::from_secs(15), events.recv()).await {
            Ok(Some(ChatEvent::Online { jid })) => gst::info!(CAT, "chat online as {jid}"),
            Ok(Some(ChatEvent::Offline { reason, .. })) => {
                return Err(format!("chat sign-in failed: {reason}").into());
            }
            _ => {
                return Err(CallEnd::from(
                    "chat did not come online within 15 s".to_owned(),
                ));
            }
        }
        self.chat = Some((chat, events));
        match peer {
            Some(peer) => self.place_call(peer).await,
            None => self.answer_call().await,
        }
    }

    async fn next_signal(
        &mut self,
        until: Option<Instant>,
    ) -> Result<Option<ReceivedSignal>, CallEnd> {
        let (_, events) = self.chat.as_mut().expect("signed in");
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                command = self.commands.recv() => match command {
                    Some(Command::HangUp) | None => return Err(CallEnd::normal("hung up locally")),
                    Some(Command::MediaReady) => {
                        self.media_ready = true;
                        continue;
                    }
                },
                _ = sleep_until(until) => return Ok(None),
            };
            match event {
                Some(ChatEvent::Stanza(stanza)) => match CallSignal::from_stanza(&stanza) {
                    Ok(signal) => return Ok(Some(signal)),
                    Err(e) => gst::debug!(CAT, "not a usable call signal: {e}"),
                },
                Some(ChatEvent::Offline { reason, .. }) => {
                    gst::warning!(CAT, "chat offline ({reason}); reconnecting")
                }
                Some(ChatEvent::Online { .. }) => {}
                None => return Err(CallEnd::from("chat ended".to_owned())),
            }
        }
    }

    async fn wait_media_ready(&mut self) -> Result<(), CallEnd> {
        if self.media_ready {
            return Ok(());
        }
        match self.commands.recv().await {
            Some(Command::MediaReady) => {
                self.media_ready = true;
                Ok(())
            }
            Some(Command::HangUp) | None => Err(CallEnd::normal("hung up locally")),
        }
    }

    async fn place_call(&mut self, peer: u64) -> Result<(), CallEnd> {
        self.wait_media_ready().await?;
        let offer = self.session()?.create_offer().await?;
        gst::debug!(CAT, "local offer:\n{offer}");
        let call_type = if offer.contains("m=video") {
            CallType::Video
        } else {
            CallType::Audio
        };
        let session_id = format!("{:032x}", rand::random::<u128>());
        self.active = Some(Active {
            peer,
            session_id: session_id.clone(),
            call_type,
            caller: self.user_id,
        });
        let mut call = CallSignal::new(
            SignalType::Call,
            &session_id,
            call_type,
            self.user_id,
            vec![peer],
        );
        call.sdp = Some(offer);
        let deadline = Instant::now() + self.settings.answer_timeout;
        loop {
            self.send(peer, &call);
            let redial = (Instant::now() + REDIAL).min(deadline);
            while let Some(received) = self.next_signal(Some(redial)).await? {
                if received.from_user_id != peer || received.signal.session_id != session_id {
                    continue;
                }
                match received.signal.signal_type {
                    SignalType::Accept => {
                        let answer = received.signal.sdp.unwrap_or_default();
                        self.session()?
                            .set_remote(gst_webrtc::WebRTCSDPType::Answer, &answer)
                            .await?;
                        return self.in_call().await;
                    }
                    SignalType::Reject => {
                        self.active = None;
                        return Err(CallEnd::normal(format!(
                            "rejected by user {peer}{}",
                            describe(&received.signal.user_info)
                        )));
                    }
                    SignalType::HangUp => {
                        self.active = None;
                        return Err(CallEnd::normal(format!("hung up by user {peer}")));
                    }
                    SignalType::IceCandidates => self.add_candidates(&received.signal),
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(CallEnd::normal(format!(
                    "no answer from user {peer} within {} s",
                    self.settings.answer_timeout.as_secs()
                )));
            }
        }
    }

    /// Answers the first usable call. An offer whose SDP cannot be used is
    /// rejected (the reason in userInfo) and the element keeps waiting.
    async fn answer_call(&mut self) -> Result<(), CallEnd> {
        let deadline = Instant::now() + self.settings.answer_timeout;
        loop {
            let Some(offer) = self.next_signal(Some(deadline)).await? else {
                return Err(CallEnd::normal(format!(
                    "no call came within {} s",
                    self.settings.answer_timeout.as_secs()
                )));
            };
            if offer.signal.signal_type != SignalType::Call {
                continue;
            }
            let signal = &offer.signal;
            self.wait_media_ready().await?;
            let answer = match self
                .session()?
                .answer(signal.sdp.as_deref().unwrap_or_default())
                .await
            {
                Ok(answer) => answer,
                Err(problem) => {
                    gst::warning!(
                        CAT,
                        "refusing the call from user {}: {}",
                        offer.from_user_id,
                        problem
                    );
                    let mut reject = CallSignal::new(
                        SignalType::Reject,
                        &signal.session_id,
                        signal.call_type,
                        offer.from_user_id,
                        vec![self.user_id],
                    );
                    reject.user_info =
                        vec![("reason".into(), format!("unusable offer: {problem}"))];
                    self.send(offer.from_user_id, &reject);
                    continue;
                }
            };
            self.active = Some(Active {
                peer: offer.from_user_id,
                session_id: signal.session_id.clone(),
                call_type: signal.call_type,
                caller: offer.from_user_id,
            });
            let mut accept = CallSignal::new(
                SignalType::Accept,
                &signal.session_id,
                signal.call_type,
                offer.from_user_id,
                vec![self.user_id],
            );
            accept.sdp = Some(answer);
            self.send(offer.from_user_id, &accept);
            return self.in_call().await;
        }
    }

    /// Connected: apply trickled candidates until someone hangs up.
    async fn in_call(&mut self) -> Result<(), CallEnd> {
        let (peer, session_id) = {
            let active = self.active.as_ref().expect("in a call");
            (active.peer, active.session_id.clone())
        };
        loop {
            let Some(received) = self.next_signal(None).await? else {
                continue;
            };
            if received.from_user_id != peer || received.signal.session_id != session_id {
                continue;
            }
            match received.signal.signal_type {
                SignalType::IceCandidates => self.add_candidates(&received.signal),
                SignalType::IceRestart => self.restart_ice(&received).await?,
                SignalType::HangUp | SignalType::Reject => {
                    self.active = None;
                    return Err(CallEnd::normal(format!(
                        "hung up by user {peer}{}",
                        describe(&received.signal.user_info)
                    )));
                }
                _ => {}
            }
        }
    }

    /// The peer's network changed: answer its ICE-restart offer with
    /// `iceRestartAccept`, as the SDK does.
    async fn restart_ice(&mut self, received: &ReceivedSignal) -> Result<(), CallEnd> {
        let Some(offer) = received.signal.sdp.as_deref() else {
            gst::warning!(CAT, "iceRestart without SDP ignored");
            return Ok(());
        };
        let answer = match self.session()?.answer(offer).await {
            Ok(answer) => answer,
            Err(problem) => {
                gst::warning!(CAT, "cannot answer the ICE restart: {problem}");
                return Ok(());
            }
        };
        let mut accept = CallSignal::new(
            SignalType::IceRestartAccept,
            &received.signal.session_id,
            received.signal.call_type,
            self.user_id,
            vec![received.from_user_id],
        );
        accept.sdp = Some(answer);
        self.send(received.from_user_id, &accept);
        gst::info!(CAT, "ICE restarted by user {}", received.from_user_id);
        Ok(())
    }

    fn add_candidates(&self, signal: &CallSignal) {
        if let Some(session) = self.session.upgrade() {
            for candidate in &signal.candidates {
                session.add_remote_candidate(candidate.sdp_mline_index, &candidate.candidate);
            }
        }
    }

    fn send(&self, to: u64, signal: &CallSignal) {
        if let Some((chat, _)) = &self.chat {
            let jid = user_jid(to, self.settings.app.app_id, &self.settings.chat_domain);
            chat.send(&signal.to_stanza(&jid, &format!("{:024x}", rand::random::<u128>() >> 32)));
        }
    }

    /// Tells the peer the call is over, if there is one.
    fn hang_up(&mut self) {
        if let Some(active) = self.active.take() {
            let signal = CallSignal::new(
                SignalType::HangUp,
                &active.session_id,
                active.call_type,
                active.caller,
                vec![active.peer],
            );
            self.send(active.peer, &signal);
        }
        // Give the stanza a moment to leave before the chat closes.
        if let Some((chat, events)) = self.chat.take() {
            crate::RUNTIME.spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop((chat, events));
            });
        }
    }
}

async fn sleep_until(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn describe(user_info: &[(String, String)]) -> String {
    if user_info.is_empty() {
        return String::new();
    }
    let fields: Vec<String> = user_info.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(" ({})", fields.join(", "))
}
