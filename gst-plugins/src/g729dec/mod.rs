//! `g729dec`: G.729 (Annex A/B) decoder on libbcg729, with packet-loss
//! concealment. Takes what `rtpg729depay` gives: 10-byte voice frames,
//! optionally followed by a 2-byte SID frame.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct G729Dec(ObjectSubclass<imp::G729Dec>) @extends gst_audio::AudioDecoder, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    // Above avdec_g729, which knows no Annex B comfort noise.
    gst::Element::register(
        Some(plugin),
        "g729dec",
        gst::Rank::PRIMARY + 1,
        G729Dec::static_type(),
    )
}
