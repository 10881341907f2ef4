//! JWT end-user authentication on the inbound side, through a real proxy on loopback: tokens
//! signed at test time with fresh P-256 keys, a JWKS served by a real HTTP server on 127.0.0.1
//! (or a file), an application that reports the claim header it received.
//!
//! Valid, expired, wrong-audience, wrong-key and absent tokens; a route allowed only for a
//! claim; spoofed claim headers replaced; a JWKS file rotated after an unrelated reload (the
//! verifier, and its key state, survive it); an invalid `jwt` section refused with its line
//! while the last good configuration keeps verifying.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use trellis_proxy::RunningProxy;
use trellis_proxy::config::Config;

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "orders";

/// A P-256 signing key and its public JWK.
struct Key {
    kid: String,
    encoding: EncodingKey,
    jwk: Jwk,
}

fn key(kid: &str) -> Key {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let encoding = EncodingKey::from_ec_der(&pair.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&encoding, jsonwebtoken::Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    Key {
        kid: kid.to_string(),
        encoding,
        jwk,
    }
}

fn jwks(keys: &[&Key]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    })
    .unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Valid claims for `sub` with `role`, expiring in ten minutes.
fn claims(sub: &str, role: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "role": role, "exp": now() + 600})
}

fn sign(key: &Key, claims: &Value) -> String {
    let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

/// A real HTTP server answering every request with the current JWKS.
async fn jwks_server(body: String) -> (SocketAddr, Arc<Mutex<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(Mutex::new(body));
    let served = Arc::clone(&body);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let served = Arc::clone(&served);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let text = served.lock().unwrap().clone();
                    async move {
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, body)
}

/// An application answering `app`, with `x-seen-sub` set to the `x-jwt-sub` it received
/// (`-` when none).
async fn claims_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                    let seen = req
                        .headers()
                        .get_all("x-jwt-sub")
                        .iter()
                        .map(|v| v.to_str().unwrap().to_string())
                        .collect::<Vec<_>>()
                        .join(",");
                    let seen = if seen.is_empty() { "-".into() } else { seen };
                    async move {
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("x-app", "app")
                                .header("x-seen-sub", seen)
                                .body(full("app"))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The proxy's file: an inbound listener in front of `app` whose policy verifies tokens of
/// ISSUER (keys from `jwks`, a YAML flow mapping) and allows GET /admin only to `role: admin`
/// and /public... to anyone; `extra_rule` is appended to the rules.
fn yaml(app: SocketAddr, jwks: &str, required: bool, extra_rule: &str) -> String {
    format!(
        r#"admin: 127.0.0.1:0
inbound:
  listen: 127.0.0.1:0
  app: "{app}"
  protocol: detect
  policy:
    jwt:
      required: {required}
      providers:
        - issuer: {ISSUER}
          audiences: [{AUDIENCE}]
          jwks: {jwks}
          algorithms: [ES256]
          clockSkew: 5s
          forwardClaimsAs:
            - {{claim: sub, header: x-jwt-sub}}
    authorizations:
      - unauthenticated: true
        routes: [{{path_regex: /admin, methods: [GET]}}]
        claims: [{{claim: role, values: [admin]}}]
      - unauthenticated: true
        routes: [{{path_regex: "/public.*"}}]
{extra_rule}"#
    )
}

fn url(addr: SocketAddr) -> String {
    format!("{{url: \"http://{addr}/jwks.json\", refreshInterval: 1s}}")
}

/// The verifier of the proxy's inbound listener, made when its table became current.
fn verifier(proxy: &RunningProxy) -> Arc<trellis_jwt::Verifier> {
    let table = proxy.shared.routes.table.load();
    let jwt = table
        .inbound
        .as_ref()
        .unwrap()
        .jwt
        .as_ref()
        .expect("a jwt policy");
    Arc::clone(jwt.verifier(&proxy.shared.routes.verifiers).unwrap())
}

struct Answer {
    status: StatusCode,
    /// `x-app` or `x-trellis-error`.
    tag: String,
    seen_sub: Option<String>,
    www_authenticate: Option<String>,
}

async fn get(client: &mut H1, path: &str, token: Option<&str>, spoof: Option<&str>) -> Answer {
    let mut req = Request::get(path).header("host", "local");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if let Some(sub) = spoof {
        req = req.header("x-jwt-sub", sub);
    }
    let resp = client.send(req.body(full("")).unwrap()).await;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (seen_sub, www_authenticate) = (header("x-seen-sub"), header("www-authenticate"));
    let (status, tag, _) = read(resp).await;
    Answer {
        status,
        tag,
        seen_sub,
        www_authenticate,
    }
}

#[tokio::test]
async fn tokens_are_verified_and_their_claims_forwarded_and_authorized() {
    let signer = key("k1");
    let stranger = key("k1"); // same kid, another key: its signature does not verify
    let unknown = key("k9");
    let (jwks_addr, _) = jwks_server(jwks(&[&signer])).await;
    let app = claims_app().await;
    let proxy = proxy(&yaml(app, &url(jwks_addr), false, "")).await;
    assert!(verifier(&proxy).wait_for_keys(Duration::from_secs(5)).await);
    let mut client = H1::connect(proxy.inbound.unwrap()).await;

    // Valid: the application sees the verified claim, not the one the caller wrote.
    let alice = sign(&signer, &claims("alice", "user"));
    let ok = get(&mut client, "/public", Some(&alice), Some("mallory")).await;
    assert_eq!((ok.status, ok.tag.as_str()), (StatusCode::OK, "app"));
    assert_eq!(ok.seen_sub.as_deref(), Some("alice"));

    // Refused tokens: 401, the reason, and a Bearer challenge.
    let mut expired = claims("alice", "user");
    expired["exp"] = json!(now() - 60);
    let mut wrong_audience = claims("alice", "user");
    wrong_audience["aud"] = json!("payments");
    for (token, reason) in [
        (sign(&signer, &expired), "jwt-expired"),
        (sign(&signer, &wrong_audience), "jwt-wrong-audience"),
        (
            sign(&stranger, &claims("alice", "user")),
            "jwt-bad-signature",
        ),
        (sign(&unknown, &claims("alice", "user")), "jwt-unknown-key"),
        ("not.a-token".to_string(), "jwt-malformed"),
    ] {
        let refused = get(&mut client, "/public", Some(&token), None).await;
        assert_eq!(
            (refused.status, refused.tag.as_str()),
            (StatusCode::UNAUTHORIZED, reason)
        );
        assert_eq!(
            refused.www_authenticate.as_deref(),
            Some("Bearer error=\"invalid_token\""),
            "{reason}"
        );
    }

    // No token, none required: it passes without claims, and spoofed claim headers go.
    let anonymous = get(&mut client, "/public", None, Some("mallory")).await;
    assert_eq!(
        (anonymous.status, anonymous.seen_sub.as_deref()),
        (StatusCode::OK, Some("-"))
    );

    // A rule that needs a claim: admin yes, user no, no token no (it is the only rule for
    // /admin, so the default deny answers).
    let admin = sign(&signer, &claims("root", "admin"));
    let allowed = get(&mut client, "/admin", Some(&admin), None).await;
    assert_eq!(
        (allowed.status, allowed.seen_sub.as_deref()),
        (StatusCode::OK, Some("root"))
    );
    for token in [Some(alice.as_str()), None] {
        let denied = get(&mut client, "/admin", token, None).await;
        assert_eq!(
            (denied.status, denied.tag.as_str()),
            (StatusCode::FORBIDDEN, "forbidden")
        );
    }

    // Counted like the proxy's other answers.
    let metrics = H1::connect(proxy.admin.unwrap())
        .await
        .get("admin", "/metrics")
        .await
        .2;
    for reason in ["jwt-expired", "jwt-bad-signature", "forbidden"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("trellis_request_total{")
                    && l.contains("direction=\"inbound\"")
                    && l.contains(&format!("error=\"{reason}\""))
                    && l.contains("response_code=\"40")),
            "{reason} not counted:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn a_required_token_is_missing_without_one_for_http_and_grpc() {
    let signer = key("k1");
    let (jwks_addr, _) = jwks_server(jwks(&[&signer])).await;
    let app = claims_app().await;
    let proxy = proxy(&yaml(app, &url(jwks_addr), true, "")).await;
    assert!(verifier(&proxy).wait_for_keys(Duration::from_secs(5)).await);
    let mut client = H1::connect(proxy.inbound.unwrap()).await;
    let missing = get(&mut client, "/public", None, None).await;
    assert_eq!(
        (
            missing.status,
            missing.tag.as_str(),
            missing.www_authenticate.as_deref()
        ),
        (StatusCode::UNAUTHORIZED, "jwt-missing", Some("Bearer"))
    );
    let token = sign(&signer, &claims("alice", "user"));
    assert_eq!(
        get(&mut client, "/public", Some(&token), None).await.status,
        StatusCode::OK
    );

    // gRPC callers get UNAUTHENTICATED, trailers-only, with the same reason.
    let grpc = grpc_app("echo").await;
    let rules = "      - unauthenticated: true\n";
    let config = yaml(grpc, &url(jwks_addr), true, rules);
    let grpc_proxy = common::proxy(&config).await;
    let mut echo =
        echo::echo_client::EchoClient::connect(format!("http://{}", grpc_proxy.inbound.unwrap()))
            .await
            .unwrap();
    let status = echo
        .unary(echo::EchoMessage { text: "hi".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.metadata().get("x-trellis-error").unwrap(),
        "jwt-missing"
    );
    assert!(
        verifier(&grpc_proxy)
            .wait_for_keys(Duration::from_secs(5))
            .await
    );
    let mut call = tonic::Request::new(echo::EchoMessage { text: "hi".into() });
    call.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    assert_eq!(echo.unary(call).await.unwrap().into_inner().text, "echo:hi");
}

#[tokio::test]
async fn a_rotated_jwks_file_is_used_by_the_verifier_that_survived_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    let (old, new) = (key("old"), key("new"));
    std::fs::write(&file, jwks(&[&old])).unwrap();
    let app = claims_app().await;
    let source = format!("{{file: \"{}\"}}", file.display());
    let config = yaml(app, &source, true, "");
    let proxy = proxy(&config).await;
    let mut client = H1::connect(proxy.inbound.unwrap()).await;
    let (old_token, new_token) = (
        sign(&old, &claims("alice", "user")),
        sign(&new, &claims("bob", "user")),
    );
    assert_eq!(
        get(&mut client, "/public", Some(&old_token), None)
            .await
            .status,
        StatusCode::OK
    );
    let first = verifier(&proxy);

    // An unrelated change of the file (one more rule) recompiles the inbound side: the
    // verifier of the unchanged jwt policy is kept.
    let reloaded = yaml(
        app,
        &source,
        true,
        "      - unauthenticated: true\n        routes: [{path_regex: /health}]\n",
    );
    proxy
        .shared
        .routes
        .apply(Config::parse(&reloaded, Path::new("t.yaml")).unwrap())
        .unwrap();
    assert!(Arc::ptr_eq(&first, &verifier(&proxy)), "verifier replaced");
    assert_eq!(proxy.shared.routes.verifiers.live(), 1);

    // The key is rotated in the file: the kept verifier picks it up.
    let tmp = dir.path().join("jwks.tmp");
    std::fs::write(&tmp, jwks(&[&new])).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let answer = get(&mut client, "/public", Some(&new_token), None).await;
        if answer.status != StatusCode::UNAUTHORIZED || tokio::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (answer.status, answer.seen_sub.as_deref()),
        (StatusCode::OK, Some("bob"))
    );
    assert!(Arc::ptr_eq(&first, &verifier(&proxy)));
    let answer = get(&mut client, "/public", Some(&old_token), None).await;
    assert_eq!(
        (answer.status, answer.tag.as_str()),
        (StatusCode::UNAUTHORIZED, "jwt-unknown-key")
    );

    // An invalid jwt section is refused with its line; the running one keeps verifying.
    let bad = config.replace("clockSkew: 5s", "clockSkew: 10m");
    let err = Config::parse(&bad, Path::new("t.yaml"))
        .unwrap_err()
        .to_string();
    let line = bad.lines().position(|l| l.contains("clockSkew")).unwrap() + 1;
    assert!(
        err.starts_with(&format!(
            "t.yaml:{line}: inbound.policy.jwt.providers[0].clockSkew:"
        )),
        "{err}"
    );
    let unchecked: Config = serde_yaml_ng::from_str(&bad).unwrap();
    assert!(proxy.shared.routes.apply(unchecked).is_err());
    assert_eq!(
        get(&mut client, "/public", Some(&new_token), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&mut client, "/public", None, None).await.tag,
        "jwt-missing"
    );

    // Without jwt in the policy, no table uses the verifier any more: it goes, and its file
    // watch with it.
    drop(first);
    let without = format!(
        "admin: 127.0.0.1:0\ninbound:\n  listen: 127.0.0.1:0\n  app: \"{app}\"\n  policy:\n    authorizations:\n      - unauthenticated: true\n"
    );
    proxy
        .shared
        .routes
        .apply(Config::parse(&without, Path::new("t.yaml")).unwrap())
        .unwrap();
    // A connection holds the inbound side it was accepted under until it closes.
    drop(client);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while proxy.shared.routes.verifiers.live() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the verifier outlived its tables"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = H1::connect(proxy.inbound.unwrap()).await;
    let answer = get(&mut client, "/public", Some(&new_token), Some("mallory")).await;
    assert_eq!(
        (answer.status, answer.seen_sub.as_deref()),
        (StatusCode::OK, Some("mallory")),
        "without a jwt policy the proxy neither checks tokens nor touches claim headers"
    );
}

#[test]
fn claim_rules_need_a_jwt_policy_and_claim_problems_are_located() {
    let app: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let config = yaml(app, "{file: /k.json}", false, "");
    // Rules naming claims without a jwt section could never match.
    let start = config.find("    jwt:").unwrap();
    let end = config.find("    authorizations:").unwrap();
    let without_jwt = format!("{}{}", &config[..start], &config[end..]);
    let err = Config::parse(&without_jwt, Path::new("p.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inbound.policy.authorizations[0].claims[0]")
            && err.contains("needs the policy's jwt"),
        "{err}"
    );
    let line = without_jwt
        .lines()
        .position(|l| l.contains("claim: role"))
        .unwrap()
        + 1;
    assert!(err.starts_with(&format!("p.yaml:{line}:")), "{err}");
    // A condition without values could never hold.
    let no_values = config.replace("values: [admin]", "values: []");
    let err = Config::parse(&no_values, Path::new("p.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inbound.policy.authorizations[0].claims[0].values"),
        "{err}"
    );
    // `none` is refused, with the provider's line.
    let none = config.replace("algorithms: [ES256]", "algorithms: [none]");
    let err = Config::parse(&none, Path::new("p.yaml"))
        .unwrap_err()
        .to_string();
    let line = none.lines().position(|l| l.contains("[none]")).unwrap() + 1;
    assert!(
        err.starts_with(&format!(
            "p.yaml:{line}: inbound.policy.jwt.providers[0].algorithms[0]:"
        )),
        "{err}"
    );
    // The same in a transparent port's policy.
    let transparent = "transparent:
  inbound: 127.0.0.1:0
  inbound_ports:
    - port: 8080
      policy:
        jwt:
          providers:
            - {issuer: https://i, audiences: [], jwks: {file: /k.json}}
";
    let err = Config::parse(transparent, Path::new("p.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("transparent.inbound_ports[0].policy.jwt.providers[0].audiences:"),
        "{err}"
    );
}
