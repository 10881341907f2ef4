//! Proof of identity: which workload (`namespace/name`) the proof in a `Certify` request shows
//! the caller runs as. Two kinds, tried in this order:
//!
//! - **Bootstrap tokens** (every platform): a YAML file of `{workload, sha256}` entries the
//!   operator provisions; the controller keeps only hashes. A proof matches an entry when the
//!   SHA-256 of the proof (as sent, without its trailing whitespace, or that plus one newline) equals the entry's hash
//!   (compared in constant time). The file is watched ([`trellis_file_watch`]: OS change events,
//!   and a poll as the fallback) and reloaded on change; a bad file is reported with its line,
//!   the last good set stays in force and the file is read again every poll until it is good.
//! - **TokenReview** (Kubernetes): the proof is a projected ServiceAccount token, sent to the API
//!   server's TokenReview with the controller's audience; only an authenticated
//!   `system:serviceaccount:NS:NAME` whose audiences include ours proves `NS/NAME`
//!   ([`TokenReviewer`], in `crate::kubernetes` with the rest of what needs a client).
//!
//! Proofs are secrets: they are never logged and never part of an error message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::watch;
use trellis_file_watch::{FileWatch, Options};

use crate::kubernetes::TokenReviewer;

/// What a proof showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proven {
    /// The caller runs as this `namespace/name`.
    Workload(String),
    /// Nothing: no bootstrap token matches and TokenReview (if on) did not authenticate it.
    Nothing(String),
}

/// The proof could not be checked (the API server is away): the proxy should retry.
#[derive(Debug, Clone, thiserror::Error)]
#[error("checking the proof: {0}")]
pub struct Unavailable(pub String);

// ---------------------------------------------------------------------------------------------
// Bootstrap tokens
// ---------------------------------------------------------------------------------------------

/// A bad bootstrap tokens file: the file, and serde's message with line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bootstrap tokens {file}: {message}")]
pub struct TokensError {
    pub file: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    workload: Workload,
    sha256: Sha256Hex,
}

/// `namespace/name`, checked while parsing so the error carries the line.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Workload(String);

impl TryFrom<String> for Workload {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Workload(s))
            }
            _ => Err(format!(
                "workload {s:?} is not namespace/name (the identity's namespace and service account)"
            )),
        }
    }
}

/// 64 hex digits, checked while parsing.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Sha256Hex([u8; 32]);

impl TryFrom<String> for Sha256Hex {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out)
            .map(|()| Sha256Hex(out))
            .map_err(|_| {
                format!("sha256 {s:?} is not 64 hex digits (the output of `sha256sum TOKENFILE`)")
            })
    }
}

/// The token hashes in force, per workload.
#[derive(Debug, Default, Clone)]
pub struct TokenSet {
    entries: Vec<(String, [u8; 32])>,
}

impl TokenSet {
    /// Parses the YAML of a bootstrap tokens file (`file` names it in errors).
    pub fn parse(file: &str, text: &str) -> Result<Self, TokensError> {
        let parsed: TokensFile = serde_yaml_ng::from_str(text).map_err(|e| TokensError {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        let entries: Vec<(String, [u8; 32])> = parsed
            .tokens
            .into_iter()
            .map(|e| (e.workload.0, e.sha256.0))
            .collect();
        // One token proving two workloads would make the proof ambiguous: refuse the file.
        for (i, (workload, hash)) in entries.iter().enumerate() {
            if let Some((j, (other, _))) = entries[..i]
                .iter()
                .enumerate()
                .find(|(_, (w, h))| h == hash && w != workload)
            {
                return Err(TokensError {
                    file: file.to_owned(),
                    message: format!(
                        "tokens[{i}] ({workload}) has the same sha256 as tokens[{j}] ({other}): one token cannot prove two workloads"
                    ),
                });
            }
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The workload whose token `proof` is. Every entry is compared (constant time each), so
    /// the time taken does not say which entry matched.
    pub fn workload_of(&self, proof: &[u8]) -> Option<&str> {
        // The operator hashed the token file (`sha256sum`, usually with its newline); the proxy
        // may send the file as is or trimmed: all three spellings of one token match.
        let exact: [u8; 32] = Sha256::digest(proof).into();
        let trimmed_proof = proof.trim_ascii_end();
        let trimmed: [u8; 32] = Sha256::digest(trimmed_proof).into();
        let with_newline: [u8; 32] = Sha256::new()
            .chain_update(trimmed_proof)
            .chain_update(b"\n")
            .finalize()
            .into();
        let mut found = None;
        for (workload, hash) in &self.entries {
            let hit = hash.ct_eq(&exact) | hash.ct_eq(&trimmed) | hash.ct_eq(&with_newline);
            if bool::from(hit) && found.is_none() {
                found = Some(workload.as_str());
            }
        }
        found
    }
}

/// A bootstrap tokens file, watched for changes; the last good set stays in force.
#[derive(Debug, Clone)]
pub struct BootstrapTokens {
    current: Arc<ArcSwap<TokenSet>>,
    errors: watch::Receiver<Option<TokensError>>,
}

fn read_tokens(path: &Path) -> Result<TokenSet, TokensError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| TokensError {
        file: file.clone(),
        message: format!("cannot read it: {e}"),
    })?;
    TokenSet::parse(&file, &text)
}

impl BootstrapTokens {
    /// Reads `path` (a bad file is an error here: the controller does not start on it), then
    /// watches it in the background, with `every` as the fallback poll.
    pub fn start(path: PathBuf, every: Duration) -> Result<Self, TokensError> {
        // Watch before reading: a change made while reading is seen.
        let mut file = FileWatch::new([path.clone()], Options::poll(every));
        let first = read_tokens(&path)?;
        let current = Arc::new(ArcSwap::from_pointee(first));
        let (errors_tx, errors) = watch::channel(None);
        let shared = Arc::downgrade(&current);
        tokio::spawn(async move {
            loop {
                let changed = file.changed_or_after(every).await;
                let Some(current) = shared.upgrade() else {
                    return;
                };
                // Retry while in error: a file caught mid-write may be whole a moment later.
                if !changed && errors_tx.borrow().is_none() {
                    continue;
                }
                match read_tokens(&path) {
                    Ok(set) => {
                        tracing::info!(
                            "bootstrap tokens {}: {} entries loaded",
                            path.display(),
                            set.len()
                        );
                        current.store(Arc::new(set));
                        errors_tx.send_if_modified(|e| e.take().is_some());
                    }
                    Err(e) => {
                        errors_tx.send_if_modified(|old| {
                            if old.as_ref() == Some(&e) {
                                return false;
                            }
                            tracing::warn!("{e} (the last good tokens stay in force)");
                            *old = Some(e);
                            true
                        });
                    }
                }
            }
        });
        Ok(Self { current, errors })
    }

    pub fn current(&self) -> Arc<TokenSet> {
        self.current.load_full()
    }

    /// The error of the last reload (`None` once a reload succeeds).
    pub fn errors(&self) -> watch::Receiver<Option<TokensError>> {
        self.errors.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Both together
// ---------------------------------------------------------------------------------------------

/// The proof checkers configured.
#[derive(Debug, Clone, Default)]
pub struct Prover {
    pub tokens: Option<BootstrapTokens>,
    pub review: Option<TokenReviewer>,
}

impl Prover {
    /// What `proof` shows: a bootstrap token first (local, cheap), then TokenReview.
    pub async fn prove(&self, proof: &[u8]) -> Result<Proven, Unavailable> {
        if proof.trim_ascii().is_empty() {
            return Ok(Proven::Nothing("no proof in the request".into()));
        }
        if let Some(tokens) = &self.tokens
            && let Some(workload) = tokens.current().workload_of(proof)
        {
            return Ok(Proven::Workload(workload.to_owned()));
        }
        match &self.review {
            Some(review) => match std::str::from_utf8(proof.trim_ascii()) {
                Ok(token) => review.review(token).await,
                Err(_) => Ok(Proven::Nothing(
                    "the proof is neither a bootstrap token nor a ServiceAccount token".into(),
                )),
            },
            None if self.tokens.is_none() => Ok(Proven::Nothing(
                "this controller has no way to check proofs (no --bootstrap-tokens, no Kubernetes TokenReview)".into(),
            )),
            None => Ok(Proven::Nothing(
                "the proof matches no bootstrap token".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    #[test]
    fn tokens_match_their_workload_with_or_without_the_trailing_newline() {
        let yaml = format!(
            "tokens:\n- workload: shop/web\n  sha256: {}\n- workload: shop/db\n  sha256: {}\n",
            sha("web-secret"),
            sha("db-secret\n"),
        );
        let set = TokenSet::parse("t.yaml", &yaml).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.workload_of(b"web-secret"), Some("shop/web"));
        assert_eq!(set.workload_of(b"web-secret\n"), Some("shop/web"));
        assert_eq!(set.workload_of(b"db-secret\n"), Some("shop/db"));
        assert_eq!(
            set.workload_of(b"db-secret"),
            Some("shop/db"),
            "sent trimmed"
        );
        assert_eq!(set.workload_of(b"guess"), None);
    }

    #[test]
    fn bad_entries_are_reported_with_file_and_line() {
        let yaml = "tokens:\n- workload: shop/web\n  sha256: 1234\n";
        let err = TokenSet::parse("tokens.yaml", yaml).unwrap_err();
        assert_eq!(err.file, "tokens.yaml");
        assert!(err.message.contains("64 hex digits"), "{err}");
        assert!(err.message.contains("tokens[0]"), "{err}");
        assert!(err.message.contains("line 2"), "{err}");

        let yaml = format!(
            "tokens:\n- workload: shop/db\n  sha256: {}\n- workload: web\n  sha256: {}\n",
            sha("y"),
            sha("x")
        );
        let err = TokenSet::parse("tokens.yaml", &yaml).unwrap_err();
        assert!(err.message.contains("namespace/name"), "{err}");
        assert!(err.message.contains("tokens[1]"), "{err}");
        assert!(err.message.contains("line 4"), "{err}");

        let twice = format!(
            "tokens:\n- {{workload: a/b, sha256: {0}}}\n- {{workload: a/c, sha256: {0}}}\n",
            sha("same")
        );
        let err = TokenSet::parse("tokens.yaml", &twice).unwrap_err();
        assert!(
            err.message.contains("tokens[1] (a/c)") && err.message.contains("tokens[0] (a/b)"),
            "{err}"
        );

        let err =
            TokenSet::parse("tokens.yaml", "tokens:\n- {workload: a/b, token: x}\n").unwrap_err();
        assert!(err.message.contains("unknown field"), "{err}");
    }

    #[tokio::test]
    async fn a_bad_reload_keeps_the_last_good_set_and_a_fix_clears_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        let good = format!("tokens:\n- workload: shop/web\n  sha256: {}\n", sha("t1"));
        std::fs::write(&path, &good).unwrap();
        let tokens = BootstrapTokens::start(path.clone(), Duration::from_millis(20)).unwrap();
        let mut errors = tokens.errors();
        std::fs::write(&path, "tokens: [oops\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), errors.wait_for(|e| e.is_some()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tokens.current().workload_of(b"t1"), Some("shop/web"));
        let newer = format!("tokens:\n- workload: shop/db\n  sha256: {}\n", sha("t2"));
        std::fs::write(&path, newer).unwrap();
        tokio::time::timeout(Duration::from_secs(5), errors.wait_for(|e| e.is_none()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tokens.current().workload_of(b"t2"), Some("shop/db"));
        assert_eq!(tokens.current().workload_of(b"t1"), None);
    }
}
