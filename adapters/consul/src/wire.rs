//! The parts of Consul's `/v1/health/service/:service` and `/v1/catalog/services` responses the
//! adapter reads. Consul sends `null` for empty Tags/Meta/Checks on some versions, so every
//! collection tolerates `null`; unknown fields are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One instance with its node and checks.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthEntry {
    pub node: Node,
    pub service: Service,
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    pub node: String,
    #[serde(default)]
    pub address: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub meta: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Service {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub address: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub meta: BTreeMap<String, String>,
    pub port: u16,
    #[serde(default)]
    pub weights: Option<Weights>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Check {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub status: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
}

/// `GET /v1/catalog/services`: service name -> the union of its instances' tags.
pub type CatalogServices = BTreeMap<String, serde_json::Value>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_consul_health_entry_with_nulls() {
        let json = r#"[{
            "Node": {"ID": "40e4a748", "Node": "foobar", "Address": "10.1.10.12", "Datacenter": "dc1",
                     "TaggedAddresses": {"lan": "10.1.10.12"}, "Meta": null},
            "Service": {"ID": "redis", "Service": "redis", "Tags": null, "Address": "",
                        "TaggedAddresses": {"lan": {"address": "127.0.0.1", "port": 8000}},
                        "Meta": null, "Port": 8000, "Weights": {"Passing": 10, "Warning": 1},
                        "Namespace": "default"},
            "Checks": [{"Node": "foobar", "CheckID": "serfHealth", "Name": "Serf Health Status",
                        "Status": "passing", "ServiceID": ""}]
        }]"#;
        let entries: Vec<HealthEntry> = serde_json::from_str(json).unwrap();
        assert_eq!(entries[0].service.port, 8000);
        assert!(entries[0].service.tags.is_empty());
        assert_eq!(entries[0].checks[0].check_id, "serfHealth");
        assert_eq!(entries[0].service.weights.unwrap().passing, 10);
    }
}
