//! Inbound authorization: the hook where the security work plugs in.
//!
//! [`Authorizer`] decides per connection (opaque TCP), per request (HTTP) and per UDP tunnel
//! (for the application's UDP port the tunnel names; only rules whose `protocols` cover `udp`
//! allow one, and no rule covers it unless it says so). The default,
//! [`PolicyAuthorizer`], evaluates the inbound policy from the config file or the controller
//! (`InboundPolicy`): allow rules are ORed; a rule allows when the caller's identity, its source
//! network, the port and (for HTTP) one of its routes match; otherwise the default action
//! applies, and the default action defaults to deny.
//!
//! Caller identity: mTLS callers carry the SPIFFE id of their verified client certificate
//! ([`Caller::identity`]); plaintext callers have none and match only rules with
//! `unauthenticated: true` (or a permissive default). A rule with `unauthenticated: true` also
//! matches authenticated callers: a verified caller is never worse off than an anonymous one
//! from the same network. `*` matches any authenticated caller.
//!
//! End-user claims: a rule may also require claims of the request's JWT
//! ([`AuthorizationTable::claims`], all must hold), verified before authorization by the
//! policy's `jwt` ([`RequestInfo::claims`]). Such a rule never matches a request without
//! verified claims, nor an opaque TCP connection (which has no request, so no token).
//!
//! Claim requirements ([`InboundTable::unmet_claims`], from TrafficPolicy `claims`) are not
//! rules: they are ANDed with whatever the rules decide, checked by the HTTP path after this
//! authorizer (403 `claims`), so no other rule can let a covered request through without them.
//! Opaque TCP and UDP, which carry no token, are refused here on a port with any requirement.
//!
//! Requests are checked against the policy current when they arrive (so a revoked rule stops
//! the next request on a kept-alive connection); open opaque TCP connections are re-checked
//! whenever the policy changes (see `tcp::forward_inbound`).

use std::net::SocketAddr;

use http::{HeaderMap, Method};

use crate::config::DefaultAction;
use crate::metrics::Label;
use crate::table::{AuthorizationTable, InboundTable, RoutingTable};

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The peer's socket address.
    pub peer: SocketAddr,
    /// The peer's verified SPIFFE id (None for plaintext callers).
    pub identity: Option<Label>,
    /// The local port the connection arrived on; for a transparent inbound connection, the
    /// port the caller addressed (its original destination's), which is what policies name.
    pub port: u16,
    /// The connection came through the transparent inbound listener: its policy is the one of
    /// `port` there, not the inbound listener's.
    pub transparent: bool,
}

impl Caller {
    /// The inbound policy that applies to this caller's connection in `table`: the inbound
    /// listener's, or for a transparent one the policy of the port it addressed (`None`: refuse,
    /// fail safe).
    pub fn policy_in<'t>(
        &self,
        table: &'t RoutingTable,
    ) -> Option<&'t std::sync::Arc<InboundTable>> {
        if self.transparent {
            table.transparent_inbound.get(&self.port)
        } else {
            table.inbound.as_ref()
        }
    }
}

/// An HTTP request as far as authorization is concerned.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path without query.
    pub path: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// The claims of the request's verified JWT (`None`: no `jwt` policy, or no token).
    pub claims: Option<&'a trellis_jwt::Claims>,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Refuse (HTTP: 403 with `x-trellis-error: forbidden`; TCP: the connection is closed).
    Deny,
}

/// Decides who may reach the local application.
pub trait Authorizer: Send + Sync + std::fmt::Debug + 'static {
    /// For opaque TCP connections (no request to look at).
    fn authorize_connection(&self, policy: &InboundTable, caller: &Caller) -> Verdict;
    /// For each HTTP request.
    fn authorize_request(
        &self,
        policy: &InboundTable,
        caller: &Caller,
        request: RequestInfo<'_>,
    ) -> Verdict;
    /// For a UDP tunnel from another proxy; `caller.port` is the application's UDP port the
    /// tunnel's header names. Only rules that cover `udp` allow it. The default refuses (fail
    /// safe for authorizers that know nothing of UDP).
    fn authorize_udp(&self, policy: &InboundTable, caller: &Caller) -> Verdict {
        let _ = (policy, caller);
        Verdict::Deny
    }
}

/// Evaluates the configured / controller-provided inbound policy.
#[derive(Debug, Default, Clone, Copy)]
pub struct PolicyAuthorizer;

fn identity_matches(rule: &AuthorizationTable, caller: &Caller) -> bool {
    rule.unauthenticated
        || caller.identity.as_ref().is_some_and(|id| {
            rule.identities
                .iter()
                .any(|allowed| allowed == "*" || allowed == id.as_str())
        })
}

fn network_matches(rule: &AuthorizationTable, caller: &Caller) -> bool {
    // IPv4 peers on a dual-stack socket show up as ::ffff:a.b.c.d; match them as IPv4.
    let ip = caller.peer.ip().to_canonical();
    rule.networks.is_empty() || rule.networks.iter().any(|n| n.contains(&ip))
}

fn claims_match(rule: &AuthorizationTable, claims: Option<&trellis_jwt::Claims>) -> bool {
    rule.claims.is_empty()
        || claims.is_some_and(|claims| rule.claims.iter().all(|m| m.matches(claims)))
}

fn port_matches(rule: &AuthorizationTable, caller: &Caller) -> bool {
    rule.ports.is_empty() || rule.ports.contains(&caller.port)
}

fn default_verdict(policy: &InboundTable) -> Verdict {
    match policy.default_action {
        DefaultAction::Allow => Verdict::Allow,
        DefaultAction::Deny => Verdict::Deny,
    }
}

impl Authorizer for PolicyAuthorizer {
    fn authorize_connection(&self, policy: &InboundTable, caller: &Caller) -> Verdict {
        // Claim requirements are checked per request, and an opaque connection has no request
        // to check (nor a token): a port with any refuses it, whatever the rules and the
        // default action say. Requirements with matches too: HTTP the proxy did not detect
        // (`detect` falls back to opaque) may still reach a gated route of the application.
        if !policy.claim_requirements.is_empty() {
            return Verdict::Deny;
        }
        let allowed = policy.authorizations.iter().any(|rule| {
            rule.routes.is_empty()
                && rule.protocols.tcp
                && rule.claims.is_empty()
                && identity_matches(rule, caller)
                && network_matches(rule, caller)
                && port_matches(rule, caller)
        });
        if allowed {
            Verdict::Allow
        } else {
            default_verdict(policy)
        }
    }

    fn authorize_request(
        &self,
        policy: &InboundTable,
        caller: &Caller,
        req: RequestInfo<'_>,
    ) -> Verdict {
        let allowed = policy.authorizations.iter().any(|rule| {
            rule.protocols.tcp
                && identity_matches(rule, caller)
                && network_matches(rule, caller)
                && port_matches(rule, caller)
                && claims_match(rule, req.claims)
                && (rule.routes.is_empty()
                    || rule
                        .routes
                        .iter()
                        .any(|m| m.matches(req.method, req.path, req.headers)))
        });
        if allowed {
            Verdict::Allow
        } else {
            default_verdict(policy)
        }
    }

    /// A rule covering `udp` (which has no routes and no claims) whose identities, networks and
    /// ports (the tunnel's UDP port) match; else the default action.
    fn authorize_udp(&self, policy: &InboundTable, caller: &Caller) -> Verdict {
        // A datagram carries no token either (see `authorize_connection`).
        if !policy.claim_requirements.is_empty() {
            return Verdict::Deny;
        }
        let allowed = policy.authorizations.iter().any(|rule| {
            rule.protocols.udp
                && rule.routes.is_empty()
                // A datagram carries no token: a rule with claims never allows a tunnel.
                && rule.claims.is_empty()
                && identity_matches(rule, caller)
                && network_matches(rule, caller)
                && port_matches(rule, caller)
        });
        if allowed {
            Verdict::Allow
        } else {
            default_verdict(policy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Authorization, HttpMatch, Inbound, InboundPolicy};

    fn policy(default_action: DefaultAction, authorizations: Vec<Authorization>) -> InboundTable {
        InboundTable::compile(&Inbound {
            listen: "127.0.0.1:0".parse().unwrap(),
            app: "127.0.0.1:1".parse().unwrap(),
            protocol: Default::default(),
            policy: InboundPolicy {
                default_action,
                authorizations,
                ..Default::default()
            },
        })
        .unwrap()
    }

    fn caller(identity: Option<&str>, port: u16) -> Caller {
        caller_from(identity, port, "127.0.0.1:9")
    }

    fn caller_from(identity: Option<&str>, port: u16, peer: &str) -> Caller {
        Caller {
            peer: peer.parse().unwrap(),
            identity: identity.map(Label::from),
            port,
            transparent: false,
        }
    }

    #[test]
    fn deny_by_default_and_rules_allow_narrowly() {
        let p = policy(
            DefaultAction::Deny,
            vec![Authorization {
                identities: vec!["spiffe://td/ns/a/sa/web".into()],
                ports: vec![8080],
                routes: vec![HttpMatch {
                    path_regex: Some("/metrics".into()),
                    methods: vec!["GET".into()],
                    ..Default::default()
                }],
                unauthenticated: false,
                networks: vec![],
                protocols: vec![],
                claims: vec![],
            }],
        );
        let h = HeaderMap::new();
        let get = |path| RequestInfo {
            method: &Method::GET,
            path,
            headers: &h,
            claims: None,
        };
        let a = PolicyAuthorizer;
        assert_eq!(
            a.authorize_request(
                &p,
                &caller(Some("spiffe://td/ns/a/sa/web"), 8080),
                get("/metrics")
            ),
            Verdict::Allow
        );
        assert_eq!(
            a.authorize_request(
                &p,
                &caller(Some("spiffe://td/ns/a/sa/web"), 8080),
                get("/admin")
            ),
            Verdict::Deny
        );
        assert_eq!(
            a.authorize_request(
                &p,
                &caller(Some("spiffe://td/ns/a/sa/web"), 9090),
                get("/metrics")
            ),
            Verdict::Deny
        );
        assert_eq!(
            a.authorize_request(
                &p,
                &caller(Some("spiffe://td/ns/b/sa/x"), 8080),
                get("/metrics")
            ),
            Verdict::Deny
        );
        assert_eq!(
            a.authorize_request(&p, &caller(None, 8080), get("/metrics")),
            Verdict::Deny
        );
        assert_eq!(
            a.authorize_connection(&p, &caller(Some("spiffe://td/ns/a/sa/web"), 8080)),
            Verdict::Deny,
            "route rules do not allow opaque TCP"
        );
    }

    #[test]
    fn unauthenticated_and_permissive() {
        let p = policy(
            DefaultAction::Deny,
            vec![Authorization {
                unauthenticated: true,
                ..Default::default()
            }],
        );
        assert_eq!(
            PolicyAuthorizer.authorize_connection(&p, &caller(None, 1)),
            Verdict::Allow
        );
        let p = policy(DefaultAction::Allow, vec![]);
        assert_eq!(
            PolicyAuthorizer.authorize_connection(&p, &caller(None, 1)),
            Verdict::Allow
        );
        let p = policy(DefaultAction::Deny, vec![]);
        assert_eq!(
            PolicyAuthorizer.authorize_connection(&p, &caller(None, 1)),
            Verdict::Deny
        );
    }

    #[test]
    fn udp_is_allowed_only_by_rules_that_cover_it() {
        use crate::config::L4Protocol::{Tcp, Udp};
        let web = Some("spiffe://td/ns/a/sa/web");
        let rule = |protocols: Vec<crate::config::L4Protocol>| Authorization {
            identities: vec!["spiffe://td/ns/a/sa/web".into()],
            ports: vec![53],
            protocols,
            ..Default::default()
        };
        let a = PolicyAuthorizer;
        let h = HeaderMap::new();
        let get = RequestInfo {
            method: &Method::GET,
            path: "/",
            headers: &h,
            claims: None,
        };
        for (protocols, tcp, udp) in [
            (vec![], Verdict::Allow, Verdict::Deny),
            (vec![Tcp], Verdict::Allow, Verdict::Deny),
            (vec![Udp], Verdict::Deny, Verdict::Allow),
            (vec![Tcp, Udp], Verdict::Allow, Verdict::Allow),
        ] {
            let p = policy(DefaultAction::Deny, vec![rule(protocols.clone())]);
            let caller = caller(web, 53);
            assert_eq!(a.authorize_connection(&p, &caller), tcp, "{protocols:?}");
            assert_eq!(a.authorize_request(&p, &caller, get), tcp, "{protocols:?}");
            assert_eq!(a.authorize_udp(&p, &caller), udp, "{protocols:?}");
        }
        let p = policy(DefaultAction::Deny, vec![rule(vec![Udp])]);
        assert_eq!(a.authorize_udp(&p, &caller(web, 54)), Verdict::Deny, "port");
        assert_eq!(
            a.authorize_udp(&p, &caller(Some("spiffe://td/ns/b/sa/x"), 53)),
            Verdict::Deny,
            "identity"
        );
        assert_eq!(a.authorize_udp(&p, &caller(None, 53)), Verdict::Deny);
        assert_eq!(
            a.authorize_udp(&policy(DefaultAction::Allow, vec![]), &caller(None, 53)),
            Verdict::Allow,
            "the permissive default covers UDP too"
        );
        let bad = InboundTable::compile(&Inbound {
            listen: "127.0.0.1:0".parse().unwrap(),
            app: "127.0.0.1:1".parse().unwrap(),
            protocol: Default::default(),
            policy: InboundPolicy {
                authorizations: vec![Authorization {
                    routes: vec![HttpMatch::default()],
                    ..rule(vec![Tcp, Udp])
                }],
                ..Default::default()
            },
        })
        .unwrap_err();
        assert_eq!(bad.field, "inbound.policy.authorizations[0].protocols");
    }

    #[test]
    fn claim_rules_need_verified_claims_that_all_match() {
        let role = |values: &[&str]| trellis_jwt::ClaimMatch {
            claim: "realm.roles".into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        let mut inbound = Inbound {
            listen: "127.0.0.1:0".parse().unwrap(),
            app: "127.0.0.1:1".parse().unwrap(),
            protocol: Default::default(),
            policy: InboundPolicy {
                authorizations: vec![Authorization {
                    unauthenticated: true,
                    claims: vec![
                        role(&["admin", "operator"]),
                        trellis_jwt::ClaimMatch {
                            claim: "tier".into(),
                            values: vec!["2".into()],
                        },
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            },
        };
        inbound.policy.jwt = Some(
            serde_json::from_value(serde_json::json!({
                "providers": [{"issuer": "https://i", "audiences": ["a"], "jwks": {"file": "/k"}}]
            }))
            .unwrap(),
        );
        let p = InboundTable::compile(&inbound).unwrap();
        let claims = |json: serde_json::Value| {
            trellis_jwt::Claims::from_map(json.as_object().unwrap().clone())
        };
        let h = HeaderMap::new();
        let decide = |claims: Option<&trellis_jwt::Claims>| {
            PolicyAuthorizer.authorize_request(
                &p,
                &caller(None, 80),
                RequestInfo {
                    method: &Method::GET,
                    path: "/",
                    headers: &h,
                    claims,
                },
            )
        };
        let operator =
            claims(serde_json::json!({"realm": {"roles": ["user", "operator"]}, "tier": 2}));
        assert_eq!(decide(Some(&operator)), Verdict::Allow);
        let wrong_tier = claims(serde_json::json!({"realm": {"roles": ["admin"]}, "tier": 3}));
        assert_eq!(
            decide(Some(&wrong_tier)),
            Verdict::Deny,
            "every condition must hold"
        );
        let user = claims(serde_json::json!({"realm": {"roles": ["user"]}, "tier": 2}));
        assert_eq!(decide(Some(&user)), Verdict::Deny);
        assert_eq!(decide(None), Verdict::Deny, "no verified claims");
        assert_eq!(
            PolicyAuthorizer.authorize_connection(&p, &caller(None, 80)),
            Verdict::Deny,
            "a rule with claims never allows opaque TCP"
        );
    }

    #[test]
    fn networks_narrow_rules_to_source_addresses() {
        let p = policy(
            DefaultAction::Deny,
            vec![Authorization {
                unauthenticated: true,
                networks: vec!["10.1.0.0/16".into(), "192.168.7.7".into()],
                ..Default::default()
            }],
        );
        let a = PolicyAuthorizer;
        for (peer, verdict) in [
            ("10.1.2.3:5", Verdict::Allow),
            ("[::ffff:10.1.2.3]:5", Verdict::Allow),
            ("192.168.7.7:5", Verdict::Allow),
            ("10.2.0.1:5", Verdict::Deny),
            ("127.0.0.1:5", Verdict::Deny),
        ] {
            assert_eq!(
                a.authorize_connection(&p, &caller_from(None, 1, peer)),
                verdict,
                "{peer}"
            );
        }
        assert_eq!(
            a.authorize_connection(
                &p,
                &caller_from(Some("spiffe://td/ns/a/sa/web"), 1, "10.1.0.9:1")
            ),
            Verdict::Allow,
            "an authenticated caller from the network matches an unauthenticated rule"
        );
        let bad = InboundTable::compile(&Inbound {
            listen: "127.0.0.1:0".parse().unwrap(),
            app: "127.0.0.1:1".parse().unwrap(),
            protocol: Default::default(),
            policy: InboundPolicy {
                default_action: DefaultAction::Deny,
                authorizations: vec![Authorization {
                    networks: vec!["10.0.0.0/33".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        })
        .unwrap_err();
        assert_eq!(bad.field, "inbound.policy.authorizations[0].networks[0]");
    }

    /// The bypass claim requirements close: a rule allowing every request (as a second
    /// TrafficTarget, or a TCPRoute rule, would give) and a permissive default both leave a
    /// request to a gated route refused without the claims; opaque TCP and UDP are refused on
    /// such a port whatever the rules say.
    #[test]
    fn claim_requirements_hold_whatever_rule_or_default_allows_the_request() {
        use crate::config::ClaimRequirement;
        let requirement = |path: &str, claim: &str, value: &str| ClaimRequirement {
            name: format!("demo/web{path}"),
            matches: if path.is_empty() {
                Vec::new()
            } else {
                vec![HttpMatch {
                    path_regex: Some(path.into()),
                    ..Default::default()
                }]
            },
            claims: vec![trellis_jwt::ClaimMatch {
                claim: claim.into(),
                values: vec![value.into()],
            }],
        };
        let allow_all = Authorization {
            unauthenticated: true,
            protocols: vec![
                crate::config::L4Protocol::Tcp,
                crate::config::L4Protocol::Udp,
            ],
            ..Default::default()
        };
        let mut inbound = Inbound {
            listen: "127.0.0.1:0".parse().unwrap(),
            app: "127.0.0.1:1".parse().unwrap(),
            protocol: Default::default(),
            policy: InboundPolicy {
                default_action: DefaultAction::Allow,
                authorizations: vec![allow_all],
                claim_requirements: vec![
                    requirement("/admin/.*", "role", "admin"),
                    requirement("", "aud", "web"),
                ],
                ..Default::default()
            },
        };
        // Without `jwt` nothing could be verified: refused at compile time, with the field.
        let err = InboundTable::compile(&inbound).unwrap_err();
        assert_eq!(err.field, "inbound.policy.claim_requirements[0].claims");
        inbound.policy.jwt = Some(
            serde_json::from_value(serde_json::json!({
                "providers": [{"issuer": "https://i", "audiences": ["web"], "jwks": {"file": "/k"}}]
            }))
            .unwrap(),
        );
        let p = InboundTable::compile(&inbound).unwrap();
        let claims = |json: serde_json::Value| {
            trellis_jwt::Claims::from_map(json.as_object().unwrap().clone())
        };
        let h = HeaderMap::new();
        let unmet = |path: &str, claims: Option<&trellis_jwt::Claims>| {
            let info = RequestInfo {
                method: &Method::GET,
                path,
                headers: &h,
                claims,
            };
            assert_eq!(
                PolicyAuthorizer.authorize_request(&p, &caller(None, 80), info),
                Verdict::Allow,
                "the rules allow everything"
            );
            p.unmet_claims(&Method::GET, path, &h, claims)
                .map(|r| r.name.clone())
        };
        let admin = claims(serde_json::json!({"aud": "web", "role": "admin"}));
        let user = claims(serde_json::json!({"aud": "web", "role": "user"}));
        let other_aud = claims(serde_json::json!({"aud": "other", "role": "admin"}));
        assert_eq!(unmet("/admin/x", Some(&admin)), None);
        assert_eq!(
            unmet("/admin/x", Some(&user)).as_deref(),
            Some("demo/web/admin/.*")
        );
        assert_eq!(
            unmet("/admin/x", None).as_deref(),
            Some("demo/web/admin/.*")
        );
        assert_eq!(unmet("/public", Some(&user)), None, "ungated route");
        assert_eq!(
            unmet("/public", Some(&other_aud)).as_deref(),
            Some("demo/web"),
            "every requirement that matches holds, not only the first"
        );
        assert_eq!(unmet("/public", None).as_deref(), Some("demo/web"));
        assert_eq!(
            PolicyAuthorizer.authorize_connection(&p, &caller(None, 80)),
            Verdict::Deny,
            "opaque TCP carries no token"
        );
        assert_eq!(
            PolicyAuthorizer.authorize_udp(&p, &caller(None, 80)),
            Verdict::Deny,
            "nor does a UDP tunnel"
        );
        // A requirement without conditions is refused, not taken as "nothing required".
        inbound.policy.claim_requirements[0].claims.clear();
        let err = InboundTable::compile(&inbound).unwrap_err();
        assert_eq!(err.field, "inbound.policy.claim_requirements[0].claims");
    }
}
