//! Abuse of the sign-in flow against the real binaries: SMS pumping, code guessing across
//! phones, locking an owner out, test numbers and unusual but valid numbers. auth-service
//! trusts one proxy hop, so every distinct client is simulated by its `x-forwarded-for` only.

use e2e_tests::stack::bearer;
use e2e_tests::{Stack, StackOptions};
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use refsys_proto::auth::v1::{SendCodeRequest, VerifyCodeRequest, VerifyCodeResponse};
use refsys_proto::referral::v1::GetProfileRequest;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

/// A stack whose auth-service trusts one proxy hop, with `limits` on top.
async fn stack(limits: &[(&'static str, &str)]) -> Stack {
    let mut auth_env = vec![("TRUSTED_PROXY_HOPS", "1".to_owned())];
    auth_env.extend(limits.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Stack::start_with(StackOptions {
        auth_env,
        ..StackOptions::default()
    })
    .await
}

fn from<T>(client: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-forwarded-for", client.parse().expect("an address"));
    request
}

async fn send(
    auth: &mut AuthServiceClient<Channel>,
    client: &str,
    phone: &str,
) -> Result<(), Status> {
    auth.send_code(from(
        client,
        SendCodeRequest {
            phone_number: phone.to_owned(),
        },
    ))
    .await
    .map(|_| ())
}

async fn verify(
    auth: &mut AuthServiceClient<Channel>,
    client: &str,
    phone: &str,
    code: &str,
) -> Result<VerifyCodeResponse, Status> {
    auth.verify_code(from(
        client,
        VerifyCodeRequest {
            phone_number: phone.to_owned(),
            code: code.to_owned(),
            invite_code: None,
        },
    ))
    .await
    .map(tonic::Response::into_inner)
}

/// The ErrorInfo reason of a RESOURCE_EXHAUSTED answer that carries a RetryInfo.
#[track_caller]
fn limit_of(status: &Status) -> String {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.get_details_retry_info().is_some(), "{status:?}");
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"))
}

/// A code surely different from `code`.
fn wrong(code: &str) -> String {
    code.chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect()
}

async fn sms_to(stack: &Stack, phone: &str) -> usize {
    stack
        .sms
        .messages()
        .await
        .iter()
        .filter(|(to, _)| to == phone)
        .count()
}

#[tokio::test]
async fn sms_pumping_into_one_block_gets_exactly_the_block_budget() {
    let stack = stack(&[("SMS_MAX_SENDS_PER_PREFIX_PER_HOUR", "5")]).await;
    let mut auth = stack.auth_client().await;
    // A pumping script: 30 consecutive numbers of one block, each from its own address, so no
    // per-client or per-phone limit ever applies.
    let mut refused = Vec::new();
    for n in 0..30 {
        let phone = format!("+7960555{n:04}");
        match send(&mut auth, &format!("203.0.113.{}", n + 1), &phone).await {
            Ok(()) => {}
            Err(status) => refused.push(limit_of(&status)),
        }
    }
    assert_eq!(stack.sms.messages().await.len(), 5, "exactly the budget");
    assert_eq!(refused.len(), 25);
    assert!(
        refused.iter().all(|r| r == "SMS_PREFIX_BUDGET"),
        "{refused:?}"
    );
    // The next block is not affected.
    send(&mut auth, "203.0.113.200", "+79605560000")
        .await
        .unwrap();
    assert_eq!(sms_to(&stack, "+79605560000").await, 1);
}

#[tokio::test]
async fn a_region_whose_codes_are_never_verified_is_suspended() {
    let stack = stack(&[
        ("SMS_FRAUD_GUARD", "enforce"),
        ("SMS_FRAUD_MIN_SENDS", "5"),
        ("SMS_FRAUD_MIN_CONVERSION", "0.5"),
    ])
    .await;
    let mut auth = stack.auth_client().await;
    // RU: six people sign in, every code is verified; the region is never suspended.
    for n in 0..6 {
        let phone = format!("+7960100{n:04}");
        let client = format!("198.51.100.{}", n + 1);
        send(&mut auth, &client, &phone).await.unwrap();
        let code = stack.sms.latest_code(&phone).await.unwrap();
        verify(&mut auth, &client, &phone, &code).await.unwrap();
    }
    // KZ: five codes nobody types in; the fifth trips the guard.
    for n in 1..=5 {
        send(
            &mut auth,
            &format!("203.0.113.{n}"),
            &format!("+7701123000{n}"),
        )
        .await
        .unwrap();
    }
    let status = send(&mut auth, "203.0.113.6", "+77011240006")
        .await
        .unwrap_err();
    assert_eq!(limit_of(&status), "SMS_FRAUD_SUSPECTED");
    let retry = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!((3590..=3600).contains(&retry.as_secs()), "{retry:?}");
    assert_eq!(sms_to(&stack, "+77011240006").await, 0);
    // Other regions still work.
    let phone = "+79601007777";
    send(&mut auth, "198.51.100.77", phone).await.unwrap();
    let code = stack.sms.latest_code(phone).await.unwrap();
    verify(&mut auth, "198.51.100.77", phone, &code)
        .await
        .unwrap();

    let metrics = Stack::metrics(stack.auth_metrics).await;
    let tripped: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("refsys_sms_fraud_suspected_total{"))
        .collect();
    assert_eq!(tripped.len(), 1, "{tripped:?}");
    assert!(
        tripped[0].contains(r#"region="KZ""#)
            && tripped[0].contains(r#"mode="enforce""#)
            && tripped[0].ends_with(" 1"),
        "{tripped:?}"
    );
    assert!(stack.auth.logs().contains("SMS fraud suspected"));
}

#[tokio::test]
async fn one_address_guessing_across_phones_is_stopped_and_the_owners_still_sign_in() {
    let stack = stack(&[("OTP_MAX_FAILED_PER_CLIENT_PER_HOUR", "5")]).await;
    let mut auth = stack.auth_client().await;
    let owners: Vec<(String, String)> = (0..10)
        .map(|n| (format!("+7960777{n:04}"), format!("198.51.100.{}", n + 1)))
        .collect();
    let mut codes = Vec::new();
    for (phone, owner) in &owners {
        send(&mut auth, owner, phone).await.unwrap();
        codes.push(stack.sms.latest_code(phone).await.unwrap());
    }

    // One guess per phone from one address. The last one even is the right code: once the
    // address is locked out, nothing it sends is checked.
    let attacker = "203.0.113.66";
    let mut answers = Vec::new();
    for (n, ((phone, _), code)) in owners.iter().zip(&codes).enumerate() {
        let guess = if n == 9 { code.clone() } else { wrong(code) };
        let status = verify(&mut auth, attacker, phone, &guess)
            .await
            .unwrap_err();
        answers.push(match status.code() {
            Code::Unauthenticated => "UNAUTHENTICATED".to_owned(),
            _ => limit_of(&status),
        });
    }
    let mut expected = vec!["UNAUTHENTICATED"; 5];
    expected.extend(["CLIENT_FAILURE_LIMIT"; 5]);
    assert_eq!(answers, expected);

    for ((phone, owner), code) in owners.iter().zip(&codes) {
        let signed_in = verify(&mut auth, owner, phone, code)
            .await
            .unwrap_or_else(|status| panic!("the owner of {phone}: {status:?}"));
        assert!(signed_in.new_user);
    }
}

#[tokio::test]
async fn an_attacker_cannot_lock_the_owner_out_of_their_phone() {
    let stack = stack(&[("OTP_MAX_FAILED_PER_PHONE_PER_CLIENT_PER_DAY", "3")]).await;
    let mut auth = stack.auth_client().await;
    let (phone, owner, attacker) = ("+79601233017", "198.51.100.1", "203.0.113.66");
    send(&mut auth, owner, phone).await.unwrap();
    let code = stack.sms.latest_code(phone).await.unwrap();
    for _ in 0..3 {
        let status = verify(&mut auth, attacker, phone, &wrong(&code))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    for guess in [wrong(&code), code.clone()] {
        let status = verify(&mut auth, attacker, phone, &guess)
            .await
            .unwrap_err();
        assert_eq!(limit_of(&status), "PHONE_CLIENT_FAILURE_LIMIT");
    }
    let signed_in = verify(&mut auth, owner, phone, &code).await.unwrap();
    assert!(signed_in.new_user);
}

#[tokio::test]
async fn a_test_number_signs_in_with_its_fixed_code_and_gets_no_sms() {
    let stack = stack(&[("TEST_PHONE_NUMBERS", "+79990000001=4321")]).await;
    let mut auth = stack.auth_client().await;
    let phone = "+79990000001";
    for _ in 0..2 {
        send(&mut auth, "198.51.100.1", "+7 999 000-00-01")
            .await
            .unwrap();
    }
    let first = verify(&mut auth, "198.51.100.1", phone, "4321")
        .await
        .unwrap();
    let second = verify(&mut auth, "198.51.100.1", phone, "4321")
        .await
        .unwrap();
    assert!(first.new_user && !second.new_user);
    assert_eq!(first.user_id, second.user_id);
    assert!(stack.sms.messages().await.is_empty(), "no SMS at all");

    let logs = stack.auth.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("+7999***0001")),
        "a WARN names the masked test number:\n{logs}"
    );
    assert!(!logs.contains("79990000001"), "the full number was logged");
    let metrics = Stack::metrics(stack.auth_metrics).await;
    for rpc in ["SendCode", "VerifyCode"] {
        let line = format!(r#"refsys_test_number_uses_total{{rpc="{rpc}"}} 2"#);
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn a_tokelau_number_signs_in() {
    let stack = stack(&[]).await;
    let signed_in = stack.sign_in("+690 7290", None).await;
    assert!(signed_in.new_user);
    let profile = stack
        .referral_client()
        .await
        .get_profile(bearer(GetProfileRequest {}, &signed_in.access_token))
        .await
        .expect("GetProfile")
        .into_inner()
        .profile
        .expect("profile");
    assert_eq!(profile.phone_number, "+6907290");
}
