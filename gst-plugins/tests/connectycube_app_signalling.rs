//! connectycubesink/src driven by an application that carries the SDP itself
//! (action signals, as bridge-app does): two calls in this process, wired
//! only through `create-offer`, `local-description` and
//! `set-remote-description`, hear each other's tone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gst::prelude::*;

fn call(name: &str, tone: u32) -> (gst::Pipeline, gst::Element, Arc<Mutex<Vec<f32>>>) {
    let pipeline = gst::parse::launch(&format!(
        "audiotestsrc is-live=true freq={tone} volume=0.5 ! audio/x-raw,rate=48000,channels=1 ! opusenc ! rtpopuspay \
           ! connectycubesink name=out session={name} \
         connectycubesrc session={name} ! rtpopusdepay ! opusdec ! audioconvert \
           ! audio/x-raw,format=F32LE,channels=1,rate=48000 ! appsink name=ear sync=false"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let sink_heard = heard.clone();
    pipeline
        .by_name("ear")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap()
        .set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let map = sample
                        .buffer()
                        .unwrap()
                        .map_readable()
                        .map_err(|_| gst::FlowError::Error)?;
                    sink_heard.lock().unwrap().extend(
                        map.chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    );
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
    let out = pipeline.by_name("out").unwrap();
    (pipeline, out, heard)
}

/// The application's signalling: whatever one side describes, the other is told.
fn relay(from: &gst::Element, to: &gst::Element) {
    let to = to.clone();
    from.connect("local-description", false, move |args| {
        let kind = args[1].get::<String>().unwrap();
        let sdp = args[2].get::<String>().unwrap();
        assert!(sdp.contains("a=candidate"), "every candidate is in the SDP");
        to.emit_by_name::<()>("set-remote-description", &[&kind, &sdp]);
        None
    });
}

fn dominant(heard: &Mutex<Vec<f32>>) -> Option<f64> {
    let heard = heard.lock().unwrap();
    let tail = &heard[heard.len().saturating_sub(24000)..];
    bridge_protocol::tone::dominant_frequency(tail, 48000)
}

#[test]
fn two_calls_wired_by_the_application_hear_each_other() {
    gst::init().unwrap();
    gstsipcc::register().unwrap();
    let (pipeline_a, out_a, heard_a) = call("app-a", 440);
    let (pipeline_b, out_b, heard_b) = call("app-b", 660);
    relay(&out_a, &out_b);
    relay(&out_b, &out_a);
    pipeline_a.set_state(gst::State::Playing).unwrap();
    pipeline_b.set_state(gst::State::Playing).unwrap();
    out_a.emit_by_name::<()>("create-offer", &[]);

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let heard = loop {
        std::thread::sleep(Duration::from_millis(500));
        let heard = (dominant(&heard_a), dominant(&heard_b));
        let near = |f: Option<f64>, hz: f64| f.is_some_and(|f| (f - hz).abs() < 5.0);
        if (near(heard.0, 660.0) && near(heard.1, 440.0)) || std::time::Instant::now() > deadline {
            break heard;
        }
    };
    assert!(
        heard.0.is_some_and(|f| (f - 660.0).abs() < 5.0),
        "a heard {:?}",
        heard.0
    );
    assert!(
        heard.1.is_some_and(|f| (f - 440.0).abs() < 5.0),
        "b heard {:?}",
        heard.1
    );

    let stats = out_a.property::<gst::Structure>("stats");
    assert_eq!(
        stats.get::<String>("connection-state").unwrap(),
        "connected",
        "{stats}"
    );

    // The application ends the call: the pipeline hears why.
    out_a.emit_by_name::<()>("end-call", &[&"done"]);
    let ended = pipeline_a
        .bus()
        .unwrap()
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(5),
            &[gst::MessageType::Element],
        )
        .and_then(|m| {
            m.structure()
                .map(|s| s.get::<String>("reason").unwrap_or_default())
        });
    assert_eq!(ended.as_deref(), Some("done"));
    // On a thread: the source's EOS for the ended call races this stop,
    // and a teardown that deadlocked would hang the whole test run.
    let (stopped, stop) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let a = pipeline_a.set_state(gst::State::Null);
        let b = pipeline_b.set_state(gst::State::Null);
        let _ = stopped.send(a.and(b));
    });
    let stop = stop
        .recv_timeout(Duration::from_secs(10))
        .expect("stopping the pipelines hung");
    stop.unwrap();
}

/// A source that joins a call the application has already ended (a
/// pipeline started late, say) ends at once: its stream ends and the
/// pipeline hears why, instead of waiting for media that will never come.
#[test]
fn a_source_joining_an_ended_call_ends_at_once() {
    gst::init().unwrap();
    gstsipcc::register().unwrap();
    let sender = gst::parse::launch(
        "audiotestsrc is-live=true ! opusenc ! rtpopuspay ! connectycubesink name=out session=ended-early",
    )
    .unwrap();
    sender.set_state(gst::State::Playing).unwrap();
    let out = sender
        .downcast_ref::<gst::Bin>()
        .unwrap()
        .by_name("out")
        .unwrap();
    out.emit_by_name::<()>("end-call", &[&"hung up before the source started"]);

    let late = gst::parse::launch("connectycubesrc session=ended-early ! fakesink").unwrap();
    // On a thread: a start that waits on the end it announces never returns.
    let (started, start) = std::sync::mpsc::channel();
    let starting = late.clone();
    std::thread::spawn(move || {
        let _ = started.send(starting.set_state(gst::State::Playing));
    });
    let start = start
        .recv_timeout(Duration::from_secs(10))
        .expect("the late source's start hung");
    start.unwrap();
    let bus = late.bus().unwrap();
    let mut reason = None;
    let mut ended_stream = false;
    while let Some(message) = bus.timed_pop_filtered(
        gst::ClockTime::from_seconds(5),
        &[gst::MessageType::Element, gst::MessageType::Eos],
    ) {
        match message.view() {
            gst::MessageView::Eos(_) => ended_stream = true,
            _ => {
                reason = message
                    .structure()
                    .filter(|s| s.name() == "connectycube-call-ended")
                    .and_then(|s| s.get::<String>("reason").ok())
                    .or(reason)
            }
        }
        if ended_stream && reason.is_some() {
            break;
        }
    }
    late.set_state(gst::State::Null).unwrap();
    sender.set_state(gst::State::Null).unwrap();
    assert_eq!(reason.as_deref(), Some("hung up before the source started"));
    assert!(ended_stream, "the late source's stream never ended");
}
