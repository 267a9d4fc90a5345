//! Admission of unauthenticated connections to a listener (sans-IO): at most
//! [`ListenerLimits::max_handshakes`] handshakes at once, and at most
//! [`ListenerLimits::max_handshakes_per_source`] from one source address, so one slow or
//! hostile host cannot take every slot and keep a lost channel down. Every admitted
//! handshake is also bounded in time ([`ChannelTiming::handshake_timeout`](super::ChannelTiming)).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Limits on handshakes a listener runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Handshakes in flight over all sources; further connections are closed at once.
    pub max_handshakes: usize,
    /// Handshakes in flight from one source IP address.
    pub max_handshakes_per_source: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_handshakes: 64,
            max_handshakes_per_source: 8,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// [`ListenerLimits::max_handshakes`] reached.
    Total,
    /// [`ListenerLimits::max_handshakes_per_source`] reached for this source.
    Source,
}

/// What counts as one source: an IPv4 address (IPv4-mapped IPv6 included), or an IPv6
/// /64 — a single host usually holds a whole /64, so per-address counting would let it
/// take every slot.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Handshakes in flight, in total and per source address.
#[derive(Debug)]
pub struct HandshakeSlots {
    limits: ListenerLimits,
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl HandshakeSlots {
    pub fn new(limits: ListenerLimits) -> Self {
        Self {
            limits,
            total: 0,
            per_source: HashMap::new(),
        }
    }

    /// Takes a slot for a handshake from `source`, or says which limit is reached.
    pub fn admit(&mut self, source: IpAddr) -> Result<(), Overflow> {
        let source = source_key(source);
        if self.total >= self.limits.max_handshakes {
            return Err(Overflow::Total);
        }
        let from_source = self.per_source.entry(source).or_insert(0);
        if *from_source >= self.limits.max_handshakes_per_source {
            return Err(Overflow::Source);
        }
        *from_source += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`HandshakeSlots::admit`].
    pub fn release(&mut self, source: IpAddr) {
        let source = source_key(source);
        if let Some(n) = self.per_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&source);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    /// Handshakes in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.total
    }
}

/// A slot held for the duration of one handshake; released on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Mutex<HandshakeSlots>>,
    source: IpAddr,
}

impl Slot {
    pub(crate) fn take(
        slots: &Arc<Mutex<HandshakeSlots>>,
        source: IpAddr,
    ) -> Result<Self, Overflow> {
        slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(source)?;
        Ok(Self {
            slots: slots.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .release(self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_ipv6_64_is_one_source() {
        // A host routinely holds a whole /64: addresses in it are one source.
        let mut slots = HandshakeSlots::new(ListenerLimits {
            max_handshakes: 5,
            max_handshakes_per_source: 2,
        });
        assert_eq!(slots.admit(ip("2001:db8:1:2::1")), Ok(()));
        assert_eq!(slots.admit(ip("2001:db8:1:2::2")), Ok(()));
        assert_eq!(
            slots.admit(ip("2001:db8:1:2:ffff::3")),
            Err(Overflow::Source)
        );
        assert_eq!(slots.admit(ip("2001:db8:1:3::1")), Ok(()));
        slots.release(ip("2001:db8:1:2::1"));
        assert_eq!(slots.admit(ip("2001:db8:1:2::9")), Ok(()));
    }

    #[test]
    fn one_source_cannot_take_every_slot() {
        let mut slots = HandshakeSlots::new(ListenerLimits {
            max_handshakes: 5,
            max_handshakes_per_source: 2,
        });
        let attacker = ip("192.0.2.66");
        assert_eq!(slots.admit(attacker), Ok(()));
        assert_eq!(slots.admit(attacker), Ok(()));
        assert_eq!(slots.admit(attacker), Err(Overflow::Source));
        // The same host over IPv4-mapped IPv6 is the same source.
        assert_eq!(slots.admit(ip("::ffff:192.0.2.66")), Err(Overflow::Source));
        assert_eq!(slots.admit(ip("192.0.2.1")), Ok(()));
        assert_eq!(slots.admit(ip("192.0.2.2")), Ok(()));
        assert_eq!(slots.admit(ip("192.0.2.3")), Ok(()));
        assert_eq!(slots.in_flight(), 5);
        assert_eq!(slots.admit(ip("192.0.2.4")), Err(Overflow::Total));
        slots.release(attacker);
        assert_eq!(slots.admit(ip("192.0.2.4")), Ok(()));
        assert_eq!(slots.admit(attacker), Err(Overflow::Total));
    }

    #[test]
    fn release_of_an_unknown_source_changes_nothing() {
        let mut slots = HandshakeSlots::new(ListenerLimits::default());
        slots.release(ip("192.0.2.9"));
        assert_eq!(slots.in_flight(), 0);
        assert_eq!(slots.admit(ip("192.0.2.9")), Ok(()));
        slots.release(ip("192.0.2.9"));
        slots.release(ip("192.0.2.9"));
        assert_eq!(slots.in_flight(), 0);
    }

    #[test]
    fn slots_are_given_back_on_drop() {
        let slots = Arc::new(Mutex::new(HandshakeSlots::new(ListenerLimits {
            max_handshakes: 1,
            max_handshakes_per_source: 1,
        })));
        let held = Slot::take(&slots, ip("192.0.2.1")).unwrap();
        assert!(Slot::take(&slots, ip("192.0.2.2")).is_err());
        drop(held);
        assert!(Slot::take(&slots, ip("192.0.2.2")).is_ok());
        assert_eq!(slots.lock().unwrap().in_flight(), 0);
    }
}
