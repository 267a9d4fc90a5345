//! Any UDP payload on the WireGuard port: never panics.
#![no_main]
use isthmus_tunnel::fuzz_support::WgTarget;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static TARGET: OnceLock<WgTarget> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    TARGET.get_or_init(WgTarget::new).feed(data);
});
