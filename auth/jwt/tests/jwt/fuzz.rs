//! A short fuzz of `verify` in the normal test run (about two seconds): arbitrary strings and
//! headers, and valid tokens mutated (bytes changed, segments swapped or borrowed from another
//! token, headers replaced by random JSON). `verify` must never panic, and never accept a token
//! that differs from one the issuer signed.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;
use trellis_jwt::Verifier;

use crate::support::*;

struct Target {
    _dir: tempfile::TempDir,
    verifier: Verifier,
    /// Valid tokens: RS256 and ES256, with and without kid.
    tokens: Vec<String>,
}

fn target() -> Target {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let rsa = rsa_key(0, "rsa-1");
    let ec = ec_key("ec-1");
    std::fs::write(&path, jwks(&[&rsa, &ec])).unwrap();
    let verifier = Verifier::new(&policy(vec![provider(file_source(&path))], false)).unwrap();
    let mut tokens = vec![sign(&rsa, &claims()), sign(&ec, &claims())];
    let mut no_kid = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    no_kid.kid = None;
    tokens.push(jsonwebtoken::encode(&no_kid, &claims(), &ec.encoding).unwrap());
    for token in &tokens {
        assert!(
            verifier.verify_token_str(token).is_ok(),
            "the seeds are valid"
        );
    }
    Target {
        _dir: dir,
        verifier,
        tokens,
    }
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // Failures are shrunk and reported; nothing is written next to the sources.
        failure_persistence: None,
        ..Config::default()
    })
}

/// Accepted only if it is one of the tokens the issuer signed.
fn assert_refused_unless_original(t: &Target, token: &str) -> Result<(), TestCaseError> {
    let accepted = t.verifier.verify_token_str(token).is_ok();
    prop_assert!(
        !accepted || t.tokens.iter().any(|o| o == token),
        "accepted a token nobody signed: {token}"
    );
    if let Ok(value) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value);
        let accepted = matches!(t.verifier.verify(&headers), Ok(Some(_)));
        prop_assert!(!accepted || t.tokens.iter().any(|o| o == token));
    }
    Ok(())
}

#[tokio::test]
async fn arbitrary_strings_and_header_bytes_never_panic_or_pass() {
    let t = target();
    runner(1500)
        .run(
            &(
                any::<String>(),
                proptest::collection::vec(any::<u8>(), 0..200),
            ),
            |(text, bytes)| {
                assert_refused_unless_original(&t, &text)?;
                if let Ok(value) = http::HeaderValue::from_bytes(&bytes) {
                    let mut headers = http::HeaderMap::new();
                    headers.insert(http::header::AUTHORIZATION, value);
                    let _ = t.verifier.verify(&headers);
                }
                Ok(())
            },
        )
        .unwrap();
}

#[tokio::test]
async fn mutated_tokens_are_never_accepted() {
    let t = target();
    let n = t.tokens.len();
    let flips = proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4);
    runner(300)
        .run(&(0..n, flips), |(which, flips)| {
            let mut bytes = t.tokens[which].clone().into_bytes();
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            let token = String::from_utf8_lossy(&bytes).into_owned();
            assert_refused_unless_original(&t, &token)
        })
        .unwrap();
}

#[tokio::test]
async fn swapped_and_borrowed_segments_are_never_accepted() {
    let t = target();
    let n = t.tokens.len();
    runner(200)
        .run(
            &(0..n, 0..n, 0..n, 0..3usize, 0..3usize, 0..3usize),
            |(a, b, c, i, j, k)| {
                let parts = |x: usize| {
                    t.tokens[x]
                        .split('.')
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                };
                let token = format!("{}.{}.{}", parts(a)[i], parts(b)[j], parts(c)[k]);
                assert_refused_unless_original(&t, &token)
            },
        )
        .unwrap();
}

#[tokio::test]
async fn random_json_headers_on_a_valid_payload_and_signature_are_never_accepted() {
    let t = target();
    let n = t.tokens.len();
    let alg = prop::sample::select(vec![
        "RS256", "ES256", "HS256", "none", "None", "PS256", "EdDSA", "", "RS256 ",
    ]);
    let kid = prop::option::of(prop::sample::select(vec!["rsa-1", "ec-1", "x", ""]));
    let extra = prop::option::of(("[a-z]{1,5}", any::<i64>()));
    runner(300)
        .run(
            &(0..n, alg, kid, extra, any::<bool>()),
            |(which, alg, kid, extra, typ)| {
                let mut header = json!({ "alg": alg });
                if let Some(kid) = kid {
                    header["kid"] = json!(kid);
                }
                if let Some((name, value)) = extra {
                    header[name] = json!(value);
                }
                if typ {
                    header["typ"] = json!("JWT");
                }
                let parts: Vec<&str> = t.tokens[which].split('.').collect();
                let token = format!(
                    "{}.{}.{}",
                    b64(header.to_string().as_bytes()),
                    parts[1],
                    parts[2]
                );
                assert_refused_unless_original(&t, &token)
            },
        )
        .unwrap();
}
