//! Fuzzes what a device reads during a quality evaluation (stable Rust, proptest): eval suite files
//! (`suite.toml`, `prompts.jsonl`) with hostile values or random bytes, checks compiled from random
//! patterns and schemas and judged against random replies, llama-perplexity output with fragments of the
//! real summary shuffled into random text, and base-logits headers from random bytes. Everything is refused
//! with an error or accepted within the format's bounds, never a panic.
//!
//! `ALKI_FUZZ_CASES` sets the number of cases (default 256, what CI runs).

use alki_shared::eval::checks::{Check, CompiledCheck, FinishReason, Reply};
use alki_shared::eval::perplexity::{self, BaseLogitsHeader};
use alki_shared::eval::prompts::{self, PromptInput};
use alki_shared::eval::suite::{Suite, SuiteFiles, SuiteManifest};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

fn cases() -> u32 {
    std::env::var("ALKI_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

/// Strings a hostile suite could carry.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ._-]{0,20}",
        ".{0,200}",
        Just(String::new()),
        Just("(a+)+$".to_owned()),
        Just("\\w{500}\\w{500}".to_owned()),
        Just("<|im_end|>".to_owned()),
        Just("\u{0}".to_owned()),
    ]
}

/// JSON values of every type, nested a little.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z$]{1,8}", inner, 0..4).prop_map(|m| json!(m)),
        ]
    })
}

/// JSON Schemas, plausible and not.
fn schema() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"type": "object", "required": ["a"]})),
        Just(json!({"type": "string", "pattern": "^(a+)+$"})),
        Just(json!({"$ref": "#/$defs/x", "$defs": {"x": {"$ref": "#/$defs/x"}}})),
        Just(json!({"$ref": "file:///etc/passwd"})),
        Just(json!({"type": "string", "format": "email"})),
        json_value(),
    ]
}

fn check() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(|t| json!({"contains": t})),
        text().prop_map(|t| json!({"regex": t})),
        text().prop_map(|t| json!({"exact": t})),
        schema().prop_map(|s| json!({"json_schema": s})),
        Just(json!("chat_template_smoke")),
        json_value(),
    ]
}

fn prompt_line() -> impl Strategy<Value = Value> {
    let message = (prop_oneof![Just("user"), Just("system"), Just("assistant"), Just("robot")], text())
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    let input = prop_oneof![
        prop::collection::vec(message, 0..4).prop_map(|m| json!({"messages": m})),
        text().prop_map(|p| json!({"prompt": p})),
        Just(json!({})),
    ];
    let max_tokens = prop_oneof![Just(json!(16)), any::<i64>().prop_map(Value::from), json_value()];
    let id = prop_oneof!["[a-z0-9]{1,8}", text()];
    (id, input, max_tokens, prop::collection::vec(check(), 0..4), prop::option::of(json_value())).prop_map(
        |(id, mut line, max_tokens, checks, extra)| {
            line["id"] = json!(id);
            line["max_tokens"] = max_tokens;
            line["checks"] = json!(checks);
            if let Some(extra) = extra {
                line["extra"] = extra;
            }
            line
        },
    )
}

#[test]
fn hostile_prompt_lines_are_refused_or_accepted_within_bounds() {
    runner()
        .run(&prop::collection::vec(prompt_line(), 0..5), |lines| {
            let file: String = lines.iter().map(|l| format!("{l}\n")).collect();
            if let Ok(parsed) = prompts::parse_prompts(file.as_bytes(), 1 << 20) {
                prop_assert_eq!(parsed.len(), lines.len());
                for p in &parsed {
                    prop_assert!((1..=prompts::MAX_REPLY_TOKENS).contains(&p.max_tokens));
                    prop_assert!((1..=prompts::MAX_CHECKS).contains(&p.checks.len()));
                    let plain = matches!(p.input, PromptInput::Plain(_));
                    prop_assert!(!(plain && p.checks.iter().any(|c| *c.check() == Check::ChatTemplateSmoke)));
                }
            }
            Ok(())
        })
        .expect("no panic, bounds held");
}

#[test]
fn random_bytes_never_panic_the_suite_readers() {
    let bytes = prop::collection::vec(any::<u8>(), 0..600);
    runner()
        .run(&(bytes.clone(), bytes.clone(), bytes), |(manifest, corpus, prompts)| {
            let _ = SuiteManifest::parse(&manifest);
            let _ = prompts::parse_prompts(&prompts, 1 << 20);
            let _ = Suite::parse(SuiteFiles { manifest: &manifest, corpus: &corpus, prompts: &prompts });
            Ok(())
        })
        .expect("no panic");
}

#[test]
fn hostile_suite_manifests_are_refused_or_valid() {
    let value = prop_oneof![
        Just("\"smoke\"".to_owned()),
        Just("128".to_owned()),
        Just("-1".to_owned()),
        Just("4294967296".to_owned()),
        Just("\"../x\"".to_owned()),
        Just("[1, 2]".to_owned()),
        text().prop_map(|t| format!("{t:?}")),
    ];
    let key = prop_oneof![
        Just("name"),
        Just("version"),
        Just("corpus"),
        Just("prompts"),
        Just("context_size"),
        Just("chunks"),
        Just("time_budget_seconds"),
        Just("seed"),
        Just("temperature"),
    ];
    runner()
        .run(&prop::collection::vec((key, value), 0..10), |pairs| {
            let text: String = pairs.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
            if let Ok(manifest) = SuiteManifest::parse(text.as_bytes()) {
                prop_assert!(manifest.validate().is_ok());
                prop_assert!(manifest.scored_tokens() >= 100);
            }
            Ok(())
        })
        .expect("no panic, valid when accepted");
}

#[test]
fn random_checks_judge_random_replies_without_panicking() {
    let finish =
        prop_oneof![Just(FinishReason::EndOfTurn), Just(FinishReason::Limit), text().prop_map(FinishReason::Other)];
    runner()
        .run(&(check(), text(), finish, prop::collection::vec(text(), 0..3)), |(check, reply, finish, tokens)| {
            if let Ok(check) = serde_json::from_value::<Check>(check)
                && let Ok(compiled) = CompiledCheck::compile(check)
            {
                let _ = compiled.evaluate(&Reply { text: reply, finish }, &tokens);
            }
            Ok(())
        })
        .expect("no panic");
}

/// Lines of the real KL-divergence summary, to shuffle into random text.
const SUMMARY_LINES: &[&str] = &[
    "====== Perplexity statistics ======",
    "Mean PPL(Q)                   : 32107.134985 \u{b1}  88.200576",
    "Mean PPL(base)                : 32107.124960 \u{b1}  88.242797",
    "Mean PPL(Q)/PPL(base)         :   1.000000 \u{b1}       -nan",
    "Mean    KLD:   0.000000 \u{b1}   0.000000",
    "99.0%   KLD:   0.000002",
    "Maximum KLD:   0.000002",
    "Median  KLD:   0.000000",
    "Same top p: 98.214 \u{b1} 0.417 %",
    "Final estimate: PPL = 32107.1245 +/- 88.24379",
    "perplexity: you need at least 256 tokens to evaluate perplexity with a context of 128",
    "kl_divergence: failed reading log-probs for chunk 99999999999999999999999",
    "Same top p: \u{b1} %",
    "Mean    KLD: \u{b1}\u{b1}",
];

#[test]
fn tool_output_never_panics_the_parsers() {
    let line = prop_oneof![3 => prop::sample::select(SUMMARY_LINES).prop_map(str::to_owned), 1 => ".{0,80}"];
    let output = prop::collection::vec(line, 0..20).prop_map(|lines| lines.join("\n"));
    runner()
        .run(&(output.clone(), output), |(stdout, stderr)| {
            let _ = perplexity::parse_perplexity(&stdout, &stderr);
            if perplexity::parse_kl_divergence(&stdout, &stderr).is_ok() {
                prop_assert!(stdout.contains("====== Perplexity statistics ======"));
            }
            Ok(())
        })
        .expect("no panic");
}

#[test]
fn base_logits_headers_from_random_bytes() {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        prop::collection::vec(any::<u8>(), 12).prop_map(|tail| [b"_logits_".as_slice(), &tail].concat()),
    ];
    runner()
        .run(&(bytes, any::<u64>(), any::<u32>(), any::<u32>()), |(bytes, len, ctx, chunks)| {
            if let Ok(header) = BaseLogitsHeader::read(&bytes[..]) {
                prop_assert!(bytes.starts_with(b"_logits_"));
                prop_assert!(header.n_ctx > 0 && header.n_vocab > 0 && header.n_chunk > 0);
                let _ = header.check(len, ctx, chunks, None);
            }
            Ok(())
        })
        .expect("no panic");
}
