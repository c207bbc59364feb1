//! Same-run ceilings: what the stores alone do with exactly the work one call of a scenario
//! needs from them, on the stack's own database and Redis, right after the scenario ran.
//!
//! - **Postgres:** pgbench (`-M prepared -n`, 16 clients like referral-service's pool) with a
//!   script holding the scenario's own SQL, read from referral-service's source at build time
//!   (`include_str!`), so a changed query changes its ceiling with it. The users it reads and
//!   activates are seeded with computable ids (`lpad(to_hex(g), 32, '0')::uuid`), which pgbench
//!   picks with `\set`.
//! - **Redis:** the commands auth-service sends for one call, recorded with `MONITOR` while
//!   the load generator makes one such call, then replayed by `concurrency` connections
//!   with the call's keys renamed per replay (a fresh phone per sign-in; per refresh the next
//!   link of a chain of token hashes on a family of the caller's own). Being recorded, the
//!   sequence is whatever auth-service does today: scripts, keys and arguments.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::resp::{Connection, Reply, parse_monitor_line};

const STORAGE: &str = include_str!("../../referral-service/src/storage.rs");
const EVENTS: &str = include_str!("../../referral-service/src/events.rs");

/// pgbench clients: referral-service's pool size in the throughput stack
/// (`DATABASE_MAX_CONNECTIONS=16`).
pub const PG_CLIENTS: usize = 16;

/// Where the seeded ceiling users' numbers start (`g`, hex in the uuid): far above the scale
/// scenario's 1..=1,000,000.
const BASE: i64 = 0xce11 << 32;
/// Inviters with [`INVITEES_EACH`] invitees each, read by the GetProfile and LookupUser
/// ceilings.
const INVITERS: i64 = 1000;
const INVITEES_EACH: i64 = 10;
/// Fresh users per pgbench client for the activation ceiling start here.
const FRESH: i64 = BASE + 1_000_000;

/// Fresh users per pgbench client for an activation ceiling of `seconds`: more than one
/// client can activate in that time.
fn fresh_each(seconds: u64) -> i64 {
    3000 * i64::try_from(seconds).unwrap_or(5).max(1)
}

/// The uuid of seeded user number `g` (pgbench expression or SQL).
fn uid(g: &str) -> String {
    format!("lpad(to_hex(({g})::bigint), 32, '0')::uuid")
}

/// The `nth` (0-based) SQL string literal passed to `sqlx::query…` inside function `function`
/// of `source`; raw (`r#"…"#`) or plain (escapes undone).
pub fn sql_in(source: &str, function: &str, nth: usize) -> Option<String> {
    let body = &source[source.find(&format!("fn {function}("))?..];
    let mut rest = body;
    for _ in 0..nth {
        rest = &rest[rest.find("sqlx::query")? + 1..];
    }
    rest = &rest[rest.find("sqlx::query")?..];
    let (raw, quote) = match (rest.find("r#\""), rest.find('"')) {
        (Some(r), Some(q)) if r + 2 == q => (true, q),
        (_, Some(q)) => (false, q),
        _ => return None,
    };
    let text = &rest[quote + 1..];
    if raw {
        return Some(text[..text.find("\"#")?].to_owned());
    }
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}

/// `sql` with `$1`, `$2`, … replaced by `values[0]`, `values[1]`, … (highest first, so `$1`
/// never eats the start of `$10`), ended with `;` for pgbench.
fn bind(sql: &str, values: &[&str]) -> String {
    let mut sql = sql.to_owned();
    for (i, value) in values.iter().enumerate().rev() {
        sql = sql.replace(&format!("${}", i + 1), value);
    }
    format!("{};\n", sql.trim())
}

/// A ceiling measured (ops/s) or why not.
pub type Measured = Result<f64, String>;

/// The pgbench scripts of the scenarios, on a database seeded for them.
pub struct Postgres {
    url: String,
    /// The code of the inviter every activation ceiling transaction activates (one hot
    /// inviter, as in the scenario), and that inviter's id.
    hot_code: String,
    hot_id: String,
}

impl Postgres {
    /// Seeds the ceiling users into `url`'s database (on top of whatever the scenarios made).
    pub async fn prepare(url: &str, seconds: u64) -> Result<Self, String> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // Enough fresh invitees per client for more activations than Postgres can commit.
        let fresh_each = fresh_each(seconds);
        let code = "(SELECT string_agg(substr('23456789ABCDEFGHJKMNPQRSTUVWXYZ', \
                    (((g - {BASE} + 100000000) / (31 ^ k)::bigint) % 31)::int + 1, 1), '' ORDER BY k) \
                    FROM generate_series(0, 5) k)"
            .replace("{BASE}", &BASE.to_string());
        // Invitee g belongs to inviter (g - first invitee) / INVITEES_EACH + 1.
        let first_invitee = BASE + INVITERS + 1;
        let last_invitee = BASE + INVITERS + INVITERS * INVITEES_EACH;
        let users = |from: i64, to: i64, invited: bool| {
            let (inviter, activated) = if invited {
                (
                    uid(&format!(
                        "{BASE} + 1 + (g - {first_invitee}) / {INVITEES_EACH}"
                    )),
                    "now()",
                )
            } else {
                ("NULL".to_owned(), "NULL")
            };
            format!(
                "INSERT INTO users (id, phone_number, invite_code, invited_by, invite_activated_at) \
                 SELECT {}, '+75' || lpad((g - {BASE})::text, 9, '0'), {code}, {inviter}, {activated} \
                 FROM generate_series({from}, {to}) g ON CONFLICT DO NOTHING",
                uid("g")
            )
        };
        let statements = [
            users(BASE + 1, BASE + INVITERS, false),
            users(first_invitee, last_invitee, true),
            users(FRESH, FRESH + (PG_CLIENTS as i64) * fresh_each, false),
            format!(
                "INSERT INTO user_counters (user_id, shard, invitees, points) \
                 SELECT id, 0, {INVITEES_EACH}, {INVITEES_EACH} * 200 FROM users \
                 WHERE id BETWEEN {} AND {} ON CONFLICT DO NOTHING",
                uid(&(BASE + 1).to_string()),
                uid(&(BASE + INVITERS).to_string()),
            ),
            "ANALYZE users".to_owned(),
        ];
        for statement in &statements {
            sqlx::query(statement)
                .execute(&pool)
                .await
                .map_err(|e| format!("seeding: {e}"))?;
        }
        let (hot_id, hot_code): (String, String) = sqlx::query_as(&format!(
            "SELECT id::text, invite_code FROM users WHERE id = {}",
            uid(&(BASE + 1).to_string())
        ))
        .fetch_one(&pool)
        .await
        .map_err(|e| format!("the hot inviter: {e}"))?;
        pool.close().await;
        Ok(Self {
            url: url.to_owned(),
            hot_code,
            hot_id,
        })
    }

    /// GetProfile's one query for a random seeded inviter (10 invitees each).
    pub fn profile_script() -> Result<String, String> {
        let sql = sql_in(STORAGE, "profile", 0).ok_or("no query in Repository::profile")?;
        let invitees = profile_invitees().ok_or("no PROFILE_INVITEES in rules.rs")?;
        Ok(format!(
            "\\set g random({}, {})\n{}",
            BASE + 1,
            BASE + INVITERS,
            bind(&sql, &[&uid(":g"), &invitees])
        ))
    }

    /// LookupUser's query (the live roles a refresh reads) for a random seeded user.
    pub fn lookup_script() -> Result<String, String> {
        let sql = sql_in(STORAGE, "roles", 0).ok_or("no query in Repository::roles")?;
        Ok(format!(
            "\\set g random({}, {})\n{}",
            BASE + 1,
            BASE + INVITERS + INVITERS * INVITEES_EACH,
            bind(&sql, &[&uid(":g")])
        ))
    }

    /// The activation transaction's statements (Repository::activate_in, then the outbox
    /// append), each client activating its next fresh user with the hot inviter's code.
    fn activation_script(&self, fresh_each: i64) -> Result<String, String> {
        let stmt =
            |n| sql_in(STORAGE, "activate_in", n).ok_or(format!("no query {n} in activate_in"));
        let append = sql_in(EVENTS, "append", 0).ok_or("no query in events::append")?;
        let me = uid(":inv");
        let owner = format!("'{}'::uuid", self.hot_id);
        let code = format!("'{}'", self.hot_code);
        Ok([
            "\\set n :n + 1\n".to_owned(),
            format!("\\set inv {FRESH} + :client_id * {fresh_each} + :n\n"),
            "\\set s1 random(0, 15)\n\\set s2 random(0, 15)\nBEGIN;\n".to_owned(),
            bind(&stmt(0)?, &[&me]),
            bind(&stmt(1)?, &[&code, "sha256(:inv::text::bytea)"]),
            bind(&stmt(2)?, &[&me, &owner]),
            bind(&stmt(3)?, &[&me, "100", &owner, "200"]),
            bind(&stmt(4)?, &[&me, ":s1", "100", &owner, ":s2", "200"]),
            bind(
                &append,
                &[
                    "gen_random_uuid()",
                    "'refsys.referral.invite.activated'",
                    &me,
                    // An encoded InviteActivated event is about this long.
                    "'\\x0a2408011220'::bytea || sha256(:inv::text::bytea)",
                    "'refsys_events'",
                ],
            ),
            "COMMIT;\n".to_owned(),
        ]
        .concat())
    }

    pub async fn profile(&self, seconds: u64) -> Measured {
        pgbench(&self.url, "profile", &Self::profile_script()?, seconds, &[]).await
    }

    pub async fn lookup(&self, seconds: u64) -> Measured {
        pgbench(&self.url, "lookup", &Self::lookup_script()?, seconds, &[]).await
    }

    pub async fn activation(&self, seconds: u64) -> Measured {
        let script = self.activation_script(fresh_each(seconds))?;
        pgbench(&self.url, "activation", &script, seconds, &["n=0"]).await
    }
}

/// How many invitees GetProfile reads (`rules::PROFILE_INVITEES`).
fn profile_invitees() -> Option<String> {
    let rules = include_str!("../../referral-service/src/rules.rs");
    let value = rules.split("const PROFILE_INVITEES: i64 = ").nth(1)?;
    Some(value[..value.find(';')?].trim().to_owned())
}

/// Runs pgbench with `script` for `seconds` and returns its `tps`.
async fn pgbench(url: &str, name: &str, script: &str, seconds: u64, defines: &[&str]) -> Measured {
    let path = std::env::temp_dir().join(format!("loadgen-{}-{name}.sql", std::process::id()));
    std::fs::write(&path, script).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut command = tokio::process::Command::new("pgbench");
    command.args(["-n", "-M", "prepared", "-j", "2"]);
    command.args(["-c", &PG_CLIENTS.to_string(), "-T", &seconds.to_string()]);
    for define in defines {
        command.args(["-D", define]);
    }
    command.arg("-f").arg(&path).arg(url);
    let output = command
        .output()
        .await
        .map_err(|e| format!("pgbench: {e}"))?;
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let failed = stdout
        .lines()
        .find_map(|line| line.strip_prefix("number of failed transactions: "))
        .and_then(|n| n.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    let tps = stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|line| line.split_whitespace().next()?.parse::<f64>().ok());
    match tps {
        Some(tps) if output.status.success() && failed == 0 => Ok(tps),
        _ => Err(format!(
            "pgbench {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .find(|l| l.contains("ERROR") || l.contains("error"))
                .unwrap_or("no tps")
        )),
    }
}

/// One recorded command: its arguments.
type Command = Vec<Vec<u8>>;

/// Records the commands other clients send to the Redis on `port` while `during` runs.
pub async fn record<F: std::future::Future>(port: u16, during: F) -> (F::Output, Vec<Command>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut monitor = Connection::open(port).await.ok();
    if let Some(conn) = monitor.as_mut()
        && !matches!(conn.call(&["MONITOR"]).await, Ok(Reply::Status(_)))
    {
        monitor = None;
    }
    let reader = monitor.map(|mut monitor| {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Reply::Status(line)) = monitor.read().await {
                if let Some((client, args)) = parse_monitor_line(&line)
                    // Commands a script runs are shown too, from client "lua".
                    && client != "lua"
                    && !args.is_empty()
                {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(args);
                }
            }
        })
    });
    let output = during.await;
    // MONITOR lines trail the commands a little.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(reader) = reader {
        reader.abort();
    }
    let commands = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    let commands = commands
        .into_iter()
        .filter(|args| {
            // Health checks and connection set-up are not part of the call.
            let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
            !matches!(
                name.as_str(),
                "PING" | "INFO" | "CLIENT" | "HELLO" | "SELECT"
            )
        })
        .collect();
    (output, commands)
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return haystack.to_vec();
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// How one replay renames the recorded call's values: `(recorded, this replay's)`.
pub type Renames = Vec<(Vec<u8>, Vec<u8>)>;

/// Replays `commands` (one call's) over and over on `concurrency` connections for `duration`,
/// each replay with `renames(worker, n)` applied; returns replays per second. A replay with
/// an error reply fails the ceiling.
pub async fn replay(
    port: u16,
    commands: Arc<Vec<Command>>,
    concurrency: usize,
    duration: Duration,
    renames: Arc<dyn Fn(usize, u64) -> Renames + Send + Sync>,
) -> Measured {
    if commands.is_empty() {
        return Err("no Redis commands were recorded".into());
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (commands, renames) = (commands.clone(), renames.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::open(port)
                .await
                .map_err(|e| format!("redis: {e}"))?;
            let mut done = 0u64;
            while Instant::now() < deadline {
                let renames = renames(worker, done);
                for command in commands.iter() {
                    let args: Vec<Vec<u8>> = command
                        .iter()
                        .map(|arg| {
                            renames
                                .iter()
                                .fold(arg.clone(), |arg, (from, to)| replace(&arg, from, to))
                        })
                        .collect();
                    match conn.call(&args).await {
                        Ok(Reply::Error(err)) => {
                            return Err(format!(
                                "{} answered {err}",
                                String::from_utf8_lossy(&args[0])
                            ));
                        }
                        Ok(_) => {}
                        Err(err) => return Err(format!("redis: {err}")),
                    }
                }
                done += 1;
            }
            Ok(done)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.map_err(|e| e.to_string())??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The value between `start` and `end` in the first argument holding `start`, of the first
/// command named `name`.
pub fn find_value(commands: &[Command], name: &str, start: &str, end: &str) -> Option<Vec<u8>> {
    commands
        .iter()
        .filter(|c| c[0].eq_ignore_ascii_case(name.as_bytes()))
        .flat_map(|c| c.iter().skip(1))
        .find_map(|arg| {
            let text = std::str::from_utf8(arg).ok()?;
            let from = text.find(start)? + start.len();
            let to = if end.is_empty() {
                text.len()
            } else {
                from + text[from..].find(end)?
            };
            Some(text.as_bytes()[from..to].to_vec())
        })
}

/// One scenario's ceiling: what it is and what it measured.
pub struct Ceiling {
    pub what: &'static str,
    pub ops: Measured,
}

/// The ceilings of one stack, measured on demand beside each scenario.
pub struct Ceilings {
    seconds: u64,
    concurrency: usize,
    database_url: String,
    redis_port: u16,
    postgres: Option<Result<Postgres, String>>,
}

impl Ceilings {
    pub fn new(stack: &e2e_tests::Stack, concurrency: usize, seconds: u64) -> Self {
        Self {
            seconds,
            concurrency,
            database_url: stack.database.url.clone(),
            redis_port: stack.redis.port,
            postgres: None,
        }
    }

    async fn postgres(&mut self) -> Result<&Postgres, String> {
        if self.postgres.is_none() {
            self.postgres = Some(Postgres::prepare(&self.database_url, self.seconds).await);
        }
        match self.postgres.as_ref() {
            Some(Ok(postgres)) => Ok(postgres),
            Some(Err(err)) => Err(err.clone()),
            None => unreachable!("prepared above"),
        }
    }

    /// The ceilings of `scenario` (none for the mixed and scale ones).
    pub async fn of(
        &mut self,
        scenario: &str,
        bench: &Arc<crate::scenarios::Bench>,
    ) -> Vec<Ceiling> {
        let seconds = self.seconds;
        match scenario {
            "profile" => vec![Ceiling {
                what: "Postgres: GetProfile's query (pgbench)",
                ops: match self.postgres().await {
                    Ok(pg) => pg.profile(seconds).await,
                    Err(err) => Err(err),
                },
            }],
            "activate" => vec![Ceiling {
                what: "Postgres: the activation transaction (pgbench)",
                ops: match self.postgres().await {
                    Ok(pg) => pg.activation(seconds).await,
                    Err(err) => Err(err),
                },
            }],
            "signin" => vec![Ceiling {
                what: "Redis: one sign-in's commands (SendCode + VerifyCode, replayed)",
                ops: self.signin_redis(bench).await,
            }],
            "refresh" => vec![
                Ceiling {
                    what: "Redis: one rotation's commands (replayed)",
                    ops: self.refresh_redis(bench).await,
                },
                Ceiling {
                    what: "Postgres: LookupUser's query (pgbench)",
                    ops: match self.postgres().await {
                        Ok(pg) => pg.lookup(seconds).await,
                        Err(err) => Err(err),
                    },
                },
            ],
            _ => Vec::new(),
        }
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    /// Records one sign-in's Redis commands and replays them, a fresh phone number each time.
    async fn signin_redis(&self, bench: &Arc<crate::scenarios::Bench>) -> Measured {
        // A first sign-in loads the scripts, so the recorded one runs them by hash.
        let _ = bench.sign_in_phone(0, "+79980000001", None).await;
        const PHONE: &str = "+79980000002";
        let (signed, commands) = record(self.redis_port, bench.sign_in_phone(0, PHONE, None)).await;
        signed.map_err(|status| format!("the recorded sign-in failed: {status:?}"))?;
        let concurrency = self.concurrency as u64;
        let renames = Arc::new(move |worker: usize, n: u64| {
            let number = (n * concurrency + worker as u64 + 3) % 10_000_000;
            vec![(
                PHONE.as_bytes().to_vec(),
                format!("+7998{number:07}").into_bytes(),
            )]
        });
        replay(
            self.redis_port,
            Arc::new(commands),
            self.concurrency,
            self.duration(),
            renames,
        )
        .await
    }

    /// Records one refresh's Redis commands and replays them as chains: each connection
    /// rotates a family of its own, presenting the hash its previous replay made current.
    async fn refresh_redis(&self, bench: &Arc<crate::scenarios::Bench>) -> Measured {
        let user = bench
            .sign_in_many(1, None)
            .await
            .pop()
            .ok_or("no user to refresh")?;
        let (rotated, commands) =
            record(self.redis_port, bench.refresh_once(&user.refresh_token)).await;
        rotated.map_err(|status| format!("the recorded refresh failed: {status:?}"))?;
        let old = find_value(&commands, "GET", "rt:", "").ok_or("no token lookup recorded")?;
        let new = find_value(&commands, "PSETEX", "rt:", "").ok_or("no new lookup recorded")?;
        let family = find_value(&commands, "HMGET", "{fam:", "}").ok_or_else(|| {
            format!(
                "no family recorded in {:?}",
                commands
                    .iter()
                    .map(|c| String::from_utf8_lossy(&c[0]).into_owned())
                    .collect::<Vec<_>>()
            )
        })?;
        let family_key = commands
            .iter()
            .find(|c| c[0].eq_ignore_ascii_case(b"HMGET"))
            .and_then(|c| c.get(1).cloned())
            .ok_or("no family key recorded")?;
        let width = old.len();
        let link = move |worker: usize, n: u64| -> Vec<u8> {
            format!("{:0width$x}", ((worker as u128) << 64) | u128::from(n)).into_bytes()
        };
        let own_family = move |worker: usize| format!("{:032x}", 0xce11_0000 + worker).into_bytes();
        let mut setup = Connection::open(self.redis_port)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        for worker in 0..self.concurrency {
            let key = replace(&family_key, &family, &own_family(worker));
            for command in [
                vec![
                    b"COPY".to_vec(),
                    family_key.clone(),
                    key.clone(),
                    b"REPLACE".to_vec(),
                ],
                vec![b"HSET".to_vec(), key, b"cur".to_vec(), link(worker, 0)],
            ] {
                if let Ok(Reply::Error(err)) | Err(err) =
                    setup.call(&command).await.map_err(|e| e.to_string())
                {
                    return Err(format!("setting up the families: {err}"));
                }
            }
        }
        let renames = Arc::new(move |worker: usize, n: u64| {
            vec![
                (family.clone(), own_family(worker)),
                (old.clone(), link(worker, n)),
                (new.clone(), link(worker, n + 1)),
            ]
        });
        replay(
            self.redis_port,
            Arc::new(commands),
            self.concurrency,
            self.duration(),
            renames,
        )
        .await
    }
}

/// A ceiling as a scenario sees it: `(ceiling ops/s, fraction reached)`, or why not.
type Against<'a> = Result<(f64, f64), &'a str>;

/// `rate` against each ceiling, with its name.
fn fractions(rate: f64, ceilings: &[Ceiling]) -> Vec<(&str, Against<'_>)> {
    ceilings
        .iter()
        .map(|c| {
            let measured = match &c.ops {
                Ok(ops) if *ops > 0.0 => Ok((*ops, rate / ops)),
                Ok(_) => Err("0 ops/s"),
                Err(err) => Err(err.as_str()),
            };
            (c.what, measured)
        })
        .collect()
}

/// The ceiling that binds: the lowest one, against which the scenario gets furthest.
fn binding(rate: f64, ceilings: &[Ceiling]) -> Option<(&str, f64, f64)> {
    fractions(rate, ceilings)
        .into_iter()
        .filter_map(|(what, m)| m.ok().map(|(ops, f)| (what, ops, f)))
        .max_by(|a, b| a.2.total_cmp(&b.2))
}

/// One scenario's figures beside its ceilings.
pub struct Row<'a> {
    pub summary: &'a crate::stats::Summary,
    pub ceilings: &'a [Ceiling],
}

/// The ceilings and CPU table of the results section.
pub fn table(rows: &[Row<'_>]) -> String {
    let mut out = vec![
        "| scenario | ops/s | same-run ceiling | ceiling ops/s | fraction | CPU ms / 1,000 calls: driver | auth-service | referral-service | Postgres | Redis |".to_owned(),
        "|---|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    for row in rows {
        let s = row.summary;
        let measured = fractions(s.rate, row.ceilings);
        let (what, ops, fraction) = if measured.is_empty() {
            ("—".to_owned(), "—".to_owned(), "—".to_owned())
        } else {
            let binds = binding(s.rate, row.ceilings).map(|b| b.0);
            let mut what = Vec::new();
            let mut ops = Vec::new();
            let mut fraction = Vec::new();
            for (name, m) in &measured {
                let mark = if measured.len() > 1 && binds == Some(name) {
                    " (binds)"
                } else {
                    ""
                };
                what.push(format!("{name}{mark}"));
                match m {
                    Ok((o, f)) => {
                        ops.push(format!("{o:.0}"));
                        fraction.push(format!("{:.0} %", f * 100.0));
                    }
                    Err(err) => {
                        ops.push(format!("not measured: {err}"));
                        fraction.push("—".to_owned());
                    }
                }
            }
            (what.join("; "), ops.join("; "), fraction.join("; "))
        };
        let c = &s.cpu;
        out.push(format!(
            "| {} | {:.0} | {what} | {ops} | {fraction} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            s.name, s.rate, c.driver, c.auth, c.referral, c.postgres, c.redis
        ));
    }
    out.join("\n")
}

/// The compact seed comparison: per scenario, the fraction of its binding ceiling.
pub fn seed_table(rows: &[Row<'_>]) -> String {
    let mut out = vec![
        "| scenario | ops/s | binding ceiling | ceiling ops/s | fraction |".to_owned(),
        "|---|---|---|---|---|".to_owned(),
    ];
    for row in rows {
        if let Some((what, ops, fraction)) = binding(row.summary.rate, row.ceilings) {
            out.push(format!(
                "| {} | {:.0} | {what} | {ops:.0} | {:.0} % |",
                row.summary.name,
                row.summary.rate,
                fraction * 100.0
            ));
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scenario_queries_are_found_in_the_source() {
        let profile = sql_in(STORAGE, "profile", 0).expect("GetProfile's query");
        assert!(profile.contains("FROM users u") && profile.contains("$2"));
        let roles = sql_in(STORAGE, "roles", 0).expect("LookupUser's query");
        assert!(roles.starts_with("SELECT roles FROM users"));
        let update = sql_in(STORAGE, "activate_in", 2).expect("the activation's UPDATE");
        assert!(update.starts_with("UPDATE users SET invited_by"));
        let append = sql_in(EVENTS, "append", 0).expect("the outbox append");
        assert!(append.contains("INSERT INTO outbox"));
    }

    #[test]
    fn plain_literals_are_unescaped_and_parameters_bound_highest_first() {
        let source = "fn f() { sqlx::query_scalar!(\"SELECT 1 AS \\\"one!\\\", $1, $10\", x) }";
        let sql = sql_in(source, "f", 0).expect("literal");
        assert_eq!(sql, "SELECT 1 AS \"one!\", $1, $10");
        assert_eq!(bind(&sql, &["a"; 10]), "SELECT 1 AS \"one!\", a, a;\n");
        assert_eq!(sql_in(source, "f", 1), None);
    }

    #[test]
    fn the_profile_ceiling_script_has_no_unbound_parameter() {
        let script = Postgres::profile_script().expect("script");
        assert!(!script.contains('$'), "{script}");
        assert!(script.starts_with("\\set g random("));
    }

    #[test]
    fn renaming_replaces_every_occurrence() {
        assert_eq!(
            replace(b"{+7999}:otp +7999", b"+7999", b"+75"),
            b"{+75}:otp +75"
        );
        let commands = vec![vec![b"GET".to_vec(), b"auth:rt:abc".to_vec()]];
        assert_eq!(
            find_value(&commands, "get", "rt:", ""),
            Some(b"abc".to_vec())
        );
    }
}
