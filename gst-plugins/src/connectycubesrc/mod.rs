//! `connectycubesrc`: one received RTP stream (`media=audio` or `video`) of a
//! ConnectyCube call. Shares the call with `connectycubesink` elements of the
//! same `session`, or, alone with credentials, places or answers it itself.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct ConnectyCubeSrc(ObjectSubclass<imp::ConnectyCubeSrc>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "connectycubesrc",
        gst::Rank::NONE,
        ConnectyCubeSrc::static_type(),
    )
}
