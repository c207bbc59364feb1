//! The load scenarios. Each runs `concurrency` callers for a fixed time and summarises.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::Stack;
use e2e_tests::stack::bearer;
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::auth::v1::{RefreshTokensRequest, SendCodeRequest, VerifyCodeRequest};
use refsys_proto::referral::v1::referral_service_client::ReferralServiceClient;
use refsys_proto::referral::v1::{
    ActivateInviteCodeRequest, GetProfileRequest, ListInviteesRequest,
};
use tonic::Status;
use tonic::transport::Channel;

use crate::capture::CodeCapture;
use crate::stats::{Recorder, Summary};

/// What an operation answers when its prepared inputs ran out: the caller stops, unrecorded,
/// and the rate is taken over the time the inputs lasted.
const USED_UP: &str = "prepared inputs used up";

/// HTTP/2 connections per service: one connection serialises on one server task.
const CONNECTIONS: usize = 4;

pub struct Signed {
    pub access_token: String,
    pub refresh_token: String,
}

pub struct Bench {
    pub auth: Vec<AuthServiceClient<Channel>>,
    pub referral: Vec<ReferralServiceClient<Channel>>,
    capture: CodeCapture,
    next_phone: AtomicU64,
    pub concurrency: usize,
}

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
        Arc::new(Self {
            auth,
            referral,
            capture,
            next_phone: AtomicU64::new(0),
            concurrency,
        })
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

    /// Signs in `count` fresh users, `concurrency` at a time.
    pub async fn sign_in_many(
        self: &Arc<Self>,
        count: usize,
        invite_code: Option<String>,
    ) -> Vec<Signed> {
        let per_worker = count.div_ceil(self.concurrency);
        let mut tasks = Vec::new();
        for worker in 0..self.concurrency {
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
        Summary::new(name, self.concurrency, recorder, started.elapsed())
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
        let inviters = self.sign_in_many(20, None).await;
        for inviter in &inviters {
            let code = self.invite_code(&inviter.access_token).await;
            self.sign_in_many(10, Some(code)).await;
        }
        let tokens: Arc<Vec<String>> =
            Arc::new(inviters.into_iter().map(|u| u.access_token).collect());
        let this = self.clone();
        self.run(
            "profile (GetProfile, 10 invitees)",
            duration,
            move |worker, i| {
                let this = this.clone();
                let tokens = tokens.clone();
                async move {
                    let token = &tokens[(worker + i as usize) % tokens.len()];
                    this.referral(worker)
                        .get_profile(bearer(GetProfileRequest {}, token))
                        .await
                        .map(|_| ())
                }
            },
        )
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
                    let rotated = this
                        .auth(worker)
                        .refresh_tokens(RefreshTokensRequest {
                            refresh_token: token.clone(),
                        })
                        .await?
                        .into_inner();
                    *token = rotated.refresh_token;
                    Ok(())
                }
            },
        )
        .await
    }

    /// 80 % GetProfile, 10 % ListInvitees, 5 % RefreshTokens, 5 % sign-in.
    pub async fn mixed(self: &Arc<Self>, duration: Duration) -> Summary {
        let users = self.sign_in_many(self.concurrency, None).await;
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
