//! Rollouts: `create` (a spec checked, its candidate's signature checked and pinned by digest, stored as
//! Pending), the pure `engine` that decides what each rollout does next, and `reconcile`, which persists
//! and applies the engine's plans (on its loop, and for operators' verbs). `external` pins candidates in
//! external registries; `gate_calls` asks external gates (webhooks, Prometheus) what the engine needs. Schedule windows are `alki_shared::schedule` (alkictl validates them too).

pub mod create;
pub mod engine;
pub mod external;
pub mod gate_calls;
pub mod reconcile;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::fleet::Fleet;

/// The rollout domain's handle: the fleet its rollouts move, and the lock that serialises every
/// read-modify-write of rollout records (creation, the reconciler, operators' verbs). Cheap to clone.
#[derive(Clone)]
pub struct Rollouts {
    pub fleet: Fleet,
    lock: Arc<Mutex<()>>,
}

impl Rollouts {
    pub fn new(fleet: Fleet) -> Rollouts {
        Rollouts { fleet, lock: Arc::new(Mutex::new(())) }
    }

    /// Held while rollout records are read, changed and written back; never across an await.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        // It guards no data of its own: a panic while holding it leaves nothing inconsistent.
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }
}
