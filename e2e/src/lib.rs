//! Helpers shared by the end-to-end tests and tools: the tiny test model writer and the tiny bundle pushed
//! with it, running the real binaries (controller, agent, alkictl) as child processes killed when the test
//! ends, external registries for interop, the fleet simulator, and a headless browser for the web console. It depends on no daemon's library (the
//! controller's and the agent's tests use it); tests that start a controller or an agent in-process do so
//! from `e2e/tests`.

pub mod browser;
pub mod fake_controller;
pub mod harness;
pub mod registries;
pub mod sim;
pub mod tiny_bundle;
pub mod tiny_model;
