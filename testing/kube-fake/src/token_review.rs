//! TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`), answered like a real API
//! server for ServiceAccount tokens this fake issued with
//! [`FakeApiServer::issue_service_account_token`].
//!
//! - A known token whose audiences intersect the requested ones: `authenticated: true`, the user
//!   `system:serviceaccount:NS:NAME` with its groups, and `audiences` = the intersection.
//! - No audiences requested: the API server's own audience
//!   (`https://kubernetes.default.svc.cluster.local`) is assumed, as a real server does.
//! - An unknown or revoked token, or no common audience: `authenticated` absent, `user` empty and
//!   an `error` string, HTTP 201 (a review that says "no" is still a successful create).
//! - No token at all: 422 Invalid, like the real validation.
//!
//! Simplifications: tokens do not expire, and are opaque random strings rather than signed JWTs
//! (only the API server reads them).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use crate::FakeApiServer;
use crate::error::ApiError;

/// The API server's own audience, assumed when a review names none.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Debug, Clone)]
struct Issued {
    namespace: String,
    name: String,
    audiences: Vec<String>,
    uid: String,
}

/// The tokens a fake server has issued.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    issued: Mutex<HashMap<String, Issued>>,
    counter: AtomicU64,
}

impl Tokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Issued>> {
        self.issued.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn random_hex(&self) -> String {
        // Test support: unguessable enough (two randomly keyed SipHashes of a counter).
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let word = || {
            let mut h = RandomState::new().build_hasher();
            h.write_u64(n);
            h.finish()
        };
        format!("{:016x}{:016x}", word(), word())
    }

    fn issue(&self, namespace: &str, name: &str, audiences: &[&str]) -> String {
        let token = format!("kube-fake-sa-token.{}", self.random_hex());
        let issued = Issued {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            audiences: if audiences.is_empty() {
                vec![API_AUDIENCE.to_owned()]
            } else {
                audiences.iter().map(|a| (*a).to_owned()).collect()
            },
            uid: self.random_hex(),
        };
        self.lock().insert(token.clone(), issued);
        token
    }

    fn revoke(&self, token: &str) -> bool {
        self.lock().remove(token).is_some()
    }

    /// The answer to a TokenReview `request` (the object as POSTed).
    pub(crate) fn review(&self, mut request: Value) -> Result<Value, ApiError> {
        let token = request["spec"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if token.is_empty() {
            return Err(ApiError::new(
                422,
                "Invalid",
                "TokenReview.authentication.k8s.io \"\" is invalid: spec.token: Required value",
            ));
        }
        let wanted: Vec<String> = request["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .filter(|a: &Vec<String>| !a.is_empty())
            .unwrap_or_else(|| vec![API_AUDIENCE.to_owned()]);
        let found = self.lock().get(&token).cloned();
        let status = match found {
            None => json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
            Some(issued) => {
                let common: Vec<&String> = wanted
                    .iter()
                    .filter(|a| issued.audiences.contains(a))
                    .collect();
                if common.is_empty() {
                    json!({"user": {}, "error": format!(
                        "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                        issued.audiences, wanted
                    )})
                } else {
                    json!({
                        "authenticated": true,
                        "user": {
                            "username": format!("system:serviceaccount:{}:{}", issued.namespace, issued.name),
                            "uid": issued.uid,
                            "groups": [
                                "system:serviceaccounts",
                                format!("system:serviceaccounts:{}", issued.namespace),
                                "system:authenticated",
                            ],
                        },
                        "audiences": common,
                    })
                }
            }
        };
        request["apiVersion"] = json!("authentication.k8s.io/v1");
        request["kind"] = json!("TokenReview");
        if request.get("metadata").is_none_or(Value::is_null) {
            request["metadata"] = json!({});
        }
        // A real server does not echo the token back.
        request["spec"]["token"] = Value::Null;
        request["status"] = status;
        Ok(request)
    }
}

impl FakeApiServer {
    /// Issues a ServiceAccount token for `namespace/name` bound to `audiences` (empty = the API
    /// server's own audience), as a projected token volume would hold it. TokenReview
    /// authenticates it until [`FakeApiServer::revoke_service_account_token`].
    pub fn issue_service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audiences: &[&str],
    ) -> String {
        self.tokens.issue(namespace, name, audiences)
    }

    /// Makes TokenReview reject `token` from now on (the Pod or ServiceAccount was deleted).
    /// Returns whether the token was known.
    pub fn revoke_service_account_token(&self, token: &str) -> bool {
        self.tokens.revoke(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(tokens: &Tokens, token: &str, audiences: Value) -> Value {
        tokens
            .review(json!({"spec": {"token": token, "audiences": audiences}}))
            .unwrap()
    }

    #[test]
    fn issued_tokens_authenticate_for_their_audiences_only() {
        let tokens = Tokens::default();
        let t = tokens.issue("shop", "web", &["trellis"]);
        let ok = review(&tokens, &t, json!(["trellis"]));
        assert_eq!(ok["status"]["authenticated"], true);
        assert_eq!(
            ok["status"]["user"]["username"],
            "system:serviceaccount:shop:web"
        );
        assert_eq!(ok["status"]["audiences"], json!(["trellis"]));
        assert!(ok["spec"]["token"].is_null());

        let other = review(&tokens, &t, json!(["vault"]));
        assert!(other["status"]["authenticated"].is_null());
        assert!(
            other["status"]["error"]
                .as_str()
                .unwrap()
                .contains("audiences")
        );

        let default = review(&tokens, &t, json!(null));
        assert!(default["status"]["authenticated"].is_null(), "{default}");
    }

    #[test]
    fn unknown_revoked_and_missing_tokens() {
        let tokens = Tokens::default();
        let t = tokens.issue("shop", "web", &[]);
        assert_eq!(
            review(&tokens, &t, json!([]))["status"]["authenticated"],
            true
        );
        assert!(tokens.revoke(&t));
        let gone = review(&tokens, &t, json!([]));
        assert!(
            gone["status"]["error"]
                .as_str()
                .unwrap()
                .contains("invalid bearer token")
        );
        assert_eq!(tokens.review(json!({"spec": {}})).unwrap_err().code, 422);
        assert_ne!(tokens.issue("a", "b", &[]), tokens.issue("a", "b", &[]));
    }
}
