//! `sip-cc-bridge demo`: one call's audio through the plugin on loopback.
//!
//! phone (tone, PCMU) → sipsink ═UDP═ sipsrc → PCMU decode → Opus encode at
//! 8 kHz → sipsink ═UDP═ sipsrc → Opus decode → tone measurement.

use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow};
use gst::prelude::*;

const PCMU_CAPS: &str =
    "application/x-rtp,media=audio,payload=0,clock-rate=8000,encoding-name=PCMU";
const OPUS_CAPS: &str =
    "application/x-rtp,media=audio,payload=111,clock-rate=48000,encoding-name=OPUS";

pub fn run(seconds: u32, tone: u32) -> anyhow::Result<()> {
    gst::init()?;
    gstsipcc::register()?;
    let description = format!(
        "audiotestsrc is-live=true samplesperbuffer=160 freq={tone} volume=0.5 \
           ! audio/x-raw,rate=8000,channels=1 ! mulawenc ! rtppcmupay \
           ! sipsink name=phone local-address=127.0.0.1 \
         sipsrc name=sip-leg local-address=127.0.0.1 stats-interval=0 payload-map=\"{PCMU_CAPS}\" \
           ! rtppcmudepay ! mulawdec ! opusenc frame-size=20 ! rtpopuspay pt=111 \
           ! sipsink name=to-app local-address=127.0.0.1 \
         sipsrc name=app local-address=127.0.0.1 stats-interval=0 payload-map=\"{OPUS_CAPS}\" \
           ! rtpopusdepay ! opusdec ! audioconvert ! audio/x-raw,format=F32LE,channels=1,rate=48000 \
           ! appsink name=ear emit-signals=true sync=false"
    );
    let pipeline = gst::parse::launch(&description)?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow!("not a pipeline"))?;
    let element = |name: &str| {
        pipeline
            .by_name(name)
            .with_context(|| format!("no element {name}"))
    };

    // The ports are picked at start; wire each sender to the receiver it feeds.
    pipeline.set_state(gst::State::Ready)?;
    pipeline.set_state(gst::State::Paused)?;
    for (sender, receiver) in [("phone", "sip-leg"), ("to-app", "app")] {
        let port = element(receiver)?.property::<u32>("local-port");
        let sender = element(sender)?;
        sender.set_property("remote-address", "127.0.0.1");
        sender.set_property("remote-port", port);
    }

    let heard = Arc::new(Mutex::new(Vec::<f32>::new()));
    let ear = element("ear")?
        .downcast::<gst_app::AppSink>()
        .map_err(|_| anyhow!("ear is not an appsink"))?;
    let sink_heard = heard.clone();
    ear.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(map) = sample.buffer().and_then(|b| b.map_readable().ok()) {
                    sink_heard.lock().unwrap().extend(
                        map.chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    );
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );

    println!(
        "A phone sends a {tone} Hz tone as PCMU; the bridge leg transcodes it to Opus; the app side listens."
    );
    println!(
        "{:>4}  {:<38}  {:<38}",
        "sec", "SIP leg (PCMU in)", "app leg (Opus in)"
    );
    pipeline.set_state(gst::State::Playing)?;
    let bus = pipeline.bus().context("pipeline without bus")?;
    for second in 1..=seconds {
        if let Some(message) =
            bus.timed_pop_filtered(gst::ClockTime::from_seconds(1), &[gst::MessageType::Error])
        {
            pipeline.set_state(gst::State::Null)?;
            return Err(anyhow!("pipeline error: {message:?}"));
        }
        println!(
            "{second:>4}  {:<38}  {:<38}",
            summary(&element("sip-leg")?),
            summary(&element("app")?)
        );
    }
    pipeline.set_state(gst::State::Null)?;

    let heard = heard.lock().unwrap();
    let tail = &heard[heard.len().min(48000 / 2)..];
    let heard = bridge_protocol::tone::dominant_frequency(tail, 48000)
        .ok_or_else(|| anyhow!("the app side heard silence"))?;
    println!("The app side heard {heard:.0} Hz (sent {tone} Hz).");
    if (heard - f64::from(tone)).abs() > f64::from(tone) * 0.05 {
        return Err(anyhow!(
            "the tone arrived as {heard:.0} Hz instead of {tone} Hz"
        ));
    }
    Ok(())
}

/// One line of a session's stats: packets, loss, jitter.
fn summary(element: &gst::Element) -> String {
    let stats = element.property::<gst::Structure>("stats");
    let get = |name: &str| stats.get::<u64>(name).unwrap_or(0);
    format!(
        "rx {} pkts, lost {}, jitter {:.2} ms, rtcp {}",
        get("packets-received"),
        stats.get::<i64>("packets-lost").unwrap_or(0),
        stats.get::<f64>("jitter-ms").unwrap_or(0.0),
        get("rtcp-received"),
    )
}
