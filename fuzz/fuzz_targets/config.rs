//! A configuration file as `serve --config` reads it: TOML or YAML text over the defaults, extracted by
//! figment and validated (`eventhub_gateway::config::GatewayConfig::from_file_text`, the path of `load`
//! without the environment and flags).
//!
//! Input: one selector byte (bit 0: YAML instead of TOML), then the file's text. Checked: nothing panics,
//! overflows, recurses without bound or allocates without bound on any file; a file taken is valid.

#![no_main]

use eventhub_gateway::config::GatewayConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(config) = GatewayConfig::from_file_text(text, selector & 1 != 0) {
        config.validate().expect("a loaded configuration is valid");
        let _ = config.hubs();
    }
});
