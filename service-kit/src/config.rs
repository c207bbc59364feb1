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

/// Stands in for a credential in what is shown.
const MASK: &str = "***";

/// `raw`, a URL or URL-like setting, with its credentials masked for display: the password of
/// `scheme://user:password@host` becomes `***` (the user name stays: it helps and is not a
/// secret), and so does the value of any `password=` parameter (`?password=`, `sslpassword=`).
/// When the part before the host cannot be told apart for sure (an `@` after a `/`, `?` or
/// `#`, as an unencoded password may hold them), everything between `://` and the last `@`
/// becomes `***`: showing too little beats showing a password.
pub fn redact_url(raw: &str) -> String {
    let (scheme, rest) = match raw.find("://") {
        Some(at) => raw.split_at(at + 3),
        None => ("", raw),
    };
    let mut shown = String::with_capacity(raw.len());
    shown.push_str(scheme);
    match rest.rfind('@') {
        None => shown.push_str(rest),
        Some(last_at) if last_at < rest.find(['/', '?', '#']).unwrap_or(rest.len()) => {
            let (userinfo, host) = rest.split_at(last_at);
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    shown.push_str(user);
                    shown.push(':');
                    shown.push_str(MASK);
                }
                None => shown.push_str(userinfo),
            }
            shown.push_str(host);
        }
        Some(last_at) => {
            shown.push_str(MASK);
            shown.push_str(&rest[last_at..]);
        }
    }
    mask_password_parameters(&shown)
}

/// Masks the value of every `password=` (any case), up to `&`, `;` or white space, or a quoted
/// value up to its closing quote.
fn mask_password_parameters(text: &str) -> String {
    const KEY: &str = "password=";
    // ASCII lower-casing keeps every byte offset.
    let lower = text.to_ascii_lowercase();
    let mut shown = String::with_capacity(text.len());
    let mut copied = 0;
    while let Some(found) = lower[copied..].find(KEY) {
        let value_start = copied + found + KEY.len();
        let value = &text[value_start..];
        let value_len = match value.chars().next() {
            Some(quote @ ('\'' | '"')) => value[1..].find(quote).map_or(value.len(), |end| end + 2),
            _ => value
                .find(|c: char| c == '&' || c == ';' || c.is_whitespace())
                .unwrap_or(value.len()),
        };
        shown.push_str(&text[copied..value_start]);
        shown.push_str(MASK);
        copied = value_start + value_len;
    }
    shown.push_str(&text[copied..]);
    shown
}

/// Checks `raw`, a URL that may hold credentials, with `parse` (e.g. the Redis or Postgres
/// client's own URL parser). On failure the error shows the value through [`redact_url`], and
/// the parser's message only from a second run on that masked value: parsers quote their input,
/// sometimes decoded, so a message about the real value could carry the password in a form no
/// masking would recognise. If the masked value parses, the message is left out.
pub fn check_secret_url<E: Display>(
    key: &str,
    raw: &str,
    reason: &str,
    parse: impl Fn(&str) -> Result<(), E>,
) -> Result<(), ConfigError> {
    let Err(err) = parse(raw) else {
        return Ok(());
    };
    let shown = redact_url(raw);
    let reason = if shown == raw {
        format!("{reason}: {err}")
    } else {
        match parse(&shown) {
            Err(err) => format!("{reason}: {err}"),
            Ok(()) => reason.to_owned(),
        }
    };
    Err(ConfigError::new(key, &shown, reason))
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
                &redact_url(&raw),
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
    fn credentials_in_urls_are_masked() {
        for (raw, shown) in [
            (
                "redis://user:s3cret@host:6379/0",
                "redis://user:***@host:6379/0",
            ),
            ("redis://:s3cret@host", "redis://:***@host"),
            ("rediss://user:p@ss:w0rd@host", "rediss://user:***@host"),
            (
                "postgres://u:s3cret@h:x/db?sslmode=require",
                "postgres://u:***@h:x/db?sslmode=require",
            ),
            // Lone user names stay; they are not secrets.
            (
                "postgres://postgres@127.0.0.1:5432/refsys",
                "postgres://postgres@127.0.0.1:5432/refsys",
            ),
            ("http://127.0.0.1:50052", "http://127.0.0.1:50052"),
            // Unencoded '/', '?' or '#' in the password: everything up to the last '@' goes.
            ("redis://user:s3/cret@host", "redis://***@host"),
            ("redis://user:s3?cret@host:1", "redis://***@host:1"),
            ("redis://user:s3#cret@host", "redis://***@host"),
            ("postgres://u:pw@h/db?x=a@b", "postgres://***@b"),
            // No scheme at all.
            ("u:s3cret@host:6379", "u:***@host:6379"),
            ("s3:cr/et@host", "***@host"),
            // Password parameters, in URLs and key=value strings.
            (
                "postgres://h/db?user=u&password=s3cret&sslmode=require",
                "postgres://h/db?user=u&password=***&sslmode=require",
            ),
            (
                "postgres://h/db?sslpassword=s3cret",
                "postgres://h/db?sslpassword=***",
            ),
            (
                "host=h PASSWORD=s3cret dbname=x",
                "host=h PASSWORD=*** dbname=x",
            ),
            (
                "host=h password='s3 cret' dbname=x",
                "host=h password=*** dbname=x",
            ),
            ("password=s3cret", "password=***"),
            ("", ""),
        ] {
            assert_eq!(redact_url(raw), shown, "{raw:?}");
        }
    }

    /// The worst parser: one that quotes its input.
    fn quoting_parser(url: &str) -> Result<(), String> {
        if url.contains("notaport") {
            Err(format!("cannot parse {url:?}: invalid port"))
        } else {
            Ok(())
        }
    }

    #[test]
    fn a_url_with_a_password_is_never_shown_whole() {
        let err = check_secret_url(
            "REDIS_URL",
            "redis://user:s3cret@host:notaport",
            "not a Redis URL",
            quoting_parser,
        )
        .unwrap_err();
        let line = err.to_string();
        assert_eq!(
            line,
            r#"invalid configuration: REDIS_URL="redis://user:***@host:notaport": not a Redis URL: cannot parse "redis://user:***@host:notaport": invalid port"#
        );
        assert!(!format!("{err:?}").contains("s3cret"));

        // The message about the real value would quote the password decoded ("s3cret!" from
        // "s3cret%21"), which masking the text could miss; only the masked run is quoted.
        let decoding = |url: &str| -> Result<(), String> {
            Err(format!("bad URL {}", url.replace("%21", "!")))
        };
        let line = check_secret_url("X_URL", "http://u:s3cret%21@h", "bad", decoding)
            .unwrap_err()
            .to_string();
        assert!(!line.contains("s3cret"), "{line}");

        // If the masked value parses, the message is left out rather than taken from the real one.
        let picky = |url: &str| {
            if url.contains("s3cret") {
                Err(url.to_owned())
            } else {
                Ok(())
            }
        };
        let line = check_secret_url("X_URL", "http://u:s3cret@h", "bad", picky)
            .unwrap_err()
            .to_string();
        assert_eq!(
            line,
            r#"invalid configuration: X_URL="http://u:***@h": bad"#
        );

        // Nothing to mask: the parser's message is all there.
        let line = check_secret_url(
            "REDIS_URL",
            "redis://host:notaport",
            "not a Redis URL",
            quoting_parser,
        )
        .unwrap_err()
        .to_string();
        assert!(
            line.contains(r#"cannot parse "redis://host:notaport""#),
            "{line}"
        );
        assert_eq!(
            check_secret_url("REDIS_URL", "redis://u:s3cret@h", "x", quoting_parser),
            Ok(())
        );
    }

    #[test]
    fn urls_need_a_scheme_and_host() {
        let settings = Settings([("A", "127.0.0.1:50052"), ("B", "http://referral:50052")]);
        assert!(settings.url("A", "").is_err());
        let with_password = Settings([("C", "referral:50052?password=s3cret")]);
        let line = with_password.url("C", "").unwrap_err().to_string();
        assert!(line.contains("C=") && !line.contains("s3cret"), "{line}");
        assert_eq!(
            settings.url("B", "").as_deref(),
            Ok("http://referral:50052")
        );
    }
}
