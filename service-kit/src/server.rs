//! The gRPC server both services run: their routes plus health (`grpc.health.v1`), reflection
//! (v1 and v1alpha), request limits, per-RPC telemetry and graceful shutdown.
//!
//! The caller owns the listener and the shutdown future, so tests bind port 0 and stop the
//! server whenever they like.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::config::ServerSettings;

/// Largest request message accepted; bigger ones are refused with OUT_OF_RANGE before decoding.
pub const MAX_DECODE_BYTES: usize = 64 * 1024;

/// How often a readiness check runs.
const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// Says whether the service's store (Redis, Postgres) answers. Runs every couple of seconds; the
/// named gRPC services are NOT_SERVING while it says false.
pub type ReadinessCheck = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// What a service hands to [`serve`].
pub struct App {
    /// The service's own gRPC services.
    pub routes: Routes,
    /// Fully qualified names of those services, reported through health checking.
    pub service_names: Vec<&'static str>,
    /// Readiness of the store behind them.
    pub readiness: Option<ReadinessCheck>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("served methods: {0}")]
    KnownMethods(#[from] crate::observe::KnownMethodsError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics endpoint: {0}")]
    Metrics(#[from] std::io::Error),
    #[error("server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = futures::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

async fn set_all(reporter: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then: health turns NOT_SERVING, the
/// server waits `shutdown_delay` (so load balancers notice), stops accepting calls and lets
/// in-flight calls finish for at most `shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    app: App,
    settings: &ServerSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    set_all(&reporter, &app.service_names, ServingStatus::Serving).await;

    let readiness_task = app.readiness.map(|check| {
        let reporter = reporter.clone();
        let names = app.service_names.clone();
        // What the readiness checks see, for dashboards and the store-down alert: a
        // NOT_SERVING pod drops out of its Service, so its own RPC metrics go quiet.
        let store_up = crate::metrics::gauge(
            "refsys_store_up",
            "1 while the service's store (Redis, Postgres) answers its readiness check, else 0.",
        );
        store_up.set(1);
        tokio::spawn(async move {
            let mut was_ready = true;
            loop {
                let ready = check().await;
                store_up.set(i64::from(ready));
                if ready != was_ready {
                    tracing::warn!(ready, "store readiness changed");
                    was_ready = ready;
                }
                let status = if ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                set_all(&reporter, &names, status).await;
                tokio::time::sleep(READINESS_INTERVAL).await;
            }
        })
    });

    let metrics_task = match settings.metrics_addr {
        Some(addr) => Some(tokio::spawn(crate::metrics::serve_metrics(
            TcpListener::bind(addr).await?,
        ))),
        None => None,
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(refsys_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(refsys_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = app
        .routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let known_methods = crate::observe::KnownMethods::of_server(&app.service_names)?;
    known_methods.zero_metrics();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .timeout(settings.request_timeout)
        .max_connection_age(settings.max_connection_age)
        .max_connection_age_grace(settings.shutdown_grace)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(crate::observe::RpcObserverLayer::new(known_methods))
        .layer(GlobalConcurrencyLimitLayer::new(settings.concurrency_limit))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);

    let result = tokio::select! {
        joined = &mut server => Some(joined),
        () = shutdown => None,
    };
    if let Some(joined) = result {
        // The server stopped on its own: that is a failure, not a shutdown.
        return Ok(joined??);
    }

    tracing::info!("shutdown requested: reporting NOT_SERVING and draining in-flight calls");
    if let Some(task) = readiness_task {
        task.abort();
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    set_all(&reporter, &app.service_names, ServingStatus::NotServing).await;
    tokio::time::sleep(settings.shutdown_delay).await;
    let _ = stop_tx.send(());
    let outcome = match tokio::time::timeout(settings.shutdown_grace, &mut server).await {
        Ok(joined) => joined?.map_err(ServeError::from),
        Err(_) => {
            tracing::warn!(
                grace = ?settings.shutdown_grace,
                "in-flight calls did not finish within the grace period; stopping anyway"
            );
            server.abort();
            Ok(())
        }
    };
    if let Some(task) = metrics_task {
        task.abort();
    }
    tracing::info!("server stopped");
    outcome
}
