//! Runtime builds on disk: a build's tar layer extracted safely into `<builds_dir>/<layer hex>/` (no absolute
//! paths, `..`, escaping or hard links, device files, writes through links; temp dir, fsync, rename), the
//! `llama-server` found in it, and extracted builds no deployment uses removed.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use alki_shared::bundle::RUNTIME_BUILD_SERVER;
use alki_shared::digest::Digest;

use super::error::{ArchiveProblem, PullError};

/// Entries in one build's archive; llama.cpp's has about twenty.
const MAX_ENTRIES: usize = 10_000;
/// A build directory this recent is never pruned: a pull in progress may be about to start it.
const PRUNE_GRACE: Duration = Duration::from_secs(3600);

/// Extraction failed: the archive is hostile or broken, or the disk refused (made a [`PullError`] by
/// [`install`], which knows the layer and the directory).
// pub for the fuzz target fuzz/fuzz_targets/extract.rs, which calls [`extract`].
#[derive(Debug)]
pub enum ExtractError {
    Archive(ArchiveProblem),
    Io(std::io::Error),
}

impl From<std::io::Error> for ExtractError {
    fn from(e: std::io::Error) -> Self {
        ExtractError::Io(e)
    }
}

/// The path of an archive entry as plain components below the build directory.
fn plain_path(raw: &Path) -> Result<PathBuf, ArchiveProblem> {
    let shown = raw.display().to_string();
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(ArchiveProblem::Traversal(shown)),
            Component::RootDir | Component::Prefix(_) => return Err(ArchiveProblem::Absolute(shown)),
        }
    }
    if out.as_os_str().is_empty() { Err(ArchiveProblem::BadPath(shown)) } else { Ok(out) }
}

/// A symbolic link target is accepted when it is relative and only goes down from the link's directory: then
/// no chain of links can resolve outside the build directory.
fn link_goes_down(target: &Path) -> bool {
    !target.as_os_str().is_empty() && target.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Extracts a build archive into `dest` (an existing empty directory), refusing absolute paths, `..`, links
/// that leave their directory, hard links, device files and anything written through a link; every file and
/// directory is fsynced. Modes keep only the owner's bits and read/execute for others (no setuid, no
/// group/world write). Returns the entries extracted.
// pub for the fuzz target fuzz/fuzz_targets/extract.rs, which extracts into a temporary directory.
pub fn extract(archive: impl Read, dest: &Path) -> Result<usize, ExtractError> {
    let mut archive = tar::Archive::new(archive);
    let mut dirs = vec![dest.to_owned()];
    let mut count = 0usize;
    for entry in archive.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(ExtractError::Archive(ArchiveProblem::TooMany(MAX_ENTRIES)));
        }
        let raw = entry.path().map_err(malformed)?.into_owned();
        let rel = plain_path(&raw).map_err(ExtractError::Archive)?;
        make_parents(dest, &rel, &mut dirs)?;
        write_entry(&mut entry, dest, &rel, &mut dirs)?;
    }
    for dir in dirs.iter().rev() {
        alki_shared::fsutil::sync_dir(dir)?;
    }
    Ok(count)
}

fn malformed(e: std::io::Error) -> ExtractError {
    ExtractError::Archive(ArchiveProblem::Malformed(e.to_string()))
}

/// Makes every parent of `rel` a real directory inside `dest` (created when missing, added to `dirs`), never
/// a link.
fn make_parents(dest: &Path, rel: &Path, dirs: &mut Vec<PathBuf>) -> Result<(), ExtractError> {
    let mut at = dest.to_owned();
    let parents: Vec<_> = rel.parent().map(|p| p.components().collect()).unwrap_or_default();
    for part in parents {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(ExtractError::Archive(ArchiveProblem::ThroughLink(rel.display().to_string()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at)?;
                dirs.push(at.clone());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes one entry at `dest/rel`: a directory (added to `dirs`), a regular file with safe modes, or a link
/// that stays inside its directory; anything else is refused.
fn write_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dest: &Path,
    rel: &Path,
    dirs: &mut Vec<PathBuf>,
) -> Result<(), ExtractError> {
    let shown = rel.display().to_string();
    let target = dest.join(rel);
    let existing = std::fs::symlink_metadata(&target).ok();
    match entry.header().entry_type() {
        tar::EntryType::Directory => match existing {
            Some(meta) if meta.is_dir() => {}
            Some(_) => return Err(ExtractError::Archive(ArchiveProblem::ThroughLink(shown))),
            None => {
                std::fs::create_dir(&target)?;
                dirs.push(target);
            }
        },
        _ if existing.is_some() => return Err(ExtractError::Archive(ArchiveProblem::Duplicate(shown))),
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let mode = entry.header().mode().map_err(malformed)? & 0o755;
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&target)?;
            std::io::copy(entry, &mut file)?;
            file.set_permissions(std::fs::Permissions::from_mode(mode | 0o400))?;
            file.sync_all()?;
        }
        tar::EntryType::Symlink => {
            let link = entry.link_name().map_err(malformed)?.map(|l| l.into_owned()).unwrap_or_default();
            if !link_goes_down(&link) {
                let target = link.display().to_string();
                return Err(ExtractError::Archive(ArchiveProblem::LinkEscapes { path: shown, target }));
            }
            std::os::unix::fs::symlink(&link, &target)?;
        }
        tar::EntryType::Link => return Err(ExtractError::Archive(ArchiveProblem::HardLink(shown))),
        other => {
            let kind = match other {
                tar::EntryType::Char => "character device".to_owned(),
                tar::EntryType::Block => "block device".to_owned(),
                tar::EntryType::Fifo => "named pipe".to_owned(),
                other => format!("{other:?} entry"),
            };
            return Err(ExtractError::Archive(ArchiveProblem::Special { path: shown, kind }));
        }
    }
    Ok(())
}

/// The build's server in `dir` when it is an executable regular file (a link to one inside `dir` counts).
pub fn server_in(dir: &Path) -> Option<PathBuf> {
    let server = dir.join(RUNTIME_BUILD_SERVER);
    let meta = std::fs::metadata(&server).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(server)
}

/// Extracts the stored layer at `blob` into `<builds_dir>/<layer hex>/` atomically: into a temporary
/// directory beside it, fsynced, checked for `llama-server`, then renamed. An existing directory (an earlier
/// extraction, complete since it was renamed into place) is reused.
pub fn install(blob: &Path, builds_dir: &Path, layer: &Digest) -> Result<PathBuf, PullError> {
    match install_layer(blob, builds_dir, layer) {
        Ok(server) => Ok(server),
        Err(ExtractError::Archive(problem)) => Err(PullError::Archive { layer: layer.clone(), problem }),
        Err(ExtractError::Io(source)) => Err(PullError::Extract { dir: builds_dir.join(layer.hex()), source }),
    }
}

fn install_layer(blob: &Path, builds_dir: &Path, layer: &Digest) -> Result<PathBuf, ExtractError> {
    let dir = builds_dir.join(layer.hex());
    if let Some(server) = server_in(&dir) {
        return Ok(server);
    }
    std::fs::create_dir_all(builds_dir)?;
    if dir.exists() {
        // Not a complete build (it was renamed into place, so someone changed it): extract it again.
        std::fs::remove_dir_all(&dir)?;
    }
    let tmp = tempfile::Builder::new().prefix(&format!(".tmp-{}-", layer.hex())).tempdir_in(builds_dir)?;
    let file = std::fs::File::open(blob)?;
    extract(std::io::BufReader::with_capacity(1 << 20, file), tmp.path())?;
    if server_in(tmp.path()).is_none() {
        return Err(ExtractError::Archive(ArchiveProblem::NoServer));
    }
    let tmp = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    alki_shared::fsutil::sync_dir(builds_dir)?;
    server_in(&dir).ok_or(ExtractError::Archive(ArchiveProblem::NoServer))
}

/// Removes extracted builds whose layer is not in `keep` (the blobs of the active and previous deployments),
/// and leftovers of interrupted extractions; directories changed within [`PRUNE_GRACE`] stay (a pull in
/// progress may be about to start one). Best effort.
pub async fn prune(builds_dir: &Path, keep: &HashSet<Digest>) {
    let Ok(mut entries) = tokio::fs::read_dir(builds_dir).await else { return };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        let hex = name.strip_prefix(".tmp-").and_then(|r| r.split('-').next()).unwrap_or(&name);
        if keep.iter().any(|d| d.hex() == hex) {
            continue;
        }
        let recent = entry
            .metadata()
            .await
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < PRUNE_GRACE);
        if recent {
            continue;
        }
        match tokio::fs::remove_dir_all(entry.path()).await {
            Ok(()) => tracing::info!(dir = %entry.path().display(), "Removed an unused runtime build."),
            Err(e) => {
                tracing::warn!(dir = %entry.path().display(), error = %e, "Cannot remove an unused runtime build.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archive built entry by entry, with whatever paths and types a hostile packer writes.
    fn archive(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, data, link) in entries {
            let mut header = tar::Header::new_gnu();
            // Raw name bytes: `set_path` itself refuses `..` and absolute paths.
            let name = path.as_bytes();
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o4755);
            if let Some(link) = link {
                let l = link.as_bytes();
                header.as_old_mut().linkname[..l.len()].copy_from_slice(l);
            }
            header.set_cksum();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};

    #[tokio::test]
    async fn prune_keeps_the_builds_kept_and_recent_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layer = Digest::of(b"tar bytes");
        let builds = dir.path().join("builds");
        let old = std::time::SystemTime::now() - 2 * PRUNE_GRACE;
        for name in [layer.hex().to_owned(), "f".repeat(64), "e".repeat(64)] {
            std::fs::create_dir_all(builds.join(&name)).expect("mkdir");
            if name != "e".repeat(64) {
                std::fs::File::open(builds.join(&name)).expect("open").set_modified(old).expect("age it");
            }
        }
        prune(&builds, &[layer.clone(), Digest::of(b"config")].into()).await;
        let mut left: Vec<String> = std::fs::read_dir(&builds)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["e".repeat(64), layer.hex().to_owned()], "kept, and recent (a pull may start it): stay");
    }

    #[test]
    fn a_good_build_extracts_with_links_and_safe_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = archive(&[
            ("llama-server", Regular, b"#!/bin/sh\n", None),
            ("lib", Directory, b"", None),
            ("lib/libllama.so.0", Regular, b"ELF", None),
            ("libllama.so", Symlink, b"", Some("lib/libllama.so.0")),
            ("./sub/deeper/x", Regular, b"x", None),
        ]);
        let blob = dir.path().join("blob");
        std::fs::write(&blob, &bytes).expect("write");
        let layer = Digest::of(&bytes);
        let server = install(&blob, &dir.path().join("builds"), &layer).expect("install");
        assert_eq!(server, dir.path().join("builds").join(layer.hex()).join("llama-server"));
        let mode = std::fs::metadata(&server).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "setuid dropped");
        assert_eq!(std::fs::read(server.with_file_name("libllama.so")).expect("through link"), b"ELF");
        // Installed once: a second call reuses it.
        assert_eq!(install(&blob, &dir.path().join("builds"), &layer).expect("again"), server);
    }

    #[test]
    fn hostile_archives_are_refused_and_leave_nothing() {
        type Case = (&'static str, Vec<u8>, fn(&ArchiveProblem) -> bool);
        let cases: Vec<Case> = vec![
            ("absolute", archive(&[("/etc/evil", Regular, b"x", None)]), |p| matches!(p, ArchiveProblem::Absolute(_))),
            ("dotdot", archive(&[("../evil", Regular, b"x", None)]), |p| matches!(p, ArchiveProblem::Traversal(_))),
            ("inner dotdot", archive(&[("a/../../evil", Regular, b"x", None)]), |p| {
                matches!(p, ArchiveProblem::Traversal(_))
            }),
            ("absolute link", archive(&[("l", Symlink, b"", Some("/etc"))]), |p| {
                matches!(p, ArchiveProblem::LinkEscapes { .. })
            }),
            ("link up", archive(&[("l", Symlink, b"", Some("../outside"))]), |p| {
                matches!(p, ArchiveProblem::LinkEscapes { .. })
            }),
            (
                "write through a link",
                archive(&[
                    ("d", Symlink, b"", Some("sub")),
                    ("sub", Directory, b"", None),
                    ("d/x", Regular, b"x", None),
                ]),
                |p| matches!(p, ArchiveProblem::ThroughLink(_)),
            ),
            ("hard link", archive(&[("h", Link, b"", Some("/etc/shadow"))]), |p| {
                matches!(p, ArchiveProblem::HardLink(_))
            }),
            ("char device", archive(&[("c", Char, b"", None)]), |p| matches!(p, ArchiveProblem::Special { .. })),
            ("block device", archive(&[("b", Block, b"", None)]), |p| matches!(p, ArchiveProblem::Special { .. })),
            ("fifo", archive(&[("f", Fifo, b"", None)]), |p| matches!(p, ArchiveProblem::Special { .. })),
            (
                "duplicate",
                archive(&[("llama-server", Regular, b"a", None), ("llama-server", Regular, b"b", None)]),
                |p| matches!(p, ArchiveProblem::Duplicate(_)),
            ),
            ("no server", archive(&[("README", Regular, b"x", None)]), |p| matches!(p, ArchiveProblem::NoServer)),
            ("not executable", archive(&[("llama-server", Regular, b"x", None)]), |p| {
                matches!(p, ArchiveProblem::NoServer)
            }),
        ];
        for (name, bytes, expected) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let blob = dir.path().join("blob");
            let mut bytes = bytes;
            if name == "not executable" {
                // Mode 0o644 in the one header.
                let mut h = tar::Header::from_byte_slice(&bytes[..512]).clone();
                h.set_mode(0o644);
                h.set_cksum();
                bytes[..512].copy_from_slice(h.as_bytes());
            }
            std::fs::write(&blob, &bytes).expect("write");
            let builds = dir.path().join("builds");
            match install(&blob, &builds, &Digest::of(&bytes)) {
                Err(PullError::Archive { problem, .. }) => assert!(expected(&problem), "{name}: {problem}"),
                Err(e) => panic!("{name}: not a refusal of the archive: {e}"),
                Ok(path) => panic!("{name}: accepted as {}", path.display()),
            }
            let left: Vec<_> = std::fs::read_dir(&builds).expect("builds dir").collect();
            assert!(left.is_empty(), "{name}: nothing left behind");
            assert!(!dir.path().join("evil").exists() && !Path::new("/etc/evil").exists(), "{name}");
        }
    }
}
