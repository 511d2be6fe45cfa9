//! `alkictl completion bash` as a shell uses it: the script loads in bash and completes subcommands and the
//! connection options after a subcommand.

use std::process::Command;

fn script(shell: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_alkictl")).args(["completion", shell]).output().expect("alkictl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// What bash offers for the words typed so far (the last one being completed).
fn complete(script: &str, words: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("alkictl.bash");
    std::fs::write(&path, script).expect("write the script");
    let cword = words.len() - 1;
    let program = format!(
        "source {path:?}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE=\"{line}\"; COMP_POINT=${{#COMP_LINE}}; \
         _alkictl alkictl \"{current}\" \"{previous}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words = words.iter().map(|w| format!("{w:?}")).collect::<Vec<_>>().join(" "),
        line = words.join(" "),
        current = words[cword],
        previous = words[cword.saturating_sub(1)],
    );
    let out = Command::new("bash").args(["--norc", "-c", &program]).output().expect("bash runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
}

#[test]
fn bash_completes_commands_subcommands_and_connection_options() {
    let bash = script("bash");
    assert!(complete(&bash, &["alkictl", "bun"]).contains(&"bundle".to_owned()));
    let offered = complete(&bash, &["alkictl", "bundle", ""]);
    for sub in ["pack", "push", "sign", "inspect", "list"] {
        assert!(offered.contains(&sub.to_owned()), "{sub} in {offered:?}");
    }
    let offered = complete(&bash, &["alkictl", "bundle", "push", "--tok"]);
    assert!(offered.contains(&"--token-file".to_owned()), "{offered:?}");
}

#[test]
fn zsh_and_fish_scripts_name_the_command() {
    assert!(script("zsh").starts_with("#compdef alkictl"));
    assert!(script("fish").contains("complete -c alkictl"));
}
