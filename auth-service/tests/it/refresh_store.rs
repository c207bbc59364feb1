//! Sessions (refresh-token families) on the real Redis. Time is passed in, so lifetimes and the
//! grace window are stepped over without waiting.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth_service::store::refresh::{
    FamilyOwner, IssuedRefreshToken, RefreshStore, RefreshToken, RotateOutcome, Rotation,
    SessionLimits, SuccessorKey,
};

use crate::{prefix, redis};

const DAY: Duration = Duration::from_secs(24 * 3600);
const USER: &str = "0190f5e2-0000-7000-8000-000000000001";

fn limits() -> SessionLimits {
    SessionLimits {
        token_ttl: 30 * DAY,
        max_lifetime: 90 * DAY,
        reuse_grace: Duration::from_secs(10),
    }
}

async fn store_with(limits: SessionLimits) -> RefreshStore {
    RefreshStore::new(
        redis().await,
        prefix(),
        limits,
        SuccessorKey::new([9; 32]),
        Duration::from_secs(2),
    )
}

async fn store() -> RefreshStore {
    store_with(limits()).await
}

/// A moment near now (Redis expires keys in real time, so the fake clock stays close to it).
fn t0() -> SystemTime {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

fn owner_of(user: &str) -> FamilyOwner {
    FamilyOwner {
        user_id: user.to_owned(),
        roles: vec!["admin".to_owned()],
    }
}

fn same(token: &RefreshToken) -> RefreshToken {
    RefreshToken::parse(token.expose()).unwrap()
}

async fn sign_in(store: &RefreshStore, user: &str, at: SystemTime) -> IssuedRefreshToken {
    store
        .create_family(&owner_of(user), "203.0.113.x", at)
        .await
        .unwrap()
}

async fn rotate(
    store: &RefreshStore,
    token: &RefreshToken,
    roles: &[&str],
    at: SystemTime,
) -> RotateOutcome {
    let found = store.peek(token).await.unwrap();
    let session = found.map_or_else(|| "0".repeat(32), |f| f.session_id);
    let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
    store.rotate(token, &session, &roles, at).await.unwrap()
}

async fn rotate_ok(store: &RefreshStore, token: &RefreshToken, at: SystemTime) -> Rotation {
    match rotate(store, token, &["admin"], at).await {
        RotateOutcome::Rotated(rotation) => rotation,
        other => panic!("rotation refused: {other:?}"),
    }
}

#[tokio::test]
async fn rotation_replaces_the_token_and_records_live_roles() {
    let store = store().await;
    let t0 = t0();
    let first = sign_in(&store, USER, t0).await;
    let second = rotate_ok(&store, &first.token, t0).await;
    assert_ne!(first.token.expose(), second.token.expose());
    assert_eq!(second.session_id, first.session_id);
    assert!(!second.replayed);
    // A role removed since sign-in is gone from the next rotation.
    let third = match rotate(&store, &second.token, &[], t0).await {
        RotateOutcome::Rotated(rotation) => rotation,
        other => panic!("{other:?}"),
    };
    assert!(third.owner.roles.is_empty());
    assert_eq!(third.expires_at, t0 + 30 * DAY);
}

#[tokio::test]
async fn the_session_ends_at_its_absolute_lifetime_whatever_the_rotations() {
    let store = store_with(SessionLimits {
        token_ttl: 30 * DAY,
        max_lifetime: Duration::from_secs(100),
        reuse_grace: Duration::from_secs(10),
    })
    .await;
    let start = t0();
    let first = sign_in(&store, USER, start).await;
    assert_eq!(first.expires_at, start + Duration::from_secs(100));
    let second = rotate_ok(&store, &first.token, start + Duration::from_secs(60)).await;
    // Rotation never extends the session past its end.
    assert_eq!(second.expires_at, start + Duration::from_secs(100));
    assert!(matches!(
        rotate(
            &store,
            &second.token,
            &["admin"],
            start + Duration::from_secs(100)
        )
        .await,
        RotateOutcome::LifetimeOver
    ));
    assert!(store.sessions(USER).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_retry_within_the_grace_window_gets_the_same_successor() {
    let store = store().await;
    let first = sign_in(&store, USER, t0()).await;
    let rotated = rotate_ok(&store, &first.token, t0()).await;
    let replay = rotate_ok(&store, &same(&first.token), t0() + Duration::from_secs(10)).await;
    assert!(replay.replayed);
    assert_eq!(replay.token.expose(), rotated.token.expose());
    assert_eq!(replay.rotated_at, rotated.rotated_at);
    assert_eq!(replay.expires_at, rotated.expires_at);
    assert_eq!(replay.owner, rotated.owner);
    // The family lives on: the successor rotates normally.
    rotate_ok(&store, &rotated.token, t0() + Duration::from_secs(11)).await;
}

#[tokio::test]
async fn reuse_after_the_grace_window_revokes_the_whole_family() {
    let store = store().await;
    let other_family = sign_in(&store, USER, t0()).await;
    let first = sign_in(&store, USER, t0()).await;
    let second = rotate_ok(&store, &same(&first.token), t0()).await;
    assert!(matches!(
        rotate(
            &store,
            &first.token,
            &["admin"],
            t0() + Duration::from_secs(11)
        )
        .await,
        RotateOutcome::Reused
    ));
    assert!(matches!(
        rotate(&store, &second.token, &["admin"], t0()).await,
        RotateOutcome::Invalid
    ));
    // Another sign-in of the same user is untouched.
    rotate_ok(&store, &other_family.token, t0()).await;
}

#[tokio::test]
async fn an_older_token_within_the_window_is_still_theft() {
    let store = store().await;
    let first = sign_in(&store, USER, t0()).await;
    let second = rotate_ok(&store, &same(&first.token), t0()).await;
    rotate_ok(&store, &second.token, t0()).await;
    // `first` is two rotations old: no replay, the family is revoked.
    assert!(matches!(
        rotate(&store, &first.token, &["admin"], t0()).await,
        RotateOutcome::Reused
    ));
}

#[tokio::test]
async fn eight_parallel_refreshes_of_one_token_yield_one_successor() {
    let store = Arc::new(store().await);
    let first = sign_in(&store, USER, t0()).await;
    let session = first.session_id.clone();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, barrier, token, session) = (
                store.clone(),
                barrier.clone(),
                same(&first.token),
                session.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                match store
                    .rotate(&token, &session, &["admin".to_owned()], t0())
                    .await
                    .unwrap()
                {
                    RotateOutcome::Rotated(rotation) => {
                        (rotation.token.expose().to_owned(), rotation.replayed)
                    }
                    other => panic!("{other:?}"),
                }
            })
        })
        .collect();
    let mut successors = std::collections::HashSet::new();
    let mut firsts = 0;
    for task in tasks {
        let (token, replayed) = task.await.unwrap();
        successors.insert(token);
        firsts += u32::from(!replayed);
    }
    assert_eq!(successors.len(), 1, "one successor");
    assert_eq!(firsts, 1, "one real rotation, seven replays");
    let successor = RefreshToken::parse(successors.iter().next().unwrap()).unwrap();
    rotate_ok(&store, &successor, t0()).await;
}

#[tokio::test]
async fn sessions_are_listed_newest_first_and_only_the_owners() {
    let store = store().await;
    // One reading of the clock: t0() moves on when a second ticks over mid-test.
    let t0 = t0();
    let other_user = "0190f5e2-0000-7000-8000-000000000002";
    let older = sign_in(&store, USER, t0 - Duration::from_secs(60)).await;
    let newer = sign_in(&store, USER, t0).await;
    let theirs = sign_in(&store, other_user, t0).await;
    let rotated = rotate_ok(&store, &newer.token, t0 + Duration::from_secs(5)).await;
    let sessions = store.sessions(USER).await.unwrap();
    let ids: Vec<&str> = sessions.iter().map(|s| s.session_id.as_str()).collect();
    assert_eq!(ids, [newer.session_id.as_str(), older.session_id.as_str()]);
    assert_eq!(sessions[0].last_refresh_at, t0 + Duration::from_secs(5));
    assert_eq!(sessions[0].expires_at, rotated.expires_at);
    assert_eq!(sessions[0].client, "203.0.113.x");
    for session in &sessions {
        assert_ne!(session.session_id, theirs.session_id);
        // The session id is not the token, nor its hash.
        assert!(!newer.token.expose().contains(&session.session_id));
    }
}

#[tokio::test]
async fn revoking_one_session_spares_the_others_and_never_someone_elses() {
    let store = store().await;
    let other_user = "0190f5e2-0000-7000-8000-000000000002";
    let keep = sign_in(&store, USER, t0()).await;
    let end = sign_in(&store, USER, t0()).await;
    let theirs = sign_in(&store, other_user, t0()).await;
    assert!(
        !store
            .revoke_session(USER, &theirs.session_id)
            .await
            .unwrap(),
        "another user's session id is not the caller's"
    );
    rotate_ok(&store, &theirs.token, t0()).await;
    assert!(store.revoke_session(USER, &end.session_id).await.unwrap());
    assert!(!store.revoke_session(USER, &end.session_id).await.unwrap());
    assert!(matches!(
        rotate(&store, &end.token, &["admin"], t0()).await,
        RotateOutcome::Invalid
    ));
    rotate_ok(&store, &keep.token, t0()).await;
    assert_eq!(store.sessions(USER).await.unwrap().len(), 1);
}

#[tokio::test]
async fn revoking_all_ends_every_session_of_the_user_only() {
    let store = store().await;
    let other_user = "0190f5e2-0000-7000-8000-000000000002";
    let mine: Vec<_> = [
        sign_in(&store, USER, t0()).await,
        sign_in(&store, USER, t0()).await,
        sign_in(&store, USER, t0()).await,
    ]
    .into_iter()
    .collect();
    let theirs = sign_in(&store, other_user, t0()).await;
    assert_eq!(store.revoke_all(USER).await.unwrap(), 3);
    for session in &mine {
        assert!(matches!(
            rotate(&store, &session.token, &["admin"], t0()).await,
            RotateOutcome::Invalid
        ));
    }
    assert!(store.sessions(USER).await.unwrap().is_empty());
    assert_eq!(store.revoke_all(USER).await.unwrap(), 0);
    rotate_ok(&store, &theirs.token, t0()).await;
}

#[tokio::test]
async fn revoke_by_token_signs_the_session_out_and_is_idempotent() {
    let store = store().await;
    let first = sign_in(&store, USER, t0()).await;
    let second = rotate_ok(&store, &same(&first.token), t0()).await;
    // Any token of the family revokes it, even a rotated one.
    assert!(store.revoke(&first.token).await.unwrap());
    assert!(!store.revoke(&first.token).await.unwrap());
    assert!(matches!(
        rotate(&store, &second.token, &["admin"], t0()).await,
        RotateOutcome::Invalid
    ));
    assert!(!store.revoke(&RefreshToken::generate()).await.unwrap());
}

#[tokio::test]
async fn unknown_tokens_are_invalid() {
    let store = store().await;
    assert!(
        store
            .peek(&RefreshToken::generate())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        rotate(&store, &RefreshToken::generate(), &["admin"], t0()).await,
        RotateOutcome::Invalid
    ));
}

#[tokio::test]
async fn tokens_expire_with_their_ttl() {
    let store = store_with(SessionLimits {
        token_ttl: Duration::from_millis(300),
        ..limits()
    })
    .await;
    let first = sign_in(&store, USER, t0()).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        rotate(&store, &first.token, &["admin"], t0()).await,
        RotateOutcome::Invalid
    ));
    assert!(store.sessions(USER).await.unwrap().is_empty());
}
