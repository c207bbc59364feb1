//! A harness that runs the real refsys binaries against real Postgres and Redis, for the
//! end-to-end tests (and the load generator): free ports, a fresh database, a private Redis that
//! can be stopped and restarted, and a local Twilio-compatible endpoint that captures the codes.

pub mod cluster;
pub mod dashboards;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod raw;
pub mod replicas;
pub mod sms;
pub mod stack;
pub mod stores;

pub use process::ServiceProcess;
pub use replicas::{ReplicaOptions, Replicas};
pub use sms::SmsCapture;
pub use stack::{Stack, StackOptions};
pub use stores::{PrivateRedis, TestDatabase};

/// A TCP port free on 127.0.0.1 a moment ago, for a process a test is about to start.
///
/// Taken below the kernel's ephemeral range, not from it: a port the OS hands out for `:0` goes
/// back to that pool, and any outgoing connection (the load of a parallel test) can take it as
/// its source port before the service binds it, which made a service fail to start with
/// "Address already in use". Ports below the range are only ever taken by a listener; 20000
/// and up are left to `scripts/redis-cluster`, which picks its nodes' ports there.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let end = ephemeral_range_start().clamp(FIRST + 1, 20_000);
    let span = end - FIRST;
    // Each test process starts somewhere else in the range, so two processes rarely probe
    // the same ports; within one process the counter never hands out a port twice.
    let _ = NEXT.compare_exchange(
        0,
        std::process::id().wrapping_mul(7_919) % span + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + n % span).expect("below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{end}")
}

/// The first port the kernel hands out for outgoing connections (Linux: 32768 by default).
fn ephemeral_range_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
        .min(u32::from(u16::MAX))
}

/// Where cargo put the binaries this test was built with (target/debug next to deps/).
pub fn binary_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let mut dir = exe
        .parent()
        .expect("test binaries live in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (scripts/test does: cargo build --bins)",
        path.display()
    );
    path
}
