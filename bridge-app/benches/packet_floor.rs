//! The floor under any bridge on this machine: what the kernel alone
//! charges a media thread to take in an RTP packet and send one on, and what
//! a wake-up of the thread adds. A passed-through call moves two packets in
//! and two out every 20 ms, so these two figures bound how many calls a core
//! can carry before any SRTP, WebRTC or GStreamer work.
//!
//! Both ends are UDP sockets on loopback, as in `sip-cc-bridge-bench`: a
//! send on loopback also runs the receiver's side of the network stack, in
//! the sender's time. The thread's own CPU time is read in nanoseconds from
//! `/proc/thread-self/schedstat`.
//!
//! `cargo bench -p sip-cc-bridge --bench packet_floor`

use std::net::UdpSocket;
use std::time::Duration;

/// An RTP header and 20 ms of G.711.
const PACKET: usize = 12 + 160;
const PACKETS: usize = 20_000;
/// Packets waiting at each wake-up when the thread is busy (many calls).
const BURST: usize = 50;
/// What the targets leave for a call in each 20 ms, in µs.
const TARGETS: [(&str, f64); 2] = [
    ("300 transcoded calls per core", 20_000.0 / 300.0),
    ("1,000 passed-through calls per core", 20_000.0 / 1000.0),
];

fn thread_cpu_ns() -> u64 {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("/proc/thread-self/schedstat");
    schedstat
        .split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .expect("the thread's CPU time")
}

fn voluntary_switches() -> u64 {
    let status =
        std::fs::read_to_string("/proc/thread-self/status").expect("/proc/thread-self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("the thread's context switches")
}

/// What the bridge's side spent: µs of CPU, packets relayed, wake-ups.
struct Spent {
    micros: f64,
    packets: f64,
    wakeups: f64,
}

/// The bridge's side: takes in each packet the peer sends and sends it back.
fn relay(socket: &UdpSocket, packets: usize) -> Spent {
    let mut buffer = [0_u8; 1500];
    let (cpu, switches) = (thread_cpu_ns(), voluntary_switches());
    for _ in 0..packets {
        let (length, from) = socket.recv_from(&mut buffer).expect("a packet");
        socket.send_to(&buffer[..length], from).expect("a send");
    }
    Spent {
        micros: (thread_cpu_ns() - cpu) as f64 / 1000.0,
        packets: packets as f64,
        wakeups: (voluntary_switches() - switches) as f64,
    }
}

/// The peer sends bursts of `burst` packets `gap` apart (each once the last
/// came back) while `relay` runs.
fn measure(burst: usize, gap: Duration) -> Spent {
    let bridge = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let peer = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let to = bridge.local_addr().unwrap();
    let bursts = PACKETS / burst;
    let sender = std::thread::spawn(move || {
        let packet = [0x80_u8; PACKET];
        let mut back = [0_u8; 1500];
        for _ in 0..bursts {
            for _ in 0..burst {
                peer.send_to(&packet, to).expect("a send");
            }
            for _ in 0..burst {
                peer.recv_from(&mut back).expect("the packet back");
            }
            std::thread::sleep(gap);
        }
    });
    let spent = relay(&bridge, bursts * burst);
    sender.join().unwrap();
    spent
}

fn main() {
    // Warm up the sockets and the scheduler.
    measure(BURST, Duration::ZERO);
    let batched = measure(BURST, Duration::ZERO);
    let single = measure(1, Duration::from_millis(2));
    // CPU = per packet × packets + per wake-up × wake-ups, from the two runs.
    let determinant = batched.packets * single.wakeups - single.packets * batched.wakeups;
    let per_wakeup =
        (batched.packets * single.micros - single.packets * batched.micros) / determinant;
    let per_packet = (batched.micros - per_wakeup * batched.wakeups) / batched.packets;
    println!(
        "The kernel's part of relaying an RTP packet (receive one, send one), on this machine:"
    );
    println!("| run | packets per wake-up | µs per packet, all told |");
    println!("|---|---|---|");
    let bursts = format!("bursts of {BURST}");
    for (label, spent) in [
        (bursts.as_str(), &batched),
        ("one packet every 2 ms", &single),
    ] {
        println!(
            "| {label} | {:.1} | {:.1} |",
            spent.packets / spent.wakeups.max(1.0),
            spent.micros / spent.packets
        );
    }
    println!();
    println!("Apart: {per_packet:.1} µs per packet, {per_wakeup:.1} µs per wake-up.");
    println!();
    println!("A passed-through call relays two packets every 20 ms, one each way:");
    println!("| | µs per call per 20 ms | calls per core at most |");
    println!("|---|---|---|");
    let per_call = 2.0 * per_packet;
    println!(
        "| the kernel alone, never waking | {per_call:.1} | {:.0} |",
        20_000.0 / per_call
    );
    let woken = 2.0 * (per_packet + per_wakeup);
    println!(
        "| the kernel alone, a wake-up per packet | {woken:.1} | {:.0} |",
        20_000.0 / woken
    );
    for (target, budget) in TARGETS {
        println!("| all a call may cost for {target} | {budget:.1} | |");
    }
}
