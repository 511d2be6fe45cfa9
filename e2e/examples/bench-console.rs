//! Bench of the web console (run by `e2e/scripts/bench-console.sh`), in three parts:
//! - `seed DATA_DIR N`: N finished rollouts in a controller's store, as a fleet's history;
//! - `load URL TOKEN_FILE RUNS`: a real headless Chromium logs in and loads the fleet and rollout pages RUNS times
//!   each; prints the time from navigation to the first rendered data (`window.alkiFirstRender`);
//! - `consoles URL TOKEN_FILE PID N`: N consoles open on the active rollout's page (tabs of one browser) while a
//!   rollout runs; prints the controller's CPU (process PID) from the rollout's start to its end.

use std::time::{Duration, Instant};

use alki_e2e::browser::Browser;
use alki_shared::proto;
use anyhow::Context as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().context("usage: bench-console seed|load|consoles ... (see the source)");
    match arg(0)?.as_str() {
        "seed" => seed(&arg(1)?, arg(2)?.parse()?),
        "load" => load(&arg(1)?, &token(&arg(2)?)?, arg(3)?.parse()?).await,
        "consoles" => consoles(&arg(1)?, &token(&arg(2)?)?, arg(3)?.parse()?, arg(4)?.parse()?).await,
        other => anyhow::bail!("unknown part {other:?}: seed, load or consoles"),
    }
}

fn token(path: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?.trim().to_owned())
}

/// Finished rollouts with a class status each, as the store keeps them.
fn seed(data_dir: &str, n: usize) -> anyhow::Result<()> {
    let store = alki_controller::store::Store::open(std::path::Path::new(data_dir))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    for i in 0..n {
        let at = now - (n - i) as i64 * 3_600_000;
        let rollout = proto::Rollout {
            id: format!("ro-history-{i:03}"),
            state: proto::RolloutState::Completed as i32,
            current_step: 3,
            spec: Some(proto::RolloutSpec {
                repository: "acme/tiny".into(),
                candidate: format!("v1.{i}"),
                steps: [10, 25, 50, 100].map(|percent| proto::RolloutStep { percent, min_soak_seconds: 600 }).to_vec(),
                ..Default::default()
            }),
            counts: Some(proto::RolloutCounts { selected: 5000, candidate: 5000, active: 5000, ..Default::default() }),
            classes: ["pi5-8g", "orin-nano", "x86-avx2"]
                .map(|class| proto::ClassStatus {
                    class: class.into(),
                    tokens_per_second_ratio: 1.02,
                    ..Default::default()
                })
                .to_vec(),
            created_unix_ms: at,
            updated_unix_ms: at + 1_800_000,
            message: "completed".into(),
            ..Default::default()
        };
        store.put_rollout(&alki_controller::store::Keyed::new(rollout)?)?;
    }
    println!("seeded {n} finished rollouts");
    Ok(())
}

async fn login(browser: &Browser, url: &str, token: &str) -> anyhow::Result<()> {
    browser.client.goto(&format!("{url}/ui/")).await?;
    browser.wait_for("#token").await?.send_keys(token).await?;
    browser.wait_for("#login-form button[type=submit]").await?.click().await?;
    browser.wait_for("#whoami").await?;
    Ok(())
}

async fn load(url: &str, token: &str, runs: usize) -> anyhow::Result<()> {
    let screenshots = std::env::temp_dir().join("alki-console-bench");
    let browser = Browser::start(&screenshots, 1280, 900).await?;
    login(&browser, url, token).await?;
    for page in ["#/devices", "#/rollouts"] {
        let mut times = Vec::new();
        for _ in 0..runs {
            browser.client.goto("about:blank").await?;
            browser.client.goto(&format!("{url}/ui/{page}")).await?;
            browser.wait_for("main#main[data-ready=\"true\"]").await?;
            let t = browser.client.execute("return window.alkiFirstRender || null;", vec![]).await?;
            times.push(t.as_f64().context("the console set no window.alkiFirstRender")?);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "first render of {page}: median {:.0} ms, max {:.0} ms over {runs} loads",
            times[times.len() / 2],
            times.last().copied().unwrap_or(0.0)
        );
    }
    browser.close().await
}

/// The controller's CPU time so far, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Ok(ticks(11) + ticks(12))
}

async fn rollouts(url: &str, token: &str) -> anyhow::Result<Vec<proto::Rollout>> {
    let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build()?;
    let list: proto::ListRolloutsResponse =
        client.get(format!("{url}/api/v1/rollouts")).bearer_auth(token).send().await?.json().await?;
    Ok(list.rollouts)
}

fn active(r: &proto::Rollout) -> bool {
    r.state == proto::RolloutState::Progressing as i32 || r.state == proto::RolloutState::Pending as i32
}

async fn consoles(url: &str, token: &str, pid: u32, n: usize) -> anyhow::Result<()> {
    let screenshots = std::env::temp_dir().join("alki-console-bench");
    let browser = if n > 0 { Some(Browser::start(&screenshots, 1280, 900).await?) } else { None };
    if let Some(b) = &browser {
        login(b, url, token).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let rollout = loop {
        if let Some(r) = rollouts(url, token).await?.into_iter().find(active) {
            break r;
        }
        anyhow::ensure!(Instant::now() < deadline, "no rollout started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (ticks0, t0) = (cpu_ticks(pid)?, Instant::now());
    if let Some(b) = &browser {
        // One console per tab, half on the rollout's page and half on the fleet page, all following events.
        for i in 0..n {
            if i > 0 {
                let tab = b.client.new_window(true).await?;
                b.client.switch_to_window(tab.handle).await?;
            }
            let page = if i % 2 == 0 { format!("#/rollouts/{}", rollout.id) } else { "#/devices".into() };
            b.client.goto(&format!("{url}/ui/{page}")).await?;
        }
    }
    loop {
        let now = rollouts(url, token).await?;
        if now.iter().find(|r| r.id == rollout.id).is_none_or(|r| !active(r)) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the rollout did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = (cpu_ticks(pid)? - ticks0) as f64 / 100.0;
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "controller CPU during the rollout with {n} consoles open: {:.1}% of one core ({cpu:.1} s over {wall:.1} s)",
        100.0 * cpu / wall
    );
    if let Some(b) = browser {
        b.close().await?;
    }
    Ok(())
}
