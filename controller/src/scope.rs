//! Which repositories of the embedded registry a caller may touch. Operators and admins: every one. Push
//! tokens: the repository patterns given when they were made (`alkictl token create --role push --repo
//! 'acme/*'`). Enrolled devices: their own repositories, those of the bundles and eval suites assigned,
//! running, staged or used as a baseline on that device and of the runtime builds those bundles name.
//! Pure: the device's repositories are read by the caller (`registry::access`).

use std::collections::BTreeSet;

use alki_shared::proto;

/// Longest pattern, and most patterns, one token may carry.
pub const MAX_PATTERN: usize = 256;
pub const MAX_PATTERNS: usize = 32;

/// A repository pattern: an exact name (`acme/qwen`), everything under a prefix (`acme/*`), or `*`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct RepoPattern(String);

/// Why a pattern was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PatternError {
    #[error("a push token needs --repo PATTERN (e.g. 'acme/*', or '*' for every repository)")]
    Missing,
    #[error("at most {MAX_PATTERNS} repository patterns per token")]
    TooMany,
    #[error(
        "repository pattern {0:?}: use a repository name (acme/qwen), a prefix ending in /* (acme/*), or *; \
         lowercase letters, digits, '.', '_', '-' and '/'"
    )]
    Invalid(String),
}

impl RepoPattern {
    pub fn parse(pattern: &str) -> Result<RepoPattern, PatternError> {
        let name = pattern.strip_suffix("/*").unwrap_or(pattern);
        let valid_name = !name.is_empty()
            && name.len() <= MAX_PATTERN
            && name.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
            });
        if pattern == "*" || valid_name {
            Ok(RepoPattern(pattern.to_owned()))
        } else {
            Err(PatternError::Invalid(pattern.chars().take(MAX_PATTERN).collect()))
        }
    }

    /// Patterns for a new token of `role`: push tokens need at least one; other roles take none.
    pub fn parse_all(patterns: &[String], push: bool) -> Result<Vec<RepoPattern>, PatternError> {
        if patterns.len() > MAX_PATTERNS {
            return Err(PatternError::TooMany);
        }
        if push && patterns.is_empty() {
            return Err(PatternError::Missing);
        }
        patterns.iter().map(|p| RepoPattern::parse(p)).collect()
    }

    pub fn matches(&self, repository: &str) -> bool {
        match self.0.strip_suffix("/*") {
            _ if self.0 == "*" => true,
            Some(prefix) => repository.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/')),
            None => self.0 == repository,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a caller may reach in the embedded registry.
#[derive(Clone, Debug, PartialEq)]
pub enum RepoScope {
    Every,
    /// A push token's patterns.
    Patterns(Vec<RepoPattern>),
    /// An enrolled device's own repositories.
    Device(BTreeSet<String>),
}

impl RepoScope {
    pub fn allows(&self, repository: &str) -> bool {
        match self {
            RepoScope::Every => true,
            RepoScope::Patterns(patterns) => patterns.iter().any(|p| p.matches(repository)),
            RepoScope::Device(repositories) => repositories.contains(repository),
        }
    }
}

/// Most bundles a device record remembers from operators' commands.
pub const MAX_COMMANDED: usize = 16;

/// The embedded registry's bundles a device has to do with: assigned, running, staged, being pre-staged,
/// its eval suite and baseline, and those operators' commands named. (A bundle of an external registry
/// names a repository there; allowing that name here gives nothing the device was not given.)
pub fn device_bundles(device: &proto::Device) -> Vec<&proto::BundleRef> {
    let prestage = device.prestage.as_ref().and_then(|p| p.bundle.as_ref());
    [device.desired.as_ref(), device.running.as_ref(), prestage, device.desired_eval_suite.as_ref()]
        .into_iter()
        .flatten()
        .chain(device.desired_eval_baseline.as_ref())
        .chain(device.staged.iter())
        .chain(device.commanded.iter())
        .collect()
}

/// Remembers that a command named `bundles` for `device` (the newest [`MAX_COMMANDED`] are kept).
pub fn remember_commanded<'a>(device: &mut proto::Device, bundles: impl IntoIterator<Item = &'a proto::BundleRef>) {
    for bundle in bundles {
        device.commanded.retain(|b| b.digest != bundle.digest || b.repository != bundle.repository);
        device.commanded.push(bundle.clone());
    }
    let excess = device.commanded.len().saturating_sub(MAX_COMMANDED);
    device.commanded.drain(..excess);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_prefixes() {
        let acme = RepoPattern::parse("acme/*").expect("prefix");
        assert!(acme.matches("acme/qwen") && acme.matches("acme/team/qwen"));
        assert!(!acme.matches("acme") && !acme.matches("acmeco/qwen") && !acme.matches("other/acme/x"));
        let exact = RepoPattern::parse("acme/qwen").expect("name");
        assert!(exact.matches("acme/qwen") && !exact.matches("acme/qwen2"));
        assert!(RepoPattern::parse("*").expect("all").matches("anything/at/all"));
        for bad in ["", "acme/", "Acme/x", "a//b", "acme/*/x", "a b", "*/x"] {
            assert!(RepoPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(RepoPattern::parse_all(&[], true), Err(PatternError::Missing));
        assert_eq!(RepoPattern::parse_all(&[], false), Ok(vec![]));
    }

    #[test]
    fn a_device_reaches_only_its_own_repositories() {
        let scope = RepoScope::Device(BTreeSet::from(["acme/tiny".to_owned()]));
        assert!(scope.allows("acme/tiny") && !scope.allows("acme/secret"));
        let bundle = |repo: &str| proto::BundleRef { repository: repo.into(), ..Default::default() };
        let device = proto::Device {
            desired: Some(bundle("a/desired")),
            staged: vec![bundle("a/staged")],
            desired_eval_suite: Some(bundle("a/evals")),
            ..Default::default()
        };
        let repos: Vec<&str> = device_bundles(&device).iter().map(|b| b.repository.as_str()).collect();
        assert_eq!(repos, ["a/desired", "a/evals", "a/staged"]);
    }
}
