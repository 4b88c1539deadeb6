//! `opusvoiceenc`: Opus encoder for calls, on the libopus built into the
//! plugin. It takes audio at the source's own rate (8 to 48 kHz, so a phone
//! codec's audio is never resampled on its way), in the mode its
//! `audio-type` asks for, with a complexity that trades quality for CPU per
//! call. Feeds `rtpopuspay`.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct OpusVoiceEnc(ObjectSubclass<imp::OpusVoiceEnc>) @extends gst_audio::AudioEncoder, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "opusvoiceenc",
        gst::Rank::NONE,
        OpusVoiceEnc::static_type(),
    )
}
