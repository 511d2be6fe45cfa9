//! A bundle reference pinned by digest, validated where it enters the agent (desired state, state file).

use std::fmt;

use alki_shared::digest::Digest;
use alki_shared::proto;
use serde::{Deserialize, Serialize};

/// Where a bundle lives and which one it is. Unlike [`proto::BundleRef`], the digest is validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleLocation {
    /// Registry `host[:port]`; empty means the controller's embedded registry.
    pub registry: String,
    /// Repository inside the registry, e.g. `acme/qwen`.
    pub repository: String,
    /// Digest of the bundle's image index (or single manifest).
    pub digest: Digest,
    /// Tag the operator named, if any; informational.
    #[serde(default)]
    pub tag: String,
}

/// Why a [`proto::BundleRef`] cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("the desired state names no bundle")]
    Missing,
    #[error("bundle reference {0:?} has no repository")]
    NoRepository(String),
    #[error("bundle repository {0:?} is not a valid repository name (lowercase a-z, 0-9, separators . _ - and /)")]
    BadRepository(String),
    #[error("bundle {reference}: {source}")]
    BadDigest { reference: String, source: alki_shared::digest::DigestError },
}

impl BundleLocation {
    pub fn from_proto(r: Option<&proto::BundleRef>) -> Result<BundleLocation, ReferenceError> {
        let r = r.ok_or(ReferenceError::Missing)?;
        if r.repository.is_empty() {
            return Err(ReferenceError::NoRepository(r.display()));
        }
        if !valid_repository(&r.repository) {
            return Err(ReferenceError::BadRepository(r.repository.clone()));
        }
        let digest = r
            .digest
            .parse::<Digest>()
            .map_err(|source| ReferenceError::BadDigest { reference: r.display(), source })?;
        Ok(BundleLocation {
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            digest,
            tag: r.tag.clone(),
        })
    }

    pub fn to_proto(&self) -> proto::BundleRef {
        proto::BundleRef {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            digest: self.digest.to_string(),
            tag: self.tag.clone(),
        }
    }

    /// The digest shortened for messages: `sha256:ab12cd34ef56…`.
    pub fn short_digest(&self) -> String {
        short(&self.digest)
    }
}

/// A digest shortened for messages to people.
pub fn short(d: &Digest) -> String {
    format!("sha256:{}…", &d.hex()[..12])
}

impl fmt::Display for BundleLocation {
    /// `registry/repository@sha256:…` (or `repository@…` for the embedded registry), digest shortened.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.registry.is_empty() {
            write!(f, "{}/", self.registry)?;
        }
        write!(f, "{}@{}", self.repository, self.short_digest())
    }
}

/// The distribution spec's repository name grammar.
fn valid_repository(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    name.split('/').all(|component| {
        let bytes = component.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return false;
        }
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if alnum(b) {
                i += 1;
                continue;
            }
            // A separator: ".", "_", "__" or a run of "-", followed by an alphanumeric.
            let start = i;
            if b == b'-' {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            } else if b == b'_' && bytes.get(i + 1) == Some(&b'_') {
                i += 2;
            } else if b == b'.' || b == b'_' {
                i += 1;
            } else {
                return false;
            }
            if i == start || i >= bytes.len() || !alnum(bytes[i]) {
                return false;
            }
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_validated() {
        let good = proto::BundleRef {
            registry: String::new(),
            repository: "acme/qwen-2.5".into(),
            digest: Digest::of(b"x").to_string(),
            tag: "v1".into(),
        };
        let loc = BundleLocation::from_proto(Some(&good)).expect("valid");
        assert_eq!(loc.to_proto(), good);
        assert!(loc.to_string().starts_with("acme/qwen-2.5@sha256:"));
        assert!(matches!(BundleLocation::from_proto(None), Err(ReferenceError::Missing)));
        let mut bad = good.clone();
        bad.digest = "sha256:nothex".into();
        assert!(matches!(BundleLocation::from_proto(Some(&bad)), Err(ReferenceError::BadDigest { .. })));
        for name in ["Acme/qwen", "acme//qwen", "-acme", "acme/qwen-", "../x", "a..b"] {
            assert!(!valid_repository(name), "{name}");
        }
        for name in ["acme", "acme/qwen", "a__b", "a--b/c.d", "a_b"] {
            assert!(valid_repository(name), "{name}");
        }
    }
}
