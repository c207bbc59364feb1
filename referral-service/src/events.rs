//! Domain events through a transactional outbox: every change that other services may care
//! about appends an event in the same transaction ([`append`]), so an event exists exactly when
//! its change committed; [`Outbox`] reads them back in a resumable order and prunes old ones.
//!
//! **Order without gaps.** An identity column is not commit order: the transaction that takes
//! id 11 can commit before the one holding id 10, and a reader that moved past 11 would never
//! see 10. Each event therefore also records its transaction id (`xid8`), and a reader only
//! returns events of transactions older than the oldest one still running
//! (`pg_snapshot_xmin(pg_current_snapshot())`): those are all finished, so nothing can appear
//! behind the position it reached. Events come ordered by (transaction id, id), which agrees
//! with commit order for any two changes where one started after the other committed; two
//! concurrent transactions come in the order they first wrote. The cursor is that pair.
//!
//! **Waking readers.** [`append`] also issues `NOTIFY refsys_events` (delivered at commit), and
//! one `LISTEN` connection per replica ([`Notifier`]) wakes every stream; a slow periodic poll
//! covers a lost notification (and transactions below the horizon that finished without one,
//! such as rollbacks).
//!
//! Queries here are checked at run time, not by `sqlx::query!`: the table is only touched
//! through this module and its tests.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use prost::Message;
use refsys_proto::referral::v1 as pb;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::ReferralError;
use crate::profile_cache::ProfileCache;

/// The `source` of every event.
pub const SOURCE: &str = "refsys/referral-service";
/// The channel `append` notifies and [`Notifier`] listens on.
const CHANNEL: &str = "refsys_events";
/// The channel the profile triggers notify, one user id per notification.
const PROFILES_CHANNEL: &str = "refsys_profiles";
/// Longest cursor accepted, before decoding.
const MAX_CURSOR_LEN: usize = 64;

/// A position in the event order: after the event of transaction `tx` with id `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventCursor {
    pub tx: u64,
    pub id: i64,
}

impl EventCursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("v1:{}:{}", self.tx, self.id))
    }

    /// `None` for an empty cursor (from the oldest event kept).
    pub fn decode(input: &str) -> Result<Option<Self>, ReferralError> {
        let input = input.trim();
        if input.is_empty() {
            return Ok(None);
        }
        let invalid = || ReferralError::invalid("after_cursor", "not a cursor from WatchEvents");
        if input.len() > MAX_CURSOR_LEN {
            return Err(invalid());
        }
        let plain = URL_SAFE_NO_PAD
            .decode(input)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(invalid)?;
        match plain.split(':').collect::<Vec<_>>().as_slice() {
            ["v1", tx, id] => {
                let tx = tx.parse().map_err(|_| invalid())?;
                let id: i64 = id.parse().map_err(|_| invalid())?;
                if id < 1 {
                    return Err(invalid());
                }
                Ok(Some(Self { tx, id }))
            }
            _ => Err(invalid()),
        }
    }
}

/// What happened: the CloudEvents `type` and the payload.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The user the event is about (CloudEvents `subject`).
    pub subject: Uuid,
    pub data: pb::event::Data,
}

/// The CloudEvents `type` of a payload.
pub fn event_type(data: &pb::event::Data) -> &'static str {
    match data {
        pb::event::Data::UserCreated(_) => "refsys.referral.user.created",
        pb::event::Data::InviteActivated(_) => "refsys.referral.invite.activated",
        pb::event::Data::PointsRedeemed(_) => "refsys.referral.points.redeemed",
        pb::event::Data::PointsGranted(_) => "refsys.referral.points.granted",
        pb::event::Data::ProfileUpdated(_) => "refsys.referral.profile.updated",
        pb::event::Data::UserDeleted(_) => "refsys.referral.user.deleted",
    }
}

impl NewEvent {
    pub fn user_created(user: Uuid, invite_code: &str) -> Self {
        Self {
            subject: user,
            data: pb::event::Data::UserCreated(pb::UserCreated {
                user_id: user.to_string(),
                invite_code: invite_code.to_owned(),
                // The event's own time: the same transaction's `now()` as the user's row.
                create_time: None,
            }),
        }
    }

    pub fn invite_activated(
        invitee: Uuid,
        inviter: Uuid,
        invitee_points: i64,
        inviter_points: i64,
    ) -> Self {
        Self {
            subject: invitee,
            data: pb::event::Data::InviteActivated(pb::InviteActivated {
                invitee_user_id: invitee.to_string(),
                inviter_user_id: inviter.to_string(),
                invitee_points,
                inviter_points,
            }),
        }
    }

    pub fn profile_updated(user: Uuid, fields: Vec<String>) -> Self {
        Self {
            subject: user,
            data: pb::event::Data::ProfileUpdated(pb::ProfileUpdated {
                user_id: user.to_string(),
                fields,
            }),
        }
    }

    pub fn user_deleted(user: Uuid) -> Self {
        Self {
            subject: user,
            data: pb::event::Data::UserDeleted(pb::UserDeleted {
                user_id: user.to_string(),
            }),
        }
    }

    /// A redemption (`amount` < 0) or a grant (`amount` > 0).
    pub fn points_moved(
        user: Uuid,
        amount: i64,
        balance: i64,
        transaction_id: i64,
        note: &str,
        requested_by: &str,
    ) -> Self {
        let moved = pb::PointsMoved {
            user_id: user.to_string(),
            amount,
            balance,
            transaction_id: transaction_id.to_string(),
            note: note.to_owned(),
            requested_by: requested_by.to_owned(),
        };
        Self {
            subject: user,
            data: if amount < 0 {
                pb::event::Data::PointsRedeemed(moved)
            } else {
                pb::event::Data::PointsGranted(moved)
            },
        }
    }
}

/// Appends `event` to the outbox inside the caller's transaction, and notifies readers when
/// that transaction commits. One round trip.
pub async fn append(conn: &mut PgConnection, event: NewEvent) -> Result<(), ReferralError> {
    let kind = event_type(&event.data);
    let payload = pb::Event {
        data: Some(event.data),
        ..pb::Event::default()
    }
    .encode_to_vec();
    sqlx::query(
        "WITH appended AS (
             INSERT INTO outbox (event_id, type, subject, payload) VALUES ($1, $2, $3, $4)
             RETURNING 1)
         SELECT pg_notify($5, '') FROM appended",
    )
    .bind(Uuid::new_v4())
    .bind(kind)
    .bind(event.subject)
    .bind(payload)
    .bind(CHANNEL)
    .execute(conn)
    .await?;
    Ok(())
}

/// Reads and prunes the outbox.
#[derive(Clone)]
pub struct Outbox {
    pool: PgPool,
}

impl Outbox {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Refuses a cursor older than the retention: events after it were pruned, and resuming
    /// from it would silently skip them.
    pub async fn check_cursor(&self, cursor: &EventCursor) -> Result<(), ReferralError> {
        let horizon = sqlx::query(
            "SELECT tx::text AS tx, id FROM outbox_pruned
             WHERE (tx, id) > ($1::text::xid8, $2)",
        )
        .bind(cursor.tx.to_string())
        .bind(cursor.id)
        .fetch_optional(&self.pool)
        .await?;
        match horizon {
            Some(_) => Err(ReferralError::CursorExpired),
            None => Ok(()),
        }
    }

    /// Up to `limit` events after `after` (from the oldest when `None`), of transactions that
    /// have all finished, in order. Holds a connection only for the query.
    pub async fn after(
        &self,
        after: Option<&EventCursor>,
        limit: i64,
    ) -> Result<Vec<(EventCursor, pb::Event)>, ReferralError> {
        let (tx, id) = after.map_or((0, 0), |c| (c.tx, c.id));
        let rows = sqlx::query(
            "SELECT tx::text AS tx, id, event_id, type, subject, payload, created_at
             FROM outbox
             WHERE (tx, id) > ($1::text::xid8, $2)
               AND tx < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY tx, id
             LIMIT $3",
        )
        .bind(tx.to_string())
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_of_row).collect()
    }

    /// Deletes events older than `retention`, at most `batch` per call, and moves the pruned
    /// horizon up to the last event deleted; returns how many went. Safe with many replicas:
    /// one prunes at a time (an advisory lock), the others skip.
    pub async fn prune(&self, retention: Duration, batch: i64) -> Result<u64, ReferralError> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(PRUNE_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(0);
        }
        let seconds = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        let row = sqlx::query(
            "WITH gone AS (
                 DELETE FROM outbox WHERE id IN (
                     SELECT id FROM outbox
                     WHERE created_at < now() - make_interval(secs => $1::double precision)
                     ORDER BY tx, id LIMIT $2)
                 RETURNING tx, id),
             last AS (SELECT tx, id FROM gone ORDER BY tx DESC, id DESC LIMIT 1),
             moved AS (
                 INSERT INTO outbox_pruned (tx, id) SELECT tx, id FROM last
                 ON CONFLICT (singleton) DO UPDATE SET tx = EXCLUDED.tx, id = EXCLUDED.id
                 WHERE (outbox_pruned.tx, outbox_pruned.id) < (EXCLUDED.tx, EXCLUDED.id))
             SELECT count(*) AS deleted FROM gone",
        )
        .bind(seconds)
        .bind(batch)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let deleted: i64 = row.try_get("deleted")?;
        Ok(u64::try_from(deleted).unwrap_or(0))
    }
}

/// The advisory lock key of pruning ("refsys-outbox-prune").
const PRUNE_LOCK: i64 = 0x7265_6673_7973_6f62;

fn event_of_row(row: &sqlx::postgres::PgRow) -> Result<(EventCursor, pb::Event), ReferralError> {
    let tx: String = row.try_get("tx")?;
    let cursor = EventCursor {
        tx: tx
            .parse()
            .map_err(|_| ReferralError::Internal(format!("outbox tx {tx:?} is not a number")))?,
        id: row.try_get("id")?,
    };
    let payload: Vec<u8> = row.try_get("payload")?;
    let stored = pb::Event::decode(payload.as_slice())
        .map_err(|err| ReferralError::Internal(format!("outbox payload: {err}")))?;
    let time: DateTime<Utc> = row.try_get("created_at")?;
    let time = prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    };
    let event_id: Uuid = row.try_get("event_id")?;
    let subject: Uuid = row.try_get("subject")?;
    let data = stored.data.map(|data| match data {
        pb::event::Data::UserCreated(created) => pb::event::Data::UserCreated(pb::UserCreated {
            create_time: Some(time),
            ..created
        }),
        other => other,
    });
    let event = pb::Event {
        id: event_id.to_string(),
        source: SOURCE.to_owned(),
        r#type: row.try_get("type")?,
        time: Some(time),
        subject: subject.to_string(),
        cursor: cursor.encode(),
        data,
    };
    Ok((cursor, event))
}

/// Wakes event streams when events commit: one `LISTEN` connection per replica, fanned out
/// through a watch channel whose value counts wake-ups.
#[derive(Clone)]
pub struct Notifier {
    wakes: watch::Receiver<u64>,
}

impl Notifier {
    /// Listens on `pool`'s database in a background task that reconnects by itself; also
    /// feeds `profiles` the invalidations of `refsys_profiles` (see [`ProfileCache`]).
    pub fn spawn(
        pool: PgPool,
        profiles: Option<Arc<ProfileCache>>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, wakes) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            let set_listening = |listening| {
                if let Some(profiles) = &profiles {
                    profiles.set_listening(listening);
                }
            };
            loop {
                match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(mut listener) => {
                        if let Err(err) = listener.listen_all([CHANNEL, PROFILES_CHANNEL]).await {
                            tracing::warn!(error = %err, "could not LISTEN for events; retrying");
                        } else {
                            // Whatever was missed while not listening is read now.
                            sender.send_modify(|n| *n += 1);
                            set_listening(true);
                            // `try_recv`, not `recv`: `recv` reconnects by itself and
                            // silently drops what was notified meanwhile, which the profile
                            // cache must know about.
                            while let Ok(Some(notification)) = listener.try_recv().await {
                                if notification.channel() == PROFILES_CHANNEL {
                                    invalidate(profiles.as_deref(), notification.payload());
                                } else {
                                    sender.send_modify(|n| *n += 1);
                                }
                            }
                            set_listening(false);
                            tracing::warn!(
                                "the event listener's connection was lost; reconnecting"
                            );
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "could not connect the event listener; retrying")
                    }
                }
                if sender.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        (Self { wakes }, task)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.wakes.clone()
    }
}

/// A `refsys_profiles` payload is the id of a user whose profile changed (a database trigger
/// sends it; see the `profile_invalidation` migration).
fn invalidate(profiles: Option<&ProfileCache>, payload: &str) {
    let Some(profiles) = profiles else { return };
    match Uuid::parse_str(payload) {
        Ok(id) => profiles.invalidate(id, std::time::Instant::now()),
        Err(_) => {
            // Not ours to understand, so the cache cannot tell what changed: drop all of it.
            tracing::warn!("unexpected refsys_profiles payload; dropping the profile cache");
            profiles.set_listening(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let cursor = EventCursor {
            tx: 18_446_744_073_709_551_000,
            id: 42,
        };
        assert_eq!(EventCursor::decode(&cursor.encode()).unwrap(), Some(cursor));
        assert_eq!(EventCursor::decode("  ").unwrap(), None);
        for junk in [
            "nope".to_owned(),
            URL_SAFE_NO_PAD.encode("v1:1"),
            URL_SAFE_NO_PAD.encode("v1:-1:5"),
            URL_SAFE_NO_PAD.encode("v1:1:0"),
            URL_SAFE_NO_PAD.encode("v2:1:5"),
            URL_SAFE_NO_PAD.encode("v1:99999999999999999999999:5"),
            "A".repeat(65),
        ] {
            let err = EventCursor::decode(&junk).unwrap_err();
            assert!(
                matches!(
                    err,
                    ReferralError::InvalidArgument {
                        field: "after_cursor",
                        ..
                    }
                ),
                "{junk}"
            );
        }
    }

    #[test]
    fn cursors_order_by_transaction_then_id() {
        let a = EventCursor { tx: 10, id: 11 };
        let b = EventCursor { tx: 11, id: 10 };
        assert!(a < b);
    }

    #[test]
    fn every_payload_has_its_type_and_no_phone_number() {
        let user = Uuid::now_v7();
        let events = [
            NewEvent::user_created(user, "7KQ2MX"),
            NewEvent::invite_activated(user, Uuid::now_v7(), 100, 200),
            NewEvent::profile_updated(user, vec!["email".into()]),
            NewEvent::user_deleted(user),
            NewEvent::points_moved(user, -50, 250, 7, "order 1", "shop"),
            NewEvent::points_moved(user, 50, 350, 8, "goodwill", "admin:x"),
        ];
        let types: Vec<&str> = events.iter().map(|e| event_type(&e.data)).collect();
        assert_eq!(
            types,
            [
                "refsys.referral.user.created",
                "refsys.referral.invite.activated",
                "refsys.referral.profile.updated",
                "refsys.referral.user.deleted",
                "refsys.referral.points.redeemed",
                "refsys.referral.points.granted",
            ]
        );
        for event in &events {
            assert_eq!(event.subject, user);
            let text = format!("{event:?}");
            assert!(!text.contains('+'), "{text}");
        }
    }
}
