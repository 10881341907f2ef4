//! An in-process fake Kubernetes API server that speaks the real list/watch protocol over HTTP
//! (test support).
//!
//! Tests and benchmarks point a real `kube::Client` at [`FakeApiServer::url`]: LIST with
//! `resourceVersion`, `limit`/`continue` paging and label/field selectors; WATCH with
//! `resourceVersion`, `allowWatchBookmarks` (BOOKMARK events), `timeoutSeconds`,
//! `sendInitialEvents` and 410 Gone after compaction; GET, POST, PUT, merge PATCH and DELETE; and
//! the discovery documents `/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`.
//!
//! It is generic over resources: objects are JSON stored per (group, version, plural, namespace,
//! name) with one global resourceVersion counter like etcd; [`ResourceType`]s beyond the
//! built-ins (Services, Pods, EndpointSlices, ReplicaSets, Deployments, ...) are added with
//! [`FakeApiServer::register`] (SMI CRDs, for instance). This crate knows nothing of SMI: the
//! server with every SMI kind registered (from `trellis-smi`'s generated CRDs), a `kube::Client`
//! of it and a kubeconfig for a child process are in `trellis-testing` (`testing/support`):
//! `smi_api_server()`, `register_smi`, `smi_type(Kind)`, `kube_client`, `write_kubeconfig`.
//!
//! Faults on demand: [`FakeApiServer::compact`] (watches from older versions get 410 and clients
//! must relist), [`FakeApiServer::close_watches`], [`FakeApiServer::send_bookmarks`], and
//! [`FakeApiServer::begin_outage`] / [`FakeApiServer::end_outage`] (stop listening, then listen
//! again at the same port with the same content).
//!
//! TokenReview: [`FakeApiServer::issue_service_account_token`] makes a ServiceAccount token bound
//! to audiences, and `POST /apis/authentication.k8s.io/v1/tokenreviews` answers for it like a
//! real server (unknown token: not authenticated, with an error string).
//!
//! SubjectAccessReview: [`FakeApiServer::grant`] adds an [`AccessRule`], and `POST
//! /apis/authorization.k8s.io/v1/subjectaccessreviews` allows what some rule allows, as RBAC
//! would (anything else: `allowed: false`).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let server = trellis_kube_fake::FakeApiServer::start().await?;
//! let config = kube::Config::new(server.url().parse().unwrap());
//! # Ok(()) }
//! ```
//!
//! Simplifications (see README.md): paged lists are not a consistent snapshot across pages (later
//! pages show the current state; the following watch replays every change after the first page's
//! version, so clients converge anyway), `resourceVersionMatch=Exact` only for the current
//! version, no admission, schema validation of custom resources, garbage collection or
//! authentication of its own clients; watches of a converted CRD at its storage version only.
//!
//! CRDs: storing a CustomResourceDefinition establishes its served versions; requests at a
//! version other than its storage version are converted through its conversion webhook over
//! HTTPS (`clientConfig.url` and `caBundle`), as the API server does (`conversion.rs`).
//!
//! Validation: every write is validated as a real API server validates it (metadata of every
//! kind, EndpointSlices, Pods, Services; module [`validation`]) and a refused one answers the real
//! 422 `Invalid` status with its `details.causes`, so a test cannot pass here and fail on a real
//! server for a reason the fake ignored.

mod access_review;
mod conversion;
mod error;
mod resources;
mod selector;
mod server;
mod store;
mod token_review;
pub mod validation;

pub use access_review::AccessRule;
pub use error::ApiError;
pub use resources::{ResourceType, builtin};
pub use store::{Stats, Store, WatchStart};
pub use token_review::API_AUDIENCE;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running fake API server on `127.0.0.1:<port>` (or the address of [`Options::listen`]).
/// Dropping it stops it.
#[derive(Debug)]
pub struct FakeApiServer {
    store: Arc<Store>,
    /// ServiceAccount tokens issued for TokenReview.
    tokens: Arc<token_review::Tokens>,
    /// What SubjectAccessReviews allow ([`FakeApiServer::grant`]).
    rules: Arc<access_review::Rules>,
    addr: SocketAddr,
    /// The accept loop and the switch its connections check before each request.
    listener: Mutex<Option<(JoinHandle<()>, server::Serving)>>,
    bookmarks: Option<JoinHandle<()>>,
}

/// How the server behaves beyond the protocol defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Send BOOKMARK events to watches that allow them at this interval (a real server sends
    /// them about once a minute). `None`: only when [`FakeApiServer::send_bookmarks`] is called.
    pub bookmark_interval: Option<Duration>,
    /// The address to listen on (port 0 = any); `None` = `127.0.0.1:0`. Tests whose clients
    /// live in other network namespaces give an address those can reach.
    pub listen: Option<SocketAddr>,
}

impl FakeApiServer {
    /// Starts a server on an ephemeral port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> std::io::Result<Self> {
        let listen = options
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(listen).await?;
        let addr = server::local_addr(&listener)?;
        let store = Arc::new(Store::new());
        let tokens = Arc::new(token_review::Tokens::default());
        let rules = Arc::new(access_review::Rules::default());
        let serving = server::Serving::default();
        let serve = tokio::spawn(server::serve(
            listener,
            Arc::clone(&store),
            Arc::clone(&tokens),
            Arc::clone(&rules),
            serving.clone(),
        ));
        let bookmarks = options.bookmark_interval.map(|every| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    store.send_bookmarks();
                }
            })
        });
        Ok(Self {
            store,
            tokens,
            rules,
            addr,
            listener: Mutex::new(Some((serve, serving))),
            bookmarks,
        })
    }

    /// `http://<address>:<port>`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The state behind the server, for direct reads and writes.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Makes a resource type known (e.g. an SMI CRD).
    pub fn register(&self, resource: ResourceType) {
        self.store.register(resource);
    }

    /// Creates or replaces a typed object (its type must be registered).
    pub fn put<K: k8s_openapi::Resource + Serialize>(&self, object: &K) -> Result<Value, ApiError> {
        let resource = self.resource_of::<K>()?;
        let json = serde_json::to_value(object)
            .map_err(|e| ApiError::bad_request(format!("serializing {}: {e}", K::KIND)))?;
        self.store.apply(&resource, json)
    }

    /// Deletes a typed object by namespace and name.
    pub fn delete<K: k8s_openapi::Resource>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let resource = self.resource_of::<K>()?;
        self.store.delete(&resource, namespace, name)
    }

    fn resource_of<K: k8s_openapi::Resource>(&self) -> Result<ResourceType, ApiError> {
        self.store
            .resource(K::GROUP, K::VERSION, K::URL_PATH_SEGMENT)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "resource type {} ({}) is not registered",
                    K::KIND,
                    K::API_VERSION
                ))
            })
    }

    /// Forgets history up to now (etcd compaction). Returns the compacted version.
    pub fn compact(&self) -> u64 {
        self.store.compact()
    }

    /// Sends a BOOKMARK at the current version to every watch that allows bookmarks.
    pub fn send_bookmarks(&self) {
        self.store.send_bookmarks();
    }

    /// Ends every open watch cleanly; clients resume from their last version.
    pub fn close_watches(&self) {
        self.store.close_watches();
    }

    /// Stops listening and drops every open connection (clients see refused connections).
    /// From the moment this returns, no request is answered: aborting the accept loop drops its
    /// connections only as their tasks are next scheduled, so a connection busy on another
    /// worker thread could otherwise still answer one request after the outage began.
    pub fn begin_outage(&self) {
        if let Some((task, serving)) = self.lock_listener().take() {
            serving.stop();
            task.abort();
        }
        self.store.close_watches();
    }

    /// Listens again at the same port with the same content.
    pub async fn end_outage(&self) -> std::io::Result<()> {
        if self.lock_listener().is_some() {
            return Ok(());
        }
        // The old listener may take a moment to be released after its task is aborted.
        let mut attempt = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    tracing::debug!("rebinding {}: {e}; retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let serving = server::Serving::default();
        let task = tokio::spawn(server::serve(
            listener,
            Arc::clone(&self.store),
            Arc::clone(&self.tokens),
            Arc::clone(&self.rules),
            serving.clone(),
        ));
        *self.lock_listener() = Some((task, serving));
        Ok(())
    }

    fn lock_listener(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(JoinHandle<()>, server::Serving)>> {
        self.listener.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some((task, serving)) = self.lock_listener().take() {
            serving.stop();
            task.abort();
        }
        if let Some(task) = &self.bookmarks {
            task.abort();
        }
    }
}
