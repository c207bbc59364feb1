//! The `abuse` scenario: SMS pumping and code guessing against auth-service's production
//! defaults, and what the attack costs legitimate sign-ins.
//!
//! It runs on a stack of its own (a fresh Redis, so every budget starts empty) with no limit
//! raised: only `TRUSTED_PROXY_HOPS=1` (callers are told apart by `x-forwarded-for`), the SMS
//! endpoint (a capture of its own, counting every message delivered) and
//! `SMS_FRAUD_GUARD=enforce` (the default `monitor` only logs, so its effect would not show).
//!
//! 1. **Pump**: 10,000 consecutive numbers (one block, RU), then a ring of 10,000 numbers over
//!    1,000 blocks (KZ), each number once, from 1,000 IPv6 /64s in turn, as fast as the
//!    callers go. Counts the SMS that reached the endpoint and the refusals by reason.
//! 2. **Victims**: 5,000 phones in 7 other regions are sent a real code from addresses of
//!    their own, one phone per block. People who ask for a code type it in: before the
//!    victims, every region has a quarter as many users sign in completely, so the conversion
//!    guard judges the region as a healthy one (a region of pending codes only would be
//!    suspended after 50 sends, and no attack would be needed).
//! 3. **Guessing**: attackers guess codes of the 5,000 phones, a different code each time
//!    at a phone, the /64 changing from round to round, up to 40,000 guesses.
//! 4. **Legitimate sign-ins**: SendCode + VerifyCode, each user on an address and a number of
//!    its own in two more regions; alone, then while the attackers go on — once guessing at
//!    the victims of five regions only, once guessing at all of them and pumping too.
//!
//! Why two attacks in the last step: the service parses every number it is sent (refused or
//! not) with the `phonenumber` crate, which keeps its compiled patterns in one shared LRU cache
//! of 100 entries. Numbers of up to about seven regions at a time fit; with more in play the
//! cache thrashes and a parse costs milliseconds instead of microseconds. The confined attack
//! keeps seven regions in play, the full one eleven: most of the difference between the two
//! rows is that cliff, not the limits.
//!
//! The legitimate load is a fixed number of flows (or the run time), not a time alone: at the
//! defaults a region may be sent 1,000 codes an hour and all regions 10,000, which this
//! scenario stays within.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::auth::v1::{SendCodeRequest, VerifyCodeRequest};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::capture::CodeCapture;
use crate::stats::{self, Recorder, Summary};

/// The attacker's addresses: `2001:db8:<i>::1`, each in a /64 of its own.
const ATTACKER_NETS: u64 = 1000;
/// Numbers per pump.
const PUMP_NUMBERS: u64 = 10_000;
/// One block of RU mobiles (the E.164 form without its last four digits): +7 999 001 0000–9999.
const PUMP_BLOCK: &str = "+7999001";
/// KZ mobiles +7 701 bbb nnnn: the ring uses 10 numbers in each of 1,000 blocks.
const RING_PREFIX: &str = "+7701";
const VICTIMS: u64 = 5000;
/// Victims' regions, and the prefix of their numbers: number `i` (0..1000) is
/// `prefix`, `i` in three digits, `4821` — each in a block of its own.
const VICTIM_REGIONS: [(&str, &str); 7] = [
    ("DE", "+491511"),
    ("FR", "+3361"),
    ("ES", "+3461"),
    ("IT", "+39312"),
    ("NL", "+3161"),
    ("PL", "+4851"),
    ("BR", "+551191"),
];
/// Users per victim region who sign in completely before the victims are sent their codes:
/// a quarter of the region's 715 victims and a margin, so verified / sent stays above the
/// guard's 0.2 throughout.
const CONVERTED_PER_REGION: u64 = 190;
/// The legitimate users' regions (numbers as for the victims).
const LEGIT_REGIONS: [(&str, &str); 2] = [("GB", "+44740"), ("SE", "+4670")];
/// Legitimate sign-ins per measurement at most; three measurements send at most 900 codes to
/// each legit region, within its hourly budget of 1,000.
const LEGIT_FLOWS: u64 = 600;
/// Victims' regions the confined attack guesses in: with the two legit regions, seven regions
/// in play (see [`run`] on why that matters).
const CONFINED_REGIONS: u64 = 5;
/// Distinct codes of `OTP_LENGTH` = 4 digits.
const CODE_SPACE: u64 = 10_000;
/// `OTP_MAX_ATTEMPTS`: the wrong guess that burns a code.
const MAX_ATTEMPTS: u32 = 5;
/// Guesses: eight rounds over the victims.
const MAX_GUESSES: u64 = 8 * VICTIMS;
const CONNECTIONS: usize = 4;

/// The defaults the figures are judged against (auth-service's documented defaults).
const DEFAULT_PREFIX_BUDGET: u64 = 20;
const DEFAULT_REGION_BUDGET: u64 = 1000;
const DEFAULT_GLOBAL_BUDGET: u64 = 10_000;
const DEFAULT_FRAUD_MIN_SENDS: u64 = 50;
const DEFAULT_CLIENT_FAILURES: u64 = 30;

fn attacker(i: u64) -> String {
    format!("2001:db8:{:x}::1", i % ATTACKER_NETS)
}

/// An IPv4 address of its own for caller `k` in 198.`net`.0.0/16 (the benchmarking range).
fn own_address(net: u8, k: u64) -> String {
    format!("198.{net}.{}.{}", (k / 256) % 256, k % 256)
}

fn number(prefix: &str, i: u64) -> String {
    format!("{prefix}{i:03}4821")
}

fn pump_number(i: u64) -> String {
    let i = i % (2 * PUMP_NUMBERS);
    if i < PUMP_NUMBERS {
        format!("{PUMP_BLOCK}{i:04}")
    } else {
        let i = i - PUMP_NUMBERS;
        format!("{RING_PREFIX}{:03}{:04}", i % 1000, i / 1000)
    }
}

/// A request as a proxy trusted for one hop forwards it from `client`.
fn from<T>(message: T, client: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "x-forwarded-for",
        client.parse().expect("an address is ASCII"),
    );
    request
}

/// Answers by kind: `OK`, or the code with the limit's reason.
type Tally = BTreeMap<String, u64>;

fn label<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "OK".to_owned(),
        Err(status) => stats::error_label(status),
    }
}

fn tally_text(tally: &Tally) -> String {
    tally
        .iter()
        .map(|(label, count)| format!("{label}: {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One attack phase's figures.
struct Phase {
    name: String,
    callers: usize,
    requests: u64,
    wall: Duration,
    sms: u64,
    answers: Tally,
}

impl Phase {
    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {:.1} | {:.0} | {} | {} |",
            self.name,
            self.callers,
            self.requests,
            self.wall.as_secs_f64(),
            self.requests as f64 / self.wall.as_secs_f64().max(1e-9),
            self.sms,
            tally_text(&self.answers)
        )
    }
}

const PHASE_HEADER: &str = "| phase | callers | requests | s | req/s | SMS delivered | answers |\n|---|---|---|---|---|---|---|";

struct Abuse {
    auth: Vec<AuthServiceClient<Channel>>,
    capture: CodeCapture,
}

impl Abuse {
    fn auth(&self, caller: usize) -> AuthServiceClient<Channel> {
        self.auth[caller % CONNECTIONS].clone()
    }

    /// SendCode for `phone` from `client`.
    async fn send(&self, caller: usize, phone: String, client: &str) -> Result<(), Status> {
        self.auth(caller)
            .send_code(from(
                SendCodeRequest {
                    phone_number: phone,
                },
                client,
            ))
            .await
            .map(|_| ())
    }

    async fn verify(
        &self,
        caller: usize,
        phone: String,
        code: String,
        client: &str,
    ) -> Result<(), Status> {
        self.auth(caller)
            .verify_code(from(
                VerifyCodeRequest {
                    phone_number: phone,
                    code,
                    invite_code: None,
                },
                client,
            ))
            .await
            .map(|_| ())
    }

    /// SendCode, the code from the captured SMS, VerifyCode: all from `client`.
    async fn sign_in(&self, caller: usize, phone: String, client: &str) -> Result<(), Status> {
        self.send(caller, phone.clone(), client).await?;
        let code = self
            .capture
            .take(&phone)
            .ok_or_else(|| Status::internal("no SMS captured"))?;
        self.verify(caller, phone, code, client).await
    }

    /// Legitimate sign-ins number `first..first + LEGIT_FLOWS`, `callers` at a time; no new
    /// one starts after `until`.
    async fn legit(
        self: &Arc<Self>,
        name: &str,
        first: u64,
        callers: usize,
        until: Instant,
    ) -> Summary {
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for caller in 0..callers {
            let (this, next) = (self.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut recorder = Recorder::default();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= LEGIT_FLOWS || Instant::now() >= until {
                        break recorder;
                    }
                    let index = first + k;
                    let (_, prefix) = LEGIT_REGIONS[(index % 2) as usize];
                    let phone = number(prefix, index / 2);
                    let call = Instant::now();
                    let result = this.sign_in(caller, phone, &own_address(19, index)).await;
                    recorder.record(call.elapsed(), &result);
                }
            }));
        }
        let mut recorder = Recorder::default();
        for task in tasks {
            recorder.merge(task.await.unwrap_or_default());
        }
        Summary::new(name, callers, recorder, started.elapsed())
    }
}

/// Runs `op(caller, i)` for i = 0, 1, 2 … on `callers` callers until `count` calls were
/// started, `deadline` passed or `stop` was set; tallies the labels `op` returns.
async fn drive<F, Fut>(
    callers: usize,
    count: u64,
    deadline: Instant,
    stop: Arc<AtomicBool>,
    op: F,
) -> (u64, Duration, Tally)
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let (op, next, stop) = (op.clone(), next.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                *tally.entry(op(caller, i).await).or_default() += 1;
            }
            tally
        }));
    }
    let mut tally = Tally::new();
    for task in tasks {
        for (label, n) in task.await.unwrap_or_default() {
            *tally.entry(label).or_default() += n;
        }
    }
    (tally.values().sum(), started.elapsed(), tally)
}

/// What the guessers saw, per victim.
struct Guesses {
    /// Victims' phones and the code each was sent (`None`: the send was refused).
    victims: Vec<(String, Option<String>)>,
    /// Answered guesses (UNAUTHENTICATED or a takeover) per victim.
    answered: Vec<AtomicU32>,
    /// Answered guesses equal to the code the victim was sent, and those that took over.
    right_digits: AtomicU64,
    takeovers: AtomicU64,
}

/// The attacker's `round`-th guess at victim `phone`: distinct for every round.
fn guess(phone: u64, round: u64) -> String {
    let offset = (phone * 7919 + 1234) % CODE_SPACE;
    format!("{:04}", (offset + round * 1237) % CODE_SPACE)
}

fn sum_delivered(capture: &CodeCapture, prefixes: &[&str]) -> u64 {
    prefixes.iter().map(|p| capture.delivered_to(p)).sum()
}

/// Runs the scenario on a stack of its own; returns the report (Markdown) and prints it.
pub async fn run(
    concurrency: usize,
    duration: Duration,
    extra_env: &[(&'static str, String)],
) -> String {
    let started = Instant::now();
    let capture = CodeCapture::default();
    let capture_url = capture.start().await;
    let settings: Vec<(&'static str, String)> = [
        ("TWILIO_API_BASE", capture_url),
        ("RUST_LOG", "warn".into()),
        ("TRUSTED_PROXY_HOPS", "1".into()),
        ("SMS_FRAUD_GUARD", "enforce".into()),
    ]
    .into_iter()
    .chain(extra_env.iter().cloned())
    .collect();
    let changed = settings
        .iter()
        .skip(2)
        .map(|(k, v)| format!("`{k}={v}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let stack = Stack::start_with(StackOptions {
        auth_env: settings,
        referral_env: [
            ("RUST_LOG", "warn".into()),
            ("DATABASE_MAX_CONNECTIONS", "16".into()),
        ]
        .into_iter()
        .chain(extra_env.iter().cloned())
        .collect(),
        ..StackOptions::default()
    })
    .await;
    let mut auth = Vec::new();
    for _ in 0..CONNECTIONS {
        auth.push(AuthServiceClient::new(Stack::channel(&stack.auth).await));
    }
    let abuse = Arc::new(Abuse {
        auth,
        capture: capture.clone(),
    });
    let never = Arc::new(AtomicBool::new(false));
    // A bound for each phase, far above what it needs on 2 cores.
    let phase_deadline = || Instant::now() + duration * 3;
    let attackers = concurrency.max(1);
    let legit_callers = (concurrency / 4).max(1);
    let mut phases = Vec::new();

    // 1. Pumps.
    for (name, first, prefix) in [
        (
            "pump: 10,000 consecutive numbers, one block (RU +7 999 001 xxxx)",
            0,
            PUMP_BLOCK,
        ),
        (
            "pump: ring of 10,000 numbers over 1,000 blocks (KZ +7 701 xxx xxxx)",
            PUMP_NUMBERS,
            RING_PREFIX,
        ),
    ] {
        let this = abuse.clone();
        let (requests, wall, answers) = drive(
            attackers,
            PUMP_NUMBERS,
            phase_deadline(),
            never.clone(),
            move |caller, i| {
                let this = this.clone();
                async move {
                    let result = this
                        .send(caller, pump_number(first + i), &attacker(i))
                        .await;
                    label(&result)
                }
            },
        )
        .await;
        phases.push(Phase {
            name: name.into(),
            callers: attackers,
            requests,
            wall,
            sms: capture.delivered_to(prefix),
            answers,
        });
    }
    let pumped = phases.iter().map(|p| p.sms).sum::<u64>();

    // 2. Victims: a complete sign-in for some users of each region, then the victims' codes.
    let victim_prefixes: Vec<&str> = VICTIM_REGIONS.iter().map(|(_, p)| *p).collect();
    let regions = VICTIM_REGIONS.len() as u64;
    let converted = CONVERTED_PER_REGION * regions;
    {
        let this = abuse.clone();
        let (requests, wall, answers) = drive(
            attackers,
            converted,
            phase_deadline(),
            never.clone(),
            move |caller, k| {
                let this = this.clone();
                async move {
                    let (_, prefix) = VICTIM_REGIONS[(k % regions) as usize];
                    let result = this
                        .sign_in(caller, number(prefix, k / regions), &own_address(18, k))
                        .await;
                    label(&result)
                }
            },
        )
        .await;
        phases.push(Phase {
            name: format!(
                "victims' regions: {CONVERTED_PER_REGION} complete sign-ins each (SendCode+VerifyCode), own addresses"
            ),
            callers: attackers,
            requests,
            wall,
            sms: sum_delivered(&capture, &victim_prefixes),
            answers,
        });
    }
    let victim_phones: Vec<String> = (0..VICTIMS)
        .map(|k| {
            let (_, prefix) = VICTIM_REGIONS[(k % regions) as usize];
            number(prefix, CONVERTED_PER_REGION + k / regions)
        })
        .collect();
    let codes: Arc<Mutex<Vec<Option<String>>>> =
        Arc::new(Mutex::new(vec![None; victim_phones.len()]));
    {
        let sms_before = sum_delivered(&capture, &victim_prefixes);
        let (this, phones, codes) = (
            abuse.clone(),
            Arc::new(victim_phones.clone()),
            codes.clone(),
        );
        let (requests, wall, answers) = drive(
            attackers,
            VICTIMS,
            phase_deadline(),
            never.clone(),
            move |caller, k| {
                let (this, phones, codes) = (this.clone(), phones.clone(), codes.clone());
                async move {
                    let phone = phones[k as usize].clone();
                    let result = this
                        .send(caller, phone.clone(), &own_address(18, converted + k))
                        .await;
                    if result.is_ok() {
                        let code = this.capture.take(&phone);
                        codes.lock().unwrap_or_else(|e| e.into_inner())[k as usize] = code;
                    }
                    label(&result)
                }
            },
        )
        .await;
        phases.push(Phase {
            name: format!(
                "victims: {VICTIMS} phones in {regions} regions sent a code, one phone per block, own addresses"
            ),
            callers: attackers,
            requests,
            wall,
            sms: sum_delivered(&capture, &victim_prefixes) - sms_before,
            answers,
        });
    }
    let codes = std::mem::take(&mut *codes.lock().unwrap_or_else(|e| e.into_inner()));
    let pending = codes.iter().filter(|c| c.is_some()).count();
    let guesses = Arc::new(Guesses {
        victims: victim_phones.into_iter().zip(codes).collect(),
        answered: (0..VICTIMS).map(|_| AtomicU32::new(0)).collect(),
        right_digits: AtomicU64::new(0),
        takeovers: AtomicU64::new(0),
    });
    // Guess number `g` (counting on across both guessing phases): victim g mod 5000, round
    // g / 5000, from the /64 that round assigns that victim.
    // A confined attack guesses only at victims in the first CONFINED_REGIONS regions.
    let guess_op = {
        let (this, guesses) = (abuse.clone(), guesses.clone());
        move |first: u64, confined: bool| {
            let (this, guesses) = (this.clone(), guesses.clone());
            move |caller: usize, i: u64| {
                let (this, guesses) = (this.clone(), guesses.clone());
                async move {
                    let g = first + i;
                    let (mut victim, round) = (g % VICTIMS, g / VICTIMS);
                    if confined {
                        victim = victim / regions * regions + victim % CONFINED_REGIONS;
                        if victim >= VICTIMS {
                            victim -= regions;
                        }
                    }
                    let (phone, code) = &guesses.victims[victim as usize];
                    let attempt = guess(victim, round);
                    let result = this
                        .verify(
                            caller,
                            phone.clone(),
                            attempt.clone(),
                            &attacker(victim + round),
                        )
                        .await;
                    let answered = result.is_ok()
                        || matches!(&result, Err(s) if s.code() == Code::Unauthenticated);
                    if answered && code.as_deref() == Some(attempt.as_str()) {
                        guesses.right_digits.fetch_add(1, Ordering::Relaxed);
                    }
                    if answered {
                        guesses.answered[victim as usize].fetch_add(1, Ordering::Relaxed);
                    }
                    if result.is_ok() {
                        guesses.takeovers.fetch_add(1, Ordering::Relaxed);
                        "OK (takeover)".to_owned()
                    } else {
                        label(&result)
                    }
                }
            }
        }
    };

    // 3. Guessing, alone: the attackers' whole budget of answered guesses and beyond.
    let (guess_requests, guess_wall, guess_answers) = drive(
        attackers,
        MAX_GUESSES,
        phase_deadline(),
        never.clone(),
        guess_op(0, false),
    )
    .await;
    let cap = |reason: &str| {
        guess_answers
            .get(&format!("{:?}/{reason}", Code::ResourceExhausted))
            .copied()
            .unwrap_or(0)
    };
    let refused_by = [
        "CLIENT_FAILURE_LIMIT",
        "PHONE_CLIENT_FAILURE_LIMIT",
        "PHONE_FAILURE_LIMIT",
    ]
    .map(cap);
    let answered_alone: u64 = guesses
        .answered
        .iter()
        .map(|a| u64::from(a.load(Ordering::Relaxed)))
        .sum();
    phases.push(Phase {
        name: format!(
            "guessing: {VICTIMS} victims, distinct guesses, the /64 changing every round (at most {MAX_GUESSES} guesses)"
        ),
        callers: attackers,
        requests: guess_requests,
        wall: guess_wall,
        sms: 0,
        answers: guess_answers,
    });

    // 4. Legitimate sign-ins alone, then while the attackers go on: first confined to five of
    //    the victims' regions (guessing only), then guessing at all victims and pumping.
    let mut legit = vec![
        abuse
            .legit(
                "abuse: legit sign-in, no attack",
                0,
                legit_callers,
                Instant::now() + duration,
            )
            .await,
    ];
    let mut guessed = guess_requests;
    let mut pumped_so_far = 2 * PUMP_NUMBERS;
    for (round, confined) in [(1, true), (2, false)] {
        let in_play = if confined {
            CONFINED_REGIONS as usize + LEGIT_REGIONS.len()
        } else {
            VICTIM_REGIONS.len() + LEGIT_REGIONS.len() + 2
        };
        let pumpers = if confined { 0 } else { (attackers / 4).max(1) };
        let guessers = (attackers - pumpers).max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let attack_deadline = Instant::now() + duration + Duration::from_secs(5);
        let guessing = tokio::spawn(drive(
            guessers,
            u64::MAX,
            attack_deadline,
            stop.clone(),
            guess_op(guessed, confined),
        ));
        let pumping = {
            let this = abuse.clone();
            let first = pumped_so_far;
            tokio::spawn(drive(
                pumpers,
                u64::MAX,
                attack_deadline,
                stop.clone(),
                move |caller, i| {
                    let this = this.clone();
                    async move {
                        let result = this
                            .send(caller, pump_number(first + i), &attacker(first + i))
                            .await;
                        label(&result)
                    }
                },
            ))
        };
        // The attack reaches full speed first, and goes on until the legitimate load is done.
        tokio::time::sleep(Duration::from_millis(200)).await;
        legit.push(
            abuse
                .legit(
                    &format!("abuse: legit sign-in under attack, {in_play} regions in play"),
                    round * LEGIT_FLOWS,
                    legit_callers,
                    Instant::now() + duration,
                )
                .await,
        );
        stop.store(true, Ordering::Relaxed);
        let (requests, wall, answers) = guessing.await.unwrap_or_default();
        guessed += requests;
        phases.push(Phase {
            name: if confined {
                format!(
                    "guessing goes on during legit load, at the victims of {CONFINED_REGIONS} regions only ({in_play} regions in play)"
                )
            } else {
                format!(
                    "guessing goes on during legit load, at all victims ({in_play} regions in play)"
                )
            },
            callers: guessers,
            requests,
            wall,
            sms: 0,
            answers,
        });
        if pumpers > 0 {
            let (requests, wall, answers) = pumping.await.unwrap_or_default();
            pumped_so_far += requests;
            phases.push(Phase {
                name: "pumping goes on during legit load (both ranges again)".into(),
                callers: pumpers,
                requests,
                wall,
                sms: sum_delivered(&capture, &[PUMP_BLOCK, RING_PREFIX]) - pumped,
                answers,
            });
        }
    }
    let pumped_later = sum_delivered(&capture, &[PUMP_BLOCK, RING_PREFIX]) - pumped;
    for summary in &mut legit {
        summary.auth_rss_mb = stats::rss_mb(stack.auth.pid()).1;
        summary.referral_rss_mb = stats::rss_mb(stack.referral.pid()).1;
    }

    // The arithmetic of guessing: a code is one of 10,000 and every guess at a phone is a
    // different one, so a phone whose code met m answered guesses is taken over with
    // probability m / 10,000 — and m is at most OTP_MAX_ATTEMPTS, the wrong guess that burns it.
    let answered: u64 = guesses
        .answered
        .iter()
        .map(|a| u64::from(a.load(Ordering::Relaxed)))
        .sum();
    let against_pending: u64 = guesses
        .answered
        .iter()
        .zip(&guesses.victims)
        .filter(|(_, (_, code))| code.is_some())
        .map(|(a, _)| u64::from(a.load(Ordering::Relaxed).min(MAX_ATTEMPTS)))
        .sum();
    let takeovers = guesses.takeovers.load(Ordering::Relaxed);
    let right_digits = guesses.right_digits.load(Ordering::Relaxed);
    let total_sms = capture.delivered_to("");
    let attempted_pumps: u64 = phases
        .iter()
        .filter(|p| p.name.starts_with("pump"))
        .map(|p| p.requests)
        .sum();
    let pump_sms = pumped + pumped_later;

    let mut report = Vec::new();
    report.push(format!(
        "Attack phases (production defaults, set: {changed}; attackers use 1,000 IPv6 /64s, `2001:db8:<i>::1` in `x-forwarded-for`):\n"
    ));
    report.push(PHASE_HEADER.to_owned());
    report.extend(phases.iter().map(Phase::row));
    report.push(String::new());
    report.push(format!(
        "SMS pumping: {pump_sms} SMS reached the attacker's numbers out of {attempted_pumps} requested ({:.2} %). \
         Bound at the defaults: one block gets at most {DEFAULT_PREFIX_BUDGET} SMS an hour; a ring over many blocks gets \
         about {DEFAULT_FRAUD_MIN_SENDS} per region before `enforce` suspends the region for an hour (with `monitor`, the default, \
         up to {DEFAULT_REGION_BUDGET} per region an hour), and all regions together at most {DEFAULT_GLOBAL_BUDGET} an hour. \
         SMS sent by the whole scenario: {total_sms} of the hourly {DEFAULT_GLOBAL_BUDGET}.",
        100.0 * pump_sms as f64 / attempted_pumps.max(1) as f64,
    ));
    report.push(String::new());
    report.push(format!(
        "Guessing: {pending} of {VICTIMS} victims had a code pending. Alone, {guess_requests} guesses: \
         {answered_alone} answered (UNAUTHENTICATED or a takeover); refused by CLIENT_FAILURE_LIMIT {}, \
         PHONE_CLIENT_FAILURE_LIMIT {}, PHONE_FAILURE_LIMIT {} (the attackers' {ATTACKER_NETS} /64s may have \
         {DEFAULT_CLIENT_FAILURES} failures an hour each: {} answered guesses). Over both guessing phases {answered} \
         guesses were answered, {against_pending} of them while the code was still pending (at most {MAX_ATTEMPTS} \
         per code: the fifth wrong one burns it), so the expected takeovers are {against_pending} / {CODE_SPACE} = \
         {:.2} (counting every answered guess: {:.2}); **observed: {takeovers}**. {right_digits} answered guesses \
         had the digits of the code that was sent: {takeovers} took over, the others came after their code was \
         burned.",
        refused_by[0],
        refused_by[1],
        refused_by[2],
        ATTACKER_NETS * DEFAULT_CLIENT_FAILURES,
        against_pending as f64 / CODE_SPACE as f64,
        answered as f64 / CODE_SPACE as f64,
    ));
    report.push(String::new());
    report.push(format!(
        "Legitimate sign-ins (at most {LEGIT_FLOWS} flows or {} s each, users in {} and {} on addresses of their own, \
         {legit_callers} callers; the attack meanwhile: {attackers} callers, a quarter of them pumping in the last row). \
         \"Regions in play\" counts the regions whose numbers auth-service parses meanwhile:\n",
        duration.as_secs(),
        LEGIT_REGIONS[0].0,
        LEGIT_REGIONS[1].0
    ));
    report.push(Summary::header().to_owned());
    report.extend(legit.iter().map(Summary::row));
    report.push(String::new());
    report.push(format!(
        "Whole scenario: {:.1} s.",
        started.elapsed().as_secs_f64()
    ));
    let report = report.join("\n");
    println!("{report}");
    report
}
