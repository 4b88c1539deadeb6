//! The bridge's own CPU load, as admission sees it: while the process uses
//! more than `sip.max_cpu_percent` of the cores it may run on, or will once
//! the calls still ringing carry media, new calls are refused, so that the
//! calls in progress keep every packet instead of all of them losing some.

use std::collections::VecDeque;
use std::path::Path;
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
    /// The cores the process may use (affinity and cgroup quota), in
    /// fractions of a core where the quota gives one.
    cores: f64,
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
            cores: usable_cores(),
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

    pub fn cores(&self) -> f64 {
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
fn utilization(cpu: Duration, wall: Duration, cores: f64) -> f64 {
    if wall.is_zero() || cores <= 0.0 {
        return 0.0;
    }
    cpu.as_secs_f64() / wall.as_secs_f64() / cores * 100.0
}

/// The cores the process may use: the CPUs it may run on, or its cgroup's
/// CPU quota where that is less. The standard library rounds a quota to
/// whole cores (half a core counts as one), while a container limited to
/// `500m` is throttled at half a core: a limit measured against a whole one
/// would never be reached before every call lost packets.
fn usable_cores() -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    match cgroup_quota(Path::new("/sys/fs/cgroup"), &membership) {
        Some(quota) => quota.min(cpus),
        None => cpus,
    }
}

/// The tightest CPU quota, in cores, of the cgroups in `membership` (as
/// `/proc/self/cgroup` lists them) and their ancestors under the cgroup
/// mounts at `mounts`: cgroup v2's `cpu.max`, v1's `cpu.cfs_quota_us` over
/// `cpu.cfs_period_us`. A cgroup that is not under the mount (a container
/// seeing its own cgroup as the root) is looked for from its ancestors.
fn cgroup_quota(mounts: &Path, membership: &str) -> Option<f64> {
    let mut tightest: Option<f64> = None;
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        let mut hierarchies = if controllers.is_empty() {
            vec![mounts.to_path_buf()]
        } else if controllers.split(',').any(|controller| controller == "cpu") {
            vec![mounts.join(controllers), mounts.join("cpu")]
        } else {
            continue;
        };
        // `cpu` alone is mounted at `cpu`: walked once.
        hierarchies.dedup();
        for hierarchy in hierarchies {
            let mut cgroup = Some(Path::new(path));
            while let Some(at) = cgroup {
                let directory = hierarchy.join(at.strip_prefix("/").unwrap_or(at));
                if let Some(quota) = quota_in(&directory) {
                    tightest = Some(tightest.map_or(quota, |t| t.min(quota)));
                }
                cgroup = at.parent();
            }
        }
    }
    tightest
}

/// The CPU quota set on one cgroup's directory, in cores.
fn quota_in(directory: &Path) -> Option<f64> {
    let read = |name: &str| std::fs::read_to_string(directory.join(name)).ok();
    let (quota, period) = match read("cpu.max") {
        // "max 100000": no quota.
        Some(max) => {
            let mut fields = max.split_whitespace();
            (
                fields.next()?.parse::<f64>().ok()?,
                fields.next()?.parse::<f64>().ok()?,
            )
        }
        // -1: no quota.
        None => (
            read("cpu.cfs_quota_us")?.trim().parse::<f64>().ok()?,
            read("cpu.cfs_period_us")?.trim().parse::<f64>().ok()?,
        ),
    };
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilization_is_a_share_of_every_usable_core() {
        let second = Duration::from_secs(1);
        assert_eq!(utilization(second, second, 1.0), 100.0);
        assert_eq!(utilization(second, 2 * second, 2.0), 25.0);
        assert_eq!(utilization(Duration::from_millis(30), 3 * second, 1.0), 1.0);
        assert_eq!(utilization(second, Duration::ZERO, 2.0), 0.0);
        assert_eq!(utilization(second, second, 0.0), 0.0);
        // Under a quota of half a core, a quarter of a core is half of it.
        assert_eq!(utilization(second, 4 * second, 0.5), 50.0);
    }

    /// A cgroup tree under a temporary directory, `files` written into it.
    fn cgroup_tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, contents) in files {
            let file = root.path().join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, contents).unwrap();
        }
        root
    }

    #[test]
    fn a_cgroup_v2_quota_counts_in_fractions_of_a_core() {
        let tree = cgroup_tree(&[
            ("cpu.max", "max 100000\n"),
            ("kubepods/cpu.max", "150000 100000\n"),
            ("kubepods/pod1/cpu.max", "50000 100000\n"),
            ("kubepods/pod1/bridge/cpu.max", "max 100000\n"),
        ]);
        let quota = |membership: &str| cgroup_quota(tree.path(), membership);
        assert_eq!(
            quota("0::/kubepods/pod1/bridge\n"),
            Some(0.5),
            "the tightest ancestor"
        );
        assert_eq!(quota("0::/kubepods\n"), Some(1.5));
        assert_eq!(quota("0::/\n"), None, "max is no quota");
        // A container that sees its own cgroup as the root: the path it is
        // listed under is not in its mount.
        assert_eq!(quota("0::/elsewhere/abc\n"), None);
    }

    #[test]
    fn a_cgroup_v1_quota_is_read_from_the_cpu_hierarchy() {
        let tree = cgroup_tree(&[
            ("cpu,cpuacct/cpu.cfs_quota_us", "-1\n"),
            ("cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
            ("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "25000\n"),
            ("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n"),
            ("memory/docker/abc/cpu.cfs_quota_us", "1000\n"),
            ("memory/docker/abc/cpu.cfs_period_us", "100000\n"),
        ]);
        let membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n";
        assert_eq!(cgroup_quota(tree.path(), membership), Some(0.25));
        assert_eq!(
            cgroup_quota(tree.path(), "4:cpu,cpuacct:/\n"),
            None,
            "-1 is no quota"
        );
        for hostile in ["", "garbage", "::::", "4:cpu:../../etc\n"] {
            assert_eq!(cgroup_quota(tree.path(), hostile), None, "{hostile:?}");
        }
    }

    #[test]
    fn this_machines_usable_cores_are_no_more_than_its_cpus() {
        let cpus = std::thread::available_parallelism().unwrap().get() as f64;
        let cores = usable_cores();
        assert!(cores > 0.0 && cores <= cpus, "{cores} of {cpus}");
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
