//! The webhook's serving certificate, read from a PEM certificate chain and a PEM private key
//! (what cert-manager or a Kubernetes Secret volume provides) and re-read when the files change.
//!
//! [`ReloadingCert`] is a rustls certificate resolver: every handshake gets the current
//! certificate. [`ReloadingCert::spawn_reloader`] watches the files with [`trellis_file_watch`]
//! (OS change events on their directory, which also show a Secret volume's symlink swap, and a
//! poll as the fallback) and swaps in a new pair only when it loads and the key matches the
//! certificate: a half-written or broken pair is reported, the last good one keeps serving, and
//! the pair is read again every poll interval until it is good.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use trellis_file_watch::{FileWatch, Options};

/// Why a certificate/key pair could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM CERTIFICATE block")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM certificate chain: {message}")]
    BadCertificate { path: PathBuf, message: String },
    #[error("{path}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("{key} does not belong to the certificate in {cert}: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

/// A serving certificate from two files, swappable while the server runs.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// The file contents behind `current`, to tell a real change from a poll.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ReloadingCert {
    // The key bytes stay out of Debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair now; fails with what is wrong with which file.
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert_path, key_path) = (cert.into(), key.into());
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        let certified = certified_key(&provider, &cert_path, &cert_pem, &key_path, &key_pem)?;
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            provider,
            current: ArcSwap::from_pointee(certified),
            loaded: Mutex::new((cert_pem, key_pem)),
        }))
    }

    /// Re-reads the files; swaps the certificate in when they changed and are good. `Ok(true)`
    /// when a new certificate is now served, `Ok(false)` when nothing changed; on error the
    /// previous certificate stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = (read(&self.cert_path)?, read(&self.key_path)?);
        let mut loaded = self.loaded.lock().expect("not poisoned");
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let certified = certified_key(
            &self.provider,
            &self.cert_path,
            &cert_pem,
            &self.key_path,
            &key_pem,
        )?;
        self.current.store(Arc::new(certified));
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// A rustls server configuration (ring, TLS 1.2 and 1.3, ALPN h2 and http/1.1) that serves
    /// this certificate.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Watches the files (`every` is the fallback poll) and reloads on change, logging a change
    /// or a failure (once per distinct failure). Stops when the returned task is aborted.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        let paths = [self.cert_path.clone(), self.key_path.clone()];
        // Started here, not in the task: a change right after this call is seen.
        let mut files = FileWatch::new(paths, Options::poll(every));
        tokio::spawn(async move {
            let mut last_error = None;
            // The first look is at once: the files may have changed since `load` read them
            // (`reload` compares the bytes, so an unchanged pair costs two reads).
            let mut look = true;
            loop {
                if !look {
                    let changed = files.changed_or_after(every).await;
                    // Retry while in error: a renewal may be half-written at the first look.
                    look = changed || last_error.is_some();
                    continue;
                }
                look = false;
                let cert = Arc::clone(&this);
                let result = tokio::task::spawn_blocking(move || cert.reload())
                    .await
                    .expect("reload does not panic");
                match result {
                    Ok(true) => {
                        tracing::info!(
                            "webhook: serving the new certificate from {:?}",
                            this.cert_path
                        );
                        last_error = None;
                    }
                    Ok(false) => last_error = None,
                    Err(error) => {
                        let message = error.to_string();
                        if last_error.as_ref() != Some(&message) {
                            tracing::warn!("webhook: keeping the previous certificate: {message}");
                            last_error = Some(message);
                        }
                    }
                }
            }
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certified_key(
    provider: &CryptoProvider,
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::BadCertificate {
            path: cert_path.to_owned(),
            message: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| TlsError::BadKey {
        path: key_path.to_owned(),
        message: error.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|error| TlsError::Mismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        message: error.to_string(),
    })
}
