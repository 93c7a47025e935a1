//! The one known upstream finding the emulator targets step over: serde_amqp 0.18.0 does unchecked arithmetic
//! on lengths and counts read from the wire (`de.rs:1070` `size - OFFSET_MAP8`, `de.rs:1779` `field_count +=`),
//! so malformed bytes panic where overflow checks are on (debug builds, these targets) and wrap where they
//! are off (release builds). See fuzz/README.md, findings.

use std::panic;
use std::sync::Once;

/// Runs `work`, taking a panic raised inside serde_amqp as a refused input (`None`); any other panic still
/// ends the run as a crash, through libFuzzer's hook.
pub fn tolerating_serde_amqp<T>(work: impl FnOnce() -> Option<T>) -> Option<T> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let fuzzer_hook = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let upstream = info
                .location()
                .is_some_and(|location| location.file().contains("/serde_amqp-0.18."));
            if !upstream {
                fuzzer_hook(info);
            }
        }));
    });
    panic::catch_unwind(panic::AssertUnwindSafe(work))
        .ok()
        .flatten()
}
