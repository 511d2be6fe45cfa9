//! Runtime settings: the controller's overrides, the bundle's defaults, what llama-server finally runs with,
//! and the launch spec (model file + settings) that the runtime starts and records.

use std::path::PathBuf;

use alki_shared::bundle::RuntimeDefaults;
use alki_shared::proto;
use serde::{Deserialize, Serialize};

/// The controller's overrides from a desired state; zero means "use the bundle's default".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeOverrides {
    pub context_size: u32,
    pub threads: u32,
    pub gpu_layers: i32,
    pub parallel_slots: u32,
}

impl RuntimeOverrides {
    pub fn from_proto(settings: Option<&proto::RuntimeSettings>) -> RuntimeOverrides {
        settings
            .map(|s| RuntimeOverrides {
                context_size: s.context_size,
                threads: s.threads,
                gpu_layers: s.gpu_layers,
                parallel_slots: s.parallel_slots,
            })
            .unwrap_or_default()
    }
}

/// What one llama-server instance is started with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSettings {
    /// `-c`; 0 lets llama-server use the model's trained context.
    pub context_size: u32,
    /// `-t`; 0 lets llama-server decide (the flag is then omitted).
    pub threads: u32,
    /// `-ngl`; negative offloads every layer.
    pub gpu_layers: i32,
    /// `-np`, at least 1.
    pub parallel_slots: u32,
    /// `--chat-template`, when the bundle overrides the GGUF's own.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// The runtime build's `llama-server` the bundle names (under `<data_dir>/runtime-builds/`); None runs the
    /// configured `runtime.llama_server`. Kept with the deployment so a restart or rollback runs the same build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llama_server: Option<std::path::PathBuf>,
    /// The runtime build's platform entry `llama_server` came from, reported to the controller
    /// (`Status.runtime_platform`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_platform: Option<String>,
}

impl LaunchSettings {
    /// Overrides win where non-zero; the bundle's defaults fill the rest.
    pub fn resolve(defaults: &RuntimeDefaults, overrides: &RuntimeOverrides) -> LaunchSettings {
        let pick = |o: u32, d: u32| if o != 0 { o } else { d };
        LaunchSettings {
            context_size: pick(overrides.context_size, defaults.context_size),
            threads: pick(overrides.threads, defaults.threads),
            gpu_layers: if overrides.gpu_layers != 0 { overrides.gpu_layers } else { defaults.gpu_layers },
            parallel_slots: pick(overrides.parallel_slots, defaults.parallel_slots).max(1),
            chat_template: defaults.chat_template.clone().filter(|t| !t.is_empty()),
            llama_server: None,
            runtime_platform: None,
        }
    }

    /// The program to run: the runtime build's llama-server, else `configured`.
    pub fn program<'a>(&'a self, configured: &'a std::path::Path) -> &'a std::path::Path {
        self.llama_server.as_deref().unwrap_or(configured)
    }

    /// The llama-server flags these settings stand for (model and address excluded).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["-c".to_owned(), self.context_size.to_string()];
        if self.threads > 0 {
            args.extend(["-t".to_owned(), self.threads.to_string()]);
        }
        let ngl = if self.gpu_layers < 0 { "all".to_owned() } else { self.gpu_layers.to_string() };
        args.extend(["-ngl".to_owned(), ngl]);
        args.extend(["-np".to_owned(), self.parallel_slots.to_string()]);
        if let Some(template) = &self.chat_template {
            args.extend(["--chat-template".to_owned(), template.clone()]);
        }
        args
    }
}

/// What to run: a model file with settings, on behalf of a bundle.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchSpec {
    /// The GGUF file given to `-m` (split parts lie beside it).
    pub model_path: PathBuf,
    pub settings: LaunchSettings,
    /// The bundle this serves; the proxy's counters are kept per bundle.
    pub bundle_digest: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_where_set() {
        let defaults = RuntimeDefaults { context_size: 4096, threads: 4, parallel_slots: 2, ..Default::default() };
        let none = LaunchSettings::resolve(&defaults, &RuntimeOverrides::default());
        assert_eq!((none.context_size, none.threads, none.parallel_slots), (4096, 4, 2));
        let some = RuntimeOverrides { context_size: 1024, parallel_slots: 8, ..Default::default() };
        let resolved = LaunchSettings::resolve(&defaults, &some);
        assert_eq!((resolved.context_size, resolved.threads, resolved.parallel_slots), (1024, 4, 8));
        assert_eq!(resolved.args(), ["-c", "1024", "-t", "4", "-ngl", "0", "-np", "8"]);
    }

    #[test]
    fn zero_threads_omits_the_flag_and_slots_are_at_least_one() {
        let defaults = RuntimeDefaults { context_size: 512, threads: 0, parallel_slots: 0, ..Default::default() };
        let resolved = LaunchSettings::resolve(&defaults, &RuntimeOverrides { gpu_layers: -1, ..Default::default() });
        assert_eq!(resolved.args(), ["-c", "512", "-ngl", "all", "-np", "1"]);
    }
}
