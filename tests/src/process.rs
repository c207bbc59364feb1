//! One service binary running as a child process, with its output kept for assertions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub struct ServiceProcess {
    pub name: &'static str,
    pub addr: SocketAddr,
    env: Vec<(String, String)>,
    args: Vec<String>,
    child: Option<tokio::process::Child>,
    log_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl ServiceProcess {
    /// Starts `name` (a binary of this workspace) listening on `addr` with `env` on top of a clean
    /// environment (PATH only), so the developer's shell cannot leak settings into a test.
    pub fn spawn(name: &'static str, addr: SocketAddr, env: Vec<(String, String)>) -> Self {
        Self::spawn_with_args(name, addr, env, Vec::new())
    }

    pub fn spawn_with_args(
        name: &'static str,
        addr: SocketAddr,
        env: Vec<(String, String)>,
        args: Vec<String>,
    ) -> Self {
        let log_dir = tempfile::tempdir().expect("a temp dir for logs");
        let log_path = log_dir.path().join(format!("{name}.log"));
        let mut process = Self {
            name,
            addr,
            env,
            args,
            child: None,
            log_path,
            _log_dir: log_dir,
        };
        process.start();
        process
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file opens");
        let child = tokio::process::Command::new(crate::binary_path(self.name))
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle clones"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("{} does not start: {err}", self.name));
        self.child = Some(child);
    }

    /// Overrides settings for the next (re)start.
    pub fn set_env(&mut self, overrides: &mut Vec<(String, String)>) {
        self.env
            .retain(|(key, _)| !overrides.iter().any(|(k, _)| k == key));
        self.env.append(overrides);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The health status of `service` ("" for the whole server), or None if unreachable.
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let channel = tonic::transport::Endpoint::from_shared(self.url())
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    /// Waits until the whole server reports SERVING; panics with the logs after `within`.
    pub async fn wait_serving(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.health("").await == Some(ServingStatus::Serving) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "{} exited with {status} before serving:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{} not SERVING within {within:?}:\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM, as Kubernetes does.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Waits for the process to exit (at most `within`) and returns its status.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("process was started");
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => status.expect("exit status is readable"),
            Err(_) => panic!(
                "{} still running after {within:?}:\n{}",
                self.name,
                self.logs()
            ),
        }
    }

    /// Kills the process at once (an outage), keeping its logs.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the process again with the same settings and waits for SERVING.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.start();
        self.wait_serving(Duration::from_secs(20)).await;
    }
}

/// Runs a binary to completion (for subcommands and config errors): (exit status, output).
pub async fn run_to_exit(name: &str, env: &[(&str, &str)], args: &[&str]) -> (ExitStatus, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(crate::binary_path(name))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the command finishes")
    .expect("the command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}
