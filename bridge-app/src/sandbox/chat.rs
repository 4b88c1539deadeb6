//! The sandbox's chat: XMPP over WebSocket (RFC 7395) as the SDK needs it —
//! PLAIN with `{uid}-{appId}` and password or token, bind, IQ answers, and
//! message routing by the `to` local part with `from` stamped by the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::{Message, WebSocket};
use base64::Engine;
use bridge_protocol::connectycube::signaling::user_id_from_jid;
use bridge_protocol::connectycube::xml::{Element, MAX_STANZA_LEN, escape};
use futures_util::{SinkExt, StreamExt};
use quick_xml::events::Event;
use tokio::sync::mpsc;

use super::state::{Resource, State};

const FRAMING_NS: &str = "urn:ietf:params:xml:ns:xmpp-framing";
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

enum Phase {
    /// Before SASL.
    Unauthenticated,
    /// Authenticated as this user; the stream restarts, then binds.
    Authenticated(u64),
    /// Bound to a full JID.
    Bound { user_id: u64, jid: String },
}

pub async fn serve_connection(socket: WebSocket, state: Arc<State>) {
    let connection = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();
    let (deliver, mut deliveries) = mpsc::unbounded_channel::<String>();
    let mut phase = Phase::Unauthenticated;
    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            delivery = deliveries.recv() => {
                let Some(text) = delivery else { break };
                if sink.send(Message::Text(text.into())).await.is_err() { break }
                continue;
            }
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        let replies = match Element::parse(&text) {
            Ok(stanza) => handle(&state, &mut phase, connection, &deliver, &stanza, &text),
            Err(e) => {
                tracing::warn!(
                    connection,
                    "sandbox chat: closing a stream that sent bad XML: {e}"
                );
                vec![stream_error("not-well-formed"), close()]
            }
        };
        let closing = replies.iter().any(|r| r.starts_with("<close"));
        for reply in replies {
            if sink.send(Message::Text(reply.into())).await.is_err() {
                break;
            }
        }
        if closing {
            break;
        }
    }
    if let Phase::Bound { user_id, .. } = phase {
        let mut directory = state.directory.lock().unwrap();
        if let Some(resources) = directory.resources.get_mut(&user_id) {
            resources.retain(|r| r.connection != connection);
        }
    }
    let _ = sink.close().await;
}

fn close() -> String {
    format!("<close xmlns=\"{FRAMING_NS}\"/>")
}

fn stream_error(condition: &str) -> String {
    format!(
        "<stream:error xmlns:stream=\"http://etherx.jabber.org/streams\"><{condition} xmlns=\"urn:ietf:params:xml:ns:xmpp-streams\"/></stream:error>"
    )
}

fn handle(
    state: &State,
    phase: &mut Phase,
    connection: u64,
    deliver: &mpsc::UnboundedSender<String>,
    stanza: &Element,
    raw: &str,
) -> Vec<String> {
    let domain = &state.domain;
    match (stanza.local_name(), &*phase) {
        ("open", _) => {
            let open = format!(
                "<open xmlns=\"{FRAMING_NS}\" from=\"{}\" id=\"{:016x}\" version=\"1.0\" xml:lang=\"en\"/>",
                escape(domain),
                rand::random::<u64>()
            );
            let features = match phase {
                Phase::Unauthenticated => {
                    "<mechanisms xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\"><mechanism>PLAIN</mechanism></mechanisms>"
                }
                _ => "<bind xmlns=\"urn:ietf:params:xml:ns:xmpp-bind\"/>",
            };
            vec![
                open,
                format!(
                    "<stream:features xmlns:stream=\"http://etherx.jabber.org/streams\">{features}</stream:features>"
                ),
            ]
        }
        ("close", _) => vec![close()],
        ("auth", Phase::Unauthenticated) => match authenticate(state, stanza) {
            Some(user_id) => {
                *phase = Phase::Authenticated(user_id);
                vec!["<success xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\"/>".into()]
            }
            None => vec![
                "<failure xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\"><not-authorized/></failure>"
                    .into(),
            ],
        },
        ("iq", Phase::Authenticated(user_id)) if stanza.find("bind").is_some() => {
            let user_id = *user_id;
            let jid = format!(
                "{user_id}-{}@{domain}/r{:08x}",
                state.app_id,
                rand::random::<u32>()
            );
            state
                .directory
                .lock()
                .unwrap()
                .resources
                .entry(user_id)
                .or_default()
                .push(Resource {
                    jid: jid.clone(),
                    connection,
                    deliver: deliver.clone(),
                });
            *phase = Phase::Bound {
                user_id,
                jid: jid.clone(),
            };
            vec![format!(
                "<iq type=\"result\" id=\"{}\" xmlns=\"jabber:client\"><bind xmlns=\"urn:ietf:params:xml:ns:xmpp-bind\"><jid>{}</jid></bind></iq>",
                escape(stanza.get_attr("id").unwrap_or_default()),
                escape(&jid)
            )]
        }
        ("iq", Phase::Bound { jid, .. }) => match stanza.get_attr("type") {
            // Carbons, pings and anything else: an empty result, as the SDK only needs an answer.
            Some("get" | "set") => vec![format!(
                "<iq type=\"result\" id=\"{}\" to=\"{}\" xmlns=\"jabber:client\"/>",
                escape(stanza.get_attr("id").unwrap_or_default()),
                escape(jid)
            )],
            _ => Vec::new(),
        },
        ("presence", Phase::Bound { .. }) => Vec::new(),
        ("message", Phase::Bound { jid, .. }) => {
            route(state, jid, stanza, raw);
            Vec::new()
        }
        (name, _) => {
            tracing::warn!(
                connection,
                "sandbox chat: <{name}> out of order; closing the stream"
            );
            vec![stream_error("not-authorized"), close()]
        }
    }
}

/// SASL PLAIN: `\0{uid}-{appId}\0{password or token}`.
fn authenticate(state: &State, auth: &Element) -> Option<u64> {
    if auth.get_attr("mechanism") != Some("PLAIN") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.text.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let mut parts = decoded.split('\0');
    let (_authzid, authcid, password) = (parts.next()?, parts.next()?, parts.next()?);
    let (uid, app) = authcid.split_once('-')?;
    let user_id: u64 = uid.parse().ok()?;
    (app.parse::<u64>().ok()? == state.app_id && state.chat_password_ok(user_id, password))
        .then_some(user_id)
}

/// Delivers a message to every bound resource of the `to` user, with `from`
/// set to the sender's full JID and the rest passed on byte for byte.
fn route(state: &State, from_jid: &str, stanza: &Element, raw: &str) {
    let Some(to_user) = stanza.get_attr("to").and_then(user_id_from_jid) else {
        tracing::warn!("sandbox chat: message without a usable 'to' dropped");
        return;
    };
    let Some(stamped) = stamp_from(raw, from_jid) else {
        return;
    };
    deliver(state, to_user, &stamped);
}

/// Hands a stanza, `from` set, to every bound resource of `to_user`.
pub fn deliver(state: &State, to_user: u64, stanza: &str) {
    let directory = state.directory.lock().unwrap();
    for resource in directory.resources.get(&to_user).into_iter().flatten() {
        let _ = resource.deliver.send(stanza.to_owned());
    }
}

/// Rewrites only the opening tag: drops any `from` the sender set (no spoofing)
/// and adds ours.
fn stamp_from(raw: &str, from_jid: &str) -> Option<String> {
    if raw.len() > MAX_STANZA_LEN {
        return None;
    }
    let mut reader = quick_xml::Reader::from_str(raw);
    loop {
        let event = reader.read_event().ok()?;
        let (start, empty) = match &event {
            Event::Start(s) => (s, false),
            Event::Empty(s) => (s, true),
            Event::Eof => return None,
            _ => continue,
        };
        let mut tag = format!("<{}", String::from_utf8_lossy(start.name().as_ref()));
        for attribute in start.attributes().flatten() {
            if attribute.key.as_ref() == b"from" {
                continue;
            }
            tag.push_str(&format!(
                " {}=\"{}\"",
                String::from_utf8_lossy(attribute.key.as_ref()),
                String::from_utf8_lossy(&attribute.value)
            ));
        }
        tag.push_str(&format!(" from=\"{}\"", escape(from_jid)));
        tag.push_str(if empty { "/>" } else { ">" });
        let rest = &raw[reader.buffer_position() as usize..];
        return Some(tag + rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_is_stamped_and_the_body_kept_byte_for_byte() {
        let raw = "<message to=\"2-1@localhost\" from=\"9-1@evil\" type=\"headline\"><sdp>v=0&#13;\nx</sdp></message>";
        let stamped = stamp_from(raw, "1-1@localhost/r1").unwrap();
        assert_eq!(
            stamped,
            "<message to=\"2-1@localhost\" type=\"headline\" from=\"1-1@localhost/r1\"><sdp>v=0&#13;\nx</sdp></message>"
        );
    }
}
