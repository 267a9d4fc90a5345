//! Three clusters whose gateways learn each other from clustermesh API servers (one
//! file-backed, two etcd-backed with a real etcd each), with no peer in any gateway
//! config: workloads reach each other and a service exported by one cluster; a cluster
//! announcing another's prefix is refused and reported; a withdrawal removes the route
//! within a bound; and the tunnels keep carrying traffic while every API server is down
//! for longer than a WireGuard rekey interval.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use isthmus_e2e::traffic::ping_stats;
use isthmus_e2e::{bins, netns, ping, ProcessGuard, Run, Site, Topology, Underlay};
use serde_json::Value;

const CHANNEL_PORT: u16 = 7443;
const API_PORT: u16 = 7444;
const TD: &str = "mesh.test";
const NAMES: [&str; 4] = ["", "a", "b", "c"];
/// How soon a withdrawal published by a cluster must be reflected by another gateway.
const WITHDRAW_BOUND: Duration = Duration::from_secs(5);

fn ctl(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(bins::ctl())
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "isthmusctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Files {
    bundle: PathBuf,
    /// Per site index: (gateway chain, key), (API chain, key).
    gw: Vec<(PathBuf, PathBuf)>,
    api: Vec<(PathBuf, PathBuf)>,
}

fn pki(run: &Run) -> Result<Files> {
    let dir = run.path("ca");
    let d = dir.to_string_lossy().into_owned();
    ctl(&["certs", "init", "--dir", &d, "--trust-domain", TD])?;
    let mut gw = vec![(PathBuf::new(), PathBuf::new())];
    let mut api = gw.clone();
    for c in &NAMES[1..] {
        ctl(&["certs", "issue", "--dir", &d, "cluster", "--cluster", c])?;
        for (name, out) in [("gw", &mut gw), ("clustermesh-api", &mut api)] {
            ctl(&[
                "certs",
                "issue",
                "--dir",
                &d,
                "gateway",
                "--cluster",
                c,
                "--name",
                name,
            ])?;
            let base = dir.join("clusters").join(c).join("gateways");
            out.push((
                base.join(format!("{name}.pem")),
                base.join(format!("{name}.key")),
            ));
        }
    }
    Ok(Files {
        bundle: dir.join("bundle.pem"),
        gw,
        api,
    })
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The cluster file of `site`: its cluster object and gateway, plus `extra`.
fn cluster_file(site: &Site, prefixes: &[&str], with_gateway: bool, extra: &str) -> String {
    let c = NAMES[site.index];
    let prefixes = prefixes
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        "[cluster]\nname = \"{c}\"\nid = {}\npod_prefixes = [{prefixes}]\n",
        site.index
    );
    if with_gateway {
        text += &format!(
            "\n[[gateways]]\nname = \"gw\"\nspiffe_id = \"spiffe://{TD}/cluster/{c}/gateway/gw\"\n\
             channel_endpoint = \"{}\"\nkinds = [\"wireguard\"]\n",
            site.endpoint(CHANNEL_PORT)
        );
    }
    text + extra
}

const WEB_SERVICE: &str =
    "\n[[services]]\nnamespace = \"default\"\nname = \"web\"\nglobal = true\n\
                           ports = [{ name = \"http\", port = 80 }]\n\
                           endpoints = [{ addresses = [\"100.64.3.2\"] }]\n";

/// One cluster's control plane and gateway.
struct Cluster {
    api: Option<ProcessGuard>,
    api_config: PathBuf,
    gateway: Option<ProcessGuard>,
    etcd: Option<ProcessGuard>,
    file: PathBuf,
}

struct Lab {
    clusters: Vec<Cluster>,
    // Declared last: dropped after the processes.
    topo: Topology,
}

fn etcd_url() -> &'static str {
    "http://127.0.0.1:2379"
}

fn start_etcd(run: &Run, site: &Site) -> Result<ProcessGuard> {
    netns::ip(&site.gw_ns, &["link", "set", "lo", "up"])?;
    let data = run.path(&format!("etcd-{}", site.index));
    let guard = ProcessGuard::spawn(
        run,
        &format!("etcd{}", site.index),
        Some(&site.gw_ns),
        "etcd",
        &[
            "--name",
            "m0",
            "--data-dir",
            &s(&data),
            "--listen-client-urls",
            etcd_url(),
            "--advertise-client-urls",
            etcd_url(),
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "m0=http://127.0.0.1:2380",
        ],
        &[],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = netns::exec_output(
            &site.gw_ns,
            "etcdctl",
            &["--endpoints", etcd_url(), "endpoint", "health"],
        );
        if out.is_ok_and(|o| o.status.success()) {
            return Ok(guard);
        }
        if Instant::now() > deadline {
            bail!(
                "etcd in {} did not become healthy:\n{}",
                site.gw_ns,
                guard.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes `text` as the cluster file of `site` and, for an etcd-backed cluster, makes
/// etcd hold exactly that (publish --prune).
fn publish(lab_run: &Run, site: &Site, file: &Path, text: &str, etcd: bool) -> Result<()> {
    // Replace atomically: the file source must never read half a file.
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, file)?;
    let _ = lab_run;
    if etcd {
        let out = netns::exec_output(
            &site.gw_ns,
            &s(&bins::clustermesh_api()),
            &[
                "publish",
                "--file",
                &s(file),
                "--cluster",
                NAMES[site.index],
                "--etcd",
                etcd_url(),
                "--prune",
            ],
        )?;
        if !out.status.success() {
            bail!("publish: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

fn start_api(run: &Run, site: &Site, config: &Path) -> Result<ProcessGuard> {
    let guard = ProcessGuard::spawn(
        run,
        &format!("api{}", site.index),
        Some(&site.gw_ns),
        &s(&bins::clustermesh_api()),
        &["--config", &s(config)],
        &[("RUST_LOG", "info")],
    )?;
    Ok(guard)
}

fn admin_socket(site: &Site) -> String {
    format!("/var/run/isthmus/{}.sock", site.tunnel_if)
}

fn mesh(site: &Site, what: &str) -> Result<Value> {
    Ok(serde_json::from_str(&ctl(&[
        "mesh",
        what,
        "--socket",
        &admin_socket(site),
        "--output",
        "json",
    ])?)?)
}

fn cluster_state<'a>(clusters: &'a Value, name: &str) -> Option<&'a Value> {
    clusters.as_array()?.iter().find(|c| c["name"] == name)
}

/// Polls `f` until it returns Ok(Some) or `timeout` passes.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} {last_err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `prefix` is routed into the site's tunnel device.
fn route_present(site: &Site, prefix: &str) -> Result<bool> {
    let routes = netns::ip(&site.gw_ns, &["route", "show", "exact", prefix])?;
    Ok(routes.lines().any(|l| {
        l.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w == ["dev", site.tunnel_if.as_str()])
    }))
}

/// Whether `prefix` is blackholed (withdrawn: dropped, never sent by another route).
fn blackholed(site: &Site, prefix: &str) -> Result<bool> {
    let routes = netns::ip(&site.gw_ns, &["route", "show", "exact", prefix])?;
    Ok(routes.lines().any(|l| l.starts_with("blackhole ")))
}

impl Lab {
    /// Cluster a (site 1) from a file, b and c from etcd.
    fn start() -> Result<Self> {
        let topo = Topology::new(3, Underlay::V4)?;
        let run = topo.run();
        let files = pki(run)?;
        let mut clusters = Vec::new();
        for site in topo.sites() {
            let i = site.index;
            let etcd_backed = i != 1;
            let file = run.path(&format!("cluster-{}.toml", NAMES[i]));
            let extra = if i == 3 { WEB_SERVICE } else { "" };
            let text = cluster_file(site, &[&site.workload_prefix], true, extra);
            let etcd = if etcd_backed {
                Some(start_etcd(run, site)?)
            } else {
                None
            };
            publish(run, site, &file, &text, etcd_backed)?;
            let source = if etcd_backed {
                format!("kind = \"etcd\"\nendpoints = [\"{}\"]\n", etcd_url())
            } else {
                format!(
                    "kind = \"file\"\npath = {:?}\nreload_interval_ms = 200\n",
                    s(&file)
                )
            };
            let api_config = run.path(&format!("api-{}.toml", NAMES[i]));
            std::fs::write(
                &api_config,
                format!(
                    "listen = \"{}\"\nbookmark_interval_ms = 1000\n[tls]\ntrust_bundle = {:?}\n\
                     certificate = {:?}\nprivate_key = {:?}\n[source]\n{source}",
                    site.endpoint(API_PORT),
                    s(&files.bundle),
                    s(&files.api[i].0),
                    s(&files.api[i].1),
                ),
            )?;
            let remotes: String = topo
                .sites()
                .iter()
                .filter(|o| o.index != i)
                .map(|o| {
                    format!(
                        "\n[[mesh.clusters]]\nname = \"{}\"\napi = \"{}\"\n",
                        NAMES[o.index],
                        o.endpoint(API_PORT)
                    )
                })
                .collect();
            let gw_config = run.path(&format!("gw-{}.toml", NAMES[i]));
            std::fs::write(
                &gw_config,
                format!(
                    "[interface]\nname = {:?}\n\n[identity]\ntrust_bundle = {:?}\ncertificate = {:?}\n\
                     private_key = {:?}\nlisten = \"{}\"\n\n[mesh]\nlocal_prefixes = [\"{}\"]\n\
                     withdraw_after_secs = 300\npersistent_keepalive = 5\n{remotes}",
                    site.tunnel_if,
                    s(&files.bundle),
                    s(&files.gw[i].0),
                    s(&files.gw[i].1),
                    site.endpoint(CHANNEL_PORT),
                    site.workload_prefix,
                ),
            )?;
            let api = start_api(run, site, &api_config)?;
            let gateway = ProcessGuard::spawn(
                run,
                &format!("gw{i}"),
                Some(&site.gw_ns),
                &s(&bins::gateway()),
                &["--config", &s(&gw_config)],
                &[("RUST_LOG", "info")],
            )?;
            clusters.push(Cluster {
                api: Some(api),
                api_config,
                gateway: Some(gateway),
                etcd,
                file,
            });
        }
        Ok(Self { clusters, topo })
    }

    fn site(&self, i: usize) -> &Site {
        self.topo.site(i)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for c in &self.clusters {
            for p in [&c.api, &c.gateway, &c.etcd].into_iter().flatten() {
                out += &p.logs();
            }
        }
        out
    }

    /// Waits until every gateway sees both other clusters connected with their
    /// gateway, and every peer channel is up.
    fn wait_meshed(&self) -> Result<()> {
        for site in self.topo.sites() {
            wait_for(
                &format!("site {} meshed", site.index),
                Duration::from_secs(30),
                || {
                    let clusters = mesh(site, "clusters")?;
                    let ready = clusters.as_array().is_some_and(|a| {
                        a.len() == 2
                            && a.iter().all(|c| {
                                c["state"] == "connected"
                                    && c["gateways"].as_array().is_some_and(|g| g.len() == 1)
                            })
                    });
                    let status: Value = serde_json::from_str(&ctl(&[
                        "status",
                        "--socket",
                        &admin_socket(site),
                        "--output",
                        "json",
                    ])?)?;
                    let channels_up = status["channels"].as_array().is_some_and(|c| {
                        c.len() == 2
                            && c.iter()
                                .all(|c| c["state"] == "up" && c["from_mesh"] == true)
                    });
                    Ok((ready && channels_up).then_some(()))
                },
            )?;
        }
        Ok(())
    }
}

fn workload(site: &Site) -> IpAddr {
    IpAddr::V4(site.workload_addr)
}

#[test]
fn gateways_learn_the_mesh_from_file_and_etcd_api_servers() {
    let lab = Lab::start().expect("lab");
    if let Err(e) = lab.wait_meshed() {
        panic!("{e:#}\n{}", lab.logs());
    }
    let (s1, s2, s3) = (lab.site(1), lab.site(2), lab.site(3));
    // No gateway config names a peer: every tunnel came from the API.
    for (from, to) in [(s1, s3), (s1, s2), (s2, s3), (s3, s1)] {
        assert!(
            ping(&from.wl_ns, workload(to), 3),
            "site {} -> site {}\n{}",
            from.index,
            to.index,
            lab.logs()
        );
    }
    // The service c exports is listed by a with its endpoint, and reachable.
    let services = mesh(s1, "services").expect("services");
    let web = &services[0];
    assert_eq!(web["name"], "web", "{services:#}");
    assert_eq!(web["backends"][0]["cluster"], "c");
    assert_eq!(web["backends"][0]["endpoints"][0]["address"], "100.64.3.2");
    assert!(ping(&s1.wl_ns, "100.64.3.2".parse().expect("ip"), 2));
    let table = ctl(&["mesh", "clusters", "--socket", &admin_socket(s1)]).expect("table");
    assert!(
        table.contains("connected") && table.contains("100.64.3.0/24"),
        "{table}"
    );

    // b (etcd) announces part of c's prefix: every gateway refuses it and says so,
    // b keeps its accepted prefixes, c's traffic is untouched.
    let b_file = &lab.clusters[1].file;
    let rogue = cluster_file(s2, &[&s2.workload_prefix, "100.64.3.0/25"], true, "");
    publish(lab.topo.run(), s2, b_file, &rogue, true).expect("publish");
    let refusal = wait_for("the refusal", Duration::from_secs(10), || {
        let clusters = mesh(s1, "clusters")?;
        let b = cluster_state(&clusters, "b").cloned().context("b")?;
        Ok(b["refusals"]
            .as_array()
            .and_then(|r| r.last())
            .and_then(|r| r["reason"].as_str())
            .map(str::to_string))
    })
    .expect("refusal reported");
    assert!(
        refusal.contains("overlaps cluster c's 100.64.3.0/24"),
        "{refusal}"
    );
    let clusters = mesh(s1, "clusters").expect("clusters");
    assert_eq!(
        cluster_state(&clusters, "b").expect("b")["prefixes"],
        serde_json::json!([s2.workload_prefix])
    );
    assert!(ping(&s1.wl_ns, workload(s3), 2), "c still reachable");

    // a's file gains a service: the others see it after the reload.
    let a_file = &lab.clusters[0].file;
    let api_service = "\n[[services]]\nnamespace = \"shop\"\nname = \"api\"\nglobal = true\n\
                       ports = [{ port = 8080 }]\nendpoints = [{ addresses = [\"100.64.1.2\"] }]\n";
    publish(
        lab.topo.run(),
        s1,
        a_file,
        &cluster_file(s1, &[&s1.workload_prefix], true, api_service),
        false,
    )
    .expect("publish");
    wait_for("a's new service at c", Duration::from_secs(10), || {
        let services = mesh(s3, "services")?;
        Ok(services
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|s| s["name"] == "api" && s["namespace"] == "shop")
            })
            .then_some(()))
    })
    .expect("service learnt");

    // c withdraws its service, then its gateway: a's service list and then its route
    // into the tunnel follow within the bound.
    let c_file = &lab.clusters[2].file;
    let t = Instant::now();
    publish(
        lab.topo.run(),
        s3,
        c_file,
        &cluster_file(s3, &[&s3.workload_prefix], true, ""),
        true,
    )
    .expect("publish");
    wait_for("web withdrawn at a", WITHDRAW_BOUND, || {
        let services = mesh(s1, "services")?;
        Ok((!services
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["name"] == "web")))
        .then_some(()))
    })
    .expect("service withdrawn within the bound");
    eprintln!("service withdrawal reflected in {:?}", t.elapsed());
    assert!(route_present(s1, &s3.workload_prefix).expect("ip route"));
    let t = Instant::now();
    publish(
        lab.topo.run(),
        s3,
        c_file,
        &cluster_file(s3, &[&s3.workload_prefix], false, ""),
        true,
    )
    .expect("publish");
    wait_for("route to c withdrawn at a", WITHDRAW_BOUND, || {
        Ok((!route_present(s1, &s3.workload_prefix)?).then_some(()))
    })
    .expect("route withdrawn within the bound");
    eprintln!("gateway withdrawal reflected in {:?}", t.elapsed());
    let blackhole = wait_for("the blackhole", WITHDRAW_BOUND, || {
        Ok(blackholed(s1, &s3.workload_prefix)?.then_some(()))
    });
    assert!(
        blackhole.is_ok(),
        "a withdrawn prefix is blackholed, not left to another route: {}\n{}",
        netns::ip(&s1.gw_ns, &["route"]).unwrap_or_default(),
        lab.logs()
    );
    let status: Value = serde_json::from_str(
        &ctl(&["status", "--socket", &admin_socket(s1), "--output", "json"]).expect("status"),
    )
    .expect("json");
    assert!(
        !status["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .any(|p| p["name"] == "c/gw"),
        "c's tunnel peer removed: {status:#}"
    );
    assert_eq!(ping_stats(&s1.wl_ns, workload(s3), 2).expect("ping").1, 0);
    // And back.
    publish(
        lab.topo.run(),
        s3,
        c_file,
        &cluster_file(s3, &[&s3.workload_prefix], true, ""),
        true,
    )
    .expect("publish");
    wait_for("c reachable again", Duration::from_secs(20), || {
        Ok(ping(&s1.wl_ns, workload(s3), 1).then_some(()))
    })
    .expect("c back");
}

#[test]
fn tunnels_keep_carrying_traffic_while_the_api_servers_are_down() {
    let mut lab = Lab::start().expect("lab");
    if let Err(e) = lab.wait_meshed() {
        panic!("{e:#}\n{}", lab.logs());
    }
    let (s1, s3) = (lab.site(1).clone(), lab.site(3).clone());
    assert!(ping(&s1.wl_ns, workload(&s3), 3));
    let handshakes = |site: &Site| -> u64 {
        let status: Value = serde_json::from_str(
            &ctl(&[
                "status",
                "--socket",
                &admin_socket(site),
                "--output",
                "json",
            ])
            .expect("status"),
        )
        .expect("json");
        status["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .find(|p| p["name"] == "c/gw")
            .and_then(|p| p["handshakes"].as_u64())
            .unwrap_or(0)
    };
    let before = handshakes(&s1);
    // Every API server goes away for longer than WireGuard's rekey interval (120 s).
    for c in &mut lab.clusters {
        if let Some(mut api) = c.api.take() {
            api.stop().expect("stop api");
        }
    }
    let start = Instant::now();
    let mut rounds = 0;
    let mut lost = 0;
    while start.elapsed() < Duration::from_secs(135) {
        let (tx, rx) = ping_stats(&s1.wl_ns, workload(&s3), 10).expect("ping");
        rounds += tx;
        lost += tx - rx;
    }
    assert!(
        lost <= 2,
        "{lost} of {rounds} pings lost while the API servers were down\n{}",
        lab.logs()
    );
    assert!(
        handshakes(&s1) > before,
        "the tunnel re-keyed without the control plane"
    );
    let clusters = mesh(&s1, "clusters").expect("clusters");
    assert_eq!(cluster_state(&clusters, "c").expect("c")["state"], "stale");
    assert!(route_present(&s1, &s3.workload_prefix).expect("route"));
    // Back: the stream resumes and the cluster is connected again.
    let topo = &lab.topo;
    for (i, c) in lab.clusters.iter_mut().enumerate() {
        c.api = Some(start_api(topo.run(), topo.site(i + 1), &c.api_config).expect("api"));
    }
    wait_for("c connected again", Duration::from_secs(30), || {
        let clusters = mesh(&s1, "clusters")?;
        Ok((cluster_state(&clusters, "c").context("c")?["state"] == "connected").then_some(()))
    })
    .expect("reconnected");
}
