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
}

impl KeyMaterial {
    pub fn new(issuer: &str, set: KeySet, resource_version: Option<String>) -> Result<KeyMaterial, KeyError> {
        let verifier = Verifier::from_key_set(issuer, &set, DEFAULT_LEEWAY_SECS)
            .map_err(|e| KeyError::Malformed(e.to_string()))?;
        let jwks = bytes::Bytes::from(set.jwks().to_string());
        Ok(KeyMaterial { set, verifier, jwks, resource_version })
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

    /// Reloads from a Secret when its resourceVersion changed.
    pub fn reload_from(&self, secret: &Secret) -> Result<bool, KeyError> {
        let rv = secret.metadata.resource_version.clone();
        if rv.is_some() && self.get().resource_version == rv {
            return Ok(false);
        }
        let set = key_set_from_secret(secret)?;
        self.replace(KeyMaterial::new(&self.issuer, set, rv)?);
        Ok(true)
    }
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
    if now.as_second() - set.active_created_at().as_second() < every.as_secs() {
        set.prune(now);
        return Ok(false);
    }
    set.rotate(alg, now, max_token_lifetime)?;
    let mut updated = secret_for(&set, namespace, name)?;
    updated.metadata.resource_version = secret.metadata.resource_version.clone();
    match api.replace(name, &PostParams::default(), &updated).await {
        Ok(saved) => {
            tracing::info!(kid = %set.active().kid, "rotated signing keys");
            store.replace(KeyMaterial::new(store.issuer(), set, saved.metadata.resource_version)?);
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}
