//! The install in dependency order (what `kubectl apply` and `--apply` create first comes
//! first), and the uninstall: the same objects in reverse, the CRDs last.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::document::{Document, Object};
use super::settings::{Ca, GENERATED_CA_WARNING, Settings, VERSION};
use super::{rbac, webhook, workload};

fn namespace(settings: &Settings) -> Document {
    let mut labels = workload::labels(None);
    // The controller meets the restricted profile; nothing else belongs in this namespace.
    labels.insert(
        "pod-security.kubernetes.io/enforce".to_owned(),
        "restricted".to_owned(),
    );
    Document::new(Object::Namespace(Namespace {
        metadata: ObjectMeta {
            name: Some(settings.names.namespace.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    }))
}

/// The CA Secret (`--ca-secret`: keys `ca.crt`, `tls.crt`, `tls.key`); `None` for
/// `--existing-ca-secret`.
fn ca_secret(settings: &Settings) -> Option<Document> {
    let Ca::Material {
        anchors,
        issuer_cert,
        issuer_key,
        generated,
    } = &settings.ca
    else {
        return None;
    };
    let data = BTreeMap::from([
        ("ca.crt".to_owned(), ByteString(anchors.as_bytes().to_vec())),
        (
            "tls.crt".to_owned(),
            ByteString(issuer_cert.as_bytes().to_vec()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(issuer_key.as_bytes().to_vec()),
        ),
    ]);
    let document = Document::new(Object::Secret(secret(settings, Some(data))));
    Some(if *generated {
        document.with_comment(&format!(
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n{GENERATED_CA_WARNING}\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        ))
    } else {
        document.with_comment(
            "The mesh CA: trust anchors (ca.crt), the issuer that signs workload certificates (tls.crt) and its key (tls.key). The controller polls it; see deploy/README.md for rotation.",
        )
    })
}

fn secret(settings: &Settings, data: Option<BTreeMap<String, ByteString>>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(settings.names.ca_secret.clone()),
            namespace: Some(settings.names.namespace.clone()),
            labels: Some(workload::labels(None)),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data,
        ..Default::default()
    }
}

/// The whole install, in the order it must be created.
pub fn install(settings: &Settings) -> Vec<Document> {
    let mut documents = vec![namespace(settings)];
    documents.extend(webhook::crds(settings));
    documents.push(workload::service_account(settings));
    documents.extend(rbac::discovery(&settings.names));
    documents.extend(rbac::controller(
        &settings.names,
        settings.prometheus.is_some(),
    ));
    documents.extend(ca_secret(settings));
    documents.push(workload::service(settings));
    documents.push(workload::deployment(settings));
    documents.extend(workload::disruption_budget(settings));
    documents.push(webhook::injector(settings));
    documents.extend(webhook::api_service(settings));
    // Gateways last: they need the controller to get their identity and destinations.
    for gateway in &settings.gateways {
        documents.extend(super::gateway::documents(
            settings,
            gateway,
            &settings.gateway_anchors,
        ));
    }
    documents
}

/// The install's objects in reverse order (the injector first, so no pod creation waits on a
/// webhook that is going away), the CRDs last unless `keep_crds`. The CA Secret is included
/// whether or not the install made it.
pub fn uninstall(settings: &Settings, keep_crds: bool) -> Vec<Document> {
    let mut documents = install(settings);
    if !documents
        .iter()
        .any(|d| matches!(d.object, Object::Secret(_)))
    {
        documents.push(Document::new(Object::Secret(secret(settings, None))));
    }
    let (crds, mut rest): (Vec<Document>, Vec<Document>) = documents
        .into_iter()
        .map(|mut d| {
            d.comment.clear();
            d
        })
        .partition(|d| matches!(d.object, Object::CustomResourceDefinition(_)));
    rest.sort_by_key(|d| std::cmp::Reverse(order(&d.object)));
    if !keep_crds {
        let mut crds = crds;
        if let Some(first) = crds.first_mut() {
            first.comment = vec![
                "Deleting the CRDs deletes every TrafficSplit, TrafficTarget, HTTPRouteGroup, TCPRoute, UDPRoute,".to_owned(),
                "TrafficPolicy and ExternalService of the cluster, in every namespace. `trellis uninstall --keep-crds` leaves them.".to_owned(),
            ];
        }
        rest.extend(crds);
    }
    rest
}

/// Where a kind comes in the install (the uninstall deletes in the reverse).
fn order(object: &Object) -> u8 {
    match object {
        Object::Namespace(_) => 0,
        Object::CustomResourceDefinition(_) => 1,
        Object::ServiceAccount(_) => 2,
        Object::ClusterRole(_) => 3,
        Object::ClusterRoleBinding(_) => 4,
        Object::Role(_) => 5,
        Object::RoleBinding(_) => 6,
        Object::Secret(_) | Object::ConfigMap(_) => 7,
        Object::Service(_) => 8,
        Object::Deployment(_) => 9,
        Object::PodDisruptionBudget(_) => 10,
        Object::MutatingWebhookConfiguration(_) => 11,
        // Last in, first out: no request is sent to a controller that is going away.
        Object::APIService(_) => 12,
    }
}

/// The comment at the top of the YAML: version, how it was made, and what it needs.
pub fn header(settings: &Settings, command: &str) -> String {
    let mut lines = vec![
        format!("Trellis {VERSION}: the Kubernetes install. Generated by `{command}`; do not edit."),
        "Apply with `kubectl apply --server-side -f FILE` (or `trellis install ... --apply`); remove with `trellis uninstall`.".to_owned(),
        format!(
            "Images: {} (controller), {} (injected proxy and trellis-init).",
            settings.controller_image, settings.proxy_image
        ),
    ];
    if matches!(settings.ca, Ca::Existing) {
        let ns = &settings.names.namespace;
        lines.extend([
            String::new(),
            format!("This file carries no CA: create the Secret {ns}/{} before (or right after) applying it: the controller does not start without it. From your CA's files (PEM; the key PKCS#8):", settings.names.ca_secret),
            format!("  kubectl create namespace {ns}"),
            format!(
                "  kubectl -n {ns} create secret generic {} --type=kubernetes.io/tls \\",
                settings.names.ca_secret
            ),
            "    --from-file=ca.crt=anchors.pem --from-file=tls.crt=issuer.pem \\".to_owned(),
            "    --from-file=tls.key=issuer-key.pem".to_owned(),
            "Or render the install with the CA inside: `trellis install --trust-anchor ... --issuer-cert ... --issuer-key ...`.".to_owned(),
        ]);
    }
    if settings.ca.is_generated() {
        lines.extend([String::new(), GENERATED_CA_WARNING.to_owned()]);
    }
    lines
        .iter()
        .map(|line| super::document::comment(line))
        .collect()
}
