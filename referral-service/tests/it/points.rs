//! Points: redemptions that never overdraw under parallel calls, idempotency keys (parallel
//! retries, reuse, refusals that store nothing, pruning), grants by services and admins, the
//! scope of each PointsService RPC, and what users see of it (ledger, profile balance).

use std::sync::Arc;
use std::time::Duration;

use referral_service::error::ReferralError;
use referral_service::grpc::{AdminHandler, PointsHandler, ReferralHandler};
use referral_service::points::{
    KEY_RETENTION, POINTS_GRANTED, POINTS_REDEEMED, POINTS_REFUSALS, PointsKind, PointsMove,
    PointsRequest,
};
use referral_service::storage::{Repository, UserRecord};
use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::admin_service_client::AdminServiceClient;
use refsys_proto::referral::v1::admin_service_server::AdminService;
use refsys_proto::referral::v1::points_service_client::PointsServiceClient;
use refsys_proto::referral::v1::points_service_server::PointsService;
use refsys_proto::referral::v1::referral_service_server::ReferralService;
use service_kit::authn::Caller;
use service_kit::tokens::{
    ADMIN_ROLE, Claims, POINTS_GRANT_SCOPE, POINTS_READ_SCOPE, POINTS_REDEEM_SCOPE,
};
use sqlx::PgPool;
use tokio::sync::Barrier;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::auth::{service_claims, start, user_claims, with_token};
use crate::{id, repository, users};

/// A request as the authentication layer leaves it for a service token of client `client`.
fn as_service<T>(client: &str, message: T) -> Request<T> {
    as_claims(
        Claims {
            sub: client.into(),
            ..service_claims("referral.points.read referral.points.redeem referral.points.grant")
        },
        message,
    )
}

/// A request as the authentication layer leaves it for a user's token.
fn as_user<T>(user: &UserRecord, roles: &[&str], message: T) -> Request<T> {
    as_claims(user_claims(&user.id.to_string(), roles), message)
}

fn as_claims<T>(claims: Claims, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Caller { claims });
    request
}

fn redeem(user: &UserRecord, points: i64, key: &str) -> pb::RedeemPointsRequest {
    pb::RedeemPointsRequest {
        user_id: user.id.to_string(),
        points,
        idempotency_key: key.into(),
        reason: format!("order {key}"),
    }
}

fn grant(user: &UserRecord, points: i64, key: &str) -> pb::GrantPointsRequest {
    pb::GrantPointsRequest {
        user_id: user.id.to_string(),
        points,
        idempotency_key: key.into(),
        reason: format!("goodwill {key}"),
    }
}

fn request(kind: PointsKind, user: &UserRecord, points: i64, key: &str) -> PointsRequest {
    PointsRequest::parse(kind, &user.id.to_string(), points, key, "test").unwrap()
}

/// Grants `points` to `user` in `parts` grants (so the balance lies in several shards).
async fn fund(repository: &Repository, user: &UserRecord, points: i64, parts: i64) {
    for part in 0..parts {
        repository
            .move_points(
                "funding",
                &request(
                    PointsKind::Grant,
                    user,
                    points / parts,
                    &format!("fund-{part}-{}", Uuid::now_v7()),
                ),
            )
            .await
            .unwrap();
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A repository on its own pool of `connections` to the test's database (the test pool has only
/// 5), so that many calls really run at once.
async fn wide_repository(pool: &PgPool, connections: u32) -> Arc<Repository> {
    let wide = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    crate::repository(&wide)
}

/// Waits until `n` sessions of the test's database wait for a lock (at most 10 seconds).
async fn lock_waiters(pool: &PgPool, n: i64) {
    let waiting = async {
        loop {
            let now = count(
                pool,
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await;
            if now >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| panic!("{n} sessions never waited for a lock together"));
}

/// The user's balance from the ledger itself, and from the counters.
async fn ledger_and_counters(pool: &PgPool, user: &UserRecord) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT COALESCE(sum(amount), 0)::bigint FROM bonus_ledger WHERE user_id = $1),
                (SELECT COALESCE(sum(points), 0)::bigint FROM user_counters WHERE user_id = $1)",
    )
    .bind(user.id)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn error_info(status: &Status) -> (String, std::collections::HashMap<String, String>) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("an ErrorInfo detail: {status:?}"));
    (info.reason, info.metadata)
}

#[sqlx::test]
async fn twenty_parallel_redemptions_against_a_balance_for_ten_spend_exactly_it(pool: PgPool) {
    let repository = wide_repository(&pool, 20).await;
    let user = users(&repository, 1).await.remove(0);
    fund(&repository, &user, 1000, 10).await;
    let start = Arc::new(Barrier::new(20));
    let mut tasks = Vec::new();
    for n in 0..20 {
        let (repository, start) = (repository.clone(), start.clone());
        let request = request(PointsKind::Redeem, &user, 100, &format!("order-{n}"));
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            repository.move_points("shop", &request).await
        }));
    }
    let (mut spent, mut refused, mut balances) = (0, 0, Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            Ok(moved) => {
                assert_eq!(moved.entry.amount, -100);
                balances.push(moved.balance);
                spent += 1;
            }
            Err(ReferralError::InsufficientPoints { balance }) => {
                assert!(balance < 100, "refused with {balance} points left");
                refused += 1;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((spent, refused), (10, 10));
    balances.sort_unstable();
    assert_eq!(
        balances,
        (0..10).map(|n| n * 100).collect::<Vec<_>>(),
        "each redemption saw every earlier one"
    );
    assert_eq!(repository.balance(id(&user)).await.unwrap(), 0);
    assert_eq!(ledger_and_counters(&pool, &user).await, (0, 0));
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM bonus_ledger WHERE reason = 'redeemed' AND amount = -100"
        )
        .await,
        10
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM points_requests WHERE caller = 'shop'"
        )
        .await,
        10,
        "refused redemptions keep no key"
    );
}

#[sqlx::test]
async fn parallel_retries_of_one_key_debit_once_and_answer_alike(pool: PgPool) {
    let repository = wide_repository(&pool, 8).await;
    let user = users(&repository, 1).await.remove(0);
    // Enough for exactly one: a second debit would be refused, not replayed, if it happened.
    fund(&repository, &user, 250, 1).await;
    // Another debit of the user is still running, so all eight retries are in flight together:
    // the first to claim the key waits for the user's row, the others for the key.
    let mut earlier_debit = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(user.id)
        .execute(&mut *earlier_debit)
        .await
        .unwrap();
    let start = Arc::new(Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (repository, start) = (repository.clone(), start.clone());
        let request = request(PointsKind::Redeem, &user, 200, "checkout-42");
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            repository.move_points("shop", &request).await
        }));
    }
    lock_waiters(&pool, 8).await;
    earlier_debit.rollback().await.unwrap();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap().expect("every retry succeeds"));
    }
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
    let first = PointsMove {
        replayed: false,
        ..answers[0].clone()
    };
    for answer in &answers {
        assert_eq!(
            PointsMove {
                replayed: false,
                ..answer.clone()
            },
            first,
            "the same entry and balance"
        );
    }
    assert_eq!(first.balance, 50);
    assert_eq!(repository.balance(id(&user)).await.unwrap(), 50);
    assert_eq!(ledger_and_counters(&pool, &user).await, (50, 50));
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM bonus_ledger WHERE reason = 'redeemed'"
        )
        .await,
        1
    );
    // A retry later still replays.
    let later = repository
        .move_points(
            "shop",
            &request(PointsKind::Redeem, &user, 200, "checkout-42"),
        )
        .await
        .unwrap();
    assert!(later.replayed);
    assert_eq!(later.entry, first.entry);
}

#[sqlx::test]
async fn a_key_reused_for_another_request_is_already_exists(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 2).await;
    let (user, other) = (&all[0], &all[1]);
    fund(&repository, user, 1000, 2).await;
    let handler = PointsHandler::new((*repository).clone());
    let first = handler
        .redeem_points(as_service("shop", redeem(user, 100, "k1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.balance, 900);

    let reused = [
        ("other points", redeem(user, 101, "k1")),
        (
            "other reason",
            pb::RedeemPointsRequest {
                reason: "something else".into(),
                ..redeem(user, 100, "k1")
            },
        ),
        ("other user", redeem(other, 100, "k1")),
    ];
    for (what, message) in reused {
        let status = handler
            .redeem_points(as_service("shop", message))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{what}: {status:?}");
        assert_eq!(error_info(&status).0, "IDEMPOTENCY_KEY_REUSED", "{what}");
    }
    // A grant under a redemption's key is another request too.
    let status = handler
        .grant_points(as_service(
            "shop",
            pb::GrantPointsRequest {
                reason: "order k1".into(),
                ..grant(user, 100, "k1")
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // Keys are per caller: another client's "k1" is its own.
    let billing = handler
        .redeem_points(as_service("billing", redeem(user, 100, "k1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(billing.balance, 800);
    assert_ne!(billing.transaction, first.transaction);
    // The same request again is the first answer, nothing more spent.
    let again = handler
        .redeem_points(as_service("shop", redeem(user, 100, "k1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    assert_eq!(repository.balance(id(user)).await.unwrap(), 800);
}

#[sqlx::test]
async fn insufficient_points_show_the_balance_and_store_nothing(pool: PgPool) {
    let repository = repository(&pool);
    let user = users(&repository, 1).await.remove(0);
    fund(&repository, &user, 70, 1).await;
    let handler = PointsHandler::new((*repository).clone());
    let refusals = || {
        POINTS_REFUSALS
            .with_label_values(&["redeem", "insufficient_points"])
            .get()
    };
    let refused_before = refusals();
    let status = handler
        .redeem_points(as_service("shop", redeem(&user, 100, "big-order")))
        .await
        .unwrap_err();
    assert!(refusals() > refused_before, "counted in the metrics");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let (reason, metadata) = error_info(&status);
    assert_eq!(reason, "INSUFFICIENT_POINTS");
    assert_eq!(metadata.get("balance").map(String::as_str), Some("70"));
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM points_requests WHERE caller = 'shop'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM bonus_ledger WHERE reason = 'redeemed'"
        )
        .await,
        0
    );
    assert_eq!(ledger_and_counters(&pool, &user).await, (70, 70));

    // After a grant, a retry with the same key goes through.
    fund(&repository, &user, 30, 1).await;
    let redeemed = handler
        .redeem_points(as_service("shop", redeem(&user, 100, "big-order")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redeemed.balance, 0);
    assert_eq!(redeemed.transaction.unwrap().amount, -100);
}

#[sqlx::test]
async fn invalid_requests_name_the_field_and_unknown_users_are_not_found(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 2).await;
    let user = &all[0];
    fund(&repository, user, 100, 1).await;
    let handler = PointsHandler::new((*repository).clone());
    let base = || redeem(user, 10, "k");
    let cases = [
        (
            "user_id",
            pb::RedeemPointsRequest {
                user_id: "not-a-uuid".into(),
                ..base()
            },
        ),
        (
            "points",
            pb::RedeemPointsRequest {
                points: 0,
                ..base()
            },
        ),
        (
            "points",
            pb::RedeemPointsRequest {
                points: -5,
                ..base()
            },
        ),
        (
            "points",
            pb::RedeemPointsRequest {
                points: 1_000_000_001,
                ..base()
            },
        ),
        (
            "idempotency_key",
            pb::RedeemPointsRequest {
                idempotency_key: String::new(),
                ..base()
            },
        ),
        (
            "idempotency_key",
            pb::RedeemPointsRequest {
                idempotency_key: "k".repeat(201),
                ..base()
            },
        ),
        (
            "idempotency_key",
            pb::RedeemPointsRequest {
                idempotency_key: "ключ".into(),
                ..base()
            },
        ),
        (
            "reason",
            pb::RedeemPointsRequest {
                reason: " ".into(),
                ..base()
            },
        ),
        (
            "reason",
            pb::RedeemPointsRequest {
                reason: "x".repeat(201),
                ..base()
            },
        ),
        (
            "reason",
            pb::RedeemPointsRequest {
                reason: "line\nbreak".into(),
                ..base()
            },
        ),
    ];
    for (field, message) in cases {
        let status = handler
            .redeem_points(as_service("shop", message.clone()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{message:?}");
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations[0].field, field, "{message:?}");
        let grant = pb::GrantPointsRequest {
            user_id: message.user_id,
            points: message.points,
            idempotency_key: message.idempotency_key,
            reason: message.reason,
        };
        let status = handler
            .grant_points(as_service("shop", grant))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    // The limits themselves are fine.
    handler
        .grant_points(as_service(
            "shop",
            pb::GrantPointsRequest {
                idempotency_key: "~".repeat(200),
                reason: "я".repeat(200),
                ..grant(user, 1_000_000_000, "")
            },
        ))
        .await
        .expect("the longest key and reason, the most points");

    let nobody = Uuid::now_v7().to_string();
    let status = handler
        .redeem_points(as_service(
            "shop",
            pb::RedeemPointsRequest {
                user_id: nobody.clone(),
                ..base()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = handler
        .get_balance(as_service(
            "shop",
            pb::GetBalanceRequest {
                user_id: nobody.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let deleted = &all[1];
    assert_eq!(repository.delete_user(id(deleted)).await, Ok(true));
    for result in [
        handler
            .grant_points(as_service("shop", grant(deleted, 5, "to-deleted")))
            .await
            .map(drop),
        handler
            .redeem_points(as_service("shop", redeem(deleted, 5, "from-deleted")))
            .await
            .map(drop),
        handler
            .get_balance(as_service(
                "shop",
                pb::GetBalanceRequest {
                    user_id: deleted.id.to_string(),
                },
            ))
            .await
            .map(drop),
    ] {
        assert_eq!(result.unwrap_err().code(), Code::NotFound);
    }
    // Only the one valid grant (and the funding) stored a key.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM points_requests").await,
        2
    );
    assert_eq!(repository.balance(id(user)).await.unwrap(), 1_000_000_100);
}

/// Calls one PointsService RPC by name with `token`.
async fn call_points(
    client: &mut PointsServiceClient<tonic::transport::Channel>,
    method: &str,
    user: &UserRecord,
    token: &str,
) -> Result<i64, Status> {
    match method {
        "GetBalance" => client
            .get_balance(with_token(
                pb::GetBalanceRequest {
                    user_id: user.id.to_string(),
                },
                token,
            ))
            .await
            .map(|r| r.into_inner().balance),
        "RedeemPoints" => client
            .redeem_points(with_token(redeem(user, 10, "scoped-redeem"), token))
            .await
            .map(|r| r.into_inner().balance),
        "GrantPoints" => client
            .grant_points(with_token(grant(user, 10, "scoped-grant"), token))
            .await
            .map(|r| r.into_inner().balance),
        other => panic!("no RPC {other}"),
    }
}

#[sqlx::test]
async fn each_points_rpc_needs_its_own_scope(pool: PgPool) {
    let repository = repository(&pool);
    let user = users(&repository, 1).await.remove(0);
    fund(&repository, &user, 100, 1).await;
    let server = start(&pool).await;
    let mut client = PointsServiceClient::new(server.channel.clone());
    let rpcs = [
        ("GetBalance", POINTS_READ_SCOPE),
        ("RedeemPoints", POINTS_REDEEM_SCOPE),
        ("GrantPoints", POINTS_GRANT_SCOPE),
    ];
    assert_eq!(referral_service::POINTS_SCOPES, rpcs);
    assert_eq!(
        rpcs.map(|(_, scope)| scope),
        [
            "referral.points.read",
            "referral.points.redeem",
            "referral.points.grant"
        ],
        "the scopes the proto documents"
    );
    let token = |claims: &Claims| server.key.sign(claims).unwrap();
    let user_token = token(&user_claims(&user.id.to_string(), &[]));
    let admin_token = token(&user_claims(&user.id.to_string(), &[ADMIN_ROLE]));
    for (method, needed) in rpcs {
        for (what, token) in [
            ("a user token", user_token.clone()),
            ("an admin's user token", admin_token.clone()),
        ] {
            let status = call_points(&mut client, method, &user, &token)
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{method} with {what}"
            );
        }
        for (_, other) in rpcs.iter().filter(|(_, scope)| *scope != needed) {
            let status = call_points(&mut client, method, &user, &token(&service_claims(other)))
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{method} with only {other}"
            );
        }
    }
    // The refused calls moved nothing.
    assert_eq!(repository.balance(id(&user)).await.unwrap(), 100);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM points_requests WHERE caller <> 'funding'"
        )
        .await,
        0
    );
    let mut balances = Vec::new();
    for (method, needed) in rpcs {
        balances.push(
            call_points(&mut client, method, &user, &token(&service_claims(needed)))
                .await
                .unwrap_or_else(|status| panic!("{method} with {needed}: {status:?}")),
        );
    }
    assert_eq!(balances, [100, 90, 100]);
}

#[sqlx::test]
async fn services_and_admins_grant_points_idempotently(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 2).await;
    let (admin, user) = (&all[0], &all[1]);
    let server = start(&pool).await;

    let service = server
        .key
        .sign(&Claims {
            sub: "support-bot".into(),
            ..service_claims(POINTS_GRANT_SCOPE)
        })
        .unwrap();
    let mut points = PointsServiceClient::new(server.channel.clone());
    let granted = points
        .grant_points(with_token(grant(user, 300, "ticket-1"), &service))
        .await
        .unwrap()
        .into_inner();
    let entry = granted.transaction.clone().unwrap();
    assert_eq!(
        (
            granted.balance,
            entry.amount,
            entry.reason(),
            entry.requested_by.as_str(),
            entry.note.as_str(),
            entry.counterpart_user_id.as_str()
        ),
        (
            300,
            300,
            pb::BonusReason::Granted,
            "support-bot",
            "goodwill ticket-1",
            ""
        )
    );
    let again = points
        .grant_points(with_token(grant(user, 300, "ticket-1"), &service))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, granted, "a retry grants nothing more");

    let mut admin_client = AdminServiceClient::new(server.channel.clone());
    let admin_grant = |key: &str| pb::AdminServiceGrantPointsRequest {
        user_id: user.id.to_string(),
        points: 50,
        idempotency_key: key.into(),
        reason: "apology".into(),
    };
    let not_admin = server
        .key
        .sign(&user_claims(&user.id.to_string(), &[]))
        .unwrap();
    for token in [&not_admin, &service] {
        let status = admin_client
            .grant_points(with_token(admin_grant("a-1"), token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let admin_token = server
        .key
        .sign(&user_claims(&admin.id.to_string(), &[ADMIN_ROLE]))
        .unwrap();
    let by_admin = admin_client
        .grant_points(with_token(admin_grant("ticket-1"), &admin_token))
        .await
        .expect("an admin may grant; the key is the admin's own, not the service's")
        .into_inner();
    let entry = by_admin.transaction.clone().unwrap();
    assert_eq!(by_admin.balance, 350);
    assert_eq!(entry.requested_by, format!("admin:{}", admin.id));
    assert_eq!(entry.reason(), pb::BonusReason::Granted);
    let again = admin_client
        .grant_points(with_token(admin_grant("ticket-1"), &admin_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, by_admin);
    let status = admin_client
        .grant_points(with_token(
            pb::AdminServiceGrantPointsRequest {
                points: 51,
                ..admin_grant("ticket-1")
            },
            &admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(error_info(&status).0, "IDEMPOTENCY_KEY_REUSED");
    let status = admin_client
        .grant_points(with_token(
            pb::AdminServiceGrantPointsRequest {
                points: 0,
                ..admin_grant("ticket-2")
            },
            &admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(repository.balance(id(user)).await.unwrap(), 350);
    assert_eq!(ledger_and_counters(&pool, user).await, (350, 350));

    // A service client id that would pass for an admin's is refused.
    let impostor = server
        .key
        .sign(&Claims {
            sub: format!("admin:{}", admin.id),
            ..service_claims(POINTS_GRANT_SCOPE)
        })
        .unwrap();
    let status = points
        .grant_points(with_token(grant(user, 300, "ticket-1"), &impostor))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[sqlx::test]
async fn users_see_redemptions_and_grants_in_their_ledger_and_balance(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 2).await;
    let (inviter, invitee) = (&all[0], &all[1]);
    repository
        .activate(id(invitee), &crate::code(inviter))
        .await
        .unwrap();
    let (redeemed_before, granted_before) = (POINTS_REDEEMED.get(), POINTS_GRANTED.get());
    let points = PointsHandler::new((*repository).clone());
    let admin = AdminHandler::new((*repository).clone());
    let referral = ReferralHandler::new((*repository).clone());
    points
        .redeem_points(as_service("shop", redeem(inviter, 150, "o-1")))
        .await
        .unwrap();
    admin
        .grant_points(as_user(
            invitee,
            &[ADMIN_ROLE],
            pb::AdminServiceGrantPointsRequest {
                user_id: inviter.id.to_string(),
                points: 25,
                idempotency_key: "a-1".into(),
                reason: "welcome back".into(),
            },
        ))
        .await
        .unwrap();
    points
        .redeem_points(as_service("shop", redeem(inviter, 70, "o-2")))
        .await
        .unwrap();

    let profile = referral
        .get_profile(as_user(inviter, &[], pb::GetProfileRequest {}))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(profile.bonus_points, 200 - 150 + 25 - 70);
    assert_eq!(profile.invitees_count, 1, "points moves are not invitees");
    let balance = points
        .get_balance(as_service(
            "shop",
            pb::GetBalanceRequest {
                user_id: inviter.id.to_string(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance, 5);
    // Other tests count in parallel, so at least these amounts.
    assert!(POINTS_REDEEMED.get() - redeemed_before >= 220);
    assert!(POINTS_GRANTED.get() - granted_before >= 25);
    assert_eq!(balance.user_id, inviter.id.to_string());

    let listed = referral
        .list_bonus_transactions(as_user(
            inviter,
            &[],
            pb::ListBonusTransactionsRequest {
                page_size: 2,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let rest = referral
        .list_bonus_transactions(as_user(
            inviter,
            &[],
            pb::ListBonusTransactionsRequest {
                page_size: 2,
                page_token: listed.next_page_token.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let seen: Vec<_> = listed
        .transactions
        .iter()
        .chain(&rest.transactions)
        .map(|t| {
            (
                t.amount,
                t.reason(),
                t.note.clone(),
                t.requested_by.clone(),
                t.counterpart_user_id.clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                -70,
                pb::BonusReason::Redeemed,
                "order o-2".to_owned(),
                "shop".to_owned(),
                String::new()
            ),
            (
                25,
                pb::BonusReason::Granted,
                "welcome back".to_owned(),
                format!("admin:{}", invitee.id),
                String::new()
            ),
            (
                -150,
                pb::BonusReason::Redeemed,
                "order o-1".to_owned(),
                "shop".to_owned(),
                String::new()
            ),
            (
                200,
                pb::BonusReason::InviteeJoined,
                String::new(),
                String::new(),
                invitee.id.to_string()
            ),
        ],
        "newest first"
    );
    assert!(rest.next_page_token.is_empty());
    // The ledger stays append-only with the new kinds.
    let update = sqlx::query("UPDATE bonus_ledger SET amount = 0 WHERE reason = 'redeemed'")
        .execute(&pool)
        .await;
    assert!(update.is_err(), "a redemption entry was changed");
}

#[sqlx::test]
async fn credits_do_not_wait_for_a_debits_row_lock(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 2).await;
    let (inviter, invitee) = (&all[0], &all[1]);
    // The lock a redemption holds from its balance check to its commit.
    let mut redemption = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(inviter.id)
        .execute(&mut *redemption)
        .await
        .unwrap();
    let credits = async {
        repository
            .activate(id(invitee), &crate::code(inviter))
            .await
            .unwrap();
        repository
            .move_points("svc", &request(PointsKind::Grant, inviter, 5, "g"))
            .await
            .unwrap();
    };
    tokio::time::timeout(Duration::from_secs(5), credits)
        .await
        .expect("an activation and a grant for the inviter went through meanwhile");
    // Another debit does wait, and goes on once the first ends.
    let debit = tokio::spawn({
        let repository = repository.clone();
        let request = request(PointsKind::Redeem, inviter, 5, "r");
        async move { repository.move_points("svc", &request).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !debit.is_finished(),
        "a second debit did not wait for the first"
    );
    redemption.rollback().await.unwrap();
    assert_eq!(debit.await.unwrap().unwrap().balance, 200);
    assert_eq!(repository.balance(id(inviter)).await.unwrap(), 200);
}

/// Whether `lock` ("FOR KEY SHARE", "FOR NO KEY UPDATE") on the user's row is granted at once.
async fn row_lock_free(pool: &PgPool, user: &UserRecord, lock: &str) -> bool {
    let mut tx = pool.begin().await.unwrap();
    let result = sqlx::query(&format!("SELECT id FROM users WHERE id = $1 {lock} NOWAIT"))
        .bind(user.id)
        .execute(&mut *tx)
        .await;
    match result {
        Ok(_) => true,
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => false,
        Err(other) => panic!("{other:?}"),
    }
}

#[sqlx::test]
async fn a_redemption_in_progress_holds_a_lock_that_blocks_debits_only(pool: PgPool) {
    let repository = repository(&pool);
    let user = users(&repository, 1).await.remove(0);
    fund(&repository, &user, 100, 1).await;
    // Stop a real redemption at its counter update, after it took the user's row: every shard
    // of the user exists and is locked here.
    sqlx::query(
        "INSERT INTO user_counters (user_id, shard)
         SELECT $1, s FROM generate_series(0, 15) s ON CONFLICT DO NOTHING",
    )
    .bind(user.id)
    .execute(&pool)
    .await
    .unwrap();
    let mut shards = pool.begin().await.unwrap();
    sqlx::query("SELECT shard FROM user_counters WHERE user_id = $1 FOR UPDATE")
        .bind(user.id)
        .execute(&mut *shards)
        .await
        .unwrap();
    let redemption = tokio::spawn({
        let repository = repository.clone();
        let request = request(PointsKind::Redeem, &user, 30, "held");
        async move { repository.move_points("svc", &request).await }
    });
    lock_waiters(&pool, 1).await;
    assert!(
        !row_lock_free(&pool, &user, "FOR NO KEY UPDATE").await,
        "another debit would not wait"
    );
    assert!(
        row_lock_free(&pool, &user, "FOR KEY SHARE").await,
        "credits (activations, grants, foreign-key checks) would wait"
    );
    shards.commit().await.unwrap();
    assert_eq!(redemption.await.unwrap().unwrap().balance, 70);
    assert_eq!(ledger_and_counters(&pool, &user).await, (70, 70));
}

#[sqlx::test]
async fn pruning_keeps_keys_younger_than_a_day_and_drops_old_ones(pool: PgPool) {
    let repository = repository(&pool);
    let user = users(&repository, 1).await.remove(0);
    for (key, hours_ago) in [
        ("fresh", 1),
        ("yesterday", 23),
        ("day-and-a-half", 36),
        ("old", 49),
        ("older", 24 * 30),
    ] {
        repository
            .move_points("svc", &request(PointsKind::Grant, &user, 10, key))
            .await
            .unwrap();
        sqlx::query(
            "UPDATE points_requests SET created_at = now() - make_interval(hours => $1)
             WHERE idempotency_key = $2",
        )
        .bind(hours_ago)
        .bind(key)
        .execute(&pool)
        .await
        .unwrap();
    }
    // Bounded batches: one key per statement here.
    assert_eq!(
        repository
            .prune_points_requests(KEY_RETENTION, 1)
            .await
            .unwrap(),
        1
    );
    assert_eq!(repository.prune_idempotency_keys().await.unwrap(), 1);
    assert_eq!(repository.prune_idempotency_keys().await.unwrap(), 0);
    let mut kept: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM points_requests")
        .fetch_all(&pool)
        .await
        .unwrap();
    kept.sort();
    assert_eq!(kept, ["day-and-a-half", "fresh", "yesterday"]);
    // A kept key still replays; the ledger keeps every entry.
    let replay = repository
        .move_points("svc", &request(PointsKind::Grant, &user, 10, "yesterday"))
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(repository.balance(id(&user)).await.unwrap(), 50);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM bonus_ledger WHERE reason = 'granted'"
        )
        .await,
        5
    );
}
