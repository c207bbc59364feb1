//! `refsys.referral.v1.AdminService`: full views of users and point grants, for operators with
//! the admin role.

use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use super::{caller_id, convert, points};
use crate::domain::{PhonePrefix, UserId};
use crate::points::PointsKind;
use crate::rules::{self, Cursor};
use crate::storage::Repository;

pub struct AdminHandler {
    repository: Repository,
}

impl AdminHandler {
    pub fn new(repository: Repository) -> Self {
        Self { repository }
    }
}

#[tonic::async_trait]
impl AdminService for AdminHandler {
    async fn grant_points(
        &self,
        request: Request<pb::AdminServiceGrantPointsRequest>,
    ) -> Result<Response<pb::AdminServiceGrantPointsResponse>, Status> {
        let caller = points::admin_caller(caller_id(&request)?);
        let message = request.get_ref();
        let (transaction, balance) = points::move_points(
            &self.repository,
            &caller,
            PointsKind::Grant,
            &message.user_id,
            message.points,
            &message.idempotency_key,
            &message.reason,
        )
        .await?;
        Ok(Response::new(pb::AdminServiceGrantPointsResponse {
            transaction: Some(transaction),
            balance,
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let message = request.get_ref();
        let size = rules::page_size(message.page_size)?;
        let cursor = Cursor::decode(&message.page_token)?;
        let prefix = PhonePrefix::parse(&message.filter)?;
        let page = self
            .repository
            .users(prefix.as_ref(), cursor.as_ref(), size)
            .await?;
        Ok(Response::new(pb::ListUsersResponse {
            next_page_token: convert::next_token(&page),
            users: page
                .items
                .into_iter()
                .map(|user| convert::profile(user, Vec::new()))
                .collect(),
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::AdminServiceGetUserRequest>,
    ) -> Result<Response<pb::AdminServiceGetUserResponse>, Status> {
        let id = UserId::parse(&request.get_ref().user_id, "user_id")?;
        let (user, invitees) = self.repository.profile(id, rules::PROFILE_INVITEES).await?;
        Ok(Response::new(pb::AdminServiceGetUserResponse {
            user: Some(convert::profile(user, invitees)),
        }))
    }
}
