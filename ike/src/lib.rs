//! IKEv2 for Isthmus: the parts that talk to standard IPsec peers (strongSwan, firewalls).
//!
//! Sans-IO: bytes in, bytes and values out; no sockets, no clocks, no threads.
//!
//! - [`wire`]: the message codec (RFC 7296 §3): header, every payload an initiator or
//!   responder of a site-to-site tunnel meets, encrypted (SK, RFC 7296 §3.14) and
//!   fragmented (SKF, RFC 7383) payloads. Decoding never panics and checks every length;
//!   encoding is the exact inverse for what decoding accepts.
//! - [`crypto`]: PRF HMAC-SHA2-256 and prf+, the IKE SA key schedule (SKEYSEED, SK_*,
//!   §2.14), the IKE SA rekey (§2.18), CHILD_SA KEYMAT (§2.17, salt per RFC 4106 §8.1),
//!   AES-GCM-16 for SK payloads (RFC 5282), Diffie-Hellman groups 19, 20 and 31, and the
//!   pre-shared-key AUTH (§2.15).
//! - [`sa`]: an IKE SA as initiator (IKE_SA_INIT with COOKIE and INVALID_KE_PAYLOAD
//!   retries) or as responder (proposal picked, INVALID_KE_PAYLOAD for another group,
//!   traffic selectors narrowed to ours), IKE_AUTH with a pre-shared key and the first
//!   CHILD_SA (ESP keys), then liveness checks and deletes from the peer.
//!
//! `tests/exchange.rs` runs an initiator against a responder in memory, with a seeded
//! run of mutated datagrams (also `fuzz/`, a cargo-fuzz target); the e2e suite runs both
//! against a real strongSwan charon.
//!
//! Known-answer tests in `tests/strongswan.rs` check all of it against the datagrams and
//! keys of real strongSwan 5.9.8 exchanges (`tests/data/`, made with
//! `tests/data/make-vectors.py` from a run of the IKEv2 lab).

#![forbid(unsafe_code)]

pub mod crypto;
pub mod sa;
pub mod wire;
