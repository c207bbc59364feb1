//! `refsys.auth.v1.AuthService`: the transport layer over the OTP store, the SMS sender, the
//! user directory and the token issuer.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use refsys_proto::auth::v1 as pb;
use refsys_proto::auth::v1::auth_service_server::AuthService;
use refsys_proto::referral::v1::InviteCodeOutcome as DirectoryOutcome;
use tonic::{Request, Response, Status};

use crate::client::ClientId;
use crate::directory::{Directory, EnsuredUser};
use crate::error::{AuthError, Dependency, SERVICE_CLIENT_REJECTED};
use crate::metrics;
use crate::otp::{CodeLength, OtpCode, Pepper};
use crate::phone::{PhoneNumber, Region};
use crate::policy::{SmsPolicy, TestNumbers};
use crate::service_clients::{self, MAX_CLIENT_ID_BYTES, MAX_SECRET_BYTES, ServiceClients};
use crate::sms::SmsSender;
use crate::store::fraud::RegionStanding;
use crate::store::otp::{SendAdmission, VerifyOutcome};
use crate::store::refresh::{
    FamilyOwner, IssuedRefreshToken, RefreshToken, RotateOutcome, valid_session_id,
};
use crate::store::service_tokens::{Admission, ServiceTokenStore};
use crate::store::{OtpStore, RefreshStore};
use crate::tokens::{Clock, TokenIssuer};

/// Longest access token IntrospectToken looks at; anything longer is simply not active.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Time kept back from the call's deadline when the SMS provider is called: enough to roll the
/// send back and answer before the caller gives up.
pub const SMS_DEADLINE_MARGIN: Duration = Duration::from_millis(250);

pub struct AuthHandler {
    pub otp: OtpStore,
    pub refresh: RefreshStore,
    pub sms: Arc<dyn SmsSender>,
    pub sms_policy: SmsPolicy,
    pub test_numbers: TestNumbers,
    pub pepper: Pepper,
    pub code_length: CodeLength,
    pub phone_region: Option<Region>,
    pub issuer: Arc<TokenIssuer>,
    pub directory: Directory,
    /// `SERVICE_CLIENTS_FILE`: who may call IssueServiceToken.
    pub service_clients: ServiceClients,
    /// The attempt and failure budgets of IssueServiceToken.
    pub service_tokens: ServiceTokenStore,
    /// `SERVICE_TOKEN_TTL_SECONDS`.
    pub service_token_ttl: Duration,
    pub trusted_proxy_hops: usize,
    /// `REQUEST_TIMEOUT_SECONDS`: no call runs longer, whatever deadline its caller set.
    pub server_timeout: Duration,
    pub clock: Arc<dyn Clock>,
}

fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(at)
}

fn outcome_of(outcome: DirectoryOutcome) -> pb::InviteCodeOutcome {
    match outcome {
        DirectoryOutcome::Unspecified => pb::InviteCodeOutcome::Unspecified,
        DirectoryOutcome::NotProvided => pb::InviteCodeOutcome::NotProvided,
        DirectoryOutcome::Applied => pb::InviteCodeOutcome::Applied,
        DirectoryOutcome::Invalid => pb::InviteCodeOutcome::Invalid,
        DirectoryOutcome::NotFound => pb::InviteCodeOutcome::NotFound,
        DirectoryOutcome::AlreadyActivated => pb::InviteCodeOutcome::AlreadyActivated,
        DirectoryOutcome::OwnCode => pb::InviteCodeOutcome::OwnCode,
        DirectoryOutcome::InviterJoinedLater => pb::InviteCodeOutcome::InviterJoinedLater,
    }
}

fn policy_refused(refusal: crate::policy::PolicyRefusal) -> AuthError {
    metrics::POLICY_REFUSALS
        .with_label_values(&[refusal.reason()])
        .inc();
    AuthError::NotAllowed(refusal)
}

fn rate_limited(limit: crate::error::Limit, retry_after: Duration) -> AuthError {
    metrics::LIMIT_REFUSALS
        .with_label_values(&[&limit.label()])
        .inc();
    AuthError::RateLimited { limit, retry_after }
}

/// What the caller sees after sending: the code's expiry and when it may ask again.
struct Sent {
    code_ttl: Duration,
    next_send_in: Duration,
}

impl AuthHandler {
    /// The phone number of a SendCode or VerifyCode. A number of a region that is never texted
    /// is refused from its calling code before it is parsed (parsing is the costly part a
    /// caller controls); test numbers skip that, as they skip every region rule.
    fn phone(&self, input: &str) -> Result<PhoneNumber, AuthError> {
        if !self.test_numbers.matches_input(input) {
            self.sms_policy.screen(input).map_err(policy_refused)?;
        }
        PhoneNumber::parse(input, self.phone_region)
            .map_err(|err| AuthError::invalid("phone_number", err.to_string()))
    }

    fn client<T>(&self, request: &Request<T>) -> ClientId {
        let forwarded = request
            .metadata()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok());
        ClientId::from_request(request.remote_addr(), forwarded, self.trusted_proxy_hops)
    }

    /// When the call must have answered: the caller's `grpc-timeout` or the server's own
    /// timeout, whichever comes first.
    fn deadline<T>(&self, request: &Request<T>, started: Instant) -> Instant {
        let allowed = service_kit::deadline::requested_timeout(request.metadata())
            .map_or(self.server_timeout, |caller| {
                caller.min(self.server_timeout)
            });
        started + allowed
    }

    async fn send_code(
        &self,
        phone: PhoneNumber,
        client: ClientId,
        deadline: Instant,
    ) -> Result<pb::SendCodeResponse, AuthError> {
        let now = self.clock.now();
        let sent = if self.test_numbers.code_of(&phone).is_some() {
            metrics::TEST_NUMBER_USES
                .with_label_values(&["SendCode"])
                .inc();
            tracing::warn!(phone = %phone.masked(), "test phone number: no SMS sent, no send limits applied");
            Sent {
                code_ttl: self.otp.limits().code_ttl,
                next_send_in: Duration::ZERO,
            }
        } else {
            self.sms_policy.check(&phone).map_err(policy_refused)?;
            self.send_sms(&phone, &client, deadline).await?
        };
        Ok(pb::SendCodeResponse {
            phone_number: phone.e164().to_owned(),
            code_length: u32::from(self.code_length.get()),
            expire_time: Some(timestamp(now + sent.code_ttl)),
            next_send_time: Some(timestamp(now + sent.next_send_in)),
        })
    }

    /// Admits the send, stores the code and hands it to the provider within the call's
    /// deadline; any failure gives every budget back.
    async fn send_sms(
        &self,
        phone: &PhoneNumber,
        client: &ClientId,
        deadline: Instant,
    ) -> Result<Sent, AuthError> {
        let too_late = || {
            AuthError::unavailable(
                Dependency::Sms,
                "no time left within the call's deadline to reach the SMS provider",
            )
        };
        if deadline.saturating_duration_since(Instant::now()) <= SMS_DEADLINE_MARGIN {
            return Err(too_late());
        }
        let code = OtpCode::generate(&mut rand::rng(), self.code_length);
        let hash = self.pepper.hash_code(phone, &code);
        let reservation = match self.otp.begin_send(phone, client, &hash).await? {
            SendAdmission::Admitted(reservation) => reservation,
            SendAdmission::Refused { limit, retry_after } => {
                return Err(rate_limited(limit, retry_after));
            }
        };
        let sent = Sent {
            code_ttl: reservation.code_ttl,
            next_send_in: reservation.next_send_in,
        };
        let time_left = deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(SMS_DEADLINE_MARGIN);
        // A provider that does not answer in time may still deliver the message; it is not
        // retried, and the send is rolled back all the same: the caller heard UNAVAILABLE.
        let delivered =
            match tokio::time::timeout(time_left, self.sms.send(phone, code.expose())).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(AuthError::from(err)),
                Err(_) => Err(too_late()),
            };
        if let Err(err) = delivered {
            metrics::SMS_FAILURES.inc();
            if let Err(rollback) = self.otp.rollback_send(reservation).await {
                tracing::warn!(error = %rollback, "could not roll back a failed send");
            }
            tracing::warn!(phone = %phone.masked(), error = %err, "the code was not sent");
            return Err(err);
        }
        metrics::CODES_SENT.inc();
        metrics::REGION_SENDS
            .with_label_values(&[phone.region_code()])
            .inc();
        tracing::info!(phone = %phone.masked(), client = %client, "code sent");
        let standing = self.otp.record_sent(phone, self.clock.now()).await;
        self.report_conversion(phone, standing);
        Ok(sent)
    }

    /// Logs and counts a trip of the conversion guard. A failure to count is logged only: the
    /// code already went out, or was already verified.
    fn report_conversion(
        &self,
        phone: &PhoneNumber,
        standing: Result<Option<RegionStanding>, crate::store::StoreError>,
    ) {
        match standing {
            Ok(Some(standing)) if standing.tripped => {
                let mode = self.otp.fraud_settings().mode.as_str();
                metrics::FRAUD_SUSPECTED
                    .with_label_values(&[phone.region_code(), mode])
                    .inc();
                tracing::warn!(
                    region = phone.region_code(),
                    sends = standing.sends,
                    verified = standing.verified,
                    mode,
                    "SMS fraud suspected: few codes sent to this region are verified"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "could not update the conversion guard"),
        }
    }

    async fn verify_code(
        &self,
        phone: PhoneNumber,
        client: ClientId,
        code: &str,
        invite_code: Option<String>,
        caller_timeout: Option<Duration>,
    ) -> Result<pb::VerifyCodeResponse, AuthError> {
        let code = OtpCode::parse(code, self.code_length)
            .map_err(|err| AuthError::invalid("code", err.to_string()))?;
        let hash = self.pepper.hash_code(&phone, &code);
        let fixed = self
            .test_numbers
            .code_of(&phone)
            .map(|fixed| self.pepper.hash_code(&phone, fixed));
        let claim = match self
            .otp
            .verify(&phone, &client, &hash, fixed.as_deref())
            .await?
        {
            VerifyOutcome::Claimed(claim) => Some(claim),
            VerifyOutcome::FixedCodeAccepted => {
                metrics::TEST_NUMBER_USES
                    .with_label_values(&["VerifyCode"])
                    .inc();
                tracing::warn!(phone = %phone.masked(), "test phone number signed in with its fixed code");
                None
            }
            VerifyOutcome::Rejected(why) => return Err(AuthError::CodeRejected(why)),
            VerifyOutcome::LockedOut { limit, retry_after } => {
                return Err(rate_limited(limit, retry_after));
            }
        };

        // Until the code is consumed, any failure gives it back so a retry can use it.
        let signed_in = self
            .sign_in(&phone, &client, invite_code, caller_timeout)
            .await;
        let (user, refresh) = match (signed_in, claim) {
            (Ok(done), None) => done,
            (Ok(done), Some(claim)) => {
                if !self.otp.consume(claim).await? {
                    // The claim's lease ran out and another verification took the code: exactly
                    // one sign-in per code, so this one loses.
                    let _ = self.refresh.revoke(&done.1.token).await;
                    return Err(AuthError::CodeRejected(crate::error::Rejection::Busy));
                }
                metrics::REGION_VERIFICATIONS
                    .with_label_values(&[phone.region_code()])
                    .inc();
                let standing = self.otp.record_verified(&phone, self.clock.now()).await;
                self.report_conversion(&phone, standing);
                done
            }
            (Err(err), claim) => {
                if let Some(claim) = claim
                    && let Err(release) = self.otp.release(claim).await
                {
                    tracing::warn!(error = %release, "could not release a claimed code");
                }
                return Err(err);
            }
        };

        let now = self.clock.now();
        let access = self.issuer.session_access_token(
            &user.user_id,
            &user.roles,
            &refresh.session_id,
            now,
            uuid::Uuid::new_v4().to_string(),
        )?;
        let outcome = outcome_of(user.invite_code_outcome);
        tracing::info!(phone = %phone.masked(), user_id = %user.user_id, new_user = user.created, "signed in");
        Ok(pb::VerifyCodeResponse {
            user_id: user.user_id,
            new_user: user.created,
            access_token: access.token,
            access_token_expire_time: Some(timestamp(access.expires_at)),
            refresh_token: refresh.token.expose().to_owned(),
            refresh_token_expire_time: Some(timestamp(refresh.expires_at)),
            invite_code_applied: outcome == pb::InviteCodeOutcome::Applied,
            invite_code_outcome: outcome.into(),
        })
    }

    /// The user behind the phone (created on first sign-in) and a new session.
    async fn sign_in(
        &self,
        phone: &PhoneNumber,
        client: &ClientId,
        invite_code: Option<String>,
        caller_timeout: Option<Duration>,
    ) -> Result<(EnsuredUser, IssuedRefreshToken), AuthError> {
        let user = self
            .directory
            .ensure_user(phone, invite_code, caller_timeout)
            .await?;
        let owner = FamilyOwner {
            user_id: user.user_id.clone(),
            roles: user.roles.clone(),
        };
        let refresh = self
            .refresh
            .create_family(&owner, &client.to_string(), self.clock.now())
            .await?;
        Ok((user, refresh))
    }

    /// The claims of the Bearer access token of `request`: the signed-in caller.
    fn caller<T>(&self, request: &Request<T>) -> Result<service_kit::tokens::Claims, AuthError> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(AuthError::Unauthenticated(
                "this RPC needs \"authorization: Bearer <access token>\"",
            ))?;
        (token.len() <= MAX_TOKEN_BYTES)
            .then(|| self.issuer.introspect(token))
            .flatten()
            .map(|verified| verified.claims)
            .ok_or(AuthError::Unauthenticated(
                "the access token is invalid or expired",
            ))
    }

    async fn refresh(
        &self,
        presented: RefreshToken,
        caller_timeout: Option<Duration>,
    ) -> Result<pb::RefreshTokensResponse, AuthError> {
        let Some(found) = self.refresh.peek(&presented).await? else {
            return Err(AuthError::InvalidRefreshToken);
        };
        // The access token carries the user's roles as they are now, read before anything
        // changes: if referral-service cannot answer, the session is left exactly as it was.
        let roles = if found.current {
            match self
                .directory
                .live_roles(&found.user_id, caller_timeout)
                .await?
            {
                Some(roles) => roles,
                None => {
                    self.refresh
                        .revoke_session(&found.user_id, &found.session_id)
                        .await?;
                    return Err(AuthError::Unauthenticated(
                        "the account of this session no longer exists",
                    ));
                }
            }
        } else {
            // Not current: a replay within the grace window reuses the roles of the first
            // rotation, anything else revokes or fails without looking at roles.
            Vec::new()
        };
        let rotation = match self
            .refresh
            .rotate(&presented, &found.session_id, &roles, self.clock.now())
            .await?
        {
            RotateOutcome::Rotated(rotation) => rotation,
            RotateOutcome::Reused => {
                metrics::REFRESH_REUSE.inc();
                tracing::warn!(
                    user_id = %found.user_id,
                    "an already-rotated refresh token was presented after the grace window; its session is revoked"
                );
                return Err(AuthError::RefreshTokenReused);
            }
            RotateOutcome::LifetimeOver => {
                return Err(AuthError::Unauthenticated(
                    "this session reached its maximum lifetime; sign in again",
                ));
            }
            RotateOutcome::Invalid => return Err(AuthError::InvalidRefreshToken),
        };
        if rotation.replayed {
            metrics::REFRESH_REPLAYED.inc();
        } else {
            metrics::REFRESH_ROTATED.inc();
        }
        let access = self.issuer.session_access_token(
            &rotation.owner.user_id,
            &rotation.owner.roles,
            &rotation.session_id,
            rotation.rotated_at,
            self.refresh.token_id(&rotation.token),
        )?;
        Ok(pb::RefreshTokensResponse {
            access_token: access.token,
            access_token_expire_time: Some(timestamp(access.expires_at)),
            refresh_token: rotation.token.expose().to_owned(),
            refresh_token_expire_time: Some(timestamp(rotation.expires_at)),
        })
    }

    /// Whose sessions a RevokeAllSessions names: the caller's, or with the admin role anyone's.
    fn sessions_owner(
        claims: &service_kit::tokens::Claims,
        requested: &str,
    ) -> Result<String, AuthError> {
        let requested = requested.trim();
        if requested.is_empty() || requested == claims.sub {
            return Ok(claims.sub.clone());
        }
        if !claims.has_role(service_kit::tokens::ADMIN_ROLE) {
            return Err(AuthError::PermissionDenied(
                "only an admin may end another user's sessions",
            ));
        }
        uuid::Uuid::parse_str(requested)
            .map(|id| id.to_string())
            .map_err(|_| AuthError::invalid("user_id", "expected a user id (UUID)"))
    }

    /// OAuth 2.0 client credentials: checks the request's shape (before any hashing or
    /// counting), admits the attempt on the client id's budgets, checks the secret in constant
    /// time, then the scopes, and mints a service token for referral-service.
    async fn issue_service_token(
        &self,
        request: &pb::IssueServiceTokenRequest,
    ) -> Result<pb::IssueServiceTokenResponse, AuthError> {
        let id = request.client_id.as_str();
        let secret = request.client_secret.as_str();
        if id.is_empty() {
            return Err(AuthError::invalid("client_id", "required"));
        }
        if id.len() > MAX_CLIENT_ID_BYTES {
            return Err(AuthError::invalid(
                "client_id",
                format!("at most {MAX_CLIENT_ID_BYTES} bytes"),
            ));
        }
        if secret.is_empty() {
            return Err(AuthError::invalid("client_secret", "required"));
        }
        if secret.len() > MAX_SECRET_BYTES {
            return Err(AuthError::invalid(
                "client_secret",
                format!("at most {MAX_SECRET_BYTES} bytes"),
            ));
        }
        let requested = service_clients::parse_requested(&request.scopes)
            .map_err(|why| AuthError::invalid("scopes", why))?;

        // From here on, an unknown id takes exactly the path of a wrong secret: the shared
        // budgets of unknown ids, one SHA-256, one constant-time comparison, one answer.
        let client = self.service_clients.get(id);
        let attempt = match self.service_tokens.admit(client).await? {
            Admission::Admitted(attempt) => attempt,
            Admission::Refused { limit, retry_after } => {
                return Err(AuthError::RateLimited { limit, retry_after });
            }
        };
        let Some(client) = self.service_clients.verify(client, secret) else {
            return Err(AuthError::Unauthenticated(SERVICE_CLIENT_REJECTED));
        };
        if let Err(err) = self.service_tokens.succeeded(attempt).await {
            // The credentials were right: a failure slot that stays taken only errs towards
            // refusing sooner.
            tracing::warn!(client = client.id(), error = %err, "could not give back a failure slot");
        }
        let scopes = client.grant(&requested).map_err(|missing| {
            tracing::info!(client = client.id(), scope = missing, "a service client asked for a scope it does not hold");
            AuthError::PermissionDenied(
                "this client does not hold every requested scope; ask for fewer, or for none to get all it holds",
            )
        })?;
        let token = self.issuer.scoped_token(
            client.id(),
            service_kit::tokens::REFERRAL_SERVICE_AUDIENCE,
            &scopes,
            self.service_token_ttl,
        )?;
        metrics::SERVICE_TOKENS_ISSUED
            .with_label_values(&[client.id()])
            .inc();
        tracing::info!(client = client.id(), scopes = %scopes.join(" "), "service token issued");
        Ok(pb::IssueServiceTokenResponse {
            access_token: token.token,
            expire_time: Some(timestamp(token.expires_at)),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    fn parse_refresh_token(input: &str) -> Result<RefreshToken, AuthError> {
        RefreshToken::parse(input.trim())
            .ok_or_else(|| AuthError::invalid("refresh_token", "not a refresh token"))
    }
}

/// The `reason` label of a refused IssueServiceToken.
fn service_token_refusal(err: &AuthError) -> String {
    match err {
        AuthError::InvalidArgument { .. } => "invalid_argument".to_owned(),
        AuthError::Unauthenticated(_) => "unauthenticated".to_owned(),
        AuthError::PermissionDenied(_) => "permission_denied".to_owned(),
        AuthError::RateLimited { limit, .. } => limit.label(),
        AuthError::Unavailable { .. } => "unavailable".to_owned(),
        _ => "error".to_owned(),
    }
}

fn verification_label(result: &Result<pb::VerifyCodeResponse, AuthError>) -> &'static str {
    match result {
        Ok(_) => "success",
        Err(AuthError::CodeRejected(why)) => why.label(),
        Err(AuthError::RateLimited { .. }) => "locked",
        Err(AuthError::InvalidArgument { .. } | AuthError::NotAllowed(_)) => "invalid",
        Err(AuthError::Unavailable { .. }) => "unavailable",
        Err(_) => "error",
    }
}

#[tonic::async_trait]
impl AuthService for AuthHandler {
    async fn issue_service_token(
        &self,
        request: Request<pb::IssueServiceTokenRequest>,
    ) -> Result<Response<pb::IssueServiceTokenResponse>, Status> {
        let message = request.into_inner();
        match self.issue_service_token(&message).await {
            Ok(response) => Ok(Response::new(response)),
            Err(err) => {
                // The label is a configured id or "(unknown)": callers cannot grow the label set.
                let client = self.service_clients.label(&message.client_id);
                let reason = service_token_refusal(&err);
                metrics::SERVICE_TOKEN_REFUSALS
                    .with_label_values(&[client, reason.as_str()])
                    .inc();
                if matches!(
                    err,
                    AuthError::Unauthenticated(_) | AuthError::RateLimited { .. }
                ) {
                    tracing::warn!(client, reason = %reason, "service token refused");
                }
                Err(err.into())
            }
        }
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let claims = self.caller(&request)?;
        let sessions = self
            .refresh
            .sessions(&claims.sub)
            .await
            .map_err(AuthError::from)?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions
                .into_iter()
                .map(|session| pb::Session {
                    current: claims.sid.as_deref() == Some(session.session_id.as_str()),
                    session_id: session.session_id,
                    create_time: Some(timestamp(session.created_at)),
                    last_refresh_time: Some(timestamp(session.last_refresh_at)),
                    expire_time: Some(timestamp(session.expires_at)),
                    client_address: session.client,
                })
                .collect(),
        }))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let claims = self.caller(&request)?;
        let session_id = request.get_ref().session_id.trim();
        if !valid_session_id(session_id) {
            return Err(
                AuthError::invalid("session_id", "not a session id from ListSessions").into(),
            );
        }
        if !self
            .refresh
            .revoke_session(&claims.sub, session_id)
            .await
            .map_err(AuthError::from)?
        {
            return Err(AuthError::NotFound("you have no session with this id").into());
        }
        metrics::SESSIONS_REVOKED.inc();
        Ok(Response::new(pb::RevokeSessionResponse {}))
    }

    async fn revoke_all_sessions(
        &self,
        request: Request<pb::RevokeAllSessionsRequest>,
    ) -> Result<Response<pb::RevokeAllSessionsResponse>, Status> {
        let claims = self.caller(&request)?;
        let owner = Self::sessions_owner(&claims, &request.get_ref().user_id)?;
        let revoked = self
            .refresh
            .revoke_all(&owner)
            .await
            .map_err(AuthError::from)?;
        metrics::SESSIONS_REVOKED.inc_by(u64::from(revoked));
        if owner != claims.sub {
            tracing::warn!(admin = %claims.sub, user_id = %owner, revoked, "an admin ended every session of a user");
        }
        Ok(Response::new(pb::RevokeAllSessionsResponse {
            revoked_count: i32::try_from(revoked).unwrap_or(i32::MAX),
        }))
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeleteAccountResponse>, Status> {
        let claims = self.caller(&request)?;
        let caller_timeout = service_kit::deadline::requested_timeout(request.metadata());
        // Erase first, then end the sessions: if either step fails the caller retries with the
        // same access token, and each step is idempotent. Sessions that survive a failure die
        // at their next refresh, which finds the account gone.
        self.directory
            .delete_user(&claims.sub, caller_timeout)
            .await?;
        let revoked = self
            .refresh
            .revoke_all(&claims.sub)
            .await
            .map_err(AuthError::from)?;
        metrics::ACCOUNTS_DELETED.inc();
        tracing::info!(user_id = %claims.sub, revoked, "account deleted");
        Ok(Response::new(pb::DeleteAccountResponse {}))
    }

    async fn send_code(
        &self,
        request: Request<pb::SendCodeRequest>,
    ) -> Result<Response<pb::SendCodeResponse>, Status> {
        let deadline = self.deadline(&request, Instant::now());
        let client = self.client(&request);
        let phone = self.phone(&request.get_ref().phone_number)?;
        Ok(Response::new(
            self.send_code(phone, client, deadline).await?,
        ))
    }

    async fn verify_code(
        &self,
        request: Request<pb::VerifyCodeRequest>,
    ) -> Result<Response<pb::VerifyCodeResponse>, Status> {
        let caller_timeout = service_kit::deadline::requested_timeout(request.metadata());
        let client = self.client(&request);
        let message = request.into_inner();
        let result = match self.phone(&message.phone_number) {
            Ok(phone) => {
                self.verify_code(
                    phone,
                    client,
                    &message.code,
                    message.invite_code,
                    caller_timeout,
                )
                .await
            }
            Err(err) => Err(err),
        };
        metrics::VERIFICATIONS
            .with_label_values(&[verification_label(&result)])
            .inc();
        Ok(Response::new(result?))
    }

    async fn refresh_tokens(
        &self,
        request: Request<pb::RefreshTokensRequest>,
    ) -> Result<Response<pb::RefreshTokensResponse>, Status> {
        let caller_timeout = service_kit::deadline::requested_timeout(request.metadata());
        let presented = Self::parse_refresh_token(&request.get_ref().refresh_token)?;
        Ok(Response::new(
            self.refresh(presented, caller_timeout).await?,
        ))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let presented = Self::parse_refresh_token(&request.get_ref().refresh_token)?;
        self.refresh
            .revoke(&presented)
            .await
            .map_err(AuthError::from)?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn introspect_token(
        &self,
        request: Request<pb::IntrospectTokenRequest>,
    ) -> Result<Response<pb::IntrospectTokenResponse>, Status> {
        let token = request.get_ref().access_token.trim();
        let verified = (token.len() <= MAX_TOKEN_BYTES)
            .then(|| self.issuer.introspect(token))
            .flatten();
        let Some(verified) = verified else {
            return Ok(Response::new(pb::IntrospectTokenResponse::default()));
        };
        let claims = verified.claims;
        let at = |secs: u64| prost_types::Timestamp {
            seconds: i64::try_from(secs).unwrap_or(i64::MAX),
            nanos: 0,
        };
        Ok(Response::new(pb::IntrospectTokenResponse {
            active: true,
            subject: claims.sub,
            issuer: claims.iss,
            audience: vec![claims.aud],
            expire_time: Some(at(claims.exp)),
            issue_time: Some(at(claims.iat)),
            token_id: claims.jti,
            roles: claims.roles,
            key_id: verified.key_id,
        }))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let jwks = self.issuer.jwks();
        Ok(Response::new(pb::GetJwksResponse {
            keys: jwks.iter().map(pb::Jwk::from).collect(),
            jwks_json: service_kit::tokens::Jwk::set_json(jwks),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::error::{Limit, Rejection};
    use crate::policy::PolicyRefusal;

    fn limited(limit: Limit) -> AuthError {
        AuthError::RateLimited {
            limit,
            retry_after: Duration::ZERO,
        }
    }

    /// The labels these refusals are counted under are exactly the ones `metrics::register`
    /// shows as 0 at start.
    #[test]
    fn refusal_labels_are_the_ones_shown_at_start() {
        let outcomes: BTreeSet<&str> = [
            Ok(pb::VerifyCodeResponse::default()),
            Err(AuthError::CodeRejected(Rejection::NoCode)),
            Err(AuthError::CodeRejected(Rejection::Wrong)),
            Err(AuthError::CodeRejected(Rejection::Busy)),
            Err(limited(Limit::PhoneDailyFailures)),
            Err(AuthError::invalid("code", "not digits")),
            Err(AuthError::NotAllowed(PolicyRefusal::RegionNotAllowed)),
            Err(AuthError::unavailable(Dependency::Redis, "down")),
            Err(AuthError::internal("bug")),
        ]
        .iter()
        .map(verification_label)
        .collect();
        assert_eq!(outcomes, BTreeSet::from(metrics::VERIFICATION_OUTCOMES));

        let reasons: BTreeSet<String> = [
            AuthError::invalid("client_id", "empty"),
            AuthError::Unauthenticated("wrong secret"),
            AuthError::PermissionDenied("scope"),
            limited(Limit::ServiceTokenIssues),
            limited(Limit::ServiceTokenFailures),
            AuthError::unavailable(Dependency::Redis, "down"),
            AuthError::internal("bug"),
        ]
        .iter()
        .map(service_token_refusal)
        .collect();
        let registered: BTreeSet<String> = metrics::SERVICE_TOKEN_REFUSAL_REASONS
            .iter()
            .map(|reason| (*reason).to_owned())
            .collect();
        assert_eq!(reasons, registered);
    }
}
