//! Entry points shared by the cargo-fuzz targets (`tunnel/fuzz/`) and the
//! bounded smoke test that CI runs: a receiving core with a live session,
//! fed arbitrary datagrams.

use crate::esp::keying::{ManualKeying, SaPair};
use crate::esp::sa::{EspCipher, Lifetimes, SaKeys, ESP_MAX_OVERHEAD};
use crate::esp::{EspCore, EspPeerConfig};
use crate::wg::{Inbound, Outbound, PeerConfig, WgCore};
use crate::PrivateKey;
use std::sync::Arc;
use std::time::Instant;
use zeroize::Zeroizing;

fn ipv4(len: usize, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let len = len.max(20);
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

/// An ESP receiver and a sender with the mirrored SA, to make valid
/// packets that a fuzzer or the smoke test can mutate.
#[derive(Debug)]
pub struct EspTarget {
    rx: EspCore,
    tx: EspCore,
}

impl Default for EspTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl EspTarget {
    pub fn new() -> Self {
        let sa = |spi: u32, b: u8| SaKeys {
            spi,
            key: Zeroizing::new(vec![b; 16]),
            salt: [b; 4],
        };
        let now = Instant::now();
        let cfg = |out: SaKeys, inb: SaKeys, prefix: &str| EspPeerConfig {
            name: None,
            endpoint: "192.0.2.9:4500".parse().expect("literal"),
            allowed_prefixes: vec![prefix.parse().expect("literal")],
            local_prefixes: Vec::new(),
            esn: true,
            lifetimes: Lifetimes::default(),
            keying: Arc::new(ManualKeying::new(
                EspCipher::Aes128Gcm,
                SaPair {
                    outbound: out,
                    inbound: inb,
                },
            )),
        };
        let rx = EspCore::new(
            vec![cfg(sa(0x5000, 5), sa(0x6000, 6), "100.64.1.0/24")],
            now,
        )
        .expect("valid test SAs");
        let tx = EspCore::new(
            vec![cfg(sa(0x6000, 6), sa(0x5000, 5), "100.64.2.0/24")],
            now,
        )
        .expect("valid test SAs");
        Self { rx, tx }
    }

    /// A valid ESP packet carrying an IPv4 packet of `len` bytes.
    pub fn valid_packet(&self, len: usize) -> Vec<u8> {
        let set = self.tx.peers();
        let packet = ipv4(len, [100, 64, 1, 2], [100, 64, 2, 2]);
        let mut out = vec![0u8; packet.len() + ESP_MAX_OVERHEAD];
        match self
            .tx
            .encapsulate(&set.peers()[0], &packet, &mut out, Instant::now())
        {
            Outbound::Send { len, .. } => out.truncate(len),
            Outbound::Dropped(_) => out.clear(),
        }
        out
    }

    /// Feeds one datagram to the receiver.
    pub fn feed(&self, datagram: &[u8]) -> Inbound {
        let mut out = vec![0u8; datagram.len().max(64)];
        self.rx
            .decapsulate(&self.rx.peers(), datagram, &mut out, Instant::now())
    }
}

/// A WireGuard receiver with an established session, and its peer.
#[derive(Debug)]
pub struct WgTarget {
    rx: WgCore,
    tx: WgCore,
}

impl Default for WgTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl WgTarget {
    pub fn new() -> Self {
        let (krx, ktx) = (PrivateKey::generate(), PrivateKey::generate());
        let peer = |key, endpoint: &str, prefix: &str| PeerConfig {
            name: None,
            public_key: key,
            previous_keys: Vec::new(),
            preshared_key: None,
            endpoint: Some(endpoint.parse().expect("literal")),
            allowed_prefixes: vec![prefix.parse().expect("literal")],
            persistent_keepalive: None,
        };
        let rx = WgCore::new(
            krx.clone(),
            vec![peer(ktx.public_key(), "192.0.2.2:1", "100.64.2.0/24")],
        )
        .expect("valid test peers");
        let tx = WgCore::new(
            ktx,
            vec![peer(krx.public_key(), "192.0.2.1:1", "100.64.1.0/24")],
        )
        .expect("valid test peers");
        let target = Self { rx, tx };
        // Handshake: initiation, response, keepalive.
        let init = target.tx_packet(60);
        let mut sink = Vec::new();
        target.deliver(&target.rx, &init, &mut sink);
        for reply in std::mem::take(&mut sink) {
            target.deliver(&target.tx, &reply, &mut sink);
        }
        for reply in sink {
            target.deliver(&target.rx, &reply, &mut Vec::new());
        }
        target
    }

    fn deliver(&self, core: &WgCore, datagram: &[u8], replies: &mut Vec<Vec<u8>>) -> Inbound {
        let mut out = vec![0u8; datagram.len().max(256)];
        core.decapsulate(
            &core.peers(),
            "192.0.2.2:1".parse().expect("literal"),
            datagram,
            &mut out,
            &mut |_, bytes| replies.push(bytes.to_vec()),
        )
    }

    /// What the peer sends for an IPv4 packet of `len` bytes (a data
    /// message once the session is up).
    pub fn tx_packet(&self, len: usize) -> Vec<u8> {
        let packet = ipv4(len, [100, 64, 2, 2], [100, 64, 1, 2]);
        let mut out = vec![0u8; packet.len() + 200];
        match self.tx.encapsulate(&self.tx.peers(), &packet, &mut out) {
            Outbound::Send { len, .. } => out.truncate(len),
            Outbound::Dropped(_) => out.clear(),
        }
        out
    }

    pub fn feed(&self, datagram: &[u8]) -> Inbound {
        self.deliver(&self.rx, datagram, &mut Vec::new())
    }
}

#[cfg(test)]
mod smoke {
    //! A bounded, seeded run of the fuzz targets' entry points: random
    //! bytes and mutations of valid packets (bit flips, truncation,
    //! extension, spliced headers). Asserts no panic and that only the
    //! unmodified valid packets are accepted.
    use super::*;

    /// xorshift64*: deterministic, good enough to generate test inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn mutate(rng: &mut Rng, mut d: Vec<u8>) -> Vec<u8> {
        match rng.below(5) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 => d.truncate(rng.below(d.len() + 1)),
            2 => d.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            3 if d.len() > 8 => {
                let i = rng.below(d.len() - 8);
                d[i..i + 8].copy_from_slice(&rng.next().to_le_bytes());
            }
            _ => d = (0..rng.below(1600)).map(|_| rng.next() as u8).collect(),
        }
        d
    }

    #[test]
    fn esp_receiver_survives_random_and_mutated_datagrams() {
        let t = EspTarget::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted_mutants = 0;
        for i in 0..30_000 {
            let valid = t.valid_packet(20 + rng.below(1400));
            let mutant = mutate(&mut rng, valid.clone());
            if mutant != valid && matches!(t.feed(&mutant), Inbound::Tun { .. }) {
                accepted_mutants += 1;
            }
            // The original still arrives (unless the mutant was identical).
            if i % 3 == 0 && mutant != valid {
                assert!(
                    matches!(t.feed(&valid), Inbound::Tun { .. }),
                    "iteration {i}"
                );
            }
        }
        assert_eq!(accepted_mutants, 0);
    }

    #[test]
    fn wireguard_receiver_survives_random_and_mutated_datagrams() {
        let t = WgTarget::new();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut accepted_mutants = 0;
        for i in 0..20_000 {
            let valid = t.tx_packet(20 + rng.below(1400));
            assert_eq!(valid.first(), Some(&4), "a data message");
            let mutant = mutate(&mut rng, valid.clone());
            if mutant != valid && matches!(t.feed(&mutant), Inbound::Tun { .. }) {
                accepted_mutants += 1;
            }
            if i % 3 == 0 && mutant != valid {
                assert!(
                    matches!(t.feed(&valid), Inbound::Tun { .. }),
                    "iteration {i}"
                );
            }
        }
        assert_eq!(accepted_mutants, 0);
    }
}
