//! `opusvoicedec`: Opus decoder for calls, on the libopus built into the
//! plugin. It decodes straight to the rate downstream wants (8 to 48 kHz:
//! no resampler after it for a phone codec) and conceals lost packets.
//! Takes `rtpopusdepay`'s output.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct OpusVoiceDec(ObjectSubclass<imp::OpusVoiceDec>) @extends gst_audio::AudioDecoder, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "opusvoicedec",
        gst::Rank::NONE,
        OpusVoiceDec::static_type(),
    )
}
