//! Propagation benchmark: the time from a TrafficSplit change being written to the LAST of N
//! connected proxies having received and decoded the profile with the new weights.
//!
//! A controller is started in this process ([`trellis_controller::run`]) on the file discovery
//! platform; N "proxies" are real tonic clients, each on its own HTTP/2 connection on loopback,
//! doing `Destinations.Watch` of the split's root like `trellis-proxy` does. Sources measured:
//!
//! - files, default poll (250 ms): the split file in the `--policy` directory is rewritten
//!   atomically (temp file + rename) at an evenly spread phase of the poll cycle;
//! - files, 20 ms poll: the same with a faster-polling file source, so the controller's own share
//!   is not hidden under the poll;
//! - Kubernetes: the TrafficSplit object is PUT (HTTP, kube client) to the fake API server with
//!   the SMI CRDs registered; the controller watches it through the Kubernetes policy source.
//!
//! Baselines, measured in the same run: the same change seen by the bare policy source (the file
//! source alone; a bare kube-runtime watcher of the TrafficSplit), so the controller's share (index
//! + gRPC fan-out) is the difference.
//!
//! `cargo bench -p trellis-controller --bench propagation [-- --proxies 100 --changes 100]`

use trellis_testing as support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DynamicObject, PostParams};
use kube::runtime::watcher;
use tokio::sync::mpsc;
use trellis_controller::discovery::Platform;
use trellis_controller::run::{Options, Running, start_with};
use trellis_controller_core::index::IndexOptions;
use trellis_controller_core::policy::PolicySource;
use trellis_controller_core::policy::files::{DEFAULT_POLL_INTERVAL, FilePolicySource};
use trellis_controller_kubernetes::policy::{KubernetesPolicySource, stored_resource};
use trellis_proxy_api::v1::{self, destinations_client::DestinationsClient};
use trellis_smi::model::{Kind, Policy};

use support::{LatencyStats, phase, write_atomically};

const NAMESPACE: &str = "demo";
const ROOT: &str = "web";
/// Longest wait for one change to reach every proxy before the bench gives up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// `web` with two endpoints labelled v1/v2 (the version-subset convention gives `web-v1` and
/// `web-v2`).
const SERVICES: &str = "namespace: demo
services:
  - name: web
    ports: [{ name: http, port: 8080, protocol: http }]
    endpoints:
      - { address: 127.0.0.1, port: 18081, labels: { version: v1 } }
      - { address: 127.0.0.1, port: 18082, labels: { version: v2 } }
";

/// The weights of change `i` (1-based): every ratio differs from the one before.
fn weights(i: usize) -> (u32, u32) {
    (i as u32, 101 - i as u32)
}
const INITIAL: (u32, u32) = (1, 1000);

/// `(a, b)` is the ratio `want` (shares are reduced by their gcd on the way).
fn same_ratio(a: u64, b: u64, want: (u32, u32)) -> bool {
    (a, b) != (0, 0) && a * u64::from(want.1) == b * u64::from(want.0)
}

struct Args {
    proxies: usize,
    changes: usize,
}

fn args() -> Args {
    Args {
        proxies: support::numeric_flag("--proxies", 100),
        changes: support::numeric_flag("--changes", 100),
    }
}

/// What one proxy reports: which proxy, the weights of web-v1/web-v2 it now holds, when.
type Applied = (usize, u32, u32, Instant);

/// N connected proxies and what each holds now.
struct Fleet {
    rx: mpsc::UnboundedReceiver<Applied>,
    holds: Vec<Option<(u32, u32, Instant)>>,
}

impl Fleet {
    async fn connect(grpc: SocketAddr, proxies: usize) -> Fleet {
        let (tx, rx) = mpsc::unbounded_channel();
        for id in 0..proxies {
            // One HTTP/2 connection per proxy, as real proxies have.
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connecting to the controller");
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut client = DestinationsClient::new(channel);
                let mut stream = client
                    .watch(v1::DestinationRequest {
                        target: format!("{ROOT}.{NAMESPACE}.svc.cluster.local:8080"),
                        source_workload: format!("bench/proxy-{id}"),
                    })
                    .await
                    .expect("Destinations.Watch")
                    .into_inner();
                while let Some(update) = stream.next().await {
                    let update = update.expect("stream item");
                    if let Some(v1::destination_update::Kind::Profile(p)) = update.kind {
                        let weight = |name: &str| {
                            p.backends
                                .iter()
                                .find(|b| b.name == name)
                                .map_or(0, |b| b.weight)
                        };
                        let applied = (
                            id,
                            weight(&format!("{ROOT}-v1")),
                            weight(&format!("{ROOT}-v2")),
                            Instant::now(),
                        );
                        if tx.send(applied).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        Fleet {
            rx,
            holds: vec![None; proxies],
        }
    }

    /// Waits until every proxy holds `want`; returns when the first and the last got it.
    async fn all_hold(&mut self, want: (u32, u32)) -> (Instant, Instant) {
        let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
        loop {
            let times: Option<Vec<Instant>> = self
                .holds
                .iter()
                .map(|h| {
                    h.filter(|(a, b, _)| same_ratio(u64::from(*a), u64::from(*b), want))
                        .map(|(_, _, at)| at)
                })
                .collect();
            if let Some(times) = times {
                let first = times.iter().min().copied().expect("at least one proxy");
                let last = times.iter().max().copied().expect("at least one proxy");
                return (first, last);
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((id, a, b, at))) => self.holds[id] = Some((a, b, at)),
                Ok(None) => panic!("every proxy stream ended"),
                Err(_) => {
                    let behind = self
                        .holds
                        .iter()
                        .filter(|h| {
                            !h.is_some_and(|(a, b, _)| same_ratio(a.into(), b.into(), want))
                        })
                        .count();
                    panic!(
                        "{behind} of {} proxies did not get weights {want:?} within {CHANGE_TIMEOUT:?}",
                        self.holds.len()
                    );
                }
            }
        }
    }
}

/// How a change is written, and how long to pause before each one.
#[derive(Clone)]
enum Writer {
    File {
        scratch: PathBuf,
        file: PathBuf,
        poll: Duration,
    },
    Kube {
        api: Box<Api<DynamicObject>>,
    },
}

impl Writer {
    async fn pause_before(&self, i: usize) {
        match self {
            // Changes land at every phase of the poll cycle, like real ones.
            Writer::File { poll, .. } => tokio::time::sleep(poll.mul_f64(phase(i))).await,
            // Push: a short settle so changes do not queue behind each other.
            Writer::Kube { .. } => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }

    async fn write(&self, (w1, w2): (u32, u32)) {
        match self {
            Writer::File { scratch, file, .. } => {
                write_atomically(scratch, file, &support::split_yaml(NAMESPACE, ROOT, w1, w2))
            }
            Writer::Kube { api } => {
                let object: DynamicObject =
                    serde_json::from_value(support::split_object(NAMESPACE, ROOT, w1, w2))
                        .expect("split object");
                api.replace(ROOT, &PostParams::default(), &object)
                    .await
                    .expect("PUT TrafficSplit");
            }
        }
    }
}

/// A file layout: `mesh.yaml`, `policy/split.yaml`, `scratch/`.
fn file_layout(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mesh = root.join("mesh.yaml");
    std::fs::write(&mesh, SERVICES).expect("services file");
    let policy = root.join("policy");
    let scratch = root.join("scratch");
    std::fs::create_dir_all(&policy).expect("policy dir");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    write_atomically(
        &scratch,
        &policy.join("split.yaml"),
        &support::split_yaml(NAMESPACE, ROOT, INITIAL.0, INITIAL.1),
    );
    (mesh, policy, scratch)
}

async fn controller(mesh: PathBuf, source: Arc<dyn PolicySource>) -> Running {
    start_with(
        Options {
            policy_paths: Vec::new(),
            platforms: vec![Platform::File(mesh)],
            adapters: Default::default(),
            webhooks: None,
            traffic_metrics: None,
            grpc: "127.0.0.1:0".parse().expect("address"),
            admin: None,
            index: IndexOptions::default(),
        },
        vec![source],
    )
    .await
    .expect("starting the controller")
}

/// What one source measured.
struct Row {
    source: String,
    last: LatencyStats,
    first: LatencyStats,
    baseline: LatencyStats,
    baseline_name: &'static str,
}

/// `changes` changes through a controller with `proxies` connected proxies.
async fn through_controller(
    grpc: SocketAddr,
    writer: &Writer,
    proxies: usize,
    changes: usize,
) -> (LatencyStats, LatencyStats) {
    let mut fleet = Fleet::connect(grpc, proxies).await;
    fleet.all_hold(INITIAL).await;
    let (mut firsts, mut lasts) = (Vec::new(), Vec::new());
    for i in 1..=changes {
        writer.pause_before(i).await;
        let start = Instant::now();
        writer.write(weights(i)).await;
        let (first, last) = fleet.all_hold(weights(i)).await;
        firsts.push(first - start);
        lasts.push(last - start);
    }
    (
        LatencyStats::from_samples(lasts),
        LatencyStats::from_samples(firsts),
    )
}

fn split_weights(set: &trellis_controller_core::policy::PolicySet) -> Option<(u64, u64)> {
    set.policies.iter().find_map(|p| match p {
        Policy::TrafficSplit(s) if s.service == ROOT && s.backends.len() == 2 => {
            Some((s.backends[0].weight.milli(), s.backends[1].weight.milli()))
        }
        _ => None,
    })
}

/// The bare file source sees each change.
async fn file_baseline(poll: Duration, changes: usize) -> LatencyStats {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_, policy, scratch) = file_layout(dir.path());
    let writer = Writer::File {
        scratch,
        file: policy.join("split.yaml"),
        poll,
    };
    let mut sets = FilePolicySource::with_poll_interval(vec![policy], poll).watch();
    let mut samples = Vec::new();
    for i in 1..=changes {
        writer.pause_before(i).await;
        let start = Instant::now();
        writer.write(weights(i)).await;
        loop {
            let set = tokio::time::timeout(CHANGE_TIMEOUT, sets.next())
                .await
                .expect("the file source saw the change in time")
                .expect("the file source ended");
            if split_weights(&set).is_some_and(|(a, b)| same_ratio(a, b, weights(i))) {
                break;
            }
        }
        samples.push(start.elapsed());
    }
    LatencyStats::from_samples(samples)
}

async fn file_row(name: String, poll: Duration, args: &Args) -> Row {
    let baseline = file_baseline(poll, args.changes).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (mesh, policy, scratch) = file_layout(dir.path());
    let source = Arc::new(FilePolicySource::with_poll_interval(
        vec![policy.clone()],
        poll,
    ));
    let ctl = controller(mesh, source).await;
    let writer = Writer::File {
        scratch,
        file: policy.join("split.yaml"),
        poll,
    };
    let (last, first) = through_controller(ctl.grpc, &writer, args.proxies, args.changes).await;
    Row {
        source: name,
        last,
        first,
        baseline,
        baseline_name: "file source alone",
    }
}

async fn kube_row(args: &Args) -> Row {
    let server = support::smi_api_server().await;
    server
        .store()
        .apply(
            &support::split_type(),
            support::split_object(NAMESPACE, ROOT, INITIAL.0, INITIAL.1),
        )
        .expect("initial split");
    let api: Api<DynamicObject> = Api::namespaced_with(
        support::kube_client(&server),
        NAMESPACE,
        &stored_resource(Kind::TrafficSplit),
    );
    let writer = Writer::Kube {
        api: Box::new(api.clone()),
    };

    // Baseline: a bare kube-runtime watcher of the TrafficSplits.
    let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
    let mut samples = Vec::new();
    for i in 1..=args.changes {
        writer.pause_before(i).await;
        let start = Instant::now();
        writer.write(weights(i)).await;
        loop {
            let event = tokio::time::timeout(CHANGE_TIMEOUT, events.next())
                .await
                .expect("the watcher saw the change in time")
                .expect("the watcher ended")
                .expect("watch error");
            if let watcher::Event::Apply(object) | watcher::Event::InitApply(object) = event {
                let w = |k: usize| object.data["spec"]["backends"][k]["weight"].as_u64();
                if w(0)
                    .zip(w(1))
                    .is_some_and(|(a, b)| same_ratio(a, b, weights(i)))
                {
                    break;
                }
            }
        }
        samples.push(start.elapsed());
    }
    drop(events);
    let baseline = LatencyStats::from_samples(samples);

    writer.write(INITIAL).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (mesh, _, _) = file_layout(dir.path());
    let source = Arc::new(KubernetesPolicySource::new(support::kube_client(&server)));
    let ctl = controller(mesh, source).await;
    let (last, first) = through_controller(ctl.grpc, &writer, args.proxies, args.changes).await;
    Row {
        source: "kubernetes (fake API server, PUT)".into(),
        last,
        first,
        baseline,
        baseline_name: "bare kube watcher",
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        println!(
            "propagation: TrafficSplit change written -> every one of {} proxies decoded the new weights ({} changes each)",
            args.proxies, args.changes
        );
        let rows = vec![
            file_row(
                format!("files, default poll ({} ms)", DEFAULT_POLL_INTERVAL.as_millis()),
                DEFAULT_POLL_INTERVAL,
                &args,
            )
            .await,
            file_row("files, 20 ms poll".into(), Duration::from_millis(20), &args).await,
            kube_row(&args).await,
        ];
        println!();
        println!(
            "{:<36} {:>27} {:>10} {:>27} {:>22}",
            "source", "to LAST proxy p50/p99/max", "FIRST p50", "baseline p50/p99/max", "controller p50/p99"
        );
        for row in &rows {
            println!(
                "{:<36} {:>27} {:>10} {:>27} {:>22}",
                row.source,
                format!("{} / {} / {} ms", ms(row.last.p50), ms(row.last.p99), ms(row.last.max)),
                format!("{} ms", ms(row.first.p50)),
                format!(
                    "{} / {} / {} ms",
                    ms(row.baseline.p50),
                    ms(row.baseline.p99),
                    ms(row.baseline.max)
                ),
                format!(
                    "{:.1} / {:.1} ms",
                    support::minus_ms(row.last.p50, row.baseline.p50),
                    support::minus_ms(row.last.p99, row.baseline.p99)
                ),
            );
        }
        println!();
        for row in &rows {
            println!("baseline of {:<36}: {}", row.source, row.baseline_name);
        }
        println!("controller = to LAST proxy minus baseline (index + gRPC fan-out to every proxy); goal p99 < 100 ms");
    });
}
