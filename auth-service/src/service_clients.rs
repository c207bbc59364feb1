//! Service clients: internal services (a shop, a data pipeline) that get short-lived service
//! tokens for referral-service through `AuthService.IssueServiceToken` — OAuth 2.0 client
//! credentials over gRPC.
//!
//! The operator lists them in `SERVICE_CLIENTS_FILE`:
//!
//! ```json
//! {"clients": [
//!   {"id": "shop",
//!    "secret_sha256": "<64 hex digits: SHA-256 of the secret>",
//!    "scopes": ["referral.points.read", "referral.points.redeem", "referral.events.read"]}
//! ]}
//! ```
//!
//! - `id`: 1 to 64 of `a-z 0-9 . _ -`, unique; `auth-service` is reserved (the subject of
//!   auth-service's own service tokens).
//! - `secret_sha256`: the SHA-256 of the secret, hex (`printf %s "$SECRET" | sha256sum`). Only
//!   the hash is stored, so the file does not reveal the secret; the secret should be long and
//!   random (32 random bytes, e.g. `openssl rand -hex 32`), which is what makes an unsalted
//!   hash safe here.
//! - `scopes`: at least one of [`GRANTABLE_SCOPES`]. The scopes auth-service uses itself
//!   (`referral.users.*`) are never grantable.
//!
//! Any other field, a malformed value or a duplicate id stops the start with one line naming
//! `SERVICE_CLIENTS_FILE` and the entry; the line never shows a secret hash.
//!
//! Credentials are checked in constant time ([`ServiceClients::verify`]): the presented secret
//! is hashed and compared with `subtle`, and an unknown id is compared against a dummy hash, so
//! it costs the same and gets the same answer as a wrong secret.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use service_kit::config::ConfigError;
use service_kit::tokens::{
    DELETE_USER_SCOPE, ENSURE_USER_SCOPE, EVENTS_READ_SCOPE, LOOKUP_USER_SCOPE, POINTS_GRANT_SCOPE,
    POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE,
};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// The setting naming the clients file.
pub const CLIENTS_FILE_KEY: &str = "SERVICE_CLIENTS_FILE";

/// The scopes a service client may hold.
pub const GRANTABLE_SCOPES: [&str; 4] = [
    POINTS_READ_SCOPE,
    POINTS_REDEEM_SCOPE,
    POINTS_GRANT_SCOPE,
    EVENTS_READ_SCOPE,
];

/// Scopes auth-service's own service tokens carry: never grantable to a client.
const INTERNAL_SCOPES: [&str; 3] = [ENSURE_USER_SCOPE, LOOKUP_USER_SCOPE, DELETE_USER_SCOPE];

/// Client ids nobody may configure: the subject of auth-service's own service tokens.
const RESERVED_IDS: [&str; 1] = [crate::tokens::SERVICE_SUBJECT];

/// Longest client id, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 64;
/// Longest client secret IssueServiceToken looks at, in bytes.
pub const MAX_SECRET_BYTES: usize = 256;
/// Most scopes one IssueServiceToken call may ask for.
pub const MAX_REQUESTED_SCOPES: usize = 16;
/// Longest scope string, in bytes.
const MAX_SCOPE_BYTES: usize = 64;
/// Largest clients file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The metric label of every id that is not configured.
pub const UNKNOWN_CLIENT_LABEL: &str = "(unknown)";

/// Whether `id` may name a client: 1 to 64 of `a-z 0-9 . _ -`.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLIENT_ID_BYTES
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Whether `scope` looks like a scope at all (dotted words), so that it may be quoted back in
/// a message: a pasted hash (no dot) never is.
fn scope_shaped(scope: &str) -> bool {
    scope.contains('.')
        && scope.len() <= MAX_SCOPE_BYTES
        && scope.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// The grantable scope spelled `scope`, as the one static string of it.
fn grantable(scope: &str) -> Option<&'static str> {
    GRANTABLE_SCOPES.iter().copied().find(|s| *s == scope)
}

/// One configured client.
pub struct ServiceClient {
    id: String,
    secret_sha256: [u8; 32],
    /// In the order of [`GRANTABLE_SCOPES`], without duplicates.
    scopes: Vec<&'static str>,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("id", &self.id)
            .field("secret_sha256", &"<redacted>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl ServiceClient {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every scope the client holds.
    pub fn scopes(&self) -> &[&'static str] {
        &self.scopes
    }

    pub fn holds(&self, scope: &str) -> bool {
        self.scopes.contains(&scope)
    }

    /// The scopes a token for `requested` carries: all the client holds when `requested` is
    /// empty. `Err` with a scope the client does not hold.
    pub fn grant(&self, requested: &[&'static str]) -> Result<Vec<&'static str>, &'static str> {
        if requested.is_empty() {
            return Ok(self.scopes.clone());
        }
        if let Some(missing) = requested.iter().find(|scope| !self.holds(scope)) {
            return Err(missing);
        }
        Ok(GRANTABLE_SCOPES
            .into_iter()
            .filter(|scope| requested.contains(scope))
            .collect())
    }
}

/// The configured clients. Cheap to clone.
#[derive(Clone)]
pub struct ServiceClients {
    by_id: Arc<HashMap<String, ServiceClient>>,
    /// Compared against when the id is unknown, so that costs what a wrong secret costs.
    dummy_sha256: [u8; 32],
}

impl Default for ServiceClients {
    fn default() -> Self {
        Self::from_clients(Vec::new())
    }
}

impl std::fmt::Debug for ServiceClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut clients: Vec<&ServiceClient> = self.by_id.values().collect();
        clients.sort_by(|a, b| a.id.cmp(&b.id));
        f.debug_list().entries(clients).finish()
    }
}

impl ServiceClients {
    fn from_clients(clients: Vec<ServiceClient>) -> Self {
        use rand::RngCore;
        let mut dummy_sha256 = [0u8; 32];
        rand::rng().fill_bytes(&mut dummy_sha256);
        Self {
            by_id: Arc::new(
                clients
                    .into_iter()
                    .map(|client| (client.id.clone(), client))
                    .collect(),
            ),
            dummy_sha256,
        }
    }

    /// Reads and validates the clients file at `path`; errors name [`CLIENTS_FILE_KEY`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let error =
            |reason: &dyn std::fmt::Display| ConfigError::new(CLIENTS_FILE_KEY, &shown, reason);
        let file = std::fs::File::open(path)
            .map_err(|err| error(&format_args!("cannot be read: {err}")))?;
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|err| error(&format_args!("cannot be read: {err}")))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(error(&"larger than 1 MiB"));
        }
        Self::parse(&text).map_err(|why| error(&why))
    }

    /// Parses and validates the clients file's text. The error is one line that never quotes a
    /// secret hash (nor anything that is not shaped like an id or a scope).
    pub fn parse(json: &str) -> Result<Self, String> {
        const SHAPE: &str =
            r#"expected {"clients": [{"id": …, "secret_sha256": …, "scopes": […]}]}"#;
        let value: Value =
            serde_json::from_str(json).map_err(|err| format!("not valid JSON: {err}"))?;
        let Value::Object(top) = value else {
            return Err(SHAPE.to_owned());
        };
        if let Some(other) = top.keys().find(|k| *k != "clients") {
            return Err(format!("{}; {SHAPE}", unknown_field("the file", other)));
        }
        let Some(Value::Array(entries)) = top.get("clients") else {
            return Err(SHAPE.to_owned());
        };
        let mut clients: Vec<ServiceClient> = Vec::with_capacity(entries.len());
        for (n, entry) in entries.iter().enumerate() {
            let client = parse_client(n, entry)?;
            if clients.iter().any(|c| c.id == client.id) {
                // Ids are not quoted: a hash pasted into the wrong field would be a valid id.
                let first = clients.iter().position(|c| c.id == client.id).unwrap_or(0);
                return Err(format!("clients[{n}].id: the same id as clients[{first}]"));
            }
            clients.push(client);
        }
        Ok(Self::from_clients(clients))
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The configured ids, sorted.
    pub fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.by_id.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// The client configured as `id`. Ids are not secrets; secrets are.
    pub fn get(&self, id: &str) -> Option<&ServiceClient> {
        self.by_id.get(id)
    }

    /// The metric label of `id`: itself when configured, [`UNKNOWN_CLIENT_LABEL`] otherwise,
    /// so callers cannot grow a label set.
    pub fn label<'a>(&'a self, id: &str) -> &'a str {
        self.get(id).map_or(UNKNOWN_CLIENT_LABEL, ServiceClient::id)
    }

    /// `client` (the result of [`ServiceClients::get`]) if `secret` is its secret. Constant
    /// time: the secret is hashed and compared with the stored hash, or with a dummy hash when
    /// the client is unknown, so an unknown id costs what a wrong secret costs.
    pub fn verify<'a>(
        &self,
        client: Option<&'a ServiceClient>,
        secret: &str,
    ) -> Option<&'a ServiceClient> {
        let expected = client.map_or(&self.dummy_sha256, |c| &c.secret_sha256);
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let known = Choice::from(u8::from(client.is_some()));
        let matches = presented.ct_eq(expected) & known;
        if bool::from(matches) { client } else { None }
    }
}

/// The requested scopes as their static strings, without duplicates. `Err` is the description
/// of an INVALID_ARGUMENT on `scopes`.
pub fn parse_requested(scopes: &[String]) -> Result<Vec<&'static str>, String> {
    if scopes.len() > MAX_REQUESTED_SCOPES {
        return Err(format!("at most {MAX_REQUESTED_SCOPES} scopes"));
    }
    let mut parsed = Vec::with_capacity(scopes.len());
    for (n, scope) in scopes.iter().enumerate() {
        let known = grantable(scope).ok_or_else(|| {
            if scope_shaped(scope) {
                format!(
                    "{scope:?} is not a scope service clients can hold (known: {})",
                    GRANTABLE_SCOPES.join(", ")
                )
            } else {
                format!(
                    "scopes[{n}] is not a scope: one scope per entry, e.g. \"{POINTS_READ_SCOPE}\""
                )
            }
        })?;
        if !parsed.contains(&known) {
            parsed.push(known);
        }
    }
    Ok(parsed)
}

fn unknown_field(place: &str, name: &str) -> String {
    let shaped = !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if shaped {
        format!("{place} has an unknown field {name:?}")
    } else {
        format!("{place} has an unknown field")
    }
}

fn parse_client(n: usize, entry: &Value) -> Result<ServiceClient, String> {
    let Value::Object(fields) = entry else {
        return Err(format!(
            r#"clients[{n}]: expected {{"id": …, "secret_sha256": …, "scopes": […]}}"#
        ));
    };
    if let Some(other) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "id" | "secret_sha256" | "scopes"))
    {
        return Err(format!(
            "{} (fields: id, secret_sha256, scopes; store the SHA-256 of the secret, never the secret)",
            unknown_field(&format!("clients[{n}]"), other)
        ));
    }

    let id = match fields.get("id") {
        Some(Value::String(id)) if valid_client_id(id) => id.clone(),
        Some(Value::String(_)) => {
            return Err(format!(
                "clients[{n}].id: must be 1 to {MAX_CLIENT_ID_BYTES} of a-z, 0-9, '.', '_', '-'"
            ));
        }
        Some(_) => return Err(format!("clients[{n}].id: must be a string")),
        None => return Err(format!("clients[{n}]: id is required")),
    };
    if RESERVED_IDS.contains(&id.as_str()) {
        return Err(format!("clients[{n}]: the id {id:?} is reserved"));
    }
    let at = format!("clients[{n}]");

    let secret_sha256 = match fields.get("secret_sha256") {
        Some(Value::String(hex)) => decode_sha256(hex).ok_or_else(|| {
            format!(
                "{at}.secret_sha256: must be 64 hex digits, the SHA-256 of the secret \
                 (printf %s \"$SECRET\" | sha256sum)"
            )
        })?,
        Some(_) => return Err(format!("{at}.secret_sha256: must be a string")),
        None => return Err(format!("{at}: secret_sha256 is required")),
    };

    let Some(Value::Array(listed)) = fields.get("scopes") else {
        return Err(format!(
            "{at}.scopes: required, a list of at least one of {}",
            GRANTABLE_SCOPES.join(", ")
        ));
    };
    let mut held = Vec::new();
    for (k, scope) in listed.iter().enumerate() {
        let Value::String(scope) = scope else {
            return Err(format!("{at}.scopes[{k}]: must be a string"));
        };
        if INTERNAL_SCOPES.contains(&scope.as_str()) {
            return Err(format!(
                "{at}.scopes: {scope:?} is internal to refsys and cannot be granted to a client"
            ));
        }
        match grantable(scope) {
            Some(known) => held.push(known),
            None if scope_shaped(scope) => {
                return Err(format!(
                    "{at}.scopes: unknown scope {scope:?} (known: {})",
                    GRANTABLE_SCOPES.join(", ")
                ));
            }
            None => return Err(format!("{at}.scopes[{k}]: not a scope")),
        }
    }
    if held.is_empty() {
        return Err(format!(
            "{at}.scopes: must list at least one of {}",
            GRANTABLE_SCOPES.join(", ")
        ));
    }
    let scopes = GRANTABLE_SCOPES
        .into_iter()
        .filter(|scope| held.contains(scope))
        .collect();
    Ok(ServiceClient {
        id,
        secret_sha256,
        scopes,
    })
}

/// 64 hex digits (either case) as 32 bytes.
fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    let digits = hex.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let nibble = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SHA-256 of `secret`, hex.
    pub(crate) fn sha256_hex(secret: &str) -> String {
        crate::otp::hex(&Sha256::digest(secret.as_bytes()))
    }

    fn file(clients: &[(&str, &str, &[&str])]) -> String {
        let clients: Vec<Value> = clients
            .iter()
            .map(|(id, secret, scopes)| {
                serde_json::json!({"id": id, "secret_sha256": sha256_hex(secret), "scopes": scopes})
            })
            .collect();
        serde_json::json!({ "clients": clients }).to_string()
    }

    #[test]
    fn a_good_file_is_read() {
        let clients = ServiceClients::parse(&file(&[
            (
                "shop",
                "s3cret-shop",
                &[
                    EVENTS_READ_SCOPE,
                    POINTS_READ_SCOPE,
                    POINTS_REDEEM_SCOPE,
                    POINTS_READ_SCOPE,
                ],
            ),
            ("ledger.v2_x-1", "s3cret-ledger", &[POINTS_GRANT_SCOPE]),
        ]))
        .unwrap();
        assert_eq!(clients.ids(), ["ledger.v2_x-1", "shop"]);
        let shop = clients.get("shop").unwrap();
        assert_eq!(
            shop.scopes(),
            [POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE, EVENTS_READ_SCOPE],
            "known order, no duplicates"
        );
        let shown = format!("{clients:?}");
        assert!(
            shown.contains("shop") && !shown.contains(&sha256_hex("s3cret-shop")),
            "{shown}"
        );
        assert!(
            ServiceClients::parse(r#"{"clients": []}"#)
                .unwrap()
                .is_empty()
        );
        // Upper-case hex is a hash too.
        let upper = file(&[("a", "x", &[POINTS_READ_SCOPE])])
            .replace(&sha256_hex("x"), &sha256_hex("x").to_uppercase());
        let clients = ServiceClients::parse(&upper).unwrap();
        assert!(clients.verify(clients.get("a"), "x").is_some());
    }

    #[test]
    fn every_malformed_file_is_one_line_without_the_hash() {
        let hash = sha256_hex("s3cret");
        let good_entry = |id: &str| {
            format!(
                r#"{{"id": "{id}", "secret_sha256": "{hash}", "scopes": ["referral.points.read"]}}"#
            )
        };
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not valid JSON"),
            ("[]".into(), "expected"),
            (r#"{"client": []}"#.into(), "unknown field \"client\""),
            (r#"{"clients": {}}"#.into(), "expected"),
            (r#"{"clients": ["shop"]}"#.into(), "clients[0]"),
            (
                format!(
                    r#"{{"clients": [{}, {}]}}"#,
                    good_entry("shop"),
                    good_entry("shop")
                ),
                "clients[1].id: the same id as clients[0]",
            ),
            (
                format!(
                    r#"{{"clients": [{}, {}]}}"#,
                    good_entry(&hash),
                    good_entry(&hash)
                ),
                "the same id",
            ),
            (
                format!(r#"{{"clients": [{}]}}"#, good_entry("")),
                "clients[0].id",
            ),
            (
                format!(r#"{{"clients": [{}]}}"#, good_entry("Shop")),
                "clients[0].id",
            ),
            (
                format!(r#"{{"clients": [{}]}}"#, good_entry("shop/1")),
                "clients[0].id",
            ),
            (
                format!(r#"{{"clients": [{}]}}"#, good_entry(&"a".repeat(65))),
                "clients[0].id",
            ),
            (
                format!(r#"{{"clients": [{}]}}"#, good_entry("auth-service")),
                "reserved",
            ),
            (
                format!(
                    r#"{{"clients": [{{"secret_sha256": "{hash}", "scopes": ["referral.points.read"]}}]}}"#
                ),
                "id is required",
            ),
            (
                r#"{"clients": [{"id": "shop", "scopes": ["referral.points.read"]}]}"#.into(),
                "secret_sha256 is required",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{}", "scopes": ["referral.points.read"]}}]}}"#,
                    &hash[..63]
                ),
                "64 hex digits",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}0", "scopes": ["referral.points.read"]}}]}}"#
                ),
                "64 hex digits",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{}", "scopes": ["referral.points.read"]}}]}}"#,
                    hash.replace(&hash[..1], "g")
                ),
                "64 hex digits",
            ),
            (
                format!(r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}"}}]}}"#),
                "scopes",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}", "scopes": []}}]}}"#
                ),
                "at least one",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}", "scopes": ["referral.users.ensure"]}}]}}"#
                ),
                "internal",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}", "scopes": ["referral.users.read"]}}]}}"#
                ),
                "internal",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}", "scopes": ["referral.points.steal"]}}]}}"#
                ),
                "unknown scope",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}", "scopes": ["{hash}"]}}]}}"#
                ),
                "not a scope",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}", "scopes": ["Points Read"]}}]}}"#
                ),
                "not a scope",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret_sha256": "{hash}", "scopes": "referral.points.read"}}]}}"#
                ),
                "scopes",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "secret": "hunter2", "secret_sha256": "{hash}", "scopes": ["referral.points.read"]}}]}}"#
                ),
                "unknown field \"secret\"",
            ),
            (
                format!(
                    r#"{{"clients": [{{"id": "shop", "{hash}": 1, "secret_sha256": "{hash}", "scopes": ["referral.points.read"]}}]}}"#
                ),
                "unknown field",
            ),
        ];
        for (text, expected) in cases {
            let why = ServiceClients::parse(&text).expect_err(&text);
            assert!(why.contains(expected), "{text}: {why}");
            assert!(!why.contains('\n'), "{why}");
            assert!(!why.contains(&hash[..16]), "{text}: {why}");
        }
    }

    #[test]
    fn verification_needs_the_right_secret_and_a_known_id() {
        let clients =
            ServiceClients::parse(&file(&[("shop", "s3cret-shop", &[POINTS_READ_SCOPE])])).unwrap();
        let shop = clients.get("shop");
        assert_eq!(
            clients.verify(shop, "s3cret-shop").map(ServiceClient::id),
            Some("shop")
        );
        assert!(clients.verify(shop, "s3cret-shoq").is_none());
        assert!(clients.verify(shop, "").is_none());
        assert!(
            clients
                .verify(clients.get("nobody"), "s3cret-shop")
                .is_none()
        );
        assert_eq!(clients.label("shop"), "shop");
        assert_eq!(clients.label("nobody"), UNKNOWN_CLIENT_LABEL);
        // No secret verifies against the dummy of an unknown id, not even the dummy's preimage
        // candidates one might guess.
        for secret in ["", "dummy", "0"] {
            assert!(ServiceClients::default().verify(None, secret).is_none());
        }
    }

    #[test]
    fn scopes_are_a_subset_of_the_clients() {
        let clients = ServiceClients::parse(&file(&[(
            "shop",
            "x",
            &[POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE],
        )]))
        .unwrap();
        let shop = clients.get("shop").unwrap();
        assert_eq!(
            shop.grant(&[]).unwrap(),
            [POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE]
        );
        assert_eq!(
            shop.grant(&[POINTS_REDEEM_SCOPE]).unwrap(),
            [POINTS_REDEEM_SCOPE]
        );
        assert_eq!(
            shop.grant(&[POINTS_REDEEM_SCOPE, POINTS_READ_SCOPE])
                .unwrap(),
            [POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE]
        );
        assert_eq!(
            shop.grant(&[POINTS_READ_SCOPE, POINTS_GRANT_SCOPE])
                .unwrap_err(),
            POINTS_GRANT_SCOPE
        );
    }

    #[test]
    fn requested_scopes_must_be_known_and_few() {
        let strings = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            parse_requested(&strings(&[POINTS_READ_SCOPE, POINTS_READ_SCOPE])).unwrap(),
            [POINTS_READ_SCOPE]
        );
        assert!(parse_requested(&[]).unwrap().is_empty());
        for bad in [
            ENSURE_USER_SCOPE,
            "referral.points.steal",
            "",
            " referral.points.read",
            "referral.points.read referral.points.redeem",
        ] {
            let why = parse_requested(&strings(&[bad])).unwrap_err();
            assert!(why.contains("scope"), "{bad:?}: {why}");
        }
        let many = vec![POINTS_READ_SCOPE.to_owned(); MAX_REQUESTED_SCOPES + 1];
        assert!(parse_requested(&many).unwrap_err().contains("at most"));
    }

    #[test]
    fn a_missing_or_huge_file_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let err = ServiceClients::load(&dir.path().join("missing.json")).unwrap_err();
        assert_eq!(err.key, CLIENTS_FILE_KEY);
        let huge = dir.path().join("huge.json");
        std::fs::write(
            &huge,
            " ".repeat(usize::try_from(MAX_FILE_BYTES).unwrap() + 1),
        )
        .unwrap();
        let err = ServiceClients::load(&huge).unwrap_err();
        assert!(err.to_string().contains("1 MiB"), "{err}");
    }
}
