//! A Redis Cluster of one test's own, started and stopped with `scripts/redis-cluster` (the same
//! steps a developer runs) in a temp directory, on free ports: tests that each start one do not
//! collide. Nodes can be killed (SIGKILL) to force a failover.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

/// The script that starts and stops clusters.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis-cluster")
}

/// A node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    /// Marked failed (`fail`) by the cluster.
    pub failed: bool,
    /// The node id of its primary (replicas only).
    pub primary_id: Option<String>,
}

pub struct RedisCluster {
    /// `REDIS_CLUSTER_URLS`: every node, primaries first.
    pub urls: String,
    /// Every node's port, primaries first (as started; roles change on failover).
    pub ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// 3 primaries with 1 replica each; a primary silent for 2 s is failed over.
    pub async fn start() -> Self {
        Self::start_with(3, 1, 2000).await
    }

    pub async fn start_with(primaries: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir for the cluster");
        let output = tokio::process::Command::new(script())
            .arg("start")
            .arg("--dir")
            .arg(dir.path().join("cluster"))
            .args(["--primaries", &primaries.to_string()])
            .args(["--replicas", &replicas.to_string()])
            .args(["--node-timeout", &node_timeout_ms.to_string()])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("scripts/redis-cluster runs");
        assert!(
            output.status.success(),
            "scripts/redis-cluster start failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let urls = stdout
            .lines()
            .find_map(|line| line.strip_prefix("REDIS_CLUSTER_URLS="))
            .expect("the script prints REDIS_CLUSTER_URLS")
            .to_owned();
        let ports = urls
            .split(',')
            .map(|url| {
                url.rsplit(':')
                    .next()
                    .and_then(|port| port.parse().ok())
                    .expect("a port")
            })
            .collect();
        Self { urls, ports, dir }
    }

    /// The auth-service setting that points at this cluster.
    pub fn env(&self) -> (&'static str, String) {
        ("REDIS_CLUSTER_URLS", self.urls.clone())
    }

    fn node_dir(&self, port: u16) -> PathBuf {
        self.dir.path().join("cluster").join(port.to_string())
    }

    /// A plain connection to one node (no redirections), or None if it does not answer.
    pub async fn node(&self, port: u16) -> Option<MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_millis(500))
            .set_response_timeout(Duration::from_secs(2));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .ok()
    }

    /// One node's answer to `cmd`, or None if it does not answer.
    pub async fn query<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> Option<T> {
        let mut node = self.node(port).await?;
        cmd.query_async(&mut node).await.ok()
    }

    /// The cluster as a live node sees it.
    pub async fn nodes(&self) -> Vec<ClusterNode> {
        for &port in &self.ports {
            let Some(text) = self
                .query::<String>(port, redis::cmd("CLUSTER").arg("NODES"))
                .await
            else {
                continue;
            };
            return text
                .lines()
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                    let flags = fields.get(2)?;
                    Some(ClusterNode {
                        id: fields[0].to_owned(),
                        port,
                        primary: flags.contains("master"),
                        failed: flags.split(',').any(|flag| flag == "fail"),
                        primary_id: fields
                            .get(3)
                            .filter(|id| **id != "-")
                            .map(|id| (*id).to_owned()),
                    })
                })
                .collect();
        }
        panic!("no node of the cluster answers");
    }

    /// Ports of the primaries that are not failed.
    pub async fn primaries(&self) -> Vec<u16> {
        self.nodes()
            .await
            .into_iter()
            .filter(|node| node.primary && !node.failed)
            .map(|node| node.port)
            .collect()
    }

    /// The hash slot of `key`, as the cluster computes it.
    pub async fn key_slot(&self, key: &str) -> u16 {
        for &port in &self.ports {
            if let Some(slot) = self
                .query(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
                .await
            {
                return slot;
            }
        }
        panic!("no node of the cluster answers");
    }

    /// The primary serving `slot` now, as a live node sees it (`CLUSTER SLOTS`).
    pub async fn owner_of_slot(&self, slot: u16) -> u16 {
        for &port in &self.ports {
            let Some(ranges) = self
                .query::<Vec<redis::Value>>(port, redis::cmd("CLUSTER").arg("SLOTS"))
                .await
            else {
                continue;
            };
            for range in ranges {
                let redis::Value::Array(items) = range else {
                    continue;
                };
                let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                    (items.first(), items.get(1))
                else {
                    continue;
                };
                if (*start..=*end).contains(&i64::from(slot))
                    && let Some(redis::Value::Array(primary)) = items.get(2)
                    && let Some(redis::Value::Int(owner)) = primary.get(1)
                {
                    return u16::try_from(*owner).expect("a port");
                }
            }
        }
        panic!("no node of the cluster knows who serves slot {slot}");
    }

    /// The primary holding `key` now.
    pub async fn owner_of(&self, key: &str) -> u16 {
        self.owner_of_slot(self.key_slot(key).await).await
    }

    /// Keys held by each primary that answers: (port, DBSIZE).
    pub async fn keys_per_primary(&self) -> Vec<(u16, u64)> {
        let mut counts = Vec::new();
        for port in self.primaries().await {
            if let Some(keys) = self.query(port, &redis::cmd("DBSIZE")).await {
                counts.push((port, keys));
            }
        }
        counts
    }

    /// The process id of the node on `port`.
    pub fn pid(&self, port: u16) -> u32 {
        std::fs::read_to_string(self.node_dir(port).join("redis.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid file for node {port}"))
    }

    /// Kills the node on `port` at once (SIGKILL: nothing is flushed, no goodbye to the
    /// cluster), as a crashed machine would go.
    pub fn kill(&self, port: u16) {
        self.signal(port, "KILL");
    }

    /// Freezes the node on `port` (SIGSTOP): its connections stay open and its kernel still
    /// accepts new ones, but nothing answers — a hung machine, or a network that drops
    /// packets. [`RedisCluster::thaw`] (SIGCONT) lets it run again.
    pub fn freeze(&self, port: u16) {
        self.signal(port, "STOP");
    }

    pub fn thaw(&self, port: u16) {
        self.signal(port, "CONT");
    }

    fn signal(&self, port: u16, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid(port).to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "node {port} did not take SIG{signal}");
    }

    /// Waits until every node that answers reports `cluster_state:ok` and sees `expected`
    /// healthy primaries; panics after `within`.
    pub async fn wait_ok(&self, expected: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut answering = 0;
            let mut ok = true;
            for &port in &self.ports {
                if let Some(info) = self
                    .query::<String>(port, redis::cmd("CLUSTER").arg("INFO"))
                    .await
                {
                    answering += 1;
                    ok &= info.lines().any(|line| line.trim() == "cluster_state:ok");
                }
            }
            if ok && answering > 0 && self.primaries().await.len() == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster is not ok with {expected} primaries after {within:?}: {:?}",
                self.nodes().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// After `killed` (a primary) was killed: waits until `replica` serves in its place, the
    /// cluster marks `killed` failed and every node that answers reports `cluster_state:ok`;
    /// panics after `within`.
    pub async fn wait_failover(&self, killed: u16, replica: u16, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let primaries = self.primaries().await;
            if primaries.contains(&replica) && !primaries.contains(&killed) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{replica} did not take over from {killed} within {within:?}: {:?}",
                self.nodes().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let expected = self.primaries().await.len();
        self.wait_ok(expected, within).await;
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // A frozen node would ignore the script's SIGTERM until its SIGKILL fallback.
        for &port in &self.ports {
            if let Ok(pid) = std::fs::read_to_string(self.node_dir(port).join("redis.pid")) {
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", pid.trim()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = std::process::Command::new(script())
            .arg("stop")
            .arg("--dir")
            .arg(self.dir.path().join("cluster"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
