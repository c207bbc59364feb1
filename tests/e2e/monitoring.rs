//! Monitoring against a real Prometheus (`e2e_tests::prometheus`): every dashboard panel's query
//! answers with data after a journey that touches what the panels show, the store-down alert
//! from deploy/monitoring/alerts.yaml goes pending, then firing, when Redis stops, and the
//! dashboards themselves pass a lint.

use std::time::Duration;

use e2e_tests::dashboards::{self, Dashboard};
use e2e_tests::prometheus::{Prometheus, dashboards_dir};
use e2e_tests::stack::bearer;
use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::{
    IssueServiceTokenRequest, RefreshTokensRequest, SendCodeRequest, VerifyCodeRequest,
};
use refsys_proto::referral::v1::{GetProfileRequest, RedeemPointsRequest};
use tonic::Code;

use crate::platform::{Platform, grant};

/// Short enough for a test to watch an alert go from pending to firing.
const ALERT_FOR: Duration = Duration::from_secs(3);

fn load_dashboards() -> Vec<Dashboard> {
    let dashboards = Dashboard::load_all(&dashboards_dir()).unwrap_or_else(|err| panic!("{err}"));
    assert!(
        !dashboards.is_empty(),
        "no dashboards in {}",
        dashboards_dir().display()
    );
    dashboards
}

#[test]
fn every_dashboard_panel_has_a_unit_a_description_and_queries_with_known_variables() {
    let mut problems = Vec::new();
    for dashboard in load_dashboards() {
        let name = dashboard.name();
        if dashboard.title.is_empty() {
            problems.push(format!("{name}: no title"));
        }
        let panels: Vec<_> = dashboard.panels.iter().filter(|p| !p.is_row()).collect();
        if panels.is_empty() {
            problems.push(format!("{name}: no panels"));
        }
        for panel in panels {
            let at = format!("{name} / {:?}", panel.title);
            if panel.title.is_empty() {
                problems.push(format!("{at}: no title"));
            }
            if panel.unit.as_deref().unwrap_or_default().is_empty() {
                problems.push(format!("{at}: no fieldConfig.defaults.unit"));
            }
            if panel.description.trim().is_empty() {
                problems.push(format!("{at}: no description"));
            }
            if panel.targets.is_empty() {
                problems.push(format!("{at}: no targets"));
            }
            for target in &panel.targets {
                if target.expr.trim().is_empty() {
                    problems.push(format!("{at}: a target without expr"));
                }
                let unknown = dashboards::unknown_variables(&target.expr);
                if !unknown.is_empty() {
                    problems.push(format!(
                        "{at}: unknown variables {unknown:?} in {}",
                        target.expr
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard lint:\n{}",
        problems.join("\n")
    );
}

/// What the panels show, each at least once: sign-ins through the SMS path (RU), a resend refused
/// by a limit, a wrong code, a number refused by policy, an invite activation, a refresh
/// rotation, service tokens issued and refused, points granted, redeemed, replayed and refused,
/// the fraud guard tripping on a region (KZ) whose codes nobody types in, and a moment without
/// Redis and without Postgres (server errors, pool waits).
async fn journey(platform: &Platform) {
    let stack = &platform.stack;
    let mut auth = stack.auth_client().await;

    let inviter = stack.sign_in("+79601240001", None).await;
    let code = stack
        .referral_client()
        .await
        .get_profile(bearer(GetProfileRequest {}, &inviter.access_token))
        .await
        .expect("GetProfile")
        .into_inner()
        .profile
        .expect("a profile")
        .invite_code;
    let invitee = stack.sign_in("+79601240002", Some(&code)).await;
    auth.refresh_tokens(RefreshTokensRequest {
        refresh_token: invitee.refresh_token.clone(),
    })
    .await
    .expect("RefreshTokens");

    // Asking again at once is refused by a limit (the resend cooldown); a wrong code, then the
    // right one.
    let phone = "+79601240003";
    let send = || SendCodeRequest {
        phone_number: phone.to_owned(),
    };
    auth.send_code(send()).await.expect("SendCode");
    let again = auth.send_code(send()).await.expect_err("a resend at once");
    assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");
    let right = stack.sms.latest_code(phone).await.expect("the code");
    let wrong: String = right
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    let verify = |code: String| VerifyCodeRequest {
        phone_number: phone.to_owned(),
        code,
        invite_code: None,
    };
    let refused = auth
        .verify_code(verify(wrong))
        .await
        .expect_err("a wrong code");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let user = auth
        .verify_code(verify(right))
        .await
        .expect("the right code")
        .into_inner();
    let policy = auth
        .send_code(SendCodeRequest {
            phone_number: "+447700900123".to_owned(),
        })
        .await
        .expect_err("a region outside SMS_ALLOWED_REGIONS");
    assert_eq!(policy.code(), Code::FailedPrecondition, "{policy:?}");

    let refused = auth
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "shop".to_owned(),
            client_secret: "not-the-secret".to_owned(),
            scopes: vec![],
        })
        .await
        .expect_err("a wrong client secret");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    let mut points = platform.points().await;
    points
        .grant_points(bearer(grant(&user.user_id, 500, "gift-1"), &platform.bank))
        .await
        .expect("GrantPoints");
    let redeem = |points: i64, key: &str| {
        bearer(
            RedeemPointsRequest {
                user_id: user.user_id.clone(),
                points,
                idempotency_key: key.to_owned(),
                reason: "an order".to_owned(),
            },
            &platform.shop,
        )
    };
    for _ in 0..2 {
        // The second is a retry: answered from the stored result.
        points
            .redeem_points(redeem(200, "order-1"))
            .await
            .expect("RedeemPoints");
    }
    let short = points
        .redeem_points(redeem(10_000, "order-2"))
        .await
        .expect_err("more points than the balance");
    assert_eq!(short.code(), Code::FailedPrecondition, "{short:?}");

    // KZ: codes nobody types in; the guard (enforce, 5 sends, 50 %) suspends the region.
    for n in 1..=5 {
        auth.send_code(SendCodeRequest {
            phone_number: format!("+7701124100{n}"),
        })
        .await
        .expect("SendCode to KZ");
    }
    let suspended = auth
        .send_code(SendCodeRequest {
            phone_number: "+77011241006".to_owned(),
        })
        .await
        .expect_err("KZ suspended");
    assert_eq!(suspended.code(), Code::ResourceExhausted, "{suspended:?}");

    // Postgres out of reach: referral-service answers UNAVAILABLE. (A profile nobody has read
    // yet, so that its per-replica cache cannot answer.)
    let proxy = stack.postgres_proxy.as_ref().expect("proxied Postgres");
    proxy.cut().await;
    let down = stack
        .referral_client()
        .await
        .get_profile(bearer(GetProfileRequest {}, &user.access_token))
        .await
        .expect_err("no Postgres");
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    proxy.restore();
}

#[tokio::test]
async fn every_dashboard_panel_query_returns_data_after_a_journey() {
    let dashboards = load_dashboards();
    let mut platform = Platform::start_with_options(StackOptions {
        auth_env: [
            ("SMS_ALLOWED_REGIONS", "RU,KZ"),
            ("SMS_FRAUD_GUARD", "enforce"),
            ("SMS_FRAUD_MIN_SENDS", "5"),
            ("SMS_FRAUD_MIN_CONVERSION", "0.5"),
        ]
        .map(|(k, v)| (k, v.to_owned()))
        .to_vec(),
        proxy_postgres: true,
        ..StackOptions::default()
    })
    .await;
    let prometheus = Prometheus::scrape(&platform.stack, ALERT_FOR).await;
    prometheus.wait_targets_up(Duration::from_secs(30)).await;
    journey(&platform).await;
    // Redis away for a moment: auth-service answers UNAVAILABLE and counts Redis errors.
    platform.stack.redis.stop();
    let down = platform
        .stack
        .auth_client()
        .await
        .send_code(SendCodeRequest {
            phone_number: "+79601240009".to_owned(),
        })
        .await
        .expect_err("no Redis");
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    platform.stack.redis.resume().await;

    // Series appear with the next scrapes; a rate needs two of them.
    let mut failures = Vec::new();
    for _ in 0..30 {
        failures.clear();
        for dashboard in &dashboards {
            for panel in dashboard.panels.iter().filter(|p| !p.is_row()) {
                for target in &panel.targets {
                    let expr = dashboards::substitute(&target.expr);
                    let problem = match prometheus.query(&expr).await {
                        Ok(series) if series.is_empty() => "no series".to_owned(),
                        Ok(_) => continue,
                        Err(err) => format!("invalid: {err}"),
                    };
                    failures.push(format!(
                        "{} / {:?}: {problem}\n    {expr}",
                        dashboard.name(),
                        panel.title
                    ));
                }
            }
        }
        if failures.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        failures.is_empty(),
        "{} panel queries fail after the journey:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Data is not always the right data: KZ's first trip creates its counter at 1, which a
    // plain increase() reads as 0.
    let trips = dashboards
        .iter()
        .flat_map(|d| &d.panels)
        .find(|p| p.title == "Fraud guard trips")
        .expect("a panel of fraud guard trips");
    let series = prometheus
        .query(&dashboards::substitute(&trips.targets[0].expr))
        .await
        .expect("a valid query");
    let kz: Vec<f64> = series
        .iter()
        .filter(|s| s.labels.get("region").is_some_and(|r| r == "KZ"))
        .filter_map(|s| s.points.last().map(|(_, v)| *v))
        .collect();
    assert_eq!(kz, [1.0], "Fraud guard trips: {series:?}");
}

#[tokio::test]
async fn redis_down_turns_refsys_store_down_pending_then_firing_and_it_resolves() {
    let mut stack = Stack::start().await;
    let prometheus = Prometheus::scrape(&stack, ALERT_FOR).await;
    prometheus.wait_targets_up(Duration::from_secs(30)).await;
    let store_up = |job: &'static str| {
        let prometheus = &prometheus;
        async move {
            prometheus
                .query(&format!(r#"refsys_store_up{{job="{job}"}}"#))
                .await
                .expect("a valid query")
                .first()
                .and_then(|series| series.points.last())
                .map(|(_, value)| *value)
        }
    };
    assert_eq!(store_up("auth-service").await, Some(1.0));
    assert_eq!(store_up("referral-service").await, Some(1.0));
    let store_down = || async {
        prometheus
            .alerts()
            .await
            .expect("/api/v1/alerts answers")
            .into_iter()
            .filter(|alert| alert.name == "RefsysStoreDown")
            .collect::<Vec<_>>()
    };
    assert!(store_down().await.is_empty(), "{:?}", store_down().await);

    stack.redis.stop();
    // Every state the alert shows, in order, until it fires (the readiness check sets the gauge
    // every 2 s, the rule needs it at 0 for ALERT_FOR).
    let mut states: Vec<String> = Vec::new();
    for _ in 0..300 {
        let alerts = store_down().await;
        for alert in &alerts {
            assert_eq!(
                alert.labels["job"], "auth-service",
                "only Redis is down: {alert:?}"
            );
            assert_eq!(alert.labels["severity"], "page", "{alert:?}");
        }
        if let Some(alert) = alerts.first()
            && states.last() != Some(&alert.state)
        {
            states.push(alert.state.clone());
        }
        if states.last().is_some_and(|state| state == "firing") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(states, ["pending", "firing"], "RefsysStoreDown states seen");

    stack.redis.resume().await;
    for _ in 0..300 {
        if store_up("auth-service").await == Some(1.0) && store_down().await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "RefsysStoreDown did not resolve after Redis came back: store_up {:?}, alerts {:?}",
        store_up("auth-service").await,
        store_down().await
    );
}
