//! On-device quality evaluation, the pure part: the eval suite format, golden-prompt checks, llama-perplexity's
//! output, and the quality result with its gate math. No I/O: the agent runs the tools and the controller
//! gates rollouts; both call these.
//!
//! Imports run one way: `checks` (a leaf) ← `prompts` ← `suite` ← `artifact`; `perplexity` is a leaf;
//! `quality` uses `checks` and `perplexity`; `wire` converts `quality` to and from its protobuf mirror.

pub mod artifact;
pub mod checks;
pub mod perplexity;
pub mod prompts;
pub mod quality;
pub mod suite;
pub mod wire;
