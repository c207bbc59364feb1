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
//! Every call goes through a [`RedisConnection`]: a [`redis::aio::ConnectionManager`] for one
//! endpoint or the native cluster client for a Redis Cluster ([`connection`]); both reconnect
//! by themselves and have connection and response timeouts, and every call is additionally
//! bounded by an overall deadline, so a dead Redis (or a cluster mid-failover) answers
//! [`StoreError::Unavailable`] quickly instead of hanging a request. Replies that only a bug
//! explains (a reply of the wrong shape, a script error, keys of one script in different
//! slots) are [`StoreError::Corrupt`] instead, so tests catch them rather than mistake them
//! for an outage.

pub mod budget;
pub mod connection;
pub mod fraud;
pub mod otp;
pub mod refresh;
pub mod service_tokens;
pub mod slots;

use std::future::Future;
use std::time::Duration;

pub use connection::{RedisConnection, RedisTarget, connect, connect_cluster, connect_to};
pub use otp::OtpStore;
pub use refresh::RefreshStore;

use crate::error::{AuthError, Dependency};

/// Every Lua script of the stores, by name, so a test can prove that each one ran (on a
/// cluster, where Redis itself refuses keys of one script in different slots).
pub const SCRIPTS: &[(&str, &str)] = &[
    ("budget admit", budget::ADMIT),
    ("budget release", budget::RELEASE),
    ("fraud record", fraud::RECORD),
    ("otp send admit", otp::SEND_ADMIT),
    ("otp send rollback", otp::SEND_ROLLBACK),
    ("otp verify", otp::VERIFY),
    ("otp consume", otp::CONSUME),
    ("otp release", otp::RELEASE),
    ("refresh create", refresh::CREATE),
    ("refresh rotate", refresh::ROTATE),
];

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

impl StoreError {
    /// The `kind` label of `refsys_redis_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::Corrupt(_) => "corrupt",
        }
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(err: redis::RedisError) -> Self {
        if is_bug(&err) {
            Self::Corrupt(err.to_string())
        } else {
            Self::Unavailable(err.to_string())
        }
    }
}

/// Whether `err` can only come from a bug on our side, however often it is retried: a reply
/// of the wrong shape, keys of one script in different cluster slots (`CROSSSLOT`, or a script
/// touching a key it did not declare), a failing script, a key of the wrong type. Everything
/// else — I/O errors and timeouts, `MOVED`/`ASK` left over after the client's retries,
/// `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, `LOADING`, `READONLY` (a replica during a
/// failover), `OOM`, `BUSY` — is Redis being unavailable for now.
fn is_bug(err: &redis::RedisError) -> bool {
    use redis::ErrorKind;
    match err.kind() {
        ErrorKind::TypeError | ErrorKind::CrossSlot | ErrorKind::ExecAbortError => true,
        // `ERR ...`: script errors and bad commands, except running out of connections.
        ErrorKind::ResponseError => !err
            .detail()
            .is_some_and(|detail| detail.contains("max number of clients")),
        ErrorKind::ExtensionError => err.code() == Some("WRONGTYPE"),
        _ => false,
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

/// Runs one store call with an overall deadline.
pub(crate) async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let result = tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "no answer within {limit:?}"
        )))
    });
    if let Err(err) = &result {
        crate::metrics::REDIS_ERRORS
            .with_label_values(&[err.kind()])
            .inc();
    }
    result
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

/// Whether Redis answers a PING within `timeout` (the readiness check; on a cluster, any one
/// node: see [`RedisConnection::ping`]).
pub async fn is_reachable(conn: &RedisConnection, timeout: Duration) -> bool {
    bounded(timeout, conn.ping()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failed_calls_are_counted_by_kind() {
        let count = |kind: &str| {
            crate::metrics::REDIS_ERRORS
                .with_label_values(&[kind])
                .get()
        };
        let before = (count("unavailable"), count("corrupt"));
        let hung = bounded(
            Duration::from_millis(1),
            std::future::pending::<Result<(), _>>(),
        );
        let hung = hung.await.unwrap_err();
        let corrupt = bounded(Duration::from_secs(1), async {
            Err::<(), _>(StoreError::Corrupt("a reply of the wrong shape".into()))
        })
        .await
        .unwrap_err();
        bounded(Duration::from_secs(1), async { Ok::<_, StoreError>(()) })
            .await
            .unwrap();
        // Other tests of this binary may count too, never uncount.
        assert!(count("unavailable") > before.0);
        assert!(count("corrupt") > before.1);
        for err in [hung, corrupt] {
            assert!(
                crate::metrics::REDIS_ERROR_KINDS.contains(&err.kind()),
                "{err:?}"
            );
        }
    }

    /// The error Redis would answer with `line` (as the wire carries it).
    fn server_error(line: &str) -> redis::RedisError {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .unwrap()
            .extract_error()
            .unwrap_err()
    }

    #[test]
    fn outages_are_unavailable_and_bugs_are_corrupt() {
        for line in [
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "CLUSTERDOWN The cluster is down",
            "CLUSTERDOWN Hash slot not served",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica.",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "BUSY Redis is busy running a script.",
            "NOSCRIPT No matching script.",
            "ERR max number of clients reached",
        ] {
            let err = StoreError::from(server_error(line));
            assert!(matches!(err, StoreError::Unavailable(_)), "{line}: {err:?}");
        }
        for err in [
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)),
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
        ] {
            assert!(matches!(StoreError::from(err), StoreError::Unavailable(_)));
        }

        for line in [
            "CROSSSLOT Keys in request don't hash to the same slot",
            "ERR Script attempted to access a non local key in a cluster node script",
            "ERR user_script:3: attempt to compare nil with number script: 1f0c, on @user_script:3.",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "EXECABORT Transaction discarded because of previous errors.",
        ] {
            let err = StoreError::from(server_error(line));
            assert!(matches!(err, StoreError::Corrupt(_)), "{line}: {err:?}");
        }
        let shape = redis::from_redis_value::<(i64, i64)>(&redis::Value::Int(1)).unwrap_err();
        assert!(matches!(StoreError::from(shape), StoreError::Corrupt(_)));
        let cross = slots::check_script(
            redis::cmd("EVALSHA")
                .arg("0")
                .arg(2)
                .arg("{a}x")
                .arg("{b}x"),
        )
        .unwrap_err();
        let status = tonic::Status::from(AuthError::from(StoreError::from(cross)));
        assert_eq!(status.code(), tonic::Code::Internal);
    }
}
