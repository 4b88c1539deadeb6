//! What the shared WebRTC stack (str0m, configured as for every call, with
//! the plugin's cryptography) costs a passed-through call, without sockets
//! or threads: two peers connected in memory, one Opus frame every 20 ms
//! from one to the other. Prints the time per frame to send it (write,
//! packetize, pace, SRTP), to receive it (SRTP, depacketize, the event),
//! and both peers' timers between frames, and the CPU of a call's setup
//! (descriptions, ICE, the DTLS handshake); each the median of several
//! passes. Against it, the bridge's whole cost per passed-through call
//! (`sip-cc-bridge-bench`) and the kernel's (`packet_floor`).
//!
//! `cargo bench -p gst-plugin-sipcc --bench shared_stack`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

const FRAMES: u64 = 5_000;
const PASSES: usize = 5;
/// What the 1,000-passed-through-calls-per-core target leaves a call per 20 ms.
const BUDGET_US: f64 = 20.0;

type Datagram = (SocketAddr, SocketAddr, Vec<u8>);

/// Hands on what `rtc` sends and counts the frames it received, until it
/// waits for a time after `now` (running what is due at `now`, as the
/// shared stack's task does).
fn drive(rtc: &mut Rtc, now: Instant, sent: &mut Vec<Datagram>, frames: &mut u64) {
    loop {
        match rtc.poll_output().expect("str0m's output") {
            Output::Timeout(at) if at > now => return,
            Output::Timeout(_) => rtc
                .handle_input(Input::Timeout(now))
                .expect("str0m's timeout"),
            Output::Transmit(t) => sent.push((t.source, t.destination, t.contents.to_vec())),
            Output::Event(Event::MediaData(_)) => *frames += 1,
            Output::Event(_) => {}
        }
    }
}

fn deliver(rtc: &mut Rtc, now: Instant, (source, destination, data): Datagram) {
    let input = Input::Receive(
        now,
        Receive {
            proto: Protocol::Udp,
            source,
            destination,
            contents: data.as_slice().try_into().expect("a datagram"),
        },
    );
    if rtc.accepts(&input) {
        rtc.handle_input(input).expect("str0m's input");
    }
}

fn tick(rtc: &mut Rtc, now: Instant) {
    rtc.handle_input(Input::Timeout(now))
        .expect("str0m's timeout");
}

/// Two peers of the shared stack, connected (ICE and DTLS done); the
/// sender's audio mid, and the time reached.
fn connected_pair() -> (Rtc, Rtc, Mid, Instant) {
    let start = Instant::now();
    let peer = || {
        gstsipcc::shared_stack_config()
            .expect("the shared stack's configuration")
            .build(start)
    };
    let (mut a, mut b) = (peer(), peer());
    for (rtc, address) in [(&mut a, "192.0.2.1:4000"), (&mut b, "192.0.2.2:4000")] {
        rtc.add_local_candidate(Candidate::host(address.parse().unwrap(), "udp").unwrap());
    }
    let mut offer = a.sdp_api();
    let mid = offer.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = offer.apply().expect("an offer");
    let answer = b.sdp_api().accept_offer(offer).expect("an answer");
    a.sdp_api()
        .accept_answer(pending, answer)
        .expect("the answer taken");
    let (mut now, mut sent, mut frames) = (start, Vec::new(), 0);
    while !(a.is_connected() && b.is_connected()) {
        assert!(now - start < Duration::from_secs(10), "no connection");
        now += Duration::from_millis(5);
        tick(&mut a, now);
        tick(&mut b, now);
        drive(&mut a, now, &mut sent, &mut frames);
        for datagram in sent.drain(..) {
            deliver(&mut b, now, datagram);
        }
        drive(&mut b, now, &mut sent, &mut frames);
        for datagram in sent.drain(..) {
            deliver(&mut a, now, datagram);
        }
    }
    (a, b, mid, now)
}

/// One pass: µs per frame to send, to receive, and for the timers; and
/// to connect the pair.
fn pass() -> [f64; 4] {
    let connecting = Instant::now();
    let (mut a, mut b, mid, mut now) = connected_pair();
    let connected = connecting.elapsed();
    let pt = a
        .writer(mid)
        .and_then(|w| w.payload_params().next().map(|p| p.pt()))
        .expect("Opus negotiated");
    // A voice frame at 32 kbit/s.
    let payload = vec![0x48_u8; 80];
    let (mut sent, mut received, mut ignored) = (Vec::new(), 0, 0);
    let mut spent = [Duration::ZERO; 3];
    for frame in 0..FRAMES {
        now += Duration::from_millis(20);
        let started = Instant::now();
        let time = MediaTime::new(frame * 960, Frequency::FORTY_EIGHT_KHZ);
        let writer = a.writer(mid).expect("a writer");
        writer
            .write(pt, now, time, payload.clone())
            .expect("the frame written");
        drive(&mut a, now, &mut sent, &mut ignored);
        let written = Instant::now();
        for datagram in sent.drain(..) {
            deliver(&mut b, now, datagram);
        }
        drive(&mut b, now, &mut sent, &mut received);
        let read = Instant::now();
        sent.clear();
        // Between frames: whatever the peers' timers have due by then.
        let later = now + Duration::from_millis(10);
        tick(&mut a, later);
        tick(&mut b, later);
        drive(&mut a, later, &mut sent, &mut ignored);
        drive(&mut b, later, &mut sent, &mut ignored);
        sent.clear();
        let timed = Instant::now();
        spent[0] += written - started;
        spent[1] += read - written;
        spent[2] += timed - read;
    }
    assert_eq!(received, FRAMES, "every frame arrives");
    let [send, receive, timers] = spent.map(|d| d.as_secs_f64() * 1e6 / FRAMES as f64);
    [send, receive, timers, connected.as_secs_f64() * 1e6]
}

fn main() {
    let passes: Vec<[f64; 4]> = (0..PASSES).map(|_| pass()).collect();
    let median = |i: usize| {
        let mut values: Vec<f64> = passes.iter().map(|p| p[i]).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (send, receive, timers, connect) = (median(0), median(1), median(2), median(3));
    // The bridge's one peer per call sends a frame and receives one in
    // each 20 ms, with its own timers (half of both peers').
    let call = send + receive + timers / 2.0;
    println!(
        "the shared WebRTC stack (str0m), per Opus frame, median of {PASSES} passes of {FRAMES}:"
    );
    println!("| step | µs |");
    println!("|---|---|");
    println!("| send (write, packetize, SRTP) | {send:.2} |");
    println!("| receive (SRTP, depacketize, event) | {receive:.2} |");
    println!("| both peers' timers between frames | {timers:.2} |");
    println!(
        "a call's setup: two peers' descriptions, ICE and the DTLS handshake: {connect:.0} µs"
    );
    println!(
        "the bridge's peer of a passed-through call (a frame each way and its timers, per 20 ms): \
         {call:.1} µs, {:.0} % of the {BUDGET_US} µs that 1,000 calls per core leave it",
        call / BUDGET_US * 100.0
    );
}
