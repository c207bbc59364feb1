//! End-to-end tests: both real binaries on free ports, against real Postgres and Redis.
//! One test binary on purpose: each extra one costs a link on 2 cores.

mod abuse;
mod bad_input;
mod cluster;
mod faults;
mod foundation;
mod journey;
mod keys;
mod monitoring;
mod observability;
mod platform;
mod replicas;
mod service_clients;
mod sessions;
