//! `trellis demo`: a whole local mesh in one process on loopback, with nothing but the build.
//!
//! What runs (all in this process, every listener on 127.0.0.1 with a port the OS picked):
//! - the controller on the file platform, with its CA generated in memory, default deny, and a
//!   bootstrap tokens file the demo writes: one random token per workload, only its SHA-256 in
//!   the file, the tokens themselves in `tokens/` (mode 0600) for the proxies;
//! - two echo apps, `web` v1 and v2, each behind its own trellis-proxy inbound listener with the
//!   identity `spiffe://cluster.local/ns/demo/sa/web` (one ServiceAccount for both versions); the
//!   services file's `web` endpoints are the inbound proxies' ports with `service_account: web`;
//! - `demo/client`'s outbound proxy and `demo/stranger`'s, each with its own identity, so every
//!   hop is mTLS; a TrafficTarget lets `demo/client` call `web` on every port (TCPRoute
//!   `ports: []`), and no rule names the stranger.
//!
//! With `--platform consul|cloudmap|mixed` the two versions of `web` are registered in a local
//! stand-in instead of the services file (the Consul double, moto's Cloud Map, or one in each):
//! see [`registry`].
//!
//! It then steps the TrafficSplit's weights (100/0 -> 50/50 -> 0/100) by rewriting the policy
//! file, showing per-version traffic on one refreshing line; then the stranger calls `web` (one
//! `denied:` line: 403 with `x-trellis-error: forbidden`, and what the apps recorded from it), and
//! one `metrics:` line from the proxies' `/metrics` (mTLS handshakes, inbound requests allowed
//! and denied). Interactive runs repeat this until Ctrl-C; `--once` runs it once, prints a
//! summary and exits 0 only when traffic followed every step's weights exactly, every stranger
//! call was refused with `forbidden` while the apps saw none of them, and the proxies' counters
//! agree with what was sent (1 otherwise).
//!
//! Each step waits until the client's proxy holds the new weights (read from its routing table,
//! not guessed with a sleep), so the counts are exact. Everything lives in this process and its
//! temp directory: stopping it leaves nothing behind.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod registry;

use anyhow::Context as _;
pub use registry::DemoPlatform;
use registry::Registry;
use trellis_controller::discovery::Platform;
use trellis_controller::identity::IdentityOptions;
use trellis_controller::run::{Adapters, Options, Running, start_with_identity};
use trellis_controller_core::index::IndexOptions;
use trellis_echo::client::{CallPlan, CallReport, run as call};
use trellis_echo::echo::{Counts, EchoServer, Identity};
use trellis_echo::plain::{Method, request};
use trellis_proxy::config::{Config, Inbound, Workload};
use trellis_proxy::controller::{Controller, ControllerOptions};
use trellis_proxy::identity::{CertifierOptions, IdentityStore, run_certifier};
use trellis_proxy::state::{Resolve as _, Shared};
use trellis_proxy::{ProxyOptions, RunningProxy};
use trellis_proxy_api::spiffe::SpiffeId;

/// The scripted weights (v1, v2).
const STEPS: [(u32, u32); 3] = [(100, 0), (50, 50), (0, 100)];
/// The namespace of every demo workload (the embedded services file's).
const NAMESPACE: &str = "demo";
/// The controller's default trust domain.
const TRUST_DOMAIN: &str = "cluster.local";
/// The destination the callers ask for.
const WEB: &str = "web.demo";
/// Calls the stranger makes after the steps.
const STRANGER_CALLS: u32 = 5;
/// Bound on every wait for the mesh to reach a state (certificates, policy, weights).
const READY_WITHIN: Duration = Duration::from_secs(10);

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
    /// Where web's two versions are registered: the services file, the Consul double, Cloud Map
    /// on moto, or v1 in Consul and v2 in Cloud Map (one mesh over both).
    #[arg(long, value_enum, default_value_t = DemoPlatform::File)]
    pub platform: DemoPlatform,
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
    // Every task (controller, proxies, apps) ends with the runtime; the temp dir went with the
    // demo future.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

// ---------------------------------------------------------------------------------------------
// The files the demo writes: split, access policy, services, bootstrap tokens.

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

/// demo/client may call web (both versions run as the ServiceAccount `web`) on every port.
/// demo/stranger is named nowhere: default deny refuses it.
const ACCESS_YAML: &str =
    "# Written by `trellis demo`: who may call web. Default deny does the rest.
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: { name: web-all-ports, namespace: demo }
spec:
  matches:
    ports: []
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: client-to-web, namespace: demo }
spec:
  destination: { kind: ServiceAccount, name: web, namespace: demo }
  rules:
  - { kind: TCPRoute, name: web-all-ports }
  sources:
  - { kind: ServiceAccount, name: client, namespace: demo }
";

/// Writes atomically (temp file + rename) so the watching readers never see half a file.
fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The embedded demo services with the `web` endpoints moved to the inbound proxies' ports
/// (`None`: left where the embedded file has them, which nothing listens on).
fn services_yaml(inbound: Option<[SocketAddr; 2]>) -> anyhow::Result<String> {
    let demo = trellis_adapter_file::DEMO_YAML;
    let from = [
        "address: 127.0.0.1\n        port: 18081",
        "address: 127.0.0.2\n        port: 18082",
    ];
    anyhow::ensure!(
        from.iter().all(|f| demo.contains(f)),
        "the embedded demo services file no longer has the web endpoints this demo rewrites"
    );
    let Some(inbound) = inbound else {
        return Ok(demo.to_owned());
    };
    Ok(from
        .iter()
        .zip(inbound)
        .fold(demo.to_owned(), |text, (from, to)| {
            text.replace(
                from,
                &format!(
                    "address: {}\n        port: {}\n        service_account: web",
                    to.ip(),
                    to.port()
                ),
            )
        }))
}

/// Writes a random token per workload to `tokens/<name>` (readable by this user only) and the
/// controller's bootstrap tokens file with their SHA-256: the controller never sees a token.
fn write_tokens(
    dir: &Path,
    names: &[&str],
) -> anyhow::Result<(PathBuf, BTreeMap<String, PathBuf>)> {
    use sha2::Digest as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let token_dir = dir.join("tokens");
    std::fs::create_dir_all(&token_dir)?;
    let mut hashes = String::from(
        "# Written by `trellis demo`: SHA-256 of each workload's bootstrap token.\ntokens:\n",
    );
    let mut files = BTreeMap::new();
    for name in names {
        let token = hex::encode(rand::random::<[u8; 32]>());
        let path = token_dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(token.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        let digest = hex::encode(sha2::Sha256::digest(token.as_bytes()));
        hashes.push_str(&format!(
            "- workload: {NAMESPACE}/{name}\n  sha256: {digest}\n"
        ));
        files.insert((*name).to_owned(), path);
    }
    let bootstrap = dir.join("bootstrap-tokens.yaml");
    write(&bootstrap, &hashes)?;
    Ok((bootstrap, files))
}

// ---------------------------------------------------------------------------------------------
// The mesh.

/// One in-process trellis-proxy in controller mode with its own identity.
struct Sidecar {
    id: SpiffeId,
    proxy: RunningProxy,
    controller: Arc<Controller>,
}

impl Sidecar {
    /// Starts a proxy for `demo/<account>` from `base` (listeners), with an admin port, asking
    /// the controller at `grpc` for a certificate with the token in `token`.
    async fn start(
        grpc: SocketAddr,
        account: &str,
        mut base: Config,
        token: &Path,
    ) -> anyhow::Result<Self> {
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        base.admin = Some(loopback);
        base.workload.get_or_insert_with(|| Workload {
            kind: "deployment".into(),
            name: account.into(),
            namespace: NAMESPACE.into(),
        });
        let controller = Controller::new(
            ControllerOptions::new(format!("http://{grpc}"), format!("{NAMESPACE}/{account}")),
            base,
        )?;
        let mut options = ProxyOptions::new(controller.initial_config());
        options.resolver = Some(controller.clone());
        // Fail closed: until the certificate arrives, mTLS endpoints are not spoken to.
        options.identity = Arc::new(IdentityStore::expecting());
        let proxy = trellis_proxy::start(options).await?;
        let id = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, account);
        tokio::spawn(run_certifier(
            controller.channel(),
            CertifierOptions::new(id.clone(), token),
            proxy.shared.identity.clone(),
            proxy.shutdown_signal(),
        ));
        controller.attach(&proxy.shared, proxy.inbound.map(|a| a.port()));
        Ok(Self {
            id,
            proxy,
            controller,
        })
    }

    fn shared(&self) -> &Shared {
        &self.proxy.shared
    }

    fn admin(&self) -> SocketAddr {
        self.proxy
            .admin
            .expect("every demo proxy has an admin port")
    }

    /// The outbound HTTP listener (callers' proxies).
    fn outbound(&self) -> SocketAddr {
        self.proxy
            .http
            .expect("a caller's proxy has an outbound listener")
    }

    /// The inbound listener (the apps' proxies).
    fn inbound(&self) -> SocketAddr {
        self.proxy
            .inbound
            .expect("an app's proxy has an inbound listener")
    }

    /// The SPIFFE id of the certificate in use, once there is a valid one.
    fn certified(&self) -> Option<String> {
        let current = self.shared().identity.current()?;
        Some(current.credentials.id.to_string())
    }
}

/// One version of `web`: the echo app and its inbound proxy.
struct Web {
    version: &'static str,
    app: EchoServer,
    sidecar: Sidecar,
}

struct Mesh {
    dir: tempfile::TempDir,
    registry: Registry,
    split_file: PathBuf,
    controller: Running,
    web: [Web; 2],
    client: Sidecar,
    stranger: Sidecar,
}

async fn mesh(platform: DemoPlatform) -> anyhow::Result<Mesh> {
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let registry = Registry::start(platform).await?;
    let dir = tempfile::tempdir()?;
    let (bootstrap, tokens) = write_tokens(dir.path(), &["client", "stranger", "web"])?;
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy)?;
    let split_file = policy.join("split.yaml");
    write(&split_file, &split_yaml(STEPS[0].0, STEPS[0].1))?;
    write(&policy.join("access.yaml"), ACCESS_YAML)?;
    // The inbound proxies need the controller's address and the controller needs the services
    // file: it starts with the embedded endpoints and is rewritten once the proxies are bound.
    let services = dir.path().join("demo.yaml");
    write(&services, &services_yaml(None)?)?;
    let adapters = registry.adapters().await?;
    let controller = start_with_identity(
        Options {
            policy_paths: vec![policy],
            // The stand-ins' adapters when there are some; the services file otherwise.
            platforms: if adapters.is_empty() {
                vec![Platform::File(services.clone())]
            } else {
                Vec::new()
            },
            adapters: Adapters(adapters),
            webhooks: None,
            traffic_metrics: None,
            grpc: loopback,
            admin: Some(loopback),
            // Default deny: only the TrafficTarget lets anyone in.
            index: IndexOptions::default(),
        },
        IdentityOptions {
            bootstrap_tokens: Some(bootstrap),
            ..IdentityOptions::default()
        },
        Vec::new(),
    )
    .await?;
    let grpc = controller.grpc;

    let mut web = Vec::new();
    for version in ["v1", "v2"] {
        let app = EchoServer::start(
            loopback,
            Identity {
                service: "web".into(),
                version: version.into(),
            },
        )
        .await?;
        let base = Config {
            inbound: Some(Inbound {
                listen: loopback,
                app: app.addr(),
                protocol: Default::default(),
                policy: Default::default(),
            }),
            workload: Some(Workload {
                kind: "deployment".into(),
                name: format!("web-{version}"),
                namespace: NAMESPACE.into(),
            }),
            ..Config::default()
        };
        let sidecar = Sidecar::start(grpc, "web", base, &tokens["web"]).await?;
        web.push(Web {
            version,
            app,
            sidecar,
        });
    }
    let web: [Web; 2] = web
        .try_into()
        .map_err(|_| anyhow::anyhow!("two versions"))?;
    let mut registered = true;
    for w in &web {
        registered &= registry.register(w.version, w.sidecar.inbound()).await?;
    }
    if !registered {
        write(
            &services,
            &services_yaml(Some([web[0].sidecar.inbound(), web[1].sidecar.inbound()]))?,
        )?;
    }

    let caller = |account: &'static str| {
        let mut base = Config::default();
        base.outbound.http = Some(loopback);
        Sidecar::start(grpc, account, base, &tokens[account])
    };
    let client = caller("client").await?;
    let stranger = caller("stranger").await?;
    let mesh = Mesh {
        dir,
        registry,
        split_file,
        controller,
        web,
        client,
        stranger,
    };
    mesh.ready().await?;
    mesh.print_intro();
    Ok(mesh)
}

/// Polls `check` every 20 ms until it holds, for at most [`READY_WITHIN`].
async fn wait_until(what: &str, check: impl Fn() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while !check() {
        anyhow::ensure!(
            started.elapsed() < READY_WITHIN,
            "{what}: not within {} s",
            READY_WITHIN.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

impl Mesh {
    fn proxies(&self) -> [&Sidecar; 4] {
        [
            &self.web[0].sidecar,
            &self.web[1].sidecar,
            &self.client,
            &self.stranger,
        ]
    }

    /// Every proxy certified, the apps' proxies holding the access policy, the callers' proxies
    /// routing `web.demo` to the inbound proxies.
    async fn ready(&self) -> anyhow::Result<()> {
        for sidecar in self.proxies() {
            wait_until(&format!("the certificate for {}", sidecar.id), || {
                sidecar.certified().as_deref() == Some(&sidecar.id.to_string())
            })
            .await?;
        }
        let client = self.client.id.to_string();
        for web in &self.web {
            wait_until(
                &format!("the access policy at web {}'s proxy", web.version),
                || {
                    web.sidecar
                        .shared()
                        .routes
                        .table
                        .load()
                        .inbound
                        .as_ref()
                        .is_some_and(|p| {
                            p.authorizations
                                .iter()
                                .any(|a| a.identities.contains(&client))
                        })
                },
            )
            .await?;
        }
        for caller in [&self.client, &self.stranger] {
            // Destinations are watched on first use; ask now so the first request is routed.
            caller.controller.resolve(WEB).await;
            self.routed(caller, STEPS[0]).await?;
        }
        Ok(())
    }

    /// Waits until `caller`'s proxy routes `web.demo` with weights `(v1, v2)` to the inbound
    /// proxies over mTLS (a version of weight 0 may be absent).
    async fn routed(&self, caller: &Sidecar, (v1, v2): (u32, u32)) -> anyhow::Result<()> {
        let web_id = self.web[0].sidecar.id.to_string();
        let inbound = [self.web[0].sidecar.inbound(), self.web[1].sidecar.inbound()];
        let routed = || {
            let config = caller.shared().routes.table.load().config();
            let Some(dest) = config.destinations.iter().find(|d| d.authority == WEB) else {
                return false;
            };
            let mut weights = [0u32; 2];
            for (i, name) in ["web-v1", "web-v2"].into_iter().enumerate() {
                let Some(backend) = dest.backends.iter().find(|b| b.name == name) else {
                    continue;
                };
                let to_proxy = backend.endpoints.iter().all(|e| {
                    e.address.parse() == Ok(inbound[i]) && e.identity.as_ref() == Some(&web_id)
                });
                if backend.weight > 0 && (backend.endpoints.is_empty() || !to_proxy) {
                    return false;
                }
                weights[i] = backend.weight;
            }
            let [w1, w2] = weights.map(u64::from);
            w1 + w2 > 0 && w1 * u64::from(v2) == w2 * u64::from(v1)
        };
        wait_until(
            &format!("the split {v1}/{v2} at {}'s proxy", caller.id),
            routed,
        )
        .await
    }

    /// Sets the split and waits until the callers' proxies apply it.
    async fn step(&self, (v1, v2): (u32, u32)) -> anyhow::Result<()> {
        write(&self.split_file, &split_yaml(v1, v2))?;
        self.routed(&self.client, (v1, v2)).await?;
        self.routed(&self.stranger, (v1, v2)).await
    }

    fn print_intro(&self) {
        let admin = self
            .controller
            .admin
            .map(|a| a.to_string())
            .unwrap_or_default();
        let certified = |s: &Sidecar| s.certified().unwrap_or_default();
        println!(
            "trellis demo: a local mesh on loopback ({}), mTLS on every hop, default deny (files in {})",
            self.registry.platform_text(),
            self.dir.path().display()
        );
        println!(
            "  controller  grpc {}  admin {admin}  CA generated in memory  (try: trellis check --admin {admin})",
            self.controller.grpc
        );
        println!(
            "  tokens      bootstrap-tokens.yaml (SHA-256 only); the tokens in tokens/, one per workload"
        );
        for line in self.registry.describe() {
            println!("{line}");
        }
        for web in &self.web {
            println!(
                "  web {}      app {} <- inbound proxy {}  {}  admin {}",
                web.version,
                web.app.addr(),
                web.sidecar.inbound(),
                certified(&web.sidecar),
                web.sidecar.admin()
            );
        }
        for (name, caller) in [("client", &self.client), ("stranger", &self.stranger)] {
            println!(
                "  {name:<10}  outbound proxy {}  {}  admin {}",
                caller.outbound(),
                certified(caller),
                caller.admin()
            );
        }
        println!(
            "  policy      {} (TrafficSplit web), access.yaml (TrafficTarget client -> web, all ports; the stranger is not listed)",
            self.split_file.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic and what the mesh did with it.

async fn send(through: SocketAddr, caller: &str, count: u32) -> anyhow::Result<CallReport> {
    call(&CallPlan {
        url: format!("http://{WEB}/"),
        count,
        method: "GET".into(),
        caller: Some(caller.into()),
        headers: Default::default(),
        proxy: Some(through),
        timeout_ms: Some(5000),
        concurrency: None,
    })
    .await
}

/// Answers per `service/version`, plus `failed` for requests without an echo reply.
async fn send_counts(mesh: &Mesh, count: u32) -> anyhow::Result<BTreeMap<String, u32>> {
    let report = send(mesh.client.outbound(), "client", count).await?;
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

/// What the stranger's calls got, and what the apps recorded from it.
struct Denial {
    calls: u32,
    forbidden: u32,
    other: BTreeMap<String, u32>,
    recorded_by_apps: u64,
}

impl Denial {
    fn ok(&self) -> bool {
        self.forbidden == self.calls && self.other.is_empty() && self.recorded_by_apps == 0
    }

    fn line(&self) -> String {
        let other = if self.other.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self
                .other
                .iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect();
            format!(", other answers: {}", list.join(", "))
        };
        format!(
            "denied: demo/stranger -> {WEB}: {}/{} answered 403 x-trellis-error: forbidden{other}; the apps recorded {} requests from it  {}",
            self.forbidden,
            self.calls,
            self.recorded_by_apps,
            if self.ok() { "ok" } else { "LEAKED" }
        )
    }
}

async fn app_counts(app: &EchoServer) -> anyhow::Result<Counts> {
    let reply = request(app.addr(), Method::GET, "/_echo/counts", None).await?;
    serde_json::from_slice(&reply.body)
        .with_context(|| format!("the counts of the app at {}: {}", app.addr(), reply.text()))
}

/// The stranger (certified, but named by no TrafficTarget) calls `web`.
async fn deny(mesh: &Mesh) -> anyhow::Result<Denial> {
    let report = send(mesh.stranger.outbound(), "stranger", STRANGER_CALLS).await?;
    let forbidden = report
        .statuses
        .get(&403)
        .copied()
        .unwrap_or(0)
        .min(report.mesh_errors.get("forbidden").copied().unwrap_or(0));
    let mut other = BTreeMap::new();
    for (status, n) in &report.statuses {
        if *status != 403 {
            other.insert(format!("HTTP {status}"), *n);
        }
    }
    for (reason, n) in &report.mesh_errors {
        if reason != "forbidden" {
            other.insert(format!("x-trellis-error {reason}"), *n);
        }
    }
    if report.failed > 0 {
        other.insert("no answer".into(), report.failed);
    }
    let mut recorded_by_apps = 0;
    for web in &mesh.web {
        let counts = app_counts(&web.app).await?;
        recorded_by_apps += counts.by_caller.get("stranger").copied().unwrap_or(0);
    }
    Ok(Denial {
        calls: STRANGER_CALLS,
        forbidden,
        other,
        recorded_by_apps,
    })
}

/// Counters summed over every proxy's `/metrics`.
#[derive(Debug, Default)]
struct MeshMetrics {
    handshakes_outbound: u64,
    handshakes_inbound: u64,
    handshake_errors: u64,
    inbound_allowed: u64,
    inbound_forbidden: u64,
}

impl MeshMetrics {
    async fn read(mesh: &Mesh) -> anyhow::Result<Self> {
        let mut m = Self::default();
        for sidecar in mesh.proxies() {
            let reply = request(sidecar.admin(), Method::GET, "/metrics", None).await?;
            anyhow::ensure!(
                reply.status == 200,
                "/metrics of {}: HTTP {}",
                sidecar.id,
                reply.status
            );
            let text = reply.text();
            let sum = |name: &str, labels: &[(&str, &str)]| metric_sum(&text, name, labels);
            m.handshakes_outbound +=
                sum("trellis_tls_handshakes_total", &[("direction", "outbound")]);
            m.handshakes_inbound +=
                sum("trellis_tls_handshakes_total", &[("direction", "inbound")]);
            m.handshake_errors += sum("trellis_tls_handshake_errors_total", &[]);
            m.inbound_allowed += sum(
                "trellis_request_total",
                &[("direction", "inbound"), ("response_code", "200")],
            );
            m.inbound_forbidden += sum(
                "trellis_request_total",
                &[("direction", "inbound"), ("error", "forbidden")],
            );
        }
        Ok(m)
    }

    fn line(&self) -> String {
        format!(
            "metrics: mTLS handshakes {} outbound / {} inbound, {} failed; inbound requests {} allowed (200), {} denied (403 forbidden)   (the proxies' /metrics)",
            self.handshakes_outbound,
            self.handshakes_inbound,
            self.handshake_errors,
            self.inbound_allowed,
            self.inbound_forbidden
        )
    }
}

/// The sum of the samples of `name` whose labels include every `(key, value)` in `labels`, in
/// the Prometheus text format the proxies serve.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut total = 0.0;
    for sample in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = sample.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.rsplit_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue, // another metric with this prefix
        };
        let has = |(key, value): &(&str, &str)| {
            let wanted = format!("{key}=\"{value}\"");
            label_text.split(',').any(|pair| pair.trim() == wanted)
        };
        if labels.iter().all(has) {
            total += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    total.round() as u64
}

// ---------------------------------------------------------------------------------------------
// The two modes.

async fn demo(args: &Args) -> anyhow::Result<ExitCode> {
    let mesh = mesh(args.platform).await?;
    if args.once {
        return once(&mesh, args.requests).await;
    }
    println!("Ctrl-C to stop. Edit the split file to try your own weights.");
    let step_time = Duration::from_secs_f64(args.step_seconds.max(0.5));
    loop {
        for (step, &weights) in STEPS.iter().enumerate() {
            mesh.step(weights).await?;
            let started = Instant::now();
            let mut counts = BTreeMap::new();
            while started.elapsed() < step_time {
                for (k, n) in send_counts(&mesh, 10).await? {
                    *counts.entry(k).or_insert(0) += n;
                }
                print!("\r{}", line(step, weights, &counts));
                std::io::stdout().flush()?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!();
        }
        println!("{}", deny(&mesh).await?.line());
        println!("{}", MeshMetrics::read(&mesh).await?.line());
    }
}

async fn once(mesh: &Mesh, requests: u32) -> anyhow::Result<ExitCode> {
    let mut followed = true;
    let mut answered = 0u64;
    for (step, &(v1, v2)) in STEPS.iter().enumerate() {
        mesh.step((v1, v2)).await?;
        let counts = send_counts(mesh, requests).await?;
        let get = |k: &str| counts.get(k).copied().unwrap_or(0);
        let expected_v1 = requests * v1 / (v1 + v2);
        let ok = get("web/v1") == expected_v1 && get("web/v2") == requests - expected_v1;
        followed &= ok;
        answered += u64::from(get("web/v1") + get("web/v2"));
        println!(
            "{}  {}",
            line(step, (v1, v2), &counts),
            if ok { "ok" } else { "MISMATCH" }
        );
    }
    let denial = deny(mesh).await?;
    println!("{}", denial.line());
    let metrics = MeshMetrics::read(mesh).await?;
    // Every answered request crossed an inbound proxy and every stranger call was refused by
    // one; handshakes happened (the apps' proxies admit no plaintext) and none failed.
    let counted = metrics.inbound_allowed == answered
        && metrics.inbound_forbidden == u64::from(denial.forbidden)
        && metrics.handshakes_inbound > 0
        && metrics.handshake_errors == 0;
    println!(
        "{}  {}",
        metrics.line(),
        if counted { "ok" } else { "MISMATCH" }
    );
    println!(
        "summary: {} steps, {requests} requests each: {}; {}; {}",
        STEPS.len(),
        if followed {
            "traffic followed the weights"
        } else {
            "traffic did NOT follow the weights"
        },
        if denial.ok() {
            "the stranger was denied and nothing leaked"
        } else {
            "the stranger was NOT denied every time, or a request leaked"
        },
        if counted {
            "the proxies' metrics agree"
        } else {
            "the proxies' metrics do NOT agree"
        }
    );
    Ok(if followed && denial.ok() && counted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_match_whole_names_and_labels() {
        let text = "# HELP trellis_request_total x\n\
            trellis_request_total{direction=\"inbound\",response_code=\"200\",error=\"\"} 3\n\
            trellis_request_total{direction=\"inbound\",response_code=\"403\",error=\"forbidden\"} 2\n\
            trellis_request_total{direction=\"outbound\",response_code=\"200\",error=\"\"} 7\n\
            trellis_request_total_other{direction=\"inbound\"} 100\n\
            trellis_tls_handshake_errors_total 0\n\
            # EOF\n";
        let sum = |labels: &[(&str, &str)]| metric_sum(text, "trellis_request_total", labels);
        assert_eq!(sum(&[]), 12);
        assert_eq!(sum(&[("direction", "inbound")]), 5);
        assert_eq!(
            sum(&[("direction", "inbound"), ("response_code", "200")]),
            3
        );
        assert_eq!(sum(&[("error", "forbidden")]), 2);
        assert_eq!(
            metric_sum(text, "trellis_tls_handshake_errors_total", &[]),
            0
        );
    }

    #[test]
    fn a_denial_is_ok_only_when_every_call_was_forbidden_and_none_arrived() {
        let denial = |forbidden, other: &[(&str, u32)], recorded_by_apps| Denial {
            calls: 5,
            forbidden,
            other: other.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect(),
            recorded_by_apps,
        };
        assert!(denial(5, &[], 0).ok());
        assert!(denial(5, &[], 0).line().ends_with("  ok"));
        assert!(!denial(4, &[("HTTP 200", 1)], 1).ok());
        assert!(!denial(5, &[], 1).ok());
        assert!(!denial(0, &[("HTTP 503", 5), ("x-trellis-error no-identity", 5)], 0).ok());
        let leaked = denial(4, &[("HTTP 200", 1)], 1).line();
        assert!(leaked.contains("4/5 answered 403") && leaked.contains("HTTP 200 x1"));
        assert!(leaked.ends_with("LEAKED"), "{leaked}");
    }

    #[test]
    fn services_point_web_at_the_inbound_proxies() {
        let a: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:4002".parse().unwrap();
        let text = services_yaml(Some([a, b])).unwrap();
        assert!(text.contains("port: 4001\n        service_account: web"));
        assert!(text.contains("port: 4002\n        service_account: web"));
        assert!(!text.contains("18081") && !text.contains("18082"));
    }
}
