//! The media session that `sipsrc` and `sipsink` share through their
//! `session` name: one UDP socket pair (RTP, and RTCP unless muxed), the
//! remote address (configured, or latched from what the phone really sends),
//! RFC 3550 statistics and the RTCP reports built from them.
//!
//! Media is sent from the port it is received on (symmetric RTP), which is
//! what lets phones behind NAT work at all.

mod receiver_stats;
pub mod rtcp;
mod srtp;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use bridge_protocol::sdes::SrtpKey;
use rand::Rng;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Notify;

pub use receiver_stats::Arrival;
use receiver_stats::ReceiverStats;
use srtp::Protection;

/// How long the receiving thread blocks in one `recv` before it looks at
/// flushing, timeouts and periodic statistics again.
pub const RECV_POLL: Duration = Duration::from_millis(20);
/// After this much silence from the latched address, another source may take over.
const LATCH_HOLD: Duration = Duration::from_millis(500);
const MAX_DATAGRAM: usize = 65536;

thread_local! {
    /// Room for the largest datagram, once per thread rather than per call:
    /// what is received is copied out before the next receive.
    static RECEIVE_BUFFER: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; MAX_DATAGRAM].into_boxed_slice());
}

/// Runs `receive` with this thread's receive buffer; `receive` must not
/// receive again itself.
fn with_receive_buffer<R>(receive: impl FnOnce(&mut [u8]) -> R) -> R {
    RECEIVE_BUFFER.with_borrow_mut(|buffer| receive(buffer))
}

pub const DEFAULT_RTCP_INTERVAL: Duration = Duration::from_secs(5);

/// Where and how to bind the session's sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindConfig {
    pub address: IpAddr,
    /// 0: pick an even port from `port_range`.
    pub port: u16,
    pub port_range: (u16, u16),
    pub rtcp_mux: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot bind RTP/RTCP sockets on {address} port {port}: {source}")]
    Bind {
        address: IpAddr,
        port: u16,
        source: io::Error,
    },
    #[error("no free even port pair on {address} between {min} and {max}")]
    NoFreePort { address: IpAddr, min: u16, max: u16 },
}

/// What the session made of one received RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtpVerdict {
    Accept,
    Drop,
}

/// What a datagram on the RTP port is.
#[derive(Debug)]
pub enum Datagram<'a> {
    Rtp(rtp_types::RtpPacket<'a>),
    /// RTCP multiplexed on the RTP port (RFC 5761).
    Rtcp,
    Invalid(rtp_types::RtpParseError),
}

/// Sorts one received datagram; never panics, whatever the bytes.
pub fn classify(data: &[u8]) -> Datagram<'_> {
    if rtcp::looks_like_rtcp(data) {
        return Datagram::Rtcp;
    }
    match rtp_types::RtpPacket::parse(data) {
        Ok(packet) => Datagram::Rtp(packet),
        Err(e) => Datagram::Invalid(e),
    }
}

/// A snapshot of the session's counters, for the elements' `stats` property.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionStats {
    pub local_address: String,
    pub remote_address: String,
    pub local_ssrc: u32,
    pub remote_ssrc: u32,
    pub packets_received: u64,
    pub octets_received: u64,
    pub packets_lost: i64,
    pub packets_duplicated: u64,
    pub packets_reordered: u64,
    pub packets_late: u64,
    pub packets_invalid: u64,
    pub packets_unknown_pt: u64,
    pub packets_wrong_source: u64,
    pub jitter: u32,
    pub jitter_ms: f64,
    /// -1 until a report about our media came back.
    pub rtt_ms: f64,
    /// -1 before the first packet.
    pub last_packet_age_ms: i64,
    pub packets_sent: u64,
    pub octets_sent: u64,
    pub packets_not_sent: u64,
    pub rtcp_sent: u64,
    pub rtcp_received: u64,
    pub rtcp_invalid: u64,
    /// SRTP/SRTCP datagrams that failed authentication or replay checks.
    pub srtp_rejected: u64,
    /// PLI/FIR the peer sent about our media, and those we sent about its.
    pub key_frame_requests_received: u64,
    pub key_frame_requests_sent: u64,
    /// What the peer's last report said about the media we send.
    pub remote_fraction_lost: f64,
    pub remote_cumulative_lost: i64,
    pub remote_jitter: u32,
}

#[derive(Debug)]
struct Sender {
    ssrc: u32,
    clock_rate: u32,
    last_rtp_timestamp: u32,
    last_sent_at: Instant,
    packets: u32,
    octets: u32,
    sent_since_report: bool,
}

#[derive(Debug, Default)]
struct Counters {
    packets_received: u64,
    octets_received: u64,
    packets_duplicated: u64,
    packets_reordered: u64,
    packets_late: u64,
    packets_invalid: u64,
    packets_unknown_pt: u64,
    packets_wrong_source: u64,
    packets_sent: u64,
    octets_sent: u64,
    packets_not_sent: u64,
    rtcp_sent: u64,
    rtcp_received: u64,
    rtcp_invalid: u64,
    srtp_rejected: u64,
    key_frame_requests_received: u64,
    key_frame_requests_sent: u64,
}

#[derive(Debug)]
struct State {
    remote_rtp: Option<SocketAddr>,
    remote_rtcp: Option<SocketAddr>,
    remote_rtcp_explicit: bool,
    latch: bool,
    /// When RTP last came from `remote_rtp` (None: never, e.g. an address from SDP).
    last_from_remote: Option<Instant>,
    rtcp_interval: Duration,
    source: Option<ReceiverStats>,
    /// Loss of earlier SSRCs of this session, kept in the total.
    lost_before: i64,
    last_packet_at: Option<Instant>,
    local_ssrc: u32,
    sender: Option<Sender>,
    /// Middle 32 bits of the peer's last SR and when it arrived.
    last_sr_from_peer: Option<(u32, Instant)>,
    rtt: Option<Duration>,
    remote_report: Option<rtcp::ReportAboutUs>,
    counters: Counters,
}

pub struct MediaSession {
    name: String,
    rtp_socket: UdpSocket,
    /// For sending RTCP from any thread; the RTCP task receives on its own handle.
    rtcp_socket: Option<UdpSocket>,
    local_rtp: SocketAddr,
    cname: String,
    state: Mutex<State>,
    bye_received: AtomicBool,
    bye_sent: AtomicBool,
    shutdown: Arc<Notify>,
    /// SDES-SRTP, when the stream is RTP/SAVP.
    protection: Mutex<Option<Arc<Protection>>>,
    /// Called when the peer asks for a key frame of the media we send.
    key_frame_handler: Mutex<Option<KeyFrameHandler>>,
}

pub type KeyFrameHandler = Box<dyn Fn() + Send + Sync>;

static SESSIONS: LazyLock<Mutex<HashMap<String, Weak<MediaSession>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl MediaSession {
    /// Joins the session called `name`, or creates it, binding its sockets
    /// with `bind`. Without a name the session is private to the caller.
    pub fn acquire(
        name: Option<&str>,
        bind: &BindConfig,
    ) -> Result<Arc<MediaSession>, SessionError> {
        let mut sessions = SESSIONS.lock().unwrap();
        sessions.retain(|_, weak| weak.strong_count() > 0);
        if let Some(existing) = name.and_then(|n| sessions.get(n)).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let name = name
            .map(str::to_owned)
            .unwrap_or_else(|| format!("private-{:016x}", rand::rng().random::<u64>()));
        let session = Arc::new(Self::bind(name.clone(), bind)?);
        sessions.insert(name, Arc::downgrade(&session));
        session.start_rtcp_task();
        Ok(session)
    }

    fn bind(name: String, bind: &BindConfig) -> Result<MediaSession, SessionError> {
        let (rtp_socket, rtcp_socket) = bind_pair(bind)?;
        rtp_socket
            .set_read_timeout(Some(RECV_POLL))
            .map_err(|source| SessionError::Bind {
                address: bind.address,
                port: bind.port,
                source,
            })?;
        let local_rtp = rtp_socket
            .local_addr()
            .map_err(|source| SessionError::Bind {
                address: bind.address,
                port: bind.port,
                source,
            })?;
        let mut rng = rand::rng();
        Ok(MediaSession {
            cname: format!("{:016x}@sip-cc-bridge", rng.random::<u64>()),
            state: Mutex::new(State {
                remote_rtp: None,
                remote_rtcp: None,
                remote_rtcp_explicit: false,
                latch: true,
                last_from_remote: None,
                rtcp_interval: DEFAULT_RTCP_INTERVAL,
                source: None,
                lost_before: 0,
                last_packet_at: None,
                local_ssrc: rng.random(),
                sender: None,
                last_sr_from_peer: None,
                rtt: None,
                remote_report: None,
                counters: Counters::default(),
            }),
            name,
            rtp_socket,
            rtcp_socket,
            local_rtp,
            bye_received: AtomicBool::new(false),
            bye_sent: AtomicBool::new(false),
            shutdown: Arc::new(Notify::new()),
            protection: Mutex::new(None),
            key_frame_handler: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn local_rtp_addr(&self) -> SocketAddr {
        self.local_rtp
    }

    pub fn is_rtcp_muxed(&self) -> bool {
        self.rtcp_socket.is_none()
    }

    /// Sets where media goes. Without an explicit RTCP address, RTCP goes to
    /// the RTP port + 1 (or the RTP port itself when muxed). An address of
    /// zero (RFC 2543's hold) is nowhere: nothing is sent until the peer's
    /// own packets show where it is (Linux would take it for this host).
    pub fn set_remote(&self, rtp: SocketAddr, rtcp: Option<SocketAddr>) {
        let mut state = self.state.lock().unwrap();
        state.last_from_remote = None;
        if rtp.ip().is_unspecified() {
            state.remote_rtp = None;
            state.remote_rtcp = None;
            state.remote_rtcp_explicit = false;
            return;
        }
        state.remote_rtp = Some(canonical(rtp));
        state.remote_rtcp_explicit = rtcp.is_some();
        state.remote_rtcp = Some(
            rtcp.map(canonical)
                .unwrap_or_else(|| self.default_rtcp_for(rtp)),
        );
    }

    pub fn remote_rtp(&self) -> Option<SocketAddr> {
        self.state.lock().unwrap().remote_rtp
    }

    pub fn set_latch(&self, latch: bool) {
        self.state.lock().unwrap().latch = latch;
    }

    /// Switches SRTP on with these keys (ours for sending, the peer's for
    /// receiving), or off. The same keys again change nothing.
    pub fn set_srtp(&self, keys: Option<(SrtpKey, SrtpKey)>) -> Result<(), String> {
        let mut protection = self.protection.lock().unwrap();
        *protection = match keys {
            Some((send, receive)) => {
                if protection
                    .as_ref()
                    .is_some_and(|p| p.has_keys(&send, &receive))
                {
                    return Ok(());
                }
                Some(Arc::new(Protection::new(send, receive)?))
            }
            None => None,
        };
        Ok(())
    }

    fn protection(&self) -> Option<Arc<Protection>> {
        self.protection.lock().unwrap().clone()
    }

    /// The plain form of `datagram` (itself without SRTP); `None` when it
    /// failed authentication (counted, and reported once).
    fn unprotect<'a>(&self, datagram: &'a [u8], from: SocketAddr) -> Option<Cow<'a, [u8]>> {
        let Some(protection) = self.protection() else {
            return Some(Cow::Borrowed(datagram));
        };
        match protection.unprotect(datagram) {
            Ok(plain) => Some(Cow::Owned(plain)),
            Err(e) => {
                let first = {
                    let mut state = self.state.lock().unwrap();
                    state.counters.srtp_rejected += 1;
                    state.counters.srtp_rejected == 1
                };
                if first {
                    warn(&self.name, &format!("dropped SRTP from {from}: {e}"));
                }
                None
            }
        }
    }

    pub fn set_rtcp_interval(&self, interval: Duration) {
        self.state.lock().unwrap().rtcp_interval = interval.max(Duration::from_millis(100));
    }

    fn default_rtcp_for(&self, rtp: SocketAddr) -> SocketAddr {
        let rtp = canonical(rtp);
        if self.is_rtcp_muxed() {
            rtp
        } else {
            SocketAddr::new(rtp.ip(), rtp.port().wrapping_add(1))
        }
    }

    /// Receives one datagram on the RTP socket, waiting at most [`RECV_POLL`],
    /// and hands it to `on_datagram`; with SRTP, unprotected first (rejected
    /// datagrams count as nothing received, `None`).
    pub fn recv_rtp<R>(
        &self,
        on_datagram: impl FnOnce(SocketAddr, &[u8]) -> R,
    ) -> io::Result<Option<R>> {
        match self.try_recv_rtp(on_datagram) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            received => received,
        }
    }

    /// As [`Self::recv_rtp`], but nothing to read is `WouldBlock` (on a
    /// socket made non-blocking by [`Self::rtp_socket_for_readiness`]).
    pub fn try_recv_rtp<R>(
        &self,
        on_datagram: impl FnOnce(SocketAddr, &[u8]) -> R,
    ) -> io::Result<Option<R>> {
        with_receive_buffer(|buffer| {
            let (len, from) = self.rtp_socket.recv_from(buffer)?;
            let from = canonical(from);
            Ok(self
                .unprotect(&buffer[..len], from)
                .map(|plain| on_datagram(from, &plain)))
        })
    }

    /// A second handle on the RTP socket, for a receiver woken by its
    /// readiness: the socket is non-blocking until [`Self::set_rtp_blocking`].
    pub fn rtp_socket_for_readiness(&self) -> io::Result<UdpSocket> {
        self.rtp_socket.set_nonblocking(true)?;
        self.rtp_socket.try_clone()
    }

    pub fn set_rtp_blocking(&self) {
        let _ = self.rtp_socket.set_nonblocking(false);
    }

    /// Accounts for a received RTP packet: checks its source (latching onto a
    /// new one when allowed) and its sequence number.
    pub fn on_rtp_received(
        &self,
        from: SocketAddr,
        ssrc: u32,
        seq: u16,
        rtp_timestamp: u32,
        octets: usize,
        clock_rate: u32,
    ) -> RtpVerdict {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        if !self.source_allowed(&mut state, from, ssrc, now) {
            state.counters.packets_wrong_source += 1;
            return RtpVerdict::Drop;
        }
        if state.source.as_ref().is_none_or(|s| s.ssrc != ssrc) {
            if let Some(old) = &state.source {
                state.lost_before += old.lost();
            }
            state.source = Some(ReceiverStats::new(ssrc, seq, clock_rate));
        }
        let arrival = state
            .source
            .as_mut()
            .unwrap()
            .record(seq, rtp_timestamp, clock_rate, now);
        match arrival {
            Arrival::Duplicate => {
                state.counters.packets_duplicated += 1;
                RtpVerdict::Drop
            }
            Arrival::Resync => RtpVerdict::Drop,
            Arrival::InOrder | Arrival::Reordered => {
                if arrival == Arrival::Reordered {
                    state.counters.packets_reordered += 1;
                }
                state.counters.packets_received += 1;
                state.counters.octets_received += octets as u64;
                state.last_packet_at = Some(now);
                RtpVerdict::Accept
            }
        }
    }

    /// The source rule: the configured or latched address is always fine;
    /// with `latch`, a new address takes over when nothing was latched yet,
    /// when it continues the current SSRC (NAT rebinding, re-INVITE), or when
    /// the old address has gone quiet.
    fn source_allowed(&self, state: &mut State, from: SocketAddr, ssrc: u32, now: Instant) -> bool {
        match state.remote_rtp {
            Some(remote) if remote == from => {
                state.last_from_remote = Some(now);
                true
            }
            None if !state.latch => true,
            remote => {
                if !state.latch {
                    return false;
                }
                let same_source = state.source.as_ref().is_some_and(|s| s.ssrc == ssrc);
                let old_quiet = state
                    .last_from_remote
                    .is_none_or(|t| now.duration_since(t) >= LATCH_HOLD);
                if remote.is_some() && !same_source && !old_quiet {
                    return false;
                }
                state.remote_rtp = Some(from);
                if !state.remote_rtcp_explicit {
                    state.remote_rtcp = Some(self.default_rtcp_for(from));
                }
                state.last_from_remote = Some(now);
                true
            }
        }
    }

    pub fn count_invalid(&self) {
        self.state.lock().unwrap().counters.packets_invalid += 1;
    }

    pub fn count_unknown_payload_type(&self) {
        self.state.lock().unwrap().counters.packets_unknown_pt += 1;
    }

    /// The jitter buffer's count of packets that came too late to be played.
    pub fn set_late(&self, late: u64) {
        self.state.lock().unwrap().counters.packets_late = late;
    }

    pub fn last_packet_age(&self) -> Option<Duration> {
        self.state
            .lock()
            .unwrap()
            .last_packet_at
            .map(|t| t.elapsed())
    }

    /// Sends one RTP packet to the remote address. Returns `false` when
    /// there is no remote address yet (waiting to latch).
    pub fn send_rtp(
        &self,
        packet: &[u8],
        ssrc: u32,
        rtp_timestamp: u32,
        clock_rate: u32,
    ) -> io::Result<bool> {
        let destination = {
            let mut state = self.state.lock().unwrap();
            let Some(remote) = state.remote_rtp else {
                state.counters.packets_not_sent += 1;
                return Ok(false);
            };
            state.counters.packets_sent += 1;
            state.counters.octets_sent += packet.len() as u64;
            state.local_ssrc = ssrc;
            let now = Instant::now();
            let sender = state.sender.get_or_insert(Sender {
                ssrc,
                clock_rate,
                last_rtp_timestamp: rtp_timestamp,
                last_sent_at: now,
                packets: 0,
                octets: 0,
                sent_since_report: false,
            });
            sender.ssrc = ssrc;
            sender.clock_rate = clock_rate;
            sender.last_rtp_timestamp = rtp_timestamp;
            sender.last_sent_at = now;
            sender.packets = sender.packets.wrapping_add(1);
            // RFC 3550: the octet count covers the payload only.
            sender.octets = sender
                .octets
                .wrapping_add(packet.len().saturating_sub(12) as u32);
            sender.sent_since_report = true;
            remote
        };
        let destination = self.destination(destination);
        match self.protection() {
            Some(protection) => {
                let protected = protection.protect_rtp(packet).map_err(io::Error::other)?;
                self.rtp_socket.send_to(&protected, destination)?
            }
            None => self.rtp_socket.send_to(packet, destination)?,
        };
        Ok(true)
    }

    /// A v6 socket reaches v4 peers through mapped addresses.
    fn destination(&self, to: SocketAddr) -> SocketAddr {
        match (self.local_rtp, to) {
            (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => to,
        }
    }

    fn send_rtcp(&self, data: &[u8]) {
        let Some(remote) = self.state.lock().unwrap().remote_rtcp else {
            return;
        };
        let socket = self.rtcp_socket.as_ref().unwrap_or(&self.rtp_socket);
        let protected;
        let data = match self.protection().map(|p| p.protect_rtcp(data)) {
            Some(Ok(packet)) => {
                protected = packet;
                &protected
            }
            Some(Err(e)) => return warn(&self.name, &format!("cannot protect RTCP: {e}")),
            None => data,
        };
        match socket.send_to(data, self.destination(remote)) {
            Ok(_) => self.state.lock().unwrap().counters.rtcp_sent += 1,
            Err(e) => warn(&self.name, &format!("sending RTCP to {remote} failed: {e}")),
        }
    }

    /// Sends one compound report now.
    pub fn send_report(&self) {
        let packet = {
            let mut state = self.state.lock().unwrap();
            let now = Instant::now();
            let ntp = rtcp::ntp_now();
            let sender = state
                .sender
                .as_mut()
                .filter(|s| s.sent_since_report)
                .map(|s| {
                    s.sent_since_report = false;
                    let elapsed = now.duration_since(s.last_sent_at).as_secs_f64();
                    rtcp::SenderInfo {
                        ntp_timestamp: ntp,
                        rtp_timestamp: s
                            .last_rtp_timestamp
                            .wrapping_add((elapsed * f64::from(s.clock_rate)) as u32),
                        packets: s.packets,
                        octets: s.octets,
                    }
                });
            let last_sr = state.last_sr_from_peer;
            let lost_before = state.lost_before;
            let report = state.source.as_mut().map(|source| {
                let (last_sr, delay) = last_sr
                    .map(|(lsr, at)| (lsr, rtcp::to_ntp_short(now.duration_since(at))))
                    .unwrap_or((0, 0));
                rtcp::ReportInfo {
                    ssrc: source.ssrc,
                    fraction_lost: source.take_fraction_lost(),
                    cumulative_lost: lost_before + source.lost(),
                    extended_max_seq: source.extended_max_seq(),
                    jitter: source.jitter_units(),
                    last_sr,
                    delay_since_last_sr: delay,
                }
            });
            rtcp::build_report(state.local_ssrc, &self.cname, sender, report)
        };
        self.send_rtcp(&packet);
    }

    /// Says goodbye once (RTCP BYE), when the sending side ends.
    pub fn send_bye(&self) {
        if self.bye_sent.swap(true, Ordering::SeqCst) {
            return;
        }
        let ssrc = self.state.lock().unwrap().local_ssrc;
        self.send_rtcp(&rtcp::build_bye(ssrc, &self.cname));
    }

    /// Whether the peer said BYE since the session began.
    pub fn bye_received(&self) -> bool {
        self.bye_received.load(Ordering::SeqCst)
    }

    /// Who makes a key frame when the peer asks for one (PLI or FIR): the
    /// sending element, which asks its encoder.
    pub fn set_key_frame_handler(&self, handler: Option<KeyFrameHandler>) {
        *self.key_frame_handler.lock().unwrap() = handler;
    }

    /// Asks the peer for a key frame of the media it sends (PLI and FIR);
    /// false when nothing was received yet to ask about.
    pub fn request_key_frame(&self) -> bool {
        let packet = {
            let mut state = self.state.lock().unwrap();
            let Some(media_ssrc) = state.source.as_ref().map(|s| s.ssrc) else {
                return false;
            };
            state.counters.key_frame_requests_sent += 1;
            let sequence = state.counters.key_frame_requests_sent as u8;
            rtcp::build_key_frame_request(state.local_ssrc, &self.cname, media_ssrc, sequence)
        };
        self.send_rtcp(&packet);
        true
    }

    /// Handles a received RTCP datagram (from the RTCP socket, or muxed).
    pub fn on_rtcp_received(&self, from: SocketAddr, data: &[u8]) {
        let from = canonical(from);
        let mut state = self.state.lock().unwrap();
        // RTCP must come from the peer's host; phones often send it from a port we did not expect.
        if let Some(remote) = state.remote_rtp
            && remote.ip() != from.ip()
        {
            state.counters.packets_wrong_source += 1;
            return;
        }
        let parsed = match rtcp::parse(data, state.local_ssrc) {
            Ok(parsed) => parsed,
            Err(e) => {
                state.counters.rtcp_invalid += 1;
                drop(state);
                warn(&self.name, &format!("dropped RTCP from {from}: {e}"));
                return;
            }
        };
        state.counters.rtcp_received += 1;
        if state.latch && !state.remote_rtcp_explicit && !self.is_rtcp_muxed() {
            state.remote_rtcp = Some(from);
        }
        let now = Instant::now();
        if let Some((_, lsr)) = parsed.sender_report {
            state.last_sr_from_peer = Some((lsr, now));
        }
        if let Some(report) = parsed.report_about_us {
            if let Some(rtt) = rtcp::round_trip_time(&report, rtcp::ntp_now()) {
                state.rtt = Some(rtt);
            }
            state.remote_report = Some(report);
        }
        if parsed.key_frame_requested {
            state.counters.key_frame_requests_received += 1;
        }
        drop(state);
        if !parsed.bye.is_empty() {
            self.bye_received.store(true, Ordering::SeqCst);
        }
        if parsed.key_frame_requested
            && let Some(handler) = self.key_frame_handler.lock().unwrap().as_ref()
        {
            handler();
        }
    }

    pub fn stats(&self) -> SessionStats {
        let state = self.state.lock().unwrap();
        let c = &state.counters;
        let source = state.source.as_ref();
        SessionStats {
            local_address: self.local_rtp.to_string(),
            remote_address: state.remote_rtp.map(|a| a.to_string()).unwrap_or_default(),
            local_ssrc: state.local_ssrc,
            remote_ssrc: source.map_or(0, |s| s.ssrc),
            packets_received: c.packets_received,
            octets_received: c.octets_received,
            packets_lost: state.lost_before + source.map_or(0, ReceiverStats::lost),
            packets_duplicated: c.packets_duplicated,
            packets_reordered: c.packets_reordered,
            packets_late: c.packets_late,
            packets_invalid: c.packets_invalid,
            packets_unknown_pt: c.packets_unknown_pt,
            packets_wrong_source: c.packets_wrong_source,
            jitter: source.map_or(0, ReceiverStats::jitter_units),
            jitter_ms: source.map_or(0.0, ReceiverStats::jitter_ms),
            rtt_ms: state.rtt.map_or(-1.0, |d| d.as_secs_f64() * 1000.0),
            last_packet_age_ms: state
                .last_packet_at
                .map_or(-1, |t| t.elapsed().as_millis() as i64),
            packets_sent: c.packets_sent,
            octets_sent: c.octets_sent,
            packets_not_sent: c.packets_not_sent,
            rtcp_sent: c.rtcp_sent,
            rtcp_received: c.rtcp_received,
            rtcp_invalid: c.rtcp_invalid,
            srtp_rejected: c.srtp_rejected,
            key_frame_requests_received: c.key_frame_requests_received,
            key_frame_requests_sent: c.key_frame_requests_sent,
            remote_fraction_lost: state
                .remote_report
                .map_or(0.0, |r| f64::from(r.fraction_lost) / 256.0),
            remote_cumulative_lost: state.remote_report.map_or(0, |r| r.cumulative_lost),
            remote_jitter: state.remote_report.map_or(0, |r| r.jitter),
        }
    }

    fn start_rtcp_task(self: &Arc<Self>) {
        let receive_socket = self.rtcp_socket.as_ref().and_then(|s| s.try_clone().ok());
        let session = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        crate::RUNTIME.spawn(rtcp_task(session, receive_socket, shutdown));
    }
}

impl Drop for MediaSession {
    fn drop(&mut self) {
        self.send_bye();
        self.shutdown.notify_one();
    }
}

/// Receives RTCP (when not muxed) and sends a report every interval,
/// randomised to 0.5–1.5 × as RFC 3550 §6.3.1 asks.
async fn rtcp_task(session: Weak<MediaSession>, socket: Option<UdpSocket>, shutdown: Arc<Notify>) {
    let socket = socket.and_then(|s| tokio::net::UdpSocket::from_std(s).ok());
    let mut next_report = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        let readable = async {
            match &socket {
                Some(s) => s.readable().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.notified() => return,
            readable = readable => {
                let Some(session) = session.upgrade() else { return };
                // Only a runtime shutting down fails to wait.
                let (Some(socket), Ok(())) = (&socket, readable) else { return };
                // An error (an ICMP report, a spurious wake-up) loses nothing.
                let _ = with_receive_buffer(|buffer| {
                    let (len, from) = socket.try_recv_from(buffer)?;
                    let from = canonical(from);
                    if let Some(plain) = session.unprotect(&buffer[..len], from) {
                        session.on_rtcp_received(from, &plain);
                    }
                    io::Result::Ok(())
                });
            }
            _ = tokio::time::sleep_until(next_report) => {
                let Some(session) = session.upgrade() else { return };
                session.send_report();
                let interval = session.state.lock().unwrap().rtcp_interval;
                let factor = rand::rng().random_range(0.5..1.5);
                next_report = tokio::time::Instant::now() + interval.mul_f64(factor);
            }
        }
    }
}

fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

fn warn(session: &str, message: &str) {
    gst::warning!(crate::CAT, "session {session}: {message}");
}

fn bind_pair(config: &BindConfig) -> Result<(UdpSocket, Option<UdpSocket>), SessionError> {
    let address = config.address;
    if config.port != 0 {
        return bind_at(address, config.port, config.rtcp_mux).map_err(|source| {
            SessionError::Bind {
                address,
                port: config.port,
                source,
            }
        });
    }
    let (min, max) = config.port_range;
    let mut rng = rand::rng();
    for _ in 0..64 {
        // RTP on an even port, RTCP on the odd one above (RFC 3550 §11).
        let port = if min == 0 && max == 0 {
            0
        } else {
            rng.random_range(min.div_ceil(2)..=max.saturating_sub(1) / 2) * 2
        };
        match bind_at(address, port, config.rtcp_mux) {
            Ok(pair) => return Ok(pair),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(source) => {
                return Err(SessionError::Bind {
                    address,
                    port,
                    source,
                });
            }
        }
    }
    Err(SessionError::NoFreePort { address, min, max })
}

fn bind_at(
    address: IpAddr,
    port: u16,
    rtcp_mux: bool,
) -> io::Result<(UdpSocket, Option<UdpSocket>)> {
    let rtp = bind_one(address, port)?;
    if rtcp_mux {
        return Ok((rtp, None));
    }
    let rtp_port = rtp.local_addr()?.port();
    let rtcp_port = rtp_port.checked_add(1).ok_or(io::ErrorKind::AddrInUse)?;
    let rtcp = bind_one(address, rtcp_port)?;
    rtcp.set_nonblocking(true)?;
    Ok((rtp, Some(rtcp)))
}

fn bind_one(address: IpAddr, port: u16) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(SocketAddr::new(address, port)),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if address.is_ipv6() && address.is_unspecified() {
        // "::" also receives IPv4, so one setting serves both families.
        socket.set_only_v6(false)?;
    }
    // Room for bursts of video without drops while the receiving thread is busy.
    let _ = socket.set_recv_buffer_size(1 << 20);
    socket.bind(&SocketAddr::new(address, port).into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Whatever arrives on the port: sorted without panicking, and the
        // session's accounting and RTCP parsing survive it too.
        #[test]
        fn any_datagram_is_handled(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let session = MediaSession::acquire(None, &loopback()).unwrap();
            let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
            match classify(&data) {
                Datagram::Rtp(p) => {
                    session.on_rtp_received(from, p.ssrc(), p.sequence_number(), p.timestamp(), data.len(), 8000);
                }
                Datagram::Rtcp => session.on_rtcp_received(from, &data),
                Datagram::Invalid(_) => session.count_invalid(),
            }
            let _ = session.stats();
        }

        #[test]
        fn any_sequence_keeps_counts_consistent(seqs in proptest::collection::vec(any::<u16>(), 1..300)) {
            let session = MediaSession::acquire(None, &loopback()).unwrap();
            let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
            let mut accepted = 0u64;
            for seq in &seqs {
                if session.on_rtp_received(from, 7, *seq, 0, 172, 8000) == RtpVerdict::Accept {
                    accepted += 1;
                }
            }
            let stats = session.stats();
            prop_assert_eq!(stats.packets_received, accepted);
            prop_assert!(stats.packets_duplicated + accepted <= seqs.len() as u64);
        }
    }

    fn loopback() -> BindConfig {
        BindConfig {
            address: "127.0.0.1".parse().unwrap(),
            port: 0,
            port_range: (20000, 30000),
            rtcp_mux: false,
        }
    }

    #[test]
    fn nothing_goes_to_a_zero_address() {
        let session = MediaSession::acquire(None, &loopback()).unwrap();
        let zero: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        session.set_remote(zero, None);
        assert_eq!(session.remote_rtp(), None);
        let phone: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        session.set_remote(phone, None);
        assert_eq!(session.remote_rtp(), Some(phone));
    }

    #[test]
    fn picks_an_even_port_pair_in_range() {
        let session = MediaSession::acquire(None, &loopback()).unwrap();
        let port = session.local_rtp_addr().port();
        assert_eq!(port % 2, 0);
        assert!((20000..30000).contains(&port));
        // The odd port above is RTCP's and taken.
        assert!(UdpSocket::bind(("127.0.0.1", port + 1)).is_err());
    }

    #[test]
    fn named_sessions_are_shared_until_dropped() {
        let a = MediaSession::acquire(Some("shared-test"), &loopback()).unwrap();
        let b = MediaSession::acquire(Some("shared-test"), &loopback()).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let port = a.local_rtp_addr().port();
        drop((a, b));
        let c = MediaSession::acquire(Some("shared-test"), &loopback()).unwrap();
        assert_ne!(c.local_rtp_addr().port(), 0);
        let _ = port;
    }

    #[test]
    fn latch_rules() {
        let session = MediaSession::acquire(None, &loopback()).unwrap();
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:4002".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:4004".parse().unwrap();
        // An address from SDP that never sent: the first real source wins.
        session.set_remote("127.0.0.1:3000".parse().unwrap(), None);
        assert_eq!(
            session.on_rtp_received(a, 1, 0, 0, 172, 8000),
            RtpVerdict::Accept
        );
        assert_eq!(session.remote_rtp(), Some(a));
        // Same SSRC from a new port (NAT rebinding): follow it.
        assert_eq!(
            session.on_rtp_received(b, 1, 1, 160, 172, 8000),
            RtpVerdict::Accept
        );
        assert_eq!(session.remote_rtp(), Some(b));
        // A stranger with another SSRC while the source is active: refused.
        assert_eq!(
            session.on_rtp_received(c, 99, 5, 0, 172, 8000),
            RtpVerdict::Drop
        );
        assert_eq!(session.stats().packets_wrong_source, 1);

        session.set_latch(false);
        assert_eq!(
            session.on_rtp_received(a, 1, 2, 320, 172, 8000),
            RtpVerdict::Drop
        );
        assert_eq!(session.remote_rtp(), Some(b));
    }
}
