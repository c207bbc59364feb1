//! RSS over the whole run: the services' and loadgen's own resident memory, sampled in the
//! background every [`INTERVAL`], with a mark where each scenario starts; drawn as
//! docs/bench/rss.svg. A peak per scenario (the results table) hides a leak that a line over
//! time shows.
//!
//! One sampler per process, reached through free functions, so the run's code only adds a line
//! where a stack starts ([`watch`]) or a scenario begins ([`mark`]), whatever it passes around.

use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::plot::{self, Chart, Marker, Series};
use crate::stats;

pub const INTERVAL: Duration = Duration::from_millis(250);

static SAMPLER: OnceLock<Sampler> = OnceLock::new();

struct Sampler {
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The process each series follows now: a new stack replaces the pid, not the series.
    watched: Vec<(String, u32)>,
    series: Vec<Series>,
    marks: Vec<Marker>,
}

impl Sampler {
    fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while sampling leaves figures that are still worth drawing.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sample(&self) {
        let at = self.seconds();
        let mut state = self.state();
        let readings: Vec<(String, f64)> = state
            .watched
            .iter()
            .map(|(name, pid)| (name.clone(), stats::rss_mb(Some(*pid)).0))
            // A process that has exited (a stack dropped, a service restarting) reads 0.
            .filter(|(_, mb)| *mb > 0.0)
            .collect();
        for (name, mb) in readings {
            match state.series.iter_mut().find(|s| s.name == name) {
                Some(series) => series.points.push((at, mb)),
                None => state.series.push(Series {
                    name,
                    points: vec![(at, mb)],
                }),
            }
        }
    }
}

/// Starts sampling (loadgen itself from now on); later calls do nothing. Needs a Tokio runtime.
pub fn start() {
    let mut first = false;
    let sampler = SAMPLER.get_or_init(|| {
        first = true;
        Sampler {
            started: Instant::now(),
            state: Mutex::default(),
        }
    });
    if !first {
        return;
    }
    watch("loadgen", Some(std::process::id()));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(INTERVAL);
        loop {
            ticks.tick().await;
            sampler.sample();
        }
    });
}

/// Follows `pid` as series `name` from now on (replacing the process it followed before).
pub fn watch(name: &str, pid: Option<u32>) {
    let (Some(sampler), Some(pid)) = (SAMPLER.get(), pid) else {
        return;
    };
    let mut state = sampler.state();
    state.watched.retain(|(watched, _)| watched != name);
    state.watched.push((name.to_owned(), pid));
}

/// Marks the start of a scenario (or any phase) at the current time.
pub fn mark(label: &str) {
    let Some(sampler) = SAMPLER.get() else { return };
    let x = sampler.seconds();
    sampler.state().marks.push(Marker {
        x,
        label: label.to_owned(),
    });
}

/// Draws what was sampled so far to `path`; `Ok(false)` when sampling never started.
pub fn draw(path: &Path) -> Result<bool, String> {
    let Some(sampler) = SAMPLER.get() else {
        return Ok(false);
    };
    sampler.sample();
    let state = sampler.state();
    let chart = Chart {
        title: "Resident memory over the benchmark run",
        x_label: "seconds since loadgen started (dashed: a scenario starts)",
        y_label: "RSS MB",
        series: &state.series,
        log_x: false,
        markers: &state.marks,
    };
    plot::draw_svg(path, &chart, (960, 420))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_chart_follows_loadgen_and_shows_the_marks() {
        start();
        start(); // a second start neither resets nor doubles the sampler
        mark("profile");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rss.svg");
        assert!(draw(&path).unwrap());
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in ["loadgen", "profile", "RSS MB"] {
            assert!(svg.contains(text), "{text} missing");
        }
        let state = SAMPLER.get().unwrap().state();
        assert_eq!(state.watched.len(), 1);
        assert!(state.series[0].points.iter().all(|(_, mb)| *mb > 0.0));
    }
}
