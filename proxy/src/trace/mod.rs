//! Distributed tracing: a span per HTTP request on each proxy, in the caller's trace.
//!
//! * [`propagation`]: W3C `traceparent`/`tracestate` and B3 (single and multi-header) in and out.
//! * [`export`]: the bounded queue and the OTLP/gRPC batch exporter.
//!
//! Off unless a collector is configured (`--trace-collector`): then [`Shared::tracer`] is None,
//! the request path does nothing and trace headers pass through untouched. On, each request
//! gets a [`Hop`]: the incoming context is read ([`Tracer::begin`]); the sampling decision is the
//! caller's when it made one, else a new trace is sampled with the destination's
//! `trace_sampling` or the proxy's default ratio. An outbound hop decides and writes its
//! context upstream once the destination and endpoint are chosen ([`Hop::upstream`]); an
//! inbound hop does so at once, for the application. The hop's span id goes out as the
//! `parent-id`, so the next proxy's span (and the app's) is its child. [`Hop::finish`] ends
//! the span when the response head is ready and queues it.
//!
//! An unsampled request with no incoming context still gets a (not sampled) `traceparent`, so
//! that the proxies after this one keep the decision instead of sampling its children alone.
//!
//! [`Shared::tracer`]: crate::state::Shared::tracer

pub mod export;
pub mod propagation;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Request, Response};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prometheus_client::registry::Registry;

use crate::identity::IdentityStore;
use crate::metrics::Label;
use crate::reason::ERROR_HEADER;
use crate::side::Side;
use crate::table::{BackendTable, DestinationTable, EndpointTable, WorkloadLabels};
use propagation::Parent;

/// How to trace (`--trace-collector`, `--trace-sampling`).
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// Export settings (the collector URL and the queue's bounds).
    pub export: export::ExportOptions,
    /// Share of new traces sampled (0.0 to 1.0) where the destination names none.
    pub sampling: f64,
}

impl TraceOptions {
    /// Defaults for `collector`: 1% sampling, 2048 queued spans, batches of 512 within 1 s.
    pub fn new(collector: impl Into<String>) -> Self {
        TraceOptions {
            export: export::ExportOptions {
                collector: collector.into(),
                queue: 2048,
                batch: 512,
                delay: Duration::from_secs(1),
                timeout: Duration::from_secs(5),
            },
            sampling: 0.01,
        }
    }
}

/// The proxy's tracer: sampling default, its own workload, the export queue.
#[derive(Debug)]
pub struct Tracer {
    sampling: f64,
    workload: Option<WorkloadLabels>,
    identity: Arc<IdentityStore>,
    queue: export::Queue,
    scope: InstrumentationScope,
}

impl Tracer {
    /// Start exporting (on the current tokio runtime) and register the tracing counters.
    pub fn start(
        options: &TraceOptions,
        registry: &mut Registry,
        workload: Option<&crate::config::Workload>,
        identity: Arc<IdentityStore>,
    ) -> anyhow::Result<Arc<Tracer>> {
        if !(0.0..=1.0).contains(&options.sampling) {
            anyhow::bail!(
                "trace sampling {} must be between 0.0 and 1.0",
                options.sampling
            );
        }
        let mut resource = vec![KeyValue::new(
            "service.name",
            workload.map_or("trellis-proxy".to_string(), |w| w.name.clone()),
        )];
        if let Some(w) = workload {
            resource.push(KeyValue::new("service.namespace", w.namespace.clone()));
            resource.push(KeyValue::new("trellis.workload.kind", w.kind.clone()));
        }
        let metrics = export::ExportMetrics::register(registry);
        let queue = export::start(&options.export, resource, metrics)?;
        Ok(Arc::new(Tracer {
            sampling: options.sampling,
            workload: workload.map(WorkloadLabels::from),
            identity,
            queue,
            scope: InstrumentationScope::builder("trellis-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }))
    }

    fn own_identity(&self) -> Option<String> {
        self.identity
            .current()
            .map(|g| g.credentials.id.to_string())
    }

    /// Read the incoming context of `req` and open this proxy's hop. Inbound, the decision is
    /// made and the context written for the application now. Cheap for a request that ends
    /// up unsampled: the request head is kept by reference counts, attributes are built only
    /// for a span that is recorded.
    pub fn begin<B>(self: &Arc<Self>, side: &Arc<Side>, req: &mut Request<B>) -> Hop {
        let mut hop = Hop {
            tracer: Arc::clone(self),
            parent: propagation::extract(req.headers()),
            side: Arc::clone(side),
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req.headers().get(http::header::HOST).cloned(),
            start: SystemTime::now(),
            attributes: Vec::new(),
            route: None,
            span: None,
            decided: false,
        };
        if let Side::Inbound { .. } = **side {
            hop.decide(None, Some(req.headers_mut()));
        }
        hop
    }
}

fn workload(w: &WorkloadLabels) -> String {
    format!(
        "{}/{}/{}",
        w.namespace.as_str(),
        w.kind.as_str(),
        w.name.as_str()
    )
}

/// One request on this proxy: its trace context and, when sampled, its span being recorded.
#[derive(Debug)]
pub struct Hop {
    tracer: Arc<Tracer>,
    parent: Option<Parent>,
    side: Arc<Side>,
    method: http::Method,
    uri: http::Uri,
    host: Option<http::HeaderValue>,
    start: SystemTime,
    /// What only the outbound side learns on the way ([`Hop::upstream`]).
    attributes: Vec<KeyValue>,
    route: Option<String>,
    /// This hop's span context, when sampled.
    span: Option<SpanContext>,
    decided: bool,
}

impl Hop {
    fn attr(&mut self, key: &'static str, value: impl Into<Value>) {
        self.attributes.push(KeyValue::new(key, value));
    }

    /// Make the sampling decision (the caller's, else `ratio` or the proxy's default) and,
    /// with `headers`, write this hop's context into them.
    fn decide(&mut self, ratio: Option<f64>, headers: Option<&mut HeaderMap>) {
        if self.decided {
            return;
        }
        self.decided = true;
        let ratio = ratio.unwrap_or(self.tracer.sampling);
        let sampled = match self.parent.as_ref().and_then(|p| p.sampled) {
            Some(s) => s,
            None => ratio >= 1.0 || (ratio > 0.0 && fastrand::f64() < ratio),
        };
        let (trace_id, state) = match &self.parent {
            Some(p) => (p.context.trace_id(), p.context.trace_state().clone()),
            None => (new_trace_id(), TraceState::default()),
        };
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let context = SpanContext::new(trace_id, new_span_id(), flags, false, state);
        if let Some(headers) = headers {
            match &self.parent {
                Some(p) if sampled => {
                    propagation::inject(headers, &context, Some(p.context.span_id()), p.formats)
                }
                // Not ours to record: the caller's headers go on untouched.
                Some(_) => {}
                None => propagation::inject(headers, &context, None, Default::default()),
            }
        }
        if sampled {
            self.span = Some(context);
        }
    }

    /// The request is about to leave for `dest`: decide sampling (the destination's
    /// `trace_sampling`) and write the context into the request's headers. Once per request,
    /// before any try (every try carries the same context).
    pub fn propagate(&mut self, dest: &DestinationTable, headers: &mut HeaderMap) {
        self.decide(dest.trace_sampling, Some(headers));
    }

    /// The upstream that answered (the last try's): backend, endpoint, identity and route.
    pub fn upstream(
        &mut self,
        dest: &DestinationTable,
        backend: &BackendTable,
        endpoint: &EndpointTable,
        route: &Label,
    ) {
        if self.span.is_none() {
            return;
        }
        self.attr("trellis.destination", dest.key.clone());
        self.attr("trellis.backend", backend.name.as_str().to_string());
        self.attr("trellis.destination.workload", workload(&backend.workload));
        self.attr("trellis.endpoint", endpoint.authority.as_str().to_string());
        if let Some(id) = &endpoint.identity {
            self.attr("trellis.destination.identity", id.to_string());
        }
        if !route.as_str().is_empty() {
            self.route = Some(route.as_str().to_string());
        }
    }

    /// The response head is ready: end the span and queue it for export.
    pub fn finish<B>(mut self, resp: &Response<B>) {
        // A request refused before an upstream was chosen (unknown destination...).
        self.decide(None, None);
        let Some(context) = self.span.take() else {
            return;
        };
        let authority = match (self.uri.authority(), &self.host) {
            (Some(a), _) => a.as_str().to_string(),
            (None, Some(h)) => String::from_utf8_lossy(h.as_bytes()).into_owned(),
            (None, None) => String::new(),
        };
        let own_identity = self.tracer.own_identity();
        let own_workload = self.tracer.workload.as_ref().map(workload);
        let (kind, direction) = match &*self.side {
            Side::Outbound { .. } => (SpanKind::Client, "outbound"),
            Side::Inbound { .. } => (SpanKind::Server, "inbound"),
        };
        self.attr("trellis.direction", direction);
        self.attr("http.request.method", self.method.as_str().to_string());
        // The path only: a query string may carry credentials.
        self.attr("url.path", self.uri.path().to_string());
        self.attr("server.address", authority);
        let side = Arc::clone(&self.side);
        match &*side {
            Side::Outbound { .. } => {
                if let Some(id) = own_identity {
                    self.attr("trellis.source.identity", id);
                }
                if let Some(w) = own_workload {
                    self.attr("trellis.source.workload", w);
                }
            }
            Side::Inbound { caller } => {
                if let Some(id) = caller.identity.as_deref().map(str::to_owned) {
                    self.attr("trellis.source.identity", id);
                }
                self.attr("client.address", caller.peer.ip().to_string());
                if let Some(id) = own_identity {
                    self.attr("trellis.destination.identity", id);
                }
                if let Some(w) = own_workload {
                    self.attr("trellis.destination.workload", w);
                }
            }
        }
        let name = match self.route.take() {
            Some(route) => {
                self.attr("http.route", route.clone());
                format!("{direction} {} {route}", self.method)
            }
            None => format!("{direction} {}", self.method),
        };
        let status = resp.status();
        self.attr("http.response.status_code", i64::from(status.as_u16()));
        let grpc = grpc_status(resp.headers());
        if let Some(code) = grpc {
            self.attr("rpc.grpc.status_code", code);
        }
        let error = resp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let failed = status.is_server_error() || error.is_some();
        if let Some(e) = &error {
            self.attr("error.type", e.clone());
        } else if status.is_server_error() {
            self.attr("error.type", status.as_u16().to_string());
        }
        let status = if failed {
            Status::error(error.unwrap_or_else(|| format!("HTTP {}", status.as_u16())))
        } else {
            Status::Unset
        };
        let (parent_span_id, parent_span_is_remote) = match &self.parent {
            Some(p) => (p.context.span_id(), true),
            None => (SpanId::INVALID, false),
        };
        self.tracer.queue.push(SpanData {
            span_context: context,
            parent_span_id,
            parent_span_is_remote,
            span_kind: kind,
            name: Cow::Owned(name),
            start_time: self.start,
            end_time: SystemTime::now(),
            attributes: self.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.tracer.scope.clone(),
        });
    }
}

/// `grpc-status` of a trailers-only response (a streamed one carries it in the trailers,
/// after the span ended).
fn grpc_status(headers: &HeaderMap) -> Option<i64> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn new_trace_id() -> TraceId {
    TraceId::from_bytes(fastrand::u128(1..).to_be_bytes())
}

fn new_span_id() -> SpanId {
    SpanId::from_bytes(fastrand::u64(1..).to_be_bytes())
}
