//! Moves packets between the TUN device and UDP sockets.
//!
//! Three kinds of threads, each owning its buffers (nothing is allocated per
//! packet):
//! - **outbound** (one): reads the TUN device with virtio-net offloads, so the
//!   kernel may hand over a 64 KB TCP super-segment in one read, which
//!   `tun-rs` splits into MTU-sized packets; encrypts them into one contiguous
//!   buffer and sends runs of equal-sized datagrams to the same endpoint as
//!   one UDP GSO `sendmsg`.
//!   Destinations are routed by longest prefix to a WireGuard or an ESP
//!   peer (the gateway keeps the two kinds' prefixes disjoint).
//! - **inbound** (one per socket: WireGuard, ESP): receives batches of datagrams
//!   (`recvmmsg` with UDP GRO, via quinn-udp), decrypts them, and writes the
//!   packets to the TUN device in one batch whose TCP segments `tun-rs`
//!   coalesces (GRO) into super-segments.
//! - **timers** (one): runs WireGuard's handshake, keepalive and rekey timers
//!   every 250 ms.
//!
//! Per-flow order is kept: one thread per direction.

use crate::esp::sa::ESP_MAX_OVERHEAD;
use crate::esp::{EspCore, EspPeerSet};
use crate::wg::{Inbound, Outbound, PeerSet, WgCore, WG_HANDSHAKE_INIT_LEN, WG_OVERHEAD};
use boringtun::noise::Tunn;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
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
    /// WireGuard UDP port; 0 picks a free one.
    pub listen_port: u16,
    /// ESP-in-UDP port (used when there are ESP peers); 0 picks a free one.
    pub esp_listen_port: u16,
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
        // quinn-udp makes the socket non-blocking, and its batched receive
        // relies on that (a blocking recvmmsg would wait for a full batch):
        // our threads wait in poll() instead, so an idle gateway sleeps.
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        Ok(Self {
            sock,
            state,
            v6: addr.is_ipv6(),
        })
    }

    /// A dual-stack socket where IPv6 works, else IPv4 only.
    fn bind_any(port: u16) -> Result<Self, DriverError> {
        let bind_err = |source| DriverError::Bind { port, source };
        match Self::bind(
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            true,
        ) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(bind_err(e)),
            Err(e) => {
                tracing::info!(error = %e, "no IPv6 underlay socket; using IPv4 only");
                Self::bind(
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                    false,
                )
                .map_err(bind_err)
            }
        }
    }

    fn port(&self) -> Result<u16, DriverError> {
        Ok(self.sock.local_addr().map_err(DriverError::Socket)?.port())
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
    /// and both protocols recover.
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
        // A full socket buffer: wait briefly for room rather than drop a
        // whole GSO run at once (bounded, so a stuck peer cannot stall us).
        for _ in 0..SEND_RETRIES {
            match self.state.send(UdpSockRef::from(&self.sock), &transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(self.sock.as_raw_fd(), libc::POLLOUT, SEND_WAIT);
                }
                Err(e) => {
                    tracing::debug!(%to, error = %e, "send failed");
                    return;
                }
                Ok(()) => return,
            }
        }
        tracing::debug!(%to, "socket buffer stayed full; datagrams dropped");
    }
}

/// How often and how long a send waits for room in a full socket buffer.
const SEND_RETRIES: usize = 4;
const SEND_WAIT: Duration = Duration::from_millis(20);
/// How long a receive thread sleeps in poll() before checking for shutdown.
const RECV_WAIT: Duration = Duration::from_millis(500);

/// Waits until `fd` is ready for `events` (POLLIN/POLLOUT) or `timeout`
/// passes; true when ready.
fn wait_ready(fd: i32, events: libc::c_short, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd that lives for the whole call, and
    // `fd` is an open socket owned by the caller.
    let n = unsafe { libc::poll(&mut pfd, 1, millis) };
    n > 0
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

/// The tunnel kinds the data path serves, with their sockets.
struct Tunnels {
    wg: Arc<WgCore>,
    wg_sock: Socket,
    esp: Option<(Arc<EspCore>, Socket)>,
}

/// Which socket a datagram leaves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Wg,
    Esp,
}

impl Tunnels {
    fn socket(&self, via: Via) -> &Socket {
        match (via, &self.esp) {
            (Via::Esp, Some((_, sock))) => sock,
            _ => &self.wg_sock,
        }
    }
}

/// The running data plane. Dropping it stops the threads at their next
/// wake-up; the TUN device goes away when the process closes its descriptor.
pub struct Driver {
    listen_port: u16,
    esp_listen_port: Option<u16>,
    offload: bool,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tunnels: Arc<Tunnels>,
}

/// Sends IKE datagrams from the ESP port (RFC 3948: the non-ESP marker is
/// added here), so the peer sees IKE and ESP on one address and port.
#[derive(Clone)]
pub struct ControlSender {
    tunnels: Arc<Tunnels>,
}

impl std::fmt::Debug for ControlSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSender").finish_non_exhaustive()
    }
}

impl ControlSender {
    /// Sends one IKE message to `to` (lossy, as UDP is: IKE retransmits).
    pub fn send(&self, to: SocketAddr, message: &[u8]) {
        let mut datagram = Vec::with_capacity(4 + message.len());
        datagram.extend_from_slice(&[0, 0, 0, 0]);
        datagram.extend_from_slice(message);
        self.tunnels
            .socket(Via::Esp)
            .send(to, &datagram, datagram.len());
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("listen_port", &self.listen_port)
            .field("esp_listen_port", &self.esp_listen_port)
            .field("offload", &self.offload)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Creates the TUN device, binds the UDP socket(s) and starts the
    /// threads. ESP gets its own socket only when `esp` is given.
    pub fn start(
        wg: Arc<WgCore>,
        esp: Option<Arc<EspCore>>,
        cfg: &DriverConfig,
    ) -> Result<Self, DriverError> {
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

        let wg_sock = Socket::bind_any(cfg.listen_port)?;
        let listen_port = wg_sock.port()?;
        let esp = match esp {
            Some(core) => Some((core, Socket::bind_any(cfg.esp_listen_port)?)),
            None => None,
        };
        let esp_listen_port = esp.as_ref().map(|(_, s)| s.port()).transpose()?;
        let gso_segments = wg_sock.state.max_gso_segments();
        let gro_segments = wg_sock.state.gro_segments();
        let tunnels = Arc::new(Tunnels { wg, wg_sock, esp });

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut spawn = |name: &str, f: Box<dyn FnOnce() + Send>| -> Result<(), DriverError> {
            let handle = std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(DriverError::Thread)?;
            threads.push(handle);
            Ok(())
        };
        {
            let (t, tun, stop) = (tunnels.clone(), tun.clone(), stop.clone());
            spawn(
                "inbound-wg",
                Box::new(move || {
                    inbound_loop(&t.wg_sock, &tun, &stop, offload, |from, dgram, out| {
                        let set = t.wg.peers();
                        let mut reply =
                            |to: SocketAddr, bytes: &[u8]| t.wg_sock.send(to, bytes, bytes.len());
                        t.wg.decapsulate(&set, from, dgram, out, &mut reply)
                    })
                }),
            )?;
        }
        if tunnels.esp.is_some() {
            let (t, tun, stop) = (tunnels.clone(), tun.clone(), stop.clone());
            spawn(
                "inbound-esp",
                Box::new(move || {
                    if let Some((core, sock)) = &t.esp {
                        inbound_loop(sock, &tun, &stop, offload, |from, dgram, out| {
                            let set = core.peers();
                            core.receive(&set, from, dgram, out, Instant::now())
                        })
                    }
                }),
            )?;
        }
        {
            let (t, tun, stop) = (tunnels.clone(), tun.clone(), stop.clone());
            let mtu = cfg.mtu;
            spawn(
                "outbound",
                Box::new(move || outbound_loop(&t, &tun, &stop, mtu)),
            )?;
        }
        {
            let (t, stop) = (tunnels.clone(), stop.clone());
            spawn("timers", Box::new(move || timer_loop(&t, &stop)))?;
        }
        tracing::info!(
            ifname = %cfg.ifname,
            listen_port,
            esp_listen_port,
            offload,
            gso_segments,
            gro_segments,
            "data plane up"
        );
        Ok(Self {
            listen_port,
            esp_listen_port,
            offload,
            stop,
            threads,
            tunnels,
        })
    }

    /// The WireGuard UDP port.
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }
    /// The ESP-in-UDP port, when ESP peers exist.
    pub fn esp_listen_port(&self) -> Option<u16> {
        self.esp_listen_port
    }
    /// Sends IKE from the ESP port, when there is one.
    pub fn control_sender(&self) -> Option<ControlSender> {
        self.tunnels.esp.as_ref().map(|_| ControlSender {
            tunnels: self.tunnels.clone(),
        })
    }
    /// Whether the TUN device runs with virtio-net offloads.
    pub fn offload(&self) -> bool {
        self.offload
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
    via: Via,
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
    fn slot(&mut self, t: &Tunnels, needed: usize) -> &mut [u8] {
        if self.buf.len() - self.pos < needed {
            self.flush(t);
        }
        &mut self.buf[self.pos..self.pos + needed]
    }

    /// The datagram just written to the slot is `len` bytes for `to`.
    fn commit(&mut self, t: &Tunnels, via: Via, to: SocketAddr, len: usize) {
        let extends = self.run.as_ref().is_some_and(|r| {
            r.via == via
                && r.to == to
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
            self.flush_run(t);
            self.run = Some(Run {
                via,
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
    fn send_alone(&mut self, t: &Tunnels, via: Via, to: SocketAddr, len: usize) {
        self.flush_run(t);
        t.socket(via)
            .send(to, &self.buf[self.pos..self.pos + len], len);
    }

    fn flush_run(&mut self, t: &Tunnels) {
        if let Some(r) = self.run.take() {
            t.socket(r.via)
                .send(r.to, &self.buf[r.start..self.pos], r.segment);
        }
    }

    fn flush(&mut self, t: &Tunnels) {
        self.flush_run(t);
        self.pos = 0;
    }
}

fn outbound_loop(t: &Tunnels, tun: &SyncDevice, stop: &AtomicBool, mtu: u16) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_IP_PACKET];
    let packet_cap = (usize::from(mtu) + 64).max(1500);
    let mut bufs = vec![vec![0u8; packet_cap]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let max_segments = t.wg_sock.state.max_gso_segments();
    let overhead = WG_OVERHEAD.max(ESP_MAX_OVERHEAD) + 16;
    let mut batch = GsoBatcher::new(IDEAL_BATCH_SIZE * (packet_cap + overhead), max_segments);
    let no_esp = EspPeerSet::default();
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
        let wg_set = t.wg.peers();
        let egress = t.wg.egress();
        let esp_set = t.esp.as_ref().map(|(core, _)| core.peers());
        let esp_set = esp_set.as_deref().unwrap_or(&no_esp);
        let now = Instant::now();
        for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
            let packet = &buf[..size];
            let needed = (size + overhead).max(WG_HANDSHAKE_INIT_LEN);
            let slot = batch.slot(t, needed);
            let (via, outcome) = route_and_seal(t, &wg_set, &egress, esp_set, packet, slot, now);
            match outcome {
                Outbound::Send {
                    to,
                    len,
                    data: true,
                } => batch.commit(t, via, to, len),
                Outbound::Send {
                    to,
                    len,
                    data: false,
                } => batch.send_alone(t, via, to, len),
                Outbound::Dropped(_) => {}
            }
        }
        batch.flush(t);
    }
}

/// Longest-prefix routing to a WireGuard or ESP peer, then encryption.
fn route_and_seal(
    t: &Tunnels,
    wg_set: &PeerSet,
    egress: &crate::egress::EgressTable,
    esp_set: &EspPeerSet,
    packet: &[u8],
    out: &mut [u8],
    now: Instant,
) -> (Via, Outbound) {
    let Some(dst) = Tunn::dst_address(packet) else {
        return (Via::Wg, t.wg.encapsulate(wg_set, packet, out));
    };
    // The kernel's own link-local chatter on the device (IPv6 router and
    // multicast-listener messages) is never for a peer: drop it silently
    // rather than count it as traffic without a route.
    if let IpAddr::V6(v6) = dst {
        if v6.segments()[0] & 0xff0f == 0xff02 {
            return (Via::Wg, Outbound::Dropped(crate::DropReason::NoRoute));
        }
    }
    if !egress.is_empty() {
        if let Some(policy) =
            crate::egress::FlowKey::of(packet).and_then(|f| egress.select(f.source(), dst))
        {
            return match policy.pick(packet, now) {
                crate::egress::Pick::Gateway(key) => match wg_set.get(&key) {
                    Some(peer) => (Via::Wg, t.wg.encapsulate_to(peer, packet, out)),
                    None => (Via::Wg, t.wg.no_route()),
                },
                // Fail closed: no gateway takes the flow.
                crate::egress::Pick::NoGateway => (Via::Wg, t.wg.no_route()),
            };
        }
    }
    if let Some(peer) = wg_set.route(dst) {
        return (Via::Wg, t.wg.encapsulate_to(peer, packet, out));
    }
    if let (Some((core, _)), Some(peer)) = (&t.esp, esp_set.route(dst)) {
        return (Via::Esp, core.encapsulate(peer, packet, out, now));
    }
    // Counted as the device's no-route drop.
    (Via::Wg, t.wg.encapsulate(wg_set, packet, out))
}

fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF) | Some(libc::EBADFD) | Some(libc::ENODEV)
    )
}

/// Receives datagrams in batches, hands each to `handle` (which decrypts
/// into the given buffer), and writes the packets to the TUN device in one
/// batch (coalesced by GRO when offloads are on).
fn inbound_loop(
    sock: &Socket,
    tun: &SyncDevice,
    stop: &AtomicBool,
    offload: bool,
    mut handle: impl FnMut(SocketAddr, &[u8], &mut [u8]) -> Inbound,
) {
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
    let fd = sock.sock.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        if !wait_ready(fd, libc::POLLIN, RECV_WAIT) {
            continue;
        }
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
        for (meta, buf) in metas.iter().zip(&rx_bufs).take(n) {
            let from = SocketAddr::new(meta.addr.ip().to_canonical(), meta.addr.port());
            let stride = meta.stride.max(1);
            for datagram in buf[..meta.len.min(buf.len())].chunks(stride) {
                if ready == out.len() {
                    flush(&mut out, &mut ready);
                }
                let slot = &mut out[ready];
                slot.clear();
                slot.resize(hdr + datagram.len().max(WG_HANDSHAKE_INIT_LEN), 0);
                match handle(from, datagram, &mut slot[hdr..]) {
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

fn timer_loop(t: &Tunnels, stop: &AtomicBool) {
    let mut scratch = vec![0u8; 2048];
    let mut send = |to: SocketAddr, bytes: &[u8]| t.wg_sock.send(to, bytes, bytes.len());
    t.wg.initiate_all(&mut scratch, &mut send);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        t.wg.tick(&mut scratch, &mut send);
        if let Some((core, _)) = &t.esp {
            core.tick(Instant::now());
        }
    }
}
