//! GGUF metadata: a bounded reader of header, key/value pairs and tensor infos (never tensor data), and a summary.
//!
//! Every count and length in the file is checked against the bytes that remain before anything is
//! allocated, so a hostile or truncated file yields a [`GgufError`] naming the offset, never a panic or
//! a huge allocation. Long arrays (the token list can hold 260k strings) are skipped unless asked for.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Data-section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest key or tensor name accepted, in bytes.
pub const MAX_KEY_LEN: u64 = 64 * 1024;
/// Longest string value accepted, in bytes.
pub const MAX_STRING_LEN: u64 = 16 * 1024 * 1024;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Arrays with at most this many elements are always kept; longer ones only when asked for.
pub const MAX_KEPT_ARRAY_LEN: u64 = 64;
/// Most key/value pairs accepted, whatever the file size.
pub const MAX_KV_COUNT: u64 = 1 << 20;
/// Most tensors accepted, whatever the file size.
pub const MAX_TENSOR_COUNT: u64 = 1 << 20;

/// Smallest possible key/value pair: key length, a one-byte key, type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Smallest possible tensor info: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// Skips up to this size are read through rather than seeked, which keeps a `BufReader`'s buffer.
const READ_THROUGH_SKIP: u64 = 8 * 1024;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    // Wrapped errors are part of the message (logs print only the message), so they are not `source()`s.
    #[error("cannot open GGUF file {path}: {error}")]
    Open { path: PathBuf, error: io::Error },
    #[error("GGUF file {path}: {error}")]
    File { path: PathBuf, error: Box<GgufError> },
    #[error("I/O error at offset {offset} while reading {what}: {error}")]
    Io { offset: u64, what: String, error: io::Error },
    #[error(
        "truncated GGUF: at offset {offset} expected {what} ({needed} bytes) but the file ends at {size}; \
         the file is incomplete, copy or download it again"
    )]
    Truncated { offset: u64, what: String, needed: u64, size: u64 },
    #[error("not a GGUF file: it starts with {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: Vec<u8> },
    #[error("big-endian GGUF files are not supported; convert the model on a little-endian machine")]
    BigEndian,
    #[error(
        "GGUF version {version} is not supported (versions 2 and 3 are); re-convert the model with a current llama.cpp"
    )]
    UnsupportedVersion { version: u32 },
    #[error("{what} at offset {offset} is negative ({value}); the file is corrupt")]
    Negative { what: String, offset: u64, value: i64 },
    #[error("{what} at offset {offset} declares {count}, more than the {max} this reader accepts")]
    TooMany { what: String, offset: u64, count: u64, max: u64 },
    #[error(
        "{what} at offset {offset} declares {count} entries of at least {min_size} bytes each, \
         but only {remaining} bytes remain in the file; the file is truncated or corrupt"
    )]
    CountExceedsFile { what: String, offset: u64, count: u64, min_size: u64, remaining: u64 },
    #[error("{what} at offset {offset} is {len} bytes long, more than the limit of {max}; the file is corrupt")]
    TooLong { what: String, offset: u64, len: u64, max: u64 },
    #[error("{what} at offset {offset} is not valid UTF-8; the file is corrupt")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("key/value pair {index} at offset {offset} has an empty key; the file is corrupt")]
    EmptyKey { index: u64, offset: u64 },
    #[error("key {key:?} appears twice (second at offset {offset}); the file is corrupt")]
    DuplicateKey { key: String, offset: u64 },
    #[error(
        "key {key:?} at offset {offset} has unknown value type {code}; the file is corrupt or newer than this reader"
    )]
    UnknownValueType { key: String, offset: u64, code: u32 },
    #[error("key {key:?} at offset {offset} is an array of arrays, which GGUF readers do not support")]
    NestedArray { key: String, offset: u64 },
    #[error("general.alignment must be a power-of-two u32, found {found}; the file is corrupt")]
    BadAlignment { found: String },
    #[error("tensor {name:?} appears twice; the file is corrupt")]
    DuplicateTensor { name: String },
    #[error("tensor {name:?} at offset {offset} has {n_dims} dimensions, more than {max}", max = MAX_DIMS)]
    TooManyDims { name: String, offset: u64, n_dims: u32 },
    #[error("tensor {name:?} has dimensions {dims:?} whose element count overflows; the file is corrupt")]
    ElementCountOverflow { name: String, dims: Vec<u64> },
    #[error(
        "tensor {name:?}: its first dimension {ne0} is not a multiple of the block size {block} of type {ggml_type}"
    )]
    BadRowSize { name: String, ne0: u64, block: u64, ggml_type: String },
    #[error(
        "tensor {name:?} has data offset {offset}, not a multiple of the alignment {alignment}; the file is corrupt"
    )]
    MisalignedTensor { name: String, offset: u64, alignment: u64 },
    #[error(
        "tensor {name:?} occupies bytes {start}..{end} of the data section, which holds only {available} bytes; \
         the file is truncated or corrupt"
    )]
    TensorOutOfBounds { name: String, start: u64, end: u64, available: u64 },
    #[error("the tensors' total parameter count overflows 64 bits; the file is corrupt")]
    ParameterCountOverflow,
}

impl GgufError {
    /// The underlying error, without the file-path wrapper that [`read_file`] adds.
    pub fn root(&self) -> &GgufError {
        match self {
            GgufError::File { error, .. } => error.root(),
            other => other,
        }
    }
}

/// The type of a metadata value, with its GGUF type code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    /// The type for a GGUF type code, if it is one.
    pub fn from_code(code: u32) -> Option<ValueType> {
        Some(match code {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The GGUF type code.
    pub fn code(self) -> u32 {
        match self {
            ValueType::U8 => 0,
            ValueType::I8 => 1,
            ValueType::U16 => 2,
            ValueType::I16 => 3,
            ValueType::U32 => 4,
            ValueType::I32 => 5,
            ValueType::F32 => 6,
            ValueType::Bool => 7,
            ValueType::String => 8,
            ValueType::Array => 9,
            ValueType::U64 => 10,
            ValueType::I64 => 11,
            ValueType::F64 => 12,
        }
    }

    /// Encoded size of one value of this type; `None` for strings and arrays, whose size varies.
    pub fn fixed_size(self) -> Option<u64> {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => Some(1),
            ValueType::U16 | ValueType::I16 => Some(2),
            ValueType::U32 | ValueType::I32 | ValueType::F32 => Some(4),
            ValueType::U64 | ValueType::I64 | ValueType::F64 => Some(8),
            ValueType::String | ValueType::Array => None,
        }
    }

    /// Smallest encoded size of one value: a string needs at least its 8-byte length.
    fn min_size(self) -> u64 {
        match self {
            ValueType::String => 8,
            ValueType::Array => 4 + 8,
            other => other.fixed_size().unwrap_or(1),
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        };
        f.write_str(name)
    }
}

/// A metadata value. String values that are not valid UTF-8 are kept with U+FFFD replacements.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value: its element type and length always, its elements when they were kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Array {
    pub elem_type: ValueType,
    pub len: u64,
    /// `None` when the array was longer than [`MAX_KEPT_ARRAY_LEN`] and not asked for.
    pub values: Option<ArrayValues>,
}

/// The elements of a kept array, one vector per element type.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ArrayValues {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl ArrayValues {
    /// Integer elements as `u64`, negative ones dropped; `None` for non-integer arrays.
    pub fn to_u64s(&self) -> Option<Vec<u64>> {
        fn conv<T: Copy + TryInto<u64>>(v: &[T]) -> Vec<u64> {
            v.iter().filter_map(|x| (*x).try_into().ok()).collect()
        }
        Some(match self {
            ArrayValues::U8(v) => conv(v),
            ArrayValues::I8(v) => conv(v),
            ArrayValues::U16(v) => conv(v),
            ArrayValues::I16(v) => conv(v),
            ArrayValues::U32(v) => conv(v),
            ArrayValues::I32(v) => conv(v),
            ArrayValues::U64(v) => conv(v),
            ArrayValues::I64(v) => conv(v),
            ArrayValues::F32(_) | ArrayValues::F64(_) | ArrayValues::Bool(_) | ArrayValues::String(_) => return None,
        })
    }
}

impl Value {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer value that fits in `u64` (negative values give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any float or integer value as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I64(v) => Some(v as f64),
            Value::U64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// Any integer value that fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if this is an array value.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One key/value pair, in file order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetadataEntry {
    pub key: String,
    pub value: Value,
}

/// One tensor's description (its data is never read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (row length).
    pub dims: Vec<u64>,
    /// ggml type code (`GGML_TYPE_*`).
    pub ggml_type: u32,
    /// Offset of the data, relative to the start of the data section.
    pub offset: u64,
    /// Product of `dims` (1 for zero dimensions).
    pub element_count: u64,
}

impl TensorInfo {
    /// The ggml type name (`"f16"`, `"q4_K"`...), if the type is known.
    pub fn type_name(&self) -> Option<&'static str> {
        ggml_type_traits(self.ggml_type).map(|t| t.0)
    }

    /// Size of the tensor's data in bytes, if the type is known and the size fits in `u64`.
    pub fn byte_size(&self) -> Option<u64> {
        let (_, block, size) = ggml_type_traits(self.ggml_type)?;
        (self.element_count / block).checked_mul(size)
    }
}

/// (name, block size in elements, bytes per block) of a ggml tensor type, from ggml's type traits.
pub fn ggml_type_traits(ggml_type: u32) -> Option<(&'static str, u64, u64)> {
    Some(match ggml_type {
        0 => ("f32", 1, 4),
        1 => ("f16", 1, 2),
        2 => ("q4_0", 32, 18),
        3 => ("q4_1", 32, 20),
        6 => ("q5_0", 32, 22),
        7 => ("q5_1", 32, 24),
        8 => ("q8_0", 32, 34),
        9 => ("q8_1", 32, 36),
        10 => ("q2_K", 256, 84),
        11 => ("q3_K", 256, 110),
        12 => ("q4_K", 256, 144),
        13 => ("q5_K", 256, 176),
        14 => ("q6_K", 256, 210),
        15 => ("q8_K", 256, 292),
        16 => ("iq2_xxs", 256, 66),
        17 => ("iq2_xs", 256, 74),
        18 => ("iq3_xxs", 256, 98),
        19 => ("iq1_s", 256, 50),
        20 => ("iq4_nl", 32, 18),
        21 => ("iq3_s", 256, 110),
        22 => ("iq2_s", 256, 82),
        23 => ("iq4_xs", 256, 136),
        24 => ("i8", 1, 1),
        25 => ("i16", 1, 2),
        26 => ("i32", 1, 4),
        27 => ("i64", 1, 8),
        28 => ("f64", 1, 8),
        29 => ("iq1_m", 256, 56),
        30 => ("bf16", 1, 2),
        34 => ("tq1_0", 256, 54),
        35 => ("tq2_0", 256, 66),
        39 => ("mxfp4", 32, 17),
        40 => ("nvfp4", 64, 36),
        41 => ("q1_0", 128, 18),
        42 => ("q2_0", 64, 18),
        _ => return None,
    })
}

/// The quantization name for a `general.file_type` value (llama.cpp's `llama_ftype`), e.g. 15 → "Q4_K_M".
pub fn file_type_name(file_type: u64) -> String {
    let name = match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        39 => "NVFP4",
        40 => "Q1_0",
        41 => "Q2_0",
        other => return format!("ftype-{other}"),
    };
    name.to_owned()
}

/// A parsed GGUF file: everything except tensor data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GgufFile {
    pub version: u32,
    /// Key/value pairs in file order; keys are unique.
    pub metadata: Vec<MetadataEntry>,
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment`, or [`DEFAULT_ALIGNMENT`].
    pub alignment: u64,
    /// Where the (aligned) data section starts, from the start of the GGUF.
    pub data_offset: u64,
    /// Size of the GGUF from its start to the end of the stream.
    pub file_size: u64,
    /// Sum of the tensors' element counts.
    pub parameter_count: u64,
}

impl GgufFile {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|e| e.key == key).map(|e| &e.value)
    }

    /// The string value of `key`, if present and a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The integer value of `key` as `u64`, if present and a non-negative integer.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// `general.architecture`, e.g. `"llama"`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// Bytes from the aligned data offset to the end of the file.
    pub fn tensor_data_size(&self) -> u64 {
        self.file_size.saturating_sub(self.data_offset)
    }

    /// The largest value of an integer key that may be a scalar or a per-layer array.
    fn max_u64(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            Value::Array(a) => a.values.as_ref()?.to_u64s()?.into_iter().max(),
            v => v.as_u64(),
        }
    }

    /// The summary of what a fleet needs to know about this model.
    pub fn info(&self) -> GgufInfo {
        let arch = self.architecture().map(str::to_owned);
        let arch_key = |suffix: &str| format!("{}.{suffix}", arch.as_deref().unwrap_or(""));
        let head_count = self.max_u64(&arch_key("attention.head_count"));
        let file_type = self.get_u64("general.file_type");
        GgufInfo {
            version: self.version,
            name: self.get_str("general.name").map(str::to_owned),
            context_length: self.get_u64(&arch_key("context_length")),
            embedding_length: self.get_u64(&arch_key("embedding_length")),
            block_count: self.get_u64(&arch_key("block_count")),
            head_count,
            head_count_kv: self.max_u64(&arch_key("attention.head_count_kv")).or(head_count),
            key_length: self.get_u64(&arch_key("attention.key_length")),
            value_length: self.get_u64(&arch_key("attention.value_length")),
            file_type,
            quantization: file_type.map(file_type_name),
            parameter_count: self.parameter_count,
            tensor_count: self.tensors.len() as u64,
            tensor_data_size: self.tensor_data_size(),
            file_size: self.file_size,
            alignment: self.alignment,
            chat_template: self.get_str("tokenizer.chat_template").map(str::to_owned),
            architecture: arch,
        }
    }
}

/// What a fleet needs to know about a model, from its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GgufInfo {
    pub version: u32,
    /// `general.architecture`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// `{arch}.context_length`: the training context.
    pub context_length: Option<u64>,
    /// `{arch}.embedding_length`.
    pub embedding_length: Option<u64>,
    /// `{arch}.block_count`: the number of layers.
    pub block_count: Option<u64>,
    /// `{arch}.attention.head_count` (the maximum if per layer).
    pub head_count: Option<u64>,
    /// `{arch}.attention.head_count_kv` (the maximum if per layer); `head_count` when absent.
    pub head_count_kv: Option<u64>,
    /// `{arch}.attention.key_length`: per-head K size, when it is not embedding_length / head_count.
    pub key_length: Option<u64>,
    /// `{arch}.attention.value_length`: per-head V size, when it is not embedding_length / head_count.
    pub value_length: Option<u64>,
    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub file_type: Option<u64>,
    /// `file_type` as a name: "F16", "Q4_K_M", ... ("ftype-N" when unknown).
    pub quantization: Option<String>,
    /// Sum of the tensors' element counts.
    pub parameter_count: u64,
    pub tensor_count: u64,
    /// Bytes from the aligned data offset to the end of the file.
    pub tensor_data_size: u64,
    pub file_size: u64,
    pub alignment: u64,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufInfo {
    /// Estimated bytes of an F16 KV cache holding `context` tokens:
    /// 2 (K and V) × block_count × context × n_embd_k_gqa × 2 bytes, where
    /// n_embd_k_gqa = embedding_length / head_count × head_count_kv (per-head K/V sizes from
    /// `key_length`/`value_length` when present). 0 when the layer count or embedding size is unknown.
    pub fn kv_cache_bytes(&self, context: u64) -> u64 {
        let blocks = self.block_count.unwrap_or(0);
        let embd = self.embedding_length.unwrap_or(0);
        let head_count = self.head_count.unwrap_or(0);
        let head_dim = embd.checked_div(head_count).unwrap_or(0);
        let (k_len, v_len) = (self.key_length.unwrap_or(head_dim), self.value_length.unwrap_or(head_dim));
        let per_token_per_layer = match self.head_count_kv {
            // No head counts at all: assume no grouped-query attention, K and V each embedding_length wide.
            _ if head_count == 0 && self.key_length.is_none() => embd.saturating_mul(2),
            Some(kv) => kv.saturating_mul(k_len.saturating_add(v_len)),
            None => head_count.saturating_mul(k_len.saturating_add(v_len)),
        };
        blocks.saturating_mul(context).saturating_mul(per_token_per_layer).saturating_mul(2)
    }
}

/// Reads a GGUF's metadata from the reader's current position, keeping long arrays only for the
/// per-layer head counts. Pass a buffered reader: many small reads are made.
pub fn read<R: Read + Seek>(reader: &mut R) -> Result<GgufFile, GgufError> {
    read_with_arrays(reader, |_| false)
}

/// Like [`read`], and also keeps the full value of every array whose key `keep_array` accepts
/// (e.g. `|k| k.starts_with("tokenizer.")`).
pub fn read_with_arrays<R: Read + Seek>(
    reader: &mut R,
    keep_array: impl Fn(&str) -> bool,
) -> Result<GgufFile, GgufError> {
    let start = reader.stream_position().map_err(|e| io_err(0, "the stream position", e))?;
    let end = reader.seek(SeekFrom::End(0)).map_err(|e| io_err(0, "the file size", e))?;
    reader.seek(SeekFrom::Start(start)).map_err(|e| io_err(0, "the file start", e))?;
    let size = end.saturating_sub(start);
    let mut r = Reader { inner: reader, pos: 0, size };
    parse(&mut r, &keep_array)
}

/// Reads a GGUF file's metadata (see [`read`]).
pub fn read_file(path: &Path) -> Result<GgufFile, GgufError> {
    read_file_with_arrays(path, |_| false)
}

/// Reads a GGUF file's metadata, keeping the arrays `keep_array` accepts (see [`read_with_arrays`]).
pub fn read_file_with_arrays(path: &Path, keep_array: impl Fn(&str) -> bool) -> Result<GgufFile, GgufError> {
    let file = File::open(path).map_err(|error| GgufError::Open { path: path.to_owned(), error })?;
    read_with_arrays(&mut BufReader::with_capacity(64 * 1024, file), keep_array)
        .map_err(|error| GgufError::File { path: path.to_owned(), error: Box::new(error) })
}

fn io_err(offset: u64, what: &str, source: io::Error) -> GgufError {
    GgufError::Io { offset, what: what.to_owned(), error: source }
}

/// Keys whose arrays are always kept: [`GgufFile::info`] needs them whatever their length.
fn always_keep(key: &str) -> bool {
    key.ends_with(".attention.head_count") || key.ends_with(".attention.head_count_kv")
}

fn parse<R: Read + Seek>(r: &mut Reader<'_, R>, keep_array: &dyn Fn(&str) -> bool) -> Result<GgufFile, GgufError> {
    let magic: [u8; 4] = r.bytes(format_args!("the GGUF magic"))?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic.to_vec() });
    }
    let version = r.u32(format_args!("the GGUF version"))?;
    match version {
        2 | 3 => {}
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => return Err(GgufError::BigEndian),
        v => return Err(GgufError::UnsupportedVersion { version: v }),
    }
    let n_tensors = r.count(format_args!("the tensor count"))?;
    let n_kv = r.count(format_args!("the key/value count"))?;
    // Both tables must fit in what follows the header.
    r.check_count(format_args!("the tensor count"), n_tensors, MIN_TENSOR_INFO_BYTES, MAX_TENSOR_COUNT, 8)?;
    r.check_count(format_args!("the key/value count"), n_kv, MIN_KV_BYTES, MAX_KV_COUNT, 16)?;
    let tensor_table = n_tensors.saturating_mul(MIN_TENSOR_INFO_BYTES);
    let remaining = r.remaining().saturating_sub(tensor_table);
    if n_kv.saturating_mul(MIN_KV_BYTES) > remaining {
        return Err(GgufError::CountExceedsFile {
            what: format!("the key/value count (beside {n_tensors} tensor infos)"),
            offset: 16,
            count: n_kv,
            min_size: MIN_KV_BYTES,
            remaining,
        });
    }

    let mut metadata = Vec::with_capacity(n_kv.min(256) as usize);
    let mut seen = HashSet::new();
    for index in 0..n_kv {
        let key_offset = r.pos;
        let key = r.string(format_args!("key {index}"), MAX_KEY_LEN, true)?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey { index, offset: key_offset });
        }
        if !seen.insert(key.clone()) {
            return Err(GgufError::DuplicateKey { key, offset: key_offset });
        }
        let value = r.value(&key, keep_array)?;
        metadata.push(MetadataEntry { key, value });
    }

    let alignment = match metadata.iter().find(|e| e.key == "general.alignment").map(|e| &e.value) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => return Err(GgufError::BadAlignment { found: format!("{other:?}") }),
    };

    let mut tensors = Vec::with_capacity(n_tensors.min(4096) as usize);
    let mut names = HashSet::new();
    for _ in 0..n_tensors {
        let tensor = r.tensor_info()?;
        if !names.insert(tensor.name.clone()) {
            return Err(GgufError::DuplicateTensor { name: tensor.name });
        }
        tensors.push(tensor);
    }

    // r.pos <= r.size, so rounding up to a power of two below 2^32 cannot overflow in practice.
    let data_offset = r.pos.checked_next_multiple_of(alignment).unwrap_or(u64::MAX);
    let available = r.size.saturating_sub(data_offset);
    let mut parameter_count: u64 = 0;
    for t in &tensors {
        parameter_count = parameter_count.checked_add(t.element_count).ok_or(GgufError::ParameterCountOverflow)?;
        check_extent(t, alignment, available)?;
    }
    Ok(GgufFile { version, metadata, tensors, alignment, data_offset, file_size: r.size, parameter_count })
}

/// Checks that a tensor's data lies inside the data section, so a truncated file is caught here.
fn check_extent(t: &TensorInfo, alignment: u64, available: u64) -> Result<(), GgufError> {
    if !t.offset.is_multiple_of(alignment) {
        return Err(GgufError::MisalignedTensor { name: t.name.clone(), offset: t.offset, alignment });
    }
    if let Some((type_name, block, _)) = ggml_type_traits(t.ggml_type) {
        let ne0 = t.dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(block) {
            return Err(GgufError::BadRowSize { name: t.name.clone(), ne0, block, ggml_type: type_name.into() });
        }
    }
    // Unknown (newer) types cannot be sized: check at least that their start is inside the file. A known
    // type whose size overflows u64 is a lie no file can back (found by shared/tests/fuzz_gguf.rs).
    let len = match (ggml_type_traits(t.ggml_type), t.byte_size()) {
        (Some(_), None) => u64::MAX,
        (_, len) => len.unwrap_or(0),
    };
    let end = t.offset.checked_add(len);
    match end {
        Some(end) if end <= available && t.offset <= available => Ok(()),
        _ => Err(GgufError::TensorOutOfBounds {
            name: t.name.clone(),
            start: t.offset,
            end: end.unwrap_or(u64::MAX),
            available,
        }),
    }
}

/// What is being read, for error messages; formatted only when an error occurs.
type What<'a> = fmt::Arguments<'a>;

/// A position-tracking reader that checks every read against the bytes left in the file.
struct Reader<'a, R> {
    inner: &'a mut R,
    pos: u64,
    size: u64,
}

impl<R: Read + Seek> Reader<'_, R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn truncated(&self, needed: u64, what: What<'_>) -> GgufError {
        GgufError::Truncated { offset: self.pos, what: what.to_string(), needed, size: self.size }
    }

    fn need(&self, n: u64, what: What<'_>) -> Result<(), GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(n, what));
        }
        Ok(())
    }

    fn read_err(&self, n: u64, what: What<'_>, e: io::Error) -> GgufError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            // The file shrank while being read.
            self.truncated(n, what)
        } else {
            GgufError::Io { offset: self.pos, what: what.to_string(), error: e }
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: What<'_>) -> Result<(), GgufError> {
        let n = buf.len() as u64;
        self.need(n, what)?;
        self.inner.read_exact(buf).map_err(|e| self.read_err(n, what, e))?;
        self.pos += n;
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: What<'_>) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: What<'_>) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: What<'_>) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A non-negative i64 count.
    fn count(&mut self, what: What<'_>) -> Result<u64, GgufError> {
        let offset = self.pos;
        let v = i64::from_le_bytes(self.bytes(what)?);
        u64::try_from(v).map_err(|_| GgufError::Negative { what: what.to_string(), offset, value: v })
    }

    /// Rejects a count above `max`, or one whose entries (at least `min_size` bytes each) cannot fit.
    fn check_count(&self, what: What<'_>, count: u64, min_size: u64, max: u64, offset: u64) -> Result<(), GgufError> {
        if count > max {
            return Err(GgufError::TooMany { what: what.to_string(), offset, count, max });
        }
        let remaining = self.remaining();
        if count.checked_mul(min_size).is_none_or(|n| n > remaining) {
            return Err(GgufError::CountExceedsFile { what: what.to_string(), offset, count, min_size, remaining });
        }
        Ok(())
    }

    fn skip(&mut self, n: u64, what: What<'_>) -> Result<(), GgufError> {
        self.need(n, what)?;
        if n <= READ_THROUGH_SKIP {
            // Reading through keeps a BufReader's buffer, which a seek would discard.
            let mut scratch = [0u8; READ_THROUGH_SKIP as usize];
            let buf = scratch.get_mut(..n as usize).unwrap_or_default();
            self.inner.read_exact(buf).map_err(|e| self.read_err(n, what, e))?;
        } else {
            // n <= remaining <= the stream's length, which a seek offset can express.
            let delta = i64::try_from(n).unwrap_or(i64::MAX);
            self.inner.seek(SeekFrom::Current(delta)).map_err(|e| self.read_err(n, what, e))?;
        }
        self.pos += n;
        Ok(())
    }

    /// Reads a string's length, checked against `max` and the remaining bytes.
    fn string_len(&mut self, what: What<'_>, max: u64) -> Result<u64, GgufError> {
        let offset = self.pos;
        let len = self.u64(format_args!("the length of {what}"))?;
        if len > max {
            return Err(GgufError::TooLong { what: what.to_string(), offset, len, max });
        }
        self.need(len, what)?;
        Ok(len)
    }

    /// Reads a length-prefixed string; `strict` rejects invalid UTF-8 instead of replacing it.
    fn string(&mut self, what: What<'_>, max: u64, strict: bool) -> Result<String, GgufError> {
        let offset = self.pos;
        let len = self.string_len(what, max)?;
        // len <= max (at most 16 MiB) and <= the bytes left in the file.
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.fill(&mut buf, what)?;
        match String::from_utf8(buf) {
            Ok(s) => Ok(s),
            Err(_) if strict => Err(GgufError::InvalidUtf8 { what: what.to_string(), offset }),
            Err(e) => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        }
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType, GgufError> {
        let offset = self.pos;
        let code = self.u32(format_args!("the value type of key {key:?}"))?;
        ValueType::from_code(code).ok_or_else(|| GgufError::UnknownValueType { key: key.to_owned(), offset, code })
    }

    fn value(&mut self, key: &str, keep_array: &dyn Fn(&str) -> bool) -> Result<Value, GgufError> {
        let offset = self.pos;
        let value_type = self.value_type(key)?;
        let what = format_args!("the value of key {key:?}");
        Ok(match value_type {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.bytes(what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.bytes(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.bytes(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.bytes(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.bytes(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.bytes(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.bytes(what)?)),
            ValueType::Bool => Value::Bool(u8::from_le_bytes(self.bytes(what)?) != 0),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.bytes(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.bytes(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.bytes(what)?)),
            ValueType::String => Value::String(self.string(what, MAX_STRING_LEN, false)?),
            ValueType::Array => {
                let elem_type = self.value_type(key)?;
                if elem_type == ValueType::Array {
                    return Err(GgufError::NestedArray { key: key.to_owned(), offset });
                }
                let count_offset = self.pos;
                let len = self.u64(format_args!("the length of array {key:?}"))?;
                let what = format_args!("array {key:?}");
                self.check_count(what, len, elem_type.min_size(), u64::MAX, count_offset)?;
                let elem = format_args!("an element of array {key:?}");
                let values = if len <= MAX_KEPT_ARRAY_LEN || always_keep(key) || keep_array(key) {
                    Some(self.array_values(elem_type, len, elem)?)
                } else {
                    self.skip_array(elem_type, len, elem)?;
                    None
                };
                Value::Array(Array { elem_type, len, values })
            }
        })
    }

    fn skip_array(&mut self, elem_type: ValueType, len: u64, what: What<'_>) -> Result<(), GgufError> {
        match elem_type.fixed_size() {
            // check_count proved that len * size fits in the remaining bytes.
            Some(size) => self.skip(len.saturating_mul(size), what),
            None => {
                // Each string consumes at least 8 bytes, so this loop ends within the file.
                for _ in 0..len {
                    let n = self.string_len(what, MAX_STRING_LEN)?;
                    self.skip(n, what)?;
                }
                Ok(())
            }
        }
    }

    /// Reads `len` fixed-size elements; `len` was checked against the remaining bytes.
    fn vec<const N: usize, T>(
        &mut self,
        len: u64,
        what: What<'_>,
        conv: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        let mut out = Vec::with_capacity(len.min(1 << 20) as usize);
        for _ in 0..len {
            out.push(conv(self.bytes(what)?));
        }
        Ok(out)
    }

    fn array_values(&mut self, elem_type: ValueType, len: u64, what: What<'_>) -> Result<ArrayValues, GgufError> {
        Ok(match elem_type {
            ValueType::U8 => ArrayValues::U8(self.vec(len, what, u8::from_le_bytes)?),
            ValueType::I8 => ArrayValues::I8(self.vec(len, what, i8::from_le_bytes)?),
            ValueType::U16 => ArrayValues::U16(self.vec(len, what, u16::from_le_bytes)?),
            ValueType::I16 => ArrayValues::I16(self.vec(len, what, i16::from_le_bytes)?),
            ValueType::U32 => ArrayValues::U32(self.vec(len, what, u32::from_le_bytes)?),
            ValueType::I32 => ArrayValues::I32(self.vec(len, what, i32::from_le_bytes)?),
            ValueType::F32 => ArrayValues::F32(self.vec(len, what, f32::from_le_bytes)?),
            ValueType::Bool => ArrayValues::Bool(self.vec(len, what, |b: [u8; 1]| u8::from_le_bytes(b) != 0)?),
            ValueType::U64 => ArrayValues::U64(self.vec(len, what, u64::from_le_bytes)?),
            ValueType::I64 => ArrayValues::I64(self.vec(len, what, i64::from_le_bytes)?),
            ValueType::F64 => ArrayValues::F64(self.vec(len, what, f64::from_le_bytes)?),
            // Nested arrays were refused before this point; treat one like a string list regardless.
            ValueType::String | ValueType::Array => {
                let mut out = Vec::with_capacity(len.min(1 << 20) as usize);
                for _ in 0..len {
                    out.push(self.string(what, MAX_STRING_LEN, false)?);
                }
                ArrayValues::String(out)
            }
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo, GgufError> {
        let name = self.string(format_args!("a tensor name"), MAX_KEY_LEN, true)?;
        let dims_offset = self.pos;
        let n_dims = self.u32(format_args!("the dimension count of tensor {name:?}"))?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, offset: dims_offset, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.count(format_args!("a dimension of tensor {name:?}"))?);
        }
        // ggml keeps element counts in i64.
        let element_count = dims
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .filter(|n| i64::try_from(*n).is_ok())
            .ok_or_else(|| GgufError::ElementCountOverflow { name: name.clone(), dims: dims.clone() })?;
        let ggml_type = self.u32(format_args!("the type of tensor {name:?}"))?;
        let offset = self.u64(format_args!("the data offset of tensor {name:?}"))?;
        Ok(TensorInfo { name, dims, ggml_type, offset, element_count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A little-endian GGUF byte builder for tests, deliberately independent of the reader.
    #[derive(Default)]
    struct Builder {
        buf: Vec<u8>,
    }

    impl Builder {
        fn header(version: u32, n_tensors: i64, n_kv: i64) -> Builder {
            let mut b = Builder::default();
            b.buf.extend_from_slice(b"GGUF");
            b.u32(version).i64(n_tensors).i64(n_kv);
            b
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.buf.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.buf.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn i64(&mut self, v: i64) -> &mut Self {
            self.buf.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.buf.extend_from_slice(s.as_bytes());
            self
        }
        fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
            self.str(k).u32(4).u32(v)
        }
        fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
            self.str(k).u32(8).str(v)
        }
        fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> &mut Self {
            self.str(name).u32(dims.len() as u32);
            for d in dims {
                self.u64(*d);
            }
            self.u32(ggml_type).u64(offset)
        }
        fn pad(&mut self, alignment: usize) -> &mut Self {
            while !self.buf.len().is_multiple_of(alignment) {
                self.buf.push(0);
            }
            self
        }
        fn zeros(&mut self, n: usize) -> &mut Self {
            self.buf.resize(self.buf.len() + n, 0);
            self
        }
    }

    /// A small valid llama-like file: 11 KV pairs (including a 100-string token list and a
    /// per-layer head_count_kv array) and two F32 tensors whose sizes are multiples of 32, so
    /// every strict prefix of the file is invalid.
    fn valid_file() -> Vec<u8> {
        let mut b = Builder::header(3, 2, 11);
        b.kv_str("general.architecture", "llama")
            .kv_str("general.name", "tiny")
            .kv_u32("general.file_type", 1)
            .kv_u32("llama.context_length", 2048)
            .kv_u32("llama.embedding_length", 64)
            .kv_u32("llama.block_count", 2)
            .kv_u32("llama.attention.head_count", 4);
        b.str("llama.attention.head_count_kv").u32(9).u32(5).u64(2).u32(2).u32(1);
        b.str("llama.attention.layer_norm_rms_epsilon").u32(6).buf.extend_from_slice(&1e-5f32.to_le_bytes());
        b.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(100);
        for i in 0..100 {
            b.str(&format!("tok{i}"));
        }
        b.kv_str("tokenizer.chat_template", "{{ messages }}");
        b.tensor("output_norm.weight", &[64], 0, 0).tensor("token_embd.weight", &[8, 100], 1, 256);
        b.pad(32).zeros(64 * 4).zeros(8 * 100 * 2);
        b.buf
    }

    fn parse_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        read(&mut Cursor::new(bytes))
    }

    #[test]
    fn valid_file_parses_with_the_right_values() {
        let bytes = valid_file();
        let f = parse_bytes(&bytes).expect("valid file");
        assert_eq!(f.version, 3);
        assert_eq!(f.metadata.len(), 11);
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.data_offset % 32, 0);
        assert_eq!(f.file_size, bytes.len() as u64);
        let tokens = f.get("tokenizer.ggml.tokens").and_then(Value::as_array).expect("tokens");
        assert_eq!((tokens.elem_type, tokens.len, tokens.values.is_none()), (ValueType::String, 100, true));
        assert_eq!(f.tensors[1].dims, vec![8, 100]);
        assert_eq!(f.tensors[1].type_name(), Some("f16"));
        assert_eq!(f.tensors[1].byte_size(), Some(1600));

        let info = f.info();
        assert_eq!(info.architecture.as_deref(), Some("llama"));
        assert_eq!(info.name.as_deref(), Some("tiny"));
        assert_eq!(info.context_length, Some(2048));
        assert_eq!(info.embedding_length, Some(64));
        assert_eq!(info.block_count, Some(2));
        assert_eq!(info.head_count, Some(4));
        assert_eq!(info.head_count_kv, Some(2), "max of the per-layer array");
        assert_eq!(info.quantization.as_deref(), Some("F16"));
        assert_eq!(info.parameter_count, 64 + 800);
        assert_eq!(info.tensor_data_size, 64 * 4 + 1600);
        assert_eq!(info.chat_template.as_deref(), Some("{{ messages }}"));
        // 2 × 2 layers × 512 tokens × (64 / 4 × 2) × 2 bytes.
        assert_eq!(info.kv_cache_bytes(512), 2 * 2 * 512 * 32 * 2);
        let json = serde_json::to_value(&info).expect("serialize");
        assert_eq!(json["quantization"], "F16");
    }

    #[test]
    fn asked_for_arrays_are_kept_in_full() {
        let bytes = valid_file();
        let f = read_with_arrays(&mut Cursor::new(&bytes), |k| k == "tokenizer.ggml.tokens").expect("valid");
        let tokens = f.get("tokenizer.ggml.tokens").and_then(Value::as_array).expect("tokens");
        match &tokens.values {
            Some(ArrayValues::String(v)) => assert_eq!((v.len(), v[99].as_str()), (100, "tok99")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reading_starts_at_the_current_position() {
        let mut bytes = b"prefix".to_vec();
        bytes.extend(valid_file());
        let mut cursor = Cursor::new(bytes);
        cursor.set_position(6);
        let f = read(&mut cursor).expect("valid file after a prefix");
        assert_eq!(f.info().name.as_deref(), Some("tiny"));
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let mut bytes = valid_file();
        bytes[..4].copy_from_slice(b"GGML");
        let err = parse_bytes(&bytes).expect_err("bad magic");
        assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains("not a GGUF file"), "{err}");
    }

    #[test]
    fn versions_other_than_2_and_3_are_rejected() {
        for version in [0, 1, 4, 0xffff_ffff] {
            let err = parse_bytes(&Builder::header(version, 0, 0).buf).expect_err("unsupported");
            assert!(matches!(err, GgufError::UnsupportedVersion { version: v } if v == version), "{err}");
            assert!(err.to_string().contains("re-convert"), "{err}");
        }
        assert!(matches!(parse_bytes(&Builder::header(3u32.swap_bytes(), 0, 0).buf), Err(GgufError::BigEndian)));
        let v2 = parse_bytes(&Builder::header(2, 0, 0).buf).expect("version 2 is fine");
        assert_eq!((v2.version, v2.parameter_count), (2, 0));
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let bytes = valid_file();
        for len in 0..bytes.len() {
            let err = parse_bytes(&bytes[..len]).expect_err("a strict prefix must not parse");
            assert!(
                matches!(
                    err,
                    GgufError::Truncated { .. }
                        | GgufError::CountExceedsFile { .. }
                        | GgufError::TensorOutOfBounds { .. }
                ),
                "prefix {len}: {err}"
            );
        }
        let err = parse_bytes(&bytes[..300]).expect_err("truncated");
        assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("offset ") && msg.contains("incomplete"), "{msg}");
    }

    #[test]
    fn a_string_length_of_u64_max_is_rejected_without_allocating() {
        let mut b = Builder::header(3, 0, 1);
        b.str("general.name").u32(8).u64(u64::MAX);
        let err = parse_bytes(&b.buf).expect_err("huge string");
        assert!(matches!(err, GgufError::TooLong { len: u64::MAX, .. }), "{err}");
        // A length under the cap but beyond the file is a truncation.
        let mut b = Builder::header(3, 0, 1);
        b.str("general.name").u32(8).u64(1000).zeros(10);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::Truncated { needed: 1000, .. })));
        // So is a key length of u64::MAX.
        let mut b = Builder::header(3, 0, 1);
        b.u64(u64::MAX).zeros(20);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::TooLong { .. })));
    }

    #[test]
    fn huge_or_negative_counts_are_rejected() {
        let err = parse_bytes(&Builder::header(3, 0, 1 << 62).buf).expect_err("n_kv 2^62");
        assert!(matches!(err, GgufError::TooMany { count, .. } if count == 1 << 62), "{err}");
        let err = parse_bytes(&Builder::header(3, 1 << 62, 0).buf).expect_err("n_tensors 2^62");
        assert!(matches!(err, GgufError::TooMany { .. }), "{err}");
        let mut b = Builder::header(3, 0, 1000);
        b.zeros(100);
        let err = parse_bytes(&b.buf).expect_err("n_kv beyond the file");
        assert!(matches!(err, GgufError::CountExceedsFile { count: 1000, .. }), "{err}");
        let err = parse_bytes(&Builder::header(3, -1, 0).buf).expect_err("negative");
        assert!(matches!(err, GgufError::Negative { value: -1, .. }), "{err}");
    }

    #[test]
    fn an_array_count_lying_about_its_size_is_rejected() {
        for elem_type in [0u32, 4, 8, 12] {
            let mut b = Builder::header(3, 0, 1);
            b.str("tokenizer.ggml.scores").u32(9).u32(elem_type).u64(1 << 40).zeros(64);
            let err = parse_bytes(&b.buf).expect_err("lying array");
            assert!(matches!(err, GgufError::CountExceedsFile { count, .. } if count == 1 << 40), "{err}");
        }
        // Kept as well as skipped arrays are bounded.
        let mut b = Builder::header(3, 0, 1);
        b.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(u64::MAX);
        let err = read_with_arrays(&mut Cursor::new(&b.buf), |_| true).expect_err("lying array");
        assert!(matches!(err, GgufError::CountExceedsFile { .. }), "{err}");
        // Nested arrays and unknown types are refused.
        let mut b = Builder::header(3, 0, 1);
        b.str("a").u32(9).u32(9).u64(1).zeros(16);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::NestedArray { .. })));
        let mut b = Builder::header(3, 0, 1);
        b.str("a").u32(13).zeros(8);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::UnknownValueType { code: 13, .. })));
    }

    #[test]
    fn bad_tensor_infos_are_rejected() {
        let mut b = Builder::header(3, 1, 0);
        b.tensor("t", &[1; 9], 0, 0).zeros(64);
        let err = parse_bytes(&b.buf).expect_err("9 dims");
        assert!(matches!(err, GgufError::TooManyDims { n_dims: 9, .. }), "{err}");

        let mut b = Builder::header(3, 1, 0);
        b.tensor("t", &[1 << 40, 1 << 40], 0, 0).zeros(64);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::ElementCountOverflow { .. })));

        let mut b = Builder::header(3, 1, 0);
        b.tensor("t", &[u64::MAX], 0, 0).zeros(64);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::Negative { .. })));

        let mut b = Builder::header(3, 1, 0);
        b.tensor("t", &[8], 0, 4).pad(32).zeros(64);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::MisalignedTensor { offset: 4, .. })));

        let mut b = Builder::header(3, 1, 0);
        b.tensor("t", &[1024], 0, 0).pad(32).zeros(64);
        let err = parse_bytes(&b.buf).expect_err("data beyond the file");
        assert!(matches!(err, GgufError::TensorOutOfBounds { end: 4096, available: 64, .. }), "{err}");

        let mut b = Builder::header(3, 2, 0);
        b.tensor("t", &[8], 0, 0).tensor("t", &[8], 0, 32).pad(32).zeros(64);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::DuplicateTensor { .. })));
    }

    #[test]
    fn bad_keys_and_alignment_are_rejected() {
        let mut b = Builder::header(3, 0, 2);
        b.kv_u32("a", 1).kv_u32("a", 2);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::DuplicateKey { .. })));
        let mut b = Builder::header(3, 0, 1);
        b.kv_u32("", 1);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::EmptyKey { .. })));
        let mut b = Builder::header(3, 0, 1);
        b.kv_u32("general.alignment", 48);
        assert!(matches!(parse_bytes(&b.buf), Err(GgufError::BadAlignment { .. })));
        let mut b = Builder::header(3, 1, 1);
        b.kv_u32("general.alignment", 64).tensor("t", &[16], 0, 0).pad(64).zeros(64);
        let f = parse_bytes(&b.buf).expect("alignment 64");
        assert_eq!((f.alignment, f.data_offset % 64), (64, 0));
    }

    #[test]
    fn kv_cache_estimate_guards_missing_and_zero_values() {
        let mut info = parse_bytes(&valid_file()).expect("valid").info();
        info.head_count = Some(0);
        assert_eq!(info.kv_cache_bytes(10), 2 * 2 * 10 * 64 * 2, "no heads: no GQA assumed");
        info.block_count = None;
        assert_eq!(info.kv_cache_bytes(10), 0);
        info.block_count = Some(u64::MAX);
        assert_eq!(info.kv_cache_bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn file_type_names() {
        assert_eq!(file_type_name(15), "Q4_K_M");
        assert_eq!(file_type_name(32), "BF16");
        assert_eq!(file_type_name(999), "ftype-999");
    }

    #[test]
    fn read_file_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &valid_file()[..300]).expect("write");
        let err = read_file(&path).expect_err("truncated");
        assert!(err.to_string().contains("m.gguf"), "{err}");
        assert!(matches!(err.root(), GgufError::Truncated { .. }), "{err}");
        let err = read_file(&dir.path().join("missing.gguf")).expect_err("missing");
        assert!(matches!(err, GgufError::Open { .. }), "{err}");
        std::fs::write(&path, valid_file()).expect("write");
        assert_eq!(read_file(&path).expect("valid").info().name.as_deref(), Some("tiny"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Corrupting a valid file gives an error or a file whose tensors still lie inside it.
            #[test]
            fn corrupted_files_never_panic(
                flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
            ) {
                let mut bytes = valid_file();
                for (index, byte) in flips {
                    let i = index.index(bytes.len());
                    bytes[i] = byte;
                }
                if let Ok(f) = parse_bytes(&bytes) {
                    for t in &f.tensors {
                        let end = f.data_offset + t.offset + t.byte_size().unwrap_or(0);
                        prop_assert!(end <= f.file_size, "{} ends at {end} beyond {}", t.name, f.file_size);
                    }
                }
                let _ = read_with_arrays(&mut Cursor::new(&bytes), |_| true);
            }

            #[test]
            fn arbitrary_bytes_after_a_valid_header_never_panic(
                n_tensors in 0i64..4,
                n_kv in 0i64..4,
                tail in proptest::collection::vec(any::<u8>(), 0..512),
            ) {
                let mut b = Builder::header(3, n_tensors, n_kv);
                b.buf.extend(tail);
                let _ = read_with_arrays(&mut Cursor::new(&b.buf), |_| true);
            }
        }
    }
}
