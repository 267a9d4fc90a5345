//! Liveness probing and reconnect backoff, as clock-free state machines.

use std::time::{Duration, Instant};

/// Timeouts and intervals of the peer channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelTiming {
    /// Deadline of a handshake: TCP connect (or from accept) + TLS handshake + hello
    /// exchange. A connection that has not finished by then is dropped, so slow or
    /// silent unauthenticated connections free their slot.
    pub handshake_timeout: Duration,
    /// A ping is sent this long after the last one.
    pub ping_interval: Duration,
    /// The peer is declared dead after this many intervals without any frame from it.
    pub missed_pings: u32,
    /// First reconnect delay of a [`PeerLink`](super::PeerLink).
    pub backoff_initial: Duration,
    /// Reconnect delays double up to this cap.
    pub backoff_max: Duration,
}

impl Default for ChannelTiming {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            missed_pings: 3,
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// What the liveness tracker wants done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LivenessAction {
    /// Nothing until [`Liveness::next_deadline`].
    Wait,
    /// Send a ping with this sequence number.
    SendPing(u64),
    /// Nothing was heard for `missed_pings` intervals.
    Dead,
}

/// Tracks when to ping and when the peer is dead. Any received frame counts as a sign of
/// life.
#[derive(Debug)]
pub(crate) struct Liveness {
    interval: Duration,
    dead_after: Duration,
    last_heard: Instant,
    next_ping: Instant,
    seq: u64,
}

impl Liveness {
    pub(crate) fn new(now: Instant, interval: Duration, missed_pings: u32) -> Self {
        Self {
            interval,
            dead_after: interval.saturating_mul(missed_pings.max(1)),
            last_heard: now,
            next_ping: now + interval,
            seq: 0,
        }
    }

    pub(crate) fn on_frame(&mut self, now: Instant) {
        self.last_heard = now;
    }

    pub(crate) fn poll(&mut self, now: Instant) -> LivenessAction {
        if now.saturating_duration_since(self.last_heard) >= self.dead_after {
            return LivenessAction::Dead;
        }
        if now >= self.next_ping {
            self.next_ping = now + self.interval;
            self.seq += 1;
            return LivenessAction::SendPing(self.seq);
        }
        LivenessAction::Wait
    }

    pub(crate) fn next_deadline(&self) -> Instant {
        self.next_ping.min(self.last_heard + self.dead_after)
    }
}

/// Round-trip time of the channel, from the ping in flight and its pong.
#[derive(Debug, Default)]
pub(crate) struct RttProbe {
    outstanding: Option<(u64, Instant)>,
    last: Option<Duration>,
}

impl RttProbe {
    /// Ping `seq` left at `now` (a later ping replaces an unanswered one).
    pub(crate) fn sent(&mut self, seq: u64, now: Instant) {
        self.outstanding = Some((seq, now));
    }

    /// Pong `seq` came at `now`: the round trip, if it answers the ping in flight.
    pub(crate) fn answered(&mut self, seq: u64, now: Instant) -> Option<Duration> {
        match self.outstanding {
            Some((s, at)) if s == seq => {
                self.outstanding = None;
                let rtt = now.saturating_duration_since(at);
                self.last = Some(rtt);
                Some(rtt)
            }
            _ => None,
        }
    }

    /// The last measured round trip.
    pub(crate) fn last(&self) -> Option<Duration> {
        self.last
    }
}

/// Exponential backoff with a cap and jitter: delays grow `initial, 2×, 4×, …, max`, each
/// drawn uniformly from its upper half so that many gateways do not reconnect in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            current: initial,
        }
    }

    /// The next delay; `random` supplies the jitter (any value).
    pub fn next_delay(&mut self, random: u32) -> Duration {
        let ceiling = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        let half = ceiling / 2;
        let fraction = f64::from(random) / f64::from(u32::MAX);
        half + half.mul_f64(fraction)
    }

    /// Back to `initial` (after a session was established).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_counts_only_the_pong_of_the_ping_in_flight() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = RttProbe::default();
        assert_eq!(p.answered(1, t0), None, "no ping sent");
        p.sent(1, t0);
        assert_eq!(p.answered(7, t0 + ms(1)), None, "a pong for another ping");
        assert_eq!(p.answered(1, t0 + ms(3)), Some(ms(3)));
        assert_eq!(p.answered(1, t0 + ms(9)), None, "answered once");
        assert_eq!(p.last(), Some(ms(3)));
        p.sent(2, t0 + ms(10));
        p.sent(3, t0 + ms(20));
        assert_eq!(p.answered(2, t0 + ms(21)), None, "a stale pong");
        assert_eq!(p.answered(3, t0 + ms(25)), Some(ms(5)));
    }

    #[test]
    fn pings_every_interval_and_dies_after_missed() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Liveness::new(t0, s, 3);
        assert_eq!(l.poll(t0), LivenessAction::Wait);
        assert_eq!(l.next_deadline(), t0 + s);
        assert_eq!(l.poll(t0 + s), LivenessAction::SendPing(1));
        assert_eq!(l.poll(t0 + s), LivenessAction::Wait);
        assert_eq!(l.poll(t0 + 2 * s), LivenessAction::SendPing(2));
        // Hearing from the peer postpones death, not pings.
        l.on_frame(t0 + 2 * s);
        assert_eq!(l.poll(t0 + 3 * s), LivenessAction::SendPing(3));
        assert_eq!(l.poll(t0 + 4 * s), LivenessAction::SendPing(4));
        assert_eq!(
            l.poll(t0 + 5 * s - Duration::from_millis(1)),
            LivenessAction::Wait
        );
        assert_eq!(l.poll(t0 + 5 * s), LivenessAction::Dead);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let top: Vec<_> = (0..6).map(|_| b.next_delay(u32::MAX)).collect();
        assert_eq!(
            top,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        b.reset();
        assert_eq!(b.next_delay(0), ms(50));
        let d = b.next_delay(u32::MAX / 2);
        assert!(d >= ms(100) && d <= ms(200), "{d:?}");
    }
}
