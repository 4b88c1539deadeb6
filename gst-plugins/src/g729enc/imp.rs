use std::sync::{LazyLock, Mutex};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_audio::prelude::*;
use gst_audio::subclass::prelude::*;

use crate::CAT;
use crate::bcg729::{Encoder, FRAME_BYTES, FRAME_SAMPLES, g729_caps, pcm_caps};

#[derive(Default)]
pub struct G729Enc {
    annex_b: Mutex<bool>,
    encoder: Mutex<Option<Encoder>>,
}

#[glib::object_subclass]
impl ObjectSubclass for G729Enc {
    const NAME: &'static str = "GstG729Enc";
    type Type = super::G729Enc;
    type ParentType = gst_audio::AudioEncoder;
}

impl ObjectImpl for G729Enc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![glib::ParamSpecBoolean::builder("annex-b")
                .nick("Annex B")
                .blurb("Voice activity detection: send 2-byte comfort-noise (SID) frames or nothing during silence (SDP annexb=yes)")
                .default_value(false)
                .mutable_ready()
                .build()]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        match pspec.name() {
            "annex-b" => *self.annex_b.lock().unwrap() = value.get().unwrap(),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "annex-b" => self.annex_b.lock().unwrap().to_value(),
            other => unreachable!("unknown property {other}"),
        }
    }
}

impl GstObjectImpl for G729Enc {}

impl ElementImpl for G729Enc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "G.729 encoder",
                "Codec/Encoder/Audio",
                "Encodes 8 kHz mono audio to G.729 Annex A (Annex B optional) with libbcg729",
                "sip-cc-bridge developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> =
            LazyLock::new(|| crate::converter_pad_templates(&pcm_caps(), &g729_caps()));
        TEMPLATES.as_ref()
    }
}

impl AudioEncoderImpl for G729Enc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let annex_b = *self.annex_b.lock().unwrap();
        let encoder = Encoder::new(annex_b).ok_or_else(|| {
            gst::error_msg!(
                gst::LibraryError::Init,
                ["libbcg729 could not create an encoder"]
            )
        })?;
        *self.encoder.lock().unwrap() = Some(encoder);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.encoder.lock().unwrap().take();
        Ok(())
    }

    fn set_format(&self, _info: &gst_audio::AudioInfo) -> Result<(), gst::LoggableError> {
        let obj = self.obj();
        let caps = g729_caps();
        obj.set_output_format(&caps)
            .map_err(|_| gst::loggable_error!(CAT, "cannot set the G.729 output caps"))?;
        // One 10 ms frame per call; the payloader packs them by ptime.
        obj.set_frame_samples_min(FRAME_SAMPLES as i32);
        obj.set_frame_samples_max(FRAME_SAMPLES as i32);
        obj.set_frame_max(1);
        Ok(())
    }

    fn handle_frame(
        &self,
        buffer: Option<&gst::Buffer>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        // Nothing is held back between frames, so draining has nothing to do.
        let Some(buffer) = buffer else {
            return Ok(gst::FlowSuccess::Ok);
        };
        let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
        let mut frame = [0i16; FRAME_SAMPLES];
        for (sample, bytes) in frame.iter_mut().zip(map.as_slice().chunks_exact(2)) {
            *sample = i16::from_le_bytes([bytes[0], bytes[1]]);
        }
        let mut out = [0u8; FRAME_BYTES];
        let length = {
            let mut encoder = self.encoder.lock().unwrap();
            let encoder = encoder.as_mut().ok_or(gst::FlowError::NotNegotiated)?;
            encoder.encode(&frame, &mut out)
        };
        drop(map);
        if length == 0 {
            gst::trace!(CAT, imp = self, "silence: frame not transmitted (Annex B)");
            return self.obj().finish_frame(None, FRAME_SAMPLES as i32);
        }
        self.obj().finish_frame(
            Some(gst::Buffer::from_slice(out[..length].to_vec())),
            FRAME_SAMPLES as i32,
        )
    }
}
