//! referral-service: users, invite codes, the bonus ledger and profiles, in Postgres.
//!
//! Layers: `domain` (validated values), `rules` (pure programme rules), `storage` (sqlx),
//! `grpc` (handlers and conversions), `error` (the one error type and its gRPC mapping).

pub mod config;
pub mod domain;
pub mod error;
pub mod events;
pub mod grpc;
pub mod points;
pub mod profile_cache;
pub mod rules;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use refsys_proto::referral::v1::admin_service_server::AdminServiceServer;
use refsys_proto::referral::v1::event_service_server::EventServiceServer;
use refsys_proto::referral::v1::points_service_server::PointsServiceServer;
use refsys_proto::referral::v1::referral_service_server::ReferralServiceServer;
use refsys_proto::referral::v1::user_directory_server::UserDirectoryServer;
use service_kit::authn::{Authenticated, Authenticator, RemoteJwks, Requirement};
use service_kit::server::{App, MAX_DECODE_BYTES, ServeError};
use service_kit::tokens::{
    DELETE_USER_SCOPE, ENSURE_USER_SCOPE, EVENTS_READ_SCOPE, KeySet, LOOKUP_USER_SCOPE,
    POINTS_GRANT_SCOPE, POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE, REFERRAL_SERVICE_AUDIENCE,
    Verifier,
};
use tokio::net::TcpListener;
use tonic::server::NamedService;

use crate::config::Config;
use crate::profile_cache::ProfileCache;
use crate::storage::Repository;

/// How often auth-service's keys are refetched, and the least time between on-demand fetches
/// triggered by an unknown `kid`.
const JWKS_REFRESH: Duration = Duration::from_secs(300);
const JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);

/// The scope each `UserDirectory` RPC needs on the caller's service token. An RPC missing here
/// is refused to every caller.
pub const DIRECTORY_SCOPES: &[(&str, &str)] = &[
    ("EnsureUser", ENSURE_USER_SCOPE),
    ("LookupUser", LOOKUP_USER_SCOPE),
    ("DeleteUser", DELETE_USER_SCOPE),
];

/// The scope each `PointsService` RPC needs on the caller's service token.
pub const POINTS_SCOPES: &[(&str, &str)] = &[
    ("GetBalance", POINTS_READ_SCOPE),
    ("RedeemPoints", POINTS_REDEEM_SCOPE),
    ("GrantPoints", POINTS_GRANT_SCOPE),
];

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Database(#[from] error::ReferralError),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("AUTH_GRPC_URL: {0}")]
    AuthUrl(#[from] tonic::transport::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

pub async fn repository(config: &Config) -> Result<Repository, StartError> {
    let pool = storage::connect(
        &config.database_url,
        config.database_max_connections,
        config.database_acquire_timeout,
    )
    .await?;
    Ok(Repository::new(
        pool,
        config.bonuses,
        config.phone_pepper.clone(),
    ))
}

/// The scope of `EventService.WatchEvents`.
pub const EVENT_SCOPES: &[(&str, &str)] = &[("WatchEvents", EVENTS_READ_SCOPE)];

/// The gRPC services, each behind the token check it needs: `ReferralService` a user's access
/// token, `UserDirectory`, `EventService` and `PointsService` a service token with the called
/// RPC's scope ([`DIRECTORY_SCOPES`], [`EVENT_SCOPES`], [`POINTS_SCOPES`]), `AdminService` a user
/// token with the admin role.
/// Event streams are woken by `notifier`.
pub fn routes(
    repository: &Repository,
    authenticator: Arc<Authenticator>,
    notifier: &events::Notifier,
    profiles: Option<Arc<ProfileCache>>,
) -> tonic::service::Routes {
    let events = EventServiceServer::new(grpc::EventHandler::new(
        events::Outbox::new(repository.pool().clone()),
        notifier.clone(),
    ))
    .max_decoding_message_size(MAX_DECODE_BYTES);
    let referral = ReferralServiceServer::new(grpc::ReferralHandler::with_profile_cache(
        repository.clone(),
        profiles,
    ))
    .max_decoding_message_size(MAX_DECODE_BYTES);
    let directory = UserDirectoryServer::new(grpc::DirectoryHandler::new(repository.clone()))
        .max_decoding_message_size(MAX_DECODE_BYTES);
    let admin = AdminServiceServer::new(grpc::AdminHandler::new(repository.clone()))
        .max_decoding_message_size(MAX_DECODE_BYTES);
    let points = PointsServiceServer::new(grpc::PointsHandler::new(repository.clone()))
        .max_decoding_message_size(MAX_DECODE_BYTES);
    tonic::service::Routes::builder()
        .add_service(Authenticated::new(
            referral,
            authenticator.clone(),
            Requirement::User,
        ))
        .add_service(Authenticated::new(
            directory,
            authenticator.clone(),
            Requirement::ServicePerMethod {
                scopes: DIRECTORY_SCOPES,
            },
        ))
        .add_service(Authenticated::new(
            events,
            authenticator.clone(),
            Requirement::ServicePerMethod {
                scopes: EVENT_SCOPES,
            },
        ))
        .add_service(Authenticated::new(
            points,
            authenticator.clone(),
            Requirement::ServicePerMethod {
                scopes: POINTS_SCOPES,
            },
        ))
        .add_service(Authenticated::new(admin, authenticator, Requirement::Admin))
        .clone()
        .routes()
}

/// Serves the gRPC services on `listener` until `shutdown` resolves; prunes old idempotency keys
/// of PointsService meanwhile.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    if config.phone_pepper.is_development() {
        tracing::warn!(
            "PHONE_HASH_PEPPER_FILE is not set: using the fixed development pepper, which is \
             public. Hashes of deleted users' phone numbers can then be reversed by anyone with \
             the database. Development only; set a secret pepper (and never change it) in \
             production."
        );
    }
    let repository = repository(config).await?;
    if config.run_migrations {
        storage::MIGRATOR.run(repository.pool()).await?;
    }

    let verifier = Arc::new(Verifier::new(
        &config.jwt_issuer,
        &[&config.jwt_audience, REFERRAL_SERVICE_AUDIENCE],
        KeySet::default(),
    ));
    let jwks = RemoteJwks::new(&config.auth_grpc_url, verifier.clone(), JWKS_MIN_REFETCH)?;
    let refresher = jwks.spawn_refresher(JWKS_REFRESH);
    let authenticator = Arc::new(Authenticator::new(
        verifier,
        &config.jwt_audience,
        REFERRAL_SERVICE_AUDIENCE,
        Some(jwks),
    ));

    let profiles = config
        .profile_cache
        .map(|settings| Arc::new(ProfileCache::new(settings.ttl, settings.capacity)));
    let (notifier, listener_task) =
        events::Notifier::spawn(repository.pool().clone(), profiles.clone());
    let pruner = spawn_event_pruning(
        events::Outbox::new(repository.pool().clone()),
        config.events_retention,
    );
    let routes = routes(&repository, authenticator, &notifier, profiles);

    let readiness_repository = repository.clone();
    let app = App {
        routes,
        service_names: vec![
            <ReferralServiceServer<grpc::ReferralHandler> as NamedService>::NAME,
            <UserDirectoryServer<grpc::DirectoryHandler> as NamedService>::NAME,
            <AdminServiceServer<grpc::AdminHandler> as NamedService>::NAME,
            <EventServiceServer<grpc::EventHandler> as NamedService>::NAME,
            <PointsServiceServer<grpc::PointsHandler> as NamedService>::NAME,
        ],
        readiness: Some(Arc::new(move || {
            let repository = readiness_repository.clone();
            Box::pin(async move { repository.is_reachable().await })
        })),
    };
    tracing::info!(addr = %config.grpc_addr, "referral-service listening");
    let key_pruner = points::spawn_pruner(repository.clone());
    let served = service_kit::server::serve(listener, app, &config.server, shutdown).await;
    key_pruner.abort();
    refresher.abort();
    listener_task.abort();
    pruner.abort();
    repository.pool().close().await;
    Ok(served?)
}

/// How often old events are pruned, and how many go per statement (short transactions, so
/// pruning never holds locks long).
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const PRUNE_BATCH: i64 = 10_000;

/// Prunes events older than `retention` now and every [`PRUNE_EVERY`], in bounded batches.
fn spawn_event_pruning(outbox: events::Outbox, retention: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            loop {
                match outbox.prune(retention, PRUNE_BATCH).await {
                    Ok(deleted) if deleted == PRUNE_BATCH as u64 => continue,
                    Ok(deleted) => {
                        if deleted > 0 {
                            tracing::info!(deleted, "pruned old events");
                        }
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "could not prune old events; will retry");
                        break;
                    }
                }
            }
            tokio::time::sleep(PRUNE_EVERY).await;
        }
    })
}
