//! Destinations by address: what `Destinations.Watch("IP:PORT")` answers, for connections a
//! proxy intercepted in transparent mode (the original destination is all it knows).
//!
//! One follower task per watched `IP:PORT`, shared by every proxy that asks, follows
//! [`Discovery::watch_address`] for the IP (the adapters answer from an index, so a change costs
//! one lookup, never a scan per connection; proxies cache per `IP:PORT` on top):
//! - a service's virtual address on one of its ports: that service's destination channel (the
//!   same profile as a name-based watch: TrafficSplit, routes, endpoints, identities), forwarded
//!   with the profile's `authority` set to `IP:PORT`. Profiles are per service and follow its
//!   first port (as name-based ones do), so another port of a multi-port service is answered
//!   "not found" (forwarded unchanged by the proxy, which on Kubernetes still reaches the
//!   Service through kube-proxy) rather than routed to the wrong target port;
//! - an endpoint's own address (a pod IP) on one of its ports: a profile with that one endpoint
//!   and its identity (mTLS to the pod's proxy);
//! - anything else: the index's answer for the address as an ExternalService's fixed address
//!   (`super::external::resolve_address`): that ExternalService's profile, or `NotFound` (the
//!   proxy forwards the connection unchanged, never drops it, unless egress is denied).
//!
//! The answer keeps following discovery: a service created after the first ask is found,
//! deleted it is `NotFound` again. Versions are `<target generation>.<inner version>`, so a
//! change of target (another service, or none) is never mistaken for a duplicate.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use trellis_discovery::{AddressOwner, Discovery, Endpoint, ServiceKey};
use trellis_proxy_api::v1;

use super::external::ExternalKey;
use super::{DestinationRx, Input, outbound};

/// A channel of the index an address follows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Followed {
    /// A service's destination channel.
    Service(ServiceKey),
    /// The address's external channel (no service or endpoint holds it).
    External,
}

/// What an address is, for the proxy.
enum Target {
    /// Follow this channel of the index.
    Follow(Followed),
    /// A fixed answer (a pod profile, or not found). Boxed: a profile is several times the size
    /// of a service key.
    Fixed(Box<v1::destination_update::Kind>),
}

fn not_found(reason: String) -> Target {
    Target::Fixed(Box::new(v1::destination_update::Kind::NotFound(
        v1::NotFound {
            egress_denied: false,
            external_ports: Vec::new(),
            reason,
        },
    )))
}

fn target(addr: SocketAddr, owner: AddressOwner, trust_domain: &str) -> Target {
    let port = addr.port();
    match owner {
        AddressOwner::Unknown => Target::Follow(Followed::External),
        AddressOwner::Service { service, ports } => match ports.first() {
            Some(first) if first.port == port => Target::Follow(Followed::Service(service)),
            _ if ports.iter().any(|p| p.port == port) => not_found(format!(
                "{addr} is port {port} of service {service}, whose profile follows its first port {}: forwarded unchanged",
                ports[0].port
            )),
            _ => not_found(format!(
                "{addr} is an address of service {service}, which has no port {port}: forwarded unchanged"
            )),
        },
        AddressOwner::Endpoint { service, endpoint } => {
            if endpoint.ports.iter().any(|p| p.port == port) {
                Target::Fixed(Box::new(v1::destination_update::Kind::Profile(
                    pod_profile(addr, &service, &endpoint, trust_domain),
                )))
            } else {
                not_found(format!(
                    "{addr} is an endpoint of service {service} on a port it does not serve: forwarded unchanged"
                ))
            }
        }
    }
}

/// The profile of one endpoint addressed directly (a pod IP): one backend, that endpoint.
fn pod_profile(
    addr: SocketAddr,
    service: &ServiceKey,
    endpoint: &Endpoint,
    trust_domain: &str,
) -> v1::DestinationProfile {
    let protocol = outbound::protocol(endpoint.protocol) as i32;
    let workload = v1::WorkloadRef {
        kind: endpoint
            .owner
            .as_ref()
            .map_or_else(|| "service".into(), |o| o.kind.to_ascii_lowercase()),
        name: endpoint
            .owner
            .as_ref()
            .map_or_else(|| service.name.clone(), |o| o.name.clone()),
        namespace: service.namespace.clone(),
    };
    v1::DestinationProfile {
        authority: addr.to_string(),
        protocol,
        balancer: v1::Balancer::Unspecified as i32,
        backends: vec![v1::Backend {
            name: service.name.clone(),
            weight: 1,
            endpoints: vec![v1::Endpoint {
                address: addr.to_string(),
                identity: endpoint.identity.spiffe_id(trust_domain),
                labels: endpoint.labels.clone().into_iter().collect(),
                weight: 0,
                protocol,
            }],
            workload: Some(workload.clone()),
        }],
        workload: Some(workload),
        ..Default::default()
    }
}

/// Asks the index for the channel `followed` names.
async fn destination(
    index: &mpsc::WeakUnboundedSender<Input>,
    addr: SocketAddr,
    followed: Followed,
) -> Option<DestinationRx> {
    let (reply, rx) = oneshot::channel();
    let input = match followed {
        Followed::Service(service) => Input::WatchDestination(service, reply),
        Followed::External => Input::WatchExternal(ExternalKey::Address(addr), reply),
    };
    index.upgrade()?.send(input).ok()?;
    rx.await.ok()
}

/// Sends `kind` unless it is what the channel holds already.
fn send(
    tx: &watch::Sender<Option<v1::DestinationUpdate>>,
    generation: u64,
    inner: &str,
    kind: v1::destination_update::Kind,
) {
    tx.send_if_modified(|current| {
        if current.as_ref().and_then(|u| u.kind.as_ref()) == Some(&kind) {
            return false;
        }
        *current = Some(v1::DestinationUpdate {
            version: format!("{generation}.{inner}"),
            kind: Some(kind),
        });
        true
    });
}

/// The service's current update, with the address as the profile's authority.
fn readdressed(
    addr: SocketAddr,
    update: &v1::DestinationUpdate,
) -> Option<v1::destination_update::Kind> {
    let mut kind = update.kind.clone()?;
    if let v1::destination_update::Kind::Profile(profile) = &mut kind {
        profile.authority = addr.to_string();
    }
    Some(kind)
}

/// Follows `addr` until nobody holds `tx`'s channel any more.
pub(super) async fn follow(
    addr: SocketAddr,
    discovery: Arc<dyn Discovery>,
    index: mpsc::WeakUnboundedSender<Input>,
    tx: watch::Sender<Option<v1::DestinationUpdate>>,
    trust_domain: String,
) {
    let mut owners = discovery.watch_address(addr.ip());
    let mut following: Option<(Followed, DestinationRx)> = None;
    let mut generation = 0u64;
    loop {
        tokio::select! {
            () = tx.closed() => return,
            owner = owners.next() => match owner {
                // Streams never end on their own; if one does, the last answer stays.
                None => {
                    tx.closed().await;
                    return;
                }
                Some(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "address lookup failed; keeping the last answer");
                }
                Some(Ok(owner)) => match target(addr, owner, &trust_domain) {
                    Target::Follow(followed) => {
                        if following.as_ref().is_some_and(|(f, _)| *f == followed) {
                            continue;
                        }
                        generation += 1;
                        let Some(mut rx) = destination(&index, addr, followed.clone()).await else {
                            return;
                        };
                        let current = rx.borrow_and_update().clone();
                        if let Some(update) = current
                            && let Some(kind) = readdressed(addr, &update)
                        {
                            send(&tx, generation, &update.version, kind);
                        }
                        following = Some((followed, rx));
                    }
                    Target::Fixed(kind) => {
                        if following.take().is_some() || tx.borrow().is_none() {
                            generation += 1;
                        }
                        send(&tx, generation, "0", *kind);
                    }
                },
            },
            changed = async {
                match following.as_mut() {
                    Some((_, rx)) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if !changed {
                    // The index stopped.
                    return;
                }
                if let Some((_, rx)) = following.as_mut() {
                    let current = rx.borrow_and_update().clone();
                    if let Some(update) = current
                        && let Some(kind) = readdressed(addr, &update)
                    {
                        send(&tx, generation, &update.version, kind);
                    }
                }
            }
        }
    }
}
