//! The G.729 elements on libbcg729: a tone survives encode → RTP → decode,
//! and Annex B stops sending voice frames during silence.

mod codecs;

use codecs::{init, samples};
use gst::prelude::*;

/// What the pipeline's appsink "out" received.
fn run(description: &str) -> Vec<gst::Buffer> {
    codecs::run(description).0
}

#[test]
fn a_tone_keeps_its_frequency_through_encode_and_decode() {
    for frequency in [440.0, 1000.0] {
        let out = run(&format!(
            "audiotestsrc num-buffers=100 samplesperbuffer=160 freq={frequency} volume=0.5 \
             ! audio/x-raw,format=S16LE,rate=8000,channels=1 ! g729enc ! rtpg729pay ! rtpg729depay \
             ! g729dec ! appsink name=out sync=false"
        ));
        let decoded = samples(&out);
        assert!(decoded.len() >= 15000, "{} samples of 16000", decoded.len());
        let found = bridge_protocol::tone::dominant_frequency(&decoded[1600..], 8000).unwrap();
        assert!(
            (found - frequency).abs() < 5.0,
            "sent {frequency} Hz, decoded {found} Hz"
        );
        assert!(
            bridge_protocol::tone::rms(&decoded[1600..]) > 0.1,
            "the tone keeps its level"
        );
    }
}

#[test]
fn encoder_makes_ten_byte_frames_every_ten_ms() {
    let out = run(
        "audiotestsrc num-buffers=10 samplesperbuffer=160 ! audio/x-raw,format=S16LE,rate=8000,channels=1 \
         ! g729enc ! appsink name=out sync=false",
    );
    assert_eq!(out.len(), 20);
    assert!(out.iter().all(|b| b.size() == 10));
    assert_eq!(
        out[1].pts().unwrap() - out[0].pts().unwrap(),
        gst::ClockTime::from_mseconds(10)
    );
}

#[test]
fn annex_b_sends_no_voice_frames_in_silence() {
    let out = run(
        "audiotestsrc num-buffers=100 samplesperbuffer=160 wave=silence ! audio/x-raw,format=S16LE,rate=8000,channels=1 \
         ! g729enc annex-b=true ! appsink name=out sync=false",
    );
    let voice = out.iter().filter(|b| b.size() == 10).count();
    // A couple of frames while the VAD settles, then SID frames or nothing.
    assert!(voice <= 5, "{voice} voice frames in 2 s of silence");
    assert!(
        out.len() < 100,
        "{} frames sent for 200 silent ones",
        out.len()
    );
    let without = run(
        "audiotestsrc num-buffers=100 samplesperbuffer=160 wave=silence ! audio/x-raw,format=S16LE,rate=8000,channels=1 \
         ! g729enc ! appsink name=out sync=false",
    );
    assert_eq!(without.len(), 200, "without Annex B every frame is sent");
}

#[test]
fn decoder_takes_voice_and_sid_frames_and_drops_stray_bytes() {
    init();
    let mut harness = gst_check::Harness::new("g729dec");
    harness.set_src_caps_str("audio/G729,rate=8000,channels=1");
    let decoded_samples = |harness: &mut gst_check::Harness, bytes: &[u8]| {
        harness
            .push(gst::Buffer::from_slice(bytes.to_vec()))
            .unwrap();
        harness.pull().unwrap().size() / 2
    };
    // Two voice frames and a SID frame, as rtpg729depay hands over one packet.
    assert_eq!(decoded_samples(&mut harness, &[0x5a; 22]), 240);
    // One voice frame and 3 bytes that are no frame: the frame still decodes.
    assert_eq!(decoded_samples(&mut harness, &[0x33; 13]), 80);
}

#[test]
fn decoder_conceals_a_gap() {
    init();
    let mut harness = gst_check::Harness::new("g729dec");
    harness.set_src_caps_str("audio/G729,rate=8000,channels=1");
    harness.element().unwrap().set_property("plc", true);
    harness
        .push(gst::Buffer::from_slice(vec![0x5a; 20]))
        .unwrap();
    assert_eq!(harness.pull().unwrap().size() / 2, 160);
    // 30 ms lost, as a jitter buffer reports it: three frames concealed.
    harness.push_event(
        gst::event::Gap::builder(gst::ClockTime::from_mseconds(20))
            .duration(gst::ClockTime::from_mseconds(30))
            .build(),
    );
    assert_eq!(harness.pull().unwrap().size() / 2, 240);
}
