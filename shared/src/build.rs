//! What a binary was built from, for `--version` and the agent's inventory: the workspace version, the
//! commit (`ALKI_GIT_COMMIT` at build time, as `deploy/release/build.sh` sets it; "unknown" otherwise) and
//! the target triple.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("ALKI_GIT_COMMIT");
pub const TARGET: &str = env!("ALKI_TARGET");
/// `0.1.0 (commit 1a2b3c4, aarch64-unknown-linux-gnu)`.
pub const LONG_VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ALKI_GIT_COMMIT"), ", ", env!("ALKI_TARGET"), ")");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_version_names_the_version_the_commit_and_the_target() {
        assert!(LONG_VERSION.starts_with(VERSION));
        assert!(LONG_VERSION.contains(&format!("commit {COMMIT}, {TARGET})")), "{LONG_VERSION}");
        assert!(TARGET.contains("linux"), "{TARGET}");
    }
}
