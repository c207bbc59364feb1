//! The one connection type of the stores: a single Redis endpoint (`REDIS_URL`) through a
//! [`ConnectionManager`], or a Redis Cluster (`REDIS_CLUSTER_URLS`) through the redis crate's
//! native cluster client, which routes each command to the primary of its key's slot, follows
//! `MOVED`/`ASK` redirections and reloads the slot map when the cluster changes (a failover, a
//! resharding). Store code is the same for both: [`RedisConnection`] is a
//! [`redis::aio::ConnectionLike`].
//!
//! Every script invocation is checked on the way out ([`super::slots::check_script`]): keys of
//! one script must share a hash slot, on a single node too, so a layout bug shows up in every
//! test as INTERNAL instead of only on a cluster.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::{StoreError, bounded, slots};

/// Where Redis is. Its `Debug` never shows credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `REDIS_URL`: one endpoint (a standalone Redis, a primary behind a stable name, or a
    /// proxy that hides a cluster).
    Single(String),
    /// `REDIS_CLUSTER_URLS`: seed nodes of a Redis Cluster; the client discovers the rest.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// The target with every password masked, for logs.
    pub fn redacted(&self) -> String {
        use service_kit::config::redact_url;
        match self {
            Self::Single(url) => redact_url(url),
            Self::Cluster(seeds) => format!(
                "cluster [{}]",
                seeds
                    .iter()
                    .map(|seed| redact_url(seed))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A connection to Redis, single node or cluster. Cheap to clone: clones share the underlying
/// connections.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl From<ConnectionManager> for RedisConnection {
    fn from(conn: ConnectionManager) -> Self {
        Self::Single(conn)
    }
}

impl From<ClusterConnection> for RedisConnection {
    fn from(conn: ClusterConnection) -> Self {
        Self::Cluster(conn)
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if let Err(err) = slots::check_script(cmd) {
            return Box::pin(async move { Err(err) });
        }
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

impl RedisConnection {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// PING: on a single node that node; on a cluster any one node (the client skips nodes it
    /// cannot reach), so readiness means "Redis answers", not "every node is up" — a cluster
    /// losing one primary is a partial outage, and taking every replica of auth-service out of
    /// its Service for it would make it a total one.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.clone();
        let ping = redis::cmd("PING");
        let pong = match &mut conn {
            Self::Single(single) => ping.query_async::<String>(single).await?,
            Self::Cluster(cluster) => {
                let value = cluster
                    .route_command(
                        &ping,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await?;
                redis::from_redis_value::<String>(&value)?
            }
        };
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!("PING answered {pong:?}")))
        }
    }
}

/// Retries of one command inside the cluster client (redirections, reconnects, `TRYAGAIN`,
/// `CLUSTERDOWN`), all within the call's deadline: a redirection is retried at once, the others
/// after a short, growing wait.
const CLUSTER_RETRIES: u32 = 6;
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 20;
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 250;
/// wait ≈ factor × base^retry ms: 50, 100, 200, 250, ...
const CLUSTER_RETRY_FACTOR: u64 = 25;
const CLUSTER_RETRY_BASE: u64 = 2;

/// The cluster client for `seeds`, with per-node connection and response timeouts of
/// `timeout`. Fails (without connecting) on URLs it cannot use: unparsable, unix sockets,
/// different passwords or TLS modes among the seeds.
pub fn cluster_client(seeds: &[String], timeout: Duration) -> redis::RedisResult<ClusterClient> {
    ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
        .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
        .retry_wait_formula(CLUSTER_RETRY_FACTOR, CLUSTER_RETRY_BASE)
        .build()
}

/// Connects to `url` with a [`ConnectionManager`] whose connection and response timeouts are
/// `timeout`, retrying a lost connection briefly in the background.
pub async fn connect(url: &str, timeout: Duration) -> Result<RedisConnection, StoreError> {
    let client = redis::Client::open(url).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
        .set_number_of_retries(2)
        .set_factor(50)
        .set_max_delay(500);
    bounded(timeout * 3, async {
        ConnectionManager::new_with_config(client, config)
            .await
            .map(RedisConnection::Single)
            .map_err(StoreError::from)
    })
    .await
}

/// Connects to the Redis Cluster that `seeds` belong to: at least one must answer; the slot map
/// is loaded from it and a connection opened to every primary.
pub async fn connect_cluster(
    seeds: &[String],
    timeout: Duration,
) -> Result<RedisConnection, StoreError> {
    let client =
        cluster_client(seeds, timeout).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    bounded(timeout * 3, async {
        client
            .get_async_connection()
            .await
            .map(RedisConnection::Cluster)
            .map_err(|err| StoreError::Unavailable(err.to_string()))
    })
    .await
}

/// Connects to `target`.
pub async fn connect_to(
    target: &RedisTarget,
    timeout: Duration,
) -> Result<RedisConnection, StoreError> {
    match target {
        RedisTarget::Single(url) => connect(url, timeout).await,
        RedisTarget::Cluster(seeds) => connect_cluster(seeds, timeout).await,
    }
}
