//! Alki Fleet's common crate: the wire contract, the bundle and eval suite formats, digests, identifiers, file
//! helpers, and the pure rules both the controller and alkictl apply (schedule windows, quantization ranks, GC
//! reports) or both daemons do (rate limits).
//!
//! Only this crate knows protobuf: the generated code lives in [`proto`], and the other crates convert
//! at their edges.

pub mod build;
pub mod bundle;
pub mod clock;
pub mod digest;
pub mod eval;
pub mod fsutil;
pub mod gc;
pub mod gguf;
pub mod ids;
pub mod oci;
pub mod proto;
pub mod quantization;
pub mod ratelimit;
pub mod schedule;
pub mod signing;
pub mod text;
pub mod webhook;
