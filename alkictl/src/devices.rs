//! `alkictl devices list|get|label|decommission` (and, through [`crate::diagnostics`], logs, support-bundle,
//! restart-runtime, reverify): the fleet's devices as people and scripts read them (enums
//! as words, a device told to serve nothing said so), operators' labels on them, and revoking a device.

use std::collections::HashMap;

use alki_shared::proto;
use clap::Subcommand;
use serde::Serialize;

use crate::connection::{Connection, status};
use crate::diagnostics;
use crate::labels::{LabelChange, SelectorArgs, parse_label_change};
use crate::output::{Output, print, rfc3339, short_ref, table};

#[derive(Subcommand)]
pub enum DevicesCmd {
    /// List devices, optionally only those carrying labels (`--selector site=lab`).
    List(SelectorArgs),
    /// One device in full.
    Get { id: String },
    /// Set (`key=value`) or remove (`key-`) an operator's labels on a device. They win over the enrollment
    /// token's and the device's own, rollouts select by them at once, and the device is told.
    Label {
        id: String,
        #[arg(required = true, value_parser = parse_label_change)]
        changes: Vec<LabelChange>,
    },
    /// Revoke a device: its session is closed and its certificate refused from now on.
    Decommission { id: String },
    /// The device's logs (the agent's and llama-server's), read through the controller; `--follow` until
    /// Ctrl-C. Operators and admins only; refused by a device whose agent.toml says
    /// `[diagnostics] remote_logs = false`.
    Logs(diagnostics::LogsArgs),
    /// A support bundle (tar.zst: inventory, redacted config, state, content store, metrics, log tails).
    SupportBundle(diagnostics::BundleArgs),
    /// Restart the device's model blue/green (a new llama-server, then the old one drains). Queued while
    /// the device is offline.
    RestartRuntime(diagnostics::CommandArgs),
    /// Hash the device's content store again now, removing corrupt blobs. Queued while offline.
    Reverify(diagnostics::CommandArgs),
}

/// Runs one `alkictl devices` command.
pub async fn run(connection: &Connection, output: Output, cmd: DevicesCmd) -> anyhow::Result<()> {
    match cmd {
        DevicesCmd::List(sel) => list(connection, output, sel).await,
        DevicesCmd::Get { id } => {
            let device = connection.fleet().await?.get_device(proto::GetDeviceRequest { id }).await.map_err(status)?;
            let view = DeviceView::from(&device.into_inner());
            print(output, &view, |d| serde_json::to_string_pretty(d).unwrap_or_default())
        }
        DevicesCmd::Label { id, changes } => label(connection, output, id, changes).await,
        DevicesCmd::Decommission { id } => decommission(connection, output, id).await,
        DevicesCmd::Logs(args) => diagnostics::logs(connection, output, args).await,
        DevicesCmd::SupportBundle(args) => diagnostics::support_bundle(connection, output, args).await,
        DevicesCmd::RestartRuntime(args) => {
            diagnostics::command(connection, output, diagnostics::DeviceCommand::RestartRuntime, args).await
        }
        DevicesCmd::Reverify(args) => {
            diagnostics::command(connection, output, diagnostics::DeviceCommand::Reverify, args).await
        }
    }
}

async fn label(
    connection: &Connection,
    output: Output,
    device_id: String,
    changes: Vec<LabelChange>,
) -> anyhow::Result<()> {
    let mut request = proto::LabelDeviceRequest { device_id, ..Default::default() };
    for change in changes {
        match change {
            LabelChange::Set(k, v) => {
                request.set.insert(k, v);
            }
            LabelChange::Remove(k) => request.remove.push(k),
        }
    }
    let device = connection.fleet().await?.label_device(request).await.map_err(status)?.into_inner();
    let view = DeviceView::from(&device);
    print(output, &view, |d| {
        let shown: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("labelled {}; rollouts select it by {}", d.id, shown.join(","))
    })
}

async fn list(connection: &Connection, output: Output, sel: SelectorArgs) -> anyhow::Result<()> {
    let selector: HashMap<String, String> = sel.selector.into_iter().collect();
    let devices =
        connection.fleet().await?.list_devices(proto::ListDevicesRequest { selector }).await.map_err(status)?;
    let devices: Vec<DeviceView> = devices.into_inner().devices.iter().map(DeviceView::from).collect();
    print(output, &devices, |ds| {
        let mut t = table(["DEVICE", "CONNECTED", "PHASE", "RUNNING", "GEN", "CLASS", "ERROR"]);
        for d in ds {
            t.add_row([
                d.id.clone(),
                if d.connected { "yes".into() } else { "no".into() },
                d.phase.clone(),
                d.running_cell(),
                format!("{}/{}", d.applied_generation, d.desired_generation),
                d.hardware_class.clone(),
                d.error.clone().unwrap_or_default(),
            ]);
        }
        t.to_string()
    })
}

async fn decommission(connection: &Connection, output: Output, device_id: String) -> anyhow::Result<()> {
    let done = connection
        .security()
        .await?
        .decommission_device(proto::DecommissionDeviceRequest { device_id })
        .await
        .map_err(status)?
        .into_inner();
    #[derive(Serialize)]
    struct View {
        device_id: String,
        decommissioned: String,
        session_closed: bool,
    }
    let view = View {
        device_id: done.device_id,
        decommissioned: rfc3339(done.decommissioned_unix_ms),
        session_closed: done.session_closed,
    };
    print(output, &view, |v| {
        format!(
            "decommissioned {}{}; its certificate is refused from now on",
            v.device_id,
            if v.session_closed { " (its session was closed)" } else { "" }
        )
    })
}

/// A device for people and scripts: enums as words, not numbers.
#[derive(Serialize)]
struct DeviceView {
    id: String,
    connected: bool,
    phase: String,
    running: Option<String>,
    desired: Option<String>,
    /// Serving nothing on purpose: a rollout returned the device to a baseline of nothing served.
    desired_serve_nothing: bool,
    applied_generation: u64,
    desired_generation: u64,
    rollout_id: String,
    hardware_class: String,
    /// The device's architecture (Rust's names: `x86_64`, `aarch64`).
    arch: String,
    /// The runtime build platform entry it serves its bundle on (empty: its agent.toml's llama-server).
    runtime_platform: String,
    agent_version: String,
    last_seen_unix_ms: i64,
    /// What rollouts select by: the token's and operators' labels, and the device-owned keys it reports.
    labels: std::collections::BTreeMap<String, String>,
    /// What the device says of itself (not selected by unless the key is device-owned).
    reported_labels: std::collections::BTreeMap<String, String>,
    /// Set with `alkictl devices label`.
    assigned_labels: std::collections::BTreeMap<String, String>,
    /// The class before the latest change of hardware class, and when (empty: never changed).
    previous_class: String,
    class_changed: Option<String>,
    decommissioned: bool,
    /// False when the device refuses remote logs and support bundles (its agent.toml), as of its last Hello.
    remote_diagnostics: bool,
    error: Option<String>,
    error_code: Option<String>,
}

impl From<&proto::Device> for DeviceView {
    fn from(d: &proto::Device) -> Self {
        DeviceView {
            id: d.id.clone(),
            connected: d.connected,
            phase: proto::Phase::try_from(d.phase).unwrap_or(proto::Phase::Unspecified).label().into(),
            running: d.running.as_ref().map(|b| b.display()),
            // Scripts read `desired_serve_nothing`; `desired` stays a bundle reference or null.
            desired: d.desired.as_ref().map(|b| b.display()),
            desired_serve_nothing: d.desired_serve_nothing,
            applied_generation: d.applied_generation,
            desired_generation: d.desired_generation,
            rollout_id: d.rollout_id.clone(),
            hardware_class: d.inventory.as_ref().map(|i| i.hardware_class.clone()).unwrap_or_default(),
            arch: d.inventory.as_ref().map(|i| i.arch.clone()).unwrap_or_default(),
            runtime_platform: d.running_runtime_platform.clone(),
            agent_version: d.agent_version.clone(),
            last_seen_unix_ms: d.last_seen_unix_ms,
            labels: d.labels.clone().into_iter().collect(),
            reported_labels: d.reported_labels.clone().into_iter().collect(),
            assigned_labels: d.assigned_labels.clone().into_iter().collect(),
            previous_class: d.previous_class.clone(),
            class_changed: (d.class_changed_unix_ms > 0).then(|| rfc3339(d.class_changed_unix_ms)),
            decommissioned: d.decommissioned,
            remote_diagnostics: !d.inventory.as_ref().is_some_and(|i| i.remote_diagnostics_refused),
            error: d.error.as_ref().map(|e| e.message.clone()),
            error_code: d.error.as_ref().map(|e| proto::ErrorCode::try_from(e.code).unwrap_or_default().label().into()),
        }
    }
}

/// How a device told to serve nothing (`Device.desired_serve_nothing`) reads, so it is not taken for a fault.
const SERVE_NOTHING: &str = "nothing (by rollout)";

impl DeviceView {
    /// The RUNNING cell: the bundle, nothing on purpose, or "-" (nothing yet or nothing known).
    fn running_cell(&self) -> String {
        match &self.running {
            Some(r) => short_ref(r),
            None if self.desired_serve_nothing => SERVE_NOTHING.into(),
            None => "-".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_serving_nothing_by_rollout_says_so() {
        let nothing = proto::Device { id: "pi-1".into(), desired_serve_nothing: true, ..Default::default() };
        let view = DeviceView::from(&nothing);
        assert_eq!(view.running_cell(), "nothing (by rollout)");
        assert_eq!(view.desired, None, "desired stays a bundle reference or null for scripts");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["desired_serve_nothing"], true);

        let unknown = DeviceView::from(&proto::Device { id: "pi-2".into(), ..Default::default() });
        assert_eq!(unknown.running_cell(), "-");
        assert_eq!(unknown.desired, None);
    }
}
