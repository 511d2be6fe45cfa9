//! The llama.cpp build an evaluation runs on: `llama-perplexity` of the build the model runs on (the runtime
//! build's directory, whose archive carries every binary of the build directory, or beside the configured
//! llama-server), and which build that is, for the result.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use alki_shared::eval::quality::CouldNotRun;

use crate::settings::LaunchSettings;

/// The tool's file name in a llama.cpp build directory.
pub const PERPLEXITY: &str = "llama-perplexity";
/// Bound on `llama-perplexity --version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// `llama-perplexity` of one llama.cpp build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tool {
    pub path: PathBuf,
    /// A runtime build's directory, given as `LD_LIBRARY_PATH` so its own libraries are loaded.
    pub library_dir: Option<PathBuf>,
    /// Which build: `llama.cpp <version>`, and for a runtime build its digest.
    pub build: String,
}

impl Tool {
    /// A command running the tool, with the build's libraries.
    pub fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.path);
        if let Some(dir) = &self.library_dir {
            command.env("LD_LIBRARY_PATH", dir);
        }
        command
    }
}

/// `llama-perplexity` beside the llama-server that `settings` run (`configured` unless a runtime build is
/// named); [`CouldNotRun::ToolMissing`] when that build has none.
pub async fn find(settings: &LaunchSettings, configured: &Path) -> Result<Tool, CouldNotRun> {
    let server = settings.program(configured);
    let dir = server.parent().unwrap_or(Path::new("."));
    let path = dir.join(PERPLEXITY);
    let executable = tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if !executable {
        tracing::warn!(dir = %dir.display(), "The llama.cpp build has no llama-perplexity; it cannot evaluate quality.");
        return Err(CouldNotRun::ToolMissing { tool: PERPLEXITY.to_owned() });
    }
    let library_dir = settings.llama_server.as_ref().map(|_| dir.to_owned());
    let mut tool = Tool { path, library_dir, build: String::new() };
    let version = version(&tool).await;
    tool.build = match &tool.library_dir {
        // Runtime builds are extracted into `runtime-builds/<tar layer hex>/`.
        Some(dir) => {
            let hex = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            format!("llama.cpp {version}, runtime build sha256:{}", &hex[..hex.len().min(12)])
        }
        None => format!("llama.cpp {version}"),
    };
    Ok(tool)
}

/// The build's version as `--version` prints it (`0.6.0-dev (build 0, commit unknown)`), or `unknown`.
async fn version(tool: &Tool) -> String {
    let mut command = tool.command();
    command.arg("--version").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let output = match command.spawn() {
        Ok(child) => tokio::time::timeout(VERSION_TIMEOUT, child.wait_with_output()).await.ok().and_then(Result::ok),
        Err(_) => None,
    };
    let Some(output) = output else { return "unknown version".to_owned() };
    version_line(&String::from_utf8_lossy(&output.stderr))
        .or_else(|| version_line(&String::from_utf8_lossy(&output.stdout)))
        .unwrap_or_else(|| "unknown version".to_owned())
}

fn version_line(text: &str) -> Option<String> {
    let line = text.lines().find_map(|l| l.trim().strip_prefix("version: "))?;
    Some(line.chars().take(120).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(server: Option<PathBuf>) -> LaunchSettings {
        LaunchSettings {
            context_size: 0,
            threads: 0,
            gpu_layers: 0,
            parallel_slots: 1,
            chat_template: None,
            llama_server: server,
            runtime_platform: None,
        }
    }

    fn executable(path: &Path, script: &str) {
        std::fs::write(path, script).expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[tokio::test]
    async fn the_tool_is_found_beside_the_server_the_model_runs_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let configured = dir.path().join("bin/llama-server");
        std::fs::create_dir_all(configured.parent().expect("bin")).expect("mkdir");
        executable(&configured, "#!/bin/sh\n");
        let missing = find(&settings(None), &configured).await.expect_err("no tool beside it");
        assert_eq!(missing, CouldNotRun::ToolMissing { tool: "llama-perplexity".into() });

        let build = dir.path().join("runtime-builds/abcdef0123456789");
        std::fs::create_dir_all(&build).expect("mkdir");
        executable(&build.join("llama-server"), "#!/bin/sh\n");
        executable(&build.join(PERPLEXITY), "#!/bin/sh\necho 'version: 9.9 (build 7)' >&2\n");
        let tool = find(&settings(Some(build.join("llama-server"))), &configured).await.expect("the build's tool");
        assert_eq!(tool.path, build.join(PERPLEXITY));
        assert_eq!(tool.library_dir.as_deref(), Some(build.as_path()));
        assert_eq!(tool.build, "llama.cpp 9.9 (build 7), runtime build sha256:abcdef012345");

        std::fs::set_permissions(build.join(PERPLEXITY), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(find(&settings(Some(build.join("llama-server"))), &configured).await.is_err(), "not executable");
    }
}
