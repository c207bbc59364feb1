//! Postgres storage: users, activations (ledger + rollups in one transaction), lists.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::domain::{InviteCode, PhoneNumber, PhonePepper, PhonePrefix, UserId};
use crate::error::ReferralError;
use crate::events::{self, NewEvent};
use crate::rules::{self, Cursor, Member};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Shards of each user's counters (see the migration).
pub(crate) const COUNTER_SHARDS: i16 = 16;
/// Attempts at a free invite code before giving up (collisions are ~1 in 887 million each);
/// also bounds the retries when the phone's user is deleted while being looked up.
const ENSURE_ATTEMPTS: usize = 8;

/// Requests that waited for a pool connection longer than the acquire timeout
/// (`DATABASE_ACQUIRE_TIMEOUT_SECONDS`): the pool is too small for the load, or queries hold
/// their connections too long. Counted where the error becomes UNAVAILABLE.
pub static POOL_TIMEOUTS: std::sync::LazyLock<service_kit::metrics::IntCounter> =
    std::sync::LazyLock::new(|| {
        service_kit::metrics::counter(
            "refsys_db_pool_timeouts_total",
            "Requests that found no free Postgres pool connection within \
             DATABASE_ACQUIRE_TIMEOUT_SECONDS (answered UNAVAILABLE).",
        )
    });

/// A pool that answers "unavailable" quickly when Postgres is away and heals by itself.
/// How long a pooled connection may sit idle before it is checked with a ping on its way out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

pub async fn connect(
    url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<PgPool, ReferralError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(acquire_timeout)
        // Not `test_before_acquire`: it pings before every statement, a round trip that cost
        // GetProfile a quarter of its rate. A connection that sat idle may have died with the
        // server or the network, so it is pinged; a busy pool's have been idle for microseconds.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy(url)
        .map_err(|err| ReferralError::Unavailable(err.to_string()))
}

/// Points awarded per activation.
#[derive(Debug, Clone, Copy)]
pub struct Bonuses {
    pub invitee: i64,
    pub inviter: i64,
}

/// A user row with the invite code they activated and their counter sums.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub id: Uuid,
    pub phone_number: String,
    pub invite_code: String,
    pub invited_by: Option<Uuid>,
    pub invite_activated_at: Option<DateTime<Utc>>,
    pub activated_invite_code: Option<String>,
    pub first_name: String,
    pub last_name: String,
    pub email: String,
    pub roles: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub bonus_points: i64,
    pub invitees_count: i64,
}

#[derive(Debug, Clone)]
pub struct InviteeRecord {
    pub id: Uuid,
    /// The full E.164 number, masked at the edge; empty for a deleted invitee.
    pub phone_number: String,
    pub activated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub amount: i64,
    pub reason: String,
    /// The other user of an activation entry; `None` for redemptions and grants.
    pub counterpart_user_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    /// Redemptions and grants: the caller's reason.
    pub note: Option<String>,
    /// Redemptions and grants: who asked (a service client id, or "admin:<user id>").
    pub requested_by: Option<String>,
}

/// One page of a list and the cursor of the next page, if any.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

fn paginate<T>(mut rows: Vec<T>, size: i64, cursor_of: impl Fn(&T) -> Cursor) -> Page<T> {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    let next = if rows.len() > size {
        rows.truncate(size);
        rows.last().map(cursor_of)
    } else {
        None
    };
    Page { items: rows, next }
}

/// What an activation awarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Award {
    /// The invitee and the inviter bonuses: two ledger entries and the counters.
    Bonuses,
    /// Nothing: the invitee's phone number already earned an invitee bonus under an account
    /// that was deleted since. The users are linked all the same, so the invitee has used up
    /// their one activation and appears among the inviter's invitees; no ledger entry is
    /// written and no counter moves (the inviter's count and points stay as they were).
    Nothing,
}

/// Why an EnsureUser-time activation did not happen, or that it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InviteOutcome {
    NotProvided,
    Applied,
    Refused(ReferralError),
}

/// What UpdateProfile changes; `None` keeps a field. Values are already validated.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProfileChanges<'a> {
    pub first_name: Option<&'a str>,
    pub last_name: Option<&'a str>,
    pub email: Option<&'a str>,
    /// A code to activate, as with `Repository::activate`.
    pub invite_code: Option<&'a InviteCode>,
}

type CodeGenerator = Arc<dyn Fn() -> InviteCode + Send + Sync>;

#[derive(Clone)]
pub struct Repository {
    pool: PgPool,
    bonuses: Bonuses,
    pepper: PhonePepper,
    generate_code: CodeGenerator,
}

fn violated_constraint(error: &sqlx::Error) -> Option<&str> {
    match error {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

impl Repository {
    /// `pepper` keys the hashes of deleted users' phone numbers (see [`Repository::delete_user`]).
    pub fn new(pool: PgPool, bonuses: Bonuses, pepper: PhonePepper) -> Self {
        Self::with_code_generator(
            pool,
            bonuses,
            pepper,
            Arc::new(|| InviteCode::generate(&mut rand::rng())),
        )
    }

    /// With a chosen invite-code source, so tests can force collisions.
    pub fn with_code_generator(
        pool: PgPool,
        bonuses: Bonuses,
        pepper: PhonePepper,
        generate_code: CodeGenerator,
    ) -> Self {
        // Shown as 0 from the start, so the first timeout is an increase.
        std::sync::LazyLock::force(&POOL_TIMEOUTS);
        Self {
            pool,
            bonuses,
            pepper,
            generate_code,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether Postgres answers (for readiness); also publishes the pool's occupancy.
    pub async fn is_reachable(&self) -> bool {
        static POOL: std::sync::LazyLock<service_kit::metrics::IntGaugeVec> =
            std::sync::LazyLock::new(|| {
                service_kit::metrics::gauge_vec(
                    "refsys_db_pool_connections",
                    "Postgres pool connections by state (idle, in_use).",
                    &["state"],
                )
            });
        static POOL_MAX: std::sync::LazyLock<service_kit::metrics::IntGaugeVec> =
            std::sync::LazyLock::new(|| {
                service_kit::metrics::gauge_vec(
                    "refsys_db_pool_max_connections",
                    "Postgres pool size limit (DATABASE_MAX_CONNECTIONS).",
                    &[],
                )
            });
        let size = i64::from(self.pool.size());
        let idle = i64::try_from(self.pool.num_idle()).unwrap_or(i64::MAX);
        POOL.with_label_values(&["idle"]).set(idle);
        POOL.with_label_values(&["in_use"]).set(size - idle);
        POOL_MAX
            .with_label_values(&[] as &[&str])
            .set(i64::from(self.pool.options().get_max_connections()));
        sqlx::query_scalar!("SELECT 1 AS \"one!\"")
            .fetch_one(&self.pool)
            .await
            .is_ok()
    }

    /// The live user with `phone`, created on first sign-in; `true` when this call created
    /// them. Concurrent calls for one new phone create one user. A deleted user no longer holds
    /// their number, so the same phone signing up again is a new user (new id, no points).
    pub async fn ensure_user(
        &self,
        phone: &PhoneNumber,
    ) -> Result<(UserRecord, bool), ReferralError> {
        for _ in 0..ENSURE_ATTEMPTS {
            let id = Uuid::now_v7();
            let code = (self.generate_code)();
            // The user and its `user.created` event commit together.
            let mut tx = self.pool.begin().await?;
            let inserted = sqlx::query_scalar!(
                "INSERT INTO users (id, phone_number, invite_code) VALUES ($1, $2, $3)
                 ON CONFLICT (phone_number) DO NOTHING
                 RETURNING created_at",
                id,
                phone.e164(),
                code.as_str()
            )
            .fetch_optional(&mut *tx)
            .await;
            match inserted {
                Ok(Some(created_at)) => {
                    events::append(&mut tx, NewEvent::user_created(id, code.as_str())).await?;
                    tx.commit().await?;
                    // Everything else of a new user is a column default or an empty counter:
                    // no second read (a sign-up's heaviest statement was reading it back).
                    let user = UserRecord {
                        id,
                        phone_number: phone.e164().to_owned(),
                        invite_code: code.as_str().to_owned(),
                        invited_by: None,
                        invite_activated_at: None,
                        activated_invite_code: None,
                        first_name: String::new(),
                        last_name: String::new(),
                        email: String::new(),
                        roles: Vec::new(),
                        created_at,
                        bonus_points: 0,
                        invitees_count: 0,
                    };
                    return Ok((user, true));
                }
                Ok(None) => {
                    drop(tx);
                    let id = sqlx::query_scalar!(
                        "SELECT id FROM users WHERE phone_number = $1",
                        phone.e164()
                    )
                    .fetch_optional(&self.pool)
                    .await?;
                    // The owner was deleted between the insert and these reads: the number is
                    // free again, so try the insert once more.
                    match id {
                        Some(id) => match self.user(UserId(id)).await {
                            Ok(user) => return Ok((user, false)),
                            Err(ReferralError::NotFound(_)) => continue,
                            Err(err) => return Err(err),
                        },
                        None => continue,
                    }
                }
                Err(err) if violated_constraint(&err) == Some("users_invite_code_key") => continue,
                Err(err) => return Err(err.into()),
            }
        }
        Err(ReferralError::Internal(
            "no free invite code, or the phone's user kept being deleted, after several attempts"
                .into(),
        ))
    }

    /// A live user with the activated code and counter sums; NOT_FOUND for a deleted one.
    pub async fn user(&self, id: UserId) -> Result<UserRecord, ReferralError> {
        Ok(self.profile(id, 0).await?.0)
    }

    /// A live user with their first `invitees` invitees (earliest first, deleted ones included
    /// with an empty phone number), in one round trip: a profile read is the hottest call, and a
    /// second query per call costs as much as the first. NOT_FOUND for a deleted user.
    pub async fn profile(
        &self,
        id: UserId,
        invitees: i64,
    ) -> Result<(UserRecord, Vec<InviteeRecord>), ReferralError> {
        let row = sqlx::query!(
            r#"SELECT u.id, u.phone_number AS "phone_number!", u.invite_code, u.invited_by,
                      u.invite_activated_at, i.invite_code AS "activated_invite_code?",
                      u.first_name, u.last_name, u.email, u.roles, u.created_at,
                      c.points AS "bonus_points!", c.invitees AS "invitees_count!",
                      f.ids AS "invitee_ids!: Vec<Uuid>",
                      f.phones AS "invitee_phones!: Vec<String>",
                      f.activated AS "invitee_activated_at!: Vec<DateTime<Utc>>"
               FROM users u
               LEFT JOIN users i ON i.id = u.invited_by
               CROSS JOIN LATERAL (
                   SELECT COALESCE(sum(points), 0)::bigint AS points,
                          COALESCE(sum(invitees), 0)::bigint AS invitees
                   FROM user_counters WHERE user_id = u.id
               ) c
               CROSS JOIN LATERAL (
                   SELECT COALESCE(array_agg(s.id ORDER BY s.invite_activated_at, s.id), '{}') AS ids,
                          COALESCE(array_agg(s.phone_number ORDER BY s.invite_activated_at, s.id), '{}') AS phones,
                          COALESCE(array_agg(s.invite_activated_at ORDER BY s.invite_activated_at, s.id), '{}') AS activated
                   FROM (
                       SELECT id, COALESCE(phone_number, '') AS phone_number, invite_activated_at
                       FROM users
                       WHERE invited_by = u.id
                       ORDER BY invite_activated_at, id
                       LIMIT $2
                   ) s
               ) f
               WHERE u.id = $1 AND u.deleted_at IS NULL"#,
            id.0,
            invitees
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(ReferralError::NotFound("user"))?;
        let invitees = row
            .invitee_ids
            .into_iter()
            .zip(row.invitee_phones)
            .zip(row.invitee_activated_at)
            .map(|((id, phone_number), activated_at)| InviteeRecord {
                id,
                phone_number,
                activated_at,
            })
            .collect();
        let user = UserRecord {
            id: row.id,
            phone_number: row.phone_number,
            invite_code: row.invite_code,
            invited_by: row.invited_by,
            invite_activated_at: row.invite_activated_at,
            activated_invite_code: row.activated_invite_code,
            first_name: row.first_name,
            last_name: row.last_name,
            email: row.email,
            roles: row.roles,
            created_at: row.created_at,
            bonus_points: row.bonus_points,
            invitees_count: row.invitees_count,
        };
        Ok((user, invitees))
    }

    /// Activates `code` for `invitee`: the link, two ledger entries and the rollups, in one
    /// transaction. The invitee's row is locked, so one user racing several codes wins once.
    /// A deleted user's code is NOT_FOUND, like a code nobody has; a deleted invitee is
    /// NOT_FOUND too. A phone number that earned the invitee bonus before (under an account
    /// since deleted) is linked without any bonus: [`Award::Nothing`].
    pub async fn activate(
        &self,
        invitee: UserId,
        code: &InviteCode,
    ) -> Result<Award, ReferralError> {
        let mut tx = self.pool.begin().await?;
        let award = self.activate_in(&mut tx, invitee, code).await?;
        tx.commit().await?;
        Ok(award)
    }

    /// The activation's statements, inside the caller's transaction.
    ///
    /// Locks, in this order: the invitee's row (FOR UPDATE), then the code owner's row (FOR KEY
    /// SHARE, the lock the foreign keys to the owner take anyway), then counter shards.
    /// `delete_user` locks only the deleted user's row (FOR UPDATE), so the two never deadlock:
    /// an activation holding the owner's row finishes before the owner's deletion starts, and
    /// one that comes after finds the code gone.
    async fn activate_in(
        &self,
        tx: &mut sqlx::PgConnection,
        invitee: UserId,
        code: &InviteCode,
    ) -> Result<Award, ReferralError> {
        let me = sqlx::query!(
            r#"SELECT id, created_at, invited_by, phone_number AS "phone_number!"
               FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"#,
            invitee.0
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ReferralError::NotFound("user"))?;
        let phone_hash = self.pepper.hash_e164(&me.phone_number);
        // Whether this number was rewarded before is read with the owner, in the same round
        // trip.
        let owner = sqlx::query!(
            r#"SELECT id, created_at,
                      EXISTS (SELECT 1 FROM rewarded_phone_hashes WHERE phone_hash = $2)
                          AS "rewarded_before!"
               FROM users WHERE invite_code = $1 AND deleted_at IS NULL
               FOR KEY SHARE"#,
            code.as_str(),
            &phone_hash[..]
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ReferralError::NotFound("invite code"))?;
        rules::check_activation(
            &Member {
                id: UserId(me.id),
                created_at: me.created_at,
                already_invited: me.invited_by.is_some(),
            },
            &Member {
                id: UserId(owner.id),
                created_at: owner.created_at,
                already_invited: false,
            },
        )?;
        let linked = sqlx::query!(
            "UPDATE users SET invited_by = $2, invite_activated_at = now(), updated_at = now()
             WHERE id = $1 AND invited_by IS NULL",
            me.id,
            owner.id
        )
        .execute(&mut *tx)
        .await?;
        // The row lock makes this impossible; checked anyway, so a bonus is never written twice.
        if linked.rows_affected() != 1 {
            return Err(ReferralError::AlreadyActivated);
        }
        if owner.rewarded_before {
            tracing::info!(
                invitee = %me.id,
                inviter = %owner.id,
                "invite code activated by a number that earned the bonus before: no bonus"
            );
            events::append(tx, NewEvent::invite_activated(me.id, owner.id, 0, 0)).await?;
            return Ok(Award::Nothing);
        }
        sqlx::query!(
            "INSERT INTO bonus_ledger (user_id, amount, reason, counterpart_user_id, activation_id)
             VALUES ($1, $2, 'invite_code_activated', $3, $1),
                    ($3, $4, 'invitee_joined', $1, $1)",
            me.id,
            self.bonuses.invitee,
            owner.id,
            self.bonuses.inviter
        )
        .execute(&mut *tx)
        .await?;
        let (invitee_shard, inviter_shard) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..COUNTER_SHARDS),
                rng.random_range(0..COUNTER_SHARDS),
            )
        };
        sqlx::query!(
            "INSERT INTO user_counters (user_id, shard, invitees, points)
             VALUES ($1, $2, 0, $3), ($4, $5, 1, $6)
             ON CONFLICT (user_id, shard) DO UPDATE
             SET invitees = user_counters.invitees + EXCLUDED.invitees,
                 points = user_counters.points + EXCLUDED.points",
            me.id,
            invitee_shard,
            self.bonuses.invitee,
            owner.id,
            inviter_shard,
            self.bonuses.inviter
        )
        .execute(&mut *tx)
        .await?;
        events::append(
            tx,
            NewEvent::invite_activated(me.id, owner.id, self.bonuses.invitee, self.bonuses.inviter),
        )
        .await?;
        Ok(Award::Bonuses)
    }

    /// Activation at sign-in: a refusal is an outcome, not an error; outages still are errors.
    /// An activation that awards nothing (a re-joined number) is still `Applied`.
    pub async fn activate_at_sign_in(
        &self,
        invitee: UserId,
        code: Option<&str>,
    ) -> Result<InviteOutcome, ReferralError> {
        // A blank code (a client that always sends the field) is no code.
        let Some(code) = code.filter(|code| !code.trim().is_empty()) else {
            return Ok(InviteOutcome::NotProvided);
        };
        let result = match InviteCode::parse(code) {
            Ok(code) => self.activate(invitee, &code).await,
            Err(err) => Err(err),
        };
        match result {
            Ok(_) => Ok(InviteOutcome::Applied),
            Err(err @ (ReferralError::Unavailable(_) | ReferralError::Internal(_))) => Err(err),
            Err(refusal) => Ok(InviteOutcome::Refused(refusal)),
        }
    }

    /// Changes the given profile fields (`None` keeps a field).
    pub async fn update_fields(
        &self,
        id: UserId,
        first_name: Option<&str>,
        last_name: Option<&str>,
        email: Option<&str>,
    ) -> Result<(), ReferralError> {
        self.update_profile(
            id,
            &ProfileChanges {
                first_name,
                last_name,
                email,
                invite_code: None,
            },
        )
        .await
    }

    /// UpdateProfile: activates `changes.invite_code` (if any, under the rules of `activate`)
    /// and sets the given fields, all in one transaction, so a failure changes nothing.
    pub async fn update_profile(
        &self,
        id: UserId,
        changes: &ProfileChanges<'_>,
    ) -> Result<(), ReferralError> {
        let mut tx = self.pool.begin().await?;
        if let Some(code) = changes.invite_code {
            self.activate_in(&mut tx, id, code).await?;
        }
        // `deleted_at IS NULL` is re-checked after waiting for a concurrent deletion's lock, so
        // an update racing a deletion never writes names back into an erased row.
        let updated = sqlx::query!(
            "UPDATE users SET first_name = COALESCE($2, first_name),
                              last_name = COALESCE($3, last_name),
                              email = COALESCE($4, email),
                              updated_at = now()
             WHERE id = $1 AND deleted_at IS NULL",
            id.0,
            changes.first_name,
            changes.last_name,
            changes.email
        )
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(ReferralError::NotFound("user"));
        }
        // Which fields, never their values.
        let fields: Vec<String> = [
            ("first_name", changes.first_name.is_some()),
            ("last_name", changes.last_name.is_some()),
            ("email", changes.email.is_some()),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| name.to_owned())
        .collect();
        if !fields.is_empty() {
            events::append(&mut tx, NewEvent::profile_updated(id.0, fields)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The users who activated `inviter`'s code, earliest first; deleted ones stay, with an
    /// empty phone number.
    pub async fn invitees(
        &self,
        inviter: UserId,
        after: Option<&Cursor>,
        size: i64,
    ) -> Result<Page<InviteeRecord>, ReferralError> {
        let (after_time, after_id) = match after {
            None => (DateTime::<Utc>::UNIX_EPOCH, Uuid::nil()),
            Some(Cursor::TimeAndUser(at, id)) => (*at, id.0),
            Some(_) => return Err(rules::foreign_page_token()),
        };
        let rows = sqlx::query_as!(
            InviteeRecord,
            r#"SELECT id, COALESCE(phone_number, '') AS "phone_number!",
                      invite_activated_at AS "activated_at!"
               FROM users
               WHERE invited_by = $1 AND (invite_activated_at, id) > ($2, $3)
               ORDER BY invite_activated_at, id
               LIMIT $4"#,
            inviter.0,
            after_time,
            after_id,
            size + 1
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(paginate(rows, size, |row| {
            Cursor::TimeAndUser(row.activated_at, UserId(row.id))
        }))
    }

    /// The user's ledger, newest first; NOT_FOUND for a deleted user (whose entries stay, for
    /// the accounting, but are no longer theirs to read).
    pub async fn ledger(
        &self,
        user: UserId,
        after: Option<&Cursor>,
        size: i64,
    ) -> Result<Page<LedgerEntry>, ReferralError> {
        let below = match after {
            None => i64::MAX,
            Some(Cursor::Entry(id)) => *id,
            Some(_) => return Err(rules::foreign_page_token()),
        };
        // One round trip: no row means no live user, one row without an entry an empty page.
        let rows = sqlx::query!(
            r#"SELECT l.id AS "id?", l.amount AS "amount?", l.reason AS "reason?",
                      l.counterpart_user_id AS "counterpart_user_id?",
                      l.created_at AS "created_at?", l.note AS "note?",
                      l.requested_by AS "requested_by?"
               FROM users u
               LEFT JOIN LATERAL (
                   SELECT id, amount, reason, counterpart_user_id, created_at, note, requested_by
                   FROM bonus_ledger
                   WHERE user_id = u.id AND id < $2
                   ORDER BY id DESC
                   LIMIT $3
               ) l ON true
               WHERE u.id = $1 AND u.deleted_at IS NULL"#,
            user.0,
            below,
            size + 1
        )
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Err(ReferralError::NotFound("user"));
        }
        let entries = rows
            .into_iter()
            .filter_map(|row| {
                Some(LedgerEntry {
                    id: row.id?,
                    amount: row.amount?,
                    reason: row.reason?,
                    counterpart_user_id: row.counterpart_user_id,
                    created_at: row.created_at?,
                    note: row.note,
                    requested_by: row.requested_by,
                })
            })
            .collect();
        Ok(paginate(entries, size, |row| Cursor::Entry(row.id)))
    }

    /// Live users by id (sign-up order), optionally only those whose phone starts with `prefix`.
    pub async fn users(
        &self,
        prefix: Option<&PhonePrefix>,
        after: Option<&Cursor>,
        size: i64,
    ) -> Result<Page<UserRecord>, ReferralError> {
        let after_id = match after {
            None => Uuid::nil(),
            Some(Cursor::User(id)) => id.0,
            Some(_) => return Err(rules::foreign_page_token()),
        };
        // PhonePrefix::parse admits only '+' and 1 to 15 ASCII digits, so the prefix holds no LIKE
        // wildcard ('%', '_') or escape ('\'): the one '%' is the one appended here.
        let pattern = format!("{}%", prefix.map_or("", PhonePrefix::as_str));
        let rows = sqlx::query_as!(
            UserRecord,
            r#"SELECT u.id, u.phone_number AS "phone_number!", u.invite_code, u.invited_by,
                      u.invite_activated_at, i.invite_code AS "activated_invite_code?",
                      u.first_name, u.last_name, u.email, u.roles, u.created_at,
                      c.points AS "bonus_points!", c.invitees AS "invitees_count!"
               FROM users u
               LEFT JOIN users i ON i.id = u.invited_by
               CROSS JOIN LATERAL (
                   SELECT COALESCE(sum(points), 0)::bigint AS points,
                          COALESCE(sum(invitees), 0)::bigint AS invitees
                   FROM user_counters WHERE user_id = u.id
               ) c
               WHERE u.phone_number LIKE $1 AND u.id > $2 AND u.deleted_at IS NULL
               ORDER BY u.id
               LIMIT $3"#,
            pattern,
            after_id,
            size + 1
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(paginate(rows, size, |row| Cursor::User(UserId(row.id))))
    }

    /// Gives the user with `phone` the admin role; false when no such user exists.
    pub async fn grant_admin(&self, phone: &PhoneNumber) -> Result<bool, ReferralError> {
        let found = sqlx::query_scalar!(
            r#"UPDATE users
               SET roles = CASE WHEN 'admin' = ANY(roles) THEN roles ELSE array_append(roles, 'admin') END,
                   updated_at = now()
               WHERE phone_number = $1
               RETURNING id"#,
            phone.e164()
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    /// Takes the admin role from the user with `phone`: `None` when no such user exists,
    /// otherwise whether they had it.
    pub async fn revoke_admin(&self, phone: &PhoneNumber) -> Result<Option<bool>, ReferralError> {
        let had_it = sqlx::query_scalar!(
            r#"UPDATE users u
               SET roles = array_remove(u.roles, 'admin'), updated_at = now()
               FROM (SELECT id, 'admin' = ANY(roles) AS had_it
                     FROM users WHERE phone_number = $1 FOR UPDATE) before
               WHERE u.id = before.id
               RETURNING before.had_it AS "had_it!""#,
            phone.e164()
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(had_it)
    }

    /// A live user's roles now (LookupUser); NOT_FOUND for an unknown or deleted user.
    pub async fn roles(&self, id: UserId) -> Result<Vec<String>, ReferralError> {
        sqlx::query_scalar!(
            "SELECT roles FROM users WHERE id = $1 AND deleted_at IS NULL",
            id.0
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(ReferralError::NotFound("user"))
    }

    /// Erases a user and keeps the accounting, in one transaction: the phone number, names,
    /// e-mail and roles go; the id, the invite code (kept reserved, so it is never handed to
    /// anyone else, yet activating it is NOT_FOUND), the referral links both ways, the ledger
    /// and the counters stay, so the inviter keeps their count and points and the user still
    /// appears among their invitees, without a number. If the user had activated an invite
    /// code (earning the invitee bonus), the peppered hash of their number is kept, so the
    /// number signing up again is never rewarded again.
    ///
    /// `true` when this call deleted the user, `false` when they were already deleted (so of
    /// parallel calls exactly one sees `true`); NOT_FOUND for an id that never existed.
    pub async fn delete_user(&self, id: UserId) -> Result<bool, ReferralError> {
        let mut tx = self.pool.begin().await?;
        // The one lock this takes (see `activate_in` for the order). After waiting for it, the
        // row is read as the previous holder left it: a parallel deletion's result included.
        let row = sqlx::query!(
            r#"SELECT phone_number, invited_by IS NOT NULL AS "activated!"
               FROM users WHERE id = $1 FOR UPDATE"#,
            id.0
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ReferralError::NotFound("user"))?;
        let Some(phone_number) = row.phone_number else {
            return Ok(false);
        };
        if row.activated {
            let phone_hash = self.pepper.hash_e164(&phone_number);
            sqlx::query!(
                "INSERT INTO rewarded_phone_hashes (phone_hash) VALUES ($1)
                 ON CONFLICT (phone_hash) DO NOTHING",
                &phone_hash[..]
            )
            .execute(&mut *tx)
            .await?;
        }
        // clock_timestamp(), not now(): the time of the deletion, after any wait for the lock.
        sqlx::query!(
            "UPDATE users
             SET phone_number = NULL, first_name = '', last_name = '', email = '', roles = '{}',
                 deleted_at = clock_timestamp(), updated_at = clock_timestamp()
             WHERE id = $1",
            id.0
        )
        .execute(&mut *tx)
        .await?;
        events::append(&mut tx, NewEvent::user_deleted(id.0)).await?;
        tx.commit().await?;
        Ok(true)
    }
}
