//! What the codec tests share: registering the plugin, running a pipeline
//! to its end, and reading the audio it produced.

use std::sync::{Arc, Mutex, Once};

use gst::prelude::*;

pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gstsipcc::register().unwrap();
    });
}

/// Runs a pipeline to EOS; returns what its appsink "out" received, and
/// the caps it received them with.
pub fn run(description: &str) -> (Vec<gst::Buffer>, gst::Caps) {
    init();
    let pipeline = gst::parse::launch(description)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let sink = pipeline
        .by_name("out")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    let buffers = Arc::new(Mutex::new(Vec::new()));
    let collected = buffers.clone();
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                collected
                    .lock()
                    .unwrap()
                    .push(sample.buffer_owned().unwrap());
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    pipeline.set_state(gst::State::Playing).unwrap();
    let message = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(20),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("the pipeline ends");
    assert!(
        matches!(message.view(), gst::MessageView::Eos(_)),
        "{message:?}"
    );
    let caps = sink.static_pad("sink").unwrap().current_caps().unwrap();
    pipeline.set_state(gst::State::Null).unwrap();
    (std::mem::take(&mut *buffers.lock().unwrap()), caps)
}

pub fn samples(buffers: &[gst::Buffer]) -> Vec<f32> {
    buffers
        .iter()
        .flat_map(|b| {
            let map = b.map_readable().unwrap();
            map.chunks_exact(2)
                .map(|s| f32::from(i16::from_le_bytes([s[0], s[1]])) / 32768.0)
                .collect::<Vec<_>>()
        })
        .collect()
}
