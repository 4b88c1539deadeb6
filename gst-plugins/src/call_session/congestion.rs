//! Congestion control of a call's outgoing media: transport-wide sequence
//! numbers on every packet (so the peer reports arrival times), `rtpgccbwe`
//! (Google Congestion Control, from gst-plugins-rs) reading those reports
//! inside webrtcbin, and its estimate shared out among the call's encoders.

use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;

use super::MediaKind;
use crate::CAT;

const TWCC_URI: &str = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";

/// Lowest bitrate the estimator may ask for: enough for Opus speech.
const MIN_BITRATE: u32 = 16_000;
/// Bitrate assumed before the first feedback (the estimator's own start
/// point is 2 Mbit/s, more than a phone call ever needs).
const START_BITRATE: u32 = 1_000_000;

/// How long the encoders keep some in-band FEC after the peer's receiver
/// last reported loss: a lossy network seldom loses in every report's
/// interval, and each change of Opus mode between CELT and SILK is heard.
const LOSS_HOLD: Duration = Duration::from_secs(10);

/// A receiver report's fraction lost (RTCP's 0 to 1), in whole percent.
pub fn loss_percent(fraction: f64) -> u32 {
    (fraction.clamp(0.0, 1.0) * 100.0).round() as u32
}

/// The loss (percent) the encoders are told, from the peer's receiver
/// reports: any change while there is loss at once; once the reports are
/// clean, the least FEC (1 %) until `LOSS_HOLD` after the last loss, then
/// none.
#[derive(Debug, Default)]
pub struct LossReports {
    told: u32,
    last_loss_at: Option<Instant>,
}

impl LossReports {
    /// Takes a report of `percent` lost; returns what the encoders are to
    /// be told, when it changes.
    pub fn report(&mut self, percent: u32, now: Instant) -> Option<u32> {
        let tell = if percent > 0 {
            self.last_loss_at = Some(now);
            percent
        } else if self
            .last_loss_at
            .is_some_and(|at| now.duration_since(at) < LOSS_HOLD)
        {
            1
        } else {
            0
        };
        (tell != self.told).then(|| {
            self.told = tell;
            tell
        })
    }
}

/// The caps of a stream we send, announcing the transport-wide-cc header
/// extension under the first free id (or the one already there), and the
/// `transport-cc` feedback webrtcbin puts into the SDP.
pub fn with_twcc(caps: &gst::Caps) -> (gst::Caps, Option<u8>) {
    let mut caps = caps.clone();
    let Some(s) = caps.make_mut().structure_mut(0) else {
        return (caps, None);
    };
    let taken = |id: u8| s.has_field(format!("extmap-{id}").as_str());
    let existing = (1..=14u8).find(|id| {
        s.get::<&str>(format!("extmap-{id}").as_str())
            .is_ok_and(|uri| uri == TWCC_URI)
    });
    let Some(id) = existing.or_else(|| (1..=14u8).find(|id| !taken(*id))) else {
        return (caps, None);
    };
    s.set(format!("extmap-{id}").as_str(), TWCC_URI);
    s.set("rtcp-fb-transport-cc", true);
    (caps, Some(id))
}

/// `caps` with the transport-wide-cc extension under the peer's id `theirs`
/// (an offer we answer chooses it), or without it when the peer does not
/// take it, so webrtcbin's answer agrees with the offer.
pub fn with_remote_twcc(caps: &gst::Caps, theirs: Option<u8>) -> gst::Caps {
    let mut caps = caps.clone();
    if let Some(s) = caps.make_mut().structure_mut(0) {
        let ours: Vec<String> = s
            .iter()
            .filter(|(name, value)| {
                name.starts_with("extmap-") && value.get::<&str>().is_ok_and(|uri| uri == TWCC_URI)
            })
            .map(|(name, _)| name.to_string())
            .collect();
        for name in ours {
            s.remove_field(name.as_str());
        }
        match theirs {
            Some(id) if !s.has_field(format!("extmap-{id}").as_str()) => {
                s.set(format!("extmap-{id}").as_str(), TWCC_URI);
            }
            _ => s.remove_field("rtcp-fb-transport-cc"),
        }
    }
    caps
}

/// The id the remote SDP gives the transport-wide-cc extension in the
/// section of `kind`, if it takes it at all.
pub fn remote_twcc_id(remote: &gst_sdp::SDPMessageRef, kind: MediaKind) -> Option<u8> {
    let media = remote.medias().find(|m| {
        m.media()
            == Some(match kind {
                MediaKind::Audio => "audio",
                MediaKind::Video => "video",
            })
    })?;
    media.attributes().find_map(|a| {
        let (id, uri) = a.value()?.split_once(' ')?;
        (a.key() == "extmap" && uri.trim() == TWCC_URI)
            .then(|| id.split('/').next()?.parse().ok())
            .flatten()
    })
}

/// Writes a transport-wide-cc extension (its sequence number is filled in by
/// webrtcbin's RTP session) into an outgoing packet that lacks one.
pub fn add_twcc_extension(buffer: &mut gst::BufferRef, id: u8) {
    let Ok(mut rtp) = gst_rtp::RTPBuffer::from_buffer_writable(buffer) else {
        return;
    };
    if rtp.extension_onebyte_header(id, 0).is_some() {
        return;
    }
    if rtp.add_extension_onebyte_header(id, &[0, 0]).is_err() {
        gst::trace!(CAT, "no room for the transport-wide-cc extension");
    }
}

/// The estimator webrtcbin puts in front of each transport
/// (`request-aux-sender`). gst-plugins-rs's RTP plugin is linked in and
/// registered on first use, so no separate install is needed.
pub fn make_estimator() -> Option<gst::Element> {
    if gst::ElementFactory::find("rtpgccbwe").is_none() {
        let _ = gstrsrtp::plugin_register_static();
    }
    let estimator = gst::ElementFactory::make("rtpgccbwe")
        .property("min-bitrate", MIN_BITRATE)
        .property("estimated-bitrate", START_BITRATE)
        .build();
    if let Err(e) = &estimator {
        gst::warning!(CAT, "no congestion control: {e}");
    }
    estimator.ok()
}

/// Shares `total` bit/s among the call's streams: audio first (a tenth of
/// the total, 16–64 kbit/s each, all of it when there is no video), the rest
/// to video, never below what keeps a picture moving.
pub fn allocate(total: u32, kinds: &[MediaKind]) -> Vec<u32> {
    let videos = kinds.iter().filter(|k| **k == MediaKind::Video).count() as u32;
    let audios = kinds.len() as u32 - videos;
    let audio_each = if videos == 0 {
        total / audios.max(1)
    } else {
        (total / 10 / audios.max(1)).clamp(MIN_BITRATE, 64_000)
    };
    let video_each = (total.saturating_sub(audio_each * audios) / videos.max(1)).max(30_000);
    kinds
        .iter()
        .map(|kind| match kind {
            MediaKind::Audio => audio_each,
            MediaKind::Video => video_each,
        })
        .collect()
}

/// The encoder feeding a `connectycubesink`, and how to set its bitrate.
pub struct EncoderControl {
    encoder: gst::Element,
    property: &'static str,
    /// The property counts kbit/s rather than bit/s.
    kilobits: bool,
    /// What the pipeline configured: congestion control only ever lowers it.
    ceiling: u32,
    /// What the encoder runs at now.
    current: u32,
}

impl EncoderControl {
    /// Walks upstream from `pad` through one-input elements (payloaders,
    /// parsers, capsfilters, queues) to the first encoder whose bitrate
    /// property is known.
    pub fn find(pad: &gst::Pad) -> Option<Self> {
        let mut pad = pad.peer()?;
        for _ in 0..16 {
            let element = pad.parent_element()?;
            let factory = element.factory().map(|f| f.name().to_string());
            if let Some((property, kilobits)) = factory.as_deref().and_then(bitrate_property) {
                let ceiling = read_integer(&element, property)?;
                let ceiling = if kilobits {
                    ceiling.saturating_mul(1000)
                } else {
                    ceiling
                };
                return Some(EncoderControl {
                    encoder: element,
                    property,
                    kilobits,
                    ceiling,
                    current: ceiling,
                });
            }
            let mut inputs = element.sink_pads().into_iter();
            let (Some(input), None) = (inputs.next(), inputs.next()) else {
                return None;
            };
            pad = input.peer()?;
        }
        None
    }

    /// Sets the encoder to `bitrate` bit/s (at most the configured one);
    /// returns what was set, or `None` when that is within 5 % of what the
    /// encoder runs at (estimates move a little with every report).
    pub fn apply(&mut self, bitrate: u32) -> Option<u32> {
        let bitrate = bitrate.min(self.ceiling);
        if bitrate.abs_diff(self.current) <= self.current / 20 {
            return None;
        }
        self.current = bitrate;
        let value = if self.kilobits {
            (bitrate / 1000).max(1)
        } else {
            bitrate
        };
        write_integer(&self.encoder, self.property, value);
        Some(bitrate)
    }

    /// Caps an Opus encoder's audio bandwidth to what a peer playing at
    /// `rate` Hz can use (`maxplaybackrate`); other encoders are left alone.
    /// Returns the bandwidth set.
    pub fn limit_audio_bandwidth(&self, rate: u32) -> Option<&'static str> {
        let property = match self.name().as_str() {
            "opusenc" => "bandwidth",
            "opusvoiceenc" => "max-bandwidth",
            _ => return None,
        };
        let bandwidth = match rate {
            0..=8000 => "narrowband",
            8001..=12000 => "mediumband",
            12001..=16000 => "wideband",
            16001..=24000 => "superwideband",
            _ => "fullband",
        };
        self.encoder.set_property_from_str(property, bandwidth);
        Some(bandwidth)
    }

    /// Tells an Opus encoder the loss its receiver reports (percent), so
    /// it adds in-band FEC as much as that loss calls for; other encoders
    /// are left alone. Returns whether it was told.
    pub fn expect_loss(&self, percent: u32) -> bool {
        match self.name().as_str() {
            "opusvoiceenc" => self.encoder.set_property("packet-loss-percentage", percent),
            "opusenc" => {
                self.encoder.set_property("inband-fec", percent > 0);
                write_integer(&self.encoder, "packet-loss-percentage", percent);
            }
            _ => return false,
        }
        true
    }

    pub fn name(&self) -> String {
        self.encoder
            .factory()
            .map_or_else(|| self.encoder.name().to_string(), |f| f.name().to_string())
    }
}

/// The bitrate property of the encoders a call may be fed by, and whether
/// it counts kbit/s.
fn bitrate_property(factory: &str) -> Option<(&'static str, bool)> {
    Some(match factory {
        "opusenc" | "opusvoiceenc" | "openh264enc" => ("bitrate", false),
        "vp8enc" | "vp9enc" => ("target-bitrate", false),
        "x264enc" | "vtenc_h264" | "vtenc_h264_hw" | "nvh264enc" | "nvv4l2h264enc" => {
            ("bitrate", true)
        }
        name if name.starts_with("va") && name.ends_with("enc") => ("bitrate", true),
        _ => return None,
    })
}

fn read_integer(element: &gst::Element, property: &str) -> Option<u32> {
    let value = element.property_value(property);
    value
        .get::<u32>()
        .ok()
        .or_else(|| value.get::<i32>().ok().and_then(|v| u32::try_from(v).ok()))
}

fn write_integer(element: &gst::Element, property: &str, value: u32) {
    let Some(pspec) = element.find_property(property) else {
        return;
    };
    let value = if pspec.value_type() == glib::Type::I32 {
        i32::try_from(value).unwrap_or(i32::MAX).to_value()
    } else {
        value.to_value()
    };
    element.set_property_from_value(property, &value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use gst_rtp::prelude::*;

    #[test]
    fn loss_is_told_at_once_and_forgotten_only_after_clean_reports() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut reports = LossReports::default();
        assert_eq!(reports.report(0, at(0)), None, "clean from the start");
        assert_eq!(reports.report(3, at(1)), Some(3), "loss told at once");
        assert_eq!(reports.report(3, at(2)), None, "the same loss again");
        assert_eq!(reports.report(12, at(3)), Some(12), "more at once");
        assert_eq!(reports.report(2, at(4)), Some(2), "less at once");
        assert_eq!(reports.report(0, at(5)), Some(1), "the least FEC kept");
        assert_eq!(reports.report(0, at(13)), None);
        assert_eq!(reports.report(0, at(14)), Some(0), "clean for 10 s");
        assert_eq!(reports.report(0, at(15)), None);
        assert_eq!(reports.report(1, at(16)), Some(1), "lossy again");
    }

    /// `audiotestsrc ! {encoder} bitrate=48000 ! rtpopuspay ! fakesink`, and
    /// the control of its encoder, found from the sink.
    fn control_behind_a_payloader(encoder: &str) -> (gst::Bin, EncoderControl) {
        let pipeline = gst::parse::launch(&format!(
            "audiotestsrc ! {encoder} name=encoder bitrate=48000 ! rtpopuspay ! fakesink name=out"
        ))
        .unwrap()
        .downcast::<gst::Bin>()
        .unwrap();
        let pad = pipeline.by_name("out").unwrap().static_pad("sink").unwrap();
        let control = EncoderControl::find(&pad).expect("the encoder found");
        (pipeline, control)
    }

    /// The loss a peer reports reaches the Opus encoder feeding the
    /// sink through its payloader: ours, or GStreamer's (which also needs
    /// its FEC switched on).
    #[test]
    fn reported_loss_reaches_the_opus_encoder_upstream() {
        gst::init().unwrap();
        crate::register().unwrap();
        for encoder in ["opusvoiceenc", "opusenc"] {
            let (pipeline, control) = control_behind_a_payloader(encoder);
            assert!(control.expect_loss(12));
            let encoder = pipeline.by_name("encoder").unwrap();
            assert_eq!(read_integer(&encoder, "packet-loss-percentage"), Some(12));
            if encoder.find_property("inband-fec").is_some() {
                assert!(encoder.property::<bool>("inband-fec"));
            }
        }
    }

    #[test]
    fn audio_alone_takes_everything_and_video_leaves_audio_its_share() {
        assert_eq!(allocate(40_000, &[MediaKind::Audio]), vec![40_000]);
        assert_eq!(
            allocate(1_000_000, &[MediaKind::Audio, MediaKind::Video]),
            vec![64_000, 936_000]
        );
        assert_eq!(
            allocate(100_000, &[MediaKind::Video, MediaKind::Audio]),
            vec![84_000, 16_000]
        );
    }

    #[test]
    fn the_extension_takes_a_free_id_and_keeps_an_existing_one() {
        gst::init().unwrap();
        let caps = gst::Caps::builder("application/x-rtp")
            .field("extmap-1", "urn:ietf:params:rtp-hdrext:sdes:mid")
            .build();
        let (caps, id) = with_twcc(&caps);
        assert_eq!(id, Some(2));
        let s = caps.structure(0).unwrap();
        assert_eq!(s.get::<&str>("extmap-2").unwrap(), TWCC_URI);
        assert!(s.get::<bool>("rtcp-fb-transport-cc").unwrap());
        assert_eq!(with_twcc(&caps).1, Some(2));
    }

    #[test]
    fn an_offer_we_answer_decides_the_extension_id() {
        gst::init().unwrap();
        let (ours, _) = with_twcc(&gst::Caps::builder("application/x-rtp").build());
        let caps = with_remote_twcc(&ours, Some(3));
        let s = caps.structure(0).unwrap();
        assert_eq!(s.get::<&str>("extmap-3").unwrap(), TWCC_URI);
        assert!(!s.has_field("extmap-1"));
        let caps = with_remote_twcc(&ours, None);
        let s = caps.structure(0).unwrap();
        assert!(!s.has_field("extmap-1") && !s.has_field("rtcp-fb-transport-cc"));
    }

    #[test]
    fn the_extension_is_written_once_into_a_packet() {
        gst::init().unwrap();
        let mut buffer = gst::Buffer::new_rtp_with_sizes(20, 0, 0).unwrap();
        add_twcc_extension(buffer.make_mut(), 3);
        add_twcc_extension(buffer.make_mut(), 3);
        let rtp = gst_rtp::RTPBuffer::from_buffer_readable(&buffer).unwrap();
        assert_eq!(rtp.extension_onebyte_header(3, 0), Some(&[0u8, 0][..]));
        assert_eq!(rtp.extension_onebyte_header(3, 1), None);
        assert_eq!(rtp.payload_size(), 20);
    }

    #[test]
    fn the_encoder_is_found_through_the_payloader_and_never_raised() {
        gst::init().unwrap();
        crate::register().unwrap();
        for encoder in ["opusenc", "opusvoiceenc"] {
            let (_pipeline, mut control) = control_behind_a_payloader(encoder);
            assert_eq!(control.name(), encoder);
            assert_eq!(control.apply(20_000), Some(20_000));
            assert_eq!(read_integer(&control.encoder, "bitrate"), Some(20_000));
            assert_eq!(control.apply(20_500), None, "small moves are ignored");
            assert_eq!(control.apply(500_000), Some(48_000));
            // What a peer's maxplaybackrate of 8000 does.
            assert_eq!(control.limit_audio_bandwidth(8000), Some("narrowband"));
        }
    }
}
