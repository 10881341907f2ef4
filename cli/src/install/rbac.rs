//! The RBAC of the controller and of the Kubernetes discovery adapter: the one source of the
//! install's RBAC and of the two committed files, `deploy/controller-rbac.yaml` and
//! `adapters/kubernetes/rbac.yaml` (`trellis install --rbac-only controller|discovery`; a test
//! fails when they are stale).
//!
//! Least privilege: cluster-wide only what must be (reads of the SMI objects and of what
//! discovery watches, TokenReview, Events, and `get`/`patch` of exactly the five SMI CRDs and the
//! injector's MutatingWebhookConfiguration to write their caBundle); the Lease and the CA
//! Secret in a Role of the mesh namespace, by name wherever the verb allows it.

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::document::{Document, Object};
use super::settings::Names;
use super::workload::labels;

/// `--rbac-only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The controller's own rules (deploy/controller-rbac.yaml).
    Controller,
    /// The discovery adapter's rules (adapters/kubernetes/rbac.yaml).
    Discovery,
}

impl Which {
    /// The committed file this renders, relative to the workspace root.
    pub fn path(self) -> &'static str {
        match self {
            Which::Controller => "deploy/controller-rbac.yaml",
            Which::Discovery => "adapters/kubernetes/rbac.yaml",
        }
    }
}

/// A rule and why it exists (printed above the role).
struct Rule {
    why: &'static str,
    rule: PolicyRule,
}

fn rule(why: &'static str, group: &str, resources: &[&str], verbs: &[&str]) -> Rule {
    Rule {
        why,
        rule: PolicyRule {
            api_groups: Some(vec![group.to_owned()]),
            resources: Some(strings(resources)),
            verbs: strings(verbs),
            ..Default::default()
        },
    }
}

fn named(mut rule: Rule, names: Vec<String>) -> Rule {
    rule.rule.resource_names = Some(names);
    rule
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The names of the CRDs converted through the webhook (`<plural>.<group>`: the SMI ones),
/// from the same code that generates them.
pub fn crd_names() -> Vec<String> {
    trellis_smi::crd::generate()
        .into_iter()
        .filter(|g| g.converts())
        .map(|g| g.crd.metadata.name.expect("generated CRDs are named"))
        .collect()
}

fn controller_cluster_rules(names: &Names) -> Vec<Rule> {
    vec![
        rule(
            "SMI policy source: the TrafficSplits at their stored version (read only: Flagger compares what it wrote).",
            "split.smi-spec.io",
            &["trafficsplits"],
            &["get", "list", "watch"],
        ),
        rule(
            "SMI policy source: TrafficTargets (read only).",
            "access.smi-spec.io",
            &["traffictargets"],
            &["get", "list", "watch"],
        ),
        rule(
            "SMI policy source: the route groups TrafficSplits and TrafficTargets name (read only).",
            "specs.smi-spec.io",
            &["httproutegroups", "tcproutes", "udproutes"],
            &["get", "list", "watch"],
        ),
        rule(
            "Policy source: Trellis's TrafficPolicies and ExternalServices (read only).",
            "policy.trellis.io",
            &["trafficpolicies", "externalservices"],
            &["get", "list", "watch"],
        ),
        rule(
            "Problems with SMI objects and TrafficPolicies, and pods the injector could not mesh, are reported as Events (leader only); `get` lets a new leader update an Event an earlier one wrote.",
            "events.k8s.io",
            &["events"],
            &["create", "patch", "get"],
        ),
        rule(
            "Identity.Certify: a proxy's projected ServiceAccount token is checked with TokenReview.",
            "authentication.k8s.io",
            &["tokenreviews"],
            &["create"],
        ),
        named(
            rule(
                "The leader writes the webhook's caBundle into the SMI CRDs' conversion settings, at start and after each rotation: these five CRDs only.",
                "apiextensions.k8s.io",
                &["customresourcedefinitions"],
                &["get", "patch"],
            ),
            crd_names(),
        ),
        named(
            rule(
                "...and into the sidecar injector's MutatingWebhookConfiguration: this one only.",
                "admissionregistration.k8s.io",
                &["mutatingwebhookconfigurations"],
                &["get", "patch"],
            ),
            vec![names.injector.clone()],
        ),
    ]
}

fn controller_namespace_rules(names: &Names) -> Vec<Rule> {
    vec![
        rule(
            "Leader election: the Lease is created once (RBAC cannot limit `create` by name)...",
            "coordination.k8s.io",
            &["leases"],
            &["create"],
        ),
        named(
            rule(
                "...then read and renewed by name.",
                "coordination.k8s.io",
                &["leases"],
                &["get", "update"],
            ),
            vec![names.controller.clone()],
        ),
        named(
            rule(
                "The CA Secret (--ca-secret), polled with `get` so a rotated CA is picked up; never written.",
                "",
                &["secrets"],
                &["get"],
            ),
            vec![names.ca_secret.clone()],
        ),
    ]
}

fn discovery_rules() -> Vec<Rule> {
    vec![
        rule(
            "Service ports and existence (NotFound).",
            "",
            &["services"],
            &["list", "watch"],
        ),
        rule(
            "Endpoint identity (serviceAccountName), labels and owner (ownerReferences).",
            "",
            &["pods"],
            &["list", "watch"],
        ),
        rule(
            "Endpoints: addresses, conditions, named ports, appProtocol, zone, targetRef.",
            "discovery.k8s.io",
            &["endpointslices"],
            &["list", "watch"],
        ),
        rule(
            "Pod -> ReplicaSet -> Deployment: the ReplicaSet's controller ownerReference names the Deployment, so Deployments themselves are not read.",
            "apps",
            &["replicasets"],
            &["list", "watch"],
        ),
    ]
}

fn why(rules: &[Rule]) -> String {
    rules
        .iter()
        .map(|r| {
            let rule = &r.rule;
            let mut what = format!(
                "- {}{}: {}",
                rule.api_groups
                    .as_deref()
                    .and_then(<[String]>::first)
                    .filter(|g| !g.is_empty())
                    .map(|g| format!("{g} "))
                    .unwrap_or_default(),
                rule.resources.as_deref().unwrap_or_default().join(", "),
                rule.verbs.join(", ")
            );
            if let Some(names) = &rule.resource_names {
                what.push_str(&format!(" (only {})", names.join(", ")));
            }
            format!("{what}\n  {}", r.why)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels(None)),
        ..Default::default()
    }
}

fn subject(names: &Names) -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        name: names.controller.clone(),
        namespace: Some(names.namespace.clone()),
        ..Default::default()
    }
}

fn cluster_role(name: &str, rules: &[Rule], names: &Names, intro: &str) -> [Document; 2] {
    let role = ClusterRole {
        metadata: meta(name, None),
        rules: Some(rules.iter().map(|r| r.rule.clone()).collect()),
        ..Default::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta(name, None),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "ClusterRole".to_owned(),
            name: name.to_owned(),
        },
        subjects: Some(vec![subject(names)]),
    };
    [
        Document::new(Object::ClusterRole(role)).with_comment(&format!("{intro}\n{}", why(rules))),
        Document::new(Object::ClusterRoleBinding(binding)),
    ]
}

/// The controller's ClusterRole and binding, then its Role and binding in the mesh namespace.
/// With `aggregated` (`--prometheus`), also what the aggregated TrafficMetrics API needs.
pub fn controller(names: &Names, aggregated: bool) -> Vec<Document> {
    let mut cluster_rules = controller_cluster_rules(names);
    if aggregated {
        cluster_rules.extend(aggregated_rules());
    }
    let mut documents = Vec::from(cluster_role(
        &names.cluster_controller,
        &cluster_rules,
        names,
        "What the Trellis controller reads and writes cluster-wide, beyond the discovery adapter's rules (bound to the same ServiceAccount). It never writes SMI objects. Why each rule:",
    ));
    let ns = Some(names.namespace.as_str());
    let rules = controller_namespace_rules(names);
    let role = Role {
        metadata: meta(&names.controller, ns),
        rules: Some(rules.iter().map(|r| r.rule.clone()).collect()),
    };
    let binding = RoleBinding {
        metadata: meta(&names.controller, ns),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "Role".to_owned(),
            name: names.controller.clone(),
        },
        subjects: Some(vec![subject(names)]),
    };
    documents.push(Document::new(Object::Role(role)).with_comment(&format!(
        "The Lease (--lease-namespace/--lease-name) and the CA Secret live in the controller's own namespace: a Role is enough.\n{}",
        why(&rules)
    )));
    documents.push(Document::new(Object::RoleBinding(binding)));
    if aggregated {
        documents.push(auth_reader(names));
    }
    documents
}

/// The aggregated TrafficMetrics API's cluster-wide rules.
fn aggregated_rules() -> Vec<Rule> {
    vec![
        rule(
            "The aggregated TrafficMetrics API asks whether the user the API server names may get/list the kind asked about (SubjectAccessReview).",
            "authorization.k8s.io",
            &["subjectaccessreviews"],
            &["create"],
        ),
        named(
            rule(
                "The leader writes the webhook's caBundle and Service into the TrafficMetrics APIService: this one only.",
                "apiregistration.k8s.io",
                &["apiservices"],
                &["get", "patch"],
            ),
            vec![trellis_traffic_metrics::API_SERVICE.to_owned()],
        ),
    ]
}

/// Reading the front proxy's CA and names (ConfigMap kube-system/extension-apiserver-authentication)
/// through the Role every cluster has for aggregated API servers.
fn auth_reader(names: &Names) -> Document {
    let binding = RoleBinding {
        metadata: meta(
            &format!("{}-auth-reader", names.cluster_controller),
            Some("kube-system"),
        ),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "Role".to_owned(),
            name: "extension-apiserver-authentication-reader".to_owned(),
        },
        subjects: Some(vec![subject(names)]),
    };
    Document::new(Object::RoleBinding(binding)).with_comment(
        "The aggregated TrafficMetrics API authenticates the API server's front proxy with the CA and names of ConfigMap kube-system/extension-apiserver-authentication: read through the cluster's own Role for aggregated API servers.",
    )
}

/// The discovery adapter's ClusterRole and binding (list + watch on four kinds).
pub fn discovery(names: &Names) -> Vec<Document> {
    Vec::from(cluster_role(
        &names.cluster_discovery,
        &discovery_rules(),
        names,
        "What trellis-adapter-kubernetes reads: list + watch on four kinds (its reflectors never GET single objects and never write). When the adapter is limited to one namespace (Options::namespace), the same rules in a Role there suffice. Why each rule:",
    ))
}

/// The text of the committed file for `which` (default namespace).
pub fn file(which: Which, names: &Names) -> String {
    let documents = match which {
        Which::Controller => controller(names, false),
        Which::Discovery => discovery(names),
    };
    let header = format!(
        "# Generated by `cargo run -- install --rbac-only {} > {}` (cli/src/install/rbac.rs); do not edit.\n# The same rules are in `trellis install` and deploy/install.yaml.\n",
        match which {
            Which::Controller => "controller",
            Which::Discovery => "discovery",
        },
        which.path()
    );
    super::document::render(&documents, super::document::Format::Yaml, &header)
}
