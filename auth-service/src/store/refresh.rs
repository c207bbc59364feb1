//! Refresh-token families in Redis.
//!
//! A refresh token is 256 random bits, base64url without padding (43 characters). Only its
//! SHA-256 is stored. Each sign-in starts a *family*; every rotation replaces the family's
//! current token hash and remembers the old one, so presenting an old token is recognised as
//! reuse (a stolen token racing its owner) and revokes the whole family, newest token included.
//!
//! Keys (prefix `P`, family id `f`, token hash `t`):
//!
//! | key | type | holds | TTL |
//! |---|---|---|---|
//! | `P{fam:f}:family` | hash | `user`, `roles` (JSON array), `cur` current token hash, `created` (unix s) | refresh TTL, renewed on rotation |
//! | `P{fam:f}:spent` | set | hashes of rotated tokens | same |
//! | `Prt:t` | string | family id | refresh TTL of that token |
//!
//! The family keys share the family's hash tag, so the rotation script is single-slot on Redis
//! Cluster. The lookup key `Prt:t` cannot share it (we only know the hash when a token comes
//! in) and is only read or written by single-key commands: the new token's lookup is written
//! *before* the rotation script makes it current, so a token is never current without being
//! findable. Lookups of revoked families simply point at nothing and expire on their own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::{StoreError, bounded, ms, random_id};
use crate::otp::hex;

/// Length of a refresh token in characters (32 bytes, base64url, no padding).
pub const REFRESH_TOKEN_LEN: usize = 43;

/// An opaque refresh token. Never printed.
pub struct RefreshToken(SecretString);

impl RefreshToken {
    /// A new random token.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(SecretString::from(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// A token as presented by a caller; `None` when it cannot be one of ours (wrong length or
    /// alphabet), which callers report as INVALID_ARGUMENT.
    pub fn parse(input: &str) -> Option<Self> {
        let input = input.trim();
        (input.len() == REFRESH_TOKEN_LEN
            && URL_SAFE_NO_PAD
                .decode(input)
                .is_ok_and(|bytes| bytes.len() == 32))
        .then(|| Self(SecretString::from(input.to_owned())))
    }

    /// The token itself, to hand to the client. Never log it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    fn hash(&self) -> String {
        hex(&Sha256::digest(self.expose().as_bytes()))
    }
}

impl std::fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshToken(<redacted>)")
    }
}

/// Who a family signs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyOwner {
    pub user_id: String,
    pub roles: Vec<String>,
}

/// A freshly issued refresh token.
#[derive(Debug)]
pub struct IssuedRefreshToken {
    pub token: RefreshToken,
    /// How long it is accepted.
    pub ttl: Duration,
}

/// The answer to a rotation.
#[derive(Debug)]
pub enum RotateOutcome {
    /// The presented token was current; `token` replaces it.
    Rotated {
        owner: FamilyOwner,
        token: IssuedRefreshToken,
    },
    /// The presented token had already been rotated: its family is now revoked.
    Reused,
    /// Unknown, expired or revoked.
    Invalid,
}

// KEYS: family, spent. ARGV: user, roles json, token hash, ttl ms, created.
const CREATE: &str = r#"
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'roles', ARGV[2], 'cur', ARGV[3], 'created', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

// KEYS: family, spent. ARGV: old hash, new hash, ttl ms.
// Returns {1, user, roles} rotated, {2, '', ''} reuse (family revoked), {0, '', ''} invalid.
const ROTATE: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'cur')
if not cur then return {0, '', ''} end
if cur == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cur', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  local owner = redis.call('HMGET', KEYS[1], 'user', 'roles')
  return {1, owner[1], owner[2]}
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return {2, '', ''}
end
return {0, '', ''}
"#;

/// Refresh-token families in Redis. Cheap to clone.
#[derive(Clone)]
pub struct RefreshStore {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
    call_timeout: Duration,
    create: std::sync::Arc<Script>,
    rotate: std::sync::Arc<Script>,
}

impl RefreshStore {
    /// A store using `conn`, keys under `prefix`; tokens live `ttl`
    /// (`REFRESH_TOKEN_TTL_SECONDS`).
    pub fn new(
        conn: ConnectionManager,
        prefix: impl Into<String>,
        ttl: Duration,
        call_timeout: Duration,
    ) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            ttl,
            call_timeout,
            create: std::sync::Arc::new(Script::new(CREATE)),
            rotate: std::sync::Arc::new(Script::new(ROTATE)),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn family_key(&self, family: &str, what: &str) -> String {
        format!("{}{{fam:{family}}}:{what}", self.prefix)
    }

    fn lookup_key(&self, token_hash: &str) -> String {
        format!("{}rt:{token_hash}", self.prefix)
    }

    /// Starts a family for `owner` (a sign-in) and returns its first token.
    pub async fn create_family(
        &self,
        owner: &FamilyOwner,
    ) -> Result<IssuedRefreshToken, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let family = random_id(16);
            let token = RefreshToken::generate();
            let hash = token.hash();
            let roles = serde_json::to_string(&owner.roles)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let created = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let () = conn
                .pset_ex(self.lookup_key(&hash), &family, ms(self.ttl))
                .await?;
            let _: i64 = self
                .create
                .key(self.family_key(&family, "family"))
                .key(self.family_key(&family, "spent"))
                .arg(&owner.user_id)
                .arg(roles)
                .arg(&hash)
                .arg(ms(self.ttl))
                .arg(created)
                .invoke_async(&mut conn)
                .await?;
            Ok(IssuedRefreshToken {
                token,
                ttl: self.ttl,
            })
        })
        .await
    }

    /// Exchanges `presented` for a new token of the same family, in one script: the current
    /// token rotates; an already-rotated one revokes the family; anything else is invalid.
    pub async fn rotate(&self, presented: &RefreshToken) -> Result<RotateOutcome, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let old_hash = presented.hash();
            let family: Option<String> = conn.get(self.lookup_key(&old_hash)).await?;
            let Some(family) = family else {
                return Ok(RotateOutcome::Invalid);
            };
            let token = RefreshToken::generate();
            let new_hash = token.hash();
            let new_lookup = self.lookup_key(&new_hash);
            let () = conn.pset_ex(&new_lookup, &family, ms(self.ttl)).await?;
            let (status, user_id, roles): (i64, String, String) = self
                .rotate
                .key(self.family_key(&family, "family"))
                .key(self.family_key(&family, "spent"))
                .arg(&old_hash)
                .arg(&new_hash)
                .arg(ms(self.ttl))
                .invoke_async(&mut conn)
                .await?;
            if status != 1 {
                let _: Result<i64, _> = conn.del(&new_lookup).await;
            }
            match status {
                1 => {
                    let roles: Vec<String> = serde_json::from_str(&roles)
                        .map_err(|e| StoreError::Corrupt(format!("family roles: {e}")))?;
                    Ok(RotateOutcome::Rotated {
                        owner: FamilyOwner { user_id, roles },
                        token: IssuedRefreshToken {
                            token,
                            ttl: self.ttl,
                        },
                    })
                }
                2 => Ok(RotateOutcome::Reused),
                0 => Ok(RotateOutcome::Invalid),
                other => Err(StoreError::Corrupt(format!(
                    "rotate script returned status {other}"
                ))),
            }
        })
        .await
    }

    /// Revokes the family `presented` belongs to (any of its tokens, current or rotated).
    /// Idempotent: `false` when there was nothing to revoke.
    pub async fn revoke(&self, presented: &RefreshToken) -> Result<bool, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let family: Option<String> = conn.get(self.lookup_key(&presented.hash())).await?;
            let Some(family) = family else {
                return Ok(false);
            };
            let removed: i64 = conn
                .del(&[
                    self.family_key(&family, "family"),
                    self.family_key(&family, "spent"),
                ])
                .await?;
            Ok(removed > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_256_bit_base64url_and_parse_back() {
        let token = RefreshToken::generate();
        assert_eq!(token.expose().len(), REFRESH_TOKEN_LEN);
        assert!(RefreshToken::parse(token.expose()).is_some());
        assert_ne!(token.expose(), RefreshToken::generate().expose());
        assert!(RefreshToken::parse("short").is_none());
        assert!(RefreshToken::parse(&"!".repeat(REFRESH_TOKEN_LEN)).is_none());
        assert!(!format!("{token:?}").contains(token.expose()));
    }
}
