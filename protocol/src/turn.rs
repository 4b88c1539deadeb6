//! A TURN client over UDP (RFC 8656), without I/O: the allocation of a
//! relayed address on a TURN server with long-term credentials, a channel
//! bound to each peer it sends to, their refreshes, and the ChannelData
//! messages (4 bytes of header, where a Send or Data indication takes 36)
//! that carry each datagram. Where the bridge itself may
//! reach nothing but a TURN server (a strict office firewall), apps still
//! reach it through the relayed address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;

use crate::ice;

const MAGIC_COOKIE: [u8; 4] = 0x2112_a442u32.to_be_bytes();
const TURN_PORT: u16 = 3478;
/// `turns:`'s port when the URL names none (RFC 7065).
const TURNS_PORT: u16 = 5349;

const ALLOCATE: u16 = 0x0003;
const REFRESH: u16 = 0x0004;
const CREATE_PERMISSION: u16 = 0x0008;
const CHANNEL_BIND: u16 = 0x0009;
const SEND_INDICATION: u16 = 0x0016;
const DATA_INDICATION: u16 = 0x0017;
/// The class bits of a method's success and error responses.
const SUCCESS: u16 = 0x0100;
const ERROR: u16 = 0x0110;

const USERNAME: u16 = 0x0006;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const ERROR_CODE: u16 = 0x0009;
const CHANNEL_NUMBER: u16 = 0x000c;
const LIFETIME: u16 = 0x000d;
const XOR_PEER_ADDRESS: u16 = 0x0012;
const DATA: u16 = 0x0013;
const REALM: u16 = 0x0014;
const NONCE: u16 = 0x0015;
const XOR_RELAYED_ADDRESS: u16 = 0x0016;
const REQUESTED_TRANSPORT: u16 = 0x0019;

/// UDP, as REQUESTED-TRANSPORT names it (the protocol number).
const UDP: u8 = 17;
/// What the allocation asks for; the server may grant less.
const REQUESTED_LIFETIME: Duration = Duration::from_secs(600);
/// A permission lasts 300 s (RFC 8656 §9): renewed well before.
const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
/// A permission asked for and not yet granted is asked again after this
/// (the request or its answer may be lost).
const PERMISSION_RETRY: Duration = Duration::from_millis(500);
/// The channel numbers a client may bind (RFC 8656 §12).
const FIRST_CHANNEL: u16 = 0x4000;
const CHANNELS: usize = 0x1000;
/// A channel binding lasts 600 s, and the permission it installs 300 s:
/// bound again well before either ends.
const CHANNEL_REFRESH: Duration = PERMISSION_REFRESH;

/// How the TURN server is reached; what it relays is UDP either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TurnTransport {
    #[default]
    Udp,
    /// A TCP connection (RFC 8656 §3.1): through firewalls that pass no
    /// UDP.
    Tcp,
    /// TLS over TCP (`turns:`): through firewalls that pass nothing but
    /// TLS, to port 443 say, and with the server's name checked.
    Tls,
}

impl TurnTransport {
    /// Reached over a stream (where ChannelData is padded to four bytes).
    fn is_stream(self) -> bool {
        self != TurnTransport::Udp
    }

    /// The URL's scheme and query for it.
    fn spelled(self) -> (&'static str, &'static str) {
        match self {
            TurnTransport::Udp => ("turn", ""),
            TurnTransport::Tcp => ("turn", "?transport=tcp"),
            TurnTransport::Tls => ("turns", ""),
        }
    }
}

/// A TURN server as webrtcbin's `turn-server` spells it:
/// `turn://user:password@host[:port][?transport=udp|tcp]`, or
/// `turns://user:password@host[:port]` over TLS.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnServer {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub transport: TurnTransport,
}

impl std::fmt::Debug for TurnServer {
    // The password is a secret: never in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (scheme, query) = self.transport.spelled();
        write!(
            f,
            "{scheme}://{}@{}:{}{query}",
            self.username, self.host, self.port
        )
    }
}

impl std::str::FromStr for TurnServer {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "is not turn://user:password@host[:port][?transport=udp|tcp] \
                 or turns://user:password@host[:port] ({why})"
            )
        };
        let (rest, tls) =
            match ["turns://", "turns:", "turn://", "turn:"]
                .iter()
                .find_map(|scheme| {
                    url.strip_prefix(scheme)
                        .map(|rest| (rest, scheme.starts_with("turns")))
                }) {
                Some(found) => found,
                None => return Err(bad("turn:// missing")),
            };
        let (rest, transport) = match (rest.split_once('?'), tls) {
            (None, false) => (rest, TurnTransport::Udp),
            (None, true) => (rest, TurnTransport::Tls),
            (Some((rest, "transport=udp")), false) => (rest, TurnTransport::Udp),
            (Some((rest, "transport=tcp")), false) => (rest, TurnTransport::Tcp),
            (Some((rest, "transport=tcp")), true) => (rest, TurnTransport::Tls),
            (Some(_), false) => return Err(bad("transport=udp or transport=tcp")),
            (Some(_), true) => return Err(bad("turns: runs over TCP only")),
        };
        let (credentials, address) = rest
            .rsplit_once('@')
            .ok_or_else(|| bad("no user and password"))?;
        let (username, password) = credentials
            .split_once(':')
            .ok_or_else(|| bad("no password"))?;
        if username.is_empty() {
            return Err(bad("no user"));
        }
        let default_port = if tls { TURNS_PORT } else { TURN_PORT };
        let (host, port) = ice::host_and_port(address, default_port).map_err(bad)?;
        Ok(TurnServer {
            host,
            port,
            username: percent_decoded(username),
            password: percent_decoded(password),
            transport,
        })
    }
}

impl TurnServer {
    /// As `turn-server` takes it, `@`, `:` and `%` of the credentials
    /// escaped.
    pub fn url(&self) -> String {
        let escaped = |text: &str| {
            text.replace('%', "%25")
                .replace('@', "%40")
                .replace(':', "%3A")
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let (scheme, query) = self.transport.spelled();
        format!(
            "{scheme}://{}:{}@{host}:{}{query}",
            escaped(&self.username),
            escaped(&self.password),
            self.port
        )
    }
}

/// Over a stream, how long the message at the start of `received` is:
/// `Ok(None)` until its header is in; an error for bytes that are no TURN
/// message (the stream cannot be read on).
pub fn stream_message_length(received: &[u8]) -> Result<Option<usize>, String> {
    let Some(&first) = received.first() else {
        return Ok(None);
    };
    match first {
        // STUN: a 20-byte header, then its length.
        0x00..=0x3f => Ok(received
            .get(2..4)
            .map(|length| 20 + usize::from(u16::from_be_bytes([length[0], length[1]])))),
        // ChannelData (channels 0x4000–0x4fff), padded to four bytes over a
        // stream (RFC 8656 §12.5).
        0x40..=0x4f => Ok(received.get(2..4).map(|length| {
            4 + usize::from(u16::from_be_bytes([length[0], length[1]])).div_ceil(4) * 4
        })),
        _ => Err(format!("not a TURN message (first byte {first:#04x})")),
    }
}

/// `%XX` escapes decoded (a password may hold `@` or `:` escaped so).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a datagram from the TURN server was.
#[derive(Debug, PartialEq, Eq)]
pub enum FromServer {
    /// A peer's datagram, relayed: where it came from and where in the
    /// server's datagram it is.
    Data { peer: SocketAddr, at: Range<usize> },
    /// The allocation was granted: the relayed address, to offer as a
    /// candidate.
    Allocated(SocketAddr),
    /// The request is to be sent again, with credentials (or a new nonce).
    Retry(Vec<u8>),
    /// The server refused the allocation.
    Refused(String),
    /// Nothing for the caller (a granted permission or refresh, say).
    Handled,
    /// Not from this allocation, or malformed.
    Ignored,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Request {
    Allocate,
    Refresh,
    Permission(IpAddr),
    Channel(SocketAddr, u16),
}

/// A peer's channel (RFC 8656 §12). A ChannelBind also installs the
/// permission for the peer's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Channel {
    /// Asked for, not yet bound: data goes in Send indications. Asked
    /// again from that instant.
    Asked(u16, Instant),
    /// Bound: data goes in ChannelData. Bound again from that instant.
    Bound(u16, Instant),
    /// The server would not bind it: Send indications after
    /// CreatePermission, as without channels.
    Refused,
}

/// One allocation on one TURN server, from one local socket.
pub struct Allocation {
    username: String,
    password: String,
    realm: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
    /// The long-term credential's key, MD5(username:realm:password).
    key: Option<[u8; 16]>,
    relayed: Option<SocketAddr>,
    /// When the allocation is next refreshed.
    refresh_at: Option<Instant>,
    /// When each peer address's permission is asked for again: soon while
    /// unanswered, well before it ends once granted.
    permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<SocketAddr, Channel>,
    /// The peer of each channel number asked for, from `FIRST_CHANNEL` on.
    channel_peers: Vec<SocketAddr>,
    /// Over a stream, ChannelData is padded to four bytes (RFC 8656 §12.5).
    padded: bool,
    /// Requests sent and not answered, by transaction.
    asked: HashMap<[u8; 12], Request>,
}

impl Allocation {
    pub fn new(server: &TurnServer) -> Self {
        Allocation {
            username: server.username.clone(),
            password: server.password.clone(),
            realm: None,
            nonce: None,
            key: None,
            relayed: None,
            refresh_at: None,
            permissions: HashMap::new(),
            channels: HashMap::new(),
            channel_peers: Vec::new(),
            padded: server.transport.is_stream(),
            asked: HashMap::new(),
        }
    }

    /// The relayed address, once granted.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed
    }

    /// An Allocate request for a UDP relay (sent again as it is when
    /// unanswered: a new transaction each time).
    pub fn allocate(&mut self) -> Vec<u8> {
        self.request(Request::Allocate)
    }

    fn request(&mut self, kind: Request) -> Vec<u8> {
        let transaction: [u8; 12] = rand::random();
        self.asked.retain(|_, asked| *asked != kind);
        self.asked.insert(transaction, kind);
        let mut attributes = Vec::new();
        match kind {
            Request::Allocate => {
                attribute(&mut attributes, REQUESTED_TRANSPORT, &[UDP, 0, 0, 0]);
                let lifetime = REQUESTED_LIFETIME.as_secs() as u32;
                attribute(&mut attributes, LIFETIME, &lifetime.to_be_bytes());
            }
            Request::Refresh => {
                let lifetime = REQUESTED_LIFETIME.as_secs() as u32;
                attribute(&mut attributes, LIFETIME, &lifetime.to_be_bytes());
            }
            Request::Permission(ip) => {
                let peer = xor_address(SocketAddr::new(ip, 0), &transaction);
                attribute(&mut attributes, XOR_PEER_ADDRESS, &peer);
            }
            Request::Channel(peer, number) => {
                let number = number.to_be_bytes();
                attribute(
                    &mut attributes,
                    CHANNEL_NUMBER,
                    &[number[0], number[1], 0, 0],
                );
                attribute(
                    &mut attributes,
                    XOR_PEER_ADDRESS,
                    &xor_address(peer, &transaction),
                );
            }
        }
        let method = match kind {
            Request::Allocate => ALLOCATE,
            Request::Refresh => REFRESH,
            Request::Permission(_) => CREATE_PERMISSION,
            Request::Channel(..) => CHANNEL_BIND,
        };
        self.authenticated(method, transaction, attributes)
    }

    /// A message with the credentials, once the server has named its realm
    /// and nonce.
    fn authenticated(&self, kind: u16, transaction: [u8; 12], mut attributes: Vec<u8>) -> Vec<u8> {
        let (Some(realm), Some(nonce), Some(key)) = (&self.realm, &self.nonce, &self.key) else {
            return message(kind, transaction, &attributes, None);
        };
        attribute(&mut attributes, USERNAME, self.username.as_bytes());
        attribute(&mut attributes, REALM, realm);
        attribute(&mut attributes, NONCE, nonce);
        message(kind, transaction, &attributes, Some(key))
    }

    /// `data` for `peer`, through the relay: in ChannelData once the
    /// peer's channel is bound, in a Send indication until then (after the
    /// ChannelBind, whose permission it needs), or, where the server binds
    /// no channel, after a CreatePermission when the peer's address has none
    /// (yet, or any more). Empty before the allocation is granted.
    pub fn send(&mut self, peer: SocketAddr, data: &[u8], now: Instant) -> Vec<Vec<u8>> {
        if self.relayed.is_none() {
            return Vec::new();
        }
        let mut datagrams = Vec::with_capacity(2);
        match self.bind_channel(peer, now, &mut datagrams) {
            Some(Channel::Bound(number, _)) => {
                datagrams.push(self.channel_data(number, data));
                return datagrams;
            }
            Some(Channel::Asked(..)) => {}
            Some(Channel::Refused) | None => self.permit(peer.ip(), now, &mut datagrams),
        }
        let transaction: [u8; 12] = rand::random();
        let mut attributes = Vec::with_capacity(data.len() + 16);
        attribute(
            &mut attributes,
            XOR_PEER_ADDRESS,
            &xor_address(peer, &transaction),
        );
        attribute(&mut attributes, DATA, data);
        datagrams.push(message(SEND_INDICATION, transaction, &attributes, None));
        datagrams
    }

    /// The peer's channel, with its ChannelBind added to `out` when due
    /// (first, again when unanswered, or to refresh it); `None` once all
    /// channel numbers are taken.
    fn bind_channel(
        &mut self,
        peer: SocketAddr,
        now: Instant,
        out: &mut Vec<Vec<u8>>,
    ) -> Option<Channel> {
        let (number, channel) = match self.channels.get(&peer).copied() {
            // Unanswered, the request goes again after `PERMISSION_RETRY`.
            Some(Channel::Asked(number, due)) if now >= due => {
                (number, Channel::Asked(number, now + PERMISSION_RETRY))
            }
            Some(Channel::Bound(number, due)) if now >= due => {
                (number, Channel::Bound(number, now + PERMISSION_RETRY))
            }
            Some(channel) => return Some(channel),
            None if self.channel_peers.len() < CHANNELS => {
                let number = FIRST_CHANNEL + self.channel_peers.len() as u16;
                self.channel_peers.push(peer);
                (number, Channel::Asked(number, now + PERMISSION_RETRY))
            }
            None => return None,
        };
        self.channels.insert(peer, channel);
        out.push(self.request(Request::Channel(peer, number)));
        Some(channel)
    }

    /// A CreatePermission for `ip` added to `out`, when due.
    fn permit(&mut self, ip: IpAddr, now: Instant, out: &mut Vec<Vec<u8>>) {
        if self.permissions.get(&ip).is_none_or(|due| now >= *due) {
            self.permissions.insert(ip, now + PERMISSION_RETRY);
            out.push(self.request(Request::Permission(ip)));
        }
    }

    fn channel_data(&self, number: u16, data: &[u8]) -> Vec<u8> {
        let size = if self.padded {
            data.len().div_ceil(4) * 4
        } else {
            data.len()
        };
        let mut out = Vec::with_capacity(4 + size);
        out.extend_from_slice(&number.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        out.resize(4 + size, 0);
        out
    }

    /// When [`Allocation::refresh`] has something to send.
    pub fn refresh_at(&self) -> Option<Instant> {
        self.refresh_at
    }

    /// The allocation's Refresh request, when due.
    pub fn refresh(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.refresh_at.is_none_or(|at| at > now) {
            return None;
        }
        // Asked again in a while if this one goes unanswered.
        self.refresh_at = Some(now + Duration::from_secs(5));
        Some(self.request(Request::Refresh))
    }

    /// A Refresh with a lifetime of 0: the server frees the relayed address.
    pub fn release(&mut self) -> Option<Vec<u8>> {
        self.relayed?;
        let transaction: [u8; 12] = rand::random();
        let mut attributes = Vec::new();
        attribute(&mut attributes, LIFETIME, &0u32.to_be_bytes());
        Some(self.authenticated(REFRESH, transaction, attributes))
    }

    /// A datagram from the TURN server.
    pub fn receive(&mut self, datagram: &[u8], now: Instant) -> FromServer {
        if let [first @ 0x40..=0x4f, second, high, low, ..] = *datagram {
            let number = u16::from_be_bytes([first, second]);
            let end = 4 + usize::from(u16::from_be_bytes([high, low]));
            let peer = self
                .channel_peers
                .get(usize::from(number - FIRST_CHANNEL))
                .copied();
            return match peer {
                Some(peer) if end <= datagram.len() => FromServer::Data { peer, at: 4..end },
                _ => FromServer::Ignored,
            };
        }
        let Some(message) = Message::parse(datagram) else {
            return FromServer::Ignored;
        };
        if message.kind == DATA_INDICATION {
            let peer = message.address(XOR_PEER_ADDRESS);
            let data = message.find(DATA);
            return match (peer, data) {
                (Some(peer), Some(at)) => FromServer::Data { peer, at },
                _ => FromServer::Ignored,
            };
        }
        let Some(request) = self.asked.remove(&message.transaction) else {
            return FromServer::Ignored;
        };
        // A response that is not the server's own (no integrity, or not by
        // our key) is no answer, once we have credentials.
        if let Some(key) = &self.key
            && message.kind & ERROR != ERROR
            && !message.verifies(datagram, key)
        {
            self.asked.insert(message.transaction, request);
            return FromServer::Ignored;
        }
        if message.kind & 0x0110 == SUCCESS {
            return self.granted(request, &message, now);
        }
        if message.kind & 0x0110 != ERROR {
            return FromServer::Ignored;
        }
        let code = message
            .value(ERROR_CODE)
            .filter(|v| v.len() >= 4)
            .map_or(0, |v| u16::from(v[2] & 0x7) * 100 + u16::from(v[3]));
        let reason = message
            .value(ERROR_CODE)
            .and_then(|v| v.get(4..))
            .map(|text| String::from_utf8_lossy(text).into_owned())
            .unwrap_or_default();
        let fresh_nonce = message.value(NONCE).map(<[u8]>::to_vec);
        let first_challenge = code == 401 && self.key.is_none();
        match (code, fresh_nonce) {
            (401, Some(nonce)) if first_challenge => {
                let Some(realm) = message.value(REALM).map(<[u8]>::to_vec) else {
                    return FromServer::Refused("401 without a realm".into());
                };
                let mut md5 = Md5::new();
                md5.update(self.username.as_bytes());
                md5.update(b":");
                md5.update(&realm);
                md5.update(b":");
                md5.update(self.password.as_bytes());
                self.key = Some(md5.finalize().into());
                self.realm = Some(realm);
                self.nonce = Some(nonce);
                FromServer::Retry(self.request(request))
            }
            (438, Some(nonce)) => {
                self.nonce = Some(nonce);
                FromServer::Retry(self.request(request))
            }
            _ => match request {
                Request::Allocate => FromServer::Refused(format!("{code} {reason}")),
                Request::Permission(ip) => {
                    self.permissions.remove(&ip);
                    FromServer::Handled
                }
                Request::Channel(peer, _) => {
                    self.channels.insert(peer, Channel::Refused);
                    FromServer::Handled
                }
                Request::Refresh => FromServer::Handled,
            },
        }
    }

    fn granted(&mut self, request: Request, message: &Message, now: Instant) -> FromServer {
        let lifetime = message
            .value(LIFETIME)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map_or(REQUESTED_LIFETIME, |v| {
                Duration::from_secs(u32::from_be_bytes(v).into())
            });
        match request {
            Request::Allocate => {
                let Some(relayed) = message.address(XOR_RELAYED_ADDRESS) else {
                    return FromServer::Refused("no relayed address granted".into());
                };
                self.relayed = Some(relayed);
                self.refresh_at = Some(now + lifetime / 2);
                FromServer::Allocated(relayed)
            }
            Request::Refresh => {
                self.refresh_at = Some(now + lifetime / 2);
                FromServer::Handled
            }
            Request::Permission(ip) => {
                self.permissions.insert(ip, now + PERMISSION_REFRESH);
                FromServer::Handled
            }
            Request::Channel(peer, number) => {
                self.channels
                    .insert(peer, Channel::Bound(number, now + CHANNEL_REFRESH));
                FromServer::Handled
            }
        }
    }
}

/// A STUN message: its type, transaction and attributes' place.
struct Message<'a> {
    kind: u16,
    transaction: [u8; 12],
    attributes: &'a [u8],
    /// Where in the datagram the attributes start.
    offset: usize,
}

impl<'a> Message<'a> {
    fn parse(datagram: &'a [u8]) -> Option<Message<'a>> {
        let header = datagram.get(..20)?;
        let kind = u16::from_be_bytes([header[0], header[1]]);
        let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if kind & 0xc000 != 0 || header[4..8] != MAGIC_COOKIE || length % 4 != 0 {
            return None;
        }
        Some(Message {
            kind,
            transaction: header[8..20].try_into().ok()?,
            attributes: datagram.get(20..20 + length)?,
            offset: 20,
        })
    }

    /// The first attribute of `kind`: where its value is in the datagram.
    fn find(&self, kind: u16) -> Option<Range<usize>> {
        let mut at = 0;
        while at + 4 <= self.attributes.len() {
            let found = u16::from_be_bytes([self.attributes[at], self.attributes[at + 1]]);
            let size = usize::from(u16::from_be_bytes([
                self.attributes[at + 2],
                self.attributes[at + 3],
            ]));
            let value = at + 4..at + 4 + size;
            if value.end > self.attributes.len() {
                return None;
            }
            if found == kind {
                return Some(self.offset + value.start..self.offset + value.end);
            }
            at = value.start + size.div_ceil(4) * 4;
        }
        None
    }

    fn value(&self, kind: u16) -> Option<&'a [u8]> {
        let at = self.find(kind)?;
        self.attributes
            .get(at.start - self.offset..at.end - self.offset)
    }

    fn address(&self, kind: u16) -> Option<SocketAddr> {
        let value = self.value(kind)?;
        let mut mask = [0u8; 16];
        mask[..4].copy_from_slice(&MAGIC_COOKIE);
        mask[4..].copy_from_slice(&self.transaction);
        let port = u16::from_be_bytes([value.get(2)? ^ mask[0], value.get(3)? ^ mask[1]]);
        let unmask =
            |bytes: &[u8]| -> Vec<u8> { bytes.iter().zip(mask).map(|(b, m)| b ^ m).collect() };
        let ip: IpAddr = match value.get(1)? {
            1 => <[u8; 4]>::try_from(unmask(value.get(4..8)?)).ok()?.into(),
            2 => <[u8; 16]>::try_from(unmask(value.get(4..20)?)).ok()?.into(),
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }

    /// Its MESSAGE-INTEGRITY is by `key`.
    fn verifies(&self, datagram: &[u8], key: &[u8; 16]) -> bool {
        let Some(at) = self.find(MESSAGE_INTEGRITY) else {
            return false;
        };
        if at.len() != 20 {
            return false;
        }
        // The length covers the attributes up to and including the integrity.
        let mut covered = datagram[..at.start - 4].to_vec();
        let length = (at.end - 20) as u16;
        covered[2..4].copy_from_slice(&length.to_be_bytes());
        integrity(key, &covered)[..] == datagram[at]
    }
}

fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (4 - value.len() % 4) % 4, 0);
}

/// A whole message; with `key`, its MESSAGE-INTEGRITY last.
fn message(kind: u16, transaction: [u8; 12], attributes: &[u8], key: Option<&[u8; 16]>) -> Vec<u8> {
    let integrity_size = if key.is_some() { 24 } else { 0 };
    let mut out = Vec::with_capacity(20 + attributes.len() + integrity_size);
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&((attributes.len() + integrity_size) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(&transaction);
    out.extend_from_slice(attributes);
    if let Some(key) = key {
        let mac = integrity(key, &out);
        attribute(&mut out, MESSAGE_INTEGRITY, &mac);
    }
    out
}

fn integrity(key: &[u8; 16], covered: &[u8]) -> [u8; 20] {
    let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(covered);
    mac.finalize().into_bytes().into()
}

/// An XOR-…-ADDRESS value (RFC 8489 §14.2).
fn xor_address(address: SocketAddr, transaction: &[u8; 12]) -> Vec<u8> {
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE);
    mask[4..].copy_from_slice(transaction);
    let port = address.port().to_be_bytes();
    let (family, ip): (u8, Vec<u8>) = match address.ip() {
        IpAddr::V4(v4) => (1, v4.octets().to_vec()),
        IpAddr::V6(v6) => (2, v6.octets().to_vec()),
    };
    let mut value = vec![0, family, port[0] ^ mask[0], port[1] ^ mask[1]];
    value.extend(ip.iter().zip(mask).map(|(b, m)| b ^ m));
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> TurnServer {
        "turn://alice:s3cret@turn.example.org:3478".parse().unwrap()
    }

    #[test]
    fn turn_servers_are_read_as_webrtcbin_spells_them() {
        let server = server();
        assert_eq!(
            (server.host.as_str(), server.port, server.username.as_str()),
            ("turn.example.org", 3478, "alice")
        );
        assert_eq!(server.password, "s3cret");
        let server: TurnServer = "turn://a%40b:p%3Aw@[2001:db8::1]".parse().unwrap();
        assert_eq!((server.host.as_str(), server.port), ("2001:db8::1", 3478));
        assert_eq!(
            (server.username.as_str(), server.password.as_str()),
            ("a@b", "p:w")
        );
        for bad in [
            "stun://host",
            "turn://host:3478",
            "turn://user@host",
            "turn://user:pw@host:port",
            "turn://:pw@host",
            "turn://user:pw@",
        ] {
            assert!(bad.parse::<TurnServer>().is_err(), "{bad}");
        }
        assert!(
            !format!("{server:?}").contains("p:w"),
            "the password stays out of logs"
        );
        assert_eq!(server.url(), "turn://a%40b:p%3Aw@[2001:db8::1]:3478");
        assert_eq!(server.url().parse::<TurnServer>(), Ok(server));
        let tcp: TurnServer = "turn://u:p@relay.example:443?transport=tcp"
            .parse()
            .unwrap();
        assert_eq!((tcp.port, tcp.transport), (443, TurnTransport::Tcp));
        assert_eq!(tcp.url().parse::<TurnServer>(), Ok(tcp));
        let udp: TurnServer = "turn://u:p@relay.example?transport=udp".parse().unwrap();
        let tls: TurnServer = "turns://u:p@relay.example".parse().unwrap();
        assert_eq!((tls.port, tls.transport), (5349, TurnTransport::Tls));
        assert_eq!(tls.url(), "turns://u:p@relay.example:5349");
        assert_eq!(tls.url().parse::<TurnServer>(), Ok(tls.clone()));
        assert_eq!(format!("{tls:?}"), "turns://u@relay.example:5349");
        let tls: TurnServer = "turns:u:p@relay.example:443?transport=tcp".parse().unwrap();
        assert_eq!((tls.port, tls.transport), (443, TurnTransport::Tls));
        assert!(
            "turns://u:p@relay.example?transport=udp"
                .parse::<TurnServer>()
                .is_err()
        );
        let bare_v6: TurnServer = "turn://u:p@2001:db8::1".parse().unwrap();
        assert_eq!((bare_v6.host.as_str(), bare_v6.port), ("2001:db8::1", 3478));
        // As apps' `iceServers` spell it, the credentials put in the URL.
        let sdk: TurnServer = "turn:u:p@turn.example.com:5349?transport=tcp"
            .parse()
            .unwrap();
        assert_eq!(
            (sdk.host.as_str(), sdk.port, sdk.transport),
            ("turn.example.com", 5349, TurnTransport::Tcp)
        );
        assert_eq!((udp.port, udp.transport), (3478, TurnTransport::Udp));
        assert!(
            "turn://u:p@relay.example?transport=sctp"
                .parse::<TurnServer>()
                .is_err()
        );
    }

    /// The server's side of the exchange, as RFC 8656 describes it.
    fn answer(request: &[u8], kind: u16, attributes: &[u8], key: Option<&[u8; 16]>) -> Vec<u8> {
        let transaction: [u8; 12] = request[8..20].try_into().unwrap();
        message(kind, transaction, attributes, key)
    }

    fn key() -> [u8; 16] {
        Md5::digest(b"alice:example.org:s3cret").into()
    }

    /// Allocate, the 401 challenge, Allocate with credentials, granted.
    fn allocated(now: Instant) -> (Allocation, SocketAddr) {
        let mut allocation = Allocation::new(&server());
        let first = allocation.allocate();
        assert!(
            Message::parse(&first)
                .unwrap()
                .find(MESSAGE_INTEGRITY)
                .is_none()
        );
        let mut challenge = Vec::new();
        attribute(
            &mut challenge,
            ERROR_CODE,
            &[0, 0, 4, 1, b'U', b'n', b'a', b'u'],
        );
        attribute(&mut challenge, REALM, b"example.org");
        attribute(&mut challenge, NONCE, b"n0nce");
        let FromServer::Retry(second) =
            allocation.receive(&answer(&first, ALLOCATE | ERROR, &challenge, None), now)
        else {
            panic!("the challenge is answered");
        };
        let parsed = Message::parse(&second).unwrap();
        assert_eq!(parsed.value(USERNAME), Some(&b"alice"[..]));
        assert_eq!(parsed.value(NONCE), Some(&b"n0nce"[..]));
        assert!(
            parsed.verifies(&second, &key()),
            "signed with the long-term key"
        );

        let relayed: SocketAddr = "198.51.100.9:49152".parse().unwrap();
        let transaction: [u8; 12] = second[8..20].try_into().unwrap();
        let mut granted = Vec::new();
        attribute(
            &mut granted,
            XOR_RELAYED_ADDRESS,
            &xor_address(relayed, &transaction),
        );
        attribute(&mut granted, LIFETIME, &600u32.to_be_bytes());
        let success = answer(&second, ALLOCATE | SUCCESS, &granted, Some(&key()));
        assert_eq!(
            allocation.receive(&success, now),
            FromServer::Allocated(relayed)
        );
        (allocation, relayed)
    }

    #[test]
    fn an_allocation_answers_the_challenge_and_is_refreshed_at_half_its_lifetime() {
        let now = Instant::now();
        let (mut allocation, relayed) = allocated(now);
        assert_eq!(allocation.relayed(), Some(relayed));
        assert_eq!(
            allocation.refresh_at(),
            Some(now + Duration::from_secs(300))
        );
        assert!(allocation.refresh(now).is_none());
        let refresh = allocation.refresh(now + Duration::from_secs(300)).unwrap();
        let parsed = Message::parse(&refresh).unwrap();
        assert_eq!(parsed.kind, REFRESH);
        assert!(parsed.verifies(&refresh, &key()));
    }

    #[test]
    fn data_goes_out_in_channel_data_once_its_channel_is_bound() {
        let now = Instant::now();
        let (mut allocation, _) = allocated(now);
        let peer: SocketAddr = "203.0.113.5:50000".parse().unwrap();
        let out = allocation.send(peer, b"hello", now);
        assert_eq!(out.len(), 2, "ChannelBind, then the data");
        let bind = Message::parse(&out[0]).unwrap();
        assert_eq!(bind.kind, CHANNEL_BIND);
        assert_eq!(bind.value(CHANNEL_NUMBER), Some(&[0x40, 0, 0, 0][..]));
        assert_eq!(bind.address(XOR_PEER_ADDRESS), Some(peer));
        assert!(bind.verifies(&out[0], &key()));
        // Until it is bound, in a Send indication (the ChannelBind installs
        // its permission).
        let indication = Message::parse(&out[1]).unwrap();
        assert_eq!(indication.kind, SEND_INDICATION);
        assert_eq!(indication.address(XOR_PEER_ADDRESS), Some(peer));
        assert_eq!(indication.value(DATA), Some(&b"hello"[..]));

        let bound = answer(&out[0], CHANNEL_BIND | SUCCESS, &[], Some(&key()));
        assert_eq!(allocation.receive(&bound, now), FromServer::Handled);
        let later = now + Duration::from_secs(1);
        assert_eq!(
            allocation.send(peer, b"again", later),
            vec![b"\x40\x00\x00\x05again".to_vec()]
        );
        // Another peer, another channel.
        let other: SocketAddr = "203.0.113.5:50002".parse().unwrap();
        let out = allocation.send(other, b"x", later);
        let bind = Message::parse(&out[0]).unwrap();
        assert_eq!(bind.value(CHANNEL_NUMBER), Some(&[0x40, 1, 0, 0][..]));
        // Bound again before the binding or its permission ends.
        let out = allocation.send(peer, b"later", now + CHANNEL_REFRESH);
        assert_eq!(out.len(), 2);
        assert_eq!(Message::parse(&out[0]).unwrap().kind, CHANNEL_BIND);
        assert_eq!(out[1], b"\x40\x00\x00\x05later");
    }

    #[test]
    fn an_unanswered_channel_bind_is_asked_again() {
        let now = Instant::now();
        let (mut allocation, _) = allocated(now);
        let peer: SocketAddr = "203.0.113.5:50000".parse().unwrap();
        assert_eq!(allocation.send(peer, b"a", now).len(), 2);
        assert_eq!(
            allocation
                .send(peer, b"b", now + Duration::from_millis(100))
                .len(),
            1
        );
        let again = allocation.send(peer, b"c", now + PERMISSION_RETRY);
        assert_eq!(again.len(), 2);
        let bind = Message::parse(&again[0]).unwrap();
        assert_eq!(bind.value(CHANNEL_NUMBER), Some(&[0x40, 0, 0, 0][..]));
    }

    #[test]
    fn without_a_channel_data_goes_in_send_indications_after_a_permission() {
        let now = Instant::now();
        let (mut allocation, _) = allocated(now);
        let peer: SocketAddr = "203.0.113.5:50000".parse().unwrap();
        let out = allocation.send(peer, b"hello", now);
        let mut refusal = Vec::new();
        attribute(&mut refusal, ERROR_CODE, &[0, 0, 4, 3]);
        let refused = answer(&out[0], CHANNEL_BIND | ERROR, &refusal, None);
        assert_eq!(allocation.receive(&refused, now), FromServer::Handled);

        let out = allocation.send(peer, b"hello", now);
        assert_eq!(out.len(), 2, "CreatePermission, then the data");
        let permission = Message::parse(&out[0]).unwrap();
        assert_eq!(permission.kind, CREATE_PERMISSION);
        assert_eq!(
            permission.address(XOR_PEER_ADDRESS).map(|a| a.ip()),
            Some(peer.ip())
        );
        assert_eq!(Message::parse(&out[1]).unwrap().kind, SEND_INDICATION);
        // Granted: the next datagrams go alone, until the permission is due
        // again; unanswered, it is asked again.
        let granted = answer(&out[0], CREATE_PERMISSION | SUCCESS, &[], Some(&key()));
        assert_eq!(allocation.receive(&granted, now), FromServer::Handled);
        let second = now + Duration::from_secs(1);
        assert_eq!(allocation.send(peer, b"again", second).len(), 1);
        let due = now + PERMISSION_REFRESH;
        assert_eq!(allocation.send(peer, b"later", due).len(), 2);
        assert_eq!(allocation.send(peer, b"b", due).len(), 1);
        assert_eq!(allocation.send(peer, b"c", due + PERMISSION_RETRY).len(), 2);
    }

    #[test]
    fn channel_data_is_padded_to_four_bytes_over_a_stream() {
        let tcp: TurnServer = "turn://alice:s3cret@turn.example.org?transport=tcp"
            .parse()
            .unwrap();
        let allocation = Allocation::new(&tcp);
        assert_eq!(
            allocation.channel_data(0x4000, b"hello"),
            b"\x40\x00\x00\x05hello\0\0\0"
        );
        let udp = Allocation::new(&server());
        assert_eq!(udp.channel_data(0x4000, b"hello"), b"\x40\x00\x00\x05hello");
    }

    #[test]
    fn relayed_data_comes_out_of_channel_data_of_our_channels() {
        let now = Instant::now();
        let (mut allocation, _) = allocated(now);
        let peer: SocketAddr = "203.0.113.5:50000".parse().unwrap();
        allocation.send(peer, b"hello", now);
        let message = b"\x40\x00\x00\x04rtp!\0\0";
        assert_eq!(
            allocation.receive(message, now),
            FromServer::Data { peer, at: 4..8 }
        );
        for garbage in [
            &b"\x40\x01\x00\x04rtp!"[..],
            b"\x40\x00\x00\x05rtp!",
            b"\x40\x00\x00",
            b"\x4f\xff\xff\xff",
        ] {
            assert_eq!(allocation.receive(garbage, now), FromServer::Ignored);
        }
    }

    #[test]
    fn relayed_data_comes_out_of_data_indications() {
        let now = Instant::now();
        let (mut allocation, _) = allocated(now);
        let peer: SocketAddr = "203.0.113.5:50000".parse().unwrap();
        let transaction = [7u8; 12];
        let mut attributes = Vec::new();
        attribute(
            &mut attributes,
            XOR_PEER_ADDRESS,
            &xor_address(peer, &transaction),
        );
        attribute(&mut attributes, DATA, b"rtp!");
        let indication = message(DATA_INDICATION, transaction, &attributes, None);
        let FromServer::Data { peer: from, at } = allocation.receive(&indication, now) else {
            panic!("data");
        };
        assert_eq!(from, peer);
        assert_eq!(&indication[at], b"rtp!");
    }

    #[test]
    fn a_stale_nonce_is_taken_and_the_request_sent_again() {
        let now = Instant::now();
        let (mut allocation, _) = allocated(now);
        let refresh = allocation.refresh(now + Duration::from_secs(300)).unwrap();
        let mut stale = Vec::new();
        attribute(&mut stale, ERROR_CODE, &[0, 0, 4, 38]);
        attribute(&mut stale, NONCE, b"fresh");
        let FromServer::Retry(again) =
            allocation.receive(&answer(&refresh, REFRESH | ERROR, &stale, None), now)
        else {
            panic!("sent again");
        };
        assert_eq!(
            Message::parse(&again).unwrap().value(NONCE),
            Some(&b"fresh"[..])
        );
    }

    #[test]
    fn refusals_forgeries_and_garbage() {
        let now = Instant::now();
        let mut allocation = Allocation::new(&server());
        let request = allocation.allocate();
        let mut refusal = Vec::new();
        attribute(
            &mut refusal,
            ERROR_CODE,
            &[0, 0, 4, 86, b'Q', b'u', b'o', b't', b'a'],
        );
        assert_eq!(
            allocation.receive(&answer(&request, ALLOCATE | ERROR, &refusal, None), now),
            FromServer::Refused("486 Quota".into())
        );
        // A success to nothing asked, or not signed by our key.
        let (mut allocation, _) = allocated(now);
        let refresh = allocation.refresh(now + Duration::from_secs(300)).unwrap();
        let forged = answer(&refresh, REFRESH | SUCCESS, &[], Some(&[9; 16]));
        assert_eq!(allocation.receive(&forged, now), FromServer::Ignored);
        for garbage in [
            &b""[..],
            &[0xff; 20],
            &refresh[..19],
            b"not stun at all, really",
        ] {
            assert_eq!(allocation.receive(garbage, now), FromServer::Ignored);
        }
    }

    #[test]
    fn messages_are_framed_on_a_stream() {
        let request = Allocation::new(&server()).allocate();
        assert_eq!(stream_message_length(&request), Ok(Some(request.len())));
        assert_eq!(
            stream_message_length(&request[..4]),
            Ok(Some(request.len()))
        );
        assert_eq!(stream_message_length(&request[..3]), Ok(None));
        assert_eq!(stream_message_length(&request[..1]), Ok(None));
        assert_eq!(stream_message_length(&[]), Ok(None));
        // ChannelData 0x4000 with 5 bytes: padded to 8.
        assert_eq!(stream_message_length(&[0x40, 0, 0, 5]), Ok(Some(12)));
        assert!(stream_message_length(b"PUT / HTTP/1.1").is_err());
        assert!(stream_message_length(&[0xff, 0, 0, 0]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn mutated_server_datagrams_never_panic(
            cut in 0usize..60,
            junk in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
        ) {
            let now = Instant::now();
            let (mut allocation, _) = allocated(now);
            let refresh = allocation.refresh(now + Duration::from_secs(300)).unwrap();
            let mut datagram = answer(&refresh, REFRESH | SUCCESS, &junk, None);
            datagram.truncate(cut.max(20));
            allocation.receive(&datagram, now);
        }
    }
}
