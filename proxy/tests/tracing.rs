//! Distributed tracing through two real proxies under mTLS (client proxy A -> server proxy B ->
//! app), exported over OTLP/gRPC to a collector this test starts on 127.0.0.1: the official
//! OTLP protobufs' generated tonic `TraceService` server (`opentelemetry-proto`), keeping every
//! span it receives. Checks a client span and its child server span with the identities,
//! workloads, endpoint and status; an incoming W3C context and B3 (multi and single) continued;
//! an unsampled incoming trace not exported and its headers untouched; a 500 and a mesh error
//! marking spans as errors; a proxy without a collector leaving headers alone; and a full export
//! queue dropping (and counting) spans while requests go on.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::certs::{identity_yaml, new_ca, valid_leaf};
use common::{Body, H1, full};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use tokio::net::TcpListener;
use trellis_proxy::config::Config;
use trellis_proxy::trace::TraceOptions;
use trellis_proxy::{ProxyOptions, RunningProxy};

const A_ID: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B_ID: &str = "spiffe://cluster.local/ns/shop/sa/b";

// ---------------------------------------------------------------- the OTLP collector

/// A received span, flattened: hex ids, the exporting service, string/int attributes.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i32,
    status: i32,
    status_message: String,
    attributes: HashMap<String, String>,
}

impl Got {
    fn attr(&self, key: &str) -> &str {
        self.attributes
            .get(key)
            .unwrap_or_else(|| panic!("span {} has no {key}: {self:#?}", self.name))
    }
}

#[derive(Debug, Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| value(kv.value.as_ref()))
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                let status = s.status.clone().unwrap_or_default();
                spans.push(Got {
                    service: service.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name.clone(),
                    kind: s.kind,
                    status: status.code,
                    status_message: status.message,
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> (Collector, String) {
        let collector = Collector::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let svc = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (collector, url)
    }

    /// The spans of `trace_id` once there are `n` (or a panic after 10 s).
    async fn trace(&self, trace_id: &str, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: Vec<Got> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            if got.len() >= n {
                assert_eq!(got.len(), n, "exactly {n} spans: {got:#?}");
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{n} spans of trace {trace_id} not exported in 10 s; have {:#?}",
                self.spans.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn all(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

/// The client span and the server span of a two-proxy trace.
fn split(spans: Vec<Got>) -> (Got, Got) {
    let client = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .cloned()
        .expect("a client span");
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .cloned()
        .expect("a server span");
    (client, server)
}

// ---------------------------------------------------------------- the app

/// An app that answers 500 on `/fail`, 200 otherwise, and echoes the trace headers it got as
/// `x-seen-<header>`.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(answer);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

async fn answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut resp = Response::new(full("app"));
    if req.uri().path() == "/fail" {
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    }
    for h in TRACE_HEADERS {
        if let Some(v) = req.headers().get(h) {
            resp.headers_mut().insert(
                format!("x-seen-{h}").parse::<http::HeaderName>().unwrap(),
                v.clone(),
            );
        }
    }
    Ok(resp)
}

/// GET through `proxy` with extra headers; returns the status and the trace headers the app
/// saw (without the `x-seen-` prefix).
async fn get(
    proxy: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HashMap<String, String>) {
    let mut req = Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = H1::connect(proxy)
        .await
        .send(req.body(full("")).unwrap())
        .await;
    let seen = resp
        .headers()
        .iter()
        .filter_map(|(k, v)| {
            k.as_str()
                .strip_prefix("x-seen-")
                .map(|h| (h.to_string(), v.to_str().unwrap().to_string()))
        })
        .collect();
    let status = resp.status();
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    (status, seen)
}

// ---------------------------------------------------------------- the mesh

fn traced(collector: &str) -> TraceOptions {
    let mut t = TraceOptions::new(collector);
    t.sampling = 1.0;
    t.export.delay = Duration::from_millis(50);
    t
}

async fn start(yaml: &str, trace: Option<TraceOptions>) -> RunningProxy {
    let config = Config::parse(yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let mut options = ProxyOptions::new(config);
    options.trace = trace;
    trellis_proxy::start(options).await.unwrap()
}

struct Mesh {
    _dir: tempfile::TempDir,
    a: RunningProxy,
    b: RunningProxy,
}

/// A (workload shop/deployment/a-v1) -> B (shop/deployment/b-v1, allows only A) -> app, both
/// exporting to `collector` with `sampling`; destination `b.shop` samples with
/// `dest_sampling` when given.
async fn mesh(collector: &str, sampling: f64, dest_sampling: Option<f64>) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let app = app().await;
    let mut trace = traced(collector);
    trace.sampling = sampling;
    let b = start(
        &format!(
            "admin: 127.0.0.1:0\nworkload: {{kind: deployment, name: b-v1, namespace: shop}}\ninbound:\n  listen: 127.0.0.1:0\n  app: \"{app}\"\n  policy:\n    authorizations:\n      - identities: [\"{A_ID}\"]\n{}",
            identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca])
        ),
        Some(trace.clone()),
    )
    .await;
    let dest_sampling =
        dest_sampling.map_or(String::new(), |r| format!("    trace_sampling: {r}\n"));
    let a = start(
        &format!(
            "admin: 127.0.0.1:0\nworkload: {{kind: deployment, name: a-v1, namespace: shop}}\noutbound:\n  http: 127.0.0.1:0\ndestinations:\n  - authority: b.shop\n{dest_sampling}    backends:\n      - name: b\n        workload: {{kind: deployment, name: b-v1, namespace: shop}}\n        endpoints: [{{address: \"{}\", identity: \"{B_ID}\"}}]\n{}",
            b.inbound.unwrap(),
            identity_yaml(dir.path(), "a", &valid_leaf(&ca, A_ID), &[&ca])
        ),
        Some(trace),
    )
    .await;
    Mesh { _dir: dir, a, b }
}

/// (trace id, span id, flags) of a `traceparent`.
fn traceparent(v: &str) -> (String, String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "traceparent {v}");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn a_request_through_two_proxies_gives_a_client_span_and_its_child_server_span() {
    let (collector, url) = Collector::start().await;
    let m = mesh(&url, 1.0, None).await;
    let (status, seen) = get(m.a.http.unwrap(), "b.shop", "/items/7?token=secret", &[]).await;
    assert_eq!(status, StatusCode::OK);
    // The app is the server span's child, in a trace A started.
    let (trace_id, app_parent, flags) = traceparent(&seen["traceparent"]);
    assert_eq!(flags, "01");
    let (client, server) = split(collector.trace(&trace_id, 2).await);

    assert_eq!(
        client.parent_span_id, "",
        "A started the trace: {client:#?}"
    );
    assert_eq!(
        server.parent_span_id, client.span_id,
        "B's span is A's child"
    );
    assert_eq!(app_parent, server.span_id, "the app's parent is B's span");
    assert_eq!(
        (client.service.as_str(), server.service.as_str()),
        ("a-v1", "b-v1")
    );
    for s in [&client, &server] {
        assert_eq!(s.attr("trellis.source.identity"), A_ID);
        assert_eq!(s.attr("trellis.destination.identity"), B_ID);
        assert_eq!(s.attr("http.request.method"), "GET");
        assert_eq!(s.attr("url.path"), "/items/7", "no query string");
        assert_eq!(s.attr("http.response.status_code"), "200");
        assert_eq!(s.status, SpanStatus::Unset as i32);
        assert!(!s.attributes.contains_key("error.type"));
    }
    assert_eq!(client.attr("trellis.direction"), "outbound");
    assert_eq!(server.attr("trellis.direction"), "inbound");
    assert_eq!(
        client.attr("trellis.source.workload"),
        "shop/deployment/a-v1"
    );
    assert_eq!(
        client.attr("trellis.destination.workload"),
        "shop/deployment/b-v1"
    );
    assert_eq!(
        server.attr("trellis.destination.workload"),
        "shop/deployment/b-v1"
    );
    assert_eq!(client.attr("trellis.destination"), "b.shop");
    assert_eq!(client.attr("server.address"), "b.shop");
    assert_eq!(
        client.attr("trellis.endpoint"),
        m.b.inbound.unwrap().to_string()
    );
    assert_eq!(client.attr("trellis.backend"), "b");

    let metrics = H1::connect(m.a.admin.unwrap())
        .await
        .get("admin", "/metrics")
        .await
        .2;
    assert!(
        metrics.contains("trellis_trace_spans_exported_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_incoming_w3c_trace_is_continued_and_an_unsampled_one_passes_untouched() {
    let (collector, url) = Collector::start().await;
    let m = mesh(&url, 1.0, None).await;
    // Unsampled first: had it been exported, it would be in the same or an earlier batch.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let (status, seen) = get(
        m.a.http.unwrap(),
        "b.shop",
        "/",
        &[("traceparent", unsampled), ("tracestate", "v=1")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        seen["traceparent"], unsampled,
        "not recorded: headers untouched"
    );
    assert_eq!(seen["tracestate"], "v=1");

    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, seen) = get(
        m.a.http.unwrap(),
        "b.shop",
        "/",
        &[
            ("traceparent", incoming),
            ("tracestate", "vendor=x,other=y"),
        ],
    )
    .await;
    let (client, server) = split(collector.trace("4bf92f3577b34da6a3ce929d0e0e4736", 2).await);
    assert_eq!(
        client.parent_span_id, "00f067aa0ba902b7",
        "the caller's span"
    );
    assert_eq!(server.parent_span_id, client.span_id);
    let (trace_id, parent, _) = traceparent(&seen["traceparent"]);
    assert_eq!(
        (trace_id.as_str(), parent.as_str()),
        ("4bf92f3577b34da6a3ce929d0e0e4736", server.span_id.as_str())
    );
    assert_eq!(seen["tracestate"], "vendor=x,other=y", "tracestate goes on");
    assert!(
        collector
            .all()
            .iter()
            .all(|s| s.trace_id != "11111111111111111111111111111111"),
        "the unsampled trace was exported: {:#?}",
        collector.all()
    );
}

#[tokio::test]
async fn b3_multi_and_single_headers_are_continued_in_b3() {
    let (collector, url) = Collector::start().await;
    let m = mesh(&url, 0.0, None).await;
    // Multi-header, 64-bit trace id, sampled: the caller's decision wins over sampling 0.
    let (_, seen) = get(
        m.a.http.unwrap(),
        "b.shop",
        "/",
        &[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let trace = "0000000000000000a3ce929d0e0e4736";
    let (client, server) = split(collector.trace(trace, 2).await);
    assert_eq!(client.parent_span_id, "00f067aa0ba902b7");
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(seen["x-b3-traceid"], trace);
    assert_eq!(seen["x-b3-spanid"], server.span_id);
    assert_eq!(seen["x-b3-parentspanid"], client.span_id);
    assert_eq!(seen["x-b3-sampled"], "1");

    // Single header.
    let (_, seen) = get(
        m.a.http.unwrap(),
        "b.shop",
        "/",
        &[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")],
    )
    .await;
    let (client, server) = split(collector.trace("80f198ee56343ba864fe8b2a57d3eff7", 2).await);
    assert_eq!(client.parent_span_id, "e457b5a2e4d86bd1");
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(
        seen["b3"],
        format!(
            "80f198ee56343ba864fe8b2a57d3eff7-{}-1-{}",
            server.span_id, client.span_id
        )
    );

    // Sampling 0 and no incoming trace: nothing exported, but the app still gets an unsampled
    // traceparent, the decision every later hop keeps.
    let (_, seen) = get(m.a.http.unwrap(), "b.shop", "/", &[]).await;
    let (trace_id, _, flags) = traceparent(&seen["traceparent"]);
    assert_eq!(flags, "00");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.all().iter().all(|s| s.trace_id != trace_id));
}

#[tokio::test]
async fn a_500_and_a_mesh_error_mark_spans_as_errors() {
    let (collector, url) = Collector::start().await;
    // The proxy default is 0, the destination's own ratio samples everything.
    let m = mesh(&url, 0.0, Some(1.0)).await;
    let (status, seen) = get(m.a.http.unwrap(), "b.shop", "/fail", &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let (trace_id, _, _) = traceparent(&seen["traceparent"]);
    let (client, server) = split(collector.trace(&trace_id, 2).await);
    for s in [&client, &server] {
        assert_eq!(s.status, SpanStatus::Error as i32, "{s:#?}");
        assert_eq!(s.attr("http.response.status_code"), "500");
        assert_eq!(s.attr("error.type"), "500");
    }

    // A mesh error: an unknown destination, answered by A itself (sampled at A's default: 0,
    // so trace it from the caller).
    let (status, _) = get(
        m.a.http.unwrap(),
        "nowhere.shop",
        "/",
        &[(
            "traceparent",
            "00-99999999999999999999999999999999-1111111111111111-01",
        )],
    )
    .await;
    assert_eq!(status.as_u16(), 502, "unknown destination");
    let spans = collector.trace("99999999999999999999999999999999", 1).await;
    assert_eq!(spans[0].kind, SpanKind::Client as i32);
    assert_eq!(spans[0].status, SpanStatus::Error as i32);
    assert_eq!(spans[0].attr("error.type"), "unknown-destination");
    assert_eq!(spans[0].status_message, "unknown-destination");
}

#[tokio::test]
async fn without_a_collector_trace_headers_pass_untouched() {
    let app = app().await;
    let proxy = start(
        &format!(
            "outbound:\n  http: 127.0.0.1:0\ndestinations:\n{}",
            common::destination("app.shop", &[("app", 1, &[app])])
        ),
        None,
    )
    .await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, seen) = get(
        proxy.http.unwrap(),
        "app.shop",
        "/",
        &[("traceparent", incoming)],
    )
    .await;
    assert_eq!(seen.get("traceparent").map(String::as_str), Some(incoming));
    let (_, seen) = get(proxy.http.unwrap(), "app.shop", "/", &[]).await;
    assert!(seen.is_empty(), "no trace started: {seen:?}");
}

#[tokio::test]
async fn a_full_export_queue_drops_and_counts_spans_and_requests_go_on() {
    // A "collector" that accepts connections and never answers: the one export in flight
    // waits for its timeout, the queue (1 span) fills, later spans are dropped.
    let black_hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", black_hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = black_hole.accept().await {
            held.push(s);
        }
    });
    let app = app().await;
    let mut trace = traced(&url);
    trace.export.queue = 1;
    trace.export.batch = 1;
    trace.export.delay = Duration::ZERO;
    trace.export.timeout = Duration::from_secs(30);
    let proxy = start(
        &format!(
            "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\ndestinations:\n{}",
            common::destination("app.shop", &[("app", 1, &[app])])
        ),
        Some(trace),
    )
    .await;
    let started = Instant::now();
    let mut h1 = H1::connect(proxy.http.unwrap()).await;
    for _ in 0..20 {
        assert_eq!(h1.get("app.shop", "/").await.0, StatusCode::OK);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "requests waited for the exporter: {:?}",
        started.elapsed()
    );
    let metrics = H1::connect(proxy.admin.unwrap())
        .await
        .get("admin", "/metrics")
        .await
        .2;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("trellis_trace_spans_dropped_total{reason=\"queue_full\"} "))
        .unwrap_or_else(|| panic!("no queue_full drops: {metrics}"))
        .parse()
        .unwrap();
    // One span in the export that hangs, one in the queue (maybe one taken between them).
    assert!((17..=19).contains(&dropped), "dropped {dropped}: {metrics}");
}
