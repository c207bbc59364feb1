//! Caller authentication for gRPC services: a tower layer that checks the bearer token of every
//! call against a [`Requirement`] before the handler runs, and a cache of auth-service's public
//! keys fetched through `AuthService.GetJwks`.
//!
//! Missing or bad token: UNAUTHENTICATED. A valid token of the wrong kind (a user token on an
//! internal RPC, a service token on a user RPC) or without the needed role: PERMISSION_DENIED.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use refsys_proto::auth::v1::GetJwksRequest;
use refsys_proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::Status;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tower::Service;

use crate::tokens::{ADMIN_ROLE, Claims, Jwk, KeySet, TokenError, Verifier};

/// What a service demands of its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// A user's access token.
    User,
    /// A user's access token with the `admin` role.
    Admin,
    /// A service token for this service's audience, carrying `scope`.
    Service { scope: &'static str },
    /// A service token for this service's audience, carrying the scope of the called method:
    /// `scopes` pairs gRPC method names ("LookupUser") with the scope each needs. A method
    /// missing from the list is refused to every caller (PERMISSION_DENIED), so a method added
    /// to the service later is closed until it is given a scope.
    ServicePerMethod {
        scopes: &'static [(&'static str, &'static str)],
    },
}

impl Requirement {
    /// The requirement of one call, given its gRPC path (`/package.Service/Method`): for
    /// [`Requirement::ServicePerMethod`], the listed method's `Service` scope; every other
    /// requirement is the same for all methods.
    pub fn for_path(self, path: &str) -> Self {
        match self {
            Self::ServicePerMethod { scopes } => {
                let method = path.rsplit('/').next().unwrap_or_default();
                scopes
                    .iter()
                    .find(|(name, _)| *name == method)
                    .map_or(self, |(_, scope)| Self::Service { scope })
            }
            other => other,
        }
    }
}

/// The verified caller, stored in the request's extensions for handlers.
#[derive(Debug, Clone)]
pub struct Caller {
    pub claims: Claims,
}

/// Checks bearer tokens. Holds the verifier and, when keys come from auth-service, the cache
/// that refreshes them.
pub struct Authenticator {
    verifier: Arc<Verifier>,
    user_audience: String,
    service_audience: String,
    remote: Option<Arc<RemoteJwks>>,
}

impl Authenticator {
    pub fn new(
        verifier: Arc<Verifier>,
        user_audience: &str,
        service_audience: &str,
        remote: Option<Arc<RemoteJwks>>,
    ) -> Self {
        Self {
            verifier,
            user_audience: user_audience.to_owned(),
            service_audience: service_audience.to_owned(),
            remote,
        }
    }

    /// The verified claims of the call's bearer token, if they meet `requirement`.
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        requirement: Requirement,
    ) -> Result<Claims, Status> {
        let token = bearer_token(headers)?;
        let verified = match self.verifier.verify(token) {
            Err(TokenError::UnknownKey(_)) if self.remote.is_some() => {
                // Keys may have rotated since the last fetch: refetch (rate-limited), retry once.
                if let Some(remote) = &self.remote {
                    remote.refresh_if_due().await;
                }
                if self.verifier.keys().is_empty() {
                    return Err(Status::unavailable(
                        "token signing keys are not available yet; retry shortly",
                    ));
                }
                self.verifier.verify(token)
            }
            other => other,
        }
        .map_err(|err| Status::unauthenticated(format!("invalid access token: {err}")))?;
        let claims = verified.claims;

        let is_user_token = claims.aud == self.user_audience && claims.scope.is_none();
        match requirement {
            Requirement::User if is_user_token => Ok(claims),
            Requirement::Admin if is_user_token && claims.has_role(ADMIN_ROLE) => Ok(claims),
            Requirement::Admin if is_user_token => {
                Err(Status::permission_denied("this RPC needs the admin role"))
            }
            Requirement::Service { scope }
                if claims.aud == self.service_audience && claims.has_scope(scope) =>
            {
                Ok(claims)
            }
            Requirement::Service { scope } => Err(Status::permission_denied(format!(
                "this RPC needs a service token with the scope {scope:?}"
            ))),
            // Not resolved to a method's scope by `for_path`: no scope admits the call.
            Requirement::ServicePerMethod { .. } => {
                Err(Status::permission_denied("no token may call this RPC"))
            }
            Requirement::User | Requirement::Admin => Err(Status::permission_denied(
                "this RPC needs a user access token",
            )),
        }
    }
}

fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Status> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Status::unauthenticated("missing \"authorization: Bearer <token>\""))?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization header"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(Status::unauthenticated(
            "authorization header must be \"Bearer <token>\"",
        )),
    }
}

/// A gRPC service that only runs for callers meeting a [`Requirement`].
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
    requirement: Requirement,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, authenticator: Arc<Authenticator>, requirement: Requirement) -> Self {
        Self {
            inner,
            authenticator,
            requirement,
        }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let authenticator = self.authenticator.clone();
        let requirement = self.requirement.for_path(request.uri().path());
        Box::pin(async move {
            match authenticator
                .authenticate(request.headers(), requirement)
                .await
            {
                Ok(claims) => {
                    request.extensions_mut().insert(Caller { claims });
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The claims of the authenticated caller of a request that passed [`Authenticated`].
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Claims, Status> {
    request
        .extensions()
        .get::<Caller>()
        .map(|caller| &caller.claims)
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// auth-service's public keys, fetched through `GetJwks`, installed into a [`Verifier`],
/// refreshed in the background and on demand when a token names an unknown key (at most once
/// per `min_refresh_interval`, so forged `kid`s cannot make us hammer auth-service).
pub struct RemoteJwks {
    client: AuthServiceClient<Channel>,
    verifier: Arc<Verifier>,
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    min_refresh_interval: Duration,
}

impl RemoteJwks {
    pub fn new(
        auth_url: &str,
        verifier: Arc<Verifier>,
        min_refresh_interval: Duration,
    ) -> Result<Arc<Self>, tonic::transport::Error> {
        let channel = Endpoint::from_shared(auth_url.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(3))
            .connect_lazy();
        Ok(Arc::new(Self {
            client: AuthServiceClient::new(channel),
            verifier,
            last_attempt: tokio::sync::Mutex::new(None),
            min_refresh_interval,
        }))
    }

    /// Fetches the keys now.
    pub async fn refresh(&self) -> Result<usize, Status> {
        let response = self
            .client
            .clone()
            .get_jwks(GetJwksRequest {})
            .await?
            .into_inner();
        let jwks: Vec<Jwk> = response.keys.into_iter().map(Jwk::from).collect();
        let keys = KeySet::from_jwks(&jwks);
        if keys.is_empty() {
            return Err(Status::unavailable("auth-service published no usable keys"));
        }
        self.verifier.replace_keys(keys);
        Ok(jwks.len())
    }

    /// Fetches the keys unless a fetch was tried within the minimum interval.
    pub async fn refresh_if_due(&self) {
        let mut last = self.last_attempt.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.min_refresh_interval) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(status) = self.refresh().await {
            tracing::warn!(code = ?status.code(), message = status.message(), "could not fetch auth-service keys");
        }
    }

    /// Keeps the keys fresh: fetches every `every`, and every few seconds while none are loaded.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let wait = match this.refresh().await {
                    Ok(count) => {
                        tracing::debug!(count, "auth-service keys refreshed");
                        every
                    }
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), message = status.message(), "could not fetch auth-service keys; retrying");
                        Duration::from_secs(2)
                    }
                };
                tokio::time::sleep(wait).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::{ENSURE_USER_SCOPE, REFERRAL_SERVICE_AUDIENCE, SigningKey};

    fn claims(aud: &str, roles: &[&str], scope: Option<&str>) -> Claims {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        Claims {
            iss: "iss".into(),
            aud: aud.into(),
            sub: "someone".into(),
            exp: now + 60,
            iat: now,
            jti: "j".into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            scope: scope.map(str::to_owned),
            sid: None,
        }
    }

    fn headers(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    async fn check(claims: Claims, requirement: Requirement) -> Result<Claims, tonic::Code> {
        let key = SigningKey::generate();
        let verifier = Arc::new(Verifier::new(
            "iss",
            &["refsys", REFERRAL_SERVICE_AUDIENCE],
            KeySet::from_jwks([key.public_jwk()]),
        ));
        let authenticator = Authenticator::new(verifier, "refsys", REFERRAL_SERVICE_AUDIENCE, None);
        let token = key.sign(&claims).unwrap();
        authenticator
            .authenticate(&headers(&token), requirement)
            .await
            .map_err(|status| status.code())
    }

    #[tokio::test]
    async fn each_requirement_admits_only_its_kind_of_token() {
        use tonic::Code::PermissionDenied;
        let user = claims("refsys", &[], None);
        let admin = claims("refsys", &["admin"], None);
        let service = claims(REFERRAL_SERVICE_AUDIENCE, &[], Some(ENSURE_USER_SCOPE));
        let ensure = Requirement::Service {
            scope: ENSURE_USER_SCOPE,
        };

        assert!(check(user.clone(), Requirement::User).await.is_ok());
        assert_eq!(
            check(user.clone(), Requirement::Admin).await.unwrap_err(),
            PermissionDenied
        );
        assert_eq!(check(user, ensure).await.unwrap_err(), PermissionDenied);
        assert!(check(admin.clone(), Requirement::Admin).await.is_ok());
        assert!(check(service.clone(), ensure).await.is_ok());
        assert_eq!(
            check(service.clone(), Requirement::User).await.unwrap_err(),
            PermissionDenied
        );
        let other_scope = claims(REFERRAL_SERVICE_AUDIENCE, &[], Some("something.else"));
        assert_eq!(
            check(other_scope, ensure).await.unwrap_err(),
            PermissionDenied
        );
    }

    #[tokio::test]
    async fn per_method_scopes_admit_each_method_only_its_own_scope() {
        use tonic::Code::PermissionDenied;
        const SCOPES: &[(&str, &str)] = &[("Read", "x.read"), ("Delete", "x.delete")];
        let per_method = Requirement::ServicePerMethod { scopes: SCOPES };
        let token = |scope: &str| claims(REFERRAL_SERVICE_AUDIENCE, &[], Some(scope));
        let read = per_method.for_path("/pkg.Directory/Read");
        let delete = per_method.for_path("/pkg.Directory/Delete");
        assert_eq!(read, Requirement::Service { scope: "x.read" });
        assert!(check(token("x.read"), read).await.is_ok());
        assert!(check(token("x.delete x.read"), read).await.is_ok());
        assert!(check(token("x.delete"), delete).await.is_ok());
        assert_eq!(
            check(token("x.read"), delete).await.unwrap_err(),
            PermissionDenied
        );
        assert_eq!(
            check(claims("refsys", &["admin"], None), read)
                .await
                .unwrap_err(),
            PermissionDenied,
            "a user token"
        );
        // A method without a scope is closed to every token.
        let unlisted = per_method.for_path("/pkg.Directory/Other");
        assert_eq!(unlisted, per_method);
        for scope in ["x.read", "x.delete", "x.read x.delete"] {
            assert_eq!(
                check(token(scope), unlisted).await.unwrap_err(),
                PermissionDenied
            );
        }
        // Other requirements do not depend on the method.
        assert_eq!(
            Requirement::User.for_path("/pkg.Directory/Read"),
            Requirement::User
        );
    }

    mod remote {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use refsys_proto::auth::v1 as pb;
        use refsys_proto::auth::v1::auth_service_server::{AuthService, AuthServiceServer};
        use tonic::{Request, Response, Status};

        use super::*;

        /// An auth-service that only publishes keys, and counts how often it is asked.
        struct KeysOnly {
            jwk: Jwk,
            fetches: Arc<AtomicUsize>,
        }

        #[tonic::async_trait]
        impl AuthService for KeysOnly {
            async fn send_code(
                &self,
                _: Request<pb::SendCodeRequest>,
            ) -> Result<Response<pb::SendCodeResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn verify_code(
                &self,
                _: Request<pb::VerifyCodeRequest>,
            ) -> Result<Response<pb::VerifyCodeResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn refresh_tokens(
                &self,
                _: Request<pb::RefreshTokensRequest>,
            ) -> Result<Response<pb::RefreshTokensResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn revoke_token(
                &self,
                _: Request<pb::RevokeTokenRequest>,
            ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn introspect_token(
                &self,
                _: Request<pb::IntrospectTokenRequest>,
            ) -> Result<Response<pb::IntrospectTokenResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn list_sessions(
                &self,
                _: Request<pb::ListSessionsRequest>,
            ) -> Result<Response<pb::ListSessionsResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn revoke_session(
                &self,
                _: Request<pb::RevokeSessionRequest>,
            ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn revoke_all_sessions(
                &self,
                _: Request<pb::RevokeAllSessionsRequest>,
            ) -> Result<Response<pb::RevokeAllSessionsResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn delete_account(
                &self,
                _: Request<pb::DeleteAccountRequest>,
            ) -> Result<Response<pb::DeleteAccountResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn issue_service_token(
                &self,
                _: Request<pb::IssueServiceTokenRequest>,
            ) -> Result<Response<pb::IssueServiceTokenResponse>, Status> {
                Err(Status::unimplemented("keys only"))
            }
            async fn get_jwks(
                &self,
                _: Request<pb::GetJwksRequest>,
            ) -> Result<Response<pb::GetJwksResponse>, Status> {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                let jwk = &self.jwk;
                Ok(Response::new(pb::GetJwksResponse {
                    keys: vec![pb::Jwk::from(jwk)],
                    jwks_json: Jwk::set_json(std::slice::from_ref(jwk)),
                }))
            }
        }

        #[tokio::test]
        async fn unknown_kids_refetch_the_keys_at_most_once_per_interval() {
            let key = SigningKey::generate();
            let fetches = Arc::new(AtomicUsize::new(0));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(AuthServiceServer::new(KeysOnly {
                        jwk: key.public_jwk().clone(),
                        fetches: fetches.clone(),
                    }))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            let verifier = Arc::new(Verifier::new("iss", &["refsys"], KeySet::default()));
            let remote = RemoteJwks::new(&url, verifier.clone(), Duration::from_secs(60)).unwrap();
            let authenticator = Authenticator::new(verifier, "refsys", "svc", Some(remote));

            // The first token's kid is unknown (no keys yet): one fetch, then it verifies.
            let token = key.sign(&claims("refsys", &[], None)).unwrap();
            assert!(
                authenticator
                    .authenticate(&headers(&token), Requirement::User)
                    .await
                    .is_ok()
            );
            assert_eq!(fetches.load(Ordering::SeqCst), 1);

            // Forged kids do not make it hammer auth-service: no refetch within the interval.
            let stranger = SigningKey::generate();
            for _ in 0..20 {
                let forged = stranger.sign(&claims("refsys", &[], None)).unwrap();
                let status = authenticator
                    .authenticate(&headers(&forged), Requirement::User)
                    .await
                    .unwrap_err();
                assert_eq!(status.code(), tonic::Code::Unauthenticated);
            }
            assert_eq!(fetches.load(Ordering::SeqCst), 1);
        }
    }

    #[test]
    fn missing_or_malformed_authorization_is_unauthenticated() {
        assert_eq!(
            bearer_token(&http::HeaderMap::new()).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut basic = http::HeaderMap::new();
        basic.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(
            bearer_token(&basic).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(bearer_token(&headers("t0k")).unwrap(), "t0k");
    }
}
