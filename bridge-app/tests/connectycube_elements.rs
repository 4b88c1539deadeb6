//! connectycubesrc answering calls, in this process, against hostile and
//! real callers: an offer with unusable SDP is rejected with its reason and
//! the element keeps waiting; a real browser's call is then answered.

mod support;

use std::time::Duration;

use bridge_protocol::connectycube::UserCredentials;
use bridge_protocol::connectycube::rest::RestClient;
use bridge_protocol::connectycube::signaling::{CallSignal, CallType, SignalType};
use gst::prelude::*;
use serde_json::json;
use support::{BrowserPeer, RustUser, SandboxProcess, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_offer_is_rejected_and_the_next_call_answered() {
    gst::init().unwrap();
    gstsipcc::register().unwrap();
    let sandbox = SandboxProcess::start(free_port());
    let pipeline = gst::parse::launch(&format!(
        "connectycubesrc app-id=1 auth-key=sandbox login=ear password=e answer-timeout=60 \
         api-url=\"http://127.0.0.1:{port}\" chat-url=\"ws://localhost:{port}/ws\" chat-domain=localhost \
         ! fakesink async=false",
        port = sandbox.port
    ))
    .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    // The element signs in (creating its user) before anyone can call it.
    let mut mallory =
        RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "mallory", "m").await;
    // Signing in as the element's user finds it (or creates it, the element reusing it).
    let ear = RestClient::new(&sandbox.api_url(), support::app())
        .create_session(&UserCredentials::Login {
            login: "ear".into(),
            password: "e".into(),
        })
        .await
        .expect("ear's session")
        .user_id;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut call = CallSignal::new(
        SignalType::Call,
        "bad-1",
        CallType::Audio,
        mallory.user_id,
        vec![ear],
    );
    call.sdp = Some("v=0\r\nthis is not a session description\r\n".into());
    mallory.send_signal(ear, &call);
    let rejected = mallory
        .signal(Duration::from_secs(10), |s| {
            s.signal.signal_type == SignalType::Reject
        })
        .await;
    assert_eq!(rejected.signal.session_id, "bad-1");
    let reason = &rejected
        .signal
        .user_info
        .iter()
        .find(|(k, _)| k == "reason")
        .unwrap()
        .1;
    assert!(reason.contains("unusable offer"), "{reason}");

    // Still waiting: a real browser's call is answered.
    let url = format!("http://localhost:{}/", sandbox.port);
    let accepted = tokio::task::spawn_blocking(move || {
        let mut carol = BrowserPeer::start(&url, "carol", "c", 440);
        carol.command(json!({"op": "call", "to": "ear"}));
        carol.wait_event("accepted", Duration::from_secs(15))
    })
    .await
    .unwrap();
    assert!(accepted.contains(&format!("by {ear}")), "{accepted}");
    pipeline.set_state(gst::State::Null).unwrap();
}
