//! Which devices a console or script asks for: filters over the device list, a page of it, and the fleet's
//! summary by class, phase and bundle. Pure: the handler reads the devices and the rest of the store.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use alki_shared::proto;
use serde::Serialize;

use crate::facts::selects;

/// Label keys, and values per key, a summary lists at most: label values may be per device (a serial
/// number), and the summary feeds a filter menu, not an inventory.
pub const MAX_SUMMARY_LABELS: usize = 100;
/// Devices one page carries at most (and when the caller names no limit).
pub const MAX_PAGE: usize = 1000;

/// What a device must match; empty or `None` fields match every device.
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    pub selector: HashMap<String, String>,
    pub class: String,
    pub phase: Option<i32>,
    /// The running bundle's digest; `none` matches devices serving nothing.
    pub bundle: String,
    pub connected: Option<bool>,
    /// A substring of the id or the hostname.
    pub search: String,
}

impl DeviceFilter {
    pub fn matches(&self, d: &proto::Device) -> bool {
        let running = running_digest(d);
        let hostname = d.inventory.as_ref().map_or("", |i| i.hostname.as_str());
        selects(&self.selector, &d.labels)
            && (self.class.is_empty() || class_of(d) == self.class)
            && self.phase.is_none_or(|p| p == d.phase)
            && (self.bundle.is_empty() || running == self.bundle || (self.bundle == "none" && running.is_empty()))
            && self.connected.is_none_or(|c| c == d.connected)
            && (self.search.is_empty() || d.id.contains(&self.search) || hostname.contains(&self.search))
    }
}

/// The devices matching `filter`, by id, from `offset` on, at most `limit` (0: [`MAX_PAGE`]), with how many
/// matched in all.
pub fn page(
    devices: Vec<proto::Device>,
    filter: &DeviceFilter,
    offset: usize,
    limit: usize,
) -> (Vec<proto::Device>, usize) {
    let mut matched: Vec<proto::Device> = devices.into_iter().filter(|d| filter.matches(d)).collect();
    matched.sort_by(|a, b| a.id.cmp(&b.id));
    let total = matched.len();
    let limit = if limit == 0 { MAX_PAGE } else { limit.min(MAX_PAGE) };
    (matched.into_iter().skip(offset).take(limit).collect(), total)
}

/// The fleet at a glance, as `/api/v1/summary` answers it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FleetSummary {
    pub devices: u32,
    pub online: u32,
    pub by_class: BTreeMap<String, u32>,
    /// Keyed by the Phase enum's number, as the API's JSON writes enums.
    pub by_phase: BTreeMap<String, u32>,
    /// Keyed by the running bundle's digest; "" counts devices serving nothing.
    pub by_bundle: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, BTreeSet<String>>,
    pub rollouts_active: u32,
    /// The newest event's id: a live view opens the event stream after it.
    pub newest_event_id: u64,
}

/// Counts of the devices that are not decommissioned (the rollouts and events fields are the caller's).
pub fn summarize(devices: &[proto::Device]) -> FleetSummary {
    let mut s = FleetSummary::default();
    for d in devices.iter().filter(|d| !d.decommissioned) {
        s.devices += 1;
        s.online += u32::from(d.connected);
        *s.by_class.entry(class_of(d).to_owned()).or_default() += 1;
        *s.by_phase.entry(d.phase.to_string()).or_default() += 1;
        *s.by_bundle.entry(running_digest(d).to_owned()).or_default() += 1;
        for (k, v) in &d.labels {
            if s.labels.len() < MAX_SUMMARY_LABELS || s.labels.contains_key(k) {
                let values = s.labels.entry(k.clone()).or_default();
                if values.len() < MAX_SUMMARY_LABELS {
                    values.insert(v.clone());
                }
            }
        }
    }
    s
}

fn class_of(d: &proto::Device) -> &str {
    d.inventory.as_ref().map_or("", |i| i.hardware_class.as_str())
}

fn running_digest(d: &proto::Device) -> &str {
    d.running.as_ref().map_or("", |r| r.digest.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, class: &str, digest: &str, connected: bool) -> proto::Device {
        proto::Device {
            id: id.into(),
            labels: HashMap::from([("site".to_owned(), "lab".to_owned())]),
            inventory: Some(proto::Inventory { hardware_class: class.into(), ..Default::default() }),
            running: (!digest.is_empty()).then(|| proto::BundleRef { digest: digest.into(), ..Default::default() }),
            phase: proto::Phase::Active as i32,
            connected,
            ..Default::default()
        }
    }

    #[test]
    fn filters_combine_and_pages_count_every_match() {
        let fleet = vec![
            device("pi-3", "pi5", "sha256:a", true),
            device("pi-1", "pi5", "sha256:a", false),
            device("orin-1", "orin", "", true),
            device("pi-2", "pi5", "sha256:b", true),
        ];
        let pi5 = DeviceFilter { class: "pi5".into(), ..Default::default() };
        let (first, total) = page(fleet.clone(), &pi5, 0, 2);
        assert_eq!((first.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), total), (vec!["pi-1", "pi-2"], 3));
        assert_eq!(page(fleet.clone(), &pi5, 2, 2).0.len(), 1);
        let online_a = DeviceFilter { bundle: "sha256:a".into(), connected: Some(true), ..Default::default() };
        assert_eq!(page(fleet.clone(), &online_a, 0, 0).1, 1);
        let nothing = DeviceFilter { bundle: "none".into(), ..Default::default() };
        assert_eq!(page(fleet.clone(), &nothing, 0, 0).0[0].id, "orin-1");
        let other_site =
            DeviceFilter { selector: HashMap::from([("site".to_owned(), "field".to_owned())]), ..Default::default() };
        assert_eq!(page(fleet.clone(), &other_site, 0, 0).1, 0);
        let search =
            DeviceFilter { search: "orin".into(), phase: Some(proto::Phase::Active as i32), ..Default::default() };
        assert_eq!(page(fleet, &search, 0, 0).1, 1);
    }

    #[test]
    fn the_summary_counts_live_devices_and_bounds_label_values() {
        let mut fleet: Vec<proto::Device> =
            (0..150).map(|i| device(&format!("pi-{i}"), "pi5", "sha256:a", i % 2 == 0)).collect();
        for (i, d) in fleet.iter_mut().enumerate() {
            d.labels.insert("serial".into(), format!("s{i}"));
        }
        fleet[0].decommissioned = true;
        let s = summarize(&fleet);
        assert_eq!((s.devices, s.online), (149, 74));
        assert_eq!(s.by_class["pi5"], 149);
        assert_eq!(s.by_bundle["sha256:a"], 149);
        assert_eq!(s.by_phase[&(proto::Phase::Active as i32).to_string()], 149);
        assert_eq!(s.labels["serial"].len(), MAX_SUMMARY_LABELS);
        assert_eq!(s.labels["site"].len(), 1);
    }
}
