//! The etcd source against real etcd processes: what a server's store shows after
//! writes, deletes, lease expiry, malformed and foreign entries, a member crash in a
//! 3-member cluster, and an etcd restart.

#[path = "support/etcd.rs"]
mod etcd_support;

use etcd_support::EtcdCluster;
use isthmus_clustermesh_api::model::key;
use isthmus_clustermesh_api::model::Invalid;
use isthmus_clustermesh_api::pb::{self, object::Body, Kind, Object, ObjectKey};
use isthmus_clustermesh_api::source::etcd::{
    self, EtcdKeyLayout, EtcdObjectWriter, EtcdSourceConfig, EtcdSourceStats, EtcdWriteError,
    EtcdWriterConfig, Written, DEFAULT_ROOT,
};
use isthmus_clustermesh_api::source::Publisher;
use isthmus_clustermesh_api::store::{Change, Store, DEFAULT_HISTORY};
use isthmus_identity::ClusterName;
use prost::Message;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Deadline for a change to reach the store.
const SEEN_WITHIN: Duration = Duration::from_secs(15);

fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).expect("cluster name")
}

fn service(cluster: &str, name: &str, port: u32) -> Object {
    Object {
        key: Some(key(cluster, Kind::Service, "default", name)),
        uid: String::new(),
        revision: 0,
        body: Some(Body::Service(pb::Service {
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port,
                protocol: "TCP".into(),
            }],
            global: true,
            shared: true,
            ..Default::default()
        })),
    }
}

fn gateway(cluster: &str, name: &str, spiffe_cluster: &str) -> Object {
    Object {
        key: Some(key(cluster, Kind::Gateway, "", name)),
        uid: String::new(),
        revision: 0,
        body: Some(Body::Gateway(pb::Gateway {
            spiffe_id: format!("spiffe://m.test/cluster/{spiffe_cluster}/gateway/{name}"),
            channel_endpoint: "192.0.2.1:7443".into(),
            kinds: vec![pb::TunnelKind::Wireguard as i32],
            ..Default::default()
        })),
    }
}

fn port_of(obj: &Object) -> u32 {
    match &obj.body {
        Some(Body::Service(s)) => s.ports.first().map_or(0, |p| p.port),
        _ => 0,
    }
}

/// A server's publisher fed by a running etcd source.
struct Source {
    publisher: Publisher,
    stats: Arc<EtcdSourceStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_source(cluster_name: &str, endpoints: Vec<String>) -> Source {
    let publisher = Publisher::new(Store::new(cluster(cluster_name), 1, DEFAULT_HISTORY));
    let mut config = EtcdSourceConfig::new(endpoints);
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config.connection.connect_timeout = Duration::from_secs(1);
    config.connection.request_timeout = Duration::from_secs(3);
    let stats = config.stats.clone();
    let p = publisher.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = etcd::run(p, config).await {
            panic!("etcd source stopped: {e}");
        }
    });
    Source {
        publisher,
        stats,
        task,
    }
}

async fn writer(cluster_name: &str, endpoints: Vec<String>) -> EtcdObjectWriter {
    let mut config = EtcdWriterConfig::new(cluster(cluster_name), endpoints);
    config.connection.connect_timeout = Duration::from_secs(1);
    config.connection.request_timeout = Duration::from_secs(3);
    EtcdObjectWriter::connect(config).await.expect("writer")
}

/// A plain etcd client, for writing what the writer refuses to write.
async fn raw_client(endpoints: &[String]) -> etcd_client::Client {
    etcd_client::Client::connect(endpoints, None)
        .await
        .expect("raw etcd client")
}

async fn wait_synced(publisher: &Publisher) {
    let mut synced = publisher.synced();
    tokio::time::timeout(SEEN_WITHIN, synced.wait_for(|s| *s))
        .await
        .expect("the source syncs in time")
        .expect("synced channel open");
}

/// Waits until the store satisfies `pred`.
async fn wait_until(publisher: &Publisher, what: &str, pred: impl Fn(&Store) -> bool) {
    let deadline = Instant::now() + SEEN_WITHIN;
    loop {
        {
            let store = publisher.lock();
            if pred(&store) {
                return;
            }
            if Instant::now() > deadline {
                let keys: Vec<String> = store
                    .objects()
                    .map(|o| format!("{:?} uid={} rev={}", o.key, o.uid, o.revision))
                    .collect();
                panic!("timed out waiting for {what}; store holds {keys:#?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn get(store: &Store, k: &ObjectKey) -> Option<Object> {
    store.objects().find(|o| o.key.as_ref() == Some(k)).cloned()
}

fn subscribe(publisher: &Publisher) -> broadcast::Receiver<Arc<Change>> {
    let guard = publisher.lock();
    publisher.subscribe_locked(&guard)
}

async fn next_change(rx: &mut broadcast::Receiver<Arc<Change>>) -> Change {
    let change = tokio::time::timeout(SEEN_WITHIN, rx.recv())
        .await
        .expect("a change in time")
        .expect("change stream open");
    (*change).clone()
}

async fn no_more_changes(rx: &mut broadcast::Receiver<Arc<Change>>, within: Duration) {
    if let Ok(c) = tokio::time::timeout(within, rx.recv()).await {
        panic!("unexpected change: {c:?}");
    }
}

fn svc_key(cluster: &str, name: &str) -> ObjectKey {
    key(cluster, Kind::Service, "default", name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_updates_and_deletes_reach_the_store_with_etcd_uids_and_revisions() {
    let etcd = EtcdCluster::single().await;
    let w = writer("a", etcd.endpoints()).await;
    let pre = w.put(&service("a", "pre", 443)).await.expect("put pre");

    let source = start_source("a", etcd.endpoints());
    wait_synced(&source.publisher).await;
    {
        let store = source.publisher.lock();
        let got = get(&store, &svc_key("a", "pre")).expect("listed at sync");
        assert_eq!(
            (got.uid.as_str(), got.revision),
            (pre.uid.as_str(), pre.revision)
        );
        assert_eq!(store.len(), 1);
    }
    let mut rx = subscribe(&source.publisher);

    let created = w.put(&service("a", "web", 80)).await.expect("put");
    match next_change(&mut rx).await {
        Change::Upsert(o) => {
            assert_eq!(o.key, Some(svc_key("a", "web")));
            assert_eq!(
                (o.uid.clone(), o.revision, port_of(&o)),
                (created.uid.clone(), created.revision, 80)
            );
        }
        other => panic!("expected the new service, got {other:?}"),
    }

    let updated = w.put(&service("a", "web", 8080)).await.expect("update");
    assert_eq!(updated.uid, created.uid, "an update keeps the uid");
    assert!(updated.revision > created.revision);
    match next_change(&mut rx).await {
        Change::Upsert(o) => {
            assert_eq!(
                (o.uid.clone(), o.revision, port_of(&o)),
                (created.uid.clone(), updated.revision, 8080)
            );
        }
        other => panic!("expected the update, got {other:?}"),
    }

    assert!(w.delete(&svc_key("a", "web")).await.expect("delete"));
    assert!(
        !w.delete(&svc_key("a", "web")).await.expect("delete again"),
        "nothing left to delete"
    );
    match next_change(&mut rx).await {
        Change::Delete(d) => {
            assert_eq!(d.key, Some(svc_key("a", "web")));
            assert_eq!(d.uid, created.uid);
        }
        other => panic!("expected the delete, got {other:?}"),
    }
    let store = source.publisher.lock();
    assert!(get(&store, &svc_key("a", "web")).is_none());
    assert!(get(&store, &svc_key("a", "pre")).is_some());
    assert_eq!(source.stats.malformed(), 0);
    assert_eq!(source.stats.session_failures(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_key_gets_a_new_uid_that_a_late_delete_of_the_old_one_does_not_remove() {
    let etcd = EtcdCluster::single().await;
    let w = writer("a", etcd.endpoints()).await;
    let source = start_source("a", etcd.endpoints());
    wait_synced(&source.publisher).await;
    let mut rx = subscribe(&source.publisher);
    let k = svc_key("a", "web");

    let first: Written = w.put(&service("a", "web", 80)).await.expect("put");
    assert!(w.delete(&k).await.expect("delete"));
    let second = w.put(&service("a", "web", 80)).await.expect("put again");
    assert_ne!(first.uid, second.uid, "a re-created key has a new uid");

    assert!(matches!(next_change(&mut rx).await, Change::Upsert(o) if o.uid == first.uid));
    assert!(matches!(next_change(&mut rx).await, Change::Delete(d) if d.uid == first.uid));
    assert!(matches!(next_change(&mut rx).await, Change::Upsert(o) if o.uid == second.uid));

    // A delete of the first incarnation arriving late leaves the second one alone.
    source.publisher.delete(&k, Some(&first.uid), 0);
    {
        let store = source.publisher.lock();
        assert_eq!(get(&store, &k).map(|o| o.uid), Some(second.uid.clone()));
    }
    // And the real delete removes it.
    assert!(w.delete(&k).await.expect("delete"));
    assert!(matches!(next_change(&mut rx).await, Change::Delete(d) if d.uid == second.uid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_registered_gateway_disappears_after_its_ttl_once_keepalives_stop() {
    let etcd = EtcdCluster::single().await;
    let w = writer("a", etcd.endpoints()).await;
    let source = start_source("a", etcd.endpoints());
    wait_synced(&source.publisher).await;
    let ttl = Duration::from_secs(2);
    let gw_key = key("a", Kind::Gateway, "", "gw-1");

    // Only gateways live under a lease.
    assert!(matches!(
        w.register_gateway(&service("a", "web", 80), ttl).await,
        Err(EtcdWriteError::NotAGateway { .. })
    ));

    let registration = w
        .register_gateway(&gateway("a", "gw-1", "a"), ttl)
        .await
        .expect("register");
    assert_eq!(registration.key(), &gw_key);
    wait_until(&source.publisher, "the gateway", |s| {
        get(s, &gw_key).is_some()
    })
    .await;
    let mut rx = subscribe(&source.publisher);

    // Kept alive well past its TTL.
    no_more_changes(&mut rx, ttl * 2 + Duration::from_millis(500)).await;
    assert!(get(&source.publisher.lock(), &gw_key).is_some());

    // The process "dies": keepalives stop, the lease runs out, etcd deletes the key.
    let stopped = Instant::now();
    drop(registration);
    match next_change(&mut rx).await {
        Change::Delete(d) => assert_eq!(d.key, Some(gw_key.clone())),
        other => panic!("expected the gateway's delete, got {other:?}"),
    }
    let after = stopped.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after <= ttl + Duration::from_secs(4),
        "deleted {after:?} after the keepalives stopped (ttl {ttl:?})"
    );
    assert!(get(&source.publisher.lock(), &gw_key).is_none());

    // A graceful stop withdraws it at once.
    let registration = w
        .register_gateway(&gateway("a", "gw-1", "a"), Duration::from_secs(30))
        .await
        .expect("register again");
    wait_until(&source.publisher, "the gateway again", |s| {
        get(s, &gw_key).is_some()
    })
    .await;
    let revoked = Instant::now();
    registration.revoke().await.expect("revoke");
    wait_until(&source.publisher, "the revoked gateway's delete", |s| {
        get(s, &gw_key).is_none()
    })
    .await;
    assert!(revoked.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dropped_counted_and_the_source_keeps_going() {
    let etcd = EtcdCluster::single().await;
    let layout = EtcdKeyLayout::new(DEFAULT_ROOT).expect("layout");
    let a = cluster("a");
    let mut raw = raw_client(&etcd.endpoints()).await;
    let w = writer("a", etcd.endpoints()).await;

    // Present before the source starts: skipped by the listing.
    let bad_path = layout.etcd_key(&svc_key("a", "garbage")).expect("key");
    raw.put(bad_path, b"\xff\xffnot protobuf".to_vec(), None)
        .await
        .expect("raw put");
    w.put(&service("a", "good", 80)).await.expect("put");

    let source = start_source("a", etcd.endpoints());
    wait_synced(&source.publisher).await;
    assert_eq!(source.stats.malformed(), 1);
    {
        let store = source.publisher.lock();
        assert_eq!(store.len(), 1);
        assert!(get(&store, &svc_key("a", "good")).is_some());
    }

    // Arriving through the watch: an undecodable value, and a key outside the layout.
    let bad_path = layout.etcd_key(&svc_key("a", "garbage2")).expect("key");
    raw.put(bad_path, vec![0x0a, 0xff, 0x01], None)
        .await
        .expect("raw put");
    let odd_key = format!("{}not-a-kind/x", layout.cluster_prefix(&a));
    raw.put(odd_key, service("a", "x", 1).encode_to_vec(), None)
        .await
        .expect("raw put");
    // A good write after them: once it shows, the bad ones were processed.
    w.put(&service("a", "after", 81)).await.expect("put");
    wait_until(&source.publisher, "the write after the bad ones", |s| {
        get(s, &svc_key("a", "after")).is_some()
    })
    .await;
    assert_eq!(source.stats.malformed(), 3);
    assert_eq!(source.publisher.lock().len(), 2);

    // A good object whose value turns bad is withdrawn, as a listing would leave it out.
    let good_path = layout.etcd_key(&svc_key("a", "good")).expect("key");
    raw.put(good_path, b"garbage".to_vec(), None)
        .await
        .expect("raw put");
    wait_until(&source.publisher, "the spoiled object's withdrawal", |s| {
        get(s, &svc_key("a", "good")).is_none()
    })
    .await;
    assert_eq!(source.stats.malformed(), 4);

    // Still watching, on the same session.
    w.put(&service("a", "last", 82)).await.expect("put");
    wait_until(&source.publisher, "a later write", |s| {
        get(s, &svc_key("a", "last")).is_some()
    })
    .await;
    assert_eq!(source.stats.session_failures(), 0);
    assert_eq!(source.stats.listings(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clusters_objects_are_refused_by_the_writer_and_the_source() {
    let etcd = EtcdCluster::single().await;
    let layout = EtcdKeyLayout::new(DEFAULT_ROOT).expect("layout");
    let w = writer("a", etcd.endpoints()).await;
    let source = start_source("a", etcd.endpoints());
    wait_synced(&source.publisher).await;

    // The writer refuses another cluster's keys, and a gateway claiming another
    // cluster's identity, before anything reaches etcd.
    for (obj, claimed) in [
        (service("b", "web", 80), "b"),
        (gateway("a", "gw", "b"), "b"),
    ] {
        match w.put(&obj).await {
            Err(EtcdWriteError::Refused(Invalid::ForeignCluster { claimed: c, .. })) => {
                assert_eq!(c, claimed)
            }
            other => panic!("expected a foreign-cluster refusal, got {other:?}"),
        }
    }
    assert!(matches!(
        w.delete(&svc_key("b", "web")).await,
        Err(EtcdWriteError::Refused(Invalid::ForeignCluster { .. }))
    ));
    let mut raw = raw_client(&etcd.endpoints()).await;
    let (all, _) = {
        let resp = raw
            .get(
                DEFAULT_ROOT,
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .expect("get");
        (resp.kvs().len(), ())
    };
    assert_eq!(all, 0, "nothing was written");

    // Cluster b's own writer writes under b's prefix: a's source never sees it.
    let wb = writer("b", etcd.endpoints()).await;
    wb.put(&service("b", "web", 80)).await.expect("b writes b");

    // Written around the writer under a's prefix: a value naming cluster b (dropped as
    // malformed: its key disagrees with the etcd key), and a gateway of a whose
    // identity is b's (refused by the store).
    let path = layout.etcd_key(&svc_key("a", "web")).expect("key");
    raw.put(path, service("b", "web", 80).encode_to_vec(), None)
        .await
        .expect("raw put");
    let gw_path = layout
        .etcd_key(&key("a", Kind::Gateway, "", "gw"))
        .expect("key");
    raw.put(gw_path, gateway("a", "gw", "b").encode_to_vec(), None)
        .await
        .expect("raw put");

    w.put(&service("a", "ok", 80)).await.expect("put");
    wait_until(&source.publisher, "the valid write", |s| {
        get(s, &svc_key("a", "ok")).is_some()
    })
    .await;
    let store = source.publisher.lock();
    let keys: Vec<_> = store.objects().filter_map(|o| o.key.clone()).collect();
    assert_eq!(
        keys,
        vec![svc_key("a", "ok")],
        "only a's valid object is served"
    );
    assert_eq!(source.stats.malformed(), 1);
    assert_eq!(store.refused(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_keeps_feeding_the_source_with_any_one_member_down() {
    let mut etcd = EtcdCluster::start(3).await;
    let w = writer("a", etcd.endpoints()).await;
    let source = start_source("a", etcd.endpoints());
    wait_synced(&source.publisher).await;
    let epoch = source.publisher.lock().epoch();
    w.put(&service("a", "s0", 80)).await.expect("put");
    wait_until(&source.publisher, "s0", |s| {
        get(s, &svc_key("a", "s0")).is_some()
    })
    .await;

    // Kill each member in turn: whichever one the source's watch is on goes down once.
    for i in 0..3 {
        etcd.kill(i);
        let name = format!("s{}", i + 1);
        // A put right after a crash may time out while a new leader is elected (the
        // writer itself only retries requests no member took): retry briefly.
        let deadline = Instant::now() + SEEN_WITHIN;
        loop {
            match w.put(&service("a", &name, 80)).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("put {name} with member {i} down: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("put {name} with member {i} down: {e}"),
            }
        }
        wait_until(&source.publisher, &name, |s| {
            get(s, &svc_key("a", &name)).is_some()
        })
        .await;
        etcd.restart(i).await;
    }
    let store = source.publisher.lock();
    assert_eq!(store.len(), 4);
    assert_eq!(store.epoch(), epoch, "same etcd cluster, same epoch");
    assert!(
        source.stats.session_failures() >= 1,
        "the member serving the watch was killed at least once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_etcd_restart_the_source_relists_only_real_changes_and_keeps_its_epoch() {
    let mut etcd = EtcdCluster::single().await;
    let w = writer("a", etcd.endpoints()).await;
    for (name, port) in [("gone", 1), ("changed", 2), ("same", 3)] {
        w.put(&service("a", name, port)).await.expect("put");
    }
    let source = start_source("a", etcd.endpoints());
    wait_synced(&source.publisher).await;
    let epoch = source.publisher.lock().epoch();
    let same_before = get(&source.publisher.lock(), &svc_key("a", "same")).expect("same");
    let mut rx = subscribe(&source.publisher);

    // etcd crashes; while the source cannot reach it (it comes back on another client
    // port, same data directory), the state changes.
    let port = etcd.client_port(0);
    etcd.kill(0);
    let elsewhere = etcd.restart_on_port(0, EtcdCluster::free_port()).await;
    {
        let w2 = writer("a", vec![elsewhere]).await;
        assert!(w2.delete(&svc_key("a", "gone")).await.expect("delete"));
        w2.put(&service("a", "changed", 20)).await.expect("update");
        w2.put(&service("a", "new", 4)).await.expect("create");
    }
    etcd.kill(0);
    etcd.restart_on_port(0, port).await;

    // The source reconnects and lists again: exactly the three real changes.
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(match next_change(&mut rx).await {
            Change::Upsert(o) => format!(
                "upsert {} {}",
                o.key.as_ref().map(|k| k.name.clone()).unwrap_or_default(),
                port_of(&o)
            ),
            Change::Delete(d) => format!("delete {}", d.key.map(|k| k.name).unwrap_or_default()),
        });
    }
    seen.sort();
    assert_eq!(seen, ["delete gone", "upsert changed 20", "upsert new 4"]);
    no_more_changes(&mut rx, Duration::from_millis(500)).await;
    {
        let store = source.publisher.lock();
        assert_eq!(
            store.epoch(),
            epoch,
            "same etcd cluster, same epoch: clients resume"
        );
        assert_eq!(get(&store, &svc_key("a", "same")), Some(same_before));
        assert_eq!(store.len(), 3);
    }
    assert!(
        source.stats.listings() >= 2,
        "listed again after reconnecting"
    );
    assert!(source.stats.session_failures() >= 1);

    // The new watch carries on, and the writer from before the crash still works.
    w.put(&service("a", "later", 5))
        .await
        .expect("put after restart");
    match next_change(&mut rx).await {
        Change::Upsert(o) => assert_eq!(o.key, Some(svc_key("a", "later"))),
        other => panic!("expected the later write, got {other:?}"),
    }
}
