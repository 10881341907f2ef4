//! Each way a token is accepted or refused, with the exact rejection, against keys served from
//! a JWKS file.

use serde_json::json;
use trellis_jwt::{ClaimHeader, Rejection, Verifier};

use crate::support::*;

struct Setup {
    _dir: tempfile::TempDir,
    verifier: Verifier,
    rsa: TestKey,
    ec: TestKey,
}

/// A verifier trusting one RSA and one EC key from a JWKS file.
async fn setup(required: bool, skew_secs: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let rsa = rsa_key(0, "rsa-1");
    let ec = ec_key("ec-1");
    std::fs::write(&path, jwks(&[&rsa, &ec])).unwrap();
    let mut p = provider(file_source(&path));
    p.clock_skew = trellis_jwt::Duration::from_millis(skew_secs * 1000);
    p.forward_claims_as = vec![ClaimHeader {
        claim: "sub".into(),
        header: "x-jwt-sub".into(),
    }];
    let verifier = Verifier::new(&policy(vec![p], required)).unwrap();
    Setup {
        _dir: dir,
        verifier,
        rsa,
        ec,
    }
}

fn check(s: &Setup, token: &str) -> Result<Option<trellis_jwt::Claims>, Rejection> {
    s.verifier.verify(&bearer(token))
}

#[tokio::test]
async fn valid_rs256_and_es256_tokens_are_accepted_with_their_claims() {
    let s = setup(true, 60).await;
    for key in [&s.rsa, &s.ec] {
        let token = sign(
            key,
            &with(claims(), json!({"realm_access": {"roles": ["admin"]}})),
        );
        let got = check(&s, &token)
            .unwrap_or_else(|r| panic!("{:?} refused: {r}", key.alg))
            .expect("claims");
        assert_eq!(got.issuer(), ISSUER);
        assert_eq!(got.subject(), Some("alice"));
        assert_eq!(
            got.principal().as_deref(),
            Some("https://issuer.test/alice")
        );
        assert_eq!(got.get("realm_access.roles"), Some(&json!(["admin"])));
    }
}

#[tokio::test]
async fn the_scheme_is_matched_ignoring_case_and_other_schemes_are_no_token() {
    let s = setup(false, 60).await;
    let token = sign(&s.rsa, &claims());
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", format!("bearer {token}").parse().unwrap());
    assert!(s.verifier.verify(&headers).unwrap().is_some());
    headers.insert("authorization", "Basic YWxpY2U6c2VjcmV0".parse().unwrap());
    assert_eq!(s.verifier.verify(&headers), Ok(None));
}

#[tokio::test]
async fn expired_tokens_are_refused_unless_within_the_clock_skew() {
    let expired_90s_ago = with(claims(), json!({"exp": now() - 90, "iat": now() - 700}));
    let s = setup(true, 60).await;
    assert_eq!(
        check(&s, &sign(&s.rsa, &expired_90s_ago)),
        Err(Rejection::Expired)
    );
    let lenient = setup(true, 120).await;
    assert!(check(&lenient, &sign(&lenient.rsa, &expired_90s_ago)).is_ok());
}

#[tokio::test]
async fn tokens_not_yet_valid_are_refused_unless_within_the_clock_skew() {
    let from_90s_on = with(claims(), json!({"nbf": now() + 90}));
    let s = setup(true, 60).await;
    assert_eq!(
        check(&s, &sign(&s.ec, &from_90s_on)),
        Err(Rejection::NotYetValid)
    );
    let lenient = setup(true, 120).await;
    assert!(check(&lenient, &sign(&lenient.ec, &from_90s_on)).is_ok());
}

#[tokio::test]
async fn audience_and_issuer_must_match() {
    let s = setup(true, 60).await;
    let refused = [
        (json!({"aud": "billing"}), Rejection::WrongAudience),
        (
            json!({"aud": ["billing", "shipping"]}),
            Rejection::WrongAudience,
        ),
        (json!({"aud": null}), Rejection::WrongAudience),
        (json!({"iss": "https://evil.test"}), Rejection::WrongIssuer),
        (json!({"iss": null}), Rejection::WrongIssuer),
        (json!({"iss": 7}), Rejection::WrongIssuer),
        (json!({"exp": null}), Rejection::Malformed),
        (json!({"exp": "tomorrow"}), Rejection::Malformed),
    ];
    for (change, want) in refused {
        let token = sign(&s.rsa, &with(claims(), change.clone()));
        assert_eq!(check(&s, &token), Err(want), "{change}");
    }
    // Any one of the provider's audiences is enough, also in an array.
    let token = sign(
        &s.rsa,
        &with(claims(), json!({"aud": ["billing", "other"]})),
    );
    assert!(check(&s, &token).is_ok());
}

#[tokio::test]
async fn a_token_signed_by_a_key_not_in_the_jwks_is_refused() {
    let s = setup(true, 60).await;
    // Another RSA key, presenting the kid of the trusted one.
    let impostor = rsa_key(1, "rsa-1");
    assert_eq!(
        check(&s, &sign(&impostor, &claims())),
        Err(Rejection::BadSignature)
    );
    // Another EC key, with the trusted EC kid.
    let impostor = ec_key("ec-1");
    assert_eq!(
        check(&s, &sign(&impostor, &claims())),
        Err(Rejection::BadSignature)
    );
    // Without a kid, every key of the algorithm is tried, and none verifies.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = None;
    let impostor = rsa_key(1, "x");
    let token = jsonwebtoken::encode(&header, &claims(), &impostor.encoding).unwrap();
    assert_eq!(check(&s, &token), Err(Rejection::BadSignature));
    // ...while the trusted key without a kid verifies.
    let token = jsonwebtoken::encode(&header, &claims(), &s.rsa.encoding).unwrap();
    assert!(check(&s, &token).is_ok());
}

#[tokio::test]
async fn an_unknown_kid_is_refused_as_unknown_key() {
    let s = setup(true, 60).await;
    let stranger = rsa_key(1, "rsa-2");
    assert_eq!(
        check(&s, &sign(&stranger, &claims())),
        Err(Rejection::UnknownKey)
    );
    // A kid that is not a string.
    let header = b64(br#"{"alg":"RS256","kid":5}"#);
    let token = format!("{header}.{}.c2ln", b64(claims().to_string().as_bytes()));
    assert_eq!(check(&s, &token), Err(Rejection::Malformed));
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let s = setup(true, 60).await;
    // The algorithm confusion attack: HMAC with the published public key as the secret, under
    // the RSA key's kid.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(s.rsa.kid.clone());
    for secret in [s.rsa.public_der.clone(), jwks(&[&s.rsa]).into_bytes()] {
        let key = jsonwebtoken::EncodingKey::from_secret(&secret).unwrap();
        let token = jsonwebtoken::encode(&header, &claims(), &key).unwrap();
        assert_eq!(check(&s, &token), Err(Rejection::AlgorithmNotAllowed));
    }
}

#[tokio::test]
async fn alg_none_is_refused() {
    let s = setup(true, 60).await;
    let payload = b64(claims().to_string().as_bytes());
    for alg in ["none", "None", "NONE"] {
        let header = b64(format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"rsa-1"}}"#).as_bytes());
        for signature in ["", "c2ln"] {
            let token = format!("{header}.{payload}.{signature}");
            assert_eq!(
                check(&s, &token),
                Err(Rejection::AlgorithmNotAllowed),
                "{alg} {signature:?}"
            );
        }
    }
}

#[tokio::test]
async fn an_algorithm_the_provider_or_the_key_does_not_allow_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let rsa = rsa_key(0, "rsa-1");
    let ec = ec_key("ec-1");
    std::fs::write(&path, jwks(&[&rsa, &ec])).unwrap();
    // RS256 only (the default): ES256 tokens are refused though the key is there.
    let mut p = provider(file_source(&path));
    p.algorithms = vec![trellis_jwt::Algorithm::RS256];
    let v = Verifier::new(&policy(vec![p], true)).unwrap();
    assert_eq!(
        v.verify(&bearer(&sign(&ec, &claims()))),
        Err(Rejection::AlgorithmNotAllowed)
    );
    // PS256 is not allowed either, though the RSA key could verify it.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256);
    header.kid = Some("rsa-1".into());
    let token = jsonwebtoken::encode(&header, &claims(), &rsa.encoding).unwrap();
    assert_eq!(
        v.verify(&bearer(&token)),
        Err(Rejection::AlgorithmNotAllowed)
    );
    // An RS256 token naming the EC key's kid: the key is not for RS256.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("ec-1".into());
    let token = jsonwebtoken::encode(&header, &claims(), &rsa.encoding).unwrap();
    assert_eq!(
        v.verify(&bearer(&token)),
        Err(Rejection::AlgorithmNotAllowed)
    );
}

#[tokio::test]
async fn no_token_is_missing_when_required_and_passes_without_claims_otherwise() {
    let required = setup(true, 60).await;
    let optional = setup(false, 60).await;
    let empty = http::HeaderMap::new();
    assert_eq!(required.verifier.verify(&empty), Err(Rejection::Missing));
    assert_eq!(optional.verifier.verify(&empty), Ok(None));
    // A token that is there is checked either way.
    assert_eq!(
        optional.verifier.verify(&bearer("garbage")),
        Err(Rejection::Malformed)
    );
}

#[tokio::test]
async fn garbage_tokens_are_malformed() {
    let s = setup(true, 60).await;
    let good = sign(&s.rsa, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    for token in [
        "".to_string(),
        "garbage".to_string(),
        "a.b".to_string(),
        "a.b.c.d".to_string(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], parts[2]),
        format!("!!.{}.{}", parts[1], parts[2]),
        format!("{}.{}.{}", b64(b"[1,2]"), parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], b64(b"not json"), parts[2]),
        format!("{}.{}.{}", parts[0], b64(b"\"a string\""), parts[2]),
        format!("{}.{}.%%%", parts[0], parts[1]),
    ] {
        assert_eq!(check(&s, &token), Err(Rejection::Malformed), "{token:?}");
    }
    // Two tokens in two Authorization headers: ambiguous.
    let mut headers = bearer(&good);
    headers.append("authorization", format!("Bearer {good}").parse().unwrap());
    assert_eq!(s.verifier.verify(&headers), Err(Rejection::Malformed));
}

#[tokio::test]
async fn each_provider_checks_its_own_issuer_with_its_own_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (a_path, b_path) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let a_key = rsa_key(0, "a");
    let b_key = ec_key("b");
    std::fs::write(&a_path, jwks(&[&a_key])).unwrap();
    std::fs::write(&b_path, jwks(&[&b_key])).unwrap();
    let a = provider(file_source(&a_path));
    let mut b = provider(file_source(&b_path));
    b.issuer = "https://b.test".into();
    b.from_header = trellis_jwt::FromHeader {
        name: "x-b-token".into(),
        prefix: String::new(),
    };
    let v = Verifier::new(&policy(vec![a, b], true)).unwrap();
    let b_claims = with(claims(), json!({"iss": "https://b.test"}));
    let mut headers = http::HeaderMap::new();
    headers.insert("x-b-token", sign(&b_key, &b_claims).parse().unwrap());
    assert_eq!(
        v.verify(&headers).unwrap().unwrap().issuer(),
        "https://b.test"
    );
    // B's token in A's header: A's location does not read B's issuer.
    assert_eq!(
        v.verify(&bearer(&sign(&b_key, &b_claims))),
        Err(Rejection::WrongIssuer)
    );
    assert!(v.verify_token_str(&sign(&b_key, &b_claims)).is_ok());
    // A token of issuer B signed with A's key (under B's kid): B's keys decide.
    let mut forged = a_key.clone();
    forged.kid = "b".into();
    assert_eq!(
        v.verify_token_str(&sign(&forged, &b_claims)),
        Err(Rejection::AlgorithmNotAllowed),
        "B's key b is an EC key: an RS256 token under its kid is refused"
    );
}

#[tokio::test]
async fn claims_are_forwarded_and_spoofed_claim_headers_removed() {
    let s = setup(false, 60).await;
    let mut headers = bearer(&sign(&s.rsa, &claims()));
    headers.insert("x-jwt-sub", "mallory".parse().unwrap());
    let claims = s.verifier.verify(&headers).unwrap();
    s.verifier.forward_claims(claims.as_ref(), &mut headers);
    assert_eq!(headers["x-jwt-sub"], "alice");
    // No token: the caller's header is removed, nothing is written.
    let mut headers = http::HeaderMap::new();
    headers.insert("x-jwt-sub", "mallory".parse().unwrap());
    let claims = s.verifier.verify(&headers).unwrap();
    s.verifier.forward_claims(claims.as_ref(), &mut headers);
    assert!(headers.get("x-jwt-sub").is_none());
}

#[test]
fn rejection_names_are_stable() {
    let names: Vec<&str> = Rejection::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        names,
        [
            "missing",
            "malformed",
            "expired",
            "not-yet-valid",
            "wrong-issuer",
            "wrong-audience",
            "bad-signature",
            "unknown-key",
            "algorithm-not-allowed",
            "no-keys",
        ]
    );
    assert!(Rejection::ALL.iter().all(|r| r.status() == 401));
    assert_eq!(Rejection::Missing.www_authenticate(), "Bearer");
}
