//! Key sets: parsing a JWKS document into verification keys ([`KeySet::parse`]) and the
//! per-provider store that serves the last good set to verification without a lock
//! ([`KeyStore`], an `ArcSwap`), with the state the refresh tasks report (loaded, last error).
//!
//! What a key set accepts, and why:
//! - each key is read on its own: one key of a type this crate cannot use (an encryption key,
//!   a curve it does not know) is skipped with a warning rather than failing the whole set,
//!   because issuers publish such keys next to their signing keys;
//! - symmetric (`oct`) keys and keys marked `use: enc` are never used to verify (a JWKS is
//!   public: a secret in it is no secret);
//! - RSA keys shorter than 2048 bits are skipped (RFC 7518 section 3.3);
//! - a set with no usable key at all, or that is not JSON with a `keys` array, is an error and
//!   is not applied.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use crate::config::Algorithm;

/// The shortest RSA modulus used, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// One verification key.
pub(crate) struct Key {
    pub(crate) kid: Option<String>,
    pub(crate) key: DecodingKey,
    /// The algorithms this key may verify: its `alg` if the JWKS names one, else every
    /// algorithm of its type and curve.
    pub(crate) algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The usable keys of one JWKS document.
#[derive(Debug)]
pub struct KeySet {
    pub(crate) keys: Vec<Key>,
    by_kid: HashMap<String, usize>,
    /// Keys skipped, each with why (reported once per load).
    pub(crate) skipped: Vec<String>,
}

/// A JWKS that could not be used: where it came from and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JWKS from {source_name}: {reason}")]
pub struct JwksError {
    /// The file or URL.
    pub source_name: String,
    /// What was wrong.
    pub reason: String,
}

impl KeySet {
    /// Reads a JWKS document (`{"keys": [...]}`) from `source` (a path or URL, for messages).
    pub fn parse(source: &str, bytes: &[u8]) -> Result<KeySet, JwksError> {
        let fail = |reason: String| JwksError {
            source_name: source.to_string(),
            reason,
        };
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| fail(format!("not JSON: {e}")))?;
        let Some(items) = doc.get("keys").and_then(Value::as_array) else {
            return Err(fail(
                "no \"keys\" array (a JWKS is {\"keys\": [...]})".to_string(),
            ));
        };
        let mut set = KeySet {
            keys: Vec::new(),
            by_kid: HashMap::new(),
            skipped: Vec::new(),
        };
        for (i, item) in items.iter().enumerate() {
            let kid = item.get("kid").and_then(Value::as_str).map(str::to_string);
            let name = match &kid {
                Some(kid) => format!("keys[{i}] (kid {kid:?})"),
                None => format!("keys[{i}]"),
            };
            match read_key(item) {
                Err(why) => set.skipped.push(format!("{name}: {why}")),
                Ok(key) => {
                    if let Some(kid) = &key.kid {
                        if set.by_kid.contains_key(kid) {
                            set.skipped
                                .push(format!("{name}: the kid of an earlier key, skipped"));
                            continue;
                        }
                        set.by_kid.insert(kid.clone(), set.keys.len());
                    }
                    set.keys.push(key);
                }
            }
        }
        if set.keys.is_empty() {
            let why = if set.skipped.is_empty() {
                "no keys".to_string()
            } else {
                format!("no usable key: {}", set.skipped.join("; "))
            };
            return Err(fail(why));
        }
        Ok(set)
    }

    /// How many keys are usable.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is usable (never true of a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key with this `kid`.
    pub(crate) fn by_kid(&self, kid: &str) -> Option<&Key> {
        self.by_kid.get(kid).map(|&i| &self.keys[i])
    }

    /// The kids of the keys, in document order (keys without one are left out).
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().filter_map(|k| k.kid.as_deref())
    }
}

fn read_key(item: &Value) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_value(item.clone()).map_err(|e| format!("not a JWK: {e}"))?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (use: enc)".into());
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&jsonwebtoken::jwk::KeyOperations::Verify)
    {
        return Err("key_ops does not include verify".into());
    }
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map_err(|e| format!("n is not base64url: {e}"))?;
            let bits = n.iter().position(|&b| b != 0).map_or(0, |first| {
                (n.len() - first) * 8 - n[first].leading_zeros() as usize
            });
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "an RSA key of {bits} bits (at least {MIN_RSA_BITS} are required)"
                ));
            }
            vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ]
        }
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            ref other => return Err(format!("curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            ref other => return Err(format!("curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "a symmetric (oct) key: a published JWKS cannot hold a secret, so it never verifies"
                    .into(),
            );
        }
        _ => return Err("a key type this verifier does not support".into()),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => family,
        Some(KeyAlgorithm::UNKNOWN_ALGORITHM) => {
            return Err("an unknown alg".into());
        }
        Some(alg) => {
            let alg: Algorithm = alg
                .to_string()
                .replace('_', "-")
                .parse()
                .map_err(|_| format!("alg {alg} is not a signature algorithm"))?;
            if !family.contains(&alg) {
                return Err(format!("alg {alg} does not fit the key's type"));
            }
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key material: {e}"))?;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        key,
        algorithms,
    })
}

/// The keys of one provider as verification sees them, and the refresh task's state.
#[derive(Debug)]
pub(crate) struct KeyStore {
    pub(crate) source: String,
    current: ArcSwapOption<KeySet>,
    last_error: Mutex<Option<String>>,
    /// Bumped on every applied set: `Verifier::wait_for_keys` waits on it.
    generation: watch::Sender<u64>,
    /// Asks the URL task to fetch now (an unknown kid).
    pub(crate) refresh_now: Notify,
    /// Milliseconds after `epoch` of the last early refresh asked for; `u64::MAX`: never.
    last_early: AtomicU64,
    epoch: Instant,
    early_gap: Duration,
    /// Only URL sources refresh early (a file is watched).
    refreshes_early: bool,
}

impl KeyStore {
    pub(crate) fn new(source: String, early_gap: Duration, refreshes_early: bool) -> Self {
        Self {
            source,
            current: ArcSwapOption::empty(),
            last_error: Mutex::new(None),
            generation: watch::channel(0).0,
            refresh_now: Notify::new(),
            last_early: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            early_gap,
            refreshes_early,
        }
    }

    /// The key set in force (no lock: one atomic load).
    pub(crate) fn current(&self) -> Option<Arc<KeySet>> {
        self.current.load_full()
    }

    /// Reads `bytes` and applies the set if it parses; otherwise records and logs the error and
    /// keeps the set in force.
    pub(crate) fn apply(&self, bytes: &[u8]) -> Result<(), JwksError> {
        match KeySet::parse(&self.source, bytes) {
            Ok(set) => {
                for skipped in &set.skipped {
                    tracing::warn!(source = %self.source, "JWKS key skipped: {skipped}");
                }
                let kids: Vec<&str> = set.kids().collect();
                let before = self.current.load();
                let changed = before
                    .as_ref()
                    .is_none_or(|b| b.kids().ne(kids.iter().copied()));
                // A periodic refresh that brought the same kids is no news.
                if changed {
                    tracing::info!(source = %self.source, keys = set.len(), ?kids, "JWKS loaded");
                } else {
                    tracing::debug!(source = %self.source, keys = set.len(), "JWKS refreshed, same kids");
                }
                drop(before);
                self.current.store(Some(Arc::new(set)));
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.generation.send_modify(|g| *g += 1);
                Ok(())
            }
            Err(e) => {
                self.fail(e.to_string());
                Err(e)
            }
        }
    }

    /// Records a failed load (the set in force stays).
    pub(crate) fn fail(&self, error: String) {
        let keeping = if self.current.load().is_some() {
            "keeping the last good key set"
        } else {
            "no keys yet: tokens of this issuer are refused (no-keys)"
        };
        tracing::warn!(source = %self.source, "JWKS not loaded: {error}; {keeping}");
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A token named a kid not in the set: ask for one fetch now, unless one was asked for in
    /// the last `early_gap` (so a stream of made-up kids costs the issuer at most one request
    /// per gap). Lock-free: one compare-and-swap decides who asks.
    pub(crate) fn unknown_kid(&self) {
        if !self.refreshes_early {
            return;
        }
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        let last = self.last_early.load(Ordering::Relaxed);
        let gap = u64::try_from(self.early_gap.as_millis()).unwrap_or(u64::MAX);
        if last != u64::MAX && now.saturating_sub(last) < gap {
            return;
        }
        if self
            .last_early
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::debug!(source = %self.source, "unknown kid: refreshing the JWKS early");
            self.refresh_now.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_json_and_no_keys_array_and_empty_sets_are_errors_naming_the_source() {
        for (doc, want) in [
            (&b"nope"[..], "not JSON"),
            (b"{\"key\": []}", "no \"keys\" array"),
            (b"{\"keys\": []}", "no keys"),
            (
                b"{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\", \"kid\": \"s\"}]}",
                "symmetric",
            ),
        ] {
            let err = KeySet::parse("/etc/jwks.json", doc).unwrap_err();
            assert_eq!(err.source_name, "/etc/jwks.json");
            assert!(err.to_string().contains(want), "{err} should say {want}");
            assert!(
                err.to_string().starts_with("JWKS from /etc/jwks.json: "),
                "{err}"
            );
        }
    }

    #[test]
    fn short_rsa_keys_and_encryption_keys_are_skipped() {
        // A 1024-bit modulus (top bit set), e = 65537.
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xc5u8; 128]);
        let doc = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "short", "n": n, "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "kid": "sig",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        ]});
        let set = KeySet::parse("x", doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), ["sig"]);
        assert_eq!(set.skipped.len(), 2, "{:?}", set.skipped);
        assert!(set.skipped[0].contains("1024 bits"), "{:?}", set.skipped);
        assert!(set.skipped[1].contains("use: enc"), "{:?}", set.skipped);
        assert_eq!(set.by_kid("sig").unwrap().algorithms, [Algorithm::ES256]);
    }

    #[test]
    fn an_alg_that_does_not_fit_the_key_skips_it() {
        let doc = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "a", "alg": "RS256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        ]});
        let err = KeySet::parse("x", doc.to_string().as_bytes()).unwrap_err();
        assert!(err.reason.contains("does not fit"), "{err}");
    }
}
