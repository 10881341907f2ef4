//! JWT end-user authentication ([`trellis_jwt`]) to and from its typed messages in the
//! contract: [`v1::JwtPolicy`] (an inbound policy's `jwt`) and [`v1::ClaimMatch`] (an
//! authorization rule's `claims`). Both directions live here, beside the resilience policy's
//! ([`crate::policy`]), so the controller and the proxy cannot drift apart; the tests
//! round-trip every field.
//!
//! Receiving is strict in what the Rust types cannot hold (a negative duration, an algorithm
//! name that is no JWS algorithm): an error naming the field, as `providers[0].clockSkew`.
//! What they can hold but a proxy must not use (`none`, no audience, both `file` and `url`) is
//! left to [`trellis_jwt::JwtPolicy::validate`], which the receiver runs like on a file.

use std::path::PathBuf;

use trellis_jwt as j;

use crate::policy::{PolicyError, duration, error, from_duration};
use crate::v1;

// --- to the contract -------------------------------------------------------------------------

/// An inbound policy's JWT authentication as sent in `InboundPolicy.jwt`.
pub fn policy_to_proto(policy: &j::JwtPolicy) -> v1::JwtPolicy {
    v1::JwtPolicy {
        providers: policy.providers.iter().map(provider_to_proto).collect(),
        required: policy.required,
    }
}

fn provider_to_proto(p: &j::JwtProvider) -> v1::JwtProvider {
    use v1::jwks_source::Source;
    v1::JwtProvider {
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        jwks: Some(v1::JwksSource {
            // Both set is refused by validation before a policy is sent; file wins here.
            source: match (&p.jwks.file, &p.jwks.url) {
                (Some(file), _) => Some(Source::File(file.display().to_string())),
                (None, Some(url)) => Some(Source::Url(url.clone())),
                (None, None) => None,
            },
            refresh_interval: p.jwks.refresh_interval.map(duration),
        }),
        algorithms: p.algorithms.iter().map(|a| a.as_str().to_owned()).collect(),
        clock_skew: Some(duration(p.clock_skew)),
        from_header: Some(v1::JwtFromHeader {
            name: p.from_header.name.clone(),
            prefix: p.from_header.prefix.clone(),
        }),
        forward_claims_as: p
            .forward_claims_as
            .iter()
            .map(|f| v1::JwtClaimHeader {
                claim: f.claim.clone(),
                header: f.header.clone(),
            })
            .collect(),
    }
}

/// An authorization rule's claim condition as sent in `Authorization.claims`.
pub fn claim_match_to_proto(m: &j::ClaimMatch) -> v1::ClaimMatch {
    v1::ClaimMatch {
        claim: m.claim.clone(),
        values: m.values.clone(),
    }
}

/// A claim requirement as sent in `InboundPolicy.claim_requirements`: `name` for logs, the
/// requests it covers (`matches`, empty = every request) and the conditions they must meet.
pub fn claim_requirement_to_proto(
    name: String,
    matches: Vec<v1::HttpMatch>,
    claims: &[j::ClaimMatch],
) -> v1::ClaimRequirement {
    v1::ClaimRequirement {
        name,
        matches,
        claims: claims.iter().map(claim_match_to_proto).collect(),
    }
}

// --- from the contract -----------------------------------------------------------------------

/// `InboundPolicy.jwt` as the policy a proxy checks tokens with. Absent settings take the
/// crate's defaults (algorithms `[RS256]`, clock skew 60 s, `Authorization: Bearer`), as they
/// do in a file.
pub fn policy_from_proto(policy: v1::JwtPolicy) -> Result<j::JwtPolicy, PolicyError> {
    Ok(j::JwtPolicy {
        providers: policy
            .providers
            .into_iter()
            .enumerate()
            .map(|(i, p)| provider_from_proto(p, &format!("providers[{i}]")))
            .collect::<Result<_, _>>()?,
        required: policy.required,
    })
}

fn provider_from_proto(p: v1::JwtProvider, at: &str) -> Result<j::JwtProvider, PolicyError> {
    use v1::jwks_source::Source;
    let jwks = p.jwks.unwrap_or_default();
    let (file, url) = match jwks.source {
        Some(Source::File(file)) => (Some(PathBuf::from(file)), None),
        Some(Source::Url(url)) => (None, Some(url)),
        None => (None, None),
    };
    let algorithms = if p.algorithms.is_empty() {
        // The crate's default (an empty list cannot be told from an absent one on the wire).
        vec![j::Algorithm::RS256]
    } else {
        p.algorithms
            .iter()
            .enumerate()
            .map(|(k, name)| {
                name.parse::<j::Algorithm>()
                    .map_err(|e| error(&format!("{at}.algorithms[{k}]"), e.to_string()))
            })
            .collect::<Result<_, _>>()?
    };
    Ok(j::JwtProvider {
        issuer: p.issuer,
        audiences: p.audiences,
        jwks: j::JwksSource {
            file,
            url,
            refresh_interval: jwks
                .refresh_interval
                .map(|d| from_duration(d, &format!("{at}.jwks.refreshInterval")))
                .transpose()?,
        },
        algorithms,
        clock_skew: match p.clock_skew {
            Some(d) => from_duration(d, &format!("{at}.clockSkew"))?,
            None => j::config::DEFAULT_CLOCK_SKEW,
        },
        from_header: p
            .from_header
            .map(|h| j::FromHeader {
                name: h.name,
                prefix: h.prefix,
            })
            .unwrap_or_default(),
        forward_claims_as: p
            .forward_claims_as
            .into_iter()
            .map(|f| j::ClaimHeader {
                claim: f.claim,
                header: f.header,
            })
            .collect(),
    })
}

/// An `Authorization.claims` entry.
pub fn claim_match_from_proto(m: v1::ClaimMatch) -> j::ClaimMatch {
    j::ClaimMatch {
        claim: m.claim,
        values: m.values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two providers with every field set, most to values other than their defaults.
    fn full() -> j::JwtPolicy {
        serde_json::from_value(serde_json::json!({
            "required": true,
            "providers": [
                {
                    "issuer": "https://auth.example.com/realms/shop",
                    "audiences": ["orders", "payments"],
                    "jwks": {"url": "https://auth.example.com/certs", "refreshInterval": "90s"},
                    "algorithms": ["RS256", "ES256", "EdDSA"],
                    "clockSkew": "1500ms",
                    "fromHeader": {"name": "x-token", "prefix": ""},
                    "forwardClaimsAs": [
                        {"claim": "sub", "header": "x-jwt-sub"},
                        {"claim": "realm_access.roles", "header": "x-jwt-roles"}
                    ]
                },
                {
                    "issuer": "https://ci.example.com",
                    "audiences": ["orders"],
                    "jwks": {"file": "/etc/trellis/jwt/ci.json"}
                }
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_jwt_policy_round_trips_every_field() {
        let policy = full();
        assert!(policy.validate().is_empty(), "{:?}", policy.validate());
        assert_eq!(policy_from_proto(policy_to_proto(&policy)).unwrap(), policy);
        let m = j::ClaimMatch {
            claim: "realm_access.roles".into(),
            values: vec!["admin".into(), "operator".into()],
        };
        assert_eq!(claim_match_from_proto(claim_match_to_proto(&m)), m);
    }

    #[test]
    fn absent_settings_take_the_defaults_a_file_gets() {
        let sent = v1::JwtPolicy {
            providers: vec![v1::JwtProvider {
                issuer: "https://i".into(),
                audiences: vec!["a".into()],
                jwks: Some(v1::JwksSource {
                    source: Some(v1::jwks_source::Source::File("/k.json".into())),
                    refresh_interval: None,
                }),
                ..Default::default()
            }],
            required: false,
        };
        let from_yaml: j::JwtPolicy = serde_json::from_value(serde_json::json!({
            "providers": [{"issuer": "https://i", "audiences": ["a"], "jwks": {"file": "/k.json"}}]
        }))
        .unwrap();
        assert_eq!(policy_from_proto(sent).unwrap(), from_yaml);
    }

    #[test]
    fn what_the_rust_types_cannot_hold_is_refused_with_its_field() {
        let mut sent = policy_to_proto(&full());
        sent.providers[1].algorithms = vec!["ES256".into(), "XS999".into()];
        let err = policy_from_proto(sent).unwrap_err();
        assert_eq!(err.field, "providers[1].algorithms[1]");
        assert!(err.message.contains("XS999"), "{err}");

        let mut sent = policy_to_proto(&full());
        sent.providers[0].clock_skew = Some(prost_types::Duration {
            seconds: -5,
            nanos: 0,
        });
        assert_eq!(
            policy_from_proto(sent).unwrap_err().field,
            "providers[0].clockSkew"
        );

        // `none` is held (and then refused by validation, with its reason), not guessed away.
        let mut sent = policy_to_proto(&full());
        sent.providers[1].algorithms = vec!["none".into()];
        let received = policy_from_proto(sent).unwrap();
        assert_eq!(received.providers[1].algorithms, [j::Algorithm::None]);
        assert_eq!(received.validate()[0].field, "providers[1].algorithms[0]");
    }
}
