#!/usr/bin/env bash
# Isthmus demo: a mesh of three clusters on this machine, in network namespaces,
# learnt from clustermesh API servers (no gateway config lists a peer), keyed by
# identity only, with both tunnel kinds.
#
#   bash scripts/demo.sh           # build, run the demo, tear everything down
#   bash scripts/demo.sh --keep    # same, but leave the mesh running until Enter
#
# Topology (RUN = istdemo<random id>, clusters a=1, b=2, c=3):
#
#   RUN-wla 100.64.1.2 --- 100.64.1.1 RUN-gwa 192.0.2.1 ---+
#   RUN-wlb 100.64.2.2 --- 100.64.2.1 RUN-gwb 192.0.2.2 ---+--- bridge br0 in RUN-ul (the underlay)
#   RUN-wlc 100.64.3.2 --- 100.64.3.1 RUN-gwc 192.0.2.3 ---+
#
# A mesh CA (isthmusctl certs) issues each gateway a certificate with its SPIFFE ID
# (spiffe://demo.isthmus/cluster/<c>/gateway/gw) and each cluster's clustermesh API
# server one (.../gateway/clustermesh-api). Each cluster runs isthmus-clustermesh-api
# (TCP 7444, mTLS) publishing its cluster file (the embedded defaults below: its
# prefix, its gateway, and for c a service "default/web"). The gateway configs name
# only the other clusters' API servers: each gateway learns the remote gateways from
# them, opens an mTLS channel (TCP 7443) to each, checks its identity, and keys the
# tunnel from it: a<->b and b<->c WireGuard, a<->c ESP in UDP (AES-256-GCM, keys from
# the TLS exporter), as the clusters' announced tunnel kinds decide. Workloads reach
# each other only through these tunnels.
#
# Environment (for developing the script itself):
#   DEMO_NETNS_ONLY=1         build only the namespaces and underlay, ping gateway to
#                             gateway, tear down (no build, no certificates, no gateways)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h | --help)
            sed -n '2,23s/^# \{0,1\}//p' "$0"
            exit 0
            ;;
        *)
            echo "demo: unknown option: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

NETNS_ONLY=${DEMO_NETNS_ONLY:-0}
if [[ -n ${DEMO_GATEWAY:-} ]]; then
    echo "demo: DEMO_GATEWAY is no longer supported (the mesh is keyed by identity, which wireguard-go cannot do)" >&2
    exit 2
fi

if [[ -d "$HOME/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

BOLD="" PLAIN=""
if [[ -t 1 ]]; then
    BOLD=$'\033[1m' PLAIN=$'\033[0m'
fi
STEP=${DEMO_STEP:-0}
heading() {
    STEP=$((STEP + 1))
    printf '\n%s== %d. %s%s\n' "$BOLD" "$STEP" "$*" "$PLAIN"
}
info() { printf '   %s\n' "$*"; }
indent() { sed "s/^/${1:-   }/"; }
die() {
    printf '\ndemo: error: %s\n' "$*" >&2
    exit 1
}

CARGO_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# .cargo/config.toml names the host triple as the build target (static binaries).
TARGET_DIR=$CARGO_DIR/x86_64-unknown-linux-gnu
GATEWAY_BIN=$TARGET_DIR/release/isthmus-gateway
CTL_BIN=$TARGET_DIR/release/isthmusctl
API_BIN=$TARGET_DIR/release/isthmus-clustermesh-api

# --- setup and build (as the invoking user) -----------------------------------
if [[ ${DEMO_PREPARED:-0} != 1 ]]; then
    heading "Setup (system packages and Rust tools, installed only if missing)"
    bash scripts/setup.sh

    if [[ $NETNS_ONLY != 1 ]]; then
        heading "Build: cargo build --release --bins --locked (the first build takes a few minutes)"
        cargo build --release --bins --locked
    fi
fi

if [[ $NETNS_ONLY != 1 ]]; then
    [[ -x $GATEWAY_BIN && -x $CTL_BIN ]] || die "missing $GATEWAY_BIN or $CTL_BIN after the build"
fi

# Network namespaces need root: continue under sudo (the build stays the user's).
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "network namespaces need root, and sudo is not available"
    exec sudo env DEMO_PREPARED=1 DEMO_STEP="$STEP" DEMO_NETNS_ONLY="$NETNS_ONLY" \
        CARGO_TARGET_DIR="$CARGO_DIR" bash "$ROOT/scripts/demo.sh" "$@"
fi

# --- names, state and cleanup ---------------------------------------------------
SITES=(a b c)
declare -A IDX=([a]=1 [b]=2 [c]=3)
TRUST_DOMAIN=demo.isthmus
CHANNEL_PORT=7443
API_PORT=7444
WG_PORT=51820
ESP_PORT=4500

# The tunnel kind of the link between two clusters (both ends must agree).
link_kind() {
    case "$1$2" in
        ac | ca) echo esp ;;
        *) echo wireguard ;;
    esac
}
spiffe_id() { echo "spiffe://$TRUST_DOMAIN/cluster/$1/gateway/gw"; }
# Tunnel kinds each cluster's gateway offers, preferred first. Two gateways use the
# first kind of the one whose SPIFFE ID sorts first that the other also offers:
# a-b wireguard, a-c esp, b-c wireguard (what link_kind says).
mesh_kinds() {
    case "$1" in
        a) echo '"esp", "wireguard"' ;;
        b) echo '"wireguard"' ;;
        c) echo '"wireguard", "esp"' ;;
    esac
}

while :; do
    ID=$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')
    RUN=istdemo$ID # 11 characters
    [[ -e /run/netns/$RUN-ul || -e /var/run/wireguard/${RUN}a.sock || -e /var/run/isthmus/${RUN}a.sock ]] || break
done
NS_UL=$RUN-ul
ns_gw() { echo "$RUN-gw$1"; }
ns_wl() { echo "$RUN-wl$1"; }
ifname() { echo "$RUN$1"; } # TUN device, 12 characters (limit 15)

WORK=$(mktemp -d -t "$RUN.XXXXXX")
chmod 700 "$WORK"
CA_DIR=$WORK/ca
CREATED_NS=()
declare -A GW_PID=()
declare -A API_PID=()
CAP_PID=""
DONE=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    # Ctrl-C (or a TERM) at the --keep prompt is an ordinary way to end a passed demo.
    ((DONE && (rc == 130 || rc == 143))) && rc=0
    printf '\n%s== Cleanup%s\n' "$BOLD" "$PLAIN"
    [[ -n $CAP_PID ]] && kill "$CAP_PID" 2>/dev/null
    local s pid ns i
    for s in "${!GW_PID[@]}"; do kill -TERM "${GW_PID[$s]}" 2>/dev/null; done
    for s in "${!API_PID[@]}"; do kill -TERM "${API_PID[$s]}" 2>/dev/null; done
    for i in $(seq 1 30); do
        pid=""
        for s in "${!GW_PID[@]}"; do kill -0 "${GW_PID[$s]}" 2>/dev/null && pid=1; done
        [[ -z $pid ]] && break
        sleep 0.1
    done
    # Anything still alive in our namespaces (gateways, iperf3, capture, holders) goes.
    for ns in "${CREATED_NS[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    for ns in "${CREATED_NS[@]}"; do ip netns delete "$ns" 2>/dev/null; done
    for s in "${SITES[@]}"; do
        rm -f "/var/run/wireguard/$(ifname "$s").sock" "/var/run/isthmus/$(ifname "$s").sock"
    done
    info "stopped ${#GW_PID[@]} gateways and ${#API_PID[@]} API servers, deleted ${#CREATED_NS[@]} namespaces ($RUN-*)"
    if ((rc == 0)); then
        rm -rf "$WORK"
    else
        # Keep the logs, configs and certificates for a look, never the private keys.
        find "$WORK" -type f -name '*.key' -delete 2>/dev/null
        info "logs kept in $WORK (private keys deleted)"
        if ((rc == 130 || rc == 143)); then
            printf '\ndemo: interrupted\n' >&2
        else
            printf '\ndemo: FAILED (exit %d)\n' "$rc" >&2
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command in a namespace. Background processes are started with a plain
# "ip netns exec ... &" instead, so that $! is the process itself (ip execs it).
in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

new_ns() {
    local ns=$1
    ip netns add "$ns"
    CREATED_NS+=("$ns")
    ip -n "$ns" link set lo up
    # IPv4-only demo: no IPv6 link-local chatter on the underlay.
    in_ns "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
    # Holds the namespace "in use" while this script lives, so the stale-namespace
    # sweep in scripts/test.sh leaves a running demo alone; exits with the script.
    ip netns exec "$ns" tail --pid=$$ -f /dev/null >/dev/null 2>&1 &
    disown $!
}

# --- namespaces -------------------------------------------------------------------
heading "Network namespaces $RUN-*: underlay bridge, 3 gateways, 3 workloads"
new_ns "$NS_UL"
ip -n "$NS_UL" link add br0 type bridge
ip -n "$NS_UL" link set br0 up
for s in "${SITES[@]}"; do
    i=${IDX[$s]}
    gw=$(ns_gw "$s")
    wl=$(ns_wl "$s")
    new_ns "$gw"
    new_ns "$wl"
    in_ns "$gw" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0

    # underlay: gateway ul0 <-> bridge port "site<s>"
    ip -n "$NS_UL" link add "site$s" type veth peer name ul0 netns "$gw"
    ip -n "$NS_UL" link set "site$s" master br0 up
    ip -n "$gw" addr add "192.0.2.$i/24" dev ul0
    ip -n "$gw" link set ul0 up

    # workload: gateway wl0 (100.64.i.1) <-> workload eth0 (100.64.i.2)
    ip -n "$gw" link add wl0 type veth peer name eth0 netns "$wl"
    ip -n "$gw" addr add "100.64.$i.1/24" dev wl0
    ip -n "$gw" link set wl0 up
    ip -n "$wl" addr add "100.64.$i.2/24" dev eth0
    ip -n "$wl" link set eth0 up
    ip -n "$wl" route add default via "100.64.$i.1"
    info "cluster $s: $wl 100.64.$i.2/24 -> $gw (wl0 100.64.$i.1, ul0 192.0.2.$i) -> $NS_UL br0"
done

# --- underlay check -----------------------------------------------------------------
heading "Plain links: gateway to gateway over the underlay, workload to its own gateway"
for s in "${SITES[@]}"; do
    for p in "${SITES[@]}"; do
        [[ $p == "$s" ]] && continue
        if in_ns "$(ns_gw "$s")" ping -c 1 -W 2 -q "192.0.2.${IDX[$p]}" >/dev/null; then
            info "gw$s -> gw$p (192.0.2.${IDX[$p]}): ok"
        else
            die "underlay ping gw$s -> gw$p failed"
        fi
    done
done

for s in "${SITES[@]}"; do
    if in_ns "$(ns_wl "$s")" ping -c 1 -W 2 -q "100.64.${IDX[$s]}.1" >/dev/null; then
        info "workload $s -> its gateway (100.64.${IDX[$s]}.1): ok"
    else
        die "ping workload $s -> its gateway failed"
    fi
done

if [[ $NETNS_ONLY == 1 ]]; then
    heading "DEMO_NETNS_ONLY=1: topology verified, tearing down"
    exit 0
fi

# --- mesh CA and gateway certificates -------------------------------------------------
heading "Mesh CA and gateway certificates (isthmusctl certs) in $CA_DIR"
ctl() { "$CTL_BIN" "$@" >>"$WORK/certs.log" 2>&1 || die "isthmusctl $* failed: $(tail -n 3 "$WORK/certs.log")"; }
info "\$ isthmusctl certs init --dir $CA_DIR --trust-domain $TRUST_DOMAIN"
ctl certs init --dir "$CA_DIR" --trust-domain "$TRUST_DOMAIN"
for s in "${SITES[@]}"; do
    info "\$ isthmusctl certs issue --dir $CA_DIR cluster --cluster $s"
    ctl certs issue --dir "$CA_DIR" cluster --cluster "$s"
    info "\$ isthmusctl certs issue --dir $CA_DIR gateway --cluster $s --name gw"
    ctl certs issue --dir "$CA_DIR" gateway --cluster "$s" --name gw
    info "\$ isthmusctl certs issue --dir $CA_DIR gateway --cluster $s --name clustermesh-api"
    ctl certs issue --dir "$CA_DIR" gateway --cluster "$s" --name clustermesh-api
done
gw_chain() { echo "$CA_DIR/clusters/$1/gateways/gw.pem"; }
gw_key() { echo "$CA_DIR/clusters/$1/gateways/gw.key"; }
[[ -s $CA_DIR/bundle.pem ]] || die "no trust bundle $CA_DIR/bundle.pem"
for s in "${SITES[@]}"; do
    [[ -s $(gw_chain "$s") && -s $(gw_key "$s") ]] || die "cluster $s: missing $(gw_chain "$s") or its key"
    mode=$(stat -c %a "$(gw_key "$s")")
    [[ $mode == 600 ]] || die "$(gw_key "$s") has mode $mode, expected 600"
    info "cluster $s: $(spiffe_id "$s")  chain clusters/$s/gateways/gw.pem, key gw.key (mode $mode)"
done
info "trust bundle (mesh root CA): $CA_DIR/bundle.pem"
printf '\n   $ isthmusctl certs show %s   (certificates only: it never prints keys)\n' "$(gw_chain a)"
"$CTL_BIN" certs show "$(gw_chain a)" 2>&1 | indent "     " || die "isthmusctl certs show failed"

# --- cluster files, API servers, gateway configs ----------------------------------------
heading "Cluster files and API server configs in $WORK: what each cluster publishes"
for s in "${SITES[@]}"; do
    i=${IDX[$s]}
    {
        printf '[cluster]\nname = "%s"\nid = %d\npod_prefixes = ["100.64.%d.0/24"]\n' "$s" "$i" "$i"
        printf '\n[[gateways]]\nname = "gw"\nspiffe_id = "%s"\n' "$(spiffe_id "$s")"
        printf 'channel_endpoint = "192.0.2.%d:%d"\n' "$i" "$CHANNEL_PORT"
        printf 'kinds = [%s]\nesp_cipher = "aes256-gcm"\nesn = true\n' "$(mesh_kinds "$s")"
        if [[ $s == c ]]; then
            printf '\n[[services]]\nnamespace = "default"\nname = "web"\nglobal = true\n'
            printf 'ports = [{ name = "http", port = 80 }]\n'
            printf 'endpoints = [{ addresses = ["100.64.3.2"], ready = true }]\n'
        fi
    } >"$WORK/cluster-$s.toml"
    {
        printf 'listen = "192.0.2.%d:%d"\n' "$i" "$API_PORT"
        printf '\n[tls]\ntrust_bundle = "%s"\n' "$CA_DIR/bundle.pem"
        printf 'certificate = "%s"\n' "$CA_DIR/clusters/$s/gateways/clustermesh-api.pem"
        printf 'private_key = "%s"\n' "$CA_DIR/clusters/$s/gateways/clustermesh-api.key"
        printf '\n[source]\nkind = "file"\npath = "%s"\n' "$WORK/cluster-$s.toml"
    } >"$WORK/api-$s.toml"
done
info "cluster file of c ($WORK/cluster-c.toml):"
indent "      " <"$WORK/cluster-c.toml"

heading "Gateway configs in $WORK: no peers, no keys; only where the other clusters' APIs are"
for s in "${SITES[@]}"; do
    i=${IDX[$s]}
    {
        printf '[interface]\n'
        printf 'name = "%s"    # no private_key_file: a fresh WireGuard key per start\n' "$(ifname "$s")"
        printf '\n[identity]\n'
        printf 'trust_bundle = "%s"\n' "$CA_DIR/bundle.pem"
        printf 'certificate = "%s"\n' "$(gw_chain "$s")"
        printf 'private_key = "%s"\n' "$(gw_key "$s")"
        printf 'listen = "192.0.2.%d:%d"\n' "$i" "$CHANNEL_PORT"
        printf '\n[mesh]\nlocal_prefixes = ["100.64.%d.0/24"]\n' "$i"
        printf 'kinds = [%s]\nesp_cipher = "aes256-gcm"\npersistent_keepalive = 25\n' "$(mesh_kinds "$s")"
        printf '\n[steering]    # the workload link: its packets to mesh prefixes go into the tunnel (TC BPF, TCX)\n'
        printf 'mode = "auto"\ninterfaces = ["wl0"]\n'

        for p in "${SITES[@]}"; do
            [[ $p == "$s" ]] && continue
            printf '\n[[mesh.clusters]]\nname = "%s"\napi = "192.0.2.%d:%d"\n' "$p" "${IDX[$p]}" "$API_PORT"
        done
    } >"$WORK/$s.toml"
done
info "links: a <-> b $(link_kind a b), a <-> c $(link_kind a c) (AES-256-GCM), b <-> c $(link_kind b c)"
info "config of cluster a ($WORK/a.toml):"
indent "      " <"$WORK/a.toml"

# --- capture -----------------------------------------------------------------------------
CAP=$WORK/underlay.pcap
heading "Capture on the underlay ($NS_UL, every bridge port, IP packets) -> $CAP"
# Bridged unicast never reaches br0 itself: capture the ports ("any"), inbound
# only, so each packet is recorded once, as it leaves its gateway. Immediate mode:
# without it the last second of packets sits in the kernel ring when tcpdump stops.
ip netns exec "$NS_UL" tcpdump -i any -Q in -n -U --immediate-mode -s 2048 -Z root -w "$CAP" 'ip or ip6' >"$WORK/tcpdump.log" 2>&1 &
CAP_PID=$!
for _ in $(seq 1 50); do
    grep -q 'listening on' "$WORK/tcpdump.log" 2>/dev/null && break
    kill -0 "$CAP_PID" 2>/dev/null || die "tcpdump failed: $(cat "$WORK/tcpdump.log")"
    sleep 0.1
done
info "tcpdump running (pid $CAP_PID)"

# --- gateways ------------------------------------------------------------------------------
show_log_tails() {
    local s
    for s in "${SITES[@]}"; do
        [[ -f $WORK/gw$s.log ]] || continue
        printf '   --- last lines of %s ---\n' "$WORK/gw$s.log" >&2
        tail -n 15 "$WORK/gw$s.log" | indent >&2
    done
}

admin_sock() { echo "/var/run/isthmus/$(ifname "$1").sock"; }

wait_socket() { # site socket-path
    local s=$1 sock=$2
    for _ in $(seq 1 150); do
        [[ -S $sock ]] && return 0
        if ! kill -0 "${GW_PID[$s]}" 2>/dev/null; then
            show_log_tails
            die "gateway $s exited before creating $sock"
        fi
        sleep 0.1
    done
    show_log_tails
    die "gateway $s: no $sock after 15 s"
}

heading "Start isthmus-clustermesh-api in each gateway namespace"
for s in "${SITES[@]}"; do
    ip netns exec "$(ns_gw "$s")" "$API_BIN" --config "$WORK/api-$s.toml" >"$WORK/api$s.log" 2>&1 &
    API_PID[$s]=$!
    info "cluster $s: $API_BIN --config $WORK/api-$s.toml (pid ${API_PID[$s]}, log $WORK/api$s.log)"
done

heading "Start isthmus-gateway in each gateway namespace"
for s in "${SITES[@]}"; do
    ip netns exec "$(ns_gw "$s")" "$GATEWAY_BIN" --config "$WORK/$s.toml" >"$WORK/gw$s.log" 2>&1 &
    GW_PID[$s]=$!
    info "cluster $s: $GATEWAY_BIN --config $WORK/$s.toml (pid ${GW_PID[$s]}, log $WORK/gw$s.log)"
done
for s in "${SITES[@]}"; do
    wait_socket "$s" "$(admin_sock "$s")"
    info "cluster $s: admin socket $(admin_sock "$s") is up"
done

# --- mTLS channels ---------------------------------------------------------------------------
heading "Wait for the mTLS peer channels (identities checked both ways, tunnels keyed from them)"
# Prints "<up> <total>" for the channels of one gateway (from the JSON status).
channels_up() {
    local json
    json=$("$CTL_BIN" status --interface "$(ifname "$1")" --output json 2>&1) || return 1
    printf '%s\n' "$json" >"$WORK/status-$1.json"
    # Only channel entries carry "spiffe_id" (peers and clusters have their own "state").
    printf '%d %d\n' "$(grep -c '"state": "up"' <<<"$json")" "$(grep -c '"spiffe_id": ' <<<"$json")"
}
start=$SECONDS
declare -A READY=()
while :; do
    for s in "${SITES[@]}"; do
        [[ -n ${READY[$s]:-} ]] && continue
        kill -0 "${GW_PID[$s]}" 2>/dev/null || {
            show_log_tails
            die "gateway $s exited"
        }
        read -r up total < <(channels_up "$s" || echo "0 0")
        if ((total == 2 && up == total)); then
            READY[$s]=1
            info "cluster $s: $up of $total channels up after $((SECONDS - start)) s"
        fi
    done
    ((${#READY[@]} == ${#SITES[@]})) && break
    if ((SECONDS - start >= 20)); then
        for s in "${SITES[@]}"; do
            [[ -n ${READY[$s]:-} ]] && continue
            printf '\n   $ isthmusctl status --interface %s   (channels not all up; JSON in %s)\n' \
                "$(ifname "$s")" "$WORK/status-$s.json" >&2
            "$CTL_BIN" status --interface "$(ifname "$s")" 2>&1 | indent >&2
        done
        show_log_tails
        die "the mTLS channels were not all up after 20 s"
    fi
    sleep 0.2
done
for s in "${SITES[@]}"; do
    out=$("$CTL_BIN" status --interface "$(ifname "$s")" 2>&1) || die "isthmusctl status failed for cluster $s: $out"
    printf '   cluster %s:\n' "$s"
    sed -n '/^mTLS peer channels:/,$p' <<<"$out" | tail -n +2 | indent
done

# --- what the gateways learnt ------------------------------------------------------------------
heading "What gateway a learnt from the clustermesh APIs of b and c"
printf '   $ isthmusctl mesh clusters --interface %s\n' "$(ifname a)"
"$CTL_BIN" mesh clusters --interface "$(ifname a)" 2>&1 | indent "     " || die "isthmusctl mesh clusters failed"
printf '\n   $ isthmusctl mesh services --interface %s\n' "$(ifname a)"
"$CTL_BIN" mesh services --interface "$(ifname a)" 2>&1 | indent "     " || die "isthmusctl mesh services failed"
"$CTL_BIN" mesh services --interface "$(ifname a)" --output json | grep -q '"100.64.3.2"' ||
    die "gateway a did not learn c's service default/web"

# --- pings -------------------------------------------------------------------------------------
heading "Ping every workload from every other workload (through the tunnels)"
FAILED=0
for s in "${SITES[@]}"; do
    for p in "${SITES[@]}"; do
        [[ $p == "$s" ]] && continue
        dst=100.64.${IDX[$p]}.2
        kind=$(link_kind "$s" "$p")
        # -w: keep trying until 3 replies or 8 s (the first packet may wait for a handshake)
        if out=$(in_ns "$(ns_wl "$s")" ping -c 3 -i 0.2 -w 8 "$dst" 2>&1); then
            printf '   %s -> %s (%s, %-9s): ok    %s\n' "$s" "$p" "$dst" "$kind" "$(grep -o 'rtt.*' <<<"$out")"
        else
            printf '   %s -> %s (%s, %-9s): FAILED %s\n' "$s" "$p" "$dst" "$kind" "$(grep -o '[0-9]* packets transmitted.*' <<<"$out")"
            FAILED=$((FAILED + 1))
        fi
    done
done
if ((FAILED)); then
    show_log_tails
    die "$FAILED of 6 workload pings failed"
fi

# --- transfers ----------------------------------------------------------------------------------
transfer() { # from to port
    local s=$1 p=$2 port=$3 dst out
    dst=100.64.${IDX[$p]}.2
    ip netns exec "$(ns_wl "$p")" timeout 60 iperf3 -s -1 -B "$dst" -p "$port" >"$WORK/iperf3-server-$p.log" 2>&1 &
    disown $! # the cleanup kills whatever still runs in the namespaces
    for _ in $(seq 1 50); do
        in_ns "$(ns_wl "$p")" ss -Hltn "sport = :$port" | grep -q . && break
        sleep 0.1
    done
    info "\$ iperf3 -c $dst -n 32M   (workload $s -> workload $p, $(link_kind "$s" "$p"))"
    if out=$(in_ns "$(ns_wl "$s")" timeout 60 iperf3 -c "$dst" -p "$port" -n 32M -f m 2>&1); then
        grep -E 'sender|receiver' <<<"$out" | indent "     "
    else
        printf '%s\n' "$out" | tail -n 5 | indent "     "
        show_log_tails
        die "iperf3 transfer $s -> $p failed"
    fi
}
heading "Transfer 32 MB over TCP from workload a to workload b (WireGuard) and to workload c (ESP)"
transfer a b 5201
transfer a c 5202

# --- what the underlay carried --------------------------------------------------------------------
heading "What the underlay carried: decode the capture with tshark"
sleep 0.5
kill -TERM "$CAP_PID" 2>/dev/null || true
wait "$CAP_PID" 2>/dev/null || true
CAP_PID=""
# tshark decodes UDP 51820 as WireGuard and UDP 4500 as ESP in UDP (RFC 3948) by
# default; "-d" has it decode the peer channel (TCP 7443) and the clustermesh API
# (TCP 7444) as TLS.
TLS=(-d "tcp.port==$CHANNEL_PORT,tls" -d "tcp.port==$API_PORT,tls")
ts() { tshark -r "$CAP" "${TLS[@]}" "$@" 2>>"$WORK/tshark.log"; }
ts_failed() { die "tshark failed: $(grep -v 'Running as user' "$WORK/tshark.log" | tail -n 3)"; }

F_WG="udp.port == $WG_PORT and wg"
F_ESP="udp.port == $ESP_PORT and esp"
F_TLS="(tcp.port == $CHANNEL_PORT or tcp.port == $API_PORT)"
F_OTHER="not (($F_WG) or ($F_ESP) or $F_TLS)"
between() { echo "ip.addr == 192.0.2.${IDX[$1]} and ip.addr == 192.0.2.${IDX[$2]} and not icmp"; }

# One tshark pass counts the packets that match each filter (io,stat over one interval).
COUNTS=(
    total "frame"
    icmp "(icmp or icmpv6) and (wg or esp or $F_TLS)"
    wg1 "$F_WG and wg.type == 1 and not icmp"
    wg2 "$F_WG and wg.type == 2 and not icmp"
    wg3 "$F_WG and wg.type == 3 and not icmp"
    wg4 "$F_WG and wg.type == 4 and not icmp"
    esp "$F_ESP and not icmp"
    tls "tcp.port == $CHANNEL_PORT and not icmp"
    api "tcp.port == $API_PORT and not icmp"
    # The TLS version each channel handshake settled on (Server Hello, supported_versions).
    hello "tls.handshake.type == 2"
    tls13 "tls.handshake.type == 2 and tls.handshake.extensions.supported_version == 0x0304"
)
for pair in ab ac bc; do
    COUNTS+=("${pair}_wg" "$(between "${pair:0:1}" "${pair:1:1}") and $F_WG"
        "${pair}_esp" "$(between "${pair:0:1}" "${pair:1:1}") and $F_ESP")
done
filters=()
for ((k = 1; k < ${#COUNTS[@]}; k += 2)); do filters+=("${COUNTS[k]}"); done
stat=$(IFS=,; ts -q -z "io,stat,0,${filters[*]}") || ts_failed
# The one data row: | 0.000 <> 5.088 | frames | bytes | frames | bytes | ...
IFS='|' read -r -a cells < <(grep '<>' <<<"$stat" | tail -n 1)
declare -A N=()
for ((k = 0; k < ${#COUNTS[@]}; k += 2)); do
    v=${cells[k + 2]:-}
    v=${v// /}
    [[ $v =~ ^[0-9]+$ ]] || die "cannot read tshark's count for '${COUNTS[k + 1]}' (see $WORK/tshark.log)"
    N[${COUNTS[k]}]=$v
done

info "IP packets captured on the underlay: ${N[total]}"
info "WireGuard (udp $WG_PORT): handshake initiation ${N[wg1]}, handshake response ${N[wg2]}, cookie reply ${N[wg3]}, transport data ${N[wg4]}"
info "ESP in UDP (udp $ESP_PORT): ${N[esp]} packets"
info "TLS peer channel (tcp $CHANNEL_PORT): ${N[tls]} packets; clustermesh API (tcp $API_PORT, gRPC over mTLS): ${N[api]} packets"
info "TLS handshakes on both: ${N[hello]}, ${N[tls13]} of them TLS 1.3"
if ((N[icmp] > 0)); then
    info "ICMP errors: ${N[icmp]} (they quote a tunnel packet sent before its peer gateway was listening)"
fi

info "packets per direction (a UDP GSO batch counts once here):"
declare -A GWNAME=([192.0.2.1]="gw a" [192.0.2.2]="gw b" [192.0.2.3]="gw c")
pairs=$(ts -T fields -E occurrence=f -e ip.src -e ip.dst -e frame.protocols) || ts_failed
while read -r src dst counts; do
    printf '     %-5s -> %-5s %s\n' "${GWNAME[$src]:-$src}" "${GWNAME[$dst]:-$dst}" "$counts"
done < <(awk '{
        p = $3
        d = $1 " " $2
        seen[d] = 1
        k = p ~ /:icmp/ ? "ICMP" : p ~ /:udp:wg$/ ? "WireGuard" : p ~ /:udp:udpencap:esp$/ ? "ESP" \
            : p ~ /:tcp/ ? "TLS" : "other"
        n[d, k]++
    }
    END {
        split("WireGuard ESP TLS ICMP other", order, " ")
        for (d in seen) {
            s = d
            for (i = 1; i <= 5; i++) if ((d, order[i]) in n) s = s sprintf("  %-11s %5d", order[i], n[d, order[i]])
            print s
        }
    }' <<<"$pairs" | sort)

info "a few of them, as tshark decodes them:"
samples=$(ts -Y "not icmp and (wg.type == 1 or wg.type == 2 or (wg.type == 4 and udp.length > 100)
    or ($F_ESP and udp.length > 100) or tls.handshake.type == 1 or tls.handshake.type == 2 or tls.app_data)") || ts_failed
awk '/Handshake Initiation/ && !a++ { print 1, $0; next }
     /Handshake Response/ && !b++   { print 2, $0; next }
     /Transport Data/ && c++ < 2    { print 3, $0; next }
     /ESP \(SPI=/ && d++ < 2        { print 4, $0; next }
     /Client Hello/ && !e++         { print 5, $0; next }
     /Server Hello/ && !f++         { print 6, $0; next }
     /TLSv1\.3 [0-9]+ Application Data$/ && !g++ { print 7, $0 }' <<<"$samples" |
    sort -n -s -k1,1 | cut -d' ' -f2- | indent "     "

# Each link carries exactly the kind it was configured with.
for pair in ab ac bc; do
    s=${pair:0:1} p=${pair:1:1}
    n_wg=${N[${pair}_wg]} n_esp=${N[${pair}_esp]}
    if [[ $(link_kind "$s" "$p") == esp ]]; then
        ((n_esp > 0 && n_wg == 0)) || die "link $s <-> $p: expected ESP only, saw $n_esp ESP and $n_wg WireGuard packets"
    else
        ((n_wg > 0 && n_esp == 0)) || die "link $s <-> $p: expected WireGuard only, saw $n_wg WireGuard and $n_esp ESP packets"
    fi
done
info "links as configured: a <-> b ${N[ab_wg]} WireGuard / ${N[ab_esp]} ESP, a <-> c ${N[ac_wg]} / ${N[ac_esp]}, b <-> c ${N[bc_wg]} / ${N[bc_esp]}"
((N[total] > 0 && N[wg4] > 0)) || die "the capture holds no WireGuard transport data"
((N[esp] > 0)) || die "the capture holds no ESP packets"
((N[hello] > 0 && N[tls13] == N[hello])) || die "the peer channel handshakes were not all TLS 1.3 (${N[tls13]} of ${N[hello]})"

others=$(ts -Y "$F_OTHER") || ts_failed
other=$(grep -c . <<<"$others" || true)
info "\$ tshark -r underlay.pcap -Y '$F_OTHER' | wc -l   -> $other"
if ((other != 0)); then
    info "packets that are none of WireGuard, ESP in UDP, the TLS peer channel or API:"
    head -n 10 <<<"$others" | indent "     "
    die "the underlay carried $other packets that are not WireGuard, ESP, the TLS peer channel or the TLS clustermesh API"
fi
info "=> between the gateways there was only WireGuard, ESP and TLS 1.3 (peer channel, clustermesh API): nothing crossed the underlay in clear"

# --- status ---------------------------------------------------------------------------------------
heading "Gateway status (isthmusctl): peers, ESP SPIs and sequence numbers, mTLS channels"
for s in "${SITES[@]}"; do
    printf '\n   $ isthmusctl status --interface %s\n' "$(ifname "$s")"
    out=$("$CTL_BIN" status --interface "$(ifname "$s")" 2>&1) || die "isthmusctl status failed for cluster $s: $out"
    indent <<<"$out"
done
for s in "${SITES[@]}"; do
    json=$("$CTL_BIN" status --interface "$(ifname "$s")" --output json 2>&1) || die "isthmusctl status failed for cluster $s: $json"
    steered=$(python3 -c 'import json,sys; d=json.load(sys.stdin)["steering"]; print(d["mode"], d["redirected"]["packets"])' <<<"$json") ||
        die "no steering in the status of cluster $s"
    read -r mode packets <<<"$steered"
    ((packets > 0)) || die "cluster $s: steering ($mode) redirected no packet"
    info "cluster $s: steering mode $mode, $packets workload packets redirected into the tunnel"
done
heading "wg show (standard WireGuard UAPI) for cluster b: both peers' keys came over the mTLS channels"
printf '   $ wg show %s\n' "$(ifname b)"
out=$(in_ns "$(ns_gw b)" wg show "$(ifname b)" 2>&1) || die "wg show failed: $out"
indent <<<"$out"

DONE=1
heading "Demo passed: 3 clusters keyed by identity, 6 of 6 workload paths, WireGuard and ESP links, underlay carried only tunnels and TLS"
if ((KEEP)); then
    cat <<EOF

   The mesh keeps running. Try, in another shell (as root):
     ip netns exec $(ns_wl a) ping 100.64.3.2
     ip netns exec $(ns_wl c) iperf3 -s -1 &  ip netns exec $(ns_wl b) iperf3 -c 100.64.3.2 -t 5
     ip netns exec $(ns_gw b) wg show $(ifname b)
     $CTL_BIN status --interface $(ifname a)
     $CTL_BIN certs show $(gw_chain c)
EOF
    printf '   Logs: %s\n\n' "$WORK"
    read -r -p "   Press Enter to tear the demo down. " _ || true
fi
