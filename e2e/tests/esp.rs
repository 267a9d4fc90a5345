//! Isthmus ↔ Isthmus over IPsec ESP (ESP in UDP, AES-GCM): ping and 50 MB each way over IPv4
//! and IPv6 underlays; replayed and tampered datagrams are dropped and counted without moving
//! the anti-replay window; tshark decrypts the captured ESP with the SA keys; soft-lifetime
//! rekeys under a continuous stream lose nothing; one gateway runs WireGuard and ESP peers at
//! once.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use isthmus_e2e::esp::{self, split_gso_frames, Cipher, EspPair, ESP_PORT};
use isthmus_e2e::isthmus::{EspPeerConfig, EspSettings, GatewayConfig, PeerStatus, Status};
use isthmus_e2e::mesh::isthmus_config;
use isthmus_e2e::metrics::{scrape, Metrics};
use isthmus_e2e::traffic::{self, ping_all, tcp_transfer, transfer_between, udp_sequence, Payload};
use isthmus_e2e::{netns, Capture, IsthmusGateway, KeyPair, Pcap, PeerConfig, Topology};
use isthmus_e2e::{Underlay, TUNNEL_MTU, WG_PORT};

const TRANSFER_BYTES: u64 = 50 * 1024 * 1024;

/// The ESP peer `site-<remote>` in a status.
fn esp_peer(st: &Status, remote: usize) -> &PeerStatus {
    let peer = st
        .require_peer_named(&format!("site-{remote}"))
        .expect("peer");
    assert_eq!(peer.kind, "esp", "{peer:#?}");
    peer
}

fn spi_hex(spi: u32) -> String {
    format!("{spi:#010x}")
}

fn transfer(topo: &Topology, from: usize, to: usize, port: u16, bytes: u64) {
    if let Err(e) = transfer_between(topo.site(from), topo.site(to), port, bytes) {
        panic!("{e:#}");
    }
}

/// Pings (5, patiently: see [`traffic::ping_stats_until`]) from workload `x` to workload `y`
/// and back; on failure the message shows the counts and `diagnostics()`.
fn ping_both_ways(topo: &Topology, x: usize, y: usize, diagnostics: &dyn Fn() -> String) {
    for (p, q) in [(x, y), (y, x)] {
        let (from, to) = (topo.site(p), topo.site(q));
        let deadline = Duration::from_secs(3);
        let stats = traffic::ping_stats_until(&from.wl_ns, to.workload_addr.into(), 5, deadline);
        if !matches!(stats, Ok((_, 5))) {
            panic!(
                "wl{p} -> wl{q}: (transmitted, received) = {stats:?}\n{}",
                diagnostics()
            );
        }
    }
}

fn pair(underlay: Underlay, cipher: Cipher, mtu: u32) {
    let topo = Topology::two_sites(underlay).expect("topology");
    let pair = EspPair::start_with_mtu(&topo, cipher, &EspPeerConfig::default(), Some(mtu))
        .expect("ESP pair");
    ping_both_ways(&topo, 1, 2, &|| pair.diagnostics());
    transfer(&topo, 1, 2, 7201, TRANSFER_BYTES);
    transfer(&topo, 2, 1, 7202, TRANSFER_BYTES);

    for (me, other) in [(1, 2), (2, 1)] {
        let st = pair.status(me).expect("status");
        let sa = pair.sa_file(me);
        assert_eq!(st.esp_listen_port, Some(ESP_PORT), "{st:#?}");
        assert_eq!(st.peers.len(), 1, "{st:#?}");
        let peer = esp_peer(&st, other);
        assert_eq!(peer.public_key, None, "{peer:#?}");
        assert_eq!(
            peer.endpoint.as_deref(),
            Some(topo.site(other).endpoint(ESP_PORT).to_string().as_str()),
            "{peer:#?}"
        );
        assert_eq!(
            peer.allowed_prefixes,
            vec![topo.site(other).workload_prefix.clone()]
        );
        assert!(
            peer.tx_bytes >= TRANSFER_BYTES && peer.rx_bytes >= TRANSFER_BYTES,
            "{peer:#?}"
        );
        assert_eq!(peer.drops, Default::default(), "{peer:#?}");
        let esp = peer.esp.as_ref().expect("esp status of an ESP peer");
        assert_eq!(esp.cipher, cipher.name());
        assert!(esp.esn, "ESN is on by default: {esp:#?}");
        assert_eq!(esp.rekeys, 0, "{esp:#?}");
        assert_eq!(esp.outbound.spi, spi_hex(sa.outbound_spi), "{esp:#?}");
        assert_eq!(esp.outbound.generation, 0, "{esp:#?}");
        assert!(esp.outbound.last_seq >= 30_000, "{esp:#?}");
        let inbound = esp
            .inbound
            .iter()
            .find(|s| s.spi == spi_hex(sa.inbound_spi))
            .unwrap_or_else(|| panic!("inbound SA {:#010x} missing: {esp:#?}", sa.inbound_spi));
        assert_eq!(inbound.generation, 0);
        assert!(inbound.packets >= 30_000 && !inbound.retiring, "{esp:#?}");
        // Generations 1 and 2 are installed ahead of the sender's rekey.
        let generations: Vec<u64> = esp.inbound.iter().map(|s| s.generation).collect();
        assert_eq!(generations, vec![0, 1, 2], "{esp:#?}");
        let esp_drops = st.esp_drops.as_ref().expect("esp_drops");
        assert_eq!(esp_drops.malformed + esp_drops.unknown_peer, 0, "{st:#?}");
        // The status shows SPIs, never keys.
        let raw = isthmus_e2e::isthmus::isthmusctl(&[
            "status",
            "--socket",
            &pair.gateway(me).admin_socket.to_string_lossy(),
            "--output",
            "json",
        ])
        .expect("isthmusctl");
        let text = String::from_utf8_lossy(&raw.stdout);
        for key in [&sa.outbound_key, &sa.inbound_key] {
            assert!(
                !text.contains(key.as_str()) && !text.contains(&key[..16]),
                "status shows key material"
            );
        }
    }
}

#[test]
fn esp_pair_ipv4_underlay_aes128_gcm() {
    pair(Underlay::V4, Cipher::Aes128Gcm, TUNNEL_MTU);
}

/// MTU 1400 (as strongSwan's ipsec0): with the 1420 that suits WireGuard, full-size inner
/// packets do not fit a 1500-byte IPv6 underlay once ESP is added; see
/// `esp_ipv6_underlay_with_default_mtu_carries_tcp`.
#[test]
fn esp_pair_ipv6_underlay_aes256_gcm() {
    pair(Underlay::V6, Cipher::Aes256Gcm, 1400);
}

/// With the gateway's default MTU (1420) over a 1500-byte IPv6 underlay, a full-size inner
/// packet becomes a 1504-byte IPv6 datagram. Whatever the gateway does about it (a smaller
/// MTU for ESP peers, ICMP "packet too big" back to the sender, fragmentation), TCP through the
/// tunnel must not stall.
#[test]
fn esp_ipv6_underlay_with_default_mtu_carries_tcp() {
    let topo = Topology::two_sites(Underlay::V6).expect("topology");
    let pair = EspPair::start_with_mtu(&topo, Cipher::Aes128Gcm, &EspPeerConfig::default(), None)
        .expect("ESP pair");
    let (a, b) = (topo.site(1), topo.site(2));
    // A 1420-byte packet with DF set must either arrive (and be answered) or be refused with an
    // ICMP error that tells the sender the path MTU — never vanish.
    let out = netns::exec_output(
        &a.wl_ns,
        "ping",
        &[
            "-n",
            "-c",
            "2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "1392",
            &b.workload_addr.to_string(),
        ],
    )
    .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let answered = !text.contains(" 0 received");
    // "Frag needed and DF set (mtu = …)" from a router, or "local error: message too long,
    // mtu=…" once the sender learnt the path MTU.
    let told = text.contains("Frag needed") || text.contains("mtu");
    let report = if answered || told {
        tcp_transfer(
            &a.wl_ns,
            &b.wl_ns,
            IpAddr::V4(b.workload_addr),
            7203,
            2_000_000,
            Payload::Random,
        )
    } else {
        Err(anyhow::anyhow!(
            "a 1420-byte DF ping vanished (neither answered nor refused):\n{text}"
        ))
    };
    let st = pair.status(1).expect("status");
    let peer = esp_peer(&st, 2);
    let snmp = netns::exec(&a.gw_ns, "cat", &["/proc/net/snmp6"]).expect("snmp6");
    let sent = snmp
        .lines()
        .find(|l| l.starts_with("Udp6OutDatagrams"))
        .unwrap_or_default();
    match report {
        Ok(r) => assert!(r.intact(), "{r:?}"),
        Err(e) => panic!(
            "full-size packets over ESP with the default MTU over IPv6: {e:#}\ngateway 1 \
             counts tx_packets {} while its kernel sent {sent:?}; drops {:?}",
            peer.tx_packets, peer.drops
        ),
    }
}

/// UDP payloads of the frames in `pcap` (tshark's `udp.payload`) whose SPI is `spi`.
fn esp_payloads(pcap: &Pcap, spi: u32) -> Vec<Vec<u8>> {
    let out = pcap
        .tshark(&["-T", "fields", "-e", "udp.payload"])
        .expect("tshark udp.payload");
    out.lines()
        .filter_map(|l| hex::decode(l.trim()).ok())
        .filter(|p| p.len() >= 4 && p[..4] == spi.to_be_bytes())
        .collect()
}

/// Sends `datagrams` from site `from`'s gateway namespace (its underlay address) to site `to`'s
/// ESP port, 2 ms apart, and checks that the kernel delivered all of them to the gateway.
fn inject(topo: &Topology, from: usize, to: usize, datagrams: Vec<Vec<u8>>) {
    let n = datagrams.len();
    let dst = topo.site(to);
    let before = traffic::udp_rcvbuf_errors(&dst.gw_ns).expect("snmp");
    let sent = traffic::udp_send(
        &topo.site(from).gw_ns,
        SocketAddr::new(dst.underlay_addr, ESP_PORT),
        datagrams,
        Duration::from_millis(2),
    )
    .expect("inject");
    assert_eq!(sent, n);
    let kernel_drops = traffic::udp_rcvbuf_errors(&dst.gw_ns).expect("snmp") - before;
    assert_eq!(
        kernel_drops, 0,
        "the kernel dropped injected datagrams (receive buffer full): the counts below would \
         not be exact"
    );
}

/// Polls site `i`'s status until `pred` holds for its ESP peer `site-<remote>` (or 5 s pass).
fn wait_peer<F: Fn(&PeerStatus) -> bool>(
    gw: &IsthmusGateway,
    remote: usize,
    pred: F,
) -> (Status, PeerStatus) {
    let name = format!("site-{remote}");
    let st = gw
        .wait_status(Duration::from_secs(5), |s| {
            s.peer_named(&name).is_some_and(&pred)
        })
        .expect("status");
    let peer = esp_peer(&st, remote).clone();
    (st, peer)
}

/// Re-injected copies of captured ESP datagrams are dropped as replays, exactly counted, and the
/// tunnel keeps working.
#[test]
fn esp_replayed_datagrams_are_dropped() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let pair = EspPair::start(&topo, Cipher::Aes128Gcm, &EspPeerConfig::default()).expect("pair");
    let (a, b) = (topo.site(1), topo.site(2));
    let filter = format!("udp dst port {ESP_PORT} and src host {}", a.underlay_addr);
    let cap = Capture::start(topo.run(), &a.gw_ns, &a.underlay_if, Some(&filter)).expect("cap");
    assert!(
        ping_all(&a.wl_ns, b.workload_addr.into(), 5),
        "{}",
        pair.logs()
    );
    let pcap = cap.stop().expect("capture");
    let captured = esp_payloads(&pcap, pair.sa_file(1).outbound_spi);
    assert!(
        captured.len() >= 5,
        "expected the 5 echo requests in the capture, got {}",
        captured.len()
    );

    let gw_b = pair.gateway(2);
    let before = esp_peer(&gw_b.status().expect("status"), 1).clone();
    // Every captured datagram twice: 2n replays.
    let replays: Vec<Vec<u8>> = captured.iter().chain(&captured).cloned().collect();
    let n = replays.len() as u64;
    inject(&topo, 1, 2, replays);
    let (st, after) = wait_peer(gw_b, 1, |p| p.drops.replay >= before.drops.replay + n);
    eprintln!("{n} replays: drops {:?} -> {:?}", before.drops, after.drops);
    assert_eq!(after.drops.replay, before.drops.replay + n, "{after:#?}");
    assert_eq!(after.drops.decrypt_failure, before.drops.decrypt_failure);
    assert_eq!(after.drops.too_old, before.drops.too_old);
    assert_eq!(after.drops.bad_source, before.drops.bad_source);
    assert_eq!(after.rx_packets, before.rx_packets, "a replay was accepted");
    let esp_drops = st.esp_drops.expect("esp_drops");
    assert_eq!(esp_drops.unknown_peer + esp_drops.malformed, 0);

    ping_both_ways(&topo, 1, 2, &|| pair.diagnostics());
    let end = esp_peer(&gw_b.status().expect("status"), 1).clone();
    assert_eq!(end.drops.replay, after.drops.replay, "{end:#?}");
}

/// Drops every ESP datagram arriving in `ns` (an nftables table of its own) until dropped.
struct EspBlock {
    ns: String,
    table: String,
}

impl EspBlock {
    fn new(ns: &str, table: &str) -> Self {
        let block = EspBlock {
            ns: ns.to_string(),
            table: table.to_string(),
        };
        let port = ESP_PORT.to_string();
        for args in [
            &["add", "table", "inet", table][..],
            &[
                "add",
                "chain",
                "inet",
                table,
                "input",
                "{ type filter hook input priority 0; }",
            ],
            &[
                "add", "rule", "inet", table, "input", "udp", "dport", &port, "drop",
            ],
        ] {
            netns::exec(ns, "nft", args).expect("nft");
        }
        block
    }
}

impl Drop for EspBlock {
    fn drop(&mut self) {
        let _ = netns::exec(&self.ns, "nft", &["delete", "table", "inet", &self.table]);
    }
}

/// Tampered datagrams (a flipped ciphertext bit, a flipped ICV bit, a forged high sequence
/// number) fail the ICV check, are counted as `decrypt_failure`, and do not move the replay
/// window: the untampered originals are accepted afterwards, and a second copy of them is then a
/// replay.
#[test]
fn esp_tampered_datagrams_fail_icv_and_leave_the_window() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let pair = EspPair::start(&topo, Cipher::Aes128Gcm, &EspPeerConfig::default()).expect("pair");
    let (a, b) = (topo.site(1), topo.site(2));
    let gw_b = pair.gateway(2);
    let spi = pair.sa_file(1).outbound_spi;

    // Datagrams B never received: captured at A while B's firewall drops them, so their
    // sequence numbers are fresh to B.
    let fresh = {
        let _block = EspBlock::new(&b.gw_ns, &topo.run().name("blk"));
        let filter = format!("udp dst port {ESP_PORT} and src host {}", a.underlay_addr);
        let cap = Capture::start(topo.run(), &a.gw_ns, &a.underlay_if, Some(&filter)).expect("cap");
        let (tx, rx) = traffic::ping_stats(&a.wl_ns, b.workload_addr.into(), 3).expect("ping");
        assert_eq!(
            (tx, rx),
            (3, 0),
            "pings got through a firewall dropping ESP"
        );
        esp_payloads(&cap.stop().expect("capture"), spi)
    };
    assert_eq!(fresh.len(), 3, "one ESP datagram per echo request");
    let before = esp_peer(&gw_b.status().expect("status"), 1).clone();
    let inbound_top = |p: &PeerStatus| {
        let esp = p.esp.as_ref().expect("esp");
        esp.inbound
            .iter()
            .find(|s| s.spi == spi_hex(spi))
            .expect("inbound SA")
            .highest_seq
    };
    let top_before = inbound_top(&before);
    let fresh_seq = u32::from_be_bytes(fresh[0][4..8].try_into().expect("4 bytes"));
    assert!(
        u64::from(fresh_seq) > top_before,
        "captured seq {fresh_seq} not fresh (B's window top {top_before})"
    );

    let mut tampered = Vec::new();
    // One ciphertext bit.
    let mut d = fresh[0].clone();
    let mid = 16 + (d.len() - 32) / 2;
    d[mid] ^= 0x10;
    tampered.push(d);
    // One ICV bit.
    let mut d = fresh[1].clone();
    let last = d.len() - 1;
    d[last] ^= 0x01;
    tampered.push(d);
    // A forged, fresh-looking high sequence number (and matching IV): no replay, but the AAD and
    // nonce differ from what was sealed.
    let mut d = fresh[2].clone();
    let forged: u32 = 0x7000_0000;
    d[4..8].copy_from_slice(&forged.to_be_bytes());
    d[8..16].copy_from_slice(&u64::from(forged).to_be_bytes());
    tampered.push(d);
    let n = tampered.len() as u64;
    inject(&topo, 1, 2, tampered);
    let (_, after) = wait_peer(gw_b, 1, |p| {
        p.drops.decrypt_failure >= before.drops.decrypt_failure + n
    });
    eprintln!(
        "{n} tampered: drops {:?} -> {:?}",
        before.drops, after.drops
    );
    assert_eq!(
        after.drops.decrypt_failure,
        before.drops.decrypt_failure + n,
        "{after:#?}"
    );
    assert_eq!(after.drops.replay, before.drops.replay, "{after:#?}");
    assert_eq!(after.drops.too_old, before.drops.too_old, "{after:#?}");
    assert_eq!(
        after.rx_packets, before.rx_packets,
        "a tampered datagram was accepted"
    );
    assert_eq!(
        inbound_top(&after),
        top_before,
        "the replay window moved on datagrams that failed the ICV: {after:#?}"
    );

    // The originals were never accepted and their numbers were not consumed: they pass now.
    inject(&topo, 1, 2, fresh.clone());
    let (_, accepted) = wait_peer(gw_b, 1, |p| p.rx_packets >= before.rx_packets + 3);
    assert_eq!(accepted.rx_packets, before.rx_packets + 3, "{accepted:#?}");
    assert_eq!(accepted.drops, after.drops, "{accepted:#?}");
    assert!(inbound_top(&accepted) >= u64::from(fresh_seq) + 2);
    assert!(inbound_top(&accepted) < u64::from(forged));
    // …once.
    inject(&topo, 1, 2, fresh);
    let (_, replayed) = wait_peer(gw_b, 1, |p| p.drops.replay >= after.drops.replay + 3);
    assert_eq!(
        replayed.drops.replay,
        after.drops.replay + 3,
        "{replayed:#?}"
    );
    assert_eq!(replayed.rx_packets, accepted.rx_packets, "{replayed:#?}");

    ping_both_ways(&topo, 1, 2, &|| pair.diagnostics());
    let end = esp_peer(&gw_b.status().expect("status"), 1).clone();
    assert_eq!(end.drops.decrypt_failure, after.drops.decrypt_failure);
}

/// One frame as tshark decodes it with the SA keys.
#[derive(Debug, Default)]
struct Decoded {
    spi: String,
    seq: u64,
    iv: u64,
    /// Next header (only visible after decryption).
    next_header: Option<u8>,
    icv_good: bool,
    icv_bad: bool,
    /// Outer then inner addresses.
    ip_src: Vec<String>,
    ip_dst: Vec<String>,
    icmp_type: Option<u8>,
    tcp_src: Option<u16>,
    tcp_dst: Option<u16>,
    tcp_syn: bool,
    tcp_ack: bool,
    tcp_len: u64,
}

impl Decoded {
    /// Inner source and destination (the second IPv4 header).
    fn inner(&self) -> Option<(&str, &str)> {
        Some((self.ip_src.get(1)?.as_str(), self.ip_dst.get(1)?.as_str()))
    }
}

const DECODED_FIELDS: [&str; 14] = [
    "esp.spi",
    "esp.sequence",
    "esp.iv",
    "esp.protocol",
    "esp.icv_good",
    "esp.icv_bad",
    "ip.src",
    "ip.dst",
    "icmp.type",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.flags.syn",
    "tcp.flags.ack",
    "tcp.len",
];

fn decode(pcap: &Pcap, prefs: &[String]) -> Vec<Decoded> {
    let mut args = prefs.to_vec();
    args.extend(["-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,"].map(String::from));
    for f in DECODED_FIELDS {
        args.extend(["-e".to_string(), f.to_string()]);
    }
    let out = pcap.tshark(&args).expect("tshark");
    out.lines()
        .map(|row| {
            let f: Vec<&str> = row.split('\t').collect();
            assert_eq!(f.len(), DECODED_FIELDS.len(), "{row:?}");
            let flag = |s: &str| s == "1" || s == "True";
            let list = |s: &str| -> Vec<String> {
                s.split(',')
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect()
            };
            Decoded {
                spi: f[0].to_string(),
                seq: f[1].parse().unwrap_or(0),
                iv: u64::from_str_radix(f[2], 16).unwrap_or(u64::MAX),
                next_header: f[3]
                    .strip_prefix("0x")
                    .and_then(|h| u8::from_str_radix(h, 16).ok()),
                icv_good: flag(f[4]),
                icv_bad: flag(f[5]),
                ip_src: list(f[6]),
                ip_dst: list(f[7]),
                icmp_type: f[8].parse().ok(),
                tcp_src: f[9].parse().ok(),
                tcp_dst: f[10].parse().ok(),
                tcp_syn: flag(f[11]),
                tcp_ack: flag(f[12]),
                tcp_len: f[13].parse().unwrap_or(0),
            }
        })
        .collect()
}

/// tshark, given only the SA keys, decrypts the captured underlay traffic of a ping and a TCP
/// transfer and sees the inner ICMP and TCP packets between the workloads: the tunnel speaks
/// standard ESP (RFC 4303/4106/3948). Without ESN tshark 4.0 also verifies every ICV; with ESN
/// it decrypts but cannot check the ICV (its SA table has no ESN setting and it authenticates
/// SPI || seq_lo only, while RFC 4106 with ESN authenticates SPI || seq_hi || seq_lo).
fn tshark_decodes(esn: bool) {
    const BYTES: u64 = 1_000_000;
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let template = EspPeerConfig {
        esn: Some(esn),
        ..EspPeerConfig::default()
    };
    let pair = EspPair::start(&topo, Cipher::Aes128Gcm, &template).expect("pair");
    let (a, b) = (topo.site(1), topo.site(2));
    let cap = Capture::start(
        topo.run(),
        &a.gw_ns,
        &a.underlay_if,
        Some(&format!("udp port {ESP_PORT}")),
    )
    .expect("capture");
    assert!(
        ping_all(&a.wl_ns, b.workload_addr.into(), 3),
        "{}",
        pair.diagnostics()
    );
    let canary = b"isthmus-esp-canary-7d1f".to_vec();
    let port = 7301;
    let report = tcp_transfer(
        &a.wl_ns,
        &b.wl_ns,
        IpAddr::V4(b.workload_addr),
        port,
        BYTES,
        Payload::Pattern(canary.clone()),
    )
    .expect("transfer");
    assert!(report.intact(), "{report:?}");
    let raw = cap.stop().expect("capture");
    assert!(
        !raw.contains(&canary).expect("read pcap"),
        "cleartext payload on the underlay"
    );
    // A capture on veth shows each UDP GSO send as one oversized datagram; split those runs
    // so that tshark sees every ESP packet as the receiver's socket does.
    let (pcap, split) =
        split_gso_frames(&raw, &topo.run().path("esp-split.pcap")).expect("split GSO runs");

    let sa = pair.sa_file(1);
    let mut prefs = sa.tshark_args(a.underlay_addr, b.underlay_addr);
    prefs.extend(["-o".into(), "esp.enable_authentication_check:TRUE".into()]);
    let frames = decode(&pcap, &prefs);
    let (w1, w2) = (a.workload_addr.to_string(), b.workload_addr.to_string());
    let (out_spi, in_spi) = (spi_hex(sa.outbound_spi), spi_hex(sa.inbound_spi));
    let mut ivs: BTreeMap<&str, HashSet<u64>> = BTreeMap::new();
    let (mut requests, mut replies, mut syn, mut syn_ack, mut tcp_bytes) = (0, 0, 0, 0, 0);
    for (i, f) in frames.iter().enumerate() {
        let ctx = || format!("frame {} of {}: {f:?}", i + 1, pcap.path.display());
        assert!(
            f.spi == out_spi || f.spi == in_spi,
            "unknown SPI: {}",
            ctx()
        );
        // Decrypted: the next header (IPv4 = 4) is inside the ciphertext.
        assert_eq!(f.next_header, Some(4), "not decrypted: {}", ctx());
        // The IV is the SA's 64-bit sequence number, never repeated under one key.
        assert_eq!(
            f.iv & 0xffff_ffff,
            f.seq,
            "IV is not the sequence number: {}",
            ctx()
        );
        assert!(
            ivs.entry(&f.spi).or_default().insert(f.iv),
            "IV repeated: {}",
            ctx()
        );
        if esn {
            // tshark 4.0 authenticates without the ESN high half: every ICV looks wrong to it.
            assert!(f.icv_bad && !f.icv_good, "{}", ctx());
        } else {
            assert!(
                f.icv_good && !f.icv_bad,
                "ICV rejected by tshark: {}",
                ctx()
            );
        }
        let (src, dst) = f
            .inner()
            .unwrap_or_else(|| panic!("no inner IPv4: {}", ctx()));
        let outbound = f.spi == out_spi;
        assert_eq!(
            (src, dst),
            if outbound {
                (w1.as_str(), w2.as_str())
            } else {
                (w2.as_str(), w1.as_str())
            },
            "{}",
            ctx()
        );
        match (f.icmp_type, outbound) {
            (Some(8), true) => requests += 1,
            (Some(0), false) => replies += 1,
            _ => {}
        }
        if outbound && f.tcp_dst == Some(port) {
            syn += usize::from(f.tcp_syn && !f.tcp_ack);
            tcp_bytes += f.tcp_len;
        }
        if !outbound && f.tcp_src == Some(port) {
            syn_ack += usize::from(f.tcp_syn && f.tcp_ack);
        }
    }
    // The inner TCP payload itself.
    let mut args = prefs.clone();
    let canary_str = String::from_utf8(canary).expect("ascii");
    args.extend([
        "-Y".into(),
        format!("tcp.payload contains \"{canary_str}\""),
    ]);
    let with_canary = pcap.tshark(&args).expect("tshark").lines().count();
    eprintln!(
        "ESN {esn}: {} ESP frames ({split} GSO runs split), all decrypted; inner: {requests} \
         echo requests, {replies} replies, {syn} SYN, {syn_ack} SYN-ACK, {tcp_bytes} TCP bytes \
         ({with_canary} segments showing the canary)",
        frames.len()
    );
    assert!(
        requests >= 3 && replies >= 3,
        "{requests} requests, {replies} replies"
    );
    assert!(syn >= 1 && syn_ack >= 1, "{syn} SYN, {syn_ack} SYN-ACK");
    assert!(
        tcp_bytes >= BYTES,
        "only {tcp_bytes} inner TCP payload bytes decoded"
    );
    assert!(
        with_canary >= 100,
        "canary visible in {with_canary} segments only"
    );
}

#[test]
fn tshark_decrypts_esp_with_esn() {
    tshark_decodes(true);
}

#[test]
fn tshark_decrypts_and_authenticates_esp_without_esn() {
    tshark_decodes(false);
}

/// A sequence-numbered UDP stream through SAs that reach their soft lifetime every 2000
/// packets: the sender moves to the next generation ten times, make-before-break, and every
/// datagram arrives exactly once.
#[test]
fn esp_soft_lifetime_rekeys_lose_nothing() {
    const COUNT: u32 = 20_000;
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let template = EspPeerConfig {
        soft_lifetime_packets: Some(2_000),
        hard_lifetime_packets: Some(1_000_000),
        ..EspPeerConfig::default()
    };
    let pair = EspPair::start(&topo, Cipher::Aes128Gcm, &template).expect("pair");
    let (a, b) = (topo.site(1), topo.site(2));
    // Room for the whole stream in the TUN queue towards gateway 1 (500 by default, i.e. 60 ms
    // at this rate): on a loaded machine the gateway may be off the CPU for longer, and the
    // kernel would drop there (counted below), not in the tunnel.
    netns::ip(
        &a.gw_ns,
        &["link", "set", "dev", &a.tunnel_if, "txqueuelen", "25000"],
    )
    .expect("txqueuelen");
    let namespaces = [&a.gw_ns, &b.gw_ns, &b.wl_ns];
    let rcvbuf_before: Vec<u64> = namespaces
        .iter()
        .map(|ns| traffic::udp_rcvbuf_errors(ns).expect("snmp"))
        .collect();
    // Every device on the path, for telling kernel drops from tunnel losses.
    let links = [
        ("wl1", &a.wl_ns, &a.wl_if),
        ("gw1 lan", &a.gw_ns, &a.lan_if),
        ("gw1 tun", &a.gw_ns, &a.tunnel_if),
        ("gw1 underlay", &a.gw_ns, &a.underlay_if),
        ("gw2 underlay", &b.gw_ns, &b.underlay_if),
        ("gw2 tun", &b.gw_ns, &b.tunnel_if),
        ("gw2 lan", &b.gw_ns, &b.lan_if),
        ("wl2", &b.wl_ns, &b.wl_if),
    ];
    let link_drops = || -> Vec<traffic::LinkDrops> {
        links
            .iter()
            .map(|(_, ns, ifname)| traffic::link_drops(ns, ifname).expect("ip -s link"))
            .collect()
    };
    let links_before = link_drops();
    let st_before = pair.status(1).expect("status");
    let report = udp_sequence(
        &a.wl_ns,
        &b.wl_ns,
        SocketAddr::new(IpAddr::V4(b.workload_addr), 7401),
        COUNT,
        200,
        8_000,
    )
    .expect("UDP stream");
    let kernel_drops: Vec<u64> = namespaces
        .iter()
        .zip(&rcvbuf_before)
        .map(|(ns, before)| traffic::udp_rcvbuf_errors(ns).expect("snmp") - before)
        .collect();
    let device_drops: Vec<String> = link_drops()
        .into_iter()
        .zip(&links_before)
        .zip(&links)
        .filter_map(|((after, before), (label, _, _))| {
            let d = after - *before;
            (d != traffic::LinkDrops::default()).then(|| format!("{label}: {d:?}"))
        })
        .collect();
    let (st_a, st_b) = (pair.status(1).expect("a"), pair.status(2).expect("b"));
    let (pa, pb) = (esp_peer(&st_a, 2), esp_peer(&st_b, 1));
    let (ea, eb) = (
        pa.esp.as_ref().expect("esp a"),
        pb.esp.as_ref().expect("esp b"),
    );
    let missing = report.missing();
    let duplicated = report.duplicated();
    eprintln!(
        "{COUNT} datagrams in {:?}: {} missing, {} duplicated, {} reordered; kernel receive \
         buffer drops (gw1, gw2, wl2): {kernel_drops:?}, device drops: {device_drops:?}; sender rekeys {} -> {}, generation {}; \
         receiver inbound SAs {:?}",
        report.send_time,
        missing.len(),
        duplicated.len(),
        report.reordered,
        esp_peer(&st_before, 2).esp.as_ref().expect("esp").rekeys,
        ea.rekeys,
        ea.outbound.generation,
        eb.inbound
            .iter()
            .map(|s| (s.generation, s.packets, s.retiring))
            .collect::<Vec<_>>()
    );
    assert!(
        missing.is_empty() && duplicated.is_empty(),
        "{} missing (first: {:?}), {} duplicated (first: {:?}); kernel receive-buffer drops \
         (gw1, gw2, wl2): {kernel_drops:?}; device drops: {device_drops:?}\nsender: {pa:#?}\nreceiver: {pb:#?}\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        duplicated.len(),
        &duplicated[..duplicated.len().min(20)],
        pair.logs()
    );
    assert!(
        ea.rekeys >= 5 && ea.outbound.generation >= 5,
        "sender did not rekey: {ea:#?}"
    );
    assert_eq!(ea.rekeys, ea.outbound.generation, "{ea:#?}");
    assert_eq!(pa.drops, Default::default(), "{pa:#?}");
    assert_eq!(pb.drops, Default::default(), "{pb:#?}");
    // The receiver follows: the sender's current SA is installed and in use, with the next two
    // ready, and the superseded ones (still in their grace period) are retiring.
    let current = ea.outbound.generation;
    let gens: Vec<u64> = eb.inbound.iter().map(|s| s.generation).collect();
    for g in [current, current + 1, current + 2] {
        assert!(gens.contains(&g), "generation {g} not installed: {eb:#?}");
    }
    for s in &eb.inbound {
        assert_eq!(s.retiring, s.generation < current, "{eb:#?}");
        if s.generation == current {
            assert_eq!(s.spi, ea.outbound.spi, "{eb:#?}");
            assert!(s.packets > 0, "{eb:#?}");
        }
    }
    // No SA carried more than its soft lifetime (plus the packets already in flight).
    assert!(
        eb.inbound
            .iter()
            .filter(|s| s.generation > 0)
            .all(|s| s.packets <= 2_000),
        "{eb:#?}"
    );
    ping_both_ways(&topo, 1, 2, &|| pair.diagnostics());
}

/// Site 1 runs a WireGuard peer (site 2) and an ESP peer (site 3) at the same time.
#[test]
fn mixed_gateway_wireguard_and_esp_peers() {
    let topo = Topology::new(3, Underlay::V4).expect("topology");
    let (s1, s2, s3) = (topo.site(1), topo.site(2), topo.site(3));
    let (k1, k2, k3) = (
        KeyPair::generate().expect("key"),
        KeyPair::generate().expect("key"),
        KeyPair::generate().expect("key"),
    );
    let (sa1, sa3) = esp::keygen(topo.run(), "esp-1-3", Cipher::Aes128Gcm).expect("keygen");
    let wg_peer = |site: &isthmus_e2e::Site, keys: &KeyPair| PeerConfig {
        name: Some(format!("site-{}", site.index)),
        public_key: keys.public.clone(),
        endpoint: Some(site.endpoint(WG_PORT).to_string()),
        allowed_prefixes: vec![site.workload_prefix.clone()],
        persistent_keepalive: None,
    };
    let esp_to = |site: &isthmus_e2e::Site, sa: &esp::SaFile| EspSettings {
        listen_port: Some(ESP_PORT),
        peers: vec![esp::peer_for(site, sa, &EspPeerConfig::default())],
    };
    let run = topo.run();
    // The two single-kind gateways first, so that site 1's first handshake finds site 2.
    let gw2 = IsthmusGateway::start(
        run,
        &s2.gw_ns,
        &k2,
        &isthmus_config(s2, vec![wg_peer(s1, &k1)]),
    )
    .expect("gateway 2 (WireGuard)");
    let gw3 = IsthmusGateway::start_with_esp(
        run,
        &s3.gw_ns,
        &k3,
        &isthmus_config(s3, Vec::new()),
        &esp_to(s1, &sa3),
    )
    .expect("gateway 3 (ESP)");
    // Site 1 also serves Prometheus metrics on its underlay address.
    let metrics_at = s1.endpoint(9586);
    let gw1 = IsthmusGateway::start_with_esp(
        run,
        &s1.gw_ns,
        &k1,
        &GatewayConfig {
            trailer: vec!["[metrics]".into(), format!("listen = \"{metrics_at}\"")],
            ..isthmus_config(s1, vec![wg_peer(s2, &k2)])
        },
        &esp_to(s3, &sa1),
    )
    .expect("gateway 1 (WireGuard + ESP)");
    let before = scrape(&s2.gw_ns, metrics_at);
    let logs = || [&gw1, &gw2, &gw3].map(IsthmusGateway::logs).join("\n");
    for (x, y) in [(1, 2), (2, 1), (1, 3), (3, 1)] {
        assert!(
            traffic::wait_for_ping(
                &topo.site(x).wl_ns,
                topo.site(y).workload_addr.into(),
                Duration::from_secs(10)
            ),
            "wl{x} cannot reach wl{y}\n{}",
            logs()
        );
    }
    ping_both_ways(&topo, 1, 2, &logs);
    ping_both_ways(&topo, 1, 3, &logs);
    transfer(&topo, 2, 1, 7501, 2_000_000);
    transfer(&topo, 1, 3, 7502, 2_000_000);
    // Sites 2 and 3 have no tunnel to each other.
    assert!(!ping_all(&s2.wl_ns, s3.workload_addr.into(), 1));

    let st = gw1.status().expect("status");
    assert_eq!(st.peers.len(), 2, "{st:#?}");
    assert_eq!(st.listen_port, WG_PORT);
    assert_eq!(st.esp_listen_port, Some(ESP_PORT));
    let wg = st.require_peer(&k2.public).expect("WireGuard peer");
    assert_eq!(wg.kind, "wireguard", "{wg:#?}");
    assert!(wg.esp.is_none() && wg.handshakes >= 1, "{wg:#?}");
    assert!(wg.rx_bytes >= 2_000_000, "{wg:#?}");
    let ep = esp_peer(&st, 3);
    assert!(ep.tx_bytes >= 2_000_000, "{ep:#?}");
    assert_eq!(
        ep.esp.as_ref().expect("esp").outbound.spi,
        spi_hex(sa1.outbound_spi)
    );
    for p in [wg, ep] {
        assert_eq!(p.drops, Default::default(), "{p:#?}");
    }
    // /metrics, scraped from another host and parsed by an independent parser, agrees with
    // the status and its counters moved with the traffic; no key appears in it.
    let after = scrape(&s2.gw_ns, metrics_at);
    let value = |m: &Metrics, name: &str, peer: &str| -> f64 {
        m.value(name, &[("peer", peer)])
            .unwrap_or_else(|| panic!("no {name} for {peer} in /metrics"))
    };
    for (peer, kind) in [("site-2", "wireguard"), ("site-3", "esp")] {
        let sample = after
            .samples
            .iter()
            .find(|x| {
                x.metric == "isthmus_peer_rx_bytes_total" && x.labels.get("peer") == Some(peer)
            })
            .expect("rx bytes");
        assert_eq!(sample.labels.get("kind"), Some(kind));
        for name in ["isthmus_peer_rx_bytes_total", "isthmus_peer_tx_bytes_total"] {
            assert!(
                value(&after, name, peer) > value(&before, name, peer),
                "{name} of {peer} did not move"
            );
        }
    }
    assert!(value(&after, "isthmus_peer_rx_bytes_total", "site-2") >= wg.rx_bytes as f64);
    assert!(value(&after, "isthmus_peer_handshakes_total", "site-2") >= 1.0);
    assert_eq!(value(&after, "isthmus_esp_sa_generation", "site-3"), 0.0);
    assert!(
        !after.text.contains(&k1.private),
        "the private key in /metrics"
    );
    // Each single-kind gateway sees its one peer.
    let st2 = gw2.status().expect("status 2");
    assert_eq!(st2.peers.len(), 1);
    assert_eq!(st2.esp_listen_port, None, "{st2:#?}");
    assert!(st2.require_peer(&k1.public).expect("peer").handshakes >= 1);
    let st3 = gw3.status().expect("status 3");
    assert!(esp_peer(&st3, 1).rx_bytes >= 2_000_000);
}

/// `isthmusctl sa rotate` is hitless: while a sequence-numbered UDP stream (bounded rate and
/// count) and a TCP transfer run through the tunnel, both gateways get 20 rotations each from
/// the CLI, one after the other; every number arrives exactly once, the transfer's SHA-256
/// matches, every rotation was applied (generation 20 each way), nothing was dropped.
#[test]
fn sa_rotate_from_isthmusctl_loses_nothing() {
    const COUNT: u32 = 12_000;
    const ROTATIONS: u64 = 20;
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let pair = EspPair::start(&topo, Cipher::Aes256Gcm, &EspPeerConfig::default()).expect("pair");
    let (a, b) = (topo.site(1), topo.site(2));
    for (site, ns) in [(a, &a.gw_ns), (b, &b.gw_ns)] {
        netns::ip(
            ns,
            &["link", "set", "dev", &site.tunnel_if, "txqueuelen", "25000"],
        )
        .expect("txqueuelen");
    }
    // A stream each way (5 s each), so that both senders have packets to
    // carry every rotation; and a TCP transfer (data one way, ACKs the other).
    let stream = |from: &isthmus_e2e::Site, to: &isthmus_e2e::Site, port: u16, rate: u32| {
        let (src, dst) = (from.wl_ns.clone(), to.wl_ns.clone());
        let addr = SocketAddr::new(IpAddr::V4(to.workload_addr), port);
        std::thread::spawn(move || udp_sequence(&src, &dst, addr, rate * 5, 200, rate))
    };
    let streams = [stream(a, b, 7411, COUNT / 5), stream(b, a, 7413, 1_000)];
    let transfer = {
        let (src, dst, to) = (
            a.wl_ns.clone(),
            b.wl_ns.clone(),
            IpAddr::V4(b.workload_addr),
        );
        std::thread::spawn(move || tcp_transfer(&src, &dst, to, 7412, 100 << 20, Payload::Random))
    };
    std::thread::sleep(Duration::from_millis(300));
    let rotate = |gw: &IsthmusGateway, peer: &str| {
        let out = std::process::Command::new(isthmus_e2e::bins::ctl())
            .args(["sa", "rotate", "--peer", peer, "--wait", "5", "--socket"])
            .arg(&gw.admin_socket)
            .output()
            .expect("isthmusctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains(" -> "),
            "sa rotate: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for _ in 0..ROTATIONS {
        rotate(pair.gateway(1), "site-2");
        rotate(pair.gateway(2), "site-1");
    }
    let [forth, back] = streams.map(|t| t.join().expect("stream thread").expect("UDP stream"));
    assert!(
        back.exactly_once(),
        "reverse stream: missing {:?}",
        back.missing()
    );
    let report = forth;
    let tcp = transfer
        .join()
        .expect("transfer thread")
        .expect("TCP transfer");
    let (st_a, st_b) = (pair.status(1).expect("a"), pair.status(2).expect("b"));
    let (pa, pb) = (esp_peer(&st_a, 2), esp_peer(&st_b, 1));
    let (ea, eb) = (
        pa.esp.as_ref().expect("esp a"),
        pb.esp.as_ref().expect("esp b"),
    );
    eprintln!(
        "{COUNT} datagrams in {:?} with {ROTATIONS} rotations each way: {} missing, {} \
         duplicated, {} reordered; TCP {:.0} Mbit/s; generations {} / {}",
        report.send_time,
        report.missing().len(),
        report.duplicated().len(),
        report.reordered,
        tcp.mbit_per_s(),
        ea.outbound.generation,
        eb.outbound.generation
    );
    assert!(
        report.exactly_once(),
        "missing {:?}, duplicated {:?}\n{pa:#?}\n{pb:#?}",
        &report.missing()[..report.missing().len().min(20)],
        &report.duplicated()[..report.duplicated().len().min(20)]
    );
    assert!(tcp.intact(), "{tcp:?}");
    assert_eq!(ea.outbound.generation, ROTATIONS, "{ea:#?}");
    assert_eq!(eb.outbound.generation, ROTATIONS, "{eb:#?}");
    assert_eq!(pa.drops, Default::default(), "{pa:#?}");
    assert_eq!(pb.drops, Default::default(), "{pb:#?}");
}
