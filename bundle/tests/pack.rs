//! Packing real (tiny) GGUF files: a split model is one variant with its parts as ordered layers, the doc
//! layers, and an SBOM listing every file with its sha256.

use std::path::{Path, PathBuf};

use alki_bundle::Progress;
use alki_bundle::layout::Layout;
use alki_bundle::pack::{LICENSE_NAME, PackExtras, PackOptions, README_NAME, pack_with};
use alki_bundle::sbom::SBOM_NAME;
use alki_e2e::tiny_model::{TinyModelOptions, synthetic_tokenizer, write_tiny_model};
use alki_shared::bundle::{self, RuntimeDefaults};
use alki_shared::digest::Digest;
use alki_shared::gguf;
use alki_shared::oci::{ANNOTATION_TITLE, ImageManifest};

fn options(files: Vec<PathBuf>, out: PathBuf) -> PackOptions {
    PackOptions { files, out, name: None, version: None, license: None, context: 512, tag: "v1".into() }
}

fn tiny(path: &Path, seed: u64) {
    write_tiny_model(path, &TinyModelOptions { name: "tiny".into(), seed }, &synthetic_tokenizer(16)).expect("model");
}

#[test]
fn a_split_model_is_one_variant_with_ordered_layers_docs_and_an_sbom_of_every_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (one, two) = (dir.path().join("m-00001-of-00002.gguf"), dir.path().join("m-00002-of-00002.gguf"));
    tiny(&one, 1);
    tiny(&two, 2);
    let license = dir.path().join("LICENSE.txt");
    std::fs::write(&license, "Apache License 2.0 text").expect("write");
    let readme = dir.path().join("README.md");
    std::fs::write(&readme, "# tiny").expect("write");
    let out = dir.path().join("bundle");
    let extras = PackExtras {
        license_file: Some(license),
        readme: Some(readme),
        threads: 4,
        gpu_layers: 0,
        chat_template: None,
        runtime_build: None,
        link_weights: false,
    };
    // Named out of order: the layers still come in part order.
    let packed =
        pack_with(&options(vec![two.clone(), one.clone()], out.clone()), &extras, &Progress::none()).expect("pack");
    assert_eq!(packed.variants.len(), 1);
    let v = &packed.variants[0];
    assert_eq!(v.parts, vec![one.clone(), two.clone()]);
    let sizes = std::fs::metadata(&one).expect("meta").len() + std::fs::metadata(&two).expect("meta").len();
    assert_eq!(v.size, sizes);
    let single = gguf::read_file(&one).expect("gguf").info().parameter_count;
    assert_eq!(v.parameters, 2 * single, "parameters of every part");

    let layout = Layout::open(&out).expect("layout");
    let manifest: ImageManifest =
        serde_json::from_slice(&layout.read_blob(&v.digest).expect("manifest")).expect("json");
    let titles: Vec<&str> = manifest.layers.iter().filter_map(|l| l.annotation(ANNOTATION_TITLE)).collect();
    assert_eq!(
        titles,
        ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf", "runtime.json", LICENSE_NAME, README_NAME, SBOM_NAME]
    );
    let runtime = bundle::runtime_layer(&manifest).expect("runtime layer");
    let runtime: RuntimeDefaults =
        serde_json::from_slice(&layout.read_blob(&runtime.digest).expect("blob")).expect("json");
    assert_eq!(runtime.threads, 4);
    let sbom_desc = manifest.layers.iter().find(|l| l.annotation(ANNOTATION_TITLE) == Some(SBOM_NAME)).expect("sbom");
    let sbom: serde_json::Value =
        serde_json::from_slice(&layout.read_blob(&sbom_desc.digest).expect("blob")).expect("json");
    assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
    let files = sbom["files"].as_array().expect("files");
    assert_eq!(files.len(), 5, "two GGUF parts, runtime, license, readme: {sbom}");
    for layer in manifest.layers.iter().filter(|l| l.annotation(ANNOTATION_TITLE) != Some(SBOM_NAME)) {
        let name = format!("./{}", layer.annotation(ANNOTATION_TITLE).expect("title"));
        let listed = files.iter().find(|f| f["fileName"] == name.as_str()).expect("listed");
        assert_eq!(listed["checksums"][0]["checksumValue"], layer.digest.hex());
    }
    let gguf_hex = Digest::of(&std::fs::read(&one).expect("read")).hex().to_owned();
    assert!(sbom.to_string().contains(&gguf_hex));
}
