use std::sync::{LazyLock, Mutex};

use gst::glib;
use gst::subclass::prelude::*;
use gst_audio::prelude::*;
use gst_audio::subclass::prelude::*;

use crate::CAT;
use crate::bcg729::{Decoder, FRAME_BYTES, FRAME_SAMPLES, SID_BYTES, g729_caps, pcm_caps};

const FRAME_DURATION: gst::ClockTime = gst::ClockTime::from_mseconds(10);

#[derive(Default)]
pub struct G729Dec {
    decoder: Mutex<Option<Decoder>>,
}

#[glib::object_subclass]
impl ObjectSubclass for G729Dec {
    const NAME: &'static str = "GstG729Dec";
    type Type = super::G729Dec;
    type ParentType = gst_audio::AudioDecoder;
}

impl ObjectImpl for G729Dec {}

impl GstObjectImpl for G729Dec {}

impl ElementImpl for G729Dec {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "G.729 decoder",
                "Codec/Decoder/Audio",
                "Decodes G.729 Annex A/B to 8 kHz mono audio with libbcg729, concealing lost frames",
                "sip-cc-bridge developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> =
            LazyLock::new(|| crate::converter_pad_templates(&g729_caps(), &pcm_caps()));
        TEMPLATES.as_ref()
    }
}

impl AudioDecoderImpl for G729Dec {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let decoder = Decoder::new().ok_or_else(|| {
            gst::error_msg!(
                gst::LibraryError::Init,
                ["libbcg729 could not create a decoder"]
            )
        })?;
        *self.decoder.lock().unwrap() = Some(decoder);
        // Gaps (from a jitter buffer) reach handle_frame as empty buffers.
        // Set here: the base class forgets it when it starts.
        self.obj().set_plc_aware(true);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.decoder.lock().unwrap().take();
        Ok(())
    }

    fn set_format(&self, _caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let info = gst_audio::AudioInfo::builder(gst_audio::AUDIO_FORMAT_S16, 8000, 1).build()?;
        self.obj()
            .set_output_format(&info)
            .map_err(|_| gst::loggable_error!(CAT, "cannot set the decoded audio format"))?;
        Ok(())
    }

    fn handle_frame(
        &self,
        buffer: Option<&gst::Buffer>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let Some(buffer) = buffer else {
            return Ok(gst::FlowSuccess::Ok);
        };
        let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
        let mut decoder = self.decoder.lock().unwrap();
        let decoder = decoder.as_mut().ok_or(gst::FlowError::NotNegotiated)?;
        let mut samples: Vec<i16> = Vec::new();
        let mut frame = [0i16; FRAME_SAMPLES];

        if map.is_empty() {
            // A gap: conceal as many frames as it lasts (rounded: a gap a
            // hair short of two frames is two).
            let frame_ns = FRAME_DURATION.nseconds();
            let lost = buffer.duration().map_or(1, |d| {
                ((d.nseconds() + frame_ns / 2) / frame_ns).clamp(1, 50)
            });
            for _ in 0..lost {
                decoder.conceal(&mut frame);
                samples.extend_from_slice(&frame);
            }
        } else {
            let data = map.as_slice();
            let voice_frames = data.len() / FRAME_BYTES;
            for chunk in data.chunks_exact(FRAME_BYTES) {
                decoder.decode(chunk, &mut frame);
                samples.extend_from_slice(&frame);
            }
            match data.len() - voice_frames * FRAME_BYTES {
                0 => {}
                SID_BYTES => {
                    decoder.decode(&data[voice_frames * FRAME_BYTES..], &mut frame);
                    samples.extend_from_slice(&frame);
                }
                rest => {
                    gst::warning!(
                        CAT,
                        imp = self,
                        "ignoring {rest} trailing bytes that are no G.729 frame"
                    );
                }
            }
        }
        drop(map);
        if samples.is_empty() {
            return self.obj().finish_frame(None, 1);
        }
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.obj()
            .finish_frame(Some(gst::Buffer::from_slice(bytes)), 1)
    }
}
