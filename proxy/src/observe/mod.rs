//! One record per finished request or opaque TCP connection, for whoever listens: the access log
//! ([`access_log`]) and live taps on the admin port ([`tap`]).
//!
//! The request path only calls in here through a few hooks ([`Observe::begin_http`] and
//! [`HttpPending::finish`] in `http::handle`, [`Tally::choose`] where an endpoint is picked,
//! [`Observe::begin_tcp`] in `tcp` and the transparent passthrough). With no consumer attached
//! each hook is one relaxed atomic load and returns `None`: nothing is allocated, nothing is
//! measured. With a consumer, a record
//! is built (fields truncated to [`MAX_FIELD`]) and handed to each consumer through a bounded
//! channel with `try_send`: a full channel drops the record and counts it, so a slow log or a
//! slow tap client never slows a request.
//!
//! A request's record is emitted when its response body ends (or is dropped), so its duration
//! and byte counts cover the whole exchange, and a gRPC status sent in trailers is seen.

pub mod access_log;
pub mod tap;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::identity::IdentityStore;
use crate::reason::ERROR_HEADER;
use crate::side::Side;

/// Longest text kept in any record field (longer values are cut, on a character boundary).
pub const MAX_FIELD: usize = 256;

/// Which side of the proxy a record comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From the local app to the mesh.
    Outbound,
    /// From the mesh to the local app.
    Inbound,
}

impl Direction {
    /// `inbound` / `outbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// One finished request or TCP connection. No bodies, no header values other than the trace
/// id and the gRPC status (never `authorization` or cookies).
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// When it started (RFC 3339, UTC, milliseconds).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// Trace id from `traceparent` or `x-b3-traceid` / `b3` (empty when absent).
    pub trace_id: String,
    /// `inbound` or `outbound`.
    pub direction: Direction,
    /// `http/1.1`, `h2`, `grpc` or `tcp`.
    pub protocol: &'static str,
    /// Caller's SPIFFE id (inbound: from its certificate; outbound: this proxy's).
    pub source_identity: String,
    /// Caller's workload (`namespace/name`; outbound: this proxy's).
    pub source_workload: String,
    /// Callee's SPIFFE id (outbound: the endpoint's expected one; inbound: this proxy's).
    pub destination_identity: String,
    /// Callee's workload (outbound: the backend's; inbound: this proxy's).
    pub destination_workload: String,
    /// Caller's socket address (inbound; empty outbound, where it is the local app).
    pub peer: String,
    /// Request authority (TCP: the destination).
    pub authority: String,
    /// HTTP method (empty for TCP).
    pub method: String,
    /// Path without the query string (the query may carry secrets).
    pub path: String,
    /// HTTP status (0 for TCP).
    pub status: u16,
    /// `grpc-status` from the trailers or a trailers-only response.
    pub grpc_status: Option<u32>,
    /// From arrival to the end of the response body (TCP: of the connection), ms.
    pub duration_ms: f64,
    /// Bytes of request body received from the caller (TCP: bytes from the client).
    pub bytes_in: u64,
    /// Bytes of response body sent to the caller (TCP: bytes to the client).
    pub bytes_out: u64,
    /// The endpoint chosen (`host:port`), empty if none was.
    pub endpoint: String,
    /// The proxy's error kind (`x-trellis-error` values; TCP: the same kinds), empty on success.
    pub error: String,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// `s` cut to [`MAX_FIELD`] bytes on a character boundary.
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_string();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The trace id a request carries: W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), else B3
/// (`x-b3-traceid`, or the first field of the single `b3` header). Only hex ids of 16 or 32
/// digits are kept.
pub fn trace_id(headers: &HeaderMap) -> String {
    let hex =
        |s: &str| (s.len() == 16 || s.len() == 32) && s.bytes().all(|b| b.is_ascii_hexdigit());
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(tp) = get("traceparent")
        && let Some(id) = tp.trim().split('-').nth(1)
        && id.len() == 32
        && hex(id)
    {
        return id.to_ascii_lowercase();
    }
    if let Some(id) = get("x-b3-traceid").map(str::trim)
        && hex(id)
    {
        return id.to_ascii_lowercase();
    }
    if let Some(id) = get("b3").and_then(|b| b.trim().split('-').next())
        && hex(id)
    {
        return id.to_ascii_lowercase();
    }
    String::new()
}

/// Counters of the consumers.
#[derive(Debug, Clone, Default)]
struct ObserveMetrics {
    lines: Counter,
    dropped: Counter,
    tap_dropped: Counter,
}

/// The hub: knows whether anyone listens, and hands finished records to the consumers.
#[derive(Debug)]
pub struct Observe {
    /// Any consumer attached (the access log, or at least one tap). The only thing the request
    /// path reads when nobody listens.
    on: AtomicBool,
    log: ArcSwapOption<access_log::AccessLog>,
    taps: Mutex<Vec<tap::Subscriber>>,
    tap_count: AtomicUsize,
    metrics: ObserveMetrics,
    /// This proxy's workload, `namespace/name` (empty when unknown).
    workload: String,
    identity: Arc<IdentityStore>,
}

impl Observe {
    /// A hub with no consumer; its counters are registered in `registry`.
    pub fn new(registry: &mut Registry, workload: String, identity: Arc<IdentityStore>) -> Self {
        let metrics = ObserveMetrics::default();
        registry.register(
            "trellis_access_log_lines",
            "Access log lines written",
            metrics.lines.clone(),
        );
        registry.register(
            "trellis_access_log_dropped",
            "Access log records dropped because the writer was behind (never slows a request)",
            metrics.dropped.clone(),
        );
        registry.register(
            "trellis_tap_dropped",
            "Tap records dropped because a tap client was behind",
            metrics.tap_dropped.clone(),
        );
        Observe {
            on: AtomicBool::new(false),
            log: ArcSwapOption::empty(),
            taps: Mutex::new(Vec::new()),
            tap_count: AtomicUsize::new(0),
            metrics,
            workload,
            identity,
        }
    }

    /// Whether any consumer is attached.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    fn refresh(&self) {
        let on = self.log.load().is_some() || self.tap_count.load(Ordering::Relaxed) > 0;
        self.on.store(on, Ordering::Relaxed);
    }

    /// Whether the access log is being written.
    pub fn access_log_on(&self) -> bool {
        self.log.load().is_some()
    }

    /// Start writing the access log to `target` (`stderr`, `stdout` or a file path, appended),
    /// through a channel of `buffer` records (0: [`access_log::DEFAULT_BUFFER`]). Idempotent: a second call while a log is on keeps
    /// the first. The writer is a thread of its own.
    pub fn enable_access_log(&self, target: &str, buffer: usize) -> std::io::Result<()> {
        if self.access_log_on() {
            return Ok(());
        }
        let buffer = if buffer == 0 {
            access_log::DEFAULT_BUFFER
        } else {
            buffer
        };
        let log = access_log::AccessLog::start(target, buffer, self.metrics.lines.clone())?;
        self.log.store(Some(Arc::new(log)));
        self.refresh();
        tracing::info!(target, buffer, "access log on");
        Ok(())
    }

    /// Hand a finished record to every consumer, never waiting.
    pub fn emit(&self, record: Record) {
        let record = Arc::new(record);
        if let Some(log) = &*self.log.load()
            && !log.offer(Arc::clone(&record))
        {
            self.metrics.dropped.inc();
        }
        if self.tap_count.load(Ordering::Relaxed) > 0 {
            let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
            let before = taps.len();
            taps.retain(|t| match t.offer(&record) {
                tap::Offered::Sent | tap::Offered::Filtered => true,
                tap::Offered::Full => {
                    self.metrics.tap_dropped.inc();
                    true
                }
                tap::Offered::Closed => false,
            });
            if taps.len() != before {
                self.tap_count.store(taps.len(), Ordering::Relaxed);
                drop(taps);
                self.refresh();
            }
        }
    }

    /// Attach a tap (at most [`tap::MAX_TAPS`] at once; closed ones are forgotten first).
    pub fn subscribe(
        &self,
        filter: tap::Filter,
        buffer: usize,
    ) -> Result<mpsc::Receiver<Arc<Record>>, tap::TooMany> {
        let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        taps.retain(|t| !t.is_closed());
        if taps.len() >= tap::MAX_TAPS {
            self.tap_count.store(taps.len(), Ordering::Relaxed);
            return Err(tap::TooMany);
        }
        let (subscriber, rx) = tap::Subscriber::new(filter, buffer);
        taps.push(subscriber);
        self.tap_count.store(taps.len(), Ordering::Relaxed);
        drop(taps);
        self.refresh();
        Ok(rx)
    }

    fn own_identity(&self) -> String {
        self.identity
            .latest()
            .map(|g| bounded(&g.credentials.id.to_string()))
            .unwrap_or_default()
    }

    /// Start observing a request (None when nobody listens). Puts a [`Tally`] in the request's
    /// extensions, where the request path reports the endpoint it chose and the body its bytes.
    pub fn begin_http<B>(
        self: &Arc<Self>,
        side: &Side,
        req: &mut Request<B>,
        started: Instant,
    ) -> Option<Box<HttpPending>> {
        if !self.is_on() {
            return None;
        }
        let headers = req.headers();
        let grpc = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        let protocol = if grpc {
            "grpc"
        } else if req.version() == http::Version::HTTP_2 {
            "h2"
        } else {
            "http/1.1"
        };
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let (direction, source_identity, source_workload, destination_identity, dest_workload) =
            match side {
                Side::Outbound { .. } => (
                    Direction::Outbound,
                    self.own_identity(),
                    self.workload.clone(),
                    String::new(),
                    String::new(),
                ),
                Side::Inbound { caller } => (
                    Direction::Inbound,
                    caller.identity.as_deref().map(bounded).unwrap_or_default(),
                    String::new(),
                    self.own_identity(),
                    self.workload.clone(),
                ),
            };
        let peer = match side {
            Side::Inbound { caller } => Some(caller.peer),
            Side::Outbound { .. } => None,
        };
        let tally = Arc::new(Tally::default());
        let record = Record {
            time: SystemTime::now(),
            trace_id: trace_id(headers),
            direction,
            protocol,
            source_identity,
            source_workload,
            destination_identity,
            destination_workload: dest_workload,
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            authority: bounded(authority),
            method: bounded(req.method().as_str()),
            path: bounded(req.uri().path()),
            status: 0,
            grpc_status: None,
            duration_ms: 0.0,
            bytes_in: 0,
            bytes_out: 0,
            endpoint: String::new(),
            error: String::new(),
        };
        req.extensions_mut().insert(Arc::clone(&tally));
        Some(Box::new(HttpPending {
            hub: Arc::clone(self),
            record,
            started,
            tally,
            done: false,
        }))
    }

    /// Start observing an opaque TCP connection to `destination` (None when nobody listens).
    pub fn begin_tcp(
        self: &Arc<Self>,
        direction: Direction,
        destination: &str,
        caller: Option<&crate::authz::Caller>,
    ) -> Option<TcpPending> {
        if !self.is_on() {
            return None;
        }
        let (source_identity, source_workload, destination_identity, destination_workload) =
            match direction {
                Direction::Outbound => (
                    self.own_identity(),
                    self.workload.clone(),
                    String::new(),
                    String::new(),
                ),
                Direction::Inbound => (
                    caller
                        .and_then(|c| c.identity.as_deref())
                        .map(bounded)
                        .unwrap_or_default(),
                    String::new(),
                    self.own_identity(),
                    self.workload.clone(),
                ),
            };
        Some(TcpPending {
            hub: Arc::clone(self),
            record: Record {
                time: SystemTime::now(),
                trace_id: String::new(),
                direction,
                protocol: "tcp",
                source_identity,
                source_workload,
                destination_identity,
                destination_workload,
                peer: caller.map(|c| c.peer.to_string()).unwrap_or_default(),
                authority: bounded(destination),
                method: String::new(),
                path: String::new(),
                status: 0,
                grpc_status: None,
                duration_ms: 0.0,
                bytes_in: 0,
                bytes_out: 0,
                endpoint: String::new(),
                error: String::new(),
            },
            started: Instant::now(),
            tally: Arc::new(Tally::default()),
        })
    }
}

/// What the request path reports about one observed exchange while it runs.
#[derive(Debug, Default)]
pub struct Tally {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    chosen: OnceLock<Chosen>,
}

#[derive(Debug)]
struct Chosen {
    endpoint: String,
    identity: String,
    workload: String,
}

impl Tally {
    /// The endpoint picked (`host:port`), its expected SPIFFE id and its workload
    /// (`namespace/name`; empty to keep what the record has). First call wins.
    pub fn choose(&self, endpoint: &str, identity: Option<&str>, workload: Option<(&str, &str)>) {
        let _ = self.chosen.set(Chosen {
            endpoint: bounded(endpoint),
            identity: identity.map(bounded).unwrap_or_default(),
            workload: match workload {
                Some((ns, name)) if !name.is_empty() => bounded(&format!("{ns}/{name}")),
                _ => String::new(),
            },
        });
    }

    /// The tally of an observed request, if it is observed.
    pub fn of<B>(req: &Request<B>) -> Option<&Arc<Tally>> {
        req.extensions().get::<Arc<Tally>>()
    }

    /// The same, from a request's head.
    pub fn of_parts(parts: &http::request::Parts) -> Option<Arc<Tally>> {
        parts.extensions.get::<Arc<Tally>>().cloned()
    }

    /// Count `n` bytes received from the caller.
    pub fn received(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    fn fill(&self, record: &mut Record) {
        record.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        record.bytes_out = self.bytes_out.load(Ordering::Relaxed);
        if let Some(c) = self.chosen.get() {
            record.endpoint.clone_from(&c.endpoint);
            if !c.identity.is_empty() {
                record.destination_identity.clone_from(&c.identity);
            }
            if !c.workload.is_empty() {
                record.destination_workload.clone_from(&c.workload);
            }
        }
    }
}

/// An observed request in flight.
#[derive(Debug)]
pub struct HttpPending {
    hub: Arc<Observe>,
    record: Record,
    started: Instant,
    tally: Arc<Tally>,
    done: bool,
}

impl HttpPending {
    /// Note the response (status, error kind, trailers-only gRPC status) and wrap its body so
    /// the record is emitted when the body ends.
    pub fn finish<B: Body>(mut self: Box<Self>, resp: Response<B>) -> Response<ObservedBody<B>> {
        self.record.status = resp.status().as_u16();
        self.record.grpc_status = grpc_status(resp.headers());
        if let Some(e) = resp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            self.record.error = bounded(e);
        }
        resp.map(|inner| ObservedBody {
            inner,
            pending: self,
        })
    }

    fn emit(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.record.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.tally.fill(&mut self.record);
        let record = std::mem::replace(&mut self.record, empty_record());
        self.hub.emit(record);
    }
}

impl Drop for HttpPending {
    fn drop(&mut self) {
        if !self.done && self.record.error.is_empty() {
            // Dropped before the response body's end (or before a response at all, status 0):
            // the client went away, or the upstream failed mid-body. The record still says so.
            self.record.error = "cancelled".into();
        }
        self.emit();
    }
}

fn empty_record() -> Record {
    Record {
        time: SystemTime::UNIX_EPOCH,
        trace_id: String::new(),
        direction: Direction::Outbound,
        protocol: "",
        source_identity: String::new(),
        source_workload: String::new(),
        destination_identity: String::new(),
        destination_workload: String::new(),
        peer: String::new(),
        authority: String::new(),
        method: String::new(),
        path: String::new(),
        status: 0,
        grpc_status: None,
        duration_ms: 0.0,
        bytes_in: 0,
        bytes_out: 0,
        endpoint: String::new(),
        error: String::new(),
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A response body that counts its bytes, reads `grpc-status` from the trailers, and emits the
/// record when it ends.
#[derive(Debug)]
pub struct ObservedBody<B: Body> {
    inner: B,
    pending: Box<HttpPending>,
}

impl<B: Body> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        // A body that is empty from the start (a trailers-only gRPC answer, a 204, a HEAD) is
        // never polled: dropped at its end is a normal end, not a cancellation.
        if self.inner.is_end_stream() {
            self.pending.emit();
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ObservedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.pending
                        .tally
                        .bytes_out
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(s) = grpc_status(trailers)
                {
                    this.pending.record.grpc_status = Some(s);
                }
                if this.inner.is_end_stream() {
                    this.pending.emit();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if this.pending.record.error.is_empty() {
                    this.pending.record.error = "upstream-failed".into();
                }
                this.pending.emit();
            }
            Poll::Ready(None) => this.pending.emit(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An observed opaque TCP connection; the record is emitted when this is dropped (the
/// connection's end, whichever way it ended).
#[derive(Debug)]
pub struct TcpPending {
    hub: Arc<Observe>,
    record: Record,
    started: Instant,
    tally: Arc<Tally>,
}

impl TcpPending {
    /// The connection's byte counter (give it to [`Counted`]).
    pub fn tally(&self) -> Arc<Tally> {
        Arc::clone(&self.tally)
    }

    /// The connection failed or was refused with this error kind.
    pub fn error(&mut self, kind: &str) {
        if !kind.is_empty() {
            self.record.error = bounded(kind);
        }
    }
}

impl Drop for TcpPending {
    fn drop(&mut self) {
        self.record.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.tally.fill(&mut self.record);
        let record = std::mem::replace(&mut self.record, empty_record());
        self.hub.emit(record);
    }
}

/// A client stream that counts bytes read from it (`bytes_in`) and written to it
/// (`bytes_out`) when observed; a plain pass-through otherwise.
#[derive(Debug)]
pub struct Counted<IO> {
    inner: IO,
    tally: Option<Arc<Tally>>,
}

impl<IO> Counted<IO> {
    /// Wrap `inner`, counting into `tally` if any.
    pub fn new(inner: IO, tally: Option<Arc<Tally>>) -> Self {
        Counted { inner, tally }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(t) = &this.tally {
            t.received((buf.filled().len() - before) as u64);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let (Some(t), Poll::Ready(Ok(n))) = (&this.tally, &polled) {
            t.bytes_out.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_from_w3c_then_b3() {
        let mut h = HeaderMap::new();
        assert_eq!(trace_id(&h), "");
        h.insert("x-b3-traceid", "463ac35c9f6413ad".parse().unwrap());
        assert_eq!(trace_id(&h), "463ac35c9f6413ad");
        h.insert(
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id(&h), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "not hex at all!!".parse().unwrap());
        assert_eq!(trace_id(&h), "");
        h.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id(&h), "80f198ee56343ba864fe8b2a57d3eff7");
    }

    #[test]
    fn fields_are_bounded_on_char_boundaries() {
        let long = "é".repeat(MAX_FIELD);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_FIELD);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn off_means_no_record() {
        let mut registry = Registry::default();
        let hub = Arc::new(Observe::new(
            &mut registry,
            String::new(),
            Arc::new(IdentityStore::new()),
        ));
        let mut req = Request::new(());
        let side = Side::Outbound {
            fixed: None,
            gateway: None,
        };
        assert!(hub.begin_http(&side, &mut req, Instant::now()).is_none());
        assert!(Tally::of(&req).is_none());
        assert!(hub.begin_tcp(Direction::Outbound, "x:1", None).is_none());
    }
}
