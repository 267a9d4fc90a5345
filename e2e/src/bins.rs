//! Locating the workspace's binaries (`isthmus-gateway`, `isthmusctl`).

use std::path::PathBuf;

/// Env var overriding the path of `isthmus-gateway`.
pub const GATEWAY_ENV: &str = "ISTHMUS_GATEWAY_BIN";
/// Env var overriding the path of `isthmusctl`.
pub const CTL_ENV: &str = "ISTHMUSCTL_BIN";

/// Finds binary `name`: `$env_var` if set, else next to the running executable
/// (`target/<profile>/deps/test-…` → `target/<profile>/name`, or `target/<profile>/isthmus-bench`
/// → `target/<profile>/name`).
pub fn find(name: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn require(name: &str, env_var: &str) -> PathBuf {
    match find(name, env_var) {
        Some(p) => p,
        None => panic!(
            "cannot find the `{name}` binary next to {:?} and ${env_var} is not set: \
             run `cargo build --workspace --bins` first",
            std::env::current_exe().ok()
        ),
    }
}

/// Path of `isthmus-gateway`; panics with instructions if it is missing.
pub fn gateway() -> PathBuf {
    require("isthmus-gateway", GATEWAY_ENV)
}

/// Environment variable that overrides the path of `isthmus-clustermesh-api`.
pub const CLUSTERMESH_API_ENV: &str = "ISTHMUS_CLUSTERMESH_API_BIN";

/// Path of `isthmus-clustermesh-api`; panics with instructions if it is missing.
pub fn clustermesh_api() -> PathBuf {
    require("isthmus-clustermesh-api", CLUSTERMESH_API_ENV)
}

/// Path of `isthmusctl`; panics with instructions if it is missing.
pub fn ctl() -> PathBuf {
    require("isthmusctl", CTL_ENV)
}
