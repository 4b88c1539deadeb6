//! What the Opus encoder's `audio-type` and `complexity` cost and give, for
//! the bridge's transcoded calls: mono voice at the phone's 8 kHz, 20 ms
//! frames, 32 kbit/s (`opusvoiceenc`'s defaults). Prints, per setting, the
//! mode libopus chose, the CPU time to encode one frame (median of several
//! passes, with its ratio to the bridge's setting, so that this noisy
//! machine's speed cancels out) and how far the decoded voice's spectrum is
//! from the original's.
//!
//! `cargo bench -p gst-plugin-sipcc --bench opus_complexity`

use std::time::Instant;

use bridge_protocol::opus_fmtp::packet_mode;
use opusic_c::{Application, Bitrate, Channels, Decoder, Encoder, SampleRate};

const RATE: usize = 8000;
const FRAME: usize = RATE / 50;
const SECONDS: usize = 10;
const PASSES: usize = 5;

/// Encodes the whole signal once; the packets, and the CPU time per frame.
fn encode(application: Application, complexity: u8, signal: &[i16]) -> (Vec<Vec<u8>>, f64) {
    let mut encoder =
        Encoder::new(Channels::Mono, SampleRate::Hz8000, application).expect("an Opus encoder");
    encoder.set_complexity(complexity).expect("a complexity");
    encoder
        .set_bitrate(Bitrate::Value(32000))
        .expect("a bitrate");
    let mut packet = [0_u8; 1500];
    let started = Instant::now();
    let packets: Vec<Vec<u8>> = signal
        .chunks_exact(FRAME)
        .map(|frame| {
            let frame: Vec<u16> = frame.iter().map(|&s| s as u16).collect();
            let length = encoder
                .encode_to_slice(&frame, &mut packet)
                .expect("an encoded frame");
            packet[..length].to_vec()
        })
        .collect();
    let per_frame = started.elapsed().as_secs_f64() / packets.len() as f64;
    (packets, per_frame)
}

/// Decodes the packets at 8 kHz, as `opusvoicedec` does for a phone; the
/// voice, and the CPU time per frame.
fn decode(packets: &[Vec<u8>]) -> (Vec<i16>, f64) {
    let mut decoder = Decoder::new(Channels::Mono, SampleRate::Hz8000).expect("an Opus decoder");
    let mut decoded = vec![0_u16; packets.len() * FRAME];
    let started = Instant::now();
    for (packet, frame) in packets.iter().zip(decoded.chunks_exact_mut(FRAME)) {
        decoder
            .decode_to_slice(packet, frame, false)
            .expect("a decoded frame");
    }
    let per_frame = started.elapsed().as_secs_f64() / packets.len() as f64;
    (decoded.iter().map(|&s| s as i16).collect(), per_frame)
}

/// How far the decoded voice's spectrum is from the original's: the
/// log-spectral distance in dB, averaged over the frames with voice in them
/// (lower is closer), at the delay that matches them best (the codec's
/// look-ahead).
fn spectral_distance(signal: &[i16], packets: &[Vec<u8>]) -> f64 {
    let decoded: Vec<f64> = decode(packets).0.iter().map(|&s| f64::from(s)).collect();
    let original: Vec<f64> = signal.iter().map(|&s| f64::from(s)).collect();
    let delay = (0..200)
        .max_by_key(|&delay| {
            let correlation: f64 = original
                .iter()
                .zip(&decoded[delay..])
                .map(|(x, y)| x * y)
                .sum();
            correlation as i64
        })
        .unwrap_or(0);
    let distances: Vec<f64> = original
        .chunks_exact(FRAME)
        .zip(decoded[delay..].chunks_exact(FRAME))
        .filter(|(x, _)| x.iter().map(|v| v * v).sum::<f64>() / FRAME as f64 > 1e4)
        .map(|(x, y)| {
            let (x, y) = (power_spectrum(x), power_spectrum(y));
            let mean_square: f64 = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (10.0 * ((p + 1.0) / (q + 1.0)).log10()).powi(2))
                .sum::<f64>()
                / x.len() as f64;
            mean_square.sqrt()
        })
        .collect();
    distances.iter().sum::<f64>() / distances.len() as f64
}

/// The power spectrum of one Hann-windowed frame, 64 bands up to 4 kHz.
fn power_spectrum(frame: &[f64]) -> Vec<f64> {
    let n = frame.len() as f64;
    (1..=64)
        .map(|band| {
            let frequency = band as f64 / 128.0;
            let (mut re, mut im) = (0.0, 0.0);
            for (k, x) in frame.iter().enumerate() {
                let window = 0.5 - 0.5 * (std::f64::consts::TAU * k as f64 / n).cos();
                let angle = std::f64::consts::TAU * frequency * k as f64;
                re += x * window * angle.cos();
                im -= x * window * angle.sin();
            }
            re * re + im * im
        })
        .collect()
}

/// The `opusvoiceenc audio-type` of an application.
fn audio_type(application: Application) -> &'static str {
    match application {
        Application::Voip => "voice",
        Application::LowDelay => "restricted-lowdelay",
        _ => "generic",
    }
}

/// The modes the packets were coded in.
fn modes(packets: &[Vec<u8>]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for mode in packets.iter().filter_map(|p| packet_mode(p)) {
        if !seen.contains(&mode) {
            seen.push(mode);
        }
    }
    seen.join(", ")
}

fn main() {
    let signal = bridge_protocol::tone::voice_like(RATE as u32, SECONDS);
    println!(
        "Opus voice encoder, mono 8 kHz, 20 ms frames, 32 kbit/s: {SECONDS} s of a voice-like signal, median of {PASSES} passes"
    );
    println!(
        "| audio-type | complexity | mode | µs per 20 ms frame | × the bridge's (generic, 0) | log-spectral distance of the decoded voice |"
    );
    println!("|---|---|---|---|---|---|");
    let mut base = None;
    let mut bridge_packets = Vec::new();
    for application in [Application::Audio, Application::Voip, Application::LowDelay] {
        for complexity in [0, 1, 2, 3, 5, 8, 10] {
            let mut passes: Vec<(Vec<Vec<u8>>, f64)> = (0..PASSES)
                .map(|_| encode(application, complexity, &signal))
                .collect();
            passes.sort_by(|a, b| a.1.total_cmp(&b.1));
            let (packets, per_frame) = &passes[PASSES / 2];
            let base = *base.get_or_insert(*per_frame);
            println!(
                "| {} | {complexity} | {} | {:.1} | {:.2} | {:.2} dB |",
                audio_type(application),
                modes(packets),
                per_frame * 1e6,
                per_frame / base,
                spectral_distance(&signal, packets)
            );
            if bridge_packets.is_empty() {
                bridge_packets = packets.clone();
            }
        }
    }
    // The other half of a transcoded call's Opus work: the app's voice is
    // SILK, as browsers send; decoding the bridge's own packets shows CELT's.
    let voice_packets = encode(Application::Voip, 1, &signal).0;
    for (what, packets) in [
        ("SILK (voice, 1)", &voice_packets),
        ("CELT (generic, 0)", &bridge_packets),
    ] {
        let mut decoding: Vec<f64> = (0..PASSES).map(|_| decode(packets).1).collect();
        decoding.sort_by(f64::total_cmp);
        println!(
            "Decoding the {what} packets at 8 kHz: {:.1} µs per 20 ms frame",
            decoding[PASSES / 2] * 1e6
        );
    }
}
