//! Fleet facts every part reads the same way: a device's hardware class, the labels it is selected by,
//! whether a label selector picks a device, whether a rollout is still active. A leaf: pure functions of the wire contract's records, so
//! the rollout engine, the store, insight and metrics import it instead of importing each other.

use std::collections::{BTreeMap, HashMap};

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

/// Which of a device's own labels count (the rest are only shown).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelTrust {
    /// Keys devices own (`--device-owned-label-keys`): their reported values count unless a token or an
    /// operator sets the key.
    pub device_owned: Vec<String>,
}

/// The labels `device` is selected by, from its sources in rising precedence: its own report (the keys
/// `trust` lets devices own; every key when `token_session`, a `--insecure-agent-tokens` device that has no
/// enrollment token to take labels from), its enrollment token's `token_labels`, and its operators'.
pub fn effective_labels(
    device: &proto::Device,
    token_labels: &BTreeMap<String, String>,
    trust: &LabelTrust,
    token_session: bool,
) -> HashMap<String, String> {
    let owned = |key: &String| token_session || trust.device_owned.iter().any(|k| k == key);
    let mut labels: HashMap<String, String> =
        device.reported_labels.iter().filter(|(k, _)| owned(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.extend(token_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.extend(device.assigned_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
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
    fn devices_choose_only_the_labels_they_own() {
        fn map<M: FromIterator<(String, String)>>(pairs: &[(&str, &str)]) -> M {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        }
        let device = proto::Device {
            reported_labels: map(&[("site", "evil"), ("zone", "b"), ("tier", "gold")]),
            assigned_labels: map(&[("tier", "bronze")]),
            ..Default::default()
        };
        let token: BTreeMap<String, String> = map(&[("site", "lab")]);
        let strict = effective_labels(&device, &token, &LabelTrust::default(), false);
        assert_eq!(strict, map::<HashMap<_, _>>(&[("site", "lab"), ("tier", "bronze")]), "reported ones do not count");
        let zone = LabelTrust { device_owned: vec!["zone".into(), "site".into()] };
        let owned = effective_labels(&device, &token, &zone, false);
        assert_eq!(owned, map::<HashMap<_, _>>(&[("site", "lab"), ("zone", "b"), ("tier", "bronze")]), "token wins");
        let token_session = effective_labels(&device, &BTreeMap::new(), &LabelTrust::default(), true);
        assert_eq!(token_session, map::<HashMap<_, _>>(&[("site", "evil"), ("zone", "b"), ("tier", "bronze")]));
    }

    #[test]
    fn a_selector_needs_every_pair() {
        let labels = HashMap::from([("site".to_owned(), "lab".to_owned()), ("ring".to_owned(), "1".to_owned())]);
        assert!(selects(&HashMap::new(), &labels), "an empty selector selects everything");
        assert!(selects(&HashMap::from([("site".to_owned(), "lab".to_owned())]), &labels));
        assert!(!selects(&HashMap::from([("site".to_owned(), "shop".to_owned())]), &labels));
    }
}
