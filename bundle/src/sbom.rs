//! The SPDX 2.3 JSON software bill of materials a bundle carries per variant (doc layer `sbom.spdx.json`):
//! the model as a package containing every file of the variant, each with its SHA-256.

use alki_shared::digest::Digest;

/// The SBOM's file name in the doc layer.
pub const SBOM_NAME: &str = "sbom.spdx.json";

/// An SPDX 2.3 JSON document for one variant: the model as a package containing every file, each with
/// its SHA-256.
pub fn spdx_sbom(
    name: &str,
    version: Option<&str>,
    license: Option<&str>,
    quantization: &str,
    files: &[(&str, &Digest)],
    created: &str,
) -> serde_json::Value {
    let license = license.unwrap_or("NOASSERTION");
    let spdx_files: Vec<serde_json::Value> = files
        .iter()
        .enumerate()
        .map(|(i, (file, digest))| {
            serde_json::json!({
                "SPDXID": format!("SPDXRef-File-{}", i + 1),
                "fileName": format!("./{file}"),
                "checksums": [{"algorithm": "SHA256", "checksumValue": digest.hex()}],
                "licenseConcluded": "NOASSERTION",
                "copyrightText": "NOASSERTION",
            })
        })
        .collect();
    let mut relationships = vec![serde_json::json!({
        "spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": "SPDXRef-Model"
    })];
    relationships.extend((1..=files.len()).map(|i| {
        serde_json::json!({
            "spdxElementId": "SPDXRef-Model", "relationshipType": "CONTAINS",
            "relatedSpdxElement": format!("SPDXRef-File-{i}")
        })
    }));
    let namespace_seed: String = files.iter().map(|(_, d)| d.hex()).collect();
    serde_json::json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{name} {quantization}"),
        "documentNamespace": format!("https://spdx.alki.invalid/bundle/{}", Digest::of(namespace_seed.as_bytes()).hex()),
        "creationInfo": {"created": created, "creators": [concat!("Tool: alkictl-", env!("CARGO_PKG_VERSION"))]},
        "packages": [{
            "SPDXID": "SPDXRef-Model",
            "name": name,
            "versionInfo": version.unwrap_or("NOASSERTION"),
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": license,
            "licenseDeclared": license,
            "copyrightText": "NOASSERTION",
        }],
        "files": spdx_files,
        "relationships": relationships,
    })
}
