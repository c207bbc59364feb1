//! Pending sign-in codes in Redis, with their send limits, attempt counters and lockout.
//!
//! Keys (prefix `P`, phone `+79601233017`):
//!
//! | key | type | holds | TTL |
//! |---|---|---|---|
//! | `P{+79601233017}:otp` | hash | `h` code hash, `a` wrong attempts, `r` send reservation id, `c`/`ce` claim id and lease end (ms) | code TTL |
//! | `P{+79601233017}:cooldown` | string | reservation id of the last send | resend cooldown |
//! | `P{+79601233017}:sends` | counter | sends in the current hourly window | window, from the first send |
//! | `P{+79601233017}:fails` | counter | failed verifications in the current daily window | window, from the first failure |
//! | `P{client:<addr>}:sends` | counter | sends requested by one client address | window, from the first send |
//!
//! Windows are fixed, starting at the first event, and implemented with key TTLs, so the
//! retry-after of a refusal is the remaining TTL of the counter that refused, and no clock of
//! ours is involved. The claim lease uses Redis' own `TIME`.
//!
//! **Cluster.** The phone keys share the phone's hash tag, so the send, verify, consume and
//! release scripts each touch one slot. The per-client counter cannot share it (it spans
//! phones), so it is admitted by its own single-key script *before* the phone script and
//! released again if the phone script refuses or the SMS fails. Between the two calls the
//! client counter may briefly count a send that is then refused; this only errs towards
//! refusing, never towards letting more sends through.
//!
//! **Sending** is store → send SMS → roll back on failure: [`OtpStore::begin_send`] admits the
//! send and stores the new code's hash in one script, and [`OtpStore::rollback_send`] undoes
//! exactly that admission (counters, cooldown, and the code if it is still the one stored) when
//! the SMS provider fails, so a provider outage never counts against the caller.
//!
//! **Verifying** is two-phase: [`OtpStore::verify`] checks, counts and — for the right code —
//! *claims* the code with a short lease in one script, then the caller either
//! [`OtpStore::consume`]s the claim (sign-in finished) or [`OtpStore::release`]s it (a
//! dependency was down; the code stays usable until it expires). While a claim is live,
//! other verifications are refused, and only the holder of the latest claim can consume, so
//! at most one verification of a code ever succeeds. Consuming a code also ends the resend
//! cooldown of the send that delivered it (nothing is pending any more); the hourly caps still
//! count that send.

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use super::{StoreError, bounded, millis, ms, random_id};
use crate::error::Limit;
use crate::phone::PhoneNumber;

/// The limits the store enforces. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct OtpLimits {
    /// `OTP_TTL_SECONDS` (300): how long a code is accepted.
    pub code_ttl: Duration,
    /// `OTP_RESEND_COOLDOWN_SECONDS` (60).
    pub resend_cooldown: Duration,
    /// `OTP_MAX_SENDS_PER_PHONE_PER_HOUR` (5).
    pub max_sends_per_phone: u32,
    /// `OTP_MAX_SENDS_PER_CLIENT_PER_HOUR` (30).
    pub max_sends_per_client: u32,
    /// The window of both send caps (one hour).
    pub send_window: Duration,
    /// `OTP_MAX_ATTEMPTS` (5): wrong tries after which a code is burned.
    pub max_attempts: u32,
    /// `OTP_MAX_FAILED_PER_PHONE_PER_DAY` (10): failed verifications after which the phone is
    /// locked until its window passes.
    pub max_failed_per_phone: u32,
    /// The window of the failure count (24 hours).
    pub failure_window: Duration,
    /// How long a verification may hold a code between verify and consume/release.
    pub claim_lease: Duration,
}

impl Default for OtpLimits {
    fn default() -> Self {
        Self {
            code_ttl: Duration::from_secs(300),
            resend_cooldown: Duration::from_secs(60),
            max_sends_per_phone: 5,
            max_sends_per_client: 30,
            send_window: Duration::from_secs(3600),
            max_attempts: 5,
            max_failed_per_phone: 10,
            failure_window: Duration::from_secs(24 * 3600),
            claim_lease: Duration::from_secs(15),
        }
    }
}

/// An admitted send. Pass it to [`OtpStore::rollback_send`] if the SMS could not be sent.
#[derive(Debug)]
#[must_use = "roll the reservation back if the SMS fails"]
pub struct SendReservation {
    phone: PhoneNumber,
    client: Option<String>,
    id: String,
    /// How long the stored code is accepted.
    pub code_ttl: Duration,
    /// How long until another send to this phone may be admitted.
    pub next_send_in: Duration,
}

/// The answer to a send request.
#[derive(Debug)]
pub enum SendAdmission {
    Admitted(SendReservation),
    Refused { limit: Limit, retry_after: Duration },
}

/// A verified code, held under a lease until consumed or released.
#[derive(Debug)]
#[must_use = "consume the claim after sign-in, or release it"]
pub struct Claim {
    phone: PhoneNumber,
    id: String,
}

impl Claim {
    pub fn phone(&self) -> &PhoneNumber {
        &self.phone
    }
}

/// The answer to a verification.
#[derive(Debug)]
pub enum VerifyOutcome {
    /// The code is right; it is now claimed.
    Claimed(Claim),
    /// The code is wrong; `attempts_left` more wrong tries burn it.
    Wrong { attempts_left: u32 },
    /// No code is pending: never sent, expired, or consumed.
    NoCode,
    /// Another verification holds the code right now.
    Busy,
    /// Too many wrong tries; a new code can be sent after `retry_after` (zero: now).
    Burned { retry_after: Duration },
    /// Too many failed verifications for this phone; locked for `retry_after`.
    LockedOut { retry_after: Duration },
}

const CLIENT_ADMIT: &str = r#"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]); ttl = tonumber(ARGV[2]) end
  return ttl
end
redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#;

/// Decrements a counter that still exists (never creates one without a TTL).
const COUNTER_RELEASE: &str = r#"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then redis.call('DECR', KEYS[1]) end
return 0
"#;

// KEYS: otp, cooldown, sends, fails. ARGV: code hash, code ttl ms, cooldown ms, max sends,
// window ms, reservation id, max fails. Returns {0, 0} admitted, {1, ms} cooldown, {2, ms}
// hourly cap, {3, ms} verification locked (a code could not be used, so none is sent).
const SEND_ADMIT: &str = r#"
local fails = tonumber(redis.call('GET', KEYS[4]) or '0')
if fails >= tonumber(ARGV[7]) then
  local ttl = redis.call('PTTL', KEYS[4])
  if ttl > 0 then return {3, ttl} end
end
local cooldown = redis.call('PTTL', KEYS[2])
if cooldown > 0 then return {1, cooldown} end
local sends = tonumber(redis.call('GET', KEYS[3]) or '0')
if sends >= tonumber(ARGV[4]) then
  local ttl = redis.call('PTTL', KEYS[3])
  if ttl < 0 then redis.call('PEXPIRE', KEYS[3], ARGV[5]); ttl = tonumber(ARGV[5]) end
  return {2, ttl}
end
redis.call('INCR', KEYS[3])
if redis.call('PTTL', KEYS[3]) < 0 then redis.call('PEXPIRE', KEYS[3], ARGV[5]) end
redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'h', ARGV[1], 'a', 0, 'r', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {0, 0}
"#;

// KEYS: otp, cooldown, sends. ARGV: reservation id.
const SEND_ROLLBACK: &str = r#"
if redis.call('HGET', KEYS[1], 'r') == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local n = tonumber(redis.call('GET', KEYS[3]) or '0')
if n > 0 then redis.call('DECR', KEYS[3]) end
return 0
"#;

// KEYS: otp, fails, cooldown. ARGV: code hash, max attempts, max fails, fail window ms,
// claim id, lease ms. Returns {0,0} claimed, {1,0} no code, {2,left} wrong, {3,ms} burned,
// {4,ms} locked out, {5,ms} claimed by someone else.
const VERIFY: &str = r#"
local fails = tonumber(redis.call('GET', KEYS[2]) or '0')
if fails >= tonumber(ARGV[3]) then
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl < 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]); ttl = tonumber(ARGV[4]) end
  return {4, ttl}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {1, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_end = tonumber(redis.call('HGET', KEYS[1], 'ce') or '0')
if lease_end > now then return {5, lease_end - now} end
local max_attempts = tonumber(ARGV[2])
local attempts = tonumber(redis.call('HGET', KEYS[1], 'a') or '0')
if attempts >= max_attempts then
  local wait = redis.call('PTTL', KEYS[3])
  if wait < 0 then wait = 0 end
  return {3, wait}
end
if redis.call('HGET', KEYS[1], 'h') ~= ARGV[1] then
  attempts = redis.call('HINCRBY', KEYS[1], 'a', 1)
  redis.call('INCR', KEYS[2])
  if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
  return {2, math.max(max_attempts - attempts, 0)}
end
redis.call('HSET', KEYS[1], 'c', ARGV[5], 'ce', now + tonumber(ARGV[6]))
return {0, 0}
"#;

// KEYS: otp, cooldown. ARGV: claim id. Returns 1 when the claim was still held and the code
// is gone. The cooldown of the send that delivered this code ends too: it guards against
// resending a pending code, and there is none left.
const CONSUME: &str = r#"
if redis.call('HGET', KEYS[1], 'c') == ARGV[1] then
  if redis.call('GET', KEYS[2]) == redis.call('HGET', KEYS[1], 'r') then
    redis.call('DEL', KEYS[2])
  end
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

// KEYS: otp (cooldown unused). ARGV: claim id. Returns 1 when the claim was still held and is
// now dropped.
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'c') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'c', 'ce')
  return 1
end
return 0
"#;

/// Pending codes and their limits in Redis. Cheap to clone.
#[derive(Clone)]
pub struct OtpStore {
    conn: ConnectionManager,
    prefix: String,
    limits: OtpLimits,
    call_timeout: Duration,
    scripts: std::sync::Arc<Scripts>,
}

struct Scripts {
    client_admit: Script,
    counter_release: Script,
    send_admit: Script,
    send_rollback: Script,
    verify: Script,
    consume: Script,
    release: Script,
}

impl OtpStore {
    /// A store using `conn`, keys under `prefix` (no braces; see [`super::valid_prefix`]).
    pub fn new(
        conn: ConnectionManager,
        prefix: impl Into<String>,
        limits: OtpLimits,
        call_timeout: Duration,
    ) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            limits,
            call_timeout,
            scripts: std::sync::Arc::new(Scripts {
                client_admit: Script::new(CLIENT_ADMIT),
                counter_release: Script::new(COUNTER_RELEASE),
                send_admit: Script::new(SEND_ADMIT),
                send_rollback: Script::new(SEND_ROLLBACK),
                verify: Script::new(VERIFY),
                consume: Script::new(CONSUME),
                release: Script::new(RELEASE),
            }),
        }
    }

    pub fn limits(&self) -> &OtpLimits {
        &self.limits
    }

    fn phone_key(&self, phone: &PhoneNumber, what: &str) -> String {
        format!("{}{{{}}}:{what}", self.prefix, phone.e164())
    }

    fn client_key(&self, client: &str) -> String {
        let client: String = client.chars().filter(|c| !matches!(c, '{' | '}')).collect();
        format!("{}{{client:{client}}}:sends", self.prefix)
    }

    /// Admits a send to `phone` requested by `client` (the caller's address; `None` skips the
    /// per-client cap) — refused while the phone's verification is locked out, during the resend
    /// cooldown, and past the hourly caps — and stores `code_hash` as the phone's pending code with a fresh attempt
    /// counter, replacing any earlier code.
    pub async fn begin_send(
        &self,
        phone: &PhoneNumber,
        client: Option<&str>,
        code_hash: &str,
    ) -> Result<SendAdmission, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let l = &self.limits;
            let client_key = client.map(|c| self.client_key(c));
            if let Some(key) = &client_key {
                let wait: i64 = self
                    .scripts
                    .client_admit
                    .key(key)
                    .arg(l.max_sends_per_client)
                    .arg(ms(l.send_window))
                    .invoke_async(&mut conn)
                    .await?;
                if wait > 0 {
                    return Ok(SendAdmission::Refused {
                        limit: Limit::ClientHourlySends,
                        retry_after: millis(wait),
                    });
                }
            }
            let id = random_id(16);
            let admitted: Result<(i64, i64), StoreError> = self
                .scripts
                .send_admit
                .key(self.phone_key(phone, "otp"))
                .key(self.phone_key(phone, "cooldown"))
                .key(self.phone_key(phone, "sends"))
                .key(self.phone_key(phone, "fails"))
                .arg(code_hash)
                .arg(ms(l.code_ttl))
                .arg(ms(l.resend_cooldown))
                .arg(l.max_sends_per_phone)
                .arg(ms(l.send_window))
                .arg(&id)
                .arg(l.max_failed_per_phone)
                .invoke_async(&mut conn)
                .await
                .map_err(StoreError::from);
            let refused = match admitted {
                Ok((0, _)) => {
                    return Ok(SendAdmission::Admitted(SendReservation {
                        phone: phone.clone(),
                        client: client_key,
                        id,
                        code_ttl: l.code_ttl,
                        next_send_in: l.resend_cooldown,
                    }));
                }
                Ok((1, wait)) => Ok((Limit::ResendCooldown, millis(wait))),
                Ok((2, wait)) => Ok((Limit::PhoneHourlySends, millis(wait))),
                Ok((3, wait)) => Ok((Limit::PhoneDailyFailures, millis(wait))),
                Ok((other, _)) => Err(StoreError::Corrupt(format!(
                    "send script returned status {other}"
                ))),
                Err(err) => Err(err),
            };
            // The phone refused (or Redis failed): this send must not count for the client.
            if let Some(key) = &client_key {
                let released = self.release_counter(&mut conn, key).await;
                if refused.is_ok() {
                    released?;
                }
            }
            let (limit, retry_after) = refused?;
            Ok(SendAdmission::Refused { limit, retry_after })
        })
        .await
    }

    async fn release_counter(
        &self,
        conn: &mut ConnectionManager,
        key: &str,
    ) -> Result<(), StoreError> {
        let _: i64 = self
            .scripts
            .counter_release
            .key(key)
            .invoke_async(conn)
            .await?;
        Ok(())
    }

    /// Undoes an admitted send whose SMS failed: the send no longer counts against the phone
    /// or the client, the cooldown is lifted, and the stored code is removed if it is still the
    /// one this send stored.
    pub async fn rollback_send(&self, reservation: SendReservation) -> Result<(), StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let phone = &reservation.phone;
            let _: i64 = self
                .scripts
                .send_rollback
                .key(self.phone_key(phone, "otp"))
                .key(self.phone_key(phone, "cooldown"))
                .key(self.phone_key(phone, "sends"))
                .arg(&reservation.id)
                .invoke_async(&mut conn)
                .await?;
            if let Some(key) = &reservation.client {
                self.release_counter(&mut conn, key).await?;
            }
            Ok(())
        })
        .await
    }

    /// Checks `code_hash` against the phone's pending code, counting a wrong try, in one
    /// script. The right code is claimed, not deleted: finish with [`OtpStore::consume`] or
    /// [`OtpStore::release`].
    pub async fn verify(
        &self,
        phone: &PhoneNumber,
        code_hash: &str,
    ) -> Result<VerifyOutcome, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let l = &self.limits;
            let id = random_id(16);
            let (status, value): (i64, i64) = self
                .scripts
                .verify
                .key(self.phone_key(phone, "otp"))
                .key(self.phone_key(phone, "fails"))
                .key(self.phone_key(phone, "cooldown"))
                .arg(code_hash)
                .arg(l.max_attempts)
                .arg(l.max_failed_per_phone)
                .arg(ms(l.failure_window))
                .arg(&id)
                .arg(ms(l.claim_lease))
                .invoke_async(&mut conn)
                .await?;
            Ok(match status {
                0 => VerifyOutcome::Claimed(Claim {
                    phone: phone.clone(),
                    id,
                }),
                1 => VerifyOutcome::NoCode,
                2 => VerifyOutcome::Wrong {
                    attempts_left: u32::try_from(value).unwrap_or(0),
                },
                3 => VerifyOutcome::Burned {
                    retry_after: millis(value),
                },
                4 => VerifyOutcome::LockedOut {
                    retry_after: millis(value),
                },
                5 => VerifyOutcome::Busy,
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "verify script returned status {other}"
                    )));
                }
            })
        })
        .await
    }

    /// Uses up a claimed code and ends the resend cooldown of the send that delivered it (the
    /// hourly caps still count that send), so signing in again right away, e.g. on another
    /// device, works. `false` when the claim was lost (its lease ran out and another
    /// verification claimed the code, or the code expired or was replaced): the sign-in must
    /// then fail, or two verifications could both succeed.
    pub async fn consume(&self, claim: Claim) -> Result<bool, StoreError> {
        self.finish(&self.scripts.consume, claim).await
    }

    /// Gives a claimed code back, unchanged, so a retry can use it within its TTL. `false`
    /// when the claim was already lost.
    pub async fn release(&self, claim: Claim) -> Result<bool, StoreError> {
        self.finish(&self.scripts.release, claim).await
    }

    async fn finish(&self, script: &Script, claim: Claim) -> Result<bool, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let done: i64 = script
                .key(self.phone_key(&claim.phone, "otp"))
                .key(self.phone_key(&claim.phone, "cooldown"))
                .arg(&claim.id)
                .invoke_async(&mut conn)
                .await?;
            Ok(done == 1)
        })
        .await
    }
}
