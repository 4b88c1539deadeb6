use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use crate::CAT;
use crate::media_session::MediaSession;
use crate::sip_common::{SessionProperties, caps_from_media_section, stats_structure};

pub const DEFAULT_LATENCY_MS: u32 = 50;
pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;
pub const DEFAULT_STATS_INTERVAL_MS: u32 = 1_000;

/// One payload type of the payload map, ready for the receiving thread.
struct PayloadType {
    caps: gst::Caps,
    /// RFC 4733 events: reported as `sip-dtmf` messages, not pushed.
    telephone_event: bool,
}

pub(crate) struct SrcSettings {
    payload_map: gst::Caps,
    payload_types: HashMap<u8, PayloadType>,
    pub(super) timeout: Duration,
    pub(super) stats_interval: Duration,
    pub(super) eos_on_bye: bool,
}

impl Default for SrcSettings {
    fn default() -> Self {
        SrcSettings {
            payload_map: gst::Caps::new_empty(),
            payload_types: HashMap::new(),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS.into()),
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
                Some((
                    pt,
                    PayloadType {
                        caps: gst::Caps::from(s.to_owned()),
                        telephone_event,
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
    jitterbuffer: OnceLock<glib::WeakRef<gst::Element>>,
}

impl Shared {
    /// The caps of a payload type and whether it carries telephone events.
    pub(super) fn caps_for(&self, payload_type: u8) -> Option<(gst::Caps, bool)> {
        let settings = self.settings.lock().unwrap();
        settings
            .payload_types
            .get(&payload_type)
            .map(|p| (p.caps.clone(), p.telephone_event))
    }

    /// Session stats with the jitter buffer's count of late packets.
    pub(super) fn stats_structure(&self, session: &MediaSession) -> gst::Structure {
        if let Some(jitterbuffer) = self.jitterbuffer.get().and_then(|w| w.upgrade()) {
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
    jitterbuffer: Option<gst::Element>,
    receiver: super::SipReceiver,
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
        let jitterbuffer = gst::ElementFactory::make("rtpjitterbuffer")
            .name("jitterbuffer")
            .property("latency", DEFAULT_LATENCY_MS)
            // Lost-packet events let audio decoders conceal the gap.
            .property("do-lost", true)
            .build()
            .ok();
        SipSrc {
            shared,
            jitterbuffer,
            receiver,
        }
    }
}

impl ObjectImpl for SipSrc {
    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.add(&self.receiver).unwrap();
        let src = match &self.jitterbuffer {
            Some(jitterbuffer) => {
                obj.add(jitterbuffer).unwrap();
                self.receiver.link(jitterbuffer).unwrap();
                let _ = self.shared.jitterbuffer.set(jitterbuffer.downgrade());
                jitterbuffer.static_pad("src").unwrap()
            }
            None => {
                gst::error!(
                    CAT,
                    imp = self,
                    "rtpjitterbuffer (gst-plugins-good) is missing: playing out without a jitter buffer"
                );
                self.receiver.static_pad("src").unwrap()
            }
        };
        let templ = obj.pad_template("src").unwrap();
        let ghost = gst::GhostPad::builder_from_template_with_target(&templ, &src)
            .unwrap()
            .build();
        obj.add_pad(&ghost).unwrap();
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
                    .blurb("Post a sip-rtp-timeout message after this many milliseconds without RTP (0: never)")
                    .default_value(DEFAULT_TIMEOUT_MS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("stats-interval")
                    .nick("Stats interval")
                    .blurb("Post the stats structure as a sip-rtp-stats element message this often, in milliseconds (0: never)")
                    .default_value(DEFAULT_STATS_INTERVAL_MS)
                    .mutable_playing()
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
            "latency" => self.set_latency(value.get::<u32>().unwrap()),
            "payload-map" => settings.set_payload_map(
                value
                    .get::<Option<gst::Caps>>()
                    .unwrap()
                    .unwrap_or_else(gst::Caps::new_empty),
            ),
            "timeout" => {
                settings.timeout = Duration::from_millis(value.get::<u32>().unwrap().into())
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
                .jitterbuffer
                .as_ref()
                .filter(|jb| jb.parent().is_some())
                .map_or(0, |jb| jb.property::<u32>("latency"))
                .to_value(),
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
    /// Sets the jitter buffer's latency; while stopped, 0 takes the jitter
    /// buffer out of the path and anything else puts it back.
    fn set_latency(&self, latency: u32) {
        let Some(jitterbuffer) = &self.jitterbuffer else {
            return;
        };
        jitterbuffer.set_property("latency", latency);
        let obj = self.obj();
        if obj.current_state() > gst::State::Ready {
            return;
        }
        let Some(ghost) = obj.static_pad("src").and_downcast::<gst::GhostPad>() else {
            return;
        };
        let inside = jitterbuffer.parent().is_some();
        if latency == 0 && inside {
            self.receiver.unlink(jitterbuffer);
            let _ = obj.remove(jitterbuffer);
            let _ = ghost.set_target(self.receiver.static_pad("src").as_ref());
        } else if latency > 0
            && !inside
            && obj.add(jitterbuffer).is_ok()
            && self.receiver.link(jitterbuffer).is_ok()
        {
            let _ = ghost.set_target(jitterbuffer.static_pad("src").as_ref());
        }
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
}

impl BinImpl for SipSrc {}
