use super::*;
use crate::model::key;
use crate::pb::{Delete, Endpoint, EndpointSlice, Service, SnapshotBegin, SnapshotEnd};

fn name(s: &str) -> ClusterName {
    ClusterName::new(s).expect("cluster name")
}

fn ev(epoch: u64, e: Event) -> WatchEvent {
    WatchEvent {
        epoch,
        event: Some(e),
    }
}

fn cluster_obj(c: &str, id: u32, prefix: &str, uid: &str) -> Object {
    Object {
        key: Some(key(c, Kind::Cluster, "", c)),
        uid: uid.into(),
        revision: 1,
        body: Some(Body::Cluster(pb::ClusterSpec {
            id,
            pod_prefixes: vec![prefix.into()],
            service_prefixes: vec![],
        })),
    }
}

fn gateway_obj(c: &str, gw: &str, ep: &str) -> Object {
    Object {
        key: Some(key(c, Kind::Gateway, "", gw)),
        uid: format!("{gw}-uid"),
        revision: 2,
        body: Some(Body::Gateway(pb::Gateway {
            spiffe_id: format!("spiffe://m.test/cluster/{c}/gateway/{gw}"),
            channel_endpoint: ep.into(),
            kinds: vec![pb::TunnelKind::Wireguard as i32],
            ..Default::default()
        })),
    }
}

fn service_obj(c: &str, svc: &str, uid: &str, rev: u64) -> Object {
    Object {
        key: Some(key(c, Kind::Service, "default", svc)),
        uid: uid.into(),
        revision: rev,
        body: Some(Body::Service(Service {
            global: true,
            shared: true,
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: "TCP".into(),
            }],
            ..Default::default()
        })),
    }
}

fn server(c: &str) -> SpiffeId {
    SpiffeId::parse(&format!(
        "spiffe://m.test/cluster/{c}/gateway/clustermesh-api"
    ))
    .expect("id")
}

struct Fixture {
    view: MeshView,
    t0: Instant,
}

impl Fixture {
    fn new() -> Self {
        let local: IpPrefix = "100.64.1.0/24".parse().expect("prefix");
        Self {
            view: MeshView::new(
                name("a"),
                vec![local],
                ReducerConfig {
                    withdraw_after: Duration::from_secs(30),
                    max_refusals: 4,
                    ..ReducerConfig::default()
                },
            ),
            t0: Instant::now(),
        }
    }

    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    /// Connects `c` and delivers a snapshot of `objects` at `revision`.
    fn snapshot(&mut self, c: &str, epoch: u64, revision: u64, objects: Vec<Object>, t: u64) {
        let now = self.at(t);
        let cn = name(c);
        self.view.add_cluster(cn.clone(), now);
        self.view.connected(&cn, server(c), now);
        self.view
            .apply(&cn, ev(epoch, Event::SnapshotBegin(SnapshotBegin {})), now);
        for o in objects {
            self.view.apply(&cn, ev(epoch, Event::Upsert(o)), now);
        }
        self.view.apply(
            &cn,
            ev(epoch, Event::SnapshotEnd(SnapshotEnd { revision })),
            now,
        );
    }

    fn route_names(&self) -> Vec<String> {
        self.view.routes().into_iter().map(|r| r.name).collect()
    }

    fn status(&self, c: &str, t: u64) -> ClusterStatus {
        self.view
            .clusters(self.at(t))
            .into_iter()
            .find(|s| s.name == c)
            .expect("cluster tracked")
    }
}

#[test]
fn a_cluster_is_routed_only_after_its_first_snapshot() {
    let mut f = Fixture::new();
    let c = name("c");
    f.view.add_cluster(c.clone(), f.at(0));
    f.view.connected(&c, server("c"), f.at(0));
    f.view
        .apply(&c, ev(1, Event::SnapshotBegin(SnapshotBegin {})), f.at(0));
    f.view.apply(
        &c,
        ev(1, Event::Upsert(cluster_obj("c", 3, "100.64.3.0/24", "u"))),
        f.at(0),
    );
    assert!(f.route_names().is_empty(), "no routes before SnapshotEnd");
    assert_eq!(f.status("c", 0).state, Liveness::Connecting);
    let applied = f.view.apply(
        &c,
        ev(1, Event::SnapshotEnd(SnapshotEnd { revision: 5 })),
        f.at(1),
    );
    assert!(applied.routes_changed);
    assert_eq!(f.route_names(), ["c"]);
    let st = f.status("c", 1);
    assert_eq!(
        (st.state, st.epoch, st.revision),
        (Liveness::Connected, 1, 5)
    );
}

#[test]
fn sweep_happens_at_snapshot_end_and_never_after_a_broken_snapshot() {
    let mut f = Fixture::new();
    f.snapshot(
        "c",
        1,
        10,
        vec![
            cluster_obj("c", 3, "100.64.3.0/24", "u"),
            gateway_obj("c", "gw1", "192.0.2.3:7443"),
            service_obj("c", "web", "s1", 4),
            service_obj("c", "db", "s2", 5),
        ],
        0,
    );
    assert_eq!(f.view.services().len(), 2);
    let c = name("c");
    // A resync snapshot that breaks half way: nothing is swept.
    f.view
        .apply(&c, ev(2, Event::SnapshotBegin(SnapshotBegin {})), f.at(1));
    f.view.apply(
        &c,
        ev(2, Event::Upsert(cluster_obj("c", 3, "100.64.3.0/24", "u"))),
        f.at(1),
    );
    f.view.disconnected(&c, "reset", f.at(1));
    assert_eq!(f.view.services().len(), 2, "stale state keeps serving");
    assert_eq!(f.route_names(), ["c"]);
    // The next full snapshot lacks `db` and the gateway: swept at its end only.
    f.view.connected(&c, server("c"), f.at(2));
    f.view
        .apply(&c, ev(2, Event::SnapshotBegin(SnapshotBegin {})), f.at(2));
    for o in [
        cluster_obj("c", 3, "100.64.3.0/24", "u"),
        service_obj("c", "web", "s1", 4),
    ] {
        f.view.apply(&c, ev(2, Event::Upsert(o)), f.at(2));
    }
    assert_eq!(f.view.services().len(), 2, "no sweep before SnapshotEnd");
    let applied = f.view.apply(
        &c,
        ev(2, Event::SnapshotEnd(SnapshotEnd { revision: 12 })),
        f.at(2),
    );
    assert!(applied.routes_changed, "the gateway was swept");
    assert_eq!(f.view.services().len(), 1);
    assert!(f.view.routes()[0].gateways.is_empty());
}

#[test]
fn deletes_remove_only_the_uid_they_name() {
    let mut f = Fixture::new();
    f.snapshot(
        "c",
        1,
        5,
        vec![
            cluster_obj("c", 3, "100.64.3.0/24", "u"),
            service_obj("c", "web", "new-uid", 5),
        ],
        0,
    );
    let c = name("c");
    let late = Delete {
        key: Some(key("c", Kind::Service, "default", "web")),
        uid: "old-uid".into(),
        revision: 6,
    };
    let applied = f.view.apply(&c, ev(1, Event::Delete(late)), f.at(1));
    assert!(!applied.objects_changed);
    assert_eq!(f.view.services().len(), 1);
    let current = Delete {
        key: Some(key("c", Kind::Service, "default", "web")),
        uid: "new-uid".into(),
        revision: 7,
    };
    assert!(
        f.view
            .apply(&c, ev(1, Event::Delete(current)), f.at(1))
            .objects_changed
    );
    assert!(f.view.services().is_empty());
    assert_eq!(f.status("c", 1).revision, 7);
}

#[test]
fn liveness_goes_connected_stale_withdrawn_on_the_ttl_and_back() {
    let mut f = Fixture::new();
    f.snapshot(
        "c",
        1,
        5,
        vec![
            cluster_obj("c", 3, "100.64.3.0/24", "u"),
            gateway_obj("c", "gw1", "192.0.2.3:7443"),
        ],
        0,
    );
    let c = name("c");
    assert!(
        f.view
            .disconnected(&c, "server gone", f.at(10))
            .routes_changed
    );
    assert_eq!(f.status("c", 10).state, Liveness::Stale);
    assert_eq!(f.route_names(), ["c"], "stale clusters keep their routes");
    assert!(!f.view.tick(f.at(39)).routes_changed, "TTL not reached");
    assert_eq!(f.route_names(), ["c"]);
    assert!(f.view.tick(f.at(40)).routes_changed);
    assert_eq!(f.status("c", 40).state, Liveness::Withdrawn);
    assert!(f.route_names().is_empty(), "withdrawn after the TTL");
    assert!(f.view.services().is_empty());
    // Reconnects and resumes (deltas only, no snapshot): routed again at once.
    assert!(f.view.connected(&c, server("c"), f.at(50)).routes_changed);
    assert_eq!(f.route_names(), ["c"]);
    assert_eq!(f.status("c", 50).state, Liveness::Connected);
}

#[test]
fn objects_of_another_cluster_are_refused_and_reported() {
    let mut f = Fixture::new();
    f.snapshot(
        "c",
        1,
        5,
        vec![
            cluster_obj("c", 3, "100.64.3.0/24", "u"),
            // c's server sends b's cluster object and a gateway of b.
            cluster_obj("b", 2, "100.64.2.0/24", "u"),
            gateway_obj("b", "gw1", "192.0.2.2:7443"),
        ],
        0,
    );
    let st = f.status("c", 0);
    assert_eq!(st.objects, 1);
    assert_eq!(st.refusals.len(), 2);
    assert!(
        st.refusals[0].reason.contains("may not publish cluster b"),
        "{st:?}"
    );
    assert_eq!(f.route_names(), ["c"]);
}

#[test]
fn overlapping_prefixes_and_ids_are_refused_first_announcer_keeps_them() {
    let mut f = Fixture::new();
    f.snapshot(
        "b",
        1,
        5,
        vec![cluster_obj("b", 2, "100.64.2.0/24", "u")],
        0,
    );
    // c claims a prefix inside b's, d one overlapping the local cluster's, e b's id.
    f.snapshot(
        "c",
        1,
        5,
        vec![cluster_obj("c", 3, "100.64.2.128/25", "u")],
        1,
    );
    f.snapshot(
        "d",
        1,
        5,
        vec![cluster_obj("d", 4, "100.64.0.0/16", "u")],
        1,
    );
    f.snapshot(
        "e",
        1,
        5,
        vec![cluster_obj("e", 2, "100.64.5.0/24", "u")],
        1,
    );
    assert_eq!(f.route_names(), ["b"]);
    let c = f.status("c", 1);
    assert!(
        c.refusals[0]
            .reason
            .contains("overlaps cluster b's 100.64.2.0/24"),
        "{c:?}"
    );
    let d = f.status("d", 1);
    assert!(d.refusals[0].reason.contains("this cluster's (a)"), "{d:?}");
    let e = f.status("e", 1);
    assert!(e.refusals[0].reason.contains("cluster id 2"), "{e:?}");
    // A refused update does not remove the accepted version at the next sweep.
    let cn = name("b");
    f.snapshot(
        "x",
        1,
        5,
        vec![cluster_obj("x", 9, "100.64.9.0/24", "u")],
        2,
    );
    f.view
        .apply(&cn, ev(1, Event::SnapshotBegin(SnapshotBegin {})), f.at(3));
    f.view.apply(
        &cn,
        ev(1, Event::Upsert(cluster_obj("b", 2, "100.64.9.0/25", "u"))),
        f.at(3),
    );
    f.view.apply(
        &cn,
        ev(1, Event::SnapshotEnd(SnapshotEnd { revision: 9 })),
        f.at(3),
    );
    let b = f
        .view
        .routes()
        .into_iter()
        .find(|r| r.name == "b")
        .expect("b routed");
    assert_eq!(
        b.prefixes,
        vec!["100.64.2.0/24".parse::<IpPrefix>().expect("p")]
    );
}

#[test]
fn the_api_server_cannot_announce_itself_as_a_gateway() {
    let mut f = Fixture::new();
    f.snapshot(
        "c",
        1,
        5,
        vec![
            cluster_obj("c", 3, "100.64.3.0/24", "u"),
            gateway_obj("c", "clustermesh-api", "192.0.2.3:7444"),
            gateway_obj("c", "gw1", "192.0.2.3:7443"),
        ],
        0,
    );
    let routes = f.view.routes();
    assert_eq!(routes[0].gateways.len(), 1);
    assert_eq!(routes[0].gateways[0].name, "gw1");
    assert!(f.status("c", 0).refusals[0]
        .reason
        .contains("its own identity"));
}

#[test]
fn services_carry_the_endpoints_of_sharing_clusters() {
    let mut f = Fixture::new();
    let slice = |c: &str, ip: &str, ready: bool| Object {
        key: Some(key(c, Kind::EndpointSlice, "default", "web-abc")),
        uid: "sl".into(),
        revision: 3,
        body: Some(Body::EndpointSlice(EndpointSlice {
            service: "web".into(),
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec![ip.into()],
                ready,
                serving: ready,
                terminating: !ready,
                ..Default::default()
            }],
            ports: vec![],
        })),
    };
    f.snapshot(
        "b",
        1,
        5,
        vec![
            cluster_obj("b", 2, "100.64.2.0/24", "u"),
            service_obj("b", "web", "s", 4),
            slice("b", "100.64.2.10", true),
        ],
        0,
    );
    f.snapshot(
        "c",
        1,
        5,
        vec![
            cluster_obj("c", 3, "100.64.3.0/24", "u"),
            service_obj("c", "web", "s", 4),
            slice("c", "100.64.3.10", false),
        ],
        0,
    );
    let s = f.view.services();
    assert_eq!(s.len(), 1, "one global service exported by two clusters");
    assert_eq!(s[0].ports, ["80/TCP"]);
    let backends: Vec<_> = s[0]
        .backends
        .iter()
        .map(|b| {
            (
                b.cluster.as_str(),
                b.endpoints[0].address.as_str(),
                b.endpoints[0].ready,
            )
        })
        .collect();
    assert_eq!(
        backends,
        [("b", "100.64.2.10", true), ("c", "100.64.3.10", false)]
    );
}

// ---- found by a security review (each failed before its fix) ----

#[test]
fn a_withdrawn_cluster_that_comes_back_is_checked_again() {
    let mut f = Fixture::new();
    f.snapshot(
        "b",
        1,
        5,
        vec![cluster_obj("b", 2, "100.64.2.0/24", "u")],
        0,
    );
    let b = name("b");
    f.view.disconnected(&b, "api down", f.at(1));
    f.view.tick(f.at(40)); // stale for > 30 s: withdrawn
    assert_eq!(f.status("b", 40).state, Liveness::Withdrawn);
    // While b is withdrawn, c grabs a more specific part of b's prefix.
    f.snapshot(
        "c",
        1,
        5,
        vec![cluster_obj("c", 3, "100.64.2.128/25", "u")],
        41,
    );
    // b's API comes back and resumes (no snapshot): its old cluster object is
    // routed again without being checked against c.
    f.view.connected(&b, server("b"), f.at(42));
    let routes = f.view.routes();
    let mut all: Vec<(String, IpPrefix)> = Vec::new();
    for r in &routes {
        for p in &r.prefixes {
            all.push((r.name.clone(), *p));
        }
    }
    for (i, (n1, p1)) in all.iter().enumerate() {
        for (n2, p2) in &all[i + 1..] {
            assert!(
                n1 == n2 || !(p1.contains(p2.addr()) || p2.contains(p1.addr())),
                "two routed clusters overlap: {n1} {p1} and {n2} {p2}"
            );
        }
    }
}

#[test]
fn a_delete_of_the_refused_uid_removes_the_key() {
    let mut f = Fixture::new();
    f.snapshot(
        "b",
        1,
        5,
        vec![cluster_obj("b", 2, "100.64.2.0/24", "u1")],
        0,
    );
    let b = name("b");
    // The server replaces b's cluster object (uid u2) with one the gateway refuses…
    f.view.apply(
        &b,
        ev(1, Event::Upsert(cluster_obj("b", 2, "100.64.1.0/24", "u2"))),
        f.at(1),
    );
    // …and then deletes it: the server holds no cluster object for b any more.
    f.view.apply(
        &b,
        ev(
            1,
            Event::Delete(Delete {
                key: Some(key("b", Kind::Cluster, "", "b")),
                uid: "u2".into(),
                revision: 7,
            }),
        ),
        f.at(2),
    );
    assert!(
        f.route_names().is_empty(),
        "b's deleted cluster object still routes {:?}",
        f.view.routes()
    );
}

#[test]
fn refusal_reasons_are_bounded_and_printable() {
    let mut f = Fixture::new();
    f.snapshot(
        "b",
        1,
        5,
        vec![cluster_obj("b", 2, "100.64.2.0/24", "u")],
        0,
    );
    let b = name("b");
    let mut evil = cluster_obj("b", 2, "100.64.2.0/24", "u");
    evil.key = Some(key(
        &format!(
            "\u{1b}]52;c;cm0gLXJmIH4K\u{7}\u{1b}[2J{}",
            "x".repeat(1 << 20)
        ),
        Kind::Cluster,
        "",
        "b",
    ));
    f.view.apply(&b, ev(1, Event::Upsert(evil)), f.at(1));
    let s = f.status("b", 1);
    let r = &s.refusals.last().expect("refused").reason;
    assert!(
        !r.chars().any(|c| c.is_control()),
        "control characters in {:?}",
        &r[..64]
    );
    assert!(r.len() <= 4096, "refusal reason of {} bytes", r.len());
}

#[test]
fn objects_per_cluster_are_bounded() {
    let mut f = Fixture::new();
    f.snapshot(
        "b",
        1,
        5,
        vec![cluster_obj("b", 2, "100.64.2.0/24", "u")],
        0,
    );
    let b = name("b");
    for i in 0..300_000u64 {
        f.view.apply(
            &b,
            ev(
                1,
                Event::Upsert(service_obj("b", &format!("s{i}"), "u", 10 + i)),
            ),
            f.at(1),
        );
    }
    assert!(
        f.status("b", 1).objects < 300_000,
        "a server can make the gateway hold any number of objects"
    );
}

#[test]
fn a_remote_cluster_cannot_claim_non_mesh_space() {
    // 128.0.0.0/1 overlaps neither the local prefix nor another cluster: today it is
    // accepted and the gateway runs `ip route replace 128.0.0.0/1 dev <tun>`.
    let mut f = Fixture::new();
    f.snapshot("b", 1, 5, vec![cluster_obj("b", 2, "128.0.0.0/1", "u")], 0);
    assert!(f.route_names().is_empty(), "{:?}", f.view.routes());
}

#[test]
fn a_prefix_holding_a_gateway_channel_endpoint_is_not_routed() {
    let mut f = Fixture::new();
    // c announces the underlay range where b's gateway listens: its tunnel would carry
    // b's channel (and itself).
    f.snapshot(
        "b",
        1,
        5,
        vec![
            cluster_obj("b", 2, "100.64.2.0/24", "u"),
            gateway_obj("b", "gw1", "10.9.0.2:7443"),
        ],
        0,
    );
    f.snapshot("c", 1, 5, vec![cluster_obj("c", 3, "10.9.0.0/16", "u")], 1);
    assert_eq!(f.route_names(), ["b"]);
    let c = f.status("c", 1);
    assert!(
        c.conflict
            .as_deref()
            .is_some_and(|r| r.contains("channel endpoint")),
        "{c:?}"
    );
}

#[test]
fn a_cluster_publishes_only_identities_of_its_own_cluster_id() {
    let mut f = Fixture::new();
    let identity = |id: u64| Object {
        key: Some(key("b", Kind::Identity, "", &id.to_string())),
        uid: format!("i{id}"),
        revision: 3,
        body: Some(Body::Identity(pb::Identity {
            id,
            labels: Default::default(),
        })),
    };
    let own = (2u64 << 32) | 7;
    let foreign = (3u64 << 32) | 7;
    f.snapshot(
        "b",
        1,
        5,
        vec![
            cluster_obj("b", 2, "100.64.2.0/24", "u"),
            identity(own),
            identity(foreign),
        ],
        0,
    );
    let b = f.status("b", 0);
    assert_eq!(b.objects, 2, "the cluster and its own identity: {b:?}");
    assert!(
        b.refusals[0].reason.contains("of another cluster id"),
        "{b:?}"
    );
}
