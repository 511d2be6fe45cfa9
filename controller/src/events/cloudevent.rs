//! One event of the log as a CloudEvents 1.0 structured-mode JSON document (pure).

use std::time::{Duration, UNIX_EPOCH};

use alki_shared::proto;
use serde_json::json;

/// The media type of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// CloudEvents types are this prefix and the log's type (`ai.alki.rollout.halted`).
pub const TYPE_PREFIX: &str = "ai.alki.";

/// The CloudEvent id of a log entry: unique per controller installation, so receivers drop a redelivery.
pub fn id(event: &proto::FleetEvent) -> String {
    format!("alki-{}", event.id)
}

/// The document for `event` under the CloudEvent `id` (see [`id`]; a test delivery has its own), from
/// `source` (the controller, as `//host:port`).
pub fn document(event: &proto::FleetEvent, id: &str, source: &str) -> serde_json::Value {
    let subject = if !event.rollout_id.is_empty() {
        format!("rollouts/{}", event.rollout_id)
    } else {
        format!("devices/{}", event.device_id)
    };
    let time = UNIX_EPOCH + Duration::from_millis(event.unix_ms.max(0) as u64);
    json!({
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": format!("{TYPE_PREFIX}{}", event.r#type),
        "subject": subject,
        "time": humantime::format_rfc3339_millis(time).to_string(),
        "datacontenttype": "application/json",
        "data": {
            "event_id": event.id,
            "unix_ms": event.unix_ms,
            "type": event.r#type,
            "rollout_id": event.rollout_id,
            "rollout_seq": event.rollout_seq,
            "device_id": event.device_id,
            "message": event.message,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_event_is_a_cloudevent_with_its_subject_and_time() {
        let event = proto::FleetEvent {
            id: 42,
            unix_ms: 1_765_000_000_123,
            r#type: "rollout.class_halted".into(),
            rollout_id: "ro-1".into(),
            rollout_seq: 5,
            message: "pi5: 2 failed".into(),
            ..Default::default()
        };
        let doc = document(&event, &id(&event), "//controller:8443");
        assert_eq!(doc["specversion"], "1.0");
        assert_eq!(doc["id"], "alki-42");
        assert_eq!(doc["type"], "ai.alki.rollout.class_halted");
        assert_eq!(doc["subject"], "rollouts/ro-1");
        assert_eq!(doc["time"], "2025-12-06T05:46:40.123Z");
        assert_eq!(doc["data"]["rollout_seq"], 5);
        let device = proto::FleetEvent {
            r#type: "device.offline".into(),
            device_id: "pi-1".into(),
            rollout_id: String::new(),
            ..event
        };
        assert_eq!(document(&device, "x", "//c")["subject"], "devices/pi-1");
    }
}
