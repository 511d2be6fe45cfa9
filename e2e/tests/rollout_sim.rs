//! Rollout scenarios against an in-process controller on 127.0.0.1:0 and the fleet simulator's agents over
//! real gRPC: a healthy 4-step rollout completes, a candidate failing on 10% of devices aborts and every
//! device returns to A, a failing class is halted while the others complete, a controller restart
//! mid-step changes nothing, devices that served nothing before an aborted rollout serve nothing again, and
//! pre-staging reaches every selected device (late joiners too) while step 1 runs.

use std::collections::HashMap;
use std::time::Duration;

use alki_bundle::pack::{self, PackOptions};
use alki_bundle::{Progress, Remote};
use alki_controller::config::ControllerConfig;
use alki_e2e::sim::{self, Behaviour, SimConfig, SimFleet};
use alki_e2e::tiny_model::{TinyModelOptions, synthetic_tokenizer, write_tiny_model};
use alki_shared::proto::{self, RolloutState, fleet_service_client::FleetServiceClient};
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(60);

struct Controller {
    dir: tempfile::TempDir,
    grpc_addr: std::net::SocketAddr,
    http_addr: std::net::SocketAddr,
    grpc: String,
    admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn bind(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    // A restarted controller takes the same ports back; retry while the old sockets close.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}

async fn start(dir: tempfile::TempDir, addrs: Option<(std::net::SocketAddr, std::net::SocketAddr)>) -> Controller {
    let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    let (g, h) = addrs.unwrap_or((any, any));
    let (grpc, http) = (bind(g).await, bind(h).await);
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(dir.path().to_owned());
    // Rollout candidates must be signed by a trusted key; push_bundle signs with this one.
    config.trusted_keys = vec![signing_key().public_key().clone()];
    config.heartbeat_interval = Duration::from_secs(1);
    // A loopback test bench: plaintext, and the simulator's agents use bearer tokens (see ControllerConfig).
    config.insecure_plaintext = true;
    config.insecure_agent_tokens = true;
    let task = tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
        let _ = stopped.await;
    }));
    let admin = alki_e2e::harness::admin_token(dir.path()).await.expect("admin token written");
    Controller { dir, grpc_addr, http_addr, grpc: format!("http://{grpc_addr}"), admin, stop: Some(stop), task }
}

impl Controller {
    async fn shutdown(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(TIMEOUT, &mut self.task).await.expect("shuts down").expect("join").expect("serve ok");
        self.dir
    }

    async fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::connect(self.grpc.clone()).await.expect("connect fleet")
    }

    fn req<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", format!("Bearer {}", self.admin).parse().expect("header"));
        request
    }

    /// Packs a tiny model and pushes it as acme/tiny:<tag>; returns its reference as agents see it.
    async fn push_bundle(&self, tag: &str, seed: u64) -> proto::BundleRef {
        let work = tempfile::tempdir().expect("tempdir");
        let model = work.path().join(format!("tiny-{tag}.gguf"));
        let options = TinyModelOptions { name: format!("tiny-{tag}"), seed };
        write_tiny_model(&model, &options, &synthetic_tokenizer(64)).expect("model");
        let opts = PackOptions {
            files: vec![model],
            out: work.path().join("layout"),
            name: None,
            version: None,
            license: Some("Apache-2.0".into()),
            context: 512,
            tag: tag.into(),
        };
        let packed = pack::pack(&opts, &Progress::none()).expect("pack");
        let remote = Remote::with_token(self.http_addr.to_string(), "acme/tiny".into(), Some(self.admin.clone()), true);
        alki_bundle::push::push(&opts.out, &remote, tag, &Progress::none()).await.expect("push");
        alki_bundle::sign::sign(&remote, tag, signing_key()).await.expect("sign");
        proto::BundleRef {
            registry: self.http_addr.to_string(),
            repository: "acme/tiny".into(),
            digest: packed.digest.to_string(),
            tag: tag.into(),
        }
    }

    async fn agent_token(&self) -> String {
        let request = self.req(proto::CreateTokenRequest {
            name: "fleet-sim".into(),
            role: proto::Role::Agent as i32,
            ..Default::default()
        });
        self.fleet().await.create_token(request).await.expect("token").into_inner().token
    }

    async fn rollout(&self, id: &str) -> proto::Rollout {
        self.fleet()
            .await
            .get_rollout(self.req(proto::GetRolloutRequest { id: id.into() }))
            .await
            .expect("get")
            .into_inner()
    }

    async fn wait_rollout(&self, id: &str, what: &str, done: impl Fn(&proto::Rollout) -> bool) -> proto::Rollout {
        let mut last = None;
        let waited = tokio::time::timeout(TIMEOUT, async {
            loop {
                let r = self.rollout(id).await;
                if done(&r) {
                    return r;
                }
                last = Some(r);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        match waited {
            Ok(r) => r,
            Err(_) => panic!("rollout {id} did not reach {what}: {last:?}"),
        }
    }

    async fn events(&self, id: &str) -> Vec<proto::RolloutEvent> {
        let request = self.req(proto::ListRolloutEventsRequest { id: id.into(), after_seq: 0 });
        self.fleet().await.list_rollout_events(request).await.expect("events").into_inner().events
    }
}

struct Scenario {
    controller: Controller,
    a: proto::BundleRef,
    b: proto::BundleRef,
    sims: SimFleet,
    config: SimConfig,
}

async fn scenario(n: usize, classes: &[&str], behaviour: impl Fn(usize, &str) -> Behaviour) -> Scenario {
    scenario_with(n, |a| sim::devices(n, classes, Some(a), behaviour)).await
}

/// A scenario whose devices `make` builds from the baseline bundle A.
async fn scenario_with(n: usize, make: impl FnOnce(proto::BundleRef) -> Vec<sim::SimDevice>) -> Scenario {
    let controller = start(tempfile::tempdir().expect("tempdir"), None).await;
    let a = controller.push_bundle("v1", 1).await;
    let b = controller.push_bundle("v2", 2).await;
    let token = controller.agent_token().await;
    let (_, controller_rx) = tokio::sync::watch::channel(controller.grpc.clone());
    let config = SimConfig {
        controller: controller_rx,
        token,
        heartbeat: Duration::from_secs(1),
        activation: Duration::from_millis(20),
        sessions_per_connection: 50,
        telemetry: None,
        ca_pem: None,
    };
    let sims = SimFleet::start(config.clone(), make(a.clone()));
    let s = Scenario { controller, a, b, sims, config };
    let want = n;
    let mut fleet = s.controller.fleet().await;
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let devices = fleet.list_devices(s.controller.req(proto::ListDevicesRequest::default())).await;
            if devices.expect("devices").into_inner().devices.len() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every simulated device said hello");
    s
}

impl Scenario {
    async fn create(&self, steps: &[(u32, u32)], customize: impl FnOnce(&mut proto::RolloutSpec)) -> proto::Rollout {
        let mut spec = proto::RolloutSpec {
            repository: "acme/tiny".into(),
            candidate: "v2".into(),
            selector: HashMap::from([("site".to_owned(), "sim".to_owned())]),
            steps: steps
                .iter()
                .map(|&(percent, min_soak_seconds)| proto::RolloutStep { percent, min_soak_seconds })
                .collect(),
            ..Default::default()
        };
        customize(&mut spec);
        // The simulator's bundles are unsigned: these scenarios are about gates, not signatures.
        let request = self.controller.req(proto::CreateRolloutRequest {
            spec: Some(spec),
            override_signature_check: true,
            override_reason: "fleet simulator scenario".into(),
        });
        self.controller.fleet().await.create_rollout(request).await.expect("create").into_inner()
    }

    fn running(&self) -> HashMap<String, String> {
        self.sims.snapshot().into_iter().map(|(id, v)| (id, v.running.map(|b| b.digest).unwrap_or_default())).collect()
    }

    async fn wait_devices(&self, what: &str, done: impl Fn(&HashMap<String, String>) -> bool) {
        let waited = tokio::time::timeout(TIMEOUT, async {
            loop {
                if done(&self.running()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "devices did not reach {what}");
    }

    async fn finish(self) {
        self.sims.stop().await;
        self.controller.shutdown().await;
    }
}

fn state(r: &proto::Rollout) -> RolloutState {
    RolloutState::try_from(r.state).unwrap_or_default()
}

fn gates(spec: &mut proto::RolloutSpec) {
    spec.gates = Some(proto::RolloutGates { min_devices: 3, max_failure_ratio: Some(0.05), ..Default::default() });
    spec.on_inconclusive = proto::InconclusivePolicy::Advance as i32;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_four_step_rollout_completes() {
    let s = scenario(120, &["pi5-8g", "orin-nano", "x86-avx2"], |_, _| Behaviour::Success).await;
    let r = s.create(&[(10, 0), (25, 0), (50, 0), (100, 0)], gates).await;
    let done = s.controller.wait_rollout(&r.id, "completed", |r| state(r) == RolloutState::Completed).await;
    assert_eq!(done.counts.map(|c| (c.selected, c.active, c.failed)), Some((120, 120, 0)), "{}", done.message);
    assert_eq!(done.classes.len(), 3);
    let b = s.b.digest.clone();
    s.wait_devices("all running B", |m| m.values().all(|d| *d == b)).await;
    let kinds: Vec<String> = s.controller.events(&r.id).await.into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["created", "started", "advanced", "advanced", "advanced", "completed"]);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_failing_on_ten_percent_aborts_and_every_device_returns_to_a() {
    let s = scenario(100, &["pi5-8g", "x86-avx2"], |i, _| {
        if i % 10 == 3 { Behaviour::FailActivation } else { Behaviour::Success }
    })
    .await;
    let r = s.create(&[(20, 0), (50, 0), (100, 0)], gates).await;
    let aborted = s.controller.wait_rollout(&r.id, "aborted", |r| state(r) == RolloutState::Aborted).await;
    assert!(aborted.message.contains("failure ratio"), "{}", aborted.message);
    let a = s.a.digest.clone();
    s.wait_devices("every device back on A", |m| m.values().all(|d| *d == a)).await;
    for (id, view) in s.sims.snapshot() {
        assert_ne!(view.cohort, "B", "{id} is not left in B");
    }
    let events = s.controller.events(&r.id).await;
    assert!(events.iter().any(|e| e.kind == "device_failed" && e.message.contains("start_failed")));
    assert_eq!(events.last().map(|e| e.kind.as_str()), Some("aborted"));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_class_is_halted_while_the_others_complete() {
    let s = scenario(90, &["pi5-8g", "orin-nano", "x86-avx2"], |_, class| {
        if class == "orin-nano" { Behaviour::FailActivation } else { Behaviour::Success }
    })
    .await;
    let r = s
        .create(&[(20, 0), (100, 0)], |spec| {
            gates(spec);
            spec.on_class_failure = proto::ClassFailurePolicy::HaltClass as i32;
        })
        .await;
    let done = s.controller.wait_rollout(&r.id, "completed", |r| state(r) == RolloutState::Completed).await;
    assert_eq!(done.halted_classes, vec!["orin-nano".to_owned()], "{}", done.message);
    let (a, b) = (s.a.digest.clone(), s.b.digest.clone());
    let classes: HashMap<String, String> =
        sim::devices(90, &["pi5-8g", "orin-nano", "x86-avx2"], None, |_, _| Behaviour::Success)
            .into_iter()
            .map(|d| (d.id, d.class))
            .collect();
    s.wait_devices("orin on A, the others on B", |m| {
        m.iter().all(|(id, d)| if classes[id] == "orin-nano" { *d == a } else { *d == b })
    })
    .await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_mid_step_changes_nothing() {
    let s = scenario(60, &["pi5-8g", "x86-avx2"], |_, _| Behaviour::Success).await;
    let r = s.create(&[(30, 3_600), (100, 0)], gates).await;
    let before = s
        .controller
        .wait_rollout(&r.id, "step 1 converged and soaking", |r| {
            r.counts.is_some_and(|c| c.candidate > 0 && c.active == c.candidate) && r.message.contains("soaking")
        })
        .await;
    let generations: HashMap<String, u64> =
        s.sims.snapshot().into_iter().map(|(id, v)| (id, v.desired_generation)).collect();

    // The controller goes away (its sessions with it), comes back on the same addresses from the same
    // data directory, and the devices reconnect remembering what they run.
    let Scenario { controller, a, b, sims, mut config } = s;
    let addrs = (controller.grpc_addr, controller.http_addr);
    let sims_stopped = sims.disconnect().await;
    let dir = controller.shutdown().await;
    // Session tasks of the old server let go of the database a moment after it stops serving (a real
    // restart is a new process, where this cannot happen).
    tokio::time::timeout(TIMEOUT, async {
        while alki_controller::store::Store::open(dir.path()).is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the old controller releases its store");
    let mut controller = start(dir, Some(addrs)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    if controller.task.is_finished() {
        let result = (&mut controller.task).await.expect("join");
        panic!("the restarted controller stopped: {result:?}");
    }
    let (_, rx) = tokio::sync::watch::channel(controller.grpc.clone());
    config.controller = rx;
    let sims = sims_stopped.start(config.clone());
    let s = Scenario { controller, a, b, sims, config };
    // Every agent reconnects and the reconciler runs a few passes.
    tokio::time::timeout(TIMEOUT, async {
        loop {
            if s.sims.snapshot().values().all(|v| v.connected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        let snapshot = s.sims.snapshot();
        let connected = snapshot.values().filter(|v| v.connected).count();
        panic!("only {connected} of {} agents reconnected", snapshot.len())
    });
    tokio::time::sleep(Duration::from_secs(3)).await;

    let after = s.controller.rollout(&r.id).await;
    assert_eq!(
        (after.state, after.current_step, after.step_started_unix_ms, after.counts, after.event_seq),
        (before.state, before.current_step, before.step_started_unix_ms, before.counts, before.event_seq),
        "{}",
        after.message
    );
    let now: HashMap<String, u64> = s.sims.snapshot().into_iter().map(|(id, v)| (id, v.desired_generation)).collect();
    assert_eq!(now, generations, "no device got a new generation");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_verbs_over_fleet_service_pause_resume_promote_and_abort() {
    let s = scenario(40, &["pi5-8g", "x86-avx2"], |_, _| Behaviour::Success).await;
    let c = &s.controller;
    let mut fleet = c.fleet().await;
    let action = |id: &str| c.req(proto::RolloutActionRequest { id: id.into(), reason: "test".into() });

    let r = s.create(&[(25, 3_600), (50, 3_600), (100, 3_600)], gates).await;
    c.wait_rollout(&r.id, "step 1 soaking", |r| r.message.contains("soaking")).await;
    let paused = fleet.pause_rollout(action(&r.id)).await.expect("pause").into_inner();
    assert_eq!(state(&paused), RolloutState::Paused);
    let err = fleet.pause_rollout(action(&r.id)).await.expect_err("pausing twice");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains(&r.id) && err.message().contains("paused"), "{}", err.message());
    let resumed = fleet.resume_rollout(action(&r.id)).await.expect("resume").into_inner();
    assert_eq!(state(&resumed), RolloutState::Progressing);

    let records = fleet
        .list_rollout_devices(c.req(proto::ListRolloutDevicesRequest { id: r.id.clone() }))
        .await
        .expect("records")
        .into_inner()
        .devices;
    assert!(!records.is_empty() && records.len() < 40, "about a quarter in B: {}", records.len());
    assert!(records.iter().all(|d| d.baseline.as_ref().map(|b| &b.digest) == Some(&s.a.digest)), "baselines are A");

    fleet.promote_rollout(action(&r.id)).await.expect("promote");
    // Promoted to the last step, which soaks an hour: every device runs B and the rollout soaks.
    let b = s.b.digest.clone();
    s.wait_devices("all on B after promote", |m| m.values().all(|d| *d == b)).await;
    let aborted = fleet.abort_rollout(action(&r.id)).await.expect("abort").into_inner();
    assert_eq!(state(&aborted), RolloutState::Aborted);
    let a = s.a.digest.clone();
    s.wait_devices("all back on A after abort", |m| m.values().all(|d| *d == a)).await;
    let err = fleet.retry_rollout(action(&r.id)).await.expect_err("retry an aborted rollout");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = fleet.abort_rollout(action("ro-nope")).await.expect_err("unknown rollout");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let kinds: Vec<String> = c.events(&r.id).await.into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["created", "started", "pause", "resume", "promote", "abort"]);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_thirty_percent_slower_on_one_class_fails_its_tokens_gate_there_only() {
    let classes = ["pi5-8g", "orin-nano", "x86-avx2"];
    let s = scenario_with(90, |a| {
        let mut devices = sim::devices(90, &classes, Some(a), |_, _| Behaviour::Success);
        for d in devices.iter_mut().filter(|d| d.class == "pi5-8g") {
            d.b_speed = 0.7;
        }
        devices
    })
    .await;
    // Every device reported its benchmark of A (sent right after its Hello).
    let mut fleet = s.controller.fleet().await;
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let devices = fleet.list_devices(s.controller.req(proto::ListDevicesRequest::default())).await;
            let devices = devices.expect("devices").into_inner().devices;
            if devices
                .iter()
                .all(|d| d.latest_benchmark.as_ref().is_some_and(|b| b.generation_tokens_per_second.is_some()))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every device reported its baseline benchmark");

    let r = s
        .create(&[(20, 0), (100, 0)], |spec| {
            spec.gates = Some(proto::RolloutGates {
                min_devices: 3,
                max_failure_ratio: Some(0.05),
                min_tokens_per_second_ratio: Some(0.9),
                max_ttft_ratio: Some(1.3),
                ..Default::default()
            });
            // Cohorts are hashed over the whole fleet, so at 20% a class may get fewer than min_devices
            // candidates: advance past such a step (every class is judged with all 30 at 100%).
            spec.on_inconclusive = proto::InconclusivePolicy::Advance as i32;
            spec.on_class_failure = proto::ClassFailurePolicy::HaltClass as i32;
        })
        .await;
    let done = s.controller.wait_rollout(&r.id, "completed", |r| state(r) == RolloutState::Completed).await;
    assert_eq!(done.halted_classes, vec!["pi5-8g".to_owned()], "{}", done.message);
    let events = s.controller.events(&r.id).await;
    let halt = events.iter().find(|e| e.kind == "class_halted").expect("a class_halted event");
    assert!(halt.message.contains("tokens/s ratio 0.70 < min 0.90"), "{}", halt.message);
    for class in done.classes.iter().filter(|c| c.class != "pi5-8g") {
        assert!(
            (class.tokens_per_second_ratio - 1.0).abs() < 0.01,
            "{}: {}",
            class.class,
            class.tokens_per_second_ratio
        );
        assert_eq!(class.b_samples, 30, "{}", class.class);
    }
    let (a, b) = (s.a.digest.clone(), s.b.digest.clone());
    let classes: HashMap<String, String> =
        sim::devices(90, &classes, None, |_, _| Behaviour::Success).into_iter().map(|d| (d.id, d.class)).collect();
    s.wait_devices("pi on A, the others on B", |m| {
        m.iter().all(|(id, d)| if classes[id] == "pi5-8g" { *d == a } else { *d == b })
    })
    .await;

    // The same numbers through InsightService.Compare: every B device of the passing classes is paired.
    let channel = tonic::transport::Channel::from_shared(s.controller.grpc.clone()).expect("uri").connect().await;
    let mut insight = proto::insight_service_client::InsightServiceClient::new(channel.expect("connect"));
    let c = insight
        .compare(s.controller.req(proto::CompareRequest { rollout_id: r.id.clone() }))
        .await
        .expect("compare")
        .into_inner();
    let x86 = c.classes.iter().find(|c| c.class == "x86-avx2").expect("x86 compared");
    assert_eq!((x86.paired, x86.b_samples), (30, 30));
    assert_eq!(c.devices.len(), 60, "pairs of the two passing classes");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_served_nothing_serve_nothing_again_after_an_abort() {
    // Even devices ran nothing before the rollout; odd ones ran A, and a tenth of those fail B.
    let s = scenario_with(60, |a| {
        let mut devices = sim::devices(60, &["pi5-8g", "x86-avx2"], Some(a), |i, _| {
            if i % 10 == 3 { Behaviour::FailActivation } else { Behaviour::Success }
        });
        for d in devices.iter_mut().step_by(2) {
            d.running = None;
        }
        devices
    })
    .await;
    let nothing: Vec<String> = (0..60).step_by(2).map(|i| format!("sim-{i:05}")).collect();
    let r = s.create(&[(50, 0), (100, 0)], gates).await;
    let aborted = s.controller.wait_rollout(&r.id, "aborted", |r| state(r) == RolloutState::Aborted).await;
    assert!(aborted.message.contains("to serving nothing, as before"), "{}", aborted.message);
    let a = s.a.digest.clone();
    s.wait_devices("A devices on A, the others serving nothing", |m| {
        m.iter().all(|(id, d)| if nothing.contains(id) { d.is_empty() } else { *d == a })
    })
    .await;
    let views = s.sims.snapshot();
    assert!(views.values().all(|v| v.cohort != "B"), "no device is left in B");
    let returned: Vec<&String> = nothing.iter().filter(|id| views[*id].serving_nothing).collect();
    assert!(!returned.is_empty(), "some devices without A were in B and were told to serve nothing");

    // The controller's records come to say the same (the sims' last reports are written by group commit):
    // no bundle served, nothing desired.
    let fleet = s.controller.fleet().await;
    let mut last = String::new();
    let agreed = tokio::time::timeout(TIMEOUT, async {
        loop {
            let records = fleet
                .clone()
                .list_rollout_devices(s.controller.req(proto::ListRolloutDevicesRequest { id: r.id.clone() }))
                .await
                .expect("records")
                .into_inner()
                .devices;
            let devices = fleet
                .clone()
                .list_devices(s.controller.req(proto::ListDevicesRequest::default()))
                .await
                .expect("devices")
                .into_inner()
                .devices;
            let disagreeing = records.iter().filter(|r| r.baseline.is_none()).find_map(|record| {
                let d = devices.iter().find(|d| d.id == record.device_id).expect("device");
                let agrees = d.desired_serve_nothing && d.desired.is_none() && d.cohort == "A" && d.running.is_none();
                (!agrees).then(|| format!("{d:?}"))
            });
            match disagreeing {
                None => return records,
                Some(d) => last = d,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let records = agreed.unwrap_or_else(|_| panic!("a device without A still serves or is desired something: {last}"));
    assert!(records.iter().any(|r| r.baseline.is_none()), "devices without A were in the rollout");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestage_reaches_every_selected_device_once_while_step_one_runs() {
    let s = scenario(40, &["pi5-8g", "orin-nano"], |_, _| Behaviour::Success).await;
    let r = s
        .create(&[(25, 3_600), (100, 0)], |spec| {
            gates(spec);
            spec.prestage = true;
        })
        .await;
    // Devices that connect after the rollout started are told too.
    let late: Vec<sim::SimDevice> =
        sim::devices(45, &["pi5-8g", "orin-nano"], Some(s.a.clone()), |_, _| Behaviour::Success)
            .into_iter()
            .skip(40)
            .map(|mut d| {
                d.id = d.id.replace("sim-", "late-");
                d
            })
            .collect();
    let late_ids: Vec<String> = late.iter().map(|d| d.id.clone()).collect();
    let late_fleet = SimFleet::start(s.config.clone(), late);
    let staged = s
        .controller
        .wait_rollout(&r.id, "every selected device staged", |r| r.classes.iter().map(|c| c.staged).sum::<u32>() == 45)
        .await;
    assert_eq!(staged.current_step, 0, "staged while step 1 runs: {}", staged.message);
    assert_eq!(staged.classes.iter().map(|c| c.stage_failed).sum::<u32>(), 0);
    let mut views = s.sims.snapshot();
    views.extend(late_fleet.snapshot());
    for id in late_ids.iter() {
        assert!(views.contains_key(id));
    }
    for (id, v) in &views {
        assert_eq!(v.prestage_commands, 1, "{id} is told exactly once");
        assert!(v.staged.iter().any(|b| b.digest == s.b.digest), "{id} staged B");
    }
    let devices = s
        .controller
        .fleet()
        .await
        .list_devices(s.controller.req(proto::ListDevicesRequest::default()))
        .await
        .expect("devices")
        .into_inner()
        .devices;
    assert_eq!(devices.len(), 45);
    for d in &devices {
        let p = d.prestage.as_ref().expect("a prestage record");
        assert_eq!(
            (p.state, p.attempts, p.rollout_id.as_str()),
            (proto::PrestageState::Ready as i32, 1, r.id.as_str())
        );
        assert!(d.staged.iter().any(|b| b.digest == s.b.digest));
    }
    late_fleet.stop().await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_schedule_window_holds_the_rollout_until_an_operator_promotes() {
    let s = scenario(20, &["pi5-8g"], |_, _| Behaviour::Success).await;
    // A window that opens two hours from now and lasts one: closed for the whole test.
    let minute_now = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() / 60
        % 1440) as u32;
    let start = (minute_now + 120) % 1440;
    let r = s
        .create(&[(50, 0), (100, 0)], |spec| {
            gates(spec);
            spec.schedule = Some(proto::ScheduleWindow {
                start_minute_utc: start,
                end_minute_utc: (start + 60) % 1440,
                weekdays: vec![],
            });
        })
        .await;
    let waiting = s
        .controller
        .wait_rollout(&r.id, "waiting for its window", |r| r.message.contains("outside the schedule window"))
        .await;
    assert_eq!(state(&waiting), RolloutState::Pending, "{}", waiting.message);
    assert!(waiting.window_opens_unix_ms > 0);
    let a = s.a.digest.clone();
    assert!(s.running().values().all(|d| *d == a), "no device moved while the window is closed");
    let mut fleet = s.controller.fleet().await;
    let action = s.controller.req(proto::RolloutActionRequest { id: r.id.clone(), reason: "now".into() });
    fleet.promote_rollout(action).await.expect("promote");
    let done = s.controller.wait_rollout(&r.id, "completed", |r| state(r) == RolloutState::Completed).await;
    assert_eq!(done.counts.map(|c| c.active), Some(20), "{}", done.message);
    let b = s.b.digest.clone();
    s.wait_devices("all on B", |m| m.values().all(|d| *d == b)).await;
    s.finish().await;
}

/// The fleet's signing key for this test binary: rollouts of bundles it signed are accepted.
fn signing_key() -> &'static alki_shared::signing::SigningKey {
    static KEY: std::sync::OnceLock<alki_shared::signing::SigningKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| alki_shared::signing::SigningKey::generate().expect("signing key"))
}
