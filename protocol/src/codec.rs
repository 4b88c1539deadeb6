//! The codec table: every codec the bridge negotiates, with its RTP clock
//! rate, channel count and static payload type (RFC 3551) where it has one.

/// Whether a codec carries audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Audio,
    Video,
}

impl MediaKind {
    /// The SDP media name (`m=audio` / `m=video`).
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
        }
    }
}

/// One entry of the codec table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// Encoding name as GStreamer's RTP caps spell it (`encoding-name`).
    pub encoding_name: &'static str,
    pub kind: MediaKind,
    /// RTP clock rate. G.722 keeps 8000 for historical reasons (RFC 3551 §4.5.2).
    pub clock_rate: u32,
    pub channels: u8,
    /// Static payload type from RFC 3551, if any.
    pub static_payload_type: Option<u8>,
}

/// Codecs the bridge can carry on the SIP leg, in the order it prefers them
/// when it makes an offer.
pub const CODECS: &[Codec] = &[
    Codec {
        encoding_name: "OPUS",
        kind: MediaKind::Audio,
        clock_rate: 48000,
        channels: 2,
        static_payload_type: None,
    },
    Codec {
        encoding_name: "G722",
        kind: MediaKind::Audio,
        clock_rate: 8000,
        channels: 1,
        static_payload_type: Some(9),
    },
    Codec {
        encoding_name: "PCMU",
        kind: MediaKind::Audio,
        clock_rate: 8000,
        channels: 1,
        static_payload_type: Some(0),
    },
    Codec {
        encoding_name: "PCMA",
        kind: MediaKind::Audio,
        clock_rate: 8000,
        channels: 1,
        static_payload_type: Some(8),
    },
    Codec {
        encoding_name: "G729",
        kind: MediaKind::Audio,
        clock_rate: 8000,
        channels: 1,
        static_payload_type: Some(18),
    },
    Codec {
        encoding_name: "TELEPHONE-EVENT",
        kind: MediaKind::Audio,
        clock_rate: 8000,
        channels: 1,
        static_payload_type: None,
    },
    Codec {
        encoding_name: "H264",
        kind: MediaKind::Video,
        clock_rate: 90000,
        channels: 0,
        static_payload_type: None,
    },
    Codec {
        encoding_name: "VP8",
        kind: MediaKind::Video,
        clock_rate: 90000,
        channels: 0,
        static_payload_type: None,
    },
    Codec {
        encoding_name: "VP9",
        kind: MediaKind::Video,
        clock_rate: 90000,
        channels: 0,
        static_payload_type: None,
    },
];

/// Looks a codec up by encoding name (case-insensitive) and clock rate.
pub fn lookup(encoding_name: &str, clock_rate: u32) -> Option<&'static Codec> {
    CODECS
        .iter()
        .find(|c| c.encoding_name.eq_ignore_ascii_case(encoding_name) && c.clock_rate == clock_rate)
}

/// The codec a static payload type stands for when no `a=rtpmap` names it.
pub fn by_static_payload_type(payload_type: u8) -> Option<&'static Codec> {
    CODECS
        .iter()
        .find(|c| c.static_payload_type == Some(payload_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_payload_types_resolve() {
        assert_eq!(by_static_payload_type(0).unwrap().encoding_name, "PCMU");
        assert_eq!(by_static_payload_type(8).unwrap().encoding_name, "PCMA");
        assert_eq!(by_static_payload_type(9).unwrap().encoding_name, "G722");
        assert_eq!(by_static_payload_type(18).unwrap().encoding_name, "G729");
        assert!(by_static_payload_type(96).is_none());
    }

    #[test]
    fn lookup_ignores_case_and_checks_rate() {
        assert_eq!(lookup("opus", 48000).unwrap().channels, 2);
        assert!(lookup("opus", 8000).is_none());
        assert_eq!(lookup("h264", 90000).unwrap().kind, MediaKind::Video);
    }
}
