//! ICE candidates (RFC 8839) of our own WebRTC descriptions, for a machine
//! behind a one-to-one NAT (a cloud VM: a private address on its interface,
//! a public one outside). Apps elsewhere cannot reach its host candidates;
//! each local UDP port is also offered at the public address, as the
//! server-reflexive candidate a STUN server would have reported.

use std::net::IpAddr;

/// `sdp` with, after each host UDP candidate of the public address's IP
/// version, the same port at `public` (`typ srflx`, `raddr`/`rport` the
/// host's). Candidates already at `public`, and descriptions that already
/// carry the twin, are left as they are.
pub fn with_public_address(sdp: &str, public: IpAddr) -> String {
    let mut out = String::with_capacity(sdp.len() + 256);
    for line in sdp.split_inclusive('\n') {
        out.push_str(line);
        let text = line.trim_end_matches(['\r', '\n']);
        let Some(twin) = text
            .strip_prefix("a=")
            .and_then(|candidate| public_twin(candidate, public))
        else {
            continue;
        };
        let twin = format!("a={twin}");
        if sdp.lines().any(|l| l.trim_end() == twin) {
            continue;
        }
        if !line.ends_with('\n') {
            out.push_str("\r\n");
        }
        out.push_str(&twin);
        // The line ending the description uses.
        out.push_str(&line[text.len()..]);
    }
    out
}

/// The server-reflexive twin at `public` of a host UDP `candidate` line
/// (`candidate:...`, without `a=`); `None` for any other candidate.
pub fn public_twin(candidate: &str, public: IpAddr) -> Option<String> {
    let fields: Vec<&str> = candidate
        .strip_prefix("candidate:")?
        .split_ascii_whitespace()
        .collect();
    let [
        foundation,
        component,
        transport,
        priority,
        address,
        port,
        "typ",
        "host",
        ..,
    ] = fields.as_slice()
    else {
        return None;
    };
    let address: IpAddr = address.parse().ok()?;
    let port: u16 = port.parse().ok()?;
    let priority: u32 = priority.parse().ok()?;
    if !transport.eq_ignore_ascii_case("udp")
        || address == public
        || address.is_ipv4() != public.is_ipv4()
    {
        return None;
    }
    // Type preference 100 for server-reflexive (RFC 8445 §5.1.2.2), below
    // the host's 126; the local and component parts stay the host's.
    let priority = (100 << 24) | (priority & 0x00ff_ffff);
    Some(format!(
        "candidate:{foundation}9 {component} {transport} {priority} {public} {port} typ srflx raddr {address} rport {port}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC: &str = "198.51.100.7";

    #[test]
    fn each_host_udp_candidate_gets_its_public_twin() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
                   a=candidate:1 1 UDP 2015363327 192.0.2.50 41234 typ host\r\n\
                   a=candidate:2 1 TCP 1015021823 192.0.2.50 9 typ host tcptype active\r\n\
                   a=candidate:3 1 udp 2130706431 2001:db8::5 50000 typ host\r\n\
                   a=mid:0\r\n";
        let out = with_public_address(sdp, PUBLIC.parse().unwrap());
        assert_eq!(
            out,
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
             a=candidate:1 1 UDP 2015363327 192.0.2.50 41234 typ host\r\n\
             a=candidate:19 1 UDP 1679819007 198.51.100.7 41234 typ srflx raddr 192.0.2.50 rport 41234\r\n\
             a=candidate:2 1 TCP 1015021823 192.0.2.50 9 typ host tcptype active\r\n\
             a=candidate:3 1 udp 2130706431 2001:db8::5 50000 typ host\r\n\
             a=mid:0\r\n"
        );
        // Twice is once.
        assert_eq!(with_public_address(&out, PUBLIC.parse().unwrap()), out);
    }

    #[test]
    fn the_twin_ranks_below_its_host_and_keeps_its_component() {
        let host = "candidate:842163049 2 udp 2122260222 10.0.0.5 50001 typ host generation 0";
        let twin = public_twin(host, PUBLIC.parse().unwrap()).unwrap();
        assert_eq!(
            twin,
            "candidate:8421630499 2 udp 1686052606 198.51.100.7 50001 typ srflx raddr 10.0.0.5 rport 50001"
        );
    }

    #[test]
    fn other_candidates_and_garbage_have_no_twin() {
        let public: IpAddr = PUBLIC.parse().unwrap();
        for line in [
            "candidate:1 1 udp 1694498815 198.51.100.7 41234 typ srflx raddr 192.0.2.50 rport 41234",
            "candidate:1 1 udp 2015363327 198.51.100.7 41234 typ host",
            "candidate:1 1 udp 2015363327 host.local 41234 typ host",
            "candidate:1 1 udp 2015363327 192.0.2.50 notaport typ host",
            "candidate:1 1 udp 99999999999 192.0.2.50 41234 typ host",
            "candidate:1 1 udp",
            "candidate:",
            "rtpmap:111 opus/48000/2",
            "",
        ] {
            assert_eq!(public_twin(line, public), None, "{line}");
        }
        assert_eq!(
            with_public_address("a=candidate:\r\n", public),
            "a=candidate:\r\n"
        );
    }
}
