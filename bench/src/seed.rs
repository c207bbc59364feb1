//! Scale mode: 1,000,000 users, one inviter with 100,000 invitees, seeded with SQL (not RPC by
//! RPC); then GetProfile, ListInvitees and ActivateInviteCode for that inviter.

use std::sync::Arc;
use std::time::Duration;

use e2e_tests::Stack;

use crate::scenarios::Bench;
use crate::stats::Summary;

pub async fn scale(
    bench: &Arc<Bench>,
    stack: &Stack,
    duration: Duration,
) -> (Vec<Summary>, String) {
    let _ = (bench, stack, duration);
    (Vec::new(), "scale: not run yet".into())
}
