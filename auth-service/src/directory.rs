//! The call to referral-service `UserDirectory.EnsureUser`, authenticated with a short-lived
//! service token, within the caller's remaining deadline, carrying the trace context.

use std::sync::Arc;
use std::time::Duration;

use refsys_proto::referral::v1::user_directory_client::UserDirectoryClient;
use refsys_proto::referral::v1::{EnsureUserRequest, InviteCodeOutcome};
use service_kit::tokens::{ENSURE_USER_SCOPE, REFERRAL_SERVICE_AUDIENCE};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::error::{AuthError, Dependency};
use crate::phone::PhoneNumber;
use crate::tokens::TokenIssuer;

/// Service tokens live just long enough for one call.
const SERVICE_TOKEN_TTL: Duration = Duration::from_secs(60);
/// The longest EnsureUser may take when the caller set no deadline.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The user behind a verified phone number.
#[derive(Debug, Clone)]
pub struct EnsuredUser {
    pub user_id: String,
    pub created: bool,
    pub roles: Vec<String>,
    pub invite_code_outcome: InviteCodeOutcome,
}

#[derive(Clone)]
pub struct Directory {
    client: UserDirectoryClient<Channel>,
    issuer: Arc<TokenIssuer>,
}

impl Directory {
    /// A client for `url` that connects lazily (and reconnects), so auth-service starts and
    /// serves SendCode while referral-service is still coming up.
    pub fn new(url: &str, issuer: Arc<TokenIssuer>) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(Self {
            client: UserDirectoryClient::new(channel),
            issuer,
        })
    }

    /// Finds or creates the user of `phone`, activating `invite_code` if given.
    pub async fn ensure_user(
        &self,
        phone: &PhoneNumber,
        invite_code: Option<String>,
        caller_timeout: Option<Duration>,
    ) -> Result<EnsuredUser, AuthError> {
        let token = self.issuer.service_token(
            REFERRAL_SERVICE_AUDIENCE,
            ENSURE_USER_SCOPE,
            SERVICE_TOKEN_TTL,
        )?;
        let mut request = tonic::Request::new(EnsureUserRequest {
            phone_number: phone.e164().to_owned(),
            invite_code,
        });
        request.set_timeout(caller_timeout.map_or(DEFAULT_TIMEOUT, |t| t.min(DEFAULT_TIMEOUT)));
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| AuthError::internal("service token is not valid metadata"))?;
        request.metadata_mut().insert("authorization", bearer);
        service_kit::telemetry::inject_context(request.metadata_mut());

        let response = self
            .client
            .clone()
            .ensure_user(request)
            .await
            .map_err(|status| match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::ResourceExhausted
                | Code::Aborted => {
                    AuthError::unavailable(Dependency::ReferralService, status.message())
                }
                // Both services share one phone validator, so this should not happen; if it does
                // (a rollout with two validator versions), it is the caller's number that was
                // refused, and the caller must hear so, not INTERNAL.
                Code::InvalidArgument => AuthError::invalid(
                    "phone_number",
                    "this phone number cannot be used to sign in",
                ),
                _ => AuthError::internal(format!(
                    "EnsureUser refused: {:?} {}",
                    status.code(),
                    status.message()
                )),
            })?
            .into_inner();
        Ok(EnsuredUser {
            invite_code_outcome: response.invite_code_outcome(),
            user_id: response.user_id,
            created: response.created,
            roles: response.roles,
        })
    }
}
