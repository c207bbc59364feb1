//! `loadgen --dashboards DIR`: a picture of each Grafana dashboard without Grafana (not packaged
//! for Debian, and no Docker here). It starts the stack and a real Prometheus scraping it
//! (`e2e_tests::prometheus`, the shipped alert rules included), drives a few minutes of traffic
//! that moves every panel, runs each panel's own PromQL over the run with `query_range`, and draws
//! one PNG per dashboard (`DIR/<dashboard file name>.png`): the panels in Grafana's order and
//! with Grafana's titles, the unit on the y axis, the phases of the run marked.
//!
//! The run, with the mixed load (80 % GetProfile, 10 % ListInvitees, 5 % refresh, 5 % sign-in)
//! throughout:
//! 1. warm-up;
//! 2. invites and points: sign-ups with a hot inviter's code, points granted and redeemed by a
//!    service client (with retries replayed and redemptions past the balance refused);
//! 3. refused sends: resends inside the cooldown, wrong codes, fixed-line numbers (policy),
//!    codes sent to KZ that nobody types in (the fraud guard, in `enforce`, trips and suspends
//!    the region), a service-token request from an unknown client;
//! 4. Redis stopped for a while (auth-service answers UNAVAILABLE, RefsysStoreDown fires), then
//!    recovery;
//! 5. Postgres out of reach for a while (referral-service's pool waits time out), then recovery.
//!
//! A line that stays at zero throughout is left out of a panel that has others (the services
//! show every known label value from the start, so "errors by code" would list every code).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::Stack;
use e2e_tests::dashboards::{self, Dashboard, Panel};
use e2e_tests::prometheus::{Prometheus, dashboards_dir, unix_now};
use e2e_tests::stack::bearer;
use refsys_proto::auth::v1::{IssueServiceTokenRequest, SendCodeRequest, VerifyCodeRequest};
use refsys_proto::referral::v1::points_service_client::PointsServiceClient;
use refsys_proto::referral::v1::{GetProfileRequest, GrantPointsRequest, RedeemPointsRequest};
use tonic::Status;

use crate::capture::CodeCapture;
use crate::plot::{self, Chart, Marker, Series};
use crate::scenarios::Bench;

const WARM_UP: Duration = Duration::from_secs(40);
const INVITES_AND_POINTS: Duration = Duration::from_secs(30);
const REFUSED_SENDS: Duration = Duration::from_secs(30);
const REDIS_DOWN: Duration = Duration::from_secs(20);
const POSTGRES_CUT: Duration = Duration::from_secs(15);
const RECOVERY: Duration = Duration::from_secs(30);

/// Every `for:` of the alert rules, so the store-down alert fires within the outage.
const ALERT_FOR: Duration = Duration::from_secs(10);

/// The plots' resolution: one point every STEP; `$__rate_interval` is what Grafana would pick
/// for 1 s scrapes, rounded up for smoother lines.
const STEP: Duration = Duration::from_secs(2);
const RATE_INTERVAL: &str = "10s";

/// The service client that grants and redeems points. `printf %s <secret> | sha256sum`.
const CLIENT_ID: &str = "loadgen";
const CLIENT_SECRET: &str = "loadgen-dashboards-secret-5e1d9c";
const CLIENT_SECRET_SHA256: &str =
    "d35b51ac4fcd17ae09c897e4030b50bcb47fa8d535bfcd26d2a5c252ca80d942";

/// The PNG grid.
const COLUMNS: usize = 4;
const CHART_SIZE: (u32, u32) = (520, 350);

/// Runs the traffic on a throughput stack (limits lifted, `extra` on top: see
/// `throughput_options`) and writes one PNG per dashboard into `out`; `concurrency` callers
/// drive each kind of traffic.
pub async fn run(
    out: &Path,
    concurrency: usize,
    extra: &[(&'static str, String)],
) -> Result<(), String> {
    let dashboards = Dashboard::load_all(&dashboards_dir())?;
    std::fs::create_dir_all(out).map_err(|err| format!("{}: {err}", out.display()))?;
    let capture = CodeCapture::default();
    let capture_url = capture.start().await;
    let clients_file =
        std::env::temp_dir().join(format!("loadgen-clients-{}.json", std::process::id()));
    std::fs::write(
        &clients_file,
        format!(
            r#"{{"clients": [{{"id": "{CLIENT_ID}", "secret_sha256": "{CLIENT_SECRET_SHA256}",
                "scopes": ["referral.points.read", "referral.points.redeem", "referral.points.grant"]}}]}}"#
        ),
    )
    .map_err(|err| err.to_string())?;
    let mut options = crate::throughput_options(capture_url, extra, None);
    options.proxy_postgres = true;
    options.auth_env.extend([
        ("SERVICE_CLIENTS_FILE", clients_file.display().to_string()),
        // The guard judges a region after 200 sends: KZ in phase 3 trips it, RU (every code
        // typed in) never does. Fewer would trip RU too: preparing users signs 32 in at once,
        // and their sends are counted before their verifications.
        ("SMS_FRAUD_GUARD", "enforce".to_owned()),
        ("SMS_FRAUD_MIN_SENDS", "200".to_owned()),
        ("SMS_FRAUD_MIN_CONVERSION", "0.2".to_owned()),
    ]);
    let mut stack = Stack::start_with(options).await;
    // auth-service has read it.
    let _ = std::fs::remove_file(&clients_file);
    let prometheus = Prometheus::scrape(&stack, ALERT_FOR).await;
    prometheus.wait_targets_up(Duration::from_secs(30)).await;
    let bench = Bench::new(&stack, capture.clone(), concurrency).await;
    let traffic = Arc::new(Traffic::new(&stack, bench.clone(), capture).await?);

    let started = Instant::now();
    let start_unix = unix_now();
    let mut markers = Vec::new();
    let mut mark = |label: &str| {
        println!("{:>4.0} s  {label}", started.elapsed().as_secs_f64());
        markers.push(Marker {
            x: started.elapsed().as_secs_f64(),
            label: label.to_owned(),
        });
    };

    mark("warm-up");
    bench.mixed(WARM_UP).await;
    mark("invites + points");
    tokio::join!(
        bench.mixed(INVITES_AND_POINTS),
        traffic.invites(INVITES_AND_POINTS),
        traffic.points(INVITES_AND_POINTS),
    );
    mark("refused sends");
    tokio::join!(
        bench.mixed(REFUSED_SENDS),
        traffic.refused_sends(REFUSED_SENDS)
    );
    // The mixed load signs its users in first, so each outage starts a moment after it.
    let lead = Duration::from_secs(3);
    let mut outages = Vec::new();
    tokio::join!(bench.mixed(lead + REDIS_DOWN), async {
        tokio::time::sleep(lead).await;
        stack.redis.stop();
        outages.push((started.elapsed(), "Redis down"));
        tokio::time::sleep(REDIS_DOWN).await;
        stack.redis.resume().await;
        outages.push((started.elapsed(), "Redis back"));
    });
    traffic.wait_for_sign_in().await?;
    bench.mixed(RECOVERY).await;
    let proxy = stack
        .postgres_proxy
        .as_ref()
        .ok_or("the stack has no Postgres proxy")?;
    tokio::join!(bench.mixed(lead + POSTGRES_CUT), async {
        tokio::time::sleep(lead).await;
        proxy.cut().await;
        outages.push((started.elapsed(), "Postgres cut"));
        tokio::time::sleep(POSTGRES_CUT).await;
        proxy.restore();
        outages.push((started.elapsed(), "Postgres back"));
    });
    for (at, label) in outages {
        println!("{:>4.0} s  {label}", at.as_secs_f64());
        markers.push(Marker {
            x: at.as_secs_f64(),
            label: label.to_owned(),
        });
    }
    markers.sort_by(|a, b| a.x.total_cmp(&b.x));
    traffic.wait_for_sign_in().await?;
    bench.mixed(RECOVERY).await;
    // The last scrape and rule evaluation.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end_unix = unix_now();
    println!("{:>4.0} s  end", started.elapsed().as_secs_f64());

    let range = format!("{}s", (end_unix - start_unix).ceil());
    let step = format!("{}s", STEP.as_secs());
    let variables = [
        ("$auth_job", "auth-service"),
        ("$referral_job", "referral-service"),
        ("$__rate_interval", RATE_INTERVAL),
        ("$__interval", step.as_str()),
        ("$__range", range.as_str()),
    ];
    for dashboard in &dashboards {
        let mut panels = Vec::new();
        for panel in dashboard.panels.iter().filter(|p| !p.is_row()) {
            panels.push(
                plotted(
                    &prometheus,
                    panel,
                    &variables,
                    (start_unix, end_unix),
                    &dashboard.name(),
                )
                .await,
            );
        }
        let charts: Vec<Chart> = panels
            .iter()
            .map(|panel| Chart {
                title: &panel.title,
                x_label: "seconds into the run",
                y_label: &panel.y_label,
                series: &panel.series,
                log_x: false,
                markers: &markers,
            })
            .collect();
        let rows = charts.len().div_ceil(COLUMNS) as u32;
        let path = out.join(format!("{}.png", dashboard.name()));
        plot::draw_grid_png(
            &path,
            &format!(
                "{} (Prometheus queries of the dashboard, plotted by loadgen; not a Grafana render)",
                dashboard.title
            ),
            &charts,
            COLUMNS,
            (
                CHART_SIZE.0 * COLUMNS as u32,
                CHART_SIZE.1 * rows.max(1) + 50,
            ),
        )?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// One panel's data, ready for [`Chart`].
struct Plotted {
    title: String,
    y_label: String,
    series: Vec<Series>,
}

/// Each target of `panel` over `range` (unix seconds), x in seconds from its start, y in the
/// unit of [`axis`]. A query that fails is reported and leaves its panel without that line.
async fn plotted(
    prometheus: &Prometheus,
    panel: &Panel,
    variables: &[(&str, &str)],
    (start, end): (f64, f64),
    dashboard: &str,
) -> Plotted {
    let (y_label, scale) = axis(panel.unit.as_deref().unwrap_or_default());
    let mut series = Vec::new();
    for target in &panel.targets {
        let expr = dashboards::substitute_with(&target.expr, variables);
        match prometheus.query_range(&expr, start, end, STEP).await {
            Ok(result) => series.extend(result.into_iter().map(|s| {
                Series {
                    name: dashboards::legend(&target.legend, &s.labels),
                    points: s
                        .points
                        .iter()
                        .map(|(t, v)| (t - start, v * scale))
                        .collect(),
                }
            })),
            Err(err) => eprintln!("{dashboard} / {}: {expr}: {err}", panel.title),
        }
    }
    if series.is_empty() {
        eprintln!("{dashboard} / {}: no data", panel.title);
    }
    let moves = |s: &Series| s.points.iter().any(|(_, v)| *v != 0.0 && !v.is_nan());
    if series.iter().any(moves) {
        series.retain(moves);
    }
    Plotted {
        // A stat panel shows one number in Grafana; its line here is what the number follows.
        title: if panel.kind == "stat" {
            format!("{} (stat)", panel.title)
        } else {
            panel.title.clone()
        },
        y_label,
        series,
    }
}

/// The y-axis label for a Grafana unit, and the factor from the query's values to it.
fn axis(unit: &str) -> (String, f64) {
    match unit {
        "s" => ("ms".to_owned(), 1000.0),
        "ms" => ("ms".to_owned(), 1.0),
        "percentunit" => ("%".to_owned(), 100.0),
        "percent" => ("%".to_owned(), 1.0),
        "reqps" => ("requests/s".to_owned(), 1.0),
        "ops" => ("operations/s".to_owned(), 1.0),
        "bytes" => ("bytes".to_owned(), 1.0),
        "none" | "" => ("count".to_owned(), 1.0),
        "short" => ("value".to_owned(), 1.0),
        other => (other.to_owned(), 1.0),
    }
}

/// The traffic of phases 2 and 3, beside the benchmark's mixed load.
struct Traffic {
    bench: Arc<Bench>,
    capture: CodeCapture,
    stack_referral: tonic::transport::Channel,
    /// A hot inviter's code.
    invite_code: String,
    /// Users whose points move, and the service client's token.
    users: Vec<String>,
    token: String,
    next: AtomicU64,
}

impl Traffic {
    async fn new(stack: &Stack, bench: Arc<Bench>, capture: CodeCapture) -> Result<Self, String> {
        let fail = |what: &str, status: Status| format!("{what}: {status:?}");
        let inviter = bench
            .sign_in(0, None)
            .await
            .map_err(|s| fail("inviter", s))?;
        let invite_code = bench.invite_code(&inviter.access_token).await;
        let mut users = Vec::new();
        for signed in bench.sign_in_many(bench.concurrency, None).await {
            let profile = bench
                .referral_client(0)
                .get_profile(bearer(GetProfileRequest {}, &signed.access_token))
                .await
                .map_err(|s| fail("GetProfile", s))?;
            users.extend(profile.into_inner().profile.map(|p| p.user_id));
        }
        // One code to KZ now, so its per-region series exists before phase 3's burst: a series
        // born in the middle of a burst shows no rate for it.
        bench.auth[0]
            .clone()
            .send_code(SendCodeRequest {
                phone_number: "+77010000000".to_owned(),
            })
            .await
            .map_err(|s| fail("SendCode to KZ", s))?;
        let token = bench.auth[0]
            .clone()
            .issue_service_token(IssueServiceTokenRequest {
                client_id: CLIENT_ID.to_owned(),
                client_secret: CLIENT_SECRET.to_owned(),
                scopes: vec![],
            })
            .await
            .map_err(|s| fail("IssueServiceToken", s))?
            .into_inner()
            .access_token;
        Ok(Self {
            stack_referral: Stack::channel(&stack.referral).await,
            bench,
            capture,
            invite_code,
            users,
            token,
            next: AtomicU64::new(0),
        })
    }

    /// Fresh users sign up with the hot inviter's code: one activation each.
    async fn invites(self: &Arc<Self>, duration: Duration) {
        let this = self.clone();
        self.bench
            .run("invites", duration, move |worker, _| {
                let this = this.clone();
                async move {
                    this.bench
                        .sign_in(worker, Some(this.invite_code.clone()))
                        .await
                        .map(|_| ())
                }
            })
            .await;
    }

    /// Grants and redemptions; every 10th redemption is retried (a replay), every 15th asks for
    /// more than the balance (refused).
    async fn points(self: &Arc<Self>, duration: Duration) {
        let this = self.clone();
        self.bench
            .run("points", duration, move |worker, i| {
                let this = this.clone();
                async move {
                    let user = this.users[worker % this.users.len()].clone();
                    let mut points = PointsServiceClient::new(this.stack_referral.clone());
                    let key = format!("{worker}-{i}");
                    points
                        .grant_points(bearer(
                            GrantPointsRequest {
                                user_id: user.clone(),
                                points: 10,
                                idempotency_key: format!("grant-{key}"),
                                reason: "loadgen".to_owned(),
                            },
                            &this.token,
                        ))
                        .await?;
                    let redeem = |points: i64, key: String| {
                        bearer(
                            RedeemPointsRequest {
                                user_id: user.clone(),
                                points,
                                idempotency_key: key,
                                reason: "loadgen".to_owned(),
                            },
                            &this.token,
                        )
                    };
                    points
                        .redeem_points(redeem(5, format!("redeem-{key}")))
                        .await?;
                    if i % 10 == 0 {
                        points
                            .redeem_points(redeem(5, format!("redeem-{key}")))
                            .await?;
                    }
                    if i % 15 == 0 {
                        points
                            .redeem_points(redeem(1_000_000, format!("big-{key}")))
                            .await?;
                    }
                    Ok(())
                }
            })
            .await;
    }

    /// Requests the limits and policies refuse, in turn (see the module docs).
    async fn refused_sends(self: &Arc<Self>, duration: Duration) {
        let this = self.clone();
        self.bench
            .run("refused sends", duration, move |worker, i| {
                let this = this.clone();
                async move {
                    let n = this.next.fetch_add(1, Ordering::Relaxed) % 10_000_000;
                    let mut auth = this.bench.auth[worker % this.bench.auth.len()].clone();
                    let send = |phone: &str| SendCodeRequest {
                        phone_number: phone.to_owned(),
                    };
                    match i % 4 {
                        // Kazakhstan: nobody types these codes in.
                        0 => auth
                            .send_code(send(&format!("+7701{n:07}")))
                            .await
                            .map(|_| ()),
                        // A resend inside the cooldown, a wrong code, then the right one.
                        1 => {
                            let phone = format!("+7998{n:07}");
                            auth.send_code(send(&phone)).await?;
                            let _ = auth.send_code(send(&phone)).await;
                            let code = this
                                .capture
                                .take(&phone)
                                .ok_or_else(|| Status::internal("no SMS captured"))?;
                            let verify = |code: String| VerifyCodeRequest {
                                phone_number: phone.clone(),
                                code,
                                invite_code: None,
                            };
                            let wrong = code.chars().map(|c| if c == '0' { '1' } else { '0' });
                            let _ = auth.verify_code(verify(wrong.collect())).await;
                            auth.verify_code(verify(code)).await.map(|_| ())
                        }
                        // Moscow fixed line: no SMS to landlines.
                        2 => auth
                            .send_code(send(&format!("+7495{n:07}")))
                            .await
                            .map(|_| ()),
                        _ => auth
                            .issue_service_token(IssueServiceTokenRequest {
                                client_id: "not-a-client".to_owned(),
                                client_secret: "guess".to_owned(),
                                scopes: vec![],
                            })
                            .await
                            .map(|_| ()),
                    }
                }
            })
            .await;
    }

    /// After an outage: until a sign-in works again (the services reconnect on their own).
    async fn wait_for_sign_in(&self) -> Result<(), String> {
        let mut last = None;
        for _ in 0..60 {
            match self.bench.sign_in(0, None).await {
                Ok(_) => return Ok(()),
                Err(status) => last = Some(status),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(format!(
            "no sign-in within 30 s of the store coming back: {last:?}"
        ))
    }
}
