//! refsys auth-service: proves a caller holds a phone number and turns that proof into tokens.

pub mod error;
pub mod otp;
pub mod phone;
