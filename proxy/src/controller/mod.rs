//! Live configuration from the controller over `trellis-proxy-api`.
//!
//! The proxy asks for what it needs when it needs it: a destination is watched
//! (`Destinations.Watch`) the first time a request or connection names it (and at start for the
//! per-upstream ports); the inbound policy of the inbound port is watched from the start. Each
//! answer is turned into the same [`Config`] shapes the file uses and compiled.
//!
//! Updates are incremental ([`apply_update`]): a `DestinationUpdate` changes that destination
//! alone. A profile compiles that destination and stores it in its slot of the routing table; an
//! endpoint delta is applied to the destination's last good source (what its entry was compiled
//! from) and recompiles that destination only; `not_found` removes it. No other destination is
//! recompiled or cloned (see [`crate::table`]). An update the proxy cannot use (an invalid
//! regex, an endpoint that is not `host:port`) is logged with the destination and the field, and
//! that destination keeps its last good entry. An inbound policy recompiles the inbound side
//! only, sharing the destinations as they are.
//!
//! While the controller is away, every watch retries with exponential backoff (`backon`) and the
//! proxy keeps serving the last configuration it had; the first message of a resumed stream
//! replaces what it held. Until the inbound policy arrives, the inbound side denies everything
//! (fail safe). A request for a destination not yet known waits for the controller's first
//! answer at most [`ControllerOptions::first_answer_wait`].
//!
//! Transparent mode: an intercepted outbound connection asks about its original destination
//! `IP:PORT` the same way (one watch per key, cached like a name); the transparent inbound
//! listener watches the inbound policy of each original port on its first connection (the
//! controller's `Inbound.Watch` is per port), and a connection waits for the first answer at
//! most `first_answer_wait`, refused if none came (fail safe).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use backon::BackoffBuilder;
use futures::future::BoxFuture;
use tokio::sync::watch;
use trellis_proxy_api::v1;
use trellis_proxy_api::v1::destinations_client::DestinationsClient;
use trellis_proxy_api::v1::inbound_client::InboundClient;

use crate::config::{self, Config};
use crate::controller::tls::{Connector, ControllerTls};
use crate::state::{Resolve, Shared};

pub mod tls;

/// How to reach the controller.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// gRPC URL, e.g. `http://127.0.0.1:8090`, or `https://HOST:PORT` with [`Self::tls`].
    pub url: String,
    /// Verify an `https://` controller against these trust anchors (`--controller-ca`);
    /// required with `https://`, refused with `http://`.
    pub tls: Option<ControllerTls>,
    /// This proxy's workload as `namespace/name`.
    pub workload: String,
    /// How long a request for an unknown destination waits for the controller's first answer.
    pub first_answer_wait: Duration,
    /// Smallest retry delay.
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
}

impl ControllerOptions {
    /// Defaults: 2 s first-answer wait, backoff 100 ms .. 5 s.
    pub fn new(url: impl Into<String>, workload: impl Into<String>) -> Self {
        ControllerOptions {
            url: url.into(),
            tls: None,
            workload: workload.into(),
            first_answer_wait: Duration::from_secs(2),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A controller URL (with its TLS settings) that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("controller URL {url:?}: {problem}")]
pub struct InvalidUrl {
    url: String,
    problem: String,
}

/// What the controller said about the inbound side (the destinations are in the routing
/// table: each compiled destination keeps its source).
#[derive(Debug, Default)]
struct Dynamic {
    policy: Option<config::InboundPolicy>,
    inbound_protocol: Option<config::Protocol>,
    /// The inbound policy (and protocol) of each original port the transparent inbound listener
    /// has seen, as the controller last said.
    transparent: BTreeMap<u16, config::TransparentPort>,
}

/// What `/ready` waits for until the controller's first inbound policy arrives.
const INBOUND_POLICY: &str = "no inbound policy from the controller yet";

/// The controller client: watches destinations on demand and the inbound policy.
#[derive(Debug)]
pub struct Controller {
    me: Weak<Controller>,
    options: ControllerOptions,
    channel: tonic::transport::Channel,
    base: Config,
    shared: OnceLock<Weak<Shared>>,
    state: Mutex<Dynamic>,
    watches: Mutex<HashMap<String, watch::Receiver<bool>>>,
    /// Transparent inbound ports watched so far, each with "the controller has answered".
    inbound_watches: Mutex<HashMap<u16, watch::Receiver<bool>>>,
}

impl Controller {
    /// A client for `options.url`; `base` holds listeners, workload and limits (its
    /// destinations are ignored: they come from the controller). Nothing connects until used.
    pub fn new(options: ControllerOptions, base: Config) -> Result<Arc<Self>, InvalidUrl> {
        let invalid = |problem: String| InvalidUrl {
            url: options.url.clone(),
            problem,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(options.url.clone())
            .map_err(|e| invalid(format!("invalid: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let scheme = endpoint.uri().scheme_str().unwrap_or_default().to_owned();
        // Plaintext only when asked for plainly: an https URL never falls back to http, and
        // anchors given with an http URL would protect nothing.
        let channel = match (scheme.as_str(), &options.tls) {
            ("https", Some(tls)) => endpoint.connect_with_connector_lazy(
                Connector::new(tls.clone()).map_err(|e| invalid(e.to_string()))?,
            ),
            ("https", None) => {
                return Err(invalid(
                    "https needs --controller-ca FILE (the mesh's trust anchors, PEM) to verify the controller's certificate".into(),
                ));
            }
            ("http", None) => endpoint.connect_lazy(),
            ("http", Some(_)) => {
                return Err(invalid(
                    "--controller-ca is set but the URL is http://, which would be plaintext: use https://".into(),
                ));
            }
            (other, _) => {
                return Err(invalid(format!(
                    "scheme {other:?}: expected http:// (loopback, one host) or https://"
                )));
            }
        };
        Ok(Arc::new_cyclic(|me| Controller {
            me: me.clone(),
            options,
            channel,
            base: Config {
                destinations: Vec::new(),
                ..base
            },
            shared: OnceLock::new(),
            state: Mutex::new(Dynamic::default()),
            watches: Mutex::new(HashMap::new()),
            inbound_watches: Mutex::new(HashMap::new()),
        }))
    }

    /// The configuration to start the proxy with (no destinations, inbound denies until told).
    pub fn initial_config(&self) -> Config {
        self.base.clone()
    }

    /// The gRPC channel to the controller (Identity.Certify is served on the same endpoint).
    pub fn channel(&self) -> tonic::transport::Channel {
        self.channel.clone()
    }

    /// Connect to the running proxy's state and start the standing watches (inbound policy on
    /// `inbound_port`, destinations of the per-upstream ports).
    pub fn attach(&self, shared: &Arc<Shared>, inbound_port: Option<u16>) {
        let _ = self.shared.set(Arc::downgrade(shared));
        if let (Some(port), Some(me)) = (inbound_port, self.me.upgrade()) {
            // Until the first policy arrives the inbound listener refuses everyone: not ready.
            shared.wait_for(INBOUND_POLICY);
            tokio::spawn(me.watch_inbound(port, None));
        }
        for port in &self.base.outbound.ports {
            if let Ok(a) = trellis_proxy_api::authority::normalize(&port.destination) {
                drop(self.resolve(&a.key()));
            }
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.options.min_backoff)
            .with_max_delay(self.options.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }

    fn shared(&self) -> Option<Arc<Shared>> {
        self.shared.get().and_then(Weak::upgrade)
    }

    /// Rebuild the base (listeners, inbound policies) from the start configuration plus what the
    /// controller said about the inbound side, and make it current; the destinations stay.
    fn publish_inbound(&self, shared: &Shared, what: &str) {
        let config = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut config = self.base.clone();
            if let Some(inbound) = &mut config.inbound {
                inbound.policy = state.policy.clone().unwrap_or_default();
                if let Some(p) = state.inbound_protocol {
                    inbound.protocol = p;
                }
            }
            config.transparent.inbound_ports = state.transparent.values().cloned().collect();
            config
        };
        match shared.routes.apply_base(config) {
            Ok(()) => shared.metrics.update("controller", true),
            Err(e) => {
                // Keep the last good table; the controller sent something we cannot use.
                tracing::error!(%what, field = %e.field, error = %e, "controller update rejected; keeping the running configuration");
                shared.metrics.update("controller", false);
            }
        }
    }

    async fn watch_destination(self: Arc<Self>, key: String, answered: watch::Sender<bool>) {
        let mut backoff = self.backoff();
        loop {
            let Some(shared) = self.shared() else { return };
            drop(shared);
            let request = v1::DestinationRequest {
                target: key.clone(),
                source_workload: self.options.workload.clone(),
            };
            match DestinationsClient::new(self.channel.clone())
                .watch(request)
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(update)) => {
                                let Some(shared) = self.shared() else { return };
                                match apply_update(&shared, &key, update) {
                                    Ok(()) => shared.metrics.update("controller", true),
                                    Err(e) => {
                                        // The controller sent something this proxy cannot
                                        // use: this destination keeps its last good entry.
                                        tracing::error!(destination = %key, field = %e.field, error = %e, "controller update rejected; keeping the destination's last good entry");
                                        shared.metrics.update("controller", false);
                                    }
                                }
                                answered.send_replace(true);
                                backoff = self.backoff();
                            }
                            Ok(None) => {
                                tracing::info!(destination = %key, "controller ended the watch; resuming");
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(destination = %key, %status, "destination watch failed; keeping the last answer");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::warn!(destination = %key, %status, "controller unreachable; keeping the last answer")
                }
            }
            tokio::time::sleep(backoff.next().unwrap_or(self.options.max_backoff)).await;
        }
    }

    /// Watches the inbound policy of `port`: the inbound listener's (`answered` is `None`), or
    /// an original port of the transparent inbound listener (`answered` turns true at the first
    /// answer).
    async fn watch_inbound(self: Arc<Self>, port: u16, answered: Option<watch::Sender<bool>>) {
        let mut backoff = self.backoff();
        loop {
            let request = v1::InboundRequest {
                workload: self.options.workload.clone(),
                port: u32::from(port),
            };
            match InboundClient::new(self.channel.clone())
                .watch(request)
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    while let Ok(Some(policy)) = stream.message().await {
                        let Some(shared) = self.shared() else { return };
                        if policy.access_log && !shared.observe.access_log_on() {
                            // Asked for by the controller (`--access-log-namespace`).
                            if let Err(e) = shared
                                .observe
                                .enable_access_log("stderr", self.base.access_log_buffer)
                            {
                                tracing::warn!(error = %e, "could not start the access log the controller asked for");
                            }
                        }
                        {
                            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                            let protocol = protocol_from_proto(policy.protocol);
                            let policy = match policy_from_proto(policy) {
                                Ok(policy) => policy,
                                Err(e) => {
                                    tracing::error!(port, field = %e.field, error = %e, "controller inbound policy refused; keeping the running one");
                                    shared.metrics.update("controller", false);
                                    continue;
                                }
                            };
                            if answered.is_some() {
                                state.transparent.insert(
                                    port,
                                    config::TransparentPort {
                                        port,
                                        protocol: protocol.unwrap_or_default(),
                                        policy,
                                    },
                                );
                            } else {
                                state.inbound_protocol = protocol;
                                state.policy = Some(policy);
                            }
                        }
                        self.publish_inbound(&shared, "inbound policy");
                        match &answered {
                            Some(answered) => {
                                answered.send_replace(true);
                            }
                            None => shared.passed(INBOUND_POLICY),
                        }
                        backoff = self.backoff();
                    }
                    tracing::warn!(port, "inbound policy watch ended; keeping the last policy");
                }
                Err(status) => {
                    tracing::warn!(port, %status, "controller unreachable; keeping the last inbound policy")
                }
            }
            if self.shared().is_none() {
                return;
            }
            tokio::time::sleep(backoff.next().unwrap_or(self.options.max_backoff)).await;
        }
    }
}

impl Resolve for Controller {
    fn resolve(&self, key: &str) -> BoxFuture<'static, ()> {
        let mut rx = {
            let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
            match watches.get(key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(false);
                    watches.insert(key.to_string(), rx.clone());
                    if let Some(me) = self.me.upgrade() {
                        tokio::spawn(me.watch_destination(key.to_string(), tx));
                    }
                    rx
                }
            }
        };
        let wait = self.options.first_answer_wait;
        Box::pin(async move {
            let _ = tokio::time::timeout(wait, async {
                rx.wait_for(|answered| *answered).await.is_ok()
            })
            .await;
        })
    }

    fn inbound(&self, port: u16) -> BoxFuture<'static, ()> {
        let mut rx = {
            let mut watches = self
                .inbound_watches
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match watches.get(&port) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(false);
                    watches.insert(port, rx.clone());
                    if let Some(me) = self.me.upgrade() {
                        tokio::spawn(me.watch_inbound(port, Some(tx)));
                    }
                    rx
                }
            }
        };
        let wait = self.options.first_answer_wait;
        Box::pin(async move {
            let _ = tokio::time::timeout(wait, async {
                rx.wait_for(|answered| *answered).await.is_ok()
            })
            .await;
        })
    }
}

/// Apply one `DestinationUpdate` of the destination `key` (normalized) to that destination
/// alone: a profile compiles it (replacing its entry), an endpoint delta edits its last good
/// source and recompiles it, `not_found` removes it. On error (the field is named as
/// `destinations[KEY]...`) the destination keeps its last good entry.
pub fn apply_update(
    shared: &Shared,
    key: &str,
    update: v1::DestinationUpdate,
) -> Result<(), config::Invalid> {
    let field = format!("destinations[{key}]");
    match update.kind {
        Some(v1::destination_update::Kind::Profile(profile)) => {
            tracing::debug!(destination = %key, version = %update.version, "destination profile");
            shared
                .routes
                .apply_destination(destination_from_proto(key, profile), &field)
        }
        Some(v1::destination_update::Kind::NotFound(nf)) => {
            tracing::info!(destination = %key, reason = %nf.reason, "controller: destination does not exist");
            // The mesh-wide egress switch comes with every not-found answer (the latest wins).
            shared.routes.set_egress_denied(nf.egress_denied);
            shared.routes.set_external_ports(&nf.external_ports);
            shared.routes.remove_destination(key);
            Ok(())
        }
        Some(v1::destination_update::Kind::Delta(delta)) => {
            // The delta applies to what runs: after a rejected profile, the last good one.
            let Some(current) = shared.routes.table.load().get(key) else {
                tracing::warn!(destination = %key, "endpoint delta before a profile; ignored");
                return Ok(());
            };
            let mut dest = config::Destination::clone(&current.source);
            drop(current);
            apply_delta(&mut dest, delta);
            shared.routes.apply_destination(dest, &field)
        }
        None => Ok(()),
    }
}

/// Endpoints removed then added, per backend; an added address already present replaces it.
fn apply_delta(dest: &mut config::Destination, delta: v1::EndpointsDelta) {
    for change in delta.backends {
        let Some(backend) = dest.backends.iter_mut().find(|b| b.name == change.backend) else {
            continue;
        };
        backend
            .endpoints
            .retain(|e| !change.removed.contains(&e.address));
        for added in change.added {
            let endpoint = endpoint_from_proto(added);
            backend.endpoints.retain(|e| e.address != endpoint.address);
            backend.endpoints.push(endpoint);
        }
    }
}

fn protocol_from_proto(p: i32) -> Option<config::Protocol> {
    match v1::Protocol::try_from(p).unwrap_or(v1::Protocol::Unspecified) {
        v1::Protocol::Http => Some(config::Protocol::Http),
        v1::Protocol::Http2 => Some(config::Protocol::Http2),
        v1::Protocol::Tcp => Some(config::Protocol::Tcp),
        v1::Protocol::Detect => Some(config::Protocol::Detect),
        v1::Protocol::Unspecified => None,
    }
}

fn workload_from_proto(w: Option<v1::WorkloadRef>) -> Option<config::Workload> {
    w.filter(|w| !w.name.is_empty()).map(|w| config::Workload {
        kind: if w.kind.is_empty() {
            "deployment".into()
        } else {
            w.kind
        },
        name: w.name,
        namespace: if w.namespace.is_empty() {
            "default".into()
        } else {
            w.namespace
        },
    })
}

fn match_from_proto(m: v1::HttpMatch) -> config::HttpMatch {
    config::HttpMatch {
        path_regex: Some(m.path_regex).filter(|p| !p.is_empty()),
        methods: m.methods,
        headers: m.headers.into_iter().collect(),
    }
}

fn endpoint_from_proto(e: v1::Endpoint) -> config::Endpoint {
    config::Endpoint {
        address: e.address,
        identity: Some(e.identity).filter(|i| !i.is_empty()),
        labels: e.labels.into_iter().collect(),
        weight: if e.weight == 0 { 1 } else { e.weight },
        protocol: protocol_from_proto(e.protocol),
    }
}

/// Turn a profile into the config model (what `/config` shows).
pub fn destination_from_proto(key: &str, p: v1::DestinationProfile) -> config::Destination {
    config::Destination {
        authority: key.to_string(),
        // Unspecified = detect; the outbound HTTP listener treats detect as HTTP.
        protocol: protocol_from_proto(p.protocol).unwrap_or(config::Protocol::Detect),
        balancer: match v1::Balancer::try_from(p.balancer).unwrap_or(v1::Balancer::Unspecified) {
            v1::Balancer::RoundRobin => config::BalancerKind::RoundRobin,
            v1::Balancer::LeastRequest => config::BalancerKind::LeastRequest,
            v1::Balancer::Ewma | v1::Balancer::Unspecified => config::BalancerKind::Ewma,
        },
        routes: p
            .routes
            .into_iter()
            .map(|r| config::Route {
                name: r.name,
                matches: r.matches.into_iter().map(match_from_proto).collect(),
                backends: r
                    .backends
                    .into_iter()
                    .map(|b| config::WeightedRef {
                        name: b.name,
                        weight: b.weight,
                    })
                    .collect(),
                // The controller sends only validated policies: a message the types cannot hold
                // is a contract mismatch, and the route keeps the destination's policy.
                policy: r.policy.and_then(|policy| {
                    trellis_proxy_api::policy::route_from_proto(policy)
                        .inspect_err(|e| {
                            tracing::warn!(destination = key, "a route's policy refused: {e}")
                        })
                        .ok()
                }),
                ..Default::default()
            })
            .collect(),
        backends: p
            .backends
            .into_iter()
            .map(|b| config::Backend {
                name: b.name,
                weight: b.weight,
                endpoints: b.endpoints.into_iter().map(endpoint_from_proto).collect(),
                workload: workload_from_proto(b.workload),
            })
            .collect(),
        workload: workload_from_proto(p.workload),
        request_timeout_ms: Some(p.request_timeout_ms).filter(|t| *t > 0),
        // Not in the controller's contract (yet): the proxy's --trace-sampling applies.
        trace_sampling: None,
        // The TrafficPolicy's destination sections; `loadBalancer` is the profile's balancer
        // (above), and `rateLimit` is enforced inbound, so it is never here.
        policy: p.policy.and_then(|policy| {
            trellis_proxy_api::policy::destination_from_proto(*policy)
                .map(|mut policy| {
                    policy.load_balancer =
                        trellis_proxy_api::policy::balancer_from_proto(p.balancer);
                    policy
                })
                .inspect_err(|e| {
                    tracing::warn!(destination = key, "destination policy refused: {e}")
                })
                .ok()
        }),
        external: p.external.map(|e| config::External {
            name: e.name,
            allowed_identities: e.allowed_identities,
            ports: e
                .ports
                .into_iter()
                .filter_map(|p| {
                    Some(config::ExternalPort {
                        port: u16::try_from(p.port).ok()?,
                        originate_tls_port: u16::try_from(p.originate_tls_port)
                            .ok()
                            .filter(|port| *port != 0),
                    })
                })
                .collect(),
            ca_bundle: Some(e.ca_bundle).filter(|pem| !pem.is_empty()),
        }),
    }
}

/// Turn an inbound policy into the config model. Refused when its `jwt` holds what the Rust
/// types cannot (an unknown algorithm, a negative duration): the caller keeps its last policy,
/// since leaving the authentication out would open what the controller meant to close.
pub fn policy_from_proto(
    p: v1::InboundPolicy,
) -> Result<config::InboundPolicy, trellis_proxy_api::policy::PolicyError> {
    let jwt = p
        .jwt
        .map(trellis_proxy_api::jwt::policy_from_proto)
        .transpose()
        .map_err(|mut e| {
            e.field = format!("jwt.{}", e.field);
            e
        })?;
    Ok(config::InboundPolicy {
        default_action: match v1::DefaultAction::try_from(p.default_action)
            .unwrap_or(v1::DefaultAction::Unspecified)
        {
            v1::DefaultAction::Allow => config::DefaultAction::Allow,
            v1::DefaultAction::Deny | v1::DefaultAction::Unspecified => config::DefaultAction::Deny,
        },
        authorizations: p
            .authorizations
            .into_iter()
            // A rule naming only protocols this proxy does not know is dropped: it allows
            // nothing, never TCP by default.
            .filter_map(|a| {
                let protocols = protocols_from_proto(&a.protocols)?;
                Some(config::Authorization {
                    identities: a.identities,
                    // An out-of-range port becomes 0, which matches no listener: never widen a rule.
                    ports: a
                        .ports
                        .into_iter()
                        .map(|p| u16::try_from(p).unwrap_or(0))
                        .collect(),
                    routes: a.routes.into_iter().map(match_from_proto).collect(),
                    unauthenticated: a.unauthenticated,
                    networks: a.networks,
                    claims: a
                        .claims
                        .into_iter()
                        .map(trellis_proxy_api::jwt::claim_match_from_proto)
                        .collect(),
                    protocols,
                })
            })
            .collect(),
        rate_limits: p
            .rate_limits
            .into_iter()
            .map(|l| config::InboundRateLimit {
                limit: trellis_proxy_api::policy::rate_limit_from_proto(&l),
                name: l.name,
                matches: l.matches.into_iter().map(match_from_proto).collect(),
            })
            .collect(),
        jwt,
        claim_requirements: p
            .claim_requirements
            .into_iter()
            .map(|r| config::ClaimRequirement {
                name: r.name,
                matches: r.matches.into_iter().map(match_from_proto).collect(),
                claims: r
                    .claims
                    .into_iter()
                    .map(trellis_proxy_api::jwt::claim_match_from_proto)
                    .collect(),
            })
            .collect(),
    })
}

/// The protocols of a rule as the controller sent them (empty: TCP only); None when it names
/// only values this proxy does not know (such a rule must allow nothing, not fall back to TCP).
fn protocols_from_proto(protocols: &[i32]) -> Option<Vec<config::L4Protocol>> {
    let known: Vec<config::L4Protocol> = protocols
        .iter()
        .filter_map(|p| match v1::L4Protocol::try_from(*p) {
            Ok(v1::L4Protocol::Tcp) => Some(config::L4Protocol::Tcp),
            Ok(v1::L4Protocol::Udp) => Some(config::L4Protocol::Udp),
            _ => None,
        })
        .collect();
    if known.is_empty() && !protocols.is_empty() {
        tracing::warn!(
            ?protocols,
            "an authorization names no protocol this proxy knows: it allows nothing"
        );
        return None;
    }
    Some(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_protocols_from_the_controller_never_widen_a_rule() {
        assert_eq!(
            protocols_from_proto(&[]),
            Some(Vec::new()),
            "none: TCP only"
        );
        assert_eq!(
            protocols_from_proto(&[v1::L4Protocol::Udp as i32]),
            Some(vec![config::L4Protocol::Udp])
        );
        assert_eq!(
            protocols_from_proto(&[v1::L4Protocol::Tcp as i32, 99]),
            Some(vec![config::L4Protocol::Tcp])
        );
        assert_eq!(
            protocols_from_proto(&[99]),
            None,
            "only unknown protocols: the rule is dropped, not read as TCP"
        );
    }
    use crate::table::{DestinationTable, Lookup};

    fn shared() -> Shared {
        let mut registry = prometheus_client::registry::Registry::default();
        Shared::new(
            &Config::default(),
            &mut registry,
            Arc::new(crate::authz::PolicyAuthorizer),
            None,
        )
        .unwrap()
    }

    fn endpoint(address: &str) -> v1::Endpoint {
        v1::Endpoint {
            address: address.into(),
            ..Default::default()
        }
    }

    fn update(kind: v1::destination_update::Kind) -> v1::DestinationUpdate {
        v1::DestinationUpdate {
            version: "1".into(),
            kind: Some(kind),
        }
    }

    /// A profile with a regex route and two backends; `v1` has `endpoints`.
    fn profile(key: &str, path_regex: &str, endpoints: &[&str]) -> v1::DestinationUpdate {
        update(v1::destination_update::Kind::Profile(
            v1::DestinationProfile {
                authority: key.into(),
                protocol: v1::Protocol::Http as i32,
                routes: vec![v1::HttpRoute {
                    name: "api".into(),
                    matches: vec![v1::HttpMatch {
                        path_regex: path_regex.into(),
                        ..Default::default()
                    }],
                    backends: vec![v1::WeightedRef {
                        name: "v2".into(),
                        weight: 1,
                    }],
                    policy: None,
                }],
                backends: vec![
                    v1::Backend {
                        name: "v1".into(),
                        weight: 1,
                        endpoints: endpoints.iter().map(|a| endpoint(a)).collect(),
                        workload: None,
                    },
                    v1::Backend {
                        name: "v2".into(),
                        weight: 0,
                        endpoints: vec![endpoint(&format!("{key}-v2:80"))],
                        workload: None,
                    },
                ],
                ..Default::default()
            },
        ))
    }

    fn delta(backend: &str, added: &[&str], removed: &[&str]) -> v1::DestinationUpdate {
        update(v1::destination_update::Kind::Delta(v1::EndpointsDelta {
            backends: vec![v1::BackendDelta {
                backend: backend.into(),
                added: added.iter().map(|a| endpoint(a)).collect(),
                removed: removed.iter().map(|a| a.to_string()).collect(),
            }],
        }))
    }

    fn entry(shared: &Shared, key: &str) -> Arc<DestinationTable> {
        shared
            .routes
            .table
            .load()
            .get(key)
            .unwrap_or_else(|| panic!("{key} is in the table"))
    }

    fn addresses(d: &DestinationTable) -> Vec<String> {
        d.backends[0]
            .endpoints
            .iter()
            .map(|e| e.authority.to_string())
            .collect()
    }

    #[test]
    fn inbound_jwt_and_claims_arrive_and_an_unusable_jwt_is_refused_with_its_field() {
        let jwt: trellis_jwt::JwtPolicy = serde_json::from_value(serde_json::json!({
            "required": true,
            "providers": [{"issuer": "https://i", "audiences": ["a"],
                "jwks": {"url": "https://i/keys"}, "algorithms": ["ES256"]}]
        }))
        .unwrap();
        let claims = trellis_jwt::ClaimMatch {
            claim: "role".into(),
            values: vec!["admin".into()],
        };
        let mut sent = v1::InboundPolicy {
            authorizations: vec![v1::Authorization {
                unauthenticated: true,
                claims: vec![trellis_proxy_api::jwt::claim_match_to_proto(&claims)],
                ..Default::default()
            }],
            jwt: Some(trellis_proxy_api::jwt::policy_to_proto(&jwt)),
            ..Default::default()
        };
        sent.claim_requirements = vec![trellis_proxy_api::jwt::claim_requirement_to_proto(
            "demo/web/api".into(),
            vec![v1::HttpMatch {
                path_regex: "/admin/.*".into(),
                methods: vec!["GET".into()],
                headers: Default::default(),
            }],
            std::slice::from_ref(&claims),
        )];
        let policy = policy_from_proto(sent.clone()).unwrap();
        assert_eq!(policy.jwt.as_ref(), Some(&jwt));
        assert_eq!(
            policy.authorizations[0].claims,
            std::slice::from_ref(&claims)
        );
        assert_eq!(
            policy.claim_requirements,
            [config::ClaimRequirement {
                name: "demo/web/api".into(),
                matches: vec![config::HttpMatch {
                    path_regex: Some("/admin/.*".into()),
                    methods: vec!["GET".into()],
                    headers: Default::default(),
                }],
                claims: vec![claims],
            }]
        );
        sent.jwt.as_mut().unwrap().providers[0].algorithms = vec!["ES999".into()];
        assert_eq!(
            policy_from_proto(sent).unwrap_err().field,
            "jwt.providers[0].algorithms[0]"
        );
    }

    #[test]
    fn each_update_replaces_its_destination_alone() {
        let shared = shared();
        for (key, address) in [
            ("a.shop", "10.0.1.1:80"),
            ("b.shop", "10.0.2.1:80"),
            ("c.shop", "10.0.3.1:80"),
        ] {
            apply_update(&shared, key, profile(key, "/api/.*", &[address])).unwrap();
        }
        let generation = shared.routes.table.load_full();
        let (a, b, c) = (
            entry(&shared, "a.shop"),
            entry(&shared, "b.shop"),
            entry(&shared, "c.shop"),
        );
        let b_stats = Arc::clone(&b.backends[0].endpoints[0].stats);

        // An endpoint delta: b alone, in its slot.
        apply_update(&shared, "b.shop", delta("v1", &["10.0.2.2:80"], &[])).unwrap();
        assert!(
            Arc::ptr_eq(&generation, &shared.routes.table.load_full()),
            "no new generation for a known destination"
        );
        assert!(Arc::ptr_eq(&a, &entry(&shared, "a.shop")));
        assert!(Arc::ptr_eq(&c, &entry(&shared, "c.shop")));
        let b2 = entry(&shared, "b.shop");
        assert_eq!(addresses(&b2), ["10.0.2.1:80", "10.0.2.2:80"]);
        assert!(Arc::ptr_eq(&b_stats, &b2.backends[0].endpoints[0].stats));

        // An invalid profile: rejected with the destination and field, b keeps its last good
        // entry, and the other destinations still take updates.
        let err =
            apply_update(&shared, "b.shop", profile("b.shop", "(", &["10.0.2.3:80"])).unwrap_err();
        assert_eq!(
            err.field, "destinations[b.shop].routes[0].matches[0].path_regex",
            "{err}"
        );
        assert!(Arc::ptr_eq(&b2, &entry(&shared, "b.shop")));
        apply_update(&shared, "a.shop", delta("v1", &["10.0.1.2:80"], &[])).unwrap();
        assert_eq!(
            addresses(&entry(&shared, "a.shop")),
            ["10.0.1.1:80", "10.0.1.2:80"]
        );

        // A delta after the rejected profile edits the last good one.
        apply_update(&shared, "b.shop", delta("v1", &[], &["10.0.2.1:80"])).unwrap();
        let b3 = entry(&shared, "b.shop");
        assert_eq!(addresses(&b3), ["10.0.2.2:80"]);
        assert_eq!(
            b3.source.routes[0].matches[0].path_regex.as_deref(),
            Some("/api/.*")
        );

        // not_found removes b alone; /config shows what is left, assembled.
        let c_now = entry(&shared, "c.shop");
        let nf = update(v1::destination_update::Kind::NotFound(v1::NotFound {
            egress_denied: false,
            external_ports: Vec::new(),
            reason: "gone".into(),
        }));
        apply_update(&shared, "b.shop", nf).unwrap();
        assert!(matches!(
            shared.routes.table.load().lookup("b.shop"),
            Lookup::Unknown(_)
        ));
        assert!(Arc::ptr_eq(&c_now, &entry(&shared, "c.shop")));
        let config = shared.routes.table.load().config();
        let keys: Vec<_> = config.destinations.iter().map(|d| &d.authority).collect();
        assert_eq!(keys, ["a.shop", "c.shop"]);
        // A delta for a destination without a profile is ignored.
        apply_update(&shared, "b.shop", delta("v1", &["10.0.2.9:80"], &[])).unwrap();
        assert!(shared.routes.table.load().get("b.shop").is_none());

        // The mesh-wide egress switch rides on not-found answers; the latest one wins.
        assert!(!shared.routes.egress_denied(), "allow by default");
        let denied = |egress_denied| {
            update(v1::destination_update::Kind::NotFound(v1::NotFound {
                egress_denied,
                external_ports: Vec::new(),
                reason: "not in the mesh".into(),
            }))
        };
        apply_update(&shared, "203.0.113.9:443", denied(true)).unwrap();
        assert!(shared.routes.egress_denied());
        apply_update(&shared, "203.0.113.9:443", denied(false)).unwrap();
        assert!(!shared.routes.egress_denied());

        // So do the ExternalServices' ports (the latest answer wins).
        assert!(!shared.routes.is_external_port(443));
        let ports = |external_ports| {
            update(v1::destination_update::Kind::NotFound(v1::NotFound {
                egress_denied: false,
                external_ports,
                reason: "not in the mesh".into(),
            }))
        };
        apply_update(&shared, "203.0.113.9:443", ports(vec![8443, 443, 443])).unwrap();
        assert!(shared.routes.is_external_port(443) && shared.routes.is_external_port(8443));
        assert!(!shared.routes.is_external_port(80));
        apply_update(&shared, "203.0.113.9:443", ports(vec![80])).unwrap();
        assert!(shared.routes.is_external_port(80) && !shared.routes.is_external_port(443));
    }

    #[test]
    fn an_external_profile_becomes_an_outside_destination() {
        let shared = shared();
        let profile = v1::DestinationProfile {
            authority: "api.pay.example".into(),
            backends: vec![v1::Backend {
                name: "payments".into(),
                weight: 1,
                endpoints: vec![endpoint("api.pay.example")],
                workload: None,
            }],
            external: Some(v1::ExternalService {
                name: "shop/payments".into(),
                allowed_identities: vec!["spiffe://cluster.local/ns/shop/sa/checkout".into()],
                ports: vec![
                    v1::ExternalPort {
                        port: 443,
                        originate_tls_port: 0,
                    },
                    v1::ExternalPort {
                        port: 80,
                        originate_tls_port: 443,
                    },
                ],
                ca_bundle: String::new(),
            }),
            ..Default::default()
        };
        let d = destination_from_proto("api.pay.example", profile.clone());
        let external = d.external.as_ref().expect("external");
        assert_eq!(external.ports[0].originate_tls_port, None, "0 = none");
        assert_eq!(external.ports[1].originate_tls_port, Some(443));
        assert_eq!(external.ca_bundle, None, "empty = the system's roots");
        apply_update(
            &shared,
            "api.pay.example",
            update(v1::destination_update::Kind::Profile(profile)),
        )
        .unwrap();
        let entry = entry(&shared, "api.pay.example");
        let table = entry.external.as_ref().expect("compiled as outside");
        assert!(table.port(80).is_some() && table.port(22).is_none());
        assert!(shared.routes.is_external_port(443), "its ports are read");
    }
}
