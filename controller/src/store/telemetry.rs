//! Telemetry and benchmark tables: each device's newest measurements per bundle (what A/B comparisons and
//! performance gates read), stored benchmark results, and time-bucketed rollups with a retention policy.
//!
//! Every table is bounded: a device keeps at most [`MAX_BUNDLES_PER_DEVICE`] measurement records and
//! [`MAX_BENCHMARKS_PER_DEVICE`] benchmark results (oldest dropped first), rollups and measurements older
//! than the retention are pruned at each rollup flush, and a flush carries at most [`MAX_ROLLUP_KEYS`] keys.

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::latency::{self, Added, LatencyHistogram};
use super::{Store, StoreError, Table, decode};

/// Per-device measurements of one bundle, keyed `<device id>/<bundle digest>`.
pub(super) const PERF: Table = Table::new("device_perf");
/// Benchmark results, keyed `<device id>/<bundle digest>/<variant digest>`: the newest of each.
pub(super) const BENCHMARKS: Table = Table::new("benchmarks");
/// Rollups, keyed `<bucket start, 13 digits>/<class>/<bundle digest>/<variant digest>`, so pruning by age
/// is a range scan from the start.
pub(super) const ROLLUPS: Table = Table::new("rollups");
pub(super) const TABLES: [Table; 3] = [PERF, BENCHMARKS, ROLLUPS];

/// Telemetry values kept per (device, bundle) for the device's median.
pub const PERF_WINDOW: usize = 16;
pub const MAX_BUNDLES_PER_DEVICE: usize = 8;
pub const MAX_BENCHMARKS_PER_DEVICE: usize = 32;
/// Distinct (bucket, class, bundle, variant) keys one flush may write; the rest are counted as dropped.
pub const MAX_ROLLUP_KEYS: usize = 10_000;

/// What one device measured on one bundle: its newest benchmark and a window of serving telemetry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PerfRecord {
    pub device_id: String,
    pub bundle_digest: String,
    pub variant_digest: String,
    pub class: String,
    pub updated_unix_ms: i64,
    /// Medians of the newest activation or on-demand benchmark of this bundle.
    pub benchmark_tokens_per_second: Option<f64>,
    pub benchmark_ttft_ms: Option<f64>,
    /// Recent telemetry rates (generation tokens/s, time to first token), newest last, at most PERF_WINDOW.
    pub tokens_per_second: Vec<f64>,
    pub ttft_ms: Vec<f64>,
    /// Requests and errors the device's front proxy counted for this bundle (the increments of its
    /// cumulative counters, added up); None until telemetry of this bundle arrived.
    pub traffic: Option<Traffic>,
    /// The cumulative counters of the newest report, to turn the next one into increments.
    pub last_requests_total: u64,
    pub last_errors_total: u64,
    /// Request latency the device's front proxy measured on this bundle (the increments of its cumulative
    /// histogram, added up); None until a report carried one.
    pub latency: Option<LatencyHistogram>,
    /// The histogram of the newest report, to turn the next one into increments.
    pub last_latency: Option<LatencyHistogram>,
}

/// Requests served and how many of them failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub requests: u64,
    pub errors: u64,
}

impl Traffic {
    /// Adds a report's cumulative counters to the traffic seen so far. The agent's counters count since it
    /// started: the first report of a bundle counts whole, and so does a report after an agent restart (the
    /// counters went backwards).
    fn add_report(record: &mut PerfRecord, requests_total: u64, errors_total: u64) {
        let first = record.traffic.is_none();
        let traffic = record.traffic.get_or_insert_default();
        let restarted = requests_total < record.last_requests_total || errors_total < record.last_errors_total;
        if first || restarted {
            traffic.requests = traffic.requests.saturating_add(requests_total);
            traffic.errors = traffic.errors.saturating_add(errors_total);
        } else {
            traffic.requests = traffic.requests.saturating_add(requests_total - record.last_requests_total);
            traffic.errors = traffic.errors.saturating_add(errors_total - record.last_errors_total);
        }
        (record.last_requests_total, record.last_errors_total) = (requests_total, errors_total);
    }
}

/// Adds a report's latency histogram to the record; a malformed one is left out, with a warning.
fn add_latency(record: &mut PerfRecord, t: &proto::Telemetry) {
    match LatencyHistogram::from_report(&t.latency_buckets, t.latency_sum_ms) {
        Ok(Some(h)) => {
            if latency::add_report(&mut record.latency, &mut record.last_latency, h) == Added::NewLayout {
                tracing::info!(
                    device_id = %record.device_id,
                    bundle = %record.bundle_digest,
                    "The agent's latency buckets changed; its latency on this bundle is counted from this report on."
                );
            }
        }
        Ok(None) => {}
        Err(error) => tracing::warn!(
            device_id = %record.device_id,
            bundle = %record.bundle_digest,
            %error,
            "Ignored a malformed latency histogram in telemetry; the p95 latency gate leaves this report out. \
             Upgrade or fix the agent."
        ),
    }
}

/// Aggregates of telemetry reports in one time bucket for one (class, bundle, variant).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rollup {
    pub bucket_unix_ms: i64,
    pub class: String,
    pub bundle_digest: String,
    pub variant_digest: String,
    pub reports: u64,
    /// Requests and errors counted in the bucket (increments of the agents' counters).
    pub requests: u64,
    pub errors: u64,
    pub tokens_per_second_sum: f64,
    pub tokens_per_second_count: u64,
    pub tokens_per_second_min: f64,
    pub tokens_per_second_max: f64,
    pub ttft_ms_sum: f64,
    pub ttft_ms_count: u64,
    pub ttft_ms_max: f64,
    pub throttled_reports: u64,
}

impl Rollup {
    pub fn key(&self) -> String {
        format!("{:013}/{}/{}/{}", self.bucket_unix_ms.max(0), self.class, self.bundle_digest, self.variant_digest)
    }

    /// Adds another aggregate of the same key.
    pub fn merge(&mut self, other: &Rollup) {
        if other.tokens_per_second_count > 0 {
            if self.tokens_per_second_count == 0 {
                self.tokens_per_second_min = other.tokens_per_second_min;
                self.tokens_per_second_max = other.tokens_per_second_max;
            } else {
                self.tokens_per_second_min = self.tokens_per_second_min.min(other.tokens_per_second_min);
                self.tokens_per_second_max = self.tokens_per_second_max.max(other.tokens_per_second_max);
            }
        }
        self.reports += other.reports;
        self.requests += other.requests;
        self.errors += other.errors;
        self.tokens_per_second_sum += other.tokens_per_second_sum;
        self.tokens_per_second_count += other.tokens_per_second_count;
        self.ttft_ms_sum += other.ttft_ms_sum;
        self.ttft_ms_count += other.ttft_ms_count;
        self.ttft_ms_max = self.ttft_ms_max.max(other.ttft_ms_max);
        self.throttled_reports += other.throttled_reports;
    }
}

/// Filters for [`Store::benchmarks`]; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct BenchmarkFilter {
    pub device_id: String,
    pub bundle_digest: String,
    pub class: String,
}

fn push_window(window: &mut Vec<f64>, value: f64) {
    if value.is_finite() && value > 0.0 {
        window.push(value);
        if window.len() > PERF_WINDOW {
            let extra = window.len() - PERF_WINDOW;
            window.drain(..extra);
        }
    }
}

fn encode<T: Serialize>(value: &T, table: Table) -> Result<Vec<u8>, StoreError> {
    use redb::TableHandle as _;
    serde_json::to_vec(value).map_err(|e| StoreError::Encode(e, table.name().to_owned()))
}

/// Keeps at most `max` records under `<device>/`, dropping those with the smallest `age`.
fn prune_device<T: for<'de> Deserialize<'de>>(
    t: &mut redb::Table<'_, &'static str, &'static [u8]>,
    table: Table,
    device_id: &str,
    max: usize,
    age: impl Fn(&T) -> i64,
) -> Result<(), StoreError> {
    use redb::TableHandle as _;
    let (start, end) = (format!("{device_id}/"), format!("{device_id}0"));
    let mut entries: Vec<(i64, String)> = Vec::new();
    for entry in t.range(start.as_str()..end.as_str())? {
        let (k, v) = entry?;
        let record: T = decode(table.name().to_owned(), k.value(), v.value())?;
        entries.push((age(&record), k.value().to_owned()));
    }
    if entries.len() <= max {
        return Ok(());
    }
    entries.sort();
    for (_, key) in &entries[..entries.len() - max] {
        t.remove(key.as_str())?;
    }
    Ok(())
}

impl Store {
    /// Records a telemetry report: the device's newest telemetry and its measurement window for the
    /// bundle, in one transaction without fsync (the agent reports again at its next interval).
    /// Returns the device's hardware class, for rollups.
    pub fn record_telemetry(
        &self,
        device_id: &DeviceId,
        t: &proto::Telemetry,
        now: UnixMs,
    ) -> Result<String, StoreError> {
        let (device_id, now) = (device_id.as_str(), now.as_millis());
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None).map_err(|e| StoreError::Database(e.into()))?;
        let class = {
            let mut devices = txn.open_table(super::DEVICES)?;
            let mut device: proto::Device = match devices.get(device_id)? {
                Some(v) => decode("devices".into(), device_id, v.value())?,
                None => proto::Device { id: device_id.to_owned(), ..Default::default() },
            };
            device.last_seen_unix_ms = now;
            if let Some(inv) = device.inventory.as_mut() {
                inv.memory_available_bytes = t.memory_available_bytes;
            }
            device.latest_telemetry = Some(t.clone());
            let class = crate::facts::hardware_class(&device);
            devices.insert(device_id, encode(&device, super::DEVICES)?.as_slice())?;
            class
        };
        if !t.bundle_digest.is_empty() {
            let mut perf = txn.open_table(PERF)?;
            let key = format!("{device_id}/{}", t.bundle_digest);
            let mut record: PerfRecord = match perf.get(key.as_str())? {
                Some(v) => decode("device_perf".into(), &key, v.value())?,
                None => PerfRecord {
                    device_id: device_id.to_owned(),
                    bundle_digest: t.bundle_digest.clone(),
                    ..Default::default()
                },
            };
            let new = record.updated_unix_ms == 0;
            Traffic::add_report(&mut record, t.requests_total, t.request_errors_total);
            add_latency(&mut record, t);
            record.class = class.clone();
            record.updated_unix_ms = now;
            if !t.variant_digest.is_empty() {
                record.variant_digest = t.variant_digest.clone();
            }
            push_window(&mut record.tokens_per_second, t.generation_tokens_per_second);
            push_window(&mut record.ttft_ms, t.ttft_ms);
            perf.insert(key.as_str(), encode(&record, PERF)?.as_slice())?;
            if new {
                prune_device(&mut perf, PERF, device_id, MAX_BUNDLES_PER_DEVICE, |r: &PerfRecord| r.updated_unix_ms)?;
            }
        }
        txn.commit()?;
        Ok(class)
    }

    /// Records a device's benchmark results durably (they are few and not repeated): each result by
    /// (bundle, variant); activation and on-demand results also become the device's newest benchmark and
    /// its measurement of that bundle. Results that carry an error are kept (they say why) but measure nothing.
    pub fn record_benchmarks(
        &self,
        device_id: &DeviceId,
        results: &[proto::BenchmarkResult],
        now: UnixMs,
    ) -> Result<(), StoreError> {
        let (device_id, now) = (device_id.as_str(), now.as_millis());
        let txn = self.db.begin_write()?;
        {
            let mut devices = txn.open_table(super::DEVICES)?;
            let mut device: proto::Device = match devices.get(device_id)? {
                Some(v) => decode("devices".into(), device_id, v.value())?,
                None => proto::Device { id: device_id.to_owned(), ..Default::default() },
            };
            let class = crate::facts::hardware_class(&device);
            let mut benchmarks = txn.open_table(BENCHMARKS)?;
            let mut perf = txn.open_table(PERF)?;
            for r in results {
                let mut r = r.clone();
                r.device_id = device_id.to_owned();
                if r.hardware_class.is_empty() {
                    r.hardware_class = class.clone();
                }
                if r.at_unix_ms == 0 {
                    r.at_unix_ms = now;
                }
                let bundle = r.bundle.as_ref().map(|b| b.digest.clone()).unwrap_or_default();
                let key = format!("{device_id}/{bundle}/{}", r.variant_digest);
                benchmarks.insert(key.as_str(), encode(&r, BENCHMARKS)?.as_slice())?;
                let calibration = r.trigger == proto::BenchmarkTrigger::Calibration as i32;
                if calibration || !r.error.is_empty() || bundle.is_empty() {
                    continue;
                }
                device.latest_benchmark = Some(r.clone());
                let key = format!("{device_id}/{bundle}");
                let mut record: PerfRecord = match perf.get(key.as_str())? {
                    Some(v) => decode("device_perf".into(), &key, v.value())?,
                    None => PerfRecord {
                        device_id: device_id.to_owned(),
                        bundle_digest: bundle.clone(),
                        ..Default::default()
                    },
                };
                record.class = r.hardware_class.clone();
                record.updated_unix_ms = now;
                if !r.variant_digest.is_empty() {
                    record.variant_digest = r.variant_digest.clone();
                }
                let median = |s: Option<proto::Stat>| s.filter(|s| s.samples > 0 && s.median > 0.0).map(|s| s.median);
                record.benchmark_tokens_per_second = median(r.generation_tokens_per_second);
                record.benchmark_ttft_ms = median(r.ttft_ms);
                perf.insert(key.as_str(), encode(&record, PERF)?.as_slice())?;
            }
            devices.insert(device_id, encode(&device, super::DEVICES)?.as_slice())?;
            prune_device(
                &mut benchmarks,
                BENCHMARKS,
                device_id,
                MAX_BENCHMARKS_PER_DEVICE,
                |r: &proto::BenchmarkResult| r.at_unix_ms,
            )?;
            prune_device(&mut perf, PERF, device_id, MAX_BUNDLES_PER_DEVICE, |r: &PerfRecord| r.updated_unix_ms)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Every device with only what comparisons read (id, labels, what it runs, its inventory's hardware
    /// class): decoding a few fields of each record instead of all of them keeps a comparison over thousands
    /// of devices fast.
    pub fn device_summaries(&self) -> Result<Vec<proto::Device>, StoreError> {
        #[derive(Deserialize)]
        struct Ref {
            #[serde(default)]
            digest: String,
        }
        #[derive(Deserialize)]
        struct Inventory {
            #[serde(default)]
            hardware_class: String,
        }
        #[derive(Deserialize)]
        struct Summary {
            #[serde(default)]
            id: String,
            #[serde(default)]
            labels: std::collections::HashMap<String, String>,
            #[serde(default)]
            running: Option<Ref>,
            #[serde(default)]
            inventory: Option<Inventory>,
        }
        let txn = self.db.begin_read()?;
        let t = txn.open_table(super::DEVICES)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            let s: Summary = decode("devices".into(), k.value(), v.value())?;
            out.push(proto::Device {
                id: s.id,
                labels: s.labels,
                running: s.running.map(|r| proto::BundleRef { digest: r.digest, ..Default::default() }),
                inventory: s
                    .inventory
                    .map(|i| proto::Inventory { hardware_class: i.hardware_class, ..Default::default() }),
                ..Default::default()
            });
        }
        Ok(out)
    }

    /// Every device's measurements of every bundle.
    pub fn perf_records(&self) -> Result<Vec<PerfRecord>, StoreError> {
        self.list(PERF)
    }

    /// Stored benchmark results matching `filter`, newest first, at most `limit`.
    pub fn benchmarks(
        &self,
        filter: &BenchmarkFilter,
        limit: usize,
    ) -> Result<Vec<proto::BenchmarkResult>, StoreError> {
        let mut all: Vec<proto::BenchmarkResult> = if filter.device_id.is_empty() {
            self.list(BENCHMARKS)?
        } else {
            self.range(BENCHMARKS, &format!("{}/", filter.device_id), &format!("{}0", filter.device_id))?
        };
        all.retain(|r| {
            (filter.bundle_digest.is_empty() || r.bundle.as_ref().is_some_and(|b| b.digest == filter.bundle_digest))
                && (filter.class.is_empty() || r.hardware_class == filter.class)
        });
        all.sort_by(|a, b| b.at_unix_ms.cmp(&a.at_unix_ms).then_with(|| a.device_id.cmp(&b.device_id)));
        all.truncate(limit);
        Ok(all)
    }

    /// Merges rollups into their buckets and prunes everything older than `retain_after` (rollups and
    /// device measurements), in one durable transaction. Returns how many rollup keys were pruned.
    pub fn flush_rollups(&self, rollups: &[Rollup], retain_after: UnixMs) -> Result<usize, StoreError> {
        let retain_after_unix_ms = retain_after.as_millis();
        let txn = self.db.begin_write()?;
        let pruned = {
            let mut t = txn.open_table(ROLLUPS)?;
            for r in rollups.iter().take(MAX_ROLLUP_KEYS) {
                let key = r.key();
                let merged = match t.get(key.as_str())? {
                    Some(v) => {
                        let mut m: Rollup = decode("rollups".into(), &key, v.value())?;
                        m.merge(r);
                        m
                    }
                    None => r.clone(),
                };
                t.insert(key.as_str(), encode(&merged, ROLLUPS)?.as_slice())?;
            }
            let cutoff = format!("{:013}", retain_after_unix_ms.max(0));
            let old: Vec<String> =
                t.range(..cutoff.as_str())?.map(|e| e.map(|(k, _)| k.value().to_owned())).collect::<Result<_, _>>()?;
            for key in &old {
                t.remove(key.as_str())?;
            }
            let mut perf = txn.open_table(PERF)?;
            let mut stale = Vec::new();
            for entry in perf.iter()? {
                let (k, v) = entry?;
                let record: PerfRecord = decode("device_perf".into(), k.value(), v.value())?;
                if record.updated_unix_ms < retain_after_unix_ms {
                    stale.push(k.value().to_owned());
                }
            }
            for key in &stale {
                perf.remove(key.as_str())?;
            }
            old.len()
        };
        txn.commit()?;
        Ok(pruned)
    }

    /// Rollups from `since` on, oldest first.
    pub fn rollups(&self, since: UnixMs) -> Result<Vec<Rollup>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ROLLUPS)?;
        let start = format!("{:013}", since.as_millis().max(0));
        let mut out = Vec::new();
        for entry in t.range(start.as_str()..)? {
            let (k, v) = entry?;
            out.push(decode("rollups".into(), k.value(), v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("device id")
    }

    fn telemetry(bundle: &str, tps: f64) -> proto::Telemetry {
        proto::Telemetry {
            bundle_digest: bundle.into(),
            generation_tokens_per_second: tps,
            ttft_ms: 100.0,
            ..Default::default()
        }
    }

    #[test]
    fn telemetry_keeps_a_bounded_window_per_bundle_and_a_bounded_number_of_bundles() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.update_device(&id("d1"), |d| d.labels.insert("class".into(), "pi5-8g".into())).expect("device");
        for i in 0..40 {
            let class = store.record_telemetry(
                &id("d1"),
                &telemetry("sha256:aa", f64::from(i) + 1.0),
                UnixMs(1_000 + i64::from(i)),
            );
            assert_eq!(class.expect("record"), "pi5-8g");
        }
        for b in 0..(MAX_BUNDLES_PER_DEVICE + 3) {
            store
                .record_telemetry(&id("d1"), &telemetry(&format!("sha256:b{b}"), 5.0), UnixMs(10_000 + b as i64))
                .expect("record");
        }
        let records = store.perf_records().expect("records");
        assert_eq!(records.len(), MAX_BUNDLES_PER_DEVICE, "oldest bundles pruned");
        assert!(records.iter().all(|r| r.bundle_digest != "sha256:aa"), "the oldest bundle went first");
        let device = store.device(&id("d1")).expect("read").expect("present");
        assert_eq!(
            device.latest_telemetry.map(|t| t.bundle_digest),
            Some(format!("sha256:b{}", MAX_BUNDLES_PER_DEVICE + 2))
        );

        let store2 = Store::open(tempfile::tempdir().expect("tempdir").path()).expect("open");
        for i in 0..40 {
            store2.record_telemetry(&id("d2"), &telemetry("sha256:aa", f64::from(i) + 1.0), UnixMs(1)).expect("record");
        }
        let r = &store2.perf_records().expect("records")[0];
        assert_eq!(r.tokens_per_second.len(), PERF_WINDOW);
        assert_eq!(r.tokens_per_second.last(), Some(&40.0), "newest kept");
    }

    #[test]
    fn front_proxy_counters_add_up_per_bundle_across_agent_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let counters = |requests, errors| proto::Telemetry {
            bundle_digest: "sha256:aa".into(),
            requests_total: requests,
            request_errors_total: errors,
            ..Default::default()
        };
        // 100 requests before the first report count; then increments; then the agent restarted.
        for (i, (r, e)) in [(100, 2), (150, 2), (160, 5), (10, 1), (30, 1)].into_iter().enumerate() {
            store.record_telemetry(&id("d1"), &counters(r, e), UnixMs(1 + i as i64)).expect("record");
        }
        let record = &store.perf_records().expect("records")[0];
        assert_eq!(record.traffic, Some(Traffic { requests: 190, errors: 6 }));
    }

    #[test]
    fn front_proxy_latency_adds_up_per_bundle_and_malformed_histograms_are_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let report = |counts: [u64; 3], le: [f64; 2]| proto::Telemetry {
            bundle_digest: "sha256:aa".into(),
            latency_buckets: vec![
                proto::HistogramBucket { le_ms: le[0], inf: false, count: counts[0] },
                proto::HistogramBucket { le_ms: le[1], inf: false, count: counts[1] },
                proto::HistogramBucket { le_ms: 0.0, inf: true, count: counts[2] },
            ],
            latency_sum_ms: 10.0,
            ..Default::default()
        };
        store.record_telemetry(&id("d1"), &report([1, 2, 2], [10.0, 100.0]), UnixMs(1)).expect("record");
        store.record_telemetry(&id("d1"), &report([3, 5, 6], [10.0, 100.0]), UnixMs(2)).expect("record");
        // Bounds out of order: ignored, and the next good report still counts from the last good one.
        store.record_telemetry(&id("d1"), &report([9, 9, 9], [100.0, 10.0]), UnixMs(3)).expect("record");
        store.record_telemetry(&id("d1"), &report([4, 7, 9], [10.0, 100.0]), UnixMs(4)).expect("record");
        let record = &store.perf_records().expect("records")[0];
        let latency = record.latency.as_ref().expect("latency accumulated");
        assert_eq!((latency.bounds_ms.as_slice(), latency.cumulative.as_slice()), (&[10.0, 100.0][..], &[4, 7, 9][..]));
        // A report without buckets leaves what was measured alone.
        store
            .record_telemetry(
                &id("d1"),
                &proto::Telemetry { bundle_digest: "sha256:aa".into(), ..Default::default() },
                UnixMs(5),
            )
            .expect("record");
        assert_eq!(store.perf_records().expect("records")[0].latency.as_ref().map(|h| h.count()), Some(9));
    }

    #[test]
    fn device_summaries_carry_what_comparisons_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .update_device(&id("d1"), |d| {
                d.labels.insert("site".into(), "lab".into());
                d.running = Some(proto::BundleRef { digest: "sha256:aa".into(), ..Default::default() });
                d.inventory =
                    Some(proto::Inventory { hardware_class: "pi5-8g".into(), cpu_cores: 4, ..Default::default() });
                d.agent_version = "1.0".into();
            })
            .expect("device");
        let s = store.device_summaries().expect("summaries");
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].id.as_str(), s[0].labels.get("site").map(String::as_str)), ("d1", Some("lab")));
        assert_eq!(s[0].running.as_ref().map(|b| b.digest.as_str()), Some("sha256:aa"));
        assert_eq!(crate::facts::hardware_class(&s[0]), "pi5-8g");
        assert!(s[0].agent_version.is_empty(), "only the fields comparisons read are decoded");
    }

    #[test]
    fn benchmarks_are_filtered_newest_first_and_bounded_per_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let result = |i: usize, trigger: proto::BenchmarkTrigger| proto::BenchmarkResult {
            bundle: Some(proto::BundleRef { digest: "sha256:aa".into(), ..Default::default() }),
            variant_digest: format!("sha256:v{i}"),
            trigger: trigger as i32,
            at_unix_ms: i as i64 + 1,
            generation_tokens_per_second: Some(proto::Stat {
                median: 10.0 + i as f64,
                samples: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let many: Vec<_> = (0..40).map(|i| result(i, proto::BenchmarkTrigger::Calibration)).collect();
        store.record_benchmarks(&id("d1"), &many, UnixMs(100)).expect("record");
        store
            .record_benchmarks(&id("d2"), &[result(7, proto::BenchmarkTrigger::Activation)], UnixMs(100))
            .expect("record");
        let d1 =
            store.benchmarks(&BenchmarkFilter { device_id: "d1".into(), ..Default::default() }, 1000).expect("list");
        assert_eq!(d1.len(), MAX_BENCHMARKS_PER_DEVICE);
        assert_eq!(d1[0].at_unix_ms, 40, "newest first");
        let all = store.benchmarks(&BenchmarkFilter::default(), 5).expect("list");
        assert_eq!(all.len(), 5);
        let d2 = store.device(&id("d2")).expect("read").expect("present");
        assert_eq!(d2.latest_benchmark.map(|b| b.variant_digest), Some("sha256:v7".to_owned()));
        let perf = store.perf_records().expect("perf");
        assert_eq!(perf.len(), 1, "only the activation benchmark measures the bundle the device runs");
        assert_eq!(perf[0].benchmark_tokens_per_second, Some(17.0));
    }

    #[test]
    fn rollups_merge_per_bucket_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let rollup = |bucket: i64, tps: f64| Rollup {
            bucket_unix_ms: bucket,
            class: "pi5-8g".into(),
            bundle_digest: "sha256:aa".into(),
            reports: 1,
            tokens_per_second_sum: tps,
            tokens_per_second_count: 1,
            tokens_per_second_min: tps,
            tokens_per_second_max: tps,
            ..Default::default()
        };
        store.flush_rollups(&[rollup(1_000, 4.0), rollup(2_000, 1.0)], UnixMs(0)).expect("flush");
        store.flush_rollups(&[rollup(2_000, 3.0)], UnixMs(0)).expect("flush");
        let all = store.rollups(UnixMs(0)).expect("rollups");
        assert_eq!(all.len(), 2);
        assert_eq!((all[1].reports, all[1].tokens_per_second_min, all[1].tokens_per_second_max), (2, 1.0, 3.0));
        let pruned = store.flush_rollups(&[], UnixMs(1_500)).expect("prune");
        assert_eq!(pruned, 1);
        assert_eq!(store.rollups(UnixMs(0)).expect("rollups").len(), 1);
    }
}
