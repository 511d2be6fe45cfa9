//! A tiny valid llama GGUF for tests: a minimal GGUF v3 writer, seeded random F16 weights, a copied tokenizer.
//!
//! The model follows `notes/llama-server.md` ("A tiny model for tests"): 2 layers, n_embd 64, 4 heads,
//! n_ff 128, F16 matrices and F32 norms. It generates nonsense, fast, which is what plumbing tests need.
//!
//! Quality tests build three relatives of a model A from it: every matrix row is a multiple of 32 values,
//! so `llama-quantize A Q8_0` really quantizes (B1, close to A); another seed gives the same architecture
//! with other weights (B2, far from A); [`with_chat_template`] gives A's weights under another chat
//! template (B3, which breaks golden prompts recorded from A).

use std::io::Write;
use std::path::Path;

use alki_shared::gguf::{self, ArrayValues, MetadataEntry, Value};
use anyhow::{Context, bail};

/// Layers.
pub const N_LAYER: u64 = 2;
/// Embedding width.
pub const N_EMBD: u64 = 64;
/// Attention heads.
pub const N_HEAD: u64 = 4;
/// Key/value heads (no grouped-query attention).
pub const N_HEAD_KV: u64 = 4;
/// Feed-forward width.
pub const N_FF: u64 = 128;
/// Training context written to `llama.context_length`.
pub const CONTEXT_LENGTH: u64 = 2048;
/// `llama.attention.layer_norm_rms_epsilon`.
pub const RMS_EPS: f32 = 1e-5;
/// Alignment of the data section and of every tensor (GGUF's default; not written to the file).
pub const ALIGNMENT: u64 = 32;
/// `general.file_type` 1: mostly F16 (llama.cpp's `LLAMA_FTYPE_MOSTLY_F16`).
pub const FILE_TYPE_F16: u32 = 1;
/// Weights are drawn uniformly from ±this.
pub const WEIGHT_SCALE: f32 = 0.02;

/// Values per Q8_0 block: llama-quantize falls back to another type for rows that are not a multiple of it.
pub const Q8_0_BLOCK: u64 = 32;
const _: () =
    assert!(N_EMBD.is_multiple_of(Q8_0_BLOCK) && N_FF.is_multiple_of(Q8_0_BLOCK), "rows must quantize to Q8_0");

/// The GGUF key the fake llama-server reads its fault knobs from (`KEY=VALUE` lines, e.g.
/// `FAKE_LLAMA_TOKEN_MS=150`), so a packed bundle carries its own behaviour; llama.cpp ignores it.
pub const FAKE_KNOBS_KEY: &str = "alki.fake_llama.knobs";

/// The GGUF key llama-server reads a model's chat template from (when its command line names none).
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// ChatML, written out: what llama-server falls back to for a model without a template, made explicit so
/// a test does not depend on the fallback.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A wrong chat template for a ChatML model, as a real packaging mistake makes one: another family's
/// markers (Llama 2's `[INST]`), no system turn and no generation prompt. Every chat prompt renders to other
/// tokens than under [`CHATML_TEMPLATE`], so replies recorded under ChatML no longer match.
pub const MISMATCHED_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'user' %}\
{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] }}\
{% endif %}{% endfor %}";

const GGML_TYPE_F32: u32 = 0;
const GGML_TYPE_F16: u32 = 1;

/// llama.cpp version whose build (by `e2e/scripts/build-llama-server.sh`) caches the vocab file.
pub const LLAMA_CPP_VERSION: &str = "11434.0.0";

/// Where the llama-server build caches `ggml-vocab-llama-spm.gguf`:
/// `${ALKI_CACHE_DIR:-$HOME/.cache/alki}/llama-cpp-<version>/`, if the file is there.
pub fn cached_vocab_path() -> Option<std::path::PathBuf> {
    let cache = match std::env::var_os("ALKI_CACHE_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache/alki"),
    };
    let path = cache.join(format!("llama-cpp-{LLAMA_CPP_VERSION}")).join("ggml-vocab-llama-spm.gguf");
    path.is_file().then_some(path)
}

/// What varies between tiny models: tests make two different ones with different names or seeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyModelOptions {
    /// `general.name`.
    pub name: String,
    /// Seed of the weight generator: the same options and tokenizer give the same bytes.
    pub seed: u64,
}

impl Default for TinyModelOptions {
    fn default() -> Self {
        TinyModelOptions { name: "alki-tiny".to_owned(), seed: 1 }
    }
}

/// Reads every `tokenizer.*` key of a GGUF (e.g. llama.cpp's `models/ggml-vocab-llama-spm.gguf`), arrays in full.
pub fn read_tokenizer(vocab: &Path) -> anyhow::Result<Vec<MetadataEntry>> {
    let is_tokenizer = |key: &str| key.starts_with("tokenizer.");
    let file = gguf::read_file_with_arrays(vocab, is_tokenizer)
        .with_context(|| format!("reading the vocabulary from {}", vocab.display()))?;
    let entries: Vec<_> = file.metadata.into_iter().filter(|e| is_tokenizer(&e.key)).collect();
    if entries.is_empty() {
        bail!(
            "{} has no tokenizer.* keys; pass a llama.cpp vocab file such as ggml-vocab-llama-spm.gguf",
            vocab.display()
        );
    }
    Ok(entries)
}

/// `tokenizer` with [`CHAT_TEMPLATE_KEY`] set to `template` (replacing any): with the same options, the model
/// has the same weights under another template.
pub fn with_chat_template(tokenizer: &[MetadataEntry], template: &str) -> Vec<MetadataEntry> {
    let mut entries: Vec<MetadataEntry> = tokenizer.iter().filter(|e| e.key != CHAT_TEMPLATE_KEY).cloned().collect();
    entries.push(MetadataEntry { key: CHAT_TEMPLATE_KEY.to_owned(), value: Value::String(template.to_owned()) });
    entries
}

/// A small SentencePiece-style ("llama") vocabulary for tests that cannot rely on a vocab file:
/// `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then `n_words` word pieces.
pub fn synthetic_tokenizer(n_words: usize) -> Vec<MetadataEntry> {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    // llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte.
    let mut types = vec![2i32, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for i in 0..n_words {
        tokens.push(format!("\u{2581}w{i}"));
        types.push(1);
    }
    let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
    let entry = |key: &str, value: Value| MetadataEntry { key: key.to_owned(), value };
    vec![
        entry("tokenizer.ggml.model", Value::String("llama".to_owned())),
        entry("tokenizer.ggml.tokens", array(ArrayValues::String(tokens))),
        entry("tokenizer.ggml.scores", array(ArrayValues::F32(scores))),
        entry("tokenizer.ggml.token_type", array(ArrayValues::I32(types))),
        entry("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        entry("tokenizer.ggml.bos_token_id", Value::U32(1)),
        entry("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ]
}

/// A complete array value from its elements.
pub fn array(values: ArrayValues) -> Value {
    let (elem_type, len) = match &values {
        ArrayValues::U8(v) => (gguf::ValueType::U8, v.len()),
        ArrayValues::I8(v) => (gguf::ValueType::I8, v.len()),
        ArrayValues::U16(v) => (gguf::ValueType::U16, v.len()),
        ArrayValues::I16(v) => (gguf::ValueType::I16, v.len()),
        ArrayValues::U32(v) => (gguf::ValueType::U32, v.len()),
        ArrayValues::I32(v) => (gguf::ValueType::I32, v.len()),
        ArrayValues::F32(v) => (gguf::ValueType::F32, v.len()),
        ArrayValues::Bool(v) => (gguf::ValueType::Bool, v.len()),
        ArrayValues::String(v) => (gguf::ValueType::String, v.len()),
        ArrayValues::U64(v) => (gguf::ValueType::U64, v.len()),
        ArrayValues::I64(v) => (gguf::ValueType::I64, v.len()),
        ArrayValues::F64(v) => (gguf::ValueType::F64, v.len()),
    };
    Value::Array(gguf::Array { elem_type, len: len as u64, values: Some(values) })
}

/// The number of tokens in a tokenizer's `tokenizer.ggml.tokens`.
pub fn vocab_size(tokenizer: &[MetadataEntry]) -> anyhow::Result<u64> {
    let tokens = tokenizer
        .iter()
        .find(|e| e.key == "tokenizer.ggml.tokens")
        .context("the tokenizer has no tokenizer.ggml.tokens")?;
    match &tokens.value {
        Value::Array(a) if a.values.is_some() && a.len > 0 => Ok(a.len),
        _ => bail!("tokenizer.ggml.tokens must be a non-empty array read in full"),
    }
}

/// The tiny model's GGUF bytes: llama metadata, `tokenizer` copied as is, seeded random weights.
pub fn tiny_model_bytes(options: &TinyModelOptions, tokenizer: &[MetadataEntry]) -> anyhow::Result<Vec<u8>> {
    tiny_model_bytes_with_knobs(options, tokenizer, &[])
}

/// [`tiny_model_bytes`] with `knobs` (`KEY=VALUE`) for the fake llama-server under [`FAKE_KNOBS_KEY`]
/// (none: the key is not written, and the bytes are [`tiny_model_bytes`]').
pub fn tiny_model_bytes_with_knobs(
    options: &TinyModelOptions,
    tokenizer: &[MetadataEntry],
    knobs: &[String],
) -> anyhow::Result<Vec<u8>> {
    let n_vocab = vocab_size(tokenizer)?;
    let u32_value = |v: u64| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let mut metadata = vec![
        ("general.architecture", Value::String("llama".to_owned())),
        ("general.name", Value::String(options.name.clone())),
        ("general.file_type", Value::U32(FILE_TYPE_F16)),
        ("llama.vocab_size", u32_value(n_vocab)),
        ("llama.context_length", u32_value(CONTEXT_LENGTH)),
        ("llama.embedding_length", u32_value(N_EMBD)),
        ("llama.block_count", u32_value(N_LAYER)),
        ("llama.feed_forward_length", u32_value(N_FF)),
        ("llama.attention.head_count", u32_value(N_HEAD)),
        ("llama.attention.head_count_kv", u32_value(N_HEAD_KV)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(RMS_EPS)),
        ("llama.rope.dimension_count", u32_value(N_EMBD / N_HEAD)),
    ]
    .into_iter()
    .map(|(key, value)| MetadataEntry { key: key.to_owned(), value })
    .collect::<Vec<_>>();
    metadata.extend(tokenizer.iter().filter(|e| e.key.starts_with("tokenizer.")).cloned());
    if !knobs.is_empty() {
        metadata.push(MetadataEntry { key: FAKE_KNOBS_KEY.to_owned(), value: Value::String(knobs.join("\n")) });
    }

    let mut rng = XorShift::new(options.seed);
    let mut tensors = vec![matrix(&mut rng, "token_embd.weight", N_EMBD, n_vocab), norm("output_norm.weight")];
    tensors.push(matrix(&mut rng, "output.weight", N_EMBD, n_vocab));
    let head_dim = N_EMBD / N_HEAD;
    for layer in 0..N_LAYER {
        let name = |t: &str| format!("blk.{layer}.{t}.weight");
        tensors.push(norm(&name("attn_norm")));
        tensors.push(matrix(&mut rng, &name("attn_q"), N_EMBD, N_EMBD));
        tensors.push(matrix(&mut rng, &name("attn_k"), N_EMBD, N_HEAD_KV * head_dim));
        tensors.push(matrix(&mut rng, &name("attn_v"), N_EMBD, N_HEAD_KV * head_dim));
        tensors.push(matrix(&mut rng, &name("attn_output"), N_EMBD, N_EMBD));
        tensors.push(norm(&name("ffn_norm")));
        tensors.push(matrix(&mut rng, &name("ffn_gate"), N_EMBD, N_FF));
        tensors.push(matrix(&mut rng, &name("ffn_up"), N_EMBD, N_FF));
        tensors.push(matrix(&mut rng, &name("ffn_down"), N_FF, N_EMBD));
    }

    let mut out = Vec::new();
    write_gguf(&mut out, &metadata, &tensors)?;
    Ok(out)
}

/// Writes the tiny model to `out` atomically and returns its size in bytes.
pub fn write_tiny_model(out: &Path, options: &TinyModelOptions, tokenizer: &[MetadataEntry]) -> anyhow::Result<u64> {
    write_tiny_model_with_knobs(out, options, tokenizer, &[])
}

/// [`write_tiny_model`] with fault knobs for the fake llama-server (see [`tiny_model_bytes_with_knobs`]).
pub fn write_tiny_model_with_knobs(
    out: &Path,
    options: &TinyModelOptions,
    tokenizer: &[MetadataEntry],
    knobs: &[String],
) -> anyhow::Result<u64> {
    let bytes = tiny_model_bytes_with_knobs(options, tokenizer, knobs)?;
    alki_shared::fsutil::write_atomic(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    Ok(bytes.len() as u64)
}

/// One tensor to write: ggml-order dimensions and already-encoded data.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

/// Writes a GGUF v3: header, `metadata` in order, tensor infos, then the data section with every
/// tensor at a multiple of [`ALIGNMENT`], laid out back to back as llama.cpp requires.
pub fn write_gguf(w: &mut impl Write, metadata: &[MetadataEntry], tensors: &[Tensor]) -> anyhow::Result<()> {
    let mut head = Vec::new();
    head.extend_from_slice(&gguf::MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for entry in metadata {
        put_string(&mut head, &entry.key);
        put_value(&mut head, &entry.value).with_context(|| format!("encoding key {}", entry.key))?;
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ggml_type.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).next_multiple_of(ALIGNMENT);
    }
    let mut pos = 0u64;
    let mut put = |bytes: &[u8]| -> std::io::Result<()> {
        w.write_all(bytes)?;
        pos += bytes.len() as u64;
        let padding = pos.next_multiple_of(ALIGNMENT) - pos;
        w.write_all(&vec![0u8; padding as usize])?;
        pos += padding;
        Ok(())
    };
    put(&head)?;
    for t in tensors {
        put(&t.data)?;
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) -> anyhow::Result<()> {
    out.extend_from_slice(&value.value_type().code().to_le_bytes());
    match value {
        Value::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Array(a) => {
            let Some(values) = &a.values else {
                bail!(
                    "array of {} {} elements was not read in full; read it with read_file_with_arrays",
                    a.len,
                    a.elem_type
                );
            };
            out.extend_from_slice(&a.elem_type.code().to_le_bytes());
            out.extend_from_slice(&a.len.to_le_bytes());
            fn each<T>(out: &mut Vec<u8>, v: &[T], f: impl Fn(&T) -> Vec<u8>) {
                v.iter().for_each(|x| out.extend_from_slice(&f(x)));
            }
            match values {
                ArrayValues::U8(v) => out.extend_from_slice(v),
                ArrayValues::I8(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
                ArrayValues::U16(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
                ArrayValues::I16(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
                ArrayValues::U32(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
                ArrayValues::I32(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
                ArrayValues::F32(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
                ArrayValues::Bool(v) => each(out, v, |x| vec![u8::from(*x)]),
                ArrayValues::String(v) => v.iter().for_each(|s| put_string(out, s)),
                ArrayValues::U64(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
                ArrayValues::I64(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
                ArrayValues::F64(v) => each(out, v, |x| x.to_le_bytes().to_vec()),
            }
        }
    }
    Ok(())
}

/// An F16 matrix of ggml dims {ne0, ne1} with weights uniform in ±[`WEIGHT_SCALE`].
fn matrix(rng: &mut XorShift, name: &str, ne0: u64, ne1: u64) -> Tensor {
    let n = ne0 * ne1;
    let mut data = Vec::with_capacity(2 * n as usize);
    for _ in 0..n {
        let w = (rng.next_f32() * 2.0 - 1.0) * WEIGHT_SCALE;
        data.extend_from_slice(&f32_to_f16_bits(w).to_le_bytes());
    }
    Tensor { name: name.to_owned(), dims: vec![ne0, ne1], ggml_type: GGML_TYPE_F16, data }
}

/// An F32 RMS-norm weight of n_embd ones (llama.cpp expects 1-D norms in F32).
fn norm(name: &str) -> Tensor {
    let data = (0..N_EMBD).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    Tensor { name: name.to_owned(), dims: vec![N_EMBD], ggml_type: GGML_TYPE_F32, data }
}

/// IEEE 754 binary16 bits of `x`, rounded to nearest even (subnormals, infinities and NaN handled).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal: shift the mantissa (with its implicit bit) into place, rounding to nearest even.
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rounded = (m + half - 1 + ((m >> shift) & 1)) >> shift;
        return sign | rounded as u16;
    }
    let rounded = mant + 0xfff + ((mant >> 13) & 1);
    // A carry out of the mantissa bumps the exponent, which is the correct rounding (up to infinity).
    let value = ((e as u32) << 10) + (rounded >> 13);
    if value >= 0x7c00 { sign | 0x7c00 } else { sign | value as u16 }
}

/// A tiny seeded generator (xorshift64*): reproducible weights without a dependency.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // splitmix64 of the seed, so that 0 and neighbouring seeds give unrelated, non-zero states.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn tiny(name: &str, seed: u64) -> Vec<u8> {
        let options = TinyModelOptions { name: name.to_owned(), seed };
        tiny_model_bytes(&options, &synthetic_tokenizer(100)).expect("tiny model")
    }

    #[test]
    fn tiny_model_round_trips_through_the_reader() {
        let bytes = tiny("round-trip", 7);
        let tokenizer = synthetic_tokenizer(100);
        let file = gguf::read_with_arrays(&mut Cursor::new(&bytes), |k| k.starts_with("tokenizer."))
            .expect("the reader accepts the writer's output");
        let info = file.info();
        assert_eq!(info.architecture.as_deref(), Some("llama"));
        assert_eq!(info.name.as_deref(), Some("round-trip"));
        assert_eq!(info.quantization.as_deref(), Some("F16"));
        assert_eq!(
            (info.context_length, info.embedding_length, info.block_count, info.head_count, info.head_count_kv),
            (Some(CONTEXT_LENGTH), Some(N_EMBD), Some(N_LAYER), Some(N_HEAD), Some(N_HEAD_KV))
        );
        assert_eq!(file.get("llama.feed_forward_length"), Some(&Value::U32(128)));
        assert_eq!(file.get("llama.attention.layer_norm_rms_epsilon"), Some(&Value::F32(RMS_EPS)));
        for entry in &tokenizer {
            assert_eq!(file.get(&entry.key), Some(&entry.value), "{} survives the round trip", entry.key);
        }

        let n_vocab = 359;
        let expected_params =
            2 * N_EMBD * n_vocab + N_EMBD + N_LAYER * (2 * N_EMBD + 4 * N_EMBD * N_EMBD + 3 * N_EMBD * N_FF);
        assert_eq!(info.parameter_count, expected_params);
        assert_eq!(file.tensors.len() as u64, 3 + 9 * N_LAYER);
        assert_eq!(file.data_offset % ALIGNMENT, 0);
        let mut expected_offset = 0;
        for t in &file.tensors {
            assert_eq!(t.offset, expected_offset, "{} is laid out back to back", t.name);
            let is_norm = t.name.ends_with("norm.weight");
            assert_eq!(t.type_name(), Some(if is_norm { "f32" } else { "f16" }), "{}", t.name);
            expected_offset = (t.offset + t.byte_size().expect("known type")).next_multiple_of(ALIGNMENT);
        }
        assert_eq!(file.data_offset + expected_offset, bytes.len() as u64);
        let embd = &file.tensors[0];
        assert_eq!((embd.name.as_str(), embd.dims.as_slice()), ("token_embd.weight", &[N_EMBD, n_vocab][..]));
        let ffn_down = file.tensors.iter().find(|t| t.name == "blk.1.ffn_down.weight").expect("ffn_down");
        assert_eq!(ffn_down.dims, vec![N_FF, N_EMBD]);
    }

    #[test]
    fn output_depends_only_on_the_options() {
        assert_eq!(tiny("a", 1), tiny("a", 1));
        assert_ne!(tiny("a", 1), tiny("a", 2));
        assert_ne!(tiny("a", 1), tiny("b", 1));
    }

    #[test]
    fn weights_are_small_and_not_constant() {
        let bytes = tiny("w", 3);
        let file = gguf::read(&mut Cursor::new(&bytes)).expect("valid");
        let q = file.tensors.iter().find(|t| t.name == "blk.0.attn_q.weight").expect("attn_q");
        let start = (file.data_offset + q.offset) as usize;
        let halves: Vec<u16> =
            bytes[start..start + 2 * 4096].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let max_abs = halves.iter().map(|h| h & 0x7fff).max().expect("values");
        assert!(max_abs <= f32_to_f16_bits(WEIGHT_SCALE), "weights stay within ±{WEIGHT_SCALE}");
        assert!(halves.iter().any(|h| *h != halves[0]), "weights vary");
    }

    #[test]
    fn every_matrix_row_quantizes_to_q8_0() {
        let bytes = tiny("q8", 1);
        let file = gguf::read(&mut Cursor::new(&bytes)).expect("valid");
        for t in file.tensors.iter().filter(|t| t.dims.len() == 2) {
            assert_eq!(t.dims[0] % Q8_0_BLOCK, 0, "{} rows of {} values fall back from Q8_0", t.name, t.dims[0]);
        }
    }

    #[test]
    fn a_chat_template_changes_the_metadata_and_nothing_else() {
        let options = TinyModelOptions { name: "a".to_owned(), seed: 1 };
        let tokenizer = synthetic_tokenizer(100);
        let chatml = tiny_model_bytes(&options, &with_chat_template(&tokenizer, CHATML_TEMPLATE)).expect("A");
        let twice = with_chat_template(&with_chat_template(&tokenizer, CHATML_TEMPLATE), MISMATCHED_TEMPLATE);
        assert_eq!(twice.iter().filter(|e| e.key == CHAT_TEMPLATE_KEY).count(), 1, "replaced, not added");
        let mismatched = tiny_model_bytes(&options, &twice).expect("B3");

        let read = |bytes: &[u8]| gguf::read_with_arrays(&mut Cursor::new(bytes), |_| false).expect("valid");
        let (a, b3) = (read(&chatml), read(&mismatched));
        assert_eq!(a.get_str(CHAT_TEMPLATE_KEY), Some(CHATML_TEMPLATE));
        assert_eq!(b3.get_str(CHAT_TEMPLATE_KEY), Some(MISMATCHED_TEMPLATE));
        assert!(CHATML_TEMPLATE.contains("'<|im_start|>assistant\\n'"), "Jinja sees the escape, renders a newline");
        let data = |bytes: &[u8], f: &gguf::GgufFile| bytes[f.data_offset as usize..].to_vec();
        assert_eq!(data(&chatml, &a), data(&mismatched, &b3), "same weights");
        assert_eq!(data(&chatml, &a), data(&tiny("a", 1), &read(&tiny("a", 1))), "and the same as without a template");
    }

    #[test]
    fn f16_conversion_matches_known_values() {
        let cases = [
            (0.0f32, 0x0000u16),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (65504.0, 0x7bff),
            (65536.0, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (6.1035156e-5, 0x0400),
            (5.9604645e-8, 0x0001),
            (1e-9, 0x0000),
            (0.1, 0x2e66),
            (0.02, 0x251f),
        ];
        for (x, bits) in cases {
            assert_eq!(f32_to_f16_bits(x), bits, "{x}");
        }
        assert_eq!(f32_to_f16_bits(f32::NAN) & 0x7c00, 0x7c00);
        assert_ne!(f32_to_f16_bits(f32::NAN) & 0x3ff, 0);
    }

    #[test]
    fn a_skipped_array_cannot_be_written() {
        let mut tokenizer = synthetic_tokenizer(10);
        if let Value::Array(a) = &mut tokenizer[2].value {
            a.values = None;
        }
        let err = tiny_model_bytes(&TinyModelOptions::default(), &tokenizer).expect_err("incomplete array");
        assert!(format!("{err:#}").contains("not read in full"), "{err:#}");
    }

    /// Reads the real llama.cpp vocabulary when the llama-server build has cached it; skips otherwise.
    #[test]
    fn real_vocab_copies_into_a_model_the_reader_accepts() {
        let Some(vocab) = cached_vocab_path() else {
            println!("skipped: ggml-vocab-llama-spm.gguf not found (run e2e/scripts/build-llama-server.sh)");
            return;
        };
        let raw = gguf::read_file(&vocab).expect("vocab");
        let tokens = raw.get("tokenizer.ggml.tokens").and_then(Value::as_array).expect("tokens");
        assert_eq!((tokens.len, tokens.values.is_none()), (32000, true), "long arrays are skipped by default");
        assert_eq!(raw.info().architecture.as_deref(), Some("llama"));

        let tokenizer = read_tokenizer(&vocab).expect("tokenizer");
        assert_eq!(vocab_size(&tokenizer).expect("vocab size"), 32000);
        let bytes = tiny_model_bytes(&TinyModelOptions::default(), &tokenizer).expect("model");
        let model = gguf::read_with_arrays(&mut Cursor::new(&bytes), |k| k.starts_with("tokenizer."))
            .expect("the reader accepts the model");
        for entry in &tokenizer {
            assert_eq!(model.get(&entry.key), Some(&entry.value), "{} copied exactly", entry.key);
        }
        let info = model.info();
        assert_eq!(info.parameter_count, 2 * 64 * 32000 + 64 + 2 * (2 * 64 + 4 * 64 * 64 + 3 * 64 * 128));
        assert!(bytes.len() > 8_000_000 && bytes.len() < 10_000_000, "about 9 MB, got {}", bytes.len());
    }
}
