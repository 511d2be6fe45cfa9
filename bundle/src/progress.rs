//! Progress of long work (packing, hashing, pushing): the library reports how far it got and what it is on;
//! the caller decides how to show it (alkictl draws a bar on a terminal; tests and services show nothing).

use std::sync::Arc;

/// Whoever shows progress. Every method has an empty default, so a sink implements what it shows.
pub trait ProgressSink: Send + Sync {
    /// The work is `total` bytes.
    fn set_length(&self, _total: u64) {}
    /// What is being worked on now (a file name, a platform).
    fn set_message(&self, _text: &str) {}
    /// `done` bytes of the total are done.
    fn set_position(&self, _done: u64) {}
    /// `bytes` more are done.
    fn inc(&self, _bytes: u64) {}
    /// A remark for the person watching, such as a fallback taken (a hard link that became a copy).
    fn note(&self, _text: &str) {}
    /// The work is over.
    fn finish(&self) {}
}

/// A cheap, cloneable handle on a [`ProgressSink`]; [`Progress::none`] shows nothing.
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<dyn ProgressSink>>);

impl Progress {
    /// Progress nobody watches.
    pub fn none() -> Progress {
        Progress(None)
    }

    /// Progress reported to `sink`.
    pub fn to(sink: impl ProgressSink + 'static) -> Progress {
        Progress(Some(Arc::new(sink)))
    }

    pub fn set_length(&self, total: u64) {
        if let Some(sink) = &self.0 {
            sink.set_length(total);
        }
    }

    pub fn set_message(&self, text: &str) {
        if let Some(sink) = &self.0 {
            sink.set_message(text);
        }
    }

    pub fn set_position(&self, done: u64) {
        if let Some(sink) = &self.0 {
            sink.set_position(done);
        }
    }

    pub fn inc(&self, bytes: u64) {
        if let Some(sink) = &self.0 {
            sink.inc(bytes);
        }
    }

    pub fn note(&self, text: &str) {
        if let Some(sink) = &self.0 {
            sink.note(text);
        }
    }

    pub fn finish(&self) {
        if let Some(sink) = &self.0 {
            sink.finish();
        }
    }
}
