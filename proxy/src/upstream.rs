//! The upstream clients every request path and the health-check prober send through: pooled
//! HTTP/1.1 and h2c clients in plaintext, mTLS clients per expected peer identity, and the own
//! clients of destinations whose circuit breaker limits connections (their pools hold only their
//! connections, counted by the breaker).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::Limits;
use crate::identity::IdentityStore;
use crate::metrics::Metrics;
use crate::pool::{Pool, Protocol};
use crate::tls::{Alpn, MeshConnector};

/// The proxy's upstream clients: the shared ones, and those of connection-limited destinations.
#[derive(Debug)]
pub struct Upstreams {
    shared: Clients,
    /// The own clients of destinations whose breaker limits connections, by destination key.
    limited: Mutex<HashMap<String, Arc<Clients>>>,
    limits: Limits,
}

impl Upstreams {
    /// Clients with the connect and handshake timeouts of `limits`.
    pub fn new(limits: &Limits) -> Self {
        Upstreams {
            shared: Clients::new(limits, None),
            limited: Mutex::default(),
            limits: limits.clone(),
        }
    }

    /// The clients of every destination without a connection limit.
    pub fn shared(&self) -> &Clients {
        &self.shared
    }

    /// The own clients of destination `key` when its breaker limits connections (made on first
    /// use, again when the limits change); None: use [`Self::shared`].
    pub fn for_destination(
        &self,
        key: &str,
        breaker: Option<&crate::resilience::Breaker>,
    ) -> Option<Arc<Clients>> {
        let b = breaker.filter(|b| b.max_connections.is_some())?;
        let mut map = self.limited.lock().unwrap_or_else(|p| p.into_inner());
        let clients = map
            .entry(key.to_string())
            .and_modify(|c| {
                if !c.limited_by(b) {
                    *c = Arc::new(Clients::new(&self.limits, Some(b.clone())));
                }
            })
            .or_insert_with(|| Arc::new(Clients::new(&self.limits, Some(b.clone()))));
        Some(Arc::clone(clients))
    }
}

/// An upstream client: pooled connections, bodies streamed from the downstream request.
pub type UpstreamClient = Pool<crate::connect::PlainConnector>;

/// An upstream client speaking mTLS to one expected identity.
pub type MeshClient = Pool<MeshConnector>;

/// How long a pooled connection may stay idle before it is closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The upstream clients: HTTP/1.1 and h2c (prior knowledge) in plaintext, and mTLS clients per
/// expected peer identity (so pooled connections are keyed by (address, identity)).
#[derive(Debug)]
pub struct Clients {
    http1: UpstreamClient,
    http2: UpstreamClient,
    connector: crate::connect::PlainConnector,
    handshake_timeout: Duration,
    /// mTLS clients by expected identity: [HTTP/1.1, HTTP/2]. Read on every mTLS request, written
    /// once per identity.
    mesh: [RwLock<HashMap<String, MeshClient>>; 2],
    /// The breaker whose connection limit these clients' connections count against.
    breaker: Option<crate::resilience::Breaker>,
    /// Clients originating TLS to destinations outside the mesh (HTTP/2 or HTTP/1.1, as each
    /// server chooses in ALPN), by server name and
    /// configuration (one per declared host and CA bundle: [`crate::external::origin_config`]
    /// makes each configuration once).
    origin: RwLock<HashMap<(String, usize), MeshClient>>,
}

impl Clients {
    /// Build pooled clients with the given connect timeout; with a `breaker`, their
    /// connections count against its `maxConnections` (a destination's own clients).
    pub fn new(limits: &Limits, breaker: Option<crate::resilience::Breaker>) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(limits.connect_timeout()));
        http.enforce_http(true);
        let connector = crate::connect::PlainConnector::new(http, breaker.clone());
        let http1 = Pool::new(connector.clone(), Protocol::Http1, POOL_IDLE_TIMEOUT);
        let http2 = Pool::new(connector.clone(), Protocol::Http2, POOL_IDLE_TIMEOUT);
        Clients {
            http1,
            http2,
            connector,
            handshake_timeout: limits.tls_handshake_timeout(),
            mesh: Default::default(),
            breaker,
            origin: RwLock::default(),
        }
    }

    /// Whether these clients count their connections under exactly this breaker's limits.
    pub fn limited_by(&self, b: &crate::resilience::Breaker) -> bool {
        self.breaker.as_ref().is_some_and(|own| {
            own.max_connections == b.max_connections
                && own.max_pending == b.max_pending
                && Arc::ptr_eq(&own.state, &b.state)
        })
    }

    /// The plaintext client: h2c (prior knowledge) or HTTP/1.1.
    pub fn plain(&self, http2: bool) -> &UpstreamClient {
        if http2 { &self.http2 } else { &self.http1 }
    }

    /// The client originating TLS with `config` to servers named `server_name`
    /// (created on first use).
    pub fn origin(
        &self,
        config: Arc<rustls::ClientConfig>,
        server_name: rustls::pki_types::ServerName<'static>,
        metrics: &Metrics,
    ) -> MeshClient {
        let key = (
            server_name.to_str().into_owned(),
            Arc::as_ptr(&config) as usize,
        );
        if let Some(c) = self
            .origin
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return c.clone();
        }
        let connector = MeshConnector::origin(
            self.connector.clone(),
            config,
            server_name,
            metrics.clone(),
            self.handshake_timeout,
        );
        let client: MeshClient = Pool::new(connector, Protocol::Negotiated, POOL_IDLE_TIMEOUT);
        self.origin
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert(client)
            .clone()
    }

    /// The mTLS client towards endpoints named `expected` (created on first use).
    pub fn mesh(
        &self,
        expected: &str,
        http2: bool,
        store: &Arc<IdentityStore>,
        metrics: &Metrics,
    ) -> MeshClient {
        let map = &self.mesh[usize::from(http2)];
        if let Some(c) = map.read().unwrap_or_else(|p| p.into_inner()).get(expected) {
            return c.clone();
        }
        let connector = MeshConnector::new(
            self.connector.clone(),
            Arc::clone(store),
            metrics.clone(),
            expected,
            if http2 { Alpn::H2 } else { Alpn::Http1 },
            self.handshake_timeout,
        );
        let protocol = if http2 {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        let client: MeshClient = Pool::new(connector, protocol, POOL_IDLE_TIMEOUT);
        map.write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(expected.to_string())
            .or_insert(client)
            .clone()
    }
}
