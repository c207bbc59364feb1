//! auth-service on a Redis Cluster (`REDIS_CLUSTER_URLS`, 3 primaries with a replica each, one
//! cluster per test from `scripts/redis-cluster`): the sign-in flow and its limits, refresh
//! rotation and reuse detection, keys spread over the primaries, and a primary killed under
//! load. The stack's private single Redis is stopped in each test: nothing may need it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::cluster::RedisCluster;
use e2e_tests::process::run_to_exit;
use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::auth::v1::{RefreshTokensRequest, SendCodeRequest, VerifyCodeRequest};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

/// auth-service (and referral-service) on `cluster`, with `env` on top. The private single
/// Redis the stack starts is stopped at once: with `REDIS_CLUSTER_URLS` set, `REDIS_URL` is
/// ignored.
async fn stack_on(cluster: &RedisCluster, env: &[(&'static str, &str)]) -> Stack {
    let mut auth_env = vec![cluster.env()];
    auth_env.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let mut stack = Stack::start_with(StackOptions {
        auth_env,
        ..StackOptions::default()
    })
    .await;
    stack.redis.stop();
    stack
}

fn limit_of(status: &Status) -> String {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"))
}

async fn send(auth: &mut AuthServiceClient<Channel>, phone: &str) -> Result<(), Status> {
    auth.send_code(SendCodeRequest {
        phone_number: phone.to_owned(),
    })
    .await
    .map(drop)
}

async fn refresh(auth: &mut AuthServiceClient<Channel>, token: &str) -> Result<String, Status> {
    auth.refresh_tokens(RefreshTokensRequest {
        refresh_token: token.to_owned(),
    })
    .await
    .map(|answer| answer.into_inner().refresh_token)
}

#[tokio::test]
async fn on_a_cluster_sign_in_send_limits_and_refresh_rotation_work() {
    let cluster = RedisCluster::start().await;
    let stack = stack_on(
        &cluster,
        &[
            ("OTP_RESEND_COOLDOWN_SECONDS", "1"),
            ("OTP_MAX_SENDS_PER_PHONE_PER_HOUR", "2"),
            ("REFRESH_REUSE_GRACE_SECONDS", "0"),
        ],
    )
    .await;
    let mut auth = stack.auth_client().await;

    // Sign-in: a code is sent, verified once, and a second use is refused.
    let phone = "+79601234001";
    let signed_in = stack.sign_in(phone, None).await;
    assert!(signed_in.new_user);
    let code = stack.sms.latest_code(phone).await.unwrap();
    let status = auth
        .verify_code(VerifyCodeRequest {
            phone_number: phone.into(),
            code,
            invite_code: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // The resend cooldown, then the hourly cap of a phone.
    let phone = "+79601234002";
    send(&mut auth, phone).await.unwrap();
    let status = send(&mut auth, phone).await.unwrap_err();
    assert_eq!(limit_of(&status), "RESEND_COOLDOWN");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    send(&mut auth, phone).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let status = send(&mut auth, phone).await.unwrap_err();
    assert_eq!(limit_of(&status), "PHONE_SEND_LIMIT");

    // Refresh rotation, and reuse of a rotated token (no grace) revoking the whole session.
    let second = refresh(&mut auth, &signed_in.refresh_token).await.unwrap();
    let third = refresh(&mut auth, &second).await.unwrap();
    for token in [&signed_in.refresh_token, &third] {
        let status = refresh(&mut auth, token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    // A new sign-in of the same user is a new session and works.
    let again = stack.sign_in("+79601234001", None).await;
    assert!(!again.new_user);
    refresh(&mut auth, &again.refresh_token).await.unwrap();

    // All of it lives in the cluster.
    let keys: u64 = cluster
        .keys_per_primary()
        .await
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert!(keys > 0);
    let logs = stack.auth.logs();
    assert!(logs.contains("connected to Redis"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test]
async fn on_a_cluster_keys_spread_over_the_primaries() {
    let cluster = RedisCluster::start().await;
    let stack = stack_on(&cluster, &[]).await;
    // Thirty phones in thirty blocks of numbers (a block has its own send budget).
    for n in 0..30 {
        stack.sign_in(&format!("+79601{n:02}3017"), None).await;
    }
    let counts = cluster.keys_per_primary().await;
    assert_eq!(counts.len(), 3, "{counts:?}");
    let holding = counts.iter().filter(|(_, keys)| *keys > 0).count();
    assert!(holding >= 2, "keys per primary: {counts:?}");
    // Keys of one phone sit together, on the primary serving their tag.
    let phone = "+79601003017";
    let owner = cluster
        .owner_of(&format!("refsys:auth:{{{phone}}}:sends"))
        .await;
    let mut node = cluster.node(owner).await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("refsys:auth:{{{phone}}}:*"))
        .query_async(&mut node)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no key of {phone} on its primary {owner}");
}

/// Start-up errors end up in log collectors: no seed's password may be in them.
#[tokio::test]
async fn bad_cluster_seeds_exit_2_with_one_line_and_no_password() {
    for (value, why) in [
        (
            "redis://:s3cret@10.0.0.1:6379,redis://:s3cret@10.0.0.2:notaport",
            "10.0.0.2:notaport",
        ),
        (
            "redis://:s3cret@10.0.0.1:6379,rediss://:s3cret@10.0.0.2:6379",
            "same scheme",
        ),
        ("redis://u:s3cret@10.0.0.1:6379/3", "database 0"),
    ] {
        let (status, output) =
            run_to_exit("auth-service", &[("REDIS_CLUSTER_URLS", value)], &[]).await;
        assert_eq!(status.code(), Some(2), "{value}: {output}");
        let lines: Vec<_> = output
            .lines()
            .filter(|line| line.contains("REDIS_CLUSTER_URLS"))
            .collect();
        assert_eq!(lines.len(), 1, "one line names the setting: {output}");
        assert!(lines[0].contains(why), "{value}: {output}");
        assert!(
            !output.contains("s3cret"),
            "the password is shown: {output}"
        );
    }
}

/// What one call answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Call {
    Send,
    Verify,
}

#[derive(Default)]
struct Outcomes {
    /// Every answer: when the call started, which call, what it answered.
    answers: Vec<(Instant, Call, Code)>,
    /// Every code sent: (phone, code, successful verifications so far).
    codes: Vec<(String, String, usize)>,
}

impl Outcomes {
    fn count(&mut self, started: Instant, call: Call, code: Code) {
        self.answers.push((started, call, code));
    }

    fn by_call(&self, since: Option<Instant>) -> HashMap<(Call, Code), usize> {
        let mut counts = HashMap::new();
        for (at, call, code) in &self.answers {
            if since.is_none_or(|since| *at >= since) {
                *counts.entry((*call, *code)).or_default() += 1;
            }
        }
        counts
    }
}

/// A deadline per call, so a hang shows up as DEADLINE_EXCEEDED rather than a stuck test.
fn within<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(5));
    request
}

/// Shared by the callers.
#[derive(Default)]
struct Load {
    /// Phones used so far.
    next: AtomicUsize,
    /// Sign-ins that succeeded so far.
    signed_in: AtomicUsize,
    stop: AtomicBool,
}

impl Load {
    /// Waits until `more` sign-ins than `since` have succeeded; panics after `within`.
    async fn wait_for(&self, since: usize, more: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let now = self.signed_in.load(Ordering::Relaxed);
            if now >= since + more {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "only {} sign-ins in {within:?}",
                now - since
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One caller: sign-ins of fresh phones, each code verified twice at once.
async fn caller(stack: Arc<Stack>, worker: usize, load: Arc<Load>) -> Outcomes {
    let (next, stop) = (&load.next, &load.stop);
    let mut auth = stack.auth_client().await;
    let mut out = Outcomes::default();
    while !stop.load(Ordering::Relaxed) {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let phone = format!("+79{}{:07}", 60 + worker, n);
        let started = Instant::now();
        let sent = auth
            .send_code(within(SendCodeRequest {
                phone_number: phone.clone(),
            }))
            .await;
        out.count(
            started,
            Call::Send,
            sent.as_ref().map_or_else(Status::code, |_| Code::Ok),
        );
        if sent.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let code = stack
            .sms
            .latest_code(&phone)
            .await
            .expect("the SMS went out");
        let verify = || {
            let mut auth = auth.clone();
            let (phone, code) = (phone.clone(), code.clone());
            async move {
                auth.verify_code(within(VerifyCodeRequest {
                    phone_number: phone,
                    code,
                    invite_code: None,
                }))
                .await
                .map_or_else(|status| status.code(), |_| Code::Ok)
            }
        };
        let started = Instant::now();
        let (a, b) = tokio::join!(verify(), verify());
        out.count(started, Call::Verify, a);
        out.count(started, Call::Verify, b);
        let accepted = usize::from(a == Code::Ok) + usize::from(b == Code::Ok);
        load.signed_in.fetch_add(accepted.min(1), Ordering::Relaxed);
        out.codes.push((phone, code, accepted));
    }
    out
}

/// How the victim primary goes.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// SIGKILL: its connections are reset, new ones refused.
    Crash,
    /// SIGSTOP: connections stay open and new ones are accepted, but nothing answers.
    Hang,
}

#[tokio::test]
async fn on_a_cluster_a_primary_killed_under_load_costs_only_unavailable_answers_and_heals() {
    primary_lost_under_load(Failure::Crash).await;
}

#[tokio::test]
async fn on_a_cluster_a_primary_hung_under_load_costs_only_unavailable_answers_and_heals() {
    primary_lost_under_load(Failure::Hang).await;
}

async fn primary_lost_under_load(failure: Failure) {
    let cluster = RedisCluster::start().await;
    let stack = Arc::new(
        stack_on(
            &cluster,
            &[
                ("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "1000000"),
                ("OTP_MAX_FAILED_PER_CLIENT_PER_HOUR", "1000000"),
                ("SMS_MAX_SENDS_PER_PREFIX_PER_HOUR", "1000000"),
                ("SMS_MAX_SENDS_PER_REGION_PER_HOUR", "100000000"),
                ("SMS_MAX_SENDS_PER_HOUR", "100000000"),
            ],
        )
        .await,
    );
    let auth_pid = stack.auth.pid();
    // The victim serves the budget every send goes through: until its replica takes over,
    // no code can be sent at all.
    let victim = cluster.owner_of("refsys:auth:{sms:all}:sends").await;
    let nodes = cluster.nodes().await;
    let victim_id = nodes
        .iter()
        .find(|node| node.port == victim)
        .map(|node| node.id.clone())
        .expect("the victim is known");
    let replica = nodes
        .iter()
        .find(|node| node.primary_id.as_ref() == Some(&victim_id))
        .map(|node| node.port)
        .unwrap_or_else(|| panic!("node {victim} has no replica: {nodes:?}"));

    let load = Arc::new(Load::default());
    let workers: Vec<_> = (0..6)
        .map(|worker| tokio::spawn(caller(stack.clone(), worker, load.clone())))
        .collect();
    let before_kill = load.wait_for(0, 10, Duration::from_secs(30)).await;

    let killed_at = Instant::now();
    match failure {
        Failure::Crash => cluster.kill(victim),
        Failure::Hang => cluster.freeze(victim),
    }
    cluster
        .wait_failover(victim, replica, Duration::from_secs(30))
        .await;
    let promoted_after = killed_at.elapsed();
    assert_eq!(cluster.primaries().await.len(), 3);
    assert_eq!(
        cluster.owner_of("refsys:auth:{sms:all}:sends").await,
        replica
    );

    // Healed without a restart: within a few seconds every sign-in works again.
    let healed_at = Instant::now();
    let mut auth = stack.auth_client().await;
    let mut healed = None;
    let mut probe = 0;
    while healed_at.elapsed() < Duration::from_secs(15) {
        let mut ok = true;
        for _ in 0..5 {
            probe += 1;
            ok &= auth
                .send_code(within(SendCodeRequest {
                    phone_number: format!("+7990{probe:07}"),
                }))
                .await
                .is_ok();
        }
        if ok {
            healed = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let healed = healed.unwrap_or_else(|| {
        panic!(
            "sends still fail 15 s after the failover:\n{}",
            stack.auth.logs()
        )
    });
    // More load after healing.
    let after_heal = load.signed_in.load(Ordering::Relaxed);
    load.wait_for(after_heal, 20, Duration::from_secs(30)).await;
    load.stop.store(true, Ordering::Relaxed);

    let mut all = Outcomes::default();
    for worker in workers {
        let out = worker.await.expect("caller finishes");
        all.answers.extend(out.answers);
        all.codes.extend(out.codes);
    }
    let by_call = all.by_call(None);
    eprintln!(
        "{failure:?}: promoted after {promoted_after:?}, calls healed {:?} later; \
         {} sign-ins ({before_kill} before the kill, {after_heal} until healed); answers: {by_call:?}",
        healed - healed_at,
        load.signed_in.load(Ordering::Relaxed),
    );

    // Only OK or UNAVAILABLE — and UNAUTHENTICATED for the second verification of a code, or
    // one whose claim a failed call left behind. Never INTERNAL, UNKNOWN or a hang.
    for ((call, code), n) in &by_call {
        let allowed = match call {
            Call::Send => matches!(code, Code::Ok | Code::Unavailable),
            Call::Verify => matches!(code, Code::Ok | Code::Unavailable | Code::Unauthenticated),
        };
        assert!(allowed, "{n} {call:?} calls answered {code:?}");
    }
    assert!(
        by_call.contains_key(&(Call::Send, Code::Unavailable)),
        "the outage was seen: {by_call:?}"
    );
    // Once healed, healed for good: every call started since works.
    for ((call, code), n) in all.by_call(Some(healed)) {
        assert!(
            code == Code::Ok || (call == Call::Verify && code == Code::Unauthenticated),
            "{n} {call:?} calls answered {code:?} after healing"
        );
    }
    // No code was accepted twice: not by the two verifications racing, nor by a later one.
    let mut auth = stack.auth_client().await;
    let mut accepted_in_sweep = 0;
    for (phone, code, accepted) in &all.codes {
        assert!(
            *accepted <= 1,
            "{phone}: a code was accepted {accepted} times"
        );
        let again = auth
            .verify_code(within(VerifyCodeRequest {
                phone_number: phone.clone(),
                code: code.clone(),
                invite_code: None,
            }))
            .await;
        if again.is_ok() {
            accepted_in_sweep += 1;
            assert_eq!(*accepted, 0, "{phone}: a used code was accepted again");
        }
    }
    let signed_in = by_call.get(&(Call::Verify, Code::Ok)).copied().unwrap_or(0);
    assert!(signed_in > 3, "sign-ins succeeded: {by_call:?}");
    eprintln!(
        "{} codes, {signed_in} accepted once, {accepted_in_sweep} first accepted by the sweep",
        all.codes.len()
    );

    assert_eq!(stack.auth.pid(), auth_pid, "auth-service was not restarted");
    assert_eq!(
        stack.auth.health("refsys.auth.v1.AuthService").await,
        Some(ServingStatus::Serving)
    );
    let logs = stack.auth.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}
