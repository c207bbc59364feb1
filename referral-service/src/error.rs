//! The one error type of referral-service and its exhaustive mapping to gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferralError {
    #[error("{field}: {description}")]
    InvalidArgument {
        field: &'static str,
        description: String,
    },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("an invite code was already activated; only one is allowed")]
    AlreadyActivated,
    #[error("you cannot activate your own invite code")]
    OwnCode,
    #[error("only the invite code of someone who joined before you can be activated")]
    InviterJoinedLater,
    #[error("the cursor is older than the event retention; events after it were pruned")]
    CursorExpired,
    #[error("the balance ({balance} points) does not cover the redemption")]
    InsufficientPoints { balance: i64 },
    #[error("the idempotency key was already used for a different request")]
    IdempotencyKeyReused,
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ReferralError {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            description: description.into(),
        }
    }
}

impl ReferralError {
    /// The same error with an INVALID_ARGUMENT's field renamed to where the caller put the value
    /// (e.g. "profile.email" in UpdateProfile); other errors are returned unchanged.
    pub fn in_field(self, field: &'static str) -> Self {
        match self {
            Self::InvalidArgument { description, .. } => {
                Self::InvalidArgument { field, description }
            }
            other => other,
        }
    }
}

/// The `google.rpc.ErrorInfo` domain of referral-service's reasons.
pub const ERROR_DOMAIN: &str = "referral.refsys";

impl From<ReferralError> for Status {
    fn from(error: ReferralError) -> Self {
        match error {
            ReferralError::InvalidArgument { field, description } => Status::with_error_details(
                Code::InvalidArgument,
                format!("{field}: {description}"),
                ErrorDetails::with_bad_request_violation(field, description),
            ),
            ReferralError::NotFound(_) => Status::not_found(error.to_string()),
            ReferralError::AlreadyActivated
            | ReferralError::OwnCode
            | ReferralError::InviterJoinedLater => Status::failed_precondition(error.to_string()),
            ReferralError::CursorExpired => Status::out_of_range(
                "the cursor is older than the event retention (EVENTS_RETENTION_DAYS); events \
                 after it were pruned: start again from an empty cursor and reconcile",
            ),
            ReferralError::InsufficientPoints { balance } => Status::with_error_details(
                Code::FailedPrecondition,
                error.to_string(),
                ErrorDetails::with_error_info(
                    "INSUFFICIENT_POINTS",
                    ERROR_DOMAIN,
                    [("balance".to_owned(), balance.to_string())],
                ),
            ),
            ReferralError::IdempotencyKeyReused => Status::with_error_details(
                Code::AlreadyExists,
                error.to_string(),
                ErrorDetails::with_error_info(
                    "IDEMPOTENCY_KEY_REUSED",
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                ),
            ),
            ReferralError::Unavailable(reason) => {
                tracing::warn!(%reason, "storage unavailable");
                Status::unavailable("storage is unavailable; retry shortly")
            }
            ReferralError::Internal(reason) => {
                tracing::error!(%reason, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Postgres error classes that mean "the database went away", worth a retry.
fn is_connection_loss(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("57P") // operator intervention: admin shutdown, crash shutdown
        || code == "53300" // too many connections
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock detected
}

impl From<sqlx::Error> for ReferralError {
    fn from(error: sqlx::Error) -> Self {
        if matches!(error, sqlx::Error::PoolTimedOut) {
            crate::storage::POOL_TIMEOUTS.inc();
        }
        match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => Self::Unavailable(error.to_string()),
            sqlx::Error::Database(db) if db.code().is_some_and(|c| is_connection_loss(&c)) => {
                Self::Unavailable(error.to_string())
            }
            // Named constraints that back the programme's rules in the schema: reaching one means
            // a rule check was raced or skipped, and the caller gets the rule's own error.
            sqlx::Error::Database(db) => match db.constraint() {
                Some("bonus_ledger_once_per_activation") => Self::AlreadyActivated,
                Some("users_not_self_invited") => Self::OwnCode,
                _ => Self::Internal(error.to_string()),
            },
            _ => Self::Internal(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status_code() {
        let cases = [
            (
                ReferralError::invalid("email", "bad"),
                Code::InvalidArgument,
            ),
            (ReferralError::NotFound("invite code"), Code::NotFound),
            (ReferralError::AlreadyActivated, Code::FailedPrecondition),
            (ReferralError::OwnCode, Code::FailedPrecondition),
            (ReferralError::InviterJoinedLater, Code::FailedPrecondition),
            (ReferralError::Unavailable("x".into()), Code::Unavailable),
            (
                ReferralError::InsufficientPoints { balance: 7 },
                Code::FailedPrecondition,
            ),
            (ReferralError::IdempotencyKeyReused, Code::AlreadyExists),
            (ReferralError::CursorExpired, Code::OutOfRange),
            (
                ReferralError::Internal("secret detail".into()),
                Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret detail"));
        }
    }

    #[test]
    fn invalid_arguments_carry_a_field_violation() {
        let status = Status::from(ReferralError::invalid(
            "email",
            "not a valid e-mail address",
        ));
        let details = status.get_error_details();
        let violation = &details.bad_request().expect("BadRequest").field_violations[0];
        assert_eq!(violation.field, "email");
    }

    #[test]
    fn points_refusals_carry_their_error_info() {
        let status = Status::from(ReferralError::InsufficientPoints { balance: 42 });
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INSUFFICIENT_POINTS", ERROR_DOMAIN)
        );
        assert_eq!(info.metadata.get("balance").map(String::as_str), Some("42"));
        let status = Status::from(ReferralError::IdempotencyKeyReused);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED");
    }

    #[test]
    fn a_pool_timeout_is_unavailable() {
        assert!(matches!(
            ReferralError::from(sqlx::Error::PoolTimedOut),
            ReferralError::Unavailable(_)
        ));
    }
}
