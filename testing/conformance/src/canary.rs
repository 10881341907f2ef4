//! The pieces of a Flagger-style canary as real processes: a controller, pods (an echo app
//! behind its inbound `trellis-proxy`, labelled with its Deployment), a meshed caller, the
//! Services Flagger creates and the TrafficSplit in each version Flagger writes
//! (../shared/flagger/CONTRACT.md sections 1, 2, 5).
//!
//! - This module: the file platform on loopback ([`Controller`]: the services file Flagger's
//!   Services amount to, the split as a policy file), and the pods and caller on loopback or on a
//!   host ([`Pod::start_at`], [`Caller::start_at`]).
//! - [`kubernetes`]: the same on Kubernetes (the fake API server, or a real one), through the
//!   API as Flagger and the cluster's controllers write it, with the split's version
//!   conversion served by the controller's webhook.
//! - [`replay`]: a whole Flagger run, the same steps on either ([`replay::Stage`]).

pub mod kubernetes;
pub mod replay;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::harness::hosts::Place;
use crate::harness::mesh::TRUST_DOMAIN;
use crate::harness::platform::write_atomic;
use crate::harness::process::{self, Process};
use trellis_echo::client::{CallPlan, CallReport, run as call};
use trellis_echo::plain as http;

/// The namespace of Flagger's examples.
pub const NAMESPACE: &str = "test";
/// The port of the apex, primary and canary Services (podinfo's `http`).
pub const PORT: u16 = 9898;

/// A `trellis controller` on the file platform with a watched policy directory.
#[derive(Debug)]
pub struct Controller {
    _process: Process,
    pub grpc: SocketAddr,
    /// Its admin port (`/api/v1/state`, and the TrafficMetrics API with `--prometheus`).
    pub admin: SocketAddr,
    pub services: PathBuf,
    pub policy: PathBuf,
}

impl Controller {
    /// Starts a permissive controller (the split is under test, not access) over `dir`.
    pub async fn start(dir: &Path, log_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, log_dir, &[]).await
    }

    /// Like [`Controller::start`], with `extra` flags (e.g. `--prometheus URL`).
    pub async fn start_with(dir: &Path, log_dir: &Path, extra: &[String]) -> anyhow::Result<Self> {
        let services = dir.join("services.yaml");
        write_atomic(
            &services,
            &format!("namespace: {NAMESPACE}\nservices: []\n"),
        )?;
        let policy = dir.join("policy");
        std::fs::create_dir_all(&policy)?;
        let mut process = Process::spawn(
            "controller",
            &process::binary(process::TRELLIS)?,
            &[
                "controller".into(),
                "--platform".into(),
                format!("file={}", services.display()),
                "--policy".into(),
                policy.display().to_string(),
                "--permissive".into(),
                "--grpc".into(),
                "127.0.0.1:0".into(),
                "--admin".into(),
                "127.0.0.1:0".into(),
            ]
            .into_iter()
            .chain(extra.iter().cloned())
            .collect::<Vec<String>>(),
            &[],
            log_dir,
        )?;
        let grpc = process
            .wait_line("`grpc listening on ADDR`", process::START_TIMEOUT, |l| {
                l.strip_prefix("grpc listening on ")?.parse().ok()
            })
            .await?;
        // Printed right after the gRPC line.
        let admin = process
            .wait_line("`admin listening on ADDR`", process::START_TIMEOUT, |l| {
                l.strip_prefix("admin listening on ")?.parse().ok()
            })
            .await?;
        Ok(Self {
            _process: process,
            grpc,
            admin,
            services,
            policy,
        })
    }

    /// Writes the services file: the apex `podinfo` and `podinfo-primary` select the primary
    /// pods, `podinfo-canary` the canary pods (none when the canary is scaled to zero).
    pub fn services(&self, primary: &[&Pod], canary: &[&Pod]) -> anyhow::Result<()> {
        let mut yaml = format!("namespace: {NAMESPACE}\nservices:\n");
        for (name, pods) in [
            ("podinfo", primary),
            ("podinfo-primary", primary),
            ("podinfo-canary", canary),
        ] {
            yaml.push_str(&format!(
                "  - name: {name}\n    ports: [{{ name: http, port: {PORT}, protocol: http }}]\n    endpoints:{}\n",
                if pods.is_empty() { " []" } else { "" }
            ));
            for pod in pods {
                yaml.push_str(&format!(
                    "      - {{ address: {}, port: {}, service_account: podinfo, owner: {{ kind: Deployment, name: {} }} }}\n",
                    pod.inbound.ip(),
                    pod.inbound.port(),
                    pod.deployment
                ));
            }
        }
        write_atomic(&self.services, &yaml)
    }

    /// Writes the TrafficSplit `podinfo` as Flagger's router for `version` does: backends canary
    /// then primary, weights summing to 100 (quantity strings in v1alpha1).
    pub fn split(&self, version: SplitVersion, canary: u32) -> anyhow::Result<()> {
        write_atomic(&self.policy.join("split.yaml"), &version.yaml(canary))
    }
}

/// The TrafficSplit versions Flagger writes, by provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitVersion {
    /// `linkerd`, `smi:v1alpha1`: weights as quantity strings.
    V1alpha1,
    /// `osm`, `smi:v1alpha2`.
    V1alpha2,
    /// `smi:v1alpha3`.
    V1alpha3,
}

impl SplitVersion {
    pub const ALL: [SplitVersion; 3] = [
        SplitVersion::V1alpha1,
        SplitVersion::V1alpha2,
        SplitVersion::V1alpha3,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SplitVersion::V1alpha1 => "v1alpha1",
            SplitVersion::V1alpha2 => "v1alpha2",
            SplitVersion::V1alpha3 => "v1alpha3",
        }
    }

    /// The document Flagger's PUT carries for canary weight `canary`.
    pub fn yaml(self, canary: u32) -> String {
        let primary = 100 - canary;
        let (c, p) = match self {
            SplitVersion::V1alpha1 => (format!("\"{canary}\""), format!("\"{primary}\"")),
            _ => (canary.to_string(), primary.to_string()),
        };
        format!(
            "apiVersion: split.smi-spec.io/{}\nkind: TrafficSplit\nmetadata:\n  name: podinfo\n  namespace: {NAMESPACE}\nspec:\n  service: podinfo\n  backends:\n  - service: podinfo-canary\n    weight: {c}\n  - service: podinfo-primary\n    weight: {p}\n",
            self.name()
        )
    }
}

/// One pod: an echo app (service `podinfo`, version = its Deployment's revision) behind its
/// inbound proxy, labelled with its Deployment.
#[derive(Debug)]
pub struct Pod {
    pub deployment: String,
    pub version: String,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// The app itself (its `/_echo/counts`).
    pub app: SocketAddr,
    _app: Process,
    _proxy: Process,
}

impl Pod {
    /// Starts a pod of `deployment` running `version`, its proxy on `ip` (any port) and exposing
    /// the `osm`, `linkerd` and `istio` metric names, on loopback with no identity.
    pub async fn start(
        deployment: &str,
        version: &str,
        ip: IpAddr,
        grpc: SocketAddr,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let place = Place { netns: None, ip };
        Self::start_at(deployment, version, &place, 0, grpc, None, log_dir).await
    }

    /// Starts a pod at `place`: on a host (a network namespace) the app, the inbound listener
    /// (`inbound_port`) and the admin listener are on the host's address, as in a pod; on
    /// loopback the app and the admin listener are on 127.0.0.1. With `identity`, the proxy
    /// proves its ServiceAccount with that token file (mTLS).
    pub async fn start_at(
        deployment: &str,
        version: &str,
        place: &Place,
        inbound_port: u16,
        grpc: SocketAddr,
        identity: Option<&Path>,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let tag = format!("{deployment}-{version}");
        let local = local_ip(place);
        let mut app = Process::spawn_in(
            place.netns.as_deref(),
            &format!("app-{tag}"),
            &process::binary(process::ECHO)?,
            &[
                "--service".into(),
                "podinfo".into(),
                "--version".into(),
                version.into(),
                "--listen".into(),
                SocketAddr::new(local, 0).to_string(),
            ],
            &[],
            log_dir,
        )?;
        let app_addr = app.listening_on().await?;
        let mut args: Vec<String> = vec![
            "--controller".into(),
            format!("http://{grpc}"),
            "--workload".into(),
            format!("{NAMESPACE}/podinfo"),
            "--workload-name".into(),
            deployment.into(),
            "--metrics-compat".into(),
            "osm,linkerd,istio".into(),
            "--admin".into(),
            SocketAddr::new(local, 0).to_string(),
            "--inbound".into(),
            format!("{}={app_addr}", SocketAddr::new(place.ip, inbound_port)),
            "--threads".into(),
            "1".into(),
        ];
        args.extend(identity_args(identity));
        let mut proxy = Process::spawn_in(
            place.netns.as_deref(),
            &format!("proxy-{tag}"),
            &process::binary(process::PROXY)?,
            &args,
            &[],
            log_dir,
        )?;
        let line = proxy
            .wait_line("`trellis-proxy started`", process::START_TIMEOUT, |l| {
                l.contains("trellis-proxy started").then(|| l.to_owned())
            })
            .await?;
        if identity.is_some() {
            wait_certificate(&mut proxy).await?;
        }
        let pod = Self {
            deployment: deployment.into(),
            version: version.into(),
            inbound: process::traced_addr(&line, "inbound").context("inbound address")?,
            admin: process::traced_addr(&line, "admin").context("admin address")?,
            app: app_addr,
            _app: app,
            _proxy: proxy,
        };
        pod.ready().await?;
        Ok(pod)
    }

    /// How many requests the app has answered since its last [`Pod::reset`].
    pub async fn answered(&self) -> anyhow::Result<u64> {
        let reply = http::request(self.app, http::Method::GET, "/_echo/counts", None).await?;
        let counts: trellis_echo::echo::Counts = serde_json::from_slice(&reply.body)?;
        Ok(counts.total)
    }

    /// Zeroes the app's counts.
    pub async fn reset(&self) -> anyhow::Result<()> {
        http::request(self.app, http::Method::POST, "/_echo/reset", None).await?;
        Ok(())
    }

    /// Waits until the proxy's `/ready` says 200, as a kubelet's readiness probe would before
    /// the pod's address joins its Services' endpoints.
    async fn ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let reply = http::request(self.admin, http::Method::GET, "/ready", None).await?;
            if reply.status == 200 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} {}: not ready within 10 s: {}",
                    self.deployment,
                    self.version,
                    reply.text()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A meshed client (the loadtester): a proxy with an outbound HTTP listener.
#[derive(Debug)]
pub struct Caller {
    _proxy: Process,
    pub outbound: SocketAddr,
    /// Its admin listener (`/metrics`: the callers' side of every split).
    pub admin: SocketAddr,
}

impl Caller {
    /// A caller on loopback with no identity.
    pub async fn start(grpc: SocketAddr, log_dir: &Path) -> anyhow::Result<Self> {
        let place = Place {
            netns: None,
            ip: IpAddr::from([127, 0, 0, 1]),
        };
        Self::start_at(&place, grpc, None, log_dir).await
    }

    /// A caller at `place` (its listeners on the place's address), proving its ServiceAccount
    /// with the `identity` token file when one is given.
    pub async fn start_at(
        place: &Place,
        grpc: SocketAddr,
        identity: Option<&Path>,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let any_port = SocketAddr::new(place.ip, 0).to_string();
        let mut args: Vec<String> = vec![
            "--controller".into(),
            format!("http://{grpc}"),
            "--workload".into(),
            format!("{NAMESPACE}/loadtester"),
            "--admin".into(),
            any_port.clone(),
            "--outbound-http".into(),
            any_port,
            "--threads".into(),
            "1".into(),
        ];
        args.extend(identity_args(identity));
        let mut proxy = Process::spawn_in(
            place.netns.as_deref(),
            "proxy-loadtester",
            &process::binary(process::PROXY)?,
            &args,
            &[],
            log_dir,
        )?;
        let (outbound, admin) = proxy
            .wait_line("`trellis-proxy started`", process::START_TIMEOUT, |l| {
                Some((
                    process::traced_addr(l, "http")?,
                    process::traced_addr(l, "admin")?,
                ))
            })
            .await?;
        if identity.is_some() {
            wait_certificate(&mut proxy).await?;
        }
        Ok(Self {
            _proxy: proxy,
            outbound,
            admin,
        })
    }

    /// `count` GETs of `http://<service>.test:9898<path>` on one keep-alive connection.
    pub async fn batch(&self, service: &str, path: &str, count: u32) -> anyhow::Result<CallReport> {
        call(&CallPlan {
            url: format!("http://{service}.{NAMESPACE}:{PORT}{path}"),
            count,
            method: "GET".into(),
            caller: Some("loadtester".into()),
            headers: Default::default(),
            proxy: Some(self.outbound),
            timeout_ms: Some(5000),
            concurrency: None,
        })
        .await
    }
}

/// The address a pod's app and admin listener bind: the host's on a host (reachable from the
/// test's leg on the bridge), 127.0.0.1 on loopback.
fn local_ip(place: &Place) -> IpAddr {
    if place.netns.is_some() {
        place.ip
    } else {
        IpAddr::from([127, 0, 0, 1])
    }
}

/// The proxy flags for proving a ServiceAccount with a token file.
fn identity_args(identity: Option<&Path>) -> Vec<String> {
    identity
        .map(|token| {
            vec![
                "--identity-token-file".into(),
                token.display().to_string(),
                "--trust-domain".into(),
                TRUST_DOMAIN.into(),
            ]
        })
        .unwrap_or_default()
}

/// Waits until a proxy with an identity holds its certificate (before that it refuses mTLS).
async fn wait_certificate(proxy: &mut Process) -> anyhow::Result<()> {
    proxy
        .wait_line("`certificate obtained`", process::START_TIMEOUT, |l| {
            l.contains("certificate obtained").then_some(())
        })
        .await
}

/// `count` GETs of `path` straight to a pod's inbound proxy, which must all be answered.
pub async fn send_direct(pod: &Pod, path: &str, count: u32) -> anyhow::Result<()> {
    let report = call(&CallPlan {
        url: format!("http://{}{path}", pod.inbound),
        count,
        method: "GET".into(),
        caller: Some("loadtester".into()),
        headers: Default::default(),
        proxy: None,
        timeout_ms: Some(5000),
        concurrency: None,
    })
    .await?;
    if report.failed > 0 {
        bail!("{} of {count} requests to {path} failed", report.failed);
    }
    Ok(())
}

/// Flagger's two Deployments on loopback behind `controller`: the canary `podinfo` (6.0.1) and
/// the primary `podinfo-primary` (6.0.0), in that order.
pub async fn podinfo_pair(controller: &Controller, log_dir: &Path) -> anyhow::Result<(Pod, Pod)> {
    let loopback = IpAddr::from([127, 0, 0, 1]);
    let canary = Pod::start("podinfo", "6.0.1", loopback, controller.grpc, log_dir).await?;
    let primary = Pod::start(
        "podinfo-primary",
        "6.0.0",
        loopback,
        controller.grpc,
        log_dir,
    )
    .await?;
    Ok((canary, primary))
}

/// Waits (15 s at most) until `caller`'s proxy sends every request for `podinfo` to the canary
/// (6.0.1), as it does once a 100% split has reached it.
pub async fn wait_canary_only(caller: &Caller) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = caller.batch("podinfo", "/api", 20).await?;
        if r.by_responder.get("podinfo/6.0.1") == Some(&20) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the split never sent podinfo to the canary only: {r:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_written_as_flaggers_router_writes_them() {
        let v1 = SplitVersion::V1alpha1.yaml(10);
        assert!(v1.contains("split.smi-spec.io/v1alpha1"), "{v1}");
        assert!(
            v1.contains("- service: podinfo-canary\n    weight: \"10\"\n  - service: podinfo-primary\n    weight: \"90\""),
            "{v1}"
        );
        let v3 = SplitVersion::V1alpha3.yaml(30);
        assert!(
            v3.contains("weight: 30\n") && v3.contains("weight: 70\n"),
            "{v3}"
        );
        for v in [
            SplitVersion::V1alpha1,
            SplitVersion::V1alpha2,
            SplitVersion::V1alpha3,
        ] {
            let report = trellis_smi::load::load_str("split.yaml", &v.yaml(40));
            assert!(report.errors.is_empty(), "{:?}", report.errors);
        }
    }
}
