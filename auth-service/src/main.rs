//! `auth-service`: serves `refsys.auth.v1.AuthService`. Every setting comes from the
//! environment; see `auth_service::config`.

use auth_service::config::AuthConfig;
use service_kit::config::{ProcessEnv, Settings, exit_on_config_error};

#[tokio::main]
async fn main() {
    let config = exit_on_config_error(AuthConfig::from_source(ProcessEnv));
    let _telemetry = exit_on_config_error(service_kit::telemetry::init(
        &Settings(ProcessEnv),
        "auth-service",
    ));
    if std::env::args().len() > 1 {
        eprintln!("usage: auth-service (configured by environment variables only)");
        std::process::exit(2);
    }
    let outcome = async {
        let listener = tokio::net::TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|err| format!("cannot listen on {}: {err}", config.grpc_addr))?;
        auth_service::serve(&config, listener, service_kit::server::shutdown_signal())
            .await
            .map_err(|err| err.to_string())
    }
    .await;
    if let Err(message) = outcome {
        tracing::error!("{message}");
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
