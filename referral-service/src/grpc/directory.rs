//! `refsys.referral.v1.UserDirectory`: auth-service finds or creates users at sign-in, reads
//! their live roles at refresh and deletes accounts. Each RPC needs its own scope (see
//! `crate::DIRECTORY_SCOPES`), checked by the authentication layer before these run.

use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::user_directory_server::UserDirectory;
use tonic::{Request, Response, Status};

use super::convert;
use super::referral::ACTIVATIONS;
use crate::domain::{PhoneNumber, UserId};
use crate::error::ReferralError;
use crate::storage::{InviteOutcome, Repository};

pub struct DirectoryHandler {
    repository: Repository,
}

impl DirectoryHandler {
    pub fn new(repository: Repository) -> Self {
        Self { repository }
    }
}

#[tonic::async_trait]
impl UserDirectory for DirectoryHandler {
    async fn lookup_user(
        &self,
        request: Request<pb::LookupUserRequest>,
    ) -> Result<Response<pb::LookupUserResponse>, Status> {
        let id = UserId::parse(&request.get_ref().user_id, "user_id")?;
        let roles = self.repository.roles(id).await?;
        Ok(Response::new(pb::LookupUserResponse {
            user_id: id.to_string(),
            roles,
        }))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let id = UserId::parse(&request.get_ref().user_id, "user_id")?;
        let deleted = self.repository.delete_user(id).await?;
        if deleted {
            tracing::info!(user_id = %id, "user deleted: personal data erased");
        } else {
            tracing::info!(user_id = %id, "user already deleted");
        }
        Ok(Response::new(pb::DeleteUserResponse { deleted }))
    }

    async fn ensure_user(
        &self,
        request: Request<pb::EnsureUserRequest>,
    ) -> Result<Response<pb::EnsureUserResponse>, Status> {
        let message = request.into_inner();
        let phone = PhoneNumber::parse(&message.phone_number, None).map_err(ReferralError::from)?;
        let (user, created) = self.repository.ensure_user(&phone).await?;
        let outcome = self
            .repository
            .activate_at_sign_in(UserId(user.id), message.invite_code.as_deref())
            .await?;
        if outcome == InviteOutcome::Applied {
            ACTIVATIONS.inc();
        }
        if created {
            tracing::info!(user_id = %user.id, phone = ?phone, "user created");
        }
        Ok(Response::new(pb::EnsureUserResponse {
            user_id: user.id.to_string(),
            created,
            roles: user.roles,
            invite_code_outcome: convert::invite_outcome(&outcome).into(),
        }))
    }
}
