//! The shared server bootstrap, seen from outside: health, reflection, config errors, shutdown.

use std::time::Duration;

use e2e_tests::Stack;
use e2e_tests::process::run_to_exit;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::{v1, v1alpha};

const AUTH_SERVICES: &[&str] = &["refsys.auth.v1.AuthService"];
const REFERRAL_SERVICES: &[&str] = &[
    "refsys.referral.v1.ReferralService",
    "refsys.referral.v1.UserDirectory",
    "refsys.referral.v1.AdminService",
];

/// `ListServices` through one version of the reflection API (v1 and v1alpha have the same
/// shape in different packages; older grpcurl builds only speak v1alpha).
macro_rules! list_services {
    ($version:ident, $process:expr) => {{
        use $version::server_reflection_client::ServerReflectionClient;
        use $version::server_reflection_request::MessageRequest;
        use $version::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(Stack::channel($process).await);
        let request = $version::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection answers")
            .into_inner();
        match stream
            .message()
            .await
            .expect("a reply")
            .and_then(|r| r.message_response)
        {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected reflection reply {other:?}"),
        }
    }};
}

#[tokio::test]
async fn both_services_serve_health_and_reflection() {
    let stack = Stack::start().await;
    for (process, services) in [
        (&stack.auth, AUTH_SERVICES),
        (&stack.referral, REFERRAL_SERVICES),
    ] {
        assert_eq!(process.health("").await, Some(ServingStatus::Serving));
        for service in services {
            assert_eq!(
                process.health(service).await,
                Some(ServingStatus::Serving),
                "{service}"
            );
        }
        for listed in [
            list_services!(v1, process),
            list_services!(v1alpha, process),
        ] {
            for service in services.iter().chain(&["grpc.health.v1.Health"]) {
                assert!(
                    listed.iter().any(|s| s == service),
                    "{service} not in {listed:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_bad_setting_exits_2_with_one_clear_line() {
    for (binary, key) in [
        ("auth-service", "OTP_LENGTH"),
        ("referral-service", "REFERRAL_GRPC_ADDR"),
        ("auth-service", "AUTH_GRPC_ADDR"),
        ("referral-service", "BONUS_INVITER"),
    ] {
        let (status, output) = run_to_exit(binary, &[(key, "nonsense")], &[]).await;
        assert_eq!(status.code(), Some(2), "{binary} {key}: {output}");
        let line = output.lines().find(|l| l.contains(key)).unwrap_or_default();
        assert!(
            line.contains("nonsense"),
            "{binary}: no line names {key}: {output}"
        );
        assert!(!output.contains("panicked"), "{binary} panicked: {output}");
    }
}

/// Start-up errors end up in log collectors: a URL's password must not be in them.
#[tokio::test]
async fn a_bad_url_with_a_password_exits_2_without_showing_it() {
    for (binary, key, value) in [
        (
            "auth-service",
            "REDIS_URL",
            "redis://user:s3cret@host:notaport",
        ),
        (
            "referral-service",
            "DATABASE_URL",
            "postgres://u:s3cret@h:x/db",
        ),
        (
            "referral-service",
            "DATABASE_URL",
            "postgres://u:s3cret@h/db?sslmode=sometimes",
        ),
        (
            "referral-service",
            "AUTH_GRPC_URL",
            "ftp://u:s3cret@auth:50051",
        ),
        (
            "auth-service",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://u:s3cret@coll ector:4317",
        ),
    ] {
        let (status, output) = run_to_exit(binary, &[(key, value)], &[]).await;
        assert_eq!(status.code(), Some(2), "{binary} {key}: {output}");
        let lines: Vec<_> = output.lines().filter(|l| l.contains(key)).collect();
        assert_eq!(lines.len(), 1, "{binary}: one line names {key}: {output}");
        assert!(lines[0].contains("***"), "{binary}: {output}");
        assert!(
            !output.contains("s3cret"),
            "{binary} prints the password of {key}: {output}"
        );
    }
}

#[tokio::test]
async fn sigterm_reports_not_serving_then_exits_0() {
    let mut stack = Stack::start().await;
    for process in [&mut stack.auth, &mut stack.referral] {
        process.terminate();
        // SHUTDOWN_DELAY_SECONDS=1 in the stack: health answers NOT_SERVING before the port closes.
        let mut saw_not_serving = false;
        for _ in 0..40 {
            match process.health("").await {
                Some(ServingStatus::NotServing) => {
                    saw_not_serving = true;
                    break;
                }
                None => break,
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
        assert!(
            saw_not_serving,
            "{} never reported NOT_SERVING",
            process.name
        );
        let status = process.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "{}:\n{}",
            process.name,
            process.logs()
        );
    }
}
