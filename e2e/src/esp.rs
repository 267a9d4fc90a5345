//! ESP (IPsec) tunnels between Isthmus gateways: SA files made with `isthmusctl esp-keygen`,
//! a two-site ESP pair over a [`Topology`], and the SA table entries tshark needs to decrypt
//! the captured ESP independently.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::capture::{Frame, Pcap, LINKTYPE_ETHERNET};
use crate::isthmus::{EspPeerConfig, EspSettings, GatewayConfig, IsthmusGateway, Status};
use crate::keys::KeyPair;
use crate::mesh::isthmus_config;
use crate::run::Run;
use crate::topology::{Site, Topology};
use crate::traffic;
use crate::TUNNEL_MTU;

/// The ESP-in-UDP port (RFC 3948) every gateway uses in these topologies.
pub const ESP_PORT: u16 = 4500;

/// tshark's name for AES-GCM with a 16-byte ICV (either key size: the key length tells).
pub const TSHARK_AES_GCM_16: &str = "AES-GCM with 16 octet ICV [RFC4106]";

/// The AEAD of an ESP SA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cipher {
    /// AES-128-GCM, 16-byte ICV.
    #[default]
    Aes128Gcm,
    /// AES-256-GCM, 16-byte ICV.
    Aes256Gcm,
}

impl Cipher {
    /// The name used by `isthmusctl esp-keygen --cipher`, SA files and `isthmusctl status`.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "aes128-gcm",
            Cipher::Aes256Gcm => "aes256-gcm",
        }
    }

    /// AES key length in bytes (the SA file's keys add a 4-byte salt).
    pub fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm => 32,
        }
    }
}

/// A manual-keying SA file (as written by `isthmusctl esp-keygen`): generation 0 of both
/// directions as seen by the gateway that uses it.
#[derive(Clone, Debug)]
pub struct SaFile {
    /// Where it is.
    pub path: PathBuf,
    /// `cipher`.
    pub cipher: String,
    /// SPI of the SA this gateway sends on.
    pub outbound_spi: u32,
    /// Key of that SA: AES key then 4-byte salt, hex.
    pub outbound_key: String,
    /// SPI of the SA this gateway receives on.
    pub inbound_spi: u32,
    /// Key of that SA, hex.
    pub inbound_key: String,
}

fn parse_spi(text: &str) -> Result<u32> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .with_context(|| format!("bad SPI {t:?}"))
}

impl SaFile {
    /// Reads the `key = "value"` lines of an SA file.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let get = |key: &str| -> Result<String> {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
                .with_context(|| format!("no `{key}` in {}", path.display()))
        };
        Ok(SaFile {
            path: path.to_path_buf(),
            cipher: get("cipher")?,
            outbound_spi: parse_spi(&get("outbound_spi")?)?,
            outbound_key: get("outbound_key")?,
            inbound_spi: parse_spi(&get("inbound_spi")?)?,
            inbound_key: get("inbound_key")?,
        })
    }

    /// The `uat:esp_sa` preferences that let tshark decrypt both directions of this tunnel,
    /// for the gateway with underlay address `local` talking to `remote` (generation 0 only:
    /// later generations have HKDF-derived keys that only the gateways know).
    pub fn tshark_sa_prefs(&self, local: IpAddr, remote: IpAddr) -> Vec<String> {
        let family = if local.is_ipv4() { "IPv4" } else { "IPv6" };
        [
            (local, remote, self.outbound_spi, &self.outbound_key),
            (remote, local, self.inbound_spi, &self.inbound_key),
        ]
        .iter()
        .map(|(src, dst, spi, key)| {
            format!(
                "uat:esp_sa:\"{family}\",\"{src}\",\"{dst}\",\"{spi:#010x}\",\"{TSHARK_AES_GCM_16}\",\
                 \"0x{key}\",\"NULL\",\"\""
            )
        })
        .collect()
    }

    /// `-o …` arguments for tshark: ESP decryption on, plus [`SaFile::tshark_sa_prefs`].
    pub fn tshark_args(&self, local: IpAddr, remote: IpAddr) -> Vec<String> {
        let mut args = vec![
            "-o".to_string(),
            "esp.enable_encryption_decode:TRUE".to_string(),
        ];
        for p in self.tshark_sa_prefs(local, remote) {
            args.push("-o".into());
            args.push(p);
        }
        args
    }
}

/// Runs `isthmusctl esp-keygen` and returns the mirrored pair `(local, remote)` of SA files,
/// written as `<label>-a.sa` and `<label>-b.sa` in the run dir (mode 0600).
pub fn keygen(run: &Run, label: &str, cipher: Cipher) -> Result<(SaFile, SaFile)> {
    let local = run.path(&format!("{label}-a.sa"));
    let remote = run.path(&format!("{label}-b.sa"));
    let (l, r) = (local.to_string_lossy(), remote.to_string_lossy());
    let args = [
        "esp-keygen",
        "--local",
        l.as_ref(),
        "--remote",
        r.as_ref(),
        "--cipher",
        cipher.name(),
    ];
    let out = crate::isthmus::isthmusctl(&args)?;
    crate::cmd::check("isthmusctl", &args, &out)?;
    let (a, b) = (SaFile::read(&local)?, SaFile::read(&remote)?);
    if a.outbound_spi != b.inbound_spi || a.outbound_key != b.inbound_key {
        bail!("esp-keygen wrote SA files that do not mirror each other: {a:?} / {b:?}");
    }
    if a.outbound_key.len() != 2 * (cipher.key_len() + 4) {
        bail!("{} key of unexpected length in {a:?}", cipher.name());
    }
    Ok((a, b))
}

/// The ESP peer entry for reaching `remote` (its workload prefix at its ESP endpoint) with SA
/// file `sa`; lifetimes and ESN come from `template`.
pub fn peer_for(remote: &Site, sa: &SaFile, template: &EspPeerConfig) -> EspPeerConfig {
    EspPeerConfig {
        name: Some(format!("site-{}", remote.index)),
        endpoint: Some(remote.endpoint(ESP_PORT).to_string()),
        allowed_prefixes: vec![remote.workload_prefix.clone()],
        sa_file: Some(sa.path.clone()),
        ..template.clone()
    }
}

/// Two Isthmus gateways (sites 1 and 2 of a topology) with only an ESP peer each. Drop it
/// before the topology (declare it after).
#[derive(Debug)]
pub struct EspPair {
    /// The gateways, site 1 first.
    pub gateways: Vec<IsthmusGateway>,
    /// The SA file of each gateway, site 1 first (site 2's mirrors site 1's).
    pub sa_files: Vec<SaFile>,
}

impl EspPair {
    /// Makes SA files for `cipher`, starts a gateway at sites 1 and 2 of `topo` with one ESP
    /// peer each (options from `template`, e.g. lifetimes), and waits until the workloads ping
    /// each other.
    pub fn start(topo: &Topology, cipher: Cipher, template: &EspPeerConfig) -> Result<Self> {
        Self::start_with_mtu(topo, cipher, template, Some(TUNNEL_MTU))
    }

    /// [`EspPair::start`] with TUN MTU `mtu` (`None`: the gateway's default).
    ///
    /// Mind the overhead: ESP in UDP adds up to 37 bytes (SPI, sequence number, IV, 0–3 bytes
    /// of padding, pad length, next header, ICV) plus UDP and IP headers, 85 bytes over IPv6 —
    /// 5 more than WireGuard, so a 1420-byte inner packet does not fit a 1500-byte IPv6
    /// underlay (1418 is the largest that does).
    pub fn start_with_mtu(
        topo: &Topology,
        cipher: Cipher,
        template: &EspPeerConfig,
        mtu: Option<u32>,
    ) -> Result<Self> {
        let (sa_a, sa_b) = keygen(topo.run(), "esp-1-2", cipher)?;
        let (a, b) = (topo.site(1), topo.site(2));
        let mut gateways = Vec::new();
        for (me, other, sa) in [(a, b, &sa_a), (b, a, &sa_b)] {
            let esp = EspSettings {
                listen_port: Some(ESP_PORT),
                peers: vec![peer_for(other, sa, template)],
            };
            let config = GatewayConfig {
                mtu,
                ..isthmus_config(me, Vec::new())
            };
            gateways.push(IsthmusGateway::start_with_esp(
                topo.run(),
                &me.gw_ns,
                &KeyPair::generate()?,
                &config,
                &esp,
            )?);
        }
        let pair = EspPair {
            gateways,
            sa_files: vec![sa_a, sa_b],
        };
        for (from, to) in [(a, b), (b, a)] {
            if !traffic::wait_for_ping(
                &from.wl_ns,
                to.workload_addr.into(),
                Duration::from_secs(10),
            ) {
                bail!(
                    "workload {} cannot ping workload {} over ESP\n{}",
                    from.index,
                    to.index,
                    pair.logs()
                );
            }
        }
        Ok(pair)
    }

    /// The gateway at site `i` (1 or 2).
    pub fn gateway(&self, i: usize) -> &IsthmusGateway {
        &self.gateways[i - 1]
    }

    /// The SA file of site `i` (1 or 2).
    pub fn sa_file(&self, i: usize) -> &SaFile {
        &self.sa_files[i - 1]
    }

    /// `isthmusctl status` of site `i`.
    pub fn status(&self, i: usize) -> Result<Status> {
        self.gateway(i).status()
    }

    /// Both gateways' status and logs, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (i, gw) in self.gateways.iter().enumerate() {
            match gw.status() {
                Ok(st) => out.push_str(&format!("status of site {}: {st:#?}\n", i + 1)),
                Err(e) => out.push_str(&format!("status of site {}: {e:#}\n", i + 1)),
            }
        }
        out + &self.logs()
    }

    /// Logs of both gateways, for failure messages.
    pub fn logs(&self) -> String {
        self.gateways
            .iter()
            .map(IsthmusGateway::logs)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Smallest ESP packet: SPI, sequence number, IV, pad length, next header, ICV.
const ESP_MIN_LEN: usize = 8 + 8 + 2 + 16;

/// The ESP packets in the payload of one captured UDP datagram: itself, or, for a UDP GSO send
/// (a run of equal-size ESP packets that a capture on veth shows unsegmented as one oversized
/// datagram), each packet of the run. A run is recognised by every segment starting with the
/// same SPI and the next sequence number (low 32 bits).
pub fn esp_packets(payload: &[u8]) -> Vec<&[u8]> {
    let whole = vec![payload];
    if payload.len() < 2 * ESP_MIN_LEN {
        return whole;
    }
    let spi = &payload[..4];
    let seq = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
    let starts_run = |at: usize, i: u32| {
        payload.get(at..at + 4) == Some(spi)
            && payload.get(at + 4..at + 8) == Some(&seq.wrapping_add(i).to_be_bytes()[..])
    };
    let Some(size) = (ESP_MIN_LEN..=payload.len() - ESP_MIN_LEN).find(|&k| starts_run(k, 1)) else {
        return whole;
    };
    let segments: Vec<&[u8]> = payload.chunks(size).collect();
    let consistent = segments
        .iter()
        .enumerate()
        .all(|(i, seg)| seg.len() >= ESP_MIN_LEN && starts_run(i * size, i as u32));
    if consistent {
        segments
    } else {
        whole
    }
}

fn checksum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    sum
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Offsets of the IP and UDP headers of an Ethernet frame carrying UDP (no VLAN tags, no IPv6
/// extension headers), and whether it is IPv6.
fn udp_offsets(frame: &[u8]) -> Option<(usize, usize, bool)> {
    let l3 = 14;
    match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ihl = usize::from(frame.get(l3)? & 0x0f) * 4;
            (*frame.get(l3 + 9)? == 17 && ihl >= 20).then_some((l3, l3 + ihl, false))
        }
        [0x86, 0xdd] => (*frame.get(l3 + 6)? == 17).then_some((l3, l3 + 40, true)),
        _ => None,
    }
    .filter(|&(_, l4, _)| frame.len() >= l4 + 8)
}

/// The frame `frame` (Ethernet, IP, UDP headers at `l3`/`l4`) with `payload` instead of its UDP
/// payload, lengths and checksums fixed up.
fn with_udp_payload(frame: &[u8], l3: usize, l4: usize, v6: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = frame[..l4 + 8].to_vec();
    let udp_len = (8 + payload.len()) as u16;
    let mut pseudo = 0u32;
    if v6 {
        out[l3 + 4..l3 + 6].copy_from_slice(&udp_len.to_be_bytes());
        pseudo = checksum_add(pseudo, &out[l3 + 8..l3 + 40]);
        pseudo += u32::from(udp_len) + 17;
    } else {
        let total = (l4 - l3) as u16 + udp_len;
        out[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        out[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let ip_sum = checksum_fold(checksum_add(0, &out[l3..l4]));
        out[l3 + 10..l3 + 12].copy_from_slice(&ip_sum.to_be_bytes());
        pseudo = checksum_add(pseudo, &out[l3 + 12..l3 + 20]);
        pseudo += u32::from(udp_len) + 17;
    }
    out[l4 + 4..l4 + 6].copy_from_slice(&udp_len.to_be_bytes());
    out[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let sum = checksum_fold(checksum_add(pseudo, &out[l4..]));
    let sum = if sum == 0 { 0xffff } else { sum };
    out[l4 + 6..l4 + 8].copy_from_slice(&sum.to_be_bytes());
    out
}

/// Writes a copy of `pcap` to `out` in which every frame holding a UDP GSO run of ESP packets
/// (to or from [`ESP_PORT`]) is replaced by one frame per ESP packet (see [`esp_packets`]), so
/// that a decoder sees each packet the way the receiving socket does. Returns the new capture
/// and how many frames were split.
pub fn split_gso_frames(pcap: &Pcap, out: &Path) -> Result<(Pcap, usize)> {
    let mut file = pcap.read()?;
    if file.linktype() != LINKTYPE_ETHERNET {
        bail!(
            "{}: link type {} is not Ethernet",
            pcap.path.display(),
            file.linktype()
        );
    }
    let mut split = 0;
    let mut frames = Vec::with_capacity(file.frames.len());
    for frame in std::mem::take(&mut file.frames) {
        let Some((l3, l4, v6)) = udp_offsets(&frame.data) else {
            frames.push(frame);
            continue;
        };
        let d = &frame.data;
        let ports = [
            u16::from_be_bytes([d[l4], d[l4 + 1]]),
            u16::from_be_bytes([d[l4 + 2], d[l4 + 3]]),
        ];
        let packets = esp_packets(&d[l4 + 8..]);
        if !ports.contains(&ESP_PORT) || packets.len() < 2 {
            frames.push(frame);
            continue;
        }
        split += 1;
        for p in packets {
            let data = with_udp_payload(d, l3, l4, v6, p);
            frames.push(Frame {
                ts_sec: frame.ts_sec,
                ts_frac: frame.ts_frac,
                orig_len: data.len() as u32,
                data,
            });
        }
    }
    file.frames = frames;
    Ok((file.write(out)?, split))
}
