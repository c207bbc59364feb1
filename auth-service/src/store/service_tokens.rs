//! Admission of `IssueServiceToken` attempts: a budget of attempts and a budget of failures
//! (wrong secrets) per client id, in fixed one-minute windows ([`super::budget`]).
//!
//! Keys (prefix `P`; `shop` a configured client id):
//!
//! | key | type | holds | TTL |
//! |---|---|---|---|
//! | `P{svc:shop}:issues` | counter | attempts for the client id | window, from the first attempt |
//! | `P{svc:shop}:fails` | counter | failed attempts (wrong secret) for the client id | window, from the first failure |
//! | `P{svc:*}:issues`, `P{svc:*}:fails` | counters | the same for every id that is not configured, together | window |
//!
//! Keys are built only from configured ids (`*` cannot be part of one), so presenting made-up
//! ids never creates keys. A failure slot is taken before the secret is looked at and given
//! back when it was right: parallel guesses can never exceed the failure budget. When the
//! failure budget of an id is spent, every attempt for it is refused for the rest of the
//! window, the right secret included — otherwise the refusal itself would tell right from
//! wrong.

use std::sync::Arc;
use std::time::Duration;

use super::budget::{Budget, BudgetScripts};
use super::{RedisConnection, StoreError, bounded};
use crate::error::Limit;
use crate::service_clients::ServiceClient;

/// The limits of IssueServiceToken. `Default` gives the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceTokenLimits {
    /// `SERVICE_TOKEN_MAX_ISSUES_PER_CLIENT_PER_MINUTE`: attempts, right or wrong.
    pub max_issues: u32,
    /// `SERVICE_TOKEN_MAX_FAILURES_PER_CLIENT_PER_MINUTE`: wrong secrets.
    pub max_failures: u32,
    pub window: Duration,
}

impl Default for ServiceTokenLimits {
    fn default() -> Self {
        Self {
            max_issues: 60,
            max_failures: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// The hash tag of ids that are not configured.
const UNKNOWN_TAG: &str = "svc:*";

/// An admitted attempt: its failure slot is kept unless [`ServiceTokenStore::succeeded`]
/// gives it back.
#[must_use]
pub struct Attempt {
    failure: Budget,
}

pub enum Admission {
    Admitted(Attempt),
    Refused { limit: Limit, retry_after: Duration },
}

/// The attempt and failure budgets in Redis. Cheap to clone.
#[derive(Clone)]
pub struct ServiceTokenStore {
    conn: RedisConnection,
    prefix: String,
    limits: ServiceTokenLimits,
    call_timeout: Duration,
    scripts: Arc<BudgetScripts>,
}

impl ServiceTokenStore {
    /// A store using `conn`, keys under `prefix` (no braces; see [`super::valid_prefix`]).
    pub fn new(
        conn: RedisConnection,
        prefix: impl Into<String>,
        limits: ServiceTokenLimits,
        call_timeout: Duration,
    ) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            limits,
            call_timeout,
            scripts: Arc::new(BudgetScripts::default()),
        }
    }

    pub fn limits(&self) -> &ServiceTokenLimits {
        &self.limits
    }

    /// The key of `what` for `client`, or the shared one of unknown ids.
    pub fn key(&self, client: Option<&ServiceClient>, what: &str) -> String {
        match client {
            Some(client) => format!("{}{{svc:{}}}:{what}", self.prefix, client.id()),
            None => format!("{}{{{UNKNOWN_TAG}}}:{what}", self.prefix),
        }
    }

    /// Counts an attempt for `client` (`None`: an id that is not configured) and takes a
    /// failure slot, or says which budget refuses and for how long. A refused attempt uses
    /// nothing.
    pub async fn admit(&self, client: Option<&ServiceClient>) -> Result<Admission, StoreError> {
        let l = &self.limits;
        let budgets = [
            Budget {
                key: self.key(client, "issues"),
                max: l.max_issues,
                window: l.window,
                limit: Limit::ServiceTokenIssues,
                gate: None,
            },
            Budget {
                key: self.key(client, "fails"),
                max: l.max_failures,
                window: l.window,
                limit: Limit::ServiceTokenFailures,
                gate: None,
            },
        ];
        bounded(self.call_timeout, async move {
            let mut conn = self.conn.clone();
            Ok(match self.scripts.admit_all(&mut conn, &budgets).await? {
                Some((limit, retry_after)) => Admission::Refused { limit, retry_after },
                None => {
                    let [_, failure] = budgets;
                    Admission::Admitted(Attempt { failure })
                }
            })
        })
        .await
    }

    /// The secret was right: gives the attempt's failure slot back.
    pub async fn succeeded(&self, attempt: Attempt) -> Result<(), StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            self.scripts
                .release_all(&mut conn, std::slice::from_ref(&attempt.failure))
                .await
        })
        .await
    }
}
