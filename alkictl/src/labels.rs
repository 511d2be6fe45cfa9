//! Labels on the command line: `key=value` flags and the `--selector` that picks devices by them.

use clap::Args;

/// Devices chosen by their labels.
#[derive(Args, Default)]
pub struct SelectorArgs {
    /// key=value; repeat for several.
    #[arg(long = "selector", short = 'l', value_parser = parse_label)]
    pub selector: Vec<(String, String)>,
}

/// One change of `alkictl devices label`: `key=value` sets, `key-` removes.
#[derive(Clone, Debug, PartialEq)]
pub enum LabelChange {
    Set(String, String),
    Remove(String),
}

pub fn parse_label_change(s: &str) -> Result<LabelChange, String> {
    if let Some(key) = s.strip_suffix('-').filter(|k| !k.is_empty() && !k.contains('=')) {
        return Ok(LabelChange::Remove(key.to_owned()));
    }
    parse_label(s)
        .map(|(k, v)| LabelChange::Set(k, v))
        .map_err(|_| format!("{s:?} is neither key=value (set) nor key- (remove)"))
}

/// `key=value` of a label flag.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_changes_set_with_equals_and_remove_with_a_trailing_dash() {
        assert_eq!(parse_label_change("tier=gold"), Ok(LabelChange::Set("tier".into(), "gold".into())));
        assert_eq!(parse_label_change("zone-"), Ok(LabelChange::Remove("zone".into())));
        assert_eq!(parse_label_change("a=b-"), Ok(LabelChange::Set("a".into(), "b-".into())), "a value may end in -");
        assert!(parse_label_change("-").is_err());
        assert!(parse_label_change("tier").is_err());
    }
}
