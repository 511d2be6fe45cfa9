//! What one garbage collection of the controller's registry did: the registry's result and the JSON that
//! `POST /api/v1/registry/gc` answers (and `alkictl registry gc` reads).

/// What one collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// The grace period the collection ran with.
    pub grace_secs: u64,
    /// Unreferenced blobs found by the mark phase.
    pub unreferenced: u64,
    /// Blob files deleted (unreferenced blobs, and files no repository linked).
    pub blobs_deleted: u64,
    /// Bytes those files held.
    pub bytes_freed: u64,
    /// Repository links removed (one blob may be linked in several repositories).
    pub links_removed: u64,
    /// Unreferenced blobs kept: younger than the grace period, recently read, or in a repository
    /// with an upload in flight.
    pub kept_recent: u64,
    pub duration_ms: u64,
}
