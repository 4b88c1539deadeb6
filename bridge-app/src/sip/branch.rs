//! The bridge's INVITE to one phone of a call it places for an app: a
//! branch (RFC 3261 §16.7's word), to one registered phone of the
//! extension or to the extension at its SIP server. Until the phone's final
//! answer a branch goes on by itself: to the server's next address while
//! one is silent, unreachable or answers 503 (RFC 3263 §4.3), to a
//! redirect's target (3xx), and to the next RTP profile while the phone
//! refuses the offer as not acceptable (488, 606).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bridge_protocol::codec::MediaKind;
use bridge_protocol::offer_answer::{self, Capabilities, OfferedStream, Origin};
use bridge_protocol::sdes::{CryptoAttribute, CryptoSuite, SrtpKey};
use bridge_protocol::sdp::Direction;
use rsipstack::dialog::DialogId;
use rsipstack::dialog::dialog::DialogState;
use rsipstack::dialog::dialog_layer::DialogLayer;
use rsipstack::dialog::invitation::{InviteAsyncResult, InviteOption};
use rsipstack::dialog::invite_dialog::InviteDialog;
use rsipstack::sip::prelude::{HeadersExt, ToTypedHeader};
use rsipstack::sip::{Header, Method, Response, SipMessage, StatusCode, StatusCodeKind, Uri};
use rsipstack::transaction::key::{TransactionKey, TransactionRole};
use rsipstack::transaction::transaction::Transaction;
use rsipstack::transport::SipAddr;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::ua::{Shared, next_hop, servers_of};

/// How long a SIP server may leave the bridge's INVITE unanswered (not
/// even 100 Trying, due within 200 ms: RFC 3261 §16.2) before the call
/// goes to the domain's next server, when it has one.
const SERVER_SILENCE: Duration = Duration::from_secs(4);

/// Redirections (3xx) followed for one branch.
const MAX_REDIRECTS: u32 = 3;

/// An RTP profile of the bridge's first offer to a phone (RFC 3551, 3711,
/// 4585).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OfferProfile {
    srtp: bool,
    pub feedback: bool,
}

impl OfferProfile {
    /// The profiles offered in turn while the phone refuses them as not
    /// acceptable: the configured one, then those of phones set to SRTP
    /// only or to RTCP feedback only. With `offer_srtp`, never plain RTP.
    fn in_turn(offer_srtp: bool) -> &'static [OfferProfile] {
        const AVP: OfferProfile = OfferProfile::new(false, false);
        const SAVP: OfferProfile = OfferProfile::new(true, false);
        const AVPF: OfferProfile = OfferProfile::new(false, true);
        const SAVPF: OfferProfile = OfferProfile::new(true, true);
        if offer_srtp {
            &[SAVP, SAVPF]
        } else {
            &[AVP, SAVP, AVPF, SAVPF]
        }
    }

    const fn new(srtp: bool, feedback: bool) -> Self {
        Self { srtp, feedback }
    }

    fn name(self) -> &'static str {
        offer_answer::profile_name(self.srtp, self.feedback)
    }
}

/// The call's offer in one profile, what answers to it may take, and its
/// key.
#[derive(Clone)]
pub(super) struct Offer {
    pub profile: OfferProfile,
    sdp: String,
    pub capabilities: Capabilities,
    pub crypto: Option<CryptoAttribute>,
}

impl Offer {
    /// An offer made elsewhere (a transfer's), to be sent as it is.
    pub fn as_is(sdp: String, capabilities: Capabilities) -> Offer {
        Offer {
            profile: OfferProfile::new(capabilities.sdes.is_some(), false),
            sdp,
            capabilities,
            crypto: None,
        }
    }
}

/// The streams the bridge offers the phones of a call it places.
pub(super) struct Streams {
    pub origin: Origin,
    pub address: IpAddr,
    pub audio_port: u16,
    /// An app's video call offers the phone H.264 on a port of its own.
    pub video_port: Option<u16>,
}

impl Streams {
    fn offer(&self, profile: OfferProfile) -> Offer {
        // An SRTP offer has every stream under one fresh key.
        let crypto = profile.srtp.then(|| CryptoAttribute {
            tag: 1,
            key: SrtpKey::generate(CryptoSuite::AesCm128HmacSha1_80),
        });
        let stream = |kind, rtp_port| OfferedStream {
            kind,
            rtp_port,
            direction: Direction::SendRecv,
            crypto: crypto.clone(),
            feedback: profile.feedback,
        };
        let mut streams = vec![stream(MediaKind::Audio, self.audio_port)];
        streams.extend(self.video_port.map(|port| stream(MediaKind::Video, port)));
        // What we offer protected is never sent in the clear: not on the
        // phone's answer, nor on its later offers.
        let capabilities = Capabilities {
            sdes: crypto.as_ref().map(|crypto| crypto.key.clone()),
            srtp_required: crypto.is_some(),
            video: if self.video_port.is_some() {
                vec!["H264"]
            } else {
                Vec::new()
            },
            ..Capabilities::all_audio()
        };
        let sdp = offer_answer::render_offer(&capabilities, self.origin, self.address, &streams);
        Offer {
            profile,
            sdp,
            capabilities,
            crypto,
        }
    }
}

/// What the branches of a call offer.
pub(super) enum Offers {
    /// A new call's streams, offered in each RTP profile in turn while a
    /// phone refuses them.
    InTurn(Streams),
    /// One offer as it is: a transfer's, in the call's codec and keys.
    Fixed(Offer),
}

/// What every branch of a call shares.
pub(super) struct Invitation {
    pub shared: Arc<Shared>,
    /// The INVITE's caller, Contact, credential, Call-ID and headers.
    pub template: InviteOption,
    pub offers: Offers,
}

impl Invitation {
    /// The offer in `profile`, and the profiles to try after it.
    fn offer(&self, profile: Option<OfferProfile>) -> (Offer, &'static [OfferProfile]) {
        match &self.offers {
            Offers::InTurn(streams) => {
                let in_turn = OfferProfile::in_turn(self.shared.config().offer_srtp);
                let profile = profile.unwrap_or(in_turn[0]);
                let later = in_turn
                    .iter()
                    .position(|p| *p == profile)
                    .map_or(&[][..], |at| &in_turn[at + 1..]);
                (streams.offer(profile), later)
            }
            Offers::Fixed(offer) => (offer.clone(), &[]),
        }
    }

    fn call_id(&self) -> &str {
        self.template.call_id.as_deref().unwrap_or_default()
    }

    fn send(
        &self,
        callee: Uri,
        destination: Option<SipAddr>,
        offer: &Offer,
    ) -> anyhow::Result<Attempt> {
        let (sender, states) = self.shared.dialogs.new_dialog_state_channel();
        let option = InviteOption {
            callee,
            destination,
            offer: Some(offer.sdp.as_bytes().to_vec()),
            ..self.template.clone()
        };
        let (dialog, invite) = self.shared.dialogs.do_invite_async(option, sender)?;
        Ok(Attempt {
            dialog,
            invite,
            states,
            heard: false,
            silence_ends: Instant::now() + SERVER_SILENCE,
        })
    }
}

/// One INVITE of a branch.
struct Attempt {
    dialog: InviteDialog,
    invite: JoinHandle<InviteAsyncResult>,
    states: mpsc::UnboundedReceiver<DialogState>,
    /// A 100 or 18x came from the server tried.
    heard: bool,
    silence_ends: Instant,
}

/// How a branch ended without a phone answering.
pub(super) enum Failure {
    /// The phone's (or its server's) final response.
    Refused(Response),
    /// No final response: the status the app is told, and why.
    Unanswered(u16, String),
}

impl Failure {
    pub fn status(&self) -> u16 {
        match self {
            Failure::Refused(response) => response.status_code.clone().into(),
            Failure::Unanswered(status, _) => *status,
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Failure::Refused(response) => response.status_code.to_string(),
            Failure::Unanswered(_, why) => why.clone(),
        }
    }

    /// The failure the app is told when every phone failed: the best of
    /// them (RFC 3261 §16.7: a 6xx, else the lowest class, first come).
    pub fn best(a: Failure, b: Failure) -> Failure {
        let rank = |f: &Failure| match f.status() / 100 {
            6 => 0,
            class => class,
        };
        if rank(&b) < rank(&a) { b } else { a }
    }

    /// A phone declining everywhere (6xx, RFC 3261 §16.7 step 5): the
    /// other phones stop ringing.
    pub fn is_global(&self) -> bool {
        self.status() >= 600
    }

    /// How the phones still ringing stop once every hope of this call
    /// ended with `self`.
    pub fn stop(&self) -> Stop {
        match self {
            Failure::Refused(response) if self.is_global() => Stop::Declined(
                response.status_code.code(),
                response.status_code.text().to_owned(),
            ),
            _ => Stop::Plain,
        }
    }
}

/// Why the bridge stops a phone's ringing, which its CANCEL says (RFC
/// 3326), as Kamailio's does: a phone told the call was completed
/// elsewhere logs no missed call.
#[derive(Clone)]
pub(super) enum Stop {
    /// The call ended unanswered, or the app gave up.
    Plain,
    /// Another phone took the call.
    AnsweredElsewhere,
    /// Another phone declined it for the user everywhere (6xx): its status
    /// and reason phrase.
    Declined(u16, String),
}

impl Stop {
    /// The CANCEL's `Reason`, if it has one.
    fn reason(&self) -> Option<String> {
        match self {
            Stop::Plain => None,
            Stop::AnsweredElsewhere => {
                Some("SIP;cause=200;text=\"Call completed elsewhere\"".into())
            }
            Stop::Declined(status, phrase) => {
                // The phone's own phrase for a status rsipstack does not
                // know: nothing that would end the quoted text.
                let phrase = phrase.replace(['"', '\\'], "");
                Some(format!("SIP;cause={status};text=\"{phrase}\""))
            }
        }
    }
}

/// What became of a branch.
pub(super) enum Progress {
    /// The phone rings (18x; with SDP, early media whose answer the
    /// branch keeps).
    Ringing(StatusCode, bool),
    /// The phone answered.
    Answered(Response),
    Failed(Failure),
}

/// The branch whose phone answered.
pub(super) struct Answered {
    pub target: Uri,
    /// The offer the phone answered.
    pub offer: Offer,
    /// The answer of its 18x with SDP, for a 200 OK that does not repeat it.
    pub early_answer: Option<Vec<u8>>,
    pub dialog: InviteDialog,
    pub states: mpsc::UnboundedReceiver<DialogState>,
}

pub(super) struct Branch {
    /// The Request-URI: the phone's, or a redirect's target.
    pub target: Uri,
    proxy: Option<SipAddr>,
    /// The server addresses not tried yet.
    servers: VecDeque<SipAddr>,
    destination: Option<SipAddr>,
    untried_profiles: std::slice::Iter<'static, OfferProfile>,
    pub offer: Offer,
    redirects: u32,
    attempt: Attempt,
    /// The answer of an 18x with SDP, for a 200 OK that does not repeat it.
    early_answer: Option<Vec<u8>>,
}

impl Branch {
    /// INVITEs `target`: through `proxy`, else to its own host; a SIP
    /// server named in DNS may have several addresses (SRV targets by
    /// priority, then its addresses), tried in turn.
    pub async fn start(
        invitation: &Invitation,
        target: Uri,
        proxy: Option<SipAddr>,
    ) -> anyhow::Result<Branch> {
        let mut servers = match proxy.as_ref().cloned().or_else(|| next_hop(&target)) {
            Some(next_hop) => servers_of(&invitation.shared.resolver, &next_hop).await,
            None => VecDeque::new(),
        };
        let destination = servers.pop_front().or_else(|| proxy.clone());
        let (offer, later) = invitation.offer(None);
        let untried_profiles = later.iter();
        let attempt = invitation.send(target.clone(), destination.clone(), &offer)?;
        Ok(Branch {
            target,
            proxy,
            servers,
            destination,
            untried_profiles,
            offer,
            redirects: 0,
            attempt,
            early_answer: None,
        })
    }

    pub fn dialog(&self) -> &InviteDialog {
        &self.attempt.dialog
    }

    /// The SDP of the phone's last 18x that carried one (early media).
    pub fn early_answer(&self) -> Option<&[u8]> {
        self.early_answer.as_deref()
    }

    /// What the call goes on with once the branch's phone answered.
    pub fn answered(self) -> Answered {
        Answered {
            target: self.target,
            offer: self.offer,
            early_answer: self.early_answer,
            dialog: self.attempt.dialog,
            states: self.attempt.states,
        }
    }

    /// The branch's next step (cancel-safe). Not to be called again once it
    /// answered or failed.
    pub async fn progress(&mut self, invitation: &Invitation) -> Progress {
        loop {
            let attempt = &mut self.attempt;
            // The phone's 18x before its final response: a 200 OK may leave
            // the answer to the 183's SDP.
            let outcome = tokio::select! {
                biased;
                Some(state) = attempt.states.recv() => {
                    attempt.heard |= matches!(state, DialogState::Trying(_) | DialogState::Early(..));
                    if let DialogState::Early(_, response) = state {
                        let with_sdp = !response.body.is_empty();
                        if with_sdp {
                            self.early_answer = Some(response.body.clone());
                        }
                        return Progress::Ringing(response.status_code, with_sdp);
                    }
                    continue;
                }
                result = &mut attempt.invite => result
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string())),
                () = tokio::time::sleep_until(attempt.silence_ends),
                    if !attempt.heard && !self.servers.is_empty() => {
                    attempt.invite.abort();
                    Err(format!("no response within {SERVER_SILENCE:?}"))
                }
            };
            if let Some(progress) = self.retry(invitation, outcome) {
                return progress;
            }
        }
    }

    /// Sends the branch's next INVITE after `outcome` when there is one to
    /// send; otherwise what the outcome means for the call.
    fn retry(
        &mut self,
        invitation: &Invitation,
        outcome: Result<(rsipstack::dialog::DialogId, Option<Response>), String>,
    ) -> Option<Progress> {
        let call_id = invitation.call_id();
        let server_failed = match &outcome {
            Err(e) => Some(e.clone()),
            Ok((_, Some(response))) if response.status_code == StatusCode::ServiceUnavailable => {
                Some(response.status_code.to_string())
            }
            Ok(_) => None,
        };
        if let Some(why) = server_failed
            && let Some(server) = self.servers.pop_front()
        {
            if let Some(failed) = &self.destination {
                info!("call {call_id}: {failed} failed ({why}); trying {server}");
            }
            self.destination = Some(server);
        } else {
            let response = match outcome {
                Ok((_, Some(response))) => response,
                Ok((_, None)) => {
                    let failure = Failure::Unanswered(408, "no final response".into());
                    return Some(Progress::Failed(failure));
                }
                Err(e) => return Some(Progress::Failed(Failure::Unanswered(503, e))),
            };
            let status = u16::from(response.status_code.clone());
            if response.status_code.kind() == StatusCodeKind::Successful {
                return Some(Progress::Answered(response));
            }
            // 3xx: try the first Contact, a few times at most (RFC 3261 §8.1.3.4).
            let redirect = (300..400)
                .contains(&status)
                .then(|| response.contact_header().ok()?.typed().ok())
                .flatten()
                .filter(|_| self.redirects < MAX_REDIRECTS);
            // A phone set to take only SRTP, or only RTCP feedback, refuses
            // offers in the other profiles as not acceptable.
            let next_profile = if matches!(status, 488 | 606) {
                self.untried_profiles.next().copied()
            } else {
                None
            };
            if let Some(contact) = redirect {
                self.redirects += 1;
                info!("call {call_id}: {status}, redirected to {}", contact.uri);
                self.target = contact.uri;
                // The new target's own server, through the proxy if any.
                self.destination = self.proxy.clone();
                self.servers.clear();
            } else if let Some(next) = next_profile {
                info!(
                    "call {call_id}: {} answered {status} to {}; offering {}",
                    self.target,
                    self.offer.profile.name(),
                    next.name()
                );
                self.offer = invitation.offer(Some(next)).0;
            } else {
                return Some(Progress::Failed(Failure::Refused(response)));
            }
        }
        self.early_answer = None;
        match invitation.send(self.target.clone(), self.destination.clone(), &self.offer) {
            Ok(attempt) => {
                self.attempt = attempt;
                None
            }
            Err(e) => Some(Progress::Failed(Failure::Unanswered(503, e.to_string()))),
        }
    }

    /// Stops the branch: CANCEL while it rings, saying why; BYE when its
    /// phone answered too, at the same moment as the one that took the call.
    pub async fn stop(self, dialogs: &DialogLayer, why: &Stop) {
        let Attempt { dialog, invite, .. } = self.attempt;
        let ringing = matches!(
            dialog.state(),
            DialogState::Trying(_) | DialogState::Early(..)
        );
        if matches!(dialog.state(), DialogState::Confirmed(..)) {
            let _ = dialog.bye().await;
            dialogs.remove_dialog(&dialog.id());
        } else if let (Some(reason), true) = (why.reason(), ringing) {
            if let Err(e) = cancel_with_reason(dialogs, &dialog, self.destination, reason).await {
                debug!("{}: CANCEL: {e:#}", self.target);
                let _ = dialog.cancel().await;
                return;
            }
            // rsipstack's own CANCEL would end a 2xx that crossed this one.
            if let Ok(Ok(Ok((_, Some(response))))) =
                tokio::time::timeout(INVITE_TIMEOUT, invite).await
                && response.status_code.kind() == StatusCodeKind::Successful
            {
                let _ = dialog.bye().await;
                dialogs.remove_dialog(&dialog.id());
            }
        } else {
            let _ = dialog.cancel().await;
        }
    }
}

/// The branches of one call, rung at once (parallel forking, RFC 3261
/// §16.7): the first phone to answer takes the call; a 6xx ends it; when
/// every phone failed, the best of their answers is the call's.
pub(super) struct Fork {
    pub invitation: Invitation,
    /// The phones still ringing.
    pub branches: Vec<Branch>,
    /// The best failure so far.
    failure: Option<Failure>,
}

/// What a fork's phones did.
pub(super) enum Forked {
    /// The phone of the branch at this index rings (18x; with SDP: early
    /// media).
    Ringing(usize, StatusCode, bool),
    /// A phone answered: its branch, and its 2xx.
    Answered(Box<(Answered, Response)>),
    /// A phone refused or failed while others still ring: its early dialog.
    Dropped(DialogId),
    /// No phone took the call; those still ringing are in `branches`.
    Failed(Failure),
}

impl Fork {
    /// INVITEs each of `targets` (through `proxy` if any); the targets
    /// that cannot be called are logged and left out.
    pub async fn start(invitation: Invitation, targets: Vec<Uri>, proxy: Option<SipAddr>) -> Fork {
        let mut branches = Vec::new();
        for target in targets {
            match Branch::start(&invitation, target.clone(), proxy.clone()).await {
                Ok(branch) => branches.push(branch),
                Err(e) => warn!("call {}: cannot call {target}: {e:#}", invitation.call_id()),
            }
        }
        Fork {
            invitation,
            branches,
            failure: None,
        }
    }

    /// The phones' next step (cancel-safe). Not to be called again once
    /// a phone answered or the fork failed.
    pub async fn next(&mut self) -> Forked {
        let Fork {
            invitation,
            branches,
            failure,
        } = self;
        if branches.is_empty() {
            let failed = Failure::Unanswered(503, "no phone could be called".into());
            return Forked::Failed(failure.take().unwrap_or(failed));
        }
        let ringing = branches
            .iter_mut()
            .map(|b| Box::pin(b.progress(invitation)));
        let (progress, index, _) = futures_util::future::select_all(ringing).await;
        match progress {
            Progress::Ringing(status, with_sdp) => Forked::Ringing(index, status, with_sdp),
            Progress::Answered(response) => {
                let answered = branches.swap_remove(index).answered();
                Forked::Answered(Box::new((answered, response)))
            }
            Progress::Failed(failed) => {
                let branch = branches.remove(index);
                info!(
                    "call {}: {}: {}",
                    invitation.call_id(),
                    branch.target,
                    failed.reason()
                );
                let global = failed.is_global();
                let best = match failure.take() {
                    Some(earlier) => Failure::best(earlier, failed),
                    None => failed,
                };
                if global || branches.is_empty() {
                    return Forked::Failed(best);
                }
                *failure = Some(best);
                Forked::Dropped(branch.dialog().id())
            }
        }
    }

    /// The early dialogs of the phones ringing now.
    pub fn ringing_dialogs(&self) -> Vec<DialogId> {
        self.branches
            .iter()
            .map(Branch::dialog)
            .filter(|dialog| matches!(dialog.state(), DialogState::Early(..)))
            .map(InviteDialog::id)
            .collect()
    }

    /// The phones still ringing stop, not waited for (a CANCEL may wait on
    /// an unresponsive phone).
    pub fn stop_later(&mut self, why: Stop) {
        for branch in self.branches.drain(..) {
            let (shared, why) = (self.invitation.shared.clone(), why.clone());
            tokio::spawn(async move { branch.stop(&shared.dialogs, &why).await });
        }
    }

    /// The phones still ringing stop, for a call that ends unanswered.
    pub async fn stop(&mut self) {
        let dialogs = &self.invitation.shared.dialogs;
        let stops = self
            .branches
            .drain(..)
            .map(|b| b.stop(dialogs, &Stop::Plain));
        futures_util::future::join_all(stops).await;
    }
}

/// How long an INVITE transaction lasts at most (RFC 3261 Timer B).
const INVITE_TIMEOUT: Duration = Duration::from_secs(32);

/// CANCELs the INVITE of `dialog` with `reason` (RFC 3326), which
/// rsipstack's `cancel` cannot carry: the same request line, Via, From,
/// To, Call-ID and CSeq number (RFC 3261 §9.1), sent where the INVITE went.
async fn cancel_with_reason(
    dialogs: &DialogLayer,
    dialog: &InviteDialog,
    destination: Option<SipAddr>,
    reason: String,
) -> anyhow::Result<()> {
    let mut cancel = dialog.initial_request();
    let seq = cancel.cseq_header()?.seq()?;
    cancel
        .headers
        .retain(|h| !matches!(h, Header::ContentLength(_) | Header::ContentType(_)));
    cancel.method = Method::Cancel;
    cancel
        .cseq_header_mut()?
        .mut_seq(seq)?
        .mut_method(Method::Cancel)?;
    cancel.body = Vec::new();
    cancel.headers.push(Header::Reason(reason.into()));
    cancel.headers.push(Header::ContentLength(0.into()));
    let key = TransactionKey::from_request(&cancel, TransactionRole::Client)?;
    let mut tx = Transaction::new_client(key, cancel, dialogs.endpoint.clone(), None);
    tx.destination = destination;
    tx.send().await?;
    while let Some(message) = tx.receive().await {
        if let SipMessage::Response(response) = message
            && response.status_code.kind() != StatusCodeKind::Provisional
        {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_offered_srtp_is_never_offered_in_the_clear() {
        let names = |offer_srtp| {
            OfferProfile::in_turn(offer_srtp)
                .iter()
                .map(|profile| profile.name())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(true), ["RTP/SAVP", "RTP/SAVPF"]);
        assert_eq!(
            names(false),
            ["RTP/AVP", "RTP/SAVP", "RTP/AVPF", "RTP/SAVPF"]
        );
    }

    #[test]
    fn a_cancel_says_why_the_phone_stops_ringing() {
        let refused = |status_line: &str| {
            let text = format!(
                "SIP/2.0 {status_line}\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n\
                 From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\n\
                 CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
            );
            Failure::Refused(Response::try_from(text.as_str()).unwrap())
        };
        assert_eq!(Stop::Plain.reason(), None);
        assert_eq!(
            Stop::AnsweredElsewhere.reason().unwrap(),
            "SIP;cause=200;text=\"Call completed elsewhere\""
        );
        assert_eq!(refused("486 Busy Here").stop().reason(), None);
        assert_eq!(
            refused("603 Decline").stop().reason().unwrap(),
            "SIP;cause=603;text=\"Decline\""
        );
        assert_eq!(
            refused("699 Not \"here\" \\").stop().reason().unwrap(),
            "SIP;cause=699;text=\"Not here \""
        );
        assert_eq!(
            Failure::Unanswered(408, "no answer".into()).stop().reason(),
            None
        );
    }

    #[test]
    fn the_app_hears_the_best_of_the_phones_refusals() {
        let unanswered = |status| Failure::Unanswered(status, String::new());
        let best = |statuses: &[u16]| {
            statuses
                .iter()
                .map(|&s| unanswered(s))
                .reduce(Failure::best)
                .map(|f| f.status())
        };
        assert_eq!(best(&[503, 486, 408]), Some(486));
        assert_eq!(best(&[486, 603, 480]), Some(603));
        assert_eq!(best(&[480, 486]), Some(480), "the first of a class");
        assert!(unanswered(603).is_global() && !unanswered(486).is_global());
    }
}
