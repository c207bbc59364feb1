//! auth-service's domain counters (the per-RPC ones come from service-kit).

use std::sync::LazyLock;

use service_kit::metrics::{
    IntCounter, IntGaugeVec, LabelledCounter, counter, counter_vec, gauge_vec,
};

use crate::error::Limit;
use crate::policy::PolicyRefusal;
use crate::service_clients::UNKNOWN_CLIENT_LABEL;
use crate::store::fraud::FraudMode;

pub static CODES_SENT: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "refsys_otp_codes_sent_total",
        "Sign-in codes handed to the SMS provider.",
    )
});
pub static SMS_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "refsys_sms_failures_total",
        "Sign-in codes the SMS provider did not take.",
    )
});
/// The `outcome` labels of [`VERIFICATIONS`] (`grpc::verification_label` picks one).
pub const VERIFICATION_OUTCOMES: [&str; 8] = [
    "success",
    "wrong",
    "expired",
    "busy",
    "locked",
    "invalid",
    "unavailable",
    "error",
];
pub static VERIFICATIONS: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_otp_verifications_total",
        "VerifyCode outcomes: success, wrong, expired (no code pending), busy, locked, invalid, unavailable, error.",
        &["outcome"],
    )
});
pub static REFRESH_ROTATED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "refsys_refresh_tokens_rotated_total",
        "Refresh tokens rotated.",
    )
});
pub static REFRESH_REUSE: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "refsys_refresh_token_reuse_total",
        "Already-rotated refresh tokens presented (their families were revoked).",
    )
});

pub static LIMIT_REFUSALS: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_otp_limit_refusals_total",
        "Requests refused by a limit, by the limit's ErrorInfo reason in lower case.",
        &["limit"],
    )
});
pub static POLICY_REFUSALS: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_sms_policy_refusals_total",
        "SendCode refused because of the number's region or type (no SMS, nothing counted).",
        &["reason"],
    )
});
pub static REGION_SENDS: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_sms_region_sends_total",
        "Codes delivered to the SMS provider, by the number's region (ISO 3166, 001 = none).",
        &["region"],
    )
});
pub static REGION_VERIFICATIONS: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_sms_region_verifications_total",
        "Codes verified, by the number's region: conversion = this rate / the sends' rate.",
        &["region"],
    )
});
pub static FRAUD_SUSPECTED: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_sms_fraud_suspected_total",
        "Times the conversion guard tripped for a region (once per block period), by mode.",
        &["region", "mode"],
    )
});
pub static TEST_NUMBER_USES: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_test_number_uses_total",
        "SendCode and VerifyCode calls for TEST_PHONE_NUMBERS (no SMS, no send limits).",
        &["rpc"],
    )
});

pub static REFRESH_REPLAYED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "refsys_refresh_tokens_replayed_total",
        "Retried refreshes within REFRESH_REUSE_GRACE_SECONDS answered with the same pair.",
    )
});
pub static SESSIONS_REVOKED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "refsys_sessions_revoked_total",
        "Sessions ended through RevokeSession or RevokeAllSessions.",
    )
});
pub static ACCOUNTS_DELETED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "refsys_accounts_deleted_total",
        "Accounts deleted through DeleteAccount.",
    )
});

pub static SERVICE_TOKENS_ISSUED: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_service_tokens_issued_total",
        "Service tokens issued through IssueServiceToken, by configured client id.",
        &["client"],
    )
});
/// The `reason` labels of [`SERVICE_TOKEN_REFUSALS`] (`grpc::service_token_refusal` picks one).
pub const SERVICE_TOKEN_REFUSAL_REASONS: [&str; 7] = [
    "invalid_argument",
    "unauthenticated",
    "permission_denied",
    "service_token_rate_limit",
    "service_token_failure_limit",
    "unavailable",
    "error",
];
pub static SERVICE_TOKEN_REFUSALS: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_service_token_refusals_total",
        "IssueServiceToken calls refused, by configured client id ((unknown) for every other id) \
         and reason: invalid_argument, unauthenticated, permission_denied, \
         service_token_rate_limit, service_token_failure_limit, unavailable, error.",
        &["client", "reason"],
    )
});

pub static FRAUD_GUARD_MODE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "refsys_sms_fraud_guard_mode",
        "SMS_FRAUD_GUARD of this process: 1 for its mode (off, monitor, enforce), 0 for the others.",
        &["mode"],
    )
});

/// Kinds of [`REDIS_ERRORS`]: a [`crate::store::StoreError`] variant in lower case.
pub const REDIS_ERROR_KINDS: [&str; 2] = ["unavailable", "corrupt"];
pub static REDIS_ERRORS: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_redis_errors_total",
        "Redis calls that failed, by kind: unavailable (refused, dropped or not answered in \
         time; the caller hears UNAVAILABLE) or corrupt (a reply only a bug explains: INTERNAL).",
        &["kind"],
    )
});

/// Registers every metric and shows each label value known at start as 0 before its first
/// event: a series that appears with its first event starts at 1, which `rate()` and
/// `increase()` cannot see, and leaves dashboards and alerts on it with no data until then.
/// Regions are not known in advance: the per-region counters appear with each region's first
/// send. `service_clients` are the configured client ids.
pub fn register(fraud_mode: FraudMode, service_clients: &[&str]) {
    for limit in Limit::ALL {
        LIMIT_REFUSALS.with_label_values(&[&limit.label()]);
    }
    for refusal in PolicyRefusal::ALL {
        POLICY_REFUSALS.with_label_values(&[refusal.reason()]);
    }
    for outcome in VERIFICATION_OUTCOMES {
        VERIFICATIONS.with_label_values(&[outcome]);
    }
    for client in service_clients {
        SERVICE_TOKENS_ISSUED.with_label_values(&[client]);
    }
    for client in service_clients.iter().chain([&UNKNOWN_CLIENT_LABEL]) {
        for reason in SERVICE_TOKEN_REFUSAL_REASONS {
            SERVICE_TOKEN_REFUSALS.with_label_values(&[client, reason]);
        }
    }
    for mode in [FraudMode::Off, FraudMode::Monitor, FraudMode::Enforce] {
        FRAUD_GUARD_MODE
            .with_label_values(&[mode.as_str()])
            .set(i64::from(mode == fraud_mode));
    }
    for kind in REDIS_ERROR_KINDS {
        REDIS_ERRORS.with_label_values(&[kind]);
    }
    LazyLock::force(&CODES_SENT);
    LazyLock::force(&SMS_FAILURES);
    LazyLock::force(&VERIFICATIONS);
    LazyLock::force(&REFRESH_ROTATED);
    LazyLock::force(&REFRESH_REUSE);
    LazyLock::force(&LIMIT_REFUSALS);
    LazyLock::force(&POLICY_REFUSALS);
    LazyLock::force(&REGION_SENDS);
    LazyLock::force(&REGION_VERIFICATIONS);
    LazyLock::force(&FRAUD_SUSPECTED);
    LazyLock::force(&TEST_NUMBER_USES);
    LazyLock::force(&REFRESH_REPLAYED);
    LazyLock::force(&SESSIONS_REVOKED);
    LazyLock::force(&ACCOUNTS_DELETED);
    LazyLock::force(&SERVICE_TOKENS_ISSUED);
    LazyLock::force(&SERVICE_TOKEN_REFUSALS);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `series` (name and labels exactly as rendered).
    fn value(rendered: &str, series: &str) -> Option<String> {
        rendered
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn every_known_label_value_shows_before_its_first_event() {
        register(FraudMode::Enforce, &["shop"]);
        let rendered = service_kit::metrics::render();
        let shows = |series: String| {
            assert!(
                value(&rendered, &series).is_some(),
                "{series} missing in\n{rendered}"
            );
        };
        for limit in Limit::ALL {
            shows(format!(
                "refsys_otp_limit_refusals_total{{limit=\"{}\"}}",
                limit.label()
            ));
        }
        shows(r#"refsys_sms_policy_refusals_total{reason="REGION_NOT_ALLOWED"}"#.into());
        shows(r#"refsys_sms_policy_refusals_total{reason="NUMBER_TYPE_NOT_ALLOWED"}"#.into());
        for outcome in VERIFICATION_OUTCOMES {
            shows(format!(
                "refsys_otp_verifications_total{{outcome=\"{outcome}\"}}"
            ));
        }
        shows(r#"refsys_service_tokens_issued_total{client="shop"}"#.into());
        for client in ["shop", UNKNOWN_CLIENT_LABEL] {
            for reason in SERVICE_TOKEN_REFUSAL_REASONS {
                shows(format!(
                    "refsys_service_token_refusals_total{{client=\"{client}\",reason=\"{reason}\"}}"
                ));
            }
        }
        for kind in REDIS_ERROR_KINDS {
            shows(format!("refsys_redis_errors_total{{kind=\"{kind}\"}}"));
        }
        let mode = |mode: &str| {
            value(
                &rendered,
                &format!("refsys_sms_fraud_guard_mode{{mode=\"{mode}\"}}"),
            )
        };
        assert_eq!(mode("enforce").as_deref(), Some("1"));
        assert_eq!(mode("monitor").as_deref(), Some("0"));
        assert_eq!(mode("off").as_deref(), Some("0"));
    }
}
