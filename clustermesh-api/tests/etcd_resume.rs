//! A watcher of an etcd-backed API server across server restarts: the epoch comes from
//! the etcd cluster, so a restarted server with nothing changed is resumed without a
//! snapshot; changes made while the server was down are beyond its history, so the
//! watcher is told to resync (explicitly) and gets a snapshot.

#[path = "support/etcd.rs"]
mod etcd_support;
mod support;

use etcd_support::EtcdCluster;
use isthmus_clustermesh_api::model::key;
use isthmus_clustermesh_api::pb::Kind;
use isthmus_clustermesh_api::source::etcd::{
    self, EtcdObjectWriter, EtcdSourceConfig, EtcdWriterConfig,
};
use isthmus_clustermesh_api::source::Publisher;
use isthmus_clustermesh_api::store::{Store, DEFAULT_HISTORY};
use support::*;

fn etcd_publisher(etcd: &EtcdCluster) -> Publisher {
    let publisher = Publisher::new(Store::new(cn("b"), 1, DEFAULT_HISTORY));
    let source = publisher.clone();
    let config = EtcdSourceConfig::new(etcd.endpoints());
    tokio::spawn(async move {
        let _ = etcd::run(source, config).await;
    });
    publisher
}

/// Events until (and including) one matching `last`, skipping disconnects.
async fn until(
    rx: &mut tokio::sync::mpsc::Receiver<isthmus_clustermesh_api::client::ClientEvent>,
    last: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let d = describe(&next(rx, 20).await);
        if d == "disconnected" {
            continue;
        }
        let done = d.starts_with(last);
        seen.push(d);
        if done {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_resume_when_nothing_was_missed_and_resync_when_history_is_gone() {
    let etcd = EtcdCluster::single().await;
    let writer = EtcdObjectWriter::connect(EtcdWriterConfig::new(cn("b"), etcd.endpoints()))
        .await
        .expect("writer");
    writer
        .put(&cluster_obj("b", 2, "100.64.2.0/24"))
        .await
        .expect("put");
    writer
        .put(&service_obj("b", "web", "x"))
        .await
        .expect("put");
    let pki = Pki::new("m.test");

    let server = TestServer::start(&pki, etcd_publisher(&etcd), None).await;
    let addr = server.addr;
    let (_w, mut rx) = watch(&pki, "a", "b", addr);
    let first = until(&mut rx, "end").await;
    assert_eq!(first[..2], ["connected".to_string(), "begin".to_string()]);
    assert_eq!(first.len(), 5, "{first:?}");

    // Restart the server with nothing changed in etcd: same epoch, same revision.
    drop(server);
    let server = TestServer::start(&pki, etcd_publisher(&etcd), Some(addr)).await;
    assert_eq!(until(&mut rx, "connected").await, ["connected"]);
    // A change after the restart arrives as a delta on the resumed stream.
    writer.put(&service_obj("b", "db", "y")).await.expect("put");
    assert_eq!(
        until(&mut rx, "upsert").await,
        ["upsert db"],
        "resumed, no snapshot"
    );

    // Down again; etcd changes while no server runs: the new server cannot replay
    // them (its history starts at its sync point), so it says so and resyncs.
    drop(server);
    writer
        .delete(&key("b", Kind::Service, "default", "web"))
        .await
        .expect("delete");
    let _server = TestServer::start(&pki, etcd_publisher(&etcd), Some(addr)).await;
    let resynced = until(&mut rx, "end").await;
    assert_eq!(
        resynced[..3],
        [
            "connected".to_string(),
            "resync RESYNC_REASON_COMPACTED".to_string(),
            "begin".to_string()
        ],
        "{resynced:?}"
    );
    assert!(
        !resynced.iter().any(|e| e == "upsert web"),
        "web was deleted: {resynced:?}"
    );
}
