//! SubjectAccessReview (`POST /apis/authorization.k8s.io/v1/subjectaccessreviews`), answered
//! from rules the test grants with [`FakeApiServer::grant`], the way the real RBAC authorizer
//! answers: `status.allowed: true` with a reason naming the rule, else `allowed: false` and an
//! empty reason (RBAC never says `denied`; it only fails to allow), HTTP 201 either way.
//!
//! Validation as the real API server's: `spec.user` or `spec.groups` is required, and exactly one
//! of `spec.resourceAttributes` and `spec.nonResourceAttributes` (422 `Invalid` otherwise).
//!
//! Simplifications: rules match on user or group, verb, API group, resource (`resource/sub` for
//! a subresource) and namespace, with `*` as a wildcard; no names, no non-resource URLs.

use std::sync::Mutex;

use serde_json::{Value, json};

use crate::FakeApiServer;
use crate::error::ApiError;

/// One grant: `subject` (a user name or a group name) may `verbs` on `resources` of API group
/// `group`, in `namespace` (`None`: every namespace and cluster-scoped requests). `*` matches
/// anything in verbs, group and resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRule {
    pub subject: String,
    pub verbs: Vec<String>,
    pub group: String,
    pub resources: Vec<String>,
    pub namespace: Option<String>,
}

impl AccessRule {
    /// `subject` may `verbs` on `resources` of `group` everywhere.
    pub fn new(subject: &str, verbs: &[&str], group: &str, resources: &[&str]) -> Self {
        Self {
            subject: subject.to_owned(),
            verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
            group: group.to_owned(),
            resources: resources.iter().map(|r| (*r).to_owned()).collect(),
            namespace: None,
        }
    }

    /// Only in `namespace`.
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    fn allows(&self, user: &str, groups: &[&str], attributes: &Value) -> bool {
        let text = |k: &str| attributes[k].as_str().unwrap_or_default();
        let any = |list: &[String], value: &str| list.iter().any(|x| x == "*" || x == value);
        let resource = match text("subresource") {
            "" => text("resource").to_owned(),
            sub => format!("{}/{sub}", text("resource")),
        };
        (self.subject == user || groups.contains(&self.subject.as_str()))
            && any(&self.verbs, text("verb"))
            && (self.group == "*" || self.group == text("group"))
            && any(&self.resources, &resource)
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| ns == text("namespace"))
    }
}

/// The rules a fake server has been given.
#[derive(Debug, Default)]
pub(crate) struct Rules(Mutex<Vec<AccessRule>>);

impl Rules {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AccessRule>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer to a SubjectAccessReview `request` (the object as POSTed).
    pub(crate) fn review(&self, mut request: Value) -> Result<Value, ApiError> {
        let spec = &request["spec"];
        let user = spec["user"].as_str().unwrap_or_default().to_owned();
        let groups: Vec<String> = spec["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect();
        if user.is_empty() && groups.is_empty() {
            return Err(invalid(
                "spec.user",
                "at least one of user or group must be specified",
            ));
        }
        let resource = &spec["resourceAttributes"];
        let non_resource = &spec["nonResourceAttributes"];
        if resource.is_object() == non_resource.is_object() {
            return Err(invalid(
                "spec.resourceAttributes",
                "exactly one of nonResourceAttributes or resourceAttributes must be specified",
            ));
        }
        let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
        let allowed_by = if resource.is_object() {
            self.lock()
                .iter()
                .position(|rule| rule.allows(&user, &group_refs, resource))
        } else {
            None
        };
        request["apiVersion"] = json!("authorization.k8s.io/v1");
        request["kind"] = json!("SubjectAccessReview");
        if request.get("metadata").is_none_or(Value::is_null) {
            request["metadata"] = json!({"creationTimestamp": null});
        }
        request["status"] = match allowed_by {
            Some(index) => json!({
                "allowed": true,
                "reason": format!("RBAC: allowed by the fake API server's rule {index}"),
            }),
            None => json!({"allowed": false}),
        };
        Ok(request)
    }
}

fn invalid(field: &str, why: &str) -> ApiError {
    ApiError::new(
        422,
        "Invalid",
        format!(
            "SubjectAccessReview.authorization.k8s.io \"\" is invalid: {field}: Invalid value: \"\": {why}"
        ),
    )
}

impl FakeApiServer {
    /// Lets SubjectAccessReviews allow what `rule` says, from now on.
    pub fn grant(&self, rule: AccessRule) {
        self.rules.lock().push(rule);
    }

    /// Withdraws every grant.
    pub fn revoke_grants(&self) {
        self.rules.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(rules: &Rules, user: &str, groups: &[&str], verb: &str, ns: &str) -> Value {
        rules
            .review(json!({
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": user,
                    "groups": groups,
                    "resourceAttributes": {
                        "namespace": ns, "verb": verb, "group": "metrics.smi-spec.io",
                        "resource": "deployments", "name": "web",
                    },
                },
            }))
            .unwrap()
    }

    #[test]
    fn rules_allow_by_user_or_group_and_nothing_else() {
        let rules = Rules::default();
        rules.lock().push(
            AccessRule::new("alice", &["get", "list"], "metrics.smi-spec.io", &["*"])
                .in_namespace("shop"),
        );
        rules.lock().push(AccessRule::new(
            "viewers",
            &["get"],
            "metrics.smi-spec.io",
            &["deployments"],
        ));
        let yes = review(&rules, "alice", &[], "get", "shop");
        assert_eq!(yes["status"]["allowed"], true, "{yes}");
        assert_eq!(yes["kind"], "SubjectAccessReview");
        assert!(yes["status"]["reason"].as_str().unwrap().contains("rule 0"));
        assert_eq!(
            review(&rules, "alice", &[], "get", "other")["status"]["allowed"],
            false
        );
        assert_eq!(
            review(&rules, "bob", &["viewers"], "get", "any")["status"]["allowed"],
            true
        );
        let no = review(&rules, "bob", &["viewers"], "list", "any");
        assert_eq!(no["status"], json!({"allowed": false}));
    }

    #[test]
    fn malformed_reviews_are_invalid() {
        let rules = Rules::default();
        let no_subject = rules
            .review(json!({"spec": {"resourceAttributes": {"verb": "get"}}}))
            .unwrap_err();
        assert_eq!(no_subject.code, 422);
        let both = rules
            .review(json!({"spec": {"user": "a", "resourceAttributes": {}, "nonResourceAttributes": {}}}))
            .unwrap_err();
        assert_eq!(both.code, 422);
        let neither = rules.review(json!({"spec": {"user": "a"}})).unwrap_err();
        assert!(neither.to_string().contains("exactly one"), "{neither}");
    }
}
