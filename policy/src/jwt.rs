//! JWT end-user authentication as an operator writes it (issue 14): the providers a workload
//! trusts ([`JwtPolicy`], one [`JwtProvider`] per issuer), and the claim conditions
//! ([`ClaimMatch`]) that authorization rules and TrafficPolicy route sections embed, with
//! [`validate`](JwtPolicy::validate), which finds every value the types cannot refuse and names
//! its field (`providers[0].clockSkew`).
//!
//! These are pure configuration types: they live here, beside the resilience settings, so that
//! the TrafficPolicy kind (`trellis-smi`) can carry them without linking the verifier
//! (`trellis-jwt`, which pulls an HTTP client for JWKS URLs). `trellis-jwt` re-exports every
//! one of them and does the verifying.
//!
//! In a TrafficPolicy (`trellis-smi`), `jwt` applies to every request to the Service, `claims`
//! are conditions every request must meet, and a route section's `claims` those of the requests
//! its matches cover (every section a request matches adds its own, whatever the sections'
//! order). The Service's instances' proxies enforce them: a refused token gets `401
//! jwt-<reason>`, unmet claims `403 claims`, and claim conditions are ANDed with the
//! TrafficTargets' rules, so no other rule can waive them:
//!
//! ```yaml
//! spec:
//!   targetRef: { name: web }
//!   jwt:
//!     required: true                 # no token: 401 jwt-missing (default false)
//!     providers:
//!     - issuer: https://auth.example.com/realms/shop
//!       audiences: [web]
//!       jwks: { file: /etc/trellis/jwt/shop.json }   # absolute, on the proxies' hosts; or url
//!       algorithms: [RS256, ES256]   # default [RS256]; none and HS* are refused
//!       clockSkew: 60s               # default 60s, at most 5m
//!   claims:                          # every request
//!   - { claim: aud, values: [web] }
//!   routes:
//!   - httpRouteGroup: web-routes
//!     matches: [admin]
//!     claims:                        # requests matching `admin`, in addition
//!     - { claim: realm_access.roles, values: [admin] }
//! ```
//!
//! Parsing already refuses unknown fields, wrong types, unknown algorithm names and malformed
//! durations (with the path, through the caller's serde error reporting).

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use http::HeaderName;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Duration, Problem};

/// Default `clockSkew`: a minute, as most JWT libraries and gateways allow.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_millis(60_000);
/// The largest `clockSkew` accepted: more would keep expired tokens alive for long.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_millis(300_000);
/// Default `jwks.refreshInterval` for a URL: five minutes (rotations publish the new key ahead
/// of use, and an unknown `kid` refreshes early anyway).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_millis(300_000);
/// The shortest `jwks.refreshInterval`: a JWKS is not polled more often than this.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(1_000);

/// The JWT authentication of a workload (or a gateway route): which providers' tokens are
/// accepted, and whether a request must carry one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtPolicy {
    /// The trusted token issuers. A token is checked against the provider named by its `iss`.
    #[serde(default)]
    pub providers: Vec<JwtProvider>,
    /// `true`: a request without a token is refused (`missing`). `false` (the default): it
    /// passes without claims, and authorization rules decide (a rule on a claim never matches
    /// a request without one). A token that is present is always checked, either way.
    #[serde(default)]
    pub required: bool,
}

/// One trusted issuer of tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtProvider {
    /// The exact `iss` its tokens carry, e.g. `https://auth.example.com/realms/shop`.
    pub issuer: String,
    /// The `aud` values accepted: a token must name at least one of them. At least one is
    /// required, since without it a token the issuer made for any other service would do.
    pub audiences: Vec<String>,
    /// Where the verification keys come from.
    pub jwks: JwksSource,
    /// The signature algorithms accepted (default `[RS256]`). Only public-key algorithms:
    /// see [`Algorithm`] for why `none` and `HS*` are refused.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// How far `exp` and `nbf` may be off the proxy's clock (default `60s`, at most `5m`).
    #[serde(default = "default_clock_skew")]
    pub clock_skew: Duration,
    /// Where the token is read (default `Authorization: Bearer <token>`).
    #[serde(default)]
    pub from_header: FromHeader,
    /// Claims copied into request headers for the application, e.g. `sub` -> `x-jwt-sub`.
    /// These headers are removed from every request first, so a caller cannot set them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_claims_as: Vec<ClaimHeader>,
}

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256]
}

fn default_clock_skew() -> Duration {
    DEFAULT_CLOCK_SKEW
}

/// Where a provider's keys come from: exactly one of `file` and `url`.
///
/// A file is reloaded when it changes (a mounted Secret or ConfigMap). A URL is fetched at
/// start, every `refreshInterval`, early (at most once per 30 s) when a token names an unknown
/// `kid` (key rotation), and with exponential backoff after a failure. In every case a key set
/// that does not parse is reported and not applied: the last good one keeps verifying.
///
/// Use `https://` for a URL outside the cluster: a key set fetched over plain HTTP can be
/// replaced on the way, and with it every token accepted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwksSource {
    /// A JWKS document (RFC 7517 `{"keys": [...]}`) on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// An `http://` or `https://` URL serving the JWKS (an issuer's `jwks_uri`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How often a URL is fetched again (default `5m`, at least `1s`). Only for `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_interval: Option<Duration>,
}

impl JwksSource {
    /// The refresh interval in force (the default when not written).
    pub fn refresh_interval(&self) -> Duration {
        self.refresh_interval.unwrap_or(DEFAULT_REFRESH_INTERVAL)
    }

    /// The source for messages: the file's path or the URL.
    pub fn describe(&self) -> String {
        match (&self.file, &self.url) {
            (Some(file), _) => file.display().to_string(),
            (None, Some(url)) => url.clone(),
            (None, None) => "(no source)".to_string(),
        }
    }
}

/// The request header a token is read from, and the scheme before it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromHeader {
    /// Header name (default `authorization`; any case).
    pub name: String,
    /// What comes before the token (default `"Bearer "`; compared ignoring ASCII case, as HTTP
    /// schemes are). Empty: the whole value is the token. A value without the prefix (`Basic
    /// ...`) is not a token for this provider.
    #[serde(default)]
    pub prefix: String,
}

impl Default for FromHeader {
    fn default() -> Self {
        Self {
            name: "authorization".to_string(),
            prefix: "Bearer ".to_string(),
        }
    }
}

/// A claim copied into a request header when the token is accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimHeader {
    /// The claim, a dotted path for nested ones (`realm_access.roles`).
    pub claim: String,
    /// The header it is written to. Strings are copied as they are, anything else as its JSON
    /// text (an array of roles becomes `["a","b"]`).
    pub header: String,
}

/// A JWS signature algorithm (RFC 7518 names).
///
/// Every name parses, so that a configuration naming `none` or `HS256` is refused by
/// [`JwtProvider::validate`] with the reason rather than by the parser:
/// - `none` means "no signature": anyone could write any claims;
/// - `HS*` are HMACs, keyed with a shared secret. The keys here come from a JWKS, which holds
///   public keys that anyone may read; allowing HS* is what lets an attacker sign a token with
///   a published RSA public key used as the HMAC secret (the classic algorithm confusion).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    None,
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Algorithm {
    /// Every algorithm, in the order of the RFC.
    pub const ALL: [Algorithm; 13] = [
        Algorithm::None,
        Algorithm::HS256,
        Algorithm::HS384,
        Algorithm::HS512,
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];

    /// The JOSE name, as in a token's `alg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::None => "none",
            Algorithm::HS256 => "HS256",
            Algorithm::HS384 => "HS384",
            Algorithm::HS512 => "HS512",
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    /// Whether keys from a JWKS may verify it: public-key algorithms only.
    pub fn is_public_key(self) -> bool {
        !matches!(
            self,
            Algorithm::None | Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        )
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `alg` that is no JWS algorithm name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a JWS algorithm (one of none, HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
)]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    /// Exact names (case matters in a token's `alg`), except that `none` is also recognised in
    /// any case: tokens written `"alg": "None"` are a known attempt to slip past filters.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(Algorithm::None);
        }
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAlgorithm(s.to_string()))
    }
}

impl Serialize for Algorithm {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Algorithm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Collects problems under a field prefix (same shape as trellis-policy's checks).
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn fail(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

impl JwtPolicy {
    /// Every problem of the policy, each with the path of its field (`providers[1].audiences`);
    /// empty when the policy can be used.
    pub fn validate(&self) -> Vec<Problem> {
        let mut c = Checker {
            problems: Vec::new(),
        };
        if self.providers.is_empty() {
            c.fail(
                "providers",
                "no provider: name at least one trusted issuer (or leave JWT authentication out)",
            );
        }
        let mut issuers = HashSet::new();
        for (i, provider) in self.providers.iter().enumerate() {
            let prefix = format!("providers[{i}]");
            provider.check(&prefix, &mut c);
            if !issuers.insert(provider.issuer.as_str()) {
                c.fail(
                    format!("{prefix}.issuer"),
                    format!(
                        "{:?} is also the issuer of an earlier provider: a token's iss chooses its provider, so each issuer is named once",
                        provider.issuer
                    ),
                );
            }
        }
        c.problems
    }
}

impl JwtProvider {
    /// Every problem of this provider alone, with paths below it (`clockSkew`).
    pub fn validate(&self) -> Vec<Problem> {
        let mut c = Checker {
            problems: Vec::new(),
        };
        self.check("", &mut c);
        c.problems
    }

    fn check(&self, prefix: &str, c: &mut Checker) {
        let at = |field: &str| {
            if prefix.is_empty() {
                field.to_string()
            } else {
                format!("{prefix}.{field}")
            }
        };
        if self.issuer.trim().is_empty() {
            c.fail(at("issuer"), "empty: write the exact iss of the tokens");
        }
        if self.audiences.is_empty() {
            c.fail(
                at("audiences"),
                "empty: name at least one aud, or a token the issuer made for any other service would be accepted",
            );
        }
        for (i, aud) in self.audiences.iter().enumerate() {
            if aud.trim().is_empty() {
                c.fail(at(&format!("audiences[{i}]")), "empty audience");
            }
        }
        self.jwks.check(&at("jwks"), c);
        if self.algorithms.is_empty() {
            c.fail(
                at("algorithms"),
                "empty: leave it out for RS256, or name the algorithms the issuer signs with",
            );
        }
        for (i, alg) in self.algorithms.iter().enumerate() {
            let field = at(&format!("algorithms[{i}]"));
            match alg {
                Algorithm::None => c.fail(
                    field,
                    "none means unsigned: anyone could write any claims",
                ),
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => c.fail(
                    field,
                    format!(
                        "{alg} is an HMAC with a shared secret, and the keys come from a JWKS of public keys: allowing it lets anyone sign with a published public key"
                    ),
                ),
                _ => {}
            }
        }
        if self.clock_skew > MAX_CLOCK_SKEW {
            c.fail(
                at("clockSkew"),
                format!(
                    "{} is more than {MAX_CLOCK_SKEW}: expired tokens would be accepted for that long",
                    self.clock_skew
                ),
            );
        }
        if HeaderName::from_bytes(self.from_header.name.as_bytes()).is_err() {
            c.fail(
                at("fromHeader.name"),
                format!("{:?} is not an HTTP header name", self.from_header.name),
            );
        }
        let mut headers = HashSet::new();
        for (i, fwd) in self.forward_claims_as.iter().enumerate() {
            if fwd.claim.trim().is_empty() {
                c.fail(
                    at(&format!("forwardClaimsAs[{i}].claim")),
                    "empty claim name",
                );
            }
            let field = at(&format!("forwardClaimsAs[{i}].header"));
            match HeaderName::from_bytes(fwd.header.as_bytes()) {
                Err(_) => c.fail(
                    field,
                    format!("{:?} is not an HTTP header name", fwd.header),
                ),
                Ok(name) => {
                    if name.as_str() == self.from_header.name.to_ascii_lowercase() {
                        c.fail(field, "is the header the token is read from");
                    } else if RESERVED_HEADERS.contains(&name.as_str()) {
                        c.fail(
                            field,
                            format!("{name} is a protocol header: choose an application header such as x-jwt-sub"),
                        );
                    } else if !headers.insert(name) {
                        c.fail(field, "already written by another claim");
                    }
                }
            }
        }
    }
}

/// Headers a claim must not overwrite: they frame or route the request.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "trailer",
];

impl JwksSource {
    fn check(&self, prefix: &str, c: &mut Checker) {
        match (&self.file, &self.url) {
            (None, None) => c.fail(prefix, "set one of file or url"),
            (Some(_), Some(_)) => c.fail(prefix, "set only one of file and url"),
            (Some(file), None) => {
                if file.as_os_str().is_empty() {
                    c.fail(format!("{prefix}.file"), "empty path");
                }
                if self.refresh_interval.is_some() {
                    c.fail(
                        format!("{prefix}.refreshInterval"),
                        "only for url: a file is reloaded when it changes",
                    );
                }
            }
            (None, Some(url)) => {
                match url.parse::<http::Uri>() {
                    Ok(uri)
                        if matches!(uri.scheme_str(), Some("http") | Some("https"))
                            && uri.host().is_some_and(|h| !h.is_empty()) => {}
                    _ => c.fail(
                        format!("{prefix}.url"),
                        format!("{url:?} is not an http:// or https:// URL with a host"),
                    ),
                }
                if let Some(every) = self.refresh_interval
                    && every < MIN_REFRESH_INTERVAL
                {
                    c.fail(
                        format!("{prefix}.refreshInterval"),
                        format!("{every} is shorter than {MIN_REFRESH_INTERVAL}"),
                    );
                }
            }
        }
    }
}

/// In schemas (the TrafficPolicy CRD): one of the JOSE names. `none` and `HS*` are in the list
/// so that a policy naming them reaches [`JwtProvider::validate`] and its reason, as in a file.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for Algorithm {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "JwtAlgorithm".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.as_str()).collect();
        schemars::json_schema!({
            "type": "string",
            "enum": names,
            "description": "A JWS signature algorithm (RS256, ES256, ...); none and HS* are refused.",
        })
    }
}

/// A condition on one claim of a request's verified token: it holds when the claim is one of
/// `values`, or (for an array claim) contains one of them.
///
/// Comparison is exact text: a string claim as it is; a number or boolean by its JSON text
/// (`42`, `true`), so `values: ["42"]` matches `"level": 42`; an array element likewise. An
/// object, `null` or a missing claim never matches.
///
/// ```yaml
/// claim: realm_access.roles
/// values: [admin, operator]
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// The claims themselves are the verifier's (`trellis_jwt::Claims`), read through
// `ClaimLookup` (kept out of the doc comment, which becomes the CRD's description).
pub struct ClaimMatch {
    /// The claim's name, or a dotted path for a nested one (`realm_access.roles`).
    pub claim: String,
    /// Accepted values: any one is enough.
    pub values: Vec<String>,
}

/// The claims of a verified token as [`ClaimMatch`] reads them. Implemented by
/// `trellis_jwt::Claims`; kept as a trait so that this crate needs no JSON library.
pub trait ClaimLookup {
    /// Whether the claim at `path` is a scalar whose text `accept` accepts, or an array with
    /// such an element (see [`ClaimMatch`] for what a scalar's text is).
    fn claim_has(&self, path: &str, accept: &dyn Fn(&str) -> bool) -> bool;
}

impl ClaimMatch {
    /// Whether `claims` satisfy the condition.
    pub fn matches<C: ClaimLookup + ?Sized>(&self, claims: &C) -> bool {
        claims.claim_has(&self.claim, &|text| self.values.iter().any(|v| v == text))
    }

    /// Problems of the condition (paths below it: `claim`, `values`).
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.claim.trim().is_empty() {
            problems.push(Problem {
                field: "claim".into(),
                message: "empty claim name".into(),
            });
        }
        if self.values.is_empty() {
            problems.push(Problem {
                field: "values".into(),
                message: "no value: the condition could never hold".into(),
            });
        }
        problems
    }
}

/// Every problem of a list of claim conditions, with paths under `prefix`
/// (`spec.routes[0].claims[1].values`).
pub fn validate_claims(claims: &[ClaimMatch], prefix: &str) -> Vec<Problem> {
    claims
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            m.validate().into_iter().map(move |p| Problem {
                field: format!("{prefix}[{i}].{}", p.field),
                message: p.message,
            })
        })
        .collect()
}

/// [`JwtPolicy::validate`] with every path under `prefix` (`spec.jwt.providers[0].audiences`).
pub fn validate_jwt(policy: &JwtPolicy, prefix: &str) -> Vec<Problem> {
    policy
        .validate()
        .into_iter()
        .map(|p| Problem {
            field: format!("{prefix}.{}", p.field),
            message: p.message,
        })
        .collect()
}
