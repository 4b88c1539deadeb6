//! A call's WebRTC leg without a `webrtcbin`: one str0m peer connection
//! (ICE, DTLS-SRTP, RTCP; sans-IO) per call, driven as a task of one pool of
//! worker threads that every call shares. It carries Opus audio, the bulk of
//! bridged calls; a call with video keeps webrtcbin. The call session turns
//! its frames into buffers.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bridge_protocol::dtmf::{self, EventDetector};
use bridge_protocol::turn::{self, Allocation, FromServer, TurnServer, TurnTransport};
use bridge_protocol::{ice, opus_fmtp, tls};
use str0m::change::{SdpAnswer, SdpApi, SdpOffer, SdpPendingOffer};
use str0m::format::{Codec, CodecExtra, FormatParams};
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::Extension;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::UdpSocket;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

use super::KEYPAD_EVENTS;
use super::congestion::loss_percent;
use super::crypto::CRYPTO;
use super::timeline::Timeline;

/// One DTLS certificate for all calls: making a key costs milliseconds of
/// CPU, and the peer checks it only against the fingerprint in our SDP.
static CERTIFICATE: LazyLock<Option<str0m::crypto::dtls::DtlsCert>> =
    LazyLock::new(|| CRYPTO.dtls_provider.generate_certificate());

/// Audio frames waiting for a missing packet before they go on anyway: a
/// bridge adds as little delay as it can, the phone's jitter buffer does
/// the rest.
const REORDER_PACKETS: usize = 2;
const REORDER_WAIT: Duration = Duration::from_millis(20);

/// The id str0m's (and browsers') default map gives the media id.
const MID_EXTENSION: u8 = 4;

/// Rounds of work str0m wants done at once, before other calls get a turn.
const IMMEDIATE_ROUNDS: usize = 8;

/// How long ICE may take once both descriptions are known, and how long a
/// lost connection may take to come back (a phone call survives a short
/// network outage), before the call fails.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);
const RECONNECT_WITHIN: Duration = Duration::from_secs(15);

/// How long the peer's audio may stop before the connection counts as
/// lost (apps send audio all the time, silence too); ICE itself takes
/// about 20 s to give up on a pair.
const AUDIO_STOPPED: Duration = Duration::from_secs(2);

/// When a call asks its STUN server again, and when it stops waiting and
/// offers the candidates it has (a server across the world answers in a
/// few hundred ms).
const STUN_ASK_AT: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_millis(500),
];
const STUN_WAIT: Duration = Duration::from_secs(1);
/// How long a call waits for its TURN server's allocation (a challenge
/// and an answer: two round trips).
const TURN_WAIT: Duration = Duration::from_secs(2);
/// How long a STUN server's resolved address is used without asking DNS
/// again, and a server that answered none of a call's requests is not
/// asked (each call would wait `STUN_WAIT` for it).
const STUN_MEMORY: Duration = Duration::from_secs(30);

/// What calls learned of each STUN server (by host and port).
static STUN_SERVERS: LazyLock<Mutex<HashMap<(String, u16), KnownServer>>> =
    LazyLock::new(Mutex::default);

#[derive(Clone, Copy)]
struct KnownServer {
    address: SocketAddr,
    resolved_at: Instant,
    /// When it last let a call's requests all go unanswered.
    silent_at: Option<Instant>,
}

/// Prepares the pool and the certificate before the first call.
pub fn warm_up() {
    LazyLock::force(&crate::MEDIA_POOL);
    LazyLock::force(&CERTIFICATE);
    LazyLock::force(&CRYPTO);
}

/// How every call's peer connection is configured.
pub fn peer_config() -> Result<RtcConfig, String> {
    let certificate = CERTIFICATE
        .clone()
        .ok_or("no DTLS certificate could be made")?;
    let mut config = RtcConfig::new()
        .set_crypto_provider(CRYPTO.clone())
        .set_dtls_cert(certificate)
        .clear_codecs()
        .enable_opus(true, false)
        // The media id only: no transport-wide congestion control (a
        // voice call's bitrate is the encoder's, and its send register
        // is 90 KB per call), no audio levels.
        .clear_extension_map()
        .set_extension(MID_EXTENSION, Extension::RtpMid)
        .set_reordering_size_audio(REORDER_PACKETS)
        .set_reordering_timeout_audio(Some(REORDER_WAIT))
        .set_stats_interval(Some(Duration::from_secs(1)));
    // The app's keypad (RFC 4733): digits for the phone's voice menus.
    for (pt, rate) in KEYPAD_EVENTS {
        let rate = Frequency::new(rate).ok_or("a keypad event rate of 0")?;
        config.codec_config().add_config(
            Pt::new_with_value(pt),
            None,
            Codec::Tele,
            rate,
            None,
            FormatParams::default(),
        );
    }
    Ok(config)
}

/// One Opus frame received, with its RTP numbering.
pub struct Frame {
    pub payload: Arc<[u8]>,
    pub rtp_time: u32,
    pub sequence: u16,
}

/// What the peer reports, from a thread of the pool.
pub enum PeerEvent {
    Connected,
    Frame(Frame),
    /// ICE or DTLS failed, or the connection was lost.
    Failed(String),
    /// The peer's receiver reports put the audio lost at this percent
    /// (told with each second's statistics).
    RemoteLoss(u32),
    /// A digit the peer sent as an RFC 4733 event, once it ended.
    Dtmf {
        digit: char,
        duration_ms: u32,
    },
    /// The connection, up before, seems lost (the peer's network went
    /// away): its audio stopped coming, or ICE gave up on the pair. Told
    /// once per loss.
    Disconnected,
}

pub type EventSink = Box<dyn Fn(PeerEvent) + Send + Sync>;

/// The connection's figures, as the call's `stats` report them.
#[derive(Debug, Clone, Default)]
pub struct PeerStats {
    pub ice_state: &'static str,
    /// Taken from the peer's flag when read, not kept here.
    pub connected: bool,
    pub packets_sent: u64,
    pub bytes_sent: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
    pub packets_lost: i64,
    pub jitter_ms: f64,
    pub rtt_ms: f64,
    /// The audio bandwidth of the last Opus packet received.
    pub receive_bandwidth: &'static str,
    /// Over the last statistics interval, in bit/s.
    pub send_bitrate: u64,
    pub receive_bitrate: u64,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Command {
    Offer {
        send: bool,
        receive: bool,
        reply: Reply<String>,
    },
    Answer {
        offer: String,
        reply: Reply<String>,
    },
    RemoteAnswer {
        answer: String,
        reply: Reply<()>,
    },
    Candidate(String),
    RestartIce {
        reply: Reply<String>,
    },
    Frame {
        payload: Vec<u8>,
        rtp_time: u32,
        ssrc: u32,
        marker: bool,
    },
}

/// Where a call's candidates come from besides its host addresses.
#[derive(Debug, Clone, Default)]
pub struct IceServers {
    /// `stun://host[:port]`: each socket's address outside a NAT is
    /// asked for and offered too.
    pub stun_server: Option<String>,
    /// `turn://user:password@host[:port][?transport=tcp]` or
    /// `turns://user:password@host[:port]`: an address relayed by it is
    /// offered too.
    pub turn_server: Option<String>,
    /// A PEM file of the certificates a `turns:` server's is checked
    /// against (its CA's, or its own); the public CAs without it.
    pub turn_ca_file: Option<String>,
    /// Only the relayed address is offered (the WebRTC
    /// `iceTransportPolicy` "relay"): nothing of the local network shows.
    pub relay_only: bool,
}

/// The handle of one call's peer connection; dropping it closes the connection.
pub struct SharedPeer {
    commands: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<PeerStats>>,
    connected: Arc<AtomicBool>,
}

impl SharedPeer {
    /// Binds the call's sockets (one per local address) and starts its task,
    /// which gathers from `servers` before it offers or answers.
    pub fn start(
        events: EventSink,
        media_loop: &Handle,
        servers: &IceServers,
    ) -> Result<SharedPeer, String> {
        let stun_server = servers
            .stun_server
            .as_deref()
            .map(ice::stun_host_and_port)
            .transpose()
            .map_err(|e| format!("stun-server {e}"))?;
        let turn_server = servers
            .turn_server
            .as_deref()
            .map(str::parse::<TurnServer>)
            .transpose()
            .map_err(|e| format!("turn-server {e}"))?;
        if servers.relay_only && turn_server.is_none() {
            return Err("a relay-only call needs a turn-server".into());
        }
        // Over TLS, how the server's certificate is checked, and its name.
        let turn_server = match turn_server {
            Some(server) if server.transport == TurnTransport::Tls => {
                let config = turn_tls(servers.turn_ca_file.as_deref())?;
                let name =
                    tls::server_name(&server.host).map_err(|e| format!("turn-server {e}"))?;
                Some((server, Some((config, name))))
            }
            other => other.map(|server| (server, None)),
        };
        let events = Arc::new(events);
        let mut rtc = peer_config()?.build(Instant::now());
        let _guard = media_loop.enter();
        let mut sockets = Vec::new();
        for address in candidate_addresses() {
            let Ok(socket) = std::net::UdpSocket::bind(SocketAddr::new(address, 0)) else {
                continue;
            };
            let (Ok(()), Ok(local)) = (socket.set_nonblocking(true), socket.local_addr()) else {
                continue;
            };
            let Ok(candidate) = Candidate::host(local, "udp") else {
                continue;
            };
            let Ok(socket) = UdpSocket::from_std(socket) else {
                continue;
            };
            if !servers.relay_only {
                rtc.add_local_candidate(candidate);
            }
            sockets.push((local, socket));
        }
        if sockets.is_empty() {
            return Err("no local address to receive WebRTC media on".into());
        }
        let (commands, received) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(PeerStats {
            ice_state: "new",
            rtt_ms: -1.0,
            ..Default::default()
        }));
        let connected = Arc::new(AtomicBool::new(false));
        let task = PeerTask {
            rtc,
            sockets,
            events: events.clone(),
            stats: stats.clone(),
            connected: connected.clone(),
            mid: None,
            opus: None,
            pending_offer: None,
            send_time: Timeline::new(48_000),
            first_sequence: None,
            rates_from: None,
            give_up_at: None,
            // Relay only: no address of the local network, its outside
            // address either.
            stun_server: stun_server.filter(|_| !servers.relay_only),
            turn_server,
            relay: None,
            dtmf: EventDetector::default(),
            audio_at: None,
            loss_told: false,
        };
        let task = media_loop.spawn(task.run(received));
        // A bug in the stack ends this call, not the others, and not silently.
        media_loop.spawn(async move {
            if task.await.is_err_and(|e| e.is_panic()) {
                events(PeerEvent::Failed(
                    "internal error in the WebRTC stack".into(),
                ));
            }
        });
        Ok(SharedPeer {
            commands,
            stats,
            connected,
        })
    }

    pub async fn create_offer(&self, send: bool, receive: bool) -> Result<String, String> {
        self.ask(|reply| Command::Offer {
            send,
            receive,
            reply,
        })
        .await
    }

    pub async fn answer(&self, offer: &str) -> Result<String, String> {
        let offer = offer.to_owned();
        self.ask(|reply| Command::Answer { offer, reply }).await
    }

    pub async fn accept_answer(&self, answer: &str) -> Result<(), String> {
        let answer = answer.to_owned();
        self.ask(|reply| Command::RemoteAnswer { answer, reply })
            .await
    }

    /// An offer with new ICE credentials (the sockets stay): the peer
    /// gathers again, from wherever its network now is. Its answer is
    /// taken by `accept_answer`.
    pub async fn restart_ice(&self) -> Result<String, String> {
        self.ask(|reply| Command::RestartIce { reply }).await
    }

    pub fn add_remote_candidate(&self, candidate: &str) {
        let _ = self.commands.send(Command::Candidate(candidate.to_owned()));
    }

    /// Sends the Opus frame of `packet`, stamped by its source; nothing
    /// goes before the connection is up.
    pub fn send_frame(&self, packet: &rtp_types::RtpPacket) {
        if self.connected.load(Ordering::Relaxed) {
            let _ = self.commands.send(Command::Frame {
                payload: packet.payload().to_vec(),
                rtp_time: packet.timestamp(),
                ssrc: packet.ssrc(),
                marker: packet.marker_bit(),
            });
        }
    }

    pub fn stats(&self) -> PeerStats {
        PeerStats {
            connected: self.connected.load(Ordering::Relaxed),
            ..self.stats.lock().unwrap().clone()
        }
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, String> {
        let (reply, replied) = oneshot::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| "the WebRTC connection is closed".to_owned())?;
        replied
            .await
            .map_err(|_| "the WebRTC connection is closed".to_owned())?
    }
}

/// Host candidates: every address of an interface that is up, loopback
/// only when there is nothing else (browsers pair no loopback candidates).
fn candidate_addresses() -> Vec<IpAddr> {
    let interfaces = if_addrs::get_if_addrs().unwrap_or_default();
    let usable = |address: &IpAddr| match address {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
    };
    let addresses: Vec<IpAddr> = interfaces.iter().map(|i| i.ip()).filter(usable).collect();
    if addresses.is_empty() {
        vec![IpAddr::from([127, 0, 0, 1])]
    } else {
        addresses
    }
}

struct PeerTask {
    rtc: Rtc,
    sockets: Vec<(SocketAddr, UdpSocket)>,
    events: Arc<EventSink>,
    stats: Arc<Mutex<PeerStats>>,
    connected: Arc<AtomicBool>,
    /// The audio media line.
    mid: Option<Mid>,
    /// The payload type the peer takes Opus as.
    opus: Option<Pt>,
    pending_offer: Option<SdpPendingOffer>,
    /// Where what we send goes on str0m's 64-bit media time.
    send_time: Timeline,
    first_sequence: Option<u64>,
    /// When the bitrates were last taken, and the byte counts then.
    rates_from: Option<(Instant, u64, u64)>,
    /// While connecting, or after the connection was lost: when to give up.
    give_up_at: Option<(Instant, &'static str)>,
    /// Asked once, before anything is offered or answered.
    stun_server: Option<(String, u16)>,
    /// With, over TLS, how its certificate is checked and for which name.
    turn_server: Option<(TurnServer, Option<StreamTls>)>,
    /// The call's address on the TURN server, once allocated.
    relay: Option<Relay>,
    dtmf: EventDetector,
    /// The statistics tick by which the peer's audio last came.
    audio_at: Option<Instant>,
    /// The loss of the connection was told, and nothing came since.
    loss_told: bool,
}

/// A relayed address and how its server is reached.
struct Relay {
    allocation: Allocation,
    server: SocketAddr,
    link: ServerLink,
    relayed: SocketAddr,
}

/// How a call reaches its TURN server.
enum ServerLink {
    /// From the call's UDP socket at this address.
    Udp(SocketAddr),
    /// Over a TCP connection: tasks of the call's loop write what goes
    /// into `outgoing`, and frame what arrives into `incoming`.
    Stream {
        outgoing: mpsc::UnboundedSender<Vec<u8>>,
        incoming: mpsc::UnboundedReceiver<Vec<u8>>,
    },
}

impl ServerLink {
    fn send(&self, sockets: &[(SocketAddr, UdpSocket)], server: SocketAddr, message: &[u8]) {
        match self {
            ServerLink::Udp(local) => send_from(sockets, *local, message, server),
            ServerLink::Stream { outgoing, .. } => {
                let _ = outgoing.send(message.to_vec());
            }
        }
    }
}

/// Sends from the call's socket at `local`.
fn send_from(
    sockets: &[(SocketAddr, UdpSocket)],
    local: SocketAddr,
    datagram: &[u8],
    to: SocketAddr,
) {
    if let Some((_, socket)) = sockets.iter().find(|(a, _)| *a == local) {
        // A full socket buffer loses the packet, as the network would.
        let _ = socket.try_send_to(datagram, to);
    }
}

/// A TLS stream's client configuration and the server name it checks.
type StreamTls = (Arc<ClientConfig>, ServerName<'static>);

/// How `turns:` servers' certificates are checked: against `ca_file`'s,
/// or the public CAs.
fn turn_tls(ca_file: Option<&str>) -> Result<Arc<ClientConfig>, String> {
    // The public CAs' configuration is made once, not for every call.
    static PUBLIC_CAS: LazyLock<Result<Arc<ClientConfig>, String>> =
        LazyLock::new(|| tls::client_config(None));
    let Some(path) = ca_file else {
        return PUBLIC_CAS.clone();
    };
    let pem = std::fs::read(path).map_err(|e| format!("turn-ca-file {path:?}: {e}"))?;
    tls::client_config(Some(&pem)).map_err(|e| format!("turn-ca-file: {e}"))
}

/// A TCP connection to the TURN server (RFC 8656 §3.1), in TLS with `tls`
/// (its name checked): a task writes what is sent, another frames what
/// arrives. Its local address comes with it.
async fn connect_stream(
    server: SocketAddr,
    tls: Option<StreamTls>,
) -> Result<(ServerLink, SocketAddr), String> {
    let connect = async {
        let stream = tokio::net::TcpStream::connect(server)
            .await
            .map_err(|e| format!("no TCP connection: {e}"))?;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        let link = match tls {
            None => stream_link(stream, server),
            Some((config, name)) => {
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                stream_link(stream, server)
            }
        };
        Ok((link, local))
    };
    tokio::time::timeout(TURN_WAIT, connect)
        .await
        .map_err(|_| format!("not connected within {TURN_WAIT:?}"))?
}

/// The tasks that carry a stream's messages both ways.
fn stream_link<S>(stream: S, server: SocketAddr) -> ServerLink
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut reading, mut writing) = tokio::io::split(stream);
    let (outgoing, mut to_write) = mpsc::unbounded_channel::<Vec<u8>>();
    let (arrived, incoming) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = to_write.recv().await {
            // TLS holds what is written until flushed.
            if writing.write_all(&message).await.is_err() || writing.flush().await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match reading.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(length) => received.extend_from_slice(&chunk[..length]),
            }
            loop {
                match turn::stream_message_length(&received) {
                    Ok(Some(length)) if received.len() >= length => {
                        if arrived.send(received.drain(..length).collect()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => break,
                    Err(why) => {
                        gst::warning!(crate::CAT, "TURN server {server}: {why}");
                        return;
                    }
                }
            }
        }
    });
    ServerLink::Stream { outgoing, incoming }
}

/// The next message from a TURN server reached over a stream (`None`: the
/// connection closed); never, for one reached over UDP.
async fn from_stream(relay: &mut Option<Relay>) -> Option<Vec<u8>> {
    match relay {
        Some(Relay {
            link: ServerLink::Stream { incoming, .. },
            ..
        }) => incoming.recv().await,
        _ => std::future::pending().await,
    }
}

impl PeerTask {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut buffer = vec![0u8; 2048];
        self.gather(&mut buffer).await;
        loop {
            self.refresh_relay();
            let deadline = match self.drive_until_waiting() {
                Ok(deadline) => deadline,
                Err(reason) => {
                    self.fail(reason);
                    return;
                }
            };
            if let Some((at, reason)) = self.give_up_at
                && at <= Instant::now()
            {
                self.fail(reason.into());
                return;
            }
            let deadline = self.give_up_at.map_or(deadline, |(at, _)| deadline.min(at));
            let deadline = match self.relay.as_ref().and_then(|r| r.allocation.refresh_at()) {
                Some(at) => deadline.min(at),
                None => deadline,
            };
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    // The call is over.
                    None => {
                        self.rtc.disconnect();
                        self.release_relay();
                        return;
                    }
                },
                (local, length, source) = receive(&self.sockets, &mut buffer) => {
                    let from_server = self.relay.as_ref().is_some_and(|relay| {
                        matches!(relay.link, ServerLink::Udp(at) if at == local)
                            && relay.server == source
                    });
                    if from_server {
                        self.on_server_message(&buffer[..length]);
                    } else {
                        self.input(source, local, &buffer[..length]);
                    }
                }
                message = from_stream(&mut self.relay) => match message {
                    Some(message) => self.on_server_message(&message),
                    None => {
                        gst::warning!(crate::CAT, "the TURN server closed the connection: no relayed address");
                        self.relay = None;
                    }
                },
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
                }
            }
        }
    }

    /// Asks the STUN server and allocates on the TURN server at the same
    /// time, before anything is offered or answered: a call waits for the
    /// slower of the two, not for one after the other. What the call's
    /// sockets receive meanwhile goes to the one it answers: Binding
    /// responses to the STUN exchange, the rest to the TURN one.
    async fn gather(&mut self, buffer: &mut [u8]) {
        let (stun, turn) = (self.stun_server.take(), self.turn_server.take());
        if stun.is_none() && turn.is_none() {
            return;
        }
        let (to_stun, stun_datagrams) = mpsc::unbounded_channel();
        let (to_turn, turn_datagrams) = mpsc::unbounded_channel();
        let sockets = &self.sockets;
        let reflexive = async move {
            match stun {
                Some((host, port)) => ask_stun(sockets, &host, port, stun_datagrams).await,
                None => Vec::new(),
            }
        };
        let relayed = async move {
            match turn {
                Some((server, tls)) => allocate_relay(sockets, &server, tls, turn_datagrams).await,
                None => None,
            }
        };
        let route = async {
            // Until both exchanges are over (each drops its receiver).
            let over = async { tokio::join!(to_stun.closed(), to_turn.closed()) };
            tokio::pin!(over);
            loop {
                tokio::select! {
                    _ = &mut over => return,
                    (local, length, source) = receive(sockets, buffer) => {
                        let datagram = (local, source, buffer[..length].to_vec());
                        let to = if ice::is_binding_response(&datagram.2) { &to_stun } else { &to_turn };
                        let _ = to.send(datagram);
                    }
                }
            }
        };
        let (reflexive, relayed, ()) = tokio::join!(reflexive, relayed, route);
        for candidate in reflexive {
            self.rtc.add_local_candidate(candidate);
        }
        if let Some((relay, candidate)) = relayed {
            self.rtc.add_local_candidate(candidate);
            self.relay = Some(relay);
        }
    }

    fn to_server(&self, message: &[u8]) {
        if let Some(relay) = &self.relay {
            relay.link.send(&self.sockets, relay.server, message);
        }
    }

    /// A datagram for str0m; whatever is not ours (or does not parse) is
    /// dropped.
    fn input(&mut self, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        let Ok(contents) = datagram.try_into() else {
            return;
        };
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source,
                destination,
                contents,
            },
        );
        if self.rtc.accepts(&input) {
            let _ = self.rtc.handle_input(input);
        }
    }

    /// A message from the TURN server: a peer's datagram goes on to str0m
    /// as received at the relayed address.
    fn on_server_message(&mut self, message: &[u8]) {
        let Some(relay) = self.relay.as_mut() else {
            return;
        };
        match relay.allocation.receive(message, Instant::now()) {
            FromServer::Data { peer, at } => {
                let relayed = relay.relayed;
                self.input(peer, relayed, &message[at]);
            }
            FromServer::Retry(again) => self.to_server(&again),
            _ => {}
        }
    }

    /// The allocation's refresh, when due.
    fn refresh_relay(&mut self) {
        let refresh = self
            .relay
            .as_mut()
            .and_then(|relay| relay.allocation.refresh(Instant::now()));
        if let Some(refresh) = refresh {
            self.to_server(&refresh);
        }
    }

    /// Frees the relayed address on the server as the call ends.
    fn release_relay(&mut self) {
        let release = self
            .relay
            .as_mut()
            .and_then(|relay| relay.allocation.release());
        if let Some(release) = release {
            self.to_server(&release);
        }
    }

    /// Drives str0m until it waits for something in the future: work it
    /// asks for at once (packetizing a frame just written, say) is done
    /// here, not after a round through the timer.
    fn drive_until_waiting(&mut self) -> Result<Instant, String> {
        for _ in 0..IMMEDIATE_ROUNDS {
            let deadline = self.drive()?;
            let now = Instant::now();
            if deadline > now {
                return Ok(deadline);
            }
            self.rtc
                .handle_input(Input::Timeout(now))
                .map_err(|e| e.to_string())?;
        }
        // Still due: the timer takes it, after the other calls' turn.
        self.drive()
    }

    /// Sends what str0m has to send and hands on its events, up to its next timeout.
    fn drive(&mut self) -> Result<Instant, String> {
        loop {
            if !self.rtc.is_alive() {
                return Err("the WebRTC connection closed".into());
            }
            match self.rtc.poll_output().map_err(|e| e.to_string())? {
                Output::Timeout(deadline) => return Ok(deadline),
                Output::Transmit(transmit) => match self.relay.as_mut() {
                    // From the relayed address: through the TURN server.
                    Some(relay) if transmit.source == relay.relayed => {
                        let messages = relay.allocation.send(
                            transmit.destination,
                            &transmit.contents,
                            Instant::now(),
                        );
                        for message in messages {
                            self.to_server(&message);
                        }
                    }
                    _ => send_from(
                        &self.sockets,
                        transmit.source,
                        &transmit.contents,
                        transmit.destination,
                    ),
                },
                Output::Event(event) => self.on_event(event)?,
            }
        }
    }

    fn on_event(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::Connected => {
                self.connected.store(true, Ordering::Relaxed);
                (self.events)(PeerEvent::Connected);
            }
            Event::IceConnectionStateChange(state) => {
                self.stats.lock().unwrap().ice_state = ice_state_name(state);
                match state {
                    IceConnectionState::Disconnected => {
                        let lost = (
                            Instant::now() + RECONNECT_WITHIN,
                            "the ICE connection was lost",
                        );
                        self.give_up_at.get_or_insert(lost);
                        self.connection_lost();
                    }
                    IceConnectionState::Connected | IceConnectionState::Completed => {
                        self.give_up_at = None;
                    }
                    _ => {}
                }
            }
            Event::MediaAdded(added) if added.kind == MediaKind::Audio => {
                self.mid.get_or_insert(added.mid);
            }
            Event::MediaData(data) if matches!(data.codec_extra, CodecExtra::Tele(_)) => {
                let ended = self.dtmf.push(data.time.numer() as u32, &data.data);
                if let Some((digit, duration)) = ended {
                    let clock_rate = data.time.denom().max(1);
                    let duration_ms = u32::from(duration) * 1000 / clock_rate;
                    (self.events)(PeerEvent::Dtmf { digit, duration_ms });
                }
            }
            Event::MediaData(data) => {
                let sequence = *data.seq_range.end();
                let first = *self.first_sequence.get_or_insert(**data.seq_range.start());
                {
                    let mut stats = self.stats.lock().unwrap();
                    stats.packets_received += 1;
                    if let Some(bandwidth) = opus_fmtp::packet_bandwidth(&data.data) {
                        stats.receive_bandwidth = bandwidth;
                    }
                    stats.bytes_received += data.data.len() as u64;
                    let expected = (*sequence).saturating_sub(first) + 1;
                    stats.packets_lost = expected as i64 - stats.packets_received as i64;
                }
                (self.events)(PeerEvent::Frame(Frame {
                    payload: data.data,
                    rtp_time: data.time.numer() as u32,
                    sequence: *sequence as u16,
                }));
            }
            Event::MediaEgressStats(egress) => {
                if let Some(loss) = egress.loss {
                    let percent = loss_percent(loss.into());
                    (self.events)(PeerEvent::RemoteLoss(percent));
                }
            }
            Event::MediaIngressStats(ingress) => {
                let mut stats = self.stats.lock().unwrap();
                stats.jitter_ms = f64::from(ingress.jitter) / 48.0;
            }
            Event::PeerStats(peer) => {
                let now = Instant::now();
                let audio_came = {
                    let mut stats = self.stats.lock().unwrap();
                    if let Some(rtt) = peer.rtt {
                        stats.rtt_ms = rtt.as_secs_f64() * 1000.0;
                    }
                    let mut received_before = 0;
                    if let Some((then, sent, received)) = self.rates_from {
                        let seconds = (now - then).as_secs_f64().max(0.001);
                        let rate = |bytes: u64| (bytes as f64 * 8.0 / seconds).round() as u64;
                        stats.send_bitrate = rate(stats.bytes_sent.saturating_sub(sent));
                        stats.receive_bitrate = rate(stats.bytes_received.saturating_sub(received));
                        received_before = received;
                    }
                    self.rates_from = Some((now, stats.bytes_sent, stats.bytes_received));
                    stats.bytes_received > received_before
                };
                // Once a second: has the peer's audio stopped?
                if audio_came {
                    self.audio_at = Some(now);
                    self.loss_told = false;
                } else if self.audio_at.is_some_and(|at| now - at >= AUDIO_STOPPED) {
                    self.connection_lost();
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Offer {
                send,
                receive,
                reply,
            } => {
                let direction = match (send, receive) {
                    (true, true) => Direction::SendRecv,
                    (true, false) => Direction::SendOnly,
                    (false, true) => Direction::RecvOnly,
                    (false, false) => Direction::Inactive,
                };
                let mut changes = self.rtc.sdp_api();
                let mid = changes.add_media(MediaKind::Audio, direction, None, None, None);
                let offer = offer(changes, &mut self.pending_offer);
                if offer.is_ok() {
                    self.mid = Some(mid);
                }
                let _ = reply.send(offer);
            }
            Command::Answer { offer, reply } => {
                self.connect_in_time();
                let answer = SdpOffer::from_sdp_string(&offer)
                    .map_err(|e| format!("the peer's offer does not parse: {e}"))
                    .and_then(|offer| {
                        self.rtc
                            .sdp_api()
                            .accept_offer(offer)
                            .map_err(|e| format!("the peer's offer is unusable: {e}"))
                    })
                    .map(|answer| with_formats_in_rejected_lines(&answer.to_sdp_string(), &offer));
                let _ = reply.send(answer);
            }
            Command::RemoteAnswer { answer, reply } => {
                self.connect_in_time();
                let accepted = match self.pending_offer.take() {
                    None => Err("an answer came with no offer of ours".to_owned()),
                    Some(pending) => SdpAnswer::from_sdp_string(&answer)
                        .map_err(|e| format!("the peer's answer does not parse: {e}"))
                        .and_then(|answer| {
                            self.rtc
                                .sdp_api()
                                .accept_answer(pending, answer)
                                .map_err(|e| format!("the peer's answer is unusable: {e}"))
                        }),
                };
                let _ = reply.send(accepted);
            }
            Command::Candidate(candidate) => {
                let line = candidate.trim().trim_start_matches("a=");
                match Candidate::from_sdp_string(line) {
                    Ok(candidate) => self.rtc.add_remote_candidate(candidate),
                    // mDNS names and TCP candidates, say: the others may do.
                    Err(e) => gst::debug!(crate::CAT, "candidate {candidate} skipped: {e}"),
                }
            }
            Command::RestartIce { reply } => {
                let mut changes = self.rtc.sdp_api();
                changes.ice_restart(true);
                let _ = reply.send(offer(changes, &mut self.pending_offer));
            }
            Command::Frame {
                payload,
                rtp_time,
                ssrc,
                marker,
            } => {
                let time = self.send_time.place(ssrc, rtp_time, marker, Instant::now());
                self.send_frame(payload, time);
            }
        }
    }

    /// Tells of a lost connection, once until the peer's audio comes again.
    fn connection_lost(&mut self) {
        if self.connected.load(Ordering::Relaxed) && !self.loss_told {
            self.loss_told = true;
            (self.events)(PeerEvent::Disconnected);
        }
    }

    /// Both descriptions are known: ICE has its time from now on.
    fn connect_in_time(&mut self) {
        if !self.connected.load(Ordering::Relaxed) {
            let deadline = Instant::now() + CONNECT_WITHIN;
            self.give_up_at = Some((deadline, "no ICE connection could be made"));
        }
    }

    /// Writes a frame at `time` on the 48 kHz media time.
    fn send_frame(&mut self, payload: Vec<u8>, time: u64) {
        let Some(mid) = self.mid else { return };
        let time = MediaTime::new(time, Frequency::FORTY_EIGHT_KHZ);
        let Some(writer) = self.rtc.writer(mid) else {
            return;
        };
        let pt = *self.opus.get_or_insert_with(|| {
            writer
                .payload_params()
                .find(|p| p.spec().codec == Codec::Opus)
                .map(|p| p.pt())
                .unwrap_or(Pt::from(111))
        });
        let length = payload.len() as u64;
        if writer.write(pt, Instant::now(), time, payload).is_ok() {
            let mut stats = self.stats.lock().unwrap();
            stats.packets_sent += 1;
            stats.bytes_sent += length;
        }
    }

    fn fail(&mut self, reason: String) {
        self.connected.store(false, Ordering::Relaxed);
        self.stats.lock().unwrap().ice_state = "failed";
        (self.events)(PeerEvent::Failed(reason));
    }
}

/// The offer `changes` make; their answer is taken later, with `pending`.
/// str0m's offers carry only the keypad events at Opus's clock, which
/// Firefox does not send: the others are added to its text, and str0m
/// takes them from the answer (they are in its configuration).
fn offer(changes: SdpApi<'_>, pending: &mut Option<SdpPendingOffer>) -> Result<String, String> {
    let (offer, pending_offer) = changes.apply().ok_or("nothing to offer")?;
    *pending = Some(pending_offer);
    Ok(dtmf::with_events(&offer.to_sdp_string(), &KEYPAD_EVENTS))
}

/// A media line the answer rejects (port 0, a video line here) must still
/// list a format (RFC 3264 §6), or browsers refuse the whole answer: the
/// first one the offer gave for it.
fn with_formats_in_rejected_lines(answer: &str, offer: &str) -> String {
    let offered: Vec<&str> = offer
        .lines()
        .filter_map(|line| line.strip_prefix("m="))
        .map(|media| media.split_whitespace().nth(3).unwrap_or("0"))
        .collect();
    let mut index = 0;
    let mut out = String::with_capacity(answer.len() + 16);
    for line in answer.split_inclusive('\n') {
        let text = line.trim_end_matches(['\r', '\n']);
        if let Some(media) = text.strip_prefix("m=") {
            let fields: Vec<&str> = media.split_whitespace().collect();
            if fields.len() == 3 && fields[1] == "0" {
                let format = offered.get(index).copied().unwrap_or("0");
                out.push_str(&format!("m={} {format}", fields.join(" ")));
                out.push_str(&line[text.len()..]);
                index += 1;
                continue;
            }
            index += 1;
        }
        out.push_str(line);
    }
    out
}

/// A datagram a call's socket received while gathering: the local address
/// it came to, where it came from, and its bytes.
type Gathered = (SocketAddr, SocketAddr, Vec<u8>);

/// Asks the STUN server where each socket is seen from (RFC 8489
/// Binding): the server-reflexive candidates of the addresses that differ
/// from the socket's own. Without an answer in time the call goes on with
/// what it has.
async fn ask_stun(
    sockets: &[(SocketAddr, UdpSocket)],
    host: &str,
    port: u16,
    mut answers: mpsc::UnboundedReceiver<Gathered>,
) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    let key = (host.to_owned(), port);
    let known = STUN_SERVERS.lock().unwrap().get(&key).copied();
    if let Some(silent_at) = known
        .and_then(|known| known.silent_at)
        .filter(|at| at.elapsed() < STUN_MEMORY)
    {
        gst::debug!(
            crate::CAT,
            "STUN server {host}:{port} did not answer {:?} ago: host candidates only",
            silent_at.elapsed()
        );
        return candidates;
    }
    let resolved = known.filter(|known| known.resolved_at.elapsed() < STUN_MEMORY);
    let (server, resolved_at) = match resolved {
        Some(known) => (Some(known.address), known.resolved_at),
        None => match tokio::net::lookup_host((host, port)).await {
            Ok(mut addresses) => (addresses.next(), Instant::now()),
            Err(_) => (None, Instant::now()),
        },
    };
    let Some(server) = server else {
        gst::warning!(
            crate::CAT,
            "STUN server {host}:{port} not found: host candidates only"
        );
        return candidates;
    };
    let mut asking: Vec<(SocketAddr, [u8; 12])> = sockets
        .iter()
        .filter(|(local, _)| local.is_ipv4() == server.is_ipv4())
        .map(|(local, _)| (*local, rand::random()))
        .collect();
    let asked = asking.len();
    let started = tokio::time::Instant::now();
    let mut next_ask = STUN_ASK_AT.iter();
    let mut ask_at = next_ask.next().map(|after| started + *after);
    while !asking.is_empty() {
        if let Some(at) = ask_at.filter(|at| *at <= tokio::time::Instant::now()) {
            for (local, transaction) in &asking {
                let request = ice::binding_request(*transaction);
                send_from(sockets, *local, &request, server);
            }
            ask_at = next_ask.next().map(|after| at.max(started + *after));
            continue;
        }
        let until = ask_at.unwrap_or(started + STUN_WAIT);
        let (local, source, datagram) = match tokio::time::timeout_at(until, answers.recv()).await {
            Ok(Some(answer)) => answer,
            Ok(None) => break,
            Err(_) if ask_at.is_none() => break,
            Err(_) => continue,
        };
        let answer = asking
            .iter()
            .enumerate()
            .find_map(|(index, (l, transaction))| {
                let mapped = ice::mapped_address(&datagram, *transaction);
                (*l == local && source == server).then_some((index, mapped?))
            });
        let Some((index, mapped)) = answer else {
            continue;
        };
        asking.swap_remove(index);
        if mapped != local
            && let Ok(candidate) = Candidate::server_reflexive(mapped, local, "udp")
        {
            gst::debug!(crate::CAT, "{local} is {mapped} outside");
            candidates.push(candidate);
        }
    }
    if !asking.is_empty() {
        gst::warning!(
            crate::CAT,
            "no answer from STUN server {server} within {STUN_WAIT:?}: \
             {} of the call's addresses offered as they are",
            asking.len()
        );
    }
    // Not one answer: the next calls within `STUN_MEMORY` do not wait for it.
    let silent_at = (asked > 0 && asking.len() == asked).then(Instant::now);
    let known = KnownServer {
        address: server,
        resolved_at,
        silent_at,
    };
    STUN_SERVERS.lock().unwrap().insert(key, known);
    candidates
}

/// Allocates an address on the TURN server (RFC 8656, long-term
/// credentials), over UDP from the first socket of the server's family or
/// over TCP: the relay and its candidate. Without an answer in time, or
/// refused, the call goes on with what it has.
async fn allocate_relay(
    sockets: &[(SocketAddr, UdpSocket)],
    server: &TurnServer,
    tls: Option<StreamTls>,
    datagrams: mpsc::UnboundedReceiver<Gathered>,
) -> Option<(Relay, Candidate)> {
    let address = match tokio::net::lookup_host((server.host.as_str(), server.port)).await {
        Ok(mut addresses) => addresses.next(),
        Err(_) => None,
    };
    let Some(address) = address else {
        gst::warning!(
            crate::CAT,
            "TURN server {server:?} not found: no relayed address"
        );
        return None;
    };
    let connected = match server.transport {
        TurnTransport::Udp => sockets
            .iter()
            .map(|(local, _)| *local)
            .find(|local| local.is_ipv4() == address.is_ipv4())
            .map(|local| (ServerLink::Udp(local), local))
            .ok_or_else(|| "no local address of its family".to_owned()),
        TurnTransport::Tcp | TurnTransport::Tls => connect_stream(address, tls).await,
    };
    let outcome = match connected {
        Ok((mut link, local)) => allocate(sockets, server, address, &mut link, datagrams)
            .await
            .and_then(|(allocation, relayed)| {
                let candidate =
                    Candidate::relayed(relayed, local, "udp").map_err(|e| e.to_string())?;
                Ok((allocation, relayed, link, local, candidate))
            }),
        Err(why) => Err(why),
    };
    match outcome {
        Ok((allocation, relayed, link, local, candidate)) => {
            gst::debug!(crate::CAT, "{local} relayed at {relayed} by {address}");
            let relay = Relay {
                allocation,
                server: address,
                link,
                relayed,
            };
            Some((relay, candidate))
        }
        Err(why) => {
            gst::warning!(
                crate::CAT,
                "TURN server {server:?} at {address}: {why}; no relayed address"
            );
            None
        }
    }
}

/// The Allocate exchange on `link` (over UDP, its answers among
/// `datagrams`): the relayed address, or why not.
async fn allocate(
    sockets: &[(SocketAddr, UdpSocket)],
    server: &TurnServer,
    address: SocketAddr,
    link: &mut ServerLink,
    mut datagrams: mpsc::UnboundedReceiver<Gathered>,
) -> Result<(Allocation, SocketAddr), String> {
    let mut allocation = Allocation::new(server);
    let started = tokio::time::Instant::now();
    // A stream delivers the request: asked once.
    let schedule = match link {
        ServerLink::Udp(_) => &STUN_ASK_AT[..],
        ServerLink::Stream { .. } => &STUN_ASK_AT[..1],
    };
    let mut next_ask = schedule.iter();
    let mut request = allocation.allocate();
    let mut ask_at = next_ask.next().map(|after| started + *after);
    loop {
        if let Some(at) = ask_at.filter(|at| *at <= tokio::time::Instant::now()) {
            link.send(sockets, address, &request);
            ask_at = next_ask.next().map(|after| at.max(started + *after));
            continue;
        }
        let until = ask_at.unwrap_or(started + TURN_WAIT);
        let message = match link {
            ServerLink::Udp(local) => {
                match tokio::time::timeout_at(until, datagrams.recv()).await {
                    Ok(Some((at, source, datagram))) if (at, source) == (*local, address) => {
                        Some(datagram)
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err("no more datagrams".into()),
                    Err(_) => None,
                }
            }
            ServerLink::Stream { incoming, .. } => {
                match tokio::time::timeout_at(until, incoming.recv()).await {
                    Ok(Some(message)) => Some(message),
                    Ok(None) => return Err("the server closed the connection".into()),
                    Err(_) => None,
                }
            }
        };
        let Some(message) = message else {
            if ask_at.is_none() {
                return Err(format!("no answer within {TURN_WAIT:?}"));
            }
            continue;
        };
        match allocation.receive(&message, Instant::now()) {
            FromServer::Allocated(relayed) => return Ok((allocation, relayed)),
            FromServer::Refused(why) => return Err(why),
            FromServer::Retry(again) => {
                link.send(sockets, address, &again);
                request = again;
            }
            _ => {}
        }
    }
}

fn ice_state_name(state: IceConnectionState) -> &'static str {
    match state {
        IceConnectionState::New => "new",
        IceConnectionState::Checking => "checking",
        IceConnectionState::Connected => "connected",
        IceConnectionState::Completed => "completed",
        IceConnectionState::Disconnected => "disconnected",
    }
}

/// The next datagram on any of the call's sockets: (local address, length, source).
async fn receive(
    sockets: &[(SocketAddr, UdpSocket)],
    buffer: &mut [u8],
) -> (SocketAddr, usize, SocketAddr) {
    poll_fn(|cx| {
        for (local, socket) in sockets {
            // An ICMP error reported on a UDP socket is not a datagram: read on.
            loop {
                let mut read = ReadBuf::new(buffer);
                match socket.poll_recv_from(cx, &mut read) {
                    Poll::Ready(Ok(source)) => {
                        return Poll::Ready((*local, read.filled().len(), source));
                    }
                    Poll::Ready(Err(_)) => continue,
                    Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod answer_tests {
    use super::*;

    /// A browser's offer of audio and video (as the SDK makes for a video call).
    const AUDIO_VIDEO_OFFER: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0 1\r\n\
a=msid-semantic: WMS\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=ice-options:trickle\r\n\
a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=sendrecv\r\n\
a=msid:- audio0\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=fmtp:111 minptime=10;useinbandfec=1\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=ssrc:1111 cname:abc\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=ice-options:trickle\r\n\
a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
a=setup:actpass\r\n\
a=mid:1\r\n\
a=sendrecv\r\n\
a=msid:- video0\r\n\
a=rtcp-mux\r\n\
a=rtpmap:96 VP8/90000\r\n\
a=ssrc:2222 cname:abc\r\n";

    #[test]
    fn an_offer_with_video_is_answered_for_its_audio() {
        let peer = SharedPeer::start(
            Box::new(|_| {}),
            crate::MEDIA_POOL.any(),
            &IceServers::default(),
        )
        .unwrap();
        let answer = crate::MEDIA_POOL
            .any()
            .block_on(peer.answer(AUDIO_VIDEO_OFFER));
        let answer = answer.expect("an answer");
        assert!(answer.contains("a=rtpmap:111 opus/48000/2"), "{answer}");
        assert!(
            answer.contains("\r\nm=video 0 UDP/TLS/RTP/SAVPF 96\r\n"),
            "{answer}"
        );
    }

    /// A STUN server that never answers holds the call up for a moment,
    /// not for good: the answer comes, with the host candidates it has;
    /// and the calls after it do not wait for that server.
    #[test]
    fn a_silent_stun_server_leaves_the_host_candidates() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = format!("stun://{}", silent.local_addr().unwrap());
        let answer_a_call = || {
            let servers = IceServers {
                stun_server: Some(server.clone()),
                ..Default::default()
            };
            let peer =
                SharedPeer::start(Box::new(|_| {}), crate::MEDIA_POOL.any(), &servers).unwrap();
            crate::MEDIA_POOL
                .any()
                .block_on(peer.answer(AUDIO_VIDEO_OFFER))
                .expect("an answer")
        };
        let answer = answer_a_call();
        let mut buffer = [0u8; 64];
        silent.set_nonblocking(true).unwrap();
        let (length, _) = silent.recv_from(&mut buffer).expect("a Binding request");
        assert_eq!(buffer[..2], [0, 1], "a Binding request");
        assert_eq!(length, 20);
        assert!(answer.contains("typ host"), "{answer}");
        assert!(!answer.contains("typ srflx"), "{answer}");

        // The next call does not ask (nor wait for) the server that just
        // answered nothing.
        while silent.recv_from(&mut buffer).is_ok() {}
        let answer = answer_a_call();
        assert!(answer.contains("typ host"), "{answer}");
        assert!(
            silent.recv_from(&mut buffer).is_err(),
            "the silent server was asked again"
        );
    }

    #[test]
    fn garbage_offers_and_candidates_get_errors() {
        let peer = SharedPeer::start(
            Box::new(|_| {}),
            crate::MEDIA_POOL.any(),
            &IceServers::default(),
        )
        .unwrap();
        for offer in [
            "",
            "v=0\r\nm=audio",
            "\u{0}\u{1}garbage",
            AUDIO_VIDEO_OFFER.split_at(200).0,
        ] {
            assert!(
                crate::MEDIA_POOL
                    .any()
                    .block_on(peer.answer(offer))
                    .is_err(),
                "{offer:?}"
            );
        }
        peer.add_remote_candidate("candidate:not a candidate");
        let answer = crate::MEDIA_POOL
            .any()
            .block_on(peer.answer(AUDIO_VIDEO_OFFER));
        assert!(answer.is_ok(), "the peer still works: {answer:?}");
    }
}

#[cfg(test)]
mod relay_tests {
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc as std_mpsc;

    use super::*;

    /// coturn (Debian's `coturn`) on loopback, with one user.
    struct Coturn {
        child: Child,
        port: u16,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap()
            .port()
    }

    impl Coturn {
        fn start() -> Coturn {
            Self::launch(&["--no-tls"])
        }

        /// Also over TLS, at the port returned, with this certificate.
        fn start_with_tls(certificate: &std::path::Path, key: &std::path::Path) -> (Coturn, u16) {
            let tls_port = free_port();
            let coturn = Self::launch(&[
                "--tls-listening-port",
                &tls_port.to_string(),
                "--cert",
                certificate.to_str().unwrap(),
                "--pkey",
                key.to_str().unwrap(),
            ]);
            // Ready for TLS once it accepts connections there.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
                assert!(Instant::now() < deadline, "coturn did not listen for TLS");
                std::thread::sleep(Duration::from_millis(50));
            }
            (coturn, tls_port)
        }

        fn launch(options: &[&str]) -> Coturn {
            let port = free_port();
            let child = Command::new("turnserver")
                .args(["-n", "--no-cli", "--no-dtls", "--simple-log"])
                .args(options)
                .args(["--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1"])
                .args(["--listening-port", &port.to_string()])
                // The peers are on loopback too, which coturn refuses by default.
                .arg("--allow-loopback-peers")
                .args(["--lt-cred-mech", "--realm", "example.org"])
                .args(["--user", "alice:s3cret"])
                .args(["--log-file", "stdout"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("turnserver (Debian coturn) is installed");
            let coturn = Coturn { child, port };
            // Ready once it answers a Binding request.
            let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            probe
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut buffer = [0u8; 512];
            loop {
                assert!(Instant::now() < deadline, "coturn did not start");
                let _ = probe.send_to(&ice::binding_request([1; 12]), ("127.0.0.1", port));
                if probe.recv_from(&mut buffer).is_ok() {
                    return coturn;
                }
            }
        }
    }

    impl Drop for Coturn {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn peer(servers: &IceServers) -> (SharedPeer, std_mpsc::Receiver<PeerEvent>) {
        let (told, events) = std_mpsc::channel();
        let sink: EventSink = Box::new(move |event| {
            let _ = told.send(event);
        });
        let peer = SharedPeer::start(sink, crate::MEDIA_POOL.any(), servers).unwrap();
        (peer, events)
    }

    fn opus_packet(sequence: u16) -> Vec<u8> {
        let mut packet = vec![0x80, 111];
        packet.extend_from_slice(&sequence.to_be_bytes());
        packet.extend_from_slice(&(u32::from(sequence) * 960).to_be_bytes());
        packet.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        // An Opus CELT frame's TOC and a few bytes.
        packet.extend_from_slice(&[0xfc, 0xff, 0xfe, 1, 2, 3, 4]);
        packet
    }

    /// A call whose only candidate is its address on a TURN server (a
    /// bridge that may reach nothing else) connects, and its audio arrives
    /// through the relay.
    #[test]
    fn a_relay_only_call_connects_through_its_turn_server() {
        relay_only_call("");
    }

    /// The same with the server reached over TCP (a firewall that passes
    /// no UDP).
    #[test]
    fn a_relay_only_call_connects_through_its_turn_server_over_tcp() {
        relay_only_call("?transport=tcp");
    }

    fn relay_only_call(transport: &str) {
        let coturn = Coturn::start();
        let relayed = IceServers {
            turn_server: Some(format!(
                "turn://alice:s3cret@127.0.0.1:{}{transport}",
                coturn.port
            )),
            relay_only: true,
            ..Default::default()
        };
        relay_only_call_through(&relayed);
    }

    /// And over TLS (a firewall that passes nothing else), the server's
    /// self-signed certificate trusted as it is; with it not trusted, no
    /// relayed address.
    #[test]
    fn a_relay_only_call_connects_through_its_turn_server_over_tls() {
        let directory = tempfile::tempdir().unwrap();
        let (certificate, key) = (
            directory.path().join("cert.pem"),
            directory.path().join("key.pem"),
        );
        let made = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&certificate)
            .stderr(Stdio::null())
            .status()
            .expect("openssl makes a certificate");
        assert!(made.success());
        let (_coturn, tls_port) = Coturn::start_with_tls(&certificate, &key);
        let server = format!("turns://alice:s3cret@127.0.0.1:{tls_port}");
        relay_only_call_through(&IceServers {
            turn_server: Some(server.clone()),
            turn_ca_file: Some(certificate.to_str().unwrap().to_owned()),
            relay_only: true,
            ..Default::default()
        });

        // Checked against the public CAs, the certificate is refused.
        let (offer, _) = offer_with(&IceServers {
            turn_server: Some(server),
            ..Default::default()
        });
        assert!(offer.contains("typ host"), "{offer}");
        assert!(!offer.contains("typ relay"), "{offer}");
    }

    /// The offer of a call with `servers`, and how long it took to make.
    fn offer_with(servers: &IceServers) -> (String, Duration) {
        let (bridge, _) = peer(servers);
        let started = Instant::now();
        let offer = crate::MEDIA_POOL
            .any()
            .block_on(bridge.create_offer(true, true))
            .unwrap();
        (offer, started.elapsed())
    }

    fn relay_only_call_through(relayed: &IceServers) {
        let (bridge, _) = peer(relayed);
        let (app, app_events) = peer(&IceServers::default());
        let media_loop = crate::MEDIA_POOL.any();
        let offer = media_loop
            .block_on(bridge.create_offer(true, true))
            .unwrap();
        assert!(offer.contains("typ relay"), "{offer}");
        assert!(!offer.contains("typ host"), "relay only: {offer}");
        let answer = media_loop.block_on(app.answer(&offer)).unwrap();
        media_loop.block_on(bridge.accept_answer(&answer)).unwrap();

        let deadline = Instant::now() + Duration::from_secs(15);
        let mut frames = 0;
        let mut sequence = 0u16;
        while frames < 10 {
            assert!(
                Instant::now() < deadline,
                "{frames} frames through the relay; the bridge's ICE {}",
                bridge.stats().ice_state
            );
            sequence = sequence.wrapping_add(1);
            let packet = opus_packet(sequence);
            bridge.send_frame(&rtp_types::RtpPacket::parse(&packet).unwrap());
            while let Ok(event) = app_events.recv_timeout(Duration::from_millis(20)) {
                if matches!(event, PeerEvent::Frame(_)) {
                    frames += 1;
                }
            }
        }
        assert!(bridge.stats().connected);
    }

    /// One server for both, as coturn is: its Binding answers go to the
    /// STUN exchange and its Allocate answers to the TURN one, asked at the
    /// same time.
    #[test]
    fn stun_and_turn_on_one_server_both_answer() {
        let coturn = Coturn::start();
        let servers = IceServers {
            stun_server: Some(format!("stun://127.0.0.1:{}", coturn.port)),
            turn_server: Some(format!("turn://alice:s3cret@127.0.0.1:{}", coturn.port)),
            ..Default::default()
        };
        let (offer, _) = offer_with(&servers);
        assert!(offer.contains("typ relay"), "{offer}");
        let stun = STUN_SERVERS
            .lock()
            .unwrap()
            .get(&("127.0.0.1".to_owned(), coturn.port))
            .copied()
            .expect("the STUN server was asked");
        assert!(stun.silent_at.is_none(), "its Binding answers were heard");
    }

    /// With neither server answering, a call waits for the longer of the
    /// two waits, not for both one after the other.
    #[test]
    fn silent_stun_and_turn_servers_are_waited_for_at_once() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = silent.local_addr().unwrap();
        let other_silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let servers = IceServers {
            stun_server: Some(format!("stun://{address}")),
            turn_server: Some(format!(
                "turn://alice:s3cret@{}",
                other_silent.local_addr().unwrap()
            )),
            ..Default::default()
        };
        let (offer, waited) = offer_with(&servers);
        assert!(offer.contains("typ host"), "{offer}");
        assert!(waited >= TURN_WAIT, "{waited:?}");
        assert!(
            waited < TURN_WAIT + STUN_WAIT / 2,
            "waited {waited:?}: one after the other"
        );
    }

    /// A TURN server that refuses the credentials leaves a call without a
    /// relayed address, told in the log, and the call does not wait for it.
    #[test]
    fn wrong_turn_credentials_give_no_relayed_address() {
        let coturn = Coturn::start();
        let servers = IceServers {
            turn_server: Some(format!("turn://alice:wrong@127.0.0.1:{}", coturn.port)),
            ..Default::default()
        };
        let (offer, waited) = offer_with(&servers);
        assert!(offer.contains("typ host"), "{offer}");
        assert!(!offer.contains("typ relay"), "{offer}");
        assert!(waited < TURN_WAIT, "{waited:?}");
        assert!(
            SharedPeer::start(
                Box::new(|_| {}),
                crate::MEDIA_POOL.any(),
                &IceServers {
                    relay_only: true,
                    ..Default::default()
                }
            )
            .is_err(),
            "relay only needs a TURN server"
        );
    }
}
