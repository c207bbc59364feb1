//! h2load (nghttp2's HTTP/2 load tool, almost no cost per call) as a second driver of the same
//! request against the same binary in the same run: the yardstick for the load generator.
//!
//! h2load counts HTTP 200s, but a gRPC call's outcome is the `grpc-status` trailer, so the
//! calls it got answered OK are counted by the service itself: the delta of
//! `grpc_server_handled_total{grpc_method=…}` on its metrics endpoint, by code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use e2e_tests::Stack;

use crate::cpu::{PerThousand, Pids, Reading};

/// What h2load got done.
pub struct Run {
    /// gRPC-OK calls per second (the service's count over h2load's measuring time).
    pub ok_rate: f64,
    pub ok: u64,
    /// h2load's measuring time.
    pub seconds: f64,
    /// Other gRPC codes the service counted, and their counts.
    pub errors: BTreeMap<String, u64>,
    /// Requests h2load saw answered with HTTP 200.
    pub http_ok: u64,
    pub cpu: PerThousand,
}

impl Run {
    /// Two runs of the same request as one.
    pub fn combine(self, other: Run) -> Run {
        let mut errors = self.errors;
        for (code, n) in other.errors {
            *errors.entry(code).or_default() += n;
        }
        let (ok, seconds) = (self.ok + other.ok, self.seconds + other.seconds);
        Run {
            ok_rate: ok as f64 / seconds.max(f64::EPSILON),
            ok,
            seconds,
            errors,
            http_ok: self.http_ok + other.http_ok,
            cpu: self.cpu.weighted(self.ok, &other.cpu, other.ok),
        }
    }
}

/// `grpc_server_handled_total` of `method` by code, from a metrics page.
pub fn handled(metrics: &str, method: &str) -> BTreeMap<String, u64> {
    let wanted = format!("grpc_method=\"{method}\"");
    let mut counts = BTreeMap::new();
    for line in metrics.lines() {
        let Some(labels) = line.strip_prefix("grpc_server_handled_total{") else {
            continue;
        };
        if !labels.contains(&wanted) {
            continue;
        }
        let code = labels
            .split("grpc_code=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("?");
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        *counts.entry(code.to_owned()).or_default() += value as u64;
    }
    counts
}

/// A parsed h2load report: measuring time in seconds and requests answered 2xx.
fn report(stdout: &str) -> Option<(f64, u64)> {
    let seconds = stdout
        .lines()
        .find_map(|line| line.strip_prefix("finished in "))
        .and_then(|rest| rest.split(',').next())
        .and_then(|t| {
            if let Some(ms) = t.strip_suffix("ms") {
                ms.parse::<f64>().ok().map(|ms| ms / 1000.0)
            } else {
                t.strip_suffix('s')?.parse::<f64>().ok()
            }
        })?;
    let ok = stdout
        .lines()
        .find_map(|line| line.strip_prefix("status codes: "))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())?;
    Some((seconds, ok))
}

/// The call to drive: where, which method, with which body and bearer.
pub struct Call<'a> {
    pub server: SocketAddr,
    pub metrics: SocketAddr,
    /// `/package.Service/Method`.
    pub path: &'a str,
    pub bearer: Option<&'a str>,
    /// The length-prefixed message.
    pub body: &'a Bytes,
}

/// Drives `call` with `connections` connections of `streams` concurrent streams each for
/// `duration`.
pub async fn run(
    call: &Call<'_>,
    connections: usize,
    streams: usize,
    duration: Duration,
    pids: &Pids,
) -> Result<Run, String> {
    let method = call.path.rsplit('/').next().unwrap_or_default();
    let body_path = std::env::temp_dir().join(format!("loadgen-{}-h2load.bin", std::process::id()));
    std::fs::write(&body_path, call.body).map_err(|e| format!("{}: {e}", body_path.display()))?;
    let mut command = tokio::process::Command::new("h2load");
    command.args(["-c", &connections.to_string(), "-m", &streams.to_string()]);
    command.args(["-D", &duration.as_secs().max(1).to_string()]);
    command.args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    if let Some(token) = call.bearer {
        command.args(["-H", &format!("authorization: Bearer {token}")]);
    }
    command
        .arg("-d")
        .arg(&body_path)
        .arg(format!("http://{}{}", call.server, call.path));
    let before_metrics = handled(&Stack::metrics(call.metrics).await, method);
    let before = Reading::now(pids);
    let output = command.output().await.map_err(|e| format!("h2load: {e}"));
    let after = Reading::now(pids);
    let after_metrics = handled(&Stack::metrics(call.metrics).await, method);
    let _ = std::fs::remove_file(&body_path);
    let output = output?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (seconds, http_ok) = report(&stdout).ok_or_else(|| {
        format!(
            "h2load gave no report: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })?;
    let mut errors = BTreeMap::new();
    for (code, count) in &after_metrics {
        let delta = count.saturating_sub(before_metrics.get(code).copied().unwrap_or(0));
        if delta > 0 {
            errors.insert(code.clone(), delta);
        }
    }
    let ok = errors.remove("OK").unwrap_or(0);
    let calls = ok + errors.values().sum::<u64>();
    Ok(Run {
        ok_rate: ok as f64 / seconds.max(f64::EPSILON),
        ok,
        seconds,
        errors,
        http_ok,
        cpu: PerThousand::between(&before, &after, calls, true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handled_calls_are_counted_by_code_for_one_method() {
        let page = "# HELP grpc_server_handled_total x\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"GetProfile\",grpc_service=\"s\"} 120\n\
            grpc_server_handled_total{grpc_code=\"Unauthenticated\",grpc_method=\"GetProfile\",grpc_service=\"s\"} 3\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"ListInvitees\",grpc_service=\"s\"} 7\n";
        let counts = handled(page, "GetProfile");
        assert_eq!(counts.get("OK"), Some(&120));
        assert_eq!(counts.get("Unauthenticated"), Some(&3));
        assert_eq!(counts.len(), 2);
    }

    #[test]
    fn the_report_gives_time_and_2xx() {
        let out = "finished in 5.00s, 11300.20 req/s, 1.23MB/s\n\
                   requests: 56501 total, 56565 started, 56501 done, 56501 succeeded, 0 failed\n\
                   status codes: 56501 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        assert_eq!(report(out), Some((5.0, 56501)));
        assert_eq!(
            report("finished in 850.5ms, 1 req/s\nstatus codes: 9 2xx\n"),
            Some((0.8505, 9))
        );
    }
}
