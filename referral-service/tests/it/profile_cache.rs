//! GetProfile's per-replica cache against the real Postgres: which changes notify whom, and how
//! stale a cached answer can be when the change comes from elsewhere (another replica, the
//! admin CLI), when it comes from the caller, and when the LISTEN connection is lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use referral_service::events::Notifier;
use referral_service::grpc::ReferralHandler;
use referral_service::points::{PointsKind, PointsRequest};
use referral_service::profile_cache::ProfileCache;
use referral_service::storage::{ProfileChanges, Repository, UserRecord};
use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::referral_service_server::ReferralService;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::grpc::as_user;
use crate::{code, id, phone, repository, users};

/// Far longer than any wait below: an answer that turns fresh did so through an invalidation.
const TTL: Duration = Duration::from_secs(600);
/// How long a notification may take to arrive on a loaded test machine.
const NOTIFICATION_LATENCY: Duration = Duration::from_secs(5);

/// The ids notified on `refsys_profiles` until `quiet` passes without one.
async fn notified(listener: &mut PgListener, quiet: Duration) -> HashSet<Uuid> {
    let mut ids = HashSet::new();
    while let Ok(Ok(notification)) = tokio::time::timeout(quiet, listener.recv()).await {
        ids.insert(notification.payload().parse().expect("a user id"));
    }
    ids
}

async fn profile_listener(pool: &PgPool) -> PgListener {
    let mut listener = PgListener::connect_with(pool).await.unwrap();
    listener.listen("refsys_profiles").await.unwrap();
    listener
}

fn points(user: &UserRecord, kind: PointsKind, key: &str) -> PointsRequest {
    PointsRequest::parse(kind, &user.id.to_string(), 10, key, "test").unwrap()
}

#[sqlx::test]
async fn every_change_a_profile_shows_notifies_each_user_who_sees_it(pool: PgPool) {
    let repository = repository(&pool);
    let users = users(&repository, 3).await;
    let (inviter, invitee, bystander) = (&users[0], &users[1], &users[2]);
    let mut listener = profile_listener(&pool).await;
    let quiet = Duration::from_millis(300);
    let set = |users: &[&UserRecord]| users.iter().map(|u| u.id).collect::<HashSet<_>>();

    repository
        .activate(id(invitee), &code(inviter))
        .await
        .unwrap();
    assert_eq!(
        notified(&mut listener, quiet).await,
        set(&[inviter, invitee]),
        "activation: the invitee's link, both balances, the inviter's list"
    );

    repository
        .update_profile(
            id(inviter),
            &ProfileChanges {
                first_name: Some("Ada"),
                last_name: None,
                email: None,
                invite_code: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(notified(&mut listener, quiet).await, set(&[inviter]));

    for kind in [PointsKind::Grant, PointsKind::Redeem] {
        repository
            .move_points("shop", &points(bystander, PointsKind::Grant, "g"))
            .await
            .unwrap();
        repository
            .move_points("shop", &points(bystander, kind, kind.as_str()))
            .await
            .unwrap();
        assert_eq!(notified(&mut listener, quiet).await, set(&[bystander]));
    }

    assert!(repository.grant_admin(&phone(2)).await.unwrap());
    assert_eq!(
        notified(&mut listener, quiet).await,
        set(&[bystander]),
        "the admin CLI's role change"
    );

    assert!(repository.delete_user(id(invitee)).await.unwrap());
    assert_eq!(
        notified(&mut listener, quiet).await,
        set(&[inviter, invitee]),
        "the inviter's list shows the deleted invitee without a number"
    );

    // Reads, and a failed write, notify nobody.
    repository.profile(id(inviter), 100).await.unwrap();
    let _ = repository.activate(id(bystander), &code(&users[1])).await;
    assert!(notified(&mut listener, quiet).await.is_empty());
}

struct Replica {
    handler: ReferralHandler,
    cache: Arc<ProfileCache>,
    /// Held: the listener task ends once nobody holds its notifier.
    _listener: Option<(Notifier, tokio::task::JoinHandle<()>)>,
}

/// A replica's GetProfile path: the handler, its cache and its LISTEN connection, as
/// `referral_service::serve` wires them.
async fn replica(pool: &PgPool) -> Replica {
    let cache = Arc::new(ProfileCache::new(TTL, 1000));
    let listener = Notifier::spawn(pool.clone(), Some(cache.clone()));
    let handler = ReferralHandler::with_profile_cache(
        Repository::clone(&repository(pool)),
        Some(cache.clone()),
    );
    let replica = Replica {
        handler,
        cache,
        _listener: Some(listener),
    };
    replica.wait_listening().await;
    replica
}

impl Replica {
    async fn profile(&self, user: &UserRecord) -> pb::Profile {
        crate::grpc::profile(&self.handler, user).await
    }

    /// Until the cache stores again: the listener is connected and listening.
    async fn wait_listening(&self) {
        let deadline = Instant::now() + NOTIFICATION_LATENCY;
        let id = Uuid::now_v7();
        loop {
            let ticket = self.cache.get(id, Instant::now()).unwrap_err();
            if self
                .cache
                .store(id, pb::Profile::default(), ticket, Instant::now())
            {
                return;
            }
            assert!(Instant::now() < deadline, "the listener never connected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads `user`'s profile until `fresh` holds; returns how long that took.
    async fn until(&self, user: &UserRecord, fresh: impl Fn(&pb::Profile) -> bool) -> Duration {
        let started = Instant::now();
        loop {
            if fresh(&self.profile(user).await) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < NOTIFICATION_LATENCY,
                "still stale after {NOTIFICATION_LATENCY:?} (the TTL is {TTL:?})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[sqlx::test]
async fn a_change_elsewhere_reaches_a_cached_profile_within_the_notification_latency(pool: PgPool) {
    let replica = replica(&pool).await;
    // Another replica (or the admin CLI): the same database, another process's writes.
    let elsewhere = repository(&pool);
    let users = users(&elsewhere, 2).await;
    let (inviter, invitee) = (&users[0], &users[1]);

    let before = replica.profile(inviter).await;
    assert_eq!(before.bonus_points, 0);
    assert_eq!(
        replica.profile(inviter).await,
        before,
        "served from the cache"
    );
    elsewhere
        .activate(id(invitee), &code(inviter))
        .await
        .unwrap();
    let took = replica
        .until(inviter, |p| p.bonus_points == 200 && p.invitees_count == 1)
        .await;
    println!("an activation elsewhere reached the inviter's cached profile in {took:?}");
    assert!(took < TTL);

    assert!(elsewhere.grant_admin(&phone(0)).await.unwrap());
    replica
        .until(inviter, |p| p.roles.iter().any(|r| r == "admin"))
        .await;

    assert!(elsewhere.delete_user(id(invitee)).await.unwrap());
    replica
        .until(inviter, |p| {
            p.invitees.len() == 1 && p.invitees[0].phone_number.is_empty()
        })
        .await;
}

#[sqlx::test]
async fn callers_read_their_own_changes_at_once(pool: PgPool) {
    // No LISTEN connection at all: only the handler's own invalidation can make this fresh.
    let cache = Arc::new(ProfileCache::new(TTL, 1000));
    cache.set_listening(true);
    let handler = ReferralHandler::with_profile_cache(
        Repository::clone(&repository(&pool)),
        Some(cache.clone()),
    );
    let replica = Replica {
        handler,
        cache,
        _listener: None,
    };
    let users = users(&repository(&pool), 2).await;
    let (inviter, invitee) = (&users[0], &users[1]);
    assert_eq!(replica.profile(invitee).await.bonus_points, 0);
    replica
        .handler
        .activate_invite_code(as_user(
            invitee,
            pb::ActivateInviteCodeRequest {
                invite_code: inviter.invite_code.as_str().to_owned(),
            },
        ))
        .await
        .unwrap();
    // No wait: the handler invalidated its own caller before answering.
    assert_eq!(replica.profile(invitee).await.bonus_points, 100);
    replica
        .handler
        .update_profile(as_user(
            invitee,
            pb::UpdateProfileRequest {
                profile: Some(pb::Profile {
                    first_name: "Grace".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["first_name".into()],
                }),
            },
        ))
        .await
        .unwrap();
    assert_eq!(replica.profile(invitee).await.first_name, "Grace");
}

#[sqlx::test]
async fn losing_the_listen_connection_drops_the_cache_and_stops_caching(pool: PgPool) {
    let replica = replica(&pool).await;
    let elsewhere = repository(&pool);
    let user = users(&elsewhere, 1).await.remove(0);
    assert_eq!(replica.profile(&user).await.bonus_points, 0);

    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(terminated, [true], "one LISTEN connection per replica");
    // Until the listener notices, the old answer may still be served: that window is the
    // time to notice a dead connection (here at once; a silent network loss takes as long as
    // TCP does, and the TTL bounds it).
    let deadline = Instant::now() + NOTIFICATION_LATENCY;
    while replica.cache.is_listening() {
        assert!(
            Instant::now() < deadline,
            "the lost connection went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A change nobody is told about while the connection is down: nothing may serve the
    // answer cached before it, neither now nor after the listener is back.
    elsewhere
        .move_points("shop", &points(&user, PointsKind::Grant, "lost"))
        .await
        .unwrap();
    assert_eq!(replica.profile(&user).await.bonus_points, 10);
    assert_eq!(replica.profile(&user).await.bonus_points, 10);
    replica.wait_listening().await;
    assert_eq!(replica.profile(&user).await.bonus_points, 10);
}
