//! Phone numbers: parsed and normalised to E.164 with the `phonenumber` crate (a libphonenumber
//! port), so the same person written two ways is one key. Never printed in full: `Display` and
//! `Debug` show the masked form (`+7960***3017`); only [`PhoneNumber::e164`] gives the number.
//!
//! This is the one validator of both services: auth-service parses what a person typed, and
//! referral-service parses what auth-service sends it with the same rules, so a number one
//! service accepts is never refused by the other.

use std::fmt;

pub use phonenumber::Type as NumberType;
pub use phonenumber::country::Id as Region;
use phonenumber::{Mode, ParseError};

/// Longest input accepted before parsing (formatting characters included).
const MAX_INPUT_LEN: usize = 40;

/// Compiled number patterns libphonenumber keeps in its one shared cache (the crate's default is
/// 100). Validating a number compiles its region's patterns on a cache miss, about 0.3 ms each in
/// a release build: with 100, numbers from more than about eight regions in rotation miss on
/// nearly every parse, and any caller can make each request cost milliseconds of CPU. 400 holds
/// some thirty regions (an average pattern takes ~100 KB; all 1,746 would take ~190 MB). Where
/// that is not enough, `SMS_ALLOWED_REGIONS` refuses other regions before any pattern is touched
/// ([`calling_code_regions`]).
const PATTERN_CACHE_CAPACITY: usize = 400;

fn size_pattern_cache() {
    static SIZED: std::sync::Once = std::sync::Once::new();
    SIZED.call_once(|| {
        if let Ok(mut cache) = phonenumber::metadata::DATABASE.cache().lock() {
            cache.set_capacity(PATTERN_CACHE_CAPACITY);
        }
    });
}

/// The regions of the country calling code an international number starts with (`+7 960…` →
/// RU, KZ; `+800…` → none: non-geographic), found by a table lookup without parsing the number,
/// so no pattern is compiled or matched. `None` when the input does not start with `+` and an
/// assigned calling code.
pub fn calling_code_regions(input: &str) -> Option<Vec<Region>> {
    let mut chars = input
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'));
    if chars.next() != Some('+') {
        return None;
    }
    let digits: String = chars.take(3).take_while(char::is_ascii_digit).collect();
    // Calling codes are prefix-free, so the shortest assigned prefix is the code.
    (1..=digits.len()).find_map(|len| {
        let code: u16 = digits[..len].parse().ok()?;
        phonenumber::metadata::DATABASE
            .region(&code)
            .map(|ids| ids.iter().filter_map(|id| id.parse().ok()).collect())
    })
}

/// A valid phone number in E.164 form (`+79601233017`), with the region and the kind of line
/// libphonenumber assigns it (both derive from the number, so equality is the number's).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber {
    e164: String,
    region: Option<Region>,
    kind: NumberType,
}

/// Why a phone number was refused. The message is safe to show to the caller (it never repeats
/// the number).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("phone number is empty")]
    Empty,
    #[error("phone number is too long")]
    TooLong,
    #[error("phone number may contain only digits, spaces, dashes, brackets and a leading '+'")]
    BadCharacter,
    #[error("phone number must be in international format, starting with '+' and the country code")]
    NeedsCountryCode,
    #[error("phone number is not a valid number")]
    Invalid,
}

impl PhoneNumber {
    /// Parses a number typed by a person. Spaces, dashes and brackets are ignored; letters and
    /// anything else are refused. Without `default_region` the number must start with `+`;
    /// with it, national formats of that region are accepted too. Too short, too long,
    /// impossible and unassigned numbers are refused.
    pub fn parse(input: &str, default_region: Option<Region>) -> Result<Self, PhoneError> {
        size_pattern_cache();
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(PhoneError::Empty);
        }
        if trimmed.len() > MAX_INPUT_LEN {
            return Err(PhoneError::TooLong);
        }
        let mut digits = String::with_capacity(trimmed.len());
        for (i, c) in trimmed.char_indices() {
            match c {
                '0'..='9' => digits.push(c),
                '+' if i == 0 => digits.push(c),
                ' ' | '-' | '(' | ')' => {}
                _ => return Err(PhoneError::BadCharacter),
            }
        }
        let international = digits.starts_with('+');
        if !international && default_region.is_none() {
            return Err(PhoneError::NeedsCountryCode);
        }
        if digits.len() < 3 {
            return Err(PhoneError::Invalid);
        }
        let region = if international { None } else { default_region };
        let parsed = phonenumber::parse(region, &digits).map_err(|err| match err {
            ParseError::TooLong => PhoneError::TooLong,
            _ => PhoneError::Invalid,
        })?;
        if parsed.extension().is_some() || !parsed.is_valid() {
            return Err(PhoneError::Invalid);
        }
        let e164 = parsed.format().mode(Mode::E164).to_string();
        // E.164: '+' and at most 15 digits.
        if !e164.starts_with('+') || e164.len() > 16 || e164.len() < 4 {
            return Err(PhoneError::Invalid);
        }
        Ok(Self {
            e164,
            region: parsed.country().id(),
            kind: parsed.number_type(&phonenumber::metadata::DATABASE),
        })
    }

    /// The full E.164 number. For storage keys and outbound SMS only; never log it.
    pub fn e164(&self) -> &str {
        &self.e164
    }

    /// The ISO 3166 region the number belongs to; `None` for non-geographic numbers
    /// (`+800`, `+882` …).
    pub fn region(&self) -> Option<Region> {
        self.region
    }

    /// The region as its two-letter code, or `001` (libphonenumber's name for the
    /// non-geographic entities). Safe for logs, metric labels and keys: there are a few hundred.
    pub fn region_code(&self) -> &str {
        self.region.as_ref().map_or("001", AsRef::as_ref)
    }

    /// The kind of line: mobile, fixed line, premium rate …
    pub fn number_type(&self) -> NumberType {
        self.kind
    }

    /// The block of consecutive numbers this one belongs to: the E.164 form without its last
    /// four digits (`+7960123`). SMS-pumping rings work through such blocks.
    pub fn block(&self) -> &str {
        let keep = self.e164.len().saturating_sub(4).max(2);
        &self.e164[..keep]
    }

    /// A loggable form that hides the middle digits: `+7960***3017`.
    pub fn masked(&self) -> String {
        mask_e164(&self.e164)
    }
}

/// Masks a stored E.164 number for display and logs: `+7960***3017`, `+69***90` for short
/// ones, `***` for anything too short to hide a middle, empty for empty (an erased number).
/// Works on the stored string, so a list of numbers is masked without parsing each one.
pub fn mask_e164(e164: &str) -> String {
    if e164.is_empty() {
        return String::new();
    }
    if !e164.is_ascii() || e164.len() < 6 {
        return "***".to_owned();
    }
    let (head, tail) = if e164.len() >= 11 { (5, 4) } else { (3, 2) };
    format!("{}***{}", &e164[..head], &e164[e164.len() - tail..])
}

/// The snake-case name of a number type, as `SMS_ALLOWED_NUMBER_TYPES` spells it.
pub fn number_type_name(kind: NumberType) -> &'static str {
    NUMBER_TYPES
        .iter()
        .find(|(_, known)| *known == kind)
        .map_or("unknown", |(name, _)| name)
}

/// Parses a snake-case number type name (`mobile`, `fixed_line_or_mobile`, `premium_rate` …).
pub fn parse_number_type(name: &str) -> Option<NumberType> {
    NUMBER_TYPES
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, kind)| *kind)
}

/// Every libphonenumber number type and its snake-case name.
pub const NUMBER_TYPES: &[(&str, NumberType)] = &[
    ("fixed_line", NumberType::FixedLine),
    ("mobile", NumberType::Mobile),
    ("fixed_line_or_mobile", NumberType::FixedLineOrMobile),
    ("toll_free", NumberType::TollFree),
    ("premium_rate", NumberType::PremiumRate),
    ("shared_cost", NumberType::SharedCost),
    ("personal_number", NumberType::PersonalNumber),
    ("voip", NumberType::Voip),
    ("pager", NumberType::Pager),
    ("uan", NumberType::Uan),
    ("emergency", NumberType::Emergency),
    ("voicemail", NumberType::Voicemail),
    ("short_code", NumberType::ShortCode),
    ("standard_rate", NumberType::StandardRate),
    ("carrier", NumberType::Carrier),
    ("no_international", NumberType::NoInternational),
    ("unknown", NumberType::Unknown),
];

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_spellings_of_one_number_are_equal() {
        let a = PhoneNumber::parse("+7 960 123-30-17", None).unwrap();
        let b = PhoneNumber::parse("+7 (960) 1233017", None).unwrap();
        let c = PhoneNumber::parse("+79601233017", None).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.e164(), "+79601233017");
    }

    #[test]
    fn national_format_needs_a_default_region() {
        assert_eq!(
            PhoneNumber::parse("8 960 123-30-17", None),
            Err(PhoneError::NeedsCountryCode)
        );
        let national = PhoneNumber::parse("8 (960) 123-30-17", Some(Region::RU)).unwrap();
        assert_eq!(national.e164(), "+79601233017");
        // An international number still wins over the default region.
        let us = PhoneNumber::parse("+1 650-253-0000", Some(Region::RU)).unwrap();
        assert_eq!(us.e164(), "+16502530000");
    }

    #[test]
    fn letters_and_junk_are_refused() {
        for input in [
            "+7 960 CALL-NOW",
            "+7960123301a",
            "+7 960 123 30 17 ext 5",
            "+7*960",
        ] {
            assert_eq!(
                PhoneNumber::parse(input, None),
                Err(PhoneError::BadCharacter),
                "{input}"
            );
        }
        assert_eq!(PhoneNumber::parse("  ", None), Err(PhoneError::Empty));
        assert_eq!(
            PhoneNumber::parse("7+9601233017", None),
            Err(PhoneError::BadCharacter)
        );
    }

    #[test]
    fn too_short_too_long_and_impossible_numbers_are_refused() {
        for input in [
            "+7",
            "+7 960",
            "+7 960 123",
            "+7 960 123 30 17 1",
            "+7 960 123 30 17 12345678",
            "+999 123 456 789",
            "+1 000 000 0000",
        ] {
            assert!(PhoneNumber::parse(input, None).is_err(), "{input} accepted");
        }
        assert_eq!(
            PhoneNumber::parse(&"1".repeat(60), None),
            Err(PhoneError::TooLong)
        );
    }

    #[test]
    fn display_and_debug_are_masked() {
        let phone = PhoneNumber::parse("+79601233017", None).unwrap();
        assert_eq!(phone.masked(), "+7960***3017");
        assert_eq!(phone.to_string(), "+7960***3017");
        let debug = format!("{phone:?}");
        assert!(!debug.contains("79601233017"), "{debug}");
        assert!(debug.contains("+7960***3017"));
    }

    #[test]
    fn region_type_and_block_come_from_the_number() {
        let ru = PhoneNumber::parse("+79601233017", None).unwrap();
        assert_eq!(ru.region(), Some(Region::RU));
        assert_eq!(ru.region_code(), "RU");
        assert_eq!(ru.number_type(), NumberType::Mobile);
        assert_eq!(ru.block(), "+7960123");
        let us = PhoneNumber::parse("+1 650-253-0000", None).unwrap();
        assert_eq!(us.region_code(), "US");
        assert_eq!(us.number_type(), NumberType::FixedLineOrMobile);
        // A valid Tokelau mobile: seven digits in all, which a digit-count rule would refuse.
        let tokelau = PhoneNumber::parse("+690 7290", None).unwrap();
        assert_eq!(tokelau.e164(), "+6907290");
        assert_eq!(tokelau.region_code(), "TK");
        assert_eq!(tokelau.number_type(), NumberType::Mobile);
        assert_eq!(tokelau.block(), "+690");
        // Premium rate in the UK (09xx).
        let premium = PhoneNumber::parse("+44 909 879 0000", None).unwrap();
        assert_eq!(premium.number_type(), NumberType::PremiumRate);
        // International freephone is valid but belongs to no region.
        let freephone = PhoneNumber::parse("+800 1234 5678", None).unwrap();
        assert_eq!(freephone.region(), None);
        assert_eq!(freephone.region_code(), "001");
    }

    #[test]
    fn stored_numbers_mask_without_parsing() {
        assert_eq!(mask_e164("+79601233017"), "+7960***3017");
        assert_eq!(mask_e164("+6907290"), "+69***90");
        assert_eq!(mask_e164(""), "", "an erased number stays empty");
        assert_eq!(mask_e164("+123"), "***", "too short to hide anything");
        assert_eq!(mask_e164("+7960١٢٣٣٠١٧"), "***");
        for digits in 6..=16 {
            let number = format!("+{}", "5".repeat(digits - 1));
            let masked = mask_e164(&number);
            assert!(masked.contains("***"), "{masked}");
            let shown = masked.chars().filter(char::is_ascii_digit).count();
            assert!(shown < digits - 1, "{number} -> {masked} shows every digit");
        }
    }

    #[test]
    fn calling_codes_name_their_regions_without_parsing() {
        let regions = |input: &str| {
            calling_code_regions(input).map(|mut r| {
                r.sort_by_key(|region| region.as_ref().to_owned());
                r
            })
        };
        assert_eq!(
            regions("+7 960 123-30-17"),
            Some(vec![Region::KZ, Region::RU])
        );
        assert_eq!(regions(" +(44) 7911"), regions("+447911123456"));
        assert!(regions("+447911123456").unwrap().contains(&Region::GB));
        assert!(regions("+16502530000").unwrap().contains(&Region::US));
        assert_eq!(regions("+6907290"), Some(vec![Region::TK]));
        assert_eq!(regions("+800 1234 5678"), Some(vec![]), "non-geographic");
        for none in ["89601233017", "+999 123", "+", "", "+x7", "+0"] {
            assert_eq!(regions(none), None, "{none:?}");
        }
    }

    #[test]
    fn the_pattern_cache_holds_many_regions() {
        PhoneNumber::parse("+79601233017", None).unwrap();
        let cache = phonenumber::metadata::DATABASE.cache();
        assert_eq!(cache.lock().unwrap().capacity(), PATTERN_CACHE_CAPACITY);
    }

    #[test]
    fn number_type_names_round_trip() {
        for (name, kind) in NUMBER_TYPES {
            assert_eq!(parse_number_type(name), Some(*kind));
            assert_eq!(number_type_name(*kind), *name);
        }
        assert_eq!(parse_number_type("Mobile"), None);
    }

    #[test]
    fn junk_from_the_allowed_alphabet_never_panics() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let alphabet = b"0123456789 -()+";
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..2_000 {
            let len = rng.random_range(0..24);
            let input: String = (0..len)
                .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
                .collect();
            let _ = PhoneNumber::parse(&input, None);
            let _ = PhoneNumber::parse(&input, Some(Region::RU));
            let _ = PhoneNumber::parse(&format!("+{input}"), None);
        }
    }
}
