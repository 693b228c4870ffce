//! Verification of Deputy tokens, with everything pinned explicitly: issuer, algorithms
//! (EdDSA and ES256 only, never `none` or HMAC), `typ: at+jwt`, known `kid`s, audience
//! (or an explicit "any audience"), expiry and not-before with a fixed leeway.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jiff::Timestamp;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};

use super::claims::Claims;
use super::keys::{Alg, KeySet};

/// Why a token was rejected. Each has a distinct, stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not accepted (EdDSA or ES256 only)")]
    UnsupportedAlgorithm(String),
    #[error("token type {0:?} is not at+jwt")]
    WrongType(String),
    #[error("token has no kid")]
    MissingKid,
    #[error("unknown signing key {0:?}")]
    UnknownKey(String),
    #[error("kid {0:?} does not sign with this algorithm")]
    AlgorithmMismatch(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token was issued by someone else")]
    WrongIssuer,
    #[error("token is not for this audience")]
    WrongAudience,
    #[error("token lacks claim {0:?}")]
    MissingClaim(String),
}

impl VerifyError {
    /// A short stable code (for audit lines and metrics).
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "malformed",
            VerifyError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            VerifyError::WrongType(_) => "wrong_type",
            VerifyError::MissingKid => "missing_kid",
            VerifyError::UnknownKey(_) => "unknown_key",
            VerifyError::AlgorithmMismatch(_) => "algorithm_mismatch",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            VerifyError::WrongIssuer => "wrong_issuer",
            VerifyError::WrongAudience => "wrong_audience",
            VerifyError::MissingClaim(_) => "missing_claim",
        }
    }
}

/// Which audience a verifier requires. "Any" must be asked for by name.
#[derive(Debug, Clone, Copy)]
pub enum AudienceCheck<'a> {
    /// The token's `aud` must contain this audience.
    Exactly(&'a str),
    /// Accept any audience (used by Deputy itself for subject tokens, which are bound to the
    /// run's downstream audiences rather than to Deputy).
    Any,
}

/// Verifies Deputy tokens against a fixed set of public keys.
pub struct Verifier {
    issuer: String,
    leeway_secs: u64,
    keys: HashMap<String, (Alg, DecodingKey)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.issuer)
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The default clock-skew leeway, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

impl Verifier {
    /// A verifier for the public keys of a JWKS document. Keys of other types or algorithms
    /// are ignored (never trusted).
    pub fn from_jwks(issuer: &str, jwks: &serde_json::Value, leeway_secs: u64) -> Result<Verifier, VerifyError> {
        let set: JwkSet =
            serde_json::from_value(jwks.clone()).map_err(|e| VerifyError::Malformed(format!("JWKS: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(p)
                    if p.curve == jsonwebtoken::jwk::EllipticCurve::Ed25519 =>
                {
                    Alg::EdDSA
                }
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(p)
                    if p.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
                {
                    Alg::ES256
                }
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
            keys.insert(kid, (alg, key));
        }
        Ok(Verifier { issuer: issuer.to_string(), leeway_secs, keys })
    }

    /// A verifier for every key of a key set (active and retired).
    pub fn from_key_set(issuer: &str, set: &KeySet, leeway_secs: u64) -> Result<Verifier, VerifyError> {
        Verifier::from_jwks(issuer, &set.jwks(), leeway_secs)
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies signature and claims at the current time.
    pub fn verify(&self, token: &str, audience: AudienceCheck<'_>) -> Result<Claims, VerifyError> {
        self.verify_at(token, audience, Timestamp::now())
    }

    /// Verifies signature and claims as of `now`.
    pub fn verify_at(&self, token: &str, audience: AudienceCheck<'_>, now: Timestamp) -> Result<Claims, VerifyError> {
        let header = peek_header(token)?;
        let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
        let alg: Alg = alg.parse().map_err(|_| VerifyError::UnsupportedAlgorithm(alg.to_string()))?;
        let typ = header.get("typ").and_then(|t| t.as_str()).unwrap_or("");
        if !typ.eq_ignore_ascii_case("at+jwt") && !typ.eq_ignore_ascii_case("application/at+jwt") {
            return Err(VerifyError::WrongType(typ.to_string()));
        }
        let kid = header.get("kid").and_then(|k| k.as_str()).ok_or(VerifyError::MissingKid)?;
        let (key_alg, key) = self.keys.get(kid).ok_or_else(|| VerifyError::UnknownKey(kid.to_string()))?;
        if *key_alg != alg {
            return Err(VerifyError::AlgorithmMismatch(kid.to_string()));
        }

        // Signature and claim structure by jsonwebtoken; time checks here against `now`, so
        // that they are exact and testable.
        let mut v = Validation::new(alg.jsonwebtoken());
        v.algorithms = vec![alg.jsonwebtoken()];
        v.validate_exp = false;
        v.validate_nbf = false;
        v.leeway = 0;
        v.set_issuer(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "sub", "aud"]);
        match audience {
            AudienceCheck::Exactly(aud) => v.set_audience(&[aud]),
            AudienceCheck::Any => v.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(map_error)?;
        let claims = data.claims;
        self.check_times(&claims, now)?;
        Ok(claims)
    }

    /// The expiry and not-before checks alone (with this verifier's leeway), for claims whose
    /// signature was verified earlier.
    pub fn check_times(&self, claims: &Claims, now: Timestamp) -> Result<(), VerifyError> {
        let now = now.as_second();
        let leeway = i64::try_from(self.leeway_secs).unwrap_or(i64::MAX);
        if now >= claims.exp.saturating_add(leeway) {
            return Err(VerifyError::Expired);
        }
        if now.saturating_add(leeway) < claims.nbf {
            return Err(VerifyError::NotYetValid);
        }
        Ok(())
    }
}

fn map_error(e: jsonwebtoken::errors::Error) -> VerifyError {
    match e.kind() {
        ErrorKind::InvalidSignature => VerifyError::BadSignature,
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
        ErrorKind::InvalidAudience => VerifyError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => VerifyError::MissingClaim(c.clone()),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
            VerifyError::UnsupportedAlgorithm(String::new())
        }
        ErrorKind::Json(j) => {
            let msg = j.to_string();
            match msg.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
                Some(field) => VerifyError::MissingClaim(field.to_string()),
                None => VerifyError::Malformed(format!("claims: {msg}")),
            }
        }
        other => VerifyError::Malformed(format!("{other:?}")),
    }
}

/// Decodes a JWT's header without verifying anything.
pub fn peek_header(token: &str) -> Result<serde_json::Value, VerifyError> {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(VerifyError::Malformed("a JWT has three dot-separated parts".into()));
    };
    let raw = B64.decode(h).map_err(|e| VerifyError::Malformed(format!("header: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|e| VerifyError::Malformed(format!("header: {e}")))?;
    if !v.is_object() {
        return Err(VerifyError::Malformed("header is not a JSON object".into()));
    }
    Ok(v)
}

/// Decodes a JWT's claims without verifying anything (for `deputy token inspect`).
pub fn peek_claims(token: &str) -> Result<serde_json::Value, VerifyError> {
    peek_header(token)?;
    let payload = token.split('.').nth(1).unwrap_or("");
    let raw = B64.decode(payload).map_err(|e| VerifyError::Malformed(format!("payload: {e}")))?;
    serde_json::from_slice(&raw).map_err(|e| VerifyError::Malformed(format!("payload: {e}")))
}
