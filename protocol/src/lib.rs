//! Protocol code shared by the GStreamer elements and `sip-cc-bridge`.
//!
//! Nothing in this crate depends on GStreamer: it describes codecs and parses
//! session descriptions, so the same rules apply whether a pipeline is started
//! from `gst-launch-1.0` or driven by the bridge.

pub mod ami;
pub mod codec;
pub mod connectycube;
pub mod digest;
pub mod dtmf;
pub mod h264;
pub mod ice;
pub mod offer_answer;
pub mod opus_fmtp;
pub mod sdes;
pub mod sdp;
pub mod tls;
pub mod tone;
pub mod turn;
