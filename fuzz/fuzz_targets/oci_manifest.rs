//! OCI manifest and index parsing (alki_shared::oci::Manifest::parse) on arbitrary bytes under each content
//! type a registry may answer with, then everything the agent and alkictl derive from a parsed document:
//! variants and their choice, weight and runtime layers, signature layers, file names from annotations
//! (which must be one plain path component), and the blobs and references read beside manifests.

#![no_main]

use std::path::{Component, Path};

use alki_shared::bundle::{self, ModelConfig, RuntimeBuildConfig, RuntimeDefaults};
use alki_shared::digest::Digest;
use alki_shared::oci::{self, Manifest};
use alki_shared::signing;
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: [Option<&str>; 5] = [
    None,
    Some(oci::MEDIA_TYPE_IMAGE_MANIFEST),
    Some(oci::MEDIA_TYPE_IMAGE_INDEX),
    Some(oci::MEDIA_TYPE_DOCKER_LIST),
    Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
];

fn check_file_name(layer: &oci::Descriptor) {
    if let Some(name) = bundle::safe_file_name(layer) {
        let mut parts = Path::new(name).components();
        assert!(
            matches!((parts.next(), parts.next()), (Some(Component::Normal(_)), None)),
            "unsafe file name accepted: {name:?}"
        );
        assert!(!name.starts_with('.'), "hidden file name accepted: {name:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    for content_type in CONTENT_TYPES {
        let Ok(manifest) = Manifest::parse(data, content_type) else { continue };
        let _ = (manifest.media_type(), manifest.artifact_type(), manifest.subject(), manifest.annotations());
        for d in manifest.references() {
            let _ = d.digest.storage_path();
            check_file_name(d);
        }
        match &manifest {
            Manifest::Image(image) => {
                for layer in bundle::weight_layers(image) {
                    check_file_name(layer);
                }
                let _ = bundle::runtime_layer(image);
                for d in signing::signature_descriptors(image) {
                    let layer = signing::SignatureLayer::new(d, Vec::new());
                    assert!(layer.is_some(), "a signature descriptor without a signature");
                }
            }
            Manifest::Index(index) => {
                let variants = bundle::variants(index);
                for memory in [0, 1 << 30, u64::MAX] {
                    let chosen = bundle::choose_variant(index, memory);
                    if let Some(v) = &chosen {
                        assert!(v.memory_bytes.max(v.weights_bytes) <= memory, "a variant that does not fit");
                    }
                    let preferred = variants.first().map(|v| v.descriptor.digest.clone());
                    let _ = bundle::choose_preferred_variant(index, memory, preferred.as_ref());
                }
            }
        }
        // What was parsed serialises and parses back to the same document.
        let bytes = match &manifest {
            Manifest::Image(image) => serde_json::to_vec(image),
            Manifest::Index(index) => serde_json::to_vec(index),
        };
        if let Ok(bytes) = bytes
            && bytes.len() <= oci::MAX_MANIFEST_BYTES
        {
            let again = Manifest::parse(&bytes, Some(manifest.media_type()));
            assert!(again.as_ref().is_ok_and(|m| *m == manifest), "round trip changed the manifest: {again:?}");
        }
    }
    // The small blobs a manifest points at (model config, runtime layer, runtime build config) and the
    // reference forms come from the same registries.
    let _ = serde_json::from_slice::<ModelConfig>(data);
    let _ = serde_json::from_slice::<RuntimeDefaults>(data);
    let _ = serde_json::from_slice::<RuntimeBuildConfig>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bundle::parse_runtime_build(text);
        let _ = text.parse::<Digest>();
        let _ = signing::digest_of_signature_tag(text);
    }
});
