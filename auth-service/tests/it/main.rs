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

use auth_service::phone::PhoneNumber;
use auth_service::store::{self, RedisConnection};

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
