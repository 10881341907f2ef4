//! Interception for real, in Linux network namespaces.
//!
//! ```text
//!   test process 198.18.S.1 ── bridge ── controller   (trellis controller, file platform + SMI dir)
//!                                    ├── services     (holds the virtual address of `app`, .200)
//!                                    ├── plain        (a server outside the mesh, :9000)
//!                                    ├── pod-a        (client: curl; proxy as service-a)
//!                                    ├── pod-b        (echo app-b :8080; proxy as service-b)
//!                                    ├── pod-c        (echo app-c :8080; proxy as service-c)
//!                                    └── pod-d        (client; proxy as service-d, not allowed)
//! ```
//!
//! Every pod gets the init container's rules (`trellis-init` with `InterceptRules::args()`; nat:
//! its outbound TCP but UID 1337's to 15001, inbound TCP but the admin port's to 15006) and a proxy running as UID 1337 with
//! `--outbound-transparent 127.0.0.1:15001 --inbound-transparent 0.0.0.0:15006`. The client is
//! `curl http://<virtual address>:80/`: it knows nothing of any proxy. Checked: the TrafficSplit
//! (0:100 then 100:0), the TrafficTarget (service-a 200, service-d 403), an address the mesh
//! does not know reached unchanged, a caller without mesh identity refused at a pod, the loop
//! guard (a connection to the outbound listener itself refused), and that the proxy's own
//! upstream connections are not intercepted again (its transparent listener accepted exactly the
//! client's connections).
//!
//! UDP (UDPRoute) through the same mesh: pod-b also runs a UDP echo on :5353; the client pods'
//! proxies carry their local UDP port 5300 to `app-b.default:5353` (`--udp`). The tunnel
//! reaches pod-b's address as TCP, is intercepted there like any inbound connection, and is
//! authorized by the controller's compilation of a TrafficTarget with a UDPRoute rule (asked for
//! the UDP port on demand, as a transparent port's policy is): service-a's datagrams are echoed,
//! service-d's are not. The callers' UDP to the UDPRoute's port is intercepted as well
//! (`trellis-init --udp-ports`: TPROXY to `--udp-transparent`, the proxies keeping
//! `CAP_NET_ADMIN`), so the same holds for datagrams sent to the UDP service's virtual address,
//! whose answers come back from that address.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use trellis_conformance::harness::hosts::Hosts;
use trellis_conformance::harness::process::{self, Process};
use trellis_intercept::InterceptRules;

const TRUST_DOMAIN: &str = "cluster.local";
const PROXY_UID: u32 = 1337;
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PORT: u16 = 15006;
const ADMIN_PORT: u16 = 15020;
/// The port of `app` (and of its backends) on its virtual address.
const SERVICE_PORT: u16 = 80;
/// The port the echo apps listen on in their pods.
const APP_PORT: u16 = 8080;
/// The port of the server outside the mesh.
const PLAIN_PORT: u16 = 9000;
/// The port of the server outside the mesh that an ExternalService declares (on `plain`).
const DECLARED_PORT: u16 = 9100;
/// Last octet of an address nobody holds: a declared host resolved to it by the client is
/// still reached, by its name.
const UNHELD_OCTET: u8 = 203;

/// The UDP port of pod-b's UDP echo (the UDPRoute's port).
const UDP_APP_PORT: u16 = 5353;
/// The local UDP port the client pods' proxies carry to `app-b.default:5353`.
const UDP_LOCAL_PORT: u16 = 5300;
/// The proxies' transparent UDP listener (the rules' default TPROXY port).
const UDP_TRANSPARENT_PORT: u16 = 15009;
/// Last octet of the virtual address of `app-udp`, the UDP service (its datagrams never leave
/// the calling pod: the rules hand them to its proxy).
const UDP_VIP_OCTET: u8 = 202;
/// The IPv6 prefix of the pods that also get an IPv6 address (a ULA; held by this test's
/// namespaces only): the IPv6 rules and `IP6T_SO_ORIGINAL_DST` are exercised too.
const V6_PREFIX: &str = "fd7e:7472:656c::";
/// Last octet of the service's virtual address on the topology's /24 (held by `services`).
const VIP_OCTET: u8 = 200;
/// Last octet of the virtual address of a service created (and deleted) while the mesh runs.
const LATE_VIP_OCTET: u8 = 201;

/// Pods: (host, service account, echo service it runs, if any).
const PODS: [(&str, &str, Option<&str>); 4] = [
    ("pod-a", "service-a", None),
    ("pod-b", "service-b", Some("app-b")),
    ("pod-c", "service-c", Some("app-c")),
    ("pod-d", "service-d", None),
];

/// The init container's rules: `trellis-init` itself, run in the pod's namespace with the
/// arguments the injector writes (`InterceptRules::args`), the defaults: proxy UID 1337, outbound
/// 15001, inbound 15006, the admin port 15020 skipped.
fn install_rules(netns: &str, udp_ports: &[u16]) -> anyhow::Result<()> {
    let rules = InterceptRules {
        udp_ports: udp_ports.to_vec(),
        ..InterceptRules::default()
    };
    assert_eq!(rules.udp_port, UDP_TRANSPARENT_PORT);
    assert_eq!(
        (rules.proxy_uid, rules.outbound_port, rules.inbound_port),
        (PROXY_UID, OUTBOUND_PORT, INBOUND_PORT),
        "the test's ports are the rules' defaults"
    );
    assert!(rules.skip_inbound_ports.contains(&ADMIN_PORT));
    let init = process::binary(("trellis-init", "trellis-intercept"))?;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(&init)
        .args(rules.args())
        .output()
        .context("running trellis-init")?;
    if !out.status.success() {
        bail!(
            "trellis-init in {netns}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What one call answered: the status and, for an echo reply, the service that answered.
#[derive(Debug)]
struct Answer {
    status: u16,
    service: Option<String>,
    body: String,
}

/// `curl` in `netns` (as root: an application, redirected like any), one connection per URL.
async fn curl(netns: &str, urls: &[String]) -> anyhow::Result<Vec<Answer>> {
    curl_with(netns, &[], urls).await
}

/// [`curl`] with `extra` arguments before the URLs (e.g. `--resolve`).
async fn curl_with(netns: &str, extra: &[String], urls: &[String]) -> anyhow::Result<Vec<Answer>> {
    const MARK: &str = "\n@@";
    let mut args: Vec<String> = [
        "netns",
        "exec",
        netns,
        "curl",
        "-sS",
        "-g",
        "--max-time",
        "10",
        "-H",
        "Connection: close",
        "-w",
        "\n@@%{http_code}@@\n",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().cloned());
    args.extend(urls.iter().cloned());
    let out = tokio::process::Command::new("ip")
        .args(&args)
        .output()
        .await
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut answers = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find(MARK) {
        let body = rest[..i].to_owned();
        let after = &rest[i + MARK.len()..];
        let end = after.find("@@").context("curl output: unterminated code")?;
        let status = after[..end].parse().unwrap_or(0);
        // Exactly the `-w` format's own newline: the next body may be empty.
        let tail = &after[end + 2..];
        rest = tail.strip_prefix('\n').unwrap_or(tail);
        let service = serde_json::from_str::<trellis_echo::echo::EchoReply>(&body)
            .ok()
            .map(|r| r.service);
        answers.push(Answer {
            status,
            service,
            body,
        });
    }
    if answers.len() != urls.len() {
        bail!(
            "curl in {netns}: {} answers for {} URLs; stdout {text:?}, stderr {}",
            answers.len(),
            urls.len(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(answers)
}

/// A plain HTTP/1.1 GET from the test process: (status, head and body).
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}"))??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .with_context(|| format!("reading GET {path} from {addr}"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

/// The value of a Prometheus sample line `name{labels} value` in `metrics`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.trim();
        value.parse().ok()
    })
}

struct Pod {
    netns: String,
    addr: Ipv4Addr,
    _proxy: Process,
    _echo: Option<Process>,
    _udp_echo: Option<Process>,
}

struct Mesh {
    hosts: Hosts,
    dir: tempfile::TempDir,
    log_dir: PathBuf,
    controller: Process,
    pods: Vec<(String, Pod)>,
    _plain: Process,
    _declared: Process,
    vip: Ipv4Addr,
    plain: Ipv4Addr,
    late_vip: Ipv4Addr,
    udp_vip: Ipv4Addr,
    /// The file platform's file, its content, and the service added to it later.
    services_file: PathBuf,
    services: String,
    late_service: String,
}

impl Mesh {
    fn pod(&self, name: &str) -> &Pod {
        &self.pods.iter().find(|(n, _)| n == name).expect("a pod").1
    }

    fn write_policy(&self, name: &str, yaml: &str) -> anyhow::Result<()> {
        let policy = self.dir.path().join("policy");
        let tmp = policy.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, policy.join(format!("{name}.yaml")))?;
        Ok(())
    }

    fn logs(&self) -> String {
        logs(&self.log_dir)
    }

    /// Rewrites the file platform's file (write and rename: never read half-written).
    fn write_services(&self, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.services_file.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.services_file)?;
        Ok(())
    }
}

/// The end of every process's log.
fn logs(log_dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(log_dir) {
        for entry in entries.flatten() {
            out.push_str(&format!(
                "--- {} (last 25 lines)\n{}\n",
                entry.path().display(),
                process::tail(&entry.path(), 25)
            ));
        }
    }
    out
}

fn split_yaml(b: u32, c: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{ name: app-split, namespace: default }}
spec:
  service: app
  backends:
  - {{ service: app-b, weight: {b} }}
  - {{ service: app-c, weight: {c} }}
"
    )
}

/// service-a may call service-b and service-c on every port; service-d is named nowhere.
const ACCESS_YAML: &str = "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: { name: all-ports, namespace: default }
spec:
  matches:
    ports: []
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: a-to-b, namespace: default }
spec:
  destination: { kind: ServiceAccount, name: service-b, namespace: default }
  rules:
  - { kind: TCPRoute, name: all-ports }
  sources:
  - { kind: ServiceAccount, name: service-a, namespace: default }
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: a-to-c, namespace: default }
spec:
  destination: { kind: ServiceAccount, name: service-c, namespace: default }
  rules:
  - { kind: TCPRoute, name: all-ports }
  sources:
  - { kind: ServiceAccount, name: service-a, namespace: default }
";

/// service-a may send UDP to service-b's port 5353 (a rule of its own: UDP only); service-d
/// is named nowhere.
const UDP_ACCESS_YAML: &str = "apiVersion: specs.smi-spec.io/v1alpha4
kind: UDPRoute
metadata: { name: echo-udp, namespace: default }
spec:
  matches:
    ports: [5353]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: a-to-b-udp, namespace: default }
spec:
  destination: { kind: ServiceAccount, name: service-b, namespace: default }
  rules:
  - { kind: UDPRoute, name: echo-udp }
  sources:
  - { kind: ServiceAccount, name: service-a, namespace: default }
";

/// A UDP echo on `0.0.0.0:port` answering `<name> <datagram>` (Python: nothing in the
/// workspace serves UDP as an application).
fn udp_echo_script(name: &str, port: u16) -> String {
    [
        "import socket".to_string(),
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)".into(),
        format!("s.bind(('0.0.0.0', {port}))"),
        format!("print('listening on 0.0.0.0:{port}', flush=True)"),
        "while True:".into(),
        "    data, peer = s.recvfrom(65535)".into(),
        format!("    s.sendto(b'{name} ' + data, peer)"),
    ]
    .join("\n")
}

/// One datagram from a fresh socket in `netns` to `to`: the answer and the address it came
/// from, or None when none came within a second.
async fn udp_call(
    netns: &str,
    to: SocketAddr,
    payload: &str,
) -> anyhow::Result<Option<(String, SocketAddr)>> {
    let script = [
        "import socket".to_string(),
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)".into(),
        "s.settimeout(1.0)".into(),
        format!("s.sendto(b'{payload}', ('{}', {}))", to.ip(), to.port()),
        "try:".into(),
        "    data, peer = s.recvfrom(65535)".into(),
        "    print(peer[0] + ':' + str(peer[1]) + '|' + data.decode(), end='')".into(),
        "except socket.timeout:".into(),
        "    print('<timeout>', end='')".into(),
    ]
    .join("\n");
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", netns, "python3", "-c", &script])
        .output()
        .await
        .context("running python3 in the pod")?;
    anyhow::ensure!(
        out.status.success(),
        "the UDP client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    if answer == "<timeout>" {
        return Ok(None);
    }
    let (from, data) = answer
        .split_once('|')
        .with_context(|| format!("the UDP client printed {answer:?}"))?;
    Ok(Some((data.to_owned(), from.parse()?)))
}

/// Makes a directory and its files readable by the proxies (UID 1337).
fn open_to_all(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

async fn start(hosts: Hosts, dir: tempfile::TempDir) -> anyhow::Result<Mesh> {
    let log_dir = dir.path().join("logs");
    let policy = dir.path().join("policy");
    std::fs::create_dir(&policy)?;

    let host = |name: &str| hosts.host(name).map(|h| (h.netns.clone(), h.addr));
    let (services_ns, services_addr) = host("services")?;
    let [a, b, c, _] = services_addr.octets();
    let vip = Ipv4Addr::new(a, b, c, VIP_OCTET);
    let late_vip = Ipv4Addr::new(a, b, c, LATE_VIP_OCTET);
    let udp_vip = Ipv4Addr::new(a, b, c, UDP_VIP_OCTET);
    // The virtual addresses are held by a namespace of this test (nothing else answers for
    // them; nothing listens there either, so a connection forwarded unchanged is refused).
    for address in [vip, late_vip] {
        ip(&[
            "-n",
            &services_ns,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "eth0",
        ])?;
    }
    let (plain_ns, plain) = host("plain")?;
    // IPv6 on the client pod and the server outside the mesh (no duplicate address detection:
    // usable at once).
    for name in ["pod-a", "plain"] {
        let (netns, addr) = host(name)?;
        let v6 = format!("{V6_PREFIX}{}", addr.octets()[3]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    let (pod_b, pod_b_addr) = host("pod-b")?;
    let (_, pod_c_addr) = host("pod-c")?;
    let _ = pod_b;

    // The file platform: `app` on its virtual address, its two versions as services.
    let services = format!(
        "namespace: default
services:
  - name: app
    addresses: [{vip}]
    ports: [{{ port: {SERVICE_PORT} }}]
    endpoints:
      - {{ address: {pod_b_addr}, port: {APP_PORT}, service_account: service-b }}
      - {{ address: {pod_c_addr}, port: {APP_PORT}, service_account: service-c }}
  - name: app-b
    ports: [{{ port: {SERVICE_PORT} }}]
    endpoints: [{{ address: {pod_b_addr}, port: {APP_PORT}, service_account: service-b }}]
  - name: app-c
    ports: [{{ port: {SERVICE_PORT} }}]
    endpoints: [{{ address: {pod_c_addr}, port: {APP_PORT}, service_account: service-c }}]
  - name: app-udp
    addresses: [{udp_vip}]
    ports: [{{ port: {UDP_APP_PORT} }}]
    endpoints: [{{ address: {pod_b_addr}, port: {APP_PORT}, service_account: service-b }}]
"
    );
    let services_file = dir.path().join("services.yaml");
    std::fs::write(&services_file, &services)?;
    let late_service = format!(
        "  - name: late
    addresses: [{late_vip}]
    ports: [{{ port: {SERVICE_PORT} }}]
    endpoints: [{{ address: {pod_b_addr}, port: {APP_PORT}, service_account: service-b }}]
"
    );
    std::fs::write(policy.join("access.yaml"), ACCESS_YAML)?;
    std::fs::write(policy.join("udp-access.yaml"), UDP_ACCESS_YAML)?;
    // A server outside the mesh declared for service-a only, by name, at a fixed address.
    std::fs::write(
        policy.join("external.yaml"),
        format!(
            "apiVersion: policy.trellis.io/v1alpha1
kind: ExternalService
metadata: {{ name: declared, namespace: default }}
spec:
  hosts: [declared.example.test]
  ports: [{{ port: {DECLARED_PORT}, protocol: http }}]
  addresses: [{plain}]
  sources:
  - {{ kind: ServiceAccount, name: service-a }}
"
        ),
    )?;

    // One bootstrap token per workload.
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens)?;
    open_to_all(&tokens)?;
    let mut bootstrap = String::from("tokens:\n");
    for (_, sa, _) in PODS {
        use sha2::Digest as _;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let token = hex::encode(sha2::Sha256::digest(format!(
            "{sa}-{}-{nanos}",
            std::process::id()
        )));
        let digest = hex::encode(sha2::Sha256::digest(token.as_bytes()));
        bootstrap.push_str(&format!("- workload: default/{sa}\n  sha256: {digest}\n"));
        let path = tokens.join(sa);
        std::fs::write(&path, &token)?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    let bootstrap_file = dir.path().join("bootstrap-tokens.yaml");
    std::fs::write(&bootstrap_file, bootstrap)?;

    let (controller_ns, controller_addr) = host("controller")?;
    let any = SocketAddr::from((controller_addr, 0)).to_string();
    let mut controller = Process::spawn_in(
        Some(&controller_ns),
        "controller",
        &process::binary(process::TRELLIS)?,
        &[
            "controller".into(),
            "--grpc".into(),
            any.clone(),
            "--admin".into(),
            any,
            "--platform".into(),
            format!("file={}", services_file.display()),
            "--policy".into(),
            policy.display().to_string(),
            "--trust-domain".into(),
            TRUST_DOMAIN.into(),
            "--bootstrap-tokens".into(),
            bootstrap_file.display().to_string(),
        ],
        &[],
        &log_dir,
    )?;
    let grpc: SocketAddr = controller
        .wait_line("`grpc listening on ADDR`", process::START_TIMEOUT, |l| {
            l.strip_prefix("grpc listening on ")?.parse().ok()
        })
        .await?;

    let echo = process::binary(process::ECHO)?;
    let proxy = process::binary(process::PROXY)?;
    let setpriv = PathBuf::from("setpriv");
    let mut plain_server = Process::spawn_in(
        Some(&plain_ns),
        "plain",
        &echo,
        &[
            "--service".into(),
            "plain".into(),
            "--listen".into(),
            // Both families (an IPv6 socket takes IPv4 connections as mapped addresses).
            format!("[::]:{PLAIN_PORT}"),
        ],
        &[],
        &log_dir,
    )?;
    plain_server.listening_on().await?;
    let mut declared_server = Process::spawn_in(
        Some(&plain_ns),
        "declared",
        &echo,
        &[
            "--service".into(),
            "declared".into(),
            "--listen".into(),
            format!("0.0.0.0:{DECLARED_PORT}"),
        ],
        &[],
        &log_dir,
    )?;
    declared_server.listening_on().await?;

    let mut pods = Vec::new();
    for (name, sa, app) in PODS {
        let (netns, addr) = host(name)?;
        // Callers also get their UDP to the UDPRoute's port intercepted.
        let udp_ports: &[u16] = if app.is_none() { &[UDP_APP_PORT] } else { &[] };
        install_rules(&netns, udp_ports)?;
        let echo_process = match app {
            Some(service) => {
                let mut p = Process::spawn_in(
                    Some(&netns),
                    &format!("echo-{name}"),
                    &echo,
                    &[
                        "--service".into(),
                        service.into(),
                        "--listen".into(),
                        SocketAddr::from(([0, 0, 0, 0], APP_PORT)).to_string(),
                    ],
                    &[],
                    &log_dir,
                )?;
                p.listening_on().await?;
                Some(p)
            }
            None => None,
        };
        let udp_echo = match app {
            Some("app-b") => {
                let mut p = Process::spawn_in(
                    Some(&netns),
                    &format!("udp-echo-{name}"),
                    Path::new("python3"),
                    &[
                        "-u".into(),
                        "-c".into(),
                        udp_echo_script("app-b", UDP_APP_PORT),
                    ],
                    &[],
                    &log_dir,
                )?;
                p.listening_on().await?;
                Some(p)
            }
            _ => None,
        };
        // Callers carry a local UDP port to app-b's UDP port.
        let udp_args: Vec<String> = match app {
            None => vec![
                "--udp".into(),
                format!("127.0.0.1:{UDP_LOCAL_PORT}=app-b.default:{UDP_APP_PORT}"),
                "--udp-transparent".into(),
                format!("127.0.0.1:{UDP_TRANSPARENT_PORT}"),
            ],
            Some(_) => Vec::new(),
        };
        // Transparent UDP binds original destinations (IP_TRANSPARENT): callers' proxies keep
        // CAP_NET_ADMIN through the UID change, as a sidecar with UDP interception would get it.
        let caps: Vec<String> = match app {
            None => vec![
                "--inh-caps=+net_admin".into(),
                "--ambient-caps=+net_admin".into(),
            ],
            Some(_) => Vec::new(),
        };
        // The proxy as UID 1337, the UID the rules leave alone: `ip netns exec` must run as
        // root, so the UID changes after it (setpriv), right before the proxy starts.
        let mut proxy_process = Process::spawn_in(
            Some(&netns),
            &format!("proxy-{name}"),
            &setpriv,
            &[
                format!("--reuid={PROXY_UID}"),
                format!("--regid={PROXY_UID}"),
                "--clear-groups".into(),
            ]
            .into_iter()
            .chain(caps)
            .chain([
                "--".into(),
                proxy.display().to_string(),
                "--controller".into(),
                format!("http://{grpc}"),
                "--workload".into(),
                format!("default/{sa}"),
                "--admin".into(),
                format!("0.0.0.0:{ADMIN_PORT}"),
                "--outbound-transparent".into(),
                format!("127.0.0.1:{OUTBOUND_PORT}"),
                "--inbound-transparent".into(),
                format!("0.0.0.0:{INBOUND_PORT}"),
                "--identity-token-file".into(),
                tokens.join(sa).display().to_string(),
                "--trust-domain".into(),
                TRUST_DOMAIN.into(),
                "--threads".into(),
                "1".into(),
            ])
            .chain(udp_args)
            .collect::<Vec<_>>(),
            &[],
            &log_dir,
        )?;
        proxy_process
            .wait_line("`trellis-proxy started`", process::START_TIMEOUT, |l| {
                l.contains("trellis-proxy started").then_some(())
            })
            .await?;
        pods.push((
            name.to_owned(),
            Pod {
                netns,
                addr,
                _proxy: proxy_process,
                _echo: echo_process,
                _udp_echo: udp_echo,
            },
        ));
    }
    let mesh = Mesh {
        hosts,
        dir,
        log_dir,
        controller,
        pods,
        _plain: plain_server,
        _declared: declared_server,
        vip,
        plain,
        late_vip,
        udp_vip,
        services_file,
        services,
        late_service,
    };
    // Every proxy has its certificate (the admin port is not intercepted).
    for (name, pod) in &mesh.pods {
        let admin = SocketAddr::from((pod.addr, ADMIN_PORT));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match get(admin, "/ready").await {
                Ok((200, _)) => break,
                other if Instant::now() > deadline => {
                    bail!("{name}'s proxy never became ready: {other:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(mesh)
}

/// Calls `url` `n` times from `pod` until `done` holds for the answers (at most 30 s); returns
/// the last answers and how many calls were made.
async fn until(
    mesh: &Mesh,
    pod: &str,
    url: &str,
    n: usize,
    what: &str,
    done: impl Fn(&[Answer]) -> bool,
    calls: &mut usize,
) -> anyhow::Result<Vec<Answer>> {
    let urls = vec![url.to_owned(); n];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answers = curl(&mesh.pod(pod).netns, &urls).await?;
        *calls += n;
        if done(&answers) {
            return Ok(answers);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within 30 s; last answers {answers:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn all_from(answers: &[Answer], service: &str) -> bool {
    answers
        .iter()
        .all(|a| a.status == 200 && a.service.as_deref() == Some(service))
}

async fn scenarios(mesh: &Mesh) -> anyhow::Result<()> {
    let app = format!("http://{}:{SERVICE_PORT}/", mesh.vip);
    // Connections the client in pod-a opened (curl: one per URL).
    let mut calls = 0;

    // No split yet: the root's own endpoints, both versions, mutual TLS all the way.
    until(
        mesh,
        "pod-a",
        &app,
        10,
        "pod-a reaches app on its virtual address",
        |r| r.iter().all(|a| a.status == 200 && a.service.is_some()),
        &mut calls,
    )
    .await?;
    println!("app at {app}: answered from pod-a through the transparent proxies");

    mesh.write_policy("split", &split_yaml(0, 100))?;
    until(
        mesh,
        "pod-a",
        &app,
        10,
        "split 0:100: only app-c",
        |r| all_from(r, "app-c"),
        &mut calls,
    )
    .await?;
    let r = curl(&mesh.pod("pod-a").netns, &vec![app.clone(); 20]).await?;
    calls += 20;
    anyhow::ensure!(all_from(&r, "app-c"), "split 0:100: {r:#?}");
    println!("TrafficSplit 0:100: 20/20 answered by app-c");

    mesh.write_policy("split", &split_yaml(100, 0))?;
    until(
        mesh,
        "pod-a",
        &app,
        10,
        "split 100:0: only app-b",
        |r| all_from(r, "app-b"),
        &mut calls,
    )
    .await?;
    let r = curl(&mesh.pod("pod-a").netns, &vec![app.clone(); 20]).await?;
    calls += 20;
    anyhow::ensure!(all_from(&r, "app-b"), "split 100:0: {r:#?}");
    println!("TrafficSplit 100:0: 20/20 answered by app-b");

    // TrafficTarget: service-d is not a source of any target.
    let r = curl(&mesh.pod("pod-d").netns, &vec![app.clone(); 5]).await?;
    anyhow::ensure!(
        r.iter().all(|a| a.status == 403 && a.service.is_none()),
        "service-d must be refused: {r:#?}"
    );
    println!(
        "TrafficTarget: service-a 200, service-d 5/5 403 ({})",
        r[0].body.trim()
    );

    // An address the mesh does not know: reached unchanged (never dropped).
    let plain = format!("http://{}:{PLAIN_PORT}/outside", mesh.plain);
    let r = curl(&mesh.pod("pod-a").netns, &vec![plain.clone(); 3]).await?;
    calls += 3;
    anyhow::ensure!(all_from(&r, "plain"), "unknown address {plain}: {r:#?}");
    println!("unknown address {plain}: 3/3 reached unchanged");

    // The same over IPv6: redirected by the IPv6 rules to the listener's IPv6 twin, the original
    // destination read with IP6T_SO_ORIGINAL_DST, forwarded unchanged.
    let plain6 = format!(
        "http://[{V6_PREFIX}{}]:{PLAIN_PORT}/outside-v6",
        mesh.plain.octets()[3]
    );
    let r = curl(&mesh.pod("pod-a").netns, &vec![plain6.clone(); 3]).await?;
    calls += 3;
    anyhow::ensure!(
        all_from(&r, "plain"),
        "unknown IPv6 address {plain6}: {r:#?}"
    );
    println!("unknown address {plain6}: 3/3 reached unchanged (IPv6)");

    // Declared outside the mesh (an ExternalService for service-a): reached by its name (the
    // Host read from the intercepted connection), although the client resolved it to an
    // address nobody holds; refused with 403 by service-d's own proxy.
    let [a, b, c, _] = mesh.plain.octets();
    let unheld = Ipv4Addr::new(a, b, c, UNHELD_OCTET);
    let declared = format!("http://declared.example.test:{DECLARED_PORT}/declared");
    let resolve = vec![
        "--resolve".to_owned(),
        format!("declared.example.test:{DECLARED_PORT}:{unheld}"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = curl_with(
            &mesh.pod("pod-a").netns,
            &resolve,
            std::slice::from_ref(&declared),
        )
        .await?;
        calls += 1;
        if all_from(&r, "declared") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the declared host was never reached from pod-a: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = curl_with(
        &mesh.pod("pod-a").netns,
        &resolve,
        &vec![declared.clone(); 3],
    )
    .await?;
    calls += 3;
    anyhow::ensure!(all_from(&r, "declared"), "declared host from pod-a: {r:#?}");
    let r = curl_with(
        &mesh.pod("pod-d").netns,
        &resolve,
        &vec![declared.clone(); 3],
    )
    .await?;
    anyhow::ensure!(
        r.iter().all(|a| a.status == 403 && a.service.is_none()),
        "service-d is not a source of the ExternalService: {r:#?}"
    );
    println!(
        "ExternalService declared.example.test:{DECLARED_PORT} (resolved by the client to {unheld}, held by nobody): pod-a 3/3 reached by name, pod-d 3/3 403 ({})",
        r[0].body.trim()
    );

    // A pod's own address: that pod, mutual TLS to its identity.
    let pod_c = format!("http://{}:{APP_PORT}/direct", mesh.pod("pod-c").addr);
    let r = curl(&mesh.pod("pod-a").netns, &vec![pod_c.clone(); 5]).await?;
    calls += 5;
    anyhow::ensure!(all_from(&r, "app-c"), "pod address {pod_c}: {r:#?}");
    println!("pod address {pod_c}: 5/5 answered by app-c through the mesh");

    // A service created after the first ask of its address: forwarded unchanged (refused: nothing
    // listens there) until it exists, then routed; deleted, forwarded unchanged again.
    let late = format!("http://{}:{SERVICE_PORT}/", mesh.late_vip);
    let r = curl(&mesh.pod("pod-a").netns, std::slice::from_ref(&late)).await?;
    calls += 1;
    anyhow::ensure!(r[0].status == 0, "{late} before its service exists: {r:#?}");
    mesh.write_services(&format!("{}{}", mesh.services, mesh.late_service))?;
    until(
        mesh,
        "pod-a",
        &late,
        5,
        "the late service is found",
        |r| all_from(r, "app-b"),
        &mut calls,
    )
    .await?;
    mesh.write_services(&mesh.services)?;
    until(
        mesh,
        "pod-a",
        &late,
        3,
        "the deleted service is forwarded unchanged",
        |r| r.iter().all(|a| a.status == 0),
        &mut calls,
    )
    .await?;
    println!(
        "{late}: forwarded unchanged, then routed once its service was created, then unchanged again once deleted"
    );

    // UDP: service-a's datagrams reach app-b's UDP echo through both proxies (mTLS tunnel,
    // intercepted at pod-b, authorized by the UDPRoute rule); service-d's are dropped. First to
    // the proxy's own UDP listener, then to the UDP service's virtual address, intercepted in
    // the calling pod too (TPROXY) and answered from that address.
    let local = SocketAddr::from(([127, 0, 0, 1], UDP_LOCAL_PORT));
    let vip = SocketAddr::from((mesh.udp_vip, UDP_APP_PORT));
    let mut sent_to_vip = 0;
    for to in [local, vip] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (answer, from) = loop {
            if to == vip {
                sent_to_vip += 1;
            }
            if let Some(answer) = udp_call(&mesh.pod("pod-a").netns, to, "ping").await? {
                break answer;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "pod-a's datagrams to {to} never reached app-b's UDP echo: {}",
                mesh.logs()
            );
        };
        anyhow::ensure!(answer == "app-b ping", "UDP answer to {to}: {answer:?}");
        anyhow::ensure!(from == to, "the answer to {to} came from {from}");
        for i in 0..5 {
            let payload = format!("ping-{i}");
            if to == vip {
                sent_to_vip += 1;
            }
            let answer = udp_call(&mesh.pod("pod-a").netns, to, &payload).await?;
            anyhow::ensure!(
                answer.as_ref().map(|a| a.0.as_str()) == Some(format!("app-b {payload}").as_str()),
                "UDP from pod-a to {to}, datagram {i}: {answer:?}"
            );
        }
        for _ in 0..3 {
            let answer = udp_call(&mesh.pod("pod-d").netns, to, "ping").await?;
            anyhow::ensure!(
                answer.is_none(),
                "service-d's datagram to {to} was answered: {answer:?}"
            );
        }
    }
    // Every datagram pod-a sent to the virtual address reached its forwarder, the first ones
    // (which arrive on the catch-all socket before the forwarder's own socket is bound) too.
    let admin_a = SocketAddr::from((mesh.pod("pod-a").addr, ADMIN_PORT));
    let (_, metrics_a) = get(admin_a, "/metrics").await?;
    let series = format!(
        "trellis_udp_datagrams_total{{direction=\"outbound\",destination=\"{vip}\",flow=\"received\"}}"
    );
    anyhow::ensure!(
        sample(&metrics_a, &series) == Some(f64::from(sent_to_vip)),
        "pod-a's forwarder of {vip} received {:?} datagrams, the client sent {sent_to_vip}",
        sample(&metrics_a, &series)
    );
    let admin_b = SocketAddr::from((mesh.pod("pod-b").addr, ADMIN_PORT));
    let (_, metrics_b) = get(admin_b, "/metrics").await?;
    let refused_at_b: f64 = metrics_b
        .lines()
        .filter(|l| {
            l.starts_with("trellis_udp_refused_total{")
                && l.contains("direction=\"inbound\"")
                && l.contains("reason=\"forbidden\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    anyhow::ensure!(
        refused_at_b >= 1.0,
        "pod-b counts service-d's refused tunnels: {refused_at_b}"
    );
    println!(
        "UDP: pod-a 6/6 datagrams echoed by app-b through its proxy's UDP listener and 6/6 to the service's virtual address {vip} (intercepted, answered from {vip}); pod-d 3/3 unanswered each way (refused at pod-b)"
    );

    // A caller without mesh identity (the test process) at a pod: refused by its proxy.
    let pod_b = SocketAddr::from((mesh.pod("pod-b").addr, APP_PORT));
    let (status, text) = get(pod_b, "/").await?;
    anyhow::ensure!(
        status == 403 && text.contains("x-trellis-error: forbidden"),
        "plaintext caller at {pod_b}: {text}"
    );
    println!("plaintext caller at {pod_b}: 403 forbidden");

    // The loop guard: a connection to the outbound listener itself (not redirected: loopback)
    // is refused, not forwarded to itself.
    let own = format!("http://127.0.0.1:{OUTBOUND_PORT}/");
    let r = curl(&mesh.pod("pod-a").netns, std::slice::from_ref(&own)).await?;
    calls += 1;
    anyhow::ensure!(
        r[0].status == 0,
        "a connection to the listener itself: {r:#?}"
    );

    // The proxy's own connections (to the controller, to app-b/app-c, to the plain server)
    // were not redirected into it again: its transparent listener accepted exactly the
    // client's connections.
    let admin = SocketAddr::from((mesh.pod("pod-a").addr, ADMIN_PORT));
    let (_, metrics) = get(admin, "/metrics").await?;
    let accepted = sample(
        &metrics,
        "trellis_accepted_connections_total{listener=\"outbound-transparent\"}",
    );
    anyhow::ensure!(
        accepted == Some(calls as f64),
        "pod-a's transparent listener accepted {accepted:?} connections, the client made {calls}"
    );
    // Refused as a loop (conntrack names the listener itself as the original destination) or
    // for having no original destination (no conntrack entry): never forwarded.
    let refused = |reason: &str| {
        sample(
            &metrics,
            &format!(
                "trellis_connections_refused_total{{listener=\"outbound-transparent\",reason=\"{reason}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    let (looped, unredirected) = (refused("loop"), refused("no-original-destination"));
    anyhow::ensure!(
        looped + unredirected == 1.0,
        "the loop guard refused {looped} (loop) + {unredirected} (no original destination), want 1"
    );
    println!(
        "pod-a's outbound listener accepted {calls} connections = the client's; the one to itself refused (loop: {looped}, no original destination: {unredirected})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_connections_follow_the_mesh() -> anyhow::Result<()> {
    let names = [
        "controller",
        "services",
        "plain",
        "pod-a",
        "pod-b",
        "pod-c",
        "pod-d",
    ];
    let hosts = match Hosts::create(70, &names)? {
        Ok(hosts) => hosts,
        Err(reason) => {
            println!("SKIP intercepted_connections_follow_the_mesh: {reason}");
            return Ok(());
        }
    };
    let dir = tempfile::tempdir()?;
    open_to_all(dir.path())?;
    let log_dir = dir.path().join("logs");
    std::fs::create_dir(&log_dir)?;
    let mesh = match start(hosts, dir).await {
        Ok(mesh) => mesh,
        Err(e) => {
            eprintln!("{}", logs(&log_dir));
            return Err(e);
        }
    };
    let result = scenarios(&mesh).await;
    if result.is_err() {
        eprintln!("{}", mesh.logs());
    }
    let _ = (&mesh.controller, &mesh.hosts);
    result
}
