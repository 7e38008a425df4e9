//! The end-to-end measuring tools behind `drover-bench`, as a library so the test suite can run a
//! short smoke load through the same code.

pub mod backlog;
pub mod fleet;
pub mod load;
pub mod scrape;

/// Wall clock, microseconds since the Unix epoch (the clock the coordinators stamp tasks with).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Value at percentile `p` (0..=1) of a sorted slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// CPU seconds (user + system) a process has used so far, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_sec())
}

/// The unit of /proc's CPU times.
fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// The whole host's CPU time so far, from the first line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostCpu {
    /// user + nice + system + irq + softirq: work done, by anyone on the host.
    pub busy: u64,
    /// Time the hypervisor ran someone else while this guest had work.
    pub steal: u64,
}

impl HostCpu {
    /// Parses /proc/stat's text; None if its `cpu` line is missing or short.
    pub fn parse(stat: &str) -> Option<HostCpu> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let (user, nice, system, irq, softirq, steal) = (
            *v.first()?,
            *v.get(1)?,
            *v.get(2)?,
            *v.get(5)?,
            *v.get(6)?,
            *v.get(7)?,
        );
        Some(HostCpu {
            busy: user + nice + system + irq + softirq,
            steal,
        })
    }

    pub fn read() -> Option<HostCpu> {
        HostCpu::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// (busy, steal) seconds from `earlier` to `self`.
    pub fn since(&self, earlier: &HostCpu) -> (f64, f64) {
        let ticks = clock_ticks_per_sec();
        (
            self.busy.saturating_sub(earlier.busy) as f64 / ticks,
            self.steal.saturating_sub(earlier.steal) as f64 / ticks,
        )
    }
}

/// Resident memory of a process in bytes, from /proc.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The lowest rate over any stretch of at least `window_secs` in a series of (seconds, count)
/// samples of a growing counter, taken in time order: what a run sustained, as opposed to its
/// average. None when the samples span less than one window.
pub fn lowest_window_rate(samples: &[(f64, u64)], window_secs: f64) -> Option<f64> {
    let mut lowest: Option<f64> = None;
    let mut j = 0;
    for (i, &(t0, c0)) in samples.iter().enumerate() {
        j = j.max(i);
        while j < samples.len() && samples[j].0 - t0 < window_secs {
            j += 1;
        }
        let Some(&(t1, c1)) = samples.get(j) else {
            break;
        };
        let rate = c1.saturating_sub(c0) as f64 / (t1 - t0);
        lowest = Some(lowest.map_or(rate, |l: f64| l.min(rate)));
    }
    lowest
}

/// The rate in each consecutive stretch of `slice_secs` (the last one may be shorter), from the
/// same kind of samples as `lowest_window_rate`: a run's throughput over time.
pub fn slice_rates(samples: &[(f64, u64)], slice_secs: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let Some(&(mut t0, mut c0)) = samples.first() else {
        return out;
    };
    for (k, &(t, c)) in samples.iter().enumerate() {
        if t - t0 >= slice_secs || (k + 1 == samples.len() && t > t0) {
            out.push(c.saturating_sub(c0) as f64 / (t - t0));
            (t0, c0) = (t, c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{lowest_window_rate, slice_rates};

    #[test]
    fn host_cpu_counts_work_but_not_idle_iowait_or_steal_as_busy() {
        let stat = "cpu  100 5 30 9000 40 2 3 70 0 0\ncpu0 50 2 15 4500 20 1 1 35 0 0\nintr 1\n";
        let cpu = super::HostCpu::parse(stat).unwrap();
        assert_eq!(
            cpu,
            super::HostCpu {
                busy: 100 + 5 + 30 + 2 + 3,
                steal: 70
            }
        );
        assert_eq!(super::HostCpu::parse("cpu0 1 2 3\n"), None, "no total line");
        assert_eq!(super::HostCpu::parse("cpu  1 2 3\n"), None, "too short");
        assert!(super::HostCpu::read().is_some(), "this host's /proc/stat");
    }

    #[test]
    fn slice_rates_follow_the_counter_over_time() {
        let samples = [(0.0, 0), (1.0, 10), (2.0, 30), (3.0, 30), (3.5, 40)];
        assert_eq!(slice_rates(&samples, 2.0), vec![15.0, 10.0 / 1.5]);
        assert_eq!(slice_rates(&samples, 1.0), vec![10.0, 20.0, 0.0, 20.0]);
        assert!(slice_rates(&[], 1.0).is_empty());
    }

    #[test]
    fn the_lowest_window_rate_finds_a_stall_the_average_hides() {
        // 100/s for 10 s, a 2 s stall, then 100/s for 10 s more.
        let mut samples = Vec::new();
        let mut count = 0;
        for t in 0..=22u64 {
            samples.push((t as f64, count));
            if !(10..12).contains(&t) {
                count += 100;
            }
        }
        assert_eq!(lowest_window_rate(&samples, 1.0), Some(0.0));
        assert_eq!(lowest_window_rate(&samples, 5.0), Some(60.0));
        let whole = lowest_window_rate(&samples, 22.0).expect("one window");
        assert!((whole - 2000.0 / 22.0).abs() < 1e-9, "{whole}");
        assert_eq!(lowest_window_rate(&samples, 23.0), None);
        assert_eq!(lowest_window_rate(&[], 1.0), None);
    }
}
