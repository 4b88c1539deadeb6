//! DTLS on the shared WebRTC stack, in OpenSSL, as str0m's own OpenSSL
//! provider does it, but:
//! - one SSL context for every call: str0m's provider builds one per call,
//!   parsing the certificate and its key again (1.3 ms of CPU and 18 KB a
//!   call here);
//! - a handshake flight lost on the way is sent again on OpenSSL's DTLS
//!   timer. str0m's provider sends a flight only when a datagram comes in,
//!   so as the DTLS client a lost ClientHello of ours was never repeated
//!   and the call got no media. The bridge is the client only when the
//!   peer's description makes it so (`a=setup:passive`; browsers answer
//!   `active` and offer `actpass`, where str0m takes the server's part).
//! - once connected, OpenSSL's connection is freed: it held about 75 KB
//!   (measured), for nothing once SRTP has the keys on a stack with no
//!   data channel. `SSL_MODE_RELEASE_BUFFERS` freed nothing measurable.

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openssl::pkey::PKey;
use openssl::srtp::SrtpProfileId;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVerifyMode,
};
use openssl::x509::X509;
use str0m::config::DtlsVersion;
use str0m::crypto::CryptoError;
use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, KeyingMaterial,
    ProtocolVersion, SrtpProfile,
};

/// Forward secrecy only, AES-GCM first (what browsers and webrtcbin pick).
const CIPHERS: &str = "ECDHE+AESGCM:ECDHE+AES256:DHE+AESGCM";
/// SRTP protection profiles offered, in OpenSSL's names; GCM first, as
/// the plugin's SRTP does it in Rust (the others go through OpenSSL).
const SRTP_PROFILES: &str = "SRTP_AEAD_AES_128_GCM:SRTP_AEAD_AES_256_GCM:SRTP_AES128_CM_SHA1_80";
/// RFC 5764's label for the SRTP keys.
const SRTP_KEY_LABEL: &str = "EXTRACTOR-dtls_srtp";
/// How often, while handshaking, OpenSSL is asked whether its DTLS timer
/// (1 s, doubling) expired and a flight is due again.
const RETRANSMIT_CHECK: Duration = Duration::from_millis(250);
/// Datagrams kept for OpenSSL to read at most.
const MAX_UNREAD: usize = 16;

pub(super) struct SharedContextDtls {
    /// Makes the certificate (str0m's OpenSSL provider).
    certificates: &'static dyn DtlsProvider,
    /// The context every call shares, and the certificate it holds.
    context: Mutex<Option<(Vec<u8>, SslContext)>>,
}

impl std::fmt::Debug for SharedContextDtls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedContextDtls")
    }
}

impl SharedContextDtls {
    pub(super) const fn new(certificates: &'static dyn DtlsProvider) -> Self {
        SharedContextDtls {
            certificates,
            context: Mutex::new(None),
        }
    }

    /// The context for `cert`: made once, and again only for another certificate.
    fn context(&self, cert: &DtlsCert) -> Result<SslContext, openssl::error::ErrorStack> {
        let mut kept = self.context.lock().unwrap();
        if let Some((certificate, context)) = kept.as_ref()
            && *certificate == cert.certificate
        {
            return Ok(context.clone());
        }
        let context = build_context(cert)?;
        *kept = Some((cert.certificate.clone(), context.clone()));
        Ok(context)
    }
}

fn build_context(cert: &DtlsCert) -> Result<SslContext, openssl::error::ErrorStack> {
    let mut context = SslContextBuilder::new(SslMethod::dtls())?;
    context.set_cipher_list(CIPHERS)?;
    context.set_tlsext_use_srtp(SRTP_PROFILES)?;
    // The peer must show a certificate; whether it is the one its SDP's
    // fingerprint names is str0m's check (self-signed, so no chain to verify).
    context.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        |_, _| true,
    );
    let certificate = X509::from_der(&cert.certificate)?;
    let key = PKey::private_key_from_der(&cert.private_key)?;
    context.set_certificate(&certificate)?;
    context.set_private_key(&key)?;
    // DTLS 1.2 only; the MTU is ours, not asked of a socket there is none of.
    context.set_options(
        SslOptions::SINGLE_ECDH_USE | SslOptions::NO_DTLSV1 | SslOptions::NO_QUERY_MTU,
    );
    Ok(context.build())
}

impl DtlsProvider for SharedContextDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.certificates.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        _now: Instant,
        version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        if version != DtlsVersion::Dtls12 {
            return Err(CryptoError::Other(format!(
                "DTLS {version} is not offered, only 1.2"
            )));
        }
        let openssl_error = |e: openssl::error::ErrorStack| CryptoError::Other(e.to_string());
        let context = self.context(cert).map_err(openssl_error)?;
        let mut ssl = Ssl::new(&context).map_err(openssl_error)?;
        if let Some(mtu) = mtu {
            ssl.set_mtu(mtu as u32).map_err(openssl_error)?;
        }
        let stream = SslStream::new(ssl, Datagrams::default()).map_err(openssl_error)?;
        Ok(Box::new(Connection::new(stream)))
    }
}

/// The datagrams between OpenSSL and the network: one read takes one.
#[derive(Default)]
struct Datagrams {
    incoming: VecDeque<Vec<u8>>,
    outgoing: VecDeque<Vec<u8>>,
}

impl io::Read for Datagrams {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(datagram) = self.incoming.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let length = datagram.len().min(buf.len());
        buf[..length].copy_from_slice(&datagram[..length]);
        Ok(length)
    }
}

impl io::Write for Datagrams {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.push_back(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the connection has to tell str0m, after its datagrams.
enum Event {
    PeerCertificate(Vec<u8>),
    Keys(Vec<u8>, SrtpProfile),
    Connected,
}

enum Link {
    /// OpenSSL's connection, while handshaking.
    Handshaking(SslStream<Datagrams>),
    /// Connected: OpenSSL's connection is freed (about 75 KB, a sixth of
    /// a transcoded call's memory). Its keys are SRTP's now, and the stack
    /// carries no data channel, so nothing more is read or written in DTLS
    /// records but our last flight, sent again when the peer repeats its own.
    Connected(Finished),
}

struct Finished {
    /// As the DTLS server, our last flight (ChangeCipherSpec and
    /// Finished): a client that lost it repeats its own flight, and gets
    /// these datagrams again, as OpenSSL would send them. Empty as the
    /// client, who has the last word.
    last_flight: Vec<Vec<u8>>,
    outgoing: VecDeque<Vec<u8>>,
    last_sent_again: Option<Instant>,
}

/// A peer repeating its flight gets ours again at most this often.
const SEND_AGAIN_EVERY: Duration = Duration::from_millis(250);
/// The first byte of a DTLS handshake record.
const HANDSHAKE_RECORD: u8 = 22;

struct Connection {
    link: Link,
    /// Client (true) or server, once str0m says.
    active: Option<bool>,
    events: VecDeque<Event>,
    close_sent: bool,
    /// Far enough to never come: what a connected link waits for.
    never: Instant,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("active", &self.active)
            .field("connected", &self.is_connected())
            .finish()
    }
}

fn failed(operation: dimpl::CryptoOperation) -> DtlsImplError {
    DtlsImplError::CryptoError(dimpl::CryptoError::OperationFailed(operation))
}

impl Connection {
    fn new(stream: SslStream<Datagrams>) -> Connection {
        Connection {
            link: Link::Handshaking(stream),
            active: None,
            events: VecDeque::new(),
            close_sent: false,
            never: Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600),
        }
    }

    fn is_connected(&self) -> bool {
        matches!(self.link, Link::Connected(_))
    }

    /// Moves the handshake on as far as what arrived allows (sending a
    /// flight again if its timer expired); once done, the peer's
    /// certificate, the SRTP keys and the connection are told, in that
    /// order (str0m checks the certificate against the SDP's fingerprint),
    /// and OpenSSL's connection is let go.
    fn handshake(&mut self) -> Result<(), DtlsImplError> {
        let (Some(active), Link::Handshaking(stream)) = (self.active, &mut self.link) else {
            return Ok(());
        };
        let step = if active {
            stream.connect()
        } else {
            stream.accept()
        };
        match step {
            Ok(()) => {}
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                return Ok(());
            }
            Err(e) => {
                gst::debug!(crate::CAT, "DTLS handshake failed: {e}");
                return Err(failed(dimpl::CryptoOperation::VerifySignature));
            }
        }
        let ssl = stream.ssl();
        let certificate = ssl
            .peer_certificate()
            .and_then(|certificate| certificate.to_der().ok())
            .ok_or(failed(dimpl::CryptoOperation::VerifySignature))?;
        let profile = ssl
            .selected_srtp_profile()
            .and_then(|profile| srtp_profile(profile.id()))
            .ok_or(failed(dimpl::CryptoOperation::CreateCipher))?;
        let mut keys = vec![0; profile.keying_material_len()];
        ssl.export_keying_material(&mut keys, SRTP_KEY_LABEL, None)
            .map_err(|_| failed(dimpl::CryptoOperation::Prf))?;
        self.events.push_back(Event::PeerCertificate(certificate));
        self.events.push_back(Event::Keys(keys, profile));
        self.events.push_back(Event::Connected);
        // What the handshake's last step wrote is the flight that ends it.
        let outgoing = std::mem::take(&mut stream.get_mut().outgoing);
        let last_flight = if active {
            Vec::new()
        } else {
            outgoing.iter().cloned().collect()
        };
        self.link = Link::Connected(Finished {
            last_flight,
            outgoing,
            last_sent_again: None,
        });
        Ok(())
    }
}

fn srtp_profile(id: SrtpProfileId) -> Option<SrtpProfile> {
    match id {
        SrtpProfileId::SRTP_AES128_CM_SHA1_80 => Some(SrtpProfile::AES128_CM_SHA1_80),
        SrtpProfileId::SRTP_AEAD_AES_128_GCM => Some(SrtpProfile::AEAD_AES_128_GCM),
        SrtpProfileId::SRTP_AEAD_AES_256_GCM => Some(SrtpProfile::AEAD_AES_256_GCM),
        _ => None,
    }
}

/// `data` in `buf`, whose room str0m sizes for any record; what does not
/// fit is dropped with a warning.
fn fits(buf: &[u8], data: &[u8]) -> bool {
    let fits = data.len() <= buf.len();
    if !fits {
        gst::warning!(crate::CAT, "DTLS output of {} bytes dropped", data.len());
    }
    fits
}

impl DtlsInstance for Connection {
    fn set_active(&mut self, active: bool) {
        self.active = Some(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        match &mut self.link {
            Link::Handshaking(stream) => {
                // str0m starts a client's handshake with an empty packet.
                if !packet.is_empty() {
                    let incoming = &mut stream.get_mut().incoming;
                    // What OpenSSL leaves unread (after a failed handshake,
                    // say) does not pile up.
                    if incoming.len() == MAX_UNREAD {
                        incoming.pop_front();
                    }
                    incoming.push_back(packet.to_vec());
                }
                self.handshake()
            }
            // The client did not get our last flight: it repeats its own.
            // Anything else (a record forged or late, a data channel's or
            // an alert) is dropped, as DTLS drops what it cannot use.
            Link::Connected(finished) => {
                let now = Instant::now();
                let repeated = packet.first() == Some(&HANDSHAKE_RECORD)
                    && !finished.last_flight.is_empty()
                    && finished
                        .last_sent_again
                        .is_none_or(|at| now.duration_since(at) >= SEND_AGAIN_EVERY);
                if repeated {
                    gst::debug!(
                        crate::CAT,
                        "the DTLS client lost our last flight: sent again"
                    );
                    finished.last_sent_again = Some(now);
                    finished
                        .outgoing
                        .extend(finished.last_flight.iter().cloned());
                }
                Ok(())
            }
        }
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let outgoing = match &mut self.link {
            Link::Handshaking(stream) => &mut stream.get_mut().outgoing,
            Link::Connected(finished) => &mut finished.outgoing,
        };
        if let Some(datagram) = outgoing.pop_front()
            && fits(buf, &datagram)
        {
            let packet = &mut buf[..datagram.len()];
            packet.copy_from_slice(&datagram);
            return DtlsOutput::Packet(packet);
        }
        while let Some(event) = self.events.pop_front() {
            match event {
                Event::PeerCertificate(der) if fits(buf, &der) => {
                    let der_out = &mut buf[..der.len()];
                    der_out.copy_from_slice(&der);
                    return DtlsOutput::PeerCert(der_out);
                }
                Event::Keys(keys, profile) => {
                    return DtlsOutput::KeyingMaterial(KeyingMaterial::new(&keys), profile);
                }
                Event::Connected => return DtlsOutput::Connected,
                // Unchecked, the keys must not be used: the call never connects.
                Event::PeerCertificate(_) => self.events.clear(),
            }
        }
        DtlsOutput::Timeout(match self.link {
            Link::Handshaking(_) if self.active.is_some() => Instant::now() + RETRANSMIT_CHECK,
            _ => self.never,
        })
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), DtlsImplError> {
        self.handshake()
    }

    fn send_application_data(&mut self, _data: &[u8]) -> Result<(), DtlsImplError> {
        if !self.is_connected() {
            return Err(DtlsImplError::HandshakePending);
        }
        // No data channel on this stack (its calls are audio): a stray
        // one's data is lost, as on a network, not the call.
        gst::debug!(crate::CAT, "no data channel: DTLS application data dropped");
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.unwrap_or(false)
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.is_connected().then_some(ProtocolVersion::DTLS1_2)
    }

    fn is_closing(&self) -> bool {
        self.close_sent
    }

    fn is_closed(&self) -> bool {
        self.close_sent
    }

    /// Ends the connection without a close_notify: OpenSSL's state, which
    /// would encrypt it, is gone once connected, and a call's end is told
    /// by its signalling (and by ICE consent if that is lost).
    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.close_sent = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> &'static SharedContextDtls {
        Box::leak(Box::new(SharedContextDtls::new(
            str0m::crypto::from_feature_flags().dtls_provider,
        )))
    }

    fn connection(
        provider: &SharedContextDtls,
        cert: &DtlsCert,
        active: bool,
    ) -> Box<dyn DtlsInstance> {
        let mut connection = provider
            .new_dtls(cert, Instant::now(), DtlsVersion::Dtls12, Some(1150))
            .expect("a DTLS connection");
        connection.set_active(active);
        connection
    }

    /// A client, its handshake started as str0m starts it (an empty
    /// packet), and a server, on one certificate.
    fn client_and_server() -> (Box<dyn DtlsInstance>, Box<dyn DtlsInstance>) {
        let provider = provider();
        let cert = provider.generate_certificate().unwrap();
        let mut client = connection(provider, &cert, true);
        client.handle_packet(&[]).expect("the handshake starts");
        (client, connection(provider, &cert, false))
    }

    /// What one side said: its datagrams, and its events by name.
    #[derive(Default)]
    struct Said {
        datagrams: Vec<Vec<u8>>,
        peer_certificate: Option<Vec<u8>>,
        keys: Option<(Vec<u8>, SrtpProfile)>,
        connected: bool,
    }

    fn drain(connection: &mut dyn DtlsInstance, said: &mut Said) {
        let mut buf = vec![0u8; 2000];
        loop {
            match connection.poll_output(&mut buf) {
                DtlsOutput::Packet(p) => said.datagrams.push(p.to_vec()),
                DtlsOutput::PeerCert(der) => said.peer_certificate = Some(der.to_vec()),
                DtlsOutput::KeyingMaterial(keys, profile) => {
                    said.keys = Some((keys.to_vec(), profile))
                }
                DtlsOutput::Connected => said.connected = true,
                DtlsOutput::Timeout(_) => return,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Hands datagrams both ways until neither has more, dropping the
    /// client's first `drop_first` datagrams. (The client's handshake is
    /// started as str0m starts it: an empty packet.)
    fn exchange(
        client: &mut dyn DtlsInstance,
        server: &mut dyn DtlsInstance,
        mut drop_first: usize,
    ) -> (Said, Said) {
        let (mut from_client, mut from_server) = (Said::default(), Said::default());
        for _ in 0..20 {
            drain(client, &mut from_client);
            for datagram in from_client.datagrams.drain(..) {
                if drop_first > 0 {
                    drop_first -= 1;
                    continue;
                }
                server
                    .handle_packet(&datagram)
                    .expect("the client's datagram taken");
            }
            drain(server, &mut from_server);
            let answers: Vec<_> = from_server.datagrams.drain(..).collect();
            if answers.is_empty() {
                break;
            }
            for datagram in answers {
                client
                    .handle_packet(&datagram)
                    .expect("the server's datagram taken");
            }
        }
        drain(client, &mut from_client);
        (from_client, from_server)
    }

    /// The exchange after the client's first retransmission timer
    /// (OpenSSL's is one second; str0m calls the timeout when the
    /// connection asked for it).
    fn after_the_clients_timer(
        client: &mut dyn DtlsInstance,
        server: &mut dyn DtlsInstance,
    ) -> (Said, Said) {
        std::thread::sleep(Duration::from_millis(1100));
        client.handle_timeout(Instant::now()).unwrap();
        exchange(client, server, 0)
    }

    #[test]
    fn two_calls_connect_on_one_context_and_agree_on_their_keys() {
        let provider = provider();
        let (client_cert, server_cert) = (
            provider.generate_certificate().unwrap(),
            provider.generate_certificate().unwrap(),
        );
        let mut client = connection(provider, &client_cert, true);
        client.handle_packet(&[]).expect("the handshake starts");
        let mut server = connection(provider, &server_cert, false);
        let (client_said, server_said) = exchange(client.as_mut(), server.as_mut(), 0);
        assert!(client_said.connected && server_said.connected);
        // Each shows the other's certificate, for str0m to check its fingerprint.
        assert_eq!(
            client_said.peer_certificate,
            Some(server_cert.certificate.clone())
        );
        assert_eq!(
            server_said.peer_certificate,
            Some(client_cert.certificate.clone())
        );
        let (keys, profile) = client_said.keys.expect("the client's SRTP keys");
        assert_eq!(profile, SrtpProfile::AEAD_AES_128_GCM);
        assert_eq!(keys.len(), profile.keying_material_len());
        assert_eq!(Some((keys, profile)), server_said.keys);

        // Calls with one certificate share one context.
        let a = provider.context(&server_cert).unwrap();
        let b = provider.context(&server_cert).unwrap();
        assert!(std::ptr::eq(&*a, &*b));
    }

    #[test]
    fn a_lost_client_hello_is_sent_again() {
        let (mut client, mut server) = client_and_server();
        let (client_said, server_said) = exchange(client.as_mut(), server.as_mut(), 1);
        assert!(!client_said.connected && !server_said.connected);
        let (client_said, server_said) = after_the_clients_timer(client.as_mut(), server.as_mut());
        assert!(
            client_said.connected,
            "the client connects after sending its hello again"
        );
        assert!(server_said.connected);
    }

    #[test]
    fn a_client_that_lost_our_last_flight_gets_it_again() {
        let (mut client, mut server) = client_and_server();
        let (mut from_client, mut from_server) = (Said::default(), Said::default());
        // The server connects; its last flight is lost on the way.
        while !from_server.connected {
            drain(client.as_mut(), &mut from_client);
            assert!(!from_client.datagrams.is_empty(), "the handshake stalled");
            for datagram in from_client.datagrams.drain(..) {
                server.handle_packet(&datagram).unwrap();
            }
            drain(server.as_mut(), &mut from_server);
            let flight: Vec<_> = from_server.datagrams.drain(..).collect();
            if !from_server.connected {
                for datagram in flight {
                    client.handle_packet(&datagram).unwrap();
                }
            }
        }
        drain(client.as_mut(), &mut from_client);
        assert!(!from_client.connected);
        // The client repeats its flight; the server, whose OpenSSL
        // connection is gone, answers with its last flight again.
        let (client_said, _) = after_the_clients_timer(client.as_mut(), server.as_mut());
        assert!(
            client_said.connected,
            "the client connects on the last flight sent again"
        );
    }

    #[test]
    fn garbage_is_refused_without_harm() {
        let provider = provider();
        let cert = provider.generate_certificate().unwrap();
        let mut server = connection(provider, &cert, false);
        for garbage in [&[0x16u8, 0xfe, 0xfd][..], &[0x17; 40], &[0x16; 1500], &[]] {
            let _ = server.handle_packet(garbage);
        }
        // Still able to connect a real client afterwards.
        let mut client = connection(provider, &cert, true);
        client.handle_packet(&[]).expect("the handshake starts");
        let (client_said, server_said) = exchange(client.as_mut(), server.as_mut(), 0);
        assert!(client_said.connected && server_said.connected);
        // Once connected, a forged record is dropped, as DTLS drops what
        // fails its check (RFC 6347 §4.1.2.7): no error for str0m, and the
        // call's SRTP keys stay.
        let forged = [0x17, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 3, 1, 2, 3];
        assert!(server.handle_packet(&forged).is_ok());
        assert!(!server.is_closing());
        // A forged handshake record gets our last flight at most every
        // `SEND_AGAIN_EVERY`, never a stream of answers.
        let mut said = Said::default();
        for _ in 0..100 {
            server
                .handle_packet(&[HANDSHAKE_RECORD, 0xfe, 0xfd, 0])
                .unwrap();
            drain(server.as_mut(), &mut said);
        }
        assert!(!said.datagrams.is_empty() && said.datagrams.len() <= 2);
    }
}
