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
//!
//! What a connection keeps after its handshake (about 48 KB, measured;
//! OpenSSL's own state) is the same either way:
//! `SSL_MODE_RELEASE_BUFFERS` changed nothing measurable.

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
/// Larger than any datagram: what one read takes.
const RECORD_SIZE: usize = 2048;

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
        Ok(Box::new(Connection {
            stream,
            active: None,
            established: false,
            events: VecDeque::new(),
            close_sent: false,
            close_received: false,
        }))
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
    Data(Vec<u8>),
    CloseNotify,
}

struct Connection {
    stream: SslStream<Datagrams>,
    /// Client (true) or server, once str0m says.
    active: Option<bool>,
    established: bool,
    events: VecDeque<Event>,
    close_sent: bool,
    close_received: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("active", &self.active)
            .field("established", &self.established)
            .finish()
    }
}

fn failed(operation: dimpl::CryptoOperation) -> DtlsImplError {
    DtlsImplError::CryptoError(dimpl::CryptoError::OperationFailed(operation))
}

impl Connection {
    /// Moves the handshake on as far as what arrived allows (sending a
    /// flight again if its timer expired); once done, the peer's
    /// certificate, the SRTP keys and the connection are told, in that
    /// order (str0m checks the certificate against the SDP's fingerprint).
    fn handshake(&mut self) -> Result<(), DtlsImplError> {
        let Some(active) = self.active else {
            return Ok(());
        };
        if self.established {
            return Ok(());
        }
        let step = if active {
            self.stream.connect()
        } else {
            self.stream.accept()
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
        self.established = true;
        let ssl = self.stream.ssl();
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
        Ok(())
    }

    /// Application data and a close_notify, once connected.
    fn read(&mut self) -> Result<(), DtlsImplError> {
        let mut buffer = [0u8; RECORD_SIZE];
        loop {
            match self.stream.ssl_read(&mut buffer) {
                Ok(length) => self
                    .events
                    .push_back(Event::Data(buffer[..length].to_vec())),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                    if !self.close_received {
                        self.close_received = true;
                        self.events.push_back(Event::CloseNotify);
                        // Answered with ours (RFC 5246 §7.2.1).
                        if !self.close_sent {
                            let _ = self.stream.shutdown();
                            self.close_sent = true;
                        }
                    }
                    return Ok(());
                }
                // Read all, or a record that failed its check was dropped
                // (OpenSSL tells it as a system error with no cause: the
                // datagrams never end).
                Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(()),
                Err(e) if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() => {
                    gst::debug!(crate::CAT, "DTLS record dropped");
                    return Ok(());
                }
                Err(e) => {
                    gst::debug!(crate::CAT, "DTLS record refused: {e}");
                    return Err(failed(dimpl::CryptoOperation::Decrypt));
                }
            }
        }
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
        // str0m starts a client's handshake with an empty packet.
        if !packet.is_empty() {
            let incoming = &mut self.stream.get_mut().incoming;
            // What OpenSSL leaves unread (after a failed handshake, say)
            // does not pile up.
            if incoming.len() == MAX_UNREAD {
                incoming.pop_front();
            }
            incoming.push_back(packet.to_vec());
        }
        if self.established {
            self.read()
        } else {
            self.handshake()?;
            // Records that came with the handshake's last flight.
            if self.established {
                self.read()
            } else {
                Ok(())
            }
        }
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        if let Some(datagram) = self.stream.get_mut().outgoing.pop_front()
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
                Event::Data(data) if fits(buf, &data) => {
                    let data_out = &mut buf[..data.len()];
                    data_out.copy_from_slice(&data);
                    return DtlsOutput::ApplicationData(data_out);
                }
                Event::CloseNotify => return DtlsOutput::CloseNotify,
                // Unchecked, the keys must not be used: the call never connects.
                Event::PeerCertificate(_) => self.events.clear(),
                Event::Data(_) => {}
            }
        }
        let handshaking = self.active.is_some() && !self.established;
        DtlsOutput::Timeout(if handshaking {
            Instant::now() + RETRANSMIT_CHECK
        } else {
            // Nothing to wait for: far enough to never come.
            Instant::now() + Duration::from_secs(3600)
        })
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), DtlsImplError> {
        self.handshake()
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<(), DtlsImplError> {
        if !self.established {
            return Err(DtlsImplError::HandshakePending);
        }
        self.stream
            .ssl_write(data)
            .map(|_| ())
            .map_err(|_| failed(dimpl::CryptoOperation::Encrypt))
    }

    fn is_active(&self) -> bool {
        self.active.unwrap_or(false)
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.established.then_some(ProtocolVersion::DTLS1_2)
    }

    fn is_closing(&self) -> bool {
        self.close_sent || self.close_received
    }

    fn is_closed(&self) -> bool {
        self.close_sent && self.stream.get_ref().outgoing.is_empty()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        if self.established && !self.close_sent {
            let _ = self.stream.shutdown();
        }
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
        let provider = provider();
        let cert = provider.generate_certificate().unwrap();
        let mut client = connection(provider, &cert, true);
        client.handle_packet(&[]).expect("the handshake starts");
        let mut server = connection(provider, &cert, false);
        let (client_said, server_said) = exchange(client.as_mut(), server.as_mut(), 1);
        assert!(!client_said.connected && !server_said.connected);
        // OpenSSL's first retransmission timer is one second; str0m
        // calls the timeout when the connection asked for it.
        std::thread::sleep(Duration::from_millis(1100));
        client.handle_timeout(Instant::now()).unwrap();
        let (client_said, server_said) = exchange(client.as_mut(), server.as_mut(), 0);
        assert!(
            client_said.connected,
            "the client connects after sending its hello again"
        );
        assert!(server_said.connected);
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
    }
}
