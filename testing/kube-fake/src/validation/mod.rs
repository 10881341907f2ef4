//! Validation of writes, as a real API server validates them: a create, update or patch that a
//! real server would refuse is refused here too, with the same HTTP 422 `Invalid` status, the
//! same `details.causes` (field paths and messages) and the same aggregate message, e.g.
//!
//! ```text
//! EndpointSlice.discovery.k8s.io "web-abc" is invalid: endpoints[0].addresses[0]: Invalid value:
//! "127.0.50.2": may not be in the loopback range (127.0.0.0/8, ::1/128)
//! ```
//!
//! Without this a test could pass on the fake and fail on a real server for a reason the fake
//! ignored (it happened: the conformance suite's loopback pod addresses). The rules are those of
//! `pkg/apis/core/validation`, `pkg/apis/discovery/validation` and apimachinery's
//! `ValidateObjectMeta` for what Trellis and its tests write:
//!
//! - every kind: `metadata.name` (or `generateName`) by the kind's name rule (DNS-1123 subdomain;
//!   DNS-1123 label for Namespaces; DNS-1035 label for Services), `metadata.namespace` (a
//!   DNS-1123 label), label keys and values, annotation keys and their total size (256 KiB).
//!   Custom resources (the SMI kinds) get exactly this, as from the real server (their OpenAPI
//!   schema is not checked here);
//! - EndpointSlice: `addressType`, each address against it (IPv4/IPv6 addresses that are not
//!   unspecified, loopback, link-local or link-local multicast; FQDNs), 1..=100 addresses per
//!   endpoint, at most 1000 endpoints, `hostname`, ports (name, duplicate names, protocol,
//!   `appProtocol`), `addressType` immutable;
//! - Pod: containers (required, names, images, ports and port names), `serviceAccountName`,
//!   `status.podIP`/`podIPs` when set;
//! - Service: `type`, `clusterIP`/`clusterIPs` (`None` or an IP), ports (names required when
//!   several, unique, numbers, protocol, `targetPort`, `appProtocol`), `selector`.
//!
//! Defaults the real server applies before validating are applied too (a port's `protocol`
//! `TCP`, an EndpointSlice port's `name` `""`), so what is stored reads back as from a real one.

mod field;
pub mod rules;

pub use field::{Cause, FieldError};

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::resources::ResourceType;

/// Largest total size of an object's annotations (`TotalAnnotationSizeLimitB`).
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;
const PROTOCOLS: [&str; 3] = ["SCTP", "TCP", "UDP"];

/// Fills the defaults a real server applies before validation.
pub fn apply_defaults(resource: &ResourceType, object: &mut Value) {
    let default_protocol = |port: &mut Value| {
        if port.is_object() && port.get("protocol").is_none_or(Value::is_null) {
            port["protocol"] = json!("TCP");
        }
    };
    match (resource.group.as_str(), resource.kind.as_str()) {
        ("discovery.k8s.io", "EndpointSlice") => {
            for port in array_mut(object, "/ports") {
                default_protocol(port);
                if port.is_object() && port.get("name").is_none_or(Value::is_null) {
                    port["name"] = json!("");
                }
            }
        }
        ("", "Service") => {
            for port in array_mut(object, "/spec/ports") {
                default_protocol(port);
                if port.is_object() && port.get("targetPort").is_none_or(Value::is_null) {
                    port["targetPort"] = port.get("port").cloned().unwrap_or(Value::Null);
                }
            }
        }
        ("", "Pod") => {
            for list in ["/spec/containers", "/spec/initContainers"] {
                for container in array_mut(object, list) {
                    for port in array_mut(container, "/ports") {
                        default_protocol(port);
                    }
                }
            }
        }
        _ => {}
    }
}

fn array_mut<'a>(object: &'a mut Value, pointer: &str) -> impl Iterator<Item = &'a mut Value> {
    object
        .pointer_mut(pointer)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

fn array<'a>(object: &'a Value, pointer: &str) -> &'a [Value] {
    object
        .pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> Option<&'a str> {
    object.pointer(pointer).and_then(Value::as_str)
}

/// Validates `object` (defaults applied) as a create (`old: None`) or an update of `old`.
pub fn validate(
    resource: &ResourceType,
    object: &Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let errors = errors(resource, object, old);
    if errors.is_empty() {
        return Ok(());
    }
    let name = str_at(object, "/metadata/name").unwrap_or("");
    Err(field::invalid(
        &resource.group,
        &resource.kind,
        name,
        &errors,
    ))
}

/// Every field error of `object`, in the order the real server reports them.
pub fn errors(resource: &ResourceType, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let kind = (resource.group.as_str(), resource.kind.as_str());
    let name_rule: fn(&str) -> Vec<String> = match kind {
        ("", "Namespace") => rules::dns1123_label,
        ("", "Service") => rules::dns1035_label,
        _ => rules::dns1123_subdomain,
    };
    let mut errs = object_meta(object, resource.namespaced, name_rule);
    match kind {
        ("discovery.k8s.io", "EndpointSlice") => {
            errs.extend(endpoint_slice(object));
            if let Some(old) = old {
                let (new_type, old_type) = (object.get("addressType"), old.get("addressType"));
                if new_type != old_type {
                    errs.push(FieldError::invalid(
                        "addressType",
                        new_type.unwrap_or(&Value::Null),
                        "field is immutable",
                    ));
                }
            }
        }
        ("", "Pod") => errs.extend(pod(object)),
        ("", "Service") => errs.extend(service(object)),
        _ => {}
    }
    errs
}

/// `ValidateObjectMeta`: name or generateName, namespace, labels, annotations.
fn object_meta(
    object: &Value,
    namespaced: bool,
    name_rule: fn(&str) -> Vec<String>,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let generate = str_at(object, "/metadata/generateName").unwrap_or("");
    if !generate.is_empty() {
        // A prefix may end with a dash: the random suffix follows it.
        let masked = match generate.strip_suffix('-') {
            Some(rest) if !rest.is_empty() => format!("{rest}a"),
            _ => generate.to_owned(),
        };
        for msg in name_rule(&masked) {
            errs.push(FieldError::invalid(
                "metadata.generateName",
                &json!(generate),
                msg,
            ));
        }
    }
    let name = str_at(object, "/metadata/name").unwrap_or("");
    if name.is_empty() {
        errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        for msg in name_rule(name) {
            errs.push(FieldError::invalid("metadata.name", &json!(name), msg));
        }
    }
    let namespace = str_at(object, "/metadata/namespace").unwrap_or("");
    if namespaced {
        if namespace.is_empty() {
            errs.push(FieldError::required("metadata.namespace", ""));
        } else {
            for msg in rules::dns1123_label(namespace) {
                errs.push(FieldError::invalid(
                    "metadata.namespace",
                    &json!(namespace),
                    msg,
                ));
            }
        }
    } else if !namespace.is_empty() {
        errs.push(FieldError::forbidden(
            "metadata.namespace",
            "not allowed on this type",
        ));
    }
    errs.extend(labels(
        object.pointer("/metadata/labels"),
        "metadata.labels",
    ));
    if let Some(annotations) = object
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut size = 0;
        for (key, value) in annotations {
            for msg in rules::qualified_name(&key.to_lowercase()) {
                errs.push(FieldError::invalid(
                    "metadata.annotations",
                    &json!(key),
                    msg,
                ));
            }
            size += key.len() + value.as_str().map_or(0, str::len);
        }
        if size > ANNOTATIONS_MAX_BYTES {
            errs.push(FieldError::too_long(
                "metadata.annotations",
                ANNOTATIONS_MAX_BYTES,
            ));
        }
    }
    errs
}

/// `ValidateLabels`: every key a qualified name, every value a label value (both reported on
/// the map's path, as the real server does).
fn labels(labels: Option<&Value>, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for (key, value) in labels.and_then(Value::as_object).into_iter().flatten() {
        for msg in rules::qualified_name(key) {
            errs.push(FieldError::invalid(path, &json!(key), msg));
        }
        let text = value.as_str().unwrap_or("");
        for msg in rules::label_value(text) {
            errs.push(FieldError::invalid(path, value, msg));
        }
    }
    errs
}

fn invalid_each(path: &str, value: &Value, msgs: Vec<String>) -> Vec<FieldError> {
    msgs.into_iter()
        .map(|m| FieldError::invalid(path, value, m))
        .collect()
}

/// `ValidateEndpointSlice`.
fn endpoint_slice(slice: &Value) -> Vec<FieldError> {
    const ADDRESS_TYPES: [&str; 3] = ["FQDN", "IPv4", "IPv6"];
    let mut errs = Vec::new();
    let address_type = str_at(slice, "/addressType").unwrap_or("");
    if address_type.is_empty() {
        errs.push(FieldError::required("addressType", ""));
    } else if !ADDRESS_TYPES.contains(&address_type) {
        errs.push(FieldError::not_supported(
            "addressType",
            &json!(address_type),
            &ADDRESS_TYPES,
        ));
    }
    let endpoints = array(slice, "/endpoints");
    if endpoints.len() > 1000 {
        errs.push(FieldError::too_many("endpoints", endpoints.len(), 1000));
    } else {
        for (i, endpoint) in endpoints.iter().enumerate() {
            let at = format!("endpoints[{i}]");
            let addresses = array(endpoint, "/addresses");
            if addresses.is_empty() {
                errs.push(FieldError::required(
                    format!("{at}.addresses"),
                    "must contain at least 1 address",
                ));
            } else if addresses.len() > 100 {
                errs.push(FieldError::too_many(
                    format!("{at}.addresses"),
                    addresses.len(),
                    100,
                ));
            }
            for (j, address) in addresses.iter().enumerate() {
                let path = format!("{at}.addresses[{j}]");
                let text = address.as_str().unwrap_or("");
                let ip = rules::parse_ip_sloppy(text);
                match address_type {
                    "IPv4" => {
                        if !ip.is_some_and(rules::is_v4) {
                            errs.push(FieldError::invalid(
                                &path,
                                address,
                                "must be a valid IPv4 address",
                            ));
                        }
                        errs.extend(invalid_each(&path, address, rules::endpoint_ip(text)));
                    }
                    "IPv6" => {
                        if ip.is_none_or(rules::is_v4) {
                            errs.push(FieldError::invalid(
                                &path,
                                address,
                                "must be a valid IPv6 address",
                            ));
                        }
                        errs.extend(invalid_each(&path, address, rules::endpoint_ip(text)));
                    }
                    "FQDN" => errs.extend(fqdn(&path, text)),
                    // Unknown types are reported above and their addresses not checked.
                    _ => {}
                }
            }
            if let Some(hostname) = endpoint.get("hostname").and_then(Value::as_str) {
                errs.extend(invalid_each(
                    &format!("{at}.hostname"),
                    &json!(hostname),
                    rules::dns1123_label(hostname),
                ));
            }
        }
    }
    let ports = array(slice, "/ports");
    if ports.len() > 20_000 {
        errs.push(FieldError::too_many("ports", ports.len(), 20_000));
        return errs;
    }
    let mut names = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let at = format!("ports[{i}]");
        let name = port.get("name").and_then(Value::as_str).unwrap_or("");
        if !name.is_empty() {
            errs.extend(invalid_each(
                &format!("{at}.name"),
                &json!(name),
                rules::dns1123_label(name),
            ));
        }
        if !names.insert(name) {
            errs.push(FieldError::duplicate(format!("{at}.name"), &json!(name)));
        }
        errs.extend(protocol(port, &format!("{at}.protocol")));
        if let Some(app) = port.get("appProtocol").and_then(Value::as_str) {
            errs.extend(invalid_each(
                &format!("{at}.appProtocol"),
                &json!(app),
                rules::qualified_name(app),
            ));
        }
    }
    errs
}

/// `IsFullyQualifiedDomainName`.
fn fqdn(path: &str, name: &str) -> Vec<FieldError> {
    if name.is_empty() {
        return vec![FieldError::required(path, "")];
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let sub = rules::dns1123_subdomain(name);
    if !sub.is_empty() {
        return vec![FieldError::invalid(path, &json!(name), sub.join(","))];
    }
    if name.split('.').count() < 2 {
        return vec![FieldError::invalid(
            path,
            &json!(name),
            "should be a domain with at least two segments separated by dots",
        )];
    }
    for label in name.split('.') {
        let errs = rules::dns1123_label(label);
        if !errs.is_empty() {
            return vec![FieldError::invalid(path, &json!(label), errs.join(","))];
        }
    }
    Vec::new()
}

/// A port's `protocol` (defaulted to TCP before this runs).
fn protocol(port: &Value, path: &str) -> Vec<FieldError> {
    match port.get("protocol").and_then(Value::as_str) {
        None | Some("") => vec![FieldError::required(path, "")],
        Some(p) if !PROTOCOLS.contains(&p) => {
            vec![FieldError::not_supported(path, &json!(p), &PROTOCOLS)]
        }
        Some(_) => Vec::new(),
    }
}

/// `ValidatePodCreate`/`Update`, the parts Trellis and its tests write.
fn pod(pod: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let containers = array(pod, "/spec/containers");
    if containers.is_empty() {
        errs.push(FieldError::required("spec.containers", ""));
    }
    let mut names = BTreeSet::new();
    for (list, items) in [
        ("spec.initContainers", array(pod, "/spec/initContainers")),
        ("spec.containers", containers),
    ] {
        for (i, container) in items.iter().enumerate() {
            let at = format!("{list}[{i}]");
            let name = container.get("name").and_then(Value::as_str).unwrap_or("");
            if name.is_empty() {
                errs.push(FieldError::required(format!("{at}.name"), ""));
            } else {
                errs.extend(invalid_each(
                    &format!("{at}.name"),
                    &json!(name),
                    rules::dns1123_label(name),
                ));
                if !names.insert(name) {
                    errs.push(FieldError::duplicate(format!("{at}.name"), &json!(name)));
                }
            }
            if container
                .get("image")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                errs.push(FieldError::required(format!("{at}.image"), ""));
            }
            let mut port_names = BTreeSet::new();
            for (j, port) in array(container, "/ports").iter().enumerate() {
                let pat = format!("{at}.ports[{j}]");
                if let Some(name) = port.get("name").and_then(Value::as_str)
                    && !name.is_empty()
                {
                    errs.extend(invalid_each(
                        &format!("{pat}.name"),
                        &json!(name),
                        rules::port_name(name),
                    ));
                    if !port_names.insert(name) {
                        errs.push(FieldError::duplicate(format!("{pat}.name"), &json!(name)));
                    }
                }
                let number = port.get("containerPort").cloned().unwrap_or(json!(0));
                errs.extend(invalid_each(
                    &format!("{pat}.containerPort"),
                    &number,
                    rules::port_num(number.as_i64().unwrap_or(0)),
                ));
                errs.extend(protocol(port, &format!("{pat}.protocol")));
            }
        }
    }
    if let Some(sa) = str_at(pod, "/spec/serviceAccountName").filter(|s| !s.is_empty()) {
        errs.extend(invalid_each(
            "spec.serviceAccountName",
            &json!(sa),
            rules::dns1123_subdomain(sa),
        ));
    }
    // The v1 podIP is the first of podIPs once converted, so its errors are reported there.
    let mut ips: Vec<&str> = array(pod, "/status/podIPs")
        .iter()
        .filter_map(|p| p.get("ip").and_then(Value::as_str))
        .collect();
    if ips.is_empty()
        && let Some(ip) = str_at(pod, "/status/podIP").filter(|s| !s.is_empty())
    {
        ips.push(ip);
    }
    for (i, ip) in ips.iter().enumerate() {
        if rules::parse_ip_sloppy(ip).is_none() {
            errs.push(FieldError::invalid(
                format!("status.podIPs[{i}]"),
                &json!(ip),
                rules::NOT_AN_IP,
            ));
        }
    }
    if ips.len() > 1 {
        let families: BTreeSet<bool> = ips
            .iter()
            .filter_map(|ip| rules::parse_ip_sloppy(ip))
            .map(rules::is_v4)
            .collect();
        if ips.len() > 2 || families.len() != 2 {
            errs.push(FieldError::invalid(
                "status.podIPs",
                &json!(ips),
                "may specify no more than one IP for each IP family",
            ));
        }
    }
    errs
}

/// `ValidateService`, the parts Trellis and its tests write.
fn service(service: &Value) -> Vec<FieldError> {
    const TYPES: [&str; 4] = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
    let mut errs = Vec::new();
    let kind = str_at(service, "/spec/type").unwrap_or("ClusterIP");
    if !TYPES.contains(&kind) {
        errs.push(FieldError::not_supported("spec.type", &json!(kind), &TYPES));
    }
    let mut cluster_ips: Vec<&str> = array(service, "/spec/clusterIPs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if cluster_ips.is_empty()
        && let Some(ip) = str_at(service, "/spec/clusterIP").filter(|s| !s.is_empty())
    {
        cluster_ips.push(ip);
    }
    for (i, ip) in cluster_ips.iter().enumerate() {
        let path = format!("spec.clusterIPs[{i}]");
        if *ip == "None" {
            if i != 0 {
                errs.push(FieldError::invalid(
                    path,
                    &json!(ip),
                    "'None' must be the first and only value",
                ));
            }
        } else if rules::parse_ip_sloppy(ip).is_none() {
            errs.push(FieldError::invalid(path, &json!(ip), rules::NOT_AN_IP));
        }
    }
    let headless = cluster_ips.first() == Some(&"None");
    let ports = array(service, "/spec/ports");
    if ports.is_empty() && !headless && kind != "ExternalName" {
        errs.push(FieldError::required("spec.ports", ""));
    }
    let mut names = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        let name = port.get("name").and_then(Value::as_str).unwrap_or("");
        if ports.len() > 1 && name.is_empty() {
            errs.push(FieldError::required(format!("{at}.name"), ""));
        } else if !name.is_empty() {
            errs.extend(invalid_each(
                &format!("{at}.name"),
                &json!(name),
                rules::dns1123_label(name),
            ));
            if !names.insert(name) {
                errs.push(FieldError::duplicate(format!("{at}.name"), &json!(name)));
            }
        }
        let number = port.get("port").cloned().unwrap_or(json!(0));
        errs.extend(invalid_each(
            &format!("{at}.port"),
            &number,
            rules::port_num(number.as_i64().unwrap_or(0)),
        ));
        errs.extend(protocol(port, &format!("{at}.protocol")));
        match port.get("targetPort") {
            Some(Value::String(name)) => errs.extend(invalid_each(
                &format!("{at}.targetPort"),
                &json!(name),
                rules::port_name(name),
            )),
            Some(n @ Value::Number(_)) => errs.extend(invalid_each(
                &format!("{at}.targetPort"),
                n,
                rules::port_num(n.as_i64().unwrap_or(0)),
            )),
            _ => {}
        }
        if let Some(app) = port.get("appProtocol").and_then(Value::as_str) {
            errs.extend(invalid_each(
                &format!("{at}.appProtocol"),
                &json!(app),
                rules::qualified_name(app),
            ));
        }
    }
    errs.extend(labels(service.pointer("/spec/selector"), "spec.selector"));
    errs
}

#[cfg(test)]
mod tests;
