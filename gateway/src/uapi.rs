//! Server side of the WireGuard cross-platform userspace API ("UAPI").
//!
//! This is the line-oriented text protocol that `wg show`, `wg set` and
//! `wg showconf` speak over the unix stream socket
//! `/var/run/wireguard/<ifname>.sock`. A request is an operation line
//! (`get=1` or `set=1`), followed (for `set`) by `key=value` lines, and is
//! terminated by an empty line. Every response ends with `errno=<n>` and an
//! empty line; `errno=0` means success. Several requests may be sent on one
//! connection.
//!
//! # Sign of `errno=` on failure
//!
//! Failures are sent as the **negated** errno, e.g. `errno=-22` for
//! `EINVAL`, exactly like wireguard-go (whose codes are `-EINVAL`,
//! `-EADDRINUSE`, ...). `wg` reads the number and reports `strerror(-n)`:
//! with `errno=-98` it prints "Unable to modify interface: Address already
//! in use", whereas a positive `errno=98` makes it print "Unknown error -98"
//! (checked with wireguard-tools v1.0.20210914). [`UapiError::errno`]
//! returns the positive value; only the wire form is negated.
//!
//! The protocol is decoupled from the device by the [`UapiDevice`] trait: the
//! device reports a [`UapiSnapshot`] for `get` and applies a fully typed,
//! validated [`SetRequest`] for `set`.
//!
//! # Deliberate deviation: no secrets in `get` responses
//!
//! The stock implementations (kernel, wireguard-go) send `private_key=` and
//! `preshared_key=` to clients of the (root-only) socket. **This server
//! never does.**
//! Isthmus policy is that key material never appears in CLI output, so
//! [`format_get`] omits both lines unconditionally, whatever the snapshot
//! contains. Consequences, observed with wireguard-tools v1.0.20210914:
//!
//! * `wg` derives the interface's public key from the private key; since the
//!   protocol has no other way to carry it, `wg show` prints no
//!   `public key:`/`private key:` lines for the interface, and
//!   `wg show <if> dump` prints `(none)` in both key columns.
//!   `wg show <if> public-key` prints `(none)`.
//! * Per peer, `wg show` omits the `preshared key:` line and `dump` prints
//!   `(none)` in the preshared-key column, even when a PSK is configured.
//! * `wg showconf` emits no `PrivateKey =` / `PresharedKey =` lines, so its
//!   output cannot be fed back to `wg setconf` to reproduce the keys (the
//!   rest of the configuration round-trips).
//!
//! Everything else (peers, endpoints, allowed IPs, handshakes, transfer
//! counters, keepalive, listen port, fwmark) works as usual, and `set`
//! requests may still carry keys (`wg set`, `wg setconf` and `wg syncconf`
//! all work).
//!
//! Known limitation: an IPv6 endpoint with a *named* scope
//! (`[fe80::1%eth0]:51820`) is refused with `EINVAL`; numeric scopes parse.
//!
//! # Robustness
//!
//! Requests are limited to [`MAX_REQUEST_BYTES`], [`MAX_REQUEST_LINES`] lines
//! and [`MAX_LINE_BYTES`] per line, and must arrive within
//! [`REQUEST_TIMEOUT`]. A malformed request is answered with an `errno=`
//! reply (`EINVAL` for syntax and validation errors, `EMSGSIZE` for size
//! limits), never a panic. Error messages and logs never echo request values
//! (they may be keys); at most a sanitised key name is shown.

#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Directory holding the per-interface sockets (`wg` looks here).
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Largest accepted request, in bytes (operation line and terminator included).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest accepted number of lines in one request.
pub const MAX_REQUEST_LINES: usize = 65_536;
/// Longest accepted line, in bytes (newline excluded).
pub const MAX_LINE_BYTES: usize = 4096;
/// Time a client has to deliver one complete request (idle time before the
/// request included); the connection is closed when it runs out.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once by [`UapiServer`]; further ones are closed.
const MAX_CONCURRENT_CONNECTIONS: usize = 16;
/// Linux `IFNAMSIZ` minus the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;

// Linux errno values used on the wire (the protocol carries positive numbers).
const EIO: i32 = 5;
const EINVAL: i32 = 22;
const EMSGSIZE: i32 = 90;
const EADDRINUSE: i32 = 98;

// ---------------------------------------------------------------------------
// Data model
// ---------------------------------------------------------------------------

/// What the device reports for `get=1`.
///
/// `private_key` and the peers' `preshared_key` are accepted here for
/// completeness but are **never** sent to clients (see the module docs).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct UapiSnapshot {
    pub private_key: Option<[u8; 32]>,
    /// 0 means "not listening" and is not reported.
    pub listen_port: u16,
    /// `None` or `Some(0)` means no fwmark; not reported then.
    pub fwmark: Option<u32>,
    pub peers: Vec<UapiPeer>,
}

/// One peer in a [`UapiSnapshot`].
#[derive(Clone, PartialEq, Eq)]
pub struct UapiPeer {
    pub public_key: [u8; 32],
    /// Never sent to clients (see the module docs).
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; 0 means off.
    pub persistent_keepalive_interval: u16,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl fmt::Debug for UapiSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UapiSnapshot")
            .field("private_key", &self.private_key.map(|_| Redacted))
            .field("listen_port", &self.listen_port)
            .field("fwmark", &self.fwmark)
            .field("peers", &self.peers)
            .finish()
    }
}

impl fmt::Debug for UapiPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UapiPeer")
            .field("public_key", &HexKey(&self.public_key))
            .field("preshared_key", &self.preshared_key.map(|_| Redacted))
            .field("endpoint", &self.endpoint)
            .field(
                "persistent_keepalive_interval",
                &self.persistent_keepalive_interval,
            )
            .field("allowed_ips", &self.allowed_ips)
            .field("last_handshake", &self.last_handshake)
            .field("rx_bytes", &self.rx_bytes)
            .field("tx_bytes", &self.tx_bytes)
            .finish()
    }
}

/// Prints `<redacted>` in place of secret material.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Prints a public key as lowercase hex.
struct HexKey<'a>(&'a [u8; 32]);

impl fmt::Debug for HexKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A change to a secret key (`private_key=` / `preshared_key=`).
///
/// On the wire an all-zero key means "remove"; it is parsed as
/// [`KeyUpdate::Clear`], so `Set` never holds the all-zero key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KeyUpdate {
    Set([u8; 32]),
    Clear,
}

impl fmt::Debug for KeyUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyUpdate::Set(_) => f.write_str("Set(<redacted>)"),
            KeyUpdate::Clear => f.write_str("Clear"),
        }
    }
}

/// A parsed and validated `set=1` request.
///
/// A device applies it in this order (the semantics of the protocol and of
/// the kernel implementation):
///
/// 1. `private_key`: `Set` replaces the interface key, `Clear` removes it.
/// 2. `listen_port`: rebind to this port (0 = let the system choose).
/// 3. `fwmark`: `Some(0)` removes the mark, `Some(m)` sets it.
/// 4. `replace_peers`: remove every existing peer before processing `peers`
///    (an empty `peers` list then means "no peers").
/// 5. each [`PeerUpdate`] in order; see there.
///
/// Fields left `None` / `false` / empty mean "leave unchanged".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetRequest {
    pub private_key: Option<KeyUpdate>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

/// The changes to one peer within a [`SetRequest`], identified by its public
/// key. The same key may appear more than once; entries apply in order.
///
/// * `remove`: delete the peer (no-op if absent). The parser guarantees no
///   other change accompanies `remove` (only `update_only` may).
/// * `update_only`: if the peer does not exist, skip this entry entirely
///   (not an error); otherwise a missing peer is created first.
/// * `preshared_key`: `Set` / `Clear` the PSK.
/// * `endpoint`: set the endpoint.
/// * `persistent_keepalive_interval`: seconds, `Some(0)` turns it off.
/// * `replace_allowed_ips`: drop all the peer's allowed IPs before adding
///   `allowed_ips` (an empty list then means "none").
/// * `allowed_ips`: add these prefixes (WireGuard semantics: a prefix owned
///   by another peer moves to this one).
/// * `remove_allowed_ips`: then remove these prefixes from this peer
///   (sent by newer `wg` as `allowed_ip=-<prefix>`).
///
/// Prefixes are validated (length within the address family) and
/// canonicalised: host bits are cleared, like the kernel does
/// (`10.1.2.3/8` becomes `10.0.0.0/8`).
#[derive(Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: [u8; 32],
    pub remove: bool,
    pub update_only: bool,
    pub preshared_key: Option<KeyUpdate>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive_interval: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    pub remove_allowed_ips: Vec<(IpAddr, u8)>,
}

impl fmt::Debug for PeerUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerUpdate")
            .field("public_key", &HexKey(&self.public_key))
            .field("remove", &self.remove)
            .field("update_only", &self.update_only)
            .field("preshared_key", &self.preshared_key)
            .field("endpoint", &self.endpoint)
            .field(
                "persistent_keepalive_interval",
                &self.persistent_keepalive_interval,
            )
            .field("replace_allowed_ips", &self.replace_allowed_ips)
            .field("allowed_ips", &self.allowed_ips)
            .field("remove_allowed_ips", &self.remove_allowed_ips)
            .finish()
    }
}

impl PeerUpdate {
    /// An entry for `public_key` that changes nothing (but creates the peer
    /// if it does not exist).
    pub fn new(public_key: [u8; 32]) -> Self {
        PeerUpdate {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
            remove_allowed_ips: Vec::new(),
        }
    }

    fn has_changes(&self) -> bool {
        self.preshared_key.is_some()
            || self.endpoint.is_some()
            || self.persistent_keepalive_interval.is_some()
            || self.replace_allowed_ips
            || !self.allowed_ips.is_empty()
            || !self.remove_allowed_ips.is_empty()
    }
}

/// The device side of the protocol.
pub trait UapiDevice: Send + Sync {
    /// The current state, for `get=1`.
    fn snapshot(&self) -> UapiSnapshot;
    /// Applies a validated `set=1` request (see [`SetRequest`] for the
    /// semantics). The error's [`UapiError::errno`] is sent to the client.
    fn apply(&self, req: SetRequest) -> Result<(), UapiError>;
}

/// Why a request failed; [`UapiError::errno`] gives the value sent as
/// `errno=`. Messages never contain request values (which may be keys).
#[derive(thiserror::Error, Debug)]
pub enum UapiError {
    /// Syntax error: missing `=`, empty line inside a request, bad UTF-8,
    /// extra lines after `get=1`, contradictory peer settings... (`EINVAL`)
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A key the protocol does not define, or one not valid where it appears
    /// (e.g. `endpoint` before any `public_key`). (`EINVAL`)
    #[error("unknown or misplaced key `{0}`")]
    UnknownKey(String),
    /// A known key given twice in the same section. (`EINVAL`)
    #[error("key `{0}` given more than once")]
    DuplicateKey(String),
    /// A value that does not parse or is out of range. (`EINVAL`)
    #[error("invalid value for `{key}`: {reason}")]
    InvalidValue { key: String, reason: String },
    /// An operation other than `get=1` / `set=1`. (`EINVAL`)
    #[error("unsupported operation `{0}`")]
    UnsupportedOperation(String),
    /// The request exceeds a size limit. (`EMSGSIZE`)
    #[error("request too large: {0}")]
    TooLarge(&'static str),
    /// The requested listen port is taken. (`EADDRINUSE`)
    #[error("listen port {0} is already in use")]
    PortInUse(u16),
    /// The device refuses a well-formed request (e.g. a limit). (`EINVAL`)
    #[error("request rejected: {0}")]
    Rejected(String),
    /// The device failed while applying the request. (`EIO`)
    #[error("device error: {0}")]
    Device(String),
    /// An OS error while applying; its errno is passed through (`EIO` if it
    /// has none).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl UapiError {
    /// The (positive, Linux) errno value; it is sent negated, as
    /// `errno=-<n>` (see the module docs).
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Malformed(_)
            | UapiError::UnknownKey(_)
            | UapiError::DuplicateKey(_)
            | UapiError::InvalidValue { .. }
            | UapiError::UnsupportedOperation(_)
            | UapiError::Rejected(_) => EINVAL,
            UapiError::TooLarge(_) => EMSGSIZE,
            UapiError::PortInUse(_) => EADDRINUSE,
            UapiError::Device(_) => EIO,
            UapiError::Io(e) => e.raw_os_error().filter(|&n| n > 0).unwrap_or(EIO),
        }
    }

    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        UapiError::InvalidValue {
            key: sanitize(key),
            reason: reason.into(),
        }
    }
}

/// A key name fit for an error message or log: truncated and escaped.
fn sanitize(key: &str) -> String {
    let short: String = key.chars().take(40).collect();
    short.escape_debug().to_string()
}

// ---------------------------------------------------------------------------
// get
// ---------------------------------------------------------------------------

/// Formats the response to `get=1`, including the trailing `errno=0\n\n`.
///
/// **Never emits `private_key=` or `preshared_key=`**, even though the
/// snapshot may carry them and the stock implementations send them: Isthmus
/// does not let key material reach CLI output (see the module docs for what
/// `wg` shows as a result). Peer lines follow the order wireguard-go uses:
/// `public_key`, `protocol_version`, `endpoint`, `last_handshake_time_sec`,
/// `last_handshake_time_nsec`, `tx_bytes`, `rx_bytes`,
/// `persistent_keepalive_interval`, `allowed_ip`...
pub fn format_get(s: &UapiSnapshot) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(64 + 320 * s.peers.len());
    // Writing to a String cannot fail; the results are ignored on purpose.
    if s.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", s.listen_port);
    }
    if let Some(mark) = s.fwmark.filter(|&m| m != 0) {
        let _ = writeln!(out, "fwmark={mark}");
    }
    for p in &s.peers {
        let _ = writeln!(out, "public_key={}", hex::encode(p.public_key));
        out.push_str("protocol_version=1\n");
        if let Some(ep) = p.endpoint {
            // SocketAddr's Display brackets IPv6 ("[::1]:51820"), as required.
            let _ = writeln!(out, "endpoint={ep}");
        }
        let (sec, nsec) = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(out, "last_handshake_time_sec={sec}");
        let _ = writeln!(out, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive_interval
        );
        for (ip, len) in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}/{len}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

// ---------------------------------------------------------------------------
// set
// ---------------------------------------------------------------------------

/// Parses a `set` request.
///
/// `body` is the request as sent on the socket: an optional leading `set=1`
/// line, then `key=value` lines separated by `\n`, optionally terminated by
/// one empty line. Parsing is strict: unknown or misplaced keys, duplicated
/// keys, bad hex (keys are exactly 64 lowercase hex digits), out-of-range
/// numbers or prefix lengths, and boolean flags other than `true` are all
/// errors ([`UapiError::errno`] = `EINVAL`). Nothing is applied on error.
pub fn parse_set(body: &str) -> Result<SetRequest, UapiError> {
    let body = body.strip_suffix('\n').unwrap_or(body);
    // The request's terminating empty line, if present.
    let body = body.strip_suffix('\n').unwrap_or(body);
    if body.is_empty() {
        return Ok(SetRequest::default());
    }
    let mut lines = body.split('\n').peekable();
    if lines.peek() == Some(&"set=1") {
        lines.next();
    }
    parse_set_lines(lines)
}

/// Per-peer parsing state.
struct PeerState {
    update: PeerUpdate,
    protocol_version_seen: bool,
}

impl PeerState {
    fn finish(self) -> Result<PeerUpdate, UapiError> {
        if self.update.remove && self.update.has_changes() {
            return Err(UapiError::Malformed(
                "remove=true cannot be combined with other peer settings".into(),
            ));
        }
        Ok(self.update)
    }
}

/// Parses the `key=value` lines of a `set` request (operation line and
/// terminating empty line excluded).
fn parse_set_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    let mut peer: Option<PeerState> = None;
    for line in lines {
        if line.is_empty() {
            return Err(UapiError::Malformed("empty line inside request".into()));
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| UapiError::Malformed("line without `=`".into()))?;
        if key == "public_key" {
            if let Some(done) = peer.take() {
                req.peers.push(done.finish()?);
            }
            let public_key = parse_hex_key(key, value)?;
            if public_key == [0u8; 32] {
                return Err(UapiError::invalid(
                    key,
                    "the all-zero key is not a valid key",
                ));
            }
            peer = Some(PeerState {
                update: PeerUpdate::new(public_key),
                protocol_version_seen: false,
            });
            continue;
        }
        match peer.as_mut() {
            None => parse_device_line(&mut req, key, value)?,
            Some(p) => parse_peer_line(p, key, value)?,
        }
    }
    if let Some(done) = peer.take() {
        req.peers.push(done.finish()?);
    }
    Ok(req)
}

fn parse_device_line(req: &mut SetRequest, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "private_key" => set_once(&mut req.private_key, key, parse_secret_key(key, value)?),
        "listen_port" => set_once(&mut req.listen_port, key, parse_dec::<u16>(key, value)?),
        "fwmark" => set_once(&mut req.fwmark, key, parse_dec::<u32>(key, value)?),
        "replace_peers" => flag_once(&mut req.replace_peers, key, value),
        _ => Err(UapiError::UnknownKey(sanitize(key))),
    }
}

fn parse_peer_line(p: &mut PeerState, key: &str, value: &str) -> Result<(), UapiError> {
    let u = &mut p.update;
    match key {
        "remove" => flag_once(&mut u.remove, key, value),
        "update_only" => flag_once(&mut u.update_only, key, value),
        "preshared_key" => set_once(&mut u.preshared_key, key, parse_secret_key(key, value)?),
        "endpoint" => set_once(&mut u.endpoint, key, parse_endpoint(key, value)?),
        "persistent_keepalive_interval" => set_once(
            &mut u.persistent_keepalive_interval,
            key,
            parse_dec::<u16>(key, value)?,
        ),
        "replace_allowed_ips" => {
            if !u.allowed_ips.is_empty() || !u.remove_allowed_ips.is_empty() {
                return Err(UapiError::Malformed(
                    "replace_allowed_ips must precede the peer's allowed_ip lines".into(),
                ));
            }
            flag_once(&mut u.replace_allowed_ips, key, value)
        }
        "allowed_ip" => {
            if let Some(rest) = value.strip_prefix('-') {
                u.remove_allowed_ips.push(parse_prefix(key, rest)?);
            } else {
                u.allowed_ips.push(parse_prefix(key, value)?);
            }
            Ok(())
        }
        "protocol_version" => {
            if p.protocol_version_seen {
                return Err(UapiError::DuplicateKey(key.into()));
            }
            p.protocol_version_seen = true;
            if value != "1" {
                return Err(UapiError::invalid(
                    key,
                    "only protocol version 1 is supported",
                ));
            }
            Ok(())
        }
        _ => Err(UapiError::UnknownKey(sanitize(key))),
    }
}

fn set_once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), UapiError> {
    if slot.is_some() {
        return Err(UapiError::DuplicateKey(key.into()));
    }
    *slot = Some(value);
    Ok(())
}

/// Boolean flags only take the value `true` in the protocol.
fn flag_once(slot: &mut bool, key: &str, value: &str) -> Result<(), UapiError> {
    if value != "true" {
        return Err(UapiError::invalid(key, "the only accepted value is `true`"));
    }
    if *slot {
        return Err(UapiError::DuplicateKey(key.into()));
    }
    *slot = true;
    Ok(())
}

fn parse_hex_key(key: &str, value: &str) -> Result<[u8; 32], UapiError> {
    const REASON: &str = "expected 64 lowercase hex digits";
    if value.len() != 64
        || !value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(UapiError::invalid(key, REASON));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(value, &mut out).map_err(|_| UapiError::invalid(key, REASON))?;
    Ok(out)
}

fn parse_secret_key(key: &str, value: &str) -> Result<KeyUpdate, UapiError> {
    let k = parse_hex_key(key, value)?;
    Ok(if k == [0u8; 32] {
        KeyUpdate::Clear
    } else {
        KeyUpdate::Set(k)
    })
}

/// Plain decimal: ASCII digits only (no sign, no spaces), within `T`'s range.
fn parse_dec<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UapiError::invalid(key, "expected a decimal number"));
    }
    value
        .parse()
        .map_err(|_| UapiError::invalid(key, "number out of range"))
}

fn parse_endpoint(key: &str, value: &str) -> Result<SocketAddr, UapiError> {
    let addr: SocketAddr = value
        .parse()
        .map_err(|_| UapiError::invalid(key, "expected IPv4:port or [IPv6]:port"))?;
    if addr.port() == 0 {
        return Err(UapiError::invalid(key, "port must not be 0"));
    }
    Ok(addr)
}

/// `addr/len`, with host bits cleared.
fn parse_prefix(key: &str, value: &str) -> Result<(IpAddr, u8), UapiError> {
    let (addr, len) = value
        .split_once('/')
        .ok_or_else(|| UapiError::invalid(key, "expected address/prefix-length"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| UapiError::invalid(key, "not an IP address"))?;
    let len: u8 = parse_dec(key, len)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(UapiError::invalid(
            key,
            format!("prefix length {len} exceeds {max}"),
        ));
    }
    Ok((mask_host_bits(addr, len), len))
}

fn mask_host_bits(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

// ---------------------------------------------------------------------------
// Connection handling
// ---------------------------------------------------------------------------

/// `errno=0` on success; failures are sent negated, like wireguard-go does
/// and `wg` expects (see the module docs).
fn errno_response(errno: i32) -> String {
    if errno == 0 {
        "errno=0\n\n".to_owned()
    } else {
        format!("errno=-{}\n\n", errno.unsigned_abs())
    }
}

/// Reads from the stream, failing once `deadline` has passed (the socket's
/// read timeout is set to the remaining time before every read, so a client
/// trickling bytes cannot hold the connection past the deadline).
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "UAPI request not completed in time",
            ));
        }
        self.stream.set_read_timeout(Some(remaining))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

enum Incoming {
    /// The peer closed the connection between requests.
    Eof,
    /// A complete request: its lines, without newlines and without the
    /// terminating empty line (never empty).
    Request(Vec<String>),
    /// A request to answer with an error; `resync` tells whether the
    /// connection is still in step (the terminating empty line was read).
    Rejected { err: UapiError, resync: bool },
}

/// Reads one request, enforcing the size limits.
fn read_request<R: BufRead>(r: &mut R) -> io::Result<Incoming> {
    let mut lines = Vec::new();
    let mut line_count = 0usize;
    let mut total = 0usize;
    let mut bad: Option<UapiError> = None;
    let mut buf = Vec::with_capacity(128);
    loop {
        buf.clear();
        let n = r
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            if total == 0 {
                return Ok(Incoming::Eof);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a request",
            ));
        }
        total += n;
        if buf.last() != Some(&b'\n') {
            if n > MAX_LINE_BYTES {
                return Ok(Incoming::Rejected {
                    err: UapiError::TooLarge("line too long"),
                    resync: false,
                });
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a line",
            ));
        }
        if total > MAX_REQUEST_BYTES {
            return Ok(Incoming::Rejected {
                err: UapiError::TooLarge("too many bytes"),
                resync: false,
            });
        }
        buf.pop();
        if buf.is_empty() {
            let err = match bad {
                Some(e) => e,
                None if lines.is_empty() => UapiError::Malformed("empty request".into()),
                None => return Ok(Incoming::Request(lines)),
            };
            return Ok(Incoming::Rejected { err, resync: true });
        }
        line_count += 1;
        if line_count > MAX_REQUEST_LINES {
            return Ok(Incoming::Rejected {
                err: UapiError::TooLarge("too many lines"),
                resync: false,
            });
        }
        if bad.is_none() {
            match std::str::from_utf8(&buf) {
                Ok(s) => lines.push(s.to_owned()),
                Err(_) => bad = Some(UapiError::Malformed("request is not valid UTF-8".into())),
            }
        }
    }
}

/// Runs one complete request against the device and returns the response.
fn handle_request<D: UapiDevice + ?Sized>(lines: &[String], dev: &D) -> String {
    let Some(op) = lines.first() else {
        return errno_response(EINVAL);
    };
    let result = match op.as_str() {
        "get=1" => {
            if lines.len() == 1 {
                return format_get(&dev.snapshot());
            }
            Err(UapiError::Malformed("unexpected lines after get=1".into()))
        }
        "set=1" => parse_set_lines(lines[1..].iter().map(String::as_str)).and_then(|req| {
            tracing::debug!(
                peers = req.peers.len(),
                replace_peers = req.replace_peers,
                "UAPI set request"
            );
            dev.apply(req)
        }),
        other => {
            let name = other.split_once('=').map_or(other, |(k, _)| k);
            Err(UapiError::UnsupportedOperation(sanitize(name)))
        }
    };
    match result {
        Ok(()) => errno_response(0),
        Err(e) => {
            tracing::warn!(error = %e, errno = e.errno(), "UAPI request failed");
            errno_response(e.errno())
        }
    }
}

/// Serves requests on one connection until the client closes it.
///
/// Each request must arrive completely within [`REQUEST_TIMEOUT`] of the
/// previous response (or of the call); otherwise, or on an I/O error, the
/// connection is dropped and the error returned. Malformed requests get an
/// `errno=` reply; when the stream can no longer be resynchronised (size
/// limits) the connection is closed after the reply and `Ok(())` returned.
/// A client that connects and closes without a request (as `wg` does to
/// probe sockets) yields `Ok(())`.
pub fn serve_connection<D: UapiDevice + ?Sized>(stream: UnixStream, dev: &D) -> io::Result<()> {
    serve_connection_with_timeout(stream, dev, REQUEST_TIMEOUT)
}

fn serve_connection_with_timeout<D: UapiDevice + ?Sized>(
    stream: UnixStream,
    dev: &D,
    timeout: Duration,
) -> io::Result<()> {
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(DeadlineReader {
        stream: &stream,
        deadline: Instant::now() + timeout,
    });
    loop {
        reader.get_mut().deadline = Instant::now() + timeout;
        let (response, keep_going) = match read_request(&mut reader)? {
            Incoming::Eof => return Ok(()),
            Incoming::Request(lines) => (handle_request(&lines, dev), true),
            Incoming::Rejected { err, resync } => {
                tracing::warn!(error = %err, "malformed UAPI request");
                (errno_response(err.errno()), resync)
            }
        };
        (&stream).write_all(response.as_bytes())?;
        if !keep_going {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// Listens on `<dir>/<ifname>.sock` and serves UAPI requests for a device on
/// a background thread; each connection gets its own short-lived thread (at
/// most 16 at once), bounded by [`REQUEST_TIMEOUT`] per request.
///
/// The socket is a [`crate::socket::PrivateSocket`]: mode 0600 from the
/// moment it becomes visible, only root or the gateway's user served, never
/// replacing or removing a file another process created.
#[derive(Debug)]
pub struct UapiServer {
    socket: crate::socket::PrivateSocket,
}

impl UapiServer {
    /// Serves `device` on `/var/run/wireguard/<ifname>.sock`, creating the
    /// directory (mode 0755) if needed.
    ///
    /// Fails with [`io::ErrorKind::AddrInUse`] if another process listens on
    /// that socket; a stale socket (nothing listening) is removed first. A
    /// non-socket file at that path is never removed
    /// ([`io::ErrorKind::AlreadyExists`]). `ifname` must be a valid Linux
    /// interface name (1 to 15 bytes, no `/`, `:` or whitespace, not `.`/`..`).
    pub fn bind<D: UapiDevice + ?Sized + 'static>(
        ifname: &str,
        device: Arc<D>,
    ) -> io::Result<Self> {
        Self::bind_in(Path::new(SOCKET_DIR), ifname, device)
    }

    /// Like [`UapiServer::bind`] but in directory `dir` (for tests).
    pub fn bind_in<D: UapiDevice + ?Sized + 'static>(
        dir: &Path,
        ifname: &str,
        device: Arc<D>,
    ) -> io::Result<Self> {
        validate_ifname(ifname)?;
        let path = dir.join(format!("{ifname}.sock"));
        let socket = crate::socket::PrivateSocket::bind(
            &path,
            "uapi",
            MAX_CONCURRENT_CONNECTIONS,
            // EACCES, as the protocol reports errors.
            "errno=13\n\n",
            Arc::new(move |stream| {
                if let Err(e) = serve_connection(stream, &*device) {
                    tracing::debug!(error = %e, "UAPI connection ended with an error");
                }
            }),
        )?;
        tracing::info!(path = %path.display(), "UAPI socket listening");
        Ok(UapiServer { socket })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Stops accepting connections and removes the socket file (same as
    /// dropping). Connections in progress finish on their own threads.
    pub fn shutdown(mut self) {
        self.socket.shutdown();
    }
}

fn validate_ifname(ifname: &str) -> io::Result<()> {
    let ok = !ifname.is_empty()
        && ifname.len() <= MAX_IFNAME_LEN
        && ifname != "."
        && ifname != ".."
        && !ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {:?}", sanitize(ifname)),
        ))
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, RandomState};
    use std::io::BufRead;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    const PUB1: [u8; 32] = [0x11; 32];
    const PUB2: [u8; 32] = [0x22; 32];
    const PRIV: [u8; 32] = [0xaa; 32];
    const PSK: [u8; 32] = [0xbb; 32];

    fn h(k: &[u8; 32]) -> String {
        hex::encode(k)
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn unique_suffix() -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let x = RandomState::new().hash_one((
            std::process::id(),
            SystemTime::now(),
            N.fetch_add(1, Ordering::Relaxed),
        ));
        format!("{:06x}", x & 0xff_ffff)
    }

    /// An in-memory device implementing the documented `SetRequest`
    /// semantics, recording every applied request.
    #[derive(Default)]
    struct FakeDevice {
        state: Mutex<UapiSnapshot>,
        applied: Mutex<Vec<SetRequest>>,
    }

    impl FakeDevice {
        fn with(snapshot: UapiSnapshot) -> Self {
            FakeDevice {
                state: Mutex::new(snapshot),
                applied: Mutex::default(),
            }
        }
    }

    fn empty_peer(public_key: [u8; 32]) -> UapiPeer {
        UapiPeer {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: 0,
            allowed_ips: Vec::new(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    impl UapiDevice for FakeDevice {
        fn snapshot(&self) -> UapiSnapshot {
            self.state.lock().unwrap().clone()
        }

        fn apply(&self, req: SetRequest) -> Result<(), UapiError> {
            if req.listen_port == Some(1) {
                return Err(UapiError::PortInUse(1));
            }
            self.applied.lock().unwrap().push(req.clone());
            let mut s = self.state.lock().unwrap();
            match req.private_key {
                Some(KeyUpdate::Set(k)) => s.private_key = Some(k),
                Some(KeyUpdate::Clear) => s.private_key = None,
                None => {}
            }
            if let Some(p) = req.listen_port {
                s.listen_port = p;
            }
            if let Some(m) = req.fwmark {
                s.fwmark = (m != 0).then_some(m);
            }
            if req.replace_peers {
                s.peers.clear();
            }
            for u in req.peers {
                let idx = s.peers.iter().position(|p| p.public_key == u.public_key);
                if u.remove {
                    if let Some(i) = idx {
                        s.peers.remove(i);
                    }
                    continue;
                }
                let i = match idx {
                    Some(i) => i,
                    None if u.update_only => continue,
                    None => {
                        s.peers.push(empty_peer(u.public_key));
                        s.peers.len() - 1
                    }
                };
                for (ip, len) in &u.allowed_ips {
                    for other in s.peers.iter_mut() {
                        other.allowed_ips.retain(|a| a != &(*ip, *len));
                    }
                }
                let p = &mut s.peers[i];
                match u.preshared_key {
                    Some(KeyUpdate::Set(k)) => p.preshared_key = Some(k),
                    Some(KeyUpdate::Clear) => p.preshared_key = None,
                    None => {}
                }
                if let Some(ep) = u.endpoint {
                    p.endpoint = Some(ep);
                }
                if let Some(k) = u.persistent_keepalive_interval {
                    p.persistent_keepalive_interval = k;
                }
                if u.replace_allowed_ips {
                    p.allowed_ips.clear();
                }
                p.allowed_ips.extend(u.allowed_ips);
                p.allowed_ips.retain(|a| !u.remove_allowed_ips.contains(a));
            }
            Ok(())
        }
    }

    fn sample_snapshot() -> UapiSnapshot {
        UapiSnapshot {
            private_key: Some(PRIV),
            listen_port: 51820,
            fwmark: Some(0x33),
            peers: vec![
                UapiPeer {
                    public_key: PUB1,
                    preshared_key: Some(PSK),
                    endpoint: Some("[2001:db8::1]:51821".parse().unwrap()),
                    persistent_keepalive_interval: 25,
                    allowed_ips: vec![(v4(10, 0, 0, 0), 8), ("2001:db8::".parse().unwrap(), 32)],
                    last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)),
                    rx_bytes: 1000,
                    tx_bytes: 2000,
                },
                empty_peer(PUB2),
            ],
        }
    }

    #[test]
    fn format_get_golden() {
        let out = format_get(&sample_snapshot());
        let expected = format!(
            "listen_port=51820\n\
             fwmark=51\n\
             public_key={p1}\n\
             protocol_version=1\n\
             endpoint=[2001:db8::1]:51821\n\
             last_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=123456789\n\
             tx_bytes=2000\n\
             rx_bytes=1000\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=10.0.0.0/8\n\
             allowed_ip=2001:db8::/32\n\
             public_key={p2}\n\
             protocol_version=1\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             errno=0\n\n",
            p1 = h(&PUB1),
            p2 = h(&PUB2),
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn format_get_never_leaks_secrets() {
        let out = format_get(&sample_snapshot());
        assert!(!out.contains("private_key"));
        assert!(!out.contains("preshared_key"));
        assert!(!out.contains(&h(&PRIV)));
        assert!(!out.contains(&h(&PSK)));
        let dbg = format!("{:?}", sample_snapshot());
        assert!(
            !dbg.contains(&h(&PRIV)) && !dbg.contains("170, 170"),
            "{dbg}"
        );
        assert!(
            !dbg.contains(&h(&PSK)) && !dbg.contains("187, 187"),
            "{dbg}"
        );
        let req = parse_set(&format!("private_key={}\n", h(&PRIV))).unwrap();
        assert!(!format!("{req:?}").contains("170"));
    }

    #[test]
    fn format_get_empty_device() {
        assert_eq!(format_get(&UapiSnapshot::default()), "errno=0\n\n");
        let s = UapiSnapshot {
            fwmark: Some(0),
            ..UapiSnapshot::default()
        };
        assert_eq!(format_get(&s), "errno=0\n\n");
    }

    #[test]
    fn parse_set_peer_add() {
        let body = format!(
            "set=1\n\
             private_key={priv}\n\
             listen_port=51820\n\
             fwmark=0\n\
             replace_peers=true\n\
             public_key={p1}\n\
             preshared_key={psk}\n\
             endpoint=[2001:db8::1]:51821\n\
             persistent_keepalive_interval=25\n\
             replace_allowed_ips=true\n\
             allowed_ip=10.1.2.3/8\n\
             allowed_ip=2001:db8::1/32\n\
             allowed_ip=-192.168.0.0/16\n\
             protocol_version=1\n\
             public_key={p2}\n\
             endpoint=192.0.2.1:4242\n\
             allowed_ip=0.0.0.0/0\n\n",
            priv = h(&PRIV),
            p1 = h(&PUB1),
            p2 = h(&PUB2),
            psk = h(&PSK),
        );
        let req = parse_set(&body).unwrap();
        let mut p1 = PeerUpdate::new(PUB1);
        p1.preshared_key = Some(KeyUpdate::Set(PSK));
        p1.endpoint = Some("[2001:db8::1]:51821".parse().unwrap());
        p1.persistent_keepalive_interval = Some(25);
        p1.replace_allowed_ips = true;
        p1.allowed_ips = vec![(v4(10, 0, 0, 0), 8), ("2001:db8::".parse().unwrap(), 32)];
        p1.remove_allowed_ips = vec![(v4(192, 168, 0, 0), 16)];
        let mut p2 = PeerUpdate::new(PUB2);
        p2.endpoint = Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(192, 0, 2, 1),
            4242,
        )));
        p2.allowed_ips = vec![(v4(0, 0, 0, 0), 0)];
        assert_eq!(
            req,
            SetRequest {
                private_key: Some(KeyUpdate::Set(PRIV)),
                listen_port: Some(51820),
                fwmark: Some(0),
                replace_peers: true,
                peers: vec![p1, p2],
            }
        );
    }

    #[test]
    fn parse_set_variants() {
        // No leading set=1, no trailing newline; zero keys mean "clear".
        let zero = "0".repeat(64);
        let req = parse_set(&format!(
            "private_key={zero}\npublic_key={}\npreshared_key={zero}",
            h(&PUB1)
        ))
        .unwrap();
        assert_eq!(req.private_key, Some(KeyUpdate::Clear));
        assert_eq!(req.peers[0].preshared_key, Some(KeyUpdate::Clear));

        // remove=true, update_only=true.
        let req = parse_set(&format!(
            "set=1\npublic_key={}\nremove=true\npublic_key={}\nupdate_only=true\nendpoint=1.2.3.4:5\n\n",
            h(&PUB1),
            h(&PUB2)
        ))
        .unwrap();
        assert!(req.peers[0].remove && !req.peers[0].has_changes());
        assert!(req.peers[1].update_only && !req.peers[1].remove);

        // IPv6 endpoint with a numeric scope.
        let req = parse_set(&format!(
            "public_key={}\nendpoint=[fe80::1%2]:51820\n",
            h(&PUB1)
        ))
        .unwrap();
        match req.peers[0].endpoint {
            Some(SocketAddr::V6(a)) => assert_eq!((a.scope_id(), a.port()), (2, 51820)),
            other => panic!("{other:?}"),
        }

        // replace_allowed_ips with no addresses = clear them.
        let req = parse_set(&format!(
            "set=1\npublic_key={}\nreplace_allowed_ips=true\n",
            h(&PUB1)
        ))
        .unwrap();
        assert!(req.peers[0].replace_allowed_ips && req.peers[0].allowed_ips.is_empty());

        // replace_peers alone = remove all peers; the empty request is valid.
        assert!(
            parse_set("set=1\nreplace_peers=true\n\n")
                .unwrap()
                .replace_peers
        );
        assert_eq!(parse_set("set=1\n\n").unwrap(), SetRequest::default());
        assert_eq!(parse_set("").unwrap(), SetRequest::default());

        // Same peer twice is allowed (entries apply in order); edge prefixes.
        let req = parse_set(&format!(
            "public_key={k}\nallowed_ip=1.2.3.4/32\nallowed_ip=::/0\npublic_key={k}\nallowed_ip=::1/128\n",
            k = h(&PUB1)
        ))
        .unwrap();
        assert_eq!(req.peers.len(), 2);
        assert_eq!(
            req.peers[0].allowed_ips,
            vec![(v4(1, 2, 3, 4), 32), ("::".parse().unwrap(), 0)]
        );
        assert_eq!(
            req.peers[1].allowed_ips,
            vec![("::1".parse().unwrap(), 128)]
        );
    }

    #[test]
    fn parse_set_rejects_bad_input() {
        let k = h(&PUB1);
        let cases: Vec<(String, &str)> = vec![
            ("bogus=1\n".into(), "unknown device key"),
            (format!("public_key={k}\nbogus=1\n"), "unknown peer key"),
            (format!("public_key={k}\nrx_bytes=1\n"), "get-only key"),
            ("endpoint=1.2.3.4:5\n".into(), "peer key before public_key"),
            (
                format!("public_key={k}\nlisten_port=1\n"),
                "device key after peer",
            ),
            (
                format!("public_key={}\n", h(&[0xab; 32]).to_uppercase()),
                "uppercase hex",
            ),
            (format!("public_key={}\n", &k[..62]), "short key"),
            (format!("public_key={k}00\n"), "long key"),
            (format!("public_key={}zz\n", &k[..62]), "non-hex"),
            (
                format!("public_key={}\n", "0".repeat(64)),
                "zero public key",
            ),
            (format!("private_key={} \n", h(&PRIV)), "trailing space"),
            (
                format!("public_key={k}\nallowed_ip=10.0.0.0/33\n"),
                "v4 prefix too long",
            ),
            (
                format!("public_key={k}\nallowed_ip=::/129\n"),
                "v6 prefix too long",
            ),
            (
                format!("public_key={k}\nallowed_ip=10.0.0.0\n"),
                "missing prefix length",
            ),
            (
                format!("public_key={k}\nallowed_ip=10.0.0.0/-1\n"),
                "negative length",
            ),
            (
                format!("public_key={k}\nallowed_ip=10.0.0/8\n"),
                "bad address",
            ),
            (
                format!("public_key={k}\nallowed_ip=10.0.0.0/8\nreplace_allowed_ips=true\n"),
                "replace after ips",
            ),
            (
                format!("public_key={k}\nendpoint=1.2.3.4\n"),
                "endpoint without port",
            ),
            (
                format!("public_key={k}\nendpoint=::1:5\n"),
                "unbracketed v6 endpoint",
            ),
            (
                format!("public_key={k}\nendpoint=1.2.3.4:0\n"),
                "endpoint port 0",
            ),
            (
                format!("public_key={k}\nendpoint=host.example:5\n"),
                "hostname endpoint",
            ),
            (
                format!("public_key={k}\nendpoint=[fe80::1%eth0]:5\n"),
                "named scope",
            ),
            (
                format!("public_key={k}\npersistent_keepalive_interval=65536\n"),
                "keepalive range",
            ),
            (
                format!("public_key={k}\npersistent_keepalive_interval=+5\n"),
                "signed number",
            ),
            ("listen_port=65536\n".into(), "port range"),
            ("listen_port=\n".into(), "empty number"),
            ("fwmark=4294967296\n".into(), "fwmark range"),
            ("replace_peers=false\n".into(), "flag not true"),
            (format!("public_key={k}\nremove=1\n"), "remove not true"),
            (
                format!("public_key={k}\nremove=true\nendpoint=1.2.3.4:5\n"),
                "remove + change",
            ),
            (
                format!("public_key={k}\nallowed_ip=1.0.0.0/8\nremove=true\n"),
                "change + remove",
            ),
            (
                format!("public_key={k}\nprotocol_version=2\n"),
                "protocol version",
            ),
            ("listen_port=1\nlisten_port=2\n".into(), "duplicate key"),
            (
                format!("public_key={k}\nupdate_only=true\nupdate_only=true\n"),
                "duplicate flag",
            ),
            ("listen_port 1\n".into(), "no ="),
            ("=1\n".into(), "empty key"),
            (
                "set=1\nlisten_port=1\n\nlisten_port=2\n".into(),
                "data after terminator",
            ),
            ("get=1\n".into(), "get inside set"),
            ("errno=0\n".into(), "errno key"),
        ];
        for (body, what) in cases {
            match parse_set(&body) {
                Err(e) => assert_eq!(e.errno(), EINVAL, "{what}: {e}"),
                Ok(r) => panic!("{what}: accepted {r:?}"),
            }
        }
    }

    #[test]
    fn errors_do_not_echo_values() {
        let secret = h(&PRIV);
        let e = parse_set(&format!("private_key={}X\n", &secret[..63])).unwrap_err();
        assert!(!e.to_string().contains(&secret[..63]), "{e}");
        let e = parse_set(&format!("{secret}\n")).unwrap_err();
        assert!(!e.to_string().contains(&secret), "{e}");
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(UapiError::Malformed(String::new()).errno(), 22);
        assert_eq!(UapiError::UnknownKey(String::new()).errno(), 22);
        assert_eq!(UapiError::Rejected(String::new()).errno(), 22);
        assert_eq!(UapiError::TooLarge("x").errno(), 90);
        assert_eq!(UapiError::PortInUse(1).errno(), 98);
        assert_eq!(UapiError::Device(String::new()).errno(), 5);
        assert_eq!(UapiError::Io(io::Error::from_raw_os_error(13)).errno(), 13);
        assert_eq!(UapiError::Io(io::Error::other("x")).errno(), 5);
    }

    /// Reads one response (up to and including its empty line).
    fn read_response(r: &mut impl BufRead) -> String {
        let mut out = String::new();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "EOF after {out:?}");
            out.push_str(&line);
            if line == "\n" {
                return out;
            }
        }
    }

    #[test]
    fn round_trip_over_unix_stream() {
        let dev = Arc::new(FakeDevice::with(sample_snapshot()));
        let (client, server) = UnixStream::pair().unwrap();
        let handle = {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || serve_connection(server, &*dev))
        };
        let mut w = client.try_clone().unwrap();
        let mut r = BufReader::new(client.try_clone().unwrap());

        w.write_all(b"get=1\n\n").unwrap();
        assert_eq!(read_response(&mut r), format_get(&sample_snapshot()));

        // A set, then a get on the same connection reflects it.
        let pub3 = [0x33u8; 32];
        w.write_all(
            format!(
                "set=1\npublic_key={}\nremove=true\npublic_key={}\nallowed_ip=100.64.9.0/24\n\n",
                h(&PUB2),
                h(&pub3)
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(read_response(&mut r), "errno=0\n\n");
        let snap = dev.snapshot();
        assert_eq!(snap.peers.len(), 2);
        assert_eq!(snap.peers[1].public_key, pub3);
        assert_eq!(snap.peers[1].allowed_ips, vec![(v4(100, 64, 9, 0), 24)]);

        // Malformed requests get EINVAL and the connection stays usable.
        for bad in [
            &b"set=1\nbogus=1\n\n"[..],
            b"get=1\nlisten_port=1\n\n",
            b"frob=1\n\n",
            b"get=2\n\n",
            b"\n",
            b"set=1\nlisten_port=\xff\xfe\n\n",
        ] {
            w.write_all(bad).unwrap();
            assert_eq!(read_response(&mut r), "errno=-22\n\n", "{bad:?}");
        }
        // A device error is passed through.
        w.write_all(b"set=1\nlisten_port=1\n\n").unwrap();
        assert_eq!(read_response(&mut r), "errno=-98\n\n");
        // Nothing of the failed requests was applied.
        assert_eq!(dev.applied.lock().unwrap().len(), 1);

        // Pipelined requests in one write.
        w.write_all(b"set=1\nlisten_port=4000\n\nget=1\n\n")
            .unwrap();
        assert_eq!(read_response(&mut r), "errno=0\n\n");
        assert!(read_response(&mut r).starts_with("listen_port=4000\nfwmark=51\n"));

        w.shutdown(std::net::Shutdown::Write).unwrap();
        handle.join().unwrap().unwrap();
    }

    #[test]
    fn oversized_requests_are_refused() {
        let dev = FakeDevice::default();
        // One overlong line: EMSGSIZE, then the connection closes.
        let (client, server) = UnixStream::pair().unwrap();
        let writer = {
            let mut w = client.try_clone().unwrap();
            std::thread::spawn(move || {
                let line = format!("set=1\nbogus={}\n\n", "x".repeat(MAX_LINE_BYTES));
                let _ = w.write_all(line.as_bytes());
            })
        };
        serve_connection(server, &dev).unwrap();
        let mut resp = String::new();
        BufReader::new(&client).read_line(&mut resp).unwrap();
        assert_eq!(resp, "errno=-90\n");
        writer.join().unwrap();

        // Too many bytes overall, made of short valid-looking lines.
        let (client, server) = UnixStream::pair().unwrap();
        let writer = {
            let mut w = client.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut body = String::from("set=1\n");
                let line = format!("public_key={}\nallowed_ip=10.0.0.0/8\n", h(&PUB1));
                while body.len() <= MAX_REQUEST_BYTES {
                    body.push_str(&line);
                }
                body.push('\n');
                let _ = w.write_all(body.as_bytes());
            })
        };
        serve_connection(server, &dev).unwrap();
        let mut resp = String::new();
        BufReader::new(&client).read_line(&mut resp).unwrap();
        assert_eq!(resp, "errno=-90\n");
        writer.join().unwrap();
        assert!(dev.applied.lock().unwrap().is_empty());
    }

    #[test]
    fn stuck_client_times_out() {
        let dev = FakeDevice::default();
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(b"get=1\n").unwrap(); // never terminated
        let start = Instant::now();
        let res = serve_connection_with_timeout(server, &dev, Duration::from_millis(200));
        assert!(res.is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn probe_connection_is_fine() {
        let dev = FakeDevice::default();
        let (client, server) = UnixStream::pair().unwrap();
        drop(client);
        serve_connection(server, &dev).unwrap();
    }

    /// Removes a temporary directory or file on drop.
    struct TempPath(PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            if std::fs::remove_dir_all(&self.0).is_err() {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn get_over(path: &Path) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(b"get=1\n\n").unwrap();
        read_response(&mut BufReader::new(s))
    }

    #[test]
    fn server_in_temp_dir() {
        let tmp = TempPath(std::env::temp_dir().join(format!("isthmus-uapi-{}", unique_suffix())));
        let dir = tmp.0.join("wireguard");
        let dev = Arc::new(FakeDevice::with(sample_snapshot()));

        // Invalid names are refused before touching the file system.
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a b",
            "a:b",
            "abcdefghijklmnop",
        ] {
            let e = UapiServer::bind_in(&dir, bad, Arc::clone(&dev)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }

        // A stale socket (nobody listening) is replaced.
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("wgt0.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        // A process forked by a parallel test may hold the listener for a
        // moment (until its exec closes it): wait until the socket is stale.
        let deadline = Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(&path).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }

        let server = UapiServer::bind_in(&dir, "wgt0", Arc::clone(&dev)).unwrap();
        assert_eq!(server.path(), path);
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        // Only the socket is left in the directory (staging cleaned up).
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("wgt0.sock")]);

        // A second server for the same name is refused with a clear error.
        let e = UapiServer::bind_in(&dir, "wgt0", Arc::clone(&dev)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("another process"), "{e}");

        // A stuck client does not block others.
        let mut stuck = UnixStream::connect(&path).unwrap();
        stuck.write_all(b"get=1\n").unwrap();
        assert_eq!(get_over(&path), format_get(&sample_snapshot()));
        // Many concurrent connections are fine too.
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || get_over(&path))
            })
            .collect();
        for hdl in handles {
            assert_eq!(hdl.join().unwrap(), format_get(&sample_snapshot()));
        }

        server.shutdown();
        assert!(!path.exists());
        drop(stuck);

        // A non-socket file is never removed.
        std::fs::write(&path, b"not a socket").unwrap();
        let e = UapiServer::bind_in(&dir, "wgt0", Arc::clone(&dev)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();

        // Drop also removes the socket, but never a file that replaced it.
        let server = UapiServer::bind_in(&dir, "wgt0", Arc::clone(&dev)).unwrap();
        drop(server);
        assert!(!path.exists());
        let server = UapiServer::bind_in(&dir, "wgt0", Arc::clone(&dev)).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(server);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }

    fn wg(args: &[&str]) -> std::process::Output {
        let out = Command::new("wg").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "wg {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Drives the server with the real `wg` tool on the real socket path.
    /// Skipped (with a message) when `wg` is missing or we may not create
    /// /var/run/wireguard.
    #[test]
    fn real_wg_tool() {
        if Command::new("wg").arg("--version").output().is_err() {
            eprintln!("skipping real_wg_tool: `wg` not found");
            return;
        }
        let name = format!("isuapit{}", unique_suffix());
        let dev = Arc::new(FakeDevice::with(sample_snapshot()));
        let server = match UapiServer::bind(&name, Arc::clone(&dev)) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("skipping real_wg_tool: {e}");
                return;
            }
            Err(e) => panic!("bind: {e}"),
        };
        let path = server.path().to_owned();
        // From here on the socket is removed by `server`'s Drop, even if an
        // assertion fails.

        let dump = String::from_utf8(wg(&["show", &name, "dump"]).stdout).unwrap();
        let expected = format!(
            "(none)\t(none)\t51820\t0x33\n\
             {p1}\t(none)\t[2001:db8::1]:51821\t10.0.0.0/8,2001:db8::/32\t1700000000\t1000\t2000\t25\n\
             {p2}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n",
            p1 = B64::encode(&PUB1),
            p2 = B64::encode(&PUB2),
        );
        assert_eq!(dump, expected);

        let show = String::from_utf8(wg(&["show", &name]).stdout).unwrap();
        eprintln!("--- wg show {name}\n{show}");
        assert!(show.contains(&format!("interface: {name}")), "{show}");
        assert!(!show.contains("private key"), "{show}");
        assert!(!show.contains("preshared key"), "{show}");
        let conf = String::from_utf8(wg(&["showconf", &name]).stdout).unwrap();
        eprintln!("--- wg showconf {name}\n{conf}");
        assert!(
            !conf.contains("PrivateKey") && !conf.contains("PresharedKey"),
            "{conf}"
        );
        let pk = String::from_utf8(wg(&["show", &name, "public-key"]).stdout).unwrap();
        eprintln!("--- wg show {name} public-key\n{pk}");

        let pub3 = [0x44u8; 32];
        let pub3_b64 = B64::encode(&pub3);
        wg(&[
            "set",
            &name,
            "peer",
            &pub3_b64,
            "allowed-ips",
            "100.64.9.0/24",
        ]);
        let mut expected_update = PeerUpdate::new(pub3);
        expected_update.replace_allowed_ips = true;
        expected_update.allowed_ips = vec![(v4(100, 64, 9, 0), 24)];
        assert_eq!(
            dev.applied.lock().unwrap().last(),
            Some(&SetRequest {
                peers: vec![expected_update],
                ..SetRequest::default()
            })
        );
        let ips = String::from_utf8(wg(&["show", &name, "allowed-ips"]).stdout).unwrap();
        assert!(
            ips.contains(&format!("{pub3_b64}\t100.64.9.0/24\n")),
            "{ips}"
        );

        // `wg set` failures surface the errno.
        let out = Command::new("wg")
            .args(["set", &name, "listen-port", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("--- wg set {name} listen-port 1 (device says EADDRINUSE)\n{stderr}");
        assert!(stderr.contains("Address already in use"), "{stderr}");

        // setconf: keys from a config file reach the device; replace_peers.
        let conf_path = std::env::temp_dir().join(format!("{name}.conf"));
        let conf_guard = TempPath(conf_path.clone());
        std::fs::write(
            &conf_path,
            format!(
                "[Interface]\nPrivateKey = {}\nListenPort = 51999\n\n\
                 [Peer]\nPublicKey = {}\nPresharedKey = {}\nAllowedIPs = 10.9.0.0/16\n\
                 Endpoint = 192.0.2.7:51820\nPersistentKeepalive = 15\n",
                B64::encode(&PRIV),
                B64::encode(&PUB1),
                B64::encode(&PSK)
            ),
        )
        .unwrap();
        let conf_str = conf_path.to_str().unwrap();
        wg(&["setconf", &name, conf_str]);
        {
            let applied = dev.applied.lock().unwrap();
            let req = applied.last().unwrap();
            assert_eq!(req.private_key, Some(KeyUpdate::Set(PRIV)));
            assert_eq!(req.listen_port, Some(51999));
            assert_eq!(req.fwmark, Some(0)); // setconf resets unset fields
            assert!(req.replace_peers);
            assert_eq!(req.peers.len(), 1);
            let p = &req.peers[0];
            assert_eq!(p.public_key, PUB1);
            assert_eq!(p.preshared_key, Some(KeyUpdate::Set(PSK)));
            assert_eq!(p.endpoint, Some("192.0.2.7:51820".parse().unwrap()));
            assert_eq!(p.persistent_keepalive_interval, Some(15));
            assert!(p.replace_allowed_ips);
            assert_eq!(p.allowed_ips, vec![(v4(10, 9, 0, 0), 16)]);
        }
        let dump = String::from_utf8(wg(&["show", &name, "dump"]).stdout).unwrap();
        assert_eq!(
            dump,
            format!(
                "(none)\t(none)\t51999\toff\n\
                 {}\t(none)\t192.0.2.7:51820\t10.9.0.0/16\t0\t0\t0\t15\n",
                B64::encode(&PUB1)
            )
        );

        // syncconf: removes the peers missing from the file.
        std::fs::write(
            &conf_path,
            format!(
                "[Interface]\nPrivateKey = {}\nListenPort = 51999\n\n[Peer]\nPublicKey = {}\n\
                 AllowedIPs = 10.10.0.0/16\n",
                B64::encode(&PRIV),
                B64::encode(&PUB2)
            ),
        )
        .unwrap();
        wg(&["syncconf", &name, conf_str]);
        eprintln!(
            "--- after syncconf: {:?}",
            dev.applied.lock().unwrap().last()
        );
        let snap = dev.snapshot();
        assert_eq!(snap.peers.len(), 1);
        assert_eq!(snap.peers[0].public_key, PUB2);
        assert_eq!(snap.peers[0].allowed_ips, vec![(v4(10, 10, 0, 0), 16)]);
        drop(conf_guard);

        drop(server);
        assert!(!path.exists(), "socket not removed");
    }

    /// Minimal standard base64 for the test (the `wg` CLI prints keys so).
    struct B64;

    impl B64 {
        fn encode(data: &[u8]) -> String {
            const T: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = String::new();
            for chunk in data.chunks(3) {
                let b = [
                    chunk[0],
                    *chunk.get(1).unwrap_or(&0),
                    *chunk.get(2).unwrap_or(&0),
                ];
                let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
                for i in 0..4 {
                    if i <= chunk.len() {
                        out.push(char::from(T[(n >> (18 - 6 * i)) as usize & 63]));
                    } else {
                        out.push('=');
                    }
                }
            }
            out
        }
    }
}
