//! The application probes the injector rewrote, as handed to the proxy in
//! `TRELLIS_PROXY_APP_PROBES` (`--app-probes`): JSON, the admin path the kubelet now probes ->
//! what the proxy must check for it.
//!
//! ```json
//! {"/app-probe/web/liveness": {"port": 8080, "path": "/healthz", "scheme": "HTTP",
//!                              "headers": [{"name": "X-Probe", "value": "1"}]},
//!  "/app-probe/web/readiness": {"tcp": 8080}}
//! ```
//!
//! Why the probes move: the kubelet probes from outside the pod without a mesh identity, so the
//! inbound proxy (deny by default) would refuse it; leaving the app's port out of interception
//! instead would leave that port open to anyone without mTLS. The admin port is never
//! intercepted, and the proxy probes the app on 127.0.0.1 from inside the pod.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Prefix of every rewritten probe's path on the admin port: `/app-probe/<container>/<kind>`.
pub const PATH_PREFIX: &str = "/app-probe/";

/// The admin path of one container's probe (`kind`: liveness, readiness or startup).
pub fn path(container: &str, kind: &str) -> String {
    format!("{PATH_PREFIX}{container}/{kind}")
}

/// Every rewritten probe of a pod, by admin path.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// One original probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AppProbe {
    /// `tcpSocket`: the probe passes when a TCP connection to 127.0.0.1:`tcp` opens.
    Tcp {
        tcp: u16,
        /// The probe's `timeoutSeconds` (absent: 1, the kubelet's default).
        #[serde(
            default,
            rename = "timeoutSeconds",
            skip_serializing_if = "Option::is_none"
        )]
        timeout_seconds: Option<u32>,
    },
    /// `httpGet`: GET `scheme`://127.0.0.1:`port``path` with `headers`; 2xx and 3xx pass.
    Http {
        port: u16,
        #[serde(default = "root")]
        path: String,
        /// `HTTP` or `HTTPS` (the app's certificate is not verified, as the kubelet does not).
        #[serde(default = "http")]
        scheme: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<Header>,
        /// The probe's `timeoutSeconds` (absent: 1, the kubelet's default).
        #[serde(
            default,
            rename = "timeoutSeconds",
            skip_serializing_if = "Option::is_none"
        )]
        timeout_seconds: Option<u32>,
    },
}

/// One `httpHeaders` entry of an `httpGet` probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

fn root() -> String {
    "/".into()
}

fn http() -> String {
    "HTTP".into()
}

/// Parses `TRELLIS_PROXY_APP_PROBES`; the error names what is wrong and where.
pub fn parse(json: &str) -> Result<AppProbes, serde_json::Error> {
    serde_json::from_str(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let probes = parse(
            r#"{"/app-probe/web/liveness": {"port": 8080, "path": "/healthz", "scheme": "HTTP",
                 "headers": [{"name": "X-Probe", "value": "1"}]},
                "/app-probe/web/readiness": {"tcp": 8080, "timeoutSeconds": 3}}"#,
        )
        .unwrap();
        assert_eq!(
            probes["/app-probe/web/liveness"],
            AppProbe::Http {
                port: 8080,
                path: "/healthz".into(),
                scheme: "HTTP".into(),
                headers: vec![Header {
                    name: "X-Probe".into(),
                    value: "1".into()
                }],
                timeout_seconds: None,
            }
        );
        assert_eq!(
            probes["/app-probe/web/readiness"],
            AppProbe::Tcp {
                tcp: 8080,
                timeout_seconds: Some(3)
            }
        );
        let again = parse(&serde_json::to_string(&probes).unwrap()).unwrap();
        assert_eq!(again, probes);
        assert!(parse(r#"{"/app-probe/a/b": {"port": "http"}}"#).is_err());
    }
}
