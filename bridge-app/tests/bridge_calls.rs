//! The whole bridge on its embedded default: a phone (SIPp signalling, a
//! GStreamer phone for media) calls a mapped extension and the real SDK in
//! Chromium, signed in as that extension's ConnectyCube user, answers;
//! tones are checked both ways, and every call leaves one CDR line.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{BridgeProcess, BrowserPeer, Phone, sipp, tempdir};

fn cdr_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a CDR line is JSON"))
        .collect()
}

fn wait_for_cdr(path: &std::path::Path, count: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines = cdr_lines(path);
        if lines.len() >= count || std::time::Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_phone_calls_an_app_user_and_both_hear_each_other() {
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut alice = BrowserPeer::start(&sandbox, "alice", "demo", 660);
    alice.command(json!({"op": "autoAnswer", "on": true}));

    let phone = Phone::new("PCMU", 0, 8000, 440);
    let phone_port = phone.port().to_string();
    let address = bridge.address();
    let signalling = std::thread::spawn(move || {
        sipp(
            "call.xml",
            &address,
            "alice",
            &[
                "-d",
                "8000",
                "-cid_str",
                "to-alice-%u",
                "-key",
                "pt",
                "0",
                "-key",
                "rtpmap",
                "PCMU/8000",
                "-key",
                "phone_port",
                &phone_port,
            ],
        )
    });
    phone.call(bridge.media_port("to-alice-1"));
    let incoming = alice.wait_event("incoming call", Duration::from_secs(15));
    assert!(
        incoming.contains("callerNumber"),
        "userInfo names the caller: {incoming}"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (mut app_heard, mut phone_heard) = (None, None);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        app_heard = alice.command(json!({"op": "frequency"})).as_f64();
        phone_heard = phone.heard_frequency();
        let near = |f: Option<f64>, hz: f64| f.is_some_and(|f| (f - hz).abs() < hz * 0.03);
        if near(app_heard, 440.0) && near(phone_heard, 660.0) {
            break;
        }
    }
    assert!(
        app_heard.is_some_and(|f| (f - 440.0).abs() < 15.0),
        "the app heard {app_heard:?} instead of the phone's 440 Hz\n{:#?}",
        bridge.logs()
    );
    assert!(
        phone_heard.is_some_and(|f| (f - 660.0).abs() < 20.0),
        "the phone heard {phone_heard:?} instead of the app's 660 Hz"
    );
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the SIP call: {output}");
    alice.wait_event("hung up", Duration::from_secs(10));

    let lines = wait_for_cdr(&cdr, 1);
    let line = lines
        .iter()
        .find(|l| l["call_id"] == "to-alice-1")
        .expect("a CDR line");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["sip_codec"], "PCMU");
    assert_eq!(line["app_codec"], "OPUS");
    assert_eq!(line["media"], "transcoded");
    assert!(
        line["cause"].as_str().unwrap().contains("caller hung up"),
        "{line}"
    );
    assert!(
        line["rtp"]["packets_received"].as_u64().unwrap() > 100,
        "{line}\n{:#?}",
        bridge.logs()
    );
}
