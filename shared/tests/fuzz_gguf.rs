//! Fuzzes the GGUF reader (stable Rust, proptest): well-formed files built from random metadata and tensors
//! must read back exactly; the same files with lying counts and lengths patched in, truncated, or with random
//! bytes flipped must be refused with an error, never a panic or an allocation the file cannot back.
//!
//! `ALKI_FUZZ_CASES` sets the number of cases (default 256, what CI runs).

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};

use alki_shared::gguf;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u32 {
    std::env::var("ALKI_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

#[derive(Clone, Debug)]
enum Kv {
    U32(u32),
    I64(i64),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrU32(Vec<u32>),
    ArrStr(Vec<String>),
}

#[derive(Clone, Debug)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
}

#[derive(Clone, Debug)]
struct Model {
    kvs: Vec<(String, Kv)>,
    tensors: Vec<Tensor>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Writes a GGUF v3 file; returns it with the offsets of every count and length field (the fields to lie in).
fn write(model: &Model) -> (Vec<u8>, Vec<usize>) {
    let mut out = b"GGUF".to_vec();
    let mut counts = Vec::new();
    out.extend_from_slice(&3u32.to_le_bytes());
    counts.push(out.len());
    out.extend_from_slice(&(model.tensors.len() as u64).to_le_bytes());
    counts.push(out.len());
    out.extend_from_slice(&(model.kvs.len() as u64).to_le_bytes());
    for (key, value) in &model.kvs {
        counts.push(out.len());
        put_str(&mut out, key);
        match value {
            Kv::U32(v) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Kv::I64(v) => {
                out.extend_from_slice(&11u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Kv::F32(v) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Kv::Bool(v) => {
                out.extend_from_slice(&7u32.to_le_bytes());
                out.push(u8::from(*v));
            }
            Kv::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                counts.push(out.len());
                put_str(&mut out, s);
            }
            Kv::ArrU32(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&4u32.to_le_bytes());
                counts.push(out.len());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Kv::ArrStr(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                counts.push(out.len());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in items {
                    counts.push(out.len());
                    put_str(&mut out, s);
                }
            }
        }
    }
    let mut offset = 0u64;
    for tensor in &model.tensors {
        counts.push(out.len());
        put_str(&mut out, &tensor.name);
        out.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
        for d in &tensor.dims {
            counts.push(out.len());
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes()); // F32
        out.extend_from_slice(&offset.to_le_bytes());
        let bytes = tensor.dims.iter().product::<u64>() * 4;
        offset += bytes.div_ceil(32) * 32;
    }
    // Pad to the default alignment, then the tensor data.
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.resize(out.len() + offset as usize, 0);
    (out, counts)
}

fn key() -> impl Strategy<Value = String> {
    "[a-z]{1,8}(\\.[a-z_]{1,8}){0,2}"
}

fn kv() -> impl Strategy<Value = Kv> {
    prop_oneof![
        any::<u32>().prop_map(Kv::U32),
        any::<i64>().prop_map(Kv::I64),
        any::<f32>().prop_filter("NaN never equals itself", |f| !f.is_nan()).prop_map(Kv::F32),
        any::<bool>().prop_map(Kv::Bool),
        ".{0,40}".prop_map(Kv::Str),
        prop::collection::vec(any::<u32>(), 0..40).prop_map(Kv::ArrU32),
        prop::collection::vec(".{0,12}", 0..20).prop_map(Kv::ArrStr),
    ]
}

fn model() -> impl Strategy<Value = Model> {
    let kvs = prop::collection::btree_map(key(), kv(), 0..12).prop_map(|m| m.into_iter().collect::<Vec<_>>());
    let tensors = prop::collection::btree_map("[a-z]{1,6}\\.weight", prop::collection::vec(1u64..16, 1..4), 0..6)
        .prop_map(|m| m.into_iter().map(|(name, dims)| Tensor { name, dims }).collect::<Vec<_>>());
    (kvs, tensors).prop_map(|(kvs, tensors)| Model { kvs, tensors })
}

/// How a well-formed file is damaged.
#[derive(Clone, Debug)]
enum Damage {
    /// A count or length field (chosen by index) replaced by a lie.
    Lie {
        field: usize,
        value: u64,
    },
    Truncate {
        keep: usize,
    },
    Flip {
        at: usize,
        byte: u8,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    let lie = prop_oneof![
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(1u64 << 40),
        Just(1u64 << 31),
        0u64..1_000_000,
        any::<u64>()
    ];
    prop_oneof![
        (any::<usize>(), lie).prop_map(|(field, value)| Damage::Lie { field, value }),
        any::<usize>().prop_map(|keep| Damage::Truncate { keep }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Damage::Flip { at, byte }),
    ]
}

#[test]
fn well_formed_files_read_back_exactly() {
    let executed = AtomicU64::new(0);
    runner()
        .run(&model(), |model| {
            executed.fetch_add(1, Ordering::Relaxed);
            let (bytes, _) = write(&model);
            let file = gguf::read_with_arrays(&mut Cursor::new(&bytes), |_| true)
                .map_err(|e| TestCaseError::fail(format!("a well-formed file was refused: {e}")))?;
            prop_assert_eq!(file.version, 3);
            prop_assert_eq!(file.metadata.len(), model.kvs.len());
            for ((key, value), entry) in model.kvs.iter().zip(&file.metadata) {
                prop_assert_eq!(&entry.key, key);
                match value {
                    Kv::U32(v) => prop_assert_eq!(entry.value.as_u64(), Some(u64::from(*v))),
                    Kv::I64(v) => prop_assert_eq!(entry.value.as_i64(), Some(*v)),
                    Kv::Str(s) => prop_assert_eq!(entry.value.as_str(), Some(s.as_str())),
                    Kv::ArrU32(items) => {
                        prop_assert_eq!(entry.value.as_array().map(|a| a.len), Some(items.len() as u64))
                    }
                    Kv::ArrStr(items) => {
                        prop_assert_eq!(entry.value.as_array().map(|a| a.len), Some(items.len() as u64))
                    }
                    Kv::F32(_) | Kv::Bool(_) => {}
                }
            }
            prop_assert_eq!(file.tensors.len(), model.tensors.len());
            let params: u64 = model.tensors.iter().map(|t| t.dims.iter().product::<u64>()).sum();
            prop_assert_eq!(file.parameter_count, params);
            prop_assert_eq!(file.file_size, bytes.len() as u64);
            Ok(())
        })
        .expect("no failing case");
    eprintln!("fuzz_gguf well-formed: {} executions, 0 crashes", executed.load(Ordering::Relaxed));
}

#[test]
fn damaged_files_are_refused_or_read_never_panic() {
    let executed = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    runner()
        .run(&(model(), prop::collection::vec(damage(), 1..4)), |(model, damages)| {
            executed.fetch_add(1, Ordering::Relaxed);
            let (mut bytes, fields) = write(&model);
            for d in damages {
                match d {
                    Damage::Lie { field, value } => {
                        let at = fields[field % fields.len()];
                        // An earlier truncation may have cut the field off.
                        if let Some(slot) = bytes.get_mut(at..at + 8) {
                            slot.copy_from_slice(&value.to_le_bytes());
                        }
                    }
                    Damage::Truncate { keep } => bytes.truncate(keep % (bytes.len() + 1)),
                    Damage::Flip { at, byte } if !bytes.is_empty() => {
                        let at = at % bytes.len();
                        bytes[at] ^= byte;
                    }
                    Damage::Flip { .. } => {}
                }
            }
            // Errors are the expected outcome; a panic (or an abort on a huge allocation) fails the case.
            match gguf::read_with_arrays(&mut Cursor::new(&bytes), |_| true) {
                Err(_) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                Ok(file) => {
                    // Whatever was accepted is backed by the bytes that were there.
                    prop_assert!(file.metadata.len() <= bytes.len());
                    prop_assert!(file.tensors.len() <= bytes.len());
                    // Every tensor's data lies inside the file (a file without tensors may end before the
                    // aligned data offset: there is nothing to read there).
                    for t in &file.tensors {
                        // Unknown (newer) ggml types cannot be sized: only their start is checked.
                        let len = if t.type_name().is_some() { t.byte_size() } else { Some(0) };
                        let end = file.data_offset.checked_add(t.offset).and_then(|o| o.checked_add(len?));
                        prop_assert!(end.is_some_and(|end| end <= file.file_size), "tensor {} beyond the file", t.name);
                    }
                }
            }
            Ok(())
        })
        .expect("no failing case");
    eprintln!(
        "fuzz_gguf damaged: {} executions, {} refused, 0 crashes",
        executed.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
}

#[test]
fn arbitrary_bytes_behind_the_magic_never_panic() {
    let executed = AtomicU64::new(0);
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..512), |tail| {
            executed.fetch_add(1, Ordering::Relaxed);
            let mut bytes = b"GGUF\x03\0\0\0".to_vec();
            bytes.extend(tail);
            let _ = gguf::read_with_arrays(&mut Cursor::new(&bytes), |_| true);
            Ok(())
        })
        .expect("no failing case");
    eprintln!("fuzz_gguf arbitrary: {} executions, 0 crashes", executed.load(Ordering::Relaxed));
}

/// Found by this target: a tensor of a known type whose byte size overflows u64 was taken to be empty.
#[test]
fn a_known_type_whose_size_overflows_is_refused() {
    let model = Model { kvs: vec![], tensors: vec![Tensor { name: "huge.weight".into(), dims: vec![1] }] };
    let (mut bytes, fields) = write(&model);
    // fields: tensor count, kv count, the tensor's name, then its one dimension: make it 2^62 f32 elements.
    let dim = fields[3];
    bytes[dim..dim + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let error = gguf::read(&mut Cursor::new(&bytes)).expect_err("2^64 bytes of f32 cannot be in this file");
    assert!(error.to_string().contains("huge.weight"), "{error}");
}
