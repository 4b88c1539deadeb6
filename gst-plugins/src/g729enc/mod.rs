//! `g729enc`: G.729 Annex A encoder on libbcg729, with Annex B (VAD/DTX/CNG)
//! when `annex-b` is set. Feeds `rtpg729pay`.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct G729Enc(ObjectSubclass<imp::G729Enc>) @extends gst_audio::AudioEncoder, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "g729enc",
        gst::Rank::PRIMARY,
        G729Enc::static_type(),
    )
}
