//! The framed message protocol spoken inside the TLS session (sans-IO).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON (one
//! [`Frame`]). Frames longer than [`MAX_FRAME_LEN`] are refused before any of the body is
//! buffered; a malformed frame is an error, never a panic.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::link::LinkParams;

/// Largest frame body accepted or sent, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Version of the frame protocol carried in [`Frame::Hello`]. Version 2 added the link
/// parameters ([`Frame::Hello::link`]).
pub const PROTOCOL_VERSION: u16 = 2;

/// The tunnel parameters a gateway announces to a peer over the channel.
///
/// Everything here is public information: the WireGuard *public* key, endpoints, the SPI
/// the sender expects inbound ESP packets to carry, and the MTU. ESP keys are never sent:
/// both sides derive them from the TLS exporter (see [`EspKeyBlock`](super::EspKeyBlock)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelParams {
    /// The sender's WireGuard static public key, if it offers WireGuard.
    pub wireguard_public_key: Option<[u8; 32]>,
    /// Where the sender receives WireGuard datagrams.
    pub wireguard_endpoint: Option<SocketAddr>,
    /// Where the sender receives ESP-in-UDP datagrams.
    pub esp_endpoint: Option<SocketAddr>,
    /// The SPI the sender will accept inbound ESP packets on.
    pub esp_inbound_spi: Option<u32>,
    /// The sender's tunnel MTU.
    pub mtu: u16,
    /// The epoch of `wireguard_public_key` and the sender's earlier WireGuard keys that
    /// it still accepts. Absent from senders that cannot rotate their key (they never
    /// send a [`ControlMessage::ParamsAck`]).
    #[serde(default)]
    pub wireguard_keys: Option<WireguardKeys>,
}

impl TunnelParams {
    /// Parameters offering no tunnel (a TLS service of the gateway other than the peer
    /// channel, e.g. remote administration).
    pub fn without_tunnels(mtu: u16) -> Self {
        Self {
            wireguard_public_key: None,
            wireguard_endpoint: None,
            esp_endpoint: None,
            esp_inbound_spi: None,
            mtu,
            wireguard_keys: None,
        }
    }
}

/// Where a gateway stands in rotating its WireGuard static key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardKeys {
    /// Counts the sender's keys: each new key has a higher epoch.
    pub epoch: u64,
    /// Earlier keys still accepted (newest first); sessions under them keep working.
    pub previous: Vec<[u8; 32]>,
    /// In a [`ControlMessage::Params`]: proof that the sender holds the newest key's
    /// private half, HMAC-SHA256 keyed by the X25519 of that key and the receiver's
    /// newest key, over the session's
    /// [`PeerSession::wireguard_key_context`](super::PeerSession::wireguard_key_context)
    /// for `epoch` and the public key.
    #[serde(default)]
    pub proof: Option<[u8; 32]>,
}

/// Messages the application exchanges over an established session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ControlMessage {
    /// The sender's tunnel parameters changed (e.g. a new WireGuard key or endpoint). A
    /// receiver that applied a new [`TunnelParams::wireguard_keys`] epoch answers with
    /// [`ControlMessage::ParamsAck`].
    Params(TunnelParams),
    /// The receiver of a [`ControlMessage::Params`] now accepts (and initiates toward)
    /// the sender's WireGuard key of this epoch.
    ParamsAck {
        /// The acknowledged key epoch.
        wireguard_key_epoch: u64,
    },
    /// The sender asks to move to ESP keys of this generation (derive them with
    /// [`PeerSession::esp_keys`](super::PeerSession::esp_keys)).
    Rekey {
        /// The new key generation.
        generation: u64,
    },
    /// The sender has installed inbound keys of this generation.
    RekeyAck {
        /// The acknowledged generation.
        generation: u64,
    },
}

/// Everything that travels in a frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Frame {
    /// First frame from each side once TLS is up.
    Hello {
        /// [`PROTOCOL_VERSION`] of the sender.
        version: u16,
        /// The sender's tunnel parameters.
        params: TunnelParams,
        /// The link the sender is configured with for the receiving peer (tunnel kind,
        /// ESP cipher, ESN). Absent only in version-1 hellos, which are refused for their
        /// version.
        #[serde(default)]
        link: Option<LinkParams>,
    },
    /// Liveness probe.
    Ping {
        /// Echoed in the [`Frame::Pong`].
        seq: u64,
    },
    /// Liveness answer.
    Pong {
        /// The probe's sequence number.
        seq: u64,
    },
    /// An application message.
    Control(ControlMessage),
    /// The sender is closing the session.
    Close {
        /// Why, for the peer's logs.
        reason: String,
    },
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced (or encoded) length exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge {
        /// The length.
        len: usize,
    },
    /// The body is not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// A peer-supplied text made safe for logs: control characters dropped, at most 200
/// characters.
pub(crate) fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// Encodes one frame (length prefix + JSON body).
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge { len: body.len() })?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reassembles frames from a byte stream.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the
    /// stream is unusable (the session must be closed).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(header) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge { len });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let result = serde_json::from_slice::<Frame>(&self.buf[4..4 + len])
            .map_err(|e| FrameError::Malformed(e.to_string()));
        self.buf.drain(..4 + len);
        result.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> TunnelParams {
        TunnelParams {
            wireguard_public_key: Some([7; 32]),
            wireguard_endpoint: Some("192.0.2.1:51820".parse().unwrap()),
            esp_endpoint: Some("[2001:db8::1]:4500".parse().unwrap()),
            esp_inbound_spi: Some(0x1000_0001),
            mtu: 1420,
            wireguard_keys: None,
        }
    }

    #[test]
    fn frames_round_trip_byte_by_byte() {
        let frames = vec![
            Frame::Hello {
                version: PROTOCOL_VERSION,
                params: params(),
                link: Some(LinkParams::Esp {
                    cipher: super::super::link::EspCipher::Aes256Gcm,
                    esn: true,
                }),
            },
            Frame::Ping { seq: 1 },
            Frame::Pong { seq: u64::MAX },
            Frame::Control(ControlMessage::Rekey { generation: 3 }),
            Frame::Control(ControlMessage::RekeyAck { generation: 3 }),
            Frame::Control(ControlMessage::Params(params())),
            Frame::Close {
                reason: "bye".into(),
            },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(encode_frame(f).unwrap());
        }
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
    }

    #[test]
    fn version_1_hello_still_decodes_so_its_version_can_be_refused() {
        let body = br#"{"Hello":{"version":1,"params":{"wireguard_public_key":null,"wireguard_endpoint":null,"esp_endpoint":null,"esp_inbound_spi":null,"mtu":1420}}}"#;
        let mut dec = FrameDecoder::new();
        dec.push(&(body.len() as u32).to_be_bytes());
        dec.push(body);
        assert!(matches!(
            dec.next_frame(),
            Ok(Some(Frame::Hello {
                version: 1,
                link: None,
                ..
            }))
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new();
        dec.push(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes());
        assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge { .. })));
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_be_bytes());
        assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let bodies: &[&[u8]] = &[
            b"",
            b"{",
            b"null",
            b"\"Ping\"",
            b"{\"Ping\":{\"seq\":-1}}",
            b"{\"Unknown\":{}}",
            b"{\"Hello\":{\"version\":1,\"params\":{\"mtu\":70000}}}",
            b"{\"Hello\":{\"version\":1,\"params\":{\"mtu\":1,\"wireguard_public_key\":[1,2]}}}",
            &[0xff, 0xfe, 0x00],
        ];
        for body in bodies {
            let mut dec = FrameDecoder::new();
            dec.push(&(body.len() as u32).to_be_bytes());
            dec.push(body);
            assert!(
                matches!(dec.next_frame(), Err(FrameError::Malformed(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator: the decoder must only ever return.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2000 {
            let mut dec = FrameDecoder::new();
            let len = (state % 64) as usize;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            // Bias towards plausible small lengths.
            if len >= 4 && state.is_multiple_of(2) {
                bytes[..4].copy_from_slice(&((len - 4) as u32).to_be_bytes());
            }
            dec.push(&bytes);
            while let Ok(Some(_)) = dec.next_frame() {}
        }
    }
}
