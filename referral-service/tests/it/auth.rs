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
    ENSURE_USER_SCOPE, KeySet, REFERRAL_SERVICE_AUDIENCE, SigningKey, Verifier,
};
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::Channel;

use crate::{BONUSES, phone, users};

const ISSUER: &str = "refsys-auth";
const USER_AUDIENCE: &str = "refsys";

struct Server {
    channel: Channel,
    key: SigningKey,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(pool: &PgPool) -> Server {
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
    let routes = referral_service::routes(&Repository::new(pool.clone(), BONUSES), authenticator);
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

fn user_claims(sub: &str, roles: &[&str]) -> Claims {
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

fn service_claims(scope: &str) -> Claims {
    Claims {
        aud: REFERRAL_SERVICE_AUDIENCE.into(),
        sub: "auth-service".into(),
        roles: Vec::new(),
        scope: Some(scope.into()),
        sid: None,
        ..user_claims("auth-service", &[])
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
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
    let repository = Repository::new(pool.clone(), BONUSES);
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
    let repository = Repository::new(pool.clone(), BONUSES);
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
    let repository = Repository::new(pool.clone(), BONUSES);
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
