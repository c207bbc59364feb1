//! Every RPC, fed junk: a clear status, never a crash or INTERNAL, and the service still serves.

use e2e_tests::{Stack, raw};
use refsys_proto::referral::v1::GetProfileRequest;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const AUTH_RPCS: &[&str] = &[
    "/refsys.auth.v1.AuthService/SendCode",
    "/refsys.auth.v1.AuthService/VerifyCode",
    "/refsys.auth.v1.AuthService/RefreshTokens",
    "/refsys.auth.v1.AuthService/RevokeToken",
    "/refsys.auth.v1.AuthService/IntrospectToken",
    "/refsys.auth.v1.AuthService/GetJwks",
];
const REFERRAL_RPCS: &[&str] = &[
    "/refsys.referral.v1.ReferralService/GetProfile",
    "/refsys.referral.v1.ReferralService/UpdateProfile",
    "/refsys.referral.v1.ReferralService/ActivateInviteCode",
    "/refsys.referral.v1.ReferralService/ListInvitees",
    "/refsys.referral.v1.ReferralService/ListBonusTransactions",
    "/refsys.referral.v1.ReferralService/GetUser",
    "/refsys.referral.v1.UserDirectory/EnsureUser",
    "/refsys.referral.v1.AdminService/ListUsers",
    "/refsys.referral.v1.AdminService/GetUser",
];

/// Protobuf bytes of field 1 as a length-delimited value.
fn field1_bytes(value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x0a];
    let mut len = value.len();
    while len >= 0x80 {
        out.push((len as u8) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(value);
    out
}

fn battery() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("garbage", vec![0xff; 32]),
        ("truncated", vec![0x0a, 0x40, b'x']),
        // Field 1 as a varint where most RPCs expect a string or message.
        ("wrong wire type", vec![0x08, 0x96, 0x01]),
        // Field 99, unknown to every request: ignored, as proto3 says.
        ("unknown field", vec![0x98, 0x06, 0x01]),
        ("control characters", field1_bytes(b"\x00\x01\x02+7960\x7f")),
        ("invalid utf-8", field1_bytes(&[0xc3, 0x28, 0xa0, 0xa1])),
        ("long string", field1_bytes(&[b'9'; 4000])),
        // page_size = -1 (varint of a negative int32 is 10 bytes).
        (
            "negative page size",
            vec![
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
        // page_size = i32::MAX.
        ("huge page size", vec![0x08, 0xff, 0xff, 0xff, 0xff, 0x07]),
    ]
}

fn assert_clear(path: &str, case: &str, result: &Result<Vec<u8>, tonic::Status>) {
    if let Err(status) = result {
        assert!(
            !matches!(
                status.code(),
                Code::Internal
                    | Code::Unknown
                    | Code::Unavailable
                    | Code::Cancelled
                    | Code::DeadlineExceeded
            ),
            "{path} with {case}: {status:?}"
        );
        assert!(
            !status.message().is_empty(),
            "{path} with {case}: empty message"
        );
    }
}

#[tokio::test]
async fn every_rpc_answers_junk_with_a_clear_status_and_keeps_serving() {
    let stack = Stack::start().await;
    let user = stack.sign_in("+79601230000", None).await;
    let auth = Stack::channel(&stack.auth).await;
    let referral = Stack::channel(&stack.referral).await;

    for (case, body) in battery() {
        for path in AUTH_RPCS {
            let result = raw::call(auth.clone(), path, body.clone(), None).await;
            assert_clear(path, case, &result);
        }
        for path in REFERRAL_RPCS {
            let result = raw::call(
                referral.clone(),
                path,
                body.clone(),
                Some(&user.access_token),
            )
            .await;
            assert_clear(path, case, &result);
        }
    }

    // Specific answers where the contract names one.
    let oversized = field1_bytes(&vec![b'1'; 70 * 1024]);
    for (channel, path) in [
        (auth.clone(), "/refsys.auth.v1.AuthService/SendCode"),
        (
            referral.clone(),
            "/refsys.referral.v1.ReferralService/ActivateInviteCode",
        ),
    ] {
        let status = raw::call(channel, path, oversized.clone(), Some(&user.access_token))
            .await
            .expect_err("a message over 64 KiB is refused");
        assert!(
            matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
            "{path}: {status:?}"
        );
    }
    let negative = battery()
        .into_iter()
        .find(|(c, _)| *c == "negative page size")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let status = raw::call(
        referral.clone(),
        "/refsys.referral.v1.ReferralService/ListInvitees",
        negative,
        Some(&user.access_token),
    )
    .await
    .expect_err("a negative page size is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = raw::call(
        auth.clone(),
        "/refsys.auth.v1.AuthService/SendCode",
        vec![0xff; 32],
        None,
    )
    .await
    .expect_err("garbage is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = raw::call(
        auth.clone(),
        "/refsys.auth.v1.AuthService/SendCode",
        field1_bytes(b"+7 960 abc"),
        None,
    )
    .await
    .expect_err("letters in a phone are refused");
    assert_eq!(status.code(), Code::InvalidArgument);

    // Both still serve.
    assert_eq!(stack.auth.health("").await, Some(ServingStatus::Serving));
    assert_eq!(
        stack.referral.health("").await,
        Some(ServingStatus::Serving)
    );
    stack
        .referral_client()
        .await
        .get_profile(e2e_tests::stack::bearer(
            GetProfileRequest {},
            &user.access_token,
        ))
        .await
        .expect("referral-service still answers");
}
