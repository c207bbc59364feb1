//! Points that internal services (PointsService) and admins (AdminService.GrantPoints) move:
//! redemptions (negative ledger entries that never take a balance below zero) and grants, both
//! idempotent by the caller's key; balances; and the pruning of old keys.
//!
//! **Exact balances under sharded counters.** A balance is the sum of the user's
//! `user_counters` shards. A redemption locks the user's row (`FOR NO KEY UPDATE`) before it
//! reads that sum, so debits of one user run one at a time and each sees every earlier debit
//! committed; then it appends the negative entry and decrements a random shard. Credits
//! (activations, grants) never take that lock — they take at most `FOR KEY SHARE`, which
//! `FOR NO KEY UPDATE` does not conflict with — so a hot inviter still never waits on a row: a
//! credit committing during a redemption can only raise the balance the redemption checked.
//! Lock order everywhere: the idempotency key, the user's row, then counter shards.
//!
//! **Idempotency.** Each request first inserts its `(caller, idempotency_key)` row into
//! `points_requests` with a hash of the request, in the transaction that then writes the
//! ledger entry and stores the result in that row. A parallel retry's insert waits on the
//! primary key until the first transaction ends: committed, the retry reads the stored result
//! (or, for a different request under the same key, IDEMPOTENCY_KEY_REUSED); rolled back (a
//! refusal stores nothing), the retry goes ahead as the first.

use std::sync::LazyLock;
use std::time::Duration;

use rand::Rng;

use crate::domain::UserId;
use crate::error::ReferralError;
use crate::storage::{COUNTER_SHARDS, LedgerEntry, Repository};

/// Most points one request may move.
pub const MAX_POINTS: i64 = 1_000_000_000;
/// Longest idempotency key, in (ASCII) characters.
pub const MAX_KEY_LEN: usize = 200;
/// Longest reason, in characters.
pub const MAX_REASON_CHARS: usize = 200;
/// Idempotency keys older than this are pruned; callers are promised at least 24 hours.
pub const KEY_RETENTION: Duration = Duration::from_secs(48 * 3600);
/// How often each replica prunes old keys (with up to a quarter more, at random, so replicas
/// drift apart).
pub const PRUNE_EVERY: Duration = Duration::from_secs(300);
/// Keys deleted per statement, so a prune never holds many row locks or runs long.
pub const PRUNE_BATCH: i64 = 1000;
/// Batches per prune run at most; the rest waits for the next run.
const PRUNE_MAX_BATCHES: usize = 100;
/// Attempts at claiming a key whose stored result vanished (pruned) in between.
const CLAIM_ATTEMPTS: usize = 3;

/// Points moved and requests refused, for `/metrics`.
pub static POINTS_REDEEMED: LazyLock<service_kit::metrics::IntCounter> = LazyLock::new(|| {
    service_kit::metrics::counter(
        "refsys_points_redeemed_total",
        "Points redeemed (the sum of the amounts; retries replaying a stored result not counted).",
    )
});
pub static POINTS_GRANTED: LazyLock<service_kit::metrics::IntCounter> = LazyLock::new(|| {
    service_kit::metrics::counter(
        "refsys_points_granted_total",
        "Points granted by services and admins (the sum of the amounts; replays not counted).",
    )
});
/// The `reason` labels of [`POINTS_REFUSALS`] (`grpc::points::move_points` picks one).
pub const REFUSAL_REASONS: [&str; 4] = [
    "insufficient_points",
    "idempotency_key_reused",
    "invalid_argument",
    "not_found",
];
pub static POINTS_REFUSALS: LazyLock<service_kit::metrics::LabelledCounter> = LazyLock::new(|| {
    service_kit::metrics::counter_vec(
        "refsys_points_refusals_total",
        "RedeemPoints/GrantPoints requests refused, by kind (redeem, grant) and reason \
             (insufficient_points, idempotency_key_reused, invalid_argument, not_found).",
        &["kind", "reason"],
    )
});
pub static POINTS_REPLAYS: LazyLock<service_kit::metrics::LabelledCounter> = LazyLock::new(|| {
    service_kit::metrics::counter_vec(
        "refsys_points_replays_total",
        "RedeemPoints/GrantPoints retries answered with the stored result of their key.",
        &["kind"],
    )
});

/// Registers the points metrics, every label value included, so each shows as 0 before
/// anything moves (a series born at its first event starts at 1, which `rate()` cannot see).
pub fn register_metrics() {
    LazyLock::force(&POINTS_REDEEMED);
    LazyLock::force(&POINTS_GRANTED);
    for kind in [PointsKind::Redeem, PointsKind::Grant] {
        POINTS_REPLAYS.with_label_values(&[kind.as_str()]);
        for reason in REFUSAL_REASONS {
            POINTS_REFUSALS.with_label_values(&[kind.as_str(), reason]);
        }
    }
}

/// Which way the points go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointsKind {
    /// RedeemPoints: a negative entry, never below a zero balance.
    Redeem,
    /// GrantPoints: a positive entry.
    Grant,
}

impl PointsKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redeem => "redeem",
            Self::Grant => "grant",
        }
    }
}

/// A validated RedeemPoints or GrantPoints request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointsRequest {
    pub kind: PointsKind,
    pub user: UserId,
    /// 1 to [`MAX_POINTS`]; the entry's amount is its negation for a redemption.
    pub points: i64,
    /// 1 to [`MAX_KEY_LEN`] printable ASCII characters (space to '~'), as sent.
    pub idempotency_key: String,
    /// Trimmed; 1 to [`MAX_REASON_CHARS`] characters, no control characters.
    pub reason: String,
}

impl PointsRequest {
    /// Checks every field; INVALID_ARGUMENT names the first bad one.
    pub fn parse(
        kind: PointsKind,
        user_id: &str,
        points: i64,
        idempotency_key: &str,
        reason: &str,
    ) -> Result<Self, ReferralError> {
        let user = UserId::parse(user_id, "user_id")?;
        if !(1..=MAX_POINTS).contains(&points) {
            return Err(ReferralError::invalid(
                "points",
                format!("must be from 1 to {MAX_POINTS}"),
            ));
        }
        if idempotency_key.is_empty()
            || idempotency_key.len() > MAX_KEY_LEN
            || !idempotency_key.bytes().all(|b| (b' '..=b'~').contains(&b))
        {
            return Err(ReferralError::invalid(
                "idempotency_key",
                format!("1 to {MAX_KEY_LEN} printable ASCII characters"),
            ));
        }
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS {
            return Err(ReferralError::invalid(
                "reason",
                format!("1 to {MAX_REASON_CHARS} characters"),
            ));
        }
        if reason.chars().any(char::is_control) {
            return Err(ReferralError::invalid("reason", "no control characters"));
        }
        Ok(Self {
            kind,
            user,
            points,
            idempotency_key: idempotency_key.to_owned(),
            reason: reason.to_owned(),
        })
    }

    /// The ledger entry's reason.
    fn ledger_reason(&self) -> &'static str {
        match self.kind {
            PointsKind::Redeem => "redeemed",
            PointsKind::Grant => "granted",
        }
    }

    /// SHA-256 of what the request asks for (everything but the key), so a key reused for a
    /// different request is told apart from a retry. Fields are length-prefixed, so no two
    /// requests share an encoding.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(b"refsys-points-request-v1");
        for field in [
            self.kind.as_str().as_bytes(),
            self.user.0.as_bytes().as_slice(),
            &self.points.to_be_bytes(),
            self.reason.as_bytes(),
        ] {
            context.update(&u64::try_from(field.len()).unwrap_or(u64::MAX).to_be_bytes());
            context.update(field);
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(context.finish().as_ref());
        hash
    }
}

/// What a redemption or grant did (or, replayed, what its first call did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointsMove {
    /// The ledger entry.
    pub entry: LedgerEntry,
    /// The balance right after the entry.
    pub balance: i64,
    /// Whether this answer is the stored result of an earlier call with the same key.
    pub replayed: bool,
}

impl Repository {
    /// A live user's balance (the sum of their counter shards); NOT_FOUND for an unknown or
    /// deleted user.
    pub async fn balance(&self, user: UserId) -> Result<i64, ReferralError> {
        sqlx::query_scalar!(
            r#"SELECT (SELECT COALESCE(sum(points), 0)::bigint
                       FROM user_counters WHERE user_id = u.id) AS "balance!"
               FROM users u WHERE u.id = $1 AND u.deleted_at IS NULL"#,
            user.0
        )
        .fetch_optional(self.pool())
        .await?
        .ok_or(ReferralError::NotFound("user"))
    }

    /// Redeems or grants `request` for `caller` (a service client id, or "admin:<user id>"),
    /// idempotently by `(caller, request.idempotency_key)`: the same key and request return the
    /// first result and move nothing more, also in parallel; the same key with another request
    /// is [`ReferralError::IdempotencyKeyReused`]. A redemption the balance does not cover is
    /// [`ReferralError::InsufficientPoints`]; an unknown or deleted user NOT_FOUND. Refusals
    /// store nothing, so the key can be used again.
    pub async fn move_points(
        &self,
        caller: &str,
        request: &PointsRequest,
    ) -> Result<PointsMove, ReferralError> {
        let fingerprint = request.fingerprint();
        for _ in 0..CLAIM_ATTEMPTS {
            let mut tx = self.pool().begin().await?;
            // Waits here while another transaction holds an uncommitted row for this key.
            let claimed = sqlx::query_scalar!(
                r#"INSERT INTO points_requests (caller, idempotency_key, request_hash)
                   VALUES ($1, $2, $3)
                   ON CONFLICT (caller, idempotency_key) DO NOTHING
                   RETURNING true AS "claimed!""#,
                caller,
                request.idempotency_key,
                &fingerprint[..]
            )
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
            if !claimed {
                // A committed row (this statement sees what committed while the insert waited).
                match stored_result(&mut tx, caller, &request.idempotency_key, &fingerprint).await?
                {
                    Some(stored) => return Ok(stored),
                    // Pruned in between: claim the key afresh.
                    None => continue,
                }
            }
            let moved = match request.kind {
                PointsKind::Redeem => redeem_in(&mut tx, caller, request).await?,
                PointsKind::Grant => grant_in(&mut tx, caller, request).await?,
            };
            sqlx::query!(
                "UPDATE points_requests SET ledger_entry_id = $3, balance_after = $4
                 WHERE caller = $1 AND idempotency_key = $2",
                caller,
                request.idempotency_key,
                moved.entry.id,
                moved.balance
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(moved);
        }
        Err(ReferralError::Internal(
            "an idempotency key kept vanishing between its insert and its read".into(),
        ))
    }

    /// Deletes up to `batch` idempotency keys older than `older_than`, returning how many.
    /// Rows another replica is deleting at the same moment are skipped, not waited for.
    pub async fn prune_points_requests(
        &self,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, ReferralError> {
        let deleted = sqlx::query!(
            "DELETE FROM points_requests
             WHERE (caller, idempotency_key) IN (
                 SELECT caller, idempotency_key FROM points_requests
                 WHERE created_at < now() - make_interval(secs => $1)
                 ORDER BY created_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
            older_than.as_secs_f64(),
            batch
        )
        .execute(self.pool())
        .await?;
        Ok(deleted.rows_affected())
    }

    /// One prune run: batches of [`PRUNE_BATCH`] keys older than [`KEY_RETENTION`] until none
    /// are left (or [`PRUNE_MAX_BATCHES`] ran). Returns how many were deleted.
    pub async fn prune_idempotency_keys(&self) -> Result<u64, ReferralError> {
        let mut total = 0;
        for _ in 0..PRUNE_MAX_BATCHES {
            let deleted = self
                .prune_points_requests(KEY_RETENTION, PRUNE_BATCH)
                .await?;
            total += deleted;
            if deleted < u64::try_from(PRUNE_BATCH).unwrap_or(u64::MAX) {
                break;
            }
        }
        Ok(total)
    }
}

/// The stored result of `(caller, key)`: `None` when there is no row (pruned), the result when
/// the request matches `fingerprint`, IDEMPOTENCY_KEY_REUSED when it does not.
async fn stored_result(
    tx: &mut sqlx::PgConnection,
    caller: &str,
    key: &str,
    fingerprint: &[u8; 32],
) -> Result<Option<PointsMove>, ReferralError> {
    let Some(row) = sqlx::query!(
        r#"SELECT r.request_hash, r.balance_after, l.id AS "id?", l.amount AS "amount?",
                  l.reason AS "reason?", l.counterpart_user_id, l.created_at AS "created_at?",
                  l.note, l.requested_by
           FROM points_requests r
           LEFT JOIN bonus_ledger l ON l.id = r.ledger_entry_id
           WHERE r.caller = $1 AND r.idempotency_key = $2"#,
        caller,
        key
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    if row.request_hash != fingerprint {
        return Err(ReferralError::IdempotencyKeyReused);
    }
    match (
        row.id,
        row.amount,
        row.reason,
        row.created_at,
        row.balance_after,
    ) {
        (Some(id), Some(amount), Some(reason), Some(created_at), Some(balance)) => {
            Ok(Some(PointsMove {
                entry: LedgerEntry {
                    id,
                    amount,
                    reason,
                    counterpart_user_id: row.counterpart_user_id,
                    created_at,
                    note: row.note,
                    requested_by: row.requested_by,
                },
                balance,
                replayed: true,
            }))
        }
        // Only the inserting transaction ever sees the row without its result.
        _ => Err(ReferralError::Internal(
            "a committed idempotency key without its result".into(),
        )),
    }
}

fn random_shard() -> i16 {
    rand::rng().random_range(0..COUNTER_SHARDS)
}

/// Adds `amount` (negative for a debit) to a random counter shard of `user`.
async fn add_points(
    tx: &mut sqlx::PgConnection,
    user: UserId,
    amount: i64,
) -> Result<(), ReferralError> {
    sqlx::query!(
        "INSERT INTO user_counters (user_id, shard, invitees, points)
         VALUES ($1, $2, 0, $3)
         ON CONFLICT (user_id, shard) DO UPDATE
         SET points = user_counters.points + EXCLUDED.points",
        user.0,
        random_shard(),
        amount
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// `user`'s balance as this statement's snapshot sees it.
async fn balance_in(tx: &mut sqlx::PgConnection, user: UserId) -> Result<i64, ReferralError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT COALESCE(sum(points), 0)::bigint AS "balance!"
           FROM user_counters WHERE user_id = $1"#,
        user.0
    )
    .fetch_one(tx)
    .await?)
}

/// The redemption's statements. Locks the user's row first (see the module docs).
async fn redeem_in(
    tx: &mut sqlx::PgConnection,
    caller: &str,
    request: &PointsRequest,
) -> Result<PointsMove, ReferralError> {
    // FOR NO KEY UPDATE: serializes debits of this user (and waits for a deletion, then sees
    // it), but not credits, whose FOR KEY SHARE (or foreign-key check) it does not block.
    sqlx::query_scalar!(
        "SELECT id FROM users WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
        request.user.0
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ReferralError::NotFound("user"))?;
    // A statement of its own after the lock: its snapshot includes every debit committed
    // before the lock was granted.
    let balance = balance_in(tx, request.user).await?;
    if balance < request.points {
        return Err(ReferralError::InsufficientPoints { balance });
    }
    let amount = -request.points;
    let balance = balance - request.points;
    let entry = insert_entry(tx, caller, request, amount).await?;
    announce(tx, caller, request, &entry, balance).await?;
    add_points(tx, request.user, amount).await?;
    Ok(PointsMove {
        entry,
        balance,
        replayed: false,
    })
}

/// The grant's statements: like an activation credit, a random shard and no row lock beyond
/// FOR KEY SHARE (which keeps the user from being deleted until this commits).
async fn grant_in(
    tx: &mut sqlx::PgConnection,
    caller: &str,
    request: &PointsRequest,
) -> Result<PointsMove, ReferralError> {
    sqlx::query_scalar!(
        "SELECT id FROM users WHERE id = $1 AND deleted_at IS NULL FOR KEY SHARE",
        request.user.0
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ReferralError::NotFound("user"))?;
    add_points(tx, request.user, request.points).await?;
    // This transaction's credit and every other committed one.
    let balance = balance_in(tx, request.user).await?;
    let entry = insert_entry(tx, caller, request, request.points).await?;
    announce(tx, caller, request, &entry, balance).await?;
    Ok(PointsMove {
        entry,
        balance,
        replayed: false,
    })
}

/// Appends `points.redeemed` or `points.granted` (by the entry's sign) to the outbox, in the
/// transaction of the entry. A replayed request returns before this: one event per entry.
async fn announce(
    tx: &mut sqlx::PgConnection,
    caller: &str,
    request: &PointsRequest,
    entry: &LedgerEntry,
    balance: i64,
) -> Result<(), ReferralError> {
    crate::events::append(
        tx,
        crate::events::NewEvent::points_moved(
            request.user.0,
            entry.amount,
            balance,
            entry.id,
            &request.reason,
            caller,
        ),
    )
    .await
}

/// Appends the redemption's or grant's ledger entry.
async fn insert_entry(
    tx: &mut sqlx::PgConnection,
    caller: &str,
    request: &PointsRequest,
    amount: i64,
) -> Result<LedgerEntry, ReferralError> {
    let row = sqlx::query!(
        "INSERT INTO bonus_ledger (user_id, amount, reason, note, requested_by)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING id, created_at",
        request.user.0,
        amount,
        request.ledger_reason(),
        request.reason,
        caller
    )
    .fetch_one(&mut *tx)
    .await?;
    Ok(LedgerEntry {
        id: row.id,
        amount,
        reason: request.ledger_reason().to_owned(),
        counterpart_user_id: None,
        created_at: row.created_at,
        note: Some(request.reason.clone()),
        requested_by: Some(caller.to_owned()),
    })
}

/// Prunes idempotency keys every [`PRUNE_EVERY`] (jittered) until aborted. Safe on every
/// replica at once: each deletes bounded batches and skips rows another is deleting.
pub fn spawn_pruner(repository: Repository) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let jitter = rand::rng().random_range(0..=PRUNE_EVERY.as_millis() / 4);
            let jitter = Duration::from_millis(u64::try_from(jitter).unwrap_or(0));
            tokio::time::sleep(PRUNE_EVERY + jitter).await;
            match repository.prune_idempotency_keys().await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "old idempotency keys pruned"),
                Err(err) => tracing::warn!(%err, "pruning idempotency keys failed; retrying later"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn every_refusal_and_replay_shows_before_the_first() {
        register_metrics();
        let rendered = service_kit::metrics::render();
        for kind in ["redeem", "grant"] {
            let series = format!("refsys_points_replays_total{{kind=\"{kind}\"}} ");
            assert!(
                rendered.contains(&series),
                "{series} missing in\n{rendered}"
            );
            for reason in REFUSAL_REASONS {
                let series =
                    format!("refsys_points_refusals_total{{kind=\"{kind}\",reason=\"{reason}\"}} ");
                assert!(
                    rendered.contains(&series),
                    "{series} missing in\n{rendered}"
                );
            }
        }
    }

    fn parse(points: i64, key: &str, reason: &str) -> Result<PointsRequest, ReferralError> {
        PointsRequest::parse(
            PointsKind::Redeem,
            "0190a4e0-0000-7000-8000-000000000001",
            points,
            key,
            reason,
        )
    }

    fn field(result: Result<PointsRequest, ReferralError>) -> &'static str {
        match result {
            Err(ReferralError::InvalidArgument { field, .. }) => field,
            other => panic!("not an INVALID_ARGUMENT: {other:?}"),
        }
    }

    #[test]
    fn requests_are_validated_field_by_field() {
        let ok = parse(1, "k", " order 1234 ").unwrap();
        assert_eq!(ok.reason, "order 1234", "trimmed");
        assert!(parse(MAX_POINTS, &"~".repeat(200), &"я".repeat(200)).is_ok());
        assert!(
            parse(5, "order 12 / try #1", "x").is_ok(),
            "spaces are printable"
        );
        assert_eq!(
            field(PointsRequest::parse(PointsKind::Grant, "nope", 1, "k", "r")),
            "user_id"
        );
        for points in [0, -1, MAX_POINTS + 1, i64::MIN, i64::MAX] {
            assert_eq!(field(parse(points, "k", "r")), "points", "{points}");
        }
        for key in [
            "",
            &"k".repeat(201),
            "tab\there",
            "ключ",
            "nul\0",
            "del\x7f",
        ] {
            assert_eq!(field(parse(1, key, "r")), "idempotency_key", "{key:?}");
        }
        for reason in ["", "   ", &"x".repeat(201), "line\nbreak", "bell\x07"] {
            assert_eq!(field(parse(1, "k", reason)), "reason", "{reason:?}");
        }
    }

    #[test]
    fn fingerprints_tell_requests_apart() {
        let base = parse(10, "k", "order 1").unwrap();
        let same_but_key = parse(10, "other key", " order 1").unwrap();
        assert_eq!(base.fingerprint(), same_but_key.fingerprint());
        let variants = [
            parse(11, "k", "order 1").unwrap(),
            parse(10, "k", "order 2").unwrap(),
            PointsRequest {
                kind: PointsKind::Grant,
                ..base.clone()
            },
            PointsRequest {
                user: UserId(Uuid::nil()),
                ..base.clone()
            },
        ];
        for variant in variants {
            assert_ne!(base.fingerprint(), variant.fingerprint(), "{variant:?}");
        }
    }

    #[test]
    fn keys_are_kept_at_least_a_day() {
        assert!(KEY_RETENTION >= Duration::from_secs(24 * 3600));
    }
}
