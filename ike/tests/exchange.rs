//! An Isthmus initiator and an Isthmus responder in memory: the exchange, its failures,
//! retransmissions, and a seeded run of mutated and random datagrams against both ends
//! (the fuzz target's entry points, `fuzz/`), which must never panic nor establish
//! anything from a datagram that is not the real one.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use isthmus_ike::sa::{
    cookie_answer, Accepted, ChildSa, Config, Event, IkeError, Initiator, Prefix, Responder,
};
use isthmus_ike::wire::{self, exchange, flags, Header, Identification, Message, Notify, Payload};

fn fqdn(name: &str) -> Identification {
    Identification {
        id_type: 2,
        data: name.as_bytes().to_vec(),
    }
}

fn prefix(s: &str) -> Prefix {
    let (addr, len) = s.split_once('/').unwrap();
    Prefix {
        addr: addr.parse().unwrap(),
        len: len.parse().unwrap(),
    }
}

/// Site 1 (initiator) and site 2 (responder), as the e2e tests address them.
fn config(initiator: bool, groups: &[u16], psk: &str) -> Config {
    let (ours, theirs) = (fqdn("gw1.test"), fqdn("gw2.test"));
    let (p1, p2) = (prefix("100.64.1.0/24"), prefix("100.64.2.0/24"));
    let (a1, a2) = (
        "192.0.2.1:4500".parse().unwrap(),
        "192.0.2.2:4500".parse().unwrap(),
    );
    let (local_id, remote_id, local, remote, lp, rp) = if initiator {
        (ours, theirs, a1, a2, p1, p2)
    } else {
        (theirs, ours, a2, a1, p2, p1)
    };
    Config {
        local_id,
        remote_id,
        psk: psk.as_bytes().to_vec().into(),
        certificates: None,
        groups: groups.to_vec(),
        key_bits: vec![256, 128],
        local_prefixes: vec![lp],
        remote_prefixes: vec![rp],
        local,
        remote,
        esn: false,
        dpd: None,
    }
}

fn sends(events: &[Event]) -> Vec<Vec<u8>> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Send(b) => Some(b.clone()),
            _ => None,
        })
        .collect()
}

fn child(events: Vec<Event>) -> Option<ChildSa> {
    events.into_iter().find_map(|e| match e {
        Event::Established(c) => Some(c),
        _ => None,
    })
}

/// Every datagram of one exchange, in order: (to the responder?, bytes).
struct Run {
    datagrams: Vec<(bool, Vec<u8>)>,
    initiator: Initiator,
    responder: Option<Box<Responder>>,
    i_child: Option<ChildSa>,
    r_child: Option<ChildSa>,
    error: Option<IkeError>,
}

fn run(i_groups: &[u16], r_groups: &[u16], i_psk: &str, r_psk: &str) -> Run {
    run_configs(config(true, i_groups, i_psk), &|| {
        config(false, r_groups, r_psk)
    })
}

fn run_configs(ic: Config, rc: &dyn Fn() -> Config) -> Run {
    let now = Instant::now();
    let (initiator, first) = Initiator::start(ic, now).unwrap();
    let mut run = Run {
        datagrams: vec![(true, first.clone())],
        initiator,
        responder: None,
        i_child: None,
        r_child: None,
        error: None,
    };
    let mut to_responder = vec![first];
    for _ in 0..6 {
        let mut to_initiator = Vec::new();
        for d in to_responder.drain(..) {
            let events = match &mut run.responder {
                Some(r) => r.handle(&d, now),
                None => match Responder::accept(rc(), &d).unwrap() {
                    Accepted::Sa(r, answer) => {
                        run.responder = Some(r);
                        Ok(vec![Event::Send(answer)])
                    }
                    Accepted::Answer(answer) => Ok(vec![Event::Send(answer)]),
                },
            }
            .unwrap();
            to_initiator.extend(sends(&events));
            run.r_child = run.r_child.take().or(child(events));
        }
        for d in to_initiator {
            run.datagrams.push((false, d.clone()));
            match run.initiator.handle(&d, now) {
                Ok(events) => {
                    to_responder.extend(sends(&events));
                    run.i_child = run.i_child.take().or(child(events));
                }
                Err(e) => run.error = Some(e),
            }
        }
        for d in &to_responder {
            run.datagrams.push((true, d.clone()));
        }
        if to_responder.is_empty() {
            break;
        }
    }
    run
}

#[test]
fn an_initiator_and_a_responder_agree_on_keys_and_selectors() {
    let run = run(&[31, 19], &[31], "k", "k");
    assert!(run.error.is_none(), "{:?}", run.error);
    let (i, r) = (run.i_child.unwrap(), run.r_child.unwrap());
    assert_eq!(i.outbound_spi, r.inbound_spi);
    assert_eq!(i.inbound_spi, r.outbound_spi);
    assert_eq!(*i.outbound_key, *r.inbound_key);
    assert_eq!(*i.inbound_key, *r.outbound_key);
    assert_ne!(*i.outbound_key, *i.inbound_key);
    assert_eq!(i.outbound_key.len(), 36, "AES-256-GCM key and salt");
    assert_eq!(i.local_prefixes, r.remote_prefixes);
    assert_eq!(i.remote_prefixes, r.local_prefixes);
    assert!(run.initiator.is_established());
    assert!(run.responder.unwrap().is_established());
    assert_eq!(run.datagrams.len(), 4);
}

#[test]
fn the_responder_asks_for_its_group_and_refuses_a_wrong_key() {
    let run = run(&[31, 19], &[19], "k", "k");
    assert!(run.error.is_none(), "{:?}", run.error);
    assert!(run.i_child.is_some() && run.r_child.is_some());
    // INVALID_KE_PAYLOAD, then the exchange again with group 19.
    assert_eq!(run.datagrams.len(), 6);

    let run = run_wrong_key();
    assert!(
        matches!(run.error, Some(IkeError::Refused { code: 24, .. })),
        "{:?}",
        run.error
    );
    assert!(run.i_child.is_none() && run.r_child.is_none());
    assert!(!run.responder.unwrap().is_established());
}

fn run_wrong_key() -> Run {
    run(&[19], &[19], "one key", "another key")
}

#[test]
fn retransmitted_requests_get_the_same_answers() {
    let mut run = run(&[19], &[19], "k", "k");
    let responder = run.responder.as_mut().unwrap();
    let now = Instant::now();
    let requests: Vec<&Vec<u8>> = run.datagrams.iter().filter(|d| d.0).map(|d| &d.1).collect();
    let answers: Vec<&Vec<u8>> = run
        .datagrams
        .iter()
        .filter(|d| !d.0)
        .map(|d| &d.1)
        .collect();
    for (req, answer) in requests.iter().zip(&answers) {
        let again = sends(&responder.handle(req, now).unwrap());
        assert_eq!(again, vec![(*answer).clone()]);
    }
}

/// Found by review: any datagram carrying the SPIs and the Message ID answered last got
/// that answer again, unauthenticated; and an error notify in clear, which anyone who
/// saw the IKE_SA_INIT request can send, ended the exchange at once.
#[test]
fn only_the_real_request_is_answered_again_and_clear_errors_are_hints() {
    let mut run = run(&[19], &[19], "k", "k");
    let now = Instant::now();
    let auth_request = run
        .datagrams
        .iter()
        .filter(|d| d.0)
        .nth(1)
        .unwrap()
        .1
        .clone();
    let mut forged = auth_request.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let responder = run.responder.as_mut().unwrap();
    assert!(responder.handle(&forged, now).is_err());
    assert_eq!(
        sends(&responder.handle(&auth_request, now).unwrap()).len(),
        1
    );

    // A spoofed NO_PROPOSAL_CHOSEN first, then the real answer: the SA comes up.
    let (mut initiator, first) = Initiator::start(config(true, &[19], "k"), now).unwrap();
    let Accepted::Sa(mut responder, answer) =
        Responder::accept(config(false, &[19], "k"), &first).unwrap()
    else {
        panic!("no SA");
    };
    let spoofed = Message {
        header: Header {
            spi_i: initiator.spis().0,
            spi_r: [0; 8],
            next_payload: 0,
            version: wire::IKE_VERSION,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::RESPONSE,
            message_id: 0,
            length: 0,
        },
        payloads: vec![Payload::Notify(Notify {
            protocol: 0,
            spi: Vec::new(),
            kind: 14,
            data: Vec::new(),
        })],
    }
    .encode()
    .unwrap();
    assert!(initiator.handle(&spoofed, now).unwrap().is_empty());
    let auth = sends(&initiator.handle(&answer, now).unwrap());
    let events = responder.handle(&auth[0], now).unwrap();
    let response = sends(&events);
    assert!(child(initiator.handle(&response[0], now).unwrap()).is_some());
    // Unanswered, the hint is the reason given in the end.
    let (mut lonely, _) = Initiator::start(config(true, &[19], "k"), now).unwrap();
    let mut hint = spoofed.clone();
    hint[..8].copy_from_slice(&lonely.spis().0);
    lonely.handle(&hint, now).unwrap();
    let mut t = now;
    let err = loop {
        t += std::time::Duration::from_secs(20);
        match lonely.on_timer(t) {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, IkeError::Refused { code: 14, .. }), "{err:?}");
}

/// Found by the third review: every spoofed IKE_SA_INIT cost the responder a key pair,
/// a Diffie-Hellman computation and a kept request, with nothing a driver could ask for
/// first. A driver under load asks for a COOKIE, bound to the initiator's address.
#[test]
fn a_responder_under_load_asks_for_a_cookie_first() {
    let now = Instant::now();
    let secret = [7u8; 32];
    let from: std::net::SocketAddr = "192.0.2.1:4500".parse().unwrap();
    let (mut initiator, first) = Initiator::start(config(true, &[19], "k"), now).unwrap();
    let asked = cookie_answer(&secret, from, &first)
        .unwrap()
        .expect("a COOKIE is asked for");
    let again = sends(&initiator.handle(&asked, now).unwrap());
    assert_eq!(again.len(), 1, "the request again, with the cookie");
    assert_eq!(cookie_answer(&secret, from, &again[0]).unwrap(), None);
    let elsewhere: std::net::SocketAddr = "192.0.2.9:4500".parse().unwrap();
    assert!(cookie_answer(&secret, elsewhere, &again[0])
        .unwrap()
        .is_some());
    assert!(cookie_answer(&[8; 32], from, &again[0]).unwrap().is_some());
    assert!(matches!(
        Responder::accept(config(false, &[19], "k"), &again[0]).unwrap(),
        Accepted::Sa(..)
    ));
    // An oversized request is refused before anything is computed.
    let mut big = first.clone();
    big.resize(5000, 0);
    assert!(Responder::accept(config(false, &[19], "k"), &big).is_err());
}

/// Liveness checks (DPD) from either end once established: answered while the peer is
/// there; with the peer gone, the IKE SA is given up after the retransmissions.
#[test]
fn liveness_checks_are_answered_then_a_silent_peer_is_given_up() {
    let now = Instant::now();
    let mut ic = config(true, &[19], "k");
    ic.dpd = Some(std::time::Duration::from_secs(10));
    let mut rc = config(false, &[19], "k");
    rc.dpd = Some(std::time::Duration::from_secs(15));
    let (mut initiator, first) = Initiator::start(ic, now).unwrap();
    let Accepted::Sa(mut responder, answer) = Responder::accept(rc, &first).unwrap() else {
        panic!("no SA");
    };
    let auth = sends(&initiator.handle(&answer, now).unwrap());
    let response = sends(&responder.handle(&auth[0], now).unwrap());
    assert!(child(initiator.handle(&response[0], now).unwrap()).is_some());
    let s = std::time::Duration::from_secs;
    assert_eq!(initiator.next_timer(), Some(now + s(10)));
    assert_eq!(responder.next_timer(), Some(now + s(15)));
    assert!(
        initiator.on_timer(now + s(5)).unwrap().is_empty(),
        "not due yet"
    );

    // Each end asks, the other answers, the asker is satisfied.
    for (t, asker_is_initiator) in [(10, true), (15, false), (20, true)] {
        let at = now + s(t);
        let (asked, answered) = if asker_is_initiator {
            let asked = sends(&initiator.on_timer(at).unwrap());
            let answered = sends(&responder.handle(&asked[0], at).unwrap());
            assert!(initiator.handle(&answered[0], at).unwrap().is_empty());
            (asked, answered)
        } else {
            let asked = sends(&responder.on_timer(at).unwrap());
            let answered = sends(&initiator.handle(&asked[0], at).unwrap());
            assert!(responder.handle(&answered[0], at).unwrap().is_empty());
            (asked, answered)
        };
        assert_eq!((asked.len(), answered.len()), (1, 1), "at {t} s");
    }
    // Answered: nothing is retransmitted before the next check.
    assert!(initiator.on_timer(now + s(25)).unwrap().is_empty());

    // The responder goes silent: the initiator's next check goes unanswered.
    // A forged answer (its Message ID is in clear) is discarded: the check stays open.
    let mut t = now + s(30);
    let check = sends(&initiator.on_timer(t).unwrap());
    let mut forged = sends(&responder.handle(&check[0], t).unwrap())[0].clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(initiator.handle(&forged, t).unwrap().is_empty());
    let mut sent = 1;
    let gone = loop {
        t += std::time::Duration::from_millis(250);
        assert!(t < now + s(60), "never given up");
        let events = initiator.on_timer(t).unwrap();
        sent += sends(&events).len();
        if events.iter().any(|e| matches!(e, Event::Closed(_))) {
            break events;
        }
    };
    assert_eq!(sent, 5, "the check and its 4 retransmissions");
    // Every CHILD_SA goes with the IKE SA, then it is closed.
    let deleted: Vec<u32> = gone
        .iter()
        .filter_map(|e| match e {
            Event::ChildDeleted(spi) => Some(*spi),
            _ => None,
        })
        .collect();
    assert_eq!(deleted.len(), 1, "{gone:?}");
    assert!(matches!(gone.last(), Some(Event::Closed(why)) if why.contains("gone")));
    assert!(!initiator.is_established());
    assert!(initiator.on_timer(t + s(60)).unwrap().is_empty());
}

/// Found by review: a DPD interval too long to add to the clock panicked.
#[test]
fn a_dpd_interval_of_forever_means_never() {
    let now = Instant::now();
    let mut ic = config(true, &[19], "k");
    ic.dpd = Some(std::time::Duration::MAX);
    let (mut initiator, first) = Initiator::start(ic, now).unwrap();
    let Accepted::Sa(mut responder, answer) =
        Responder::accept(config(false, &[19], "k"), &first).unwrap()
    else {
        panic!("no SA");
    };
    let auth = sends(&initiator.handle(&answer, now).unwrap());
    let response = sends(&responder.handle(&auth[0], now).unwrap());
    assert!(child(initiator.handle(&response[0], now).unwrap()).is_some());
    assert_eq!(initiator.next_timer(), None);
}

/// xorshift64*: deterministic test inputs.
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
    match rng.below(6) {
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
        // Lengths and types in the first payloads.
        4 if d.len() > 32 => {
            let i = 28 + rng.below(8);
            d[i] = rng.next() as u8;
        }
        _ => d = (0..rng.below(1500)).map(|_| rng.next() as u8).collect(),
    }
    d
}

/// A whole exchange (group 31 both ends: four datagrams) in which the datagram at
/// `index` is replaced by `change(datagram)`. Returns whether the end that received it
/// brought a CHILD_SA up then or later, and whether the datagram was changed at all.
fn exchange_with(index: usize, change: &mut dyn FnMut(Vec<u8>) -> Vec<u8>) -> (bool, bool) {
    let now = Instant::now();
    let (mut initiator, mut d) = Initiator::start(config(true, &[31], "k"), now).unwrap();
    let mut responder: Option<Box<Responder>> = None;
    let mut changed = false;
    for step in 0..4 {
        if step == index {
            let mutant = change(d.clone());
            changed = mutant != d;
            d = mutant;
        }
        let events = if step % 2 == 0 {
            match responder.as_mut() {
                None => match Responder::accept(config(false, &[31], "k"), &d) {
                    Ok(Accepted::Sa(r, answer)) => {
                        responder = Some(r);
                        vec![Event::Send(answer)]
                    }
                    Ok(Accepted::Answer(answer)) => vec![Event::Send(answer)],
                    Err(_) => return (false, changed),
                },
                Some(r) => match r.handle(&d, now) {
                    Ok(events) => events,
                    Err(_) => return (false, changed),
                },
            }
        } else {
            match initiator.handle(&d, now) {
                Ok(events) => events,
                Err(_) => return (false, changed),
            }
        };
        // The receiver of datagram `index` is the responder for even ones.
        let receiver = step % 2 == index % 2;
        if step >= index.min(3)
            && receiver
            && events.iter().any(|e| matches!(e, Event::Established(_)))
        {
            return (true, changed);
        }
        match sends(&events).into_iter().next() {
            Some(next) => d = next,
            None => return (false, changed),
        }
    }
    (false, changed)
}

/// Mutants of every datagram of real exchanges (the plaintext IKE_SA_INIT ones are
/// parsed deep; the encrypted ones must fail their integrity check), and random bytes:
/// no end panics, and no end that received a changed datagram brings a CHILD_SA up
/// (each end's AUTH covers the IKE_SA_INIT message as it sent it, the rest is AEAD).
/// The other end may: a responder has verified the initiator's AUTH before the
/// initiator sees that the IKE_SA_INIT response it got was not the one sent.
#[test]
fn both_ends_survive_mutated_and_random_datagrams() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for index in 0..4 {
        assert_eq!(
            exchange_with(index, &mut |d| d),
            (true, false),
            "the exchange itself, seen from the receiver of datagram {index}"
        );
    }
    for index in 0..4 {
        for round in 0..1500 {
            let (up, changed) = exchange_with(index, &mut |d| mutate(&mut rng, d));
            assert!(
                !(up && changed),
                "round {round}: a changed datagram {index} brought a CHILD_SA up"
            );
        }
    }
    let now = Instant::now();
    let (mut initiator, _) = Initiator::start(config(true, &[31], "k"), now).unwrap();
    for _ in 0..2000 {
        let random: Vec<u8> = (0..rng.below(600)).map(|_| rng.next() as u8).collect();
        let _ = Responder::accept(config(false, &[31], "k"), &random);
        let _ = initiator.handle(&random, now);
    }
}

#[test]
fn closing_from_our_side_tells_the_peer() {
    let now = Instant::now();
    for initiator_closes in [true, false] {
        let mut run = run(&[19], &[19], "k", "k");
        let mut responder = run.responder.take().expect("responder");
        assert!(run.i_child.is_some(), "established");
        let closing = if initiator_closes {
            run.initiator.close("no CHILD_SA")
        } else {
            responder.close("no CHILD_SA")
        };
        // Our side: the delete, our CHILD_SA gone, closed.
        let delete = sends(&closing);
        assert_eq!(delete.len(), 1);
        assert!(closing.iter().any(|e| matches!(e, Event::ChildDeleted(_))));
        assert!(matches!(closing.last(), Some(Event::Closed(why)) if why == "no CHILD_SA"));
        // The peer takes the delete: its CHILD_SA and IKE SA go too.
        let events = if initiator_closes {
            responder.handle(&delete[0], now).unwrap()
        } else {
            run.initiator.handle(&delete[0], now).unwrap()
        };
        assert!(
            events.iter().any(|e| matches!(e, Event::ChildDeleted(_))),
            "{events:?}"
        );
        assert!(events.iter().any(|e| matches!(e, Event::Closed(_))));
    }
    // Closing twice does nothing more.
    let mut run = run(&[19], &[19], "k", "k");
    assert!(!run.initiator.close("x").is_empty());
    assert!(run.initiator.close("x").is_empty());
    assert!(run.initiator.is_closed());
}

fn rekeyed(events: &[Event]) -> Option<&ChildSa> {
    events.iter().find_map(|e| match e {
        Event::ChildRekeyed(c) => Some(c),
        _ => None,
    })
}

fn deleted(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ChildDeleted(spi) => Some(*spi),
            _ => None,
        })
        .collect()
}

#[test]
fn either_end_rekeys_the_child_sa_and_a_collision_leaves_one_rekey() {
    let now = Instant::now();
    let mut run = run(&[19], &[19], "k", "k");
    let mut responder = run.responder.take().expect("responder");
    let (mut i_old, mut r_old) = (
        run.i_child.take().expect("CHILD_SA").inbound_spi,
        run.r_child.take().expect("CHILD_SA").inbound_spi,
    );
    for initiator_rekeys in [true, false, true] {
        // The rekeying end asks; the other answers with a new pair of its own.
        let (asked, answered, done, gone, theirs_gone) = if initiator_rekeys {
            let asked = run.initiator.rekey_child(now).unwrap();
            let answered = responder.handle(&sends(&asked)[0], now).unwrap();
            let done = run.initiator.handle(&sends(&answered)[0], now).unwrap();
            let gone = responder.handle(&sends(&done)[0], now).unwrap();
            let theirs = run.initiator.handle(&sends(&gone)[0], now).unwrap();
            (asked, answered, done, gone, theirs)
        } else {
            let asked = responder.rekey_child(now).unwrap();
            let answered = run.initiator.handle(&sends(&asked)[0], now).unwrap();
            let done = responder.handle(&sends(&answered)[0], now).unwrap();
            let gone = run.initiator.handle(&sends(&done)[0], now).unwrap();
            let theirs = responder.handle(&sends(&gone)[0], now).unwrap();
            (asked, answered, done, gone, theirs)
        };
        assert_eq!(sends(&asked).len(), 1);
        let peer_new = rekeyed(&answered).expect("the peer's new pair");
        let our_new = rekeyed(&done).expect("our new pair");
        assert!(our_new.rekeyed_by_us && !peer_new.rekeyed_by_us);
        assert_eq!(our_new.outbound_spi, peer_new.inbound_spi);
        assert_eq!(our_new.inbound_spi, peer_new.outbound_spi);
        assert_eq!(*our_new.outbound_key, *peer_new.inbound_key);
        assert_eq!(*our_new.inbound_key, *peer_new.outbound_key);
        // Our delete of the old pair: the peer drops its old inbound SA, we ours.
        let (ours_old, peers_old) = if initiator_rekeys {
            (i_old, r_old)
        } else {
            (r_old, i_old)
        };
        assert_eq!(deleted(&gone), vec![peers_old]);
        assert_eq!(deleted(&theirs_gone), vec![ours_old]);
        if initiator_rekeys {
            (i_old, r_old) = (our_new.inbound_spi, peer_new.inbound_spi);
        } else {
            (i_old, r_old) = (peer_new.inbound_spi, our_new.inbound_spi);
        }
    }
    // Both ends rekey at once: each refuses the other's (TEMPORARY_FAILURE), nothing
    // changes, and a rekey after that goes through.
    let from_i = sends(&run.initiator.rekey_child(now).unwrap());
    let from_r = sends(&responder.rekey_child(now).unwrap());
    let answer_r = responder.handle(&from_i[0], now).unwrap();
    let answer_i = run.initiator.handle(&from_r[0], now).unwrap();
    assert!(rekeyed(&answer_r).is_none() && rekeyed(&answer_i).is_none());
    assert!(run
        .initiator
        .handle(&sends(&answer_r)[0], now)
        .unwrap()
        .is_empty());
    assert!(responder
        .handle(&sends(&answer_i)[0], now)
        .unwrap()
        .is_empty());
    let asked = run.initiator.rekey_child(now).unwrap();
    let answered = responder.handle(&sends(&asked)[0], now).unwrap();
    assert!(rekeyed(&answered).is_some(), "a rekey after the collision");
}

/// Certificates for the in-memory tests: the "chain" is opaque bytes, the signing key a
/// fresh P-256 key, and `verify` answers with the point it is told (the caller's PKI
/// would find it in the leaf).
struct TestCerts {
    chain: Vec<Vec<u8>>,
    key: ring::signature::EcdsaKeyPair,
    peer_point: std::sync::Mutex<Vec<u8>>,
}

impl TestCerts {
    fn new(chain: Vec<Vec<u8>>) -> Self {
        use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self {
            chain,
            key,
            peer_point: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn point(&self) -> Vec<u8> {
        use ring::signature::KeyPair as _;
        self.key.public_key().as_ref().to_vec()
    }
}

impl isthmus_ike::sa::Certificates for TestCerts {
    fn chain(&self) -> Vec<Vec<u8>> {
        self.chain.clone()
    }
    fn sign(&self, octets: &[u8]) -> Result<Vec<u8>, String> {
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), octets)
            .map_err(|_| "sign".to_string())?;
        let alg: &[u8] = &[
            0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
        ];
        Ok([&[alg.len() as u8][..], alg, sig.as_ref()].concat())
    }
    fn verify(&self, chain: &[Vec<u8>], _id: &Identification) -> Result<Vec<u8>, String> {
        if chain.is_empty() {
            return Err("no chain".into());
        }
        Ok(self.peer_point.lock().unwrap().clone())
    }
    fn authorities(&self) -> Vec<u8> {
        vec![0x11; 20]
    }
}

/// Both ends with certificates of `chain_len` bytes each (two per end); the responder's
/// PKI vouches for the initiator's signing key, or (`false`) for another key.
fn cert_run(chain_len: usize, initiator_signs_with_its_key: bool) -> Run {
    let fake_cert = vec![0x30; chain_len];
    let i_certs = std::sync::Arc::new(TestCerts::new(vec![fake_cert.clone(), fake_cert.clone()]));
    let r_certs = std::sync::Arc::new(TestCerts::new(vec![fake_cert.clone(), fake_cert]));
    *i_certs.peer_point.lock().unwrap() = r_certs.point();
    // The responder's PKI vouches for the initiator's key, or for someone else's.
    let other = TestCerts::new(Vec::new());
    *r_certs.peer_point.lock().unwrap() = if initiator_signs_with_its_key {
        i_certs.point()
    } else {
        other.point()
    };
    let mut ic = config(true, &[19], "unused");
    ic.certificates = Some(i_certs);
    let rc = move || {
        let mut c = config(false, &[19], "unused");
        c.certificates = Some(r_certs.clone());
        c
    };
    run_configs(ic, &rc)
}

#[test]
fn certificates_authenticate_both_ways_and_a_signature_by_another_key_is_refused() {
    let run = cert_run(200, true);
    let (i, r) = (
        run.i_child.expect("initiator up"),
        run.r_child.expect("responder up"),
    );
    assert_eq!(*i.outbound_key, *r.inbound_key);
    // A chain the PKI accepts, but AUTH signed with a key that is not its leaf's.
    let run = cert_run(200, false);
    assert!(run.r_child.is_none() && run.i_child.is_none());
}

#[test]
fn large_ike_auth_messages_go_in_fragments_within_1280_bytes() {
    // Two 900-byte "certificates" each way: IKE_AUTH request and response are ~2 KB.
    let run = cert_run(900, true);
    assert!(run.i_child.is_some() && run.r_child.is_some());
    let auth: Vec<&(bool, Vec<u8>)> = run.datagrams.iter().skip(2).collect();
    let (requests, responses) = (
        auth.iter().filter(|(to_r, _)| *to_r).count(),
        auth.iter().filter(|(to_r, _)| !*to_r).count(),
    );
    assert!(requests >= 2 && responses >= 2, "{requests} {responses}");
    // Each leaves as a datagram of at most 1280 bytes with UDP, IP and the marker.
    assert!(auth.iter().all(|(_, d)| d.len() + 4 + 8 + 20 <= 1280));
}
