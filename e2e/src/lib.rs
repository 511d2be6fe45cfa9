//! Helpers shared by the end-to-end tests and tools: the tiny test model writer, and running the real
//! binaries (controller, agent, alkictl) as child processes that are killed when the test ends.

pub mod harness;
pub mod sim;
pub mod tiny_model;
