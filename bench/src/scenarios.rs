//! The load scenarios. Each runs `concurrency` callers for a fixed time and summarises.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::Stack;
use e2e_tests::stack::bearer;
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::auth::v1::{
    RefreshTokensRequest, RefreshTokensResponse, SendCodeRequest, VerifyCodeRequest,
};
use refsys_proto::referral::v1::referral_service_client::ReferralServiceClient;
use refsys_proto::referral::v1::{
    ActivateInviteCodeRequest, GetProfileRequest, ListInviteesRequest,
};
use tonic::Status;
use tonic::transport::Channel;

use crate::capture::CodeCapture;
use crate::cpu::{PerThousand, Pids, Reading};
use crate::lean::{self, Connections, Rpc};
use crate::stats::{Recorder, Summary};

/// What an operation answers when its prepared inputs ran out: the caller stops, unrecorded,
/// and the rate is taken over the time the inputs lasted.
const USED_UP: &str = "prepared inputs used up";

/// The fewest callers that prepare a run's users.
const PREPARE_CALLERS: usize = 32;

/// HTTP/2 connections per service: one connection serialises on one server task.
const CONNECTIONS: usize = 4;

/// `users` signed in to prepare `scenario`, which needs at least one: a clear stop instead of
/// a division by zero when auth-service refused every preparation sign-in (a limit, the fraud
/// guard).
fn prepared(scenario: &str, users: Vec<Signed>) -> Vec<Signed> {
    assert!(
        !users.is_empty(),
        "{scenario}: auth-service refused every sign-in that prepares the scenario"
    );
    users
}

pub struct Signed {
    pub access_token: String,
    pub refresh_token: String,
}

pub struct Bench {
    pub auth: Vec<AuthServiceClient<Channel>>,
    pub referral: Vec<ReferralServiceClient<Channel>>,
    /// The lean caller's connections ([`lean`]), for the hot single-call scenarios.
    pub lean_auth: Connections,
    pub lean_referral: Connections,
    pub get_profile: Rpc,
    pub refresh_tokens: Rpc,
    capture: CodeCapture,
    next_phone: AtomicU64,
    pub concurrency: usize,
    /// Whose CPU each run reads.
    pub pids: Pids,
}

pub const GET_PROFILE: &str = "/refsys.referral.v1.ReferralService/GetProfile";
pub const REFRESH_TOKENS: &str = "/refsys.auth.v1.AuthService/RefreshTokens";
pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

impl Bench {
    pub async fn new(stack: &Stack, capture: CodeCapture, concurrency: usize) -> Arc<Self> {
        let mut auth = Vec::new();
        let mut referral = Vec::new();
        for _ in 0..CONNECTIONS {
            auth.push(AuthServiceClient::new(Stack::channel(&stack.auth).await));
            referral.push(ReferralServiceClient::new(
                Stack::channel(&stack.referral).await,
            ));
        }
        let pids = Pids {
            auth: stack.auth.pid(),
            referral: stack.referral.pid(),
            database: Some(stack.database.name.clone()),
            redis: crate::cpu::redis_pid(stack.redis.port).await,
        };
        Arc::new(Self {
            auth,
            referral,
            lean_auth: Connections::open(stack.auth.addr, CONNECTIONS).await,
            lean_referral: Connections::open(stack.referral.addr, CONNECTIONS).await,
            get_profile: Rpc::new(stack.referral.addr, GET_PROFILE),
            refresh_tokens: Rpc::new(stack.auth.addr, REFRESH_TOKENS),
            capture,
            next_phone: AtomicU64::new(0),
            concurrency,
            pids,
        })
    }

    /// How many connections the lean caller opens per service (h2load gets as many).
    pub fn connections(&self) -> usize {
        CONNECTIONS
    }

    fn auth(&self, worker: usize) -> AuthServiceClient<Channel> {
        self.auth[worker % CONNECTIONS].clone()
    }

    pub fn referral_client(&self, worker: usize) -> ReferralServiceClient<Channel> {
        self.referral(worker)
    }

    fn referral(&self, worker: usize) -> ReferralServiceClient<Channel> {
        self.referral[worker % CONNECTIONS].clone()
    }

    /// A phone number no other flow of this run uses (Russian mobile range +7 9xx).
    fn fresh_phone(&self) -> String {
        let n = self.next_phone.fetch_add(1, Ordering::Relaxed);
        format!("+7999{:07}", n % 10_000_000)
    }

    /// SendCode + VerifyCode for a fresh phone, through the real SMS path.
    pub async fn sign_in(
        &self,
        worker: usize,
        invite_code: Option<String>,
    ) -> Result<Signed, Status> {
        self.sign_in_phone(worker, &self.fresh_phone(), invite_code)
            .await
    }

    /// SendCode + VerifyCode for `phone` (E.164).
    pub async fn sign_in_phone(
        &self,
        worker: usize,
        phone: &str,
        invite_code: Option<String>,
    ) -> Result<Signed, Status> {
        let phone = phone.to_owned();
        let mut auth = self.auth(worker);
        auth.send_code(SendCodeRequest {
            phone_number: phone.clone(),
        })
        .await?;
        let code = self
            .capture
            .take(&phone)
            .ok_or_else(|| Status::internal("no SMS captured"))?;
        let verified = auth
            .verify_code(VerifyCodeRequest {
                phone_number: phone,
                code,
                invite_code,
            })
            .await?
            .into_inner();
        Ok(Signed {
            access_token: verified.access_token,
            refresh_token: verified.refresh_token,
        })
    }

    /// Signs in `count` fresh users, `concurrency` at a time but at least [`PREPARE_CALLERS`]:
    /// preparing inputs is not what a run measures, and one caller would take a minute to
    /// prepare activation's pool (the sweep's 1-caller point).
    pub async fn sign_in_many(
        self: &Arc<Self>,
        count: usize,
        invite_code: Option<String>,
    ) -> Vec<Signed> {
        let workers = self.concurrency.max(PREPARE_CALLERS);
        let per_worker = count.div_ceil(workers);
        let mut tasks = Vec::new();
        for worker in 0..workers {
            let this = self.clone();
            let invite_code = invite_code.clone();
            tasks.push(tokio::spawn(async move {
                let mut users = Vec::new();
                for _ in 0..per_worker {
                    if let Ok(user) = this.sign_in(worker, invite_code.clone()).await {
                        users.push(user);
                    }
                }
                users
            }));
        }
        let mut users = Vec::new();
        for task in tasks {
            users.extend(task.await.unwrap_or_default());
        }
        users.truncate(count);
        users
    }

    /// Runs `op(worker, iteration)` on every worker until `duration` has passed.
    pub async fn run<F, Fut>(self: &Arc<Self>, name: &str, duration: Duration, op: F) -> Summary
    where
        F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = Result<(), Status>> + Send,
    {
        let before = Reading::now(&self.pids);
        let started = Instant::now();
        let deadline = started + duration;
        let mut tasks = Vec::new();
        for worker in 0..self.concurrency {
            let op = op.clone();
            tasks.push(tokio::spawn(async move {
                let mut recorder = Recorder::default();
                let mut iteration = 0;
                while Instant::now() < deadline {
                    let call = Instant::now();
                    let result = op(worker, iteration).await;
                    if matches!(&result, Err(status) if status.message() == USED_UP) {
                        break;
                    }
                    recorder.record(call.elapsed(), &result);
                    iteration += 1;
                }
                recorder
            }));
        }
        let mut recorder = Recorder::default();
        for task in tasks {
            recorder.merge(task.await.unwrap_or_default());
        }
        let wall = started.elapsed();
        let after = Reading::now(&self.pids);
        let mut summary = Summary::new(name, self.concurrency, recorder, wall);
        summary.cpu = PerThousand::between(&before, &after, summary.calls(), false);
        summary
    }

    pub async fn signin(self: &Arc<Self>, duration: Duration) -> Summary {
        let this = self.clone();
        self.run(
            "signin (SendCode+VerifyCode, new user)",
            duration,
            move |worker, _| {
                let this = this.clone();
                async move { this.sign_in(worker, None).await.map(|_| ()) }
            },
        )
        .await
    }

    /// Users with ~10 invitees each, read with GetProfile.
    pub async fn profile(self: &Arc<Self>, duration: Duration) -> Summary {
        let inviters = prepared("profile", self.sign_in_many(20, None).await);
        for inviter in &inviters {
            let code = self.invite_code(&inviter.access_token).await;
            self.sign_in_many(10, Some(code)).await;
        }
        let tokens = inviters.iter().map(|u| u.access_token.as_str());
        self.get_profiles("profile (GetProfile, 10 invitees)", tokens, duration)
            .await
    }

    /// GetProfile through the lean caller, the callers taking turns over `tokens`' users.
    pub async fn get_profiles<'a>(
        self: &Arc<Self>,
        name: &str,
        tokens: impl Iterator<Item = &'a str>,
        duration: Duration,
    ) -> Summary {
        let bearers: Arc<Vec<_>> = Arc::new(tokens.map(lean::bearer).collect());
        let body = lean::frame(&GetProfileRequest {});
        let this = self.clone();
        self.run(name, duration, move |worker, i| {
            let (this, bearers, body) = (this.clone(), bearers.clone(), body.clone());
            async move {
                let bearer = &bearers[(worker + i as usize) % bearers.len()];
                this.lean_referral
                    .unary(worker, &this.get_profile, Some(bearer), body)
                    .await
                    .map(|_| ())
            }
        })
        .await
    }

    /// The same body, `body`, to `rpc` on `connections` by every caller: the request h2load
    /// repeats too.
    pub async fn repeat(
        self: &Arc<Self>,
        name: &str,
        to_auth: bool,
        rpc: Rpc,
        bearer: Option<&str>,
        body: bytes::Bytes,
        duration: Duration,
    ) -> Summary {
        let bearer = bearer.map(lean::bearer);
        let this = self.clone();
        let rpc = Arc::new(rpc);
        self.run(name, duration, move |worker, _| {
            let (this, rpc, bearer, body) =
                (this.clone(), rpc.clone(), bearer.clone(), body.clone());
            async move {
                let connections = if to_auth {
                    &this.lean_auth
                } else {
                    &this.lean_referral
                };
                connections
                    .unary(worker, &rpc, bearer.as_ref(), body)
                    .await
                    .map(|_| ())
            }
        })
        .await
    }

    pub async fn invite_code(&self, token: &str) -> String {
        self.referral(0)
            .get_profile(bearer(GetProfileRequest {}, token))
            .await
            .ok()
            .and_then(|r| r.into_inner().profile)
            .map(|p| p.invite_code)
            .unwrap_or_default()
    }

    /// Fresh users activating one hot inviter's code; checks the counts afterwards.
    pub async fn activate(self: &Arc<Self>, duration: Duration) -> (Summary, String) {
        let Some(inviter) = self.sign_in_many(1, None).await.pop() else {
            return (
                Summary::new("activate", self.concurrency, Recorder::default(), duration),
                "activate: no inviter".into(),
            );
        };
        self.activate_for(
            duration,
            &inviter.access_token,
            "activate (one hot inviter)",
        )
        .await
    }

    /// Fresh users activating the code of the user holding `inviter_token`.
    pub async fn activate_for(
        self: &Arc<Self>,
        duration: Duration,
        inviter_token: &str,
        name: &str,
    ) -> (Summary, String) {
        let before = self
            .referral(0)
            .get_profile(bearer(GetProfileRequest {}, inviter_token))
            .await
            .ok()
            .and_then(|r| r.into_inner().profile);
        let (count_before, points_before) = before
            .as_ref()
            .map_or((0, 0), |p| (p.invitees_count, p.bonus_points));
        let code = before.map(|p| p.invite_code).unwrap_or_default();
        let pool_size = (duration.as_secs() as usize * 2500).max(self.concurrency);
        let invitees = Arc::new(
            self.sign_in_many(pool_size, None)
                .await
                .into_iter()
                .map(|u| u.access_token)
                .collect::<Vec<_>>(),
        );
        let next = Arc::new(AtomicU64::new(0));
        let this = self.clone();
        let summary = {
            let invitees = invitees.clone();
            self.run(name, duration, move |worker, _| {
                let this = this.clone();
                let code = code.clone();
                let invitees = invitees.clone();
                let next = next.clone();
                async move {
                    let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(token) = invitees.get(index) else {
                        return Err(Status::resource_exhausted(USED_UP));
                    };
                    this.referral(worker)
                        .activate_invite_code(bearer(
                            ActivateInviteCodeRequest { invite_code: code },
                            token,
                        ))
                        .await
                        .map(|_| ())
                }
            })
            .await
        };
        let profile = self
            .referral(0)
            .get_profile(bearer(GetProfileRequest {}, inviter_token))
            .await
            .ok()
            .and_then(|r| r.into_inner().profile);
        let (count, points) = profile.map_or((0, 0), |p| {
            (
                p.invitees_count - count_before,
                p.bonus_points - points_before,
            )
        });
        let expected = summary.ok as i64;
        let note = format!(
            "{name}: {} successful activations; the inviter gained {count} invitees and {points} points (expected {expected} and {}): {}.",
            summary.ok,
            expected * 200,
            if count == expected && points == expected * 200 {
                "exact"
            } else {
                "MISMATCH"
            }
        );
        (summary, note)
    }

    /// One RefreshTokens call presenting `token`; returns the successor.
    pub async fn refresh_once(&self, token: &str) -> Result<String, Status> {
        let body = lean::frame(&RefreshTokensRequest {
            refresh_token: token.to_owned(),
        });
        let answer = self
            .lean_auth
            .unary(0, &self.refresh_tokens, None, body)
            .await?;
        Ok(lean::decode::<RefreshTokensResponse>(answer)?.refresh_token)
    }

    /// RefreshTokens chains: each caller rotates its own token over and over.
    pub async fn refresh(self: &Arc<Self>, duration: Duration) -> Summary {
        let users = self.sign_in_many(self.concurrency, None).await;
        let tokens: Arc<Vec<tokio::sync::Mutex<String>>> = Arc::new(
            users
                .into_iter()
                .map(|u| tokio::sync::Mutex::new(u.refresh_token))
                .collect(),
        );
        let this = self.clone();
        self.run(
            "refresh (RefreshTokens chains)",
            duration,
            move |worker, _| {
                let this = this.clone();
                let tokens = tokens.clone();
                async move {
                    let Some(slot) = tokens.get(worker) else {
                        return Err(Status::resource_exhausted("no user for this caller"));
                    };
                    let mut token = slot.lock().await;
                    let body = lean::frame(&RefreshTokensRequest {
                        refresh_token: token.clone(),
                    });
                    let rotated: RefreshTokensResponse = lean::decode(
                        this.lean_auth
                            .unary(worker, &this.refresh_tokens, None, body)
                            .await?,
                    )?;
                    *token = rotated.refresh_token;
                    Ok(())
                }
            },
        )
        .await
    }

    /// 80 % GetProfile, 10 % ListInvitees, 5 % RefreshTokens, 5 % sign-in.
    pub async fn mixed(self: &Arc<Self>, duration: Duration) -> Summary {
        let users = prepared("mixed", self.sign_in_many(self.concurrency, None).await);
        let access: Arc<Vec<String>> =
            Arc::new(users.iter().map(|u| u.access_token.clone()).collect());
        let refresh: Arc<Vec<tokio::sync::Mutex<String>>> = Arc::new(
            users
                .into_iter()
                .map(|u| tokio::sync::Mutex::new(u.refresh_token))
                .collect(),
        );
        let this = self.clone();
        self.run("mixed", duration, move |worker, i| {
            let this = this.clone();
            let access = access.clone();
            let refresh = refresh.clone();
            async move {
                let token = &access[worker % access.len()];
                match i % 20 {
                    0 => this.sign_in(worker, None).await.map(|_| ()),
                    1 => {
                        let mut slot = refresh[worker % refresh.len()].lock().await;
                        let rotated = this
                            .auth(worker)
                            .refresh_tokens(RefreshTokensRequest {
                                refresh_token: slot.clone(),
                            })
                            .await?
                            .into_inner();
                        *slot = rotated.refresh_token;
                        Ok(())
                    }
                    2 | 3 => this
                        .referral(worker)
                        .list_invitees(bearer(
                            ListInviteesRequest {
                                page_size: 50,
                                page_token: String::new(),
                            },
                            token,
                        ))
                        .await
                        .map(|_| ()),
                    _ => this
                        .referral(worker)
                        .get_profile(bearer(GetProfileRequest {}, token))
                        .await
                        .map(|_| ()),
                }
            }
        })
        .await
    }
}
