//! Known answers from real strongSwan 5.9.8 exchanges (two charons of the IKEv2 lab,
//! `../shared/ikev2-lab/lab.sh psk` and `cert`; vectors written by
//! `tests/data/make-vectors.py`): every datagram of the capture and the keys charon
//! logged. From the datagrams and the Diffie-Hellman secret alone this crate must decode
//! every message back to the same bytes, derive the same SKEYSEED, SK_* and CHILD_SA
//! keys, open every encrypted payload (fragments included), seal it again to the same
//! bytes, and compute or verify the same AUTH payloads.

// Helpers outside #[test] functions unwrap too (clippy.toml covers only the tests).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use isthmus_ike::crypto::{self, IkeKeys, Reassembly, SkCipher};
use isthmus_ike::wire::{self, exchange, Message, Payload};

struct Vectors {
    values: HashMap<String, Vec<u8>>,
    /// (from the initiator, datagram)
    messages: Vec<(bool, Vec<u8>)>,
}

impl Vectors {
    fn parse(text: &str) -> Self {
        let mut values = HashMap::new();
        let mut messages = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, hex) = line.split_once(" = ").unwrap();
            let bytes = hex::decode(hex).unwrap();
            match name {
                "msg.i" => messages.push((true, bytes)),
                "msg.r" => messages.push((false, bytes)),
                _ => {
                    values.insert(name.to_owned(), bytes);
                }
            }
        }
        Self { values, messages }
    }

    fn get(&self, name: &str) -> &[u8] {
        self.values.get(name).unwrap_or_else(|| panic!("no {name}"))
    }
}

fn nonce(m: &Message) -> Vec<u8> {
    m.payloads
        .iter()
        .find_map(|p| match p {
            Payload::Nonce(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap()
}

fn inner(payloads: &[Payload]) -> (&wire::Identification, &[u8], u8) {
    let id = payloads
        .iter()
        .find_map(|p| match p {
            Payload::IdI(id) | Payload::IdR(id) => Some(id),
            _ => None,
        })
        .unwrap();
    let (method, data) = payloads
        .iter()
        .find_map(|p| match p {
            Payload::Auth { method, data } => Some((*method, data.as_slice())),
            _ => None,
        })
        .unwrap();
    (id, data, method)
}

/// Decodes a plaintext datagram and checks that it encodes back to the same bytes.
fn decode_exact(bytes: &[u8]) -> Message {
    let m = Message::decode(bytes).unwrap();
    assert_eq!(
        m.encode().unwrap(),
        bytes,
        "re-encoding changed the message"
    );
    m
}

/// Opens an encrypted datagram, checks that sealing the plaintext again under the same
/// IV gives the same bytes and that its payloads re-encode exactly; returns them.
fn open_exact(cipher: &SkCipher, bytes: &[u8]) -> crypto::Opened {
    let opened = cipher.open(bytes).unwrap();
    let view = wire::encrypted_view(bytes).unwrap();
    let mut iv = [0u8; crypto::IV_LEN];
    iv.copy_from_slice(&view.body[..crypto::IV_LEN]);
    let sealed = cipher
        .seal(
            opened.header,
            opened.first_inner,
            opened.fragment,
            &opened.payloads,
            &opened.padding,
            iv,
        )
        .unwrap();
    assert_eq!(sealed, bytes, "sealing again changed the message");
    if opened.fragment.is_none() {
        let payloads = wire::decode_payloads(opened.first_inner, &opened.payloads).unwrap();
        let mut again = Vec::new();
        wire::encode_payloads(&payloads, &mut again).unwrap();
        assert_eq!(again, opened.payloads);
    }
    opened
}

/// The IKE_SA_INIT pair, checked against charon's keys: (request, response, keys).
fn ike_sa_init(v: &Vectors) -> (Message, Message, IkeKeys) {
    let (true, req) = &v.messages[0] else {
        panic!("first message not from the initiator")
    };
    let (false, rsp) = &v.messages[1] else {
        panic!("second message not from the responder")
    };
    let req = decode_exact(req);
    let rsp = decode_exact(rsp);
    assert_eq!(req.header.exchange, exchange::IKE_SA_INIT);
    // The responder's choice: AES-GCM-16-256, PRF HMAC-SHA2-256.
    let Payload::Sa(chosen) = &rsp.payloads[0] else {
        panic!("no SA first")
    };
    assert_eq!(chosen.len(), 1);
    let t = &chosen[0].transforms;
    assert!(t
        .iter()
        .any(|t| t.kind == 1 && t.id == crypto::ENCR_AES_GCM_16 && t.key_length() == Some(256)));
    assert!(t
        .iter()
        .any(|t| t.kind == 2 && t.id == crypto::PRF_HMAC_SHA2_256));
    let keys = IkeKeys::derive(
        &nonce(&req),
        &nonce(&rsp),
        v.get("g_ir.0"),
        &req.header.spi_i,
        &rsp.header.spi_r,
        32,
    );
    check_keys(v, &keys, 0);
    (req, rsp, keys)
}

fn check_keys(v: &Vectors, keys: &IkeKeys, n: usize) {
    for (name, ours) in [
        ("skeyseed", &keys.skeyseed),
        ("sk_d", &keys.sk_d),
        ("sk_ei", &keys.sk_ei),
        ("sk_er", &keys.sk_er),
        ("sk_pi", &keys.sk_pi),
        ("sk_pr", &keys.sk_pr),
    ] {
        assert_eq!(
            ours.as_slice(),
            v.get(&format!("{name}.{n}")),
            "{name} of IKE SA {n}"
        );
    }
}

#[test]
fn pre_shared_key_exchange_matches_strongswan() {
    let v = Vectors::parse(include_str!("data/strongswan-psk.txt"));
    let (req, rsp, keys) = ike_sa_init(&v);
    let (ni, nr) = (nonce(&req), nonce(&rsp));
    let ei = SkCipher::new(&keys.sk_ei).unwrap();
    let er = SkCipher::new(&keys.sk_er).unwrap();

    // IKE_AUTH: both AUTH payloads are the PSK MAC over the signed octets.
    let auth_i = open_exact(&ei, &v.messages[2].1);
    let auth_r = open_exact(&er, &v.messages[3].1);
    assert_eq!(auth_i.header.exchange, exchange::IKE_AUTH);
    let psk = v.get("psk");
    for (opened, first, peer_nonce, sk_p) in [
        (&auth_i, &v.messages[0].1, &nr, &keys.sk_pi),
        (&auth_r, &v.messages[1].1, &ni, &keys.sk_pr),
    ] {
        let payloads = wire::decode_payloads(opened.first_inner, &opened.payloads).unwrap();
        let (id, data, method) = inner(&payloads);
        assert_eq!(method, crypto::AUTH_SHARED_KEY);
        let octets = crypto::signed_octets(first, peer_nonce, sk_p, &id.body());
        assert_eq!(crypto::psk_auth(psk, &octets), data);
        assert_ne!(crypto::psk_auth(b"not the psk", &octets), data);
        // The CHILD_SA came with it: ESP, a 4-byte SPI, narrowed selectors.
        assert!(payloads.iter().any(|p| matches!(p,
            Payload::Sa(ps) if ps[0].protocol == 3 && ps[0].spi.len() == 4)));
        assert!(payloads.iter().any(|p| matches!(p, Payload::TsI(_))));
    }
    // The first CHILD_SA's ESP keys.
    let (i2r, r2i) = crypto::child_keymat(&keys.sk_d, None, &ni, &nr, 32);
    assert_eq!(i2r.as_slice(), v.get("child_i2r"));
    assert_eq!(r2i.as_slice(), v.get("child_r2i"));

    // The IKE SA rekey (CREATE_CHILD_SA with an IKE proposal): the new SA's keys.
    let mut rekey: Vec<(Message, Vec<Payload>)> = Vec::new();
    for (from_i, bytes) in &v.messages[4..] {
        let header = wire::Header::decode(bytes).unwrap();
        if header.spi_i != req.header.spi_i || header.exchange != exchange::CREATE_CHILD_SA {
            continue;
        }
        let cipher = if *from_i { &ei } else { &er };
        let opened = open_exact(cipher, bytes);
        let payloads = wire::decode_payloads(opened.first_inner, &opened.payloads).unwrap();
        let is_ike = payloads
            .iter()
            .any(|p| matches!(p, Payload::Sa(ps) if ps[0].protocol == 1 && ps[0].spi.len() == 8));
        if is_ike {
            rekey.push((Message::decode(bytes).unwrap(), payloads));
        }
    }
    assert_eq!(rekey.len(), 2, "one IKE rekey request and its response");
    let spi_of = |ps: &[Payload]| -> [u8; 8] {
        ps.iter()
            .find_map(|p| match p {
                Payload::Sa(s) => s[0].spi.clone().try_into().ok(),
                _ => None,
            })
            .unwrap()
    };
    let nonce_of = |ps: &[Payload]| -> Vec<u8> {
        ps.iter()
            .find_map(|p| match p {
                Payload::Nonce(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap()
    };
    let (rq, rs) = (&rekey[0].1, &rekey[1].1);
    let new = IkeKeys::derive_rekey(
        &keys.sk_d,
        v.get("g_ir.1"),
        &nonce_of(rq),
        &nonce_of(rs),
        &spi_of(rq),
        &spi_of(rs),
        32,
    );
    check_keys(&v, &new, 1);

    // Every later message (deletes, DPD both ways) opens under the SA its SPIs name,
    // with the key of its sender's role in that SA.
    let new_ei = SkCipher::new(&new.sk_ei).unwrap();
    let new_er = SkCipher::new(&new.sk_er).unwrap();
    let mut under_new = 0;
    for (_, bytes) in &v.messages[4..] {
        let h = wire::Header::decode(bytes).unwrap();
        let cipher = match (h.spi_i == spi_of(rq), h.from_initiator()) {
            (false, true) => &ei,
            (false, false) => &er,
            (true, true) => &new_ei,
            (true, false) => &new_er,
        };
        under_new += usize::from(h.spi_i == spi_of(rq));
        open_exact(cipher, bytes);
    }
    assert!(under_new >= 4, "DPD under the new IKE SA: {under_new}");
}

#[test]
fn certificate_exchange_with_fragments_matches_strongswan() {
    let v = Vectors::parse(include_str!("data/strongswan-cert.txt"));
    let (req, rsp, keys) = ike_sa_init(&v);
    let (ni, nr) = (nonce(&req), nonce(&rsp));
    // The initiator announced fragmentation (RFC 7383) and ECP-256 was used.
    assert!(req.notify(16430).is_some(), "IKEV2_FRAGMENTATION_SUPPORTED");
    assert!(rsp
        .payloads
        .iter()
        .any(|p| matches!(p, Payload::Ke { group: 19, data } if data.len() == 64)));
    let ei = SkCipher::new(&keys.sk_ei).unwrap();
    let er = SkCipher::new(&keys.sk_er).unwrap();

    // IKE_AUTH came in two fragments each way: open each, reassemble.
    let mut whole = Vec::new();
    for from_i in [true, false] {
        let cipher = if from_i { &ei } else { &er };
        let mut r = Reassembly::default();
        let mut done = None;
        let frags: Vec<&Vec<u8>> = v.messages[2..]
            .iter()
            .filter(|(i, b)| {
                *i == from_i
                    && wire::Header::decode(b).is_ok_and(|h| h.exchange == exchange::IKE_AUTH)
            })
            .map(|(_, b)| b)
            .collect();
        assert_eq!(frags.len(), 2);
        // In reverse order: reassembly does not depend on arrival order.
        for bytes in frags.iter().rev() {
            let opened = open_exact(cipher, bytes);
            assert!(opened.fragment.is_some());
            assert!(done.is_none());
            done = r.add(&opened).unwrap();
        }
        let (first, bytes) = done.unwrap();
        let payloads = wire::decode_payloads(first, &bytes).unwrap();
        let mut again = Vec::new();
        wire::encode_payloads(&payloads, &mut again).unwrap();
        assert_eq!(again, bytes);
        whole.push(payloads);
    }

    // Each AUTH is an RFC 7427 ECDSA-SHA256 signature by the leaf certificate sent in
    // the first CERT payload, over the signed octets.
    for (payloads, first, peer_nonce, sk_p) in [
        (&whole[0], &v.messages[0].1, &nr, &keys.sk_pi),
        (&whole[1], &v.messages[1].1, &ni, &keys.sk_pr),
    ] {
        let (id, data, method) = inner(payloads);
        assert_eq!(method, crypto::AUTH_DIGITAL_SIGNATURE);
        assert_eq!(id.id_type, 9, "the identity is the subject DN");
        let cert = payloads
            .iter()
            .find_map(|p| match p {
                Payload::Cert { encoding: 4, data } => Some(data.clone()),
                _ => None,
            })
            .unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&cert).unwrap();
        // The same name, not the same bytes: charon encodes the DN of its `id` setting
        // with PrintableString where the certificate (rcgen) has UTF8String, and
        // matches names by value. A responder must compare them the same way.
        use x509_parser::prelude::FromDer;
        let (rest, named) = x509_parser::x509::X509Name::from_der(&id.data).unwrap();
        assert!(rest.is_empty());
        assert_eq!(named.to_string(), x509.subject().to_string());
        let point = x509.public_key().subject_public_key.data.to_vec();
        let octets = crypto::signed_octets(first, peer_nonce, sk_p, &id.body());
        crypto::verify_signature_auth(&point, &octets, data).unwrap();
        let mut altered = octets.clone();
        altered[40] ^= 1;
        assert_eq!(
            crypto::verify_signature_auth(&point, &altered, data),
            Err(crypto::SignatureError::BadSignature)
        );
    }
    let (i2r, r2i) = crypto::child_keymat(&keys.sk_d, None, &ni, &nr, 32);
    assert_eq!(i2r.as_slice(), v.get("child_i2r"));
    assert_eq!(r2i.as_slice(), v.get("child_r2i"));
}
