//! refsys auth-service: proves a caller holds a phone number and turns that proof into tokens.
//!
//! Layers: `phone` and `otp` (pure rules), `store` (Redis), `sms` (providers), `tokens` and
//! `directory` (JWTs, the referral-service client), `service_clients` (who may get service
//! tokens through IssueServiceToken), `grpc` (handlers), `error` (the one error type and its
//! gRPC mapping), `config` (settings).

pub mod client;
pub mod config;
pub mod directory;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod otp;
pub mod policy;
pub mod service_clients;
/// Phone numbers: the one E.164 validator both services share.
pub use service_kit::phone;
pub mod sms;
pub mod store;
pub mod tokens;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use refsys_proto::auth::v1::auth_service_server::AuthServiceServer;
use service_kit::config::ConfigError;
use service_kit::server::{App, MAX_DECODE_BYTES, ServeError};
use tokio::net::TcpListener;
use tonic::server::NamedService;

use crate::config::{AuthConfig, SmsProvider};
use crate::sms::{LogSender, SmsSender, TwilioSender};
use crate::store::refresh::SuccessorKey;
use crate::store::service_tokens::ServiceTokenStore;
use crate::store::{OtpStore, RefreshStore, StoreError};
use crate::tokens::{Clock, SystemClock, TokenIssuer};

/// How long one Redis call may take before the request fails with UNAVAILABLE.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("signing keys: {0}")]
    Keys(String),
    #[error("Redis: {0}")]
    Redis(#[from] StoreError),
    #[error("REFERRAL_GRPC_URL: {0}")]
    ReferralUrl(#[from] tonic::transport::Error),
    #[error("SMS provider: {0}")]
    Sms(#[from] reqwest::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Serves `refsys.auth.v1.AuthService` on `listener` until `shutdown` resolves.
pub async fn serve(
    config: &AuthConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    metrics::register(config.fraud.mode, &config.service_clients.ids());
    let pepper = config.load_pepper()?;
    let (signing, previous) = tokens::load_keys(
        config.jwt_signing_key_file.as_deref(),
        &config.jwt_previous_public_keys,
    )
    .map_err(StartError::Keys)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let issuer = Arc::new(TokenIssuer::new(
        signing,
        previous,
        &config.jwt_issuer,
        &config.jwt_audience,
        config.access_token_ttl,
        clock.clone(),
    ));
    // Redis may come up after us (a rollout, a restart of both): wait for it rather than exit
    // into a crash loop whose back-off outlasts the outage.
    let mut shutdown = std::pin::pin!(shutdown);
    let conn = loop {
        match store::connect_to(&config.redis, REDIS_TIMEOUT).await {
            Ok(conn) => {
                tracing::info!(redis = %config.redis.redacted(), "connected to Redis");
                break conn;
            }
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    redis = %config.redis.redacted(),
                    "Redis is not reachable yet; retrying every second"
                );
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    tracing::info!(
        policy = %config.sms_policy.describe(),
        fraud_guard = config.fraud.mode.as_str(),
        "SMS policy"
    );
    if !config.test_numbers.is_empty() {
        tracing::warn!(
            count = config.test_numbers.len(),
            "TEST_PHONE_NUMBERS is set: these numbers sign in with a fixed code and get no SMS"
        );
    }
    if config.service_clients.is_empty() {
        tracing::info!("no service clients (SERVICE_CLIENTS_FILE): IssueServiceToken accepts none");
    } else {
        tracing::info!(clients = ?config.service_clients.ids(), "service clients");
    }
    let sms: Arc<dyn SmsSender> = match &config.sms {
        SmsProvider::Log => {
            tracing::warn!(
                "SMS_PROVIDER=log: codes are not delivered, they are logged at {}",
                sms::DEV_LOG_TARGET
            );
            Arc::new(LogSender)
        }
        SmsProvider::Twilio(settings) => Arc::new(TwilioSender::new(settings.clone())?),
    };
    let handler = grpc::AuthHandler {
        otp: OtpStore::new(
            conn.clone(),
            config.redis_key_prefix.clone(),
            config.otp_limits.clone(),
            config.fraud.clone(),
            REDIS_TIMEOUT,
        ),
        refresh: RefreshStore::new(
            conn.clone(),
            config.redis_key_prefix.clone(),
            config.sessions,
            SuccessorKey::new(pepper.derive_key(b"refsys-refresh-successor-key-v1")),
            REDIS_TIMEOUT,
        ),
        sms,
        sms_policy: config.sms_policy.clone(),
        test_numbers: config.test_numbers.clone(),
        pepper,
        code_length: config.code_length,
        phone_region: config.phone_default_region,
        directory: directory::Directory::new(&config.referral_grpc_url, issuer.clone())?,
        service_clients: config.service_clients.clone(),
        service_tokens: ServiceTokenStore::new(
            conn.clone(),
            config.redis_key_prefix.clone(),
            config.service_token_limits,
            REDIS_TIMEOUT,
        ),
        service_token_ttl: config.service_token_ttl,
        issuer,
        trusted_proxy_hops: config.trusted_proxy_hops,
        server_timeout: config.server.request_timeout,
        clock,
    };
    let service = AuthServiceServer::new(handler).max_decoding_message_size(MAX_DECODE_BYTES);
    let routes = tonic::service::Routes::builder()
        .add_service(service)
        .clone()
        .routes();
    let app = App {
        routes,
        service_names: vec![<AuthServiceServer<grpc::AuthHandler> as NamedService>::NAME],
        readiness: Some(Arc::new(move || {
            let conn = conn.clone();
            Box::pin(async move { store::is_reachable(&conn, REDIS_TIMEOUT).await })
        })),
    };
    tracing::info!(addr = %config.grpc_addr, "auth-service listening");
    Ok(service_kit::server::serve(listener, app, &config.server, shutdown).await?)
}
