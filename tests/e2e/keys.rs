//! Signing-key rotation through the JWKS: referral-service picks up a new key by itself and
//! keeps accepting tokens of the previous key while it is still published.

use std::path::Path;

use e2e_tests::stack::bearer;
use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::{GetJwksRequest, IntrospectTokenRequest};
use refsys_proto::referral::v1::GetProfileRequest;

fn openssl(args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl {args:?}");
}

fn key_pair(dir: &Path, name: &str) -> (String, String) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let (private, public) = (private.display().to_string(), public.display().to_string());
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", &private]);
    openssl(&["pkey", "-in", &private, "-pubout", "-out", &public]);
    (private, public)
}

#[tokio::test]
async fn rotating_the_signing_key_needs_no_downtime() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (old_private, old_public) = key_pair(dir.path(), "old");
    let (new_private, _) = key_pair(dir.path(), "new");
    let mut stack = Stack::start_with(StackOptions {
        auth_env: vec![("JWT_SIGNING_KEY_FILE", old_private)],
        ..StackOptions::default()
    })
    .await;
    let before = stack.sign_in("+79601230060", None).await;

    // Rotate: auth-service restarts signing with the new key and still publishing the old one.
    let mut env = vec![
        ("JWT_SIGNING_KEY_FILE".to_owned(), new_private),
        ("JWT_PREVIOUS_PUBLIC_KEYS".to_owned(), old_public),
    ];
    stack.auth.set_env(&mut env);
    stack.auth.restart().await;
    let after = stack.sign_in("+79601230061", None).await;

    let jwks = stack
        .auth_client()
        .await
        .get_jwks(GetJwksRequest {})
        .await
        .expect("GetJwks")
        .into_inner();
    assert_eq!(jwks.keys.len(), 2, "current and previous key");
    let json: serde_json::Value = serde_json::from_str(&jwks.jwks_json).expect("a JWK set");
    assert_eq!(json["keys"].as_array().map(Vec::len), Some(2));

    let mut auth = stack.auth_client().await;
    let mut referral = stack.referral_client().await;
    for (which, token) in [
        ("old key", &before.access_token),
        ("new key", &after.access_token),
    ] {
        let introspected = auth
            .introspect_token(IntrospectTokenRequest {
                access_token: token.clone(),
            })
            .await
            .expect("IntrospectToken")
            .into_inner();
        assert!(introspected.active, "{which}");
        // referral-service never saw the new key: an unknown kid makes it refetch the JWKS.
        referral
            .get_profile(bearer(GetProfileRequest {}, token))
            .await
            .unwrap_or_else(|status| panic!("{which}: {status:?}"));
    }
    assert_ne!(
        auth.introspect_token(IntrospectTokenRequest {
            access_token: before.access_token.clone()
        })
        .await
        .expect("IntrospectToken")
        .into_inner()
        .key_id,
        auth.introspect_token(IntrospectTokenRequest {
            access_token: after.access_token.clone()
        })
        .await
        .expect("IntrospectToken")
        .into_inner()
        .key_id,
    );
}
