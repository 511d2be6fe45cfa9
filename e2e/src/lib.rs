//! Helpers shared by the end-to-end tests and tools: the tiny test model writer, running the real binaries
//! (controller, agent, alkictl) as child processes killed when the test ends, external registries for
//! interop, and the fleet simulator.

pub mod harness;
pub mod registries;
pub mod sim;
pub mod tiny_model;
