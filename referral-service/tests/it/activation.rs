use referral_service::domain::InviteCode;
use referral_service::error::ReferralError;
use referral_service::storage::InviteOutcome;
use sqlx::PgPool;

use crate::{code, id, repository, users};

#[sqlx::test]
async fn activation_awards_both_sides_once(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 2).await;
    let (inviter, invitee) = (&all[0], &all[1]);
    repository
        .activate(id(invitee), &code(inviter))
        .await
        .unwrap();

    let invitee_after = repository.user(id(invitee)).await.unwrap();
    let inviter_after = repository.user(id(inviter)).await.unwrap();
    assert_eq!(invitee_after.bonus_points, 100);
    assert_eq!(
        invitee_after.activated_invite_code.as_deref(),
        Some(inviter.invite_code.as_str())
    );
    assert_eq!(invitee_after.invited_by, Some(inviter.id));
    assert_eq!(
        (inviter_after.bonus_points, inviter_after.invitees_count),
        (200, 1)
    );

    let ledger = repository.ledger(id(inviter), None, 10).await.unwrap();
    assert_eq!(ledger.items.len(), 1);
    assert_eq!(ledger.items[0].counterpart_user_id, Some(invitee.id));
    assert_eq!(ledger.items[0].reason, "invitee_joined");
}

#[sqlx::test]
async fn activation_rules_are_enforced(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 3).await;
    assert_eq!(
        repository.activate(id(&all[0]), &code(&all[0])).await,
        Err(ReferralError::OwnCode)
    );
    assert_eq!(
        repository.activate(id(&all[0]), &code(&all[1])).await,
        Err(ReferralError::InviterJoinedLater)
    );
    assert_eq!(
        repository
            .activate(id(&all[1]), &InviteCode::parse("ZZZZZZ").unwrap())
            .await,
        Err(ReferralError::NotFound("invite code"))
    );
    repository
        .activate(id(&all[2]), &code(&all[0]))
        .await
        .unwrap();
    assert_eq!(
        repository.activate(id(&all[2]), &code(&all[1])).await,
        Err(ReferralError::AlreadyActivated)
    );
    assert_eq!(
        repository.activate(id(&all[2]), &code(&all[0])).await,
        Err(ReferralError::AlreadyActivated)
    );
    // Nothing was written for the refused attempts.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM bonus_ledger")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

#[sqlx::test]
async fn forty_parallel_activations_of_one_code_count_exactly(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 41).await;
    let inviter_code = code(&all[0]);
    let mut tasks = Vec::new();
    for invitee in &all[1..] {
        let repository = repository.clone();
        let (invitee, inviter_code) = (id(invitee), inviter_code.clone());
        tasks.push(tokio::spawn(async move {
            repository.activate(invitee, &inviter_code).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let inviter = repository.user(id(&all[0])).await.unwrap();
    assert_eq!((inviter.invitees_count, inviter.bonus_points), (40, 8000));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM bonus_ledger")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 80);
    let sum: i64 =
        sqlx::query_scalar("SELECT sum(amount)::bigint FROM bonus_ledger WHERE user_id = $1")
            .bind(inviter.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(sum, 8000, "the rollup agrees with the ledger");
}

#[sqlx::test]
async fn one_user_racing_eight_codes_activates_exactly_one(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 9).await;
    let racer = id(&all[8]);
    let mut tasks = Vec::new();
    for inviter in &all[..8] {
        let repository = repository.clone();
        let inviter_code = code(inviter);
        tasks.push(tokio::spawn(async move {
            repository.activate(racer, &inviter_code).await
        }));
    }
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => won += 1,
            Err(err) => assert_eq!(err, ReferralError::AlreadyActivated),
        }
    }
    assert_eq!(won, 1);
    let racer_after = repository.user(racer).await.unwrap();
    assert_eq!(racer_after.bonus_points, 100);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM bonus_ledger")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

#[sqlx::test]
async fn the_ledger_is_append_only(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 2).await;
    repository
        .activate(id(&all[1]), &code(&all[0]))
        .await
        .unwrap();
    for statement in [
        "UPDATE bonus_ledger SET amount = 1000000",
        "DELETE FROM bonus_ledger",
        "TRUNCATE bonus_ledger",
    ] {
        let result = sqlx::query(statement).execute(&pool).await;
        assert!(result.is_err(), "{statement} was allowed");
    }
}

#[sqlx::test]
async fn invitees_page_through_without_gaps_or_repeats(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 8).await;
    for invitee in &all[1..] {
        repository
            .activate(id(invitee), &code(&all[0]))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = repository
            .invitees(id(&all[0]), cursor.as_ref(), 3)
            .await
            .unwrap();
        pages += 1;
        seen.extend(page.items.iter().map(|i| i.id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<_> = all[1..].iter().map(|u| u.id).collect();
    assert_eq!(seen, expected, "earliest activation first, each once");

    let mut ledger_ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = repository
            .ledger(id(&all[0]), cursor.as_ref(), 2)
            .await
            .unwrap();
        ledger_ids.extend(page.items.iter().map(|e| e.id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(ledger_ids.len(), 7);
    assert!(ledger_ids.windows(2).all(|w| w[0] > w[1]), "newest first");
}

#[sqlx::test]
async fn sign_in_activation_reports_refusals_as_outcomes(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 3).await;
    let outcome = |result: Result<InviteOutcome, ReferralError>| result.unwrap();
    assert_eq!(
        outcome(repository.activate_at_sign_in(id(&all[1]), None).await),
        InviteOutcome::NotProvided
    );
    assert_eq!(
        outcome(
            repository
                .activate_at_sign_in(id(&all[1]), Some("  "))
                .await
        ),
        InviteOutcome::NotProvided
    );
    assert!(matches!(
        outcome(
            repository
                .activate_at_sign_in(id(&all[1]), Some("nope!"))
                .await
        ),
        InviteOutcome::Refused(ReferralError::InvalidArgument { .. })
    ));
    assert_eq!(
        outcome(
            repository
                .activate_at_sign_in(
                    id(&all[1]),
                    Some(&format!(" {} ", all[0].invite_code.to_lowercase()))
                )
                .await
        ),
        InviteOutcome::Applied
    );
    assert_eq!(
        outcome(
            repository
                .activate_at_sign_in(id(&all[0]), Some(&all[2].invite_code))
                .await
        ),
        InviteOutcome::Refused(ReferralError::InviterJoinedLater)
    );
}
