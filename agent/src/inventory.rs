//! What this device is: host, OS, CPU (model, cores, a few features), memory, disk, and a hardware class.

use std::collections::BTreeMap;
use std::path::Path;

use alki_shared::proto;

/// CPU features worth reporting: they decide which llama.cpp kernels run.
const INTERESTING_FEATURES: [&str; 6] = ["avx2", "avx512f", "fma", "f16c", "asimd", "asimddp"];

/// Measures the device. Blocking (reads /proc and statvfs): call from `spawn_blocking` in async code.
pub fn collect(data_dir: &Path, labels: &BTreeMap<String, String>) -> proto::Inventory {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    system.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
    let cpu_model = system.cpus().first().map(|c| c.brand().trim().to_owned()).unwrap_or_default();
    let cores = sysinfo::System::physical_core_count().unwrap_or(system.cpus().len());
    let arch = std::env::consts::ARCH.to_owned();
    let features = std::fs::read_to_string("/proc/cpuinfo").map(|c| cpu_features(&c)).unwrap_or_default();
    let (disk_total, disk_available) = disk_space(data_dir).unwrap_or_default();
    proto::Inventory {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.to_owned()),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        hardware_class: hardware_class(labels, &arch, &features),
        arch,
        cpu_model,
        cpu_cores: u32::try_from(cores).unwrap_or(u32::MAX),
        cpu_features: features,
        memory_total_bytes: system.total_memory(),
        memory_available_bytes: system.available_memory(),
        disk_total_bytes: disk_total,
        disk_available_bytes: disk_available,
        ..Default::default()
    }
}

/// Memory available for new allocations now, in bytes.
pub fn memory_available() -> u64 {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    system.available_memory()
}

/// Total and available bytes of the filesystem holding `path` (the mount point that is its longest prefix).
pub fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| (d.total_space(), d.available_space()))
}

/// The interesting features named in /proc/cpuinfo's `flags` (x86) or `Features` (arm) line.
pub fn cpu_features(cpuinfo: &str) -> Vec<String> {
    let Some(line) = cpuinfo.lines().find(|l| l.starts_with("flags") || l.starts_with("Features")) else {
        return Vec::new();
    };
    let listed: Vec<&str> = line.split_once(':').map(|(_, v)| v.split_whitespace().collect()).unwrap_or_default();
    INTERESTING_FEATURES.iter().filter(|f| listed.contains(f)).map(|f| (*f).to_owned()).collect()
}

/// The label `class` when set; otherwise derived from the architecture and CPU features.
pub fn hardware_class(labels: &BTreeMap<String, String>, arch: &str, features: &[String]) -> String {
    if let Some(class) = labels.get("class").filter(|c| !c.is_empty()) {
        return class.clone();
    }
    let has = |f: &str| features.iter().any(|x| x == f);
    match arch {
        "x86_64" if has("avx512f") => "x86-avx512".to_owned(),
        "x86_64" if has("avx2") => "x86-avx2".to_owned(),
        "x86_64" => "x86".to_owned(),
        "aarch64" if has("asimddp") => "arm64-dotprod".to_owned(),
        "aarch64" => "arm64".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_read_from_cpuinfo() {
        let x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n";
        assert_eq!(cpu_features(x86), ["avx2", "fma", "f16c"]);
        let arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm asimddp\n";
        assert_eq!(cpu_features(arm), ["asimd", "asimddp"]);
        assert!(cpu_features("").is_empty());
    }

    #[test]
    fn the_class_label_wins_over_derivation() {
        let none = BTreeMap::new();
        let avx2 = vec!["avx2".to_owned()];
        assert_eq!(hardware_class(&none, "x86_64", &avx2), "x86-avx2");
        assert_eq!(hardware_class(&none, "x86_64", &[]), "x86");
        assert_eq!(hardware_class(&none, "aarch64", &[]), "arm64");
        let labelled = BTreeMap::from([("class".to_owned(), "pi5-8g".to_owned())]);
        assert_eq!(hardware_class(&labelled, "aarch64", &[]), "pi5-8g");
    }

    #[test]
    fn collect_measures_this_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inv = collect(dir.path(), &BTreeMap::new());
        assert_eq!(inv.arch, std::env::consts::ARCH);
        assert!(inv.memory_total_bytes > 0);
        assert!(inv.cpu_cores > 0);
        assert!(!inv.hardware_class.is_empty());
    }
}
