//! The inventory read from fixture trees holding the files real boards have (Raspberry Pi 5, Jetson Orin
//! Nano, an x86 workstation with an NVIDIA GPU): board identity, power mode, GPUs, temperatures, throttling
//! and the derived hardware class; and the runtime build entry each board chooses from a multi-platform build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alki_agent::inventory::{ThrottleSample, collect_at, read_throttle};
use alki_agent::pull::build::{DevicePlatform, choose_platform, entry_label};
use alki_shared::bundle::{ANNOTATION_ACCELERATOR, ANNOTATION_CPU_FEATURES};
use alki_shared::digest::Digest;
use alki_shared::oci::{Descriptor, ImageIndex, MEDIA_TYPE_IMAGE_MANIFEST, Platform};

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

/// One entry of a runtime build index as `alkictl runtime push --platform` writes it.
fn build_entry(arch: &str, accelerator: &str, features: &str) -> Descriptor {
    let mut d =
        Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, Digest::of(format!("{arch}{accelerator}{features}").as_bytes()), 1);
    d.platform = Some(Platform { os: "linux".into(), architecture: arch.into(), variant: None });
    d.annotations.insert(ANNOTATION_ACCELERATOR.into(), accelerator.into());
    if !features.is_empty() {
        d.annotations.insert(ANNOTATION_CPU_FEATURES.into(), features.into());
    }
    d
}

#[test]
fn each_board_chooses_its_runtime_build_entry() {
    // The release's build: arm64 baseline (Pi 4), Pi 5's dotprod/fp16 tuning, Jetson's CUDA, x86 baseline and
    // AVX2, and an x86 CUDA build.
    let index = ImageIndex {
        schema_version: 2,
        media_type: None,
        artifact_type: None,
        manifests: vec![
            build_entry("arm64", "cpu", ""),
            build_entry("arm64", "cpu", "asimddp,asimdhp"),
            build_entry("arm64", "cuda", ""),
            build_entry("amd64", "cpu", ""),
            build_entry("amd64", "cpu", "avx2,fma"),
            build_entry("amd64", "cuda", "avx2"),
        ],
        subject: None,
        annotations: Default::default(),
    };
    let data = tempfile::tempdir().expect("tempdir");
    let chosen = |inv: &alki_shared::proto::Inventory| {
        choose_platform(&index, &DevicePlatform::of_inventory(inv)).map(entry_label).expect("an entry")
    };
    let pi5 = collect_at(&root("pi5"), data.path(), &BTreeMap::new());
    assert_eq!(chosen(&pi5), "linux/arm64+asimddp+asimdhp");
    // A Pi 4's Cortex-A72 lacks the dot product: the same inventory without it takes the baseline.
    let pi4 = alki_shared::proto::Inventory { cpu_features: vec!["asimd".into()], ..pi5.clone() };
    assert_eq!(chosen(&pi4), "linux/arm64");
    let jetson = collect_at(&root("jetson-orin-nano"), data.path(), &BTreeMap::new());
    assert_eq!(chosen(&jetson), "linux/arm64/cuda", "a Jetson runs the CUDA build");
    let workstation = collect_at(&root("x86-nvidia"), data.path(), &BTreeMap::new());
    assert_eq!(chosen(&workstation), "linux/amd64/cuda+avx2");
    let no_gpu = alki_shared::proto::Inventory { gpus: Vec::new(), ..workstation.clone() };
    assert_eq!(chosen(&no_gpu), "linux/amd64+avx2+fma");
    // A Jetson given a build without CUDA takes the tuned CPU entry its Cortex-A78AE runs.
    let cpu_only = ImageIndex { manifests: index.manifests[..2].to_vec(), ..index.clone() };
    let platform = DevicePlatform::of_inventory(&jetson);
    assert_eq!(choose_platform(&cpu_only, &platform).map(entry_label), Ok("linux/arm64+asimddp+asimdhp".to_owned()));
}
