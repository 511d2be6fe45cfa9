//! Labels on the command line: `key=value` flags and the `--selector` that picks devices by them.

use clap::Args;

/// Devices chosen by their labels.
#[derive(Args, Default)]
pub struct SelectorArgs {
    /// key=value; repeat for several.
    #[arg(long = "selector", short = 'l', value_parser = parse_label)]
    pub selector: Vec<(String, String)>,
}

/// `key=value` of a label flag.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}
