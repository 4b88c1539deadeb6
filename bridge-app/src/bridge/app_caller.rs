//! A ConnectyCube call to a mapped user carried on to that extension's SIP
//! phone: the app's offer is answered through the call's
//! `connectycubesink` once the phone answers, `accept` goes back from the
//! callee's identity, and refusals come back as `reject` with the reason.

use std::sync::Arc;

use bridge_protocol::connectycube::signaling::{
    CallSignal, IceCandidate, ReceivedSignal, SignalType,
};
use futures_util::future::BoxFuture;
use gst::prelude::*;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::app_leg::{add_candidates, follow, local_description, refuse_mesh, refuse_mesh_link};
use super::identity::Identity;
use super::presence::CallPresence;
use crate::sip::{AppCaller, AppSide};

pub struct ConnectyCubeCaller {
    /// The bridge acts as the called user.
    callee: Arc<Identity>,
    /// The received `call`.
    call: ReceivedSignal,
    signals: Option<mpsc::UnboundedReceiver<ReceivedSignal>>,
    /// Candidates that came while the phone rang.
    early_candidates: Vec<IceCandidate>,
    /// Whether the app still expects to hear from us.
    open: bool,
    /// `accept` went out (on the phone's answer, or on its early media).
    accepted: bool,
    signalling: Option<tokio::task::JoinHandle<()>>,
    /// The calling app user's part of this call, for Asterisk: held until
    /// the call ends.
    _presence: Option<CallPresence>,
}

impl ConnectyCubeCaller {
    /// `signals`: the call's session, subscribed before anything else
    /// arrives (the SDK sends `call` again every few seconds).
    pub fn new(
        callee: Arc<Identity>,
        call: ReceivedSignal,
        signals: mpsc::UnboundedReceiver<ReceivedSignal>,
    ) -> Self {
        Self {
            callee,
            call,
            signals: Some(signals),
            early_candidates: Vec::new(),
            open: true,
            accepted: false,
            signalling: None,
            _presence: None,
        }
    }

    pub fn with_presence(mut self, presence: Option<CallPresence>) -> Self {
        self._presence = presence;
        self
    }

    fn reply(&self, signal_type: SignalType) -> CallSignal {
        CallSignal::new(
            signal_type,
            &self.call.signal.session_id,
            self.call.signal.call_type,
            self.call.from_user_id,
            vec![self.callee.user_id],
        )
    }

    fn close(&mut self, signal_type: SignalType, user_info: Vec<(String, String)>) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        let mut signal = self.reply(signal_type);
        signal.user_info = user_info;
        self.callee.send(self.call.from_user_id, &signal);
        self.callee.unsubscribe(&self.call.signal.session_id);
        if let Some(task) = self.signalling.take() {
            task.abort();
        }
    }

    async fn answer_offer(
        &mut self,
        webrtc: gst::Element,
    ) -> Result<oneshot::Receiver<String>, String> {
        let offer = self.call.signal.sdp.clone().unwrap_or_default();
        let early_candidates = std::mem::take(&mut self.early_candidates);
        let answer = local_description(&webrtc, "answer", |webrtc| {
            webrtc.emit_by_name::<()>("set-remote-description", &[&"offer", &offer]);
            add_candidates(webrtc, &early_candidates);
        })
        .await
        .ok_or("the WebRTC leg produced no answer")?;
        let mut accept = self.reply(SignalType::Accept);
        accept.sdp = Some(answer);
        self.callee.send(self.call.from_user_id, &accept);
        self.accepted = true;
        // In a group call, the SDK leaves each link between two opponents to
        // the one with the higher id: those below us wait for our call, which
        // will not come (those above call us, and are refused then).
        let us = self.callee.user_id;
        for &opponent in &self.call.signal.opponent_ids {
            if opponent < us && opponent != self.call.from_user_id {
                refuse_mesh(&self.callee, &self.call.signal, opponent);
            }
        }
        info!(
            "ConnectyCube call {} from user {}: accepted for {}",
            self.call.signal.session_id, self.call.from_user_id, self.callee.login
        );
        let signals = self.signals.take().ok_or("the call's signals are gone")?;
        let (hangup, hung_up) = oneshot::channel();
        self.signalling = Some(tokio::spawn(follow(
            webrtc,
            signals,
            hangup,
            self.callee.clone(),
            (self.reply(SignalType::IceRestart), self.call.from_user_id),
        )));
        Ok(hung_up)
    }

    async fn wait_abandoned(&mut self) -> String {
        let Some(signals) = self.signals.as_mut() else {
            return std::future::pending().await;
        };
        while let Some(received) = signals.recv().await {
            if received.from_user_id != self.call.from_user_id {
                refuse_mesh_link(&self.callee, &received);
                continue;
            }
            match received.signal.signal_type {
                SignalType::HangUp | SignalType::Reject => {
                    self.open = false;
                    self.callee.unsubscribe(&self.call.signal.session_id);
                    return format!("user {} hung up", received.from_user_id);
                }
                SignalType::IceCandidates => {
                    self.early_candidates.extend(received.signal.candidates);
                }
                // The SDK's redial of the same call.
                _ => {}
            }
        }
        "the chat connection closed".into()
    }
}

impl AppSide for ConnectyCubeCaller {
    fn describe(&self) -> String {
        format!("ConnectyCube user {}", self.call.from_user_id)
    }

    fn hang_up(&mut self, reason: &str) {
        self.close(
            SignalType::HangUp,
            vec![("reason".into(), reason.to_owned())],
        );
    }
}

impl AppCaller for ConnectyCubeCaller {
    fn wants_video(&self) -> bool {
        self.call
            .signal
            .sdp
            .as_deref()
            .is_some_and(|sdp| sdp.contains("\nm=video"))
    }

    fn answer(
        &mut self,
        webrtc: gst::Element,
    ) -> BoxFuture<'_, Result<oneshot::Receiver<String>, String>> {
        Box::pin(self.answer_offer(webrtc))
    }

    fn refuse(&mut self, status: u16, reason: &str) {
        // A call accepted for the phone's early media is answered for the
        // app: it ends as a callee's hang-up does. The reason goes along
        // either way.
        let (signal_type, done) = match self.accepted {
            true => (SignalType::HangUp, "hung up"),
            false => (SignalType::Reject, "rejected"),
        };
        info!(
            "ConnectyCube call {} from user {}: {done} ({status} {reason})",
            self.call.signal.session_id, self.call.from_user_id
        );
        let mut info = vec![
            ("reason".to_owned(), reason.to_owned()),
            ("sipStatus".to_owned(), status.to_string()),
        ];
        if status == 486 || status == 600 {
            info.push(("busy".to_owned(), "true".to_owned()));
        }
        self.close(signal_type, info);
    }

    fn abandoned(&mut self) -> BoxFuture<'_, String> {
        Box::pin(self.wait_abandoned())
    }
}

impl Drop for ConnectyCubeCaller {
    fn drop(&mut self) {
        self.hang_up("the SIP call ended");
    }
}
