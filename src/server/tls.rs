//! TLS for the token port: a certificate/key file pair (PEM), re-read when the files change
//! (cert-manager and the kubelet replace mounted Secrets in place), served with rustls.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How often the files' modification times are checked, at most.

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, String),
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("the private key is not usable: {0}")]
    Key(String),
}

fn mtime(p: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Loads a certificate chain and its key.
pub fn load(cert: &PathBuf, key: &PathBuf) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Read(cert.clone(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read(cert.clone(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.clone()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Read(key.clone(), e.to_string()))?;
    let signing =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der).map_err(|e| TlsError::Key(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

struct Current {
    key: Arc<CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

/// A certificate resolver that reloads its files when they change; a broken new pair is
/// logged and the previous one kept.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    /// How often the files' modification times are checked.
    every: Duration,
    current: RwLock<Current>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert").field("cert", &self.cert).field("key", &self.key).finish()
    }
}

impl ReloadingCert {
    pub fn new(cert: PathBuf, key: PathBuf, every: Duration) -> Result<ReloadingCert, TlsError> {
        let loaded = load(&cert, &key)?;
        let stamps = (mtime(&cert), mtime(&key));
        Ok(ReloadingCert {
            cert,
            key,
            every,
            current: RwLock::new(Current { key: loaded, stamps, checked: Instant::now() }),
        })
    }

    fn maybe_reload(&self) {
        let due = self.current.read().map(|c| c.checked.elapsed() >= self.every).unwrap_or(false);
        if !due {
            return;
        }
        let stamps = (mtime(&self.cert), mtime(&self.key));
        let Ok(mut cur) = self.current.write() else { return };
        cur.checked = Instant::now();
        if cur.stamps == stamps {
            return;
        }
        match load(&self.cert, &self.key) {
            Ok(k) => {
                tracing::info!(cert = %self.cert.display(), "reloaded TLS certificate");
                cur.key = k;
                cur.stamps = stamps;
            }
            Err(e) => tracing::warn!(error = %e, "new TLS files are not usable; keeping the previous certificate"),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.maybe_reload();
        self.current.read().ok().map(|c| c.key.clone())
    }
}

/// A rustls server config using the reloading resolver.
pub fn server_config(resolver: Arc<ReloadingCert>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions();
    let mut cfg = match builder {
        Ok(b) => b.with_no_client_auth().with_cert_resolver(resolver),
        Err(_) => rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(resolver),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}
