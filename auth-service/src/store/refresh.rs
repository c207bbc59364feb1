//! Sessions: refresh-token families in Redis.
//!
//! A refresh token is 256 random bits, base64url without padding (43 characters). Only its
//! SHA-256 is stored. Each sign-in starts a *family* (a session, id = 128 random bits, unrelated
//! to any token); every rotation replaces the family's current token hash and remembers the old
//! one, so presenting an old token is recognised as reuse (a stolen token racing its owner) and
//! revokes the whole family, newest token included.
//!
//! **Lifetimes.** A family ends `REFRESH_TOKEN_MAX_LIFETIME_SECONDS` after sign-in whatever
//! happens; each token lives `REFRESH_TOKEN_TTL_SECONDS`, never past that end.
//!
//! **Retries.** The successor of a token is derived from it with a server key
//! (HMAC-SHA256), so presenting the token that was just rotated again within
//! `REFRESH_REUSE_GRACE_SECONDS` yields the very same successor (and, signed from the same
//! claims, the same access token): a lost response or two app processes refreshing at once is
//! not theft. After the window it is.
//!
//! Keys (prefix `P`, family id `f`, token hash `t`, user id `u`):
//!
//! | key | type | holds | TTL |
//! |---|---|---|---|
//! | `P{fam:f}:family` | hash | `user`, `roles` (JSON), `cur` / `prev` token hashes, `created`, `last`, `rot` (last rotation), `exp` (absolute end), `rexp` (current token's end), all ms; `client` (masked address) | current token's TTL |
//! | `P{fam:f}:spent` | set | hashes of rotated tokens | same |
//! | `Prt:t` | string | family id | refresh TTL of that token |
//! | `P{user:u}:sessions` | set | the user's family ids (dead ones are dropped when listed) | max lifetime, renewed at sign-in |
//!
//! The family keys share the family's hash tag, so the rotation script is single-slot on Redis
//! Cluster. The lookup key `Prt:t` and the user index cannot share it and are only used by
//! single-key commands: the new token's lookup is written *before* the rotation script makes it
//! current, so a token is never current without being findable; the index is written before
//! the family exists, and listing skips families that are gone.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use redis::{AsyncCommands, Script};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};

use super::{RedisConnection, StoreError, bounded, ms, random_id};
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
        Self::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8]) -> Self {
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

/// The server key that derives a token's successor and its access token's id. Never printed.
pub struct SuccessorKey(SecretBox<[u8; 32]>);

impl SuccessorKey {
    pub fn new(key: [u8; 32]) -> Self {
        Self(SecretBox::new(Box::new(key)))
    }

    fn mac(&self, label: &[u8], input: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret())
            .expect("HMAC accepts keys of any length");
        mac.update(label);
        mac.update(input.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The token that replaces `token` when it is rotated: unpredictable without the key, and
    /// the same every time, so a retried rotation hands out the same successor.
    pub fn successor(&self, token: &RefreshToken) -> RefreshToken {
        RefreshToken::from_bytes(&self.mac(b"refsys-refresh-successor-v1\0", token.expose()))
    }

    /// The `jti` of the access token minted with `token`: stable for retries, unlinkable to
    /// the token.
    pub fn token_id(&self, token: &RefreshToken) -> String {
        hex(&self.mac(b"refsys-access-jti-v1\0", token.expose())[..16])
    }
}

impl std::fmt::Debug for SuccessorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SuccessorKey(<redacted>)")
    }
}

/// A session id as a caller presents it (RevokeSession): 32 lowercase hex characters.
pub fn valid_session_id(input: &str) -> bool {
    input.len() == 32
        && input
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Who a family signs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyOwner {
    pub user_id: String,
    pub roles: Vec<String>,
}

/// A freshly issued refresh token of a session.
#[derive(Debug)]
pub struct IssuedRefreshToken {
    pub token: RefreshToken,
    /// The session (family) id.
    pub session_id: String,
    /// When the token stops being accepted.
    pub expires_at: SystemTime,
}

/// What a presented token is, before anything changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub session_id: String,
    pub user_id: String,
    /// The family's current token: rotating it needs the user's live roles.
    pub current: bool,
}

/// A rotation, first or replayed.
#[derive(Debug)]
pub struct Rotation {
    pub owner: FamilyOwner,
    pub session_id: String,
    pub token: RefreshToken,
    /// When the rotation happened: the access token's issue time.
    pub rotated_at: SystemTime,
    pub expires_at: SystemTime,
    /// A retry within the grace window: the same pair as the first time.
    pub replayed: bool,
}

/// The answer to a rotation.
#[derive(Debug)]
pub enum RotateOutcome {
    Rotated(Rotation),
    /// The presented token had already been rotated, outside the grace window: the family is
    /// now revoked.
    Reused,
    /// The family reached its absolute lifetime and is gone.
    LifetimeOver,
    /// Unknown, expired or revoked.
    Invalid,
}

/// One session of a user, for ListSessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: String,
    pub created_at: SystemTime,
    pub last_refresh_at: SystemTime,
    pub expires_at: SystemTime,
    pub client: String,
}

// KEYS: family, spent. ARGV: user, roles json, token hash, token ttl ms, now ms, absolute end
// ms, masked client.
pub(crate) const CREATE: &str = r#"
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'roles', ARGV[2], 'cur', ARGV[3], 'created', ARGV[5],
  'last', ARGV[5], 'rot', 0, 'exp', ARGV[6], 'rexp', ARGV[5] + ARGV[4], 'client', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

// KEYS: family, spent. ARGV: 1 old hash, 2 successor hash, 3 token ttl ms, 4 now ms, 5 grace
// ms, 6 live roles json. Returns {status, user, roles, rotated at ms, token end ms}: 1 rotated,
// 4 replayed (the old token again within the grace window: the same successor), 2 reuse
// (family revoked), 3 lifetime over (family removed), 0 invalid.
pub(crate) const ROTATE: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'cur', 'prev', 'rot', 'exp', 'user', 'roles', 'rexp')
local cur = f[1]
if not cur then return {0, '', '', 0, 0} end
local now = tonumber(ARGV[4])
if cur == ARGV[1] then
  local exp = tonumber(f[4])
  if now >= exp then
    redis.call('DEL', KEYS[1], KEYS[2])
    return {3, '', '', 0, 0}
  end
  local ttl = math.min(tonumber(ARGV[3]), exp - now)
  local rexp = now + ttl
  redis.call('HSET', KEYS[1], 'cur', ARGV[2], 'prev', ARGV[1], 'rot', now, 'last', now,
    'roles', ARGV[6], 'rexp', rexp)
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  return {1, f[5], ARGV[6], now, rexp}
end
if f[2] == ARGV[1] and cur == ARGV[2] and now - tonumber(f[3]) <= tonumber(ARGV[5]) then
  return {4, f[5], f[6], tonumber(f[3]), tonumber(f[7])}
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return {2, '', '', 0, 0}
end
return {0, '', '', 0, 0}
"#;

fn millis_since_epoch(at: SystemTime) -> u64 {
    u64::try_from(
        at.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

fn at_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Lifetimes of sessions. `Default` gives the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// `REFRESH_TOKEN_TTL_SECONDS` (30 days): how long one refresh token is accepted.
    pub token_ttl: Duration,
    /// `REFRESH_TOKEN_MAX_LIFETIME_SECONDS` (90 days): a session's absolute end, counted from
    /// sign-in.
    pub max_lifetime: Duration,
    /// `REFRESH_REUSE_GRACE_SECONDS` (10): how long the token just rotated still replays its
    /// rotation instead of counting as theft.
    pub reuse_grace: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(30 * 24 * 3600),
            max_lifetime: Duration::from_secs(90 * 24 * 3600),
            reuse_grace: Duration::from_secs(10),
        }
    }
}

/// Sessions in Redis. Cheap to clone.
#[derive(Clone)]
pub struct RefreshStore {
    conn: RedisConnection,
    prefix: String,
    limits: SessionLimits,
    call_timeout: Duration,
    key: std::sync::Arc<SuccessorKey>,
    create: std::sync::Arc<Script>,
    rotate: std::sync::Arc<Script>,
}

impl RefreshStore {
    /// A store using `conn`, keys under `prefix`, successors derived with `key`.
    pub fn new(
        conn: RedisConnection,
        prefix: impl Into<String>,
        limits: SessionLimits,
        key: SuccessorKey,
        call_timeout: Duration,
    ) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            limits,
            call_timeout,
            key: std::sync::Arc::new(key),
            create: std::sync::Arc::new(Script::new(CREATE)),
            rotate: std::sync::Arc::new(Script::new(ROTATE)),
        }
    }

    pub fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    /// The `jti` for the access token minted alongside `token`.
    pub fn token_id(&self, token: &RefreshToken) -> String {
        self.key.token_id(token)
    }

    fn family_key(&self, family: &str, what: &str) -> String {
        format!("{}{{fam:{family}}}:{what}", self.prefix)
    }

    fn lookup_key(&self, token_hash: &str) -> String {
        format!("{}rt:{token_hash}", self.prefix)
    }

    fn user_key(&self, user_id: &str) -> String {
        format!("{}{{user:{user_id}}}:sessions", self.prefix)
    }

    /// Starts a session for `owner` (a sign-in from `client`, masked) and returns its first
    /// token.
    pub async fn create_family(
        &self,
        owner: &FamilyOwner,
        client: &str,
        now: SystemTime,
    ) -> Result<IssuedRefreshToken, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let family = random_id(16);
            let token = RefreshToken::generate();
            let hash = token.hash();
            let roles = serde_json::to_string(&owner.roles)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let ttl = self.limits.token_ttl.min(self.limits.max_lifetime);
            let now_ms = millis_since_epoch(now);
            let index = self.user_key(&owner.user_id);
            let () = conn.sadd(&index, &family).await?;
            let _: bool = conn
                .pexpire(&index, ms(self.limits.max_lifetime) as i64)
                .await?;
            let () = conn
                .pset_ex(self.lookup_key(&hash), &family, ms(ttl))
                .await?;
            let _: i64 = self
                .create
                .key(self.family_key(&family, "family"))
                .key(self.family_key(&family, "spent"))
                .arg(&owner.user_id)
                .arg(roles)
                .arg(&hash)
                .arg(ms(ttl))
                .arg(now_ms)
                .arg(now_ms + ms(self.limits.max_lifetime))
                .arg(client)
                .invoke_async(&mut conn)
                .await?;
            Ok(IssuedRefreshToken {
                token,
                session_id: family,
                expires_at: at_millis(now_ms + ms(ttl)),
            })
        })
        .await
    }

    /// Which session `presented` belongs to and whose it is, changing nothing; `None` when it
    /// belongs to none.
    pub async fn peek(&self, presented: &RefreshToken) -> Result<Option<Presented>, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let hash = presented.hash();
            let family: Option<String> = conn.get(self.lookup_key(&hash)).await?;
            let Some(family) = family else {
                return Ok(None);
            };
            let (user, cur): (Option<String>, Option<String>) = conn
                .hget(self.family_key(&family, "family"), &["user", "cur"])
                .await?;
            Ok(user.map(|user_id| Presented {
                current: cur.as_deref() == Some(hash.as_str()),
                session_id: family,
                user_id,
            }))
        })
        .await
    }

    /// Exchanges `presented` for its successor, in one script, recording `roles` (the user's
    /// live roles) for the new access token: the current token rotates; the token just rotated,
    /// within the grace window, replays that rotation; an older one revokes the family.
    pub async fn rotate(
        &self,
        presented: &RefreshToken,
        session_id: &str,
        roles: &[String],
        now: SystemTime,
    ) -> Result<RotateOutcome, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let old_hash = presented.hash();
            let successor = self.key.successor(presented);
            let new_hash = successor.hash();
            let new_lookup = self.lookup_key(&new_hash);
            let ttl = self.limits.token_ttl.min(self.limits.max_lifetime);
            let () = conn.pset_ex(&new_lookup, session_id, ms(ttl)).await?;
            let roles_json =
                serde_json::to_string(roles).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let (status, user_id, roles, rotated_ms, expires_ms): (i64, String, String, u64, u64) =
                self.rotate
                    .key(self.family_key(session_id, "family"))
                    .key(self.family_key(session_id, "spent"))
                    .arg(&old_hash)
                    .arg(&new_hash)
                    .arg(ms(ttl))
                    .arg(millis_since_epoch(now))
                    .arg(ms(self.limits.reuse_grace))
                    .arg(roles_json)
                    .invoke_async(&mut conn)
                    .await?;
            if !matches!(status, 1 | 4) {
                let _: Result<i64, _> = conn.del(&new_lookup).await;
            }
            match status {
                1 | 4 => {
                    let roles: Vec<String> = serde_json::from_str(&roles)
                        .map_err(|e| StoreError::Corrupt(format!("family roles: {e}")))?;
                    Ok(RotateOutcome::Rotated(Rotation {
                        owner: FamilyOwner { user_id, roles },
                        session_id: session_id.to_owned(),
                        token: successor,
                        rotated_at: at_millis(rotated_ms),
                        expires_at: at_millis(expires_ms),
                        replayed: status == 4,
                    }))
                }
                2 => Ok(RotateOutcome::Reused),
                3 => Ok(RotateOutcome::LifetimeOver),
                0 => Ok(RotateOutcome::Invalid),
                other => Err(StoreError::Corrupt(format!(
                    "rotate script returned status {other}"
                ))),
            }
        })
        .await
    }

    /// Revokes the session `presented` belongs to (any of its tokens, current or rotated).
    /// Idempotent: `false` when there was nothing to revoke.
    pub async fn revoke(&self, presented: &RefreshToken) -> Result<bool, StoreError> {
        let Some(found) = self.peek(presented).await? else {
            return Ok(false);
        };
        self.revoke_session(&found.user_id, &found.session_id).await
    }

    /// Ends `user_id`'s session `session_id`; `false` when the user has no such session
    /// (another user's session included).
    pub async fn revoke_session(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<bool, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let family = self.family_key(session_id, "family");
            let owner: Option<String> = conn.hget(&family, "user").await?;
            if owner.as_deref() != Some(user_id) {
                return Ok(false);
            }
            let removed: i64 = conn
                .del(&[family, self.family_key(session_id, "spent")])
                .await?;
            let _: i64 = conn.srem(self.user_key(user_id), session_id).await?;
            Ok(removed > 0)
        })
        .await
    }

    /// The user's live sessions, newest first. Sessions that ended on their own are dropped
    /// from the index on the way.
    pub async fn sessions(&self, user_id: &str) -> Result<Vec<SessionInfo>, StoreError> {
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let index = self.user_key(user_id);
            let families: Vec<String> = conn.smembers(&index).await?;
            let mut sessions = Vec::with_capacity(families.len());
            for family in families {
                type Fields = (
                    Option<String>,
                    Option<u64>,
                    Option<u64>,
                    Option<u64>,
                    Option<u64>,
                    Option<String>,
                );
                let (owner, created, last, exp, rexp, client): Fields = conn
                    .hget(
                        self.family_key(&family, "family"),
                        &["user", "created", "last", "exp", "rexp", "client"],
                    )
                    .await?;
                match (owner, created, last, exp, rexp) {
                    (Some(owner), Some(created), Some(last), Some(exp), Some(rexp))
                        if owner == user_id =>
                    {
                        sessions.push(SessionInfo {
                            session_id: family,
                            created_at: at_millis(created),
                            last_refresh_at: at_millis(last),
                            expires_at: at_millis(rexp.min(exp)),
                            client: client.unwrap_or_default(),
                        });
                    }
                    _ => {
                        let _: i64 = conn.srem(&index, &family).await?;
                    }
                }
            }
            sessions.sort_by_key(|session| std::cmp::Reverse(session.created_at));
            Ok(sessions)
        })
        .await
    }

    /// Ends every session of `user_id`; returns how many were live.
    pub async fn revoke_all(&self, user_id: &str) -> Result<u32, StoreError> {
        let sessions = self.sessions(user_id).await?;
        let mut revoked = 0;
        for session in &sessions {
            revoked += u32::from(self.revoke_session(user_id, &session.session_id).await?);
        }
        bounded(self.call_timeout, async {
            let mut conn = self.conn.clone();
            let _: i64 = conn.del(self.user_key(user_id)).await?;
            Ok(revoked)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successors_are_stable_keyed_and_unlike_their_token() {
        let key = SuccessorKey::new([7; 32]);
        let token = RefreshToken::generate();
        let next = key.successor(&token);
        assert_eq!(next.expose(), key.successor(&token).expose());
        assert_eq!(next.expose().len(), REFRESH_TOKEN_LEN);
        assert!(RefreshToken::parse(next.expose()).is_some());
        assert_ne!(next.expose(), token.expose());
        assert_ne!(
            next.expose(),
            SuccessorKey::new([8; 32]).successor(&token).expose()
        );
        assert_eq!(key.token_id(&next).len(), 32);
        assert!(!format!("{key:?}").contains('7'));
    }

    #[test]
    fn session_ids_are_32_lowercase_hex() {
        assert!(valid_session_id(&random_id(16)));
        for bad in ["", "abc", &"A".repeat(32), &"g".repeat(32), &"0".repeat(33)] {
            assert!(!valid_session_id(bad), "{bad}");
        }
    }

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
