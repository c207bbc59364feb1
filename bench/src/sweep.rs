//! Concurrency sweep: GetProfile, sign-in and activation at 1, 4, 16, 64 and 256 callers, a
//! short run per point, drawn as throughput and p50/p99 latency against callers (log x) so the
//! knee of each curve shows: the load past which more callers only queue.
//!
//! Each concurrency gets a stack of its own (a fresh database and Redis, ~0.2 s to start): the
//! scenarios' prepared users take phone numbers from a per-[`Bench`] counter, so two benches
//! on one stack would sign the same numbers in twice.

use std::path::Path;
use std::time::Duration;

use e2e_tests::Stack;

use crate::plot::{self, Chart, Marker, Series};
use crate::scenarios::Bench;
use crate::stats::Summary;
use crate::{capture, rss};

pub const CALLERS: [usize; 5] = [1, 4, 16, 64, 256];

/// A scenario's figures at one concurrency.
pub struct Point {
    pub callers: usize,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

impl Point {
    fn of(summary: &Summary) -> Self {
        Self {
            callers: summary.concurrency,
            rate: summary.rate,
            p50_ms: summary.p50_ms,
            p99_ms: summary.p99_ms,
            errors: summary.errors.values().sum(),
        }
    }
}

/// One scenario's curve: `slug` names its chart files.
pub struct Curve {
    pub title: &'static str,
    pub slug: &'static str,
    pub points: Vec<Point>,
}

/// Throughput gains below this fraction per step mean the service is saturated: a step is four
/// times the callers, which a service with room to spare turns into several times the calls.
const FLAT_GAIN: f64 = 0.20;

/// The knee: the fewest callers past which a step to more callers gains less than
/// [`FLAT_GAIN`] in throughput while p99 grows, i.e. where more callers only queue. `None`
/// while throughput still grows at the largest step (or with fewer than two points).
pub fn knee(points: &[Point]) -> Option<usize> {
    points.windows(2).find_map(|pair| {
        let (here, next) = (&pair[0], &pair[1]);
        let flat = next.rate < here.rate * (1.0 + FLAT_GAIN);
        (flat && next.p99_ms > here.p99_ms).then_some(here.callers)
    })
}

/// Runs the sweep, `seconds` per point; returns the three curves.
pub async fn run(seconds: u64, extra: &[(&'static str, String)]) -> Vec<Curve> {
    let duration = Duration::from_secs(seconds);
    let mut curves = [
        ("GetProfile (10 invitees)", "getprofile"),
        ("sign-in (SendCode+VerifyCode, new user)", "signin"),
        ("activation (one hot inviter)", "activation"),
    ]
    .map(|(title, slug)| Curve {
        title,
        slug,
        points: Vec::new(),
    });
    println!("\nsweep ({seconds} s per point, a fresh stack per concurrency):\n");
    println!("{}", Summary::header());
    for callers in CALLERS {
        let capture = capture::CodeCapture::default();
        let capture_url = capture.start().await;
        let stack = Stack::start_with(crate::throughput_options(capture_url, extra, None)).await;
        rss::watch("auth-service", stack.auth.pid());
        rss::watch("referral-service", stack.referral.pid());
        rss::mark(&format!("sweep {callers}"));
        let bench = Bench::new(&stack, capture, callers).await;
        let profile = bench.profile(duration).await;
        let signin = bench.signin(duration).await;
        let (activate, note) = bench.activate(duration).await;
        for (curve, mut summary) in curves.iter_mut().zip([profile, signin, activate]) {
            crate::finish_row(&mut summary, &stack);
            curve.points.push(Point::of(&summary));
        }
        // A miscounted activation is a correctness failure, whatever the load.
        if note.contains("MISMATCH") {
            println!("{note}");
        }
    }
    curves.into()
}

/// The two charts of each curve into `dir` (created if missing): `<slug>-throughput.svg` and
/// `<slug>-latency.svg`, the knee marked on both.
pub fn draw(curves: &[Curve], dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for curve in curves {
        let markers: Vec<Marker> = knee(&curve.points)
            .map(|callers| Marker {
                x: callers as f64,
                label: format!("knee: {callers} callers"),
            })
            .into_iter()
            .collect();
        let line = |name: &str, value: fn(&Point) -> f64| Series {
            name: name.to_owned(),
            points: curve
                .points
                .iter()
                .map(|p| (p.callers as f64, value(p)))
                .collect(),
        };
        let throughput = [line("ops/s", |p| p.rate)];
        let latency = [line("p50 ms", |p| p.p50_ms), line("p99 ms", |p| p.p99_ms)];
        for (kind, y_label, series) in [
            ("throughput", "successful calls per second", &throughput[..]),
            ("latency", "latency ms", &latency[..]),
        ] {
            let title = format!("{}: {kind} against callers", curve.title);
            let chart = Chart {
                title: &title,
                x_label: "concurrent callers (log scale)",
                y_label,
                series,
                log_x: true,
                markers: &markers,
            };
            let path = dir.join(format!("{}-{kind}.svg", curve.slug));
            plot::draw_svg(&path, &chart, (720, 405))?;
        }
    }
    Ok(())
}

/// The report section: how it was measured, the charts (`charts`: their directory as the
/// report links it, e.g. `bench`), the knees and the figures.
pub fn section(curves: &[Curve], seconds: u64, charts: &str) -> String {
    let mut out = format!(
        "Measured by `loadgen --scenarios sweep --sweep-seconds {seconds}` (release build) on {}: \
         {seconds} s per point, a fresh stack per concurrency.\n\nMachine: {}.\n\n",
        crate::today(),
        crate::machine_description()
    );
    for curve in curves {
        let knee = match knee(&curve.points) {
            Some(callers) => format!(
                "knee at {callers} callers (past it, throughput gains < {:.0} % per step while p99 grows)",
                FLAT_GAIN * 100.0
            ),
            None => format!(
                "no knee up to {} callers (throughput still grows ≥ {:.0} % per step)",
                CALLERS[CALLERS.len() - 1],
                FLAT_GAIN * 100.0
            ),
        };
        out += &format!(
            "**{}**: {knee}.\n\n![{0} throughput against callers]({charts}/{1}-throughput.svg) \
             ![{0} p50 and p99 latency against callers]({charts}/{1}-latency.svg)\n\n",
            curve.title, curve.slug
        );
    }
    out += "| callers |";
    for curve in curves {
        out += &format!(" {} ops/s | p50 ms | p99 ms |", curve.slug);
    }
    out += "\n|---|";
    out += &"---|---|---|".repeat(curves.len());
    out += "\n";
    for (row, callers) in CALLERS.iter().enumerate() {
        out += &format!("| {callers} |");
        for curve in curves {
            match curve.points.get(row) {
                Some(p) => {
                    let errors = if p.errors > 0 {
                        format!(" ({} errors)", p.errors)
                    } else {
                        String::new()
                    };
                    out += &format!(
                        " {:.0}{errors} | {:.2} | {:.2} |",
                        p.rate, p.p50_ms, p.p99_ms
                    );
                }
                None => out += " | | |",
            }
        }
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(figures: &[(usize, f64, f64)]) -> Vec<Point> {
        figures
            .iter()
            .map(|&(callers, rate, p99_ms)| Point {
                callers,
                rate,
                p50_ms: p99_ms / 3.0,
                p99_ms,
                errors: 0,
            })
            .collect()
    }

    #[test]
    fn the_knee_is_where_throughput_flattens_and_p99_grows() {
        let curve = points(&[
            (1, 900.0, 1.0),
            (4, 3000.0, 1.5),
            (16, 5200.0, 4.0),
            (64, 5500.0, 19.0),
            (256, 5400.0, 80.0),
        ]);
        assert_eq!(knee(&curve), Some(16));
    }

    #[test]
    fn no_knee_while_throughput_still_grows_or_latency_does_not() {
        let growing = points(&[(1, 900.0, 1.0), (4, 3000.0, 1.5), (16, 4000.0, 9.0)]);
        assert_eq!(knee(&growing), None);
        // Flat throughput with p99 falling is noise at light load, not saturation.
        let flat_faster = points(&[(1, 1000.0, 2.0), (4, 1050.0, 1.5)]);
        assert_eq!(knee(&flat_faster), None);
        assert_eq!(knee(&[]), None);
    }

    #[test]
    fn charts_and_section_name_every_curve() {
        let dir = tempfile::tempdir().unwrap();
        let curves = vec![
            Curve {
                title: "GetProfile",
                slug: "getprofile",
                points: points(&[(1, 900.0, 1.0), (4, 950.0, 3.0)]),
            },
            Curve {
                title: "sign-in",
                slug: "signin",
                points: Vec::new(),
            },
        ];
        draw(&curves, dir.path()).unwrap();
        let latency = std::fs::read_to_string(dir.path().join("getprofile-latency.svg")).unwrap();
        assert!(latency.contains("knee: 1 callers") && latency.contains("p99 ms"));
        assert!(dir.path().join("signin-throughput.svg").exists());
        let text = section(&curves, 3, "bench");
        assert!(text.contains("**GetProfile**: knee at 1 callers"));
        assert!(text.contains("(bench/getprofile-throughput.svg)"));
        assert!(text.contains("**sign-in**: no knee up to 256 callers"));
        assert!(text.contains("| 4 | 950 | 1.00 | 3.00 | | | |"), "{text}");
    }
}
