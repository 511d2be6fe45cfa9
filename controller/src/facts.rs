//! Fleet facts every part reads the same way: a device's hardware class, whether a label selector picks
//! a device, whether a rollout is still active. A leaf: pure functions of the wire contract's records, so
//! the rollout engine, the store, insight and metrics import it instead of importing each other.

use std::collections::HashMap;

use alki_shared::proto::{self, RolloutState};

/// The label that overrides a device's inventory hardware class.
pub const CLASS_LABEL: &str = "class";

/// A device's hardware class: its `class` label, else its inventory's, else "unknown".
pub fn hardware_class(device: &proto::Device) -> String {
    if let Some(class) = device.labels.get(CLASS_LABEL).filter(|c| !c.is_empty()) {
        return class.clone();
    }
    match device.inventory.as_ref().map(|i| i.hardware_class.as_str()) {
        Some(class) if !class.is_empty() => class.to_owned(),
        _ => "unknown".to_owned(),
    }
}

/// True when `labels` carry every key/value of `selector` (an empty selector selects everything).
pub fn selects<'a>(
    selector: impl IntoIterator<Item = (&'a String, &'a String)>,
    labels: &HashMap<String, String>,
) -> bool {
    selector.into_iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// True while a rollout in `state` may still move devices.
pub fn is_active(state: RolloutState) -> bool {
    matches!(state, RolloutState::Pending | RolloutState::Progressing | RolloutState::Paused)
}

/// A stored rollout's state (unknown numbers read as unspecified).
pub fn rollout_state(rollout: &proto::Rollout) -> RolloutState {
    RolloutState::try_from(rollout.state).unwrap_or(RolloutState::Unspecified)
}

/// True while the rollout may still move devices.
pub fn rollout_is_active(rollout: &proto::Rollout) -> bool {
    is_active(rollout_state(rollout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_class_label_wins_over_the_inventory() {
        let mut device = proto::Device {
            inventory: Some(proto::Inventory { hardware_class: "pi5-8g".into(), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(hardware_class(&device), "pi5-8g");
        device.labels.insert(CLASS_LABEL.into(), "lab-pi".into());
        assert_eq!(hardware_class(&device), "lab-pi");
        assert_eq!(hardware_class(&proto::Device::default()), "unknown");
    }

    #[test]
    fn a_selector_needs_every_pair() {
        let labels = HashMap::from([("site".to_owned(), "lab".to_owned()), ("ring".to_owned(), "1".to_owned())]);
        assert!(selects(&HashMap::new(), &labels), "an empty selector selects everything");
        assert!(selects(&HashMap::from([("site".to_owned(), "lab".to_owned())]), &labels));
        assert!(!selects(&HashMap::from([("site".to_owned(), "shop".to_owned())]), &labels));
    }
}
