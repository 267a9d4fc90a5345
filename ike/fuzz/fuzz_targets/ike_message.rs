//! Any datagram on the IKE port: decoding never panics, what decodes encodes again, and
//! a responder given it as a first request either answers or refuses it.
#![no_main]
use isthmus_ike::sa::{Config, Prefix, Responder};
use isthmus_ike::wire::{self, Identification, Message};
use libfuzzer_sys::fuzz_target;

fn config() -> Config {
    let prefix = |s: &str| Prefix {
        addr: s.parse().expect("address"),
        len: 24,
    };
    Config {
        local_id: Identification {
            id_type: 2,
            data: b"gw2.test".to_vec(),
        },
        remote_id: Identification {
            id_type: 2,
            data: b"gw1.test".to_vec(),
        },
        psk: b"fuzz".to_vec().into(),
        certificates: None,
        groups: vec![31, 19],
        key_bits: vec![256, 128],
        local_prefixes: vec![prefix("100.64.2.0")],
        remote_prefixes: vec![prefix("100.64.1.0")],
        local: "192.0.2.2:4500".parse().expect("address"),
        remote: "192.0.2.1:4500".parse().expect("address"),
        esn: false,
        dpd: None,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        let _ = m.encode();
    }
    let _ = wire::encrypted_view(data);
    let _ = Responder::accept(config(), data);
});
