//! Histograms read from a node's Prometheus text, so a run can report what the cluster spent
//! inside it (log syncs, proposals) beside what the client saw, from the same metrics an
//! operator graphs rather than from an instrumented build.

/// One histogram as exposed: cumulative counts by upper bound, ascending, `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// The histogram `name` in `text`, if the text has it.
    pub fn parse(text: &str, name: &str) -> Option<Histogram> {
        let bucket = format!("{name}_bucket{{");
        let sum = format!("{name}_sum ");
        let count = format!("{name}_count ");
        let mut h = Histogram::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket) {
                let (labels, value) = rest.rsplit_once(' ')?;
                let le = labels.split("le=\"").nth(1)?.split('"').next()?;
                let le = match le {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().ok()?,
                };
                h.buckets.push((le, value.trim().parse().ok()?));
            } else if let Some(v) = line.strip_prefix(&sum) {
                h.sum = v.trim().parse().ok()?;
            } else if let Some(v) = line.strip_prefix(&count) {
                h.count = v.trim().parse().ok()?;
            }
        }
        (!h.buckets.is_empty()).then_some(h)
    }

    /// What was observed after `before` (the same histogram, read earlier).
    pub fn since(&self, before: &Histogram) -> Histogram {
        let old = |i: usize| before.buckets.get(i).map_or(0.0, |b| b.1);
        Histogram {
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, &(le, c))| (le, c - old(i)))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The upper bound of the bucket holding quantile `q`: the quantile is at most this.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= rank)
            .map(|&(le, _)| le)
    }

    /// `N, p50 <= X ms, p99 <= Y ms, mean Z ms` for a histogram of seconds.
    pub fn describe_seconds(&self) -> String {
        let ms = |s: f64| {
            if s.is_finite() {
                format!("{:.2} ms", s * 1e3)
            } else {
                "+Inf".into()
            }
        };
        match (
            self.quantile_bound(0.5),
            self.quantile_bound(0.99),
            self.mean(),
        ) {
            (Some(p50), Some(p99), Some(mean)) => format!(
                "{}, p50 <= {}, p99 <= {}, mean {}",
                self.count,
                ms(p50),
                ms(p99),
                ms(mean)
            ),
            _ => "none".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    const TEXT: &str = "\
# HELP drover_raft_log_sync_seconds Time to make the Raft log durable.
# TYPE drover_raft_log_sync_seconds histogram
drover_raft_log_sync_seconds_sum 0.5
drover_raft_log_sync_seconds_count 1000
drover_raft_log_sync_seconds_bucket{le=\"0.0001\"} 100
drover_raft_log_sync_seconds_bucket{le=\"0.0002\"} 400
drover_raft_log_sync_seconds_bucket{le=\"0.0004\"} 900
drover_raft_log_sync_seconds_bucket{le=\"+Inf\"} 1000
drover_raft_term 3
";

    #[test]
    fn reads_buckets_sum_and_count_and_bounds_the_median() {
        let h = Histogram::parse(TEXT, "drover_raft_log_sync_seconds").unwrap();
        assert_eq!(h.buckets.len(), 4);
        assert_eq!(h.buckets[3], (f64::INFINITY, 1000.0));
        assert_eq!((h.sum, h.count), (0.5, 1000.0));
        assert_eq!(h.quantile_bound(0.5), Some(0.0004));
        assert_eq!(h.quantile_bound(0.1), Some(0.0001));
        assert_eq!(h.mean(), Some(0.0005));
        assert!(Histogram::parse(TEXT, "drover_raft_proposal_seconds").is_none());
    }

    #[test]
    fn the_difference_of_two_readings_is_what_happened_between_them() {
        let after = Histogram::parse(TEXT, "drover_raft_log_sync_seconds").unwrap();
        let before = Histogram {
            buckets: vec![
                (0.0001, 100.0),
                (0.0002, 100.0),
                (0.0004, 100.0),
                (f64::INFINITY, 100.0),
            ],
            sum: 0.1,
            count: 100.0,
        };
        let d = after.since(&before);
        assert_eq!(d.count, 900.0);
        assert_eq!(d.buckets[0].1, 0.0);
        // 900 syncs after the first reading: 300 under 0.2 ms, 800 under 0.4 ms.
        assert_eq!(d.quantile_bound(0.5), Some(0.0004));
        assert_eq!(
            d.describe_seconds(),
            "900, p50 <= 0.40 ms, p99 <= +Inf, mean 0.44 ms"
        );
        assert_eq!(Histogram::default().describe_seconds(), "none");
    }
}
