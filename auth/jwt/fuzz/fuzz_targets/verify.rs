//! Fuzz `Verifier::verify` against a real key set (a P-256 key made at start, in a JWKS file):
//! never panics, and never accepts a token that differs from the ones signed at start.
//!
//! The first byte chooses the mode:
//! - 0: the rest is a token (as text, lossy UTF-8), checked with `verify_token_str`;
//! - 1: the rest is a raw `Authorization` header value;
//! - 2: the rest is (index, byte) pairs applied to a valid token; the first pair's byte picks
//!   which of the valid tokens.
#![no_main]

use std::sync::OnceLock;

use jsonwebtoken::{EncodingKey, Header, jwk::Jwk, jwk::JwkSet};
use libfuzzer_sys::fuzz_target;
use trellis_jwt::{Algorithm, JwksSource, JwtPolicy, JwtProvider, Verifier};

struct Target {
    _runtime: tokio::runtime::Runtime,
    _dir: std::path::PathBuf,
    verifier: Verifier,
    tokens: Vec<String>,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk = Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("k".into());
        let dir = std::env::temp_dir().join(format!("trellis-jwt-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        std::fs::write(
            &path,
            serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
        )
        .unwrap();
        let policy = JwtPolicy {
            providers: vec![JwtProvider {
                issuer: "https://issuer.test".into(),
                audiences: vec!["orders".into()],
                jwks: JwksSource {
                    file: Some(path),
                    ..Default::default()
                },
                algorithms: vec![Algorithm::ES256, Algorithm::RS256],
                clock_skew: trellis_jwt::Duration::from_millis(60_000),
                from_header: Default::default(),
                forward_claims_as: Vec::new(),
            }],
            required: true,
        };
        let verifier = {
            let _guard = runtime.enter();
            Verifier::new(&policy).unwrap()
        };
        let exp = 4_000_000_000u64; // far ahead: the seeds stay valid
        let claims = serde_json::json!({
            "iss": "https://issuer.test", "aud": "orders", "sub": "alice", "exp": exp,
            "realm_access": {"roles": ["admin"]},
        });
        let mut tokens = Vec::new();
        for kid in [Some("k"), None] {
            let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
            header.kid = kid.map(str::to_string);
            tokens.push(jsonwebtoken::encode(&header, &claims, &key).unwrap());
        }
        for token in &tokens {
            assert!(
                verifier.verify_token_str(token).is_ok(),
                "seed tokens verify"
            );
        }
        Target {
            _runtime: runtime,
            _dir: dir,
            verifier,
            tokens,
        }
    })
}

fn check_not_forged(t: &Target, token: &str, accepted: bool) {
    assert!(
        !accepted || t.tokens.iter().any(|o| o == token),
        "accepted a token nobody signed: {token}"
    );
}

fuzz_target!(|data: &[u8]| {
    let t = target();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let token = String::from_utf8_lossy(rest);
            let accepted = t.verifier.verify_token_str(&token).is_ok();
            check_not_forged(t, &token, accepted);
        }
        1 => {
            if let Ok(value) = http::HeaderValue::from_bytes(rest) {
                let mut headers = http::HeaderMap::new();
                headers.insert(http::header::AUTHORIZATION, value.clone());
                if let Ok(Some(_)) = t.verifier.verify(&headers) {
                    // Accepted: the value is `Bearer <one of the signed tokens>`.
                    let text = value.to_str().expect("an accepted value is text");
                    let token = text.get(7..).unwrap_or_default().trim();
                    check_not_forged(t, token, true);
                }
            }
        }
        _ => {
            let which = rest.get(1).map_or(0, |b| usize::from(*b)) % t.tokens.len();
            let mut bytes = t.tokens[which].clone().into_bytes();
            for pair in rest.chunks_exact(2) {
                let at = usize::from(pair[0]) * 7 % bytes.len();
                bytes[at] = pair[1];
            }
            let token = String::from_utf8_lossy(&bytes);
            let accepted = t.verifier.verify_token_str(&token).is_ok();
            check_not_forged(t, &token, accepted);
        }
    }
});
