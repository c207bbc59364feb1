//! CPU time per process group, from /proc: the load generator itself, each service, and the
//! stores (the stack's Postgres backends and its private redis-server), so each scenario can
//! say what 1,000 calls cost each of them.

use std::collections::HashMap;

/// Clock ticks per second of /proc's time fields (`getconf CLK_TCK`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime of `pid` (all its threads), and cutime + cstime (children it has waited
/// for), in ticks.
fn ticks(pid: u32) -> Option<(u64, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(15)?, field(16)? + field(17)?))
}

/// The processes of one run, by role.
#[derive(Clone, Default)]
pub struct Pids {
    pub auth: Option<u32>,
    pub referral: Option<u32>,
    /// The database whose Postgres backends count: they come and go with the pool, so they
    /// are looked up at each reading.
    pub database: Option<String>,
    pub redis: Option<u32>,
}

/// Backends serving `database`, by their process title (`postgres: <user> <database> …`).
fn postgres_backends(database: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let wanted = format!(" {database} ");
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let title = String::from_utf8_lossy(&cmdline);
                title.starts_with("postgres: ") && title.contains(&wanted)
            })
        })
        .collect()
}

/// A reading of every role's CPU time, in ticks.
#[derive(Clone, Default)]
pub struct Reading {
    loadgen: u64,
    /// Children of the load generator it has waited for: h2load, pgbench, redis-benchmark.
    children: u64,
    auth: u64,
    referral: u64,
    postgres: HashMap<u32, u64>,
    redis: u64,
}

impl Reading {
    pub fn now(pids: &Pids) -> Self {
        let own = ticks(std::process::id()).unwrap_or_default();
        let single = |pid: Option<u32>| pid.and_then(ticks).map_or(0, |t| t.0);
        Self {
            loadgen: own.0,
            children: own.1,
            auth: single(pids.auth),
            referral: single(pids.referral),
            postgres: pids
                .database
                .as_deref()
                .map(postgres_backends)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|pid| Some((pid, ticks(pid)?.0)))
                .collect(),
            redis: single(pids.redis),
        }
    }
}

/// CPU milliseconds per 1,000 calls between two readings.
#[derive(Clone, Copy, Default, Debug)]
pub struct PerThousand {
    /// The driver: loadgen itself, or the child (h2load) when one drove the calls.
    pub driver: f64,
    pub auth: f64,
    pub referral: f64,
    pub postgres: f64,
    pub redis: f64,
}

impl PerThousand {
    /// The figures of two runs of `calls` and `other_calls` calls as one.
    pub fn weighted(&self, calls: u64, other: &Self, other_calls: u64) -> Self {
        let total = (calls + other_calls).max(1) as f64;
        let (a, b) = (calls as f64 / total, other_calls as f64 / total);
        let mix = |x: f64, y: f64| x * a + y * b;
        Self {
            driver: mix(self.driver, other.driver),
            auth: mix(self.auth, other.auth),
            referral: mix(self.referral, other.referral),
            postgres: mix(self.postgres, other.postgres),
            redis: mix(self.redis, other.redis),
        }
    }

    /// `driver_is_child`: the calls were made by a child process (h2load), so its time counts
    /// as the driver's instead of loadgen's own.
    pub fn between(before: &Reading, after: &Reading, calls: u64, driver_is_child: bool) -> Self {
        if calls == 0 {
            return Self::default();
        }
        let per = |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1000.0 * 1000.0 / calls as f64;
        let driver = if driver_is_child {
            after.children.saturating_sub(before.children)
        } else {
            after.loadgen.saturating_sub(before.loadgen)
        };
        // A backend that was not there before started during the run: all its time counts.
        let postgres = after
            .postgres
            .iter()
            .map(|(pid, t)| t.saturating_sub(before.postgres.get(pid).copied().unwrap_or(0)))
            .sum();
        Self {
            driver: per(driver),
            auth: per(after.auth.saturating_sub(before.auth)),
            referral: per(after.referral.saturating_sub(before.referral)),
            postgres: per(postgres),
            redis: per(after.redis.saturating_sub(before.redis)),
        }
    }
}

/// The pid of the redis-server on `port`, from `INFO server`.
pub async fn redis_pid(port: u16) -> Option<u32> {
    let mut conn = crate::resp::Connection::open(port).await.ok()?;
    let crate::resp::Reply::Bulk(Some(info)) = conn.call(&["INFO", "server"]).await.ok()? else {
        return None;
    };
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_fields_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 5 3 2 20 0 3 0";
        assert_eq!(parse_stat(stat), Some((22, 5)));
        assert_eq!(parse_stat("4242 (x) S 1"), None);
    }

    #[test]
    fn this_process_has_a_reading() {
        assert!(ticks(std::process::id()).is_some());
    }
}
