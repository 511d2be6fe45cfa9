//! Webhooks as operators manage them: a URL checked before it is stored, a signing secret made or checked,
//! delivery starting from now (or the log's start), and each webhook's delivery state with what is pending.

use alki_shared::clock::UnixMs;
use alki_shared::proto;
use alki_shared::webhook;
use rand::Rng;

use super::deliver::{Attempt, Deliveries};
use crate::store::events::{EventQuery, MAX_SCAN, MAX_WEBHOOKS, WebhookRecord};
use crate::store::{Store, StoreError};

/// Type prefixes a webhook may filter on at most, and each one's length.
const MAX_TYPES: usize = 16;
const MAX_TYPE_LEN: usize = 64;
const MAX_URL_LEN: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    Invalid(String),
    #[error("no webhook {0}; `alkictl webhooks list` shows them")]
    NotFound(String),
    #[error("this controller has {MAX_WEBHOOKS} webhooks already; remove one first")]
    Full,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an operator asks for.
pub struct NewWebhook {
    pub url: String,
    pub types: Vec<String>,
    pub secret: String,
    pub insecure_http: bool,
    pub from_start: bool,
}

/// Checks and stores a webhook, and starts delivering to it. Returns it with its secret. Blocking store
/// work runs on the caller's blocking thread.
pub fn add(
    store: &Store,
    deliveries: &Deliveries,
    new: NewWebhook,
    now: UnixMs,
) -> Result<(WebhookRecord, String), WebhookError> {
    check_url(&new.url, new.insecure_http)?;
    check_types(&new.types)?;
    let secret = if new.secret.is_empty() {
        webhook::secret_from_key(&rand::rng().random::<[u8; 32]>())
    } else {
        webhook::secret_key(&new.secret).map_err(|e| WebhookError::Invalid(e.to_string()))?;
        new.secret
    };
    let start = if new.from_start { 0 } else { store.events(&EventQuery { limit: 0, ..Default::default() })?.last };
    let record = WebhookRecord {
        id: format!("wh-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        url: new.url,
        types: new.types,
        secret: secret.clone(),
        created_unix_ms: now.as_millis(),
        delivered_through: start,
        ..Default::default()
    };
    if !store.add_webhook(&record)? {
        return Err(WebhookError::Full);
    }
    deliveries.spawn(&record.id);
    Ok((record, secret))
}

pub fn remove(store: &Store, deliveries: &Deliveries, id: &str) -> Result<(), WebhookError> {
    deliveries.stop(id);
    if store.remove_webhook(id)? { Ok(()) } else { Err(WebhookError::NotFound(id.to_owned())) }
}

pub fn get(store: &Store, id: &str) -> Result<WebhookRecord, WebhookError> {
    store.webhook(id)?.ok_or_else(|| WebhookError::NotFound(id.to_owned()))
}

/// Every webhook with its delivery state, never its secret.
pub fn list(store: &Store) -> Result<Vec<proto::Webhook>, WebhookError> {
    store.webhooks()?.iter().map(|record| Ok(describe(store, record)?)).collect()
}

/// A webhook as operators see it: pending counts matching events after its position. Ids have no gaps, so a
/// webhook that takes every event owes the ids after its position (or after the pruned start); one with type
/// filters is counted by reading (at most [`MAX_SCAN`]), which `/metrics` then pays only for filtered ones.
pub fn describe(store: &Store, record: &WebhookRecord) -> Result<proto::Webhook, StoreError> {
    let query = EventQuery {
        after: record.delivered_through,
        types: record.types.clone(),
        limit: MAX_SCAN,
        ..Default::default()
    };
    let pending = if record.types.is_empty() {
        let page = store.events(&EventQuery { limit: 0, ..query })?;
        page.last.saturating_sub(record.delivered_through.max(page.first.saturating_sub(1)))
    } else {
        store.events(&query)?.events.len() as u64
    };
    Ok(proto::Webhook {
        id: record.id.clone(),
        url: record.url.clone(),
        types: record.types.clone(),
        created_unix_ms: record.created_unix_ms,
        delivered_through: record.delivered_through,
        pending,
        failed: record.failed,
        last_attempt_unix_ms: record.last_attempt_unix_ms,
        last_status: u32::from(record.last_status),
        last_error: record.last_error.clone(),
        attempts: record.attempts,
    })
}

/// The test attempt as the wire carries it.
pub fn test_response(attempt: &Attempt) -> proto::TestWebhookResponse {
    proto::TestWebhookResponse {
        status: u32::from(attempt.status),
        error: attempt.error.clone().unwrap_or_default(),
        duration_ms: attempt.duration.as_millis() as u64,
    }
}

fn check_url(url: &str, insecure_http: bool) -> Result<(), WebhookError> {
    let invalid = |why: &str| WebhookError::Invalid(format!("webhook URL {url:?}: {why}"));
    if url.len() > MAX_URL_LEN {
        return Err(invalid(&format!("longer than {MAX_URL_LEN} bytes")));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    match parsed.scheme() {
        "https" => {}
        "http" if insecure_http => {}
        "http" => {
            return Err(invalid(
                "plain http sends the fleet's events unencrypted; use https, or --insecure-http for a receiver on a trusted network",
            ));
        }
        other => return Err(invalid(&format!("scheme {other} is not http(s)"))),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it names no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "credentials in the URL would be shown to every operator; the signature authenticates the controller",
        ));
    }
    Ok(())
}

fn check_types(types: &[String]) -> Result<(), WebhookError> {
    if types.len() > MAX_TYPES {
        return Err(WebhookError::Invalid(format!("at most {MAX_TYPES} event types per webhook")));
    }
    for t in types {
        let known = ["rollout", "device"].iter().any(|k| t == k || t.starts_with(&format!("{k}.")));
        let clean = t.len() <= MAX_TYPE_LEN && t.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '.');
        if !known || !clean {
            return Err(WebhookError::Invalid(format!(
                "event type {:?} is not a prefix of rollout.* or device.* types (e.g. `rollout.`, `device.offline`)",
                alki_shared::text::printable(t, 80)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_without_credentials_unless_told() {
        assert!(check_url("https://hooks.example.com/alki", false).is_ok());
        assert!(check_url("http://127.0.0.1:9/x", true).is_ok());
        for (url, why) in [
            ("http://hooks.example.com", "unencrypted"),
            ("ftp://hooks.example.com", "scheme ftp"),
            ("https://user:pw@hooks.example.com", "credentials"),
            ("not a url", "relative URL"),
        ] {
            let error = check_url(url, false).expect_err(url).to_string();
            assert!(error.contains(why), "{url}: {error}");
        }
        assert!(check_url(&format!("https://h/{}", "a".repeat(MAX_URL_LEN)), false).is_err());
    }

    #[test]
    fn type_filters_are_prefixes_of_known_types() {
        assert!(check_types(&["rollout.".into(), "device.offline".into(), "device".into()]).is_ok());
        for bad in ["ro", "rollout\n", "webhook.test", "DEVICE."] {
            assert!(check_types(&[bad.into()]).is_err(), "{bad:?}");
        }
        assert!(check_types(&vec!["rollout.".to_owned(); MAX_TYPES + 1]).is_err());
    }
}
