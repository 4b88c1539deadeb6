//! The WebRTC call that `connectycubesink` and `connectycubesrc` share through
//! their `session` name: one RTCPeerConnection per call, as the ConnectyCube
//! SDK expects. It is carried either by a `webrtcbin` in an internal
//! pipeline of its own (audio and video), or by a [`shared_peer`] on the
//! pool of threads all calls share (Opus audio). Sinks push into it straight
//! from their streaming threads; what arrives is pushed on by the sources in
//! the transport's threads. Stand-alone signalling lives in [`signalling`].

mod congestion;
mod crypto;
mod dtls;
mod shared_peer;
mod signalling;
mod timeline;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use tokio::sync::mpsc;

pub use congestion::EncoderControl;
pub use shared_peer::{peer_config as shared_stack_config, warm_up as warm_up_shared_stack};
pub use signalling::SignallingSettings;

use bridge_protocol::{dtmf, ice, opus_fmtp};
use shared_peer::{Frame, IceServers, PeerEvent, SharedPeer};
use timeline::Timeline;

use crate::CAT;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum, Default)]
#[enum_type(name = "GstConnectyCubeMedia")]
pub enum MediaKind {
    #[default]
    #[enum_value(name = "Audio", nick = "audio")]
    Audio,
    #[enum_value(name = "Video", nick = "video")]
    Video,
}

impl MediaKind {
    fn of_caps(caps: &gst::CapsRef) -> MediaKind {
        match caps.structure(0).and_then(|s| s.get::<&str>("media").ok()) {
            Some("video") => MediaKind::Video,
            _ => MediaKind::Audio,
        }
    }

    /// What a receive-only transceiver offers.
    fn receive_caps(self) -> gst::Caps {
        match self {
            MediaKind::Audio => gst::Caps::builder("application/x-rtp")
                .field("media", "audio")
                .field("encoding-name", "OPUS")
                .field("payload", 111)
                .field("clock-rate", 48000)
                .field("encoding-params", "2")
                .build(),
            MediaKind::Video => gst::Caps::builder("application/x-rtp")
                .field("media", "video")
                .field("encoding-name", "VP8")
                .field("payload", 96)
                .field("clock-rate", 90000)
                .build(),
        }
    }
}

/// The app's keypad events offered on both WebRTC stacks (payload type,
/// clock rate): at Opus's clock, as Chromium sends them, and at 8 kHz, the
/// only ones Firefox sends.
const KEYPAD_EVENTS: [(u8, u32); 2] = [(110, 48000), (126, 8000)];

/// webrtcbin announces no `telephone-event`, so apps would send no keypad
/// digits: it is added to webrtcbin's own description before it takes it
/// (its received payload types follow the descriptions), and the digits
/// are taken from the RTP it receives (`on_incoming_pad`).
fn with_keypad_events(
    description: &gst_webrtc::WebRTCSessionDescription,
    events: &[(u8, u32)],
) -> gst_webrtc::WebRTCSessionDescription {
    let text = description.sdp().to_string();
    let with_events = dtmf::with_events(&text, events);
    match gst_sdp::SDPMessage::parse_buffer(with_events.as_bytes()) {
        Ok(sdp) if with_events != text => {
            gst_webrtc::WebRTCSessionDescription::new(description.type_(), sdp)
        }
        _ => description.clone(),
    }
}

fn is_keypad_events(caps: &gst::CapsRef) -> bool {
    caps.structure(0)
        .and_then(|s| s.get::<&str>("encoding-name").ok())
        .is_some_and(|name| name.eq_ignore_ascii_case("TELEPHONE-EVENT"))
}

/// What carries a call's WebRTC leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum, Default)]
#[enum_type(name = "GstConnectyCubeWebRtcStack")]
pub enum WebRtcStack {
    /// A `webrtcbin` of its own: audio and video, STUN/TURN.
    #[default]
    #[enum_value(name = "A webrtcbin per call: audio and video", nick = "webrtcbin")]
    Webrtcbin,
    /// A peer connection on the threads every call shares: Opus audio
    /// only, host, STUN and TURN candidates, a fraction of webrtcbin's
    /// cost.
    #[enum_value(
        name = "Shared threads for all calls: Opus audio only, host, STUN and TURN candidates",
        nick = "shared"
    )]
    Shared,
}

/// Settings of a call, from the element that creates it.
#[derive(Debug, Clone, Default)]
pub struct CallSettings {
    pub stun_server: Option<String>,
    pub turn_server: Option<String>,
    /// What a `turns:` server's certificate is checked against (shared stack).
    pub turn_ca_file: Option<String>,
    /// Only relayed candidates (`ice-transport-policy=relay`).
    pub relay_only: bool,
    /// Where peers reach this machine behind a one-to-one NAT.
    pub public_address: Option<IpAddr>,
    pub signalling: Option<SignallingSettings>,
    pub stack: WebRtcStack,
}

/// A call's webrtcbin and the internal pipeline it runs in.
struct Bin {
    pipeline: gst::Pipeline,
    webrtcbin: gst::Element,
}

enum Transport {
    Bin(Bin),
    /// Set up when the call starts.
    Shared(OnceLock<SharedPeer>),
}

struct Sender {
    id: u64,
    /// Where its packets enter webrtcbin, once its caps are known.
    pad: Option<gst::Pad>,
    caps: Option<gst::Caps>,
    kind: MediaKind,
    /// Payload type the peer expects, when it differs from the payloader's.
    payload_type: Option<u8>,
    /// The SSRC the stream goes out with, whatever the payloader chose: it
    /// is in the caps, so webrtcbin can route the peer's PLI/FIR about it
    /// back to this sender.
    ssrc: u32,
    /// Id of the transport-wide-cc header extension written into each packet.
    twcc_id: Option<u8>,
    /// The timestamps the stream goes out with, once its clock rate is known.
    timeline: Option<Timeline>,
    feedback: Arc<dyn SenderFeedback>,
}

struct Receiver {
    id: u64,
    kind: MediaKind,
    /// The highest audio rate played downstream (Hz).
    max_playback_rate: u32,
    output: Arc<dyn ReceiverOutput>,
}

#[derive(Default)]
struct Inner {
    senders: Vec<Sender>,
    next_sender: u64,
    receivers: Vec<Receiver>,
    next_receiver: u64,
    negotiation_scheduled: bool,
    /// Transceivers for media only received were added (before the first offer).
    receive_only_added: bool,
    /// Where each kind of received media leaves webrtcbin (an appsink's pad).
    incoming: HashMap<MediaKind, gst::Pad>,
    /// Remote candidates that came before the remote description.
    early_candidates: Vec<(u32, String)>,
    remote_description_set: bool,
}

/// The pad a sender's packets enter webrtcbin from: of no element (so it
/// links into the session's pipeline from the call's), pushed in the
/// sender's own streaming thread. It answers webrtcbin's caps and latency
/// queries, and hands key-frame requests to the sender.
fn sender_pad(name: &str, feedback: Option<Weak<dyn SenderFeedback>>) -> gst::Pad {
    let pad = gst::Pad::builder(gst::PadDirection::Src)
        .name(name)
        .event_function(move |_, _, event| {
            if event.type_() == gst::EventType::CustomUpstream
                && let Some(feedback) = feedback.as_ref().and_then(Weak::upgrade)
            {
                feedback.upstream_event(event);
            }
            true
        })
        .query_function(|pad, _, query| crate::live_source_query(pad, query).unwrap_or(false))
        .build();
    let _ = pad.set_active(true);
    pad
}

/// What marks a received packet's arrival at webrtcbin's jitter buffer.
static ARRIVAL: LazyLock<gst::Caps> =
    LazyLock::new(|| gst::Caps::new_empty_simple("timestamp/x-sipcc-arrival"));

/// A jitter buffer holds the first packet of a stream for its whole latency
/// (and everything behind it) unless told to start from consecutive packets:
/// those 200 ms would reach the phone as a burst and stay as delay. Each
/// packet is also marked with its arrival: the jitter buffer's own
/// timestamps are its estimate of when the packet was due by the sender's
/// clock, so a packet the sender or the network delayed would count its
/// delay as the bridge's.
fn configure_jitter_buffers(webrtcbin: &gst::Element) {
    let Some(rtpbin) = webrtcbin.downcast_ref::<gst::Bin>().and_then(|bin| {
        bin.iterate_elements()
            .into_iter()
            .flatten()
            .find(|e| e.factory().is_some_and(|f| f.name() == "rtpbin"))
    }) else {
        return;
    };
    rtpbin.connect("new-jitterbuffer", false, |args| {
        if let Ok(jitterbuffer) = args[1].get::<gst::Element>() {
            jitterbuffer.set_property("faststart-min-packets", 2u32);
            if let Some(sink) = jitterbuffer.static_pad("sink") {
                sink.add_probe(gst::PadProbeType::BUFFER, |pad, info| {
                    let now = pad
                        .parent_element()
                        .and_then(|e| e.clock())
                        .map(|c| c.time());
                    if let (Some(now), Some(buffer)) = (now, info.buffer_mut()) {
                        gst::ReferenceTimestampMeta::add(buffer.make_mut(), &ARRIVAL, now, None);
                    }
                    gst::PadProbeReturn::Ok
                });
            }
        }
        None
    });
}

/// Why a call ended, as the elements report it. A normal end (hang-up,
/// reject, no answer) ends the stream; a failure (sign-in, chat, ICE) is an
/// error of the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallEnd {
    pub reason: String,
    pub error: bool,
}

impl CallEnd {
    pub fn normal(reason: impl Into<String>) -> Self {
        CallEnd {
            reason: reason.into(),
            error: false,
        }
    }
}

impl From<String> for CallEnd {
    fn from(reason: String) -> Self {
        CallEnd {
            reason,
            error: true,
        }
    }
}

/// Receives the local SDP in app-driven mode: ("offer" | "answer", sdp).
pub type DescriptionListener = Box<dyn Fn(&str, &str) + Send + Sync>;

/// Where a received stream goes (a `connectycubesrc`): handed each packet
/// in webrtcbin's streaming thread, and told when the call ends.
pub trait ReceiverOutput: Send + Sync {
    fn deliver(&self, call: &CallSession, sample: gst::Sample);
    /// A digit the peer sent (RFC 4733), once it ended.
    fn dtmf(&self, digit: char, duration_ms: u32);
    fn ended(&self, end: &CallEnd);
}

/// What the network asks of a stream's producer: a bitrate (bit/s) from
/// congestion control, and key frames the peer requests (PLI/FIR, which
/// webrtcbin turns into `GstForceKeyUnit` upstream events).
pub trait SenderFeedback: Send + Sync {
    fn bitrate(&self, bits_per_second: u32);
    /// The peer plays audio at no more than this rate (its `maxplaybackrate`).
    fn max_playback_rate(&self, rate: u32);
    /// The peer reports this share of the audio lost (percent).
    fn packet_loss(&self, percent: u32);
    fn upstream_event(&self, event: gst::Event);
}

pub struct CallSession {
    name: String,
    transport: Transport,
    settings: CallSettings,
    inner: Mutex<Inner>,
    ended: Mutex<Option<CallEnd>>,
    started: AtomicBool,
    /// Media is only handed to webrtcbin once the peer connection is up:
    /// what it would queue before then comes out later as lasting delay.
    connected: AtomicBool,
    signalling: Mutex<Option<mpsc::UnboundedSender<signalling::Command>>>,
    /// The latest summary of webrtcbin's statistics, and when it was taken.
    last_stats: Mutex<Option<(std::time::Instant, gst::Structure)>>,
    /// Every stream registered so far knows its caps, so an offer or
    /// answer can include them.
    streams_known: tokio::sync::watch::Sender<bool>,
    listeners: Mutex<Vec<(u64, DescriptionListener)>>,
    /// The application's signalling sent our offer: we are the side that
    /// restarts ICE.
    offered_to_app: AtomicBool,
    /// The congestion controller's latest estimate (bit/s; 0 before one).
    estimated_bitrate: AtomicU32,
    reported_loss: Mutex<congestion::LossReports>,
}

static SESSIONS: LazyLock<Mutex<HashMap<String, Weak<CallSession>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl CallSession {
    /// Joins the call called `name`, or sets it up with `settings`.
    pub fn acquire(
        name: &str,
        settings: &CallSettings,
    ) -> Result<Arc<CallSession>, gst::ErrorMessage> {
        let mut sessions = SESSIONS.lock().unwrap();
        sessions.retain(|_, w| w.strong_count() > 0);
        if let Some(existing) = sessions.get(name).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let session = Arc::new(Self::build(name, settings.clone())?);
        sessions.insert(name.to_owned(), Arc::downgrade(&session));
        Ok(session)
    }

    fn build(name: &str, settings: CallSettings) -> Result<CallSession, gst::ErrorMessage> {
        let transport = match settings.stack {
            WebRtcStack::Webrtcbin => Transport::Bin(Bin::build(&settings, name)?),
            WebRtcStack::Shared => Transport::Shared(OnceLock::new()),
        };
        Ok(CallSession {
            name: name.to_owned(),
            transport,
            settings,
            inner: Mutex::new(Inner::default()),
            ended: Mutex::new(None),
            started: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            signalling: Mutex::new(None),
            last_stats: Mutex::new(None),
            streams_known: tokio::sync::watch::channel(false).0,
            listeners: Mutex::new(Vec::new()),
            offered_to_app: AtomicBool::new(false),
            estimated_bitrate: AtomicU32::new(0),
            reported_loss: Mutex::default(),
        })
    }

    fn bin(&self) -> Option<&Bin> {
        match &self.transport {
            Transport::Bin(bin) => Some(bin),
            Transport::Shared(_) => None,
        }
    }

    fn shared_peer(&self) -> Option<&SharedPeer> {
        match &self.transport {
            Transport::Bin(_) => None,
            Transport::Shared(peer) => peer.get(),
        }
    }
}

impl Bin {
    /// ConnectyCube's SDK hands a video call's remote stream to the app only
    /// once it holds a video track: a video offer answered with video we only
    /// receive, or none, connects and stays silent. Video we do not send is
    /// answered as a camera that is off (sendrecv, no packets), which gives
    /// the app its track.
    fn answer_video_as_a_camera_that_is_off(&self) {
        let mut has_video = false;
        for index in 0.. {
            let Some(transceiver) = self
                .webrtcbin
                .emit_by_name::<Option<gst_webrtc::WebRTCRTPTransceiver>>(
                    "get-transceiver",
                    &[&index],
                )
            else {
                break;
            };
            if transceiver.property::<gst_webrtc::WebRTCKind>("kind")
                != gst_webrtc::WebRTCKind::Video
            {
                continue;
            }
            has_video = true;
            let direction =
                transceiver.property::<gst_webrtc::WebRTCRTPTransceiverDirection>("direction");
            if direction == gst_webrtc::WebRTCRTPTransceiverDirection::Recvonly {
                transceiver.set_property(
                    "direction",
                    gst_webrtc::WebRTCRTPTransceiverDirection::Sendrecv,
                );
            }
        }
        if !has_video {
            self.webrtcbin.emit_by_name::<glib::Object>(
                "add-transceiver",
                &[
                    &gst_webrtc::WebRTCRTPTransceiverDirection::Sendrecv,
                    &MediaKind::Video.receive_caps(),
                ],
            );
        }
    }

    fn build(settings: &CallSettings, name: &str) -> Result<Bin, gst::ErrorMessage> {
        let missing = |what: &str| {
            gst::error_msg!(
                gst::CoreError::MissingPlugin,
                ("{what} is missing (gst-plugins-bad webrtc, gstreamer1.0-nice)")
            )
        };
        let pipeline = gst::Pipeline::with_name(&format!("connectycube-{name}"));
        let webrtcbin = gst::ElementFactory::make("webrtcbin")
            .name("webrtcbin")
            .property_from_str("bundle-policy", "max-bundle")
            .build()
            .map_err(|_| missing("webrtcbin"))?;
        if let Some(stun) = &settings.stun_server {
            webrtcbin.set_property("stun-server", stun);
        }
        if settings.relay_only {
            webrtcbin.set_property(
                "ice-transport-policy",
                gst_webrtc::WebRTCICETransportPolicy::Relay,
            );
        }
        if let Some(turn) = &settings.turn_server {
            // webrtcbin reads only `turn://` (and `turns://`, which the
            // parser leaves alone); `turn:`, as apps spell it, is rewritten.
            let url = turn
                .parse::<bridge_protocol::turn::TurnServer>()
                .map_or_else(|_| turn.clone(), |server| server.url());
            webrtcbin.set_property("turn-server", url);
        }
        // libnice would otherwise send UPnP/SSDP multicast out of the machine.
        let ice_agent = webrtcbin.property::<glib::Object>("ice-agent");
        if ice_agent.has_property("agent") {
            let agent = ice_agent.property::<glib::Object>("agent");
            agent.set_property("upnp", false);
        }
        configure_jitter_buffers(&webrtcbin);
        pipeline.add(&webrtcbin).map_err(|_| missing("webrtcbin"))?;
        Ok(Bin {
            pipeline,
            webrtcbin,
        })
    }
}

impl CallSession {
    /// Starts the transport and, with credentials, the signalling; the
    /// shared stack's peer runs on the media loop of `element`'s pipeline.
    pub fn start(self: &Arc<Self>, element: &gst::Element) -> Result<(), gst::ErrorMessage> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        match &self.transport {
            Transport::Bin(bin) => {
                self.start_bin(bin)?;
                self.poll_stats();
            }
            Transport::Shared(peer) => {
                let weak = Arc::downgrade(self);
                let events = Box::new(move |event| {
                    if let Some(session) = weak.upgrade() {
                        session.on_peer_event(event);
                    }
                });
                let started = SharedPeer::start(
                    events,
                    crate::MEDIA_POOL.for_element(element),
                    &IceServers {
                        stun_server: self.settings.stun_server.clone(),
                        turn_server: self.settings.turn_server.clone(),
                        turn_ca_file: self.settings.turn_ca_file.clone(),
                        relay_only: self.settings.relay_only,
                    },
                )
                .map_err(|e| gst::error_msg!(gst::ResourceError::OpenReadWrite, ("{e}")))?;
                let _ = peer.set(started);
            }
        }
        if let Some(settings) = self.settings.signalling.clone() {
            let commands = signalling::start(Arc::downgrade(self), settings);
            *self.signalling.lock().unwrap() = Some(commands);
        }
        Ok(())
    }

    fn on_peer_event(self: &Arc<Self>, event: PeerEvent) {
        match event {
            PeerEvent::Connected => gst::info!(CAT, "call {} connected", self.name),
            PeerEvent::Frame(frame) => self.deliver_frame(frame),
            PeerEvent::Failed(reason) => self.end(CallEnd::from(reason)),
            PeerEvent::RemoteLoss(percent) => self.on_reported_loss(percent),
            PeerEvent::Dtmf { digit, duration_ms } => {
                gst::info!(CAT, "call {}: DTMF {digit} ({duration_ms} ms)", self.name);
                for output in self.audio_outputs() {
                    output.dtmf(digit, duration_ms);
                }
            }
            PeerEvent::Disconnected => self.restart_ice(),
        }
    }

    /// The peer's network went away (an app's phone left its Wi-Fi, say).
    /// ConnectyCube's SDK restarts ICE only from the side that offered, so
    /// when that is us, a new offer goes to the application, whose
    /// signalling sends it as `iceRestart`; the peer then gathers again
    /// from where it now is.
    fn restart_ice(self: &Arc<Self>) {
        if !self.offered_to_app.load(Ordering::SeqCst) {
            return;
        }
        let session = self.clone();
        crate::RUNTIME.spawn(async move {
            let Some(peer) = session.shared_peer() else {
                return;
            };
            match peer.restart_ice().await {
                Ok(offer) => {
                    gst::info!(
                        CAT,
                        "call {}: connection lost, restarting ICE",
                        session.name
                    );
                    session.emit_local_description("offer", &session.as_announced(&offer));
                }
                Err(e) => gst::warning!(CAT, "call {}: cannot restart ICE: {e}", session.name),
            }
        });
    }

    fn audio_outputs(&self) -> Vec<Arc<dyn ReceiverOutput>> {
        let inner = self.inner.lock().unwrap();
        let receivers = inner
            .receivers
            .iter()
            .filter(|r| r.kind == MediaKind::Audio);
        receivers.map(|r| r.output.clone()).collect()
    }

    /// A received Opus frame, as the RTP packet the sources hand on.
    fn deliver_frame(&self, frame: Frame) {
        static CAPS: LazyLock<gst::Caps> = LazyLock::new(|| MediaKind::Audio.receive_caps());
        let outputs = self.audio_outputs();
        if outputs.is_empty() {
            return;
        }
        let mut packet = Vec::with_capacity(12 + frame.payload.len());
        packet.extend_from_slice(&[0x80, 111]);
        packet.extend_from_slice(&frame.sequence.to_be_bytes());
        packet.extend_from_slice(&frame.rtp_time.to_be_bytes());
        packet.extend_from_slice(&RECEIVED_SSRC.to_be_bytes());
        packet.extend_from_slice(&frame.payload);
        let sample = gst::Sample::builder()
            .buffer(&gst::Buffer::from_mut_slice(packet))
            .caps(&CAPS)
            .build();
        for output in outputs {
            output.deliver(self, sample.clone());
        }
    }

    fn start_bin(self: &Arc<Self>, bin: &Bin) -> Result<(), gst::ErrorMessage> {
        let weak = Arc::downgrade(self);
        bin.webrtcbin.connect_pad_added(move |_, pad| {
            if let Some(session) = weak.upgrade() {
                session.on_incoming_pad(pad);
            }
        });
        let weak = Arc::downgrade(self);
        bin.webrtcbin
            .connect("request-aux-sender", false, move |_| {
                // Bandwidth estimation steers video; an audio-only call sends
                // a few dozen kbit/s and would pay for the estimator's pacing
                // thread (a fifth of the bridge's CPU) for nothing.
                let no_estimator = Some(None::<gst::Element>.to_value());
                if !weak.upgrade().is_some_and(|s| s.sends(MediaKind::Video)) {
                    return no_estimator;
                }
                let Some(estimator) = congestion::make_estimator() else {
                    return no_estimator;
                };
                let weak = weak.clone();
                estimator.connect_notify(Some("estimated-bitrate"), move |estimator, _| {
                    if let Some(session) = weak.upgrade() {
                        session.share_bitrate(estimator.property::<u32>("estimated-bitrate"));
                    }
                });
                Some(estimator.to_value())
            });
        let weak = Arc::downgrade(self);
        bin.webrtcbin
            .connect_notify(Some("connection-state"), move |webrtcbin, _| {
                let state =
                    webrtcbin.property::<gst_webrtc::WebRTCPeerConnectionState>("connection-state");
                gst::info!(CAT, obj = webrtcbin, "connection state {state:?}");
                let Some(session) = weak.upgrade() else {
                    return;
                };
                session.connected.store(
                    state == gst_webrtc::WebRTCPeerConnectionState::Connected,
                    Ordering::SeqCst,
                );
                if state == gst_webrtc::WebRTCPeerConnectionState::Failed {
                    session.end(CallEnd::from("ICE/DTLS connection failed".to_owned()));
                }
            });
        bin.pipeline.set_state(gst::State::Playing).map_err(|_| {
            gst::error_msg!(
                gst::CoreError::StateChange,
                ("cannot start the WebRTC pipeline of call {}", self.name)
            )
        })?;
        Ok(())
    }

    fn signal(&self, command: signalling::Command) {
        if let Some(commands) = self.signalling.lock().unwrap().as_ref() {
            let _ = commands.send(command);
        }
    }

    // ---- senders (connectycubesink) -------------------------------------

    pub fn add_sender(self: &Arc<Self>, feedback: Arc<dyn SenderFeedback>) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.next_sender += 1;
        let id = inner.next_sender;
        inner.senders.push(Sender {
            id,
            pad: None,
            caps: None,
            kind: MediaKind::Audio,
            payload_type: None,
            ssrc: rand::random(),
            twcc_id: None,
            timeline: None,
            feedback,
        });
        drop(inner);
        self.streams_known.send_replace(false);
        id
    }

    fn sends(&self, kind: MediaKind) -> bool {
        self.inner
            .lock()
            .unwrap()
            .senders
            .iter()
            .any(|s| s.pad.is_some() && s.kind == kind)
    }

    /// A new estimate from congestion control, shared out among the streams.
    fn share_bitrate(&self, total: u32) {
        self.estimated_bitrate.store(total, Ordering::Relaxed);
        let senders: Vec<(MediaKind, Arc<dyn SenderFeedback>)> = {
            let inner = self.inner.lock().unwrap();
            inner
                .senders
                .iter()
                .filter(|s| s.pad.is_some())
                .map(|s| (s.kind, s.feedback.clone()))
                .collect()
        };
        let kinds: Vec<MediaKind> = senders.iter().map(|(kind, _)| *kind).collect();
        for ((_, feedback), share) in senders.iter().zip(congestion::allocate(total, &kinds)) {
            feedback.bitrate(share);
        }
    }

    /// The sender's caps are known: give it a path into the transport.
    pub fn set_sender_caps(
        self: &Arc<Self>,
        id: u64,
        caps: &gst::Caps,
    ) -> Result<(), gst::ErrorMessage> {
        let bin = match &self.transport {
            Transport::Bin(bin) => bin,
            Transport::Shared(_) => return self.set_shared_sender_caps(id, caps),
        };
        let ssrc = {
            let inner = self.inner.lock().unwrap();
            inner.senders.iter().find(|s| s.id == id).map(|s| s.ssrc)
        };
        let mut caps = with_key_frame_feedback(caps);
        if let (Some(ssrc), Some(s)) = (ssrc, caps.make_mut().structure_mut(0)) {
            s.set("ssrc", ssrc);
        }
        let (caps, twcc_id) = congestion::with_twcc(&caps);
        let sink_pad = bin.webrtcbin.request_pad_simple("sink_%u").ok_or_else(|| {
            gst::error_msg!(
                gst::CoreError::Negotiation,
                ("webrtcbin refused another stream")
            )
        })?;
        let feedback = {
            let inner = self.inner.lock().unwrap();
            let sender = inner.senders.iter().find(|s| s.id == id);
            sender.map(|s| Arc::downgrade(&s.feedback))
        };
        let pad = sender_pad(&format!("{}-{id}", self.name), feedback);
        pad.link(&sink_pad).map_err(|e| {
            gst::error_msg!(
                gst::CoreError::Negotiation,
                ("cannot link {caps} into webrtcbin: {e:?}")
            )
        })?;
        // Caps notify on webrtcbin's own pad: webrtcbin took them.
        let weak = Arc::downgrade(self);
        sink_pad.connect_notify(Some("caps"), move |_, _| {
            if let Some(session) = weak.upgrade() {
                session.schedule_negotiation();
            }
        });
        let clock_rate = caps.structure(0).and_then(crate::clock_rate);
        let mut inner = self.inner.lock().unwrap();
        if let Some(sender) = inner.senders.iter_mut().find(|s| s.id == id) {
            sender.pad = Some(pad.clone());
            sender.caps = Some(caps.clone());
            sender.kind = MediaKind::of_caps(&caps);
            sender.twcc_id = twcc_id;
            sender.timeline = clock_rate.map(Timeline::new);
        }
        drop(inner);
        let _ = pad.push_event(gst::event::StreamStart::new(&pad.name()));
        let _ = pad.push_event(gst::event::Caps::new(&caps));
        let _ = pad.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
            gst::ClockTime,
        >::new()));
        Ok(())
    }

    /// The shared stack carries Opus audio; its payloader's own numbering
    /// is replaced by the one negotiated.
    fn set_shared_sender_caps(
        self: &Arc<Self>,
        id: u64,
        caps: &gst::Caps,
    ) -> Result<(), gst::ErrorMessage> {
        let opus = caps.structure(0).is_some_and(|s| {
            s.get::<&str>("media") == Ok("audio")
                && s.get::<&str>("encoding-name")
                    .is_ok_and(|name| name.eq_ignore_ascii_case("OPUS"))
        });
        if !opus {
            return Err(gst::error_msg!(
                gst::CoreError::Negotiation,
                ("webrtc-stack=shared carries Opus audio only, not {caps}")
            ));
        }
        if let Some(sender) = self
            .inner
            .lock()
            .unwrap()
            .senders
            .iter_mut()
            .find(|s| s.id == id)
        {
            sender.caps = Some(caps.clone());
            sender.kind = MediaKind::Audio;
        }
        self.schedule_negotiation();
        Ok(())
    }

    /// Hands one RTP packet to the transport, in the caller's thread: no
    /// queue and no thread of its own per stream. Nothing goes before the
    /// connection is up (it would come out later as lasting delay).
    pub fn push(&self, id: u64, mut buffer: gst::Buffer) -> Result<(), CallEnd> {
        if let Some(end) = self.ended.lock().unwrap().clone() {
            return Err(end);
        }
        let bin = match &self.transport {
            Transport::Bin(bin) => bin,
            Transport::Shared(peer) => {
                if let (Some(peer), Ok(map)) = (peer.get(), buffer.map_readable())
                    && let Ok(packet) = rtp_types::RtpPacket::parse(map.as_slice())
                {
                    peer.send_frame(&packet);
                }
                return Ok(());
            }
        };
        if !self.connected.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some((source, timestamp, marker)) = source_and_timestamp(&buffer) else {
            return Ok(());
        };
        let arrival = std::time::Instant::now();
        let mut inner = self.inner.lock().unwrap();
        let Some(sender) = inner.senders.iter_mut().find(|s| s.id == id) else {
            return Ok(());
        };
        let timestamp = sender.timeline.as_mut().map_or(timestamp, |timeline| {
            timeline.place(source, timestamp, marker, arrival) as u32
        });
        let (Some(pad), payload_type, ssrc, twcc_id) = (
            sender.pad.clone(),
            sender.payload_type,
            sender.ssrc,
            sender.twcc_id,
        ) else {
            return Ok(());
        };
        drop(inner);
        let buffer_mut = buffer.make_mut();
        rewrite_header(buffer_mut, payload_type, ssrc, timestamp);
        if let Some(id) = twcc_id {
            congestion::add_twcc_extension(buffer_mut, id);
        }
        buffer_mut.set_pts(bin.pipeline.current_running_time());
        buffer_mut.set_dts(None::<gst::ClockTime>);
        let _ = pad.push(buffer);
        Ok(())
    }

    pub fn remove_sender(&self, id: u64) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(sender) = inner.senders.iter().find(|s| s.id == id)
            && let Some(pad) = &sender.pad
        {
            let _ = pad.push_event(gst::event::Eos::new());
        }
        inner.senders.retain(|s| s.id != id);
    }

    // ---- receivers (connectycubesrc) ------------------------------------

    pub fn add_receiver(
        self: &Arc<Self>,
        kind: MediaKind,
        max_playback_rate: u32,
        output: Arc<dyn ReceiverOutput>,
    ) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.next_receiver += 1;
        let id = inner.next_receiver;
        inner.receivers.push(Receiver {
            id,
            kind,
            max_playback_rate,
            output: output.clone(),
        });
        drop(inner);
        if let Some(end) = self.ended() {
            output.ended(&end);
        }
        self.schedule_negotiation();
        id
    }

    pub fn remove_receiver(&self, id: u64) {
        self.inner.lock().unwrap().receivers.retain(|r| r.id != id);
    }

    /// When a received packet arrived at webrtcbin's jitter buffer, as a
    /// time of `clock`; None when the call runs on another clock.
    pub fn capture_time(&self, sample: &gst::Sample, clock: &gst::Clock) -> Option<gst::ClockTime> {
        if self.bin()?.pipeline.clock().as_ref() != Some(clock) {
            return None;
        }
        sample
            .buffer()?
            .iter_meta::<gst::ReferenceTimestampMeta>()
            .find(|meta| meta.reference() == ARRIVAL.as_ref())
            .map(|meta| meta.timestamp())
    }

    fn on_incoming_pad(self: &Arc<Self>, pad: &gst::Pad) {
        if pad.direction() != gst::PadDirection::Src {
            return;
        }
        let caps = pad.current_caps();
        let keypad = caps.as_ref().is_some_and(|caps| is_keypad_events(caps));
        let kind = caps.map(|c| MediaKind::of_caps(&c)).unwrap_or_default();
        let callbacks = if keypad {
            gst::info!(CAT, obj = pad, "receiving the app's keypad");
            self.keypad_callbacks()
        } else {
            gst::info!(CAT, obj = pad, "receiving {kind:?}");
            self.media_callbacks(kind)
        };
        // Not clocked, no preroll: it starts at once, on its own, before it
        // joins the pipeline. Changing states from here (webrtcbin's
        // streaming thread) once it is a child could wait on a pipeline
        // that is stopping and waiting for this very thread.
        let appsink = gst_app::AppSink::builder()
            .sync(false)
            .async_(false)
            .callbacks(callbacks)
            .build();
        let Some(bin) = self.bin() else { return };
        let _ = appsink.set_state(gst::State::Playing);
        let _ = bin.pipeline.add(&appsink);
        let sink = appsink.static_pad("sink").unwrap();
        let _ = pad.link(&sink);
        if !keypad {
            self.inner.lock().unwrap().incoming.insert(kind, sink);
        }
    }

    /// Each sample of `kind` goes to the sources of that kind.
    fn media_callbacks(self: &Arc<Self>, kind: MediaKind) -> gst_app::AppSinkCallbacks {
        let weak = Arc::downgrade(self);
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(session) = weak.upgrade() {
                    let outputs: Vec<Arc<dyn ReceiverOutput>> = {
                        let inner = session.inner.lock().unwrap();
                        let receivers = inner.receivers.iter().filter(|r| r.kind == kind);
                        receivers.map(|r| r.output.clone()).collect()
                    };
                    for output in outputs {
                        output.deliver(&session, sample.clone());
                    }
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build()
    }

    /// The app's keypad digits (RFC 4733 events in its audio stream, on a
    /// pad of their own) go to the audio sources as the shared stack's do.
    fn keypad_callbacks(self: &Arc<Self>) -> gst_app::AppSinkCallbacks {
        let weak = Arc::downgrade(self);
        let detector = Mutex::new(dtmf::EventDetector::default());
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let clock_rate = sample
                    .caps()
                    .and_then(|caps| caps.structure(0).and_then(crate::clock_rate))
                    .filter(|rate| *rate > 0);
                let ended = sample
                    .buffer()
                    .and_then(|buffer| buffer.map_readable().ok())
                    .and_then(|map| {
                        let packet = rtp_types::RtpPacket::parse(map.as_slice()).ok()?;
                        let mut detector = detector.lock().unwrap();
                        detector.push(packet.timestamp(), packet.payload())
                    });
                if let (Some((digit, duration)), Some(rate), Some(session)) =
                    (ended, clock_rate, weak.upgrade())
                {
                    let duration_ms = u32::from(duration) * 1000 / rate;
                    session.on_peer_event(PeerEvent::Dtmf { digit, duration_ms });
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build()
    }

    /// Asks the peer for a key frame of what it sends as `kind`: the event
    /// goes up into webrtcbin, whose RTP session sends PLI/FIR. `false`
    /// when nothing of that kind arrives yet.
    pub fn request_key_frame(&self, kind: MediaKind, event: gst::Event) -> bool {
        let pad = self.inner.lock().unwrap().incoming.get(&kind).cloned();
        pad.is_some_and(|pad| pad.push_event(event))
    }

    // ---- negotiation ----------------------------------------------------

    /// Once every sender's caps reached webrtcbin, negotiation may begin. The
    /// application driving the signalling says when by asking for an offer
    /// or answer; the element's own signalling waits a short pause for the
    /// other streams of its pipeline, so that all of them are in the offer.
    fn schedule_negotiation(self: &Arc<Self>) {
        let mut inner = self.inner.lock().unwrap();
        // webrtcbin only offers streams whose caps reached its pad.
        let known = inner.senders.iter().all(|s| match &self.transport {
            Transport::Bin(_) => {
                let in_webrtcbin = s.pad.as_ref().and_then(|pad| pad.peer());
                in_webrtcbin.is_some_and(|pad| pad.current_caps().is_some())
            }
            Transport::Shared(_) => s.caps.is_some(),
        });
        self.streams_known.send_replace(known);
        if inner.negotiation_scheduled || !known || self.settings.signalling.is_none() {
            return;
        }
        inner.negotiation_scheduled = true;
        drop(inner);
        let weak = Arc::downgrade(self);
        crate::RUNTIME.spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Some(session) = weak.upgrade() {
                session.signal(signalling::Command::MediaReady);
            }
        });
    }

    /// Media we only receive needs a transceiver of its own in an offer
    /// (added once, before the first).
    fn add_receive_only_transceivers(&self) {
        let Some(bin) = self.bin() else { return };
        let mut inner = self.inner.lock().unwrap();
        if std::mem::replace(&mut inner.receive_only_added, true) {
            return;
        }
        let sending: Vec<MediaKind> = inner
            .senders
            .iter()
            .filter_map(|s| s.caps.as_ref().map(|c| MediaKind::of_caps(c)))
            .collect();
        let mut receiving: Vec<MediaKind> = Vec::new();
        for receiver in &inner.receivers {
            if !receiving.contains(&receiver.kind) {
                receiving.push(receiver.kind);
            }
        }
        for kind in &receiving {
            if !sending.contains(kind) {
                bin.webrtcbin.emit_by_name::<glib::Object>(
                    "add-transceiver",
                    &[
                        &gst_webrtc::WebRTCRTPTransceiverDirection::Recvonly,
                        &kind.receive_caps(),
                    ],
                );
            }
        }
    }

    /// Creates the local offer and waits for ICE gathering, so that every
    /// candidate is in the SDP (the SDK drops trickled ones before `accept`).
    pub(crate) async fn create_offer(self: &Arc<Self>) -> Result<String, String> {
        let offer = self.transport_offer().await?;
        Ok(self.as_announced(&offer))
    }

    /// Applies the remote offer and answers it.
    pub(crate) async fn answer(self: &Arc<Self>, offer_sdp: &str) -> Result<String, String> {
        let answer = self.transport_answer(offer_sdp).await?;
        self.follow_peer_playback_rate(offer_sdp);
        Ok(self.as_announced(&answer))
    }

    /// A local description as peers get it: with the rate we play audio
    /// at, and our candidates at the public address.
    fn as_announced(&self, sdp: &str) -> String {
        let sdp = opus_fmtp::with_max_playback_rate(sdp, self.max_playback_rate());
        match self.settings.public_address {
            Some(public) => ice::with_public_address(&sdp, public),
            None => sdp,
        }
    }

    /// The highest audio rate the sources play (full band unless one says less).
    fn max_playback_rate(&self) -> u32 {
        let inner = self.inner.lock().unwrap();
        let audio = inner
            .receivers
            .iter()
            .filter(|r| r.kind == MediaKind::Audio);
        audio
            .map(|r| r.max_playback_rate)
            .max()
            .unwrap_or(opus_fmtp::FULL_BAND_RATE)
    }

    /// The peer plays at no more than its `maxplaybackrate`: audio senders
    /// encode no more.
    fn follow_peer_playback_rate(&self, remote_sdp: &str) {
        let Some(rate) = opus_fmtp::max_playback_rate(remote_sdp) else {
            return;
        };
        for sender in self.audio_senders() {
            sender.max_playback_rate(rate);
        }
    }

    /// The peer's receiver reports `percent` of the audio lost: the audio
    /// senders' encoders add in-band FEC for it (held a while after the
    /// loss is gone: `LossReports`).
    fn on_reported_loss(&self, percent: u32) {
        let told = self
            .reported_loss
            .lock()
            .unwrap()
            .report(percent, std::time::Instant::now());
        if let Some(percent) = told {
            for sender in self.audio_senders() {
                sender.packet_loss(percent);
            }
        }
    }

    /// What steers each audio sender's encoder.
    fn audio_senders(&self) -> Vec<Arc<dyn SenderFeedback>> {
        let inner = self.inner.lock().unwrap();
        let audio = inner.senders.iter().filter(|s| s.kind == MediaKind::Audio);
        audio.map(|s| s.feedback.clone()).collect()
    }

    /// The SSRCs the audio senders' streams go out with.
    fn audio_ssrcs(&self) -> Vec<u32> {
        let inner = self.inner.lock().unwrap();
        let audio = inner.senders.iter().filter(|s| s.kind == MediaKind::Audio);
        audio.map(|s| s.ssrc).collect()
    }

    async fn transport_offer(self: &Arc<Self>) -> Result<String, String> {
        if let Some(peer) = self.shared_peer() {
            let (send, receive) = {
                let inner = self.inner.lock().unwrap();
                (!inner.senders.is_empty(), !inner.receivers.is_empty())
            };
            return peer.create_offer(send, receive).await;
        }
        let bin = self.bin().ok_or("the call has not started")?;
        self.add_receive_only_transceivers();
        let offer = bin.promise("create-offer", None).await?;
        let offer = offer
            .value("offer")
            .ok()
            .and_then(|v| v.get::<gst_webrtc::WebRTCSessionDescription>().ok())
            .ok_or("webrtcbin made no offer")?;
        bin.set_local(&with_keypad_events(&offer, &KEYPAD_EVENTS))
            .await
    }

    async fn transport_answer(self: &Arc<Self>, offer_sdp: &str) -> Result<String, String> {
        let offers_video = usable_description(offer_sdp)?
            .medias()
            .any(|m| m.media() == Some("video"));
        if let Some(peer) = self.shared_peer() {
            let answer = peer.answer(offer_sdp).await?;
            self.remote_description_set();
            return Ok(answer);
        }
        let bin = self.bin().ok_or("the call has not started")?;
        self.add_receive_only_transceivers();
        if offers_video {
            bin.answer_video_as_a_camera_that_is_off();
        }
        self.set_remote(gst_webrtc::WebRTCSDPType::Offer, offer_sdp)
            .await?;
        let answer = bin.promise("create-answer", None).await?;
        let answer = answer
            .value("answer")
            .ok()
            .and_then(|v| v.get::<gst_webrtc::WebRTCSessionDescription>().ok())
            .ok_or("webrtcbin made no answer")?;
        // The offer's own events: at Opus's clock if it has them.
        let mut offered = dtmf::event_payload_types(offer_sdp);
        offered.sort_by_key(|(_, rate)| std::cmp::Reverse(*rate));
        let answer = with_keypad_events(&answer, &offered[..offered.len().min(1)]);
        bin.set_local(&answer).await
    }

    pub(crate) async fn set_remote(
        self: &Arc<Self>,
        kind: gst_webrtc::WebRTCSDPType,
        sdp: &str,
    ) -> Result<(), String> {
        let message = usable_description(sdp)?;
        match &self.transport {
            Transport::Bin(bin) => {
                self.adopt_payload_types(&message);
                let description = gst_webrtc::WebRTCSessionDescription::new(kind, message);
                bin.promise("set-remote-description", Some(&description))
                    .await?;
            }
            Transport::Shared(peer) => {
                let peer = peer.get().ok_or("the call has not started")?;
                match kind {
                    gst_webrtc::WebRTCSDPType::Answer => peer.accept_answer(sdp).await?,
                    _ => return Err("webrtc-stack=shared takes an offer only to answer it".into()),
                }
            }
        }
        if kind == gst_webrtc::WebRTCSDPType::Answer {
            self.follow_peer_playback_rate(sdp);
        }
        self.remote_description_set();
        Ok(())
    }

    /// The candidates that came before the remote description go in now.
    fn remote_description_set(&self) {
        let early = {
            let mut inner = self.inner.lock().unwrap();
            inner.remote_description_set = true;
            std::mem::take(&mut inner.early_candidates)
        };
        for (mline, candidate) in early {
            self.add_candidate_now(mline, &candidate);
        }
    }

    /// A remote ICE candidate; held until the remote description is set.
    pub fn add_remote_candidate(&self, mline: u32, candidate: &str) {
        let mut inner = self.inner.lock().unwrap();
        if !inner.remote_description_set {
            inner.early_candidates.push((mline, candidate.to_owned()));
            return;
        }
        drop(inner);
        self.add_candidate_now(mline, candidate);
    }

    fn add_candidate_now(&self, mline: u32, candidate: &str) {
        match &self.transport {
            Transport::Bin(bin) => bin
                .webrtcbin
                .emit_by_name::<()>("add-ice-candidate", &[&mline, &candidate]),
            Transport::Shared(peer) => {
                if let Some(peer) = peer.get() {
                    peer.add_remote_candidate(candidate);
                }
            }
        }
    }

    /// When the peer numbered a codec differently from our payloader, rewrite
    /// the payload type of what we send (headers only, no transcoding).
    fn adopt_payload_types(&self, remote: &gst_sdp::SDPMessage) {
        let mut changed = Vec::new();
        let mut inner = self.inner.lock().unwrap();
        for sender in &mut inner.senders {
            let Some(caps) = sender.caps.clone() else {
                continue;
            };
            let Some(s) = caps.structure(0) else { continue };
            let (Ok(name), Ok(ours)) = (s.get::<&str>("encoding-name"), s.get::<i32>("payload"))
            else {
                continue;
            };
            let theirs = remote.medias().flat_map(|m| m.attributes()).find_map(|a| {
                let (pt, codec) = a.value()?.split_once(' ')?;
                (a.key() == "rtpmap" && codec.split('/').next()?.eq_ignore_ascii_case(name))
                    .then(|| pt.parse::<u8>().ok())
                    .flatten()
            });
            sender.payload_type = theirs.filter(|pt| i32::from(*pt) != ours);
            sender.twcc_id = congestion::remote_twcc_id(remote, sender.kind);
            let adopted = congestion::with_remote_twcc(&caps, sender.twcc_id);
            // webrtcbin answers an offer's media line with the stream whose
            // caps carry the offer's payload type (Firefox numbers Opus 109,
            // Chromium 111); any other stream it answers receive-only.
            let mut announced = adopted.clone();
            if let (Some(pt), Some(s)) =
                (sender.payload_type, announced.make_mut().structure_mut(0))
            {
                s.set("payload", i32::from(pt));
            }
            if adopted != caps || sender.payload_type.is_some() {
                sender.caps = Some(adopted);
                if let Some(pad) = &sender.pad {
                    changed.push((pad.clone(), announced));
                }
            }
        }
        drop(inner);
        // Now, not with the next packet: the answer webrtcbin is about to
        // make is built from the caps its pads hold.
        for (pad, caps) in changed {
            let _ = pad.push_event(gst::event::Caps::new(&caps));
        }
    }

    // ---- app-driven signalling (the application carries the SDP) --------

    pub fn add_description_listener(&self, id: u64, listener: DescriptionListener) {
        self.listeners.lock().unwrap().push((id, listener));
    }

    pub fn remove_description_listener(&self, id: u64) {
        self.listeners.lock().unwrap().retain(|(i, _)| *i != id);
    }

    fn emit_local_description(&self, kind: &str, sdp: &str) {
        for (_, listener) in self.listeners.lock().unwrap().iter() {
            listener(kind, sdp);
        }
    }

    async fn wait_streams_known(&self) {
        let mut known = self.streams_known.subscribe();
        let _ = known.wait_for(|known| *known).await;
    }

    /// Makes an offer once every stream is known; it comes back through the listeners.
    pub fn app_create_offer(self: &Arc<Self>) {
        let session = self.clone();
        crate::RUNTIME.spawn(async move {
            session.wait_streams_known().await;
            match session.create_offer().await {
                Ok(offer) => {
                    session.offered_to_app.store(true, Ordering::SeqCst);
                    session.emit_local_description("offer", &offer);
                }
                Err(e) => session.end(CallEnd::from(e)),
            }
        });
    }

    /// Applies the peer's offer (and answers it through the listeners) or answer.
    pub fn app_set_remote_description(self: &Arc<Self>, kind: &str, sdp: String) {
        let session = self.clone();
        let is_offer = kind.eq_ignore_ascii_case("offer");
        crate::RUNTIME.spawn(async move {
            session.wait_streams_known().await;
            let result = if is_offer {
                session
                    .answer(&sdp)
                    .await
                    .map(|answer| session.emit_local_description("answer", &answer))
            } else {
                session
                    .set_remote(gst_webrtc::WebRTCSDPType::Answer, &sdp)
                    .await
            };
            if let Err(e) = result {
                session.end(CallEnd::from(e));
            }
        });
    }

    // ---- end of call and statistics ------------------------------------

    /// Ends the call (remote hang-up, reject, timeout, ICE failure).
    pub fn end(&self, end: CallEnd) {
        let mut ended = self.ended.lock().unwrap();
        if ended.is_some() {
            return;
        }
        gst::info!(CAT, "call {} ended: {}", self.name, end.reason);
        *ended = Some(end.clone());
        drop(ended);
        let outputs: Vec<Arc<dyn ReceiverOutput>> = {
            let inner = self.inner.lock().unwrap();
            inner.receivers.iter().map(|r| r.output.clone()).collect()
        };
        for output in outputs {
            output.ended(&end);
        }
    }

    pub fn ended(&self) -> Option<CallEnd> {
        self.ended.lock().unwrap().clone()
    }

    pub fn stats(&self) -> gst::Structure {
        let ((connection, ice, dtls), summary) = match &self.transport {
            Transport::Bin(bin) => (
                bin.states(),
                self.last_stats.lock().unwrap().clone().map(|(_, s)| s),
            ),
            Transport::Shared(peer) => {
                let stats = peer.get().map(SharedPeer::stats).unwrap_or_default();
                let connection = match (stats.connected, stats.ice_state) {
                    (true, _) => "connected",
                    (false, "failed") => "failed",
                    (false, "new" | "") => "new",
                    (false, _) => "connecting",
                };
                let dtls = if stats.connected { "connected" } else { "new" };
                let summary = gst::Structure::builder("summary")
                    .field("packets-received", stats.packets_received)
                    .field("packets-lost", stats.packets_lost)
                    .field("bytes-received", stats.bytes_received)
                    .field("packets-sent", stats.packets_sent)
                    .field("bytes-sent", stats.bytes_sent)
                    .field("jitter-ms", stats.jitter_ms)
                    .field("rtt-ms", stats.rtt_ms)
                    .field("send-bitrate", stats.send_bitrate)
                    .field("receive-bitrate", stats.receive_bitrate)
                    .field("receive-audio-bandwidth", stats.receive_bandwidth)
                    .build();
                let states = (connection.into(), stats.ice_state.into(), dtls.into());
                (states, Some(summary))
            }
        };
        let mut stats = gst::Structure::builder("connectycube-stats")
            .field("session", &self.name)
            .field("connection-state", connection)
            .field("ice-connection-state", ice)
            .field("dtls-state", dtls)
            .field("ended", self.ended().map(|e| e.reason).unwrap_or_default())
            .field(
                "estimated-bitrate",
                self.estimated_bitrate.load(Ordering::Relaxed),
            )
            .build();
        for (name, value) in summary.iter().flat_map(|s| s.iter()) {
            stats.set_value(name, value.clone());
        }
        stats
    }

    /// Polls webrtcbin's statistics each second: the summary `stats`
    /// gives, and the audio loss the peer's receiver reports, passed on to
    /// the audio senders' encoders as the shared stack does.
    fn poll_stats(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        crate::RUNTIME.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(session) = weak.upgrade() else {
                    return;
                };
                let Some(bin) = session.bin() else { return };
                if let Ok(stats) = bin.promise_stats().await {
                    if let Some(percent) = reported_loss(&stats, &session.audio_ssrcs()) {
                        session.on_reported_loss(percent);
                    }
                    let now = std::time::Instant::now();
                    let mut summary = summarize_webrtc_stats(&stats);
                    let mut last = session.last_stats.lock().unwrap();
                    if let Some((then, previous)) = last.as_ref() {
                        add_bitrates(&mut summary, previous, now - *then);
                    }
                    *last = Some((now, summary));
                }
            }
        });
    }
}

impl Bin {
    /// Connection, ICE and DTLS states, as webrtcbin names them.
    fn states(&self) -> (String, String, String) {
        let name = |state: String| state.to_lowercase();
        (
            name(format!(
                "{:?}",
                self.webrtcbin
                    .property::<gst_webrtc::WebRTCPeerConnectionState>("connection-state")
            )),
            name(format!(
                "{:?}",
                self.webrtcbin
                    .property::<gst_webrtc::WebRTCICEConnectionState>("ice-connection-state")
            )),
            self.dtls_state(),
        )
    }

    /// The DTLS state of the (bundled) transport: "new" until negotiated.
    fn dtls_state(&self) -> String {
        let transport = self
            .webrtcbin
            .emit_by_name::<Option<gst_webrtc::WebRTCRTPTransceiver>>("get-transceiver", &[&0i32])
            .and_then(|t| t.property::<Option<gst_webrtc::WebRTCRTPSender>>("sender"))
            .and_then(|s| s.property::<Option<gst_webrtc::WebRTCDTLSTransport>>("transport"));
        transport.map_or_else(
            || "new".to_owned(),
            |t| {
                format!(
                    "{:?}",
                    t.property::<gst_webrtc::WebRTCDTLSTransportState>("state")
                )
                .to_lowercase()
            },
        )
    }

    async fn promise_stats(&self) -> Result<gst::Structure, String> {
        let (reply, replied) = tokio::sync::oneshot::channel();
        let reply = Mutex::new(Some(reply));
        let promise = gst::Promise::with_change_func(move |result| {
            if let (Ok(Some(s)), Some(reply)) = (result, reply.lock().unwrap().take()) {
                let _ = reply.send(s.to_owned());
            }
        });
        self.webrtcbin
            .emit_by_name::<()>("get-stats", &[&None::<gst::Pad>, &promise]);
        tokio::time::timeout(Duration::from_secs(2), replied)
            .await
            .map_err(|_| "no stats".to_owned())?
            .map_err(|_| "no stats".to_owned())
    }

    async fn set_local(
        &self,
        description: &gst_webrtc::WebRTCSessionDescription,
    ) -> Result<String, String> {
        self.promise("set-local-description", Some(description))
            .await?;
        let (done, gathered) = tokio::sync::oneshot::channel();
        let done = Mutex::new(Some(done));
        let handler =
            self.webrtcbin
                .connect_notify(Some("ice-gathering-state"), move |webrtcbin, _| {
                    if webrtcbin
                        .property::<gst_webrtc::WebRTCICEGatheringState>("ice-gathering-state")
                        == gst_webrtc::WebRTCICEGatheringState::Complete
                        && let Some(done) = done.lock().unwrap().take()
                    {
                        let _ = done.send(());
                    }
                });
        let complete = self
            .webrtcbin
            .property::<gst_webrtc::WebRTCICEGatheringState>("ice-gathering-state")
            == gst_webrtc::WebRTCICEGatheringState::Complete;
        if !complete {
            // Host candidates come at once; STUN/TURN may take a while.
            let _ = tokio::time::timeout(Duration::from_secs(5), gathered).await;
        }
        self.webrtcbin.disconnect(handler);
        let local = self
            .webrtcbin
            .property::<Option<gst_webrtc::WebRTCSessionDescription>>("local-description")
            .ok_or("no local description")?;
        let text = local.sdp().as_text().map_err(|e| e.to_string())?;
        Ok(with_trickle_option(&text))
    }

    async fn promise(
        &self,
        signal: &str,
        argument: Option<&gst_webrtc::WebRTCSessionDescription>,
    ) -> Result<gst::Structure, String> {
        let (reply, replied) = tokio::sync::oneshot::channel();
        let reply = Mutex::new(Some(reply));
        let promise = gst::Promise::with_change_func(move |result| {
            let value = match result {
                Ok(Some(s)) => Ok(s.to_owned()),
                Ok(None) => Ok(gst::Structure::new_empty("empty")),
                Err(e) => Err(format!("{e:?}")),
            };
            if let Some(reply) = reply.lock().unwrap().take() {
                let _ = reply.send(value);
            }
        });
        match argument {
            Some(description) => self
                .webrtcbin
                .emit_by_name::<()>(signal, &[description, &promise]),
            None => self
                .webrtcbin
                .emit_by_name::<()>(signal, &[&None::<gst::Structure>, &promise]),
        }
        let result = tokio::time::timeout(Duration::from_secs(10), replied)
            .await
            .map_err(|_| format!("webrtcbin did not answer {signal}"))?
            .map_err(|_| format!("{signal} was abandoned"))??;
        if let Ok(error) = result.get::<glib::Error>("error") {
            return Err(format!("{signal}: {error}"));
        }
        Ok(result)
    }
}

impl Drop for CallSession {
    fn drop(&mut self) {
        if let Some(commands) = self.signalling.lock().unwrap().take() {
            let _ = commands.send(signalling::Command::HangUp);
        }
        // The last reference may go on one of the pipeline's own streaming
        // threads (a sample being delivered as the elements let go), which
        // cannot wait for itself to stop: GStreamer's own thread does it.
        if let Some(bin) = self.bin() {
            bin.pipeline.call_async(|pipeline| {
                let _ = pipeline.set_state(gst::State::Null);
            });
        }
    }
}

/// The SSRC of what the shared stack hands the sources (they depayload it).
const RECEIVED_SSRC: u32 = 0x5eed_cafe;

/// The peer's SDP, parsed, if it describes media.
fn usable_description(sdp: &str) -> Result<gst_sdp::SDPMessage, String> {
    let message = gst_sdp::SDPMessage::parse_buffer(sdp.as_bytes())
        .map_err(|_| "the peer's SDP does not parse".to_owned())?;
    // GStreamer's parser skips lines it does not know: insist on media.
    if message.medias_len() == 0
        || message
            .medias()
            .any(|m| m.media().is_none() || m.formats_len() == 0)
    {
        return Err("the peer's SDP describes no usable media".to_owned());
    }
    Ok(message)
}

/// RTT, loss, jitter, bitrate and ICE state from webrtcbin's stats.
fn summarize_webrtc_stats(webrtc: &gst::Structure) -> gst::Structure {
    let (
        mut packets_received,
        mut packets_lost,
        mut bytes_received,
        mut bytes_sent,
        mut packets_sent,
    ) = (0u64, 0i64, 0u64, 0u64, 0u64);
    let (mut jitter, mut rtt) = (0f64, -1f64);
    for (_, value) in webrtc.iter() {
        let Ok(s) = value.get::<gst::Structure>() else {
            continue;
        };
        match s.get::<gst_webrtc::WebRTCStatsType>("type") {
            Ok(gst_webrtc::WebRTCStatsType::InboundRtp) => {
                packets_received += s.get::<u64>("packets-received").unwrap_or(0);
                packets_lost += s.get::<i64>("packets-lost").unwrap_or(0);
                bytes_received += s.get::<u64>("bytes-received").unwrap_or(0);
                jitter = jitter.max(s.get::<f64>("jitter").unwrap_or(0.0));
            }
            Ok(gst_webrtc::WebRTCStatsType::OutboundRtp) => {
                packets_sent += s.get::<u64>("packets-sent").unwrap_or(0);
                bytes_sent += s.get::<u64>("bytes-sent").unwrap_or(0);
            }
            Ok(gst_webrtc::WebRTCStatsType::RemoteInboundRtp) => {
                if let Ok(r) = s.get::<f64>("round-trip-time") {
                    rtt = r * 1000.0;
                }
            }
            _ => {}
        }
    }
    gst::Structure::builder("summary")
        .field("packets-received", packets_received)
        .field("packets-lost", packets_lost)
        .field("bytes-received", bytes_received)
        .field("packets-sent", packets_sent)
        .field("bytes-sent", bytes_sent)
        .field("jitter-ms", jitter * 1000.0)
        .field("rtt-ms", rtt)
        .build()
}

/// The loss (percent) the peer's last receiver report gives for the worst
/// of the streams going out with `ssrcs`, from webrtcbin's statistics;
/// `None` before any report.
fn reported_loss(webrtc: &gst::Structure, ssrcs: &[u32]) -> Option<u32> {
    webrtc
        .iter()
        .filter_map(|(_, value)| value.get::<gst::Structure>().ok())
        .filter(|s| {
            s.get::<gst_webrtc::WebRTCStatsType>("type")
                == Ok(gst_webrtc::WebRTCStatsType::RemoteInboundRtp)
                && s.get::<u32>("ssrc").is_ok_and(|ssrc| ssrcs.contains(&ssrc))
        })
        .filter_map(|s| s.get::<f64>("fraction-lost").ok())
        .map(congestion::loss_percent)
        .max()
}

/// `send-bitrate` and `receive-bitrate` (bit/s) over the `elapsed` time
/// since the `previous` summary.
fn add_bitrates(summary: &mut gst::Structure, previous: &gst::Structure, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    for (bytes, rate) in [
        ("bytes-sent", "send-bitrate"),
        ("bytes-received", "receive-bitrate"),
    ] {
        let now = summary.get::<u64>(bytes).unwrap_or(0);
        let before = previous.get::<u64>(bytes).unwrap_or(0);
        let bits_per_second = if seconds > 0.0 {
            (now.saturating_sub(before) * 8) as f64 / seconds
        } else {
            0.0
        };
        summary.set(rate, bits_per_second.round() as u64);
    }
}

/// Sets the SSRC and timestamp of an RTP packet, and its payload type when given.
fn rewrite_header(
    buffer: &mut gst::BufferRef,
    payload_type: Option<u8>,
    ssrc: u32,
    timestamp: u32,
) {
    if let Ok(mut map) = buffer.map_writable()
        && map.len() >= 12
    {
        if let Some(pt) = payload_type {
            map[1] = (map[1] & 0x80) | (pt & 0x7f);
        }
        map[4..8].copy_from_slice(&timestamp.to_be_bytes());
        map[8..12].copy_from_slice(&ssrc.to_be_bytes());
    }
}

/// The SSRC, timestamp and marker bit of an RTP packet's header.
fn source_and_timestamp(buffer: &gst::Buffer) -> Option<(u32, u32, bool)> {
    let map = buffer.map_readable().ok()?;
    let word = |at: usize| Some(u32::from_be_bytes(map.get(at..at + 4)?.try_into().ok()?));
    Some((word(8)?, word(4)?, map[1] & 0x80 != 0))
}

/// The SDK trickles candidates only to peers whose SDP says it can take them.
fn with_trickle_option(sdp: &str) -> String {
    if sdp.contains("a=ice-options:trickle") {
        return sdp.to_owned();
    }
    match sdp.find("\r\nm=") {
        Some(at) => format!("{}\r\na=ice-options:trickle{}", &sdp[..at], &sdp[at..]),
        None => format!("{sdp}a=ice-options:trickle\r\n"),
    }
}
/// Video caps announcing PLI and FIR feedback (`a=rtcp-fb`): a browser asks
/// for key frames only in ways the SDP names, and without them a decoder
/// that missed the first key frame would wait for the next periodic one.
fn with_key_frame_feedback(caps: &gst::Caps) -> gst::Caps {
    let mut caps = caps.clone();
    if let Some(s) = caps.make_mut().structure_mut(0)
        && s.get::<&str>("media") == Ok("video")
    {
        s.set("rtcp-fb-nack-pli", true);
        s.set("rtcp-fb-ccm-fir", true);
    }
    caps
}
