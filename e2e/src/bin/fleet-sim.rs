//! fleet-sim: runs N simulated agents in one process against a real controller, and optionally benches a
//! rollout over them: time from each step's decision to the last device receiving its desired state,
//! controller CPU and RSS while every session idles, and the time a full rollout takes.
//!
//! ```text
//! fleet-sim --controller http://127.0.0.1:7070 --admin-token-file DATA/admin.token --devices 5000 \
//!     --bench --bundle acme/tiny:v2 --steps 10,25,50,100 --controller-pid PID --idle-secs 30
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alki_e2e::sim::{self, Behaviour, SimConfig, SimFleet};
use alki_shared::proto::{self, fleet_service_client::FleetServiceClient};
use anyhow::{Context as _, bail};
use clap::Parser;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "Simulated Alki agents over real gRPC, and a rollout bench.")]
struct Args {
    /// The controller's gRPC address (https:// with --ca-file).
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    controller: String,
    /// The controller's CA certificate (PEM), when it serves TLS (e.g. <data-dir>/pki/ca.crt).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// The controller's admin token file (used to create the agents' token and, with --bench, the rollout).
    #[arg(long)]
    admin_token_file: PathBuf,
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Hardware classes, assigned round-robin.
    #[arg(long, value_delimiter = ',', default_value = "pi5-8g,orin-nano,x86-avx2")]
    classes: Vec<String>,
    /// Percent of devices whose candidate activation fails.
    #[arg(long, default_value_t = 0)]
    fail_percent: usize,
    /// Percent of devices that say Hello once and go offline.
    #[arg(long, default_value_t = 0)]
    offline_percent: usize,
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// How long a simulated activation takes.
    #[arg(long, default_value_t = 50)]
    activation_ms: u64,
    #[arg(long, default_value_t = 100)]
    sessions_per_connection: usize,
    /// Bench a rollout once every device is connected, then exit.
    #[arg(long)]
    bench: bool,
    /// The candidate, REPOSITORY:TAG (with --bench).
    #[arg(long, default_value = "acme/tiny:v2")]
    bundle: String,
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100")]
    steps: Vec<u32>,
    /// The controller's process id, to measure its CPU and RSS while sessions idle.
    #[arg(long)]
    controller_pid: Option<u32>,
    /// How long to measure the idle fleet (with --bench).
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Send serving telemetry every this many seconds (0: none).
    #[arg(long, default_value_t = 0)]
    telemetry_secs: u64,
    /// Hardware class on which the candidate is slower ("worse tokens/s in B").
    #[arg(long)]
    slow_class: Option<String>,
    /// The slow class's candidate speed relative to its baseline (e.g. 0.7: 30% slower).
    #[arg(long, default_value_t = 0.7)]
    slow_factor: f64,
    /// The controller's data directory: with --bench, the store's growth over the idle window is reported.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// With --bench, gate the rollout on tokens/s (B >= this ratio × A per class), e.g. 0.9.
    #[arg(long)]
    min_tokens_per_second_ratio: Option<f64>,
    /// REPOSITORY:TAG in the embedded registry every device serves at the start (its baseline A).
    #[arg(long)]
    baseline: Option<String>,
    /// Receive the controller's events on a webhook served here (127.0.0.1:0) from the start, and report
    /// the delivery latency (event committed -> receiver) over everything the fleet and the bench produce.
    #[arg(long)]
    webhook: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin = std::fs::read_to_string(&args.admin_token_file)
        .with_context(|| format!("reading the admin token {}", args.admin_token_file.display()))?
        .trim()
        .to_owned();
    let ca = match &args.ca_file {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    let channel = sim::endpoint(&args.controller, ca.as_deref())?.connect().await.context("connecting")?;
    let mut fleet = FleetServiceClient::new(channel);
    let token = fleet
        .create_token(authed(
            &admin,
            proto::CreateTokenRequest {
                name: "fleet-sim".into(),
                role: proto::Role::Agent as i32,
                ..Default::default()
            },
        )?)
        .await
        .context("creating the agents' token")?
        .into_inner()
        .token;
    let classes: Vec<&str> = args.classes.iter().map(String::as_str).collect();
    let (fail, offline) = (args.fail_percent, args.offline_percent);
    let baseline = match &args.baseline {
        Some(reference) => Some(resolve(&mut fleet, &admin, reference).await?),
        None => None,
    };
    let mut devices = sim::devices(args.devices, &classes, baseline, |i, _| {
        let slot = i % 100;
        if slot < offline {
            Behaviour::Offline
        } else if slot < offline + fail {
            Behaviour::FailActivation
        } else {
            Behaviour::Success
        }
    });
    for d in devices.iter_mut().filter(|d| Some(&d.class) == args.slow_class.as_ref()) {
        d.b_speed = args.slow_factor;
    }
    let receiver = match args.webhook {
        true => Some(webhook_receiver::start(&args.controller, &admin).await?),
        false => None,
    };
    let (_address, controller) = tokio::sync::watch::channel(args.controller.clone());
    let config = SimConfig {
        controller,
        token,
        heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
        activation: Duration::from_millis(args.activation_ms),
        sessions_per_connection: args.sessions_per_connection,
        telemetry: (args.telemetry_secs > 0).then(|| Duration::from_secs(args.telemetry_secs)),
        ca_pem: ca.clone(),
    };
    let started = Instant::now();
    let sims = SimFleet::start(config, devices);
    let online = args.devices - args.devices * offline / 100;
    loop {
        let connected = sims.snapshot().values().filter(|v| v.connected).count();
        if connected >= online {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("only {connected} of {online} simulated agents connected within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("connected {online} agents in {:.2} s", started.elapsed().as_secs_f64());
    if !args.bench {
        tokio::signal::ctrl_c().await?;
        sims.stop().await;
        return Ok(());
    }

    if let Some(pid) = args.controller_pid {
        // The store grows while every device's first measurements are written; growth is measured after
        // the first third of the window, at steady state.
        let warm_up = Duration::from_secs(args.idle_secs / 3);
        let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
        tokio::time::sleep(warm_up).await;
        let (size0, t_size) = (args.data_dir.as_deref().map(dir_bytes).transpose()?, Instant::now());
        tokio::time::sleep(Duration::from_secs(args.idle_secs).saturating_sub(warm_up)).await;
        let cpu = (cpu_ticks(pid)? - cpu0) as f64 / 100.0;
        let wall = t0.elapsed().as_secs_f64();
        if let (Some(size0), Some(dir)) = (size0, args.data_dir.as_deref()) {
            let grown = dir_bytes(dir)? as f64 - size0 as f64;
            let wall = t_size.elapsed().as_secs_f64();
            println!(
                "store: {} MiB now, grew {:.1} MiB over {wall:.0} s with telemetry every {} s => {:.1} MiB/day extrapolated",
                dir_bytes(dir)? >> 20,
                grown / (1 << 20) as f64,
                args.telemetry_secs,
                grown / wall * 86_400.0 / (1 << 20) as f64
            );
        }
        println!(
            "idle: controller CPU {:.1}% of one core over {wall:.0} s with {online} sessions heartbeating every {} s; RSS {} MiB",
            100.0 * cpu / wall,
            args.heartbeat_secs,
            rss_kib(pid)? / 1024
        );
    }

    let (repository, tag) = args.bundle.rsplit_once(':').context("--bundle REPOSITORY:TAG")?;
    let spec = proto::RolloutSpec {
        repository: repository.into(),
        candidate: tag.into(),
        selector: [("site".to_owned(), "sim".to_owned())].into(),
        steps: args.steps.iter().map(|&percent| proto::RolloutStep { percent, min_soak_seconds: 0 }).collect(),
        on_inconclusive: proto::InconclusivePolicy::Advance as i32,
        on_class_failure: proto::ClassFailurePolicy::HaltClass as i32,
        gates: Some(proto::RolloutGates {
            min_devices: 3,
            min_tokens_per_second_ratio: args.min_tokens_per_second_ratio,
            ..Default::default()
        }),
        ..Default::default()
    };
    let t0 = Instant::now();
    let rollout = fleet
        .create_rollout(authed(
            &admin,
            proto::CreateRolloutRequest {
                spec: Some(spec),
                // Simulated agents pull nothing; the bench measures the rollout engine, not signing.
                override_signature_check: true,
                override_reason: "fleet-sim bench: simulated agents pull nothing".into(),
            },
        )?)
        .await
        .context("creating the rollout")?
        .into_inner();
    let done = loop {
        let r =
            fleet.get_rollout(authed(&admin, proto::GetRolloutRequest { id: rollout.id.clone() })?).await?.into_inner();
        if !matches!(
            proto::RolloutState::try_from(r.state).unwrap_or_default(),
            proto::RolloutState::Pending | proto::RolloutState::Progressing
        ) {
            break r;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("rollout {} did not finish within 600 s: {}", r.id, r.message);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let total = t0.elapsed();
    let events = fleet
        .list_rollout_events(authed(&admin, proto::ListRolloutEventsRequest { id: rollout.id.clone(), after_seq: 0 })?)
        .await?
        .into_inner()
        .events;
    let decisions: Vec<i64> =
        events.iter().filter(|e| e.kind == "started" || e.kind == "advanced").map(|e| e.unix_ms).collect();
    // Each device's latency: from the newest step decision before its desired state to its arrival.
    let mut by_decision: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for v in sims.snapshot().values().filter(|v| v.desired_at_unix_ms > 0) {
        if let Some(&decided) = decisions.iter().rev().find(|&&d| d <= v.desired_at_unix_ms) {
            by_decision.entry(decided).or_default().push(v.desired_at_unix_ms - decided);
        }
    }
    let mut latencies: Vec<i64> = by_decision.values().flatten().copied().collect();
    latencies.sort_unstable();
    let pct = |p: f64| percentile(&latencies, p);
    println!(
        "rollout {} {} in {:.2} s ({} steps, zero soak): {}",
        done.id,
        proto::RolloutState::try_from(done.state).unwrap_or_default().label(),
        total.as_secs_f64(),
        args.steps.len(),
        done.message
    );
    println!(
        "step decision -> desired state received, over {} devices: p50 {:?} ms, p99 {:?} ms, max {:?} ms",
        latencies.len(),
        pct(0.5).unwrap_or(0),
        pct(0.99).unwrap_or(0),
        latencies.last().copied().unwrap_or(0)
    );
    for (i, (decided, mut step)) in by_decision.into_iter().enumerate() {
        step.sort_unstable();
        println!(
            "  decision {} (+{} ms): {} devices, p50 {} ms, p99 {} ms, max {} ms",
            i + 1,
            decided - decisions.first().copied().unwrap_or(decided),
            step.len(),
            percentile(&step, 0.5).unwrap_or(0),
            percentile(&step, 0.99).unwrap_or(0),
            step.last().copied().unwrap_or(0)
        );
    }
    if let Some(pid) = args.controller_pid {
        println!("controller RSS after the rollout: {} MiB", rss_kib(pid)? / 1024);
    }
    compare_bench(&args, &admin, &done).await?;
    sims.stop().await;
    if let Some(receiver) = receiver {
        receiver.report(&args.controller, &admin).await?;
    }
    Ok(())
}

/// Times the InsightService's A/B comparison of the finished rollout (every device measured on A and B).
async fn compare_bench(args: &Args, admin: &str, rollout: &proto::Rollout) -> anyhow::Result<()> {
    let ca = match &args.ca_file {
        Some(path) => Some(std::fs::read(path)?),
        None => None,
    };
    let channel = sim::endpoint(&args.controller, ca.as_deref())?.connect().await.context("connecting")?;
    let mut insight = proto::insight_service_client::InsightServiceClient::new(channel);
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..20 {
        let t = Instant::now();
        let c = insight.compare(authed(admin, proto::CompareRequest { rollout_id: rollout.id.clone() })?).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        last = Some(c.into_inner());
    }
    times.sort_by(f64::total_cmp);
    let c = last.unwrap_or_default();
    let b: u32 = c.classes.iter().map(|k| k.b_samples).sum();
    let paired: u32 = c.classes.iter().map(|k| k.paired).sum();
    println!(
        "A/B comparison over {} devices ({b} measured on B, {paired} paired, {} classes): median {:.1} ms, max {:.1} ms over {} calls",
        args.devices,
        c.classes.len(),
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
    for k in &c.classes {
        let ratio = k.generation_tokens_per_second.as_ref().map(|m| m.gate_ratio).unwrap_or(0.0);
        println!("  {}: tokens/s B/A {ratio:.2} (A {} / B {} devices)", k.class, k.a_samples, k.b_samples);
    }
    Ok(())
}

/// Pins REPOSITORY:TAG of the embedded registry to its digest.
async fn resolve(
    fleet: &mut FleetServiceClient<Channel>,
    admin: &str,
    reference: &str,
) -> anyhow::Result<proto::BundleRef> {
    let (repository, tag) = reference.rsplit_once(':').context("--baseline REPOSITORY:TAG")?;
    let bundles = fleet
        .list_bundles(authed(admin, proto::ListBundlesRequest { repository: repository.into() })?)
        .await?
        .into_inner()
        .bundles;
    let bundle = bundles.into_iter().find(|b| b.tags.iter().any(|t| t == tag)).with_context(|| {
        format!("--baseline {reference}: no such bundle in the controller's registry; push it first")
    })?;
    Ok(proto::BundleRef {
        registry: String::new(),
        repository: repository.into(),
        digest: bundle.digest,
        tag: tag.into(),
    })
}

/// Bytes of the files under a directory.
fn dir_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_bytes(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

fn authed<T>(token: &str, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).context("malformed stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).context("malformed stat");
    // After the command name: state is field 0, utime 11, stime 12.
    Ok(field(11)? + field(12)?)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// The value at quantile `p` of sorted `values` (nearest rank).
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    sorted.get(((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied()
}

/// A webhook receiver for the bench: verifies each delivery's signature, and keeps each event's latency from
/// its commit (`data.unix_ms`) to its arrival.
mod webhook_receiver {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use alki_shared::proto::{self, event_service_client::EventServiceClient};
    use alki_shared::webhook;
    use anyhow::Context as _;
    use tonic::transport::Channel;

    pub struct Receiver {
        state: Arc<State>,
        webhook_id: String,
    }

    #[derive(Default)]
    struct State {
        key: Vec<u8>,
        latencies_ms: Mutex<Vec<i64>>,
        bad: Mutex<u64>,
    }

    fn now_ms() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }

    async fn take(
        axum::extract::State(s): axum::extract::State<Arc<State>>,
        headers: axum::http::HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::http::StatusCode {
        let arrived = now_ms();
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let (id, ts, sig) = (h(webhook::ID_HEADER), h(webhook::TIMESTAMP_HEADER), h(webhook::SIGNATURE_HEADER));
        if webhook::verify(&s.key, &id, &ts, &sig, &body, arrived / 1000).is_err() {
            *s.bad.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            return axum::http::StatusCode::UNAUTHORIZED;
        }
        let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if let Some(at) = event["data"]["unix_ms"].as_i64() {
            s.latencies_ms.lock().unwrap_or_else(|p| p.into_inner()).push(arrived - at);
        }
        axum::http::StatusCode::NO_CONTENT
    }

    async fn client(controller: &str) -> anyhow::Result<EventServiceClient<Channel>> {
        let channel = Channel::from_shared(controller.to_owned())?.connect().await.context("connecting")?;
        Ok(EventServiceClient::new(channel))
    }

    pub async fn start(controller: &str, admin: &str) -> anyhow::Result<Receiver> {
        let key: Vec<u8> = (0u8..32).collect();
        let state = Arc::new(State { key: key.clone(), ..Default::default() });
        let app = axum::Router::new().route("/hook", axum::routing::post(take)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let request = proto::AddWebhookRequest {
            url,
            secret: webhook::secret_from_key(&key),
            insecure_http: true,
            ..Default::default()
        };
        let added = client(controller).await?.add_webhook(super::authed(admin, request)?).await?.into_inner();
        let webhook_id = added.webhook.map(|w| w.id).unwrap_or_default();
        Ok(Receiver { state, webhook_id })
    }

    impl Receiver {
        /// Waits for the webhook to catch up, then prints the latencies.
        pub async fn report(self, controller: &str, admin: &str) -> anyhow::Result<()> {
            let mut events = client(controller).await?;
            for _ in 0..600 {
                let hooks = events.list_webhooks(super::authed(admin, proto::ListWebhooksRequest {})?).await?;
                if hooks.into_inner().webhooks.iter().any(|w| w.id == self.webhook_id && w.pending == 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut latencies = self.state.latencies_ms.lock().unwrap_or_else(|p| p.into_inner()).clone();
            latencies.sort_unstable();
            let bad = *self.state.bad.lock().unwrap_or_else(|p| p.into_inner());
            println!(
                "webhook: {} events delivered (signatures refused: {bad}); event -> receiver p50 {} ms, p99 {} ms, max {} ms",
                latencies.len(),
                super::percentile(&latencies, 0.5).unwrap_or(0),
                super::percentile(&latencies, 0.99).unwrap_or(0),
                latencies.last().copied().unwrap_or(0)
            );
            Ok(())
        }
    }
}
