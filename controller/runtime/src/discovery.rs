//! The platforms the controller discovers endpoints on, chosen on the command line
//! (`--platform file=PATH`, `consul=ADDR[,token-file=PATH][,datacenter=DC][,namespace=NS]`,
//! `cloudmap=NAMESPACE[,endpoint=URL]`, `kubernetes`, repeatable), built into one [`Merged`] view. Non-Kubernetes adapters are wrapped in
//! [`VersionSubsets`] (a backend `web-v2` is the `web` instances labelled `version=v2` when no
//! service `web-v2` exists); Kubernetes has a Service per version.
//!
//! `kubernetes` parses in every build; a build without the `kubernetes` feature refuses it when
//! connecting, saying so ([`crate::kubernetes::NOT_BUILT`]).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use trellis_discovery::{Discovery, Merged, VersionSubsets};

/// One `--platform` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Platform {
    File(PathBuf),
    Consul(ConsulPlatform),
    CloudMap {
        namespace: String,
        endpoint: Option<String>,
    },
    Kubernetes,
}

/// `consul=ADDR[,token-file=PATH][,datacenter=DC][,namespace=NS]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsulPlatform {
    /// The local agent's HTTP API.
    pub addr: String,
    /// A file holding the ACL token the catalog is read with (read when the controller starts;
    /// a token on the command line would show in `ps`). Absent: Consul's anonymous token.
    pub token_file: Option<PathBuf>,
    /// The datacenter to read; absent: the agent's.
    pub datacenter: Option<String>,
    /// The mesh namespace Consul OSS's services live in (default `default`).
    pub namespace: Option<String>,
}

impl ConsulPlatform {
    /// Defaults for an agent at `addr`.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            token_file: None,
            datacenter: None,
            namespace: None,
        }
    }

    fn config(&self) -> anyhow::Result<trellis_adapter_consul::ConsulConfig> {
        use anyhow::Context as _;
        let mut config = trellis_adapter_consul::ConsulConfig::new(self.addr.clone());
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading the Consul ACL token {}", path.display()))?;
            let token = token.trim();
            anyhow::ensure!(
                !token.is_empty(),
                "the Consul ACL token file {} is empty",
                path.display()
            );
            config.token = Some(trellis_adapter_consul::AclToken::new(token));
        }
        config.datacenter = self.datacenter.clone();
        if let Some(namespace) = &self.namespace {
            config.default_namespace = namespace.clone();
        }
        Ok(config)
    }
}

/// A `--platform` value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "--platform {value:?}: {message} (expected file=PATH, consul=ADDR[,token-file=PATH][,datacenter=DC][,namespace=NS], cloudmap=NAMESPACE[,endpoint=URL] or kubernetes)"
)]
pub struct PlatformError {
    value: String,
    message: String,
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let error = |message: &str| PlatformError {
            value: value.to_owned(),
            message: message.to_owned(),
        };
        let (kind, rest) = value.split_once('=').unwrap_or((value, ""));
        match kind {
            "kubernetes" if rest.is_empty() => Ok(Platform::Kubernetes),
            "kubernetes" => Err(error("kubernetes takes no value (it reads the kubeconfig)")),
            "file" if !rest.is_empty() => Ok(Platform::File(rest.into())),
            "consul" if !rest.is_empty() => {
                let mut parts = rest.split(',');
                let mut consul = ConsulPlatform::new(parts.next().unwrap_or_default());
                for part in parts {
                    match part.split_once('=') {
                        Some(("token-file", path)) if !path.is_empty() => {
                            consul.token_file = Some(path.into())
                        }
                        Some(("datacenter", dc)) if !dc.is_empty() => {
                            consul.datacenter = Some(dc.to_owned())
                        }
                        Some(("namespace", ns)) if !ns.is_empty() => {
                            consul.namespace = Some(ns.to_owned())
                        }
                        _ => return Err(error(&format!("unknown consul option {part:?}"))),
                    }
                }
                Ok(Platform::Consul(consul))
            }
            "cloudmap" if !rest.is_empty() => {
                let mut parts = rest.split(',');
                let namespace = parts.next().unwrap_or_default().to_owned();
                let mut endpoint = None;
                for part in parts {
                    match part.split_once('=') {
                        Some(("endpoint", url)) if !url.is_empty() => {
                            endpoint = Some(url.to_owned())
                        }
                        _ => return Err(error(&format!("unknown cloudmap option {part:?}"))),
                    }
                }
                Ok(Platform::CloudMap {
                    namespace,
                    endpoint,
                })
            }
            "file" | "consul" | "cloudmap" => Err(error("missing value after '='")),
            _ => Err(error(&format!("unknown platform {kind:?}"))),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Platform::File(path) => write!(f, "file={}", path.display()),
            Platform::Consul(consul) => {
                write!(f, "consul={}", consul.addr)?;
                if let Some(path) = &consul.token_file {
                    write!(f, ",token-file={}", path.display())?;
                }
                if let Some(dc) = &consul.datacenter {
                    write!(f, ",datacenter={dc}")?;
                }
                if let Some(ns) = &consul.namespace {
                    write!(f, ",namespace={ns}")?;
                }
                Ok(())
            }
            Platform::CloudMap {
                namespace,
                endpoint: None,
            } => write!(f, "cloudmap={namespace}"),
            Platform::CloudMap {
                namespace,
                endpoint: Some(url),
            } => {
                write!(f, "cloudmap={namespace},endpoint={url}")
            }
            Platform::Kubernetes => f.write_str("kubernetes"),
        }
    }
}

impl Platform {
    /// The adapter for this platform.
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn Discovery>> {
        use anyhow::Context as _;
        Ok(match self {
            Platform::File(path) => Arc::new(trellis_adapter_file::file_discovery(path.clone())),
            Platform::Consul(consul) => Arc::new(
                trellis_adapter_consul::ConsulDiscovery::with_version_subsets(
                    consul
                        .config()
                        .with_context(|| format!("platform {self}"))?,
                )
                .with_context(|| format!("platform {self}"))?,
            ),
            Platform::CloudMap {
                namespace,
                endpoint,
            } => {
                let options = trellis_adapter_cloudmap::CloudMapOptions {
                    namespaces: vec![namespace.clone()],
                    endpoint_url: endpoint.clone(),
                    ..Default::default()
                };
                let adapter = trellis_adapter_cloudmap::CloudMap::connect(options)
                    .await
                    .with_context(|| format!("platform {self}"))?;
                Arc::new(VersionSubsets::new(adapter))
            }
            Platform::Kubernetes => crate::kubernetes::discovery(&self.to_string()).await?,
        })
    }
}

/// Every platform, then the ready-made `adapters`, as one [`Merged`] view (the first listed wins
/// an address conflict).
pub async fn connect_all(
    platforms: &[Platform],
    adapters: &[Arc<dyn Discovery>],
) -> anyhow::Result<Merged> {
    let mut sources = Vec::new();
    for platform in platforms {
        sources.push(platform.connect().await?);
    }
    sources.extend(adapters.iter().cloned());
    Ok(Merged::new(sources))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            "file=/x.yaml".parse::<Platform>().unwrap(),
            Platform::File("/x.yaml".into())
        );
        assert_eq!(
            "consul=127.0.0.1:8500".parse::<Platform>().unwrap(),
            Platform::Consul(ConsulPlatform::new("127.0.0.1:8500"))
        );
        assert_eq!(
            "cloudmap=demo,endpoint=http://127.0.0.1:5000"
                .parse::<Platform>()
                .unwrap(),
            Platform::CloudMap {
                namespace: "demo".into(),
                endpoint: Some("http://127.0.0.1:5000".into())
            }
        );
        assert_eq!(
            "kubernetes".parse::<Platform>().unwrap(),
            Platform::Kubernetes
        );
        let consul: Platform =
            "consul=127.0.0.1:8500,token-file=/etc/trellis/consul.token,datacenter=dc2,namespace=shop"
                .parse()
                .unwrap();
        assert_eq!(
            consul,
            Platform::Consul(ConsulPlatform {
                addr: "127.0.0.1:8500".into(),
                token_file: Some("/etc/trellis/consul.token".into()),
                datacenter: Some("dc2".into()),
                namespace: Some("shop".into()),
            })
        );
        assert_eq!(
            consul.to_string(),
            "consul=127.0.0.1:8500,token-file=/etc/trellis/consul.token,datacenter=dc2,namespace=shop"
        );
        for bad in [
            "file=",
            "nomad=x",
            "cloudmap=demo,region=x",
            "kubernetes=x",
            "consul=127.0.0.1:8500,token=secret",
            "consul=127.0.0.1:8500,token-file=",
        ] {
            let e = bad.parse::<Platform>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("expected"), "{e}");
        }
        let p: Platform = "cloudmap=demo,endpoint=http://h".parse().unwrap();
        assert_eq!(p.to_string(), "cloudmap=demo,endpoint=http://h");
    }
}
