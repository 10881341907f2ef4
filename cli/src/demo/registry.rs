//! Where `trellis demo --platform ...` registers the two versions of `web`, and the local
//! stand-ins it starts for the platforms that are not files:
//!
//! - `file`: the services file (the embedded demo services), as before;
//! - `consul`: the Consul double (`trellis-consul-double`, a faithful double of Consul's catalog
//!   and health HTTP API, blocking queries included), both versions registered through
//!   `PUT /v1/catalog/register` with `version` and `service-account` meta, as an agent would;
//! - `cloudmap`: moto's Cloud Map (`moto_server`), a `demo` HTTP namespace and a `web` service
//!   with one instance per version (`AWS_INSTANCE_IPV4`, `AWS_INSTANCE_PORT`, `SERVICE_ACCOUNT`,
//!   `version`), through the real AWS SDK;
//! - `mixed`: v1 in Consul and v2 in Cloud Map, one mesh over both (the controller merges them).
//!
//! The stand-ins are child processes killed with the demo. Consul OSS has one namespace, so the
//! Consul adapter maps its services into the demo's namespace `demo`; the Cloud Map namespace is
//! called `demo` too. Versions come from the `version` meta/attribute: a split backend `web-v2`
//! is the `web` instances labelled `version=v2`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use trellis_adapter_cloudmap::{CloudMapOptions, StaticCredentials};
use trellis_discovery::{Discovery, VersionSubsets};
use trellis_echo::plain::{Method, request};

use super::NAMESPACE;

/// Which platform the demo registers `web` on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoPlatform {
    /// The services file (nothing else to run).
    #[default]
    File,
    /// The Consul double (`trellis-consul-double`).
    Consul,
    /// Cloud Map on moto (`moto_server`).
    Cloudmap,
    /// web v1 in Consul, web v2 in Cloud Map.
    Mixed,
}

/// The stand-ins of one demo run.
pub struct Registry {
    platform: DemoPlatform,
    consul: Option<(Child, SocketAddr)>,
    cloudmap: Option<CloudMap>,
}

struct CloudMap {
    _moto: Child,
    options: CloudMapOptions,
    service_id: String,
}

impl Registry {
    /// Starts what `platform` needs.
    pub async fn start(platform: DemoPlatform) -> anyhow::Result<Self> {
        let consul = matches!(platform, DemoPlatform::Consul | DemoPlatform::Mixed);
        let cloudmap = matches!(platform, DemoPlatform::Cloudmap | DemoPlatform::Mixed);
        Ok(Self {
            platform,
            consul: if consul {
                Some(start_consul().await?)
            } else {
                None
            },
            cloudmap: if cloudmap {
                Some(start_cloudmap().await?)
            } else {
                None
            },
        })
    }

    /// The controller's adapters for the stand-ins (none on the file platform).
    pub async fn adapters(&self) -> anyhow::Result<Vec<Arc<dyn Discovery>>> {
        let mut out: Vec<Arc<dyn Discovery>> = Vec::new();
        if let Some((_, addr)) = &self.consul {
            let config = trellis_adapter_consul::ConsulConfig {
                default_namespace: NAMESPACE.into(),
                ..trellis_adapter_consul::ConsulConfig::new(addr.to_string())
            };
            out.push(Arc::new(
                trellis_adapter_consul::ConsulDiscovery::with_version_subsets(config)
                    .context("the Consul adapter")?,
            ));
        }
        if let Some(cloudmap) = &self.cloudmap {
            let adapter = trellis_adapter_cloudmap::CloudMap::connect(cloudmap.options.clone())
                .await
                .context("the Cloud Map adapter")?;
            out.push(Arc::new(VersionSubsets::new(adapter)));
        }
        Ok(out)
    }

    /// Registers `web` version `version` at `addr` (its inbound proxy), where this platform keeps
    /// it. `false` on the file platform: the caller rewrites the services file.
    pub async fn register(&self, version: &str, addr: SocketAddr) -> anyhow::Result<bool> {
        let on_consul = match self.platform {
            DemoPlatform::File => return Ok(false),
            DemoPlatform::Consul => true,
            DemoPlatform::Cloudmap => false,
            DemoPlatform::Mixed => version == "v1",
        };
        if on_consul {
            let (_, consul) = self.consul.as_ref().context("Consul is not running")?;
            register_consul(*consul, version, addr).await?;
        } else {
            let cloudmap = self.cloudmap.as_ref().context("Cloud Map is not running")?;
            register_cloudmap(cloudmap, version, addr).await?;
        }
        Ok(true)
    }

    /// Where web is registered, in words.
    pub fn platform_text(&self) -> &'static str {
        match self.platform {
            DemoPlatform::File => "platform file: the services file",
            DemoPlatform::Consul => "platform consul: web registered in the Consul double",
            DemoPlatform::Cloudmap => "platform cloudmap: web registered in Cloud Map on moto",
            DemoPlatform::Mixed => {
                "platforms consul and cloudmap: web v1 in the Consul double, v2 in Cloud Map on moto"
            }
        }
    }

    /// One line per stand-in, for the demo's introduction.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some((_, addr)) = &self.consul {
            out.push(format!(
                "  consul      the Consul double at http://{addr} (try: curl http://{addr}/v1/health/service/web)"
            ));
        }
        if let Some(cloudmap) = &self.cloudmap {
            out.push(format!(
                "  cloudmap    moto at {} (namespace {NAMESPACE}, service web)",
                cloudmap.options.endpoint_url.as_deref().unwrap_or_default()
            ));
        }
        out
    }
}

/// A program next to this executable (the workspace's target directory), else on `PATH`.
fn sibling_or_path(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(name))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Starts `program args`, killed with the demo, and reads its stdout until `parse` accepts a
/// line (at most 20 s).
async fn spawn_until<T>(
    program: &PathBuf,
    args: &[&str],
    missing: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<(Child, T)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}: {missing}", program.display()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(found) = parse(&line) {
                return Ok(found);
            }
        }
        bail!("{} exited before it was ready", program.display())
    })
    .await
    .with_context(|| format!("{} was not ready within 20 s", program.display()))??;
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, found))
}

async fn start_consul() -> anyhow::Result<(Child, SocketAddr)> {
    let program = sibling_or_path("trellis-consul-double");
    spawn_until(
        &program,
        &["--listen", "127.0.0.1:0"],
        "the Consul double is needed: build it with `cargo build --release -p trellis-consul-double`",
        |line| {
            line.trim()
                .strip_prefix("listening on ")?
                .trim_start_matches("http://")
                .parse()
                .ok()
        },
    )
    .await
}

async fn start_cloudmap() -> anyhow::Result<CloudMap> {
    let program = std::env::var_os("TRELLIS_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("moto_server"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let port_text = port.to_string();
    // moto logs its banner to stderr; readiness is its port accepting connections.
    let mut moto = Command::new(&program)
        .args(["-H", "127.0.0.1", "-p", &port_text])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {}: moto is needed for Cloud Map (`pip install 'moto[server]'`, or set TRELLIS_MOTO_SERVER; scripts/test installs it in ~/.cache/trellis/venv)",
                program.display()
            )
        })?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Ok(Some(status)) = moto.try_wait() {
            bail!("{} exited ({status}) before it listened", program.display());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{} did not listen on {addr} within 30 s", program.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let options = CloudMapOptions {
        namespaces: vec![NAMESPACE.into()],
        endpoint_url: Some(format!("http://{addr}")),
        region: Some("us-east-1".into()),
        // moto accepts any keys; nothing here reaches AWS.
        credentials: Some(StaticCredentials::new("demo", "demo")),
        ..Default::default()
    };
    let client = trellis_adapter_cloudmap::explicit_client(&options);
    client
        .create_http_namespace()
        .name(NAMESPACE)
        .send()
        .await
        .context("CreateHttpNamespace")?;
    let namespaces = client
        .list_namespaces()
        .send()
        .await
        .context("ListNamespaces")?;
    let namespace_id = namespaces
        .namespaces()
        .iter()
        .find(|ns| ns.name() == Some(NAMESPACE))
        .and_then(|ns| ns.id())
        .context("the demo namespace is missing after CreateHttpNamespace")?;
    let created = client
        .create_service()
        .name("web")
        .namespace_id(namespace_id)
        .send()
        .await
        .context("CreateService web")?;
    let service_id = created
        .service()
        .and_then(|s| s.id())
        .context("CreateService web returned no id")?
        .to_owned();
    Ok(CloudMap {
        _moto: moto,
        options,
        service_id,
    })
}

async fn register_consul(
    consul: SocketAddr,
    version: &str,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let id = format!("web-{version}");
    let body = serde_json::json!({
        "Node": id,
        "Address": addr.ip().to_string(),
        "Service": {
            "ID": id,
            "Service": "web",
            "Address": addr.ip().to_string(),
            "Port": addr.port(),
            "Meta": {"version": version, "service-account": "web"},
        },
        "Check": {"CheckID": format!("service:{id}"), "Name": "ready", "Status": "passing", "ServiceID": id},
    });
    let reply = request(
        consul,
        Method::PUT,
        "/v1/catalog/register",
        Some(serde_json::to_vec(&body)?),
    )
    .await?;
    if reply.status != 200 {
        bail!(
            "registering {id} in Consul: HTTP {}: {}",
            reply.status,
            reply.text()
        );
    }
    Ok(())
}

async fn register_cloudmap(
    cloudmap: &CloudMap,
    version: &str,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let client = trellis_adapter_cloudmap::explicit_client(&cloudmap.options);
    let attributes = [
        ("AWS_INSTANCE_IPV4", addr.ip().to_string()),
        ("AWS_INSTANCE_PORT", addr.port().to_string()),
        ("SERVICE_ACCOUNT", "web".to_owned()),
        ("version", version.to_owned()),
        ("protocol", "http".to_owned()),
    ];
    client
        .register_instance()
        .service_id(&cloudmap.service_id)
        .instance_id(format!("web-{version}"))
        .set_attributes(Some(
            attributes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        ))
        .send()
        .await
        .with_context(|| format!("RegisterInstance web-{version}"))?;
    Ok(())
}
