//! ESP security associations and the AES-GCM transform (RFC 4303, RFC 4106,
//! RFC 4304 extended sequence numbers), in tunnel mode.
//!
//! Wire format of one ESP packet (the UDP payload, RFC 3948):
//!
//! ```text
//! 0      4        8             16                                  len-16   len
//! | SPI  | Seq lo | IV (8 bytes) | encrypted: inner packet | pad | pad len | next hdr | ICV (16) |
//! ```
//!
//! The IV is the 64-bit sequence number, which never repeats under one key
//! (a sender never wraps; it must rekey first). Nonce = salt (4) || IV (8).
//! Associated data = SPI || Seq (8 bytes), or SPI || Seq high || Seq low
//! (12 bytes) with ESN. Padding is the RFC's 1, 2, 3, … and aligns the
//! trailer to 4 bytes; the receiver checks it.

use super::replay::{infer_esn, ReplayError, ReplayWindow};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use std::fmt;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

pub const ESP_HEADER_LEN: usize = 8;
pub const ESP_IV_LEN: usize = 8;
pub const ESP_ICV_LEN: usize = 16;
/// Bytes before the encrypted payload.
pub const ESP_PREFIX_LEN: usize = ESP_HEADER_LEN + ESP_IV_LEN;
/// Largest overhead ESP adds to an inner packet (3 pad bytes).
pub const ESP_MAX_OVERHEAD: usize = ESP_PREFIX_LEN + 3 + 2 + ESP_ICV_LEN;
/// Next-header values for tunnel mode.
pub const NEXT_HEADER_IPV4: u8 = 4;
pub const NEXT_HEADER_IPV6: u8 = 41;
/// RFC 4303 §2.6: a dummy packet, to be discarded silently.
pub const NEXT_HEADER_NONE: u8 = 59;

/// The AEAD of an SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum EspCipher {
    #[serde(rename = "aes128-gcm")]
    Aes128Gcm,
    #[serde(rename = "aes256-gcm")]
    Aes256Gcm,
}

impl EspCipher {
    pub fn key_len(self) -> usize {
        match self {
            EspCipher::Aes128Gcm => 16,
            EspCipher::Aes256Gcm => 32,
        }
    }
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            EspCipher::Aes128Gcm => &aead::AES_128_GCM,
            EspCipher::Aes256Gcm => &aead::AES_256_GCM,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            EspCipher::Aes128Gcm => "aes128-gcm",
            EspCipher::Aes256Gcm => "aes256-gcm",
        }
    }
}

impl std::str::FromStr for EspCipher {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "aes128-gcm" => Ok(Self::Aes128Gcm),
            "aes256-gcm" => Ok(Self::Aes256Gcm),
            other => Err(format!(
                "unknown cipher `{other}` (expected aes128-gcm or aes256-gcm)"
            )),
        }
    }
}

/// Keying material of one SA (one direction): SPI, AES key and 4-byte salt.
#[derive(Clone)]
pub struct SaKeys {
    pub spi: u32,
    pub key: Zeroizing<Vec<u8>>,
    pub salt: [u8; 4],
}

impl fmt::Debug for SaKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SaKeys {{ spi: {:#010x}, key: <redacted> }}", self.spi)
    }
}

/// Errors building an SA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaError {
    #[error("key is {got} bytes, {cipher} needs {want}")]
    KeyLength {
        cipher: &'static str,
        got: usize,
        want: usize,
    },
    #[error("SPI {0} is reserved (values 0 to 255 are)")]
    ReservedSpi(u32),
}

fn aead_key(cipher: EspCipher, keys: &SaKeys) -> Result<LessSafeKey, SaError> {
    if keys.spi < 256 {
        return Err(SaError::ReservedSpi(keys.spi));
    }
    let want = cipher.key_len();
    if keys.key.len() != want {
        return Err(SaError::KeyLength {
            cipher: cipher.name(),
            got: keys.key.len(),
            want,
        });
    }
    let unbound =
        UnboundKey::new(cipher.algorithm(), &keys.key).map_err(|_| SaError::KeyLength {
            cipher: cipher.name(),
            got: keys.key.len(),
            want,
        })?;
    Ok(LessSafeKey::new(unbound))
}

fn nonce(salt: [u8; 4], seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&salt);
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Associated data per RFC 4106 §5; returns the buffer and its used length.
fn aad(spi: u32, seq: u64, esn: bool) -> ([u8; 12], usize) {
    let mut a = [0u8; 12];
    a[..4].copy_from_slice(&spi.to_be_bytes());
    if esn {
        a[4..8].copy_from_slice(&((seq >> 32) as u32).to_be_bytes());
        a[8..].copy_from_slice(&(seq as u32).to_be_bytes());
        (a, 12)
    } else {
        a[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        (a, 8)
    }
}

/// Limits on an SA's use (RFC 4301 §4.4.2.1 lifetimes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub packets: u64,
    pub bytes: u64,
    pub time: Duration,
}

impl Limits {
    fn reached(&self, packets: u64, bytes: u64, age: Duration) -> bool {
        packets >= self.packets || bytes >= self.bytes || age >= self.time
    }
}

/// Soft and hard lifetimes of the SAs of one peer, and how long a replaced
/// inbound SA keeps accepting packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// At the soft limit the next SA pair takes over (make-before-break).
    pub soft: Limits,
    /// At the hard limit an SA is never used again.
    pub hard: Limits,
    /// How long a replaced inbound SA still accepts late packets.
    pub grace: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            soft: Limits {
                packets: 3 << 30,
                bytes: 512 << 30,
                time: Duration::from_secs(3000),
            },
            hard: Limits {
                // Below 2^32 so that even without ESN a counter never wraps.
                packets: (1 << 32) - 1,
                bytes: 1 << 40,
                time: Duration::from_secs(3600),
            },
            grace: Duration::from_secs(30),
        }
    }
}

/// An outbound SA: encrypts and numbers packets.
pub struct OutboundSa {
    pub(crate) spi: u32,
    key: LessSafeKey,
    salt: [u8; 4],
    esn: bool,
    /// The number the next packet gets (starts at 1).
    next_seq: u64,
    pub(crate) bytes: u64,
    pub(crate) created: Instant,
    pub(crate) generation: u64,
}

impl fmt::Debug for OutboundSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("next_seq", &self.next_seq)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Why a packet could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// The SA reached its hard limit (or the counter space is used up).
    Expired,
    /// The output buffer is too small (a caller bug).
    BufferTooSmall,
    /// Not an IPv4 or IPv6 packet.
    NotIp,
}

impl OutboundSa {
    pub fn new(
        cipher: EspCipher,
        keys: &SaKeys,
        esn: bool,
        generation: u64,
        now: Instant,
    ) -> Result<Self, SaError> {
        Ok(Self {
            spi: keys.spi,
            key: aead_key(cipher, keys)?,
            salt: keys.salt,
            esn,
            next_seq: 1,
            bytes: 0,
            created: now,
            generation,
        })
    }

    /// Packets sealed so far.
    pub fn packets(&self) -> u64 {
        self.next_seq - 1
    }

    /// The sequence number of the last packet sealed.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub(crate) fn reached(&self, limits: &Limits, now: Instant) -> bool {
        limits.reached(
            self.packets(),
            self.bytes,
            now.saturating_duration_since(self.created),
        )
    }

    /// Seals `packet` into `out` as one ESP packet; returns its length.
    /// `out` needs `packet.len() + ESP_MAX_OVERHEAD` bytes.
    pub fn seal(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        hard: &Limits,
        now: Instant,
    ) -> Result<usize, SealError> {
        let next_header = match packet.first().map(|b| b >> 4) {
            Some(4) => NEXT_HEADER_IPV4,
            Some(6) => NEXT_HEADER_IPV6,
            _ => return Err(SealError::NotIp),
        };
        // Never wrap: without ESN the counter stops at 2^32 - 1.
        let counter_max = if self.esn {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        if self.next_seq > counter_max || self.reached(hard, now) {
            return Err(SealError::Expired);
        }
        let pad = (4 - (packet.len() + 2) % 4) % 4;
        let plain_len = packet.len() + pad + 2;
        let total = ESP_PREFIX_LEN + plain_len + ESP_ICV_LEN;
        if out.len() < total {
            return Err(SealError::BufferTooSmall);
        }
        let seq = self.next_seq;
        out[..4].copy_from_slice(&self.spi.to_be_bytes());
        out[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        out[8..16].copy_from_slice(&seq.to_be_bytes());
        let body = &mut out[ESP_PREFIX_LEN..ESP_PREFIX_LEN + plain_len];
        body[..packet.len()].copy_from_slice(packet);
        for (i, b) in body[packet.len()..packet.len() + pad]
            .iter_mut()
            .enumerate()
        {
            *b = (i + 1) as u8;
        }
        body[plain_len - 2] = pad as u8;
        body[plain_len - 1] = next_header;
        let (aad_buf, aad_len) = aad(self.spi, seq, self.esn);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.salt, seq), Aad::from(&aad_buf[..aad_len]), body)
            .map_err(|_| SealError::BufferTooSmall)?;
        out[ESP_PREFIX_LEN + plain_len..total].copy_from_slice(tag.as_ref());
        self.next_seq += 1;
        self.bytes += packet.len() as u64;
        Ok(total)
    }
}

/// An inbound SA: verifies, decrypts, and checks replay.
pub struct InboundSa {
    pub(crate) spi: u32,
    key: LessSafeKey,
    salt: [u8; 4],
    esn: bool,
    window: ReplayWindow,
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    /// When the first authentic packet arrived: lifetimes count from
    /// here, so an SA installed ahead of time does not age unused.
    pub(crate) first_used: Option<Instant>,
    pub(crate) generation: u64,
    /// Set when a newer SA took over: accept late packets until then.
    pub(crate) retire_at: Option<Instant>,
}

impl fmt::Debug for InboundSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("top", &self.window.top())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Why an inbound packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    Replay(ReplayError),
    /// The ICV did not verify: tampered, wrong key, or wrong ESN guess.
    Icv,
    /// Too short, or padding / next header invalid after decryption.
    Malformed,
    /// The SA reached its hard limit.
    Expired,
}

/// A decrypted packet: where it lies in the output buffer, and the inner
/// protocol (4 or 41; 59 for a dummy packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub len: usize,
    pub next_header: u8,
    pub seq: u64,
}

impl InboundSa {
    pub fn new(
        cipher: EspCipher,
        keys: &SaKeys,
        esn: bool,
        generation: u64,
    ) -> Result<Self, SaError> {
        Ok(Self {
            spi: keys.spi,
            key: aead_key(cipher, keys)?,
            salt: keys.salt,
            esn,
            window: ReplayWindow::new(),
            packets: 0,
            bytes: 0,
            first_used: None,
            generation,
            retire_at: None,
        })
    }

    /// Highest sequence number received.
    pub fn top(&self) -> u64 {
        self.window.top()
    }

    /// Whether the SA reached `limits`; an SA never used has not.
    pub(crate) fn reached(&self, limits: &Limits, now: Instant) -> bool {
        let Some(first) = self.first_used else {
            return false;
        };
        limits.reached(
            self.packets,
            self.bytes,
            now.saturating_duration_since(first),
        )
    }

    /// Verifies and decrypts `datagram` (a whole ESP packet for this SA)
    /// into `out`, which must be at least as long as the datagram. The
    /// inner packet is at `out[..len]`.
    pub fn open(
        &mut self,
        datagram: &[u8],
        out: &mut [u8],
        hard: &Limits,
        now: Instant,
    ) -> Result<Opened, OpenError> {
        if datagram.len() < ESP_PREFIX_LEN + 2 + ESP_ICV_LEN || out.len() < datagram.len() {
            return Err(OpenError::Malformed);
        }
        if self.reached(hard, now) {
            return Err(OpenError::Expired);
        }
        let low = u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
        let seq = if self.esn {
            infer_esn(self.window.top(), low)
        } else {
            u64::from(low)
        };
        self.window.check(seq).map_err(OpenError::Replay)?;
        let mut iv = [0u8; 8];
        iv.copy_from_slice(&datagram[8..16]);
        let body_len = datagram.len() - ESP_PREFIX_LEN;
        let body = &mut out[..body_len];
        body.copy_from_slice(&datagram[ESP_PREFIX_LEN..]);
        let (aad_buf, aad_len) = aad(self.spi, seq, self.esn);
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.salt);
        n[4..].copy_from_slice(&iv);
        let plain_len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(n),
                Aad::from(&aad_buf[..aad_len]),
                body,
            )
            .map_err(|_| OpenError::Icv)?
            .len();
        // Authentic: only now may the window move (RFC 4303 §3.4.3).
        self.window.accept(seq).map_err(OpenError::Replay)?;
        self.packets += 1;
        self.first_used.get_or_insert(now);
        let plain = &out[..plain_len];
        let next_header = plain[plain_len - 1];
        let pad = usize::from(plain[plain_len - 2]);
        if pad + 2 > plain_len {
            return Err(OpenError::Malformed);
        }
        let len = plain_len - 2 - pad;
        // RFC 4303 §2.4: default padding is 1, 2, 3, …
        if plain[len..len + pad]
            .iter()
            .enumerate()
            .any(|(i, b)| usize::from(*b) != i + 1)
        {
            return Err(OpenError::Malformed);
        }
        self.bytes += len as u64;
        Ok(Opened {
            len,
            next_header,
            seq,
        })
    }
}

/// The SPI of an ESP-in-UDP datagram, or `None` for a non-ESP datagram:
/// a NAT keepalive (one 0xFF byte) or the zero non-ESP marker of RFC 3948.
pub fn datagram_spi(datagram: &[u8]) -> Option<u32> {
    let spi = u32::from_be_bytes(datagram.get(..4)?.try_into().ok()?);
    (spi != 0).then_some(spi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(spi: u32, key: &str, salt: &str) -> SaKeys {
        SaKeys {
            spi,
            key: Zeroizing::new(hex::decode(key).unwrap()),
            salt: hex::decode(salt).unwrap().try_into().unwrap(),
        }
    }

    fn unlimited() -> Limits {
        Limits {
            packets: u64::MAX,
            bytes: u64::MAX,
            time: Duration::MAX,
        }
    }

    /// Builds the wire form of a test vector: SPI, low sequence number, IV,
    /// then ciphertext and ICV.
    fn vector_packet(spi: u32, seq_low: u32, iv: &str, ciphertext_and_icv: &str) -> Vec<u8> {
        let mut wire = spi.to_be_bytes().to_vec();
        wire.extend_from_slice(&seq_low.to_be_bytes());
        wire.extend_from_slice(&hex::decode(iv).unwrap());
        wire.extend_from_slice(&hex::decode(ciphertext_and_icv).unwrap());
        wire
    }

    /// draft-mcgrew-gcm-test-01 §4, the AES-128 case with an extended
    /// sequence number: SPI 0x00004321, ESN 0x8765432100000000, so the
    /// associated data carries high bits that are not on the wire.
    #[test]
    fn known_answer_aes128_gcm_with_esn() {
        let keys = keys(0x4321, "4c80cdefbb5d10da906ac73c3613a634", "2e443b68");
        let mut sa = InboundSa::new(EspCipher::Aes128Gcm, &keys, true, 0).unwrap();
        // The receiver last saw a number just below the 2^32 boundary of
        // subspace 0x87654320, so low 0 must mean high 0x87654321.
        sa.window
            .accept((0x8765_4320u64 << 32) | 0xffff_fffb)
            .unwrap();
        let wire = vector_packet(
            0x4321,
            0,
            "4956ed7e3b244cfe",
            "fecf537e729d5b07dc30df528dd22b768d1b98736696a6fd348509fa13ceac34\
             cfa2436f14a3f3cf65925bf1f4a13c5d15b21e1884f5ff6247aeabb786b93bce\
             61bc17d768fd9732459018148f6cbe722fd04796562dfdb4",
        );
        let mut out = vec![0u8; wire.len()];
        let opened = sa
            .open(&wire, &mut out, &unlimited(), Instant::now())
            .unwrap();
        assert_eq!(opened.seq, 0x8765_4321_0000_0000);
        let plain = "45000048699a000080114db7c0a80102c0a801010a9bf15638d3010000010000\
                     00000000045f736970045f756470037369700963796265726369747902646b00\
                     0021000101020201";
        let plain = hex::decode(plain.replace(' ', "")).unwrap();
        // Trailer: pad 01 02, pad length 2, next header 1.
        assert_eq!(opened.next_header, 1);
        assert_eq!(&out[..opened.len], &plain[..plain.len() - 4]);
        // The AAD we build is the vector's.
        let (a, len) = aad(0x4321, 0x8765_4321_0000_0000, true);
        assert_eq!(hex::encode(&a[..len]), "000043218765432100000000");
    }

    /// draft-mcgrew-gcm-test-01 §4, the AES-256 case: SPI 0x4a2cbfe3,
    /// sequence number 2, no ESN.
    #[test]
    fn known_answer_aes256_gcm() {
        let keys = keys(
            0x4a2c_bfe3,
            "abbccddef00112233445566778899aababbccddef00112233445566778899aab",
            "11223344",
        );
        let mut sa = InboundSa::new(EspCipher::Aes256Gcm, &keys, false, 0).unwrap();
        let wire = vector_packet(
            0x4a2c_bfe3,
            2,
            "0102030405060708",
            "ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763\
             748a637985771d347f0545659f14e99def842d8eb335f4eecfdbf831824b4c49\
             15956c96",
        );
        let mut out = vec![0u8; wire.len()];
        let opened = sa
            .open(&wire, &mut out, &unlimited(), Instant::now())
            .unwrap();
        assert_eq!(opened.seq, 2);
        let plain = hex::decode(
            "4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee000000000\
             7002400020bf0000020405b40101040201020201"
                .replace(' ', ""),
        )
        .unwrap();
        assert_eq!(&out[..opened.len], &plain[..plain.len() - 4]);
        // The same packet again is a replay.
        assert_eq!(
            sa.open(&wire, &mut out, &unlimited(), Instant::now()),
            Err(OpenError::Replay(ReplayError::Duplicate))
        );
    }

    fn pair(cipher: EspCipher, esn: bool) -> (OutboundSa, InboundSa) {
        let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let k = keys(0x1000abcd, &key[..cipher.key_len() * 2], "deadbeef");
        let now = Instant::now();
        (
            OutboundSa::new(cipher, &k, esn, 0, now).unwrap(),
            InboundSa::new(cipher, &k, esn, 0).unwrap(),
        )
    }

    fn ipv4(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        for (i, b) in p.iter_mut().enumerate().skip(20) {
            *b = i as u8;
        }
        p
    }

    #[test]
    fn round_trip_with_every_padding_length() {
        for cipher in [EspCipher::Aes128Gcm, EspCipher::Aes256Gcm] {
            let (mut tx, mut rx) = pair(cipher, true);
            let now = Instant::now();
            for len in 20..=24 {
                let packet = ipv4(len);
                let mut wire = vec![0u8; len + ESP_MAX_OVERHEAD];
                let n = tx.seal(&packet, &mut wire, &unlimited(), now).unwrap();
                assert_eq!(
                    (n - ESP_PREFIX_LEN - ESP_ICV_LEN) % 4,
                    0,
                    "trailer aligned to 4"
                );
                assert_eq!(datagram_spi(&wire[..n]), Some(0x1000abcd));
                let mut out = vec![0u8; n];
                let opened = rx.open(&wire[..n], &mut out, &unlimited(), now).unwrap();
                assert_eq!(&out[..opened.len], &packet[..]);
                assert_eq!(opened.next_header, NEXT_HEADER_IPV4);
            }
        }
    }

    #[test]
    fn replay_tamper_and_bad_padding_are_refused() {
        let (mut tx, mut rx) = pair(EspCipher::Aes128Gcm, false);
        let now = Instant::now();
        let packet = ipv4(61);
        let mut wire = vec![0u8; 200];
        let n = tx.seal(&packet, &mut wire, &unlimited(), now).unwrap();
        let wire = &wire[..n];
        let mut out = vec![0u8; n];
        let mut flipped = wire.to_vec();
        flipped[30] ^= 0x80;
        assert_eq!(
            rx.open(&flipped, &mut out, &unlimited(), now),
            Err(OpenError::Icv)
        );
        // A forged packet did not move the window: the real one still opens.
        rx.open(wire, &mut out, &unlimited(), now).unwrap();
        assert_eq!(
            rx.open(wire, &mut out, &unlimited(), now),
            Err(OpenError::Replay(ReplayError::Duplicate))
        );
        assert_eq!(
            rx.open(&wire[..20], &mut out, &unlimited(), now),
            Err(OpenError::Malformed)
        );
    }

    #[test]
    fn wrong_padding_content_is_malformed() {
        // Build a packet whose padding bytes are not 1, 2, 3 by sealing the
        // trailer ourselves with the same key.
        let (_, mut rx) = pair(EspCipher::Aes128Gcm, false);
        let key = hex::decode("00112233445566778899aabbccddeeff").unwrap();
        let k = LessSafeKey::new(UnboundKey::new(&aead::AES_128_GCM, &key).unwrap());
        let mut body = ipv4(21);
        body.extend_from_slice(&[9, 9, 9, 3, 4]); // wrong pad bytes, pad len 3
        let (a, len) = aad(0x1000abcd, 1, false);
        let tag = k
            .seal_in_place_separate_tag(
                nonce(*b"\xde\xad\xbe\xef", 1),
                Aad::from(&a[..len]),
                &mut body,
            )
            .unwrap();
        let mut wire = vec![0x10, 0x00, 0xab, 0xcd, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        wire.extend_from_slice(&body);
        wire.extend_from_slice(tag.as_ref());
        let mut out = vec![0u8; wire.len()];
        assert_eq!(
            rx.open(&wire, &mut out, &unlimited(), Instant::now()),
            Err(OpenError::Malformed)
        );
    }

    #[test]
    fn esn_high_bits_are_authenticated_but_not_sent() {
        let (mut tx, mut rx) = pair(EspCipher::Aes128Gcm, true);
        let now = Instant::now();
        // Jump both ends close to the 2^32 boundary.
        tx.next_seq = (1 << 32) - 2;
        rx.window.accept((1 << 32) - 3).unwrap();
        let mut seqs = Vec::new();
        for _ in 0..4 {
            let packet = ipv4(40);
            let mut wire = vec![0u8; 100];
            let n = tx.seal(&packet, &mut wire, &unlimited(), now).unwrap();
            let mut out = vec![0u8; n];
            seqs.push(
                rx.open(&wire[..n], &mut out, &unlimited(), now)
                    .unwrap()
                    .seq,
            );
        }
        assert_eq!(
            seqs,
            vec![(1 << 32) - 2, (1 << 32) - 1, 1 << 32, (1 << 32) + 1]
        );
    }

    #[test]
    fn a_sender_without_esn_never_wraps() {
        let (mut tx, _) = pair(EspCipher::Aes128Gcm, false);
        tx.next_seq = u64::from(u32::MAX);
        let mut wire = vec![0u8; 100];
        let now = Instant::now();
        tx.seal(&ipv4(40), &mut wire, &unlimited(), now).unwrap();
        assert_eq!(
            tx.seal(&ipv4(40), &mut wire, &unlimited(), now),
            Err(SealError::Expired)
        );
    }

    #[test]
    fn hard_limits_stop_an_sa() {
        let (mut tx, _) = pair(EspCipher::Aes128Gcm, true);
        let hard = Limits {
            packets: 2,
            bytes: u64::MAX,
            time: Duration::MAX,
        };
        let mut wire = vec![0u8; 100];
        let now = Instant::now();
        tx.seal(&ipv4(40), &mut wire, &hard, now).unwrap();
        tx.seal(&ipv4(40), &mut wire, &hard, now).unwrap();
        assert_eq!(
            tx.seal(&ipv4(40), &mut wire, &hard, now),
            Err(SealError::Expired)
        );
    }

    #[test]
    fn non_esp_markers_are_recognised() {
        assert_eq!(datagram_spi(&[0xff]), None);
        assert_eq!(datagram_spi(&[0, 0, 0, 0, 1, 2]), None);
        assert_eq!(datagram_spi(&[0, 0, 1, 0]), Some(256));
    }
}
