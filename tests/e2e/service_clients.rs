//! Service clients on the real pair: an internal service gets a token from
//! `AuthService.IssueServiceToken` (client credentials from `SERVICE_CLIENTS_FILE`), and
//! referral-service holds it to its scopes with the same per-method check as auth-service's own
//! service tokens.

use std::path::Path;

use e2e_tests::process::run_to_exit;
use e2e_tests::stack::bearer;
use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::{IssueServiceTokenRequest, RefreshTokensRequest};
use refsys_proto::referral::v1::user_directory_client::UserDirectoryClient;
use refsys_proto::referral::v1::{
    DeleteUserRequest, EnsureUserRequest, GetProfileRequest, LookupUserRequest,
};
use tonic::Code;

const SHOP_SECRET: &str = "e2e-shop-secret-7c1f3a9b5d2e8f40";
/// `printf %s "$SHOP_SECRET" | sha256sum`
const SHOP_SECRET_SHA256: &str = "b7592392554c16ac0726f9104ef37a1f23be14a517fe74777b0b3af0bf146927";

fn write_clients_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("the clients file is written");
    path.display().to_string()
}

fn shop_only(scopes: &str) -> String {
    format!(
        r#"{{"clients": [{{"id": "shop", "secret_sha256": "{SHOP_SECRET_SHA256}", "scopes": [{scopes}]}}]}}"#
    )
}

#[tokio::test]
async fn a_client_token_is_held_to_its_scopes_and_auth_services_own_tokens_keep_working() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_clients_file(
        dir.path(),
        "clients.json",
        &shop_only(r#""referral.points.read""#),
    );
    let stack = Stack::start_with(StackOptions {
        auth_env: vec![("SERVICE_CLIENTS_FILE", file)],
        ..StackOptions::default()
    })
    .await;
    let mut auth = stack.auth_client().await;

    let issued = auth
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "shop".to_owned(),
            client_secret: SHOP_SECRET.to_owned(),
            scopes: vec![],
        })
        .await
        .expect("IssueServiceToken")
        .into_inner();
    assert_eq!(issued.scopes, ["referral.points.read"]);
    let token = issued.access_token;

    // referral-service verifies the token (a tampered one is UNAUTHENTICATED) and refuses it on
    // every UserDirectory RPC, none of whose scopes it carries.
    let mut directory = UserDirectoryClient::new(Stack::channel(&stack.referral).await);
    let user_id = "00000000-0000-4000-8000-000000000001".to_owned();
    let refusals = [
        directory
            .lookup_user(bearer(
                LookupUserRequest {
                    user_id: user_id.clone(),
                },
                &token,
            ))
            .await
            .map(drop),
        directory
            .ensure_user(bearer(
                EnsureUserRequest {
                    phone_number: "+79601230070".to_owned(),
                    invite_code: None,
                },
                &token,
            ))
            .await
            .map(drop),
        directory
            .delete_user(bearer(DeleteUserRequest { user_id }, &token))
            .await
            .map(drop),
        stack
            .referral_client()
            .await
            .get_profile(bearer(GetProfileRequest {}, &token))
            .await
            .map(drop),
    ];
    for refusal in refusals {
        let status = refusal.expect_err("a points.read client token is refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let mut tampered = token.clone();
    let last = tampered.pop().expect("a token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let status = directory
        .lookup_user(bearer(
            LookupUserRequest {
                user_id: "00000000-0000-4000-8000-000000000001".to_owned(),
            },
            &tampered,
        ))
        .await
        .expect_err("a tampered token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // auth-service's own service tokens still pass: EnsureUser at sign-in, LookupUser at refresh.
    let signed_in = stack.sign_in("+79601230071", None).await;
    auth.refresh_tokens(RefreshTokensRequest {
        refresh_token: signed_in.refresh_token,
    })
    .await
    .expect("RefreshTokens (LookupUser with auth-service's own token)");

    // A wrong secret: UNAUTHENTICATED, counted under the configured id.
    let status = auth
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "shop".to_owned(),
            client_secret: "not-the-secret".to_owned(),
            scopes: vec![],
        })
        .await
        .expect_err("a wrong secret");
    assert_eq!(status.code(), Code::Unauthenticated);
    let metrics = Stack::metrics(stack.auth_metrics).await;
    for line in [
        r#"refsys_service_tokens_issued_total{client="shop"} 1"#,
        r#"refsys_service_token_refusals_total{client="shop",reason="unauthenticated"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn a_malformed_clients_file_exits_2_with_one_line_and_no_hash() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("syntax.json", r#"{"clients": ["#.to_owned()),
        (
            "internal-scope.json",
            shop_only(r#""referral.users.ensure""#),
        ),
        (
            "unknown-scope.json",
            shop_only(r#""referral.points.steal""#),
        ),
        ("no-scopes.json", shop_only("")),
        (
            "short-hash.json",
            shop_only(r#""referral.points.read""#)
                .replace(SHOP_SECRET_SHA256, &SHOP_SECRET_SHA256[1..]),
        ),
        (
            "duplicate.json",
            format!(
                r#"{{"clients": [{{"id": "shop", "secret_sha256": "{SHOP_SECRET_SHA256}", "scopes": ["referral.points.read"]}}, {{"id": "shop", "secret_sha256": "{SHOP_SECRET_SHA256}", "scopes": ["referral.events.read"]}}]}}"#
            ),
        ),
        (
            "plain-secret.json",
            format!(
                r#"{{"clients": [{{"id": "shop", "secret": "{SHOP_SECRET}", "secret_sha256": "{SHOP_SECRET_SHA256}", "scopes": ["referral.points.read"]}}]}}"#
            ),
        ),
    ];
    let mut paths: Vec<String> = cases
        .iter()
        .map(|(name, text)| write_clients_file(dir.path(), name, text))
        .collect();
    paths.push(dir.path().join("missing.json").display().to_string());
    for path in paths {
        let (status, output) = run_to_exit(
            "auth-service",
            &[("SERVICE_CLIENTS_FILE", path.as_str())],
            &[],
        )
        .await;
        assert_eq!(status.code(), Some(2), "{path}: {output}");
        let lines: Vec<&str> = output
            .lines()
            .filter(|l| l.contains("SERVICE_CLIENTS_FILE"))
            .collect();
        assert_eq!(lines.len(), 1, "{path}: one line names the key: {output}");
        assert!(lines[0].contains(&path), "{path}: {output}");
        for secret in [&SHOP_SECRET_SHA256[1..40], SHOP_SECRET] {
            assert!(!output.contains(secret), "{path} prints a secret: {output}");
        }
        assert!(!output.contains("panicked"), "{path}: {output}");
    }
}
