//! The plugin's media threads: one event loop (a current-thread tokio
//! runtime) per core, each on a thread of its own. Every task of one
//! call's pipeline runs on one loop, and a new call goes to the first loop
//! that is not busy: calls are packed onto as few threads as their load
//! needs. A loop counts as busy by its measured load or by its number of
//! calls, whichever says more: a call rings for seconds before its media
//! starts, and a burst of new calls must not all land on one loop whose
//! load has not shown yet (a call stays on its loop for its whole life).
//!
//! Why: a wake-up of a thread costs more than a packet's own work on a
//! virtual machine (on the order of 100 µs here), and one thread woken for
//! the packets of many calls is woken far less often than several threads
//! sharing them. With tokio's work-stealing pool every burst of packets
//! woke both threads.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gst::prelude::*;
use tokio::runtime::Handle;

/// Where a pipeline keeps the index of its loop.
const LOOP_KEY: &str = "sipcc-media-loop";
/// A loop busier than this (percent of its thread's time) takes no new call
/// while another is less busy: room for its calls' peaks and for the calls
/// placed before its load shows.
const BUSY_PERCENT: u32 = 50;
/// What a call is counted to cost its loop whatever its measured load
/// (percent of a thread): about a transcoded call's cost on a small virtual
/// machine, so a loop takes at most `BUSY_PERCENT` calls before the next
/// loop is used.
const CALL_PERCENT: u32 = 1;
/// How often each loop measures its own load.
const LOAD_INTERVAL: Duration = Duration::from_millis(500);

struct MediaLoop {
    handle: Handle,
    /// The share of the last `LOAD_INTERVAL` its thread spent working, in percent.
    load: Arc<AtomicU32>,
    /// The pipelines placed on it that still exist.
    calls: Arc<AtomicU32>,
}

/// A pipeline's place, kept on the pipeline: dropped with it, it frees the place.
struct Placement {
    index: usize,
    calls: Arc<AtomicU32>,
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.calls.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) struct MediaPool {
    loops: Vec<MediaLoop>,
    /// Serializes choosing a pipeline's loop: its elements may ask at once.
    placing: Mutex<()>,
}

impl MediaPool {
    pub(crate) fn start() -> MediaPool {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let loops = (0..cores)
            .map(|_| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cannot start the plugin's media threads");
                let load = Arc::new(AtomicU32::new(0));
                runtime.spawn(measure_load(load.clone()));
                let handle = runtime.handle().clone();
                std::thread::Builder::new()
                    .name("sipcc-media".into())
                    .spawn(move || runtime.block_on(std::future::pending::<()>()))
                    .expect("cannot start the plugin's media threads");
                MediaLoop {
                    handle,
                    load,
                    calls: Arc::new(AtomicU32::new(0)),
                }
            })
            .collect();
        MediaPool {
            loops,
            placing: Mutex::new(()),
        }
    }

    /// The loop of the pipeline `element` is in: the first of its elements
    /// to ask places the pipeline, the others get the same loop.
    pub(crate) fn for_element(&self, element: &gst::Element) -> &Handle {
        let mut top: gst::Object = element.clone().upcast();
        while let Some(parent) = top.parent() {
            top = parent;
        }
        let _placing = self.placing.lock().unwrap();
        // SAFETY: LOOP_KEY is set and read here only, always as a Placement.
        let placed = unsafe { top.data::<Placement>(LOOP_KEY).map(|p| p.as_ref().index) };
        let index = placed.unwrap_or_else(|| {
            let index = self.least_busy();
            let calls = self.loops[index].calls.clone();
            calls.fetch_add(1, Ordering::Relaxed);
            // SAFETY: as above.
            unsafe { top.set_data(LOOP_KEY, Placement { index, calls }) };
            index
        });
        &self.loops[index].handle
    }

    fn least_busy(&self) -> usize {
        let loads: Vec<u32> = self
            .loops
            .iter()
            .map(|l| {
                let calls = l.calls.load(Ordering::Relaxed);
                l.load.load(Ordering::Relaxed).max(calls * CALL_PERCENT)
            })
            .collect();
        first_not_busy(&loads)
    }

    /// A loop for work of no pipeline (the tests').
    #[cfg(test)]
    pub(crate) fn any(&self) -> &Handle {
        &self.loops[self.least_busy()].handle
    }
}

/// The first loop that is not busy, else the least busy, by their loads
/// (each the more of its measured load and its calls' counted cost).
fn first_not_busy(loads: &[u32]) -> usize {
    loads
        .iter()
        .position(|&load| load < BUSY_PERCENT)
        .unwrap_or_else(|| (0..loads.len()).min_by_key(|&i| loads[i]).unwrap_or(0))
}

/// Runs on a loop: how much of its thread's time went to work, from the
/// thread's CPU time in `/proc/thread-self/stat`.
async fn measure_load(load: Arc<AtomicU32>) {
    let mut ticker = tokio::time::interval(LOAD_INTERVAL);
    let mut last = thread_cpu_ticks();
    loop {
        ticker.tick().await;
        let now = thread_cpu_ticks();
        if let (Some(now), Some(last)) = (now, last) {
            // Clock ticks are hundredths of a second on Linux.
            let used_ms = now.saturating_sub(last) * 10;
            let percent = used_ms * 100 / LOAD_INTERVAL.as_millis() as u64;
            load.store(percent.min(100) as u32, Ordering::Relaxed);
        }
        last = now;
    }
}

/// User and system clock ticks of the calling thread.
fn thread_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // The command name (field 2) may hold spaces: count from after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_elements_of_one_pipeline_share_a_loop() {
        gst::init().unwrap();
        let make = || gst::ElementFactory::make("fakesink").build().unwrap();
        let (first, nested) = (make(), make());
        let bin = gst::Bin::new();
        bin.add(&nested).unwrap();
        let pipeline = gst::Pipeline::new();
        pipeline.add_many([&first, bin.upcast_ref()]).unwrap();
        let pool = MediaPool::start();
        assert!(std::ptr::eq(
            pool.for_element(&first),
            pool.for_element(&nested)
        ));
    }

    #[test]
    fn a_burst_of_new_calls_fills_a_loop_by_number_and_a_call_gone_frees_its_place() {
        gst::init().unwrap();
        let pool = MediaPool::start();
        if pool.loops.len() < 2 {
            return; // one core: every call shares the one loop
        }
        let quota = (BUSY_PERCENT / CALL_PERCENT) as usize;
        let pipelines: Vec<gst::Pipeline> = (0..=quota).map(|_| gst::Pipeline::new()).collect();
        let first = pool.for_element(pipelines[0].upcast_ref());
        for pipeline in &pipelines[1..quota] {
            assert!(std::ptr::eq(pool.for_element(pipeline.upcast_ref()), first));
        }
        let beyond = pool.for_element(pipelines[quota].upcast_ref());
        assert!(
            !std::ptr::eq(beyond, first),
            "the call after a loop's quota goes to the next loop, before any load shows"
        );
        assert_eq!(pool.loops[0].calls.load(Ordering::Relaxed), quota as u32);
        drop(pipelines);
        let placed: u32 = pool
            .loops
            .iter()
            .map(|l| l.calls.load(Ordering::Relaxed))
            .sum();
        assert_eq!(placed, 0, "the pipelines gone, their places are free");
    }

    #[test]
    fn a_busy_loop_takes_no_new_call_while_another_is_not() {
        assert_eq!(
            first_not_busy(&[0, 0]),
            0,
            "the first loop while all are idle"
        );
        assert_eq!(first_not_busy(&[BUSY_PERCENT + 10, 20]), 1);
        assert_eq!(first_not_busy(&[BUSY_PERCENT, BUSY_PERCENT - 1]), 1);
        assert_eq!(first_not_busy(&[90, 70, 95]), 1, "all busy: the least busy");
    }

    #[test]
    fn a_thread_reads_its_own_cpu_time() {
        let before = thread_cpu_ticks().expect("/proc/thread-self/stat");
        // Work until the thread's CPU time moves (however busy the machine).
        let limit = std::time::Instant::now() + Duration::from_secs(10);
        while thread_cpu_ticks() == Some(before) {
            assert!(std::time::Instant::now() < limit, "no CPU time counted");
            std::hint::black_box((0..10_000).sum::<u64>());
        }
        assert!(thread_cpu_ticks().unwrap() > before);
    }
}
