//! Signing keys: generation, the key set kept in a Kubernetes Secret, and the JWKS document.
//!
//! # Secret format
//! The Secret holds one data key, [`SECRET_KEY`] (`keys.json`), a JSON document:
//! ```json
//! {
//!   "version": 1,
//!   "activeKid": "Zl1c…",
//!   "keys": [
//!     {"kid": "Zl1c…", "alg": "EdDSA", "createdAt": "2026-11-23T10:00:00Z",
//!      "privateKey": "-----BEGIN PRIVATE KEY-----\n…"},
//!     {"kid": "q0Rr…", "alg": "ES256", "createdAt": "…", "retiredAt": "…",
//!      "publishUntil": "…", "privateKey": "-----BEGIN PRIVATE KEY-----\n…"}
//!   ]
//! }
//! ```
//! `privateKey` is an unencrypted PKCS#8 PEM (what `openssl genpkey -algorithm ED25519`
//! or `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes), so an
//! operator can bring their own keys. `kid` is the RFC 7638 JWK thumbprint of the public key.
//! Exactly one key is active (signs new tokens); retired keys only verify and stay published
//! until `publishUntil`, which is at least the expiry of the last token they signed.

use std::collections::BTreeMap;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The data key of the signing-key Secret.
pub const SECRET_KEY: &str = "keys.json";

/// Signature algorithms Deputy signs with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Alg {
    /// Ed25519 (the default).
    #[default]
    EdDSA,
    /// ECDSA P-256 with SHA-256.
    ES256,
}

impl Alg {
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::EdDSA => "EdDSA",
            Alg::ES256 => "ES256",
        }
    }
    pub fn jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        match self {
            Alg::EdDSA => jsonwebtoken::Algorithm::EdDSA,
            Alg::ES256 => jsonwebtoken::Algorithm::ES256,
        }
    }
}

impl std::str::FromStr for Alg {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "EdDSA" => Ok(Alg::EdDSA),
            "ES256" => Ok(Alg::ES256),
            other => Err(KeyError::UnsupportedAlgorithm(other.to_string())),
        }
    }
}

/// Problems with keys or the key Secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unsupported signing algorithm {0:?} (Deputy signs with EdDSA or ES256)")]
    UnsupportedAlgorithm(String),
    #[error("could not generate a key")]
    Generate,
    #[error("key {kid:?}: not a valid {alg} PKCS#8 private key: {why}")]
    BadPrivateKey { kid: String, alg: &'static str, why: String },
    #[error("key {0:?}: kid does not match the key's thumbprint")]
    KidMismatch(String),
    #[error("the key set is malformed: {0}")]
    Malformed(String),
    #[error("the key set has no active key {0:?}")]
    NoActiveKey(String),
    #[error("signing failed")]
    Sign,
}

/// The stored form of one key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoredKey {
    pub kid: String,
    pub alg: Alg,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_until: Option<Timestamp>,
    pub private_key: String,
}

/// The stored form of the key set (the content of `keys.json`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoredKeySet {
    pub version: u32,
    pub active_kid: String,
    pub keys: Vec<StoredKey>,
}

enum Pair {
    Ed(Ed25519KeyPair),
    Ec(EcdsaKeyPair),
}

/// A parsed private key, ready to sign: parsed once, reused for every token.
pub struct SigningKey {
    pub kid: String,
    pub alg: Alg,
    pair: Pair,
    /// `base64url(header)` followed by `.`: constant for the key, so computed once.
    header_prefix: String,
    public_jwk: serde_json::Value,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

fn thumbprint(jwk_canonical: &str) -> String {
    B64.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, jwk_canonical.as_bytes()))
}

impl SigningKey {
    /// Parses a PKCS#8 DER private key.
    pub fn from_pkcs8(alg: Alg, der: &[u8]) -> Result<SigningKey, KeyError> {
        let bad = |why: String| KeyError::BadPrivateKey { kid: String::new(), alg: alg.as_str(), why };
        let (pair, jwk_canonical, jwk) = match alg {
            Alg::EdDSA => {
                let kp = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| bad(e.to_string()))?;
                let x = B64.encode(kp.public_key().as_ref());
                let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
                (Pair::Ed(kp), canonical, json!({"kty": "OKP", "crv": "Ed25519", "x": x}))
            }
            Alg::ES256 => {
                let kp =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).map_err(|e| bad(e.to_string()))?;
                let point = kp.public_key().as_ref();
                // Uncompressed SEC1 point: 0x04 || x (32 bytes) || y (32 bytes).
                if point.len() != 65 || point[0] != 4 {
                    return Err(bad("unexpected public key encoding".into()));
                }
                let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
                let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
                (Pair::Ec(kp), canonical, json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}))
            }
        };
        let kid = thumbprint(&jwk_canonical);
        let header = json!({"alg": alg.as_str(), "kid": kid, "typ": "at+jwt"});
        let header_prefix = format!("{}.", B64.encode(header.to_string()));
        let mut public_jwk = jwk;
        if let Some(obj) = public_jwk.as_object_mut() {
            obj.insert("kid".into(), json!(kid));
            obj.insert("alg".into(), json!(alg.as_str()));
            obj.insert("use".into(), json!("sig"));
        }
        Ok(SigningKey { kid, alg, pair, header_prefix, public_jwk })
    }

    /// Generates a new key; returns it with its PKCS#8 DER encoding.
    pub fn generate(alg: Alg) -> Result<(SigningKey, Vec<u8>), KeyError> {
        let rng = SystemRandom::new();
        let der = match alg {
            Alg::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Generate)?,
            Alg::ES256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|_| KeyError::Generate)?
            }
        };
        let der = der.as_ref().to_vec();
        Ok((SigningKey::from_pkcs8(alg, &der)?, der))
    }

    /// The public key as a JWK (with `kid`, `alg`, `use`).
    pub fn public_jwk(&self) -> &serde_json::Value {
        &self.public_jwk
    }

    /// Signs a JWT whose payload is the already-serialised claims. The header is fixed per
    /// key (`alg`, `kid`, `typ: at+jwt`) and was encoded once when the key was parsed.
    pub fn sign_payload(&self, payload_json: &[u8]) -> Result<String, KeyError> {
        let payload_len = base64::encoded_len(payload_json.len(), false).unwrap_or(0);
        let mut out = String::with_capacity(self.header_prefix.len() + payload_len + 100);
        out.push_str(&self.header_prefix);
        B64.encode_string(payload_json, &mut out);
        let sig = match &self.pair {
            Pair::Ed(kp) => kp.try_sign(out.as_bytes()).map_err(|_| KeyError::Sign)?,
            Pair::Ec(kp) => kp.sign(&SystemRandom::new(), out.as_bytes()).map_err(|_| KeyError::Sign)?,
        };
        out.push('.');
        B64.encode_string(sig.as_ref(), &mut out);
        Ok(out)
    }

    /// Serialises `claims` and signs them.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, KeyError> {
        let payload = serde_json::to_vec(claims).map_err(|e| KeyError::Malformed(e.to_string()))?;
        self.sign_payload(&payload)
    }
}

/// A key in the set: parsed, with its lifecycle.
#[derive(Debug)]
pub struct KeyEntry {
    pub key: SigningKey,
    pub created_at: Timestamp,
    pub retired_at: Option<Timestamp>,
    pub publish_until: Option<Timestamp>,
    pem: String,
}

/// The operator's signing keys: one active, zero or more retired but still published.
#[derive(Debug)]
pub struct KeySet {
    active: usize,
    keys: Vec<KeyEntry>,
}

fn to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("PRIVATE KEY", der.to_vec()))
}

impl KeySet {
    /// A new set with one freshly generated active key.
    pub fn generate(alg: Alg, now: Timestamp) -> Result<KeySet, KeyError> {
        let (key, der) = SigningKey::generate(alg)?;
        Ok(KeySet {
            active: 0,
            keys: vec![KeyEntry { key, created_at: now, retired_at: None, publish_until: None, pem: to_pem(&der) }],
        })
    }

    /// The key that signs new tokens.
    pub fn active(&self) -> &SigningKey {
        &self.keys[self.active].key
    }

    /// When the active key was created.
    pub fn active_created_at(&self) -> Timestamp {
        self.keys[self.active].created_at
    }

    /// Every key, active and retired.
    pub fn keys(&self) -> impl Iterator<Item = &KeyEntry> {
        self.keys.iter()
    }

    /// Makes a new key active. The old active key is retired and stays published until
    /// `now + max_token_lifetime` (no token it signed can live longer); keys whose
    /// publication has ended are dropped.
    pub fn rotate(&mut self, alg: Alg, now: Timestamp, max_token_lifetime: SignedDuration) -> Result<(), KeyError> {
        let (key, der) = SigningKey::generate(alg)?;
        let old = &mut self.keys[self.active];
        old.retired_at = Some(now);
        old.publish_until = Some(now.checked_add(max_token_lifetime).unwrap_or(Timestamp::MAX));
        self.keys.push(KeyEntry { key, created_at: now, retired_at: None, publish_until: None, pem: to_pem(&der) });
        self.active = self.keys.len() - 1;
        self.prune(now);
        Ok(())
    }

    /// Drops retired keys whose publication ended at or before `now`.
    pub fn prune(&mut self, now: Timestamp) {
        let active_kid = self.active().kid.clone();
        self.keys.retain(|k| k.retired_at.is_none() || k.publish_until.is_some_and(|u| u > now));
        self.active = self.keys.iter().position(|k| k.key.kid == active_kid).unwrap_or(0);
    }

    /// The public keys as a JWKS document (RFC 7517), active key first.
    pub fn jwks(&self) -> serde_json::Value {
        let mut keys = vec![self.active().public_jwk().clone()];
        keys.extend(
            self.keys.iter().enumerate().filter(|(i, _)| *i != self.active).map(|(_, k)| k.key.public_jwk().clone()),
        );
        json!({ "keys": keys })
    }

    /// The stored form.
    pub fn to_stored(&self) -> StoredKeySet {
        StoredKeySet {
            version: 1,
            active_kid: self.active().kid.clone(),
            keys: self
                .keys
                .iter()
                .map(|k| StoredKey {
                    kid: k.key.kid.clone(),
                    alg: k.key.alg,
                    created_at: k.created_at,
                    retired_at: k.retired_at,
                    publish_until: k.publish_until,
                    private_key: k.pem.clone(),
                })
                .collect(),
        }
    }

    /// Parses the stored form, checking every key and that each `kid` is its thumbprint.
    pub fn from_stored(stored: &StoredKeySet) -> Result<KeySet, KeyError> {
        if stored.version != 1 {
            return Err(KeyError::Malformed(format!("unknown version {}", stored.version)));
        }
        let mut keys = Vec::with_capacity(stored.keys.len());
        for k in &stored.keys {
            let pem = pem::parse(&k.private_key).map_err(|e| KeyError::BadPrivateKey {
                kid: k.kid.clone(),
                alg: k.alg.as_str(),
                why: e.to_string(),
            })?;
            let key = SigningKey::from_pkcs8(k.alg, pem.contents()).map_err(|e| match e {
                KeyError::BadPrivateKey { alg, why, .. } => KeyError::BadPrivateKey { kid: k.kid.clone(), alg, why },
                other => other,
            })?;
            if key.kid != k.kid {
                return Err(KeyError::KidMismatch(k.kid.clone()));
            }
            keys.push(KeyEntry {
                key,
                created_at: k.created_at,
                retired_at: k.retired_at,
                publish_until: k.publish_until,
                pem: k.private_key.clone(),
            });
        }
        let active = keys
            .iter()
            .position(|k| k.key.kid == stored.active_kid)
            .ok_or_else(|| KeyError::NoActiveKey(stored.active_kid.clone()))?;
        Ok(KeySet { active, keys })
    }

    /// The Secret's `data` (raw bytes; the API layer base64-encodes them).
    pub fn to_secret_data(&self) -> Result<BTreeMap<String, Vec<u8>>, KeyError> {
        let json = serde_json::to_vec_pretty(&self.to_stored()).map_err(|e| KeyError::Malformed(e.to_string()))?;
        Ok(BTreeMap::from([(SECRET_KEY.to_string(), json)]))
    }

    /// Loads the set from a Secret's `data`.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<KeySet, KeyError> {
        let raw = data
            .get(SECRET_KEY)
            .ok_or_else(|| KeyError::Malformed(format!("the Secret has no {SECRET_KEY:?} entry")))?;
        let stored: StoredKeySet = serde_json::from_slice(raw).map_err(|e| KeyError::Malformed(e.to_string()))?;
        KeySet::from_stored(&stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of the example Ed25519 key.
        let canonical = r#"{"crv":"Ed25519","kty":"OKP","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
        assert_eq!(thumbprint(canonical), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }

    #[test]
    fn secret_round_trip_keeps_every_key_and_the_active_one() {
        for alg in [Alg::EdDSA, Alg::ES256] {
            let mut set = KeySet::generate(alg, now()).unwrap();
            set.rotate(alg, now(), SignedDuration::from_hours(1)).unwrap();
            let data = set.to_secret_data().unwrap();
            let back = KeySet::from_secret_data(&data).unwrap();
            assert_eq!(back.to_stored(), set.to_stored());
            assert_eq!(back.active().kid, set.active().kid);
            assert_eq!(back.jwks()["keys"].as_array().unwrap().len(), 2);
        }
    }

    #[test]
    fn rotation_publishes_the_old_key_until_its_tokens_expired() {
        let mut set = KeySet::generate(Alg::EdDSA, now()).unwrap();
        let first = set.active().kid.clone();
        set.rotate(Alg::EdDSA, now(), SignedDuration::from_mins(15)).unwrap();
        assert_ne!(set.active().kid, first);
        let kids: Vec<String> =
            set.jwks()["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_string()).collect();
        assert_eq!(
            kids,
            vec![set.active().kid.clone(), first.clone()],
            "active key first, retired key still published"
        );
        set.prune(now() + SignedDuration::from_mins(14));
        assert_eq!(set.keys().count(), 2);
        set.prune(now() + SignedDuration::from_mins(15));
        assert_eq!(set.keys().count(), 1, "retired key dropped once its last token expired");
    }

    #[test]
    fn malformed_secrets_are_rejected_with_reasons() {
        let set = KeySet::generate(Alg::EdDSA, now()).unwrap();
        let mut stored = set.to_stored();
        stored.keys[0].kid = "forged".into();
        assert!(matches!(KeySet::from_stored(&stored), Err(KeyError::KidMismatch(_))));
        let mut stored = set.to_stored();
        stored.active_kid = "nope".into();
        assert!(matches!(KeySet::from_stored(&stored), Err(KeyError::NoActiveKey(_))));
        let mut stored = set.to_stored();
        stored.keys[0].private_key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
        assert!(matches!(KeySet::from_stored(&stored), Err(KeyError::BadPrivateKey { .. })));
        let mut stored = set.to_stored();
        stored.keys[0].alg = Alg::ES256;
        assert!(matches!(KeySet::from_stored(&stored), Err(KeyError::BadPrivateKey { .. })));
        assert!(KeySet::from_secret_data(&BTreeMap::new()).is_err());
        assert!(KeySet::from_secret_data(&BTreeMap::from([(SECRET_KEY.to_string(), b"{".to_vec())])).is_err());
        assert!("RS256".parse::<Alg>().is_err());
    }
}
