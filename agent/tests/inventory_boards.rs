//! The inventory read from fixture trees holding the files real boards have (Raspberry Pi 5, Jetson Orin
//! Nano, an x86 workstation with an NVIDIA GPU): board identity, power mode, GPUs, temperatures, throttling
//! and the derived hardware class.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alki_agent::inventory::{ThrottleSample, collect_at, read_throttle};

fn root(board: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(board)
}

fn sensor(inv: &alki_shared::proto::Inventory, name: &str) -> Option<f64> {
    inv.temperatures.iter().find(|t| t.sensor == name).map(|t| t.celsius)
}

#[test]
fn raspberry_pi_5() {
    let data = tempfile::tempdir().expect("tempdir");
    let inv = collect_at(&root("pi5"), data.path(), &BTreeMap::new());
    assert_eq!(inv.board_model, "Raspberry Pi 5 Model B Rev 1.0");
    assert_eq!(inv.hardware_class, "pi5-8g");
    assert_eq!(inv.arch, "aarch64");
    assert_eq!(inv.cpu_model, "Cortex-A76");
    assert_eq!(inv.cpu_cores, 4);
    assert_eq!(inv.cpu_features, ["asimd", "asimdhp", "asimddp"]);
    assert_eq!(inv.memory_total_bytes, 8_245_008 * 1024);
    assert_eq!(inv.os, "Debian GNU/Linux 12 (bookworm)");
    assert_eq!(inv.kernel, "6.6.51+rpt-rpi-2712");
    assert!(inv.gpus.is_empty());
    assert!(inv.power_mode.is_empty());
    assert_eq!(sensor(&inv, "cpu-thermal"), Some(61.35));
    assert_eq!(sensor(&inv, "cpu_thermal temp1"), Some(61.35));
    assert_eq!(sensor(&inv, "rp1_adc temp1"), Some(54.987));
    // get_throttled 0x60006: frequency capped and throttled now.
    let throttle = read_throttle(&root("pi5"));
    assert!(throttle.now);
    assert!(throttle.throttled_since(&ThrottleSample::default()));
}

#[test]
fn jetson_orin_nano() {
    let data = tempfile::tempdir().expect("tempdir");
    let inv = collect_at(&root("jetson-orin-nano"), data.path(), &BTreeMap::new());
    assert_eq!(inv.board_model, "NVIDIA Jetson Orin Nano Developer Kit");
    assert_eq!(inv.hardware_class, "jetson-orin-nano-8g");
    assert_eq!(inv.power_mode, "7W", "nvpmodel's status says mode 1, which the conf names 7W");
    assert_eq!(inv.cpu_model, "Cortex-A78AE", "the core, not the kernel's generic \"ARMv8 Processor\"");
    assert_eq!(inv.cpu_cores, 6);
    assert!(inv.cpu_features.contains(&"asimddp".to_owned()));
    assert_eq!(inv.gpus.len(), 1, "the integrated GPU");
    assert_eq!(inv.gpus[0].vram_bytes, inv.memory_total_bytes, "it shares the system memory");
    assert_eq!(sensor(&inv, "gpu-thermal"), Some(47.187));
    assert_eq!(sensor(&inv, "cv0-thermal"), None, "a disconnected sensor's -256 °C is dropped");
    assert!(!read_throttle(&root("jetson-orin-nano")).now);
}

#[test]
fn x86_workstation_with_an_nvidia_gpu() {
    let data = tempfile::tempdir().expect("tempdir");
    let inv = collect_at(&root("x86-nvidia"), data.path(), &BTreeMap::new());
    assert!(inv.board_model.is_empty());
    assert_eq!(inv.arch, "x86_64");
    assert_eq!(inv.cpu_cores, 8);
    assert_eq!(inv.hardware_class, "x86-avx2-nvidia-24g");
    assert_eq!(inv.gpus.len(), 1);
    assert_eq!(inv.gpus[0].name, "NVIDIA GeForce RTX 3090");
    assert_eq!(inv.gpus[0].vram_bytes, 24 << 30);
    assert_eq!(sensor(&inv, "coretemp Package id 0"), Some(45.0));
    assert_eq!(sensor(&inv, "acpitz temp1"), Some(27.8));
    // Two CPUs with core and package throttle counters: 3 + 12 + 4 + 12.
    assert_eq!(read_throttle(&root("x86-nvidia")), ThrottleSample { events: 31, now: false });
    let labelled = BTreeMap::from([("class".to_owned(), "lab-gpu".to_owned())]);
    assert_eq!(collect_at(&root("x86-nvidia"), data.path(), &labelled).hardware_class, "lab-gpu");
}
