//! The conversion guard (`SMS_FRAUD_GUARD`): per region, over a sliding hour, codes sent
//! against codes verified. People who ask for a code almost always type it in; an SMS-pumping
//! ring never does. When a region has at least `SMS_FRAUD_MIN_SENDS` sends in the hour and
//! fewer than `SMS_FRAUD_MIN_CONVERSION` of them verified, the guard trips: `enforce`
//! suspends sends to the region for `SMS_FRAUD_BLOCK_SECONDS`, `monitor` only logs and counts.
//!
//! Keys (prefix `P`, region `RU`; all share the tag `{sms:RU}` with the region's send budget,
//! so the suspension is checked in the same script that admits the send):
//!
//! | key | type | holds | TTL |
//! |---|---|---|---|
//! | `P{sms:RU}:conv` | hash | `s:<minute>` sends and `v:<minute>` verifications per minute of the window | window + 1 minute, renewed |
//! | `P{sms:RU}:suspended` | string | set when `enforce` trips | block duration |
//! | `P{sms:RU}:suspect` | string | set when `monitor` trips (so it reports once per block duration) | block duration |
//!
//! Minutes come from the service's injected clock, so tests can move the window.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;

use super::{RedisConnection, StoreError, ms};

/// `SMS_FRAUD_GUARD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FraudMode {
    Off,
    Monitor,
    Enforce,
}

impl FraudMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Monitor => "monitor",
            Self::Enforce => "enforce",
        }
    }
}

/// The guard's settings. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct FraudSettings {
    /// `SMS_FRAUD_GUARD` (monitor).
    pub mode: FraudMode,
    /// `SMS_FRAUD_MIN_SENDS` (50): below this many sends in the window a region is not judged.
    pub min_sends: u32,
    /// `SMS_FRAUD_MIN_CONVERSION` (0.2): verified / sent below this trips the guard.
    pub min_conversion: f64,
    /// `SMS_FRAUD_BLOCK_SECONDS` (3600).
    pub block: Duration,
    /// The sliding window (one hour), in whole minutes.
    pub window_minutes: u32,
}

impl Default for FraudSettings {
    fn default() -> Self {
        Self {
            mode: FraudMode::Monitor,
            min_sends: 50,
            min_conversion: 0.2,
            block: Duration::from_secs(3600),
            window_minutes: 60,
        }
    }
}

// KEYS: conv, trip marker. ARGV: 's' or 'v', minute now, window minutes, min sends,
// min conversion, block ms. Returns {sends, verified, tripped} over the window, this event
// included; tripped is 1 only for the send that trips the guard.
pub(crate) const RECORD: &str = r#"
local now = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 1)
redis.call('PEXPIRE', KEYS[1], (window + 1) * 60000)
local all = redis.call('HGETALL', KEYS[1])
local sends, verified = 0, 0
for i = 1, #all, 2 do
  local kind, minute = string.match(all[i], '^(%a):(%d+)$')
  minute = tonumber(minute)
  if minute == nil or minute <= now - window then
    redis.call('HDEL', KEYS[1], all[i])
  elseif kind == 's' then
    sends = sends + tonumber(all[i + 1])
  else
    verified = verified + tonumber(all[i + 1])
  end
end
local tripped = 0
if ARGV[1] == 's' and sends >= tonumber(ARGV[4]) and verified < sends * tonumber(ARGV[5]) then
  if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[6]) then tripped = 1 end
end
return {sends, verified, tripped}
"#;

/// A region's standing after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionStanding {
    pub sends: u64,
    pub verified: u64,
    /// This send tripped the guard (reported once per block duration).
    pub tripped: bool,
}

pub struct FraudGuard {
    settings: FraudSettings,
    record: Script,
}

impl FraudGuard {
    pub fn new(settings: FraudSettings) -> Self {
        Self {
            settings,
            record: Script::new(RECORD),
        }
    }

    pub fn settings(&self) -> &FraudSettings {
        &self.settings
    }

    /// The key whose existence refuses sends to a region: only in `enforce`.
    pub fn gate_key(&self, region_tag: &str) -> Option<String> {
        (self.settings.mode == FraudMode::Enforce).then(|| format!("{region_tag}:suspended"))
    }

    fn marker_key(&self, region_tag: &str) -> String {
        match self.settings.mode {
            FraudMode::Enforce => format!("{region_tag}:suspended"),
            FraudMode::Monitor | FraudMode::Off => format!("{region_tag}:suspect"),
        }
    }

    /// Counts a delivered code (`sent`) or a verified one for the region whose keys start with
    /// `region_tag`. `None` when the guard is off.
    pub async fn record(
        &self,
        conn: &mut RedisConnection,
        region_tag: &str,
        sent: bool,
        now: SystemTime,
    ) -> Result<Option<RegionStanding>, StoreError> {
        if self.settings.mode == FraudMode::Off {
            return Ok(None);
        }
        let minute = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 60;
        let (sends, verified, tripped): (u64, u64, i64) = self
            .record
            .key(format!("{region_tag}:conv"))
            .key(self.marker_key(region_tag))
            .arg(if sent { "s" } else { "v" })
            .arg(minute)
            .arg(self.settings.window_minutes)
            .arg(self.settings.min_sends)
            .arg(self.settings.min_conversion)
            .arg(ms(self.settings.block))
            .invoke_async(conn)
            .await?;
        Ok(Some(RegionStanding {
            sends,
            verified,
            tripped: tripped == 1,
        }))
    }
}
