//! File discovery adapter: a watched YAML file of services and endpoints, the default platform of
//! local mode (`trellis demo`) and a simple way to describe workloads no registry knows.
//!
//! ```no_run
//! # async fn demo() {
//! use futures::StreamExt;
//! use trellis_discovery::{Discovery, ServiceKey};
//!
//! let discovery = trellis_adapter_file::file_discovery("mesh.yaml");
//! let mut web_v2 = discovery.watch(ServiceKey::new("demo", "web-v2"));
//! while let Some(snapshot) = web_v2.next().await {
//!     println!("{snapshot:?}");
//! }
//! # }
//! ```
//!
//! - The format is described in [`format`] (and `examples/demo.yaml`, which is also [`DEMO_YAML`]).
//! - The file is watched with OS change events and polled every 250 ms as the fallback (see
//!   [`FileDiscovery::with_poll_interval`]); one task per adapter instance serves every watch.
//! - A bad edit (invalid YAML, unknown field, bad address, duplicate service...) is yielded as an
//!   `Err` item whose message says `file:line:column: field path: what`; the last good content stays
//!   in force. A missing or unreadable file is an `Unavailable` error, the same way. When the file
//!   is good again, every watch yields its snapshot again (even if unchanged), so consumers see the
//!   staleness end.
//! - An empty file is an error, not an empty catalog: it is most likely caught mid-write.
//! - Identity: the endpoint's `service_account`, else the service name; namespace = the service's.
//!   Owner: as written, else `Service/<name>`. Provenance: `file:<path>`, confirmed when read.
//! - Addresses (transparent mode): a service may declare `addresses: [IP, ...]`, its virtual
//!   addresses; [`Discovery::watch_address`] maps them (and every endpoint's address) back to the
//!   service, see [`format`].
//! - Version subsets: [`file_discovery`] wraps the adapter in [`VersionSubsets`] (a watch of `web-v2`
//!   is the service `web-v2` if the file has it, else the `web` endpoints labelled `version: v2`).

pub mod format;
mod poll;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::{self, BoxStream};
use tokio::sync::watch;
use trellis_discovery::{
    AddressOwner, Capabilities, ChangeDelivery, Discovery, DiscoveryError, IdentitySource,
    ServiceCatalog, ServiceKey, Snapshot, SourceId, VersionSubsets,
};

pub use format::{Catalog, DEFAULT_NAMESPACE, ParseError, parse};
use poll::{Published, Shared};

/// The demo file of local mode: services `web` (tag style: instances labelled `version: v1`/`v2`),
/// `api-v1`/`api-v2` (a service per version) and a `client`, on loopback.
pub const DEMO_YAML: &str = include_str!("../examples/demo.yaml");

/// How often the file is looked at without an OS change event (the fallback poll), by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The adapter as the controller should use it: [`FileDiscovery`] with the version-subset
/// convention.
pub fn file_discovery(path: impl Into<PathBuf>) -> VersionSubsets<FileDiscovery> {
    VersionSubsets::new(FileDiscovery::new(path))
}

/// Writes [`DEMO_YAML`] to `dir/demo.yaml` (so a person can edit it while the mesh runs) and
/// returns the path.
pub fn write_demo(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("demo.yaml");
    std::fs::write(&path, DEMO_YAML)?;
    Ok(path)
}

/// The file adapter without the version-subset convention (see [`file_discovery`]).
#[derive(Clone, Debug)]
pub struct FileDiscovery {
    shared: Arc<Shared>,
}

impl FileDiscovery {
    /// Watches `path`. Nothing happens until the first stream is polled (inside a Tokio runtime).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::with_poll_interval(path, DEFAULT_POLL_INTERVAL)
    }

    /// Watches `path`, with `interval` as the fallback poll (OS change events come first).
    pub fn with_poll_interval(path: impl Into<PathBuf>, interval: Duration) -> Self {
        let path = path.into();
        let source: SourceId = Arc::from(format!("file:{}", path.display()));
        Self {
            shared: Shared::new(path, source, interval),
        }
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Follows the published state: yields `view` of the good content whenever it changes (and
    /// again after a failure ends), and each new failure once.
    fn follow<T, F>(&self, view: F) -> BoxStream<'static, Result<T, DiscoveryError>>
    where
        T: Clone + PartialEq + Send + Sync + 'static,
        F: Fn(&Published) -> Option<T> + Send + Sync + 'static,
    {
        let state = Follow {
            shared: self.shared.clone(),
            rx: self.shared.tx.subscribe(),
            sent: None,
            sent_error: 0,
            resend: false,
        };
        let view = Arc::new(view);
        stream::unfold(state, move |mut state| {
            let view = view.clone();
            async move {
                state.shared.ensure_started();
                let item = state.next(&*view).await;
                Some((item, state))
            }
        })
        .boxed()
    }
}

/// One stream's position: what it last yielded.
struct Follow<T> {
    shared: Arc<Shared>,
    rx: watch::Receiver<Published>,
    sent: Option<T>,
    sent_error: u64,
    /// A failure was reported: yield the content again once the file is good.
    resend: bool,
}

impl<T: Clone + PartialEq> Follow<T> {
    async fn next(
        &mut self,
        view: &(dyn Fn(&Published) -> Option<T> + Send + Sync),
    ) -> Result<T, DiscoveryError> {
        loop {
            let published = self.rx.borrow_and_update().clone();
            if published.loaded() {
                if let Some(now) = view(&published) {
                    let recovered = self.resend && published.error.is_none();
                    if self.sent.as_ref() != Some(&now) || recovered {
                        self.sent = Some(now.clone());
                        self.resend = false;
                        return Ok(now);
                    }
                }
                if let Some(failure) = &published.error
                    && failure.seq != self.sent_error
                {
                    self.sent_error = failure.seq;
                    self.resend = true;
                    return Err(DiscoveryError::new(
                        failure.kind,
                        failure.kind == trellis_discovery::ErrorKind::Unavailable,
                        self.shared.source.clone(),
                        failure.message.clone(),
                    ));
                }
            }
            if self.rx.changed().await.is_err() {
                // Cannot happen while we hold `shared` (it owns the sender); never end regardless.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Discovery for FileDiscovery {
    fn source_id(&self) -> SourceId {
        self.shared.source.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivery: ChangeDelivery::Poll(self.shared.interval),
            health: true,
            terminating: true,
            weights: true,
            zones: true,
            owners: true,
            identity: IdentitySource::AttributeOrServiceName,
            version_subsets: false,
        }
    }

    fn services(&self) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
        let source = self.shared.source.clone();
        self.follow(|p| {
            p.good
                .as_ref()
                .map(|c| c.services.keys().cloned().collect::<Vec<_>>())
        })
        .map(move |item| {
            item.map(|services| ServiceCatalog {
                source: source.clone(),
                services,
                observed_at: std::time::SystemTime::now(),
            })
        })
        .boxed()
    }

    fn watch(&self, key: ServiceKey) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
        // Follow the shared set (no copy kept per watch); copy it out only when it is yielded.
        self.follow(move |p| p.good.as_ref().map(|c| c.services.get(&key).cloned()))
            .map(|item| {
                item.map(|set| match set {
                    Some(set) => Snapshot::Endpoints(Arc::unwrap_or_clone(set)),
                    None => Snapshot::NotFound,
                })
            })
            .boxed()
    }

    /// From the index built when the file is read ([`Catalog::owner`]): one map lookup per
    /// change of the file, whatever the number of services.
    fn watch_address(
        &self,
        address: std::net::IpAddr,
    ) -> BoxStream<'static, Result<AddressOwner, DiscoveryError>> {
        self.follow(move |p| p.good.as_ref().map(|c| c.owner(address)))
    }
}
