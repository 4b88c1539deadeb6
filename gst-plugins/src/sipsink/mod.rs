//! `sipsink`: sends RTP toward a SIP phone from the session's RTP socket
//! (symmetric RTP), to the configured or latched address.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct SipSink(ObjectSubclass<imp::SipSink>) @extends gst_base::BaseSink, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "sipsink",
        gst::Rank::NONE,
        SipSink::static_type(),
    )
}
