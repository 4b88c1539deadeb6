//! Opus's audio bandwidth in SDP (RFC 7587 §6.1): `maxplaybackrate` tells
//! the peer's encoder the highest rate we play, so it sends no more. A
//! bridge to 8 kHz phones asks for narrowband: less bandwidth on the app's
//! link, and far cheaper decoding than full band resampled down.

/// Opus's own rate, and the most `maxplaybackrate` can say.
pub const FULL_BAND_RATE: u32 = 48_000;

/// The Opus payload types of a description's `a=rtpmap` lines.
fn opus_payload_types(sdp: &str) -> Vec<&str> {
    sdp.lines()
        .filter_map(|line| {
            let (pt, codec) = line.trim().strip_prefix("a=rtpmap:")?.split_once(' ')?;
            let name = codec.split('/').next()?;
            name.eq_ignore_ascii_case("opus").then_some(pt)
        })
        .collect()
}

/// The lowest `maxplaybackrate` the peer gives for Opus, if any.
pub fn max_playback_rate(sdp: &str) -> Option<u32> {
    let opus = opus_payload_types(sdp);
    sdp.lines()
        .filter_map(|line| {
            let (pt, parameters) = line.trim().strip_prefix("a=fmtp:")?.split_once(' ')?;
            opus.contains(&pt).then_some(parameters)
        })
        .flat_map(|parameters| parameters.split(';'))
        .filter_map(|parameter| {
            let (name, value) = parameter.trim().split_once('=')?;
            name.eq_ignore_ascii_case("maxplaybackrate")
                .then(|| value.trim().parse::<u32>().ok())
                .flatten()
        })
        .filter(|rate| *rate > 0)
        .min()
}

/// `sdp` asking for Opus at no more than `rate` Hz: `maxplaybackrate` in
/// each Opus format's `a=fmtp` (added after its `a=rtpmap` where missing).
/// Unchanged at full band.
pub fn with_max_playback_rate(sdp: &str, rate: u32) -> String {
    if rate >= FULL_BAND_RATE {
        return sdp.to_owned();
    }
    let opus = opus_payload_types(sdp);
    let has_fmtp = |pt: &str| {
        sdp.lines().any(|l| {
            l.trim()
                .strip_prefix("a=fmtp:")
                .and_then(|r| r.split_once(' '))
                .is_some_and(|(p, _)| p == pt)
        })
    };
    let newline = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let mut out = String::with_capacity(sdp.len() + 64);
    for line in sdp.split_inclusive('\n') {
        let text = line.trim_end_matches(['\r', '\n']);
        let fmtp = text
            .strip_prefix("a=fmtp:")
            .and_then(|rest| rest.split_once(' '))
            .filter(|(pt, _)| opus.contains(pt));
        match fmtp {
            Some((pt, parameters)) => {
                let kept: Vec<&str> = parameters
                    .split(';')
                    .map(str::trim)
                    .filter(|p| {
                        !p.is_empty() && !p.to_ascii_lowercase().starts_with("maxplaybackrate=")
                    })
                    .collect();
                out.push_str(&format!(
                    "a=fmtp:{pt} {};maxplaybackrate={rate}",
                    kept.join(";")
                ));
                out.push_str(&line[text.len()..]);
            }
            None => {
                out.push_str(line);
                let rtpmap = text
                    .strip_prefix("a=rtpmap:")
                    .and_then(|rest| rest.split_once(' '))
                    .map(|(pt, _)| pt)
                    .filter(|pt| opus.contains(pt) && !has_fmtp(pt));
                if let Some(pt) = rtpmap {
                    if !line.ends_with('\n') {
                        out.push_str(newline);
                    }
                    out.push_str(&format!("a=fmtp:{pt} maxplaybackrate={rate}{newline}"));
                }
            }
        }
    }
    out
}

/// The audio bandwidth of an Opus packet, from its TOC byte (RFC 6716 §3.1).
pub fn packet_bandwidth(packet: &[u8]) -> Option<&'static str> {
    let config = packet.first()? >> 3;
    Some(match config {
        0..=3 | 16..=19 => "narrowband",
        4..=7 => "mediumband",
        8..=11 | 20..=23 => "wideband",
        12..=13 | 24..=27 => "superwideband",
        _ => "fullband",
    })
}

/// The coding mode of an Opus packet (SILK, hybrid or CELT), from its TOC
/// byte (RFC 6716 §3.1).
pub fn packet_mode(packet: &[u8]) -> Option<&'static str> {
    Some(match packet.first()? >> 3 {
        0..=11 => "SILK",
        12..=15 => "hybrid",
        _ => "CELT",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\na=rtpmap:111 opus/48000/2\r\n\
        a=fmtp:111 minptime=10;useinbandfec=1\r\na=rtpmap:0 PCMU/8000\r\na=fmtp:0 foo=1\r\n";

    #[test]
    fn the_rate_goes_into_opus_formats_only() {
        let narrow = with_max_playback_rate(OFFER, 8000);
        assert!(narrow.contains("a=fmtp:111 minptime=10;useinbandfec=1;maxplaybackrate=8000\r\n"));
        assert!(narrow.contains("a=fmtp:0 foo=1\r\n"));
        assert_eq!(max_playback_rate(&narrow), Some(8000));
        assert_eq!(max_playback_rate(OFFER), None);
        // Asked again, the rate is replaced, not repeated.
        let wide = with_max_playback_rate(&narrow, 16000);
        assert_eq!(wide.matches("maxplaybackrate").count(), 1);
        assert_eq!(max_playback_rate(&wide), Some(16000));
        assert_eq!(with_max_playback_rate(OFFER, FULL_BAND_RATE), OFFER);
    }

    #[test]
    fn an_opus_format_without_fmtp_gets_one() {
        let bare = "m=audio 9 RTP/AVP 96\r\na=rtpmap:96 OPUS/48000/2\r\na=sendrecv\r\n";
        let narrow = with_max_playback_rate(bare, 8000);
        assert_eq!(
            narrow,
            "m=audio 9 RTP/AVP 96\r\na=rtpmap:96 OPUS/48000/2\r\na=fmtp:96 maxplaybackrate=8000\r\na=sendrecv\r\n"
        );
    }

    #[test]
    fn packets_tell_their_bandwidth() {
        // SILK narrowband 20 ms (config 1), CELT full band 20 ms (config 31).
        assert_eq!(packet_bandwidth(&[1 << 3]), Some("narrowband"));
        assert_eq!(packet_bandwidth(&[9 << 3 | 0b100]), Some("wideband"));
        assert_eq!(packet_bandwidth(&[31 << 3]), Some("fullband"));
        assert_eq!(packet_bandwidth(&[]), None);
    }

    #[test]
    fn packets_tell_their_mode() {
        assert_eq!(packet_mode(&[1 << 3]), Some("SILK"));
        assert_eq!(packet_mode(&[13 << 3]), Some("hybrid"));
        assert_eq!(packet_mode(&[16 << 3]), Some("CELT"));
        assert_eq!(packet_mode(&[]), None);
    }

    #[test]
    fn nonsense_rates_are_ignored() {
        let sdp = "a=rtpmap:111 opus/48000/2\na=fmtp:111 maxplaybackrate=abc;maxplaybackrate=0\n";
        assert_eq!(max_playback_rate(sdp), None);
        assert_eq!(max_playback_rate(""), None);
    }
}
