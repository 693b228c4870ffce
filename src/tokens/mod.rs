//! Tokens: claims, signing keys and verification.
//!
//! Minting is done here rather than by `jsonwebtoken::encode`, which re-parses the signing
//! key on every call: a [`keys::SigningKey`] is parsed once, its header is encoded once, and
//! each token costs one claims serialisation, one base64 pass and one signature (aws-lc-rs).
//! Verification uses `jsonwebtoken` (with the `aws_lc_rs` backend) and pinned settings.

pub mod claims;
pub mod keys;
pub mod verify;

pub use claims::{Actor, Audience, Claims, RunRef, RunTokenSpec};
pub use keys::{Alg, KeyError, KeySet, SigningKey};
pub use verify::{AudienceCheck, Verifier, VerifyError};

#[cfg(test)]
mod tests;
