//! ICE candidates (RFC 8839) of our own WebRTC descriptions, for a machine
//! behind a one-to-one NAT (a cloud VM: a private address on its interface,
//! a public one outside). Apps elsewhere cannot reach its host candidates;
//! each local UDP port is also offered at the public address, as the
//! server-reflexive candidate a STUN server would have reported. And the
//! STUN server a call asks where it is seen from, when the NAT is not
//! one-to-one.

use std::net::{IpAddr, SocketAddr};

/// STUN's port when a server's URL names none (RFC 8489 §18.6).
const STUN_PORT: u16 = 3478;

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
fn public_twin(candidate: &str, public: IpAddr) -> Option<String> {
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

const STUN_MAGIC_COOKIE: u32 = 0x2112_a442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const MAPPED_ADDRESS: u16 = 0x0001;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// A STUN Binding request (RFC 8489 §6) with no attributes: what a
/// client asks a STUN server to learn its address outside a NAT.
pub fn binding_request(transaction: [u8; 12]) -> [u8; 20] {
    let mut request = [0u8; 20];
    request[..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    request[4..8].copy_from_slice(&STUN_MAGIC_COOKIE.to_be_bytes());
    request[8..].copy_from_slice(&transaction);
    request
}

/// A STUN Binding response, success or error (not a TURN server's
/// answers, which are of other methods).
pub fn is_binding_response(datagram: &[u8]) -> bool {
    const BINDING_ERROR: u16 = 0x0111;
    datagram.len() >= 20
        && matches!(
            u16::from_be_bytes([datagram[0], datagram[1]]),
            BINDING_SUCCESS | BINDING_ERROR
        )
        && datagram[4..8] == STUN_MAGIC_COOKIE.to_be_bytes()
}

/// The address a STUN server's Binding success response to `transaction`
/// reports (XOR-MAPPED-ADDRESS, or the older MAPPED-ADDRESS); `None` for
/// anything else, malformed or not.
pub fn mapped_address(response: &[u8], transaction: [u8; 12]) -> Option<SocketAddr> {
    let header = response.get(..20)?;
    let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if u16::from_be_bytes([header[0], header[1]]) != BINDING_SUCCESS
        || header[4..8] != STUN_MAGIC_COOKIE.to_be_bytes()
        || header[8..20] != transaction
        || response.len() < 20 + length
    {
        return None;
    }
    let mut attributes = &response[20..20 + length];
    let mut plain = None;
    while attributes.len() >= 4 {
        let kind = u16::from_be_bytes([attributes[0], attributes[1]]);
        let size = usize::from(u16::from_be_bytes([attributes[2], attributes[3]]));
        let value = attributes.get(4..4 + size)?;
        match kind {
            XOR_MAPPED_ADDRESS => return address(value, Some(&header[4..20])),
            MAPPED_ADDRESS => plain = address(value, None),
            _ => {}
        }
        // Values are padded to four bytes.
        attributes = attributes
            .get(4 + size.div_ceil(4) * 4..)
            .unwrap_or_default();
    }
    plain
}

/// An address attribute's value: family, port, address; XORed with the
/// magic cookie and the transaction id (`mask`) when given.
fn address(value: &[u8], mask: Option<&[u8]>) -> Option<SocketAddr> {
    let unmask = |bytes: &[u8]| -> Vec<u8> {
        match mask {
            Some(mask) => bytes.iter().zip(mask).map(|(b, m)| b ^ m).collect(),
            None => bytes.to_vec(),
        }
    };
    let port = unmask(value.get(2..4)?);
    let port = u16::from_be_bytes([port[0], port[1]]);
    let ip: IpAddr = match value.get(1)? {
        1 => <[u8; 4]>::try_from(unmask(value.get(4..8)?)).ok()?.into(),
        2 => <[u8; 16]>::try_from(unmask(value.get(4..20)?)).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The host and port of `stun://host[:port]` (or `stun:`, or neither);
/// IPv6 literals in brackets.
pub fn stun_host_and_port(url: &str) -> Result<(String, u16), String> {
    let address = url
        .strip_prefix("stun://")
        .or_else(|| url.strip_prefix("stun:"))
        .unwrap_or(url);
    host_and_port(address, STUN_PORT)
        .map_err(|why| format!("{url:?} is not stun://host[:port] ({why})"))
}

/// The host and port of an ICE server's `host[:port]`, `default_port` when
/// it names none. An IPv6 literal takes a port only in brackets
/// (`[2001:db8::1]:3478`): without them, its last group would read as one.
pub fn host_and_port(address: &str, default_port: u16) -> Result<(String, u16), &'static str> {
    let (host, port) = match address.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']').ok_or("an unclosed [")?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or("text after ]")?)),
            }
        }
        None => match address.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, Some(port)),
            // No port, or a bare IPv6 literal.
            _ => (address, None),
        },
    };
    let port = match port {
        Some(port) => port.parse().map_err(|_| "the port is not a number")?,
        None => default_port,
    };
    if host.is_empty() || host.contains(['/', '@', ' ', '[', ']', '?']) {
        return Err("no host");
    }
    Ok((host.to_owned(), port))
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

    /// Kamailio 5.6.3's answer (its stun module) to a Binding request from
    /// 127.0.0.1:40107.
    const KAMAILIO_REPLY: &str = "010100382112a4420b4dd3ba5e41f4e89f894d6d002000080001bdb95e12a443\
        802200275365727665723a206b616d61696c696f2028352e362e3320287838365f36342f6c696e7578292900";

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn a_stun_servers_answer_gives_the_address_outside() {
        let reply = bytes(KAMAILIO_REPLY);
        let transaction: [u8; 12] = reply[8..20].try_into().unwrap();
        assert_eq!(
            mapped_address(&reply, transaction),
            Some("127.0.0.1:40107".parse().unwrap())
        );
        assert_eq!(
            binding_request(transaction)[..8],
            [0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]
        );
        // Another transaction's answer, or a cut one, says nothing.
        assert_eq!(mapped_address(&reply, [0; 12]), None);
        for length in 0..reply.len() - 40 {
            assert_eq!(mapped_address(&reply[..length], transaction), None);
        }
        // The older MAPPED-ADDRESS, where the server gives only that.
        let mut plain = reply[..32].to_vec();
        plain[3] = 12;
        plain[20..32].copy_from_slice(&[0, 1, 0, 8, 0, 1, 0x9c, 0xab, 127, 0, 0, 1]);
        assert_eq!(
            mapped_address(&plain, transaction),
            Some("127.0.0.1:40107".parse().unwrap())
        );
        // Lengths that point past the end are refused, not read.
        let mut hostile = reply.clone();
        hostile[22..24].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(mapped_address(&hostile, transaction), None);
    }

    #[test]
    fn stun_servers_are_read_as_webrtcbin_spells_them() {
        for (url, host, port) in [
            ("stun://stun.example.com:19302", "stun.example.com", 19302),
            ("stun:198.51.100.8", "198.51.100.8", 3478),
            ("198.51.100.8:3479", "198.51.100.8", 3479),
            ("stun://[2001:db8::8]:3478", "2001:db8::8", 3478),
            ("stun://[2001:db8::8]", "2001:db8::8", 3478),
            ("stun:2001:db8::8", "2001:db8::8", 3478),
        ] {
            assert_eq!(
                stun_host_and_port(url),
                Ok((host.to_owned(), port)),
                "{url}"
            );
        }
        for bad in [
            "",
            "stun://",
            "stun://host:port",
            "stun://host:99999",
            "stun://[2001:db8::8",
            "stun://[2001:db8::8]3478",
            "turn://u:p@host",
        ] {
            assert!(stun_host_and_port(bad).is_err(), "{bad}");
        }
    }
}
