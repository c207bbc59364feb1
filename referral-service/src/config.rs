//! referral-service settings, from the environment (see README.md for the table).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use service_kit::config::{
    ConfigError, ServerSettings, Settings, Source, check_secret_url, redact_url,
};
use sqlx::postgres::PgConnectOptions;

use crate::domain::PhonePepper;
use crate::storage::Bonuses;

#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub database_url: String,
    pub database_max_connections: u32,
    pub database_acquire_timeout: Duration,
    pub run_migrations: bool,
    pub auth_grpc_url: String,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub bonuses: Bonuses,
    /// Keys the hashes of deleted users' phone numbers (`PHONE_HASH_PEPPER_FILE`); the fixed
    /// development pepper when unset (`serve` warns).
    pub phone_pepper: PhonePepper,
    /// `EVENTS_RETENTION_DAYS` (7): events older than this are pruned; a cursor before the
    /// pruned ones is OUT_OF_RANGE.
    pub events_retention: Duration,
    /// GetProfile's per-replica cache; `None` when `PROFILE_CACHE_TTL_MS` is 0.
    pub profile_cache: Option<ProfileCacheSettings>,
    pub server: ServerSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileCacheSettings {
    pub ttl: Duration,
    pub capacity: usize,
}

impl Config {
    pub fn from_source<S: Source>(settings: &Settings<S>) -> Result<Self, ConfigError> {
        let database_url = settings
            .raw("DATABASE_URL")
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/refsys".to_owned());
        if !database_url.starts_with("postgres://") && !database_url.starts_with("postgresql://") {
            return Err(ConfigError::new(
                "DATABASE_URL",
                &redact_url(&database_url),
                "expected a postgres:// URL",
            ));
        }
        // Parsed here rather than at the first connection, so a bad URL is a config error at
        // start (exit 2, one line) instead of a storage error later.
        check_secret_url("DATABASE_URL", &database_url, "not a Postgres URL", |url| {
            url.parse::<PgConnectOptions>().map(drop)
        })?;
        Ok(Self {
            grpc_addr: settings.socket_addr("REFERRAL_GRPC_ADDR", "0.0.0.0:50052")?,
            database_url,
            database_max_connections: settings.get_in_range(
                "DATABASE_MAX_CONNECTIONS",
                10,
                1..=1000,
            )?,
            database_acquire_timeout: settings.seconds("DATABASE_ACQUIRE_TIMEOUT_SECONDS", 3)?,
            run_migrations: settings.flag("RUN_MIGRATIONS", true)?,
            auth_grpc_url: settings.url("AUTH_GRPC_URL", "http://127.0.0.1:50051")?,
            jwt_issuer: settings.get_or("JWT_ISSUER", "refsys-auth".to_owned())?,
            jwt_audience: settings.get_or("JWT_AUDIENCE", "refsys".to_owned())?,
            bonuses: Bonuses {
                invitee: settings.get_in_range("BONUS_INVITEE", 100, 0..=1_000_000)?,
                inviter: settings.get_in_range("BONUS_INVITER", 200, 0..=1_000_000)?,
            },
            phone_pepper: match settings.raw("PHONE_HASH_PEPPER_FILE") {
                Some(path) => read_pepper("PHONE_HASH_PEPPER_FILE", Path::new(&path))?,
                None => PhonePepper::development(),
            },
            events_retention: Duration::from_secs(
                settings.get_in_range("EVENTS_RETENTION_DAYS", 7u64, 1..=3650)? * 86_400,
            ),
            profile_cache: match settings.get_in_range(
                "PROFILE_CACHE_TTL_MS",
                1000u64,
                0..=60_000,
            )? {
                0 => None,
                ttl => Some(ProfileCacheSettings {
                    ttl: Duration::from_millis(ttl),
                    capacity: settings.get_in_range(
                        "PROFILE_CACHE_CAPACITY",
                        10_000usize,
                        1..=10_000_000,
                    )?,
                }),
            },
            server: ServerSettings::from_source(settings)?,
        })
    }
}

/// The pepper in the file at `path`, surrounding whitespace trimmed. Errors show the key and
/// the path, never the file's contents.
fn read_pepper(key: &str, path: &Path) -> Result<PhonePepper, ConfigError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|err| ConfigError::new(key, &shown, err))?;
    PhonePepper::from_bytes(bytes.trim_ascii()).ok_or_else(|| {
        ConfigError::new(
            key,
            &shown,
            format_args!(
                "the pepper must be at least {} bytes (surrounding whitespace does not count)",
                PhonePepper::MIN_LEN
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_settings() {
        let config = Config::from_source(&Settings([("UNRELATED", "")])).unwrap();
        assert_eq!(config.grpc_addr.port(), 50052);
        assert_eq!((config.bonuses.invitee, config.bonuses.inviter), (100, 200));
        assert!(config.run_migrations);
        assert!(config.phone_pepper.is_development());
        assert_eq!(config.events_retention, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn the_phone_hash_pepper_file_is_read_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!(
            "refsys-pepper-test-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, contents: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, contents).unwrap();
            path.to_str().unwrap().to_owned()
        };
        let load = |path: &str| Config::from_source(&Settings([("PHONE_HASH_PEPPER_FILE", path)]));

        let good = write("good", b"  s3cret-pepper-0123456789\n");
        let config = load(&good).unwrap();
        assert!(!config.phone_pepper.is_development());
        let same = PhonePepper::from_bytes(b"s3cret-pepper-0123456789").unwrap();
        assert_eq!(
            config.phone_pepper.hash_e164("+79601233017"),
            same.hash_e164("+79601233017"),
            "whitespace around the pepper is trimmed"
        );
        assert!(!format!("{config:?}").contains("s3cret"));

        // 15 bytes once trimmed.
        let short = write("short", b"\ts3cret-12345678 \n");
        let missing = dir.join("missing").to_str().unwrap().to_owned();
        for path in [short, missing] {
            let err = load(&path).unwrap_err();
            assert_eq!(err.key, "PHONE_HASH_PEPPER_FILE");
            let line = err.to_string();
            assert!(line.contains("PHONE_HASH_PEPPER_FILE"), "{line}");
            assert!(!line.contains("s3cret"), "{line}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_are_refused() {
        for (key, value) in [
            ("BONUS_INVITER", "lots"),
            ("RUN_MIGRATIONS", "perhaps"),
            ("EVENTS_RETENTION_DAYS", "0"),
            ("AUTH_GRPC_URL", "auth:50051"),
            ("DATABASE_URL", "mysql://x"),
            ("DATABASE_URL", "postgres://h:x/db"),
        ] {
            let err = Config::from_source(&Settings([(key, value)])).unwrap_err();
            assert_eq!(err.key, key);
        }
    }

    #[test]
    fn a_bad_database_url_is_shown_without_its_password() {
        for url in [
            "postgres://u:s3cret@h:x/db",
            "postgresql://u:s3cret@h:99999/db",
            "postgres://u:s3cret@h/db?sslmode=sometimes",
            "postgres://h/db?password=s3cret&sslmode=sometimes",
            "mysql://u:s3cret@h/db",
        ] {
            let err = Config::from_source(&Settings([("DATABASE_URL", url)])).unwrap_err();
            let line = err.to_string();
            assert!(line.contains("DATABASE_URL="), "{line}");
            assert!(!line.contains("s3cret"), "{line}");
            assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
        }
        let line = Config::from_source(&Settings([("DATABASE_URL", "postgres://u:s3cret@h:x/db")]))
            .unwrap_err()
            .to_string();
        assert!(line.contains("postgres://u:***@h:x/db"), "{line}");
    }
}
