//! Scale benchmark: the `trellis controller` process with 5,000 services, 50,000 endpoints and
//! 1,000 connected proxy streams: its memory after convergence, its CPU at idle, and the latency
//! and CPU time of one endpoint change and one TrafficSplit change at that size.
//!
//! The controller runs as a child process (`trellis controller --platform file=... --policy ...`)
//! so `/proc/<pid>/status` (VmRSS, VmHWM) and `/proc/<pid>/stat` (utime + stime) are its own. The
//! streams are simulated proxies in this process: 100 HTTP/2 connections on loopback, each with 8
//! `Destinations.Watch` streams (spread over the services: split roots and plain services) and 2
//! `Inbound.Watch` streams, like a proxy that talks to 8 services and serves 2 ports.
//!
//! Baselines, measured in the same run: a second controller process on the same files with no
//! stream connected (the fixed cost: runtime, discovery adapter, policy), and in this process
//! the file platform's parse of the services file and the SMI load of the policy directory (what
//! any change costs before the index sees it, with these polling sources).
//!
//! `cargo bench -p trellis-cli --bench scale [-- --services 5000 --endpoints-per-service 10 --connections 100]`

use trellis_testing as support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use tokio::sync::mpsc;
use trellis_proxy_api::v1::{
    self, destinations_client::DestinationsClient, inbound_client::InboundClient,
};

use support::{ControllerProcess, MIB, controller_command, cpu_of, memory_of, write_atomically};

const NAMESPACE: &str = "scale";
/// Destination and inbound streams per connection.
const DESTINATIONS_PER_CONNECTION: usize = 8;
const INBOUND_PER_CONNECTION: usize = 2;
/// Repetitions of each single change (the median latency and the mean CPU are printed).
const REPEATS: usize = 5;
const TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    services: usize,
    endpoints_per_service: usize,
    connections: usize,
}

fn args() -> Args {
    Args {
        services: support::numeric_flag("--services", 5_000),
        endpoints_per_service: support::numeric_flag("--endpoints-per-service", 10),
        connections: support::numeric_flag("--connections", 100),
    }
}

fn service(i: usize) -> String {
    format!("svc-{i:05}")
}

/// The services file; `moved` = (service, port) whose first endpoint listens on that port.
fn services_yaml(args: &Args, moved: Option<(usize, u16)>) -> String {
    let mut out = String::with_capacity(args.services * args.endpoints_per_service * 48);
    out.push_str(&format!("namespace: {NAMESPACE}\nservices:\n"));
    for i in 0..args.services {
        out.push_str(&format!(
            "  - name: {}\n    ports: [{{ name: http, port: 8080, protocol: http }}]\n    endpoints:\n",
            service(i)
        ));
        for j in 0..args.endpoints_per_service {
            let port = match moved {
                Some((s, port)) if s == i && j == 0 => port,
                _ => 8080,
            };
            out.push_str(&format!(
                "      - {{ address: 10.{}.{}.{}, port: {port} }}\n",
                i / 250,
                i % 250,
                j + 1
            ));
        }
    }
    out
}

/// Split roots are every third service (backends: the next two).
fn is_split_root(i: usize) -> bool {
    i.is_multiple_of(3) && i + 2 < SPLIT_SERVICES
}
/// Services 0..SPLIT_SERVICES take part in splits (1,000 splits).
const SPLIT_SERVICES: usize = 3_000;

/// Every split; `changed` = (root, weights) written differently.
fn splits_yaml(changed: Option<(usize, (u32, u32))>) -> String {
    let mut out = String::new();
    for i in (0..SPLIT_SERVICES).filter(|i| is_split_root(*i)) {
        let (w1, w2) = match changed {
            Some((root, w)) if root == i => w,
            _ => (90, 10),
        };
        out.push_str(&format!(
            "---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{ name: {root}, namespace: {NAMESPACE} }}\nspec:\n  service: {root}\n  backends:\n  - {{ service: {b1}, weight: {w1} }}\n  - {{ service: {b2}, weight: {w2} }}\n",
            root = service(i),
            b1 = service(i + 1),
            b2 = service(i + 2),
        ));
    }
    out
}

/// One TrafficTarget per workload with an inbound stream: its neighbour may call it on 8080.
fn targets_yaml(workloads: &[usize]) -> String {
    let mut out = format!(
        "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{ name: http-port, namespace: {NAMESPACE} }}\nspec:\n  matches:\n    ports: [8080]\n"
    );
    for &i in workloads {
        out.push_str(&format!(
            "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{ name: to-{dest}, namespace: {NAMESPACE} }}\nspec:\n  destination: {{ kind: ServiceAccount, name: {dest}, namespace: {NAMESPACE} }}\n  sources:\n  - {{ kind: ServiceAccount, name: {src}, namespace: {NAMESPACE} }}\n  rules:\n  - {{ kind: TCPRoute, name: http-port }}\n",
            dest = service(i),
            src = service((i + 1) % 5_000),
        ));
    }
    out
}

/// The files of one run.
struct Layout {
    mesh: PathBuf,
    policy: PathBuf,
    scratch: PathBuf,
}

fn layout(root: &Path, args: &Args, inbound: &[usize]) -> Layout {
    let l = Layout {
        mesh: root.join("mesh.yaml"),
        policy: root.join("policy"),
        scratch: root.join("scratch"),
    };
    std::fs::create_dir_all(&l.policy).expect("policy dir");
    std::fs::create_dir_all(&l.scratch).expect("scratch dir");
    std::fs::write(&l.mesh, services_yaml(args, None)).expect("services file");
    std::fs::write(l.policy.join("splits.yaml"), splits_yaml(None)).expect("splits");
    std::fs::write(l.policy.join("targets.yaml"), targets_yaml(inbound)).expect("targets");
    l
}

/// A `trellis controller` child process (killed on drop) and its `/proc` figures.
struct Controller(ControllerProcess);

impl Controller {
    fn spawn(layout: &Layout, stderr: &Path) -> Controller {
        let stderr = std::fs::File::create(stderr).expect("stderr file");
        Controller(ControllerProcess::spawn(
            controller_command(env!("CARGO_BIN_EXE_trellis"))
                .arg("--platform")
                .arg(format!("file={}", layout.mesh.display()))
                .arg("--policy")
                .arg(&layout.policy)
                .stderr(stderr),
        ))
    }

    fn grpc(&self) -> SocketAddr {
        self.0.grpc
    }

    fn cpu(&self) -> Duration {
        cpu_of(self.0.pid()).expect("/proc/<pid>/stat")
    }

    fn memory(&self) -> (u64, u64) {
        memory_of(self.0.pid()).expect("/proc/<pid>/status")
    }
}

/// What a stream reports: its index, when, and a digest of what it now holds.
#[derive(Clone, Debug)]
struct Seen {
    stream: usize,
    at: Instant,
    /// Destinations: "backend weight endpoint-addresses..." per backend; inbound: the version.
    digest: String,
}

fn digest(update: &v1::DestinationUpdate) -> String {
    match &update.kind {
        Some(v1::destination_update::Kind::Profile(p)) => p
            .backends
            .iter()
            .map(|b| {
                let eps: Vec<&str> = b.endpoints.iter().map(|e| e.address.as_str()).collect();
                format!("{} {} {}", b.name, b.weight, eps.join(","))
            })
            .collect::<Vec<_>>()
            .join(";"),
        Some(v1::destination_update::Kind::NotFound(n)) => format!("not found: {}", n.reason),
        Some(v1::destination_update::Kind::Delta(d)) => format!("delta {d:?}"),
        None => String::new(),
    }
}

/// A destination stream: the service it watches and its stream number.
#[derive(Clone, Copy, Debug)]
struct Watched {
    service: usize,
    stream: usize,
}

/// Opens every stream; returns the destination streams and the number of streams.
async fn connect(
    grpc: SocketAddr,
    args: &Args,
    tx: mpsc::UnboundedSender<Seen>,
) -> (Vec<Watched>, usize) {
    let destinations = args.connections * DESTINATIONS_PER_CONNECTION;
    let watched: Vec<usize> = (0..destinations)
        .map(|k| k * args.services / destinations)
        .collect();
    let mut stream = 0;
    let mut out = Vec::new();
    for c in 0..args.connections {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connecting to the controller");
        for d in 0..DESTINATIONS_PER_CONNECTION {
            let watched = watched[c * DESTINATIONS_PER_CONNECTION + d];
            out.push(Watched {
                service: watched,
                stream,
            });
            let target = format!("{}.{NAMESPACE}.svc.cluster.local:8080", service(watched));
            let (mut client, tx, id) =
                (DestinationsClient::new(channel.clone()), tx.clone(), stream);
            tokio::spawn(async move {
                let request = v1::DestinationRequest {
                    target,
                    source_workload: format!("{NAMESPACE}/proxy-{c}"),
                };
                let mut updates = client.watch(request).await.expect("watch").into_inner();
                while let Some(Ok(update)) = updates.next().await {
                    let seen = Seen {
                        stream: id,
                        at: Instant::now(),
                        digest: digest(&update),
                    };
                    if tx.send(seen).is_err() {
                        return;
                    }
                }
            });
            stream += 1;
        }
        for p in 0..INBOUND_PER_CONNECTION {
            let workload = inbound_workload(args, c, p);
            let (mut client, tx, id) = (InboundClient::new(channel.clone()), tx.clone(), stream);
            tokio::spawn(async move {
                let request = v1::InboundRequest {
                    workload: format!("{NAMESPACE}/{}", service(workload)),
                    port: 8080,
                };
                let mut policies = client.watch(request).await.expect("watch").into_inner();
                while let Some(Ok(policy)) = policies.next().await {
                    let seen = Seen {
                        stream: id,
                        at: Instant::now(),
                        digest: policy.version,
                    };
                    if tx.send(seen).is_err() {
                        return;
                    }
                }
            });
            stream += 1;
        }
    }
    (out, stream)
}

/// The workload of inbound stream `p` of connection `c`.
fn inbound_workload(args: &Args, c: usize, p: usize) -> usize {
    (c * INBOUND_PER_CONNECTION + p) * 7 % args.services
}

fn inbound_workloads(args: &Args) -> Vec<usize> {
    let mut out: Vec<usize> = (0..args.connections)
        .flat_map(|c| (0..INBOUND_PER_CONNECTION).map(move |p| (c, p)))
        .map(|(c, p)| inbound_workload(args, c, p))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What every stream holds now.
struct Streams {
    rx: mpsc::UnboundedReceiver<Seen>,
    holds: Vec<Option<Seen>>,
    messages: usize,
}

impl Streams {
    /// Waits until `done` holds of what stream `stream` (or, for `None`, every stream) holds.
    async fn until(&mut self, stream: Option<usize>, done: impl Fn(&Seen) -> bool) -> Instant {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let ready: Option<Vec<Instant>> = match stream {
                Some(s) => self.holds[s]
                    .iter()
                    .filter(|h| done(h))
                    .map(|h| vec![h.at])
                    .next(),
                None => self
                    .holds
                    .iter()
                    .map(|h| h.as_ref().filter(|h| done(h)).map(|h| h.at))
                    .collect(),
            };
            if let Some(times) = ready {
                return times.into_iter().max().expect("a stream");
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(seen)) => {
                    self.messages += 1;
                    let id = seen.stream;
                    self.holds[id] = Some(seen);
                }
                Ok(None) => panic!("every stream ended"),
                Err(_) => {
                    let waiting = self.holds.iter().filter(|h| h.is_none()).count();
                    let last = stream
                        .and_then(|s| self.holds[s].as_ref())
                        .map(|h| &h.digest);
                    panic!(
                        "no answer within {TIMEOUT:?} ({waiting} streams never answered; the stream waited on holds {last:?})"
                    );
                }
            }
        }
    }

    /// Takes what arrived meanwhile (so counts are per step).
    fn drain(&mut self) {
        while let Ok(seen) = self.rx.try_recv() {
            self.messages += 1;
            let id = seen.stream;
            self.holds[id] = Some(seen);
        }
    }
}

/// CPU time of the child over `window`, at rest.
async fn idle_cpu(ctl: &Controller, window: Duration) -> Duration {
    let before = ctl.cpu();
    tokio::time::sleep(window).await;
    ctl.cpu() - before
}

/// One change measured: latency to the stream that shows it, CPU the child used for it (CPU over
/// the change and a settle second, minus the idle rate over the same time).
struct Change {
    latency: Duration,
    cpu: Duration,
    messages: usize,
}

const SETTLE: Duration = Duration::from_millis(1500);

async fn measure_change(
    ctl: &Controller,
    streams: &mut Streams,
    idle_per_sec: f64,
    stream: usize,
    write: impl FnOnce(),
    shows: impl Fn(&Seen) -> bool,
) -> Change {
    streams.drain();
    let before_messages = streams.messages;
    let cpu_before = ctl.cpu();
    let start = Instant::now();
    write();
    let at = streams.until(Some(stream), shows).await;
    tokio::time::sleep(SETTLE).await;
    streams.drain();
    let elapsed = start.elapsed().as_secs_f64();
    let used = ctl.cpu().as_secs_f64() - cpu_before.as_secs_f64() - idle_per_sec * elapsed;
    Change {
        latency: at - start,
        cpu: Duration::from_secs_f64(used.max(0.0)),
        messages: streams.messages - before_messages,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / v.len().max(1) as u32
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB)
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let total_endpoints = args.services * args.endpoints_per_service;
    let streams_total = args.connections * (DESTINATIONS_PER_CONNECTION + INBOUND_PER_CONNECTION);
    println!(
        "scale: {} services, {} endpoints, {} streams ({} Destinations + {} Inbound over {} connections), 1,000 TrafficSplits",
        args.services,
        total_endpoints,
        streams_total,
        args.connections * DESTINATIONS_PER_CONNECTION,
        args.connections * INBOUND_PER_CONNECTION,
        args.connections
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let inbound = inbound_workloads(&args);
    let files = layout(dir.path(), &args, &inbound);

    // Baselines in this process: what each change costs the polling sources before the index.
    let mesh_text = std::fs::read_to_string(&files.mesh).expect("services file");
    let source_id: trellis_discovery::SourceId = std::sync::Arc::from("file:bench");
    let parse_started = Instant::now();
    let catalog =
        trellis_adapter_file::parse(&mesh_text, &files.mesh, &source_id, SystemTime::now())
            .expect("the generated services file parses");
    let parse = parse_started.elapsed();
    assert_eq!(catalog.services.len(), args.services);
    drop(catalog);
    let load_started = Instant::now();
    let report = trellis_smi::load::load_paths(std::slice::from_ref(&files.policy));
    let load = load_started.elapsed();
    assert!(report.errors.is_empty(), "{:?}", report.errors.first());

    // Baseline process: the same files, no stream.
    let bare = Controller::spawn(&files, &dir.path().join("bare.stderr"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bare_memory = bare.memory();
    let bare_idle = idle_cpu(&bare, Duration::from_secs(3)).await;
    drop(bare);

    let started = Instant::now();
    let ctl = Controller::spawn(&files, &dir.path().join("controller.stderr"));
    let (tx, rx) = mpsc::unbounded_channel();
    let (watched, total) = connect(ctl.grpc(), &args, tx).await;
    let mut streams = Streams {
        rx,
        holds: vec![None; total],
        messages: 0,
    };
    streams.until(None, |_| true).await;
    let converged = started.elapsed();
    eprintln!(
        "converged in {converged:?}; measuring idle, then {REPEATS} endpoint and {REPEATS} split changes"
    );
    let cpu_converge = ctl.cpu();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let memory = ctl.memory();
    let idle = idle_cpu(&ctl, Duration::from_secs(3)).await;
    let idle_per_sec = idle.as_secs_f64() / 3.0;

    // Endpoint changes: the first endpoint of a watched plain service moves to a new port.
    let plain = *watched
        .iter()
        .find(|w| w.service >= SPLIT_SERVICES)
        .expect("a watched service outside the splits");
    let plain_service = plain.service;
    let mut endpoint_changes = Vec::new();
    for r in 0..REPEATS {
        let port = 9000 + r as u16;
        let wanted = format!(":{port}");
        let text = services_yaml(&args, Some((plain_service, port)));
        let (scratch, mesh) = (files.scratch.clone(), files.mesh.clone());
        endpoint_changes.push(
            measure_change(
                &ctl,
                &mut streams,
                idle_per_sec,
                plain.stream,
                move || write_atomically(&scratch, &mesh, &text),
                |seen| seen.digest.contains(&wanted),
            )
            .await,
        );
    }

    // Split changes: a watched root's weights change.
    let root = *watched
        .iter()
        .find(|w| is_split_root(w.service))
        .expect("a watched split root");
    let root_service = root.service;
    let mut split_changes = Vec::new();
    for r in 0..REPEATS {
        let w = (20 + r as u32, 79); // coprime: the profile carries reduced shares
        let wanted = format!("{} {} ", service(root_service + 1), w.0);
        let text = splits_yaml(Some((root_service, w)));
        let (scratch, file) = (files.scratch.clone(), files.policy.join("splits.yaml"));
        split_changes.push(
            measure_change(
                &ctl,
                &mut streams,
                idle_per_sec,
                root.stream,
                move || write_atomically(&scratch, &file, &text),
                |seen| seen.digest.contains(&wanted),
            )
            .await,
        );
    }
    let final_memory = ctl.memory();
    let problems = std::fs::read_to_string(dir.path().join("controller.stderr"))
        .map(|s| s.lines().count())
        .unwrap_or(0);
    drop(ctl);

    println!();
    println!("{:<52} {:>16} {:>16}", "", "controller", "baseline");
    let row = |what: &str, value: String, baseline: String| {
        println!("{what:<52} {value:>16} {baseline:>16}");
    };
    row(
        "RSS at idle after convergence (VmRSS)",
        mib(memory.0),
        mib(bare_memory.0),
    );
    row(
        "peak RSS (VmHWM)",
        mib(memory.1.max(final_memory.1)),
        mib(bare_memory.1),
    );
    row(
        "start -> all streams answered (wall, CPU)",
        format!("{} / {}", ms(converged), ms(cpu_converge)),
        String::new(),
    );
    row("idle CPU over 3 s", ms(idle), ms(bare_idle));
    let summary = |changes: &[Change]| {
        (
            median(changes.iter().map(|c| c.latency).collect()),
            mean(&changes.iter().map(|c| c.cpu).collect::<Vec<_>>()),
            changes.iter().map(|c| c.messages).sum::<usize>() as f64 / changes.len() as f64,
        )
    };
    let (lat, cpu, msgs) = summary(&endpoint_changes);
    row(
        &format!("endpoint change: latency (median of {REPEATS})"),
        ms(lat),
        String::new(),
    );
    row(
        "endpoint change: CPU (mean) / file parse",
        ms(cpu),
        ms(parse),
    );
    row(
        "endpoint change: stream messages (mean)",
        format!("{msgs:.1}"),
        String::new(),
    );
    let (lat, cpu, msgs) = summary(&split_changes);
    row(
        &format!("split change: latency (median of {REPEATS})"),
        ms(lat),
        String::new(),
    );
    row("split change: CPU (mean) / policy load", ms(cpu), ms(load));
    row(
        "split change: stream messages (mean)",
        format!("{msgs:.1}"),
        String::new(),
    );
    println!();
    println!(
        "baseline = a controller process on the same files with no stream (memory, idle CPU); the services-file parse and the policy-directory load in the bench process (per change, the polling sources' own work)."
    );
    println!(
        "latency includes the 250 ms poll of the file platform / policy files; CPU = process CPU over the change + {SETTLE:?} minus the idle rate (10 ms ticks). Goal: RSS < 500 MiB. Problems reported by the controller: {problems} lines."
    );
}
