//! Chat: XMPP over WebSocket (RFC 7395) as the SDK speaks it — SASL PLAIN with
//! `{uid}-{appId}` and the password or session token, resource binding,
//! presence, answers to server pings — kept up by a supervisor that
//! reconnects with backoff and queues stanzas while offline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::xml::Element;

const FRAMING_NS: &str = "urn:ietf:params:xml:ns:xmpp-framing";
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Supplies the chat password for each (re)connection: the user's password,
/// or a fresh session token.
pub type PasswordSource =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

#[derive(Clone)]
pub struct ChatConfig {
    /// The WebSocket URL, e.g. `ws://localhost:8080/ws` or `wss://chat.connectycube.com:5291`.
    pub url: String,
    /// The JID domain (`endpoints.chat`).
    pub domain: String,
    pub user_id: u64,
    pub app_id: u64,
    pub password: PasswordSource,
    /// How often a WebSocket ping checks the connection.
    pub keepalive: Duration,
}

impl ChatConfig {
    fn username(&self) -> String {
        format!("{}-{}", self.user_id, self.app_id)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// Bound and present; stanzas flow.
    Online { jid: String },
    /// The connection ended; the client reconnects after `retry_in`.
    Offline { reason: String, retry_in: Duration },
    /// A stanza from the server (pings are answered, not passed on).
    Stanza(Element),
}

#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Failed(String),
    #[error("closed by the application")]
    Closed,
}

/// A running chat client. Dropping it closes the stream.
pub struct Chat {
    outgoing: mpsc::UnboundedSender<String>,
}

impl Chat {
    /// Starts connecting; events arrive on the returned receiver.
    pub fn start(config: ChatConfig) -> (Chat, mpsc::UnboundedReceiver<ChatEvent>) {
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        tokio::spawn(supervise(config, outgoing_rx, events));
        (Chat { outgoing }, events_rx)
    }

    /// Sends a stanza now, or as soon as the connection is back.
    pub fn send(&self, stanza: &Element) {
        let _ = self.outgoing.send(stanza.to_string());
    }
}

async fn supervise(
    config: ChatConfig,
    mut outgoing: mpsc::UnboundedReceiver<String>,
    events: mpsc::UnboundedSender<ChatEvent>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let reason = match run_session(&config, &mut outgoing, &events).await {
            Err(SessionEnd::Closed) => return,
            Err(SessionEnd::Failed(reason)) => reason,
            Ok(()) => "the server closed the stream".to_owned(),
        };
        if events.is_closed() {
            return;
        }
        // A connection that lasted is a fresh start, not a repeated failure.
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tracing::warn!(
            user = config.user_id,
            "chat offline: {reason}; retrying in {backoff:?}"
        );
        let _ = events.send(ChatEvent::Offline {
            reason,
            retry_in: backoff,
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn run_session(
    config: &ChatConfig,
    outgoing: &mut mpsc::UnboundedReceiver<String>,
    events: &mpsc::UnboundedSender<ChatEvent>,
) -> Result<(), SessionEnd> {
    let failed = |what: &str, e: &dyn std::fmt::Display| SessionEnd::Failed(format!("{what}: {e}"));
    let password = (config.password)()
        .await
        .map_err(|e| failed("no chat password", &e))?;
    let mut request = config
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| failed("bad chat URL", &e))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "xmpp".parse().expect("a valid header value"),
    );
    let (mut socket, _) = timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(request))
        .await
        .map_err(|_| SessionEnd::Failed(format!("{} did not answer", config.url)))?
        .map_err(|e| failed(&format!("cannot connect to {}", config.url), &e))?;

    // Stream, SASL PLAIN, stream again, bind.
    let features = open_stream(&mut socket, &config.domain).await?;
    let mechanisms = features
        .find("mechanisms")
        .ok_or_else(|| SessionEnd::Failed("server offers no SASL".into()))?;
    if !mechanisms.children.iter().any(|m| m.text == "PLAIN") {
        return Err(SessionEnd::Failed(
            "server does not offer SASL PLAIN".into(),
        ));
    }
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("\0{}\0{password}", config.username()));
    send(
        &mut socket,
        &Element::new("auth")
            .attr("xmlns", "urn:ietf:params:xml:ns:xmpp-sasl")
            .attr("mechanism", "PLAIN")
            .text(token),
    )
    .await?;
    let answer = receive(&mut socket).await?;
    if answer.local_name() != "success" {
        let condition = answer
            .children
            .first()
            .map_or("unknown", |c| c.local_name())
            .to_owned();
        return Err(SessionEnd::Failed(format!(
            "chat sign-in refused for user {}: {condition}",
            config.user_id
        )));
    }
    let features = open_stream(&mut socket, &config.domain).await?;
    if features.find("bind").is_none() {
        return Err(SessionEnd::Failed(
            "server offers no resource binding".into(),
        ));
    }
    let bind_id = format!("bind{:08x}", rand::random::<u32>());
    send(
        &mut socket,
        &Element::new("iq")
            .attr("type", "set")
            .attr("id", bind_id.as_str())
            .attr("xmlns", "jabber:client")
            .child(Element::new("bind").attr("xmlns", "urn:ietf:params:xml:ns:xmpp-bind")),
    )
    .await?;
    let bound = receive(&mut socket).await?;
    let jid = bound
        .find("bind")
        .and_then(|b| b.find_text("jid"))
        .filter(|_| bound.get_attr("type") == Some("result"))
        .ok_or_else(|| SessionEnd::Failed(format!("binding failed: {bound}")))?
        .to_owned();
    send(
        &mut socket,
        &Element::new("presence").attr("xmlns", "jabber:client"),
    )
    .await?;
    let _ = events.send(ChatEvent::Online { jid: jid.clone() });

    let mut keepalive = tokio::time::interval(config.keepalive);
    keepalive.tick().await;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            frame = socket.next() => {
                last_heard = Instant::now();
                match frame {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(failed("connection lost", &e)),
                    Some(Ok(Message::Text(text))) => {
                        match Element::parse(&text) {
                            Ok(stanza) if stanza.local_name() == "close" => return Ok(()),
                            Ok(stanza) if is_ping(&stanza) => {
                                let pong = Element::new("iq").attr("type", "result")
                                    .attr("id", stanza.get_attr("id").unwrap_or_default())
                                    .attr("to", stanza.get_attr("from").unwrap_or(&config.domain))
                                    .attr("xmlns", "jabber:client");
                                send(&mut socket, &pong).await?;
                            }
                            Ok(stanza) => { let _ = events.send(ChatEvent::Stanza(stanza)); }
                            Err(e) => tracing::warn!(user = config.user_id, "ignoring a malformed stanza from the server: {e}"),
                        }
                    }
                    Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(_)) => {}
                }
            }
            stanza = outgoing.recv() => {
                let Some(stanza) = stanza else {
                    let _ = socket.send(Message::text(format!("<close xmlns=\"{FRAMING_NS}\"/>"))).await;
                    let _ = socket.close(None).await;
                    return Err(SessionEnd::Closed);
                };
                socket.send(Message::text(stanza)).await.map_err(|e| failed("send failed", &e))?;
            }
            _ = keepalive.tick() => {
                if last_heard.elapsed() > config.keepalive * 2 {
                    return Err(SessionEnd::Failed("no answer to keepalive pings".into()));
                }
                socket.send(Message::Ping(Vec::new().into())).await.map_err(|e| failed("keepalive failed", &e))?;
            }
        }
    }
}

fn is_ping(stanza: &Element) -> bool {
    stanza.local_name() == "iq"
        && stanza.get_attr("type") == Some("get")
        && stanza.find("ping").is_some()
}

async fn open_stream(socket: &mut Socket, domain: &str) -> Result<Element, SessionEnd> {
    send(
        socket,
        &Element::new("open")
            .attr("xmlns", FRAMING_NS)
            .attr("version", "1.0")
            .attr("to", domain),
    )
    .await?;
    let open = receive(socket).await?;
    if open.local_name() != "open" {
        return Err(SessionEnd::Failed(format!(
            "expected <open/>, got <{}>",
            open.name
        )));
    }
    let features = receive(socket).await?;
    if features.local_name() != "features" {
        return Err(SessionEnd::Failed(format!(
            "expected stream features, got <{}>",
            features.name
        )));
    }
    Ok(features)
}

async fn send(socket: &mut Socket, element: &Element) -> Result<(), SessionEnd> {
    socket
        .send(Message::text(element.to_string()))
        .await
        .map_err(|e| SessionEnd::Failed(format!("send failed: {e}")))
}

async fn receive(socket: &mut Socket) -> Result<Element, SessionEnd> {
    loop {
        let frame = timeout(STEP_TIMEOUT, socket.next())
            .await
            .map_err(|_| SessionEnd::Failed("the server stopped answering".into()))?;
        match frame {
            Some(Ok(Message::Text(text))) => {
                return Element::parse(&text)
                    .map_err(|e| SessionEnd::Failed(format!("malformed frame: {e}")));
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(SessionEnd::Failed(
                    "the server closed the connection".into(),
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(SessionEnd::Failed(format!("connection lost: {e}"))),
        }
    }
}
