//! Reading settings from the environment: every key has a default, every bad value is one clear
//! line naming the key, and `exit_on_config_error` turns it into exit code 2.

use std::fmt::Display;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// A setting that could not be used. Its `Display` is one line that names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key}={value:?}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: &str, value: &str, reason: impl Display) -> Self {
        Self {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// Where settings come from. The process environment in production; a map in tests, so
/// configuration is testable without touching global state.
pub trait Source {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment. Empty values count as unset, so `FOO=` in a manifest means default.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key)
            .ok()
            .filter(|value| !value.trim().is_empty())
    }
}

impl Source for std::collections::HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        std::collections::HashMap::get(self, key)
            .filter(|value| !value.trim().is_empty())
            .cloned()
    }
}

impl<const N: usize> Source for [(&str, &str); N] {
    fn get(&self, key: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
            .filter(|value| !value.trim().is_empty())
    }
}

/// Typed access to a [`Source`].
pub struct Settings<S: Source>(pub S);

impl<S: Source> Settings<S> {
    /// The raw value of `key`, if set.
    pub fn raw(&self, key: &str) -> Option<String> {
        self.0.get(key)
    }

    /// `key` parsed as `T`, or `default` when unset.
    pub fn get_or<T>(&self, key: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        Ok(self.get_opt(key)?.unwrap_or(default))
    }

    /// `key` parsed as `T`, or `None` when unset.
    pub fn get_opt<T>(&self, key: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.0
            .get(key)
            .map(|raw| {
                raw.trim()
                    .parse::<T>()
                    .map_err(|err| ConfigError::new(key, &raw, err))
            })
            .transpose()
    }

    /// An integer in `range`, or `default` when unset.
    pub fn get_in_range<T>(
        &self,
        key: &str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Display + Copy,
        T::Err: Display,
    {
        let value = self.get_or(key, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::new(
                key,
                &value.to_string(),
                format_args!("must be between {} and {}", range.start(), range.end()),
            ))
        }
    }

    /// A whole number of seconds (at least 1), or `default_secs` when unset.
    pub fn seconds(&self, key: &str, default_secs: u64) -> Result<Duration, ConfigError> {
        self.get_in_range(key, default_secs, 1..=u64::from(u32::MAX))
            .map(Duration::from_secs)
    }

    /// `true`/`false` (also `1`/`0`, `yes`/`no`), or `default` when unset.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.0.get(key) {
            None => Ok(default),
            Some(raw) => match raw.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(key, &raw, "expected true or false")),
            },
        }
    }

    /// A `host:port` socket address, or `default` when unset.
    pub fn socket_addr(&self, key: &str, default: &str) -> Result<SocketAddr, ConfigError> {
        let raw = self.0.get(key).unwrap_or_else(|| default.to_owned());
        raw.trim()
            .parse()
            .map_err(|_| ConfigError::new(key, &raw, "expected host:port, e.g. 0.0.0.0:50051"))
    }

    /// An `http://` or `https://` URL, or `default` when unset.
    pub fn url(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        let raw = self.0.get(key).unwrap_or_else(|| default.to_owned());
        let parsed: Result<http::Uri, _> = raw.trim().parse();
        match parsed {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some() =>
            {
                Ok(raw.trim().to_owned())
            }
            _ => Err(ConfigError::new(
                key,
                &raw,
                "expected an http:// or https:// URL with a host",
            )),
        }
    }

    /// One of `choices`, or `default` when unset.
    pub fn choice(
        &self,
        key: &str,
        default: &'static str,
        choices: &[&'static str],
    ) -> Result<&'static str, ConfigError> {
        let raw = self.0.get(key).unwrap_or_else(|| default.to_owned());
        let wanted = raw.trim().to_ascii_lowercase();
        choices
            .iter()
            .copied()
            .find(|choice| *choice == wanted)
            .ok_or_else(|| {
                ConfigError::new(
                    key,
                    &raw,
                    format_args!("expected one of {}", choices.join(", ")),
                )
            })
    }
}

/// Settings of the shared gRPC server bootstrap, common to both services.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// `REQUEST_TIMEOUT_SECONDS` (10): a call that takes longer is cancelled with DEADLINE_EXCEEDED.
    pub request_timeout: Duration,
    /// `MAX_CONCURRENT_REQUESTS` (1024): calls beyond this wait for a slot.
    pub concurrency_limit: usize,
    /// `SHUTDOWN_GRACE_SECONDS` (20): how long in-flight calls may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// `SHUTDOWN_DELAY_SECONDS` (0): after SIGTERM, how long the server keeps answering with
    /// health NOT_SERVING before it stops taking calls. Kubernetes' preStop does this job there.
    pub shutdown_delay: Duration,
    /// `GRPC_MAX_CONNECTION_AGE_SECONDS` (300): connections are closed gracefully after this
    /// long so that HTTP/2 clients spread over new replicas.
    pub max_connection_age: Duration,
    /// `METRICS_ADDR` (unset: no metrics endpoint): where Prometheus scrapes `/metrics`.
    pub metrics_addr: Option<SocketAddr>,
}

impl ServerSettings {
    pub fn from_source<S: Source>(settings: &Settings<S>) -> Result<Self, ConfigError> {
        Ok(Self {
            request_timeout: settings.seconds("REQUEST_TIMEOUT_SECONDS", 10)?,
            concurrency_limit: settings.get_in_range(
                "MAX_CONCURRENT_REQUESTS",
                1024,
                1..=1_000_000,
            )?,
            shutdown_grace: settings.seconds("SHUTDOWN_GRACE_SECONDS", 20)?,
            shutdown_delay: Duration::from_secs(settings.get_in_range(
                "SHUTDOWN_DELAY_SECONDS",
                0u64,
                0..=300,
            )?),
            max_connection_age: settings.seconds("GRPC_MAX_CONNECTION_AGE_SECONDS", 300)?,
            metrics_addr: settings
                .raw("METRICS_ADDR")
                .map(|_| settings.socket_addr("METRICS_ADDR", ""))
                .transpose()?,
        })
    }
}

/// Prints the error as one line on stderr and exits with status 2 (bad configuration).
pub fn exit_on_config_error<T>(result: Result<T, ConfigError>) -> T {
    match result {
        Ok(value) => value,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        let settings = Settings([("EMPTY", " ")]);
        assert_eq!(settings.get_or("MISSING", 7u32), Ok(7));
        assert_eq!(settings.get_or("EMPTY", 7u32), Ok(7));
    }

    #[test]
    fn bad_values_name_the_key_on_one_line() {
        let settings = Settings([("OTP_LENGTH", "12"), ("ADDR", "nope"), ("FLAG", "maybe")]);
        let err = settings.get_in_range("OTP_LENGTH", 4u8, 4..=8).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: OTP_LENGTH=\"12\": must be between 4 and 8"
        );
        assert!(
            settings
                .socket_addr("ADDR", "0.0.0.0:1")
                .unwrap_err()
                .to_string()
                .contains("ADDR")
        );
        assert!(settings.flag("FLAG", true).is_err());
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn urls_need_a_scheme_and_host() {
        let settings = Settings([("A", "127.0.0.1:50052"), ("B", "http://referral:50052")]);
        assert!(settings.url("A", "").is_err());
        assert_eq!(
            settings.url("B", "").as_deref(),
            Ok("http://referral:50052")
        );
    }
}
