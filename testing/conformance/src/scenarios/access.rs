//! The access scenarios: TrafficTarget under default deny, as the SMI conformance suite checks
//! them (no target, TCPRoute with every port, deletion, an HTTPRouteGroup path, methods) plus what
//! it leaves out (a source not listed, a port not listed, a revoked target on a kept-alive
//! connection, a plaintext caller). The caller is `app-a` (ServiceAccount `service-a`), the
//! destination `app-b` (`service-b`); "b records nothing" is read from b's app itself.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{B, CALLER, Outcome, all_denied, all_ok, count, ms, seen, until};
use crate::harness::mesh::{APPLY_WITHIN, Call, Mesh};
use trellis_echo::client::{self, CallPlan};

/// The access scenarios, in the order they run on one mesh.
pub const ACCESS_SCENARIOS: [&str; 11] = [
    "mtls: calls between proxies were mutual TLS",
    "access: no TrafficTarget, a->b denied, b records nothing",
    "access: TCPRoute ports [] lets exactly one call through",
    "access: deleting the TrafficTarget blocks again",
    "access: HTTPRouteGroup /metrics: GET /metrics ok, GET /echo denied",
    "access: methods [GET]: GET ok, POST denied",
    "access: a source not listed is denied",
    "access: a port not listed is denied, the listed one allowed",
    "access: revoked target blocks a kept-alive connection in 5 s",
    "access: plaintext call to b under default deny refused",
    "access: a caller certified by a foreign CA is refused",
];

/// The policy name the access documents are applied under.
const POLICY: &str = "access";
/// The destination workload and its service.
const DEST: &str = "app-b";

/// The rule of the TrafficTarget from `service-a` to `service-b`.
#[derive(Clone, Debug)]
pub enum Rule<'a> {
    /// A TCPRoute with these ports (empty = every port).
    Tcp(&'a [u16]),
    /// An HTTPRouteGroup with one match: an optional path regex and methods.
    Http {
        path: Option<&'a str>,
        methods: &'a [&'a str],
    },
}

/// A TrafficTarget from `source` to `service-b` with one rule, and the route it names.
pub fn target_yaml(source: &str, rule: &Rule<'_>) -> String {
    let (route, kind) = match rule {
        Rule::Tcp(ports) => (
            format!(
                "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {{ name: b-route, namespace: default }}
spec:
  matches:
    ports: {ports:?}
"
            ),
            "TCPRoute",
        ),
        Rule::Http { path, methods } => {
            let mut m = String::from("  - name: b-match\n");
            if let Some(path) = path {
                m.push_str(&format!("    pathRegex: {path}\n"));
            }
            m.push_str(&format!("    methods: {methods:?}\n"));
            (
                format!(
                    "apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{ name: b-route, namespace: default }}
spec:
  matches:
{m}"
                ),
                "HTTPRouteGroup",
            )
        }
    };
    format!(
        "{route}---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{ name: to-b, namespace: default }}
spec:
  destination: {{ kind: ServiceAccount, name: service-b, namespace: default }}
  rules:
  - {{ kind: {kind}, name: b-route }}
  sources:
  - {{ kind: ServiceAccount, name: {source}, namespace: default }}
"
    )
}

/// Runs every access scenario in order on `mesh` (which must deny by default); the target is
/// removed at the end.
pub async fn access_scenarios(mesh: &Mesh) -> Vec<(&'static str, Outcome)> {
    let results = [
        mutual_tls(mesh).await,
        no_target(mesh).await,
        tcp_every_port(mesh).await,
        deleted(mesh).await,
        metrics_path(mesh).await,
        get_only(mesh).await,
        source_not_listed(mesh).await,
        port_not_listed(mesh).await,
        revoked_on_open_connection(mesh).await,
        plaintext(mesh).await,
        foreign_ca(mesh).await,
    ];
    let _ = mesh.platform.delete_policy(POLICY).await;
    ACCESS_SCENARIOS
        .iter()
        .zip(results)
        .map(|(name, result)| (*name, Outcome::of(result)))
        .collect()
}

fn to_b(path: &str, n: u32) -> Call {
    Call::get(DEST, path, n)
}

/// Waits until `probe` from the caller is refused (403 `forbidden`).
async fn until_denied(mesh: &Mesh, caller: &str, probe: &Call) -> anyhow::Result<Duration> {
    let n = probe.count;
    until(mesh, caller, probe, "denied", |r| all_denied(r, n)).await
}

/// Waits until `probe` from the caller is answered by b.
async fn until_allowed(mesh: &Mesh, probe: &Call) -> anyhow::Result<Duration> {
    let n = probe.count;
    until(mesh, CALLER, probe, "allowed", |r| {
        all_ok(r, n) && count(r, B) == n
    })
    .await
}

/// b's app saw nothing since the last reset.
async fn b_saw_nothing(mesh: &Mesh) -> anyhow::Result<()> {
    let counts = mesh.counts(DEST).await?;
    if counts.total != 0 {
        bail!("b's app received {} requests: {counts:?}", counts.total);
    }
    Ok(())
}

/// The split scenarios' calls reached b and c over mTLS: both server proxies completed inbound
/// handshakes and the caller's proxy outbound ones, with no handshake errors.
async fn mutual_tls(mesh: &Mesh) -> anyhow::Result<String> {
    const HANDSHAKES: &str = "trellis_tls_handshakes_total";
    const ERRORS: &str = "trellis_tls_handshake_errors_total";
    let mut seen = Vec::new();
    for (workload, direction) in [
        ("app-a", "outbound"),
        ("app-b", "inbound"),
        ("app-c", "inbound"),
    ] {
        let label = format!("direction=\"{direction}\"");
        let done = mesh.proxy_counter(workload, HANDSHAKES, &[&label]).await?;
        let errors = mesh.proxy_counter(workload, ERRORS, &[&label]).await?;
        if done < 1.0 || errors > 0.0 {
            let by_reason = mesh.proxy_series(workload, ERRORS, &[&label]).await?;
            bail!(
                "{workload}: {done} {direction} mTLS handshakes, {errors} errors ({})",
                by_reason.join("; ")
            );
        }
        seen.push(format!("{workload} {direction} {done}"));
    }
    Ok(format!("handshakes: {}", seen.join(", ")))
}

async fn no_target(mesh: &Mesh) -> anyhow::Result<String> {
    mesh.platform.delete_policy(POLICY).await?;
    let took = until_denied(mesh, CALLER, &to_b("/probe", 3)).await?;
    mesh.reset_counts().await?;
    let r = mesh.call(CALLER, &to_b("/echo", 10)).await?;
    if !all_denied(&r, 10) {
        bail!("expected 10 of 10 refused with 403 forbidden: {}", seen(&r));
    }
    b_saw_nothing(mesh).await?;
    Ok(format!("{}; b saw 0 (in {})", seen(&r), ms(took)))
}

async fn tcp_every_port(mesh: &Mesh) -> anyhow::Result<String> {
    mesh.platform
        .apply_policy(POLICY, &target_yaml("service-a", &Rule::Tcp(&[])))
        .await?;
    let took = until_allowed(mesh, &to_b("/probe", 3)).await?;
    mesh.reset_counts().await?;
    let r = mesh.call(CALLER, &to_b("/echo", 1)).await?;
    if !(all_ok(&r, 1) && count(&r, B) == 1) {
        bail!("expected the one call answered by b: {}", seen(&r));
    }
    let counts = mesh.counts(DEST).await?;
    if counts.total != 1 || counts.by_caller.get(CALLER) != Some(&1) {
        bail!("expected b to record exactly one call from {CALLER}: {counts:?}");
    }
    Ok(format!("{}; b saw 1 (in {})", seen(&r), ms(took)))
}

async fn deleted(mesh: &Mesh) -> anyhow::Result<String> {
    mesh.platform.delete_policy(POLICY).await?;
    let took = until_denied(mesh, CALLER, &to_b("/probe", 3)).await?;
    mesh.reset_counts().await?;
    let r = mesh.call(CALLER, &to_b("/echo", 1)).await?;
    if !all_denied(&r, 1) {
        bail!("expected the call refused with 403 forbidden: {}", seen(&r));
    }
    b_saw_nothing(mesh).await?;
    Ok(format!("{}; b saw 0 (in {})", seen(&r), ms(took)))
}

async fn metrics_path(mesh: &Mesh) -> anyhow::Result<String> {
    let rule = Rule::Http {
        path: Some("/metrics"),
        methods: &["GET"],
    };
    mesh.platform
        .apply_policy(POLICY, &target_yaml("service-a", &rule))
        .await?;
    let took = until_allowed(mesh, &to_b("/metrics", 3)).await?;
    mesh.reset_counts().await?;
    let metrics = mesh.call(CALLER, &to_b("/metrics", 5)).await?;
    let echo = mesh.call(CALLER, &to_b("/echo", 5)).await?;
    if !(all_ok(&metrics, 5) && count(&metrics, B) == 5) {
        bail!(
            "GET /metrics: expected 5 of 5 answered by b: {}",
            seen(&metrics)
        );
    }
    if !all_denied(&echo, 5) {
        bail!("GET /echo: expected 5 of 5 refused: {}", seen(&echo));
    }
    let counts = mesh.counts(DEST).await?;
    if counts.total != 5 || counts.by_path.get("/metrics") != Some(&5) {
        bail!("expected b to record only the 5 GET /metrics: {counts:?}");
    }
    Ok(format!(
        "GET /metrics {}; GET /echo {} (in {})",
        seen(&metrics),
        seen(&echo),
        ms(took)
    ))
}

async fn get_only(mesh: &Mesh) -> anyhow::Result<String> {
    let rule = Rule::Http {
        path: None,
        methods: &["GET"],
    };
    mesh.platform
        .apply_policy(POLICY, &target_yaml("service-a", &rule))
        .await?;
    // Before: only /metrics was allowed, so GET /echo shows the change.
    let took = until_allowed(mesh, &to_b("/echo", 3)).await?;
    mesh.reset_counts().await?;
    let get = mesh.call(CALLER, &to_b("/echo", 5)).await?;
    let post = mesh.call(CALLER, &to_b("/echo", 5).method("POST")).await?;
    if !(all_ok(&get, 5) && count(&get, B) == 5) {
        bail!("GET: expected 5 of 5 answered by b: {}", seen(&get));
    }
    if !all_denied(&post, 5) {
        bail!("POST: expected 5 of 5 refused: {}", seen(&post));
    }
    let counts = mesh.counts(DEST).await?;
    if counts.total != 5 {
        bail!("expected b to record only the 5 GETs: {counts:?}");
    }
    Ok(format!(
        "GET {}; POST {} (in {})",
        seen(&get),
        seen(&post),
        ms(took)
    ))
}

async fn source_not_listed(mesh: &Mesh) -> anyhow::Result<String> {
    mesh.platform
        .apply_policy(POLICY, &target_yaml("service-a", &Rule::Tcp(&[])))
        .await?;
    let took = until_allowed(mesh, &to_b("/echo", 3).method("POST")).await?;
    mesh.reset_counts().await?;
    let other = "app-d";
    let r = mesh.call(other, &to_b("/echo", 5)).await?;
    if !all_denied(&r, 5) {
        bail!("{other} (service-d): expected 5 of 5 refused: {}", seen(&r));
    }
    b_saw_nothing(mesh).await?;
    Ok(format!("{other}: {}; b saw 0 (in {})", seen(&r), ms(took)))
}

async fn port_not_listed(mesh: &Mesh) -> anyhow::Result<String> {
    let port = mesh.workloads[DEST]
        .inbound
        .context("b has no inbound listener")?
        .port();
    let other_port = if port == u16::MAX { port - 1 } else { port + 1 };
    mesh.platform
        .apply_policy(POLICY, &target_yaml("service-a", &Rule::Tcp(&[other_port])))
        .await?;
    let took = until_denied(mesh, CALLER, &to_b("/probe", 3)).await?;
    mesh.reset_counts().await?;
    let wrong = mesh.call(CALLER, &to_b("/echo", 5)).await?;
    if !all_denied(&wrong, 5) {
        bail!(
            "ports [{other_port}]: expected 5 of 5 refused: {}",
            seen(&wrong)
        );
    }
    b_saw_nothing(mesh).await?;
    mesh.platform
        .apply_policy(POLICY, &target_yaml("service-a", &Rule::Tcp(&[port])))
        .await?;
    until_allowed(mesh, &to_b("/probe", 3)).await?;
    let right = mesh.call(CALLER, &to_b("/echo", 5)).await?;
    if !(all_ok(&right, 5) && count(&right, B) == 5) {
        bail!(
            "ports [{port}]: expected 5 of 5 answered by b: {}",
            seen(&right)
        );
    }
    Ok(format!(
        "ports [{other_port}] {}; ports [{port}] {} (in {})",
        seen(&wrong),
        seen(&right),
        ms(took)
    ))
}

async fn revoked_on_open_connection(mesh: &Mesh) -> anyhow::Result<String> {
    mesh.platform
        .apply_policy(POLICY, &target_yaml("service-a", &Rule::Tcp(&[])))
        .await?;
    until_allowed(mesh, &to_b("/probe", 3)).await?;
    let proxy = mesh.workloads[CALLER]
        .outbound
        .context("app-a has no outbound listener")?;
    let url = format!("http://{DEST}.default/echo");
    let mut connection = client::Connection::open(proxy, CALLER).await?;
    let first = connection.send("GET", &url).await?;
    if first.status != 200 {
        bail!("before revoking: expected 200, got {first:?}");
    }
    mesh.platform.delete_policy(POLICY).await?;
    let revoked = tokio::time::Instant::now();
    let mut allowed_after = 0;
    loop {
        let answer = connection
            .send("GET", &url)
            .await
            .context("the proxy closed the kept-alive connection instead of answering 403")?;
        match (answer.status, answer.mesh_error.as_deref()) {
            (403, Some("forbidden")) => break,
            (200, _) => allowed_after += 1,
            _ => bail!("unexpected answer on the kept-alive connection: {answer:?}"),
        }
        if revoked.elapsed() > APPLY_WITHIN {
            bail!("still allowed {APPLY_WITHIN:?} after the TrafficTarget was deleted");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(format!(
        "403 forbidden on the same connection {} after deletion ({allowed_after} allowed meanwhile)",
        ms(revoked.elapsed())
    ))
}

async fn plaintext(mesh: &Mesh) -> anyhow::Result<String> {
    // service-a is allowed, so only the missing identity can refuse the plaintext caller.
    mesh.platform
        .apply_policy(POLICY, &target_yaml("service-a", &Rule::Tcp(&[])))
        .await?;
    until_allowed(mesh, &to_b("/probe", 3)).await?;
    mesh.reset_counts().await?;
    let inbound = mesh.workloads[DEST]
        .inbound
        .context("b has no inbound listener")?;
    let r = client::run(&CallPlan {
        url: format!("http://{inbound}/echo"),
        count: 5,
        method: "GET".into(),
        caller: Some(CALLER.into()),
        headers: Default::default(),
        proxy: None,
        timeout_ms: Some(3000),
        concurrency: None,
    })
    .await?;
    // Refused = a 403 from the mesh or no answer at all; never an app's answer.
    let refused = r.statuses.get(&403).copied().unwrap_or(0) + r.failed;
    if refused != 5 || !r.by_responder.is_empty() {
        bail!("expected 5 of 5 plaintext calls refused: {}", seen(&r));
    }
    b_saw_nothing(mesh).await?;
    Ok(format!("{}; b saw 0", seen(&r)))
}

/// A proxy claiming `service-a` with a certificate from another CA: while service-a is allowed,
/// its calls to b are refused (the client proxy rejects b's certificate, b's proxy the client's)
/// and b records nothing.
async fn foreign_ca(mesh: &Mesh) -> anyhow::Result<String> {
    mesh.platform
        .apply_policy(POLICY, &target_yaml("service-a", &Rule::Tcp(&[])))
        .await?;
    until_allowed(mesh, &to_b("/probe", 3)).await?;
    let foreign = mesh.start_foreign_caller().await?;
    // Wait until its controller knows b and its proxy holds its (foreign) certificate: then
    // what refuses the calls is the TLS between the meshes.
    let plan = |count| CallPlan {
        url: format!("http://{DEST}.default/echo"),
        count,
        method: "GET".into(),
        caller: Some("foreign".into()),
        headers: Default::default(),
        proxy: Some(foreign.outbound),
        timeout_ms: Some(3000),
        concurrency: None,
    };
    let start = tokio::time::Instant::now();
    loop {
        let r = client::run(&plan(1)).await?;
        let not_ready = ["unknown-destination", "no-identity"];
        if r.failed == 0 && !not_ready.iter().any(|e| r.mesh_errors.contains_key(*e)) {
            break;
        }
        if start.elapsed() > APPLY_WITHIN {
            bail!(
                "the foreign caller's controller never resolved {DEST}: {}",
                seen(&r)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mesh.reset_counts().await?;
    let r = client::run(&plan(5)).await?;
    if r.mesh_errors.get("tls-failed") != Some(&5) || !r.by_responder.is_empty() {
        bail!(
            "expected 5 of 5 refused by mTLS (502 tls-failed): {}",
            seen(&r)
        );
    }
    b_saw_nothing(mesh).await?;
    Ok(format!("{}; b saw 0", seen(&r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_documents_load_without_errors() {
        for rule in [
            Rule::Tcp(&[]),
            Rule::Tcp(&[8080]),
            Rule::Http {
                path: Some("/metrics"),
                methods: &["GET"],
            },
            Rule::Http {
                path: None,
                methods: &["GET"],
            },
        ] {
            let yaml = target_yaml("service-a", &rule);
            let report = trellis_smi::load::load_str("access.yaml", &yaml);
            assert!(report.errors.is_empty(), "{:?}\n{yaml}", report.errors);
            assert_eq!(report.resources.len(), 2, "{yaml}");
        }
    }
}
