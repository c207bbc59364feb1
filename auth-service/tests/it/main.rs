//! Integration tests of auth-service against the real Redis (`REDIS_URL`, default
//! redis://127.0.0.1:6379). Every test uses its own random key prefix.

mod cluster;
mod config;
mod grpc;
mod otp_store;
mod outage;
mod refresh_store;
mod service_tokens;
mod sms;

use std::time::Duration;

use auth_service::config::AuthConfig;
use auth_service::phone::PhoneNumber;
use auth_service::store::{self, RedisConnection};
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub async fn redis() -> RedisConnection {
    store::connect(&redis_url(), Duration::from_secs(1))
        .await
        .expect("Redis at REDIS_URL (default 127.0.0.1:6379) must be running for these tests")
}

/// A fresh key prefix, so tests never see each other's keys.
pub fn prefix() -> String {
    use rand::RngCore;
    format!("refsys:test:{:016x}:", rand::rng().next_u64())
}

pub fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s, None).unwrap()
}

/// auth-service configured by `settings`, then `extra` (which wins), served in this process on a
/// free port until the returned sender is dropped; and a client of it.
pub async fn serve_auth(
    settings: Vec<(&str, String)>,
    extra: &[(&str, &str)],
) -> (AuthServiceClient<Channel>, tokio::sync::oneshot::Sender<()>) {
    let env: std::collections::HashMap<String, String> = settings
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .collect();
    let config = AuthConfig::from_source(env).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        auth_service::serve(&config, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let client = AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (client, stop)
}
