//! Operators' labels on a device: a change (labels to set, keys to remove) checked like every label set,
//! applied to the device record in one transaction with the labels it is selected by recomputed from all
//! their sources ([`crate::facts::effective_labels`]).

use std::collections::HashMap;

use alki_shared::ids::DeviceId;
use alki_shared::proto;

use crate::facts::{LabelTrust, effective_labels};
use crate::limits::{LabelError, MAX_LABELS, check_labels};
use crate::store::{Store, StoreError};

/// What an operator asked to change.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    set: HashMap<String, String>,
    remove: Vec<String>,
}

/// Why a change was refused; nothing was applied.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ChangeError {
    #[error("give labels to set (key=value) or keys to remove (key-)")]
    Empty,
    #[error("{0}")]
    Invalid(#[from] LabelError),
    #[error("{count} keys to remove; at most {MAX_LABELS} are allowed")]
    TooManyRemovals { count: usize },
}

impl Change {
    pub fn parse(set: HashMap<String, String>, remove: Vec<String>) -> Result<Change, ChangeError> {
        if set.is_empty() && remove.is_empty() {
            return Err(ChangeError::Empty);
        }
        if remove.len() > MAX_LABELS {
            return Err(ChangeError::TooManyRemovals { count: remove.len() });
        }
        check_labels("labels to set", set.iter())?;
        Ok(Change { set, remove })
    }

    /// The operator's labels after this change, refused when there would be too many.
    fn apply(&self, assigned: &HashMap<String, String>) -> Result<HashMap<String, String>, LabelError> {
        let mut next = assigned.clone();
        for key in &self.remove {
            next.remove(key);
        }
        next.extend(self.set.clone());
        check_labels("the device's operator labels", next.iter())?;
        Ok(next)
    }
}

/// Applies `change` to the device's operator labels and recomputes the labels it is selected by. None:
/// no such device; `Err` inside: the change was refused and nothing changed.
pub fn relabel(
    store: &Store,
    device_id: &DeviceId,
    change: &Change,
    trust: &LabelTrust,
) -> Result<Option<Result<proto::Device, LabelError>>, StoreError> {
    if store.device(device_id)?.is_none() {
        return Ok(None);
    }
    let identity = store.device_identity(device_id)?;
    let token_labels = identity.as_ref().map(|i| i.labels.clone()).unwrap_or_default();
    // A device without a certificate identity is a --insecure-agent-tokens device: its own labels count.
    let token_session = identity.is_none();
    store
        .update_device(device_id, |d| {
            d.assigned_labels = change.apply(&d.assigned_labels)?;
            d.labels = effective_labels(d, &token_labels, trust, token_session);
            Ok(d.clone())
        })
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn changes_set_and_remove_and_are_checked() {
        assert_eq!(Change::parse(HashMap::new(), vec![]), Err(ChangeError::Empty));
        assert!(matches!(Change::parse(map(&[("bad key", "x")]), vec![]), Err(ChangeError::Invalid(_))));
        let change = Change::parse(map(&[("tier", "gold")]), vec!["site".into()]).expect("valid");
        let next = change.apply(&map(&[("site", "lab"), ("zone", "b")])).expect("fits");
        assert_eq!(next, map(&[("tier", "gold"), ("zone", "b")]));
        let full: HashMap<String, String> = (0..MAX_LABELS).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(change.apply(&full).is_err(), "more than {MAX_LABELS} operator labels are refused");
    }
}
