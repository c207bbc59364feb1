//! Metrics and trace propagation, seen from outside.

use std::collections::HashSet;
use std::hash::BuildHasher;

use e2e_tests::{Stack, StackOptions, raw};
use prost::Message;
use refsys_proto::auth::v1::{RefreshTokensRequest, SendCodeRequest, VerifyCodeRequest};
use tonic::Code;

/// SendCode, then VerifyCode as part of the caller's trace `trace_id` (W3C traceparent).
async fn sign_in_within_trace(stack: &Stack, phone: &str, trace_id: &str) {
    let mut auth = stack.auth_client().await;
    auth.send_code(SendCodeRequest {
        phone_number: phone.into(),
    })
    .await
    .expect("SendCode");
    let code = stack.sms.latest_code(phone).await.expect("code captured");
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
}

#[tokio::test]
async fn one_sign_in_is_one_trace_across_both_services() {
    let access_log = "info,refsys::rpc=debug".to_owned();
    let stack = Stack::start_with(StackOptions {
        auth_env: vec![("RUST_LOG", access_log.clone())],
        referral_env: vec![("RUST_LOG", access_log)],
        ..StackOptions::default()
    })
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    sign_in_within_trace(&stack, "+79601230040", trace_id).await;

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
    // No grace window: presenting the rotated token again below is reuse at once.
    let stack = Stack::start_with(StackOptions {
        auth_env: vec![("REFRESH_REUSE_GRACE_SECONDS", "0".to_owned())],
        ..StackOptions::default()
    })
    .await;
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

    // Made-up paths are answered UNIMPLEMENTED and leave no labels of their own behind.
    for path in [
        "/made.up.Service/Probe",
        "/refsys.auth.v1.AuthService/Probe",
    ] {
        let status =
            e2e_tests::raw::call(Stack::channel(&stack.auth).await, path, Vec::new(), None)
                .await
                .expect_err("no such method");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }

    let auth_metrics = Stack::metrics(stack.auth_metrics).await;
    assert!(!auth_metrics.contains("made.up") && !auth_metrics.contains("Probe"));
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

/// Every service and method name the two servers serve, from the same descriptor sets.
fn real_names() -> (HashSet<String>, HashSet<String>) {
    let (mut services, mut methods) = (HashSet::new(), HashSet::new());
    for set in [
        refsys_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        for file in prost_types::FileDescriptorSet::decode(set)
            .expect("descriptor set")
            .file
        {
            for service in &file.service {
                services.insert(format!("{}.{}", file.package(), service.name()));
                methods.extend(service.method.iter().map(|m| m.name().to_owned()));
            }
        }
    }
    (services, methods)
}

/// The values of `label` anywhere in a Prometheus text exposition.
fn label_values(metrics: &str, label: &str) -> HashSet<String> {
    let key = format!("{label}=\"");
    metrics
        .split(key.as_str())
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(value, _)| value.to_owned()))
        .collect()
}

/// Made-up methods on real services (rejected by a token check before routing, or routed and
/// UNIMPLEMENTED) and made-up services, with and without a token: none may become a label.
#[tokio::test]
async fn made_up_methods_never_become_metric_labels() {
    let stack = Stack::start().await;
    let user = stack.sign_in("+79601230060", None).await;
    let auth = Stack::channel(&stack.auth).await;
    let referral = Stack::channel(&stack.referral).await;
    let random = std::collections::hash_map::RandomState::new();
    let made_up = |i: u64| format!("Zq{:016x}", random.hash_one(i));

    // (on referral-service, service)
    let services = [
        (false, "refsys.auth.v1.AuthService"),
        (false, "grpc.health.v1.Health"),
        (false, "grpc.reflection.v1.ServerReflection"),
        // Real, but served by the other process.
        (false, "refsys.referral.v1.ReferralService"),
        (true, "refsys.referral.v1.ReferralService"),
        (true, "refsys.referral.v1.UserDirectory"),
        (true, "refsys.referral.v1.AdminService"),
        (true, "grpc.reflection.v1alpha.ServerReflection"),
    ];
    let mut sent = Vec::new();
    let mut codes = HashSet::new();
    for i in 0..56_u64 {
        let (on_referral, path) = match i % 10 {
            n @ 0..8 => {
                let (on_referral, service) = services[n as usize];
                (on_referral, format!("/{service}/{}", made_up(i)))
            }
            n => (
                n == 9,
                format!("/zq.{}.Service/{}", made_up(i), made_up(i + 1000)),
            ),
        };
        let channel = if on_referral { &referral } else { &auth };
        let token = (i % 3 == 0).then_some(user.access_token.as_str());
        let status = raw::call(channel.clone(), &path, Vec::new(), token)
            .await
            .expect_err("no such method");
        codes.insert((on_referral, token.is_some(), status.code()));
        sent.push(path);
    }
    // The case that used to leak: the token check answers before routing.
    assert!(
        codes.contains(&(true, false, Code::Unauthenticated)),
        "{codes:?}"
    );
    assert!(
        codes.contains(&(true, true, Code::Unimplemented)),
        "{codes:?}"
    );

    let (real_services, real_methods) = real_names();
    for (name, addr) in [
        ("auth-service", stack.auth_metrics),
        ("referral-service", stack.referral_metrics),
    ] {
        let metrics = Stack::metrics(addr).await;
        assert!(
            !metrics.contains("Zq") && !metrics.contains("zq."),
            "{name} exposes a made-up name:\n{metrics}"
        );
        for path in &sent {
            let method = path.rsplit('/').next().unwrap_or_default();
            assert!(!metrics.contains(method), "{name} exposes {path}");
        }
        let methods = label_values(&metrics, "grpc_method");
        assert!(methods.contains("unknown"), "{name}: {methods:?}");
        for method in &methods {
            assert!(
                method == "unknown" || real_methods.contains(method),
                "{name} labels grpc_method={method:?}"
            );
        }
        for service in label_values(&metrics, "grpc_service") {
            assert!(
                service == "unknown" || real_services.contains(&service),
                "{name} labels grpc_service={service:?}"
            );
        }
    }
}

mod collector {
    //! A minimal OTLP/gRPC trace collector that keeps what it receives.

    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;

    /// (service.name, span name, trace id as hex)
    pub type Span = (String, String, String);

    #[derive(Clone, Default)]
    pub struct Collector {
        pub spans: Arc<Mutex<Vec<Span>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
            for resource_spans in request.into_inner().resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                    .map(|value| match value {
                        Value::StringValue(s) => s.clone(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                for scope in resource_spans.scope_spans {
                    for span in scope.spans {
                        let trace_id: String =
                            span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                        spans.push((service.clone(), span.name, trace_id));
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Serves the collector on a free loopback port; returns its endpoint URL.
    pub async fn start(collector: Collector) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("collector binds");
        let addr = listener.local_addr().expect("bound");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }
}

#[tokio::test]
async fn traces_are_exported_over_otlp_as_one_trace_per_sign_in() {
    let sink = collector::Collector::default();
    let endpoint = collector::start(sink.clone()).await;
    let otel = |service: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_SERVICE_NAME", service.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ]
    };
    let stack = Stack::start_with(StackOptions {
        auth_env: otel("auth-e2e"),
        referral_env: otel("referral-e2e"),
        ..StackOptions::default()
    })
    .await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    sign_in_within_trace(&stack, "+79601230080", trace_id).await;

    let mut exported = Vec::new();
    for _ in 0..50 {
        exported = sink
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, _, id)| id == trace_id)
            .cloned()
            .collect();
        let services: std::collections::HashSet<_> = exported
            .iter()
            .map(|(service, _, _)| service.clone())
            .collect();
        if services.contains("auth-e2e") && services.contains("referral-e2e") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        exported
            .iter()
            .any(|(s, name, _)| s == "auth-e2e" && name.contains("VerifyCode")),
        "auth-service's span is missing: {exported:?}"
    );
    assert!(
        exported
            .iter()
            .any(|(s, name, _)| s == "referral-e2e" && name.contains("EnsureUser")),
        "referral-service's span is missing: {exported:?}"
    );
}
