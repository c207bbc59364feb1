use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_service::error::Limit;
use auth_service::otp::{CodeLength, OtpCode, Pepper};
use auth_service::phone::PhoneNumber;
use auth_service::store::otp::{
    OtpLimits, OtpStore, SendAdmission, SendReservation, VerifyOutcome,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::{phone, prefix, redis};

const CALL_TIMEOUT: Duration = Duration::from_secs(2);

struct Fixture {
    store: OtpStore,
    pepper: Pepper,
    rng: StdRng,
}

impl Fixture {
    async fn new(limits: OtpLimits) -> Self {
        Self {
            store: OtpStore::new(redis().await, prefix(), limits, CALL_TIMEOUT),
            pepper: Pepper::from_bytes(vec![7; 32]).unwrap(),
            rng: StdRng::seed_from_u64(42),
        }
    }

    /// Sends a new code to `to`; returns it and the reservation.
    async fn send(&mut self, to: &PhoneNumber, client: Option<&str>) -> (OtpCode, SendReservation) {
        let code = OtpCode::generate(&mut self.rng, CodeLength::default());
        match self.try_send(to, client, &code).await {
            SendAdmission::Admitted(reservation) => (code, reservation),
            SendAdmission::Refused { limit, retry_after } => {
                panic!("send refused: {limit:?} retry after {retry_after:?}")
            }
        }
    }

    /// Sends a new code to `to` whose SMS "went out".
    async fn sent(&mut self, to: &PhoneNumber, client: Option<&str>) -> OtpCode {
        self.send(to, client).await.0
    }

    async fn try_send(
        &self,
        to: &PhoneNumber,
        client: Option<&str>,
        code: &OtpCode,
    ) -> SendAdmission {
        self.store
            .begin_send(to, client, &self.pepper.hash_code(to, code))
            .await
            .unwrap()
    }

    async fn verify(&self, to: &PhoneNumber, code: &OtpCode) -> VerifyOutcome {
        self.store
            .verify(to, &self.pepper.hash_code(to, code))
            .await
            .unwrap()
    }
}

fn refused(admission: SendAdmission) -> (Limit, Duration) {
    match admission {
        SendAdmission::Refused { limit, retry_after } => (limit, retry_after),
        SendAdmission::Admitted(_) => panic!("send admitted"),
    }
}

fn wrong_code(code: &OtpCode) -> OtpCode {
    let flipped: String = code
        .expose()
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    OtpCode::parse(&flipped, CodeLength::default()).unwrap()
}

fn assert_near(actual: Duration, expected: Duration) {
    assert!(
        actual <= expected && actual + Duration::from_secs(5) >= expected,
        "retry-after {actual:?}, expected about {expected:?}"
    );
}

/// Limits with a cooldown short enough to step over by waiting for its TTL.
fn no_cooldown() -> OtpLimits {
    OtpLimits {
        resend_cooldown: Duration::from_millis(1),
        ..OtpLimits::default()
    }
}

async fn let_cooldown_expire() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}

#[tokio::test]
async fn resend_cooldown_refuses_with_retry_after() {
    let mut f = Fixture::new(OtpLimits::default()).await;
    let to = phone("+79601233017");
    let (_, reservation) = f.send(&to, None).await;
    assert_eq!(reservation.next_send_in, Duration::from_secs(60));
    assert_eq!(reservation.code_ttl, Duration::from_secs(300));
    let code = OtpCode::generate(&mut f.rng, CodeLength::default());
    let (limit, retry_after) = refused(f.try_send(&to, None, &code).await);
    assert_eq!(limit, Limit::ResendCooldown);
    assert_near(retry_after, Duration::from_secs(60));
    // Another phone is not affected.
    f.sent(&phone("+79601233018"), None).await;
}

#[tokio::test]
async fn phone_hourly_cap_refuses_the_sixth_send() {
    let mut f = Fixture::new(no_cooldown()).await;
    let to = phone("+79601233017");
    for _ in 0..5 {
        f.sent(&to, None).await;
        let_cooldown_expire().await;
    }
    let code = OtpCode::generate(&mut f.rng, CodeLength::default());
    let (limit, retry_after) = refused(f.try_send(&to, None, &code).await);
    assert_eq!(limit, Limit::PhoneHourlySends);
    assert_near(retry_after, Duration::from_secs(3600));
}

#[tokio::test]
async fn client_hourly_cap_spans_phones_and_phone_refusals_do_not_count() {
    let mut f = Fixture::new(OtpLimits {
        max_sends_per_client: 3,
        ..OtpLimits::default()
    })
    .await;
    let client = Some("203.0.113.9");
    let first = phone("+79601230001");
    f.sent(&first, client).await;
    // Refused by the phone's cooldown: must not use up the client's allowance.
    for _ in 0..5 {
        let code = OtpCode::generate(&mut f.rng, CodeLength::default());
        assert_eq!(
            refused(f.try_send(&first, client, &code).await).0,
            Limit::ResendCooldown
        );
    }
    f.sent(&phone("+79601230002"), client).await;
    f.sent(&phone("+79601230003"), client).await;
    let code = OtpCode::generate(&mut f.rng, CodeLength::default());
    let (limit, retry_after) = refused(f.try_send(&phone("+79601230004"), client, &code).await);
    assert_eq!(limit, Limit::ClientHourlySends);
    assert_near(retry_after, Duration::from_secs(3600));
    // Other clients, and sends without a client, are not affected.
    f.sent(&phone("+79601230005"), Some("203.0.113.10")).await;
    f.sent(&phone("+79601230006"), None).await;
}

#[tokio::test]
async fn rollback_after_sms_failure_does_not_count() {
    let mut f = Fixture::new(OtpLimits {
        max_sends_per_phone: 1,
        max_sends_per_client: 1,
        ..OtpLimits::default()
    })
    .await;
    let to = phone("+79601233017");
    let client = Some("198.51.100.1");
    for _ in 0..3 {
        let (code, reservation) = f.send(&to, client).await;
        f.store.rollback_send(reservation).await.unwrap();
        // The code of a failed send is gone.
        assert!(matches!(f.verify(&to, &code).await, VerifyOutcome::NoCode));
    }
    // Neither the cooldown nor either cap was used up.
    let (code, _) = f.send(&to, client).await;
    assert!(matches!(
        f.verify(&to, &code).await,
        VerifyOutcome::Claimed(_)
    ));
}

#[tokio::test]
async fn right_code_works_once() {
    let mut f = Fixture::new(OtpLimits::default()).await;
    let to = phone("+79601233017");
    let (code, _) = f.send(&to, None).await;
    let VerifyOutcome::Claimed(claim) = f.verify(&to, &code).await else {
        panic!("right code refused")
    };
    assert_eq!(claim.phone(), &to);
    assert!(f.store.consume(claim).await.unwrap());
    assert!(matches!(f.verify(&to, &code).await, VerifyOutcome::NoCode));
    // Nothing is pending any more: signing in again needs no cooldown wait.
    let (again, _) = f.send(&to, None).await;
    assert!(matches!(
        f.verify(&to, &again).await,
        VerifyOutcome::Claimed(_)
    ));
    // ...but a pending code still has its cooldown.
    let (limit, _) = refused(f.try_send(&to, None, &again).await);
    assert_eq!(limit, Limit::ResendCooldown);
}

#[tokio::test]
async fn a_new_send_replaces_the_code_and_resets_attempts() {
    let mut f = Fixture::new(no_cooldown()).await;
    let to = phone("+79601233017");
    let (old, _) = f.send(&to, None).await;
    for left in [4, 3] {
        assert!(matches!(
            f.verify(&to, &wrong_code(&old)).await,
            VerifyOutcome::Wrong { attempts_left } if attempts_left == left
        ));
    }
    let_cooldown_expire().await;
    let (new, _) = f.send(&to, None).await;
    if new != old {
        assert!(matches!(
            f.verify(&to, &old).await,
            VerifyOutcome::Wrong { attempts_left: 4 }
        ));
    }
    assert!(matches!(
        f.verify(&to, &new).await,
        VerifyOutcome::Claimed(_)
    ));
}

#[tokio::test]
async fn five_wrong_tries_burn_the_code() {
    let mut f = Fixture::new(OtpLimits::default()).await;
    let to = phone("+79601233017");
    let (code, _) = f.send(&to, None).await;
    let wrong = wrong_code(&code);
    for left in (0..5).rev() {
        match f.verify(&to, &wrong).await {
            VerifyOutcome::Wrong { attempts_left } => assert_eq!(attempts_left, left),
            other => panic!("{other:?}"),
        }
    }
    // Burned, even for the right code; a new code may be sent when the cooldown ends.
    match f.verify(&to, &code).await {
        VerifyOutcome::Burned { retry_after } => assert_near(retry_after, Duration::from_secs(60)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn daily_failures_lock_the_phone_across_codes() {
    let mut f = Fixture::new(OtpLimits {
        max_attempts: 2,
        max_failed_per_phone: 5,
        ..no_cooldown()
    })
    .await;
    let to = phone("+79601233017");
    // 2 + 2 + 1 failures over three codes; the third code itself is not burned.
    let mut last = None;
    for tries in [2, 2, 1] {
        let_cooldown_expire().await;
        let (code, _) = f.send(&to, None).await;
        for _ in 0..tries {
            assert!(matches!(
                f.verify(&to, &wrong_code(&code)).await,
                VerifyOutcome::Wrong { .. }
            ));
        }
        last = Some(code);
    }
    // Locked: even the right code of a live, unburned code is refused.
    match f.verify(&to, &last.unwrap()).await {
        VerifyOutcome::LockedOut { retry_after } => {
            assert_near(retry_after, Duration::from_secs(24 * 3600))
        }
        other => panic!("locked phone verified: {other:?}"),
    }
    // No new code is sent while locked: it could not be used.
    let_cooldown_expire().await;
    let code = OtpCode::generate(&mut f.rng, CodeLength::default());
    let (limit, retry_after) = refused(f.try_send(&to, None, &code).await);
    assert_eq!(limit, Limit::PhoneDailyFailures);
    assert_near(retry_after, Duration::from_secs(24 * 3600));
    // Other phones are not affected.
    let other = phone("+79601233018");
    let (code, _) = f.send(&other, None).await;
    assert!(matches!(
        f.verify(&other, &code).await,
        VerifyOutcome::Claimed(_)
    ));
}

#[tokio::test]
async fn lockout_ends_when_its_window_passes() {
    let mut f = Fixture::new(OtpLimits {
        max_failed_per_phone: 1,
        failure_window: Duration::from_millis(300),
        ..OtpLimits::default()
    })
    .await;
    let to = phone("+79601233017");
    let (code, _) = f.send(&to, None).await;
    assert!(matches!(
        f.verify(&to, &wrong_code(&code)).await,
        VerifyOutcome::Wrong { .. }
    ));
    assert!(matches!(
        f.verify(&to, &code).await,
        VerifyOutcome::LockedOut { .. }
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        f.verify(&to, &code).await,
        VerifyOutcome::Claimed(_)
    ));
}

#[tokio::test]
async fn expired_code_is_gone() {
    let mut f = Fixture::new(OtpLimits {
        code_ttl: Duration::from_millis(200),
        ..OtpLimits::default()
    })
    .await;
    let to = phone("+79601233017");
    let (code, _) = f.send(&to, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(f.verify(&to, &code).await, VerifyOutcome::NoCode));
    assert!(matches!(
        f.verify(&phone("+79601233018"), &code).await,
        VerifyOutcome::NoCode
    ));
}

#[tokio::test]
async fn released_claim_leaves_the_code_usable() {
    let mut f = Fixture::new(OtpLimits::default()).await;
    let to = phone("+79601233017");
    let (code, _) = f.send(&to, None).await;
    let VerifyOutcome::Claimed(first) = f.verify(&to, &code).await else {
        panic!()
    };
    // While claimed, another verification is refused and does not count as a failure.
    assert!(matches!(f.verify(&to, &code).await, VerifyOutcome::Busy));
    assert!(f.store.release(first).await.unwrap());
    let VerifyOutcome::Claimed(second) = f.verify(&to, &code).await else {
        panic!("released code not usable")
    };
    assert!(f.store.consume(second).await.unwrap());
    assert!(matches!(f.verify(&to, &code).await, VerifyOutcome::NoCode));
}

#[tokio::test]
async fn an_expired_claim_lease_cannot_be_consumed_after_a_new_claim() {
    let mut f = Fixture::new(OtpLimits {
        claim_lease: Duration::from_millis(100),
        ..OtpLimits::default()
    })
    .await;
    let to = phone("+79601233017");
    let (code, _) = f.send(&to, None).await;
    let VerifyOutcome::Claimed(stale) = f.verify(&to, &code).await else {
        panic!()
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let VerifyOutcome::Claimed(fresh) = f.verify(&to, &code).await else {
        panic!("lease did not expire")
    };
    assert!(!f.store.consume(stale).await.unwrap());
    assert!(f.store.consume(fresh).await.unwrap());
}

#[tokio::test]
async fn sixteen_parallel_verifications_admit_exactly_one() {
    let mut f = Fixture::new(OtpLimits::default()).await;
    let to = phone("+79601233017");
    let (code, _) = f.send(&to, None).await;
    let hash = f.pepper.hash_code(&to, &code);
    let store = Arc::new(f.store.clone());
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (store, barrier, to, hash) =
                (store.clone(), barrier.clone(), to.clone(), hash.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                match store.verify(&to, &hash).await.unwrap() {
                    VerifyOutcome::Claimed(claim) => store.consume(claim).await.unwrap(),
                    VerifyOutcome::Busy | VerifyOutcome::NoCode => false,
                    other => panic!("{other:?}"),
                }
            })
        })
        .collect();
    let mut successes = 0;
    for task in tasks {
        successes += u32::from(task.await.unwrap());
    }
    assert_eq!(successes, 1);
    assert!(matches!(f.verify(&to, &code).await, VerifyOutcome::NoCode));
}

#[tokio::test]
async fn a_dead_redis_fails_fast() {
    // A server that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let started = Instant::now();
    let result =
        auth_service::store::connect(&format!("redis://{addr}"), Duration::from_millis(300)).await;
    assert!(result.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Nothing listening at all.
    let started = Instant::now();
    assert!(
        auth_service::store::connect("redis://127.0.0.1:1", Duration::from_millis(300))
            .await
            .is_err()
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}
