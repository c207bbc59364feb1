//! The AuthService handlers end to end within one process: the real Redis, a local
//! Twilio-compatible endpoint (wiremock) and a stub `UserDirectory` that can be taken down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use auth_service::error::{CODE_REJECTED, ERROR_DOMAIN};
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::auth::v1::{
    IntrospectTokenRequest, RefreshTokensRequest, RevokeTokenRequest, SendCodeRequest,
    SendCodeResponse, VerifyCodeRequest, VerifyCodeResponse,
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
    /// Refuse every number with INVALID_ARGUMENT, as a referral-service whose validator is
    /// stricter than auth-service's would.
    refuse_number: AtomicBool,
    /// Milliseconds to wait before answering.
    delay_ms: AtomicU64,
    /// Answer this many of the next calls (any RPC) with UNAVAILABLE, then serve again: a
    /// replica going away, a blip of referral's database.
    fail_next: AtomicUsize,
    /// EnsureUser calls.
    calls: AtomicUsize,
    /// LookupUser calls.
    lookups: AtomicUsize,
}

impl StubDirectory {
    /// Whether this call fails as UNAVAILABLE: the directory is down, or a failure is due.
    fn failing(&self) -> bool {
        self.down.load(Ordering::SeqCst)
            || self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    }
}

#[tonic::async_trait]
impl UserDirectory for StubDirectory {
    async fn lookup_user(
        &self,
        request: Request<refsys_proto::referral::v1::LookupUserRequest>,
    ) -> Result<Response<refsys_proto::referral::v1::LookupUserResponse>, Status> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.failing() {
            return Err(Status::unavailable("database down"));
        }
        Ok(Response::new(
            refsys_proto::referral::v1::LookupUserResponse {
                user_id: request.into_inner().user_id,
                roles: vec!["admin".to_owned()],
            },
        ))
    }

    async fn delete_user(
        &self,
        _request: Request<refsys_proto::referral::v1::DeleteUserRequest>,
    ) -> Result<Response<refsys_proto::referral::v1::DeleteUserResponse>, Status> {
        if self.failing() {
            return Err(Status::unavailable("database down"));
        }
        Ok(Response::new(
            refsys_proto::referral::v1::DeleteUserResponse { deleted: true },
        ))
    }

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
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.failing() {
            return Err(Status::unavailable("database down"));
        }
        if self.refuse_number.load(Ordering::SeqCst) {
            return Err(Status::invalid_argument("invalid phone_number"));
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

        let (client, auth_stop) = crate::serve_auth(
            vec![
                ("REDIS_URL", redis_url()),
                ("REDIS_KEY_PREFIX", prefix()),
                ("REFERRAL_GRPC_URL", format!("http://{dir_addr}")),
                ("SMS_PROVIDER", "twilio".to_owned()),
                ("TWILIO_API_BASE", sms.uri()),
                ("TWILIO_ACCOUNT_SID", "AC1".to_owned()),
                ("TWILIO_AUTH_TOKEN", "token".to_owned()),
                ("TWILIO_FROM", "+15005550006".to_owned()),
            ],
            extra,
        )
        .await;
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

    /// How many SMS the provider was asked to send to `phone` (E.164), answered or not.
    async fn sms_to(&self, phone: &str) -> usize {
        let encoded = format!("To={}&", phone.replace('+', "%2B"));
        self.sms
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| format!("{}&", String::from_utf8_lossy(&r.body)).contains(&encoded))
            .count()
    }

    /// Makes the provider hang (10 s, longer than any deadline here) on the next SMS to `phone`;
    /// later ones are answered as usual.
    async fn hang_once(&self, phone: &str) {
        Mock::given(method("POST"))
            .and(body_string_contains(format!(
                "To={}",
                phone.replace('+', "%2B")
            )))
            .respond_with(
                ResponseTemplate::new(201)
                    .set_body_string("{}")
                    .set_delay(Duration::from_secs(10)),
            )
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&self.sms)
            .await;
    }

    /// SendCode as relayed by proxies that wrote `forwarded` (one `x-forwarded-for` header per
    /// element).
    async fn send_from(
        &mut self,
        phone: &str,
        forwarded: &[&str],
    ) -> Result<SendCodeResponse, Status> {
        let request = with_forwarded(
            SendCodeRequest {
                phone_number: phone.to_owned(),
            },
            forwarded,
        );
        self.client
            .send_code(request)
            .await
            .map(Response::into_inner)
    }

    async fn verify_from(
        &mut self,
        phone: &str,
        code: &str,
        forwarded: &[&str],
    ) -> Result<VerifyCodeResponse, Status> {
        let request = with_forwarded(
            VerifyCodeRequest {
                phone_number: phone.to_owned(),
                code: code.to_owned(),
                invite_code: None,
            },
            forwarded,
        );
        self.client
            .verify_code(request)
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

fn with_forwarded<T>(message: T, forwarded: &[&str]) -> Request<T> {
    let mut request = Request::new(message);
    for value in forwarded {
        request
            .metadata_mut()
            .append("x-forwarded-for", value.parse().unwrap());
    }
    request
}

/// A code surely different from `code`.
fn wrong(code: &str) -> String {
    code.chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect()
}

/// Asserts `status` is `code` with an auth.refsys ErrorInfo naming `reason`, and for
/// RESOURCE_EXHAUSTED a RetryInfo; returns the retry delay (zero without one).
#[track_caller]
fn assert_refused(status: &Status, code: Code, reason: &str) -> Duration {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, ERROR_DOMAIN);
    if code == Code::ResourceExhausted {
        status
            .get_details_retry_info()
            .and_then(|retry| retry.retry_delay)
            .unwrap_or_else(|| panic!("no RetryInfo: {status:?}"))
    } else {
        Duration::ZERO
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
    // Each verification during the outage tried the published maximum of 4 attempts.
    assert_eq!(h.directory.calls.load(Ordering::SeqCst), 2 * 4 + 1);
}

#[tokio::test]
async fn a_single_unavailable_from_referral_is_retried_and_the_caller_never_sees_it() {
    let mut h = Harness::start(&[]).await;
    let phone = "+79601233017";
    h.send(phone).await.unwrap();
    let code = h.latest_code(phone).await;
    // EnsureUser: the first attempt fails, the retry signs in.
    h.directory.fail_next.store(1, Ordering::SeqCst);
    let signed_in = h.verify(phone, &code).await.unwrap();
    assert_eq!(h.directory.calls.load(Ordering::SeqCst), 2);
    // LookupUser at a refresh: the same.
    h.directory.fail_next.store(1, Ordering::SeqCst);
    let lookups = h.directory.lookups.load(Ordering::SeqCst);
    h.refresh(&signed_in.refresh_token).await.unwrap();
    assert_eq!(h.directory.lookups.load(Ordering::SeqCst), lookups + 2);
    // Three failures in a row are still within the 4 attempts.
    h.directory.fail_next.store(3, Ordering::SeqCst);
    h.send("+79601233018").await.unwrap();
    let code = h.latest_code("+79601233018").await;
    h.verify("+79601233018", &code).await.unwrap();
    assert_eq!(h.directory.calls.load(Ordering::SeqCst), 2 + 4);
    // Other refusals are answers, not retried (INVALID_ARGUMENT, in its own test, too).
    assert_eq!(h.directory.fail_next.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_persistent_unavailable_from_referral_ends_as_unavailable_within_the_deadline() {
    let mut h = Harness::start(&[]).await;
    let phone = "+79601233017";
    h.send(phone).await.unwrap();
    let code = h.latest_code(phone).await;
    h.directory.down.store(true, Ordering::SeqCst);
    for deadline in [Duration::from_secs(1), Duration::from_millis(300)] {
        let before = h.directory.calls.load(Ordering::SeqCst);
        let mut request = Request::new(VerifyCodeRequest {
            phone_number: phone.to_owned(),
            code: code.clone(),
            invite_code: None,
        });
        request.set_timeout(deadline);
        let started = Instant::now();
        let status = h.client.verify_code(request).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{deadline:?}: {status:?}");
        assert!(took < deadline, "{deadline:?}: answered after {took:?}");
        let attempts = h.directory.calls.load(Ordering::SeqCst) - before;
        if deadline == Duration::from_secs(1) {
            // The backoffs (at most 0.1 + 0.2 + 0.4 s) fit in a second: every attempt ran.
            assert_eq!(attempts, 4, "{deadline:?}");
        } else {
            assert!((1..=4).contains(&attempts), "{deadline:?}: {attempts}");
        }
    }
    // The code was released after each failure: it still signs in once the directory is back.
    h.directory.down.store(false, Ordering::SeqCst);
    h.verify(phone, &code).await.unwrap();
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
    // No grace window: the second refresh below is reuse, whose warning is logged too.
    let mut h = Harness::start(&[("OTP_LENGTH", "8"), ("REFRESH_REUSE_GRACE_SECONDS", "0")]).await;
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

#[tokio::test]
async fn premium_rate_and_fixed_lines_are_refused_before_anything_is_counted_or_sent() {
    // One send per client and hour: had a refusal counted, the last send would be refused.
    let mut h = Harness::start(&[("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "1")]).await;
    for (typed, e164) in [
        ("+44 909 879 0000", "+449098790000"), // GB premium rate
        ("+7 495 123 45 67", "+74951234567"),  // Moscow fixed line
    ] {
        // Twice: a refusal starts no cooldown either.
        for _ in 0..2 {
            let status = h.send(typed).await.unwrap_err();
            let retry =
                assert_refused(&status, Code::FailedPrecondition, "NUMBER_TYPE_NOT_ALLOWED");
            assert_eq!(retry, Duration::ZERO);
            assert!(status.get_details_retry_info().is_none(), "{status:?}");
        }
        assert_eq!(h.sms_to(e164).await, 0, "no SMS to {e164}");
    }
    assert!(h.sms.received_requests().await.unwrap().is_empty());

    // A US number is fixed_line_or_mobile, allowed by default; it gets the client's one send.
    h.send("+1 650 253 0000").await.unwrap();
    assert_eq!(h.sms_to("+16502530000").await, 1);
    let status = h.send("+79601233017").await.unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "CLIENT_SEND_LIMIT");
}

#[tokio::test]
async fn a_region_list_refuses_numbers_of_other_regions() {
    let mut h = Harness::start(&[("SMS_ALLOWED_REGIONS", "KZ")]).await;
    for (typed, e164) in [
        ("+7 960 123 30 17", "+79601233017"), // RU mobile: same country code as KZ
        ("+1 650 253 0000", "+16502530000"),
        ("+44 909 879 0000", "+449098790000"),
    ] {
        let status = h.send(typed).await.unwrap_err();
        assert_refused(&status, Code::FailedPrecondition, "REGION_NOT_ALLOWED");
        assert_eq!(h.sms_to(e164).await, 0, "no SMS to {e164}");
    }
    // Verifying a number of another region is refused the same way (no code could be pending).
    let status = h.verify("+44 7911 123456", "1234").await.unwrap_err();
    assert_refused(&status, Code::FailedPrecondition, "REGION_NOT_ALLOWED");
    // A KZ mobile is sent and signs in.
    let sent = h.send_from("+7 701 123 0001", &[]).await.unwrap();
    assert_eq!(sent.phone_number, "+77011230001");
    assert_eq!(h.sms_to("+77011230001").await, 1);
    let code = h.latest_code("+77011230001").await;
    h.verify("+77011230001", &code).await.unwrap();
}

#[tokio::test]
async fn sms_budgets_refuse_per_block_region_and_globally_and_use_nothing_else() {
    let mut h = Harness::start(&[
        ("SMS_MAX_SENDS_PER_PREFIX_PER_HOUR", "2"),
        ("SMS_MAX_SENDS_PER_REGION_PER_HOUR", "3"),
        ("SMS_MAX_SENDS_PER_HOUR", "4"),
        // Four sends go out and five are refused: had a refusal kept the client's slot, the
        // client would run out before the budgets below are reached.
        ("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "5"),
    ])
    .await;
    // Block +7960123: two sends, the third number of the block is refused.
    h.send("+79601231001").await.unwrap();
    h.send("+79601231002").await.unwrap();
    for _ in 0..2 {
        // The second try gets the same budget, not RESEND_COOLDOWN: the refusal left no
        // cooldown behind.
        let status = h.send("+79601231003").await.unwrap_err();
        let retry = assert_refused(&status, Code::ResourceExhausted, "SMS_PREFIX_BUDGET");
        assert!((3590..=3600).contains(&retry.as_secs()), "{retry:?}");
    }
    assert_eq!(h.sms_to("+79601231003").await, 0);

    // Another RU block: the refused sends did not use the region's budget (3rd of 3) ...
    h.send("+79601241001").await.unwrap();
    let status = h.send("+79601241002").await.unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "SMS_REGION_BUDGET");
    assert_eq!(h.sms_to("+79601241002").await, 0);
    // ... nor the global one (4th of 4), which then refuses every region.
    h.send("+77011230001").await.unwrap();
    for refused in ["+16502530000", "+77011240001"] {
        let status = h.send(refused).await.unwrap_err();
        assert_refused(&status, Code::ResourceExhausted, "SMS_GLOBAL_BUDGET");
        assert_eq!(h.sms_to(refused).await, 0);
    }
    assert_eq!(h.sms.received_requests().await.unwrap().len(), 4);
}

#[tokio::test]
async fn every_failed_verification_gets_one_answer() {
    let mut h = Harness::start(&[("OTP_MAX_ATTEMPTS", "2")]).await;
    let mut answers: Vec<(&str, Status)> = Vec::new();

    // No code was ever sent.
    answers.push((
        "no code",
        h.verify("+79601239999", "1234").await.unwrap_err(),
    ));

    // A wrong code; the second wrong try burns the code, and the right one is refused after.
    let burned = "+79601233017";
    h.send(burned).await.unwrap();
    let code = h.latest_code(burned).await;
    answers.push(("wrong", h.verify(burned, &wrong(&code)).await.unwrap_err()));
    answers.push((
        "burning",
        h.verify(burned, &wrong(&code)).await.unwrap_err(),
    ));
    answers.push(("burned", h.verify(burned, &code).await.unwrap_err()));

    // The right code while another verification holds it, and once it has been used.
    let used = "+79601233018";
    h.send(used).await.unwrap();
    let code = h.latest_code(used).await;
    h.directory.delay_ms.store(1500, Ordering::SeqCst);
    let mut first = h.client.clone();
    let holder = {
        let code = code.clone();
        tokio::spawn(async move {
            first
                .verify_code(VerifyCodeRequest {
                    phone_number: used.to_owned(),
                    code,
                    invite_code: None,
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    answers.push(("busy", h.verify(used, &code).await.unwrap_err()));
    holder
        .await
        .unwrap()
        .expect("the first verification signs in");
    h.directory.delay_ms.store(0, Ordering::SeqCst);
    answers.push(("already used", h.verify(used, &code).await.unwrap_err()));

    for (case, status) in &answers {
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        assert_eq!(status.message(), CODE_REJECTED, "{case}");
        assert!(
            status.details().is_empty(),
            "{case}: details tell cases apart"
        );
    }
}

#[tokio::test]
async fn test_numbers_get_no_sms_no_send_limits_and_a_fixed_code() {
    let test_number = "+79990000001";
    let mut h = Harness::start(&[
        ("TEST_PHONE_NUMBERS", "+79990000001=4321"),
        ("OTP_MAX_SENDS_PER_PHONE_PER_HOUR", "1"),
        ("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "2"),
        // The test number is RU: not an allowed region.
        ("SMS_ALLOWED_REGIONS", "KZ"),
    ])
    .await;
    for _ in 0..3 {
        let sent = h.send_from("+7 999 000-00-01", &[]).await.unwrap();
        assert_eq!(sent.phone_number, test_number);
        let expire = sent.expire_time.unwrap().seconds;
        let next = sent.next_send_time.unwrap().seconds;
        assert!(
            (299..=301).contains(&(expire - next)),
            "no cooldown: {sent:?}"
        );
    }
    assert_eq!(h.sms_to(test_number).await, 0);
    for _ in 0..3 {
        let signed_in = h.verify(test_number, "4321").await.unwrap();
        assert_eq!(signed_in.user_id, user_id_of(test_number));
    }
    let status = h.verify(test_number, "1234").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), CODE_REJECTED);

    // Other numbers are unaffected: the policy still applies, the SMS goes out, the cooldown
    // holds, and the three test sends did not use the client's two.
    let status = h.send("+79601233017").await.unwrap_err();
    assert_refused(&status, Code::FailedPrecondition, "REGION_NOT_ALLOWED");
    let other = "+77011230001";
    h.send(other).await.unwrap();
    assert_eq!(h.sms_to(other).await, 1);
    let status = h.send(other).await.unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "RESEND_COOLDOWN");
    assert_eq!(h.sms_to(other).await, 1);
    let code = h.latest_code(other).await;
    h.verify(other, &code).await.unwrap();
    assert_eq!(h.sms.received_requests().await.unwrap().len(), 1);
}

/// Every send budget at 1: a send that is not rolled back leaves one of them spent.
const ONE_SEND_EACH: [(&str, &str); 5] = [
    ("OTP_MAX_SENDS_PER_PHONE_PER_HOUR", "1"),
    ("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "1"),
    ("SMS_MAX_SENDS_PER_PREFIX_PER_HOUR", "1"),
    ("SMS_MAX_SENDS_PER_REGION_PER_HOUR", "1"),
    ("SMS_MAX_SENDS_PER_HOUR", "1"),
];

/// After a send that hung and was answered UNAVAILABLE: a retry is admitted at once (nothing
/// was spent), its code signs in, and the budgets then count that one send.
async fn assert_rolled_back(h: &mut Harness, phone: &str) {
    h.send(phone).await.expect("the retry is admitted at once");
    assert_eq!(h.sms_to(phone).await, 2);
    let code = h.latest_code(phone).await;
    h.verify(phone, &code).await.unwrap();
    let status = h.send("+77011230001").await.unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "CLIENT_SEND_LIMIT");
}

#[tokio::test]
async fn a_hung_sms_provider_is_unavailable_before_the_callers_deadline_and_rolled_back() {
    let mut h = Harness::start(&ONE_SEND_EACH).await;
    let phone = "+79601230088";
    h.hang_once(phone).await;
    let mut request = Request::new(SendCodeRequest {
        phone_number: phone.to_owned(),
    });
    request.set_timeout(Duration::from_millis(1500));
    let started = Instant::now();
    let status = h.client.send_code(request).await.unwrap_err();
    let took = started.elapsed();
    // Not DEADLINE_EXCEEDED or CANCELLED from the server's timeout: the handler answered
    // first, having waited for the provider up to its margin.
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(took >= Duration::from_millis(1000), "{took:?}");
    assert_eq!(h.sms_to(phone).await, 1, "the provider was called");
    assert_rolled_back(&mut h, phone).await;
}

#[tokio::test]
async fn without_a_caller_deadline_request_timeout_bounds_the_sms_call() {
    let mut env = ONE_SEND_EACH.to_vec();
    env.push(("REQUEST_TIMEOUT_SECONDS", "2"));
    let mut h = Harness::start(&env).await;
    let phone = "+79601230088";
    h.hang_once(phone).await;
    let started = Instant::now();
    let status = h.send(phone).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert_rolled_back(&mut h, phone).await;
}

#[tokio::test]
async fn send_limits_follow_the_forwarded_client() {
    let mut h = Harness::start(&[
        ("TRUSTED_PROXY_HOPS", "1"),
        ("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "2"),
        ("SMS_MAX_SENDS_PER_PREFIX_PER_HOUR", "1000"),
    ])
    .await;
    let mut next = 0;
    let mut phone = move || {
        next += 1;
        format!("+796012{next:05}")
    };
    let mut expect = async |h: &mut Harness, forwarded: &[&str], admitted: bool| {
        let to = phone();
        match h.send_from(&to, forwarded).await {
            Ok(_) if admitted => assert_eq!(h.sms_to(&to).await, 1),
            Err(status) if !admitted => {
                assert_refused(&status, Code::ResourceExhausted, "CLIENT_SEND_LIMIT");
                assert_eq!(h.sms_to(&to).await, 0);
            }
            other => panic!("{forwarded:?} admitted={admitted}: {other:?}"),
        }
    };

    // Two sends from one address, to different phones; the third is refused, another address
    // is not.
    expect(&mut h, &["203.0.113.1"], true).await;
    expect(&mut h, &["203.0.113.1"], true).await;
    expect(&mut h, &["203.0.113.1"], false).await;
    expect(&mut h, &["203.0.113.2"], true).await;
    // Entries left of the trusted one are the caller's to forge: still .1, in one header or in
    // two.
    expect(&mut h, &["203.0.113.2, 203.0.113.1"], false).await;
    expect(&mut h, &["203.0.113.2", "203.0.113.1"], false).await;
    // The trusted entry decides, with or without a port.
    expect(&mut h, &["203.0.113.1, 203.0.113.2:4242"], true).await;
    expect(&mut h, &["203.0.113.2"], false).await;

    // IPv6 counts per /64.
    expect(&mut h, &["2001:db8:1:2::1"], true).await;
    expect(&mut h, &["2001:db8:1:2:ffff:ffff:ffff:ffff"], true).await;
    expect(&mut h, &["[2001:db8:1:2::77]:443"], false).await;
    expect(&mut h, &["2001:db8:1:3::1"], true).await;

    // Junk in the trusted entry counts as the peer (127.0.0.1), like no header at all.
    expect(&mut h, &["not-an-ip"], true).await;
    expect(&mut h, &["203.0.113.1, 203.0.113.999"], true).await;
    expect(&mut h, &[], false).await;
    expect(&mut h, &["unknown"], false).await;
}

#[tokio::test]
async fn two_trusted_hops_read_the_entries_of_every_header_in_order() {
    let mut h = Harness::start(&[
        ("TRUSTED_PROXY_HOPS", "2"),
        ("OTP_MAX_SENDS_PER_CLIENT_PER_HOUR", "1"),
    ])
    .await;
    // The outer proxy wrote the client, the inner one appended the outer proxy as a header of
    // its own: the client is the second entry from the right across both headers.
    h.send_from("+79601233017", &["203.0.113.1", "10.0.0.1"])
        .await
        .unwrap();
    let status = h
        .send_from("+79601233018", &["198.51.100.9, 203.0.113.1", "10.0.0.2"])
        .await
        .unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "CLIENT_SEND_LIMIT");
    // The outer proxy's own address is another client.
    h.send_from("+79601233018", &["203.0.113.1, 10.0.0.1", "10.0.0.2"])
        .await
        .unwrap();
}

#[tokio::test]
async fn wrong_codes_count_per_forwarded_client_across_phones() {
    let mut h = Harness::start(&[
        ("TRUSTED_PROXY_HOPS", "1"),
        ("OTP_MAX_FAILED_PER_CLIENT_PER_HOUR", "3"),
    ])
    .await;
    let owner = ["198.51.100.10"];
    let attacker = ["203.0.113.66"];
    let phone = "+79601233017";
    h.send_from(phone, &owner).await.unwrap();
    let code = h.latest_code(phone).await;

    // Three failures across three phones (one with a code pending, two without) ...
    for target in [phone, "+79601233018", "+79601233019"] {
        let status = h.verify_from(target, &wrong(&code), &attacker).await;
        assert_eq!(status.unwrap_err().code(), Code::Unauthenticated);
    }
    // ... and the client is locked out, whatever it types and wherever it claims to come from.
    for (target, typed, forwarded) in [
        (phone, code.as_str(), &attacker[..]),
        ("+79601233020", "1234", &attacker[..]),
        (phone, code.as_str(), &["198.51.100.10, 203.0.113.66"][..]),
    ] {
        let status = h.verify_from(target, typed, forwarded).await.unwrap_err();
        let retry = assert_refused(&status, Code::ResourceExhausted, "CLIENT_FAILURE_LIMIT");
        assert!((3590..=3600).contains(&retry.as_secs()), "{retry:?}");
    }
    // The owner, from another address, is not locked out and signs in.
    let signed_in = h.verify_from(phone, &code, &owner).await.unwrap();
    assert_eq!(signed_in.user_id, user_id_of(phone));
}

#[tokio::test]
async fn a_directory_refusal_of_the_number_is_invalid_argument_and_keeps_the_code() {
    // One failure would lock this client and this pair: the refusals must not count as one.
    let mut h = Harness::start(&[
        ("OTP_MAX_FAILED_PER_CLIENT_PER_HOUR", "1"),
        ("OTP_MAX_FAILED_PER_PHONE_PER_CLIENT_PER_DAY", "1"),
    ])
    .await;
    let phone = "+79601233017";
    h.send(phone).await.unwrap();
    let code = h.latest_code(phone).await;
    h.directory.refuse_number.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let status = h.verify(phone, &code).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations.len(), 1);
        assert_eq!(bad.field_violations[0].field, "phone_number");
    }
    // The code was released, not used up: it signs in once the directory accepts the number.
    h.directory.refuse_number.store(false, Ordering::SeqCst);
    h.verify(phone, &code).await.unwrap();
    assert_eq!(h.directory.calls.load(Ordering::SeqCst), 3);
    let status = h.verify(phone, &code).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}
