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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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
    Cluster(Cluster),
}

impl From<ConnectionManager> for RedisConnection {
    fn from(conn: ConnectionManager) -> Self {
        Self::Single(conn)
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if let Err(err) = slots::check_script(cmd) {
            return Box::pin(async move { Err(err) });
        }
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(cluster) => {
                let cluster = cluster.clone();
                Box::pin(async move {
                    let mut conn = cluster.current();
                    cluster.watch(conn.req_packed_command(cmd).await)
                })
            }
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
            Self::Cluster(cluster) => {
                let cluster = cluster.clone();
                Box::pin(async move {
                    let mut conn = cluster.current();
                    cluster.watch(conn.req_packed_commands(cmd, offset, count).await)
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(_) => 0,
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
        let ping = redis::cmd("PING");
        let pong = match self {
            Self::Single(single) => ping.query_async::<String>(&mut single.clone()).await?,
            Self::Cluster(cluster) => {
                let random = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                let value = cluster.watch(cluster.current().route_command(&ping, random).await)?;
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

/// The cluster client's connection, renewed when nodes stop answering.
///
/// The client reloads its slot map when a node answers `MOVED` or cannot be connected to, which
/// covers a primary that crashed: its connections break, the client asks another node and is
/// redirected to the promoted replica. A primary that *hangs* (a frozen machine, a network
/// dropping packets) breaks nothing: commands to it time out, a timeout is retried on the same
/// node, and the client would keep sending that slot range into the void after the cluster has
/// long failed it over. So a timeout here makes the connection start over from the seed nodes
/// in the background (at most once per [`MIN_RENEWAL_INTERVAL`]), which loads the current slot
/// map; calls use the new connection as soon as it is ready.
#[derive(Clone)]
pub struct Cluster(Arc<ClusterShared>);

struct ClusterShared {
    client: ClusterClient,
    current: RwLock<ClusterConnection>,
    /// A renewal is under way or happened recently.
    renewing: AtomicBool,
    last_renewal: Mutex<Option<Instant>>,
    connect_timeout: Duration,
}

/// How often a cluster connection may be renewed after timeouts.
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

impl Cluster {
    fn new(client: ClusterClient, conn: ClusterConnection, connect_timeout: Duration) -> Self {
        Self(Arc::new(ClusterShared {
            client,
            current: RwLock::new(conn),
            renewing: AtomicBool::new(false),
            last_renewal: Mutex::new(None),
            connect_timeout,
        }))
    }

    fn current(&self) -> ClusterConnection {
        self.0
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Passes `result` through, renewing the connection if it is a timeout.
    fn watch<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(err) = &result
            && err.is_timeout()
        {
            self.renew();
        }
        result
    }

    /// Starts a renewal in the background, unless one is under way or was recent.
    fn renew(&self) {
        let shared = &self.0;
        if shared.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let recent = shared
            .last_renewal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < MIN_RENEWAL_INTERVAL);
        if recent {
            shared.renewing.store(false, Ordering::Release);
            return;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            tracing::warn!("a Redis Cluster node timed out; reconnecting to reload the slot map");
            let fresh = tokio::time::timeout(
                shared.connect_timeout * 12,
                shared.client.get_async_connection(),
            )
            .await;
            match fresh {
                Ok(Ok(conn)) => {
                    *shared
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = conn;
                    tracing::info!("reconnected to the Redis Cluster");
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "reconnecting to the Redis Cluster failed");
                }
                Err(_) => tracing::warn!("reconnecting to the Redis Cluster timed out"),
            }
            *shared
                .last_renewal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
            shared.renewing.store(false, Ordering::Release);
        });
    }
}

/// Retries of one command inside the cluster client (redirections, reconnects, `TRYAGAIN`,
/// `CLUSTERDOWN`), all within the command's timeout: a redirection is retried at once, the others
/// after a short, growing wait.
const CLUSTER_RETRIES: u32 = 6;
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 20;
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 250;
/// wait ≈ factor × base^retry ms: 50, 100, 200, 250, ...
const CLUSTER_RETRY_FACTOR: u64 = 25;
const CLUSTER_RETRY_BASE: u64 = 2;

/// The per-node timeouts of a cluster whose calls must finish within `timeout`: connecting a
/// quarter of it (at least 100 ms), a command (redirections and retries included) half of it.
///
/// Both must end well inside the call's deadline. After a failover the slot map still names
/// the old primary until some node answers `MOVED`, and the client only asks another node once
/// connecting to the old one has failed: a blackholed address must fail fast, or every call to
/// its slots would time out before a redirection could heal the map. And a command that times
/// out must do so while the caller still waits, so the timeout is seen ([`Cluster`]).
fn cluster_timeouts(timeout: Duration) -> (Duration, Duration) {
    ((timeout / 4).max(Duration::from_millis(100)), timeout / 2)
}

/// The cluster client for `seeds` (timeouts from `timeout`, see [`cluster_timeouts`]). Fails
/// (without connecting) on URLs it cannot use: unparsable, unix sockets, different passwords
/// or TLS modes among the seeds.
pub fn cluster_client(seeds: &[String], timeout: Duration) -> redis::RedisResult<ClusterClient> {
    let (connect, response) = cluster_timeouts(timeout);
    ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(connect)
        .response_timeout(response)
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
        let conn = client
            .get_async_connection()
            .await
            .map_err(|err| StoreError::Unavailable(err.to_string()))?;
        let (connect, _) = cluster_timeouts(timeout);
        Ok(RedisConnection::Cluster(Cluster::new(
            client.clone(),
            conn,
            connect,
        )))
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
