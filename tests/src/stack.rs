//! Both services wired together on free ports, against a fresh database, a private Redis and
//! the captured SMS endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::auth::v1::{SendCodeRequest, VerifyCodeRequest, VerifyCodeResponse};
use refsys_proto::referral::v1::admin_service_client::AdminServiceClient;
use refsys_proto::referral::v1::referral_service_client::ReferralServiceClient;
use tonic::transport::Channel;

use crate::proxy::TcpProxy;
use crate::{PrivateRedis, ServiceProcess, SmsCapture, TestDatabase, free_port};

/// Settings on top of the defaults the stack uses.
#[derive(Default, Clone)]
pub struct StackOptions {
    pub auth_env: Vec<(&'static str, String)>,
    pub referral_env: Vec<(&'static str, String)>,
    /// Route referral-service's Postgres connections through a [`TcpProxy`] the test can cut.
    pub proxy_postgres: bool,
}

impl StackOptions {
    /// Defaults, with these settings for auth-service.
    pub fn auth(env: &[(&'static str, &str)]) -> Self {
        Self {
            auth_env: env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
            ..Self::default()
        }
    }
}

pub struct Stack {
    pub database: TestDatabase,
    pub redis: PrivateRedis,
    pub sms: SmsCapture,
    pub auth: ServiceProcess,
    pub referral: ServiceProcess,
    pub auth_metrics: SocketAddr,
    pub referral_metrics: SocketAddr,
    pub postgres_proxy: Option<TcpProxy>,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> Self {
        let database = TestDatabase::create().await;
        let redis = PrivateRedis::start().await;
        let sms = SmsCapture::start().await;
        let (auth_addr, referral_addr) = (loopback(free_port()), loopback(free_port()));
        let (auth_metrics, referral_metrics) = (loopback(free_port()), loopback(free_port()));

        let common = |metrics: SocketAddr| {
            vec![
                ("LOG_FORMAT".to_owned(), "json".to_owned()),
                ("RUST_LOG".to_owned(), "info".to_owned()),
                ("METRICS_ADDR".to_owned(), metrics.to_string()),
                ("SHUTDOWN_DELAY_SECONDS".to_owned(), "1".to_owned()),
                ("SHUTDOWN_GRACE_SECONDS".to_owned(), "10".to_owned()),
            ]
        };
        let mut auth_env = common(auth_metrics);
        auth_env.extend([
            ("AUTH_GRPC_ADDR".to_owned(), auth_addr.to_string()),
            ("REDIS_URL".to_owned(), redis.url()),
            (
                "REFERRAL_GRPC_URL".to_owned(),
                format!("http://{referral_addr}"),
            ),
        ]);
        auth_env.extend(sms.env());
        auth_env.extend(
            options
                .auth_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );

        let postgres_proxy = if options.proxy_postgres {
            Some(TcpProxy::start("127.0.0.1:5432").await)
        } else {
            None
        };
        let database_url = match &postgres_proxy {
            Some(proxy) => database.url.replace(":5432/", &format!(":{}/", proxy.port)),
            None => database.url.clone(),
        };
        let mut referral_env = common(referral_metrics);
        referral_env.extend([
            ("REFERRAL_GRPC_ADDR".to_owned(), referral_addr.to_string()),
            ("DATABASE_URL".to_owned(), database_url),
            ("AUTH_GRPC_URL".to_owned(), format!("http://{auth_addr}")),
        ]);
        referral_env.extend(
            options
                .referral_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );

        let mut auth = ServiceProcess::spawn("auth-service", auth_addr, auth_env);
        let mut referral = ServiceProcess::spawn("referral-service", referral_addr, referral_env);
        auth.wait_serving(Duration::from_secs(30)).await;
        referral.wait_serving(Duration::from_secs(30)).await;
        Self {
            database,
            redis,
            sms,
            auth,
            referral,
            auth_metrics,
            referral_metrics,
            postgres_proxy,
        }
    }

    pub async fn channel(process: &ServiceProcess) -> Channel {
        tonic::transport::Endpoint::from_shared(process.url())
            .expect("valid url")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap_or_else(|err| panic!("{} unreachable: {err}", process.name))
    }

    pub async fn auth_client(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(Self::channel(&self.auth).await)
    }

    pub async fn referral_client(&self) -> ReferralServiceClient<Channel> {
        ReferralServiceClient::new(Self::channel(&self.referral).await)
    }

    pub async fn admin_client(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(Self::channel(&self.referral).await)
    }

    /// SendCode, read the code from the captured SMS, VerifyCode.
    pub async fn sign_in(&self, phone: &str, invite_code: Option<&str>) -> VerifyCodeResponse {
        let auth = self.auth_client().await;
        sign_in_through(auth.clone(), auth, &self.sms, phone, invite_code).await
    }

    /// The text of both metrics endpoints.
    pub async fn metrics(addr: SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("metrics endpoint answers");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
            .await
            .expect("request is sent");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("response is read");
        response
    }
}

/// A request with `authorization: Bearer <token>`.
/// SendCode through `send`, the code read from `sms`, VerifyCode through `verify` (another
/// replica, say).
pub async fn sign_in_through(
    mut send: AuthServiceClient<Channel>,
    mut verify: AuthServiceClient<Channel>,
    sms: &SmsCapture,
    phone: &str,
    invite_code: Option<&str>,
) -> VerifyCodeResponse {
    let sent = send
        .send_code(SendCodeRequest {
            phone_number: phone.to_owned(),
        })
        .await
        .unwrap_or_else(|status| panic!("SendCode({phone}) failed: {status:?}"))
        .into_inner();
    let code = sms
        .latest_code(&sent.phone_number)
        .await
        .expect("the code reached the SMS endpoint");
    verify
        .verify_code(VerifyCodeRequest {
            phone_number: phone.to_owned(),
            code,
            invite_code: invite_code.map(str::to_owned),
        })
        .await
        .unwrap_or_else(|status| panic!("VerifyCode({phone}) failed: {status:?}"))
        .into_inner()
}

pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("token is ASCII"),
    );
    request
}
