//! Checking the token of a request: [`Verifier::verify`] finds it, chooses its provider by the
//! (unverified) `iss`, picks the key by `kid`, and has jsonwebtoken check the signature, then
//! `exp`, `nbf`, `iss` and `aud`. Every refusal is a [`Rejection`] with a stable name for the
//! `x-trellis-error` header and the logs.
//!
//! The order of the checks, and why: the unverified header and payload are only read to choose
//! a provider, an algorithm and a key, each of which must already be allowed by configuration;
//! nothing read from them is trusted until the signature is checked. jsonwebtoken checks the
//! signature before the claims, so an expired token with a bad signature is `bad-signature`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use jsonwebtoken::errors::ErrorKind;
use serde_json::{Map, Value};
use trellis_file_watch::FileWatch;

use crate::claims::{Claims, header_text};
use crate::config::{Algorithm, JwtPolicy, JwtProvider, Problem};
use crate::jwks::KeyStore;
use crate::refresh::{self, RefreshOptions};

/// Why a request's token was refused. Every variant answers 401 ([`Rejection::status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// No token, and the policy requires one.
    Missing,
    /// Not a JWT: not three base64url parts, not JSON, a required claim missing or of the
    /// wrong type (`exp` is required), or more than one token in the request.
    Malformed,
    /// `exp` is past, by more than the clock skew.
    Expired,
    /// `nbf` is ahead, by more than the clock skew.
    NotYetValid,
    /// No provider has the token's `iss` (or it has none).
    WrongIssuer,
    /// The token's `aud` names none of the provider's audiences (or it has none).
    WrongAudience,
    /// The signature does not verify with the key.
    BadSignature,
    /// The token's `kid` is not in the provider's key set (or no key fits a token without one).
    UnknownKey,
    /// The token's `alg` is not one the provider allows, or not one its key is for.
    AlgorithmNotAllowed,
    /// The provider's key set was never loaded: every token of it is refused (fail closed).
    NoKeys,
}

impl Rejection {
    /// Every rejection.
    pub const ALL: [Rejection; 10] = [
        Rejection::Missing,
        Rejection::Malformed,
        Rejection::Expired,
        Rejection::NotYetValid,
        Rejection::WrongIssuer,
        Rejection::WrongAudience,
        Rejection::BadSignature,
        Rejection::UnknownKey,
        Rejection::AlgorithmNotAllowed,
        Rejection::NoKeys,
    ];

    /// The stable name, for a header value (`x-trellis-error`) and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Missing => "missing",
            Rejection::Malformed => "malformed",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not-yet-valid",
            Rejection::WrongIssuer => "wrong-issuer",
            Rejection::WrongAudience => "wrong-audience",
            Rejection::BadSignature => "bad-signature",
            Rejection::UnknownKey => "unknown-key",
            Rejection::AlgorithmNotAllowed => "algorithm-not-allowed",
            Rejection::NoKeys => "no-keys",
        }
    }

    /// The answer's status: 401, also for `no-keys` (the request is not authenticated; the
    /// reason header tells operators it is the key source).
    pub fn status(self) -> StatusCode {
        StatusCode::UNAUTHORIZED
    }

    /// The `WWW-Authenticate` value of the answer (RFC 6750 section 3): no error code when
    /// the token is missing, `invalid_token` otherwise.
    pub fn www_authenticate(self) -> HeaderValue {
        match self {
            Rejection::Missing => HeaderValue::from_static("Bearer"),
            _ => HeaderValue::from_static("Bearer error=\"invalid_token\""),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Rejection {}

/// The state of one provider's keys, for status pages and readiness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyStatus {
    /// The provider's issuer.
    pub issuer: String,
    /// The file or URL.
    pub source: String,
    /// The kids of the keys in force (empty: none loaded, or keys without kids).
    pub kids: Vec<String>,
    /// How many keys are in force; 0: never loaded, its tokens are refused with `no-keys`.
    pub keys: usize,
    /// The last load's error, if the last load failed.
    pub last_error: Option<String>,
}

/// One provider, ready to verify.
struct Provider {
    issuer: String,
    algorithms: Vec<Algorithm>,
    /// jsonwebtoken's checks for each allowed algorithm, built once.
    validations: HashMap<Algorithm, jsonwebtoken::Validation>,
    keys: Arc<KeyStore>,
    forward: Vec<(String, HeaderName)>,
}

/// A header tokens are read from, and the providers that read it.
struct Location {
    name: HeaderName,
    prefix: String,
    providers: Vec<usize>,
}

/// Verifies request tokens against a [`JwtPolicy`]. Build it inside a Tokio runtime: it starts
/// one task per provider to keep the keys current, and stops them when dropped. `verify` takes
/// no lock and does no I/O; share the verifier behind an `Arc`.
pub struct Verifier {
    required: bool,
    providers: Vec<Provider>,
    locations: Vec<Location>,
    /// Every header a provider writes claims into: removed from every request first.
    forwarded_names: Vec<HeaderName>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("required", &self.required)
            .field(
                "issuers",
                &self.providers.iter().map(|p| &p.issuer).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Verifier {
    /// A verifier for `policy` with the default refresh behaviour. Refuses a policy with
    /// problems (all of them, with their fields). JWKS files are read before this returns; URLs
    /// are fetched in the background ([`Verifier::wait_for_keys`] waits for them).
    pub fn new(policy: &JwtPolicy) -> Result<Self, Vec<Problem>> {
        Self::with_options(policy, RefreshOptions::default())
    }

    /// The same with chosen refresh timings.
    pub fn with_options(policy: &JwtPolicy, options: RefreshOptions) -> Result<Self, Vec<Problem>> {
        let problems = policy.validate();
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut verifier = Verifier {
            required: policy.required,
            providers: Vec::new(),
            locations: Vec::new(),
            forwarded_names: Vec::new(),
            tasks: Vec::new(),
        };
        for (index, config) in policy.providers.iter().enumerate() {
            let provider = verifier.start_provider(config, options);
            // validate() checked the header name.
            let name = HeaderName::from_bytes(config.from_header.name.as_bytes())
                .expect("validated header name");
            let prefix = config.from_header.prefix.clone();
            match verifier
                .locations
                .iter_mut()
                .find(|l| l.name == name && l.prefix.eq_ignore_ascii_case(&prefix))
            {
                Some(location) => location.providers.push(index),
                None => verifier.locations.push(Location {
                    name,
                    prefix,
                    providers: vec![index],
                }),
            }
            for (_, header) in &provider.forward {
                if !verifier.forwarded_names.contains(header) {
                    verifier.forwarded_names.push(header.clone());
                }
            }
            verifier.providers.push(provider);
        }
        Ok(verifier)
    }

    fn start_provider(&mut self, config: &JwtProvider, options: RefreshOptions) -> Provider {
        let source = config.jwks.describe();
        let is_url = config.jwks.url.is_some();
        let keys = Arc::new(KeyStore::new(source, options.early_refresh_gap, is_url));
        if let Some(path) = &config.jwks.file {
            // The watch's baseline first, then the read: a change made in between is seen.
            let watch = FileWatch::new(
                [path.clone()],
                trellis_file_watch::Options::poll(options.file_poll),
            );
            refresh::load_file(&keys, path);
            self.tasks.push(tokio::spawn(refresh::run_file(
                Arc::clone(&keys),
                path.clone(),
                watch,
            )));
        } else if let Some(url) = &config.jwks.url {
            // validate() checked the URL.
            let url: http::Uri = url.parse().expect("validated URL");
            self.tasks.push(tokio::spawn(refresh::run_url(
                Arc::clone(&keys),
                url,
                config.jwks.refresh_interval().get(),
                options,
            )));
        }
        let validations = config
            .algorithms
            .iter()
            .filter_map(|alg| {
                Some((
                    *alg,
                    validation(config, crate::config::to_jsonwebtoken(*alg)?),
                ))
            })
            .collect();
        let forward = config
            .forward_claims_as
            .iter()
            .map(|f| {
                let header =
                    HeaderName::from_bytes(f.header.as_bytes()).expect("validated header name");
                (f.claim.clone(), header)
            })
            .collect();
        Provider {
            issuer: config.issuer.clone(),
            algorithms: config.algorithms.clone(),
            validations,
            keys,
            forward,
        }
    }

    /// Checks the request's token. `Ok(None)`: there is none and the policy does not require
    /// one. `Ok(Some(claims))`: a valid token of a trusted provider.
    ///
    /// A token is looked for in each provider's header (first provider's first); a header
    /// value without the provider's prefix (`Basic ...` in `Authorization`) is no token.
    pub fn verify(&self, headers: &HeaderMap) -> Result<Option<Claims>, Rejection> {
        let Some((location, token)) = self.find_token(headers)? else {
            return if self.required {
                Err(Rejection::Missing)
            } else {
                Ok(None)
            };
        };
        self.verify_token(Some(location), token).map(Some)
    }

    /// Checks a token read elsewhere (a query parameter, a cookie) against every provider,
    /// whatever header it reads.
    pub fn verify_token_str(&self, token: &str) -> Result<Claims, Rejection> {
        self.verify_token(None, token)
    }

    fn find_token<'h>(
        &'h self,
        headers: &'h HeaderMap,
    ) -> Result<Option<(&'h Location, &'h str)>, Rejection> {
        for location in &self.locations {
            let mut found = None;
            for value in headers.get_all(&location.name) {
                let Ok(text) = value.to_str() else {
                    // Not visible ASCII: no JWT. Only refused if it claims to be one.
                    if starts_with_ignore_case(value.as_bytes(), location.prefix.as_bytes()) {
                        return Err(Rejection::Malformed);
                    }
                    continue;
                };
                if !starts_with_ignore_case(text.as_bytes(), location.prefix.as_bytes()) {
                    continue;
                }
                if found.is_some() {
                    tracing::debug!(header = %location.name, "more than one token");
                    return Err(Rejection::Malformed);
                }
                found = Some(text[location.prefix.len()..].trim());
            }
            if let Some(token) = found {
                return Ok(Some((location, token)));
            }
        }
        Ok(None)
    }

    /// `location`: the header the token came from (only its providers are candidates); `None`:
    /// every provider.
    fn verify_token(&self, location: Option<&Location>, token: &str) -> Result<Claims, Rejection> {
        let (header, payload) = peek(token)?;
        let issuer = payload.get("iss").and_then(Value::as_str).ok_or_else(|| {
            tracing::debug!("token without iss");
            Rejection::WrongIssuer
        })?;
        let provider = self
            .providers
            .iter()
            .enumerate()
            .filter(|(i, _)| location.is_none_or(|l| l.providers.contains(i)))
            .map(|(_, p)| p)
            .find(|p| p.issuer == issuer)
            .ok_or_else(|| {
                tracing::debug!(%issuer, "token of an issuer no provider names");
                Rejection::WrongIssuer
            })?;
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let alg: Algorithm = alg_name
            .parse()
            .map_err(|_| Rejection::AlgorithmNotAllowed)?;
        if !provider.algorithms.contains(&alg) {
            tracing::debug!(%issuer, %alg, "algorithm not allowed");
            return Err(Rejection::AlgorithmNotAllowed);
        }
        let validation = provider
            .validations
            .get(&alg)
            .ok_or(Rejection::AlgorithmNotAllowed)?;
        let Some(keys) = provider.keys.current() else {
            return Err(Rejection::NoKeys);
        };
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.as_str()),
            Some(_) => return Err(Rejection::Malformed),
        };
        let candidates: Vec<&crate::jwks::Key> = match kid {
            Some(kid) => {
                let Some(key) = keys.by_kid(kid) else {
                    tracing::debug!(%issuer, %kid, source = %provider.keys.source, "kid not in the JWKS");
                    provider.keys.unknown_kid();
                    return Err(Rejection::UnknownKey);
                };
                if !key.algorithms.contains(&alg) {
                    tracing::debug!(%issuer, %kid, %alg, "the key is not for this algorithm");
                    return Err(Rejection::AlgorithmNotAllowed);
                }
                vec![key]
            }
            // No kid: every key for this algorithm may have signed it (issuers with one key
            // often leave kid out).
            None => keys
                .keys
                .iter()
                .filter(|k| k.algorithms.contains(&alg))
                .collect(),
        };
        if candidates.is_empty() {
            return Err(Rejection::UnknownKey);
        }
        let mut last = Rejection::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return Ok(Claims::verified(provider.issuer.clone(), data.claims)),
                Err(e) => {
                    let rejection = map_error(e.kind());
                    tracing::debug!(%issuer, kid = ?key.kid, error = %e, %rejection, "token refused");
                    if rejection != Rejection::BadSignature {
                        return Err(rejection);
                    }
                    last = rejection;
                }
            }
        }
        Err(last)
    }

    /// Removes every header a provider writes claims into (a caller must not set them), then,
    /// for a verified token, writes its provider's `forwardClaimsAs` headers. Call it on every
    /// request that is let through, with `None` for one without a token.
    pub fn forward_claims(&self, claims: Option<&Claims>, headers: &mut HeaderMap) {
        for name in &self.forwarded_names {
            headers.remove(name);
        }
        let Some(claims) = claims else { return };
        let Some(provider) = self.providers.iter().find(|p| p.issuer == claims.issuer()) else {
            return;
        };
        for (claim, header) in &provider.forward {
            let Some(value) = claims.get(claim) else {
                continue;
            };
            match HeaderValue::from_str(&header_text(value)) {
                Ok(value) => {
                    headers.insert(header.clone(), value);
                }
                Err(_) => {
                    tracing::debug!(%claim, %header, "claim not forwarded: not a valid header value");
                }
            }
        }
    }

    /// Whether the policy requires a token.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The state of each provider's keys, in policy order.
    pub fn key_status(&self) -> Vec<KeyStatus> {
        self.providers
            .iter()
            .map(|p| {
                let current = p.keys.current();
                KeyStatus {
                    issuer: p.issuer.clone(),
                    source: p.keys.source.clone(),
                    kids: current
                        .as_ref()
                        .map(|s| s.kids().map(str::to_string).collect())
                        .unwrap_or_default(),
                    keys: current.as_ref().map_or(0, |s| s.len()),
                    last_error: p.keys.last_error(),
                }
            })
            .collect()
    }

    /// Waits until every provider has keys, or `timeout`; `true` when all have. For startup
    /// (report readiness once tokens can be checked) and tests.
    pub async fn wait_for_keys(&self, timeout: Duration) -> bool {
        let all = async {
            for provider in &self.providers {
                let mut generations = provider.keys.generations();
                while provider.keys.current().is_none() {
                    if generations.changed().await.is_err() {
                        return;
                    }
                }
            }
        };
        tokio::time::timeout(timeout, all).await.is_ok()
            && self.providers.iter().all(|p| p.keys.current().is_some())
    }

    /// Waits until the provider of `issuer` applied a key set newer than the one in force now,
    /// or `timeout`; `true` if it did. For tests and tools that change a key source.
    pub async fn wait_for_reload(&self, issuer: &str, timeout: Duration) -> bool {
        let Some(provider) = self.providers.iter().find(|p| p.issuer == issuer) else {
            return false;
        };
        let mut generations = provider.keys.generations();
        generations.borrow_and_update();
        tokio::time::timeout(timeout, generations.changed())
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

fn starts_with_ignore_case(text: &[u8], prefix: &[u8]) -> bool {
    text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix)
}

type JsonObject = Map<String, Value>;

/// jsonwebtoken's checks for one provider and algorithm.
fn validation(config: &JwtProvider, alg: jsonwebtoken::Algorithm) -> jsonwebtoken::Validation {
    let mut v = jsonwebtoken::Validation::new(alg);
    v.leeway = config.clock_skew.get().as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = true;
    v.set_audience(&config.audiences);
    v.set_issuer(&[&config.issuer]);
    // exp: a token without one would never expire. iss and aud: checked, so required.
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    v
}

/// The unverified header and payload, to choose the provider and key. Each must be a JSON
/// object in base64url; the signature part may be empty here (an `alg: none` token), which the
/// algorithm check then refuses.
fn peek(token: &str) -> Result<(JsonObject, JsonObject), Rejection> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Rejection::Malformed);
    };
    let object = |part: &str| -> Result<JsonObject, Rejection> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| Rejection::Malformed)?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(Rejection::Malformed),
        }
    };
    Ok((object(header)?, object(payload)?))
}

fn map_error(kind: &ErrorKind) -> Rejection {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_) => Rejection::BadSignature,
        ErrorKind::ExpiredSignature => Rejection::Expired,
        ErrorKind::ImmatureSignature => Rejection::NotYetValid,
        ErrorKind::InvalidAudience => Rejection::WrongAudience,
        ErrorKind::InvalidIssuer => Rejection::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Rejection::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => Rejection::WrongIssuer,
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            Rejection::AlgorithmNotAllowed
        }
        _ => Rejection::Malformed,
    }
}
