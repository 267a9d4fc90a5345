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
    /// TCP source port.
    pub tcp_src: Option<u16>,
    /// TCP destination port.
    pub tcp_dst: Option<u16>,
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

    /// `tshark -n -r FILE args…`, checked; returns stdout (for dissector preferences such as
    /// ESP SAs that [`Pcap::fields`] does not set).
    pub fn tshark<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let path_s = self.path.to_string_lossy().into_owned();
        let mut full = vec!["-n", "-r", path_s.as_str()];
        full.extend(args.iter().map(AsRef::as_ref));
        cmd::run("tshark", &full)
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
                "tcp.srcport",
                "tcp.dstport",
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
                tcp_src: get(10).parse().ok(),
                tcp_dst: get(11).parse().ok(),
            });
        }
        Ok(packets)
    }
}

/// One frame of a classic pcap file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Timestamp, seconds.
    pub ts_sec: u32,
    /// Timestamp, micro- or nanoseconds (as the file's magic says).
    pub ts_frac: u32,
    /// Length on the wire.
    pub orig_len: u32,
    /// The captured bytes.
    pub data: Vec<u8>,
}

/// A classic pcap file, read into memory.
#[derive(Clone, Debug)]
pub struct PcapFile {
    /// The 24-byte global header as read (byte order, timestamp resolution, link type).
    pub header: [u8; 24],
    /// Whether the file is big-endian.
    pub big_endian: bool,
    /// Frames in file order.
    pub frames: Vec<Frame>,
}

/// Link type of Ethernet captures (what tcpdump writes for veth).
pub const LINKTYPE_ETHERNET: u32 = 1;

impl PcapFile {
    /// The link type from the global header.
    pub fn linktype(&self) -> u32 {
        self.u32_at(&self.header[20..24])
    }

    fn u32_at(&self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }

    fn u32_bytes(&self, v: u32) -> [u8; 4] {
        if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }

    /// Writes the file (same header, `frames`) to `path`.
    pub fn write(&self, path: &std::path::Path) -> Result<Pcap> {
        let mut out = self.header.to_vec();
        for f in &self.frames {
            out.extend_from_slice(&self.u32_bytes(f.ts_sec));
            out.extend_from_slice(&self.u32_bytes(f.ts_frac));
            out.extend_from_slice(&self.u32_bytes(f.data.len() as u32));
            out.extend_from_slice(&self.u32_bytes(f.orig_len));
            out.extend_from_slice(&f.data);
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
        Ok(Pcap {
            path: path.to_path_buf(),
        })
    }
}

impl Pcap {
    /// Reads the file as a classic pcap (what `tcpdump -w` writes; not pcapng).
    pub fn read(&self) -> Result<PcapFile> {
        let bytes = self.raw_bytes()?;
        let header: [u8; 24] = bytes
            .get(..24)
            .and_then(|h| h.try_into().ok())
            .with_context(|| format!("{}: shorter than a pcap header", self.path.display()))?;
        let big_endian = match header[..4] {
            [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
            _ => anyhow::bail!("{}: not a classic pcap file", self.path.display()),
        };
        let mut file = PcapFile {
            header,
            big_endian,
            frames: Vec::new(),
        };
        let mut at = 24;
        while at < bytes.len() {
            let rec = bytes
                .get(at..at + 16)
                .with_context(|| format!("{}: truncated record header", self.path.display()))?;
            let (ts_sec, ts_frac) = (file.u32_at(&rec[0..4]), file.u32_at(&rec[4..8]));
            let (incl, orig_len) = (file.u32_at(&rec[8..12]), file.u32_at(&rec[12..16]));
            let data = bytes
                .get(at + 16..at + 16 + incl as usize)
                .with_context(|| format!("{}: truncated frame", self.path.display()))?
                .to_vec();
            file.frames.push(Frame {
                ts_sec,
                ts_frac,
                orig_len,
                data,
            });
            at += 16 + incl as usize;
        }
        Ok(file)
    }
}
