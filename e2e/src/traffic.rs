//! Traffic generators and checks: ping, TCP transfers with SHA-256 on both ends, UDP senders.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use crate::netns;

/// Sends `count` pings (0.2 s apart, 2 s timeout each) from namespace `ns` to `addr`; true iff all
/// of them were answered.
pub fn ping(ns: &str, addr: IpAddr, count: u32) -> bool {
    matches!(ping_stats(ns, addr, count), Ok((tx, rx)) if tx == count && rx == count)
}

/// Like [`ping`] but returns `(transmitted, received)`.
pub fn ping_stats(ns: &str, addr: IpAddr, count: u32) -> Result<(u32, u32)> {
    let count_s = count.to_string();
    let addr_s = addr.to_string();
    let out = netns::exec_output(
        ns,
        "ping",
        &["-n", "-q", "-c", &count_s, "-i", "0.2", "-W", "2", &addr_s],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "5 packets transmitted, 5 received, 0% packet loss, time 801ms"
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("unexpected ping output: {text}"))?;
    let nums: Vec<u32> = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    match nums.as_slice() {
        [tx, rx, ..] => Ok((*tx, *rx)),
        _ => bail!("unexpected ping summary: {line}"),
    }
}

/// Pings once a second-ish until an answer comes or `timeout` passes (the first packets through
/// a WireGuard tunnel wait for the handshake). Returns whether an answer came.
pub fn wait_for_ping(ns: &str, addr: IpAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let addr_s = addr.to_string();
        let ok = netns::exec_output(ns, "ping", &["-n", "-q", "-c", "1", "-W", "1", &addr_s])
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a TCP transfer sends.
#[derive(Clone, Debug)]
pub enum Payload {
    /// Bytes from the OS random generator.
    Random,
    /// The given pattern repeated (e.g. a recognizable canary to look for in captures).
    Pattern(Vec<u8>),
}

/// Result of [`tcp_transfer`].
#[derive(Clone, Debug)]
pub struct TransferReport {
    /// Bytes written by the sender.
    pub sent_bytes: u64,
    /// Bytes read by the receiver.
    pub received_bytes: u64,
    /// SHA-256 (hex) of what the sender wrote.
    pub sent_sha256: String,
    /// SHA-256 (hex) of what the receiver read.
    pub received_sha256: String,
    /// Time from connect to the receiver seeing EOF.
    pub elapsed: Duration,
}

impl TransferReport {
    /// Goodput in Mbit/s.
    pub fn mbit_per_s(&self) -> f64 {
        self.received_bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }

    /// Whether everything arrived intact.
    pub fn intact(&self) -> bool {
        self.sent_bytes == self.received_bytes && self.sent_sha256 == self.received_sha256
    }
}

/// Longest time a transfer may sit without progress before failing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

const CHUNK: usize = 256 * 1024;

/// Sends `bytes` bytes of `payload` over one TCP connection from namespace `src_ns` to a
/// listener on `dst_addr:port` in namespace `dst_ns`; both ends hash what they see.
pub fn tcp_transfer(
    src_ns: &str,
    dst_ns: &str,
    dst_addr: IpAddr,
    port: u16,
    bytes: u64,
    payload: Payload,
) -> Result<TransferReport> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let listen_addr = SocketAddr::new(dst_addr, port);
    let server = netns::spawn_in(dst_ns, move || -> Result<(u64, String, Instant)> {
        let listener =
            TcpListener::bind(listen_addr).with_context(|| format!("bind {listen_addr}"))?;
        listener.set_nonblocking(true)?;
        let _ = ready_tx.send(());
        let deadline = Instant::now() + IDLE_TIMEOUT;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        bail!("no connection to {listen_addr} within {IDLE_TIMEOUT:?}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = stream
                .read(&mut buf)
                .with_context(|| format!("receiving (after {total} bytes)"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        let done = Instant::now();
        Ok((total, hex::encode(hasher.finalize()), done))
    });
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        return netns::join(server).and_then(|_| bail!("server never became ready"));
    }
    let client = netns::spawn_in(src_ns, move || -> Result<(u64, String, Instant)> {
        let mut stream = TcpStream::connect_timeout(&listen_addr, Duration::from_secs(10))
            .with_context(|| format!("connect to {listen_addr}"))?;
        let start = Instant::now();
        stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut pattern_offset = 0usize;
        let mut left = bytes;
        while left > 0 {
            let n = (left.min(CHUNK as u64)) as usize;
            fill(&payload, &mut buf[..n], &mut pattern_offset);
            hasher.update(&buf[..n]);
            stream
                .write_all(&buf[..n])
                .with_context(|| format!("sending (after {} bytes)", bytes - left))?;
            left -= n as u64;
        }
        stream.shutdown(Shutdown::Write)?;
        Ok((bytes, hex::encode(hasher.finalize()), start))
    });
    // On a sender failure, report it at once rather than waiting for the receiver to time out
    // (its thread ends by itself within IDLE_TIMEOUT).
    let (sent_bytes, sent_sha256, start) = netns::join(client).context("TCP sender")?;
    let (received_bytes, received_sha256, done) = netns::join(server).context("TCP receiver")?;
    Ok(TransferReport {
        sent_bytes,
        received_bytes,
        sent_sha256,
        received_sha256,
        elapsed: done.saturating_duration_since(start),
    })
}

fn fill(payload: &Payload, buf: &mut [u8], offset: &mut usize) {
    match payload {
        Payload::Random => OsRng.fill_bytes(buf),
        Payload::Pattern(p) if p.is_empty() => buf.fill(0),
        Payload::Pattern(p) => {
            for b in buf.iter_mut() {
                *b = p[*offset];
                *offset = (*offset + 1) % p.len();
            }
        }
    }
}

/// Sends each datagram in `datagrams` from a fresh UDP socket in namespace `ns` to `dst`,
/// pausing `gap` between datagrams. Returns how many were sent.
pub fn udp_send(
    ns: &str,
    dst: SocketAddr,
    datagrams: Vec<Vec<u8>>,
    gap: Duration,
) -> Result<usize> {
    netns::run_in(ns, move || {
        let bind: SocketAddr = if dst.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let sock = UdpSocket::bind(bind).context("bind UDP socket")?;
        let mut sent = 0;
        for d in &datagrams {
            sock.send_to(d, dst)
                .with_context(|| format!("send_to {dst}"))?;
            sent += 1;
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
        }
        Ok(sent)
    })
}

/// Random bytes.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    OsRng.fill_bytes(&mut v);
    v
}

/// A uniformly random integer in `lo..=hi`.
pub fn random_range(lo: usize, hi: usize) -> usize {
    lo + (OsRng.next_u64() % ((hi - lo + 1) as u64)) as usize
}

/// Datagrams the kernel of namespace `ns` dropped because a UDP socket's receive buffer was full
/// (`RcvbufErrors` of UDP over IPv4 and IPv6), for exact accounting of what a gateway saw.
pub fn udp_rcvbuf_errors(ns: &str) -> Result<u64> {
    let snmp = netns::exec(ns, "cat", &["/proc/net/snmp", "/proc/net/snmp6"])?;
    let mut total = 0;
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp: ")).collect();
    if let [names, values] = udp.as_slice() {
        if let Some(v) = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "RcvbufErrors")
            .and_then(|(_, v)| v.parse::<u64>().ok())
        {
            total += v;
        }
    }
    for line in snmp.lines() {
        let mut it = line.split_whitespace();
        if it.next() == Some("Udp6RcvbufErrors") {
            total += it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Ok(total)
}
