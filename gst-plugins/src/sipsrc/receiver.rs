//! The receiving source inside `sipsrc`: one datagram per `create`, checked
//! and counted before it becomes a buffer. Also posts the periodic stats and
//! the RTP-timeout message, since its thread is the one that sees silence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;

use bridge_protocol::dtmf::EventDetector;

use super::imp::Shared;
use crate::CAT;
use crate::media_session::{Datagram, MediaSession, RtpVerdict, classify};

#[derive(Default)]
struct Timers {
    started_at: Option<Instant>,
    last_stats_post: Option<Instant>,
    /// Whether the current silence was already reported.
    timeout_posted: bool,
    /// The `timeout` setting's time this silence is counted against.
    timeout_set_at: Option<Instant>,
    current_payload_type: Option<u8>,
}

#[derive(Default)]
pub struct SipReceiver {
    shared: OnceLock<Arc<Shared>>,
    flushing: AtomicBool,
    timers: Mutex<Timers>,
    dtmf: Mutex<EventDetector>,
}

#[glib::object_subclass]
impl ObjectSubclass for SipReceiver {
    const NAME: &'static str = "GstSipSrcReceiver";
    type Type = super::SipReceiver;
    type ParentType = gst_base::PushSrc;
}

impl ObjectImpl for SipReceiver {
    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.set_live(true);
        obj.set_format(gst::Format::Time);
        obj.set_do_timestamp(true);
    }
}

impl GstObjectImpl for SipReceiver {}

impl ElementImpl for SipReceiver {
    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: std::sync::LazyLock<Vec<gst::PadTemplate>> =
            std::sync::LazyLock::new(|| {
                vec![crate::rtp_pad_template("src", gst::PadDirection::Src)]
            });
        TEMPLATES.as_ref()
    }
}

impl BaseSrcImpl for SipReceiver {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        self.begin().map(|_| ())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.end();
        Ok(())
    }

    /// A decoder or a WebRTC peer downstream lost the picture.
    fn event(&self, event: &gst::Event) -> bool {
        if !crate::is_key_frame_request(event) {
            return self.parent_event(event);
        }
        self.request_key_frame();
        true
    }

    fn unlock(&self) -> Result<(), gst::ErrorMessage> {
        self.flushing.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        self.flushing.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl SipReceiver {
    /// Joins (or binds) the session and starts counting silence.
    pub(super) fn begin(&self) -> Result<Arc<MediaSession>, gst::ErrorMessage> {
        let session = self.shared().session.start()?;
        gst::info!(
            CAT,
            imp = self,
            "receiving on {} in session {}",
            session.local_rtp_addr(),
            session.name()
        );
        *self.timers.lock().unwrap() = Timers {
            started_at: Some(Instant::now()),
            ..Timers::default()
        };
        Ok(session)
    }

    pub(super) fn end(&self) {
        self.shared().session.stop();
    }

    pub(super) fn session(&self) -> Option<Arc<MediaSession>> {
        self.shared().session.session()
    }

    /// Asks the phone for a key frame by RTCP (PLI and FIR), and posts
    /// `sip-key-frame-request` from `sipsrc` for phones that only take SIP
    /// INFO `picture_fast_update`.
    pub(super) fn request_key_frame(&self) {
        let asked = self
            .shared()
            .session
            .session()
            .is_some_and(|session| session.request_key_frame());
        gst::debug!(CAT, imp = self, "key frame requested (RTCP sent: {asked})");
        if let Some(owner) = self.obj().parent().and_downcast::<gst::Element>() {
            let s = gst::Structure::new_empty("sip-key-frame-request");
            let _ = owner.post_message(gst::message::Element::builder(s).src(&owner).build());
        }
    }
}

impl PushSrcImpl for SipReceiver {
    fn create(
        &self,
        _buffer: Option<&mut gst::BufferRef>,
    ) -> Result<CreateSuccess, gst::FlowError> {
        let session = self
            .shared()
            .session
            .session()
            .ok_or(gst::FlowError::Flushing)?;
        loop {
            if self.flushing.load(Ordering::SeqCst) {
                return Err(gst::FlowError::Flushing);
            }
            self.housekeeping(&session);
            match session.recv_rtp(|from, data| self.on_datagram(&session, from, data)) {
                Ok(Some(Some((buffer, caps)))) => {
                    if let Some(caps) = caps
                        && let Err(e) = self.obj().set_caps(&caps)
                    {
                        gst::warning!(CAT, imp = self, "cannot switch to {caps}: {e}");
                    }
                    return Ok(CreateSuccess::NewBuffer(buffer));
                }
                // RTCP, or a packet rejected: counted, nothing to push.
                Ok(Some(None)) => {}
                Ok(None) => {
                    if self.shared().settings.lock().unwrap().eos_on_bye && session.bye_received() {
                        gst::info!(CAT, imp = self, "the peer said BYE: end of stream");
                        return Err(gst::FlowError::Eos);
                    }
                }
                Err(e) => {
                    gst::warning!(CAT, imp = self, "receive error: {e}");
                    std::thread::sleep(crate::media_session::RECV_POLL);
                }
            }
        }
    }
}

impl SipReceiver {
    pub(super) fn set_shared(&self, shared: Arc<Shared>) {
        let _ = self.shared.set(shared);
    }

    fn shared(&self) -> &Arc<Shared> {
        self.shared
            .get()
            .expect("sipsrc hands its settings over at construction")
    }

    /// Handles one datagram: RTCP goes to the session, RTP is checked and
    /// counted. Returns the buffer to push, with its new caps when the
    /// payload type changed; `None` when there is nothing to push.
    pub(super) fn on_datagram(
        &self,
        session: &MediaSession,
        from: std::net::SocketAddr,
        data: &[u8],
    ) -> Option<(gst::Buffer, Option<gst::Caps>)> {
        match classify(data) {
            Datagram::Rtcp => {
                session.on_rtcp_received(from, data);
                None
            }
            Datagram::Invalid(e) => {
                session.count_invalid();
                gst::debug!(
                    CAT,
                    imp = self,
                    "dropped {} bytes from {from}: {e:?}",
                    data.len()
                );
                None
            }
            Datagram::Rtp(packet) => self.accept_rtp(session, from, &packet, data),
        }
    }

    fn accept_rtp(
        &self,
        session: &MediaSession,
        from: std::net::SocketAddr,
        packet: &rtp_types::RtpPacket,
        data: &[u8],
    ) -> Option<(gst::Buffer, Option<gst::Caps>)> {
        let payload_type = packet.payload_type();
        let Some(format) = self.shared().payload_format(payload_type) else {
            session.count_unknown_payload_type();
            gst::debug!(
                CAT,
                imp = self,
                "dropped payload type {payload_type} from {from}: not in the payload map"
            );
            return None;
        };
        let clock_rate = format.clock_rate;
        let verdict = session.on_rtp_received(
            from,
            packet.ssrc(),
            packet.sequence_number(),
            packet.timestamp(),
            data.len(),
            clock_rate,
        );
        if verdict == RtpVerdict::Drop {
            return None;
        }
        if format.telephone_event {
            self.report_dtmf(packet, clock_rate);
            return None;
        }
        let mut timers = self.timers.lock().unwrap();
        timers.timeout_posted = false;
        let switched = timers.current_payload_type != Some(payload_type);
        timers.current_payload_type = Some(payload_type);
        drop(timers);
        let caps = switched
            .then(|| self.shared().payload_caps(payload_type))
            .flatten();
        Some((gst::Buffer::from_slice(data.to_vec()), caps))
    }

    /// Posts a `sip-dtmf` message (digit, duration-ms) from `sipsrc` when an
    /// RFC 4733 event ends.
    fn report_dtmf(&self, packet: &rtp_types::RtpPacket, clock_rate: u32) {
        let ended = self
            .dtmf
            .lock()
            .unwrap()
            .push(packet.timestamp(), packet.payload());
        let Some((digit, duration)) = ended else {
            return;
        };
        gst::info!(CAT, imp = self, "DTMF {digit} ({duration} clock units)");
        if let Some(owner) = self.obj().parent().and_downcast::<gst::Element>() {
            let s = gst::Structure::builder("sip-dtmf")
                .field("digit", digit.to_string())
                .field(
                    "duration-ms",
                    u32::from(duration) * 1000 / clock_rate.max(1),
                )
                .build();
            let _ = owner.post_message(gst::message::Element::builder(s).src(&owner).build());
        }
    }

    /// Posts the periodic `sip-rtp-stats` message and, once per silence,
    /// `sip-rtp-timeout`, both from `sipsrc` itself.
    pub(super) fn housekeeping(&self, session: &MediaSession) {
        let (stats_interval, timeout, timeout_set_at) = {
            let settings = self.shared().settings.lock().unwrap();
            (
                settings.stats_interval,
                settings.timeout,
                settings.timeout_set_at,
            )
        };
        let now = Instant::now();
        let mut timers = self.timers.lock().unwrap();
        let owner = self.obj().parent().and_downcast::<gst::Element>();
        let Some(owner) = owner else { return };

        if !stats_interval.is_zero()
            && timers
                .last_stats_post
                .is_none_or(|t| now.duration_since(t) >= stats_interval)
        {
            timers.last_stats_post = Some(now);
            let stats = self.shared().stats_structure(session);
            let _ = owner.post_message(gst::message::Element::builder(stats).src(&owner).build());
        }

        // A timeout set anew starts counting anew.
        if timers.timeout_set_at != timeout_set_at {
            timers.timeout_set_at = timeout_set_at;
            timers.timeout_posted = false;
        }
        if !timeout.is_zero() && !timers.timeout_posted {
            let counted = timers
                .started_at
                .max(timeout_set_at)
                .map_or(Duration::ZERO, |t| now.duration_since(t));
            let silence = session
                .last_packet_age()
                .map_or(counted, |age| age.min(counted));
            if silence >= timeout {
                timers.timeout_posted = true;
                gst::warning!(CAT, imp = self, "no RTP for {} ms", silence.as_millis());
                let s = gst::Structure::builder("sip-rtp-timeout")
                    .field("session", session.name())
                    .field("silence-ms", silence.as_millis() as u64)
                    .build();
                let _ = owner.post_message(gst::message::Element::builder(s).src(&owner).build());
            }
        }
    }
}
