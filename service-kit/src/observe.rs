//! A tower layer around every gRPC call: one tracing span (child of the caller's W3C
//! `traceparent`, so one sign-in is one trace across services) and the per-RPC metrics.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Observes every call. Metric labels name only the services this server has, so a scanner
/// probing made-up paths cannot grow the label sets without bound.
#[derive(Debug, Clone)]
pub struct RpcObserverLayer {
    known_services: Arc<[&'static str]>,
}

impl RpcObserverLayer {
    pub fn new(known_services: &[&'static str]) -> Self {
        Self {
            known_services: known_services.into(),
        }
    }
}

impl<S> Layer<S> for RpcObserverLayer {
    type Service = RpcObserver<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcObserver {
            inner,
            known_services: self.known_services.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcObserver<S> {
    inner: S,
    known_services: Arc<[&'static str]>,
}

const UNKNOWN: &str = "unknown";

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`); a service this server does not have is
/// "unknown" (and so is its method).
fn split_path(path: &str, known_services: &[&'static str]) -> (String, String) {
    match path.trim_start_matches('/').split_once('/') {
        Some((service, method)) if known_services.contains(&service) => {
            (service.to_owned(), method.to_owned())
        }
        _ => (UNKNOWN.to_owned(), UNKNOWN.to_owned()),
    }
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
        let (service, method) = split_path(request.uri().path(), &self.known_services);
        let span = tracing::info_span!(
            "grpc",
            otel.name = format!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let _ = span.set_parent(crate::telemetry::extract_context(request.headers()));
        if let Some(trace_id) = crate::telemetry::trace_id_of(&span) {
            span.record("trace_id", trace_id);
        }

        let metrics = crate::metrics::rpc();
        let in_flight = metrics.in_flight.with_label_values(&[&service]);
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
                // A made-up method of a real service must not become a label either.
                let method = if code == tonic::Code::Unimplemented {
                    UNKNOWN.to_owned()
                } else {
                    method
                };
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
                    .with_label_values(&[&service, &method, &code_label(code)])
                    .inc();
                metrics
                    .latency
                    .with_label_values(&[&service, &method])
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

    #[test]
    fn paths_split_into_service_and_method_of_known_services_only() {
        let known = ["refsys.auth.v1.AuthService"];
        assert_eq!(
            split_path("/refsys.auth.v1.AuthService/SendCode", &known),
            ("refsys.auth.v1.AuthService".into(), "SendCode".into())
        );
        assert_eq!(
            split_path("/nonsense", &known),
            ("unknown".into(), "unknown".into())
        );
        assert_eq!(
            split_path("/made.up.Service/Probe", &known),
            ("unknown".into(), "unknown".into())
        );
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
