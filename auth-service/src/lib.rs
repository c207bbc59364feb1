//! refsys auth-service: proves a caller holds a phone number and turns that proof into tokens.

pub mod config;
pub mod directory;
pub mod error;
pub mod otp;
pub mod phone;
pub mod sms;
pub mod store;
pub mod tokens;
