//! Events going out of the controller: the log's entries as CloudEvents (`cloudevent`), delivered to
//! webhooks in order, signed and retried (`deliver`, managed by `webhooks`), and followed live by watchers
//! (`watch`) or read a page at a time (`list`). The log itself is `store::events`: events are written there in the transactions that make
//! them true, so nothing here can lose or invent one.

pub mod cloudevent;
pub mod deliver;
pub mod list;
pub mod watch;
pub mod webhooks;
