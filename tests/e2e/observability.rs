//! Metrics and trace propagation, seen from outside.

use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::{RefreshTokensRequest, SendCodeRequest, VerifyCodeRequest};

#[tokio::test]
async fn one_sign_in_is_one_trace_across_both_services() {
    let access_log = "info,refsys::rpc=debug".to_owned();
    let stack = Stack::start_with(StackOptions {
        auth_env: vec![("RUST_LOG", access_log.clone())],
        referral_env: vec![("RUST_LOG", access_log)],
    })
    .await;
    let mut auth = stack.auth_client().await;
    let phone = "+79601230040";
    auth.send_code(SendCodeRequest {
        phone_number: phone.into(),
    })
    .await
    .expect("SendCode");
    let code = stack.sms.latest_code(phone).await.expect("code captured");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(VerifyCodeRequest {
        phone_number: phone.into(),
        code,
        invite_code: None,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .expect("ascii"),
    );
    auth.verify_code(request).await.expect("VerifyCode");

    // auth-service's VerifyCode span joined the caller's trace, and referral-service's EnsureUser
    // span joined it too: the trace context crossed the auth → referral call.
    let auth_logs = stack.auth.logs();
    let referral_logs = stack.referral.logs();
    assert!(
        auth_logs
            .lines()
            .any(|l| l.contains(trace_id) && l.contains("VerifyCode")),
        "auth-service did not continue the trace:\n{auth_logs}"
    );
    assert!(
        referral_logs
            .lines()
            .any(|l| l.contains(trace_id) && l.contains("EnsureUser")),
        "referral-service did not continue the trace:\n{referral_logs}"
    );
}

#[tokio::test]
async fn metrics_count_rpcs_by_code_and_domain_events() {
    let stack = Stack::start().await;
    let user = stack.sign_in("+79601230050", None).await;
    let mut auth = stack.auth_client().await;
    auth.refresh_tokens(RefreshTokensRequest {
        refresh_token: user.refresh_token.clone(),
    })
    .await
    .expect("RefreshTokens");
    let _ = auth
        .refresh_tokens(RefreshTokensRequest {
            refresh_token: user.refresh_token.clone(),
        })
        .await
        .expect_err("reuse is refused");
    let _ = auth
        .send_code(SendCodeRequest {
            phone_number: "not a phone".into(),
        })
        .await
        .expect_err("refused");

    let auth_metrics = Stack::metrics(stack.auth_metrics).await;
    for expected in [
        r#"grpc_server_handled_total{grpc_code="OK",grpc_method="SendCode",grpc_service="refsys.auth.v1.AuthService"} 1"#,
        r#"grpc_server_handled_total{grpc_code="InvalidArgument",grpc_method="SendCode",grpc_service="refsys.auth.v1.AuthService"} 1"#,
        r#"grpc_server_handling_seconds_bucket{grpc_method="VerifyCode""#,
        "grpc_server_in_flight",
        "refsys_otp_codes_sent_total 1",
        r#"refsys_otp_verifications_total{outcome="success"} 1"#,
        "refsys_refresh_tokens_rotated_total 1",
        "refsys_refresh_token_reuse_total 1",
        "refsys_sms_failures_total 0",
    ] {
        assert!(
            auth_metrics.contains(expected),
            "missing {expected:?} in:\n{auth_metrics}"
        );
    }
    let referral_metrics = Stack::metrics(stack.referral_metrics).await;
    for expected in [
        r#"grpc_server_handled_total{grpc_code="OK",grpc_method="EnsureUser",grpc_service="refsys.referral.v1.UserDirectory"} 1"#,
        "refsys_invite_activations_total 0",
        "refsys_db_pool_max_connections 10",
        r#"refsys_db_pool_connections{state="in_use"}"#,
    ] {
        assert!(
            referral_metrics.contains(expected),
            "missing {expected:?} in:\n{referral_metrics}"
        );
    }
}
