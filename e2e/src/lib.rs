//! Helpers shared by the end-to-end tests and tools (being written).
