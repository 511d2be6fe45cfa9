//! Generates the gRPC and protobuf code from proto/alki/v1, and says what the binaries are built from
//! (`alki_shared::build`): the target, and the commit a release build passes in `ALKI_GIT_COMMIT` (not read
//! from git here: that would rebuild every crate after every commit).
//!
//! Messages also derive serde so the controller can keep them in its store as JSON: prost fills missing
//! fields with defaults, so records written by an older controller still load after fields are added.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "types.proto",
        "agent.proto",
        "fleet.proto",
        "security.proto",
        "insight.proto",
        "admin.proto",
        "diagnostics.proto",
        "events.proto",
    ]
    .map(|f| format!("../proto/alki/v1/{f}"));
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-env-changed=ALKI_GIT_COMMIT");
    let commit = std::env::var("ALKI_GIT_COMMIT").ok().filter(|c| !c.trim().is_empty());
    println!("cargo:rustc-env=ALKI_GIT_COMMIT={}", commit.as_deref().map_or("unknown", str::trim));
    println!("cargo:rustc-env=ALKI_TARGET={}", std::env::var("TARGET")?);
    // A protoc from PROTOC or PATH wins; otherwise the vendored one, so a bare `cargo build` works anywhere.
    if std::env::var_os("PROTOC").is_none() && which_protoc().is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        // The descriptors let tests enumerate every service and method (controller/tests/authz.rs).
        .file_descriptor_set_path(std::path::Path::new(&std::env::var("OUT_DIR")?).join("alki_descriptor.bin"))
        .compile_protos(&protos, &["../proto".to_owned()])?;
    Ok(())
}

fn which_protoc() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("protoc")).find(|p| p.is_file())
}
