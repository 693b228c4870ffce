//! The operator's signing keys at run time: loaded from (or created in) a Secret, shared by
//! the controller (which mints run tokens) and the token endpoint (which mints exchanged
//! tokens and verifies both), and swapped atomically when the Secret changes.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::tokens::verify::DEFAULT_LEEWAY_SECS;
use crate::tokens::{Alg, KeyError, KeySet, Verifier};

/// Everything derived from one version of the key set.
#[derive(Debug)]
pub struct KeyMaterial {
    pub set: KeySet,
    pub verifier: Verifier,
    /// The JWKS document, serialised once.
    pub jwks: bytes::Bytes,
    /// The Secret's resourceVersion this was loaded from (None if not from a Secret).
    pub resource_version: Option<String>,
    /// Claims of tokens whose signature and claims verified with exactly these keys, by the
    /// SHA-256 of the token. An agent presents the same run token for many exchanges; the
    /// signature check is most of an exchange's cost. Times are re-checked on every use, and a
    /// key change replaces this whole struct, so a removed key cannot keep a token valid.
    verified: quick_cache::sync::Cache<[u8; 32], Verified, ByWeight>,
}

/// The most bytes the verified-token cache holds (estimated from the tokens' sizes): a client
/// sending many large tokens evicts the least recently used instead of growing the process.
pub const VERIFIED_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// A verified token's claims and the bytes they are counted as.
#[derive(Clone)]
struct Verified {
    claims: Arc<crate::tokens::Claims>,
    weight: u64,
}

/// Weighs a cache entry by its recorded size.
#[derive(Clone, Copy, Default)]
struct ByWeight;

impl quick_cache::Weighter<[u8; 32], Verified> for ByWeight {
    fn weight(&self, _: &[u8; 32], v: &Verified) -> u64 {
        v.weight
    }
}

/// What a verified token is counted as: its claims decoded take about twice its length (the
/// base64 payload is 4/3 of the JSON, and each string has a header), plus the key and entry.
fn weight_of(token: &str) -> u64 {
    u64::try_from(token.len()).unwrap_or(u64::MAX).saturating_mul(2).saturating_add(128)
}

fn verified_cache() -> quick_cache::sync::Cache<[u8; 32], Verified, ByWeight> {
    quick_cache::sync::Cache::with_weighter(16_384, VERIFIED_CACHE_BYTES, ByWeight)
}

impl KeyMaterial {
    pub fn new(issuer: &str, set: KeySet, resource_version: Option<String>) -> Result<KeyMaterial, KeyError> {
        let verifier = Verifier::from_key_set(issuer, &set, DEFAULT_LEEWAY_SECS)
            .map_err(|e| KeyError::Malformed(e.to_string()))?;
        let jwks = bytes::Bytes::from(set.jwks().to_string());
        Ok(KeyMaterial { set, verifier, jwks, resource_version, verified: verified_cache() })
    }

    /// Verifies a Deputy token for any audience, reusing an earlier successful verification of
    /// the very same token (its time bounds are checked again, against `now`).
    pub fn verify_any_audience(&self, token: &str) -> Result<crate::tokens::Claims, crate::tokens::VerifyError> {
        let now = Timestamp::now();
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(d.as_ref());
        if let Some(v) = self.verified.get(&key) {
            self.verifier.check_times(&v.claims, now)?;
            return Ok((*v.claims).clone());
        }
        let claims = self.verifier.verify_at(token, crate::tokens::AudienceCheck::Any, now)?;
        self.verified.insert(key, Verified { claims: Arc::new(claims.clone()), weight: weight_of(token) });
        Ok(claims)
    }
}

/// The current key material, replaced as a whole.
#[derive(Debug)]
pub struct KeyStore {
    issuer: String,
    current: RwLock<Arc<KeyMaterial>>,
}

impl KeyStore {
    pub fn new(issuer: &str, material: KeyMaterial) -> KeyStore {
        KeyStore { issuer: issuer.to_string(), current: RwLock::new(Arc::new(material)) }
    }

    /// The current keys (cheap: one Arc clone).
    pub fn get(&self) -> Arc<KeyMaterial> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the keys.
    pub fn replace(&self, material: KeyMaterial) {
        let mut g = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *g = Arc::new(material);
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Stops publishing and trusting retired keys whose `publishUntil` is at or before `now`
    /// (every replica runs this; the leader also removes them from the Secret). Returns
    /// whether any key went.
    pub fn prune(&self, now: Timestamp) -> Result<bool, KeyError> {
        let current = self.get();
        if !current.set.keys().any(|k| expired(k, now)) {
            return Ok(false);
        }
        let mut set = KeySet::from_stored(&current.set.to_stored())?;
        set.prune(now);
        self.replace(KeyMaterial::new(&self.issuer, set, current.resource_version.clone())?);
        Ok(true)
    }

    /// Reloads from a Secret when its resourceVersion changed.
    pub fn reload_from(&self, secret: &Secret) -> Result<bool, KeyError> {
        let rv = secret.metadata.resource_version.clone();
        if rv.is_some() && self.get().resource_version == rv {
            return Ok(false);
        }
        let mut set = key_set_from_secret(secret)?;
        // A Secret may still hold keys past their publication (the leader prunes it later).
        set.prune(Timestamp::now());
        self.replace(KeyMaterial::new(&self.issuer, set, rv)?);
        Ok(true)
    }
}

/// Whether a retired key's publication has ended at `now`.
fn expired(k: &crate::tokens::keys::KeyEntry, now: Timestamp) -> bool {
    k.retired_at.is_some() && k.publish_until.is_none_or(|u| u <= now)
}

/// Problems loading or creating the key Secret.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("signing keys: {0}")]
    Key(#[from] KeyError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

fn key_set_from_secret(secret: &Secret) -> Result<KeySet, KeyError> {
    let data: BTreeMap<String, Vec<u8>> =
        secret.data.clone().unwrap_or_default().into_iter().map(|(k, ByteString(v))| (k, v)).collect();
    KeySet::from_secret_data(&data)
}

/// The Secret holding `set`.
pub fn secret_for(set: &KeySet, namespace: &str, name: &str) -> Result<Secret, KeyError> {
    let data = set.to_secret_data()?.into_iter().map(|(k, v)| (k, ByteString(v))).collect();
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_string(), "deputy".to_string()),
                ("app.kubernetes.io/component".to_string(), "signing-keys".to_string()),
                ("app.kubernetes.io/managed-by".to_string(), "deputy".to_string()),
            ])),
            ..Default::default()
        },
        type_: Some("deputy.dev/signing-keys".to_string()),
        data: Some(data),
        ..Default::default()
    })
}

/// Loads the key set from the Secret, creating it with a fresh key when it does not exist.
/// Replicas race safely: one create wins, the others get 409 and load the winner's keys.
pub async fn load_or_create(
    api: &Api<Secret>,
    issuer: &str,
    namespace: &str,
    name: &str,
    alg: Alg,
) -> Result<KeyMaterial, SigningError> {
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(name).await? {
            let set = key_set_from_secret(&secret)?;
            return Ok(KeyMaterial::new(issuer, set, secret.metadata.resource_version)?);
        }
        let set = KeySet::generate(alg, Timestamp::now())?;
        match api.create(&PostParams::default(), &secret_for(&set, namespace, name)?).await {
            Ok(created) => {
                tracing::info!(secret = name, kid = %set.active().kid, "created signing keys");
                return Ok(KeyMaterial::new(issuer, set, created.metadata.resource_version)?);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SigningError::Key(KeyError::Malformed(format!("could not create or load Secret {namespace}/{name}"))))
}

/// Writes the keys in memory back to the Secret `name` when it is gone (`current: None`) or
/// unusable: a deleted or corrupted Secret must not cost every replica its keys (the tokens
/// already issued stay valid). A create that finds the Secret again, or a replace that finds
/// it changed (another replica restored it first), is fine. Returns whether it wrote.
pub async fn restore(
    api: &Api<Secret>,
    store: &KeyStore,
    namespace: &str,
    name: &str,
    current: Option<&Secret>,
) -> Result<bool, SigningError> {
    let material = store.get();
    let mut secret = secret_for(&material.set, namespace, name)?;
    let written = match current {
        None => api.create(&PostParams::default(), &secret).await,
        Some(old) => {
            if key_set_from_secret(old).is_ok() {
                return Ok(false);
            }
            secret.metadata.resource_version = old.metadata.resource_version.clone();
            api.replace(name, &PostParams::default(), &secret).await
        }
    };
    match written {
        Ok(saved) => {
            store.replace(KeyMaterial::new(
                store.issuer(),
                KeySet::from_stored(&material.set.to_stored())?,
                saved.metadata.resource_version,
            )?);
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Rotates the keys in the Secret if the active key is older than `every`; a stale write
/// (another replica rotated first) gets 409 and is not retried. Returns whether it rotated.
pub async fn rotate_if_due(
    api: &Api<Secret>,
    store: &KeyStore,
    namespace: &str,
    name: &str,
    alg: Alg,
    every: SignedDuration,
    max_token_lifetime: SignedDuration,
) -> Result<bool, SigningError> {
    let Some(secret) = api.get_opt(name).await? else { return Ok(false) };
    let mut set = key_set_from_secret(&secret)?;
    let now = Timestamp::now();
    let due = now.as_second() - set.active_created_at().as_second() >= every.as_secs();
    let stale = set.keys().any(|k| expired(k, now));
    if !due && !stale {
        return Ok(false);
    }
    if due {
        set.rotate(alg, now, max_token_lifetime)?;
    } else {
        // Not due, but keys past their publication are still in the Secret: remove them.
        set.prune(now);
    }
    let mut updated = secret_for(&set, namespace, name)?;
    updated.metadata.resource_version = secret.metadata.resource_version.clone();
    match api.replace(name, &PostParams::default(), &updated).await {
        Ok(saved) => {
            if due {
                tracing::info!(kid = %set.active().kid, "rotated signing keys");
            } else {
                tracing::info!("removed retired signing keys past their publication");
            }
            store.replace(KeyMaterial::new(store.issuer(), set, saved.metadata.resource_version)?);
            Ok(due)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::{RunRef, RunTokenSpec, VerifyError};

    fn token(set: &KeySet, iat: Timestamp, ttl_secs: i64) -> String {
        token_with_task(set, iat, ttl_secs, "t")
    }

    fn token_with_task(set: &KeySet, iat: Timestamp, ttl_secs: i64, task: &str) -> String {
        let actors = vec!["spiffe://td/ns/n/agent/a/run/r".to_string()];
        let claims = RunTokenSpec {
            issuer: "https://deputy",
            principal: "alice@example.com",
            audiences: &["svc".to_string()],
            identity: &actors[0],
            scope: "a:b".into(),
            authority: [("svc".to_string(), "a:b".to_string())].into(),
            actors: &actors,
            run: RunRef { namespace: "n".into(), name: "r".into(), uid: "u".into() },
            task,
            issued_at: iat,
            ttl: SignedDuration::from_secs(ttl_secs),
            not_after: iat + SignedDuration::from_hours(1),
        }
        .claims();
        set.active().sign(&claims).unwrap()
    }

    #[test]
    fn the_verified_cache_rechecks_time_and_dies_with_the_keys() {
        let set = KeySet::generate(Alg::EdDSA, Timestamp::now()).unwrap();
        let material = KeyMaterial::new("https://deputy", set, None).unwrap();
        let good = token(&material.set, Timestamp::now(), 600);
        assert!(material.verify_any_audience(&good).is_ok());
        assert!(material.verify_any_audience(&good).is_ok(), "second use from the cache");
        assert_eq!(material.verified.len(), 1);
        // An expired token is refused even when its signature was verified before.
        let short = token(&material.set, Timestamp::now() - SignedDuration::from_secs(100), 1);
        assert_eq!(material.verify_any_audience(&short), Err(VerifyError::Expired));
        // A tampered token has another digest: full verification, refused.
        let mut bad = good.clone();
        let last = bad.pop();
        bad.push(if last == Some('A') { 'B' } else { 'A' });
        assert!(material.verify_any_audience(&bad).is_err());
        // New keys (rotation/removal) start with an empty cache.
        let other =
            KeyMaterial::new("https://deputy", KeySet::generate(Alg::EdDSA, Timestamp::now()).unwrap(), None).unwrap();
        assert!(matches!(other.verify_any_audience(&good), Err(VerifyError::UnknownKey(_))));
    }

    #[test]
    fn a_retired_key_stops_being_published_and_trusted_at_publish_until() {
        let t0 = Timestamp::now();
        let mut set = KeySet::generate(Alg::EdDSA, t0).unwrap();
        let old_token = token(&set, t0, 600);
        set.rotate(Alg::EdDSA, t0, SignedDuration::from_mins(15)).unwrap();
        let store = KeyStore::new("https://deputy", KeyMaterial::new("https://deputy", set, Some("7".into())).unwrap());
        assert!(store.get().verify_any_audience(&old_token).is_ok(), "the retired key still verifies");
        assert!(!store.prune(t0 + SignedDuration::from_mins(14)).unwrap());
        assert_eq!(store.get().set.keys().count(), 2);
        // At publishUntil it leaves the JWKS and no longer verifies anything.
        assert!(store.prune(t0 + SignedDuration::from_mins(15)).unwrap());
        let now = store.get();
        assert_eq!(now.set.keys().count(), 1);
        let jwks: serde_json::Value = serde_json::from_slice(&now.jwks).unwrap();
        assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(1));
        assert!(matches!(now.verify_any_audience(&old_token), Err(VerifyError::UnknownKey(_))));
        // The Secret's version is kept: the same Secret is not reloaded over the pruned keys.
        assert_eq!(now.resource_version.as_deref(), Some("7"));
    }

    #[test]
    fn fat_tokens_evict_each_other_instead_of_growing_the_cache() {
        let set = KeySet::generate(Alg::EdDSA, Timestamp::now()).unwrap();
        let material = KeyMaterial::new("https://deputy", set, None).unwrap();
        // 2,000 distinct 23 KB tokens: about 90 MiB if they were all kept.
        let fat = "x".repeat(17_000);
        let mut bytes = 0u64;
        for i in 0..2_000 {
            let t = token_with_task(&material.set, Timestamp::now(), 600, &format!("{fat}{i}"));
            bytes += weight_of(&t);
            assert!(material.verify_any_audience(&t).is_ok());
        }
        assert!(bytes > 2 * VERIFIED_CACHE_BYTES, "the test sends more than the cache holds ({bytes})");
        assert!(material.verified.weight() <= VERIFIED_CACHE_BYTES, "{} bytes kept", material.verified.weight());
        assert!(material.verified.len() < 2_000);
    }
}
