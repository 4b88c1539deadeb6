//! Bridge-added latency of a call's audio, one meter per direction. Buffers
//! are stamped where they enter the bridge (`sipsrc` at capture,
//! `connectycubesrc` on the shared stack as it arrives, on webrtcbin with its
//! arrival at webrtcbin's jitter buffer), and those stamps ride
//! through depayloading, decoding, encoding and payloading; where a buffer
//! leaves, the pipeline's running time less its stamp is how long the bridge
//! held it. Encoders that wait for a whole frame show up here, which event-based
//! measures (the latency tracer) miss.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use gst::prelude::*;
use serde::Serialize;

/// The most recent delays kept for the percentiles (half a minute at 50
/// packets/s), in hundredths of a millisecond (as fine as reported, up to
/// 655 ms): 3 KB per direction of every call.
const KEPT: usize = 1500;

#[derive(Clone, Default)]
pub struct LatencyMeter(Arc<Mutex<VecDeque<u16>>>);

/// Percentiles of the kept delays, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

impl LatencyMeter {
    /// Measures every buffer reaching `pad` (the sink pad of the element
    /// where media leaves the bridge).
    pub fn watch(&self, pad: &gst::Pad) {
        let meter = self.clone();
        pad.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST,
            move |pad, info| {
                let now = pad
                    .parent_element()
                    .and_then(|element| element.current_running_time());
                let pts = match &info.data {
                    Some(gst::PadProbeData::Buffer(buffer)) => buffer.pts(),
                    Some(gst::PadProbeData::BufferList(list)) => list.get(0).and_then(|b| b.pts()),
                    _ => None,
                };
                if let (Some(now), Some(pts)) = (now, pts) {
                    meter.record(now.saturating_sub(pts).nseconds() as f64 / 1e6);
                }
                gst::PadProbeReturn::Ok
            },
        );
    }

    fn record(&self, milliseconds: f64) {
        let hundredths = (milliseconds * 100.0).round().min(f64::from(u16::MAX)) as u16;
        let mut kept = self.0.lock().unwrap();
        if kept.len() == KEPT {
            kept.pop_front();
        } else if kept.capacity() == 0 {
            // Just what is kept, not the next power of two.
            kept.reserve_exact(KEPT);
        }
        kept.push_back(hundredths);
    }

    /// None before the first buffer.
    pub fn percentiles(&self) -> Option<Percentiles> {
        let mut delays: Vec<u16> = self.0.lock().unwrap().iter().copied().collect();
        if delays.is_empty() {
            return None;
        }
        delays.sort_unstable();
        let at =
            |p: f64| f64::from(delays[((delays.len() - 1) as f64 * p).round() as usize]) / 100.0;
        Some(Percentiles {
            p50: at(0.5),
            p99: at(0.99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_the_kept_delays() {
        let meter = LatencyMeter::default();
        assert_eq!(meter.percentiles(), None);
        for ms in 1..=100u8 {
            meter.record(f64::from(ms));
        }
        assert_eq!(
            meter.percentiles(),
            Some(Percentiles {
                p50: 51.0,
                p99: 99.0
            })
        );
        for _ in 0..KEPT {
            meter.record(2.0);
        }
        assert_eq!(meter.percentiles().unwrap().p99, 2.0, "old delays age out");
    }

    /// The p50 delay of 20 ms live buffers through `middle`.
    fn measured_through(middle: &str) -> f64 {
        gst::init().unwrap();
        let pipeline = gst::parse::launch(&format!(
            "audiotestsrc is-live=true num-buffers=25 samplesperbuffer=160 \
               ! audio/x-raw,rate=8000 ! {middle} ! fakesink name=out sync=false"
        ))
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
        let meter = LatencyMeter::default();
        meter.watch(&pipeline.by_name("out").unwrap().static_pad("sink").unwrap());
        pipeline.set_state(gst::State::Playing).unwrap();
        let bus = pipeline.bus().unwrap();
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Eos]);
        pipeline.set_state(gst::State::Null).unwrap();
        meter.percentiles().expect("buffers were measured").p50
    }

    #[test]
    fn an_element_that_holds_buffers_adds_what_it_holds() {
        // A live source stamps a buffer with the start of its 20 ms, so both
        // include that; holding each buffer 10 ms more shows as about 10 ms.
        let direct = measured_through("identity");
        let held = measured_through("identity sleep-time=10000");
        assert!(
            (8.0..15.0).contains(&(held - direct)),
            "{direct} ms directly, {held} ms when held 10 ms"
        );
    }
}
