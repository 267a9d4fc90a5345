//! Packet captures with tcpdump, decoded with tshark.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cmd;
use crate::process::ProcessGuard;
use crate::run::Run;

/// A tcpdump capture running in a namespace. [`Capture::stop`] returns the pcap.
#[derive(Debug)]
pub struct Capture {
    proc: ProcessGuard,
    path: PathBuf,
}

impl Capture {
    /// Starts capturing everything (full frames) on interface `iface` of namespace `ns`, with an
    /// optional BPF `filter`, and waits until tcpdump is listening.
    pub fn start(run: &Run, ns: &str, iface: &str, filter: Option<&str>) -> Result<Self> {
        let path = run.path(&format!(
            "{ns}-{iface}-{}.pcap",
            crate::traffic::random_range(0, 1 << 30)
        ));
        let path_s = path.to_string_lossy().into_owned();
        let mut args = vec![
            "-i",
            iface,
            "-w",
            path_s.as_str(),
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-s",
            "0",
            "-n",
        ];
        if let Some(f) = filter {
            args.push(f);
        }
        let mut proc = ProcessGuard::spawn(
            run,
            &format!("tcpdump-{iface}"),
            Some(ns),
            "tcpdump",
            &args,
            &[],
        )?;
        proc.wait_for_output("listening on", Duration::from_secs(10))?;
        Ok(Capture { proc, path })
    }

    /// Stops tcpdump (letting it flush) and returns the capture file.
    pub fn stop(mut self) -> Result<Pcap> {
        // Let the last packets of the action reach the socket before stopping.
        std::thread::sleep(Duration::from_millis(200));
        self.proc.signal(libc::SIGINT);
        self.proc
            .wait_timeout(Duration::from_secs(5))?
            .context("tcpdump did not exit after SIGINT")?;
        Ok(Pcap {
            path: self.path.clone(),
        })
    }
}

/// One decoded frame.
#[derive(Clone, Debug, Default)]
pub struct Packet {
    /// `frame.number`
    pub number: u64,
    /// `frame.len`
    pub len: u64,
    /// `frame.protocols`, e.g. `eth:ethertype:ip:udp:wg`.
    pub protocols: String,
    /// IPv4 or IPv6 source.
    pub src: Option<IpAddr>,
    /// IPv4 or IPv6 destination.
    pub dst: Option<IpAddr>,
    /// UDP source port.
    pub udp_src: Option<u16>,
    /// UDP destination port.
    pub udp_dst: Option<u16>,
    /// WireGuard message type (1 initiation, 2 response, 3 cookie, 4 data).
    pub wg_type: Option<u8>,
}

impl Packet {
    /// Whether the protocol stack contains `proto` (e.g. "arp", "udp", "wg").
    pub fn has(&self, proto: &str) -> bool {
        self.protocols.split(':').any(|p| p == proto)
    }

    /// Link-level housekeeping that is not a tunnel packet: ARP, IPv6 neighbour discovery and
    /// router solicitation, MLD.
    pub fn is_link_housekeeping(&self) -> bool {
        self.has("arp") || (self.has("icmpv6") && !self.has("udp") && !self.has("tcp"))
    }
}

/// A capture file.
#[derive(Clone, Debug)]
pub struct Pcap {
    /// Its path.
    pub path: PathBuf,
}

impl Pcap {
    /// The raw file contents.
    pub fn raw_bytes(&self) -> Result<Vec<u8>> {
        std::fs::read(&self.path).with_context(|| format!("reading {}", self.path.display()))
    }

    /// Whether `needle` occurs anywhere in the raw file.
    pub fn contains(&self, needle: &[u8]) -> Result<bool> {
        let bytes = self.raw_bytes()?;
        Ok(!needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle))
    }

    /// `tshark -r FILE -d udp.port==WG,wg -T fields -e …` for `fields`.
    pub fn fields(&self, wg_port: u16, fields: &[&str]) -> Result<Vec<Vec<String>>> {
        let decode = format!("udp.port=={wg_port},wg");
        let path_s = self.path.to_string_lossy().into_owned();
        let mut args = vec![
            "-n",
            "-r",
            &path_s,
            "-d",
            &decode,
            "-T",
            "fields",
            "-E",
            "separator=\t",
            "-E",
            "occurrence=f",
        ];
        for f in fields {
            args.push("-e");
            args.push(f);
        }
        let out = cmd::run("tshark", &args)?;
        Ok(out
            .lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect())
    }

    /// All frames, decoded.
    pub fn packets(&self, wg_port: u16) -> Result<Vec<Packet>> {
        let rows = self.fields(
            wg_port,
            &[
                "frame.number",
                "frame.len",
                "frame.protocols",
                "ip.src",
                "ip.dst",
                "ipv6.src",
                "ipv6.dst",
                "udp.srcport",
                "udp.dstport",
                "wg.type",
            ],
        )?;
        let mut packets = Vec::with_capacity(rows.len());
        for r in rows {
            let get = |i: usize| r.get(i).map(String::as_str).unwrap_or("");
            let ip = |a: usize, b: usize| get(a).parse().ok().or_else(|| get(b).parse().ok());
            packets.push(Packet {
                number: get(0).parse().unwrap_or(0),
                len: get(1).parse().unwrap_or(0),
                protocols: get(2).to_string(),
                src: ip(3, 5),
                dst: ip(4, 6),
                udp_src: get(7).parse().ok(),
                udp_dst: get(8).parse().ok(),
                wg_type: get(9).parse().ok(),
            });
        }
        Ok(packets)
    }
}
