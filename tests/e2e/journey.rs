//! The whole user journey across both services: sign in → profile → activate → refresh → sign out.

use e2e_tests::Stack;
use e2e_tests::stack::bearer;
use refsys_proto::auth::v1::{
    IntrospectTokenRequest, InviteCodeOutcome, RefreshTokensRequest, RevokeTokenRequest,
};
use refsys_proto::referral::v1::{
    ActivateInviteCodeRequest, GetProfileRequest, GetUserRequest, ListBonusTransactionsRequest,
    ListInviteesRequest, UpdateProfileRequest,
};
use tonic::Code;

#[tokio::test]
async fn sign_in_profile_activate_refresh_sign_out() {
    let stack = Stack::start().await;
    let mut referral = stack.referral_client().await;
    let mut auth = stack.auth_client().await;

    // Two spellings of one number are one user.
    let alice = stack.sign_in("+7 (960) 123-30-17", None).await;
    assert!(alice.new_user);
    assert_eq!(alice.invite_code_outcome(), InviteCodeOutcome::NotProvided);
    let alice_again = stack.sign_in("+79601233017", None).await;
    assert!(!alice_again.new_user);
    assert_eq!(alice_again.user_id, alice.user_id);

    let alice_profile = referral
        .get_profile(bearer(GetProfileRequest {}, &alice.access_token))
        .await
        .expect("GetProfile")
        .into_inner()
        .profile
        .expect("profile");
    assert_eq!(alice_profile.phone_number, "+79601233017");
    assert_eq!(alice_profile.invite_code.len(), 6);
    assert_eq!(alice_profile.bonus_points, 0);

    // Bob signs in with Alice's code (lower case, spaces): applied at sign-in.
    let code_typed_by_bob = format!("  {} ", alice_profile.invite_code.to_lowercase());
    let bob = stack
        .sign_in("+447911123456", Some(&code_typed_by_bob))
        .await;
    assert!(bob.invite_code_applied);
    assert_eq!(bob.invite_code_outcome(), InviteCodeOutcome::Applied);

    // Carol joins, then activates Alice's code through the API.
    let carol = stack.sign_in("+14155550123", None).await;
    let carol_profile = referral
        .activate_invite_code(bearer(
            ActivateInviteCodeRequest {
                invite_code: alice_profile.invite_code.clone(),
            },
            &carol.access_token,
        ))
        .await
        .expect("ActivateInviteCode")
        .into_inner()
        .profile
        .expect("profile");
    assert_eq!(
        carol_profile.activated_invite_code,
        alice_profile.invite_code
    );
    assert_eq!(carol_profile.bonus_points, 100);
    let again = referral
        .activate_invite_code(bearer(
            ActivateInviteCodeRequest {
                invite_code: alice_profile.invite_code.clone(),
            },
            &carol.access_token,
        ))
        .await
        .expect_err("a second activation is refused");
    assert_eq!(again.code(), Code::FailedPrecondition);

    // Alice sees both invitees and 400 points.
    let alice_profile = referral
        .get_profile(bearer(GetProfileRequest {}, &alice.access_token))
        .await
        .expect("GetProfile")
        .into_inner()
        .profile
        .expect("profile");
    assert_eq!(alice_profile.bonus_points, 400);
    assert_eq!(alice_profile.invitees_count, 2);
    let invitee_ids: Vec<_> = alice_profile
        .invitees
        .iter()
        .map(|i| i.user_id.clone())
        .collect();
    assert_eq!(
        invitee_ids,
        vec![bob.user_id.clone(), carol.user_id.clone()]
    );
    let page = referral
        .list_invitees(bearer(
            ListInviteesRequest {
                page_size: 1,
                page_token: String::new(),
            },
            &alice.access_token,
        ))
        .await
        .expect("ListInvitees")
        .into_inner();
    assert_eq!(page.total_size, 2);
    assert_eq!(page.invitees.len(), 1);
    assert!(!page.next_page_token.is_empty());
    let ledger = referral
        .list_bonus_transactions(bearer(
            ListBonusTransactionsRequest {
                page_size: 10,
                page_token: String::new(),
            },
            &alice.access_token,
        ))
        .await
        .expect("ListBonusTransactions")
        .into_inner();
    assert_eq!(ledger.transactions.len(), 2);
    assert!(ledger.transactions.iter().all(|t| t.amount == 200));

    // Profile fields through a field mask; a public view of another user has no phone.
    let mut changes = alice_profile.clone();
    changes.first_name = "Alice".into();
    changes.email = "alice@example.com".into();
    let updated = referral
        .update_profile(bearer(
            UpdateProfileRequest {
                profile: Some(changes),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["first_name".into(), "email".into()],
                }),
            },
            &alice.access_token,
        ))
        .await
        .expect("UpdateProfile")
        .into_inner()
        .profile
        .expect("profile");
    assert_eq!(
        (updated.first_name.as_str(), updated.email.as_str()),
        ("Alice", "alice@example.com")
    );
    let public = referral
        .get_user(bearer(
            GetUserRequest {
                user_id: alice.user_id.clone(),
            },
            &bob.access_token,
        ))
        .await
        .expect("GetUser")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(public.first_name, "Alice");

    // Introspection, refresh rotation, reuse detection, sign-out.
    let introspection = auth
        .introspect_token(IntrospectTokenRequest {
            access_token: alice.access_token.clone(),
        })
        .await
        .expect("IntrospectToken")
        .into_inner();
    assert!(introspection.active);
    assert_eq!(introspection.subject, alice.user_id);

    let rotated = auth
        .refresh_tokens(RefreshTokensRequest {
            refresh_token: alice.refresh_token.clone(),
        })
        .await
        .expect("RefreshTokens")
        .into_inner();
    assert_ne!(rotated.refresh_token, alice.refresh_token);
    referral
        .get_profile(bearer(GetProfileRequest {}, &rotated.access_token))
        .await
        .expect("the new access token works");
    // A retry of that refresh (a lost response) gets the very same pair...
    let retried = auth
        .refresh_tokens(RefreshTokensRequest {
            refresh_token: alice.refresh_token.clone(),
        })
        .await
        .expect("a retry within the grace window")
        .into_inner();
    assert_eq!(retried.refresh_token, rotated.refresh_token);
    assert_eq!(retried.access_token, rotated.access_token);
    // ...but a token two rotations old is theft: the whole family is revoked.
    let newest = auth
        .refresh_tokens(RefreshTokensRequest {
            refresh_token: rotated.refresh_token.clone(),
        })
        .await
        .expect("RefreshTokens")
        .into_inner();
    let reuse = auth
        .refresh_tokens(RefreshTokensRequest {
            refresh_token: alice.refresh_token.clone(),
        })
        .await
        .expect_err("an old refresh token is refused");
    assert_eq!(reuse.code(), Code::Unauthenticated);
    let after_reuse = auth
        .refresh_tokens(RefreshTokensRequest {
            refresh_token: newest.refresh_token.clone(),
        })
        .await
        .expect_err("reuse revoked the whole family, the newest token too");
    assert_eq!(after_reuse.code(), Code::Unauthenticated);

    auth.revoke_token(RevokeTokenRequest {
        refresh_token: bob.refresh_token.clone(),
    })
    .await
    .expect("RevokeToken");
    let revoked = auth
        .refresh_tokens(RefreshTokensRequest {
            refresh_token: bob.refresh_token.clone(),
        })
        .await
        .expect_err("a signed-out family is refused");
    assert_eq!(revoked.code(), Code::Unauthenticated);

    // Nothing secret reached either service's logs.
    let logs = format!("{}{}", stack.auth.logs(), stack.referral.logs());
    for secret in [
        alice.access_token.as_str(),
        alice.refresh_token.as_str(),
        rotated.refresh_token.as_str(),
        bob.refresh_token.as_str(),
        "+79601233017",
        "+447911123456",
        "+14155550123",
    ] {
        assert!(!logs.contains(secret), "a secret leaked into the logs");
    }
    for (_, body) in stack.sms.messages().await {
        let code: String = body.chars().filter(char::is_ascii_digit).collect();
        assert!(
            !logs.contains(&format!("\"{code}\"")),
            "a code leaked into the logs"
        );
    }
}
