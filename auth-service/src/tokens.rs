//! Minting tokens: user access tokens, short-lived service tokens for referral-service, and
//! the JWK set of accepted public keys. Signing keys come from PEM files (or an ephemeral dev key).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use service_kit::tokens::{Claims, Jwk, KeySet, SigningKey, Verified, Verifier};

use crate::error::AuthError;

/// The subject of auth-service's own service tokens (no service client may use this id).
pub const SERVICE_SUBJECT: &str = "auth-service";

/// The current time, injected so that time-dependent behaviour is testable.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Loads the signing key (PKCS#8 PEM) and the previous public keys (SPKI PEM) still accepted.
/// Without a signing key file, a fresh key is generated and a warning logged.
pub fn load_keys(
    signing_key_file: Option<&Path>,
    previous_public_key_files: &[std::path::PathBuf],
) -> Result<(SigningKey, Vec<Jwk>), String> {
    let signing = match signing_key_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|err| format!("JWT_SIGNING_KEY_FILE {}: {err}", path.display()))?;
            SigningKey::from_pkcs8_pem(&pem)
                .map_err(|err| format!("JWT_SIGNING_KEY_FILE {}: {err}", path.display()))?
        }
        None => {
            tracing::warn!(
                "JWT_SIGNING_KEY_FILE is not set: signing with an EPHEMERAL key. Tokens die with this \
                 process and replicas will not accept each other's tokens. Never run like this in production."
            );
            SigningKey::generate()
        }
    };
    let previous = previous_public_key_files
        .iter()
        .map(|path| {
            let pem = std::fs::read_to_string(path)
                .map_err(|err| format!("JWT_PREVIOUS_PUBLIC_KEYS {}: {err}", path.display()))?;
            Jwk::from_public_pem(&pem)
                .map_err(|err| format!("JWT_PREVIOUS_PUBLIC_KEYS {}: {err}", path.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((signing, previous))
}

/// An access token and when it expires.
pub struct AccessToken {
    pub token: String,
    pub expires_at: SystemTime,
}

pub struct TokenIssuer {
    signing: SigningKey,
    jwks: Vec<Jwk>,
    user_verifier: Verifier,
    issuer: String,
    audience: String,
    access_ttl: Duration,
    clock: Arc<dyn Clock>,
}

impl TokenIssuer {
    pub fn new(
        signing: SigningKey,
        previous: Vec<Jwk>,
        issuer: &str,
        audience: &str,
        access_ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mut jwks = vec![signing.public_jwk().clone()];
        jwks.extend(previous.into_iter().filter(|jwk| jwk.kid != signing.kid()));
        let user_verifier = Verifier::new(issuer, &[audience], KeySet::from_jwks(&jwks));
        Self {
            signing,
            jwks,
            user_verifier,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            access_ttl,
            clock,
        }
    }

    fn claims(&self, subject: &str, audience: &str, ttl: Duration) -> (Claims, SystemTime) {
        let now = self.clock.now();
        let expires_at = now + ttl;
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: audience.to_owned(),
            sub: subject.to_owned(),
            exp: unix_seconds(expires_at),
            iat: unix_seconds(now),
            jti: uuid::Uuid::new_v4().to_string(),
            roles: Vec::new(),
            scope: None,
            sid: None,
        };
        (claims, expires_at)
    }

    /// A user's access token.
    pub fn access_token(&self, user_id: &str, roles: &[String]) -> Result<AccessToken, AuthError> {
        let (mut claims, expires_at) = self.claims(user_id, &self.audience, self.access_ttl);
        claims.roles = roles.to_vec();
        let token = self.signing.sign(&claims).map_err(AuthError::internal)?;
        Ok(AccessToken { token, expires_at })
    }

    /// A user's access token for session `sid`, issued at `issued_at` with the id `jti`. The
    /// same arguments give the same token (Ed25519 signatures are deterministic): that is how a
    /// retried refresh gets the very pair its first attempt got.
    pub fn session_access_token(
        &self,
        user_id: &str,
        roles: &[String],
        sid: &str,
        issued_at: SystemTime,
        jti: String,
    ) -> Result<AccessToken, AuthError> {
        let issued = unix_seconds(issued_at);
        let expires_at = UNIX_EPOCH + Duration::from_secs(issued) + self.access_ttl;
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user_id.to_owned(),
            exp: unix_seconds(expires_at),
            iat: issued,
            jti,
            roles: roles.to_vec(),
            scope: None,
            sid: Some(sid.to_owned()),
        };
        let token = self.signing.sign(&claims).map_err(AuthError::internal)?;
        Ok(AccessToken { token, expires_at })
    }

    /// A short-lived token that lets auth-service call `audience` with `scope`.
    pub fn service_token(
        &self,
        audience: &str,
        scope: &str,
        ttl: Duration,
    ) -> Result<String, AuthError> {
        self.scoped_token(SERVICE_SUBJECT, audience, &[scope], ttl)
            .map(|token| token.token)
    }

    /// A service token: `subject` (auth-service itself, or a service client's id) may call
    /// `audience` with `scopes`, space-separated in the `scope` claim, for `ttl` (whole
    /// seconds: `expires_at` is exactly the `exp` claim).
    pub fn scoped_token(
        &self,
        subject: &str,
        audience: &str,
        scopes: &[&str],
        ttl: Duration,
    ) -> Result<AccessToken, AuthError> {
        if scopes.is_empty() || scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
            return Err(AuthError::internal(
                "a service token needs at least one scope, each without spaces",
            ));
        }
        let (mut claims, _) = self.claims(subject, audience, ttl);
        claims.scope = Some(scopes.join(" "));
        let expires_at = UNIX_EPOCH + Duration::from_secs(claims.exp);
        let token = self.signing.sign(&claims).map_err(AuthError::internal)?;
        Ok(AccessToken { token, expires_at })
    }

    /// The claims of a valid user access token; `None` for anything else.
    pub fn introspect(&self, token: &str) -> Option<Verified> {
        self.user_verifier.verify(token).ok()
    }

    /// The accepted public keys, the current signing key first.
    pub fn jwks(&self) -> &[Jwk] {
        &self.jwks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FixedClock(SystemTime);

    impl Clock for FixedClock {
        fn now(&self) -> SystemTime {
            self.0
        }
    }

    fn issuer(signing: SigningKey, previous: Vec<Jwk>, clock: Arc<dyn Clock>) -> TokenIssuer {
        TokenIssuer::new(
            signing,
            previous,
            "refsys-auth",
            "refsys",
            Duration::from_secs(900),
            clock,
        )
    }

    #[test]
    fn session_tokens_are_deterministic_and_carry_the_session() {
        let issuer = TokenIssuer::new(
            SigningKey::generate(),
            Vec::new(),
            "refsys-auth",
            "refsys",
            Duration::from_secs(900),
            Arc::new(FixedClock(UNIX_EPOCH + Duration::from_secs(1_800_000_000))),
        );
        let at = UNIX_EPOCH + Duration::from_millis(1_800_000_123_456);
        let roles = vec!["admin".to_owned()];
        let a = issuer
            .session_access_token("u1", &roles, "s1", at, "j1".into())
            .unwrap();
        let b = issuer
            .session_access_token("u1", &roles, "s1", at, "j1".into())
            .unwrap();
        assert_eq!(a.token, b.token);
        assert_eq!(
            a.expires_at,
            UNIX_EPOCH + Duration::from_secs(1_800_000_123 + 900)
        );
        let claims = issuer.introspect(&a.token).unwrap().claims;
        assert_eq!(claims.sid.as_deref(), Some("s1"));
        assert_eq!(claims.iat, 1_800_000_123);
        let other = issuer
            .session_access_token("u1", &roles, "s1", at, "j2".into())
            .unwrap();
        assert_ne!(a.token, other.token);
    }

    #[test]
    fn access_tokens_introspect_with_their_claims() {
        let issuer = issuer(SigningKey::generate(), Vec::new(), Arc::new(SystemClock));
        let token = issuer.access_token("user-1", &["admin".into()]).unwrap();
        let verified = issuer.introspect(&token.token).expect("active");
        assert_eq!(verified.claims.sub, "user-1");
        assert_eq!(verified.claims.roles, vec!["admin".to_owned()]);
        assert_eq!(verified.claims.exp - verified.claims.iat, 900);
    }

    #[test]
    fn expired_forged_and_service_tokens_are_not_active() {
        let an_hour_ago = Arc::new(FixedClock(SystemTime::now() - Duration::from_secs(3600)));
        let key = SigningKey::generate();
        let jwk = key.public_jwk().clone();
        let old = issuer(key, Vec::new(), an_hour_ago);
        let expired = old.access_token("user-1", &[]).unwrap().token;
        let current = issuer(SigningKey::generate(), vec![jwk], Arc::new(SystemClock));
        assert!(current.introspect(&expired).is_none(), "expired");
        let forged = issuer(SigningKey::generate(), Vec::new(), Arc::new(SystemClock))
            .access_token("user-1", &[])
            .unwrap()
            .token;
        assert!(current.introspect(&forged).is_none(), "unknown key");
        let service = current
            .service_token(
                "referral-service",
                "referral.users.ensure",
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(current.introspect(&service).is_none(), "not a user token");
        assert!(current.introspect("garbage").is_none());
    }

    #[test]
    fn client_tokens_carry_audience_subject_scopes_and_expiry() {
        let now = UNIX_EPOCH + Duration::from_millis(1_800_000_000_700);
        let issuer = issuer(
            SigningKey::generate(),
            Vec::new(),
            Arc::new(FixedClock(now)),
        );
        let token = issuer
            .scoped_token(
                "shop",
                service_kit::tokens::REFERRAL_SERVICE_AUDIENCE,
                &["referral.points.read", "referral.points.redeem"],
                Duration::from_secs(600),
            )
            .unwrap();
        assert_eq!(
            token.expires_at,
            UNIX_EPOCH + Duration::from_secs(1_800_000_000 + 600)
        );
        // Read the claims without checking `exp` (the fixed clock is in the future or past).
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.validate_exp = false;
        validation.set_audience(&[service_kit::tokens::REFERRAL_SERVICE_AUDIENCE]);
        let key = jsonwebtoken::DecodingKey::from_ed_components(&issuer.jwks()[0].x).unwrap();
        let claims = jsonwebtoken::decode::<Claims>(&token.token, &key, &validation)
            .unwrap()
            .claims;
        assert_eq!(claims.aud, "referral-service");
        assert_eq!(claims.sub, "shop");
        assert_eq!(claims.iss, "refsys-auth");
        assert_eq!(
            claims.scope.as_deref(),
            Some("referral.points.read referral.points.redeem")
        );
        assert!(claims.has_scope("referral.points.redeem"));
        assert!(!claims.has_scope("referral.users.read"));
        assert_eq!((claims.iat, claims.exp), (1_800_000_000, 1_800_000_600));
        assert!(claims.roles.is_empty() && claims.sid.is_none());
        assert!(
            issuer.introspect(&token.token).is_none(),
            "not a user token"
        );
        assert!(
            issuer
                .scoped_token("shop", "referral-service", &[], Duration::from_secs(60))
                .is_err()
        );
        // auth-service's own tokens keep their subject and single scope.
        let own = issuer
            .service_token(
                "referral-service",
                "referral.users.ensure",
                Duration::from_secs(60),
            )
            .unwrap();
        let own = jsonwebtoken::decode::<Claims>(&own, &key, &validation)
            .unwrap()
            .claims;
        assert_eq!(own.sub, SERVICE_SUBJECT);
        assert_eq!(own.scope.as_deref(), Some("referral.users.ensure"));
    }

    #[test]
    fn previous_keys_stay_accepted_and_are_published_after_the_current_one() {
        let old_issuer = issuer(SigningKey::generate(), Vec::new(), Arc::new(SystemClock));
        let token = old_issuer.access_token("user-1", &[]).unwrap().token;
        let old_jwk = old_issuer.jwks()[0].clone();

        let rotated = issuer(
            SigningKey::generate(),
            vec![old_jwk.clone()],
            Arc::new(SystemClock),
        );
        assert_eq!(rotated.jwks().len(), 2);
        assert_eq!(rotated.jwks()[1], old_jwk);
        assert!(
            rotated.introspect(&token).is_some(),
            "a token of the previous key still verifies"
        );
    }
}
