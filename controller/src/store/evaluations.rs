//! Quality evaluations: each device's newest result per (bundle, suite, variant, baseline), bounded per
//! device, and an index of the same results by (bundle, suite) that rollout gates, comparisons and
//! recommendations read per hardware class and variant without scanning the fleet.
//!
//! Two tables written in one transaction: `evaluations` keyed `<device>/<bundle>/<suite>/<variant>/<baseline>`
//! (ListEvaluations, the per-device bound) and `eval_index` keyed `<bundle>/<suite>/<device>/<variant>/<baseline>`
//! holding an [`EvalSample`] (the result without its golden-check texts). A result is replaced only by a
//! newer one of the same key; a device keeps at most [`MAX_EVALUATIONS_PER_DEVICE`] (oldest dropped first,
//! from both tables). Results are the shared `QualityResult`, whose JSON keeps NaN (a build computing garbage)
//! as garbage.

use alki_shared::eval::quality::{Outcome, QualityResult};
use alki_shared::proto;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, Table, decode};

pub(super) const EVALUATIONS: Table = Table::new("evaluations");
pub(super) const EVAL_INDEX: Table = Table::new("eval_index");
pub(super) const TABLES: [Table; 2] = [EVALUATIONS, EVAL_INDEX];

/// Evaluations a device keeps (a calibration with a suite reports one per variant).
pub const MAX_EVALUATIONS_PER_DEVICE: usize = 32;

/// One device's evaluation as the controller keeps it: the report's context and its parsed result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEvaluation {
    pub device_id: String,
    /// The device's hardware class when the result arrived (filled by the store).
    #[serde(default)]
    pub hardware_class: String,
    /// The Evaluate command it answers; empty after an activation.
    #[serde(default)]
    pub command_id: String,
    /// The rollout whose desired state asked for it, if any.
    #[serde(default)]
    pub rollout_id: String,
    pub bundle: proto::BundleRef,
    pub suite: proto::BundleRef,
    #[serde(default)]
    pub baseline: Option<proto::BundleRef>,
    /// When the device finished it (its clock), and when the controller received it (its clock: the
    /// order "newest" means).
    pub at_unix_ms: i64,
    pub received_unix_ms: i64,
    pub result: QualityResult,
}

impl StoredEvaluation {
    fn key(&self) -> String {
        let (bundle, suite, variant, baseline) = self.parts();
        format!("{}/{bundle}/{suite}/{variant}/{baseline}", self.device_id)
    }

    fn index_key(&self) -> String {
        let (bundle, suite, variant, baseline) = self.parts();
        format!("{bundle}/{suite}/{}/{variant}/{baseline}", self.device_id)
    }

    fn parts(&self) -> (&str, String, String, String) {
        let baseline = self.result.baseline.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".to_owned());
        (self.bundle.digest.as_str(), self.result.suite.to_string(), self.result.candidate.to_string(), baseline)
    }

    /// What the index keeps of it.
    pub fn sample(&self) -> EvalSample {
        let mut outcome = self.result.outcome.clone();
        if let Outcome::Measured(m) = &mut outcome {
            m.golden.failures.clear();
        }
        EvalSample {
            device_id: self.device_id.clone(),
            class: self.hardware_class.clone(),
            variant_digest: self.result.candidate.to_string(),
            baseline_bundle: self.baseline.as_ref().map(|b| b.digest.clone()).unwrap_or_default(),
            baseline_variant: self.result.baseline.as_ref().map(ToString::to_string).unwrap_or_default(),
            rollout_id: self.rollout_id.clone(),
            received_unix_ms: self.received_unix_ms,
            outcome,
        }
    }

    /// The wire form ListEvaluations answers with.
    pub fn to_proto(&self) -> proto::Evaluation {
        proto::Evaluation {
            device_id: self.device_id.clone(),
            hardware_class: self.hardware_class.clone(),
            report: Some(proto::EvalReport {
                command_id: self.command_id.clone(),
                rollout_id: self.rollout_id.clone(),
                bundle: Some(self.bundle.clone()),
                suite: Some(self.suite.clone()),
                baseline: self.baseline.clone(),
                result: Some(alki_shared::eval::wire::to_proto(&self.result)),
                at_unix_ms: self.at_unix_ms,
            }),
        }
    }
}

/// One device's newest evaluation of one (bundle, suite, variant, baseline), as gates and rollups read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSample {
    pub device_id: String,
    pub class: String,
    pub variant_digest: String,
    /// The baseline bundle (index) digest and variant; empty without a baseline.
    #[serde(default)]
    pub baseline_bundle: String,
    #[serde(default)]
    pub baseline_variant: String,
    #[serde(default)]
    pub rollout_id: String,
    pub received_unix_ms: i64,
    pub outcome: Outcome,
}

/// Filters for [`Store::evaluations`]; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct EvaluationFilter {
    pub device_id: String,
    pub bundle_digest: String,
    pub suite_digest: String,
    pub class: String,
    pub rollout_id: String,
}

impl EvaluationFilter {
    fn matches(&self, e: &StoredEvaluation) -> bool {
        let is = |want: &str, have: &str| want.is_empty() || want == have;
        is(&self.device_id, &e.device_id)
            && is(&self.bundle_digest, &e.bundle.digest)
            && is(&self.suite_digest, &e.suite.digest)
            && is(&self.class, &e.hardware_class)
            && is(&self.rollout_id, &e.rollout_id)
    }
}

fn encode<T: Serialize>(value: &T, table: Table) -> Result<Vec<u8>, StoreError> {
    use redb::TableHandle as _;
    serde_json::to_vec(value).map_err(|e| StoreError::Encode(e, table.name().to_owned()))
}

impl Store {
    /// Records an evaluation durably (they are few and not repeated), with the device's hardware class.
    /// Returns false when a newer result of the same key is already stored (a replayed report).
    pub fn record_evaluation(&self, evaluation: &StoredEvaluation) -> Result<bool, StoreError> {
        let mut e = evaluation.clone();
        let txn = self.db.begin_write()?;
        let stored = {
            let devices = txn.open_table(super::DEVICES)?;
            let device: proto::Device = match devices.get(e.device_id.as_str())? {
                Some(v) => decode("devices".into(), &e.device_id, v.value())?,
                None => proto::Device { id: e.device_id.clone(), ..Default::default() },
            };
            e.hardware_class = crate::facts::hardware_class(&device);
            let mut primary = txn.open_table(EVALUATIONS)?;
            let key = e.key();
            let older = match primary.get(key.as_str())? {
                Some(v) => decode::<StoredEvaluation>("evaluations".into(), &key, v.value())?.received_unix_ms,
                None => i64::MIN,
            };
            if older > e.received_unix_ms {
                false
            } else {
                primary.insert(key.as_str(), encode(&e, EVALUATIONS)?.as_slice())?;
                let mut index = txn.open_table(EVAL_INDEX)?;
                index.insert(e.index_key().as_str(), encode(&e.sample(), EVAL_INDEX)?.as_slice())?;
                prune_device(&mut primary, &mut index, &e.device_id)?;
                true
            }
        };
        txn.commit()?;
        Ok(stored)
    }

    /// Stored evaluations matching `filter`, newest first, at most `limit`.
    pub fn evaluations(&self, filter: &EvaluationFilter, limit: usize) -> Result<Vec<StoredEvaluation>, StoreError> {
        let mut all: Vec<StoredEvaluation> = if filter.device_id.is_empty() {
            self.list(EVALUATIONS)?
        } else {
            self.range(EVALUATIONS, &format!("{}/", filter.device_id), &format!("{}0", filter.device_id))?
        };
        all.retain(|e| filter.matches(e));
        all.sort_by(|a, b| b.received_unix_ms.cmp(&a.received_unix_ms).then_with(|| a.device_id.cmp(&b.device_id)));
        all.truncate(limit);
        Ok(all)
    }

    /// Every device's newest results of `bundle_digest` with `suite_digest` (one per variant and baseline).
    pub fn eval_samples(&self, bundle_digest: &str, suite_digest: &str) -> Result<Vec<EvalSample>, StoreError> {
        let prefix = format!("{bundle_digest}/{suite_digest}/");
        self.range(EVAL_INDEX, &prefix, &format!("{bundle_digest}/{suite_digest}0"))
    }
}

/// Keeps a device's newest [`MAX_EVALUATIONS_PER_DEVICE`] evaluations, removing the others from both tables.
fn prune_device(
    primary: &mut redb::Table<'_, &'static str, &'static [u8]>,
    index: &mut redb::Table<'_, &'static str, &'static [u8]>,
    device_id: &str,
) -> Result<(), StoreError> {
    let (start, end) = (format!("{device_id}/"), format!("{device_id}0"));
    let mut entries: Vec<(i64, String, String)> = Vec::new();
    for entry in primary.range(start.as_str()..end.as_str())? {
        let (k, v) = entry?;
        let e: StoredEvaluation = decode("evaluations".into(), k.value(), v.value())?;
        entries.push((e.received_unix_ms, k.value().to_owned(), e.index_key()));
    }
    if entries.len() <= MAX_EVALUATIONS_PER_DEVICE {
        return Ok(());
    }
    entries.sort();
    for (_, key, index_key) in &entries[..entries.len() - MAX_EVALUATIONS_PER_DEVICE] {
        primary.remove(key.as_str())?;
        index.remove(index_key.as_str())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use alki_shared::digest::Digest;
    use alki_shared::eval::quality::{CouldNotRun, Outcome};

    use super::*;

    fn bundle(digest: &Digest) -> proto::BundleRef {
        proto::BundleRef { repository: "acme/tiny".into(), digest: digest.to_string(), ..Default::default() }
    }

    fn evaluation(device: &str, variant: &[u8], received: i64, budget: u32) -> StoredEvaluation {
        let suite = Digest::of(b"suite");
        StoredEvaluation {
            device_id: device.into(),
            hardware_class: String::new(),
            command_id: String::new(),
            rollout_id: "ro-1".into(),
            bundle: bundle(&Digest::of(b"bundle")),
            suite: bundle(&suite),
            baseline: None,
            at_unix_ms: received,
            received_unix_ms: received,
            result: QualityResult {
                suite,
                candidate: Digest::of(variant),
                baseline: None,
                outcome: Outcome::CouldNotRun(CouldNotRun::OutOfTime { budget_seconds: budget }),
            },
        }
    }

    #[test]
    fn the_newest_per_key_is_kept_with_its_class_and_indexed_by_bundle_and_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .update_device(&alki_shared::ids::DeviceId::new("pi-1").expect("id"), |d| {
                d.labels.insert("class".into(), "pi5-8g".into())
            })
            .expect("device");
        assert!(store.record_evaluation(&evaluation("pi-1", b"q8", 10, 1)).expect("record"));
        assert!(store.record_evaluation(&evaluation("pi-1", b"q8", 20, 2)).expect("record"));
        assert!(!store.record_evaluation(&evaluation("pi-1", b"q8", 15, 3)).expect("record"), "an older replay");
        assert!(store.record_evaluation(&evaluation("pi-2", b"q8", 12, 4)).expect("record"));
        let all = store.evaluations(&EvaluationFilter::default(), 100).expect("list");
        assert_eq!(all.iter().map(|e| e.received_unix_ms).collect::<Vec<_>>(), [20, 12], "newest first, one per key");
        assert_eq!(all[0].hardware_class, "pi5-8g");
        let mine = EvaluationFilter { device_id: "pi-2".into(), ..Default::default() };
        assert_eq!(store.evaluations(&mine, 100).expect("list").len(), 1);
        let other_suite = EvaluationFilter { suite_digest: "sha256:00".into(), ..Default::default() };
        assert!(store.evaluations(&other_suite, 100).expect("list").is_empty());

        let e = &all[0];
        let samples = store.eval_samples(&e.bundle.digest, &e.suite.digest).expect("samples");
        assert_eq!(samples.len(), 2);
        let pi1 = samples.iter().find(|s| s.device_id == "pi-1").expect("pi-1 indexed");
        assert_eq!((pi1.class.as_str(), pi1.received_unix_ms), ("pi5-8g", 20));
        assert!(store.eval_samples(&e.bundle.digest, "sha256:00").expect("samples").is_empty());
        let wire = e.to_proto();
        let back = alki_shared::eval::wire::from_proto(wire.report.and_then(|r| r.result).as_ref().expect("result"));
        assert_eq!(back.as_ref(), Ok(&e.result), "what ListEvaluations answers reads back as stored");
    }

    #[test]
    fn a_device_keeps_a_bounded_number_and_the_index_follows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let n = MAX_EVALUATIONS_PER_DEVICE + 5;
        for i in 0..n {
            let variant = format!("v{i}");
            store.record_evaluation(&evaluation("pi-1", variant.as_bytes(), i as i64, 1)).expect("record");
        }
        let all = store.evaluations(&EvaluationFilter::default(), 1000).expect("list");
        assert_eq!(all.len(), MAX_EVALUATIONS_PER_DEVICE);
        assert_eq!(all.last().map(|e| e.received_unix_ms), Some(5), "the oldest went first");
        let e = &all[0];
        assert_eq!(store.eval_samples(&e.bundle.digest, &e.suite.digest).expect("samples").len(), all.len());
    }
}
