//! Test keys and tokens made at test time, a real JWKS HTTP server on 127.0.0.1, and a
//! policy builder.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use trellis_jwt::{Algorithm, JwksSource, JwtPolicy, JwtProvider};

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "orders";

/// A signing key and its public JWK.
#[derive(Clone)]
pub struct TestKey {
    pub alg: jsonwebtoken::Algorithm,
    pub kid: String,
    pub encoding: EncodingKey,
    pub jwk: Jwk,
    /// The public key's DER (PKCS#1 for RSA): the "secret" of the HS256 confusion attack.
    pub public_der: Vec<u8>,
}

/// RSA keygen is slow in debug builds: a few keys per test binary, made once.
fn rsa_private(slot: usize) -> rsa::PrivateKey {
    static KEYS: OnceLock<Mutex<Vec<Option<rsa::PrivateKey>>>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| Mutex::new(vec![None; 4]));
    let mut keys = keys.lock().unwrap();
    keys[slot]
        .get_or_insert_with(|| {
            rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).expect("RSA key generation")
        })
        .clone()
}

/// RSA key number `slot` (0..4; the same slot is the same key within a test binary).
pub fn rsa_key(slot: usize, kid: &str) -> TestKey {
    use rsa::pkcs1::{EncodeRsaPrivateKey as _, EncodeRsaPublicKey as _};
    let private = rsa_private(slot);
    let der = private.to_pkcs1_der().unwrap();
    let encoding = EncodingKey::from_rsa_der(der.as_bytes());
    let public_der = private.to_public_key().to_pkcs1_der().unwrap().into_vec();
    finish(jsonwebtoken::Algorithm::RS256, kid, encoding, public_der)
}

/// A fresh P-256 key.
pub fn ec_key(kid: &str) -> TestKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let encoding = EncodingKey::from_ec_der(&pair.serialize_der());
    finish(
        jsonwebtoken::Algorithm::ES256,
        kid,
        encoding,
        pair.public_key_raw().to_vec(),
    )
}

fn finish(
    alg: jsonwebtoken::Algorithm,
    kid: &str,
    encoding: EncodingKey,
    public_der: Vec<u8>,
) -> TestKey {
    let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    TestKey {
        alg,
        kid: kid.to_string(),
        encoding,
        jwk,
        public_der,
    }
}

/// A JWKS document of these keys.
pub fn jwks(keys: &[&TestKey]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    })
    .unwrap()
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Valid claims: this issuer and audience, issued now, expiring in 10 minutes.
pub fn claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now(),
        "exp": now() + 600,
    })
}

/// `base` with `changes` merged in (a `null` removes the claim).
pub fn with(mut base: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

/// A token signed by `key` with its kid.
pub fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

/// base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `Authorization: Bearer <token>`.
pub fn bearer(token: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    headers
}

pub fn provider(jwks: JwksSource) -> JwtProvider {
    JwtProvider {
        issuer: ISSUER.to_string(),
        audiences: vec![AUDIENCE.to_string(), "other".to_string()],
        jwks,
        algorithms: vec![Algorithm::RS256, Algorithm::ES256],
        clock_skew: trellis_jwt::Duration::from_millis(60_000),
        from_header: Default::default(),
        forward_claims_as: Vec::new(),
    }
}

pub fn policy(providers: Vec<JwtProvider>, required: bool) -> JwtPolicy {
    JwtPolicy {
        providers,
        required,
    }
}

pub fn file_source(path: &std::path::Path) -> JwksSource {
    JwksSource {
        file: Some(path.to_path_buf()),
        ..Default::default()
    }
}

pub fn url_source(addr: SocketAddr, interval: Duration) -> JwksSource {
    JwksSource {
        url: Some(format!("http://{addr}/jwks.json")),
        refresh_interval: Some(trellis_jwt::Duration(interval)),
        ..Default::default()
    }
}

/// Writes a file in one step (rename over), as a Secret volume update does.
pub fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A real HTTP/1 server on 127.0.0.1 that answers every request with the current body and
/// status, and counts requests. `stop` closes it; `start_on` serves again on the same address.
pub struct JwksServer {
    pub addr: SocketAddr,
    body: Arc<Mutex<(u16, String)>>,
    hits: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl JwksServer {
    pub async fn start(body: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, body)
    }

    /// An address nothing listens on yet (bound and closed), for a server that comes up later.
    pub async fn unused_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }

    pub async fn start_on(addr: SocketAddr, body: String) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        Self::serve(listener, body)
    }

    fn serve(listener: TcpListener, body: String) -> Self {
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new((200, body)));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (Arc::clone(&body), Arc::clone(&hits));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (b, h) = (Arc::clone(&b), Arc::clone(&h));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let (status, text) = b.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(text)))
                                    .unwrap(),
                            )
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Self {
            addr,
            body,
            hits,
            task: Some(task),
        }
    }

    pub fn set(&self, status: u16, body: String) {
        *self.body.lock().unwrap() = (status, body);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
