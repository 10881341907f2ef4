//! The local agent's service API, the way a host registers its services with Consul:
//! `PUT /v1/agent/service/register` turns an agent service definition into a catalog
//! registration on the double's own node (what Consul's agent does through anti-entropy) and runs
//! its checks; `PUT /v1/agent/service/deregister/:id` removes the instance and stops its checks;
//! `PUT /v1/agent/check/{pass,warn,fail}/:id` feeds TTL checks.
//!
//! Checks, as Consul's agent runs them: a new check is `critical` unless its definition gives a
//! `Status`; HTTP checks are `passing` on a 2xx answer, `warning` on 429 and `critical` otherwise;
//! TCP checks are `passing` when a connection opens; both run every `Interval` with a `Timeout`
//! (default 10 s); a TTL check goes `critical` when no update came within its `TTL`. A result is
//! written to the catalog only when the status changes, so a steady check does not wake blocking
//! queries. Where this differs from Consul (the first run is immediate, not staggered over the
//! interval; only `http://` URLs) is in the README's "Fidelity".

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Shared, lock};
use crate::duration::parse_go_duration;
use crate::state::{VALID_STATUSES, WriteError};
use crate::wire::{
    AgentCheck, AgentServiceRegistration, CheckDefinition, DeregisterRequest, RegisterRequest,
    ServiceDefinition,
};

/// The node the double's agent runs on: services registered through the agent API are
/// instances on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Consul's `-node` (a real agent defaults to the hostname).
    pub node_name: String,
    /// Consul's `-advertise` address: what an instance registered without `Address` is reached at.
    pub node_address: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_name: "trellis-consul-double".to_owned(),
            node_address: "127.0.0.1".to_owned(),
        }
    }
}

/// The node check every Consul agent keeps on its own node (gossip health).
pub const SERF_HEALTH: &str = "serfHealth";
/// Consul's default `Timeout` of HTTP and TCP checks.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of an HTTP check's answer kept as its output (Consul keeps 4 KiB).
const OUTPUT_CAP: usize = 4096;

/// Why an agent request was refused, with the status Consul answers it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AgentError {
    /// 400: a definition Consul would refuse (or one the double cannot run).
    Invalid(WriteError),
    /// 404: no such service or check on this agent.
    NotFound(String),
    /// 500: a TTL update for a check that has no TTL (Consul answers it with 500).
    NotTtl(String),
}

impl From<WriteError> for AgentError {
    fn from(e: WriteError) -> Self {
        AgentError::Invalid(e)
    }
}

/// How a check finds out its status.
#[derive(Clone, Debug)]
enum Probe {
    Http {
        url: String,
        method: String,
        headers: Vec<(String, String)>,
        timeout: Duration,
        interval: Duration,
    },
    Tcp {
        addr: String,
        timeout: Duration,
        interval: Duration,
    },
    Ttl(Duration),
}

/// One check of a definition, validated: its catalog entry and how to run it.
#[derive(Clone, Debug)]
struct Planned {
    check: CheckDefinition,
    probe: Probe,
}

/// A check the agent is running.
#[derive(Debug)]
pub(super) struct RunningCheck {
    service_id: String,
    namespace: String,
    cancel: CancellationToken,
    /// Set for TTL checks: an update restarts the TTL.
    ttl_reset: Option<Arc<Notify>>,
}

fn invalid(message: impl Into<String>) -> WriteError {
    WriteError(message.into())
}

fn duration(field: &str, value: &str) -> Result<Option<Duration>, WriteError> {
    if value.is_empty() {
        return Ok(None);
    }
    parse_go_duration(value)
        .map(Some)
        .ok_or_else(|| invalid(format!("Invalid duration for {field}: {value:?}")))
}

/// Validates one check of the service `service_id` (`index` of `count` checks) and picks its ID,
/// name and initial status as Consul's agent does.
fn plan_check(
    def: &AgentCheck,
    service_id: &str,
    service_name: &str,
    index: usize,
    count: usize,
) -> Result<Planned, WriteError> {
    let unsupported = [
        ("Args", !def.args.is_empty()),
        ("GRPC", !def.grpc.is_empty()),
        ("H2PING", !def.h2ping.is_empty()),
        ("UDP", !def.udp.is_empty()),
        ("DockerContainerID", !def.docker_container_id.is_empty()),
        ("AliasService", !def.alias_service.is_empty()),
    ];
    if let Some((kind, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(invalid(format!(
            "trellis-consul-double does not run {kind} checks (only HTTP, TCP and TTL)"
        )));
    }
    if !def.status.is_empty() && !VALID_STATUSES.contains(&def.status.as_str()) {
        return Err(invalid(format!("Invalid check status: {:?}", def.status)));
    }
    let interval = duration("Interval", &def.interval)?;
    let timeout = duration("Timeout", &def.timeout)?.unwrap_or(DEFAULT_CHECK_TIMEOUT);
    duration(
        "DeregisterCriticalServiceAfter",
        &def.deregister_critical_service_after,
    )?;
    let needs_interval = || {
        interval.filter(|i| !i.is_zero()).ok_or_else(|| {
            invalid("Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or GRPC checks")
        })
    };
    let probe = match (def.http.is_empty(), def.tcp.is_empty(), def.ttl.is_empty()) {
        (false, true, true) => Probe::Http {
            url: def.http.clone(),
            method: if def.method.is_empty() {
                "GET".to_owned()
            } else {
                def.method.to_ascii_uppercase()
            },
            headers: def
                .header
                .iter()
                .flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone())))
                .collect(),
            timeout,
            interval: needs_interval()?,
        },
        (true, false, true) => Probe::Tcp {
            addr: def.tcp.clone(),
            timeout,
            interval: needs_interval()?,
        },
        (true, true, false) => match duration("TTL", &def.ttl)? {
            Some(ttl) if !ttl.is_zero() => Probe::Ttl(ttl),
            _ => return Err(invalid("TTL must be > 0 for TTL checks")),
        },
        (true, true, true) => {
            return Err(invalid(
                "Invalid check: must provide one of TTL, HTTP (with Interval) or TCP (with Interval)",
            ));
        }
        _ => {
            return Err(invalid(
                "Invalid check: HTTP, TCP and TTL are exclusive (one kind per check)",
            ));
        }
    };
    // Consul: `service:<id>`, numbered from 1 when the service has several checks.
    let check_id = if !def.check_id.is_empty() {
        def.check_id.clone()
    } else if count > 1 {
        format!("service:{service_id}:{}", index + 1)
    } else {
        format!("service:{service_id}")
    };
    let name = if def.name.is_empty() {
        format!("Service '{service_name}' check")
    } else {
        def.name.clone()
    };
    Ok(Planned {
        check: CheckDefinition {
            check_id,
            name,
            notes: def.notes.clone(),
            status: if def.status.is_empty() {
                "critical".to_owned()
            } else {
                def.status.clone()
            },
            service_id: service_id.to_owned(),
            ..CheckDefinition::default()
        },
        probe,
    })
}

/// Validates a definition: the catalog's service entry and the checks to run.
fn plan(reg: &AgentServiceRegistration) -> Result<(ServiceDefinition, Vec<Planned>), WriteError> {
    if reg.name.is_empty() {
        return Err(invalid("Missing service name"));
    }
    let id = if reg.id.is_empty() {
        reg.name.clone()
    } else {
        reg.id.clone()
    };
    let defs: Vec<&AgentCheck> = reg.check.iter().chain(reg.checks.iter()).collect();
    let planned = defs
        .iter()
        .enumerate()
        .map(|(i, def)| plan_check(def, &id, &reg.name, i, defs.len()))
        .collect::<Result<Vec<_>, _>>()?;
    let service = ServiceDefinition {
        id,
        service: reg.name.clone(),
        tags: reg.tags.clone(),
        address: reg.address.clone(),
        tagged_addresses: reg.tagged_addresses.clone(),
        meta: reg.meta.clone(),
        port: reg.port,
        weights: reg.weights,
        namespace: reg.namespace.clone(),
        enable_tag_override: reg.enable_tag_override,
    };
    Ok((service, planned))
}

impl Shared {
    /// `PUT /v1/agent/service/register[?replace-existing-checks]`.
    pub(super) fn agent_register(
        self: &Arc<Self>,
        reg: &AgentServiceRegistration,
        replace_existing_checks: bool,
    ) -> Result<(), AgentError> {
        let (service, planned) = plan(reg)?;
        let agent = &self.config.agent;
        let node = agent.node_name.clone();
        let ns = service.namespace.clone();
        let service_id = service.id.clone();
        let new_ids: Vec<String> = planned.iter().map(|p| p.check.check_id.clone()).collect();
        let request = RegisterRequest {
            node: node.clone(),
            address: agent.node_address.clone(),
            skip_node_update: true,
            service: Some(service),
            checks: planned.iter().map(|p| p.check.clone()).collect(),
            namespace: ns.clone(),
            ..RegisterRequest::default()
        };
        let mut dropped = Vec::new();
        self.write(|s| {
            if !s.has_node(&node) {
                // A real agent's node is in the catalog from its start, with its gossip health.
                s.register(&RegisterRequest {
                    node: node.clone(),
                    address: agent.node_address.clone(),
                    check: Some(CheckDefinition {
                        check_id: SERF_HEALTH.to_owned(),
                        name: "Serf Health Status".to_owned(),
                        status: "passing".to_owned(),
                        output: "Agent alive and reachable".to_owned(),
                        ..CheckDefinition::default()
                    }),
                    ..RegisterRequest::default()
                })?;
            }
            // Consul keeps the checks a re-registration leaves out unless asked to replace them.
            if replace_existing_checks {
                dropped = s
                    .service_check_ids(&node, &ns, &service_id)
                    .into_iter()
                    .filter(|id| !new_ids.contains(id))
                    .collect();
            }
            s.register(&request)?;
            for check_id in &dropped {
                s.deregister(&DeregisterRequest {
                    node: node.clone(),
                    check_id: check_id.clone(),
                    ..DeregisterRequest::default()
                })?;
            }
            Ok(())
        })?;
        {
            let mut running = lock(&self.agent_checks);
            for id in new_ids.iter().chain(&dropped) {
                if let Some(old) = running.remove(id) {
                    old.cancel.cancel();
                }
            }
        }
        for p in planned {
            self.start_check(p, &service_id, &ns);
        }
        Ok(())
    }

    /// `PUT /v1/agent/service/deregister/:id[?ns=]`.
    pub(super) fn agent_deregister(&self, service_id: &str, ns: &str) -> Result<(), AgentError> {
        let node = self.config.agent.node_name.clone();
        if !lock(&self.state).has_service(&node, ns, service_id) {
            return Err(AgentError::NotFound(format!(
                "Unknown service ID {service_id:?}. Ensure that the service ID is passed, not the service name."
            )));
        }
        self.write(|s| {
            s.deregister(&DeregisterRequest {
                node: node.clone(),
                service_id: service_id.to_owned(),
                namespace: ns.to_owned(),
                ..DeregisterRequest::default()
            })
        })?;
        let ns = crate::state::ns_or_default(ns);
        lock(&self.agent_checks).retain(|_, c| {
            let gone =
                c.service_id == service_id && crate::state::ns_or_default(&c.namespace) == ns;
            if gone {
                c.cancel.cancel();
            }
            !gone
        });
        Ok(())
    }

    /// `PUT /v1/agent/check/{pass,warn,fail}/:id[?note=]`: a TTL check's new status.
    pub(super) fn agent_check_update(
        &self,
        check_id: &str,
        status: &str,
        note: &str,
    ) -> Result<(), AgentError> {
        let reset = match lock(&self.agent_checks).get(check_id) {
            None => {
                return Err(AgentError::NotFound(format!(
                    "Unknown check ID {check_id:?}"
                )));
            }
            Some(RunningCheck {
                ttl_reset: None, ..
            }) => {
                return Err(AgentError::NotTtl(format!(
                    "CheckID {check_id:?} does not have associated TTL"
                )));
            }
            Some(RunningCheck {
                ttl_reset: Some(reset),
                ..
            }) => reset.clone(),
        };
        let node = self.config.agent.node_name.clone();
        self.write(|s| s.update_check(&node, check_id, status, Some(note)))?;
        reset.notify_one();
        Ok(())
    }

    fn start_check(self: &Arc<Self>, planned: Planned, service_id: &str, ns: &str) {
        let cancel = self.shutdown.child_token();
        let ttl_reset = matches!(planned.probe, Probe::Ttl(_)).then(|| Arc::new(Notify::new()));
        let check_id = planned.check.check_id.clone();
        lock(&self.agent_checks).insert(
            check_id.clone(),
            RunningCheck {
                service_id: service_id.to_owned(),
                namespace: ns.to_owned(),
                cancel: cancel.clone(),
                ttl_reset: ttl_reset.clone(),
            },
        );
        let shared = self.clone();
        let initial = planned.check.status.clone();
        tokio::spawn(async move {
            match planned.probe {
                Probe::Ttl(ttl) => {
                    let reset = ttl_reset.expect("TTL checks have a reset");
                    shared.run_ttl(&check_id, ttl, &reset, &cancel).await;
                }
                probe => shared.run_probe(&check_id, probe, initial, &cancel).await,
            }
        });
    }

    /// Runs an HTTP or TCP check at once, then every interval, until cancelled.
    async fn run_probe(
        &self,
        check_id: &str,
        probe: Probe,
        mut last: String,
        cancel: &CancellationToken,
    ) {
        let interval = match &probe {
            Probe::Http { interval, .. } | Probe::Tcp { interval, .. } => *interval,
            Probe::Ttl(_) => return,
        };
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = run_once(&probe) => r,
            };
            if result.0 != last {
                // The check may have been deregistered meanwhile: then there is nothing to update.
                let node = self.config.agent.node_name.clone();
                if !cancel.is_cancelled()
                    && self
                        .write(|s| s.update_check(&node, check_id, result.0, Some(&result.1)))
                        .is_ok()
                {
                    last = result.0.to_owned();
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// A TTL check: critical whenever `ttl` passes without an update.
    async fn run_ttl(
        &self,
        check_id: &str,
        ttl: Duration,
        reset: &Notify,
        cancel: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = reset.notified() => continue,
                _ = tokio::time::sleep(ttl) => {}
            }
            let node = self.config.agent.node_name.clone();
            let output = format!("TTL expired (no update within {ttl:?})");
            let _ = self.write(|s| s.update_check(&node, check_id, "critical", Some(&output)));
            // Stay critical until the next update.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = reset.notified() => {}
            }
        }
    }
}

/// One run of an HTTP or TCP check: its status and output.
async fn run_once(probe: &Probe) -> (&'static str, String) {
    match probe {
        Probe::Http {
            url,
            method,
            headers,
            timeout,
            ..
        } => match tokio::time::timeout(*timeout, http_status(url, method, headers)).await {
            Err(_) => (
                "critical",
                format!("HTTP {method} {url}: timed out after {timeout:?}"),
            ),
            Ok(Err(e)) => ("critical", format!("HTTP {method} {url}: {e}")),
            Ok(Ok((code, reason, body))) => {
                let status = match code {
                    200..=299 => "passing",
                    429 => "warning",
                    _ => "critical",
                };
                (
                    status,
                    format!("HTTP {method} {url}: {code} {reason} Output: {body}"),
                )
            }
        },
        Probe::Tcp { addr, timeout, .. } => {
            match tokio::time::timeout(*timeout, TcpStream::connect(addr.as_str())).await {
                Ok(Ok(_)) => ("passing", format!("TCP connect {addr}: Success")),
                Ok(Err(e)) => ("critical", format!("TCP connect {addr}: {e}")),
                Err(_) => (
                    "critical",
                    format!("TCP connect {addr}: timed out after {timeout:?}"),
                ),
            }
        }
        Probe::Ttl(_) => ("critical", String::new()),
    }
}

/// One HTTP/1.1 request (`Connection: close`): status code, reason and the start of the body.
async fn http_status(
    url: &str,
    method: &str,
    headers: &[(String, String)],
) -> io::Result<(u16, String, String)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        io::Error::other("trellis-consul-double runs only http:// checks (no TLS)")
    })?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    // A bare host (or a bracketed IPv6 address without a port) means port 80.
    let addr = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_owned()
    };
    let mut stream = TcpStream::connect(addr).await?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: Consul Health Check\r\nAccept: text/plain, text/*, */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    // The head plus OUTPUT_CAP bytes of body is all a check looks at.
    while answer.len() < 16 * 1024 + OUTPUT_CAP {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let code = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| io::Error::other(format!("not an HTTP answer: {status_line:?}")))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    let body: String = body.chars().take(OUTPUT_CAP).collect();
    Ok((code, reason, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: serde_json::Value) -> AgentCheck {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn check_ids_names_and_initial_status_follow_consul() {
        let one = plan_check(
            &check(serde_json::json!({"TTL": "10s"})),
            "web-1",
            "web",
            0,
            1,
        )
        .unwrap();
        assert_eq!(one.check.check_id, "service:web-1");
        assert_eq!(one.check.name, "Service 'web' check");
        assert_eq!(one.check.status, "critical");
        let second = plan_check(
            &check(
                serde_json::json!({"TCP": "127.0.0.1:1", "Interval": "1s", "Status": "passing"}),
            ),
            "web-1",
            "web",
            1,
            2,
        )
        .unwrap();
        assert_eq!(second.check.check_id, "service:web-1:2");
        assert_eq!(second.check.status, "passing");
    }

    #[test]
    fn definitions_consul_refuses_or_the_double_cannot_run_are_refused_by_name() {
        let cases = [
            (
                serde_json::json!({"HTTP": "http://x/"}),
                "Interval must be > 0",
            ),
            (serde_json::json!({}), "must provide one of TTL"),
            (
                serde_json::json!({"HTTP": "http://x/", "TTL": "5s", "Interval": "1s"}),
                "exclusive",
            ),
            (
                serde_json::json!({"Args": ["/bin/true"], "Interval": "1s"}),
                "does not run Args checks",
            ),
            (
                serde_json::json!({"GRPC": "127.0.0.1:1", "Interval": "1s"}),
                "does not run GRPC checks",
            ),
            (
                serde_json::json!({"TTL": "soon"}),
                "Invalid duration for TTL",
            ),
            (
                serde_json::json!({"TTL": "5s", "Status": "ok"}),
                "Invalid check status",
            ),
        ];
        for (json, expected) in cases {
            let err = plan_check(&check(json.clone()), "web", "web", 0, 1).unwrap_err();
            assert!(err.0.contains(expected), "{json}: {err}");
        }
        let nameless: AgentServiceRegistration =
            serde_json::from_value(serde_json::json!({"Port": 1})).unwrap();
        assert_eq!(plan(&nameless).unwrap_err().0, "Missing service name");
    }

    #[tokio::test]
    async fn http_checks_map_status_codes_as_consul_does() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "429 Too Many Requests", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nhi");
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let probe = Probe::Http {
            url: format!("http://{addr}/ready"),
            method: "GET".into(),
            headers: vec![],
            timeout: Duration::from_secs(5),
            interval: Duration::from_secs(1),
        };
        let statuses = [
            run_once(&probe).await,
            run_once(&probe).await,
            run_once(&probe).await,
        ];
        assert_eq!(
            statuses.iter().map(|s| s.0).collect::<Vec<_>>(),
            ["passing", "warning", "critical"]
        );
        assert!(
            statuses[0].1.ends_with(": 200 OK Output: hi"),
            "{}",
            statuses[0].1
        );
        // Nothing listens any more: critical, saying why.
        let refused = run_once(&probe).await;
        assert_eq!(refused.0, "critical");
        let tls = Probe::Http {
            url: "https://127.0.0.1:1/".into(),
            method: "GET".into(),
            headers: vec![],
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(1),
        };
        assert!(run_once(&tls).await.1.contains("only http://"));
    }
}
