//! Scale-out: two auth-service and two referral-service replicas sharing one Redis and one
//! Postgres database, calls spread round-robin over them. Every rule holds across replicas
//! exactly as on one, and a caller retrying UNAVAILABLE as `deploy/grpc-service-config.json`
//! tells it loses no call when a replica of each service is stopped under load.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::stack::bearer;
use e2e_tests::{ReplicaOptions, Replicas};
use refsys_proto::auth::v1::{
    IntrospectTokenRequest, RefreshTokensRequest, RefreshTokensResponse, SendCodeRequest,
    VerifyCodeRequest,
};
use refsys_proto::referral::v1::{
    ActivateInviteCodeRequest, GetProfileRequest, ListInviteesRequest, Profile,
};
use service_kit::retry::{RetryPolicy, never_processed};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// How one logical call went.
struct Outcome<T> {
    answer: Result<T, Status>,
    attempts: usize,
    /// Attempts the server never processed (retried at once).
    never_sent: usize,
}

/// One logical call as a round-robin caller with the published policy makes it: attempt `n`
/// goes to replica `(first + n) % replicas` (a load-balanced channel picks the next backend),
/// UNAVAILABLE is retried after the backoff, a call the server never processed at once (gRPC's
/// transparent retry, which tonic callers must do themselves), anything else is the answer.
async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    first: usize,
    replicas: usize,
    mut call: F,
) -> Outcome<T>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let max_attempts = usize::try_from(policy.max_attempts).expect("a few attempts");
    let (mut attempts, mut unsent) = (1, 0);
    loop {
        match call((first + attempts - 1) % replicas).await {
            Err(status) if never_processed(&status) && attempts < max_attempts => {
                unsent += 1;
                attempts += 1;
            }
            Err(status) if status.code() == Code::Unavailable && attempts < max_attempts => {
                let retry = u32::try_from(attempts).expect("a few attempts");
                tokio::time::sleep(policy.backoff(retry)).await;
                attempts += 1;
            }
            answer => {
                return Outcome {
                    answer,
                    attempts,
                    never_sent: unsent,
                };
            }
        }
    }
}

/// A request with `deadline` and, if given, a Bearer token.
fn within<T>(message: T, token: Option<&str>, deadline: Duration) -> tonic::Request<T> {
    let mut request = match token {
        Some(token) => bearer(message, token),
        None => tonic::Request::new(message),
    };
    request.set_timeout(deadline);
    request
}

#[track_caller]
fn reason_of(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"))
}

async fn profile(replicas: &Replicas, replica: usize, token: &str) -> Profile {
    replicas
        .referral_client(replica)
        .await
        .get_profile(bearer(GetProfileRequest {}, token))
        .await
        .unwrap_or_else(|status| panic!("GetProfile via referral {replica}: {status:?}"))
        .into_inner()
        .profile
        .expect("a profile")
}

#[tokio::test]
async fn send_limits_hold_across_auth_replicas() {
    let replicas = Replicas::start_with(ReplicaOptions {
        auth_env: vec![("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "4".to_owned())],
        ..ReplicaOptions::default()
    })
    .await;
    let auth = replicas.auth_clients().await;
    let send = |replica: usize, phone: &str| {
        let mut client = auth[replica].clone();
        let phone = phone.to_owned();
        async move {
            client
                .send_code(SendCodeRequest {
                    phone_number: phone,
                })
                .await
        }
    };

    // Both referral replicas migrated the one database at once: each migration ran once.
    let pool = replicas.database.connect().await;
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .expect("the migrations table");
    let files = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../referral-service/migrations"
    ))
    .expect("the migrations directory")
    .count();
    assert_eq!(applied.len(), files, "{applied:?}");
    assert!(applied.iter().all(|(_, success)| *success), "{applied:?}");

    // The per-phone cooldown: sent through A, refused through B.
    send(0, "+79601240001").await.expect("the first send");
    let status = send(1, "+79601240001")
        .await
        .expect_err("within the cooldown");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason_of(&status), "RESEND_COOLDOWN");
    let status = send(0, "+79601240001").await.expect_err("and through A");
    assert_eq!(reason_of(&status), "RESEND_COOLDOWN");

    // The client's hourly budget (4): counted in Redis, whichever replica sends.
    for (replica, phone) in [
        (1, "+79601240002"),
        (0, "+79601240003"),
        (1, "+79601240004"),
    ] {
        send(replica, phone)
            .await
            .unwrap_or_else(|status| panic!("{phone} via {replica}: {status:?}"));
    }
    for replica in [0, 1] {
        let status = send(replica, "+79601240005")
            .await
            .expect_err("the budget is spent");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason_of(&status), "CLIENT_SEND_LIMIT", "via {replica}");
    }
    assert_eq!(replicas.sms.messages().await.len(), 4, "exactly the budget");
}

#[tokio::test]
async fn a_code_sent_through_one_replica_verifies_through_the_other_exactly_once() {
    let replicas = Replicas::start().await;
    let auth = replicas.auth_clients().await;
    let verify = |replica: usize, phone: &str, code: &str| {
        let mut client = auth[replica].clone();
        let request = VerifyCodeRequest {
            phone_number: phone.to_owned(),
            code: code.to_owned(),
            invite_code: None,
        };
        async move { client.verify_code(request).await }
    };

    // Sent through A, verified through B (same pepper); then used up on both.
    let phone = "+79601240101";
    auth[0]
        .clone()
        .send_code(SendCodeRequest {
            phone_number: phone.to_owned(),
        })
        .await
        .expect("SendCode via A");
    let code = replicas
        .sms
        .latest_code(phone)
        .await
        .expect("code captured");
    let signed_in = verify(1, phone, &code)
        .await
        .expect("VerifyCode via B")
        .into_inner();
    assert!(signed_in.new_user);
    for replica in [0, 1] {
        let status = verify(replica, phone, &code)
            .await
            .expect_err("a code works once");
        assert_eq!(status.code(), Code::Unauthenticated, "via {replica}");
    }

    // Eight verifications of one code at once, half through each replica: one signs in. (The
    // others count as failures of this phone and client: ten would lock it for the day.)
    let phone = "+79601240102";
    auth[1]
        .clone()
        .send_code(SendCodeRequest {
            phone_number: phone.to_owned(),
        })
        .await
        .expect("SendCode via B");
    let code = replicas
        .sms
        .latest_code(phone)
        .await
        .expect("code captured");
    let attempts: Vec<_> = (0..8)
        .map(|i| tokio::spawn(verify(i % 2, phone, &code)))
        .collect();
    let mut signed_in = Vec::new();
    for attempt in attempts {
        match attempt.await.expect("the task finishes") {
            Ok(response) => signed_in.push(response.into_inner()),
            Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
        }
    }
    assert_eq!(signed_in.len(), 1, "exactly one verification succeeds");
    assert!(signed_in[0].new_user);
}

#[tokio::test]
async fn forty_parallel_activations_over_both_referral_replicas_are_exact() {
    let replicas = Replicas::start_with(ReplicaOptions {
        auth_env: vec![
            // 41 sign-ins from one address, in one block of numbers.
            ("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "1000".to_owned()),
            ("SMS_MAX_SENDS_PER_PREFIX_PER_HOUR", "1000".to_owned()),
        ],
        ..ReplicaOptions::default()
    })
    .await;
    let policy = Arc::new(RetryPolicy::PUBLISHED);
    let inviter = replicas.sign_in(0, 1, "+79601240200", None).await;
    let code = profile(&replicas, 0, &inviter.access_token)
        .await
        .invite_code;
    let mut invitees = Vec::new();
    for n in 1..=40 {
        // Sent through one auth replica, verified through the other.
        let phone = format!("+796012402{n:02}");
        invitees.push(replicas.sign_in(n % 2, (n + 1) % 2, &phone, None).await);
    }

    let referral = replicas.referral_clients().await;
    let start = Arc::new(tokio::sync::Barrier::new(invitees.len()));
    let activations: Vec<_> = invitees
        .iter()
        .enumerate()
        .map(|(i, invitee)| {
            let (referral, start, policy) = (referral.clone(), start.clone(), policy.clone());
            let (token, code) = (invitee.access_token.clone(), code.clone());
            tokio::spawn(async move {
                start.wait().await;
                with_retries(&policy, i, referral.len(), |replica| {
                    let mut client = referral[replica].clone();
                    let request = bearer(
                        ActivateInviteCodeRequest {
                            invite_code: code.clone(),
                        },
                        &token,
                    );
                    async move { client.activate_invite_code(request).await }
                })
                .await
            })
        })
        .collect();
    let mut retried = 0;
    for activation in activations {
        let outcome = activation.await.expect("the task finishes");
        let profile = outcome
            .answer
            .unwrap_or_else(|status| panic!("ActivateInviteCode: {status:?}"))
            .into_inner()
            .profile
            .expect("a profile");
        assert_eq!(profile.activated_invite_code, code);
        assert_eq!(profile.bonus_points, 100);
        retried += outcome.attempts - 1;
    }

    // Every replica tells the same: 40 invitees, 40 × 200 points; 100 to each invitee.
    for replica in [0, 1] {
        let mine = profile(&replicas, replica, &inviter.access_token).await;
        assert_eq!(mine.invitees_count, 40, "via {replica}");
        assert_eq!(mine.bonus_points, 40 * 200, "via {replica}");
        assert_eq!(mine.invitees.len(), 40, "via {replica}");
        let listed = referral[replica]
            .clone()
            .list_invitees(bearer(
                ListInviteesRequest {
                    page_size: 100,
                    page_token: String::new(),
                },
                &inviter.access_token,
            ))
            .await
            .expect("ListInvitees")
            .into_inner();
        let mut ids: Vec<_> = listed.invitees.iter().map(|i| i.user_id.clone()).collect();
        ids.sort();
        ids.dedup();
        let mut expected: Vec<_> = invitees.iter().map(|i| i.user_id.clone()).collect();
        expected.sort();
        assert_eq!(ids, expected, "via {replica}");
    }
    for (n, invitee) in invitees.iter().enumerate() {
        let theirs = profile(&replicas, (n + 1) % 2, &invitee.access_token).await;
        assert_eq!(theirs.bonus_points, 100);
        assert_eq!(theirs.invited_by_user_id, inviter.user_id);
    }

    // The connection budget held: no replica opened more than DATABASE_MAX_CONNECTIONS.
    let pool = replicas.database.connect().await;
    let (connections,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .expect("pg_stat_activity");
    let budget = i64::from(replicas.database_max_connections) * 2;
    assert!(
        connections <= budget,
        "{connections} connections for a budget of {budget}"
    );
    eprintln!("40 activations: {retried} retried; {connections} connections to the database");
}

#[tokio::test]
async fn tokens_and_refresh_families_are_shared_by_every_replica() {
    let grace = Duration::from_secs(2);
    let replicas = Replicas::start_with(ReplicaOptions {
        auth_env: vec![("REFRESH_REUSE_GRACE_SECONDS", grace.as_secs().to_string())],
        ..ReplicaOptions::default()
    })
    .await;
    let auth = replicas.auth_clients().await;

    // A token minted by either auth replica is accepted by every referral replica (each
    // fetched its JWKS from its own auth replica) and is active on every auth replica.
    let alice = replicas.sign_in(0, 0, "+79601240301", None).await;
    let bob = replicas.sign_in(1, 1, "+79601240302", None).await;
    for (who, signed_in) in [("alice (auth A)", &alice), ("bob (auth B)", &bob)] {
        for replica in [0, 1] {
            let mine = profile(&replicas, replica, &signed_in.access_token).await;
            assert_eq!(
                mine.user_id, signed_in.user_id,
                "{who} via referral {replica}"
            );
            let introspected = auth[replica]
                .clone()
                .introspect_token(IntrospectTokenRequest {
                    access_token: signed_in.access_token.clone(),
                })
                .await
                .expect("IntrospectToken")
                .into_inner();
            assert!(introspected.active, "{who} via auth {replica}");
        }
    }

    let refresh = |replica: usize, token: &str| {
        let mut client = auth[replica].clone();
        let request = RefreshTokensRequest {
            refresh_token: token.to_owned(),
        };
        async move {
            client
                .refresh_tokens(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let same_pair = |a: &RefreshTokensResponse, b: &RefreshTokensResponse| {
        a.refresh_token == b.refresh_token && a.access_token == b.access_token
    };

    // Rotated on A, replayed on B within the grace window: the same new pair.
    let rotated_at = Instant::now();
    let rotated = refresh(0, &alice.refresh_token)
        .await
        .expect("rotated on A");
    let replayed = refresh(1, &alice.refresh_token)
        .await
        .expect("a replay within the grace window");
    assert!(
        rotated_at.elapsed() < grace,
        "the replay was not within the window"
    );
    assert!(
        same_pair(&rotated, &replayed),
        "the replay gets the same pair"
    );
    // The new pair works everywhere.
    for replica in [0, 1] {
        profile(&replicas, replica, &rotated.access_token).await;
    }

    // Replayed on B after the window: reuse, and the whole family is gone — for A too.
    tokio::time::sleep(grace + Duration::from_millis(500)).await;
    let status = refresh(1, &alice.refresh_token)
        .await
        .expect_err("reuse after the window");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = refresh(0, &rotated.refresh_token)
        .await
        .expect_err("the family was revoked on every replica");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Bob's session (another family) is untouched, on either replica.
    let bob_rotated = refresh(0, &bob.refresh_token).await.expect("Bob on A");
    refresh(1, &bob_rotated.refresh_token)
        .await
        .expect("Bob on B");
}

/// What one load worker saw.
#[derive(Default)]
struct Tally {
    calls: usize,
    retried: usize,
    never_sent: usize,
    after_exit: usize,
    failures: Vec<String>,
}

#[tokio::test]
async fn sigterm_to_a_replica_of_each_service_loses_no_retried_call() {
    let mut replicas = Replicas::start().await;
    let policy = Arc::new(RetryPolicy::PUBLISHED);
    let auth = replicas.auth_clients().await;
    let referral = replicas.referral_clients().await;
    let mut sessions = Vec::new();
    for n in 0..8 {
        let phone = format!("+796012404{n:02}");
        sessions.push(replicas.sign_in(n % 2, (n + 1) % 2, &phone, None).await);
    }

    // Each worker alternates GetProfile (referral) and RefreshTokens (auth, which reads the
    // user's roles from its referral replica), round-robin over the replicas, retrying
    // UNAVAILABLE as the published policy says; it keeps its own session's refresh chain.
    let stop = Arc::new(AtomicBool::new(false));
    let exited = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(w, session)| {
            let (auth, referral, policy) = (auth.clone(), referral.clone(), policy.clone());
            let (stop, exited) = (stop.clone(), exited.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let (mut access, mut refresh) = (session.access_token, session.refresh_token);
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    let after_exit = exited.load(Ordering::Relaxed);
                    let (attempts, never_sent) = if n % 2 == 0 {
                        let outcome = with_retries(&policy, n / 2, referral.len(), |replica| {
                            let mut client = referral[replica].clone();
                            let request =
                                within(GetProfileRequest {}, Some(&access), Duration::from_secs(5));
                            async move { client.get_profile(request).await }
                        })
                        .await;
                        if let Err(status) = outcome.answer {
                            tally.failures.push(format!("GetProfile: {status:?}"));
                        }
                        (outcome.attempts, outcome.never_sent)
                    } else {
                        let outcome = with_retries(&policy, n / 2, auth.len(), |replica| {
                            let mut client = auth[replica].clone();
                            let request = within(
                                RefreshTokensRequest {
                                    refresh_token: refresh.clone(),
                                },
                                None,
                                Duration::from_secs(5),
                            );
                            async move { client.refresh_tokens(request).await }
                        })
                        .await;
                        match outcome.answer {
                            Ok(response) => {
                                let pair = response.into_inner();
                                (access, refresh) = (pair.access_token, pair.refresh_token);
                            }
                            Err(status) => {
                                tally.failures.push(format!("RefreshTokens: {status:?}"));
                            }
                        }
                        (outcome.attempts, outcome.never_sent)
                    };
                    tally.calls += 1;
                    tally.retried += usize::from(attempts > 1);
                    tally.never_sent += never_sent;
                    tally.after_exit += usize::from(after_exit);
                    n += 1;
                }
                (tally, refresh)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas.auth[0].terminate();
    replicas.referral[0].terminate();
    let (auth_exit, referral_exit) = {
        let (auth0, referral0) = (&mut replicas.auth[0], &mut replicas.referral[0]);
        tokio::join!(
            auth0.wait_exit(Duration::from_secs(20)),
            referral0.wait_exit(Duration::from_secs(20))
        )
    };
    exited.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(auth_exit.code(), Some(0), "{}", replicas.auth[0].logs());
    assert_eq!(
        referral_exit.code(),
        Some(0),
        "{}",
        replicas.referral[0].logs()
    );

    let mut total = Tally::default();
    let mut last_tokens = Vec::new();
    for worker in workers {
        let (tally, refresh) = worker.await.expect("the worker finishes");
        total.calls += tally.calls;
        total.retried += tally.retried;
        total.never_sent += tally.never_sent;
        total.after_exit += tally.after_exit;
        total.failures.extend(tally.failures);
        last_tokens.push(refresh);
    }
    let errors_logged: Vec<String> = replicas
        .auth
        .iter()
        .chain(&replicas.referral)
        .flat_map(|replica| {
            replica
                .logs()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|line| line.contains("ERROR") || line.contains("WARN"))
        .collect();
    assert!(
        total.failures.is_empty(),
        "{} of {} logical calls failed: {:#?}\nwarnings and errors the replicas logged:\n{}",
        total.failures.len(),
        total.calls,
        total.failures,
        errors_logged.join("\n")
    );
    assert!(total.calls > 100, "the load ran ({} calls)", total.calls);
    assert!(
        total.after_exit > 0,
        "calls ran on the survivors after the exits"
    );
    assert!(
        total.retried > 0,
        "round-robin callers did meet the stopped replicas"
    );
    // Every session's refresh chain is intact on the survivor: no retry looked like reuse.
    for token in last_tokens {
        auth[1]
            .clone()
            .refresh_tokens(RefreshTokensRequest {
                refresh_token: token,
            })
            .await
            .expect("the chain goes on");
    }
    eprintln!(
        "SIGTERM under load: {} logical calls, {} retried ({} attempts never sent), {} after the \
         exits, none lost",
        total.calls, total.retried, total.never_sent, total.after_exit
    );
}
