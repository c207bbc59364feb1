//! Sessions and account lifecycle on the real pair: lifetimes, live roles, the reuse grace
//! window, listing and revoking, and deleting an account (checked in a `pg_dump`).

use std::time::Duration;

use e2e_tests::process::run_to_exit;
use e2e_tests::stack::bearer;
use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::{
    DeleteAccountRequest, IntrospectTokenRequest, ListSessionsRequest, RefreshTokensRequest,
    RefreshTokensResponse, RevokeAllSessionsRequest, RevokeSessionRequest,
};
use refsys_proto::referral::v1::{
    GetProfileRequest, ListBonusTransactionsRequest, ListInviteesRequest,
};
use tonic::Code;

async fn stack_with(auth_env: &[(&'static str, &str)]) -> Stack {
    Stack::start_with(StackOptions::auth(auth_env)).await
}

async fn refresh(stack: &Stack, token: &str) -> Result<RefreshTokensResponse, tonic::Status> {
    stack
        .auth_client()
        .await
        .refresh_tokens(RefreshTokensRequest {
            refresh_token: token.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn roles_of(stack: &Stack, access_token: &str) -> Vec<String> {
    let answer = stack
        .auth_client()
        .await
        .introspect_token(IntrospectTokenRequest {
            access_token: access_token.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.active);
    answer.roles
}

async fn admin(stack: &Stack, verb: &str, phone: &str) {
    let (status, output) = run_to_exit(
        "referral-service",
        &[("DATABASE_URL", stack.database.url.as_str())],
        &["admin", verb, phone],
    )
    .await;
    assert!(status.success(), "admin {verb}: {output}");
}

#[tokio::test]
async fn a_session_ends_at_its_absolute_lifetime() {
    let stack = stack_with(&[("REFRESH_TOKEN_MAX_LIFETIME_SECONDS", "3")]).await;
    let signed_in = stack.sign_in("+79601232001", None).await;
    let ends = signed_in.refresh_token_expire_time.unwrap().seconds;
    let rotated = refresh(&stack, &signed_in.refresh_token).await.unwrap();
    assert!(
        rotated.refresh_token_expire_time.unwrap().seconds <= ends,
        "rotation never extends the session"
    );
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let status = refresh(&stack, &rotated.refresh_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn a_removed_role_is_gone_at_the_next_refresh() {
    let stack = Stack::start().await;
    let phone = "+79601232002";
    stack.sign_in(phone, None).await;
    admin(&stack, "grant", phone).await;
    let signed_in = stack.sign_in(phone, None).await;
    assert_eq!(roles_of(&stack, &signed_in.access_token).await, ["admin"]);

    admin(&stack, "revoke", phone).await;
    let rotated = refresh(&stack, &signed_in.refresh_token).await.unwrap();
    assert!(roles_of(&stack, &rotated.access_token).await.is_empty());
}

#[tokio::test]
async fn parallel_retries_within_the_grace_window_get_one_pair_and_later_reuse_is_theft() {
    let stack = stack_with(&[("REFRESH_REUSE_GRACE_SECONDS", "2")]).await;
    let signed_in = stack.sign_in("+79601232003", None).await;
    let attempts = (0..8).map(|_| refresh(&stack, &signed_in.refresh_token));
    let answers: Vec<RefreshTokensResponse> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|answer| answer.expect("every retry succeeds"))
        .collect();
    for answer in &answers {
        assert_eq!(answer.refresh_token, answers[0].refresh_token);
        assert_eq!(answer.access_token, answers[0].access_token);
    }
    // The session lives on through its one successor...
    let next = refresh(&stack, &answers[0].refresh_token).await.unwrap();
    // ...and after the window the old token is theft: the whole session is revoked.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        refresh(&stack, &signed_in.refresh_token)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        refresh(&stack, &next.refresh_token)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn sessions_are_listed_and_revoked_one_or_all_never_someone_elses() {
    let stack = Stack::start().await;
    let phone = "+79601232004";
    let laptop = stack.sign_in(phone, None).await;
    let phone_app = stack.sign_in(phone, None).await;
    let tablet = stack.sign_in(phone, None).await;
    let mallory = stack.sign_in("+79601232005", None).await;
    let mut auth = stack.auth_client().await;

    let lister = auth.clone();
    let list = |token: String| {
        let mut auth = lister.clone();
        async move {
            auth.list_sessions(bearer(ListSessionsRequest {}, &token))
                .await
                .unwrap()
                .into_inner()
                .sessions
        }
    };
    let sessions = list(phone_app.access_token.clone()).await;
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions.iter().filter(|s| s.current).count(), 1);
    for session in &sessions {
        assert_eq!(session.client_address, "127.0.0.x");
        assert!(session.create_time.is_some() && session.expire_time.is_some());
        for token in [&laptop, &phone_app, &tablet] {
            assert!(!token.refresh_token.contains(&session.session_id));
        }
    }
    let current = sessions.iter().find(|s| s.current).unwrap();
    let laptops = list(laptop.access_token.clone()).await;
    let laptop_session = laptops.iter().find(|s| s.current).unwrap();
    assert_ne!(current.session_id, laptop_session.session_id);

    // Mallory cannot end someone else's session, nor tell it from a missing one.
    let status = auth
        .revoke_session(bearer(
            RevokeSessionRequest {
                session_id: laptop_session.session_id.clone(),
            },
            &mallory.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    refresh(&stack, &laptop.refresh_token)
        .await
        .expect("still alive");
    let status = auth
        .revoke_session(bearer(
            RevokeSessionRequest {
                session_id: "not-a-session".into(),
            },
            &phone_app.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Nor end all of someone's sessions without the admin role.
    let status = auth
        .revoke_all_sessions(bearer(
            RevokeAllSessionsRequest {
                user_id: laptop.user_id.clone(),
            },
            &mallory.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // No token, no sessions.
    let status = auth
        .list_sessions(ListSessionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // The owner ends the tablet's session: only that one dies.
    let tablets = list(tablet.access_token.clone()).await;
    let tablet_session = tablets.iter().find(|s| s.current).unwrap();
    auth.revoke_session(bearer(
        RevokeSessionRequest {
            session_id: tablet_session.session_id.clone(),
        },
        &phone_app.access_token,
    ))
    .await
    .unwrap();
    assert_eq!(
        refresh(&stack, &tablet.refresh_token)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(list(phone_app.access_token.clone()).await.len(), 2);

    // Then all of them; Mallory's own session is untouched.
    let revoked = auth
        .revoke_all_sessions(bearer(
            RevokeAllSessionsRequest::default(),
            &phone_app.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_count, 2);
    for token in [&laptop, &phone_app] {
        assert_eq!(
            refresh(&stack, &token.refresh_token)
                .await
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
    }
    refresh(&stack, &mallory.refresh_token)
        .await
        .expect("another user's session survives");
}

#[tokio::test]
async fn an_admin_ends_every_session_of_another_user() {
    let stack = Stack::start().await;
    let admin_phone = "+79601232006";
    stack.sign_in(admin_phone, None).await;
    admin(&stack, "grant", admin_phone).await;
    let boss = stack.sign_in(admin_phone, None).await;
    let user = stack.sign_in("+79601232007", None).await;
    let revoked = stack
        .auth_client()
        .await
        .revoke_all_sessions(bearer(
            RevokeAllSessionsRequest {
                user_id: user.user_id.clone(),
            },
            &boss.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_count, 1);
    assert_eq!(
        refresh(&stack, &user.refresh_token)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

async fn pg_dump(stack: &Stack) -> String {
    let output = tokio::process::Command::new("pg_dump")
        .args(["-h", "127.0.0.1", "-U", "postgres", "--no-owner"])
        .arg(&stack.database.name)
        .output()
        .await
        .expect("pg_dump runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).expect("a text dump")
}

#[tokio::test]
async fn deleting_an_account_erases_the_person_keeps_the_ledger_and_ends_every_session() {
    let stack = Stack::start().await;
    let inviter = stack.sign_in("+79601232008", None).await;
    let mut referral = stack.referral_client().await;
    let code = referral
        .get_profile(bearer(GetProfileRequest {}, &inviter.access_token))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap()
        .invite_code;
    let phone = "+79601232009";
    let invitee = stack.sign_in(phone, Some(&code)).await;
    let second_device = stack.sign_in(phone, None).await;
    let profile_update = refsys_proto::referral::v1::UpdateProfileRequest {
        profile: Some(refsys_proto::referral::v1::Profile {
            first_name: "Zebedee".into(),
            last_name: "Quixotic".into(),
            email: "zebedee.quixotic@example.org".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["first_name".into(), "last_name".into(), "email".into()],
        }),
    };
    referral
        .update_profile(bearer(profile_update, &invitee.access_token))
        .await
        .unwrap();
    let before = pg_dump(&stack).await;
    assert!(before.contains("79601232009") && before.contains("Zebedee"));

    stack
        .auth_client()
        .await
        .delete_account(bearer(DeleteAccountRequest {}, &invitee.access_token))
        .await
        .unwrap();

    // Erased from every table.
    let dump = pg_dump(&stack).await;
    for personal in [
        "79601232009",
        "Zebedee",
        "Quixotic",
        "zebedee.quixotic@example.org",
    ] {
        assert!(!dump.contains(personal), "{personal} survived the deletion");
    }
    // Every session is dead; access tokens in flight get NOT_FOUND.
    for token in [&invitee, &second_device] {
        assert_eq!(
            refresh(&stack, &token.refresh_token)
                .await
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
    }
    let status = referral
        .get_profile(bearer(GetProfileRequest {}, &invitee.access_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // The inviter keeps the points and the invitee, shown without a number.
    let profile = referral
        .get_profile(bearer(GetProfileRequest {}, &inviter.access_token))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!((profile.bonus_points, profile.invitees_count), (200, 1));
    let invitees = referral
        .list_invitees(bearer(
            ListInviteesRequest::default(),
            &inviter.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .invitees;
    assert_eq!(invitees.len(), 1);
    assert_eq!(invitees[0].user_id, invitee.user_id);
    assert_eq!(invitees[0].phone_number, "");
    let ledger = referral
        .list_bonus_transactions(bearer(
            ListBonusTransactionsRequest::default(),
            &inviter.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .transactions;
    assert_eq!(ledger.len(), 1);

    // The number signs up again as a new user, and cannot farm the bonus a second time.
    let again = stack.sign_in(phone, Some(&code)).await;
    assert!(again.new_user);
    assert_ne!(again.user_id, invitee.user_id);
    let mine = referral
        .get_profile(bearer(GetProfileRequest {}, &again.access_token))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(mine.bonus_points, 0);
    let theirs = referral
        .get_profile(bearer(GetProfileRequest {}, &inviter.access_token))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(theirs.bonus_points, 200, "no second inviter bonus either");
}

#[tokio::test]
async fn referral_down_during_refresh_and_deletion_leaves_nothing_half_done() {
    let mut stack = Stack::start().await;
    let user = stack.sign_in("+79601232010", None).await;
    stack.referral.kill().await;

    // Refresh: UNAVAILABLE, and the session is exactly as it was.
    let status = refresh(&stack, &user.refresh_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Deletion: UNAVAILABLE, and nothing ended.
    let mut auth = stack.auth_client().await;
    let status = auth
        .delete_account(bearer(DeleteAccountRequest {}, &user.access_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let sessions = auth
        .list_sessions(bearer(ListSessionsRequest {}, &user.access_token))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 1);

    stack.referral.restart().await;
    let rotated = retry_unavailable(|| refresh(&stack, &user.refresh_token)).await;
    // The retry finishes the deletion with the same access token.
    retry_unavailable(|| {
        let mut auth = auth.clone();
        let request = bearer(DeleteAccountRequest {}, &user.access_token);
        async move { auth.delete_account(request).await }
    })
    .await;
    assert_eq!(
        refresh(&stack, &rotated.refresh_token)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

/// Calls `op` until it answers something other than UNAVAILABLE (the restarted service is
/// reconnected to), for at most 5 s.
async fn retry_unavailable<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    for _ in 0..20 {
        match op().await {
            Ok(value) => return value,
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(status) => panic!("the retry failed: {status:?}"),
        }
    }
    panic!("still UNAVAILABLE after 5 s")
}
