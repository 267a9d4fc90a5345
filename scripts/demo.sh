#!/usr/bin/env bash
# Isthmus demo: a three-site mesh on this machine, in network namespaces.
#
#   bash scripts/demo.sh           # build, run the demo, tear everything down
#   bash scripts/demo.sh --keep    # same, but leave the mesh running until Enter
#
# Topology (RUN = istdemo<random id>, sites a=1, b=2, c=3):
#
#   RUN-wla 100.64.1.2 --- 100.64.1.1 RUN-gwa 192.0.2.1 ---+
#   RUN-wlb 100.64.2.2 --- 100.64.2.1 RUN-gwb 192.0.2.2 ---+--- bridge br0 in RUN-ul (the underlay)
#   RUN-wlc 100.64.3.2 --- 100.64.3.1 RUN-gwc 192.0.2.3 ---+
#
# Each gateway namespace runs isthmus-gateway with the two other sites as WireGuard
# peers; workloads reach each other only through the gateways' tunnels.
#
# Environment (for developing the script itself):
#   DEMO_NETNS_ONLY=1         build only the namespaces and underlay, ping gateway to
#                             gateway, tear down (no build, no gateways)
#   DEMO_GATEWAY=wireguard-go run the same demo with wireguard-go as the gateways
#                             (the reference implementation; no build needed)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h | --help)
            sed -n '2,20s/^# \{0,1\}//p' "$0"
            exit 0
            ;;
        *)
            echo "demo: unknown option: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

NETNS_ONLY=${DEMO_NETNS_ONLY:-0}
GATEWAY=${DEMO_GATEWAY:-isthmus}
case "$GATEWAY" in
    isthmus | wireguard-go) ;;
    *)
        echo "demo: DEMO_GATEWAY must be isthmus or wireguard-go" >&2
        exit 2
        ;;
esac

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
die() {
    printf '\ndemo: error: %s\n' "$*" >&2
    exit 1
}

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
GATEWAY_BIN=$TARGET_DIR/release/isthmus-gateway
CTL_BIN=$TARGET_DIR/release/isthmusctl

# --- 1. setup and build (as the invoking user) -------------------------------
if [[ ${DEMO_PREPARED:-0} != 1 ]]; then
    heading "Setup (system packages and Rust tools, installed only if missing)"
    bash scripts/setup.sh

    if [[ $NETNS_ONLY != 1 && $GATEWAY == isthmus ]]; then
        heading "Build: cargo build --release --bins --locked (the first build takes a few minutes)"
        cargo build --release --bins --locked
    fi
fi

if [[ $NETNS_ONLY != 1 && $GATEWAY == isthmus ]]; then
    [[ -x $GATEWAY_BIN && -x $CTL_BIN ]] || die "missing $GATEWAY_BIN or $CTL_BIN after the build"
fi

# Network namespaces need root: continue under sudo (the build stays the user's).
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "network namespaces need root, and sudo is not available"
    exec sudo env DEMO_PREPARED=1 DEMO_STEP="$STEP" DEMO_NETNS_ONLY="$NETNS_ONLY" DEMO_GATEWAY="$GATEWAY" \
        CARGO_TARGET_DIR="$TARGET_DIR" bash "$ROOT/scripts/demo.sh" "$@"
fi

# --- names, state and cleanup ------------------------------------------------
SITES=(a b c)
declare -A IDX=([a]=1 [b]=2 [c]=3)

while :; do
    ID=$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')
    RUN=istdemo$ID # 11 characters
    [[ -e /run/netns/$RUN-ul || -e /var/run/wireguard/${RUN}a.sock || -e /var/run/isthmus/${RUN}a.sock ]] || break
done
NS_UL=$RUN-ul
ns_gw() { echo "$RUN-gw$1"; }
ns_wl() { echo "$RUN-wl$1"; }
ifname() { echo "$RUN$1"; } # TUN/WireGuard device, 12 characters (limit 15)

WORK=$(mktemp -d -t "$RUN.XXXXXX")
chmod 700 "$WORK"
CREATED_NS=()
declare -A GW_PID=()
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
    info "stopped ${#GW_PID[@]} gateways, deleted ${#CREATED_NS[@]} namespaces ($RUN-*)"
    if ((rc == 0)); then
        rm -rf "$WORK"
    else
        rm -f "$WORK"/*.key
        info "logs kept in $WORK"
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

# --- 2. keys and configs ------------------------------------------------------
heading "Keys and gateway configs in $WORK"
declare -A PUB=()
(
    umask 077
    for s in "${SITES[@]}"; do wg genkey >"$WORK/$s.key"; done
)
for s in "${SITES[@]}"; do
    chmod 600 "$WORK/$s.key"
    PUB[$s]=$(wg pubkey <"$WORK/$s.key")
    info "site $s: interface $(ifname "$s"), public key ${PUB[$s]}"
done

for s in "${SITES[@]}"; do
    i=${IDX[$s]}
    {
        printf '[interface]\n'
        printf 'name = "%s"\n' "$(ifname "$s")"
        printf 'private_key_file = "%s"\n' "$WORK/$s.key"
        printf 'listen_port = 51820\n'
        printf 'mtu = 1420\n'
        printf 'addresses = ["100.64.%d.1/32"]\n' "$i"
        for p in "${SITES[@]}"; do
            [[ $p == "$s" ]] && continue
            j=${IDX[$p]}
            printf '\n[[peers]]\n'
            printf 'name = "site-%s"\n' "$p"
            printf 'public_key = "%s"\n' "${PUB[$p]}"
            printf 'endpoint = "192.0.2.%d:51820"\n' "$j"
            printf 'allowed_prefixes = ["100.64.%d.0/24"]\n' "$j"
            printf 'persistent_keepalive = 25\n'
        done
    } >"$WORK/$s.toml"
done
info "config of site a ($WORK/a.toml):"
sed 's/^/      /' "$WORK/a.toml"

# --- 3. namespaces -------------------------------------------------------------
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
    info "site $s: $wl 100.64.$i.2/24 -> $gw (wl0 100.64.$i.1, ul0 192.0.2.$i) -> $NS_UL br0"
done

# --- 4. underlay check ----------------------------------------------------------
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

# --- 5. capture -----------------------------------------------------------------
CAP=$WORK/underlay.pcap
heading "Capture on the underlay ($NS_UL, every bridge port, IP packets) -> $CAP"
# Bridged unicast never reaches br0 itself: capture the ports ("any"), inbound
# only, so each packet is recorded once, as it leaves its gateway. Immediate mode:
# without it the last second of packets sits in the kernel ring when tcpdump stops.
ip netns exec "$NS_UL" tcpdump -i any -Q in -n -U --immediate-mode -s 256 -Z root -w "$CAP" 'ip or ip6' >"$WORK/tcpdump.log" 2>&1 &
CAP_PID=$!
for _ in $(seq 1 50); do
    grep -q 'listening on' "$WORK/tcpdump.log" 2>/dev/null && break
    kill -0 "$CAP_PID" 2>/dev/null || die "tcpdump failed: $(cat "$WORK/tcpdump.log")"
    sleep 0.1
done
info "tcpdump running (pid $CAP_PID)"

# --- 6. gateways ------------------------------------------------------------------
show_log_tails() {
    local s
    for s in "${SITES[@]}"; do
        [[ -f $WORK/gw$s.log ]] || continue
        printf '   --- last lines of %s ---\n' "$WORK/gw$s.log" >&2
        tail -n 15 "$WORK/gw$s.log" | sed 's/^/   /' >&2
    done
}

wait_socket() { # site socket-path
    local s=$1 sock=$2 n
    for n in $(seq 1 150); do
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

if [[ $GATEWAY == isthmus ]]; then
    heading "Start isthmus-gateway in each gateway namespace"
    for s in "${SITES[@]}"; do
        ip netns exec "$(ns_gw "$s")" "$GATEWAY_BIN" --config "$WORK/$s.toml" >"$WORK/gw$s.log" 2>&1 &
        GW_PID[$s]=$!
        info "site $s: $GATEWAY_BIN --config $WORK/$s.toml (pid ${GW_PID[$s]}, log $WORK/gw$s.log)"
    done
    for s in "${SITES[@]}"; do
        wait_socket "$s" "/var/run/isthmus/$(ifname "$s").sock"
        info "site $s: admin socket /var/run/isthmus/$(ifname "$s").sock is up"
    done
else
    heading "Start wireguard-go (reference implementation) in each gateway namespace"
    for s in "${SITES[@]}"; do
        ip netns exec "$(ns_gw "$s")" env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 \
            wireguard-go -f "$(ifname "$s")" >"$WORK/gw$s.log" 2>&1 &
        GW_PID[$s]=$!
    done
    for s in "${SITES[@]}"; do
        gw=$(ns_gw "$s")
        dev=$(ifname "$s")
        wait_socket "$s" "/var/run/wireguard/$dev.sock"
        args=(private-key "$WORK/$s.key" listen-port 51820)
        for p in "${SITES[@]}"; do
            [[ $p == "$s" ]] && continue
            args+=(peer "${PUB[$p]}" endpoint "192.0.2.${IDX[$p]}:51820"
                allowed-ips "100.64.${IDX[$p]}.0/24" persistent-keepalive 25)
        done
        in_ns "$gw" wg set "$dev" "${args[@]}"
        ip -n "$gw" link set "$dev" mtu 1420 up
        for p in "${SITES[@]}"; do
            [[ $p == "$s" ]] && continue
            ip -n "$gw" route add "100.64.${IDX[$p]}.0/24" dev "$dev"
        done
        info "site $s: wireguard-go $dev (pid ${GW_PID[$s]}) configured with wg set"
    done
fi

# --- 7. pings --------------------------------------------------------------------
heading "Ping every workload from every other workload (through the tunnels)"
FAILED=0
for s in "${SITES[@]}"; do
    for p in "${SITES[@]}"; do
        [[ $p == "$s" ]] && continue
        dst=100.64.${IDX[$p]}.2
        # -w: keep trying until 3 replies or 8 s (the first packet may wait for the handshake)
        if out=$(in_ns "$(ns_wl "$s")" ping -c 3 -i 0.2 -w 8 "$dst" 2>&1); then
            info "$s -> $p ($dst): ok    $(grep -o 'rtt.*' <<<"$out")"
        else
            info "$s -> $p ($dst): FAILED $(grep -o '[0-9]* packets transmitted.*' <<<"$out")"
            FAILED=$((FAILED + 1))
        fi
    done
done
if ((FAILED)); then
    show_log_tails
    die "$FAILED of 6 workload pings failed"
fi

# --- 8. transfer -----------------------------------------------------------------
heading "Transfer 32 MB over TCP from workload a to workload b (iperf3)"
ip netns exec "$(ns_wl b)" timeout 60 iperf3 -s -1 -B 100.64.2.2 >"$WORK/iperf3-server.log" 2>&1 &
for _ in $(seq 1 50); do
    in_ns "$(ns_wl b)" ss -Hltn 'sport = :5201' | grep -q . && break
    sleep 0.1
done
if out=$(in_ns "$(ns_wl a)" timeout 60 iperf3 -c 100.64.2.2 -n 32M -f m 2>&1); then
    grep -E 'sender|receiver' <<<"$out" | sed 's/^/   /'
else
    printf '%s\n' "$out" | tail -n 5 | sed 's/^/   /'
    die "iperf3 transfer failed"
fi

# --- 9. what the underlay carried --------------------------------------------------
heading "What the underlay carried: decode the capture with tshark"
sleep 0.5
kill -TERM "$CAP_PID" 2>/dev/null || true
wait "$CAP_PID" 2>/dev/null || true
CAP_PID=""
ts() { tshark "$@" 2>>"$WORK/tshark.log" || true; }

total=$(ts -r "$CAP" | wc -l)
not_wg=$(ts -r "$CAP" -Y 'not wg' | wc -l)
icmp=$(ts -r "$CAP" -Y '(icmp or icmpv6) and wg' | wc -l)
declare -A WGT=()
while read -r t n; do WGT[$t]=$n; done < <(ts -r "$CAP" -Y 'wg and not icmp' -T fields -e wg.type | sort | uniq -c | awk '{ print $2, $1 }')
info "IP packets captured on the underlay: $total"
info "\$ tshark -r underlay.pcap -Y 'not wg' | wc -l   -> $not_wg"
info "WireGuard messages: handshake initiation ${WGT[1]:-0}, handshake response ${WGT[2]:-0}, cookie reply ${WGT[3]:-0}, transport data ${WGT[4]:-0}"
if ((icmp > 0)); then
    info "ICMP errors: $icmp (they quote a WireGuard packet sent before its peer gateway was listening)"
fi
info "a few of them, as tshark decodes them:"
for t in 1 2; do
    { ts -r "$CAP" -Y "wg.type == $t and not icmp" | head -n 2; } | sed 's/^/     /'
done
{ ts -r "$CAP" -Y 'wg.type == 4 and udp.length > 40 and not icmp' | head -n 3; } | sed 's/^/     /'
if ((total == 0 || ${WGT[4]:-0} == 0)); then
    die "the capture holds no WireGuard transport data"
fi
if ((not_wg != 0)); then
    info "packets that are not WireGuard:"
    { ts -r "$CAP" -Y 'not wg' | head -n 10; } | sed 's/^/     /'
    die "the underlay carried $not_wg packets that are not WireGuard"
fi
info "=> every IP packet between the gateways was WireGuard; nothing crossed the underlay in clear"

# --- 10. status -------------------------------------------------------------------
if [[ $GATEWAY == isthmus ]]; then
    heading "Gateway status (isthmusctl)"
    for s in "${SITES[@]}"; do
        printf '\n   $ isthmusctl status --interface %s\n' "$(ifname "$s")"
        "$CTL_BIN" status --interface "$(ifname "$s")" 2>&1 | sed 's/^/   /' || die "isthmusctl status failed for site $s"
    done
fi
heading "wg show (standard WireGuard UAPI) for site a"
printf '   $ wg show %s\n' "$(ifname a)"
in_ns "$(ns_gw a)" wg show "$(ifname a)" 2>&1 | sed 's/^/   /' || die "wg show failed"

DONE=1
heading "Demo passed: 3 sites, 6 of 6 workload paths, underlay carried only WireGuard"
if ((KEEP)); then
    cat <<EOF

   The mesh keeps running. Try, in another shell (as root):
     ip netns exec $(ns_wl a) ping 100.64.3.2
     ip netns exec $(ns_wl c) iperf3 -s -1 &  ip netns exec $(ns_wl b) iperf3 -c 100.64.3.2 -t 5
     ip netns exec $(ns_gw a) wg show $(ifname a)
EOF
    if [[ $GATEWAY == isthmus ]]; then
        printf '     %s status --interface %s\n' "$CTL_BIN" "$(ifname b)"
    fi
    printf '   Logs: %s\n\n' "$WORK"
    read -r -p "   Press Enter to tear the demo down. " _ || true
fi
