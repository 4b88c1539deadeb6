use std::sync::{LazyLock, Mutex};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_audio::prelude::*;
use gst_audio::subclass::prelude::*;
use opusic_c::{Bitrate, Encoder, InbandFec, Signal};

use crate::CAT;
use crate::opus_voice::{AudioType, MaxBandwidth, channels, opus_caps, pcm_caps, sample_rate};

const DEFAULT_COMPLEXITY: u32 = 5;
const DEFAULT_FRAME_SIZE_MS: u32 = 20;
/// Enough for narrowband voice in CELT or SILK; wider bands in CELT.
const DEFAULT_BITRATE: u32 = 32_000;
const MIN_BITRATE: u32 = 6_000;
const MAX_BITRATE: u32 = 510_000;
/// Opus's largest packet for one frame (RFC 6716, 3.2.1), with room to spare.
const MAX_PACKET: usize = 1500;

#[derive(Debug, Clone, Copy)]
struct Settings {
    audio_type: AudioType,
    complexity: u32,
    frame_size_ms: u32,
    bitrate: u32,
    max_bandwidth: MaxBandwidth,
    packet_loss_percentage: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            audio_type: AudioType::default(),
            complexity: DEFAULT_COMPLEXITY,
            frame_size_ms: DEFAULT_FRAME_SIZE_MS,
            bitrate: DEFAULT_BITRATE,
            max_bandwidth: MaxBandwidth::default(),
            packet_loss_percentage: 0,
        }
    }
}

/// The encoder of the negotiated format, and what a frame is made in.
struct State {
    encoder: Encoder,
    /// Samples per frame, all channels.
    frame_samples: usize,
    pcm: Vec<u16>,
    packet: [u8; MAX_PACKET],
}

#[derive(Default)]
pub struct OpusVoiceEnc {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
}

#[glib::object_subclass]
impl ObjectSubclass for OpusVoiceEnc {
    const NAME: &'static str = "GstOpusVoiceEnc";
    type Type = super::OpusVoiceEnc;
    type ParentType = gst_audio::AudioEncoder;
}

impl ObjectImpl for OpusVoiceEnc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecEnum::builder_with_default("audio-type", AudioType::default())
                    .nick("Audio type")
                    .blurb("How libopus picks its mode: generic (CELT while the bitrate affords it, SILK with FEC under any loss), voice (SILK) or restricted-lowdelay (CELT only)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("complexity")
                    .nick("Complexity")
                    .blurb("Encoder effort, 0 (least CPU) to 10 (best quality); each step down saves CPU per call")
                    .maximum(10)
                    .default_value(DEFAULT_COMPLEXITY)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("frame-size")
                    .nick("Frame size")
                    .blurb("Milliseconds of audio per Opus packet: 10, 20, 40 or 60")
                    .minimum(10)
                    .maximum(60)
                    .default_value(DEFAULT_FRAME_SIZE_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("bitrate")
                    .nick("Bitrate")
                    .blurb("Target bits per second; congestion control may lower it while playing")
                    .minimum(MIN_BITRATE)
                    .maximum(MAX_BITRATE)
                    .default_value(DEFAULT_BITRATE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("max-bandwidth", MaxBandwidth::default())
                    .nick("Maximum bandwidth")
                    .blurb("Widest audio band sent: no wider than the peer plays")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("packet-loss-percentage")
                    .nick("Expected packet loss")
                    .blurb("The share of packets the receiver reports lost; above 0, each packet also carries the one before it at a lower rate (Opus in-band FEC), as much as that loss calls for")
                    .maximum(100)
                    .default_value(0)
                    .mutable_playing()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.settings.lock().unwrap();
        match pspec.name() {
            "audio-type" => settings.audio_type = value.get().unwrap(),
            "complexity" => settings.complexity = value.get().unwrap(),
            "frame-size" => {
                let ms: u32 = value.get().unwrap();
                settings.frame_size_ms = match ms {
                    10 | 20 | 40 | 60 => ms,
                    _ => {
                        gst::warning!(
                            CAT,
                            imp = self,
                            "frame-size {ms} is not 10, 20, 40 or 60 ms; using 20"
                        );
                        DEFAULT_FRAME_SIZE_MS
                    }
                };
            }
            "bitrate" => {
                settings.bitrate = value.get().unwrap();
                self.apply_live(|encoder| encoder.set_bitrate(Bitrate::Value(settings.bitrate)));
            }
            "max-bandwidth" => {
                settings.max_bandwidth = value.get().unwrap();
                let bandwidth = settings.max_bandwidth.into();
                self.apply_live(|encoder| encoder.set_max_bandwidth(bandwidth));
            }
            "packet-loss-percentage" => {
                settings.packet_loss_percentage = value.get().unwrap();
                let percent = settings.packet_loss_percentage;
                self.apply_live(|encoder| expect_loss(encoder, percent));
            }
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.settings.lock().unwrap();
        match pspec.name() {
            "audio-type" => settings.audio_type.to_value(),
            "complexity" => settings.complexity.to_value(),
            "frame-size" => settings.frame_size_ms.to_value(),
            "bitrate" => settings.bitrate.to_value(),
            "max-bandwidth" => settings.max_bandwidth.to_value(),
            "packet-loss-percentage" => settings.packet_loss_percentage.to_value(),
            other => unreachable!("unknown property {other}"),
        }
    }
}

impl GstObjectImpl for OpusVoiceEnc {}

impl OpusVoiceEnc {
    /// Changes a setting of the running encoder, if there is one (else it
    /// applies from the next negotiation).
    fn apply_live(&self, change: impl FnOnce(&mut Encoder) -> Result<(), opusic_c::ErrorCode>) {
        if let Some(state) = self.state.lock().unwrap().as_mut()
            && let Err(e) = change(&mut state.encoder)
        {
            gst::warning!(CAT, imp = self, "libopus refused a setting ({e:?})");
        }
    }
}

/// In-band FEC on while the receiver reports loss, sized to it. FEC is
/// SILK's: told the signal is voice, libopus moves `generic` to SILK at
/// any loss, where it would wait for more than 5 % (its guess that the
/// signal may be music), and back to CELT once the loss is gone.
fn expect_loss(encoder: &mut Encoder, percent: u32) -> Result<(), opusic_c::ErrorCode> {
    let (fec, signal) = if percent > 0 {
        (InbandFec::Mode1, Signal::Voice)
    } else {
        (InbandFec::Off, Signal::Auto)
    };
    encoder.set_inband_fec(fec)?;
    encoder.set_signal(signal)?;
    encoder.set_packet_loss(percent.min(100) as u8)
}

impl ElementImpl for OpusVoiceEnc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Opus voice encoder",
                "Codec/Encoder/Audio",
                "Encodes call audio to Opus at its own rate, with a CPU-bounded complexity",
                "sip-cc-bridge developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> =
            LazyLock::new(|| crate::converter_pad_templates(&pcm_caps(), &opus_caps()));
        TEMPLATES.as_ref()
    }
}

impl AudioEncoderImpl for OpusVoiceEnc {
    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.state.lock().unwrap().take();
        Ok(())
    }

    fn set_format(&self, info: &gst_audio::AudioInfo) -> Result<(), gst::LoggableError> {
        let settings = *self.settings.lock().unwrap();
        let (Some(rate), Some(channel_count)) =
            (sample_rate(info.rate()), channels(info.channels()))
        else {
            return Err(gst::loggable_error!(CAT, "Opus cannot encode {info:?}"));
        };
        let mut encoder = Encoder::new(channel_count, rate, settings.audio_type.into())
            .map_err(|e| gst::loggable_error!(CAT, "libopus: no encoder ({e:?})"))?;
        encoder
            .set_complexity(settings.complexity as u8)
            .and_then(|()| encoder.set_bitrate(Bitrate::Value(settings.bitrate)))
            .and_then(|()| encoder.set_max_bandwidth(settings.max_bandwidth.into()))
            .and_then(|()| expect_loss(&mut encoder, settings.packet_loss_percentage))
            .map_err(|e| gst::loggable_error!(CAT, "libopus refused a setting ({e:?})"))?;
        // Opus's own delay (its look-ahead), told to the base class as
        // opusenc does: the first packet is that much shorter, and
        // contiguous input timestamps are shifted by it.
        let lookahead = encoder
            .get_look_ahead()
            .map_err(|e| gst::loggable_error!(CAT, "libopus: no lookahead ({e:?})"))?;
        let frame_per_channel = info.rate() * settings.frame_size_ms / 1000;
        let obj = self.obj();
        let caps = gst::Caps::builder("audio/x-opus")
            .field("channel-mapping-family", 0i32)
            .field("rate", info.rate() as i32)
            .field("channels", info.channels() as i32)
            .build();
        obj.set_output_format(&caps)
            .map_err(|_| gst::loggable_error!(CAT, "cannot set the Opus output caps"))?;
        obj.set_frame_samples_min(frame_per_channel as i32);
        obj.set_frame_samples_max(frame_per_channel as i32);
        obj.set_frame_max(1);
        obj.set_lookahead(lookahead as i32);
        let frame_duration = gst::ClockTime::from_mseconds(settings.frame_size_ms.into());
        obj.set_latency(frame_duration, Some(frame_duration));
        *self.state.lock().unwrap() = Some(State {
            encoder,
            frame_samples: (frame_per_channel * info.channels()) as usize,
            pcm: Vec::new(),
            packet: [0; MAX_PACKET],
        });
        Ok(())
    }

    fn handle_frame(
        &self,
        buffer: Option<&gst::Buffer>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        // Every frame is encoded as it comes: draining has nothing to do.
        let Some(buffer) = buffer else {
            return Ok(gst::FlowSuccess::Ok);
        };
        let (packet, samples) = {
            let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
            let mut state = self.state.lock().unwrap();
            let state = state.as_mut().ok_or(gst::FlowError::NotNegotiated)?;
            let samples = map.len() / 2 / state.encoder.channels() as usize;
            // The last frame before EOS can be short: Opus takes whole frames
            // only, so it is completed with silence.
            state.pcm.clear();
            state.pcm.extend(
                map.as_slice()
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]])),
            );
            state.pcm.resize(state.frame_samples, 0);
            let length = state
                .encoder
                .encode_to_slice(&state.pcm, &mut state.packet)
                .map_err(|e| {
                    gst::element_imp_error!(self, gst::StreamError::Encode, ["libopus: {e:?}"]);
                    gst::FlowError::Error
                })?;
            (
                gst::Buffer::from_slice(state.packet[..length].to_vec()),
                samples,
            )
        };
        // Pushed without the state held: downstream may set the bitrate
        // (congestion control) from this very thread.
        self.obj().finish_frame(Some(packet), samples as i32)
    }
}
