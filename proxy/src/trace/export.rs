//! Span export: a bounded queue that requests push finished spans into without ever waiting,
//! and one task that batches them and sends them with `opentelemetry-otlp`'s OTLP/gRPC
//! exporter (tonic). A full queue drops the span and counts it
//! (`trellis_trace_spans_dropped_total{reason="queue_full"}`); a batch the collector refused or
//! did not take in time is counted as `reason="export_failed"`.
//!
//! The SDK's `BatchSpanProcessor` is not used: it drops silently (an internal log line), and the
//! drop count is what an operator needs to see on `/metrics`.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

/// Why spans were not exported.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full` or `export_failed`.
    pub reason: &'static str,
}

/// Export counters.
#[derive(Debug, Clone)]
pub struct ExportMetrics {
    dropped: Family<DropLabels, Counter>,
    exported: Counter,
}

impl ExportMetrics {
    /// Register the tracing counters in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ExportMetrics {
            dropped: Family::default(),
            exported: Counter::default(),
        };
        registry.register(
            "trellis_trace_spans_dropped",
            "Spans not exported: the export queue was full, or the collector failed",
            m.dropped.clone(),
        );
        registry.register(
            "trellis_trace_spans_exported",
            "Spans the OTLP collector accepted",
            m.exported.clone(),
        );
        m
    }

    fn drop_spans(&self, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&DropLabels { reason }).inc_by(n);
    }
}

/// The sending side of the queue.
#[derive(Debug)]
pub struct Queue {
    tx: mpsc::Sender<SpanData>,
    metrics: ExportMetrics,
}

impl Queue {
    /// Queue a finished span; never waits: a full queue drops it (counted).
    pub fn push(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.metrics.drop_spans("queue_full", 1);
        }
    }
}

/// Where and how to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The collector's OTLP/gRPC URL, `http://HOST:4317`.
    pub collector: String,
    /// Spans held at most (beyond this they are dropped).
    pub queue: usize,
    /// Spans sent in one request at most.
    pub batch: usize,
    /// How long a span waits for its batch to fill.
    pub delay: Duration,
    /// One export's bound (a slow collector fills the queue, it never blocks requests).
    pub timeout: Duration,
}

/// Build the exporter and start the batching task on the current runtime. Fails on a
/// collector URL the exporter rejects; the connection itself is made lazily, so a collector
/// that is not up yet only costs the spans sent before it is.
pub fn start(
    options: &ExportOptions,
    resource: Vec<KeyValue>,
    metrics: ExportMetrics,
) -> anyhow::Result<Queue> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(options.collector.clone())
        .with_timeout(options.timeout)
        .build()
        .map_err(|e| anyhow::anyhow!("trace collector {:?}: {e}", options.collector))?;
    exporter.set_resource(&Resource::builder_empty().with_attributes(resource).build());
    let (tx, mut rx) = mpsc::channel(options.queue.max(1));
    let (batch, delay) = (options.batch.max(1), options.delay);
    let task_metrics = metrics.clone();
    tokio::spawn(async move {
        let mut spans = Vec::with_capacity(batch);
        // Ends when every sender is gone (the proxy's state dropped).
        while rx.recv_many(&mut spans, batch).await > 0 {
            let deadline = tokio::time::Instant::now() + delay;
            while spans.len() < batch {
                let more = batch - spans.len();
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut spans, more)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let n = spans.len() as u64;
            match exporter.export(std::mem::take(&mut spans)).await {
                Ok(()) => {
                    task_metrics.exported.inc_by(n);
                }
                Err(e) => {
                    task_metrics.drop_spans("export_failed", n);
                    tracing::debug!(error = %e, spans = n, "trace export failed");
                }
            }
        }
    });
    Ok(Queue { tx, metrics })
}
