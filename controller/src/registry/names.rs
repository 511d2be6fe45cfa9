//! The distribution spec's grammars: repository names, tags, and manifest references (tag or digest).

use alki_shared::digest::{Digest, DigestError};

/// Longest repository name accepted; clients commonly limit `host/name` to 255 characters.
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag the spec's grammar allows.
pub const MAX_TAG_LEN: usize = 128;

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most [`MAX_NAME_LEN`] bytes.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.split('/').all(is_valid_component)
}

/// One path component: alphanumeric runs joined by `.`, `_`, `__` or any number of `-`.
fn is_valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let run = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && alnum(bytes[*i]) {
            *i += 1;
        }
        *i > start
    };
    if !run(&mut i) {
        return false;
    }
    while i < bytes.len() {
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if !run(&mut i) {
            return false;
        }
    }
    true
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    let Some((&first, rest)) = bytes.split_first() else {
        return false;
    };
    bytes.len() <= MAX_TAG_LEN
        && (first.is_ascii_alphanumeric() || first == b'_')
        && rest.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The `<reference>` of a manifest URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("tag {0:?} does not match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    Tag(String),
}

impl Reference {
    /// A reference with a `:` is a digest; anything else must be a valid tag.
    pub fn parse(reference: &str) -> Result<Reference, ReferenceError> {
        if reference.contains(':') {
            return Ok(Reference::Digest(reference.parse()?));
        }
        if is_valid_tag(reference) {
            Ok(Reference::Tag(reference.to_owned()))
        } else {
            Err(ReferenceError::Tag(reference.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec_grammar() {
        for good in ["a", "acme/models/qwen", "a.b", "a_b", "a__b", "a---b", "0/1/2", "foo-bar.baz_qux/x9"] {
            assert!(is_valid_name(good), "{good} should be valid");
        }
        for bad in ["", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a.", "_a", "a b", "a:b", "é"] {
            assert!(!is_valid_name(bad), "{bad} should be invalid");
        }
        assert!(!is_valid_name(&"a".repeat(MAX_NAME_LEN + 1)));
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        for good in ["latest", "v1.0", "_x", "Q4_K_M", "sha256-abc.sig", &"a".repeat(128)] {
            assert!(is_valid_tag(good), "{good} should be valid");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(!is_valid_tag(bad), "{bad} should be invalid");
        }
    }

    #[test]
    fn references_are_tags_or_digests() {
        let d = Digest::of(b"x");
        assert_eq!(Reference::parse(d.as_str()), Ok(Reference::Digest(d)));
        assert_eq!(Reference::parse("v1"), Ok(Reference::Tag("v1".into())));
        assert!(matches!(Reference::parse("sha256:zz"), Err(ReferenceError::Digest(_))));
        assert!(matches!(Reference::parse("-bad"), Err(ReferenceError::Tag(_))));
    }
}
