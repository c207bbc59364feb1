//! UserDirectory.DeleteUser: the person is erased, the accounting stays, a re-joined number is
//! never rewarded twice, and deletion is safe against itself and against activations.

use std::sync::Arc;
use std::time::Duration;

use referral_service::domain::{InviteCode, PhoneNumber};
use referral_service::error::ReferralError;
use referral_service::grpc::{AdminHandler, DirectoryHandler, ReferralHandler};
use referral_service::storage::{Award, Repository};
use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::admin_service_server::AdminService;
use refsys_proto::referral::v1::referral_service_server::ReferralService;
use refsys_proto::referral::v1::user_directory_server::UserDirectory;
use service_kit::authn::Caller;
use service_kit::tokens::Claims;
use sqlx::PgPool;
use tonic::{Code, Request, Status};
use uuid::Uuid;

use crate::{BONUSES, code, id, pepper, repository, users};

struct Handlers {
    repository: Arc<Repository>,
    referral: ReferralHandler,
    directory: Arc<DirectoryHandler>,
    admin: AdminHandler,
}

fn handlers(pool: &PgPool) -> Handlers {
    let repository = repository(pool);
    Handlers {
        referral: ReferralHandler::new((*repository).clone()),
        directory: Arc::new(DirectoryHandler::new((*repository).clone())),
        admin: AdminHandler::new((*repository).clone()),
        repository,
    }
}

/// A request as the authentication layer hands it on for a valid token of `user`.
fn as_user<T>(user: Uuid, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Caller {
        claims: Claims {
            iss: "refsys-auth".into(),
            aud: "refsys".into(),
            sub: user.to_string(),
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

fn e164(number: &str) -> PhoneNumber {
    PhoneNumber::parse(number, None).expect("a valid test number")
}

async fn delete(directory: &DirectoryHandler, user: Uuid) -> Result<bool, Code> {
    directory
        .delete_user(Request::new(pb::DeleteUserRequest {
            user_id: user.to_string(),
        }))
        .await
        .map(|response| response.into_inner().deleted)
        .map_err(|status| status.code())
}

async fn ensure(h: &Handlers, phone: &str, invite_code: Option<&str>) -> pb::EnsureUserResponse {
    h.directory
        .ensure_user(Request::new(pb::EnsureUserRequest {
            phone_number: phone.to_owned(),
            invite_code: invite_code.map(str::to_owned),
        }))
        .await
        .expect("EnsureUser")
        .into_inner()
}

async fn profile(h: &Handlers, user: Uuid) -> Result<pb::Profile, Status> {
    h.referral
        .get_profile(as_user(user, pb::GetProfileRequest {}))
        .await
        .map(|response| response.into_inner().profile.expect("a profile"))
}

async fn invitees(h: &Handlers, user: Uuid) -> pb::ListInviteesResponse {
    h.referral
        .list_invitees(as_user(user, pb::ListInviteesRequest::default()))
        .await
        .expect("ListInvitees")
        .into_inner()
}

fn uuid(id: &str) -> Uuid {
    Uuid::parse_str(id).unwrap()
}

/// `pg_dump` of the test's own database with `args`.
async fn dump(pool: &PgPool, args: &[&str]) -> String {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let output = tokio::process::Command::new("pg_dump")
        .args(["-h", "127.0.0.1", "-U", "postgres", "--no-password"])
        .args(args)
        .arg(&database)
        .output()
        .await
        .expect("pg_dump runs");
    assert!(
        output.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("a UTF-8 dump")
}

async fn ledger_rows(pool: &PgPool) -> Vec<(i64, Uuid, i64, String, Uuid, Uuid)> {
    sqlx::query_as(
        "SELECT id, user_id, amount, reason, counterpart_user_id, activation_id
         FROM bonus_ledger ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn counter_rows(pool: &PgPool) -> Vec<(Uuid, i16, i64, i64)> {
    sqlx::query_as(
        "SELECT user_id, shard, invitees, points FROM user_counters ORDER BY user_id, shard",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Every user's counters agree with their ledger: points with the sum of their entries,
/// invitees with their `invitee_joined` entries.
async fn assert_counters_match_the_ledger(pool: &PgPool) {
    let disagreeing = count(
        pool,
        "SELECT count(*) FROM users u
         WHERE (SELECT COALESCE(sum(points), 0) FROM user_counters WHERE user_id = u.id)
               <> (SELECT COALESCE(sum(amount), 0) FROM bonus_ledger WHERE user_id = u.id)
            OR (SELECT COALESCE(sum(invitees), 0) FROM user_counters WHERE user_id = u.id)
               <> (SELECT count(*) FROM bonus_ledger
                   WHERE user_id = u.id AND reason = 'invitee_joined')",
    )
    .await;
    assert_eq!(
        disagreeing, 0,
        "users whose counters disagree with the ledger"
    );
}

#[sqlx::test]
async fn deletion_erases_the_number_names_and_email_from_the_whole_database(pool: PgPool) {
    let h = handlers(&pool);
    let inviter = ensure(&h, "+447911123456", None).await;
    let erased = ensure(
        &h,
        "+79601233017",
        Some(&inviter_code(&pool, &inviter).await),
    )
    .await;
    assert_eq!(erased.invite_code_outcome(), pb::InviteCodeOutcome::Applied);
    let erased_id = uuid(&erased.user_id);
    h.referral
        .update_profile(as_user(
            erased_id,
            pb::UpdateProfileRequest {
                profile: Some(pb::Profile {
                    first_name: "Zebediah".into(),
                    last_name: "Quackenbush".into(),
                    email: "zeb.quack@example.org".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["first_name".into(), "last_name".into(), "email".into()],
                }),
            },
        ))
        .await
        .unwrap();
    // The deleted user invited someone too, so their number was in other users' views.
    let own_code = profile(&h, erased_id).await.unwrap().invite_code;
    let invited = ensure(&h, "+79601233018", Some(&own_code)).await;
    assert_eq!(
        invited.invite_code_outcome(),
        pb::InviteCodeOutcome::Applied
    );

    let personal = [
        "+79601233017",
        "79601233017",
        "Zebediah",
        "Quackenbush",
        "zeb.quack@example.org",
    ];
    sqlx::query("ANALYZE users").execute(&pool).await.unwrap();
    let before = dump(&pool, &["--data-only"]).await;
    for needle in personal {
        assert!(before.contains(needle), "the dump shows {needle} before");
    }

    assert_eq!(delete(&h.directory, erased_id).await, Ok(true));

    for args in [&["--data-only"][..], &[][..]] {
        let dumped = dump(&pool, args).await;
        for needle in personal {
            assert!(
                !dumped.contains(needle),
                "pg_dump {args:?} still holds {needle}"
            );
        }
        // The others are still there: the search itself works.
        assert!(dumped.contains("+447911123456") && dumped.contains("+79601233018"));
    }
    // Nor do the planner's statistics sample personal columns.
    sqlx::query("ANALYZE users").execute(&pool).await.unwrap();
    let sampled = count(
        &pool,
        "SELECT count(*) FROM pg_stats WHERE schemaname = 'public' AND tablename = 'users'
         AND attname IN ('phone_number', 'first_name', 'last_name', 'email')",
    )
    .await;
    assert_eq!(sampled, 0, "pg_statistic holds samples of personal columns");
    assert!(
        count(
            &pool,
            "SELECT count(*) FROM pg_stats WHERE tablename = 'users' AND attname = 'invite_code'"
        )
        .await
            > 0,
        "ANALYZE ran"
    );
    // Only the peppered hash of the number, which earned an invitee bonus, remains.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM rewarded_phone_hashes").await,
        1
    );
    let stored: Vec<u8> = sqlx::query_scalar("SELECT phone_hash FROM rewarded_phone_hashes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, pepper().hash_e164("+79601233017"));
    // The row stays, with its id and its (now dead) invite code.
    let (deleted, code): (bool, String) =
        sqlx::query_as("SELECT deleted_at IS NOT NULL, invite_code FROM users WHERE id = $1")
            .bind(erased_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(deleted);
    assert_eq!(code, own_code);
}

async fn inviter_code(pool: &PgPool, user: &pb::EnsureUserResponse) -> String {
    sqlx::query_scalar("SELECT invite_code FROM users WHERE id = $1")
        .bind(uuid(&user.user_id))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn deletion_keeps_the_ledger_and_the_inviters_counters_and_list(pool: PgPool) {
    let h = handlers(&pool);
    let all = users(&h.repository, 3).await;
    let (inviter, deleted, kept) = (&all[0], &all[1], &all[2]);
    for invitee in [deleted, kept] {
        h.repository
            .activate(id(invitee), &code(inviter))
            .await
            .unwrap();
    }
    h.repository
        .update_fields(id(deleted), Some("Ada"), Some("Lovelace"), Some("a@b.co"))
        .await
        .unwrap();
    let (ledger, counters) = (ledger_rows(&pool).await, counter_rows(&pool).await);
    assert_eq!(ledger.len(), 4);

    assert_eq!(delete(&h.directory, deleted.id).await, Ok(true));

    assert_eq!(ledger_rows(&pool).await, ledger, "the ledger is unchanged");
    assert_eq!(counter_rows(&pool).await, counters, "the counters too");
    assert_counters_match_the_ledger(&pool).await;

    let seen = profile(&h, inviter.id).await.unwrap();
    assert_eq!((seen.bonus_points, seen.invitees_count), (400, 2));
    let inline: Vec<_> = seen
        .invitees
        .iter()
        .map(|i| (i.user_id.as_str(), i.phone_number.as_str()))
        .collect();
    let expected = [
        (deleted.id.to_string(), String::new()),
        (kept.id.to_string(), "+7960***0002".to_owned()),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(id, phone)| (id.as_str(), phone.as_str()))
        .collect();
    assert_eq!(inline, expected);

    let listed = invitees(&h, inviter.id).await;
    assert_eq!(listed.total_size, 2);
    let listed: Vec<_> = listed
        .invitees
        .iter()
        .map(|i| (i.user_id.as_str(), i.phone_number.as_str()))
        .collect();
    assert_eq!(listed, expected, "the deleted invitee, without a number");

    let transactions = h
        .referral
        .list_bonus_transactions(as_user(
            inviter.id,
            pb::ListBonusTransactionsRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner()
        .transactions;
    assert_eq!(transactions.len(), 2);
    assert!(
        transactions
            .iter()
            .any(|t| t.counterpart_user_id == deleted.id.to_string() && t.amount == 200)
    );
    // The kept invitee's view of themself is untouched.
    let kept_view = profile(&h, kept.id).await.unwrap();
    assert_eq!(
        (kept_view.bonus_points, kept_view.phone_number.as_str()),
        (100, kept.phone_number.as_str())
    );
}

#[sqlx::test]
async fn a_rejoined_number_is_a_new_user_and_is_never_rewarded_again(pool: PgPool) {
    let h = handlers(&pool);
    let inviter = ensure(&h, "+79600000000", None).await;
    let other_inviter = ensure(&h, "+79600000001", None).await;
    let (inviter_id, other_id) = (uuid(&inviter.user_id), uuid(&other_inviter.user_id));
    let inviter_code = inviter_code(&pool, &inviter).await;
    let number = "+79601233017";

    let first = ensure(&h, number, Some(&inviter_code)).await;
    assert_eq!(first.invite_code_outcome(), pb::InviteCodeOutcome::Applied);
    assert_eq!(
        profile(&h, uuid(&first.user_id))
            .await
            .unwrap()
            .bonus_points,
        100
    );
    assert_eq!(delete(&h.directory, uuid(&first.user_id)).await, Ok(true));
    let (ledger, counters) = (ledger_rows(&pool).await, counter_rows(&pool).await);
    assert_eq!(ledger.len(), 2);

    // Round 2: signs up again, a new user with nothing, then activates the same code.
    let second = ensure(&h, number, None).await;
    assert!(second.created, "EnsureUser creates a new user");
    assert_ne!(second.user_id, first.user_id);
    let second_id = uuid(&second.user_id);
    let fresh = profile(&h, second_id).await.unwrap();
    assert_eq!(
        (
            fresh.bonus_points,
            fresh.invitees_count,
            fresh.phone_number.as_str()
        ),
        (0, 0, number)
    );
    assert!(fresh.activated_invite_code.is_empty());
    let activated = h
        .referral
        .activate_invite_code(as_user(
            second_id,
            pb::ActivateInviteCodeRequest {
                invite_code: inviter_code.clone(),
            },
        ))
        .await
        .expect("the activation itself succeeds")
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(activated.activated_invite_code, inviter_code, "linked");
    assert_eq!(activated.bonus_points, 0, "no invitee bonus");
    assert_eq!(ledger_rows(&pool).await, ledger, "no ledger entries");
    assert_eq!(counter_rows(&pool).await, counters, "no counter moved");
    let seen = profile(&h, inviter_id).await.unwrap();
    assert_eq!((seen.bonus_points, seen.invitees_count), (200, 1));
    let listed: Vec<_> = seen
        .invitees
        .iter()
        .map(|i| (i.user_id.clone(), i.phone_number.clone()))
        .collect();
    assert_eq!(
        listed,
        [
            (first.user_id.clone(), String::new()),
            (second.user_id.clone(), "+7960***3017".to_owned())
        ],
        "both links are listed"
    );

    // Round 3: deleted again, signs up with another inviter's code at sign-in.
    assert_eq!(delete(&h.directory, second_id).await, Ok(true));
    let other_code = sqlx::query_scalar::<_, String>("SELECT invite_code FROM users WHERE id = $1")
        .bind(other_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let third = ensure(&h, number, Some(&other_code)).await;
    assert!(third.created);
    assert_eq!(
        third.invite_code_outcome(),
        pb::InviteCodeOutcome::Applied,
        "linked, without points"
    );
    assert_eq!(
        profile(&h, uuid(&third.user_id))
            .await
            .unwrap()
            .bonus_points,
        0
    );
    let other_seen = profile(&h, other_id).await.unwrap();
    assert_eq!((other_seen.bonus_points, other_seen.invitees_count), (0, 0));
    assert_eq!(other_seen.invitees.len(), 1);

    // Round 4, at the storage level: the award is nothing.
    assert_eq!(delete(&h.directory, uuid(&third.user_id)).await, Ok(true));
    let (fourth, created) = h.repository.ensure_user(&e164(number)).await.unwrap();
    assert!(created);
    assert_eq!(
        h.repository
            .activate(id(&fourth), &InviteCode::parse(&inviter_code).unwrap())
            .await,
        Ok(Award::Nothing)
    );
    assert_eq!(ledger_rows(&pool).await, ledger);
    assert_eq!(counter_rows(&pool).await, counters);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM rewarded_phone_hashes").await,
        1
    );
    assert_counters_match_the_ledger(&pool).await;
}

#[sqlx::test]
async fn a_number_deleted_before_earning_the_invitee_bonus_earns_it_on_rejoin(pool: PgPool) {
    let h = handlers(&pool);
    let all = users(&h.repository, 3).await;
    let (inviter, leaver, invited) = (&all[0], &all[1], &all[2]);
    // The leaver earned the inviter bonus only (someone used their code), never the invitee one.
    assert_eq!(
        h.repository.activate(id(invited), &code(leaver)).await,
        Ok(Award::Bonuses)
    );
    assert_eq!(delete(&h.directory, leaver.id).await, Ok(true));
    assert_eq!(
        count(&pool, "SELECT count(*) FROM rewarded_phone_hashes").await,
        0,
        "nothing to remember"
    );

    let back = ensure(&h, &leaver.phone_number, Some(&inviter.invite_code)).await;
    assert!(back.created);
    assert_eq!(back.invite_code_outcome(), pb::InviteCodeOutcome::Applied);
    assert_eq!(
        profile(&h, uuid(&back.user_id)).await.unwrap().bonus_points,
        100
    );
    let seen = profile(&h, inviter.id).await.unwrap();
    assert_eq!((seen.bonus_points, seen.invitees_count), (200, 1));
    assert_counters_match_the_ledger(&pool).await;
}

#[sqlx::test]
async fn a_deleted_users_invite_code_is_not_found_and_never_handed_out_again(pool: PgPool) {
    let h = handlers(&pool);
    let all = users(&h.repository, 2).await;
    let (gone, other) = (&all[0], &all[1]);
    assert_eq!(delete(&h.directory, gone.id).await, Ok(true));

    assert_eq!(
        h.repository.activate(id(other), &code(gone)).await,
        Err(ReferralError::NotFound("invite code")),
        "the same answer as a code nobody has"
    );
    let status = h
        .referral
        .activate_invite_code(as_user(
            other.id,
            pb::ActivateInviteCodeRequest {
                invite_code: gone.invite_code.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = h
        .referral
        .update_profile(as_user(
            other.id,
            pb::UpdateProfileRequest {
                profile: Some(pb::Profile {
                    activated_invite_code: gone.invite_code.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["activated_invite_code".into()],
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let newcomer = ensure(&h, "+79601233017", Some(&gone.invite_code)).await;
    assert_eq!(
        newcomer.invite_code_outcome(),
        pb::InviteCodeOutcome::NotFound
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM bonus_ledger").await, 0);

    // The code stays reserved: a generator that offers only it never gets it.
    let reserved = code(gone);
    let repository = Repository::with_code_generator(
        pool.clone(),
        BONUSES,
        pepper(),
        Arc::new(move || reserved.clone()),
    );
    let refused = repository.ensure_user(&e164("+79601233018")).await;
    assert!(
        matches!(refused, Err(ReferralError::Internal(_))),
        "the deleted user's code was handed out again: {refused:?}"
    );
}

#[sqlx::test]
async fn deleted_users_are_not_found_anywhere_and_ensure_never_returns_them(pool: PgPool) {
    let h = handlers(&pool);
    let all = users(&h.repository, 3).await;
    let (gone, other) = (&all[1], &all[2]);
    h.repository.activate(id(other), &code(gone)).await.unwrap();
    assert_eq!(delete(&h.directory, gone.id).await, Ok(true));

    // Every ReferralService RPC with the deleted user's still valid token.
    let user_id = gone.id;
    let calls: Vec<(&str, Result<(), Status>)> = vec![
        ("GetProfile", profile(&h, user_id).await.map(drop)),
        (
            "UpdateProfile",
            h.referral
                .update_profile(as_user(
                    user_id,
                    pb::UpdateProfileRequest {
                        profile: Some(pb::Profile {
                            first_name: "Back".into(),
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["first_name".into()],
                        }),
                    },
                ))
                .await
                .map(drop),
        ),
        (
            "ActivateInviteCode",
            h.referral
                .activate_invite_code(as_user(
                    user_id,
                    pb::ActivateInviteCodeRequest {
                        invite_code: all[0].invite_code.clone(),
                    },
                ))
                .await
                .map(drop),
        ),
        (
            "ListInvitees",
            h.referral
                .list_invitees(as_user(user_id, pb::ListInviteesRequest::default()))
                .await
                .map(drop),
        ),
        (
            "ListBonusTransactions",
            h.referral
                .list_bonus_transactions(as_user(
                    user_id,
                    pb::ListBonusTransactionsRequest::default(),
                ))
                .await
                .map(drop),
        ),
        (
            "GetUser of the deleted user",
            h.referral
                .get_user(as_user(
                    other.id,
                    pb::GetUserRequest {
                        user_id: user_id.to_string(),
                    },
                ))
                .await
                .map(drop),
        ),
        (
            "AdminService.GetUser",
            h.admin
                .get_user(Request::new(pb::AdminServiceGetUserRequest {
                    user_id: user_id.to_string(),
                }))
                .await
                .map(drop),
        ),
        (
            "LookupUser",
            h.directory
                .lookup_user(Request::new(pb::LookupUserRequest {
                    user_id: user_id.to_string(),
                }))
                .await
                .map(drop),
        ),
    ];
    for (what, result) in calls {
        assert_eq!(
            result.map_err(|status| status.code()),
            Err(Code::NotFound),
            "{what}"
        );
    }
    let first_name: String = sqlx::query_scalar("SELECT first_name FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(first_name, "", "UpdateProfile wrote nothing");

    let listed = h
        .admin
        .list_users(Request::new(pb::ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .users;
    let ids: Vec<_> = listed.iter().map(|u| u.user_id.clone()).collect();
    assert_eq!(ids, [all[0].id.to_string(), other.id.to_string()]);
    // The invitee of the deleted user keeps their own view, link included.
    let other_view = profile(&h, other.id).await.unwrap();
    assert_eq!(other_view.invited_by_user_id, gone.id.to_string());
    assert_eq!(other_view.bonus_points, 100);

    let again = ensure(&h, &gone.phone_number, None).await;
    assert!(again.created, "a new user, never the deleted one");
    assert_ne!(again.user_id, gone.id.to_string());
    assert!(
        !h.repository
            .grant_admin(&e164("+79600000009"))
            .await
            .unwrap(),
        "no such number"
    );
}

#[sqlx::test]
async fn lookup_user_returns_the_live_roles(pool: PgPool) {
    let h = handlers(&pool);
    let user = users(&h.repository, 1).await.remove(0);
    let lookup = |user_id: String| {
        h.directory
            .lookup_user(Request::new(pb::LookupUserRequest { user_id }))
    };
    let roles = |response: tonic::Response<pb::LookupUserResponse>| {
        let response = response.into_inner();
        assert_eq!(response.user_id, user.id.to_string());
        response.roles
    };
    assert!(roles(lookup(user.id.to_string()).await.unwrap()).is_empty());
    let phone = e164(&user.phone_number);
    assert!(h.repository.grant_admin(&phone).await.unwrap());
    assert_eq!(
        roles(lookup(format!(" {} ", user.id)).await.unwrap()),
        ["admin"]
    );
    assert_eq!(h.repository.revoke_admin(&phone).await.unwrap(), Some(true));
    assert!(roles(lookup(user.id.to_string()).await.unwrap()).is_empty());

    let status = lookup(Uuid::now_v7().to_string()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "never existed");
    let status = lookup("42".into()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(h.repository.grant_admin(&phone).await.unwrap());
    assert_eq!(delete(&h.directory, user.id).await, Ok(true));
    let status = lookup(user.id.to_string()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "deleted");
    let roles: Vec<String> = sqlx::query_scalar("SELECT roles FROM users WHERE id = $1")
        .bind(user.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(roles.is_empty(), "a deleted admin keeps no role");
}

#[sqlx::test]
async fn eight_parallel_deletions_of_one_user_delete_once(pool: PgPool) {
    let h = handlers(&pool);
    let all = users(&h.repository, 2).await;
    h.repository
        .activate(id(&all[1]), &code(&all[0]))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let directory = h.directory.clone();
            let user = all[1].id;
            tokio::spawn(async move { delete(&directory, user).await })
        })
        .collect();
    let mut deleted = 0;
    for task in tasks {
        if task.await.unwrap().expect("every call succeeds") {
            deleted += 1;
        }
    }
    assert_eq!(deleted, 1, "exactly one call deleted the user");
    assert_eq!(delete(&h.directory, all[1].id).await, Ok(false), "again");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM rewarded_phone_hashes").await,
        1
    );

    assert_eq!(
        delete(&h.directory, Uuid::now_v7()).await,
        Err(Code::NotFound),
        "an id that never existed"
    );
    assert_eq!(delete(&h.directory, Uuid::nil()).await, Err(Code::NotFound));
    let status = h
        .directory
        .delete_user(Request::new(pb::DeleteUserRequest {
            user_id: "not-an-id".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Waits until `n` sessions of this test's database wait for a lock.
async fn until_blocked(pool: &PgPool, n: i64) {
    for _ in 0..500 {
        let waiting = count(
            pool,
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await;
        if waiting >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} sessions ever waited for a lock");
}

/// A deletion holding the owner's row (here: stalled on its last statement) makes an
/// activation of the owner's code wait, then answer NOT_FOUND as for any unknown code: the code
/// never works for a deletion that has committed, and nothing is awarded to a deleted user.
#[sqlx::test]
async fn an_activation_waiting_on_a_deletion_finds_the_code_gone(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 3).await;
    let (first, owner, invitee) = (&all[0], &all[1], &all[2]);
    // The owner activated a code, so their deletion also writes the number's hash.
    repository.activate(id(owner), &code(first)).await.unwrap();

    let mut stall = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE rewarded_phone_hashes IN EXCLUSIVE MODE")
        .execute(&mut *stall)
        .await
        .unwrap();
    let deletion = tokio::spawn({
        let repository = repository.clone();
        let owner = id(owner);
        async move { repository.delete_user(owner).await }
    });
    until_blocked(&pool, 1).await;
    let activation = tokio::spawn({
        let (repository, invitee, code) = (repository.clone(), id(invitee), code(owner));
        async move { repository.activate(invitee, &code).await }
    });
    until_blocked(&pool, 2).await;
    stall.commit().await.unwrap();

    assert_eq!(deletion.await.unwrap(), Ok(true));
    assert_eq!(
        activation.await.unwrap(),
        Err(ReferralError::NotFound("invite code"))
    );
    assert_eq!(repository.user(id(invitee)).await.unwrap().invited_by, None);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM bonus_ledger").await,
        2,
        "only the owner's own activation"
    );
    assert_counters_match_the_ledger(&pool).await;
}

/// An activation holding the owner's row (stalled on its counters) finishes before the
/// owner's deletion, which waits for it: the inviter's count and points include it.
#[sqlx::test]
async fn a_deletion_waits_for_an_activation_of_the_owners_code(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 2).await;
    let (owner, invitee) = (&all[0], &all[1]);

    let mut stall = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE user_counters IN EXCLUSIVE MODE")
        .execute(&mut *stall)
        .await
        .unwrap();
    let activation = tokio::spawn({
        let (repository, invitee, code) = (repository.clone(), id(invitee), code(owner));
        async move { repository.activate(invitee, &code).await }
    });
    until_blocked(&pool, 1).await;
    let deletion = tokio::spawn({
        let repository = repository.clone();
        let owner = id(owner);
        async move { repository.delete_user(owner).await }
    });
    until_blocked(&pool, 2).await;
    stall.commit().await.unwrap();

    assert_eq!(activation.await.unwrap(), Ok(Award::Bonuses));
    assert_eq!(deletion.await.unwrap(), Ok(true));
    let owner_counters: (i64, i64) = sqlx::query_as(
        "SELECT sum(invitees)::bigint, sum(points)::bigint FROM user_counters WHERE user_id = $1",
    )
    .bind(owner.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(owner_counters, (1, 200));
    assert_eq!(
        repository.user(id(invitee)).await.unwrap().invited_by,
        Some(owner.id)
    );
    assert_counters_match_the_ledger(&pool).await;
}

/// Many owners deleted while their codes are being activated: each activation either happened
/// in full before the deletion or not at all, and every counter agrees with the ledger.
#[sqlx::test]
async fn deletions_racing_activations_leave_consistent_counters(pool: PgPool) {
    const PAIRS: usize = 16;
    let repository = repository(&pool);
    // Owners first, so each joined before their invitee.
    let all = users(&repository, 2 * PAIRS as u32).await;
    let (owners, invitees) = all.split_at(PAIRS);
    let mut tasks = Vec::new();
    for (owner, invitee) in owners.iter().zip(invitees) {
        let activation = tokio::spawn({
            let (repository, invitee, code) = (repository.clone(), id(invitee), code(owner));
            async move { repository.activate(invitee, &code).await }
        });
        let deletion = tokio::spawn({
            let (repository, owner) = (repository.clone(), id(owner));
            async move { repository.delete_user(owner).await }
        });
        tasks.push((activation, deletion));
    }
    let mut applied = 0;
    for ((activation, deletion), (owner, invitee)) in
        tasks.into_iter().zip(owners.iter().zip(invitees))
    {
        assert_eq!(deletion.await.unwrap(), Ok(true));
        let owner_counters: (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(sum(invitees), 0)::bigint, COALESCE(sum(points), 0)::bigint
             FROM user_counters WHERE user_id = $1",
        )
        .bind(owner.id)
        .fetch_one(&pool)
        .await
        .unwrap();
        let linked = repository.user(id(invitee)).await.unwrap().invited_by;
        match activation.await.unwrap() {
            Ok(Award::Bonuses) => {
                applied += 1;
                assert_eq!(owner_counters, (1, 200));
                assert_eq!(linked, Some(owner.id));
            }
            Err(ReferralError::NotFound("invite code")) => {
                assert_eq!(owner_counters, (0, 0));
                assert_eq!(linked, None);
            }
            other => panic!("unexpected activation result {other:?}"),
        }
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM bonus_ledger").await,
        2 * applied
    );
    assert_counters_match_the_ledger(&pool).await;
}
