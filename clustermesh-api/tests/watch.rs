//! The watch protocol end to end over real mTLS on loopback: snapshot only after the
//! source synced, deltas, bookmarks, resume after a server restart, explicit resyncs,
//! and identity checks in both directions.

mod support;

use isthmus_clustermesh_api::client::ClientEvent;
use isthmus_clustermesh_api::pb::watch_event::Event;
use isthmus_clustermesh_api::reducer::{MeshView, ReducerConfig};
use std::time::{Duration, Instant};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_waits_for_the_source_then_deltas_and_bookmarks_follow() {
    let pki = Pki::new("m.test");
    let publisher = publisher("b", 11);
    publisher
        .upsert(cluster_obj("b", 2, "100.64.2.0/24"))
        .expect("ok");
    let server = TestServer::start(&pki, publisher.clone(), None).await;
    let (_w, mut rx) = watch(&pki, "a", "b", server.addr);
    assert_eq!(take(&mut rx, 1).await, ["connected"]);
    // Not synced: the server holds the snapshot back.
    let early = tokio::time::timeout(Duration::from_millis(600), next(&mut rx, 1)).await;
    assert!(
        early.is_err(),
        "no snapshot before the source synced: {early:?}"
    );
    publisher.upsert(service_obj("b", "web", "s1")).expect("ok");
    publisher.mark_synced(0);
    assert_eq!(
        take(&mut rx, 4).await,
        ["begin", "upsert b", "upsert web", "end 2"]
    );
    publisher.upsert(service_obj("b", "db", "s2")).expect("ok");
    assert_eq!(take(&mut rx, 1).await, ["upsert db"]);
    // Bookmarks carry the revision on the same stream.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        assert!(Instant::now() < deadline, "no bookmark");
        if let Some(ClientEvent::Event { event, .. }) = rx.recv().await {
            if let Some(Event::Bookmark(b)) = event.event {
                assert_eq!(b.revision, 3);
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_with_the_same_store_resumes_with_deltas_only() {
    let pki = Pki::new("m.test");
    let publisher = publisher("b", 21);
    publisher
        .upsert(cluster_obj("b", 2, "100.64.2.0/24"))
        .expect("ok");
    publisher.mark_synced(0);
    let server = TestServer::start(&pki, publisher.clone(), None).await;
    let addr = server.addr;
    let (_w, mut rx) = watch(&pki, "a", "b", addr);
    assert_eq!(
        take(&mut rx, 4).await,
        ["connected", "begin", "upsert b", "end 1"]
    );
    drop(server);
    assert_eq!(take(&mut rx, 1).await, ["disconnected"]);
    // Changes while the server is away: the store keeps them in its history.
    publisher.upsert(service_obj("b", "web", "s1")).expect("ok");
    let _server = TestServer::start(&pki, publisher.clone(), Some(addr)).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let d = describe(&next(&mut rx, 10).await);
        if d != "disconnected" {
            seen.push(d);
        }
    }
    assert_eq!(
        seen,
        ["connected", "upsert web"],
        "resumed without a snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_epoch_or_a_compacted_revision_is_an_explicit_resync() {
    let pki = Pki::new("m.test");
    let first = publisher("b", 31);
    first
        .upsert(cluster_obj("b", 2, "100.64.2.0/24"))
        .expect("ok");
    first.upsert(service_obj("b", "web", "s1")).expect("ok");
    first.mark_synced(0);
    let server = TestServer::start(&pki, first, None).await;
    let addr = server.addr;
    let (_w, mut rx) = watch(&pki, "a", "b", addr);
    assert_eq!(take(&mut rx, 5).await[4], "end 2");
    drop(server);
    // The store restarted (new epoch) and lost `web`.
    let second = publisher("b", 32);
    second
        .upsert(cluster_obj("b", 2, "100.64.2.0/24"))
        .expect("ok");
    second.mark_synced(0);
    let _server = TestServer::start(&pki, second.clone(), Some(addr)).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let d = describe(&next(&mut rx, 10).await);
        if d != "disconnected" {
            seen.push(d);
        }
    }
    assert_eq!(
        seen,
        [
            "connected",
            "resync RESYNC_REASON_EPOCH_CHANGED",
            "begin",
            "upsert b",
            "end 1"
        ]
    );
    // The reducer, fed the same stream, sweeps `web` at SnapshotEnd.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reducer_fed_by_a_real_stream_routes_and_sweeps() {
    let pki = Pki::new("m.test");
    let publisher = publisher("b", 41);
    publisher
        .upsert(cluster_obj("b", 2, "100.64.2.0/24"))
        .expect("ok");
    publisher
        .upsert(gateway_obj("m.test", "b", "gw1", "192.0.2.2:7443"))
        .expect("ok");
    publisher.mark_synced(0);
    let server = TestServer::start(&pki, publisher.clone(), None).await;
    let (_w, mut rx) = watch(&pki, "a", "b", server.addr);
    let mut view = MeshView::new(cn("a"), vec![], ReducerConfig::default());
    view.add_cluster(cn("b"), Instant::now());
    let feed = |view: &mut MeshView, ev: ClientEvent| match ev {
        ClientEvent::Connected { cluster, server } => {
            view.connected(&cluster, server, Instant::now());
        }
        ClientEvent::Event { cluster, event } => {
            view.apply(&cluster, event, Instant::now());
        }
        ClientEvent::Disconnected { cluster, reason } => {
            view.disconnected(&cluster, &reason, Instant::now());
        }
    };
    for _ in 0..5 {
        let ev = next(&mut rx, 10).await;
        feed(&mut view, ev);
    }
    let routes = view.routes();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].gateways[0].name, "gw1");
    let status = view.clusters(Instant::now());
    assert_eq!(
        status[0].server.as_deref(),
        Some("spiffe://m.test/cluster/b/gateway/clustermesh-api")
    );
    // The gateway goes away: a delete with its uid removes it.
    publisher.delete(
        &isthmus_clustermesh_api::model::key(
            "b",
            isthmus_clustermesh_api::pb::Kind::Gateway,
            "",
            "gw1",
        ),
        None,
        0,
    );
    let ev = next(&mut rx, 10).await;
    assert_eq!(describe(&ev), "delete gw1");
    feed(&mut view, ev);
    assert!(view.routes()[0].gateways.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_of_another_cluster_or_a_client_of_another_mesh_is_refused() {
    let pki = Pki::new("m.test");
    let publisher = publisher("b", 51);
    publisher
        .upsert(cluster_obj("b", 2, "100.64.2.0/24"))
        .expect("ok");
    publisher.mark_synced(0);
    let server = TestServer::start(&pki, publisher, None).await;
    // The gateway expects cluster c's server at this address: b's is refused.
    let (_w, mut rx) = watch(&pki, "a", "c", server.addr);
    match next(&mut rx, 10).await {
        ClientEvent::Disconnected { reason, .. } => {
            assert!(reason.contains("connect failed"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A client whose certificate comes from another mesh root is refused by the server.
    let other = Pki::new("m.test");
    let (_w2, mut rx2) = watch(&other, "a", "b", server.addr);
    assert!(matches!(
        next(&mut rx2, 10).await,
        ClientEvent::Disconnected { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_take_every_watch_slot() {
    let pki = Pki::new("m.test");
    let publisher = publisher("b", 61);
    publisher
        .upsert(cluster_obj("b", 2, "100.64.2.0/24"))
        .expect("ok");
    publisher.mark_synced(0);
    let server = TestServer::start(&pki, publisher, None).await;
    let tls = isthmus_identity::MeshTls::new(pki.gateway("a", "gw"), &pki.trust()).expect("tls");
    let client_tls = tls
        .client_config(
            isthmus_identity::PeerPolicy::GatewayOfCluster(pki.td.clone(), cn("b")),
            isthmus_clustermesh_api::ALPN,
        )
        .expect("client config");
    let mut handles = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        handles.push(isthmus_clustermesh_api::client::spawn_watch(
            isthmus_clustermesh_api::client::WatchTarget {
                cluster: cn("b"),
                endpoint: server.addr,
            },
            client_tls.clone(),
            Default::default(),
            tx,
        ));
        match next(&mut rx, 10).await {
            ClientEvent::Connected { .. } => {
                // Keep it open: the receiver goes with the handle's stream.
                std::mem::forget(rx);
            }
            ClientEvent::Disconnected { reason, .. } => {
                assert!(reason.contains("from this identity"), "{reason}");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        refused, 2,
        "8 streams per identity, the 9th and 10th refused"
    );
    // Another identity still gets in.
    let (_w, mut rx) = watch(&pki, "c", "b", server.addr);
    assert_eq!(take(&mut rx, 2).await, ["connected", "begin"]);
}
