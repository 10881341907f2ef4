//! The egress switch for real: a pod as a Linux network namespace with the init container's
//! interception rules (`trellis_intercept::InterceptRules`, loaded with `iptables-restore`), the
//! proxy binary in transparent mode as UID 1337, and `curl` in the pod knowing nothing of it.
//!
//! ```text
//!   test process 198.18.S.1 (veth) ── pod 198.18.S.2 (curl; trellis-proxy, 127.0.0.1:15001)
//!     :OUTSIDE  a server outside the mesh
//!     :MESH     the backend of the mesh destination 198.18.S.200:80 (an address nobody holds)
//! ```
//!
//! With `outbound.egress: deny`: the outside server is never reached (closed at once, counted
//! `reason="egress-denied"`), the mesh destination is still routed. Reloaded with `allow`: the
//! same outside server is reached unchanged (passthrough).
//!
//! Declared outside hosts (the file's `external` destinations, as the controller sends
//! ExternalServices): under the same lockdown, a host declared for this workload is reached by
//! its name (the HTTP Host, or the TLS SNI, read from the intercepted connection), a host
//! declared for another workload gets `403 egress-forbidden` from the proxy itself, an
//! undeclared address is still refused, and a declared port with TLS origination carries the
//! application's plaintext HTTP over TLS checked against the declaration's CA.
//!
//! Needs root, `ip`, `iptables-restore`, `setpriv` and `curl`; skipped with the reason elsewhere.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use trellis_intercept::{Family, InterceptRules};

mod common;
use common::certs::{identity_yaml, new_ca, tls_server, valid_leaf};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");
const ADMIN_PORT: u16 = 15020;
/// The mesh destination's virtual port (its address is `.200` of the /24).
const MESH_PORT: u16 = 80;

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why this machine cannot run the test, if it cannot.
fn unavailable() -> Option<String> {
    if run("id", &["-u"]).ok()?.trim() != "0" {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables-restore", "setpriv", "curl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("no `{tool}`"));
        }
    }
    None
}

/// The pod's namespace and the test's veth; deleted when dropped.
struct Pod {
    netns: String,
    link: String,
    subnet: u8,
}

impl Pod {
    /// A namespace on a /24 of 198.18.0.0/15 (RFC 2544, benchmark networks) that no interface
    /// of this machine uses yet.
    fn create() -> Result<Pod, String> {
        let used = run("ip", &["-4", "-o", "addr", "show"])?;
        let pid = std::process::id();
        let start = 100 + (pid % 100) as u8;
        let subnet = (0..100u8)
            .map(|i| 100 + (start - 100 + i) % 100)
            .find(|s| !used.contains(&format!("198.18.{s}.")))
            .ok_or("no free /24 in 198.18.100-199")?;
        let pod = Pod {
            netns: format!("trellis-egress-{pid}"),
            link: format!("tre{}", pid % 1_000_000),
            subnet,
        };
        run("ip", &["netns", "add", &pod.netns])?;
        let ns = pod.netns.as_str();
        let (host, inside) = (pod.host(1), pod.host(2));
        for args in [
            vec![
                "link", "add", &pod.link, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
            vec!["addr", "add", &format!("{host}/24"), "dev", &pod.link],
            vec!["link", "set", &pod.link, "up"],
            vec![
                "-n",
                ns,
                "addr",
                "add",
                &format!("{inside}/24"),
                "dev",
                "eth0",
            ],
            vec!["-n", ns, "link", "set", "eth0", "up"],
            vec!["-n", ns, "link", "set", "lo", "up"],
        ] {
            run("ip", &args)?;
        }
        // The init container's rules, from the same source `trellis-init` uses.
        let rules = InterceptRules::default();
        let mut restore = Command::new("ip")
            .args(["netns", "exec", ns, Family::V4.restore_command()])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut stdin = restore.stdin.take().ok_or("no stdin")?;
        std::io::Write::write_all(&mut stdin, rules.restore_script(Family::V4).as_bytes())
            .map_err(|e| e.to_string())?;
        drop(stdin);
        let out = restore.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "iptables-restore: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(pod)
    }

    fn host(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, n)
    }

    /// `curl` in the pod, one fresh connection: the body, or `None` when no answer came.
    fn curl(&self, url: &str) -> Option<String> {
        self.curl_with(&[url])
    }

    /// `curl` in the pod with `args`: its standard output, or `None` when it failed.
    fn curl_with(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "curl",
                "-sS",
                "--max-time",
                "5",
            ])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.link]);
        let _ = run("ip", &["netns", "del", &self.netns]);
    }
}

/// A one-line HTTP server at `addr` answering `name` to every request; counts connections.
async fn server(addr: SocketAddr, name: &'static str) -> Arc<AtomicUsize> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    accepted
}

fn config(pod: &Pod, egress: &str, mesh_backend: SocketAddr) -> String {
    format!(
        "admin: {}:{ADMIN_PORT}
transparent:
  outbound: 127.0.0.1:15001
outbound:
  egress: {egress}
destinations:
  - authority: \"{}:{MESH_PORT}\"
    protocol: tcp
    backends: [{{ name: mesh, endpoints: [{{ address: \"{mesh_backend}\" }}] }}]
",
        pod.host(2),
        pod.host(200),
    )
}

/// The proxy binary in the pod as UID 1337 (the UID the rules leave alone) with `config`,
/// logging to `dir/proxy.log`; returns once its admin port (on the pod's address) listens.
async fn start_proxy(pod: &Pod, config: &Path, dir: &Path) -> std::process::Child {
    let mut proxy = Command::new("ip")
        .args(["netns", "exec", &pod.netns, "setpriv"])
        .args(["--reuid=1337", "--regid=1337", "--clear-groups", "--", BIN])
        .args(["--config", config.to_str().unwrap(), "--threads", "1"])
        .args(["--log", "info,trellis_proxy::server::transparent=debug"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
        .spawn()
        .unwrap();
    let admin = SocketAddr::from((pod.host(2), ADMIN_PORT));
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        if Instant::now() > deadline {
            let _ = proxy.kill();
            panic!(
                "the proxy never listened: {}",
                std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy
}

/// The proxy's metrics, read from the test process through the veth.
async fn metrics(admin: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Makes the config readable by the proxy (UID 1337).
fn open_to_all(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_lockdown_refuses_destinations_outside_the_mesh() {
    if let Some(reason) = unavailable() {
        println!("SKIP egress_lockdown_refuses_destinations_outside_the_mesh: {reason}");
        return;
    }
    let pod = Pod::create().expect("the pod's namespace");
    let outside_addr = SocketAddr::from((pod.host(1), 0));
    // Bound on the test's own address: only the pod can reach them.
    let outside_listener = std::net::TcpListener::bind(outside_addr).unwrap();
    let outside_addr = outside_listener.local_addr().unwrap();
    drop(outside_listener);
    let outside = server(outside_addr, "outside").await;
    let mesh_listener = std::net::TcpListener::bind(SocketAddr::from((pod.host(1), 0))).unwrap();
    let mesh_addr = mesh_listener.local_addr().unwrap();
    drop(mesh_listener);
    let mesh = server(mesh_addr, "mesh").await;

    let dir = tempfile::tempdir().unwrap();
    open_to_all(dir.path());
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config(&pod, "deny", mesh_addr)).unwrap();
    open_to_all(&path);
    let mut proxy = start_proxy(&pod, &path, dir.path()).await;
    let log = || std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
    let admin = SocketAddr::from((pod.host(2), ADMIN_PORT));

    let outside_url = format!("http://{outside_addr}/");
    let mesh_url = format!("http://{}:{MESH_PORT}/", pod.host(200));
    let refused = "trellis_connections_refused_total{listener=\"outbound-transparent\",reason=\"egress-denied\"}";

    // Locked down: the address outside the mesh is never reached, the mesh still is.
    for _ in 0..3 {
        assert_eq!(pod.curl(&outside_url), None, "egress deny: {}", log());
    }
    assert_eq!(outside.load(Ordering::SeqCst), 0, "never forwarded");
    assert_eq!(
        pod.curl(&mesh_url).as_deref(),
        Some("mesh"),
        "a mesh destination is still routed: {}",
        log()
    );
    assert_eq!(mesh.load(Ordering::SeqCst), 1);
    assert_eq!(sample(&metrics(admin).await, refused), 3.0);
    assert!(
        log().contains("egress is denied") && log().contains(&outside_addr.to_string()),
        "the refusal is logged with the address: {}",
        log()
    );

    // Reloaded with `allow` (the default's behaviour): passthrough, unchanged.
    std::fs::write(&path, config(&pod, "allow", mesh_addr)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        if let Some(body) = pod.curl(&outside_url) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "egress allow never took effect: {}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(body, "outside");
    assert_eq!(pod.curl(&mesh_url).as_deref(), Some("mesh"));
    let m = metrics(admin).await;
    assert!(sample(&m, refused) >= 3.0);
    assert!(
        m.contains("destination=\"passthrough\""),
        "passthrough counted: {m}"
    );

    let _ = proxy.kill();
    let _ = proxy.wait();
}

/// A free port on `ip` (bound and released).
fn free_port_on(ip: Ipv4Addr) -> SocketAddr {
    let listener = std::net::TcpListener::bind(SocketAddr::from((ip, 0))).unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_outside_hosts_pass_the_lockdown_for_the_workloads_they_allow() {
    if let Some(reason) = unavailable() {
        println!(
            "SKIP declared_outside_hosts_pass_the_lockdown_for_the_workloads_they_allow: {reason}"
        );
        return;
    }
    let pod = Pod::create().expect("the pod's namespace");
    let outside_ip = pod.host(1);
    let api_addr = free_port_on(outside_ip);
    let api = server(api_addr, "api").await;
    let ca = new_ca("outside CA");
    let secure_addr = free_port_on(outside_ip);
    let secure = tls_server(secure_addr, &ca, "secure.example.test", "secure").await;
    // The port the application calls in plaintext; nothing listens there: the proxy
    // originates TLS to `secure_addr`'s port instead.
    let plain_port = 8080;

    let dir = tempfile::tempdir().unwrap();
    open_to_all(dir.path());
    let me = "spiffe://test.local/ns/shop/sa/checkout";
    let identity = identity_yaml(dir.path(), "checkout", &valid_leaf(&ca, me), &[&ca]);
    let ca_pem = ca
        .pem
        .lines()
        .map(|l| format!("        {l}\n"))
        .collect::<String>();
    let (api_port, secure_port) = (api_addr.port(), secure_addr.port());
    let config = format!(
        "admin: {}:{ADMIN_PORT}
{identity}transparent:
  outbound: 127.0.0.1:15001
outbound:
  egress: deny
destinations:
  - authority: api.example.test
    protocol: detect
    backends: [{{ name: api, endpoints: [{{ address: \"{outside_ip}\" }}] }}]
    external: {{ name: shop/api, allowed_identities: [\"{me}\"], ports: [{{ port: {api_port} }}] }}
  - authority: forbidden.example.test
    protocol: detect
    backends: [{{ name: forbidden, endpoints: [{{ address: \"{outside_ip}\" }}] }}]
    external:
      name: shop/forbidden
      allowed_identities: [\"spiffe://test.local/ns/shop/sa/other\"]
      ports: [{{ port: {api_port} }}]
  - authority: secure.example.test
    protocol: detect
    backends: [{{ name: secure, endpoints: [{{ address: \"{outside_ip}\" }}] }}]
    external:
      name: shop/secure
      allowed_identities: [\"*\"]
      ports: [{{ port: {plain_port}, originate_tls_port: {secure_port} }}, {{ port: {secure_port} }}]
      ca_bundle: |
{ca_pem}",
        pod.host(2),
    );
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config).unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        open_to_all(&entry.unwrap().path());
    }
    let mut proxy = start_proxy(&pod, &path, dir.path()).await;
    let log = || std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
    let admin = SocketAddr::from((pod.host(2), ADMIN_PORT));
    let resolve = |host: &str, port: u16| format!("{host}:{port}:{outside_ip}");

    // Declared for this workload: reached by its name (the Host header), whatever the address.
    let url = format!("http://api.example.test:{api_port}/");
    let body = pod.curl_with(&["--resolve", &resolve("api.example.test", api_port), &url]);
    assert_eq!(body.as_deref(), Some("api"), "{}", log());
    assert_eq!(api.load(Ordering::SeqCst), 1);

    // Declared for another workload: the proxy answers 403 itself, nothing leaves.
    let url = format!("http://forbidden.example.test:{api_port}/");
    let answer = pod.curl_with(&[
        "--resolve",
        &resolve("forbidden.example.test", api_port),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %header{x-trellis-error}",
        &url,
    ]);
    assert_eq!(answer.as_deref(), Some("403 egress-forbidden"), "{}", log());
    assert_eq!(api.load(Ordering::SeqCst), 1, "never forwarded");

    // The same server by its address alone: undeclared, refused by the lockdown.
    assert_eq!(pod.curl(&format!("http://{api_addr}/")), None);
    assert_eq!(api.load(Ordering::SeqCst), 1, "never forwarded");

    // TLS originated: the application speaks plain HTTP to port 8080, the server gets TLS
    // (its certificate checked against the declaration's CA bundle for the declared host).
    let url = format!("http://secure.example.test:{plain_port}/");
    let body = pod.curl_with(&[
        "--resolve",
        &resolve("secure.example.test", plain_port),
        &url,
    ]);
    assert_eq!(body.as_deref(), Some("secure"), "{}", log());
    assert_eq!(secure.load(Ordering::SeqCst), 1);

    // The application's own TLS passes through, named by its SNI.
    let ca_file = dir.path().join("outside-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let url = format!("https://secure.example.test:{secure_port}/");
    let body = pod.curl_with(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        "--resolve",
        &resolve("secure.example.test", secure_port),
        &url,
    ]);
    assert_eq!(body.as_deref(), Some("secure"), "{}", log());
    assert_eq!(secure.load(Ordering::SeqCst), 2);

    let m = metrics(admin).await;
    let refused = "trellis_connections_refused_total{listener=\"outbound-transparent\",reason=\"egress-denied\"}";
    assert_eq!(sample(&m, refused), 1.0, "{m}");
    assert!(
        m.contains("error=\"egress-forbidden\""),
        "the refusal is counted: {m}"
    );
    assert!(
        log().contains("does not allow spiffe://test.local/ns/shop/sa/checkout"),
        "the refusal is logged with why: {}",
        log()
    );

    let _ = proxy.kill();
    let _ = proxy.wait();
}
