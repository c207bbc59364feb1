//! What both refsys services share: configuration parsing, the gRPC server bootstrap (health,
//! reflection, limits, graceful shutdown), telemetry, metrics, access-token handling and the one phone-number validator.

pub mod authn;
pub mod config;
pub mod deadline;
pub mod metrics;
pub mod observe;
pub mod phone;
pub mod retry;
pub mod server;
pub mod telemetry;
pub mod tokens;
