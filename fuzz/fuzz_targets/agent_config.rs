//! The agent's configuration parser (alki_agent::Config::from_toml: TOML, then validation) on arbitrary
//! text. A configuration that parses is valid: every derived value the agent computes at start must be
//! available without error.

#![no_main]

use alki_agent::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::from_toml(text) {
        Ok(config) => {
            assert!(config.validate().is_ok(), "validation is not stable");
            assert!(config.front_addr().is_ok(), "a valid config without a front address");
            assert!(config.metrics_addr().is_ok(), "a valid config with a bad metrics address");
            assert!(config.controller_authority().is_ok(), "a valid config without a controller authority");
            let _ = (config.identity_dir(), config.embedded_registry(), config.plain_http_registries());
            let _ = (config.health_timeout(), config.drain_timeout(), config.watch_window(), config.gap_wait());
            let _ = (config.eval_gap_budget(), config.bandwidth_limit(), config.disk_reserve_bytes());
            let _ = (config.store_budget_bytes(), config.memory_reserve_bytes());
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
