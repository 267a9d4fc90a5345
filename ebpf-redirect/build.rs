//! Builds the TC programs in `programs/` for `bpfel-unknown-none` and leaves
//! the object in `OUT_DIR`, where `src/bpf.rs` embeds it.
//!
//! Stable rustc builds them with `-Z build-std=core` (RUSTC_BOOTSTRAP=1 for that
//! nested build only) and links them with bpf-linker; `scripts/setup.sh`
//! installs both the rust-src component and bpf-linker.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for path in [
        "programs/src",
        "programs/Cargo.toml",
        "programs/Cargo.lock",
        "programs/.cargo/config.toml",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let programs = manifest.join("programs");
    let target_dir = out.join("ebpf-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&programs)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir)
        // -Z build-std=core on stable, for this nested build only.
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF for the loader; full debug info so bpf-linker can emit it.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    // The outer build's compiler wrappers (clippy-driver under `cargo clippy`),
    // flags and target selection must not leak into the BPF build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run cargo to build the eBPF programs in {}: {e}",
            programs.display()
        )
    });
    if !status.success() {
        panic!(
            "building the eBPF programs in {} failed ({status}); they need the rust-src \
             component and bpf-linker: run `bash scripts/setup.sh`",
            programs.display()
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/isthmus-steer");
    std::fs::copy(&object, out.join("isthmus-steer.o"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}
