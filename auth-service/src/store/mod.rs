//! Redis storage: pending codes and their limits ([`otp::OtpStore`]), refresh-token
//! families ([`refresh::RefreshStore`]) and the service-token budgets
//! ([`service_tokens::ServiceTokenStore`]).
//!
//! Keys live under a configurable prefix (`refsys:auth:` by default). Every key a multi-key
//! Lua script touches carries the same Redis Cluster hash tag: `{+79601233017}` for a phone,
//! `{fam:<id>}` for a refresh-token family, `{sms:RU}` for a region, so each script runs on one
//! slot. Keys that cannot share a tag (the budgets of clients, blocks and everything, the
//! token-hash → family lookup) are only ever used by single-key commands or scripts; see the
//! module docs for the consequences.
//!
//! Every call goes through a [`redis::aio::ConnectionManager`] (it reconnects by itself) with
//! connection and response timeouts, and is additionally bounded by an overall deadline, so a
//! dead Redis answers [`StoreError::Unavailable`] quickly instead of hanging a request.

pub mod budget;
pub mod fraud;
pub mod otp;
pub mod refresh;
pub mod service_tokens;

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use otp::OtpStore;
pub use refresh::RefreshStore;

use crate::error::{AuthError, Dependency};

/// The default key prefix (`REDIS_KEY_PREFIX`).
pub const DEFAULT_KEY_PREFIX: &str = "refsys:auth:";

/// A Redis call that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused, dropped or did not answer in time.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered something our scripts never return.
    #[error("unexpected redis reply: {0}")]
    Corrupt(String),
}

impl From<redis::RedisError> for StoreError {
    fn from(err: redis::RedisError) -> Self {
        if err.kind() == redis::ErrorKind::TypeError {
            Self::Corrupt(err.to_string())
        } else {
            Self::Unavailable(err.to_string())
        }
    }
}

impl From<StoreError> for AuthError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(detail) => AuthError::unavailable(Dependency::Redis, detail),
            StoreError::Corrupt(detail) => AuthError::internal(detail),
        }
    }
}

/// How long one Redis call may take in total (connect included) before it fails.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects to `url` with a [`ConnectionManager`] whose connection and response timeouts are
/// `timeout`, retrying a lost connection briefly in the background.
pub async fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, StoreError> {
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
            .map_err(StoreError::from)
    })
    .await
}

/// Runs one store call with an overall deadline.
pub(crate) async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "no answer within {limit:?}"
        )))
    })
}

/// Checks that a key prefix cannot break the hash tags (no braces).
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.contains(['{', '}'])
}

/// A random token of `bytes` bytes as lowercase hex (claim and reservation ids, family ids).
pub(crate) fn random_id(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    crate::otp::hex(&buf)
}

/// Milliseconds as a [`Duration`], clamping the negative "no TTL" replies of PTTL to zero.
pub(crate) fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

pub(crate) fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Whether Redis answers a PING within `timeout` (the readiness check).
pub async fn is_reachable(conn: &ConnectionManager, timeout: Duration) -> bool {
    let mut conn = conn.clone();
    bounded(timeout, async {
        let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(pong)
    })
    .await
    .is_ok()
}
