//! auth-service settings, read from the environment (or any [`Source`], so tests never touch
//! the process environment), each with a documented default and validated at startup. A bad
//! value is a [`ConfigError`] whose `Display` is one line naming the key.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `AUTH_GRPC_ADDR` | `0.0.0.0:50051` | where the gRPC server listens |
//! | `REDIS_URL` | `redis://127.0.0.1:6379` | Redis holding codes, limits and refresh tokens: one endpoint (`rediss://` for TLS) |
//! | `REDIS_CLUSTER_URLS` | unset: `REDIS_URL` | a Redis Cluster instead: seed node URLs, comma-separated (`redis://:pw@10.0.0.1:6379,redis://:pw@10.0.0.2:6379`); one answering is enough, the rest is discovered. All seeds share one password and scheme; database 0 only. When set, `REDIS_URL` is ignored |
//! | `REDIS_KEY_PREFIX` | `refsys:auth:` | prefix of every key (no braces) |
//! | `REFERRAL_GRPC_URL` | `http://127.0.0.1:50052` | referral-service, for `UserDirectory.EnsureUser` |
//! | `JWT_SIGNING_KEY_FILE` | unset: ephemeral dev key + warning | Ed25519 private key, PKCS#8 PEM |
//! | `JWT_PREVIOUS_PUBLIC_KEYS` | none | comma-separated SPKI PEM files of keys still accepted |
//! | `JWT_ISSUER` | `refsys-auth` | `iss` of minted tokens |
//! | `JWT_AUDIENCE` | `refsys` | `aud` of access tokens |
//! | `ACCESS_TOKEN_TTL_SECONDS` | `900` | 60..=86400 |
//! | `REFRESH_TOKEN_TTL_SECONDS` | `2592000` (30 days) | one refresh token's life, 60..=31536000 |
//! | `REFRESH_TOKEN_MAX_LIFETIME_SECONDS` | `7776000` (90 days) | a session's absolute end after sign-in, 1..=63072000 |
//! | `REFRESH_REUSE_GRACE_SECONDS` | `10` | a just-rotated token replays its rotation this long, 0..=300 |
//! | `OTP_LENGTH` | `4` | digits per code, 4..=8 |
//! | `OTP_TTL_SECONDS` | `300` | how long a code is accepted, 10..=3600 |
//! | `OTP_MAX_ATTEMPTS` | `5` | wrong tries that burn a code, 1..=20 |
//! | `OTP_RESEND_COOLDOWN_SECONDS` | `60` | between sends to one phone, 1..=3600 |
//! | `OTP_MAX_SENDS_PER_PHONE_PER_HOUR` | `5` | 1..=100 |
//! | `OTP_MAX_SENDS_PER_CLIENT_PER_HOUR` | `30` | per client address (IPv6: per /64), 1..=1000000 |
//! | `OTP_MAX_FAILED_PER_CLIENT_PER_HOUR` | `30` | failed verifications from one client across all phones, 1..=1000000 |
//! | `OTP_MAX_FAILED_PER_PHONE_PER_CLIENT_PER_DAY` | `10` | failed verifications of one phone from one client, 1..=1000 |
//! | `OTP_MAX_FAILED_PER_PHONE_PER_DAY` | `100` | failed verifications of one phone from all clients before it is locked for the rest of its 24 h window, 1..=100000 |
//! | `SMS_ALLOWED_REGIONS` | unset: all | ISO 3166-1 alpha-2 codes, comma-separated |
//! | `SMS_ALLOWED_NUMBER_TYPES` | `mobile,fixed_line_or_mobile` | libphonenumber types, snake case |
//! | `SMS_MAX_SENDS_PER_HOUR` | `10000` | SMS to all numbers together, 1..=100000000 |
//! | `SMS_MAX_SENDS_PER_REGION_PER_HOUR` | `1000` | SMS to one region, 1..=100000000 |
//! | `SMS_MAX_SENDS_PER_PREFIX_PER_HOUR` | `20` | SMS to one block of 10,000 numbers, 1..=1000000 |
//! | `SMS_FRAUD_GUARD` | `monitor` | `off`, `monitor` or `enforce` |
//! | `SMS_FRAUD_MIN_SENDS` | `50` | sends per region and hour before conversion is judged, 1..=1000000 |
//! | `SMS_FRAUD_MIN_CONVERSION` | `0.2` | verified / sent below this trips the guard, 0..=1 |
//! | `SMS_FRAUD_BLOCK_SECONDS` | `3600` | how long `enforce` suspends a region, 60..=604800 |
//! | `TEST_PHONE_NUMBERS` | unset | `+79990000001=4321,…`: no SMS, no send limits, fixed code |
//! | `OTP_PEPPER_FILE` | unset: random per process + warning | secret keying the code hash, at least 16 bytes |
//! | `SERVICE_CLIENTS_FILE` | unset: no service clients | JSON list of internal clients that may call `IssueServiceToken`: id, SHA-256 of the secret, scopes (format in [`crate::service_clients`]) |
//! | `SERVICE_TOKEN_TTL_SECONDS` | `600` | life of a token from `IssueServiceToken`, 60..=3600 |
//! | `SERVICE_TOKEN_MAX_ISSUES_PER_CLIENT_PER_MINUTE` | `60` | `IssueServiceToken` attempts per client id, right or wrong (all unknown ids share one count), 1..=100000 |
//! | `SERVICE_TOKEN_MAX_FAILURES_PER_CLIENT_PER_MINUTE` | `10` | wrong secrets per client id; then the id is refused, even with the right secret, until its minute ends, 1..=10000 |
//! | `TRUSTED_PROXY_HOPS` | `0` | proxies whose `x-forwarded-for` entry is trusted, 0..=10 |
//! | `PHONE_DEFAULT_REGION` | unset: a leading `+` is required | ISO 3166 region for national formats, e.g. `RU` |
//! | `SMS_PROVIDER` | `log` | `log` (dev: the code is logged) or `twilio` |
//! | `SMS_TEMPLATE` | `Your refsys code: {code}` | must contain `{code}` |
//! | `TWILIO_API_BASE` | `https://api.twilio.com` | |
//! | `TWILIO_ACCOUNT_SID`, `TWILIO_AUTH_TOKEN`, `TWILIO_FROM` | required with `twilio` | |
//! | `METRICS_ADDR` and the server keys | see [`ServerSettings`] | |

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
pub use service_kit::config::{ConfigError, ProcessEnv, ServerSettings, Settings, Source};

use crate::otp::{CodeLength, MAX_CODE_LENGTH, MIN_CODE_LENGTH, Pepper};
use crate::phone::Region;
use crate::policy::{DEFAULT_NUMBER_TYPES, SmsPolicy, TestNumbers};
use crate::service_clients::{CLIENTS_FILE_KEY, ServiceClients};
use crate::sms::{DEFAULT_TEMPLATE, TwilioSettings};
use crate::store::fraud::{FraudMode, FraudSettings};
use crate::store::otp::OtpLimits;
use crate::store::refresh::SessionLimits;
use crate::store::service_tokens::ServiceTokenLimits;
use crate::store::{DEFAULT_KEY_PREFIX, RedisTarget};

/// Which SMS provider delivers codes.
#[derive(Debug, Clone)]
pub enum SmsProvider {
    /// `SMS_PROVIDER=log`: nothing is delivered; the code is logged at `refsys::sms::dev`.
    Log,
    /// `SMS_PROVIDER=twilio`.
    Twilio(TwilioSettings),
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub grpc_addr: SocketAddr,
    /// `REDIS_URL`, or `REDIS_CLUSTER_URLS` when set. `Debug` masks passwords.
    pub redis: RedisTarget,
    pub redis_key_prefix: String,
    pub referral_grpc_url: String,
    pub jwt_signing_key_file: Option<PathBuf>,
    pub jwt_previous_public_keys: Vec<PathBuf>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub access_token_ttl: Duration,
    /// `REFRESH_TOKEN_TTL_SECONDS`, `REFRESH_TOKEN_MAX_LIFETIME_SECONDS`,
    /// `REFRESH_REUSE_GRACE_SECONDS`.
    pub sessions: SessionLimits,
    pub code_length: CodeLength,
    /// `OTP_TTL_SECONDS`, `OTP_MAX_ATTEMPTS`, `OTP_RESEND_COOLDOWN_SECONDS`, the send budgets
    /// and the failure caps.
    pub otp_limits: OtpLimits,
    /// `SMS_ALLOWED_REGIONS`, `SMS_ALLOWED_NUMBER_TYPES`.
    pub sms_policy: SmsPolicy,
    /// `SMS_FRAUD_*`.
    pub fraud: FraudSettings,
    /// `TEST_PHONE_NUMBERS`.
    pub test_numbers: TestNumbers,
    pub otp_pepper_file: Option<PathBuf>,
    /// `SERVICE_CLIENTS_FILE`, read and validated.
    pub service_clients: ServiceClients,
    /// `SERVICE_TOKEN_TTL_SECONDS`.
    pub service_token_ttl: Duration,
    /// `SERVICE_TOKEN_MAX_ISSUES_PER_CLIENT_PER_MINUTE`,
    /// `SERVICE_TOKEN_MAX_FAILURES_PER_CLIENT_PER_MINUTE`.
    pub service_token_limits: ServiceTokenLimits,
    pub trusted_proxy_hops: usize,
    pub phone_default_region: Option<Region>,
    pub sms_template: String,
    pub sms: SmsProvider,
    pub server: ServerSettings,
}

fn secs<S: Source>(
    s: &Settings<S>,
    key: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Duration, ConfigError> {
    s.get_in_range(key, default, range).map(Duration::from_secs)
}

fn non_empty<S: Source>(s: &Settings<S>, key: &str, default: &str) -> String {
    s.raw(key)
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| default.to_owned())
}

fn required<S: Source>(s: &Settings<S>, key: &str, why: &str) -> Result<String, ConfigError> {
    s.raw(key)
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| ConfigError::new(key, "", format_args!("required {why}")))
}

/// The key of the cluster seeds.
const CLUSTER_KEY: &str = "REDIS_CLUSTER_URLS";

/// `REDIS_CLUSTER_URLS` if set, else `REDIS_URL`. Both often hold the Redis password: values are
/// shown masked, with only a masked parse's message; a bad seed is named on its own.
fn redis_target<S: Source>(s: &Settings<S>) -> Result<RedisTarget, ConfigError> {
    let Some(raw) = s.raw(CLUSTER_KEY) else {
        let url = non_empty(s, "REDIS_URL", "redis://127.0.0.1:6379");
        service_kit::config::check_secret_url("REDIS_URL", &url, "not a Redis URL", |url| {
            redis::Client::open(url).map(drop)
        })?;
        return Ok(RedisTarget::Single(url));
    };
    let seeds: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|seed| !seed.is_empty())
        .map(str::to_owned)
        .collect();
    let shown = || {
        seeds
            .iter()
            .map(|seed| service_kit::config::redact_url(seed))
            .collect::<Vec<_>>()
            .join(",")
    };
    if seeds.is_empty() {
        return Err(ConfigError::new(
            CLUSTER_KEY,
            &service_kit::config::redact_url(&raw),
            "expected seed node URLs separated by commas",
        ));
    }
    let mut first = None;
    for seed in &seeds {
        service_kit::config::check_secret_url(CLUSTER_KEY, seed, "not a Redis URL", |url| {
            use redis::IntoConnectionInfo;
            let info = url.into_connection_info()?;
            match info.addr {
                redis::ConnectionAddr::Unix(_) => Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "a cluster is reached over TCP, not a unix socket",
                ))),
                _ if info.redis.db != 0 => Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "a Redis Cluster has database 0 only",
                ))),
                _ => Ok(()),
            }
        })?;
        // Every node is reached with the same credentials and scheme.
        use redis::IntoConnectionInfo;
        let info = seed
            .as_str()
            .into_connection_info()
            .map_err(|_| ConfigError::new(CLUSTER_KEY, &shown(), "not a Redis URL"))?;
        let tls = matches!(info.addr, redis::ConnectionAddr::TcpTls { .. });
        let this = (info.redis.username, info.redis.password, tls);
        match &first {
            None => first = Some(this),
            Some(first) if first.2 != this.2 => {
                return Err(ConfigError::new(
                    CLUSTER_KEY,
                    &shown(),
                    "every seed must use the same scheme (all redis:// or all rediss:// for TLS)",
                ));
            }
            Some(first) if (&first.0, &first.1) != (&this.0, &this.1) => {
                return Err(ConfigError::new(
                    CLUSTER_KEY,
                    &shown(),
                    "every seed must have the same user name and password",
                ));
            }
            Some(_) => {}
        }
    }
    // The client's own checks; its messages name no credentials.
    crate::store::connection::cluster_client(&seeds, Duration::from_secs(1))
        .map_err(|err| ConfigError::new(CLUSTER_KEY, &shown(), err))?;
    Ok(RedisTarget::Cluster(seeds))
}

impl AuthConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(ProcessEnv)
    }

    /// Reads and validates every setting from `source`.
    pub fn from_source<S: Source>(source: S) -> Result<Self, ConfigError> {
        let s = Settings(source);

        let redis = redis_target(&s)?;
        let redis_key_prefix = non_empty(&s, "REDIS_KEY_PREFIX", DEFAULT_KEY_PREFIX);
        if !crate::store::valid_prefix(&redis_key_prefix) {
            return Err(ConfigError::new(
                "REDIS_KEY_PREFIX",
                &redis_key_prefix,
                "must not contain '{' or '}' (they would break the Redis Cluster hash tags)",
            ));
        }

        let length: u8 = s.get_in_range("OTP_LENGTH", 4, MIN_CODE_LENGTH..=MAX_CODE_LENGTH)?;
        let code_length = CodeLength::new(length).expect("range checked above");
        let otp_limits = OtpLimits {
            code_ttl: secs(&s, "OTP_TTL_SECONDS", 300, 10..=3600)?,
            resend_cooldown: secs(&s, "OTP_RESEND_COOLDOWN_SECONDS", 60, 1..=3600)?,
            max_sends_per_phone: s.get_in_range("OTP_MAX_SENDS_PER_PHONE_PER_HOUR", 5, 1..=100)?,
            max_sends_per_client: s.get_in_range(
                "OTP_MAX_SENDS_PER_CLIENT_PER_HOUR",
                30,
                1..=1_000_000,
            )?,
            max_sends_global: s.get_in_range("SMS_MAX_SENDS_PER_HOUR", 10_000, 1..=100_000_000)?,
            max_sends_per_region: s.get_in_range(
                "SMS_MAX_SENDS_PER_REGION_PER_HOUR",
                1_000,
                1..=100_000_000,
            )?,
            max_sends_per_prefix: s.get_in_range(
                "SMS_MAX_SENDS_PER_PREFIX_PER_HOUR",
                20,
                1..=1_000_000,
            )?,
            max_attempts: s.get_in_range("OTP_MAX_ATTEMPTS", 5, 1..=20)?,
            max_failed_per_client: s.get_in_range(
                "OTP_MAX_FAILED_PER_CLIENT_PER_HOUR",
                30,
                1..=1_000_000,
            )?,
            max_failed_per_phone_per_client: s.get_in_range(
                "OTP_MAX_FAILED_PER_PHONE_PER_CLIENT_PER_DAY",
                10,
                1..=1000,
            )?,
            max_failed_per_phone: s.get_in_range(
                "OTP_MAX_FAILED_PER_PHONE_PER_DAY",
                100,
                1..=100_000,
            )?,
            ..OtpLimits::default()
        };

        let sms_policy = SmsPolicy::new(
            SmsPolicy::parse_regions(&s.raw("SMS_ALLOWED_REGIONS").unwrap_or_default()).map_err(
                |why| {
                    let raw = s.raw("SMS_ALLOWED_REGIONS").unwrap_or_default();
                    ConfigError::new("SMS_ALLOWED_REGIONS", &raw, why)
                },
            )?,
            SmsPolicy::parse_types(&non_empty(
                &s,
                "SMS_ALLOWED_NUMBER_TYPES",
                DEFAULT_NUMBER_TYPES,
            ))
            .map_err(|why| {
                let raw = non_empty(&s, "SMS_ALLOWED_NUMBER_TYPES", DEFAULT_NUMBER_TYPES);
                ConfigError::new("SMS_ALLOWED_NUMBER_TYPES", &raw, why)
            })?,
        );
        let fraud = FraudSettings {
            mode: match s.choice("SMS_FRAUD_GUARD", "monitor", &["off", "monitor", "enforce"])? {
                "off" => FraudMode::Off,
                "enforce" => FraudMode::Enforce,
                _ => FraudMode::Monitor,
            },
            min_sends: s.get_in_range("SMS_FRAUD_MIN_SENDS", 50, 1..=1_000_000)?,
            min_conversion: s.get_or("SMS_FRAUD_MIN_CONVERSION", 0.2f64).and_then(|v| {
                if (0.0..=1.0).contains(&v) {
                    Ok(v)
                } else {
                    Err(ConfigError::new(
                        "SMS_FRAUD_MIN_CONVERSION",
                        &v.to_string(),
                        "must be between 0 and 1",
                    ))
                }
            })?,
            block: secs(&s, "SMS_FRAUD_BLOCK_SECONDS", 3600, 60..=604_800)?,
            ..FraudSettings::default()
        };
        // The codes are secrets: the error names the key and the entry, never the value.
        let test_numbers = TestNumbers::parse(
            &s.raw("TEST_PHONE_NUMBERS").unwrap_or_default(),
            code_length,
        )
        .map_err(|why| ConfigError::new("TEST_PHONE_NUMBERS", "<redacted>", why))?;

        let phone_default_region = s
            .raw("PHONE_DEFAULT_REGION")
            .map(|raw| {
                raw.trim()
                    .to_ascii_uppercase()
                    .parse::<Region>()
                    .map_err(|_| {
                        ConfigError::new(
                            "PHONE_DEFAULT_REGION",
                            &raw,
                            "expected a two-letter ISO 3166 region code, e.g. RU",
                        )
                    })
            })
            .transpose()?;

        let sms_template = s
            .raw("SMS_TEMPLATE")
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_owned());
        if !sms_template.contains("{code}") || sms_template.len() > 480 {
            return Err(ConfigError::new(
                "SMS_TEMPLATE",
                &sms_template,
                "must contain {code} and be at most 480 bytes",
            ));
        }
        let sms = match s.choice("SMS_PROVIDER", "log", &["log", "twilio"])? {
            "twilio" => {
                let why = "when SMS_PROVIDER=twilio";
                let mut settings = TwilioSettings::new(
                    s.url("TWILIO_API_BASE", "https://api.twilio.com")?,
                    required(&s, "TWILIO_ACCOUNT_SID", why)?,
                    SecretString::from(required(&s, "TWILIO_AUTH_TOKEN", why)?),
                    required(&s, "TWILIO_FROM", why)?,
                );
                settings.template = sms_template.clone();
                SmsProvider::Twilio(settings)
            }
            _ => SmsProvider::Log,
        };

        // Read now, so a bad file stops the start with exit code 2 like any bad setting.
        let service_clients = match s.raw(CLIENTS_FILE_KEY) {
            Some(path) => ServiceClients::load(std::path::Path::new(path.trim()))?,
            None => ServiceClients::default(),
        };
        let service_token_limits = ServiceTokenLimits {
            max_issues: s.get_in_range(
                "SERVICE_TOKEN_MAX_ISSUES_PER_CLIENT_PER_MINUTE",
                60,
                1..=100_000,
            )?,
            max_failures: s.get_in_range(
                "SERVICE_TOKEN_MAX_FAILURES_PER_CLIENT_PER_MINUTE",
                10,
                1..=10_000,
            )?,
            ..ServiceTokenLimits::default()
        };

        let jwt_previous_public_keys = s
            .raw("JWT_PREVIOUS_PUBLIC_KEYS")
            .map(|raw| {
                raw.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();

        Ok(Self {
            grpc_addr: s.socket_addr("AUTH_GRPC_ADDR", "0.0.0.0:50051")?,
            redis,
            redis_key_prefix,
            referral_grpc_url: s.url("REFERRAL_GRPC_URL", "http://127.0.0.1:50052")?,
            jwt_signing_key_file: s.raw("JWT_SIGNING_KEY_FILE").map(PathBuf::from),
            jwt_previous_public_keys,
            jwt_issuer: non_empty(&s, "JWT_ISSUER", "refsys-auth"),
            jwt_audience: non_empty(&s, "JWT_AUDIENCE", "refsys"),
            access_token_ttl: secs(&s, "ACCESS_TOKEN_TTL_SECONDS", 900, 60..=86_400)?,
            sessions: SessionLimits {
                token_ttl: secs(&s, "REFRESH_TOKEN_TTL_SECONDS", 2_592_000, 60..=31_536_000)?,
                max_lifetime: secs(
                    &s,
                    "REFRESH_TOKEN_MAX_LIFETIME_SECONDS",
                    7_776_000,
                    1..=63_072_000,
                )?,
                reuse_grace: secs(&s, "REFRESH_REUSE_GRACE_SECONDS", 10, 0..=300)?,
            },
            code_length,
            otp_limits,
            sms_policy,
            fraud,
            test_numbers,
            otp_pepper_file: s.raw("OTP_PEPPER_FILE").map(PathBuf::from),
            service_clients,
            service_token_ttl: secs(&s, "SERVICE_TOKEN_TTL_SECONDS", 600, 60..=3600)?,
            service_token_limits,
            trusted_proxy_hops: s.get_in_range("TRUSTED_PROXY_HOPS", 0, 0..=10)?,
            phone_default_region,
            sms_template,
            sms,
            server: ServerSettings::from_source(&s)?,
        })
    }

    /// The pepper from `OTP_PEPPER_FILE` (surrounding whitespace trimmed), or without one a
    /// random pepper and a warning: codes then die with the process and replicas cannot verify
    /// each other's codes.
    pub fn load_pepper(&self) -> Result<Pepper, ConfigError> {
        let Some(path) = &self.otp_pepper_file else {
            tracing::warn!(
                "OTP_PEPPER_FILE is not set: using a random pepper for this process. Codes stop \
                 working on restart and replicas cannot verify each other's codes. Development only."
            );
            return Ok(Pepper::random(&mut rand::rng()));
        };
        let shown = path.display().to_string();
        let bytes =
            std::fs::read(path).map_err(|err| ConfigError::new("OTP_PEPPER_FILE", &shown, err))?;
        let trimmed = bytes.trim_ascii().to_vec();
        Pepper::from_bytes(trimmed).ok_or_else(|| {
            ConfigError::new(
                "OTP_PEPPER_FILE",
                &shown,
                format_args!("the pepper must be at least {} bytes", Pepper::MIN_LEN),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<AuthConfig, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        AuthConfig::from_source(map)
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.grpc_addr.to_string(), "0.0.0.0:50051");
        assert_eq!(
            c.redis,
            RedisTarget::Single("redis://127.0.0.1:6379".to_owned())
        );
        assert_eq!(c.redis_key_prefix, "refsys:auth:");
        assert_eq!(c.referral_grpc_url, "http://127.0.0.1:50052");
        assert_eq!(c.jwt_issuer, "refsys-auth");
        assert_eq!(c.jwt_audience, "refsys");
        assert!(c.jwt_signing_key_file.is_none());
        assert!(c.jwt_previous_public_keys.is_empty());
        assert_eq!(c.access_token_ttl, Duration::from_secs(900));
        assert_eq!(c.sessions.token_ttl, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(c.sessions.max_lifetime, Duration::from_secs(90 * 24 * 3600));
        assert_eq!(c.sessions.reuse_grace, Duration::from_secs(10));
        assert_eq!(c.code_length.get(), 4);
        let l = &c.otp_limits;
        assert_eq!(l.code_ttl, Duration::from_secs(300));
        assert_eq!(l.resend_cooldown, Duration::from_secs(60));
        assert_eq!(
            (
                l.max_sends_per_phone,
                l.max_sends_per_client,
                l.max_attempts
            ),
            (5, 30, 5)
        );
        assert_eq!(
            (
                l.max_sends_global,
                l.max_sends_per_region,
                l.max_sends_per_prefix
            ),
            (10_000, 1_000, 20)
        );
        assert_eq!(
            (
                l.max_failed_per_client,
                l.max_failed_per_phone_per_client,
                l.max_failed_per_phone
            ),
            (30, 10, 100)
        );
        assert_eq!(l.send_window, Duration::from_secs(3600));
        assert_eq!(l.client_failure_window, Duration::from_secs(3600));
        assert_eq!(
            c.sms_policy.describe(),
            "regions=all types=fixed_line_or_mobile,mobile"
        );
        assert_eq!(c.fraud.mode, FraudMode::Monitor);
        assert_eq!(
            (c.fraud.min_sends, c.fraud.min_conversion, c.fraud.block),
            (50, 0.2, Duration::from_secs(3600))
        );
        assert!(c.test_numbers.is_empty());
        assert_eq!(l.failure_window, Duration::from_secs(86_400));
        assert!(c.otp_pepper_file.is_none());
        assert!(c.service_clients.is_empty());
        assert_eq!(c.service_token_ttl, Duration::from_secs(600));
        assert_eq!(
            c.service_token_limits,
            ServiceTokenLimits {
                max_issues: 60,
                max_failures: 10,
                window: Duration::from_secs(60)
            }
        );
        assert_eq!(c.trusted_proxy_hops, 0);
        assert!(c.phone_default_region.is_none());
        assert_eq!(c.sms_template, "Your refsys code: {code}");
        assert!(matches!(c.sms, SmsProvider::Log));
        assert!(c.server.metrics_addr.is_none());
    }

    #[test]
    fn values_are_read() {
        let c = config(&[
            ("OTP_LENGTH", "6"),
            ("OTP_MAX_ATTEMPTS", "3"),
            ("PHONE_DEFAULT_REGION", "ru"),
            ("JWT_PREVIOUS_PUBLIC_KEYS", "/keys/a.pem, /keys/b.pem,"),
            ("TRUSTED_PROXY_HOPS", "1"),
            ("METRICS_ADDR", "0.0.0.0:9090"),
            ("SMS_PROVIDER", "twilio"),
            ("TWILIO_ACCOUNT_SID", "AC1"),
            ("TWILIO_AUTH_TOKEN", "tok"),
            ("TWILIO_FROM", "+15005550006"),
            ("SMS_TEMPLATE", "{code} is your code"),
            ("SMS_ALLOWED_REGIONS", "ru,KZ"),
            ("SMS_ALLOWED_NUMBER_TYPES", "mobile"),
            ("SMS_FRAUD_GUARD", "enforce"),
            ("SMS_FRAUD_MIN_CONVERSION", "0.35"),
            ("TEST_PHONE_NUMBERS", "+79990000001=432198"),
        ])
        .unwrap();
        assert_eq!(c.sms_policy.describe(), "regions=KZ,RU types=mobile");
        assert_eq!(c.fraud.mode, FraudMode::Enforce);
        assert_eq!(c.fraud.min_conversion, 0.35);
        assert_eq!(c.test_numbers.len(), 1);
        assert!(!format!("{c:?}").contains("432198"));
        assert_eq!(c.code_length.get(), 6);
        assert_eq!(c.otp_limits.max_attempts, 3);
        assert_eq!(c.phone_default_region, Some(Region::RU));
        assert_eq!(c.jwt_previous_public_keys.len(), 2);
        assert_eq!(c.trusted_proxy_hops, 1);
        assert!(c.server.metrics_addr.is_some());
        let SmsProvider::Twilio(t) = &c.sms else {
            panic!("twilio expected")
        };
        assert_eq!(t.api_base, "https://api.twilio.com");
        assert_eq!(t.template, "{code} is your code");
        assert!(!format!("{c:?}").contains("tok\""));
    }

    #[test]
    fn bad_values_are_one_line_naming_the_key() {
        for (key, value) in [
            ("OTP_LENGTH", "3"),
            ("OTP_LENGTH", "9"),
            ("OTP_LENGTH", "four"),
            ("OTP_TTL_SECONDS", "0"),
            ("OTP_MAX_ATTEMPTS", "0"),
            ("OTP_MAX_SENDS_PER_PHONE_PER_HOUR", "-1"),
            ("OTP_MAX_FAILED_PER_PHONE_PER_DAY", "0"),
            ("ACCESS_TOKEN_TTL_SECONDS", "5"),
            ("REDIS_URL", "http://nope"),
            ("REDIS_CLUSTER_URLS", " , "),
            ("REDIS_CLUSTER_URLS", "redis://a:6379,http://b:6379"),
            ("REDIS_CLUSTER_URLS", "redis://a:6379/2"),
            ("REDIS_CLUSTER_URLS", "redis+unix:///run/redis.sock"),
            ("REDIS_CLUSTER_URLS", "redis://a:6379,rediss://b:6379"),
            ("REDIS_KEY_PREFIX", "a{b}:"),
            ("REFERRAL_GRPC_URL", "referral:50052"),
            ("AUTH_GRPC_ADDR", "nowhere"),
            ("PHONE_DEFAULT_REGION", "Russia"),
            ("SMS_PROVIDER", "carrier-pigeon"),
            ("SMS_TEMPLATE", "no code here"),
            ("TRUSTED_PROXY_HOPS", "99"),
            ("SMS_ALLOWED_REGIONS", "RU,Narnia"),
            ("SMS_ALLOWED_NUMBER_TYPES", "premium"),
            ("SMS_MAX_SENDS_PER_HOUR", "0"),
            ("SMS_MAX_SENDS_PER_PREFIX_PER_HOUR", "lots"),
            ("SMS_FRAUD_GUARD", "panic"),
            ("SMS_FRAUD_MIN_CONVERSION", "1.5"),
            ("SMS_FRAUD_BLOCK_SECONDS", "1"),
            ("OTP_MAX_FAILED_PER_CLIENT_PER_HOUR", "0"),
            ("REFRESH_TOKEN_MAX_LIFETIME_SECONDS", "0"),
            ("REFRESH_REUSE_GRACE_SECONDS", "301"),
            ("OTP_MAX_FAILED_PER_PHONE_PER_CLIENT_PER_DAY", "0"),
            ("TEST_PHONE_NUMBERS", "+79990000001"),
            ("SERVICE_TOKEN_TTL_SECONDS", "59"),
            ("SERVICE_TOKEN_TTL_SECONDS", "3601"),
            ("SERVICE_TOKEN_MAX_ISSUES_PER_CLIENT_PER_MINUTE", "0"),
            ("SERVICE_TOKEN_MAX_FAILURES_PER_CLIENT_PER_MINUTE", "0"),
            ("SERVICE_CLIENTS_FILE", "/nonexistent/clients.json"),
        ] {
            let err = config(&[(key, value)]).expect_err(value);
            let line = err.to_string();
            assert!(line.contains(key), "{key}={value}: {line}");
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn cluster_seeds_replace_redis_url_and_never_show_a_password() {
        let c = config(&[
            ("REDIS_URL", "this is ignored"),
            (
                "REDIS_CLUSTER_URLS",
                " redis://:s3cret@10.0.0.1:6379, redis://:s3cret@10.0.0.2:6379 ,",
            ),
        ])
        .unwrap();
        assert_eq!(
            c.redis,
            RedisTarget::Cluster(vec![
                "redis://:s3cret@10.0.0.1:6379".to_owned(),
                "redis://:s3cret@10.0.0.2:6379".to_owned()
            ])
        );
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
        assert_eq!(
            c.redis.redacted(),
            "cluster [redis://:***@10.0.0.1:6379, redis://:***@10.0.0.2:6379]"
        );
        let tls = config(&[("REDIS_CLUSTER_URLS", "rediss://u:pw@redis.example:6380")]).unwrap();
        assert!(matches!(tls.redis, RedisTarget::Cluster(seeds) if seeds.len() == 1));

        for (value, why) in [
            (
                "redis://:s3cret@a:6379,redis://:s3cret@b:notaport",
                "b:notaport",
            ),
            ("redis://:s3cret@a:6379,redis://:other@b:6379", "password"),
            ("redis://u:s3cret@a:6379/1", "database 0"),
            ("redis://:s3cret@a:6379,rediss://:s3cret@b:6379", "TLS"),
        ] {
            let err = config(&[("REDIS_CLUSTER_URLS", value)]).expect_err(value);
            let line = err.to_string();
            assert!(line.contains("REDIS_CLUSTER_URLS="), "{line}");
            assert!(line.contains(why), "{value}: {line}");
            assert!(
                !line.contains("s3cret") && !line.contains("other"),
                "{line}"
            );
            assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn test_number_errors_never_show_the_codes() {
        let err = config(&[("TEST_PHONE_NUMBERS", "+79990000001=4321,+79990000002=98")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TEST_PHONE_NUMBERS") && err.contains("entry 2"),
            "{err}"
        );
        assert!(!err.contains("4321") && !err.contains("98\""), "{err}");
    }

    #[test]
    fn twilio_needs_its_credentials() {
        let err = config(&[("SMS_PROVIDER", "twilio"), ("TWILIO_ACCOUNT_SID", "AC1")]).unwrap_err();
        assert!(err.to_string().contains("TWILIO_AUTH_TOKEN"), "{err}");
        let err = config(&[
            ("SMS_PROVIDER", "twilio"),
            ("TWILIO_ACCOUNT_SID", "AC1"),
            ("TWILIO_AUTH_TOKEN", "t"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("TWILIO_FROM"), "{err}");
    }

    #[test]
    fn pepper_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("pepper");
        std::fs::write(&good, "0123456789abcdef0123456789abcdef\n").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "tiny").unwrap();
        let with = |path: &std::path::Path| {
            config(&[("OTP_PEPPER_FILE", path.to_str().unwrap())]).unwrap()
        };
        assert!(with(&good).load_pepper().is_ok());
        let err = with(&short).load_pepper().unwrap_err();
        assert!(err.to_string().contains("OTP_PEPPER_FILE"));
        assert!(!err.to_string().contains("tiny"));
        let err = with(&dir.path().join("missing")).load_pepper().unwrap_err();
        assert!(err.to_string().contains("OTP_PEPPER_FILE"));
        assert!(config(&[]).unwrap().load_pepper().is_ok());
    }

    #[test]
    fn service_clients_file_is_read_and_checked_at_start() {
        use crate::service_clients::tests::sha256_hex;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        };
        let hash = sha256_hex("s3cret-shop");
        let good = write(
            "good.json",
            &format!(
                r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}", "scopes": ["referral.points.read", "referral.events.read"]}}]}}"#
            ),
        );
        let c = config(&[
            ("SERVICE_CLIENTS_FILE", &good),
            ("SERVICE_TOKEN_TTL_SECONDS", "120"),
            ("SERVICE_TOKEN_MAX_ISSUES_PER_CLIENT_PER_MINUTE", "5"),
            ("SERVICE_TOKEN_MAX_FAILURES_PER_CLIENT_PER_MINUTE", "2"),
        ])
        .unwrap();
        assert_eq!(c.service_clients.ids(), ["shop"]);
        assert_eq!(c.service_token_ttl, Duration::from_secs(120));
        assert_eq!(
            (
                c.service_token_limits.max_issues,
                c.service_token_limits.max_failures
            ),
            (5, 2)
        );
        assert!(!format!("{c:?}").contains(&hash), "Debug shows the hash");

        for (name, text) in [
            ("syntax.json", "{\"clients\": [".to_owned()),
            (
                "internal.json",
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}", "scopes": ["referral.users.ensure"]}}]}}"#
                ),
            ),
            (
                "duplicate.json",
                format!(
                    r#"{{"clients": [{{"id": "a", "secret_sha256": "{hash}", "scopes": ["referral.points.read"]}}, {{"id": "a", "secret_sha256": "{hash}", "scopes": ["referral.points.read"]}}]}}"#
                ),
            ),
            (
                "short.json",
                format!(
                    r#"{{"clients": [{{"id": "a", "secret_sha256": "{}", "scopes": ["referral.points.read"]}}]}}"#,
                    &hash[1..]
                ),
            ),
        ] {
            let path = write(name, &text);
            let line = config(&[("SERVICE_CLIENTS_FILE", &path)])
                .unwrap_err()
                .to_string();
            assert!(line.contains("SERVICE_CLIENTS_FILE"), "{name}: {line}");
            assert!(line.contains(name), "{name}: the path is shown: {line}");
            assert!(!line.contains('\n'), "{line}");
            assert!(!line.contains(&hash[1..20]), "{name}: {line}");
        }
    }
}
