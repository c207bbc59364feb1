use std::time::Duration;

use auth_service::store::refresh::{FamilyOwner, RefreshStore, RefreshToken, RotateOutcome};

use crate::{prefix, redis};

const TTL: Duration = Duration::from_secs(30 * 24 * 3600);

async fn store() -> RefreshStore {
    RefreshStore::new(redis().await, prefix(), TTL, Duration::from_secs(2))
}

fn owner() -> FamilyOwner {
    FamilyOwner {
        user_id: "0190f5e2-0000-7000-8000-000000000001".to_owned(),
        roles: vec!["admin".to_owned()],
    }
}

fn same(token: &RefreshToken) -> RefreshToken {
    RefreshToken::parse(token.expose()).unwrap()
}

async fn rotate_ok(store: &RefreshStore, token: &RefreshToken) -> RefreshToken {
    match store.rotate(token).await.unwrap() {
        RotateOutcome::Rotated { owner: o, token } => {
            assert_eq!(o, owner());
            assert_eq!(token.ttl, TTL);
            token.token
        }
        other => panic!("rotation refused: {other:?}"),
    }
}

#[tokio::test]
async fn rotation_replaces_the_token() {
    let store = store().await;
    let first = store.create_family(&owner()).await.unwrap().token;
    let second = rotate_ok(&store, &first).await;
    assert_ne!(first.expose(), second.expose());
    let third = rotate_ok(&store, &second).await;
    rotate_ok(&store, &third).await;
}

#[tokio::test]
async fn reusing_a_rotated_token_revokes_the_whole_family() {
    let store = store().await;
    let other_family = store.create_family(&owner()).await.unwrap().token;
    let first = store.create_family(&owner()).await.unwrap().token;
    let second = rotate_ok(&store, &same(&first)).await;
    let newest = rotate_ok(&store, &second).await;
    assert!(matches!(
        store.rotate(&first).await.unwrap(),
        RotateOutcome::Reused
    ));
    // The newest token of the family is dead too, and so is the reused one.
    assert!(matches!(
        store.rotate(&newest).await.unwrap(),
        RotateOutcome::Invalid
    ));
    assert!(matches!(
        store.rotate(&second).await.unwrap(),
        RotateOutcome::Invalid
    ));
    assert!(matches!(
        store.rotate(&first).await.unwrap(),
        RotateOutcome::Invalid
    ));
    // Another sign-in of the same user is not affected.
    rotate_ok(&store, &other_family).await;
}

#[tokio::test]
async fn unknown_tokens_are_invalid() {
    let store = store().await;
    let stranger = RefreshToken::generate();
    assert!(matches!(
        store.rotate(&stranger).await.unwrap(),
        RotateOutcome::Invalid
    ));
    assert!(!store.revoke(&stranger).await.unwrap());
}

#[tokio::test]
async fn revoke_signs_the_family_out_and_is_idempotent() {
    let store = store().await;
    let first = store.create_family(&owner()).await.unwrap().token;
    let second = rotate_ok(&store, &first).await;
    // Revoking through an already-rotated token works too.
    assert!(store.revoke(&first).await.unwrap());
    assert!(matches!(
        store.rotate(&second).await.unwrap(),
        RotateOutcome::Invalid
    ));
    assert!(!store.revoke(&second).await.unwrap());
    assert!(!store.revoke(&first).await.unwrap());
}

#[tokio::test]
async fn tokens_expire_with_their_ttl() {
    let store = RefreshStore::new(
        redis().await,
        prefix(),
        Duration::from_millis(200),
        Duration::from_secs(2),
    );
    let token = store.create_family(&owner()).await.unwrap().token;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        store.rotate(&token).await.unwrap(),
        RotateOutcome::Invalid
    ));
}

#[tokio::test]
async fn parallel_rotations_of_one_token_rotate_once_and_revoke_the_family() {
    let store = std::sync::Arc::new(store().await);
    let token = store.create_family(&owner()).await.unwrap().token;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            let token = same(&token);
            tokio::spawn(async move { store.rotate(&token).await.unwrap() })
        })
        .collect();
    let mut rotated = Vec::new();
    for task in tasks {
        if let RotateOutcome::Rotated { token, .. } = task.await.unwrap() {
            rotated.push(token.token);
        }
    }
    assert_eq!(rotated.len(), 1);
    // The losers presented an already-rotated token: the family is gone, the winner's too.
    assert!(matches!(
        store.rotate(&rotated[0]).await.unwrap(),
        RotateOutcome::Invalid
    ));
}
