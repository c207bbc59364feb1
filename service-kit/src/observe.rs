//! A tower layer around every gRPC call: one tracing span (child of the caller's W3C
//! `traceparent`, so one sign-in is one trace across services) and the per-RPC metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use prost::Message;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const UNKNOWN: &str = "unknown";

/// The metric labels and span name of one RPC, made once at start.
#[derive(Debug, PartialEq, Eq)]
pub struct RpcName {
    pub service: String,
    pub method: String,
    /// `service/method`, the span's name.
    pub span_name: String,
}

impl RpcName {
    fn new(service: &str, method: &str) -> Self {
        Self {
            service: service.to_owned(),
            method: method.to_owned(),
            span_name: format!("{service}/{method}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KnownMethodsError {
    #[error("an encoded file descriptor set does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("service {0} is served but no descriptor set describes it")]
    Undescribed(String),
}

/// The methods a server serves, by request path (`/pkg.Service/Method`), the only names metric
/// labels and span names may carry: anything else a caller sends, a made-up service or a made-up
/// method of a real one, is `unknown`/`unknown`, whatever status it gets (UNIMPLEMENTED from the
/// router, or UNAUTHENTICATED from a token check that runs before routing). So a scanner cannot
/// grow the label sets without bound, and an unknown path costs a lookup, not an allocation.
#[derive(Debug, Clone)]
pub struct KnownMethods {
    by_path: Arc<HashMap<Box<str>, Arc<RpcName>>>,
    unknown: Arc<RpcName>,
}

impl KnownMethods {
    /// The methods of `services` as the encoded descriptor sets `sets` describe them. Every
    /// service must be described: one that is not would have all its calls counted as unknown.
    pub fn from_descriptor_sets(
        sets: &[&[u8]],
        services: &[&str],
    ) -> Result<Self, KnownMethodsError> {
        let mut by_path = HashMap::new();
        let mut described = Vec::new();
        for set in sets {
            for file in prost_types::FileDescriptorSet::decode(*set)?.file {
                for service in &file.service {
                    let name = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    if !services.contains(&name.as_str()) {
                        continue;
                    }
                    for method in &service.method {
                        by_path.insert(
                            format!("/{name}/{}", method.name()).into_boxed_str(),
                            Arc::new(RpcName::new(&name, method.name())),
                        );
                    }
                    described.push(name);
                }
            }
        }
        if let Some(missing) = services
            .iter()
            .find(|service| !described.iter().any(|name| name == *service))
        {
            return Err(KnownMethodsError::Undescribed((*missing).to_owned()));
        }
        Ok(Self {
            by_path: Arc::new(by_path),
            unknown: Arc::new(RpcName::new(UNKNOWN, UNKNOWN)),
        })
    }

    /// What [`crate::server::serve`] serves: the app's own services (described by
    /// refsys-proto's descriptor set) plus health checking and reflection v1 and v1alpha.
    pub fn of_server(app_services: &[&str]) -> Result<Self, KnownMethodsError> {
        let services: Vec<&str> = app_services
            .iter()
            .copied()
            .chain([
                tonic_health::pb::health_server::SERVICE_NAME,
                tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
                tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
            ])
            .collect();
        Self::from_descriptor_sets(
            &[
                refsys_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
            &services,
        )
    }

    /// The name of the RPC at `path`, or `unknown`/`unknown`. Only an exact path counts, as the
    /// router only serves exact paths.
    pub fn name_of(&self, path: &str) -> &Arc<RpcName> {
        self.by_path.get(path).unwrap_or(&self.unknown)
    }

    /// Shows the call counter of every known method at 0 for every status code, and every
    /// service's in-flight gauge at 0, before the first call (as go-grpc-prometheus does). A
    /// series that appears only with its first event starts at 1, which `rate()` and
    /// `increase()` cannot see, and leaves dashboards and alerts on that code with no data.
    pub fn zero_metrics(&self) {
        let metrics = crate::metrics::rpc();
        for name in self.by_path.values() {
            metrics.in_flight.with_label_values(&[&name.service]);
            for code in (0..=16).map(tonic::Code::from_i32) {
                metrics.handled.with_label_values(&[
                    &name.service,
                    &name.method,
                    &code_label(code),
                ]);
            }
        }
    }
}

/// Observes every call.
#[derive(Debug, Clone)]
pub struct RpcObserverLayer {
    known: KnownMethods,
}

impl RpcObserverLayer {
    pub fn new(known: KnownMethods) -> Self {
        Self { known }
    }
}

impl<S> Layer<S> for RpcObserverLayer {
    type Service = RpcObserver<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcObserver {
            inner,
            known: self.known.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcObserver<S> {
    inner: S,
    known: KnownMethods,
}

/// The gRPC status of a unary response: in the headers for errors (trailers-only responses),
/// otherwise in the trailers, which only ever say OK for our unary services.
fn grpc_code(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

/// tonic answers a request body that is not a valid protobuf message with INTERNAL, following
/// gRPC's status-code guide; but the fault is the caller's, and INTERNAL pages an operator.
/// Report it as INVALID_ARGUMENT instead.
fn reclassify_decode_error(headers: &mut http::HeaderMap) {
    let is_decode_error = headers.get("grpc-status").map(http::HeaderValue::as_bytes)
        == Some(b"13")
        && headers
            .get("grpc-message")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|message| {
                message
                    .replace("%20", " ")
                    .starts_with("failed to decode Protobuf message")
            });
    if is_decode_error {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "request%20is%20not%20a%20valid%20protobuf%20message%20for%20this%20RPC",
            ),
        );
    }
}

fn code_label(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".to_owned(),
        other => format!("{other:?}"),
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcObserver<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let name = self.known.name_of(request.uri().path()).clone();
        let span = tracing::info_span!(
            "grpc",
            otel.name = %name.span_name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %name.service,
            rpc.method = %name.method,
            rpc.grpc.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let _ = span.set_parent(crate::telemetry::extract_context(request.headers()));
        if let Some(trace_id) = crate::telemetry::trace_id_of(&span) {
            span.record("trace_id", trace_id);
        }

        let metrics = crate::metrics::rpc();
        let in_flight = metrics.in_flight.with_label_values(&[&name.service]);
        in_flight.inc();
        let started = Instant::now();

        // The clone is the one that was not polled ready; keep the ready one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let future = span.in_scope(|| inner.call(request));
        Box::pin(
            async move {
                let mut result = future.await;
                in_flight.dec();
                if let Ok(response) = &mut result {
                    reclassify_decode_error(response.headers_mut());
                }
                let code = match &result {
                    Ok(response) => grpc_code(response.headers()),
                    Err(_) => tonic::Code::Unknown,
                };
                tracing::Span::current().record("rpc.grpc.status_code", code as i32);
                let elapsed = started.elapsed();
                // An access log, off unless asked for (RUST_LOG=refsys::rpc=debug): at full load
                // one line per call costs more than the call.
                tracing::debug!(
                    target: "refsys::rpc",
                    code = code_label(code),
                    micros = elapsed.as_micros() as u64,
                    "rpc completed"
                );
                metrics
                    .handled
                    .with_label_values(&[&name.service, &name.method, &code_label(code)])
                    .inc();
                metrics
                    .latency
                    .with_label_values(&[&name.service, &name.method])
                    .observe(elapsed.as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(known: &KnownMethods, path: &str) -> (String, String) {
        let name = known.name_of(path);
        assert_eq!(name.span_name, format!("{}/{}", name.service, name.method));
        (name.service.clone(), name.method.clone())
    }

    fn unknown() -> (String, String) {
        ("unknown".into(), "unknown".into())
    }

    #[test]
    fn only_served_methods_are_named() {
        let known = KnownMethods::of_server(&["refsys.auth.v1.AuthService"]).unwrap();
        assert_eq!(
            labels(&known, "/refsys.auth.v1.AuthService/SendCode"),
            ("refsys.auth.v1.AuthService".into(), "SendCode".into())
        );
        for path in [
            // A made-up method of a served service, and near misses of a real one.
            "/refsys.auth.v1.AuthService/Probe1234",
            "/refsys.auth.v1.AuthService/sendcode",
            "/refsys.auth.v1.AuthService/SendCode/",
            "//refsys.auth.v1.AuthService/SendCode",
            "refsys.auth.v1.AuthService/SendCode",
            "/refsys.auth.v1.AuthService",
            // A service in the descriptor set that this server does not serve.
            "/refsys.referral.v1.ReferralService/GetProfile",
            "/made.up.Service/Probe",
            "/nonsense",
            "/",
            "",
        ] {
            assert_eq!(labels(&known, path), unknown(), "{path:?}");
        }
    }

    #[test]
    fn health_and_reflection_methods_are_known_on_every_server() {
        let known = KnownMethods::of_server(&[
            "refsys.referral.v1.ReferralService",
            "refsys.referral.v1.UserDirectory",
            "refsys.referral.v1.AdminService",
        ])
        .unwrap();
        for (service, method) in [
            ("grpc.health.v1.Health", "Check"),
            ("grpc.health.v1.Health", "Watch"),
            (
                "grpc.reflection.v1.ServerReflection",
                "ServerReflectionInfo",
            ),
            (
                "grpc.reflection.v1alpha.ServerReflection",
                "ServerReflectionInfo",
            ),
            ("refsys.referral.v1.ReferralService", "GetProfile"),
            ("refsys.referral.v1.UserDirectory", "EnsureUser"),
            ("refsys.referral.v1.AdminService", "ListUsers"),
        ] {
            assert_eq!(
                labels(&known, &format!("/{service}/{method}")),
                (service.into(), method.into())
            );
        }
        assert_eq!(
            labels(&known, "/refsys.auth.v1.AuthService/SendCode"),
            unknown()
        );
    }

    #[test]
    fn a_served_service_without_a_descriptor_is_refused() {
        assert!(matches!(
            KnownMethods::of_server(&["refsys.auth.v1.AuthServiceTypo"]),
            Err(KnownMethodsError::Undescribed(name)) if name == "refsys.auth.v1.AuthServiceTypo"
        ));
        assert!(matches!(
            KnownMethods::from_descriptor_sets(&[b"\xff\xff\xff"], &[]),
            Err(KnownMethodsError::Decode(_))
        ));
    }

    #[test]
    fn every_code_of_every_known_method_shows_before_the_first_call() {
        KnownMethods::of_server(&["refsys.auth.v1.AuthService"])
            .unwrap()
            .zero_metrics();
        let text = crate::metrics::render();
        // DeleteAccount: a method no test of this crate calls, so every line is still 0.
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| {
                line.starts_with("grpc_server_handled_total{")
                    && line.contains("grpc_method=\"DeleteAccount\"")
            })
            .collect();
        assert_eq!(lines.len(), 17, "{lines:#?}");
        for code in [
            "OK",
            "Unavailable",
            "Internal",
            "ResourceExhausted",
            "Unauthenticated",
        ] {
            assert!(
                lines
                    .iter()
                    .any(|line| line.contains(&format!("grpc_code=\"{code}\""))
                        && line.ends_with(" 0")),
                "{code}: {lines:#?}"
            );
        }
        assert!(text.contains("grpc_server_in_flight{grpc_service=\"grpc.health.v1.Health\"} 0"));
        // Nothing for services this server does not serve.
        assert!(!text.contains("grpc_method=\"GetProfile\""));
    }

    #[test]
    fn the_same_name_is_shared_not_copied_per_call() {
        let known = KnownMethods::of_server(&[]).unwrap();
        let a = known.name_of("/made.up.Service/One");
        let b = known.name_of("/grpc.health.v1.Health/Nope");
        assert!(Arc::ptr_eq(a, b));
    }

    #[test]
    fn status_comes_from_headers_and_defaults_to_ok() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_code(&headers), tonic::Code::Ok);
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        assert_eq!(grpc_code(&headers), tonic::Code::InvalidArgument);
        assert_eq!(code_label(tonic::Code::Ok), "OK");
    }

    #[test]
    fn undecodable_requests_become_invalid_argument() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("13"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "failed%20to%20decode%20Protobuf%20message:%20buffer%20underflow",
            ),
        );
        reclassify_decode_error(&mut headers);
        assert_eq!(grpc_code(&headers), tonic::Code::InvalidArgument);

        let mut genuine = http::HeaderMap::new();
        genuine.insert("grpc-status", http::HeaderValue::from_static("13"));
        genuine.insert(
            "grpc-message",
            http::HeaderValue::from_static("database%20exploded"),
        );
        reclassify_decode_error(&mut genuine);
        assert_eq!(grpc_code(&genuine), tonic::Code::Internal);
    }
}
