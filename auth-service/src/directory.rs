//! The calls to referral-service `UserDirectory` — EnsureUser at sign-in, LookupUser at each
//! refresh (live roles), DeleteUser for account deletion — each authenticated with a
//! short-lived service token carrying its own scope, within the caller's remaining deadline,
//! carrying the trace context.

use std::sync::Arc;
use std::time::Duration;

use refsys_proto::referral::v1::user_directory_client::UserDirectoryClient;
use refsys_proto::referral::v1::{
    DeleteUserRequest, EnsureUserRequest, InviteCodeOutcome, LookupUserRequest,
};
use service_kit::tokens::{
    DELETE_USER_SCOPE, ENSURE_USER_SCOPE, LOOKUP_USER_SCOPE, REFERRAL_SERVICE_AUDIENCE,
};
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

    /// A request carrying a service token for `scope`, the trace context and a deadline of at
    /// most the caller's.
    fn request<T>(
        &self,
        message: T,
        scope: &str,
        caller_timeout: Option<Duration>,
    ) -> Result<tonic::Request<T>, AuthError> {
        let token =
            self.issuer
                .service_token(REFERRAL_SERVICE_AUDIENCE, scope, SERVICE_TOKEN_TTL)?;
        let mut request = tonic::Request::new(message);
        request.set_timeout(caller_timeout.map_or(DEFAULT_TIMEOUT, |t| t.min(DEFAULT_TIMEOUT)));
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| AuthError::internal("service token is not valid metadata"))?;
        request.metadata_mut().insert("authorization", bearer);
        service_kit::telemetry::inject_context(request.metadata_mut());
        Ok(request)
    }

    /// Finds or creates the user of `phone`, activating `invite_code` if given.
    pub async fn ensure_user(
        &self,
        phone: &PhoneNumber,
        invite_code: Option<String>,
        caller_timeout: Option<Duration>,
    ) -> Result<EnsuredUser, AuthError> {
        let request = self.request(
            EnsureUserRequest {
                phone_number: phone.e164().to_owned(),
                invite_code,
            },
            ENSURE_USER_SCOPE,
            caller_timeout,
        )?;
        let response = self
            .client
            .clone()
            .ensure_user(request)
            .await
            .map_err(|status| match status.code() {
                // Both services share one phone validator, so this should not happen; if it
                // does (a rollout with two validator versions), it is the caller's number that
                // was refused, and the caller must hear so, not INTERNAL.
                Code::InvalidArgument => AuthError::invalid(
                    "phone_number",
                    "this phone number cannot be used to sign in",
                ),
                _ => call_failed("EnsureUser", &status),
            })?
            .into_inner();
        Ok(EnsuredUser {
            invite_code_outcome: response.invite_code_outcome(),
            user_id: response.user_id,
            created: response.created,
            roles: response.roles,
        })
    }

    /// The user's current roles; `None` when the user no longer exists.
    pub async fn live_roles(
        &self,
        user_id: &str,
        caller_timeout: Option<Duration>,
    ) -> Result<Option<Vec<String>>, AuthError> {
        let request = self.request(
            LookupUserRequest {
                user_id: user_id.to_owned(),
            },
            LOOKUP_USER_SCOPE,
            caller_timeout,
        )?;
        match self.client.clone().lookup_user(request).await {
            Ok(response) => Ok(Some(response.into_inner().roles)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(call_failed("LookupUser", &status)),
        }
    }

    /// Erases the user in referral-service. Idempotent: a user already deleted (or unknown)
    /// is done too.
    pub async fn delete_user(
        &self,
        user_id: &str,
        caller_timeout: Option<Duration>,
    ) -> Result<(), AuthError> {
        let request = self.request(
            DeleteUserRequest {
                user_id: user_id.to_owned(),
            },
            DELETE_USER_SCOPE,
            caller_timeout,
        )?;
        match self.client.clone().delete_user(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(call_failed("DeleteUser", &status)),
        }
    }
}

/// A failed call to referral-service: UNAVAILABLE for what a retry may fix, INTERNAL (logged,
/// opaque to the caller) for what it will not.
fn call_failed(rpc: &str, status: &tonic::Status) -> AuthError {
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::ResourceExhausted
        | Code::Aborted => AuthError::unavailable(Dependency::ReferralService, status.message()),
        _ => AuthError::internal(format!(
            "{rpc} refused: {:?} {}",
            status.code(),
            status.message()
        )),
    }
}
