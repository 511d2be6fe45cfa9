//! Secrets out of the agent's config before it leaves the device in a support bundle (pure): every value
//! whose key names a secret (tokens, passwords, keys, credentials) is replaced, whole tables included, and
//! nothing a key points to (a key file, a password file) is ever read.

/// What replaces a redacted value.
pub const REDACTED: &str = "<redacted>";

/// Parts of key names that mark a secret or the path of one. Broad on purpose: a path redacted needlessly
/// costs the reader little; a secret kept costs the fleet.
const SECRET_WORDS: &[&str] =
    &["token", "password", "passwd", "secret", "key", "credential", "auth", "private", "cert", "identity"];

/// Whether a key names a secret (or a file holding one).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|word| key.contains(word))
}

/// The config text with every secret value replaced, as TOML. Text that does not parse is not included
/// at all (it could be anything), only a note saying so.
pub fn redact_config(text: &str) -> String {
    match text.parse::<toml::Table>() {
        Ok(mut table) => {
            redact_table(&mut table);
            toml::to_string_pretty(&table).unwrap_or_else(|e| format!("# the redacted config did not serialise: {e}\n"))
        }
        Err(_) => "# the config file does not parse as TOML; it is left out rather than risk a secret in it\n".into(),
    }
}

fn redact_table(table: &mut toml::Table) {
    for (key, value) in table.iter_mut() {
        if is_secret_key(key) {
            *value = toml::Value::String(REDACTED.into());
        } else {
            redact_value(value);
        }
    }
}

fn redact_value(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => redact_table(table),
        toml::Value::Array(items) => {
            redact_flags(items);
            items.iter_mut().for_each(redact_value);
        }
        _ => {}
    }
}

/// Command-line arguments in a list (`extra_args`): the value of a flag naming a secret (`--api-key K`,
/// `--hf-token=T`) is replaced.
fn redact_flags(items: &mut [toml::Value]) {
    let mut secret_next = false;
    for item in items.iter_mut() {
        let toml::Value::String(text) = item else {
            secret_next = false;
            continue;
        };
        if secret_next {
            *text = REDACTED.into();
            secret_next = false;
            continue;
        }
        if text.starts_with('-') && is_secret_key(text) {
            match text.split_once('=') {
                Some((flag, _)) => *text = format!("{flag}={REDACTED}"),
                None => secret_next = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_by_key_name_at_any_depth() {
        let text = r#"
data_dir = "/var/lib/alki"
[controller]
url = "https://ctl:7070"
token_file = "/etc/alki/agent.token"
bootstrap_token_file = "/etc/alki/bootstrap.token"
[registry.credentials."reg.example:5000"]
username = "robot"
password_file = "/etc/alki/reg.pass"
[runtime]
llama_server = "/usr/bin/llama-server"
api_keys_file = "/etc/alki/keys"
extra_args = ["--api-key", "sk-inline"]
"#;
        let out = redact_config(text);
        for secret in ["agent.token", "bootstrap.token", "robot", "reg.pass", "/etc/alki/keys"] {
            assert!(!out.contains(secret), "{secret} leaked:\n{out}");
        }
        assert!(out.contains("https://ctl:7070") && out.contains("/usr/bin/llama-server"), "{out}");
        assert_eq!(redact_config("not = [toml"), redact_config("neither = {"));
    }
}
