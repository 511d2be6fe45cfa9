//! GGUF metadata reader (being written).
