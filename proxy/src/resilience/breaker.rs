//! The circuit breaker: limits on what one destination may hold open, answered at once with
//! `503 overloaded` instead of queueing without bound (Envoy's "circuit breaking" thresholds).
//!
//! Counters live in a [`BreakerState`] per destination key that outlives configuration
//! changes (the table keeps it in its registry), so requests in flight under the last table
//! still count under the next one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A destination's counters.
#[derive(Debug)]
pub struct BreakerState {
    requests: AtomicUsize,
    pending: AtomicUsize,
    /// Connection permits for `maxConnections` (the limit they were made for): made when first
    /// needed, replaced when the limit changes (connections holding permits of the old one
    /// release them there).
    connections: std::sync::Mutex<Option<(usize, Arc<Semaphore>)>>,
}

impl Default for BreakerState {
    fn default() -> Self {
        BreakerState {
            requests: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            connections: std::sync::Mutex::new(None),
        }
    }
}

impl BreakerState {
    /// Requests in flight now.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests waiting for a connection now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// The breaker of one destination, compiled.
#[derive(Debug, Clone)]
pub struct Breaker {
    /// Requests in flight to the destination.
    pub max_requests: Option<usize>,
    /// Requests in flight to one endpoint.
    pub max_requests_per_endpoint: Option<usize>,
    /// Connections open to the destination's endpoints.
    pub max_connections: Option<usize>,
    /// Requests waiting for one of those connections.
    pub max_pending: usize,
    /// The counters.
    pub state: Arc<BreakerState>,
}

/// A request admitted by the breaker; dropping it frees its place.
#[derive(Debug)]
pub struct RequestPermit(Arc<BreakerState>);

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection admitted by the breaker, held by the connection until it closes.
#[derive(Debug)]
pub struct ConnectionPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// Why the breaker refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overloaded {
    /// `maxRequests` are in flight.
    #[error("the destination has its maximum of requests in flight")]
    Requests,
    /// Every endpoint has `maxRequestsPerEndpoint` in flight.
    #[error("every endpoint has its maximum of requests in flight")]
    Endpoints,
    /// `maxConnections` are open and `maxPendingRequests` wait for one.
    #[error("the destination has its maximum of connections open and of requests waiting")]
    Pending,
}

impl Breaker {
    /// Compile checked settings with the destination's counters.
    pub fn compile(b: &trellis_policy::CircuitBreaker, state: Arc<BreakerState>) -> Self {
        let limit = |v: Option<u32>| v.map(|v| v as usize);
        Breaker {
            max_requests: limit(b.max_requests),
            max_requests_per_endpoint: limit(b.max_requests_per_endpoint),
            max_connections: limit(b.max_connections),
            max_pending: b.max_pending_requests.unwrap_or(0) as usize,
            state,
        }
    }

    /// Admit one request, or say why not.
    pub fn admit(&self) -> Result<RequestPermit, Overloaded> {
        let before = self.state.requests.fetch_add(1, Ordering::Relaxed);
        let permit = RequestPermit(Arc::clone(&self.state));
        match self.max_requests {
            Some(max) if before >= max => Err(Overloaded::Requests),
            _ => Ok(permit),
        }
    }

    /// Whether an endpoint with `in_flight` requests may take one more.
    pub fn endpoint_has_room(&self, in_flight: usize) -> bool {
        self.max_requests_per_endpoint
            .is_none_or(|max| in_flight < max)
    }

    /// A place for one more connection: at once while fewer than `maxConnections` are open,
    /// else after waiting as one of at most `maxPendingRequests`; refused beyond that.
    /// `None` when the breaker does not limit connections.
    pub async fn connection(&self) -> Result<Option<ConnectionPermit>, Overloaded> {
        let Some(max) = self.max_connections else {
            return Ok(None);
        };
        let semaphore = {
            let mut slot = self
                .state
                .connections
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some((size, s)) if *size == max => Arc::clone(s),
                _ => {
                    let s = Arc::new(Semaphore::new(max));
                    *slot = Some((max, Arc::clone(&s)));
                    s
                }
            }
        };
        if let Ok(permit) = Arc::clone(&semaphore).try_acquire_owned() {
            return Ok(Some(ConnectionPermit(permit)));
        }
        let waiting = self.state.pending.fetch_add(1, Ordering::Relaxed);
        let _leave = PendingGuard(&self.state);
        if waiting >= self.max_pending {
            return Err(Overloaded::Pending);
        }
        semaphore
            .acquire_owned()
            .await
            .map(|p| Some(ConnectionPermit(p)))
            .map_err(|_| Overloaded::Pending)
    }
}

struct PendingGuard<'a>(&'a BreakerState);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(json: &str) -> Breaker {
        Breaker::compile(
            &serde_json::from_str(json).unwrap(),
            Arc::new(BreakerState::default()),
        )
    }

    #[test]
    fn requests_beyond_the_limit_are_refused_and_places_come_back() {
        let b = breaker(r#"{"maxRequests": 2}"#);
        let one = b.admit().unwrap();
        let _two = b.admit().unwrap();
        assert_eq!(b.admit().unwrap_err(), Overloaded::Requests);
        assert_eq!(b.state.requests(), 2, "a refused request holds no place");
        drop(one);
        assert!(b.admit().is_ok());
    }

    #[tokio::test]
    async fn connections_wait_in_a_bounded_line() {
        let b = breaker(r#"{"maxConnections": 1, "maxPendingRequests": 1}"#);
        let first = b.connection().await.unwrap().unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.connection().await.map(|p| p.is_some()) })
        };
        while b.state.pending() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.connection().await.unwrap_err(), Overloaded::Pending);
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(true));
        assert_eq!(b.state.pending(), 0);
    }

    #[test]
    fn endpoints_have_room_below_their_limit() {
        let b = breaker(r#"{"maxRequestsPerEndpoint": 3}"#);
        assert!(b.endpoint_has_room(2));
        assert!(!b.endpoint_has_room(3));
        assert!(breaker("{}").endpoint_has_room(usize::MAX - 1));
    }
}
