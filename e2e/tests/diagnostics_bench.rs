//! Log streaming throughput through the controller with TLS on (real controller and agent binaries, the
//! agent enrolled with mTLS) and the agent's CPU while it streams. Ignored by default (a benchmark, not a
//! test); run it with:
//! `cargo test --release -p alki-e2e --test diagnostics_bench -- --ignored --nocapture`
//! (`ALKI_BENCH_LOG_MIB`, default 256: the size of the llama-server log read; `ALKI_BENCH_RATE_KIB`, default
//! the highest the agent accepts: its `diagnostics.max_kib_per_second`, e.g. 1024 for the shipped pacing).

use std::io::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use alki_e2e::harness::{self, binary, wait_for};
use anyhow::Context as _;

const DEVICE: &str = "pi-bench";

/// CPU seconds (user + system) `pid` has used, from /proc (clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// A llama-server-like log of `mib` MiB: request lines with varying numbers (compresses like a real one).
fn write_log(path: &std::path::Path, mib: u64) -> anyhow::Result<u64> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let (mut written, mut x) = (0u64, 0x2545_f491_4f6c_dd1du64);
    while written < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let line = format!(
            "slot update_slots: id {} | task {} | prompt processing progress, n_past = {}, n_tokens = {}, progress = 0.{:06}\n\
             srv  log_server_r: request: POST /v1/chat/completions 127.0.0.1 200 t_prompt={}.{:03}ms t_gen={}.{:03}ms\n",
            x % 4,
            x % 100_000,
            x % 4096,
            x % 512,
            x % 1_000_000,
            x % 900,
            x % 1000,
            (x >> 8) % 9000,
            (x >> 16) % 1000
        );
        out.write_all(line.as_bytes())?;
        written += line.len() as u64;
    }
    out.flush()?;
    Ok(written)
}

#[test]
#[ignore = "a benchmark: prints log streaming MiB/s and the agent's CPU"]
fn log_streaming_throughput_through_the_controller_over_tls() -> anyhow::Result<()> {
    let mib: u64 = std::env::var("ALKI_BENCH_LOG_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let dir = tempfile::tempdir()?;
    let controller = harness::start_controller(dir.path(), &[])?;
    let trust = dir.path().join("trust.toml");
    std::fs::write(&trust, "[[repository]]\npattern = \"*\"\nrequired = false\n")?;
    let fake = binary("fake-llama-server")?;
    // By default the device's pacing and cap as high as they go, to measure the path rather than the pacing.
    let rate: u64 = std::env::var("ALKI_BENCH_RATE_KIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 20);
    let extra = format!("\n[diagnostics]\nmax_kib_per_second = {rate}\nmax_mib_per_request = 4096\n");
    let (mut agent, _) = controller.start_agent(dir.path(), DEVICE, "lab", &fake, &trust, &extra)?;
    wait_for("the device to connect", Duration::from_secs(60), &[&agent, &controller.proc], || {
        let devices = controller.alkictl_json(&["devices", "list"])?;
        Ok(devices
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["id"] == DEVICE && d["connected"] == true))
            .map(|_| ()))
    })?;
    let logs = harness::agent_dir(dir.path(), DEVICE).join("data").join("logs");
    std::fs::create_dir_all(&logs)?;
    let size = write_log(&logs.join("llama-server-5.log"), mib)?;

    let out = dir.path().join("read.log");
    let (agent_pid, controller_pid) = (agent.child.id(), controller.proc.child.id());
    let (agent_cpu, controller_cpu) = (cpu_seconds(agent_pid)?, cpu_seconds(controller_pid)?);
    let started = Instant::now();
    let status = controller
        .alkictl()?
        .args(["devices", "logs", DEVICE, "--source", "runtime", "--max-bytes", &size.to_string()])
        .stdout(Stdio::from(std::fs::File::create(&out)?))
        .status()?;
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "alkictl devices logs failed");
    let agent_cpu = cpu_seconds(agent_pid)? - agent_cpu;
    let controller_cpu = cpu_seconds(controller_pid)? - controller_cpu;
    let received = std::fs::metadata(&out)?.len();
    anyhow::ensure!(received >= size, "received {received} of {size} bytes");
    let mibs = received as f64 / f64::from(1 << 20) / elapsed;
    println!(
        "log streaming over TLS: {:.1} MiB in {elapsed:.2} s = {mibs:.1} MiB/s; agent CPU {:.2} s ({:.0}% of one core), \
         controller CPU {:.2} s ({:.0}%)",
        received as f64 / f64::from(1 << 20),
        agent_cpu,
        100.0 * agent_cpu / elapsed,
        controller_cpu,
        100.0 * controller_cpu / elapsed,
    );
    let _ = agent.stop(Duration::from_secs(10));
    Ok(())
}
