//! A SIP call carried on to a ConnectyCube user: the offer of the call's
//! `connectycubesink`, sent as a `call` from the caller's identity (again
//! every 5 s, as the SDK does, until answered), the answer applied from
//! `accept`, trickled candidates handed over, and `hangUp` either way. The
//! call also goes out as a push notification (`startCall`, and `endCall`
//! if it ends unanswered), so the user's mobile app rings even in the
//! background or closed, as ConnectyCube's call-kit apps expect.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_protocol::connectycube::signaling::{
    CallSignal, CallType, IceCandidate, ReceivedSignal, SignalType,
};
use futures_util::future::BoxFuture;
use gst::prelude::*;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::identity::Identity;
use super::presence::CallPresence;
use crate::sip::{AppLeg, AppSide, Refusal};

/// The SDK's dial interval: `call` is sent again until answered.
const REDIAL: Duration = Duration::from_secs(5);
/// Longest wait for the WebRTC leg's offer or answer (ICE gathering included).
const DESCRIPTION_TIMEOUT: Duration = Duration::from_secs(20);

/// Does `start` on a call's `connectycubesink` and waits for the local
/// description of `kind` it leads to.
pub(super) async fn local_description(
    webrtc: &gst::Element,
    kind: &str,
    start: impl FnOnce(&gst::Element),
) -> Option<String> {
    let (descriptions, mut described) = mpsc::unbounded_channel();
    let handler = webrtc.connect("local-description", false, move |args| {
        if let (Ok(kind), Ok(sdp)) = (args[1].get::<String>(), args[2].get::<String>()) {
            let _ = descriptions.send((kind, sdp));
        }
        None
    });
    start(webrtc);
    let described = tokio::time::timeout(DESCRIPTION_TIMEOUT, described.recv()).await;
    webrtc.disconnect(handler);
    match described {
        Ok(Some((described_kind, sdp))) if described_kind == kind => Some(sdp),
        _ => None,
    }
}

/// Session ids of calls the bridge placed: their `call`, reaching the
/// bridge's own identity of the callee, is not a new call.
pub type PlacedSessions = Arc<Mutex<HashSet<String>>>;

pub struct ConnectyCubeLeg {
    pub from: Arc<Identity>,
    pub to_user_id: u64,
    pub to_name: String,
    pub user_info: Vec<(String, String)>,
    pub placed: PlacedSessions,
    /// How long the app may ring.
    pub answer_timeout: Duration,
    session_id: String,
    /// Video once the offer carries video, else audio.
    call_type: CallType,
    signalling: Option<tokio::task::JoinHandle<()>>,
    answered: bool,
    /// The called app user's part of this call, for Asterisk.
    presence: Option<CallPresence>,
}

impl ConnectyCubeLeg {
    pub fn new(
        from: Arc<Identity>,
        to_user_id: u64,
        to_name: String,
        user_info: Vec<(String, String)>,
        placed: PlacedSessions,
        answer_timeout: Duration,
    ) -> Self {
        Self {
            from,
            to_user_id,
            to_name,
            user_info,
            placed,
            answer_timeout,
            session_id: uuid_like(),
            call_type: CallType::Audio,
            signalling: None,
            answered: false,
            presence: None,
        }
    }

    pub fn with_presence(mut self, presence: Option<CallPresence>) -> Self {
        self.presence = presence;
        self
    }

    fn signal(&self, signal_type: SignalType) -> CallSignal {
        CallSignal::new(
            signal_type,
            &self.session_id,
            self.call_type,
            self.from.user_id,
            vec![self.to_user_id],
        )
    }

    /// Who calls, as the app user's phone shows it.
    fn caller_name(&self) -> &str {
        ["callerName", "callerNumber"]
            .iter()
            .find_map(|key| self.user_info.iter().find(|(k, _)| k == key))
            .map_or(self.from.login.as_str(), |(_, v)| v.as_str())
    }

    fn kind(&self) -> &'static str {
        match self.call_type {
            CallType::Video => "video",
            CallType::Audio => "audio",
        }
    }

    /// A push of `signal_type` about this call: the keys ConnectyCube's
    /// call-kit apps read (Flutter's `connectycube_flutter_call_kit`, and
    /// React Native's CallKeep samples), so either kind of app rings.
    fn push_payload(&self, signal_type: &str, message: String) -> Value {
        let caller = self.caller_name();
        json!({
            "message": message,
            "signal_type": signal_type,
            "session_id": self.session_id,
            "call_type": self.call_type as u8,
            "caller_id": self.from.user_id,
            "caller_name": caller,
            "call_opponents": self.to_user_id.to_string(),
            "uuid": self.session_id,
            "callType": self.kind(),
            "initiatorId": self.from.user_id,
            "opponentsIds": self.to_user_id.to_string(),
            "handle": caller,
        })
    }

    fn push_start(&self) {
        let message = format!("Incoming {} call from {}", self.kind(), self.caller_name());
        let mut payload = self.push_payload("startCall", message);
        // iOS wakes the app for VoIP pushes only.
        payload["ios_voip"] = json!(1);
        self.from.push(self.to_user_id, payload);
    }

    async fn place(&mut self, webrtc: gst::Element) -> Result<oneshot::Receiver<String>, Refusal> {
        let Some(offer) = local_description(&webrtc, "offer", |webrtc| {
            webrtc.emit_by_name::<()>("create-offer", &[]);
        })
        .await
        else {
            return Err(Refusal {
                status: 503,
                reason: "the WebRTC leg produced no offer".into(),
            });
        };

        if offer.contains("\nm=video") {
            self.call_type = CallType::Video;
        }
        self.placed.lock().unwrap().insert(self.session_id.clone());
        let mut signals = self.from.subscribe(&self.session_id);
        let mut call = self.signal(SignalType::Call);
        call.sdp = Some(offer);
        call.user_info = self.user_info.clone();
        let deadline = tokio::time::Instant::now() + self.answer_timeout;
        info!(
            "ConnectyCube call {} from {} to {}: calling",
            self.session_id, self.from.login, self.to_name
        );
        self.from.send(self.to_user_id, &call);
        self.push_start();
        loop {
            let redial = (tokio::time::Instant::now() + REDIAL).min(deadline);
            loop {
                let received = match tokio::time::timeout_at(redial, signals.recv()).await {
                    Ok(Some(received)) => received,
                    Ok(None) => {
                        return Err(Refusal {
                            status: 503,
                            reason: "the chat connection closed".into(),
                        });
                    }
                    Err(_) => break,
                };
                if received.from_user_id != self.to_user_id {
                    continue;
                }
                let signal = &received.signal;
                match signal.signal_type {
                    SignalType::Accept => {
                        self.answered = true;
                        if let Some(presence) = &mut self.presence {
                            presence.answered();
                        }
                        let answer = signal.sdp.clone().unwrap_or_default();
                        webrtc.emit_by_name::<()>("set-remote-description", &[&"answer", &answer]);
                        add_candidates(&webrtc, &received.signal.candidates);
                        let (hangup, hung_up) = oneshot::channel();
                        self.signalling = Some(tokio::spawn(follow(
                            webrtc,
                            signals,
                            hangup,
                            self.from.clone(),
                            (self.signal(SignalType::IceRestart), self.to_user_id),
                        )));
                        return Ok(hung_up);
                    }
                    SignalType::Reject => {
                        self.forget();
                        let busy = signal
                            .user_info
                            .iter()
                            .any(|(k, v)| k == "busy" && v == "true");
                        return Err(Refusal {
                            status: if busy { 486 } else { 603 },
                            reason: format!(
                                "{} rejected the call{}",
                                self.to_name,
                                describe(&signal.user_info)
                            ),
                        });
                    }
                    SignalType::HangUp => {
                        self.forget();
                        return Err(Refusal {
                            status: 603,
                            reason: format!("{} hung up before answering", self.to_name),
                        });
                    }
                    SignalType::IceCandidates => {
                        add_candidates(&webrtc, &received.signal.candidates)
                    }
                    _ => {}
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Refusal {
                    status: 480,
                    reason: format!("{} did not answer", self.to_name),
                });
            }
            self.from.send(self.to_user_id, &call);
        }
    }
}

/// After `accept`: candidates keep coming, and either side may restart ICE
/// (the app's network changed), until someone hangs up. `us` is the
/// identity the bridge speaks as in this call; `restart` is the
/// `iceRestart` signal it sends `peer` (the other user) when the WebRTC
/// leg, having made the offer, offers again because the connection was
/// lost.
pub(super) async fn follow(
    webrtc: gst::Element,
    mut signals: mpsc::UnboundedReceiver<ReceivedSignal>,
    hangup: oneshot::Sender<String>,
    us: Arc<Identity>,
    (restart, peer): (CallSignal, u64),
) {
    let (offers, mut restarts) = mpsc::unbounded_channel();
    let handler = webrtc.connect("local-description", false, move |args| {
        if let (Ok(kind), Ok(sdp)) = (args[1].get::<String>(), args[2].get::<String>())
            && kind == "offer"
        {
            let _ = offers.send(sdp);
        }
        None
    });
    loop {
        tokio::select! {
            received = signals.recv() => {
                let Some(received) = received else { break };
                if received.from_user_id != peer {
                    refuse_mesh_link(&us, &received);
                    continue;
                }
                match received.signal.signal_type {
                    SignalType::IceCandidates => add_candidates(&webrtc, &received.signal.candidates),
                    SignalType::IceRestart => restart_ice(&webrtc, &received, &us).await,
                    SignalType::IceRestartAccept => {
                        let answer = received.signal.sdp.unwrap_or_default();
                        webrtc.emit_by_name::<()>("set-remote-description", &[&"answer", &answer]);
                        info!(
                            "ConnectyCube call {}: user {} took the ICE restart",
                            restart.session_id, received.from_user_id
                        );
                    }
                    SignalType::HangUp | SignalType::Reject => {
                        let _ = hangup.send(format!(
                            "user {} hung up{}",
                            received.from_user_id,
                            describe(&received.signal.user_info)
                        ));
                        break;
                    }
                    _ => {}
                }
            }
            Some(offer) = restarts.recv() => {
                let mut signal = restart.clone();
                signal.sdp = Some(offer);
                us.send(peer, &signal);
                info!(
                    "ConnectyCube call {}: the connection was lost, ICE restarted toward user {peer}",
                    restart.session_id
                );
            }
        }
    }
    webrtc.disconnect(handler);
}

/// The reason a group call's other users are given when they try to
/// connect to a phone's user.
const MESH_REFUSED: &str = "a phone on a group call talks only with the user who called it";

/// A signal of the call's session from another user than the call's peer:
/// in a group call the SDK connects every two opponents too (a mesh), and a
/// phone's user takes part only with its peer. A `call` is refused, so the
/// other app stops dialling at once; the rest (a leaving user's `hangUp`,
/// its candidates) is not this call's and is ignored.
pub(super) fn refuse_mesh_link(us: &Identity, received: &ReceivedSignal) {
    if received.signal.signal_type != SignalType::Call {
        return;
    }
    info!(
        "ConnectyCube call {}: user {} connects to {} in a group call: refused ({MESH_REFUSED})",
        received.signal.session_id, received.from_user_id, us.login
    );
    refuse_mesh(us, &received.signal, received.from_user_id);
}

/// Tells `to` that `us` takes no part in the group call `call` with it.
pub(super) fn refuse_mesh(us: &Identity, call: &CallSignal, to: u64) {
    let mut reject = CallSignal::new(
        SignalType::Reject,
        &call.session_id,
        call.call_type,
        call.caller_id,
        call.opponent_ids.clone(),
    );
    reject.user_info = vec![("reason".to_owned(), MESH_REFUSED.to_owned())];
    us.send(to, &reject);
}

/// Answers an `iceRestart` offer with `iceRestartAccept`, as the SDK does,
/// so the call survives the app's move to another network.
async fn restart_ice(webrtc: &gst::Element, received: &ReceivedSignal, us: &Identity) {
    let session_id = &received.signal.session_id;
    let Some(offer) = received.signal.sdp.clone() else {
        warn!("ConnectyCube call {session_id}: iceRestart without SDP ignored");
        return;
    };
    let answer = local_description(webrtc, "answer", |webrtc| {
        webrtc.emit_by_name::<()>("set-remote-description", &[&"offer", &offer]);
    })
    .await;
    let Some(answer) = answer else {
        warn!("ConnectyCube call {session_id}: the WebRTC leg did not answer the ICE restart");
        return;
    };
    let mut accept = CallSignal::new(
        SignalType::IceRestartAccept,
        session_id,
        received.signal.call_type,
        us.user_id,
        vec![received.from_user_id],
    );
    accept.sdp = Some(answer);
    us.send(received.from_user_id, &accept);
    info!(
        "ConnectyCube call {session_id}: ICE restarted by user {}",
        received.from_user_id
    );
}

pub(super) fn add_candidates(webrtc: &gst::Element, candidates: &[IceCandidate]) {
    for candidate in candidates {
        webrtc.emit_by_name::<()>(
            "add-ice-candidate",
            &[&candidate.sdp_mline_index, &candidate.candidate],
        );
    }
}

impl ConnectyCubeLeg {
    /// The app ended the call itself: nothing to tell it.
    fn forget(&self) {
        self.placed.lock().unwrap().remove(&self.session_id);
        self.from.unsubscribe(&self.session_id);
    }
}

impl AppLeg for ConnectyCubeLeg {
    fn ring(
        &mut self,
        webrtc: gst::Element,
    ) -> BoxFuture<'_, Result<oneshot::Receiver<String>, Refusal>> {
        Box::pin(self.place(webrtc))
    }
}

impl AppSide for ConnectyCubeLeg {
    fn describe(&self) -> String {
        format!("ConnectyCube user {} ({})", self.to_user_id, self.to_name)
    }

    fn hang_up(&mut self, reason: &str) {
        if !self.placed.lock().unwrap().remove(&self.session_id) {
            return;
        }
        info!(
            "ConnectyCube call {} to {}: hangUp ({reason})",
            self.session_id, self.to_name
        );
        let mut hang_up = self.signal(SignalType::HangUp);
        hang_up.user_info = vec![("reason".into(), reason.to_owned())];
        self.from.send(self.to_user_id, &hang_up);
        if !self.answered {
            // The devices the start woke stop ringing; an answered call's
            // end is for its app alone.
            let message = format!("Missed call from {}", self.caller_name());
            let payload = self.push_payload("endCall", message);
            self.from.push(self.to_user_id, payload);
        }
        self.from.unsubscribe(&self.session_id);
        if let Some(task) = self.signalling.take() {
            task.abort();
        }
    }
}

impl Drop for ConnectyCubeLeg {
    fn drop(&mut self) {
        debug!("ConnectyCube call {} done", self.session_id);
        self.hang_up("the SIP call ended");
    }
}

fn describe(user_info: &[(String, String)]) -> String {
    if user_info.is_empty() {
        return String::new();
    }
    let fields: Vec<String> = user_info.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(" ({})", fields.join(", "))
}

/// A session id shaped like the SDK's (a UUID).
pub fn uuid_like() -> String {
    let bits = rand::random::<u128>();
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}
