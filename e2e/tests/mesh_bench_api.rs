//! The clustermesh API benchmark on a tiny mesh: behaviour only (every gateway converges,
//! every change reaches every gateway, the numbers are there and ordered), never timing.

use std::time::Duration;

use isthmus_e2e::mesh_bench_api::{run, ApiBenchOptions};

#[test]
fn a_tiny_mesh_converges_and_every_change_reaches_every_gateway() {
    let opts = ApiBenchOptions {
        clusters: 20,
        services: 5,
        endpoints: 2,
        gateways: 3,
        changes: 20,
        change_interval: Duration::from_millis(5),
        sync_timeout: Duration::from_secs(120),
        settle_timeout: Duration::from_secs(60),
        ..ApiBenchOptions::default()
    };
    let report = run(opts).expect("the benchmark runs");

    assert_eq!(report.watch_streams, 60);
    assert_eq!(report.sync.routed_clusters, 20, "every cluster routed");
    assert_eq!(
        report.sync.service_backends,
        20 * 5,
        "every service imported"
    );
    assert_eq!(report.sync.endpoints, 20 * 5 * 2, "every endpoint imported");

    let c = &report.changes;
    assert_eq!(c.published, 20);
    assert_eq!(c.by_kind.values().sum::<usize>(), 20);
    assert_eq!(
        c.unmatched, 0,
        "every change seen as a delta by every gateway"
    );
    assert!(c.tables_match_after, "{:?}", c.tables_mismatch);
    assert_eq!(c.latency_all_gateways_ms.count, 20);
    assert_eq!(c.latency_each_gateway_ms.count, 20 * 3);
    for p in [&c.latency_all_gateways_ms, &c.latency_each_gateway_ms] {
        assert!(p.p50 <= p.p99 && p.p99 <= p.max, "{p:?}");
    }
    assert!(c.latency_each_gateway_ms.max <= c.latency_all_gateways_ms.max);

    assert_eq!(report.streams.connects, 60, "{:?}", report.streams);
    assert_eq!(report.streams.resyncs, 0);
    assert_eq!(report.streams.refusals, 0);
    assert!(report.resources.rss_synced_mib > 0.0);
    assert!(report.resources.threads_synced >= 1);

    let json = serde_json::to_value(&report).expect("serializes");
    assert!(json["changes"]["latency_all_gateways_ms"]["p99"].is_number());
    assert!(report.to_string().contains("p99"));
}
