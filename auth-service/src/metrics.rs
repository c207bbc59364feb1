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
        "VerifyCode outcomes: success, wrong, expired, burned, locked, unavailable.",
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

/// Registers every counter, so each shows (as 0) before its first event.
pub fn register() {
    LazyLock::force(&CODES_SENT);
    LazyLock::force(&SMS_FAILURES);
    LazyLock::force(&VERIFICATIONS);
    LazyLock::force(&REFRESH_ROTATED);
    LazyLock::force(&REFRESH_REUSE);
}
