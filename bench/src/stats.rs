//! Latency and outcome figures of one scenario run.

use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Default)]
pub struct Recorder {
    pub latencies_us: Vec<u32>,
    pub errors: BTreeMap<String, u64>,
}

impl Recorder {
    pub fn record<T>(&mut self, elapsed: Duration, result: &Result<T, tonic::Status>) {
        match result {
            Ok(_) => self
                .latencies_us
                .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)),
            Err(status) => *self.errors.entry(error_label(status)).or_default() += 1,
        }
    }

    pub fn merge(&mut self, other: Recorder) {
        self.latencies_us.extend(other.latencies_us);
        for (code, count) in other.errors {
            *self.errors.entry(code).or_default() += count;
        }
    }
}

/// The gRPC code of a failed call, with the `google.rpc.ErrorInfo` reason when the service
/// gave one (which limit refused): `ResourceExhausted/SMS_PREFIX_BUDGET`.
pub fn error_label(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    match status.get_details_error_info() {
        Some(info) => format!("{:?}/{}", status.code(), info.reason),
        None => format!("{:?}", status.code()),
    }
}

#[derive(Clone)]
pub struct Summary {
    pub name: String,
    pub concurrency: usize,
    pub ok: usize,
    pub rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: BTreeMap<String, u64>,
    pub auth_rss_mb: f64,
    pub referral_rss_mb: f64,
    /// CPU per 1,000 calls of the driver, the services and the stores over the timed part.
    pub cpu: crate::cpu::PerThousand,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

impl Summary {
    pub fn new(name: &str, concurrency: usize, mut recorder: Recorder, wall: Duration) -> Self {
        recorder.latencies_us.sort_unstable();
        let sorted = &recorder.latencies_us;
        Self {
            name: name.to_owned(),
            concurrency,
            ok: sorted.len(),
            rate: sorted.len() as f64 / wall.as_secs_f64(),
            p50_ms: percentile(sorted, 0.50),
            p90_ms: percentile(sorted, 0.90),
            p99_ms: percentile(sorted, 0.99),
            max_ms: sorted.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
            errors: recorder.errors,
            auth_rss_mb: 0.0,
            referral_rss_mb: 0.0,
            cpu: crate::cpu::PerThousand::default(),
        }
    }

    /// Calls made, answered OK or not.
    pub fn calls(&self) -> u64 {
        self.ok as u64 + self.errors.values().sum::<u64>()
    }

    pub fn header() -> &'static str {
        "| scenario | callers | ok | ops/s | p50 ms | p90 ms | p99 ms | max ms | errors | auth peak RSS MB | referral peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|"
    }

    pub fn row(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(code, count)| format!("{code}: {count}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {:.1} |",
            self.name,
            self.concurrency,
            self.ok,
            self.rate,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.max_ms,
            errors,
            self.auth_rss_mb,
            self.referral_rss_mb
        )
    }
}

/// (current RSS, peak RSS) of a process in MB, from /proc.
pub fn rss_mb(pid: Option<u32>) -> (f64, f64) {
    let Some(pid) = pid else { return (0.0, 0.0) };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
