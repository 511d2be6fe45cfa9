//! Byte ranges: the `Range` header of blob reads and the `Content-Range` of upload chunks.

/// What a `Range: bytes=...` header asks of a representation of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// No range, or one we ignore as RFC 9110 allows (malformed, or several ranges): send everything.
    Full,
    /// Bytes `start..=end`, already clamped to the representation.
    Partial { start: u64, end: u64 },
    /// A well-formed range that selects nothing: answer 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// Interprets a `Range` header (`bytes=a-b`, `bytes=a-`, `bytes=-n`) against a blob of `size` bytes.
pub fn parse_range(header: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = header.map(str::trim).and_then(|h| h.strip_prefix("bytes=")) else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    match (first.is_empty(), last.is_empty()) {
        (true, true) => ByteRange::Full,
        (true, false) => {
            let Ok(suffix) = last.parse::<u64>() else { return ByteRange::Full };
            if suffix == 0 || size == 0 {
                return ByteRange::Unsatisfiable;
            }
            ByteRange::Partial { start: size.saturating_sub(suffix), end: size - 1 }
        }
        (false, _) => {
            let Ok(start) = first.parse::<u64>() else { return ByteRange::Full };
            let end = if last.is_empty() {
                u64::MAX
            } else {
                match last.parse::<u64>() {
                    Ok(end) if end >= start => end,
                    _ => return ByteRange::Full,
                }
            };
            if start >= size {
                return ByteRange::Unsatisfiable;
            }
            ByteRange::Partial { start, end: end.min(size - 1) }
        }
    }
}

/// An upload chunk's `Content-Range: <start>-<end>` (inclusive; a `bytes ` or `bytes=` prefix is tolerated).
/// Returns `None` when malformed or when `end < start`.
pub fn parse_content_range(header: &str) -> Option<(u64, u64)> {
    let header = header.trim();
    let spec = header.strip_prefix("bytes").map(|s| s.trim_start_matches([' ', '='])).unwrap_or(header);
    let spec = spec.split('/').next().unwrap_or(spec);
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim().parse::<u64>().ok()?, end.trim().parse::<u64>().ok()?);
    (end >= start).then_some((start, end))
}

/// The `Range` header of an upload holding `len` bytes: `0-<last byte>`, or `0-0` while empty.
pub fn upload_range(len: u64) -> String {
    format!("0-{}", len.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_three_forms_and_clamp() {
        assert_eq!(parse_range(None, 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=2-5"), 10), ByteRange::Partial { start: 2, end: 5 });
        assert_eq!(parse_range(Some("bytes=2-50"), 10), ByteRange::Partial { start: 2, end: 9 });
        assert_eq!(parse_range(Some("bytes=7-"), 10), ByteRange::Partial { start: 7, end: 9 });
        assert_eq!(parse_range(Some("bytes=-3"), 10), ByteRange::Partial { start: 7, end: 9 });
        assert_eq!(parse_range(Some("bytes=-30"), 10), ByteRange::Partial { start: 0, end: 9 });
    }

    #[test]
    fn unsatisfiable_and_ignored_ranges() {
        assert_eq!(parse_range(Some("bytes=10-"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=10-20"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-5"), 0), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), ByteRange::Full);
    }

    #[test]
    fn content_ranges_of_chunks() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(parse_content_range("bytes=5-5"), Some((5, 5)));
        assert_eq!(parse_content_range("9-3"), None);
        assert_eq!(parse_content_range("nope"), None);
        assert_eq!(upload_range(0), "0-0");
        assert_eq!(upload_range(10), "0-9");
    }
}
