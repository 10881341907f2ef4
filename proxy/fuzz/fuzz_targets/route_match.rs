//! Fuzz the HTTP route and authorization matchers from structured input: compiled matchers
//! (regex with size limits, methods, header maps), the routing table's first-match-wins, the
//! authority lookup, and the inbound policy evaluator.
//!
//! Besides "never panics", checked where it is cheap:
//! - a compile error names the field it is about;
//! - a match with no fields matches every request;
//! - a match is the AND of its parts (each part compiled on its own gives the same answer);
//! - an escaped literal path regex matches exactly that path (anchored both ends), and a
//!   literal prefix followed by `.*` matches exactly the paths starting with it;
//! - a methods list matches exactly the listed methods (case-insensitive in the config), `*`
//!   or an empty list matches all;
//! - a literal header regex matches exactly when a value of that header equals it;
//! - the routing table picks the first route one of whose matches matches (a route without
//!   matches takes everything), else the default split;
//! - authorization: a permissive default allows everything, adding an allow rule never turns
//!   Allow into Deny, a rule with `unauthenticated: true` and nothing else allows everyone, a
//!   rule with routes never allows an opaque connection, and no rule + deny default denies.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use trellis_proxy::authz::{Authorizer, Caller, PolicyAuthorizer, RequestInfo, Verdict};
use trellis_proxy::config::{
    Authorization, Config, DefaultAction, HttpMatch, Inbound, InboundPolicy,
};
use trellis_proxy::table::{InboundTable, Lookup, Matcher, RoutingTable, StatsRegistry};

/// A path regex: raw (anything, mostly invalid or odd), or built so the expected answer is known.
#[derive(Arbitrary, Debug, Clone)]
enum PathSpec {
    Raw(String),
    Literal(String),
    Prefix(String),
}

impl PathSpec {
    fn regex(&self) -> String {
        match self {
            PathSpec::Raw(r) => r.clone(),
            PathSpec::Literal(l) => regex::escape(l),
            PathSpec::Prefix(p) => format!("{}.*", regex::escape(p)),
        }
    }

    /// The answer for a path, when the spec makes it known.
    fn expect(&self, path: &str) -> Option<bool> {
        match self {
            PathSpec::Raw(_) => None,
            PathSpec::Literal(l) => Some(path == l),
            // `.` does not match a newline (the regex crate's default, and real paths have none).
            PathSpec::Prefix(p) => Some(
                path.strip_prefix(p.as_str())
                    .is_some_and(|rest| !rest.contains('\n')),
            ),
        }
    }
}

/// Header names from a small set (so matchers and requests meet), or anything.
#[derive(Arbitrary, Debug, Clone)]
enum NameSpec {
    User,
    UserUpper,
    Env,
    Other(String),
}

impl NameSpec {
    fn name(&self) -> String {
        match self {
            NameSpec::User => "x-user".into(),
            NameSpec::UserUpper => "X-User".into(),
            NameSpec::Env => "x-env".into(),
            NameSpec::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum ValueSpec {
    Raw(String),
    Literal(String),
}

impl ValueSpec {
    fn regex(&self) -> String {
        match self {
            ValueSpec::Raw(r) => r.clone(),
            ValueSpec::Literal(l) => regex::escape(l),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum MethodSpec {
    Get,
    Post,
    LowerGet,
    Any,
    Other(String),
}

impl MethodSpec {
    fn name(&self) -> String {
        match self {
            MethodSpec::Get => "GET".into(),
            MethodSpec::Post => "POST".into(),
            MethodSpec::LowerGet => "get".into(),
            MethodSpec::Any => "*".into(),
            MethodSpec::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
struct MatchSpec {
    path: Option<PathSpec>,
    methods: Vec<MethodSpec>,
    headers: Vec<(NameSpec, ValueSpec)>,
}

impl MatchSpec {
    fn to_config(&self) -> HttpMatch {
        HttpMatch {
            path_regex: self.path.as_ref().map(PathSpec::regex),
            methods: self.methods.iter().map(MethodSpec::name).collect(),
            headers: self.headers_map(),
        }
    }

    /// The config's header map (a later entry for the same name replaces an earlier one).
    fn headers_map(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .map(|(n, v)| (n.name(), v.regex()))
            .collect()
    }
}

#[derive(Arbitrary, Debug)]
struct RequestSpec {
    method: MethodSpec,
    path: String,
    headers: Vec<(NameSpec, Vec<u8>)>,
    authority: String,
    peer: (IpAddr, u16),
    identity: Option<IdentitySpec>,
    port: u16,
}

#[derive(Arbitrary, Debug, Clone)]
enum IdentitySpec {
    Web,
    Other(String),
}

impl IdentitySpec {
    fn id(&self) -> String {
        match self {
            IdentitySpec::Web => "spiffe://cluster.local/ns/shop/sa/web".into(),
            IdentitySpec::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct RuleSpec {
    identities: Vec<IdentitySpec>,
    ports: Vec<u16>,
    routes: Vec<MatchSpec>,
    unauthenticated: bool,
    networks: Vec<NetworkSpec>,
}

#[derive(Arbitrary, Debug)]
enum NetworkSpec {
    Cidr(IpAddr, u8),
    Raw(String),
}

impl NetworkSpec {
    fn text(&self) -> String {
        match self {
            NetworkSpec::Cidr(ip, len) => format!("{ip}/{len}"),
            NetworkSpec::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    matches: Vec<MatchSpec>,
    routes: Vec<Vec<MatchSpec>>,
    rules: Vec<RuleSpec>,
    permissive: bool,
    requests: Vec<RequestSpec>,
}

/// A request ready for matching (None when the fuzzer's method is not a valid one).
struct Request {
    method: Method,
    path: String,
    headers: HeaderMap,
    caller: Caller,
    authority: String,
}

impl Request {
    fn build(spec: &RequestSpec) -> Option<Request> {
        let method = Method::from_bytes(spec.method.name().as_bytes()).ok()?;
        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.name().as_bytes()),
                HeaderValue::from_bytes(value),
            ) else {
                continue;
            };
            headers.append(name, value);
        }
        Some(Request {
            method,
            path: spec.path.clone(),
            headers,
            caller: Caller {
                peer: SocketAddr::new(spec.peer.0, spec.peer.1),
                identity: spec.identity.as_ref().map(IdentitySpec::id),
                port: spec.port,
                transparent: false,
            },
            authority: spec.authority.clone(),
        })
    }

    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            method: &self.method,
            path: &self.path,
            headers: &self.headers,
            claims: None,
        }
    }
}

fn compile(m: &HttpMatch, field: &str) -> Option<Matcher> {
    match Matcher::compile(m, field) {
        Ok(matcher) => Some(matcher),
        Err(e) => {
            assert!(
                e.field.starts_with(field),
                "error for {field} names {:?}: {e:?}",
                e.field
            );
            None
        }
    }
}

/// Checks one match against its parts and the answers known from how it was built.
fn check_match(spec: &MatchSpec, requests: &[Request]) -> Option<Matcher> {
    let config = spec.to_config();
    let whole = compile(&config, "m")?;
    // Every part compiles on its own when the whole did.
    let path_only = HttpMatch {
        path_regex: config.path_regex.clone(),
        ..Default::default()
    };
    let methods_only = HttpMatch {
        methods: config.methods.clone(),
        ..Default::default()
    };
    let path_part = compile(&path_only, "p").expect("the path part compiles alone");
    let method_part = compile(&methods_only, "m").expect("the methods part compiles alone");
    let header_parts: Vec<(String, Matcher)> = config
        .headers
        .iter()
        .map(|(name, re)| {
            let m = HttpMatch {
                headers: [(name.clone(), re.clone())].into(),
                ..Default::default()
            };
            (
                name.clone(),
                compile(&m, "h").expect("a header part compiles alone"),
            )
        })
        .collect();
    let all_methods = config.methods.is_empty() || config.methods.iter().any(|m| m == "*");
    for r in requests {
        let (method, path, headers) = (&r.method, r.path.as_str(), &r.headers);
        let got = whole.matches(method, path, headers);
        let by_path = path_part.matches(method, path, headers);
        let by_method = method_part.matches(method, path, headers);
        let by_headers = header_parts
            .iter()
            .all(|(_, m)| m.matches(method, path, headers));
        assert_eq!(
            got,
            by_path && by_method && by_headers,
            "match is not the AND of its parts: path {by_path}, method {by_method}, headers {by_headers}"
        );
        if let Some(expected) = spec.path.as_ref().and_then(|p| p.expect(path)) {
            assert_eq!(
                by_path, expected,
                "path {path:?} against {:?}",
                config.path_regex
            );
        }
        let method_expected = all_methods
            || config
                .methods
                .iter()
                .any(|m| m.to_ascii_uppercase() == method.as_str());
        assert_eq!(
            by_method, method_expected,
            "method {method} against {:?}",
            config.methods
        );
        for (name, part) in &header_parts {
            // The config map keeps the last entry written for a name.
            let Some((_, ValueSpec::Literal(literal))) =
                spec.headers.iter().rev().find(|(n, _)| n.name() == *name)
            else {
                continue;
            };
            let expected = headers
                .get_all(name.to_ascii_lowercase().as_str())
                .iter()
                .any(|v| v.to_str().ok() == Some(literal.as_str()));
            assert_eq!(
                part.matches(method, path, headers),
                expected,
                "header {name}: {literal:?}"
            );
        }
    }
    Some(whole)
}

fn check_routing(input: &Input, requests: &[Request]) {
    let routes: Vec<serde_json::Value> = input
        .routes
        .iter()
        .take(6)
        .enumerate()
        .map(|(i, matches)| {
            let matches: Vec<HttpMatch> =
                matches.iter().take(4).map(MatchSpec::to_config).collect();
            serde_json::json!({"name": format!("r{i}"), "matches": matches})
        })
        .collect();
    let config = serde_json::json!({
        "destinations": [{
            "authority": "fuzz.default",
            "routes": routes,
            "backends": [{"name": "b", "endpoints": [{"address": "127.0.0.1:9"}]}],
        }],
    });
    let config: Config = serde_json::from_value(config).expect("the fuzz config deserializes");
    let table = match RoutingTable::compile(config.clone(), &StatsRegistry::default()) {
        Ok(table) => table,
        Err(e) => {
            assert!(e.field.starts_with("destinations[0].routes["), "{e:?}");
            return;
        }
    };
    let Lookup::Found(destination) = table.lookup("fuzz.default") else {
        panic!("the configured destination is not found");
    };
    // Each route's matches, compiled on their own (all compile, since the table did).
    let compiled: Vec<Vec<Matcher>> = config.destinations[0]
        .routes
        .iter()
        .map(|r| {
            r.matches
                .iter()
                .map(|m| Matcher::compile(m, "r").expect("compiled in the table"))
                .collect()
        })
        .collect();
    for r in requests {
        let decision = destination.route(&r.method, &r.path, &r.headers);
        let expected = compiled
            .iter()
            .position(|ms| {
                ms.is_empty() || ms.iter().any(|m| m.matches(&r.method, &r.path, &r.headers))
            })
            .map_or(String::new(), |i| format!("r{i}"));
        assert_eq!(decision.route.as_str(), expected, "first match wins");
        assert!(
            decision.backend.is_some(),
            "the default split has one backend of weight 1"
        );
        // Lookup of whatever the client writes never panics.
        let _ = table.lookup(&r.authority);
    }
}

fn inbound(default_action: DefaultAction, authorizations: Vec<Authorization>) -> Inbound {
    Inbound {
        listen: "127.0.0.1:0".parse().unwrap(),
        app: "127.0.0.1:1".parse().unwrap(),
        protocol: Default::default(),
        policy: InboundPolicy {
            default_action,
            authorizations,
        },
    }
}

fn check_authorization(input: &Input, requests: &[Request]) {
    let rules: Vec<Authorization> = input
        .rules
        .iter()
        .take(4)
        .map(|r| Authorization {
            identities: r.identities.iter().map(IdentitySpec::id).collect(),
            ports: r.ports.clone(),
            routes: r.routes.iter().take(4).map(MatchSpec::to_config).collect(),
            unauthenticated: r.unauthenticated,
            networks: r.networks.iter().map(NetworkSpec::text).collect(),
            ..Default::default()
        })
        .collect();
    let a = PolicyAuthorizer;
    let default_action = if input.permissive {
        DefaultAction::Allow
    } else {
        DefaultAction::Deny
    };
    // Policies with the first k rules, k = 0..=n: verdicts may only go from Deny to Allow.
    let mut policies = Vec::new();
    for k in 0..=rules.len() {
        match InboundTable::compile(&inbound(default_action, rules[..k].to_vec())) {
            Ok(p) => policies.push(p),
            Err(e) => {
                assert!(
                    e.field
                        .starts_with(&format!("inbound.policy.authorizations[{}]", k - 1)),
                    "{e:?}"
                );
                break;
            }
        }
    }
    let open = InboundTable::compile(&inbound(
        DefaultAction::Deny,
        vec![Authorization {
            unauthenticated: true,
            ..Default::default()
        }],
    ))
    .unwrap();
    for r in requests {
        let mut last = (Verdict::Deny, Verdict::Deny);
        for (k, p) in policies.iter().enumerate() {
            let now = (
                a.authorize_connection(p, &r.caller),
                a.authorize_request(p, &r.caller, r.info()),
            );
            if input.permissive {
                assert_eq!(
                    now,
                    (Verdict::Allow, Verdict::Allow),
                    "permissive default denied"
                );
            }
            if k == 0 && !input.permissive {
                assert_eq!(
                    now,
                    (Verdict::Deny, Verdict::Deny),
                    "no rule, deny default, allowed"
                );
            }
            if last.0 == Verdict::Allow {
                assert_eq!(
                    now.0,
                    Verdict::Allow,
                    "rule {} turned a connection Allow into Deny",
                    k - 1
                );
            }
            if last.1 == Verdict::Allow {
                assert_eq!(
                    now.1,
                    Verdict::Allow,
                    "rule {} turned a request Allow into Deny",
                    k - 1
                );
            }
            if k > 0 && !input.rules[k - 1].routes.is_empty() {
                // A rule with routes adds nothing for opaque connections.
                assert_eq!(
                    now.0, last.0,
                    "a route rule changed an opaque connection's verdict"
                );
            }
            last = now;
        }
        assert_eq!(a.authorize_connection(&open, &r.caller), Verdict::Allow);
        assert_eq!(
            a.authorize_request(&open, &r.caller, r.info()),
            Verdict::Allow
        );
    }
}

fuzz_target!(|input: Input| {
    let requests: Vec<Request> = input
        .requests
        .iter()
        .take(8)
        .filter_map(Request::build)
        .collect();
    let empty = compile(&HttpMatch::default(), "empty").expect("an empty match compiles");
    for r in &requests {
        assert!(
            empty.matches(&r.method, &r.path, &r.headers),
            "an empty match must match all"
        );
    }
    for spec in input.matches.iter().take(4) {
        check_match(spec, &requests);
    }
    check_routing(&input, &requests);
    check_authorization(&input, &requests);
});
