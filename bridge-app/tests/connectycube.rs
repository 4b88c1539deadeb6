//! The ConnectyCube client against the sandbox (the real `sip-cc-bridge
//! sandbox` process), and against the real SDK in Chromium: signalling both
//! ways, hostile input, and reconnection after the sandbox restarts.

mod support;

use std::time::Duration;

use bridge_protocol::connectycube::signaling::{CallSignal, CallType, SignalType};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::{BrowserPeer, RustUser, SandboxProcess, free_port};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECOND: Duration = Duration::from_secs(1);

/// A browser-like audio offer (the SDK stores it until the user answers).
const OFFER: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
a=msid-semantic: WMS\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=ice-options:trickle\r\n\
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
a=setup:actpass\r\na=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\n";

#[tokio::test]
async fn rust_users_exchange_call_signals_through_the_sandbox() {
    let sandbox = SandboxProcess::start(free_port());
    let alice = RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "alice", "a").await;
    let mut bob = RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "bob", "b").await;
    let mut call = CallSignal::new(
        SignalType::Call,
        "s-1",
        CallType::Audio,
        alice.user_id,
        vec![bob.user_id],
    );
    call.sdp = Some(OFFER.into());
    call.user_info = vec![("name".into(), "Alice <desk>".into())];
    alice.send_signal(bob.user_id, &call);
    let received = bob
        .signal(5 * SECOND, |s| s.signal.signal_type == SignalType::Call)
        .await;
    assert_eq!(
        received.from_user_id, alice.user_id,
        "the sandbox stamps from"
    );
    assert_eq!(received.signal, call, "delivered byte for byte, CRLF kept");
}

#[tokio::test]
async fn bad_rest_bodies_get_clear_errors() {
    let sandbox = SandboxProcess::start(free_port());
    let http = reqwest::Client::new();
    let url = format!("{}/session.json", sandbox.api_url());
    let post = |body: String| {
        http.post(&url)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };

    let answer = post("{not json".into()).await.unwrap();
    assert_eq!(answer.status(), 400);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert!(
        body["errors"]["base"][0]
            .as_str()
            .unwrap()
            .contains("not JSON")
    );

    let wrong_key =
        json!({"application_id": 1, "auth_key": "nope", "user": {"login": "x", "password": "y"}});
    assert_eq!(post(wrong_key.to_string()).await.unwrap().status(), 401);
    let no_password = json!({"application_id": 1, "auth_key": "sandbox", "user": {"login": "x"}});
    assert_eq!(post(no_password.to_string()).await.unwrap().status(), 422);
    assert_eq!(post("x".repeat(100_000)).await.unwrap().status(), 413);

    let expired = http
        .get(&url)
        .header("CB-Token", "made-up")
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 401);
    let body: serde_json::Value = expired.json().await.unwrap();
    assert_eq!(
        body,
        json!({"errors": {"base": ["Required session does not exist"]}})
    );
}

/// Malformed push subscriptions, events and REST rejects get an error
/// naming what is wrong; an event nobody can receive gets ConnectyCube's
/// refusal.
#[tokio::test]
async fn bad_push_requests_get_clear_errors() {
    let sandbox = SandboxProcess::start(free_port());
    let alice = RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "alice", "a").await;
    let token = alice.session.session().await.unwrap().token;
    let http = reqwest::Client::new();
    let post = |route: &str, body: serde_json::Value| {
        http.post(format!("{}/{route}", sandbox.api_url()))
            .header("CB-Token", &token)
            .json(&body)
            .send()
    };
    let refusal = |route: &'static str, body: serde_json::Value| {
        let answer = post(route, body);
        async move {
            let answer = answer.await.unwrap();
            let status = answer.status().as_u16();
            let body: serde_json::Value = answer.json().await.unwrap();
            (
                status,
                body["errors"]["base"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
    };
    let event = |event: serde_json::Value| json!({ "event": event });
    let valid = json!({
        "notification_type": "push",
        "environment": "production",
        "user": {"ids": alice.user_id.to_string()},
        "message": "e30=",
    });
    let with = |key: &str, value: serde_json::Value| {
        let mut changed = valid.clone();
        changed[key] = value;
        event(changed)
    };
    for (body, expected) in [
        (
            with("notification_type", json!("email")),
            "notification_type",
        ),
        (with("environment", json!("staging")), "environment"),
        (with("user", json!({"ids": "one,two"})), "user.ids"),
        (with("user", json!({})), "user.ids"),
        (with("message", json!("not base64!")), "base64"),
        (json!({"no": "event"}), "notification_type"),
        (event(valid.clone()), "No one can receive the message"),
    ] {
        let (status, message) = refusal("events.json", body.clone()).await;
        assert_eq!(status, 422, "{body}: {message}");
        assert!(message.contains(expected), "{body}: {message}");
    }
    let (status, message) = refusal(
        "subscriptions.json",
        json!({"notification_channel": "pigeon", "push_token": {"environment": "production"},
               "device": {"platform": "ios", "udid": "x"}}),
    )
    .await;
    assert_eq!(
        (status, message.contains("pigeon")),
        (422, true),
        "{message}"
    );
    let (status, message) = refusal(
        "subscriptions.json",
        json!({"notification_channel": "web", "push_token": {"environment": "production"},
               "device": {"platform": "web", "udid": "x"}}),
    )
    .await;
    assert_eq!(status, 422);
    assert!(message.contains("push_token.web_endpoint"), "{message}");
    // The sandbox posts to web endpoints itself: none off this machine.
    let (status, message) = refusal(
        "subscriptions.json",
        json!({"notification_channel": "web",
               "push_token": {"environment": "production", "web_endpoint": "http://192.0.2.1/x"},
               "device": {"platform": "web", "udid": "x"}}),
    )
    .await;
    assert_eq!(status, 422);
    assert!(message.contains("this machine"), "{message}");
    for (body, expected) in [
        (json!({"recipientId": 1}), "sessionID"),
        (json!({"sessionID": "s", "recipientId": "x"}), "recipientId"),
        (
            json!({"sessionID": "s", "recipientId": 1, "userInfo": {"a b": "c"}}),
            "a b",
        ),
    ] {
        let (status, message) = refusal("calls/reject.json", body.clone()).await;
        assert_eq!(status, 422, "{body}: {message}");
        assert!(message.contains(expected), "{body}: {message}");
    }
    let unknown = http
        .post(format!("{}/events.json", sandbox.api_url()))
        .header("CB-Token", "made-up")
        .json(&event(valid))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 401);
}

async fn raw_chat(
    sandbox: &SandboxProcess,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut request = sandbox.chat_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "xmpp".parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "xmpp");
    socket
}

async fn next_text(
    socket: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Option<String> {
    loop {
        match tokio::time::timeout(5 * SECOND, socket.next())
            .await
            .ok()??
        {
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn hostile_stanzas_end_only_their_own_stream() {
    let sandbox = SandboxProcess::start(free_port());
    let alice = RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "alice", "a").await;
    let mut bob = RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "bob", "b").await;

    // Unclosed XML: a stream error, then the stream is closed.
    let mut socket = raw_chat(&sandbox).await;
    socket.send(Message::text("<open xmlns=\"urn:ietf:params:xml:ns:xmpp-framing\" to=\"localhost\" version=\"1.0\"/>")).await.unwrap();
    assert!(next_text(&mut socket).await.unwrap().starts_with("<open"));
    assert!(next_text(&mut socket).await.unwrap().contains("PLAIN"));
    socket
        .send(Message::text("<message to='1001-1@localhost'><body>"))
        .await
        .unwrap();
    assert!(
        next_text(&mut socket)
            .await
            .unwrap()
            .contains("not-well-formed")
    );
    assert!(next_text(&mut socket).await.unwrap().starts_with("<close"));

    // A message before authenticating: refused, stream closed.
    let mut socket = raw_chat(&sandbox).await;
    socket
        .send(Message::text(format!(
            "<message to='{}-1@localhost' type='headline'/>",
            bob.user_id
        )))
        .await
        .unwrap();
    assert!(
        next_text(&mut socket)
            .await
            .unwrap()
            .contains("not-authorized")
    );

    // Wrong password: SASL failure, and the connection can try again.
    let mut socket = raw_chat(&sandbox).await;
    socket.send(Message::text("<open xmlns=\"urn:ietf:params:xml:ns:xmpp-framing\" to=\"localhost\" version=\"1.0\"/>")).await.unwrap();
    next_text(&mut socket).await;
    next_text(&mut socket).await;
    use base64::Engine;
    let plain =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{}-1\0wrong", bob.user_id));
    socket
        .send(Message::text(format!(
            "<auth xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\" mechanism=\"PLAIN\">{plain}</auth>"
        )))
        .await
        .unwrap();
    assert!(
        next_text(&mut socket)
            .await
            .unwrap()
            .contains("not-authorized")
    );

    // A huge frame: the connection is dropped.
    let mut socket = raw_chat(&sandbox).await;
    let _ = socket
        .send(Message::text(format!(
            "<message>{}</message>",
            "x".repeat(400_000)
        )))
        .await;
    assert_eq!(next_text(&mut socket).await, None);

    // Meanwhile the signed-in users are untouched.
    let hang_up = CallSignal::new(
        SignalType::HangUp,
        "s-2",
        CallType::Audio,
        alice.user_id,
        vec![bob.user_id],
    );
    alice.send_signal(bob.user_id, &hang_up);
    let received = bob
        .signal(5 * SECOND, |s| s.signal.signal_type == SignalType::HangUp)
        .await;
    assert_eq!(received.from_user_id, alice.user_id);
}

#[tokio::test]
async fn the_client_reconnects_after_the_sandbox_restarts() {
    let port = free_port();
    let sandbox = SandboxProcess::start(port);
    let mut alice = RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "alice", "a").await;
    drop(sandbox);
    let offline = tokio::time::timeout(10 * SECOND, alice.events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            offline,
            bridge_protocol::connectycube::xmpp::ChatEvent::Offline { .. }
        ),
        "{offline:?}"
    );

    let sandbox = SandboxProcess::start(port);
    let online = tokio::time::timeout(40 * SECOND, async {
        loop {
            match alice.events.recv().await {
                Some(bridge_protocol::connectycube::xmpp::ChatEvent::Online { jid }) => return jid,
                Some(_) => continue,
                None => panic!("chat ended"),
            }
        }
    })
    .await
    .expect("alice back online after the restart");
    let alice_id = bridge_protocol::connectycube::signaling::user_id_from_jid(&online).unwrap();

    // Signals reach her again.
    let bob = RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "bob", "b").await;
    let hang_up = CallSignal::new(
        SignalType::HangUp,
        "s-3",
        CallType::Audio,
        bob.user_id,
        vec![alice_id],
    );
    bob.send_signal(alice_id, &hang_up);
    let received = alice
        .signal(5 * SECOND, |s| s.signal.signal_type == SignalType::HangUp)
        .await;
    assert_eq!(received.from_user_id, bob.user_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_calls_the_rust_client_and_is_called_by_it() {
    let sandbox = SandboxProcess::start(free_port());
    let sandbox_url = format!("http://localhost:{}/", sandbox.port);
    let mut dave = RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "dave", "d").await;
    let url = sandbox_url.clone();
    let mut carol =
        tokio::task::spawn_blocking(move || BrowserPeer::start(&url, "carol", "c", 440))
            .await
            .unwrap();

    // The browser calls: the Rust client sees the SDK's offer, and rejects with a reason.
    let dave_id = dave.user_id;
    let carol = tokio::task::spawn_blocking(move || {
        carol.command(json!({"op": "call", "to": dave_id, "userInfo": {"from": "carol"}}));
        carol
    })
    .await
    .unwrap();
    let call = dave
        .signal(10 * SECOND, |s| s.signal.signal_type == SignalType::Call)
        .await;
    assert_eq!(call.from_user_id, carol.user_id);
    assert_eq!(call.signal.caller_id, carol.user_id);
    let offer = call.signal.sdp.clone().unwrap();
    assert!(
        offer.contains("m=audio") && offer.contains("a=ice-options:trickle"),
        "{offer}"
    );
    assert!(
        call.signal
            .user_info
            .contains(&("from".into(), "carol".into()))
    );
    let mut reject = CallSignal::new(
        SignalType::Reject,
        &call.signal.session_id,
        CallType::Audio,
        carol.user_id,
        vec![dave.user_id],
    );
    reject.user_info = vec![("reason".into(), "busy".into())];
    dave.send_signal(carol.user_id, &reject);
    let mut carol = carol;
    let detail = tokio::task::spawn_blocking(move || {
        let detail = carol.wait_event("rejected", 10 * SECOND);
        (carol, detail)
    })
    .await
    .unwrap();
    let (mut carol, detail) = detail;
    assert!(
        detail.contains(&format!("by {}", dave.user_id)) && detail.contains("busy"),
        "{detail}"
    );

    // The Rust client calls: the browser rings, and rejects.
    carol.command(json!({"op": "rejectNext", "userInfo": {"busy": true}}));
    let mut call = CallSignal::new(
        SignalType::Call,
        "rust-call-1",
        CallType::Audio,
        dave.user_id,
        vec![carol.user_id],
    );
    call.sdp = Some(OFFER.into());
    dave.send_signal(carol.user_id, &call);
    let rejected = dave
        .signal(10 * SECOND, |s| s.signal.signal_type == SignalType::Reject)
        .await;
    assert_eq!(rejected.from_user_id, carol.user_id);
    assert_eq!(rejected.signal.session_id, "rust-call-1");
    assert!(
        rejected
            .signal
            .user_info
            .contains(&("busy".into(), "true".into()))
    );
    let incoming =
        tokio::task::spawn_blocking(move || carol.wait_event("incoming call", 5 * SECOND))
            .await
            .unwrap();
    assert!(
        incoming.contains(&format!("from {}", dave.user_id)),
        "{incoming}"
    );
}
