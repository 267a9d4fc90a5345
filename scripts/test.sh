#!/usr/bin/env bash
# Runs every check CI runs: setup, rustfmt, clippy, build, the container image,
# the deploy/ checks, and the whole test suite (unit, integration and the e2e
# tests on network namespaces).
#
#   bash scripts/test.sh
#
# Environment:
#   ISTHMUS_STALE_NETNS_AGE  seconds a leftover test namespace (ist*, is<6 hex>*) with no
#                            process in it must have existed before it is deleted
#                            (default 600; 0 deletes every such namespace)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ -d "$HOME/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

START=$SECONDS
CURRENT="setup"
finish() {
    local rc=$?
    local t=$((SECONDS - START))
    if ((rc == 0)); then
        printf '\n== test.sh: all passed in %dm%02ds\n' $((t / 60)) $((t % 60))
    else
        printf '\n== test.sh: FAILED at step "%s" (exit %d) after %dm%02ds\n' "$CURRENT" "$rc" $((t / 60)) $((t % 60)) >&2
    fi
}
trap finish EXIT

step() {
    CURRENT=$1
    printf '\n== %s\n' "$1"
}

step "setup"
bash scripts/setup.sh

# A crashed earlier run can leave network namespaces behind. Our names are
# unique per run ("is" + 6 hex digits from the e2e harness, "istdemo..." from the
# demo), so leftovers never collide with this run; delete the ones no process
# uses any more. The age guard keeps us from pulling namespaces out from under a
# test running right now in another shell (a test thread that entered a
# namespace with setns is not listed by "ip netns pids").
step "remove stale test network namespaces (ist*, is<6 hex>*)"
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)
if [[ $(id -u) -ne 0 ]] && ! command -v sudo >/dev/null 2>&1; then
    echo "not root and no sudo: skipped"
else
    max_age=${ISTHMUS_STALE_NETNS_AGE:-600}
    now=$(date +%s)
    removed=0
    kept=0
    while read -r ns _; do
        [[ $ns == ist* || $ns =~ ^is[0-9a-f]{6} ]] || continue
        if [[ -n $("${SUDO[@]}" ip netns pids "$ns" 2>/dev/null) ]]; then
            kept=$((kept + 1))
            continue
        fi
        created=$(stat -c %Y "/run/netns/$ns" 2>/dev/null || echo 0)
        if ((now - created < max_age)); then
            kept=$((kept + 1))
            continue
        fi
        if "${SUDO[@]}" ip netns delete "$ns" 2>/dev/null; then
            removed=$((removed + 1))
        fi
    done < <("${SUDO[@]}" ip netns list 2>/dev/null)
    echo "removed $removed, kept $kept (in use or younger than ${max_age}s)"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The e2e tests start the gateway binaries; build them with the same (dev)
# profile clippy and nextest use, so the target dir holds one build.
step "cargo build (bins)"
cargo build --workspace --bins --locked

# The static binaries just built, in the image (deploy/image/Containerfile): built
# with buildah, each binary's --version run in it with podman.
step "container image"
bash scripts/image.sh --bin-dir "${CARGO_TARGET_DIR:-$ROOT/target}/x86_64-unknown-linux-gnu/debug"

# deploy/: every overlay rendered (kustomize), every object validated offline
# (Kubernetes schemas, the generated CRDs), the security rules checked.
step "deploy checks"
DEPLOY_VENV=${ISTHMUS_DEPLOY_VENV:-$HOME/.cache/isthmus/deploy-venv}
"$DEPLOY_VENV/bin/python" deploy/check/check.py --kubectl "$DEPLOY_VENV/bin/kubectl"

step "cargo nextest"
cargo nextest run --workspace --locked --no-fail-fast
