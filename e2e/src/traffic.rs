//! Traffic generators and checks: ping, TCP transfers with SHA-256 on both ends, UDP senders.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use crate::netns;
use crate::topology::Site;

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
    parse_ping_summary(&String::from_utf8_lossy(&out.stdout))
}

/// Like [`ping_stats`], but waits for the replies until `deadline` (ping's `-w`). Without a
/// deadline, once some reply came ping waits only two round-trip times after its last request,
/// so on a loaded machine a reply delayed by a few milliseconds counts as lost.
pub fn ping_stats_until(
    ns: &str,
    addr: IpAddr,
    count: u32,
    deadline: Duration,
) -> Result<(u32, u32)> {
    let count_s = count.to_string();
    let deadline_s = deadline.as_secs().max(1).to_string();
    let addr_s = addr.to_string();
    let out = netns::exec_output(
        ns,
        "ping",
        &[
            "-n",
            "-q",
            "-c",
            &count_s,
            "-i",
            "0.2",
            "-w",
            &deadline_s,
            &addr_s,
        ],
    )?;
    parse_ping_summary(&String::from_utf8_lossy(&out.stdout))
}

/// Whether all of `count` pings (0.2 s apart) from `ns` to `addr` are answered within 2 s
/// plus 0.2 s per ping (see [`ping_stats_until`]).
pub fn ping_all(ns: &str, addr: IpAddr, count: u32) -> bool {
    let deadline = Duration::from_secs(2) + Duration::from_millis(200) * count;
    matches!(
        ping_stats_until(ns, addr, count, deadline),
        Ok((tx, rx)) if rx == count && tx >= count
    )
}

fn parse_ping_summary(text: &str) -> Result<(u32, u32)> {
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
/// Longest time a whole transfer may take (a trickle that never idles long
/// enough for [`IDLE_TIMEOUT`] still fails).
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(180);

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
        let began = Instant::now();
        loop {
            let n = stream
                .read(&mut buf)
                .with_context(|| format!("receiving (after {total} bytes)"))?;
            if n == 0 {
                break;
            }
            if began.elapsed() > TRANSFER_TIMEOUT {
                bail!("transfer not done after {TRANSFER_TIMEOUT:?} ({total} bytes received)");
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
            if start.elapsed() > TRANSFER_TIMEOUT {
                bail!(
                    "transfer not done after {TRANSFER_TIMEOUT:?} ({} bytes sent)",
                    bytes - left
                );
            }
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

/// Sends `bytes` random bytes over TCP from site `from`'s workload to site `to`'s
/// workload and fails unless they arrived intact (same length, same SHA-256).
pub fn transfer_between(from: &Site, to: &Site, port: u16, bytes: u64) -> Result<TransferReport> {
    let report = tcp_transfer(
        &from.wl_ns,
        &to.wl_ns,
        IpAddr::V4(to.workload_addr),
        port,
        bytes,
        Payload::Random,
    )
    .with_context(|| format!("transfer site {} -> site {}", from.index, to.index))?;
    if !report.intact() {
        bail!(
            "transfer site {} -> site {} not intact: {report:?}",
            from.index,
            to.index
        );
    }
    eprintln!(
        "site {} -> site {}: {} bytes in {:?} ({:.0} Mbit/s), sha256 {}",
        from.index,
        to.index,
        report.received_bytes,
        report.elapsed,
        report.mbit_per_s(),
        report.received_sha256
    );
    Ok(report)
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

/// Result of [`udp_sequence`].
#[derive(Clone, Debug)]
pub struct SequenceReport {
    /// Datagrams sent (numbered `0..sent`).
    pub sent: u32,
    /// How many times each number arrived (index = number).
    pub counts: Vec<u32>,
    /// Numbers in arrival order that were lower than one received before them.
    pub reordered: u64,
    /// Time from the first send to the last send.
    pub send_time: Duration,
}

impl SequenceReport {
    /// Numbers that never arrived.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.sent)
            .filter(|&n| self.counts[n as usize] == 0)
            .collect()
    }

    /// Numbers that arrived more than once.
    pub fn duplicated(&self) -> Vec<u32> {
        (0..self.sent)
            .filter(|&n| self.counts[n as usize] > 1)
            .collect()
    }

    /// Whether every number arrived exactly once.
    pub fn exactly_once(&self) -> bool {
        self.counts.iter().all(|&c| c == 1)
    }
}

/// Receive buffer asked for on [`udp_sequence`]'s receiving socket.
pub const SEQUENCE_RCVBUF: usize = 8 << 20;

fn force_rcvbuf(sock: &UdpSocket, bytes: usize) -> Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).context("receive buffer size")?;
    // SAFETY: the descriptor is a live socket owned by `sock`; the option value points at a
    // c_int that outlives the call, and its size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `count` sequence-numbered datagrams of `size` bytes (at least 8: a random run tag and
/// the big-endian number, then filler) from namespace `src_ns` to a socket bound at `dst` in
/// namespace `dst_ns`, paced at about `rate` datagrams per second. The receiver (with a
/// [`SEQUENCE_RCVBUF`] receive buffer) counts every number of this run until 2 s pass without
/// a datagram, or shortly after all numbers arrived. Check [`udp_rcvbuf_errors`] of the
/// namespaces involved to tell kernel socket drops from tunnel losses.
pub fn udp_sequence(
    src_ns: &str,
    dst_ns: &str,
    dst: SocketAddr,
    count: u32,
    size: usize,
    rate: u32,
) -> Result<SequenceReport> {
    if size < 8 || rate == 0 {
        bail!("udp_sequence needs size >= 8 and rate > 0");
    }
    let tag = OsRng.next_u32().to_be_bytes();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let receiver = netns::spawn_in(dst_ns, move || -> Result<(Vec<u32>, u64)> {
        let sock = UdpSocket::bind(dst).with_context(|| format!("bind {dst}"))?;
        force_rcvbuf(&sock, SEQUENCE_RCVBUF)?;
        let _ = ready_tx.send(());
        let mut counts = vec![0u32; count as usize];
        let (mut distinct, mut highest, mut reordered) = (0u32, None::<u32>, 0u64);
        let mut buf = vec![0u8; size.max(2048)];
        // Generous until the first datagram, then 2 s of silence ends the run.
        sock.set_read_timeout(Some(IDLE_TIMEOUT))?;
        loop {
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e).context("recv"),
            };
            if n < 8 || buf[..4] != tag {
                continue;
            }
            let num = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let Some(slot) = counts.get_mut(num as usize) else {
                continue;
            };
            *slot += 1;
            if *slot == 1 {
                distinct += 1;
            }
            match highest {
                Some(h) if num < h => reordered += 1,
                _ => highest = Some(num),
            }
            let idle = if distinct == count {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(2)
            };
            sock.set_read_timeout(Some(idle))?;
        }
        Ok((counts, reordered))
    });
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        return netns::join(receiver).and_then(|_| bail!("receiver never became ready"));
    }
    let sender = netns::spawn_in(src_ns, move || -> Result<Duration> {
        let bind: SocketAddr = if dst.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let sock = UdpSocket::bind(bind).context("bind UDP socket")?;
        sock.connect(dst)
            .with_context(|| format!("connect {dst}"))?;
        let mut buf = vec![0xa5u8; size];
        buf[..4].copy_from_slice(&tag);
        let start = Instant::now();
        let mut next = 0u32;
        while next < count {
            let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64 + 1;
            let due = due.min(u64::from(count)) as u32;
            while next < due {
                buf[4..8].copy_from_slice(&next.to_be_bytes());
                sock.send(&buf)
                    .with_context(|| format!("send datagram {next}"))?;
                next += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(start.elapsed())
    });
    let send_time = netns::join(sender).context("UDP sender")?;
    let (counts, reordered) = netns::join(receiver).context("UDP receiver")?;
    Ok(SequenceReport {
        sent: count,
        counts,
        reordered,
        send_time,
    })
}

/// Drop counters of a network interface (`ip -s link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkDrops {
    /// Received packets the kernel dropped.
    pub rx_dropped: u64,
    /// Packets the kernel could not transmit (for a TUN device: not queued to the process
    /// reading it because its queue was full).
    pub tx_dropped: u64,
}

impl std::ops::Sub for LinkDrops {
    type Output = LinkDrops;
    fn sub(self, rhs: LinkDrops) -> LinkDrops {
        LinkDrops {
            rx_dropped: self.rx_dropped.saturating_sub(rhs.rx_dropped),
            tx_dropped: self.tx_dropped.saturating_sub(rhs.tx_dropped),
        }
    }
}

/// Drop counters of interface `ifname` in namespace `ns`.
pub fn link_drops(ns: &str, ifname: &str) -> Result<LinkDrops> {
    let out = netns::ip(ns, &["-s", "-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("`ip -j -s link` output: {out}"))?;
    let get = |dir: &str| {
        v.pointer(&format!("/0/stats64/{dir}/dropped"))
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("no {dir} drop counter for {ifname}: {out}"))
    };
    Ok(LinkDrops {
        rx_dropped: get("rx")?,
        tx_dropped: get("tx")?,
    })
}
