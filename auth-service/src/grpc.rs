//! `refsys.auth.v1.AuthService`: the transport layer over the OTP store, the SMS sender, the
//! user directory and the token issuer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use refsys_proto::auth::v1 as pb;
use refsys_proto::auth::v1::auth_service_server::AuthService;
use refsys_proto::referral::v1::InviteCodeOutcome as DirectoryOutcome;
use tonic::{Request, Response, Status};

use crate::directory::Directory;
use crate::error::{AuthError, Limit};
use crate::metrics;
use crate::otp::{CodeLength, OtpCode, Pepper};
use crate::phone::{PhoneNumber, Region};
use crate::sms::SmsSender;
use crate::store::otp::{SendAdmission, VerifyOutcome};
use crate::store::refresh::{FamilyOwner, RefreshToken, RotateOutcome};
use crate::store::{OtpStore, RefreshStore};
use crate::tokens::{Clock, TokenIssuer};

/// Longest access token IntrospectToken looks at; anything longer is simply not active.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

pub struct AuthHandler {
    pub otp: OtpStore,
    pub refresh: RefreshStore,
    pub sms: Arc<dyn SmsSender>,
    pub pepper: Pepper,
    pub code_length: CodeLength,
    pub phone_region: Option<Region>,
    pub issuer: Arc<TokenIssuer>,
    pub directory: Directory,
    pub trusted_proxy_hops: usize,
    pub clock: Arc<dyn Clock>,
}

fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(at)
}

/// The client address the per-client send cap counts: the TCP peer, or with trusted proxies in
/// front, the `x-forwarded-for` entry that the outermost trusted proxy appended.
pub fn client_address(
    peer: Option<SocketAddr>,
    forwarded_for: Option<&str>,
    trusted_proxy_hops: usize,
) -> Option<String> {
    if trusted_proxy_hops > 0
        && let Some(header) = forwarded_for
    {
        let entries: Vec<&str> = header
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if !entries.is_empty() {
            let index = entries.len().saturating_sub(trusted_proxy_hops);
            return Some(entries[index].to_owned());
        }
    }
    peer.map(|addr| addr.ip().to_string())
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

impl AuthHandler {
    fn phone(&self, input: &str) -> Result<PhoneNumber, AuthError> {
        PhoneNumber::parse(input, self.phone_region)
            .map_err(|err| AuthError::invalid("phone_number", err.to_string()))
    }

    async fn send_code(
        &self,
        phone: PhoneNumber,
        client: Option<String>,
    ) -> Result<pb::SendCodeResponse, AuthError> {
        let code = OtpCode::generate(&mut rand::rng(), self.code_length);
        let hash = self.pepper.hash_code(&phone, &code);
        let reservation = match self
            .otp
            .begin_send(&phone, client.as_deref(), &hash)
            .await?
        {
            SendAdmission::Admitted(reservation) => reservation,
            SendAdmission::Refused { limit, retry_after } => {
                return Err(AuthError::RateLimited { limit, retry_after });
            }
        };
        let now = self.clock.now();
        let (code_ttl, next_send_in) = (reservation.code_ttl, reservation.next_send_in);
        if let Err(err) = self.sms.send(&phone, code.expose()).await {
            metrics::SMS_FAILURES.inc();
            // A provider failure must not count against the caller's limits.
            if let Err(rollback) = self.otp.rollback_send(reservation).await {
                tracing::warn!(error = %rollback, "could not roll back a failed send");
            }
            tracing::warn!(phone = %phone.masked(), error = %err, "SMS provider refused the code");
            return Err(AuthError::unavailable(crate::error::Dependency::Sms, err));
        }
        metrics::CODES_SENT.inc();
        tracing::info!(phone = %phone.masked(), "code sent");
        Ok(pb::SendCodeResponse {
            phone_number: phone.e164().to_owned(),
            code_length: u32::from(self.code_length.get()),
            expire_time: Some(timestamp(now + code_ttl)),
            next_send_time: Some(timestamp(now + next_send_in)),
        })
    }

    async fn verify_code(
        &self,
        phone: PhoneNumber,
        code: &str,
        invite_code: Option<String>,
        caller_timeout: Option<Duration>,
    ) -> Result<pb::VerifyCodeResponse, AuthError> {
        let code = OtpCode::parse(code, self.code_length)
            .map_err(|err| AuthError::invalid("code", err.to_string()))?;
        let hash = self.pepper.hash_code(&phone, &code);
        let claim = match self.otp.verify(&phone, &hash).await? {
            VerifyOutcome::Claimed(claim) => claim,
            VerifyOutcome::Wrong { .. } => return Err(AuthError::WrongCode),
            VerifyOutcome::NoCode | VerifyOutcome::Busy => return Err(AuthError::CodeExpired),
            VerifyOutcome::Burned { retry_after } => {
                return Err(AuthError::RateLimited {
                    limit: Limit::CodeAttempts,
                    retry_after,
                });
            }
            VerifyOutcome::LockedOut { retry_after } => {
                return Err(AuthError::RateLimited {
                    limit: Limit::PhoneDailyFailures,
                    retry_after,
                });
            }
        };

        // Until the code is consumed, any failure gives it back so a retry can use it.
        let signed_in = async {
            let user = self
                .directory
                .ensure_user(&phone, invite_code, caller_timeout)
                .await?;
            let owner = FamilyOwner {
                user_id: user.user_id.clone(),
                roles: user.roles.clone(),
            };
            let refresh = self.refresh.create_family(&owner).await?;
            Ok::<_, AuthError>((user, refresh))
        }
        .await;
        let (user, refresh) = match signed_in {
            Ok(done) => done,
            Err(err) => {
                if let Err(release) = self.otp.release(claim).await {
                    tracing::warn!(error = %release, "could not release a claimed code");
                }
                return Err(err);
            }
        };
        if !self.otp.consume(claim).await? {
            // The claim's lease ran out and another verification took the code: exactly one
            // sign-in per code, so this one loses.
            let _ = self.refresh.revoke(&refresh.token).await;
            return Err(AuthError::CodeExpired);
        }

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

    fn parse_refresh_token(input: &str) -> Result<RefreshToken, AuthError> {
        RefreshToken::parse(input.trim())
            .ok_or_else(|| AuthError::invalid("refresh_token", "not a refresh token"))
    }
}

fn verification_label(result: &Result<pb::VerifyCodeResponse, AuthError>) -> &'static str {
    match result {
        Ok(_) => "success",
        Err(AuthError::WrongCode) => "wrong",
        Err(AuthError::CodeExpired) => "expired",
        Err(AuthError::RateLimited {
            limit: Limit::PhoneDailyFailures,
            ..
        }) => "locked",
        Err(AuthError::RateLimited { .. }) => "burned",
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
        let forwarded = request
            .metadata()
            .get("x-forwarded-for")
            .and_then(|value| value.to_str().ok());
        let client = client_address(request.remote_addr(), forwarded, self.trusted_proxy_hops);
        let phone = self.phone(&request.get_ref().phone_number)?;
        Ok(Response::new(self.send_code(phone, client).await?))
    }

    async fn verify_code(
        &self,
        request: Request<pb::VerifyCodeRequest>,
    ) -> Result<Response<pb::VerifyCodeResponse>, Status> {
        let caller_timeout = service_kit::deadline::requested_timeout(request.metadata());
        let message = request.into_inner();
        let result = match self.phone(&message.phone_number) {
            Ok(phone) => {
                self.verify_code(phone, &message.code, message.invite_code, caller_timeout)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_peer_unless_proxies_are_trusted() {
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        let header = Some("203.0.113.7, 10.0.0.1");
        assert_eq!(
            client_address(Some(peer), header, 0).as_deref(),
            Some("10.0.0.9")
        );
        assert_eq!(
            client_address(Some(peer), header, 1).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            client_address(Some(peer), header, 2).as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            client_address(Some(peer), header, 5).as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            client_address(Some(peer), None, 1).as_deref(),
            Some("10.0.0.9")
        );
    }
}
