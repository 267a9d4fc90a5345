//! Configuration errors: exit status 64, one line naming the field, and no device or socket
//! created before the check.

use std::path::PathBuf;
use std::time::Duration;

use isthmus_e2e::isthmus::{run_to_exit, CONFIG_ERROR_EXIT};
use isthmus_e2e::userspace_wg::uapi_socket;
use isthmus_e2e::{GatewayConfig, IsthmusGateway, KeyPair, Netns, PeerConfig, Run};

struct Env {
    run: Run,
    keys: KeyPair,
    peer: KeyPair,
    key_path: PathBuf,
}

fn env() -> Env {
    let run = Run::new().expect("run");
    let keys = KeyPair::generate().expect("keys");
    let peer = KeyPair::generate().expect("peer keys");
    let key_path = run.path("gw.key");
    keys.write_private(&key_path, 0o600).expect("write key");
    Env {
        run,
        keys,
        peer,
        key_path,
    }
}

/// A valid configuration (see `base_config_is_accepted`) that each case breaks in one place.
fn base(env: &Env, name: &str) -> GatewayConfig {
    GatewayConfig {
        name: Some(name.to_string()),
        private_key_file: Some(env.key_path.clone()),
        listen_port: Some(51820),
        mtu: Some(1420),
        addresses: vec!["100.64.1.1/32".into()],
        admin_socket: Some(env.run.path(&format!("{name}.ctl.sock"))),
        interface_extra: vec![],
        peers: vec![PeerConfig {
            name: Some("site-b".into()),
            public_key: env.peer.public.clone(),
            endpoint: Some("192.0.2.2:51820".into()),
            allowed_prefixes: vec!["100.64.2.0/24".into()],
            persistent_keepalive: Some(25),
        }],
        trailer: vec![],
    }
}

/// Runs the gateway with `cfg` in a fresh namespace and checks that it refuses it: exit 64, a
/// "config error" line naming `field`, no network device ever created in the namespace, no UAPI
/// or admin socket file.
fn expect_config_error(env: &Env, case: &str, cfg: &GatewayConfig, field: &str) {
    let ns = Netns::new(&env.run.name(&format!("-c{case}"))).expect("netns");
    let toml = cfg.to_toml();
    let out = run_to_exit(
        &env.run,
        ns.name(),
        &format!("bad-{case}"),
        &toml,
        Duration::from_secs(10),
    )
    .expect("run gateway");
    let context = format!(
        "case {case}\nconfig:\n{toml}\nstatus: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status, out.stdout, out.stderr
    );
    let status = out
        .status
        .unwrap_or_else(|| panic!("gateway kept running\n{context}"));
    assert_eq!(
        status.code(),
        Some(CONFIG_ERROR_EXIT),
        "wrong exit status\n{context}"
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("config error"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one config error line\n{context}"
    );
    assert!(
        lines[0].contains(field),
        "the error line does not name {field:?}\n{context}"
    );
    assert!(
        lines[0].starts_with("isthmus-gateway: config error: "),
        "unexpected error line format\n{context}"
    );

    // Interface indexes in a namespace are never reused: if the gateway had created (and
    // removed) any device, a new one would not get index 2.
    ns.ip(&[
        "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
    ])
    .expect("probe veth");
    let links = ns.ip(&["-o", "link", "show"]).expect("ip link");
    let min_index = links
        .lines()
        .filter(|l| !l.contains(" lo:"))
        .filter_map(|l| l.split(':').next()?.trim().parse::<u32>().ok())
        .min();
    assert_eq!(
        min_index,
        Some(2),
        "a device was created in the namespace\n{links}\n{context}"
    );
    if let Some(name) = &cfg.name {
        assert!(
            !uapi_socket(name).exists(),
            "UAPI socket created\n{context}"
        );
    }
    if let Some(sock) = cfg.effective_admin_socket() {
        assert!(
            !sock.exists(),
            "admin socket {} created\n{context}",
            sock.display()
        );
    }
}

#[test]
fn base_config_is_accepted() {
    let env = env();
    let ns = Netns::new(&env.run.name("-cok")).expect("netns");
    let name = env.run.ifname("ok").expect("ifname");
    let cfg = base(&env, &name);
    let mut gw = IsthmusGateway::start(&env.run, ns.name(), &env.keys, &cfg)
        .expect("valid config must start");
    let st = gw.status().expect("status");
    assert_eq!(st.interface, name);
    assert_eq!(st.public_key, env.keys.public);
    let links = ns
        .ip(&["-o", "addr", "show", "dev", &name])
        .expect("TUN device exists");
    assert!(
        links.contains("100.64.1.1/32"),
        "interface.addresses not assigned:\n{links}"
    );
    let routes = ns.ip(&["route", "show", "100.64.2.0/24"]).expect("route");
    assert!(
        routes.contains(&format!("dev {name}")),
        "no route for the peer prefix:\n{routes}"
    );
    let link = ns.ip(&["-o", "link", "show", "dev", &name]).expect("link");
    assert!(
        link.contains("mtu 1420") && link.contains(",UP"),
        "device not up with mtu 1420:\n{link}"
    );
    let status = gw.stop().expect("stop");
    assert!(status.success(), "exit {status}\n{}", gw.logs());
}

#[test]
fn missing_interface_name() {
    let env = env();
    let mut cfg = base(&env, "unused");
    cfg.name = None;
    expect_config_error(&env, "noname", &cfg, "interface.name");
}

#[test]
fn mtu_out_of_range() {
    let env = env();
    for (i, mtu) in [100u32, 576, 1279, 9001, 65535].into_iter().enumerate() {
        let mut cfg = base(&env, &env.run.ifname(&format!("m{i}")).expect("ifname"));
        cfg.mtu = Some(mtu);
        expect_config_error(&env, &format!("mtu{i}"), &cfg, "interface.mtu");
    }
}

#[test]
fn bad_public_key() {
    let env = env();
    let too_short = base64_of(&[7u8; 31]);
    for (i, key) in ["not-a-key", "", too_short.as_str()]
        .into_iter()
        .enumerate()
    {
        let mut cfg = base(&env, &env.run.ifname(&format!("k{i}")).expect("ifname"));
        cfg.peers[0].public_key = key.to_string();
        expect_config_error(&env, &format!("pk{i}"), &cfg, "public_key");
    }
}

#[test]
fn bad_prefix() {
    let env = env();
    for (i, prefix) in ["100.64.2.0/33", "not-a-prefix", "2001:db8::/129"]
        .into_iter()
        .enumerate()
    {
        let mut cfg = base(&env, &env.run.ifname(&format!("p{i}")).expect("ifname"));
        cfg.peers[0].allowed_prefixes = vec![prefix.to_string()];
        expect_config_error(&env, &format!("pfx{i}"), &cfg, "allowed_prefixes");
    }
}

#[test]
fn bad_endpoint() {
    let env = env();
    for (i, endpoint) in [
        "192.0.2.2",
        "192.0.2.2:99999",
        "2001:db8::2:51820",
        "300.1.2.3:51820",
    ]
    .into_iter()
    .enumerate()
    {
        let mut cfg = base(&env, &env.run.ifname(&format!("e{i}")).expect("ifname"));
        cfg.peers[0].endpoint = Some(endpoint.to_string());
        expect_config_error(&env, &format!("ep{i}"), &cfg, "endpoint");
    }
}

#[test]
fn key_file_readable_by_others() {
    let env = env();
    let loose = env.run.path("loose.key");
    env.keys.write_private(&loose, 0o644).expect("write key");
    let mut cfg = base(&env, &env.run.ifname("kf").expect("ifname"));
    cfg.private_key_file = Some(loose);
    expect_config_error(&env, "keymode", &cfg, "private_key_file");
}

#[test]
fn unknown_field() {
    let env = env();
    let mut cfg = base(&env, &env.run.ifname("u").expect("ifname"));
    cfg.interface_extra = vec!["colour = \"blue\"".into()];
    expect_config_error(&env, "unknown", &cfg, "colour");
}

#[test]
fn bad_steering() {
    let env = env();
    let mut cfg = base(&env, &env.run.ifname("s").expect("ifname"));
    cfg.trailer = vec![
        "[steering]".into(),
        "mode = \"xdp\"".into(),
        "interfaces = [\"eth0\"]".into(),
    ];
    expect_config_error(&env, "steering-mode", &cfg, "steering.mode");
    cfg.trailer = vec!["[steering]".into(), "interfaces = []".into()];
    expect_config_error(&env, "steering-interfaces", &cfg, "steering.interfaces");
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
