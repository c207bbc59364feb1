//! A real Prometheus (the Debian `prometheus` binary, which `scripts/install-tools` installs)
//! scraping a running [`Stack`] every second and evaluating the repository's alert rules, with
//! the rules' `for:` durations shortened so a test can watch an alert go pending, then firing.
//! The HTTP API is reached with hyper, one connection per request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::{Stack, free_port};

/// The rule file the deployment ships.
pub fn alert_rules_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring/alerts.yaml")
}

/// The Grafana dashboards the deployment ships.
pub fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring/dashboards")
}

/// One scraped service: its job name (as the dashboards' `$auth_job` / `$referral_job` select)
/// and its `pod` label, which a Kubernetes scrape config sets from the pod name.
pub struct Target {
    pub job: &'static str,
    pub pod: String,
    pub addr: SocketAddr,
}

/// Both services of `stack`, under the job names the deployment's Services give them.
pub fn stack_targets(stack: &Stack) -> Vec<Target> {
    vec![
        Target {
            job: "auth-service",
            pod: "auth-service-0".to_owned(),
            addr: stack.auth_metrics,
        },
        Target {
            job: "referral-service",
            pod: "referral-service-0".to_owned(),
            addr: stack.referral_metrics,
        },
    ]
}

/// A time series from the HTTP API: its labels and its points (unix seconds, value).
#[derive(Debug, Clone)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub points: Vec<(f64, f64)>,
}

/// One entry of `/api/v1/alerts`.
#[derive(Debug, Clone)]
pub struct Alert {
    pub name: String,
    /// `pending` or `firing`.
    pub state: String,
    pub labels: BTreeMap<String, String>,
}

pub struct Prometheus {
    pub addr: SocketAddr,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes both services of `stack`, with every alert's `for:` set to `alert_for`.
    pub async fn scrape(stack: &Stack, alert_for: Duration) -> Self {
        Self::start(&stack_targets(stack), alert_for).await
    }

    /// Starts Prometheus on a free port with its own storage in a temp dir, scraping `targets`
    /// every second, and waits until it is ready (not until the targets are up: see
    /// [`Self::wait_targets_up`]).
    pub async fn start(targets: &[Target], alert_for: Duration) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir for Prometheus");
        let rules = std::fs::read_to_string(alert_rules_path())
            .unwrap_or_else(|err| panic!("{}: {err}", alert_rules_path().display()));
        std::fs::write(dir.path().join("alerts.yaml"), with_for(&rules, alert_for))
            .expect("rules are written");
        std::fs::write(dir.path().join("prometheus.yml"), config(targets))
            .expect("config is written");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle clones"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "prometheus does not start ({err}): run scripts/install-tools, which installs \
                     Debian's prometheus package"
                )
            });
        let mut prometheus = Self { addr, child, dir };
        for _ in 0..200 {
            if let Ok((200, _)) = prometheus.get("/-/ready").await {
                return prometheus;
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", prometheus.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "prometheus was not ready within 20 s:\n{}",
            prometheus.log()
        );
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Waits until every target has been scraped successfully.
    pub async fn wait_targets_up(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            match self.api_get("/api/v1/targets?state=active").await {
                Ok(data) => {
                    let targets = data["activeTargets"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    if !targets.is_empty() && targets.iter().all(|t| t["health"] == "up") {
                        return;
                    }
                    last = targets
                        .iter()
                        .map(|t| {
                            format!("{} {} {}", t["labels"]["job"], t["health"], t["lastError"])
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                }
                Err(err) => last = err,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("scrape targets not up within {timeout:?}: {last}");
    }

    /// An instant query at the current time. `Err` carries Prometheus's error message.
    pub async fn query(&self, promql: &str) -> Result<Vec<Series>, String> {
        let data = self.api_post("/api/v1/query", &[("query", promql)]).await?;
        Ok(series(&data))
    }

    /// A range query from `start` to `end` (unix seconds) every `step`.
    pub async fn query_range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: Duration,
    ) -> Result<Vec<Series>, String> {
        let data = self
            .api_post(
                "/api/v1/query_range",
                &[
                    ("query", promql),
                    ("start", &start.to_string()),
                    ("end", &end.to_string()),
                    ("step", &step.as_secs_f64().to_string()),
                ],
            )
            .await?;
        Ok(series(&data))
    }

    /// The alerts that are pending or firing now.
    pub async fn alerts(&self) -> Result<Vec<Alert>, String> {
        let data = self.api_get("/api/v1/alerts").await?;
        Ok(data["alerts"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|alert| {
                let labels = string_map(&alert["labels"]);
                Alert {
                    name: labels.get("alertname").cloned().unwrap_or_default(),
                    state: alert["state"].as_str().unwrap_or_default().to_owned(),
                    labels,
                }
            })
            .collect())
    }

    async fn api_get(&self, path: &str) -> Result<Value, String> {
        let (status, body) = self.get(path).await?;
        api_data(status, &body)
    }

    async fn api_post(&self, path: &str, form: &[(&str, &str)]) -> Result<Value, String> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let request = hyper::Request::post(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .map_err(|err| err.to_string())?;
        let (status, body) = self.send(request).await?;
        api_data(status, &body)
    }

    async fn get(&self, path: &str) -> Result<(u16, Bytes), String> {
        let request = hyper::Request::get(path)
            .header("host", self.addr.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(|err| err.to_string())?;
        self.send(request).await
    }

    async fn send(&self, request: hyper::Request<Full<Bytes>>) -> Result<(u16, Bytes), String> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|err| format!("connect {}: {err}", self.addr))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|err| err.to_string())?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| err.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| err.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The scrape config: every second, both the scrape and the rule evaluation, so a test sees a
/// change within a few seconds.
fn config(targets: &[Target]) -> String {
    let mut config = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - alerts.yaml\nscrape_configs:\n",
    );
    for target in targets {
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n        \
             labels:\n          pod: {pod}\n",
            job = target.job,
            addr = target.addr,
            pod = target.pod,
        ));
    }
    config
}

/// `rules` with every rule's `for:` set to `duration`. The crate has no YAML parser, so this
/// rewrites lines; it only touches a line that is exactly `for: <duration>`, which a PromQL
/// expression or an annotation cannot be, and checks that it found some.
pub fn with_for(rules: &str, duration: Duration) -> String {
    let mut rewritten = 0;
    let lines: Vec<String> = rules
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            match trimmed.strip_prefix("for:").map(str::trim) {
                Some(value) if is_duration(value) => {
                    rewritten += 1;
                    format!("{indent}for: {}ms", duration.as_millis())
                }
                _ => line.to_owned(),
            }
        })
        .collect();
    assert!(rewritten > 0, "no `for:` found in the alert rules");
    lines.join("\n") + "\n"
}

/// A Prometheus duration such as `5m`, `1h30m` or `90s`.
fn is_duration(value: &str) -> bool {
    let mut digits = false;
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits = true;
        } else if digits && "smhdwy".contains(c) {
            // `ms` is the one two-letter unit.
            if c == 'm' && chars.peek() == Some(&'s') {
                chars.next();
            }
            digits = false;
            if chars.peek().is_none() {
                return true;
            }
        } else {
            return false;
        }
    }
    false
}

/// The `data` of a successful API answer, or Prometheus's error.
fn api_data(status: u16, body: &[u8]) -> Result<Value, String> {
    let json: Value = serde_json::from_slice(body).map_err(|err| {
        format!(
            "HTTP {status}, not JSON ({err}): {}",
            String::from_utf8_lossy(body)
        )
    })?;
    if json["status"] == "success" {
        Ok(json["data"].clone())
    } else {
        Err(format!(
            "HTTP {status}, {}: {}",
            json["errorType"].as_str().unwrap_or("error"),
            json["error"].as_str().unwrap_or_default()
        ))
    }
}

/// The series of a query answer: a vector or matrix, or a scalar as one unlabelled series.
fn series(data: &Value) -> Vec<Series> {
    let point = |pair: &Value| -> Option<(f64, f64)> {
        Some((pair[0].as_f64()?, pair[1].as_str()?.parse().ok()?))
    };
    match data["resultType"].as_str() {
        Some("vector") | Some("matrix") => data["result"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|item| Series {
                labels: string_map(&item["metric"]),
                points: match item["values"].as_array() {
                    Some(values) => values.iter().filter_map(point).collect(),
                    None => point(&item["value"]).into_iter().collect(),
                },
            })
            .collect(),
        Some("scalar") => vec![Series {
            labels: BTreeMap::new(),
            points: point(&data["result"]).into_iter().collect(),
        }],
        _ => Vec::new(),
    }
}

fn string_map(object: &Value) -> BTreeMap<String, String> {
    object
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Now, in unix seconds (what `query_range` takes).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_for_lines_with_a_duration_are_rewritten() {
        let rules = "      - alert: A\n        expr: up == 0\n        for: 5m\n        \
                     annotations:\n          description: for: the record\n      - alert: B\n        \
                     for: 1h30m\n";
        let rewritten = with_for(rules, Duration::from_secs(3));
        assert_eq!(
            rewritten,
            "      - alert: A\n        expr: up == 0\n        for: 3000ms\n        \
             annotations:\n          description: for: the record\n      - alert: B\n        \
             for: 3000ms\n"
        );
    }

    #[test]
    fn durations_are_recognised() {
        for good in ["5m", "90s", "1h30m", "500ms", "1d"] {
            assert!(is_duration(good), "{good}");
        }
        for bad in ["", "m", "5", "the record", "5 m", "5mx"] {
            assert!(!is_duration(bad), "{bad}");
        }
    }
}
