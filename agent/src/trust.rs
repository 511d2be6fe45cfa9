//! The agent's trust policy: which public keys it trusts for which repositories, and whether a signature is
//! required (the default). The policy file is read again before every pull (it is small), so an edit applies
//! to the next pull without a restart; an invalid edit is refused with the reason and the last good policy
//! stays in force. Without any policy the agent trusts nothing and refuses every bundle.
//!
//! ```toml
//! # /etc/alki/trust.toml: the first rule whose pattern matches the repository applies.
//! [[repository]]
//! pattern = "acme/*"           # `*` matches any run of characters, `/` included
//! keys = ["keys/release.pub"]  # PEM public keys (cosign.pub or `alkictl key generate`), relative to this file
//! required = true              # the default; false lets unsigned bundles through (development only)
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use alki_shared::signing::{KeyError, PublicKey};
use serde::Deserialize;

/// The policy file is a few rules; anything larger is not one.
const MAX_POLICY_BYTES: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default, rename = "repository")]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    pattern: String,
    #[serde(default)]
    keys: Vec<PathBuf>,
    #[serde(default = "required_by_default")]
    required: bool,
}

fn required_by_default() -> bool {
    true
}

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read trust policy {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("trust policy {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A parsed policy: rules in file order, keys loaded.
#[derive(Clone, Debug)]
pub struct TrustPolicy {
    path: PathBuf,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Rule {
    pattern: String,
    keys: Vec<PublicKey>,
    required: bool,
}

/// What the policy says for one repository.
#[derive(Clone, Debug)]
pub struct RepositoryTrust {
    /// A bundle without a signature that verifies is refused.
    pub required: bool,
    /// Keys whose signatures are accepted.
    pub keys: Vec<PublicKey>,
    /// Where this came from, for messages: `trust policy /etc/alki/trust.toml, rule "acme/*"`.
    pub source: String,
}

impl Default for RepositoryTrust {
    /// Trusts nothing: every bundle is refused.
    fn default() -> Self {
        RepositoryTrust {
            required: true,
            keys: Vec::new(),
            source: "no trust policy configured (set trust_policy in the agent config)".to_owned(),
        }
    }
}

impl RepositoryTrust {
    /// Lets unsigned bundles through: for tests and development, where `required = false` says so.
    pub fn allow_unsigned(source: &str) -> RepositoryTrust {
        RepositoryTrust { required: false, keys: Vec::new(), source: source.to_owned() }
    }

    /// Requires a signature by one of `keys`.
    pub fn require(keys: Vec<PublicKey>, source: &str) -> RepositoryTrust {
        RepositoryTrust { required: true, keys, source: source.to_owned() }
    }
}

impl TrustPolicy {
    /// Parses a policy; key paths are relative to `path`'s directory.
    pub fn from_toml(text: &str, path: &Path) -> Result<TrustPolicy, TrustError> {
        TrustPolicy::from_toml_with(text, path, PublicKey::load)
    }

    /// [`TrustPolicy::from_toml`] with keys read by `load_key` (given the full path of each key file).
    // Split out for the fuzz target fuzz/fuzz_targets/trust_policy.rs, which serves keys from memory instead of
    // reading whatever paths the fuzzer writes.
    pub fn from_toml_with(
        text: &str,
        path: &Path,
        load_key: impl Fn(&Path) -> Result<PublicKey, KeyError>,
    ) -> Result<TrustPolicy, TrustError> {
        let invalid = |reason: String| TrustError::Invalid { path: path.to_owned(), reason };
        let file: PolicyFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut rules = Vec::new();
        for (i, rule) in file.rules.into_iter().enumerate() {
            if rule.pattern.is_empty() {
                return Err(invalid(format!("repository rule {} has an empty pattern; use \"*\" for all", i + 1)));
            }
            if rule.required && rule.keys.is_empty() {
                return Err(invalid(format!(
                    "rule {:?} requires signatures but lists no keys; add keys = [\"release.pub\"] or set \
                     required = false",
                    rule.pattern
                )));
            }
            let mut keys = Vec::new();
            for key in &rule.keys {
                let full = if key.is_absolute() { key.clone() } else { base.join(key) };
                keys.push(load_key(&full).map_err(|e| invalid(format!("rule {:?}: {e}", rule.pattern)))?);
            }
            rules.push(Rule { pattern: rule.pattern, keys, required: rule.required });
        }
        Ok(TrustPolicy { path: path.to_owned(), rules })
    }

    pub fn load(path: &Path) -> Result<TrustPolicy, TrustError> {
        let text = read_bounded(path)?;
        TrustPolicy::from_toml(&text, path)
    }

    /// The first rule matching `repository`; with none, signatures are required and no key is trusted.
    pub fn for_repository(&self, repository: &str) -> RepositoryTrust {
        match self.rules.iter().find(|r| pattern_matches(&r.pattern, repository)) {
            Some(rule) => RepositoryTrust {
                required: rule.required,
                keys: rule.keys.clone(),
                source: format!("trust policy {}, rule {:?}", self.path.display(), rule.pattern),
            },
            None => RepositoryTrust {
                required: true,
                keys: Vec::new(),
                source: format!(
                    "trust policy {}: no rule matches repository {repository:?}; add a [[repository]] rule for it",
                    self.path.display()
                ),
            },
        }
    }
}

fn read_bounded(path: &Path) -> Result<String, TrustError> {
    let read = |source| TrustError::Read { path: path.to_owned(), source };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_POLICY_BYTES {
        return Err(TrustError::Invalid { path: path.to_owned(), reason: format!("{size} bytes is too large") });
    }
    std::fs::read_to_string(path).map_err(read)
}

/// `*` matches any run of characters (`/` included); everything else matches itself.
pub fn pattern_matches(pattern: &str, repository: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == repository;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !repository.starts_with(first) || repository.len() < first.len() + last.len() || !repository.ends_with(last) {
        return false;
    }
    let mut rest = &repository[first.len()..repository.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// The policy in force: read again before each pull, keeping the last good one when an edit is invalid.
#[derive(Clone, Debug, Default)]
pub struct TrustStore {
    path: Option<PathBuf>,
    last_good: Arc<Mutex<Option<Arc<TrustPolicy>>>>,
}

impl TrustStore {
    pub fn new(path: Option<PathBuf>) -> TrustStore {
        TrustStore { path, last_good: Default::default() }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// What the policy says for `repository` now. Blocking file reads: call from a blocking context or accept
    /// a few small reads.
    pub fn for_repository(&self, repository: &str) -> RepositoryTrust {
        let Some(path) = &self.path else { return RepositoryTrust::default() };
        let loaded = TrustPolicy::load(path);
        let mut last = self.last_good.lock().unwrap_or_else(|p| p.into_inner());
        match loaded {
            Ok(policy) => {
                let policy = Arc::new(policy);
                *last = Some(policy.clone());
                policy.for_repository(repository)
            }
            Err(error) => match last.as_ref() {
                Some(good) => {
                    tracing::error!(%error, "The trust policy was edited into something invalid; the last good policy stays in force.");
                    good.for_repository(repository)
                }
                None => RepositoryTrust {
                    required: true,
                    keys: Vec::new(),
                    source: format!("{error}; fix the file (nothing is trusted until then)"),
                },
            },
        }
    }

    /// [`TrustStore::for_repository`] on a blocking thread: the policy file and its keys are small files, but
    /// file reads stay off the async threads.
    pub async fn for_repository_off_thread(&self, repository: &str) -> RepositoryTrust {
        let (store, repository) = (self.clone(), repository.to_owned());
        tokio::task::spawn_blocking(move || store.for_repository(&repository)).await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_documented() {
        assert!(pattern_matches("*", "acme/qwen"));
        assert!(pattern_matches("acme/*", "acme/qwen"));
        assert!(pattern_matches("acme/*", "acme/team/qwen"));
        assert!(!pattern_matches("acme/*", "other/qwen"));
        assert!(pattern_matches("acme/qwen", "acme/qwen"));
        assert!(!pattern_matches("acme/qwen", "acme/qwen2"));
        assert!(pattern_matches("*/qwen*", "acme/qwen-2"));
        assert!(!pattern_matches("a*a", "a"));
    }

    #[test]
    fn rules_apply_in_order_and_unknown_repositories_trust_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = alki_shared::signing::SigningKey::generate().expect("key");
        std::fs::write(dir.path().join("release.pub"), key.public_key().to_pem()).expect("write");
        let path = dir.path().join("trust.toml");
        let text = "[[repository]]\npattern = \"dev/*\"\nrequired = false\n\n\
                    [[repository]]\npattern = \"acme/*\"\nkeys = [\"release.pub\"]\n";
        let policy = TrustPolicy::from_toml(text, &path).expect("valid");
        let acme = policy.for_repository("acme/qwen");
        assert!(acme.required);
        assert_eq!(acme.keys.len(), 1);
        assert!(acme.source.contains("acme/*"), "{}", acme.source);
        assert!(!policy.for_repository("dev/x").required);
        let other = policy.for_repository("other/x");
        assert!(other.required && other.keys.is_empty());
        assert!(other.source.contains("no rule matches"), "{}", other.source);
    }

    #[test]
    fn bad_policies_say_what_to_fix() {
        let path = Path::new("/nonexistent/trust.toml");
        let err = TrustPolicy::from_toml("[[repository]]\npattern = \"*\"\n", path).expect_err("no keys");
        assert!(err.to_string().contains("lists no keys"), "{err}");
        let err = TrustPolicy::from_toml("[[repository]]\npattern = \"*\"\nkeyz = []\n", path).expect_err("typo");
        assert!(err.to_string().contains("keyz"), "{err}");
        let err = TrustPolicy::from_toml("[[repository]]\npattern = \"*\"\nkeys = [\"x.pub\"]\n", path)
            .expect_err("missing key");
        assert!(err.to_string().contains("x.pub"), "{err}");
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_good_policy_and_none_trusts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("trust.toml");
        let store = TrustStore::new(Some(path.clone()));
        let missing = store.for_repository("acme/qwen");
        assert!(missing.required && missing.keys.is_empty(), "no file: trust nothing");
        std::fs::write(&path, "[[repository]]\npattern = \"*\"\nrequired = false\n").expect("write");
        assert!(!store.for_repository("acme/qwen").required, "the edit applies to the next pull");
        std::fs::write(&path, "this is not toml [").expect("write");
        assert!(!store.for_repository("acme/qwen").required, "last good policy stays");
        assert!(TrustStore::new(None).for_repository("acme/qwen").required);
    }
}
