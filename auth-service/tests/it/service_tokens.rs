//! IssueServiceToken through gRPC against the real Redis: client credentials, scopes, the
//! per-client-id budgets and the token it mints.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth_service::error::{ERROR_DOMAIN, SERVICE_CLIENT_REJECTED};
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::auth::v1::{GetJwksRequest, IssueServiceTokenRequest, IssueServiceTokenResponse};
use service_kit::tokens::{
    EVENTS_READ_SCOPE, Jwk, KeySet, POINTS_GRANT_SCOPE, POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE,
    REFERRAL_SERVICE_AUDIENCE, Verifier,
};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::{prefix, redis, redis_url};

const SHOP_SECRET: &str = "shop-secret-5f0c1a7d9e2b4c6a8f1e3d5b7a9c0e2f";
const LEDGER_SECRET: &str = "ledger-secret-0a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Harness {
    client: AuthServiceClient<Channel>,
    prefix: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Harness {
    /// auth-service with two clients — `shop` (points read + redeem, events read) and `ledger`
    /// (points grant) — and `extra` settings.
    async fn start(extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("clients.json");
        let clients = serde_json::json!({"clients": [
            {"id": "shop", "secret_sha256": sha256_hex(SHOP_SECRET),
             "scopes": [POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE, EVENTS_READ_SCOPE]},
            {"id": "ledger", "secret_sha256": sha256_hex(LEDGER_SECRET),
             "scopes": [POINTS_GRANT_SCOPE]},
        ]});
        std::fs::write(&file, clients.to_string()).unwrap();
        let prefix = prefix();
        let (client, stop) = crate::serve_auth(
            vec![
                ("REDIS_URL", redis_url()),
                ("REDIS_KEY_PREFIX", prefix.clone()),
                // Never called: IssueServiceToken needs no referral-service.
                ("REFERRAL_GRPC_URL", "http://127.0.0.1:9".to_owned()),
                ("SERVICE_CLIENTS_FILE", file.to_str().unwrap().to_owned()),
            ],
            extra,
        )
        .await;
        Self {
            client,
            prefix,
            _dir: dir,
            _stop: stop,
        }
    }

    async fn issue(
        &mut self,
        id: &str,
        secret: &str,
        scopes: &[&str],
    ) -> Result<IssueServiceTokenResponse, Status> {
        self.client
            .issue_service_token(IssueServiceTokenRequest {
                client_id: id.to_owned(),
                client_secret: secret.to_owned(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Every key under this harness's prefix, sorted.
    async fn keys(&self) -> Vec<String> {
        let mut conn = redis().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.sort();
        keys.into_iter()
            .map(|k| k.trim_start_matches(&self.prefix).to_owned())
            .collect()
    }

    async fn get(&self, key: &str) -> Option<i64> {
        let mut conn = redis().await;
        redis::cmd("GET")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn bad_request_field(status: &Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status.get_details_bad_request().expect("BadRequest");
    bad.field_violations[0].field.clone()
}

fn limit_reason(status: &Status) -> String {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo");
    let delay = retry.retry_delay.expect("a delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(60),
        "{delay:?}"
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.domain, ERROR_DOMAIN);
    info.reason
}

#[tokio::test]
async fn a_token_for_referral_service_carries_the_client_and_its_scopes() {
    let mut h = Harness::start(&[("SERVICE_TOKEN_TTL_SECONDS", "300")]).await;
    let before = unix_now();
    let issued = h
        .issue(
            "shop",
            SHOP_SECRET,
            &[POINTS_REDEEM_SCOPE, POINTS_READ_SCOPE],
        )
        .await
        .unwrap();
    assert_eq!(issued.scopes, [POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE]);

    // Verified the way referral-service verifies it: auth-service's published keys, the
    // referral-service audience.
    let jwks = h
        .client
        .get_jwks(GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<Jwk> = jwks.keys.into_iter().map(Jwk::from).collect();
    let verifier = Verifier::new(
        "refsys-auth",
        &[REFERRAL_SERVICE_AUDIENCE],
        KeySet::from_jwks(&keys),
    );
    let claims = verifier.verify(&issued.access_token).unwrap().claims;
    assert_eq!(claims.aud, REFERRAL_SERVICE_AUDIENCE);
    assert_eq!(claims.sub, "shop");
    assert_eq!(
        claims.scope.as_deref(),
        Some("referral.points.read referral.points.redeem")
    );
    assert!(claims.roles.is_empty());
    assert_eq!(claims.exp - claims.iat, 300);
    let expire = issued.expire_time.unwrap();
    assert_eq!(expire.seconds, i64::try_from(claims.exp).unwrap());
    assert!((before + 300..=unix_now() + 300).contains(&expire.seconds));
    // Not a user token: user verifiers (audience "refsys") refuse it.
    let user_verifier = Verifier::new("refsys-auth", &["refsys"], KeySet::from_jwks(&keys));
    assert!(user_verifier.verify(&issued.access_token).is_err());

    // No scopes asked: every scope the client holds.
    let all = h.issue("shop", SHOP_SECRET, &[]).await.unwrap();
    assert_eq!(
        all.scopes,
        [POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE, EVENTS_READ_SCOPE]
    );
    let claims = verifier.verify(&all.access_token).unwrap().claims;
    assert_eq!(
        claims.scope.as_deref(),
        Some("referral.points.read referral.points.redeem referral.events.read")
    );

    let rendered = service_kit::metrics::render();
    assert!(
        rendered.contains(r#"refsys_service_tokens_issued_total{client="shop"}"#),
        "{rendered}"
    );
}

#[tokio::test]
async fn an_unknown_client_and_a_wrong_secret_get_the_same_answer() {
    let mut h = Harness::start(&[]).await;
    let mut answers: Vec<(Code, String, Vec<u8>)> = Vec::new();
    for (id, secret) in [
        ("shop", "shop-secret-wrong"),
        ("nobody", SHOP_SECRET),
        ("nobody", "anything"),
        ("Not/An/Id", SHOP_SECRET),
        ("ledger", SHOP_SECRET),
    ] {
        let status = h.issue(id, secret, &[POINTS_READ_SCOPE]).await.unwrap_err();
        answers.push((
            status.code(),
            status.message().to_owned(),
            status.details().to_vec(),
        ));
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, Code::Unauthenticated);
    assert_eq!(answers[0].1, SERVICE_CLIENT_REJECTED);

    // Without any client configured, the answer is the same too.
    let mut none = Harness::start(&[("SERVICE_CLIENTS_FILE", "")]).await;
    let status = none.issue("shop", SHOP_SECRET, &[]).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unauthenticated, SERVICE_CLIENT_REJECTED)
    );
    // The right secret still works: one wrong secret locks nothing.
    h.issue("shop", SHOP_SECRET, &[]).await.unwrap();
}

#[tokio::test]
async fn scopes_are_checked_after_the_secret() {
    let mut h = Harness::start(&[]).await;
    // A scope the client does not hold: PERMISSION_DENIED, but only for the right secret.
    let status = h
        .issue(
            "shop",
            SHOP_SECRET,
            &[POINTS_READ_SCOPE, POINTS_GRANT_SCOPE],
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = h
        .issue("shop", "wrong", &[POINTS_GRANT_SCOPE])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let granted = h
        .issue("ledger", LEDGER_SECRET, &[POINTS_GRANT_SCOPE])
        .await
        .unwrap();
    assert_eq!(granted.scopes, [POINTS_GRANT_SCOPE]);

    // Internal, unknown and malformed scopes are INVALID_ARGUMENT on `scopes`, whoever asks.
    for scopes in [
        vec!["referral.users.ensure"],
        vec!["referral.users.read"],
        vec!["referral.points.steal"],
        vec![""],
        vec!["referral.points.read referral.points.redeem"],
        vec![POINTS_READ_SCOPE; 17],
    ] {
        for (id, secret) in [("shop", SHOP_SECRET), ("nobody", "x")] {
            let status = h.issue(id, secret, &scopes).await.unwrap_err();
            assert_eq!(bad_request_field(&status), "scopes", "{scopes:?}");
        }
    }
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_and_count_nothing() {
    let mut h = Harness::start(&[]).await;
    let long_id = "a".repeat(65);
    let long_secret = "s".repeat(257);
    for (id, secret, field) in [
        ("", SHOP_SECRET, "client_id"),
        ("shop", "", "client_secret"),
        (long_id.as_str(), SHOP_SECRET, "client_id"),
        ("shop", long_secret.as_str(), "client_secret"),
    ] {
        let status = h.issue(id, secret, &[]).await.unwrap_err();
        assert_eq!(bad_request_field(&status), field);
    }
    assert!(
        h.keys().await.is_empty(),
        "refused before any budget: {:?}",
        h.keys().await
    );
    // The longest id and secret are still looked at.
    let status = h
        .issue(&"a".repeat(64), &"s".repeat(256), &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn attempts_are_limited_per_client_id() {
    let mut h = Harness::start(&[("SERVICE_TOKEN_MAX_ISSUES_PER_CLIENT_PER_MINUTE", "3")]).await;
    for _ in 0..3 {
        h.issue("shop", SHOP_SECRET, &[]).await.unwrap();
    }
    let status = h.issue("shop", SHOP_SECRET, &[]).await.unwrap_err();
    assert_eq!(limit_reason(&status), "SERVICE_TOKEN_RATE_LIMIT");
    // Wrong secrets count as attempts too, and are refused the same way.
    let status = h.issue("shop", "wrong", &[]).await.unwrap_err();
    assert_eq!(limit_reason(&status), "SERVICE_TOKEN_RATE_LIMIT");
    // Another client is not affected.
    for _ in 0..3 {
        h.issue("ledger", LEDGER_SECRET, &[]).await.unwrap();
    }
    assert_eq!(h.get("{svc:shop}:issues").await, Some(3));
    assert_eq!(h.get("{svc:ledger}:issues").await, Some(3));
}

#[tokio::test]
async fn wrong_secrets_lock_only_their_client_id_and_right_ones_never_count() {
    let mut h = Harness::start(&[("SERVICE_TOKEN_MAX_FAILURES_PER_CLIENT_PER_MINUTE", "3")]).await;
    // Successes take no failure slot.
    for _ in 0..5 {
        h.issue("shop", SHOP_SECRET, &[]).await.unwrap();
    }
    // So do refused scopes: the secret was right.
    for _ in 0..3 {
        let status = h
            .issue("shop", SHOP_SECRET, &[POINTS_GRANT_SCOPE])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    assert_eq!(h.get("{svc:shop}:fails").await, Some(0));
    for n in 0..3 {
        let status = h
            .issue("shop", &format!("guess-{n}"), &[])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    // Locked: even the right secret is refused, so the refusal tells nothing about a guess.
    for secret in ["guess-4", SHOP_SECRET] {
        let status = h.issue("shop", secret, &[]).await.unwrap_err();
        assert_eq!(limit_reason(&status), "SERVICE_TOKEN_FAILURE_LIMIT");
    }
    assert_eq!(h.get("{svc:shop}:fails").await, Some(3));
    h.issue("ledger", LEDGER_SECRET, &[]).await.unwrap();
}

#[tokio::test]
async fn unknown_ids_share_one_count_and_create_no_keys_of_their_own() {
    let mut h = Harness::start(&[
        ("SERVICE_TOKEN_MAX_ISSUES_PER_CLIENT_PER_MINUTE", "100"),
        ("SERVICE_TOKEN_MAX_FAILURES_PER_CLIENT_PER_MINUTE", "5"),
    ])
    .await;
    for n in 0..5 {
        let status = h
            .issue(&format!("made-up-{n}"), "x", &[])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    // A sixth made-up id is refused by the shared failure budget, not by one of its own.
    let status = h.issue("made-up-5", "x", &[]).await.unwrap_err();
    assert_eq!(limit_reason(&status), "SERVICE_TOKEN_FAILURE_LIMIT");
    assert_eq!(h.keys().await, ["{svc:*}:fails", "{svc:*}:issues"]);
    assert_eq!(h.get("{svc:*}:issues").await, Some(5));
    // Configured clients are not affected.
    h.issue("shop", SHOP_SECRET, &[]).await.unwrap();

    let rendered = service_kit::metrics::render();
    assert!(!rendered.contains("made-up"), "ids in metric labels");
    assert!(
        rendered.contains(
            r#"refsys_service_token_refusals_total{client="(unknown)",reason="unauthenticated"}"#
        ),
        "{rendered}"
    );
}
