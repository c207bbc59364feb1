//! Faults: stores going away and coming back, a service down mid-sign-in, SIGTERM under load.

use std::time::Duration;

use e2e_tests::stack::bearer;
use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::{SendCodeRequest, VerifyCodeRequest};
use refsys_proto::referral::v1::GetProfileRequest;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// A request with a 2 s deadline: a hang shows up as DEADLINE_EXCEEDED, not as a stuck test.
fn within_2s<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(2));
    request
}

async fn eventually<F, Fut>(what: &str, attempts: usize, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..attempts {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{what}: not within {attempts} attempts");
}

#[tokio::test]
async fn redis_outage_answers_unavailable_fast_and_recovers_without_restart() {
    let mut stack = Stack::start().await;
    let mut auth = stack.auth_client().await;
    let auth_pid = stack.auth.pid();

    stack.redis.stop();
    for phone in ["+79601230001", "+79601230002"] {
        let status = auth
            .send_code(within_2s(SendCodeRequest {
                phone_number: phone.into(),
            }))
            .await
            .expect_err("SendCode cannot work without Redis");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let status = auth
        .verify_code(within_2s(VerifyCodeRequest {
            phone_number: "+79601230001".into(),
            code: "1234".into(),
            invite_code: None,
        }))
        .await
        .expect_err("VerifyCode cannot work without Redis");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let auth_process = &stack.auth;
    eventually("readiness reports NOT_SERVING", 40, || async {
        auth_process.health("refsys.auth.v1.AuthService").await == Some(ServingStatus::NotServing)
    })
    .await;
    assert_eq!(
        stack.auth.health("").await,
        Some(ServingStatus::Serving),
        "liveness stays up"
    );

    stack.redis.resume().await;
    let client = auth.clone();
    eventually("SendCode works again", 40, || {
        let mut client = client.clone();
        async move {
            client
                .send_code(within_2s(SendCodeRequest {
                    phone_number: "+79601230003".into(),
                }))
                .await
                .is_ok()
        }
    })
    .await;
    stack.sign_in("+79601230004", None).await;
    let auth_process = &stack.auth;
    eventually("readiness reports SERVING", 40, || async {
        auth_process.health("refsys.auth.v1.AuthService").await == Some(ServingStatus::Serving)
    })
    .await;
    assert_eq!(stack.auth.pid(), auth_pid, "no restart was needed");
}

#[tokio::test]
async fn postgres_dropping_every_connection_is_survived() {
    let stack = Stack::start().await;
    let user = stack.sign_in("+79601230010", None).await;
    let mut referral = stack.referral_client().await;
    let pool = stack.database.connect().await;

    for _ in 0..3 {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&pool)
        .await
        .expect("connections are terminated");
        // At most the first call after the drop may fail, and then only as UNAVAILABLE.
        let mut ok = false;
        for _ in 0..5 {
            match referral
                .get_profile(bearer(GetProfileRequest {}, &user.access_token))
                .await
            {
                Ok(_) => {
                    ok = true;
                    break;
                }
                Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
            }
        }
        assert!(ok, "GetProfile never recovered");
    }
    // Sign-in (EnsureUser writes) works too.
    stack.sign_in("+79601230011", None).await;
}

#[tokio::test]
async fn referral_outage_during_verify_leaves_the_code_usable() {
    let mut stack = Stack::start().await;
    let mut auth = stack.auth_client().await;
    let phone = "+79601230020";
    auth.send_code(SendCodeRequest {
        phone_number: phone.into(),
    })
    .await
    .expect("SendCode");
    let code = stack.sms.latest_code(phone).await.expect("code captured");

    stack.referral.kill().await;
    let status = auth
        .verify_code(within_2s(VerifyCodeRequest {
            phone_number: phone.into(),
            code: code.clone(),
            invite_code: None,
        }))
        .await
        .expect_err("no user without referral-service");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    stack.referral.restart().await;
    let mut signed_in = None;
    for _ in 0..20 {
        match auth
            .verify_code(VerifyCodeRequest {
                phone_number: phone.into(),
                code: code.clone(),
                invite_code: None,
            })
            .await
        {
            Ok(response) => {
                signed_in = Some(response.into_inner());
                break;
            }
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(status) => panic!("the retry failed: {status:?}"),
        }
    }
    assert!(
        signed_in
            .expect("the same code works once referral-service is back")
            .new_user
    );
    let status = auth
        .verify_code(VerifyCodeRequest {
            phone_number: phone.into(),
            code,
            invite_code: None,
        })
        .await
        .expect_err("and only once");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn sigterm_under_load_completes_in_flight_calls_and_exits_0() {
    // The access log lets the test compare what the server finished with what callers got.
    let mut stack = Stack::start_with(StackOptions {
        referral_env: vec![("RUST_LOG", "info,refsys::rpc=debug".to_owned())],
        ..StackOptions::default()
    })
    .await;
    let user = stack.sign_in("+79601230030", None).await;
    let client = stack.referral_client().await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let mut client = client.clone();
        let token = user.access_token.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let result = client
                    .get_profile(bearer(GetProfileRequest {}, &token))
                    .await;
                outcomes.push(result.map(|_| ()).map_err(|status| status.code()));
                if outcomes.last().is_some_and(Result::is_err) {
                    break;
                }
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.referral.terminate();
    let status = stack.referral.wait_exit(Duration::from_secs(20)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(status.code(), Some(0), "{}", stack.referral.logs());

    let mut answered = 0;
    for worker in workers {
        for outcome in worker.await.expect("worker finishes") {
            match outcome {
                Ok(()) => answered += 1,
                // Calls sent after the server stopped taking new streams are refused unstarted.
                Err(code) => assert!(
                    matches!(code, Code::Unavailable | Code::Cancelled),
                    "unexpected {code:?}"
                ),
            }
        }
    }
    assert!(answered > 16, "the load ran ({answered} calls)");
    let logs = stack.referral.logs();
    let finished_by_server = logs
        .lines()
        .filter(|l| {
            l.contains("rpc completed") && l.contains("GetProfile") && l.contains(r#""code":"OK""#)
        })
        .count();
    assert_eq!(
        finished_by_server, answered,
        "every call the server finished reached its caller: none was cut"
    );
    assert!(!logs.contains("did not finish within the grace period"));
    let not_serving = logs.find("NOT_SERVING").expect("shutdown was logged");
    let stopped = logs
        .find("server stopped")
        .expect("the server stopped cleanly");
    assert!(not_serving < stopped);
}

#[tokio::test]
async fn auth_service_started_before_redis_waits_for_it() {
    let mut stack = Stack::start().await;
    stack.redis.stop();
    // restart() fails the test if the process exits before it reports SERVING.
    let redis = &mut stack.redis;
    tokio::join!(stack.auth.restart(), async {
        // Longer than one connection attempt (3 s with its own retries).
        tokio::time::sleep(Duration::from_secs(5)).await;
        redis.resume().await;
    });
    assert!(stack.auth.logs().contains("Redis is not reachable yet"));
    stack.sign_in("+79601230070", None).await;
}

#[tokio::test]
async fn postgres_out_of_reach_answers_unavailable_fast_and_readiness_follows() {
    let stack = Stack::start_with(StackOptions {
        proxy_postgres: true,
        ..StackOptions::default()
    })
    .await;
    let user = stack.sign_in("+79601230090", None).await;
    let mut referral = stack.referral_client().await;
    let proxy = stack.postgres_proxy.as_ref().expect("proxied");

    proxy.cut().await;
    // Within the 5 s deadline: the pool's 3 s acquire timeout answers, it does not hang.
    let mut request = bearer(GetProfileRequest {}, &user.access_token);
    request.set_timeout(Duration::from_secs(5));
    let status = referral
        .get_profile(request)
        .await
        .expect_err("no profile without Postgres");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let process = &stack.referral;
    eventually("readiness reports NOT_SERVING", 40, || async {
        process.health("refsys.referral.v1.ReferralService").await
            == Some(ServingStatus::NotServing)
    })
    .await;
    assert_eq!(
        process.health("").await,
        Some(ServingStatus::Serving),
        "liveness stays up"
    );

    proxy.restore();
    let client = referral.clone();
    let token = user.access_token.clone();
    eventually("GetProfile works again", 40, || {
        let (mut client, token) = (client.clone(), token.clone());
        async move {
            client
                .get_profile(bearer(GetProfileRequest {}, &token))
                .await
                .is_ok()
        }
    })
    .await;
    eventually("readiness reports SERVING", 40, || async {
        process.health("refsys.referral.v1.ReferralService").await == Some(ServingStatus::Serving)
    })
    .await;
}
