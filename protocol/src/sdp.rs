//! Reading SDP (RFC 8866) into what a media endpoint needs: where to send,
//! which payload types mean which codec, direction, ptime, RTCP port and mux.
//!
//! Line syntax is left to `sdp-types`; this module adds the RTP meaning and
//! turns every problem into an [`SdpError`] that says which section is wrong.

use std::net::IpAddr;

use crate::codec;

/// Larger descriptions are refused before parsing: no real offer comes close.
pub const MAX_SDP_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    #[error("SDP is {0} bytes long, more than the {MAX_SDP_LEN} allowed")]
    TooLarge(usize),
    #[error("malformed SDP: {0}")]
    Syntax(String),
    #[error("SDP has no media section")]
    NoMedia,
    #[error("SDP media section {index}: {reason}")]
    Media { index: usize, reason: String },
}

/// Media direction attribute (RFC 3264 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    #[default]
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

/// One payload type of a media section, resolved to a codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadFormat {
    pub payload_type: u8,
    /// Upper-case encoding name, as GStreamer's RTP caps spell it.
    pub encoding_name: String,
    pub clock_rate: u32,
    /// Channel count from `a=rtpmap` (audio only), when given.
    pub channels: Option<u8>,
    /// The `a=fmtp` parameters, verbatim.
    pub fmtp: Option<String>,
}

/// The RTP-relevant content of one `m=` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSection {
    /// `audio`, `video`, …
    pub kind: String,
    /// 0 means the stream is rejected or disabled.
    pub port: u16,
    /// `RTP/AVP`, `RTP/SAVP`, `RTP/AVPF`, `UDP/TLS/RTP/SAVPF`, …
    pub proto: String,
    /// The media-level `c=` address, else the session-level one.
    pub address: Option<IpAddr>,
    /// From `a=rtcp` (RFC 3605); otherwise RTCP goes to `port + 1`.
    pub rtcp_port: Option<u16>,
    pub rtcp_address: Option<IpAddr>,
    pub rtcp_mux: bool,
    pub direction: Direction,
    pub ptime: Option<u32>,
    /// Payload formats in the sender's order of preference.
    pub formats: Vec<PayloadFormat>,
    /// `a=crypto` lines (SDES-SRTP, RFC 4568), verbatim.
    pub crypto: Vec<String>,
    /// `a=rtcp-fb` (RFC 4585): the payload type it names (none for `*`)
    /// and the feedback type with its parameter, e.g. `nack pli`.
    pub rtcp_feedback: Vec<(Option<u8>, String)>,
}

impl MediaSection {
    /// The port RTCP is sent to when it is not multiplexed.
    pub fn effective_rtcp_port(&self) -> u16 {
        self.rtcp_port.unwrap_or_else(|| self.port.wrapping_add(1))
    }

    pub fn format(&self, payload_type: u8) -> Option<&PayloadFormat> {
        self.formats.iter().find(|f| f.payload_type == payload_type)
    }
}

/// A parsed session description: its media sections in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    /// Session-level `c=` address.
    pub address: Option<IpAddr>,
    pub media: Vec<MediaSection>,
}

/// Parses a complete SDP body.
pub fn parse(text: &str) -> Result<SessionDescription, SdpError> {
    if text.len() > MAX_SDP_LEN {
        return Err(SdpError::TooLarge(text.len()));
    }
    let session =
        sdp_types::Session::parse(text.as_bytes()).map_err(|e| SdpError::Syntax(e.to_string()))?;
    let session_address = match &session.connection {
        Some(c) => Some(connection_address(c).map_err(SdpError::Syntax)?),
        None => None,
    };
    let media = session
        .medias
        .iter()
        .enumerate()
        .map(|(index, m)| {
            media_section(m, session_address).map_err(|reason| SdpError::Media { index, reason })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SessionDescription {
        address: session_address,
        media,
    })
}

/// Parses the first media section of `text`, which may be a whole SDP body or
/// just an `m=` section with its attributes (as set on `sipsrc`'s `sdp` property).
pub fn parse_media_section(text: &str) -> Result<MediaSection, SdpError> {
    let trimmed = text.trim_start();
    let owned;
    let full = if trimmed.starts_with("v=") {
        trimmed
    } else {
        owned = format!("v=0\r\n{trimmed}");
        &owned
    };
    parse(full)?
        .media
        .into_iter()
        .next()
        .ok_or(SdpError::NoMedia)
}

fn connection_address(connection: &sdp_types::Connection) -> Result<IpAddr, String> {
    // "c=IN IP4 224.2.1.1/127" carries a TTL; unicast addresses have none.
    let address = connection
        .connection_address
        .split('/')
        .next()
        .unwrap_or_default();
    address
        .parse()
        .map_err(|_| format!("connection address {address:?} is not an IP address"))
}

fn media_section(
    media: &sdp_types::Media,
    session_address: Option<IpAddr>,
) -> Result<MediaSection, String> {
    let address = match media.connections.first() {
        Some(c) => Some(connection_address(c)?),
        None => session_address,
    };
    let is_rtp = media.proto.contains("RTP/");

    let mut formats = Vec::new();
    if is_rtp {
        for token in media.fmt.split_ascii_whitespace() {
            let payload_type: u8 = token
                .parse()
                .ok()
                .filter(|pt| *pt < 128)
                .ok_or_else(|| format!("payload type {token:?} is not a number below 128"))?;
            if let Some(format) = resolve_format(media, payload_type)? {
                formats.push(format);
            }
        }
    }

    let mut section = MediaSection {
        kind: media.media.clone(),
        port: media.port,
        proto: media.proto.clone(),
        address,
        rtcp_port: None,
        rtcp_address: None,
        rtcp_mux: false,
        direction: Direction::default(),
        ptime: None,
        formats,
        crypto: Vec::new(),
        rtcp_feedback: Vec::new(),
    };
    for attribute in &media.attributes {
        let value = attribute.value.as_deref().unwrap_or("");
        match attribute.attribute.as_str() {
            "sendrecv" => section.direction = Direction::SendRecv,
            "sendonly" => section.direction = Direction::SendOnly,
            "recvonly" => section.direction = Direction::RecvOnly,
            "inactive" => section.direction = Direction::Inactive,
            "rtcp-mux" => section.rtcp_mux = true,
            "ptime" => {
                section.ptime = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| format!("a=ptime:{value} is not a number"))?,
                )
            }
            "rtcp" => {
                let mut fields = value.split_ascii_whitespace();
                let port = fields.next().unwrap_or_default();
                section.rtcp_port = Some(
                    port.parse()
                        .map_err(|_| format!("a=rtcp port {port:?} is not a port number"))?,
                );
                if let (Some(_nettype), Some(_addrtype), Some(addr)) =
                    (fields.next(), fields.next(), fields.next())
                {
                    section.rtcp_address =
                        Some(addr.parse().map_err(|_| {
                            format!("a=rtcp address {addr:?} is not an IP address")
                        })?);
                }
            }
            "crypto" => section.crypto.push(value.to_owned()),
            "rtcp-fb" => {
                let (pt, feedback) = value.trim().split_once(' ').unwrap_or((value, ""));
                let pt = match pt {
                    "*" => None,
                    pt => Some(
                        pt.parse()
                            .map_err(|_| format!("a=rtcp-fb:{value} names no payload type"))?,
                    ),
                };
                let feedback = feedback.split_ascii_whitespace().collect::<Vec<_>>();
                section.rtcp_feedback.push((pt, feedback.join(" ")));
            }
            _ => {}
        }
    }
    Ok(section)
}

/// Resolves a payload type through `a=rtpmap`, falling back to the static
/// table. A dynamic type without rtpmap, or an unknown static one, cannot be
/// used and is skipped.
fn resolve_format(
    media: &sdp_types::Media,
    payload_type: u8,
) -> Result<Option<PayloadFormat>, String> {
    let fmtp = pt_attribute(media, "fmtp", payload_type).map(str::to_owned);
    if let Some(rtpmap) = pt_attribute(media, "rtpmap", payload_type) {
        let mut parts = rtpmap.trim().split('/');
        let name = parts.next().unwrap_or_default();
        if name.is_empty() {
            return Err(format!("a=rtpmap:{payload_type} has no encoding name"));
        }
        let clock_rate = parts
            .next()
            .and_then(|r| r.parse::<u32>().ok())
            .filter(|r| *r > 0)
            .ok_or_else(|| format!("a=rtpmap:{payload_type} has no valid clock rate"))?;
        let channels = match parts.next() {
            Some(c) => Some(c.parse::<u8>().ok().filter(|c| *c > 0).ok_or_else(|| {
                format!("a=rtpmap:{payload_type} channel count {c:?} is invalid")
            })?),
            None => None,
        };
        return Ok(Some(PayloadFormat {
            payload_type,
            encoding_name: name.to_ascii_uppercase(),
            clock_rate,
            channels,
            fmtp,
        }));
    }
    Ok(
        codec::by_static_payload_type(payload_type).map(|c| PayloadFormat {
            payload_type,
            encoding_name: c.encoding_name.to_owned(),
            clock_rate: c.clock_rate,
            channels: None,
            fmtp,
        }),
    )
}

/// The value of `a=<name>:<pt> <value>` for one payload type.
fn pt_attribute<'a>(media: &'a sdp_types::Media, name: &str, payload_type: u8) -> Option<&'a str> {
    media
        .attributes
        .iter()
        .filter(|a| a.attribute == name)
        .filter_map(|a| a.value.as_deref())
        .find_map(|v| {
            let (pt, rest) = v.split_once(' ')?;
            (pt.parse::<u8>().ok()? == payload_type).then_some(rest)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // A baresip 1.0 offer, as seen on the wire.
    const BARESIP_OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 10000 RTP/AVP 96 9 0 8 101\r\na=rtpmap:96 opus/48000/2\r\n\
a=fmtp:96 stereo=1;sprop-stereo=1\r\na=rtpmap:9 G722/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-15\r\na=rtcp-rsize\r\na=ptime:20\r\na=sendrecv\r\n\
m=video 10002 RTP/AVP 100\r\nc=IN IP6 ::1\r\na=rtpmap:100 H264/90000\r\n\
a=fmtp:100 packetization-mode=0\r\na=rtcp:10005 IN IP6 ::1\r\na=sendonly\r\n";

    #[test]
    fn parses_a_softphone_offer() {
        let sdp = parse(BARESIP_OFFER).unwrap();
        assert_eq!(sdp.media.len(), 2);
        let audio = &sdp.media[0];
        assert_eq!(audio.port, 10000);
        assert_eq!(audio.address, Some("127.0.0.1".parse().unwrap()));
        let names: Vec<_> = audio
            .formats
            .iter()
            .map(|f| f.encoding_name.as_str())
            .collect();
        assert_eq!(names, ["OPUS", "G722", "PCMU", "PCMA", "TELEPHONE-EVENT"]);
        assert_eq!(audio.formats[0].channels, Some(2));
        assert_eq!(audio.format(101).unwrap().fmtp.as_deref(), Some("0-15"));
        assert_eq!(audio.ptime, Some(20));
        assert_eq!(audio.effective_rtcp_port(), 10001);

        let video = &sdp.media[1];
        assert_eq!(video.address, Some("::1".parse().unwrap()));
        assert_eq!(video.direction, Direction::SendOnly);
        assert_eq!(video.effective_rtcp_port(), 10005);
        assert_eq!(
            video.formats[0].fmtp.as_deref(),
            Some("packetization-mode=0")
        );
    }

    #[test]
    fn parses_a_bare_media_section() {
        let m = parse_media_section("m=audio 4000 RTP/AVP 18\nc=IN IP4 10.0.0.1\na=rtcp-mux\n")
            .unwrap();
        assert_eq!(m.formats[0].encoding_name, "G729");
        assert!(m.rtcp_mux);
    }

    #[test]
    fn errors_name_the_problem() {
        let err = parse("v=0\r\nm=audio 4000 RTP/AVP 300\r\n").unwrap_err();
        assert!(matches!(err, SdpError::Media { index: 0, .. }), "{err}");
        let err = parse("v=0\r\nm=audio 4000 RTP/AVP 96\r\na=rtpmap:96 opus/fast\r\n").unwrap_err();
        assert!(err.to_string().contains("clock rate"), "{err}");
        assert!(matches!(
            parse_media_section("v=0\r\n"),
            Err(SdpError::NoMedia)
        ));
        assert!(matches!(
            parse(&"a".repeat(MAX_SDP_LEN + 1)),
            Err(SdpError::TooLarge(_))
        ));
        assert!(parse("v=0\r\nc=IN IP4 not-an-ip\r\n").is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = parse(&text);
            let _ = parse_media_section(&text);
        }

        #[test]
        fn mutated_offers_never_panic(cut in 0usize..BARESIP_OFFER.len(), junk in "[ -~\r\n]{0,40}") {
            let mut text = BARESIP_OFFER[..cut].to_owned();
            text.push_str(&junk);
            text.push_str(&BARESIP_OFFER[cut..]);
            let _ = parse(&text);
        }
    }
}
