//! The proxy's configuration model: the static YAML file, and what the controller's answers are
//! turned into (so `/config` shows one shape whatever the source).
//!
//! Loading checks everything a request would trip over later (authorities, regexes, backend
//! references, addresses) and reports the first problem with the file, line and field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Admin listener (`/metrics`, `/ready`, `/live`, `/config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// The workload this proxy runs beside (source labels on metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    /// Outbound listeners.
    #[serde(default)]
    pub outbound: Outbound,
    /// Inbound listener in front of the local application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Inbound>,
    /// Transparent listeners for connections redirected by the interception rules (iptables).
    #[serde(default, skip_serializing_if = "Transparent::is_empty")]
    pub transparent: Transparent,
    /// Gateway mode: public listeners terminating TLS, routing by host into the mesh
    /// ([`Gateway`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Gateway>,
    /// Destinations this proxy can reach.
    #[serde(default)]
    pub destinations: Vec<Destination>,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// Static mTLS identity (PEM files); absent = none from the file (plaintext, unless the
    /// controller provides one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<StaticIdentity>,
    /// Other meshes' metric names and labels to expose as well, for tools whose queries expect
    /// them (Flagger's `osm`, `linkerd` and `smi:*` providers). Read at start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_compat: Vec<MetricsCompat>,
    /// Do not count requests in `trellis_request_total` / `trellis_request_duration_ms` (nor the
    /// compatibility series). Default false (counted); true measures what they cost (the
    /// benchmark's `trellis-nometrics`) or spares a proxy whose metrics nobody scrapes. The
    /// other series (connections, TLS, config updates) stay. Read at start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_request_metrics: bool,
    /// Write an access log (one JSON line per request or TCP connection) to `stderr`, `stdout`
    /// or this file (appended). Read at start; the controller can also turn it on (to stderr).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<String>,
    /// Records the access log may hold before new ones are dropped (and counted); 0 = the
    /// default (4096).
    #[serde(
        default = "default_access_log_buffer",
        skip_serializing_if = "is_default_access_log_buffer"
    )]
    pub access_log_buffer: usize,
}

/// The access log's default channel size (records).
pub const DEFAULT_ACCESS_LOG_BUFFER: usize = 4096;

fn default_access_log_buffer() -> usize {
    DEFAULT_ACCESS_LOG_BUFFER
}

fn is_default_access_log_buffer(n: &usize) -> bool {
    *n == 0 || *n == default_access_log_buffer()
}

/// A set of compatibility series ([`Config::metrics_compat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MetricsCompat {
    /// `osm_request_total`, `osm_request_duration_ms` (Flagger provider `osm`).
    Osm,
    /// `response_total`, `response_latency_ms` (Flagger provider `linkerd`).
    Linkerd,
    /// `istio_requests_total`, `istio_request_duration_milliseconds` (what Flagger's `smi:*`
    /// providers query).
    Istio,
}

/// The ingress gateway (gateway mode): an HTTPS listener that terminates TLS with the
/// operator's certificates, chosen by the SNI name the client sends, and routes each request by
/// its host to a mesh destination through the outbound path (TrafficSplits, route matches,
/// resilience policies, mTLS with this proxy's own identity, so TrafficTargets decide what the
/// gateway may reach); optionally a plain HTTP listener that redirects to HTTPS. Relative paths
/// are relative to the config file's folder. Read at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// The HTTPS listener (HTTP/1.1 and h2 by ALPN, gRPC over h2).
    pub https: SocketAddr,
    /// A plain HTTP listener answering every request with `308` to the same host and path over
    /// HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_redirect: Option<SocketAddr>,
    /// The certificates, each for the host names it lists (`*.example.com` covers one label).
    /// A client naming no listed host (or no host at all) is refused in the handshake
    /// (`unrecognized_name`).
    pub certificates: Vec<GatewayCertificate>,
    /// Which mesh destination serves each host and path prefix (the longest matching prefix of
    /// the host wins). A request for a host with no route gets `404 unknown-host`, one whose
    /// path no prefix of its host matches `404 no-route`.
    pub routes: Vec<GatewayRoute>,
    /// End-user authentication of every request through the gateway (the inbound policy's
    /// `jwt`, same fields): checked before routing; a refused token gets 401
    /// `jwt-<reason>`, verified claims are forwarded as the policy's `forwardClaimsAs` headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<trellis_jwt::JwtPolicy>,
}

/// A certificate of the gateway and the host names it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayCertificate {
    /// Host names (SNI), exact or `*.` one-label wildcards.
    pub hosts: Vec<String>,
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PEM).
    pub key: PathBuf,
}

/// A host of the gateway and the mesh destination behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRoute {
    /// The host clients name (`Host` / `:authority`, without the port), exact.
    pub host: String,
    /// The path prefix, by whole segments (`/api` matches `/api` and `/api/x`, not `/apix`);
    /// absent: `/`, every path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The destination's authority (a configured destination or one the controller knows).
    pub destination: String,
}

/// A workload identity from PEM files (operators with their own PKI, benchmarks). Relative
/// paths are relative to the config file's folder. The files are re-read when they or the
/// config change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticIdentity {
    /// Certificate chain, leaf first (its URI SAN is this proxy's SPIFFE id).
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key: PathBuf,
    /// Trust anchors peers are verified against (several during a rotation).
    pub trust_anchors: Vec<PathBuf>,
}

/// A workload reference (metric labels).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Workload kind, e.g. `deployment`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Workload name.
    pub name: String,
    /// Namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_kind() -> String {
    "deployment".into()
}
fn default_namespace() -> String {
    "default".into()
}

/// Outbound listeners.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// HTTP listener routing by Host / `:authority` / absolute URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// Per-upstream local ports.
    #[serde(default)]
    pub ports: Vec<PortForward>,
    /// Local UDP ports whose datagrams are carried to a destination (UDPRoute; see
    /// [`UdpForward`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub udp: Vec<UdpForward>,
    /// What happens to an intercepted (transparent) outbound connection whose original
    /// destination the mesh does not know: `allow` (the default) forwards it unchanged, `deny`
    /// closes it (egress lockdown). Loopback destinations are always forwarded.
    #[serde(default, skip_serializing_if = "Egress::is_allow")]
    pub egress: Egress,
}

/// The egress switch ([`Outbound::egress`], `--egress`, the controller's `--egress`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Destinations outside the mesh are reached unchanged (passthrough), as without the switch.
    #[default]
    Allow,
    /// Destinations outside the mesh are refused: the connection is closed at once.
    Deny,
}

impl Egress {
    /// The default (allow), left out of `/config`.
    pub fn is_allow(&self) -> bool {
        *self == Egress::Allow
    }
}

/// One local UDP port: each client address (source) sending to it is a session, carried to an
/// endpoint of `destination` inside its own (mutual-TLS) connection and delivered there as
/// plain UDP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpForward {
    /// Where to listen (UDP).
    pub listen: SocketAddr,
    /// The destination authority (`dns.default:53`): its TrafficSplit picks a backend per
    /// session and its balancer an endpoint, whose proxy is reached at the endpoint's address.
    /// The port written here is the application's UDP port on the called side; without one,
    /// the endpoint's port is.
    pub destination: String,
}

/// One per-upstream local port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The destination authority every connection on this port goes to.
    pub destination: String,
    /// Override the destination's protocol on this port (e.g. `tcp` for a server-first protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// Transparent mode: listeners for connections the pod's interception rules (iptables nat
/// REDIRECT, installed by `trellis-init`) sent to the proxy, each read for its original
/// destination (`SO_ORIGINAL_DST`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transparent {
    /// Redirected outbound connections (e.g. `127.0.0.1:15001`): routed by their original
    /// destination `IP:PORT` as the destination of that key (a Service's virtual address, a pod,
    /// or, unknown to the mesh, forwarded unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<SocketAddr>,
    /// Redirected inbound connections (e.g. `0.0.0.0:15006`): authorized with the policy of
    /// their original port, then delivered to the application on `127.0.0.1:<original port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<SocketAddr>,
    /// The inbound policy of each original port. A port not listed refuses every connection
    /// (fail safe); in controller mode the list is filled on demand, per port, from the
    /// controller's `Inbound.Watch`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_ports: Vec<TransparentPort>,
    /// Intercepted outbound UDP (e.g. `127.0.0.1:15009`, the port `trellis-init --udp-ports`
    /// sends it to with TPROXY): each datagram is carried to the destination of its original
    /// `IP:PORT` as an `outbound.udp` listener would, and answered from that address. Needs
    /// `CAP_NET_ADMIN`; IPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<SocketAddr>,
}

impl Transparent {
    /// Nothing transparent is configured.
    pub fn is_empty(&self) -> bool {
        self.outbound.is_none()
            && self.inbound.is_none()
            && self.inbound_ports.is_empty()
            && self.udp.is_none()
    }
}

/// The inbound policy of one original port of a transparent inbound listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentPort {
    /// The port the caller addressed (the application listens on it, on 127.0.0.1).
    pub port: u16,
    /// How the application speaks on it (`detect` by default).
    #[serde(default)]
    pub protocol: Protocol,
    /// Who may call it. Absent = deny everything.
    #[serde(default)]
    pub policy: InboundPolicy,
}

/// The inbound listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The local application.
    pub app: SocketAddr,
    /// How the application speaks (`detect` by default).
    #[serde(default)]
    pub protocol: Protocol,
    /// Who may call the application. Absent = deny everything (fail safe).
    #[serde(default)]
    pub policy: InboundPolicy,
}

/// Inbound authorization policy (TrafficTargets, or a permissive switch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundPolicy {
    /// What happens when no authorization allows a request.
    #[serde(default)]
    pub default_action: DefaultAction,
    /// Allow rules, ORed.
    #[serde(default)]
    pub authorizations: Vec<Authorization>,
    /// Local rate limits (TrafficPolicy `rateLimit`s of this workload's services), checked after
    /// authorization; the first whose matches a request matches decides (empty matches = every
    /// request), so route limits come before the service's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<InboundRateLimit>,
    /// End-user JWT authentication (camelCase fields, see the `trellis-jwt` crate): a request's
    /// bearer token is verified after the caller is known and before authorization; an invalid
    /// one is refused with 401 `jwt-<reason>`, a valid one's claims are what rules' `claims`
    /// look at. Absent: tokens are not looked at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<trellis_jwt::JwtPolicy>,
    /// Claims the requests must carry (TrafficPolicy `claims`), checked after authorization and
    /// ANDed with it: every requirement whose matches a request matches (empty matches = every
    /// request) must hold, or the request gets 403 `claims`. Unlike a rule's `claims`, which
    /// any other allow rule can bypass, no rule lets a covered request through without them.
    /// A policy with any requirement refuses opaque TCP connections and UDP tunnels (no token;
    /// HTTP inside opaque TCP cannot be matched). Needs `jwt`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claim_requirements: Vec<ClaimRequirement>,
}

/// Claims a request must carry when it matches `matches` ([`InboundPolicy::claim_requirements`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequirement {
    /// For logs: the TrafficPolicy target (and route group) it comes from.
    #[serde(default)]
    pub name: String,
    /// The requests it applies to (ORed); empty = every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// Conditions on the verified token's claims (camelCase fields), all of which must hold.
    pub claims: Vec<trellis_jwt::ClaimMatch>,
}

/// One local rate limit of the inbound side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundRateLimit {
    /// For metrics and logs: the route's name, or empty for the service's own limit.
    #[serde(default)]
    pub name: String,
    /// The requests it applies to (ORed); empty = every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// The limit (camelCase fields, as in a TrafficPolicy).
    pub limit: trellis_policy::RateLimit,
}

/// Default action of an inbound policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    /// Deny (the default: the mesh fails safe).
    #[default]
    Deny,
    /// Allow everything not otherwise allowed (permissive switch).
    Allow,
}

/// One allow rule: identity AND port AND (HTTP) route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// Caller SPIFFE ids; `*` = any authenticated caller.
    #[serde(default)]
    pub identities: Vec<String>,
    /// Ports (the inbound listener's port); empty = all.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// HTTP matches (ORed); empty = every request and opaque TCP.
    #[serde(default)]
    pub routes: Vec<HttpMatch>,
    /// Also allow callers without a verified identity (plaintext: ingress, health checkers,
    /// test harnesses). Callers with a verified identity match such a rule too.
    #[serde(default)]
    pub unauthenticated: bool,
    /// Source networks (CIDRs) the caller's address must be in; empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Conditions on the claims of the request's verified JWT (the policy's `jwt`), all of
    /// which must hold; empty = none. A rule with claims never matches a request without a
    /// verified token, nor an opaque TCP connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<trellis_jwt::ClaimMatch>,
    /// The L4 protocols the rule covers: `tcp` (opaque TCP, and HTTP, which rides it) and/or
    /// `udp` (UDP tunnels from other proxies, for the UDP port they name). Empty = `[tcp]`, so
    /// a rule allows UDP only when it says so. A rule with `routes` covers HTTP only and may
    /// not name `udp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<L4Protocol>,
}

/// A transport protocol an [`Authorization`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4Protocol {
    /// TCP connections: opaque TCP and HTTP.
    Tcp,
    /// UDP datagrams, carried between proxies in a tunnel.
    Udp,
}

/// How traffic to a destination is carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP per request, upstream in the version the client speaks.
    Http,
    /// h2c upstream whatever the client speaks.
    Http2,
    /// Opaque TCP.
    Tcp,
    /// Detect on each connection (HTTP/1, h2 preface, else opaque).
    #[default]
    Detect,
}

/// Endpoint selection within a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Power of two choices over a latency EWMA.
    #[default]
    Ewma,
    /// Round robin.
    RoundRobin,
    /// Fewest in-flight requests.
    LeastRequest,
}

/// One destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Authority, matched after normalization.
    pub authority: String,
    /// How traffic is carried (`http` by default for destinations in the file).
    #[serde(default = "default_http")]
    pub protocol: Protocol,
    /// Endpoint balancer.
    #[serde(default)]
    pub balancer: BalancerKind,
    /// HTTP routes, first match wins; unmatched requests use `backends`.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The default split.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Destination workload for metric labels (else per backend, else the backend name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    /// Per-request timeout in milliseconds (0 or absent = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout_ms: Option<u64>,
    /// Share of new traces sampled for requests to this destination (0.0 to 1.0), instead of
    /// the proxy's `--trace-sampling`. An incoming trace's own decision always wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_sampling: Option<f64>,
    /// Resilience policy: timeouts, retries, circuit breaker, outlier ejection, health checks,
    /// faults, rate limit, mirror (the `spec` fields of a `TrafficPolicy`, camelCase, see the
    /// `trellis-policy` crate). Absent: one try, no breaker, no ejection, no faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<trellis_policy::DestinationPolicy>,
    /// Set when the destination is outside the mesh (an ExternalService): only the listed
    /// workloads may call it, and the proxy may originate TLS to it ([`External`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<External>,
}

/// A destination outside the mesh, declared (an ExternalService, or a file's destination).
///
/// The outside server cannot check mesh identities, so the calling proxy does: a request or
/// connection to the destination is refused (`403 egress-forbidden`, or the connection closed)
/// unless this proxy's own workload identity is listed, and on a port not listed. Its endpoints
/// are outside addresses WITHOUT a port (`api.pay.example`, resolved when connecting, or fixed
/// IP addresses) and carry no identity: the proxy connects to the port the application used (or
/// to the port it originates TLS to).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct External {
    /// `namespace/name` of the declaration (logs).
    #[serde(default)]
    pub name: String,
    /// SPIFFE ids of the workloads that may call it; `*` = any workload with a mesh identity.
    /// Empty = none (a proxy without an identity is never allowed: fail safe).
    #[serde(default)]
    pub allowed_identities: Vec<String>,
    /// The declared ports; another port of the host is refused.
    pub ports: Vec<ExternalPort>,
    /// Trust anchors (PEM text) an originated TLS connection's server chain must verify to;
    /// absent = the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

/// One declared port of an [`External`] destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalPort {
    /// The port the application calls.
    pub port: u16,
    /// Set: the application speaks plaintext on `port` and the proxy originates TLS to this port
    /// of the endpoint (SNI and certificate check for the destination's host). Absent: bytes go
    /// as sent (the application's own TLS passes through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub originate_tls_port: Option<u16>,
}

fn default_http() -> Protocol {
    Protocol::Http
}

/// An HTTP route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Route name.
    #[serde(default)]
    pub name: String,
    /// Shorthand for a single match: path regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// Shorthand for a single match: methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Shorthand for a single match: header name -> value regex.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// More matches, ORed with the shorthand one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// Backends for matching requests; empty = the destination's split.
    #[serde(default)]
    pub backends: Vec<WeightedRef>,
    /// This route's policy: each section given replaces the destination's for its requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<trellis_policy::RoutePolicy>,
}

/// One HTTPRouteGroup-style match (fields AND).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMatch {
    /// Regex over the path (no query), anchored at both ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// Methods; empty or `*` = all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Header name -> regex over the whole value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A backend reference with a weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedRef {
    /// Backend name (one of the destination's `backends`).
    pub name: String,
    /// Relative weight; 0 = nothing.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A backend service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Name, unique within the destination.
    pub name: String,
    /// Relative weight in the default split; 0 = nothing.
    #[serde(default = "one")]
    pub weight: u32,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Workload for metric labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
}

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `ip:port` or `host:port`.
    pub address: String,
    /// SPIFFE id: non-empty = reached with mTLS, the peer certificate must name exactly this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Relative weight within the backend: the balancer's share of this endpoint (P2C costs are
    /// divided by it; weighted round robin gives it this many turns). 0 counts as 1.
    #[serde(default = "one")]
    pub weight: u32,
    /// Protocol override for this endpoint (`http2` = speak h2c to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// Limits and timeouts (all optional; defaults documented in the README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line + headers), bytes.
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Time to read a request head, also the HTTP/1 keep-alive idle limit, ms.
    pub header_read_timeout_ms: u64,
    /// Time to recognise the protocol on a connection, ms.
    pub detect_timeout_ms: u64,
    /// Opaque TCP connections are closed after this long without a byte either way, ms.
    pub tcp_idle_timeout_ms: u64,
    /// Upstream connect timeout, ms.
    pub connect_timeout_ms: u64,
    /// How long SIGTERM waits for in-flight requests, ms.
    pub drain_timeout_ms: u64,
    /// Concurrent HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Bound on an mTLS handshake (inbound and outbound), ms.
    pub tls_handshake_timeout_ms: u64,
    /// Inbound TLS handshakes in progress at once; more wait (within the handshake timeout).
    pub max_concurrent_handshakes: usize,
    /// Open inbound connections per source IP; more are closed at once.
    pub max_connections_per_source: usize,
    /// Open client connections over all listeners; more are closed at once. 0 = derived from
    /// the file-descriptor limit at start (see [`Limits::effective_max_connections`]).
    pub max_connections: usize,
    /// Listen backlog of every listener (the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// On detect ports, a client that sent nothing before `detect_timeout_ms` is carried as
    /// opaque TCP (server-first protocols) but must send its first byte within this long after,
    /// else both sides are closed (a silent client must not pin an app connection), ms.
    pub opaque_first_byte_timeout_ms: u64,
    /// UDP sources served at once per `outbound.udp` listener; datagrams of further sources are
    /// dropped (and counted) until a session closes.
    pub udp_max_sessions: usize,
    /// A UDP session with no datagram either way for this long is closed with its tunnel, ms.
    /// The called side closes its end of a tunnel 15 s later than this (the calling side, which
    /// sees its client go quiet, is the one that closes).
    pub udp_idle_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout_ms: 10_000,
            detect_timeout_ms: 5_000,
            tcp_idle_timeout_ms: 3_600_000,
            connect_timeout_ms: 2_000,
            drain_timeout_ms: 10_000,
            max_concurrent_streams: 256,
            tls_handshake_timeout_ms: 10_000,
            max_concurrent_handshakes: 512,
            max_connections_per_source: 1024,
            max_connections: 0,
            listen_backlog: 4096,
            opaque_first_byte_timeout_ms: 30_000,
            udp_max_sessions: 1024,
            // Envoy's UDP proxy idles sessions out at 60 s (conntrack's UDP stream timeout is
            // 120 s).
            udp_idle_timeout_ms: 60_000,
        }
    }
}

impl Limits {
    /// `header_read_timeout_ms` as a Duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    /// `detect_timeout_ms` as a Duration.
    pub fn detect_timeout(&self) -> Duration {
        Duration::from_millis(self.detect_timeout_ms)
    }
    /// `tcp_idle_timeout_ms` as a Duration.
    pub fn tcp_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.tcp_idle_timeout_ms)
    }
    /// `connect_timeout_ms` as a Duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// `tls_handshake_timeout_ms` as a Duration.
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
    /// `drain_timeout_ms` as a Duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
    /// `opaque_first_byte_timeout_ms` as a Duration.
    pub fn opaque_first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.opaque_first_byte_timeout_ms)
    }
    /// `udp_idle_timeout_ms` as a Duration (the calling side's).
    pub fn udp_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.udp_idle_timeout_ms)
    }
    /// How long the called side keeps a quiet UDP tunnel: 15 s more than the calling side.
    pub fn udp_inbound_idle_timeout(&self) -> Duration {
        self.udp_idle_timeout() + Duration::from_secs(15)
    }
    /// `max_connections`, or when 0: half the soft `RLIMIT_NOFILE` (a proxied connection holds
    /// two descriptors, client and upstream) less 64 kept for listeners, the admin port, config
    /// files and logs; at least 1. Like HAProxy, which derives `maxconn` from `ulimit -n`.
    pub fn effective_max_connections(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let soft = rlimit::Resource::NOFILE
            .get()
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let soft = usize::try_from(soft).unwrap_or(usize::MAX);
        (soft.saturating_sub(64) / 2).max(1)
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid YAML or not the config shape.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// Parsed, but a value is unusable.
    #[error("{path}:{line}: {field}: {message}")]
    Invalid {
        /// The file (or `<controller>` for controller data).
        path: PathBuf,
        /// 1-based line of the offending value (0 when unknown).
        line: usize,
        /// Field path, e.g. `destinations[0].routes[1].path_regex`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// A semantic problem found by [`crate::table::RoutingTable::compile`], before a file/line is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// Field path.
    pub field: String,
    /// The offending value as written (used to find its line).
    pub value: String,
    /// What is wrong.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BENCH_SHAPE: &str = r#"
admin: 127.0.0.1:9901
outbound:
  http: 127.0.0.1:4140
  ports:
    - listen: 127.0.0.1:4141
      destination: echo.default
inbound:
  listen: 127.0.0.1:4143
  app: 127.0.0.1:8080
destinations:
  - authority: echo.default
    protocol: http
    balancer: ewma
    routes:
      - name: api
        path_regex: "/api/.*"
        methods: [GET]
        headers: {x-user: "beta.*"}
        backends: [{name: echo-v2, weight: 1}]
    backends:
      - name: echo-v1
        weight: 75
        endpoints: [{address: "127.0.0.1:8081"}]
      - name: echo-v2
        weight: 25
        endpoints: [{address: "127.0.0.1:8082", identity: "spiffe://cluster.local/ns/default/sa/echo"}]
"#;

    #[test]
    fn the_documented_shape_loads() {
        let c = Config::parse(BENCH_SHAPE, Path::new("c.yaml")).unwrap();
        assert_eq!(c.admin, Some("127.0.0.1:9901".parse().unwrap()));
        assert_eq!(c.outbound.ports[0].destination, "echo.default");
        let d = &c.destinations[0];
        assert_eq!(d.protocol, Protocol::Http);
        assert_eq!(d.routes[0].headers["x-user"], "beta.*");
        assert_eq!(
            d.backends[1].endpoints[0].identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/echo")
        );
        assert_eq!(
            c.inbound.unwrap().policy.default_action,
            DefaultAction::Deny
        );
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let bad = BENCH_SHAPE.replace("weight: 75", "weight: seventy");
        let err = Config::parse(&bad, Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.yaml:23:"), "{err}");
    }

    #[test]
    fn transparent_ports_compile_per_port_and_are_unique() {
        let yaml = "transparent:
  outbound: 127.0.0.1:15001
  inbound: 0.0.0.0:15006
  inbound_ports:
    - port: 8080
      policy: { default_action: allow }
    - port: 9090
      protocol: tcp
";
        let config = Config::parse(yaml, Path::new("t.yaml")).expect("valid");
        let table =
            crate::table::RoutingTable::compile(config, &crate::table::StatsRegistry::default())
                .unwrap();
        let app = |port: u16| table.transparent_inbound[&port].app;
        assert_eq!(app(8080), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(table.transparent_inbound[&9090].protocol, Protocol::Tcp);
        let twice = yaml.replace("port: 9090", "port: 8080");
        let err = Config::parse(&twice, Path::new("t.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("transparent.inbound_ports[1].port") && err.contains("configured twice"),
            "{err}"
        );
    }

    #[test]
    fn egress_defaults_to_allow_and_a_bad_value_is_located() {
        let parse = |yaml: &str| Config::parse(yaml, Path::new("e.yaml"));
        assert_eq!(
            parse("admin: 127.0.0.1:9901\n").unwrap().outbound.egress,
            Egress::Allow
        );
        let deny = parse("outbound:\n  egress: deny\n").unwrap();
        assert_eq!(deny.outbound.egress, Egress::Deny);
        let err = parse("outbound:\n  http: 127.0.0.1:4140\n  egress: block\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("e.yaml:3:") && err.contains("outbound.egress"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_line() {
        let bad = BENCH_SHAPE.replace("balancer: ewma", "balancr: ewma");
        let err = Config::parse(&bad, Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.yaml:14:"), "{err}");
        assert!(err.contains("balancr"), "{err}");
    }

    #[test]
    fn bad_regexes_name_field_and_line() {
        let bad = BENCH_SHAPE.replace("\"/api/.*\"", "\"/api/(\"");
        let err = Config::parse(&bad, Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.yaml:17: destinations[0].routes[0].path_regex:"),
            "{err}"
        );
    }

    #[test]
    fn unknown_backend_references_are_rejected() {
        let bad = BENCH_SHAPE.replace(
            "[{name: echo-v2, weight: 1}]",
            "[{name: echo-v9, weight: 1}]",
        );
        let err = Config::parse(&bad, Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("destinations[0].routes[0].backends[0]"),
            "{err}"
        );
        assert!(err.contains("echo-v9"), "{err}");
        assert!(err.starts_with("c.yaml:20:"), "{err}");
    }

    #[test]
    fn bad_policy_values_are_rejected_with_their_field_and_line() {
        for (setting, field, line) in [
            (
                "{outlierDetection: {consecutiveFailures: 0}}",
                "policy.outlierDetection.consecutiveFailures",
                15,
            ),
            (
                "{outlierDetection: {consecutiveFailures: 5, maxEjectedPercent: 101}}",
                "policy.outlierDetection.maxEjectedPercent",
                15,
            ),
            (
                "\n      timeouts: {request: 1s, perTry: 2s}",
                "policy.timeouts.perTry",
                16,
            ),
            (
                "{mirror: {backend: nowhere, percent: 5}}",
                "policy.mirror.backend",
                15,
            ),
        ] {
            let bad = BENCH_SHAPE.replace(
                "    balancer: ewma\n",
                &format!("    balancer: ewma\n    policy: {setting}\n"),
            );
            let err = Config::parse(&bad, Path::new("c.yaml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("destinations[0].{field}")), "{err}");
            assert!(err.starts_with(&format!("c.yaml:{line}:")), "{err}");
        }
        let bad = BENCH_SHAPE.replace(
            "    balancer: ewma\n",
            "    balancer: ewma\n    policy: {timeouts: {request: -1s}}\n",
        );
        let err = Config::parse(&bad, Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("negative") && err.starts_with("c.yaml:15:"),
            "{err}"
        );
        let good = BENCH_SHAPE.replace(
            "    balancer: ewma\n",
            "    balancer: ewma\n    policy: {outlierDetection: {consecutiveFailures: 5}}\n",
        );
        let config = Config::parse(&good, Path::new("c.yaml")).unwrap();
        let o = config.destinations[0]
            .policy
            .as_ref()
            .and_then(|p| p.outlier_detection.clone())
            .unwrap();
        assert_eq!(o.consecutive_failures, 5);
        assert_eq!(o.base_ejection_time.as_millis(), 30_000);
        assert_eq!(o.max_ejected_percent, 50);
    }

    #[test]
    fn udp_listeners_name_a_destination_and_its_port() {
        let with = |destination: &str| {
            BENCH_SHAPE.replace(
                "      destination: echo.default\n",
                &format!(
                    "      destination: echo.default\n  udp:\n    - listen: 127.0.0.1:5353\n      destination: \"{destination}\"\n"
                ),
            )
        };
        let c = Config::parse(&with("echo.default:53"), Path::new("c.yaml")).unwrap();
        assert_eq!(c.outbound.udp[0].listen.port(), 5353);
        assert_eq!(
            crate::table::udp_port(&c.outbound.udp[0].destination),
            Some(53)
        );
        assert_eq!(crate::table::udp_port("echo.default"), None);
        assert_eq!(crate::table::udp_port("[::1]:53"), Some(53));
        assert_eq!(crate::table::udp_port("::1"), None);
        let err = Config::parse(&with("dns.default:53"), Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.yaml:10: outbound.udp[0].destination:"),
            "{err}"
        );
        let err = Config::parse(&with("echo.default:0"), Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("port 0"), "{err}");
        let limits = Limits::default();
        assert_eq!(
            (limits.udp_max_sessions, limits.udp_idle_timeout()),
            (1024, Duration::from_secs(60))
        );
    }

    #[test]
    fn the_readme_config_example_loads() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("## Config file\n\n```yaml\n")
            .expect("the section")
            + 23;
        let example = &readme[start..start + readme[start..].find("```").unwrap()];
        let config =
            Config::parse(example, Path::new("README.md")).unwrap_or_else(|e| panic!("{e}"));
        let inbound = config.inbound.unwrap();
        assert!(inbound.policy.jwt.is_some());
        assert_eq!(inbound.policy.authorizations[0].claims[0].values, ["admin"]);
    }

    #[test]
    fn port_forwards_must_name_a_destination() {
        let bad = BENCH_SHAPE.replace("destination: echo.default", "destination: nope.default");
        let err = Config::parse(&bad, Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("outbound.ports[0].destination"), "{err}");
    }
}
