//! The Asterisk Manager Interface (AMI) as Asterisk documents it: over TCP,
//! the server greets with one line (`Asterisk Call Manager/9.0.0`), then
//! both sides exchange messages of `Key: Value` lines ending in CRLF, each
//! message ended by an empty line. The client's messages are actions
//! (`Action: …`, matched to their `Response: …` by `ActionID`); the
//! server's are responses and events (`Event: …`).
//!
//! [`Decoder`] frames what a server (or client) sends and refuses what no
//! Asterisk would: overlong lines, endless messages, lines without a key.
//! [`Connection`] is a client: login (by MD5 challenge, so the secret
//! never crosses the network), then one action at a time; over TCP or, as
//! `manager.conf`'s `tlsenable` offers it, TLS ([`Transport`]).

use std::sync::Arc;
use std::time::Duration;

use md5::{Digest, Md5};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::tls;

/// Asterisk's AMI port (`manager.conf`'s default).
pub const DEFAULT_PORT: u16 = 5038;
/// Asterisk's AMI port over TLS (`manager.conf`'s `tlsbindaddr` default).
pub const DEFAULT_TLS_PORT: u16 = 5039;
/// Longest line accepted: Asterisk's own messages stay far below it.
const MAX_LINE: usize = 8 * 1024;
/// Most headers accepted in one message.
const MAX_HEADERS: usize = 256;
/// How long the server may take to greet, and to answer an action.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmiError {
    #[error("a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("a message of more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("a line that is not UTF-8")]
    NotUtf8,
    #[error("a line without a key: {0:?}")]
    NoKey(String),
    #[error("{0:?} cannot be sent: keys and values hold no line breaks, keys no colon")]
    Unsendable(String),
    #[error("not an AMI server: it greeted with {0:?}")]
    NotAmi(String),
    #[error("login refused: {0}")]
    LoginRefused(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed")]
    Closed,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(String),
}

impl From<std::io::Error> for AmiError {
    fn from(error: std::io::Error) -> Self {
        AmiError::Io(error.to_string())
    }
}

/// One AMI message: its headers in order. Keys compare without case, as
/// Asterisk compares them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    headers: Vec<(String, String)>,
}

impl Message {
    /// An action, with the `ActionID` its response will carry.
    pub fn action(name: &str, action_id: &str) -> Self {
        Message::default()
            .with("Action", name)
            .with("ActionID", action_id)
    }

    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.headers.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Whether this is a response whose `Response` is `Success` (or, for a
    /// logoff, `Goodbye`).
    pub fn is_success(&self) -> bool {
        self.get("Response")
            .is_some_and(|r| r.eq_ignore_ascii_case("Success") || r.eq_ignore_ascii_case("Goodbye"))
    }

    /// The message on the wire. A line break in a key or value would start
    /// a header or message of its sender's choosing, so it is refused.
    pub fn encode(&self) -> Result<String, AmiError> {
        let mut text = String::new();
        for (key, value) in &self.headers {
            let unsafe_key = key.is_empty() || key.contains([':', '\r', '\n']);
            if unsafe_key || value.contains(['\r', '\n']) {
                return Err(AmiError::Unsendable(format!("{key}: {value}")));
            }
            text.push_str(key);
            text.push_str(": ");
            text.push_str(value);
            text.push_str("\r\n");
        }
        text.push_str("\r\n");
        Ok(text)
    }
}

/// What a peer sent: its greeting line (the first line a server sends), or
/// a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Greeting(String),
    Message(Message),
}

/// Frames bytes as they arrive into greeting and messages.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
    /// A server's first line is its greeting; a client sends none.
    expects_greeting: bool,
    current: Message,
}

impl Decoder {
    /// For a client: the first line is the server's greeting.
    pub fn for_client() -> Self {
        Decoder {
            expects_greeting: true,
            ..Decoder::default()
        }
    }

    /// For a server: every line belongs to a message.
    pub fn for_server() -> Self {
        Decoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame, if the bytes pushed so far hold one.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, AmiError> {
        loop {
            let Some(end) = self.buffer.iter().position(|b| *b == b'\n') else {
                if self.buffer.len() > MAX_LINE {
                    return Err(AmiError::LineTooLong);
                }
                return Ok(None);
            };
            if end > MAX_LINE {
                return Err(AmiError::LineTooLong);
            }
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = std::str::from_utf8(&line).map_err(|_| AmiError::NotUtf8)?;
            let line = line.trim_end_matches(['\r', '\n']);
            if self.expects_greeting {
                self.expects_greeting = false;
                return Ok(Some(Frame::Greeting(line.to_owned())));
            }
            if line.is_empty() {
                // Blank lines between messages end nothing.
                if self.current.headers.is_empty() {
                    continue;
                }
                return Ok(Some(Frame::Message(std::mem::take(&mut self.current))));
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(AmiError::NoKey(line.chars().take(80).collect()));
            };
            if self.current.headers.len() >= MAX_HEADERS {
                return Err(AmiError::TooManyHeaders);
            }
            let key = key.trim();
            if key.is_empty() {
                return Err(AmiError::NoKey(line.chars().take(80).collect()));
            }
            let header = (key.to_owned(), value.trim().to_owned());
            self.current.headers.push(header);
        }
    }
}

/// How the connection to the manager interface is carried.
#[derive(Clone)]
pub enum Transport {
    Tcp,
    /// TLS, the server's certificate checked for the host it is reached at.
    Tls(Arc<ClientConfig>),
}

impl Transport {
    /// TLS trusting the certificates of `ca_pem` (a PEM file's text: a
    /// private CA's, or the server's own self-signed one), or with none,
    /// the public certificate authorities.
    pub fn tls(ca_pem: Option<&[u8]>) -> Result<Self, AmiError> {
        tls::client_config(ca_pem)
            .map(Transport::Tls)
            .map_err(AmiError::Tls)
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "Tcp",
            Transport::Tls(_) => "Tls",
        })
    }
}

/// A connection's byte stream, whichever the transport.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The host of `address` (`host:port`, `[v6]:port`), as TLS checks it.
fn server_name(address: &str) -> Result<ServerName<'static>, AmiError> {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    tls::server_name(host).map_err(AmiError::Tls)
}

/// A logged-in AMI client connection.
pub struct Connection {
    stream: Box<dyn Stream>,
    decoder: Decoder,
    /// The server's greeting, e.g. `Asterisk Call Manager/9.0.0`.
    pub greeting: String,
    next_id: u64,
}

impl Connection {
    /// Connects to `address` (`host:port`) and logs in as `username` with
    /// events off: the bridge only acts. The login answers an MD5
    /// challenge (Asterisk's `Challenge` action) with the secret as
    /// `manager.conf` holds it; a server without challenges gets the
    /// plain secret.
    pub async fn login(
        address: &str,
        transport: &Transport,
        username: &str,
        secret: &str,
    ) -> Result<Self, AmiError> {
        let connect = async {
            let stream = TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            Ok::<Box<dyn Stream>, AmiError>(match transport {
                Transport::Tcp => Box::new(stream),
                Transport::Tls(config) => {
                    let connector = tokio_rustls::TlsConnector::from(config.clone());
                    let stream = connector
                        .connect(server_name(address)?, stream)
                        .await
                        .map_err(|e| AmiError::Tls(e.to_string()))?;
                    Box::new(stream)
                }
            })
        };
        let stream = tokio::time::timeout(ANSWER_WITHIN, connect)
            .await
            .map_err(|_| AmiError::Timeout(ANSWER_WITHIN))??;
        let mut connection = Connection {
            stream,
            decoder: Decoder::for_client(),
            greeting: String::new(),
            next_id: 0,
        };
        let greeting = tokio::time::timeout(ANSWER_WITHIN, connection.read_frame())
            .await
            .map_err(|_| AmiError::Timeout(ANSWER_WITHIN))??;
        let Frame::Greeting(line) = greeting else {
            return Err(AmiError::NotAmi(String::new()));
        };
        if !line.starts_with("Asterisk Call Manager/") {
            return Err(AmiError::NotAmi(line.chars().take(80).collect()));
        }
        connection.greeting = line;
        let challenge = connection.action("Challenge").with("AuthType", "MD5");
        let challenge = connection.request(challenge).await?;
        let login = connection.action("Login").with("Username", username);
        let login = match challenge
            .get("Challenge")
            .filter(|_| challenge.is_success())
        {
            Some(challenge) => login
                .with("AuthType", "MD5")
                .with("Key", &challenge_key(challenge, secret)),
            None => login.with("Secret", secret),
        }
        .with("Events", "off");
        let response = connection.request(login).await?;
        if !response.is_success() {
            let why = response.get("Message").unwrap_or("no reason given");
            return Err(AmiError::LoginRefused(why.to_owned()));
        }
        Ok(connection)
    }

    /// A new action with the next `ActionID`.
    pub fn action(&mut self, name: &str) -> Message {
        self.next_id += 1;
        Message::action(name, &format!("sip-cc-bridge-{}", self.next_id))
    }

    /// Sends `action` and waits for its response; events that come
    /// meanwhile are passed over.
    pub async fn request(&mut self, action: Message) -> Result<Message, AmiError> {
        let id = action.get("ActionID").unwrap_or_default().to_owned();
        self.stream.write_all(action.encode()?.as_bytes()).await?;
        // Over TLS, what is written may wait in the session's buffer.
        self.stream.flush().await?;
        let answer = async {
            loop {
                if let Frame::Message(message) = self.read_frame().await?
                    && message.get("Response").is_some()
                    && message.get("ActionID").is_none_or(|a| a == id)
                {
                    return Ok(message);
                }
            }
        };
        tokio::time::timeout(ANSWER_WITHIN, answer)
            .await
            .map_err(|_| AmiError::Timeout(ANSWER_WITHIN))?
    }

    /// The next frame from the server. Cancel-safe: bytes read are kept
    /// for the next call.
    pub async fn read_frame(&mut self) -> Result<Frame, AmiError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame);
            }
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Err(AmiError::Closed);
            }
            self.decoder.push(&chunk[..read]);
        }
    }
}

/// The `Key` of an MD5 login: the hex MD5 of the challenge, then the secret.
pub fn challenge_key(challenge: &str, secret: &str) -> String {
    let mut md5 = Md5::new();
    md5.update(challenge.as_bytes());
    md5.update(secret.as_bytes());
    hex::encode(md5.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(decoder: &mut Decoder) -> Vec<Frame> {
        std::iter::from_fn(|| decoder.next_frame().unwrap()).collect()
    }

    #[test]
    fn a_servers_greeting_and_messages_are_framed_as_they_arrive() {
        let mut decoder = Decoder::for_client();
        let text = "Asterisk Call Manager/9.0.0\r\nResponse: Success\r\nActionID: 1\r\n\
                    Message: Authentication accepted\r\n\r\nEvent: FullyBooted\r\n\
                    Privilege: system,all\r\nStatus: Fully Booted\r\n\r\n";
        let mut got = Vec::new();
        // Byte by byte, as a slow network would hand them over.
        for byte in text.as_bytes() {
            decoder.push(&[*byte]);
            got.extend(frames(&mut decoder));
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            got[0],
            Frame::Greeting("Asterisk Call Manager/9.0.0".into())
        );
        let Frame::Message(login) = &got[1] else {
            panic!("{got:?}")
        };
        assert!(login.is_success());
        assert_eq!(login.get("actionid"), Some("1"));
        assert_eq!(login.get("Message"), Some("Authentication accepted"));
        let Frame::Message(event) = &got[2] else {
            panic!("{got:?}")
        };
        assert_eq!(event.get("Event"), Some("FullyBooted"));
    }

    #[test]
    fn values_keep_their_colons_and_bare_newlines_end_lines() {
        let mut decoder = Decoder::for_server();
        decoder.push(b"\r\nAction: Setvar\nVariable: DEVICE_STATE(Custom:alice)\nValue: INUSE\n\n");
        let got = frames(&mut decoder);
        let [Frame::Message(setvar)] = got.as_slice() else {
            panic!("{got:?}")
        };
        assert_eq!(setvar.get("variable"), Some("DEVICE_STATE(Custom:alice)"));
        assert_eq!(setvar.get("Value"), Some("INUSE"));
    }

    #[test]
    fn hostile_input_gets_an_error_not_a_hang_or_a_panic() {
        let mut long = Decoder::for_server();
        long.push(&vec![b'a'; MAX_LINE + 1]);
        assert_eq!(long.next_frame(), Err(AmiError::LineTooLong));

        let mut endless = Decoder::for_server();
        for i in 0..=MAX_HEADERS {
            endless.push(format!("Key{i}: value\r\n").as_bytes());
        }
        assert_eq!(endless.next_frame(), Err(AmiError::TooManyHeaders));

        let mut keyless = Decoder::for_server();
        keyless.push(b"no colon here\r\n");
        assert!(matches!(keyless.next_frame(), Err(AmiError::NoKey(_))));

        let mut empty_key = Decoder::for_server();
        empty_key.push(b": value\r\n");
        assert!(matches!(empty_key.next_frame(), Err(AmiError::NoKey(_))));

        let mut binary = Decoder::for_server();
        binary.push(b"Key: \xff\xfe\r\n");
        assert_eq!(binary.next_frame(), Err(AmiError::NotUtf8));
    }

    #[test]
    fn an_md5_login_key_is_the_challenge_then_the_secret() {
        // As Asterisk's documentation computes it (Python's hashlib).
        assert_eq!(
            challenge_key("850245763", "ami-s3cret"),
            "f73d10a87963f21b3fc3f92b7625b696"
        );
    }

    proptest::proptest! {
        /// Whatever a peer sends, in whatever pieces: frames or an error, never a panic.
        #[test]
        fn any_bytes_in_any_pieces_are_handled(
            pieces in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..32),
        ) {
            let mut decoder = Decoder::for_client();
            for piece in pieces {
                decoder.push(&piece);
                while let Ok(Some(_)) = decoder.next_frame() {}
            }
        }

        /// What the bridge sends reads back as the same message.
        #[test]
        fn a_sendable_message_reads_back_as_sent(
            headers in proptest::collection::vec(("[A-Za-z][A-Za-z0-9_-]{0,15}", "[ -~]{0,40}"), 1..8),
        ) {
            let message = headers.iter().fold(Message::default(), |message, (key, value)| {
                message.with(key, value)
            });
            let mut decoder = Decoder::for_server();
            decoder.push(message.encode().unwrap().as_bytes());
            let Ok(Some(Frame::Message(read))) = decoder.next_frame() else {
                panic!("{message:?} did not read back");
            };
            // Values are read trimmed, as Asterisk reads them.
            let expected: Vec<(String, String)> = headers
                .iter()
                .map(|(key, value)| (key.clone(), value.trim().to_owned()))
                .collect();
            proptest::prop_assert_eq!(read.headers(), expected.as_slice());
        }
    }

    #[test]
    fn a_value_with_a_line_break_is_never_sent() {
        let injected = Message::action("Setvar", "1")
            .with("Variable", "DEVICE_STATE(Custom:x)")
            .with("Value", "INUSE\r\n\r\nAction: Originate");
        assert!(matches!(injected.encode(), Err(AmiError::Unsendable(_))));
        let bad_key = Message::default().with("A: B", "c");
        assert!(matches!(bad_key.encode(), Err(AmiError::Unsendable(_))));
        assert_eq!(
            Message::action("Ping", "7").encode().unwrap(),
            "Action: Ping\r\nActionID: 7\r\n\r\n"
        );
    }

    #[test]
    fn a_tls_ca_file_must_hold_a_certificate() {
        for text in [
            "",
            "not PEM at all",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            let refused = Transport::tls(Some(text.as_bytes()));
            assert!(
                matches!(refused, Err(AmiError::Tls(_))),
                "{text:?}: {refused:?}"
            );
        }
        let bad = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(Transport::tls(Some(bad.as_bytes())).is_err());
        assert!(matches!(Transport::tls(None), Ok(Transport::Tls(_))));
    }

    #[test]
    fn tls_checks_the_host_the_address_names() {
        for (address, host) in [
            ("pbx.example.com:5039", "pbx.example.com"),
            ("192.0.2.7:5039", "192.0.2.7"),
            ("[2001:db8::7]:5039", "2001:db8::7"),
        ] {
            let name = server_name(address).unwrap();
            assert_eq!(name.to_str(), host, "{address}");
        }
        assert!(server_name("bad host:5039").is_err());
    }
}
