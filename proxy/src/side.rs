//! Which side of the proxy a connection (and each of its requests) is on: outbound from the
//! local application, or inbound from an authenticated caller.

use std::sync::Arc;

use crate::authz::Caller;

/// Which side a connection is on.
#[derive(Debug, Clone)]
pub enum Side {
    /// Outbound: route by authority, or to a fixed destination (per-upstream port).
    Outbound {
        /// The destination of a per-upstream port.
        fixed: Option<Arc<str>>,
        /// Gateway mode: the destination is the gateway's route for the request's host.
        gateway: Option<Arc<crate::gateway::Gateway>>,
    },
    /// Inbound: authorize, then forward to the local application.
    Inbound {
        /// The caller.
        caller: Caller,
    },
}
