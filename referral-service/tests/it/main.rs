//! Storage and rule tests on the real Postgres: each `#[sqlx::test]` gets a fresh database
//! with the migrations applied. One test binary on purpose (link time on 2 cores).

mod activation;
mod auth;
mod deletion;
mod events;
mod grpc;
mod points;
mod profile_cache;
mod users;

use std::sync::Arc;

use referral_service::domain::{InviteCode, PhoneNumber, PhonePepper, UserId};
use referral_service::storage::{Bonuses, Repository, UserRecord};
use sqlx::PgPool;

pub const BONUSES: Bonuses = Bonuses {
    invitee: 100,
    inviter: 200,
};

/// The pepper of the tests' phone hashes.
pub fn pepper() -> PhonePepper {
    PhonePepper::from_bytes(b"test pepper, 16+ bytes").expect("long enough")
}

pub fn repository(pool: &PgPool) -> Arc<Repository> {
    Arc::new(Repository::new(pool.clone(), BONUSES, pepper()))
}

pub fn phone(n: u32) -> PhoneNumber {
    PhoneNumber::parse(&format!("+7960{n:07}"), None).expect("valid test phone")
}

/// Creates users 0..count in order (so earlier ones joined first).
pub async fn users(repository: &Repository, count: u32) -> Vec<UserRecord> {
    let mut users = Vec::new();
    for n in 0..count {
        users.push(
            repository
                .ensure_user(&phone(n))
                .await
                .expect("user created")
                .0,
        );
    }
    users
}

/// The user's own invite code, for activating it.
pub fn code(user: &UserRecord) -> InviteCode {
    InviteCode::parse(&user.invite_code).expect("a stored invite code")
}

pub fn id(user: &UserRecord) -> UserId {
    UserId(user.id)
}
