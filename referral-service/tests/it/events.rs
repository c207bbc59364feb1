//! The outbox and EventService.WatchEvents on the real Postgres, through a real gRPC server.

use std::collections::HashSet;
use std::time::Duration;

use referral_service::events::{EventCursor, NewEvent, Outbox};
use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::event_service_client::EventServiceClient;
use service_kit::tokens::{EVENTS_READ_SCOPE, POINTS_READ_SCOPE};
use sqlx::PgPool;
use tonic::{Code, Streaming};

use crate::auth::{Server, service_claims, start, user_claims, with_token};
use crate::{id, phone, repository, users};

async fn watch(
    server: &Server,
    after: &str,
) -> Result<Streaming<pb::WatchEventsResponse>, tonic::Status> {
    let token = server.key.sign(&service_claims(EVENTS_READ_SCOPE)).unwrap();
    EventServiceClient::new(server.channel.clone())
        .watch_events(with_token(
            pb::WatchEventsRequest {
                after_cursor: after.to_owned(),
            },
            &token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// The next `n` events of `stream`, failing after 10 s without one.
async fn take(stream: &mut Streaming<pb::WatchEventsResponse>, n: usize) -> Vec<pb::Event> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events arrived", events.len()))
            .expect("the stream is healthy")
            .expect("the stream goes on");
        events.push(next.event.expect("an event"));
    }
    events
}

/// The first `n` events after `after` once they are readable. A write transaction open anywhere
/// on the server (other tests run in parallel) holds the readable horizon back for a moment.
async fn settled(
    outbox: &Outbox,
    after: Option<&EventCursor>,
    n: usize,
) -> Vec<(EventCursor, pb::Event)> {
    for _ in 0..200 {
        let events = outbox.after(after, 1_000).await.unwrap();
        if events.len() >= n {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} events became readable within 10 s")
}

/// Nothing more arrives within `wait`.
async fn quiet(stream: &mut Streaming<pb::WatchEventsResponse>, wait: Duration) {
    if let Ok(next) = tokio::time::timeout(wait, stream.message()).await {
        panic!("unexpected: {next:?}");
    }
}

#[sqlx::test]
async fn each_change_writes_its_event_in_its_transaction_and_no_phone_number(pool: PgPool) {
    let repository = repository(&pool);
    let all = users(&repository, 2).await;
    let (inviter, invitee) = (&all[0], &all[1]);
    repository
        .activate(id(invitee), &crate::code(inviter))
        .await
        .unwrap();
    repository
        .update_fields(
            id(invitee),
            Some("Zebedee"),
            None,
            Some("zebedee@example.com"),
        )
        .await
        .unwrap();
    repository.delete_user(id(invitee)).await.unwrap();
    // A refused activation writes nothing.
    let _ = repository
        .activate(id(inviter), &crate::code(inviter))
        .await
        .unwrap_err();

    let events: Vec<pb::Event> = settled(&Outbox::new(pool.clone()), None, 5)
        .await
        .into_iter()
        .map(|(_, event)| event)
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(
        types,
        [
            "refsys.referral.user.created",
            "refsys.referral.user.created",
            "refsys.referral.invite.activated",
            "refsys.referral.profile.updated",
            "refsys.referral.user.deleted",
        ]
    );
    let invitee_id = invitee.id.to_string();
    match &events[2].data {
        Some(pb::event::Data::InviteActivated(activated)) => {
            assert_eq!(activated.invitee_user_id, invitee_id);
            assert_eq!(activated.inviter_user_id, inviter.id.to_string());
            assert_eq!(
                (activated.invitee_points, activated.inviter_points),
                (100, 200)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(events[2].subject, invitee_id, "the invitee is the subject");
    match &events[3].data {
        Some(pb::event::Data::ProfileUpdated(updated)) => {
            assert_eq!(updated.fields, ["first_name", "email"]);
        }
        other => panic!("{other:?}"),
    }
    match &events[0].data {
        Some(pb::event::Data::UserCreated(created)) => {
            assert_eq!(created.invite_code, inviter.invite_code);
            assert_eq!(created.create_time, events[0].time);
        }
        other => panic!("{other:?}"),
    }
    for event in &events {
        assert_eq!(event.source, "refsys/referral-service");
        assert!(!event.id.is_empty() && event.time.is_some());
    }
    // Neither the stored payloads nor the events hold a phone number, names or email.
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM outbox")
        .fetch_all(&pool)
        .await
        .unwrap();
    for bytes in stored
        .iter()
        .chain(std::iter::once(&format!("{events:?}").into_bytes()))
    {
        let text = String::from_utf8_lossy(bytes);
        // Phone numbers without their '+' too (digits alone would still give them away).
        for personal in [
            &phone(0).e164()[1..],
            &phone(1).e164()[1..],
            "Zebedee",
            "zebedee@example.com",
        ] {
            assert!(!text.contains(personal), "{personal} in {text}");
        }
    }
}

#[sqlx::test]
async fn a_later_id_that_commits_first_is_not_passed_over(pool: PgPool) {
    let outbox = Outbox::new(pool.clone());
    let subject = uuid::Uuid::now_v7();
    // Transaction A takes the lower id and stays open; B takes the next id and commits.
    let mut a = pool.begin().await.unwrap();
    referral_service::events::append(&mut a, NewEvent::user_deleted(subject))
        .await
        .unwrap();
    let mut b = pool.begin().await.unwrap();
    referral_service::events::append(&mut b, NewEvent::user_deleted(subject))
        .await
        .unwrap();
    b.commit().await.unwrap();
    // While A runs, B's event is held back: a reader that took it would move past A's.
    assert!(outbox.after(None, 10).await.unwrap().is_empty());
    a.commit().await.unwrap();
    let read = settled(&outbox, None, 2).await;
    let ids: Vec<i64> = read.iter().map(|(cursor, _)| cursor.id).collect();
    assert_eq!(ids.len(), 2, "both, once each");
    assert!(read[0].0 < read[1].0);
    // And from the first one's cursor, exactly the second.
    let rest = settled(&outbox, Some(&read[0].0), 1).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].0, read[1].0);
}

#[sqlx::test]
async fn the_stream_delivers_each_event_once_in_order_while_hundreds_commit(pool: PgPool) {
    let repository = repository(&pool);
    let inviter = users(&repository, 1).await.remove(0);
    let server = start(&pool).await;
    let mut stream = watch(&server, "").await.unwrap();
    let first = take(&mut stream, 1).await;
    assert_eq!(first[0].r#type, "refsys.referral.user.created");

    // 150 sign-ups, each activating the inviter's code, from 16 concurrent writers.
    let code = crate::code(&inviter);
    let writers: Vec<_> = (0..16u32)
        .map(|w| {
            let (repository, code) = (repository.clone(), code.clone());
            tokio::spawn(async move {
                for n in (w..150).step_by(16) {
                    let (user, _) = repository.ensure_user(&phone(1_000 + n)).await.unwrap();
                    repository.activate(crate::id(&user), &code).await.unwrap();
                }
            })
        })
        .collect();
    let events = take(&mut stream, 300).await;
    for writer in writers {
        writer.await.unwrap();
    }
    quiet(&mut stream, Duration::from_millis(1_500)).await;

    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 300, "no event twice");
    let cursors: Vec<EventCursor> = events
        .iter()
        .map(|e| EventCursor::decode(&e.cursor).unwrap().unwrap())
        .collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "in stream order");
    // Each user's sign-up comes before their activation.
    let mut created = HashSet::new();
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
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created.len(), 150);

    // Resuming from the 100th event's cursor gives exactly the events after it.
    let mut resumed = watch(&server, &events[99].cursor).await.unwrap();
    let suffix = take(&mut resumed, 200).await;
    let expected: Vec<&str> = events[100..].iter().map(|e| e.id.as_str()).collect();
    let got: Vec<&str> = suffix.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(got, expected);
    quiet(&mut resumed, Duration::from_millis(500)).await;
}

#[sqlx::test]
async fn the_stream_needs_the_events_scope(pool: PgPool) {
    let server = start(&pool).await;
    let mut client = EventServiceClient::new(server.channel.clone());
    for claims in [
        service_claims(POINTS_READ_SCOPE),
        user_claims(&uuid::Uuid::now_v7().to_string(), &["admin"]),
    ] {
        let token = server.key.sign(&claims).unwrap();
        let status = client
            .watch_events(with_token(pb::WatchEventsRequest::default(), &token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let status = client
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = watch(&server, "not a cursor").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[sqlx::test]
async fn a_cursor_older_than_the_retention_is_out_of_range(pool: PgPool) {
    let repository = repository(&pool);
    users(&repository, 5).await;
    let outbox = Outbox::new(pool.clone());
    let all = settled(&outbox, None, 5).await;
    // The first three are past a 7-day retention.
    sqlx::query("UPDATE outbox SET created_at = now() - interval '8 days' WHERE id <= $1")
        .bind(all[2].0.id)
        .execute(&pool)
        .await
        .unwrap();
    let week = Duration::from_secs(7 * 86_400);
    assert_eq!(
        outbox.prune(week, 2).await.unwrap(),
        2,
        "batches are bounded"
    );
    assert_eq!(outbox.prune(week, 10).await.unwrap(), 1);
    assert_eq!(outbox.prune(week, 10).await.unwrap(), 0);

    let server = start(&pool).await;
    for stale in [&all[0].1.cursor, &all[1].1.cursor] {
        let status = watch(&server, stale).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    }
    // From the last pruned event on, nothing is missing.
    let mut from_horizon = watch(&server, &all[2].1.cursor).await.unwrap();
    let rest = take(&mut from_horizon, 2).await;
    assert_eq!(rest[0].id, all[3].1.id);
    let mut from_start = watch(&server, "").await.unwrap();
    assert_eq!(take(&mut from_start, 2).await[0].id, all[3].1.id);
}

#[sqlx::test]
async fn slow_consumers_hold_no_connection(pool: PgPool) {
    users(&repository(&pool), 400).await;
    // Two connections in all, one of them the event listener's: if a stream held one while
    // its consumer is slow, the second stream could not even start.
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let server = start(&small).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut stream = watch(&server, "").await.unwrap();
        take(&mut stream, 1).await;
        stalled.push(stream);
    }
    // Four streams with full buffers, their consumers reading nothing: queries still run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let small_repository = repository(&small);
    for _ in 0..10 {
        let user = users_first(&small).await;
        small_repository.user(crate::id(&user)).await.unwrap();
    }
    // And each stream still delivers everything once its consumer reads again.
    for stream in &mut stalled {
        assert_eq!(take(stream, 399).await.len(), 399);
    }
}

async fn users_first(pool: &PgPool) -> referral_service::storage::UserRecord {
    let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM users ORDER BY id LIMIT 1")
        .fetch_one(pool)
        .await
        .unwrap();
    repository(pool)
        .user(referral_service::domain::UserId(id))
        .await
        .unwrap()
}

#[sqlx::test]
async fn redemptions_and_grants_announce_themselves_once(pool: PgPool) {
    use referral_service::points::{PointsKind, PointsRequest};
    let repository = repository(&pool);
    let user = users(&repository, 1).await.remove(0);
    let outbox = Outbox::new(pool.clone());
    let start = settled(&outbox, None, 1).await[0].0;
    let request = |kind, points, key: &str| {
        PointsRequest::parse(kind, &user.id.to_string(), points, key, "order 1234").unwrap()
    };
    repository
        .move_points("shop", &request(PointsKind::Grant, 300, "g-1"))
        .await
        .unwrap();
    repository
        .move_points("shop", &request(PointsKind::Redeem, 120, "r-1"))
        .await
        .unwrap();
    // A retry of the same key moves nothing and announces nothing.
    repository
        .move_points("shop", &request(PointsKind::Redeem, 120, "r-1"))
        .await
        .unwrap();
    let events = settled(&outbox, Some(&start), 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outbox.after(Some(&start), 10).await.unwrap().len(), 2);
    let moved: Vec<(String, pb::PointsMoved)> = events
        .into_iter()
        .map(|(_, event)| match event.data {
            Some(pb::event::Data::PointsGranted(m) | pb::event::Data::PointsRedeemed(m)) => {
                (event.r#type, m)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(moved[0].0, "refsys.referral.points.granted");
    assert_eq!((moved[0].1.amount, moved[0].1.balance), (300, 300));
    assert_eq!(moved[1].0, "refsys.referral.points.redeemed");
    assert_eq!((moved[1].1.amount, moved[1].1.balance), (-120, 180));
    assert_eq!(moved[1].1.note, "order 1234");
    assert_eq!(moved[1].1.requested_by, "shop");
}
