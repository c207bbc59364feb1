//! What both refsys services share: configuration parsing, the gRPC server bootstrap (health,
//! reflection, limits, graceful shutdown), telemetry, metrics and access-token handling.

pub mod authn;
pub mod config;
pub mod deadline;
pub mod metrics;
pub mod observe;
pub mod server;
pub mod telemetry;
pub mod tokens;
