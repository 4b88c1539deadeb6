//! `connectycubesink`: sends one RTP stream (Opus, VP8, H.264, …) into a
//! ConnectyCube call, over the call's `webrtcbin` (DTLS-SRTP, ICE). With
//! credentials and a `peer`, it places the call itself.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct ConnectyCubeSink(ObjectSubclass<imp::ConnectyCubeSink>) @extends gst_base::BaseSink, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "connectycubesink",
        gst::Rank::NONE,
        ConnectyCubeSink::static_type(),
    )
}
