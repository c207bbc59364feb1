//! The token checks in front of each service, through a real gRPC server on a free port with
//! `referral_service::routes` (the same wiring `serve` uses), keys installed locally instead of
//! fetched from auth-service.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use referral_service::storage::Repository;
use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::admin_service_client::AdminServiceClient;
use refsys_proto::referral::v1::referral_service_client::ReferralServiceClient;
use refsys_proto::referral::v1::user_directory_client::UserDirectoryClient;
use service_kit::authn::Authenticator;
use service_kit::tokens::{ADMIN_ROLE, Claims};
use service_kit::tokens::{
    DELETE_USER_SCOPE, ENSURE_USER_SCOPE, KeySet, LOOKUP_USER_SCOPE, REFERRAL_SERVICE_AUDIENCE,
    SigningKey, Verifier,
};
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::Channel;

use crate::{BONUSES, pepper, phone, users};

const ISSUER: &str = "refsys-auth";
const USER_AUDIENCE: &str = "refsys";

pub(crate) struct Server {
    pub(crate) channel: Channel,
    pub(crate) key: SigningKey,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn start(pool: &PgPool) -> Server {
    let key = SigningKey::generate();
    let verifier = Arc::new(Verifier::new(
        ISSUER,
        &[USER_AUDIENCE, REFERRAL_SERVICE_AUDIENCE],
        KeySet::from_jwks([key.public_jwk()]),
    ));
    let authenticator = Arc::new(Authenticator::new(
        verifier,
        USER_AUDIENCE,
        REFERRAL_SERVICE_AUDIENCE,
        None,
    ));
    let (notifier, _listener) = referral_service::events::Notifier::spawn(pool.clone(), None);
    let routes = referral_service::routes(
        &Repository::new(pool.clone(), BONUSES, pepper()),
        authenticator,
        &notifier,
        None,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(incoming)
            .await;
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Server { channel, key, task }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn user_claims(sub: &str, roles: &[&str]) -> Claims {
    Claims {
        iss: ISSUER.into(),
        aud: USER_AUDIENCE.into(),
        sub: sub.into(),
        exp: now() + 300,
        iat: now(),
        jti: uuid::Uuid::now_v7().to_string(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        scope: None,
        sid: None,
    }
}

pub(crate) fn service_claims(scope: &str) -> Claims {
    Claims {
        aud: REFERRAL_SERVICE_AUDIENCE.into(),
        sub: "auth-service".into(),
        roles: Vec::new(),
        scope: Some(scope.into()),
        sid: None,
        ..user_claims("auth-service", &[])
    }
}

pub(crate) fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// `token` with its payload replaced by `claims` and the original signature kept.
fn tampered(token: &str, claims: &Claims) -> String {
    let mut parts = token.split('.');
    let (header, _, signature) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{payload}.{signature}")
}

/// An unsigned token (`alg: none`) naming the real key.
fn unsigned(kid: &str, claims: &Claims) -> String {
    let header = serde_json::json!({ "alg": "none", "typ": "at+jwt", "kid": kid });
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
    )
}

/// An HS256 token keyed with the public key: the classic algorithm-confusion forgery.
fn hs256_with_public_key(server: &Server, claims: &Claims) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(server.key.kid().to_owned());
    header.typ = Some("at+jwt".into());
    let secret = jsonwebtoken::EncodingKey::from_secret(server.key.public_jwk().x.as_bytes());
    jsonwebtoken::encode(&header, claims, &secret).unwrap()
}

#[sqlx::test]
async fn referral_service_needs_a_valid_user_token(pool: PgPool) {
    let repository = Repository::new(pool.clone(), BONUSES, pepper());
    let user = users(&repository, 1).await.remove(0);
    let server = start(&pool).await;
    let mut client = ReferralServiceClient::new(server.channel.clone());
    let claims = user_claims(&user.id.to_string(), &[]);
    let good = server.key.sign(&claims).unwrap();

    let profile = client
        .get_profile(with_token(pb::GetProfileRequest {}, &good))
        .await
        .expect("a valid user token")
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(profile.user_id, user.id.to_string());

    let status = client
        .get_profile(pb::GetProfileRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "no token");
    let mut basic = tonic::Request::new(pb::GetProfileRequest {});
    basic
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    assert_eq!(
        client.get_profile(basic).await.unwrap_err().code(),
        Code::Unauthenticated,
        "not a bearer token"
    );

    let expired = server
        .key
        .sign(&Claims {
            exp: now() - 600,
            iat: now() - 900,
            ..claims.clone()
        })
        .unwrap();
    let other_key = SigningKey::generate().sign(&claims).unwrap();
    let someone_else = tampered(&good, &user_claims(&uuid::Uuid::now_v7().to_string(), &[]));
    let wrong_issuer = server
        .key
        .sign(&Claims {
            iss: "someone-else".into(),
            ..claims.clone()
        })
        .unwrap();
    for (what, token) in [
        ("expired", expired),
        ("signed by another key", other_key),
        ("payload swapped under a valid signature", someone_else),
        ("alg none", unsigned(server.key.kid(), &claims)),
        (
            "HS256 keyed with the public key",
            hs256_with_public_key(&server, &claims),
        ),
        ("wrong issuer", wrong_issuer),
        ("garbage", "not.a.jwt".to_owned()),
    ] {
        let status = client
            .get_profile(with_token(pb::GetProfileRequest {}, &token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    }

    let service = server.key.sign(&service_claims(ENSURE_USER_SCOPE)).unwrap();
    let status = client
        .get_profile(with_token(pb::GetProfileRequest {}, &service))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "a service token");
}

#[sqlx::test]
async fn user_directory_needs_a_service_token_with_the_scope(pool: PgPool) {
    let repository = Repository::new(pool.clone(), BONUSES, pepper());
    let user = users(&repository, 1).await.remove(0);
    let server = start(&pool).await;
    let mut client = UserDirectoryClient::new(server.channel.clone());
    let request = || pb::EnsureUserRequest {
        phone_number: phone(42).e164().to_owned(),
        invite_code: None,
    };

    let user_token = server
        .key
        .sign(&user_claims(&user.id.to_string(), &[ADMIN_ROLE]))
        .unwrap();
    let wrong_scope = server.key.sign(&service_claims("referral.other")).unwrap();
    for (what, token) in [("user token", user_token), ("wrong scope", wrong_scope)] {
        let status = client
            .ensure_user(with_token(request(), &token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    }
    assert_eq!(
        client.ensure_user(request()).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let service = server.key.sign(&service_claims(ENSURE_USER_SCOPE)).unwrap();
    let ensured = client
        .ensure_user(with_token(request(), &service))
        .await
        .expect("a service token with the scope")
        .into_inner();
    assert!(ensured.created);
}

#[sqlx::test]
async fn admin_service_needs_the_admin_role(pool: PgPool) {
    let repository = Repository::new(pool.clone(), BONUSES, pepper());
    let all = users(&repository, 3).await;
    let server = start(&pool).await;
    let mut client = AdminServiceClient::new(server.channel.clone());
    let list = || pb::ListUsersRequest {
        page_size: 2,
        page_token: String::new(),
        filter: "+7960".into(),
    };

    let plain = server
        .key
        .sign(&user_claims(&all[0].id.to_string(), &[]))
        .unwrap();
    let status = client
        .list_users(with_token(list(), &plain))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Adding the role to a signed token breaks its signature.
    let escalated = tampered(&plain, &user_claims(&all[0].id.to_string(), &[ADMIN_ROLE]));
    let status = client
        .list_users(with_token(list(), &escalated))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let admin = server
        .key
        .sign(&user_claims(&all[0].id.to_string(), &[ADMIN_ROLE]))
        .unwrap();
    let first = client
        .list_users(with_token(list(), &admin))
        .await
        .expect("an admin token")
        .into_inner();
    assert_eq!(first.users.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = client
        .list_users(with_token(
            pb::ListUsersRequest {
                page_token: first.next_page_token.clone(),
                ..list()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.users.len(), 1);
    assert!(second.next_page_token.is_empty());
    let phones: Vec<_> = first
        .users
        .iter()
        .chain(&second.users)
        .map(|u| u.phone_number.clone())
        .collect();
    let expected: Vec<_> = all.iter().map(|u| u.phone_number.clone()).collect();
    assert_eq!(
        phones, expected,
        "earliest sign-up first, phone numbers included"
    );

    let full = client
        .get_user(with_token(
            pb::AdminServiceGetUserRequest {
                user_id: all[2].id.to_string(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(full.phone_number, all[2].phone_number);

    let service = server.key.sign(&service_claims(ENSURE_USER_SCOPE)).unwrap();
    let status = client
        .list_users(with_token(list(), &service))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// Calls one UserDirectory RPC by name with `token` (none when `None`).
async fn call_directory(
    client: &mut UserDirectoryClient<Channel>,
    method: &str,
    user_id: &str,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    fn authorized<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
        match token {
            Some(token) => with_token(message, token),
            None => tonic::Request::new(message),
        }
    }
    match method {
        "EnsureUser" => client
            .ensure_user(authorized(
                pb::EnsureUserRequest {
                    phone_number: phone(77).e164().to_owned(),
                    invite_code: None,
                },
                token,
            ))
            .await
            .map(drop),
        "LookupUser" => client
            .lookup_user(authorized(
                pb::LookupUserRequest {
                    user_id: user_id.to_owned(),
                },
                token,
            ))
            .await
            .map(drop),
        "DeleteUser" => client
            .delete_user(authorized(
                pb::DeleteUserRequest {
                    user_id: user_id.to_owned(),
                },
                token,
            ))
            .await
            .map(drop),
        other => panic!("no RPC {other}"),
    }
}

#[sqlx::test]
async fn each_user_directory_rpc_needs_its_own_scope(pool: PgPool) {
    let repository = Repository::new(pool.clone(), BONUSES, pepper());
    let all = users(&repository, 2).await;
    let server = start(&pool).await;
    let mut client = UserDirectoryClient::new(server.channel.clone());
    let rpcs = [
        ("EnsureUser", ENSURE_USER_SCOPE),
        ("LookupUser", LOOKUP_USER_SCOPE),
        ("DeleteUser", DELETE_USER_SCOPE),
    ];
    assert_eq!(
        referral_service::DIRECTORY_SCOPES,
        rpcs,
        "the scopes the proto documents"
    );
    // LookupUser reads all[0]; DeleteUser deletes all[1] once its scope is used.
    let target = |method: &str| {
        if method == "DeleteUser" {
            all[1].id.to_string()
        } else {
            all[0].id.to_string()
        }
    };
    let user_token = server
        .key
        .sign(&user_claims(&all[0].id.to_string(), &[ADMIN_ROLE]))
        .unwrap();
    for (method, needed) in rpcs {
        for (_, other) in rpcs.iter().filter(|(_, scope)| *scope != needed) {
            let token = server.key.sign(&service_claims(other)).unwrap();
            let status = call_directory(&mut client, method, &target(method), Some(&token))
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{method} with the scope {other}: {status:?}"
            );
        }
        for (what, token) in [
            (
                "a user token with the admin role",
                Some(user_token.as_str()),
            ),
            ("no token", None),
        ] {
            let status = call_directory(&mut client, method, &target(method), token)
                .await
                .unwrap_err();
            let expected = if token.is_some() {
                Code::PermissionDenied
            } else {
                Code::Unauthenticated
            };
            assert_eq!(status.code(), expected, "{method} with {what}");
        }
        let token = server.key.sign(&service_claims(needed)).unwrap();
        call_directory(&mut client, method, &target(method), Some(&token))
            .await
            .unwrap_or_else(|status| panic!("{method} with its scope {needed}: {status:?}"));
    }
    // Nothing happened on the refused calls: all[1] was deleted by the one allowed call only,
    // and a token may carry several scopes.
    let both = server
        .key
        .sign(&service_claims(&format!(
            "{LOOKUP_USER_SCOPE} {DELETE_USER_SCOPE}"
        )))
        .unwrap();
    let deleted = client
        .delete_user(with_token(
            pb::DeleteUserRequest {
                user_id: all[1].id.to_string(),
            },
            &both,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!deleted.deleted, "already deleted by the allowed call");
    let roles = client
        .lookup_user(with_token(
            pb::LookupUserRequest {
                user_id: all[0].id.to_string(),
            },
            &both,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(roles.user_id, all[0].id.to_string());
}

/// A user deleted while their access token is still valid: every ReferralService RPC with that
/// token answers NOT_FOUND, through the real server and token check.
#[sqlx::test]
async fn a_deleted_users_still_valid_token_is_not_found_on_every_rpc(pool: PgPool) {
    let repository = Repository::new(pool.clone(), BONUSES, pepper());
    let all = users(&repository, 2).await;
    let server = start(&pool).await;
    let mut client = ReferralServiceClient::new(server.channel.clone());
    let token = server
        .key
        .sign(&user_claims(&all[1].id.to_string(), &[]))
        .unwrap();
    client
        .get_profile(with_token(pb::GetProfileRequest {}, &token))
        .await
        .expect("alive");

    let delete = server.key.sign(&service_claims(DELETE_USER_SCOPE)).unwrap();
    let deleted = UserDirectoryClient::new(server.channel.clone())
        .delete_user(with_token(
            pb::DeleteUserRequest {
                user_id: all[1].id.to_string(),
            },
            &delete,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);

    let results = [
        (
            "GetProfile",
            client
                .get_profile(with_token(pb::GetProfileRequest {}, &token))
                .await
                .map(drop),
        ),
        (
            "UpdateProfile",
            client
                .update_profile(with_token(
                    pb::UpdateProfileRequest {
                        profile: Some(pb::Profile {
                            first_name: "Back".into(),
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["first_name".into()],
                        }),
                    },
                    &token,
                ))
                .await
                .map(drop),
        ),
        (
            "ActivateInviteCode",
            client
                .activate_invite_code(with_token(
                    pb::ActivateInviteCodeRequest {
                        invite_code: all[0].invite_code.clone(),
                    },
                    &token,
                ))
                .await
                .map(drop),
        ),
        (
            "ListInvitees",
            client
                .list_invitees(with_token(pb::ListInviteesRequest::default(), &token))
                .await
                .map(drop),
        ),
        (
            "ListBonusTransactions",
            client
                .list_bonus_transactions(with_token(
                    pb::ListBonusTransactionsRequest::default(),
                    &token,
                ))
                .await
                .map(drop),
        ),
        (
            "GetUser of the deleted user themself",
            client
                .get_user(with_token(
                    pb::GetUserRequest {
                        user_id: all[1].id.to_string(),
                    },
                    &token,
                ))
                .await
                .map(drop),
        ),
    ];
    for (rpc, result) in results {
        assert_eq!(
            result.map_err(|status| status.code()),
            Err(Code::NotFound),
            "{rpc}"
        );
    }
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM bonus_ledger")
            .fetch_one(&pool)
            .await
            .unwrap(),
        0,
        "the activation wrote nothing"
    );
}
