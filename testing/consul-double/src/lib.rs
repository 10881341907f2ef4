//! A double of Consul's catalog and health HTTP API (blocking queries included) and of the local
//! agent's service registration API: test support for
//! the Consul discovery adapter (and, as the `trellis-consul-double` binary, for the conformance
//! harness).
//!
//! It serves what the adapter uses, the way Consul documents it:
//! - `PUT /v1/catalog/register` (node, `Service` with Tags, Meta, Weights, TaggedAddresses,
//!   Address, Port, `Check`/`Checks`) and `PUT /v1/catalog/deregister` (a check, a service
//!   instance with its checks, or a whole node);
//! - `GET /v1/catalog/services` and `GET /v1/health/service/:service` (`passing`, `tag`, `ns`,
//!   `stale`, `index`, `wait`, `token`), `GET /v1/status/leader`;
//! - the local agent's service API, the way hosts register their services:
//!   `PUT /v1/agent/service/register` (an instance on the double's own node,
//!   [`DoubleConfig::agent`], whose HTTP, TCP and TTL checks the double runs),
//!   `PUT /v1/agent/service/deregister/:id`, `PUT /v1/agent/check/{pass,warn,fail}/:id`;
//! - blocking queries: `index` + `wait` (Go duration, capped at 10 min, default 5 min, plus up to
//!   wait/16 random jitter), `X-Consul-Index` per service (the last write touching that service's
//!   instances, checks or nodes), `X-Consul-KnownLeader`, `X-Consul-LastContact`;
//! - ACLs with default deny when [`DoubleConfig::acl_token`] is set (`X-Consul-Token` header,
//!   `Authorization: Bearer` or `token` parameter): a wrong token gets 403 "ACL not found",
//!   anonymous reads are filtered to nothing (`X-Consul-Results-Filtered-By-ACLs: true`) and
//!   anonymous writes get 403 "Permission denied".
//!
//! Test controls ([`ConsulDouble`] methods, or `POST /_double/...` on a double run as a process):
//! index reset (backwards, or reporting 0), leader loss, failures of the next N requests, hanging
//! requests, stopping the listener and listening again at the same port, check status changes,
//! and a log of the requests received.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let double = trellis_consul_double::ConsulDouble::start().await?;
//! println!("Consul API at {}", double.http_addr());
//! # Ok(()) }
//! ```
//!
//! Where it differs from Consul is listed in the README ("Fidelity").

mod duration;
mod server;
mod state;
pub mod wire;

pub use duration::parse_go_duration;
pub use server::{
    AgentConfig, ConsulDouble, DEFAULT_CHECK_TIMEOUT, DEFAULT_WAIT, DoubleConfig, JITTER_FRACTION,
    MAX_WAIT, RecordedRequest, SERF_HEALTH,
};
pub use state::{DEFAULT_NAMESPACE, VALID_STATUSES, WriteError};
