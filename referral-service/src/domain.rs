//! Domain values, each with one parsing constructor, so anything past the edge is valid.

use rand::{CryptoRng, Rng};

use crate::error::ReferralError;

/// Digits and uppercase letters without the look-alikes 0/O, 1/I/L.
pub const INVITE_ALPHABET: &[u8] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
pub const INVITE_CODE_LENGTH: usize = 6;

/// A user's invite code: 6 characters of [`INVITE_ALPHABET`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InviteCode(String);

impl InviteCode {
    /// Accepts what people type: surrounding spaces and lower case are fine.
    pub fn parse(input: &str) -> Result<Self, ReferralError> {
        let code = input.trim().to_ascii_uppercase();
        let valid =
            code.len() == INVITE_CODE_LENGTH && code.bytes().all(|b| INVITE_ALPHABET.contains(&b));
        if valid {
            Ok(Self(code))
        } else {
            Err(ReferralError::invalid(
                "invite_code",
                "an invite code is 6 characters from 23456789ABCDEFGHJKMNPQRSTUVWXYZ",
            ))
        }
    }

    /// A new random code from `rng`, which must be a cryptographically secure generator
    /// (`rand::rng()` in production), so codes cannot be predicted from earlier ones.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let code = (0..INVITE_CODE_LENGTH)
            .map(|_| char::from(INVITE_ALPHABET[rng.random_range(0..INVITE_ALPHABET.len())]))
            .collect();
        Self(code)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A phone number in E.164: the validator auth-service uses too, so a number it accepts is
/// never refused here.
pub use service_kit::phone::PhoneNumber;

impl From<service_kit::phone::PhoneError> for ReferralError {
    fn from(err: service_kit::phone::PhoneError) -> Self {
        ReferralError::invalid("phone_number", err.to_string())
    }
}

/// Masks a stored number for inviters' lists (the one implementation, in service-kit).
pub use service_kit::phone::mask_e164;

/// The secret keying the hashes of phone numbers kept after an account is deleted
/// (`PHONE_HASH_PEPPER_FILE`). Never printed; `Debug` shows only whether it is the
/// development pepper.
#[derive(Clone)]
pub struct PhonePepper {
    key: ring::hmac::Key,
    development: bool,
}

impl PhonePepper {
    /// The shortest pepper accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    /// Used when PHONE_HASH_PEPPER_FILE is unset. Fixed rather than random, so hashes keep
    /// matching across restarts and replicas; being public, it protects nothing.
    const DEVELOPMENT: &[u8] = b"refsys development phone-hash pepper: NOT A SECRET";

    /// A pepper from the file's contents (surrounding whitespace already trimmed); `None` when
    /// shorter than [`PhonePepper::MIN_LEN`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (bytes.len() >= Self::MIN_LEN).then(|| Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes),
            development: false,
        })
    }

    /// The fixed, public development pepper.
    pub fn development() -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, Self::DEVELOPMENT),
            development: true,
        }
    }

    pub fn is_development(&self) -> bool {
        self.development
    }

    /// HMAC-SHA256 of an E.164 number (as stored), domain-separated from any other use of the
    /// key. Phone numbers are few enough to enumerate, so the hash protects them only while the
    /// pepper stays secret.
    pub fn hash_e164(&self, e164: &str) -> [u8; 32] {
        let mut context = ring::hmac::Context::with_key(&self.key);
        context.update(b"refsys-rewarded-phone-v1\0");
        context.update(e164.as_bytes());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(context.sign().as_ref());
        hash
    }
}

impl std::fmt::Debug for PhonePepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.development {
            f.write_str("PhonePepper(<development>)")
        } else {
            f.write_str("PhonePepper(<redacted>)")
        }
    }
}

/// A prefix of E.164 numbers ("+7960"), for the admin filter: '+' and 1 to 15 ASCII digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhonePrefix(String);

impl PhonePrefix {
    pub fn parse(input: &str) -> Result<Option<Self>, ReferralError> {
        let input = input.trim();
        if input.is_empty() {
            return Ok(None);
        }
        // Storage makes this a LIKE pattern by appending '%', so anything but '+' and digits could
        // be a wildcard ('%' alone listed every user); a bare "+" would filter nothing either.
        let valid = input.strip_prefix('+').is_some_and(|digits| {
            (1..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
        });
        if valid {
            Ok(Some(Self(input.to_owned())))
        } else {
            Err(ReferralError::invalid(
                "filter",
                "expected '+' and 1 to 15 digits, the start of an E.164 number such as \"+7960\"",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A user id (UUIDv7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub uuid::Uuid);

impl UserId {
    pub fn parse(input: &str, field: &'static str) -> Result<Self, ReferralError> {
        uuid::Uuid::parse_str(input.trim())
            .map(Self)
            .map_err(|_| ReferralError::invalid(field, "expected a user id (UUID)"))
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

const MAX_NAME_CHARS: usize = 100;
const MAX_EMAIL_CHARS: usize = 254;

/// A first or last name: trimmed, at most 100 characters, no control characters; may be empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PersonName(String);

impl PersonName {
    /// `field` names the value in errors ("profile.first_name", "profile.last_name").
    pub fn parse(input: &str, field: &'static str) -> Result<Self, ReferralError> {
        let name = input.trim();
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(ReferralError::invalid(field, "at most 100 characters"));
        }
        if name.chars().any(char::is_control) {
            return Err(ReferralError::invalid(field, "no control characters"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An e-mail address: at most 254 characters, one '@' with a non-empty local part and a dotted
/// domain, no spaces (field "email").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(input: &str) -> Result<Self, ReferralError> {
        let email = input.trim();
        let well_formed = email.chars().count() <= MAX_EMAIL_CHARS
            && !email.chars().any(|c| c.is_whitespace() || c.is_control())
            && match email.split_once('@') {
                Some((local, domain)) => {
                    !local.is_empty()
                        && !domain.contains('@')
                        && domain.contains('.')
                        && !domain.starts_with('.')
                        && !domain.ends_with('.')
                        && !domain.contains("..")
                }
                None => false,
            };
        if well_formed {
            Ok(Self(email.to_owned()))
        } else {
            Err(ReferralError::invalid(
                "email",
                "not a valid e-mail address",
            ))
        }
    }

    /// A profile's e-mail field: empty (or blank) means "no address", anything else must parse.
    pub fn parse_optional(input: &str) -> Result<Option<Self>, ReferralError> {
        if input.trim().is_empty() {
            Ok(None)
        } else {
            Self::parse(input).map(Some)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn invite_codes_are_trimmed_and_upper_cased() {
        assert_eq!(InviteCode::parse("  7kq2mx ").unwrap().as_str(), "7KQ2MX");
        for bad in [
            "", "7KQ2M", "7KQ2MXX", "7KQ2M0", "OKQ2MX", "1KQ2MX", "IKQ2MX", "LKQ2MX", "7KQ 2M",
        ] {
            assert!(InviteCode::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn generated_codes_parse_and_vary() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let codes: std::collections::HashSet<_> =
            (0..1000).map(|_| InviteCode::generate(&mut rng)).collect();
        assert!(codes.len() > 990);
        for code in &codes {
            assert_eq!(InviteCode::parse(code.as_str()).as_ref(), Ok(code));
        }
    }

    #[test]
    fn phone_numbers_are_validated_as_auth_service_does_and_log_masked() {
        let phone = PhoneNumber::parse("+79601233017", None).unwrap();
        assert_eq!(format!("{phone:?}"), "PhoneNumber(+7960***3017)");
        // Seven digits, but a valid Tokelau mobile that auth-service texts codes to.
        assert!(PhoneNumber::parse("+6907290", None).is_ok());
        for bad in [
            "79601233017",
            "+7960",
            "+7960123301712345",
            "+7 960",
            "+07960123301",
        ] {
            let err = ReferralError::from(PhoneNumber::parse(bad, None).unwrap_err());
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn phone_hashes_depend_on_the_pepper_and_never_show_it() {
        let pepper = PhonePepper::from_bytes(b"0123456789abcdef").unwrap();
        let other = PhonePepper::from_bytes(b"0123456789abcdeg").unwrap();
        let hash = pepper.hash_e164("+79601233017");
        assert_eq!(hash, pepper.hash_e164("+79601233017"));
        assert_ne!(hash, pepper.hash_e164("+79601233018"));
        assert_ne!(hash, other.hash_e164("+79601233017"));
        assert_ne!(hash, PhonePepper::development().hash_e164("+79601233017"));
        assert!(
            PhonePepper::from_bytes(b"0123456789abcde").is_none(),
            "15 bytes"
        );
        assert_eq!(format!("{pepper:?}"), "PhonePepper(<redacted>)");
        assert!(PhonePepper::development().is_development());
        assert!(!pepper.is_development());
    }

    #[test]
    fn phone_prefixes_are_plus_and_digits_only() {
        assert_eq!(PhonePrefix::parse(""), Ok(None));
        assert_eq!(PhonePrefix::parse("  "), Ok(None));
        for (input, prefix) in [
            ("+7", "+7"),
            (" +7960 ", "+7960"),
            ("+796012330171234", "+796012330171234"),
        ] {
            assert_eq!(PhonePrefix::parse(input).unwrap().unwrap().as_str(), prefix);
        }
        // LIKE wildcards ('%' matched every user), no '+', nothing after it, spaces, 16 digits.
        for bad in [
            "%",
            "_",
            "+%",
            "+7_60",
            "+7960%",
            "7960",
            "+",
            "+ 7",
            "++7",
            "+７",
            "+7960123301712345",
        ] {
            assert!(
                matches!(
                    PhonePrefix::parse(bad),
                    Err(ReferralError::InvalidArgument {
                        field: "filter",
                        ..
                    })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn emails_and_names_are_validated() {
        assert_eq!(
            Email::parse(" ada@example.com ").unwrap().as_str(),
            "ada@example.com"
        );
        assert_eq!(Email::parse_optional("  ").unwrap(), None);
        let longest = format!("{}@example.com", "a".repeat(254 - 12));
        assert!(Email::parse(&longest).is_ok());
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "a@@b.com",
            "a@b..com",
            &format!("a{longest}"),
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} accepted");
        }
        let name = |input: &str| PersonName::parse(input, "profile.first_name");
        assert_eq!(name("  Ada ").unwrap().as_str(), "Ada");
        assert_eq!(name("").unwrap().as_str(), "");
        assert!(name(&"я".repeat(100)).is_ok(), "characters, not bytes");
        assert_eq!(
            name(&"x".repeat(101)),
            Err(ReferralError::invalid(
                "profile.first_name",
                "at most 100 characters"
            ))
        );
        assert!(name("A\u{0}").is_err());
    }
}
