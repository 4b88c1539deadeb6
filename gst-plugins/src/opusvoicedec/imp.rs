use std::sync::{LazyLock, Mutex};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_audio::prelude::*;
use gst_audio::subclass::prelude::*;
use opusic_c::Decoder;

use crate::CAT;
use crate::opus_voice::{channels, opus_caps, pcm_caps, sample_rate};

/// The longest Opus packet; also the longest gap concealed at once (a
/// longer one is a pause, not a loss).
const MAX_FRAME: gst::ClockTime = gst::ClockTime::from_mseconds(120);

/// The decoder of the negotiated output, and what a packet is decoded into.
struct State {
    decoder: Decoder,
    rate: u32,
    channel_count: usize,
    pcm: Vec<u16>,
    /// A gap not concealed yet (samples per channel): its end may come back
    /// from the next packet's forward error correction (Opus's in-band
    /// FEC, which browsers add when their receiver reports loss), so it
    /// waits for that packet.
    gap: Option<usize>,
}

impl State {
    /// `samples` per channel of audio in `out`: concealed, or with `fec`,
    /// recovered from that packet's redundancy where it has some (libopus
    /// conceals what it does not cover).
    fn conceal(&mut self, samples: usize, fec: Option<&[u8]>, out: &mut Vec<u8>) {
        let length = samples * self.channel_count;
        let pcm = &mut self.pcm[..length];
        // A packet libopus cannot read gives no redundancy: concealed then.
        let decoded = fec
            .and_then(|packet| self.decoder.decode_to_slice(packet, pcm, true).ok())
            .or_else(|| self.decoder.decode_to_slice(&[], pcm, false).ok());
        if let Some(samples) = decoded {
            self.append(samples, out);
        }
    }

    /// A waiting gap with no packet after it, concealed.
    fn concealment(&mut self, samples: usize) -> gst::Buffer {
        let mut bytes = Vec::new();
        self.conceal(samples, None, &mut bytes);
        gst::Buffer::from_slice(bytes)
    }

    /// The first `samples` per channel of `pcm`, as bytes.
    fn append(&self, samples: usize, out: &mut Vec<u8>) {
        let pcm = &self.pcm[..samples * self.channel_count];
        out.extend(pcm.iter().flat_map(|s| s.to_le_bytes()));
    }
}

#[derive(Default)]
pub struct OpusVoiceDec {
    state: Mutex<Option<State>>,
}

#[glib::object_subclass]
impl ObjectSubclass for OpusVoiceDec {
    const NAME: &'static str = "GstOpusVoiceDec";
    type Type = super::OpusVoiceDec;
    type ParentType = gst_audio::AudioDecoder;
}

impl ObjectImpl for OpusVoiceDec {}

impl GstObjectImpl for OpusVoiceDec {}

impl ElementImpl for OpusVoiceDec {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Opus voice decoder",
                "Codec/Decoder/Audio",
                "Decodes Opus straight to the rate downstream takes, concealing lost packets \
                 or bringing them back from the next packet's in-band FEC",
                "sip-cc-bridge developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> =
            LazyLock::new(|| crate::converter_pad_templates(&opus_caps(), &pcm_caps()));
        TEMPLATES.as_ref()
    }
}

impl OpusVoiceDec {
    /// The output format: the rate downstream takes (48 kHz if it takes any)
    /// and the stream's channels (mono unless it says otherwise).
    fn output_info(&self, caps: &gst::Caps) -> Result<gst_audio::AudioInfo, gst::LoggableError> {
        let stream_channels = caps
            .structure(0)
            .and_then(|s| s.get::<i32>("channels").ok())
            .unwrap_or(1);
        let src = self.obj().src_pad().clone();
        let mut allowed = src
            .allowed_caps()
            .unwrap_or_else(|| src.pad_template_caps())
            .intersect(&pcm_caps());
        if allowed.is_empty() {
            return Err(gst::loggable_error!(
                CAT,
                "downstream takes no rate Opus decodes to"
            ));
        }
        allowed.truncate();
        {
            let s = allowed.make_mut().structure_mut(0).expect("one structure");
            s.fixate_field_nearest_int("rate", 48000);
            s.fixate_field_nearest_int("channels", stream_channels);
        }
        allowed.fixate();
        gst_audio::AudioInfo::from_caps(&allowed)
            .map_err(|_| gst::loggable_error!(CAT, "cannot decode to {allowed}"))
    }

    /// Decodes the stream of `caps` to the output format downstream takes,
    /// with a new decoder if that format changed.
    fn configure(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let info = self.output_info(caps)?;
        let channel_count = info.channels() as usize;
        let mut state = self.state.lock().unwrap();
        let unchanged = state
            .as_ref()
            .is_some_and(|s| s.rate == info.rate() && s.channel_count == channel_count);
        if !unchanged {
            let (Some(rate), Some(channels)) =
                (sample_rate(info.rate()), channels(info.channels()))
            else {
                return Err(gst::loggable_error!(CAT, "Opus cannot decode to {info:?}"));
            };
            let waiting = state.as_ref().and_then(|s| Some((s.gap?, s.rate)));
            let decoder = Decoder::new(channels, rate)
                .map_err(|e| gst::loggable_error!(CAT, "libopus: no decoder ({e:?})"))?;
            *state = Some(State {
                decoder,
                rate: info.rate(),
                channel_count,
                // The longest packet at the output rate, not at 48 kHz: a
                // narrowband call's decoder keeps 2 KB, not 12.
                pcm: vec![0; max_frame_samples(info.rate()) * channel_count],
                // A gap still waiting (its frame with the base class) is
                // made at the new rate.
                gap: waiting.map(|(samples, rate)| {
                    (samples as u64 * u64::from(info.rate()) / u64::from(rate)) as usize
                }),
            });
        }
        drop(state);
        self.obj()
            .set_output_format(&info)
            .map_err(|_| gst::loggable_error!(CAT, "cannot set the decoded audio format"))
    }
}

impl AudioDecoderImpl for OpusVoiceDec {
    /// Any Opus stream: its `rate` is the rate it was made from, which
    /// says nothing of the rates it decodes to (unlike the base class's
    /// proxy, which would ask it to match the rate downstream takes).
    fn caps(&self, filter: Option<&gst::Caps>) -> gst::Caps {
        let caps = opus_caps();
        match filter {
            Some(filter) => filter.intersect_with_mode(&caps, gst::CapsIntersectMode::First),
            None => caps,
        }
    }

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        // Gaps (from a jitter buffer) reach handle_frame as empty buffers.
        // Set here: the base class forgets it when it starts.
        self.obj().set_plc_aware(true);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.state.lock().unwrap().take();
        Ok(())
    }

    fn set_format(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        self.configure(caps)
    }

    /// Downstream may take another rate now (a reconfigure): the decoder
    /// follows it.
    fn negotiate(&self) -> Result<(), gst::LoggableError> {
        if let Some(caps) = self.obj().sink_pad().current_caps() {
            self.configure(&caps)?;
        }
        self.parent_negotiate()
    }

    fn flush(&self, _hard: bool) {
        if let Some(state) = self.state.lock().unwrap().as_mut() {
            state.gap = None;
        }
    }

    fn handle_frame(
        &self,
        buffer: Option<&gst::Buffer>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let obj = self.obj();
        let Some(buffer) = buffer else {
            // Draining: a gap still waiting is concealed now.
            let concealed = self.state.lock().unwrap().as_mut().and_then(|state| {
                let gap = state.gap.take()?;
                Some(state.concealment(gap))
            });
            return match concealed {
                Some(concealed) => obj.finish_frame(Some(concealed), 1),
                None => Ok(gst::FlowSuccess::Ok),
            };
        };
        // Decoded at the rate downstream takes now, not the one it took.
        if obj.src_pad().check_reconfigure() && obj.negotiate().is_err() {
            obj.src_pad().mark_reconfigure();
            return Err(gst::FlowError::NotNegotiated);
        }
        let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
        let mut guard = self.state.lock().unwrap();
        let state = guard.as_mut().ok_or(gst::FlowError::NotNegotiated)?;
        let output_rate = state.rate as usize;
        if map.is_empty() {
            // A gap: libopus conceals as much as it lasts, in whole 10 ms
            // steps (what its concealment takes), up to a bound. Rounded,
            // not cut: a gap reckoned from RTP timestamps may be a hair
            // under 20 ms, and 10 ms of audio would leave every packet
            // after it half in the next one downstream.
            let gap = buffer
                .duration()
                .unwrap_or(gst::ClockTime::from_mseconds(20));
            let tens = ((gap.min(MAX_FRAME).mseconds() + 5) / 10).max(1) as usize;
            let Some(earlier) = state.gap.replace(tens * output_rate / 100) else {
                // Held for the next packet (the base class keeps its frame).
                return Ok(gst::FlowSuccess::Ok);
            };
            // Two gaps in a row: the first has no packet after it.
            let concealed = state.concealment(earlier);
            drop(guard);
            drop(map);
            return obj.finish_frame(Some(concealed), 1);
        }
        let mut bytes = Vec::new();
        let packet = map.as_slice();
        let gap = state.gap.take();
        if let Some(gap) = gap {
            state.conceal(gap, Some(packet), &mut bytes);
        }
        let decoded = state.decoder.get_nb_samples(packet).and_then(|samples| {
            let length = samples.min(max_frame_samples(state.rate)) * state.channel_count;
            state
                .decoder
                .decode_to_slice(packet, &mut state.pcm[..length], false)
        });
        let frames = if gap.is_some() { 2 } else { 1 };
        match decoded {
            Ok(samples) => state.append(samples, &mut bytes),
            Err(e) => {
                // A bad packet costs its own audio, not the call.
                gst::warning!(
                    CAT,
                    imp = self,
                    "dropping an Opus packet libopus cannot decode ({e:?})"
                );
                if gap.is_none() {
                    drop(guard);
                    drop(map);
                    return obj.finish_frame(None, 1);
                }
            }
        }
        drop(guard);
        drop(map);
        obj.finish_frame(Some(gst::Buffer::from_slice(bytes)), frames)
    }
}

/// The samples per channel of the longest packet at `rate`.
fn max_frame_samples(rate: u32) -> usize {
    (u64::from(rate) * MAX_FRAME.mseconds() / 1000) as usize
}
