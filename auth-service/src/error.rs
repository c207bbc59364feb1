//! The one error type of auth-service and its mapping to gRPC status codes. The mapping is an
//! exhaustive match (no wildcard arm), so a new variant cannot silently become the wrong code.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::policy::PolicyRefusal;

/// The one answer to every code that is not accepted.
pub const CODE_REJECTED: &str =
    "the code is wrong, expired or already used; check it or request a new code";

/// The one answer to IssueServiceToken credentials that are not accepted: an unknown client id
/// and a wrong secret are indistinguishable.
pub const SERVICE_CLIENT_REJECTED: &str = "unknown client id or wrong client secret";

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

/// The `google.rpc.ErrorInfo` domain of auth-service's reasons.
pub const ERROR_DOMAIN: &str = "auth.refsys";

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `OTP_RESEND_COOLDOWN_SECONDS` between two sends to one phone.
    ResendCooldown,
    /// `OTP_MAX_SENDS_PER_PHONE_PER_HOUR`.
    PhoneHourlySends,
    /// `OTP_MAX_SENDS_PER_CLIENT_PER_HOUR`.
    ClientHourlySends,
    /// `SMS_MAX_SENDS_PER_HOUR`: every number together.
    GlobalHourlySends,
    /// `SMS_MAX_SENDS_PER_REGION_PER_HOUR`.
    RegionHourlySends,
    /// `SMS_MAX_SENDS_PER_PREFIX_PER_HOUR`: one block of 10,000 consecutive numbers.
    PrefixHourlySends,
    /// `SMS_FRAUD_GUARD=enforce` suspended sends to this region.
    FraudSuspected,
    /// `OTP_MAX_FAILED_PER_CLIENT_PER_HOUR`: wrong codes from one client, across phones.
    ClientHourlyFailures,
    /// `OTP_MAX_FAILED_PER_PHONE_PER_CLIENT_PER_DAY`: this client may not verify this phone.
    PhoneClientDailyFailures,
    /// `OTP_MAX_FAILED_PER_PHONE_PER_DAY`: verification of this phone is locked for everyone.
    PhoneDailyFailures,
    /// `SERVICE_TOKEN_MAX_ISSUES_PER_CLIENT_PER_MINUTE`: IssueServiceToken attempts for one
    /// client id (every id that is not configured shares one count).
    ServiceTokenIssues,
    /// `SERVICE_TOKEN_MAX_FAILURES_PER_CLIENT_PER_MINUTE`: wrong secrets for one client id; the
    /// id is refused, right secret or not, until the window ends.
    ServiceTokenFailures,
}

impl Limit {
    pub const ALL: [Limit; 12] = [
        Self::ResendCooldown,
        Self::PhoneHourlySends,
        Self::ClientHourlySends,
        Self::GlobalHourlySends,
        Self::RegionHourlySends,
        Self::PrefixHourlySends,
        Self::FraudSuspected,
        Self::ClientHourlyFailures,
        Self::PhoneClientDailyFailures,
        Self::PhoneDailyFailures,
        Self::ServiceTokenIssues,
        Self::ServiceTokenFailures,
    ];

    fn message(self) -> &'static str {
        match self {
            Self::ResendCooldown => "a code was sent to this phone recently; wait before resending",
            Self::PhoneHourlySends => "too many codes sent to this phone; try again later",
            Self::ClientHourlySends => "too many codes requested from this client; try again later",
            Self::GlobalHourlySends | Self::RegionHourlySends | Self::PrefixHourlySends => {
                "sign-in codes are being sent at an unusual rate; try again later"
            }
            Self::FraudSuspected => {
                "sign-in codes to this region are suspended after suspicious traffic; try again later"
            }
            Self::ClientHourlyFailures => "too many wrong codes from this client; try again later",
            Self::PhoneClientDailyFailures | Self::PhoneDailyFailures => {
                "too many failed verifications for this phone; try again later"
            }
            Self::ServiceTokenIssues => {
                "too many service-token requests for this client; try again later"
            }
            Self::ServiceTokenFailures => {
                "too many failed service-token requests for this client; try again later"
            }
        }
    }

    /// The `google.rpc.ErrorInfo` reason: names the limit, so a client (and an operator
    /// reading a support ticket) knows which one refused.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ResendCooldown => "RESEND_COOLDOWN",
            Self::PhoneHourlySends => "PHONE_SEND_LIMIT",
            Self::ClientHourlySends => "CLIENT_SEND_LIMIT",
            Self::GlobalHourlySends => "SMS_GLOBAL_BUDGET",
            Self::RegionHourlySends => "SMS_REGION_BUDGET",
            Self::PrefixHourlySends => "SMS_PREFIX_BUDGET",
            Self::FraudSuspected => "SMS_FRAUD_SUSPECTED",
            Self::ClientHourlyFailures => "CLIENT_FAILURE_LIMIT",
            Self::PhoneClientDailyFailures => "PHONE_CLIENT_FAILURE_LIMIT",
            Self::PhoneDailyFailures => "PHONE_FAILURE_LIMIT",
            Self::ServiceTokenIssues => "SERVICE_TOKEN_RATE_LIMIT",
            Self::ServiceTokenFailures => "SERVICE_TOKEN_FAILURE_LIMIT",
        }
    }

    /// The metric label: the reason in lower case.
    pub fn label(self) -> String {
        self.reason().to_ascii_lowercase()
    }
}

/// Why a code was not accepted. Callers never learn which: every rejection is one answer, so
/// guessing at a phone reveals nothing about whether a code is pending. Operators see the
/// distinction in `refsys_otp_verifications_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No code is pending: never sent, expired, used, or burned by too many wrong tries.
    NoCode,
    /// A code is pending and this is not it (the last allowed try burns it).
    Wrong,
    /// Another verification holds the code right now.
    Busy,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Self::NoCode => "expired",
            Self::Wrong => "wrong",
            Self::Busy => "busy",
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
    /// The code was not accepted (see [`Rejection`]; the caller is not told which).
    #[error("code rejected ({0:?})")]
    CodeRejected(Rejection),
    /// Codes are never sent to this number.
    #[error("number not allowed: {}", .0.reason())]
    NotAllowed(PolicyRefusal),
    /// The refresh token is unknown, expired or revoked.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// The refresh token was already rotated; its family has been revoked.
    #[error("refresh token reused; its family was revoked")]
    RefreshTokenReused,
    /// No valid access token, or a session that cannot go on; the text is shown to the caller.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// A valid token without the right to do this; the text is shown to the caller.
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    /// The caller has no such thing; the text is shown to the caller.
    #[error("not found: {0}")]
    NotFound(&'static str),
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
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.set_error_info(limit.reason(), ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(
                    Code::ResourceExhausted,
                    format!("{} (retry in {}s)", limit.message(), retry_after.as_secs()),
                    details,
                )
            }
            AuthError::CodeRejected(_) => Status::unauthenticated(CODE_REJECTED),
            AuthError::NotAllowed(refusal) => Status::with_error_details(
                Code::FailedPrecondition,
                refusal.message(),
                ErrorDetails::with_error_info(refusal.reason(), ERROR_DOMAIN, HashMap::new()),
            ),
            AuthError::InvalidRefreshToken => {
                Status::unauthenticated("refresh token is unknown, expired or revoked")
            }
            AuthError::RefreshTokenReused => Status::unauthenticated(
                "refresh token was already used; every token of its sign-in has been revoked",
            ),
            AuthError::Unauthenticated(message) => Status::unauthenticated(message),
            AuthError::PermissionDenied(message) => Status::permission_denied(message),
            AuthError::NotFound(message) => Status::not_found(message),
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
    fn limits_carry_retry_info_rounded_up_and_name_the_limit() {
        let status = Status::from(AuthError::RateLimited {
            limit: Limit::ResendCooldown,
            retry_after: Duration::from_millis(41_200),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(42)));
        assert_eq!(retry_after_secs(Duration::ZERO), Duration::from_secs(1));
        let reasons: std::collections::HashSet<_> = Limit::ALL
            .iter()
            .map(|limit| {
                let status = Status::from(AuthError::RateLimited {
                    limit: *limit,
                    retry_after: Duration::from_secs(1),
                });
                let info = status.get_details_error_info().expect("ErrorInfo");
                assert_eq!(info.domain, ERROR_DOMAIN);
                info.reason
            })
            .collect();
        assert_eq!(reasons.len(), Limit::ALL.len(), "reasons must be distinct");
        assert!(reasons.contains("SMS_FRAUD_SUSPECTED"));
        assert!(reasons.contains("SERVICE_TOKEN_RATE_LIMIT"));
        assert!(reasons.contains("SERVICE_TOKEN_FAILURE_LIMIT"));
    }

    #[test]
    fn every_rejected_code_gets_the_same_answer() {
        let answers: Vec<(Code, String)> = [Rejection::NoCode, Rejection::Wrong, Rejection::Busy]
            .into_iter()
            .map(|why| {
                let status = Status::from(AuthError::CodeRejected(why));
                (status.code(), status.message().to_owned())
            })
            .collect();
        assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
        assert_eq!(answers[0].0, Code::Unauthenticated);
    }

    #[test]
    fn policy_refusals_are_failed_precondition_with_a_reason() {
        for (refusal, reason) in [
            (PolicyRefusal::RegionNotAllowed, "REGION_NOT_ALLOWED"),
            (
                PolicyRefusal::NumberTypeNotAllowed,
                "NUMBER_TYPE_NOT_ALLOWED",
            ),
        ] {
            let status = Status::from(AuthError::NotAllowed(refusal));
            assert_eq!(status.code(), Code::FailedPrecondition);
            assert_eq!(status.get_details_error_info().unwrap().reason, reason);
        }
    }

    #[test]
    fn codes_tokens_and_outages_map_to_their_codes() {
        for err in [
            AuthError::CodeRejected(Rejection::Wrong),
            AuthError::InvalidRefreshToken,
            AuthError::RefreshTokenReused,
            AuthError::Unauthenticated("no token"),
        ] {
            assert_eq!(Status::from(err).code(), Code::Unauthenticated);
        }
        assert_eq!(
            Status::from(AuthError::PermissionDenied("admin only")).code(),
            Code::PermissionDenied
        );
        assert_eq!(
            Status::from(AuthError::NotFound("no such session")).code(),
            Code::NotFound
        );
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
