//! Which bytes of which log files a request reads (pure): the newest `cap` bytes across files oldest
//! first, and the `--since` cut-off of the agent's own log, whose lines start with an RFC 3339 time.

use std::path::PathBuf;

/// A log file as found: its path, size and modification time (ms since the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogFile {
    pub path: PathBuf,
    pub len: u64,
    pub modified_ms: i64,
}

/// A range of one file to send, after a header line naming it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    pub start: u64,
    pub len: u64,
}

/// The newest `cap` bytes of `files` modified at or after `since_ms` (0: any), oldest file first; the
/// oldest kept file may be cut at its start. Also whether anything was left out for the cap.
pub fn plan(mut files: Vec<LogFile>, since_ms: i64, cap: u64) -> (Vec<Segment>, bool) {
    files.retain(|f| f.modified_ms >= since_ms && f.len > 0);
    files.sort_by(|a, b| (a.modified_ms, &a.path).cmp(&(b.modified_ms, &b.path)));
    let mut left = cap;
    let mut cut = false;
    let mut segments = Vec::new();
    for file in files.into_iter().rev() {
        if left == 0 {
            cut = true;
            break;
        }
        let len = file.len.min(left);
        cut |= len < file.len;
        left -= len;
        segments.push(Segment { start: file.len - len, len, path: file.path });
    }
    segments.reverse();
    (segments, cut)
}

/// Drops the lines of the agent's log written before a cut-off, read piece by piece: lines start with the
/// time tracing wrote (`2026-12-07T15:33:58.123456Z  INFO ...`), compared as text with the cut-off in
/// the same form (UTC, so text order is time order). Once a line at or after it passed, everything passes
/// (continuation lines have no time of their own).
#[derive(Clone, Debug)]
pub struct SinceFilter {
    /// `YYYY-MM-DDTHH:MM:SS` of the cut-off; None: everything passes.
    cutoff: Option<String>,
}

impl SinceFilter {
    pub fn new(cutoff: Option<std::time::SystemTime>) -> SinceFilter {
        let cutoff = cutoff.map(|t| humantime::format_rfc3339_seconds(t).to_string().chars().take(19).collect());
        SinceFilter { cutoff }
    }

    /// What of `piece` passes.
    pub fn apply<'a>(&mut self, piece: &'a [u8]) -> &'a [u8] {
        let Some(cutoff) = &self.cutoff else { return piece };
        let mut offset = 0;
        for line in piece.split_inclusive(|b| *b == b'\n') {
            if let Some(time) = line.get(..19).filter(|t| looks_like_time(t))
                && time >= cutoff.as_bytes()
            {
                self.cutoff = None;
                return &piece[offset..];
            }
            offset += line.len();
        }
        &[]
    }
}

fn looks_like_time(t: &[u8]) -> bool {
    t.len() == 19 && t[4] == b'-' && t[10] == b'T' && t[13] == b':' && t[..4].iter().all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, len: u64, modified_ms: i64) -> LogFile {
        LogFile { path: PathBuf::from(name), len, modified_ms }
    }

    #[test]
    fn the_newest_bytes_are_kept_oldest_file_first() {
        let files = vec![file("b", 100, 20), file("a", 100, 10), file("c", 50, 30), file("empty", 0, 40)];
        let (segments, cut) = plan(files.clone(), 0, 120);
        assert!(cut);
        assert_eq!(
            segments,
            vec![Segment { path: "b".into(), start: 30, len: 70 }, Segment { path: "c".into(), start: 0, len: 50 },]
        );
        let (segments, cut) = plan(files.clone(), 15, 1000);
        assert!(!cut);
        assert_eq!(segments.iter().map(|s| s.path.to_str().unwrap_or("")).collect::<Vec<_>>(), ["b", "c"]);
    }

    #[test]
    fn lines_before_the_cutoff_are_dropped() {
        let cutoff = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        let mut filter = SinceFilter::new(Some(cutoff));
        let old = b"2001-09-09T01:46:39.000001Z  INFO old\n  continued\n";
        assert_eq!(filter.apply(old), b"");
        let new = b"2001-09-09T01:46:39.9Z  INFO old\n2001-09-09T01:46:40.000001Z  INFO new\nno time\n";
        assert_eq!(filter.apply(new), b"2001-09-09T01:46:40.000001Z  INFO new\nno time\n");
        assert_eq!(filter.apply(b"anything"), b"anything", "once passed, everything passes");
    }
}
