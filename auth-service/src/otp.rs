//! One-time-code rules, pure (no I/O): generating a code from an injected CSPRNG, parsing what
//! a caller typed, and the keyed hash that is the only form of a code ever stored.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::{CryptoRng, Rng};
use secrecy::{ExposeSecret, SecretBox};
use sha2::Sha256;

use crate::phone::PhoneNumber;

/// Allowed code lengths.
pub const MIN_CODE_LENGTH: u8 = 4;
pub const MAX_CODE_LENGTH: u8 = 8;

/// The number of digits of a code, between [`MIN_CODE_LENGTH`] and [`MAX_CODE_LENGTH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeLength(u8);

impl CodeLength {
    pub fn new(digits: u8) -> Option<Self> {
        (MIN_CODE_LENGTH..=MAX_CODE_LENGTH)
            .contains(&digits)
            .then_some(Self(digits))
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for CodeLength {
    fn default() -> Self {
        Self(4)
    }
}

/// A one-time code: exactly [`CodeLength`] ASCII digits. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct OtpCode(String);

/// Why a typed code was refused before looking it up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeFormatError {
    #[error("code must contain only digits")]
    NotDigits,
    #[error("code must be exactly {0} digits")]
    WrongLength(u8),
}

impl OtpCode {
    /// A uniformly random code; each digit drawn independently from `rng`, which must be a
    /// CSPRNG (`rand::rng()` in production, a seeded `StdRng` in tests).
    pub fn generate<R: Rng + CryptoRng + ?Sized>(rng: &mut R, length: CodeLength) -> Self {
        let code = (0..length.get())
            .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
            .collect();
        Self(code)
    }

    /// Parses what a caller typed: surrounding whitespace is ignored; otherwise only digits,
    /// exactly `length` of them.
    pub fn parse(input: &str, length: CodeLength) -> Result<Self, CodeFormatError> {
        let input = input.trim();
        if !input.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CodeFormatError::NotDigits);
        }
        if input.len() != usize::from(length.get()) {
            return Err(CodeFormatError::WrongLength(length.get()));
        }
        Ok(Self(input.to_owned()))
    }

    /// The digits. Only for the SMS text; never log them.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OtpCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OtpCode(<{} digits>)", self.0.len())
    }
}

/// The server secret keying the code hash (`OTP_PEPPER_FILE`). Never printed.
pub struct Pepper(SecretBox<[u8]>);

impl Pepper {
    /// The shortest pepper accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    /// A pepper from file contents; `None` when shorter than [`Pepper::MIN_LEN`].
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() >= Self::MIN_LEN).then(|| Self(SecretBox::new(bytes.into_boxed_slice())))
    }

    /// A random 32-byte pepper (dev: codes stop working when the process restarts).
    pub fn random<R: Rng + CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = vec![0u8; 32];
        rng.fill_bytes(&mut bytes);
        Self(SecretBox::new(bytes.into_boxed_slice()))
    }

    /// HMAC-SHA256 over the phone and the code, as lowercase hex. Binding the phone means a
    /// hash is useless for any other number. Hashes are compared inside Redis (Lua string
    /// equality); the attempt limits bound what a timing difference could reveal.
    pub fn hash_code(&self, phone: &PhoneNumber, code: &OtpCode) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret())
            .expect("HMAC accepts keys of any length");
        mac.update(b"refsys-otp-v1\0");
        mac.update(phone.e164().as_bytes());
        mac.update(b"\0");
        mac.update(code.expose().as_bytes());
        hex(&mac.finalize().into_bytes())
    }
}

impl Pepper {
    /// A 32-byte key for another purpose, derived from the pepper: HMAC-SHA256(pepper, label).
    /// One secret to manage, and keys for different purposes never coincide.
    pub fn derive_key(&self, label: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret())
            .expect("HMAC accepts keys of any length");
        mac.update(label);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pepper(<redacted>)")
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn phone(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s, None).unwrap()
    }

    #[test]
    fn lengths_outside_4_to_8_are_refused() {
        assert!(CodeLength::new(3).is_none());
        assert!(CodeLength::new(9).is_none());
        assert_eq!(CodeLength::new(6).map(CodeLength::get), Some(6));
        assert_eq!(CodeLength::default().get(), 4);
    }

    #[test]
    fn generated_codes_have_the_length_and_only_digits() {
        let mut rng = StdRng::seed_from_u64(7);
        for digits in MIN_CODE_LENGTH..=MAX_CODE_LENGTH {
            let length = CodeLength::new(digits).unwrap();
            let code = OtpCode::generate(&mut rng, length);
            assert_eq!(code.expose().len(), usize::from(digits));
            assert!(code.expose().bytes().all(|b| b.is_ascii_digit()));
            assert_eq!(OtpCode::parse(code.expose(), length), Ok(code));
        }
    }

    #[test]
    fn generation_is_deterministic_for_a_seeded_rng_and_spread() {
        let length = CodeLength::new(4).unwrap();
        let a = OtpCode::generate(&mut StdRng::seed_from_u64(1), length);
        let b = OtpCode::generate(&mut StdRng::seed_from_u64(1), length);
        assert_eq!(a, b);
        let mut rng = StdRng::seed_from_u64(2);
        let mut counts = [0u32; 10];
        for _ in 0..2000 {
            for d in OtpCode::generate(&mut rng, length).expose().bytes() {
                counts[usize::from(d - b'0')] += 1;
            }
        }
        // 8000 digits: each should appear about 800 times.
        assert!(
            counts.iter().all(|&n| (650..950).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn parse_wants_exact_digits() {
        let four = CodeLength::default();
        assert!(OtpCode::parse(" 1234 ", four).is_ok());
        assert_eq!(
            OtpCode::parse("12a4", four),
            Err(CodeFormatError::NotDigits)
        );
        assert_eq!(
            OtpCode::parse("12 34", four),
            Err(CodeFormatError::NotDigits)
        );
        assert_eq!(
            OtpCode::parse("١٢٣٤", four),
            Err(CodeFormatError::NotDigits)
        );
        assert_eq!(
            OtpCode::parse("123", four),
            Err(CodeFormatError::WrongLength(4))
        );
        assert_eq!(
            OtpCode::parse("12345", four),
            Err(CodeFormatError::WrongLength(4))
        );
        assert_eq!(
            OtpCode::parse("", four),
            Err(CodeFormatError::WrongLength(4))
        );
    }

    #[test]
    fn hash_depends_on_pepper_phone_and_code() {
        let four = CodeLength::default();
        let code = OtpCode::parse("1234", four).unwrap();
        let other = OtpCode::parse("1235", four).unwrap();
        let p1 = Pepper::from_bytes(vec![1; 32]).unwrap();
        let p2 = Pepper::from_bytes(vec![2; 32]).unwrap();
        let a = phone("+79601233017");
        let b = phone("+79601233018");
        let h = p1.hash_code(&a, &code);
        assert_eq!(h.len(), 64);
        assert_eq!(h, p1.hash_code(&phone("+7 960 123-30-17"), &code));
        assert_ne!(h, p1.hash_code(&a, &other));
        assert_ne!(h, p1.hash_code(&b, &code));
        assert_ne!(h, p2.hash_code(&a, &code));
        assert!(!h.contains("1234"));
    }

    #[test]
    fn secrets_are_not_printed() {
        let code = OtpCode::parse("9876", CodeLength::default()).unwrap();
        assert!(!format!("{code:?}").contains("9876"));
        assert!(Pepper::from_bytes(vec![0; 8]).is_none());
        let pepper = Pepper::random(&mut StdRng::seed_from_u64(3));
        assert_eq!(format!("{pepper:?}"), "Pepper(<redacted>)");
    }
}
