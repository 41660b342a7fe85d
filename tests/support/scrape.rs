//! Reading a Prometheus text scrape (`GET /metrics`): a sample's value, and a
//! histogram's buckets with quantiles interpolated as Prometheus'
//! `histogram_quantile` does.

/// The value of the sample `series`, written exactly as the exporter renders it: a
/// name alone, or a name and its labels (`wal2cache_sink_healthy{sink="redis"}`).
#[allow(dead_code)]
pub fn series(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The value of a sample in Prometheus text format: `name` alone or `name{labels}`
/// (labels written as the exporter writes them, e.g. `sink="redis"`).
#[allow(dead_code)]
pub fn metric(text: &str, name: &str, labels: Option<&str>) -> Option<f64> {
    metric_with(text, name, labels.as_slice())
}

/// [`metric`] with any number of labels: `name` alone (`labels` empty), or
/// `name{...}` holding every one of `labels`.
#[allow(dead_code)]
pub fn metric_with(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let matches = if labels.is_empty() {
            series == name
        } else {
            series
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('{'))
                .and_then(|r| r.strip_suffix('}'))
                .is_some_and(|ls| labels.iter().all(|w| ls.split(',').any(|l| l == *w)))
        };
        if matches {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// A histogram as the exporter renders it (seconds): its cumulative buckets, count and
/// sum, over the whole life of the daemon.
#[allow(dead_code)]
pub struct Histogram {
    pub count: Option<f64>,
    pub sum: Option<f64>,
    /// `(upper bound, samples at most that)`, rising; the last bound is `+Inf`.
    pub buckets: Vec<(f64, f64)>,
}

#[allow(dead_code)]
pub fn histogram(text: &str, name: &str) -> Histogram {
    histogram_with(text, name, &[])
}

/// [`histogram`] of the series with `labels` (e.g. `sink="redis"`).
#[allow(dead_code)]
pub fn histogram_with(text: &str, name: &str, labels: &[&str]) -> Histogram {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let ls = series.strip_prefix(&prefix)?.strip_suffix('}')?;
            let mut le = None;
            let mut others = Vec::new();
            for label in ls.split(',') {
                match label
                    .strip_prefix("le=\"")
                    .and_then(|v| v.strip_suffix('"'))
                {
                    Some(v) => le = Some(v),
                    None => others.push(label),
                }
            }
            if others.len() != labels.len() || !labels.iter().all(|w| others.contains(w)) {
                return None;
            }
            let bound = match le? {
                "+Inf" => f64::INFINITY,
                v => v.parse().ok()?,
            };
            Some((bound, value.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Histogram {
        count: metric_with(text, &format!("{name}_count"), labels),
        sum: metric_with(text, &format!("{name}_sum"), labels),
        buckets,
    }
}

#[allow(dead_code)]
impl Histogram {
    /// The `q` quantile, interpolated linearly inside its bucket as Prometheus'
    /// `histogram_quantile` does (the first bucket starts at 0); `q = 1` is the upper
    /// bound of the highest bucket that holds a sample. `None` without samples, or when
    /// the quantile falls in the `+Inf` bucket.
    pub fn get(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        if q >= 1.0 {
            let &(bound, _) = self.buckets.iter().find(|(_, n)| *n >= total)?;
            return bound.is_finite().then_some(bound);
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(bound, n) in &self.buckets {
            if n >= rank && n > 0.0 {
                if !bound.is_finite() {
                    return None;
                }
                let (lo, below) = lower;
                return Some(lo + (bound - lo) * (rank - below) / (n - below));
            }
            lower = (bound, n);
        }
        None
    }

    /// The share of the samples at most `bound` seconds (exact when `bound` is one of
    /// the buckets' bounds, as 2 ms and 10 ms are).
    pub fn share_at_most(&self, bound: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        let (_, n) = self
            .buckets
            .iter()
            .find(|(b, _)| (*b - bound).abs() < 1e-12)?;
        (total > 0.0).then(|| n / total)
    }
}
