//! Egress gateway HA health probing (BFD-like), sans-IO.
//!
//! A source gateway periodically sends small *probe* datagrams through the
//! encrypted tunnel to every egress gateway of an egress policy; each egress
//! gateway answers with a *reply* carrying its own [`GatewayState`]. The
//! source side runs one [`Prober`] per egress policy, which schedules probes,
//! validates replies against outstanding probes and derives a [`Health`] per
//! gateway. [`admission`] maps a health to what the data path may do with it.
//!
//! This module performs no I/O and never reads the clock: the caller passes
//! `now: Instant` into every call and moves the datagrams itself.
//!
//! # Wire format
//!
//! All integers are big-endian; every message is exactly 24 bytes.
//!
//! | offset | size | probe                | reply                   |
//! |--------|------|----------------------|-------------------------|
//! | 0      | 4    | magic `b"ISEP"`      | magic `b"ISEP"`         |
//! | 4      | 1    | version = 1          | version = 1             |
//! | 5      | 1    | type = 1             | type = 2                |
//! | 6      | 1    | reserved = 0         | state (0, 1, 2)         |
//! | 7      | 1    | reserved = 0         | reserved = 0            |
//! | 8      | 8    | `seq`                | `seq` (echoed)          |
//! | 16     | 8    | `sent_micros`        | `sent_micros` (echoed)  |
//!
//! # Failure detection
//!
//! The detection time is `multiplier * interval`. A gateway that has not
//! produced a *valid* reply for at least the detection time (measured from the
//! last valid reply, or from [`Prober::new`] if it never replied) is marked
//! [`Health::Down`] by [`Prober::on_tick`]. A reply is valid only if it echoes
//! the `seq` *and* `sent_micros` of a probe sent to that same gateway no longer
//! than the detection time ago, and newer than the newest probe already
//! answered. Replays, stale or reordered replies, unknown sequence numbers and
//! garbage are ignored and counted in [`GatewayProbeStats::ignored`].
//!
//! There is deliberately no hold-down: a single valid reply after
//! [`Health::Down`] brings the gateway back [`Health::Up`] immediately.
//! Callers that want flap damping should apply it on top of the
//! [`Transition`]s reported here.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Size in bytes of every probe protocol datagram.
pub const MESSAGE_LEN: usize = 24;
/// Magic bytes at the start of every datagram.
pub const MAGIC: [u8; 4] = *b"ISEP";
/// Protocol version understood and emitted by this module.
pub const VERSION: u8 = 1;

const TYPE_PROBE: u8 = 1;
const TYPE_REPLY: u8 = 2;

/// Smallest probe interval accepted by [`Prober::new`]; smaller values are raised to it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);
/// Largest probe interval accepted by [`Prober::new`]; larger values are lowered to it.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// Largest detection multiplier accepted by [`Prober::new`] (a zero multiplier is raised to 1).
pub const MAX_MULTIPLIER: u32 = 255;

/// Operational state an egress gateway reports about itself in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GatewayState {
    /// Fully operational: may take new and existing flows.
    Healthy,
    /// Shutting down gracefully: keeps existing pinned flows, takes no new ones.
    Draining,
    /// The gateway's own uplink is down: takes no flows at all.
    UplinkDown,
}

impl GatewayState {
    /// Wire encoding of the state.
    pub fn to_wire(self) -> u8 {
        match self {
            GatewayState::Healthy => 0,
            GatewayState::Draining => 1,
            GatewayState::UplinkDown => 2,
        }
    }

    /// Decodes a wire state byte; `None` for unknown values.
    pub fn from_wire(b: u8) -> Option<Self> {
        match b {
            0 => Some(GatewayState::Healthy),
            1 => Some(GatewayState::Draining),
            2 => Some(GatewayState::UplinkDown),
            _ => None,
        }
    }
}

/// A decoded probe protocol datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    /// Source gateway → egress gateway liveness probe.
    Probe {
        /// Per-gateway sequence number chosen by the sender.
        seq: u64,
        /// Sender's clock in microseconds, echoed back unchanged.
        sent_micros: u64,
    },
    /// Egress gateway → source gateway answer to a probe.
    Reply {
        /// The responder's current state.
        state: GatewayState,
        /// Sequence number echoed from the probe.
        seq: u64,
        /// `sent_micros` echoed from the probe.
        sent_micros: u64,
    },
}

/// Why a datagram failed to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeError {
    /// The datagram is not exactly [`MESSAGE_LEN`] bytes long.
    BadLength(usize),
    /// The magic bytes are not `b"ISEP"`.
    BadMagic,
    /// Unsupported protocol version.
    BadVersion(u8),
    /// Unknown message type.
    BadType(u8),
    /// A reserved byte is not zero.
    BadReserved,
    /// A reply carries an unknown gateway state.
    BadState(u8),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::BadLength(n) => {
                write!(f, "bad probe datagram length {n} (expected {MESSAGE_LEN})")
            }
            ProbeError::BadMagic => f.write_str("bad probe datagram magic"),
            ProbeError::BadVersion(v) => write!(f, "unsupported probe protocol version {v}"),
            ProbeError::BadType(t) => write!(f, "unknown probe message type {t}"),
            ProbeError::BadReserved => f.write_str("non-zero reserved byte in probe datagram"),
            ProbeError::BadState(s) => write!(f, "unknown gateway state {s} in probe reply"),
        }
    }
}

impl std::error::Error for ProbeError {}

/// Panic-free sequential reader over a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProbeError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            // Unreachable after the length check, but never panic on input.
            None => Err(ProbeError::BadLength(self.rest.len())),
        }
    }

    fn u8(&mut self) -> Result<u8, ProbeError> {
        let [b] = self.take::<1>()?;
        Ok(b)
    }

    fn u64(&mut self) -> Result<u64, ProbeError> {
        Ok(u64::from_be_bytes(self.take::<8>()?))
    }
}

/// Decodes one datagram, rejecting anything that is not a well-formed
/// version-1 probe or reply.
pub fn decode(bytes: &[u8]) -> Result<Message, ProbeError> {
    if bytes.len() != MESSAGE_LEN {
        return Err(ProbeError::BadLength(bytes.len()));
    }
    let mut r = Reader { rest: bytes };
    if r.take::<4>()? != MAGIC {
        return Err(ProbeError::BadMagic);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(ProbeError::BadVersion(version));
    }
    let kind = r.u8()?;
    let b6 = r.u8()?;
    let b7 = r.u8()?;
    let seq = r.u64()?;
    let sent_micros = r.u64()?;
    match kind {
        TYPE_PROBE => {
            if b6 != 0 || b7 != 0 {
                return Err(ProbeError::BadReserved);
            }
            Ok(Message::Probe { seq, sent_micros })
        }
        TYPE_REPLY => {
            if b7 != 0 {
                return Err(ProbeError::BadReserved);
            }
            let state = GatewayState::from_wire(b6).ok_or(ProbeError::BadState(b6))?;
            Ok(Message::Reply {
                state,
                seq,
                sent_micros,
            })
        }
        other => Err(ProbeError::BadType(other)),
    }
}

impl Message {
    /// Encodes the message into its 24-byte wire form.
    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let (kind, b6, seq, sent_micros) = match *self {
            Message::Probe { seq, sent_micros } => (TYPE_PROBE, 0, seq, sent_micros),
            Message::Reply {
                state,
                seq,
                sent_micros,
            } => (TYPE_REPLY, state.to_wire(), seq, sent_micros),
        };
        let mut out = [0u8; MESSAGE_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = kind;
        out[6] = b6;
        out[7] = 0;
        out[8..16].copy_from_slice(&seq.to_be_bytes());
        out[16..24].copy_from_slice(&sent_micros.to_be_bytes());
        out
    }
}

/// Responder side: turns a valid probe into the reply bytes carrying `state`.
///
/// Anything that is not a valid probe (replies, malformed datagrams) yields
/// `None` and should be dropped silently.
pub fn answer(probe: &[u8], state: GatewayState) -> Option<[u8; MESSAGE_LEN]> {
    match decode(probe) {
        Ok(Message::Probe { seq, sent_micros }) => Some(
            Message::Reply {
                state,
                seq,
                sent_micros,
            }
            .encode(),
        ),
        _ => None,
    }
}

/// Health of one egress gateway as seen by a [`Prober`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// No valid reply yet, and the detection time has not elapsed.
    Unknown,
    /// Valid replies are arriving; carries the last reported state.
    Up(GatewayState),
    /// No valid reply for at least the detection time.
    Down,
}

/// Data-path admission for a gateway of the given health.
///
/// Returns `(new, existing)`: whether the gateway may take NEW flows
/// (only `Up(Healthy)`) and whether it may keep EXISTING pinned flows
/// (`Up(Healthy)` or `Up(Draining)`). `Up(UplinkDown)`, `Down` and `Unknown`
/// take nothing.
pub fn admission(h: Health) -> (bool, bool) {
    match h {
        Health::Up(GatewayState::Healthy) => (true, true),
        Health::Up(GatewayState::Draining) => (false, true),
        Health::Up(GatewayState::UplinkDown) | Health::Down | Health::Unknown => (false, false),
    }
}

/// Timing configuration of a [`Prober`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProberConfig {
    /// Probe period per gateway (100..=300 ms typical). Clamped to
    /// [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
    pub interval: Duration,
    /// Detection multiplier (e.g. 3): a gateway is Down after
    /// `multiplier * interval` without a valid reply. Clamped to
    /// `1..=`[`MAX_MULTIPLIER`].
    pub multiplier: u32,
}

/// A health change of one gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transition {
    /// Gateway index within the [`Prober`].
    pub index: usize,
    /// Previous health.
    pub from: Health,
    /// New health.
    pub to: Health,
}

/// Per-gateway counters of a [`Prober`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GatewayProbeStats {
    /// Probes emitted by [`Prober::poll_probes`].
    pub sent: u64,
    /// Valid replies accepted.
    pub replies: u64,
    /// Datagrams ignored: garbage, non-replies, replays, stale/unknown seqs.
    pub ignored: u64,
    /// Round-trip time of the last accepted reply (measured with the `now`
    /// instants passed in).
    pub last_rtt: Option<Duration>,
    /// Number of health transitions so far.
    pub transitions: u64,
    /// When the last transition happened (creation time if none yet).
    pub since: Instant,
}

/// A probe sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    seq: u64,
    sent_micros: u64,
    sent_at: Instant,
}

#[derive(Debug)]
struct GatewayEntry {
    health: Health,
    next_seq: u64,
    next_probe: Instant,
    /// Last valid reply, or creation time if none yet: the detection reference.
    alive_ref: Instant,
    /// Sent, unanswered probes, oldest first.
    outstanding: VecDeque<Outstanding>,
    stats: GatewayProbeStats,
}

/// Source-side prober for the egress gateways of one egress policy.
///
/// Tracks gateways `0..n`. Drive it with [`Prober::poll_probes`] and
/// [`Prober::on_tick`] at [`Prober::next_deadline`], and feed received
/// datagrams into [`Prober::on_datagram`].
#[derive(Debug)]
pub struct Prober {
    interval: Duration,
    multiplier: u32,
    detection: Duration,
    max_outstanding: usize,
    gateways: Vec<GatewayEntry>,
    created: Instant,
    last_now: Instant,
}

impl Prober {
    /// Creates a prober for `gateways` gateways; all start [`Health::Unknown`]
    /// and are due for their first probe at `now`.
    pub fn new(cfg: ProberConfig, gateways: usize, now: Instant) -> Self {
        let interval = cfg.interval.clamp(MIN_INTERVAL, MAX_INTERVAL);
        let multiplier = cfg.multiplier.clamp(1, MAX_MULTIPLIER);
        // Bounded by MAX_INTERVAL * MAX_MULTIPLIER, cannot overflow.
        let detection = interval.saturating_mul(multiplier);
        // At most multiplier + 1 probes fit into one detection window when
        // probes are sent once per interval; keep a little slack.
        let max_outstanding = usize::try_from(multiplier)
            .unwrap_or(usize::MAX)
            .saturating_add(2);
        let gateways = (0..gateways)
            .map(|_| GatewayEntry {
                health: Health::Unknown,
                next_seq: 1,
                next_probe: now,
                alive_ref: now,
                outstanding: VecDeque::with_capacity(max_outstanding),
                stats: GatewayProbeStats {
                    sent: 0,
                    replies: 0,
                    ignored: 0,
                    last_rtt: None,
                    transitions: 0,
                    since: now,
                },
            })
            .collect();
        Prober {
            interval,
            multiplier,
            detection,
            max_outstanding,
            gateways,
            created: now,
            last_now: now,
        }
    }

    /// Number of gateways tracked.
    pub fn gateways(&self) -> usize {
        self.gateways.len()
    }

    /// Effective (clamped) probe interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Effective (clamped) detection multiplier.
    pub fn multiplier(&self) -> u32 {
        self.multiplier
    }

    /// Detection time: `multiplier * interval`.
    pub fn detection_time(&self) -> Duration {
        self.detection
    }

    fn observe(&mut self, now: Instant) {
        if now > self.last_now {
            self.last_now = now;
        }
    }

    /// Probes due at `now`: `(gateway index, datagram)` pairs.
    ///
    /// Each gateway is probed every `interval` (at most once per call); the
    /// sequence number increments per gateway starting at 1, and
    /// `micros_since_start` is carried as `sent_micros`. If the caller falls
    /// behind by more than an interval the schedule restarts from `now`
    /// instead of bursting.
    pub fn poll_probes(&mut self, now: Instant, micros_since_start: u64) -> Vec<(usize, [u8; 24])> {
        self.observe(now);
        let interval = self.interval;
        let detection = self.detection;
        let max_outstanding = self.max_outstanding;
        let mut out = Vec::new();
        for (index, gw) in self.gateways.iter_mut().enumerate() {
            if now < gw.next_probe {
                continue;
            }
            let seq = gw.next_seq;
            gw.next_seq = gw.next_seq.wrapping_add(1);
            prune(&mut gw.outstanding, now, detection);
            while gw.outstanding.len() >= max_outstanding {
                gw.outstanding.pop_front();
            }
            gw.outstanding.push_back(Outstanding {
                seq,
                sent_micros: micros_since_start,
                sent_at: now,
            });
            gw.stats.sent = gw.stats.sent.saturating_add(1);
            gw.next_probe = match gw.next_probe.checked_add(interval) {
                Some(next) if next > now => next,
                _ => now.checked_add(interval).unwrap_or(now),
            };
            out.push((
                index,
                Message::Probe {
                    seq,
                    sent_micros: micros_since_start,
                }
                .encode(),
            ));
        }
        out
    }

    /// Feeds a datagram received from gateway `index`.
    ///
    /// Only a reply echoing the `seq` and `sent_micros` of an outstanding probe
    /// of that gateway (sent no longer than the detection time ago) counts; it
    /// refreshes liveness, records the RTT and retires that probe together with
    /// all older ones, so replays and reordered older replies are ignored.
    /// Everything else is ignored and counted. Returns the resulting health
    /// change, if any. An out-of-range `index` is ignored without counting.
    pub fn on_datagram(&mut self, index: usize, bytes: &[u8], now: Instant) -> Option<Transition> {
        self.observe(now);
        let detection = self.detection;
        let gw = self.gateways.get_mut(index)?;
        let (state, seq, sent_micros) = match decode(bytes) {
            Ok(Message::Reply {
                state,
                seq,
                sent_micros,
            }) => (state, seq, sent_micros),
            Ok(Message::Probe { .. }) | Err(_) => {
                gw.stats.ignored = gw.stats.ignored.saturating_add(1);
                return None;
            }
        };
        prune(&mut gw.outstanding, now, detection);
        let Some(pos) = gw
            .outstanding
            .iter()
            .position(|o| o.seq == seq && o.sent_micros == sent_micros)
        else {
            gw.stats.ignored = gw.stats.ignored.saturating_add(1);
            return None;
        };
        let sent_at = gw.outstanding.get(pos).map(|o| o.sent_at).unwrap_or(now);
        // Retire the answered probe and every older one.
        gw.outstanding.drain(..=pos);
        gw.stats.replies = gw.stats.replies.saturating_add(1);
        gw.stats.last_rtt = Some(now.saturating_duration_since(sent_at));
        if now > gw.alive_ref {
            gw.alive_ref = now;
        }
        set_health(gw, index, Health::Up(state), now)
    }

    /// Marks gateways Down whose last valid reply (or creation, if they never
    /// replied) is at least `multiplier * interval` old. Returns the
    /// transitions.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Transition> {
        self.observe(now);
        let detection = self.detection;
        let mut out = Vec::new();
        for (index, gw) in self.gateways.iter_mut().enumerate() {
            prune(&mut gw.outstanding, now, detection);
            if gw.health == Health::Down {
                continue;
            }
            if now.saturating_duration_since(gw.alive_ref) >= detection {
                out.extend(set_health(gw, index, Health::Down, now));
            }
        }
        out
    }

    /// Current health of gateway `index` ([`Health::Unknown`] if out of range).
    pub fn health(&self, index: usize) -> Health {
        self.gateways
            .get(index)
            .map_or(Health::Unknown, |gw| gw.health)
    }

    /// Next instant the caller should call [`Prober::poll_probes`] /
    /// [`Prober::on_tick`]: the earliest probe due time or detection deadline.
    /// With no gateways, one interval after the latest `now` seen.
    pub fn next_deadline(&self) -> Instant {
        let detection = self.detection;
        self.gateways
            .iter()
            .flat_map(|gw| {
                let expiry = if gw.health == Health::Down {
                    None
                } else {
                    gw.alive_ref.checked_add(detection)
                };
                std::iter::once(gw.next_probe).chain(expiry)
            })
            .min()
            .unwrap_or_else(|| {
                self.last_now
                    .checked_add(self.interval)
                    .unwrap_or(self.last_now)
            })
    }

    /// Counters of gateway `index` (all zero, `since` = creation, if out of range).
    pub fn stats(&self, index: usize) -> GatewayProbeStats {
        self.gateways.get(index).map_or(
            GatewayProbeStats {
                sent: 0,
                replies: 0,
                ignored: 0,
                last_rtt: None,
                transitions: 0,
                since: self.created,
            },
            |gw| gw.stats,
        )
    }
}

/// Drops outstanding probes sent more than `detection` before `now`.
fn prune(outstanding: &mut VecDeque<Outstanding>, now: Instant, detection: Duration) {
    outstanding.retain(|o| now.saturating_duration_since(o.sent_at) <= detection);
}

fn set_health(gw: &mut GatewayEntry, index: usize, to: Health, now: Instant) -> Option<Transition> {
    let from = gw.health;
    if from == to {
        return None;
    }
    gw.health = to;
    gw.stats.transitions = gw.stats.transitions.saturating_add(1);
    gw.stats.since = now;
    Some(Transition { index, from, to })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    fn cfg() -> ProberConfig {
        ProberConfig {
            interval: ms(100),
            multiplier: 3,
        }
    }

    /// Decodes a probe we emitted and answers it as the egress gateway would.
    fn reply_to(probe: &[u8; 24], state: GatewayState) -> [u8; 24] {
        answer(probe, state).expect("valid probe")
    }

    fn probe_for(batch: &[(usize, [u8; 24])], index: usize) -> [u8; 24] {
        batch
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, b)| *b)
            .expect("probe for gateway")
    }

    fn seq_of(bytes: &[u8]) -> u64 {
        match decode(bytes).unwrap() {
            Message::Probe { seq, .. } | Message::Reply { seq, .. } => seq,
        }
    }

    #[test]
    fn round_trip() {
        let msgs = [
            Message::Probe {
                seq: 0,
                sent_micros: 0,
            },
            Message::Probe {
                seq: u64::MAX,
                sent_micros: 0x0102_0304_0506_0708,
            },
            Message::Reply {
                state: GatewayState::Healthy,
                seq: 7,
                sent_micros: 99,
            },
            Message::Reply {
                state: GatewayState::Draining,
                seq: 8,
                sent_micros: 100,
            },
            Message::Reply {
                state: GatewayState::UplinkDown,
                seq: u64::MAX,
                sent_micros: u64::MAX,
            },
        ];
        for m in msgs {
            let b = m.encode();
            assert_eq!(b.len(), 24);
            assert_eq!(&b[0..4], b"ISEP");
            assert_eq!(b[4], 1);
            assert_eq!(decode(&b), Ok(m));
        }
        let b = Message::Probe {
            seq: 0x0102_0304_0506_0708,
            sent_micros: 0x1112_1314_1516_1718,
        }
        .encode();
        assert_eq!(
            b,
            [
                b'I', b'S', b'E', b'P', 1, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x11, 0x12, 0x13, 0x14,
                0x15, 0x16, 0x17, 0x18
            ]
        );
        let r = Message::Reply {
            state: GatewayState::Draining,
            seq: 1,
            sent_micros: 2,
        }
        .encode();
        assert_eq!(&r[4..8], &[1, 2, 1, 0]);
    }

    #[test]
    fn malformed_rejected() {
        let good_probe = Message::Probe {
            seq: 5,
            sent_micros: 6,
        }
        .encode();
        let good_reply = Message::Reply {
            state: GatewayState::Healthy,
            seq: 5,
            sent_micros: 6,
        }
        .encode();

        assert_eq!(decode(&[]), Err(ProbeError::BadLength(0)));
        assert_eq!(decode(&good_probe[..23]), Err(ProbeError::BadLength(23)));
        let mut long = good_probe.to_vec();
        long.push(0);
        assert_eq!(decode(&long), Err(ProbeError::BadLength(25)));

        let mut b = good_probe;
        b[0] = b'X';
        assert_eq!(decode(&b), Err(ProbeError::BadMagic));
        let mut b = good_reply;
        b[3] = b'Q';
        assert_eq!(decode(&b), Err(ProbeError::BadMagic));

        let mut b = good_probe;
        b[4] = 2;
        assert_eq!(decode(&b), Err(ProbeError::BadVersion(2)));
        b[4] = 0;
        assert_eq!(decode(&b), Err(ProbeError::BadVersion(0)));

        for t in [0u8, 3, 255] {
            let mut b = good_probe;
            b[5] = t;
            assert_eq!(decode(&b), Err(ProbeError::BadType(t)));
        }

        let mut b = good_probe;
        b[6] = 1;
        assert_eq!(decode(&b), Err(ProbeError::BadReserved));
        let mut b = good_probe;
        b[7] = 1;
        assert_eq!(decode(&b), Err(ProbeError::BadReserved));
        let mut b = good_reply;
        b[7] = 0x80;
        assert_eq!(decode(&b), Err(ProbeError::BadReserved));

        for s in [3u8, 4, 255] {
            let mut b = good_reply;
            b[6] = s;
            assert_eq!(decode(&b), Err(ProbeError::BadState(s)));
        }
        // Errors render.
        assert!(!ProbeError::BadState(3).to_string().is_empty());
    }

    #[test]
    fn answer_only_probes() {
        let p = Message::Probe {
            seq: 42,
            sent_micros: 1234,
        }
        .encode();
        let r = answer(&p, GatewayState::Draining).unwrap();
        assert_eq!(
            decode(&r),
            Ok(Message::Reply {
                state: GatewayState::Draining,
                seq: 42,
                sent_micros: 1234
            })
        );
        // Replies are not answered (no reflection loops).
        assert_eq!(answer(&r, GatewayState::Healthy), None);
        assert_eq!(answer(&[], GatewayState::Healthy), None);
        assert_eq!(answer(&[0u8; 24], GatewayState::Healthy), None);
        assert_eq!(
            answer(b"ISEP garbage garbage....", GatewayState::Healthy),
            None
        );
        let mut bad = p;
        bad[7] = 1;
        assert_eq!(answer(&bad, GatewayState::Healthy), None);
    }

    #[test]
    fn admission_table() {
        assert_eq!(admission(Health::Up(GatewayState::Healthy)), (true, true));
        assert_eq!(admission(Health::Up(GatewayState::Draining)), (false, true));
        assert_eq!(
            admission(Health::Up(GatewayState::UplinkDown)),
            (false, false)
        );
        assert_eq!(admission(Health::Down), (false, false));
        assert_eq!(admission(Health::Unknown), (false, false));
    }

    #[test]
    fn probes_scheduled_every_interval() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 2, t0);
        assert_eq!(p.next_deadline(), t0);

        let b = p.poll_probes(t0, 0);
        assert_eq!(b.len(), 2);
        assert_eq!(seq_of(&probe_for(&b, 0)), 1);
        assert_eq!(seq_of(&probe_for(&b, 1)), 1);
        assert_eq!(p.next_deadline(), t0 + ms(100));

        assert!(p.poll_probes(t0 + ms(50), 50_000).is_empty());
        assert!(p.poll_probes(t0 + ms(99), 99_000).is_empty());

        let b = p.poll_probes(t0 + ms(100), 100_000);
        assert_eq!(b.len(), 2);
        assert_eq!(seq_of(&probe_for(&b, 0)), 2);
        assert_eq!(
            decode(&probe_for(&b, 1)),
            Ok(Message::Probe {
                seq: 2,
                sent_micros: 100_000
            })
        );

        // Slightly late poll keeps the cadence (next due at 300, not 310).
        let b = p.poll_probes(t0 + ms(210), 210_000);
        assert_eq!(b.len(), 2);
        assert!(p.poll_probes(t0 + ms(299), 0).is_empty());
        assert_eq!(p.poll_probes(t0 + ms(300), 0).len(), 2);

        // A long stall does not cause a burst: one probe, schedule restarts.
        let b = p.poll_probes(t0 + ms(1000), 0);
        assert_eq!(b.len(), 2);
        assert_eq!(seq_of(&probe_for(&b, 0)), 5);
        assert!(p.poll_probes(t0 + ms(1099), 0).is_empty());
        assert_eq!(p.poll_probes(t0 + ms(1100), 0).len(), 2);
        assert_eq!(p.stats(0).sent, 6);
        assert_eq!(p.stats(1).sent, 6);
    }

    #[test]
    fn up_after_reply_and_rtt() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 1, t0);
        assert_eq!(p.health(0), Health::Unknown);
        let b = p.poll_probes(t0, 0);
        let r = reply_to(&probe_for(&b, 0), GatewayState::Healthy);
        let tr = p.on_datagram(0, &r, t0 + ms(7));
        assert_eq!(
            tr,
            Some(Transition {
                index: 0,
                from: Health::Unknown,
                to: Health::Up(GatewayState::Healthy)
            })
        );
        assert_eq!(p.health(0), Health::Up(GatewayState::Healthy));
        let s = p.stats(0);
        assert_eq!(s.sent, 1);
        assert_eq!(s.replies, 1);
        assert_eq!(s.ignored, 0);
        assert_eq!(s.last_rtt, Some(ms(7)));
        assert_eq!(s.transitions, 1);
        assert_eq!(s.since, t0 + ms(7));

        // Same state again: no transition, rtt updated.
        let b = p.poll_probes(t0 + ms(100), 100_000);
        let r = reply_to(&probe_for(&b, 0), GatewayState::Healthy);
        assert_eq!(p.on_datagram(0, &r, t0 + ms(123)), None);
        assert_eq!(p.stats(0).last_rtt, Some(ms(23)));
        assert_eq!(p.stats(0).transitions, 1);
    }

    #[test]
    fn unknown_goes_down_exactly_at_detection() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 1, t0);
        assert_eq!(p.detection_time(), ms(300));
        p.poll_probes(t0, 0);
        p.poll_probes(t0 + ms(100), 0);
        p.poll_probes(t0 + ms(200), 0);
        assert!(p.on_tick(t0 + ms(299)).is_empty());
        assert_eq!(p.health(0), Health::Unknown);
        assert!(p.next_deadline() <= t0 + ms(300));
        let tr = p.on_tick(t0 + ms(301));
        assert_eq!(
            tr,
            vec![Transition {
                index: 0,
                from: Health::Unknown,
                to: Health::Down
            }]
        );
        assert_eq!(p.health(0), Health::Down);
        // No repeated transition.
        assert!(p.on_tick(t0 + ms(900)).is_empty());
        assert_eq!(p.stats(0).transitions, 1);
    }

    #[test]
    fn up_goes_down_after_detection_not_before() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 1, t0);
        let b = p.poll_probes(t0, 0);
        let r = reply_to(&probe_for(&b, 0), GatewayState::Healthy);
        p.on_datagram(0, &r, t0 + ms(10)).unwrap();
        // Keep probing, no replies.
        for t in [100, 200, 300] {
            p.poll_probes(t0 + ms(t), t * 1000);
            assert!(p.on_tick(t0 + ms(t)).is_empty());
        }
        assert_eq!(p.next_deadline(), t0 + ms(310));
        assert!(p.on_tick(t0 + ms(309)).is_empty());
        assert_eq!(p.health(0), Health::Up(GatewayState::Healthy));
        let tr = p.on_tick(t0 + ms(311));
        assert_eq!(
            tr,
            vec![Transition {
                index: 0,
                from: Health::Up(GatewayState::Healthy),
                to: Health::Down
            }]
        );
        assert_eq!(p.stats(0).since, t0 + ms(311));

        // Exactly at detection counts as expired.
        let mut q = Prober::new(cfg(), 1, t0);
        assert_eq!(q.on_tick(t0 + ms(300)).len(), 1);
    }

    #[test]
    fn unknown_or_old_seq_ignored_and_does_not_keep_up() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 1, t0);
        let b1 = p.poll_probes(t0, 0);
        let r1 = reply_to(&probe_for(&b1, 0), GatewayState::Healthy);
        assert!(p.on_datagram(0, &r1, t0 + ms(5)).is_some());

        let b2 = p.poll_probes(t0 + ms(100), 100_000);
        let p2 = probe_for(&b2, 0);
        p.poll_probes(t0 + ms(200), 200_000);

        // Unknown seq.
        let bogus = Message::Reply {
            state: GatewayState::Healthy,
            seq: 99,
            sent_micros: 0,
        }
        .encode();
        assert_eq!(p.on_datagram(0, &bogus, t0 + ms(250)), None);
        // Right seq, wrong echoed timestamp.
        let forged = Message::Reply {
            state: GatewayState::Healthy,
            seq: 2,
            sent_micros: 1,
        }
        .encode();
        assert_eq!(p.on_datagram(0, &forged, t0 + ms(260)), None);
        // Old reply replayed.
        assert_eq!(p.on_datagram(0, &r1, t0 + ms(270)), None);
        // Probe (not a reply) from the gateway.
        assert_eq!(p.on_datagram(0, &p2, t0 + ms(280)), None);
        assert_eq!(p.stats(0).ignored, 4);

        p.poll_probes(t0 + ms(300), 300_000);
        // Reply to seq 2 (sent at 100) arriving after the window (> 300 ms).
        let r2 = reply_to(&p2, GatewayState::Healthy);
        assert_eq!(p.on_datagram(0, &r2, t0 + ms(401)), None);
        assert_eq!(p.stats(0).ignored, 5);
        assert_eq!(p.stats(0).replies, 1);

        // Detection measured from the only valid reply at 5 ms.
        let tr = p.on_tick(t0 + ms(401));
        assert_eq!(tr.len(), 1);
        assert_eq!(tr[0].to, Health::Down);
    }

    #[test]
    fn replayed_reply_counted_once_and_reordered_older_ignored() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 1, t0);
        let b1 = p.poll_probes(t0, 0);
        let b2 = p.poll_probes(t0 + ms(100), 100_000);
        let r1 = reply_to(&probe_for(&b1, 0), GatewayState::Draining);
        let r2 = reply_to(&probe_for(&b2, 0), GatewayState::Healthy);

        assert!(p.on_datagram(0, &r2, t0 + ms(110)).is_some());
        assert_eq!(p.on_datagram(0, &r2, t0 + ms(111)), None);
        // Older reply arriving late must not flap the state back.
        assert_eq!(p.on_datagram(0, &r1, t0 + ms(112)), None);
        assert_eq!(p.health(0), Health::Up(GatewayState::Healthy));
        let s = p.stats(0);
        assert_eq!(s.replies, 1);
        assert_eq!(s.ignored, 2);
        assert_eq!(s.transitions, 1);
    }

    #[test]
    fn draining_transition_and_back() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 1, t0);
        let b = p.poll_probes(t0, 0);
        p.on_datagram(0, &reply_to(&probe_for(&b, 0), GatewayState::Healthy), t0)
            .unwrap();
        let b = p.poll_probes(t0 + ms(100), 1);
        let tr = p
            .on_datagram(
                0,
                &reply_to(&probe_for(&b, 0), GatewayState::Draining),
                t0 + ms(101),
            )
            .unwrap();
        assert_eq!(tr.from, Health::Up(GatewayState::Healthy));
        assert_eq!(tr.to, Health::Up(GatewayState::Draining));
        assert_eq!(admission(p.health(0)), (false, true));

        let b = p.poll_probes(t0 + ms(200), 2);
        let tr = p
            .on_datagram(
                0,
                &reply_to(&probe_for(&b, 0), GatewayState::UplinkDown),
                t0 + ms(201),
            )
            .unwrap();
        assert_eq!(tr.to, Health::Up(GatewayState::UplinkDown));
        assert_eq!(admission(p.health(0)), (false, false));
        assert_eq!(p.stats(0).transitions, 3);
    }

    #[test]
    fn recovery_after_down() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 1, t0);
        p.poll_probes(t0, 0);
        assert_eq!(p.on_tick(t0 + ms(300)).len(), 1);
        assert_eq!(p.health(0), Health::Down);
        // While down, only probe deadlines matter.
        assert_eq!(p.next_deadline(), t0 + ms(100));

        let b = p.poll_probes(t0 + ms(400), 400_000);
        let tr = p
            .on_datagram(
                0,
                &reply_to(&probe_for(&b, 0), GatewayState::Healthy),
                t0 + ms(402),
            )
            .unwrap();
        assert_eq!(tr.from, Health::Down);
        assert_eq!(tr.to, Health::Up(GatewayState::Healthy));
        assert_eq!(p.stats(0).last_rtt, Some(ms(2)));
        // Detection restarts from the new reply.
        assert!(p.on_tick(t0 + ms(701)).is_empty());
        assert_eq!(p.on_tick(t0 + ms(702)).len(), 1);
    }

    #[test]
    fn gateways_independent() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 2, t0);
        let b = p.poll_probes(t0, 0);
        let p0 = probe_for(&b, 0);
        let p1 = probe_for(&b, 1);
        p.on_datagram(0, &reply_to(&p0, GatewayState::Healthy), t0 + ms(1))
            .unwrap();
        assert_eq!(p.health(0), Health::Up(GatewayState::Healthy));
        assert_eq!(p.health(1), Health::Unknown);

        let b = p.poll_probes(t0 + ms(100), 100_000);
        let r1b = reply_to(&probe_for(&b, 1), GatewayState::Draining);
        assert!(p.on_datagram(1, &r1b, t0 + ms(105)).is_some());
        assert_eq!(p.health(1), Health::Up(GatewayState::Draining));
        assert_eq!(p.health(0), Health::Up(GatewayState::Healthy));
        // Gateway 1's older seq 1 is retired for gateway 1 only.
        assert_eq!(
            p.on_datagram(1, &reply_to(&p1, GatewayState::Healthy), t0 + ms(106)),
            None
        );
        assert_eq!(p.stats(1).ignored, 1);
        assert_eq!(p.stats(0).ignored, 0);
        assert_eq!(p.stats(0).replies, 1);
        assert_eq!(p.stats(1).replies, 1);

        // Gateway 0 goes down at 301 (last reply at 1 ms); gateway 1 at 405.
        let tr = p.on_tick(t0 + ms(301));
        assert_eq!(
            tr,
            vec![Transition {
                index: 0,
                from: Health::Up(GatewayState::Healthy),
                to: Health::Down
            }]
        );
        assert_eq!(p.health(1), Health::Up(GatewayState::Draining));
        assert!(p.on_tick(t0 + ms(404)).is_empty());
        let tr = p.on_tick(t0 + ms(405));
        assert_eq!(tr.len(), 1);
        assert_eq!(tr[0].index, 1);

        // Out-of-range indices are harmless.
        assert_eq!(p.on_datagram(7, &r1b, t0 + ms(500)), None);
        assert_eq!(p.health(7), Health::Unknown);
        assert_eq!(p.stats(7).sent, 0);
    }

    #[test]
    fn empty_prober_and_config_clamping() {
        let t0 = Instant::now();
        let mut p = Prober::new(
            ProberConfig {
                interval: Duration::ZERO,
                multiplier: 0,
            },
            0,
            t0,
        );
        assert_eq!(p.interval(), MIN_INTERVAL);
        assert_eq!(p.multiplier(), 1);
        assert!(p.poll_probes(t0, 0).is_empty());
        assert!(p.on_tick(t0 + ms(5)).is_empty());
        assert_eq!(p.next_deadline(), t0 + ms(5) + MIN_INTERVAL);
        assert_eq!(p.gateways(), 0);

        let q = Prober::new(
            ProberConfig {
                interval: Duration::from_secs(3600),
                multiplier: u32::MAX,
            },
            1,
            t0,
        );
        assert_eq!(q.interval(), MAX_INTERVAL);
        assert_eq!(q.multiplier(), MAX_MULTIPLIER);
        assert_eq!(q.detection_time(), MAX_INTERVAL * MAX_MULTIPLIER);
    }

    #[test]
    fn outstanding_window_bounded() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 1, t0);
        // Many probes without replies must not grow state unboundedly.
        for i in 0..1000u64 {
            p.poll_probes(t0 + ms(i * 100), i);
        }
        assert!(p.gateways[0].outstanding.len() <= p.max_outstanding);
        // Never replied: went Down once, stays Down.
        assert_eq!(p.health(0), Health::Unknown);
        assert_eq!(p.on_tick(t0 + ms(100_000)).len(), 1);
        // A clock running backwards is tolerated (no panic, no spurious change).
        assert!(p.on_tick(t0).is_empty());
        assert!(p.poll_probes(t0, 0).is_empty());
        assert!(p.next_deadline() >= t0);
        assert_eq!(p.health(0), Health::Down);
    }

    /// Small deterministic xorshift PRNG for fuzz-style tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let t0 = Instant::now();
        let mut p = Prober::new(cfg(), 3, t0);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut accepted = 0u32;
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(i * 50);
            let sent = p.poll_probes(now, i * 50);
            let len = (rng.next() % 40) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Make a good fraction structurally plausible to reach deep paths.
            match rng.next() % 4 {
                0 if buf.len() >= 8 => {
                    buf.truncate(24);
                    buf.resize(24, 0);
                    buf[0..4].copy_from_slice(&MAGIC);
                    buf[4] = VERSION;
                    buf[5] = (rng.next() % 4) as u8;
                    buf[6] = (rng.next() % 5) as u8;
                    buf[7] = (rng.next() % 2) as u8;
                    buf[8..16].copy_from_slice(&(rng.next() % 8).to_be_bytes());
                }
                1 => {
                    if let Some((_, probe)) = sent.first() {
                        let mut r = reply_to(probe, GatewayState::Healthy);
                        let k = (rng.next() % 24) as usize;
                        r[k] ^= (rng.next() % 2) as u8;
                        buf = r.to_vec();
                    }
                }
                _ => {}
            }
            let _ = decode(&buf);
            let _ = answer(&buf, GatewayState::Healthy);
            let idx = (rng.next() % 5) as usize;
            if p.on_datagram(idx, &buf, now).is_some() {
                accepted += 1;
            }
            let _ = p.on_tick(now);
            let _ = p.next_deadline();
        }
        // Some real replies got through, the rest were counted as ignored.
        assert!(accepted > 0);
        let total: u64 = (0..3).map(|i| p.stats(i).ignored).sum();
        assert!(total > 1000);
    }
}
