#!/usr/bin/env bash
# Builds the container image localhost/isthmus:VERSION from static binaries
# (deploy/image/Containerfile) with buildah, then runs each binary's --version in it
# with podman (no network).
#
#   bash scripts/image.sh              # release binaries (cargo build --release first)
#   bash scripts/image.sh --bin-dir D  # binaries already built in D (CI: the debug build)
#   bash scripts/image.sh --save F     # also write the image as an OCI archive to F
#
# Needs buildah, podman and runc (scripts/setup.sh installs them).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN_DIR=""
SAVE=""
while (($#)); do
    case "$1" in
        --bin-dir) BIN_DIR=$2; shift 2 ;;
        --save) SAVE=$2; shift 2 ;;
        -h | --help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "image: unknown option: $1" >&2; exit 2 ;;
    esac
done
say() { printf 'image: %s\n' "$*"; }
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }

for tool in buildah podman runc strip; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (bash scripts/setup.sh installs it)"
done
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
IMAGE=localhost/isthmus:$VERSION
BINS=(isthmus-gateway isthmusctl isthmus-clustermesh-api)
TRIPLE=x86_64-unknown-linux-gnu
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -z $BIN_DIR ]]; then
    say "building release binaries"
    cargo build --release --locked --bins
    BIN_DIR=$TARGET_DIR/$TRIPLE/release
fi

STAGE=$(mktemp -d -t isthmus-image.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/rootfs/usr/local/bin" "$STAGE/rootfs/var/run/isthmus" "$STAGE/rootfs/tmp"
chmod 1777 "$STAGE/rootfs/tmp"
for b in "${BINS[@]}"; do
    [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b not found"
    # A static binary has no program interpreter (PT_INTERP).
    if readelf -l "$BIN_DIR/$b" | grep -q 'Requesting program interpreter'; then
        die "$BIN_DIR/$b is dynamically linked (build with the repository's .cargo/config.toml)"
    fi
    strip -o "$STAGE/rootfs/usr/local/bin/$b" "$BIN_DIR/$b"
done
# nft and exactly the shared libraries it loads (with the loader).
NFT=$(command -v nft) || die "nft not found (apt-get install nftables)"
mkdir -p "$STAGE/rootfs/usr/sbin"
cp "$NFT" "$STAGE/rootfs/usr/sbin/nft"
while read -r lib; do
    mkdir -p "$STAGE/rootfs$(dirname "$lib")"
    cp -L "$lib" "$STAGE/rootfs$lib"
done < <(ldd "$NFT" | grep -o '/[^ ]*' | sort -u)
cp deploy/image/Containerfile "$STAGE/Containerfile"

export CONTAINERS_CONF=$ROOT/deploy/image/containers.conf
say "building $IMAGE"
buildah build --quiet --layers=false -t "$IMAGE" -f "$STAGE/Containerfile" "$STAGE" >/dev/null
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
say "built $IMAGE ($((size / 1024 / 1024)) MiB)"

run() { podman run --rm --network none --entrypoint "$1" "$IMAGE" "${@:2}"; }
for b in "${BINS[@]}"; do
    out=$(run "/usr/local/bin/$b" --version) || die "$b --version failed in the image"
    say "in the image: $out"
done
out=$(run /usr/sbin/nft --version) || die "nft --version failed in the image"
say "in the image: $out"
# The gateway itself, as the pods run it: uid 0 with every capability dropped but
# NET_ADMIN, a read-only root, /dev/net/tun, the admin socket on a tmpfs; then the
# readiness probe's command in the same container.
mkdir -p "$STAGE/config"
printf '[interface]\nname = "ist0"\nuapi = false\nlisten_port = 51820\naddresses = ["100.64.9.1/24"]\n' \
    >"$STAGE/config/gateway.toml"
CID=""
cleanup() {
    [[ -z $CID ]] || podman rm -f "$CID" >/dev/null 2>&1 || true
    rm -rf "$STAGE"
}
trap cleanup EXIT
CID=$(podman run -d --network none --user 0 --cap-drop ALL --cap-add NET_ADMIN \
    --device /dev/net/tun --read-only --tmpfs /var/run/isthmus \
    -v "$STAGE/config:/etc/isthmus/config:ro" "$IMAGE" --config /etc/isthmus/config/gateway.toml)
ready=""
for _ in $(seq 1 50); do
    if ready=$(podman exec "$CID" /usr/local/bin/isthmusctl ready --interface ist0 2>&1); then
        break
    fi
    ready=""
    sleep 0.2
done
[[ -n $ready ]] || die "the gateway in the image never became ready: $(podman logs "$CID" 2>&1 | tail -n 5)"
say "gateway in the image (NET_ADMIN only, read-only root): isthmusctl ready: $ready"
podman stop -t 5 "$CID" >/dev/null
podman rm "$CID" >/dev/null
CID=""

uid=$(podman image inspect "$IMAGE" --format '{{.Config.User}}')
[[ $uid == 65532:65532 ]] || die "image user is '$uid', expected 65532:65532"
say "runs as $uid by default"
if [[ -n $SAVE ]]; then
    podman save --format oci-archive -o "$SAVE" "$IMAGE" >/dev/null
    say "saved to $SAVE"
fi
