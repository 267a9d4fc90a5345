//! Any UDP payload on the ESP port: never panics, and is either dropped
//! with a reason or (for a forged-but-valid packet, impossible without the
//! key) accepted.
#![no_main]
use isthmus_tunnel::fuzz_support::EspTarget;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static TARGET: OnceLock<EspTarget> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    TARGET.get_or_init(EspTarget::new).feed(data);
});
