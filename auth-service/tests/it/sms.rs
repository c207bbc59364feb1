use std::time::{Duration, Instant};

use auth_service::sms::{SmsError, SmsSender, TwilioSender, TwilioSettings};
use base64::Engine;
use secrecy::SecretString;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::phone;

const SID: &str = "AC0123456789abcdef";
const MESSAGES: &str = "/2010-04-01/Accounts/AC0123456789abcdef/Messages.json";

fn sender(server: &MockServer, max_attempts: u32) -> TwilioSender {
    let mut settings = TwilioSettings::new(
        server.uri(),
        SID,
        SecretString::from("s3cret-token"),
        "+15005550006",
    );
    settings.max_attempts = max_attempts;
    settings.backoff = Duration::from_millis(10);
    settings.request_timeout = Duration::from_millis(300);
    TwilioSender::new(settings).unwrap()
}

fn ok() -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_string(r#"{"sid":"SM1","status":"queued"}"#)
}

#[tokio::test]
async fn request_has_the_twilio_shape() {
    let server = MockServer::start().await;
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{SID}:s3cret-token"))
    );
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .and(header("authorization", auth.as_str()))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .respond_with(ok())
        .expect(1)
        .mount(&server)
        .await;
    sender(&server, 3)
        .send(&phone("+7 960 123-30-17"), "0042")
        .await
        .unwrap();
    let requests = server.received_requests().await.unwrap();
    let fields: Vec<(String, String)> = form_urlencoded::parse(&requests[0].body)
        .into_owned()
        .collect();
    assert_eq!(
        fields,
        vec![
            ("To".to_owned(), "+79601233017".to_owned()),
            ("From".to_owned(), "+15005550006".to_owned()),
            ("Body".to_owned(), "Your refsys code: 0042".to_owned()),
        ]
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_success() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .with_priority(1)
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ok())
        .expect(1)
        .mount(&server)
        .await;
    sender(&server, 3)
        .send(&phone("+79601233017"), "1234")
        .await
        .unwrap();
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string(r#"{"code":21211}"#))
        .expect(1)
        .mount(&server)
        .await;
    let err = sender(&server, 3)
        .send(&phone("+79601233017"), "1234")
        .await
        .unwrap_err();
    assert!(
        matches!(err, SmsError::Rejected { status: 400, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn gives_up_after_the_last_attempt() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .expect(4)
        .mount(&server)
        .await;
    let err = sender(&server, 4)
        .send(&phone("+79601233017"), "1234")
        .await
        .unwrap_err();
    assert!(
        matches!(err, SmsError::Unreachable { attempts: 4, .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("s3cret"));
}

#[tokio::test]
async fn a_timeout_is_never_retried_because_the_message_may_have_gone_out() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ok().set_delay(Duration::from_secs(5)))
        .expect(1)
        .mount(&server)
        .await;
    let started = Instant::now();
    let err = sender(&server, 3)
        .send(&phone("+79601233017"), "1234")
        .await
        .unwrap_err();
    assert!(matches!(err, SmsError::Unreachable { attempts: 1, .. }));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn unreachable_provider_is_an_error_not_a_hang() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut settings = TwilioSettings::new(
        format!("http://{addr}"),
        SID,
        SecretString::from("t"),
        "+15005550006",
    );
    settings.backoff = Duration::from_millis(10);
    let err = TwilioSender::new(settings)
        .unwrap()
        .send(&phone("+79601233017"), "1234")
        .await
        .unwrap_err();
    assert!(matches!(err, SmsError::Unreachable { attempts: 3, .. }));
}
