//! What an evaluation reads from a model's GGUF: its vocabulary size (a baseline's logits compare only with a
//! candidate of the same vocabulary) and the control tokens its chat template writes (a reply must not echo
//! them).

use std::collections::BTreeSet;
use std::path::Path;

use alki_shared::gguf::{self, ArrayValues, Value};

const TOKENS: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPES: &str = "tokenizer.ggml.token_type";
const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
/// llama.cpp's token type of control tokens (`<s>`, `<|im_end|>`).
const CONTROL: i32 = 3;
/// Control tokens kept: a template uses a handful.
const MAX_CONTROL_TOKENS: usize = 64;
/// Longest marker taken from a template's text.
const MAX_MARKER_CHARS: usize = 40;

/// A model's vocabulary as far as an evaluation needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vocab {
    /// Tokens in the vocabulary; None when the GGUF cannot be read.
    pub n_vocab: Option<u32>,
    /// Control tokens its chat template writes, and `<|…|>` markers in the template's text.
    pub control_tokens: Vec<String>,
}

/// Reads `model`'s vocabulary (off the async threads); what cannot be read is left empty.
pub async fn read(model: &Path) -> Vocab {
    let path = model.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        gguf::read_file_with_arrays(&path, |key| key == TOKENS || key == TOKEN_TYPES)
    })
    .await;
    match read {
        Ok(Ok(file)) => of_file(&file),
        Ok(Err(e)) => {
            tracing::warn!(model = %model.display(), error = %e, "Cannot read the model's vocabulary.");
            Vocab::default()
        }
        Err(_) => Vocab::default(),
    }
}

fn of_file(file: &gguf::GgufFile) -> Vocab {
    let array = |key| match file.get(key) {
        Some(Value::Array(a)) => Some(a),
        _ => None,
    };
    let tokens = array(TOKENS);
    let n_vocab = tokens.and_then(|a| u32::try_from(a.len).ok());
    let texts = match tokens.and_then(|a| a.values.as_ref()) {
        Some(ArrayValues::String(v)) => v.as_slice(),
        _ => &[],
    };
    let types = match array(TOKEN_TYPES).and_then(|a| a.values.as_ref()) {
        Some(ArrayValues::I32(v)) => v.as_slice(),
        _ => &[],
    };
    let template = file.get_str(CHAT_TEMPLATE).unwrap_or_default();
    Vocab { n_vocab, control_tokens: control_tokens(template, texts, types) }
}

/// The control tokens of the vocabulary that `template` writes, and the `<|…|>` markers in its text (a
/// template may write markers the vocabulary does not hold as tokens), sorted, at most
/// [`MAX_CONTROL_TOKENS`].
pub fn control_tokens(template: &str, tokens: &[String], types: &[i32]) -> Vec<String> {
    let mut found = BTreeSet::new();
    for (token, kind) in tokens.iter().zip(types) {
        if *kind == CONTROL && token.len() > 1 && template.contains(token.as_str()) {
            found.insert(token.clone());
        }
    }
    let mut rest = template;
    while let Some(start) = rest.find("<|") {
        let after = &rest[start + 2..];
        match after.find("|>") {
            Some(end) if end > 0 && after[..end].chars().count() <= MAX_MARKER_CHARS => {
                let inner = &after[..end];
                if !inner.contains(['<', '>', '\'', '"', ' ', '\n', '{', '}']) {
                    found.insert(format!("<|{inner}|>"));
                }
                rest = &after[end + 2..];
            }
            _ => rest = after,
        }
    }
    found.into_iter().take(MAX_CONTROL_TOKENS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_tokens_are_those_the_template_writes() {
        let chatml = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}\
                      {% endfor %}{{ '<|im_start|>assistant\\n' }}";
        let tokens = ["<unk>", "<s>", "</s>", "<|im_end|>", "hello"].map(str::to_owned);
        let types = [2, 3, 3, 3, 1];
        assert_eq!(control_tokens(chatml, &tokens, &types), ["<|im_end|>", "<|im_start|>"]);
        let llama2 = "{{ bos_token }}[INST] {{ m['content'] }} [/INST]{{ '</s>' }}";
        assert_eq!(control_tokens(llama2, &tokens, &types), ["</s>"], "a control token the template writes");
        assert!(control_tokens("", &tokens, &types).is_empty());
        assert!(control_tokens("<|unclosed <|a b|> <||>", &[], &[]).is_empty(), "no marker without a plain name");
    }
}
