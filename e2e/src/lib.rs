//! Helpers shared by the end-to-end tests and tools: the tiny test model writer (more being written).

pub mod tiny_model;
