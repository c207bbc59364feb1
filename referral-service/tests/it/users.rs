use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use referral_service::domain::{InviteCode, PhonePrefix};
use referral_service::error::ReferralError;
use referral_service::storage::Repository;
use sqlx::PgPool;

use crate::{BONUSES, id, pepper, phone, repository, users};

#[sqlx::test]
async fn concurrent_first_sign_ins_of_one_phone_make_one_user(pool: PgPool) {
    let repository = repository(&pool);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let repository = repository.clone();
        tasks.push(tokio::spawn(async move {
            repository.ensure_user(&phone(1)).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for task in tasks {
        let (user, was_created) = task.await.unwrap().unwrap();
        ids.insert(user.id);
        created += usize::from(was_created);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(created, 1);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[sqlx::test]
async fn a_new_user_is_answered_exactly_as_stored(pool: PgPool) {
    let repository = repository(&pool);
    let (created, new) = repository.ensure_user(&phone(1)).await.unwrap();
    assert!(new);
    let (found, new) = repository.ensure_user(&phone(1)).await.unwrap();
    assert!(!new);
    // Built from the insert's defaults rather than read back: it must match what is stored.
    assert_eq!(format!("{created:?}"), format!("{found:?}"));
    assert_eq!(
        format!("{created:?}"),
        format!("{:?}", repository.user(id(&created)).await.unwrap())
    );
}

#[sqlx::test]
async fn an_invite_code_collision_is_retried_with_a_new_code(pool: PgPool) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    // The first two codes handed out are the same; the third differs.
    let repository = Repository::with_code_generator(
        pool.clone(),
        BONUSES,
        pepper(),
        Arc::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            InviteCode::parse(if n < 2 { "AAAAAA" } else { "BBBBBB" }).unwrap()
        }),
    );
    let first = repository.ensure_user(&phone(1)).await.unwrap().0;
    let second = repository.ensure_user(&phone(2)).await.unwrap().0;
    assert_eq!(first.invite_code, "AAAAAA");
    assert_eq!(second.invite_code, "BBBBBB");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[sqlx::test]
async fn generated_invite_codes_are_well_formed_and_unique(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 50).await;
    let codes: std::collections::HashSet<_> = all.iter().map(|u| u.invite_code.clone()).collect();
    assert_eq!(codes.len(), 50);
    for code in &codes {
        assert_eq!(InviteCode::parse(code).unwrap().as_str(), code);
    }
}

#[sqlx::test]
async fn admin_list_filters_by_prefix_and_pages(pool: PgPool) {
    let repository = repository(&pool);
    users(&repository, 7).await;
    repository
        .ensure_user(&referral_service::domain::PhoneNumber::parse("+447911123456", None).unwrap())
        .await
        .unwrap();
    let prefix = PhonePrefix::parse("+7960").unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = repository
            .users(prefix.as_ref(), cursor.as_ref(), 3)
            .await
            .unwrap();
        seen.extend(page.items.iter().map(|u| u.phone_number.clone()));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
    assert!(seen.iter().all(|p| p.starts_with("+7960")));
    assert!(PhonePrefix::parse("+79%").is_err());
}

#[sqlx::test]
async fn granting_admin_adds_the_role_once(pool: PgPool) {
    let repository = repository(&pool);
    let user = users(&repository, 1).await.remove(0);
    assert!(repository.grant_admin(&phone(0)).await.unwrap());
    assert!(repository.grant_admin(&phone(0)).await.unwrap());
    assert_eq!(
        repository.user(id(&user)).await.unwrap().roles,
        vec!["admin".to_owned()]
    );
    assert!(!repository.grant_admin(&phone(9)).await.unwrap());
}

#[sqlx::test]
async fn revoking_admin_takes_the_role_away(pool: PgPool) {
    let repository = repository(&pool);
    let user = users(&repository, 1).await.remove(0);
    assert_eq!(repository.revoke_admin(&phone(0)).await, Ok(Some(false)));
    assert!(repository.grant_admin(&phone(0)).await.unwrap());
    assert_eq!(repository.revoke_admin(&phone(0)).await, Ok(Some(true)));
    assert!(repository.user(id(&user)).await.unwrap().roles.is_empty());
    assert_eq!(repository.revoke_admin(&phone(0)).await, Ok(Some(false)));
    assert_eq!(repository.revoke_admin(&phone(9)).await, Ok(None));
}

/// `referral-service admin grant|revoke <phone>`, the real binary against this test's database.
#[sqlx::test]
async fn admin_grant_and_revoke_commands(pool: PgPool) {
    let repository = repository(&pool);
    let user = users(&repository, 1).await.remove(0);
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_referral-service"))
            .args(args)
            .env(
                "DATABASE_URL",
                format!("postgres://postgres@127.0.0.1:5432/{database}"),
            )
            .env("RUST_LOG", "warn")
            .output()
            .expect("the binary runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let roles = || async { repository.user(id(&user)).await.unwrap().roles };

    let number = phone(0).e164().to_owned();
    assert_eq!(run(&["admin", "grant", &number]).0, Some(0));
    assert_eq!(roles().await, ["admin"]);
    assert_eq!(run(&["admin", "revoke", &number]).0, Some(0));
    assert!(roles().await.is_empty());
    assert_eq!(
        run(&["admin", "revoke", &number]).0,
        Some(0),
        "not an admin: done"
    );

    let (code, stderr) = run(&["admin", "revoke", phone(9).e164()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no user has the phone number"), "{stderr}");
    assert!(!stderr.contains(phone(9).e164()), "masked: {stderr}");
    let (code, stderr) = run(&["admin", "revoke", "not-a-phone"]);
    assert_eq!(code, Some(1), "{stderr}");
    let (code, stderr) = run(&["admin", "revoke"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("admin revoke <phone>"), "{stderr}");
}

#[sqlx::test]
async fn profile_fields_update_only_what_is_given(pool: PgPool) {
    let repository = repository(&pool);
    let user = users(&repository, 1).await.remove(0);
    repository
        .update_fields(id(&user), Some("Ada"), None, Some("ada@example.com"))
        .await
        .unwrap();
    repository
        .update_fields(id(&user), None, Some("Lovelace"), None)
        .await
        .unwrap();
    let after = repository.user(id(&user)).await.unwrap();
    assert_eq!(
        (
            after.first_name.as_str(),
            after.last_name.as_str(),
            after.email.as_str()
        ),
        ("Ada", "Lovelace", "ada@example.com")
    );
}

#[sqlx::test]
async fn the_pool_recovers_after_postgres_drops_every_connection(pool: PgPool) {
    let options = (*pool.connect_options()).clone();
    let own_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(std::time::Duration::from_secs(3))
        .connect_with(options)
        .await
        .unwrap();
    let repository = Repository::new(own_pool, BONUSES, pepper());
    let user = repository.ensure_user(&phone(1)).await.unwrap().0;
    for _ in 0..3 {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&pool)
        .await
        .unwrap();
        let mut recovered = false;
        for _ in 0..3 {
            match repository.user(id(&user)).await {
                Ok(_) => {
                    recovered = true;
                    break;
                }
                Err(err) => assert!(matches!(err, ReferralError::Unavailable(_)), "{err:?}"),
            }
        }
        assert!(recovered, "the pool did not recover");
    }
}

#[sqlx::test]
async fn a_request_that_finds_no_free_connection_is_unavailable_and_counted(pool: PgPool) {
    let own_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_millis(200))
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let repository = Repository::new(own_pool.clone(), BONUSES, pepper());
    let timeouts = || {
        let rendered = service_kit::metrics::render();
        rendered
            .lines()
            .find_map(|line| line.strip_prefix("refsys_db_pool_timeouts_total "))
            .unwrap_or_else(|| panic!("refsys_db_pool_timeouts_total missing in\n{rendered}"))
            .parse::<u64>()
            .unwrap()
    };
    let before = timeouts();
    let held = own_pool.acquire().await.unwrap();
    let err = repository.ensure_user(&phone(1)).await.unwrap_err();
    assert!(matches!(err, ReferralError::Unavailable(_)), "{err:?}");
    // Other tests of this binary may count too, never uncount.
    assert!(timeouts() > before);
    drop(held);
    repository.ensure_user(&phone(1)).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_not_internal() {
    // Nothing listens on port 1: every call fails at connect, within the acquire timeout.
    let pool = referral_service::storage::connect(
        "postgres://postgres@127.0.0.1:1/refsys",
        2,
        std::time::Duration::from_secs(1),
    )
    .await
    .expect("a lazy pool needs no database to be created");
    let repository = Repository::new(pool, BONUSES, pepper());
    let err = repository.ensure_user(&phone(1)).await.unwrap_err();
    assert!(matches!(err, ReferralError::Unavailable(_)), "{err:?}");
    assert!(!repository.is_reachable().await);
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::Unavailable);
}

#[sqlx::test]
async fn a_pooled_connection_that_died_while_idle_is_replaced_unseen(pool: PgPool) {
    let database = pool
        .connect_options()
        .get_database()
        .expect("the test database")
        .to_owned();
    let own = referral_service::storage::connect(
        &format!("postgres://postgres@127.0.0.1:5432/{database}"),
        1,
        std::time::Duration::from_secs(3),
    )
    .await
    .unwrap();
    let backend = || sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&own);
    let first = backend().await.unwrap();
    // The server ends the pooled connection while it sits idle (a restart, a failover, a
    // proxy's idle cut)...
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(first)
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    // ...and the next statement runs on a new connection instead of failing on the dead one.
    let second = backend()
        .await
        .expect("the dead connection is checked and replaced");
    assert_ne!(second, first);
}
