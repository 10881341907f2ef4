//! The prober of active health checks ([`crate::health`] holds the state machine and the
//! compiled settings): one task per current destination entry with a `healthCheck`, probing each
//! endpoint address on its own rhythm through the proxy's upstream clients, plain or mTLS like
//! requests, and recording each result in the endpoint's [`crate::health::HealthState`].
//!
//! Started by the routing state when an entry becomes current (a hook [`starter`] installs, see
//! [`crate::routes::Routes::start_health_checks`]) and stopped when the entry is replaced or
//! removed; the task holds a `Weak` to the proxy's state, so it also ends when the proxy does.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Uri, Version};
use http_body_util::BodyExt;

use crate::balance::EndpointStats;
use crate::health::{HealthState, Thresholds};
use crate::http::RequestBody;
use crate::metrics::Label;
use crate::state::{Shared, StartProbes};
use crate::table::DestinationTable;

/// Most of a probe's answer body that is read (the rest is dropped with the connection): health
/// endpoints answer a few bytes; reading keeps a pooled HTTP/1.1 connection reusable.
const MAX_PROBE_BODY: usize = 64 * 1024;
/// The `user-agent` of probes, so applications can tell them from requests.
const USER_AGENT: &str = "trellis-proxy-health-check";

/// The hook that starts an entry's prober on `runtime`, for [`crate::routes::Routes::start_health_checks`].
pub fn starter(shared: Weak<Shared>, runtime: tokio::runtime::Handle) -> StartProbes {
    Box::new(move |dest| start(dest, Weak::clone(&shared), &runtime))
}

/// Start probing `dest`'s endpoints (once per compiled entry; never after [`crate::health::Checks::stop`]).
/// Called (through [`starter`]) when the entry becomes current, on `runtime`.
pub fn start(dest: &Arc<DestinationTable>, shared: Weak<Shared>, runtime: &tokio::runtime::Handle) {
    let Some(checks) = &dest.health else { return };
    if !checks.claim_start() {
        return;
    }
    let prober = Prober {
        shared,
        key: dest.key.clone(),
        label: dest.label.clone(),
        path: checks.path.clone(),
        interval: checks.interval,
        timeout: checks.timeout,
        thresholds: checks.thresholds,
        targets: targets(dest),
    };
    let stop = checks.stopped();
    runtime.spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = prober.run() => {}
        }
        prober.finish();
    });
}

/// One endpoint address to probe.
#[derive(Debug)]
struct Target {
    authority: Authority,
    http2: bool,
    identity: Option<Label>,
    stats: Arc<EndpointStats>,
}

/// Each endpoint address of the destination once (an address in two backends shares its
/// statistics, so it is probed once).
fn targets(dest: &DestinationTable) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for e in dest.backends.iter().flat_map(|b| &b.endpoints) {
        if !seen.insert(Arc::as_ptr(&e.stats)) {
            continue;
        }
        out.push(Target {
            authority: e.authority.clone(),
            http2: e.http2,
            identity: e.identity.clone(),
            stats: Arc::clone(&e.stats),
        });
    }
    out
}

/// The task of one destination's health check.
#[derive(Debug)]
struct Prober {
    shared: Weak<Shared>,
    key: String,
    label: Label,
    path: Option<PathAndQuery>,
    interval: Duration,
    timeout: Duration,
    thresholds: Thresholds,
    targets: Vec<Target>,
}

impl Prober {
    /// Probe every target on its own rhythm, until the proxy is gone (or the task is cancelled).
    async fn run(&self) {
        // The state is kept across replacements: report it at once, not after the first change.
        if let Some(shared) = self.shared.upgrade() {
            self.report(&shared);
        }
        futures::future::join_all(self.targets.iter().map(|t| self.probe_loop(t))).await;
    }

    async fn probe_loop(&self, target: &Target) {
        let health = &target.stats.health;
        loop {
            tokio::time::sleep(self.wait(health)).await;
            // Another prober of this endpoint (the entry this one replaced, not yet stopped; a
            // second destination naming the same address) probed it just now: keep its rhythm.
            if !health.claim(self.interval / 2) {
                continue;
            }
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            let Some(passed) = self.probe(&shared, target).await else {
                continue;
            };
            shared.metrics.health_check(&self.label, passed);
            if let Some(healthy) = health.record(passed, self.thresholds) {
                if healthy {
                    tracing::info!(destination = %self.key, endpoint = %target.authority, "endpoint passed its health checks: back in its balancer");
                } else {
                    tracing::warn!(destination = %self.key, endpoint = %target.authority, "endpoint failed its health checks: it gets no requests until it passes them");
                }
                self.report(&shared);
            }
        }
    }

    /// Until this endpoint's next probe: an interval after its last one (a random time within
    /// one interval for an endpoint never probed, so probes of many endpoints do not align),
    /// plus up to a tenth of an interval of jitter.
    fn wait(&self, health: &HealthState) -> Duration {
        let jitter = self.interval.mul_f64(fastrand::f64() / 10.0);
        match health.since_last_probe() {
            None => self.interval.mul_f64(fastrand::f64()),
            Some(since) => self.interval.saturating_sub(since) + jitter,
        }
    }

    /// One probe: Some(passed), or None when it could not be made (mTLS without a certificate).
    async fn probe(&self, shared: &Shared, target: &Target) -> Option<bool> {
        let Some(path) = &self.path else {
            let connect = tokio::net::TcpStream::connect(target.authority.as_str());
            return Some(matches!(
                tokio::time::timeout(self.timeout, connect).await,
                Ok(Ok(_))
            ));
        };
        let expected = target
            .identity
            .as_ref()
            .filter(|_| shared.identity.is_configured());
        if expected.is_some() && shared.identity.current().is_none() {
            return None;
        }
        let req = match self.request(path, target) {
            Ok(req) => req,
            Err(e) => {
                tracing::warn!(destination = %self.key, endpoint = %target.authority, error = %e, "could not build a health-check request");
                return None;
            }
        };
        let sent = match expected {
            Some(expected) => shared
                .upstreams
                .shared()
                .mesh(expected, target.http2, &shared.identity, &shared.metrics)
                .request(req),
            None => shared.upstreams.shared().plain(target.http2).request(req),
        };
        let exchange = async {
            let resp = sent.await.ok()?;
            let status = resp.status();
            // Read a bounded answer so the connection can be reused; its content does not matter.
            let _ = http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY)
                .collect()
                .await;
            Some(status.is_success() || status.is_redirection())
        };
        Some(matches!(
            tokio::time::timeout(self.timeout, exchange).await,
            Ok(Some(true))
        ))
    }

    fn request(
        &self,
        path: &PathAndQuery,
        target: &Target,
    ) -> Result<Request<RequestBody>, http::Error> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(target.authority.clone())
            .path_and_query(path.clone())
            .build()?;
        let mut req = Request::get(uri)
            .version(if target.http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            })
            .header(http::header::USER_AGENT, USER_AGENT);
        // HTTP/1.1: the service's name, as requests carry it (HTTP/2 names the endpoint in
        // `:authority` and carries no `host`).
        if !target.http2
            && let Ok(host) = HeaderValue::from_str(&self.key)
        {
            req = req.header(http::header::HOST, host);
        }
        req.body(RequestBody::empty())
    }

    /// Publish how many of this destination's endpoints are unhealthy now.
    fn report(&self, shared: &Shared) {
        let unhealthy = self
            .targets
            .iter()
            .filter(|t| !t.stats.health.healthy())
            .count();
        shared.metrics.unhealthy_endpoints(&self.label, unhealthy);
    }

    /// After the task ended: when the destination is no longer health-checked (removed, or
    /// replaced by an entry without a check), its gauge goes (a replacement with a check reports
    /// its own).
    fn finish(&self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let checked = shared
            .routes
            .table
            .load()
            .get(&self.key)
            .is_some_and(|d| d.health.is_some());
        if !checked {
            shared.metrics.forget_unhealthy_endpoints(&self.label);
        }
    }
}
