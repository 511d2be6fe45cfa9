//! Generates the gRPC and protobuf code from proto/alki/v1.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["types.proto", "agent.proto", "fleet.proto"].map(|f| format!("../proto/alki/v1/{f}"));
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["../proto".to_owned()])?;
    Ok(())
}
