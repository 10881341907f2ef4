//! The mirror stage: keeps the request body whole when a retry or the mirror needs it again
//! (bodies up to the retry's `maxBodyBytes`; a larger one is sent once, as it streams), and
//! copies the request to the mirror backend in the background.
//!
//! It decides once per request what the retry stage may do: retries apply to requests of the
//! methods they list (never to upgrades) whose body was kept ([`Outbound::retryable`]).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, Either};
use http::header::CONTENT_LENGTH;
use http::{Request, Version};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::endpoint::send;
use super::timeout::Deadline;
use super::{Answer, Failure, Kept, Outbound, Sendable, Target};
use crate::config::Protocol;
use crate::http::Reason;
use crate::http::body::{Keep, RequestBody};
use crate::resilience::roll;
use crate::state::Shared;
use crate::table::{DestinationTable, Lookup};

/// Copies of requests in flight to mirrors, process-wide: a slow or stalled mirror costs at
/// most this many tasks and bodies; beyond it, requests are not copied.
const MAX_MIRRORS_IN_FLIGHT: usize = 256;
static MIRRORS: Semaphore = Semaphore::const_new(MAX_MIRRORS_IN_FLIGHT);

/// The largest body copied to a mirror when no retry policy says otherwise.
const DEFAULT_MIRROR_BODY_BYTES: usize = 64 * 1024;

/// The longest a mirror copy may take (its slot is freed then).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Adds the mirror stage.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct MirrorLayer;

impl<S> Layer<S> for MirrorLayer {
    type Service = MirrorService<S>;

    fn layer(&self, inner: S) -> MirrorService<S> {
        MirrorService { inner }
    }
}

/// Keeps bodies for retries and the mirror, and feeds the mirror.
#[derive(Debug, Clone, Copy)]
pub(super) struct MirrorService<S> {
    inner: S,
}

impl<S> Service<Outbound> for MirrorService<S>
where
    S: Service<Outbound, Response = Answer, Error = Failure> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Answer;
    type Error = Failure;
    /// Handed on at once when neither retries nor the mirror apply; else the body is read
    /// first (an `async fn` of the body, hence the box).
    type Future = Either<S::Future, BoxFuture<'static, Result<Answer, Failure>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Outbound) -> Self::Future {
        let policy = req.policy();
        let retry = policy
            .retry
            .as_ref()
            .filter(|r| !req.upgrading && r.retries_method(req.req.method()));
        let mirror = policy
            .mirror
            .as_ref()
            .filter(|m| !req.upgrading && roll(m.per_million))
            .map(|m| m.backend);
        if retry.is_none() && mirror.is_none() {
            return Either::Left(self.inner.call(req));
        }
        let retries = retry.is_some();
        let limit = retry.map_or(DEFAULT_MIRROR_BODY_BYTES, |r| r.max_body_bytes);
        // The service made ready goes with the request; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(keep_then_send(inner, req, retries, mirror, limit)))
    }
}

/// Keep the body (up to `limit`), copy to the `mirror` backend, then send.
async fn keep_then_send<S>(
    mut inner: S,
    mut req: Outbound,
    retries: bool,
    mirror: Option<usize>,
    limit: usize,
) -> Result<Answer, Failure>
where
    S: Service<Outbound, Response = Answer, Error = Failure>,
{
    let request = match req.req {
        Sendable::Once(r) => r,
        kept @ Sendable::Kept(_) => {
            req.req = kept;
            return inner.call(req).await;
        }
    };
    let (parts, body) = request.into_parts();
    let content_length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    match body.keep(content_length, limit).await {
        Keep::Kept(body) => {
            let kept = Arc::new(Kept { parts, body });
            if let Some(backend) = mirror {
                copy_to_mirror(&req.shared, &req.dest, backend, &kept);
            }
            req.req = Sendable::Kept(kept);
            req.retryable = retries;
        }
        // Sent once, as it streams: too large to send twice.
        Keep::TooLarge(body) => req.req = Sendable::Once(Request::from_parts(parts, body)),
        Keep::Failed => return Err(Failure::before_sending(Reason::BadRequest, None)),
    }
    inner.call(req).await
}

/// Send a copy to the mirror backend in the background: its answer is dropped, its failure
/// only logged, and nothing waits for it.
fn copy_to_mirror(shared: &Arc<Shared>, dest: &DestinationTable, backend: usize, kept: &Kept) {
    let Ok(slot) = MIRRORS.try_acquire() else {
        tracing::debug!(destination = %dest.key, "mirror skipped: {MAX_MIRRORS_IN_FLIGHT} copies in flight");
        return;
    };
    slot.forget();
    let shared = Arc::clone(shared);
    let key = dest.key.clone();
    let name = dest.backends[backend].name.clone();
    let mut parts = kept.parts.clone();
    // The copy is not the original: no access-log record of its own.
    parts.extensions = http::Extensions::new();
    let body = kept.body.clone();
    tokio::spawn(async move {
        let _slot = MirrorSlot;
        // The table in force now, which a controller update may have changed since the request
        // was routed: the mirror backend is found again by name (its index is the old table's),
        // and a copy whose mirror was removed meanwhile is dropped.
        let Some(dest) = lookup_key(&shared, &key) else {
            return;
        };
        let Some(backend) = dest.backend_named(&name) else {
            tracing::debug!(destination = %key, backend = %name.as_str(), "mirror copy dropped: the mirror backend is gone");
            return;
        };
        let client_http2 = parts.version == Version::HTTP_2 && dest.protocol != Protocol::Tcp;
        let req = Request::from_parts(parts, RequestBody::kept(&body));
        let copy = send(
            &shared,
            dest,
            req,
            Target::Backend(backend),
            None,
            client_http2,
        );
        match Deadline::new(copy, Some(MIRROR_TIMEOUT), |_| Failure::timeout()).await {
            Ok(answer) => {
                // Read the answer to its end so the connection goes back to the pool.
                let _ = http_body_util::BodyExt::collect(answer.resp.into_body()).await;
            }
            Err(f) => {
                tracing::debug!(destination = %key, reason = f.reason.as_str(), "mirror copy failed")
            }
        }
    });
}

struct MirrorSlot;

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        MIRRORS.add_permits(1);
    }
}

fn lookup_key(shared: &Shared, key: &str) -> Option<Arc<DestinationTable>> {
    match shared.routes.table.load().lookup(key) {
        Lookup::Found(d) => Some(d),
        _ => None,
    }
}
