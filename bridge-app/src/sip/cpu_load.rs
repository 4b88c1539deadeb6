//! The bridge's own CPU load, as admission sees it: while the process uses
//! more than `sip.max_cpu_percent` of the cores it may run on, or will once
//! the calls still ringing carry media, new calls are refused, so that the
//! calls in progress keep every packet instead of all of them losing some.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// `sip.max_cpu_percent` unless configured: short of saturation, where
/// every call's packets would start to wait and be lost.
pub const DEFAULT_MAX_CPU_PERCENT: f64 = 90.0;

/// How often the process's CPU time is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How many periods the load is averaged over: long enough that one busy
/// moment (a burst of call setups) refuses nobody, short enough that an
/// overload is seen within a few calls' setups.
const WINDOW: usize = 3;

/// The load over the last few seconds, updated by [`CpuLoad::sample`].
pub struct CpuLoad {
    /// Hundredths of a percent of the usable cores.
    hundredths: AtomicU32,
    /// The cores the process may run on (affinity and cgroup quota).
    cores: usize,
    /// What one call carrying media last cost on average, in ten
    /// thousandths of a percent of the usable cores.
    per_call: AtomicU32,
}

/// The load a new call is weighed against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadAhead {
    /// As measured, in percent of the usable cores.
    pub now: f64,
    /// Calls taken whose media has not started (ringing, say).
    pub starting: usize,
    /// `now`, and the starting calls at what a call carrying media costs.
    pub expected: f64,
}

impl CpuLoad {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            hundredths: AtomicU32::new(0),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            per_call: AtomicU32::new(0),
        })
    }

    /// The load ahead with `carrying` calls whose media flows and
    /// `starting` whose media is yet to: each starting call is counted at
    /// what a carrying call now costs on average (with none carrying, at
    /// what one cost when last seen). A burst of calls is refused while
    /// they ring, not once their media has overloaded every call.
    pub fn ahead(&self, carrying: usize, starting: usize) -> LoadAhead {
        let now = self.percent();
        if carrying > 0 {
            let per_call = now / carrying as f64 * 10_000.0;
            self.per_call
                .store(per_call.round() as u32, Ordering::Relaxed);
        }
        let per_call = f64::from(self.per_call.load(Ordering::Relaxed)) / 10_000.0;
        LoadAhead {
            now,
            starting,
            expected: now + per_call * starting as f64,
        }
    }

    /// Percent of the usable cores the bridge used over the last window.
    pub fn percent(&self) -> f64 {
        f64::from(self.hundredths.load(Ordering::Relaxed)) / 100.0
    }

    pub fn cores(&self) -> usize {
        self.cores
    }

    /// Reads the process's CPU time every second until `stop`.
    pub async fn sample(self: Arc<Self>, stop: CancellationToken) {
        let mut samples = VecDeque::with_capacity(WINDOW + 1);
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let Some(cpu) = process_cpu_time() else {
                warn!("cannot read the process's CPU time: sip.max_cpu_percent is not applied");
                return;
            };
            if samples.len() > WINDOW {
                samples.pop_front();
            }
            samples.push_back((Instant::now(), cpu));
            if let (Some(first), Some(last)) = (samples.front(), samples.back()) {
                let percent = utilization(last.1 - first.1, last.0 - first.0, self.cores);
                self.hundredths
                    .store((percent * 100.0).round() as u32, Ordering::Relaxed);
            }
        }
    }
}

/// CPU time the whole process (every thread) has used.
fn process_cpu_time() -> Option<Duration> {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(time.tv_sec).ok()?,
        u32::try_from(time.tv_nsec).ok()?,
    ))
}

/// Percent of `cores` that `cpu` of CPU time over `wall` of real time is.
fn utilization(cpu: Duration, wall: Duration, cores: usize) -> f64 {
    if wall.is_zero() {
        return 0.0;
    }
    cpu.as_secs_f64() / wall.as_secs_f64() / cores.max(1) as f64 * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilization_is_a_share_of_every_usable_core() {
        let second = Duration::from_secs(1);
        assert_eq!(utilization(second, second, 1), 100.0);
        assert_eq!(utilization(second, 2 * second, 2), 25.0);
        assert_eq!(utilization(Duration::from_millis(30), 3 * second, 1), 1.0);
        assert_eq!(utilization(second, Duration::ZERO, 2), 0.0);
        assert_eq!(utilization(second, second, 0), 100.0);
    }

    fn load_at(percent: f64) -> Arc<CpuLoad> {
        let load = CpuLoad::new();
        load.hundredths
            .store((percent * 100.0) as u32, Ordering::Relaxed);
        load
    }

    #[test]
    fn calls_still_starting_count_at_what_a_carrying_call_costs() {
        let load = load_at(4.0);
        assert_eq!(
            load.ahead(10, 0),
            LoadAhead {
                now: 4.0,
                starting: 0,
                expected: 4.0
            }
        );
        let ahead = load.ahead(10, 3);
        assert!((ahead.expected - 5.2).abs() < 1e-9, "{ahead:?}");

        // Every call still ringing (the carrying ones ended): each counts
        // at what a call cost when last seen.
        load.hundredths.store(10, Ordering::Relaxed);
        let ahead = load.ahead(0, 5);
        assert!((ahead.expected - 2.1).abs() < 1e-9, "{ahead:?}");
    }

    #[test]
    fn before_any_call_carried_media_nothing_is_counted_ahead() {
        let load = load_at(0.5);
        assert_eq!(load.ahead(0, 20).expected, 0.5);
    }

    #[test]
    fn the_process_cpu_time_grows_with_work() {
        let before = process_cpu_time().unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        let mut spun = 0u64;
        while Instant::now() < deadline {
            spun = std::hint::black_box(spun.wrapping_add(1));
        }
        let used = process_cpu_time().unwrap() - before;
        assert!(
            used >= Duration::from_millis(20),
            "{used:?} for {spun} turns"
        );
    }
}
