//! The programme's rules as pure functions: no I/O, so each is tested on its own.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};

use crate::domain::UserId;
use crate::error::ReferralError;

/// Who may activate whose code.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    pub id: UserId,
    pub created_at: DateTime<Utc>,
    pub already_invited: bool,
}

/// Whether `invitee` may activate `inviter`'s code: not twice, not their own, and only the code
/// of someone who joined earlier, which makes invite cycles impossible.
pub fn check_activation(invitee: &Member, inviter: &Member) -> Result<(), ReferralError> {
    if invitee.already_invited {
        return Err(ReferralError::AlreadyActivated);
    }
    if invitee.id == inviter.id {
        return Err(ReferralError::OwnCode);
    }
    if (inviter.created_at, inviter.id) >= (invitee.created_at, invitee.id) {
        return Err(ReferralError::InviterJoinedLater);
    }
    Ok(())
}

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 500;
/// Invitees shown inline in a profile.
pub const PROFILE_INVITEES: i64 = 100;

/// 0 means the default; larger than the maximum is capped; negative is an error.
pub fn page_size(requested: i32) -> Result<i64, ReferralError> {
    match i64::from(requested) {
        n if n < 0 => Err(ReferralError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// The error for a page token that this list did not hand out.
pub fn foreign_page_token() -> ReferralError {
    ReferralError::invalid("page_token", "not a page token from this list")
}

/// Longer tokens are refused before decoding, so a huge one costs nothing; the longest the
/// server hands out (a time-and-user cursor) is under 80 characters.
const MAX_PAGE_TOKEN_LEN: usize = 256;

/// 9999-12-31T23:59:59.999999Z in microseconds: the latest time a cursor may hold.
const LATEST_CURSOR_MICROS: i64 = 253_402_300_799_999_999;

/// A position in a keyset-paginated list, opaque to callers.
///
/// Tokens are positions, not capabilities, so they are bounded rather than signed: every list
/// query is already scoped to rows the caller may read (their own invitees and ledger, or every
/// user for an admin), so a forged token can only move to another place in that same list.
/// Signing (an HMAC) would add a key to manage and rotate and protect nothing more. What decoding
/// must guarantee instead is that a token holds only values the server could have handed out —
/// times from the Unix epoch to the end of year 9999 (well inside Postgres' timestamptz range),
/// ledger entry ids from 1, any user id — so a crafted one is INVALID_ARGUMENT here rather than a
/// query Postgres refuses, which would surface as INTERNAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// After this (time, user) pair.
    TimeAndUser(DateTime<Utc>, UserId),
    /// After this user (ordered by id).
    User(UserId),
    /// After this ledger entry (newest first, so: below it).
    Entry(i64),
}

impl Cursor {
    pub fn encode(&self) -> String {
        let plain = match self {
            Self::TimeAndUser(at, id) => format!("t:{}:{}", at.timestamp_micros(), id),
            Self::User(id) => format!("u:{id}"),
            Self::Entry(id) => format!("e:{id}"),
        };
        URL_SAFE_NO_PAD.encode(plain)
    }

    /// `None` for an empty token (the first page).
    pub fn decode(token: &str) -> Result<Option<Self>, ReferralError> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = foreign_page_token;
        if token.len() > MAX_PAGE_TOKEN_LEN {
            return Err(invalid());
        }
        let plain = URL_SAFE_NO_PAD
            .decode(token.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(invalid)?;
        let cursor = match plain.split(':').collect::<Vec<_>>().as_slice() {
            ["t", micros, id] => {
                let at = micros
                    .parse()
                    .ok()
                    .filter(|micros| (0..=LATEST_CURSOR_MICROS).contains(micros))
                    .and_then(DateTime::from_timestamp_micros)
                    .ok_or_else(invalid)?;
                Self::TimeAndUser(at, UserId::parse(id, "page_token").map_err(|_| invalid())?)
            }
            ["u", id] => Self::User(UserId::parse(id, "page_token").map_err(|_| invalid())?),
            ["e", id] => Self::Entry(id.parse().ok().filter(|id| *id >= 1).ok_or_else(invalid)?),
            _ => return Err(invalid()),
        };
        Ok(Some(cursor))
    }
}

/// The fields of a profile a user may change through UpdateProfile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileField {
    FirstName,
    LastName,
    Email,
    ActivatedInviteCode,
}

/// The field mask of UpdateProfile, checked: known paths only, at least one, no duplicates.
pub fn profile_mask(paths: &[String]) -> Result<Vec<ProfileField>, ReferralError> {
    if paths.is_empty() {
        return Err(ReferralError::invalid(
            "update_mask",
            "name the fields to change: first_name, last_name, email, activated_invite_code",
        ));
    }
    let mut fields = Vec::with_capacity(paths.len());
    for path in paths {
        let field = match path.trim() {
            "first_name" => ProfileField::FirstName,
            "last_name" => ProfileField::LastName,
            "email" => ProfileField::Email,
            "activated_invite_code" => ProfileField::ActivatedInviteCode,
            other => {
                return Err(ReferralError::invalid(
                    "update_mask",
                    format!(
                        "{other:?} cannot be changed; allowed: first_name, last_name, email, activated_invite_code"
                    ),
                ));
            }
        };
        if !fields.contains(&field) {
            fields.push(field);
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(n: u128, minute: i64, invited: bool) -> Member {
        Member {
            id: UserId(uuid::Uuid::from_u128(n)),
            created_at: DateTime::from_timestamp(minute * 60, 0).unwrap(),
            already_invited: invited,
        }
    }

    #[test]
    fn activation_rules() {
        let early = member(1, 1, false);
        let late = member(2, 2, false);
        assert_eq!(check_activation(&late, &early), Ok(()));
        assert_eq!(
            check_activation(&early, &late),
            Err(ReferralError::InviterJoinedLater)
        );
        assert_eq!(
            check_activation(&early, &early),
            Err(ReferralError::OwnCode)
        );
        assert_eq!(
            check_activation(&member(2, 2, true), &early),
            Err(ReferralError::AlreadyActivated)
        );
        // Same instant: the id decides, so exactly one direction is allowed.
        let (a, b) = (member(3, 5, false), member(4, 5, false));
        assert!(check_activation(&b, &a).is_ok());
        assert!(check_activation(&a, &b).is_err());
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0), Ok(50));
        assert_eq!(page_size(7), Ok(7));
        assert_eq!(page_size(i32::MAX), Ok(500));
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_invalid() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = UserId(uuid::Uuid::from_u128(42));
        for cursor in [
            Cursor::TimeAndUser(at, id),
            Cursor::User(id),
            Cursor::Entry(99),
        ] {
            assert_eq!(Cursor::decode(&cursor.encode()), Ok(Some(cursor)));
        }
        assert_eq!(Cursor::decode(""), Ok(None));
        for bad in [
            "!!",
            "eDox",
            &URL_SAFE_NO_PAD.encode("t:abc:def"),
            &URL_SAFE_NO_PAD.encode("e:x"),
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cursor_times_stay_between_the_epoch_and_year_9999() {
        let end_of_9999 = chrono::NaiveDate::from_ymd_opt(9999, 12, 31)
            .and_then(|day| day.and_hms_micro_opt(23, 59, 59, 999_999))
            .unwrap()
            .and_utc();
        assert_eq!(end_of_9999.timestamp_micros(), LATEST_CURSOR_MICROS);
        let id = "00000000-0000-0000-0000-00000000002a";
        let token = |micros: &str| URL_SAFE_NO_PAD.encode(format!("t:{micros}:{id}"));
        for fine in ["0", "1700000000123456", &LATEST_CURSOR_MICROS.to_string()] {
            assert!(
                matches!(
                    Cursor::decode(&token(fine)),
                    Ok(Some(Cursor::TimeAndUser(..)))
                ),
                "{fine} refused"
            );
        }
        // Year -100000: within chrono's range but not Postgres', so it used to reach the query.
        let ancient = -3_217_862_419_200_000_000;
        assert!(DateTime::from_timestamp_micros(ancient).is_some());
        for bad in [
            "-1",
            &ancient.to_string(),
            "-9223372036854775807",
            &i64::MIN.to_string(),
            &(LATEST_CURSOR_MICROS + 1).to_string(),
            &i64::MAX.to_string(),
            "9223372036854775808",
        ] {
            assert_eq!(
                Cursor::decode(&token(bad)),
                Err(foreign_page_token()),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn cursor_entry_ids_are_positive() {
        let entry = |id: &str| Cursor::decode(&URL_SAFE_NO_PAD.encode(format!("e:{id}")));
        assert_eq!(entry("1"), Ok(Some(Cursor::Entry(1))));
        assert_eq!(
            entry(&i64::MAX.to_string()),
            Ok(Some(Cursor::Entry(i64::MAX)))
        );
        for bad in ["0", "-1", &i64::MIN.to_string(), "9223372036854775808"] {
            assert_eq!(entry(bad), Err(foreign_page_token()), "{bad} accepted");
        }
    }

    #[test]
    fn cursor_user_ids_may_be_any_uuid() {
        for id in [uuid::Uuid::nil(), uuid::Uuid::max(), uuid::Uuid::now_v7()] {
            let cursor = Cursor::User(UserId(id));
            assert_eq!(Cursor::decode(&cursor.encode()), Ok(Some(cursor)));
        }
    }

    #[test]
    fn oversized_page_tokens_are_refused_before_decoding() {
        let id = UserId(uuid::Uuid::from_u128(42));
        let at = DateTime::from_timestamp_micros(LATEST_CURSOR_MICROS).unwrap();
        let longest = Cursor::TimeAndUser(at, id).encode();
        assert!(longest.len() < 80, "{} characters", longest.len());
        // Valid base64 of a valid cursor, padded with spaces that decoding would trim: only the
        // length check refuses it.
        let padded = format!("{longest}{}", " ".repeat(MAX_PAGE_TOKEN_LEN));
        assert_eq!(Cursor::decode(&padded), Err(foreign_page_token()));
        assert_eq!(
            Cursor::decode(&"A".repeat(60 * 1024)),
            Err(foreign_page_token())
        );
    }

    #[test]
    fn masks() {
        let paths = |p: &[&str]| p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            profile_mask(&paths(&["first_name", "email", "email"])),
            Ok(vec![ProfileField::FirstName, ProfileField::Email])
        );
        assert!(profile_mask(&[]).is_err());
        for bad in ["phone_number", "bonus_points", "invite_code", "user_id", ""] {
            assert!(profile_mask(&paths(&[bad])).is_err(), "{bad:?} accepted");
        }
    }
}
