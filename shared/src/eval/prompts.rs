//! Golden prompts: the `prompts.jsonl` format (one prompt per line), read strictly and bounded, and how a
//! prompt is asked of llama-server deterministically and its answer read back into a [`Reply`].
//!
//! A line is `{"id": "capital", "messages": [{"role": "user", "content": "..."}], "max_tokens": 16,
//! "checks": [{"contains": "Paris"}, "chat_template_smoke"]}`, or with `"prompt": "..."` instead of
//! `messages` for a plain completion (base models). Blank lines are skipped.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::checks::{self, Check, CheckFailure, CompiledCheck, FinishReason, Reply};

/// Most prompts in one suite.
pub const MAX_PROMPTS: usize = 1_000;
/// Longest line of `prompts.jsonl`, in bytes (a prompt with its messages and checks).
pub const MAX_LINE_BYTES: usize = 64 << 10;
/// Most checks on one prompt.
pub const MAX_CHECKS: usize = 16;
/// Most chat messages in one prompt.
pub const MAX_MESSAGES: usize = 32;
/// Largest `max_tokens` of one prompt: golden replies are short, and the suite's time budget is shared.
pub const MAX_REPLY_TOKENS: u32 = 4_096;
/// Longest prompt id, in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// Golden prompts are sampled greedily: temperature 0 keeps only the most likely token, so a reply depends
/// on the model, the template and the build only. Part of the format, not a setting.
pub const TEMPERATURE: f64 = 0.0;

/// A chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// What is asked: chat messages (rendered by the model's chat template) or a plain completion prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptInput {
    Chat(Vec<Message>),
    Plain(String),
}

/// One golden prompt, its checks compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct GoldenPrompt {
    pub id: String,
    pub input: PromptInput,
    pub max_tokens: u32,
    pub checks: Vec<CompiledCheck>,
}

/// A line as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrompt {
    id: String,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<String>,
    max_tokens: u32,
    checks: Vec<Check>,
}

/// Why `prompts.jsonl` is refused: where (line, prompt, field), what is wrong and what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromptsError {
    #[error("prompts file is {len} bytes, over the limit of {max}; keep golden prompts few and short")]
    TooLarge { len: usize, max: usize },
    #[error("prompts file has more than {max} prompts; split the suite")]
    TooMany { max: usize },
    #[error("prompts file line {line}{}: {field}: {problem}; {fix}", prompt_suffix(.prompt))]
    Invalid { line: usize, prompt: Option<String>, field: String, problem: String, fix: String },
}

fn prompt_suffix(prompt: &Option<String>) -> String {
    prompt.as_ref().map(|id| format!(" (prompt {id:?})")).unwrap_or_default()
}

/// Reads `prompts.jsonl`: every line a valid prompt, ids unique, sizes within the caps, every check compiled.
pub fn parse_prompts(bytes: &[u8], max_bytes: usize) -> Result<Vec<GoldenPrompt>, PromptsError> {
    if bytes.len() > max_bytes {
        return Err(PromptsError::TooLarge { len: bytes.len(), max: max_bytes });
    }
    let mut prompts = Vec::new();
    let mut ids = HashSet::new();
    for (index, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line_no = index + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if prompts.len() == MAX_PROMPTS {
            return Err(PromptsError::TooMany { max: MAX_PROMPTS });
        }
        let prompt = parse_line(line_no, line)?;
        if !ids.insert(prompt.id.clone()) {
            return Err(invalid(
                line_no,
                Some(&prompt.id),
                "id",
                "repeats an earlier prompt's id",
                "give every prompt its own id",
            ));
        }
        prompts.push(prompt);
    }
    Ok(prompts)
}

fn invalid(line: usize, prompt: Option<&str>, field: &str, problem: impl Into<String>, fix: &str) -> PromptsError {
    PromptsError::Invalid {
        line,
        prompt: prompt.map(str::to_owned),
        field: field.to_owned(),
        problem: problem.into(),
        fix: fix.to_owned(),
    }
}

fn parse_line(line_no: usize, line: &[u8]) -> Result<GoldenPrompt, PromptsError> {
    if line.len() > MAX_LINE_BYTES {
        let problem = format!("the line is {} bytes, over the limit of {MAX_LINE_BYTES}", line.len());
        return Err(invalid(line_no, None, "line", problem, "shorten the prompt, its messages or its schema"));
    }
    let raw: RawPrompt = serde_json::from_slice(line).map_err(|e| {
        let fix = "write one JSON object per line with id, messages or prompt, max_tokens and checks";
        invalid(line_no, None, "line", e.to_string(), fix)
    })?;
    let id = raw.id.as_str();
    let valid_id = (1..=MAX_ID_BYTES).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid_id {
        let fix = "use 1 to 64 characters from a-z, A-Z, 0-9, '.', '_' and '-'";
        return Err(invalid(line_no, None, "id", format!("{id:?} is not a valid prompt id"), fix));
    }
    let err = |field: &str, problem: String, fix: &str| invalid(line_no, Some(id), field, problem, fix);
    let input = match (raw.messages, raw.prompt) {
        (Some(messages), None) => chat_input(messages).map_err(|(problem, fix)| err("messages", problem, fix))?,
        (None, Some(prompt)) if !prompt.is_empty() => PromptInput::Plain(prompt),
        (None, Some(_)) => return Err(err("prompt", "is empty".into(), "give the text to complete")),
        _ => {
            let fix = "give messages for a chat model or prompt for a plain completion";
            return Err(err("messages", "exactly one of messages and prompt is needed".into(), fix));
        }
    };
    if !(1..=MAX_REPLY_TOKENS).contains(&raw.max_tokens) {
        let problem = format!("{} is outside 1..={MAX_REPLY_TOKENS}", raw.max_tokens);
        return Err(err("max_tokens", problem, "golden replies are short: ask for a few dozen tokens"));
    }
    let checks = compile_checks(raw.checks, &input).map_err(|(field, problem, fix)| err(&field, problem, fix))?;
    Ok(GoldenPrompt { id: raw.id, input, max_tokens: raw.max_tokens, checks })
}

fn chat_input(messages: Vec<Message>) -> Result<PromptInput, (String, &'static str)> {
    if messages.is_empty() || messages.len() > MAX_MESSAGES {
        return Err((format!("has {} messages", messages.len()), "give 1 to 32 messages"));
    }
    if messages.last().map(|m| m.role) == Some(Role::Assistant) {
        let fix = "end with a user message: the model writes the assistant's turn";
        return Err(("ends with an assistant message".to_owned(), fix));
    }
    Ok(PromptInput::Chat(messages))
}

fn compile_checks(
    checks: Vec<Check>,
    input: &PromptInput,
) -> Result<Vec<CompiledCheck>, (String, String, &'static str)> {
    if checks.is_empty() || checks.len() > MAX_CHECKS {
        let problem = format!("has {} checks", checks.len());
        return Err(("checks".to_owned(), problem, "give 1 to 16 checks: a prompt without one proves nothing"));
    }
    checks
        .into_iter()
        .zip(1..)
        .map(|(check, position)| {
            let field = format!("checks[{position}] ({})", check.kind());
            if check == Check::ChatTemplateSmoke && matches!(input, PromptInput::Plain(_)) {
                let fix = "use it on a prompt with messages";
                return Err((field, "a plain prompt has no chat template to check".to_owned(), fix));
            }
            CompiledCheck::compile(check).map_err(|e| (field, e.to_string(), "see the problem above"))
        })
        .collect()
}

/// A request to the loopback llama-server: POST `path` with the JSON `body`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaRequest {
    pub path: &'static str,
    pub body: serde_json::Value,
}

/// Why llama-server's answer could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("llama-server's answer to {path} cannot be read: {problem}")]
pub struct ReplyError {
    pub path: &'static str,
    pub problem: String,
}

/// llama-server's chat endpoint (renders the chat template).
pub const CHAT_PATH: &str = "/v1/chat/completions";
/// llama-server's native completion endpoint (says `stop_type`, which tells `eos` from `limit`).
pub const COMPLETION_PATH: &str = "/completion";

impl GoldenPrompt {
    /// The deterministic request: temperature 0, the suite's seed, no prompt cache (cached and uncached
    /// logits may differ), no streaming.
    pub fn request(&self, seed: u32) -> LlamaRequest {
        let common = json!({"temperature": TEMPERATURE, "seed": seed, "cache_prompt": false, "stream": false});
        let (path, mut body) = match &self.input {
            PromptInput::Chat(messages) => (CHAT_PATH, json!({"messages": messages, "max_tokens": self.max_tokens})),
            PromptInput::Plain(prompt) => (COMPLETION_PATH, json!({"prompt": prompt, "n_predict": self.max_tokens})),
        };
        if let (Some(body), Some(common)) = (body.as_object_mut(), common.as_object()) {
            body.extend(common.clone());
        }
        LlamaRequest { path, body }
    }

    /// Reads llama-server's answer to [`GoldenPrompt::request`].
    pub fn read_reply(&self, answer: &[u8]) -> Result<Reply, ReplyError> {
        let path = match self.input {
            PromptInput::Chat(_) => CHAT_PATH,
            PromptInput::Plain(_) => COMPLETION_PATH,
        };
        let problem = |problem: String| ReplyError { path, problem };
        let value: serde_json::Value = serde_json::from_slice(answer).map_err(|e| problem(e.to_string()))?;
        let text_and_finish = match self.input {
            PromptInput::Chat(_) => {
                let choice = &value["choices"][0];
                // A reply of only a tool call or only reasoning has null content: an empty reply.
                let text = choice["message"]["content"].as_str().unwrap_or_default();
                choice["finish_reason"].as_str().map(|f| (text, FinishReason::from_finish_reason(f)))
            }
            PromptInput::Plain(_) => {
                let text = value["content"].as_str();
                text.zip(value["stop_type"].as_str().map(FinishReason::from_stop_type))
            }
        };
        let (text, finish) =
            text_and_finish.ok_or_else(|| problem("no reply text and finish reason where expected".to_owned()))?;
        Ok(Reply { text: text.to_owned(), finish })
    }

    /// Judges a reply against every check: the failures, empty when the prompt passes.
    pub fn judge(&self, reply: &Reply, control_tokens: &[String]) -> Vec<CheckFailure> {
        checks::judge_all(&self.id, &self.checks, reply, control_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<GoldenPrompt>, PromptsError> {
        parse_prompts(text.as_bytes(), 1 << 20)
    }

    fn field_of(err: PromptsError) -> (usize, String) {
        match err {
            PromptsError::Invalid { line, field, .. } => (line, field),
            other => panic!("expected an invalid line, got {other}"),
        }
    }

    const GOOD: &str = r#"{"id":"capital","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Capital of France?"}],"max_tokens":16,"checks":[{"contains":"Paris"},"chat_template_smoke"]}

{"id":"count","prompt":"1, 2, 3,","max_tokens":4,"checks":[{"regex":"^\\s*4"}]}
"#;

    #[test]
    fn reads_chat_and_plain_prompts_skipping_blank_lines() {
        let prompts = parse(GOOD).expect("valid");
        assert_eq!(prompts.len(), 2);
        assert_eq!(prompts[0].id, "capital");
        assert!(matches!(&prompts[0].input, PromptInput::Chat(m) if m.len() == 2 && m[1].role == Role::User));
        assert_eq!(prompts[0].checks.len(), 2);
        assert_eq!(prompts[1].input, PromptInput::Plain("1, 2, 3,".into()));
        assert_eq!(prompts[1].max_tokens, 4);
        assert!(parse("").expect("empty file").is_empty());
    }

    #[test]
    fn bad_lines_name_the_line_the_prompt_and_the_field() {
        let line = |s: &str| format!("{}\n{s}\n", GOOD.lines().next().expect("first line"));
        let cases = [
            (r#"{"id":"x","prompt":"a","max_tokens":4,"checks":[{"exact":"b"}],"temperature":1}"#, "line"),
            (r#"{"id":"bad id","prompt":"a","max_tokens":4,"checks":[{"exact":"b"}]}"#, "id"),
            (r#"{"id":"capital","prompt":"a","max_tokens":4,"checks":[{"exact":"b"}]}"#, "id"),
            (r#"{"id":"x","max_tokens":4,"checks":[{"exact":"b"}]}"#, "messages"),
            (r#"{"id":"x","prompt":"a","messages":[],"max_tokens":4,"checks":[{"exact":"b"}]}"#, "messages"),
            (r#"{"id":"x","messages":[],"max_tokens":4,"checks":[{"exact":"b"}]}"#, "messages"),
            (
                r#"{"id":"x","messages":[{"role":"assistant","content":"hi"}],"max_tokens":4,"checks":[{"exact":"b"}]}"#,
                "messages",
            ),
            (
                r#"{"id":"x","messages":[{"role":"robot","content":"hi"}],"max_tokens":4,"checks":[{"exact":"b"}]}"#,
                "line",
            ),
            (r#"{"id":"x","prompt":"","max_tokens":4,"checks":[{"exact":"b"}]}"#, "prompt"),
            (r#"{"id":"x","prompt":"a","max_tokens":0,"checks":[{"exact":"b"}]}"#, "max_tokens"),
            (r#"{"id":"x","prompt":"a","max_tokens":99999,"checks":[{"exact":"b"}]}"#, "max_tokens"),
            (r#"{"id":"x","prompt":"a","max_tokens":4,"checks":[]}"#, "checks"),
            (
                r#"{"id":"x","prompt":"a","max_tokens":4,"checks":["chat_template_smoke"]}"#,
                "checks[1] (chat_template_smoke)",
            ),
            (r#"{"id":"x","prompt":"a","max_tokens":4,"checks":[{"exact":"b"},{"regex":"("}]}"#, "checks[2] (regex)"),
            ("not json", "line"),
        ];
        for (bad, field) in cases {
            let err = parse(&line(bad)).expect_err(bad);
            let text = err.to_string();
            assert_eq!(field_of(err), (2, field.to_owned()), "{bad}: {text}");
            assert!(text.starts_with("prompts file line 2"), "{text}");
        }
        let err =
            parse(&line(r#"{"id":"x","prompt":"a","max_tokens":4,"checks":[{"regex":"("}]}"#)).expect_err("regex");
        assert!(err.to_string().contains("(prompt \"x\"): checks[1] (regex): regex \"(\" does not compile"), "{err}");
    }

    #[test]
    fn sizes_are_capped() {
        let err = parse_prompts(GOOD.as_bytes(), 10).expect_err("file cap");
        assert_eq!(err, PromptsError::TooLarge { len: GOOD.len(), max: 10 });
        let long = format!(
            r#"{{"id":"x","prompt":"{}","max_tokens":4,"checks":[{{"exact":"b"}}]}}"#,
            "a".repeat(MAX_LINE_BYTES)
        );
        assert_eq!(field_of(parse(&long).expect_err("line cap")).1, "line");
        let many: String = (0..=MAX_PROMPTS)
            .map(|i| {
                format!("{{\"id\":\"p{i}\",\"prompt\":\"a\",\"max_tokens\":1,\"checks\":[{{\"exact\":\"b\"}}]}}\n")
            })
            .collect();
        assert_eq!(parse(&many).expect_err("count cap"), PromptsError::TooMany { max: MAX_PROMPTS });
    }

    #[test]
    fn requests_are_deterministic_and_shaped_per_endpoint() {
        let prompts = parse(GOOD).expect("valid");
        let chat = prompts[0].request(42);
        assert_eq!(chat.path, "/v1/chat/completions");
        assert_eq!(chat.body["max_tokens"], 16);
        assert_eq!(chat.body["messages"][1]["content"], "Capital of France?");
        let plain = prompts[1].request(42);
        assert_eq!(plain.path, "/completion");
        assert_eq!((plain.body["prompt"].as_str(), plain.body["n_predict"].as_u64()), (Some("1, 2, 3,"), Some(4)));
        for body in [&chat.body, &plain.body] {
            assert_eq!(body["temperature"], 0.0);
            assert_eq!(body["seed"], 42);
            assert_eq!(body["cache_prompt"], false);
            assert_eq!(body["stream"], false);
        }
    }

    #[test]
    fn replies_are_read_from_both_endpoints_and_judged() {
        let prompts = parse(GOOD).expect("valid");
        let chat_answer =
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}]}"#;
        let reply = prompts[0].read_reply(chat_answer).expect("chat answer");
        assert_eq!(reply, Reply { text: "Paris.".into(), finish: FinishReason::EndOfTurn });
        assert!(prompts[0].judge(&reply, &["<|im_end|>".into()]).is_empty());
        let cut = br#"{"choices":[{"message":{"content":"Lyon, I think, and"},"finish_reason":"length"}]}"#;
        let failures = prompts[0].judge(&prompts[0].read_reply(cut).expect("chat answer"), &[]);
        let labels: Vec<_> = failures.iter().map(|f| (f.check, f.label.as_str())).collect();
        assert_eq!(labels, [(1, "contains \"Paris\""), (2, "chat_template_smoke")]);

        let plain_answer = br#"{"content":" 4, 5","stop_type":"limit","tokens_predicted":4}"#;
        let reply = prompts[1].read_reply(plain_answer).expect("completion answer");
        assert_eq!(reply.finish, FinishReason::Limit);
        assert!(prompts[1].judge(&reply, &[]).is_empty(), "the regex check ignores the finish reason");
        let err = prompts[1].read_reply(br#"{"error":{"code":500}}"#).expect_err("error body");
        assert_eq!(err.path, "/completion");
        assert!(prompts[0].read_reply(b"<html>").is_err());
    }

    /// Answers of the real llama-server (`tests/fixtures/eval/README.md`) to this prompt at `max_tokens` 8:
    /// the tiny model A under ChatML, and B3 (A's weights under a mismatched template).
    #[test]
    fn real_answers_read_back_and_a_golden_reply_recorded_on_a_fails_on_b3() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/eval/");
        let answer = |name: &str| std::fs::read(format!("{dir}{name}")).expect("fixture");
        let recorded = r#"{"id":"capital","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":8,"checks":[{"exact":"utilizigarekim protocolearchспорт largevre"}]}"#;
        let prompt = &parse(recorded).expect("valid")[0];
        let on_a = prompt.read_reply(&answer("chat_reply_a.json")).expect("A's answer");
        assert_eq!(on_a.finish, FinishReason::Limit, "a random model runs to max_tokens");
        assert!(prompt.judge(&on_a, &[]).is_empty(), "{:?}", prompt.judge(&on_a, &[]));
        let on_b3 = prompt.read_reply(&answer("chat_reply_b3.json")).expect("B3's answer");
        let failures = prompt.judge(&on_b3, &[]);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].reason.contains("Premgodarten"), "{}", failures[0]);

        let plain = &parse(GOOD).expect("valid")[1];
        let reply = plain.read_reply(&answer("completion_reply_a.json")).expect("completion answer");
        assert_eq!((reply.text.as_str(), &reply.finish), (" Champcould levelenez", &FinishReason::Limit));
    }
}
