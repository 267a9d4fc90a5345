//! The IKEv2 message codec (RFC 7296 §3, RFC 7383 §2.5).
//!
//! [`Message::decode`] reads a datagram (without the non-ESP marker of port 4500) into a
//! [`Header`] and its chain of [`Payload`]s; [`Message::encode`] writes one. An encrypted
//! payload ([`Payload::Sk`], [`Payload::Skf`]) is kept as bytes: it ends the chain, its
//! body is opened by [`crate::crypto::SkCipher`], and what it holds is decoded with
//! [`decode_payloads`].
//!
//! Decoding checks every length against what is left and never panics; any input either
//! decodes or gives a [`WireError`]. Everything decoding accepts encodes back to the same
//! bytes, except that the reserved bits and fields are written as zero and the critical
//! bit of a payload type this codec knows is written clear (RFC 7296 §3.2: a sender sets
//! it only on payloads the receiver may not know).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of the IKE header.
pub const HEADER_LEN: usize = 28;
/// Length of a generic payload header.
pub const GENERIC_HEADER_LEN: usize = 4;
/// Major version 2, minor 0.
pub const IKE_VERSION: u8 = 0x20;

/// Exchange types (RFC 7296 §3.1).
pub mod exchange {
    /// IKE_SA_INIT.
    pub const IKE_SA_INIT: u8 = 34;
    /// IKE_AUTH.
    pub const IKE_AUTH: u8 = 35;
    /// CREATE_CHILD_SA.
    pub const CREATE_CHILD_SA: u8 = 36;
    /// INFORMATIONAL.
    pub const INFORMATIONAL: u8 = 37;
}

/// Header flags (RFC 7296 §3.1).
pub mod flags {
    /// Set by the original initiator of the IKE SA.
    pub const INITIATOR: u8 = 0x08;
    /// The sender could speak a higher major version.
    pub const VERSION: u8 = 0x10;
    /// The message is a response.
    pub const RESPONSE: u8 = 0x20;
}

/// Payload types (RFC 7296 §3.2, RFC 7383 §2.5).
pub mod payload_type {
    /// No next payload.
    pub const NONE: u8 = 0;
    /// Security Association.
    pub const SA: u8 = 33;
    /// Key Exchange.
    pub const KE: u8 = 34;
    /// Identification - Initiator.
    pub const IDI: u8 = 35;
    /// Identification - Responder.
    pub const IDR: u8 = 36;
    /// Certificate.
    pub const CERT: u8 = 37;
    /// Certificate Request.
    pub const CERTREQ: u8 = 38;
    /// Authentication.
    pub const AUTH: u8 = 39;
    /// Nonce.
    pub const NONCE: u8 = 40;
    /// Notify.
    pub const NOTIFY: u8 = 41;
    /// Delete.
    pub const DELETE: u8 = 42;
    /// Vendor ID.
    pub const VENDOR_ID: u8 = 43;
    /// Traffic Selector - Initiator.
    pub const TSI: u8 = 44;
    /// Traffic Selector - Responder.
    pub const TSR: u8 = 45;
    /// Encrypted and Authenticated.
    pub const SK: u8 = 46;
    /// Encrypted and Authenticated Fragment.
    pub const SKF: u8 = 53;
}

/// Why bytes are not an IKEv2 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than a field or a declared length needs.
    #[error("truncated {what}: {need} bytes needed, {have} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A field that contradicts the rest of the message.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// Major version other than 2 (RFC 7296 §3.1: answered with INVALID_MAJOR_VERSION).
    #[error("IKE major version {0} (only 2 is spoken)")]
    Version(u8),
}

/// Result of decoding.
pub type Result<T> = std::result::Result<T, WireError>;

/// Reads fields front to back; every read is checked.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(WireError::Truncated {
                what: self.what,
                need: n,
                have: self.bytes.len(),
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn rest_len(&self) -> usize {
        self.bytes.len()
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Writes a 16-bit length field at `at` holding `out.len() - at + extra`.
fn patch_len16(out: &mut [u8], at: usize, len: usize) -> Result<()> {
    let len = u16::try_from(len).map_err(|_| WireError::Malformed("payload longer than 65535"))?;
    out[at..at + 2].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// The IKE header (RFC 7296 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// IKE SA initiator's SPI.
    pub spi_i: [u8; 8],
    /// IKE SA responder's SPI (zero in the first IKE_SA_INIT request).
    pub spi_r: [u8; 8],
    /// Type of the first payload.
    pub next_payload: u8,
    /// Major and minor version (0x20).
    pub version: u8,
    /// Exchange type ([`exchange`]).
    pub exchange: u8,
    /// Flags ([`flags`]).
    pub flags: u8,
    /// Message ID.
    pub message_id: u32,
    /// Length of the whole message, header included.
    pub length: u32,
}

impl Header {
    /// Reads a header; checks the major version and that `length` is the datagram's.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "IKE header");
        let spi_i = r.array()?;
        let spi_r = r.array()?;
        let next_payload = r.u8()?;
        let version = r.u8()?;
        let exchange = r.u8()?;
        let flags = r.u8()?;
        let message_id = r.u32()?;
        let length = r.u32()?;
        if version >> 4 != 2 {
            return Err(WireError::Version(version >> 4));
        }
        if usize::try_from(length).ok() != Some(bytes.len()) {
            return Err(WireError::Malformed(
                "IKE header: length is not the datagram's",
            ));
        }
        Ok(Self {
            spi_i,
            spi_r,
            next_payload,
            version,
            exchange,
            flags,
            message_id,
            length,
        })
    }

    /// Writes the header as it is (the caller sets `next_payload` and `length`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.spi_i);
        out.extend_from_slice(&self.spi_r);
        out.push(self.next_payload);
        out.push(self.version);
        out.push(self.exchange);
        out.push(self.flags);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Whether the message is a response.
    pub fn is_response(&self) -> bool {
        self.flags & flags::RESPONSE != 0
    }

    /// Whether the sender is the original initiator of the IKE SA.
    pub fn from_initiator(&self) -> bool {
        self.flags & flags::INITIATOR != 0
    }
}

/// A transform attribute (RFC 7296 §3.3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// Type/Value format (AF = 1): the only one IKEv2 defines (Key Length, type 14).
    Short {
        /// Attribute type.
        kind: u16,
        /// Value.
        value: u16,
    },
    /// Type/Length/Value format (AF = 0).
    Long {
        /// Attribute type.
        kind: u16,
        /// Value.
        value: Vec<u8>,
    },
}

/// The Key Length attribute type.
pub const ATTRIBUTE_KEY_LENGTH: u16 = 14;

/// A transform (RFC 7296 §3.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    /// Transform type (1 ENCR, 2 PRF, 3 INTEG, 4 DH, 5 ESN).
    pub kind: u8,
    /// Transform ID.
    pub id: u16,
    /// Attributes.
    pub attributes: Vec<Attribute>,
}

impl Transform {
    /// A transform without attributes.
    pub fn new(kind: u8, id: u16) -> Self {
        Self {
            kind,
            id,
            attributes: Vec::new(),
        }
    }

    /// A transform with a key length in bits.
    pub fn with_key_length(kind: u8, id: u16, bits: u16) -> Self {
        Self {
            kind,
            id,
            attributes: vec![Attribute::Short {
                kind: ATTRIBUTE_KEY_LENGTH,
                value: bits,
            }],
        }
    }

    /// The Key Length attribute, if present.
    pub fn key_length(&self) -> Option<u16> {
        self.attributes.iter().find_map(|a| match a {
            Attribute::Short { kind, value } if *kind == ATTRIBUTE_KEY_LENGTH => Some(*value),
            _ => None,
        })
    }
}

/// A proposal (RFC 7296 §3.3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    /// Proposal number (1 for the first, +1 for each next).
    pub number: u8,
    /// Protocol (1 IKE, 3 ESP).
    pub protocol: u8,
    /// SPI (empty in IKE_SA_INIT, 8 bytes for an IKE SA rekey, 4 for ESP).
    pub spi: Vec<u8>,
    /// Transforms.
    pub transforms: Vec<Transform>,
}

/// An identification payload's body (RFC 7296 §3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identification {
    /// ID type (1 IPv4, 2 FQDN, 3 RFC822, 5 IPv6, 9 DER DN, 10 DER GN, 11 KEY ID).
    pub id_type: u8,
    /// Identification data.
    pub data: Vec<u8>,
}

impl Identification {
    /// The bytes the AUTH payload signs as `IDx'` (RFC 7296 §2.15): ID type, three
    /// reserved bytes, data.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.data.len());
        out.extend_from_slice(&[self.id_type, 0, 0, 0]);
        out.extend_from_slice(&self.data);
        out
    }
}

/// A notification (RFC 7296 §3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    /// Protocol the SPI belongs to (0 when there is none).
    pub protocol: u8,
    /// SPI (often empty).
    pub spi: Vec<u8>,
    /// Notify message type (< 16384 errors, from 16384 status).
    pub kind: u16,
    /// Notification data.
    pub data: Vec<u8>,
}

/// A traffic selector (RFC 7296 §3.13.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrafficSelector {
    /// TS_IPV4_ADDR_RANGE (7) or TS_IPV6_ADDR_RANGE (8).
    Range {
        /// IP protocol (0: any).
        protocol: u8,
        /// First port.
        start_port: u16,
        /// Last port.
        end_port: u16,
        /// First address.
        start: IpAddr,
        /// Last address (same family as `start`).
        end: IpAddr,
    },
    /// A type this codec does not interpret, kept as it came.
    Other {
        /// TS type.
        ts_type: u8,
        /// The selector after its 4-byte header.
        body: Vec<u8>,
    },
}

/// An encrypted payload: its body is IV, ciphertext and ICV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encrypted {
    /// Type of the first payload inside.
    pub first_inner: u8,
    /// IV, ciphertext (payloads, padding, pad length) and ICV.
    pub body: Vec<u8>,
}

/// One fragment of an encrypted message (RFC 7383 §2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// Type of the first payload inside (in fragment 1 only; zero in the others).
    pub first_inner: u8,
    /// Fragment number, from 1.
    pub number: u16,
    /// Number of fragments.
    pub total: u16,
    /// IV, ciphertext and ICV.
    pub body: Vec<u8>,
}

/// A payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Security Association: proposals.
    Sa(Vec<Proposal>),
    /// Key Exchange.
    Ke {
        /// Diffie-Hellman group.
        group: u16,
        /// Public value.
        data: Vec<u8>,
    },
    /// Identification of the initiator.
    IdI(Identification),
    /// Identification of the responder.
    IdR(Identification),
    /// Certificate.
    Cert {
        /// Encoding (4: X.509 certificate, signature).
        encoding: u8,
        /// Certificate data.
        data: Vec<u8>,
    },
    /// Certificate request.
    CertReq {
        /// Encoding.
        encoding: u8,
        /// Certification authority hashes.
        data: Vec<u8>,
    },
    /// Authentication.
    Auth {
        /// Method (2 shared key MIC, 9/10/11 ECDSA, 14 digital signature).
        method: u8,
        /// Authentication data.
        data: Vec<u8>,
    },
    /// Nonce.
    Nonce(Vec<u8>),
    /// Notify.
    Notify(Notify),
    /// Delete.
    Delete {
        /// Protocol (1 IKE, 3 ESP).
        protocol: u8,
        /// SPI size (0 for IKE, 4 for ESP).
        spi_size: u8,
        /// SPIs, each `spi_size` bytes.
        spis: Vec<Vec<u8>>,
    },
    /// Vendor ID.
    VendorId(Vec<u8>),
    /// Traffic selectors of the initiator.
    TsI(Vec<TrafficSelector>),
    /// Traffic selectors of the responder.
    TsR(Vec<TrafficSelector>),
    /// Encrypted and authenticated payloads (last in the chain).
    Sk(Encrypted),
    /// A fragment of them (last in the chain).
    Skf(Fragment),
    /// A payload type this codec does not know.
    Unknown {
        /// Payload type.
        kind: u8,
        /// Its critical bit (RFC 7296 §2.5: an unknown critical payload rejects the
        /// message).
        critical: bool,
        /// Body.
        body: Vec<u8>,
    },
}

impl Payload {
    /// The payload type.
    pub fn kind(&self) -> u8 {
        use payload_type as t;
        match self {
            Payload::Sa(_) => t::SA,
            Payload::Ke { .. } => t::KE,
            Payload::IdI(_) => t::IDI,
            Payload::IdR(_) => t::IDR,
            Payload::Cert { .. } => t::CERT,
            Payload::CertReq { .. } => t::CERTREQ,
            Payload::Auth { .. } => t::AUTH,
            Payload::Nonce(_) => t::NONCE,
            Payload::Notify(_) => t::NOTIFY,
            Payload::Delete { .. } => t::DELETE,
            Payload::VendorId(_) => t::VENDOR_ID,
            Payload::TsI(_) => t::TSI,
            Payload::TsR(_) => t::TSR,
            Payload::Sk(_) => t::SK,
            Payload::Skf(_) => t::SKF,
            Payload::Unknown { kind, .. } => *kind,
        }
    }
}

fn decode_proposals(body: &[u8]) -> Result<Vec<Proposal>> {
    let mut r = Reader::new(body, "SA payload");
    let mut proposals = Vec::new();
    loop {
        let last = r.u8()?;
        let _reserved = r.u8()?;
        let length = usize::from(r.u16()?);
        if length < 8 {
            return Err(WireError::Malformed("proposal length"));
        }
        let mut p = Reader::new(r.take(length - 4)?, "proposal");
        let number = p.u8()?;
        let protocol = p.u8()?;
        let spi_size = usize::from(p.u8()?);
        let count = p.u8()?;
        let spi = p.take(spi_size)?.to_vec();
        let mut transforms = Vec::with_capacity(usize::from(count));
        for i in 0..count {
            let t_last = p.u8()?;
            let _ = p.u8()?;
            let t_len = usize::from(p.u16()?);
            if t_len < 8 {
                return Err(WireError::Malformed("transform length"));
            }
            let want = if i + 1 == count { 0 } else { 3 };
            if t_last != want {
                return Err(WireError::Malformed("transform last/more flag"));
            }
            let mut t = Reader::new(p.take(t_len - 4)?, "transform");
            let kind = t.u8()?;
            let _ = t.u8()?;
            let id = t.u16()?;
            let mut attributes = Vec::new();
            while !t.is_empty() {
                let head = t.u16()?;
                let kind = head & 0x7fff;
                if head & 0x8000 != 0 {
                    attributes.push(Attribute::Short {
                        kind,
                        value: t.u16()?,
                    });
                } else {
                    let len = usize::from(t.u16()?);
                    attributes.push(Attribute::Long {
                        kind,
                        value: t.take(len)?.to_vec(),
                    });
                }
            }
            transforms.push(Transform {
                kind,
                id,
                attributes,
            });
        }
        if !p.is_empty() {
            return Err(WireError::Malformed("proposal: bytes after its transforms"));
        }
        proposals.push(Proposal {
            number,
            protocol,
            spi,
            transforms,
        });
        match last {
            0 if r.is_empty() => return Ok(proposals),
            2 if !r.is_empty() => {}
            _ => return Err(WireError::Malformed("proposal last/more flag")),
        }
    }
}

fn encode_proposals(proposals: &[Proposal], out: &mut Vec<u8>) -> Result<()> {
    if proposals.is_empty() {
        return Err(WireError::Malformed("SA payload without proposals"));
    }
    for (i, p) in proposals.iter().enumerate() {
        let start = out.len();
        out.push(if i + 1 == proposals.len() { 0 } else { 2 });
        out.push(0);
        put_u16(out, 0);
        out.push(p.number);
        out.push(p.protocol);
        out.push(u8::try_from(p.spi.len()).map_err(|_| WireError::Malformed("SPI size"))?);
        out.push(
            u8::try_from(p.transforms.len())
                .map_err(|_| WireError::Malformed("more than 255 transforms"))?,
        );
        out.extend_from_slice(&p.spi);
        for (j, t) in p.transforms.iter().enumerate() {
            let t_start = out.len();
            out.push(if j + 1 == p.transforms.len() { 0 } else { 3 });
            out.push(0);
            put_u16(out, 0);
            out.push(t.kind);
            out.push(0);
            put_u16(out, t.id);
            for a in &t.attributes {
                match a {
                    Attribute::Short { kind, value } => {
                        put_u16(out, 0x8000 | (kind & 0x7fff));
                        put_u16(out, *value);
                    }
                    Attribute::Long { kind, value } => {
                        put_u16(out, kind & 0x7fff);
                        put_u16(
                            out,
                            u16::try_from(value.len())
                                .map_err(|_| WireError::Malformed("attribute length"))?,
                        );
                        out.extend_from_slice(value);
                    }
                }
            }
            let len = out.len() - t_start;
            patch_len16(out, t_start + 2, len)?;
        }
        let len = out.len() - start;
        patch_len16(out, start + 2, len)?;
    }
    Ok(())
}

fn decode_selectors(body: &[u8]) -> Result<Vec<TrafficSelector>> {
    let mut r = Reader::new(body, "TS payload");
    let count = r.u8()?;
    let _ = r.take(3)?;
    let mut out = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let ts_type = r.u8()?;
        let protocol = r.u8()?;
        let len = usize::from(r.u16()?);
        if len < 4 {
            return Err(WireError::Malformed("traffic selector length"));
        }
        let mut s = Reader::new(r.take(len - 4)?, "traffic selector");
        let addr = |s: &mut Reader<'_>| -> Result<IpAddr> {
            Ok(match ts_type {
                7 => IpAddr::V4(Ipv4Addr::from(s.array::<4>()?)),
                _ => IpAddr::V6(Ipv6Addr::from(s.array::<16>()?)),
            })
        };
        match ts_type {
            7 | 8 => {
                let start_port = s.u16()?;
                let end_port = s.u16()?;
                let start = addr(&mut s)?;
                let end = addr(&mut s)?;
                if !s.is_empty() {
                    return Err(WireError::Malformed("traffic selector length"));
                }
                out.push(TrafficSelector::Range {
                    protocol,
                    start_port,
                    end_port,
                    start,
                    end,
                });
            }
            _ => out.push(TrafficSelector::Other {
                ts_type,
                body: {
                    let mut b = vec![protocol];
                    b.extend_from_slice(s.rest());
                    b
                },
            }),
        }
    }
    if !r.is_empty() {
        return Err(WireError::Malformed(
            "TS payload: bytes after its selectors",
        ));
    }
    Ok(out)
}

fn encode_selectors(selectors: &[TrafficSelector], out: &mut Vec<u8>) -> Result<()> {
    out.push(
        u8::try_from(selectors.len()).map_err(|_| WireError::Malformed("too many selectors"))?,
    );
    out.extend_from_slice(&[0, 0, 0]);
    for ts in selectors {
        match ts {
            TrafficSelector::Range {
                protocol,
                start_port,
                end_port,
                start,
                end,
            } => {
                let (ts_type, len) = match (start, end) {
                    (IpAddr::V4(_), IpAddr::V4(_)) => (7u8, 16u16),
                    (IpAddr::V6(_), IpAddr::V6(_)) => (8, 40),
                    _ => return Err(WireError::Malformed("traffic selector mixes families")),
                };
                out.push(ts_type);
                out.push(*protocol);
                put_u16(out, len);
                put_u16(out, *start_port);
                put_u16(out, *end_port);
                for a in [start, end] {
                    match a {
                        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
                        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
                    }
                }
            }
            TrafficSelector::Other { ts_type, body } => {
                let (protocol, rest) = body
                    .split_first()
                    .ok_or(WireError::Malformed("traffic selector"))?;
                out.push(*ts_type);
                out.push(*protocol);
                put_u16(
                    out,
                    u16::try_from(rest.len() + 4)
                        .map_err(|_| WireError::Malformed("traffic selector length"))?,
                );
                out.extend_from_slice(rest);
            }
        }
    }
    Ok(())
}

fn decode_body(kind: u8, critical: bool, first_inner: u8, body: &[u8]) -> Result<Payload> {
    use payload_type as t;
    let mut r = Reader::new(body, "payload");
    let payload = match kind {
        t::SA => Payload::Sa(decode_proposals(body)?),
        t::KE => {
            let group = r.u16()?;
            let _ = r.u16()?;
            Payload::Ke {
                group,
                data: r.rest().to_vec(),
            }
        }
        t::IDI | t::IDR => {
            let id_type = r.u8()?;
            let _ = r.take(3)?;
            let id = Identification {
                id_type,
                data: r.rest().to_vec(),
            };
            if kind == t::IDI {
                Payload::IdI(id)
            } else {
                Payload::IdR(id)
            }
        }
        t::CERT | t::CERTREQ => {
            let encoding = r.u8()?;
            let data = r.rest().to_vec();
            if kind == t::CERT {
                Payload::Cert { encoding, data }
            } else {
                Payload::CertReq { encoding, data }
            }
        }
        t::AUTH => {
            let method = r.u8()?;
            let _ = r.take(3)?;
            Payload::Auth {
                method,
                data: r.rest().to_vec(),
            }
        }
        t::NONCE => Payload::Nonce(body.to_vec()),
        t::NOTIFY => {
            let protocol = r.u8()?;
            let spi_size = usize::from(r.u8()?);
            let kind = r.u16()?;
            let spi = r.take(spi_size)?.to_vec();
            Payload::Notify(Notify {
                protocol,
                spi,
                kind,
                data: r.rest().to_vec(),
            })
        }
        t::DELETE => {
            let protocol = r.u8()?;
            let spi_size = r.u8()?;
            let count = r.u16()?;
            // The SPIs must fill the payload exactly: a count is never taken on trust
            // (65,535 empty SPIs in 8 bytes, many times over, would be gigabytes).
            let size = usize::from(count) * usize::from(spi_size);
            if size != r.rest_len() || (spi_size == 0 && count != 0) {
                return Err(WireError::Malformed(
                    "delete payload: its SPI count and size do not fill it",
                ));
            }
            let mut spis = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                spis.push(r.take(usize::from(spi_size))?.to_vec());
            }
            if !r.is_empty() {
                return Err(WireError::Malformed("delete payload: bytes after its SPIs"));
            }
            Payload::Delete {
                protocol,
                spi_size,
                spis,
            }
        }
        t::VENDOR_ID => Payload::VendorId(body.to_vec()),
        t::TSI => Payload::TsI(decode_selectors(body)?),
        t::TSR => Payload::TsR(decode_selectors(body)?),
        t::SK => Payload::Sk(Encrypted {
            first_inner,
            body: body.to_vec(),
        }),
        t::SKF => {
            let number = r.u16()?;
            let total = r.u16()?;
            if number == 0 || number > total {
                return Err(WireError::Malformed("fragment number"));
            }
            Payload::Skf(Fragment {
                first_inner,
                number,
                total,
                body: r.rest().to_vec(),
            })
        }
        kind => Payload::Unknown {
            kind,
            critical,
            body: body.to_vec(),
        },
    };
    Ok(payload)
}

/// Decodes a chain of payloads starting with type `first` that fills `bytes` exactly (the
/// payloads after the IKE header, or those inside an opened SK payload). An SK or SKF
/// payload ends the chain.
pub fn decode_payloads(first: u8, bytes: &[u8]) -> Result<Vec<Payload>> {
    let mut r = Reader::new(bytes, "payload chain");
    let mut next = first;
    let mut out = Vec::new();
    while next != payload_type::NONE {
        let kind = next;
        next = r.u8()?;
        let flags = r.u8()?;
        let length = usize::from(r.u16()?);
        if length < GENERIC_HEADER_LEN {
            return Err(WireError::Malformed("payload length"));
        }
        let body = r.take(length - GENERIC_HEADER_LEN)?;
        let payload = decode_body(kind, flags & 0x80 != 0, next, body)?;
        let ends = matches!(payload, Payload::Sk(_) | Payload::Skf(_));
        out.push(payload);
        if ends {
            next = payload_type::NONE;
        }
    }
    if !r.is_empty() {
        return Err(WireError::Malformed("bytes after the last payload"));
    }
    Ok(out)
}

/// Encodes a chain of payloads; returns the type of the first (0 for none). An SK or SKF
/// payload must be the last.
pub fn encode_payloads(payloads: &[Payload], out: &mut Vec<u8>) -> Result<u8> {
    for (i, p) in payloads.iter().enumerate() {
        let next = match (p, payloads.get(i + 1)) {
            (Payload::Sk(e), None) => e.first_inner,
            (Payload::Skf(f), None) => f.first_inner,
            (Payload::Sk(_) | Payload::Skf(_), Some(_)) => {
                return Err(WireError::Malformed("payloads after an encrypted payload"))
            }
            (_, Some(n)) => n.kind(),
            (_, None) => payload_type::NONE,
        };
        let start = out.len();
        out.push(next);
        out.push(match p {
            Payload::Unknown { critical: true, .. } => 0x80,
            _ => 0,
        });
        put_u16(out, 0);
        encode_body(p, out)?;
        let len = out.len() - start;
        patch_len16(out, start + 2, len)?;
    }
    Ok(payloads.first().map_or(payload_type::NONE, Payload::kind))
}

fn encode_body(p: &Payload, out: &mut Vec<u8>) -> Result<()> {
    match p {
        Payload::Sa(proposals) => encode_proposals(proposals, out)?,
        Payload::Ke { group, data } => {
            put_u16(out, *group);
            put_u16(out, 0);
            out.extend_from_slice(data);
        }
        Payload::IdI(id) | Payload::IdR(id) => out.extend_from_slice(&id.body()),
        Payload::Cert { encoding, data } | Payload::CertReq { encoding, data } => {
            out.push(*encoding);
            out.extend_from_slice(data);
        }
        Payload::Auth { method, data } => {
            out.extend_from_slice(&[*method, 0, 0, 0]);
            out.extend_from_slice(data);
        }
        Payload::Nonce(data) | Payload::VendorId(data) => out.extend_from_slice(data),
        Payload::Notify(n) => {
            out.push(n.protocol);
            out.push(u8::try_from(n.spi.len()).map_err(|_| WireError::Malformed("SPI size"))?);
            put_u16(out, n.kind);
            out.extend_from_slice(&n.spi);
            out.extend_from_slice(&n.data);
        }
        Payload::Delete {
            protocol,
            spi_size,
            spis,
        } => {
            out.push(*protocol);
            out.push(*spi_size);
            put_u16(
                out,
                u16::try_from(spis.len()).map_err(|_| WireError::Malformed("too many SPIs"))?,
            );
            for spi in spis {
                if spi.len() != usize::from(*spi_size) {
                    return Err(WireError::Malformed("delete payload: SPI size"));
                }
                out.extend_from_slice(spi);
            }
        }
        Payload::TsI(ts) | Payload::TsR(ts) => encode_selectors(ts, out)?,
        Payload::Sk(e) => out.extend_from_slice(&e.body),
        Payload::Skf(f) => {
            put_u16(out, f.number);
            put_u16(out, f.total);
            out.extend_from_slice(&f.body);
        }
        Payload::Unknown { body, .. } => out.extend_from_slice(body),
    }
    Ok(())
}

/// An IKE message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The header (`next_payload` and `length` are recomputed by [`Message::encode`]).
    pub header: Header,
    /// The payloads, in order.
    pub payloads: Vec<Payload>,
}

impl Message {
    /// Decodes a datagram (the non-ESP marker already removed).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let header = Header::decode(bytes)?;
        let payloads = decode_payloads(header.next_payload, &bytes[HEADER_LEN..])?;
        Ok(Self { header, payloads })
    }

    /// Encodes the message.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        let first = encode_payloads(&self.payloads, &mut body)?;
        let mut header = self.header;
        header.next_payload = first;
        header.length = u32::try_from(HEADER_LEN + body.len())
            .map_err(|_| WireError::Malformed("message too long"))?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        header.encode(&mut out);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The first notification of type `kind`.
    pub fn notify(&self, kind: u16) -> Option<&Notify> {
        notify_in(&self.payloads, kind)
    }
}

/// The first notification of type `kind` among `payloads`.
pub fn notify_in(payloads: &[Payload], kind: u16) -> Option<&Notify> {
    payloads.iter().find_map(|p| match p {
        Payload::Notify(n) if n.kind == kind => Some(n),
        _ => None,
    })
}

/// Where the encrypted payload of a message is: what its AEAD authenticates but does
/// not encrypt (`aad`: header through the SK/SKF payload header) and its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptedView<'a> {
    /// The message's header.
    pub header: Header,
    /// Header and every byte up to the encrypted body (RFC 5282 §5.1).
    pub aad: &'a [u8],
    /// IV, ciphertext and ICV.
    pub body: &'a [u8],
    /// Type of the first payload inside.
    pub first_inner: u8,
    /// For a fragment: (number, total).
    pub fragment: Option<(u16, u16)>,
}

/// Finds the SK or SKF payload of a message (it must be the last payload).
pub fn encrypted_view(bytes: &[u8]) -> Result<EncryptedView<'_>> {
    let header = Header::decode(bytes)?;
    let mut at = HEADER_LEN;
    let mut kind = header.next_payload;
    loop {
        let mut r = Reader::new(bytes.get(at..).unwrap_or_default(), "payload chain");
        let next = r.u8()?;
        let _ = r.u8()?;
        let length = usize::from(r.u16()?);
        if length < GENERIC_HEADER_LEN {
            return Err(WireError::Malformed("payload length"));
        }
        r.take(length - GENERIC_HEADER_LEN)?;
        let end = at + length;
        match kind {
            payload_type::SK | payload_type::SKF => {
                if end != bytes.len() {
                    return Err(WireError::Malformed("bytes after the encrypted payload"));
                }
                let (body_at, fragment) = if kind == payload_type::SKF {
                    let mut f = Reader::new(&bytes[at + 4..end], "fragment header");
                    let number = f.u16()?;
                    let total = f.u16()?;
                    if number == 0 || number > total {
                        return Err(WireError::Malformed("fragment number"));
                    }
                    (at + 8, Some((number, total)))
                } else {
                    (at + 4, None)
                };
                return Ok(EncryptedView {
                    header,
                    aad: &bytes[..body_at],
                    body: &bytes[body_at..end],
                    first_inner: next,
                    fragment,
                });
            }
            payload_type::NONE => return Err(WireError::Malformed("no encrypted payload")),
            _ => {}
        }
        if next == payload_type::NONE {
            return Err(WireError::Malformed("no encrypted payload"));
        }
        kind = next;
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            header: Header {
                spi_i: [1; 8],
                spi_r: [0; 8],
                next_payload: 0,
                version: IKE_VERSION,
                exchange: exchange::IKE_SA_INIT,
                flags: flags::INITIATOR,
                message_id: 0,
                length: 0,
            },
            payloads: vec![
                Payload::Sa(vec![Proposal {
                    number: 1,
                    protocol: 1,
                    spi: Vec::new(),
                    transforms: vec![
                        Transform::with_key_length(1, 20, 256),
                        Transform::new(2, 5),
                        Transform::new(4, 31),
                    ],
                }]),
                Payload::Ke {
                    group: 31,
                    data: vec![7; 32],
                },
                Payload::Nonce(vec![9; 32]),
                Payload::Notify(Notify {
                    protocol: 0,
                    spi: Vec::new(),
                    kind: 16430,
                    data: Vec::new(),
                }),
                Payload::TsI(vec![TrafficSelector::Range {
                    protocol: 0,
                    start_port: 0,
                    end_port: 65535,
                    start: "100.64.1.0".parse().expect("address"),
                    end: "100.64.1.255".parse().expect("address"),
                }]),
                Payload::Delete {
                    protocol: 3,
                    spi_size: 4,
                    spis: vec![vec![1, 2, 3, 4]],
                },
                Payload::Unknown {
                    kind: 200,
                    critical: true,
                    body: vec![1, 2],
                },
            ],
        }
    }

    #[test]
    fn a_message_round_trips() {
        let m = sample();
        let bytes = m.encode().unwrap();
        let back = Message::decode(&bytes).unwrap();
        assert_eq!(back.payloads, m.payloads);
        assert_eq!(back.header.length as usize, bytes.len());
        assert_eq!(back.encode().unwrap(), bytes);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(Message::decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
        // Every single-byte change either decodes or is refused; none panics, and what
        // decodes encodes again.
        let mut seed = 0x9e37_79b9_u32;
        for i in 0..bytes.len() {
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let mut b = bytes.clone();
                b[i] = (seed & 0xff) as u8;
                if let Ok(m) = Message::decode(&b) {
                    let _ = m.encode();
                }
                let _ = encrypted_view(&b);
            }
        }
    }

    /// Found by review: a DELETE payload claiming 65,535 SPIs of size 0 took 8 bytes and
    /// allocated a vector of 65,535; a datagram full of them, gigabytes.
    #[test]
    fn a_delete_payload_is_filled_exactly_by_its_spis() {
        let decode = |body: &[u8]| {
            decode_payloads(payload_type::DELETE, &{
                let mut p = vec![0, 0];
                p.extend_from_slice(&((4 + body.len()) as u16).to_be_bytes());
                p.extend_from_slice(body);
                p
            })
        };
        assert!(decode(&[1, 0, 0xff, 0xff]).is_err());
        assert!(decode(&[3, 4, 0, 2, 1, 2, 3, 4]).is_err(), "one SPI short");
        assert!(decode(&[3, 4, 0, 1, 1, 2, 3, 4]).is_ok());
        assert!(decode(&[1, 0, 0, 0]).is_ok(), "the IKE SA's own delete");
    }

    #[test]
    fn lengths_that_lie_are_refused() {
        let mut bytes = sample().encode().unwrap();
        // Header length larger than the datagram.
        bytes[27] += 1;
        assert!(matches!(
            Message::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
        bytes[27] -= 1;
        // First payload (SA) claims more than is there.
        bytes[HEADER_LEN + 2] = 0xff;
        assert!(Message::decode(&bytes).is_err());
        // Version 1.
        let mut v1 = sample().encode().unwrap();
        v1[17] = 0x10;
        assert_eq!(Message::decode(&v1), Err(WireError::Version(1)));
    }

    #[test]
    fn an_encrypted_payload_ends_the_chain() {
        let m = Message {
            header: sample().header,
            payloads: vec![Payload::Sk(Encrypted {
                first_inner: payload_type::IDI,
                body: vec![5; 40],
            })],
        };
        let bytes = m.encode().unwrap();
        let view = encrypted_view(&bytes).unwrap();
        assert_eq!(view.aad.len(), HEADER_LEN + 4);
        assert_eq!(view.body, &[5; 40][..]);
        assert_eq!(view.first_inner, payload_type::IDI);
        assert_eq!(
            Message::decode(&bytes).unwrap(),
            Message {
                header: Header {
                    next_payload: payload_type::SK,
                    length: bytes.len() as u32,
                    ..m.header
                },
                payloads: m.payloads.clone()
            }
        );
        let bad = Message {
            header: m.header,
            payloads: vec![m.payloads[0].clone(), Payload::Nonce(vec![1; 16])],
        };
        assert!(bad.encode().is_err());
    }
}
