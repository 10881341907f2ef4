//! The proxy-facing gRPC server (`trellis-proxy-api`): `Destinations.Watch` and `Inbound.Watch`
//! served from the [`Index`]'s watch channels, and `Identity.Certify` on the same port, answered
//! by whatever implements [`Certify`] (the controller's CA in `trellis-controller`; this crate
//! needs neither the CA nor any platform's proof checks).
//!
//! A stream registers interest on first use (the index starts watching the services it needs),
//! sends the first complete answer as soon as the index has one, then every change. Streams read
//! only `watch` channels, never a registry, and several quick changes collapse into the latest
//! (a proxy needs the current state, not every intermediate one). Knows nothing of Kubernetes.
//!
//! `Destinations.Watch` takes a name (`web.shop`) or, for connections a proxy intercepted, an
//! original destination `IP:PORT`, answered by [`Index::address`] (a service's virtual address
//! gets its profile, a pod IP its endpoint, an unknown address "not found": forwarded unchanged).
//! A `host:port` whose host is no mesh service name (three labels or more, `api.pay.example:443`)
//! is a destination outside the mesh, answered by [`Index::external`] (an ExternalService's
//! profile, or "not found"); one- and two-label names are always mesh services, so a mesh
//! service is never shadowed by an ExternalService.
//!
//! Every `NotFound` carries the mesh-wide switches: `egress_denied` (`--egress deny`) and the
//! ports ExternalServices declare ([`Index::external_ports`]). When those ports change, a stream
//! whose answer is "not found" sends it again with the new ports (version
//! `<answer version>.<ports generation>`), so a proxy watching an unknown address learns of a
//! newly declared port without asking again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, WatchStream};
use tonic::{Request, Response, Status};
use trellis_discovery::ServiceKey;
use trellis_proxy_api::authority::normalize;
use trellis_proxy_api::v1::{self, destinations_server, identity_server, inbound_server};

use trellis_controller_core::index::{DestinationRx, ExternalPorts, Index};

/// Issues workload certificates for `Identity.Certify`: checks the proof in the request and
/// signs its CSR. The controller's CA implements it; the trait keeps the CA (and the Kubernetes
/// TokenReview behind some proofs) out of this crate.
#[tonic::async_trait]
pub trait Certify: Send + Sync + 'static {
    async fn certify(&self, request: &v1::CertifyRequest) -> Result<v1::CertifyResponse, Status>;
}

/// The tonic service over a [`Certify`] (tonic's generated server wants a sized type).
struct IdentityService(Arc<dyn Certify>);

#[tonic::async_trait]
impl identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<v1::CertifyRequest>,
    ) -> Result<Response<v1::CertifyResponse>, Status> {
        self.0.certify(request.get_ref()).await.map(Response::new)
    }
}

/// Connected proxy streams, for the state and metrics.
#[derive(Debug, Default)]
pub struct StreamCounts {
    pub destinations: AtomicUsize,
    pub inbound: AtomicUsize,
}

/// Decrements a counter when a stream ends.
struct Connected(Arc<StreamCounts>, bool);

impl Connected {
    fn new(counts: &Arc<StreamCounts>, inbound: bool) -> Self {
        counter(counts, inbound).fetch_add(1, Ordering::Relaxed);
        Connected(counts.clone(), inbound)
    }
}

fn counter(counts: &StreamCounts, inbound: bool) -> &AtomicUsize {
    if inbound {
        &counts.inbound
    } else {
        &counts.destinations
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        counter(&self.0, self.1).fetch_sub(1, Ordering::Relaxed);
    }
}

/// The gRPC services over one index.
#[derive(Clone)]
pub struct ProxyApi {
    index: Index,
    counts: Arc<StreamCounts>,
    /// `Identity.Certify`, served on the same port when set.
    identity: Option<Arc<dyn Certify>>,
    /// Said in every `NotFound` answer (`--egress deny`).
    egress_denied: bool,
}

impl std::fmt::Debug for ProxyApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyApi")
            .field("index", &self.index)
            .field("counts", &self.counts)
            .field("identity", &self.identity.is_some())
            .field("egress_denied", &self.egress_denied)
            .finish()
    }
}

impl ProxyApi {
    pub fn new(index: Index, counts: Arc<StreamCounts>) -> Self {
        Self {
            index,
            counts,
            identity: None,
            egress_denied: false,
        }
    }

    /// Tell proxies, with every `NotFound` answer, that the mesh denies egress to destinations
    /// it does not know (`--egress deny`).
    pub fn with_egress_denied(mut self, denied: bool) -> Self {
        self.egress_denied = denied;
        self
    }

    /// Also serves `Identity.Certify` with `certifier`.
    pub fn with_identity(mut self, certifier: Arc<dyn Certify>) -> Self {
        self.identity = Some(certifier);
        self
    }

    /// Serves on `listener` (plaintext) until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        self.serve_incoming(TcpListenerStream::new(listener), shutdown)
            .await
    }

    /// Serves the connections `incoming` yields until `shutdown` completes. The caller accepts
    /// them, so it can put TLS in front (the controller's runtime does, with its CA's serving
    /// certificate) without this crate knowing of certificates.
    pub async fn serve_incoming<I, IO, IE>(
        self,
        incoming: I,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error>
    where
        I: futures::Stream<Item = Result<IO, IE>>,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let identity = self
            .identity
            .clone()
            .map(|certify| identity_server::IdentityServer::new(IdentityService(certify)));
        tonic::transport::Server::builder()
            .add_service(destinations_server::DestinationsServer::new(self.clone()))
            .add_service(inbound_server::InboundServer::new(self))
            .add_optional_service(identity)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

/// Binds `addr` and serves in the background; returns the bound address.
pub async fn spawn(api: ProxyApi, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = api.serve(listener, std::future::pending()).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    Ok(bound)
}

/// `name.namespace` as a service; a single label is in `default`.
fn service_of(name: &str) -> Option<ServiceKey> {
    let mut parts = name.split('.');
    let service = parts.next()?;
    let namespace = parts.next().unwrap_or("default");
    if parts.next().is_some() || service.is_empty() {
        return None;
    }
    Some(ServiceKey::new(namespace, service))
}

#[tonic::async_trait]
impl destinations_server::Destinations for ProxyApi {
    type WatchStream = BoxStream<'static, Result<v1::DestinationUpdate, Status>>;

    async fn watch(
        &self,
        request: Request<v1::DestinationRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let target = &request.get_ref().target;
        let authority = normalize(target)
            .map_err(|e| Status::invalid_argument(format!("target {target:?}: {e}")))?;
        let egress_denied = self.egress_denied;
        let ports = self.index.external_ports();
        let not_found = |reason: String| {
            let update = v1::DestinationUpdate {
                version: "0".into(),
                kind: Some(v1::destination_update::Kind::NotFound(v1::NotFound {
                    reason,
                    egress_denied,
                    external_ports: Vec::new(),
                })),
            };
            // A channel of its own, held by the stream: the answer never changes, the external
            // ports it carries may.
            let (tx, rx) = watch::channel(Some(update));
            Response::new(updates(rx, ports.clone(), egress_denied, Box::new(tx)))
        };
        let rx = if authority.is_ip {
            // An intercepted connection's original destination: mapped back to the mesh by
            // address (a service's virtual address, an endpoint, or not found).
            let Some(port) = authority.port else {
                return Ok(not_found(format!(
                    "{} is an address without a port (expected IP:PORT)",
                    authority.key()
                )));
            };
            let ip: std::net::IpAddr = authority
                .name
                .parse()
                .map_err(|e| Status::invalid_argument(format!("target {target:?}: {e}")))?;
            self.index
                .address(std::net::SocketAddr::new(ip, port))
                .await
        } else if let Some(service) = service_of(&authority.name) {
            self.index.destination(service).await
        } else {
            // Not a mesh service name: perhaps a destination outside the mesh (one destination
            // whatever the port, as for mesh services).
            self.index.external(authority.name.clone()).await
        }
        .ok_or_else(|| Status::unavailable("the controller's index has stopped"))?;
        let guard = Connected::new(&self.counts, false);
        Ok(Response::new(updates(
            rx,
            ports,
            egress_denied,
            Box::new(guard),
        )))
    }
}

/// What a destination stream reads: the answer's channel and the mesh-wide external ports.
struct Updates {
    rx: DestinationRx,
    ports: watch::Receiver<ExternalPorts>,
    /// The ports channel is still open (closed only when the index stops).
    ports_open: bool,
    last: Option<v1::DestinationUpdate>,
    egress_denied: bool,
    /// Held as long as the stream: the stream counter, or the sender of a fixed answer.
    _held: Box<dyn Send + Sync>,
}

/// The answers of `rx` as a stream, each `NotFound` completed with the mesh-wide switches
/// (the index answers per destination; see the module docs), sent again when the external ports
/// change. Ends when the index stops.
fn updates(
    mut rx: DestinationRx,
    mut ports: watch::Receiver<ExternalPorts>,
    egress_denied: bool,
    held: Box<dyn Send + Sync>,
) -> BoxStream<'static, Result<v1::DestinationUpdate, Status>> {
    // The current answer (when there is one yet) is the first one sent.
    rx.mark_changed();
    ports.mark_unchanged();
    let state = Updates {
        rx,
        ports,
        ports_open: true,
        last: None,
        egress_denied,
        _held: held,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            tokio::select! {
                changed = state.rx.changed() => {
                    if changed.is_err() {
                        return None; // the index stopped
                    }
                }
                changed = state.ports.changed(), if state.ports_open => {
                    if changed.is_err() {
                        state.ports_open = false;
                        continue;
                    }
                }
            }
            let Some(mut update) = state.rx.borrow_and_update().clone() else {
                continue; // no complete answer yet
            };
            if let Some(v1::destination_update::Kind::NotFound(nf)) = &mut update.kind {
                let ports = state.ports.borrow().clone();
                nf.egress_denied = state.egress_denied;
                nf.external_ports = ports.ports.to_vec();
                update.version = format!("{}.{}", update.version, ports.generation);
            }
            if state.last.as_ref() == Some(&update) {
                continue; // the ports changed under a profile, which does not carry them
            }
            state.last = Some(update.clone());
            return Some((Ok(update), state));
        }
    })
    .boxed()
}

#[tonic::async_trait]
impl inbound_server::Inbound for ProxyApi {
    type WatchStream = BoxStream<'static, Result<v1::InboundPolicy, Status>>;

    async fn watch(
        &self,
        request: Request<v1::InboundRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.get_ref();
        let (namespace, name) = req.workload.split_once('/').ok_or_else(|| {
            Status::invalid_argument(format!(
                "workload {:?}: expected namespace/name",
                req.workload
            ))
        })?;
        let port = u16::try_from(req.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("port {}: expected 1..=65535", req.port))
            })?;
        let rx = self
            .index
            .inbound(ServiceKey::new(namespace, name), port)
            .await
            .ok_or_else(|| Status::unavailable("the controller's index has stopped"))?;
        let guard = Connected::new(&self.counts, true);
        Ok(Response::new(
            WatchStream::new(rx)
                .filter_map(move |policy| {
                    let _connected = &guard;
                    async move { policy.map(Ok) }
                })
                .boxed(),
        ))
    }
}
