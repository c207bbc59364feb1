//! Fixed-window counters that admit an event or refuse it with the time left in the window:
//! the per-client and SMS send budgets, and the per-client failure budget.
//!
//! Each counter is its own key with its own hash tag, so one request's counters may live on
//! different Redis Cluster slots and cannot be updated by one script. They are admitted one at
//! a time, in order, and when one refuses, those already admitted are released again: a
//! refused request uses no budget. Between the two, a concurrent request may see a counter
//! one higher than it ends up; that errs towards refusing, never towards admitting more than
//! a budget allows.

use std::time::Duration;

use redis::Script;

use super::{RedisConnection, StoreError, millis, ms};
use crate::error::Limit;

// KEYS[1] the counter; KEYS[2] (optional, same hash tag) a gate whose existence refuses.
// ARGV: max, window ms. Returns {0, 0} admitted, {1, ms} counter full, {2, ms} gate closed.
pub(crate) const ADMIT: &str = r#"
if KEYS[2] then
  local gate = redis.call('PTTL', KEYS[2])
  if gate > 0 then return {2, gate} end
end
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]); ttl = tonumber(ARGV[2]) end
  return {1, ttl}
end
redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {0, 0}
"#;

/// Decrements a counter that still exists (never creates one without a TTL).
pub(crate) const RELEASE: &str = r#"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then redis.call('DECR', KEYS[1]) end
return 0
"#;

/// One counter of a request.
#[derive(Debug, Clone)]
pub struct Budget {
    pub key: String,
    pub max: u32,
    pub window: Duration,
    /// What a full counter is reported as.
    pub limit: Limit,
    /// A key (same hash tag) whose existence refuses, reported as `gate_limit`.
    pub gate: Option<(String, Limit)>,
}

/// The scripts, loaded once.
pub struct BudgetScripts {
    admit: Script,
    release: Script,
}

impl Default for BudgetScripts {
    fn default() -> Self {
        Self {
            admit: Script::new(ADMIT),
            release: Script::new(RELEASE),
        }
    }
}

impl BudgetScripts {
    /// Admits one event on every budget, in order. On a refusal, releases those admitted and
    /// returns which limit refused and for how long; on a Redis error, releases what it can and
    /// returns the error.
    pub async fn admit_all(
        &self,
        conn: &mut RedisConnection,
        budgets: &[Budget],
    ) -> Result<Option<(Limit, Duration)>, StoreError> {
        for (index, budget) in budgets.iter().enumerate() {
            let mut call = self.admit.key(&budget.key);
            if let Some((gate, _)) = &budget.gate {
                call.key(gate);
            }
            let answer: Result<(i64, i64), StoreError> = call
                .arg(budget.max)
                .arg(ms(budget.window))
                .invoke_async(conn)
                .await
                .map_err(StoreError::from);
            let refusal = match answer {
                Ok((0, _)) => continue,
                Ok((1, wait)) => Ok((budget.limit, millis(wait))),
                Ok((2, wait)) => Ok((
                    budget
                        .gate
                        .as_ref()
                        .map_or(budget.limit, |(_, limit)| *limit),
                    millis(wait),
                )),
                Ok((other, _)) => Err(StoreError::Corrupt(format!(
                    "budget script returned status {other}"
                ))),
                Err(err) => Err(err),
            };
            let released = self.release_all(conn, &budgets[..index]).await;
            let refusal = refusal?;
            released?;
            return Ok(Some(refusal));
        }
        Ok(None)
    }

    /// Gives back one event on each budget.
    pub async fn release_all(
        &self,
        conn: &mut RedisConnection,
        budgets: &[Budget],
    ) -> Result<(), StoreError> {
        let mut first_error = None;
        for budget in budgets {
            let released: Result<i64, _> = self.release.key(&budget.key).invoke_async(conn).await;
            if let Err(err) = released {
                first_error.get_or_insert(StoreError::from(err));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
