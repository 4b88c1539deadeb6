//! The whole bridge on its embedded default: a phone (SIPp signalling, a
//! GStreamer phone for media) calls a mapped extension and the real SDK in
//! Chromium, signed in as that extension's ConnectyCube user, answers;
//! tones are checked both ways, and every call leaves one CDR line.

mod support;

use std::time::Duration;

use bridge_protocol::connectycube::signaling::{CallSignal, SignalType};
use gst::prelude::*;
use serde_json::{Value, json};
use support::{
    Baresip, BridgeProcess, Browser, BrowserPeer, Dnsmasq, KamailioProcess, NftTable, Phone,
    PhoneCodec, PushEndpoint, VideoPhone, dial, phone_call, phone_call_with, post_as, sipp,
    sipp_server, tempdir, wav_frequency,
};

/// One call at a time: each test drives a Chromium and a bridge, and on two
/// cores several at once starve the WebRTC connections they measure.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Alice in Chromium on the bridge's sandbox, her microphone a 660 Hz tone,
/// answering every call by herself when `auto_answer`.
fn alice_answering(bridge: &BridgeProcess, auto_answer: bool) -> BrowserPeer {
    alice_answering_in(Browser::Chromium, bridge, auto_answer)
}

/// The same in `browser`.
fn alice_answering_in(browser: Browser, bridge: &BridgeProcess, auto_answer: bool) -> BrowserPeer {
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut alice = BrowserPeer::start_in(browser, &sandbox, "alice", "demo", 660);
    alice.command(json!({"op": "autoAnswer", "on": auto_answer}));
    alice
}

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
    let _serial = one_at_a_time();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    let mut alice = alice_answering(&bridge, true);

    let (phone, signalling) = phone_call(&bridge, "call.xml", "alice", PCMU_440, 10, "to-alice");
    let incoming = alice.wait_event("incoming call", Duration::from_secs(15));
    assert!(
        incoming.contains("callerNumber"),
        "userInfo names the caller: {incoming}"
    );

    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    // Alice answers the phone's voice menu on her keypad: the digits reach
    // the phone as RFC 4733 events, in order.
    alice.command(json!({"op": "dtmf", "tones": "1#9"}));
    assert_eq!(phone.wait_for_digits(3), "1#9", "{:#?}", bridge.logs());
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
    // The bridge asked for what a PCMU phone plays, and the browser's
    // encoder sent no more.
    assert_eq!(line["app_audio_bandwidth"], "narrowband", "{line}");
    assert!(
        line["cause"].as_str().unwrap().contains("caller hung up"),
        "{line}"
    );
    assert!(
        line["rtp"]["packets_received"].as_u64().unwrap() > 100,
        "{line}\n{:#?}",
        bridge.logs()
    );
    // How long the bridge held the audio each way, measured on real packets.
    for direction in ["to_app", "to_phone"] {
        let latency = &line["latency_ms"][direction];
        let (p50, p99) = (latency["p50"].as_f64(), latency["p99"].as_f64());
        assert!(
            p50.is_some_and(|ms| ms > 0.0) && p99 >= p50,
            "{direction}: {latency} in {line}"
        );
    }
}

/// A softphone offering the RTCP feedback profile (RFC 4585), as Linphone
/// does with AVPF on: the call was refused with 488 before.
#[test]
fn a_phone_offering_rtcp_feedback_reaches_an_app_user() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    let mut alice = alice_answering(&bridge, true);
    let (phone, signalling) = phone_call_with(
        &bridge,
        "call.xml",
        "alice",
        PCMU_440,
        8,
        "avpf",
        &["-key", "profile", "RTP/AVPF"],
    );
    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the RTP/AVPF call: {output}");
}

/// A phone calls an app user whose app is not running (a mobile app in the
/// background, or closed): the call also goes out as a push notification
/// to her subscribed device, `startCall` with what ConnectyCube's call-kit
/// apps read. The app it woke signs in, gets the call the bridge keeps
/// sending, answers, and both hear each other; an answered call pushes no
/// `endCall`. A call the phone gives up on while the app rings pushes
/// `endCall` for its session, so the devices it woke stop ringing.
#[test]
fn a_push_wakes_an_app_user_who_was_not_online_and_she_answers() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    let (device, _) = alices_subscribed_device(&bridge);

    let (phone, signalling) = dial(&bridge, "call.xml", "alice", PCMU_440, 8, "woken", &[]);
    let start = device.wait_for("startCall", Duration::from_secs(10));
    let session = start["session_id"]
        .as_str()
        .expect("a session id")
        .to_owned();
    assert_eq!(start["uuid"], session, "{start}");
    assert_eq!(start["ios_voip"], 1, "{start}");
    assert_eq!(start["call_type"], 2, "audio: {start}");
    assert_eq!(start["callType"], "audio", "{start}");
    assert_eq!(start["caller_name"], "sipp", "{start}");
    assert_eq!(start["message"], "Incoming audio call from sipp", "{start}");
    let alice_id = start["call_opponents"].as_str().unwrap_or_default();
    assert!(alice_id.parse::<u64>().is_ok(), "{start}");

    // Woken, the app signs in and answers the call the bridge sends again.
    let mut alice = alice_answering(&bridge, true);
    let incoming = alice.wait_event("incoming call", Duration::from_secs(15));
    assert!(
        incoming.contains(&format!("from {}", start["caller_id"])),
        "{incoming} after {start}"
    );
    phone.call(bridge.media_port("woken-1"));
    let (app_heard, phone_heard) = both_hear(&mut alice, &phone, (440.0, 660.0));
    let near = |heard: Option<f64>, hz: f64| heard.is_some_and(|f| (f - hz).abs() < hz * 0.03);
    assert!(
        near(app_heard, 440.0) && near(phone_heard, 660.0),
        "the app heard {app_heard:?}, the phone {phone_heard:?}"
    );
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the SIP call: {output}");
    alice.wait_event("hung up", Duration::from_secs(10));

    // The phone gives up while the app rings: the woken devices stop.
    alice.command(json!({"op": "autoAnswer", "on": false}));
    let (success, output) = sipp(
        "cancel.xml",
        &bridge.address(),
        "alice",
        &["-cid_str", "given-up-%u"],
    );
    assert!(success, "CANCEL → 487: {output}");
    let end = device.wait_for("endCall", Duration::from_secs(10));
    let pushed = device.received();
    let starts: Vec<&Value> = pushed
        .iter()
        .filter(|p| p["signal_type"] == "startCall")
        .collect();
    assert_eq!(starts.len(), 2, "{pushed:#?}");
    assert_eq!(end["session_id"], starts[1]["session_id"], "{pushed:#?}");
    assert_eq!(end["message"], "Missed call from sipp", "{end}");
    assert!(end.get("ios_voip").is_none(), "{end}");
    let ends = pushed.iter().filter(|p| p["signal_type"] == "endCall");
    assert_eq!(
        ends.count(),
        1,
        "no endCall for the answered call: {pushed:#?}"
    );
}

/// The app user declines on the call screen the push brought up while her
/// app is closed: the app, with no chat, rejects by REST
/// (`/calls/reject.json`, the SDK's `callRejectRequest`), the reject
/// reaches the bridge as a signal naming only its session, and the phone
/// gets 486 for a busy reject. The app ended the call itself: no `endCall`.
#[test]
fn a_closed_app_declining_from_its_call_screen_refuses_the_call() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    let (device, api_url) = alices_subscribed_device(&bridge);
    let address = bridge.address();
    let phone = std::thread::spawn(move || {
        sipp("busy.xml", &address, "alice", &["-cid_str", "declined-%u"])
    });
    let start = device.wait_for("startCall", Duration::from_secs(10));
    let reject = json!({
        "sessionID": start["session_id"],
        "recipientId": start["caller_id"],
        "platform": "ios",
        "userInfo": {"busy": "true"},
    });
    let (status, body) = post_as(&api_url, ("alice", "demo"), "calls/reject.json", reject);
    assert_eq!(status, 200, "{body}");
    let (success, output) = phone.join().unwrap();
    assert!(success, "reject → 486: {output}\n{:#?}", bridge.logs());
    std::thread::sleep(Duration::from_millis(500));
    let pushed = device.received();
    assert!(
        !pushed.iter().any(|p| p["signal_type"] == "endCall"),
        "{pushed:#?}"
    );
}

/// A device of alice's subscribed to the bridge's sandbox for production
/// pushes, and the sandbox's REST address.
fn alices_subscribed_device(bridge: &BridgeProcess) -> (PushEndpoint, String) {
    let device = PushEndpoint::start();
    let api_url = format!("http://127.0.0.1:{}", bridge.sandbox_port);
    device.subscribe(&api_url, "alice", "demo", "production");
    (device, api_url)
}

/// With `call_push = "off"` no call is pushed, and the call goes on.
#[test]
fn no_push_goes_out_when_call_push_is_off() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start_with_environment(
        "127.0.0.1",
        &[],
        &[("CONNECTYCUBE_CALL_PUSH", "off")],
    );
    let (device, _) = alices_subscribed_device(&bridge);
    let (success, output) = sipp(
        "cancel.xml",
        &bridge.address(),
        "alice",
        &["-cid_str", "unpushed-%u"],
    );
    assert!(success, "CANCEL → 487: {output}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(device.received().is_empty(), "{:#?}", device.received());
    assert!(!bridge.logged("startCall"), "{:#?}", bridge.logs());
}

/// A PBX re-bridges an Opus phone's call with an app user, as Asterisk
/// does when it transfers a call itself: the phone's packets come from
/// another source, with another SSRC and timestamps 3 s behind; later the
/// timestamps jump back 3 s again under the same SSRC, the first packet
/// marked (Asterisk with its SSRC kept constant). The app plays on without
/// a gap each time: the bridge goes on with the stream's timeline toward
/// the app, whose browser would otherwise throw the packets away as old
/// (it waits for up to 5 s of them) until the new timestamps caught up.
#[test]
fn an_opus_phone_changing_source_plays_on_at_the_app() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    let mut alice = alice_answering(&bridge, true);
    // Long enough for the hearing check (up to 15 s) and two 4 s windows.
    let (phone, signalling) = phone_call(&bridge, "call.xml", "alice", OPUS_440, 26, "resourced");
    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    for (change, new_ssrc) in [("another SSRC", true), ("the same SSRC, marked", false)] {
        // In samples at the browser's output rate, 48 kHz.
        let mut concealed = || {
            alice.command(json!({"op": "audioStats"}))["concealedSamples"]
                .as_f64()
                .expect("the app receives audio")
        };
        let before = concealed();
        phone.change_source(-3 * 48_000, new_ssrc);
        std::thread::sleep(Duration::from_secs(4));
        let gap_ms = (concealed() - before) / 48.0;
        assert!(
            gap_ms < 1000.0,
            "the app concealed {gap_ms:.0} ms of the 4 s after the phone's timestamps jumped with {change}\n{:#?}",
            bridge.logs()
        );
        let heard = alice.command(json!({"op": "frequency"})).as_f64();
        assert!(
            heard.is_some_and(|f| (f - 440.0).abs() < 15.0),
            "the app hears the phone's 440 Hz after the jump with {change}: {heard:?}"
        );
    }
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the SIP call: {output}");
}

#[test]
fn an_app_users_digits_reach_a_phone_that_takes_only_sip_info() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    let mut alice = alice_answering(&bridge, true);
    // Its SDP has no telephone-event; its Allow lists INFO.
    let (phone, signalling) = phone_call(
        &bridge,
        "call-info-dtmf.xml",
        "alice",
        PCMU_440,
        2,
        "info-dtmf",
    );
    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    alice.command(json!({"op": "dtmf", "tones": "5"}));
    let (success, output) = signalling.join().unwrap();
    assert!(
        success,
        "the phone gets the app's 5 as INFO application/dtmf-relay: {output}\n{:#?}",
        bridge.logs()
    );
    assert_eq!(phone.digits(), "", "and no RFC 4733 event");
}

/// One phone call to alice in `codec`; returns what the app and the phone heard.
fn call_alice(
    bridge: &BridgeProcess,
    alice: &mut BrowserPeer,
    codec: PhoneCodec,
) -> (Option<f64>, Option<f64>) {
    let (name, frequency) = (codec.0, codec.4);
    let hung_up = alice.count_events("hung up");
    let (phone, signalling) = phone_call(
        bridge,
        "call.xml",
        "alice",
        codec,
        6,
        &format!("codec-{name}"),
    );
    let heard = both_hear(alice, &phone, (f64::from(frequency), 660.0));
    let (success, output) = signalling.join().unwrap();
    assert!(success, "{name} call: {output}\n{:#?}", bridge.logs());
    alice.wait_for_more("hung up", hung_up, Duration::from_secs(10));
    heard
}

/// The bridge (with `args`), once it has registered alice's extension at
/// `kamailio`.
fn bridge_registered_at(kamailio: &KamailioProcess, args: &[&str]) -> BridgeProcess {
    let account = format!("alice:alicepw@127.0.0.1:{}", kamailio.port);
    let mut all = vec!["--register", account.as_str()];
    all.extend_from_slice(args);
    let bridge = BridgeProcess::start(&all);
    assert!(
        bridge
            .wait_for_log(
                |l| l.contains("registration alice@") && l.ends_with(": registered"),
                Duration::from_secs(10)
            )
            .is_some(),
        "the bridge registers alice's extension: {:#?}\n{}",
        bridge.logs(),
        kamailio.log()
    );
    bridge
}

/// baresip, registered at Kamailio as carol, calls alice, whose extension
/// the bridge registered there: each of baresip's codecs reaches alice's
/// browser through Kamailio and the bridge, and back, tones checked both ways.
#[test]
fn baresip_calls_an_app_user_through_kamailio_in_each_codec() {
    let _serial = one_at_a_time();
    let kamailio = KamailioProcess::start();
    let bridge = bridge_registered_at(&kamailio, &[]);
    let mut alice = alice_answering(&bridge, true);
    let near = |f: Option<f64>, hz: f64| f.is_some_and(|f| (f - hz).abs() < hz * 0.03);
    for (codec, frequency, encoding_name) in [
        ("g711", 523, "PCMU"),
        ("g722", 740, "G722"),
        ("opus", 880, "OPUS"),
    ] {
        let port = kamailio.port;
        let phone = std::thread::spawn(move || {
            let phone = Baresip::new("carol", "carolpw", port, frequency, codec);
            let output = phone.call("alice", 8);
            (phone.heard().and_then(|wav| wav_frequency(&wav)), output)
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(12);
        let mut app_heard = None;
        while std::time::Instant::now() < deadline && !near(app_heard, f64::from(frequency)) {
            std::thread::sleep(Duration::from_millis(500));
            app_heard = alice.command(json!({"op": "frequency"})).as_f64();
        }
        let (phone_heard, output) = phone.join().unwrap();
        assert!(
            near(app_heard, f64::from(frequency)),
            "{codec}: the app heard {app_heard:?} instead of {frequency} Hz\n{output}\n{:#?}",
            bridge.logs()
        );
        assert!(
            near(phone_heard, 660.0),
            "{codec}: baresip heard {phone_heard:?} instead of the app's 660 Hz\n{output}"
        );
        assert!(
            bridge.logged(&format!(": {encoding_name} SendRecv,")),
            "{codec}: a {encoding_name} call leg: {:#?}",
            bridge.logs()
        );
    }
}

#[test]
fn every_sip_codec_is_bridged_to_opus_and_back() {
    let _serial = one_at_a_time();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    let mut alice = alice_answering(&bridge, true);
    let codecs = [
        ("PCMA", 8, 8000, "PCMA/8000", 523),
        ("G722", 9, 8000, "G722/8000", 784),
        ("G729", 18, 8000, "G729/8000", 587),
        ("OPUS", 111, 48000, "opus/48000/2", 880),
    ];
    for codec in codecs {
        let (name, frequency) = (codec.0, codec.4);
        let (app_heard, phone_heard) = call_alice(&bridge, &mut alice, codec);
        assert!(
            app_heard
                .is_some_and(|f| (f - f64::from(frequency)).abs() < f64::from(frequency) * 0.03),
            "{name}: the app heard {app_heard:?}, the phone sent {frequency} Hz"
        );
        assert!(
            phone_heard.is_some_and(|f| (f - 660.0).abs() < 20.0),
            "{name}: the phone heard {phone_heard:?}, the app sent 660 Hz"
        );
    }
    let lines = wait_for_cdr(&cdr, codecs.len());
    for (name, ..) in codecs {
        let line = lines
            .iter()
            .find(|l| l["call_id"] == format!("codec-{name}-1"))
            .unwrap_or_else(|| panic!("no CDR for {name}: {lines:#?}"));
        assert_eq!(line["sip_codec"], name, "{line}");
        let expected = if name == "OPUS" {
            "passthrough"
        } else {
            "transcoded"
        };
        assert_eq!(line["media"], expected, "{line}");
    }
}

#[test]
fn refusals_and_hang_ups_cross_the_bridge() {
    let _serial = one_at_a_time();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&[
        "--cdr",
        cdr.to_str().unwrap(),
        "--no-answer-timeout-ms",
        "4000",
    ]);
    let mut alice = alice_answering(&bridge, false);
    let ok = |(success, output): (bool, String), what: &str| assert!(success, "{what}: {output}");

    // Busy: the app rejects with userInfo {busy: true}.
    alice.command(json!({"op": "rejectNext", "userInfo": {"busy": true}}));
    let busy = sipp(
        "busy.xml",
        &bridge.address(),
        "alice",
        &["-cid_str", "busy-%u"],
    );
    ok(busy, "reject → 486");

    // Nobody answers: 480 to the phone, the app stops ringing.
    let stopped = alice.count_events("hung up");
    ok(
        sipp(
            "no-answer.xml",
            &bridge.address(),
            "alice",
            &["-cid_str", "unanswered-%u"],
        ),
        "no answer → 480",
    );
    alice.wait_for_more("hung up", stopped, Duration::from_secs(10));

    // The phone gives up while the app rings.
    let stopped = alice.count_events("hung up");
    ok(
        sipp(
            "cancel.xml",
            &bridge.address(),
            "alice",
            &["-cid_str", "cancelled-%u"],
        ),
        "CANCEL → 487",
    );
    alice.wait_for_more("hung up", stopped, Duration::from_secs(10));

    // The app answers, then hangs up: BYE with a Reason to the phone.
    alice.command(json!({"op": "autoAnswer", "on": true}));
    let address = bridge.address();
    let phone = std::thread::spawn(move || {
        sipp(
            "app-hangs-up.xml",
            &address,
            "alice",
            &["-cid_str", "app-bye-%u"],
        )
    });
    alice.wait_event("connection", Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(1));
    alice.command(json!({"op": "hangUp"}));
    ok(phone.join().unwrap(), "app hang-up → BYE");

    let lines = wait_for_cdr(&cdr, 4);
    let status = |id: &str| {
        let line = lines
            .iter()
            .find(|l| l["call_id"] == id)
            .unwrap_or_else(|| panic!("no CDR for {id}: {lines:#?}"));
        (
            line["status"].as_u64().unwrap(),
            line["cause"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(status("busy-1").0, 486);
    assert_eq!(status("unanswered-1").0, 480);
    assert_eq!(status("cancelled-1").0, 487);
    let (code, cause) = status("app-bye-1");
    assert_eq!(code, 200);
    assert!(cause.contains("app hung up"), "{cause}");
}

/// The same refusals and hang-ups with a real phone: baresip, registered
/// at Kamailio, calls alice's extension (registered there by the bridge).
/// Each call's CDR line carries the status and cause the phone got.
#[test]
fn baresip_through_kamailio_is_refused_cancelled_and_hung_up_on() {
    let _serial = one_at_a_time();
    let kamailio = KamailioProcess::start();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = bridge_registered_at(
        &kamailio,
        &[
            "--cdr",
            cdr.to_str().unwrap(),
            "--no-answer-timeout-ms",
            "4000",
        ],
    );
    let mut alice = alice_answering(&bridge, false);
    let port = kamailio.port;
    // baresip calls alice and stays `seconds` (hanging up, or cancelling
    // while it rings); the call's CDR line.
    let call = |seconds: u32, count: usize| {
        let phone = Baresip::new("carol", "carolpw", port, 523, "g711");
        let output = phone.call("alice", seconds);
        let lines = wait_for_cdr(&cdr, count);
        let line = lines.last().unwrap().clone();
        (
            line["status"].as_u64().unwrap_or(0),
            line["cause"].as_str().unwrap_or_default().to_owned(),
            output,
        )
    };

    alice.command(json!({"op": "rejectNext", "userInfo": {"busy": true}}));
    let (status, _, output) = call(4, 1);
    assert_eq!(status, 486, "the app rejects as busy: {output}");

    let (status, _, output) = call(8, 2);
    assert_eq!(status, 480, "nobody answers: {output}");

    let stopped = alice.count_events("hung up");
    let (status, _, output) = call(2, 3);
    assert_eq!(
        status, 487,
        "the phone gives up while the app rings: {output}"
    );
    alice.wait_for_more("hung up", stopped, Duration::from_secs(10));

    alice.command(json!({"op": "autoAnswer", "on": true}));
    let stopped = alice.count_events("hung up");
    let (status, cause, output) = call(5, 4);
    assert_eq!(status, 200, "{output}");
    assert!(
        cause.contains("caller hung up"),
        "the phone hangs up: {cause}"
    );
    alice.wait_for_more("hung up", stopped, Duration::from_secs(10));

    let connected = alice.count_events("connection");
    let hang_up = std::thread::spawn(move || {
        alice.wait_for_more("connection", connected, Duration::from_secs(15));
        std::thread::sleep(Duration::from_secs(1));
        alice.command(json!({"op": "hangUp"}));
    });
    let (status, cause, output) = call(10, 5);
    hang_up.join().unwrap();
    assert_eq!(status, 200, "{output}");
    assert!(cause.contains("app hung up"), "the app hangs up: {cause}");
}

/// A phone sending a 440 Hz tone in PCMU.
const PCMU_440: PhoneCodec = ("PCMU", 0, 8000, "PCMU/8000", 440);
const OPUS_440: PhoneCodec = ("OPUS", 111, 48000, "opus/48000/2", 440);

/// The app (its tone 660 Hz) hears the phone's 440 Hz and the phone the
/// app's, within 15 s.
fn assert_each_hears_the_other(bridge: &BridgeProcess, app: &mut BrowserPeer, phone: &Phone) {
    let (app_heard, phone_heard) = both_hear(app, phone, (440.0, 660.0));
    assert!(
        app_heard.is_some_and(|f| (f - 440.0).abs() < 15.0),
        "the app heard {app_heard:?} instead of the phone's 440 Hz\n{:#?}",
        bridge.logs()
    );
    assert!(
        phone_heard.is_some_and(|f| (f - 660.0).abs() < 20.0),
        "the phone heard {phone_heard:?} instead of the app's 660 Hz"
    );
}

/// What the app and the phone hear, once each hears its expected tone
/// (`app_hz`, `phone_hz`), or after 15 s.
fn both_hear(
    app: &mut BrowserPeer,
    phone: &Phone,
    (app_hz, phone_hz): (f64, f64),
) -> (Option<f64>, Option<f64>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (mut app_heard, mut phone_heard) = (None, None);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        app_heard = app.command(json!({"op": "frequency"})).as_f64();
        phone_heard = phone.heard_frequency();
        let near = |f: Option<f64>, hz: f64| f.is_some_and(|f| (f - hz).abs() < hz * 0.03);
        if near(app_heard, app_hz) && near(phone_heard, phone_hz) {
            break;
        }
    }
    (app_heard, phone_heard)
}

/// A desk phone transfers its call with an app user to another phone
/// (REFER, a blind transfer): the bridge calls the target for the app,
/// tells the first phone how it goes (NOTIFY 100, then 200) and lets it go
/// (BYE), and the app and the target hear each other over the WebRTC
/// connection the call already had. The first phone held the call before
/// the transfer, as desk phones do: the target's answer resumes it.
///
/// The first phone speaks Opus, passed through to the app; alice's desk
/// phone only G.711: the bridge offers her the call's codec first, then
/// the others, and transcodes once she answers PCMU, on the app's WebRTC
/// connection as it is.
#[test]
fn a_phone_transfers_its_call_with_an_app_user_to_another_phone() {
    blind_transfer_to_alice("transfer.xml", OPUS_440, "blind", false);
}

/// A transfer to a user with several phones rings them all: her desk
/// phone answers, and her softphone, ringing, is CANCELled with the
/// Reason that it was answered elsewhere.
#[test]
fn a_transfer_rings_every_phone_of_the_target() {
    blind_transfer_to_alice("transfer.xml", PCMU_440, "forked", true);
}

/// Many desk phones hang up as soon as a blind transfer is under way: the
/// call goes on, and the bridge carries the transfer through by itself.
#[test]
fn a_transfer_goes_on_when_the_transferor_hangs_up_at_once() {
    blind_transfer_to_alice("transfer-and-leave.xml", PCMU_440, "leave", false);
}

/// A video phone transfers its call with bob to alice's desk phone with a
/// camera (baresip): the bridge offers her the call's audio and H.264,
/// and once she answers, bob sees her camera and hears her voice, and
/// she sees his, on the WebRTC connection the call already had.
#[test]
fn a_video_call_is_transferred_to_a_phone_with_a_camera() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&["--video", "vp8"]);
    let port = bridge.sip_port;
    let target = std::thread::spawn(move || {
        let phone = Baresip::new("alice", "demo", port, 523, "g711").with_video();
        let output = phone.answer_calls(30);
        (phone.decoded_frame(), output)
    });
    assert_registered(&bridge, "alice");
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut bob = BrowserPeer::start(&sandbox, "bob", "demo", 660);
    bob.command(json!({"op": "autoAnswer", "on": true}));
    // The transferor's camera is off: what bob sees comes from alice.
    let unwatched_video = support::free_even_port().to_string();
    let (phone, transferor) = phone_call_with(
        &bridge,
        "transfer-video.xml",
        "bob",
        PCMU_440,
        8,
        "vtransfer",
        &[
            "-key",
            "refer_to",
            "<sip:alice@127.0.0.1>",
            "-key",
            "video_port",
            &unwatched_video,
            "-aa",
        ],
    );
    assert_each_hears_the_other(&bridge, &mut bob, &phone);
    let (success, output) = transferor.join().unwrap();
    assert!(
        success,
        "the video phone transfers: {output}\n{:#?}",
        bridge.logs()
    );
    drop(phone);
    let app_frames = frames_decoded_by(&mut bob, 30, Duration::from_secs(15));
    let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(10));
    assert_eq!(bob.count_events("hung up"), 0, "bob's call went on");
    bob.command(json!({"op": "hangUp"}));
    let (phone_frame, output) = target.join().unwrap();
    assert!(
        app_heard.is_some_and(|f| (f - 523.0).abs() < 15.0),
        "bob heard {app_heard:?} instead of alice's 523 Hz"
    );
    let context = format!("after the transfer\n{output}\n{:#?}", bridge.logs());
    assert_app_and_baresip_saw_each_other(app_frames, phone_frame, &context);
}

/// The app decoded 30 frames of baresip's camera, and baresip the app's
/// 320x240 picture.
fn assert_app_and_baresip_saw_each_other(
    app_frames: u64,
    phone_frame: Option<(u32, u32)>,
    context: &str,
) {
    assert!(
        app_frames >= 30,
        "the app decoded {app_frames} frames of baresip's camera, {context}"
    );
    assert_eq!(
        phone_frame,
        Some((320, 240)),
        "baresip decoded the app's 320x240 camera, {context}"
    );
}

/// A PBX moves an Opus softphone's call with an app user to a desk phone
/// that speaks only PCMU, by a re-INVITE with the new phone's address and
/// codec (as after a transfer the PBX carried out itself): the bridge
/// goes from passing Opus through to transcoding, on the app's WebRTC
/// connection as it is, and the app and the desk phone hear each other.
#[test]
fn a_call_moved_to_a_phone_of_another_codec_goes_on() {
    let _serial = one_at_a_time();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    let mut alice = alice_answering(&bridge, true);
    let desk = Phone::new("PCMU", 0, 8000, 523);
    let moved_port = desk.port().to_string();
    let (softphone, signalling) = phone_call_with(
        &bridge,
        "moved.xml",
        "alice",
        OPUS_440,
        8,
        "moved",
        &["-key", "moved_port", &moved_port],
    );
    assert_each_hears_the_other(&bridge, &mut alice, &softphone);
    bridge
        .wait_for_log(
            |l| l.contains("call moved-1: the phone's codec is now PCMU"),
            Duration::from_secs(15),
        )
        .unwrap_or_else(|| panic!("the call did not move: {:#?}", bridge.logs()));
    drop(softphone);
    desk.call(bridge.media_port("moved-1"));
    let app_heard = frequency_heard_by(&mut alice, 523.0, Duration::from_secs(10));
    let desk_heard = desk.heard_frequency();
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the re-INVITE is answered in PCMU: {output}");
    assert_heard_each_other(app_heard, desk_heard, " (the desk phone)", &bridge);
    let lines = wait_for_cdr(&cdr, 1);
    assert_eq!(lines[0]["sip_codec"], "PCMU", "{}", lines[0]);
    assert_eq!(lines[0]["media"], "transcoded", "{}", lines[0]);
}

/// A SIPp phone of alice's on a thread of its own: it registers with the
/// bridge (`register`, a scenario with a digest REGISTER), and answers
/// what comes outside that dialog as the scenario `answer` says; its
/// result when `register` ends.
fn alice_sipp_phone(
    bridge: &BridgeProcess,
    register: &'static str,
    answer: &'static str,
    extra_args: &[&str],
) -> std::thread::JoinHandle<(bool, String)> {
    let address = bridge.address();
    let answer = support::repo_root()
        .join("bridge-app/tests/sipp")
        .join(answer);
    let mut args: Vec<String> = ["-au", "alice", "-ap", "demo", "-oocsf"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    args.push(answer.to_str().unwrap().to_owned());
    args.extend(extra_args.iter().map(|a| a.to_string()));
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sipp(register, &address, "alice", &args)
    })
}

/// alice's SIPp phones (`register-device.xml`), each answering as its
/// scenario says with its media at its `phone_port`, registered one after
/// the other.
fn alice_sipp_phones<const N: usize>(
    bridge: &BridgeProcess,
    phones: [(&'static str, String); N],
) -> Vec<std::thread::JoinHandle<(bool, String)>> {
    let mut started = Vec::new();
    for (scenario, phone_port) in phones {
        let args = ["-key", "phone_port", &phone_port];
        started.push(alice_sipp_phone(
            bridge,
            "register-device.xml",
            scenario,
            &args,
        ));
        let registrations = bridge.wait_for_logs(
            |l| l.contains("registrar: alice registered at"),
            started.len(),
            Duration::from_secs(10),
        );
        assert_eq!(
            registrations.len(),
            started.len(),
            "each of alice's phones registers: {:#?}",
            bridge.logs()
        );
    }
    started
}

/// A phone's call to bob in `codec`, transferred (`scenario`) to a desk
/// phone registered with the bridge as alice (G.711): bob and alice hear
/// each other. `softphone`: alice also has a SIPp phone registered, which
/// rings until the bridge CANCELs it as answered elsewhere.
fn blind_transfer_to_alice(
    scenario: &'static str,
    codec: PhoneCodec,
    call_id: &str,
    softphone: bool,
) {
    let _serial = one_at_a_time();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    let softphone = softphone.then(|| {
        let phone = alice_sipp_phone(&bridge, "register-device.xml", "device-rings.xml", &[]);
        assert_registered(&bridge, "alice");
        phone
    });
    let target = Baresip::new("alice", "demo", bridge.sip_port, 523, "g711");
    let target = answering_on_a_thread(target, 30);
    let phones = 1 + usize::from(softphone.is_some());
    let registered = |l: &str| l.contains("registrar: alice registered");
    let registrations = bridge.wait_for_logs(registered, phones, Duration::from_secs(10));
    assert_eq!(registrations.len(), phones, "{:#?}", bridge.logs());
    let mut bob = bob_transferred_by_a_phone(
        &bridge,
        bridge.sandbox_port,
        (scenario, "<sip:alice@127.0.0.1>"),
        codec,
        call_id,
    );
    let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(10));
    bob.command(json!({"op": "hangUp"}));
    assert_phone_and_app_heard_each_other(
        app_heard,
        target.join().unwrap(),
        " after the transfer",
        &bridge,
    );
    assert_transferred(&cdr, &format!("{call_id}-1"), "alice");
    if let Some(softphone) = softphone {
        let (success, output) = softphone.join().unwrap();
        assert!(
            success,
            "alice's softphone rang and was CANCELled as answered elsewhere:\n{output}\n{:#?}",
            bridge.logs()
        );
    }
    let lines = wait_for_cdr(&cdr, 1);
    assert_eq!(lines[0]["sip_codec"], "PCMU", "alice's codec: {}", lines[0]);
    assert_eq!(lines[0]["media"], "transcoded", "{}", lines[0]);
}

/// An attended transfer: the transferor's Refer-To embeds the `Replaces`
/// of its consultation call, which the bridge's INVITE to the target (at
/// the SIP domain) carries, with Referred-By, so that the target's phone
/// swaps that call for this one.
#[test]
fn an_attended_transfer_hands_the_target_its_replaces_header() {
    let _serial = one_at_a_time();
    let dir = tempdir();
    let domain = PhoneAtDomain::new(&dir);
    let bridge = BridgeProcess::start(&["--config", domain.config.to_str().unwrap()]);
    let carol = Phone::new("PCMU", 0, 8000, 523);
    let target = domain.answer(
        "answer-replaced.xml",
        &["-key", "phone_port", &carol.port().to_string()],
    );
    let mut bob = bob_transferred_by_a_phone(
        &bridge,
        domain.sandbox_port,
        (
            "transfer.xml",
            "<sip:carol@pbx.example?Replaces=consult-1%40pc.example%3Bto-tag%3D12%3Bfrom-tag%3D34>",
        ),
        PCMU_440,
        "attended",
    );
    carol.call(bridge.media_port("attended-1"));
    let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(10));
    let carol_heard = carol.heard_frequency();
    bob.command(json!({"op": "hangUp"}));
    let (success, output) = target.join().unwrap();
    assert!(
        success,
        "the target gets Replaces and Referred-By, then BYE: {output}\n{:#?}",
        bridge.logs()
    );
    assert_heard_each_other(app_heard, carol_heard, " (the target)", &bridge);
    assert_transferred(&dir.join("cdr.jsonl"), "attended-1", "carol");
}

/// Attended transfer the other way round: a phone consults app user bob
/// through the bridge, then hands its other party, carol, over to him.
/// Carol's phone sends the bridge an INVITE whose `Replaces` names the
/// consultation call: carol takes that call over, on bob's WebRTC
/// connection as it is, and the consulting phone gets BYE.
#[test]
fn a_phone_takes_over_an_app_users_call_with_replaces() {
    let _serial = one_at_a_time();
    let dir = tempdir();
    let cdr = dir.join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut bob = BrowserPeer::start(&sandbox, "bob", "demo", 660);
    bob.command(json!({"op": "autoAnswer", "on": true}));
    let log = dir.join("consult.log");
    let (consulting, consultation) = phone_call_with(
        &bridge,
        "consult.xml",
        "bob",
        PCMU_440,
        30,
        "consult",
        &["-trace_logs", "-log_file", log.to_str().unwrap()],
    );
    assert_each_hears_the_other(&bridge, &mut bob, &consulting);
    // The consultation call as the bridge knows it: its tag, the phone's.
    let to_tag = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("to-tag=").map(str::to_owned))
        .expect("the consulting phone logged the bridge's tag");
    let replaces = format!("consult-1;to-tag={to_tag};from-tag=consultation");
    let carol = Phone::new("PCMU", 0, 8000, 523);
    let (address, carol_port) = (bridge.address(), carol.port().to_string());
    let takeover = std::thread::spawn(move || {
        let args = ["-d", "8000", "-cid_str", "takeover-%u", "-key", "pt", "0"];
        let keys = [
            "-key",
            "rtpmap",
            "PCMU/8000",
            "-key",
            "phone_port",
            &carol_port,
        ];
        let replaces = ["-key", "replaces", &replaces];
        sipp(
            "replace.xml",
            &address,
            "bob",
            &[&args[..], &keys, &replaces].concat(),
        )
    });
    // Carol is answered on the consultation call's port.
    carol.call(bridge.media_port("consult-1"));
    let (success, output) = consultation.join().unwrap();
    assert!(
        success,
        "the consulting phone gets BYE naming the transfer: {output}\n{:#?}",
        bridge.logs()
    );
    drop(consulting);
    let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(10));
    let carol_heard = carol.heard_frequency();
    assert_eq!(bob.count_events("hung up"), 0, "bob's call went on");
    let (success, output) = takeover.join().unwrap();
    assert!(
        success,
        "carol's call, then her BYE: {output}\n{:#?}",
        bridge.logs()
    );
    assert_heard_each_other(app_heard, carol_heard, " (bob and carol)", &bridge);
    let lines = wait_for_cdr(&cdr, 1);
    assert_eq!(lines.len(), 1, "one call: {lines:?}");
    assert_eq!(lines[0]["transferred_to"], "carol", "{}", lines[0]);
    assert_eq!(lines[0]["cause"], "the caller hung up", "{}", lines[0]);
}

/// The phone an app user called transfers the call: the REFER comes in
/// the dialog the bridge itself began, and the app user reaches the
/// target, a desk phone registered as bob.
#[test]
fn a_phone_an_app_user_called_transfers_the_app_user() {
    let _serial = one_at_a_time();
    let dir = tempdir();
    let domain = PhoneAtDomain::new(&dir);
    let bridge = BridgeProcess::start(&["--config", domain.config.to_str().unwrap()]);
    let target = Baresip::new("bob", "demo", bridge.sip_port, 523, "g711");
    let target = answering_on_a_thread(target, 30);
    assert_registered(&bridge, "bob");
    // alice's phone, at the SIP domain: answers, then transfers to bob.
    let silent_port = support::free_even_port().to_string();
    let transferor = domain.answer(
        "answer-and-transfer.xml",
        &["-key", "phone_port", &silent_port, "-d", "3000", "-aa"],
    );
    let sandbox = format!("http://localhost:{}/", domain.sandbox_port);
    let mut carol = BrowserPeer::start(&sandbox, "carol", "demo", 660);
    carol.command(json!({"op": "call", "to": "alice"}));
    carol.wait_event("accepted", Duration::from_secs(15));
    let (success, output) = transferor.join().unwrap();
    assert!(
        success,
        "the transferor hears 202, NOTIFY 100 and 200, then BYE: {output}\n{:#?}",
        bridge.logs()
    );
    let app_heard = frequency_heard_by(&mut carol, 523.0, Duration::from_secs(10));
    assert_eq!(carol.count_events("hung up"), 0, "the app's call went on");
    carol.command(json!({"op": "hangUp"}));
    assert_phone_and_app_heard_each_other(
        app_heard,
        target.join().unwrap(),
        " after the transfer",
        &bridge,
    );
    let lines = wait_for_cdr(&dir.join("cdr.jsonl"), 1);
    assert_eq!(lines[0]["transferred_to"], "bob", "{}", lines[0]);
}

/// A colleague picks up alice's ringing desk phone (a call-pickup key): its
/// INVITE names the bridge's early dialog with that phone in `Replaces`.
/// The bridge answers it for the app user who called, and CANCELs the
/// ringing phone; the app user and the colleague hear each other.
#[test]
fn an_apps_ringing_call_is_picked_up_by_another_phone() {
    let _serial = one_at_a_time();
    let dir = tempdir();
    let domain = PhoneAtDomain::new(&dir);
    let bridge = BridgeProcess::start(&["--config", domain.config.to_str().unwrap()]);
    let log = dir.join("ringing.log");
    let ringing = domain.answer(
        "ring-picked-up.xml",
        &["-trace_logs", "-log_file", log.to_str().unwrap()],
    );
    let sandbox = format!("http://localhost:{}/", domain.sandbox_port);
    let mut dave = BrowserPeer::start(&sandbox, "dave", "demo", 660);
    dave.command(json!({"op": "call", "to": "alice"}));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let replaces = loop {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(value) = logged.lines().find_map(|l| l.strip_prefix("replaces=")) {
            break value.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice's phone never rang: {:#?}",
            bridge.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let call_id = replaces.split(';').next().unwrap().to_owned();
    let colleague = Phone::new("PCMU", 0, 8000, 523);
    let (address, colleague_port) = (bridge.address(), colleague.port().to_string());
    let pickup = std::thread::spawn(move || {
        let args = ["-d", "6000", "-cid_str", "pickup-%u", "-key", "pt", "0"];
        let keys = [
            "-key",
            "rtpmap",
            "PCMU/8000",
            "-key",
            "phone_port",
            &colleague_port,
        ];
        let replaces = ["-key", "replaces", &replaces];
        sipp(
            "replace.xml",
            &address,
            "alice",
            &[&args[..], &keys, &replaces].concat(),
        )
    });
    dave.wait_event("accepted", Duration::from_secs(15));
    colleague.call(bridge.media_port(&call_id));
    let app_heard = frequency_heard_by(&mut dave, 523.0, Duration::from_secs(10));
    let colleague_heard = colleague.heard_frequency();
    let (success, output) = ringing.join().unwrap();
    assert!(
        success,
        "the ringing phone is CANCELled: {output}\n{:#?}",
        bridge.logs()
    );
    let (success, output) = pickup.join().unwrap();
    assert!(success, "the colleague's call, then BYE: {output}");
    assert_heard_each_other(
        app_heard,
        colleague_heard,
        " (dave and the colleague)",
        &bridge,
    );
}

/// Bob, in Chromium, answers a phone's call in `codec` (at 440 Hz); the
/// phone holds it and transfers him to `refer_to` with `scenario`
/// (`transfer.xml`, or `transfer-and-leave.xml`; both first try a
/// Refer-To that is not a SIP URI, and get 400). Returns bob once the
/// transferor is done.
fn bob_transferred_by_a_phone(
    bridge: &BridgeProcess,
    sandbox_port: u16,
    (scenario, refer_to): (&'static str, &str),
    codec: PhoneCodec,
    call_id: &str,
) -> BrowserPeer {
    let sandbox = format!("http://localhost:{sandbox_port}/");
    let mut bob = BrowserPeer::start(&sandbox, "bob", "demo", 660);
    bob.command(json!({"op": "autoAnswer", "on": true}));
    let (phone, transferor) = phone_call_with(
        bridge,
        scenario,
        "bob",
        codec,
        8,
        call_id,
        // -aa: a NOTIFY that crosses a transferor's BYE gets its 200.
        &["-key", "refer_to", refer_to, "-aa"],
    );
    assert_each_hears_the_other(bridge, &mut bob, &phone);
    let (success, output) = transferor.join().unwrap();
    assert!(
        success,
        "the transferor ({scenario}): {output}\n{:#?}",
        bridge.logs()
    );
    // It hung up, or was hung up on: a phone stops sending then.
    drop(phone);
    assert_eq!(
        bob.count_events("hung up"),
        0,
        "the app's call went on: {:#?}",
        bridge.logs()
    );
    bob
}

/// The call's CDR line names the target, and the app's hang-up as the end.
fn assert_transferred(cdr: &std::path::Path, call_id: &str, target: &str) {
    let lines = wait_for_cdr(cdr, 1);
    let line = lines
        .iter()
        .find(|l| l["call_id"] == call_id)
        .expect("a CDR line");
    assert_eq!(line["transferred_to"], target, "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert!(
        line["cause"].as_str().unwrap().contains("the app hung up"),
        "{line}"
    );
}

/// While the bridge drains (stopping with `--drain-timeout-s`), an app's
/// new call to a phone is refused with the reason, and the call in
/// progress goes on until its phone hangs up; then the bridge exits.
#[test]
fn a_draining_bridge_refuses_an_apps_new_call_and_keeps_the_one_in_progress() {
    let _serial = one_at_a_time();
    let mut bridge = BridgeProcess::start(&["--drain-timeout-s", "60"]);
    // alice's desk phone, where an app's call to alice would ring.
    let desk = Baresip::new("alice", "demo", bridge.sip_port, 523, "g711");
    let desk = answering_on_a_thread(desk, 15);
    assert_registered(&bridge, "alice");
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut bob = BrowserPeer::start(&sandbox, "bob", "demo", 660);
    bob.command(json!({"op": "autoAnswer", "on": true}));
    let (phone, signalling) = phone_call(&bridge, "call.xml", "bob", PCMU_440, 10, "drain");
    assert_each_hears_the_other(&bridge, &mut bob, &phone);

    bridge.signal("TERM");
    assert!(
        bridge
            .wait_for_log(|l| l.contains("draining: "), Duration::from_secs(5))
            .is_some(),
        "{:#?}",
        bridge.logs()
    );
    let mut carol = BrowserPeer::start(&sandbox, "carol", "demo", 660);
    carol.command(json!({"op": "call", "to": "alice"}));
    let refused = carol.wait_event("rejected", Duration::from_secs(15));
    assert!(
        refused.contains("the bridge is stopping") && refused.contains("503"),
        "{refused}"
    );
    assert_eq!(
        bob.count_events("hung up"),
        0,
        "the call in progress went on"
    );
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the call in progress, to its BYE: {output}");
    assert_eq!(
        bridge.exited_within(Duration::from_secs(10)),
        Some(true),
        "the bridge exits once its last call ended: {:#?}",
        bridge.logs()
    );
    let (_, desk_output) = desk.join().unwrap();
    assert!(
        !bridge.logged("calls sip:alice"),
        "the desk phone was not called: {desk_output}"
    );
}

/// What the app hears, polled until it is within 15 Hz of `hz` or `within`
/// has passed (then the last reading).
fn frequency_heard_by(app: &mut BrowserPeer, hz: f64, within: Duration) -> Option<f64> {
    let deadline = std::time::Instant::now() + within;
    let mut heard = None;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        heard = app.command(json!({"op": "frequency"})).as_f64();
        if heard.is_some_and(|f| (f - hz).abs() < 15.0) {
            break;
        }
    }
    heard
}

/// What `phone` hears once it is `hz`, or after 5 s.
fn frequency_heard_by_phone(phone: &Phone, hz: f64) -> Option<f64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut heard = phone.heard_frequency();
    while heard.is_none_or(|f| (f - hz).abs() > 20.0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        heard = phone.heard_frequency();
    }
    heard
}

/// Whether a line of the bridge's log says a phone answered `call_id`.
fn says_answered(call_id: &str) -> impl Fn(&str) -> bool + '_ {
    move |l| l.contains(&format!("call {call_id}: ")) && l.ends_with(" answered")
}

/// The call a line of the bridge's log is about ("call ID: …").
fn call_id_in(line: &str) -> &str {
    let after = line.split("call ").nth(1).unwrap_or_default();
    after.split(':').next().unwrap_or_default()
}

/// Waits until `user`'s phone has registered with the bridge.
fn assert_registered(bridge: &BridgeProcess, user: &str) {
    assert!(
        bridge
            .wait_for_log(
                |l| l.contains(&format!("registrar: {user} registered")),
                Duration::from_secs(10)
            )
            .is_some(),
        "{user}'s phone registers: {:#?}",
        bridge.logs()
    );
}

/// Once a phone has registered with the bridge as alice, bob calls her
/// from Chromium (his microphone a 660 Hz tone) and she answers.
fn bob_calls_registered_alice(bridge: &BridgeProcess, video: bool) -> BrowserPeer {
    assert_registered(bridge, "alice");
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut bob = BrowserPeer::start(&sandbox, "bob", "demo", 660);
    bob.command(json!({"op": "call", "to": "alice", "video": video}));
    bob.wait_event("accepted", Duration::from_secs(15));
    bob
}

/// Phones behind a NAT name their private address in Via and Contact
/// (here 192.0.2.10, which reaches nothing): the bridge's registrar keeps
/// where each REGISTER came from, and the app's call reaches the phone
/// there: over UDP at the address and port its packets come from (its
/// registration granted 60 s, to keep its NAT's mapping open), over TCP on
/// the connection it registered on.
#[test]
fn an_app_call_reaches_a_phone_registered_from_behind_a_nat() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    // Over UDP, for 60 s (not the 300 asked): its refreshes keep its NAT's
    // mapping open.
    for (sipp_transport, transport, expires) in [("u1", "UDP", 60), ("t1", "TCP", 300)] {
        let phone = alice_sipp_phone(
            &bridge,
            "register-behind-nat.xml",
            "answer-behind-nat.xml",
            &["-t", sipp_transport],
        );
        bridge
            .wait_for_log(
                |l| {
                    l.contains("registrar: alice registered at sip:alice@192.0.2.10")
                        && l.contains(&format!("transport={transport} (reached at "))
                        && l.ends_with(&format!("for {expires} s"))
                },
                Duration::from_secs(10),
            )
            .unwrap_or_else(|| panic!("alice registers over {transport}: {:#?}", bridge.logs()));
        let mut bob = bob_calls_registered_alice(&bridge, false);
        bob.command(json!({"op": "hangUp"}));
        let (success, output) = phone.join().unwrap();
        assert!(
            success,
            "over {transport}, the phone took the app's call where it registered from:\n{output}\n{:#?}",
            bridge.logs()
        );
    }
}

/// An extension with several phones (a desk phone, a softphone, a mobile
/// client) registered at once: an app's call rings them all. A busy phone
/// does not end the call; the first to answer takes it, and the one still
/// ringing is CANCELled. Each phone unregisters its own binding and leaves
/// the others; once all are gone, the app's call finds no phone.
#[test]
fn an_app_call_rings_every_phone_of_the_extension() {
    let _serial = one_at_a_time();
    // The phones answer the registrar's OPTIONS throughout.
    let bridge = BridgeProcess::start(&["--qualify-interval-s", "1"]);
    let answering = Phone::new("PCMU", 0, 8000, 523);
    let answering_port = answering.port().to_string();
    let phones = alice_sipp_phones(
        &bridge,
        [
            ("device-rings.xml", String::new()),
            ("device-busy.xml", String::new()),
            ("device-answers.xml", answering_port),
        ],
    );
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut bob = BrowserPeer::start(&sandbox, "bob", "demo", 660);
    bob.command(json!({"op": "call", "to": "alice"}));
    let dialled = bridge
        .wait_for_log(|l| l.contains(" calls sip:alice@"), Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the bridge calls alice: {:#?}", bridge.logs()));
    assert_eq!(
        dialled.matches("sip:alice@").count(),
        3,
        "every phone of alice's rings: {dialled}"
    );
    let call_id = call_id_in(&dialled);
    bob.wait_event("accepted", Duration::from_secs(15));
    answering.call(bridge.media_port(call_id));
    let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(10));
    let phone_heard = answering.heard_frequency();
    bob.command(json!({"op": "hangUp"}));
    for (phone, role) in phones.into_iter().zip(["ringing", "busy", "answering"]) {
        let (success, output) = phone.join().unwrap();
        assert!(
            success,
            "the {role} phone's part of the call, then its un-REGISTER:\n{output}\n{:#?}",
            bridge.logs()
        );
    }
    assert_heard_each_other(app_heard, phone_heard, " (the answering phone)", &bridge);
    let unregistered = bridge
        .logs()
        .iter()
        .filter(|l| l.contains("registrar: alice unregistered sip:alice@127.0.0.1:"))
        .count();
    assert_eq!(
        unregistered,
        3,
        "each phone unregistered itself: {:#?}",
        bridge.logs()
    );
    bob.command(json!({"op": "call", "to": "alice"}));
    bob.wait_event("rejected", Duration::from_secs(15));
    assert!(
        bridge.logged("calls alice: alice has no phone registered"),
        "{:#?}",
        bridge.logs()
    );
}

/// The registrar asks each registered phone OPTIONS (here every second):
/// a phone gone without unregistering (unplugged, a laptop closed) is not
/// rung. With no phone left the app's call is refused at once, rather than
/// ringing nothing; a phone that is there takes the next call alone.
#[test]
fn a_registered_phone_that_is_gone_is_not_rung() {
    let _serial = one_at_a_time();
    let management_port = support::free_port();
    let bridge = BridgeProcess::start(&[
        "--qualify-interval-s",
        "1",
        "--management",
        &format!("127.0.0.1:{management_port}"),
    ]);
    // alice's phones as the management API shows them: Contact, answers.
    let phones = || {
        let token = Some(support::MANAGEMENT_TOKEN);
        let (_, body) = support::http_get(management_port, "/stats", token);
        let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
        let listed = stats["phones"]["alice"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        listed
            .iter()
            .map(|p| {
                (
                    p["contact"].as_str().unwrap().to_owned(),
                    p["answers"] == true,
                )
            })
            .collect::<Vec<_>>()
    };
    let address = bridge.address();
    let credentials = ["-au", "alice", "-ap", "demo"];
    let (registered, output) = sipp("register-and-go.xml", &address, "alice", &credentials);
    assert!(registered, "{output}");
    let silent = bridge
        .wait_for_log(
            |l| l.contains("registrar: alice's phone at ") && l.contains("does not answer OPTIONS"),
            Duration::from_secs(15),
        )
        .unwrap_or_else(|| panic!("the gone phone is found out: {:#?}", bridge.logs()));
    let gone = silent
        .split(" phone at ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(phones(), [(gone.to_owned(), false)]);
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut bob = BrowserPeer::start(&sandbox, "bob", "demo", 660);
    bob.command(json!({"op": "call", "to": "alice"}));
    bob.wait_event("rejected", Duration::from_secs(10));
    assert!(
        bridge.logged("calls alice: alice's registered phones do not answer"),
        "{:#?}",
        bridge.logs()
    );
    let port = support::free_even_port().to_string();
    let phone = alice_sipp_phone(
        &bridge,
        "register-device.xml",
        "device-answers.xml",
        &["-key", "phone_port", &port],
    );
    assert_eq!(
        bridge
            .wait_for_logs(
                |l| l.contains("registrar: alice registered at"),
                2,
                Duration::from_secs(10)
            )
            .len(),
        2,
        "the phone that is there registers: {:#?}",
        bridge.logs()
    );
    let listed = phones();
    assert!(
        listed.len() == 2 && listed[0].1 && listed[1] == (gone.to_owned(), false),
        "the phone that is there, listed first, answers; the gone one does not: {listed:?}"
    );
    bob.command(json!({"op": "call", "to": "alice"}));
    bob.wait_event("accepted", Duration::from_secs(15));
    bob.command(json!({"op": "hangUp"}));
    let (success, output) = phone.join().unwrap();
    assert!(
        success,
        "the phone that is there takes the call, then BYE:\n{output}"
    );
    let dialled = bridge.wait_for_logs(|l| l.contains(" calls sip:alice@"), 1, Duration::ZERO);
    assert!(
        dialled.len() == 1 && !dialled[0].contains(gone),
        "only the phone that is there rings (not {gone}): {dialled:#?}"
    );
}

/// The app is told the caller the SIP side vouches for: a trusted server's
/// asserted identity (P-Asserted-Identity, as carriers send behind an
/// anonymous From) unless the caller withholds it (`Privacy: id`); and a
/// phone that authenticated calls as its own user, whatever its From says
/// (an office phone cannot pose as another user's).
#[test]
fn the_app_is_told_the_caller_the_sip_side_vouches_for() {
    let _serial = one_at_a_time();
    let last_incoming_call = |alice: &mut BrowserPeer| {
        let events = alice.command(json!({"op": "events"}));
        events
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|e| e["kind"] == "incoming call")
            .map(|e| e["detail"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let bridge = BridgeProcess::start(&[]);
    let mut alice = alice_answering(&bridge, false);
    for (privacy, shown) in [("none", "+4930123456"), ("id", "anonymous")] {
        let args = ["-key", "privacy", privacy];
        let (success, output) = sipp("asserted-identity.xml", &bridge.address(), "alice", &args);
        assert!(success, "{output}");
        let incoming = last_incoming_call(&mut alice);
        assert!(
            incoming.contains(&format!("\"callerNumber\":\"{shown}\"")),
            "Privacy: {privacy}, the app sees {shown}: {incoming}"
        );
    }
    drop((alice, bridge));

    // Loopback untrusted: SIPp, From "sipp", authenticates as bob.
    let bridge = BridgeProcess::start(&["--trust", "192.0.2.123"]);
    let mut alice = alice_answering(&bridge, true);
    let args = ["-au", "bob", "-ap", "demo"];
    let (success, output) = sipp("auth.xml", &bridge.address(), "alice", &args);
    assert!(success, "{output}\n{:#?}", bridge.logs());
    let incoming = last_incoming_call(&mut alice);
    let bob = format!("from {},", mapped_user_id(&bridge, "bob"));
    assert!(
        incoming.starts_with(&bob) && incoming.contains("\"callerNumber\":\"bob\""),
        "the call comes from bob's own user ({bob}): {incoming}"
    );
}

/// The ConnectyCube user id of `extension`'s mapping, from the bridge's
/// log (the sandbox numbers users as they sign in).
fn mapped_user_id(bridge: &BridgeProcess, extension: &str) -> u64 {
    let mapping = format!("mapping {extension} ↔ ConnectyCube user ");
    bridge
        .logs()
        .iter()
        .find_map(|l| l.split(&mapping).nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{extension} is mapped: {:#?}", bridge.logs()))
}

/// A phone behind a NAT calls an app user (its Via and Contact name its
/// private address); the app hangs up, and the bridge's BYE reaches the
/// phone where its INVITE came from: over UDP at the address and port its
/// packets come from, over TCP on its connection.
#[test]
fn a_phone_behind_a_nat_gets_the_bridges_bye() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    let mut alice = alice_answering(&bridge, true);
    for (sipp_transport, transport) in [("u1", "UDP"), ("t1", "TCP")] {
        let connected = alice.count_events("connection");
        let address = bridge.address();
        let phone = std::thread::spawn(move || {
            sipp(
                "call-behind-nat.xml",
                &address,
                "alice",
                &["-t", sipp_transport],
            )
        });
        alice.wait_for_more("connection", connected, Duration::from_secs(15));
        std::thread::sleep(Duration::from_secs(1));
        alice.command(json!({"op": "hangUp"}));
        let (success, output) = phone.join().unwrap();
        assert!(
            success,
            "over {transport}, the BYE reached the phone where it called from:\n{output}\n{:#?}",
            bridge.logs()
        );
    }
}

/// A bridge behind a NAT, told of a STUN server outside it (a real one,
/// Kamailio's stun module, beyond the test namespace's NAT: `scripts/lib.sh`),
/// tells the app where it is seen from: the app gets a server-reflexive
/// candidate at the public address, and both sides hear each other.
#[test]
fn a_bridge_behind_a_nat_tells_the_app_its_address_outside() {
    let _serial = one_at_a_time();
    let stun = KamailioProcess::start_stun();
    let server = format!("stun://198.51.100.8:{}", stun.port);
    let bridge = BridgeProcess::start_with_environment(
        "127.0.0.1",
        &[],
        &[("CONNECTYCUBE_STUN_SERVER", &server)],
    );
    let mut alice = alice_answering(&bridge, true);
    let (phone, signalling) = phone_call(&bridge, "call.xml", "alice", PCMU_440, 6, "behind-nat");
    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    let candidates = alice.command(json!({"op": "remoteCandidates"}));
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the SIP call: {output}");
    let outside = candidates.as_array().into_iter().flatten().any(|c| {
        c["type"] == "srflx" && c["address"] == "198.51.100.7" && c["port"].as_u64().is_some()
    });
    assert!(outside, "no candidate at the public address: {candidates}");
}

/// A bridge that may reach apps only through its TURN server
/// (`connectycube.relay_only`, a real coturn beyond the test namespace's
/// NAT): the app is offered the relayed address alone, both sides hear each
/// other through it, and the TURN password is in no log line.
#[test]
fn a_bridge_reaches_the_app_through_its_turn_server_alone() {
    let _serial = one_at_a_time();
    let turn = support::Coturn::start();
    reaches_the_app_through_turn_alone(&[("CONNECTYCUBE_TURN_SERVER", &turn.url())]);
}

/// The same with the TURN server reached over TLS (a firewall that passes
/// nothing else), its self-signed certificate trusted by
/// `connectycube.turn_ca_file`.
#[test]
fn a_bridge_reaches_the_app_through_its_turn_server_over_tls_alone() {
    let _serial = one_at_a_time();
    let turn = support::Coturn::start_with_tls();
    let (url, certificate) = turn.tls_url();
    reaches_the_app_through_turn_alone(&[
        ("CONNECTYCUBE_TURN_SERVER", &url),
        ("CONNECTYCUBE_TURN_CA_FILE", certificate.to_str().unwrap()),
    ]);
}

/// SIPp calls the app through a bridge that offers it nothing but its
/// address on the TURN server `environment` names.
fn reaches_the_app_through_turn_alone(environment: &[(&str, &str)]) {
    let mut environment = environment.to_vec();
    environment.extend([
        ("CONNECTYCUBE_RELAY_ONLY", "true"),
        ("RUST_LOG", "debug,rsipstack=warn"),
    ]);
    let bridge = BridgeProcess::start_with_environment("127.0.0.1", &[], &environment);
    let mut alice = alice_answering(&bridge, true);
    let (phone, signalling) = phone_call(&bridge, "call.xml", "alice", PCMU_440, 6, "relayed");
    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    let candidates = alice.command(json!({"op": "remoteCandidates"}));
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the SIP call: {output}");
    // Nothing of the bridge's network: its relayed address (and, as the
    // namespace's NAT rewrites the relay's port towards the app, a
    // peer-reflexive one, whose address the browser does not show).
    let candidates: Vec<_> = candidates.as_array().cloned().unwrap_or_default();
    let relayed =
        |c: &&serde_json::Value| c["type"] == "relay" && c["address"] == support::Coturn::ADDRESS;
    assert!(
        candidates.iter().any(|c| relayed(&c))
            && candidates
                .iter()
                .all(|c| relayed(&c) || (c["type"] == "prflx" && c["address"] == "")),
        "the relayed address alone: {candidates:?}"
    );
    assert!(
        !bridge.logs().iter().any(|l| l.contains("relay-s3cret")),
        "the TURN password in the log"
    );
}

#[test]
fn an_app_user_calls_a_registered_phone_and_survives_an_ice_restart() {
    let _serial = one_at_a_time();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    // baresip registers with the bridge as alice and answers at once.
    let phone = Baresip::new("alice", "demo", bridge.sip_port, 523, "g711").with_video();
    let phone = answering_on_a_thread(phone, 20);
    let mut bob = bob_calls_registered_alice(&bridge, false);
    let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(10));
    // The app's network changes: it restarts ICE; the bridge answers and
    // the audio goes on.
    let before = bob.command(json!({"op": "iceUfrags"}));
    bob.command(json!({"op": "iceRestart"}));
    let restarted = bridge.wait_for_log(
        |l| l.contains("ICE restarted by user"),
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_secs(1));
    let after = bob.command(json!({"op": "iceUfrags"}));
    let packets = |bob: &mut BrowserPeer| {
        bob.command(json!({"op": "audioStats"}))["packetsReceived"]
            .as_u64()
            .unwrap_or(0)
    };
    let first = packets(&mut bob);
    std::thread::sleep(Duration::from_secs(2));
    let received_after_restart = packets(&mut bob) - first;
    bob.command(json!({"op": "hangUp"}));
    assert_phone_and_app_heard_each_other(app_heard, phone.join().unwrap(), "", &bridge);
    assert!(
        restarted.is_some(),
        "ICE restart answered: {:#?}",
        bridge.logs()
    );
    // A new candidate pair, checked with the app's new credentials, is in
    // use (webrtcbin keeps its own credentials when answering a restart).
    assert!(after["local"].is_string(), "{after}");
    assert_ne!(
        before["local"], after["local"],
        "ICE ran again: {before} {after}"
    );
    assert!(
        received_after_restart >= 75,
        "{received_after_restart} packets in the 2 s after the ICE restart"
    );
    let lines = wait_for_cdr(&cdr, 1);
    let line = &lines[0];
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(
        line["caller"]["number"], "bob",
        "a mapped app user calls as its extension: {line}"
    );
    assert!(
        line["cause"].as_str().unwrap().contains("app hung up"),
        "{line}"
    );
}

/// A phone calls alice, and her app's network goes away mid-call (every
/// UDP port its candidates use is blocked, as when a phone leaves its
/// Wi-Fi). The SDK restarts ICE only from the side that offered: the
/// bridge, which notices the lost connection, sends `iceRestart`, the app
/// gathers again on new ports, and the call goes on.
#[test]
fn a_phone_call_survives_the_apps_network_going_away() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    let mut alice = alice_answering(&bridge, true);
    let (phone, signalling) =
        phone_call(&bridge, "call.xml", "alice", PCMU_440, 20, "lost-network");
    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    let before = alice.command(json!({"op": "iceUfrags"}));
    let ports = alice.command(json!({"op": "localPorts"}));
    let ports: Vec<String> = ports
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert!(!ports.is_empty(), "the app's candidates have ports");
    let ports = ports.join(", ");
    let gone = NftTable::add(
        "inet gone",
        &format!(
            "add chain inet gone output {{ type filter hook output priority 0; }}\n\
             add rule inet gone output udp sport {{ {ports} }} drop\n\
             add rule inet gone output udp dport {{ {ports} }} drop\n"
        ),
    );
    let restarted = bridge.wait_for_log(
        |l| l.contains("ICE restarted toward user"),
        Duration::from_secs(20),
    );
    // The phone's packets reach the app again (the app conceals a gap
    // with the last sound it heard, so its tone alone would not tell).
    let received = |alice: &mut BrowserPeer| {
        alice.command(json!({"op": "audioStats"}))["packetsReceived"]
            .as_u64()
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut per_second = 0;
    while per_second < 40 && std::time::Instant::now() < deadline {
        let first = received(&mut alice);
        std::thread::sleep(Duration::from_secs(1));
        per_second = received(&mut alice) - first;
    }
    let after = alice.command(json!({"op": "iceUfrags"}));
    drop(gone);
    assert!(
        restarted.is_some(),
        "the bridge restarts ICE: {:#?}",
        bridge.logs()
    );
    assert!(
        per_second >= 40,
        "the app receives the phone again ({per_second} packets a second): {:#?}",
        bridge.logs()
    );
    assert_ne!(
        before["local"], after["local"],
        "ICE ran again: {before} {after}"
    );
    let (success, output) = signalling.join().unwrap();
    assert!(
        success,
        "the call goes on until the phone hangs up: {output}"
    );
}

/// A phone that takes only SRTP (baresip, `mediaenc=srtp-mand`): with
/// `offer_srtp` the bridge offers it SDES-SRTP at once, and the app user's
/// call reaches it, both hearing each other through it.
#[test]
fn an_app_user_reaches_a_phone_that_takes_only_srtp() {
    let _serial = one_at_a_time();
    let bridge = app_user_reaches_a_secure_phone(&[("SIP_OFFER_SRTP", "true")], "srtp-mand");
    assert!(
        !bridge
            .logs()
            .iter()
            .any(|line| line.contains("offering RTP/")),
        "the first offer was taken: {:#?}",
        bridge.logs()
    );
}

/// Without `offer_srtp`, a phone that refuses plain RTP is offered SRTP
/// and then RTCP feedback in turn: baresip with `mediaenc=srtp-mandf`
/// takes only RTP/SAVPF, and refuses the bridge's RTP/AVP, RTP/SAVP and
/// RTP/AVPF offers with 488.
#[test]
fn an_app_user_reaches_a_phone_that_refuses_the_bridges_first_profiles() {
    let _serial = one_at_a_time();
    let bridge = app_user_reaches_a_secure_phone(&[], "srtp-mandf");
    let logs = bridge.logs();
    for (refused, next) in [
        ("RTP/AVP", "RTP/SAVP"),
        ("RTP/SAVP", "RTP/AVPF"),
        ("RTP/AVPF", "RTP/SAVPF"),
    ] {
        assert!(
            logs.iter()
                .any(|line| line.contains(&format!("488 to {refused}; offering {next}"))),
            "{refused} refused, then {next} offered: {logs:#?}"
        );
    }
}

/// Bob's app calls alice, a baresip that takes only SRTP in `mediaenc`'s
/// profile, through a bridge with `environment`: they hear each other, and
/// the call's record names its SRTP suite.
fn app_user_reaches_a_secure_phone(environment: &[(&str, &str)], mediaenc: &str) -> BridgeProcess {
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start_with_environment(
        "127.0.0.1",
        &["--cdr", cdr.to_str().unwrap()],
        environment,
    );
    let phone =
        Baresip::new("alice", "demo", bridge.sip_port, 523, "g711").with_mandatory_srtp(mediaenc);
    let phone = answering_on_a_thread(phone, 12);
    let mut bob = bob_calls_registered_alice(&bridge, false);
    let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(10));
    bob.command(json!({"op": "hangUp"}));
    assert_phone_and_app_heard_each_other(app_heard, phone.join().unwrap(), "", &bridge);
    let lines = wait_for_cdr(&cdr, 1);
    assert_eq!(
        lines[0]["sip_srtp"], "AES_CM_128_HMAC_SHA1_80",
        "{}",
        lines[0]
    );
    bridge
}

#[test]
fn an_app_video_call_to_a_phone_without_video_carries_both_voices() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    // A desk phone: G.711, no camera, answers at once.
    let phone = Baresip::new("alice", "demo", bridge.sip_port, 523, "g711");
    let phone = answering_on_a_thread(phone, 12);
    let mut bob = bob_calls_registered_alice(&bridge, true);
    let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(10));
    // Long enough for the phone's recording to hold the app's voice.
    std::thread::sleep(Duration::from_secs(3));
    let received = bob.command(json!({"op": "audioStats"}));
    let events = bob.command(json!({"op": "events"}));
    bob.command(json!({"op": "hangUp"}));
    assert_phone_and_app_heard_each_other(
        app_heard,
        phone.join().unwrap(),
        &format!(" ({received}; {events})"),
        &bridge,
    );
}

/// `phone` (sending 523 Hz) answers calls for `seconds` on a thread of its
/// own, which yields the frequency it heard and its output.
fn answering_on_a_thread(
    phone: Baresip,
    seconds: u32,
) -> std::thread::JoinHandle<(Option<f64>, String)> {
    std::thread::spawn(move || {
        let output = phone.answer_calls(seconds);
        let heard = phone.heard().and_then(|wav| wav_frequency(&wav));
        (heard, output)
    })
}

/// The app heard the phone's 523 Hz, and the phone the app's 660 Hz.
fn assert_phone_and_app_heard_each_other(
    app_heard: Option<f64>,
    (phone_heard, output): (Option<f64>, String),
    context: &str,
    bridge: &BridgeProcess,
) {
    assert_heard_each_other(
        app_heard,
        phone_heard,
        &format!("{context}\n{output}"),
        bridge,
    );
}

/// The app (660 Hz) and the phone (523 Hz) heard each other; `details`
/// goes with a failure.
fn assert_heard_each_other(
    app_heard: Option<f64>,
    phone_heard: Option<f64>,
    details: &str,
    bridge: &BridgeProcess,
) {
    assert!(
        app_heard.is_some_and(|f| (f - 523.0).abs() < 15.0),
        "the app heard {app_heard:?} instead of the phone's 523 Hz{details}\n{:#?}",
        bridge.logs()
    );
    assert!(
        phone_heard.is_some_and(|f| (f - 660.0).abs() < 20.0),
        "the phone heard {phone_heard:?} instead of the app's 660 Hz{details}"
    );
}

#[test]
fn a_recorded_call_holds_both_voices() {
    let _serial = one_at_a_time();
    let dir = tempdir();
    let cdr = dir.join("cdr.jsonl");
    let recordings = dir.join("recordings");
    let bridge = BridgeProcess::start(&[
        "--cdr",
        cdr.to_str().unwrap(),
        "--record",
        recordings.to_str().unwrap(),
    ]);
    let mut alice = alice_answering(&bridge, true);
    call_alice(&bridge, &mut alice, PCMU_440);

    let lines = wait_for_cdr(&cdr, 1);
    let path = lines[0]["recording"]
        .as_str()
        .unwrap_or_else(|| panic!("the CDR names the recording: {}", lines[0]));
    assert_both_voices_recorded(path);
}

/// A finalized WAV recording of over 3 s holds both voices: the phone's
/// 440 Hz and the app's 660 Hz.
fn assert_both_voices_recorded(path: &str) {
    assert_tones_recorded(path, &[440.0, 660.0]);
}

/// A finalized WAV recording of over 3 s holds each of `tones` (Hz).
fn assert_tones_recorded(path: &str, tones: &[f64]) {
    let mut reader = hound::WavReader::open(path).expect("a finalized, readable WAV file");
    let rate = reader.spec().sample_rate;
    let samples: Vec<f32> = reader
        .samples::<i16>()
        .map(|s| f32::from(s.unwrap()) / 32768.0)
        .collect();
    assert!(
        samples.len() > rate as usize * 3,
        "{} samples",
        samples.len()
    );
    assert_tones(&samples, rate, tones);
}

/// `samples` at `rate` hold each of `tones` (Hz), well above 1000 Hz's level.
fn assert_tones(samples: &[f32], rate: u32, tones: &[f64]) {
    let power = |hz| bridge_protocol::tone::tone_power(samples, rate, hz);
    let neither = power(1000.0);
    for &tone in tones {
        assert!(
            power(tone) > neither * 20.0,
            "{tone} Hz: {} vs {neither} at 1000 Hz",
            power(tone)
        );
    }
}

#[test]
fn a_mapping_with_wrong_credentials_gets_a_clear_503() {
    let _serial = one_at_a_time();
    // A sandbox where dave already exists with another password.
    let sandbox = support::SandboxProcess::start(support::free_port());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(support::RustUser::sign_in(
        &sandbox.api_url(),
        &sandbox.chat_url(),
        "dave",
        "right",
    ));
    let dir = tempdir();
    let config = dir.join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "[connectycube]\napi_url = \"{}\"\nchat_url = \"{}\"\ngateway_login = \"gw\"\ngateway_password = \"gw\"\n\n\
             [[users]]\nextension = \"dave\"\nlogin = \"dave\"\npassword = \"wrong\"\n",
            sandbox.api_url(),
            sandbox.chat_url()
        ),
    )
    .unwrap();
    let bridge = BridgeProcess::start(&["--config", config.to_str().unwrap()]);
    let warning = bridge
        .wait_for_log(
            |l| l.contains("mapping dave ↔ ConnectyCube \"dave\""),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("a log line names the mapping: {:#?}", bridge.logs()));
    assert!(
        !warning.contains("wrong"),
        "no password in the log: {warning}"
    );
    let (success, output) = sipp("unavailable.xml", &bridge.address(), "dave", &[]);
    assert!(success, "503 with a Reason: {output}\n{:#?}", bridge.logs());
}

/// A configuration with the sections `more` and `users`, each with the
/// password `demo` and the phone password `<name>-phone`.
fn reload_config(
    sandbox: &support::SandboxProcess,
    sip: &str,
    more: &str,
    users: &[&str],
) -> String {
    let user = |name: &&str| {
        format!(
            "[[users]]\nextension = \"{name}\"\nlogin = \"{name}\"\npassword = \"demo\"\nsip_password = \"{name}-phone\"\n"
        )
    };
    format!(
        "[sip]\nregistrar = true\n{sip}\n[connectycube]\napi_url = \"{}\"\nchat_url = \"{}\"\n\
         gateway_login = \"sip-gateway\"\ngateway_password = \"demo\"\n\n{more}\n\n{}",
        sandbox.api_url(),
        sandbox.chat_url(),
        users.iter().map(user).collect::<Vec<_>>().join("\n")
    )
}

/// An office adds a colleague and takes one out while calls go on: on
/// SIGHUP the bridge signs the new user in and lets its phone register,
/// forgets the user taken out and its phone, and the call that user's
/// phone is making goes on to its end; the calls after it are recorded;
/// the CDR file is opened again (after a log rotation); the number of
/// calls carried at once, the RTP timeout, the drain and the registrar's
/// qualify change; a configuration with a mistake changes nothing.
#[test]
fn a_reload_changes_the_users_and_keeps_the_calls_in_progress() {
    let _serial = one_at_a_time();
    let sandbox = support::SandboxProcess::start(support::free_port());
    let dir = tempdir();
    let (config, cdr, recordings) = (
        dir.join("bridge.toml"),
        dir.join("cdr.jsonl"),
        dir.join("recordings"),
    );
    std::fs::write(&config, reload_config(&sandbox, "", "", &["sipp", "bob"])).unwrap();
    let management_port = support::free_port().to_string();
    let management = format!("127.0.0.1:{management_port}");
    let mut bridge = BridgeProcess::start(&[
        "--config",
        config.to_str().unwrap(),
        "--management",
        &management,
        "--cdr",
        cdr.to_str().unwrap(),
    ]);
    let stats = || {
        let (_, body) = support::http_get(
            management_port.parse().unwrap(),
            "/stats",
            Some(support::MANAGEMENT_TOKEN),
        );
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let address = bridge.address();
    let register = |user: &str, password: &str| {
        sipp(
            "register-and-go.xml",
            &address,
            user,
            &["-au", user, "-ap", password],
        )
    };
    let (registered, output) = register("sipp", "sipp-phone");
    assert!(registered, "{output}");
    assert!(stats()["phones"]["sipp"].is_array(), "{}", stats());
    let (registered, _) = register("carol", "carol-phone");
    assert!(!registered, "carol is not a user yet");

    let mut bob = BrowserPeer::start(
        &format!("http://localhost:{}/", sandbox.port),
        "bob",
        "demo",
        660,
    );
    bob.command(json!({"op": "autoAnswer", "on": true}));
    let (phone, signalling) = phone_call(&bridge, "call.xml", "bob", PCMU_440, 25, "reload");
    bob.wait_event("incoming call", Duration::from_secs(15));
    assert_each_hears_the_other(&bridge, &mut bob, &phone);

    // The phone's own user is taken out (its call goes on, signalled as
    // that user to its end), carol comes in, bob stays; new calls are
    // recorded; a section that needs a restart is named.
    let more = format!(
        "[asterisk]\ndevice_prefix = \"Bridge:\"\n\n[recording]\nenabled = true\ndirectory = \"{}\"",
        recordings.display()
    );
    let sip =
        "max_calls = 1\nrtp_timeout_ms = 1500\ndrain_timeout_s = 60\nqualify_interval_s = 1\n";
    std::fs::write(
        &config,
        reload_config(&sandbox, sip, &more, &["bob", "carol"]),
    )
    .unwrap();
    // A log rotation moves the CDR file away first (logrotate's default):
    // the records from the reload on go to a new one.
    std::fs::rename(&cdr, dir.join("cdr.jsonl.1")).unwrap();
    bridge.signal("HUP");
    bridge
        .wait_for_log(
            |l| l.contains("reload: users added: carol; changed: none; taken out: sipp"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("the reload is logged: {:#?}", bridge.logs()));
    assert!(
        bridge
            .logs()
            .iter()
            .any(|l| l
                .contains("reload: [asterisk] changed; it takes effect when the bridge restarts")),
        "{:#?}",
        bridge.logs()
    );
    let signed_in = stats()["connectycube_signed_in"].clone();
    assert!(
        signed_in["carol"].is_u64() && signed_in["bob"].is_u64(),
        "{signed_in}"
    );
    assert!(signed_in.get("sipp").is_none(), "{signed_in}");
    assert!(
        stats()["phones"].get("sipp").is_none(),
        "sipp's phone is forgotten: {}",
        stats()
    );
    let (registered, output) = register("carol", "carol-phone");
    assert!(registered, "carol's phone registers: {output}");
    // The registrar now asks its phones OPTIONS every second, not 30:
    // carol's (SIPp, gone) answers none, and is not rung.
    bridge
        .wait_for_log(
            |l| l.contains("carol's phone at") && l.contains("does not answer OPTIONS"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("the reloaded qualify: {:#?}", bridge.logs()));
    let (registered, _) = register("sipp", "sipp-phone");
    assert!(!registered, "sipp is no longer a user");
    // `sip.max_calls` is down to the one call in progress: the next is refused.
    let (refused, output) = sipp("at-capacity.xml", &address, "bob", &[]);
    assert!(refused, "503 at capacity: {output}");
    let (refused, output) = sipp("options-at-capacity.xml", &address, "bob", &[]);
    assert!(refused, "OPTIONS gets the same 503: {output}");

    assert_each_hears_the_other(&bridge, &mut bob, &phone);
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the call went on to the phone's BYE: {output}");
    bob.wait_event("hung up", Duration::from_secs(10));
    // The next call, from the phone now unmapped (so from the gateway
    // user), is recorded; the one in progress at the reload was not.
    let (_phone, signalling) = phone_call(&bridge, "call.xml", "bob", PCMU_440, 6, "recorded");
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the recorded call: {output}");
    let lines = wait_for_cdr(&cdr, 2);
    let recording_of = |call_id: &str| {
        let line = lines.iter().find(|l| l["call_id"] == call_id);
        line.unwrap_or_else(|| panic!("no CDR of {call_id}: {lines:?}"))["recording"].clone()
    };
    assert!(recording_of("reload-1").is_null(), "{lines:?}");
    assert_both_voices_recorded(recording_of("recorded-1").as_str().unwrap());
    // The RTP timeout is down from 30 s to 1.5 s for new calls: a silent
    // phone's call ends well within SIPp's 10 s.
    let (hung_up, output) = sipp("wait-for-bye.xml", &address, "echo", &["-timeout", "10s"]);
    assert!(hung_up, "BYE after the reloaded RTP timeout: {output}");

    // A configuration with a mistake is refused as a whole, naming it.
    std::fs::write(&config, "[sip]\nusername = \"trunk\"\n").unwrap();
    bridge.signal("HUP");
    let refused = bridge
        .wait_for_log(|l| l.contains("reload refused"), Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the bad reload is logged: {:#?}", bridge.logs()));
    assert!(
        bridge.logged("sip.domain: needed"),
        "{refused}\n{:#?}",
        bridge.logs()
    );
    let (registered, output) = register("carol", "carol-phone");
    assert!(registered, "the users stay as they were: {output}");

    // Stopped with a drain timeout the reload set, the bridge lets the
    // call in progress go on to its end (with none, it would end it at once).
    let (_phone, signalling) = phone_call(&bridge, "call.xml", "bob", PCMU_440, 6, "drained");
    bob.wait_event("incoming call", Duration::from_secs(15));
    bridge.signal("TERM");
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the call went on through the drain: {output}");
    assert_eq!(bridge.exited_within(Duration::from_secs(10)), Some(true));
}

#[test]
fn a_phone_on_hold_pauses_what_the_app_hears() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    let mut alice = alice_answering(&bridge, true);
    let (_phone, signalling) = phone_call(&bridge, "hold-call.xml", "alice", PCMU_440, 6, "held");
    // What the browser's WebRTC stack receives: Opus carrying a tone takes
    // tens of bytes a packet, Opus carrying silence a few.
    // Bytes per packet over half-second windows, until `done` or 2.5 s.
    fn bytes_per_packet(alice: &mut BrowserPeer, done: impl Fn(f64) -> bool) -> f64 {
        let mut stats = || {
            let s = alice.command(json!({"op": "audioStats"}));
            (
                s["bytesReceived"].as_f64().unwrap_or(0.0),
                s["packetsReceived"].as_f64().unwrap_or(0.0),
            )
        };
        let deadline = std::time::Instant::now() + Duration::from_millis(2500);
        loop {
            let (bytes, packets) = stats();
            std::thread::sleep(Duration::from_millis(500));
            let (bytes2, packets2) = stats();
            let size = (bytes2 - bytes) / (packets2 - packets).max(1.0);
            if done(size) || std::time::Instant::now() > deadline {
                return size;
            }
        }
    }
    // Until the WebRTC connection carries audio (slow on a loaded machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while alice.command(json!({"op": "audioStats"}))["packetsReceived"]
        .as_u64()
        .unwrap_or(0)
        < 10
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the app receives audio"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = bytes_per_packet(&mut alice, |size| size > 40.0);
    bridge
        .wait_for_log(
            |l| l.contains("call held-1: PCMU RecvOnly"),
            Duration::from_secs(10),
        )
        .expect("the hold is applied");
    let held = bytes_per_packet(&mut alice, |size| size < 15.0);
    wait_for_second(
        &bridge,
        "call held-1: PCMU SendRecv",
        "the resume is applied",
    );
    let resumed = bytes_per_packet(&mut alice, |size| size > 40.0);
    assert!(
        before > 40.0,
        "before the hold the app receives the phone's voice: {before} bytes a packet"
    );
    assert!(
        held < 15.0,
        "on hold the app receives silence: {held} bytes a packet"
    );
    assert!(
        resumed > 40.0,
        "after the resume the voice is back: {resumed} bytes a packet"
    );
    let (success, output) = signalling.join().unwrap();
    assert!(success, "hold and resume: {output}");
}

/// Waits up to 15 s for a second log line containing `line` (a stream's
/// direction applied again: a resume).
fn wait_for_second(bridge: &BridgeProcess, line: &str, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while bridge.logs().iter().filter(|l| l.contains(line)).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Phones send nothing before they are answered, and desk phones often
/// nothing while they hold a call. An app user who answers after ringing
/// longer than the RTP timeout, and a phone that then holds the call
/// longer than that, silent, keep their call: the bridge times the phone's
/// silence only while the call is answered and not on hold.
#[test]
fn a_call_rung_and_held_longer_than_the_rtp_timeout_goes_on() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&["--rtp-timeout-ms", "2000"]);
    let mut alice = alice_answering(&bridge, false);
    let (phone, signalling) = dial(
        &bridge,
        "hold-call.xml",
        "alice",
        PCMU_440,
        4,
        "patient",
        &[],
    );
    let port = bridge.media_port("patient-1");
    alice.wait_event("incoming call", Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(3500));
    alice.command(json!({"op": "answer"}));
    bridge
        .wait_for_log(
            |l| l.contains("call patient-1: answered"),
            Duration::from_secs(10),
        )
        .expect("the call is answered");
    phone.call(port);
    assert_each_hears_the_other(&bridge, &mut alice, &phone);

    bridge
        .wait_for_log(
            |l| l.contains("call patient-1: PCMU RecvOnly"),
            Duration::from_secs(15),
        )
        .expect("the phone holds the call");
    phone.pause();
    wait_for_second(
        &bridge,
        "call patient-1: PCMU SendRecv",
        "the phone resumes the call",
    );
    phone.resume();
    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    let (success, output) = signalling.join().unwrap();
    assert!(
        success,
        "the phone hangs up a call still up: {output}\n{:#?}",
        bridge.logs()
    );
}

/// A PBX or trunk that sends its INVITE without SDP (a delayed offer)
/// reaches an app user: the bridge rings the app on its own offer, offers
/// its codecs in the 200, and takes the phone's answer (PCMU) from the ACK,
/// moving the call's media from Opus passed through to transcoding; both
/// hear each other.
#[test]
fn a_delayed_offer_reaches_an_app_user() {
    delayed_offer_to_alice(false);
}

/// The same, recorded: the recording holds both voices through the
/// media's move from Opus passed through to PCMU transcoded.
#[test]
fn a_recorded_delayed_offer_holds_both_voices() {
    delayed_offer_to_alice(true);
}

fn delayed_offer_to_alice(recorded: bool) {
    let _serial = one_at_a_time();
    let dir = tempdir();
    let cdr = dir.join("cdr.jsonl");
    let recordings = dir.join("recordings");
    let mut args = vec!["--cdr", cdr.to_str().unwrap()];
    if recorded {
        args.extend(["--record", recordings.to_str().unwrap()]);
    }
    let bridge = BridgeProcess::start(&args);
    let mut alice = alice_answering(&bridge, true);
    let (phone, signalling) = dial(
        &bridge,
        "delayed-offer.xml",
        "alice",
        PCMU_440,
        8,
        "late",
        &[],
    );
    let port = bridge.media_port("late-1");
    bridge
        .wait_for_log(
            |l| l.contains("call late-1: PCMU SendRecv"),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|| panic!("the ACK's answer is applied: {:#?}", bridge.logs()));
    phone.call(port);
    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the delayed offer's call: {output}");
    let lines = wait_for_cdr(&cdr, 1);
    assert_eq!(lines[0]["sip_codec"], "PCMU", "{}", lines[0]);
    assert_eq!(lines[0]["media"], "transcoded", "{}", lines[0]);
    if recorded {
        assert_both_voices_recorded(lines[0]["recording"].as_str().expect("a recording"));
    }
}

#[test]
fn an_app_call_follows_a_redirect_and_takes_the_answer_of_a_183() {
    let _serial = one_at_a_time();
    let dir = tempdir();
    let domain = PhoneAtDomain::new(&dir);
    let bridge = BridgeProcess::start(&["--config", domain.config.to_str().unwrap()]);
    // The "phone" at the SIP domain: SIPp redirecting, then answering.
    let media_port = support::free_even_port().to_string();
    let phone = domain.answer("redirect-progress-answer.xml", &["-mp", &media_port]);
    let mut bob = domain.bob();
    bob.command(json!({"op": "call", "to": "alice"}));
    bob.wait_event("accepted", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    bob.command(json!({"op": "hangUp"}));
    let (success, output) = phone.join().unwrap();
    assert!(
        success,
        "302, then the redirected INVITE answered (SDP in the 183 only), then BYE:\n{output}\n{:#?}",
        bridge.logs()
    );
    assert!(
        bridge.logged("302, redirected to sip:alice@127.0.0.1"),
        "{:#?}",
        bridge.logs()
    );
    assert!(
        bridge.logged("183 Session Progress with SDP (early media)"),
        "{:#?}",
        bridge.logs()
    );
    let lines = wait_for_cdr(&dir.join("cdr.jsonl"), 1);
    assert_eq!(lines[0]["status"], 200, "{}", lines[0]);
}

/// A PBX or a carrier that plays ringback or an announcement before the
/// call is answered (a 183 with SDP): with `sip.early_media` the app's call
/// is answered on it and the app hears it while the phone side rings, with
/// nothing of the app's voice sent back until the answer; the answer goes
/// on on the same WebRTC leg, and both voices cross. A refusal after the
/// early media ends the app's call with the phone side's status.
#[test]
fn with_early_media_the_app_hears_the_ringback_and_then_the_phone() {
    let _serial = one_at_a_time();
    let dir = tempdir();
    let domain = PhoneAtDomain::with_sip(&dir, |sip_port| {
        format!("domain = \"127.0.0.1:{sip_port}\"\nearly_media = true")
    });
    let bridge = BridgeProcess::start(&["--config", domain.config.to_str().unwrap()]);
    // The early media, then the voice of the one who answers.
    let phone = Phone::new("PCMU", 0, 8000, 523);
    let phone_port = phone.port().to_string();
    let pbx = domain.answer(
        "early-media-answer.xml",
        &["-key", "phone_port", &phone_port],
    );
    let mut bob = domain.bob();
    let call_id = &bob_calls_alice_on_early_media(&bridge, &mut bob);
    phone.call(bridge.media_port(call_id));
    let early_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(4));
    let answered_early = bridge.logs().iter().any(|l| says_answered(call_id)(l));
    let sent_back_early = phone.heard_frequency();
    assert!(
        early_heard.is_some_and(|f| (f - 523.0).abs() < 15.0) && !answered_early,
        "the app hears the early media ({early_heard:?} Hz) before the answer (answered: {answered_early})\n{:#?}",
        bridge.logs()
    );
    assert!(
        sent_back_early.is_none_or(|f| (f - 660.0).abs() > 20.0),
        "nothing of the app reaches the phone side before its answer: {sent_back_early:?} Hz"
    );
    bridge
        .wait_for_log(says_answered(call_id), Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the PBX answers: {:#?}", bridge.logs()));
    let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(5));
    let phone_heard = frequency_heard_by_phone(&phone, 660.0);
    bob.command(json!({"op": "hangUp"}));
    let (success, output) = pbx.join().unwrap();
    assert!(success, "183, 200 OK, then the app's BYE:\n{output}");
    assert_heard_each_other(app_heard, phone_heard, " after the answer", &bridge);

    // Early media, then busy: the app's call (answered for it) ends with 486.
    let busy = domain.answer("early-media-busy.xml", &["-key", "phone_port", &phone_port]);
    bob.command(json!({"op": "call", "to": "alice"}));
    bob.wait_event("accepted", Duration::from_secs(20));
    let ended = bob.wait_event("hung up", Duration::from_secs(15));
    assert!(ended.contains("\"sipStatus\":\"486\""), "{ended}");
    let (success, output) = busy.join().unwrap();
    assert!(success, "183, then 486 acknowledged:\n{output}");
    let lines = wait_for_cdr(&dir.join("cdr.jsonl"), 2);
    let statuses: Vec<_> = lines.iter().map(|l| l["status"].clone()).collect();
    assert_eq!(statuses, [200, 486], "{lines:?}");
}

/// Bob calls alice, and his call is answered for the early media of a
/// phone of hers: the call's id.
fn bob_calls_alice_on_early_media(bridge: &BridgeProcess, bob: &mut BrowserPeer) -> String {
    bob.command(json!({"op": "call", "to": "alice"}));
    let early = bridge
        .wait_for_log(
            |l| l.contains("the app's call is answered for sip:alice@"),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|| panic!("answered on the early media: {:#?}", bridge.logs()));
    bob.wait_event("accepted", Duration::from_secs(10));
    call_id_in(&early).to_owned()
}

/// An extension whose two phones both play early media (a 183 with SDP):
/// the app hears the first one's (PCMU); when that phone turns out busy,
/// the other's (PCMA) plays on at once, though it sent its 183 while the
/// first one played and sends no other; that phone's answer goes on on
/// the same WebRTC leg with both voices crossing. The call is recorded,
/// and the recording holds both phones' early media and both voices.
#[test]
fn with_early_media_another_phones_plays_on_when_the_first_fails() {
    let _serial = one_at_a_time();
    let dir = tempdir();
    let config = PhoneAtDomain::with_sip(&dir, |_| "early_media = true".into());
    let (cdr, recordings) = (dir.join("cdr.jsonl"), dir.join("recordings"));
    let bridge = BridgeProcess::start(&[
        "--config",
        config.config.to_str().unwrap(),
        "--cdr",
        cdr.to_str().unwrap(),
        "--record",
        recordings.to_str().unwrap(),
    ]);
    let (busy, answering) = (
        Phone::new("PCMU", 0, 8000, 523),
        Phone::new("PCMA", 8, 8000, 784),
    );
    let phones = alice_sipp_phones(
        &bridge,
        [
            ("device-early-busy.xml", busy.port().to_string()),
            ("device-early-answers.xml", answering.port().to_string()),
        ],
    );
    let mut bob = config.bob();
    let call_id = bob_calls_alice_on_early_media(&bridge, &mut bob);
    let media_port = bridge.media_port(&call_id);
    busy.call(media_port);
    answering.call(media_port);
    let first_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(3));
    assert!(
        first_heard.is_some_and(|f| (f - 523.0).abs() < 15.0),
        "the app hears the first phone's early media: {first_heard:?} Hz\n{:#?}",
        bridge.logs()
    );
    bridge
        .wait_for_log(
            |l| l.contains(&format!("call {call_id}: ")) && l.ends_with(": 486 Busy Here"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("the first phone is busy: {:#?}", bridge.logs()));
    // A busy phone sends no more RTP.
    drop(busy);
    let then_heard = frequency_heard_by(&mut bob, 784.0, Duration::from_secs(4));
    let answered = bridge.logs().iter().any(|l| says_answered(&call_id)(l));
    assert!(
        then_heard.is_some_and(|f| (f - 784.0).abs() < 15.0) && !answered,
        "then the other phone's, before it answers: {then_heard:?} Hz (answered: {answered})\n{:#?}",
        bridge.logs()
    );
    bridge
        .wait_for_log(says_answered(&call_id), Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the other phone answers: {:#?}", bridge.logs()));
    let app_heard = frequency_heard_by(&mut bob, 784.0, Duration::from_secs(5));
    let phone_heard = frequency_heard_by_phone(&answering, 660.0);
    bob.command(json!({"op": "hangUp"}));
    for (phone, role) in phones.into_iter().zip(["busy", "answering"]) {
        let (success, output) = phone.join().unwrap();
        assert!(success, "the {role} phone:\n{output}\n{:#?}", bridge.logs());
    }
    assert!(
        app_heard.is_some_and(|f| (f - 784.0).abs() < 15.0)
            && phone_heard.is_some_and(|f| (f - 660.0).abs() < 20.0),
        "after the answer the app heard {app_heard:?} Hz (the phone's 784), the phone {phone_heard:?} Hz (the app's 660)"
    );
    let lines = wait_for_cdr(&cdr, 1);
    let recording = lines[0]["recording"].as_str().expect("a recording");
    assert_tones_recorded(recording, &[523.0, 784.0, 660.0]);
}

/// The SIP server named by its domain alone, as hosted PBXs and SIP trunks
/// are: found by its DNS SRV records (RFC 3263, from a real DNS server),
/// the next server tried when one is silent or answers 503, or reached
/// through the outbound proxy (which was silently ignored unless written
/// as IP:port). Either way the app's call reaches alice's phone there,
/// named at the domain.
#[test]
fn an_app_call_reaches_a_sip_server_by_its_srv_records_or_its_outbound_proxy() {
    let _serial = one_at_a_time();
    let by_srv = PhoneAtDomain::with_sip(&tempdir(), |_| "domain = \"pbx.sipcc.test\"".into());
    // The domain's first server is silent, its second out of service.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let unavailable_port = support::free_port();
    let srv = |port: u16, priority: u16| {
        format!("--srv-host=_sip._udp.pbx.sipcc.test,sbc.sipcc.test,{port},{priority},50")
    };
    let dns = Dnsmasq::start(&[
        srv(silent.local_addr().unwrap().port(), 10),
        srv(unavailable_port, 20),
        srv(by_srv.sip_port, 30),
        "--host-record=sbc.sipcc.test,127.0.0.1".into(),
    ]);
    let bridge =
        BridgeProcess::start_resolving_with(&dns, &["--config", by_srv.config.to_str().unwrap()]);
    let unavailable = sipp_server(unavailable_port, "unavailable-server.xml", &[]);
    app_call_answered_at(&by_srv, &bridge, &dns.log());
    assert!(
        dns.log().contains("_sip._udp.pbx.sipcc.test"),
        "{}",
        dns.log()
    );
    let mut invite = [0; 2048];
    silent.set_nonblocking(true).unwrap();
    let received = silent.recv(&mut invite).unwrap_or(0);
    assert!(
        invite[..received].starts_with(b"INVITE sip:alice@pbx.sipcc.test"),
        "the first server got the INVITE first: {:?}",
        String::from_utf8_lossy(&invite[..received])
    );
    let (refused, output) = unavailable.join().unwrap();
    assert!(refused, "the second server was tried next:\n{output}");
    drop(bridge);

    let through_proxy = PhoneAtDomain::with_sip(&tempdir(), |sip_port| {
        format!(
            "domain = \"pbx.sipcc.test\"\noutbound_proxy = \"sip:127.0.0.1:{sip_port};transport=udp;lr\""
        )
    });
    let bridge = BridgeProcess::start(&["--config", through_proxy.config.to_str().unwrap()]);
    app_call_answered_at(&through_proxy, &bridge, "");
}

/// Bob calls alice, whose phone at `domain` answers; bob hangs up.
fn app_call_answered_at(domain: &PhoneAtDomain, bridge: &BridgeProcess, context: &str) {
    let media_port = support::free_even_port().to_string();
    let phone = domain.answer("answer-at-domain.xml", &["-mp", &media_port]);
    let mut bob = domain.bob();
    bob.command(json!({"op": "call", "to": "alice"}));
    bob.wait_event("accepted", Duration::from_secs(20));
    bob.command(json!({"op": "hangUp"}));
    let (success, output) = phone.join().unwrap();
    assert!(
        success,
        "the phone at the domain answered and was hung up on:\n{output}\n{:#?}\n{context}",
        bridge.logs()
    );
}

/// A video phone (PCMU and H.264) calls alice, whose browser answers with
/// its camera: the phone's H.264 reaches the app as VP8, the app's VP8
/// reaches the phone as H.264, frames are decoded on both sides, the voices
/// still cross, alice's keypad reaches the phone, and the CDR names the
/// video's codecs and encoders.
#[test]
fn a_video_phone_and_an_app_user_see_and_hear_each_other() {
    let _serial = one_at_a_time();
    let mut call = VideoCallFromPhone::start("vp8", "video-call.xml", &[]);
    let seen = watch_video_call(&mut call.alice, &call.phone, &call.camera);
    seen.assert_both_ways(440.0, &call.bridge.logs());
    call.assert_keypad_reaches_the_phone();
    let cdr = call.finish();
    assert_eq!(cdr["video"]["app_codec"], "VP8", "{cdr}");
    let encoders = cdr["video"]["encoders"].as_array().unwrap();
    assert!(encoders.iter().any(|e| e == "vp8enc"), "{cdr}");
}

/// The same with alice's app in Firefox, which answers the bridge's offer
/// (audio and VP8) from its own WebRTC engine; its keypad (events at 8 kHz)
/// reaches the phone.
#[test]
fn a_video_phone_and_an_app_user_in_firefox_see_and_hear_each_other() {
    let _serial = one_at_a_time();
    let mut call = VideoCallFromPhone::start_in(Browser::Firefox, "vp8", "video-call.xml", &[]);
    let seen = watch_video_call(&mut call.alice, &call.phone, &call.camera);
    seen.assert_both_ways(440.0, &call.bridge.logs());
    call.assert_keypad_reaches_the_phone();
    let cdr = call.finish();
    assert_eq!(cdr["video"]["app_codec"], "VP8", "{cdr}");
}

/// The same with `--video h264`: the phone's H.264 passes through to the
/// app untouched (no encoder on the way) and the browser still decodes it.
/// 6 s in, the phone asks for a key frame (SIP INFO picture_fast_update):
/// the bridge asks the browser (PLI), whose encoder makes key frames only
/// when asked, and one reaches the phone.
#[test]
fn a_video_phones_h264_passes_through_to_the_app() {
    let (cdr, key_frames, key_frames_sent) = video_call("h264", "video-call-fast-update.xml");
    assert_eq!(cdr["video"]["app_codec"], "H264", "{cdr}");
    assert_eq!(cdr["video"]["encoders"], json!([]), "{cdr}");
    // The camera's first key frame left before the app's connection was up;
    // the browser decoded only thanks to the one its PLI got (RTCP from the bridge).
    assert!(
        key_frames_sent >= 2,
        "the browser's key-frame request never reached the phone's camera"
    );
    assert!(
        key_frames.iter().any(|t| *t >= Duration::from_millis(5500)),
        "no key frame after the phone's picture_fast_update: {key_frames:?}"
    );
}

/// An older desk phone, of H.264 level 1.2 (CIF at 15 frames a second)
/// and taking single NAL units only (packetization mode 0), calls alice:
/// the app's picture (320×240 at 30 frames a second, as Chromium starts)
/// reaches it scaled to what its level decodes at that rate, and with no
/// NAL unit in parts or aggregated, which such a phone would drop; x264
/// bounds the slices.
#[test]
fn a_cif_phone_taking_single_nal_units_decodes_the_apps_picture() {
    let _serial = one_at_a_time();
    let mut call = VideoCallFromPhone::start("vp8", "video-call-cif.xml", &[]);
    let seen = watch_video_call(&mut call.alice, &call.phone, &call.camera);
    let logs = call.bridge.logs();
    seen.assert_both_ways(440.0, &logs);
    let (width, height) = call.camera.largest_picture().expect("a decoded picture");
    // 6,000 macroblocks a second: 200 a frame at 30 frames a second.
    assert!(
        (width as u32).div_ceil(16) * (height as u32).div_ceil(16) <= 200,
        "the phone got {width}×{height}, more than level 1.2 decodes\n{logs:#?}"
    );
    assert_eq!(
        call.camera.packets_not_single_nal(),
        0,
        "fragments or aggregates reached a phone in packetization mode 0"
    );
    let cdr = call.finish();
    let encoders = cdr["video"]["encoders"].as_array().unwrap();
    assert!(encoders.iter().any(|e| e == "x264enc"), "{cdr}");
}

/// A video phone (PCMU and H.264 from GStreamer, signalling from SIPp
/// running `scenario`) calling alice, whose browser answers with its camera.
struct VideoCallFromPhone {
    bridge: BridgeProcess,
    alice: BrowserPeer,
    phone: Phone,
    camera: VideoPhone,
    signalling: Option<std::thread::JoinHandle<(bool, String)>>,
    /// When the phone's media started.
    started: std::time::Instant,
    cdr: std::path::PathBuf,
}

impl VideoCallFromPhone {
    /// A door station's "press # to open": alice's keypad reaches the phone
    /// in a video call too (webrtcbin's WebRTC leg).
    fn assert_keypad_reaches_the_phone(&mut self) {
        self.alice.command(json!({"op": "dtmf", "tones": "1#9"}));
        assert_eq!(
            self.phone.wait_for_digits(3),
            "1#9",
            "{:#?}",
            self.bridge.logs()
        );
    }

    /// The call `video-1` with `--video mode` (and `bridge_args`), its media flowing.
    fn start(mode: &str, scenario: &'static str, bridge_args: &[&str]) -> VideoCallFromPhone {
        Self::start_in(Browser::Chromium, mode, scenario, bridge_args)
    }

    /// The same with alice's app in `browser`.
    fn start_in(
        browser: Browser,
        mode: &str,
        scenario: &'static str,
        bridge_args: &[&str],
    ) -> VideoCallFromPhone {
        let cdr = tempdir().join("cdr.jsonl");
        let mut args = vec!["--cdr", cdr.to_str().unwrap(), "--video", mode];
        args.extend_from_slice(bridge_args);
        let bridge = BridgeProcess::start(&args);
        let alice = alice_answering_in(browser, &bridge, true);
        let phone = Phone::new("PCMU", 0, 8000, 440);
        let camera = VideoPhone::new();
        let (address, audio_port, video_port) = (
            bridge.address(),
            phone.port().to_string(),
            camera.port().to_string(),
        );
        let signalling = std::thread::spawn(move || {
            sipp(
                scenario,
                &address,
                "alice",
                &[
                    "-d",
                    "14000",
                    "-cid_str",
                    "video-%u",
                    "-key",
                    "phone_port",
                    &audio_port,
                    "-key",
                    "video_port",
                    &video_port,
                ],
            )
        });
        phone.call(bridge.media_port("video-1"));
        let (video_port, payload_type) = bridge.video_port(Some("video-1"));
        let started = std::time::Instant::now();
        camera.call(video_port, payload_type);
        VideoCallFromPhone {
            bridge,
            alice,
            phone,
            camera,
            signalling: Some(signalling),
            started,
            cdr,
        }
    }

    /// Waits for SIPp to finish the scenario, and for the call's CDR line.
    fn finish(&mut self) -> Value {
        let signalling = self
            .signalling
            .take()
            .expect("the call is not finished yet");
        let (success, output) = signalling.join().unwrap();
        assert!(success, "video call: {output}\n{:#?}", self.bridge.logs());
        wait_for_cdr(&self.cdr, 1)
            .into_iter()
            .find(|l| l["call_id"] == "video-1")
            .expect("a CDR line")
    }
}

/// One video call from a phone to alice with `--video mode` (SIPp running
/// `scenario`), frames and voices checked both ways; returns its CDR line,
/// when key frames reached the phone (since its media started), and how
/// many key frames the phone's camera made.
fn video_call(mode: &str, scenario: &'static str) -> (Value, Vec<Duration>, u64) {
    let _serial = one_at_a_time();
    let mut call = VideoCallFromPhone::start(mode, scenario, &[]);
    let seen = watch_video_call(&mut call.alice, &call.phone, &call.camera);
    seen.assert_both_ways(440.0, &call.bridge.logs());
    let cdr = call.finish();
    let key_frames = call
        .camera
        .key_frames()
        .iter()
        .map(|t| t.duration_since(call.started))
        .collect();
    (cdr, key_frames, call.camera.key_frames_sent())
}

/// A recorded video call: one MPEG-TS file holding both voices and both
/// pictures (the phone's H.264, and the app's as sent to the phone),
/// decodable after the hang-up.
#[test]
fn a_recorded_video_call_holds_both_voices_and_both_pictures() {
    let _serial = one_at_a_time();
    let recordings = tempdir();
    let mut call = VideoCallFromPhone::start(
        "vp8",
        "video-call.xml",
        &["--record", recordings.to_str().unwrap()],
    );
    let seen = watch_video_call(&mut call.alice, &call.phone, &call.camera);
    seen.assert_both_ways(440.0, &call.bridge.logs());
    let cdr = call.finish();
    let path = cdr["recording"]
        .as_str()
        .unwrap_or_else(|| panic!("the CDR names the recording: {cdr}"));
    assert!(path.ends_with(".ts"), "{path}");
    let recording = support::decode_recording(std::path::Path::new(path));
    assert_eq!(
        recording.video_frames.len(),
        2,
        "two pictures: {:?}",
        recording.video_frames
    );
    assert!(
        recording.video_frames.iter().all(|frames| *frames >= 30),
        "frames of each picture: {:?}",
        recording.video_frames
    );
    assert_tones(&recording.audio, 16000, &[440.0, 660.0]);
}

/// The video phone holds the call (both streams sendonly) and resumes:
/// the app's picture stands still meanwhile and moves again after.
#[test]
fn a_video_phone_on_hold_freezes_the_apps_picture() {
    let _serial = one_at_a_time();
    let mut call = VideoCallFromPhone::start("vp8", "video-hold.xml", &[]);
    // Frames decoded in 1.5 s.
    let rate = |alice: &mut BrowserPeer| {
        let before = frames_decoded(alice);
        std::thread::sleep(Duration::from_millis(1500));
        frames_decoded(alice) - before
    };
    let applied = |bridge: &BridgeProcess, direction: &str, count: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while bridge
            .logs()
            .iter()
            .filter(|l| l.contains(&format!("call video-1: PCMU {direction}")))
            .count()
            < count
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{direction} is applied: {:#?}",
                bridge.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    while frames_decoded(&mut call.alice) < 15 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = rate(&mut call.alice);
    applied(&call.bridge, "RecvOnly", 1);
    std::thread::sleep(Duration::from_millis(500));
    let held = rate(&mut call.alice);
    applied(&call.bridge, "SendRecv", 2);
    std::thread::sleep(Duration::from_millis(1000));
    let resumed = rate(&mut call.alice);
    assert!(before >= 10, "{before} frames in 1.5 s before the hold");
    assert!(held <= 2, "{held} frames in 1.5 s on hold");
    assert!(resumed >= 10, "{resumed} frames in 1.5 s after the resume");
    call.finish();
}

/// A bridge configuration whose SIP domain is a SIPp "phone" on a port of
/// its own (alice and bob mapped, their phones may register with the
/// bridge; unmapped callers through the gateway user; a CDR file beside
/// it), and that phone.
struct PhoneAtDomain {
    config: std::path::PathBuf,
    sip_port: u16,
    sandbox_port: u16,
}

impl PhoneAtDomain {
    fn new(dir: &std::path::Path) -> PhoneAtDomain {
        Self::with_sip(dir, |sip_port| format!("domain = \"127.0.0.1:{sip_port}\""))
    }

    /// With the `[sip]` settings that say how the phone's port is reached.
    fn with_sip(dir: &std::path::Path, reached: impl FnOnce(u16) -> String) -> PhoneAtDomain {
        let (sip_port, sandbox_port) = (support::free_port(), support::free_port());
        let config = dir.join("bridge.toml");
        std::fs::write(
            &config,
            format!(
                "[sip]\n{}\nregistrar = true\n\n\
                 [connectycube]\nsandbox = true\napi_url = \"http://127.0.0.1:{sandbox_port}\"\nchat_url = \"ws://127.0.0.1:{sandbox_port}/ws\"\n\
                 gateway_login = \"sip-gateway\"\ngateway_password = \"demo\"\n\n\
                 [[users]]\nextension = \"alice\"\nlogin = \"alice\"\npassword = \"demo\"\nsip_password = \"demo\"\n\n\
                 [[users]]\nextension = \"bob\"\nlogin = \"bob\"\npassword = \"demo\"\nsip_password = \"demo\"\n\n\
                 [cdr]\npath = \"{}\"\n",
                reached(sip_port),
                dir.join("cdr.jsonl").display()
            ),
        )
        .unwrap();
        PhoneAtDomain {
            config,
            sip_port,
            sandbox_port,
        }
    }

    /// SIPp answering one call to alice with `scenario` (and `args`); the
    /// thread yields its verdict and output.
    fn answer(&self, scenario: &str, args: &[&str]) -> std::thread::JoinHandle<(bool, String)> {
        sipp_server(self.sip_port, scenario, args)
    }

    /// Bob in Chromium on the bridge's sandbox, his microphone a 660 Hz tone.
    fn bob(&self) -> BrowserPeer {
        let sandbox = format!("http://localhost:{}/", self.sandbox_port);
        BrowserPeer::start(&sandbox, "bob", "demo", 660)
    }
}

/// Bob's browser places a video call to alice, whose phone (SIPp answering
/// with PCMU and H.264, media from GStreamer phones) is at the SIP domain:
/// the INVITE offers H.264 video, and frames and voices cross both ways.
#[test]
fn an_app_video_call_reaches_a_video_phone() {
    let _serial = one_at_a_time();
    let domain = PhoneAtDomain::new(&tempdir());
    let bridge = BridgeProcess::start(&["--config", domain.config.to_str().unwrap()]);
    let phone = Phone::new("PCMU", 0, 8000, 523);
    let camera = VideoPhone::new();
    let (audio_port, video_port) = (phone.port().to_string(), camera.port().to_string());
    let answering = domain.answer(
        "answer-video.xml",
        &[
            "-key",
            "phone_port",
            &audio_port,
            "-key",
            "video_port",
            &video_port,
        ],
    );
    let mut bob = domain.bob();
    bob.command(json!({"op": "call", "to": "alice", "video": true}));
    let (bridge_video, payload_type) = bridge.video_port(None);
    let audio_line = bridge
        .wait_for_log(
            |l| l.contains("PCMU") && l.contains(" local "),
            Duration::from_secs(10),
        )
        .expect("the call's audio");
    let local = audio_line.split(" local ").nth(1).unwrap();
    let bridge_audio = local
        .split_whitespace()
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    phone.call(bridge_audio.parse().unwrap());
    camera.call(bridge_video, payload_type);
    bob.wait_event("accepted", Duration::from_secs(20));
    let seen = watch_video_call(&mut bob, &phone, &camera);
    // Bob's keypad reaches the phone (the events his browser offered,
    // taken into the bridge's answer).
    bob.command(json!({"op": "dtmf", "tones": "*5"}));
    let digits = phone.wait_for_digits(2);
    bob.command(json!({"op": "hangUp"}));
    let (success, output) = answering.join().unwrap();
    assert!(
        success,
        "the video phone's side: {output}\n{:#?}",
        bridge.logs()
    );
    seen.assert_both_ways(523.0, &bridge.logs());
    assert_eq!(digits, "*5", "{:#?}", bridge.logs());
}

/// What each side of a video call decoded and heard.
struct Seen {
    app_frames: u64,
    app_heard: Option<f64>,
    phone_frames: u64,
    phone_heard: Option<f64>,
}

/// The video frames the app has decoded so far.
fn frames_decoded(app: &mut BrowserPeer) -> u64 {
    app.command(json!({"op": "framesDecoded"}))
        .as_u64()
        .unwrap_or(0)
}

/// The video frames the app has decoded once `at_least`, or after `within`.
fn frames_decoded_by(app: &mut BrowserPeer, at_least: u64, within: Duration) -> u64 {
    let deadline = std::time::Instant::now() + within;
    let mut frames = 0;
    while std::time::Instant::now() < deadline && frames < at_least {
        std::thread::sleep(Duration::from_millis(500));
        frames = frames_decoded(app);
    }
    frames
}

/// Watches a video call until both sides decoded 30 frames (15 s at most).
fn watch_video_call(app: &mut BrowserPeer, phone: &Phone, camera: &VideoPhone) -> Seen {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (mut app_frames, mut app_heard) = (0, None);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        app_frames = frames_decoded(app);
        app_heard = app.command(json!({"op": "frequency"})).as_f64();
        if app_frames >= 30 && camera.frames() >= 30 {
            break;
        }
    }
    Seen {
        app_frames,
        app_heard,
        phone_frames: camera.frames(),
        phone_heard: phone.heard_frequency(),
    }
}

impl Seen {
    /// Frames both ways, the phone's `phone_hz` at the app and the app's
    /// 660 Hz at the phone.
    fn assert_both_ways(&self, phone_hz: f64, logs: &[String]) {
        let Seen {
            app_frames,
            app_heard,
            phone_frames,
            phone_heard,
        } = self;
        assert!(
            *app_frames >= 30,
            "the app decoded {app_frames} frames of the phone's video\n{logs:#?}"
        );
        assert!(
            *phone_frames >= 30,
            "the phone decoded {phone_frames} frames of the app's video\n{logs:#?}"
        );
        assert!(
            app_heard.is_some_and(|f| (f - phone_hz).abs() < 15.0),
            "the app heard {app_heard:?} instead of {phone_hz} Hz"
        );
        assert!(
            phone_heard.is_some_and(|f| (f - 660.0).abs() < 20.0),
            "the phone heard {phone_heard:?} instead of 660 Hz"
        );
    }
}

/// baresip, registered as alice with a camera (fakevideo) and only H.264,
/// answers bob's video call from Chromium: with `--video vp8` the bridge
/// transcodes both ways, with `--video h264` the browser's H.264 passes
/// through. Each side decodes the other's frames.
#[test]
fn baresip_with_a_camera_and_an_app_see_each_other() {
    for mode in ["vp8", "h264"] {
        let _serial = one_at_a_time();
        let bridge = BridgeProcess::start(&["--video", mode]);
        let port = bridge.sip_port;
        let phone = std::thread::spawn(move || {
            let phone = Baresip::new("alice", "demo", port, 523, "g711").with_video();
            let output = phone.answer_calls(20);
            (phone.decoded_frame(), output)
        });
        let mut bob = bob_calls_registered_alice(&bridge, true);
        let app_frames = frames_decoded_by(&mut bob, 30, Duration::from_secs(12));
        bob.command(json!({"op": "hangUp"}));
        let (phone_frame, output) = phone.join().unwrap();
        let logs = bridge.logs();
        assert!(
            logs.iter()
                .any(|l| l.contains("video at") && l.contains("H264")),
            "{mode}: the call has H.264 video toward the phone\n{output}\n{logs:#?}"
        );
        let context = format!("{mode}\n{output}\n{logs:#?}");
        assert_app_and_baresip_saw_each_other(app_frames, phone_frame, &context);
    }
}

/// An app that accepts but never sends a candidate, in its answer or after:
/// the WebRTC connection never comes up, and the bridge ends the call after
/// its ICE timeout, with BYE and a Reason (504) to the phone and the cause
/// in the CDR.
#[test]
fn an_app_that_never_sends_candidates_is_hung_up_after_the_ice_timeout() {
    let _serial = one_at_a_time();
    gst::init().unwrap();
    gstsipcc::register().unwrap();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut alice = runtime.block_on(support::RustUser::sign_in(
        &format!("http://127.0.0.1:{}", bridge.sandbox_port),
        &format!("ws://localhost:{}/ws", bridge.sandbox_port),
        "alice",
        "demo",
    ));
    let address = bridge.address();
    let phone = std::thread::spawn(move || {
        sipp(
            "wait-for-ice-timeout.xml",
            &address,
            "alice",
            &["-cid_str", "no-ice-%u", "-timeout", "60s"],
        )
    });
    let call = runtime.block_on(alice.signal(Duration::from_secs(15), |s| {
        s.signal.signal_type == SignalType::Call
    }));
    // A real answer from a WebRTC stack, given the offer without the
    // bridge's candidates and sent back without its own.
    let callee = gst::parse::launch("connectycubesrc name=webrtc session=mute-callee ! fakesink")
        .unwrap()
        .downcast::<gst::Bin>()
        .unwrap();
    let webrtc = callee.by_name("webrtc").unwrap();
    let (answers, answered) = std::sync::mpsc::channel::<String>();
    webrtc.connect("local-description", false, move |args| {
        if args[1].get::<String>().as_deref() == Ok("answer") {
            let _ = answers.send(args[2].get::<String>().unwrap());
        }
        None
    });
    callee.set_state(gst::State::Playing).unwrap();
    let without_candidates = |sdp: &str| {
        sdp.split("\r\n")
            .filter(|line| !line.starts_with("a=candidate:"))
            .collect::<Vec<_>>()
            .join("\r\n")
    };
    let offer = without_candidates(call.signal.sdp.as_deref().expect("an offer"));
    webrtc.emit_by_name::<()>("set-remote-description", &[&"offer", &offer]);
    let answer = answered
        .recv_timeout(Duration::from_secs(10))
        .expect("an answer");
    let mut accept = CallSignal::new(
        SignalType::Accept,
        &call.signal.session_id,
        call.signal.call_type,
        call.from_user_id,
        vec![alice.user_id],
    );
    accept.sdp = Some(without_candidates(&answer));
    alice.send_signal(call.from_user_id, &accept);

    let (success, output) = phone.join().unwrap();
    callee.set_state(gst::State::Null).unwrap();
    assert!(
        success,
        "BYE with a 504 Reason: {output}\n{:#?}",
        bridge.logs()
    );
    let line = wait_for_cdr(&cdr, 1)
        .into_iter()
        .find(|l| l["call_id"] == "no-ice-1")
        .expect("a CDR line");
    let cause = line["cause"].as_str().unwrap();
    assert!(
        cause.contains("WebRTC connection is") && cause.contains("after answering"),
        "{line}"
    );
}

/// The app in Firefox (Debian's Firefox ESR), another WebRTC engine than
/// Chromium's: its own SDP (Opus and VP8 on other payload types), DTLS and
/// ICE, and host candidates hidden behind mDNS names as in every Firefox,
/// so the bridge meets it only by the addresses its checks come from. A
/// phone calls alice in Firefox (the bridge offers), and her keypad (events
/// at 8 kHz, the only ones Firefox sends) reaches it; then bob calls from
/// Firefox alice's registered phone (baresip), once for her voice (the
/// shared stack answers Firefox's offer) and once with his camera to hers
/// (webrtcbin answers it): each time both hear, and then see, each other,
/// and bob's keypad reaches the phone.
#[test]
fn app_users_in_firefox_and_phones_hear_each_other_both_ways() {
    let _serial = one_at_a_time();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut alice = BrowserPeer::start_in(Browser::Firefox, &sandbox, "alice", "demo", 660);
    alice.command(json!({"op": "autoAnswer", "on": true}));
    let (phone, signalling) = phone_call(&bridge, "call.xml", "alice", PCMU_440, 10, "to-firefox");
    assert_each_hears_the_other(&bridge, &mut alice, &phone);
    alice.command(json!({"op": "dtmf", "tones": "1#9"}));
    assert_eq!(phone.wait_for_digits(3), "1#9", "{:#?}", bridge.logs());
    let (success, output) = signalling.join().unwrap();
    assert!(success, "the SIP call: {output}");
    alice.wait_event("hung up", Duration::from_secs(10));
    drop(alice);

    let mut bob = BrowserPeer::start_in(Browser::Firefox, &sandbox, "bob", "demo", 660);
    for video in [false, true] {
        let registered = registrations_of(&bridge, "alice");
        let port = bridge.sip_port;
        let phone = std::thread::spawn(move || {
            let phone = Baresip::new("alice", "demo", port, 523, "g711");
            let phone = if video { phone.with_video() } else { phone };
            let output = phone.answer_calls(15);
            let heard = phone.heard().and_then(|wav| wav_frequency(&wav));
            (heard, phone.decoded_frame(), output)
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while registrations_of(&bridge, "alice") == registered {
            assert!(
                std::time::Instant::now() < deadline,
                "alice's phone registers"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        bob.command(json!({"op": "call", "to": "alice", "video": video}));
        bob.wait_event("accepted", Duration::from_secs(15));
        let app_heard = frequency_heard_by(&mut bob, 523.0, Duration::from_secs(10));
        bob.command(json!({"op": "dtmf", "tones": "*5"}));
        // The phone's recording holds a few seconds of the app too.
        std::thread::sleep(Duration::from_secs(3));
        let app_frames = match video {
            true => frames_decoded_by(&mut bob, 30, Duration::from_secs(10)),
            false => 0,
        };
        bob.command(json!({"op": "hangUp"}));
        let (phone_heard, phone_frame, output) = phone.join().unwrap();
        let context = format!("video {video}\n{output}");
        assert_heard_each_other(app_heard, phone_heard, &context, &bridge);
        for digit in ["'*'", "'5'"] {
            assert!(
                output.contains(&format!("received event: {digit}")),
                "bob's keypad reaches the phone: {digit}\n{context}"
            );
        }
        if video {
            assert_app_and_baresip_saw_each_other(app_frames, phone_frame, &context);
        }
    }

    let lines = wait_for_cdr(&cdr, 3);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["app_codec"], "OPUS", "{line}");
    }
}

/// How many times `user`'s phone registered with the bridge so far.
fn registrations_of(bridge: &BridgeProcess, user: &str) -> usize {
    let registered = format!("registrar: {user} registered");
    bridge
        .logs()
        .iter()
        .filter(|l| l.contains(&registered))
        .count()
}

/// Carol calls alice, bob and dave together (a group call); bob's calls go
/// to his registered phone (baresip). The SDK connects every two opponents
/// too, each link made by the one with the higher user id: the bridge
/// tells alice (below bob) at once that bob's phone takes no part in the
/// mesh, and refuses dave's call (dave is above bob), with the reason,
/// rather than let alice wait and dave dial for a minute. When dave and
/// alice leave, their `hangUp`s reach bob as well: the phone's call with
/// carol goes on, and ends only when carol hangs up. The phone heard
/// carol throughout.
#[test]
fn a_group_call_keeps_the_phone_when_other_app_users_leave() {
    let _serial = one_at_a_time();
    let cdr = tempdir().join("cdr.jsonl");
    let bridge = BridgeProcess::start(&["--cdr", cdr.to_str().unwrap()]);
    let sandbox = format!("http://localhost:{}/", bridge.sandbox_port);
    let mut alice = BrowserPeer::start(&sandbox, "alice", "demo", 440);
    let mut dave = BrowserPeer::start(&sandbox, "dave", "demo", 880);
    let mut carol = BrowserPeer::start(&sandbox, "carol", "demo", 660);
    for user in [&mut alice, &mut dave] {
        user.command(json!({"op": "autoAnswer", "on": true}));
    }
    let port = bridge.sip_port;
    let phone = std::thread::spawn(move || {
        let phone = Baresip::new("bob", "demo", port, 523, "g711");
        let output = phone.answer_calls(25);
        (phone.heard().and_then(|wav| wav_frequency(&wav)), output)
    });
    assert_registered(&bridge, "bob");
    carol.command(json!({"op": "call", "to": ["alice", "bob", "dave"]}));

    for (user, name) in [(&mut alice, "alice"), (&mut dave, "dave")] {
        let refused = user.wait_event("rejected", Duration::from_secs(20));
        assert!(
            refused.contains("talks only with the user who called it"),
            "{name} is told bob's phone takes no part in the mesh: {refused}\n{:#?}",
            bridge.logs()
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    for user in [&mut dave, &mut alice] {
        user.command(json!({"op": "hangUp"}));
    }
    std::thread::sleep(Duration::from_secs(3));
    let (alice_id, dave_id) = (alice.user_id, dave.user_id);
    let bob_left = carol
        .command(json!({"op": "events"}))
        .as_array()
        .unwrap()
        .iter()
        .any(|e| {
            let by = e["detail"].as_str().unwrap_or_default();
            e["kind"] == "hung up"
                && !by.starts_with(&format!("by {alice_id} "))
                && !by.starts_with(&format!("by {dave_id} "))
        });
    assert!(
        !bob_left && cdr_lines(&cdr).is_empty(),
        "the phone's call goes on after the others left: {:#?}",
        bridge.logs()
    );
    carol.command(json!({"op": "hangUp"}));
    let (phone_heard, output) = phone.join().unwrap();
    assert!(
        phone_heard.is_some_and(|f| (f - 660.0).abs() < 20.0),
        "the phone heard {phone_heard:?} instead of carol's 660 Hz\n{output}"
    );
    let lines = wait_for_cdr(&cdr, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let cause = lines[0]["cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains(&format!("user {} hung up", carol.user_id)),
        "carol's hang-up ends the call: {}",
        lines[0]
    );
}

/// A group call's link to a phone's user that comes without the caller's
/// own call (dave, an opponent of carol's group call, calls alice under
/// carol's id, as the SDK does): refused with the reason, and alice's
/// phone (a registered baresip) does not ring.
#[test]
fn a_group_calls_link_without_its_callers_call_does_not_ring_the_phone() {
    let _serial = one_at_a_time();
    let bridge = BridgeProcess::start(&[]);
    let port = bridge.sip_port;
    let phone = std::thread::spawn(move || {
        Baresip::new("alice", "demo", port, 523, "g711").answer_calls(6)
    });
    assert_registered(&bridge, "alice");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let api_url = format!("http://127.0.0.1:{}", bridge.sandbox_port);
    let chat_url = format!("ws://localhost:{}/ws", bridge.sandbox_port);
    let sign_in = |login| {
        runtime.block_on(support::RustUser::sign_in(
            &api_url, &chat_url, login, "demo",
        ))
    };
    let (carol, mut dave) = (sign_in("carol"), sign_in("dave"));
    let alice_id = mapped_user_id(&bridge, "alice");
    let mut link = CallSignal::new(
        SignalType::Call,
        "group-call-1",
        bridge_protocol::connectycube::signaling::CallType::Audio,
        carol.user_id,
        vec![alice_id, dave.user_id],
    );
    link.sdp = Some("v=0\r\n".into());
    dave.send_signal(alice_id, &link);
    let refused = runtime.block_on(dave.signal(Duration::from_secs(10), |s| {
        s.signal.signal_type == SignalType::Reject
    }));
    assert_eq!(refused.from_user_id, alice_id);
    assert_eq!(refused.signal.session_id, "group-call-1");
    let reason = refused.signal.user_info.iter().find(|(k, _)| k == "reason");
    assert!(
        reason.is_some_and(|(_, r)| r.contains("talks only with the user who called it")),
        "{refused:?}\n{:#?}",
        bridge.logs()
    );
    let output = phone.join().unwrap();
    assert!(
        !output.contains("answering call") && !bridge.logged("dialling"),
        "the phone does not ring:\n{output}\n{:#?}",
        bridge.logs()
    );
}
