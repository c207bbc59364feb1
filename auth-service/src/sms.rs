//! Delivering codes by SMS: the [`SmsSender`] trait and its two providers, [`LogSender`] (dev:
//! writes the code to the log) and [`TwilioSender`] (the Twilio Messages API).

use std::time::Duration;

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};

use crate::error::{AuthError, Dependency};
use crate::phone::PhoneNumber;

/// The log target of [`LogSender`], the only place a code is ever logged.
pub const DEV_LOG_TARGET: &str = "refsys::sms::dev";

/// The default `SMS_TEMPLATE`; `{code}` is replaced by the code.
pub const DEFAULT_TEMPLATE: &str = "Your refsys code: {code}";

/// Why an SMS was not sent. Either way the caller sees UNAVAILABLE and the send does not count.
#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    /// The provider could not be reached, timed out or kept failing (5xx) after the retries.
    #[error("sms provider unreachable after {attempts} attempt(s): {detail}")]
    Unreachable { attempts: u32, detail: String },
    /// The provider refused the message (4xx): bad credentials, sender or recipient.
    #[error("sms provider refused the message: HTTP {status}: {detail}")]
    Rejected { status: u16, detail: String },
}

impl From<SmsError> for AuthError {
    fn from(err: SmsError) -> Self {
        AuthError::unavailable(Dependency::Sms, err)
    }
}

/// Sends a code to a phone.
pub trait SmsSender: Send + Sync {
    fn send<'a>(
        &'a self,
        to: &'a PhoneNumber,
        code: &'a str,
    ) -> BoxFuture<'a, Result<(), SmsError>>;
}

/// Renders `template`, replacing every `{code}` with `code`.
pub fn render(template: &str, code: &str) -> String {
    template.replace("{code}", code)
}

/// Masks the recipient wherever a provider's error text repeats it (Twilio's do), so the
/// number never reaches the logs in full.
fn redact(detail: &str, to: &PhoneNumber) -> String {
    let e164 = to.e164();
    detail
        .replace(e164, &to.masked())
        .replace(&e164[1..], &to.masked())
}

/// Dev provider: delivers nothing, logs the code and the masked phone at [`DEV_LOG_TARGET`].
#[derive(Debug, Clone, Default)]
pub struct LogSender;

impl SmsSender for LogSender {
    fn send<'a>(
        &'a self,
        to: &'a PhoneNumber,
        code: &'a str,
    ) -> BoxFuture<'a, Result<(), SmsError>> {
        Box::pin(async move {
            tracing::info!(
                target: DEV_LOG_TARGET,
                phone = %to.masked(),
                code,
                "sign-in code (SMS_PROVIDER=log: not delivered, logged for development only)"
            );
            Ok(())
        })
    }
}

/// Settings of [`TwilioSender`].
#[derive(Debug, Clone)]
pub struct TwilioSettings {
    /// `TWILIO_API_BASE` (`https://api.twilio.com`).
    pub api_base: String,
    /// `TWILIO_ACCOUNT_SID`.
    pub account_sid: String,
    /// `TWILIO_AUTH_TOKEN`.
    pub auth_token: SecretString,
    /// `TWILIO_FROM`: the sender number or messaging service.
    pub from: String,
    /// `SMS_TEMPLATE`.
    pub template: String,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// Attempts in total (at least 1).
    pub max_attempts: u32,
    /// Delay before the first retry; doubles with each further retry.
    pub backoff: Duration,
}

impl TwilioSettings {
    /// Settings with the default template, a 5 s request timeout and 3 attempts 200 ms / 400 ms
    /// apart.
    pub fn new(
        api_base: impl Into<String>,
        account_sid: impl Into<String>,
        auth_token: SecretString,
        from: impl Into<String>,
    ) -> Self {
        Self {
            api_base: api_base.into(),
            account_sid: account_sid.into(),
            auth_token,
            from: from.into(),
            template: DEFAULT_TEMPLATE.to_owned(),
            request_timeout: Duration::from_secs(5),
            max_attempts: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

/// The Twilio Messages API: `POST {base}/2010-04-01/Accounts/{sid}/Messages.json` with form
/// fields `To`, `From`, `Body` and HTTP basic auth `sid:token`. Retries connect errors and 5xx
/// with exponential backoff; never retries a 4xx, and never a request that went out without an
/// answer (a timeout), which may have delivered the message: a retry would text it twice.
pub struct TwilioSender {
    http: reqwest::Client,
    url: String,
    settings: TwilioSettings,
}

enum Attempt {
    Sent,
    /// The message certainly was not created: a connect error or a 5xx.
    Retryable(String),
    /// The request went out and no answer came back (a timeout, a dropped connection): the
    /// message may have been delivered, so it is never sent again.
    Uncertain(String),
    Rejected(u16, String),
}

impl TwilioSender {
    pub fn new(settings: TwilioSettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.request_timeout)
            .build()?;
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            settings.api_base.trim_end_matches('/'),
            settings.account_sid
        );
        Ok(Self {
            http,
            url,
            settings,
        })
    }

    async fn attempt(&self, to: &PhoneNumber, body: &str) -> Attempt {
        let s = &self.settings;
        let response = self
            .http
            .post(&self.url)
            .basic_auth(&s.account_sid, Some(s.auth_token.expose_secret()))
            .timeout(s.request_timeout)
            .form(&[("To", to.e164()), ("From", s.from.as_str()), ("Body", body)])
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => Attempt::Sent,
            Ok(response) => {
                let status = response.status();
                // Twilio's error bodies name the problem; they never echo the auth token.
                let detail: String = response
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect();
                if status.is_server_error() {
                    Attempt::Retryable(format!("HTTP {}: {detail}", status.as_u16()))
                } else {
                    Attempt::Rejected(status.as_u16(), detail)
                }
            }
            // The error text holds the URL, which holds the account SID but no secret.
            Err(err) if err.is_connect() => Attempt::Retryable(err.without_url().to_string()),
            Err(err) => Attempt::Uncertain(err.without_url().to_string()),
        }
    }
}

impl SmsSender for TwilioSender {
    fn send<'a>(
        &'a self,
        to: &'a PhoneNumber,
        code: &'a str,
    ) -> BoxFuture<'a, Result<(), SmsError>> {
        Box::pin(async move {
            let body = render(&self.settings.template, code);
            let attempts = self.settings.max_attempts.max(1);
            let mut delay = self.settings.backoff;
            let mut last = String::new();
            for attempt in 1..=attempts {
                match self.attempt(to, &body).await {
                    Attempt::Sent => return Ok(()),
                    Attempt::Rejected(status, detail) => {
                        let detail = redact(&detail, to);
                        tracing::warn!(phone = %to, status, "twilio refused the message");
                        return Err(SmsError::Rejected { status, detail });
                    }
                    Attempt::Retryable(detail) => {
                        let detail = redact(&detail, to);
                        tracing::warn!(phone = %to, attempt, error = %detail, "twilio send failed");
                        last = detail;
                    }
                    Attempt::Uncertain(detail) => {
                        let detail = redact(&detail, to);
                        tracing::warn!(phone = %to, attempt, error = %detail, "twilio did not answer; not retried, it may have delivered");
                        return Err(SmsError::Unreachable {
                            attempts: attempt,
                            detail,
                        });
                    }
                }
                if attempt < attempts {
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                }
            }
            Err(SmsError::Unreachable {
                attempts,
                detail: last,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_puts_the_code_in() {
        assert_eq!(render(DEFAULT_TEMPLATE, "0042"), "Your refsys code: 0042");
        assert_eq!(
            render("{code} is your code ({code})", "12"),
            "12 is your code (12)"
        );
    }

    #[test]
    fn provider_failures_are_unavailable() {
        let status = tonic::Status::from(AuthError::from(SmsError::Rejected {
            status: 401,
            detail: "auth".into(),
        }));
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn provider_errors_do_not_carry_the_full_number() {
        let to = PhoneNumber::parse("+79601233017", None).unwrap();
        let detail = r#"{"message": "The 'To' number +79601233017 is not valid (79601233017)"}"#;
        let redacted = redact(detail, &to);
        assert!(!redacted.contains("79601233017"), "{redacted}");
        assert!(redacted.contains("+7960***3017"));
    }

    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn log_sender_logs_the_code_and_only_the_masked_phone_at_its_target() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let phone = PhoneNumber::parse("+79601233017", None).unwrap();
        LogSender.send(&phone, "5821").await.unwrap();
        let logged = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(logged.contains(DEV_LOG_TARGET), "{logged}");
        assert!(logged.contains("5821"), "{logged}");
        assert!(logged.contains("+7960***3017"), "{logged}");
        assert!(!logged.contains("79601233017"), "{logged}");
    }
}
