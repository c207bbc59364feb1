//! Prometheus metrics: the per-RPC set every service shares, a way for services to add their
//! own domain counters, and the `/metrics` HTTP endpoint.

use std::convert::Infallible;
use std::sync::LazyLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

pub use prometheus::{IntCounter, IntCounterVec as LabelledCounter, IntGaugeVec};

/// Every metric of the process lives here.
pub fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);
    &REGISTRY
}

/// `metric` (named `name`; `Err` when the name or labels are invalid, a programming error),
/// registered in [`registry`]. Registering the same name twice (also a programming error)
/// yields an unregistered metric rather than a crash.
fn registered<M>(name: &str, metric: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.unwrap_or_else(|err| panic!("invalid metric {name}: {err}"));
    if let Err(err) = registry().register(Box::new(metric.clone())) {
        tracing::error!(metric = name, %err, "metric registered twice");
    }
    metric
}

/// A counter with labels, registered once under `name`.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(name, IntCounterVec::new(Opts::new(name, help), labels))
}

/// A counter without labels, registered once under `name` (shown as 0 until it counts).
pub fn counter(name: &str, help: &str) -> prometheus::IntCounter {
    registered(name, prometheus::IntCounter::new(name, help))
}

/// A gauge with labels, registered once under `name`.
pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(name, IntGaugeVec::new(Opts::new(name, help), labels))
}

/// A gauge without labels, registered once under `name`.
pub fn gauge(name: &str, help: &str) -> prometheus::IntGauge {
    registered(name, prometheus::IntGauge::new(name, help))
}

/// The metrics every gRPC call updates, labelled by service, method and status code.
pub struct RpcMetrics {
    pub handled: IntCounterVec,
    pub latency: HistogramVec,
    pub in_flight: IntGaugeVec,
}

pub fn rpc() -> &'static RpcMetrics {
    static RPC: LazyLock<RpcMetrics> = LazyLock::new(|| {
        let handled = counter_vec(
            "grpc_server_handled_total",
            "gRPC calls completed, by status code.",
            &["grpc_service", "grpc_method", "grpc_code"],
        );
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "grpc_server_handling_seconds",
                "Time from receiving a gRPC call to sending its response headers.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["grpc_service", "grpc_method"],
        )
        .unwrap_or_else(|err| panic!("invalid histogram: {err}"));
        let in_flight = IntGaugeVec::new(
            Opts::new("grpc_server_in_flight", "gRPC calls being handled now."),
            &["grpc_service"],
        )
        .unwrap_or_else(|err| panic!("invalid gauge: {err}"));
        for collector in [
            Box::new(latency.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(in_flight.clone()),
        ] {
            if let Err(err) = registry().register(collector) {
                tracing::error!(%err, "metric registered twice");
            }
        }
        RpcMetrics {
            handled,
            latency,
            in_flight,
        }
    });
    &RPC
}

/// The text exposition of every registered metric.
pub fn render() -> String {
    let mut buffer = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(err) = encoder.encode(&registry().gather(), &mut buffer) {
        tracing::error!(%err, "could not encode metrics");
    }
    String::from_utf8(buffer).unwrap_or_default()
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if request.uri().path() == "/metrics" {
        Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(render())))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
    };
    Ok(response.unwrap_or_default())
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "metrics endpoint could not accept a connection");
                continue;
            }
        };
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, hyper::service::service_fn(answer))
                .await;
        });
    }
}
