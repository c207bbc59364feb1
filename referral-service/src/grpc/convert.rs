//! Storage records → proto messages.

use chrono::{DateTime, Utc};
use refsys_proto::referral::v1 as pb;

use crate::domain::mask_e164;
use crate::error::ReferralError;
use crate::storage::{InviteOutcome, InviteeRecord, LedgerEntry, Page, UserRecord};

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// An invitee as their inviter (or an admin) sees them: the number masked, so whoever posts a
/// code never collects the full numbers of the people who use it; empty for a deleted invitee.
pub fn invitee(record: InviteeRecord) -> pb::Invitee {
    pb::Invitee {
        user_id: record.id.to_string(),
        phone_number: mask_e164(&record.phone_number),
        activated_at: Some(timestamp(record.activated_at)),
    }
}

pub fn profile(user: UserRecord, invitees: Vec<InviteeRecord>) -> pb::Profile {
    pb::Profile {
        user_id: user.id.to_string(),
        phone_number: user.phone_number,
        invite_code: user.invite_code,
        activated_invite_code: user.activated_invite_code.unwrap_or_default(),
        first_name: user.first_name,
        last_name: user.last_name,
        email: user.email,
        bonus_points: user.bonus_points,
        invitees: invitees.into_iter().map(invitee).collect(),
        invitees_count: user.invitees_count,
        created_at: Some(timestamp(user.created_at)),
        roles: user.roles,
        invited_by_user_id: user.invited_by.map(|id| id.to_string()).unwrap_or_default(),
        invite_activated_at: user.invite_activated_at.map(timestamp),
    }
}

pub fn public_user(user: UserRecord) -> pb::User {
    pb::User {
        user_id: user.id.to_string(),
        first_name: user.first_name,
        last_name: user.last_name,
        invite_code: user.invite_code,
        created_at: Some(timestamp(user.created_at)),
    }
}

pub fn transaction(entry: LedgerEntry) -> pb::BonusTransaction {
    let reason = match entry.reason.as_str() {
        "invite_code_activated" => pb::BonusReason::InviteCodeActivated,
        "invitee_joined" => pb::BonusReason::InviteeJoined,
        "redeemed" => pb::BonusReason::Redeemed,
        "granted" => pb::BonusReason::Granted,
        _ => pb::BonusReason::Unspecified,
    };
    pb::BonusTransaction {
        transaction_id: entry.id.to_string(),
        amount: entry.amount,
        reason: reason.into(),
        counterpart_user_id: entry
            .counterpart_user_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        created_at: Some(timestamp(entry.created_at)),
        // Activation entries have neither; redemptions and grants both.
        note: entry.note.unwrap_or_default(),
        requested_by: entry.requested_by.unwrap_or_default(),
    }
}

pub fn next_token<T>(page: &Page<T>) -> String {
    page.next
        .as_ref()
        .map(|cursor| cursor.encode())
        .unwrap_or_default()
}

pub fn invite_outcome(outcome: &InviteOutcome) -> pb::InviteCodeOutcome {
    match outcome {
        InviteOutcome::NotProvided => pb::InviteCodeOutcome::NotProvided,
        InviteOutcome::Applied => pb::InviteCodeOutcome::Applied,
        InviteOutcome::Refused(refusal) => match refusal {
            ReferralError::InvalidArgument { .. } => pb::InviteCodeOutcome::Invalid,
            ReferralError::NotFound(_) => pb::InviteCodeOutcome::NotFound,
            ReferralError::AlreadyActivated => pb::InviteCodeOutcome::AlreadyActivated,
            ReferralError::OwnCode => pb::InviteCodeOutcome::OwnCode,
            ReferralError::InviterJoinedLater => pb::InviteCodeOutcome::InviterJoinedLater,
            // Never a refusal of an invite code (activate_at_sign_in returns these as errors).
            ReferralError::CursorExpired
            | ReferralError::InsufficientPoints { .. }
            | ReferralError::IdempotencyKeyReused
            | ReferralError::Unavailable(_)
            | ReferralError::Internal(_) => pb::InviteCodeOutcome::Unspecified,
        },
    }
}
