//! Golden-prompt checks: what a check says (its form in `prompts.jsonl`), compiled once when the suite is
//! read, and judged against a reply with a reason that names the failing check.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest `contains` or `exact` text, in bytes.
pub const MAX_TEXT_BYTES: usize = 16 << 10;
/// Longest `regex` pattern, in bytes.
pub const MAX_REGEX_BYTES: usize = 4 << 10;
/// Cap on a compiled regex (the `regex` crate's size limits), so a hostile pattern cannot take the memory.
/// The crate matches in linear time, so a pattern cannot take the CPU either.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Characters of the reply quoted in a failure reason: enough to see what went wrong, bounded in reports.
const EXCERPT_CHARS: usize = 80;

/// One check of a golden prompt, as written in `prompts.jsonl`: `{"contains": "Paris"}`,
/// `{"regex": "^\\d+$"}`, `{"exact": "4"}`, `{"json_schema": {...}}` or the string `"chat_template_smoke"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The reply contains this text (case-sensitive).
    Contains(String),
    /// The reply matches this regular expression (the `regex` crate's syntax; unanchored, so anchor with
    /// `^` and `$` to match the whole reply).
    Regex(String),
    /// The reply, without leading and trailing whitespace, equals this text.
    Exact(String),
    /// The reply, without leading and trailing whitespace, is JSON valid against this JSON Schema. The schema
    /// must be self-contained: a `$ref` to another document is refused (nothing is fetched on a device).
    JsonSchema(serde_json::Value),
    /// For chat prompts: the reply is not empty, does not echo a control token of the chat template, and
    /// generation ended on an end-of-turn token rather than at the token limit. A wrong chat template
    /// typically breaks one of the three.
    ChatTemplateSmoke,
}

impl Check {
    /// The check's kind as written in the suite: `contains`, `regex`, `exact`, `json_schema`,
    /// `chat_template_smoke`.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Contains(_) => "contains",
            Check::Regex(_) => "regex",
            Check::Exact(_) => "exact",
            Check::JsonSchema(_) => "json_schema",
            Check::ChatTemplateSmoke => "chat_template_smoke",
        }
    }

    /// A short label naming the check for people: `contains "Paris"`, `json_schema`.
    pub fn label(&self) -> String {
        match self {
            Check::Contains(v) | Check::Regex(v) | Check::Exact(v) => format!("{} {:?}", self.kind(), excerpt(v)),
            Check::JsonSchema(_) | Check::ChatTemplateSmoke => self.kind().to_owned(),
        }
    }
}

/// Why a check cannot be used; the suite reader adds the prompt and check position.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    #[error("{kind} text is empty; give the text the reply must hold")]
    EmptyText { kind: &'static str },
    #[error("{kind} is {len} bytes, over the limit of {max}; shorten it")]
    TooLong { kind: &'static str, len: usize, max: usize },
    #[error("regex {pattern:?} does not compile: {reason}; fix the pattern (Rust regex syntax)")]
    Regex { pattern: String, reason: String },
    #[error("json_schema is not a usable JSON Schema: {reason}; fix it, and inline any $ref to another document")]
    Schema { reason: String },
}

/// A check ready to judge replies: its regex or schema compiled once.
#[derive(Clone)]
pub struct CompiledCheck {
    check: Check,
    matcher: Matcher,
}

#[derive(Clone)]
enum Matcher {
    Text,
    Regex(regex::Regex),
    Schema(Arc<jsonschema::Validator>),
    Smoke,
}

impl fmt::Debug for CompiledCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CompiledCheck").field(&self.check).finish()
    }
}

impl PartialEq for CompiledCheck {
    fn eq(&self, other: &Self) -> bool {
        self.check == other.check
    }
}

impl CompiledCheck {
    /// Validates and compiles a check: bounded texts and patterns, a regex that compiles within
    /// [`REGEX_SIZE_LIMIT`], a schema that compiles without fetching anything.
    pub fn compile(check: Check) -> Result<CompiledCheck, CheckError> {
        let matcher = match &check {
            Check::Contains(text) | Check::Exact(text) => {
                bounded_text(check.kind(), text, MAX_TEXT_BYTES)?;
                Matcher::Text
            }
            Check::Regex(pattern) => {
                bounded_text("regex", pattern, MAX_REGEX_BYTES)?;
                Matcher::Regex(compile_regex(pattern)?)
            }
            Check::JsonSchema(schema) => Matcher::Schema(Arc::new(compile_schema(schema)?)),
            Check::ChatTemplateSmoke => Matcher::Smoke,
        };
        Ok(CompiledCheck { check, matcher })
    }

    pub fn check(&self) -> &Check {
        &self.check
    }

    /// Judges one reply. `control_tokens` are the chat template's control tokens (e.g. `<|im_start|>`,
    /// `</s>`), which only the smoke check reads. `Err` holds why the reply fails, quoting it.
    pub fn evaluate(&self, reply: &Reply, control_tokens: &[String]) -> Result<(), String> {
        let text = reply.text.as_str();
        match (&self.check, &self.matcher) {
            (Check::Contains(want), _) if !text.contains(want.as_str()) => {
                Err(format!("reply {:?} does not contain {:?}", excerpt(text), excerpt(want)))
            }
            (Check::Exact(want), _) if text.trim() != want => {
                Err(format!("reply {:?} is not exactly {:?}", excerpt(text.trim()), excerpt(want)))
            }
            (Check::Regex(pattern), Matcher::Regex(re)) if !re.is_match(text) => {
                Err(format!("reply {:?} does not match /{}/", excerpt(text), excerpt(pattern)))
            }
            (_, Matcher::Schema(validator)) => judge_json(validator, text),
            (_, Matcher::Smoke) => judge_smoke(reply, control_tokens),
            _ => Ok(()),
        }
    }
}

/// One failed check of one golden prompt, as a device reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckFailure {
    /// The golden prompt's `id`.
    pub prompt: String,
    /// The check's position in the prompt's `checks`, from 1.
    pub check: u32,
    /// The check's label ([`Check::label`]).
    pub label: String,
    /// Why the reply fails it.
    pub reason: String,
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "prompt {:?} check {} ({}): {}", self.prompt, self.check, self.label, self.reason)
    }
}

/// Judges a reply against every check of a prompt: the failures, in check order (empty when it passes).
pub fn judge_all(
    prompt: &str,
    checks: &[CompiledCheck],
    reply: &Reply,
    control_tokens: &[String],
) -> Vec<CheckFailure> {
    checks
        .iter()
        .zip(1u32..)
        .filter_map(|(c, position)| {
            c.evaluate(reply, control_tokens).err().map(|reason| CheckFailure {
                prompt: prompt.to_owned(),
                check: position,
                label: c.check.label(),
                reason,
            })
        })
        .collect()
}

/// What llama-server answered to a golden prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub text: String,
    pub finish: FinishReason,
}

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// On an end-of-generation token, or on a stop word the chat template adds (which marks the end of a
    /// turn: golden prompts send no stop words of their own).
    EndOfTurn,
    /// At `max_tokens` or the end of the context.
    Limit,
    /// Anything else llama-server said (kept verbatim for the reason).
    Other(String),
}

impl FinishReason {
    /// From `/completion`'s `stop_type`: `eos` and `word` end a turn, `limit` is the limit.
    pub fn from_stop_type(stop_type: &str) -> FinishReason {
        match stop_type {
            "eos" | "word" => FinishReason::EndOfTurn,
            "limit" => FinishReason::Limit,
            other => FinishReason::Other(other.to_owned()),
        }
    }

    /// From an OpenAI-style `finish_reason`: llama-server says `stop` for an end-of-generation token or a
    /// stop word, `length` for the limit.
    pub fn from_finish_reason(finish_reason: &str) -> FinishReason {
        match finish_reason {
            "stop" => FinishReason::EndOfTurn,
            "length" => FinishReason::Limit,
            other => FinishReason::Other(other.to_owned()),
        }
    }
}

fn bounded_text(kind: &'static str, text: &str, max: usize) -> Result<(), CheckError> {
    if text.is_empty() {
        return Err(CheckError::EmptyText { kind });
    }
    if text.len() > max {
        return Err(CheckError::TooLong { kind, len: text.len(), max });
    }
    Ok(())
}

fn compile_regex(pattern: &str) -> Result<regex::Regex, CheckError> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| CheckError::Regex { pattern: excerpt(pattern), reason: e.to_string() })
}

/// Compiles a schema with the linear-time `regex` engine for `pattern` keywords (the default engine
/// backtracks) and without any way to fetch a referenced document (the crate's resolve features are off).
fn compile_schema(schema: &serde_json::Value) -> Result<jsonschema::Validator, CheckError> {
    jsonschema::options()
        .with_pattern_options(
            jsonschema::PatternOptions::regex().size_limit(REGEX_SIZE_LIMIT).dfa_size_limit(REGEX_SIZE_LIMIT),
        )
        .build(schema)
        .map_err(|e| CheckError::Schema { reason: e.to_string() })
}

fn judge_json(validator: &jsonschema::Validator, text: &str) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("reply {:?} is not JSON: {e}", excerpt(text.trim())))?;
    match validator.iter_errors(&value).next() {
        None => Ok(()),
        Some(error) => {
            let at = error.instance_path().to_string();
            let at = if at.is_empty() { "the top level".to_owned() } else { at };
            Err(format!("reply does not match the schema at {at}: {}", excerpt(&error.to_string())))
        }
    }
}

fn judge_smoke(reply: &Reply, control_tokens: &[String]) -> Result<(), String> {
    if reply.text.trim().is_empty() {
        return Err("reply is empty".to_owned());
    }
    if let Some(token) = control_tokens.iter().find(|t| !t.is_empty() && reply.text.contains(t.as_str())) {
        return Err(format!("reply {:?} echoes the control token {token:?}", excerpt(&reply.text)));
    }
    match &reply.finish {
        FinishReason::EndOfTurn => Ok(()),
        FinishReason::Limit => Err("generation stopped at the token limit, not on an end-of-turn token".to_owned()),
        FinishReason::Other(why) => Err(format!("generation ended with {why:?}, not on an end-of-turn token")),
    }
}

/// The first [`EXCERPT_CHARS`] characters, marked with `…` when cut.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(text: &str, finish: FinishReason) -> Reply {
        Reply { text: text.to_owned(), finish }
    }

    fn judge(check: Check, text: &str) -> Result<(), String> {
        CompiledCheck::compile(check).expect("compiles").evaluate(&reply(text, FinishReason::EndOfTurn), &[])
    }

    #[test]
    fn checks_parse_from_their_suite_form() {
        let checks: Vec<Check> = serde_json::from_value(json!([
            {"contains": "Paris"}, {"regex": "^\\d+$"}, {"exact": "4"},
            {"json_schema": {"type": "object"}}, "chat_template_smoke"
        ]))
        .expect("suite form");
        assert_eq!(checks[0], Check::Contains("Paris".into()));
        assert_eq!(checks[4], Check::ChatTemplateSmoke);
        let kinds: Vec<_> = checks.iter().map(Check::kind).collect();
        assert_eq!(kinds, ["contains", "regex", "exact", "json_schema", "chat_template_smoke"]);
        for bad in
            [json!({"contain": "x"}), json!({"contains": "x", "exact": "y"}), json!({"contains": 3}), json!("regex")]
        {
            assert!(serde_json::from_value::<Check>(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_checks_pass_and_fail_with_the_reply_quoted() {
        assert_eq!(judge(Check::Contains("Paris".into()), "It is Paris."), Ok(()));
        let why = judge(Check::Contains("Paris".into()), "It is Lyon.").expect_err("missing");
        assert!(why.contains("\"It is Lyon.\"") && why.contains("\"Paris\""), "{why}");
        assert_eq!(
            judge(Check::Contains("paris".into()), "Paris"),
            Err("reply \"Paris\" does not contain \"paris\"".into())
        );
        assert_eq!(judge(Check::Exact("4".into()), "  4\n"), Ok(()));
        assert!(judge(Check::Exact("4".into()), "4.").is_err());
        assert_eq!(judge(Check::Regex(r"^\s*\d+\s*$".into()), " 42 "), Ok(()));
        let why = judge(Check::Regex(r"^\d+$".into()), "forty-two").expect_err("no digits");
        assert!(why.contains(r"/^\d+$/"), "{why}");
    }

    #[test]
    fn json_schema_checks_need_valid_matching_json() {
        let schema = json!({"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}});
        assert_eq!(judge(Check::JsonSchema(schema.clone()), " {\"city\": \"Paris\"}\n"), Ok(()));
        let why = judge(Check::JsonSchema(schema.clone()), "{\"city\": 3}").expect_err("wrong type");
        assert!(why.contains("/city"), "{why}");
        let why = judge(Check::JsonSchema(schema.clone()), "{}").expect_err("missing field");
        assert!(why.contains("the top level") && why.contains("city"), "{why}");
        let why = judge(Check::JsonSchema(schema), "Sure! {\"city\": \"Paris\"}").expect_err("prose");
        assert!(why.contains("is not JSON"), "{why}");
    }

    #[test]
    fn the_smoke_check_needs_text_no_control_tokens_and_an_end_of_turn() {
        let smoke = CompiledCheck::compile(Check::ChatTemplateSmoke).expect("compiles");
        let tokens = ["<|im_end|>".to_owned(), String::new()];
        let ok = reply("Hello there.", FinishReason::EndOfTurn);
        assert_eq!(smoke.evaluate(&ok, &tokens), Ok(()));
        let why = smoke.evaluate(&reply(" \n", FinishReason::EndOfTurn), &tokens).expect_err("empty");
        assert_eq!(why, "reply is empty");
        let why = smoke.evaluate(&reply("Hi<|im_end|>user", FinishReason::EndOfTurn), &tokens).expect_err("echo");
        assert!(why.contains("\"<|im_end|>\""), "{why}");
        let why = smoke.evaluate(&reply("Hi", FinishReason::Limit), &tokens).expect_err("limit");
        assert!(why.contains("token limit"), "{why}");
        let why = smoke.evaluate(&reply("Hi", FinishReason::Other("none".into())), &tokens).expect_err("other");
        assert!(why.contains("\"none\""), "{why}");
    }

    #[test]
    fn finish_reasons_map_from_both_server_shapes() {
        assert_eq!(FinishReason::from_stop_type("eos"), FinishReason::EndOfTurn);
        assert_eq!(FinishReason::from_stop_type("word"), FinishReason::EndOfTurn);
        assert_eq!(FinishReason::from_stop_type("limit"), FinishReason::Limit);
        assert_eq!(FinishReason::from_stop_type("none"), FinishReason::Other("none".into()));
        assert_eq!(FinishReason::from_finish_reason("stop"), FinishReason::EndOfTurn);
        assert_eq!(FinishReason::from_finish_reason("length"), FinishReason::Limit);
        assert_eq!(FinishReason::from_finish_reason("tool_calls"), FinishReason::Other("tool_calls".into()));
    }

    #[test]
    fn bad_checks_are_refused_with_the_fix() {
        let err = CompiledCheck::compile(Check::Regex("(unclosed".into())).expect_err("bad regex");
        assert!(err.to_string().contains("fix the pattern"), "{err}");
        let err = CompiledCheck::compile(Check::Contains(String::new())).expect_err("empty");
        assert_eq!(err, CheckError::EmptyText { kind: "contains" });
        let err = CompiledCheck::compile(Check::Exact("x".repeat(MAX_TEXT_BYTES + 1))).expect_err("long");
        assert!(matches!(err, CheckError::TooLong { kind: "exact", .. }), "{err}");
        // A pattern that compiles to far more than the size limit.
        let err = CompiledCheck::compile(Check::Regex(r"\w{1000}\w{1000}\w{1000}".into())).expect_err("huge");
        assert!(matches!(err, CheckError::Regex { .. }), "{err}");
        let err = CompiledCheck::compile(Check::JsonSchema(json!({"type": "nonsense"}))).expect_err("bad schema");
        assert!(matches!(err, CheckError::Schema { .. }), "{err}");
        // A schema file that exists and is valid: refused all the same, since nothing is read from the device.
        let dir = tempfile::tempdir().expect("tempdir");
        let local = dir.path().join("schema.json");
        std::fs::write(&local, br#"{"type": "string"}"#).expect("write");
        let local = format!("file://{}", local.display());
        for remote in ["https://example.invalid/schema.json", local.as_str()] {
            let err = CompiledCheck::compile(Check::JsonSchema(json!({"$ref": remote}))).expect_err(remote);
            assert!(err.to_string().contains("inline any $ref"), "{err}");
        }
    }

    #[test]
    fn failures_name_the_prompt_and_the_check() {
        let checks: Vec<_> = [Check::Contains("a".into()), Check::Exact("b".into()), Check::Regex("c".into())]
            .into_iter()
            .map(|c| CompiledCheck::compile(c).expect("compiles"))
            .collect();
        let failures = judge_all("p1", &checks, &reply("a c", FinishReason::EndOfTurn), &[]);
        assert_eq!(failures.len(), 1);
        assert_eq!((failures[0].check, failures[0].label.as_str()), (2, "exact \"b\""));
        assert_eq!(failures[0].to_string(), "prompt \"p1\" check 2 (exact \"b\"): reply \"a c\" is not exactly \"b\"");
        assert!(judge_all("p1", &checks[..1], &reply("a", FinishReason::Limit), &[]).is_empty());
    }

    #[test]
    fn excerpts_are_bounded_on_character_boundaries() {
        let long = "é".repeat(200);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt("short"), "short");
    }
}
