//! One conformance mesh, on loopback or on hosts ([`super::hosts`]): a platform, the controller process reading it, and the
//! workloads of the SMI conformance suite, each a real process behind its own `trellis-proxy`.
//!
//! ```text
//!  test (the app of app-a / app-d) ──> proxy app-a ──┐            ┌─> proxy app-b ──> echo app-b (version b)
//!                                    proxy app-d ──┘─ app-svc ──┴─> proxy app-c ──> echo app-c (version c)
//! ```
//!
//! Services: `app-svc` (the root: the b and c pods), `app-b`, `app-c`. Every pod runs as its own
//! ServiceAccount (`service-a`, `service-b`, `service-c`, `service-d`), so the root's endpoints
//! carry the same identity as the backend's. Each pod has its own address (on loopback
//! `127.0.<subnet>.<n>`, on hosts its namespace's `198.18.<subnet>.<n>`) and all pods share one
//! inbound port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::hosts::{Hosts, Network};
use super::platform::{
    Instance, NAMESPACE, Platform, PlatformKind, ServiceSpec, Started, services_yaml, write_atomic,
};
use super::process::{self, Process};
use trellis_echo::client::{self, CallPlan, CallReport};
use trellis_echo::echo::Counts;
use trellis_echo::plain as http;

/// How the mesh decides who may call whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// `trellis controller --permissive`: inbound calls no TrafficTarget allows are allowed;
    /// proxies have no identity and talk plaintext.
    Permissive,
    /// Default deny, as the spec says: every proxy proves who it is (`--identity-token-file`: a
    /// ServiceAccount token checked with TokenReview on the Kubernetes fake, a bootstrap token
    /// listed in the controller's `--bootstrap-tokens` elsewhere), gets a certificate from the
    /// controller's CA and talks mTLS; only TrafficTargets let calls in.
    Identity,
}

/// The trust domain of every identity in the mesh.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The caller workloads: (workload, ServiceAccount, last address byte).
pub const CALLERS: [(&str, &str, u8); 2] = [("app-a", "service-a", 1), ("app-d", "service-d", 4)];
/// The server workloads: (workload, ServiceAccount, version, last address byte).
pub const SERVERS: [(&str, &str, &str, u8); 2] = [
    ("app-b", "service-b", "b", 2),
    ("app-c", "service-c", "c", 3),
];
/// The root service whose endpoints are the b and c pods.
pub const ROOT: &str = "app-svc";

/// A workload's processes and addresses.
#[derive(Debug)]
pub struct Workload {
    pub name: String,
    pub service_account: String,
    pub proxy: Process,
    /// The proxy's admin listener (`/metrics`, `/config`).
    pub admin: SocketAddr,
    /// The outbound HTTP listener (callers).
    pub outbound: Option<SocketAddr>,
    /// The inbound listener in front of the app (servers).
    pub inbound: Option<SocketAddr>,
    pub echo: Option<(Process, SocketAddr)>,
}

/// A running mesh; every process stops when it is dropped.
#[derive(Debug)]
pub struct Mesh {
    pub platform: Platform,
    pub security: Security,
    pub controller: Process,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub workloads: BTreeMap<String, Workload>,
    pub services: Vec<ServiceSpec>,
    /// With [`Security::Identity`]: the token file of each ServiceAccount.
    tokens: BTreeMap<String, PathBuf>,
    log_dir: PathBuf,
    _dir: tempfile::TempDir,
    /// Where everything runs; last, so the hosts go after the processes on them.
    pub network: Network,
}

/// The hosts of a mesh on hosts: one per role.
pub const HOSTS: [&str; 7] = [
    "controller",
    "registry",
    "app-a",
    "app-b",
    "app-c",
    "app-d",
    "outsider",
];

/// Where the harness writes logs and the table: `<target dir>/conformance`.
pub fn output_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target
    let target = exe
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    target.join("conformance")
}

impl Mesh {
    /// Starts a mesh on `kind`: `Ok(Err(reason))` when the platform is not available here.
    pub async fn start(
        kind: PlatformKind,
        security: Security,
    ) -> anyhow::Result<Result<Self, String>> {
        let log_dir = output_dir().join(kind.name());
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let dir = tempfile::tempdir()?;
        let network = if kind.on_hosts() {
            match Hosts::create(kind.subnet(), &HOSTS)? {
                Ok(hosts) => Network::Hosts(hosts),
                Err(reason) => return Ok(Err(reason)),
            }
        } else {
            Network::Loopback {
                subnet: kind.subnet(),
            }
        };
        let platform = match Platform::start(kind, dir.path(), &log_dir, &network).await? {
            Started::Ready(p) => *p,
            Started::Skipped(reason) => return Ok(Err(reason)),
        };

        let (mut args, env) = platform.controller_args();
        let place = if kind.controller_in_test_namespace() {
            network.test_place()
        } else {
            network.place("controller", None)?
        };
        let any_port = SocketAddr::new(place.ip, 0).to_string();
        args.splice(
            0..0,
            [
                "controller".into(),
                "--grpc".into(),
                any_port.clone(),
                "--admin".into(),
                any_port,
            ],
        );
        let mut tokens = BTreeMap::new();
        match security {
            Security::Permissive => args.push("--permissive".into()),
            Security::Identity => {
                let (files, bootstrap) = write_tokens(&platform, dir.path())?;
                tokens = files;
                args.extend(["--trust-domain".into(), TRUST_DOMAIN.into()]);
                if let Some(bootstrap) = bootstrap {
                    args.extend(["--bootstrap-tokens".into(), bootstrap.display().to_string()]);
                }
            }
        }
        let mut controller = Process::spawn_in(
            place.netns.as_deref(),
            "controller",
            &process::binary(process::TRELLIS)?,
            &args,
            &env,
            &log_dir,
        )?;
        let grpc = controller
            .wait_line("`grpc listening on ADDR`", process::START_TIMEOUT, |l| {
                l.strip_prefix("grpc listening on ")?.parse().ok()
            })
            .await?;
        let admin = controller
            .wait_line("`admin listening on ADDR`", process::START_TIMEOUT, |l| {
                l.strip_prefix("admin listening on ")?.parse().ok()
            })
            .await?;

        let mut mesh = Mesh {
            platform,
            security,
            controller,
            grpc,
            admin,
            workloads: BTreeMap::new(),
            services: Vec::new(),
            tokens,
            log_dir,
            _dir: dir,
            network,
        };
        // Servers first: the first binds a free port, the others take the same port on their
        // own address.
        let mut port = 0;
        for (name, sa, version, n) in SERVERS {
            let echo = mesh.start_echo(name, version).await?;
            let listen = SocketAddr::new(mesh.network.place(name, Some(n))?.ip, port);
            let w = mesh
                .start_proxy(name, sa, Some((listen, echo.1)), false)
                .await?;
            port = w.inbound.context("server proxy without inbound")?.port();
            mesh.workloads.insert(
                name.to_owned(),
                Workload {
                    echo: Some(echo),
                    ..w
                },
            );
        }
        for (name, sa, _) in CALLERS {
            let w = mesh.start_proxy(name, sa, None, true).await?;
            mesh.workloads.insert(name.to_owned(), w);
        }
        mesh.services = mesh.service_specs();
        mesh.platform.register(&mesh.services).await?;
        Ok(Ok(mesh))
    }

    fn service_specs(&self) -> Vec<ServiceSpec> {
        let instance = |name: &str| -> Instance {
            let w = &self.workloads[name];
            let version = SERVERS.iter().find(|s| s.0 == name).map_or("v1", |s| s.2);
            Instance {
                pod: format!("{name}-0"),
                address: w.inbound.expect("servers have an inbound listener"),
                service_account: w.service_account.clone(),
                version: version.to_owned(),
            }
        };
        let mut specs = vec![ServiceSpec {
            name: ROOT.into(),
            instances: SERVERS.iter().map(|s| instance(s.0)).collect(),
        }];
        for (name, ..) in SERVERS {
            specs.push(ServiceSpec {
                name: name.into(),
                instances: vec![instance(name)],
            });
        }
        specs
    }

    async fn start_echo(&self, name: &str, version: &str) -> anyhow::Result<(Process, SocketAddr)> {
        let place = self.network.place(name, None)?;
        let mut echo = Process::spawn_in(
            place.netns.as_deref(),
            &format!("echo-{name}"),
            &process::binary(process::ECHO)?,
            &[
                "--service".into(),
                name.into(),
                "--version".into(),
                version.into(),
                "--listen".into(),
                SocketAddr::new(place.ip, 0).to_string(),
            ],
            &[],
            &self.log_dir,
        )?;
        let addr = echo.listening_on().await?;
        Ok((echo, addr))
    }

    async fn start_proxy(
        &self,
        name: &str,
        service_account: &str,
        inbound: Option<(SocketAddr, SocketAddr)>,
        outbound: bool,
    ) -> anyhow::Result<Workload> {
        let place = self.network.place(name, None)?;
        let any_port = SocketAddr::new(place.ip, 0).to_string();
        let mut args: Vec<String> = vec![
            "--controller".into(),
            format!("http://{}", self.grpc),
            "--workload".into(),
            format!("{NAMESPACE}/{service_account}"),
            "--admin".into(),
            any_port.clone(),
            "--threads".into(),
            "1".into(),
        ];
        if outbound {
            args.extend(["--outbound-http".into(), any_port]);
        }
        if let Some(token) = self.tokens.get(service_account) {
            args.extend([
                "--identity-token-file".into(),
                token.display().to_string(),
                "--trust-domain".into(),
                TRUST_DOMAIN.into(),
            ]);
        }
        if let Some((listen, app)) = inbound {
            args.extend(["--inbound".into(), format!("{listen}={app}")]);
        }
        let mut proxy = Process::spawn_in(
            place.netns.as_deref(),
            &format!("proxy-{name}"),
            &process::binary(process::PROXY)?,
            &args,
            &[],
            &self.log_dir,
        )?;
        let line = proxy
            .wait_line("`trellis-proxy started`", process::START_TIMEOUT, |line| {
                line.contains("trellis-proxy started")
                    .then(|| line.to_owned())
            })
            .await?;
        if self.tokens.contains_key(service_account) {
            // A proxy with an identity serves mTLS only once it holds its certificate; until then
            // handshakes to it fail closed. Scenarios start after every proxy has one, so the
            // mTLS row counts no handshake error that is only the mesh still starting. The proxy
            // prints the line once the certificate is in force (published), not merely received:
            // printed earlier, a server proxy still publishing refused the caller's first
            // handshake (`app-a: 2 outbound mTLS handshakes, 1 errors`, the row's old flake).
            proxy
                .wait_line("`certificate obtained`", process::START_TIMEOUT, |line| {
                    line.contains("certificate obtained").then_some(())
                })
                .await?;
        }
        let addr = |key: &str, wanted: bool| -> anyhow::Result<Option<SocketAddr>> {
            match (process::traced_addr(&line, key), wanted) {
                (Some(a), true) => Ok(Some(a)),
                (None, false) => Ok(None),
                (None, true) => bail!("proxy-{name} printed no {key} address: {line}"),
                (Some(a), false) => bail!("proxy-{name} has an unexpected {key} listener {a}"),
            }
        };
        Ok(Workload {
            name: name.to_owned(),
            service_account: service_account.to_owned(),
            admin: addr("admin", true)?.context("proxy admin address")?,
            outbound: addr("http", outbound)?,
            inbound: addr("inbound", inbound.is_some())?,
            echo: None,
            proxy,
        })
    }

    /// Sends `count` requests from `caller` (through its proxy, on one keep-alive connection) to
    /// `http://<service>.default<path>`.
    pub async fn call(&self, caller: &str, request: &Call) -> anyhow::Result<CallReport> {
        let w = self
            .workloads
            .get(caller)
            .with_context(|| format!("no workload {caller}"))?;
        let proxy = w
            .outbound
            .with_context(|| format!("{caller} has no outbound listener"))?;
        client::run(&CallPlan {
            url: format!("http://{}.{NAMESPACE}{}", request.service, request.path),
            count: request.count,
            method: request.method.clone(),
            caller: Some(caller.to_owned()),
            headers: request.headers.clone(),
            proxy: Some(proxy),
            timeout_ms: Some(3000),
            concurrency: Some(request.concurrency),
        })
        .await
    }

    /// What a server workload's app has received (read from the app directly).
    pub async fn counts(&self, server: &str) -> anyhow::Result<Counts> {
        let addr = self.echo_addr(server)?;
        let reply = http::request(addr, http::Method::GET, "/_echo/counts", None).await?;
        serde_json::from_slice(&reply.body)
            .with_context(|| format!("counts of {server}: {}", reply.text()))
    }

    /// The value of a counter on a workload's proxy `/metrics`, summed over the series whose
    /// labels contain every one of `labels` (e.g. `direction="inbound"`).
    pub async fn proxy_counter(
        &self,
        workload: &str,
        name: &str,
        labels: &[&str],
    ) -> anyhow::Result<f64> {
        Ok(self
            .proxy_series(workload, name, labels)
            .await?
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// The lines of a metric on a workload's proxy `/metrics` whose labels contain every one of
    /// `labels`, as exposed (for failure messages that must say which series moved).
    pub async fn proxy_series(
        &self,
        workload: &str,
        name: &str,
        labels: &[&str],
    ) -> anyhow::Result<Vec<String>> {
        let w = self
            .workloads
            .get(workload)
            .with_context(|| format!("no workload {workload}"))?;
        let reply = http::request(w.admin, http::Method::GET, "/metrics", None).await?;
        Ok(reply
            .text()
            .lines()
            .filter(|l| {
                l.starts_with(name)
                    && l[name.len()..].starts_with(['{', ' '])
                    && labels.iter().all(|want| l.contains(want))
            })
            .map(str::to_owned)
            .collect())
    }

    /// Starts a caller outside this mesh's trust: its own controller (file platform, its own
    /// generated CA, the same services file this mesh registered) and a proxy that proves
    /// `service-a` to that controller. Its certificate chains to a foreign CA.
    pub async fn start_foreign_caller(&self) -> anyhow::Result<ForeignCaller> {
        use sha2::Digest as _;
        let place = self.network.place("outsider", None)?;
        let any_port = SocketAddr::new(place.ip, 0).to_string();
        let dir = tempfile::tempdir()?;
        let services = dir.path().join("services.yaml");
        write_atomic(&services, &services_yaml(&self.services))?;
        let token = hex::encode(rand::random::<[u8; 32]>());
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, &token)?;
        let policy = dir.path().join("policy");
        std::fs::create_dir(&policy)?;
        let bootstrap = dir.path().join("bootstrap-tokens.yaml");
        std::fs::write(
            &bootstrap,
            format!(
                "tokens:\n- workload: {NAMESPACE}/service-a\n  sha256: {}\n",
                hex::encode(sha2::Sha256::digest(token.as_bytes()))
            ),
        )?;
        let mut controller = Process::spawn_in(
            place.netns.as_deref(),
            "foreign-controller",
            &process::binary(process::TRELLIS)?,
            &[
                "controller".into(),
                "--grpc".into(),
                any_port.clone(),
                "--admin".into(),
                any_port.clone(),
                "--platform".into(),
                format!("file={}", services.display()),
                "--policy".into(),
                policy.display().to_string(),
                "--trust-domain".into(),
                TRUST_DOMAIN.into(),
                "--bootstrap-tokens".into(),
                bootstrap.display().to_string(),
            ],
            &[],
            &self.log_dir,
        )?;
        let grpc: SocketAddr = controller
            .wait_line("`grpc listening on ADDR`", process::START_TIMEOUT, |l| {
                l.strip_prefix("grpc listening on ")?.parse().ok()
            })
            .await?;
        let mut proxy = Process::spawn_in(
            place.netns.as_deref(),
            "foreign-proxy",
            &process::binary(process::PROXY)?,
            &[
                "--controller".into(),
                format!("http://{grpc}"),
                "--workload".into(),
                format!("{NAMESPACE}/service-a"),
                "--admin".into(),
                any_port.clone(),
                "--threads".into(),
                "1".into(),
                "--outbound-http".into(),
                any_port.clone(),
                "--identity-token-file".into(),
                token_file.display().to_string(),
                "--trust-domain".into(),
                TRUST_DOMAIN.into(),
            ],
            &[],
            &self.log_dir,
        )?;
        let outbound = proxy
            .wait_line("`trellis-proxy started`", process::START_TIMEOUT, |line| {
                process::traced_addr(line, "http")
            })
            .await?;
        Ok(ForeignCaller {
            _controller: controller,
            _proxy: proxy,
            outbound,
            _dir: dir,
        })
    }

    /// Zeroes what every server app has counted.
    pub async fn reset_counts(&self) -> anyhow::Result<()> {
        for (name, ..) in SERVERS {
            let addr = self.echo_addr(name)?;
            http::request(addr, http::Method::POST, "/_echo/reset", None).await?;
        }
        Ok(())
    }

    fn echo_addr(&self, server: &str) -> anyhow::Result<SocketAddr> {
        self.workloads
            .get(server)
            .and_then(|w| w.echo.as_ref())
            .map(|e| e.1)
            .with_context(|| format!("{server} has no app"))
    }

    /// The log files and their last lines, for a failure report.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = format!("logs in {}\n", self.log_dir.display());
        let mut paths: Vec<&Path> = vec![self.controller.log_path()];
        for w in self.workloads.values() {
            paths.push(w.proxy.log_path());
            if let Some((echo, _)) = &w.echo {
                paths.push(echo.log_path());
            }
        }
        for p in paths {
            out.push_str(&format!(
                "--- {} (last {lines} lines)\n{}\n",
                p.display(),
                process::tail(p, lines)
            ));
        }
        out
    }

    /// Deletes what the mesh created outside its processes (a real cluster's objects).
    pub async fn cleanup(&self) {
        self.platform.cleanup(&self.services).await;
    }
}

/// Writes one token file per ServiceAccount of the mesh under `<dir>/tokens`: a ServiceAccount
/// token where the platform issues them, else a random bootstrap token whose SHA-256 goes into
/// the bootstrap tokens file (returned when there is one). The controller never sees a token in
/// clear.
fn write_tokens(
    platform: &Platform,
    dir: &Path,
) -> anyhow::Result<(BTreeMap<String, PathBuf>, Option<PathBuf>)> {
    use sha2::Digest as _;
    let token_dir = dir.join("tokens");
    std::fs::create_dir_all(&token_dir)?;
    let accounts = CALLERS
        .iter()
        .map(|c| c.1)
        .chain(SERVERS.iter().map(|s| s.1));
    let mut files = BTreeMap::new();
    let mut bootstrap = String::from("tokens:\n");
    let mut any_bootstrap = false;
    for sa in accounts {
        let token = match platform.service_account_token(sa) {
            Some(token) => token,
            None => {
                let token = hex::encode(rand::random::<[u8; 32]>());
                let digest = hex::encode(sha2::Sha256::digest(token.as_bytes()));
                bootstrap.push_str(&format!(
                    "- workload: {NAMESPACE}/{sa}\n  sha256: {digest}\n"
                ));
                any_bootstrap = true;
                token
            }
        };
        let path = token_dir.join(sa);
        std::fs::write(&path, &token).with_context(|| format!("writing {}", path.display()))?;
        files.insert(sa.to_owned(), path);
    }
    let bootstrap_path = any_bootstrap
        .then(|| dir.join("bootstrap-tokens.yaml"))
        .map(|path| std::fs::write(&path, bootstrap).map(|()| path))
        .transpose()?;
    Ok((files, bootstrap_path))
}

/// A caller certified by a CA this mesh does not trust; its processes stop when dropped.
#[derive(Debug)]
pub struct ForeignCaller {
    _controller: Process,
    _proxy: Process,
    /// Its proxy's outbound HTTP listener.
    pub outbound: SocketAddr,
    _dir: tempfile::TempDir,
}

/// One batch of requests.
#[derive(Clone, Debug)]
pub struct Call {
    pub service: String,
    pub path: String,
    pub method: String,
    pub headers: BTreeMap<String, String>,
    pub count: u32,
    /// Connections sending at once (1: all `count` requests in order on one connection).
    pub concurrency: u32,
}

impl Call {
    /// `count` GETs of `path` on `service`.
    pub fn get(service: &str, path: &str, count: u32) -> Self {
        Call {
            service: service.into(),
            path: path.into(),
            method: "GET".into(),
            headers: BTreeMap::new(),
            count,
            concurrency: 1,
        }
    }

    /// With the request header `name: value`.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Shared among `lanes` connections sending at once.
    pub fn concurrency(mut self, lanes: u32) -> Self {
        self.concurrency = lanes;
        self
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = method.into();
        self
    }

    pub fn count(mut self, count: u32) -> Self {
        self.count = count;
        self
    }
}

/// How long a change may take to show (the SMI conformance suite's wait).
pub const APPLY_WITHIN: Duration = Duration::from_secs(5);
