//! `refsys.referral.v1.UserDirectory`: auth-service finds or creates users at sign-in.

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
    // TEMPORARY (replaced before commit): keeps the shared tree compiling while built.
    async fn lookup_user(
        &self,
        _request: Request<pb::LookupUserRequest>,
    ) -> Result<Response<pb::LookupUserResponse>, Status> {
        Err(Status::unimplemented("not yet"))
    }

    async fn delete_user(
        &self,
        _request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        Err(Status::unimplemented("not yet"))
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
