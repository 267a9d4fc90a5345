//! IP prefixes and a longest-prefix-match table for IPv4 and IPv6.
//!
//! The table keeps one hash map per prefix length that is in use, and looks a
//! destination up from the longest length down. Meshes configure a handful of
//! distinct lengths, so a lookup is a few hash probes whatever the number of
//! prefixes.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a prefix string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("expected ADDRESS/LENGTH, e.g. 100.64.2.0/24 or fd00:2::/64")]
    Form,
    #[error("`{0}` is not an IP address")]
    Address(String),
    #[error("prefix length {len} is out of range (0..={max})")]
    Length { len: String, max: u8 },
    #[error("host bits are set; did you mean {0}?")]
    HostBits(IpPrefix),
}

/// A normalised IP prefix (no host bits set).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

fn mask_v4(addr: Ipv4Addr, len: u8) -> Ipv4Addr {
    let bits = u32::from(addr);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    Ipv4Addr::from(bits & mask)
}

fn mask_v6(addr: Ipv6Addr, len: u8) -> Ipv6Addr {
    let bits = u128::from(addr);
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    Ipv6Addr::from(bits & mask)
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(mask_v4(a, len)),
        IpAddr::V6(a) => IpAddr::V6(mask_v6(a, len)),
    }
}

impl IpPrefix {
    /// Builds a prefix, clearing any host bits.
    pub fn new_truncating(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(PrefixError::Length {
                len: len.to_string(),
                max,
            });
        }
        Ok(Self {
            addr: mask(addr, len),
            len,
        })
    }
    /// A host prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    /// The prefix length in bits.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
    /// Whether the two prefixes share an address (one contains the other).
    pub fn overlaps(&self, other: &IpPrefix) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl FromStr for IpPrefix {
    type Err = PrefixError;
    /// Parses `ADDRESS/LENGTH`; a bare address means a host prefix. Host bits
    /// must be clear, so a typo like `100.64.2.1/24` is caught rather than
    /// silently widened.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr_text, len_text) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        if addr_text.is_empty() {
            return Err(PrefixError::Form);
        }
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| PrefixError::Address(addr_text.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_text {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(PrefixError::Length {
                        len: l.to_string(),
                        max,
                    })
                }
            },
        };
        let prefix = Self::new_truncating(addr, len)?;
        if prefix.addr != addr {
            return Err(PrefixError::HostBits(prefix));
        }
        Ok(prefix)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Longest-prefix-match table from prefixes to values, IPv4 and IPv6.
#[derive(Clone)]
pub struct PrefixTable<T> {
    v4: LenMaps<u32, T>,
    v6: LenMaps<u128, T>,
}

#[derive(Clone)]
struct LenMaps<K, T> {
    /// (length, map), sorted by length, longest first.
    by_len: Vec<(u8, HashMap<K, T>)>,
}

impl<K: std::hash::Hash + Eq + Copy, T> LenMaps<K, T> {
    fn new() -> Self {
        Self { by_len: Vec::new() }
    }
    fn insert(&mut self, len: u8, key: K, value: T) -> Option<T> {
        let pos = match self.by_len.iter().position(|(l, _)| *l <= len) {
            Some(p) if self.by_len[p].0 == len => p,
            Some(p) => {
                self.by_len.insert(p, (len, HashMap::new()));
                p
            }
            None => {
                self.by_len.push((len, HashMap::new()));
                self.by_len.len() - 1
            }
        };
        self.by_len[pos].1.insert(key, value)
    }
    fn remove(&mut self, len: u8, key: K) -> Option<T> {
        let pos = self.by_len.iter().position(|(l, _)| *l == len)?;
        let old = self.by_len[pos].1.remove(&key);
        if self.by_len[pos].1.is_empty() {
            self.by_len.remove(pos);
        }
        old
    }
    fn lookup(&self, mask: impl Fn(u8) -> K) -> Option<&T> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(*len)))
    }
    fn len(&self) -> usize {
        self.by_len.iter().map(|(_, m)| m.len()).sum()
    }
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        Self {
            v4: LenMaps::new(),
            v6: LenMaps::new(),
        }
    }
}

impl<T> PrefixTable<T> {
    pub fn new() -> Self {
        Self::default()
    }
    /// Inserts or replaces the value for `prefix`; returns the old value.
    pub fn insert(&mut self, prefix: IpPrefix, value: T) -> Option<T> {
        match prefix.addr {
            IpAddr::V4(a) => self.v4.insert(prefix.len, u32::from(a), value),
            IpAddr::V6(a) => self.v6.insert(prefix.len, u128::from(a), value),
        }
    }
    pub fn remove(&mut self, prefix: IpPrefix) -> Option<T> {
        match prefix.addr {
            IpAddr::V4(a) => self.v4.remove(prefix.len, u32::from(a)),
            IpAddr::V6(a) => self.v6.remove(prefix.len, u128::from(a)),
        }
    }
    /// The value of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                self.v4
                    .lookup(|len| u32::from(mask_v4(Ipv4Addr::from(bits), len)))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                self.v6
                    .lookup(|len| u128::from(mask_v6(Ipv6Addr::from(bits), len)))
            }
        }
    }
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> fmt::Debug for PrefixTable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrefixTable({} prefixes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_displays() {
        assert_eq!(p("100.64.2.0/24").to_string(), "100.64.2.0/24");
        assert_eq!(p("fd00:2::/64").to_string(), "fd00:2::/64");
        assert_eq!(p("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(p("0.0.0.0/0").len(), 0);
        assert_eq!(p("::/0").len(), 0);
    }

    #[test]
    fn rejects_bad_prefixes() {
        assert!(matches!("".parse::<IpPrefix>(), Err(PrefixError::Form)));
        assert!(matches!(
            "100.64.2.0/33".parse::<IpPrefix>(),
            Err(PrefixError::Length { .. })
        ));
        assert!(matches!(
            "fd00::/129".parse::<IpPrefix>(),
            Err(PrefixError::Length { .. })
        ));
        assert!(matches!(
            "100.64.2.0/x".parse::<IpPrefix>(),
            Err(PrefixError::Length { .. })
        ));
        assert!(matches!(
            "100.64.2/24".parse::<IpPrefix>(),
            Err(PrefixError::Address(_))
        ));
        match "100.64.2.1/24".parse::<IpPrefix>() {
            Err(PrefixError::HostBits(fixed)) => assert_eq!(fixed, p("100.64.2.0/24")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = PrefixTable::new();
        t.insert(p("0.0.0.0/0"), "default");
        t.insert(p("100.64.0.0/10"), "mesh");
        t.insert(p("100.64.2.0/24"), "site-b");
        t.insert(p("100.64.2.128/25"), "site-b-upper");
        t.insert(p("fd00::/8"), "v6-mesh");
        t.insert(p("fd00:2::/64"), "v6-b");
        assert_eq!(t.lookup(ip("100.64.2.5")), Some(&"site-b"));
        assert_eq!(t.lookup(ip("100.64.2.200")), Some(&"site-b-upper"));
        assert_eq!(t.lookup(ip("100.64.3.1")), Some(&"mesh"));
        assert_eq!(t.lookup(ip("8.8.8.8")), Some(&"default"));
        assert_eq!(t.lookup(ip("fd00:2::9")), Some(&"v6-b"));
        assert_eq!(t.lookup(ip("fd00:3::9")), Some(&"v6-mesh"));
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
        assert_eq!(t.len(), 6);
        assert_eq!(t.remove(p("100.64.2.0/24")), Some("site-b"));
        assert_eq!(t.lookup(ip("100.64.2.5")), Some(&"mesh"));
        assert_eq!(t.remove(p("100.64.2.0/24")), None);
    }

    #[test]
    fn ipv4_and_ipv6_do_not_mix() {
        let mut t = PrefixTable::new();
        t.insert(p("0.0.0.0/0"), 1);
        assert_eq!(t.lookup(ip("::1")), None);
        assert!(p("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(!p("0.0.0.0/0").contains(ip("::1")));
    }
}
