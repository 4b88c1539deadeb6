use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use super::pooled::PooledReception;
use crate::CAT;
use crate::media_session::MediaSession;
use crate::sip_common::{SessionProperties, caps_from_media_section, stats_structure};

pub const DEFAULT_LATENCY_MS: u32 = 50;
pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;
pub const DEFAULT_STATS_INTERVAL_MS: u32 = 1_000;

/// One payload type of the payload map, ready for the receiving thread.
struct PayloadType {
    caps: gst::Caps,
    format: PayloadFormat,
}

/// What every received packet needs of its payload type, read from the
/// caps once (copied per packet: no reference counts touched).
#[derive(Clone, Copy)]
pub(super) struct PayloadFormat {
    pub(super) clock_rate: u32,
    /// RFC 4733 events: reported as `sip-dtmf` messages, not pushed.
    pub(super) telephone_event: bool,
}

pub(crate) struct SrcSettings {
    payload_map: gst::Caps,
    payload_types: HashMap<u8, PayloadType>,
    pub(super) timeout: Duration,
    /// When `timeout` was last set: silence counts from then at the
    /// earliest (a call answered, or taken off hold).
    pub(super) timeout_set_at: Option<Instant>,
    pub(super) stats_interval: Duration,
    pub(super) eos_on_bye: bool,
}

impl Default for SrcSettings {
    fn default() -> Self {
        SrcSettings {
            payload_map: gst::Caps::new_empty(),
            payload_types: HashMap::new(),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS.into()),
            timeout_set_at: None,
            stats_interval: Duration::from_millis(DEFAULT_STATS_INTERVAL_MS.into()),
            eos_on_bye: false,
        }
    }
}

impl SrcSettings {
    fn set_payload_map(&mut self, caps: gst::Caps) {
        self.payload_types = caps
            .iter()
            .filter_map(|s| {
                let pt = u8::try_from(s.get::<i32>("payload").ok()?)
                    .ok()
                    .filter(|pt| *pt < 128)?;
                let telephone_event = s
                    .get::<&str>("encoding-name")
                    .is_ok_and(|name| name.eq_ignore_ascii_case("TELEPHONE-EVENT"));
                let clock_rate = crate::clock_rate(s).unwrap_or(0);
                Some((
                    pt,
                    PayloadType {
                        caps: gst::Caps::from(s.to_owned()),
                        format: PayloadFormat {
                            clock_rate,
                            telephone_event,
                        },
                    },
                ))
            })
            .collect();
        self.payload_map = caps;
    }
}

/// What the bin and its receiving source share.
#[derive(Default)]
pub(crate) struct Shared {
    pub(super) session: SessionProperties,
    pub(super) settings: Mutex<SrcSettings>,
    /// Made only while the latency is above 0: a bridge that plays out
    /// without one saves its 9 KB per call.
    jitterbuffer: Mutex<Option<gst::Element>>,
}

impl Shared {
    /// What the payload map says of a payload type.
    pub(super) fn payload_format(&self, payload_type: u8) -> Option<PayloadFormat> {
        let settings = self.settings.lock().unwrap();
        settings
            .payload_types
            .get(&payload_type)
            .map(|pt| pt.format)
    }

    /// The caps of a payload type, for the packets that change to it.
    pub(super) fn payload_caps(&self, payload_type: u8) -> Option<gst::Caps> {
        let settings = self.settings.lock().unwrap();
        settings
            .payload_types
            .get(&payload_type)
            .map(|pt| pt.caps.clone())
    }

    /// Session stats with the jitter buffer's count of late packets.
    pub(super) fn stats_structure(&self, session: &MediaSession) -> gst::Structure {
        let jitterbuffer = self.jitterbuffer.lock().unwrap().clone();
        if let Some(jitterbuffer) = jitterbuffer {
            let jb_stats = jitterbuffer.property::<gst::Structure>("stats");
            if let Ok(late) = jb_stats.get::<u64>("num-late") {
                session.set_late(late);
            }
        }
        stats_structure(&session.stats())
    }
}

pub struct SipSrc {
    shared: Arc<Shared>,
    receiver: super::SipReceiver,
    /// The receiver's work on the shared threads, when asked for.
    pooled: PooledReception,
    latency: AtomicU32,
    shared_threads: AtomicBool,
}

#[glib::object_subclass]
impl ObjectSubclass for SipSrc {
    const NAME: &'static str = "GstSipSrc";
    type Type = super::SipSrc;
    type ParentType = gst::Bin;

    fn new() -> Self {
        let shared = Arc::new(Shared::default());
        let receiver = glib::Object::builder::<super::SipReceiver>()
            .property("name", "receiver")
            .build();
        receiver.imp().set_shared(shared.clone());
        SipSrc {
            shared,
            pooled: PooledReception::new(&receiver),
            receiver,
            latency: AtomicU32::new(DEFAULT_LATENCY_MS),
            shared_threads: AtomicBool::new(false),
        }
    }
}

impl ObjectImpl for SipSrc {
    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.add(&self.receiver).unwrap();
        let src = self.receiver.static_pad("src").unwrap();
        let templ = obj.pad_template("src").unwrap();
        let ghost = gst::GhostPad::builder_from_template_with_target(&templ, &src)
            .unwrap()
            .build();
        obj.add_pad(&ghost).unwrap();
        // The jitter buffer of the default latency.
        self.relink();
    }

    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let mut properties = SessionProperties::properties();
            properties.extend([
                glib::ParamSpecUInt::builder("latency")
                    .nick("Latency")
                    .blurb("Jitter buffer latency in milliseconds; 0 set while stopped: no jitter buffer (packets go on as they arrive, in their own thread: no reordering, two threads and their hand-offs fewer)")
                    .maximum(10_000)
                    .default_value(DEFAULT_LATENCY_MS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Caps>("payload-map")
                    .nick("Payload map")
                    .blurb("One application/x-rtp structure per accepted payload type (payload, encoding-name, clock-rate, …); other payload types are counted and dropped")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("timeout")
                    .nick("RTP timeout")
                    .blurb("Post a sip-rtp-timeout message after this many milliseconds without RTP, counted from the last packet or from when this is set (0: never)")
                    .default_value(DEFAULT_TIMEOUT_MS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("stats-interval")
                    .nick("Stats interval")
                    .blurb("Post the stats structure as a sip-rtp-stats element message this often, in milliseconds (0: never)")
                    .default_value(DEFAULT_STATS_INTERVAL_MS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("shared-threads")
                    .nick("Shared threads")
                    .blurb("Receive on the threads all calls share instead of a thread of this element's own; what is downstream must not block (no clock-synced sink without a queue)")
                    .default_value(false)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("eos-on-bye")
                    .nick("EOS on BYE")
                    .blurb("End the stream when the peer sends RTCP BYE (for pipelines that must end by themselves)")
                    .default_value(false)
                    .mutable_ready()
                    .build(),
            ]);
            properties
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.shared.settings.lock().unwrap();
        match pspec.name() {
            "latency" => {
                let latency = value.get::<u32>().unwrap();
                self.latency.store(latency, Ordering::SeqCst);
                if let Some(jitterbuffer) = self.shared.jitterbuffer.lock().unwrap().as_ref() {
                    jitterbuffer.set_property("latency", latency);
                }
                self.relink();
            }
            "shared-threads" => {
                self.shared_threads
                    .store(value.get::<bool>().unwrap(), Ordering::SeqCst);
                self.relink();
            }
            "payload-map" => settings.set_payload_map(
                value
                    .get::<Option<gst::Caps>>()
                    .unwrap()
                    .unwrap_or_else(gst::Caps::new_empty),
            ),
            "timeout" => {
                settings.timeout = Duration::from_millis(value.get::<u32>().unwrap().into());
                settings.timeout_set_at = Some(Instant::now());
            }
            "stats-interval" => {
                settings.stats_interval = Duration::from_millis(value.get::<u32>().unwrap().into())
            }
            "eos-on-bye" => settings.eos_on_bye = value.get().unwrap(),
            _ => {
                drop(settings);
                if let Some(section) =
                    self.shared
                        .session
                        .set_property(self.obj().upcast_ref(), value, pspec)
                {
                    let caps = caps_from_media_section(&section);
                    gst::debug!(CAT, imp = self, "payload map from SDP: {caps}");
                    self.shared.settings.lock().unwrap().set_payload_map(caps);
                }
            }
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.shared.settings.lock().unwrap();
        match pspec.name() {
            "latency" => self
                .shared
                .jitterbuffer
                .lock()
                .unwrap()
                .as_ref()
                .map_or(0, |_| self.latency.load(Ordering::SeqCst))
                .to_value(),
            "shared-threads" => self.shared_threads.load(Ordering::SeqCst).to_value(),
            "payload-map" => settings.payload_map.to_value(),
            "timeout" => (settings.timeout.as_millis() as u32).to_value(),
            "stats-interval" => (settings.stats_interval.as_millis() as u32).to_value(),
            "eos-on-bye" => settings.eos_on_bye.to_value(),
            "stats" => {
                drop(settings);
                match self.shared.session.session() {
                    Some(session) => self.shared.stats_structure(&session).to_value(),
                    None => self.shared.session.property(pspec),
                }
            }
            _ => {
                drop(settings);
                self.shared.session.property(pspec)
            }
        }
    }
}

impl SipSrc {
    /// Puts the path together again while stopped: the receiving source (its
    /// own thread, or the shared threads' pad), then the jitter buffer
    /// unless the latency is 0.
    fn relink(&self) {
        let obj = self.obj();
        if obj.current_state() > gst::State::Ready {
            return;
        }
        let Some(ghost) = obj.static_pad("src").and_downcast::<gst::GhostPad>() else {
            return;
        };
        let pooled = self.shared_threads.load(Ordering::SeqCst);
        let receiver_pad = self.receiver.static_pad("src").unwrap();
        let _ = ghost.set_target(None::<&gst::Pad>);
        for pad in [&receiver_pad, self.pooled.pad()] {
            if let Some(peer) = pad.peer() {
                let _ = pad.unlink(&peer);
            }
        }
        // A receiver that does not run keeps out of the bin's state changes.
        self.receiver.set_locked_state(pooled);
        let head = if pooled {
            self.pooled.pad()
        } else {
            &receiver_pad
        };
        let latency = self.latency.load(Ordering::SeqCst);
        let jitterbuffer = if latency > 0 {
            let mut kept = self.shared.jitterbuffer.lock().unwrap();
            if kept.is_none() {
                *kept = self.make_jitterbuffer(latency);
            }
            kept.clone()
        } else {
            self.shared.jitterbuffer.lock().unwrap().take()
        };
        match jitterbuffer {
            Some(jitterbuffer) if latency > 0 => {
                if jitterbuffer.parent().is_none() {
                    let _ = obj.add(&jitterbuffer);
                }
                let _ = head.link(&jitterbuffer.static_pad("sink").unwrap());
                let _ = ghost.set_target(jitterbuffer.static_pad("src").as_ref());
            }
            jitterbuffer => {
                if let Some(jitterbuffer) = jitterbuffer.filter(|jb| jb.parent().is_some()) {
                    let _ = obj.remove(&jitterbuffer);
                    let _ = jitterbuffer.set_state(gst::State::Null);
                }
                let _ = ghost.set_target(Some(head));
            }
        }
    }

    /// A jitter buffer of `latency` ms; `None` (said once per try) without
    /// gst-plugins-good.
    fn make_jitterbuffer(&self, latency: u32) -> Option<gst::Element> {
        gst::ElementFactory::make("rtpjitterbuffer")
            .name("jitterbuffer")
            .property("latency", latency)
            // Lost-packet events let audio decoders conceal the gap.
            .property("do-lost", true)
            .build()
            .inspect_err(|_| {
                gst::error!(
                    CAT,
                    imp = self,
                    "rtpjitterbuffer (gst-plugins-good) is missing: playing out without a jitter buffer"
                );
            })
            .ok()
    }
}

impl GstObjectImpl for SipSrc {}

impl ElementImpl for SipSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "SIP RTP source",
                "Source/Network/RTP",
                "Receives RTP and RTCP from a SIP phone on a symmetric UDP socket pair, with statistics and a jitter buffer",
                "sip-cc-bridge developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> =
            LazyLock::new(|| vec![crate::rtp_pad_template("src", gst::PadDirection::Src)]);
        TEMPLATES.as_ref()
    }

    /// An EOS sent to the element (a pipeline's EOS, finishing a
    /// recording) leaves through the shared threads' pad when they receive.
    fn send_event(&self, event: gst::Event) -> bool {
        if self.shared_threads.load(Ordering::SeqCst) && event.type_() == gst::EventType::Eos {
            self.pooled.end_of_stream(self.obj().upcast_ref());
            return true;
        }
        self.parent_send_event(event)
    }

    /// On the shared threads the receiver's part is done here: a live
    /// source, so no preroll.
    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        if !self.shared_threads.load(Ordering::SeqCst) {
            return self.parent_change_state(transition);
        }
        if transition == gst::StateChange::ReadyToPaused
            && let Err(e) = self.pooled.prepare(&self.receiver)
        {
            self.post_error_message(e);
            return Err(gst::StateChangeError);
        }
        let result = self.parent_change_state(transition);
        match transition {
            gst::StateChange::PausedToPlaying => {
                let eos_on_bye = self.shared.settings.lock().unwrap().eos_on_bye;
                self.pooled
                    .start(&self.receiver, self.obj().upcast_ref(), eos_on_bye);
            }
            gst::StateChange::PlayingToPaused => self.pooled.pause(),
            gst::StateChange::PausedToReady => self.pooled.release(&self.receiver),
            _ => {}
        }
        match transition {
            gst::StateChange::ReadyToPaused | gst::StateChange::PlayingToPaused => {
                result.map(|_| gst::StateChangeSuccess::NoPreroll)
            }
            _ => result,
        }
    }
}

impl BinImpl for SipSrc {}
