//! The fleet simulator: many scripted agents in one process, each a real AgentService session over gRPC
//! to a real controller, with a hardware class and a behaviour (success, slow, failing activation, offline).
//!
//! A simulated agent reports like a real one: Hello with what it serves (and what it has pre-staged), a
//! Heartbeat every interval, and for each desired state PULLING then ACTIVE (serving the desired bundle) or
//! FAILED with an ActivationError (serving its last good bundle); a desired state that says `serve_nothing`
//! stops serving (IDLE, serving nothing). A Prestage command is answered with a ready PrestageReport and the
//! bundle is remembered as staged. It reconnects with backoff when the session ends, so a controller
//! restart is survived the way a device would survive it.
//!
//! Performance: each device has a generation speed on its baseline and a factor for the candidate
//! (`b_speed`, e.g. 0.7 for "30% slower in B"). Like a real agent it reports an activation benchmark of
//! what it serves when its session starts and after every activation, and, with `SimConfig::telemetry`
//! set, serving telemetry at that interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alki_shared::proto::{
    self, AgentMessage, Phase, agent_message, agent_service_client::AgentServiceClient, controller_message::Msg,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How a simulated device answers a desired state that moves it to the candidate cohort ("B").
/// Desired states back to the baseline ("A") always succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// PULLING, then ACTIVE after the fleet's activation delay.
    Success,
    /// Like success, but taking this long.
    Slow(Duration),
    /// PULLING, then FAILED with START_FAILED, still serving the previous bundle.
    FailActivation,
    /// Says Hello once, then disconnects and never comes back.
    Offline,
}

/// One simulated device.
#[derive(Clone, Debug)]
pub struct SimDevice {
    pub id: String,
    pub class: String,
    pub labels: HashMap<String, String>,
    pub behaviour: Behaviour,
    /// What it serves when the simulation starts (its baseline A).
    pub running: Option<proto::BundleRef>,
    /// Generation tokens/s on its baseline, and the factor the candidate ("B") multiplies it by.
    pub tokens_per_second: f64,
    pub b_speed: f64,
}

/// What a simulated device has seen and done, for tests and the bench to read.
#[derive(Clone, Debug, Default)]
pub struct DeviceView {
    pub running: Option<proto::BundleRef>,
    pub applied_generation: u64,
    pub desired_generation: u64,
    pub cohort: String,
    pub phase: i32,
    /// When the newest desired state arrived.
    pub desired_at: Option<Instant>,
    /// The same, as unix ms (to compare with the controller's event times on one machine).
    pub desired_at_unix_ms: i64,
    pub connected: bool,
    /// Why the newest session ended, if it failed.
    pub last_error: Option<String>,
    /// Bundles pre-staged on a Prestage command (reported in every Hello).
    pub staged: Vec<proto::BundleRef>,
    /// Prestage commands received, and when the first one arrived.
    pub prestage_commands: u32,
    pub first_prestage_at_unix_ms: i64,
    /// The newest desired state said to serve nothing.
    pub serving_nothing: bool,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The controller's gRPC address, e.g. http://127.0.0.1:7070. Changing it makes agents reconnect there.
    pub controller: watch::Receiver<String>,
    /// A token with role agent.
    pub token: String,
    pub heartbeat: Duration,
    /// How long a successful activation takes.
    pub activation: Duration,
    /// Sessions per gRPC connection (HTTP/2 streams share a connection, as they would behind a proxy).
    pub sessions_per_connection: usize,
    /// Serving telemetry interval; None: no telemetry (benchmarks are still reported).
    pub telemetry: Option<Duration>,
    /// The controller's CA (PEM) when it serves TLS (an https:// address); None: plaintext.
    pub ca_pem: Option<Vec<u8>>,
}

/// A gRPC endpoint for the controller at `address`, over TLS trusting `ca_pem` when given.
pub fn endpoint(address: &str, ca_pem: Option<&[u8]>) -> anyhow::Result<Endpoint> {
    let endpoint = Channel::from_shared(address.to_owned())?;
    Ok(match ca_pem {
        Some(pem) => endpoint.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?,
        None => endpoint,
    })
}

/// A running simulated fleet. Dropping it (or calling `stop`) ends every agent.
pub struct SimFleet {
    pub views: Arc<Mutex<HashMap<String, DeviceView>>>,
    devices: Vec<SimDevice>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SimFleet {
    /// Starts one task per device.
    pub fn start(config: SimConfig, devices: Vec<SimDevice>) -> SimFleet {
        let views: Arc<Mutex<HashMap<String, DeviceView>>> = Arc::new(Mutex::new(
            devices
                .iter()
                .map(|d| (d.id.clone(), DeviceView { running: d.running.clone(), ..Default::default() }))
                .collect(),
        ));
        SimFleet::start_with(config, devices, views)
    }

    /// Ends every session, keeping what each device remembers (what it serves, the generation it applied),
    /// so the same devices can start again later, as devices do when their controller went away.
    pub async fn disconnect(self) -> Disconnected {
        let (views, devices) = (self.views.clone(), self.devices.clone());
        self.stop().await;
        for v in lock(&views).values_mut() {
            v.connected = false;
        }
        Disconnected { views, devices }
    }

    fn start_with(
        config: SimConfig,
        devices: Vec<SimDevice>,
        views: Arc<Mutex<HashMap<String, DeviceView>>>,
    ) -> SimFleet {
        let all = devices.clone();
        let (stop, stopped) = watch::channel(false);
        let per = config.sessions_per_connection.max(1);
        let channels: Arc<Mutex<HashMap<(usize, String), Channel>>> = Arc::default();
        let tasks = devices
            .into_iter()
            .enumerate()
            .map(|(i, device)| {
                let agent = Agent {
                    device,
                    config: config.clone(),
                    views: views.clone(),
                    channels: channels.clone(),
                    slot: i / per,
                };
                tokio::spawn(agent.run(stopped.clone()))
            })
            .collect();
        SimFleet { views, devices: all, stop, tasks }
    }

    /// A copy of one device's view.
    pub fn view(&self, id: &str) -> Option<DeviceView> {
        lock(&self.views).get(id).cloned()
    }

    /// A copy of every device's view.
    pub fn snapshot(&self) -> HashMap<String, DeviceView> {
        lock(&self.views).clone()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// A simulated fleet whose sessions ended; `start` brings the same devices back.
pub struct Disconnected {
    views: Arc<Mutex<HashMap<String, DeviceView>>>,
    devices: Vec<SimDevice>,
}

impl Disconnected {
    pub fn start(self, config: SimConfig) -> SimFleet {
        SimFleet::start_with(config, self.devices, self.views)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Views are plain data; a panicking agent task cannot leave one half-written in a way that matters.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Agent {
    device: SimDevice,
    config: SimConfig,
    views: Arc<Mutex<HashMap<String, DeviceView>>>,
    channels: Arc<Mutex<HashMap<(usize, String), Channel>>>,
    slot: usize,
}

impl Agent {
    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = tokio::select! {
                r = self.session() => r,
                _ = stopped.changed() => return,
            };
            self.update(|v| v.connected = false);
            if let Err(error) = &result {
                let error = format!("{error:#}");
                self.update(|v| v.last_error = Some(error));
            }
            if self.device.behaviour == Behaviour::Offline && result.is_ok() {
                // Said Hello once; stays away.
                let _ = stopped.changed().await;
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn update(&self, f: impl FnOnce(&mut DeviceView)) {
        if let Some(v) = lock(&self.views).get_mut(&self.device.id) {
            f(v);
        }
    }

    fn channel(&self) -> anyhow::Result<Channel> {
        let address = self.config.controller.borrow().clone();
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(&(self.slot, address.clone())) {
            return Ok(c.clone());
        }
        let channel =
            endpoint(&address, self.config.ca_pem.as_deref())?.connect_timeout(Duration::from_secs(5)).connect_lazy();
        channels.insert((self.slot, address), channel.clone());
        Ok(channel)
    }

    /// One session: Hello, then heartbeats and answers to desired states until the stream ends.
    async fn session(&self) -> anyhow::Result<()> {
        let mut client = AgentServiceClient::new(self.channel()?);
        let (tx, rx) = mpsc::channel::<AgentMessage>(16);
        let (running, applied, staged) = {
            let views = lock(&self.views);
            let v = views.get(&self.device.id).cloned().unwrap_or_default();
            (v.running, v.applied_generation, v.staged)
        };
        let mut labels = self.device.labels.clone();
        labels.insert("class".into(), self.device.class.clone());
        let hello = proto::Hello {
            device_id: self.device.id.clone(),
            agent_version: "fleet-sim".into(),
            inventory: Some(proto::Inventory {
                hostname: self.device.id.clone(),
                hardware_class: self.device.class.clone(),
                ..Default::default()
            }),
            labels,
            running: running.clone(),
            last_applied_generation: applied,
            staged,
        };
        tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await?;
        if let Some(running) = &running {
            tx.send(self.benchmark(running, "")).await?;
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert("authorization", format!("Bearer {}", self.config.token).parse()?);
        let mut inbound = client.session(request).await?.into_inner();
        self.update(|v| v.connected = true);
        if self.device.behaviour == Behaviour::Offline {
            // Wait for the Welcome so the controller has recorded the device, then go away.
            let _ = inbound.message().await;
            return Ok(());
        }
        let mut heartbeat = tokio::time::interval(self.config.heartbeat);
        heartbeat.tick().await;
        // Without telemetry the timer still exists but never fires within a session's life.
        let telemetry_every = self.config.telemetry.unwrap_or(Duration::from_secs(365 * 24 * 3600));
        // Spread devices over the interval, as real agents started at different times would be.
        let offset = telemetry_every.mul_f64(device_fraction(&self.device.id));
        let mut telemetry = tokio::time::interval_at(tokio::time::Instant::now() + offset, telemetry_every);
        let mut counters = (0u64, 0u64);
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let Some(message) = message? else { return Ok(()) };
                    match message.msg {
                        Some(Msg::DesiredState(desired)) => self.activate(&tx, desired).await?,
                        Some(Msg::Command(command)) => self.command(&tx, command).await?,
                        _ => {}
                    }
                }
                _ = heartbeat.tick() => {
                    let beat = proto::Heartbeat { sent_unix_ms: 0 };
                    tx.send(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(beat)) }).await?;
                }
                _ = telemetry.tick(), if self.config.telemetry.is_some() => {
                    let report = self.telemetry(telemetry_every, &mut counters);
                    tx.send(AgentMessage { msg: Some(agent_message::Msg::Telemetry(report)) }).await?;
                }
            }
        }
    }

    /// Answers a Prestage command at once with a ready report (the bundle counts as staged from now on);
    /// other commands are not simulated.
    async fn command(&self, tx: &mpsc::Sender<AgentMessage>, command: proto::Command) -> anyhow::Result<()> {
        let Some(proto::command::Kind::Prestage(prestage)) = command.kind else { return Ok(()) };
        let Some(bundle) = prestage.bundle else { return Ok(()) };
        self.update(|v| {
            v.prestage_commands += 1;
            if v.first_prestage_at_unix_ms == 0 {
                v.first_prestage_at_unix_ms = unix_ms();
            }
            v.staged.retain(|b| b.digest != bundle.digest);
            v.staged.push(bundle.clone());
        });
        let report = proto::PrestageReport {
            command_id: command.id,
            bundle: Some(bundle),
            variant_digest: prestage.variant_digest,
            ready: true,
            error: None,
            bytes_downloaded: 1 << 20,
        };
        tx.send(AgentMessage { msg: Some(agent_message::Msg::Prestage(report)) }).await?;
        Ok(())
    }

    async fn activate(&self, tx: &mpsc::Sender<AgentMessage>, desired: proto::DesiredState) -> anyhow::Result<()> {
        let now = Instant::now();
        let previous = {
            let mut views = lock(&self.views);
            let Some(v) = views.get_mut(&self.device.id) else { return Ok(()) };
            v.desired_generation = desired.generation;
            v.cohort = desired.cohort.clone();
            v.desired_at = Some(now);
            v.desired_at_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            if v.applied_generation >= desired.generation {
                // Already converged to this generation (a resend after reconnecting): nothing to do.
                return Ok(());
            }
            v.running.clone()
        };
        let send = |status: proto::Status| AgentMessage { msg: Some(agent_message::Msg::Status(status)) };
        if desired.serve_nothing {
            // Stop serving: nothing to pull, nothing to start.
            let idle =
                proto::Status { generation: desired.generation, phase: Phase::Idle as i32, ..Default::default() };
            tx.send(send(idle)).await?;
            self.update(|v| {
                v.applied_generation = v.applied_generation.max(desired.generation);
                v.phase = Phase::Idle as i32;
                v.running = None;
                v.serving_nothing = true;
            });
            return Ok(());
        }
        let pulling = proto::Status {
            generation: desired.generation,
            phase: Phase::Pulling as i32,
            bundle: desired.bundle.clone(),
            serving: previous.clone(),
            ..Default::default()
        };
        tx.send(send(pulling)).await?;
        let to_candidate = desired.cohort == "B";
        let (delay, fail) = match self.device.behaviour {
            Behaviour::Slow(d) if to_candidate => (d, false),
            Behaviour::FailActivation if to_candidate => (self.config.activation, true),
            _ => (self.config.activation, false),
        };
        tokio::time::sleep(delay).await;
        let status = if fail {
            proto::Status {
                generation: desired.generation,
                phase: Phase::Failed as i32,
                bundle: desired.bundle.clone(),
                serving: previous.clone(),
                error: Some(proto::ActivationError {
                    code: proto::ErrorCode::StartFailed as i32,
                    message: "simulated: llama-server exited during start".into(),
                    layer_digest: String::new(),
                }),
                ..Default::default()
            }
        } else {
            proto::Status {
                generation: desired.generation,
                phase: Phase::Active as i32,
                bundle: desired.bundle.clone(),
                serving: desired.bundle.clone(),
                ..Default::default()
            }
        };
        let phase = status.phase;
        let serving = status.serving.clone();
        tx.send(send(status)).await?;
        self.update(|v| {
            v.applied_generation = v.applied_generation.max(desired.generation);
            v.phase = phase;
            v.running = serving.clone();
            v.serving_nothing = false;
        });
        if !fail && let Some(bundle) = &desired.bundle {
            tx.send(self.benchmark(bundle, &desired.cohort)).await?;
        }
        Ok(())
    }

    /// Generation tokens/s on a bundle: the candidate cohort's bundle runs at `b_speed` times the baseline.
    fn speed(&self, cohort: &str) -> f64 {
        if cohort == "B" { self.device.tokens_per_second * self.device.b_speed } else { self.device.tokens_per_second }
    }

    fn cohort(&self) -> String {
        lock(&self.views).get(&self.device.id).map(|v| v.cohort.clone()).unwrap_or_default()
    }

    /// An activation benchmark report of `bundle`, as an agent sends after activating it.
    fn benchmark(&self, bundle: &proto::BundleRef, cohort: &str) -> AgentMessage {
        let tps = self.speed(cohort);
        let stat = |median: f64| proto::Stat {
            median,
            min: median * 0.97,
            max: median * 1.03,
            stddev: median * 0.02,
            samples: 3,
        };
        let result = proto::BenchmarkResult {
            device_id: self.device.id.clone(),
            hardware_class: self.device.class.clone(),
            bundle: Some(bundle.clone()),
            variant_digest: bundle.digest.clone(),
            variant_name: "Q4_K_M".into(),
            trigger: proto::BenchmarkTrigger::Activation as i32,
            at_unix_ms: unix_ms(),
            prompt_set: "fleet-sim-v1".into(),
            repetitions: 3,
            load_ms: 800.0,
            ttft_ms: Some(stat(4_000.0 / tps.max(0.1))),
            prompt_tokens_per_second: Some(stat(tps * 8.0)),
            generation_tokens_per_second: Some(stat(tps)),
            peak_rss_bytes: 600 << 20,
            throttled: false,
            error: String::new(),
        };
        let report = proto::BenchmarkReport { command_id: String::new(), results: vec![result], error: String::new() };
        AgentMessage { msg: Some(agent_message::Msg::Benchmark(report)) }
    }

    /// Serving telemetry for the interval: a few requests at the device's current speed.
    fn telemetry(&self, interval: Duration, counters: &mut (u64, u64)) -> proto::Telemetry {
        let running = lock(&self.views).get(&self.device.id).and_then(|v| v.running.clone());
        let tps = self.speed(&self.cohort());
        counters.0 += 5;
        counters.1 += 400;
        let buckets = [250.0, 1_000.0, 5_000.0]
            .iter()
            .enumerate()
            .map(|(i, le)| proto::HistogramBucket { le_ms: *le, inf: false, count: counters.0 * (i as u64 + 1) / 4 })
            .chain([proto::HistogramBucket { le_ms: 0.0, inf: true, count: counters.0 }])
            .collect();
        proto::Telemetry {
            at_unix_ms: unix_ms(),
            memory_available_bytes: 4 << 30,
            requests_total: counters.0,
            request_errors_total: 0,
            bundle_digest: running.as_ref().map(|b| b.digest.clone()).unwrap_or_default(),
            latency_buckets: buckets,
            latency_sum_ms: counters.0 as f64 * 900.0,
            prompt_tokens_total: counters.1 * 4,
            generated_tokens_total: counters.1,
            prompt_tokens_per_second: tps * 8.0,
            generation_tokens_per_second: tps,
            ttft_ms: 4_000.0 / tps.max(0.1),
            max_temperature_celsius: 55.0,
            throttled: false,
            interval_seconds: interval.as_secs() as u32,
            variant_digest: running.map(|b| b.digest).unwrap_or_default(),
        }
    }
}

/// Devices named `sim-00000`..., classes assigned round-robin, behaviours chosen by `behaviour(i, class)`.
pub fn devices(
    n: usize,
    classes: &[&str],
    running: Option<proto::BundleRef>,
    behaviour: impl Fn(usize, &str) -> Behaviour,
) -> Vec<SimDevice> {
    (0..n)
        .map(|i| {
            let class = classes.get(i % classes.len().max(1)).copied().unwrap_or("unknown");
            SimDevice {
                id: format!("sim-{i:05}"),
                class: class.to_owned(),
                labels: HashMap::from([("site".to_owned(), "sim".to_owned())]),
                behaviour: behaviour(i, class),
                running: running.clone(),
                tokens_per_second: class_speed(class) * (0.9 + 0.2 * device_fraction(&format!("sim-{i:05}"))),
                b_speed: 1.0,
            }
        })
        .collect()
}

/// A plausible generation speed for a class name (stable, so runs compare).
fn class_speed(class: &str) -> f64 {
    match class {
        c if c.starts_with("pi") => 8.0,
        c if c.contains("orin") || c.contains("jetson") => 25.0,
        _ => 40.0,
    }
}

/// A stable number in [0, 1) per device id.
fn device_fraction(id: &str) -> f64 {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (h % 10_000) as f64 / 10_000.0
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
