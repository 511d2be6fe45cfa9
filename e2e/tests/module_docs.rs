//! Every `.rs` file of every crate in the workspace (sources, tests, examples, build scripts) starts with a
//! `//!` line saying what it owns.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The workspace's members, from the root Cargo.toml's `members = [...]`.
fn members(root: &Path) -> Vec<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
    let list = manifest.split_once("members = [").and_then(|(_, rest)| rest.split_once(']')).expect("members list");
    list.0.split(',').map(|m| m.trim().trim_matches('"').to_owned()).filter(|m| !m.is_empty()).collect()
}

#[test]
fn every_file_of_every_crate_says_what_it_owns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let members = members(root);
    for crate_dir in ["shared", "bundle", "controller", "alkictl", "agent", "e2e"] {
        assert!(members.iter().any(|m| m == crate_dir), "{crate_dir} is a member: {members:?}");
    }
    let mut missing = Vec::new();
    for member in &members {
        let dir = root.join(member);
        let mut files = Vec::new();
        for part in ["src", "tests", "examples", "benches"] {
            rust_files(&dir.join(part), &mut files);
        }
        if dir.join("build.rs").is_file() {
            files.push(dir.join("build.rs"));
        }
        assert!(!files.is_empty(), "found {member}'s sources");
        missing.extend(files.into_iter().filter(|f| !std::fs::read_to_string(f).expect("read").starts_with("//! ")));
    }
    assert!(missing.is_empty(), "files without a leading //! line: {missing:?}");
}
