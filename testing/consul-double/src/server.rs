//! The double as a server: its configuration, the test controls, and a listener that can be
//! stopped and brought back at the same port. Request handling lives in [`routes`], the local
//! agent's service API and its check runs in [`agent`].

mod agent;
mod routes;

pub use agent::{AgentConfig, DEFAULT_CHECK_TIMEOUT, SERF_HEALTH};

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::StatusCode;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::{State, WriteError};
use crate::wire::{AgentServiceRegistration, DeregisterRequest, RegisterRequest};

/// Consul's cap on `wait`.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's `wait` when a blocking query names none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Consul adds up to `wait / JITTER_FRACTION` to every blocking wait.
pub const JITTER_FRACTION: u32 = 16;
/// Requests kept in the log for tests to inspect (oldest dropped first).
const REQUEST_LOG_CAP: usize = 50_000;

/// How to start a double.
#[derive(Clone, Debug)]
pub struct DoubleConfig {
    /// Where to listen; port 0 picks a free port (read it back with [`ConsulDouble::addr`]).
    pub listen: SocketAddr,
    pub datacenter: String,
    /// When set, ACLs are on with default-deny: this token may read and write, other tokens get
    /// 403 "ACL not found", requests without a token (anonymous) see empty reads and get 403
    /// "Permission denied" on writes.
    pub acl_token: Option<String>,
    /// The node the agent API (`/v1/agent/...`) registers services on.
    pub agent: AgentConfig,
}

impl Default for DoubleConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            datacenter: "dc1".to_owned(),
            acl_token: None,
            agent: AgentConfig::default(),
        }
    }
}

/// One request the double received, for tests that check what a client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// The ACL token the request carried (header or `token` parameter). Test tokens only.
    pub token: Option<String>,
    pub at: Instant,
}

impl RecordedRequest {
    /// The decoded value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

#[derive(Debug)]
struct Controls {
    leader_known: bool,
    leader_lost_at: Option<Instant>,
    fail_next: u32,
    fail_status: StatusCode,
    zero_index: bool,
    ignore_blocking: bool,
}

/// What blocked queries wait on: every write bumps `writes`; an index reset bumps `abandons`,
/// which makes every blocked query return at once (Consul abandons its watches on a restore).
#[derive(Clone, Copy, Debug, Default)]
struct Generation {
    writes: u64,
    abandons: u64,
}

#[derive(Debug)]
struct Shared {
    config: DoubleConfig,
    addr: SocketAddr,
    state: Mutex<State>,
    changes: watch::Sender<Generation>,
    controls: Mutex<Controls>,
    hang: watch::Sender<bool>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    running: Mutex<Option<CancellationToken>>,
    /// The agent's checks in flight, by check ID.
    agent_checks: Mutex<std::collections::HashMap<String, agent::RunningCheck>>,
    /// Cancelled when the double is dropped: ends the agent's check runs (which, unlike the
    /// listener, keep going through a simulated outage, as a real agent's do).
    shutdown: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running Consul API double. Dropping it stops the listener.
#[derive(Debug)]
pub struct ConsulDouble {
    shared: Arc<Shared>,
}

impl ConsulDouble {
    /// Starts a double on 127.0.0.1 with a free port, no ACLs.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(DoubleConfig::default()).await
    }

    pub async fn start_with(config: DoubleConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(&config.datacenter)),
            config,
            addr,
            changes: watch::Sender::new(Generation::default()),
            controls: Mutex::new(Controls {
                leader_known: true,
                leader_lost_at: None,
                fail_next: 0,
                fail_status: StatusCode::SERVICE_UNAVAILABLE,
                zero_index: false,
                ignore_blocking: false,
            }),
            hang: watch::Sender::new(false),
            requests: Mutex::new(VecDeque::new()),
            running: Mutex::new(None),
            agent_checks: Mutex::new(std::collections::HashMap::new()),
            shutdown: CancellationToken::new(),
        });
        Shared::serve(&shared, listener);
        Ok(Self { shared })
    }

    /// The listening address (stays the same across [`Self::stop`] / [`Self::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`, what a client is configured with.
    pub fn http_addr(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Closes the listener and cuts every open connection (in-flight blocking queries included):
    /// new connections are refused until [`Self::restart`]. The catalog is kept.
    pub fn stop(&self) {
        self.shared.stop();
    }

    /// Listens again at the same address, with the same catalog.
    pub async fn restart(&self) -> io::Result<()> {
        Shared::restart(&self.shared).await
    }

    /// Registers as `PUT /v1/catalog/register` does (no ACL or leader checks: this is the test's hand).
    pub fn register(&self, req: &RegisterRequest) -> Result<(), WriteError> {
        self.shared.write(|s| s.register(req))
    }

    pub fn deregister(&self, req: &DeregisterRequest) -> Result<(), WriteError> {
        self.shared.write(|s| s.deregister(req))
    }

    /// Registers as `PUT /v1/agent/service/register` does: an instance on the agent's node
    /// ([`DoubleConfig::agent`]) whose checks the double runs.
    pub fn agent_register(&self, reg: &AgentServiceRegistration) -> Result<(), WriteError> {
        self.shared.agent_register(reg, false).map_err(|e| match e {
            agent::AgentError::Invalid(e) => e,
            agent::AgentError::NotFound(m) | agent::AgentError::NotTtl(m) => WriteError(m),
        })
    }

    /// A check's current status and output, on any node.
    pub fn check_status(&self, node: &str, check_id: &str) -> Option<(String, String)> {
        lock(&self.shared.state)
            .check(node, check_id)
            .map(|c| (c.status.clone(), c.output.clone()))
    }

    /// Sets a check's status (`passing`, `warning`, `critical`), as a check run would.
    pub fn set_check_status(
        &self,
        node: &str,
        check_id: &str,
        status: &str,
    ) -> Result<(), WriteError> {
        self.shared
            .write(|s| s.set_check_status(node, check_id, status))
    }

    /// Forces every index down to at most `to` (a restore of an older snapshot) and makes every
    /// blocked query return at once with the lowered index.
    pub fn reset_index(&self, to: u64) {
        ConsulDoubleRef(&self.shared).reset_index(to);
    }

    /// While on, responses carry `X-Consul-Index: 0`, the bug the Consul docs warn clients about.
    pub fn report_zero_index(&self, on: bool) {
        ConsulDoubleRef(&self.shared).report_zero_index(on);
    }

    /// While on, blocking queries answer at once with the current index (a misbehaving server or
    /// proxy): clients must rate-limit their loop rather than spin.
    pub fn set_ignore_blocking(&self, on: bool) {
        lock(&self.shared.controls).ignore_blocking = on;
        self.shared.changes.send_modify(|g| g.abandons += 1);
    }

    /// Loses or regains the cluster leader: without one, default-consistency reads and all writes
    /// fail with 500 "No cluster leader"; `?stale` reads answer with `X-Consul-KnownLeader: false`.
    pub fn set_leader(&self, known: bool) {
        ConsulDoubleRef(&self.shared).set_leader(known);
    }

    /// The next `count` API requests fail with `status` (e.g. 503).
    pub fn fail_next(&self, count: u32, status: u16) {
        let mut c = lock(&self.shared.controls);
        c.fail_next = count;
        c.fail_status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    }

    /// While on, API requests are accepted but not answered (a hung server).
    pub fn set_hang(&self, on: bool) {
        self.shared.hang.send_replace(on);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Service instances in the catalog, all namespaces.
    pub fn instance_count(&self) -> usize {
        lock(&self.shared.state).instance_count()
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.shared.stop();
        self.shared.shutdown.cancel();
    }
}

impl Shared {
    fn serve(this: &Arc<Self>, listener: TcpListener) {
        let stop = CancellationToken::new();
        *lock(&this.running) = Some(stop.clone());
        let shared = this.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Out of file descriptors or similar: do not spin on accept.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.handle(req).await) }
                    });
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
    }

    fn stop(&self) {
        if let Some(token) = lock(&self.running).take() {
            token.cancel();
        }
    }

    async fn restart(this: &Arc<Self>) -> io::Result<()> {
        this.stop();
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(this.addr).await {
                Ok(l) => break l,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        Self::serve(this, listener);
        Ok(())
    }

    fn write(
        &self,
        f: impl FnOnce(&mut State) -> Result<(), WriteError>,
    ) -> Result<(), WriteError> {
        f(&mut lock(&self.state))?;
        self.changes.send_modify(|g| g.writes += 1);
        Ok(())
    }
}

/// Control operations shared by the in-process API and the `/_double/` HTTP API.
struct ConsulDoubleRef<'a>(&'a Shared);

impl ConsulDoubleRef<'_> {
    fn reset_index(&self, to: u64) {
        lock(&self.0.state).reset_index(to);
        self.0.changes.send_modify(|g| g.abandons += 1);
    }
    fn report_zero_index(&self, on: bool) {
        lock(&self.0.controls).zero_index = on;
        self.0.changes.send_modify(|g| g.abandons += 1);
    }
    fn set_leader(&self, known: bool) {
        let mut c = lock(&self.0.controls);
        c.leader_known = known;
        c.leader_lost_at = if known { None } else { Some(Instant::now()) };
    }
}
