//! Minimal synchronous rtnetlink client for links, addresses, routes and
//! policy-routing rules.
//!
//! This replaces shelling out to `ip`. Every [`Netlink`] value owns one
//! blocking `NETLINK_ROUTE` socket; requests are serialised with
//! `netlink-packet-route` and replies are decoded leniently: only the
//! attributes this module actually reports are parsed, so unusual routes or
//! rules elsewhere in the system (MPLS, seg6, encap, ...) cannot make a dump
//! fail. Nothing the kernel sends can cause a panic; malformed data is reported
//! as [`NetlinkError::Decode`].
//!
//! The socket enables (best effort) extended ACKs, so kernel errors carry the
//! kernel's explanation, and strict dump checking, so route dumps are filtered
//! by table in the kernel. Results are always filtered again in user space, so
//! older kernels without those features behave the same, only slower.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    parse_i32, parse_string, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NlasIterator, Parseable, ParseableParametrized, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK,
    NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkFlags, LinkHeader, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteLwEnCapType, RouteMessage, RouteMetric,
    RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleHeader, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

// Message types we decode (linux/rtnetlink.h).
const RTM_NEWLINK: u16 = 16;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;

// Fixed header sizes (struct ifinfomsg, struct rtmsg, struct fib_rule_hdr).
const IFINFOMSG_LEN: usize = 16;
const RTMSG_LEN: usize = 12;
const FIB_RULE_HDR_LEN: usize = 12;
const NLMSGHDR_LEN: usize = 16;

// Attribute types we decode.
const IFLA_MTU: u16 = 4;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PRIORITY: u16 = 6;
const RTA_METRICS: u16 = 8;
const RTA_TABLE: u16 = 15;
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
/// `NLMSGERR_ATTR_MSG` (linux/netlink.h): extended-ACK error string.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Maximum interface name length including the terminating NUL.
const IFNAMSIZ: usize = 16;
/// Initial receive buffer size; grown on demand for larger datagrams.
const RECV_BUF_LEN: usize = 64 * 1024;
/// How often a dump interrupted by concurrent changes is restarted.
const DUMP_ATTEMPTS: usize = 5;

/// Errors returned by [`Netlink`] operations.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Socket-level failure (open, bind, send, receive).
    #[error("netlink socket error: {0}")]
    Io(#[from] io::Error),
    /// The kernel rejected a request.
    #[error("netlink {op} failed: {message} (errno {errno})")]
    Kernel {
        /// Operation that failed (the [`Netlink`] method name).
        op: &'static str,
        /// Positive errno value reported by the kernel.
        errno: i32,
        /// `strerror` text, followed by the kernel's extended-ACK message when
        /// available.
        message: String,
    },
    /// The named (or `ifindex N`) network interface does not exist.
    #[error("no such network interface: {0}")]
    NoSuchLink(String),
    /// A reply from the kernel could not be decoded.
    #[error("cannot decode netlink reply: {0}")]
    Decode(String),
    /// The caller passed a value that cannot be expressed in a request
    /// (e.g. prefix length 33 for IPv4, mixed address families).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl NetlinkError {
    /// The kernel errno for [`NetlinkError::Kernel`] (or the OS error of
    /// [`NetlinkError::Io`]), if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// An IP prefix: network address and prefix length, e.g. `(10.1.0.0, 16)`.
pub type Prefix = (IpAddr, u8);

/// Route type (`rtm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// `RTN_UNICAST`: a normal route (here: a device route via `oif`).
    Unicast,
    /// `RTN_BLACKHOLE`: silently drop matching packets.
    Blackhole,
    /// Any other `RTN_*` value (local, broadcast, unreachable, ...).
    Other(u8),
}

impl RouteKind {
    fn to_route_type(self) -> RouteType {
        match self {
            RouteKind::Unicast => RouteType::Unicast,
            RouteKind::Blackhole => RouteType::BlackHole,
            RouteKind::Other(v) => RouteType::from(v),
        }
    }

    fn from_route_type(t: RouteType) -> Self {
        match t {
            RouteType::Unicast => RouteKind::Unicast,
            RouteType::BlackHole => RouteKind::Blackhole,
            other => RouteKind::Other(u8::from(other)),
        }
    }
}

/// A route to install or delete.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// Destination prefix; its address family selects IPv4 or IPv6.
    pub dst: Prefix,
    /// Routing table id (any `u32`; ids above 255 use `RTA_TABLE`).
    pub table: u32,
    /// Route type.
    pub kind: RouteKind,
    /// Output interface index. Required by the kernel for unicast routes
    /// (this module installs device routes only); must be `None` for
    /// blackhole routes.
    pub oif: Option<u32>,
    /// Path MTU (`RTAX_MTU` in `RTA_METRICS`). Ignored by [`Netlink::route_delete`].
    pub mtu: Option<u32>,
    /// Originating protocol (`rtm_protocol`), e.g. a project-specific value so
    /// our routes are recognisable. For [`Netlink::route_delete`], 0 matches
    /// any protocol.
    pub protocol: u8,
    /// Route metric (`RTA_PRIORITY`, `ip route ... metric N`). `None` uses the
    /// kernel default (0 for IPv4, 1024 for IPv6). Routes to the same prefix in
    /// the same table with different metrics coexist; `route_replace` only
    /// replaces the one with the same metric. For [`Netlink::route_delete`],
    /// `None` matches any metric.
    pub priority: Option<u32>,
}

/// A route as reported by the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteInfo {
    /// Destination prefix (the unspecified address with length 0 for a default route).
    pub dst: Prefix,
    /// Routing table id.
    pub table: u32,
    /// Route type.
    pub kind: RouteKind,
    /// Output interface index (`None` for multipath or blackhole routes).
    pub oif: Option<u32>,
    /// Originating protocol (`rtm_protocol`).
    pub protocol: u8,
    /// Path MTU from `RTA_METRICS`, if set.
    pub mtu: Option<u32>,
    /// Route metric (`RTA_PRIORITY`); the kernel omits it for IPv4 metric 0.
    pub priority: Option<u32>,
}

/// A policy-routing rule with action "lookup table".
///
/// Only the selectors below are supported; rules dumped from the kernel that
/// use other selectors (oif, uid range, ports, ...) are reported with those
/// selectors omitted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// IPv6 rule (`ip -6 rule`) rather than IPv4.
    pub v6: bool,
    /// Rule priority (`pref`).
    pub priority: u32,
    /// Table to look up.
    pub table: u32,
    /// Firewall mark and mask to match.
    pub fwmark: Option<(u32, u32)>,
    /// Incoming interface name to match.
    pub iif: Option<String>,
    /// Source prefix to match (must match `v6`).
    pub src: Option<Prefix>,
    /// Destination prefix to match (must match `v6`).
    pub dst: Option<Prefix>,
}

/// A blocking `NETLINK_ROUTE` socket.
///
/// The socket belongs to the network namespace of the thread that called
/// [`Netlink::open`]. Methods take `&mut self` because each request/response
/// exchange must complete before the next one starts.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink").field("seq", &self.seq).finish()
    }
}

impl Netlink {
    /// Open and bind a `NETLINK_ROUTE` socket in the calling thread's network
    /// namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Best effort: these socket options exist since Linux 4.12/4.20; the
        // module works without them (less detailed errors, user-space
        // filtering only).
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_netlink_get_strict_chk(true);
        Ok(Netlink {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF_LEN),
        })
    }

    /// Interface index of the link called `name`.
    ///
    /// Returns [`NetlinkError::NoSuchLink`] if there is no such interface.
    /// Opens a socket and looks up `name`: the usual start of changing routes
    /// into one device.
    pub fn open_for(name: &str) -> Result<(Self, u32), NetlinkError> {
        let mut nl = Self::open()?;
        let index = nl.link_index(name)?;
        Ok((nl, index))
    }

    pub fn link_index(&mut self, name: &str) -> Result<u32, NetlinkError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(NetlinkError::NoSuchLink(name.to_string()));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let mut index = None;
        let res = self.request(
            "link_index",
            RouteNetlinkMessage::GetLink(msg),
            0,
            &mut |t, payload| {
                if t == RTM_NEWLINK {
                    let hdr = LinkHeader::parse(payload).map_err(decode_err("link header"))?;
                    index = Some(hdr.index);
                }
                Ok(())
            },
        );
        match res {
            Err(e) if is_no_such_link(&e) => Err(NetlinkError::NoSuchLink(name.to_string())),
            Err(e) => Err(e),
            Ok(()) => index.ok_or_else(|| {
                NetlinkError::Decode(format!("no RTM_NEWLINK reply for link {name}"))
            }),
        }
    }

    /// MTU of the link with interface index `index`.
    pub fn link_mtu(&mut self, index: u32) -> Result<u32, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let mut mtu = None;
        let res = self.request(
            "link_mtu",
            RouteNetlinkMessage::GetLink(msg),
            0,
            &mut |t, payload| {
                if t != RTM_NEWLINK {
                    return Ok(());
                }
                let hdr = LinkHeader::parse(payload).map_err(decode_err("link header"))?;
                if hdr.index != index {
                    return Ok(());
                }
                for nla in NlasIterator::new(attrs(payload, IFINFOMSG_LEN)) {
                    let nla = nla.map_err(decode_err("link attribute"))?;
                    if nla.kind() == IFLA_MTU {
                        mtu = Some(read_u32(nla.value(), "IFLA_MTU")?);
                    }
                }
                Ok(())
            },
        );
        match res {
            Err(e) if is_no_such_link(&e) => {
                Err(NetlinkError::NoSuchLink(format!("ifindex {index}")))
            }
            Err(e) => Err(e),
            Ok(()) => {
                mtu.ok_or_else(|| NetlinkError::Decode(format!("no IFLA_MTU for ifindex {index}")))
            }
        }
    }

    /// Set the link administratively up (`ip link set dev X up`).
    pub fn link_set_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(
            "link_set_up",
            RouteNetlinkMessage::NewLink(msg),
            0,
            &mut ignore,
        )
        .map_err(|e| {
            if is_no_such_link(&e) {
                NetlinkError::NoSuchLink(format!("ifindex {index}"))
            } else {
                e
            }
        })
    }

    /// Add or update an address on a link (`ip addr replace ADDR/LEN dev X`).
    pub fn addr_replace(
        &mut self,
        index: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        check_prefix(&(addr, prefix_len))?;
        let mut msg = AddressMessage::default();
        msg.header.family = family_of(&addr);
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr));
        msg.attributes.push(AddressAttribute::Address(addr));
        self.request(
            "addr_replace",
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            &mut ignore,
        )
        .map_err(|e| {
            if is_no_such_link(&e) {
                NetlinkError::NoSuchLink(format!("ifindex {index}"))
            } else {
                e
            }
        })
    }

    /// Create or replace a route (`ip route replace`).
    pub fn route_replace(&mut self, r: &Route) -> Result<(), NetlinkError> {
        let msg = route_message(r, false)?;
        self.request(
            "route_replace",
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            &mut ignore,
        )
    }

    /// Delete a route (`ip route del`). Matches on destination, table, type,
    /// `oif` (if set) and `protocol` (if non-zero); `mtu` is ignored.
    /// Deleting a route that does not exist is not an error.
    pub fn route_delete(&mut self, r: &Route) -> Result<(), NetlinkError> {
        let msg = route_message(r, true)?;
        match self.request(
            "route_delete",
            RouteNetlinkMessage::DelRoute(msg),
            0,
            &mut ignore,
        ) {
            Err(e) if matches!(e.errno(), Some(libc::ESRCH) | Some(libc::ENOENT)) => Ok(()),
            other => other,
        }
    }

    /// All routes in `table` whose destination is exactly `dst` (same prefix
    /// length, same network), like `ip route show exact DST table T`.
    /// Host bits of `dst` are ignored.
    pub fn routes_exact(
        &mut self,
        dst: Prefix,
        table: u32,
    ) -> Result<Vec<RouteInfo>, NetlinkError> {
        check_prefix(&dst)?;
        let want = (mask_addr(dst.0, dst.1), dst.1);
        let mut routes = self.routes_in_table(dst.0.is_ipv6(), table)?;
        routes.retain(|r| r.dst.1 == want.1 && mask_addr(r.dst.0, r.dst.1) == want.0);
        Ok(routes)
    }

    /// All IPv4 (`v6 == false`) or IPv6 routes in `table`.
    /// A table that does not exist yields an empty list.
    pub fn routes_in_table(
        &mut self,
        v6: bool,
        table: u32,
    ) -> Result<Vec<RouteInfo>, NetlinkError> {
        let family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.table = header_table(table);
        // Kernel-side table filter (honoured with strict checking).
        msg.attributes.push(RouteAttribute::Table(table));
        let res = self.dump(
            "routes_in_table",
            RouteNetlinkMessage::GetRoute(msg),
            |t, payload| {
                if t != RTM_NEWROUTE {
                    return Ok(None);
                }
                decode_route(payload)
            },
        );
        match res {
            // Strict dump of a table that does not exist.
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(e),
            Ok(routes) => Ok(routes
                .into_iter()
                .filter(|r| r.table == table && r.dst.0.is_ipv6() == v6)
                .collect()),
        }
    }

    /// Add a rule (`ip rule add`). Adding a rule that already exists with the
    /// same selectors, priority and table is not an error and does not create
    /// a duplicate.
    pub fn rule_add(&mut self, r: &Rule) -> Result<(), NetlinkError> {
        let msg = rule_message(r)?;
        match self.request(
            "rule_add",
            RouteNetlinkMessage::NewRule(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &mut ignore,
        ) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Delete a rule (`ip rule del`). Deleting a rule that does not exist is
    /// not an error.
    ///
    /// Kernel semantics: selectors left unset (`None`) act as wildcards, so the
    /// first rule with the same priority/table/set selectors is removed.
    pub fn rule_delete(&mut self, r: &Rule) -> Result<(), NetlinkError> {
        let msg = rule_message(r)?;
        match self.request(
            "rule_delete",
            RouteNetlinkMessage::DelRule(msg),
            0,
            &mut ignore,
        ) {
            Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::ESRCH)) => Ok(()),
            other => other,
        }
    }

    /// All IPv4 or IPv6 "lookup table" rules (`ip rule show`). Rules with other
    /// actions (blackhole, goto, nop, ...) are not listed.
    pub fn rules(&mut self, v6: bool) -> Result<Vec<Rule>, NetlinkError> {
        let mut msg = RuleMessage::default();
        msg.header.family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let rules = self.dump("rules", RouteNetlinkMessage::GetRule(msg), |t, payload| {
            if t != RTM_NEWRULE {
                return Ok(None);
            }
            decode_rule(payload)
        })?;
        Ok(rules.into_iter().filter(|r| r.v6 == v6).collect())
    }

    // ----- transport -------------------------------------------------------

    /// Send a non-dump request with `NLM_F_ACK` and wait for the ACK.
    fn request(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
        on_reply: &mut ReplyHandler<'_>,
    ) -> Result<(), NetlinkError> {
        self.transact(op, msg, NLM_F_ACK | flags, on_reply)
            .map(|_interrupted| ())
    }

    /// Run a dump request, decoding each reply with `decode`. Restarts the dump
    /// if the kernel flags it as interrupted by concurrent changes.
    fn dump<T>(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        decode: impl Fn(u16, &[u8]) -> Result<Option<T>, NetlinkError>,
    ) -> Result<Vec<T>, NetlinkError> {
        for _ in 0..DUMP_ATTEMPTS {
            let mut out = Vec::new();
            let interrupted = self.transact(op, msg.clone(), NLM_F_DUMP, &mut |t, payload| {
                if let Some(v) = decode(t, payload)? {
                    out.push(v);
                }
                Ok(())
            })?;
            if !interrupted {
                return Ok(out);
            }
        }
        Err(NetlinkError::Kernel {
            op,
            errno: libc::EINTR,
            message: "dump repeatedly interrupted by concurrent changes".to_string(),
        })
    }

    /// Send one request and process replies until the final ACK/error or
    /// `NLMSG_DONE`. Returns whether a dump was flagged `NLM_F_DUMP_INTR`.
    ///
    /// Replies are always read to the end (even after a decode error) so the
    /// socket is left clean for the next request; stale messages with another
    /// sequence number are skipped.
    fn transact(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
        on_reply: &mut ReplyHandler<'_>,
    ) -> Result<bool, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        if self.seq == 0 {
            self.seq = 1;
        }
        let seq = self.seq;

        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        loop {
            match self.socket.send(&out, 0) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }

        let mut first_err: Option<NetlinkError> = None;
        let mut interrupted = false;
        loop {
            let n = self.recv_datagram()?;
            let data = self.buf.get(..n).unwrap_or(&[]);
            let mut finished = false;
            for item in split_messages(data) {
                let m = item?;
                if m.seq != seq {
                    continue;
                }
                if m.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match m.kind {
                    NLMSG_ERROR => {
                        finished = true;
                        let code = read_i32(m.payload, "NLMSG_ERROR")?;
                        if code != 0 {
                            let ext = error_extack(m.flags, m.payload.get(4..).unwrap_or(&[]));
                            first_err.get_or_insert(kernel_error(op, code, ext));
                        }
                        break;
                    }
                    NLMSG_DONE => {
                        finished = true;
                        // The kernel may send a zero-length DONE.
                        let code = if m.payload.len() >= 4 {
                            read_i32(m.payload, "NLMSG_DONE")?
                        } else {
                            0
                        };
                        if code != 0 {
                            let ext = if m.flags & NLM_F_ACK_TLVS != 0 {
                                extack_message(m.payload.get(4..).unwrap_or(&[]))
                            } else {
                                None
                            };
                            first_err.get_or_insert(kernel_error(op, code, ext));
                        }
                        break;
                    }
                    // NLMSG_NOOP / NLMSG_OVERRUN (unused by the kernel) are skipped.
                    t if t < 16 => {}
                    t => {
                        if first_err.is_none() {
                            if let Err(e) = on_reply(t, m.payload) {
                                first_err = Some(e);
                            }
                        }
                    }
                }
            }
            if finished {
                return match first_err {
                    Some(e) => Err(e),
                    None => Ok(interrupted),
                };
            }
        }
    }

    /// Receive one datagram into `self.buf`, growing it if the datagram is
    /// larger than the buffer. Returns the datagram length.
    fn recv_datagram(&mut self) -> Result<usize, NetlinkError> {
        // Peek first so that an oversized datagram is never truncated.
        let len = loop {
            self.buf.clear();
            match self
                .socket
                .recv(&mut self.buf, libc::MSG_PEEK | libc::MSG_TRUNC)
            {
                Ok(len) => break len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        self.buf.clear();
        if len > self.buf.capacity() {
            self.buf.reserve(len);
        }
        loop {
            match self.socket.recv(&mut self.buf, 0) {
                Ok(n) => return Ok(n.min(self.buf.len())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.buf.clear();
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

// ----- helpers ----------------------------------------------------------------

fn ignore(_: u16, _: &[u8]) -> Result<(), NetlinkError> {
    Ok(())
}

fn decode_err(what: &'static str) -> impl Fn(netlink_packet_core::DecodeError) -> NetlinkError {
    move |e| NetlinkError::Decode(format!("{what}: {e}"))
}

fn is_no_such_link(e: &NetlinkError) -> bool {
    e.errno() == Some(libc::ENODEV)
}

/// Callback for each data message of a reply: `(message type, payload)`.
type ReplyHandler<'a> = dyn FnMut(u16, &[u8]) -> Result<(), NetlinkError> + 'a;

/// One netlink message inside a received datagram.
#[derive(Debug)]
struct RawMessage<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Split a datagram into netlink messages, validating each header.
fn split_messages(data: &[u8]) -> impl Iterator<Item = Result<RawMessage<'_>, NetlinkError>> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let rest = data.get(off..).filter(|r| !r.is_empty())?;
        match NetlinkBuffer::new_checked(rest) {
            Ok(buf) => {
                let len = buf.length() as usize;
                off = off.saturating_add(align4(len));
                Some(Ok(RawMessage {
                    kind: buf.message_type(),
                    flags: buf.flags(),
                    seq: buf.sequence_number(),
                    payload: rest.get(NLMSGHDR_LEN..len).unwrap_or(&[]),
                }))
            }
            Err(e) => {
                off = data.len();
                Some(Err(NetlinkError::Decode(format!("netlink message: {e}"))))
            }
        }
    })
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

fn attrs(payload: &[u8], header_len: usize) -> &[u8] {
    payload.get(header_len..).unwrap_or(&[])
}

fn read_i32(b: &[u8], what: &str) -> Result<i32, NetlinkError> {
    b.get(..4)
        .and_then(|s| parse_i32(s).ok())
        .ok_or_else(|| NetlinkError::Decode(format!("{what}: truncated i32")))
}

fn read_u32(b: &[u8], what: &str) -> Result<u32, NetlinkError> {
    match <[u8; 4]>::try_from(b) {
        Ok(a) => Ok(u32::from_ne_bytes(a)),
        Err(_) => Err(NetlinkError::Decode(format!(
            "{what}: expected 4 bytes, got {}",
            b.len()
        ))),
    }
}

fn kernel_error(op: &'static str, code: i32, ext: Option<String>) -> NetlinkError {
    let errno = code.saturating_abs();
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_string();
    let message = match ext {
        Some(ext) if !ext.is_empty() => format!("{text}: {ext}"),
        _ => text,
    };
    NetlinkError::Kernel { op, errno, message }
}

/// Extended-ACK message of an `NLMSG_ERROR` payload (after the error code):
/// the echoed request (header only if `NLM_F_CAPPED`) followed by TLVs.
fn error_extack(flags: u16, rest: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSGHDR_LEN
    } else {
        let len = rest.get(..4)?;
        u32::from_ne_bytes(len.try_into().ok()?) as usize
    };
    extack_message(rest.get(align4(echoed)..)?)
}

fn extack_message(tlvs: &[u8]) -> Option<String> {
    NlasIterator::new(tlvs)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .and_then(|nla| parse_string(nla.value()).ok())
}

fn family_of(addr: &IpAddr) -> AddressFamily {
    if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

fn max_prefix_len(addr: &IpAddr) -> u8 {
    if addr.is_ipv6() {
        128
    } else {
        32
    }
}

fn check_prefix(p: &Prefix) -> Result<(), NetlinkError> {
    if p.1 > max_prefix_len(&p.0) {
        return Err(NetlinkError::InvalidArgument(format!(
            "prefix length {} too long for {}",
            p.1, p.0
        )));
    }
    Ok(())
}

/// `addr` with all bits beyond `len` cleared.
fn mask_addr(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32u32.saturating_sub(len.into()))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128u32.saturating_sub(len.into()))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// `rtm_table` / `frh.table` value: the id itself when it fits, otherwise
/// `RT_TABLE_UNSPEC` with the real id in `RTA_TABLE`/`FRA_TABLE` (as iproute2).
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

fn route_message(r: &Route, delete: bool) -> Result<RouteMessage, NetlinkError> {
    check_prefix(&r.dst)?;
    let (addr, len) = r.dst;
    let mut msg = RouteMessage::default();
    msg.header.address_family = family_of(&addr);
    msg.header.destination_prefix_length = len;
    msg.header.table = header_table(r.table);
    msg.header.protocol = r.protocol.into();
    msg.header.kind = r.kind.to_route_type();
    // Scope as chosen by iproute2: NOWHERE on delete matches any scope;
    // device routes without gateway are link-scoped.
    msg.header.scope = if delete {
        RouteScope::NoWhere
    } else {
        match msg.header.kind {
            RouteType::Local | RouteType::Nat => RouteScope::Host,
            RouteType::Broadcast | RouteType::Multicast | RouteType::Anycast => RouteScope::Link,
            RouteType::Unicast | RouteType::Unspec if r.oif.is_some() => RouteScope::Link,
            _ => RouteScope::Universe,
        }
    };
    if len > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
    }
    msg.attributes.push(RouteAttribute::Table(r.table));
    if let Some(oif) = r.oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(priority) = r.priority {
        msg.attributes.push(RouteAttribute::Priority(priority));
    }
    if let (Some(mtu), false) = (r.mtu, delete) {
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    Ok(msg)
}

/// Decode an `RTM_NEWROUTE` payload. Returns `None` for non-IP families.
fn decode_route(payload: &[u8]) -> Result<Option<RouteInfo>, NetlinkError> {
    let hdr = RouteHeader::parse(payload).map_err(decode_err("route header"))?;
    let family = hdr.address_family;
    let mut dst = match family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return Ok(None),
    };
    let mut table = u32::from(hdr.table);
    let mut oif = None;
    let mut mtu = None;
    let mut priority = None;
    for nla in NlasIterator::new(attrs(payload, RTMSG_LEN)) {
        let nla = nla.map_err(decode_err("route attribute"))?;
        if !matches!(
            nla.kind(),
            RTA_DST | RTA_OIF | RTA_TABLE | RTA_METRICS | RTA_PRIORITY
        ) {
            continue;
        }
        let attr =
            RouteAttribute::parse_with_param(&nla, (family, hdr.kind, RouteLwEnCapType::None))
                .map_err(decode_err("route attribute"))?;
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = IpAddr::V4(a),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = IpAddr::V6(a),
            RouteAttribute::Destination(other) => {
                return Err(NetlinkError::Decode(format!(
                    "unexpected RTA_DST {other:?}"
                )))
            }
            RouteAttribute::Table(t) => table = t,
            RouteAttribute::Oif(i) => oif = Some(i),
            RouteAttribute::Priority(p) => priority = Some(p),
            RouteAttribute::Metrics(metrics) => {
                for m in metrics {
                    if let RouteMetric::Mtu(v) = m {
                        mtu = Some(v);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Some(RouteInfo {
        dst: (dst, hdr.destination_prefix_length),
        table,
        kind: RouteKind::from_route_type(hdr.kind),
        oif,
        protocol: hdr.protocol.into(),
        mtu,
        priority,
    }))
}

fn rule_message(r: &Rule) -> Result<RuleMessage, NetlinkError> {
    let mut msg = RuleMessage::default();
    msg.header.family = if r.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.table = header_table(r.table);
    msg.header.action = RuleAction::ToTable;
    msg.attributes.push(RuleAttribute::Priority(r.priority));
    msg.attributes.push(RuleAttribute::Table(r.table));
    if let Some((mark, mask)) = r.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(mark));
        msg.attributes.push(RuleAttribute::FwMask(mask));
    }
    if let Some(iif) = &r.iif {
        if iif.is_empty() || iif.len() >= IFNAMSIZ || iif.contains('\0') {
            return Err(NetlinkError::InvalidArgument(format!(
                "bad interface name {iif:?}"
            )));
        }
        msg.attributes.push(RuleAttribute::Iifname(iif.clone()));
    }
    for (prefix, is_src) in [(r.src, true), (r.dst, false)] {
        let Some(p) = prefix else { continue };
        check_prefix(&p)?;
        if p.0.is_ipv6() != r.v6 {
            return Err(NetlinkError::InvalidArgument(format!(
                "rule prefix {}/{} does not match rule family (v6={})",
                p.0, p.1, r.v6
            )));
        }
        if p.1 == 0 {
            continue; // "from all" / "to all"
        }
        if is_src {
            msg.header.src_len = p.1;
            msg.attributes.push(RuleAttribute::Source(p.0));
        } else {
            msg.header.dst_len = p.1;
            msg.attributes.push(RuleAttribute::Destination(p.0));
        }
    }
    Ok(msg)
}

/// Decode an `RTM_NEWRULE` payload. Returns `None` for non-IP families and for
/// rules whose action is not "lookup table".
fn decode_rule(payload: &[u8]) -> Result<Option<Rule>, NetlinkError> {
    let hdr = RuleHeader::parse(payload).map_err(decode_err("rule header"))?;
    let v6 = match hdr.family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return Ok(None),
    };
    if hdr.action != RuleAction::ToTable {
        return Ok(None);
    }
    let mut rule = Rule {
        v6,
        priority: 0, // the kernel omits FRA_PRIORITY for priority 0
        table: u32::from(hdr.table),
        fwmark: None,
        iif: None,
        src: None,
        dst: None,
    };
    let (mut mark, mut mask) = (None, None);
    for nla in NlasIterator::new(attrs(payload, FIB_RULE_HDR_LEN)) {
        let nla = nla.map_err(decode_err("rule attribute"))?;
        if !matches!(
            nla.kind(),
            FRA_DST | FRA_SRC | FRA_IIFNAME | FRA_PRIORITY | FRA_FWMARK | FRA_TABLE | FRA_FWMASK
        ) {
            continue;
        }
        match RuleAttribute::parse(&nla).map_err(decode_err("rule attribute"))? {
            RuleAttribute::Destination(a) => rule.dst = Some((a, hdr.dst_len)),
            RuleAttribute::Source(a) => rule.src = Some((a, hdr.src_len)),
            RuleAttribute::Iifname(s) => rule.iif = Some(s),
            RuleAttribute::Priority(p) => rule.priority = p,
            RuleAttribute::FwMark(m) => mark = Some(m),
            RuleAttribute::FwMask(m) => mask = Some(m),
            RuleAttribute::Table(t) => rule.table = t,
            _ => {}
        }
    }
    // The kernel reports FRA_FWMASK whenever mark or mask is non-zero.
    if mark.is_some() || mask.is_some() {
        rule.fwmark = Some((mark.unwrap_or(0), mask.unwrap_or(u32::MAX)));
    }
    Ok(Some(rule))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    const PROTO: u8 = 0x49;
    static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

    /// A network namespace that is deleted on drop (also when a test panics).
    struct TestNs {
        name: String,
    }

    impl TestNs {
        fn new() -> Self {
            let n = NS_COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("isnl{}_{}", std::process::id(), n);
            run("ip", &["netns", "add", &name]);
            TestNs { name }
        }

        /// `ip -n <ns> args...`, asserting success; returns stdout.
        fn ip(&self, args: &[&str]) -> String {
            let mut full = vec!["-n", self.name.as_str()];
            full.extend_from_slice(args);
            run("ip", &full)
        }

        /// Create a test link (dummy; veth with peer `<name>p` on kernels
        /// without CONFIG_DUMMY) and return its index as reported by `ip`.
        fn add_link(&self, name: &str) -> u32 {
            let ok = Command::new("ip")
                .args(["-n", &self.name, "link", "add", name, "type", "dummy"])
                .output()
                .expect("spawn ip")
                .status
                .success();
            if !ok {
                let peer = format!("{name}p");
                self.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
                // Peer up so `name` gets carrier once it is up (like a dummy).
                self.ip(&["link", "set", &peer, "up"]);
            }
            let out = self.ip(&["-o", "link", "show", "dev", name]);
            out.split(':').next().unwrap().trim().parse().unwrap()
        }

        /// Run `f` with a `Netlink` opened inside the namespace, on a dedicated
        /// thread (setns only affects the calling thread).
        fn run<T: Send>(&self, f: impl FnOnce(&mut Netlink) -> T + Send) -> T {
            let path = format!("/var/run/netns/{}", self.name);
            std::thread::scope(|s| {
                let h = s.spawn(move || {
                    let ns = File::open(&path).expect("open netns");
                    // SAFETY: `ns` is a valid open namespace fd for the duration
                    // of the call; setns only changes this thread's network
                    // namespace and touches no Rust-managed memory.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
                    let mut nl = Netlink::open().expect("open netlink");
                    f(&mut nl)
                });
                h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.name])
                .status();
        }
    }

    fn run(cmd: &str, args: &[&str]) -> String {
        let out = Command::new(cmd).args(args).output().expect("spawn");
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Namespace with link `d0` that is up; returns (ns, ifindex).
    fn ns_with_link() -> (TestNs, u32) {
        let ns = TestNs::new();
        let idx = ns.add_link("d0");
        ns.ip(&["link", "set", "d0", "up"]);
        (ns, idx)
    }

    fn unicast(dst: Prefix, table: u32, oif: u32, mtu: Option<u32>) -> Route {
        Route {
            dst,
            table,
            kind: RouteKind::Unicast,
            oif: Some(oif),
            mtu,
            protocol: PROTO,
            priority: None,
        }
    }

    #[test]
    fn link_index_mtu_and_up() {
        let ns = TestNs::new();
        let idx = ns.add_link("d0");
        ns.ip(&["link", "set", "d0", "mtu", "1380"]);
        ns.run(|nl| {
            assert_eq!(nl.link_index("d0").unwrap(), idx);
            assert_eq!(nl.link_index("lo").unwrap(), 1);
            for missing in ["nope0", "", "a-very-long-interface-name"] {
                match nl.link_index(missing) {
                    Err(NetlinkError::NoSuchLink(n)) => assert_eq!(n, missing),
                    other => panic!("expected NoSuchLink for {missing:?}, got {other:?}"),
                }
            }
            assert_eq!(nl.link_mtu(idx).unwrap(), 1380);
            assert!(matches!(
                nl.link_mtu(999_999),
                Err(NetlinkError::NoSuchLink(_))
            ));
            nl.link_set_up(idx).unwrap();
            assert!(matches!(
                nl.link_set_up(999_999),
                Err(NetlinkError::NoSuchLink(_))
            ));
        });
        let out = ns.ip(&["link", "show", "dev", "d0"]);
        assert!(out.contains(",UP"), "{out}");
    }

    #[test]
    fn addr_replace_v4_v6() {
        let (ns, idx) = ns_with_link();
        ns.run(|nl| {
            nl.addr_replace(idx, ip("10.9.0.1"), 24).unwrap();
            nl.addr_replace(idx, ip("10.9.0.1"), 24).unwrap(); // idempotent
            nl.addr_replace(idx, ip("fd00::1"), 64).unwrap();
            nl.addr_replace(idx, ip("fd00::1"), 64).unwrap();
            assert!(matches!(
                nl.addr_replace(idx, ip("10.9.0.1"), 33),
                Err(NetlinkError::InvalidArgument(_))
            ));
            assert!(matches!(
                nl.addr_replace(999_999, ip("10.9.0.1"), 24),
                Err(NetlinkError::NoSuchLink(_))
            ));
        });
        let out = ns.ip(&["addr", "show", "dev", "d0"]);
        assert_eq!(out.matches("inet 10.9.0.1/24").count(), 1, "{out}");
        assert_eq!(out.matches("inet6 fd00::1/64").count(), 1, "{out}");
    }

    #[test]
    fn route_replace_unicast_main_and_table_1000() {
        let (ns, idx) = ns_with_link();
        let dst = (ip("10.1.0.0"), 16);
        ns.run(|nl| {
            nl.route_replace(&unicast(dst, 254, idx, None)).unwrap();
            nl.route_replace(&unicast(dst, 1000, idx, Some(1400)))
                .unwrap();
        });
        let main = ns.ip(&["route", "show", "table", "main"]);
        assert!(
            main.contains("10.1.0.0/16 dev d0 proto 73 scope link"),
            "{main}"
        );
        let t = ns.ip(&["route", "show", "table", "1000"]);
        assert!(
            t.contains("10.1.0.0/16 dev d0 proto 73 scope link mtu 1400"),
            "{t}"
        );

        ns.run(|nl| {
            // Replace again: same route, then a changed MTU; never a duplicate.
            nl.route_replace(&unicast(dst, 1000, idx, Some(1400)))
                .unwrap();
            nl.route_replace(&unicast(dst, 1000, idx, Some(1300)))
                .unwrap();
            let found = nl.routes_exact(dst, 1000).unwrap();
            assert_eq!(
                found,
                vec![RouteInfo {
                    dst,
                    table: 1000,
                    kind: RouteKind::Unicast,
                    oif: Some(idx),
                    protocol: PROTO,
                    priority: None,
                    mtu: Some(1300),
                }]
            );
            // Host bits are ignored; other prefix lengths / tables do not match.
            assert_eq!(
                nl.routes_exact((ip("10.1.2.3"), 16), 1000).unwrap().len(),
                1
            );
            assert!(nl
                .routes_exact((ip("10.1.0.0"), 24), 1000)
                .unwrap()
                .is_empty());
            assert!(nl
                .routes_exact((ip("10.0.0.0"), 8), 1000)
                .unwrap()
                .is_empty());
            assert!(nl.routes_exact(dst, 1001).unwrap().is_empty());
            let main = nl.routes_exact(dst, 254).unwrap();
            assert_eq!(main.len(), 1);
            assert_eq!(main[0].mtu, None);
            let all = nl.routes_in_table(false, 1000).unwrap();
            assert_eq!(all.len(), 1);
            assert!(nl.routes_in_table(true, 1000).unwrap().is_empty());
            // Nonexistent table: empty, not an error.
            assert!(nl.routes_in_table(false, 4242).unwrap().is_empty());
        });
        let t = ns.ip(&["route", "show", "table", "1000"]);
        assert_eq!(t.lines().count(), 1, "{t}");
        assert!(t.contains("mtu 1300"), "{t}");
    }

    #[test]
    fn blackhole_route() {
        let (ns, _idx) = ns_with_link();
        let r = Route {
            dst: (ip("10.3.0.0"), 16),
            table: 1000,
            kind: RouteKind::Blackhole,
            oif: None,
            mtu: None,
            protocol: PROTO,
            priority: None,
        };
        ns.run(|nl| {
            nl.route_replace(&r).unwrap();
            nl.route_replace(&r).unwrap();
            let found = nl.routes_exact(r.dst, 1000).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].kind, RouteKind::Blackhole);
            assert_eq!(found[0].oif, None);
            assert_eq!(found[0].protocol, PROTO);
        });
        let t = ns.ip(&["route", "show", "table", "1000"]);
        assert!(t.contains("blackhole 10.3.0.0/16 proto 73"), "{t}");
        ns.run(|nl| {
            nl.route_delete(&r).unwrap();
            nl.route_delete(&r).unwrap();
            assert!(nl.routes_exact(r.dst, 1000).unwrap().is_empty());
        });
    }

    #[test]
    fn route_delete_idempotent() {
        let (ns, idx) = ns_with_link();
        let dst = (ip("10.2.0.0"), 16);
        ns.run(|nl| {
            nl.route_replace(&unicast(dst, 1000, idx, Some(1400)))
                .unwrap();
            nl.route_replace(&unicast(dst, 254, idx, None)).unwrap();
            // Different protocol does not match: nothing deleted, still Ok.
            let mut other = unicast(dst, 1000, idx, None);
            other.protocol = 0x50;
            nl.route_delete(&other).unwrap();
            assert_eq!(nl.routes_exact(dst, 1000).unwrap().len(), 1);
            // MTU is ignored when deleting.
            nl.route_delete(&unicast(dst, 1000, idx, None)).unwrap();
            assert!(nl.routes_exact(dst, 1000).unwrap().is_empty());
            nl.route_delete(&unicast(dst, 1000, idx, None)).unwrap();
            // Table that never existed.
            nl.route_delete(&unicast(dst, 777, idx, None)).unwrap();
            // Main-table route untouched.
            assert_eq!(nl.routes_exact(dst, 254).unwrap().len(), 1);
        });
        let t = ns.ip(&["route", "show", "table", "1000"]);
        assert!(t.trim().is_empty(), "{t}");
    }

    #[test]
    fn ipv6_route() {
        let (ns, idx) = ns_with_link();
        let dst = (ip("fd00:1::"), 64);
        ns.run(|nl| {
            nl.route_replace(&unicast(dst, 1000, idx, Some(1400)))
                .unwrap();
            nl.route_replace(&unicast(dst, 1000, idx, Some(1400)))
                .unwrap();
            let found = nl.routes_exact(dst, 1000).unwrap();
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].oif, Some(idx));
            assert_eq!(found[0].mtu, Some(1400));
            assert_eq!(found[0].protocol, PROTO);
            assert_eq!(found[0].kind, RouteKind::Unicast);
            assert!(nl.routes_in_table(false, 1000).unwrap().is_empty());
        });
        let t = ns.ip(&["-6", "route", "show", "table", "1000"]);
        assert!(t.contains("fd00:1::/64 dev d0 proto 73"), "{t}");
        assert!(t.contains("mtu 1400"), "{t}");
        ns.run(|nl| {
            let blackhole = Route {
                dst: (ip("fd00:2::"), 48),
                table: 1000,
                kind: RouteKind::Blackhole,
                oif: None,
                mtu: None,
                protocol: PROTO,
                priority: None,
            };
            nl.route_replace(&blackhole).unwrap();
            assert_eq!(
                nl.routes_exact(blackhole.dst, 1000).unwrap()[0].kind,
                RouteKind::Blackhole
            );
            nl.route_delete(&unicast(dst, 1000, idx, None)).unwrap();
            nl.route_delete(&unicast(dst, 1000, idx, None)).unwrap();
            nl.route_delete(&blackhole).unwrap();
            nl.route_delete(&blackhole).unwrap();
            assert!(nl.routes_in_table(true, 1000).unwrap().is_empty());
        });
    }

    #[test]
    fn rules_add_list_delete() {
        let (ns, _idx) = ns_with_link();
        let mark_rule = Rule {
            v6: false,
            priority: 100,
            table: 1000,
            fwmark: Some((0x100, 0xff00)),
            iif: None,
            src: None,
            dst: None,
        };
        let iif_rule = Rule {
            v6: false,
            priority: 101,
            table: 1001,
            fwmark: None,
            iif: Some("d0".into()),
            src: Some((ip("10.0.0.0"), 8)),
            dst: Some((ip("10.9.0.0"), 16)),
        };
        let v6_rule = Rule {
            v6: true,
            priority: 102,
            table: 200,
            fwmark: Some((0x7, 0xffffffff)),
            iif: Some("d0".into()),
            src: Some((ip("fd00::"), 8)),
            dst: None,
        };
        ns.run(|nl| {
            for r in [&mark_rule, &iif_rule, &v6_rule] {
                nl.rule_add(r).unwrap();
                nl.rule_add(r).unwrap(); // EEXIST => Ok
            }
            let rules = nl.rules(false).unwrap();
            assert!(rules.contains(&mark_rule), "{rules:?}");
            assert!(rules.contains(&iif_rule), "{rules:?}");
            assert_eq!(rules.iter().filter(|r| r.priority == 100).count(), 1);
            // Default rules are listed too.
            assert!(rules.iter().any(|r| r.priority == 32766 && r.table == 254));
            let rules6 = nl.rules(true).unwrap();
            assert!(rules6.contains(&v6_rule), "{rules6:?}");
            assert!(!rules6.contains(&mark_rule));
            // Family mismatch is rejected locally.
            let mut bad = iif_rule.clone();
            bad.v6 = true;
            assert!(matches!(
                nl.rule_add(&bad),
                Err(NetlinkError::InvalidArgument(_))
            ));
        });
        let out = ns.ip(&["rule", "show"]);
        assert_eq!(
            out.matches("100:\tfrom all fwmark 0x100/0xff00 lookup 1000")
                .count(),
            1,
            "{out}"
        );
        assert_eq!(
            out.matches("101:\tfrom 10.0.0.0/8 to 10.9.0.0/16 iif d0 lookup 1001")
                .count(),
            1,
            "{out}"
        );
        let out6 = ns.ip(&["-6", "rule", "show"]);
        assert_eq!(
            out6.matches("102:\tfrom fd00::/8 fwmark 0x7 iif d0 lookup 200")
                .count(),
            1,
            "{out6}"
        );

        ns.run(|nl| {
            for r in [&mark_rule, &iif_rule, &v6_rule] {
                nl.rule_delete(r).unwrap();
                nl.rule_delete(r).unwrap(); // absent => Ok
            }
            let rules = nl.rules(false).unwrap();
            assert!(!rules.contains(&mark_rule) && !rules.contains(&iif_rule));
            assert!(!nl.rules(true).unwrap().contains(&v6_rule));
        });
        let out = ns.ip(&["rule", "show"]);
        assert!(
            !out.contains("lookup 1000") && !out.contains("lookup 1001"),
            "{out}"
        );
    }

    /// The policy-routing fallback's layout: a default route into the tunnel
    /// plus a blackhole default route with the worst metric, both families.
    #[test]
    fn default_routes_with_metrics() {
        let (ns, idx) = ns_with_link();
        let mut routes = Vec::new();
        for any in [ip("0.0.0.0"), ip("::")] {
            let mut u = unicast((any, 0), 2000, idx, None);
            let mut b = u.clone();
            b.kind = RouteKind::Blackhole;
            b.oif = None;
            b.priority = Some(u32::MAX);
            if any.is_ipv6() {
                u.priority = Some(1024);
            }
            routes.push((u, b));
        }
        ns.run(|nl| {
            for (u, b) in &routes {
                for _ in 0..2 {
                    nl.route_replace(u).unwrap();
                    nl.route_replace(b).unwrap();
                }
                let mut found = nl.routes_exact(u.dst, 2000).unwrap();
                found.sort_by_key(|r| r.priority);
                assert_eq!(found.len(), 2, "{found:?}");
                let v4_default = if u.dst.0.is_ipv6() { Some(1024) } else { None };
                assert_eq!(found[0].priority, v4_default);
                assert_eq!(found[0].kind, RouteKind::Unicast);
                assert_eq!(found[0].oif, Some(idx));
                assert_eq!(found[1].priority, Some(u32::MAX));
                assert_eq!(found[1].kind, RouteKind::Blackhole);
            }
        });
        let t4 = ns.ip(&["route", "show", "table", "2000"]);
        assert!(t4.contains("default dev d0 proto 73 scope link"), "{t4}");
        assert!(
            t4.contains("blackhole default proto 73 metric 4294967295"),
            "{t4}"
        );
        let t6 = ns.ip(&["-6", "route", "show", "table", "2000"]);
        assert!(t6.contains("default dev d0 proto 73 metric 1024"), "{t6}");
        assert!(
            t6.contains("blackhole default dev lo proto 73 metric 4294967295"),
            "{t6}"
        );
        ns.run(|nl| {
            // Cleanup as the gateway does it: delete what was found, by metric.
            for (u, _) in &routes {
                for found in nl.routes_exact(u.dst, 2000).unwrap() {
                    let del = Route {
                        oif: found.oif,
                        kind: found.kind,
                        priority: found.priority,
                        ..u.clone()
                    };
                    nl.route_delete(&del).unwrap();
                    nl.route_delete(&del).unwrap();
                }
                assert!(nl.routes_exact(u.dst, 2000).unwrap().is_empty());
            }
        });
    }

    #[test]
    fn many_routes_multipart_dump() {
        let (ns, idx) = ns_with_link();
        ns.run(|nl| {
            for i in 0..600u32 {
                let dst = (IpAddr::V4(Ipv4Addr::from(0x0a40_0000 | (i << 8))), 24);
                nl.route_replace(&unicast(dst, 3000, idx, Some(1400)))
                    .unwrap();
            }
            let all = nl.routes_in_table(false, 3000).unwrap();
            assert_eq!(all.len(), 600);
            assert!(all
                .iter()
                .all(|r| r.mtu == Some(1400) && r.oif == Some(idx)));
            // Socket is still in sync after a big dump.
            assert_eq!(nl.link_index("d0").unwrap(), idx);
        });
    }

    #[test]
    fn kernel_error_carries_extack() {
        let (ns, idx) = ns_with_link();
        ns.run(|nl| {
            // Host bits set on an IPv4 route: EINVAL with an explanation.
            let err = nl
                .route_replace(&unicast((ip("10.1.2.3"), 16), 1000, idx, None))
                .unwrap_err();
            match &err {
                NetlinkError::Kernel { op, errno, message } => {
                    assert_eq!(*op, "route_replace");
                    assert_eq!(*errno, libc::EINVAL);
                    assert!(message.starts_with("Invalid argument"), "{message}");
                    // Extended ACK text from the kernel.
                    assert!(message.contains("Invalid prefix"), "{message}");
                }
                other => panic!("unexpected {other:?}"),
            }
            // Next request still works (sequence numbers in sync).
            assert_eq!(nl.link_index("d0").unwrap(), idx);
        });
    }

    /// Decoders must never panic on garbage.
    #[test]
    fn decoders_survive_garbage() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let len = (next() % 96) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && buf.len() >= 16 {
                // Plausible netlink header length to reach deeper code.
                let l = (len as u32).to_ne_bytes();
                buf[..4].copy_from_slice(&l);
            }
            for m in split_messages(&buf).flatten() {
                let _ = decode_route(m.payload);
                let _ = decode_rule(m.payload);
                let _ = error_extack(m.flags, m.payload);
            }
            let _ = decode_route(&buf);
            let _ = decode_rule(&buf);
            let _ = error_extack(NLM_F_ACK_TLVS, &buf);
            let _ = extack_message(&buf);
        }
    }

    #[test]
    fn masking() {
        assert_eq!(mask_addr(ip("10.1.2.3"), 16), ip("10.1.0.0"));
        assert_eq!(mask_addr(ip("10.1.2.3"), 0), ip("0.0.0.0"));
        assert_eq!(mask_addr(ip("10.1.2.3"), 32), ip("10.1.2.3"));
        assert_eq!(mask_addr(ip("fd00:1:2::5"), 48), ip("fd00:1:2::"));
        assert_eq!(mask_addr(ip("fd00::5"), 128), ip("fd00::5"));
        assert_eq!(header_table(254), 254);
        assert_eq!(header_table(1000), 0);
    }
}
