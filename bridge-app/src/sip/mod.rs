//! The SIP leg of the bridge on rsipstack: transports, admission, inbound
//! calls (UAS) with SDP offer/answer, DTMF, hold and session timers, and the
//! media of each call on `sipsrc`/`sipsink`.

pub mod admission;
mod branch;
mod call;
mod cpu_load;
mod digest_names;
mod latency;
pub mod media;
mod recorder;
pub mod registrar;
pub mod registration;
pub mod routing;
mod session_timer;
mod transfer;
mod ua;
pub mod video;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use rsipstack::transport::SipAddr;

pub use admission::AdmissionConfig;
pub use call::OutboundCall;
pub use cpu_load::DEFAULT_MAX_CPU_PERCENT;
pub use media::Service;
pub use registration::Account;
pub use routing::{
    AppCaller, AppLeg, AppSide, CallRecord, Caller, Destination, Refusal, Router, Services,
};
pub use ua::{Dialer, PhoneRoute, UserAgent, proxy_address};

/// A transport the bridge listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub transport: Transport,
    pub address: SocketAddr,
}

/// Certificate and key (PEM) for the TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct SipConfig {
    pub listeners: Vec<Listener>,
    pub tls: Option<TlsFiles>,
    /// The address put in Contact and SDP when the bridge is behind NAT
    /// (and offered to apps as a WebRTC candidate).
    pub public_address: Option<IpAddr>,
    /// Asked by each call's WebRTC leg where it is seen from outside a NAT.
    pub stun_server: Option<String>,
    /// Relays each call's WebRTC leg too (its Debug hides the password).
    pub turn_server: Option<bridge_protocol::turn::TurnServer>,
    /// What a `turns:` server's certificate is checked against.
    pub turn_ca_file: Option<std::path::PathBuf>,
    /// The relayed address alone is offered.
    pub relay_only: bool,
    /// Where RTP sockets are bound.
    pub media_address: IpAddr,
    pub admission: AdmissionConfig,
    /// The SIP server's domain: a phone not registered with the bridge is
    /// called at `sip:<user>@<domain>`.
    pub domain: Option<String>,
    /// Where the bridge's own INVITEs go when not to the target's host.
    pub outbound_proxy: Option<SipAddr>,
    /// Accounts registered at their registrar.
    pub accounts: Vec<Account>,
    /// Accept REGISTER from the users of `admission.users`.
    pub registrar: bool,
    /// Calls carried at once; more get 503.
    pub max_calls: usize,
    /// Percent of its cores the bridge may use before new calls get 503
    /// (0: no limit).
    pub max_cpu_percent: f64,
    /// Phones' H.264 video toward apps: as VP8, passed through, or refused.
    pub video: video::AppVideoCodec,
    /// What carries the app leg of calls without video.
    pub webrtc_stack: media::WebRtcStack,
    /// How often the registrar asks registered phones OPTIONS (zero:
    /// never).
    pub qualify_interval: Duration,
    /// How long the built-in services ring before answering.
    pub answer_delay: Duration,
    /// Ringing longer than this ends the call with 480.
    pub no_answer_timeout: Duration,
    pub rtp_timeout: Duration,
    /// Jitter buffer on the phone's audio (`sipsrc latency`; zero: none).
    pub jitter_buffer: Duration,
    /// `opusvoiceenc complexity` of the audio toward apps.
    pub opus_complexity: u32,
    /// The bridge's own calls offer SDES-SRTP, and need it in the answer.
    pub offer_srtp: bool,
    /// An app's call to a phone is answered on the phone's early media.
    pub early_media: bool,
    /// Session interval asked of callers that use session timers (RFC 4028).
    pub session_expires: u32,
    /// The smallest session interval accepted; shorter ones get 422.
    pub min_session_expires: u32,
}

impl SipConfig {
    /// The embedded default: loopback UDP and TCP on 5060.
    pub fn embedded_default() -> Self {
        let loopback: IpAddr = [127, 0, 0, 1].into();
        let address = SocketAddr::new(loopback, 5060);
        Self {
            listeners: vec![
                Listener {
                    transport: Transport::Udp,
                    address,
                },
                Listener {
                    transport: Transport::Tcp,
                    address,
                },
            ],
            tls: None,
            public_address: None,
            stun_server: None,
            turn_server: None,
            turn_ca_file: None,
            relay_only: false,
            media_address: loopback,
            admission: AdmissionConfig {
                trusted: vec![loopback, IpAddr::from(std::net::Ipv6Addr::LOCALHOST)],
                realm: "sip-cc-bridge".into(),
                users: HashMap::new(),
                requests_per_second: 50.0,
                sha256: false,
            },
            domain: None,
            outbound_proxy: None,
            accounts: Vec::new(),
            registrar: false,
            max_calls: 200,
            max_cpu_percent: DEFAULT_MAX_CPU_PERCENT,
            video: video::AppVideoCodec::default(),
            webrtc_stack: media::WebRtcStack::default(),
            qualify_interval: Duration::from_secs(30),
            answer_delay: Duration::ZERO,
            no_answer_timeout: Duration::from_secs(60),
            rtp_timeout: Duration::from_millis(media::DEFAULT_RTP_TIMEOUT_MS.into()),
            jitter_buffer: Duration::ZERO,
            opus_complexity: media::DEFAULT_OPUS_COMPLEXITY,
            offer_srtp: false,
            early_media: false,
            session_expires: 1800,
            min_session_expires: 90,
        }
    }
}

/// An INVITE with `headers` (each ending in CRLF), for unit tests.
#[cfg(test)]
fn invite_with(headers: &str) -> rsipstack::sip::Request {
    let text = format!(
        "INVITE sip:alice@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
         From: <sip:bob@127.0.0.1>;tag=1\r\n\
         To: <sip:alice@127.0.0.1>\r\n\
         Call-ID: c1\r\n\
         CSeq: 1 INVITE\r\n\
         {headers}Content-Length: 0\r\n\r\n"
    );
    rsipstack::sip::Request::try_from(text.as_str()).unwrap()
}
