//! The handlers behind the token check: proto → domain at the edge, status codes with
//! field-level details, field masks. The caller is put in the request the way the service-kit
//! authentication layer does after verifying a token (token checks themselves are end-to-end).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost_types::FieldMask;
use referral_service::grpc::{AdminHandler, DirectoryHandler, ReferralHandler};
use referral_service::storage::{Repository, UserRecord};
use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::admin_service_server::AdminService;
use refsys_proto::referral::v1::referral_service_server::ReferralService;
use refsys_proto::referral::v1::user_directory_server::UserDirectory;
use service_kit::authn::Caller;
use service_kit::tokens::Claims;
use sqlx::PgPool;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::{BONUSES, pepper, users};

pub(crate) fn as_user<T>(user: &UserRecord, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Caller {
        claims: Claims {
            iss: "refsys-auth".into(),
            aud: "refsys".into(),
            sub: user.id.to_string(),
            exp: u64::MAX,
            iat: 0,
            jti: "test".into(),
            roles: Vec::new(),
            scope: None,
            sid: None,
        },
    });
    request
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// The field of the status's single BadRequest violation.
fn violated_field(status: &Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let bad_request = details.bad_request().expect("a BadRequest detail");
    assert_eq!(bad_request.field_violations.len(), 1);
    bad_request.field_violations[0].field.clone()
}

pub(crate) async fn profile(handler: &ReferralHandler, user: &UserRecord) -> pb::Profile {
    handler
        .get_profile(as_user(user, pb::GetProfileRequest {}))
        .await
        .expect("GetProfile")
        .into_inner()
        .profile
        .expect("a profile")
}

fn setup(pool: &PgPool) -> (Repository, ReferralHandler) {
    let repository = Repository::new(pool.clone(), BONUSES, pepper());
    (repository.clone(), ReferralHandler::new(repository))
}

#[sqlx::test]
async fn update_profile_changes_only_the_masked_fields(pool: PgPool) {
    let (repository, handler) = setup(&pool);
    let user = users(&repository, 1).await.remove(0);
    let update = |paths: &[&str]| pb::UpdateProfileRequest {
        profile: Some(pb::Profile {
            first_name: " Ada ".into(),
            last_name: "Lovelace".into(),
            email: "ada@example.com".into(),
            phone_number: "+10000000000".into(),
            bonus_points: 1_000_000,
            ..Default::default()
        }),
        update_mask: mask(paths),
    };

    let after = handler
        .update_profile(as_user(&user, update(&["first_name"])))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(after.first_name, "Ada", "trimmed");
    assert_eq!(after.last_name, "", "not in the mask");
    assert_eq!(after.email, "");
    assert_eq!(after.phone_number, user.phone_number);
    assert_eq!(after.bonus_points, 0);

    let after = handler
        .update_profile(as_user(&user, update(&["last_name", "email"])))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(
        (
            after.first_name.as_str(),
            after.last_name.as_str(),
            after.email.as_str()
        ),
        ("Ada", "Lovelace", "ada@example.com")
    );

    // An empty e-mail in the mask clears the address.
    let after = handler
        .update_profile(as_user(
            &user,
            pb::UpdateProfileRequest {
                profile: Some(pb::Profile::default()),
                update_mask: mask(&["email"]),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(
        (after.email.as_str(), after.last_name.as_str()),
        ("", "Lovelace")
    );
}

#[sqlx::test]
async fn bad_masks_and_values_are_invalid_arguments_that_change_nothing(pool: PgPool) {
    let (repository, handler) = setup(&pool);
    let user = users(&repository, 1).await.remove(0);
    let before = profile(&handler, &user).await;
    let cases: [(&[&str], pb::Profile, &str); 6] = [
        (&[], pb::Profile::default(), "update_mask"),
        (&["phone_number"], pb::Profile::default(), "update_mask"),
        (&["bonus_points"], pb::Profile::default(), "update_mask"),
        (
            &["first_name", "roles"],
            pb::Profile::default(),
            "update_mask",
        ),
        (
            &["first_name", "email"],
            pb::Profile {
                first_name: "Ada".into(),
                email: "not an address".into(),
                ..Default::default()
            },
            "profile.email",
        ),
        (
            &["last_name", "activated_invite_code"],
            pb::Profile {
                last_name: "Lovelace".into(),
                activated_invite_code: "O0O0O0".into(),
                ..Default::default()
            },
            "profile.activated_invite_code",
        ),
    ];
    for (paths, values, field) in cases {
        let status = handler
            .update_profile(as_user(
                &user,
                pb::UpdateProfileRequest {
                    profile: Some(values),
                    update_mask: mask(paths),
                },
            ))
            .await
            .expect_err("refused");
        assert_eq!(violated_field(&status), field, "{paths:?}");
    }
    // A missing mask is the same as an empty one.
    let status = handler
        .update_profile(as_user(&user, pb::UpdateProfileRequest::default()))
        .await
        .expect_err("refused");
    assert_eq!(violated_field(&status), "update_mask");
    assert_eq!(profile(&handler, &user).await, before);
}

#[sqlx::test]
async fn update_profile_with_an_invite_code_is_all_or_nothing(pool: PgPool) {
    let (repository, handler) = setup(&pool);
    let all = users(&repository, 2).await;
    let (inviter, invitee) = (&all[0], &all[1]);
    let with_code = |code: &str| pb::UpdateProfileRequest {
        profile: Some(pb::Profile {
            first_name: "Grace".into(),
            activated_invite_code: code.to_lowercase(),
            ..Default::default()
        }),
        update_mask: mask(&["first_name", "activated_invite_code"]),
    };

    // Refused activation: the name is not changed either.
    let status = handler
        .update_profile(as_user(invitee, with_code(&invitee.invite_code)))
        .await
        .expect_err("own code");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(profile(&handler, invitee).await.first_name, "");

    let after = handler
        .update_profile(as_user(invitee, with_code(&inviter.invite_code)))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(after.first_name, "Grace");
    assert_eq!(after.activated_invite_code, inviter.invite_code);
    assert_eq!(after.invited_by_user_id, inviter.id.to_string());
    assert!(after.invite_activated_at.is_some());
    assert_eq!(after.bonus_points, 100);

    let status = handler
        .update_profile(as_user(invitee, with_code(&inviter.invite_code)))
        .await
        .expect_err("second activation");
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[sqlx::test]
async fn activate_invite_code_answers_each_rule_with_its_code(pool: PgPool) {
    let (repository, handler) = setup(&pool);
    let all = users(&repository, 3).await;
    let activate = |user: &UserRecord, code: &str| {
        handler.activate_invite_code(as_user(
            user,
            pb::ActivateInviteCodeRequest {
                invite_code: code.to_owned(),
            },
        ))
    };

    let status = activate(&all[1], "12345").await.expect_err("malformed");
    assert_eq!(violated_field(&status), "invite_code");
    let status = activate(&all[1], "ZZZZZZ").await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    let status = activate(&all[1], &all[1].invite_code)
        .await
        .expect_err("own");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = activate(&all[1], &all[2].invite_code)
        .await
        .expect_err("later joiner");
    assert_eq!(status.code(), Code::FailedPrecondition);

    let code = format!("  {}  ", all[0].invite_code.to_lowercase());
    let after = activate(&all[1], &code)
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(after.activated_invite_code, all[0].invite_code);
    assert_eq!(after.bonus_points, 100);

    let status = activate(&all[1], &all[0].invite_code)
        .await
        .expect_err("again");
    assert_eq!(status.code(), Code::FailedPrecondition);

    let inviter = profile(&handler, &all[0]).await;
    assert_eq!((inviter.bonus_points, inviter.invitees_count), (200, 1));
    assert_eq!(inviter.invitees.len(), 1);
    assert_eq!(inviter.invitees[0].user_id, all[1].id.to_string());
    assert_eq!(inviter.invitees[0].phone_number, "+7960***0001", "masked");
}

#[sqlx::test]
async fn invitee_numbers_are_masked_and_the_own_number_is_not(pool: PgPool) {
    let (repository, handler) = setup(&pool);
    let phone = |n: &str| referral_service::domain::PhoneNumber::parse(n, None).unwrap();
    let (inviter, _) = repository
        .ensure_user(&phone("+447911123456"))
        .await
        .unwrap();
    let (invitee, _) = repository
        .ensure_user(&phone("+79601233017"))
        .await
        .unwrap();
    handler
        .activate_invite_code(as_user(
            &invitee,
            pb::ActivateInviteCodeRequest {
                invite_code: inviter.invite_code.clone(),
            },
        ))
        .await
        .unwrap();

    let own = profile(&handler, &inviter).await;
    assert_eq!(
        own.phone_number, "+447911123456",
        "the user's own number in full"
    );
    assert_eq!(own.invitees.len(), 1);
    assert_eq!(own.invitees[0].phone_number, "+7960***3017");
    let listed = handler
        .list_invitees(as_user(&inviter, pb::ListInviteesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.invitees.len(), 1);
    assert_eq!(listed.invitees[0].phone_number, "+7960***3017");
    assert_eq!(listed.invitees[0].user_id, invitee.id.to_string());
    assert_eq!(
        profile(&handler, &invitee).await.phone_number,
        "+79601233017"
    );

    // An admin's view of the inviter shows invitees as the inviter sees them.
    let admin = AdminHandler::new(repository.clone());
    let full = admin
        .get_user(Request::new(pb::AdminServiceGetUserRequest {
            user_id: inviter.id.to_string(),
        }))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(full.phone_number, "+447911123456");
    assert_eq!(full.invitees[0].phone_number, "+7960***3017");
}

#[sqlx::test]
async fn list_invitees_pages_with_opaque_tokens(pool: PgPool) {
    let (repository, handler) = setup(&pool);
    let all = users(&repository, 6).await;
    for invitee in &all[1..] {
        handler
            .activate_invite_code(as_user(
                invitee,
                pb::ActivateInviteCodeRequest {
                    invite_code: all[0].invite_code.clone(),
                },
            ))
            .await
            .unwrap();
    }
    let list = |page_size: i32, page_token: String| {
        handler.list_invitees(as_user(
            &all[0],
            pb::ListInviteesRequest {
                page_size,
                page_token,
            },
        ))
    };

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(2, token).await.unwrap().into_inner();
        assert_eq!(page.total_size, 5);
        pages += 1;
        seen.extend(page.invitees.into_iter().map(|i| i.user_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let expected: Vec<_> = all[1..].iter().map(|u| u.id.to_string()).collect();
    assert_eq!(seen, expected);

    let everything = list(0, String::new()).await.unwrap().into_inner();
    assert_eq!(everything.invitees.len(), 5, "0 means the default size");
    assert!(everything.next_page_token.is_empty());

    assert_eq!(
        violated_field(&list(-1, String::new()).await.unwrap_err()),
        "page_size"
    );
    assert_eq!(
        violated_field(&list(2, "not-a-token".into()).await.unwrap_err()),
        "page_token"
    );

    let ledger = handler
        .list_bonus_transactions(as_user(
            &all[0],
            pb::ListBonusTransactionsRequest {
                page_size: 10,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ledger.transactions.len(), 5);
    assert!(
        ledger
            .transactions
            .iter()
            .all(|t| t.amount == 200 && t.reason == i32::from(pb::BonusReason::InviteeJoined))
    );
}

/// Well-formed tokens holding positions the server never hands out. The first one's time is
/// one chrono accepts and Postgres does not, so it used to reach the query and come back INTERNAL.
#[sqlx::test]
async fn crafted_out_of_range_page_tokens_are_invalid_arguments(pool: PgPool) {
    let (repository, handler) = setup(&pool);
    let all = users(&repository, 3).await;
    handler
        .activate_invite_code(as_user(
            &all[1],
            pb::ActivateInviteCodeRequest {
                invite_code: all[0].invite_code.clone(),
            },
        ))
        .await
        .unwrap();
    // Called directly: the admin role is the authentication layer's check (auth.rs).
    let admin = AdminHandler::new(repository.clone());
    let id = all[1].id;
    let crafted = [
        URL_SAFE_NO_PAD.encode(format!("t:-3217862419200000000:{id}")),
        URL_SAFE_NO_PAD.encode(format!("t:-9223372036854775807:{id}")),
        URL_SAFE_NO_PAD.encode(format!("t:253402300800000000:{id}")),
        URL_SAFE_NO_PAD.encode("e:0"),
        URL_SAFE_NO_PAD.encode("e:-9223372036854775808"),
        format!(
            "{}{}",
            URL_SAFE_NO_PAD.encode(format!("u:{id}")),
            " ".repeat(60 * 1024)
        ),
    ];
    for token in crafted {
        let shown = &token[..token.len().min(60)];
        let invitees = handler
            .list_invitees(as_user(
                &all[0],
                pb::ListInviteesRequest {
                    page_size: 10,
                    page_token: token.clone(),
                },
            ))
            .await;
        assert_eq!(
            violated_field(&invitees.expect_err(shown)),
            "page_token",
            "ListInvitees {shown}"
        );
        let ledger = handler
            .list_bonus_transactions(as_user(
                &all[0],
                pb::ListBonusTransactionsRequest {
                    page_size: 10,
                    page_token: token.clone(),
                },
            ))
            .await;
        assert_eq!(
            violated_field(&ledger.expect_err(shown)),
            "page_token",
            "ListBonusTransactions {shown}"
        );
        let users = admin
            .list_users(as_user(
                &all[0],
                pb::ListUsersRequest {
                    page_size: 10,
                    page_token: token.clone(),
                    filter: String::new(),
                },
            ))
            .await;
        assert_eq!(
            violated_field(&users.expect_err(shown)),
            "page_token",
            "ListUsers {shown}"
        );
    }
}

#[sqlx::test]
async fn list_users_filter_is_a_phone_prefix_not_a_pattern(pool: PgPool) {
    let (repository, _) = setup(&pool);
    let all = users(&repository, 2).await;
    let admin = AdminHandler::new(repository);
    let list = |filter: &str| {
        admin.list_users(as_user(
            &all[0],
            pb::ListUsersRequest {
                page_size: 10,
                page_token: String::new(),
                filter: filter.into(),
            },
        ))
    };
    for bad in ["%", "_", "+%", "+7960%", "7960", "+"] {
        let status = list(bad).await.expect_err(bad);
        assert_eq!(violated_field(&status), "filter", "{bad:?}");
    }
    for (filter, count) in [("", 2), ("+7960", 2), ("+1", 0)] {
        let users = list(filter).await.unwrap().into_inner().users;
        assert_eq!(users.len(), count, "{filter:?}");
    }
}

#[sqlx::test]
async fn get_user_is_a_public_view(pool: PgPool) {
    let (repository, handler) = setup(&pool);
    let all = users(&repository, 2).await;
    let get = |user_id: String| handler.get_user(as_user(&all[0], pb::GetUserRequest { user_id }));
    let other = get(all[1].id.to_string())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(other.user_id, all[1].id.to_string());
    assert_eq!(other.invite_code, all[1].invite_code);
    assert_eq!(
        get(uuid::Uuid::now_v7().to_string())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        violated_field(&get("42".into()).await.unwrap_err()),
        "user_id"
    );
}

#[sqlx::test]
async fn ensure_user_reports_what_happened_to_the_invite_code(pool: PgPool) {
    let repository = Repository::new(pool.clone(), BONUSES, pepper());
    let directory = DirectoryHandler::new(repository);
    let ensure = |phone: &str, code: Option<&str>| {
        directory.ensure_user(Request::new(pb::EnsureUserRequest {
            phone_number: phone.to_owned(),
            invite_code: code.map(str::to_owned),
        }))
    };

    let first = ensure("+79600000001", None).await.unwrap().into_inner();
    assert!(first.created);
    assert_eq!(
        first.invite_code_outcome(),
        pb::InviteCodeOutcome::NotProvided
    );
    let again = ensure("+79600000001", None).await.unwrap().into_inner();
    assert_eq!(
        (again.user_id.as_str(), again.created),
        (first.user_id.as_str(), false)
    );

    let first_code = sqlx::query_scalar::<_, String>("SELECT invite_code FROM users")
        .fetch_one(&pool)
        .await
        .unwrap();
    let cases = [
        ("+79600000002", Some("bad!"), pb::InviteCodeOutcome::Invalid),
        (
            "+79600000003",
            Some("ZZZZZZ"),
            pb::InviteCodeOutcome::NotFound,
        ),
        (
            "+79600000001",
            Some(first_code.as_str()),
            pb::InviteCodeOutcome::OwnCode,
        ),
        (
            "+79600000004",
            Some(first_code.as_str()),
            pb::InviteCodeOutcome::Applied,
        ),
        (
            "+79600000004",
            Some(first_code.as_str()),
            pb::InviteCodeOutcome::AlreadyActivated,
        ),
    ];
    for (phone, code, outcome) in cases {
        let response = ensure(phone, code)
            .await
            .expect("a refused code does not fail")
            .into_inner();
        assert_eq!(response.invite_code_outcome(), outcome, "{phone} {code:?}");
    }

    let later_code = sqlx::query_scalar::<_, String>(
        "SELECT invite_code FROM users WHERE phone_number = '+79600000004'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let response = ensure("+79600000002", Some(&later_code))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.invite_code_outcome(),
        pb::InviteCodeOutcome::InviterJoinedLater
    );

    let status = ensure("89600000001", None).await.unwrap_err();
    assert_eq!(violated_field(&status), "phone_number");
}
