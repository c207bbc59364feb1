//! The calls to referral-service `UserDirectory` — EnsureUser at sign-in, LookupUser at each
//! refresh (live roles), DeleteUser for account deletion — each authenticated with a
//! short-lived service token carrying its own scope, within the caller's remaining deadline,
//! carrying the trace context.
//!
//! Every call follows the retry policy published for refsys' clients in
//! `deploy/grpc-service-config.json` (tonic has no service-config retries, so it is applied
//! here): an UNAVAILABLE answer — a replica draining or gone, a refused connection, referral's
//! database briefly out of reach — is retried with exponential backoff, at most
//! [`RetryPolicy::PUBLISHED`]`.max_attempts` attempts in all, never past the caller's deadline,
//! and not at all while most recent calls failed (gRPC's `retryThrottling`); a call
//! referral-service never processed (its connection closed first, or a draining replica's
//! GOAWAY refused it) is retried at once, as gRPC's
//! transparent retry does. All three RPCs are idempotent: EnsureUser finds the user of a phone
//! before creating one and an invite code is activated once for ever, LookupUser reads,
//! DeleteUser of a deleted user is done.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use refsys_proto::referral::v1::user_directory_client::UserDirectoryClient;
use refsys_proto::referral::v1::{
    DeleteUserRequest, EnsureUserRequest, InviteCodeOutcome, LookupUserRequest,
};
use service_kit::retry::{RetryPolicy, never_processed};
use service_kit::tokens::{
    DELETE_USER_SCOPE, ENSURE_USER_SCOPE, LOOKUP_USER_SCOPE, REFERRAL_SERVICE_AUDIENCE,
};
use tokio::time::Instant;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::error::{AuthError, Dependency};
use crate::phone::PhoneNumber;
use crate::tokens::TokenIssuer;

/// Service tokens live a minute; each is reused for calls of its scope during the first half
/// of its life ([`TokenCache`]), so a call never carries one that expires within 30 s.
const SERVICE_TOKEN_TTL: Duration = Duration::from_secs(60);
/// The longest a directory call may take, retries included, when the caller set no deadline
/// (or a longer one).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// A retry is only sent when at least this much of the deadline is left after its backoff:
/// less would be a call that can only time out.
const MIN_ATTEMPT_TIME: Duration = Duration::from_millis(50);

/// gRPC's `retryThrottling`: every UNAVAILABLE answer takes a token, every success gives back
/// `token_ratio` of one, and retries stop while at most half of `max_tokens` are left. A burst
/// of failures (a replica going away under load) is retried; a referral-service that fails
/// everything is not hammered with four times the calls.
#[derive(Debug)]
pub struct RetryThrottle {
    /// Tokens in thousandths.
    milli_tokens: AtomicU32,
    max_milli_tokens: u32,
    milli_ratio: u32,
}

impl RetryThrottle {
    /// The `retryThrottling` of `deploy/grpc-service-config.json`.
    pub const PUBLISHED_MAX_TOKENS: u32 = 100;
    pub const PUBLISHED_TOKEN_RATIO: f64 = 0.1;

    pub fn new(max_tokens: u32, token_ratio: f64) -> Self {
        let max_milli_tokens = max_tokens.saturating_mul(1000);
        Self {
            milli_tokens: AtomicU32::new(max_milli_tokens),
            max_milli_tokens,
            // At most a whole token per success; gRPC keeps three decimals of the ratio.
            milli_ratio: (token_ratio.clamp(0.0, 1.0) * 1000.0).round() as u32,
        }
    }

    pub fn published() -> Self {
        Self::new(Self::PUBLISHED_MAX_TOKENS, Self::PUBLISHED_TOKEN_RATIO)
    }

    pub fn on_failure(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(1000))
            });
    }

    pub fn on_success(&self) {
        let max = self.max_milli_tokens;
        let ratio = self.milli_ratio;
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(ratio).min(max))
            });
    }

    pub fn allows_retry(&self) -> bool {
        self.milli_tokens.load(Ordering::Relaxed) > self.max_milli_tokens / 2
    }
}

/// The user behind a verified phone number.
#[derive(Debug, Clone)]
pub struct EnsuredUser {
    pub user_id: String,
    pub created: bool,
    pub roles: Vec<String>,
    pub invite_code_outcome: InviteCodeOutcome,
}

/// The `authorization` value of each scope and when to mint a new one. Signing a token per
/// call cost an Ed25519 signature here and a verification in referral-service (whose cache of
/// verified tokens a fresh token always misses) on every sign-in and refresh.
#[derive(Default)]
struct TokenCache {
    by_scope: std::sync::Mutex<Vec<(&'static str, Authorization, Instant)>>,
}

type Authorization = MetadataValue<tonic::metadata::Ascii>;

impl TokenCache {
    fn get_or_mint(
        &self,
        scope: &'static str,
        now: Instant,
        mint: impl FnOnce() -> Result<Authorization, AuthError>,
    ) -> Result<Authorization, AuthError> {
        let mut cached = self
            .by_scope
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, value, renew_at)) = cached.iter().find(|(s, ..)| *s == scope)
            && now < *renew_at
        {
            return Ok(value.clone());
        }
        let value = mint()?;
        cached.retain(|(s, ..)| *s != scope);
        cached.push((scope, value.clone(), now + SERVICE_TOKEN_TTL / 2));
        Ok(value)
    }
}

#[derive(Clone)]
pub struct Directory {
    client: UserDirectoryClient<Channel>,
    issuer: Arc<TokenIssuer>,
    tokens: Arc<TokenCache>,
    policy: RetryPolicy,
    /// One per channel (all clones share it), like gRPC's per-target throttle.
    throttle: Arc<RetryThrottle>,
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
            tokens: Arc::default(),
            policy: RetryPolicy::PUBLISHED,
            throttle: Arc::new(RetryThrottle::published()),
        })
    }

    /// `authorization: Bearer <service token for scope>`; one token serves every attempt of a
    /// call (it outlives any deadline here).
    fn authorization(&self, scope: &'static str) -> Result<Authorization, AuthError> {
        self.tokens.get_or_mint(scope, Instant::now(), || {
            let token =
                self.issuer
                    .service_token(REFERRAL_SERVICE_AUDIENCE, scope, SERVICE_TOKEN_TTL)?;
            format!("Bearer {token}")
                .parse()
                .map_err(|_| AuthError::internal("service token is not valid metadata"))
        })
    }

    /// One attempt's request: the service token, the trace context and `timeout`.
    fn request<T>(
        message: T,
        authorization: &MetadataValue<tonic::metadata::Ascii>,
        timeout: Duration,
    ) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        request
            .metadata_mut()
            .insert("authorization", authorization.clone());
        service_kit::telemetry::inject_context(request.metadata_mut());
        request
    }

    /// Runs `attempt` (given the time left) under the retry policy: UNAVAILABLE is retried
    /// after a backoff while attempts, throttle tokens and the deadline — the caller's, at most
    /// [`DEFAULT_TIMEOUT`], counted from now — allow; anything else is the answer. A call that
    /// runs out of retries answers with its last UNAVAILABLE, before the deadline.
    async fn with_retries<R, F, Fut>(
        &self,
        rpc: &'static str,
        caller_timeout: Option<Duration>,
        mut attempt: F,
    ) -> Result<tonic::Response<R>, tonic::Status>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let deadline =
            Instant::now() + caller_timeout.map_or(DEFAULT_TIMEOUT, |t| t.min(DEFAULT_TIMEOUT));
        let mut attempts = 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match attempt(left).await {
                // Never processed (never sent, or refused unread by a draining replica's GOAWAY):
                // retried at once, as gRPC's transparent retry does.
                Err(status)
                    if never_processed(&status)
                        && attempts < self.policy.max_attempts
                        && Instant::now() + MIN_ATTEMPT_TIME <= deadline =>
                {
                    tracing::debug!(
                        rpc,
                        attempt = attempts,
                        "referral-service never processed the call (connection closed or GOAWAY); retrying"
                    );
                    attempts += 1;
                }
                Err(status) if status.code() == Code::Unavailable => {
                    self.throttle.on_failure();
                    if attempts >= self.policy.max_attempts || !self.throttle.allows_retry() {
                        return Err(status);
                    }
                    let pause = self.policy.backoff(attempts);
                    if Instant::now() + pause + MIN_ATTEMPT_TIME > deadline {
                        return Err(status);
                    }
                    tracing::debug!(
                        rpc,
                        attempt = attempts,
                        pause_ms = pause.as_millis(),
                        error = status.message(),
                        "referral-service answered UNAVAILABLE; retrying"
                    );
                    tokio::time::sleep(pause).await;
                    attempts += 1;
                }
                Ok(response) => {
                    self.throttle.on_success();
                    return Ok(response);
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Finds or creates the user of `phone`, activating `invite_code` if given.
    pub async fn ensure_user(
        &self,
        phone: &PhoneNumber,
        invite_code: Option<String>,
        caller_timeout: Option<Duration>,
    ) -> Result<EnsuredUser, AuthError> {
        let authorization = self.authorization(ENSURE_USER_SCOPE)?;
        let message = EnsureUserRequest {
            phone_number: phone.e164().to_owned(),
            invite_code,
        };
        let response = self
            .with_retries("EnsureUser", caller_timeout, |timeout| {
                let request = Self::request(message.clone(), &authorization, timeout);
                let mut client = self.client.clone();
                async move { client.ensure_user(request).await }
            })
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
        let authorization = self.authorization(LOOKUP_USER_SCOPE)?;
        let message = LookupUserRequest {
            user_id: user_id.to_owned(),
        };
        let answer = self
            .with_retries("LookupUser", caller_timeout, |timeout| {
                let request = Self::request(message.clone(), &authorization, timeout);
                let mut client = self.client.clone();
                async move { client.lookup_user(request).await }
            })
            .await;
        match answer {
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
        let authorization = self.authorization(DELETE_USER_SCOPE)?;
        let message = DeleteUserRequest {
            user_id: user_id.to_owned(),
        };
        let answer = self
            .with_retries("DeleteUser", caller_timeout, |timeout| {
                let request = Self::request(message.clone(), &authorization, timeout);
                let mut client = self.client.clone();
                async move { client.delete_user(request).await }
            })
            .await;
        match answer {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_token_is_reused_for_half_its_life_per_scope() {
        let cache = TokenCache::default();
        let minted = std::cell::Cell::new(0);
        let mint = || {
            minted.set(minted.get() + 1);
            Ok(format!("Bearer t{}", minted.get()).parse().unwrap())
        };
        let t0 = Instant::now();
        let first = cache.get_or_mint(LOOKUP_USER_SCOPE, t0, mint).unwrap();
        let half = SERVICE_TOKEN_TTL / 2;
        let again = cache
            .get_or_mint(
                LOOKUP_USER_SCOPE,
                t0 + half - Duration::from_millis(1),
                mint,
            )
            .unwrap();
        assert_eq!((first.clone(), minted.get()), (again, 1));
        let other = cache.get_or_mint(ENSURE_USER_SCOPE, t0, mint).unwrap();
        assert_ne!(other, first, "each scope has its own token");
        let renewed = cache
            .get_or_mint(LOOKUP_USER_SCOPE, t0 + half, mint)
            .unwrap();
        assert_ne!(renewed, first);
        assert_eq!(minted.get(), 3);
        let failing =
            cache.get_or_mint(DELETE_USER_SCOPE, t0, || Err(AuthError::internal("no key")));
        assert!(
            failing.is_err(),
            "a failure to mint is the caller's answer, not cached"
        );
        assert_eq!(
            cache.get_or_mint(DELETE_USER_SCOPE, t0, mint).unwrap(),
            "Bearer t4"
        );
    }

    /// The client config every refsys caller is told to use.
    const PUBLISHED: &str = include_str!("../../deploy/grpc-service-config.json");

    fn seconds(value: &serde_json::Value) -> Duration {
        let text = value.as_str().expect("a duration string");
        Duration::from_secs_f64(
            text.strip_suffix('s')
                .expect("durations end in s")
                .parse()
                .expect("seconds"),
        )
    }

    /// The methodConfig entry naming `service`/`method`.
    fn method_config<'a>(
        config: &'a serde_json::Value,
        service: &str,
        method: &str,
    ) -> Option<&'a serde_json::Value> {
        config["methodConfig"].as_array()?.iter().find(|entry| {
            entry["name"].as_array().is_some_and(|names| {
                names
                    .iter()
                    .any(|name| name["service"] == service && name["method"] == method)
            })
        })
    }

    #[test]
    fn the_directory_client_applies_the_published_policy() {
        let config: serde_json::Value = serde_json::from_str(PUBLISHED).expect("valid JSON");
        for method in ["EnsureUser", "LookupUser", "DeleteUser"] {
            let entry = method_config(&config, "refsys.referral.v1.UserDirectory", method)
                .unwrap_or_else(|| panic!("{method} has a method config"));
            let retry = &entry["retryPolicy"];
            let published = RetryPolicy {
                max_attempts: u32::try_from(retry["maxAttempts"].as_u64().expect("maxAttempts"))
                    .expect("small"),
                initial_backoff: seconds(&retry["initialBackoff"]),
                max_backoff: seconds(&retry["maxBackoff"]),
                backoff_multiplier: retry["backoffMultiplier"].as_f64().expect("multiplier"),
            };
            assert_eq!(published, RetryPolicy::PUBLISHED, "{method}");
            assert_eq!(
                retry["retryableStatusCodes"],
                serde_json::json!(["UNAVAILABLE"]),
                "{method}"
            );
        }
        let throttling = &config["retryThrottling"];
        assert_eq!(
            throttling["maxTokens"].as_u64(),
            Some(u64::from(RetryThrottle::PUBLISHED_MAX_TOKENS))
        );
        assert_eq!(
            throttling["tokenRatio"].as_f64(),
            Some(RetryThrottle::PUBLISHED_TOKEN_RATIO)
        );
    }

    #[test]
    fn the_published_config_retries_only_what_is_safe_to_retry() {
        let config: serde_json::Value = serde_json::from_str(PUBLISHED).expect("valid JSON");
        // A retried SendCode may text a second code: the provider may have delivered a send
        // that answered UNAVAILABLE.
        assert!(method_config(&config, "refsys.auth.v1.AuthService", "SendCode").is_none());
        for entry in config["methodConfig"].as_array().expect("methodConfig") {
            assert!(entry.get("hedgingPolicy").is_none(), "no hedging: {entry}");
            assert_eq!(
                entry["retryPolicy"]["retryableStatusCodes"],
                serde_json::json!(["UNAVAILABLE"])
            );
        }
        // Every retry of a refresh lands within the reuse grace window (10 s by default).
        let refresh = method_config(&config, "refsys.auth.v1.AuthService", "RefreshTokens")
            .expect("RefreshTokens is retried");
        assert!(seconds(&refresh["timeout"]) < Duration::from_secs(10));
    }

    #[test]
    fn the_throttle_stops_retries_while_most_calls_fail_and_recovers_with_successes() {
        let throttle = RetryThrottle::new(10, 0.5);
        for _ in 0..4 {
            throttle.on_failure();
            assert!(throttle.allows_retry());
        }
        throttle.on_failure();
        assert!(
            !throttle.allows_retry(),
            "5 of 10 tokens left: at the threshold"
        );
        throttle.on_success();
        assert!(throttle.allows_retry(), "5.5 tokens");
        for _ in 0..100 {
            throttle.on_failure();
        }
        assert!(!throttle.allows_retry());
        for _ in 0..100 {
            throttle.on_success();
        }
        assert!(throttle.allows_retry(), "back to the cap");
        throttle.on_failure();
        throttle.on_failure();
        throttle.on_failure();
        throttle.on_failure();
        assert!(throttle.allows_retry(), "the cap is 10 tokens, not more");
        throttle.on_failure();
        assert!(!throttle.allows_retry());
    }
}
