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
use crate::error::{AuthError, Dependency};
use crate::metrics;
use crate::otp::{CodeLength, OtpCode, Pepper};
use crate::phone::{PhoneNumber, Region};
use crate::policy::{SmsPolicy, TestNumbers};
use crate::sms::SmsSender;
use crate::store::fraud::RegionStanding;
use crate::store::otp::{SendAdmission, VerifyOutcome};
use crate::store::refresh::{FamilyOwner, IssuedRefreshToken, RefreshToken, RotateOutcome};
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
    fn phone(&self, input: &str) -> Result<PhoneNumber, AuthError> {
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
            self.sms_policy.check(&phone).map_err(|refusal| {
                metrics::POLICY_REFUSALS
                    .with_label_values(&[refusal.reason()])
                    .inc();
                AuthError::NotAllowed(refusal)
            })?;
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
        let signed_in = self.sign_in(&phone, invite_code, caller_timeout).await;
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

        let access = self.issuer.access_token(&user.user_id, &user.roles)?;
        let now = self.clock.now();
        let outcome = outcome_of(user.invite_code_outcome);
        tracing::info!(phone = %phone.masked(), user_id = %user.user_id, new_user = user.created, "signed in");
        Ok(pb::VerifyCodeResponse {
            user_id: user.user_id,
            new_user: user.created,
            access_token: access.token,
            access_token_expire_time: Some(timestamp(access.expires_at)),
            refresh_token: refresh.token.expose().to_owned(),
            refresh_token_expire_time: Some(timestamp(now + refresh.ttl)),
            invite_code_applied: outcome == pb::InviteCodeOutcome::Applied,
            invite_code_outcome: outcome.into(),
        })
    }

    /// The user behind the phone (created on first sign-in) and a new refresh-token family.
    async fn sign_in(
        &self,
        phone: &PhoneNumber,
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
        let refresh = self.refresh.create_family(&owner).await?;
        Ok((user, refresh))
    }

    fn parse_refresh_token(input: &str) -> Result<RefreshToken, AuthError> {
        RefreshToken::parse(input.trim())
            .ok_or_else(|| AuthError::invalid("refresh_token", "not a refresh token"))
    }
}

fn verification_label(result: &Result<pb::VerifyCodeResponse, AuthError>) -> &'static str {
    match result {
        Ok(_) => "success",
        Err(AuthError::CodeRejected(why)) => why.label(),
        Err(AuthError::RateLimited { .. }) => "locked",
        Err(AuthError::InvalidArgument { .. }) => "invalid",
        Err(AuthError::Unavailable { .. }) => "unavailable",
        Err(_) => "error",
    }
}

#[tonic::async_trait]
impl AuthService for AuthHandler {
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
        let presented = Self::parse_refresh_token(&request.get_ref().refresh_token)?;
        let (owner, token) = match self
            .refresh
            .rotate(&presented)
            .await
            .map_err(AuthError::from)?
        {
            RotateOutcome::Rotated { owner, token } => (owner, token),
            RotateOutcome::Reused => {
                metrics::REFRESH_REUSE.inc();
                tracing::warn!(
                    "an already-rotated refresh token was presented; its family is revoked"
                );
                return Err(AuthError::RefreshTokenReused.into());
            }
            RotateOutcome::Invalid => return Err(AuthError::InvalidRefreshToken.into()),
        };
        metrics::REFRESH_ROTATED.inc();
        let access = self.issuer.access_token(&owner.user_id, &owner.roles)?;
        Ok(Response::new(pb::RefreshTokensResponse {
            access_token: access.token,
            access_token_expire_time: Some(timestamp(access.expires_at)),
            refresh_token: token.token.expose().to_owned(),
            refresh_token_expire_time: Some(timestamp(self.clock.now() + token.ttl)),
        }))
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
