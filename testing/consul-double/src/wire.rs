//! Consul's JSON shapes for the endpoints the double serves, with Consul's PascalCase field names.
//!
//! Request types accept what `/v1/catalog/register` and `/v1/catalog/deregister` accept (unknown
//! fields are ignored, as Consul does); response types carry the fields Consul documents for
//! `/v1/health/service/:service`.

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
