//! What this device is: host, OS, CPU (model, cores, the features llama.cpp's kernels use), memory, disk,
//! temperatures, throttling, board identity (Raspberry Pi, Jetson and its power mode, NVIDIA GPUs), and a
//! derived hardware class. Parsers are pure functions over file contents; readers take a root path so
//! tests point them at a fixture tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_shared::bundle::CPU_FEATURES;
use alki_shared::proto;

/// Sensors reported at most (a server can list hundreds of hwmon inputs).
const MAX_SENSORS: usize = 32;
/// Bound on reading one small system file.
const MAX_SYS_FILE: u64 = 64 << 10;
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(3);

/// Measures the device. Blocking (reads /proc, /sys and statvfs): call from `spawn_blocking` in async code.
pub fn collect(data_dir: &Path, labels: &BTreeMap<String, String>) -> proto::Inventory {
    collect_at(Path::new("/"), data_dir, labels)
}

/// [`collect`] reading the platform's files under `root` instead of `/` (host name and disk space always
/// come from this machine).
pub fn collect_at(root: &Path, data_dir: &Path, labels: &BTreeMap<String, String>) -> proto::Inventory {
    let live = root == Path::new("/");
    let cpuinfo = read_small(&root.join("proc/cpuinfo")).unwrap_or_default();
    let features = if live { live_cpu_features(&cpuinfo) } else { cpu_features(&cpuinfo) };
    let cpu = cpu_identity(&cpuinfo);
    let (memory_total, memory_available) = match read_small(&root.join("proc/meminfo")).and_then(|m| meminfo(&m)) {
        Some(m) => m,
        None => {
            let mut system = sysinfo::System::new();
            system.refresh_memory();
            (system.total_memory(), system.available_memory())
        }
    };
    let (cpu_model, cpu_cores) = if cpu.model.is_empty() || cpu.cores == 0 {
        let mut system = sysinfo::System::new();
        system.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
        let model = system.cpus().first().map(|c| c.brand().trim().to_owned()).unwrap_or_default();
        let cores = sysinfo::System::physical_core_count().unwrap_or(system.cpus().len());
        (if cpu.model.is_empty() { model } else { cpu.model }, if cpu.cores == 0 { cores } else { cpu.cores })
    } else {
        (cpu.model, cpu.cores)
    };
    let arch = if live { std::env::consts::ARCH.to_owned() } else { arch_from_cpuinfo(&cpuinfo) };
    let board = read_board(root, live, memory_total);
    let (disk_total, disk_available) = disk_space(data_dir).unwrap_or_default();
    let os = read_small(&root.join("etc/os-release"))
        .and_then(|t| os_release_name(&t))
        .or_else(|| live.then(sysinfo::System::long_os_version).flatten())
        .unwrap_or_else(|| std::env::consts::OS.to_owned());
    let kernel = read_small(&root.join("proc/sys/kernel/osrelease"))
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .or_else(|| live.then(sysinfo::System::kernel_version).flatten())
        .unwrap_or_default();
    let facts = ClassFacts { arch: &arch, features: &features, board: &board, memory_total };
    proto::Inventory {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os,
        kernel,
        hardware_class: hardware_class(labels, &facts),
        arch,
        cpu_model,
        cpu_cores: u32::try_from(cpu_cores).unwrap_or(u32::MAX),
        cpu_features: features,
        memory_total_bytes: memory_total,
        memory_available_bytes: memory_available,
        disk_total_bytes: disk_total,
        disk_available_bytes: disk_available,
        board_model: board.model,
        power_mode: board.power_mode,
        gpus: board.gpus,
        temperatures: read_temperatures(root),
        // The session fills it from the config it runs with.
        remote_diagnostics_refused: false,
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

/// A small system file as text; None when absent or unreadable (most are optional by platform).
pub(crate) fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_SYS_FILE).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Entries of a directory, sorted (so sensor order is stable); empty when it does not exist.
fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    entries.sort();
    entries
}

// ---------------------------------------------------------------------------------------------------------
// CPU

/// This CPU's features as [`cpu_features`] names them. On arm64 they come from the kernel's hardware
/// capabilities (what the process may use, also under emulation, where `/proc/cpuinfo` shows the host's);
/// elsewhere from `cpuinfo`.
pub fn live_cpu_features(cpuinfo: &str) -> Vec<String> {
    #[cfg(target_arch = "aarch64")]
    {
        let _ = cpuinfo;
        hwcap_features()
    }
    #[cfg(not(target_arch = "aarch64"))]
    cpu_features(cpuinfo)
}

/// arm64 features by `/proc/cpuinfo` name from the auxiliary vector's HWCAP bits (std's detection).
#[cfg(target_arch = "aarch64")]
fn hwcap_features() -> Vec<String> {
    use std::arch::is_aarch64_feature_detected as has;
    let detected = [
        ("asimd", has!("neon")),
        ("asimdhp", has!("fp16")),
        ("asimddp", has!("dotprod")),
        ("i8mm", has!("i8mm")),
        ("sve", has!("sve")),
        ("sve2", has!("sve2")),
        ("bf16", has!("bf16")),
    ];
    CPU_FEATURES.iter().filter(|f| detected.contains(&(**f, true))).map(|f| (*f).to_owned()).collect()
}

/// The interesting features named in /proc/cpuinfo's `flags` (x86) or `Features` (arm) line.
pub fn cpu_features(cpuinfo: &str) -> Vec<String> {
    let Some(line) = cpuinfo.lines().find(|l| l.starts_with("flags") || l.starts_with("Features")) else {
        return Vec::new();
    };
    let listed: Vec<&str> = line.split_once(':').map(|(_, v)| v.split_whitespace().collect()).unwrap_or_default();
    CPU_FEATURES.iter().filter(|f| listed.contains(f)).map(|f| (*f).to_owned()).collect()
}

/// CPU model and core count as /proc/cpuinfo tells them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuIdentity {
    pub model: String,
    /// Physical cores when cpuinfo says (`physical id` × `cpu cores`), otherwise logical processors.
    pub cores: usize,
}

/// The CPU model (arm: the core named by `CPU implementer`/`CPU part` when known, else `model name`) and
/// the core count.
pub fn cpu_identity(cpuinfo: &str) -> CpuIdentity {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let processors = cpuinfo.lines().filter(|l| l.split(':').next().map(str::trim) == Some("processor")).count();
    let mut physical_ids: Vec<&str> = cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == "physical id").map(|(_, v)| v.trim()))
        .collect();
    physical_ids.sort_unstable();
    physical_ids.dedup();
    let per_package = field("cpu cores").and_then(|c| c.parse::<usize>().ok());
    let cores = match per_package {
        Some(c) if c > 0 && !physical_ids.is_empty() => c * physical_ids.len(),
        _ => processors,
    };
    // Arm kernels often say only "ARMv8 Processor rev 1 (v8l)": the core named by implementer and part says more.
    let arm = field("CPU implementer").zip(field("CPU part"));
    let model = arm
        .as_ref()
        .and_then(|(implementer, part)| arm_core_name(implementer, part).map(str::to_owned))
        .or_else(|| field("model name").filter(|m| !m.is_empty()))
        .or_else(|| arm.map(|(implementer, part)| format!("arm {implementer}/{part}")));
    CpuIdentity { model: model.unwrap_or_default(), cores }
}

/// The core behind an Arm `CPU implementer`/`CPU part` pair (the ones found on Pi and Jetson boards).
fn arm_core_name(implementer: &str, part: &str) -> Option<&'static str> {
    let name = match (implementer.to_ascii_lowercase().as_str(), part.to_ascii_lowercase().as_str()) {
        ("0x41", "0xd03") => "Cortex-A53",
        ("0x41", "0xd04") => "Cortex-A35",
        ("0x41", "0xd05") => "Cortex-A55",
        ("0x41", "0xd07") => "Cortex-A57",
        ("0x41", "0xd08") => "Cortex-A72",
        ("0x41", "0xd09") => "Cortex-A73",
        ("0x41", "0xd0a") => "Cortex-A75",
        ("0x41", "0xd0b") => "Cortex-A76",
        ("0x41", "0xd0c") => "Neoverse-N1",
        ("0x41", "0xd0d") => "Cortex-A77",
        ("0x41", "0xd40") => "Neoverse-V1",
        ("0x41", "0xd41") => "Cortex-A78",
        ("0x41", "0xd42") => "Cortex-A78AE",
        ("0x41", "0xd44") => "Cortex-X1",
        ("0x41", "0xd49") => "Neoverse-N2",
        ("0x41", "0xd4f") => "Neoverse-V2",
        ("0x4e", "0x004") => "NVIDIA Carmel",
        _ => return None,
    };
    Some(name)
}

/// The architecture a cpuinfo belongs to (for fixture trees; the live agent knows its own).
fn arch_from_cpuinfo(cpuinfo: &str) -> String {
    if cpuinfo.lines().any(|l| l.starts_with("flags")) {
        return "x86_64".to_owned();
    }
    if cpuinfo.contains("CPU architecture: 8") {
        return "aarch64".to_owned();
    }
    if cpuinfo.contains("CPU architecture: 7") {
        return "arm".to_owned();
    }
    std::env::consts::ARCH.to_owned()
}

/// (MemTotal, MemAvailable) in bytes from /proc/meminfo (kB lines).
pub fn meminfo(text: &str) -> Option<(u64, u64)> {
    let kib = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok().map(|k| k.saturating_mul(1024))
        })
    };
    let total = kib("MemTotal")?;
    let available = kib("MemAvailable").or_else(|| kib("MemFree")).unwrap_or(0);
    Some((total, available))
}

/// `PRETTY_NAME` from /etc/os-release.
pub fn os_release_name(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix("PRETTY_NAME=")?;
        let value = value.trim().trim_matches('"').trim();
        (!value.is_empty()).then(|| value.to_owned())
    })
}

// ---------------------------------------------------------------------------------------------------------
// Board identity

/// The board as its own files name it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Board {
    /// Device-tree model, e.g. "Raspberry Pi 5 Model B Rev 1.0"; empty on PCs and servers.
    pub model: String,
    /// Jetson nvpmodel mode name, e.g. "15W".
    pub power_mode: String,
    pub gpus: Vec<proto::Gpu>,
}

impl Board {
    pub fn kind(&self) -> BoardKind {
        board_kind(&self.model)
    }
}

/// Boards with their own hardware classes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoardKind {
    /// The generation part of the class: "5", "4", "cm4", "zero2", "3".
    RaspberryPi(String),
    /// The model part of the class: "orin-nano", "agx-orin", "xavier-nx".
    Jetson(String),
    Other,
}

/// A device-tree `model` (NUL-terminated in the file).
pub fn device_tree_model(bytes: &str) -> String {
    bytes.trim_end_matches('\0').trim().to_owned()
}

pub fn board_kind(model: &str) -> BoardKind {
    if let Some(rest) = model.strip_prefix("Raspberry Pi ") {
        let generation = if let Some(cm) = rest.strip_prefix("Compute Module ") {
            format!("cm{}", cm.split_whitespace().next().unwrap_or(""))
        } else if let Some(zero) = rest.strip_prefix("Zero") {
            match zero.split_whitespace().next() {
                Some("2") => "zero2".to_owned(),
                _ => "zero".to_owned(),
            }
        } else {
            rest.split_whitespace().next().unwrap_or("").to_ascii_lowercase()
        };
        return BoardKind::RaspberryPi(generation);
    }
    if model.contains("Jetson") {
        let name = model
            .replace("NVIDIA", "")
            .replace("Jetson", "")
            .replace("Developer Kit", "")
            .replace("Engineering Reference", "")
            .split_whitespace()
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join("-");
        return BoardKind::Jetson(name);
    }
    BoardKind::Other
}

/// Reads the board identity under `root`. `live`: allowed to run `nvidia-smi` (never for fixture trees).
pub fn read_board(root: &Path, live: bool, memory_total: u64) -> Board {
    let model = ["proc/device-tree/model", "sys/firmware/devicetree/base/model"]
        .iter()
        .find_map(|p| read_small(&root.join(p)).map(|m| device_tree_model(&m)).filter(|m| !m.is_empty()))
        .unwrap_or_default();
    let mut board = Board { model, ..Default::default() };
    if let BoardKind::Jetson(_) = board.kind() {
        let conf = read_small(&root.join("etc/nvpmodel.conf")).unwrap_or_default();
        let status = read_small(&root.join("var/lib/nvpmodel/status")).unwrap_or_default();
        board.power_mode = nvpmodel_mode(&conf, &status).unwrap_or_default();
        // Jetson GPUs are integrated: they share the system memory.
        board.gpus.push(proto::Gpu { name: format!("{} (integrated)", board.model), vram_bytes: memory_total });
    }
    let nvidia = root.join("proc/driver/nvidia/gpus");
    if nvidia.is_dir() {
        let smi = if live { run_nvidia_smi() } else { read_small(&root.join("nvidia-smi.csv")) };
        let from_smi = smi.map(|s| nvidia_smi_gpus(&s)).unwrap_or_default();
        if from_smi.is_empty() {
            // No nvidia-smi: the driver's files name the GPUs but not their memory.
            for dir in sorted_entries(&nvidia) {
                if let Some(name) = read_small(&dir.join("information")).and_then(|t| nvidia_information_model(&t)) {
                    board.gpus.push(proto::Gpu { name, vram_bytes: 0 });
                }
            }
        } else {
            board.gpus.extend(from_smi);
        }
    }
    board
}

/// The nvpmodel mode in force: the `pmode` of nvpmodel's status file, else the conf's `PM_CONFIG DEFAULT`,
/// named by the conf's `< POWER_MODEL ID=n NAME=... >` lines.
pub fn nvpmodel_mode(conf: &str, status: &str) -> Option<String> {
    let id = status
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pmode:"))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .or_else(|| {
            conf.lines().find_map(|l| {
                let l = l.trim();
                l.strip_prefix("< PM_CONFIG")?.split_whitespace().find_map(|w| w.strip_prefix("DEFAULT="))?.parse().ok()
            })
        })?;
    let named = conf.lines().find_map(|l| {
        let body = l.trim().strip_prefix("< POWER_MODEL")?.trim_end_matches('>');
        let mut mode_id = None;
        let mut name = None;
        for word in body.split_whitespace() {
            if let Some(v) = word.strip_prefix("ID=") {
                mode_id = v.parse::<u32>().ok();
            } else if let Some(v) = word.strip_prefix("NAME=") {
                name = Some(v.to_owned());
            }
        }
        (mode_id == Some(id)).then_some(name).flatten()
    });
    Some(named.unwrap_or_else(|| format!("mode {id}")))
}

/// GPUs from `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` (MiB).
pub fn nvidia_smi_gpus(csv: &str) -> Vec<proto::Gpu> {
    csv.lines()
        .filter_map(|l| {
            let (name, mib) = l.rsplit_once(',')?;
            let mib = mib.trim().parse::<u64>().ok()?;
            Some(proto::Gpu { name: name.trim().to_owned(), vram_bytes: mib.saturating_mul(1 << 20) })
        })
        .collect()
}

/// The `Model:` line of /proc/driver/nvidia/gpus/*/information.
pub fn nvidia_information_model(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "Model").then(|| v.trim().to_owned()).filter(|v| !v.is_empty())
    })
}

/// Runs nvidia-smi with a bound; None when it is missing, fails or hangs (a wedged driver can hang it).
fn run_nvidia_smi() -> Option<String> {
    let mut child = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + NVIDIA_SMI_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!("nvidia-smi did not answer in time; GPU memory is not reported.");
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    use std::io::Read;
    let mut out = String::new();
    child.stdout.take()?.take(MAX_SYS_FILE).read_to_string(&mut out).ok()?;
    Some(out)
}

// ---------------------------------------------------------------------------------------------------------
// Temperatures and throttling

/// Every thermal zone (`type`, `temp` in m°C) and hwmon input (`name`, `tempN_label`, `tempN_input`),
/// at most [`MAX_SENSORS`].
pub fn read_temperatures(root: &Path) -> Vec<proto::Temperature> {
    let mut out = Vec::new();
    for zone in sorted_entries(&root.join("sys/class/thermal")) {
        let is_zone = zone.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("thermal_zone"));
        if !is_zone {
            continue;
        }
        let Some(celsius) = read_small(&zone.join("temp")).and_then(|t| millidegrees(&t)) else { continue };
        let sensor = read_small(&zone.join("type")).map(|t| t.trim().to_owned()).unwrap_or_default();
        out.push(proto::Temperature { sensor, celsius });
    }
    for hwmon in sorted_entries(&root.join("sys/class/hwmon")) {
        let chip = read_small(&hwmon.join("name")).map(|t| t.trim().to_owned()).unwrap_or_default();
        for input in sorted_entries(&hwmon) {
            let Some(file) = input.file_name().and_then(|n| n.to_str()) else { continue };
            let Some(index) = file.strip_prefix("temp").and_then(|r| r.strip_suffix("_input")) else { continue };
            let Some(celsius) = read_small(&input).and_then(|t| millidegrees(&t)) else { continue };
            let label = read_small(&hwmon.join(format!("temp{index}_label"))).map(|t| t.trim().to_owned());
            let sensor = match label {
                Some(label) if !label.is_empty() => format!("{chip} {label}"),
                _ => format!("{chip} temp{index}"),
            };
            out.push(proto::Temperature { sensor, celsius });
        }
    }
    out.truncate(MAX_SENSORS);
    out
}

/// A sysfs temperature in millidegrees Celsius; absurd readings (disconnected sensors) are dropped.
pub fn millidegrees(text: &str) -> Option<f64> {
    let value = text.trim().parse::<i64>().ok()? as f64 / 1000.0;
    (-60.0..=200.0).contains(&value).then_some(value)
}

/// The hottest sensor, if any.
pub fn max_temperature(temperatures: &[proto::Temperature]) -> Option<f64> {
    temperatures.iter().map(|t| t.celsius).reduce(f64::max)
}

/// One reading of the platform's throttling indicators; compare two with [`ThrottleSample::throttled_since`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleSample {
    /// Throttle events counted by the kernel so far (x86 `thermal_throttle` counters, summed).
    pub events: u64,
    /// Throttled right now (Raspberry Pi firmware bits 1-3: frequency capped, throttled, soft temperature
    /// limit; bit 0 under-voltage also slows the CPU).
    pub now: bool,
}

impl ThrottleSample {
    /// True when the CPU throttled between `earlier` and this sample (or is throttled at either).
    pub fn throttled_since(&self, earlier: &ThrottleSample) -> bool {
        self.events > earlier.events || self.now || earlier.now
    }
}

/// Raspberry Pi `get_throttled` (e.g. `0x50005`): true when a "now" bit (0-3) is set.
pub fn pi_throttled_now(text: &str) -> Option<bool> {
    let t = text.trim();
    let t = t.strip_prefix("throttled=").unwrap_or(t);
    let bits = u32::from_str_radix(t.trim_start_matches("0x"), 16).ok()?;
    Some(bits & 0xf != 0)
}

/// Reads the throttling indicators under `root`.
pub fn read_throttle(root: &Path) -> ThrottleSample {
    let mut sample = ThrottleSample::default();
    for platform_dir in sorted_entries(&root.join("sys/devices/platform")) {
        let is_soc = platform_dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("soc"));
        if !is_soc {
            continue;
        }
        for firmware in sorted_entries(&platform_dir) {
            let named = firmware.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("firmware"));
            if named && let Some(now) = read_small(&firmware.join("get_throttled")).and_then(|t| pi_throttled_now(&t)) {
                sample.now |= now;
            }
        }
    }
    for cpu in sorted_entries(&root.join("sys/devices/system/cpu")) {
        let dir = cpu.join("thermal_throttle");
        if !dir.is_dir() {
            continue;
        }
        for counter in ["core_throttle_count", "package_throttle_count"] {
            if let Some(n) = read_small(&dir.join(counter)).and_then(|t| t.trim().parse::<u64>().ok()) {
                sample.events = sample.events.saturating_add(n);
            }
        }
    }
    sample
}

// ---------------------------------------------------------------------------------------------------------
// Hardware class

/// What a hardware class is derived from.
pub struct ClassFacts<'a> {
    pub arch: &'a str,
    pub features: &'a [String],
    pub board: &'a Board,
    pub memory_total: u64,
}

/// Memory as boards are sold: rounded to the nearest power of two GiB (an 8 GB Pi reports 7.9 GiB).
fn marketed_gib(bytes: u64) -> u64 {
    let gib = bytes as f64 / f64::from(1u32 << 30);
    if gib < 0.75 {
        return 0;
    }
    let mut size = 1u64;
    while (size as f64) * 1.5 < gib {
        size *= 2;
    }
    size
}

/// The label `class` when set; otherwise derived: `pi5-8g`, `jetson-orin-nano-8g`, `x86-avx2`,
/// `x86-avx512-nvidia-24g`, `arm64-dotprod`...
pub fn hardware_class(labels: &BTreeMap<String, String>, facts: &ClassFacts<'_>) -> String {
    if let Some(class) = labels.get("class").filter(|c| !c.is_empty()) {
        return class.clone();
    }
    let memory = match marketed_gib(facts.memory_total) {
        0 => "512m".to_owned(),
        g => format!("{g}g"),
    };
    match facts.board.kind() {
        BoardKind::RaspberryPi(generation) => return format!("pi{generation}-{memory}"),
        BoardKind::Jetson(name) => return format!("jetson-{name}-{memory}"),
        BoardKind::Other => {}
    }
    let has = |f: &str| facts.features.iter().any(|x| x == f);
    let cpu = match facts.arch {
        "x86_64" if has("avx512f") => "x86-avx512".to_owned(),
        "x86_64" if has("avx2") => "x86-avx2".to_owned(),
        "x86_64" => "x86".to_owned(),
        "aarch64" if has("asimddp") => "arm64-dotprod".to_owned(),
        "aarch64" => "arm64".to_owned(),
        other => other.to_owned(),
    };
    match facts.board.gpus.iter().map(|g| g.vram_bytes).max() {
        // GPU memory comes in sizes like 12 or 24 GB: whole GiB, not powers of two.
        Some(vram) => format!("{cpu}-nvidia-{}g", (vram as f64 / f64::from(1u32 << 30)).round() as u64),
        None => cpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> String {
        let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path);
        std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("fixture {}: {e}", full.display()))
    }

    #[test]
    fn features_are_read_from_cpuinfo() {
        let x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n";
        assert_eq!(cpu_features(x86), ["avx", "avx2", "fma", "f16c"]);
        let arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm asimddp\n";
        assert_eq!(cpu_features(arm), ["asimd", "asimddp"]);
        assert!(cpu_features("").is_empty());
    }

    #[test]
    fn pi5_cpuinfo_names_the_cortex_a76_and_its_dot_product() {
        let text = fixture("pi5/proc/cpuinfo");
        assert_eq!(cpu_identity(&text), CpuIdentity { model: "Cortex-A76".to_owned(), cores: 4 });
        assert_eq!(cpu_features(&text), ["asimd", "asimdhp", "asimddp"]);
        assert_eq!(arch_from_cpuinfo(&text), "aarch64");
    }

    #[test]
    fn x86_cpuinfo_counts_physical_cores_not_threads() {
        let text = fixture("x86-nvidia/proc/cpuinfo");
        let cpu = cpu_identity(&text);
        assert_eq!(cpu.model, "Intel(R) Xeon(R) E-2278G CPU @ 3.40GHz");
        assert_eq!(cpu.cores, 8, "two SMT threads per core are one core for llama.cpp's threads");
        let features = cpu_features(&text);
        assert!(features.contains(&"avx2".to_owned()) && !features.contains(&"avx512f".to_owned()), "{features:?}");
    }

    #[test]
    fn jetson_cpuinfo_and_power_mode() {
        let text = fixture("jetson-orin-nano/proc/cpuinfo");
        assert_eq!(cpu_identity(&text).model, "Cortex-A78AE");
        assert_eq!(cpu_identity(&text).cores, 6);
        let conf = fixture("jetson-orin-nano/etc/nvpmodel.conf");
        assert_eq!(nvpmodel_mode(&conf, "pmode:0001 fmode:quiet\n").as_deref(), Some("7W"));
        assert_eq!(nvpmodel_mode(&conf, "").as_deref(), Some("15W"), "no status: the conf's default");
        assert_eq!(nvpmodel_mode(&conf, "pmode:0009").as_deref(), Some("mode 9"));
        assert_eq!(nvpmodel_mode("", ""), None);
    }

    #[test]
    fn board_models_give_their_kind() {
        assert_eq!(device_tree_model("Raspberry Pi 5 Model B Rev 1.0\0"), "Raspberry Pi 5 Model B Rev 1.0");
        assert_eq!(board_kind("Raspberry Pi 5 Model B Rev 1.0"), BoardKind::RaspberryPi("5".into()));
        assert_eq!(board_kind("Raspberry Pi 4 Model B Rev 1.4"), BoardKind::RaspberryPi("4".into()));
        assert_eq!(board_kind("Raspberry Pi Compute Module 4 Rev 1.0"), BoardKind::RaspberryPi("cm4".into()));
        assert_eq!(board_kind("Raspberry Pi Zero 2 W Rev 1.0"), BoardKind::RaspberryPi("zero2".into()));
        assert_eq!(board_kind("NVIDIA Jetson Orin Nano Developer Kit"), BoardKind::Jetson("orin-nano".into()));
        assert_eq!(board_kind("Jetson AGX Orin"), BoardKind::Jetson("agx-orin".into()));
        assert_eq!(board_kind(""), BoardKind::Other);
    }

    #[test]
    fn meminfo_os_release_and_temperatures_parse() {
        let (total, available) = meminfo(&fixture("pi5/proc/meminfo")).expect("meminfo");
        assert_eq!(total, 8_245_008 * 1024);
        assert_eq!(available, 7_321_532 * 1024);
        assert_eq!(meminfo("nothing"), None);
        assert_eq!(os_release_name(&fixture("pi5/etc/os-release")).as_deref(), Some("Debian GNU/Linux 12 (bookworm)"));
        assert_eq!(millidegrees("48250\n"), Some(48.25));
        assert_eq!(millidegrees("-274000"), None);
        assert_eq!(millidegrees("garbage"), None);
    }

    #[test]
    fn nvidia_gpus_are_named_with_their_memory() {
        let gpus = nvidia_smi_gpus("NVIDIA GeForce RTX 3090, 24576\nNVIDIA T4, 15360\nbroken line\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].name, "NVIDIA GeForce RTX 3090");
        assert_eq!(gpus[0].vram_bytes, 24576 << 20);
        let info = fixture("x86-nvidia/proc/driver/nvidia/gpus/0000:01:00.0/information");
        assert_eq!(nvidia_information_model(&info).as_deref(), Some("NVIDIA GeForce RTX 3090"));
    }

    #[test]
    fn pi_throttle_bits_and_x86_counters() {
        assert_eq!(pi_throttled_now("0x0\n"), Some(false));
        assert_eq!(pi_throttled_now("0x50000"), Some(false), "only 'has occurred' bits: not throttled now");
        assert_eq!(pi_throttled_now("0x50005"), Some(true));
        assert_eq!(pi_throttled_now("throttled=0x4"), Some(true), "vcgencmd's output form");
        assert_eq!(pi_throttled_now("nope"), None);
        let before = ThrottleSample { events: 10, now: false };
        assert!(!ThrottleSample { events: 10, now: false }.throttled_since(&before));
        assert!(ThrottleSample { events: 11, now: false }.throttled_since(&before));
        assert!(ThrottleSample { events: 10, now: true }.throttled_since(&before));
    }

    #[test]
    fn the_class_label_wins_over_derivation() {
        let none = BTreeMap::new();
        let board = Board::default();
        let avx2 = vec!["avx2".to_owned()];
        let class = |arch: &str, features: &[String], board: &Board, gib: u64| {
            hardware_class(&none, &ClassFacts { arch, features, board, memory_total: gib << 30 })
        };
        assert_eq!(class("x86_64", &avx2, &board, 16), "x86-avx2");
        assert_eq!(class("x86_64", &[], &board, 16), "x86");
        assert_eq!(class("aarch64", &[], &board, 4), "arm64");
        let pi = Board { model: "Raspberry Pi 5 Model B Rev 1.0".into(), ..Default::default() };
        assert_eq!(
            hardware_class(
                &none,
                &ClassFacts { arch: "aarch64", features: &[], board: &pi, memory_total: 8_245_008 * 1024 }
            ),
            "pi5-8g"
        );
        let gpu = Board { gpus: vec![proto::Gpu { name: "T4".into(), vram_bytes: 15360 << 20 }], ..Default::default() };
        assert_eq!(class("x86_64", &avx2, &gpu, 64), "x86-avx2-nvidia-15g");
        let labelled = BTreeMap::from([("class".to_owned(), "pi5-8g".to_owned())]);
        let facts = ClassFacts { arch: "aarch64", features: &[], board: &board, memory_total: 1 << 30 };
        assert_eq!(hardware_class(&labelled, &facts), "pi5-8g");
    }

    #[test]
    fn collect_measures_this_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inv = collect(dir.path(), &BTreeMap::new());
        assert_eq!(inv.arch, std::env::consts::ARCH);
        assert!(inv.memory_total_bytes > 0);
        assert!(inv.cpu_cores > 0);
        assert!(!inv.hardware_class.is_empty());
        assert!(!inv.kernel.is_empty());
    }
}
