//! The one error type of auth-service and its mapping to gRPC status codes. The mapping is an
//! exhaustive match (no wildcard arm), so a new variant cannot silently become the wrong code.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A dependency auth-service needs to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Redis,
    Sms,
    ReferralService,
}

impl Dependency {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Sms => "sms provider",
            Self::ReferralService => "referral-service",
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `OTP_RESEND_COOLDOWN_SECONDS` between two sends to one phone.
    ResendCooldown,
    /// `OTP_MAX_SENDS_PER_PHONE_PER_HOUR`.
    PhoneHourlySends,
    /// `OTP_MAX_SENDS_PER_CLIENT_PER_HOUR`.
    ClientHourlySends,
    /// `OTP_MAX_FAILED_PER_PHONE_PER_DAY`: verification of this phone is locked.
    PhoneDailyFailures,
    /// `OTP_MAX_ATTEMPTS`: this code is burned; a new one must be sent.
    CodeAttempts,
}

impl Limit {
    fn message(self) -> &'static str {
        match self {
            Self::ResendCooldown => "a code was sent to this phone recently; wait before resending",
            Self::PhoneHourlySends => "too many codes sent to this phone; try again later",
            Self::ClientHourlySends => "too many codes requested from this client; try again later",
            Self::PhoneDailyFailures => {
                "too many failed verifications for this phone; try again later"
            }
            Self::CodeAttempts => "too many wrong attempts; request a new code",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A request field is malformed. `description` is shown to the caller.
    #[error("invalid {field}: {description}")]
    InvalidArgument {
        field: &'static str,
        description: String,
    },
    /// A limit refused the request; retrying after `retry_after` may succeed.
    #[error("rate limited ({limit:?}), retry after {retry_after:?}")]
    RateLimited { limit: Limit, retry_after: Duration },
    /// The code is wrong.
    #[error("wrong code")]
    WrongCode,
    /// No code is pending for this phone: never sent, expired, or already used (or being used
    /// by a concurrent verification).
    #[error("code expired or already used")]
    CodeExpired,
    /// The refresh token is unknown, expired or revoked.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// The refresh token was already rotated; its family has been revoked.
    #[error("refresh token reused; its family was revoked")]
    RefreshTokenReused,
    /// A dependency did not answer. `detail` is logged, never sent to the caller.
    #[error("{} unavailable: {detail}", dependency.as_str())]
    Unavailable {
        dependency: Dependency,
        detail: String,
    },
    /// A bug or an impossible state. `detail` is logged, never sent to the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AuthError {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            description: description.into(),
        }
    }

    pub fn unavailable(dependency: Dependency, detail: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            dependency,
            detail: detail.to_string(),
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::Internal(detail.to_string())
    }
}

/// Whole seconds, rounded up, at least one: a client that waits this long is not refused again
/// by the same window.
pub fn retry_after_secs(retry_after: Duration) -> Duration {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::InvalidArgument { field, description } => Status::with_error_details(
                Code::InvalidArgument,
                format!("invalid {field}: {description}"),
                ErrorDetails::with_bad_request_violation(field, description),
            ),
            AuthError::RateLimited { limit, retry_after } => {
                let retry_after = retry_after_secs(retry_after);
                Status::with_error_details(
                    Code::ResourceExhausted,
                    format!("{} (retry in {}s)", limit.message(), retry_after.as_secs()),
                    ErrorDetails::with_retry_info(Some(retry_after)),
                )
            }
            AuthError::WrongCode => Status::unauthenticated("wrong code"),
            AuthError::CodeExpired => {
                Status::unauthenticated("code expired or already used; request a new code")
            }
            AuthError::InvalidRefreshToken => {
                Status::unauthenticated("refresh token is unknown, expired or revoked")
            }
            AuthError::RefreshTokenReused => Status::unauthenticated(
                "refresh token was already used; every token of its sign-in has been revoked",
            ),
            AuthError::Unavailable { dependency, detail } => {
                tracing::warn!(dependency = dependency.as_str(), error = %detail, "dependency unavailable");
                Status::unavailable(format!("{} is unavailable; try again", dependency.as_str()))
            }
            AuthError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_a_field_violation() {
        let status = Status::from(AuthError::invalid("phone_number", "not a number"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations.len(), 1);
        assert_eq!(bad.field_violations[0].field, "phone_number");
        assert_eq!(bad.field_violations[0].description, "not a number");
    }

    #[test]
    fn limits_carry_retry_info_rounded_up() {
        let status = Status::from(AuthError::RateLimited {
            limit: Limit::ResendCooldown,
            retry_after: Duration::from_millis(41_200),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(42)));
        assert_eq!(retry_after_secs(Duration::ZERO), Duration::from_secs(1));
    }

    #[test]
    fn codes_tokens_and_outages_map_to_their_codes() {
        for err in [
            AuthError::WrongCode,
            AuthError::CodeExpired,
            AuthError::InvalidRefreshToken,
            AuthError::RefreshTokenReused,
        ] {
            assert_eq!(Status::from(err).code(), Code::Unauthenticated);
        }
        let status = Status::from(AuthError::unavailable(
            Dependency::Redis,
            "connection refused 10.0.0.7",
        ));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("10.0.0.7"));
        let status = Status::from(AuthError::internal("secret detail"));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
