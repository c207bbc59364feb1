//! Pending sign-in codes in Redis, with their send budgets, attempt counters and lockouts.
//!
//! Keys (prefix `P`, phone `+79601233017`, client `c` as [`ClientId::key`] spells it):
//!
//! | key | type | holds | TTL |
//! |---|---|---|---|
//! | `P{+79601233017}:otp` | hash | `h` code hash, `a` wrong attempts, `r` send reservation id, `c`/`ce` claim id and lease end (ms) | code TTL |
//! | `P{+79601233017}:cooldown` | string | reservation id of the last send | resend cooldown |
//! | `P{+79601233017}:sends` | counter | sends in the current hourly window | window, from the first send |
//! | `P{+79601233017}:fails` | counter | failed verifications of the phone, all clients | 24 h, from the first failure |
//! | `P{+79601233017}:fails:c` | counter | failed verifications of the phone by one client | 24 h, from the first failure |
//! | `P{client:c}:sends` | counter | sends requested by one client | 1 h |
//! | `P{client:c}:fails` | counter | failed verifications by one client, all phones | 1 h |
//! | `P{block:+7960123}:sends` | counter | sends to one block of 10,000 numbers | 1 h |
//! | `P{sms:RU}:sends` | counter | sends to one region (see also [`super::fraud`]) | 1 h |
//! | `P{sms:all}:sends` | counter | sends to every number together | 1 h |
//!
//! Windows are fixed, starting at the first event, and implemented with key TTLs, so the
//! retry-after of a refusal is the remaining TTL of the counter that refused. The claim lease
//! uses Redis' own `TIME`. Client keys are built from parsed addresses only ([`ClientId`]),
//! phone keys from the E.164 form: nothing a caller typed becomes part of a key.
//!
//! **Cluster.** The phone keys share the phone's hash tag, so the send, verify, consume and
//! release scripts each touch one slot. The budgets span phones and cannot share it: they are
//! admitted one by one *before* the phone script, and released again if a later one or the
//! phone script refuses, or the SMS fails ([`super::budget`]).
//!
//! **Sending** is store → send SMS → roll back on failure: [`OtpStore::begin_send`] admits the
//! send and stores the new code's hash, and [`OtpStore::rollback_send`] undoes exactly that
//! admission (budgets, cooldown, and the code if it is still the one stored) when the SMS
//! provider fails or runs out of time, so a refused or failed send costs the caller nothing.
//!
//! **Verifying** is two-phase: [`OtpStore::verify`] checks the lockouts, counts and — for the
//! right code — *claims* the code with a short lease in one script, then the caller either
//! [`OtpStore::consume`]s the claim (sign-in finished) or [`OtpStore::release`]s it (a
//! dependency was down; the code stays usable until it expires). While a claim is live,
//! other verifications are refused, and only the holder of the latest claim can consume, so
//! at most one verification of a code ever succeeds. Consuming a code also ends the resend
//! cooldown of the send that delivered it (nothing is pending any more); the hourly caps still
//! count that send.
//!
//! **Failures** count three ways: per client across phones (hourly), per phone and client
//! (daily) and per phone across clients (daily). Every failed verification counts, whether a
//! code was pending or not, so the answers and the counting reveal nothing about pending codes.
//! One client's wrong guesses lock only that client out of that phone; the owner, signing in
//! from another address, is locked out only when the phone's total cap is reached.

use std::time::{Duration, SystemTime};

use redis::Script;

use super::budget::{Budget, BudgetScripts};
use super::fraud::{FraudGuard, FraudSettings, RegionStanding};
use super::{RedisConnection, StoreError, bounded, millis, ms, random_id};
use crate::client::ClientId;
use crate::error::{Limit, Rejection};
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
    /// `SMS_MAX_SENDS_PER_HOUR` (10,000): every number together.
    pub max_sends_global: u32,
    /// `SMS_MAX_SENDS_PER_REGION_PER_HOUR` (1,000).
    pub max_sends_per_region: u32,
    /// `SMS_MAX_SENDS_PER_PREFIX_PER_HOUR` (20): one block of 10,000 consecutive numbers.
    pub max_sends_per_prefix: u32,
    /// The window of every send budget (one hour).
    pub send_window: Duration,
    /// `OTP_MAX_ATTEMPTS` (5): wrong tries after which a code is burned.
    pub max_attempts: u32,
    /// `OTP_MAX_FAILED_PER_CLIENT_PER_HOUR` (30): failed verifications from one client, all
    /// phones.
    pub max_failed_per_client: u32,
    /// The window of the per-client failure count (one hour).
    pub client_failure_window: Duration,
    /// `OTP_MAX_FAILED_PER_PHONE_PER_CLIENT_PER_DAY` (10).
    pub max_failed_per_phone_per_client: u32,
    /// `OTP_MAX_FAILED_PER_PHONE_PER_DAY` (100): failed verifications of one phone from all
    /// clients, after which the phone is locked until its window passes.
    pub max_failed_per_phone: u32,
    /// The window of both per-phone failure counts (24 hours).
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
            max_sends_global: 10_000,
            max_sends_per_region: 1_000,
            max_sends_per_prefix: 20,
            send_window: Duration::from_secs(3600),
            max_attempts: 5,
            max_failed_per_client: 30,
            client_failure_window: Duration::from_secs(3600),
            max_failed_per_phone_per_client: 10,
            max_failed_per_phone: 100,
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
    budgets: Vec<Budget>,
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
    /// The fixed code of a test number: nothing to claim or consume.
    FixedCodeAccepted,
    /// Not accepted; counted as a failure everywhere.
    Rejected(Rejection),
    /// A failure cap is reached: nothing was checked or counted.
    LockedOut { limit: Limit, retry_after: Duration },
}

// KEYS: otp, cooldown, sends, fails. ARGV: code hash, code ttl ms, cooldown ms, max sends,
// window ms, reservation id, max fails. Returns {0, 0} admitted, {1, ms} cooldown, {2, ms}
// hourly cap, {3, ms} verification locked (a code could not be used, so none is sent).
pub(crate) const SEND_ADMIT: &str = r#"
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
pub(crate) const SEND_ROLLBACK: &str = r#"
if redis.call('HGET', KEYS[1], 'r') == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local n = tonumber(redis.call('GET', KEYS[3]) or '0')
if n > 0 then redis.call('DECR', KEYS[3]) end
return 0
"#;

// KEYS: otp, phone fails, phone+client fails. ARGV: 1 code hash, 2 max attempts, 3 max phone
// fails, 4 fail window ms, 5 claim id, 6 lease ms, 7 max phone+client fails, 8 the fixed code
// hash of a test number ('' for others).
// Returns {0,0} claimed, {1,0} no code, {2,left} wrong, {4,ms} phone locked, {5,ms} claimed by
// someone else, {6,ms} phone locked for this client, {7,0} fixed code accepted.
pub(crate) const VERIFY: &str = r#"
local function locked(key, max)
  local n = tonumber(redis.call('GET', key) or '0')
  if n < tonumber(max) then return 0 end
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then redis.call('PEXPIRE', key, ARGV[4]); ttl = tonumber(ARGV[4]) end
  return ttl
end
local function fail()
  for _, key in ipairs({KEYS[2], KEYS[3]}) do
    redis.call('INCR', key)
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ARGV[4]) end
  end
end
local wait = locked(KEYS[2], ARGV[3])
if wait > 0 then return {4, wait} end
wait = locked(KEYS[3], ARGV[7])
if wait > 0 then return {6, wait} end
if ARGV[8] ~= '' then
  if ARGV[1] == ARGV[8] then return {7, 0} end
  fail()
  return {2, 0}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  fail()
  return {1, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_end = tonumber(redis.call('HGET', KEYS[1], 'ce') or '0')
if lease_end > now then
  fail()
  return {5, lease_end - now}
end
local max_attempts = tonumber(ARGV[2])
if redis.call('HGET', KEYS[1], 'h') ~= ARGV[1] then
  local attempts = redis.call('HINCRBY', KEYS[1], 'a', 1)
  fail()
  -- The last allowed wrong try burns the code: from now on it is as if none were pending.
  if attempts >= max_attempts then redis.call('DEL', KEYS[1]) end
  return {2, math.max(max_attempts - attempts, 0)}
end
redis.call('HSET', KEYS[1], 'c', ARGV[5], 'ce', now + tonumber(ARGV[6]))
return {0, 0}
"#;

// KEYS: otp, cooldown. ARGV: claim id. Returns 1 when the claim was still held and the code
// is gone. The cooldown of the send that delivered this code ends too: it guards against
// resending a pending code, and there is none left.
pub(crate) const CONSUME: &str = r#"
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
pub(crate) const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'c') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'c', 'ce')
  return 1
end
return 0
"#;

/// Pending codes and their limits in Redis. Cheap to clone.
#[derive(Clone)]
pub struct OtpStore {
    conn: RedisConnection,
    prefix: String,
    limits: OtpLimits,
    call_timeout: Duration,
    scripts: std::sync::Arc<Scripts>,
}

struct Scripts {
    budgets: BudgetScripts,
    fraud: FraudGuard,
    send_admit: Script,
    send_rollback: Script,
    verify: Script,
    consume: Script,
    release: Script,
}

impl OtpStore {
    /// A store using `conn`, keys under `prefix` (no braces; see [`super::valid_prefix`]).
    pub fn new(
        conn: RedisConnection,
        prefix: impl Into<String>,
        limits: OtpLimits,
        fraud: FraudSettings,
        call_timeout: Duration,
    ) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            limits,
            call_timeout,
            scripts: std::sync::Arc::new(Scripts {
                budgets: BudgetScripts::default(),
                fraud: FraudGuard::new(fraud),
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

    pub fn fraud_settings(&self) -> &FraudSettings {
        self.scripts.fraud.settings()
    }

    fn phone_key(&self, phone: &PhoneNumber, what: &str) -> String {
        format!("{}{{{}}}:{what}", self.prefix, phone.e164())
    }

    fn client_key(&self, client: &ClientId, what: &str) -> String {
        format!("{}{{client:{}}}:{what}", self.prefix, client.key())
    }

    /// The keys of a region share this tag: its send budget and the conversion guard's keys.
    fn region_tag(&self, phone: &PhoneNumber) -> String {
        format!("{}{{sms:{}}}", self.prefix, phone.region_code())
    }

    /// The send budgets of one request, narrowest first: a flood from one client or into one
    /// block is refused at its own counter before it touches the shared ones.
    fn send_budgets(&self, phone: &PhoneNumber, client: &ClientId) -> Vec<Budget> {
        let l = &self.limits;
        let region_tag = self.region_tag(phone);
        let budget = |key: String, max: u32, limit: Limit| Budget {
            key,
            max,
            window: l.send_window,
            limit,
            gate: None,
        };
        vec![
            budget(
                self.client_key(client, "sends"),
                l.max_sends_per_client,
                Limit::ClientHourlySends,
            ),
            budget(
                format!("{}{{block:{}}}:sends", self.prefix, phone.block()),
                l.max_sends_per_prefix,
                Limit::PrefixHourlySends,
            ),
            Budget {
                gate: self
                    .scripts
                    .fraud
                    .gate_key(&region_tag)
                    .map(|key| (key, Limit::FraudSuspected)),
                ..budget(
                    format!("{region_tag}:sends"),
                    l.max_sends_per_region,
                    Limit::RegionHourlySends,
                )
            },
            budget(
                format!("{}{{sms:all}}:sends", self.prefix),
                l.max_sends_global,
                Limit::GlobalHourlySends,
            ),
        ]
    }

    /// Admits a send to `phone` requested by `client` — refused by the first budget that is
    /// spent (client, block, region, everything), while the phone's verification is locked,
    /// during the resend cooldown and past the phone's hourly cap — and stores `code_hash` as
    /// the phone's pending code with a fresh attempt counter, replacing any earlier code. A
    /// refusal leaves every counter as it was.
    pub async fn begin_send(
        &self,
        phone: &PhoneNumber,
        client: &ClientId,
        code_hash: &str,
    ) -> Result<SendAdmission, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let l = &self.limits;
            let budgets = self.send_budgets(phone, client);
            if let Some((limit, retry_after)) =
                self.scripts.budgets.admit_all(&mut conn, &budgets).await?
            {
                return Ok(SendAdmission::Refused { limit, retry_after });
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
                        budgets,
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
            // The phone refused (or Redis failed): this send must not count anywhere.
            let released = self.scripts.budgets.release_all(&mut conn, &budgets).await;
            let (limit, retry_after) = refused?;
            released?;
            Ok(SendAdmission::Refused { limit, retry_after })
        })
        .await
    }

    /// Undoes an admitted send whose SMS failed: the send no longer counts against the phone,
    /// the client or any budget, the cooldown is lifted, and the stored code is removed if it
    /// is still the one this send stored.
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
            self.scripts
                .budgets
                .release_all(&mut conn, &reservation.budgets)
                .await
        })
        .await
    }

    /// Counts a delivered code for the conversion guard of the phone's region.
    pub async fn record_sent(
        &self,
        phone: &PhoneNumber,
        now: SystemTime,
    ) -> Result<Option<RegionStanding>, StoreError> {
        self.record_conversion(phone, true, now).await
    }

    /// Counts a verified code for the conversion guard of the phone's region.
    pub async fn record_verified(
        &self,
        phone: &PhoneNumber,
        now: SystemTime,
    ) -> Result<Option<RegionStanding>, StoreError> {
        self.record_conversion(phone, false, now).await
    }

    async fn record_conversion(
        &self,
        phone: &PhoneNumber,
        sent: bool,
        now: SystemTime,
    ) -> Result<Option<RegionStanding>, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            self.scripts
                .fraud
                .record(&mut conn, &self.region_tag(phone), sent, now)
                .await
        })
        .await
    }

    /// Checks `code_hash` against the phone's pending code (or against `fixed_code_hash`, the
    /// code of a test number), counting a failure for the client, the phone and the pair. The
    /// right code is claimed, not deleted: finish with [`OtpStore::consume`] or
    /// [`OtpStore::release`].
    pub async fn verify(
        &self,
        phone: &PhoneNumber,
        client: &ClientId,
        code_hash: &str,
        fixed_code_hash: Option<&str>,
    ) -> Result<VerifyOutcome, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let l = &self.limits;
            // A failure slot of the client is taken before looking, and given back unless the
            // verification fails: parallel guesses from one client can never exceed its cap.
            let client_failures = [Budget {
                key: self.client_key(client, "fails"),
                max: l.max_failed_per_client,
                window: l.client_failure_window,
                limit: Limit::ClientHourlyFailures,
                gate: None,
            }];
            if let Some((limit, retry_after)) = self
                .scripts
                .budgets
                .admit_all(&mut conn, &client_failures)
                .await?
            {
                return Ok(VerifyOutcome::LockedOut { limit, retry_after });
            }
            let id = random_id(16);
            let answer: Result<(i64, i64), StoreError> = self
                .scripts
                .verify
                .key(self.phone_key(phone, "otp"))
                .key(self.phone_key(phone, "fails"))
                .key(self.phone_key(phone, &format!("fails:{}", client.key())))
                .arg(code_hash)
                .arg(l.max_attempts)
                .arg(l.max_failed_per_phone)
                .arg(ms(l.failure_window))
                .arg(&id)
                .arg(ms(l.claim_lease))
                .arg(l.max_failed_per_phone_per_client)
                .arg(fixed_code_hash.unwrap_or(""))
                .invoke_async(&mut conn)
                .await
                .map_err(StoreError::from);
            let outcome = match answer {
                Ok((0, _)) => Ok(VerifyOutcome::Claimed(Claim {
                    phone: phone.clone(),
                    id,
                })),
                Ok((1, _)) => Ok(VerifyOutcome::Rejected(Rejection::NoCode)),
                Ok((2, _)) => Ok(VerifyOutcome::Rejected(Rejection::Wrong)),
                Ok((4, wait)) => Ok(VerifyOutcome::LockedOut {
                    limit: Limit::PhoneDailyFailures,
                    retry_after: millis(wait),
                }),
                Ok((5, _)) => Ok(VerifyOutcome::Rejected(Rejection::Busy)),
                Ok((6, wait)) => Ok(VerifyOutcome::LockedOut {
                    limit: Limit::PhoneClientDailyFailures,
                    retry_after: millis(wait),
                }),
                Ok((7, _)) => Ok(VerifyOutcome::FixedCodeAccepted),
                Ok((other, _)) => Err(StoreError::Corrupt(format!(
                    "verify script returned status {other}"
                ))),
                Err(err) => Err(err),
            };
            if !matches!(outcome, Ok(VerifyOutcome::Rejected(_))) {
                let released = self
                    .scripts
                    .budgets
                    .release_all(&mut conn, &client_failures)
                    .await;
                if outcome.is_ok() {
                    released?;
                }
            }
            outcome
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
