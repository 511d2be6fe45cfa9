//! Alki Fleet's common crate: the wire contract, the bundle and eval suite formats, digests, identifiers, and
//! file helpers.
//!
//! Only this crate knows protobuf: the generated code lives in [`proto`], and the other crates convert
//! at their edges.

pub mod bundle;
pub mod clock;
pub mod digest;
pub mod eval;
pub mod fsutil;
pub mod gguf;
pub mod ids;
pub mod oci;
pub mod proto;
pub mod signing;
