//! Where the CA's material comes from and how it is kept current: PEM files (watched with
//! [`trellis_file_watch`]: OS change events, and a poll as the fallback; reloaded on change), a
//! Kubernetes Secret (`ca.crt`, `tls.crt`, `tls.key`, polled; read by `crate::kubernetes`), or generated in memory for local
//! use.
//!
//! A reload builds a whole new [`Authority`] and swaps it in only when every check passes; a bad
//! or half-written set of files keeps the last good CA signing (and is retried on every poll
//! interval, so the second half of a rotation written a moment later is picked up). Trust-bundle rotation
//! without downtime: add the new anchor next to the old one (both PEM blocks in the anchor file,
//! or both keys' certificates in `ca.crt`), then switch the issuer, then drop the old anchor once
//! every leaf it signed has expired; each step reaches proxies with their next certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use trellis_file_watch::{FileWatch, Options};

use super::ca::{Authority, CaError, CaMaterial, PemInput, generate};

/// Where the CA comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CaSource {
    /// Generated in memory at start (local use; logged as such). Proxies of another controller
    /// process do not trust it.
    #[default]
    Generated,
    /// PEM files: trust anchors (each file may hold several certificates), issuer certificate
    /// and its PKCS#8 key.
    Files {
        anchors: Vec<PathBuf>,
        issuer_cert: PathBuf,
        issuer_key: PathBuf,
    },
    /// A Kubernetes Secret with `ca.crt` (anchors), `tls.crt` (issuer) and `tls.key`.
    Secret { namespace: String, name: String },
}

impl fmt::Display for CaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaSource::Generated => write!(f, "generated in memory (local use)"),
            CaSource::Files {
                anchors,
                issuer_cert,
                ..
            } => write!(
                f,
                "files: anchors {}, issuer {}",
                anchors
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                issuer_cert.display()
            ),
            CaSource::Secret { namespace, name } => write!(f, "Secret {namespace}/{name}"),
        }
    }
}

/// The CA in force and its reload errors.
#[derive(Clone)]
pub struct CaHandle {
    pub(crate) current: Arc<ArcSwap<Authority>>,
    pub(crate) errors: watch::Receiver<Option<CaError>>,
}

impl fmt::Debug for CaHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaHandle")
            .field("current", &self.current.load())
            .finish_non_exhaustive()
    }
}

impl CaHandle {
    pub fn current(&self) -> Arc<Authority> {
        self.current.load_full()
    }

    /// The error of the last reload (`None` once a reload succeeds).
    pub fn errors(&self) -> watch::Receiver<Option<CaError>> {
        self.errors.clone()
    }
}

fn read(path: &Path) -> Result<PemInput, CaError> {
    let origin = path.display().to_string();
    let pem =
        std::fs::read(path).map_err(|e| CaError::new(&origin, format!("cannot read: {e}")))?;
    Ok(PemInput { origin, pem })
}

fn read_files(anchors: &[PathBuf], cert: &Path, key: &Path) -> Result<CaMaterial, CaError> {
    Ok(CaMaterial {
        anchors: anchors.iter().map(|p| read(p)).collect::<Result<_, _>>()?,
        issuer_cert: read(cert)?,
        issuer_key: read(key)?,
    })
}

/// Publishes a reload result: swaps in a good CA, or reports a new error once.
pub(crate) fn publish(
    current: &ArcSwap<Authority>,
    errors: &watch::Sender<Option<CaError>>,
    result: Result<Authority, CaError>,
) {
    match result {
        Ok(authority) => {
            if authority.version() != current.load().version() {
                tracing::info!(
                    "CA reloaded: version {}, {} trust anchors",
                    authority.version(),
                    authority.anchors_der().len()
                );
                current.store(Arc::new(authority));
            }
            errors.send_if_modified(|e| e.take().is_some());
        }
        Err(e) => {
            errors.send_if_modified(|old| {
                if old.as_ref() == Some(&e) {
                    return false;
                }
                tracing::warn!("CA reload: {e} (the last good CA keeps signing)");
                *old = Some(e);
                true
            });
        }
    }
}

/// Loads and checks the CA (an error here stops the controller from starting), then keeps it
/// current in the background: files watched with `file_poll` as the fallback poll, a Secret
/// polled every `secret_poll`.
pub async fn start(
    source: &CaSource,
    kube: Option<&crate::kubernetes::Client>,
    file_poll: Duration,
    secret_poll: Duration,
) -> anyhow::Result<CaHandle> {
    match source {
        CaSource::Generated => {
            let (_, errors) = watch::channel(None);
            let material = generate()?;
            let authority = Authority::new(&material)?;
            tracing::info!(
                "CA generated in memory for local use (version {})",
                authority.version()
            );
            Ok(CaHandle {
                current: Arc::new(ArcSwap::from_pointee(authority)),
                errors,
            })
        }
        CaSource::Files {
            anchors,
            issuer_cert,
            issuer_key,
        } => {
            let (errors_tx, errors) = watch::channel(None);
            let mut paths: Vec<PathBuf> = anchors.clone();
            paths.push(issuer_cert.clone());
            paths.push(issuer_key.clone());
            // Watch before reading: a change made while reading is seen.
            let mut files = FileWatch::new(paths, Options::poll(file_poll));
            let authority = Authority::new(&read_files(anchors, issuer_cert, issuer_key)?)?;
            let current = Arc::new(ArcSwap::from_pointee(authority));
            let shared = Arc::downgrade(&current);
            let (anchors, cert, key) = (anchors.clone(), issuer_cert.clone(), issuer_key.clone());
            tokio::spawn(async move {
                loop {
                    let changed = files.changed_or_after(file_poll).await;
                    let Some(current) = shared.upgrade() else {
                        return;
                    };
                    // Retry while in error: a rotation may be half-written at the first look.
                    if !changed && errors_tx.borrow().is_none() {
                        continue;
                    }
                    let result = read_files(&anchors, &cert, &key).and_then(|m| Authority::new(&m));
                    publish(&current, &errors_tx, result);
                }
            });
            Ok(CaHandle { current, errors })
        }
        CaSource::Secret { namespace, name } => {
            crate::kubernetes::ca_from_secret(kube, namespace, name, secret_poll).await
        }
    }
}
