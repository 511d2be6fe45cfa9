//! The agent's trust policy parser (alki_agent::trust::TrustPolicy::from_toml_with) on arbitrary text, as if
//! read from /etc/alki/trust.toml. Key files are served from memory: `keys/release.pub` (a real public key)
//! and `keys/broken.pub` (not a key) beside the policy; any other path does not exist. A policy that parses
//! never lets a repository through unsigned unless a rule says so, and `*` patterns match what they spell.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use alki_agent::trust::{TrustPolicy, pattern_matches};
use alki_shared::signing::{KeyError, PublicKey, SigningKey};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = "/etc/alki/trust.toml";
const REPOSITORIES: [&str; 6] = ["acme/model", "lab/x", "", "a*b", "acme/sub/deep", "registry.example:5000/acme/m"];

fn release_pem() -> &'static str {
    static PEM: OnceLock<String> = OnceLock::new();
    PEM.get_or_init(|| SigningKey::generate().expect("generate a key").public_key().to_pem())
}

fn load_key(path: &Path) -> Result<PublicKey, KeyError> {
    let what = path.display().to_string();
    match path.to_str() {
        Some("/etc/alki/keys/release.pub") => PublicKey::from_pem(release_pem().as_bytes(), &what),
        Some("/etc/alki/keys/broken.pub") => {
            PublicKey::from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", &what)
        }
        _ => Err(KeyError::Read { path: what, source: std::io::ErrorKind::NotFound.into() }),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match TrustPolicy::from_toml_with(text, Path::new(POLICY), load_key) {
        Ok(policy) => {
            for repository in REPOSITORIES {
                let trust = policy.for_repository(repository);
                if trust.required && trust.keys.is_empty() {
                    assert!(trust.source.contains("no rule matches"), "a rule requiring no key: {}", trust.source);
                }
            }
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
    // Pattern matching on the first line as a pattern: it matches itself with any text for each `*`.
    let pattern = text.lines().next().unwrap_or_default();
    for fill in ["", "x", "a/b*"] {
        let repository = pattern.replace('*', fill);
        assert!(pattern_matches(pattern, &repository), "{pattern:?} does not match {repository:?}");
    }
    if !pattern.contains('*') {
        assert!(!pattern_matches(pattern, &format!("{pattern}x")), "{pattern:?} matches more than itself");
    }
});
