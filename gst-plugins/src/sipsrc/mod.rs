//! `sipsrc`: receives RTP from a SIP phone on the session's socket, checks
//! and counts it (RFC 3550), and plays it out through `rtpjitterbuffer`.
//!
//! A bin: an internal receiving source (or, with `shared-threads`, its work
//! done on the plugin's shared threads), then GStreamer's jitter buffer
//! (none with `latency=0`).

use gst::glib;
use gst::prelude::*;

mod imp;
mod pooled;
mod receiver;

glib::wrapper! {
    pub struct SipSrc(ObjectSubclass<imp::SipSrc>) @extends gst::Bin, gst::Element, gst::Object, @implements gst::ChildProxy;
}

glib::wrapper! {
    /// The receiving half inside `sipsrc`; not registered as an element.
    pub struct SipReceiver(ObjectSubclass<receiver::SipReceiver>) @extends gst_base::PushSrc, gst_base::BaseSrc, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "sipsrc",
        gst::Rank::NONE,
        SipSrc::static_type(),
    )
}
