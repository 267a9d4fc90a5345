//! IKEv2 cryptography: PRF, key schedule, the SK payload AEAD, Diffie-Hellman and AUTH.
//!
//! One suite, the one Isthmus proposes and strongSwan, cloud VPNs and firewalls accept:
//! PRF_HMAC_SHA2_256 (RFC 4868), ENCR_AES_GCM_16 with 128- or 256-bit keys (RFC 5282; no
//! separate integrity key), Diffie-Hellman groups 19, 20 (RFC 5903) and 31 (RFC 8031).
//! Every secret is held in [`Zeroizing`] buffers and no `Debug` output shows one.

use ring::{aead, agreement, hmac};
use zeroize::Zeroizing;

use crate::wire::{self, Header, WireError, GENERIC_HEADER_LEN, HEADER_LEN};

/// Transform ID of PRF_HMAC_SHA2_256.
pub const PRF_HMAC_SHA2_256: u16 = 5;
/// Transform ID of ENCR_AES_GCM_16.
pub const ENCR_AES_GCM_16: u16 = 20;
/// Output length of the PRF.
pub const PRF_LEN: usize = 32;
/// Length of the explicit IV of an SK payload (RFC 5282 §3.1).
pub const IV_LEN: usize = 8;
/// Length of the integrity check value (AES-GCM-16).
pub const ICV_LEN: usize = 16;
/// Length of the salt at the end of each AES-GCM key (RFC 5282 §7.1, RFC 4106 §8.1).
pub const SALT_LEN: usize = 4;

/// Why a cryptographic step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The encrypted payload does not authenticate: wrong key, or altered in transit.
    #[error("the encrypted payload does not authenticate (wrong key, or altered in transit)")]
    Integrity,
    /// The encrypted payload's plaintext is not IV, payloads, padding and pad length.
    #[error("malformed encrypted payload: {0}")]
    Malformed(&'static str),
    /// A Diffie-Hellman group this implementation does not offer.
    #[error("unsupported Diffie-Hellman group {0} (19, 20 and 31 are supported)")]
    UnsupportedGroup(u16),
    /// A peer's public value that is not a valid point of its group.
    #[error("invalid Diffie-Hellman public value for group {0}")]
    BadPublicValue(u16),
    /// An AES-GCM key of a length other than 16 or 32 bytes (plus the salt).
    #[error("AES-GCM key material of {0} bytes (20 or 36 expected)")]
    KeyLength(usize),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The message around the encrypted payload.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// PRF_HMAC_SHA2_256 (RFC 4868): `prf(key, data)`.
pub fn prf(key: &[u8], data: &[u8]) -> [u8; PRF_LEN] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    let mut out = [0u8; PRF_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// `prf+(key, seed)` truncated to `len` bytes (RFC 7296 §2.13): T1 | T2 | ... with
/// `Tn = prf(key, Tn-1 | seed | n)`. At most 255 blocks.
pub fn prf_plus(key: &[u8], seed: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = Zeroizing::new(Vec::with_capacity(len + PRF_LEN));
    let mut previous: Option<hmac::Tag> = None;
    let mut counter = 1u8;
    while out.len() < len {
        let mut ctx = hmac::Context::with_key(&key);
        if let Some(t) = &previous {
            ctx.update(t.as_ref());
        }
        ctx.update(seed);
        ctx.update(&[counter]);
        let t = ctx.sign();
        out.extend_from_slice(t.as_ref());
        previous = Some(t);
        // RFC 7296 §2.13: the counter never wraps; 255 blocks are far more than any
        // key set here needs (the largest is 2 × (32 + 4) + 3 × 32 = 168 bytes).
        counter = counter.saturating_add(1);
    }
    out.truncate(len);
    out
}

/// The keys of an IKE SA (RFC 7296 §2.14); with AES-GCM there is no SK_a, and each
/// SK_e is the cipher key followed by a 4-byte salt.
pub struct IkeKeys {
    /// SKEYSEED itself (kept for checks and logs of known-answer tests only).
    pub skeyseed: Zeroizing<Vec<u8>>,
    /// Derives CHILD_SA keys and the next IKE SA's.
    pub sk_d: Zeroizing<Vec<u8>>,
    /// Protects the initiator's messages.
    pub sk_ei: Zeroizing<Vec<u8>>,
    /// Protects the responder's messages.
    pub sk_er: Zeroizing<Vec<u8>>,
    /// Keys the initiator's AUTH over its identity.
    pub sk_pi: Zeroizing<Vec<u8>>,
    /// Keys the responder's AUTH over its identity.
    pub sk_pr: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for IkeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IkeKeys(<redacted>)")
    }
}

impl IkeKeys {
    /// The keys of a new IKE SA: SKEYSEED = prf(Ni | Nr, g^ir), then
    /// prf+(SKEYSEED, Ni | Nr | SPIi | SPIr). `enc_key_len`: 16 or 32 (AES-GCM key bytes).
    pub fn derive(
        ni: &[u8],
        nr: &[u8],
        g_ir: &[u8],
        spi_i: &[u8; 8],
        spi_r: &[u8; 8],
        enc_key_len: usize,
    ) -> Self {
        let nonces = [ni, nr].concat();
        let skeyseed = Zeroizing::new(prf(&nonces, g_ir));
        Self::split(&skeyseed, &nonces, spi_i, spi_r, enc_key_len)
    }

    /// The keys of the IKE SA that replaces one (RFC 7296 §2.18): SKEYSEED =
    /// prf(SK_d(old), g^ir(new) | Ni | Nr), with the new exchange's nonces and SPIs.
    pub fn derive_rekey(
        old_sk_d: &[u8],
        g_ir: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: &[u8; 8],
        spi_r: &[u8; 8],
        enc_key_len: usize,
    ) -> Self {
        // The seed holds g^ir: wiped, as the result is.
        let seed = Zeroizing::new([g_ir, ni, nr].concat());
        let skeyseed = Zeroizing::new(prf(old_sk_d, &seed));
        Self::split(&skeyseed, &[ni, nr].concat(), spi_i, spi_r, enc_key_len)
    }

    fn split(
        skeyseed: &[u8; PRF_LEN],
        nonces: &[u8],
        spi_i: &[u8; 8],
        spi_r: &[u8; 8],
        enc_key_len: usize,
    ) -> Self {
        let e = enc_key_len + SALT_LEN;
        let seed = [nonces, spi_i, spi_r].concat();
        let km = prf_plus(skeyseed, &seed, 3 * PRF_LEN + 2 * e);
        let part = |from: usize, len: usize| Zeroizing::new(km[from..from + len].to_vec());
        Self {
            skeyseed: Zeroizing::new(skeyseed.to_vec()),
            sk_d: part(0, PRF_LEN),
            sk_ei: part(PRF_LEN, e),
            sk_er: part(PRF_LEN + e, e),
            sk_pi: part(PRF_LEN + 2 * e, PRF_LEN),
            sk_pr: part(2 * PRF_LEN + 2 * e, PRF_LEN),
        }
    }
}

/// The ESP keys of a CHILD_SA (RFC 7296 §2.17): KEYMAT = prf+(SK_d, [g^ir(new) |] Ni |
/// Nr); the initiator-to-responder key and salt first, then the other direction. Each is
/// `enc_key_len` key bytes followed by the 4-byte salt (RFC 4106 §8.1).
pub fn child_keymat(
    sk_d: &[u8],
    g_ir: Option<&[u8]>,
    ni: &[u8],
    nr: &[u8],
    enc_key_len: usize,
) -> (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>) {
    let e = enc_key_len + SALT_LEN;
    let seed = Zeroizing::new([g_ir.unwrap_or_default(), ni, nr].concat());
    let km = prf_plus(sk_d, &seed, 2 * e);
    (
        Zeroizing::new(km[..e].to_vec()),
        Zeroizing::new(km[e..].to_vec()),
    )
}

/// AES-GCM-16 for SK and SKF payloads, one direction of an IKE SA (RFC 5282).
pub struct SkCipher {
    key: aead::LessSafeKey,
    salt: [u8; SALT_LEN],
}

impl std::fmt::Debug for SkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SkCipher(<redacted>)")
    }
}

/// An opened encrypted payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The message's header.
    pub header: Header,
    /// Type of the first payload inside.
    pub first_inner: u8,
    /// For a fragment: (number, total).
    pub fragment: Option<(u16, u16)>,
    /// The inner payloads' bytes (decode with [`wire::decode_payloads`]).
    pub payloads: Vec<u8>,
    /// The sender's padding (any value; only its length matters).
    pub padding: Vec<u8>,
}

impl SkCipher {
    /// A cipher from SK_ei or SK_er: a 16- or 32-byte AES key, then the 4-byte salt.
    pub fn new(key_and_salt: &[u8]) -> Result<Self, CryptoError> {
        let alg = match key_and_salt.len() {
            20 => &aead::AES_128_GCM,
            36 => &aead::AES_256_GCM,
            n => return Err(CryptoError::KeyLength(n)),
        };
        let (key, salt) = key_and_salt.split_at(key_and_salt.len() - SALT_LEN);
        let key = aead::UnboundKey::new(alg, key).map_err(|_| CryptoError::KeyLength(key.len()))?;
        let mut s = [0u8; SALT_LEN];
        s.copy_from_slice(salt);
        Ok(Self {
            key: aead::LessSafeKey::new(key),
            salt: s,
        })
    }

    fn nonce(&self, iv: &[u8]) -> Result<aead::Nonce, CryptoError> {
        let mut n = [0u8; aead::NONCE_LEN];
        n[..SALT_LEN].copy_from_slice(&self.salt);
        n[SALT_LEN..].copy_from_slice(iv);
        Ok(aead::Nonce::assume_unique_for_key(n))
    }

    /// Authenticates and decrypts the SK or SKF payload of `message`.
    pub fn open(&self, message: &[u8]) -> Result<Opened, CryptoError> {
        let view = wire::encrypted_view(message)?;
        if view.body.len() < IV_LEN + 1 + ICV_LEN {
            return Err(CryptoError::Malformed(
                "shorter than IV, pad length and ICV",
            ));
        }
        let (iv, sealed) = view.body.split_at(IV_LEN);
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(self.nonce(iv)?, aead::Aad::from(view.aad), &mut buf)
            .map_err(|_| CryptoError::Integrity)?;
        let (&pad_len, rest) = plain
            .split_last()
            .ok_or(CryptoError::Malformed("no pad length"))?;
        let pad_len = usize::from(pad_len);
        if pad_len > rest.len() {
            return Err(CryptoError::Malformed(
                "pad length longer than the plaintext",
            ));
        }
        let (payloads, padding) = rest.split_at(rest.len() - pad_len);
        Ok(Opened {
            header: view.header,
            first_inner: view.first_inner,
            fragment: view.fragment,
            payloads: payloads.to_vec(),
            padding: padding.to_vec(),
        })
    }

    /// Builds a message whose only payload is an SK payload (or, with `fragment`, an
    /// SKF payload) holding `payloads` (encoded, first type `first_inner`), `padding` and
    /// its length, under `iv` (never reuse one with a key: take a counter). The header's
    /// `next_payload` and `length` are set here.
    pub fn seal(
        &self,
        header: Header,
        first_inner: u8,
        fragment: Option<(u16, u16)>,
        payloads: &[u8],
        padding: &[u8],
        iv: [u8; IV_LEN],
    ) -> Result<Vec<u8>, CryptoError> {
        let pad_len = u8::try_from(padding.len()).map_err(|_| CryptoError::Malformed("padding"))?;
        let sk_header = GENERIC_HEADER_LEN + if fragment.is_some() { 4 } else { 0 };
        let plain_len = payloads.len() + padding.len() + 1;
        let payload_len = sk_header + IV_LEN + plain_len + ICV_LEN;
        let mut header = header;
        header.next_payload = if fragment.is_some() {
            wire::payload_type::SKF
        } else {
            wire::payload_type::SK
        };
        header.length = u32::try_from(HEADER_LEN + payload_len)
            .map_err(|_| CryptoError::Malformed("message too long"))?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
        header.encode(&mut out);
        out.push(first_inner);
        out.push(0);
        out.extend_from_slice(
            &u16::try_from(payload_len)
                .map_err(|_| CryptoError::Malformed("payload too long"))?
                .to_be_bytes(),
        );
        if let Some((number, total)) = fragment {
            out.extend_from_slice(&number.to_be_bytes());
            out.extend_from_slice(&total.to_be_bytes());
        }
        let aad_len = out.len();
        out.extend_from_slice(&iv);
        let mut buf = Vec::with_capacity(plain_len + ICV_LEN);
        buf.extend_from_slice(payloads);
        buf.extend_from_slice(padding);
        buf.push(pad_len);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                self.nonce(&iv)?,
                aead::Aad::from(&out[..aad_len]),
                &mut buf,
            )
            .map_err(|_| CryptoError::Integrity)?;
        out.extend_from_slice(&buf);
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }
}

/// Collects the fragments of one message (RFC 7383 §2.6) after each was opened.
#[derive(Debug, Default)]
pub struct Reassembly {
    total: u16,
    first_inner: u8,
    parts: Vec<Option<Vec<u8>>>,
    bytes: usize,
}

/// Most fragments one message may have.
pub const MAX_FRAGMENTS: u16 = 64;
/// Most bytes a reassembled message may have.
pub const MAX_REASSEMBLED: usize = 64 * 1024;

impl Reassembly {
    /// Adds an opened fragment; returns the whole plaintext (first type, payload bytes)
    /// once every fragment is in. A fragment that contradicts those before it (another
    /// total) starts over, as RFC 7383 §2.6.1 has it for a retransmitted message with
    /// other fragmentation; duplicates are ignored.
    pub fn add(&mut self, opened: &Opened) -> Result<Option<(u8, Vec<u8>)>, CryptoError> {
        let (number, total) = opened
            .fragment
            .ok_or(CryptoError::Malformed("not a fragment"))?;
        if total > MAX_FRAGMENTS {
            return Err(CryptoError::Malformed("too many fragments"));
        }
        if total != self.total {
            *self = Self {
                total,
                parts: vec![None; usize::from(total)],
                ..Self::default()
            };
        }
        let slot = usize::from(number)
            .checked_sub(1)
            .and_then(|i| self.parts.get_mut(i))
            .ok_or(CryptoError::Malformed("fragment number"))?;
        if slot.is_some() {
            return Ok(None);
        }
        if self.bytes + opened.payloads.len() > MAX_REASSEMBLED {
            return Err(CryptoError::Malformed("reassembled message too long"));
        }
        self.bytes += opened.payloads.len();
        *slot = Some(opened.payloads.clone());
        if number == 1 {
            self.first_inner = opened.first_inner;
        }
        if self.parts.iter().all(Option::is_some) {
            let whole = self.parts.iter().flatten().flatten().copied().collect();
            let first = self.first_inner;
            *self = Self::default();
            return Ok(Some((first, whole)));
        }
        Ok(None)
    }
}

/// An ephemeral Diffie-Hellman key for one exchange.
pub struct KeyExchange {
    group: u16,
    private: agreement::EphemeralPrivateKey,
    public: Vec<u8>,
}

impl std::fmt::Debug for KeyExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyExchange")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

fn algorithm(group: u16) -> Result<&'static agreement::Algorithm, CryptoError> {
    match group {
        19 => Ok(&agreement::ECDH_P256),
        20 => Ok(&agreement::ECDH_P384),
        31 => Ok(&agreement::X25519),
        g => Err(CryptoError::UnsupportedGroup(g)),
    }
}

/// The length of a KE payload's public value in `group` (19, 20 or 31).
pub fn public_value_len(group: u16) -> usize {
    match group {
        19 => 64,
        20 => 96,
        _ => 32,
    }
}

/// Whether `group` is one of the Diffie-Hellman groups offered.
pub fn supported_group(group: u16) -> bool {
    algorithm(group).is_ok()
}

impl KeyExchange {
    /// A new key of `group` (19, 20 or 31).
    pub fn new(group: u16, rng: &dyn ring::rand::SecureRandom) -> Result<Self, CryptoError> {
        let private = agreement::EphemeralPrivateKey::generate(algorithm(group)?, rng)
            .map_err(|_| CryptoError::Random)?;
        let public = private
            .compute_public_key()
            .map_err(|_| CryptoError::Random)?;
        // RFC 5903 §7: the KE payload of an ECP group holds x | y without the 0x04
        // that marks an uncompressed point.
        let public = match group {
            19 | 20 => public.as_ref().get(1..).unwrap_or_default().to_vec(),
            _ => public.as_ref().to_vec(),
        };
        Ok(Self {
            group,
            private,
            public,
        })
    }

    /// The group.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// The public value as the KE payload carries it.
    pub fn public_value(&self) -> &[u8] {
        &self.public
    }

    /// The shared secret g^ir with the peer's public value (the x coordinate for ECP
    /// groups, RFC 5903 §7). Points not on the curve, and X25519 values giving an
    /// all-zero secret, are refused.
    pub fn agree(self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let group = self.group;
        if peer.len() != public_value_len(group) {
            return Err(CryptoError::BadPublicValue(group));
        }
        let peer = match group {
            19 | 20 => [&[0x04u8][..], peer].concat(),
            _ => peer.to_vec(),
        };
        let alg = algorithm(group)?;
        agreement::agree_ephemeral(
            self.private,
            &agreement::UnparsedPublicKey::new(alg, &peer),
            |secret| Zeroizing::new(secret.to_vec()),
        )
        .map_err(|_| CryptoError::BadPublicValue(group))
    }
}

/// The octets an AUTH payload covers (RFC 7296 §2.15): the sender's first message as
/// sent, the peer's nonce, and prf(SK_p of the sender, the sender's IDx').
pub fn signed_octets(
    first_message: &[u8],
    peer_nonce: &[u8],
    sk_p: &[u8],
    id_body: &[u8],
) -> Vec<u8> {
    let maced_id = prf(sk_p, id_body);
    [first_message, peer_nonce, &maced_id].concat()
}

/// The AUTH data of method 2 (shared key message integrity code): prf(prf(PSK, "Key Pad
/// for IKEv2"), signed octets).
pub fn psk_auth(psk: &[u8], signed_octets: &[u8]) -> [u8; PRF_LEN] {
    // As good as the key itself: wiped after use.
    let pad = Zeroizing::new(prf(psk, b"Key Pad for IKEv2"));
    prf(&*pad, signed_octets)
}

/// AUTH method 14, digital signature (RFC 7427).
pub const AUTH_DIGITAL_SIGNATURE: u8 = 14;
/// AUTH method 2, shared key message integrity code.
pub const AUTH_SHARED_KEY: u8 = 2;

/// DER AlgorithmIdentifier of ecdsa-with-SHA256 (RFC 5758), as RFC 7427 §3 carries it.
const ECDSA_WITH_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
/// DER AlgorithmIdentifier of ecdsa-with-SHA384.
const ECDSA_WITH_SHA384: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];

/// Why a signature AUTH was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The AUTH data is not length, AlgorithmIdentifier, signature.
    #[error("malformed digital signature AUTH data")]
    Malformed,
    /// A signature algorithm other than ECDSA with SHA-256 or SHA-384.
    #[error("unsupported signature algorithm in AUTH")]
    UnsupportedAlgorithm,
    /// The signature does not verify with the certificate's key.
    #[error("the AUTH signature does not verify with the peer's certificate key")]
    BadSignature,
}

/// Verifies the data of a digital signature AUTH payload (method 14, RFC 7427) over
/// `signed_octets` with an ECDSA public key (`point`: the uncompressed point of the
/// certificate's subjectPublicKeyInfo, P-256 or P-384).
pub fn verify_signature_auth(
    point: &[u8],
    signed_octets: &[u8],
    auth_data: &[u8],
) -> Result<(), SignatureError> {
    use ring::signature;
    let (&len, rest) = auth_data.split_first().ok_or(SignatureError::Malformed)?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(SignatureError::Malformed);
    }
    let (algorithm_id, sig) = rest.split_at(len);
    let alg: &dyn signature::VerificationAlgorithm = match (algorithm_id, point.len()) {
        (ECDSA_WITH_SHA256, 65) => &signature::ECDSA_P256_SHA256_ASN1,
        (ECDSA_WITH_SHA384, 65) => &signature::ECDSA_P256_SHA384_ASN1,
        (ECDSA_WITH_SHA256, 97) => &signature::ECDSA_P384_SHA256_ASN1,
        (ECDSA_WITH_SHA384, 97) => &signature::ECDSA_P384_SHA384_ASN1,
        _ => return Err(SignatureError::UnsupportedAlgorithm),
    };
    signature::UnparsedPublicKey::new(alg, point)
        .verify(signed_octets, sig)
        .map_err(|_| SignatureError::BadSignature)
}

/// AUTH method 9, ECDSA with SHA-256 on P-256 (RFC 4754): the signature is r | s.
pub const AUTH_ECDSA_SHA256_P256: u8 = 9;

/// Verifies the data of an AUTH payload of method 9 (RFC 4754: r and s, 32 bytes each)
/// over `signed_octets` with a P-256 public key (`point`, uncompressed).
pub fn verify_ecdsa_p256(
    point: &[u8],
    signed_octets: &[u8],
    auth_data: &[u8],
) -> Result<(), SignatureError> {
    use ring::signature;
    if point.len() != 65 {
        return Err(SignatureError::UnsupportedAlgorithm);
    }
    if auth_data.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(signed_octets, auth_data)
        .map_err(|_| SignatureError::BadSignature)
}

/// Compares two byte strings in constant time.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    // Every byte is looked at, whatever the first difference (the lengths are public).
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn method_9_takes_r_and_s_of_p256_only() {
        use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = key.public_key().as_ref().to_vec();
        let sig = key.sign(&rng, b"octets").unwrap().as_ref().to_vec();
        assert_eq!(sig.len(), 64);
        assert_eq!(verify_ecdsa_p256(&point, b"octets", &sig), Ok(()));
        assert_eq!(
            verify_ecdsa_p256(&point, b"other octets", &sig),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            verify_ecdsa_p256(&point, b"octets", &sig[..63]),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_ecdsa_p256(&[4; 97], b"octets", &sig),
            Err(SignatureError::UnsupportedAlgorithm)
        );
    }

    use super::*;

    #[test]
    fn prf_plus_matches_its_definition() {
        let key = b"key";
        let seed = b"seed";
        let t1 = prf(key, &[&seed[..], &[1]].concat());
        let t2 = prf(key, &[&t1[..], &seed[..], &[2]].concat());
        let out = prf_plus(key, seed, 40);
        assert_eq!(&out[..32], &t1[..]);
        assert_eq!(&out[32..], &t2[..8]);
    }

    #[test]
    fn sk_payloads_round_trip_and_refuse_changes() {
        let cipher = SkCipher::new(&[7u8; 36]).unwrap();
        let header = Header {
            spi_i: [1; 8],
            spi_r: [2; 8],
            next_payload: 0,
            version: wire::IKE_VERSION,
            exchange: wire::exchange::INFORMATIONAL,
            flags: wire::flags::INITIATOR,
            message_id: 5,
            length: 0,
        };
        let sealed = cipher
            .seal(header, wire::payload_type::NONE, None, &[], &[0, 0], [9; 8])
            .unwrap();
        let opened = cipher.open(&sealed).unwrap();
        assert!(opened.payloads.is_empty());
        assert_eq!(opened.padding, [0, 0]);
        assert_eq!(opened.header.message_id, 5);
        for i in 0..sealed.len() {
            let mut b = sealed.clone();
            b[i] ^= 0x01;
            assert!(cipher.open(&b).is_err(), "byte {i} changed, still opened");
        }
        let other = SkCipher::new(&[8u8; 36]).unwrap();
        assert_eq!(other.open(&sealed), Err(CryptoError::Integrity));
    }

    #[test]
    fn key_exchange_agrees_in_every_group() {
        let rng = ring::rand::SystemRandom::new();
        for group in [19, 20, 31] {
            let a = KeyExchange::new(group, &rng).unwrap();
            let b = KeyExchange::new(group, &rng).unwrap();
            let (pa, pb) = (a.public_value().to_vec(), b.public_value().to_vec());
            let ab = a.agree(&pb).unwrap();
            let ba = b.agree(&pa).unwrap();
            assert_eq!(*ab, *ba, "group {group}");
            let c = KeyExchange::new(group, &rng).unwrap();
            let bad = vec![0u8; pa.len()];
            assert_eq!(c.agree(&bad), Err(CryptoError::BadPublicValue(group)));
        }
        assert_eq!(
            KeyExchange::new(14, &rng).unwrap_err(),
            CryptoError::UnsupportedGroup(14)
        );
    }
}
