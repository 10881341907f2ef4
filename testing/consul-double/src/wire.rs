//! Consul's JSON shapes for the endpoints the double serves, with Consul's PascalCase field names.
//!
//! Request types accept what `/v1/catalog/register`, `/v1/catalog/deregister` and
//! `/v1/agent/service/register` accept (unknown fields are ignored, as Consul does); response types
//! carry the fields Consul documents for `/v1/health/service/:service`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Body of `PUT /v1/catalog/register`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RegisterRequest {
    pub datacenter: String,
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub node_meta: BTreeMap<String, String>,
    pub service: Option<ServiceDefinition>,
    pub check: Option<CheckDefinition>,
    pub checks: Vec<CheckDefinition>,
    pub skip_node_update: bool,
    pub namespace: String,
}

/// The `Service` block of a registration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceDefinition {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Vec<String>,
    pub address: String,
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    pub meta: BTreeMap<String, String>,
    pub port: u16,
    pub weights: Option<Weights>,
    pub namespace: String,
    pub enable_tag_override: bool,
}

/// A tagged address of a service (`lan`, `wan`, `lan_ipv4`...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceAddress {
    pub address: String,
    pub port: u16,
}

/// DNS/load-balancing weights: `Passing` applies while all checks pass, `Warning` while one warns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

impl Default for Weights {
    /// Consul's default when a registration gives none.
    fn default() -> Self {
        Self {
            passing: 1,
            warning: 1,
        }
    }
}

/// A `Check` / `Checks[]` entry of a registration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CheckDefinition {
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub notes: String,
    pub status: String,
    pub output: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub namespace: String,
}

/// Body of `PUT /v1/catalog/deregister`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DeregisterRequest {
    pub datacenter: String,
    pub node: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub namespace: String,
}

/// One entry of `GET /v1/health/service/:service`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    pub node: NodeOut,
    pub service: ServiceOut,
    pub checks: Vec<CheckOut>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeOut {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceOut {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Vec<String>,
    pub address: String,
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    pub meta: BTreeMap<String, String>,
    pub port: u16,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub namespace: String,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckOut {
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub status: String,
    pub notes: String,
    pub output: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    pub namespace: String,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Body of `PUT /v1/agent/service/register`: a service definition as the local agent takes it
/// (Consul's "Register Service" agent endpoint). `Name` is the service, `ID` defaults to it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentServiceRegistration {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    /// Empty: the agent's node address is used, as in Consul.
    pub address: String,
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    pub meta: BTreeMap<String, String>,
    pub port: u16,
    pub weights: Option<Weights>,
    pub enable_tag_override: bool,
    pub namespace: String,
    pub check: Option<AgentCheck>,
    pub checks: Vec<AgentCheck>,
}

/// A check of an agent service definition. The double runs `HTTP`, `TCP` and `TTL` checks; the
/// other kinds are fields here only so that a definition using them is refused by name instead
/// of silently never running.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentCheck {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub notes: String,
    /// Initial status; empty = `critical`, as in Consul.
    pub status: String,
    #[serde(rename = "HTTP")]
    pub http: String,
    pub method: String,
    pub header: BTreeMap<String, Vec<String>>,
    #[serde(rename = "TCP")]
    pub tcp: String,
    #[serde(rename = "TTL")]
    pub ttl: String,
    /// Go duration (`10s`): how often HTTP and TCP checks run.
    pub interval: String,
    /// Go duration; Consul's default is 10 s.
    pub timeout: String,
    /// Accepted and ignored: the double never reaps critical services.
    pub deregister_critical_service_after: String,
    // Check kinds the double does not run.
    pub args: Vec<String>,
    #[serde(rename = "GRPC")]
    pub grpc: String,
    #[serde(rename = "H2PING")]
    pub h2ping: String,
    #[serde(rename = "UDP")]
    pub udp: String,
    #[serde(rename = "DockerContainerID")]
    pub docker_container_id: String,
    pub alias_service: String,
}
