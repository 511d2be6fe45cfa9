//! Upload sessions: in memory, bounded in number, leased to one request at a time, expired after
//! inactivity. The map's lock is only ever held briefly and never across an await.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::blobs::Partial;

/// An open upload between requests.
pub struct Session {
    pub repository: String,
    pub partial: Partial,
    touched: Instant,
}

enum Slot {
    Idle(Session),
    /// A request holds the session; `offset` is what it held when the request began.
    Busy {
        repository: String,
        offset: u64,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum LeaseError {
    /// No such upload in this repository (never started, finished, cancelled, or expired).
    Unknown,
    /// Another request is writing to this upload.
    Busy { offset: u64 },
}

pub struct Uploads {
    slots: Mutex<HashMap<Uuid, Slot>>,
    max_open: usize,
}

impl Uploads {
    pub fn new(max_open: usize) -> Uploads {
        Uploads { slots: Mutex::new(HashMap::new()), max_open }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many uploads are open.
    pub fn open_count(&self) -> usize {
        self.lock().len()
    }

    /// Repositories with an upload open (idle or being written): the garbage collector spares them.
    pub fn repositories(&self) -> BTreeSet<String> {
        self.lock()
            .values()
            .map(|slot| match slot {
                Slot::Idle(session) => session.repository.clone(),
                Slot::Busy { repository, .. } => repository.clone(),
            })
            .collect()
    }

    pub fn is_full(&self) -> bool {
        self.open_count() >= self.max_open
    }

    /// Registers a new upload; gives the partial back when `max_open` uploads are already open.
    pub fn insert(&self, repository: &str, partial: Partial) -> Result<Uuid, Box<Partial>> {
        let mut slots = self.lock();
        if slots.len() >= self.max_open {
            return Err(Box::new(partial));
        }
        let id = Uuid::new_v4();
        let session = Session { repository: repository.to_owned(), partial, touched: Instant::now() };
        slots.insert(id, Slot::Idle(session));
        Ok(id)
    }

    /// Takes an upload out for one request. Dropping the lease without [`Lease::release`] or
    /// [`Lease::finish`] ends the upload and deletes its data.
    pub fn lease(self: &Arc<Self>, id: Uuid, repository: &str) -> Result<Lease, LeaseError> {
        let mut slots = self.lock();
        match slots.remove(&id) {
            None => Err(LeaseError::Unknown),
            Some(Slot::Idle(session)) if session.repository == repository => {
                let busy = Slot::Busy { repository: session.repository.clone(), offset: session.partial.received() };
                slots.insert(id, busy);
                Ok(Lease { uploads: self.clone(), id, session: Some(session) })
            }
            Some(other) => {
                let error = match &other {
                    Slot::Busy { repository: r, offset } if r == repository => LeaseError::Busy { offset: *offset },
                    _ => LeaseError::Unknown,
                };
                slots.insert(id, other);
                Err(error)
            }
        }
    }

    /// Bytes received by an upload of `repository`, marking it active.
    pub fn status(&self, id: Uuid, repository: &str) -> Result<u64, LeaseError> {
        let mut slots = self.lock();
        match slots.get_mut(&id) {
            Some(Slot::Idle(session)) if session.repository == repository => {
                session.touched = Instant::now();
                Ok(session.partial.received())
            }
            Some(Slot::Busy { repository: r, offset }) if r == repository => Ok(*offset),
            _ => Err(LeaseError::Unknown),
        }
    }

    /// Takes an idle upload away for good (cancel).
    pub fn remove(&self, id: Uuid, repository: &str) -> Result<Session, LeaseError> {
        let mut slots = self.lock();
        match slots.remove(&id) {
            None => Err(LeaseError::Unknown),
            Some(Slot::Idle(session)) if session.repository == repository => Ok(session),
            Some(other) => {
                let error = match &other {
                    Slot::Busy { repository: r, offset } if r == repository => LeaseError::Busy { offset: *offset },
                    _ => LeaseError::Unknown,
                };
                slots.insert(id, other);
                Err(error)
            }
        }
    }

    /// Removes idle uploads untouched for `ttl`; the caller discards their data.
    pub fn expire(&self, now: Instant, ttl: Duration) -> Vec<(Uuid, Session)> {
        let mut slots = self.lock();
        let expired: Vec<Uuid> = slots
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Idle(session) if now.saturating_duration_since(session.touched) >= ttl => Some(*id),
                _ => None,
            })
            .collect();
        expired
            .into_iter()
            .filter_map(|id| match slots.remove(&id) {
                Some(Slot::Idle(session)) => Some((id, session)),
                _ => None,
            })
            .collect()
    }
}

/// One request's exclusive hold on an upload.
pub struct Lease {
    uploads: Arc<Uploads>,
    pub id: Uuid,
    session: Option<Session>,
}

impl Lease {
    pub fn partial(&mut self) -> Option<&mut Partial> {
        self.session.as_mut().map(|s| &mut s.partial)
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.session.as_ref().map_or(0, |s| s.partial.received())
    }

    /// Puts the upload back for the next request; a broken one is ended instead (its data deleted).
    pub fn release(mut self) {
        let Some(mut session) = self.session.take() else { return };
        let mut slots = self.uploads.lock();
        if session.partial.is_broken() {
            slots.remove(&self.id);
            drop(slots);
            drop(session);
            return;
        }
        session.touched = Instant::now();
        slots.insert(self.id, Slot::Idle(session));
    }

    /// Ends the upload and hands over its data (to close it into a blob).
    pub fn finish(mut self) -> Option<Session> {
        let session = self.session.take();
        self.uploads.lock().remove(&self.id);
        session
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.uploads.lock().remove(&self.id);
            drop(session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leases_are_exclusive_and_only_idle_uploads_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ttl = Duration::from_secs(60);
        let uploads = Arc::new(Uploads::new(2));
        let a = uploads.insert("r", Partial::create(dir.path()).await.expect("create")).expect("a");
        let b = uploads.insert("r", Partial::create(dir.path()).await.expect("create")).expect("b");
        let c = Partial::create(dir.path()).await.expect("create");
        assert!(uploads.insert("r", c).is_err(), "over max_open");

        assert_eq!(uploads.lease(a, "other").err(), Some(LeaseError::Unknown));
        let lease = uploads.lease(b, "r").expect("lease");
        assert_eq!(uploads.lease(b, "r").err(), Some(LeaseError::Busy { offset: 0 }));
        assert_eq!(uploads.status(b, "r"), Ok(0));

        let expired = uploads.expire(Instant::now() + ttl, ttl);
        assert_eq!(expired.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![a]);
        assert_eq!(uploads.status(a, "r"), Err(LeaseError::Unknown));

        lease.release();
        assert!(uploads.expire(Instant::now(), ttl).is_empty());
        assert_eq!(uploads.expire(Instant::now() + ttl, ttl).len(), 1);
        assert_eq!(uploads.open_count(), 0);

        // A dropped lease ends its upload.
        let d = uploads.insert("r", Partial::create(dir.path()).await.expect("create")).expect("d");
        drop(uploads.lease(d, "r").expect("lease"));
        assert_eq!(uploads.status(d, "r"), Err(LeaseError::Unknown));
    }
}
