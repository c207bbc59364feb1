//! Scale mode: 1,000,000 users, one inviter with 100,000 invitees, seeded with set-based SQL
//! (not RPC by RPC); then GetProfile, ListInvitees and ActivateInviteCode for that inviter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e_tests::Stack;
use e2e_tests::stack::bearer;
use refsys_proto::referral::v1::{GetProfileRequest, ListInviteesRequest};

use crate::scenarios::Bench;
use crate::stats::Summary;

pub const USERS: i64 = 1_000_000;
pub const INVITEES: i64 = 100_000;
/// The seeded inviter's phone: user 1, the earliest to join.
pub const INVITER_PHONE: &str = "+79000000001";

/// Seeds the database behind `stack` (on top of what earlier scenarios created: a seeded row
/// whose invite code happens to be taken already is skipped). Ids are ordered like UUIDv7 (by join order), invite codes
/// are the user number in base 31 over the invite alphabet (unique), counters match the ledger.
async fn seed(database_url: &str) -> Result<(), sqlx::Error> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await?;
    let statements = [
        format!(
            "INSERT INTO users (id, phone_number, invite_code, created_at, updated_at)
             SELECT lpad(to_hex(g), 32, '0')::uuid,
                    '+7' || (9000000000 + g)::text,
                    (SELECT string_agg(substr('23456789ABCDEFGHJKMNPQRSTUVWXYZ', ((g / (31 ^ k)::bigint) % 31)::int + 1, 1), '' ORDER BY k)
                     FROM generate_series(0, 5) k),
                    now() - interval '30 days' + g * interval '1 millisecond',
                    now()
             FROM generate_series(1, {USERS}) g
             ON CONFLICT DO NOTHING"
        ),
        format!(
            "UPDATE users SET invited_by = lpad(to_hex(1), 32, '0')::uuid,
                              invite_activated_at = created_at + interval '1 second'
             WHERE id BETWEEN lpad(to_hex(2), 32, '0')::uuid AND lpad(to_hex({INVITEES} + 1), 32, '0')::uuid"
        ),
        "INSERT INTO bonus_ledger (user_id, amount, reason, counterpart_user_id, activation_id, created_at)
         SELECT id, 100, 'invite_code_activated', invited_by, id, invite_activated_at FROM users
         WHERE invited_by = lpad(to_hex(1), 32, '0')::uuid
         UNION ALL
         SELECT invited_by, 200, 'invitee_joined', id, id, invite_activated_at FROM users
         WHERE invited_by = lpad(to_hex(1), 32, '0')::uuid"
            .to_owned(),
        "INSERT INTO user_counters (user_id, shard, invitees, points)
         SELECT id, 0, 0, 100 FROM users WHERE invited_by = lpad(to_hex(1), 32, '0')::uuid"
            .to_owned(),
        "INSERT INTO user_counters (user_id, shard, invitees, points)
         SELECT invited_by, (hashtext(id::text) & 15)::smallint AS shard, count(*), count(*) * 200
         FROM users WHERE invited_by = lpad(to_hex(1), 32, '0')::uuid
         GROUP BY invited_by, shard"
            .to_owned(),
        "ANALYZE".to_owned(),
    ];
    // The append-only triggers guard the ledger against changes, not against seeding.
    for statement in statements {
        sqlx::query(&statement).execute(&pool).await?;
    }
    Ok(())
}

pub async fn scale(
    bench: &Arc<Bench>,
    stack: &Stack,
    duration: Duration,
) -> (Vec<Summary>, String) {
    let started = Instant::now();
    if let Err(err) = seed(&stack.database.url).await {
        return (Vec::new(), format!("scale: seeding failed: {err}"));
    }
    let seeded_in = started.elapsed();
    let inviter = match bench.sign_in_phone(0, INVITER_PHONE, None).await {
        Ok(inviter) => inviter,
        Err(status) => {
            return (
                Vec::new(),
                format!("scale: inviter sign-in failed: {status:?}"),
            );
        }
    };
    let token = Arc::new(inviter.access_token.clone());

    let profile = {
        let (bench_for_op, token) = (bench.clone(), token.clone());
        bench
            .run(
                "scale: GetProfile (100k invitees)",
                duration,
                move |worker, _| {
                    let (bench, token) = (bench_for_op.clone(), token.clone());
                    async move {
                        bench
                            .referral_client(worker)
                            .get_profile(bearer(GetProfileRequest {}, &token))
                            .await
                            .map(|_| ())
                    }
                },
            )
            .await
    };
    let first_page = {
        let (bench_for_op, token) = (bench.clone(), token.clone());
        bench
            .run(
                "scale: ListInvitees first page (50)",
                duration,
                move |worker, _| {
                    let (bench, token) = (bench_for_op.clone(), token.clone());
                    async move {
                        bench
                            .referral_client(worker)
                            .list_invitees(bearer(
                                ListInviteesRequest {
                                    page_size: 50,
                                    page_token: String::new(),
                                },
                                &token,
                            ))
                            .await
                            .map(|_| ())
                    }
                },
            )
            .await
    };
    let (activate, note) = bench
        .activate_for(
            duration,
            &inviter.access_token,
            "scale: ActivateInviteCode (100k-invitee inviter)",
        )
        .await;
    (
        vec![profile, first_page, activate],
        format!(
            "scale: seeded {USERS} users and {INVITEES} invitees of one inviter in {:.1} s. {note}",
            seeded_in.as_secs_f64()
        ),
    )
}
