//! JWT end-user authentication configured through the controller, end to end on loopback: a
//! TrafficPolicy with `jwt` (a JWKS file holding a P-256 key made at test time) and a claim-gated
//! route section in the watched policy directory, the file platform, the real gRPC server, and a
//! real trellis-proxy in controller mode in front of an echo app, called over real sockets.
//!
//! The proxy's callers are plaintext, admitted by the `--plaintext-from 127.0.0.1` switch: an
//! authorization allowing every request on the port, which is exactly the kind of other rule a
//! claim gate must not be bypassed by.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_controller::discovery::Platform;
use trellis_controller::run::{Options, start};
use trellis_controller_core::index::IndexOptions;
use trellis_controller_core::index::inbound::{AccessSwitches, parse_cidr};
use trellis_echo::echo::{EchoServer, Identity};

const ISSUER: &str = "https://issuer.test";

/// A P-256 signing key and the JWKS document of its public half.
fn key() -> (EncodingKey, String) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let encoding = EncodingKey::from_ec_der(&pair.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&encoding, jsonwebtoken::Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let jwks = serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap();
    (encoding, jwks)
}

fn token(key: &EncodingKey, role: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims: Value =
        json!({"iss": ISSUER, "aud": "web", "sub": "alice", "role": role, "exp": now + 600});
    let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn policy(jwks: &Path) -> String {
    format!(
        "apiVersion: policy.trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {{ name: web, namespace: demo }}
spec:
  targetRef: {{ name: web }}
  jwt:
    required: true
    providers:
    - issuer: {ISSUER}
      audiences: [web]
      jwks: {{ file: '{}' }}
      algorithms: [ES256]
  routes:
  - httpRouteGroup: web-routes
    matches: [admin]
    claims:
    - {{ claim: role, values: [admin] }}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{ name: web-routes, namespace: demo }}
spec:
  matches:
  - {{ name: admin, pathRegex: '/admin(/.*)?' }}
  - {{ name: everything, pathRegex: '.*' }}
",
        jwks.display()
    )
}

/// One HTTP/1.0 GET through `proxy`: the status code and the `x-trellis-error` value.
async fn get(proxy: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.0\r\nhost: web.demo\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let head = response.split("\r\n\r\n").next().unwrap_or_default();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let reason = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-trellis-error")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    (status, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traffic_policy_turns_on_jwt_and_gates_a_route_on_a_claim_through_a_real_proxy() {
    let app = EchoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Identity {
            service: "web".into(),
            version: "v1".into(),
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (signing, jwks) = key();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks).unwrap();
    // The Service web is served by the echo app's address: the workload demo/web on its port.
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "namespace: demo\nservices:\n  - name: web\n    ports: [{{ name: http, port: 8080, protocol: http }}]\n    endpoints:\n      - {{ address: 127.0.0.1, port: {} }}\n",
            app.addr().port()
        ),
    )
    .unwrap();
    let policy_dir = dir.path().join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("policy.yaml"), policy(&jwks_path)).unwrap();
    let ctl = start(Options {
        policy_paths: vec![policy_dir],
        platforms: vec![Platform::File(mesh)],
        adapters: Default::default(),
        webhooks: None,
        traffic_metrics: None,
        grpc: "127.0.0.1:0".parse().unwrap(),
        admin: None,
        index: IndexOptions {
            access: AccessSwitches {
                plaintext_from: vec![parse_cidr("127.0.0.1").unwrap()],
                ..AccessSwitches::default()
            },
            ..IndexOptions::default()
        },
    })
    .await
    .unwrap();

    let base = trellis_proxy::config::Config {
        inbound: Some(trellis_proxy::config::Inbound {
            listen: "127.0.0.1:0".parse().unwrap(),
            app: app.addr(),
            protocol: trellis_proxy::config::Protocol::Http,
            policy: Default::default(),
        }),
        ..Default::default()
    };
    let options = trellis_proxy::controller::ControllerOptions::new(
        format!("http://{}", ctl.grpc),
        "demo/web",
    );
    let client = trellis_proxy::controller::Controller::new(options, base).unwrap();
    let mut proxy_options = trellis_proxy::ProxyOptions::new(client.initial_config());
    proxy_options.resolver = Some(client.clone());
    let proxy = trellis_proxy::start(proxy_options).await.unwrap();
    client.attach(&proxy.shared, Some(app.addr().port()));
    let inbound = proxy.inbound.unwrap();

    let user = token(&signing, "user");
    let admin = token(&signing, "admin");
    // Until the controller's policy arrives the inbound side refuses everything.
    let began = Instant::now();
    loop {
        if get(inbound, "/", Some(&user)).await.0 == 200 {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "the inbound policy never allowed a valid token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(
        get(inbound, "/", None).await,
        (401, "jwt-missing".into()),
        "required: no token, no entry"
    );
    assert_eq!(
        get(inbound, "/", Some("not.a.token")).await,
        (401, "jwt-malformed".into())
    );
    assert_eq!(
        get(inbound, "/public", Some(&user)).await,
        (200, String::new())
    );
    // The gated route: the plaintext rule allows every request, yet the claim holds.
    assert_eq!(
        get(inbound, "/admin/users", Some(&user)).await,
        (403, "claims".into()),
        "a valid token without the claim"
    );
    assert_eq!(
        get(inbound, "/admin", Some(&user)).await,
        (403, "claims".into())
    );
    assert_eq!(
        get(inbound, "/admin/users", Some(&admin)).await,
        (200, String::new())
    );
    // `/config` (the same assembly as the admin port's) shows the requirement beside the rules.
    let config = serde_json::to_value(proxy.shared.routes.table.load().config()).unwrap();
    let policy = &config["inbound"]["policy"];
    assert_eq!(
        policy["claim_requirements"],
        json!([{
            "name": "demo/web/web-routes",
            "matches": [{"path_regex": "/admin(/.*)?"}],
            "claims": [{"claim": "role", "values": ["admin"]}],
        }]),
        "{policy:#}"
    );
    assert_eq!(policy["jwt"]["providers"][0]["issuer"], ISSUER);

    proxy.drain(Duration::from_secs(1)).await;
}
