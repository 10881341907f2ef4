//! The sample application of Trellis: what `trellis demo` runs behind its proxies and what the
//! conformance suite calls through the mesh. It is an ordinary app, not a test double: it knows
//! nothing of Trellis and talks plain HTTP/1.1 and h2c.
//!
//! - [`echo`] (binary `trellis-echo`): answers who it is, counts requests per caller and path,
//!   and makes calls on request, so "A calls B" scenarios can ask B what it saw.
//! - [`client`]: the calling side: N requests on one keep-alive connection, directly or through a
//!   mesh proxy, and what answered.
//! - [`plain`]: one plain HTTP request on its own connection (registries, counts, metrics).

pub mod client;
pub mod echo;
pub mod plain;
