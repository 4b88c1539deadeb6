//! `sip-cc-bridge-bench`: N concurrent SIP → ConnectyCube calls through a
//! real `sip-cc-bridge` process, measured from outside it.
//!
//! - SIP leg: SIPp places the calls (`bridge-app/bench/call.xml`), this
//!   process sends each call's PCMU (20 ms packets) from its own socket;
//! - app leg: one light WebRTC peer per call in this process (a
//!   `connectycubesink`/`src` pair answering as the mapped user, Opus; on
//!   the shared WebRTC stack unless the call has video);
//! - the bridge has N mapped users on a sandbox in a process of its own;
//! - CPU, RSS and threads come from `/proc/<bridge pid>` (RSS and threads
//!   against the bridge with its users online and no call), loss and setup
//!   time from the bridge's CDR lines.
//!
//! `--smoke` (CI): a few calls, fails unless every call connects.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use gst::prelude::*;
use sip_cc_bridge::sip::media::WebRtcStack;

#[derive(Parser)]
#[command(
    about = "Concurrent bridged calls through sip-cc-bridge: CPU, memory, threads, loss, setup time"
)]
struct Args {
    /// Concurrent calls.
    #[arg(long, default_value_t = 10)]
    calls: usize,
    /// How long the calls last, in seconds (measured over the middle part).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// CI mode: 2 calls of 6 s unless given; fail unless all connect.
    #[arg(long)]
    smoke: bool,
    /// The phones' codec: PCMU (transcoded to the app's Opus) or Opus
    /// (passed through as it is).
    #[arg(long, value_enum, default_value_t = PhoneCodec::Pcmu)]
    codec: PhoneCodec,
    /// Video calls: the phones also send H.264 (640x360, 30 fps), the apps
    /// VP8; the bridge transcodes both ways.
    #[arg(long)]
    video: bool,
    /// What carries the bridge's WebRTC leg of audio calls (its
    /// `sip.webrtc_stack`): compare the two in one build.
    #[arg(long, value_enum, default_value_t = WebRtcStack::Shared)]
    webrtc_stack: WebRtcStack,
    /// The bridge's Opus encoder effort, 0 to 10 (its `sip.opus_complexity`).
    #[arg(long, default_value_t = sip_cc_bridge::sip::media::DEFAULT_OPUS_COMPLEXITY)]
    opus_complexity: u32,
    /// When in each 20 ms the phones' and the apps' packets go.
    #[arg(long, value_enum, default_value_t = Pacing::Spread)]
    pacing: Pacing,
    /// Keep the bridge's log in this file (its level from `RUST_LOG`).
    #[arg(long)]
    bridge_log: Option<PathBuf>,
    /// Every row of the README's performance table, each run in a fresh
    /// bench process with calls of `--seconds` (the README's: 30, which
    /// the 300-call rows need; about a quarter of an hour in all), printed
    /// as one table.
    #[arg(long, conflicts_with_all = ["calls", "smoke", "codec", "video", "webrtc_stack", "pacing", "bridge_log"])]
    table: bool,
    /// Run on the host's network (its firewall and interfaces) rather than
    /// in a network namespace of the bench's own.
    #[arg(long)]
    host_network: bool,
}

/// The README's performance table: each row's scenario and its arguments.
fn table_rows() -> Vec<(String, Vec<&'static str>)> {
    let mut rows = Vec::new();
    for (scenario, codec) in [("PCMU ↔ Opus", "pcmu"), ("Opus passed through", "opus")] {
        for calls in ["10", "20", "50", "100", "200", "300"] {
            rows.push((
                scenario.to_owned(),
                vec!["--calls", calls, "--codec", codec],
            ));
        }
        rows.push((
            format!("{scenario}, `--pacing in-step`"),
            vec!["--calls", "50", "--codec", codec, "--pacing", "in-step"],
        ));
    }
    rows.push((
        "PCMU ↔ Opus and H.264 ↔ VP8 video, 640×360 at 30 fps (webrtcbin)".to_owned(),
        vec!["--calls", "1", "--video"],
    ));
    rows
}

/// Runs every row of `table_rows` in a bench process of its own (as the
/// README's rows were measured: a fresh bridge, sandbox and peers each),
/// printing each row as it is measured.
fn run_table(args: &Args) -> anyhow::Result<()> {
    let bench = std::env::current_exe()?;
    println!(
        "| scenario | calls | CPU % of one core per call | RSS per call | threads idle → busy | loss | setup p50 / p99 | latency SIP→WebRTC p50 / p99 | latency WebRTC→SIP p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let rows = table_rows();
    let mut failed = 0;
    for (scenario, row_args) in &rows {
        let output = Command::new(&bench)
            .args(row_args)
            .args([
                "--seconds",
                &args.seconds.to_string(),
                "--opus-complexity",
                &args.opus_complexity.to_string(),
            ])
            .args(args.host_network.then_some("--host-network"))
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run the bench again")?;
        let report = String::from_utf8_lossy(&output.stdout);
        match report.lines().find_map(table_cells) {
            Some(cells) if output.status.success() => {
                println!("| {scenario} | {} |", cells.join(" | "));
            }
            _ => {
                failed += 1;
                println!("| {scenario} | failed: {} |", row_args.join(" "));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} rows failed", rows.len());
    }
    Ok(())
}

/// The README's columns of a run's measured row (all but "answered"),
/// from the line the bench prints for it.
fn table_cells(line: &str) -> Option<Vec<&str>> {
    let cells: Vec<&str> = line
        .strip_prefix('|')?
        .strip_suffix('|')?
        .split('|')
        .map(str::trim)
        .collect();
    // The header and the rule have no number of calls first.
    cells.first()?.parse::<usize>().ok()?;
    (cells.len() == 9).then(|| [&cells[..1], &cells[2..]].concat())
}

const VP8_CAPS: &str = "application/x-rtp,media=(string)video,clock-rate=(int)90000,encoding-name=(string)VP8,payload=(int)96";

/// The phones' cameras: H.264 to the bridge's video port (found in its
/// log by the port each phone offered), what comes back is dropped.
fn start_cameras(ports: &[u16], log: &Log) -> anyhow::Result<Vec<gst::Pipeline>> {
    let found = wait_for(log, Duration::from_secs(30), |lines| {
        lines.iter().filter(|l| l.contains(": video at ")).count() >= ports.len()
    });
    if !found {
        bail!("the bridge did not start the calls' video");
    }
    let lines = log.lock().unwrap().clone();
    ports
        .iter()
        .map(|port| {
            // "call ID: video at ADDR:PORT from REMOTE (H264/PT)"
            let bridge = lines
                .iter()
                .filter_map(|l| l.split_once(": video at ")?.1.split_once(" from "))
                .find(|(_, remote)| remote.starts_with(&format!("127.0.0.1:{port} ")))
                .and_then(|(local, _)| local.parse::<SocketAddr>().ok())
                .context("no video port for a call")?;
            play(&format!(
                "videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=360,framerate=30/1 \
                   ! openh264enc gop-size=60 ! h264parse ! rtph264pay pt=102 config-interval=-1 \
                   ! udpsink host=127.0.0.1 port={} sync=false async=false \
                 udpsrc port={port} ! fakesink sync=false async=false",
                bridge.port()
            ))
        })
        .collect()
}

/// A pipeline of the bench's own, playing.
fn play(description: &str) -> anyhow::Result<gst::Pipeline> {
    let pipeline = gst::parse::launch(description)?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow!("not a pipeline"))?;
    pipeline.set_state(gst::State::Playing)?;
    Ok(pipeline)
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PhoneCodec {
    Pcmu,
    Opus,
}

impl PhoneCodec {
    /// Payload type, `a=rtpmap` value, RTP clock units and payload bytes per 20 ms packet.
    fn rtp(self) -> (u8, &'static str, u32, usize) {
        match self {
            PhoneCodec::Pcmu => (0, "PCMU/8000", 160, 160),
            PhoneCodec::Opus => (96, "opus/48000/2", 960, 60),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            PhoneCodec::Pcmu => "PCMU (SIP) <-> Opus (WebRTC, DTLS-SRTP), transcoded",
            PhoneCodec::Opus => "Opus (SIP) <-> Opus (WebRTC, DTLS-SRTP), passed through",
        }
    }
}

/// Moves the bench, and every process it starts, into a network namespace
/// of its own, so the bridge's cost is its own: no host firewall tracking
/// every packet (the test namespace's NAT costs a few percent), and one
/// address to offer as an ICE candidate. That address is on one end of a
/// veth pair (libnice, on webrtcbin, offers no loopback address, and skips
/// interfaces named `veth*`); what goes to a local address goes through
/// loopback. Without root the bench stays on the host's network and says
/// so.
fn own_network() {
    // SAFETY: no thread has started yet, so the whole process moves.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "note: measuring on the host's network (no namespace of its own: {})",
            std::io::Error::last_os_error()
        );
        return;
    }
    let steps: [&[&str]; 5] = [
        &["link", "set", "lo", "up"],
        &[
            "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
        ],
        &["addr", "add", "192.0.2.1/32", "dev", "bench0"],
        &["link", "set", "bench0", "up"],
        &["link", "set", "bench1", "up"],
    ];
    for step in steps {
        let done = Command::new("ip").args(step).status();
        if !done.is_ok_and(|status| status.success()) {
            eprintln!(
                "note: `ip {}` failed in the bench's namespace",
                step.join(" ")
            );
        }
    }
}

/// A port free for both TCP and UDP (SIP and SIPp take both; the calls'
/// media sockets take UDP ports from the same range).
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The bridge's log lines, collected as they come.
type Log = Arc<Mutex<Vec<String>>>;

fn wait_for(log: &Log, within: Duration, done: impl Fn(&[String]) -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done(&log.lock().unwrap()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// CPU ticks (user + system), RSS in kB and threads of a process.
fn sample(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("odd /proc/pid/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((ticks, field("VmRSS:"), field("Threads:")))
}

/// A child process, killed when dropped (also when the bench stops early).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Bridge {
    child: Killed,
    log: Log,
}

/// The ConnectyCube sandbox in a process of its own, as the cloud would be:
/// what it spends serving the apps is not the bridge's.
fn start_sandbox(port: u16) -> anyhow::Result<Killed> {
    let exe = std::env::current_exe()?.with_file_name("sip-cc-bridge");
    let child = Killed(
        Command::new(&exe)
            .args(["sandbox", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {} sandbox", exe.display()))?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the sandbox did not start listening on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn start_bridge(
    dir: &Path,
    calls: usize,
    sip: u16,
    sandbox: u16,
    args: &Args,
) -> anyhow::Result<Bridge> {
    let stack = format!("{:?}", args.webrtc_stack).to_lowercase();
    let complexity = args.opus_complexity;
    let mut config = format!(
        "[sip]\nlisten = \"127.0.0.1:{sip}\"\nmax_calls = {}\nmax_cpu_percent = 0\nwebrtc_stack = \"{stack}\"\nopus_complexity = {complexity}\n\n\
         [connectycube]\napi_url = \"http://127.0.0.1:{sandbox}\"\n\
         chat_url = \"ws://127.0.0.1:{sandbox}/ws\"\ngateway_login = \"bench-gateway\"\ngateway_password = \"bench\"\n\n\
         [cdr]\npath = \"{}\"\n",
        calls + 10,
        dir.join("cdr.jsonl").display()
    );
    for k in 1..=calls {
        config.push_str(&format!(
            "\n[[users]]\nextension = \"u{k}\"\nlogin = \"bench-u{k}\"\npassword = \"bench\"\n"
        ));
    }
    let path = dir.join("bridge.toml");
    std::fs::write(&path, config)?;
    let exe = std::env::current_exe()?.with_file_name("sip-cc-bridge");
    let mut child = Command::new(&exe)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info,rsipstack=warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let log = Log::default();
    let lines = log.clone();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    let bridge = Bridge {
        child: Killed(child),
        log,
    };
    if !wait_for(&bridge.log, Duration::from_secs(30), |l| {
        l.iter().any(|l| l.contains("SIP listening on tcp"))
    }) {
        bail!(
            "the bridge did not start: {:#?}",
            bridge.log.lock().unwrap()
        );
    }
    Ok(bridge)
}

/// One light WebRTC peer per call: answers as `bench-u<k>` and sends the
/// Opus voice `start_voices` pushes into its payloader (`voice`).
fn start_peers(calls: usize, sandbox: u16, video: bool) -> anyhow::Result<Vec<gst::Pipeline>> {
    (1..=calls)
        .map(|k| {
            let credentials = format!(
                "app-id=1 auth-key=sandbox login=bench-u{k} password=bench answer-timeout=300 \
                 api-url=http://127.0.0.1:{sandbox} chat-url=ws://localhost:{sandbox}/ws chat-domain=localhost"
            );
            let stack = if video { "" } else { "webrtc-stack=shared" };
            play(&format!(
                "rtpopuspay name=voice pt=111 ! connectycubesink session=peer-{k} {credentials} {stack} \
                 connectycubesrc session=peer-{k} {stack} ! fakesink sync=false async=false{}",
                if video {
                    format!(
                        " videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=360,framerate=30/1 \
                           ! vp8enc deadline=1 cpu-used=8 ! rtpvp8pay pt=96 \
                           ! connectycubesink session=peer-{k} {credentials} caps=\"{VP8_CAPS}\" \
                         connectycubesrc session=peer-{k} media=video ! fakesink sync=false async=false"
                    )
                } else {
                    String::new()
                }
            ))
        })
        .collect()
}

/// When in each 20 ms the senders' packets go.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pacing {
    /// Spread over the 20 ms, as independent phones' and apps' packets
    /// are: in ten groups, 2 ms apart. (Finer, the bench's own sending
    /// threads would wake thousands of times a second and take the cores
    /// from the bridge they measure.)
    Spread,
    /// All at once: the bridge wakes once for all calls' packets, the best
    /// case for it.
    InStep,
}

impl Pacing {
    /// Into how many groups, evenly spaced, the senders of a 20 ms period fall.
    fn groups(self) -> u32 {
        match self {
            Pacing::Spread => 10,
            Pacing::InStep => 1,
        }
    }
}

/// Something done for each of a number of senders every 20 ms, on a
/// thread of its own, until dropped.
struct Ticker {
    running: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    /// Calls `turn(period, sender)` for every sender in every 20 ms period.
    fn start(
        senders: usize,
        pacing: Pacing,
        mut turn: impl FnMut(usize, usize) + Send + 'static,
    ) -> Ticker {
        let running = Arc::new(AtomicBool::new(true));
        let run = running.clone();
        let groups = pacing.groups();
        let spacing = Duration::from_millis(20) / groups;
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now();
            let mut period = 0;
            while run.load(Ordering::Relaxed) {
                for group in 0..groups as usize {
                    let first = group * senders / groups as usize;
                    let last = (group + 1) * senders / groups as usize;
                    for sender in first..last {
                        turn(period, sender);
                    }
                    next += spacing;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                period += 1;
            }
        });
        Ticker {
            running,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long the bench's voice lasts before it repeats.
const VOICE_SECONDS: usize = 10;
/// The app peers' microphone rate, as a browser's.
const VOICE_RATE: u32 = 48000;

/// The phone side's RTP every 20 ms, from each call's socket to the bridge
/// port the bridge's log names: a voice in PCMU (codecs pick their modes by
/// what they hear, and a tone or silence would cost the bridge less than
/// speech does), or Opus-sized packets to pass through.
fn start_phones(sockets: Vec<UdpSocket>, log: Log, codec: PhoneCodec, pacing: Pacing) -> Ticker {
    let (payload_type, _, clock_units, payload_bytes) = codec.rtp();
    let voice: Vec<u8> = match codec {
        PhoneCodec::Pcmu => bridge_protocol::tone::voice_like(8000, VOICE_SECONDS)
            .into_iter()
            .map(mu_law)
            .collect(),
        PhoneCodec::Opus => vec![0x55; payload_bytes],
    };
    let ports: Vec<u16> = sockets
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect();
    let mut targets: HashMap<u16, SocketAddr> = HashMap::new();
    let mut buffer = [0u8; 1500];
    Ticker::start(sockets.len(), pacing, move |period, call| {
        if call == 0 && targets.len() < sockets.len() {
            for line in log.lock().unwrap().iter() {
                let Some((_, rest)) = line.split_once(" local ") else {
                    continue;
                };
                let mut words = rest.split_whitespace();
                let (Some(local), Some("remote"), Some(remote)) =
                    (words.next(), words.next(), words.next())
                else {
                    continue;
                };
                if let (Ok(local), Ok(remote)) =
                    (local.parse::<SocketAddr>(), remote.parse::<SocketAddr>())
                {
                    targets.insert(remote.port(), local);
                }
            }
        }
        let at = period * payload_bytes % voice.len();
        let seq = period as u16;
        let (socket, port) = (&sockets[call], ports[call]);
        if let Some(target) = targets.get(&port) {
            let packet = rtp_types::RtpPacketBuilder::new()
                .payload_type(payload_type)
                .sequence_number(seq)
                .timestamp(u32::from(seq).wrapping_mul(clock_units))
                .ssrc(u32::from(port))
                .payload(&voice[at..at + payload_bytes])
                .write_vec()
                .unwrap();
            let _ = socket.send_to(&packet, target);
        }
        // What comes back is drained, not judged.
        while socket.recv_from(&mut buffer).is_ok() {}
    })
}

/// The app peers' microphones: the voice, encoded once as a browser
/// encodes it (Opus voice mode, 32 kbit/s, 20 ms frames, no wider than the
/// bridge's `maxplaybackrate`), one packet to each peer's payloader every
/// 20 ms, pushed from one thread. The bench encodes nothing per call and
/// wakes no thread per call: what it spent would be taken from the bridge
/// on this machine, not on an app's phone.
fn start_voices(
    peers: &[gst::Pipeline],
    codec: PhoneCodec,
    pacing: Pacing,
) -> anyhow::Result<Ticker> {
    let bandwidth = match codec {
        PhoneCodec::Pcmu => "narrowband",
        PhoneCodec::Opus => "fullband",
    };
    let packets = encoded_voice(bandwidth)?;
    let caps = gst::Caps::builder("audio/x-opus")
        .field("channel-mapping-family", 0)
        .field("channels", 1)
        .field("rate", 48000)
        .build();
    let microphones = peers
        .iter()
        .map(|pipeline| {
            let payloader = pipeline
                .by_name("voice")
                .context("a peer without a payloader")?;
            let microphone = gst::Pad::builder(gst::PadDirection::Src).build();
            microphone.set_active(true)?;
            microphone.link(
                &payloader
                    .static_pad("sink")
                    .context("a payloader without a sink")?,
            )?;
            microphone.push_event(gst::event::StreamStart::new("voice"));
            microphone.push_event(gst::event::Caps::new(&caps));
            let segment = gst::FormattedSegment::<gst::ClockTime>::new();
            microphone.push_event(gst::event::Segment::new(&segment));
            Ok((pipeline.clone(), microphone))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Ticker::start(
        microphones.len(),
        pacing,
        move |period, peer| {
            let (pipeline, microphone) = &microphones[peer];
            let mut buffer = gst::Buffer::from_slice(packets[period % packets.len()].clone());
            let buffer_mut = buffer.get_mut().unwrap();
            buffer_mut.set_pts(pipeline.current_running_time());
            buffer_mut.set_duration(gst::ClockTime::from_mseconds(20));
            let _ = microphone.push(buffer);
        },
    ))
}

/// `VOICE_SECONDS` of the voice in Opus packets of 20 ms.
fn encoded_voice(bandwidth: &str) -> anyhow::Result<Vec<Arc<[u8]>>> {
    let pipeline = gst::parse::launch(&format!(
        "appsrc name=in format=time caps=audio/x-raw,format=S16LE,layout=interleaved,rate={VOICE_RATE},channels=1 \
           ! opusenc audio-type=voice bitrate=32000 bandwidth={bandwidth} ! appsink name=out sync=false"
    ))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| anyhow!("not a pipeline"))?;
    let input: gst_app::AppSrc = pipeline.by_name("in").and_downcast().context("appsrc")?;
    let output: gst_app::AppSink = pipeline.by_name("out").and_downcast().context("appsink")?;
    pipeline.set_state(gst::State::Playing)?;
    let samples: Vec<u8> = bridge_protocol::tone::voice_like(VOICE_RATE, VOICE_SECONDS)
        .into_iter()
        .flat_map(i16::to_le_bytes)
        .collect();
    let mut buffer = gst::Buffer::from_mut_slice(samples);
    let duration = gst::ClockTime::from_seconds(VOICE_SECONDS as u64);
    buffer.make_mut().set_pts(gst::ClockTime::ZERO);
    buffer.make_mut().set_duration(duration);
    input.push_buffer(buffer)?;
    input.end_of_stream()?;
    let mut packets = Vec::new();
    while let Ok(sample) = output.pull_sample() {
        let map = sample
            .buffer()
            .context("a sample without a buffer")?
            .map_readable()?;
        packets.push(Arc::from(map.as_slice()));
    }
    pipeline.set_state(gst::State::Null)?;
    if packets.len() < VOICE_SECONDS * 50 - 1 {
        bail!("the voice encoded to {} packets only", packets.len());
    }
    Ok(packets)
}

/// G.711 µ-law (ITU-T G.711) of one 16-bit sample.
fn mu_law(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32635;
    let sign = if sample < 0 { 0x80 } else { 0 };
    let magnitude = i32::from(sample).abs().min(CLIP) + BIAS;
    // The highest set bit among bits 7..=14 of the biased magnitude.
    let exponent = 31 - (magnitude >> 7).leading_zeros() as i32;
    let mantissa = (magnitude >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) as u8 | mantissa as u8)
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.table {
        return run_table(&args);
    }
    if !args.host_network {
        own_network();
    }
    let (calls, seconds) = if args.smoke {
        (args.calls.min(2), args.seconds.min(6))
    } else {
        (args.calls, args.seconds)
    };
    gst::init()?;
    gstsipcc::register()?;
    gstsipcc::warm_up(vec![
        "opusenc",
        "rtpopuspay",
        "connectycubesink",
        "connectycubesrc",
    ]);
    let dir = std::env::temp_dir().join(format!("sip-cc-bridge-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (sip, sandbox) = (free_port(), free_port());
    let _sandbox = start_sandbox(sandbox)?;
    let bridge = start_bridge(&dir, calls, sip, sandbox, &args)?;
    let pid = bridge.child.0.id();
    if !wait_for(&bridge.log, Duration::from_secs(60), |l| {
        l.iter().filter(|l| l.contains(": chat online as ")).count() >= calls
    }) {
        bail!("the mapped users did not come online");
    }
    let peers = start_peers(calls, sandbox, args.video)?;
    let voices = start_voices(&peers, args.codec, args.pacing)?;
    std::thread::sleep(Duration::from_secs(2));
    // The bridge with every user online and no call: what the calls add
    // is measured from here.
    let idle = sample(pid)?;

    let sockets: Vec<UdpSocket> = (0..calls)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect::<std::io::Result<_>>()?;
    // Each phone's camera port, when video: free now, bound by its camera.
    let video_ports: Vec<u16> = if args.video {
        (0..calls).map(|_| free_port()).collect()
    } else {
        Vec::new()
    };
    let csv: String = std::iter::once("SEQUENTIAL\n".to_owned())
        .chain(sockets.iter().enumerate().map(|(i, s)| {
            let video = video_ports.get(i).map_or(0, |p| *p);
            format!("u{};{};{video};\n", i + 1, s.local_addr().unwrap().port())
        }))
        .collect();
    std::fs::write(dir.join("calls.csv"), csv)?;
    let phones = start_phones(sockets, bridge.log.clone(), args.codec, args.pacing);
    let (payload_type, rtpmap, ..) = args.codec.rtp();
    let scenario = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(if args.video {
        "bench/video-call.xml"
    } else {
        "bench/call.xml"
    });
    let started = Instant::now();
    let mut sipp = Killed(
        Command::new("sipp")
            .arg("-sf")
            .arg(&scenario)
            .arg("-inf")
            .arg(dir.join("calls.csv"))
            .args([
                "-s",
                "bench",
                &format!("127.0.0.1:{sip}"),
                "-i",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &free_port().to_string(),
                "-mp",
                &free_port().to_string(),
            ])
            .args([
                "-key",
                "pt",
                &payload_type.to_string(),
                "-key",
                "rtpmap",
                rtpmap,
            ])
            .args([
                "-m",
                &calls.to_string(),
                "-l",
                &calls.to_string(),
                "-r",
                "20",
            ])
            .args([
                "-d",
                &(seconds * 1000).to_string(),
                "-nostdin",
                "-timeout",
                &format!("{}s", seconds + 90),
            ])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("sipp (Debian sip-tester) is needed")?,
    );

    let cameras = if args.video {
        start_cameras(&video_ports, &bridge.log)?
    } else {
        Vec::new()
    };
    let all_answered = wait_for(&bridge.log, Duration::from_secs(seconds / 2 + 30), |l| {
        l.iter().filter(|l| l.contains(": answered by ")).count() >= calls
    });
    // Measure over the middle of the calls, once all are up.
    let window = Duration::from_secs((seconds / 3).max(2));
    if started.elapsed() + window > Duration::from_secs(seconds) {
        eprintln!(
            "warning: the first calls end within the measured {window:?}: \
             the figures count fewer than {calls} calls (give a longer --seconds)"
        );
    }
    let before = sample(pid)?;
    let measured_at = Instant::now();
    std::thread::sleep(window);
    let after = sample(pid)?;
    let elapsed = measured_at.elapsed().as_secs_f64();
    let status = sipp.0.wait()?;
    drop(phones);
    drop(cameras);
    drop(voices);
    drop(peers);
    std::thread::sleep(Duration::from_secs(1));

    let cdr: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("cdr.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let answered: Vec<&serde_json::Value> = cdr.iter().filter(|l| l["status"] == 200).collect();
    let mut setup_ms: Vec<f64> = answered
        .iter()
        .filter_map(|l| Some((l["answer"].as_f64()? - l["start"].as_f64()?) * 1000.0))
        .collect();
    let (received, lost) = answered.iter().fold((0u64, 0i64), |(r, l), line| {
        (
            r + line["rtp"]["packets_received"].as_u64().unwrap_or(0),
            l + line["rtp"]["packets_lost"].as_i64().unwrap_or(0),
        )
    });
    // Each call's own percentiles (from the bridge's CDR): the median call's
    // p50 and the worst call's p99.
    let latency = |direction: &str| {
        let of = |p: &str| -> Vec<f64> {
            answered
                .iter()
                .filter_map(|l| l["latency_ms"][direction][p].as_f64())
                .collect()
        };
        let (mut p50, mut p99) = (of("p50"), of("p99"));
        format!(
            "{:.1} / {:.1} ms",
            percentile(&mut p50, 0.5),
            percentile(&mut p99, 1.0)
        )
    };
    let ticks_per_second = 100.0;
    let cpu_percent = (after.0 - before.0) as f64 / ticks_per_second / elapsed * 100.0;
    let per_call = |total: f64| total / calls as f64;

    println!(
        "sip-cc-bridge-bench: {calls} concurrent calls, {}{}, {seconds} s",
        args.codec.describe(),
        if args.video {
            ", with video H.264 (SIP) <-> VP8 (WebRTC), 640x360 at 30 fps, transcoded"
        } else {
            ""
        }
    );
    println!(
        "| calls | answered | CPU % of one core per call | RSS per call | threads idle → busy | loss SIP→bridge | setup p50 / p99 | latency SIP→WebRTC p50 / p99 | latency WebRTC→SIP p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {calls} | {} | {:.2} % | {:.2} MB | {} → {} (+{:.1} per call) | {:.2} % | {:.0} / {:.0} ms | {} | {} |",
        answered.len(),
        per_call(cpu_percent),
        per_call(after.1.saturating_sub(idle.1) as f64 / 1024.0),
        idle.2,
        after.2,
        per_call(after.2 as f64 - idle.2 as f64),
        if received + lost.max(0) as u64 > 0 {
            lost.max(0) as f64 / (received as f64 + lost.max(0) as f64) * 100.0
        } else {
            f64::NAN
        },
        percentile(&mut setup_ms, 0.5),
        percentile(&mut setup_ms, 0.99),
        latency("to_app"),
        latency("to_phone"),
    );
    println!(
        "(whole run {:.0} s; the bridge used {:.1} % of one core over the measured {:.1} s; SIPp {})",
        started.elapsed().as_secs_f64(),
        cpu_percent,
        elapsed,
        if status.success() {
            "ok"
        } else {
            "reported failed calls"
        }
    );
    if let Some(path) = &args.bridge_log {
        std::fs::write(path, bridge.log.lock().unwrap().join("\n"))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !all_answered || answered.len() < calls {
        let log = bridge.log.lock().unwrap();
        eprintln!("the bridge's last log lines:");
        for line in log.iter().rev().take(20).rev() {
            eprintln!("  {line}");
        }
        bail!("only {} of {calls} calls connected", answered.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// G.711's µ-law expansion, to check the compression against.
    fn expand(code: u8) -> i32 {
        let code = !code;
        let exponent = i32::from((code >> 4) & 0x07);
        let magnitude = (((i32::from(code & 0x0f) << 3) + 0x84) << exponent) - 0x84;
        if code & 0x80 != 0 {
            -magnitude
        } else {
            magnitude
        }
    }

    #[test]
    fn a_runs_measured_row_gives_the_readme_columns() {
        let row = "| 300 | 300 | 0.32 % | 0.33 MB | 5 → 6 (+0.0 per call) | 0.00 % | 4 / 8 ms | 0.0 / 6.6 ms | 0.0 / 0.2 ms |";
        assert_eq!(
            table_cells(row).unwrap(),
            [
                "300",
                "0.32 %",
                "0.33 MB",
                "5 → 6 (+0.0 per call)",
                "0.00 %",
                "4 / 8 ms",
                "0.0 / 6.6 ms",
                "0.0 / 0.2 ms"
            ]
        );
        assert_eq!(
            table_cells(
                "| calls | answered | CPU % of one core per call | RSS per call | threads idle → busy | loss SIP→bridge | setup p50 / p99 | latency SIP→WebRTC p50 / p99 | latency WebRTC→SIP p50 / p99 |"
            ),
            None
        );
        assert_eq!(table_cells("|---|---|---|---|---|---|---|---|---|"), None);
        assert_eq!(
            table_cells("(whole run 46 s; the bridge used 89.5 % of one core)"),
            None
        );
    }

    #[test]
    fn mu_law_follows_g711() {
        assert_eq!(mu_law(0), 0xff);
        assert_eq!(mu_law(i16::MAX), 0x80);
        assert_eq!(mu_law(i16::MIN), 0x00);
        for sample in (-32000..32000).step_by(97) {
            let error = (expand(mu_law(sample as i16)) - sample).abs();
            // Half a quantization step of the segment the sample falls in.
            assert!(error <= (sample.abs() >> 4).max(4), "{sample}: {error}");
        }
    }
}
