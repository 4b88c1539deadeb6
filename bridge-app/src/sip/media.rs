//! The media of one SIP call on `sipsrc`/`sipsink`: a port reserved before
//! the SDP is written, then a pipeline for the negotiated codec that either
//! plays one of the built-in services (echo, tone) or bridges to a WebRTC
//! leg (`connectycubesink`/`connectycubesrc`, Opus), transcoding unless the
//! phone speaks Opus too. Events a call reacts to — DTMF, RTP timeout, the
//! app leg's end, pipeline errors — come back on a channel.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use bridge_protocol::offer_answer::NegotiatedStream;
use bridge_protocol::sdp::Direction;
use gst::prelude::*;
use tokio::sync::mpsc;

use super::latency::{LatencyMeter, Percentiles};
use super::recorder::{Recorder, Track};

/// GStreamer elements that carry one audio codec between RTP and raw audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioChain {
    pub depayloader: &'static str,
    pub decoder: &'static str,
    pub encoder: &'static str,
    pub payloader: &'static str,
    /// The sample rate the encoder is fed at; one Opus takes natively
    /// too, so a call's audio is never resampled.
    pub encoder_rate: u32,
}

/// The chain for a codec of the table, by encoding name.
pub fn audio_chain(encoding_name: &str) -> Option<AudioChain> {
    let chain = |depayloader, decoder, encoder, payloader, encoder_rate| AudioChain {
        depayloader,
        decoder,
        encoder,
        payloader,
        encoder_rate,
    };
    Some(match encoding_name {
        "PCMU" => chain("rtppcmudepay", "mulawdec", "mulawenc", "rtppcmupay", 8000),
        "PCMA" => chain("rtppcmadepay", "alawdec", "alawenc", "rtppcmapay", 8000),
        "G722" => chain(
            "rtpg722depay",
            "avdec_g722",
            "avenc_g722",
            "rtpg722pay",
            16000,
        ),
        "G729" => chain("rtpg729depay", "g729dec", "g729enc", "rtpg729pay", 8000),
        // Opus straight from the phone's rate: no 48 kHz resample delay.
        "OPUS" => chain(
            "rtpopusdepay",
            "opusvoicedec",
            "opusvoiceenc",
            "rtpopuspay",
            16000,
        ),
        _ => return None,
    })
}

/// What carries the WebRTC leg of a call without video (one with video
/// always has a `webrtcbin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WebRtcStack {
    /// Peer connections on the threads all calls share (the elements'
    /// `webrtc-stack=shared`): a fraction of the cost; no TURN relay.
    #[default]
    Shared,
    /// A `webrtcbin` per call, with its own threads.
    Webrtcbin,
}

/// What the bridge plays into a call that ends at the bridge itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Service {
    /// The caller hears themself.
    Echo,
    /// The caller hears a sine tone of this frequency.
    Tone(f64),
}

/// What the SIP leg is connected to.
#[derive(Debug, Clone, PartialEq)]
pub enum Peer {
    Service(Service),
    /// A WebRTC leg in the call session of this name (app-driven signalling),
    /// both voices recorded when asked: to a WAV file, or with the video
    /// into the call's `Recorder`.
    App {
        session: String,
        record_to: Option<std::path::PathBuf>,
    },
}

/// Something the call's media reports.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaEvent {
    /// A digit from the phone.
    Dtmf {
        digit: char,
        duration_ms: u32,
    },
    /// A digit from the app's keypad, for the phone.
    AppDtmf {
        digit: char,
        duration_ms: u32,
    },
    RtpTimeout {
        silence_ms: u64,
    },
    /// Something downstream of the phone's video lost the picture.
    KeyFrameRequested,
    /// The WebRTC leg ended (ICE failure, closed connection).
    AppEnded {
        reason: String,
    },
    Failed(String),
}

/// What the WebRTC leg sends, announced before the phone's first packet:
/// phones are often silent until answered, and the app's offer cannot wait.
const OPUS_RTP_CAPS: &str = "application/x-rtp,media=(string)audio,clock-rate=(int)48000,encoding-name=(string)OPUS,payload=(int)111,encoding-params=(string)2";

/// Where the phone's media is, and its SRTP keys, for a `sipsrc`/`sipsink`
/// pair (the keys are set on the session the two share).
pub(super) fn configure_sip_pair(
    receiver: &gst::Element,
    sender: &gst::Element,
    stream: &NegotiatedStream,
) {
    let section = stream.media_section_text();
    // The sink learns the phone's telephone-event from it.
    sender.set_property("sdp", &section);
    receiver.set_property("sdp", section);
    if let Some(srtp) = &stream.srtp {
        receiver.set_property("srtp-send-key", srtp.send.to_string());
        receiver.set_property("srtp-receive-key", srtp.receive.to_string());
    }
}

/// Replaces what lies between `from` (a source pad) and `to` (a sink pad)
/// with `segment` (`None`: `from` is linked to `to`), once nothing passes
/// `from`: at once when idle, else just after the packet going through.
fn swap_segment(
    pipeline: &gst::Pipeline,
    from: gst::Pad,
    to: gst::Pad,
    segment: Option<gst::Element>,
) {
    let pipeline = pipeline.downgrade();
    let segment = Mutex::new(Some(segment));
    from.add_probe(gst::PadProbeType::IDLE, move |from, _| {
        let (Some(segment), Some(pipeline)) = (segment.lock().unwrap().take(), pipeline.upgrade())
        else {
            return gst::PadProbeReturn::Remove;
        };
        let mut old = Vec::new();
        let mut next = from.peer();
        while let Some(pad) = next.filter(|pad| pad != &to) {
            let Some(element) = pad.parent_element() else {
                break;
            };
            next = element.static_pad("src").and_then(|src| src.peer());
            old.push(element);
        }
        if let Some(peer) = from.peer() {
            let _ = from.unlink(&peer);
        }
        for element in old {
            let _ = element.set_state(gst::State::Null);
            let _ = pipeline.remove(&element);
        }
        // `from` still has the old codec's caps: the packets' new caps
        // come with the first of them.
        let link_from = |sink: &gst::Pad| from.link_full(sink, gst::PadLinkCheck::empty()).is_ok();
        let linked = match &segment {
            Some(segment) => {
                pipeline.add(segment).is_ok()
                    && segment
                        .static_pad("sink")
                        .is_some_and(|sink| link_from(&sink))
                    && segment
                        .static_pad("src")
                        .is_some_and(|src| src.link(&to).is_ok())
                    && segment.sync_state_with_parent().is_ok()
            }
            None => link_from(&to),
        };
        if !linked {
            gst::element_error!(
                pipeline,
                gst::CoreError::Negotiation,
                ["cannot link the new codec's elements"]
            );
        }
        gst::PadProbeReturn::Remove
    });
}

/// Raw audio to the phone's RTP: its codec's encoder at its own rate
/// (Opus in frames of the phone's ptime), then its payloader.
fn encode_for_phone(
    chain: &AudioChain,
    stream: &NegotiatedStream,
    config: &super::SipConfig,
) -> String {
    let ptime_ns = u64::from(stream.ptime) * 1_000_000;
    let pt = stream.format.payload_type;
    let encoder = match stream.codec.encoding_name {
        "OPUS" => format!(
            "opusvoiceenc frame-size={} complexity={}",
            opus_frame_size(stream.ptime),
            config.opus_complexity
        ),
        _ => chain.encoder.to_owned(),
    };
    format!(
        "audio/x-raw,rate={},channels=1 ! {encoder} ! {} pt={pt} min-ptime={ptime_ns} max-ptime={ptime_ns}",
        chain.encoder_rate, chain.payloader
    )
}

/// What lies between the phone's RTP and the app's (Opus) in a bridged
/// call: toward the app, then toward the phone (`None`: nothing). Opus
/// both ways passes as it is; any other codec is decoded and encoded at
/// the phone's own rate, with no resampler, whose delay would push the
/// audio off the packet grid and hold every packet for the next one.
/// The element named `to_app` holds the app's audio back while the phone
/// holds the call.
fn codec_segments(
    chain: &AudioChain,
    encode_for_phone: &str,
    config: &super::SipConfig,
) -> (String, Option<String>) {
    let opus_both_ways = chain.depayloader == "rtpopusdepay";
    if opus_both_ways {
        // Each leg numbers the packets by its own map: the WebRTC stack
        // for the app, `sipsink` by the phone's SDP.
        return ("valve name=to_app drop=false".to_owned(), None);
    }
    // Every phone codec's decoder gives 16-bit mono at the rate Opus is
    // fed at, and Opus is decoded to the phone encoder's rate.
    let raw = format!(
        "audio/x-raw,format=S16LE,rate={},channels=1",
        chain.encoder_rate
    );
    let encode_for_app = format!(
        "opusvoiceenc audio-type=generic complexity={} ! rtpopuspay pt=111",
        config.opus_complexity
    );
    let to_app = format!(
        "{} ! {} ! {raw} ! volume name=to_app ! {encode_for_app}",
        chain.depayloader, chain.decoder
    );
    let to_phone = format!("{APP_VOICE_DECODER} ! {encode_for_phone}");
    (to_app, Some(to_phone))
}

/// The app's Opus RTP to raw audio at the rate downstream asks for.
const APP_VOICE_DECODER: &str = "rtpopusdepay ! opusvoicedec plc=true";

/// The phone's RTP in `chain`'s codec to raw audio, for a recording.
fn phone_voice_decoder(chain: &AudioChain) -> String {
    match chain.depayloader {
        "rtpopusdepay" => APP_VOICE_DECODER.to_owned(),
        depayloader => format!("{depayloader} ! {}", chain.decoder),
    }
}

/// The elements of the common calls' pipelines, loaded before the first call.
pub const COMMON_ELEMENTS: &[&str] = &[
    "sipsrc",
    "sipsink",
    "connectycubesink",
    "connectycubesrc",
    "rtppcmudepay",
    "rtppcmupay",
    "mulawdec",
    "mulawenc",
    "audioconvert",
    "audioresample",
    "volume",
    "valve",
    "opusvoiceenc",
    "opusvoicedec",
    "rtpopuspay",
    "rtpopusdepay",
];

/// `opusvoiceenc complexity` unless configured. Voice that came through a
/// phone codec loses nothing measurable below the top of the range, and the
/// encoder is most of a transcoded call's CPU: at 0, in the CELT mode the
/// bridge's encoder codes voice in (`audio-type=generic`), an encode costs
/// three quarters of what it does at 1 and under half of 5, with the
/// spectrum as close, and 60 % of SILK's at 1 (`cargo bench --bench
/// opus_complexity`).
pub const DEFAULT_OPUS_COMPLEXITY: u32 = 0;

/// Seconds without RTP before a call is ended.
pub const DEFAULT_RTP_TIMEOUT_MS: u32 = 30_000;

/// A reserved RTP/RTCP port pair; the call's pipeline joins it by session name.
pub struct PortReservation {
    session: String,
    holder: gst::Element,
    pub port: u16,
    pub address: IpAddr,
}

impl PortReservation {
    pub fn new(address: IpAddr) -> anyhow::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let session = format!("sip-call-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let holder = gst::ElementFactory::make("sipsink")
            .property("session", &session)
            .property("local-address", address.to_string())
            .build()
            .context("the sipcc plugin is not registered")?;
        holder
            .set_state(gst::State::Ready)
            .map_err(|_| anyhow!("no free RTP port on {address}"))?;
        let port = holder.property::<u32>("local-port") as u16;
        Ok(Self {
            session,
            holder,
            port,
            address,
        })
    }
}

impl PortReservation {
    /// The media session name the call's pipeline joins.
    pub fn session(&self) -> &str {
        &self.session
    }
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        let _ = self.holder.set_state(gst::State::Null);
    }
}

/// A running call pipeline.
pub struct CallMedia {
    pipeline: gst::Pipeline,
    app: Option<gst::Element>,
    /// Mutes (a `volume`) or stops (a `valve`) what goes to the app while
    /// the phone holds the call.
    to_app: Option<gst::Element>,
    /// Where both voices are recorded; finalized by `stop`.
    recording: Option<std::path::PathBuf>,
    /// Set when the pipeline has drained after `stop`'s EOS.
    drained: Drained,
    receiver: gst::Element,
    sender: gst::Element,
    valve: gst::Element,
    /// Where a bridged call's codec lies, for a codec switch.
    segments: Option<CodecSegments>,
    codec: &'static str,
    /// How long the bridge holds the audio, toward the app and toward the phone.
    latency: (LatencyMeter, LatencyMeter),
    /// The phone's silence is timed only while its RTP is due: once the
    /// call is answered (phones send nothing before) and while it is not
    /// on hold (desk phones often send nothing then).
    answered: AtomicBool,
    held: AtomicBool,
    rtp_timeout_ms: u32,
}

/// Where the elements of a bridged call's phone codec lie, each span from a
/// source pad to a sink pad.
struct CodecSegments {
    /// Toward the app: to the app's sink.
    phone_out: gst::Pad,
    /// Toward the phone: to the hold valve.
    app_out: gst::Pad,
    /// The phone's voice decoded for a recording.
    phone_voice: Option<(gst::Pad, gst::Pad)>,
}

impl CodecSegments {
    /// The spans in a call's `pipeline` (`None`: no app, a service).
    fn of(pipeline: &gst::Pipeline, receiver: &gst::Element) -> Option<Self> {
        let pad = |element: &str, name| pipeline.by_name(element)?.static_pad(name);
        let recorded = pipeline.by_name("phone_out").is_some();
        let (phone_out, app_out) = if recorded {
            (pad("phone_out", "src")?, pad("app_out", "src")?)
        } else {
            (receiver.static_pad("src")?, pad("app_src", "src")?)
        };
        let phone_voice = pad("phone_voice", "src").zip(pad("phone_voice_raw", "sink"));
        Some(CodecSegments {
            phone_out,
            app_out,
            phone_voice,
        })
    }
}

/// Bridge-added latency of a call's audio in each direction, in ms.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AudioLatency {
    pub to_app: Option<Percentiles>,
    pub to_phone: Option<Percentiles>,
}

impl CallMedia {
    /// Starts the media of `stream` on the reserved port, toward `peer`.
    /// The configured WebRTC stack carries the app leg unless the call has
    /// video (`recorder` set, or `with_video`), which needs a `webrtcbin`.
    pub fn start(
        reservation: &PortReservation,
        stream: &NegotiatedStream,
        peer: &Peer,
        config: &super::SipConfig,
        events: mpsc::UnboundedSender<MediaEvent>,
        recorder: Option<&Arc<Recorder>>,
        with_video: bool,
    ) -> anyhow::Result<Self> {
        let jitter_ms = config.jitter_buffer.as_millis();
        let stack = match config.webrtc_stack {
            WebRtcStack::Shared if !with_video && recorder.is_none() => "shared",
            _ => "webrtcbin",
        };
        let codec = stream.codec.encoding_name;
        let chain = audio_chain(codec).with_context(|| format!("no audio chain for {codec}"))?;
        let session = &reservation.session;
        let address = reservation.address;
        // The phone's audio is received on the plugin's shared threads:
        // nothing downstream of it here blocks (see `to_phone`).
        let receiver = format!(
            "sipsrc name=rx session={session} local-address={address} timeout=0 stats-interval=0 latency={jitter_ms} shared-threads=true"
        );
        // Every source here is live and paced by its sender: packets go on
        // as they come, never held for the clock (which would also hold the
        // shared WebRTC stack's threads that push them).
        let to_phone = format!(
            "valve name=hold drop=false ! sipsink name=tx session={session} local-address={address} sync=false"
        );
        let encode_for_phone = encode_for_phone(&chain, stream, config);
        let description = match peer {
            Peer::Service(Service::Echo) => format!(
                "{receiver} ! {} ! {} ! audioconvert ! audioresample ! {encode_for_phone} ! {to_phone}",
                chain.depayloader, chain.decoder
            ),
            Peer::Service(Service::Tone(frequency)) => format!(
                "{receiver} ! fakesink sync=false async=false \
                 audiotestsrc is-live=true freq={frequency} volume=0.4 ! audioconvert ! audioresample \
                   ! {encode_for_phone} ! {to_phone}"
            ),
            Peer::App {
                session: app,
                record_to,
            } => {
                let nat = nat_properties(config);
                let app_sink = format!(
                    "connectycubesink name=app session={app} webrtc-stack={stack}{nat} caps=\"{OPUS_RTP_CAPS}\""
                );
                // The app's voice is played at the phone's rate: it need send no
                // more (saving its bandwidth and our decoding).
                let playback_rate = match codec {
                    "OPUS" => bridge_protocol::opus_fmtp::FULL_BAND_RATE,
                    _ => chain.encoder_rate,
                };
                let app_src = format!(
                    "connectycubesrc name=app_src session={app} webrtc-stack={stack}{nat} media=audio max-playback-rate={playback_rate}"
                );
                let (to_app, to_phone_codec) = codec_segments(&chain, &encode_for_phone, config);
                let to_phone_codec = to_phone_codec
                    .map(|segment| format!(" ! {segment}"))
                    .unwrap_or_default();
                // The mixer resamples nothing: its output is fixed to what
                // both voices are converted to. A video call's recorder takes
                // the mix; otherwise it goes to a WAV file.
                let mix =
                    "audiomixer name=recorder ! audio/x-raw,format=S16LE,rate=16000,channels=1";
                let recording = match (record_to, recorder) {
                    (Some(_), Some(_)) => Some(format!(
                        "{mix} ! appsink name=voices sync=false async=false"
                    )),
                    (Some(path), None) => Some(format!(
                        "{mix} ! wavenc ! filesink location=\"{}\"",
                        path.display()
                    )),
                    (None, _) => None,
                };
                match recording {
                    None => format!(
                        "{receiver} ! {to_app} ! {app_sink} {app_src}{to_phone_codec} ! {to_phone}"
                    ),
                    // Each leg's RTP is split before any codec's elements,
                    // and decoded for the recording on its own, so that a
                    // codec switch swaps the same segments as in a call not
                    // recorded, and the phone's decoder for the recording.
                    Some(recording) => {
                        let to_mix = "audioresample \
                            ! audio/x-raw,format=S16LE,rate=16000,channels=1 ! recorder.";
                        format!(
                            "{receiver} ! tee name=from_phone ! queue name=phone_out ! {to_app} ! {app_sink} \
                             {app_src} ! tee name=from_app ! queue name=app_out{to_phone_codec} ! {to_phone} \
                             from_phone. ! queue name=phone_voice ! {} ! audioconvert name=phone_voice_raw ! {to_mix} \
                             from_app. ! queue ! {APP_VOICE_DECODER} ! audioconvert ! {to_mix} {recording}",
                            phone_voice_decoder(&chain)
                        )
                    }
                }
            }
        };
        tracing::debug!("call pipeline: {description}");
        let pipeline = gst::parse::launch(&description)
            .with_context(|| format!("cannot build the {codec} pipeline"))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow!("not a pipeline"))?;
        set_relay(&pipeline, config);
        let by_name = |name: &str| {
            pipeline
                .by_name(name)
                .with_context(|| format!("pipeline lacks {name}"))
        };
        let (receiver, sender, valve) = (by_name("rx")?, by_name("tx")?, by_name("hold")?);
        let media = Self {
            app: pipeline.by_name("app"),
            to_app: pipeline.by_name("to_app"),
            segments: CodecSegments::of(&pipeline, &receiver),
            recording: match peer {
                Peer::App { record_to, .. } if recorder.is_none() => record_to.clone(),
                _ => None,
            },
            drained: Drained::default(),
            pipeline,
            receiver,
            sender,
            valve,
            codec,
            latency: Default::default(),
            answered: AtomicBool::new(false),
            held: AtomicBool::new(false),
            rtp_timeout_ms: u32::try_from(config.rtp_timeout.as_millis()).unwrap_or(u32::MAX),
        };
        if let Some(app) = &media.app {
            media.latency.0.watch(&app.static_pad("sink").unwrap());
            media
                .latency
                .1
                .watch(&media.sender.static_pad("sink").unwrap());
        }
        if let (Some(recorder), Some(voices)) = (
            recorder,
            media
                .pipeline
                .by_name("voices")
                .and_downcast::<gst_app::AppSink>(),
        ) {
            recorder.feed(&voices, Track::Voices);
        }
        media.set_peer(stream);
        media.set_direction(stream);
        media.watch_bus(events);
        media
            .pipeline
            .set_state(gst::State::Playing)
            .map_err(|_| anyhow!("the {codec} pipeline did not start"))?;
        Ok(media)
    }

    /// The `connectycubesink` of a bridged call, for its signalling.
    pub fn app_element(&self) -> Option<&gst::Element> {
        self.app.as_ref()
    }

    /// The WebRTC leg's peer-connection state (`new`, `connecting`,
    /// `connected`, `failed`, …), for a bridged call.
    pub fn app_connection_state(&self) -> Option<String> {
        let stats = self.app.as_ref()?.property::<gst::Structure>("stats");
        Some(stats.get::<String>("connection-state").unwrap_or_default())
    }

    /// The audio bandwidth of what the app sends (as the shared WebRTC
    /// stack reads it from the Opus packets).
    pub fn app_audio_bandwidth(&self) -> Option<String> {
        let stats = self.app.as_ref()?.property::<gst::Structure>("stats");
        stats
            .get::<String>("receive-audio-bandwidth")
            .ok()
            .filter(|b| !b.is_empty())
    }

    /// Whether audio is decoded and encoded again on its way through.
    pub fn transcoding(&self) -> bool {
        !(self.app.is_some() && self.codec == "OPUS")
    }

    pub fn codec(&self) -> &'static str {
        self.codec
    }

    /// Applies a renegotiated stream of the same codec: a new remote address
    /// or port, and hold (nothing is sent while the phone does not receive).
    pub fn update(&self, stream: &NegotiatedStream) {
        self.set_peer(stream);
        self.set_direction(stream);
    }

    fn set_peer(&self, stream: &NegotiatedStream) {
        configure_sip_pair(&self.receiver, &self.sender, stream);
    }

    /// Nothing goes to a phone that does not receive; while the phone holds
    /// the call (sendonly or inactive), the app hears silence (transcoded:
    /// muted, so its decoder does not conceal a gap) or nothing (Opus passed
    /// through).
    fn set_direction(&self, stream: &NegotiatedStream) {
        self.valve.set_property("drop", !stream.we_send());
        let held = stream.direction != Direction::SendRecv;
        if let Some(to_app) = &self.to_app {
            match to_app.find_property("mute") {
                Some(_) => to_app.set_property("mute", held),
                None => to_app.set_property("drop", held),
            }
        }
        self.held.store(held, Ordering::Relaxed);
        self.time_silence();
    }

    /// Nothing goes to the phone until the next [`Self::update`] (its
    /// answer) lets it: the phone plays early media and has not answered.
    pub fn keep_app_audio_from_phone(&self) {
        self.valve.set_property("drop", true);
    }

    /// The phone's dialog is answered: its RTP is due from now on.
    pub fn set_answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
        self.time_silence();
    }

    /// Sets `sipsrc`'s RTP timeout while the phone's RTP is due, none
    /// otherwise; setting it starts the count anew, so only a change does.
    fn time_silence(&self) {
        let due = self.answered.load(Ordering::Relaxed) && !self.held.load(Ordering::Relaxed);
        let timeout = if due { self.rtp_timeout_ms } else { 0 };
        if self.receiver.property::<u32>("timeout") != timeout {
            self.receiver.set_property("timeout", timeout);
        }
    }

    /// Whether [`Self::switch_codec`] can: a bridged call.
    pub fn can_switch_codec(&self) -> bool {
        self.segments.is_some()
    }

    /// Moves a bridged call to another phone codec, its WebRTC leg as it
    /// is: for a phone that takes the call over (a transfer's target) and
    /// does not speak the call's codec. The elements between the phone's
    /// RTP and the app's are swapped, each way once no packet passes, and
    /// the phone's decoder for a recording. `Ok(false)`: this call's media
    /// cannot (a service).
    pub fn switch_codec(
        &mut self,
        stream: &NegotiatedStream,
        config: &super::SipConfig,
    ) -> anyhow::Result<bool> {
        let (Some(app), Some(segments)) = (&self.app, &self.segments) else {
            return Ok(false);
        };
        let codec = stream.codec.encoding_name;
        let chain = audio_chain(codec).with_context(|| format!("no audio chain for {codec}"))?;
        let encode = encode_for_phone(&chain, stream, config);
        let (to_app, to_phone) = codec_segments(&chain, &encode, config);
        let bin = |description: &str| {
            gst::parse::bin_from_description(description, true)
                .with_context(|| format!("cannot build {description}"))
        };
        let to_app = bin(&to_app)?;
        let to_phone = to_phone.as_deref().map(bin).transpose()?;
        let phone_voice = match &segments.phone_voice {
            Some(_) => Some(bin(&phone_voice_decoder(&chain))?),
            None => None,
        };
        // The phone's packets are of the new codec from now on.
        self.set_peer(stream);
        let app_sink = app.static_pad("sink").expect("a static pad");
        let hold = self.valve.static_pad("sink").expect("a static pad");
        swap_segment(
            &self.pipeline,
            segments.phone_out.clone(),
            app_sink,
            Some(to_app.clone().upcast()),
        );
        swap_segment(
            &self.pipeline,
            segments.app_out.clone(),
            hold,
            to_phone.map(|bin| bin.upcast()),
        );
        if let (Some((from, to)), Some(decoder)) = (&segments.phone_voice, phone_voice) {
            swap_segment(
                &self.pipeline,
                from.clone(),
                to.clone(),
                Some(decoder.upcast()),
            );
        }
        self.to_app = to_app.by_name("to_app");
        self.codec = codec;
        self.set_direction(stream);
        Ok(true)
    }

    /// Sends a digit to the phone as RFC 4733 events; `false` when the
    /// phone did not negotiate telephone-event.
    pub fn send_dtmf(&self, digit: char, duration_ms: u32) -> bool {
        self.sender
            .emit_by_name::<bool>("send-dtmf", &[&digit.to_string(), &duration_ms])
    }

    /// The `sipsrc` of the SIP leg, whose `stats` describe its RTP.
    pub fn rtp_element(&self) -> &gst::Element {
        &self.receiver
    }

    /// Bridge-added latency so far; none for a call with a built-in service.
    pub fn latency(&self) -> Option<AudioLatency> {
        self.app.as_ref()?;
        Some(AudioLatency {
            to_app: self.latency.0.percentiles(),
            to_phone: self.latency.1.percentiles(),
        })
    }

    /// RTP statistics of the SIP leg (`sipsrc`'s `stats`).
    pub fn stats(&self) -> gst::Structure {
        self.receiver.property::<gst::Structure>("stats")
    }

    /// Sends RTCP BYE, finalizes the recording (waiting up to 3 s for it to
    /// drain) and stops.
    pub fn stop(&self) {
        if self.recording.is_some() {
            self.pipeline.send_event(gst::event::Eos::new());
            self.drained.wait(Duration::from_secs(3));
        } else {
            self.sender.send_event(gst::event::Eos::new());
        }
        let _ = self.pipeline.set_state(gst::State::Null);
    }

    /// The recording's file, if this call is recorded.
    pub fn recording(&self) -> Option<&std::path::Path> {
        self.recording.as_deref()
    }

    fn watch_bus(&self, events: mpsc::UnboundedSender<MediaEvent>) {
        let bus = self.pipeline.bus().expect("a pipeline has a bus");
        let drained = self.drained.clone();
        bus.set_sync_handler(move |_, message| {
            let event = match message.view() {
                gst::MessageView::Eos(_) => {
                    drained.set();
                    None
                }
                gst::MessageView::Element(element) => {
                    element.structure().and_then(|s| match s.name().as_str() {
                        "sip-dtmf" => dtmf_digit(s)
                            .map(|(digit, duration_ms)| MediaEvent::Dtmf { digit, duration_ms }),
                        "connectycube-dtmf" => dtmf_digit(s)
                            .map(|(digit, duration_ms)| MediaEvent::AppDtmf { digit, duration_ms }),
                        "sip-rtp-timeout" => Some(MediaEvent::RtpTimeout {
                            silence_ms: s.get::<u64>("silence-ms").unwrap_or(0),
                        }),
                        "connectycube-call-ended" => Some(MediaEvent::AppEnded {
                            reason: s.get::<String>("reason").unwrap_or_default(),
                        }),
                        _ => None,
                    })
                }
                gst::MessageView::Error(error) => Some(MediaEvent::Failed(format!(
                    "{} ({:?})",
                    error.error(),
                    error.debug()
                ))),
                _ => None,
            };
            if let Some(event) = event {
                let _ = events.send(event);
            }
            gst::BusSyncReply::Drop
        });
    }
}

/// The digit and its length in a `sip-dtmf` or `connectycube-dtmf` message.
fn dtmf_digit(s: &gst::StructureRef) -> Option<(char, u32)> {
    let digit = s.get::<String>("digit").ok()?.chars().next()?;
    Some((digit, s.get::<u32>("duration-ms").unwrap_or(0)))
}

/// Set once a pipeline's EOS has reached its sinks (its files are written);
/// whoever ended it waits for that, for a bounded time.
#[derive(Clone, Default)]
pub(super) struct Drained(Arc<(Mutex<bool>, Condvar)>);

impl Drained {
    /// Called on the pipeline's EOS message.
    pub(super) fn set(&self) {
        let (done, notify) = &*self.0;
        *done.lock().unwrap() = true;
        notify.notify_all();
    }

    /// Waits for the EOS, at most `limit`.
    pub(super) fn wait(&self, limit: Duration) {
        let (done, notify) = &*self.0;
        let guard = done.lock().unwrap();
        let _ = notify.wait_timeout_while(guard, limit, |done| !*done);
    }
}

impl Drop for CallMedia {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// The app elements' properties for a bridge behind NAT: apps reach our
/// WebRTC ports at the bridge's public address too, or at what the STUN
/// server says.
pub(super) fn nat_properties(config: &super::SipConfig) -> String {
    let mut properties = String::new();
    if let Some(address) = config.public_address {
        properties.push_str(&format!(" public-address={address}"));
    }
    if let Some(server) = &config.stun_server {
        properties.push_str(&format!(" stun-server=\"{server}\""));
    }
    properties
}

/// Sets the TURN server on the app elements of `pipeline`, not in its
/// description, which is logged: the URL holds a password.
pub(super) fn set_relay(pipeline: &gst::Pipeline, config: &super::SipConfig) {
    let Some(server) = &config.turn_server else {
        return;
    };
    let policy = if config.relay_only { "relay" } else { "all" };
    for element in pipeline.iterate_recurse().into_iter().flatten() {
        let app_element = element
            .factory()
            .is_some_and(|f| f.name().starts_with("connectycube"));
        if app_element {
            element.set_property("turn-server", server.url());
            element.set_property_from_str("ice-transport-policy", policy);
            if let Some(path) = &config.turn_ca_file {
                element.set_property("turn-ca-file", path.to_str());
            }
        }
    }
}

/// The Opus frame size (ms) closest to the negotiated ptime.
fn opus_frame_size(ptime: u32) -> u32 {
    [10, 20, 40, 60]
        .into_iter()
        .min_by_key(|size: &u32| size.abs_diff(ptime))
        .unwrap_or(20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_audio_codec_of_the_table_has_a_chain() {
        for codec in bridge_protocol::codec::CODECS {
            if codec.kind == bridge_protocol::codec::MediaKind::Audio
                && codec.encoding_name != "TELEPHONE-EVENT"
            {
                let chain = audio_chain(codec.encoding_name)
                    .unwrap_or_else(|| panic!("{}", codec.encoding_name));
                assert!(
                    [8000, 12000, 16000, 24000, 48000].contains(&chain.encoder_rate),
                    "Opus cannot take {}'s {} Hz",
                    codec.encoding_name,
                    chain.encoder_rate
                );
            }
        }
    }

    #[test]
    fn opus_frames_follow_ptime() {
        assert_eq!(opus_frame_size(20), 20);
        assert_eq!(opus_frame_size(30), 20);
        assert_eq!(opus_frame_size(60), 60);
        assert_eq!(opus_frame_size(10), 10);
    }
}
