//! The Kubernetes translation on recorded `kubectl get -o json` output of cluster "east"
//! (`fixtures/kubernetes/`): which services and slices another cluster would see, with
//! which fields, and what is reported as skipped.

use isthmus_clustermesh_api::model::{self, check_object};
use isthmus_clustermesh_api::pb::{self, object::Body, Kind};
use isthmus_clustermesh_api::source::kubernetes::{
    translate, ServiceExport, SkipReason, Skipped, SourceKind, Translation, ANNOTATION_AFFINITY,
};
use isthmus_identity::ClusterName;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::path::Path;

/// What `kubectl get KIND -A -o json` prints: `{"kind": "List", "items": [...]}`.
#[derive(serde::Deserialize)]
struct KubectlList<T> {
    items: Vec<T>,
}

fn load<T: serde::de::DeserializeOwned>(file: &str) -> Vec<T> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/kubernetes")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("fixture readable");
    let list: KubectlList<T> = serde_json::from_str(&text).expect("fixture parses");
    list.items
}

fn east() -> ClusterName {
    ClusterName::new("east").expect("cluster name")
}

fn translated() -> Translation {
    let services: Vec<Service> = load("services.json");
    let slices: Vec<EndpointSlice> = load("endpointslices.json");
    let exports: Vec<ServiceExport> = load("serviceexports.json");
    translate(&east(), &services, &slices, &exports)
}

fn port(name: &str, port: u32, protocol: &str) -> pb::ServicePort {
    pb::ServicePort {
        name: name.into(),
        port,
        protocol: protocol.into(),
    }
}

fn service(name: &str, uid: &str, svc: pb::Service) -> pb::Object {
    pb::Object {
        key: Some(model::key("east", Kind::Service, "shop", name)),
        uid: uid.into(),
        revision: 0,
        body: Some(Body::Service(svc)),
    }
}

fn slice(name: &str, uid: &str, s: pb::EndpointSlice) -> pb::Object {
    pb::Object {
        key: Some(model::key("east", Kind::EndpointSlice, "shop", name)),
        uid: uid.into(),
        revision: 0,
        body: Some(Body::EndpointSlice(s)),
    }
}

/// (address, ready, serving, terminating, node, zone)
fn endpoint(
    address: &str,
    (ready, serving, terminating): (bool, bool, bool),
    node: &str,
    zone: &str,
) -> pb::Endpoint {
    pb::Endpoint {
        addresses: vec![address.into()],
        ready,
        serving,
        terminating,
        node_name: node.into(),
        zone: zone.into(),
    }
}

const READY: (bool, bool, bool) = (true, true, false);
const NOT_READY: (bool, bool, bool) = (false, false, false);
const TERMINATING: (bool, bool, bool) = (false, true, true);

fn key_names(t: &Translation) -> Vec<String> {
    t.objects
        .iter()
        .map(|o| model::KeyDisplay(o.key.as_ref().expect("key")).to_string())
        .collect()
}

#[test]
fn only_exported_or_global_services_and_their_ip_slices_are_published() {
    assert_eq!(
        key_names(&translated()),
        [
            "east/service/shop/cart",
            "east/service/shop/db-headless",
            "east/service/shop/partner-api",
            "east/service/shop/web",
            "east/endpointslice/shop/cart-9fz8q",
            "east/endpointslice/shop/db-headless-7xk2p",
            "east/endpointslice/shop/web-abc12",
            "east/endpointslice/shop/web-def34",
        ],
        "not default/kubernetes or shop/internal (neither exported nor global) nor their \
         slices; not shop/search (bad affinity), shop/docs (ExternalName), the FQDN slice"
    );
}

#[test]
fn every_published_object_passes_the_model_check_for_its_cluster() {
    let t = translated();
    for obj in &t.objects {
        assert_eq!(check_object(&east(), obj), Ok(()), "{obj:?}");
    }
    // And a server of another cluster would refuse all of them.
    let west = ClusterName::new("west").expect("name");
    assert!(t.objects.iter().all(|o| check_object(&west, o).is_err()));
}

#[test]
fn an_exported_dual_stack_service_and_its_two_slices() {
    let t = translated();
    let web = service(
        "web",
        "5d2e8a4b-7f1c-4a93-b0d6-c8e2f4a6b157",
        pb::Service {
            ports: vec![port("http", 80, "TCP"), port("dns", 53, "UDP")],
            global: true,
            shared: true,
            affinity: pb::Affinity::None as i32,
            cluster_ips: vec!["100.96.12.34".into(), "fd00:96::1234".into()],
        },
    );
    let slice_ports = vec![port("http", 8080, "TCP"), port("dns", 5353, "UDP")];
    let v4 = slice(
        "web-abc12",
        "7a9c1e35-6f8b-4dac-82e4-5b7d9f1a3c68",
        pb::EndpointSlice {
            service: "web".into(),
            address_type: "IPv4".into(),
            endpoints: vec![
                endpoint("100.64.1.11", READY, "east-worker-1", "zone-a"),
                endpoint("100.64.2.12", NOT_READY, "east-worker-2", "zone-b"),
                endpoint("100.64.3.13", TERMINATING, "east-worker-3", "zone-c"),
            ],
            ports: slice_ports.clone(),
        },
    );
    let v6 = slice(
        "web-def34",
        "8b0d2f46-7a9c-4ebd-93f5-6c8e0a2b4d79",
        pb::EndpointSlice {
            service: "web".into(),
            address_type: "IPv6".into(),
            endpoints: vec![
                endpoint("fd00:64:1::11", READY, "east-worker-1", "zone-a"),
                endpoint("fd00:64:3::13", TERMINATING, "east-worker-3", "zone-c"),
            ],
            ports: slice_ports,
        },
    );
    for expected in [web, v4, v6] {
        assert!(t.objects.contains(&expected), "missing {expected:?}");
    }
}

#[test]
fn a_global_annotation_without_export_with_shared_and_affinity() {
    let t = translated();
    let cart = service(
        "cart",
        "0f6a2b7c-41d9-4e38-a5c2-7d9e1b3f5a24",
        pb::Service {
            ports: vec![port("http", 8080, "TCP")],
            global: true,
            shared: false,
            affinity: pb::Affinity::Remote as i32,
            cluster_ips: vec!["100.96.41.7".into()],
        },
    );
    // A slice written by another controller with empty conditions: ready and serving
    // default to true, terminating to false.
    let cart_slice = slice(
        "cart-9fz8q",
        "2b4d6f80-1a3c-4e5f-9b7d-0c2e4a6b8d13",
        pb::EndpointSlice {
            service: "cart".into(),
            address_type: "IPv4".into(),
            endpoints: vec![endpoint("100.64.3.21", READY, "east-worker-3", "zone-c")],
            ports: vec![port("http", 8080, "TCP")],
        },
    );
    assert!(t.objects.contains(&cart), "{:?}", t.objects);
    assert!(t.objects.contains(&cart_slice), "{:?}", t.objects);
}

#[test]
fn a_headless_service_is_published_without_cluster_ips() {
    let t = translated();
    let db = service(
        "db-headless",
        "a41c9e02-5b7d-4f6e-8c13-92d0e4b6f781",
        pb::Service {
            ports: vec![port("postgres", 5432, "TCP")],
            global: true,
            shared: true,
            affinity: pb::Affinity::None as i32,
            cluster_ips: vec![],
        },
    );
    assert!(t.objects.contains(&db), "{:?}", t.objects);
    // publishNotReadyAddresses: the controller marks it ready though the pod is not
    // serving; both conditions are passed on as recorded.
    let db_slice = slice(
        "db-headless-7xk2p",
        "3c5e7a91-2b4d-4f6a-8c0e-1d3f5b7a9c24",
        pb::EndpointSlice {
            service: "db-headless".into(),
            address_type: "IPv4".into(),
            endpoints: vec![endpoint(
                "100.64.2.40",
                (true, false, false),
                "east-worker-2",
                "zone-b",
            )],
            ports: vec![port("postgres", 5432, "TCP")],
        },
    );
    assert!(t.objects.contains(&db_slice), "{:?}", t.objects);
}

#[test]
fn what_is_left_out_is_reported_with_its_reason() {
    let skipped = |kind, name: &str, reason| Skipped {
        kind,
        namespace: "shop".into(),
        name: name.into(),
        reason,
    };
    let t = translated();
    assert_eq!(
        t.skipped,
        vec![
            skipped(SourceKind::Service, "docs", SkipReason::ExternalName),
            skipped(
                SourceKind::Service,
                "search",
                SkipReason::BadAnnotation {
                    annotation: ANNOTATION_AFFINITY,
                    value: "nearest".into(),
                    allowed: "local, remote, none",
                }
            ),
            skipped(
                SourceKind::ServiceExport,
                "payments",
                SkipReason::NoSuchService
            ),
            skipped(
                SourceKind::EndpointSlice,
                "partner-api-fqdn",
                SkipReason::FqdnSlice
            ),
        ]
    );
    let shown: Vec<String> = t.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown[1],
        "Service shop/search: annotation service.isthmus.dev/affinity: \"nearest\" is not \
         one of local, remote, none"
    );
    assert_eq!(
        shown[2],
        "ServiceExport shop/payments: no Service of this namespace and name exists"
    );
}
