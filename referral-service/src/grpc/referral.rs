//! `refsys.referral.v1.ReferralService`: what a signed-in user calls.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::referral_service_server::ReferralService;
use tonic::{Request, Response, Status};

use super::{caller_id, convert};
use crate::domain::{Email, InviteCode, PersonName, UserId};
use crate::profile_cache::ProfileCache;
use crate::rules::{self, Cursor, ProfileField};
use crate::storage::{ProfileChanges, Repository};

pub static ACTIVATIONS: LazyLock<service_kit::metrics::IntCounter> = LazyLock::new(|| {
    service_kit::metrics::counter(
        "refsys_invite_activations_total",
        "Invite codes activated (through the API or at sign-in).",
    )
});

/// GetProfile answers from the cache and from Postgres, resolved once: this is the hottest
/// path, and a labelled lookup per call would hash the label each time.
struct ProfileCacheLookups {
    hits: service_kit::metrics::IntCounter,
    misses: service_kit::metrics::IntCounter,
}

static PROFILE_CACHE: LazyLock<ProfileCacheLookups> = LazyLock::new(|| {
    let counter = service_kit::metrics::counter_vec(
        "refsys_profile_cache_lookups_total",
        "GetProfile answers by where they came from: the replica's profile cache (hit) or Postgres (miss).",
        &["result"],
    );
    ProfileCacheLookups {
        hits: counter.with_label_values(&["hit"]),
        misses: counter.with_label_values(&["miss"]),
    }
});

pub struct ReferralHandler {
    repository: Repository,
    profiles: Option<Arc<ProfileCache>>,
}

impl ReferralHandler {
    pub fn new(repository: Repository) -> Self {
        Self::with_profile_cache(repository, None)
    }

    /// Serves GetProfile through `profiles` when given (see [`ProfileCache`]).
    pub fn with_profile_cache(repository: Repository, profiles: Option<Arc<ProfileCache>>) -> Self {
        LazyLock::force(&ACTIVATIONS);
        if profiles.is_some() {
            LazyLock::force(&PROFILE_CACHE);
        }
        Self {
            repository,
            profiles,
        }
    }

    async fn profile(&self, id: UserId) -> Result<pb::Profile, Status> {
        let Some(profiles) = &self.profiles else {
            return self.read_profile(id).await;
        };
        let ticket = match profiles.get(id.0, Instant::now()) {
            Ok(profile) => {
                PROFILE_CACHE.hits.inc();
                return Ok(profile);
            }
            Err(ticket) => ticket,
        };
        PROFILE_CACHE.misses.inc();
        let profile = self.read_profile(id).await?;
        profiles.store(id.0, profile.clone(), ticket, Instant::now());
        Ok(profile)
    }

    async fn read_profile(&self, id: UserId) -> Result<pb::Profile, Status> {
        let (user, invitees) = self.repository.profile(id, rules::PROFILE_INVITEES).await?;
        Ok(convert::profile(user, invitees))
    }

    /// The caller changed their own profile: their next read on this replica must see it,
    /// without waiting for the database's notification.
    fn changed(&self, id: UserId) {
        if let Some(profiles) = &self.profiles {
            profiles.invalidate(id.0, Instant::now());
        }
    }

    async fn activate(&self, id: UserId, code: &str) -> Result<(), Status> {
        let code = InviteCode::parse(code)?;
        let activated = self.repository.activate(id, &code).await;
        self.changed(id);
        activated?;
        ACTIVATIONS.inc();
        Ok(())
    }
}

#[tonic::async_trait]
impl ReferralService for ReferralHandler {
    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let id = caller_id(&request)?;
        Ok(Response::new(pb::GetProfileResponse {
            profile: Some(self.profile(id).await?),
        }))
    }

    async fn update_profile(
        &self,
        request: Request<pb::UpdateProfileRequest>,
    ) -> Result<Response<pb::UpdateProfileResponse>, Status> {
        let id = caller_id(&request)?;
        let message = request.into_inner();
        let paths = message
            .update_mask
            .map(|mask| mask.paths)
            .unwrap_or_default();
        let fields = rules::profile_mask(&paths)?;
        let changes = message.profile.unwrap_or_default();
        let wants = |field| fields.contains(&field);
        // Validate everything before changing anything.
        let first_name = wants(ProfileField::FirstName)
            .then(|| PersonName::parse(&changes.first_name, "profile.first_name"))
            .transpose()?;
        let last_name = wants(ProfileField::LastName)
            .then(|| PersonName::parse(&changes.last_name, "profile.last_name"))
            .transpose()?;
        let email = wants(ProfileField::Email)
            .then(|| {
                Email::parse_optional(&changes.email).map_err(|err| err.in_field("profile.email"))
            })
            .transpose()?;
        let invite_code = wants(ProfileField::ActivatedInviteCode)
            .then(|| {
                InviteCode::parse(&changes.activated_invite_code)
                    .map_err(|err| err.in_field("profile.activated_invite_code"))
            })
            .transpose()?;
        let updated = self
            .repository
            .update_profile(
                id,
                &ProfileChanges {
                    first_name: first_name.as_ref().map(PersonName::as_str),
                    last_name: last_name.as_ref().map(PersonName::as_str),
                    // An empty e-mail field clears the address.
                    email: email
                        .as_ref()
                        .map(|email| email.as_ref().map_or("", Email::as_str)),
                    invite_code: invite_code.as_ref(),
                },
            )
            .await;
        self.changed(id);
        updated?;
        if invite_code.is_some() {
            ACTIVATIONS.inc();
        }
        Ok(Response::new(pb::UpdateProfileResponse {
            profile: Some(self.profile(id).await?),
        }))
    }

    async fn activate_invite_code(
        &self,
        request: Request<pb::ActivateInviteCodeRequest>,
    ) -> Result<Response<pb::ActivateInviteCodeResponse>, Status> {
        let id = caller_id(&request)?;
        self.activate(id, &request.get_ref().invite_code).await?;
        Ok(Response::new(pb::ActivateInviteCodeResponse {
            profile: Some(self.profile(id).await?),
        }))
    }

    async fn list_invitees(
        &self,
        request: Request<pb::ListInviteesRequest>,
    ) -> Result<Response<pb::ListInviteesResponse>, Status> {
        let id = caller_id(&request)?;
        let message = request.get_ref();
        let size = rules::page_size(message.page_size)?;
        let cursor = Cursor::decode(&message.page_token)?;
        let (page, user) = tokio::try_join!(
            self.repository.invitees(id, cursor.as_ref(), size),
            self.repository.user(id),
        )?;
        Ok(Response::new(pb::ListInviteesResponse {
            next_page_token: convert::next_token(&page),
            invitees: page.items.into_iter().map(convert::invitee).collect(),
            total_size: user.invitees_count,
        }))
    }

    async fn list_bonus_transactions(
        &self,
        request: Request<pb::ListBonusTransactionsRequest>,
    ) -> Result<Response<pb::ListBonusTransactionsResponse>, Status> {
        let id = caller_id(&request)?;
        let message = request.get_ref();
        let size = rules::page_size(message.page_size)?;
        let cursor = Cursor::decode(&message.page_token)?;
        let page = self.repository.ledger(id, cursor.as_ref(), size).await?;
        Ok(Response::new(pb::ListBonusTransactionsResponse {
            next_page_token: convert::next_token(&page),
            transactions: page.items.into_iter().map(convert::transaction).collect(),
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        caller_id(&request)?;
        let id = UserId::parse(&request.get_ref().user_id, "user_id")?;
        let user = self.repository.user(id).await?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(convert::public_user(user)),
        }))
    }
}
