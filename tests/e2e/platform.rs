//! The internal platform API on the real pair, as an internal service uses it: a token from
//! IssueServiceToken, points moved through PointsService, and the changes followed through
//! EventService.WatchEvents — racing redemptions, parallel retries, a reused key, resuming
//! from a cursor, scopes on the stream and retention.

use std::collections::HashMap;
use std::time::Duration;

use e2e_tests::stack::bearer;
use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::IssueServiceTokenRequest;
use refsys_proto::referral::v1::event_service_client::EventServiceClient;
use refsys_proto::referral::v1::points_service_client::PointsServiceClient;
use refsys_proto::referral::v1::{
    self as pb, GetBalanceRequest, GrantPointsRequest, ListBonusTransactionsRequest,
    RedeemPointsRequest, WatchEventsRequest,
};
use tonic::Code;
use tonic::transport::Channel;

/// Two clients: "shop" spends and reads, "bank" only grants. Secrets and their SHA-256:
/// `printf %s <secret> | sha256sum`.
const SHOP_SECRET: &str = "e2e-shop-secret-7c1f3a9b5d2e8f40";
const SHOP_SHA256: &str = "b7592392554c16ac0726f9104ef37a1f23be14a517fe74777b0b3af0bf146927";
const BANK_SECRET: &str = "e2e-bank-secret-0000000000000000";

fn sha256_hex(text: &str) -> String {
    // The e2e crate has no hashing dependency; sha256sum is in coreutils.
    let output = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("sha256sum runs");
    String::from_utf8(output.stdout).unwrap()[..64].to_owned()
}

/// A stack with two service clients and their tokens (the monitoring test drives points with
/// it too).
pub(crate) struct Platform {
    pub(crate) stack: Stack,
    pub(crate) shop: String,
    pub(crate) bank: String,
    _dir: tempfile::TempDir,
}

impl Platform {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    async fn start_with(auth_env: &[(&'static str, &str)]) -> Self {
        Self::start_with_options(StackOptions::auth(auth_env)).await
    }

    pub(crate) async fn start_with_options(mut options: StackOptions) -> Self {
        assert_eq!(sha256_hex(SHOP_SECRET), SHOP_SHA256);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("clients.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"clients": [
                {{"id": "shop", "secret_sha256": "{SHOP_SHA256}",
                  "scopes": ["referral.points.read", "referral.points.redeem", "referral.events.read"]}},
                {{"id": "bank", "secret_sha256": "{}", "scopes": ["referral.points.grant"]}}]}}"#,
                sha256_hex(BANK_SECRET)
            ),
        )
        .unwrap();
        options
            .auth_env
            .push(("SERVICE_CLIENTS_FILE", path.display().to_string()));
        let stack = Stack::start_with(options).await;
        let auth = stack.auth_client().await;
        let token = |id: &'static str, secret: &'static str| {
            let mut auth = auth.clone();
            async move {
                auth.issue_service_token(IssueServiceTokenRequest {
                    client_id: id.to_owned(),
                    client_secret: secret.to_owned(),
                    scopes: vec![],
                })
                .await
                .expect("IssueServiceToken")
                .into_inner()
                .access_token
            }
        };
        let shop = token("shop", SHOP_SECRET).await;
        let bank = token("bank", BANK_SECRET).await;
        Self {
            stack,
            shop,
            bank,
            _dir: dir,
        }
    }

    pub(crate) async fn points(&self) -> PointsServiceClient<Channel> {
        PointsServiceClient::new(Stack::channel(&self.stack.referral).await)
    }

    async fn events(&self) -> EventServiceClient<Channel> {
        EventServiceClient::new(Stack::channel(&self.stack.referral).await)
    }

    async fn watch(
        &self,
        after: &str,
    ) -> Result<tonic::Streaming<pb::WatchEventsResponse>, tonic::Status> {
        self.events()
            .await
            .watch_events(bearer(
                WatchEventsRequest {
                    after_cursor: after.to_owned(),
                },
                &self.shop,
            ))
            .await
            .map(tonic::Response::into_inner)
    }
}

async fn take(stream: &mut tonic::Streaming<pb::WatchEventsResponse>, n: usize) -> Vec<pb::Event> {
    let mut events = Vec::new();
    while events.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(15), stream.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events arrived", events.len()))
            .expect("a healthy stream")
            .expect("an open stream");
        events.push(next.event.expect("an event"));
    }
    events
}

pub(crate) fn grant(user: &str, points: i64, key: &str) -> GrantPointsRequest {
    GrantPointsRequest {
        user_id: user.to_owned(),
        points,
        idempotency_key: key.to_owned(),
        reason: "welcome gift".to_owned(),
    }
}

#[tokio::test]
async fn an_internal_service_spends_points_exactly_and_follows_every_change() {
    let platform = Platform::start().await;
    let user = platform.stack.sign_in("+79601233101", None).await;
    let mut points = platform.points().await;

    points
        .grant_points(bearer(
            grant(&user.user_id, 1_000, "gift-1"),
            &platform.bank,
        ))
        .await
        .unwrap();
    // Twenty redemptions of 100 race for a balance of 1,000: exactly ten win.
    let attempts = (0..20).map(|i| {
        let mut points = points.clone();
        let request = bearer(
            RedeemPointsRequest {
                user_id: user.user_id.clone(),
                points: 100,
                idempotency_key: format!("order-{i}"),
                reason: format!("order {i}"),
            },
            &platform.shop,
        );
        async move { points.redeem_points(request).await }
    });
    let results = futures::future::join_all(attempts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 10);
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    }
    let balance = points
        .get_balance(bearer(
            GetBalanceRequest {
                user_id: user.user_id.clone(),
            },
            &platform.shop,
        ))
        .await
        .unwrap()
        .into_inner()
        .balance;
    assert_eq!(balance, 0);

    // Eight parallel retries of one grant: one entry, eight identical answers.
    let retries = (0..8).map(|_| {
        let mut points = points.clone();
        let request = bearer(grant(&user.user_id, 250, "gift-2"), &platform.bank);
        async move { points.grant_points(request).await.unwrap().into_inner() }
    });
    let answers = futures::future::join_all(retries).await;
    assert!(answers.iter().all(|a| *a == answers[0]));
    // The same key with another request is refused, never INTERNAL.
    let status = points
        .grant_points(bearer(grant(&user.user_id, 999, "gift-2"), &platform.bank))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // The user's ledger is exact: one grant of 1,000, ten redemptions, one grant of 250.
    let ledger = platform
        .stack
        .referral_client()
        .await
        .list_bonus_transactions(bearer(
            ListBonusTransactionsRequest {
                page_size: 100,
                ..Default::default()
            },
            &user.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .transactions;
    let mut amounts: Vec<i64> = ledger.iter().map(|t| t.amount).collect();
    amounts.sort_unstable();
    let mut expected = vec![-100; 10];
    expected.extend([250, 1_000]);
    assert_eq!(amounts, expected);

    // The stream has every change once: the sign-up, two grants, ten redemptions.
    let mut stream = platform.watch("").await.unwrap();
    let events = take(&mut stream, 13).await;
    let mut by_type: HashMap<&str, usize> = HashMap::new();
    for event in &events {
        *by_type.entry(event.r#type.as_str()).or_default() += 1;
        assert_eq!(event.subject, user.user_id);
    }
    assert_eq!(by_type["refsys.referral.user.created"], 1);
    assert_eq!(by_type["refsys.referral.points.granted"], 2);
    assert_eq!(by_type["refsys.referral.points.redeemed"], 10);
    let ids: std::collections::HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 13);
    // Live: a new change arrives on the open stream.
    platform.stack.sign_in("+79601233102", None).await;
    let live = take(&mut stream, 1).await;
    assert_eq!(live[0].r#type, "refsys.referral.user.created");

    // Reconnecting after the 5th event gives exactly what followed it.
    let mut resumed = platform.watch(&events[4].cursor).await.unwrap();
    let suffix = take(&mut resumed, 9).await;
    let expected: Vec<&str> = events[5..]
        .iter()
        .chain(&live)
        .map(|e| e.id.as_str())
        .collect();
    let got: Vec<&str> = suffix.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn the_stream_needs_its_scope_and_refuses_a_cursor_past_the_retention() {
    let mut platform = Platform::start().await;
    // "bank" holds only referral.points.grant; a user token is no service token.
    let user = platform.stack.sign_in("+79601233103", None).await;
    for token in [&platform.bank, &user.access_token] {
        let status = platform
            .events()
            .await
            .watch_events(bearer(WatchEventsRequest::default(), token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    platform.stack.sign_in("+79601233104", None).await;
    platform.stack.sign_in("+79601233105", None).await;
    let mut stream = platform.watch("").await.unwrap();
    let events = take(&mut stream, 3).await;
    drop(stream);

    // The first two events pass the 7-day retention; the restarted service prunes at start.
    let pool = platform.stack.database.connect().await;
    sqlx::query(
        "UPDATE outbox SET created_at = now() - interval '8 days'
         WHERE id IN (SELECT id FROM outbox ORDER BY tx, id LIMIT 2)",
    )
    .execute(&pool)
    .await
    .unwrap();
    platform.stack.referral.restart().await;
    let mut pruned = false;
    for _ in 0..50 {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        if left == 1 {
            pruned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pruned, "the restarted service pruned the old events");
    let status = platform.watch(&events[0].cursor).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // From the last pruned event on, nothing is missing.
    let mut from_horizon = platform.watch(&events[1].cursor).await.unwrap();
    assert_eq!(take(&mut from_horizon, 1).await[0].id, events[2].id);
}

#[tokio::test]
async fn the_stream_sees_each_change_once_while_sign_ups_commit_concurrently() {
    // Forty sign-ups from one test client: room for them under its send budget, and under its
    // failure cap, which reserves a slot for every verification in flight.
    let platform = Platform::start_with(&[
        ("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "100"),
        ("OTP_MAX_FAILED_PER_CLIENT_PER_HOUR", "100"),
    ])
    .await;
    let inviter = platform.stack.sign_in("+79601233200", None).await;
    let code = platform
        .stack
        .referral_client()
        .await
        .get_profile(bearer(pb::GetProfileRequest {}, &inviter.access_token))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap()
        .invite_code;
    let mut stream = platform.watch("").await.unwrap();
    assert_eq!(take(&mut stream, 1).await[0].subject, inviter.user_id);

    // Forty people sign up at once, each with the inviter's code, through the real sign-in.
    let sign_ups = (0..40).map(|i| {
        let (stack, code) = (&platform.stack, code.clone());
        async move {
            stack
                // One number per 10,000-number block, under the block budget.
                .sign_in(&format!("+7960{:03}0001", 200 + i), Some(&code))
                .await
                .user_id
        }
    });
    let (users, events) = tokio::join!(futures::future::join_all(sign_ups), take(&mut stream, 80));
    let users: std::collections::HashSet<String> = users.into_iter().collect();

    let ids: std::collections::HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 80, "each event once");
    let mut created = std::collections::HashSet::new();
    let mut activated = std::collections::HashSet::new();
    for event in &events {
        match &event.data {
            Some(pb::event::Data::UserCreated(c)) => {
                created.insert(c.user_id.clone());
            }
            Some(pb::event::Data::InviteActivated(a)) => {
                assert!(
                    created.contains(&a.invitee_user_id),
                    "activation before sign-up"
                );
                assert_eq!(a.inviter_user_id, inviter.user_id);
                assert_eq!((a.invitee_points, a.inviter_points), (100, 200));
                activated.insert(a.invitee_user_id.clone());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created, users);
    assert_eq!(activated, users);
}
