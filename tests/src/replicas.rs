//! A scaled-out deployment on one machine: several replicas of each service sharing one Redis
//! and one Postgres database, as Kubernetes runs them. Every auth replica has the same JWT
//! signing key and OTP pepper (from files, like the Secrets), so codes and tokens from one
//! replica are good on every other; auth replica `i` calls referral replica `i`
//! (`REFERRAL_GRPC_URL`) and referral replica `i` fetches its JWKS from auth replica `i`. Every
//! referral replica migrates at start (`RUN_MIGRATIONS`, the default), all at once.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use refsys_proto::auth::v1::VerifyCodeResponse;
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::referral::v1::referral_service_client::ReferralServiceClient;
use tonic::transport::Channel;

use crate::{PrivateRedis, ServiceProcess, SmsCapture, Stack, TestDatabase, free_port};

/// Each referral replica's pool size unless `referral_env` sets `DATABASE_MAX_CONNECTIONS`.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: u32 = 5;

/// How many replicas, and settings on top of the defaults for every replica of a service.
#[derive(Clone)]
pub struct ReplicaOptions {
    pub replicas: usize,
    pub auth_env: Vec<(&'static str, String)>,
    pub referral_env: Vec<(&'static str, String)>,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self {
            replicas: 2,
            auth_env: Vec::new(),
            referral_env: Vec::new(),
        }
    }
}

pub struct Replicas {
    pub database: TestDatabase,
    pub redis: PrivateRedis,
    pub sms: SmsCapture,
    /// auth-service replicas; `auth[i]` calls `referral[i]`.
    pub auth: Vec<ServiceProcess>,
    /// referral-service replicas; `referral[i]` fetches its JWKS from `auth[i]`.
    pub referral: Vec<ServiceProcess>,
    /// `DATABASE_MAX_CONNECTIONS` of each referral replica.
    pub database_max_connections: u32,
    _secrets: tempfile::TempDir,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// 32 random bytes from the OS, hex-encoded (a pepper file's content).
fn random_hex() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut bytes))
        .expect("/dev/urandom is readable");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An Ed25519 private key, PKCS#8 PEM, as `openssl genpkey` writes it for the Secret.
fn signing_key(dir: &Path) -> String {
    let path = dir.join("signing.pem").display().to_string();
    let status = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out", &path])
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl genpkey failed");
    path
}

fn owned(env: &[(&'static str, String)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

impl Replicas {
    pub async fn start() -> Self {
        Self::start_with(ReplicaOptions::default()).await
    }

    pub async fn start_with(options: ReplicaOptions) -> Self {
        assert!(options.replicas >= 1, "at least one replica");
        let database = TestDatabase::create().await;
        let redis = PrivateRedis::start().await;
        let sms = SmsCapture::start().await;
        let secrets = tempfile::tempdir().expect("a temp dir for the secrets");
        let jwt_key = signing_key(secrets.path());
        let otp_pepper = secrets.path().join("otp-pepper").display().to_string();
        let phone_pepper = secrets.path().join("phone-pepper").display().to_string();
        std::fs::write(&otp_pepper, random_hex()).expect("pepper is written");
        std::fs::write(&phone_pepper, random_hex()).expect("pepper is written");
        let database_max_connections = options
            .referral_env
            .iter()
            .find(|(k, _)| *k == "DATABASE_MAX_CONNECTIONS")
            .map_or(DEFAULT_DATABASE_MAX_CONNECTIONS, |(_, v)| {
                v.parse().expect("DATABASE_MAX_CONNECTIONS is a number")
            });

        let auth_addrs: Vec<SocketAddr> = (0..options.replicas)
            .map(|_| loopback(free_port()))
            .collect();
        let referral_addrs: Vec<SocketAddr> = (0..options.replicas)
            .map(|_| loopback(free_port()))
            .collect();
        let common = || {
            vec![
                ("LOG_FORMAT".to_owned(), "json".to_owned()),
                ("RUST_LOG".to_owned(), "info".to_owned()),
                ("METRICS_ADDR".to_owned(), loopback(free_port()).to_string()),
                ("SHUTDOWN_DELAY_SECONDS".to_owned(), "1".to_owned()),
                ("SHUTDOWN_GRACE_SECONDS".to_owned(), "10".to_owned()),
            ]
        };

        let mut auth = Vec::new();
        let mut referral = Vec::new();
        for i in 0..options.replicas {
            let mut env = common();
            env.extend([
                ("AUTH_GRPC_ADDR".to_owned(), auth_addrs[i].to_string()),
                ("REDIS_URL".to_owned(), redis.url()),
                (
                    "REFERRAL_GRPC_URL".to_owned(),
                    format!("http://{}", referral_addrs[i]),
                ),
                ("JWT_SIGNING_KEY_FILE".to_owned(), jwt_key.clone()),
                ("OTP_PEPPER_FILE".to_owned(), otp_pepper.clone()),
            ]);
            env.extend(sms.env());
            env.extend(owned(&options.auth_env));
            auth.push(ServiceProcess::spawn("auth-service", auth_addrs[i], env));

            let mut env = common();
            env.extend([
                (
                    "REFERRAL_GRPC_ADDR".to_owned(),
                    referral_addrs[i].to_string(),
                ),
                ("DATABASE_URL".to_owned(), database.url.clone()),
                (
                    "DATABASE_MAX_CONNECTIONS".to_owned(),
                    database_max_connections.to_string(),
                ),
                (
                    "AUTH_GRPC_URL".to_owned(),
                    format!("http://{}", auth_addrs[i]),
                ),
                ("PHONE_HASH_PEPPER_FILE".to_owned(), phone_pepper.clone()),
            ]);
            env.extend(owned(&options.referral_env));
            referral.push(ServiceProcess::spawn(
                "referral-service",
                referral_addrs[i],
                env,
            ));
        }
        for process in auth.iter_mut().chain(referral.iter_mut()) {
            process.wait_serving(Duration::from_secs(60)).await;
        }
        Self {
            database,
            redis,
            sms,
            auth,
            referral,
            database_max_connections,
            _secrets: secrets,
        }
    }

    pub fn replicas(&self) -> usize {
        self.auth.len()
    }

    pub async fn auth_client(&self, replica: usize) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(Stack::channel(&self.auth[replica]).await)
    }

    pub async fn referral_client(&self, replica: usize) -> ReferralServiceClient<Channel> {
        ReferralServiceClient::new(Stack::channel(&self.referral[replica]).await)
    }

    /// A client of every auth replica, in replica order.
    pub async fn auth_clients(&self) -> Vec<AuthServiceClient<Channel>> {
        let mut clients = Vec::new();
        for replica in 0..self.replicas() {
            clients.push(self.auth_client(replica).await);
        }
        clients
    }

    /// A client of every referral replica, in replica order.
    pub async fn referral_clients(&self) -> Vec<ReferralServiceClient<Channel>> {
        let mut clients = Vec::new();
        for replica in 0..self.replicas() {
            clients.push(self.referral_client(replica).await);
        }
        clients
    }

    /// SendCode through auth replica `send_via`, VerifyCode through `verify_via`.
    pub async fn sign_in(
        &self,
        send_via: usize,
        verify_via: usize,
        phone: &str,
        invite_code: Option<&str>,
    ) -> VerifyCodeResponse {
        crate::stack::sign_in_through(
            self.auth_client(send_via).await,
            self.auth_client(verify_via).await,
            &self.sms,
            phone,
            invite_code,
        )
        .await
    }
}
