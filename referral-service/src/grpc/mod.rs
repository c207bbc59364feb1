//! The transport layer: gRPC handlers, proto ↔ domain conversion at the edge.

mod admin;
mod convert;
mod directory;
mod events;
mod points;
mod referral;

pub use admin::AdminHandler;
pub use directory::DirectoryHandler;
pub use events::{EventHandler, STREAM_BUFFER};
pub use points::PointsHandler;
pub use referral::ReferralHandler;

use service_kit::authn;
use tonic::Status;

use crate::domain::UserId;

/// The calling user's id, from the verified token's `sub`.
fn caller_id<T>(request: &tonic::Request<T>) -> Result<UserId, Status> {
    let claims = authn::caller(request)?;
    UserId::parse(&claims.sub, "sub")
        .map_err(|_| Status::unauthenticated("the token's subject is not a user id"))
}
