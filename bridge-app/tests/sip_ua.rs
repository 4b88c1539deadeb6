//! The SIP leg of `sip-cc-bridge run` against SIPp: calls in every audio
//! codec with the echo heard back at the right frequency, the tone service
//! and RFC 4733 digits (reported, and played back), INFO DTMF, hold and resume, offers in the ACK,
//! session timers, requests out of order or while ringing, CANCEL, no answer, 404, 488, 422, a refused
//! transfer (603), digest authentication,
//! the RTP timeout, TCP, malformed requests next to a call in progress, and stopping
//! (SIGTERM, draining), new calls refused while the bridge's CPU is over its limit, and
//! Kamailio's dispatcher taking a full bridge out of its rotation (OPTIONS 503) and back.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use bridge_protocol::dtmf::TelephoneEvent;
use support::{BridgeProcess, free_even_port, sipp};

fn assert_sipp((success, output): (bool, String), what: &str) {
    assert!(success, "{what} failed:\n{output}");
}

#[test]
fn options_are_answered_with_allow() {
    let bridge = BridgeProcess::start(&[]);
    assert_sipp(
        sipp("options.xml", &bridge.address(), "echo", &[]),
        "OPTIONS",
    );
}

#[test]
fn refusals_carry_the_right_status() {
    let mut bridge = BridgeProcess::start(&[]);
    assert_sipp(
        sipp("not-found.xml", &bridge.address(), "nobody", &[]),
        "unknown user → 404",
    );
    assert_sipp(
        sipp("no-common-codec.xml", &bridge.address(), "echo", &[]),
        "GSM only → 488",
    );
    assert_sipp(
        sipp("session-too-short.xml", &bridge.address(), "echo", &[]),
        "Session-Expires 30 → 422 with Min-SE 90",
    );
    assert_sipp(
        sipp("refer-refused.xml", &bridge.address(), "echo", &[]),
        "a transfer of a call to a service → 603, and the call goes on",
    );
    assert_sipp(
        sipp("replace-refused.xml", &bridge.address(), "echo", &[]),
        "Replaces without tags → 400; naming no call → 481",
    );
    assert!(bridge.is_running());
}

/// A REGISTER may bind several Contacts at once (RFC 3261 §10.2.1): each
/// is one of the extension's phones, and each can go on its own.
#[test]
fn a_register_binds_each_of_its_contacts() {
    let port = support::free_port();
    let bridge = BridgeProcess::start(&["--management", &format!("127.0.0.1:{port}")]);
    assert_sipp(
        sipp(
            "register-contacts.xml",
            &bridge.address(),
            "alice",
            &["-au", "alice", "-ap", "demo"],
        ),
        "three Contacts bound, then one taken away",
    );
    assert_sipp(
        sipp(
            "register-too-many-contacts.xml",
            &bridge.address(),
            "alice",
            &["-au", "alice", "-ap", "demo"],
        ),
        "more Contacts at once than an extension's phones: 400",
    );
    let (_, body) = support::http_get(port, "/stats", Some(support::MANAGEMENT_TOKEN));
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut users: Vec<String> = stats["phones"]["alice"]
        .as_array()
        .unwrap_or_else(|| panic!("no phones of alice: {stats:#}"))
        .iter()
        .filter_map(|phone| phone["contact"].as_str())
        .filter_map(|contact| contact.strip_prefix("sip:")?.split('@').next())
        .map(str::to_owned)
        .collect();
    users.sort();
    assert_eq!(users, ["first", "third"], "{stats:#}");
}

#[test]
fn session_timer_is_granted_and_refreshed() {
    let bridge = BridgeProcess::start(&[]);
    assert_sipp(
        sipp("session-timer.xml", &bridge.address(), "echo", &[]),
        "session timer",
    );
}

#[test]
fn hold_resume_and_an_offer_in_the_ack() {
    let bridge = BridgeProcess::start(&[]);
    assert_sipp(
        sipp(
            "hold.xml",
            &bridge.address(),
            "echo",
            &["-cid_str", "hold-%u"],
        ),
        "hold / resume / re-INVITE without SDP",
    );
    let directions = bridge.wait_for_logs(
        |l| l.contains("call hold-1: PCMU"),
        4,
        Duration::from_secs(5),
    );
    assert_eq!(directions.len(), 4, "{directions:#?}");
    assert!(directions[1].contains("RecvOnly"), "{directions:#?}");
    assert!(directions[2].contains("SendRecv"), "{directions:#?}");
}

/// An SRTP call's re-offer (the bridge's, in its 200 to a re-INVITE
/// without SDP) keeps it SRTP: plain RTP there would strip its protection.
#[test]
fn an_srtp_calls_re_offer_stays_srtp() {
    let bridge = BridgeProcess::start(&[]);
    assert_sipp(
        sipp(
            "srtp-reoffer.xml",
            &bridge.address(),
            "echo",
            &["-cid_str", "srtp-%u"],
        ),
        "SRTP answer, then an SRTP re-offer",
    );
    let streams = bridge.wait_for_logs(
        |l| l.contains("call srtp-1: PCMU"),
        2,
        Duration::from_secs(5),
    );
    assert_eq!(streams.len(), 2, "{streams:#?}");
    assert!(
        streams
            .iter()
            .all(|l| l.contains("SRTP AES_CM_128_HMAC_SHA1_80")),
        "{streams:#?}"
    );
}

#[test]
fn info_dtmf_becomes_call_events() {
    let bridge = BridgeProcess::start(&[]);
    assert_sipp(
        sipp(
            "info-dtmf.xml",
            &bridge.address(),
            "echo",
            &["-cid_str", "info-%u"],
        ),
        "INFO DTMF",
    );
    for digit in ['5', '#'] {
        assert!(
            bridge
                .wait_for_log(
                    |l| l.contains(&format!("call info-1: DTMF {digit} (SIP INFO)")),
                    Duration::from_secs(2)
                )
                .is_some(),
            "digit {digit} not reported: {:#?}",
            bridge.logs()
        );
    }
}

#[test]
fn a_request_out_of_order_gets_500_and_the_call_goes_on() {
    let bridge = BridgeProcess::start(&[]);
    assert_sipp(
        sipp(
            "out-of-order-cseq.xml",
            &bridge.address(),
            "echo",
            &["-cid_str", "order-%u"],
        ),
        "500 for CSeq 5 after 11, then BYE answered",
    );
    let logs = bridge.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("call order-1: DTMF 5 (SIP INFO)")),
        "the INFO in order was not taken: {logs:#?}"
    );
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("call order-1: DTMF # (SIP INFO)")),
        "the INFO out of order was acted on: {logs:#?}"
    );
}

#[test]
fn a_ringing_call_can_be_cancelled_or_go_unanswered() {
    let bridge = BridgeProcess::start(&[
        "--answer-delay-ms",
        "8000",
        "--no-answer-timeout-ms",
        "3000",
    ]);
    assert_sipp(
        sipp("cancel.xml", &bridge.address(), "echo", &[]),
        "CANCEL → 487",
    );
    assert_sipp(
        sipp("no-answer.xml", &bridge.address(), "echo", &[]),
        "no answer → 480",
    );
}

/// A request on a call still ringing gets 500 with Retry-After (the stack
/// would leave it unanswered, to be sent again until it times out), and
/// the call goes on to its answer.
#[test]
fn a_request_while_ringing_is_told_to_come_back() {
    let bridge = BridgeProcess::start(&["--answer-delay-ms", "1500"]);
    assert_sipp(
        sipp("early-info.xml", &bridge.address(), "echo", &[]),
        "INFO while ringing → 500 with Retry-After; then 200, ACK, BYE",
    );
}

/// An INVITE requiring an extension the bridge does not do gets 420 naming
/// it; one requiring 100rel (as some carriers' do) gets its 180 reliably:
/// sent again until the PRACK.
#[test]
fn what_an_invite_requires_is_done_or_refused_by_name() {
    let bridge = BridgeProcess::start(&["--answer-delay-ms", "2500"]);
    let (success, output) = sipp("require.xml", &bridge.address(), "echo", &[]);
    assert_sipp(
        (success, output.clone()),
        "Require: x-teleportation → 420 Unsupported; Require: 100rel → 180 with RSeq, PRACK 200, then 200",
    );
    // SIPp's screen: "180 <---  messages  retransmissions  timeouts  unexpected".
    let resent = output
        .lines()
        .find(|l| l.trim_start().starts_with("180 <"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<u32>().ok());
    assert_eq!(
        resent,
        Some(1),
        "the 180 is sent again once in the 1.2 s before the PRACK, and not after it\n{output}"
    );
}

#[test]
fn direct_callers_must_answer_a_digest_challenge() {
    // Loopback is not a trusted server here, so SIPp counts as a direct caller.
    let bridge = BridgeProcess::start(&["--trust", "192.0.2.123", "--user", "alice:secret"]);
    assert_sipp(
        sipp(
            "auth.xml",
            &bridge.address(),
            "echo",
            &["-au", "alice", "-ap", "secret"],
        ),
        "digest with the right password",
    );
    assert_sipp(
        sipp(
            "auth-wrong.xml",
            &bridge.address(),
            "echo",
            &["-au", "alice", "-ap", "guess"],
        ),
        "digest with a wrong password → 403",
    );
    let phone_port = free_even_port().to_string();
    let (success, _) = sipp(
        "call.xml",
        &bridge.address(),
        "echo",
        &[
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
    );
    assert!(!success, "a call without credentials must not connect");
    assert!(
        bridge
            .logs()
            .iter()
            .all(|l| !l.contains("guess") && !l.contains("secret")),
        "no password in the log"
    );
}

#[test]
fn a_call_over_tcp() {
    let bridge = BridgeProcess::start(&[]);
    let phone_port = free_even_port().to_string();
    assert_sipp(
        sipp(
            "call.xml",
            &bridge.address(),
            "echo",
            &[
                "-t",
                "t1",
                "-d",
                "500",
                "-key",
                "pt",
                "8",
                "-key",
                "rtpmap",
                "PCMA/8000",
                "-key",
                "phone_port",
                &phone_port,
            ],
        ),
        "call over TCP",
    );
}

/// The phone's PCMU call to the echo, held for `hold_ms`, then hung up by the phone.
fn echo_call_in_progress(address: String, hold_ms: u32) -> std::thread::JoinHandle<(bool, String)> {
    let phone_port = free_even_port().to_string();
    std::thread::spawn(move || {
        sipp(
            "call.xml",
            &address,
            "echo",
            &[
                "-d",
                &hold_ms.to_string(),
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
    })
}

fn wait_for_the_call(bridge: &BridgeProcess) {
    let answered = bridge.wait_for_log(|l| l.contains(": PCMU SendRecv"), Duration::from_secs(10));
    assert!(answered.is_some(), "the call is up: {:#?}", bridge.logs());
}

#[test]
fn sigterm_ends_every_call_with_bye_and_the_bridge_exits() {
    let mut bridge = BridgeProcess::start(&[]);
    let address = bridge.address();
    let call = std::thread::spawn(move || sipp("bridge-stops.xml", &address, "echo", &[]));
    wait_for_the_call(&bridge);
    bridge.signal("TERM");
    assert_sipp(call.join().unwrap(), "BYE with Reason cause=503 on SIGTERM");
    assert_eq!(
        bridge.exited_within(Duration::from_secs(10)),
        Some(true),
        "the bridge exits cleanly on SIGTERM: {:#?}",
        bridge.logs()
    );
}

#[test]
fn a_draining_bridge_keeps_its_calls_and_refuses_new_ones() {
    let mut bridge = BridgeProcess::start(&["--drain-timeout-s", "60"]);
    let call = echo_call_in_progress(bridge.address(), 3000);
    wait_for_the_call(&bridge);
    let stopping = Instant::now();
    bridge.signal("TERM");
    assert_sipp(
        sipp("stopping.xml", &bridge.address(), "echo", &[]),
        "a new call while draining gets 503 with a Reason",
    );
    assert_sipp(
        sipp("options-stopping.xml", &bridge.address(), "echo", &[]),
        "OPTIONS while draining gets the same 503, so proxies route elsewhere",
    );
    assert_sipp(
        call.join().unwrap(),
        "the call in progress goes on until the phone hangs up",
    );
    assert_eq!(
        bridge.exited_within(Duration::from_secs(10)),
        Some(true),
        "the bridge exits once its last call ended: {:#?}",
        bridge.logs()
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "it did not wait for the drain timeout: {:?}",
        stopping.elapsed()
    );
}

#[test]
fn a_second_signal_ends_a_drain_at_once() {
    let mut bridge = BridgeProcess::start(&["--drain-timeout-s", "60"]);
    let address = bridge.address();
    let call = std::thread::spawn(move || sipp("bridge-stops.xml", &address, "echo", &[]));
    wait_for_the_call(&bridge);
    bridge.signal("TERM");
    let draining = bridge.wait_for_log(|l| l.contains("draining"), Duration::from_secs(5));
    assert!(draining.is_some(), "it drains: {:#?}", bridge.logs());
    bridge.signal("INT");
    assert_sipp(
        call.join().unwrap(),
        "BYE with Reason cause=503 on the second signal",
    );
    assert_eq!(bridge.exited_within(Duration::from_secs(10)), Some(true));
}

#[test]
fn a_silent_phone_is_hung_up_after_the_rtp_timeout() {
    let bridge = BridgeProcess::start(&["--rtp-timeout-ms", "1500"]);
    assert_sipp(
        sipp("wait-for-bye.xml", &bridge.address(), "echo", &[]),
        "BYE with Reason after the RTP timeout",
    );
}

/// A session timer a proxy added for a phone that knows nothing of them
/// (`Session-Expires` without `Supported: timer`): the bridge is the
/// refresher (`refresher=uas`) and refreshes at half the interval, by
/// UPDATE where the phone allows it and by re-INVITE where not, so the
/// session never expires under the call. Each takes 45 s of Min-SE's 90.
#[test]
fn the_bridge_refreshes_a_session_the_phone_does_not() {
    // The phone sends no RTP: only the session timer may end its call.
    let bridge = BridgeProcess::start(&["--rtp-timeout-ms", "120000"]);
    let refreshed_by = |allow: &'static str, call_id: &'static str| {
        let address = bridge.address();
        std::thread::spawn(move || {
            sipp(
                "session-refreshed-by-bridge.xml",
                &address,
                "echo",
                &[
                    "-key", "allow", allow, "-cid_str", call_id, "-timeout", "90s",
                ],
            )
        })
    };
    let by_update = refreshed_by("UPDATE, ", "by-update-%u");
    let by_invite = refreshed_by("INFO, ", "by-invite-%u");
    assert_sipp(by_update.join().unwrap(), "the bridge's UPDATE refresh");
    assert_sipp(by_invite.join().unwrap(), "the bridge's re-INVITE refresh");
    let logs = bridge.logs();
    for line in [
        "call by-update-1: refreshing the session by UPDATE",
        "call by-invite-1: refreshing the session by re-INVITE",
    ] {
        assert!(logs.iter().any(|l| l.contains(line)), "{line}: {logs:#?}");
    }
}

#[test]
fn a_delayed_offer_left_unanswered_in_the_ack_is_hung_up() {
    let bridge = BridgeProcess::start(&[]);
    assert_sipp(
        sipp(
            "delayed-offer-unanswered.xml",
            &bridge.address(),
            "echo",
            &[],
        ),
        "BYE with Reason 488 after an ACK without the answer",
    );
}

#[test]
fn malformed_requests_leave_a_call_in_progress_alone() {
    let mut bridge = BridgeProcess::start(&[]);
    let call = echo_call_in_progress(bridge.address(), 4000);
    std::thread::sleep(Duration::from_millis(500));
    assert_sipp(
        sipp("malformed.xml", &bridge.address(), "echo", &[]),
        "malformed requests answered 400/488 or dropped",
    );
    // Raw garbage, straight onto the SIP port.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for garbage in [
        &b"\x00\x01\x02"[..],
        b"INVITE\r\n\r\n",
        &[0xffu8; 1400],
        b"SIP/2.0 200 OK\r\n\r\n",
    ] {
        socket.send_to(garbage, bridge.address()).unwrap();
    }
    assert_sipp(call.join().unwrap(), "the call in progress");
    assert!(bridge.is_running());
    // Without a Call-ID or CSeq there is no transaction to answer in: dropped, logged.
    for refusal in [
        "missing header: Call-ID",
        "missing header: CSeq",
        "missing Contact, 400",
        "malformed SDP",
        "Subject header longer than 2048 bytes, 400",
    ] {
        assert!(
            bridge.logged(refusal),
            "no {refusal:?} in {:#?}",
            bridge.logs()
        );
    }
    assert_sipp(
        sipp("options.xml", &bridge.address(), "echo", &[]),
        "OPTIONS afterwards",
    );
}

#[test]
fn the_echo_returns_the_callers_tone_in_every_codec() {
    let bridge = BridgeProcess::start(&[]);
    let codecs: [support::PhoneCodec; 5] = [
        ("PCMU", 0, 8000, "PCMU/8000", 440),
        ("PCMA", 8, 8000, "PCMA/8000", 523),
        ("G722", 9, 8000, "G722/8000", 660),
        ("G729", 18, 8000, "G729/8000", 587),
        ("OPUS", 111, 48000, "opus/48000/2", 880),
    ];
    let calls: Vec<_> = codecs
        .iter()
        .map(|&codec| {
            let (name, frequency) = (codec.0, codec.4);
            let (phone, signalling) = support::phone_call(
                &bridge,
                "call.xml",
                "echo",
                codec,
                4,
                &format!("echo-{name}"),
            );
            (name, frequency, phone, signalling)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    for (name, frequency, phone, signalling) in calls {
        let heard = phone.heard_frequency();
        drop(phone);
        assert_sipp(signalling.join().unwrap(), &format!("{name} call"));
        let heard = heard.unwrap_or_else(|| panic!("{name}: the phone heard silence"));
        assert!(
            (heard - f64::from(frequency)).abs() < f64::from(frequency) * 0.03,
            "{name}: sent {frequency} Hz, heard {heard:.0} Hz"
        );
        assert!(
            bridge.logged(&format!("call echo-{name}-1: {name} SendRecv")),
            "{name} negotiated"
        );
    }
}

/// G.711 μ-law to linear (ITU-T G.711).
fn ulaw_to_linear(byte: u8) -> f32 {
    let byte = !byte;
    let exponent = (byte >> 4) & 0x07;
    let magnitude = ((i32::from(byte & 0x0f) << 3) + 0x84) << exponent;
    let sample = magnitude - 0x84;
    (if byte & 0x80 != 0 { -sample } else { sample }) as f32 / 32768.0
}

#[test]
fn the_tone_is_heard_and_rfc4733_digits_are_reported() {
    let bridge = BridgeProcess::start(&[]);
    let phone = UdpSocket::bind(("127.0.0.1", free_even_port())).unwrap();
    phone
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let phone_port = phone.local_addr().unwrap().port().to_string();
    let address = bridge.address();
    let signalling = std::thread::spawn(move || {
        sipp(
            "call.xml",
            &address,
            "tone",
            &[
                "-d",
                "4000",
                "-cid_str",
                "tone-%u",
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
    let bridge_media: SocketAddr = ([127, 0, 0, 1], bridge.media_port("tone-1")).into();

    let mut samples = Vec::new();
    let mut buffer = [0u8; 1500];
    while samples.len() < 8000 {
        let (len, from) = phone.recv_from(&mut buffer).expect("the tone arrives");
        assert_eq!(from, bridge_media, "RTP comes from the port in the SDP");
        let Ok(packet) = rtp_types::RtpPacket::parse(&buffer[..len]) else {
            continue;
        };
        assert_eq!(packet.payload_type(), 0);
        samples.extend(packet.payload().iter().map(|&b| ulaw_to_linear(b)));
    }
    let heard = bridge_protocol::tone::dominant_frequency(&samples, 8000).unwrap();
    assert!((heard - 440.0).abs() < 10.0, "heard {heard:.0} Hz");

    // Two digits as a phone sends them: progress packets, then the end three times.
    let mut seq = 100u16;
    for (index, digit) in [(0u32, 7u8), (1, 11)] {
        let timestamp = 16_000 + index * 8000;
        for (end, duration) in [
            (false, 160u16),
            (false, 320),
            (true, 800),
            (true, 800),
            (true, 800),
        ] {
            let payload = TelephoneEvent {
                event: digit,
                end,
                volume: 10,
                duration,
            }
            .to_bytes();
            let packet = rtp_types::RtpPacketBuilder::new()
                .payload_type(101)
                .sequence_number(seq)
                .timestamp(timestamp)
                .ssrc(0x5eed)
                .payload(payload.as_slice())
                .write_vec()
                .unwrap();
            phone.send_to(&packet, bridge_media).unwrap();
            seq += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for digit in ['7', '#'] {
        assert!(
            bridge
                .wait_for_log(
                    |l| l.contains(&format!("call tone-1: DTMF {digit} (100 ms, RFC 4733)")),
                    Duration::from_secs(3)
                )
                .is_some(),
            "digit {digit} not reported: {:#?}",
            bridge.logs()
        );
    }
    let reported = bridge
        .logs()
        .iter()
        .filter(|l| l.contains("call tone-1: DTMF") && l.ends_with(" ms, RFC 4733)"))
        .count();
    assert_eq!(reported, 2, "one event per digit");

    // The line check plays each digit back as RFC 4733 events.
    let mut detector = bridge_protocol::dtmf::EventDetector::default();
    let mut echoed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while echoed.len() < 2 && Instant::now() < deadline {
        let (len, _) = phone.recv_from(&mut buffer).expect("RTP keeps coming");
        let Ok(packet) = rtp_types::RtpPacket::parse(&buffer[..len]) else {
            continue;
        };
        if packet.payload_type() == 101 {
            echoed.extend(detector.push(packet.timestamp(), packet.payload()));
        }
    }
    assert_eq!(echoed, [('7', 800), ('#', 800)], "digits sent back");
    assert_sipp(signalling.join().unwrap(), "tone call");
}

#[test]
fn a_call_over_ipv6() {
    let bridge = BridgeProcess::start_on("::1", &[]);
    assert_sipp(
        sipp(
            "session-timer.xml",
            &bridge.address(),
            "echo",
            &["-cid_str", "v6-%u"],
        ),
        "call over IPv6",
    );
    let media = bridge
        .wait_for_log(|l| l.contains("call v6-1: PCMU"), Duration::from_secs(5))
        .expect("the call's media");
    assert!(media.contains("local [::1]:"), "RTP on IPv6 too: {media}");
}

#[test]
fn tls_carries_sip() {
    let dir = support::tempdir();
    let (certificate, key) = support::self_signed_certificate();
    let (sip, tls, sandbox) = (
        support::free_port(),
        support::free_port(),
        support::free_port(),
    );
    let config = dir.join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = \"127.0.0.1:{sip}\"\ntls_listen = \"127.0.0.1:{tls}\"\n\
             tls_certificate = \"{}\"\ntls_key = \"{}\"\n\n\
             [connectycube]\nsandbox = true\napi_url = \"http://127.0.0.1:{sandbox}\"\nchat_url = \"ws://127.0.0.1:{sandbox}/ws\"\n",
            certificate.display(),
            key.display()
        ),
    )
    .unwrap();
    let bridge = BridgeProcess::start(&["--config", config.to_str().unwrap()]);
    assert!(
        bridge
            .wait_for_log(
                |l| l.contains(&format!("SIP listening on tls 127.0.0.1:{tls}")),
                Duration::from_secs(5)
            )
            .is_some()
    );
    let mut client = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{tls}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::{Read, Write};
    let options = format!(
        "OPTIONS sip:echo@127.0.0.1:{tls};transport=tls SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:40000;branch=z9hG4bKtls1\r\n\
         From: <sip:t@127.0.0.1>;tag=1\r\nTo: <sip:echo@127.0.0.1>\r\nCall-ID: tls-1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    client
        .stdin
        .as_mut()
        .unwrap()
        .write_all(options.as_bytes())
        .unwrap();
    // Read on a thread of its own: a response that never comes fails the
    // test instead of hanging it.
    let mut stdout = client.stdout.take().unwrap();
    let (answered, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = vec![0u8; 15];
        let _ = answered.send(stdout.read_exact(&mut line).map(|()| line));
    });
    let answer = answer.recv_timeout(Duration::from_secs(10));
    let _ = client.kill();
    let _ = client.wait();
    let answer = answer
        .expect("no response on the TLS connection within 10 s")
        .expect("the TLS connection closed before a response");
    assert_eq!(String::from_utf8_lossy(&answer), "SIP/2.0 200 OK\r");
}

#[test]
fn the_management_api_shows_live_and_ended_calls_to_token_holders_only() {
    let port = support::free_port();
    let bridge = BridgeProcess::start(&["--management", &format!("127.0.0.1:{port}")]);
    bridge
        .wait_for_log(|l| l.contains("management API on"), Duration::from_secs(5))
        .expect("the management API starts");
    for path in ["/stats", "/metrics"] {
        assert_eq!(support::http_get(port, path, None).0, 401);
        assert_eq!(
            support::http_get(port, path, Some("test-management-token-0124")).0,
            401
        );
    }

    let (phone, signalling) = support::phone_call(
        &bridge,
        "call.xml",
        "echo",
        ("PCMA", 8, 8000, "PCMA/8000", 523),
        4,
        "managed",
    );
    std::thread::sleep(Duration::from_secs(2));
    let (status, body) = support::http_get(port, "/stats", Some(support::MANAGEMENT_TOKEN));
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["active_calls"], 1, "{stats:#}");
    let call = &stats["calls"][0];
    assert_eq!(call["call_id"], "managed-1", "{stats:#}");
    assert_eq!(call["state"], "answered");
    assert_eq!(call["callee"], "echo");
    assert_eq!(call["sip_codec"], "PCMA");
    let received = call["rtp"]["packets_received"].as_u64().unwrap();
    assert!(received >= 50, "1 s of 20 ms packets at least: {call:#}");
    assert!(
        call["rtp"]["packets_sent"].as_u64().unwrap() >= 50,
        "{call:#}"
    );
    let (status, metrics) = support::http_get(port, "/metrics", Some(support::MANAGEMENT_TOKEN));
    assert_eq!(status, 200, "{metrics}");
    assert!(metrics.contains("\nsipcc_calls_active 1\n"), "{metrics}");
    drop(phone);
    assert_sipp(signalling.join().unwrap(), "managed call");

    // Gone once the BYE is handled.
    let deadline = Instant::now() + Duration::from_secs(3);
    let stats = loop {
        let (_, body) = support::http_get(port, "/stats", Some(support::MANAGEMENT_TOKEN));
        let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
        if stats["calls"] == serde_json::json!([]) || Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(stats["calls"], serde_json::json!([]), "{stats:#}");
    // The ended call in the totals, and in Prometheus's figures.
    let ended = &stats["calls_ended"];
    assert_eq!(ended["by_status"]["200"], 1, "{stats:#}");
    let received = ended["rtp_packets_received"].as_u64().unwrap();
    assert!(received >= 50, "1 s of 20 ms packets at least: {stats:#}");
    let talked = ended["answered_seconds"].as_f64().unwrap();
    assert!((3.0..10.0).contains(&talked), "{stats:#}");
    let (_, metrics) = support::http_get(port, "/metrics", Some(support::MANAGEMENT_TOKEN));
    for sample in [
        "\nsipcc_calls_active 0\n".to_owned(),
        "\nsipcc_calls_ended_total{status=\"200\"} 1\n".to_owned(),
        format!("\nsipcc_rtp_packets_received_total {received}\n"),
    ] {
        assert!(metrics.contains(&sample), "{sample:?} in\n{metrics}");
    }
    assert!(
        bridge
            .logs()
            .iter()
            .all(|l| !l.contains(support::MANAGEMENT_TOKEN)),
        "the token is never logged"
    );
}

/// `scenario` to `service` through `balancer` until it passes, for up to
/// 10 s: the balancer asks its bridges OPTIONS once a second.
fn passes_within_pings(scenario: &str, balancer: &str, service: &str) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (passed, output) = sipp(scenario, balancer, service, &[]);
        if passed || Instant::now() > deadline {
            return (passed, output);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_load_balancer_takes_a_full_bridge_out_of_rotation_and_back() {
    let bridge = BridgeProcess::start(&["--max-calls", "1"]);
    let kamailio = support::KamailioProcess::start_dispatcher(&[bridge.address()]);
    let balancer = format!("127.0.0.1:{}", kamailio.port);
    // In rotation: a new call reaches the bridge (whose 404 for an
    // unknown user comes back through the balancer).
    let reaches_the_bridge = || passes_within_pings("not-found.xml", &balancer, "nobody");
    assert_sipp(reaches_the_bridge(), "a call through the balancer");
    // The one call the bridge may carry: its OPTIONS now get 503, and the
    // balancer stops sending it calls it would refuse.
    let call = echo_call_in_progress(bridge.address(), 6000);
    wait_for_the_call(&bridge);
    let (refused, output) = passes_within_pings("out-of-rotation.xml", &balancer, "echo");
    assert!(
        refused,
        "the balancer has no bridge in rotation: {output}\n{}",
        kamailio.log()
    );
    assert_sipp(call.join().unwrap(), "the call in progress, to its end");
    // Room again: its next OPTIONS gets 200, and calls reach it again.
    assert_sipp(
        reaches_the_bridge(),
        "a call once the bridge is back in rotation",
    );
}

#[test]
fn a_bridge_under_a_cpu_quota_counts_the_quota_as_its_cores() {
    // What a container limited to `500m` gets: a quota of half a core on
    // this machine's two. The standard library counts it as one whole
    // core, at which `sip.max_cpu_percent` would never be reached before
    // the quota throttled every call.
    let quota = support::CpuQuota::new(0.5);
    let port = support::free_port();
    let bridge =
        BridgeProcess::start_under(&quota, &["--management", &format!("127.0.0.1:{port}")]);
    let (_, body) = support::http_get(port, "/stats", Some(support::MANAGEMENT_TOKEN));
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["cpu_cores"].as_f64(), Some(0.5), "{stats:#}");
    drop(bridge);
}

#[test]
fn a_bridge_short_of_cpu_refuses_new_calls_and_keeps_its_own() {
    // Ten Opus echo calls take this bridge to about 4 % of two cores here;
    // idle, it uses well under 0.1 %.
    const LIMIT: f64 = 1.5;
    let port = support::free_port();
    let bridge = BridgeProcess::start(&[
        "--management",
        &format!("127.0.0.1:{port}"),
        "--max-cpu-percent",
        &LIMIT.to_string(),
    ]);
    let cpu = || {
        let (_, body) = support::http_get(port, "/stats", Some(support::MANAGEMENT_TOKEN));
        let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
        stats["cpu_percent"]
            .as_f64()
            .unwrap_or_else(|| panic!("no cpu_percent in {stats:#}"))
    };
    let wait_for_cpu = |over: bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            seen.push(cpu());
            if (seen[seen.len() - 1] > LIMIT) == over {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "the bridge's CPU never went {} {LIMIT} %: {seen:?}",
            if over { "over" } else { "under" }
        );
    };
    // Its start-up (plugins loaded, the WebRTC stack warmed up) passes
    // out of the 3 s the load is averaged over.
    std::thread::sleep(Duration::from_secs(4));
    wait_for_cpu(false);

    // Every call is admitted before its RTP loads the bridge.
    let calls = ten_echo_calls(&bridge, 8);
    wait_for_cpu(true);
    assert_sipp(
        sipp("at-capacity.xml", &bridge.address(), "echo", &[]),
        "503 at capacity while the CPU is over sip.max_cpu_percent",
    );
    assert!(
        bridge.logged("over capacity (CPU at"),
        "the refusal names the CPU: {:#?}",
        bridge.logs()
    );
    assert_sipp(
        sipp("options-at-capacity.xml", &bridge.address(), "echo", &[]),
        "OPTIONS gets the 503 an INVITE would",
    );
    let (_, metrics) = support::http_get(port, "/metrics", Some(support::MANAGEMENT_TOKEN));
    assert!(metrics.contains("\nsipcc_cpu_percent "), "{metrics}");

    // The calls in progress go on to their end, each hearing its echo.
    each_heard_its_echo(calls);
    // Once they have ended, calls are taken again.
    wait_for_cpu(false);
    assert_sipp(
        sipp("options.xml", &bridge.address(), "echo", &[]),
        "OPTIONS: 200 again",
    );
    assert_sipp(
        echo_call_in_progress(bridge.address(), 1000)
            .join()
            .unwrap(),
        "a call once the CPU is back under the limit",
    );
}

/// A burst of calls that ring is weighed before their media loads the
/// bridge: each counts at what a call carrying media costs, so the bridge
/// takes only as many as its CPU limit leaves room for (a bridge of a pool
/// that goes down sends its callers to the others at once).
#[test]
fn calls_still_ringing_count_against_the_cpu_limit() {
    // Ten calls answered after 3 s; the burst's callers give up after
    // 1.5 s of ringing (`cancel.xml`), before they would be answered.
    let dir = support::tempdir();
    let config = dir.join("bridge.toml");
    std::fs::write(&config, "[sip]\nmax_cpu_percent = 0\n").unwrap();
    let (management, sandbox) = (support::free_port(), support::free_port());
    let bridge = BridgeProcess::start(&[
        "--config",
        config.to_str().unwrap(),
        "--sandbox",
        &format!("127.0.0.1:{sandbox}"),
        "--management",
        &format!("127.0.0.1:{management}"),
        "--answer-delay-ms",
        "3000",
    ]);
    let calls = ten_echo_calls(&bridge, 20);
    // Their media in the whole 3 s the load is averaged over.
    std::thread::sleep(Duration::from_secs(5));
    let loads: Vec<f64> = (0..4)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(500));
            let (_, body) =
                support::http_get(management, "/stats", Some(support::MANAGEMENT_TOKEN));
            let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
            stats["cpu_percent"].as_f64().unwrap()
        })
        .collect();
    let carrying = loads.iter().sum::<f64>() / loads.len() as f64;
    // Room for five more calls like them.
    let limit = (carrying * 1.5 * 100.0).round() / 100.0;
    std::fs::write(&config, format!("[sip]\nmax_cpu_percent = {limit}\n")).unwrap();
    bridge.signal("HUP");
    bridge
        .wait_for_log(|l| l.contains("reload: users"), Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the reload: {:#?}", bridge.logs()));

    let burst: Vec<_> = (0..10)
        .map(|_| {
            let address = bridge.address();
            std::thread::spawn(move || sipp("cancel.xml", &address, "echo", &[]))
        })
        .collect();
    let outcomes: Vec<(bool, String)> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    let rang = outcomes.iter().filter(|(rang, _)| *rang).count();
    let refused = outcomes
        .iter()
        .filter(|(rang, output)| !rang && output.contains("503"))
        .count();
    assert_eq!(
        rang + refused,
        10,
        "each call rings or gets 503: {outcomes:#?}"
    );
    assert!(
        refused >= 2,
        "ten calls at {carrying:.2} %, limit {limit} %: {rang} of the burst rang, {refused} refused: {:#?}",
        bridge.logs()
    );
    assert!(
        bridge.logged("still starting, over"),
        "the refusal counts the calls ringing: {:#?}",
        bridge.logs()
    );
    each_heard_its_echo(calls);
}

/// Ten Opus calls of `seconds` to the echo, each phone sending its 440 Hz
/// once answered: about 4 % of two cores here.
fn ten_echo_calls(bridge: &BridgeProcess, seconds: u32) -> Vec<(support::Phone, SippRun)> {
    let opus = ("OPUS", 111, 48000, "opus/48000/2", 440);
    let calls: Vec<_> = (0..10)
        .map(|k| {
            support::dial(
                bridge,
                "call.xml",
                "echo",
                opus,
                seconds,
                &format!("load{k}"),
                &[],
            )
        })
        .collect();
    for (k, (phone, _)) in calls.iter().enumerate() {
        phone.call(bridge.media_port(&format!("load{k}-1")));
    }
    calls
}

/// Each call of [`ten_echo_calls`] went on to its end and heard its echo.
fn each_heard_its_echo(calls: Vec<(support::Phone, SippRun)>) {
    for (k, (phone, signalling)) in calls.into_iter().enumerate() {
        assert_sipp(signalling.join().unwrap(), &format!("load call {k}"));
        let heard = phone.heard_frequency();
        assert!(
            heard.is_some_and(|hz| (hz - 440.0).abs() < 15.0),
            "load call {k} heard {heard:?} Hz"
        );
    }
}

type SippRun = std::thread::JoinHandle<(bool, String)>;
