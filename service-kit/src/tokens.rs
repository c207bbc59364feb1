//! Access tokens: EdDSA (Ed25519) JWTs. auth-service signs them; every service verifies them
//! locally against auth-service's published keys (a JWK set).
//!
//! Verification pins the algorithm to EdDSA and requires `iss`, `aud`, `sub` and `exp`, so
//! `alg: none`, HMAC-confusion, a wrong key, a wrong audience and an expired token all fail.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// JOSE `typ` of access tokens (RFC 9068).
pub const ACCESS_TOKEN_TYPE: &str = "at+jwt";
/// The role that grants AdminService.
pub const ADMIN_ROLE: &str = "admin";
/// Audience of service tokens that auth-service presents to referral-service.
pub const REFERRAL_SERVICE_AUDIENCE: &str = "referral-service";
/// Scope a service token needs for `UserDirectory.EnsureUser`.
pub const ENSURE_USER_SCOPE: &str = "referral.users.ensure";
/// Scope a service token needs for `UserDirectory.LookupUser` (live roles at refresh).
pub const LOOKUP_USER_SCOPE: &str = "referral.users.read";
/// Scope a service token needs for `UserDirectory.DeleteUser`.
pub const DELETE_USER_SCOPE: &str = "referral.users.delete";
/// Scope of `PointsService` reads (a user's balance), for service clients.
pub const POINTS_READ_SCOPE: &str = "referral.points.read";
/// Scope of `PointsService` redemptions (spending a user's points), for service clients.
pub const POINTS_REDEEM_SCOPE: &str = "referral.points.redeem";
/// Scope of `PointsService` grants (adding points to a user's balance), for service clients.
pub const POINTS_GRANT_SCOPE: &str = "referral.points.grant";
/// Scope of `EventService` (reading the referral event stream), for service clients.
pub const EVENTS_READ_SCOPE: &str = "referral.events.read";

/// The claims of every refsys token. User tokens carry `roles`; service tokens carry `scope`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The session (refresh-token family) a user token was minted for, so the holder's own
    /// session can be told apart in `ListSessions`. Random, unrelated to the refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

impl Claims {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    pub fn has_scope(&self, wanted: &str) -> bool {
        self.scope
            .as_deref()
            .is_some_and(|scope| scope.split_whitespace().any(|s| s == wanted))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM document")]
    NotPem,
    #[error("not an Ed25519 key: {0}")]
    NotEd25519(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is signed with an unknown key")]
    UnknownKey(String),
    #[error("token has expired")]
    Expired,
    #[error("token is invalid: {0}")]
    Invalid(String),
    #[error("token could not be signed: {0}")]
    Signing(String),
}

/// A public key in JWK form (RFC 8037 `OKP` / `Ed25519`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}

impl Jwk {
    /// The JWK of a raw 32-byte Ed25519 public key; `kid` is its RFC 7638 thumbprint.
    pub fn from_public_key(public_key: &[u8]) -> Self {
        let x = URL_SAFE_NO_PAD.encode(public_key);
        let thumbprint_input = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            thumbprint_input.as_bytes(),
        ));
        Self {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x,
            kid,
            alg: "EdDSA".into(),
            use_: "sig".into(),
        }
    }

    /// The JWK of an Ed25519 public key in SPKI PEM ("BEGIN PUBLIC KEY").
    pub fn from_public_pem(pem: &str) -> Result<Self, KeyError> {
        const SPKI_ED25519_PREFIX: [u8; 12] = [
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        let der = pem_to_der(pem)?;
        match der.strip_prefix(&SPKI_ED25519_PREFIX) {
            Some(key) if key.len() == 32 => Ok(Self::from_public_key(key)),
            _ => Err(KeyError::NotEd25519(
                "expected an Ed25519 SubjectPublicKeyInfo".into(),
            )),
        }
    }

    /// A JWK set document (RFC 7517) of `keys`.
    pub fn set_json(keys: &[Jwk]) -> String {
        serde_json::json!({ "keys": keys }).to_string()
    }
}

/// The wire form published by `AuthService.GetJwks`.
impl From<&Jwk> for refsys_proto::auth::v1::Jwk {
    fn from(jwk: &Jwk) -> Self {
        Self {
            kty: jwk.kty.clone(),
            crv: jwk.crv.clone(),
            x: jwk.x.clone(),
            kid: jwk.kid.clone(),
            alg: jwk.alg.clone(),
            r#use: jwk.use_.clone(),
        }
    }
}

impl From<refsys_proto::auth::v1::Jwk> for Jwk {
    fn from(key: refsys_proto::auth::v1::Jwk) -> Self {
        Self {
            kty: key.kty,
            crv: key.crv,
            x: key.x,
            kid: key.kid,
            alg: key.alg,
            use_: key.r#use,
        }
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, KeyError> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("-----") && !line.is_empty())
        .collect();
    if body.is_empty() || !pem.contains("-----BEGIN") {
        return Err(KeyError::NotPem);
    }
    STANDARD.decode(body).map_err(|_| KeyError::NotPem)
}

/// The private key that signs tokens, with its public half for the JWK set.
pub struct SigningKey {
    /// Parsed once: jsonwebtoken's `encode` parses the PKCS#8 key on every call, which derives
    /// the public key again (a second base-point multiplication, as costly as the signature).
    pair: ring::signature::Ed25519KeyPair,
    jwk: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.jwk.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// An Ed25519 private key in PKCS#8 PEM, as `openssl genpkey -algorithm ed25519` writes it.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        Self::from_pkcs8_der(&pem_to_der(pem)?)
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        use ring::signature::KeyPair;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|err| KeyError::NotEd25519(err.to_string()))?;
        let jwk = Jwk::from_public_key(pair.public_key().as_ref());
        Ok(Self { pair, jwk })
    }

    /// A fresh random key: for development only, since tokens die with the process.
    pub fn generate() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let der = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("the system CSPRNG is available");
        Self::from_pkcs8_der(der.as_ref()).expect("ring generates valid Ed25519 PKCS#8")
    }

    pub fn kid(&self) -> &str {
        &self.jwk.kid
    }

    pub fn public_jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// Signs `claims` as an access token with this key's `kid`.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.jwk.kid.clone());
        header.typ = Some(ACCESS_TOKEN_TYPE.into());
        self.encode(&header, claims)
    }

    /// What `jsonwebtoken::encode` makes of `header` and `claims` with this key, byte for byte,
    /// without parsing the key again.
    fn encode<T: Serialize>(&self, header: &Header, claims: &T) -> Result<String, TokenError> {
        let message = format!("{}.{}", json_part(header)?, json_part(claims)?);
        let signature = self.pair.sign(message.as_bytes());
        Ok(format!(
            "{message}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

/// One base64url part of a JWT: `value` as JSON.
fn json_part<T: Serialize>(value: &T) -> Result<String, TokenError> {
    serde_json::to_vec(value)
        .map(|json| URL_SAFE_NO_PAD.encode(json))
        .map_err(|err| TokenError::Signing(err.to_string()))
}

/// Public keys by `kid`.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, Arc<DecodingKey>>,
}

impl KeySet {
    pub fn from_jwks<'a>(jwks: impl IntoIterator<Item = &'a Jwk>) -> Self {
        let keys = jwks
            .into_iter()
            .filter(|jwk| jwk.kty == "OKP" && jwk.crv == "Ed25519")
            .filter_map(|jwk| {
                DecodingKey::from_ed_components(&jwk.x)
                    .ok()
                    .map(|key| (jwk.kid.clone(), Arc::new(key)))
            })
            .collect();
        Self { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }
}

/// How many verified tokens [`Verifier`] remembers.
const VERIFIED_CACHE_CAPACITY: usize = 4_096;

/// Verifies access tokens against a replaceable [`KeySet`] (replaced when keys rotate).
///
/// A token verified once is remembered until it expires (or the keys change), because an
/// Ed25519 signature check is the largest cost of a cheap read such as GetProfile; a cached
/// token still has its expiry checked on every use.
pub struct Verifier {
    validation: Validation,
    keys: RwLock<Arc<KeySet>>,
    verified: std::sync::Mutex<HashMap<Box<str>, Verified>>,
}

impl Verifier {
    /// Accepts tokens issued by `issuer` for any of `audiences`.
    pub fn new(issuer: &str, audiences: &[&str], keys: KeySet) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.set_issuer(&[issuer]);
        validation.set_audience(audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Self {
            validation,
            keys: RwLock::new(Arc::new(keys)),
            verified: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn replace_keys(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        // A key that left the set must stop vouching for the tokens it signed.
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The claims of `token` when it is a valid access token.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(hit) = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
        {
            if now < hit.claims.exp.saturating_add(self.validation.leeway) {
                return Ok(hit.clone());
            }
            return Err(TokenError::Expired);
        }
        let verified = self.verify_signature(token)?;
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= VERIFIED_CACHE_CAPACITY {
            // Dropping everything is crude but O(1) amortised and bounded; hot tokens return
            // on their next use.
            cache.clear();
        }
        cache.insert(token.into(), verified.clone());
        Ok(verified)
    }

    fn verify_signature(&self, token: &str) -> Result<Verified, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid("algorithm must be EdDSA".into()));
        }
        if header.typ.as_deref() != Some(ACCESS_TOKEN_TYPE) {
            return Err(TokenError::Invalid("not an access token".into()));
        }
        let kid = header.kid.ok_or(TokenError::Malformed)?;
        let key = self
            .keys()
            .keys
            .get(&kid)
            .cloned()
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(|err| {
                use jsonwebtoken::errors::ErrorKind;
                match err.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::InvalidToken
                    | ErrorKind::Base64(_)
                    | ErrorKind::Json(_)
                    | ErrorKind::Utf8(_) => TokenError::Malformed,
                    other => TokenError::Invalid(format!("{other:?}")),
                }
            })?;
        Ok(Verified {
            key_id: kid,
            claims: data.claims,
        })
    }
}

/// A verified token: its claims and the key that signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    pub key_id: String,
    pub claims: Claims,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    }

    fn claims(aud: &str, exp: u64) -> Claims {
        Claims {
            iss: "refsys-auth".into(),
            aud: aud.into(),
            sub: "user-1".into(),
            exp,
            iat: now(),
            jti: "j1".into(),
            roles: vec![],
            scope: None,
            sid: None,
        }
    }

    fn verifier_for(key: &SigningKey) -> Verifier {
        Verifier::new(
            "refsys-auth",
            &["refsys"],
            KeySet::from_jwks([key.public_jwk()]),
        )
    }

    #[test]
    fn a_signed_token_verifies_and_keeps_its_claims() {
        let key = SigningKey::generate();
        let token = key.sign(&claims("refsys", now() + 60)).unwrap();
        let verified = verifier_for(&key).verify(&token).unwrap();
        assert_eq!(verified.claims.sub, "user-1");
        assert_eq!(verified.key_id, key.kid());
    }

    #[test]
    fn expired_wrong_audience_wrong_key_and_garbage_are_rejected() {
        let key = SigningKey::generate();
        let verifier = verifier_for(&key);
        let expired = key.sign(&claims("refsys", now() - 600)).unwrap();
        assert_eq!(verifier.verify(&expired).unwrap_err(), TokenError::Expired);
        let other_aud = key.sign(&claims("elsewhere", now() + 60)).unwrap();
        assert!(matches!(
            verifier.verify(&other_aud),
            Err(TokenError::Invalid(_))
        ));
        let stranger = SigningKey::generate()
            .sign(&claims("refsys", now() + 60))
            .unwrap();
        assert!(matches!(
            verifier.verify(&stranger),
            Err(TokenError::UnknownKey(_))
        ));
        assert_eq!(
            verifier.verify("not.a.jwt").unwrap_err(),
            TokenError::Malformed
        );
    }

    #[test]
    fn alg_none_and_hmac_tokens_are_rejected() {
        let key = SigningKey::generate();
        let verifier = verifier_for(&key);
        let body =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("refsys", now() + 60)).unwrap());
        for alg in ["none", "HS256"] {
            let header = URL_SAFE_NO_PAD.encode(format!(
                r#"{{"alg":"{alg}","typ":"at+jwt","kid":"{}"}}"#,
                key.kid()
            ));
            let token = format!("{header}.{body}.");
            assert!(verifier.verify(&token).is_err(), "{alg} accepted");
        }
    }

    #[test]
    fn a_remembered_token_still_expires_and_key_changes_forget_it() {
        let key = SigningKey::generate();
        let verifier = verifier_for(&key);
        // Expired 4 s ago: still inside the 5 s leeway, outside it 2 s later.
        let short = key.sign(&claims("refsys", now() - 4)).unwrap();
        assert!(verifier.verify(&short).is_ok());
        assert!(verifier.verify(&short).is_ok(), "served from the cache");
        std::thread::sleep(std::time::Duration::from_secs(2));
        assert_eq!(verifier.verify(&short).unwrap_err(), TokenError::Expired);

        let token = key.sign(&claims("refsys", now() + 60)).unwrap();
        assert!(verifier.verify(&token).is_ok());
        verifier.replace_keys(KeySet::from_jwks([SigningKey::generate().public_jwk()]));
        assert!(matches!(
            verifier.verify(&token),
            Err(TokenError::UnknownKey(_))
        ));
    }

    #[test]
    fn a_token_without_sub_is_rejected() {
        let key = SigningKey::generate();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid().into());
        header.typ = Some(ACCESS_TOKEN_TYPE.into());
        let body = serde_json::json!({"iss": "refsys-auth", "aud": "refsys", "exp": now() + 60});
        let token = key.encode(&header, &body).unwrap();
        assert!(verifier_for(&key).verify(&token).is_err());
    }

    #[test]
    fn tokens_are_byte_for_byte_what_jsonwebtoken_signs() {
        let der = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap();
        let key = SigningKey::from_pkcs8_der(der.as_ref()).unwrap();
        let claims = claims("refsys", now() + 60);
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid().into());
        header.typ = Some(ACCESS_TOKEN_TYPE.into());
        let theirs = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(der.as_ref()),
        )
        .unwrap();
        assert_eq!(key.sign(&claims).unwrap(), theirs);
        assert!(verifier_for(&key).verify(&theirs).is_ok());
    }

    #[test]
    fn public_pem_and_private_pem_give_the_same_jwk() {
        // Produced by `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout`.
        let private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOs4Tw9KLxfqcg8IyJb4DqEjMDqkiq6pvqGz0KNNCjXl\n-----END PRIVATE KEY-----\n";
        let key = SigningKey::from_pkcs8_pem(private).unwrap();
        let public = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(
                [
                    &[
                        0x30u8, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00
                    ][..],
                    &URL_SAFE_NO_PAD.decode(&key.public_jwk().x).unwrap()[..]
                ]
                .concat()
            )
        );
        assert_eq!(&Jwk::from_public_pem(&public).unwrap(), key.public_jwk());
        assert!(SigningKey::from_pkcs8_pem("hello").is_err());
    }

    /// Key-file errors reach the start-up error line, so they must not quote what they read.
    #[test]
    fn key_errors_never_quote_the_key_material() {
        let body = "MC4CAQAwBQYDK2VwBCIEIOs4Tw9KLxfqcg8IyJb4DqEjMDqkiq6pvqGz0KNNCjXl";
        let pem = |label: &str, body: &str| {
            format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
        };
        // A private key with its last byte changed, one that is not base64, a private key where
        // a public one belongs, and a key file that is not PEM at all.
        let corrupted = STANDARD.encode(
            STANDARD
                .decode(body)
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, b)| if i == 2 { b ^ 0xff } else { *b })
                .collect::<Vec<u8>>(),
        );
        let errors = [
            SigningKey::from_pkcs8_pem(&pem("PRIVATE KEY", &corrupted)).map(|_| ()),
            SigningKey::from_pkcs8_pem(&pem("PRIVATE KEY", "s3cret!material")).map(|_| ()),
            Jwk::from_public_pem(&pem("PUBLIC KEY", body)).map(|_| ()),
            SigningKey::from_pkcs8_pem(body).map(|_| ()),
        ];
        for (n, result) in errors.into_iter().enumerate() {
            let shown = format!("{} {:?}", result.as_ref().unwrap_err(), result);
            for secret in [body, &corrupted, "s3cret!material"] {
                let quoted = secret
                    .as_bytes()
                    .windows(8)
                    .any(|window| shown.contains(std::str::from_utf8(window).unwrap()));
                assert!(!quoted, "error {n} quotes key material: {shown}");
            }
        }
    }
}
