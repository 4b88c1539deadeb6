//! The ConnectyCube elements, in this process, against hostile, raw and
//! real peers: an offer with unusable SDP is rejected with its reason and
//! the element keeps waiting, a real browser's call is then answered; a
//! callee that sends its candidates before it accepts (and none in its
//! answer) is still reached; packets lost on the way to the shared stack
//! are concealed, with no hole in what is heard; a packet the sender held
//! back is stamped with its arrival, not with when it was due; a callee
//! behind a NAT is reached at its public address, configured or learned
//! from a STUN server.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bridge_protocol::connectycube::UserCredentials;
use bridge_protocol::connectycube::rest::RestClient;
use bridge_protocol::connectycube::signaling::{CallSignal, CallType, IceCandidate, SignalType};
use gst::glib;
use gst::prelude::*;
use serde_json::json;
use support::{BrowserPeer, KamailioProcess, NftTable, RustUser, SandboxProcess, free_port};

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

/// The SDK callee never trickles before `accept`, but other apps may: a raw
/// callee (its WebRTC side app-driven elements) sends every candidate in
/// `iceCandidates` first, then `accept` with an answer that carries none.
/// The calling element must hold those candidates until it has the answer,
/// or the call never connects; the callee hears the caller's 440 Hz, and
/// the caller's `stats` show the connection, DTLS and the sending bitrate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_sent_before_accept_are_kept_until_the_answer() {
    call_between_stacks("webrtcbin", "webrtcbin", 48_000, None, None).await;
}

/// The same on the shared WebRTC stack, calling a webrtcbin and called by
/// one: the two implementations agree on ICE, DTLS-SRTP and Opus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_stack_calls_a_webrtcbin_peer() {
    call_between_stacks("shared", "webrtcbin", 48_000, None, None).await;
}

/// A callee that plays 8 kHz says so (`maxplaybackrate`), and the caller's
/// Opus encoder sends narrowband: what arrives is narrowband.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_stack_answers_a_webrtcbin_peer_and_gets_narrowband() {
    call_between_stacks("webrtcbin", "shared", 8_000, None, None).await;
}

/// The shared stack has no jitter buffer: a packet lost on the way (every
/// tenth, dropped after the caller numbered it) becomes a gap that the
/// decoder fills, and the callee hears the tone without holes. Its
/// receiver reports the loss, and the webrtcbin caller's Opus encoder is
/// told of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_lost_on_the_way_to_the_shared_stack_are_concealed() {
    call_between_stacks(
        "webrtcbin",
        "shared",
        48_000,
        Some(Impairment::LoseEvery(10)),
        None,
    )
    .await;
}

/// The other way: the shared stack's packets are numbered inside it, so
/// the test namespace's firewall drops every tenth datagram on the way to
/// the webrtcbin callee. The callee's receiver reports the loss, and the
/// shared stack tells the caller's Opus encoder of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_lost_on_the_way_from_the_shared_stack_reach_its_encoder() {
    call_between_stacks(
        "shared",
        "webrtcbin",
        48_000,
        Some(Impairment::LoseOnTheWire(10)),
        None,
    )
    .await;
}

/// webrtcbin's jitter buffer times each packet by when the sender's clock
/// says it was due: a packet the sender held back (every twentieth, by
/// 100 ms) would count the sender's delay as the callee's, and the
/// bridge's latency meter (which takes the stamp where the packet leaves)
/// would charge it to the bridge. Stamped with its arrival, it is as
/// fresh as any other where it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_the_sender_held_back_is_stamped_with_its_arrival() {
    let delay = Duration::from_millis(100);
    let ages = call_between_stacks(
        "webrtcbin",
        "webrtcbin",
        48_000,
        Some(Impairment::DelayEvery(20, delay)),
        None,
    )
    .await;
    let oldest = ages.iter().max().copied().unwrap_or_default();
    assert!(
        oldest < delay / 2,
        "a buffer left {oldest:?} after its stamp (ages {ages:?})"
    );
}

/// A callee behind a one-to-one NAT (a cloud VM) is reached only at its
/// public address: the test namespace forwards `PUBLIC_ADDRESS` to
/// 192.0.2.50 (`scripts/lib.sh`), and the caller gets none of the callee's
/// host candidates, only their twins there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_behind_a_one_to_one_nat_is_reached_at_its_public_address() {
    let public = format!("public-address={PUBLIC_ADDRESS}");
    for callee_stack in ["shared", "webrtcbin"] {
        call_between_stacks("webrtcbin", callee_stack, 48_000, None, Some(&public)).await;
    }
}

/// The same callee on the shared stack, told only of a STUN server outside
/// the NAT (a real one: Kamailio's stun module), learns its public address
/// from it. (webrtcbin's STUN is libnice's own, which takes no answer from
/// Kamailio's module.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_behind_a_nat_learns_its_public_address_from_a_stun_server() {
    let stun = KamailioProcess::start_stun();
    let server = format!("stun-server=stun://198.51.100.8:{}", stun.port);
    call_between_stacks("webrtcbin", "shared", 48_000, None, Some(&server)).await;
}

/// What happens to the caller's packets before they leave.
#[derive(Clone, Copy)]
enum Impairment {
    /// Every so many are dropped.
    LoseEvery(u64),
    /// Every so many datagrams to the callee are dropped by the firewall,
    /// after the caller's stack numbered them.
    LoseOnTheWire(u64),
    /// Every so many are held back this long (and what follows behind them).
    DelayEvery(u64, Duration),
}

/// Drops every `every`th UDP datagram sent to `ports` while it lives.
fn dropping(session: &str, ports: &[&str], every: u64) -> NftTable {
    let name = format!("lossy_{}", session.replace(['-', ':', '='], "_"));
    let rules = format!(
        "add chain ip {name} output {{ type filter hook output priority 0; }}\n\
         add rule ip {name} output udp dport {{ {} }} numgen inc mod {every} == 0 drop\n",
        ports.join(", ")
    );
    NftTable::add(&format!("ip {name}"), &rules)
}

/// Where the test namespace's NAT shows 192.0.2.50 outside.
const PUBLIC_ADDRESS: &str = "198.51.100.7";

/// Calls from a caller on `caller_stack` to a callee on `callee_stack`
/// that plays at `playback_rate` and sends its candidates before it
/// accepts (none in its answer); with an `impairment` of the caller's
/// packets before they leave; with `behind_nat` (the callee's property
/// that tells it where it is seen from), the caller gets only the callee's
/// candidates at `PUBLIC_ADDRESS`. Returns how long after its stamp (its
/// PTS, in the callee's running time) each buffer heard was taken.
async fn call_between_stacks(
    caller_stack: &str,
    callee_stack: &str,
    playback_rate: u32,
    impairment: Option<Impairment>,
    behind_nat: Option<&str>,
) -> Vec<Duration> {
    gst::init().unwrap();
    gstsipcc::register().unwrap();
    let sandbox = SandboxProcess::start(free_port());
    let mut raw = RustUser::sign_in(&sandbox.api_url(), &sandbox.chat_url(), "raw", "r").await;
    // Sessions are named across the process, where the tests run at once.
    let nat = behind_nat.unwrap_or_default();
    // By the NAT property's name: `public-address`, `stun-server`.
    let nat_kind = nat.split('=').next().unwrap_or_default();
    let impaired = match impairment {
        None => "clean",
        Some(Impairment::LoseEvery(_)) => "lossy",
        Some(Impairment::LoseOnTheWire(_)) => "wire",
        Some(Impairment::DelayEvery(..)) => "late",
    };
    let session = format!("{caller_stack}-{callee_stack}-{playback_rate}-{impaired}-{nat_kind}");
    let caller = gst::parse::launch(&format!(
        "audiotestsrc is-live=true freq=440 volume=0.5 ! audioconvert ! opusenc name=encoder ! rtpopuspay name=payloader \
         ! connectycubesink name=out session=early-caller-{session} webrtc-stack={caller_stack} app-id=1 auth-key=sandbox login=dialer password=d peer={peer} \
           api-url=\"http://127.0.0.1:{port}\" chat-url=\"ws://localhost:{port}/ws\" chat-domain=localhost",
        peer = raw.user_id,
        port = sandbox.port
    ))
    .unwrap();
    let callee = gst::parse::launch(&format!(
        "connectycubesrc name=webrtc session=early-callee-{session} webrtc-stack={callee_stack} \
           max-playback-rate={playback_rate} {nat} \
         ! rtpopusdepay ! opusvoicedec plc=true ! audioconvert ! audio/x-raw,format=F32LE,rate=48000,channels=1 \
         ! appsink name=heard sync=false",
    ))
    .unwrap()
    .downcast::<gst::Bin>()
    .unwrap();
    let lost = Arc::new(AtomicU64::new(0));
    if let Some(impairment) = impairment {
        let payloader = caller
            .downcast_ref::<gst::Bin>()
            .unwrap()
            .by_name("payloader")
            .unwrap();
        let (sent, lost) = (AtomicU64::new(0), lost.clone());
        payloader
            .static_pad("src")
            .unwrap()
            .add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                let count = sent.fetch_add(1, Ordering::Relaxed) + 1;
                match impairment {
                    Impairment::LoseEvery(every) if count % every == 0 => {
                        lost.fetch_add(1, Ordering::Relaxed);
                        return gst::PadProbeReturn::Drop;
                    }
                    Impairment::DelayEvery(every, delay) if count % every == 0 => {
                        std::thread::sleep(delay);
                    }
                    _ => {}
                }
                gst::PadProbeReturn::Ok
            });
    }
    let webrtc = callee.by_name("webrtc").unwrap();
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel::<String>();
    webrtc.connect("local-description", false, move |args| {
        if args[1].get::<String>().as_deref() == Ok("answer") {
            let _ = answers.send(args[2].get::<String>().unwrap());
        }
        None
    });
    callee.set_state(gst::State::Playing).unwrap();
    caller.set_state(gst::State::Playing).unwrap();

    let call = raw
        .signal(Duration::from_secs(15), |s| {
            s.signal.signal_type == SignalType::Call
        })
        .await;
    // Without the caller's candidates the callee cannot start ICE checks:
    // only the caller, with the callee's early candidates, can connect.
    let offer = call.signal.sdp.clone().expect("an offer");
    let offer: Vec<&str> = offer
        .split("\r\n")
        .filter(|line| !line.starts_with("a=candidate:"))
        .collect();
    webrtc.emit_by_name::<()>("set-remote-description", &[&"offer", &offer.join("\r\n")]);
    let answer = tokio::time::timeout(Duration::from_secs(10), answered.recv())
        .await
        .expect("an answer")
        .unwrap();
    let (mut candidates, bare): (Vec<&str>, Vec<&str>) = answer
        .split("\r\n")
        .partition(|line| line.starts_with("a=candidate:"));
    if behind_nat.is_some() {
        candidates.retain(|line| {
            line.contains(&format!(" {PUBLIC_ADDRESS} ")) && line.contains("typ srflx")
        });
    }
    assert!(!candidates.is_empty(), "no candidates gathered: {answer}");
    let reply = |signal_type| {
        CallSignal::new(
            signal_type,
            &call.signal.session_id,
            call.signal.call_type,
            call.from_user_id,
            vec![raw.user_id],
        )
    };
    let _firewall = match impairment {
        Some(Impairment::LoseOnTheWire(every)) => {
            // `a=candidate:<foundation> <component> udp <priority> <address> <port> ...`
            let ports: std::collections::BTreeSet<&str> = candidates
                .iter()
                .filter_map(|line| line.split(' ').nth(5))
                .collect();
            Some(dropping(&session, &Vec::from_iter(ports), every))
        }
        _ => None,
    };
    let mut early = reply(SignalType::IceCandidates);
    early.candidates = candidates
        .iter()
        .map(|line| IceCandidate {
            sdp_mline_index: 0,
            sdp_mid: "0".into(),
            candidate: line.trim_start_matches("a=").to_owned(),
        })
        .collect();
    raw.send_signal(call.from_user_id, &early);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut accept = reply(SignalType::Accept);
    accept.sdp = Some(bare.join("\r\n"));
    raw.send_signal(call.from_user_id, &accept);

    // Two seconds of what the callee hears, once it hears anything.
    let heard = callee
        .by_name("heard")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    let (samples, timeline, ages) = tokio::task::spawn_blocking(move || {
        let mut samples = Vec::new();
        // Each buffer's start and length, in samples at 48 kHz.
        let mut timeline = Vec::new();
        let mut ages = Vec::new();
        while samples.len() < 96_000 {
            let Some(sample) = heard.try_pull_sample(gst::ClockTime::from_seconds(15)) else {
                break;
            };
            let buffer = sample.buffer().unwrap();
            if let Some(pts) = buffer.pts() {
                timeline.push((pts.nseconds() * 48 / 1_000_000, buffer.size() as u64 / 4));
                if let Some(now) = heard.current_running_time() {
                    ages.push(Duration::from_nanos(now.saturating_sub(pts).nseconds()));
                }
            }
            let buffer = buffer.map_readable().unwrap();
            samples.extend(
                buffer
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        (samples, timeline, ages)
    })
    .await
    .unwrap();
    // The caller's statistics show the live call. A `webrtcbin` caller's
    // are polled once a second, so they may lag what was heard.
    let caller_bin = caller.downcast_ref::<gst::Bin>().unwrap();
    let out = caller_bin.by_name("out").unwrap();
    let mut stats = out.property::<gst::Structure>("stats");
    for _ in 0..30 {
        if stats.get::<u64>("packets-sent").unwrap() >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stats = out.property::<gst::Structure>("stats");
    }
    let encoded = caller_bin
        .by_name("encoder")
        .unwrap()
        .property_value("bandwidth");
    let received = webrtc.property::<gst::Structure>("stats");
    // What the callee's receiver reports of the loss reaches the caller's
    // encoder (for in-band FEC), on webrtcbin as on the shared stack.
    let mut loss_told = 0;
    if let Some(Impairment::LoseEvery(_) | Impairment::LoseOnTheWire(_)) = impairment {
        let encoder = caller_bin.by_name("encoder").unwrap();
        for _ in 0..100 {
            loss_told = encoder.property::<i32>("packet-loss-percentage");
            if loss_told > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    caller.set_state(gst::State::Null).unwrap();
    callee.set_state(gst::State::Null).unwrap();
    assert_eq!(
        stats.get::<&str>("connection-state").unwrap(),
        "connected",
        "{stats}"
    );
    assert_eq!(
        stats.get::<&str>("dtls-state").unwrap(),
        "connected",
        "{stats}"
    );
    assert!(stats.get::<u64>("packets-sent").unwrap() >= 50, "{stats}");
    let sending = stats.get::<u64>("send-bitrate").unwrap();
    assert!(
        (10_000..200_000).contains(&sending),
        "Opus at {sending} bit/s: {stats}"
    );
    assert!(
        samples.len() >= 96_000,
        "the call never carried audio ({} samples)",
        samples.len()
    );
    if playback_rate == 8_000 {
        let encoded = glib::EnumValue::from_value(&encoded).unwrap().1.nick();
        assert_eq!(encoded, "narrowband");
        assert_eq!(
            received.get::<&str>("receive-audio-bandwidth").unwrap(),
            "narrowband",
            "{received}"
        );
    }
    if let Some(Impairment::LoseEvery(every) | Impairment::LoseOnTheWire(every)) = impairment {
        let dropped = 100 / every as i32;
        assert!(
            (dropped / 2..=dropped * 2).contains(&loss_told),
            "the caller's encoder was told of {loss_told} % loss, not about {dropped} %"
        );
    }
    if let Some(Impairment::LoseEvery(_)) = impairment {
        let lost = lost.load(Ordering::Relaxed);
        assert!(lost >= 5, "only {lost} packets were dropped");
        // What was heard covers the time it spans: each loss was filled.
        let (first, last) = (timeline[0], timeline[timeline.len() - 1]);
        let span = last.0 + last.1 - first.0;
        let heard: u64 = timeline.iter().map(|(_, length)| length).sum();
        assert!(
            heard * 100 >= span * 97,
            "{heard} samples heard over {span} with {lost} packets lost: holes"
        );
    }
    let frequency = bridge_protocol::tone::dominant_frequency(&samples[48_000..], 48_000);
    assert!(
        frequency.is_some_and(|f| (f - 440.0).abs() < 15.0),
        "the callee heard {frequency:?} Hz instead of 440"
    );
    ages
}
