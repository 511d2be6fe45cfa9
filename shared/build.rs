//! Generates the gRPC and protobuf code from proto/alki/v1.
//!
//! Messages also derive serde so the controller can keep them in its store as JSON: prost fills missing
//! fields with defaults, so records written by an older controller still load after fields are added.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["types.proto", "agent.proto", "fleet.proto"].map(|f| format!("../proto/alki/v1/{f}"));
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        .compile_protos(&protos, &["../proto".to_owned()])?;
    Ok(())
}
