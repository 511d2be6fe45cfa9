//! Packing llama.cpp builds as a runtime build (`alkictl runtime push`): a directory with `llama-server` and
//! the shared libraries beside it, per platform, becomes an OCI image index with one manifest per platform
//! carrying one deterministic tar layer, pushed like a bundle ([`crate::push`]). Bundles name it by digest
//! (`bundle pack --runtime-build`).

use std::io::Write;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use alki_shared::bundle::{
    ANNOTATION_ACCELERATOR, ANNOTATION_CPU_FEATURES, ARTIFACT_TYPE_RUNTIME_BUILD, CPU_FEATURES,
    MEDIA_TYPE_RUNTIME_BUILD_CONFIG, MEDIA_TYPE_RUNTIME_BUILD_TAR, RUNTIME_BUILD_SERVER, RuntimeBuildConfig,
    oci_architecture, runtime_platform_label,
};
use alki_shared::digest::{Digest, Hasher};
use alki_shared::oci::{
    ANNOTATION_TITLE, Descriptor, ImageIndex, ImageManifest, MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST,
    Platform,
};
use serde::Serialize;

use crate::error::{Error, IoContext as _, Result, refuse};
use crate::layout::Layout;
use crate::progress::Progress;

/// Accelerators a build may be made for.
pub const ACCELERATORS: [&str; 2] = ["cpu", "cuda"];

/// One `--platform OS/ARCH[/VARIANT][/ACCELERATOR][+FEATURE...]=DIR`.
#[derive(Clone, Debug, PartialEq)]
pub struct PlatformBuild {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub accelerator: String,
    /// CPU features the build needs (`/proc/cpuinfo` names, sorted); empty for the architecture's baseline.
    pub cpu_features: Vec<String>,
    pub dir: PathBuf,
}

impl PlatformBuild {
    /// `linux/amd64`, `linux/arm64/cuda`, `linux/arm/v7`, `linux/arm64+asimddp+asimdhp` (a last segment `cpu`
    /// or `cuda` is the accelerator, any other third segment the OCI platform variant, `+` names features).
    pub fn label(&self) -> String {
        runtime_platform_label(
            &self.os,
            &self.architecture,
            self.variant.as_deref(),
            &self.accelerator,
            &self.cpu_features,
        )
    }
}

/// Parses `OS/ARCH[/VARIANT][/ACCELERATOR][+FEATURE...]=DIR`.
pub fn parse_platform(arg: &str) -> Result<PlatformBuild> {
    let usage = "write --platform OS/ARCH[/VARIANT][/cpu|cuda][+FEATURE...]=DIR, e.g. linux/amd64=build/bin, \
                 linux/arm64+asimddp+asimdhp=pi5/bin or linux/arm64/cuda=jetson/bin";
    let Some((platform, dir)) = arg.split_once('=') else { refuse!("--platform {arg:?} names no directory; {usage}") };
    let (platform, cpu_features) = match platform.split_once('+') {
        Some((platform, features)) => (platform, parse_features(features)?),
        None => (platform, Vec::new()),
    };
    let mut parts: Vec<&str> = platform.split('/').collect();
    let accelerator = match parts.last() {
        Some(last) if parts.len() > 2 && ACCELERATORS.contains(last) => {
            let a = last.to_string();
            parts.pop();
            a
        }
        _ => "cpu".to_owned(),
    };
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let (os, architecture, variant) = match parts.as_slice() {
        [os, arch] if valid(os) && valid(arch) => (os, arch, None),
        [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => (os, arch, Some(variant.to_string())),
        _ => refuse!("--platform {platform:?} is not a platform; {usage}"),
    };
    if dir.is_empty() {
        refuse!("--platform {arg:?} names no directory; {usage}");
    }
    Ok(PlatformBuild {
        os: os.to_string(),
        architecture: architecture.to_string(),
        variant,
        accelerator,
        cpu_features,
        dir: PathBuf::from(dir),
    })
}

/// `asimddp+asimdhp` → sorted, each one of the features the agent reports (a misspelt one would make a build
/// no device ever chooses).
fn parse_features(features: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = features.split('+').map(str::to_owned).collect();
    for feature in &out {
        if !CPU_FEATURES.contains(&feature.as_str()) {
            let hint = match feature.as_str() {
                "dotprod" => " (dotprod is asimddp in /proc/cpuinfo)",
                "fp16" => " (fp16 arithmetic is asimdhp in /proc/cpuinfo)",
                _ => "",
            };
            refuse!(
                "--platform names the CPU feature {feature:?}{hint}, which the agent does not report; name \
                 features as /proc/cpuinfo does, one of: {}",
                CPU_FEATURES.join(", ")
            );
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// One platform's build as packed, for the table or `-o json`.
#[derive(Debug, Serialize)]
pub struct PackedPlatform {
    pub platform: String,
    pub accelerator: String,
    pub manifest: Digest,
    pub layer: Digest,
    pub layer_size: u64,
    pub files: usize,
    pub build_info: String,
}

/// Packs every platform's directory into an OCI layout at `out` (created; must be new or empty).
pub fn pack(
    builds: &[PlatformBuild],
    version: &str,
    out: &Path,
    tag: &str,
    progress: &Progress,
) -> Result<(Digest, Vec<PackedPlatform>)> {
    let files = check_builds(builds)?;
    let total: u64 = files
        .iter()
        .flatten()
        .filter_map(|(p, _)| std::fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    progress.set_length(total);
    let layout = Layout::create(out)?;
    let mut entries = Vec::new();
    let mut packed = Vec::new();
    for (build, files) in builds.iter().zip(&files) {
        progress.set_message(&build.label());
        let (entry, platform) = pack_platform(&layout, build, files, version, progress)?;
        entries.push(entry);
        packed.push(platform);
    }
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_INDEX.into()),
        artifact_type: Some(ARTIFACT_TYPE_RUNTIME_BUILD.into()),
        manifests: entries,
        subject: None,
        annotations: [("org.opencontainers.image.version".to_owned(), version.to_owned())].into(),
    };
    let bytes = serde_json::to_vec(&index)?;
    let digest = layout.write_blob(&bytes)?;
    layout.write_index(Descriptor::new(MEDIA_TYPE_IMAGE_INDEX, digest.clone(), bytes.len() as u64), tag)?;
    progress.finish();
    Ok((digest, packed))
}

/// Refuses an empty list, a platform given twice and a directory without `llama-server`; lists each
/// build's files.
fn check_builds(builds: &[PlatformBuild]) -> Result<Vec<Vec<(PathBuf, String)>>> {
    if builds.is_empty() {
        refuse!("name at least one build: --platform linux/amd64=DIR");
    }
    for (i, a) in builds.iter().enumerate() {
        if builds[..i].iter().any(|b| b.label() == a.label()) {
            refuse!("--platform {} is given twice; a build has one entry per platform and accelerator", a.label());
        }
        check_build_dir(&a.dir)?;
    }
    builds.iter().map(|b| list_files(&b.dir)).collect()
}

/// One platform's tar layer, config and manifest; returns its index entry.
fn pack_platform(
    layout: &Layout,
    build: &PlatformBuild,
    files: &[(PathBuf, String)],
    version: &str,
    progress: &Progress,
) -> Result<(Descriptor, PackedPlatform)> {
    let (layer_digest, layer_size) = write_tar(layout, files, progress)
        .map_err(|e| e.during(&format!("packing {} for {}", build.dir.display(), build.label())))?;
    let build_info = build_info(build);
    let config = RuntimeBuildConfig {
        version: version.to_owned(),
        build_info: build_info.clone(),
        accelerator: build.accelerator.clone(),
        os: build.os.clone(),
        architecture: build.architecture.clone(),
        variant: build.variant.clone(),
        cpu_features: build.cpu_features.clone(),
    };
    let config_bytes = serde_json::to_vec(&config)?;
    let config_desc =
        Descriptor::new(MEDIA_TYPE_RUNTIME_BUILD_CONFIG, layout.write_blob(&config_bytes)?, config_bytes.len() as u64);
    let mut layer = Descriptor::new(MEDIA_TYPE_RUNTIME_BUILD_TAR, layer_digest.clone(), layer_size);
    let title = format!("llama-server-{}.tar", build.label().replace('/', "-"));
    layer.annotations.insert(ANNOTATION_TITLE.into(), title);
    let mut annotations: std::collections::BTreeMap<String, String> =
        [(ANNOTATION_ACCELERATOR.to_owned(), build.accelerator.clone())].into();
    if !build.cpu_features.is_empty() {
        annotations.insert(ANNOTATION_CPU_FEATURES.to_owned(), build.cpu_features.join(","));
    }
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_TYPE_RUNTIME_BUILD.into()),
        config: config_desc,
        layers: vec![layer],
        subject: None,
        annotations: annotations.clone(),
    };
    let bytes = serde_json::to_vec(&manifest)?;
    let mut entry = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, layout.write_blob(&bytes)?, bytes.len() as u64);
    entry.artifact_type = Some(ARTIFACT_TYPE_RUNTIME_BUILD.into());
    entry.platform = Some(Platform {
        architecture: build.architecture.clone(),
        os: build.os.clone(),
        variant: build.variant.clone(),
    });
    entry.annotations.extend(annotations);
    let packed = PackedPlatform {
        platform: build.label(),
        accelerator: build.accelerator.clone(),
        manifest: entry.digest.clone(),
        layer: layer_digest,
        layer_size,
        files: files.len(),
        build_info,
    };
    Ok((entry, packed))
}

/// A build directory must hold an executable `llama-server`.
fn check_build_dir(dir: &Path) -> Result<()> {
    let server = dir.join(RUNTIME_BUILD_SERVER);
    let meta = std::fs::metadata(&server).map_err(|e| {
        Error::Refused(format!(
            "{} has no {RUNTIME_BUILD_SERVER} ({e}); name llama.cpp's build/bin directory",
            dir.display()
        ))
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        refuse!("{} is not an executable file; name llama.cpp's build/bin directory", server.display());
    }
    Ok(())
}

/// Every entry under `dir` (files, directories, symbolic links), sorted, with its path inside the build.
fn list_files(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_owned(), String::new())];
    while let Some((at, prefix)) = stack.pop() {
        let reading = || format!("reading {}", at.display());
        let mut names: Vec<_> =
            std::fs::read_dir(&at).doing(reading)?.collect::<std::io::Result<Vec<_>>>().doing(reading)?;
        names.sort_by_key(|e| e.file_name());
        for entry in names {
            let name = entry.file_name().into_string().map_err(|n| {
                Error::Refused(format!("{} has a file name that is not UTF-8 ({n:?}); rename it", at.display()))
            })?;
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let kind = entry.file_type().doing(reading)?;
            if kind.is_dir() {
                stack.push((entry.path(), rel.clone()));
            } else if !kind.is_file() && !kind.is_symlink() {
                refuse!(
                    "{} is neither a file, a directory nor a link; a build holds only those",
                    entry.path().display()
                );
            }
            out.push((entry.path(), rel));
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// Writes the tar of `files` into the layout, hashing it on the way (never held in memory).
fn write_tar(layout: &Layout, files: &[(PathBuf, String)], progress: &Progress) -> Result<(Digest, u64)> {
    let dir = layout.root().join("blobs/sha256");
    let tmp = tempfile::NamedTempFile::new_in(&dir).doing(|| format!("creating a file in {}", dir.display()))?;
    let writing = || format!("writing {}", tmp.path().display());
    let file = tmp.reopen().doing(writing)?;
    let writer = HashingWriter { inner: std::io::BufWriter::with_capacity(1 << 20, file), hasher: Hasher::new() };
    let mut builder = tar::Builder::new(writer);
    builder.follow_symlinks(false);
    // Same files, same bytes: owners and times are left out so a rebuild of the same tree has the same digest.
    builder.mode(tar::HeaderMode::Deterministic);
    // Every file as a plain entry: a linker can leave holes in a library (the arm64 cross build's did), which
    // tar would write as a GNU sparse entry, and the agent's extractor refuses every special entry.
    builder.sparse(false);
    for (path, rel) in files {
        builder.append_path_with_name(path, rel).doing(|| format!("adding {}", path.display()))?;
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && meta.is_file()
        {
            progress.inc(meta.len());
        }
    }
    let mut writer = builder.into_inner().doing(writing)?;
    writer.inner.flush().doing(writing)?;
    let len = writer.hasher.len();
    let digest = writer.hasher.finish();
    let path = layout.blob_path(&digest);
    tmp.persist(&path).map_err(|e| e.error).doing(|| format!("writing {}", path.display()))?;
    Ok((digest, len))
}

struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `llama-server --version`, when the build runs on this machine (same OS and architecture); empty otherwise.
fn build_info(build: &PlatformBuild) -> String {
    let here = (std::env::consts::OS, oci_architecture(std::env::consts::ARCH));
    if (build.os.as_str(), build.architecture.as_str()) != here || build.accelerator != "cpu" {
        return String::new();
    }
    let child = std::process::Command::new(build.dir.join(RUNTIME_BUILD_SERVER))
        .arg("--version")
        .env("LD_LIBRARY_PATH", &build.dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else { return String::new() };
    // Bounded: a build that hangs on --version is packed without a description.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return String::new();
            }
        }
    }
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        use std::io::Read as _;
        let _ = err.by_ref().take(4096).read_to_string(&mut text);
    }
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_flags_parse_and_bad_ones_say_how() {
        let p = parse_platform("linux/amd64=build/bin").expect("plain");
        assert_eq!((p.os.as_str(), p.architecture.as_str(), p.accelerator.as_str()), ("linux", "amd64", "cpu"));
        assert_eq!(p.dir, PathBuf::from("build/bin"));
        let p = parse_platform("linux/arm64/cuda=jetson").expect("cuda");
        assert_eq!(
            (p.variant.as_deref(), p.accelerator.as_str(), p.label().as_str()),
            (None, "cuda", "linux/arm64/cuda")
        );
        let p = parse_platform("linux/arm/v7=pi").expect("variant");
        assert_eq!((p.variant.as_deref(), p.accelerator.as_str()), (Some("v7"), "cpu"));
        let p = parse_platform("linux/arm64+asimdhp+asimddp=pi5").expect("features");
        assert_eq!(p.cpu_features, ["asimddp", "asimdhp"], "sorted");
        assert_eq!(p.label(), "linux/arm64+asimddp+asimdhp");
        let err = parse_platform("linux/arm64+dotprod=pi5").expect_err("not a cpuinfo name").to_string();
        assert!(err.contains("asimddp"), "{err}");
        for bad in ["linux/amd64", "linux=dir", "linux/amd64=", "linux/../x=dir", "a/b/c/d/e=dir", "linux/arm64+=d"] {
            let err = parse_platform(bad).expect_err(bad).to_string();
            assert!(err.contains("--platform"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_build_is_an_index_with_one_tar_per_platform_and_the_same_tree_packs_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::write(bin.join(RUNTIME_BUILD_SERVER), b"#!/bin/sh\necho version: 1\n").expect("write");
        std::fs::set_permissions(bin.join(RUNTIME_BUILD_SERVER), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(bin.join("libllama.so.0"), b"ELF").expect("lib");
        std::os::unix::fs::symlink("libllama.so.0", bin.join("libllama.so")).expect("symlink");
        let builds = vec![
            parse_platform(&format!("linux/amd64={}", bin.display())).expect("amd64"),
            parse_platform(&format!("linux/arm64/cuda={}", bin.display())).expect("arm64"),
            parse_platform(&format!("linux/arm64+asimddp={}", bin.display())).expect("tuned"),
        ];
        let bar = Progress::none();
        let (digest, packed) = pack(&builds, "b1", &dir.path().join("one"), "b1", &bar).expect("pack");
        assert_eq!(packed.len(), 3);
        assert_eq!(packed[2].platform, "linux/arm64+asimddp", "same platform, other features: its own entry");
        assert_eq!(packed[0].files, 3);
        let layout = Layout::open(&dir.path().join("one")).expect("layout");
        let index: ImageIndex = serde_json::from_slice(&layout.read_blob(&digest).expect("index")).expect("json");
        assert_eq!(index.manifests[1].platform.as_ref().map(|p| p.architecture.as_str()), Some("arm64"));
        assert_eq!(index.manifests[1].annotation(ANNOTATION_ACCELERATOR), Some("cuda"));
        assert_eq!(index.manifests[1].annotation(ANNOTATION_CPU_FEATURES), None);
        assert_eq!(index.manifests[2].annotation(ANNOTATION_CPU_FEATURES), Some("asimddp"));
        let mut archive = tar::Archive::new(std::fs::File::open(layout.blob_path(&packed[0].layer)).expect("tar"));
        let kinds: Vec<(String, bool)> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (e.path().expect("path").display().to_string(), e.header().entry_type().is_symlink())
            })
            .collect();
        assert_eq!(
            kinds,
            [("libllama.so".into(), true), ("libllama.so.0".into(), false), ("llama-server".into(), false)]
        );
        // A file with a hole (as a linker may leave in a library) is packed as a plain file.
        let holed = std::fs::File::create(bin.join("libholes.so")).expect("holed");
        holed.set_len(1 << 20).expect("hole");
        drop(holed);
        let (_, holes) = pack(&builds[..1], "b1", &dir.path().join("holes"), "b1", &bar).expect("pack holes");
        let layout = Layout::open(&dir.path().join("holes")).expect("layout");
        let mut archive = tar::Archive::new(std::fs::File::open(layout.blob_path(&holes[0].layer)).expect("tar"));
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            assert!(!entry.header().entry_type().is_gnu_sparse(), "{:?} is sparse", entry.path());
        }
        std::fs::remove_file(bin.join("libholes.so")).expect("rm");
        let (again, _) = pack(&builds, "b1", &dir.path().join("two"), "b1", &bar).expect("pack again");
        assert_eq!(again, digest, "deterministic");
        let err =
            pack(&[parse_platform("linux/amd64=/nonexistent").expect("p")], "b", &dir.path().join("x"), "t", &bar)
                .expect_err("no server");
        assert!(err.to_string().contains("llama-server"), "{err}");
    }
}
