//! Moves packets between the TUN device and UDP sockets.
//!
//! Three kinds of threads, each owning its buffers (nothing is allocated per
//! packet):
//! - **outbound** (one): reads the TUN device with virtio-net offloads, so the
//!   kernel may hand over a 64 KB TCP super-segment in one read, which
//!   `tun-rs` splits into MTU-sized packets; encrypts them into one contiguous
//!   buffer and sends runs of equal-sized datagrams to the same endpoint as
//!   one UDP GSO `sendmsg`.
//! - **inbound** (one per socket): receives batches of datagrams
//!   (`recvmmsg` with UDP GRO, via quinn-udp), decrypts them, and writes the
//!   packets to the TUN device in one batch whose TCP segments `tun-rs`
//!   coalesces (GRO) into super-segments.
//! - **timers** (one): runs WireGuard's handshake, keepalive and rekey timers
//!   every 250 ms.
//!
//! Per-flow order is kept: one thread per direction.

use crate::wg::{Inbound, Outbound, WgCore, WG_HANDSHAKE_INIT_LEN, WG_OVERHEAD};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tun_rs::{DeviceBuilder, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Socket buffer size asked for (with the FORCE variants when root).
const SOCKET_BUFFER: usize = 8 << 20;
/// Largest IP packet the TUN device can hand over (a TSO super-segment).
const MAX_IP_PACKET: usize = 65535;
/// Largest UDP payload on a GSO send.
const MAX_GSO_BYTES: usize = 65000;

/// Errors starting the data plane. Each names the resource that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    #[error("creating TUN device {name}: {source}")]
    Tun { name: String, source: io::Error },
    #[error("binding UDP port {port}: {source}")]
    Bind { port: u16, source: io::Error },
    #[error("setting up UDP socket: {0}")]
    Socket(io::Error),
    #[error("starting thread: {0}")]
    Thread(io::Error),
}

/// Settings for [`Driver::start`].
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub ifname: String,
    pub mtu: u16,
    /// UDP port; 0 picks a free one.
    pub listen_port: u16,
    /// Ask for virtio-net offloads on the TUN device (falls back without).
    pub offload: bool,
}

/// One bound UDP socket and quinn-udp's state for it.
struct Socket {
    sock: UdpSocket,
    state: UdpSocketState,
    /// A dual-stack IPv6 socket: IPv4 peers are addressed as v4-mapped.
    v6: bool,
}

impl Socket {
    fn bind(addr: SocketAddr, dual_stack: bool) -> io::Result<Self> {
        let domain = socket2::Domain::for_address(addr);
        let sock =
            socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if addr.is_ipv6() {
            sock.set_only_v6(!dual_stack)?;
        }
        sock.bind(&addr.into())?;
        let sock: UdpSocket = sock.into();
        force_buffer_sizes(&sock);
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        Ok(Self {
            sock,
            state,
            v6: addr.is_ipv6(),
        })
    }

    fn wire_addr(&self, to: SocketAddr) -> Option<SocketAddr> {
        match (self.v6, to) {
            (true, SocketAddr::V4(v4)) => Some(SocketAddr::new(
                IpAddr::V6(v4.ip().to_ipv6_mapped()),
                v4.port(),
            )),
            (false, SocketAddr::V6(v6)) => {
                let v4 = v6.ip().to_ipv4_mapped()?;
                Some(SocketAddr::new(IpAddr::V4(v4), v6.port()))
            }
            _ => Some(to),
        }
    }

    /// Sends `contents`, `segment` bytes per datagram (the last may be
    /// shorter). Errors are logged and the datagrams dropped: UDP is lossy
    /// and WireGuard recovers.
    fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) {
        let Some(destination) = self.wire_addr(to) else {
            tracing::debug!(%to, "no socket for this address family");
            return;
        };
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: (contents.len() > segment).then_some(segment),
            src_ip: None,
        };
        if let Err(e) = self.state.send(UdpSockRef::from(&self.sock), &transmit) {
            tracing::debug!(%to, error = %e, "send failed");
        }
    }
}

fn set_sockopt(fd: i32, name: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: `fd` is an open socket owned by the caller for the whole call;
    // the option value points to a live c_int of the length passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Large socket buffers absorb bursts from GSO and TSO; root may exceed
/// `rmem_max` with the FORCE options, others get what the limits allow.
fn force_buffer_sizes(sock: &UdpSocket) {
    let fd = sock.as_raw_fd();
    let size = SOCKET_BUFFER as libc::c_int;
    if !set_sockopt(fd, libc::SO_RCVBUFFORCE, size) {
        set_sockopt(fd, libc::SO_RCVBUF, size);
    }
    if !set_sockopt(fd, libc::SO_SNDBUFFORCE, size) {
        set_sockopt(fd, libc::SO_SNDBUF, size);
    }
}

/// The running data plane. Dropping it stops the threads at their next
/// wake-up; the TUN device goes away when the process closes its descriptor.
pub struct Driver {
    core: Arc<WgCore>,
    listen_port: u16,
    offload: bool,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("listen_port", &self.listen_port)
            .field("offload", &self.offload)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Creates the TUN device, binds the UDP socket(s) and starts the threads.
    pub fn start(core: Arc<WgCore>, cfg: &DriverConfig) -> Result<Self, DriverError> {
        let tun_err = |source| DriverError::Tun {
            name: cfg.ifname.clone(),
            source,
        };
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(cfg.ifname.clone())
                .mtu(cfg.mtu)
                .offload(offload)
                .enable(true)
                .build_sync()
        };
        let (tun, offload) = match build(cfg.offload) {
            Ok(dev) => (dev, cfg.offload),
            Err(e) if cfg.offload => {
                tracing::warn!(error = %e, "TUN offloads unavailable, running without");
                (build(false).map_err(tun_err)?, false)
            }
            Err(e) => return Err(tun_err(e)),
        };
        let tun = Arc::new(tun);

        let sockets = bind_sockets(cfg.listen_port)?;
        let listen_port = sockets[0]
            .sock
            .local_addr()
            .map_err(DriverError::Socket)?
            .port();
        let sockets: Vec<Arc<Socket>> = sockets.into_iter().map(Arc::new).collect();

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(DriverError::Thread)
        };
        for (i, sock) in sockets.iter().enumerate() {
            let (core, tun, sock, stop) = (core.clone(), tun.clone(), sock.clone(), stop.clone());
            threads.push(spawn(
                &format!("inbound-{i}"),
                Box::new(move || inbound_loop(&core, &tun, &sock, &stop, offload)),
            )?);
        }
        {
            let (core, tun, socks, stop) =
                (core.clone(), tun.clone(), sockets.clone(), stop.clone());
            let mtu = cfg.mtu;
            threads.push(spawn(
                "outbound",
                Box::new(move || outbound_loop(&core, &tun, &socks, &stop, mtu)),
            )?);
        }
        {
            let (core, socks, stop) = (core.clone(), sockets.clone(), stop.clone());
            threads.push(spawn(
                "timers",
                Box::new(move || timer_loop(&core, &socks, &stop)),
            )?);
        }
        tracing::info!(
            ifname = %cfg.ifname,
            listen_port,
            offload,
            gso_segments = sockets[0].state.max_gso_segments(),
            gro_segments = sockets[0].state.gro_segments(),
            "data plane up"
        );
        Ok(Self {
            core,
            listen_port,
            offload,
            stop,
            threads,
        })
    }

    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }
    /// Whether the TUN device runs with virtio-net offloads.
    pub fn offload(&self) -> bool {
        self.offload
    }
    pub fn core(&self) -> &Arc<WgCore> {
        &self.core
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Threads blocked in a read stay parked until the process exits;
        // detach them rather than hang here.
        self.threads.clear();
    }
}

/// A dual-stack socket where IPv6 works, else IPv4 only.
fn bind_sockets(port: u16) -> Result<Vec<Socket>, DriverError> {
    let bind_err = |source| DriverError::Bind { port, source };
    match Socket::bind(
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        true,
    ) {
        Ok(s) => Ok(vec![s]),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(bind_err(e)),
        Err(e) => {
            tracing::info!(error = %e, "no IPv6 underlay socket; using IPv4 only");
            let s = Socket::bind(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                false,
            )
            .map_err(bind_err)?;
            Ok(vec![s])
        }
    }
}

fn pick_socket(socks: &[Arc<Socket>], to: SocketAddr) -> &Socket {
    socks
        .iter()
        .find(|s| s.v6 || to.is_ipv4())
        .unwrap_or(&socks[0])
}

/// Collects encrypted datagrams in one buffer and sends runs of equal-sized
/// datagrams to one endpoint as a single GSO send.
struct GsoBatcher {
    buf: Vec<u8>,
    /// Where the next datagram is written.
    pos: usize,
    run: Option<Run>,
    max_segments: usize,
}

struct Run {
    to: SocketAddr,
    start: usize,
    segment: usize,
    count: usize,
    /// A shorter datagram ended the run; GSO allows only the last to be short.
    closed: bool,
}

impl GsoBatcher {
    fn new(capacity: usize, max_segments: usize) -> Self {
        Self {
            buf: vec![0; capacity],
            pos: 0,
            run: None,
            max_segments: max_segments.max(1),
        }
    }

    /// Space for the next datagram, at least `needed` bytes.
    fn slot(&mut self, socks: &[Arc<Socket>], needed: usize) -> &mut [u8] {
        if self.buf.len() - self.pos < needed {
            self.flush(socks);
            self.pos = 0;
        }
        &mut self.buf[self.pos..]
    }

    /// The datagram just written to the slot is `len` bytes for `to`.
    fn commit(&mut self, socks: &[Arc<Socket>], to: SocketAddr, len: usize) {
        let extends = self.run.as_ref().is_some_and(|r| {
            r.to == to
                && !r.closed
                && len <= r.segment
                && r.count < self.max_segments
                && (self.pos - r.start) + len <= MAX_GSO_BYTES
        });
        if extends {
            if let Some(r) = self.run.as_mut() {
                r.count += 1;
                r.closed = len < r.segment;
            }
        } else {
            self.flush_run(socks);
            self.run = Some(Run {
                to,
                start: self.pos,
                segment: len,
                count: 1,
                closed: false,
            });
        }
        self.pos += len;
    }

    /// Sends the datagram just written to the slot on its own (a handshake
    /// initiation), after the run before it.
    fn send_alone(&mut self, socks: &[Arc<Socket>], to: SocketAddr, len: usize) {
        self.flush_run(socks);
        let datagram = &self.buf[self.pos..self.pos + len];
        pick_socket(socks, to).send(to, datagram, len);
    }

    fn flush_run(&mut self, socks: &[Arc<Socket>]) {
        if let Some(r) = self.run.take() {
            pick_socket(socks, r.to).send(r.to, &self.buf[r.start..self.pos], r.segment);
        }
    }

    fn flush(&mut self, socks: &[Arc<Socket>]) {
        self.flush_run(socks);
        self.pos = 0;
    }
}

fn outbound_loop(
    core: &WgCore,
    tun: &SyncDevice,
    socks: &[Arc<Socket>],
    stop: &AtomicBool,
    mtu: u16,
) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_IP_PACKET];
    let packet_cap = (usize::from(mtu) + 64).max(1500);
    let mut bufs = vec![vec![0u8; packet_cap]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let max_segments = socks[0].state.max_gso_segments();
    let mut batch = GsoBatcher::new(
        IDEAL_BATCH_SIZE * (packet_cap + WG_OVERHEAD + 16),
        max_segments,
    );
    while !stop.load(Ordering::Relaxed) {
        let n = match tun.recv_multiple(&mut original, &mut bufs, &mut sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if is_fatal(&e) {
                    tracing::error!(error = %e, "TUN read failed; outbound path stops");
                    return;
                }
                tracing::debug!(error = %e, "TUN read: packet skipped");
                continue;
            }
        };
        let set = core.peers();
        for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
            let packet = &buf[..size];
            let needed = (size + WG_OVERHEAD + 16).max(WG_HANDSHAKE_INIT_LEN);
            let slot = batch.slot(socks, needed);
            match core.encapsulate(&set, packet, &mut slot[..needed]) {
                Outbound::Send {
                    to,
                    len,
                    data: true,
                } => batch.commit(socks, to, len),
                Outbound::Send {
                    to,
                    len,
                    data: false,
                } => batch.send_alone(socks, to, len),
                Outbound::Dropped(_) => {}
            }
        }
        batch.flush(socks);
    }
}

fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF) | Some(libc::EBADFD) | Some(libc::ENODEV)
    )
}

fn inbound_loop(core: &WgCore, tun: &SyncDevice, sock: &Socket, stop: &AtomicBool, offload: bool) {
    let batch = quinn_udp::BATCH_SIZE.max(1);
    let gro = sock.state.gro_segments().max(1);
    let rx_len = if gro > 1 { 65535 } else { 2048 };
    let mut rx_bufs = vec![vec![0u8; rx_len]; batch];
    let mut metas = vec![RecvMeta::default(); batch];
    // The TUN writes: each packet after a virtio-net header's room.
    let hdr = if offload { VIRTIO_NET_HDR_LEN } else { 0 };
    let mut out: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| Vec::with_capacity(hdr + MAX_IP_PACKET))
        .collect();
    let mut ready = 0usize;
    let mut gro_table = GROTable::default();
    let mut flush = |out: &mut Vec<Vec<u8>>, ready: &mut usize| {
        if *ready > 0 {
            if let Err(e) = tun.send_multiple(&mut gro_table, &mut out[..*ready], hdr) {
                tracing::debug!(error = %e, "TUN write failed");
            }
            *ready = 0;
        }
    };
    let _ = sock.sock.set_read_timeout(Some(Duration::from_millis(500)));
    while !stop.load(Ordering::Relaxed) {
        let n = {
            let mut slices: Vec<IoSliceMut<'_>> =
                rx_bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match sock
                .state
                .recv(UdpSockRef::from(&sock.sock), &mut slices, &mut metas)
            {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive failed");
                    continue;
                }
            }
        };
        let set = core.peers();
        for (meta, buf) in metas.iter().zip(&rx_bufs).take(n) {
            let from = SocketAddr::new(meta.addr.ip().to_canonical(), meta.addr.port());
            let stride = meta.stride.max(1);
            for datagram in buf[..meta.len.min(buf.len())].chunks(stride) {
                if ready == out.len() {
                    flush(&mut out, &mut ready);
                }
                let slot = &mut out[ready];
                slot.clear();
                slot.resize(hdr + datagram.len(), 0);
                let mut reply = |to: SocketAddr, bytes: &[u8]| sock.send(to, bytes, bytes.len());
                match core.decapsulate(&set, from, datagram, &mut slot[hdr..], &mut reply) {
                    Inbound::Tun { offset, len } => {
                        if offset != 0 {
                            slot.copy_within(hdr + offset..hdr + offset + len, hdr);
                        }
                        slot.truncate(hdr + len);
                        ready += 1;
                    }
                    Inbound::Consumed | Inbound::Dropped(_) => {}
                }
            }
        }
        flush(&mut out, &mut ready);
    }
}

fn timer_loop(core: &WgCore, socks: &[Arc<Socket>], stop: &AtomicBool) {
    let mut scratch = vec![0u8; 2048];
    let mut send =
        |to: SocketAddr, bytes: &[u8]| pick_socket(socks, to).send(to, bytes, bytes.len());
    core.initiate_all(&mut scratch, &mut send);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        core.tick(&mut scratch, &mut send);
    }
}
