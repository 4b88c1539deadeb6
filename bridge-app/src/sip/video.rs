//! The video of a bridged call: H.264 from the phone to the app as VP8
//! (decoded and encoded again) or as H.264 (passed through, new RTP headers
//! only), and the app's video back to the phone as H.264. Its own pipeline
//! beside the audio one, joined to the same WebRTC call by session name.
//! Encoders are ranked hardware first, software last; the first one this
//! machine has is used and logged.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use bridge_protocol::h264;
use bridge_protocol::offer_answer::NegotiatedStream;
use bridge_protocol::sdp::Direction;
use gst::prelude::*;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::media::{MediaEvent, PortReservation, configure_sip_pair};
use super::recorder::{Recorder, Track};

/// Whether phones' video reaches the app, and in which codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AppVideoCodec {
    /// Video offered by phones is refused (port 0); calls are audio only.
    Off,
    /// Every WebRTC app decodes it; the phone's H.264 is transcoded.
    #[default]
    Vp8,
    /// The phone's H.264 passes through untouched.
    H264,
}

impl AppVideoCodec {
    /// The RTP encoding name on the WebRTC leg (`None` when off).
    pub fn encoding_name(self) -> Option<&'static str> {
        match self {
            AppVideoCodec::Off => None,
            AppVideoCodec::Vp8 => Some("VP8"),
            AppVideoCodec::H264 => Some("H264"),
        }
    }
}

/// An encoder and the settings that make it fit for a live call (low
/// latency, a key frame at least every two seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoder {
    pub factory: &'static str,
    settings: &'static str,
    /// Its bitrate property, and how many bit/s its unit is.
    bitrate: (&'static str, u32),
    /// Caps its output is held to (empty: none).
    output: &'static str,
}

const fn encoder(
    factory: &'static str,
    settings: &'static str,
    bitrate: (&'static str, u32),
    output: &'static str,
) -> Encoder {
    Encoder {
        factory,
        settings,
        bitrate,
        output,
    }
}

/// A modest bitrate for a call's picture, unless the phone's level allows less.
pub const VIDEO_KBPS: u32 = 1000;

impl Encoder {
    /// The encoder in a launch description, at `kbps`.
    pub fn launch(&self, kbps: u32) -> String {
        let (property, unit) = self.bitrate;
        let output = match self.output {
            "" => String::new(),
            caps => format!(" ! {caps}"),
        };
        format!(
            "{} {} {property}={}{output}",
            self.factory,
            self.settings,
            u64::from(kbps) * 1000 / u64::from(unit)
        )
    }
}

const KBIT: (&str, u32) = ("bitrate", 1000);

/// H.264 toward phones, best first: VA-API, VideoToolbox, NVENC, then
/// openh264 (constrained baseline, what desk phones decode) and x264.
pub const H264_ENCODERS: &[Encoder] = &[
    encoder("vah264enc", "key-int-max=60 b-frames=0", KBIT, ""),
    encoder("vaapih264enc", "keyframe-period=60 max-bframes=0", KBIT, ""),
    encoder(
        "vtenc_h264_hw",
        "realtime=true allow-frame-reordering=false max-keyframe-interval=60",
        KBIT,
        "",
    ),
    encoder(
        "nvh264enc",
        "gop-size=60 zerolatency=true bframes=0",
        KBIT,
        "",
    ),
    encoder(
        "openh264enc",
        "gop-size=60 complexity=low",
        ("bitrate", 1),
        "",
    ),
    encoder(
        "x264enc",
        "tune=zerolatency speed-preset=ultrafast key-int-max=60",
        KBIT,
        "video/x-h264,profile=constrained-baseline",
    ),
];

/// H.264 toward a phone that takes each NAL unit in a packet of its own
/// (packetization mode 0): only x264 bounds its slices in bytes.
const SINGLE_NAL_H264_ENCODER: Encoder = encoder(
    "x264enc",
    "tune=zerolatency speed-preset=ultrafast key-int-max=60 option-string=slice-max-size=1100",
    KBIT,
    "video/x-h264,profile=constrained-baseline",
);

/// VP8 toward apps, best first.
pub const VP8_ENCODERS: &[Encoder] = &[
    encoder("vavp8enc", "key-int-max=60", KBIT, ""),
    encoder("vaapivp8enc", "keyframe-period=60", KBIT, ""),
    encoder(
        "vp8enc",
        "deadline=1 cpu-used=8 keyframe-max-dist=60 error-resilient=partitions",
        ("target-bitrate", 1),
        "",
    ),
];

/// The first encoder of `ranked` that `available` knows.
pub fn first_available(
    ranked: &'static [Encoder],
    available: impl Fn(&str) -> bool,
) -> Option<&'static Encoder> {
    ranked.iter().find(|e| available(e.factory))
}

/// The best encoder of `ranked` installed here.
fn installed(ranked: &'static [Encoder]) -> anyhow::Result<&'static Encoder> {
    first_available(ranked, |name| gst::ElementFactory::find(name).is_some())
        .with_context(|| format!("no video encoder installed (tried {})", names(ranked)))
}

fn names(ranked: &[Encoder]) -> String {
    ranked
        .iter()
        .map(|e| e.factory)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The elements of this machine's video calls toward apps in `codec`, for
/// loading before the first call: libav's, libvpx's and openh264's
/// libraries took that call 70–300 ms to load.
pub fn elements(codec: AppVideoCodec) -> Vec<&'static str> {
    let passing = ["rtph264depay", "h264parse", "rtph264pay"];
    match codec {
        AppVideoCodec::Off => Vec::new(),
        AppVideoCodec::H264 => passing.to_vec(),
        AppVideoCodec::Vp8 => {
            let encoders = [VP8_ENCODERS, H264_ENCODERS, &[SINGLE_NAL_H264_ENCODER]]
                .into_iter()
                .filter_map(|ranked| installed(ranked).ok().map(|e| e.factory));
            let decoders = [h264_decoder(), "vp8dec"];
            let around = ["videoconvert", "videoscale", "rtpvp8pay", "rtpvp8depay"];
            passing
                .into_iter()
                .chain(decoders)
                .chain(around)
                .chain(encoders)
                .collect()
        }
    }
}

/// The H.264 encoder for a phone that takes `limits`: one that bounds its
/// slices for a phone that takes single NAL units, when installed.
fn h264_encoder(limits: &h264::Limits) -> anyhow::Result<&'static Encoder> {
    if limits.single_nal_units {
        match installed(&[SINGLE_NAL_H264_ENCODER]) {
            Ok(encoder) => return Ok(encoder),
            Err(_) => warn!(
                "the phone takes H.264 in single NAL units only, and no encoder \
                 here bounds its slices (x264enc): large pictures go in fragments"
            ),
        }
    }
    installed(H264_ENCODERS)
}

/// Holds the picture `scaler` passes to what a phone of `limits` decodes
/// (at the 30 frames a second apps send at most), in the shape it has:
/// `scaler`'s output caps are set from each new input caps.
fn fit_pictures_to(scaler: &gst::Element, size: &gst::Element, limits: h264::Limits) {
    let size = size.downgrade();
    let Some(pad) = scaler.static_pad("sink") else {
        return;
    };
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
        let Some(gst::EventView::Caps(caps)) = info.event().map(|e| e.view()) else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(input) = caps.caps().structure(0) else {
            return gst::PadProbeReturn::Ok;
        };
        let (Ok(width), Ok(height), Some(size)) = (
            input.get::<i32>("width"),
            input.get::<i32>("height"),
            size.upgrade(),
        ) else {
            return gst::PadProbeReturn::Ok;
        };
        let (fitted_width, fitted_height) =
            limits.fit(width.max(1) as u32, height.max(1) as u32, APP_FRAME_RATE);
        if (fitted_width, fitted_height) != (width as u32, height as u32) {
            info!(
                "the app's {width}×{height} picture goes to the phone (H.264 level {}) at \
                 {fitted_width}×{fitted_height}",
                limits.level_name()
            );
        }
        let mut output = gst::Caps::builder("video/x-raw")
            .field("width", fitted_width as i32)
            .field("height", fitted_height as i32);
        if let Ok(aspect) = input.get::<gst::Fraction>("pixel-aspect-ratio") {
            output = output.field("pixel-aspect-ratio", aspect);
        }
        size.set_property("caps", output.build());
        gst::PadProbeReturn::Ok
    });
}

/// The most frames a second apps send.
const APP_FRAME_RATE: u32 = 30;

/// The H.264 decoder: libav's, else openh264's (behind a parser either way).
fn h264_decoder() -> &'static str {
    if gst::ElementFactory::find("avdec_h264").is_some() {
        "avdec_h264"
    } else {
        "openh264dec"
    }
}

const VP8_RTP_CAPS: &str = "application/x-rtp,media=(string)video,clock-rate=(int)90000,encoding-name=(string)VP8,payload=(int)96";
const H264_RTP_CAPS: &str = "application/x-rtp,media=(string)video,clock-rate=(int)90000,encoding-name=(string)H264,payload=(int)102,packetization-mode=(string)1,profile-level-id=(string)42e01f";

/// A live frame queue: a slow encoder drops frames rather than adding delay.
const LIVE_QUEUE: &str =
    "queue max-size-buffers=2 max-size-bytes=0 max-size-time=0 leaky=downstream";

/// The running video of one call.
pub struct CallVideo {
    pipeline: gst::Pipeline,
    receiver: gst::Element,
    sender: gst::Element,
    /// Closed while the phone holds the call (or does not receive).
    to_app: gst::Element,
    to_phone: gst::Element,
    /// Encoders in use, e.g. `["vp8enc", "openh264enc"]` (none when passed through).
    pub encoders: Vec<&'static str>,
    pub app_codec: AppVideoCodec,
}

impl CallVideo {
    /// Starts the video of `stream` (H.264 from the phone) on `reservation`,
    /// into the WebRTC call `app_session`. Start it before the audio: the
    /// app's offer is made once every stream of the call is known.
    pub fn start(
        reservation: &PortReservation,
        stream: &NegotiatedStream,
        app_session: &str,
        app_codec: AppVideoCodec,
        events: mpsc::UnboundedSender<MediaEvent>,
        recorder: Option<&Arc<Recorder>>,
        config: &super::SipConfig,
    ) -> anyhow::Result<Self> {
        let nat = super::media::nat_properties(config);
        let session = reservation.session();
        let address: IpAddr = reservation.address;
        let pt = stream.format.payload_type;
        let limits = h264::Limits::from_fmtp(stream.format.fmtp.as_deref());
        // No aggregates (STAP-A) for a phone that takes single NAL units.
        let aggregate = if limits.single_nal_units {
            "none"
        } else {
            "zero-latency"
        };
        // Lost packets and undecodable frames ask the sender for a key
        // frame (PLI/FIR and SIP INFO toward the phone, PLI toward the app).
        // Recorded: the H.264 from and to the phone, as it is.
        let (tap_from_phone, tap_to_phone, recording) = match recorder {
            Some(_) => (
                " ! tee name=phone_video ! queue",
                "tee name=app_video ! queue ! ",
                " phone_video. ! queue ! appsink name=record_phone sync=false async=false \
                  app_video. ! queue ! appsink name=record_app sync=false async=false",
            ),
            None => ("", "", ""),
        };
        let from_phone = format!(
            "sipsrc name=vrx session={session} local-address={address} timeout=0 stats-interval=0 \
             ! rtph264depay request-keyframe=true ! h264parse config-interval=-1{tap_from_phone}"
        );
        let to_phone = format!(
            "{tap_to_phone}valve name=to_phone drop=false ! rtph264pay pt={pt} config-interval=-1 aggregate-mode={aggregate} \
             ! sipsink name=vtx session={session} local-address={address}"
        );
        let app_src = format!("connectycubesrc session={app_session}{nat} media=video");
        let (description, encoders) = match app_codec {
            AppVideoCodec::Off => anyhow::bail!("video is off"),
            AppVideoCodec::H264 => {
                if limits.single_nal_units || limits.level < 31 {
                    warn!(
                        "the app's H.264 passes to the phone as it is: the phone's level {}{} \
                         is not enforced (video = \"vp8\" would)",
                        limits.level_name(),
                        if limits.single_nal_units {
                            " and single NAL units"
                        } else {
                            ""
                        }
                    );
                }
                (
                    format!(
                        "{from_phone} ! rtph264pay pt=102 config-interval=-1 aggregate-mode=zero-latency \
                       ! valve name=to_app drop=false ! connectycubesink session={app_session}{nat} caps=\"{H264_RTP_CAPS}\" \
                     {app_src} ! rtph264depay request-keyframe=true ! h264parse ! {to_phone}"
                    ),
                    Vec::new(),
                )
            }
            AppVideoCodec::Vp8 => {
                let (vp8, h264) = (installed(VP8_ENCODERS)?, h264_encoder(&limits)?);
                let decoder = h264_decoder();
                (
                    format!(
                        "{from_phone} ! {decoder} automatic-request-sync-points=true ! videoconvert ! {LIVE_QUEUE} \
                           ! {} ! rtpvp8pay pt=96 picture-id-mode=15-bit \
                           ! valve name=to_app drop=false ! connectycubesink session={app_session}{nat} caps=\"{VP8_RTP_CAPS}\" \
                         {app_src} ! rtpvp8depay request-keyframe=true ! vp8dec automatic-request-sync-points=true ! videoconvert ! {LIVE_QUEUE} \
                           ! videoscale name=phone_scale ! capsfilter name=phone_picture ! {} ! h264parse ! {to_phone}",
                        vp8.launch(VIDEO_KBPS),
                        h264.launch(VIDEO_KBPS.min(limits.max_bitrate_kbps)),
                    ),
                    vec![vp8.factory, h264.factory],
                )
            }
        };
        let description = format!("{description}{recording}");
        tracing::debug!("video pipeline: {description}");
        let pipeline = gst::parse::launch(&description)
            .context("cannot build the video pipeline")?
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow!("not a pipeline"))?;
        super::media::set_relay(&pipeline, config);
        let by_name = |name: &str| {
            pipeline
                .by_name(name)
                .with_context(|| format!("video pipeline lacks {name}"))
        };
        if let (Some(scaler), Some(size)) = (
            pipeline.by_name("phone_scale"),
            pipeline.by_name("phone_picture"),
        ) {
            fit_pictures_to(&scaler, &size, limits);
        }
        if let Some(recorder) = recorder {
            for (name, track) in [
                ("record_phone", Track::PhoneVideo),
                ("record_app", Track::AppVideo),
            ] {
                let sink = by_name(name)?
                    .downcast::<gst_app::AppSink>()
                    .map_err(|_| anyhow!("{name} is not an appsink"))?;
                recorder.feed(&sink, track);
            }
        }
        let video = CallVideo {
            receiver: by_name("vrx")?,
            sender: by_name("vtx")?,
            to_app: by_name("to_app")?,
            to_phone: by_name("to_phone")?,
            pipeline,
            encoders,
            app_codec,
        };
        video.update(stream);
        video.watch_bus(events);
        video
            .pipeline
            .set_state(gst::State::Playing)
            .map_err(|_| anyhow!("the video pipeline did not start"))?;
        info!(
            "video: phone H264 ↔ app {} ({})",
            app_codec.encoding_name().unwrap_or_default(),
            if video.encoders.is_empty() {
                "passed through".to_owned()
            } else {
                format!("encoders {}", video.encoders.join(", "))
            }
        );
        Ok(video)
    }

    /// A renegotiated video stream: new address, keys or direction. While
    /// the phone holds the call the app's picture stands still, and nothing
    /// goes to a phone that does not receive.
    pub fn update(&self, stream: &NegotiatedStream) {
        configure_sip_pair(&self.receiver, &self.sender, stream);
        pause(&self.to_app, stream.direction != Direction::SendRecv);
        pause(&self.to_phone, !stream.we_send());
    }

    /// The phone that took the call over takes no video: the app's picture
    /// stands still and nothing goes to the phone.
    pub fn suspend(&self) {
        pause(&self.to_app, true);
        pause(&self.to_phone, true);
    }

    /// The phone lost the picture (SIP INFO `picture_fast_update`): a key
    /// frame from the bridge's encoder, or, when H.264 passes through, from
    /// the app (PLI).
    pub fn request_key_frame(&self) -> bool {
        self.sender
            .static_pad("sink")
            .is_some_and(|pad| pad.push_event(gstsipcc::key_frame_request()))
    }

    /// Relays the phone-side key-frame requests to the call (for SIP INFO);
    /// a video failure is logged, and the call goes on with its audio.
    fn watch_bus(&self, events: mpsc::UnboundedSender<MediaEvent>) {
        let bus = self.pipeline.bus().expect("a pipeline has a bus");
        bus.set_sync_handler(move |_, message| {
            match message.view() {
                gst::MessageView::Element(element)
                    if element
                        .structure()
                        .is_some_and(|s| s.name() == "sip-key-frame-request") =>
                {
                    let _ = events.send(MediaEvent::KeyFrameRequested);
                }
                gst::MessageView::Error(error) => {
                    warn!("video failed: {} ({:?})", error.error(), error.debug());
                }
                _ => {}
            }
            gst::BusSyncReply::Drop
        });
    }

    pub fn stop(&self) {
        self.sender.send_event(gst::event::Eos::new());
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Opens or closes a valve; a reopened stream starts again from a key frame
/// (asked upstream: of the encoder, or of the sender when passed through).
fn pause(valve: &gst::Element, paused: bool) {
    let was_paused = valve.property::<bool>("drop");
    valve.set_property("drop", paused);
    if was_paused
        && !paused
        && let Some(pad) = valve.static_pad("sink")
    {
        pad.push_event(gstsipcc::key_frame_request());
    }
}

impl Drop for CallVideo {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_encoders_come_first_and_software_is_the_fallback() {
        let machine_with = |names: &'static [&'static str]| move |n: &str| names.contains(&n);
        let pick = |ranked, names| first_available(ranked, machine_with(names)).map(|e| e.factory);
        assert_eq!(
            pick(H264_ENCODERS, &["x264enc", "openh264enc", "nvh264enc"]),
            Some("nvh264enc")
        );
        assert_eq!(
            pick(H264_ENCODERS, &["x264enc", "vaapih264enc", "vah264enc"]),
            Some("vah264enc")
        );
        assert_eq!(pick(H264_ENCODERS, &["x264enc"]), Some("x264enc"));
        assert_eq!(
            pick(VP8_ENCODERS, &["vp8enc", "vaapivp8enc"]),
            Some("vaapivp8enc")
        );
        assert_eq!(pick(VP8_ENCODERS, &[]), None);
    }

    #[test]
    fn bitrates_are_written_in_each_encoders_unit() {
        let by_name = |name| H264_ENCODERS.iter().find(|e| e.factory == name).unwrap();
        assert_eq!(
            by_name("openh264enc").launch(768),
            "openh264enc gop-size=60 complexity=low bitrate=768000"
        );
        assert!(
            by_name("x264enc")
                .launch(768)
                .ends_with(" bitrate=768 ! video/x-h264,profile=constrained-baseline")
        );
    }

    /// A phone of level 1.3 (CIF) gets a VGA picture at 360×270, and one
    /// of level 3.1 gets it as it is.
    #[test]
    fn pictures_are_scaled_to_the_phones_level() {
        gst::init().unwrap();
        let received = |fmtp: &str| {
            let pipeline = gst::parse::launch(
                "videotestsrc num-buffers=1 ! video/x-raw,width=640,height=480 \
                 ! videoscale name=scale ! capsfilter name=size ! appsink name=phone",
            )
            .unwrap()
            .downcast::<gst::Pipeline>()
            .unwrap();
            let by_name = |name| pipeline.by_name(name).unwrap();
            fit_pictures_to(
                &by_name("scale"),
                &by_name("size"),
                h264::Limits::from_fmtp(Some(fmtp)),
            );
            pipeline.set_state(gst::State::Playing).unwrap();
            let sample = by_name("phone")
                .downcast::<gst_app::AppSink>()
                .unwrap()
                .pull_sample()
                .unwrap();
            pipeline.set_state(gst::State::Null).unwrap();
            let caps = sample.caps().unwrap().structure(0).unwrap().to_owned();
            (
                caps.get::<i32>("width").unwrap(),
                caps.get::<i32>("height").unwrap(),
            )
        };
        assert_eq!(received("profile-level-id=42e00d"), (360, 270));
        assert_eq!(received("profile-level-id=42e01f"), (640, 480));
    }

    #[test]
    fn this_machine_falls_back_to_an_installed_software_encoder() {
        gst::init().unwrap();
        let h264 = installed(H264_ENCODERS).unwrap();
        let vp8 = installed(VP8_ENCODERS).unwrap();
        // No VA-API device here (design.md): the software encoders run.
        assert!(
            ["openh264enc", "x264enc"].contains(&h264.factory),
            "{h264:?}"
        );
        assert_eq!(vp8.factory, "vp8enc");
        // Their settings are valid as written.
        for encoder in [h264, vp8, &SINGLE_NAL_H264_ENCODER] {
            let description = format!("{} ! fakesink", encoder.launch(VIDEO_KBPS));
            gst::parse::bin_from_description(&description, true)
                .unwrap_or_else(|e| panic!("{}: {e}", encoder.factory));
        }
    }
}
