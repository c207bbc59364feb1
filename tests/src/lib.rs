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

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("the OS hands out an ephemeral port")
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
