//! Text from untrusted callers made safe to store and to print: control characters escaped (so no terminal
//! escape sequence reaches an operator's screen) and length capped (so no field grows a record without bound).

/// `value` with every control character written as a `\u{..}` escape, cut to at most `max_chars` characters
/// (a cut value ends with `…`).
pub fn printable(value: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max_chars.saturating_mul(4)));
    for (kept, c) in value.chars().enumerate() {
        if kept == max_chars {
            out.push('…');
            return out;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_is_capped() {
        assert_eq!(printable("pi-1", 64), "pi-1");
        assert_eq!(printable("a\u{1b}[2Jb\n", 64), "a\\u{1b}[2Jb\\u{a}");
        assert_eq!(printable("abcdef", 3), "abc…");
        assert_eq!(printable("ééé", 2), "éé…", "cut at characters, not bytes");
        assert_eq!(printable("", 0), "");
        assert!(!printable(&"\u{7}".repeat(10_000), 100).chars().any(char::is_control));
    }
}
