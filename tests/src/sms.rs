//! A local Twilio-compatible endpoint: accepts `POST /2010-04-01/Accounts/{sid}/Messages.json`
//! like Twilio does and keeps the messages, so tests read the codes the real SMS path sent.

use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

pub const ACCOUNT_SID: &str = "ACe2e00000000000000000000000000000";
pub const AUTH_TOKEN: &str = "e2e-twilio-token";
pub const FROM: &str = "+15005550006";

pub struct SmsCapture {
    server: MockServer,
}

impl SmsCapture {
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path_regex(r"^/2010-04-01/Accounts/[^/]+/Messages\.json$"))
            .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({
                "sid": "SM00000000000000000000000000000000",
                "status": "queued",
            })))
            .mount(&server)
            .await;
        Self { server }
    }

    pub fn base_url(&self) -> String {
        self.server.uri()
    }

    /// The env settings that point auth-service at this endpoint.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("SMS_PROVIDER", "twilio".to_owned()),
            ("TWILIO_API_BASE", self.base_url()),
            ("TWILIO_ACCOUNT_SID", ACCOUNT_SID.to_owned()),
            ("TWILIO_AUTH_TOKEN", AUTH_TOKEN.to_owned()),
            ("TWILIO_FROM", FROM.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Every (To, Body) sent so far, oldest first.
    pub async fn messages(&self) -> Vec<(String, String)> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|request| {
                let get = |key: &str| {
                    form_urlencoded::parse(&request.body)
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                (get("To"), get("Body"))
            })
            .collect()
    }

    /// The digits of the latest message to `phone` (E.164).
    pub async fn latest_code(&self, phone: &str) -> Option<String> {
        self.messages()
            .await
            .into_iter()
            .rev()
            .find(|(to, _)| to == phone)
            .map(|(_, body)| body.chars().filter(char::is_ascii_digit).collect())
    }
}
