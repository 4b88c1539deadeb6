//! The Opus elements on the built-in libopus: a tone survives encode →
//! RTP → decode at the phone rates, the decoder follows the rate downstream
//! takes, settings change while playing, and bad input costs only itself.

mod codecs;

use bridge_protocol::opus_fmtp::{packet_bandwidth, packet_mode};
use bridge_protocol::tone::{dominant_frequency, rms};
use codecs::{init, run, samples};
use gst::prelude::*;

fn rate_of(caps: &gst::Caps) -> i32 {
    caps.structure(0).unwrap().get::<i32>("rate").unwrap()
}

#[test]
fn a_tone_keeps_its_frequency_at_the_phone_rates() {
    for (rate, frequency) in [(8000, 440.0), (8000, 1000.0), (16000, 1000.0)] {
        let (out, caps) = run(&format!(
            "audiotestsrc num-buffers=50 samplesperbuffer={} freq={frequency} volume=0.5 \
             ! audio/x-raw,format=S16LE,rate={rate},channels=1 ! opusvoiceenc ! rtpopuspay \
             ! rtpopusdepay ! opusvoicedec ! audio/x-raw,rate={rate},channels=1 ! appsink name=out sync=false",
            rate / 50
        ));
        assert_eq!(rate_of(&caps), rate, "decoded at the phone's rate");
        let decoded = samples(&out);
        assert_eq!(
            decoded.len(),
            rate as usize,
            "one second in, one second out"
        );
        let settled = &decoded[rate as usize / 5..];
        let found = dominant_frequency(settled, rate as u32).unwrap();
        assert!(
            (found - frequency).abs() < 5.0,
            "sent {frequency} Hz at {rate} Hz, decoded {found} Hz"
        );
        assert!(rms(settled) > 0.1, "the tone keeps its level");
    }
}

#[test]
fn the_decoder_decodes_to_the_rate_downstream_takes() {
    let (out, caps) = run(
        "audiotestsrc num-buffers=50 samplesperbuffer=960 freq=600 volume=0.5 \
         ! audio/x-raw,format=S16LE,rate=48000,channels=1 ! opusvoiceenc ! opusvoicedec \
         ! audio/x-raw,rate=12000 ! appsink name=out sync=false",
    );
    assert_eq!(rate_of(&caps), 12000);
    let decoded = samples(&out);
    assert_eq!(decoded.len(), 12000);
    let found = dominant_frequency(&decoded[2400..], 12000).unwrap();
    assert!((found - 600.0).abs() < 5.0, "decoded {found} Hz");
}

#[test]
fn packets_follow_the_frame_size_and_the_last_one_is_completed() {
    for (frame_ms, packets) in [(20u64, 50usize), (60, 17)] {
        // One second in buffers of 30 ms: 60 ms frames leave 40 ms at EOS.
        let (out, caps) = run(&format!(
            "audiotestsrc num-buffers=33 samplesperbuffer=240 ! audio/x-raw,format=S16LE,rate=8000,channels=1 \
             ! opusvoiceenc frame-size={frame_ms} ! appsink name=out sync=false"
        ));
        let s = caps.structure(0).unwrap();
        assert_eq!(s.name(), "audio/x-opus");
        assert_eq!(s.get::<i32>("channel-mapping-family").unwrap(), 0);
        assert_eq!(out.len(), packets, "{frame_ms} ms frames");
        // The first packet is shortened by Opus's lookahead, as opusenc's.
        assert_eq!(
            out[2].pts().unwrap() - out[1].pts().unwrap(),
            gst::ClockTime::from_mseconds(frame_ms)
        );
    }
}

/// Noise (every band busy) in 20 ms buffers at 48 kHz.
fn noise(buffers: usize) -> Vec<gst::Buffer> {
    let mut seed = 0x1234_5678u32;
    (0..buffers)
        .map(|_| {
            let bytes: Vec<u8> = (0..960)
                .flat_map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((seed >> 16) as i16 / 4).to_le_bytes()
                })
                .collect();
            gst::Buffer::from_slice(bytes)
        })
        .collect()
}

#[test]
fn bitrate_and_bandwidth_change_while_playing() {
    init();
    let mut harness = gst_check::Harness::new("opusvoiceenc");
    harness.set_src_caps_str("audio/x-raw,format=S16LE,layout=interleaved,rate=48000,channels=1");
    let encoder = harness.element().unwrap();
    encoder.set_property("bitrate", 64_000u32);
    let encode = |harness: &mut gst_check::Harness, count: usize| -> Vec<gst::Buffer> {
        noise(count)
            .into_iter()
            .map(|buffer| {
                harness.push(buffer).unwrap();
                harness.pull().unwrap()
            })
            .collect()
    };
    let average =
        |packets: &[gst::Buffer]| packets.iter().map(|p| p.size()).sum::<usize>() / packets.len();
    let wide = encode(&mut harness, 25);
    let full_rate = average(&wide[5..]);
    assert!(
        wide[5..]
            .iter()
            .all(|p| packet_bandwidth(&p.map_readable().unwrap()) == Some("fullband")),
        "48 kHz noise is sent full band"
    );
    // What congestion control and a peer's maxplaybackrate do mid-call.
    encoder.set_property("bitrate", 12_000u32);
    encoder.set_property_from_str("max-bandwidth", "narrowband");
    // SILK narrows its band a step at a time, each over seconds
    // (TRANSITION_TIME_MS): wide, medium, then narrow.
    let narrow = encode(&mut harness, 600);
    let low_rate = average(&narrow[5..]);
    assert!(
        low_rate * 3 < full_rate,
        "{low_rate} bytes per packet at 12 kbit/s, {full_rate} at 64"
    );
    assert!(
        narrow[580..]
            .iter()
            .all(|p| packet_bandwidth(&p.map_readable().unwrap()) == Some("narrowband")),
        "no wider than the peer plays"
    );
}

#[test]
fn the_decoder_drops_a_bad_packet_and_conceals_a_gap() {
    init();
    let mut harness = gst_check::Harness::new("opusvoicedec");
    harness.set_src_caps_str("audio/x-opus,channel-mapping-family=0");
    harness.set_sink_caps_str("audio/x-raw,format=S16LE,layout=interleaved,rate=8000,channels=1");
    let decoder = harness.element().unwrap();
    decoder.set_property("plc", true);
    let packet = |bytes: &[u8], ms: u64| {
        let mut buffer = gst::Buffer::from_slice(bytes.to_vec());
        let b = buffer.get_mut().unwrap();
        b.set_pts(gst::ClockTime::from_mseconds(ms));
        b.set_duration(gst::ClockTime::from_mseconds(20));
        buffer
    };
    // A CELT 20 ms frame (TOC config 31, one frame): any payload decodes.
    harness.push(packet(&[0xf8, 0x12, 0x34, 0x56], 0)).unwrap();
    assert_eq!(harness.pull().unwrap().size(), 160 * 2);
    // Code 3 with no frames: invalid (RFC 6716 §3.2.5). Dropped, no error.
    harness.push(packet(&[0xfb, 0x00], 20)).unwrap();
    harness.push(packet(&[0xf8, 0x9a, 0xbc], 40)).unwrap();
    assert_eq!(harness.pull().unwrap().size(), 160 * 2);
    assert_eq!(
        harness.buffers_in_queue(),
        0,
        "the bad packet made no audio"
    );
    // 40 ms lost: held for the packet after it (whose redundancy may
    // bring some back).
    harness.push_event(
        gst::event::Gap::builder(gst::ClockTime::from_mseconds(60))
            .duration(gst::ClockTime::from_mseconds(40))
            .build(),
    );
    assert_eq!(harness.buffers_in_queue(), 0);
    // Another gap, a hair under 20 ms (reckoned from RTP timestamps): the
    // first is concealed, as long as it was.
    harness.push_event(
        gst::event::Gap::builder(gst::ClockTime::from_mseconds(100))
            .duration(gst::ClockTime::from_useconds(19_980))
            .build(),
    );
    assert_eq!(harness.pull().unwrap().size(), 320 * 2);
    // The next packet brings the second gap's 20 ms with its own 20 ms.
    harness.push(packet(&[0xf8, 0x9a, 0xbc], 120)).unwrap();
    let both = harness.pull().unwrap();
    assert_eq!(both.size(), 320 * 2);
    assert_eq!(both.pts(), Some(gst::ClockTime::from_mseconds(100)));
    // A gap at the end of the stream is concealed when it ends.
    harness.push_event(
        gst::event::Gap::builder(gst::ClockTime::from_mseconds(140))
            .duration(gst::ClockTime::from_mseconds(20))
            .build(),
    );
    harness.push_event(gst::event::Eos::new());
    assert_eq!(harness.pull().unwrap().size(), 160 * 2);
}

/// 20 ms at 8 kHz.
const FRAME: usize = 160;

/// 8 kHz mono Opus decoded by libopus alone: every packet, or with `lost`
/// lost, concealed or (`fec`) rebuilt from the next packet's redundancy.
fn decode_plain(packets: &[Vec<u8>], lost: Option<usize>, fec: bool) -> Vec<i16> {
    use opusic_c::{Channels, Decoder, SampleRate};
    let mut decoder = Decoder::new(Channels::Mono, SampleRate::Hz8000).unwrap();
    let mut pcm = vec![0u16; FRAME * 6];
    let mut out = Vec::new();
    for (index, packet) in packets.iter().enumerate() {
        let n = if Some(index) == lost {
            let input: &[u8] = match packets.get(index + 1) {
                Some(next) if fec => next,
                _ => &[],
            };
            decoder
                .decode_to_slice(input, &mut pcm[..FRAME], fec)
                .unwrap()
        } else {
            decoder.decode_to_slice(packet, &mut pcm, false).unwrap()
        };
        out.extend(pcm[..n].iter().map(|s| *s as i16));
    }
    out
}

/// The packet in the middle of the loudest syllable (past the first ten).
fn loudest(decoded: &[i16]) -> usize {
    (10..decoded.len() / FRAME - 1)
        .max_by_key(|i| {
            decoded[i * FRAME..(i + 1) * FRAME]
                .iter()
                .map(|s| i64::from(*s).pow(2))
                .sum::<i64>()
        })
        .unwrap()
}

/// The encoder adds in-band FEC when told of loss (`connectycubesink`
/// tells it what the peer's receiver reports), and none without.
#[test]
fn the_encoder_adds_fec_for_the_loss_it_is_told_of() {
    init();
    let voice = bridge_protocol::tone::voice_like(8000, 2);
    for loss in [0u32, 1, 20] {
        let packets = encode_voice(&voice, |encoder| {
            encoder.set_property("packet-loss-percentage", loss)
        });
        let reference = decode_plain(&packets, None, false);
        let lost = loudest(&reference);
        let range = lost * FRAME..(lost + 1) * FRAME;
        let concealed = error_energy(
            &decode_plain(&packets, Some(lost), false),
            &reference,
            range.clone(),
        );
        let rebuilt = error_energy(&decode_plain(&packets, Some(lost), true), &reference, range);
        if loss == 0 {
            assert_eq!(rebuilt, concealed, "no redundancy without loss");
        } else {
            assert!(
                rebuilt * 4.0 < concealed,
                "with {loss} % loss: error {rebuilt:.0} rebuilt, {concealed:.0} concealed"
            );
        }
    }
}

/// `voice` (8 kHz) through an `opusvoiceenc` set up by `configure`: its packets.
fn encode_voice(voice: &[i16], configure: impl Fn(&gst::Element)) -> Vec<Vec<u8>> {
    encode_voice_changing(voice, configure, |_| {})
}

/// As `encode_voice`, with `change` made to the running encoder halfway.
fn encode_voice_changing(
    voice: &[i16],
    configure: impl Fn(&gst::Element),
    change: impl Fn(&gst::Element),
) -> Vec<Vec<u8>> {
    let mut harness = gst_check::Harness::new("opusvoiceenc");
    harness.set_src_caps_str("audio/x-raw,format=S16LE,layout=interleaved,rate=8000,channels=1");
    let encoder = harness.element().unwrap();
    configure(&encoder);
    let frames = voice.len() / FRAME;
    for (index, frame) in voice.chunks_exact(FRAME).enumerate() {
        if index == frames / 2 {
            change(&encoder);
        }
        let bytes: Vec<u8> = frame.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut buffer = gst::Buffer::from_slice(bytes);
        let b = buffer.get_mut().unwrap();
        b.set_pts(gst::ClockTime::from_mseconds(20 * index as u64));
        b.set_duration(gst::ClockTime::from_mseconds(20));
        harness.push(buffer).unwrap();
    }
    let mut packets = Vec::new();
    while let Some(buffer) = harness.try_pull() {
        packets.push(buffer.map_readable().unwrap().to_vec());
    }
    packets
}

/// The bridge's setting (`generic`) codes a phone's voice in CELT, the
/// cheaper mode here, and moves to SILK, the mode with in-band FEC, once
/// the receiver reports loss; `voice` keeps SILK.
#[test]
fn generic_codes_voice_in_celt_and_moves_to_silk_under_loss() {
    init();
    let voice = bridge_protocol::tone::voice_like(8000, 2);
    let silk_share = |audio_type: &str, loss: u32| {
        let packets = encode_voice(&voice, |encoder| {
            encoder.set_property_from_str("audio-type", audio_type);
            encoder.set_property("complexity", 0u32);
            encoder.set_property("packet-loss-percentage", loss);
        });
        assert_eq!(packets.len(), voice.len() / FRAME, "a packet per 20 ms");
        packets
            .iter()
            .filter(|p| packet_mode(p) == Some("SILK"))
            .count()
            * 100
            / packets.len()
    };
    assert_eq!(silk_share("generic", 0), 0, "generic, no loss: CELT");
    assert_eq!(silk_share("generic", 1), 100, "generic, 1 % loss: SILK");
    assert_eq!(silk_share("generic", 20), 100, "generic, 20 % loss: SILK");
    assert_eq!(silk_share("voice", 0), 100, "voice: SILK");
    assert_eq!(silk_share("restricted-lowdelay", 20), 0, "CELT only");
}

/// The mode follows the receiver's reports while the call runs: SILK
/// (with FEC) from the first report of loss, CELT again once there is none.
#[test]
fn generic_follows_the_reported_loss_both_ways() {
    init();
    let voice = bridge_protocol::tone::voice_like(8000, 2);
    // The modes of the packets with `from` % loss reported, then `to`:
    // `before`, then `after`, once libopus has smoothed each change over a
    // frame or two.
    let follows = |from: u32, to: u32, before: &str, after: &str| {
        let packets = encode_voice_changing(
            &voice,
            |encoder| {
                encoder.set_property("complexity", 0u32);
                encoder.set_property("packet-loss-percentage", from);
            },
            |encoder| encoder.set_property("packet-loss-percentage", to),
        );
        let modes: Vec<_> = packets.iter().map(|p| packet_mode(p)).collect();
        let (first, second) = modes.split_at(modes.len() / 2);
        for (half, mode) in [(first, before), (second, after)] {
            assert!(
                half[2..].iter().all(|m| *m == Some(mode)),
                "{from} % then {to} % loss: {modes:?}"
            );
        }
    };
    follows(2, 0, "SILK", "CELT");
    follows(0, 2, "CELT", "SILK");
}

/// The energy of `decoded` less `reference` over `range`.
fn error_energy(decoded: &[i16], reference: &[i16], range: std::ops::Range<usize>) -> f64 {
    range
        .map(|i| (f64::from(decoded[i]) - f64::from(reference[i])).powi(2))
        .sum()
}

/// A packet lost on the way comes back from the next one's redundancy
/// (Opus's in-band FEC, which browsers add once their receiver reports
/// loss): far closer to what was lost than concealment alone.
#[test]
fn a_lost_packet_comes_back_from_the_next_ones_fec() {
    use opusic_c::{Application, Bitrate, Channels, Encoder, InbandFec, SampleRate};
    init();
    let voice = bridge_protocol::tone::voice_like(8000, 2);
    let mut encoder = Encoder::new(Channels::Mono, SampleRate::Hz8000, Application::Voip).unwrap();
    encoder.set_inband_fec(InbandFec::Mode1).unwrap();
    encoder.set_packet_loss(20).unwrap();
    encoder.set_bitrate(Bitrate::Value(24_000)).unwrap();
    let packets: Vec<Vec<u8>> = voice
        .chunks_exact(FRAME)
        .map(|frame| {
            let pcm: Vec<u16> = frame.iter().map(|s| *s as u16).collect();
            let mut packet = vec![0u8; 400];
            let length = encoder.encode_to_slice(&pcm, &mut packet).unwrap();
            packet.truncate(length);
            packet
        })
        .collect();
    let reference = decode_plain(&packets, None, false);
    let lost = loudest(&reference);
    let concealed = decode_plain(&packets, Some(lost), false);

    let mut harness = gst_check::Harness::new("opusvoicedec");
    harness.set_src_caps_str("audio/x-opus,channel-mapping-family=0");
    harness.set_sink_caps_str("audio/x-raw,format=S16LE,layout=interleaved,rate=8000,channels=1");
    harness.element().unwrap().set_property("plc", true);
    for (index, packet) in packets.iter().enumerate() {
        let pts = gst::ClockTime::from_mseconds(20 * index as u64);
        let duration = gst::ClockTime::from_mseconds(20);
        if index == lost {
            harness.push_event(gst::event::Gap::builder(pts).duration(duration).build());
            continue;
        }
        let mut buffer = gst::Buffer::from_slice(packet.clone());
        let b = buffer.get_mut().unwrap();
        b.set_pts(pts);
        b.set_duration(duration);
        // As a depayloader marks the packet after a lost one.
        if index == lost + 1 {
            b.set_flags(gst::BufferFlags::DISCONT);
        }
        harness.push(buffer).unwrap();
    }
    let mut recovered = Vec::new();
    while let Some(buffer) = harness.try_pull() {
        let map = buffer.map_readable().unwrap();
        recovered.extend(
            map.chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]])),
        );
    }
    assert_eq!(recovered.len(), reference.len(), "every 20 ms came out");
    let lost_range = lost * FRAME..(lost + 1) * FRAME;
    let with_fec = error_energy(&recovered, &reference, lost_range.clone());
    let without = error_energy(&concealed, &reference, lost_range);
    assert!(
        with_fec * 4.0 < without,
        "the lost 20 ms: error {with_fec:.0} recovered, {without:.0} concealed"
    );
}
