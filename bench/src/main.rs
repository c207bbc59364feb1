//! refsys load generator: starts the real stack (release binaries when built with --release)
//! against local Postgres and a private Redis, drives each scenario with N concurrent callers
//! for a fixed time, and prints requests/s, latency percentiles, errors by gRPC code and the
//! services' peak RSS. `--write docs/BENCHMARKS.md` also writes the report there.
//!
//! `abuse` (not in the default set) attacks a second stack that runs auth-service's production
//! limits: see [`abuse`]. Its report has a section of its own in the file, so running it alone
//! leaves the other scenarios' table as it was, and the other way round.
//!
//! `cluster` (not in the default set either) runs signin and refresh on a stack whose
//! auth-service uses a Redis Cluster (3 primaries, 3 replicas, `REDIS_CLUSTER_URLS`), next to
//! the same scenarios on the single-node Redis in the same run (taken from the regular table
//! when it ran them, otherwise on a single-node stack of their own). Its rows also get a section
//! of their own.
//!
//! `sweep` (in the default set) runs GetProfile, sign-in and activation at 1 to 256 callers,
//! `--sweep-seconds` each, on stacks of their own: see [`sweep`]. With `--write`, it draws its
//! charts, and [`rss`] the memory over the whole run, into `bench/` beside the written file.
//!
//! Usage: loadgen [--seconds 10] [--concurrency 64] [--sweep-seconds 3]
//!                [--scenarios signin,profile,activate,refresh,mixed,scale,sweep,abuse,cluster]
//!                [--service-env KEY=VALUE ...] [--write FILE]
//!        loadgen --dashboards DIR [--concurrency 8]   (a PNG per Grafana dashboard: [`dashboards`])

mod abuse;
mod capture;
mod ceiling;
mod compare;
mod cpu;
mod dashboards;
mod h2load;
mod lean;
mod plot;
mod resp;
mod rss;
mod scenarios;
mod seed;
mod stats;
mod sweep;

use std::time::{Duration, Instant};

use e2e_tests::cluster::RedisCluster;
use e2e_tests::{Stack, StackOptions};

pub struct Options {
    pub seconds: u64,
    /// How long each point of the concurrency sweep runs.
    pub sweep_seconds: u64,
    pub concurrency: usize,
    pub scenarios: Vec<String>,
    pub write: Option<String>,
    /// Extra settings for both services (`--service-env KEY=VALUE`, repeatable), for tuning runs.
    pub service_env: Vec<(String, String)>,
    /// `--dashboards DIR`: draw the dashboards into DIR instead of running the scenarios.
    pub dashboards: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        seconds: 10,
        sweep_seconds: 3,
        concurrency: 64,
        scenarios: [
            "signin", "profile", "activate", "refresh", "mixed", "scale", "sweep",
        ]
        .map(String::from)
        .to_vec(),
        write: None,
        service_env: Vec::new(),
        dashboards: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                options.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--concurrency" => {
                options.concurrency = value()?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?;
            }
            "--sweep-seconds" => {
                options.sweep_seconds = value()?
                    .parse()
                    .map_err(|e| format!("--sweep-seconds: {e}"))?;
            }
            "--scenarios" => options.scenarios = value()?.split(',').map(str::to_owned).collect(),
            "--write" => options.write = Some(value()?),
            "--dashboards" => options.dashboards = Some(value()?),
            "--service-env" => {
                let pair = value()?;
                let (key, val) = pair
                    .split_once('=')
                    .ok_or(format!("--service-env wants KEY=VALUE, got {pair}"))?;
                options.service_env.push((key.to_owned(), val.to_owned()));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let memory_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .next()
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!(
        "{cores} cores ({cpu}), {memory_gb:.0} GiB RAM; load generator, both services, Postgres and Redis on the same machine"
    )
}

/// Every scenario `--scenarios` accepts; all but `abuse`, `cluster` and `sweep` run on one
/// stack with the limits lifted.
const SCENARIOS: [&str; 9] = [
    "signin", "profile", "activate", "refresh", "mixed", "scale", "sweep", "abuse", "cluster",
];

/// The scenarios `cluster` compares, single node against cluster.
const COMPARED: [&str; 2] = ["signin", "refresh"];

// One thread for the callers, the HTTP/2 connections and the SMS capture: frames of many
// calls go out in one write and no request wakes another thread, which cost the load generator
// a third more CPU per call on 2 cores (docs/BENCHMARKS.md, the driver comparison).
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let options = match parse_args() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    };
    if let Some(unknown) = options
        .scenarios
        .iter()
        .find(|s| !SCENARIOS.contains(&s.as_str()))
    {
        eprintln!("error: unknown scenario {unknown}");
        std::process::exit(2);
    }
    // The process lives for one run, so leaking the few keys given on the command line is fine.
    let extra: Vec<(&'static str, String)> = options
        .service_env
        .iter()
        .map(|(k, v)| (&*Box::leak(k.clone().into_boxed_str()), v.clone()))
        .collect();
    if let Some(dir) = &options.dashboards {
        let out = std::path::Path::new(dir);
        if let Err(err) = dashboards::run(out, options.concurrency, &extra).await {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
        return;
    }
    let regular: Vec<&str> = options
        .scenarios
        .iter()
        .map(String::as_str)
        .filter(|s| !["abuse", "cluster", "sweep"].contains(s))
        .collect();
    rss::start();
    let sweep = options.scenarios.iter().any(|s| s == "sweep");
    let mut single_node = Vec::new();
    if !regular.is_empty() {
        let (results, compared, seed) = run_regular(&options, &regular, &extra).await;
        single_node = compared;
        write_or_exit(&options, RESULTS_START, RESULTS_END, &results);
        write_or_exit(&options, CEILINGS_START, CEILINGS_END, &seed);
    }
    if sweep {
        let curves = sweep::run(options.sweep_seconds, &extra).await;
        if let Some(dir) = charts_dir(&options) {
            exit_on_error(sweep::draw(&curves, &dir));
        }
        let section = sweep::section(&curves, options.sweep_seconds, CHARTS);
        write_or_exit(&options, SWEEP_START, SWEEP_END, &section);
    }
    if options.scenarios.iter().any(|s| s == "cluster") {
        let section = run_cluster(&options, &extra, single_node).await;
        write_or_exit(&options, CLUSTER_START, CLUSTER_END, &section);
    }
    if options.scenarios.iter().any(|s| s == "abuse") {
        println!("\nabuse (production limits, a stack of its own):\n");
        let report = abuse::run(
            options.concurrency,
            Duration::from_secs(options.seconds),
            &extra,
        )
        .await;
        let section = format!(
            "Measured by `loadgen --scenarios abuse --seconds {} --concurrency {}` (release build) on {}.\n\n\
             Machine: {}.\n\n{report}\n",
            options.seconds,
            options.concurrency,
            today(),
            machine_description()
        );
        write_or_exit(&options, ABUSE_START, ABUSE_END, &section);
    }
    // Memory over the regular scenarios and the sweep (abuse and cluster stacks are not watched).
    if let Some(dir) = charts_dir(&options)
        && (sweep || !regular.is_empty())
    {
        exit_on_error(rss::draw(&dir.join("rss.svg")).map(drop));
    }
}

/// The settings of a throughput stack (every limit lifted, see below) whose SMS go to
/// `capture_url`; `redis` is auth-service's Redis setting when it is not the stack's own node.
fn throughput_options(
    capture_url: String,
    extra: &[(&'static str, String)],
    redis: Option<(&'static str, String)>,
) -> StackOptions {
    StackOptions {
        auth_env: [
            ("TWILIO_API_BASE", capture_url),
            ("RUST_LOG", "warn".into()),
            // These scenarios measure throughput, not the abuse limits (`abuse` does): every
            // sign-in comes from one address (no proxy is trusted, so the client is the TCP
            // peer) to the next +7999 number, i.e. one region and a new block every 10,000
            // numbers, ~70,000 sends in a full run. So every send budget is at its maximum.
            // The client failure cap too: a verification takes one of its slots before it
            // looks and gives it back on success, so 64 concurrent sign-ins from one address
            // would be refused past 30 even though none fails.
            ("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "1000000".into()),
            ("SMS_MAX_SENDS_PER_HOUR", "100000000".into()),
            ("SMS_MAX_SENDS_PER_REGION_PER_HOUR", "100000000".into()),
            ("SMS_MAX_SENDS_PER_PREFIX_PER_HOUR", "1000000".into()),
            ("OTP_MAX_FAILED_PER_CLIENT_PER_HOUR", "1000000".into()),
            ("OTP_RESEND_COOLDOWN_SECONDS", "1".into()),
            // The driver comparison replays one rotated refresh token for a while (see
            // `compare`): the longest grace the service accepts.
            ("REFRESH_REUSE_GRACE_SECONDS", "300".into()),
        ]
        .into_iter()
        .chain(redis)
        .chain(extra.iter().cloned())
        .collect(),
        referral_env: [
            ("RUST_LOG", "warn".into()),
            ("DATABASE_MAX_CONNECTIONS", "16".into()),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect(),
        ..StackOptions::default()
    }
}

/// Peak RSS of both services into `summary`, which is printed; returns its row.
fn finish_row(summary: &mut stats::Summary, stack: &Stack) -> String {
    summary.auth_rss_mb = stats::rss_mb(stack.auth.pid()).1;
    summary.referral_rss_mb = stats::rss_mb(stack.referral.pid()).1;
    let row = summary.row();
    println!("{row}");
    row
}

/// How long each ceiling and each driver of the comparison runs: short, they only need a
/// steady rate.
fn ceiling_seconds(options: &Options) -> u64 {
    options.seconds.clamp(1, 5)
}

/// The driver comparison (see [`compare`]) for the scenarios run: the gRPC floor always,
/// GetProfile and refresh when their scenarios ran; returns its table and its rows for the
/// seed comparison.
async fn compare_drivers(
    bench: &std::sync::Arc<scenarios::Bench>,
    stack: &Stack,
    scenarios: &[&str],
    seconds: u64,
) -> (String, String) {
    let duration = Duration::from_secs(seconds);
    let mut pairs = vec![(
        "referral-service",
        compare::health(bench, stack, duration).await,
    )];
    if scenarios.contains(&"profile")
        && let Some(pair) = compare::profile(bench, stack, duration).await
    {
        pairs.push(("referral-service", pair));
    }
    if scenarios.contains(&"refresh")
        && let Some(pair) = compare::refresh_replay(bench, stack, duration).await
    {
        pairs.push(("auth-service", pair));
    }
    (compare::table(&pairs), compare::ratios(&pairs))
}

/// The throughput scenarios on one stack; returns the report for the results section, the
/// rows of the [`COMPARED`] scenarios it ran, labelled for the cluster section, and the seed
/// comparison's section.
async fn run_regular(
    options: &Options,
    scenarios: &[&str],
    extra: &[(&'static str, String)],
) -> (String, Vec<(&'static str, String)>, String) {
    let capture = capture::CodeCapture::default();
    let capture_url = capture.start().await;
    let started = Instant::now();
    let stack = Stack::start_with(throughput_options(capture_url, extra, None)).await;
    let stack_start = started.elapsed();
    rss::watch("auth-service", stack.auth.pid());
    rss::watch("referral-service", stack.referral.pid());
    let (auth_idle, _) = stats::rss_mb(stack.auth.pid());
    let (referral_idle, _) = stats::rss_mb(stack.referral.pid());

    let bench = scenarios::Bench::new(&stack, capture, options.concurrency).await;
    let duration = Duration::from_secs(options.seconds);
    let mut report = vec![stats::Summary::header().to_owned()];
    let mut notes = Vec::new();
    let mut compared = Vec::new();
    let mut ceilings =
        ceiling::Ceilings::new(&stack, options.concurrency, ceiling_seconds(options));
    let mut beside = Vec::new();
    println!("{}", stats::Summary::header());
    for scenario in scenarios {
        rss::mark(scenario);
        let summaries = match *scenario {
            "signin" => vec![bench.signin(duration).await],
            "profile" => vec![bench.profile(duration).await],
            "activate" => {
                let (summary, note) = bench.activate(duration).await;
                notes.push(note);
                vec![summary]
            }
            "refresh" => vec![bench.refresh(duration).await],
            "mixed" => vec![bench.mixed(duration).await],
            "scale" => {
                let (summaries, note) = seed::scale(&bench, &stack, duration).await;
                notes.push(note);
                summaries
            }
            other => unreachable!("scenario {other} was checked"),
        };
        let scenario_ceilings = ceilings.of(scenario, &bench).await;
        for mut summary in summaries {
            report.push(finish_row(&mut summary, &stack));
            if let Some(name) = COMPARED.iter().find(|name| *name == scenario) {
                let mut labelled = summary.clone();
                labelled.name = format!("single node: {}", summary.name);
                compared.push((*name, labelled.row()));
            }
            beside.push((summary, Vec::new()));
        }
        if let Some((_, last)) = beside.last_mut() {
            *last = scenario_ceilings;
        }
    }
    // Each scenario's segment of the RSS chart includes its ceiling; this one is h2load's too.
    rss::mark("loadgen vs h2load");
    let (drivers, driver_ratios) =
        compare_drivers(&bench, &stack, scenarios, ceiling_seconds(options)).await;
    let rows: Vec<ceiling::Row> = beside
        .iter()
        .map(|(summary, ceilings)| ceiling::Row { summary, ceilings })
        .collect();
    let ceiling_table = ceiling::table(&rows);
    let seed_table = ceiling::seed_table(&rows);
    println!("\n{ceiling_table}\n\n{drivers}\n");

    // Time to SERVING from a cold process start (migrations already applied).
    let mut stack = stack;
    let restart = Instant::now();
    stack.referral.restart().await;
    let referral_ready = restart.elapsed();
    let restart = Instant::now();
    stack.auth.restart().await;
    let auth_ready = restart.elapsed();

    let summary = format!(
        "\nIdle RSS after start: auth-service {auth_idle:.1} MB, referral-service {referral_idle:.1} MB.\n\
         Time to SERVING after a restart: auth-service {} ms, referral-service {} ms (whole stack incl. database creation and migrations: {} ms).\n\
         {}\n",
        auth_ready.as_millis(),
        referral_ready.as_millis(),
        stack_start.as_millis(),
        notes.join("\n")
    );
    println!("{summary}");
    let report = format!(
        "Measured by `scripts/bench` (release build, `loadgen --seconds {} --concurrency {}`) on {}.\n\n\
         Machine: {}.\n\n{}\n{}\n\
         Beside each scenario, its same-run ceiling ({} s each, right after the scenario) and what 1,000 calls cost each process in CPU:\n\n\
         {ceiling_table}\n\n\
         The same request from loadgen and from h2load, back to back ({} s each, {} connections, {} streams in all):\n\n\
         {drivers}\n",
        options.seconds,
        options.concurrency,
        today(),
        machine_description(),
        report.join("\n"),
        summary,
        ceiling_seconds(options),
        ceiling_seconds(options),
        bench.connections(),
        options.concurrency,
    );
    let seed = format!(
        "Measured on {} ({}; `loadgen --seconds {} --concurrency {}`).\n\n{seed_table}\n\n\
         The same request from loadgen and from h2load:\n\n{driver_ratios}\n",
        today(),
        machine_description(),
        options.seconds,
        options.concurrency,
    );
    (report, compared, seed)
}

/// `scenarios` (of [`COMPARED`]) on a throughput stack of their own, on `cluster` when given,
/// else on the stack's single Redis node; rows labelled `label: …`.
async fn run_compared(
    options: &Options,
    scenarios: &[&'static str],
    extra: &[(&'static str, String)],
    cluster: Option<&RedisCluster>,
    label: &str,
) -> Vec<(&'static str, String)> {
    let capture = capture::CodeCapture::default();
    let capture_url = capture.start().await;
    let stack = Stack::start_with(throughput_options(
        capture_url,
        extra,
        cluster.map(RedisCluster::env),
    ))
    .await;
    let bench = scenarios::Bench::new(&stack, capture, options.concurrency).await;
    let duration = Duration::from_secs(options.seconds);
    let mut rows = Vec::new();
    for &scenario in scenarios {
        let mut summary = match scenario {
            "signin" => bench.signin(duration).await,
            "refresh" => bench.refresh(duration).await,
            other => unreachable!("{other} is not compared"),
        };
        summary.name = format!("{label}: {}", summary.name);
        rows.push((scenario, finish_row(&mut summary, &stack)));
    }
    rows
}

/// signin and refresh on a Redis Cluster next to the single node (`single_node`: the rows the
/// regular run measured; the others are measured here first); returns the cluster section.
async fn run_cluster(
    options: &Options,
    extra: &[(&'static str, String)],
    mut single_node: Vec<(&'static str, String)>,
) -> String {
    println!(
        "\ncluster (auth-service on a Redis Cluster, 3 primaries + 3 replicas, next to the single node):\n"
    );
    println!("{}", stats::Summary::header());
    let missing: Vec<&'static str> = COMPARED
        .into_iter()
        .filter(|name| !single_node.iter().any(|(done, _)| done == name))
        .collect();
    for (_, row) in &single_node {
        println!("{row}");
    }
    if !missing.is_empty() {
        single_node.extend(run_compared(options, &missing, extra, None, "single node").await);
    }
    let started = Instant::now();
    let cluster = RedisCluster::start().await;
    cluster.wait_ok(3, Duration::from_secs(30)).await;
    let cluster_start = started.elapsed();
    let on_cluster = run_compared(options, &COMPARED, extra, Some(&cluster), "cluster").await;
    let keys = cluster.keys_per_primary().await;
    drop(cluster);

    let mut table = vec![stats::Summary::header().to_owned()];
    for name in COMPARED {
        for (_, row) in single_node
            .iter()
            .chain(&on_cluster)
            .filter(|(scenario, _)| *scenario == name)
        {
            table.push(row.clone());
        }
    }
    let keys = keys
        .iter()
        .map(|(port, count)| format!("{count} on :{port}"))
        .collect::<Vec<_>>()
        .join(", ");
    let notes = format!(
        "Cluster started and healthy in {} ms (6 local `redis-server` nodes, one per port, on the same machine). \
         Keys per primary afterwards: {keys}.",
        cluster_start.as_millis()
    );
    println!("\n{notes}\n");
    format!(
        "Measured by `loadgen --scenarios cluster --seconds {} --concurrency {}` (release build) on {}; \
         the single-node rows are from the same run.\n\n\
         Machine: {}.\n\n{}\n\n{notes}\n",
        options.seconds,
        options.concurrency,
        today(),
        machine_description(),
        table.join("\n"),
    )
}

/// Where the charts go, as the written report links them: `bench/` beside it.
const CHARTS: &str = "bench";

fn charts_dir(options: &Options) -> Option<std::path::PathBuf> {
    let report = std::path::Path::new(options.write.as_ref()?);
    Some(report.parent()?.join(CHARTS))
}

fn exit_on_error(result: Result<(), String>) {
    if let Err(err) = result {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn write_or_exit(options: &Options, start: &str, end: &str, content: &str) {
    let Some(path) = &options.write else { return };
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let document = replace_section(&existing, start, end, content);
    if let Err(err) = std::fs::write(path, document) {
        eprintln!("error: cannot write {path}: {err}");
        std::process::exit(1);
    }
}

const RESULTS_START: &str = "<!-- loadgen results: start -->";
const RESULTS_END: &str = "<!-- loadgen results: end -->";
const ABUSE_START: &str = "<!-- loadgen abuse: start -->";
const ABUSE_END: &str = "<!-- loadgen abuse: end -->";
const CLUSTER_START: &str = "<!-- loadgen cluster: start -->";
const CLUSTER_END: &str = "<!-- loadgen cluster: end -->";
const SWEEP_START: &str = "<!-- loadgen sweep: start -->";
const SWEEP_END: &str = "<!-- loadgen sweep: end -->";
const CEILINGS_START: &str = "<!-- loadgen ceilings: start -->";
const CEILINGS_END: &str = "<!-- loadgen ceilings: end -->";

/// `document` with the generated section between `start` and `end` replaced by `content`;
/// everything outside the markers (the hand-written analysis, other sections) is kept. A
/// document without the markers gets the section appended (a new one gets a title first).
fn replace_section(document: &str, start: &str, end: &str, content: &str) -> String {
    let block = format!("{start}\n{content}\n{end}");
    if let Some(from) = document.find(start)
        && let Some(to) = document[from..].find(end)
    {
        let to = from + to + end.len();
        return format!("{}{block}{}", &document[..from], &document[to..]);
    }
    if document.trim().is_empty() {
        format!("# Benchmarks\n\n{block}\n")
    } else {
        format!("{}\n\n{block}\n", document.trim_end())
    }
}

fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Benchmarks\n\nintro\n\n<!-- loadgen results: start -->\nold table\n<!-- loadgen results: end -->\n\nanalysis\n\n## Abuse\n\n<!-- loadgen abuse: start -->\nold abuse\n<!-- loadgen abuse: end -->\n\nabuse analysis\n\n## Cluster\n\n<!-- loadgen cluster: start -->\nold cluster\n<!-- loadgen cluster: end -->\n\ncluster analysis\n";

    #[test]
    fn each_section_is_replaced_alone() {
        let results = replace_section(DOC, RESULTS_START, RESULTS_END, "new table");
        assert_eq!(results, DOC.replace("old table", "new table"));
        let abuse = replace_section(DOC, ABUSE_START, ABUSE_END, "new abuse");
        assert_eq!(abuse, DOC.replace("old abuse", "new abuse"));
        let cluster = replace_section(DOC, CLUSTER_START, CLUSTER_END, "new cluster");
        assert_eq!(cluster, DOC.replace("old cluster", "new cluster"));
    }

    #[test]
    fn a_missing_cluster_section_is_appended_after_the_others() {
        let without = DOC.replace(
            "<!-- loadgen cluster: start -->\nold cluster\n<!-- loadgen cluster: end -->\n",
            "",
        );
        let written = replace_section(&without, CLUSTER_START, CLUSTER_END, "cluster");
        assert!(written.starts_with(without.trim_end()));
        assert!(written.ends_with(
            "<!-- loadgen cluster: start -->\ncluster\n<!-- loadgen cluster: end -->\n"
        ));
    }

    #[test]
    fn a_missing_section_is_appended_and_nothing_is_lost() {
        let without = DOC.replace(
            "<!-- loadgen abuse: start -->\nold abuse\n<!-- loadgen abuse: end -->\n",
            "",
        );
        let written = replace_section(&without, ABUSE_START, ABUSE_END, "abuse");
        assert!(written.starts_with(without.trim_end()));
        assert!(
            written
                .ends_with("<!-- loadgen abuse: start -->\nabuse\n<!-- loadgen abuse: end -->\n")
        );
        assert_eq!(
            replace_section("", RESULTS_START, RESULTS_END, "t"),
            "# Benchmarks\n\n<!-- loadgen results: start -->\nt\n<!-- loadgen results: end -->\n"
        );
    }

    #[test]
    fn an_end_marker_before_the_start_is_not_a_section() {
        let odd = "<!-- loadgen abuse: end -->\ntext\n<!-- loadgen abuse: start -->\n";
        let written = replace_section(odd, ABUSE_START, ABUSE_END, "x");
        assert!(written.starts_with(odd.trim_end()));
    }
}
