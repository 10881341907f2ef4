//! Bodies on the request path: the downstream request body on its way upstream (streamed, or
//! kept so a retry or a mirror can send it again), and the response body on its way back
//! (the upstream's, streamed, or the proxy's own), each optionally cut when idle.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::balance::InFlight;

/// The error a body yields: hyper's, or the proxy's own (an idle timeout).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A body that stayed silent for its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no bytes for {0:?} (the policy's idle timeout): stream cut")]
pub struct IdleTimeout(pub Duration);

/// A timer reset by every frame; fires when nothing moved for `after`.
#[derive(Debug)]
pub struct Idle {
    after: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl Idle {
    /// A timer starting now.
    pub fn new(after: Duration) -> Self {
        Idle {
            after,
            sleep: Box::pin(tokio::time::sleep(after)),
        }
    }

    /// Around one poll of the wrapped body: a frame resets the timer, a pending body checks it.
    fn watch<T, E: Into<BodyError>>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<Option<Result<T, E>>>,
    ) -> Poll<Option<Result<T, BodyError>>> {
        match polled {
            Poll::Ready(r) => {
                let deadline = tokio::time::Instant::now() + self.after;
                self.sleep.as_mut().reset(deadline);
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(IdleTimeout(self.after).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// What a request body is made of.
#[derive(Debug)]
enum Source {
    /// Streamed from the client, frame by frame.
    Stream(Incoming),
    /// Kept whole (for retries and mirrors): data, then trailers.
    Kept {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// Too large to keep: what was read while trying, then the rest of the stream.
    Prefix {
        prefix: Option<Bytes>,
        rest: Incoming,
    },
}

/// The downstream request body on its way upstream. It remembers whether reading it failed, so
/// a failed exchange is blamed on the right side: a body the client framed wrongly (or abandoned)
/// is the client's fault (400), not the upstream's (502).
#[derive(Debug)]
pub struct RequestBody {
    source: Source,
    failed: Arc<AtomicBool>,
    /// Request bytes counted for the access log / tap (observed requests only).
    tally: Option<Arc<crate::observe::Tally>>,
    idle: Option<Idle>,
}

/// A whole request body, kept to be sent more than once.
#[derive(Debug, Clone)]
pub struct KeptBody {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

/// The outcome of trying to keep a request body.
#[derive(Debug)]
pub enum Keep {
    /// Kept whole.
    Kept(KeptBody),
    /// Larger than the bound: stream it (once), starting with what was read.
    TooLarge(RequestBody),
    /// The client's body was malformed or cut short.
    Failed,
}

impl RequestBody {
    /// A streamed body; the flag is raised if reading it fails.
    pub fn new(inner: Incoming, tally: Option<Arc<crate::observe::Tally>>) -> Self {
        RequestBody {
            source: Source::Stream(inner),
            failed: Arc::new(AtomicBool::new(false)),
            tally,
            idle: None,
        }
    }

    /// A body sent (again) from what was kept; its bytes were counted when they were read.
    pub fn kept(kept: &KeptBody) -> Self {
        RequestBody {
            source: Source::Kept {
                data: (!kept.data.is_empty()).then(|| kept.data.clone()),
                trailers: kept.trailers.clone(),
            },
            failed: Arc::new(AtomicBool::new(false)),
            tally: None,
            idle: None,
        }
    }

    /// No body at all (the proxy's own requests: health-check probes).
    pub fn empty() -> Self {
        RequestBody {
            source: Source::Kept {
                data: None,
                trailers: None,
            },
            failed: Arc::new(AtomicBool::new(false)),
            tally: None,
            idle: None,
        }
    }

    /// Raised when reading the client's body failed.
    pub fn failed_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.failed)
    }

    /// Cut the body when the client sends nothing for `after`.
    pub fn with_idle_timeout(mut self, after: Option<Duration>) -> Self {
        if matches!(self.source, Source::Stream(_) | Source::Prefix { .. }) {
            self.idle = after.map(Idle::new);
        }
        self
    }

    /// Read the whole body if it is at most `limit` bytes (a `content-length` above it is not
    /// even read). Bodies already complete (GET and friends) cost nothing.
    pub async fn keep(self, content_length: Option<u64>, limit: usize) -> Keep {
        let Source::Stream(mut inner) = self.source else {
            return Keep::TooLarge(self);
        };
        let tally = self.tally;
        if inner.is_end_stream() {
            return Keep::Kept(KeptBody {
                data: Bytes::new(),
                trailers: None,
            });
        }
        let streamed = |prefix: BytesMut, rest: Incoming, tally| {
            Keep::TooLarge(RequestBody {
                source: Source::Prefix {
                    prefix: (!prefix.is_empty()).then(|| prefix.freeze()),
                    rest,
                },
                failed: Arc::new(AtomicBool::new(false)),
                tally,
                idle: None,
            })
        };
        if content_length.is_some_and(|n| n > limit as u64) {
            return streamed(BytesMut::new(), inner, tally);
        }
        let mut data = BytesMut::new();
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut inner).poll_frame(cx)).await {
                None => {
                    return Keep::Kept(KeptBody {
                        data: data.freeze(),
                        trailers: None,
                    });
                }
                Some(Err(_)) => return Keep::Failed,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        if let Some(t) = &tally {
                            t.received(chunk.len() as u64);
                        }
                        data.extend_from_slice(&chunk);
                        if data.len() > limit {
                            return streamed(data, inner, tally);
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            return Keep::Kept(KeptBody {
                                data: data.freeze(),
                                trailers: Some(trailers),
                            });
                        }
                    }
                },
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.source {
            Source::Stream(inner) => Pin::new(inner).poll_frame(cx),
            Source::Kept { data, trailers } => {
                return Poll::Ready(match data.take() {
                    Some(d) => Some(Ok(Frame::data(d))),
                    None => trailers.take().map(|t| Ok(Frame::trailers(t))),
                });
            }
            Source::Prefix { prefix, rest } => match prefix.take() {
                Some(p) => return Poll::Ready(Some(Ok(Frame::data(p)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        };
        match &polled {
            Poll::Ready(Some(Err(_))) => this.failed.store(true, Ordering::Relaxed),
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(t), Some(d)) = (&this.tally, frame.data_ref()) {
                    t.received(d.len() as u64);
                }
            }
            _ => {}
        }
        match &mut this.idle {
            Some(idle) => idle.watch(cx, polled),
            None => polled.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Stream(inner) => inner.is_end_stream(),
            Source::Kept { data, trailers } => data.is_none() && trailers.is_none(),
            Source::Prefix { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Stream(inner) => inner.size_hint(),
            Source::Kept { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Source::Prefix { prefix, rest } => {
                let mut hint = rest.size_hint();
                let p = prefix.as_ref().map_or(0, |p| p.len() as u64);
                hint.set_lower(hint.lower() + p);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + p);
                }
                hint
            }
        }
    }
}

/// Response body: the upstream's (streamed, holding the endpoint's in-flight mark until it
/// ends) or a short local one.
#[derive(Debug)]
pub enum ProxyBody {
    /// From the upstream.
    Upstream {
        /// The body.
        body: Incoming,
        /// Released when the body is done or dropped.
        in_flight: Option<InFlight>,
        /// Cuts the body when the upstream sends nothing for a while (the policy's `idle`).
        idle: Option<Box<Idle>>,
    },
    /// Produced by the proxy.
    Local(Option<Bytes>),
    /// Either of the above, observed for the access log / tap ([`crate::observe`]).
    Observed(Box<crate::observe::ObservedBody<ProxyBody>>),
}

impl ProxyBody {
    /// The upstream's body, released from `in_flight` at its end.
    pub fn upstream(body: Incoming, in_flight: Option<InFlight>, idle: Option<Duration>) -> Self {
        ProxyBody::Upstream {
            body,
            in_flight,
            idle: idle.map(|d| Box::new(Idle::new(d))),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream {
                body,
                in_flight,
                idle,
            } => {
                let polled = Pin::new(body).poll_frame(cx);
                let polled = match idle {
                    Some(idle) => idle.watch(cx, polled),
                    None => polled.map(|o| o.map(|r| r.map_err(Into::into))),
                };
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                    in_flight.take();
                }
                polled
            }
            ProxyBody::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Observed(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local(data) => data.is_none(),
            ProxyBody::Observed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Observed(body) => body.size_hint(),
        }
    }
}
