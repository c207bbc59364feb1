//! The AuthService handlers end to end within one process: the real Redis, a local
//! Twilio-compatible endpoint (wiremock) and a stub `UserDirectory` that can be taken down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use auth_service::config::AuthConfig;
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::auth::v1::{
    IntrospectTokenRequest, RefreshTokensRequest, RevokeTokenRequest, SendCodeRequest,
    VerifyCodeRequest, VerifyCodeResponse,
};
use refsys_proto::referral::v1::user_directory_server::{UserDirectory, UserDirectoryServer};
use refsys_proto::referral::v1::{EnsureUserRequest, EnsureUserResponse, InviteCodeOutcome};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::{prefix, redis_url};

const FAILING_PHONE: &str = "+79601230099";

/// The stub's user id for a phone (not containing the number, which must never be logged).
fn user_id_of(phone: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    phone.hash(&mut hasher);
    format!("user-{:016x}", hasher.finish())
}

#[derive(Default)]
struct StubDirectory {
    down: AtomicBool,
    calls: AtomicUsize,
}

#[tonic::async_trait]
impl UserDirectory for StubDirectory {
    async fn ensure_user(
        &self,
        request: Request<EnsureUserRequest>,
    ) -> Result<Response<EnsureUserResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !bearer.starts_with("Bearer ") {
            return Err(Status::unauthenticated("no service token"));
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("database down"));
        }
        let phone = &request.get_ref().phone_number;
        Ok(Response::new(EnsureUserResponse {
            user_id: user_id_of(phone),
            created: true,
            roles: vec!["admin".to_owned()],
            invite_code_outcome: InviteCodeOutcome::NotProvided.into(),
        }))
    }
}

struct Harness {
    client: AuthServiceClient<Channel>,
    sms: MockServer,
    directory: Arc<StubDirectory>,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

impl Harness {
    async fn start(extra: &[(&str, &str)]) -> Self {
        let sms = MockServer::start().await;
        Mock::given(method("POST"))
            .and(body_string_contains("To=%2B79601230099"))
            .respond_with(ResponseTemplate::new(503))
            .with_priority(1)
            .mount(&sms)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(201).set_body_string("{}"))
            .mount(&sms)
            .await;

        let directory = Arc::new(StubDirectory::default());
        let (dir_listener, dir_addr) = listener().await;
        let (dir_stop, dir_stopped) = tokio::sync::oneshot::channel::<()>();
        let service = UserDirectoryServer::from_arc(directory.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(dir_listener),
                    async {
                        let _ = dir_stopped.await;
                    },
                ),
        );

        let (auth_listener, auth_addr) = listener().await;
        let mut env: HashMap<String, String> = [
            ("REDIS_URL", redis_url()),
            ("REDIS_KEY_PREFIX", prefix()),
            ("REFERRAL_GRPC_URL", format!("http://{dir_addr}")),
            ("SMS_PROVIDER", "twilio".to_owned()),
            ("TWILIO_API_BASE", sms.uri()),
            ("TWILIO_ACCOUNT_SID", "AC1".to_owned()),
            ("TWILIO_AUTH_TOKEN", "token".to_owned()),
            ("TWILIO_FROM", "+15005550006".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let config = AuthConfig::from_source(env).unwrap();
        let (auth_stop, auth_stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            auth_service::serve(&config, auth_listener, async {
                let _ = auth_stopped.await;
            })
            .await
            .unwrap();
        });
        let client = AuthServiceClient::connect(format!("http://{auth_addr}"))
            .await
            .unwrap();
        Self {
            client,
            sms,
            directory,
            _stop: vec![dir_stop, auth_stop],
        }
    }

    async fn latest_code(&self, phone: &str) -> String {
        let encoded = format!("To={}", phone.replace('+', "%2B"));
        let requests = self.sms.received_requests().await.unwrap();
        let body = requests
            .iter()
            .rev()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .find(|body| body.contains(&encoded))
            .expect("an SMS to the phone");
        let text: String = form_urlencoded::parse(body.as_bytes())
            .find(|(k, _)| k == "Body")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        text.chars().filter(char::is_ascii_digit).collect()
    }

    async fn send(&mut self, phone: &str) -> Result<(), Status> {
        self.client
            .send_code(SendCodeRequest {
                phone_number: phone.to_owned(),
            })
            .await
            .map(|_| ())
    }

    async fn verify(&mut self, phone: &str, code: &str) -> Result<VerifyCodeResponse, Status> {
        self.client
            .verify_code(VerifyCodeRequest {
                phone_number: phone.to_owned(),
                code: code.to_owned(),
                invite_code: None,
            })
            .await
            .map(Response::into_inner)
    }

    async fn refresh(&mut self, token: &str) -> Result<String, Status> {
        self.client
            .refresh_tokens(RefreshTokensRequest {
                refresh_token: token.to_owned(),
            })
            .await
            .map(|r| r.into_inner().refresh_token)
    }
}

#[tokio::test]
async fn sign_in_refresh_reuse_and_revoke() {
    let mut h = Harness::start(&[]).await;
    let sent = h
        .client
        .send_code(SendCodeRequest {
            phone_number: "+7 (960) 123-30-17".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.phone_number, "+79601233017");
    assert_eq!(sent.code_length, 4);
    let expire = sent.expire_time.unwrap().seconds;
    let next = sent.next_send_time.unwrap().seconds;
    assert!((239..=241).contains(&(expire - next)), "{expire} {next}");

    let code = h.latest_code("+79601233017").await;
    assert_eq!(code.len(), 4);
    // Another spelling of the same number.
    let signed_in = h.verify("+7 960 1233017", &code).await.unwrap();
    assert_eq!(signed_in.user_id, user_id_of("+79601233017"));
    assert!(signed_in.new_user);
    assert_eq!(signed_in.refresh_token.len(), 43);
    // The code worked once.
    let status = h.verify("+79601233017", &code).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let introspected = h
        .client
        .introspect_token(IntrospectTokenRequest {
            access_token: signed_in.access_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(introspected.active);
    assert_eq!(introspected.subject, user_id_of("+79601233017"));
    assert_eq!(introspected.roles, vec!["admin".to_owned()]);

    let second = h.refresh(&signed_in.refresh_token).await.unwrap();
    let third = h.refresh(&second).await.unwrap();
    // Reusing a rotated token signs the whole family out, the newest token included.
    let status = h.refresh(&signed_in.refresh_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        h.refresh(&third).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Revoke: a fresh sign-in, then its family is gone; revoking again is fine.
    h.send("+79601233018").await.unwrap();
    let code = h.latest_code("+79601233018").await;
    let other = h.verify("+79601233018", &code).await.unwrap();
    for _ in 0..2 {
        h.client
            .revoke_token(RevokeTokenRequest {
                refresh_token: other.refresh_token.clone(),
            })
            .await
            .unwrap();
    }
    assert_eq!(
        h.refresh(&other.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let status = h.refresh("not-a-token").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn malformed_input_is_invalid_argument_with_a_field_violation() {
    let mut h = Harness::start(&[]).await;
    for (phone, field) in [
        ("8 960 123 30 17", "phone_number"),
        ("+7 960 CALL ME", "phone_number"),
    ] {
        let status = h.send(phone).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, field);
    }
    let status = h.verify("+79601233017", "12a4").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "code"
    );
}

#[tokio::test]
async fn national_numbers_work_with_a_default_region() {
    let mut h = Harness::start(&[("PHONE_DEFAULT_REGION", "RU")]).await;
    h.send("8 960 123-30-17").await.unwrap();
    let code = h.latest_code("+79601233017").await;
    h.verify("+79601233017", &code).await.unwrap();
}

#[tokio::test]
async fn limits_answer_resource_exhausted_with_retry_info() {
    let mut h = Harness::start(&[
        ("OTP_MAX_ATTEMPTS", "2"),
        ("OTP_MAX_FAILED_PER_PHONE_PER_CLIENT_PER_DAY", "4"),
    ])
    .await;
    h.send("+79601233017").await.unwrap();
    let status = h.send("+79601233017").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let delay = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!((55..=60).contains(&delay.as_secs()), "{delay:?}");
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "RESEND_COOLDOWN"
    );

    // Two wrong tries burn the code; the right code then gets the same answer as a wrong
    // one, and so does a phone that never had a code.
    let code = h.latest_code("+79601233017").await;
    let wrong = if code == "0000" { "1111" } else { "0000" };
    let mut answers = Vec::new();
    for (phone, typed) in [
        ("+79601233017", wrong),
        ("+79601233017", wrong),
        ("+79601233017", code.as_str()),
        ("+79601239999", "1234"),
    ] {
        let status = h.verify(phone, typed).await.unwrap_err();
        answers.push((status.code(), status.message().to_owned()));
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, Code::Unauthenticated);

    // The fourth failure of this client on this phone locks the pair.
    h.verify("+79601233017", wrong).await.unwrap_err();
    let status = h.verify("+79601233017", &code).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.get_details_retry_info().is_some());
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "PHONE_CLIENT_FAILURE_LIMIT"
    );
}

#[tokio::test]
async fn sms_failure_is_unavailable_and_does_not_count() {
    let mut h = Harness::start(&[("OTP_MAX_SENDS_PER_PHONE_PER_HOUR", "1")]).await;
    for _ in 0..3 {
        let status = h.send(FAILING_PHONE).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
}

#[tokio::test]
async fn referral_outage_leaves_the_code_usable_for_one_retry() {
    let mut h = Harness::start(&[]).await;
    h.send("+79601233017").await.unwrap();
    let code = h.latest_code("+79601233017").await;
    h.directory.down.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let status = h.verify("+79601233017", &code).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    h.directory.down.store(false, Ordering::SeqCst);
    h.verify("+79601233017", &code).await.unwrap();
    assert_eq!(
        h.verify("+79601233017", &code).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(h.directory.calls.load(Ordering::SeqCst), 3);
}

/// Everything any test in this binary logs from now on.
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        logs
    })
    .clone()
}

struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn nothing_secret_is_logged() {
    let logs = captured_logs();
    let mut h = Harness::start(&[("OTP_LENGTH", "8")]).await;
    let phone = "+79601234567";
    h.send(phone).await.unwrap();
    let code = h.latest_code(phone).await;
    let wrong = if code == "00000000" {
        "11111111"
    } else {
        "00000000"
    };
    h.verify(phone, wrong).await.unwrap_err();
    let signed_in = h.verify(phone, &code).await.unwrap();
    let rotated = h.refresh(&signed_in.refresh_token).await.unwrap();
    h.refresh(&signed_in.refresh_token).await.unwrap_err(); // reuse
    h.directory.down.store(true, Ordering::SeqCst);
    h.send(FAILING_PHONE).await.unwrap_err();

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("+7960***4567"), "the masked phone is logged");
    for secret in [
        "79601234567",
        "79601230099",
        code.as_str(),
        signed_in.access_token.as_str(),
        signed_in.refresh_token.as_str(),
        rotated.as_str(),
    ] {
        assert!(!logs.contains(secret), "{secret} was logged:\n{logs}");
    }
}
