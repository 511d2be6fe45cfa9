//! How alkictl shows results: a table (or a sentence) for people, pretty JSON for scripts, progress bars on
//! stderr for people only, and the short forms tables use for digests, references, sizes and times.

use std::time::{Duration, UNIX_EPOCH};

use clap::ValueEnum;
use comfy_table::Table;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Prints `value` as JSON, or as what `table` makes of it for people.
pub fn print<T: Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => println!("{}", table(value)),
    }
    Ok(())
}

/// An empty table with these column names, borderless.
pub fn table<'a>(header: impl IntoIterator<Item = &'a str>) -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header(header.into_iter().collect::<Vec<_>>());
    t
}

/// Progress for the library to report to: a bar on stderr for people, nothing for scripts reading JSON.
pub fn progress(output: Output, what: &'static str) -> alki_bundle::Progress {
    if output == Output::Json {
        return alki_bundle::Progress::none();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what);
    alki_bundle::Progress::to(Bar(bar))
}

/// An indicatif bar as the library's progress sink.
struct Bar(indicatif::ProgressBar);

impl alki_bundle::ProgressSink for Bar {
    fn set_length(&self, total: u64) {
        self.0.set_length(total);
    }

    fn set_message(&self, text: &str) {
        self.0.set_message(text.to_owned());
    }

    fn set_position(&self, done: u64) {
        self.0.set_position(done);
    }

    fn inc(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn note(&self, text: &str) {
        // Above the bar, which keeps drawing below it (on stderr, like the bar; plain when it is hidden).
        self.0.suspend(|| eprintln!("{text}"));
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// The first 12 hex digits of a digest, as tables show it.
pub fn short(digest: &str) -> String {
    digest.strip_prefix("sha256:").map(|h| h.chars().take(12).collect()).unwrap_or_else(|| digest.to_owned())
}

/// `name@sha256:<hex>` with the digest shortened to 12 hex digits, as tables show it.
pub fn short_ref(r: &str) -> String {
    match r.split_once("@sha256:") {
        Some((name, hex)) => format!("{name}@{}", hex.chars().take(12).collect::<String>()),
        None => r.to_owned(),
    }
}

/// A size for people (`1.5 GiB`).
pub fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// Unix milliseconds as an RFC 3339 time to the second; empty for times before the epoch.
pub fn rfc3339(unix_ms: i64) -> String {
    u64::try_from(unix_ms)
        .map(|ms| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string())
        .unwrap_or_default()
}
