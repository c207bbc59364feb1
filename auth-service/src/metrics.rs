//! auth-service's domain counters (the per-RPC ones come from service-kit).

use std::sync::LazyLock;

use service_kit::metrics::{IntCounter, LabelledCounter, counter, counter_vec};

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
pub static SERVICE_TOKEN_REFUSALS: LazyLock<LabelledCounter> = LazyLock::new(|| {
    counter_vec(
        "refsys_service_token_refusals_total",
        "IssueServiceToken calls refused, by configured client id ((unknown) for every other id) \
         and reason: invalid_argument, unauthenticated, permission_denied, \
         service_token_rate_limit, service_token_failure_limit, unavailable, error.",
        &["client", "reason"],
    )
});

/// Registers every counter, so each shows (as 0) before its first event.
pub fn register() {
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
