//! Local benchmarks of llama-server: `measure` (the fixed, versioned prompt set against an instance's
//! loopback port: TTFT, tokens/s from llama-server's `timings`, peak RSS, throttling), `result` (what was
//! benchmarked, as the controller receives it), `files` (`benchmarks.json` and `serving.json` in the data
//! directory), `jobs` (the queue and the task that runs benchmarks one at a time: after a committed
//! activation, on a controller command), `calibrate` (every variant of a bundle that fits, each acquired and
//! started on its own loopback port, never behind the front proxy) and `cli` (`alki-agent bench`).

pub mod calibrate;
mod cli;
pub mod files;
pub mod jobs;
pub mod measure;
pub mod result;

pub use calibrate::{CalibrateError, Calibration};
pub use cli::{run_cli, table};
pub use files::{ResultsFile, Serving, ServingFile};
pub use jobs::{Benchmarker, JOB_QUEUE, Job, Jobs, command_job};
pub use measure::{DEFAULT_REPETITIONS, MAX_REPETITIONS, PROMPT_SET};
pub use result::{Identity, Subject, Target, benchmark_instance, benchmark_serving, failed};
