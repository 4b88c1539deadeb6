//! sipsrc/sipsink over real UDP sockets, against a plain socket standing for
//! the phone: round trips, statistics under injected loss, reordering,
//! duplicates and jitter, RTCP both ways, latching, the RTP timeout, and
//! garbage on the port.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Once;
use std::time::{Duration, Instant};

use gst::prelude::*;
use gst_check::Harness;
use rtcp_types::{Compound, Packet, RtcpPacketWriterExt};

const PCMU: &str = "application/x-rtp,media=audio,payload=0,clock-rate=8000,encoding-name=PCMU";

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gstsipcc::register().unwrap();
    });
}

fn rtp(seq: u16, ssrc: u32, payload_type: u8) -> Vec<u8> {
    rtp_types::RtpPacketBuilder::new()
        .payload_type(payload_type)
        .sequence_number(seq)
        .timestamp(u32::from(seq) * 160)
        .ssrc(ssrc)
        .payload([0x55u8; 160].as_slice())
        .write_vec()
        .unwrap()
}

/// A plain UDP socket playing the phone.
fn phone(address: &str) -> UdpSocket {
    let socket = UdpSocket::bind((address, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket
}

/// A phone with its RTCP socket on the next port.
fn phone_with_rtcp() -> (UdpSocket, UdpSocket) {
    let rtp = phone("127.0.0.1");
    let rtcp = UdpSocket::bind(("127.0.0.1", rtp.local_addr().unwrap().port() + 1)).unwrap();
    rtcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (rtp, rtcp)
}

fn src_harness(properties: &[(&str, &dyn ToValue)]) -> Harness {
    init();
    let src = gst::ElementFactory::make("sipsrc")
        .property("local-address", "127.0.0.1")
        .property("payload-map", PCMU.parse::<gst::Caps>().unwrap())
        .property("stats-interval", 0u32)
        .build()
        .unwrap();
    for (name, value) in properties {
        src.set_property_from_value(name, &value.to_value());
    }
    let mut harness = Harness::with_element(&src, None, Some("src"));
    // The jitter buffer plays out by the clock: a test clock would never advance.
    harness.use_systemclock();
    harness.play();
    harness
}

fn sink_harness(properties: &[(&str, &dyn ToValue)]) -> Harness {
    init();
    let sink = gst::ElementFactory::make("sipsink")
        .property("local-address", "127.0.0.1")
        .build()
        .unwrap();
    for (name, value) in properties {
        sink.set_property_from_value(name, &value.to_value());
    }
    let mut harness = Harness::with_element(&sink, Some("sink"), None);
    harness.set_src_caps(PCMU.parse::<gst::Caps>().unwrap());
    harness.play();
    harness
}

fn local_port(harness: &Harness) -> u16 {
    harness.element().unwrap().property::<u32>("local-port") as u16
}

fn stats(harness: &Harness) -> gst::Structure {
    harness
        .element()
        .unwrap()
        .property::<gst::Structure>("stats")
}

/// Polls the stats until `done` holds or 5 s pass.
fn wait_for_stats(harness: &Harness, done: impl Fn(&gst::Structure) -> bool) -> gst::Structure {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats(harness);
        if done(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn push(harness: &mut Harness, packet: Vec<u8>) {
    harness.push(gst::Buffer::from_mut_slice(packet)).unwrap();
}

fn round_trip(address: &str) {
    let phone = phone(address);
    let phone_address = phone.local_addr().unwrap();
    let session = format!("round-trip-{address}");
    let mut sink = sink_harness(&[
        ("session", &session),
        ("local-address", &address),
        ("remote-address", &phone_address.ip().to_string()),
        ("remote-port", &u32::from(phone_address.port())),
    ]);
    let mut src = src_harness(&[("session", &session), ("local-address", &address)]);
    let bridge_port = local_port(&src);
    assert_eq!(
        bridge_port,
        local_port(&sink),
        "sipsrc and sipsink share one socket"
    );

    // Bridge → phone: the bytes arrive unchanged, from the port the bridge receives on.
    let mut received = [0u8; 2048];
    for seq in 0..5 {
        let packet = rtp(seq, 0xabc, 0);
        push(&mut sink, packet.clone());
        let (len, from) = phone.recv_from(&mut received).unwrap();
        assert_eq!(&received[..len], packet.as_slice());
        assert_eq!(from.port(), bridge_port, "symmetric RTP");
    }

    // Phone → bridge: out of the jitter buffer in order.
    let bridge: SocketAddr = SocketAddr::new(phone_address.ip(), bridge_port);
    for seq in 100..105 {
        phone.send_to(&rtp(seq, 0x1234, 0), bridge).unwrap();
    }
    for seq in 100..105 {
        let buffer = src.pull().unwrap();
        let map = buffer.map_readable().unwrap();
        let packet = rtp_types::RtpPacket::parse(map.as_slice()).unwrap();
        assert_eq!(packet.sequence_number(), seq);
        assert_eq!(packet.ssrc(), 0x1234);
    }
    let s = stats(&src);
    assert_eq!(s.get::<u64>("packets-received").unwrap(), 5);
    assert_eq!(s.get::<u64>("packets-sent").unwrap(), 5);
}

#[test]
fn packets_round_trip_over_ipv4() {
    round_trip("127.0.0.1");
}

#[test]
fn packets_round_trip_over_ipv6() {
    round_trip("::1");
}

#[test]
fn stats_count_loss_reordering_duplicates_and_garbage() {
    stats_count_what_arrives(false);
}

/// The same with the receiving done on the shared threads.
#[test]
fn stats_count_what_arrives_on_shared_threads() {
    stats_count_what_arrives(true);
}

fn stats_count_what_arrives(shared_threads: bool) {
    let stranger = phone("127.0.0.1");
    let phone = phone("127.0.0.1");
    let phone_address = phone.local_addr().unwrap();
    let mut src = src_harness(&[
        ("shared-threads", &shared_threads),
        ("latch", &false),
        ("remote-address", &"127.0.0.1"),
        ("remote-port", &u32::from(phone_address.port())),
    ]);
    let bridge: SocketAddr = ([127, 0, 0, 1], local_port(&src)).into();

    // 0..100 with 5 lost, 3 pairs swapped and 2 packets sent twice.
    let lost = [10u16, 20, 30, 40, 50];
    let mut order: Vec<u16> = (0..100).filter(|s| !lost.contains(s)).collect();
    for first in [60u16, 70, 80] {
        let i = order.iter().position(|s| *s == first).unwrap();
        order.swap(i, i + 1);
    }
    for duplicate in [90u16, 95] {
        let i = order.iter().position(|s| *s == duplicate).unwrap();
        order.insert(i + 1, duplicate);
    }
    for seq in &order {
        phone.send_to(&rtp(*seq, 7, 0), bridge).unwrap();
    }
    // Garbage: too short, wrong version, an unknown payload type, a stranger.
    phone.send_to(&[0x80, 0x00, 0x01], bridge).unwrap();
    let mut wrong_version = rtp(200, 7, 0);
    wrong_version[0] = 0x40;
    phone.send_to(&wrong_version, bridge).unwrap();
    phone.send_to(&rtp(201, 7, 99), bridge).unwrap();
    stranger.send_to(&rtp(202, 8, 0), bridge).unwrap();

    let s = wait_for_stats(&src, |s| {
        s.get::<u64>("packets-received").unwrap() >= 95
            && s.get::<u64>("packets-wrong-source").unwrap() >= 1
    });
    assert_eq!(s.get::<u64>("packets-received").unwrap(), 95, "{s}");
    assert_eq!(s.get::<i64>("packets-lost").unwrap(), 5, "{s}");
    assert_eq!(s.get::<u64>("packets-duplicated").unwrap(), 2, "{s}");
    assert_eq!(s.get::<u64>("packets-reordered").unwrap(), 3, "{s}");
    assert_eq!(s.get::<u64>("packets-invalid").unwrap(), 2, "{s}");
    assert_eq!(s.get::<u64>("packets-unknown-pt").unwrap(), 1, "{s}");
    assert_eq!(s.get::<u64>("packets-wrong-source").unwrap(), 1, "{s}");

    // Everything accepted comes out, reordered back into sequence.
    let mut previous = None;
    for _ in 0..95 {
        let buffer = src.pull().unwrap();
        let map = buffer.map_readable().unwrap();
        let seq = rtp_types::RtpPacket::parse(map.as_slice())
            .unwrap()
            .sequence_number();
        assert!(previous.is_none_or(|p| seq > p), "{seq} after {previous:?}");
        previous = Some(seq);
    }
}

#[test]
fn a_packet_after_the_jitter_buffer_played_out_counts_as_late() {
    let phone = phone("127.0.0.1");
    let src = src_harness(&[("latency", &20u32)]);
    let bridge: SocketAddr = ([127, 0, 0, 1], local_port(&src)).into();
    let start = Instant::now();
    for seq in 0..30u16 {
        if seq == 10 {
            continue; // sent 300 ms late, below
        }
        std::thread::sleep(
            (start + Duration::from_millis(u64::from(seq) * 20))
                .saturating_duration_since(Instant::now()),
        );
        phone.send_to(&rtp(seq, 7, 0), bridge).unwrap();
    }
    phone.send_to(&rtp(10, 7, 0), bridge).unwrap();
    let mut src = src;
    for _ in 0..29 {
        src.pull().unwrap();
    }
    let s = wait_for_stats(&src, |s| s.get::<u64>("packets-late").unwrap() >= 1);
    assert_eq!(s.get::<u64>("packets-late").unwrap(), 1, "{s}");
    assert_eq!(s.get::<u64>("packets-reordered").unwrap(), 1, "{s}");
}

/// `latency=0` takes the jitter buffer out: packets come out as they
/// arrived, a reordered one in its place, with nothing held back; the
/// jitter buffer comes back with a latency again.
#[test]
fn without_a_jitter_buffer_packets_go_on_in_arrival_order() {
    in_arrival_order(false);
}

#[test]
fn on_shared_threads_without_a_jitter_buffer_packets_go_on_in_arrival_order() {
    in_arrival_order(true);
}

fn in_arrival_order(shared_threads: bool) {
    let phone = phone("127.0.0.1");
    let mut src = src_harness(&[("latency", &0u32), ("shared-threads", &shared_threads)]);
    assert_eq!(src.element().unwrap().property::<u32>("latency"), 0);
    let bridge: SocketAddr = ([127, 0, 0, 1], local_port(&src)).into();
    let sent = [0u16, 1, 3, 2, 4];
    for seq in sent {
        phone.send_to(&rtp(seq, 7, 0), bridge).unwrap();
    }
    let pulled: Vec<u16> = sent
        .iter()
        .map(|_| {
            let buffer = src.pull().unwrap();
            let map = buffer.map_readable().unwrap();
            rtp_types::RtpPacket::parse(map.as_slice())
                .unwrap()
                .sequence_number()
        })
        .collect();
    assert_eq!(pulled, sent);
    let element = src.element().unwrap();
    drop(src);
    element.set_state(gst::State::Null).unwrap();
    element.set_property("latency", 40u32);
    assert_eq!(element.property::<u32>("latency"), 40);
}

#[test]
fn jitter_estimate_follows_injected_jitter() {
    let phone = phone("127.0.0.1");
    let src = src_harness(&[]);
    let bridge: SocketAddr = ([127, 0, 0, 1], local_port(&src)).into();
    // Every other packet 10 ms late: |D| is 10 ms for each pair (RFC 3550 A.8).
    let start = Instant::now();
    for seq in 0..150u16 {
        let due =
            start + Duration::from_millis(u64::from(seq) * 20 + if seq % 2 == 1 { 10 } else { 0 });
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        phone.send_to(&rtp(seq, 7, 0), bridge).unwrap();
    }
    let s = wait_for_stats(&src, |s| s.get::<u64>("packets-received").unwrap() == 150);
    let jitter_ms = s.get::<f64>("jitter-ms").unwrap();
    assert!(
        (jitter_ms - 10.0).abs() < 3.0,
        "jitter {jitter_ms} ms, injected 10 ms"
    );
    assert_eq!(
        s.get::<u32>("jitter").unwrap(),
        (jitter_ms * 8.0) as u32,
        "RTP units at 8 kHz"
    );
}

#[test]
fn rtcp_reports_go_both_ways_and_give_rtt() {
    let (phone, phone_rtcp) = phone_with_rtcp();
    let phone_address = phone.local_addr().unwrap();
    let mut sink = sink_harness(&[
        ("remote-address", &"127.0.0.1"),
        ("remote-port", &u32::from(phone_address.port())),
        ("rtcp-interval", &200u32),
    ]);
    for seq in 0..10 {
        push(&mut sink, rtp(seq, 0x5151, 0));
    }

    // The phone sees a Sender Report about what the bridge sent.
    let mut buffer = [0u8; 1500];
    let (sender_report, bridge_rtcp) = loop {
        let (len, from) = phone_rtcp.recv_from(&mut buffer).unwrap();
        let compound: Vec<_> = Compound::parse(&buffer[..len])
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if let Some(Packet::Sr(sr)) = compound.first() {
            break ((sr.ssrc(), sr.packet_count(), sr.ntp_timestamp()), from);
        }
    };
    assert_eq!(sender_report.0, 0x5151);
    assert_eq!(sender_report.1, 10);
    assert_eq!(
        bridge_rtcp.port(),
        local_port(&sink) + 1,
        "RTCP on the odd port"
    );

    // The phone answers with a Receiver Report quoting it, 30 ms later.
    std::thread::sleep(Duration::from_millis(30));
    let rr = rtcp_types::ReceiverReport::builder(0x7777).add_report_block(
        rtcp_types::ReportBlock::builder(0x5151)
            .last_sender_report_timestamp((sender_report.2 >> 16) as u32)
            .delay_since_last_sender_report_timestamp((0.030 * 65536.0) as u32),
    );
    let mut packet = vec![0u8; 64];
    let len = rr.write_into(&mut packet).unwrap();
    phone_rtcp.send_to(&packet[..len], bridge_rtcp).unwrap();

    let s = wait_for_stats(&sink, |s| s.get::<f64>("rtt-ms").unwrap() >= 0.0);
    let rtt = s.get::<f64>("rtt-ms").unwrap();
    assert!((0.0..25.0).contains(&rtt), "loopback RTT {rtt} ms");
    assert!(s.get::<u64>("rtcp-received").unwrap() >= 1);
    assert!(s.get::<u64>("rtcp-sent").unwrap() >= 1);
}

#[test]
fn latch_follows_a_changed_source_port() {
    let first = phone("127.0.0.1");
    let second = phone("127.0.0.1");
    let session = "latch-test";
    let mut sink = sink_harness(&[("session", &session)]);
    let src = src_harness(&[("session", &session)]);
    let bridge: SocketAddr = ([127, 0, 0, 1], local_port(&src)).into();
    let mut buffer = [0u8; 2048];

    // No remote address yet: the first packet from the phone decides it.
    first.send_to(&rtp(0, 42, 0), bridge).unwrap();
    wait_for_stats(&src, |s| s.get::<u64>("packets-received").unwrap() == 1);
    push(&mut sink, rtp(0, 1, 0));
    first.recv_from(&mut buffer).unwrap();

    // The phone's NAT mapping changes: same SSRC, new port. Media follows.
    second.send_to(&rtp(1, 42, 0), bridge).unwrap();
    let s = wait_for_stats(&src, |s| s.get::<u64>("packets-received").unwrap() == 2);
    assert_eq!(
        s.get::<String>("remote-address").unwrap(),
        second.local_addr().unwrap().to_string()
    );
    push(&mut sink, rtp(1, 1, 0));
    let (len, _) = second.recv_from(&mut buffer).unwrap();
    assert_eq!(
        rtp_types::RtpPacket::parse(&buffer[..len])
            .unwrap()
            .sequence_number(),
        1
    );
}

#[test]
fn rtp_timeout_is_posted_once_per_silence() {
    rtp_timeout_posted_once_per_silence(false);
}

#[test]
fn on_shared_threads_rtp_timeout_is_posted_once_per_silence() {
    rtp_timeout_posted_once_per_silence(true);
}

fn rtp_timeout_posted_once_per_silence(shared_threads: bool) {
    init();
    let pipeline = gst::parse::launch(&format!(
        "sipsrc name=src local-address=127.0.0.1 timeout=300 stats-interval=0 shared-threads={shared_threads} \
         payload-map=\"{PCMU}\" ! fakesink async=false"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let timeout_message = |within: u64| {
        bus.timed_pop_filtered(
            gst::ClockTime::from_mseconds(within),
            &[gst::MessageType::Element],
        )
        .filter(|m| m.structure().is_some_and(|s| s.name() == "sip-rtp-timeout"))
    };
    let started = Instant::now();
    let message = timeout_message(3000).expect("sip-rtp-timeout after 300 ms of silence");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        message.src().unwrap().name(),
        "src",
        "posted by sipsrc itself"
    );
    assert!(
        message
            .structure()
            .unwrap()
            .get::<u64>("silence-ms")
            .unwrap()
            >= 300
    );
    assert!(timeout_message(600).is_none(), "one message per silence");

    // Media resumes, then stops again: a new timeout.
    let src = pipeline.by_name("src").unwrap();
    let bridge: SocketAddr = ([127, 0, 0, 1], src.property::<u32>("local-port") as u16).into();
    phone("127.0.0.1").send_to(&rtp(0, 1, 0), bridge).unwrap();
    assert!(
        timeout_message(3000).is_some(),
        "a second silence is reported too"
    );

    // Setting the timeout starts the count anew (the bridge does when a
    // call is answered or taken off hold): the silence is reported again,
    // counted from the setting, not from the last packet long before.
    std::thread::sleep(Duration::from_millis(500));
    let set = Instant::now();
    src.set_property("timeout", 300u32);
    assert!(
        timeout_message(3000).is_some(),
        "a timeout set anew reports the silence again"
    );
    assert!(set.elapsed() >= Duration::from_millis(250));
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn random_datagrams_never_stop_the_stream() {
    let phone = phone("127.0.0.1");
    let mut src = src_harness(&[]);
    let bridge: SocketAddr = ([127, 0, 0, 1], local_port(&src)).into();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..2000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 300) as usize;
        let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8).collect();
        phone.send_to(&bytes, bridge).unwrap();
    }
    phone.send_to(&rtp(1000, 99, 0), bridge).unwrap();
    let buffer = src.pull().unwrap();
    let map = buffer.map_readable().unwrap();
    assert_eq!(
        rtp_types::RtpPacket::parse(map.as_slice()).unwrap().ssrc(),
        99
    );
}

#[test]
fn sdp_sets_payload_map_and_remote() {
    init();
    let src = gst::ElementFactory::make("sipsrc").build().unwrap();
    src.set_property(
        "sdp",
        "m=audio 4000 RTP/AVP 8 101\r\nc=IN IP4 192.0.2.7\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=rtcp:4005\r\n",
    );
    assert_eq!(
        src.property::<Option<String>>("remote-address").as_deref(),
        Some("192.0.2.7")
    );
    assert_eq!(src.property::<u32>("remote-port"), 4000);
    assert_eq!(src.property::<u32>("remote-rtcp-port"), 4005);
    let caps = src.property::<gst::Caps>("payload-map");
    assert_eq!(caps.size(), 2);
    assert_eq!(
        caps.structure(0)
            .unwrap()
            .get::<&str>("encoding-name")
            .unwrap(),
        "PCMA"
    );
    assert_eq!(
        caps.structure(1)
            .unwrap()
            .get::<&str>("encoding-name")
            .unwrap(),
        "TELEPHONE-EVENT"
    );
}

#[test]
fn a_bad_local_address_is_an_error_naming_the_property() {
    init();
    let pipeline = gst::parse::launch("sipsrc local-address=not-an-ip ! fakesink").unwrap();
    let _ = pipeline.set_state(gst::State::Playing);
    let message = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
        .expect("an error message");
    let gst::MessageView::Error(error) = message.view() else {
        unreachable!()
    };
    assert!(
        error.error().to_string().contains("local-address"),
        "{}",
        error.error()
    );
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn telephone_events_become_dtmf_messages_and_leave_the_stream() {
    init();
    let map = format!(
        "{PCMU}; application/x-rtp,media=audio,payload=101,clock-rate=8000,encoding-name=TELEPHONE-EVENT"
    );
    let pipeline = gst::parse::launch(&format!(
        "sipsrc name=src local-address=127.0.0.1 stats-interval=0 payload-map=\"{map}\" \
         ! appsink name=out sync=false async=false"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let src = pipeline.by_name("src").unwrap();
    let bridge: SocketAddr = ([127, 0, 0, 1], src.property::<u32>("local-port") as u16).into();
    let phone = phone("127.0.0.1");
    let event = |seq: u16, digit: u8, end: bool, duration: u16| {
        let payload = bridge_protocol::dtmf::TelephoneEvent {
            event: digit,
            end,
            volume: 10,
            duration,
        }
        .to_bytes();
        rtp_types::RtpPacketBuilder::new()
            .payload_type(101)
            .sequence_number(seq)
            .timestamp(8000)
            .ssrc(7)
            .payload(payload.as_slice())
            .write_vec()
            .unwrap()
    };
    phone.send_to(&rtp(1, 7, 0), bridge).unwrap();
    // Digit 5 for 100 ms: two progress packets and the end packet three times.
    for (seq, end, duration) in [
        (2, false, 160),
        (3, false, 320),
        (4, true, 800),
        (5, true, 800),
        (6, true, 800),
    ] {
        phone
            .send_to(&event(seq, 5, end, duration), bridge)
            .unwrap();
    }
    phone.send_to(&rtp(7, 7, 0), bridge).unwrap();

    let bus = pipeline.bus().unwrap();
    let mut digits = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Some(message) = bus.timed_pop_filtered(
            gst::ClockTime::from_mseconds(100),
            &[gst::MessageType::Element],
        ) {
            let s = message.structure().unwrap();
            if s.name() == "sip-dtmf" {
                digits.push((
                    s.get::<String>("digit").unwrap(),
                    s.get::<u32>("duration-ms").unwrap(),
                ));
            }
        }
    }
    assert_eq!(
        digits,
        [("5".to_owned(), 100)],
        "one digit despite three end packets"
    );

    let out = pipeline
        .by_name("out")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    let mut payload_types = Vec::new();
    while let Some(sample) = out.try_pull_sample(gst::ClockTime::from_mseconds(200)) {
        let map = sample.buffer().unwrap().map_readable().unwrap();
        payload_types.push(
            rtp_types::RtpPacket::parse(map.as_slice())
                .unwrap()
                .payload_type(),
        );
    }
    assert_eq!(
        payload_types,
        [0, 0],
        "only the audio packets go downstream"
    );
    pipeline.set_state(gst::State::Null).unwrap();
}

/// Runs `srtpenc` or `srtpdec` (libsrtp, the phone's side) over single packets.
struct LibSrtp {
    pipeline: gst::Pipeline,
    input: gst_app::AppSrc,
    output: gst_app::AppSink,
}

impl LibSrtp {
    fn new(description: &str, caps: gst::Caps, configure: impl FnOnce(&gst::Pipeline)) -> Self {
        let pipeline = gst::parse::launch(&format!(
            "appsrc name=in format=time ! {description} ! appsink name=out sync=false"
        ))
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
        let input: gst_app::AppSrc = pipeline.by_name("in").unwrap().downcast().unwrap();
        let output = pipeline.by_name("out").unwrap().downcast().unwrap();
        input.set_caps(Some(&caps));
        configure(&pipeline);
        pipeline.set_state(gst::State::Playing).unwrap();
        LibSrtp {
            pipeline,
            input,
            output,
        }
    }

    fn encoder(key: &bridge_protocol::sdes::SrtpKey) -> Self {
        Self::new(
            "srtpenc name=srtp",
            "application/x-rtp".parse().unwrap(),
            |pipeline| {
                pipeline
                    .by_name("srtp")
                    .unwrap()
                    .set_property("key", gst::Buffer::from_slice(key.key_salt))
            },
        )
    }

    fn decoder(key: &bridge_protocol::sdes::SrtpKey, ssrc: u32) -> Self {
        let caps = gst::Caps::builder("application/x-srtp")
            .field("ssrc", ssrc)
            .field("srtp-key", gst::Buffer::from_slice(key.key_salt))
            .field("srtp-cipher", "aes-128-icm")
            .field("srtp-auth", "hmac-sha1-80")
            .field("srtcp-cipher", "aes-128-icm")
            .field("srtcp-auth", "hmac-sha1-80")
            .build();
        Self::new("srtpdec", caps, |_| {})
    }

    fn process(&self, packet: &[u8]) -> Option<Vec<u8>> {
        self.input
            .push_buffer(gst::Buffer::from_slice(packet.to_vec()))
            .unwrap();
        let sample = self
            .output
            .try_pull_sample(gst::ClockTime::from_mseconds(500))?;
        let map = sample.buffer().unwrap().map_readable().unwrap();
        Some(map.to_vec())
    }
}

impl Drop for LibSrtp {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[test]
fn sdes_srtp_interoperates_with_libsrtp_and_rejects_forgeries() {
    use bridge_protocol::sdes::{CryptoSuite, SrtpKey};
    init();
    let phone_key = SrtpKey::generate(CryptoSuite::AesCm128HmacSha1_80);
    let bridge_key = SrtpKey::generate(CryptoSuite::AesCm128HmacSha1_80);
    let phone = phone("127.0.0.1");
    let phone_address = phone.local_addr().unwrap();
    let session = "srtp-test";
    let keys: [(&str, &dyn ToValue); 3] = [
        ("session", &session),
        ("srtp-send-key", &bridge_key.to_string()),
        ("srtp-receive-key", &phone_key.to_string()),
    ];
    let mut sink = sink_harness(&[
        keys[0],
        keys[1],
        keys[2],
        ("remote-address", &"127.0.0.1"),
        ("remote-port", &u32::from(phone_address.port())),
    ]);
    let mut src = src_harness(&keys);
    let bridge: SocketAddr = ([127, 0, 0, 1], local_port(&src)).into();

    // Phone → bridge: libsrtp protects, sipsrc hands out the plain packet.
    let encoder = LibSrtp::encoder(&phone_key);
    for seq in 10..15 {
        let protected = encoder.process(&rtp(seq, 0x4242, 0)).unwrap();
        assert_eq!(protected.len(), rtp(seq, 0x4242, 0).len() + 10);
        phone.send_to(&protected, bridge).unwrap();
    }
    for seq in 10..15 {
        let buffer = src.pull().unwrap();
        let map = buffer.map_readable().unwrap();
        assert_eq!(map.as_slice(), rtp(seq, 0x4242, 0).as_slice());
    }

    // Bridge → phone: on the wire it is not the plain packet; libsrtp opens it.
    let decoder = LibSrtp::decoder(&bridge_key, 0xabc);
    let mut received = [0u8; 2048];
    for seq in 0..3 {
        push(&mut sink, rtp(seq, 0xabc, 0));
        let (len, _) = phone.recv_from(&mut received).unwrap();
        assert_ne!(&received[12..len - 10], &rtp(seq, 0xabc, 0)[12..]);
        let plain = decoder
            .process(&received[..len])
            .expect("libsrtp accepts it");
        assert_eq!(plain, rtp(seq, 0xabc, 0));
    }

    // Forged (plain RTP), tampered and replayed packets never reach the pipeline.
    let replayed = encoder.process(&rtp(15, 0x4242, 0)).unwrap();
    let mut tampered = encoder.process(&rtp(16, 0x4242, 0)).unwrap();
    tampered[30] ^= 0x80;
    phone.send_to(&rtp(17, 0x4242, 0), bridge).unwrap();
    phone.send_to(&tampered, bridge).unwrap();
    phone.send_to(&replayed, bridge).unwrap();
    phone.send_to(&replayed, bridge).unwrap();
    let s = wait_for_stats(&src, |s| s.get::<u64>("srtp-rejected").unwrap() >= 3);
    assert_eq!(s.get::<u64>("srtp-rejected").unwrap(), 3, "{s}");
    let buffer = src.pull().unwrap();
    let map = buffer.map_readable().unwrap();
    assert_eq!(
        rtp_types::RtpPacket::parse(map.as_slice())
            .unwrap()
            .sequence_number(),
        15
    );
    assert!(src.try_pull().is_none());
}

#[test]
fn send_dtmf_replaces_audio_with_events_that_rtpdtmfdepay_reads() {
    let phone = phone("127.0.0.1");
    let phone_address = phone.local_addr().unwrap();
    let mut sink = sink_harness(&[(
        "sdp",
        &format!(
            "m=audio {} RTP/AVP 0 101\r\nc=IN IP4 127.0.0.1\r\na=rtpmap:101 telephone-event/8000\r\n",
            phone_address.port()
        ),
    )]);
    let element = sink.element().unwrap();
    assert!(!element.emit_by_name::<bool>("send-dtmf", &[&"x", &100u32]));
    assert!(element.emit_by_name::<bool>("send-dtmf", &[&"7", &100u32]));

    // The phone side: GStreamer's own RFC 4733 depayloader.
    let pipeline = gst::parse::launch(
        "appsrc name=in is-live=true do-timestamp=true format=time \
           caps=application/x-rtp,media=audio,encoding-name=TELEPHONE-EVENT,clock-rate=8000,payload=101 \
         ! rtpdtmfdepay ! fakesink sync=false async=false",
    )
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let input = pipeline
        .by_name("in")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();

    let mut sequence = Vec::new();
    let mut received = [0u8; 2048];
    for seq in 0..20u16 {
        push(&mut sink, rtp(seq, 0xd7, 0));
        let (len, _) = phone.recv_from(&mut received).unwrap();
        let packet = rtp_types::RtpPacket::parse(&received[..len]).unwrap();
        sequence.push((packet.sequence_number(), packet.payload_type()));
        if packet.payload_type() == 101 {
            input
                .push_buffer(gst::Buffer::from_slice(received[..len].to_vec()))
                .unwrap();
        }
    }
    // No gap in numbering; 100 ms of event (4 packets + 3 ends) then audio again.
    assert!(
        sequence
            .iter()
            .enumerate()
            .all(|(i, (seq, _))| *seq == i as u16)
    );
    let payload_types: Vec<u8> = sequence.iter().map(|(_, pt)| *pt).collect();
    assert_eq!(&payload_types[..7], &[101; 7]);
    assert!(payload_types[7..].iter().all(|&pt| pt == 0));

    let bus = pipeline.bus().unwrap();
    let event = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(3),
            &[gst::MessageType::Element],
        )
        .expect("rtpdtmfdepay reports the event");
    let s = event.structure().unwrap();
    assert_eq!(s.name(), "dtmf-event");
    assert_eq!(s.get::<i32>("number").unwrap(), 7);
    pipeline.set_state(gst::State::Null).unwrap();
}

/// An Opus phone whose SDP has telephone-event/48000 (which the bridge
/// takes with Opus) gets its digits at the stream's own rate: the events'
/// durations count 48 kHz ticks.
#[test]
fn send_dtmf_on_an_opus_stream_counts_its_48_khz() {
    let phone = phone("127.0.0.1");
    let port = phone.local_addr().unwrap().port();
    let mut sink = sink_harness(&[(
        "sdp",
        &format!(
            "m=audio {port} RTP/AVP 111 110\r\nc=IN IP4 127.0.0.1\r\na=rtpmap:111 opus/48000/2\r\na=rtpmap:110 telephone-event/48000\r\n"
        ),
    )]);
    sink.set_src_caps_str(
        "application/x-rtp,media=audio,encoding-name=OPUS,clock-rate=48000,payload=111",
    );
    assert!(
        sink.element()
            .unwrap()
            .emit_by_name::<bool>("send-dtmf", &[&"7", &100u32])
    );
    let mut events = Vec::new();
    let mut received = [0u8; 2048];
    for seq in 0..12u16 {
        let opus = rtp_types::RtpPacketBuilder::new()
            .payload_type(111)
            .sequence_number(seq)
            .timestamp(u32::from(seq) * 960)
            .ssrc(0xd7)
            .payload([0x78u8; 40].as_slice())
            .write_vec()
            .unwrap();
        push(&mut sink, opus);
        let (len, _) = phone.recv_from(&mut received).unwrap();
        let packet = rtp_types::RtpPacket::parse(&received[..len]).unwrap();
        if packet.payload_type() == 110 {
            events.push(packet.payload().to_vec());
        }
    }
    let last = events
        .last()
        .expect("the digit goes as telephone-event/48000");
    assert_eq!(last[0], 7, "the event is the digit");
    assert_ne!(last[1] & 0x80, 0, "the last packet ends the event");
    assert_eq!(
        u16::from_be_bytes([last[2], last[3]]),
        4800,
        "100 ms at 48 kHz"
    );
}

/// RTP from another leg (the app's Opus as payload type 111) reaches the
/// phone numbered by the phone's SDP, marker bit and payload untouched.
#[test]
fn packets_leave_with_the_payload_type_the_phones_sdp_gives_their_encoding() {
    let phone = phone("127.0.0.1");
    let port = phone.local_addr().unwrap().port();
    let mut sink = sink_harness(&[(
        "sdp",
        &format!(
            "m=audio {port} RTP/AVP 107 101\r\nc=IN IP4 127.0.0.1\r\na=rtpmap:107 opus/48000/2\r\na=rtpmap:101 telephone-event/8000\r\n"
        ),
    )]);
    sink.set_src_caps_str(
        "application/x-rtp,media=audio,encoding-name=OPUS,clock-rate=48000,payload=111",
    );
    let sent = rtp_types::RtpPacketBuilder::new()
        .payload_type(111)
        .marker_bit(true)
        .sequence_number(9)
        .timestamp(960)
        .ssrc(0xd7)
        .payload([0x78u8, 1, 2, 3].as_slice())
        .write_vec()
        .unwrap();
    push(&mut sink, sent);
    let mut received = [0u8; 2048];
    let (len, _) = phone.recv_from(&mut received).unwrap();
    let packet = rtp_types::RtpPacket::parse(&received[..len]).unwrap();
    assert_eq!(packet.payload_type(), 107);
    assert!(packet.marker_bit());
    assert_eq!(packet.sequence_number(), 9);
    assert_eq!(packet.payload(), &[0x78, 1, 2, 3]);

    // An encoding the phone's SDP does not name goes as upstream numbered it.
    sink.set_src_caps_str(
        "application/x-rtp,media=audio,encoding-name=PCMU,clock-rate=8000,payload=0",
    );
    push(&mut sink, rtp(10, 0xd7, 0));
    let (len, _) = phone.recv_from(&mut received).unwrap();
    assert_eq!(
        rtp_types::RtpPacket::parse(&received[..len])
            .unwrap()
            .payload_type(),
        0
    );
}

/// A decoder downstream of `sipsrc` that lost the picture makes the phone
/// get PLI and FIR about its stream; a PLI from the phone reaches the
/// encoder upstream of `sipsink` as `GstForceKeyUnit`.
#[test]
fn key_frame_requests_cross_in_both_directions() {
    let (phone, phone_rtcp) = phone_with_rtcp();
    let phone_address = phone.local_addr().unwrap();
    let session = "key-frames";
    let mut sink = sink_harness(&[
        ("session", &session),
        ("remote-address", &"127.0.0.1"),
        ("remote-port", &u32::from(phone_address.port())),
    ]);
    let mut src = src_harness(&[("session", &session)]);
    push(&mut sink, rtp(0, 0x5151, 0));
    let bridge = SocketAddr::from(([127, 0, 0, 1], local_port(&src)));
    let bridge_rtcp = SocketAddr::from(([127, 0, 0, 1], local_port(&src) + 1));
    for seq in 0..3 {
        phone.send_to(&rtp(seq, 0x1234, 0), bridge).unwrap();
    }
    src.pull().unwrap();

    assert!(src.push_upstream_event(gst::event::CustomUpstream::new(
        gst::Structure::builder("GstForceKeyUnit").build()
    )));
    let mut buffer = [0u8; 1500];
    let (pli, fir) = loop {
        let (len, _) = phone_rtcp.recv_from(&mut buffer).unwrap();
        let mut pli = None;
        let mut fir = None;
        for packet in Compound::parse(&buffer[..len]).unwrap().flatten() {
            if let Packet::PayloadFeedback(feedback) = packet {
                if feedback.parse_fci::<rtcp_types::Pli>().is_ok() {
                    pli = Some(feedback.media_ssrc());
                }
                if let Ok(request) = feedback.parse_fci::<rtcp_types::Fir>() {
                    fir = request.entries().next().map(|e| e.ssrc());
                }
            }
        }
        if pli.is_some() || fir.is_some() {
            break (pli, fir);
        }
    };
    assert_eq!(pli, Some(0x1234), "PLI about the phone's stream");
    assert_eq!(fir, Some(0x1234), "FIR about the phone's stream");
    assert_eq!(
        stats(&src).get::<u64>("key-frame-requests-sent").unwrap(),
        1
    );

    let request = rtcp_types::PayloadFeedback::builder_owned(rtcp_types::Pli::builder())
        .sender_ssrc(0x1234)
        .media_ssrc(0x5151);
    let mut packet = vec![0u8; 64];
    let rr = rtcp_types::CompoundBuilder::default()
        .add_packet(rtcp_types::ReceiverReport::builder(0x1234))
        .add_packet(request);
    let len = rr.write_into(&mut packet).unwrap();
    phone_rtcp.send_to(&packet[..len], bridge_rtcp).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let asked = loop {
        match sink.try_pull_upstream_event() {
            Some(event)
                if event
                    .structure()
                    .is_some_and(|s| s.name() == "GstForceKeyUnit") =>
            {
                break true;
            }
            Some(_) => continue,
            None if Instant::now() > deadline => break false,
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(asked, "a GstForceKeyUnit upstream of sipsink");
    assert_eq!(
        stats(&sink)
            .get::<u64>("key-frame-requests-received")
            .unwrap(),
        1
    );
}

/// On the shared threads too, an EOS sent to the pipeline (which finishes
/// a recording) leaves through `sipsrc`, even before any packet came.
#[test]
fn on_shared_threads_an_eos_sent_to_the_pipeline_ends_the_stream() {
    init();
    let pipeline = gst::parse::launch(&format!(
        "sipsrc local-address=127.0.0.1 stats-interval=0 shared-threads=true payload-map=\"{PCMU}\" \
         ! fakesink async=false"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(pipeline.send_event(gst::event::Eos::new()));
    let eos = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(gst::ClockTime::from_seconds(3), &[gst::MessageType::Eos]);
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(eos.is_some(), "the EOS reached the sink");
}
