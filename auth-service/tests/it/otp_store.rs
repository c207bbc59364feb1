use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_service::client::ClientId;
use auth_service::error::{Limit, Rejection};
use auth_service::otp::{CodeLength, OtpCode, Pepper};
use auth_service::phone::PhoneNumber;
use auth_service::store::fraud::{FraudMode, FraudSettings};
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

/// A client address; `None` in the helpers below means this one.
const ME: &str = "192.0.2.1";

fn client(ip: Option<&str>) -> ClientId {
    ClientId::from_ip(ip.unwrap_or(ME).parse().unwrap())
}

fn is_rejected(outcome: &VerifyOutcome, why: Rejection) -> bool {
    matches!(outcome, VerifyOutcome::Rejected(w) if *w == why)
}

impl Fixture {
    async fn new(limits: OtpLimits) -> Self {
        Self::with_fraud(limits, FraudSettings::default()).await
    }

    async fn with_fraud(limits: OtpLimits, fraud: FraudSettings) -> Self {
        Self {
            store: OtpStore::new(redis().await, prefix(), limits, fraud, CALL_TIMEOUT),
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
            .begin_send(
                to,
                &crate::otp_store::client(client),
                &self.pepper.hash_code(to, code),
            )
            .await
            .unwrap()
    }

    async fn verify(&self, to: &PhoneNumber, code: &OtpCode) -> VerifyOutcome {
        self.verify_from(to, None, code).await
    }

    async fn verify_from(
        &self,
        to: &PhoneNumber,
        from: Option<&str>,
        code: &OtpCode,
    ) -> VerifyOutcome {
        self.store
            .verify(
                to,
                &crate::otp_store::client(from),
                &self.pepper.hash_code(to, code),
                None,
            )
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
    // Other clients are not affected.
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
        assert!(is_rejected(&f.verify(&to, &code).await, Rejection::NoCode));
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
    assert!(is_rejected(&f.verify(&to, &code).await, Rejection::NoCode));
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
    for _ in 0..4 {
        assert!(is_rejected(
            &f.verify(&to, &wrong_code(&old)).await,
            Rejection::Wrong
        ));
    }
    let_cooldown_expire().await;
    let (new, _) = f.send(&to, None).await;
    if new != old {
        assert!(is_rejected(&f.verify(&to, &old).await, Rejection::Wrong));
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
    for _ in 0..5 {
        assert!(is_rejected(&f.verify(&to, &wrong).await, Rejection::Wrong));
    }
    // Burned, even for the right code, and answered as if no code were pending.
    assert!(is_rejected(&f.verify(&to, &code).await, Rejection::NoCode));
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
            assert!(is_rejected(
                &f.verify(&to, &wrong_code(&code)).await,
                Rejection::Wrong
            ));
        }
        last = Some(code);
    }
    // Locked: even the right code of a live, unburned code is refused.
    match f
        .verify_from(&to, Some("198.51.100.77"), &last.unwrap())
        .await
    {
        VerifyOutcome::LockedOut {
            limit: Limit::PhoneDailyFailures,
            retry_after,
        } => assert_near(retry_after, Duration::from_secs(24 * 3600)),
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
    assert!(is_rejected(
        &f.verify(&to, &wrong_code(&code)).await,
        Rejection::Wrong
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
    assert!(is_rejected(&f.verify(&to, &code).await, Rejection::NoCode));
    assert!(is_rejected(
        &f.verify(&phone("+79601233018"), &code).await,
        Rejection::NoCode
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
    // While claimed, another verification is refused (and counted, like every refusal).
    assert!(is_rejected(&f.verify(&to, &code).await, Rejection::Busy));
    assert!(f.store.release(first).await.unwrap());
    let VerifyOutcome::Claimed(second) = f.verify(&to, &code).await else {
        panic!("released code not usable")
    };
    assert!(f.store.consume(second).await.unwrap());
    assert!(is_rejected(&f.verify(&to, &code).await, Rejection::NoCode));
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
                match store.verify(&to, &client(None), &hash, None).await.unwrap() {
                    VerifyOutcome::Claimed(claim) => store.consume(claim).await.unwrap(),
                    // The losers count as failures of this client, so past its cap for the
                    // phone they are locked out.
                    VerifyOutcome::Rejected(_) | VerifyOutcome::LockedOut { .. } => false,
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
    assert!(is_rejected(
        &f.verify_from(&to, Some("198.51.100.2"), &code).await,
        Rejection::NoCode
    ));
}

/// Sends a code to each of `phones` from its own client, so only the budgets under test count.
async fn send_many(f: &mut Fixture, phones: &[&str]) -> Vec<Result<(), Limit>> {
    let mut results = Vec::new();
    for (i, number) in phones.iter().enumerate() {
        let code = OtpCode::generate(&mut f.rng, CodeLength::default());
        let from = format!("198.51.100.{}", i + 1);
        results.push(match f.try_send(&phone(number), Some(&from), &code).await {
            SendAdmission::Admitted(_) => Ok(()),
            SendAdmission::Refused { limit, .. } => Err(limit),
        });
    }
    results
}

#[tokio::test]
async fn a_block_of_consecutive_numbers_has_its_own_budget() {
    let mut f = Fixture::new(OtpLimits {
        max_sends_per_prefix: 2,
        ..OtpLimits::default()
    })
    .await;
    let results = send_many(
        &mut f,
        &[
            "+79601230001",
            "+79601230002",
            "+79601239999",
            "+79601240000",
        ],
    )
    .await;
    assert_eq!(
        results,
        [Ok(()), Ok(()), Err(Limit::PrefixHourlySends), Ok(())]
    );
}

#[tokio::test]
async fn region_and_global_budgets_refuse_and_a_refusal_costs_nothing() {
    let mut f = Fixture::new(OtpLimits {
        max_sends_per_region: 2,
        max_sends_global: 3,
        ..OtpLimits::default()
    })
    .await;
    // RU, RU, RU (region full), KZ (global now 3), US (global full).
    let results = send_many(
        &mut f,
        &[
            "+79601230001",
            "+79161230001",
            "+79261230001",
            "+77011230001",
            "+16502530000",
        ],
    )
    .await;
    assert_eq!(
        results,
        [
            Ok(()),
            Ok(()),
            Err(Limit::RegionHourlySends),
            Ok(()),
            Err(Limit::GlobalHourlySends)
        ]
    );
    // The refused sends used nothing: the third RU number has no cooldown, its client can
    // still send, and the refused US number was not counted in the US region.
    let code = OtpCode::generate(&mut f.rng, CodeLength::default());
    let (limit, _) = refused(
        f.try_send(&phone("+79261230001"), Some("198.51.100.3"), &code)
            .await,
    );
    assert_eq!(limit, Limit::RegionHourlySends, "not cooldown, not client");
}

#[tokio::test]
async fn a_refusal_by_the_phone_gives_every_budget_back() {
    let mut f = Fixture::new(OtpLimits {
        max_sends_global: 2,
        ..OtpLimits::default()
    })
    .await;
    let to = phone("+79601233017");
    f.sent(&to, None).await;
    for _ in 0..10 {
        let code = OtpCode::generate(&mut f.rng, CodeLength::default());
        assert_eq!(
            refused(f.try_send(&to, None, &code).await).0,
            Limit::ResendCooldown
        );
    }
    // Ten cooldown refusals later, the global budget still has its second send.
    f.sent(&phone("+79601239999"), None).await;
}

#[tokio::test]
async fn parallel_sends_never_exceed_the_global_budget() {
    let f = Fixture::new(OtpLimits {
        max_sends_global: 10,
        ..OtpLimits::default()
    })
    .await;
    let store = Arc::new(f.store.clone());
    let pepper = Arc::new(f.pepper);
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50u32)
        .map(|i| {
            let (store, pepper, barrier) = (store.clone(), pepper.clone(), barrier.clone());
            tokio::spawn(async move {
                // Distinct blocks, clients and phones: only the global budget is shared.
                let to = phone(&format!("+7960{:03}0000", 100 + i));
                let from = client(Some(&format!("198.51.{i}.1")));
                let code = OtpCode::parse("1234", CodeLength::default()).unwrap();
                barrier.wait().await;
                match store
                    .begin_send(&to, &from, &pepper.hash_code(&to, &code))
                    .await
                    .unwrap()
                {
                    SendAdmission::Admitted(_) => true,
                    SendAdmission::Refused { limit, .. } => {
                        assert_eq!(limit, Limit::GlobalHourlySends);
                        false
                    }
                }
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += u32::from(task.await.unwrap());
    }
    assert_eq!(admitted, 10);
}

#[tokio::test]
async fn failures_are_capped_per_client_across_phones() {
    let mut f = Fixture::new(OtpLimits {
        max_failed_per_client: 3,
        ..OtpLimits::default()
    })
    .await;
    let attacker = Some("203.0.113.66");
    let mut codes = Vec::new();
    for n in 1..=4 {
        let to = phone(&format!("+7960123000{n}"));
        let code = f.sent(&to, Some("198.51.100.9")).await;
        codes.push((to, code));
    }
    for (to, code) in &codes[..3] {
        let outcome = f.verify_from(to, attacker, &wrong_code(code)).await;
        assert!(is_rejected(&outcome, Rejection::Wrong), "{outcome:?}");
    }
    // The fourth phone is refused before its code is looked at, even the right code.
    let (to, code) = &codes[3];
    match f.verify_from(to, attacker, code).await {
        VerifyOutcome::LockedOut {
            limit: Limit::ClientHourlyFailures,
            retry_after,
        } => assert_near(retry_after, Duration::from_secs(3600)),
        other => panic!("{other:?}"),
    }
    // Other clients are not affected, and successes never use the allowance.
    for (to, code) in &codes {
        assert!(matches!(
            f.verify_from(to, Some("198.51.100.9"), code).await,
            VerifyOutcome::Claimed(_)
        ));
    }
}

#[tokio::test]
async fn one_clients_guesses_never_lock_the_owner_out() {
    let mut f = Fixture::new(OtpLimits {
        max_failed_per_phone_per_client: 3,
        ..OtpLimits::default()
    })
    .await;
    let to = phone("+79601233017");
    let code = f.sent(&to, None).await;
    let attacker = Some("203.0.113.66");
    for _ in 0..3 {
        f.verify_from(&to, attacker, &wrong_code(&code)).await;
    }
    match f.verify_from(&to, attacker, &code).await {
        VerifyOutcome::LockedOut {
            limit: Limit::PhoneClientDailyFailures,
            retry_after,
        } => assert_near(retry_after, Duration::from_secs(24 * 3600)),
        other => panic!("{other:?}"),
    }
    // Three wrong tries did not burn the code (five do), and the owner signs in from home.
    assert!(matches!(
        f.verify_from(&to, Some("198.51.100.20"), &code).await,
        VerifyOutcome::Claimed(_)
    ));
}

#[tokio::test]
async fn the_phone_total_caps_every_client_together() {
    let mut f = Fixture::new(OtpLimits {
        max_failed_per_phone_per_client: 2,
        max_failed_per_phone: 4,
        ..OtpLimits::default()
    })
    .await;
    let to = phone("+79601233017");
    let code = f.sent(&to, None).await;
    for attacker in ["203.0.113.1", "203.0.113.2"] {
        for _ in 0..2 {
            f.verify_from(&to, Some(attacker), &wrong_code(&code)).await;
        }
    }
    assert!(matches!(
        f.verify_from(&to, Some("198.51.100.20"), &code).await,
        VerifyOutcome::LockedOut {
            limit: Limit::PhoneDailyFailures,
            ..
        }
    ));
}

#[tokio::test]
async fn guessing_without_a_pending_code_counts_the_same() {
    let f = Fixture::new(OtpLimits {
        max_failed_per_phone_per_client: 3,
        ..OtpLimits::default()
    })
    .await;
    let to = phone("+79601233017");
    let guess = OtpCode::parse("0000", CodeLength::default()).unwrap();
    for _ in 0..3 {
        assert!(is_rejected(&f.verify(&to, &guess).await, Rejection::NoCode));
    }
    assert!(matches!(
        f.verify(&to, &guess).await,
        VerifyOutcome::LockedOut {
            limit: Limit::PhoneClientDailyFailures,
            ..
        }
    ));
}

#[tokio::test]
async fn parallel_guesses_from_one_client_never_exceed_its_cap() {
    let f = Fixture::new(OtpLimits {
        max_failed_per_client: 5,
        ..OtpLimits::default()
    })
    .await;
    let store = Arc::new(f.store.clone());
    let pepper = Arc::new(f.pepper);
    let barrier = Arc::new(tokio::sync::Barrier::new(40));
    let tasks: Vec<_> = (0..40u32)
        .map(|i| {
            let (store, pepper, barrier) = (store.clone(), pepper.clone(), barrier.clone());
            tokio::spawn(async move {
                let to = phone(&format!("+7960123{i:04}"));
                let guess = OtpCode::parse("0000", CodeLength::default()).unwrap();
                barrier.wait().await;
                store
                    .verify(&to, &client(None), &pepper.hash_code(&to, &guess), None)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let (mut rejected, mut locked) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            VerifyOutcome::Rejected(_) => rejected += 1,
            VerifyOutcome::LockedOut {
                limit: Limit::ClientHourlyFailures,
                ..
            } => locked += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((rejected, locked), (5, 35));
}

#[tokio::test]
async fn a_test_numbers_fixed_code_verifies_any_number_of_times() {
    let f = Fixture::new(OtpLimits {
        max_failed_per_phone_per_client: 2,
        ..OtpLimits::default()
    })
    .await;
    let to = phone("+79990000001");
    let fixed = OtpCode::parse("4321", CodeLength::default()).unwrap();
    let fixed_hash = f.pepper.hash_code(&to, &fixed);
    let verify = |code: &str| {
        let code = OtpCode::parse(code, CodeLength::default()).unwrap();
        let hash = f.pepper.hash_code(&to, &code);
        let (store, to, fixed_hash) = (f.store.clone(), to.clone(), fixed_hash.clone());
        async move {
            store
                .verify(&to, &client(None), &hash, Some(&fixed_hash))
                .await
                .unwrap()
        }
    };
    for _ in 0..5 {
        assert!(matches!(
            verify("4321").await,
            VerifyOutcome::FixedCodeAccepted
        ));
    }
    // Guessing a test number's code is counted like any other guess.
    for _ in 0..2 {
        assert!(is_rejected(&verify("1111").await, Rejection::Wrong));
    }
    assert!(matches!(
        verify("4321").await,
        VerifyOutcome::LockedOut { .. }
    ));
}

fn at_minute(minute: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(29_000_000 * 60 + minute * 60)
}

#[tokio::test]
async fn the_conversion_guard_enforces_a_suspension_per_region() {
    let mut f = Fixture::with_fraud(
        OtpLimits::default(),
        FraudSettings {
            mode: FraudMode::Enforce,
            min_sends: 10,
            min_conversion: 0.5,
            ..FraudSettings::default()
        },
    )
    .await;
    let ru = phone("+79601233017");
    // 9 sends, 4 verified: not judged yet (fewer than 10 sends).
    for i in 0..9 {
        let standing = f
            .store
            .record_sent(&ru, at_minute(i))
            .await
            .unwrap()
            .unwrap();
        assert!(!standing.tripped);
    }
    for i in 0..4 {
        f.store.record_verified(&ru, at_minute(i)).await.unwrap();
    }
    // The tenth send: 4 / 10 < 0.5 trips the guard, once.
    let standing = f
        .store
        .record_sent(&ru, at_minute(9))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (standing.sends, standing.verified, standing.tripped),
        (10, 4, true)
    );
    let again = f
        .store
        .record_sent(&ru, at_minute(9))
        .await
        .unwrap()
        .unwrap();
    assert!(!again.tripped);
    // Sends to the region are refused, and cost nothing; other regions are not affected.
    let code = OtpCode::generate(&mut f.rng, CodeLength::default());
    match f.try_send(&ru, None, &code).await {
        SendAdmission::Refused {
            limit: Limit::FraudSuspected,
            retry_after,
        } => assert_near(retry_after, Duration::from_secs(3600)),
        other => panic!("{other:?}"),
    }
    f.sent(&phone("+77011230001"), None).await;
}

#[tokio::test]
async fn monitor_reports_but_never_refuses_and_the_window_slides() {
    let mut f = Fixture::with_fraud(
        OtpLimits::default(),
        FraudSettings {
            mode: FraudMode::Monitor,
            min_sends: 3,
            min_conversion: 0.5,
            ..FraudSettings::default()
        },
    )
    .await;
    let ru = phone("+79601233017");
    let trips: Vec<bool> = {
        let mut trips = Vec::new();
        for i in 0..3 {
            let standing = f
                .store
                .record_sent(&ru, at_minute(i))
                .await
                .unwrap()
                .unwrap();
            trips.push(standing.tripped);
        }
        trips
    };
    assert_eq!(trips, [false, false, true]);
    f.sent(&ru, None).await;
    // An hour after the first sends, they have left the window.
    let standing = f
        .store
        .record_sent(&ru, at_minute(61))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((standing.sends, standing.verified), (2, 0));
    let standing = f
        .store
        .record_sent(&ru, at_minute(63))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(standing.sends, 2, "minutes 61 and 63 only");
}

#[tokio::test]
async fn the_guard_off_counts_nothing() {
    let f = Fixture::with_fraud(
        OtpLimits::default(),
        FraudSettings {
            mode: FraudMode::Off,
            ..FraudSettings::default()
        },
    )
    .await;
    let ru = phone("+79601233017");
    assert_eq!(f.store.record_sent(&ru, at_minute(0)).await.unwrap(), None);
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
