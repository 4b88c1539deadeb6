//! SDP offer/answer (RFC 3264) for the SIP leg: picks, for each offered
//! stream, the first codec in the *offerer's* order that the bridge can carry,
//! keeps the offerer's payload-type numbers and fmtp, and writes the answer.
//! It also writes the bridge's own offers (outbound calls, re-INVITEs without
//! SDP).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::codec::{self, Codec, MediaKind};
use crate::sdes::{CryptoAttribute, SrtpKey};
use crate::sdp::{Direction, MediaSection, PayloadFormat, SessionDescription};

/// Why no answer can be given; a UAS answers 488 Not Acceptable Here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("no offered stream carries a codec the bridge supports ({0})")]
    NoCommonCodec(String),
    #[error("offered stream {index} has no connection address")]
    NoAddress { index: usize },
}

/// What the bridge is willing to carry, in its own order of preference
/// (used only for its offers; answers follow the offerer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Encoding names from [`codec::CODECS`], e.g. `["PCMU", "OPUS"]`.
    pub audio: Vec<&'static str>,
    pub video: Vec<&'static str>,
    /// Accept and offer RFC 4733 `telephone-event/8000`.
    pub dtmf: bool,
    /// Our master key and salt for SDES-SRTP (the suite follows the offer);
    /// without one, RTP/SAVP streams are refused.
    pub sdes: Option<SrtpKey>,
    /// Plain RTP/AVP streams are refused: SRTP only.
    pub srtp_required: bool,
}

impl Capabilities {
    /// Every audio codec of the table, no video.
    pub fn all_audio() -> Self {
        Self {
            audio: codec::CODECS
                .iter()
                .filter(|c| c.kind == MediaKind::Audio && c.encoding_name != DTMF)
                .map(|c| c.encoding_name)
                .collect(),
            video: Vec::new(),
            dtmf: true,
            sdes: None,
            srtp_required: false,
        }
    }

    /// Every audio and video codec of the table.
    pub fn all() -> Self {
        Self {
            video: codec::CODECS
                .iter()
                .filter(|c| c.kind == MediaKind::Video)
                .map(|c| c.encoding_name)
                .collect(),
            ..Self::all_audio()
        }
    }

    fn allows(&self, kind: MediaKind, encoding_name: &str) -> bool {
        let list = match kind {
            MediaKind::Audio => &self.audio,
            MediaKind::Video => &self.video,
        };
        list.iter().any(|n| n.eq_ignore_ascii_case(encoding_name))
    }
}

const DTMF: &str = "TELEPHONE-EVENT";

/// The RTCP feedback (RFC 4585) the bridge both sends and acts on: the
/// key-frame requests. Not generic NACK: it keeps no packets to send again.
const FEEDBACK: [&str; 2] = ["nack pli", "ccm fir"];

/// An H.264 format's packetization mode (RFC 6184: 0 unless given).
fn h264_mode(format: &PayloadFormat) -> u8 {
    crate::h264::packetization_mode(format.fmtp.as_deref())
}

/// The RTP profile `proto` names, if the bridge speaks it: (SRTP, RTCP feedback).
fn rtp_profile(proto: &str) -> Option<(bool, bool)> {
    match proto.to_ascii_uppercase().as_str() {
        "RTP/AVP" => Some((false, false)),
        "RTP/AVPF" => Some((false, true)),
        "RTP/SAVP" => Some((true, false)),
        "RTP/SAVPF" => Some((true, true)),
        _ => None,
    }
}

/// The SDP name of the RTP profile: SRTP or not, RTCP feedback or not.
pub fn profile_name(srtp: bool, feedback: bool) -> &'static str {
    match (srtp, feedback) {
        (false, false) => "RTP/AVP",
        (false, true) => "RTP/AVPF",
        (true, false) => "RTP/SAVP",
        (true, true) => "RTP/SAVPF",
    }
}

/// One accepted stream: what both ends send and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiatedStream {
    /// Index of the `m=` section in the offer.
    pub index: usize,
    pub kind: MediaKind,
    pub codec: &'static Codec,
    /// The payload format as the offerer numbered it (and its fmtp).
    pub format: PayloadFormat,
    /// RFC 4733 events, when both sides do them.
    pub dtmf: Option<DtmfFormat>,
    /// Packet time in ms (offered, or 20).
    pub ptime: u32,
    /// Where the peer wants RTP.
    pub remote_rtp: SocketAddr,
    /// Where the peer wants RTCP (equal to `remote_rtp` with mux).
    pub remote_rtcp: SocketAddr,
    pub rtcp_mux: bool,
    /// The direction *we* use (the offer's, seen from our side).
    pub direction: Direction,
    /// SDES-SRTP keys, when the stream is RTP/SAVP.
    pub srtp: Option<NegotiatedSrtp>,
    /// The peer's profile has RTCP feedback (RTP/AVPF or RTP/SAVPF, RFC
    /// 4585), which the answer keeps, with those of the bridge's feedback
    /// types the offer named for the stream's format.
    pub feedback: Option<Vec<&'static str>>,
}

/// RFC 4733 telephone events as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfFormat {
    pub payload_type: u8,
    pub clock_rate: u32,
}

/// The keys of one SRTP stream: the peer's from its `a=crypto`, ours for
/// the answer, under the tag and suite the peer chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiatedSrtp {
    pub tag: u32,
    pub send: SrtpKey,
    pub receive: SrtpKey,
}

impl NegotiatedSrtp {
    /// Takes the first offered attribute we can use; `ours` gives the key.
    fn choose(crypto: &[String], ours: &SrtpKey) -> Option<Self> {
        let offered = crypto
            .iter()
            .find_map(|value| CryptoAttribute::parse(value).ok())?;
        Some(Self {
            tag: offered.tag,
            send: SrtpKey {
                suite: offered.key.suite,
                key_salt: ours.key_salt,
            },
            receive: offered.key,
        })
    }

    fn answer_attribute(&self) -> CryptoAttribute {
        CryptoAttribute {
            tag: self.tag,
            key: self.send.clone(),
        }
    }
}

impl NegotiatedStream {
    /// Whether we may send media to the peer.
    pub fn we_send(&self) -> bool {
        matches!(self.direction, Direction::SendRecv | Direction::SendOnly)
    }

    /// The peer's `m=` section restricted to the chosen format (and DTMF),
    /// as `sipsrc`/`sipsink` take it in their `sdp` property.
    pub fn media_section_text(&self) -> String {
        let mut text = String::new();
        let mut pts = vec![self.format.payload_type];
        pts.extend(self.dtmf.map(|d| d.payload_type));
        let pts: Vec<String> = pts.iter().map(u8::to_string).collect();
        let _ = write!(
            text,
            "m={} {} RTP/AVP {}\r\nc=IN {} {}\r\n",
            self.kind.as_str(),
            self.remote_rtp.port(),
            pts.join(" "),
            addr_type(self.remote_rtp.ip()),
            self.remote_rtp.ip()
        );
        write_format(&mut text, &self.format);
        if let Some(dtmf) = self.dtmf {
            let _ = write!(
                text,
                "a=rtpmap:{} telephone-event/{}\r\n",
                dtmf.payload_type, dtmf.clock_rate
            );
        }
        if self.rtcp_mux {
            text.push_str("a=rtcp-mux\r\n");
        } else {
            let _ = write!(text, "a=rtcp:{}\r\n", self.remote_rtcp.port());
        }
        text
    }
}

/// The outcome of answering an offer: the streams accepted, in offer order.
/// Every offered `m=` line gets a line in the answer; the others are refused
/// with port 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    pub streams: Vec<NegotiatedStream>,
    offered_kinds: Vec<(String, String, String)>,
}

impl Negotiation {
    pub fn audio(&self) -> Option<&NegotiatedStream> {
        self.streams.iter().find(|s| s.kind == MediaKind::Audio)
    }

    pub fn video(&self) -> Option<&NegotiatedStream> {
        self.streams.iter().find(|s| s.kind == MediaKind::Video)
    }
}

/// Answers `offer`: for each kind, the first usable stream takes the first
/// offered codec we allow; more streams of a kind are refused.
pub fn answer(
    offer: &SessionDescription,
    capabilities: &Capabilities,
) -> Result<Negotiation, NegotiationError> {
    let mut streams: Vec<NegotiatedStream> = Vec::new();
    let mut offered_kinds = Vec::new();
    for (index, media) in offer.media.iter().enumerate() {
        offered_kinds.push((
            media.kind.clone(),
            media.proto.clone(),
            media
                .formats
                .first()
                .map_or_else(|| "0".to_owned(), |f| f.payload_type.to_string()),
        ));
        let Some(kind) = media_kind(&media.kind) else {
            continue;
        };
        if media.port == 0 || streams.iter().any(|s| s.kind == kind) {
            continue;
        }
        // Plain RTP (unless SRTP is required), or SDES-SRTP when we have a
        // key and a usable a=crypto, each with or without RTCP feedback;
        // anything else (DTLS) is refused stream by stream.
        let Some((secure, feedback)) = rtp_profile(&media.proto) else {
            continue;
        };
        let srtp = if secure {
            match capabilities
                .sdes
                .as_ref()
                .and_then(|ours| NegotiatedSrtp::choose(&media.crypto, ours))
            {
                Some(srtp) => Some(srtp),
                None => continue,
            }
        } else if capabilities.srtp_required {
            continue;
        } else {
            None
        };
        let usable = |f: &PayloadFormat| {
            let codec = codec::lookup(&f.encoding_name, f.clock_rate)?;
            (codec.kind == kind
                && codec.encoding_name != DTMF
                && capabilities.allows(kind, codec.encoding_name))
            .then_some(codec)
        };
        let Some((codec, mut format)) = media
            .formats
            .iter()
            .find_map(|f| usable(f).map(|codec| (codec, f.clone())))
        else {
            continue;
        };
        // The bridge's H.264 packetizer fragments large NAL units (FU-A,
        // packetization mode 1): of the offered H.264 formats, one that
        // takes them, when there is one.
        if codec.encoding_name == "H264" && h264_mode(&format) != 1 {
            let fragmenting = media
                .formats
                .iter()
                .find(|f| usable(f) == Some(codec) && h264_mode(f) == 1);
            if let Some(fragmenting) = fragmenting {
                format = fragmenting.clone();
            }
        }
        let address = media.address.ok_or(NegotiationError::NoAddress { index })?;
        let feedback = feedback.then(|| match kind {
            MediaKind::Audio => Vec::new(),
            MediaKind::Video => FEEDBACK
                .into_iter()
                .filter(|ours| {
                    media.rtcp_feedback.iter().any(|(pt, offered)| {
                        pt.is_none_or(|pt| pt == format.payload_type)
                            && offered.eq_ignore_ascii_case(ours)
                    })
                })
                .collect(),
        });
        let dtmf = (kind == MediaKind::Audio && capabilities.dtmf)
            .then(|| dtmf_format(media, format.clock_rate))
            .flatten();
        let remote_rtp = SocketAddr::new(address, media.port);
        let remote_rtcp = if media.rtcp_mux {
            remote_rtp
        } else {
            SocketAddr::new(
                media.rtcp_address.unwrap_or(address),
                media.effective_rtcp_port(),
            )
        };
        streams.push(NegotiatedStream {
            index,
            kind,
            codec,
            format,
            dtmf,
            ptime: media.ptime.filter(|p| (10..=120).contains(p)).unwrap_or(20),
            remote_rtp,
            remote_rtcp,
            rtcp_mux: media.rtcp_mux,
            direction: reverse(offered_direction(media.direction, address)),
            srtp,
            feedback,
        });
    }
    if streams.is_empty() {
        let offered: Vec<String> = offer
            .media
            .iter()
            .flat_map(|m| {
                m.formats
                    .iter()
                    .map(move |f| format!("{} {}/{}", m.proto, f.encoding_name, f.clock_rate))
            })
            .collect();
        return Err(NegotiationError::NoCommonCodec(if offered.is_empty() {
            "nothing offered".to_owned()
        } else {
            format!("offered: {}", offered.join(", "))
        }));
    }
    Ok(Negotiation {
        streams,
        offered_kinds,
    })
}

/// Where the bridge receives one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalStream {
    pub rtp_port: u16,
}

/// Identity of the SDP session (`o=` line): the version must grow with every
/// changed description sent in the same dialog (RFC 3264 §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub session_id: u64,
    pub version: u64,
}

/// Writes the answer to an offer already negotiated. `local[i]` is where
/// the bridge receives `negotiation.streams[i]`.
pub fn render_answer(
    negotiation: &Negotiation,
    origin: Origin,
    address: IpAddr,
    local: &[LocalStream],
) -> String {
    let mut sdp = session_header(origin, address);
    for (index, (kind, proto, first_pt)) in negotiation.offered_kinds.iter().enumerate() {
        let accepted = negotiation
            .streams
            .iter()
            .zip(local)
            .find(|(s, _)| s.index == index);
        match accepted {
            Some((stream, local)) => {
                let mut pts = vec![stream.format.payload_type];
                pts.extend(stream.dtmf.map(|d| d.payload_type));
                let proto = profile_name(stream.srtp.is_some(), stream.feedback.is_some());
                write_media_line(&mut sdp, stream.kind.as_str(), proto, local.rtp_port, &pts);
                write_format(&mut sdp, &stream.format);
                for feedback in stream.feedback.iter().flatten() {
                    write_feedback(&mut sdp, stream.format.payload_type, feedback);
                }
                if let Some(dtmf) = stream.dtmf {
                    write_dtmf(&mut sdp, dtmf);
                }
                if stream.kind == MediaKind::Audio {
                    let _ = write!(sdp, "a=ptime:{}\r\n", stream.ptime);
                }
                if stream.rtcp_mux {
                    sdp.push_str("a=rtcp-mux\r\n");
                }
                if let Some(srtp) = &stream.srtp {
                    let _ = write!(sdp, "a=crypto:{}\r\n", srtp.answer_attribute().value());
                }
                let _ = write!(sdp, "a={}\r\n", direction_attribute(stream.direction));
            }
            None => {
                let _ = write!(sdp, "m={kind} 0 {proto} {first_pt}\r\n");
            }
        }
    }
    sdp
}

/// One stream of an offer the bridge makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedStream {
    pub kind: MediaKind,
    pub rtp_port: u16,
    pub direction: Direction,
    /// SDES-SRTP: offered as RTP/SAVP with this key; without, plain RTP/AVP.
    pub crypto: Option<CryptoAttribute>,
    /// Offered with RTCP feedback (RTP/AVPF, or RTP/SAVPF with `crypto`),
    /// video with the bridge's key-frame requests.
    pub feedback: bool,
}

/// Writes an offer listing every allowed codec of each stream in the bridge's
/// order, with dynamic payload types from 96 up.
pub fn render_offer(
    capabilities: &Capabilities,
    origin: Origin,
    address: IpAddr,
    streams: &[OfferedStream],
) -> String {
    let mut sdp = session_header(origin, address);
    let mut next_dynamic = 96u8;
    for stream in streams {
        let names = match stream.kind {
            MediaKind::Audio => &capabilities.audio,
            MediaKind::Video => &capabilities.video,
        };
        let mut formats: Vec<PayloadFormat> = names
            .iter()
            .filter_map(|name| {
                codec::CODECS
                    .iter()
                    .find(|c| c.kind == stream.kind && c.encoding_name.eq_ignore_ascii_case(name))
            })
            .flat_map(|c| {
                let mut payload_type = || {
                    c.static_payload_type.unwrap_or_else(|| {
                        next_dynamic += 1;
                        next_dynamic - 1
                    })
                };
                let format = offered_format(c, payload_type());
                // H.264 in single NAL units too, after the fragmenting mode,
                // for phones that take no other (RFC 6184: an answerer
                // without a format's packetization mode refuses that format).
                let single_nal_units = (c.encoding_name == "H264").then(|| PayloadFormat {
                    payload_type: payload_type(),
                    fmtp: Some(SINGLE_NAL_H264_FMTP.to_owned()),
                    ..format.clone()
                });
                std::iter::once(format).chain(single_nal_units)
            })
            .collect();
        // Events at 8 kHz, and at 48 kHz too with Opus, so that a phone
        // answering Opus can take them at its stream's rate.
        let mut dtmf_rates = Vec::new();
        if stream.kind == MediaKind::Audio && capabilities.dtmf {
            dtmf_rates.push(8000);
            if formats.iter().any(|f| f.clock_rate == 48000) {
                dtmf_rates.push(48000);
            }
        }
        let dtmf: Vec<DtmfFormat> = dtmf_rates
            .into_iter()
            .map(|clock_rate| {
                next_dynamic += 1;
                DtmfFormat {
                    payload_type: next_dynamic - 1,
                    clock_rate,
                }
            })
            .collect();
        let mut pts: Vec<u8> = formats.iter().map(|f| f.payload_type).collect();
        pts.extend(dtmf.iter().map(|d| d.payload_type));
        let proto = profile_name(stream.crypto.is_some(), stream.feedback);
        write_media_line(&mut sdp, stream.kind.as_str(), proto, stream.rtp_port, &pts);
        for format in formats.drain(..) {
            write_format(&mut sdp, &format);
            if stream.feedback && stream.kind == MediaKind::Video {
                for feedback in FEEDBACK {
                    write_feedback(&mut sdp, format.payload_type, feedback);
                }
            }
        }
        for dtmf in dtmf {
            write_dtmf(&mut sdp, dtmf);
        }
        if let Some(crypto) = &stream.crypto {
            let _ = write!(sdp, "a=crypto:{}\r\n", crypto.value());
        }
        if stream.kind == MediaKind::Audio {
            sdp.push_str("a=ptime:20\r\n");
        }
        let _ = write!(sdp, "a={}\r\n", direction_attribute(stream.direction));
    }
    sdp
}

/// The audio stream the bridge's media starts with while its own offer
/// (in a 200 OK to an INVITE without one) awaits the answer in the ACK:
/// the first codec of `capabilities`, numbered as [`render_offer`] numbers
/// it, inactive, and sent nowhere until the answer says where.
pub fn provisional_audio(capabilities: &Capabilities) -> Option<NegotiatedStream> {
    let nowhere = IpAddr::from([0, 0, 0, 0]);
    let stream = OfferedStream {
        kind: MediaKind::Audio,
        rtp_port: 9,
        direction: Direction::Inactive,
        crypto: None,
        feedback: false,
    };
    let origin = Origin {
        session_id: 0,
        version: 0,
    };
    let offer = render_offer(capabilities, origin, nowhere, &[stream]);
    let offer = crate::sdp::parse(&offer).ok()?;
    answer(&offer, capabilities).ok()?.audio().cloned()
}

/// The bridge's H.264 in packetization mode 0 (the default).
const SINGLE_NAL_H264_FMTP: &str = "profile-level-id=42e01f";

/// The fmtp the bridge offers for a codec it sends.
fn offered_format(codec: &Codec, payload_type: u8) -> PayloadFormat {
    let fmtp = match codec.encoding_name {
        "OPUS" => Some("useinbandfec=1"),
        "G729" => Some("annexb=yes"),
        "H264" => Some("profile-level-id=42e01f;packetization-mode=1"),
        _ => None,
    };
    PayloadFormat {
        payload_type,
        encoding_name: codec.encoding_name.to_owned(),
        clock_rate: codec.clock_rate,
        channels: (codec.channels > 1).then_some(codec.channels),
        fmtp: fmtp.map(str::to_owned),
    }
}

fn session_header(origin: Origin, address: IpAddr) -> String {
    let kind = addr_type(address);
    format!(
        "v=0\r\no=sip-cc-bridge {} {} IN {kind} {address}\r\ns=sip-cc-bridge\r\nc=IN {kind} {address}\r\nt=0 0\r\n",
        origin.session_id, origin.version
    )
}

fn write_media_line(sdp: &mut String, kind: &str, proto: &str, port: u16, pts: &[u8]) {
    let pts: Vec<String> = pts.iter().map(u8::to_string).collect();
    let _ = write!(sdp, "m={kind} {port} {proto} {}\r\n", pts.join(" "));
}

fn write_format(sdp: &mut String, format: &PayloadFormat) {
    let pt = format.payload_type;
    let name = rtpmap_name(&format.encoding_name);
    let _ = match format.channels {
        Some(channels) if channels > 1 => write!(
            sdp,
            "a=rtpmap:{pt} {name}/{}/{channels}\r\n",
            format.clock_rate
        ),
        _ => write!(sdp, "a=rtpmap:{pt} {name}/{}\r\n", format.clock_rate),
    };
    if let Some(fmtp) = &format.fmtp {
        let _ = write!(sdp, "a=fmtp:{pt} {fmtp}\r\n");
    }
}

fn write_feedback(sdp: &mut String, payload_type: u8, feedback: &str) {
    let _ = write!(sdp, "a=rtcp-fb:{payload_type} {feedback}\r\n");
}

fn write_dtmf(sdp: &mut String, dtmf: DtmfFormat) {
    let DtmfFormat {
        payload_type: pt,
        clock_rate,
    } = dtmf;
    let _ = write!(
        sdp,
        "a=rtpmap:{pt} telephone-event/{clock_rate}\r\na=fmtp:{pt} 0-16\r\n"
    );
}

/// Encoding names as phones spell them in `a=rtpmap`.
fn rtpmap_name(encoding_name: &str) -> &str {
    match encoding_name {
        "OPUS" => "opus",
        "TELEPHONE-EVENT" => "telephone-event",
        other => other,
    }
}

/// The offered telephone-event at the stream codec's clock rate (RFC 4733
/// §2.1: the events share the stream's timestamps), else at 8 kHz.
fn dtmf_format(media: &MediaSection, clock_rate: u32) -> Option<DtmfFormat> {
    let at = |rate: u32| {
        media
            .formats
            .iter()
            .find(|f| f.encoding_name.eq_ignore_ascii_case(DTMF) && f.clock_rate == rate)
            .map(|f| DtmfFormat {
                payload_type: f.payload_type,
                clock_rate: rate,
            })
    };
    at(clock_rate).or_else(|| at(8000))
}

fn media_kind(name: &str) -> Option<MediaKind> {
    match name {
        "audio" => Some(MediaKind::Audio),
        "video" => Some(MediaKind::Video),
        _ => None,
    }
}

/// The direction a stream is offered in. A connection address of zero is
/// RFC 2543's hold, still sent by older phones: the offerer receives
/// nothing (RFC 3264 §8.4), and nothing may be sent to it.
fn offered_direction(direction: Direction, address: IpAddr) -> Direction {
    if !address.is_unspecified() {
        return direction;
    }
    match direction {
        Direction::SendRecv | Direction::SendOnly => Direction::SendOnly,
        Direction::RecvOnly | Direction::Inactive => Direction::Inactive,
    }
}

fn reverse(direction: Direction) -> Direction {
    match direction {
        Direction::SendOnly => Direction::RecvOnly,
        Direction::RecvOnly => Direction::SendOnly,
        other => other,
    }
}

fn direction_attribute(direction: Direction) -> &'static str {
    match direction {
        Direction::SendRecv => "sendrecv",
        Direction::SendOnly => "sendonly",
        Direction::RecvOnly => "recvonly",
        Direction::Inactive => "inactive",
    }
}

fn addr_type(address: IpAddr) -> &'static str {
    if address.is_ipv4() { "IP4" } else { "IP6" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdes::CryptoSuite;
    use crate::sdp;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const ORIGIN: Origin = Origin {
        session_id: 7,
        version: 1,
    };

    fn offer(body: &str) -> SessionDescription {
        sdp::parse(&format!(
            "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n{body}"
        ))
        .unwrap()
    }

    #[test]
    fn follows_the_offerers_order_and_numbers() {
        let offer = offer(
            "m=audio 4000 RTP/AVP 8 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=ptime:30\r\n",
        );
        let negotiation = answer(&offer, &Capabilities::all_audio()).unwrap();
        let audio = negotiation.audio().unwrap();
        assert_eq!(audio.codec.encoding_name, "PCMA");
        assert_eq!(
            audio.dtmf,
            Some(DtmfFormat {
                payload_type: 101,
                clock_rate: 8000
            })
        );
        assert_eq!(audio.ptime, 30);
        assert_eq!(audio.remote_rtp, "10.0.0.1:4000".parse().unwrap());
        assert_eq!(audio.remote_rtcp, "10.0.0.1:4001".parse().unwrap());

        let text = render_answer(
            &negotiation,
            ORIGIN,
            LOCAL,
            &[LocalStream { rtp_port: 5000 }],
        );
        assert!(text.contains("m=audio 5000 RTP/AVP 8 101\r\n"), "{text}");
        assert!(text.contains("a=rtpmap:101 telephone-event/8000\r\n"));
        assert!(text.contains("a=sendrecv\r\n"));
        // The answer itself parses back to the chosen codec.
        let parsed = sdp::parse(&text).unwrap();
        assert_eq!(parsed.media[0].formats[0].encoding_name, "PCMA");
    }

    #[test]
    fn skips_codecs_not_allowed_and_keeps_fmtp() {
        let offer = offer(
            "m=audio 4000 RTP/AVP 18 111\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 useinbandfec=1\r\n",
        );
        let capabilities = Capabilities {
            audio: vec!["OPUS"],
            video: vec![],
            dtmf: true,
            sdes: None,
            srtp_required: false,
        };
        let negotiation = answer(&offer, &capabilities).unwrap();
        let audio = negotiation.audio().unwrap();
        assert_eq!(audio.codec.encoding_name, "OPUS");
        assert_eq!(audio.dtmf, None);
        let text = render_answer(
            &negotiation,
            ORIGIN,
            LOCAL,
            &[LocalStream { rtp_port: 5000 }],
        );
        assert!(text.contains("a=rtpmap:111 opus/48000/2\r\na=fmtp:111 useinbandfec=1\r\n"));
    }

    #[test]
    fn refuses_unsupported_streams_with_port_zero() {
        let offer = offer(
            "m=video 4002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\nm=audio 4000 RTP/AVP 0\r\n",
        );
        let negotiation = answer(&offer, &Capabilities::all_audio()).unwrap();
        assert!(negotiation.video().is_none());
        let text = render_answer(
            &negotiation,
            ORIGIN,
            LOCAL,
            &[LocalStream { rtp_port: 5000 }],
        );
        let parsed = sdp::parse(&text).unwrap();
        assert_eq!(parsed.media.len(), 2, "one answer line per offered line");
        assert_eq!(
            (parsed.media[0].kind.as_str(), parsed.media[0].port),
            ("video", 0)
        );
        assert_eq!(
            (parsed.media[1].kind.as_str(), parsed.media[1].port),
            ("audio", 5000)
        );
    }

    #[test]
    fn hold_is_answered_in_the_reverse_direction() {
        for (offered, answered) in [
            ("sendonly", Direction::RecvOnly),
            ("recvonly", Direction::SendOnly),
            ("inactive", Direction::Inactive),
        ] {
            let offer = offer(&format!("m=audio 4000 RTP/AVP 0\r\na={offered}\r\n"));
            let audio = answer(&offer, &Capabilities::all_audio()).unwrap().streams[0].clone();
            assert_eq!(audio.direction, answered);
        }
    }

    #[test]
    fn a_zero_connection_address_is_a_hold() {
        for (offered, answered) in [
            ("", Direction::RecvOnly),
            ("a=recvonly\r\n", Direction::Inactive),
        ] {
            let offer = offer(&format!(
                "m=audio 4000 RTP/AVP 0\r\nc=IN IP4 0.0.0.0\r\n{offered}"
            ));
            let audio = answer(&offer, &Capabilities::all_audio()).unwrap().streams[0].clone();
            assert_eq!(audio.direction, answered, "{offered:?}");
            assert!(!audio.we_send(), "nothing goes to 0.0.0.0");
        }
    }

    #[test]
    fn no_common_codec_names_what_was_offered() {
        let offer = offer("m=audio 4000 RTP/AVP 3\r\na=rtpmap:3 GSM/8000\r\n");
        let err = answer(&offer, &Capabilities::all_audio()).unwrap_err();
        assert!(err.to_string().contains("GSM/8000"), "{err}");
        let srtp = offer_srtp();
        assert!(answer(&srtp, &Capabilities::all_audio()).is_err());
    }

    #[test]
    fn sdes_srtp_is_answered_with_our_key_under_the_offered_tag() {
        let ours = SrtpKey::generate(CryptoSuite::AesCm128HmacSha1_80);
        let capabilities = Capabilities {
            sdes: Some(ours.clone()),
            ..Capabilities::all_audio()
        };
        // The first usable attribute wins; unsupported suites are skipped.
        let srtp_offer = offer(
            "m=audio 4000 RTP/SAVP 0\r\n\
             a=crypto:1 AES_256_CM_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVzWVNfX19zZW1jdGwg\r\n\
             a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n",
        );
        let negotiation = answer(&srtp_offer, &capabilities).unwrap();
        let srtp = negotiation.audio().unwrap().srtp.clone().unwrap();
        assert_eq!(srtp.tag, 2);
        assert_eq!(srtp.receive.suite, CryptoSuite::AesCm128HmacSha1_32);
        assert_eq!(srtp.send.suite, CryptoSuite::AesCm128HmacSha1_32);
        assert_eq!(srtp.send.key_salt, ours.key_salt);
        let text = render_answer(
            &negotiation,
            ORIGIN,
            LOCAL,
            &[LocalStream { rtp_port: 5000 }],
        );
        assert!(text.contains("m=audio 5000 RTP/SAVP 0\r\n"), "{text}");
        let crypto = sdp::parse(&text).unwrap().media[0].crypto.clone();
        assert_eq!(crypto.len(), 1);
        let attribute = CryptoAttribute::parse(&crypto[0]).unwrap();
        assert_eq!((attribute.tag, attribute.key), (2, srtp.send));

        // RTP/SAVP without a usable key is refused like an unknown codec.
        let unusable = offer(
            "m=audio 4000 RTP/SAVP 0\r\na=crypto:1 F8_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n",
        );
        assert!(answer(&unusable, &capabilities).is_err());
    }

    /// Linphone's and baresip's AVPF offers: the answer keeps the profile,
    /// and for video the key-frame requests the offer named (not NACK).
    #[test]
    fn rtcp_feedback_profiles_are_answered_in_kind() {
        let capabilities = Capabilities {
            sdes: Some(SrtpKey::generate(CryptoSuite::AesCm128HmacSha1_80)),
            ..Capabilities::all()
        };
        let linphone = offer(
            "m=audio 4000 RTP/AVPF 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=rtcp-fb:* trr-int 1000\r\n\
             m=video 4002 RTP/AVPF 96 97\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 H264/90000\r\n\
             a=rtcp-fb:* trr-int 1000\r\na=rtcp-fb:* ccm tmmbr\r\na=rtcp-fb:97 nack\r\na=rtcp-fb:97 nack pli\r\n\
             a=rtcp-fb:96 ccm fir\r\na=rtcp-fb:* ccm  fir\r\n",
        );
        let negotiation = answer(&linphone, &capabilities).unwrap();
        assert_eq!(negotiation.audio().unwrap().feedback, Some(vec![]));
        let video = negotiation.video().unwrap();
        assert_eq!(video.codec.encoding_name, "VP8");
        // PLI is named for H.264 only: not asked of this stream's sender.
        assert_eq!(video.feedback, Some(vec!["ccm fir"]));
        let text = render_answer(
            &negotiation,
            ORIGIN,
            LOCAL,
            &[
                LocalStream { rtp_port: 5000 },
                LocalStream { rtp_port: 5002 },
            ],
        );
        assert!(text.contains("m=audio 5000 RTP/AVPF 0 101\r\n"), "{text}");
        assert!(
            text.contains("m=video 5002 RTP/AVPF 96\r\na=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 ccm fir\r\na=sendrecv"),
            "{text}"
        );
        assert!(!text.contains("nack"), "{text}");
        assert!(!text.contains("tmmbr"), "{text}");

        let baresip = offer(
            "m=audio 4000 RTP/SAVPF 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n",
        );
        let negotiation = answer(&baresip, &capabilities).unwrap();
        assert!(negotiation.audio().unwrap().srtp.is_some());
        let text = render_answer(
            &negotiation,
            ORIGIN,
            LOCAL,
            &[LocalStream { rtp_port: 5000 }],
        );
        assert!(text.contains("m=audio 5000 RTP/SAVPF 0\r\n"), "{text}");

        // DTLS-SRTP (a browser's profile) is still not spoken to phones.
        let dtls = offer("m=audio 4000 UDP/TLS/RTP/SAVPF 0\r\na=fingerprint:sha-256 AA\r\n");
        assert!(answer(&dtls, &capabilities).is_err());
    }

    /// A video phone offering H.264 in both packetization modes, single
    /// NAL units first: the answer takes the mode the bridge's packetizer
    /// speaks; with mode 0 alone, mode 0.
    #[test]
    fn h264_in_the_fragmenting_mode_is_taken_when_offered() {
        let both = offer(
            "m=video 4002 RTP/AVP 97 99 126\r\na=rtpmap:97 H264/90000\r\na=fmtp:97 profile-level-id=42801f\r\n\
             a=rtpmap:99 VP8/90000\r\n\
             a=rtpmap:126 H264/90000\r\na=fmtp:126 profile-level-id=42801f; packetization-mode=1\r\n",
        );
        let capabilities = Capabilities {
            video: vec!["H264"],
            ..Capabilities::all()
        };
        let chosen = |offer| {
            let negotiation = answer(offer, &capabilities).unwrap();
            negotiation.video().unwrap().format.payload_type
        };
        assert_eq!(chosen(&both), 126);
        let only_single = offer(
            "m=video 4002 RTP/AVP 97\r\na=rtpmap:97 H264/90000\r\na=fmtp:97 packetization-mode=0\r\n",
        );
        assert_eq!(chosen(&only_single), 97);
    }

    /// The bridge's own offers in a call with feedback (its re-offers) keep
    /// the profile, with its key-frame requests on every video format.
    #[test]
    fn offers_with_feedback_name_the_profile_and_the_key_frame_requests() {
        let stream = |kind, rtp_port| OfferedStream {
            kind,
            rtp_port,
            direction: Direction::SendRecv,
            crypto: None,
            feedback: true,
        };
        let text = render_offer(
            &Capabilities::all(),
            ORIGIN,
            LOCAL,
            &[
                stream(MediaKind::Audio, 5000),
                stream(MediaKind::Video, 5002),
            ],
        );
        let parsed = sdp::parse(&text).unwrap();
        assert!(parsed.media.iter().all(|m| m.proto == "RTP/AVPF"), "{text}");
        assert!(parsed.media[0].rtcp_feedback.is_empty(), "{text}");
        let video = &parsed.media[1];
        for format in &video.formats {
            for feedback in FEEDBACK {
                let entry = (Some(format.payload_type), feedback.to_owned());
                assert!(video.rtcp_feedback.contains(&entry), "{text}");
            }
        }
        // And a phone's answer to it is taken with its feedback.
        let answered = answer(&parsed, &Capabilities::all()).unwrap();
        assert_eq!(answered.video().unwrap().feedback, Some(FEEDBACK.to_vec()));
    }

    fn offer_srtp() -> SessionDescription {
        offer(
            "m=audio 4000 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n",
        )
    }

    #[test]
    fn rtcp_mux_and_explicit_rtcp_port() {
        let muxed = offer("m=audio 4000 RTP/AVP 0\r\na=rtcp-mux\r\n");
        let audio = answer(&muxed, &Capabilities::all_audio()).unwrap().streams[0].clone();
        assert_eq!(audio.remote_rtcp, audio.remote_rtp);
        let explicit = offer("m=audio 4000 RTP/AVP 0\r\na=rtcp:4100 IN IP4 10.0.0.9\r\n");
        let audio = answer(&explicit, &Capabilities::all_audio())
            .unwrap()
            .streams[0]
            .clone();
        assert_eq!(audio.remote_rtcp, "10.0.0.9:4100".parse().unwrap());
        let section = sdp::parse_media_section(&audio.media_section_text()).unwrap();
        assert_eq!(section.effective_rtcp_port(), 4100);
    }

    #[test]
    fn offers_parse_back_with_every_codec() {
        let text = render_offer(
            &Capabilities::all(),
            ORIGIN,
            LOCAL,
            &[
                OfferedStream {
                    kind: MediaKind::Audio,
                    rtp_port: 5000,
                    direction: Direction::SendRecv,
                    crypto: None,
                    feedback: false,
                },
                OfferedStream {
                    kind: MediaKind::Video,
                    rtp_port: 5002,
                    direction: Direction::SendRecv,
                    crypto: None,
                    feedback: false,
                },
            ],
        );
        let parsed = sdp::parse(&text).unwrap();
        let names: Vec<&str> = parsed.media[0]
            .formats
            .iter()
            .map(|f| f.encoding_name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "OPUS",
                "G722",
                "PCMU",
                "PCMA",
                "G729",
                "TELEPHONE-EVENT",
                "TELEPHONE-EVENT"
            ],
            "events at 8 and 48 kHz"
        );
        let modes: Vec<(&str, u8)> = parsed.media[1]
            .formats
            .iter()
            .map(|f| (f.encoding_name.as_str(), h264_mode(f)))
            .collect();
        assert_eq!(
            modes,
            [("H264", 1), ("H264", 0), ("VP8", 0), ("VP9", 0)],
            "H.264 fragmented first, then in single NAL units"
        );
        assert!(parsed.media.iter().all(|m| m.proto == "RTP/AVP"));
        assert!(parsed.media.iter().all(|m| m.crypto.is_empty()));
        // Answering our own offer picks our first choice.
        let negotiation = answer(&parsed, &Capabilities::all()).unwrap();
        assert_eq!(negotiation.audio().unwrap().codec.encoding_name, "OPUS");
        assert_eq!(negotiation.video().unwrap().codec.encoding_name, "H264");
        assert!(negotiation.streams.iter().all(|s| s.srtp.is_none()));
    }

    /// An offer with SDES-SRTP: each stream RTP/SAVP with our key. The
    /// phone's answer (its own key, under our tag and suite) gives the keys
    /// each way; an answer that drops SRTP gives none, and is refused when
    /// SRTP is required.
    #[test]
    fn srtp_offers_carry_our_key_and_take_the_answers() {
        let ours = SrtpKey::generate(CryptoSuite::AesCm128HmacSha1_80);
        let crypto = CryptoAttribute {
            tag: 1,
            key: ours.clone(),
        };
        let stream = |kind, rtp_port| OfferedStream {
            kind,
            rtp_port,
            direction: Direction::SendRecv,
            crypto: Some(crypto.clone()),
            feedback: false,
        };
        let capabilities = Capabilities {
            sdes: Some(ours.clone()),
            ..Capabilities::all()
        };
        let text = render_offer(
            &capabilities,
            ORIGIN,
            LOCAL,
            &[
                stream(MediaKind::Audio, 5000),
                stream(MediaKind::Video, 5002),
            ],
        );
        let parsed = sdp::parse(&text).unwrap();
        for media in &parsed.media {
            assert_eq!(media.proto, "RTP/SAVP", "{text}");
            assert_eq!(media.crypto.len(), 1, "{text}");
            assert_eq!(CryptoAttribute::parse(&media.crypto[0]).unwrap(), crypto);
        }

        let phones_key = "WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz";
        let phones_answer = offer(&format!(
            "m=audio 4000 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{phones_key}\r\n"
        ));
        let negotiation = answer(&phones_answer, &capabilities).unwrap();
        let srtp = negotiation.audio().unwrap().srtp.clone().unwrap();
        assert_eq!(srtp.tag, 1);
        assert_eq!(srtp.send, ours);
        assert_eq!(&srtp.receive.key_salt[..4], b"YS__");

        let plain_answer = offer("m=audio 4000 RTP/AVP 0\r\n");
        let negotiation = answer(&plain_answer, &capabilities).unwrap();
        assert_eq!(negotiation.audio().unwrap().srtp, None);
        let required = Capabilities {
            srtp_required: true,
            ..capabilities
        };
        let refused = answer(&plain_answer, &required).unwrap_err();
        assert!(
            refused.to_string().contains("RTP/AVP PCMU/8000"),
            "{refused}"
        );
        assert!(answer(&phones_answer, &required).is_ok());
    }

    #[test]
    fn the_provisional_stream_is_our_first_codec_as_offered_going_nowhere() {
        let capabilities = Capabilities::all_audio();
        let stream = provisional_audio(&capabilities).unwrap();
        let offer = render_offer(
            &capabilities,
            Origin {
                session_id: 1,
                version: 1,
            },
            LOCAL,
            &[OfferedStream {
                kind: MediaKind::Audio,
                rtp_port: 4000,
                direction: Direction::SendRecv,
                crypto: None,
                feedback: false,
            }],
        );
        let offered = &sdp::parse(&offer).unwrap().media[0];
        assert_eq!(stream.codec.encoding_name, capabilities.audio[0]);
        assert_eq!(
            offered.formats[0].payload_type, stream.format.payload_type,
            "numbered as in {offer}"
        );
        let offered_dtmf = offered.formats.last().unwrap();
        assert_eq!(
            stream.dtmf,
            Some(DtmfFormat {
                payload_type: offered_dtmf.payload_type,
                clock_rate: 48000
            }),
            "Opus's events at its own rate, last in {offer}"
        );
        assert!(stream.remote_rtp.ip().is_unspecified());
        assert_eq!(stream.direction, Direction::Inactive);
        assert!(!stream.we_send());

        let pcmu_only = Capabilities {
            audio: vec!["PCMU"],
            ..capabilities
        };
        let stream = provisional_audio(&pcmu_only).unwrap();
        assert_eq!(
            (stream.codec.encoding_name, stream.format.payload_type),
            ("PCMU", 0)
        );
        assert!(
            provisional_audio(&Capabilities {
                audio: vec![],
                ..pcmu_only
            })
            .is_none()
        );
    }

    #[test]
    fn telephone_events_go_at_the_codecs_rate_when_offered() {
        let both = offer(
            "m=audio 4000 RTP/AVP 111 0 101 110\r\na=rtpmap:111 opus/48000/2\r\n\
             a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
             a=rtpmap:110 telephone-event/48000\r\n",
        );
        let opus = answer(&both, &Capabilities::all_audio()).unwrap();
        let audio = opus.audio().unwrap();
        assert_eq!(audio.codec.encoding_name, "OPUS");
        assert_eq!(
            audio.dtmf,
            Some(DtmfFormat {
                payload_type: 110,
                clock_rate: 48000
            })
        );
        assert!(
            audio
                .media_section_text()
                .contains("a=rtpmap:110 telephone-event/48000\r\n")
        );
        let text = render_answer(&opus, ORIGIN, LOCAL, &[LocalStream { rtp_port: 5000 }]);
        assert!(text.contains("m=audio 5000 RTP/AVP 111 110\r\n"), "{text}");
        assert!(
            text.contains("a=rtpmap:110 telephone-event/48000\r\n"),
            "{text}"
        );

        // PCMU takes the 8 kHz events.
        let pcmu = Capabilities {
            audio: vec!["PCMU"],
            ..Capabilities::all_audio()
        };
        let negotiation = answer(&both, &pcmu).unwrap();
        assert_eq!(negotiation.audio().unwrap().dtmf.unwrap().payload_type, 101);

        // Our offers carry both when they offer Opus, 8 kHz alone otherwise.
        let stream = |capabilities: &Capabilities| {
            render_offer(
                capabilities,
                ORIGIN,
                LOCAL,
                &[OfferedStream {
                    kind: MediaKind::Audio,
                    rtp_port: 4000,
                    direction: Direction::SendRecv,
                    crypto: None,
                    feedback: false,
                }],
            )
        };
        let with_opus = stream(&Capabilities::all_audio());
        assert!(with_opus.contains("telephone-event/8000"), "{with_opus}");
        assert!(with_opus.contains("telephone-event/48000"), "{with_opus}");
        let without = stream(&pcmu);
        assert!(without.contains("telephone-event/8000"), "{without}");
        assert!(!without.contains("telephone-event/48000"), "{without}");
    }
}
