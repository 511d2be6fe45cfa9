//! Fuzzes manifest and index parsing (stable Rust, proptest) and what the agent derives from them:
//! random well-formed manifests and indexes round-trip; the same documents with fields replaced by hostile
//! values (wrong types, negative or huge sizes, bad digests, traversal file names), random bytes, and
//! random content types are refused with an error, never a panic; and every file name the bundle code
//! accepts from an annotation is one plain path component.
//!
//! `ALKI_FUZZ_CASES` sets the number of cases (default 256, what CI runs).

use std::sync::atomic::{AtomicU64, Ordering};

use alki_shared::bundle;
use alki_shared::oci::{self, Manifest};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

fn cases() -> u32 {
    std::env::var("ALKI_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

fn digest() -> impl Strategy<Value = String> {
    "[0-9a-f]{64}".prop_map(|hex| format!("sha256:{hex}"))
}

/// Annotation values, including the hostile ones a bundle could carry.
fn annotation_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._-]{1,20}",
        Just("../../etc/passwd".to_owned()),
        Just("/abs/path.gguf".to_owned()),
        Just("..".to_owned()),
        Just(".hidden".to_owned()),
        Just("a\\b.gguf".to_owned()),
        Just("nul\0.gguf".to_owned()),
        ".{0,300}",
        "[0-9]{1,25}",
        Just("-1".to_owned()),
    ]
}

fn annotations() -> impl Strategy<Value = Value> {
    let keys = prop_oneof![
        Just(oci::ANNOTATION_TITLE.to_owned()),
        Just(bundle::ANNOTATION_FILEPATH.to_owned()),
        Just(bundle::ANNOTATION_QUANTIZATION.to_owned()),
        Just(bundle::ANNOTATION_WEIGHTS_BYTES.to_owned()),
        Just(bundle::ANNOTATION_MEMORY_BYTES.to_owned()),
        Just(bundle::ANNOTATION_MODEL_NAME.to_owned()),
        "[a-z.]{1,12}",
    ];
    prop::collection::btree_map(keys, annotation_value(), 0..6).prop_map(|m| json!(m))
}

fn descriptor() -> impl Strategy<Value = Value> {
    let media = prop_oneof![
        Just(bundle::MEDIA_TYPE_WEIGHT_RAW.to_owned()),
        Just(bundle::MEDIA_TYPE_RUNTIME.to_owned()),
        Just(oci::MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
        "[a-z/.+-]{1,30}",
    ];
    (media, digest(), 0u64..(1 << 40), annotations())
        .prop_map(|(m, d, size, a)| json!({"mediaType": m, "digest": d, "size": size, "annotations": a}))
}

fn document() -> impl Strategy<Value = Value> {
    let image = (descriptor(), prop::collection::vec(descriptor(), 0..8), annotations()).prop_map(|(c, l, a)| {
        json!({"schemaVersion": 2, "mediaType": oci::MEDIA_TYPE_IMAGE_MANIFEST,
               "artifactType": bundle::ARTIFACT_TYPE_MODEL, "config": c, "layers": l, "annotations": a})
    });
    let index = (prop::collection::vec(descriptor(), 0..8), annotations()).prop_map(|(m, a)| {
        json!({"schemaVersion": 2, "mediaType": oci::MEDIA_TYPE_IMAGE_INDEX, "manifests": m, "annotations": a})
    });
    prop_oneof![image, index]
}

/// A hostile value to put somewhere in a document.
fn hostile() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(null)),
        Just(json!(-1)),
        Just(json!(1u64 << 63)),
        Just(json!(1e300)),
        Just(json!("sha256:../../x")),
        Just(json!("sha256:")),
        Just(json!([])),
        Just(json!({})),
        Just(json!(1)),
        Just(json!(true)),
        ".{0,40}".prop_map(Value::String),
    ]
}

/// Replaces the value at a pseudo-random path (chosen by `picks`) with `with`.
fn mutate(value: &mut Value, picks: &[usize], with: Value) {
    let Some((&pick, rest)) = picks.split_first() else {
        *value = with;
        return;
    };
    match value {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(pick % map.len()).cloned().unwrap_or_default();
            if let Some(child) = map.get_mut(&key) {
                mutate(child, rest, with);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let len = items.len();
            mutate(&mut items[pick % len], rest, with);
        }
        _ => *value = with,
    }
}

/// What the agent and the controller derive from a parsed manifest must never panic either.
fn derive_everything(manifest: &Manifest) {
    let _ = manifest.references();
    let _ = manifest.annotations();
    match manifest {
        Manifest::Index(index) => {
            let _ = bundle::variants(index);
            let _ = bundle::choose_variant(index, u64::MAX);
            let _ = bundle::choose_variant(index, 0);
        }
        Manifest::Image(image) => {
            for layer in bundle::weight_layers(image) {
                if let Some(name) = bundle::safe_file_name(layer) {
                    assert!(!name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0']));
                    assert_eq!(std::path::Path::new(name).components().count(), 1, "{name:?}");
                }
            }
            let _ = bundle::runtime_layer(image);
        }
    }
}

#[test]
fn well_formed_documents_parse_and_round_trip() {
    let executed = AtomicU64::new(0);
    runner()
        .run(&document(), |doc| {
            executed.fetch_add(1, Ordering::Relaxed);
            let bytes = serde_json::to_vec(&doc).expect("encode");
            let manifest = Manifest::parse(&bytes, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
            derive_everything(&manifest);
            let expected_refs =
                doc.get("layers").or(doc.get("manifests")).and_then(Value::as_array).map_or(0, Vec::len);
            let config = usize::from(doc.get("config").is_some());
            prop_assert_eq!(manifest.references().len(), expected_refs + config);
            Ok(())
        })
        .expect("no failing case");
    eprintln!("fuzz_oci well-formed: {} executions, 0 crashes", executed.load(Ordering::Relaxed));
}

#[test]
fn mutated_documents_and_content_types_never_panic() {
    let executed = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let content_type = prop_oneof![
        Just(None),
        Just(Some(oci::MEDIA_TYPE_IMAGE_INDEX.to_owned())),
        Just(Some(oci::MEDIA_TYPE_IMAGE_MANIFEST.to_owned())),
        Just(Some(format!("{}; charset=utf-8", oci::MEDIA_TYPE_IMAGE_MANIFEST))),
        ".{0,30}".prop_map(Some),
    ];
    let mutations = prop::collection::vec((prop::collection::vec(any::<usize>(), 2..6), hostile()), 1..3);
    runner()
        .run(&(document(), mutations, content_type), |(mut doc, mutations, content_type)| {
            executed.fetch_add(1, Ordering::Relaxed);
            for (picks, with) in mutations {
                mutate(&mut doc, &picks, with);
            }
            let bytes = serde_json::to_vec(&doc).expect("encode");
            match Manifest::parse(&bytes, content_type.as_deref()) {
                Ok(manifest) => derive_everything(&manifest),
                Err(error) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    prop_assert!(!error.to_string().is_empty());
                }
            }
            Ok(())
        })
        .expect("no failing case");
    eprintln!(
        "fuzz_oci mutated: {} executions, {} refused, 0 crashes",
        executed.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
}

#[test]
fn arbitrary_bytes_never_panic_and_oversized_documents_are_refused() {
    let executed = AtomicU64::new(0);
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..1024), |bytes| {
            executed.fetch_add(1, Ordering::Relaxed);
            if let Ok(manifest) = Manifest::parse(&bytes, None) {
                derive_everything(&manifest);
            }
            Ok(())
        })
        .expect("no failing case");
    let oversized = vec![b' '; oci::MAX_MANIFEST_BYTES + 1];
    assert!(matches!(Manifest::parse(&oversized, None), Err(oci::ManifestError::TooLarge(_))));
    // Deep nesting is refused by the JSON parser's recursion limit, not by a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(Manifest::parse(deep.as_bytes(), None).is_err());
    eprintln!("fuzz_oci arbitrary: {} executions, 0 crashes", executed.load(Ordering::Relaxed));
}
