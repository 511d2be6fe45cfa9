//! Bundle references as people write them and as alkictl prints them: `[REGISTRY/]REPOSITORY[:TAG]` or
//! `[REGISTRY/]REPOSITORY[:TAG]@sha256:<hex>`. Every reference the tooling prints (a push's
//! `registry/repository:tag`, a signature's `registry/repository@digest`, a device's or rollout's
//! `repository@digest`, a runtime build's pinned reference) is built here and parses back here.

use std::fmt;
use std::str::FromStr;

use alki_shared::bundle::is_registry_host;
use alki_shared::digest::Digest;

/// The tag a reference without one means.
pub const DEFAULT_TAG: &str = "latest";

/// A bundle (or runtime build) in a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleRef {
    /// `host[:port]` when the reference names its registry.
    pub registry: Option<String>,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// Why a text is not a bundle reference; the message says how to write one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a bundle reference: {problem}; write [REGISTRY/]REPOSITORY[:TAG] or [REGISTRY/]REPOSITORY@sha256:<64 hex digits>"
)]
pub struct ReferenceError {
    pub text: String,
    pub problem: String,
}

impl BundleRef {
    /// `[registry/]repository:tag`.
    pub fn tagged(registry: Option<&str>, repository: &str, tag: &str) -> BundleRef {
        BundleRef {
            registry: registry.map(str::to_owned),
            repository: repository.to_owned(),
            tag: Some(tag.to_owned()),
            digest: None,
        }
    }

    /// `[registry/]repository@digest`.
    pub fn pinned(registry: Option<&str>, repository: &str, digest: &Digest) -> BundleRef {
        BundleRef {
            registry: registry.map(str::to_owned),
            repository: repository.to_owned(),
            tag: None,
            digest: Some(digest.clone()),
        }
    }

    /// What to ask a registry for: the digest when the reference has one, else the tag (`latest` if none).
    pub fn tag_or_digest(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }

    /// The reference's registry, else `default`.
    pub fn registry_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.registry.as_deref().unwrap_or(default)
    }
}

impl fmt::Display for BundleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(registry) = &self.registry {
            write!(f, "{registry}/")?;
        }
        f.write_str(&self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for BundleRef {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<BundleRef, ReferenceError> {
        let refuse = |problem: String| ReferenceError { text: text.to_owned(), problem };
        let (name, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(parse_digest(digest).map_err(refuse)?)),
            None => (text, None),
        };
        let (registry, rest) = match name.split_once('/') {
            Some((first, rest)) if is_registry_host(first) => (Some(first.to_owned()), rest),
            _ => (None, name),
        };
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => (repository, Some(tag.to_owned())),
            _ => (rest, None),
        };
        check_repository(repository).map_err(refuse)?;
        if let Some(tag) = &tag {
            check_tag(tag).map_err(refuse)?;
        }
        Ok(BundleRef { registry, repository: repository.to_owned(), tag, digest })
    }
}

fn parse_digest(text: &str) -> Result<Digest, String> {
    text.parse().map_err(|_| {
        if text.len() < 64 && text.trim_start_matches("sha256:").bytes().all(|b| b.is_ascii_hexdigit()) {
            format!("{text} is a shortened digest (as tables show it); give all 64 hex digits (`-o json` prints them)")
        } else {
            format!("{text} is not a sha256 digest")
        }
    })
}

/// The distribution spec's repository grammar: lowercase components of letters and digits joined by `.`,
/// `_`, `__` or dashes, separated by `/`.
fn check_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("it names no repository".into());
    }
    for component in repository.split('/') {
        if !valid_component(component) {
            return Err(format!(
                "repository component {component:?} is not lowercase letters and digits joined by '.', '_' or '-'"
            ));
        }
    }
    Ok(())
}

fn valid_component(component: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let (Some(first), Some(last)) = (component.chars().next(), component.chars().last()) else { return false };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    component
        .split(alnum)
        .filter(|separator| !separator.is_empty())
        .all(|separator| matches!(separator, "." | "_" | "__") || separator.chars().all(|c| c == '-'))
}

/// The distribution spec's tag grammar: up to 128 of letters, digits, `_`, `.` and `-`, not starting with
/// `.` or `-`.
fn check_tag(tag: &str) -> Result<(), String> {
    let valid = tag.len() <= 128
        && tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid { Ok(()) } else { Err(format!("tag {tag:?} is not letters, digits, '_', '.' and '-' (at most 128)")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        Digest::of(b"bundle")
    }

    #[test]
    fn the_forms_people_write_parse() {
        let r: BundleRef = "127.0.0.1:7080/acme/gemma:v1".parse().expect("push's form");
        assert_eq!(r, BundleRef::tagged(Some("127.0.0.1:7080"), "acme/gemma", "v1"));
        let r: BundleRef = "acme/gemma".parse().expect("bare");
        assert_eq!((r.registry, r.tag, r.digest, r.repository.as_str()), (None, None, None, "acme/gemma"));
        let r: BundleRef = format!("localhost/acme/gemma@{}", digest()).parse().expect("pinned");
        assert_eq!((r.registry.as_deref(), r.tag_or_digest()), (Some("localhost"), digest().to_string()));
        let r: BundleRef = format!("registry.example.com/a/b:v2@{}", digest()).parse().expect("tag and digest");
        assert_eq!((r.tag.as_deref(), r.tag_or_digest()), (Some("v2"), digest().to_string()), "the digest wins");
        assert_eq!("acme/gemma".parse::<BundleRef>().expect("bare").tag_or_digest(), "latest");
    }

    #[test]
    fn what_is_printed_parses_back_to_the_same_reference() {
        let printed = [
            BundleRef::tagged(Some("127.0.0.1:7080"), "acme/gemma", "v1"),
            BundleRef::tagged(None, "acme/gemma", "v1"),
            BundleRef::pinned(Some("127.0.0.1:7080"), "acme/gemma", &digest()),
            BundleRef::pinned(None, "acme/gemma", &digest()),
            BundleRef::pinned(Some("registry.example.com"), "team/llama-server", &digest()),
        ];
        for r in printed {
            assert_eq!(r.to_string().parse::<BundleRef>().as_ref(), Ok(&r), "{r}");
        }
        // The wire's own display (devices, rollouts) of the embedded and of an external registry.
        for registry in ["", "127.0.0.1:5000"] {
            let wire = alki_shared::proto::BundleRef {
                registry: registry.into(),
                repository: "acme/gemma".into(),
                digest: digest().to_string(),
                tag: "v1".into(),
            };
            let r: BundleRef = wire.display().parse().expect("wire display");
            assert_eq!((r.registry.unwrap_or_default(), r.digest), (registry.to_owned(), Some(digest())));
        }
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        let problem = |text: &str| text.parse::<BundleRef>().expect_err(text).to_string();
        assert!(problem("Acme/Gemma:v1").contains("lowercase"));
        assert!(problem("acme/gemma@ab12cd34ef56").contains("shortened digest"));
        assert!(problem("acme/gemma@sha256:zz").contains("not a sha256 digest"));
        assert!(problem("acme/gemma:-v1").contains("tag"));
        assert!(problem("127.0.0.1:7080/").contains("no repository"));
        assert!(problem("acme//gemma").contains("component"));
        assert!(problem("acme/ge..mma").contains("component"));
    }
}
