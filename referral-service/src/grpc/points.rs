//! `refsys.referral.v1.PointsService`: internal services read balances, redeem and grant
//! points. Each RPC needs its own scope (see `crate::POINTS_SCOPES`), checked by the
//! authentication layer before these run; the caller, for idempotency keys and the ledger's
//! `requested_by`, is the service token's subject (the client id).

use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::points_service_server::PointsService;
use service_kit::authn;
use tonic::{Request, Response, Status};

use super::convert;
use crate::domain::UserId;
use crate::error::ReferralError;
use crate::points::{
    POINTS_GRANTED, POINTS_REDEEMED, POINTS_REFUSALS, POINTS_REPLAYS, PointsKind, PointsMove,
    PointsRequest,
};
use crate::storage::Repository;

pub struct PointsHandler {
    repository: Repository,
}

impl PointsHandler {
    pub fn new(repository: Repository) -> Self {
        crate::points::register_metrics();
        Self { repository }
    }
}

/// Validates and performs a redemption or grant for `caller`, counting it in the metrics.
/// Shared by PointsService and AdminService.GrantPoints.
pub(super) async fn move_points(
    repository: &Repository,
    caller: &str,
    kind: PointsKind,
    user_id: &str,
    points: i64,
    idempotency_key: &str,
    reason: &str,
) -> Result<(pb::BonusTransaction, i64), Status> {
    let refused = |error: ReferralError| {
        let label = match &error {
            ReferralError::InvalidArgument { .. } => Some("invalid_argument"),
            ReferralError::NotFound(_) => Some("not_found"),
            ReferralError::InsufficientPoints { .. } => Some("insufficient_points"),
            ReferralError::IdempotencyKeyReused => Some("idempotency_key_reused"),
            _ => None,
        };
        if let Some(label) = label {
            POINTS_REFUSALS
                .with_label_values(&[kind.as_str(), label])
                .inc();
        }
        Status::from(error)
    };
    let request =
        PointsRequest::parse(kind, user_id, points, idempotency_key, reason).map_err(refused)?;
    let PointsMove {
        entry,
        balance,
        replayed,
    } = repository
        .move_points(caller, &request)
        .await
        .map_err(refused)?;
    let moved = entry.amount.unsigned_abs();
    match (replayed, kind) {
        (true, _) => POINTS_REPLAYS.with_label_values(&[kind.as_str()]).inc(),
        (false, PointsKind::Redeem) => POINTS_REDEEMED.inc_by(moved),
        (false, PointsKind::Grant) => POINTS_GRANTED.inc_by(moved),
    }
    if !replayed {
        tracing::info!(
            user_id = %request.user,
            amount = entry.amount,
            balance,
            requested_by = caller,
            transaction_id = entry.id,
            "points {}",
            if kind == PointsKind::Redeem { "redeemed" } else { "granted" }
        );
    }
    Ok((convert::transaction(entry), balance))
}

/// The client id of the calling service (its token's subject). "admin:…" names admins'
/// requests (AdminService.GrantPoints), so no service may use it and share their keys.
fn service_caller<T>(request: &Request<T>) -> Result<String, Status> {
    let sub = &authn::caller(request)?.sub;
    if sub.starts_with(ADMIN_CALLER_PREFIX) {
        return Err(Status::permission_denied(
            "a service client id may not start with \"admin:\"",
        ));
    }
    Ok(sub.clone())
}

/// How an admin's requests are named: "admin:<user id>".
pub(super) const ADMIN_CALLER_PREFIX: &str = "admin:";

/// The caller of an admin's request.
pub(super) fn admin_caller(admin: UserId) -> String {
    format!("{ADMIN_CALLER_PREFIX}{admin}")
}

#[tonic::async_trait]
impl PointsService for PointsHandler {
    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let id = UserId::parse(&request.get_ref().user_id, "user_id")?;
        let balance = self.repository.balance(id).await?;
        Ok(Response::new(pb::GetBalanceResponse {
            user_id: id.to_string(),
            balance,
        }))
    }

    async fn redeem_points(
        &self,
        request: Request<pb::RedeemPointsRequest>,
    ) -> Result<Response<pb::RedeemPointsResponse>, Status> {
        let caller = service_caller(&request)?;
        let message = request.get_ref();
        let (transaction, balance) = move_points(
            &self.repository,
            &caller,
            PointsKind::Redeem,
            &message.user_id,
            message.points,
            &message.idempotency_key,
            &message.reason,
        )
        .await?;
        Ok(Response::new(pb::RedeemPointsResponse {
            transaction: Some(transaction),
            balance,
        }))
    }

    async fn grant_points(
        &self,
        request: Request<pb::GrantPointsRequest>,
    ) -> Result<Response<pb::GrantPointsResponse>, Status> {
        let caller = service_caller(&request)?;
        let message = request.get_ref();
        let (transaction, balance) = move_points(
            &self.repository,
            &caller,
            PointsKind::Grant,
            &message.user_id,
            message.points,
            &message.idempotency_key,
            &message.reason,
        )
        .await?;
        Ok(Response::new(pb::GrantPointsResponse {
            transaction: Some(transaction),
            balance,
        }))
    }
}
