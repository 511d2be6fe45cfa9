//! The runtime build extractor (alki_agent::pull::extract::extract) on arbitrary bytes, into an empty
//! directory inside a scratch root that also holds a sentinel directory. Whatever the archive says, nothing
//! may appear, change or disappear outside the destination; inside it there are only directories, regular
//! files without setuid/setgid/sticky or group/world write bits, and symbolic links whose target is relative
//! and only goes down; and nothing inside resolves to a path outside it.

#![no_main]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path};

use alki_agent::pull::extract::extract;
use libfuzzer_sys::fuzz_target;

const SENTINEL: &[u8] = b"outside the destination";

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("list a scratch directory")
        .map(|e| e.expect("a scratch directory entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Checks every entry below `dir` (inside `dest`, whose canonical path is `dest_real`).
fn check_inside(dir: &Path, dest_real: &Path) {
    for entry in std::fs::read_dir(dir).expect("list an extracted directory") {
        let path = entry.expect("an extracted entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("stat an extracted entry");
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = std::fs::read_link(&path).expect("read an extracted link");
            assert!(
                !target.as_os_str().is_empty() && target.components().all(|c| matches!(c, Component::Normal(_))),
                "link {} -> {} leaves its directory",
                path.display(),
                target.display()
            );
        } else if kind.is_dir() {
            check_inside(&path, dest_real);
        } else {
            assert!(kind.is_file(), "{} is neither a file, a directory nor a link", path.display());
            let mode = meta.permissions().mode() & 0o7777;
            assert_eq!(mode & 0o7022, 0, "{} has mode {mode:o}", path.display());
        }
        // A link chain that resolves at all resolves inside the destination.
        if let Ok(real) = std::fs::canonicalize(&path) {
            assert!(real.starts_with(dest_real), "{} resolves to {}", path.display(), real.display());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let root = tempfile::tempdir().expect("a scratch directory");
    let dest = root.path().join("dest");
    let outside = root.path().join("outside");
    std::fs::create_dir(&dest).expect("create dest");
    std::fs::create_dir(&outside).expect("create outside");
    std::fs::write(outside.join("sentinel"), SENTINEL).expect("write the sentinel");

    let _ = extract(data, &dest);

    assert_eq!(names(root.path()), BTreeSet::from(["dest".to_owned(), "outside".to_owned()]), "beside dest");
    assert_eq!(names(&outside), BTreeSet::from(["sentinel".to_owned()]), "in the sentinel directory");
    assert_eq!(std::fs::read(outside.join("sentinel")).expect("read the sentinel"), SENTINEL);
    let dest_real = std::fs::canonicalize(&dest).expect("canonical dest");
    check_inside(&dest, &dest_real);
});
