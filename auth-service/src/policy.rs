//! Which numbers may be sent a code at all, and which numbers are test numbers — pure rules,
//! decided before anything is counted or sent.
//!
//! SMS pumping (toll fraud) makes a service text numbers whose operator pays the attacker per
//! message. Most of it goes to premium-rate, shared-cost and similar ranges, and to regions
//! where the service has no users; refusing those outright costs nothing and ends most of it.

use std::collections::{HashMap, HashSet};

use crate::otp::{CodeLength, OtpCode};
use crate::phone::{
    NumberType, PhoneNumber, Region, calling_code_regions, number_type_name, parse_number_type,
};

/// The default `SMS_ALLOWED_NUMBER_TYPES`: the lines a person carries. libphonenumber cannot
/// tell mobile from fixed lines in some regions (the US and Canada among them), hence the
/// second.
pub const DEFAULT_NUMBER_TYPES: &str = "mobile,fixed_line_or_mobile";

/// Why a number may not be sent a code. Shown to the caller as FAILED_PRECONDITION with an
/// `ErrorInfo` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyRefusal {
    RegionNotAllowed,
    NumberTypeNotAllowed,
}

impl PolicyRefusal {
    pub const ALL: [PolicyRefusal; 2] = [Self::RegionNotAllowed, Self::NumberTypeNotAllowed];

    /// The `google.rpc.ErrorInfo` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::RegionNotAllowed => "REGION_NOT_ALLOWED",
            Self::NumberTypeNotAllowed => "NUMBER_TYPE_NOT_ALLOWED",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::RegionNotAllowed => "sign-in codes are not sent to numbers of this region",
            Self::NumberTypeNotAllowed => {
                "sign-in codes are sent to mobile numbers only; this kind of number is not accepted"
            }
        }
    }
}

/// `SMS_ALLOWED_REGIONS` and `SMS_ALLOWED_NUMBER_TYPES`.
#[derive(Debug, Clone)]
pub struct SmsPolicy {
    /// `None`: every region.
    regions: Option<HashSet<Region>>,
    types: HashSet<NumberType>,
}

impl Default for SmsPolicy {
    fn default() -> Self {
        Self {
            regions: None,
            types: Self::parse_types(DEFAULT_NUMBER_TYPES).expect("default types are valid"),
        }
    }
}

impl SmsPolicy {
    pub fn new(regions: Option<HashSet<Region>>, types: HashSet<NumberType>) -> Self {
        Self { regions, types }
    }

    /// ISO 3166-1 alpha-2 codes separated by commas; empty means every region.
    pub fn parse_regions(raw: &str) -> Result<Option<HashSet<Region>>, String> {
        let codes: Vec<&str> = raw
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if codes.is_empty() {
            return Ok(None);
        }
        codes
            .into_iter()
            .map(|code| {
                code.to_ascii_uppercase()
                    .parse::<Region>()
                    .map_err(|_| format!("{code:?} is not an ISO 3166-1 alpha-2 region code"))
            })
            .collect::<Result<HashSet<_>, _>>()
            .map(Some)
    }

    /// libphonenumber types in snake case separated by commas; at least one.
    pub fn parse_types(raw: &str) -> Result<HashSet<NumberType>, String> {
        let types = raw
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|name| {
                parse_number_type(&name.to_ascii_lowercase()).ok_or_else(|| {
                    format!(
                        "{name:?} is not a number type; known: {}",
                        crate::phone::NUMBER_TYPES
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
            })
            .collect::<Result<HashSet<_>, _>>()?;
        if types.is_empty() {
            return Err("name at least one number type, e.g. mobile".to_owned());
        }
        Ok(types)
    }

    /// Refuses an international number whose calling code belongs to no allowed region, from
    /// the typed input and before it is parsed: parsing compiles and matches the region's number
    /// patterns, which a caller rotating through many regions could otherwise make every request
    /// pay for. Anything this lets through is parsed and checked by [`SmsPolicy::check`].
    pub fn screen(&self, input: &str) -> Result<(), PolicyRefusal> {
        let (Some(allowed), Some(regions)) = (&self.regions, calling_code_regions(input)) else {
            return Ok(());
        };
        if regions.iter().any(|region| allowed.contains(region)) {
            Ok(())
        } else {
            Err(PolicyRefusal::RegionNotAllowed)
        }
    }

    /// Whether `phone` may be sent a code.
    pub fn check(&self, phone: &PhoneNumber) -> Result<(), PolicyRefusal> {
        if let Some(regions) = &self.regions {
            // Non-geographic numbers belong to no region, so a region list refuses them.
            if !phone.region().is_some_and(|r| regions.contains(&r)) {
                return Err(PolicyRefusal::RegionNotAllowed);
            }
        }
        if !self.types.contains(&phone.number_type()) {
            return Err(PolicyRefusal::NumberTypeNotAllowed);
        }
        Ok(())
    }

    /// The allowed types, for logs at startup.
    pub fn describe(&self) -> String {
        let mut types: Vec<&str> = self.types.iter().map(|t| number_type_name(*t)).collect();
        types.sort_unstable();
        let regions = match &self.regions {
            None => "all".to_owned(),
            Some(set) => {
                let mut codes: Vec<&str> = set.iter().map(AsRef::as_ref).collect();
                codes.sort_unstable();
                codes.join(",")
            }
        };
        format!("regions={regions} types={}", types.join(","))
    }
}

/// `TEST_PHONE_NUMBERS`: numbers that never get an SMS, are exempt from every send limit and
/// verify with a fixed code (for app-store reviewers and staging). `Debug` hides the codes.
#[derive(Clone, Default)]
pub struct TestNumbers(HashMap<PhoneNumber, OtpCode>);

impl std::fmt::Debug for TestNumbers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestNumbers(<{} numbers>)", self.0.len())
    }
}

impl TestNumbers {
    /// `+79990000001=4321,+79990000002=8765`: E.164 numbers, each with a code of `length`
    /// digits. Errors never repeat a code or a full number.
    pub fn parse(raw: &str, length: CodeLength) -> Result<Self, String> {
        let mut numbers = HashMap::new();
        for (index, pair) in raw
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            let entry = index + 1;
            let (number, code) = pair
                .split_once('=')
                .ok_or_else(|| format!("entry {entry} is not <number>=<code>"))?;
            let phone = PhoneNumber::parse(number.trim(), None)
                .map_err(|err| format!("entry {entry}: {err}"))?;
            let code = OtpCode::parse(code.trim(), length)
                .map_err(|err| format!("entry {entry}: {err} (OTP_LENGTH)"))?;
            if numbers.insert(phone, code).is_some() {
                return Err(format!("entry {entry} repeats a number"));
            }
        }
        Ok(Self(numbers))
    }

    /// Whether `input`, as typed (spaces, dashes and brackets ignored), is a test number in
    /// international form: such input skips the region screening, as test numbers skip every
    /// region and type rule.
    pub fn matches_input(&self, input: &str) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let typed: String = input
            .trim()
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'))
            .collect();
        self.0.keys().any(|phone| phone.e164() == typed)
    }

    /// The fixed code of `phone` if it is a test number.
    pub fn code_of(&self, phone: &PhoneNumber) -> Option<&OtpCode> {
        self.0.get(phone)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phone(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s, None).unwrap()
    }

    #[test]
    fn the_default_allows_mobiles_everywhere_and_nothing_else() {
        let policy = SmsPolicy::default();
        assert_eq!(policy.check(&phone("+79601233017")), Ok(()));
        assert_eq!(policy.check(&phone("+16502530000")), Ok(()));
        assert_eq!(policy.check(&phone("+6907290")), Ok(()));
        for premium_or_fixed in ["+449098790000", "+74951234567", "+80012345678"] {
            assert_eq!(
                policy.check(&phone(premium_or_fixed)),
                Err(PolicyRefusal::NumberTypeNotAllowed),
                "{premium_or_fixed}"
            );
        }
    }

    #[test]
    fn a_region_list_refuses_other_regions_and_non_geographic_numbers() {
        let regions = SmsPolicy::parse_regions(" ru, kz ").unwrap();
        let all_types = SmsPolicy::parse_types("mobile,toll_free").unwrap();
        let policy = SmsPolicy::new(regions, all_types);
        assert_eq!(policy.check(&phone("+79601233017")), Ok(()));
        assert_eq!(
            policy.check(&phone("+16502530000")),
            Err(PolicyRefusal::RegionNotAllowed)
        );
        assert_eq!(
            policy.check(&phone("+80012345678")),
            Err(PolicyRefusal::RegionNotAllowed)
        );
        assert_eq!(policy.describe(), "regions=KZ,RU types=mobile,toll_free");
    }

    #[test]
    fn screening_refuses_other_calling_codes_before_parsing() {
        let policy = SmsPolicy::new(
            SmsPolicy::parse_regions("KZ").unwrap(),
            SmsPolicy::parse_types(DEFAULT_NUMBER_TYPES).unwrap(),
        );
        for elsewhere in [
            "+44 7911 123456",
            "+1 650 253 0000",
            "+80012345678",
            "+6907290",
        ] {
            assert_eq!(
                policy.screen(elsewhere),
                Err(PolicyRefusal::RegionNotAllowed),
                "{elsewhere}"
            );
        }
        // +7 is shared by RU and KZ: screening lets it through, the full check decides.
        assert_eq!(policy.screen("+7 960 123-30-17"), Ok(()));
        assert_eq!(
            policy.check(&phone("+79601233017")),
            Err(PolicyRefusal::RegionNotAllowed)
        );
        // Not international, junk, unassigned codes: the parser answers those.
        for other in ["8 960 123 30 17", "+999 1", "hello"] {
            assert_eq!(policy.screen(other), Ok(()), "{other}");
        }
        // Without a region list nothing is screened.
        assert_eq!(SmsPolicy::default().screen("+44 7911 123456"), Ok(()));
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!(SmsPolicy::parse_regions(" , "), Ok(None));
        assert!(SmsPolicy::parse_regions("RU,Russia").is_err());
        assert!(SmsPolicy::parse_types("mobile,cellular").is_err());
        assert!(SmsPolicy::parse_types(" , ").is_err());
        assert!(SmsPolicy::parse_types("Premium_Rate").is_ok());
    }

    #[test]
    fn test_numbers_parse_and_keep_their_codes_secret() {
        let four = CodeLength::default();
        let numbers = TestNumbers::parse("+79990000001=4321, +7 999 000-00-02=8765", four).unwrap();
        assert_eq!(numbers.len(), 2);
        assert_eq!(
            numbers.code_of(&phone("+79990000002")).map(OtpCode::expose),
            Some("8765")
        );
        assert!(numbers.code_of(&phone("+79990000003")).is_none());
        assert!(numbers.matches_input(" +7 (999) 000-00-02"));
        assert!(!numbers.matches_input("+79990000003"));
        assert!(!TestNumbers::default().matches_input("+79990000001"));
        assert!(!format!("{numbers:?}").contains("4321"));
        for bad in [
            "+79990000001",
            "+79990000001=12",
            "+79990000001=abcd",
            "12345=4321",
            "+79990000001=4321,+79990000001=1111",
        ] {
            let err = TestNumbers::parse(bad, four).unwrap_err();
            assert!(
                !err.contains("4321") && !err.contains("79990000001"),
                "{err}"
            );
        }
        assert!(TestNumbers::parse("", four).unwrap().is_empty());
    }
}
