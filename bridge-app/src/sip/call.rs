//! One inbound call, from INVITE to BYE: admission, target, capacity,
//! session timer and offer checks (each with its own final response), then
//! 180, 200 with the answer, and the life of the dialog — re-INVITE and
//! UPDATE (hold, resume, new address or codec, refreshes, offers in ACK),
//! INFO DTMF, RTP timeout, session expiry, shutdown.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bridge_protocol::codec::MediaKind;
use bridge_protocol::dtmf;
use bridge_protocol::offer_answer::{
    self, Capabilities, LocalStream, NegotiatedStream, OfferedStream, Origin,
};
use bridge_protocol::sdes::{CryptoAttribute, CryptoSuite, SrtpKey};
use bridge_protocol::sdp::{self, Direction};
use rsipstack::dialog::DialogId;
use rsipstack::dialog::dialog::{DialogState, TerminatedReason, TransactionHandle};
use rsipstack::dialog::invite_dialog::InviteDialog;
use rsipstack::sip::prelude::{HeadersExt, ToTypedHeader};
use rsipstack::sip::{Header, Method, Request, StatusCode};
use rsipstack::transaction::transaction::Transaction;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::admission::Verdict;
use super::branch::{
    Answered, Branch, Failure, Fork, Forked, Invitation, Offer, Offers, Stop, Streams,
};
use super::media::{CallMedia, MediaEvent, Peer, PortReservation};
use super::recorder::Recorder;
use super::routing::{AppCaller, AppLeg, AppSide, CallRecord, Caller, Destination};
use super::session_timer::{Refresher, SessionTimer};
use super::transfer::{self, ReferTarget, Replaces};
use super::ua::{
    ALLOW, LiveCall, PhoneRoute, Replaceable, SUPPORTED, Shared, cseq_of, phone_route, refuse,
    reply, server_invite, source_of, warning,
};
use super::video::{AppVideoCodec, CallVideo};

/// How long a bridged call may wait for its WebRTC connection after the
/// app answered.
const ICE_TIMEOUT: Duration = Duration::from_secs(20);

/// A reliable 180 is sent again after T1, then twice as long each time,
/// up to 64 × T1 in all (RFC 3262 §3).
const RELIABLE_RESEND_FIRST: Duration = Duration::from_millis(500);
const RELIABLE_RESEND_LAST: Duration = Duration::from_secs(16);

/// How often a call's RTP statistics are logged.
const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// How soon a session refresh the phone did not take is tried again.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

/// What the bridge's session refresh got: the phone's final response, if
/// the request went out.
type RefreshResult = rsipstack::Result<Option<rsipstack::sip::Response>>;

/// How long a digit from SIP INFO is played back (INFO bodies rarely say).
const INFO_DIGIT_MS: u32 = 160;

pub(super) fn incoming(shared: Arc<Shared>, tx: Transaction) {
    tokio::spawn(async move {
        let call_id = tx
            .original
            .call_id_header()
            .map(|h| h.value().to_owned())
            .unwrap_or_default();
        if let Err(e) = answer_call(shared, tx, &call_id).await {
            warn!("call {call_id}: {e:#}");
        }
    });
}

/// Counts a call as active for as long as it lives.
struct ActiveCall {
    shared: Arc<Shared>,
    call_id: String,
}

impl ActiveCall {
    /// Lists the call among those in progress; the token ends it.
    /// `remote_cseq` is the CSeq of the phone's INVITE (0 when the bridge
    /// placed the call).
    fn register(
        shared: &Arc<Shared>,
        call_id: &str,
        remote_cseq: u32,
    ) -> (ActiveCall, CancellationToken) {
        let stop = shared.shutdown.child_token();
        shared.calls.lock().unwrap().insert(
            call_id.to_owned(),
            LiveCall {
                stop: stop.clone(),
                view: None,
                remote_cseq,
                replaceable: None,
                prack: None,
            },
        );
        let active = ActiveCall {
            shared: shared.clone(),
            call_id: call_id.to_owned(),
        };
        (active, stop)
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.shared.active_calls.fetch_sub(1, Ordering::Relaxed);
        self.shared.calls.lock().unwrap().remove(&self.call_id);
    }
}

/// Whether a phone's `Allow` lists `method`.
fn allows(message: &impl HeadersExt, method: &str) -> bool {
    message.headers().iter().any(|header| {
        header.name().eq_ignore_ascii_case("Allow")
            && header
                .value()
                .split(',')
                .any(|allowed| allowed.trim().eq_ignore_ascii_case(method))
    })
}

/// Digits for a phone whose stream carries no RFC 4733 events but whose
/// `Allow` lists INFO: SIP INFO `application/dtmf-relay`, one request at a
/// time, in the order dialled.
struct InfoDtmf {
    allowed: bool,
    queue: Option<mpsc::Sender<(char, u32)>>,
}

/// Digits waiting for their INFO; an app sending more is refused (a keypad
/// is not that fast, and a flood must not become one toward the phone).
const INFO_DIGITS_QUEUED: usize = 32;

impl InfoDtmf {
    fn new(allowed: bool) -> Self {
        InfoDtmf {
            allowed,
            queue: None,
        }
    }

    /// Queues a digit; `false` when the phone takes no INFO or too many wait.
    fn send(
        &mut self,
        dialog: &InviteDialog,
        call_id: &str,
        digit: char,
        duration_ms: u32,
    ) -> bool {
        if !self.allowed {
            return false;
        }
        let queue = self.queue.get_or_insert_with(|| {
            let (queue, mut digits) = mpsc::channel::<(char, u32)>(INFO_DIGITS_QUEUED);
            let (dialog, call_id) = (dialog.clone(), call_id.to_owned());
            tokio::spawn(async move {
                while let Some((digit, duration_ms)) = digits.recv().await {
                    let headers = vec![Header::ContentType("application/dtmf-relay".into())];
                    let body = dtmf::relay_body(digit, duration_ms).into_bytes();
                    match dialog.info(Some(headers), Some(body)).await {
                        Ok(Some(response)) if u16::from(response.status_code.clone()) >= 300 => {
                            warn!(
                                "call {call_id}: the phone refused DTMF {digit} as SIP INFO ({})",
                                response.status_code
                            );
                        }
                        Ok(_) => info!(
                            "call {call_id}: DTMF {digit} ({duration_ms} ms) from the app sent to the phone (SIP INFO)"
                        ),
                        Err(e) => warn!("call {call_id}: DTMF {digit} as SIP INFO failed: {e}"),
                    }
                }
            });
            queue
        });
        queue.try_send((digit, duration_ms)).is_ok()
    }
}

/// SIP INFO `picture_fast_update` (RFC 5168) toward a phone, beside the RTCP
/// PLI/FIR `sipsrc` sends, for phones that read only the former: sent when
/// the phone's `Allow` lists INFO, at most once a second, never again once
/// the phone refuses one.
struct FastUpdate {
    accepted: Arc<AtomicBool>,
    last: Option<Instant>,
}

impl FastUpdate {
    const INTERVAL: Duration = Duration::from_secs(1);
    const BODY: &str = "<?xml version=\"1.0\" encoding=\"utf-8\" ?>\r\n\
        <media_control><vc_primitive><to_encoder><picture_fast_update/></to_encoder></vc_primitive></media_control>\r\n";

    fn new(allowed: bool) -> Self {
        FastUpdate {
            accepted: Arc::new(AtomicBool::new(allowed)),
            last: None,
        }
    }

    /// Whether a request may go at `now` (and counts it as gone).
    fn due(&mut self, now: Instant) -> bool {
        if !self.accepted.load(Ordering::Relaxed)
            || self.last.is_some_and(|last| now - last < Self::INTERVAL)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

async fn answer_call(
    shared: Arc<Shared>,
    mut tx: Transaction,
    call_id: &str,
) -> anyhow::Result<()> {
    let Some(source) = source_of(&tx) else {
        return Ok(());
    };
    let verdict = shared.admission.check(&tx.original, source);
    let Verdict::Admit {
        user: authenticated,
    } = verdict
    else {
        info!("call {call_id} from {source}: {verdict:?}");
        refuse(&mut tx, &verdict).await;
        return Ok(());
    };
    let unsupported = unsupported_requirements(&tx.original);
    if !unsupported.is_empty() {
        let unsupported = unsupported.join(", ");
        info!("call {call_id}: requires {unsupported}, 420");
        let headers = vec![Header::Unsupported(unsupported.into())];
        reply(&mut tx, StatusCode::BadExtension, headers).await;
        return Ok(());
    }
    match replaces_of(&tx.original) {
        Ok(None) => {}
        Ok(Some(replaces)) => {
            hand_to_replaced_call(&shared, tx, &replaces, call_id).await;
            return Ok(());
        }
        Err(why) => {
            info!("call {call_id}: {why}, 400");
            reply(&mut tx, StatusCode::BadRequest, vec![warning(399, &why)]).await;
            return Ok(());
        }
    }
    let started = std::time::SystemTime::now();
    let caller = calling_party(&tx.original, authenticated.as_deref(), call_id);
    let target = tx
        .original
        .uri
        .auth
        .as_ref()
        .map(|a| a.user.clone())
        .unwrap_or_default();
    let Some(destination) = shared.router.route(&target, &caller) else {
        info!(
            "call {call_id} from {} to unknown user {target:?}: 404",
            caller.uri
        );
        reply(&mut tx, StatusCode::NotFound, vec![]).await;
        return Ok(());
    };
    if let Err(unavailable) = shared.take_call_slot() {
        warn!("call {call_id}: {unavailable}, 503");
        reply(
            &mut tx,
            StatusCode::ServiceUnavailable,
            unavailable.headers(),
        )
        .await;
        return Ok(());
    }
    let invite_cseq = cseq_of(&tx.original);
    let (_active, token) = ActiveCall::register(&shared, call_id, invite_cseq.unwrap_or(0));

    let min_se = shared.config().min_session_expires;
    let session_timer = match SessionTimer::requested_within(&tx.original, min_se) {
        Ok(timer) => timer,
        Err(header) => {
            info!("call {call_id}: Session-Expires below Min-SE {min_se}, 422");
            reply(&mut tx, StatusCode::SessionIntervalTooSmall, vec![header]).await;
            return Ok(());
        }
    };

    // One SDES key per call, so that re-offers keep what the phone knows.
    let mut capabilities = Capabilities {
        sdes: Some(SrtpKey::generate(CryptoSuite::AesCm128HmacSha1_80)),
        ..Capabilities::all_audio()
    };
    // A bridged call takes the phone's H.264 video too.
    if matches!(destination, Destination::App { .. }) && shared.config().video != AppVideoCodec::Off
    {
        capabilities.video = vec!["H264"];
    }
    let offer = match offered_sdp(&tx.original) {
        Ok(offer) => offer,
        Err(reason) => {
            info!("call {call_id}: {reason}, 488");
            reply(
                &mut tx,
                StatusCode::NotAcceptableHere,
                vec![warning(399, &reason)],
            )
            .await;
            return Ok(());
        }
    };
    let mut negotiated = match offer
        .as_ref()
        .map(|o| offer_answer::answer(o, &capabilities))
    {
        Some(Err(e)) => {
            info!("call {call_id}: {e}, 488");
            let warning = warning(304, &e.to_string());
            reply(&mut tx, StatusCode::NotAcceptableHere, vec![warning]).await;
            return Ok(());
        }
        Some(Ok(negotiation)) => Some(negotiation),
        None => None,
    };

    // An INVITE without an offer (a delayed offer, as some PBXs and
    // trunks send): a bridged call's media starts on the bridge's own
    // offer, inactive, so that the app can ring; the answer in the ACK then
    // says where the phone's audio goes and in which codec.
    let provisional = match (&negotiated, &destination) {
        (None, Destination::App { .. }) => {
            capabilities.video.clear();
            offer_answer::provisional_audio(&capabilities)
        }
        _ => None,
    };
    let reservation = match PortReservation::new(shared.config().media_address) {
        Ok(r) => r,
        Err(e) => {
            warn!("call {call_id}: {e:#}, 503");
            reply(&mut tx, StatusCode::ServiceUnavailable, vec![]).await;
            return Ok(());
        }
    };
    let phone_allows_info = allows(&tx.original, "INFO");
    let phone_allows_update = allows(&tx.original, "UPDATE");
    let reliable_ringing = required_tags(&tx.original).iter().any(|t| t == "100rel");
    let (state_sender, states) = shared.dialogs.new_dialog_state_channel();
    let dialog = server_invite(&shared, &tx, state_sender)?;
    let mut driver = dialog.clone();
    tokio::spawn(async move {
        // Sends 100 Trying, retransmits responses, takes the ACK or CANCEL.
        let _ = driver.handle(&mut tx).await;
    });
    if reliable_ringing {
        ring_reliably(&shared, &dialog, call_id)?;
    } else {
        dialog.ringing(None, None)?;
    }
    let (peer, mut app) = match destination {
        Destination::Service(service) => (Peer::Service(service), None),
        Destination::App { leg, record_to } => (
            Peer::App {
                session: format!("app-{}", reservation.session()),
                record_to,
            },
            Some(leg),
        ),
    };
    let callee = app
        .as_ref()
        .map_or_else(|| target.clone(), |leg| leg.describe());
    info!("call {call_id} from {} to {callee}: ringing", caller.uri);
    let mut call = Call {
        shared: shared.clone(),
        dialog,
        call_id: call_id.to_owned(),
        peer,
        reservation,
        media: None,
        media_events: mpsc::unbounded_channel(),
        origin: Origin {
            session_id: rand::random::<u32>().into(),
            version: 1,
        },
        video: None,
        app_offers_video: false,
        recorder: None,
        fast_update: FastUpdate::new(phone_allows_info),
        info_dtmf: InfoDtmf::new(phone_allows_info),
        answer_in_ack_of: None,
        awaiting_first_answer: false,
        phone_allows_update,
        answered: false,
        session_timer,
        capabilities,
        offered_crypto: None,
        offered_feedback: false,
        app: None,
        app_hangup: None,
        app_identity: Caller {
            user: target.clone(),
            display_name: None,
            uri: format!("sip:{target}@{}", shared.contact.host_with_port),
        },
        record: CallRecord::new(
            call_id.to_owned(),
            caller.clone(),
            target.clone(),
            callee.clone(),
            started,
        ),
    };
    // A bridged call's media runs while it rings: the app's offer needs it
    // (the video first, so the offer includes it).
    if let Some(stream) = negotiated.as_ref().and_then(|n| n.video().cloned()) {
        let reservation = PortReservation::new(call.reservation.address);
        if !call.start_video(reservation, &stream) {
            call.capabilities.video.clear();
            negotiated = offer
                .as_ref()
                .and_then(|o| offer_answer::answer(o, &call.capabilities).ok());
        }
    }
    let audio = negotiated
        .as_ref()
        .and_then(|n| n.audio().cloned())
        .or(provisional);
    if let (Some(_), Some(audio)) = (&app, &audio) {
        call.apply(audio)?;
        if negotiated.is_some() {
            // Later offers may move or hold the stream, not change its codec.
            call.capabilities.audio = vec![audio.codec.encoding_name];
        }
    }

    let mut states = states;
    let config = shared.config();
    let webrtc = call.media.as_ref().and_then(|m| m.app_element().cloned());
    let answered = async {
        match (app.as_mut(), webrtc) {
            (Some(leg), Some(webrtc)) => leg.ring(webrtc).await.map(Some),
            _ => {
                tokio::time::sleep(config.answer_delay).await;
                Ok(None)
            }
        }
    };
    let ring_ended = async {
        loop {
            match states.recv().await {
                Some(DialogState::Terminated(_, reason)) => return describe(&reason),
                None => return "the dialog closed".to_owned(),
                Some(_) => {}
            }
        }
    };
    let hang_up = |app: &mut Option<Box<dyn AppLeg>>, reason: &str| {
        if let Some(leg) = app.as_mut() {
            leg.hang_up(reason);
        }
    };
    let app_hangup = tokio::select! {
        result = answered => match result {
            Ok(hangup) => hangup,
            Err(refusal) => {
                info!("call {call_id}: {callee} refused ({}), {}", refusal.reason, refusal.status);
                call.finish(refusal.status, format!("refused: {}", refusal.reason));
                call.dialog.reject(
                    Some(StatusCode::from(refusal.status)),
                    Some(format!("SIP;cause={};text=\"{}\"", refusal.status, refusal.reason.replace('"', "'"))),
                )?;
                return Ok(());
            }
        },
        ended = ring_ended => {
            info!("call {call_id}: ended while ringing ({ended})");
            hang_up(&mut app, &ended);
            call.finish(487, ended);
            return Ok(());
        }
        () = tokio::time::sleep(config.no_answer_timeout) => {
            info!("call {call_id}: no answer within {:?}, 480", config.no_answer_timeout);
            hang_up(&mut app, "no answer");
            call.finish(480, "no answer".into());
            call.dialog.reject(
                Some(StatusCode::TemporarilyUnavailable),
                Some("SIP;cause=480;text=\"no answer\"".to_owned()),
            )?;
            return Ok(());
        }
        () = token.cancelled() => {
            hang_up(&mut app, "the bridge is shutting down");
            call.finish(503, "the bridge shut down".into());
            call.dialog.reject(Some(StatusCode::ServiceUnavailable), None)?;
            return Ok(());
        }
    };
    call.app = app.map(|leg| leg as Box<dyn AppSide>);
    call.app_hangup = app_hangup;

    let body = match &negotiated {
        Some(negotiation) => {
            let body = call.render_answer(negotiation);
            if let (None, Some(audio)) = (&call.media, &audio) {
                call.apply(audio)?;
            }
            body
        }
        None => {
            call.answer_in_ack_of = cseq_of(&call.dialog.initial_request());
            call.awaiting_first_answer = true;
            call.render_offer(Direction::SendRecv)
        }
    };
    call.dialog
        .accept(Some(call.answer_headers()), Some(body.into_bytes()))?;
    call.set_answered();
    call.record.answered = Some(std::time::SystemTime::now());
    call.record.status = 200;
    info!(
        "call {call_id}: answered by {callee} ({})",
        call.media
            .as_ref()
            .map_or("codec from the ACK", |m| m.codec())
    );
    call.run(states, token).await;
    Ok(())
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// INVITEs that came to replace a call that no longer can be (it ended,
/// or was answered while they waited): 481 for each.
fn refuse_replacements(pending: &mut mpsc::UnboundedReceiver<Transaction>, why: &'static str) {
    pending.close();
    while let Ok(invite) = pending.try_recv() {
        refuse_replacement(invite, why);
    }
}

/// 481 for an INVITE naming a dialog that cannot be replaced.
fn refuse_replacement(mut invite: Transaction, why: &'static str) {
    tokio::spawn(async move {
        let warning = warning(399, why);
        reply(
            &mut invite,
            StatusCode::CallTransactionDoesNotExist,
            vec![warning],
        )
        .await;
    });
}

/// RFC 3262: a 180 for a caller that requires it to be reliable, sent
/// again at T1 doubling (as RFC 3261's responses are) until the caller's
/// PRACK comes (the stack answers it) or the call leaves ringing.
fn ring_reliably(shared: &Shared, dialog: &InviteDialog, call_id: &str) -> anyhow::Result<()> {
    let reliable = || vec![Header::Require("100rel".into()), Header::RSeq("1".into())];
    dialog.ringing(Some(reliable()), None)?;
    let prack = Arc::new(tokio::sync::Notify::new());
    if let Some(call) = shared.calls.lock().unwrap().get_mut(call_id) {
        call.prack = Some(prack.clone());
    }
    let dialog = dialog.clone();
    tokio::spawn(async move {
        let mut wait = RELIABLE_RESEND_FIRST;
        while wait <= RELIABLE_RESEND_LAST {
            tokio::select! {
                () = prack.notified() => return,
                () = tokio::time::sleep(wait) => {}
            }
            if !matches!(dialog.state(), DialogState::Early(..)) {
                return;
            }
            let _ = dialog.ringing(Some(reliable()), None);
            wait *= 2;
        }
    });
    Ok(())
}

/// The option tags an INVITE may require (RFC 3261 §8.2.2.3).
const UNDERSTOOD: [&str; 3] = ["100rel", "replaces", "timer"];

/// The option tags of a request's `Require` headers.
fn required_tags(request: &Request) -> Vec<String> {
    request
        .headers
        .iter()
        .filter(|h| matches!(h, Header::Require(_)))
        .flat_map(|h| {
            h.value()
                .split(',')
                .map(|tag| tag.trim().to_ascii_lowercase())
        })
        .filter(|tag| !tag.is_empty())
        .collect()
}

/// What an INVITE requires that the bridge does not do: answered 420.
fn unsupported_requirements(request: &Request) -> Vec<String> {
    required_tags(request)
        .into_iter()
        .filter(|tag| !UNDERSTOOD.contains(&tag.as_str()))
        .collect()
}

/// The dialog an INVITE replaces, if it names one (RFC 3891: at most one
/// `Replaces`).
fn replaces_of(request: &Request) -> Result<Option<Replaces>, String> {
    let mut values = request
        .headers
        .iter()
        .filter(|h| matches!(h, Header::Replaces(_)));
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(value), None) => Replaces::parse(value.value()).map(Some),
        (Some(_), Some(_)) => Err("more than one Replaces".into()),
    }
}

/// An INVITE with `Replaces`: goes to the call whose dialog it names, which
/// then carries on with the new phone (an attended transfer whose
/// consultation call was the bridge's). Naming no call of ours: 481.
async fn hand_to_replaced_call(
    shared: &Shared,
    mut tx: Transaction,
    replaces: &Replaces,
    call_id: &str,
) {
    let target = shared
        .calls
        .lock()
        .unwrap()
        .iter()
        .find_map(|(replaced, call)| match &call.replaceable {
            Some(replaceable) if replaceable.dialogs.iter().any(|d| replaces.names(d)) => {
                Some((replaced.clone(), replaceable.early, replaceable.to.clone()))
            }
            _ => None,
        });
    let refusal = match target {
        None => (
            StatusCode::CallTransactionDoesNotExist,
            "no such call to replace",
        ),
        // RFC 3891 §3: a call in progress is not an early dialog.
        Some((_, false, _)) if replaces.early_only => {
            (StatusCode::BusyHere, "the call is answered")
        }
        Some((replaced, _, target)) => match target.send(tx) {
            Ok(()) => {
                info!("call {call_id}: replaces call {replaced}");
                return;
            }
            Err(mpsc::error::SendError(returned)) => {
                tx = returned;
                (
                    StatusCode::CallTransactionDoesNotExist,
                    "the call has ended",
                )
            }
        },
    };
    info!("call {call_id}: {}, {}", refusal.1, refusal.0);
    reply(&mut tx, refusal.0, vec![warning(399, refusal.1)]).await;
}

/// Who calls, as the app is told: the user a phone authenticated as,
/// whatever its From says; from a trusted server (a PBX, a SIP trunk), the
/// identity it asserts (P-Asserted-Identity, RFC 3325) unless the caller
/// withholds it (`Privacy: id`, RFC 3323), else its From.
fn calling_party(request: &Request, authenticated: Option<&str>, call_id: &str) -> Caller {
    let from = caller_of(request);
    match authenticated {
        Some(user) if from.user.eq_ignore_ascii_case(user) => from,
        Some(user) => {
            info!(
                "call {call_id}: From names {:?}, the caller authenticated as {user:?}",
                from.user
            );
            let host = from.uri.split_once('@').map_or("", |(_, host)| host);
            Caller {
                user: user.to_owned(),
                uri: format!("sip:{user}@{host}"),
                ..from
            }
        }
        None => asserted_identity(request).unwrap_or(from),
    }
}

/// The caller a trusted server asserts: the first `P-Asserted-Identity`
/// value naming a SIP or tel URI; none when the caller withholds its
/// identity (`Privacy: id`).
fn asserted_identity(request: &Request) -> Option<Caller> {
    let values = |name: &'static str| {
        request
            .headers
            .iter()
            .filter(move |header| header.name().eq_ignore_ascii_case(name))
            .map(|header| header.value())
    };
    let withheld = values("Privacy")
        .flat_map(|privacy| privacy.split(';'))
        .any(|token| token.trim().eq_ignore_ascii_case("id"));
    if withheld {
        return None;
    }
    values("P-Asserted-Identity")
        .flat_map(name_addrs)
        .find_map(|value| {
            let (display_name, uri) = name_addr(value);
            let (scheme, rest) = uri.split_once(':')?;
            let user = match scheme.to_ascii_lowercase().as_str() {
                "sip" | "sips" => rest.split_once('@')?.0,
                "tel" => rest,
                _ => return None,
            };
            let user = user.split(';').next()?.trim();
            (!user.is_empty()).then(|| Caller {
                user: user.to_owned(),
                display_name,
                uri: uri.to_owned(),
            })
        })
}

/// The values of a header listing name-addrs, split at the commas outside
/// quotes and angle brackets.
fn name_addrs(list: &str) -> Vec<&str> {
    let (mut values, mut start, mut quoted, mut bracketed) = (Vec::new(), 0, false, false);
    for (at, c) in list.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => bracketed = true,
            '>' if !quoted => bracketed = false,
            ',' if !quoted && !bracketed => {
                values.push(list[start..at].trim());
                start = at + 1;
            }
            _ => {}
        }
    }
    values.push(list[start..].trim());
    values
}

/// The display name and URI of `"Name" <uri>` or a bare URI.
fn name_addr(value: &str) -> (Option<String>, &str) {
    match (value.find('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => {
            let name = value[..open].trim().trim_matches('"').trim();
            (
                (!name.is_empty()).then(|| name.to_owned()),
                value[open + 1..close].trim(),
            )
        }
        _ => (None, value.trim()),
    }
}

fn caller_of(request: &Request) -> Caller {
    let from = request.from_header().ok().and_then(|h| h.typed().ok());
    Caller {
        user: from
            .as_ref()
            .and_then(|f| f.uri.auth.as_ref())
            .map(|a| a.user.clone())
            .unwrap_or_default(),
        display_name: from
            .as_ref()
            .and_then(|f| f.display_name.clone())
            .map(|name| name.trim_matches('"').to_owned())
            .filter(|name| !name.is_empty()),
        uri: from.map(|f| f.uri.to_string()).unwrap_or_default(),
    }
}

/// The SDP offer of a request: `Ok(None)` without a body.
fn offered_sdp(request: &Request) -> Result<Option<sdp::SessionDescription>, String> {
    if request.body.is_empty() {
        return Ok(None);
    }
    let content_type = request.header_value("Content-Type").unwrap_or_default();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("application/sdp")
    {
        return Err(format!("body of type {content_type:?} is not SDP"));
    }
    let text = std::str::from_utf8(&request.body).map_err(|_| "SDP is not UTF-8".to_owned())?;
    sdp::parse(text).map(Some).map_err(|e| e.to_string())
}

/// A phone's SDP answer to an offer of ours, negotiated against what we offered.
fn negotiate_answer(
    body: &[u8],
    capabilities: &Capabilities,
) -> Result<offer_answer::Negotiation, String> {
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_owned())?;
    let answer = sdp::parse(text).map_err(|e| e.to_string())?;
    offer_answer::answer(&answer, capabilities).map_err(|e| e.to_string())
}

struct Call {
    shared: Arc<Shared>,
    dialog: InviteDialog,
    call_id: String,
    peer: Peer,
    reservation: PortReservation,
    media: Option<CallMedia>,
    media_events: (
        mpsc::UnboundedSender<MediaEvent>,
        mpsc::UnboundedReceiver<MediaEvent>,
    ),
    origin: Origin,
    /// The phone's video and the port it arrives on, when bridged.
    video: Option<(PortReservation, CallVideo)>,
    /// The app's offer carries video (whether or not the phone takes it):
    /// its WebRTC leg then needs a `webrtcbin`.
    app_offers_video: bool,
    /// A recorded video call's file (voices and video); audio-only calls
    /// record to WAV in their audio pipeline.
    recorder: Option<Arc<Recorder>>,
    fast_update: FastUpdate,
    info_dtmf: InfoDtmf,
    /// We offered in the 200 OK to the INVITE of this CSeq; the answer
    /// arrives in its ACK (and not in the ACK of an INVITE before it,
    /// which may be told after the next INVITE).
    answer_in_ack_of: Option<u32>,
    /// That answer is the call's first: without it the call has no media.
    awaiting_first_answer: bool,
    /// The phone's `Allow` lists UPDATE: the bridge's session refreshes
    /// use it, not a re-INVITE.
    phone_allows_update: bool,
    /// The phone's dialog is answered (by the bridge or by the phone): its
    /// RTP is due from then on.
    answered: bool,
    session_timer: Option<SessionTimer>,
    capabilities: Capabilities,
    /// What the bridge's own offers protect their streams with (our key,
    /// under the tag in use); none: plain RTP.
    offered_crypto: Option<CryptoAttribute>,
    /// The phone's streams have RTCP feedback (RTP/AVPF): the bridge's
    /// re-offers keep the profile.
    offered_feedback: bool,
    /// The far side of a bridged call.
    app: Option<Box<dyn AppSide>>,
    /// Yields why the app hung up.
    app_hangup: Option<oneshot::Receiver<String>>,
    /// Who the app's user is to phones: the caller of the calls the bridge
    /// places for it, a transfer's too.
    app_identity: Caller,
    record: CallRecord,
}

impl Call {
    fn sdp_address(&self) -> IpAddr {
        self.shared
            .config()
            .public_address
            .unwrap_or(self.reservation.address)
    }

    fn next_origin(&mut self) -> Origin {
        let origin = self.origin;
        self.origin.version += 1;
        origin
    }

    fn render_answer(&mut self, negotiation: &offer_answer::Negotiation) -> String {
        let local: Vec<LocalStream> = negotiation
            .streams
            .iter()
            .map(|stream| LocalStream {
                rtp_port: match (&self.video, stream.kind) {
                    (Some((reservation, _)), MediaKind::Video) => reservation.port,
                    _ => self.reservation.port,
                },
            })
            .collect();
        let origin = self.next_origin();
        offer_answer::render_answer(negotiation, origin, self.sdp_address(), &local)
    }

    /// Our offer (in a 200 OK to a re-INVITE without one): the audio, and
    /// the video when the call has it, which would stop if left out.
    fn render_offer(&mut self, direction: Direction) -> String {
        let origin = self.next_origin();
        self.render_offer_as(origin, direction, &self.capabilities, self.offered_feedback)
    }

    /// Our offer under `origin` (a new session's, or the next version of
    /// ours), of the codecs of `capabilities`, with RTCP feedback or not.
    fn render_offer_as(
        &self,
        origin: Origin,
        direction: Direction,
        capabilities: &Capabilities,
        feedback: bool,
    ) -> String {
        let mut streams = vec![OfferedStream {
            kind: MediaKind::Audio,
            rtp_port: self.reservation.port,
            direction,
            crypto: self.offered_crypto.clone(),
            feedback,
        }];
        if let Some((reservation, _)) = &self.video {
            streams.push(OfferedStream {
                kind: MediaKind::Video,
                rtp_port: reservation.port,
                direction,
                crypto: self.offered_crypto.clone(),
                feedback,
            });
        }
        offer_answer::render_offer(capabilities, origin, self.sdp_address(), &streams)
    }

    fn answer_headers(&self) -> Vec<Header> {
        self.answer_headers_with(self.session_timer)
    }

    fn answer_headers_with(&self, session_timer: Option<SessionTimer>) -> Vec<Header> {
        let mut headers = vec![
            Header::ContentType("application/sdp".into()),
            Header::Allow(ALLOW.into()),
            Header::Supported(SUPPORTED.into()),
        ];
        if let Some(timer) = session_timer {
            headers.push(timer.response_header());
            if timer.phone_supports {
                headers.push(Header::Require("timer".into()));
            }
        }
        headers
    }

    /// Starts the phone's video toward the app, on a port pair of its own;
    /// `false` (and a warning) when it cannot run and the call goes on with
    /// audio only.
    fn start_video(
        &mut self,
        reservation: anyhow::Result<PortReservation>,
        stream: &NegotiatedStream,
    ) -> bool {
        let Peer::App { session, record_to } = &self.peer else {
            return false;
        };
        let started = reservation.and_then(|reservation| {
            let recorder = match record_to {
                Some(path) => Some(Recorder::start(&path.with_extension("ts"))?),
                None => None,
            };
            let video = CallVideo::start(
                &reservation,
                stream,
                session,
                self.shared.config().video,
                self.media_events.0.clone(),
                recorder.as_ref(),
                &self.shared.config(),
            )?;
            self.recorder = recorder;
            Ok((reservation, video))
        });
        let (reservation, video) = match started {
            Ok(started) => started,
            Err(e) => {
                warn!("call {}: no video ({e:#}); audio only", self.call_id);
                return false;
            }
        };
        self.record.video = Some(serde_json::json!({
            "sip_codec": "H264",
            "app_codec": video.app_codec.encoding_name(),
            "encoders": video.encoders,
        }));
        info!(
            "call {}: video at {} from {} (H264/{})",
            self.call_id,
            std::net::SocketAddr::new(reservation.address, reservation.port),
            stream.remote_rtp,
            stream.format.payload_type
        );
        self.video = Some((reservation, video));
        true
    }

    /// Starts the media, or moves it to the renegotiated stream.
    fn apply(&mut self, stream: &NegotiatedStream) -> anyhow::Result<()> {
        let codec = stream.codec.encoding_name;
        let switched = match self.media.as_mut() {
            Some(media) if media.codec() != codec => {
                media.switch_codec(stream, &self.shared.config())?
            }
            _ => false,
        };
        if switched {
            info!("call {}: the phone's codec is now {codec}", self.call_id);
            self.capabilities.audio = vec![codec];
        }
        match &self.media {
            Some(media) if media.codec() == codec => {
                if !switched {
                    media.update(stream);
                }
            }
            _ => {
                if let Some(old) = self.media.take() {
                    old.stop();
                }
                self.media = Some(CallMedia::start(
                    &self.reservation,
                    stream,
                    &self.peer,
                    &self.shared.config(),
                    self.media_events.0.clone(),
                    self.recorder.as_ref(),
                    self.video.is_some() || self.app_offers_video,
                )?);
            }
        }
        if self.answered {
            self.set_answered();
        }
        // Our re-offers keep the stream as protected as it is now, and
        // in its profile.
        self.offered_crypto = stream.srtp.as_ref().map(|srtp| CryptoAttribute {
            tag: srtp.tag,
            key: srtp.send.clone(),
        });
        self.offered_feedback = stream.feedback.is_some();
        if let Some(media) = &self.media {
            self.record.sip_codec = Some(media.codec());
            self.record.sip_srtp = stream.srtp.as_ref().map(|s| s.send.suite.name());
            self.record.transcoded = media.transcoding();
            self.record.app_codec = media.app_element().map(|_| "OPUS");
            self.record.recording = match &self.recorder {
                Some(recorder) => Some(recorder.path().to_owned()),
                None => media.recording().map(ToOwned::to_owned),
            };
        }
        self.publish();
        info!(
            "call {}: {} {:?}{}, local {} remote {}",
            self.call_id,
            stream.codec.encoding_name,
            stream.direction,
            match &stream.srtp {
                Some(srtp) => format!(" SRTP {}", srtp.send.suite.name()),
                None => String::new(),
            },
            std::net::SocketAddr::new(self.reservation.address, self.reservation.port),
            stream.remote_rtp
        );
        Ok(())
    }

    /// The phone's dialog is answered: from now on its silence is timed.
    fn set_answered(&mut self) {
        self.answered = true;
        if let Some(media) = &self.media {
            media.set_answered();
        }
    }

    /// When the bridge refreshes the session next, if it is the refresher.
    fn refresh_due(&self) -> Option<Instant> {
        self.session_timer
            .filter(|timer| timer.refresher == Refresher::Bridge)
            .map(SessionTimer::refresh_due)
    }

    /// Sends the refresh the bridge owes as the session's refresher (RFC
    /// 4028 §7.4): an UPDATE without SDP when the phone takes UPDATE, else
    /// a re-INVITE with the bridge's offer.
    fn send_refresh(&mut self) -> Option<tokio::task::JoinHandle<RefreshResult>> {
        let timer = self.session_timer?;
        let mut headers = vec![timer.refresh_header(), Header::Supported(SUPPORTED.into())];
        let dialog = self.dialog.clone();
        if self.phone_allows_update {
            info!("call {}: refreshing the session by UPDATE", self.call_id);
            return Some(tokio::spawn(async move {
                dialog.update(Some(headers), None).await
            }));
        }
        info!("call {}: refreshing the session by re-INVITE", self.call_id);
        headers.push(Header::ContentType("application/sdp".into()));
        let offer = self.render_offer(Direction::SendRecv).into_bytes();
        Some(tokio::spawn(async move {
            dialog.reinvite(Some(headers), Some(offer)).await
        }))
    }

    /// The phone's response to the bridge's refresh: `Ok(true)` refreshed
    /// (a re-INVITE's answer applied), `Ok(false)` to be tried again (the
    /// session's expiry bounds the tries), `Err` when the phone no longer
    /// knows the call.
    fn on_refreshed(&mut self, outcome: RefreshResult) -> Result<bool, String> {
        let response = match outcome {
            Ok(Some(response)) => response,
            Ok(None) => return Ok(false),
            Err(e) => {
                warn!("call {}: the session refresh failed: {e}", self.call_id);
                return Ok(false);
            }
        };
        let status = u16::from(response.status_code.clone());
        match status {
            200..=299 => {}
            408 | 481 => return Err(format!("the session refresh got {status}")),
            _ => {
                warn!("call {}: the session refresh got {status}", self.call_id);
                return Ok(false);
            }
        }
        if !response.body.is_empty() {
            let applied = negotiate_answer(&response.body, &self.capabilities)
                .map_err(anyhow::Error::msg)
                .and_then(|negotiation| self.renegotiate(&negotiation));
            if let Err(e) = applied {
                warn!("call {}: the refresh's answer: {e:#}", self.call_id);
            }
        }
        Ok(true)
    }

    async fn run(
        mut self,
        mut states: mpsc::UnboundedReceiver<DialogState>,
        shutdown: CancellationToken,
    ) {
        let mut session_deadline = self.session_timer.map(SessionTimer::deadline);
        // The bridge's next refresh, when it refreshes the session, and the
        // one under way.
        let mut refresh_at = self.refresh_due();
        let mut refreshing: Option<tokio::task::JoinHandle<RefreshResult>> = None;
        let mut app_hangup = self.app_hangup.take();
        self.publish();
        let mut report = tokio::time::interval(STATS_INTERVAL);
        report.tick().await;
        // A transfer the phone asked for, under way; and whether that phone
        // has already left the call (its BYE ends nothing until then).
        let mut transfer: Option<Transfer> = None;
        let mut transferor_gone = false;
        // INVITEs naming the call's dialog in `Replaces`.
        let (replace_with, mut replacements) = mpsc::unbounded_channel();
        self.accept_replacements(&replace_with);
        // What ends the call: the Reason of our BYE (none when the phone hung
        // up), and the cause for the app and the record.
        let (bye_reason, cause) = loop {
            let expiry = sleep_until(session_deadline);
            let refresh = sleep_until(refresh_at);
            let refresh_idle = refreshing.is_none();
            let refreshed = async {
                match refreshing.as_mut() {
                    Some(task) => task.await.unwrap_or(Ok(None)),
                    None => std::future::pending().await,
                }
            };
            let app_ended = app_hung_up(&mut app_hangup);
            let transferred = async {
                match transfer.as_mut() {
                    Some(transfer) => (&mut transfer.outcome).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                state = states.recv(), if !transferor_gone => match state {
                    None | Some(DialogState::Terminated(..)) if transfer.is_some() => {
                        info!("call {}: the transferor left; the transfer goes on", self.call_id);
                        transferor_gone = true;
                    }
                    None => break (None, "the dialog closed".to_owned()),
                    Some(DialogState::Confirmed(..)) => if let Err(why) = self.on_confirmed() {
                        warn!("call {}: {why}; hanging up", self.call_id);
                        break (
                            Some(format!("SIP;cause=488;text=\"{}\"", why.replace('"', "'"))),
                            format!("no usable answer in the ACK: {why}"),
                        );
                    },
                    Some(DialogState::Refer(_, request, handle)) => {
                        let pending = transfer.is_some();
                        if let Some(started) = self.on_refer(&request, handle, pending).await {
                            transfer = Some(started);
                        }
                    }
                    Some(DialogState::Updated(_, request, handle)) => {
                        self.on_update(&request, handle).await;
                        session_deadline = self.session_timer.map(SessionTimer::deadline);
                        refresh_at = self.refresh_due();
                    }
                    Some(DialogState::Info(_, request, handle)) => self.on_info(&request, handle).await,
                    Some(DialogState::Options(_, _, handle)) => {
                        let _ = handle.reply(StatusCode::OK).await;
                    }
                    Some(DialogState::Terminated(_, reason)) => break (None, describe(&reason)),
                    Some(_) => {}
                },
                Some(event) = self.media_events.1.recv() => match event {
                    MediaEvent::Dtmf { digit, duration_ms } => {
                        info!("call {}: DTMF {digit} ({duration_ms} ms, RFC 4733)", self.call_id);
                        self.echo_dtmf(digit, duration_ms);
                    }
                    MediaEvent::AppDtmf { digit, duration_ms } => self.dial(digit, duration_ms),
                    MediaEvent::KeyFrameRequested => self.send_fast_update(),
                    // The transferor's audio stops while the target rings.
                    MediaEvent::RtpTimeout { .. } if transfer.is_some() => {}
                    MediaEvent::RtpTimeout { silence_ms } => {
                        break (
                            Some(format!("SIP;cause=408;text=\"no RTP for {silence_ms} ms\"")),
                            format!("no RTP from the phone for {silence_ms} ms"),
                        );
                    }
                    MediaEvent::AppEnded { reason } => {
                        break (
                            Some(format!("SIP;cause=502;text=\"{}\"", reason.replace('"', "'"))),
                            format!("the app leg ended: {reason}"),
                        );
                    }
                    MediaEvent::Failed(error) => {
                        warn!("call {}: media failed: {error}", self.call_id);
                        break (
                            Some("SIP;cause=500;text=\"media failure\"".to_owned()),
                            format!("media failure: {error}"),
                        );
                    }
                },
                outcome = transferred => {
                    let done = transfer.take().expect("a transfer under way");
                    let (took_over, why) = self.complete_transfer(done, outcome, transferor_gone).await;
                    if let Some(new_states) = took_over {
                        states = new_states;
                        session_deadline = None;
                        refresh_at = None;
                        // A refresh of the old phone's dialog says nothing of the new one's.
                        if let Some(task) = refreshing.take() {
                            task.abort();
                        }
                        transferor_gone = false;
                        self.accept_replacements(&replace_with);
                    } else if transferor_gone {
                        break (None, why);
                    }
                }
                Some(invite) = replacements.recv() => {
                    if let Some(new_states) = self.replace_phone(invite, transfer.is_some()).await {
                        states = new_states;
                        session_deadline = self.session_timer.map(SessionTimer::deadline);
                        refresh_at = self.refresh_due();
                        if let Some(task) = refreshing.take() {
                            task.abort();
                        }
                        self.accept_replacements(&replace_with);
                    }
                }
                reason = app_ended => break (
                    Some("Q.850;cause=16;text=\"hung up in the app\"".to_owned()),
                    format!("the app hung up ({reason})"),
                ),
                _ = report.tick() => {
                    self.report_stats();
                    if let Some(reason) = self.app_never_connected() {
                        break (Some("SIP;cause=504;text=\"the app's WebRTC connection did not come up\"".to_owned()), reason);
                    }
                }
                () = refresh, if refresh_idle => {
                    refresh_at = None;
                    refreshing = self.send_refresh();
                }
                outcome = refreshed => {
                    refreshing = None;
                    match self.on_refreshed(outcome) {
                        Ok(true) => {
                            session_deadline = self.session_timer.map(SessionTimer::deadline);
                            refresh_at = self.refresh_due();
                        }
                        Ok(false) => refresh_at = Some(Instant::now() + REFRESH_RETRY),
                        Err(why) => break (None, why),
                    }
                }
                () = expiry => break (
                    Some("SIP;cause=408;text=\"session timer expired\"".to_owned()),
                    "the session timer expired".to_owned(),
                ),
                () = shutdown.cancelled() => break (
                    Some("SIP;cause=503;text=\"bridge shutting down\"".to_owned()),
                    "the bridge shut down".to_owned(),
                ),
            }
        };
        info!("call {}: ended ({cause})", self.call_id);
        refuse_replacements(&mut replacements, "the call has ended");
        if let Some(transfer) = transfer {
            transfer.cancel();
            transfer.tell("487 Request Terminated".into(), true);
        }
        if let Some(leg) = self.app.as_mut() {
            leg.hang_up(&cause);
        }
        if let Some(stats) = self.media.as_ref().map(CallMedia::stats) {
            self.record.packets_received = stats.get::<u64>("packets-received").unwrap_or(0);
            self.record.packets_lost = stats.get::<i64>("packets-lost").unwrap_or(0);
            self.record.jitter_ms = stats.get::<f64>("jitter-ms").unwrap_or(0.0);
        }
        self.record.latency = self.media.as_ref().and_then(CallMedia::latency);
        self.record.app_audio_bandwidth =
            self.media.as_ref().and_then(CallMedia::app_audio_bandwidth);
        if let Some(media) = self.media.take() {
            media.stop();
        }
        if let Some((_, video)) = self.video.take() {
            video.stop();
        }
        if let Some(recorder) = self.recorder.take() {
            recorder.finish();
        }
        if let Some(reason) = bye_reason.filter(|_| !transferor_gone) {
            let headers = vec![Header::Reason(reason.into())];
            if let Err(e) = self.dialog.bye_with_headers(Some(headers)).await {
                warn!("call {}: BYE failed: {e}", self.call_id);
            }
        }
        self.finish(200, cause);
        self.shared.dialogs.remove_dialog(&self.dialog.id());
    }

    /// Asks the phone for a key frame by SIP INFO, without holding up the call.
    fn send_fast_update(&mut self) {
        if !self.fast_update.due(Instant::now()) {
            return;
        }
        let dialog = self.dialog.clone();
        let accepted = self.fast_update.accepted.clone();
        let call_id = self.call_id.clone();
        tokio::spawn(async move {
            let headers = vec![Header::ContentType("application/media_control+xml".into())];
            let outcome = dialog
                .info(Some(headers), Some(FastUpdate::BODY.as_bytes().to_vec()))
                .await;
            match outcome {
                Ok(Some(response)) if u16::from(response.status_code.clone()) >= 300 => {
                    info!(
                        "call {call_id}: the phone refuses picture_fast_update ({}); RTCP only from now on",
                        response.status_code
                    );
                    accepted.store(false, Ordering::Relaxed);
                }
                Ok(_) => info!("call {call_id}: asked the phone for a key frame (SIP INFO)"),
                Err(e) => warn!("call {call_id}: picture_fast_update failed: {e}"),
            }
        });
    }

    /// A bridged call whose WebRTC connection is still not up long after
    /// the app answered (no candidates, blocked network): over.
    fn app_never_connected(&self) -> Option<String> {
        let state = self.media.as_ref()?.app_connection_state()?;
        let waited = self.record.answered?.elapsed().unwrap_or_default();
        (state != "connected" && waited >= ICE_TIMEOUT).then(|| {
            format!(
                "the app's WebRTC connection is {state:?} {} s after answering",
                waited.as_secs()
            )
        })
    }

    /// Shows the call's record and media to the management API.
    fn publish(&self) {
        if let (Some(media), Some(call)) = (
            &self.media,
            self.shared.calls.lock().unwrap().get_mut(&self.call_id),
        ) {
            call.view = Some((
                self.record.clone(),
                media.rtp_element().clone(),
                media.app_element().cloned(),
            ));
        }
    }

    /// One line of the SIP leg's RTP statistics, for the terminal.
    fn report_stats(&self) {
        if let Some(media) = &self.media {
            let stats = media.stats();
            info!(
                "call {}: {} rx {} pkts, lost {}, jitter {:.1} ms",
                self.call_id,
                media.codec(),
                stats.get::<u64>("packets-received").unwrap_or(0),
                stats.get::<i64>("packets-lost").unwrap_or(0),
                stats.get::<f64>("jitter-ms").unwrap_or(0.0),
            );
        }
    }

    /// Completes the record and hands it over (once per call).
    fn finish(&mut self, status: u16, cause: String) {
        let record = &mut self.record;
        record.ended = std::time::SystemTime::now();
        record.status = status;
        record.cause = cause;
        self.shared.router.call_ended(record);
    }

    /// ACK arrived: if we offered in the 200, it carries the answer. `Err`
    /// when that was the call's first answer and it is missing or unusable:
    /// the call has no media to go on with.
    fn on_confirmed(&mut self) -> Result<(), String> {
        let ack = self.dialog.last_remote_ack();
        if self.answer_in_ack_of.is_none()
            || ack.as_ref().and_then(cseq_of) != self.answer_in_ack_of
        {
            return Ok(());
        }
        self.answer_in_ack_of = None;
        let negotiated = match ack.as_ref().map(offered_sdp) {
            Some(Ok(Some(answer))) => {
                offer_answer::answer(&answer, &self.capabilities).map_err(|e| e.to_string())
            }
            Some(Ok(None)) | None => Err("the ACK carries no SDP answer".to_owned()),
            Some(Err(e)) => Err(e),
        };
        let applied = negotiated
            .and_then(|negotiation| self.renegotiate(&negotiation).map_err(|e| format!("{e:#}")));
        match applied {
            Ok(()) => {
                self.awaiting_first_answer = false;
                Ok(())
            }
            Err(e) if self.awaiting_first_answer => Err(e),
            Err(e) => {
                warn!("call {}: {e}; media stays as it was", self.call_id);
                Ok(())
            }
        }
    }

    /// Moves the call's audio and video to a new offer/answer exchange.
    fn renegotiate(&mut self, negotiation: &offer_answer::Negotiation) -> anyhow::Result<()> {
        if let Some(audio) = negotiation.audio() {
            self.apply(audio)?;
        }
        if let (Some((_, video)), Some(stream)) = (&self.video, negotiation.video()) {
            video.update(stream);
        }
        Ok(())
    }

    /// re-INVITE or UPDATE: with an offer, answer it and move the media; a
    /// re-INVITE without one gets our offer; either way the timer restarts.
    async fn on_update(&mut self, request: &Request, handle: TransactionHandle) {
        let offer = match offered_sdp(request) {
            Ok(offer) => offer,
            Err(reason) => {
                warn!("call {}: re-offer refused: {reason}", self.call_id);
                let _ = handle.reply(StatusCode::NotAcceptableHere).await;
                return;
            }
        };
        if let Some(timer) = SessionTimer::requested(request) {
            self.session_timer = Some(SessionTimer {
                interval: timer.interval.max(self.shared.config().min_session_expires),
                ..timer
            });
        }
        let body = match offer {
            Some(offer) => match offer_answer::answer(&offer, &self.capabilities).or_else(|_| {
                // Not the call's codec (a PBX moved the call to another
                // phone, say): one its media can switch to will do.
                offer_answer::answer(&offer, &self.capabilities_for_new_phone())
            }) {
                Ok(negotiation) => {
                    if let Err(e) = self.renegotiate(&negotiation) {
                        warn!("call {}: {e:#}", self.call_id);
                        let _ = handle.reply(StatusCode::NotAcceptableHere).await;
                        return;
                    }
                    self.render_answer(&negotiation)
                }
                Err(e) => {
                    // The call goes on with what it had (RFC 3264 §8).
                    info!("call {}: re-offer refused ({e})", self.call_id);
                    let _ = handle.reply(StatusCode::NotAcceptableHere).await;
                    return;
                }
            },
            None if request.method == Method::Invite => {
                self.answer_in_ack_of = cseq_of(request);
                self.render_offer(Direction::SendRecv)
            }
            None => {
                // A session refresh by UPDATE without SDP.
                let _ = handle
                    .respond(StatusCode::OK, Some(self.refresh_headers()), None)
                    .await;
                return;
            }
        };
        let mut headers = self.answer_headers();
        headers.retain(|h| !matches!(h, Header::Require(_)));
        let _ = handle
            .respond(StatusCode::OK, Some(headers), Some(body.into_bytes()))
            .await;
    }

    fn refresh_headers(&self) -> Vec<Header> {
        self.session_timer
            .map(SessionTimer::response_header)
            .into_iter()
            .collect()
    }

    /// The line checks send each digit back as RFC 4733 events, so a user
    /// can test DTMF both ways.
    fn echo_dtmf(&self, digit: char, duration_ms: u32) {
        if let (Peer::Service(_), Some(media)) = (&self.peer, &self.media)
            && media.send_dtmf(digit, duration_ms)
        {
            info!("call {}: DTMF {digit} sent back (RFC 4733)", self.call_id);
        }
    }

    /// A digit from the app's keypad goes to the phone (a voice menu, a
    /// PIN): as an RFC 4733 event, else as SIP INFO.
    fn dial(&mut self, digit: char, duration_ms: u32) {
        let Some(media) = &self.media else { return };
        if media.send_dtmf(digit, duration_ms) {
            info!(
                "call {}: DTMF {digit} ({duration_ms} ms) from the app sent to the phone (RFC 4733)",
                self.call_id
            );
        } else if !self
            .info_dtmf
            .send(&self.dialog, &self.call_id, digit, duration_ms)
        {
            warn!(
                "call {}: DTMF {digit} from the app not sent: the phone takes neither telephone events \
                 nor INFO, or too many digits wait",
                self.call_id
            );
        }
    }

    async fn on_info(&mut self, request: &Request, handle: TransactionHandle) {
        let content_type = request.header_value("Content-Type").unwrap_or_default();
        let body = String::from_utf8_lossy(&request.body);
        match dtmf::info_digit(&content_type, &body) {
            Some(digit) => {
                info!("call {}: DTMF {digit} (SIP INFO)", self.call_id);
                let _ = handle.reply(StatusCode::OK).await;
                self.echo_dtmf(digit, INFO_DIGIT_MS);
            }
            None if content_type.is_empty() => {
                // An empty INFO is a keep-alive.
                let _ = handle.reply(StatusCode::OK).await;
            }
            // RFC 5168: the phone's decoder lost the picture.
            None if content_type.starts_with("application/media_control+xml")
                && body.contains("picture_fast_update") =>
            {
                let sent = self
                    .video
                    .as_ref()
                    .is_some_and(|(_, video)| video.request_key_frame());
                info!(
                    "call {}: the phone asks for a key frame{}",
                    self.call_id,
                    if sent { "" } else { " (no video to ask)" }
                );
                let _ = handle.reply(StatusCode::OK).await;
            }
            None => {
                info!(
                    "call {}: INFO of type {content_type:?} not understood",
                    self.call_id
                );
                let _ = handle.reply(StatusCode::UnsupportedMediaType).await;
            }
        }
    }
}

impl Call {
    /// REFER: the phone hands the call to another (RFC 3515; RFC 5589's
    /// blind transfer, or attended with an embedded `Replaces`). The bridge
    /// calls the target for the app, offering the codec and keys the call
    /// already has, so the app's leg goes on untouched; the transferor
    /// hears how it goes by NOTIFY. The target is reached as an app's call
    /// to that user would be (a registration with the bridge, else the SIP
    /// domain), whatever host `Refer-To` names.
    async fn on_refer(
        &mut self,
        request: &Request,
        handle: TransactionHandle,
        pending: bool,
    ) -> Option<Transfer> {
        let started = self.transfer_target(request, pending).and_then(|target| {
            self.call_transfer_target(request, target)
                .map_err(|e| (StatusCode::ServiceUnavailable, format!("{e:#}")))
        });
        let mut transfer = match started {
            Ok(transfer) => transfer,
            Err((status, why)) => {
                info!("call {}: transfer refused ({why}), {status}", self.call_id);
                let warning = warning(399, &why);
                let _ = handle.respond(status, Some(vec![warning]), None).await;
                return None;
            }
        };
        // RFC 4488: a transferor may ask to hear nothing back.
        let silent = request
            .header_value("Refer-Sub")
            .is_some_and(|v| v.eq_ignore_ascii_case("false"));
        let headers = silent.then(|| vec![Header::Other("Refer-Sub".into(), "false".into())]);
        let _ = handle.respond(StatusCode::Accepted, headers, None).await;
        if !silent {
            transfer.progress = Some(transfer::notifier(
                self.dialog.clone(),
                self.shared.dialogs.clone(),
                self.call_id.clone(),
            ));
            transfer.tell("100 Trying".into(), false);
        }
        info!(
            "call {}: the phone transfers the call to {}",
            self.call_id, transfer.target
        );
        Some(transfer)
    }

    /// The target of a REFER this call can follow and where it is called,
    /// or the response refusing it.
    fn transfer_target(
        &self,
        request: &Request,
        pending: bool,
    ) -> Result<(ReferTarget, PhoneRoute), (StatusCode, String)> {
        if pending {
            return Err((StatusCode::RequestPending, "a transfer is under way".into()));
        }
        if self.app.is_none() {
            return Err((
                StatusCode::Decline,
                "only a call with an app can be transferred".into(),
            ));
        }
        let refer_to = request
            .header_value("Refer-To")
            .ok_or((StatusCode::BadRequest, "no Refer-To".to_owned()))?;
        let target = ReferTarget::parse(&refer_to).map_err(|why| (StatusCode::BadRequest, why))?;
        let route = phone_route(&self.shared, &target.user).ok_or_else(|| {
            let why = format!(
                "{} has no phone registered and no sip.domain is set",
                target.user
            );
            (StatusCode::NotFound, why)
        })?;
        Ok((target, route))
    }

    /// INVITEs the target for the app, with the call's own codec and keys.
    fn call_transfer_target(
        &mut self,
        request: &Request,
        (target, route): (ReferTarget, PhoneRoute),
    ) -> anyhow::Result<Transfer> {
        let mut headers = Vec::new();
        if let Some(replaces) = &target.replaces {
            headers.push(Header::Replaces(replaces.as_str().into()));
        }
        if let Some(referred_by) = request.header_value("Referred-By") {
            headers.push(Header::ReferredBy(referred_by.into()));
        }
        // A new session toward the target: the transferor's SDP versions
        // go on unchanged should the transfer fail.
        let origin = Origin {
            session_id: rand::random::<u32>().into(),
            version: 1,
        };
        // Plain RTP/AVP (or RTP/SAVP) to a new phone: every phone takes it.
        let capabilities = self.capabilities_for_new_phone();
        let offer = self.render_offer_as(origin, Direction::SendRecv, &capabilities, false);
        let invitation = Invitation {
            shared: self.shared.clone(),
            template: rsipstack::dialog::invitation::InviteOption {
                caller_display_name: self.app_identity.display_name.clone(),
                caller: self.app_identity.uri.as_str().try_into()?,
                content_type: Some("application/sdp".into()),
                contact: self.shared.contact.clone(),
                credential: trunk_credential(&self.shared),
                headers: Some(headers),
                ..Default::default()
            },
            offers: Offers::Fixed(Offer::as_is(offer, capabilities.clone())),
        };
        let targets = route
            .targets
            .iter()
            .filter_map(|t| rsipstack::sip::Uri::try_from(t.as_str()).ok())
            .collect();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let no_answer = self.shared.config().no_answer_timeout;
        // Every phone of the target rings; the first to answer takes the
        // call. On a task of its own, so that a transfer given up still
        // CANCELs its phones.
        let ringing = tokio::spawn(async move {
            let mut fork = Fork::start(invitation, targets, route.proxy).await;
            let deadline = tokio::time::sleep(no_answer);
            tokio::pin!(deadline);
            loop {
                let forked = tokio::select! {
                    forked = fork.next() => Some(forked),
                    () = &mut deadline => None,
                    () = stopped.cancelled() => None,
                };
                match forked {
                    Some(Forked::Ringing(..) | Forked::Dropped(_)) => {}
                    Some(Forked::Answered(answered)) => {
                        fork.stop_later(Stop::AnsweredElsewhere);
                        return Ok(*answered);
                    }
                    Some(Forked::Failed(failure)) => {
                        fork.stop_later(failure.stop());
                        return Err(failure);
                    }
                    None => {
                        fork.stop().await;
                        return Err(Failure::Unanswered(408, "no answer".into()));
                    }
                }
            }
        });
        let outcome = Box::pin(async move {
            ringing
                .await
                .unwrap_or_else(|e| Err(Failure::Unanswered(503, e.to_string())))
        });
        Ok(Transfer {
            target: target.user,
            stop,
            outcome,
            capabilities,
            origin: Origin {
                version: origin.version + 1,
                ..origin
            },
            progress: None,
        })
    }

    /// The target answered, or could not be reached. On a 2xx with a
    /// usable answer the call's media moves to the target, whose dialog
    /// becomes the call's (its state events are returned); the transferor
    /// is told and let go. Otherwise the transferor is told why, and the
    /// call stays as it was. The reason is for the record.
    async fn complete_transfer(
        &mut self,
        transfer: Transfer,
        outcome: TransferOutcome,
        transferor_gone: bool,
    ) -> (Option<mpsc::UnboundedReceiver<DialogState>>, String) {
        let target = transfer.target.clone();
        let (answered, response) = match outcome {
            Ok(answered) => answered,
            Err(Failure::Refused(response)) => {
                info!(
                    "call {}: {target} answered the transfer {}",
                    self.call_id, response.status_code
                );
                transfer.tell(response.status_code.to_string(), true);
                return (
                    None,
                    format!("the transfer to {target} failed: {}", response.status_code),
                );
            }
            Err(Failure::Unanswered(status, why)) => {
                info!(
                    "call {}: the transfer to {target} failed: {why}",
                    self.call_id
                );
                transfer.tell(StatusCode::from(status).to_string(), true);
                return (None, format!("the transfer to {target} failed: {why}"));
            }
        };
        let moved = negotiate_answer(&response.body, &transfer.capabilities)
            .map_err(anyhow::Error::msg)
            .and_then(|negotiation| self.move_media(&negotiation));
        if let Err(e) = moved {
            warn!(
                "call {}: {target}'s answer to the transfer is unusable ({e:#})",
                self.call_id
            );
            let dialog = answered.dialog;
            tokio::spawn(async move { dialog.bye().await });
            transfer.tell("488 Not Acceptable Here".into(), true);
            return (None, format!("the transfer to {target} failed: {e:#}"));
        }
        transfer.tell("200 OK".into(), true);
        let transferor = std::mem::replace(&mut self.dialog, answered.dialog);
        self.origin = transfer.origin;
        match transfer.progress {
            _ if transferor_gone => self.shared.dialogs.remove_dialog(&transferor.id()),
            // After the last NOTIFY.
            Some((_, bye_after)) => {
                let _ = bye_after.send(());
            }
            None => transfer::hang_up(
                transferor,
                self.shared.dialogs.clone(),
                self.call_id.clone(),
            ),
        }
        self.session_timer = None;
        self.answer_in_ack_of = None;
        self.fast_update = FastUpdate::new(allows(&response, "INFO"));
        self.info_dtmf = InfoDtmf::new(allows(&response, "INFO"));
        self.record.transferred_to = Some(target.clone());
        self.publish();
        info!("call {}: transferred to {target}", self.call_id);
        (Some(answered.states), String::new())
    }
}

impl Call {
    /// `sip.early_media`: the call's media plays the early media of
    /// `branch` (its 18x's SDP), started on it if need be. Until a phone
    /// answers, nothing goes the other way (RFC 3960: a gateway keeps the
    /// caller's voice from a phone that has not answered). `false` when
    /// its early media cannot be played.
    fn follow_early_media(&mut self, branch: &Branch) -> bool {
        let phone = &branch.target;
        self.offered(&branch.offer);
        let audio = branch.early_answer().and_then(|sdp| {
            negotiate_answer(sdp, &self.capabilities)
                .and_then(|n| n.audio().cloned().ok_or_else(|| "no audio".to_owned()))
                .inspect_err(|e| warn!("call {}: {phone}'s early media: {e}", self.call_id))
                .ok()
        });
        let Some(audio) = audio else { return false };
        if let Err(e) = self.apply(&audio) {
            warn!("call {}: {phone}'s early media: {e:#}", self.call_id);
            return false;
        }
        self.media
            .as_ref()
            .inspect(|media| media.keep_app_audio_from_phone())
            .is_some()
    }

    /// The app's call is answered on the early media of `phone`, so the
    /// app hears it: the app's hang-up receiver, or `None` when the app
    /// leg failed (the call then rings on as without early media).
    async fn answer_app_on_early_media(
        &mut self,
        phone: &rsipstack::sip::Uri,
        app: &mut dyn AppCaller,
    ) -> Option<oneshot::Receiver<String>> {
        let webrtc = self.media.as_ref()?.app_element()?.clone();
        match app.answer(webrtc).await {
            Ok(hangup) => {
                info!(
                    "call {}: the app's call is answered for {phone}'s early media",
                    self.call_id
                );
                Some(hangup)
            }
            Err(e) => {
                warn!(
                    "call {}: the app leg failed on early media: {e}",
                    self.call_id
                );
                if let Some(media) = self.media.take() {
                    media.stop();
                }
                None
            }
        }
    }

    /// The phone now in the call was made `offer`: what its answers may
    /// take, and the keys and feedback offered.
    fn offered(&mut self, offer: &Offer) {
        self.capabilities = offer.capabilities.clone();
        self.offered_crypto = offer.crypto.clone();
        self.offered_feedback = offer.profile.feedback;
    }

    /// What a phone taking the call over (a transfer's target, or by
    /// `Replaces`) may speak: the call's codec first, then any other the
    /// call's media can switch to; as protected as the call is now; video
    /// if the call has it.
    fn capabilities_for_new_phone(&self) -> Capabilities {
        let mut audio = self.capabilities.audio.clone();
        if self.media.as_ref().is_some_and(CallMedia::can_switch_codec) {
            for codec in Capabilities::all_audio().audio {
                if !audio.contains(&codec) {
                    audio.push(codec);
                }
            }
        }
        Capabilities {
            audio,
            video: match self.video {
                Some(_) => self.capabilities.video.clone(),
                None => vec![],
            },
            srtp_required: self.capabilities.srtp_required || self.offered_crypto.is_some(),
            ..self.capabilities.clone()
        }
    }

    /// Moves the call's media to a phone that took it over: the audio, in
    /// whatever codec it speaks, and the video, paused when the phone takes
    /// none.
    fn move_media(&mut self, negotiation: &offer_answer::Negotiation) -> anyhow::Result<()> {
        let audio = negotiation
            .audio()
            .ok_or_else(|| anyhow::anyhow!("no audio"))?;
        self.apply(audio)?;
        if let Some((_, video)) = &self.video {
            match negotiation.video() {
                Some(stream) => {
                    video.update(stream);
                    // The new phone's decoder starts from a key frame.
                    video.request_key_frame();
                }
                None => video.suspend(),
            }
        }
        Ok(())
    }

    /// Lets an INVITE naming the call's present dialog in `Replaces` reach
    /// it.
    fn accept_replacements(&self, to: &mpsc::UnboundedSender<Transaction>) {
        self.set_replaceable(vec![self.dialog.id()], false, to);
    }

    /// Lets an INVITE naming the dialog of a phone ringing for the call in
    /// `Replaces` (a pickup) reach it.
    fn accept_pickups(&self, to: &mpsc::UnboundedSender<Transaction>, ringing: Vec<DialogId>) {
        self.set_replaceable(ringing, true, to);
    }

    fn set_replaceable(
        &self,
        dialogs: Vec<DialogId>,
        early: bool,
        to: &mpsc::UnboundedSender<Transaction>,
    ) {
        if let Some(call) = self.shared.calls.lock().unwrap().get_mut(&self.call_id) {
            call.replaceable = Some(Replaceable {
                dialogs,
                early,
                to: to.clone(),
            });
        }
    }

    /// An INVITE naming this call's dialog in `Replaces` (RFC 3891): its
    /// phone takes the call over, answered with the call's codec and keys
    /// so that the app's leg goes on untouched, and the replaced phone gets
    /// BYE. Typically the replaced phone made a consultation call to the
    /// app user and then transferred its other party here. Returns the new
    /// dialog's state events.
    async fn replace_phone(
        &mut self,
        mut tx: Transaction,
        transfer_pending: bool,
    ) -> Option<mpsc::UnboundedReceiver<DialogState>> {
        let request = tx.original.clone();
        let (negotiation, session_timer) = match self.check_replacement(&request, transfer_pending)
        {
            Ok(checked) => checked,
            Err((status, why, mut headers)) => {
                info!("call {}: not replaced ({why}), {status}", self.call_id);
                headers.push(warning(399, &why));
                reply(&mut tx, status, headers).await;
                return None;
            }
        };
        let (state_sender, states) = self.shared.dialogs.new_dialog_state_channel();
        let dialog = match server_invite(&self.shared, &tx, state_sender) {
            Ok(dialog) => dialog,
            Err(e) => {
                warn!(
                    "call {}: cannot take the replacing INVITE: {e}",
                    self.call_id
                );
                reply(&mut tx, StatusCode::ServerInternalError, vec![]).await;
                return None;
            }
        };
        let mut driver = dialog.clone();
        tokio::spawn(async move {
            let _ = driver.handle(&mut tx).await;
        });
        // A new session toward the new phone.
        let replaced_origin = std::mem::replace(
            &mut self.origin,
            Origin {
                session_id: rand::random::<u32>().into(),
                version: 1,
            },
        );
        let body = match &negotiation {
            Some(negotiation) => self.render_answer(negotiation),
            None => self.render_offer(Direction::SendRecv),
        };
        let moved = match &negotiation {
            Some(negotiation) => self.move_media(negotiation),
            None => Ok(()),
        };
        let accepted = moved.and_then(|()| {
            dialog
                .accept(
                    Some(self.answer_headers_with(session_timer)),
                    Some(body.into_bytes()),
                )
                .map_err(Into::into)
        });
        if let Err(e) = accepted {
            warn!(
                "call {}: cannot answer the replacing INVITE: {e:#}",
                self.call_id
            );
            self.origin = replaced_origin;
            let _ = dialog.reject(Some(StatusCode::ServerInternalError), None);
            return None;
        }
        let caller = caller_of(&request);
        let replaced = std::mem::replace(&mut self.dialog, dialog);
        self.set_answered();
        // A picked-up phone (still ringing) is stopped by its fork, as
        // answered elsewhere.
        if !matches!(replaced.state(), DialogState::Early(..)) {
            transfer::hang_up(replaced, self.shared.dialogs.clone(), self.call_id.clone());
        }
        self.session_timer = session_timer;
        self.answer_in_ack_of = match negotiation {
            None => cseq_of(&request),
            Some(_) => None,
        };
        self.fast_update = FastUpdate::new(allows(&request, "INFO"));
        self.info_dtmf = InfoDtmf::new(allows(&request, "INFO"));
        self.phone_allows_update = allows(&request, "UPDATE");
        self.record.transferred_to = Some(caller.user);
        self.publish();
        info!(
            "call {}: {} took the call over (Replaces)",
            self.call_id, caller.uri
        );
        Some(states)
    }

    /// What the replacing INVITE is answered with (none: it had no offer,
    /// and gets ours), and its session timer; or why it is refused.
    fn check_replacement(
        &self,
        request: &Request,
        transfer_pending: bool,
    ) -> Result<(Option<offer_answer::Negotiation>, Option<SessionTimer>), Refusal> {
        let refusal = |status, why: &str| (status, why.to_owned(), vec![]);
        if transfer_pending {
            return Err(refusal(
                StatusCode::BusyHere,
                "the call is being transferred",
            ));
        }
        let min_se = self.shared.config().min_session_expires;
        let session_timer = SessionTimer::requested_within(request, min_se).map_err(|header| {
            let why = format!("Session-Expires below Min-SE {min_se}");
            (StatusCode::SessionIntervalTooSmall, why, vec![header])
        })?;
        let capabilities = self.capabilities_for_new_phone();
        let offer =
            offered_sdp(request).map_err(|why| refusal(StatusCode::NotAcceptableHere, &why))?;
        let Some(offer) = offer else {
            if self.media.is_none() {
                // Picking up a ringing call: the app is answered in the
                // phone's codec, which its offer names.
                let why = "an SDP offer is required";
                return Err(refusal(StatusCode::NotAcceptableHere, why));
            }
            return Ok((None, session_timer));
        };
        let negotiation = offer_answer::answer(&offer, &capabilities)
            .map_err(|e| e.to_string())
            .and_then(|n| match n.audio() {
                Some(_) => Ok(n),
                None => Err("no audio".to_owned()),
            });
        match negotiation {
            Ok(negotiation) => Ok((Some(negotiation), session_timer)),
            Err(why) => Err(refusal(StatusCode::NotAcceptableHere, &why)),
        }
    }
}

/// A request's refusal: the status, why (for its Warning), other headers.
type Refusal = (StatusCode, String, Vec<Header>);

/// The call a transfer places to its target (the app's side stays).
struct Transfer {
    /// The user part it goes to.
    target: String,
    /// Stops the target's phones ringing.
    stop: CancellationToken,
    /// The phone of the target's that answered, or why none did.
    outcome: futures_util::future::BoxFuture<'static, TransferOutcome>,
    /// What the answer is negotiated against: our offer's codec and keys.
    capabilities: Capabilities,
    /// The SDP origin of our next description to the target.
    origin: Origin,
    /// The transferor's NOTIFYs (none when it asked for none, RFC 4488),
    /// and its BYE once the target took the call.
    progress: Option<(
        mpsc::UnboundedSender<transfer::Progress>,
        oneshot::Sender<()>,
    )>,
}

/// The target's phone that answered and its 2xx, or why none did.
type TransferOutcome = Result<(Answered, rsipstack::sip::Response), Failure>;

impl Transfer {
    /// Gives up on the target's call: its phones stop ringing.
    fn cancel(&self) {
        self.stop.cancel();
    }

    /// Tells the transferor the transfer's state, as a sipfrag status line.
    fn tell(&self, status: String, last: bool) {
        if let Some((progress, _)) = &self.progress {
            let _ = progress.send(transfer::Progress { status, last });
        }
    }
}

fn describe(reason: &TerminatedReason) -> String {
    match reason {
        TerminatedReason::UacBye => "the caller hung up".into(),
        TerminatedReason::UacCancel => "the caller cancelled".into(),
        TerminatedReason::UasBye => "the bridge hung up".into(),
        TerminatedReason::Timeout => "no ACK".into(),
        other => format!("{other:?}"),
    }
}

/// What the bridge's own INVITEs answer a challenge with: the trunk account.
fn trunk_credential(shared: &Shared) -> Option<rsipstack::dialog::authenticate::Credential> {
    let config = shared.config();
    let account = config.accounts.first()?;
    Some(rsipstack::dialog::authenticate::Credential {
        username: account.username.clone(),
        password: account.password.clone(),
        realm: None,
        auth_username: None,
    })
}

/// What happens while the bridge's call to a user's phones rings.
enum Ringing {
    /// A phone rang or answered, or none will.
    Phone(Forked),
    /// Another phone picks the call up (an INVITE with `Replaces`).
    PickedUp(Box<Transaction>),
    /// The app gave up, for this reason.
    Abandoned(String),
    NoAnswer,
    ShuttingDown,
}

/// A call the bridge places toward a SIP phone for an app.
pub struct OutboundCall {
    /// Where the user's phones are called: each registered phone's
    /// Contact, or e.g. `sip:alice@pbx`, through the outbound proxy if any.
    /// All ring at once; the first to answer takes the call.
    pub route: PhoneRoute,
    /// The user part and display name the phone sees as the caller.
    pub from_user: String,
    pub from_display: Option<String>,
    pub app: Box<dyn AppCaller>,
    /// Record both voices into this WAV file.
    pub record_to: Option<std::path::PathBuf>,
}

pub(super) fn outgoing(shared: Arc<Shared>, request: OutboundCall) {
    tokio::spawn(async move {
        let target = request.route.targets.join(", ");
        if let Err(e) = place_call(shared, request).await {
            warn!("call to {target}: {e:#}");
        }
    });
}

async fn place_call(shared: Arc<Shared>, request: OutboundCall) -> anyhow::Result<()> {
    let OutboundCall {
        route,
        from_user,
        from_display,
        mut app,
        record_to,
    } = request;
    let started = std::time::SystemTime::now();
    let targets: Vec<rsipstack::sip::Uri> = route
        .targets
        .iter()
        .filter_map(|target| {
            rsipstack::sip::Uri::try_from(target.as_str())
                .inspect_err(|e| warn!("bad target {target:?}: {e}"))
                .ok()
        })
        .collect();
    if targets.is_empty() {
        app.refuse(404, "the extension has no usable address");
        anyhow::bail!("no usable target");
    }
    if let Err(unavailable) = shared.take_call_slot() {
        warn!("{}: refused, {unavailable}", app.describe());
        app.refuse(503, unavailable.reason());
        return Ok(());
    }
    // The phone's early media is played to the app where the call's
    // WebRTC leg can stay as it is whichever phone answers: audio only,
    // its codec switchable.
    let early_media = shared.config().early_media && !app.wants_video();
    let call_id = format!("{:032x}", rand::random::<u128>());
    let (_active, token) = ActiveCall::register(&shared, &call_id, 0);
    let reservation = match PortReservation::new(shared.config().media_address) {
        Ok(r) => r,
        Err(e) => {
            app.refuse(503, "no media port");
            return Err(e);
        }
    };
    let caller = Caller {
        user: from_user.clone(),
        display_name: from_display.clone(),
        uri: format!("sip:{from_user}@{}", shared.contact.host_with_port),
    };
    // An app's video call offers the phone H.264 video on a port of its own.
    let video_reservation = if app.wants_video() && shared.config().video != AppVideoCodec::Off {
        PortReservation::new(shared.config().media_address)
            .inspect_err(|e| warn!("call {call_id}: no video ({e:#}); audio only"))
            .ok()
    } else {
        None
    };
    let origin = Origin {
        session_id: rand::random::<u32>().into(),
        version: 1,
    };
    let invitation = Invitation {
        shared: shared.clone(),
        template: rsipstack::dialog::invitation::InviteOption {
            caller_display_name: from_display.clone(),
            caller: caller.uri.as_str().try_into()?,
            contact: shared.contact.clone(),
            content_type: Some("application/sdp".into()),
            credential: trunk_credential(&shared),
            call_id: Some(call_id.clone()),
            ..Default::default()
        },
        offers: Offers::InTurn(Streams {
            origin,
            address: shared
                .config()
                .public_address
                .unwrap_or(reservation.address),
            audio_port: reservation.port,
            video_port: video_reservation.as_ref().map(|v| v.port),
        }),
    };
    let target = route.targets.join(", ");
    info!("call {call_id}: {} calls {target}", app.describe());
    // Every phone of the user rings at once; the first to answer takes
    // the call.
    let mut fork = Fork::start(invitation, targets, route.proxy).await;
    let Some(first) = fork.branches.first() else {
        app.refuse(503, "no phone could be called");
        anyhow::bail!("no phone could be called");
    };
    let mut call = Call {
        shared: shared.clone(),
        dialog: first.dialog().clone(),
        call_id: call_id.clone(),
        peer: Peer::App {
            session: format!("app-{}", reservation.session()),
            record_to,
        },
        reservation,
        media: None,
        media_events: mpsc::unbounded_channel(),
        origin: Origin {
            version: origin.version + 1,
            ..origin
        },
        video: None,
        app_offers_video: app.wants_video(),
        recorder: None,
        fast_update: FastUpdate::new(false),
        info_dtmf: InfoDtmf::new(false),
        answer_in_ack_of: None,
        awaiting_first_answer: false,
        phone_allows_update: false,
        answered: false,
        session_timer: None,
        capabilities: first.offer.capabilities.clone(),
        offered_crypto: first.offer.crypto.clone(),
        offered_feedback: first.offer.profile.feedback,
        app: None,
        app_hangup: None,
        app_identity: caller.clone(),
        record: CallRecord::new(
            call_id.clone(),
            caller.clone(),
            target.clone(),
            app.describe(),
            started,
        ),
    };
    let config = shared.config();
    let no_answer = tokio::time::sleep(config.no_answer_timeout);
    tokio::pin!(no_answer);
    // Another phone picking the ringing call up: its INVITE names one of
    // the call's early dialogs in `Replaces` (a call-pickup key, RFC 3891).
    let (pick_up_with, mut pickups) = mpsc::unbounded_channel();
    // The app's hang-up once its call is answered on early media, and the
    // phone whose early media it hears.
    let mut early_hangup: Option<oneshot::Receiver<String>> = None;
    let mut early_from: Option<DialogId> = None;
    let (answered, response) = loop {
        let event = tokio::select! {
            forked = fork.next() => Ringing::Phone(forked),
            Some(pickup) = pickups.recv() => Ringing::PickedUp(Box::new(pickup)),
            reason = app.abandoned() => Ringing::Abandoned(reason),
            reason = app_hung_up(&mut early_hangup) => Ringing::Abandoned(reason),
            () = &mut no_answer => Ringing::NoAnswer,
            () = token.cancelled() => Ringing::ShuttingDown,
        };
        match event {
            // 18x: the app keeps ringing (its SDK has no progress signal).
            Ringing::Phone(Forked::Ringing(index, status, with_sdp)) => {
                let early_media_note = if with_sdp {
                    " with SDP (early media)"
                } else {
                    ""
                };
                let phone = &fork.branches[index].target;
                info!("call {call_id}: {phone} sent {status}{early_media_note}");
                call.accept_pickups(&pick_up_with, fork.ringing_dialogs());
                let branch = &fork.branches[index];
                let dialog = branch.dialog().id();
                // One phone's early media at a time: another's once that
                // phone has failed (`Forked::Dropped`).
                let another_plays = early_from.as_ref().is_some_and(|playing| {
                    *playing != dialog && fork.branches.iter().any(|b| b.dialog().id() == *playing)
                });
                if with_sdp && early_media && !another_plays && call.follow_early_media(branch) {
                    early_from = Some(dialog);
                    if early_hangup.is_none() {
                        early_hangup = call
                            .answer_app_on_early_media(&branch.target, &mut *app)
                            .await;
                    }
                }
            }
            Ringing::Phone(Forked::Dropped(dialog)) => {
                call.accept_pickups(&pick_up_with, fork.ringing_dialogs());
                // Another phone's early media plays on in its place.
                if early_from == Some(dialog) {
                    let playing = fork
                        .branches
                        .iter()
                        .filter(|b| b.early_answer().is_some())
                        .find(|b| call.follow_early_media(b));
                    if let Some(branch) = playing {
                        info!("call {call_id}: {}'s early media plays on", branch.target);
                    }
                    early_from = playing.map(|b| b.dialog().id());
                }
            }
            Ringing::Phone(Forked::Answered(answered)) => break *answered,
            Ringing::Phone(Forked::Failed(best)) => {
                fork.stop_later(best.stop());
                refuse_replacements(&mut pickups, "the call has ended");
                let status = best.status();
                app.refuse(status, &best.reason());
                let cause = match &best {
                    Failure::Refused(_) => format!("the phone answered {}", best.reason()),
                    Failure::Unanswered(_, why) => why.clone(),
                };
                call.finish(status, cause);
                return Ok(());
            }
            Ringing::PickedUp(pickup) => {
                // The phone whose ringing it names hands the call over.
                let named = replaces_of(&pickup.original)
                    .ok()
                    .flatten()
                    .and_then(|replaces| {
                        fork.branches
                            .iter()
                            .position(|b| replaces.names(&b.dialog().id()))
                    });
                let Some(index) = named else {
                    refuse_replacement(*pickup, "that phone no longer rings");
                    continue;
                };
                call.dialog = fork.branches[index].dialog().clone();
                call.offered(&fork.branches[index].offer);
                if let Some(states) = call.replace_phone(*pickup, false).await {
                    // The picked-up phone too stops ringing as answered elsewhere.
                    fork.stop_later(Stop::AnsweredElsewhere);
                    return connect_app(call, app, early_hangup, states, token).await;
                }
            }
            Ringing::Abandoned(reason) => {
                info!("call {call_id}: the app gave up ({reason}), CANCEL");
                fork.stop().await;
                call.finish(487, format!("the app gave up: {reason}"));
                return Ok(());
            }
            Ringing::NoAnswer => {
                info!(
                    "call {call_id}: no answer within {:?}, CANCEL",
                    config.no_answer_timeout
                );
                fork.stop().await;
                app.refuse(480, "no answer");
                call.finish(480, "no answer".into());
                return Ok(());
            }
            Ringing::ShuttingDown => {
                fork.stop().await;
                app.refuse(503, "the bridge is shutting down");
                call.finish(503, "the bridge shut down".into());
                return Ok(());
            }
        }
    };
    // The other phones stop ringing.
    fork.stop_later(Stop::AnsweredElsewhere);
    refuse_replacements(&mut pickups, "the call was answered");
    let target = answered.target.to_string();
    call.record.target = target.clone();
    call.offered(&answered.offer);
    call.dialog = answered.dialog;
    let (early_answer, states) = (answered.early_answer, answered.states);
    call.fast_update = FastUpdate::new(allows(&response, "INFO"));
    call.info_dtmf = InfoDtmf::new(allows(&response, "INFO"));
    let answer_body = match (&response.body, &early_answer) {
        (body, Some(early)) if body.is_empty() => early,
        (body, _) => body,
    };
    let negotiation = negotiate_answer(answer_body, &call.capabilities);
    // The video first: the app's answer is made once every stream is known.
    if let (Some(reservation), Some(stream)) = (
        video_reservation,
        negotiation.as_ref().ok().and_then(|n| n.video().cloned()),
    ) {
        call.start_video(Ok(reservation), &stream);
    }
    let audio = match negotiation.and_then(|n| n.audio().cloned().ok_or("no audio".to_owned())) {
        Ok(audio) => audio,
        Err(reason) => {
            warn!("call {call_id}: the 200 OK carries no usable SDP answer ({reason}); hanging up");
            app.refuse(488, "the phone's answer was unusable");
            let _ = call.dialog.bye().await;
            call.finish(488, "unusable SDP answer".into());
            return Ok(());
        }
    };
    call.set_answered();
    call.apply(&audio)?;
    info!("call {call_id}: {target} answered");
    connect_app(call, app, early_hangup, states, token).await
}

/// The app's reason once `hangup` (when there is one) says it hung up.
async fn app_hung_up(hangup: &mut Option<oneshot::Receiver<String>>) -> String {
    match hangup {
        Some(hangup) => hangup.await.unwrap_or_else(|_| "the app leg closed".into()),
        None => std::future::pending().await,
    }
}

/// A phone answered the bridge's call (or picked it up): the app's call is
/// answered on the call's WebRTC leg (unless it was on early media:
/// `early_hangup`), and the call runs to its end.
async fn connect_app(
    mut call: Call,
    mut app: Box<dyn AppCaller>,
    early_hangup: Option<oneshot::Receiver<String>>,
    states: mpsc::UnboundedReceiver<DialogState>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let call_id = call.call_id.clone();
    let codec = call.media.as_ref().map(CallMedia::codec);
    // Later offers may move or hold the stream, not change its codec.
    call.capabilities.audio = codec.into_iter().collect();
    let webrtc = call
        .media
        .as_ref()
        .and_then(|m| m.app_element().cloned())
        .ok_or_else(|| anyhow::anyhow!("a bridged call without a WebRTC leg"))?;
    let answered = match early_hangup {
        Some(hangup) => Ok(hangup),
        None => app.answer(webrtc).await,
    };
    match answered {
        Ok(hangup) => {
            call.record.answered = Some(std::time::SystemTime::now());
            call.app_hangup = Some(hangup);
            call.app = Some(app as Box<dyn AppSide>);
            info!("call {call_id}: the app's call is answered ({codec:?})");
            call.run(states, token).await;
        }
        Err(e) => {
            warn!("call {call_id}: the app leg failed after the phone answered: {e}");
            let headers = vec![Header::Reason(
                "SIP;cause=502;text=\"app leg failed\"".into(),
            )];
            let _ = call.dialog.bye_with_headers(Some(headers)).await;
            call.finish(502, format!("the app leg failed: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sip::invite_with;

    #[test]
    fn info_goes_only_to_phones_that_allow_it() {
        assert!(allows(
            &invite_with("Allow: INVITE, ACK, BYE\r\nAllow: info, UPDATE\r\n"),
            "INFO"
        ));
        assert!(!allows(
            &invite_with("Allow: INVITE, ACK, BYE, INFORMATION\r\n"),
            "INFO"
        ));
        assert!(!allows(&invite_with(""), "INFO"));
    }

    #[test]
    fn the_caller_is_who_the_sip_side_vouches_for() {
        let asserted = "P-Asserted-Identity: \"Carol, Sales\" <sip:+4930123456@carrier.example;user=phone>, <tel:+4930123456>\r\n";
        let caller = calling_party(&invite_with(asserted), None, "c1");
        assert_eq!(caller.user, "+4930123456");
        assert_eq!(caller.display_name.as_deref(), Some("Carol, Sales"));
        let tel = "P-Asserted-Identity: <tel:+4930999;phone-context=example>\r\n";
        assert_eq!(
            calling_party(&invite_with(tel), None, "c1").user,
            "+4930999"
        );
        // Withheld, or not the URI of a caller: From.
        let withheld = format!("{asserted}Privacy: header; id\r\n");
        assert_eq!(
            calling_party(&invite_with(&withheld), None, "c1").user,
            "bob"
        );
        let mail = "P-Asserted-Identity: <mailto:carol@example.com>\r\n";
        assert_eq!(calling_party(&invite_with(mail), None, "c1").user, "bob");
        // A phone that authenticated is its user, whatever it asserts.
        let phone = calling_party(&invite_with(asserted), Some("alice"), "c1");
        assert_eq!(
            (phone.user.as_str(), phone.uri.as_str()),
            ("alice", "sip:alice@127.0.0.1")
        );
        assert_eq!(
            calling_party(&invite_with(""), Some("BOB"), "c1").user,
            "bob"
        );
    }

    #[test]
    fn fast_updates_go_once_a_second_until_refused() {
        let start = Instant::now();
        let mut updates = FastUpdate::new(true);
        assert!(updates.due(start));
        assert!(
            !updates.due(start + Duration::from_millis(300)),
            "a burst of PLIs makes one INFO"
        );
        assert!(updates.due(start + FastUpdate::INTERVAL));
        updates.accepted.store(false, Ordering::Relaxed);
        assert!(
            !updates.due(start + FastUpdate::INTERVAL * 3),
            "never again once the phone refused one"
        );
        assert!(!FastUpdate::new(false).due(start));
    }
}
