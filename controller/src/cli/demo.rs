//! `trellis demo`: a whole local mesh in one process on loopback, with nothing but the build.
//!
//! It writes the embedded demo services file (the file platform) and a TrafficSplit to a temp
//! directory, starts the controller, two echo apps (`web` v1 and v2), a trellis-proxy (in
//! process, in controller mode) and a client sending requests through the proxy to `web.demo`.
//! It then steps the split's weights (100/0 -> 50/50 -> 0/100) by rewriting the policy file,
//! showing per-version traffic on one refreshing line. Interactive runs repeat the steps until
//! Ctrl-C; `--once` runs them once, prints a summary and exits 0 when traffic followed every
//! step's weights exactly (1 otherwise). Everything lives in this process: stopping it leaves
//! nothing behind.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use trellis_conformance::client::{CallPlan, run as call};
use trellis_conformance::echo::{EchoServer, Identity};
use trellis_controller::discovery::Platform;
use trellis_controller::index::IndexOptions;
use trellis_controller::run::{Options, start};
use trellis_proxy_api::v1;

/// The scripted weights (v1, v2).
const STEPS: [(u32, u32); 3] = [(100, 0), (50, 50), (0, 100)];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run the steps once, print a summary and exit (for scripts and tests).
    #[arg(long)]
    pub once: bool,
    /// Seconds per step in interactive mode.
    #[arg(long, default_value_t = 5.0)]
    pub step_seconds: f64,
    /// Requests counted per step with --once.
    #[arg(long, default_value_t = 100)]
    pub requests: u32,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new()?;
    let code = runtime.block_on(async {
        tokio::select! {
            result = demo(args) => result,
            _ = tokio::signal::ctrl_c() => {
                println!("\ntrellis demo: stopped");
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    // Every task (controller, proxy, apps) ends with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

fn split_yaml(v1: u32, v2: u32) -> String {
    format!(
        "# Written by `trellis demo`: the split of the root service web between its versions.
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{ name: web, namespace: demo }}
spec:
  service: web
  backends:
  - {{ service: web-v1, weight: {v1} }}
  - {{ service: web-v2, weight: {v2} }}
"
    )
}

/// Writes atomically (temp file + rename) so the policy source never reads half a file.
fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The embedded demo services with the `web` endpoints moved to the echo apps' ports.
fn services_yaml(v1: SocketAddr, v2: SocketAddr) -> anyhow::Result<String> {
    let demo = trellis_adapter_file::DEMO_YAML;
    let from_v1 = "address: 127.0.0.1\n        port: 18081";
    let from_v2 = "address: 127.0.0.2\n        port: 18082";
    anyhow::ensure!(
        demo.contains(from_v1) && demo.contains(from_v2),
        "the embedded demo services file no longer has the web endpoints this demo rewrites"
    );
    Ok(demo
        .replace(
            from_v1,
            &format!("address: {}\n        port: {}", v1.ip(), v1.port()),
        )
        .replace(
            from_v2,
            &format!("address: {}\n        port: {}", v2.ip(), v2.port()),
        ))
}

struct Mesh {
    _dir: tempfile::TempDir,
    split_file: std::path::PathBuf,
    proxy: SocketAddr,
    web: trellis_controller::index::DestinationRx,
    _apps: (EchoServer, EchoServer),
    _proxy: trellis_proxy::RunningProxy,
}

async fn mesh() -> anyhow::Result<Mesh> {
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let identity = |version: &str| Identity {
        service: "web".into(),
        version: version.into(),
    };
    let v1 = EchoServer::start(loopback, identity("v1")).await?;
    let v2 = EchoServer::start(loopback, identity("v2")).await?;
    let dir = tempfile::tempdir()?;
    let services = dir.path().join("demo.yaml");
    write(&services, &services_yaml(v1.addr(), v2.addr())?)?;
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy)?;
    let split_file = policy.join("split.yaml");
    write(&split_file, &split_yaml(STEPS[0].0, STEPS[0].1))?;
    let controller = start(Options {
        policy_paths: vec![policy],
        platforms: vec![Platform::File(services)],
        grpc: loopback,
        admin: Some(loopback),
        index: IndexOptions::default(),
    })
    .await?;

    let mut base = trellis_proxy::config::Config::default();
    base.outbound.http = Some(loopback);
    let client = trellis_proxy::controller::Controller::new(
        trellis_proxy::controller::ControllerOptions::new(
            format!("http://{}", controller.grpc),
            "demo/client",
        ),
        base,
    )?;
    let mut options = trellis_proxy::ProxyOptions::new(client.initial_config());
    options.resolver = Some(client.clone());
    let proxy = trellis_proxy::start(options).await?;
    client.attach(&proxy.shared, None);
    let proxy_addr = proxy.http.context("the proxy has no outbound listener")?;
    // Watch web.demo from the start, to know when each step is in force.
    let web = controller
        .index
        .destination(trellis_discovery::ServiceKey::new("demo", "web"))
        .await
        .context("the controller's index stopped")?;
    println!(
        "trellis demo: a local mesh on loopback (files in {})",
        dir.path().display()
    );
    println!(
        "  controller grpc {}  admin {}   (try: trellis check --admin {1})",
        controller.grpc,
        controller.admin.map(|a| a.to_string()).unwrap_or_default()
    );
    println!(
        "  proxy {proxy_addr}  web v1 {}  web v2 {}  split file {}",
        v1.addr(),
        v2.addr(),
        split_file.display()
    );
    Ok(Mesh {
        _dir: dir,
        split_file,
        proxy: proxy_addr,
        web,
        _apps: (v1, v2),
        _proxy: proxy,
    })
}

/// Waits until the controller serves `web.demo` with weights (v1, v2) (a version whose weight is
/// 0 may also be absent), then a little longer for the proxy to apply it.
async fn wait_applied(mesh: &Mesh, v1: u32, v2: u32) -> anyhow::Result<()> {
    let mut web = mesh.web.clone();
    let applied = |update: &Option<v1::DestinationUpdate>| {
        let Some(v1::destination_update::Kind::Profile(p)) =
            update.as_ref().and_then(|u| u.kind.as_ref())
        else {
            return false;
        };
        let weight = |name: &str| {
            p.backends
                .iter()
                .find(|b| b.name == name)
                .map_or(0, |b| b.weight)
        };
        let (w1, w2) = (weight("web-v1"), weight("web-v2"));
        w1 + w2 > 0 && u64::from(w1) * u64::from(v2) == u64::from(w2) * u64::from(v1)
    };
    tokio::time::timeout(Duration::from_secs(10), web.wait_for(applied))
        .await
        .map_err(|_| anyhow::anyhow!("the split {v1}/{v2} was not applied within 10 s"))?
        .map_err(|_| anyhow::anyhow!("the controller's index stopped"))?;
    // The proxy hears the same update over gRPC; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

async fn send(mesh: &Mesh, count: u32) -> anyhow::Result<BTreeMap<String, u32>> {
    let report = call(&CallPlan {
        url: "http://web.demo/".into(),
        count,
        method: "GET".into(),
        caller: Some("client".into()),
        headers: Default::default(),
        proxy: Some(mesh.proxy),
        timeout_ms: Some(5000),
    })
    .await?;
    let mut counts = report.by_responder;
    let failed = report.failed + report.mesh_errors.values().sum::<u32>();
    if failed > 0 {
        counts.insert("failed".into(), failed);
    }
    Ok(counts)
}

fn line(step: usize, (v1, v2): (u32, u32), counts: &BTreeMap<String, u32>) -> String {
    let total: u32 = counts.values().sum::<u32>().max(1);
    let get = |k: &str| counts.get(k).copied().unwrap_or(0);
    let bar = |n: u32| "#".repeat((n * 20 / total) as usize);
    let failed = match get("failed") {
        0 => String::new(),
        n => format!("  failed {n}"),
    };
    format!(
        "step {}/{}  weights v1={v1:<3} v2={v2:<3} | v1 {:>5} {:<20} | v2 {:>5} {:<20}{failed}",
        step + 1,
        STEPS.len(),
        get("web/v1"),
        bar(get("web/v1")),
        get("web/v2"),
        bar(get("web/v2")),
    )
}

async fn demo(args: &Args) -> anyhow::Result<ExitCode> {
    let mesh = mesh().await?;
    if args.once {
        let mut followed = true;
        for (step, &(v1, v2)) in STEPS.iter().enumerate() {
            write(&mesh.split_file, &split_yaml(v1, v2))?;
            wait_applied(&mesh, v1, v2).await?;
            let counts = send(&mesh, args.requests).await?;
            let get = |k: &str| counts.get(k).copied().unwrap_or(0);
            let expected_v1 = args.requests * v1 / (v1 + v2);
            let ok = get("web/v1") == expected_v1 && get("web/v2") == args.requests - expected_v1;
            followed &= ok;
            println!(
                "{}  {}",
                line(step, (v1, v2), &counts),
                if ok { "ok" } else { "MISMATCH" }
            );
        }
        println!(
            "summary: {} steps, {} requests each: {}",
            STEPS.len(),
            args.requests,
            if followed {
                "traffic followed the weights"
            } else {
                "traffic did NOT follow the weights"
            }
        );
        return Ok(if followed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    println!("Ctrl-C to stop. Edit the split file to try your own weights.");
    let step_time = Duration::from_secs_f64(args.step_seconds.max(0.5));
    loop {
        for (step, &(v1, v2)) in STEPS.iter().enumerate() {
            write(&mesh.split_file, &split_yaml(v1, v2))?;
            wait_applied(&mesh, v1, v2).await?;
            let started = Instant::now();
            let mut counts = BTreeMap::new();
            while started.elapsed() < step_time {
                for (k, n) in send(&mesh, 10).await? {
                    *counts.entry(k).or_insert(0) += n;
                }
                print!("\r{}", line(step, (v1, v2), &counts));
                std::io::stdout().flush()?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!();
        }
    }
}
