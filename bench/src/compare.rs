//! The same request driven by loadgen and by h2load, back to back on the same binaries: how
//! close loadgen comes to a driver that costs almost nothing per call.
//!
//! h2load repeats one request, so each pair repeats one too:
//! - the gRPC floor: `grpc.health.v1.Health/Check` on referral-service;
//! - GetProfile of one user with 10 invitees (the profile scenario takes turns over 20);
//! - RefreshTokens **replaying** one token: a real rotation needs the token the previous call
//!   returned, which h2load cannot carry over. Both drivers present a token that was rotated
//!   once just before, inside `REFRESH_REUSE_GRACE_SECONDS` (raised to its maximum, 300 s, for
//!   the run), so every call is answered OK with the same successor. A replay reads the
//!   session (two commands), writes the successor's lookup and runs the rotation script, like
//!   a rotation, but skips LookupUser (no referral-service call) and writes no new family
//!   state, so it is cheaper than the refresh scenario's calls: a driver comparison, not a
//!   refresh figure.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use e2e_tests::Stack;
use e2e_tests::stack::bearer;
use refsys_proto::auth::v1::RefreshTokensRequest;
use refsys_proto::referral::v1::GetProfileRequest;

use crate::h2load;
use crate::lean::{self, Rpc};
use crate::scenarios::{Bench, GET_PROFILE, HEALTH_CHECK, REFRESH_TOKENS};
use crate::stats::Summary;

/// One request, two drivers.
pub struct Pair {
    pub loadgen: Summary,
    pub h2load: Result<h2load::Run, String>,
    /// The same request through tonic's generated client on a `Channel`, the way loadgen
    /// called before it had its lean caller: what the lean caller bought, in the same run.
    pub tonic: Option<Summary>,
}

impl Pair {
    /// `driver`'s OK calls per second as a fraction of h2load's.
    pub fn ratio(&self, driver: &Summary) -> Option<f64> {
        let h2load = self.h2load.as_ref().ok()?;
        (h2load.ok_rate > 0.0).then(|| driver.rate / h2load.ok_rate)
    }
}

/// One request: a method of one of the services, with its bearer and body.
struct Request<'a> {
    name: &'a str,
    to_auth: bool,
    path: &'a str,
    bearer: Option<&'a str>,
    body: Bytes,
}

async fn pair(bench: &Arc<Bench>, stack: &Stack, request: Request<'_>, duration: Duration) -> Pair {
    let Request {
        name,
        to_auth,
        path,
        bearer,
        body,
    } = request;
    let process = if to_auth {
        &stack.auth
    } else {
        &stack.referral
    };
    let metrics = if to_auth {
        stack.auth_metrics
    } else {
        stack.referral_metrics
    };
    // Drivers in the order loadgen, h2load, h2load, loadgen, half the time each: a machine
    // that gets busier or quieter during the pair favours neither.
    let half = Duration::from_secs(duration.as_secs().div_ceil(2).max(1));
    let rpc = Rpc::new(process.addr, path);
    let name = format!("{name}: loadgen");
    let loadgen = || bench.repeat(&name, to_auth, rpc.clone(), bearer, body.clone(), half);
    let connections = bench.connections();
    let call = h2load::Call {
        server: process.addr,
        metrics,
        path,
        bearer,
        body: &body,
    };
    let streams = bench.concurrency.div_ceil(connections);
    let h2load = || h2load::run(&call, connections, streams, half, &bench.pids);
    let first = loadgen().await;
    let h2load = match (h2load().await, h2load().await) {
        (Ok(a), Ok(b)) => Ok(a.combine(b)),
        (Err(err), _) | (_, Err(err)) => Err(err),
    };
    let loadgen = combine(first, loadgen().await);
    Pair {
        loadgen,
        h2load,
        tonic: None,
    }
}

/// Two runs of the same request as one: calls and time add up; latency figures are the
/// worse of the two.
fn combine(a: Summary, b: Summary) -> Summary {
    let wall = |s: &Summary| {
        if s.rate > 0.0 {
            s.ok as f64 / s.rate
        } else {
            0.0
        }
    };
    let ok = a.ok + b.ok;
    let seconds = wall(&a) + wall(&b);
    let mut errors = a.errors.clone();
    for (code, n) in &b.errors {
        *errors.entry(code.clone()).or_default() += n;
    }
    Summary {
        ok,
        rate: if seconds > 0.0 {
            ok as f64 / seconds
        } else {
            0.0
        },
        p50_ms: a.p50_ms.max(b.p50_ms),
        p90_ms: a.p90_ms.max(b.p90_ms),
        p99_ms: a.p99_ms.max(b.p99_ms),
        max_ms: a.max_ms.max(b.max_ms),
        cpu: a.cpu.weighted(a.calls(), &b.cpu, b.calls()),
        errors,
        ..a
    }
}

/// The gRPC floor: Health/Check on referral-service.
pub async fn health(bench: &Arc<Bench>, stack: &Stack, duration: Duration) -> Pair {
    // An empty HealthCheckRequest (the whole server) is a zero-length message.
    let body = Bytes::from_static(&[0, 0, 0, 0, 0]);
    pair(
        bench,
        stack,
        Request {
            name: "floor: Health/Check",
            to_auth: false,
            path: HEALTH_CHECK,
            bearer: None,
            body,
        },
        duration,
    )
    .await
}

/// GetProfile of one user with 10 invitees.
pub async fn profile(bench: &Arc<Bench>, stack: &Stack, duration: Duration) -> Option<Pair> {
    let inviter = bench.sign_in_many(1, None).await.pop()?;
    let code = bench.invite_code(&inviter.access_token).await;
    bench.sign_in_many(10, Some(code)).await;
    let body = lean::frame(&GetProfileRequest {});
    let mut pair = pair(
        bench,
        stack,
        Request {
            name: "GetProfile, one user",
            to_auth: false,
            path: GET_PROFILE,
            bearer: Some(&inviter.access_token),
            body,
        },
        duration,
    )
    .await;
    let token = Arc::new(inviter.access_token);
    let this = bench.clone();
    pair.tonic = Some(
        bench
            .run(
                "GetProfile, one user, through tonic's client (loadgen's old caller)",
                duration.div_f64(2.0).max(Duration::from_secs(1)),
                move |worker, _| {
                    let (this, token) = (this.clone(), token.clone());
                    async move {
                        this.referral_client(worker)
                            .get_profile(bearer(GetProfileRequest {}, &token))
                            .await
                            .map(|_| ())
                    }
                },
            )
            .await,
    );
    Some(pair)
}

/// RefreshTokens replaying one token rotated just before (see the module comment).
pub async fn refresh_replay(bench: &Arc<Bench>, stack: &Stack, duration: Duration) -> Option<Pair> {
    let user = bench.sign_in_many(1, None).await.pop()?;
    bench.refresh_once(&user.refresh_token).await.ok()?;
    let body = lean::frame(&RefreshTokensRequest {
        refresh_token: user.refresh_token,
    });
    Some(
        pair(
            bench,
            stack,
            Request {
                name: "RefreshTokens, one token replayed",
                to_auth: true,
                path: REFRESH_TOKENS,
                bearer: None,
                body,
            },
            duration,
        )
        .await,
    )
}

/// The driver table: each request's rate by loadgen and by h2load, and what a call cost each.
pub fn table(pairs: &[(&str, Pair)]) -> String {
    let mut out = vec![
        "| request (server) | loadgen ops/s | h2load gRPC-OK ops/s | loadgen / h2load | loadgen p50 / p99 ms | CPU ms / 1,000 calls: loadgen | h2load | server (loadgen's run) | server (h2load's run) | not OK |".to_owned(),
        "|---|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    for (server, pair) in pairs {
        for l in std::iter::once(&pair.loadgen).chain(&pair.tonic) {
            let server_cpu = |cpu: &crate::cpu::PerThousand| {
                if *server == "auth-service" {
                    cpu.auth
                } else {
                    cpu.referral
                }
            };
            let (h2_rate, h2_cpu, h2_server, h2_errors) = match &pair.h2load {
                Ok(run) => (
                    format!("{:.0}", run.ok_rate),
                    format!("{:.0}", run.cpu.driver),
                    format!("{:.0}", server_cpu(&run.cpu)),
                    run.errors
                        .iter()
                        .map(|(code, n)| format!("{code}: {n}"))
                        .chain(std::iter::once(format!("{} HTTP 200s", run.http_ok)))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                Err(err) => (
                    format!("not measured: {err}"),
                    "—".into(),
                    "—".into(),
                    String::new(),
                ),
            };
            let errors = |e: String| if e.is_empty() { "none".to_owned() } else { e };
            let loadgen_errors = l
                .errors
                .iter()
                .map(|(code, n)| format!("{code}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            out.push(format!(
            "| {} ({server}) | {:.0} | {h2_rate} | {} | {:.2} / {:.2} | {:.0} | {h2_cpu} | {:.0} | {h2_server} | loadgen {}; h2load {} |",
            l.name.trim_end_matches(": loadgen"),
            l.rate,
            pair.ratio(l)
                .map_or("—".to_owned(), |r| format!("{:.0} %", r * 100.0)),
            l.p50_ms,
            l.p99_ms,
            l.cpu.driver,
            server_cpu(&l.cpu),
            errors(loadgen_errors),
            errors(h2_errors),
        ));
        }
    }
    out.join("\n")
}

/// The compact driver rows for the seed comparison: loadgen's rate as a fraction of h2load's
/// and what a call cost each.
pub fn ratios(pairs: &[(&str, Pair)]) -> String {
    let mut out = vec![
        "| request | loadgen / h2load | CPU ms / 1,000 calls: loadgen | h2load |".to_owned(),
        "|---|---|---|---|".to_owned(),
    ];
    for (_, pair) in pairs {
        let l = &pair.loadgen;
        out.push(format!(
            "| {} | {} | {:.0} | {} |",
            l.name.trim_end_matches(": loadgen"),
            pair.ratio(l)
                .map_or("—".to_owned(), |r| format!("{:.0} %", r * 100.0)),
            l.cpu.driver,
            pair.h2load
                .as_ref()
                .map_or("—".to_owned(), |run| format!("{:.0}", run.cpu.driver)),
        ));
    }
    out.join("\n")
}
