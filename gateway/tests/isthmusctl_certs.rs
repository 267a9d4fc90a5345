//! `isthmusctl certs` end to end: the real binary in a temporary CA directory.
//!
//! init → issue cluster → issue gateway → show (text and JSON) → show on a key file
//! refused → duplicate / unknown / malformed inputs refused with one clear line →
//! revoke writes CRLs that `isthmus_certs::Crl::load_all` reads. Every output is checked
//! for key material.

// Helpers outside #[test] functions unwrap too (clippy.toml covers only the tests).
#![allow(clippy::unwrap_used)]

mod common;
use common::TempDir;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use isthmus_certs::{Crl, Serial};

const TD: &str = "mesh.test";

/// Runs isthmusctl and records its output for the key-material check.
struct Ctl {
    transcript: String,
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn run(&mut self, args: &[&str]) -> Run {
        let out: Output = Command::new(env!("CARGO_BIN_EXE_isthmusctl"))
            .args(args)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        };
        self.transcript += &format!(
            "$ isthmusctl {}\n{}{}",
            args.join(" "),
            run.stdout,
            run.stderr
        );
        run
    }

    /// Runs a command that must succeed and print nothing on stderr.
    fn ok(&mut self, args: &[&str]) -> String {
        let run = self.run(args);
        assert_eq!(
            run.code, 0,
            "isthmusctl {args:?} failed\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        assert_eq!(run.stderr, "", "isthmusctl {args:?} wrote to stderr");
        run.stdout
    }

    /// Runs a command that must fail with exit status `code` and one line
    /// `isthmusctl: ...` containing every one of `expect`; returns that line.
    fn fails(&mut self, code: i32, args: &[&str], expect: &[&str]) -> String {
        let run = self.run(args);
        assert_eq!(
            run.code, code,
            "isthmusctl {args:?}: wrong exit status\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        assert_eq!(run.stdout, "", "isthmusctl {args:?} printed on stdout");
        let line = run.stderr.strip_suffix('\n').unwrap_or(&run.stderr);
        assert!(
            line.starts_with("isthmusctl: ") && !line.contains('\n'),
            "isthmusctl {args:?}: expected one line `isthmusctl: ...`, got {:?}",
            run.stderr
        );
        for e in expect {
            assert!(
                line.contains(e),
                "isthmusctl {args:?}: {line:?} lacks {e:?}"
            );
        }
        line.to_owned()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The base64 body of a PEM file (header and footer lines dropped).
fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => u32::from(c - b'A'),
        b'a'..=b'z' => u32::from(c - b'a') + 26,
        b'0'..=b'9' => u32::from(c - b'0') + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | value(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Fails if `text` holds any trace of the PEM private key `key_pem`: its PEM label, any
/// 16-character piece of its base64 body, or the private scalar (any 8 bytes of it) in
/// hex, plain or ':'-separated.
fn assert_no_key_material(text: &str, key_pem: &str) {
    assert!(!text.contains("PRIVATE KEY"), "output mentions PRIVATE KEY");
    let body = pem_body(key_pem);
    assert!(body.len() > 64, "key file looks empty");
    for i in 0..=body.len() - 16 {
        let piece = &body[i..i + 16];
        assert!(!text.contains(piece), "key base64 {piece:?} in the output");
    }
    // PKCS#8 → ECPrivateKey { version 1, privateKey OCTET STRING (32) ... }.
    let der = base64_decode(&body);
    let at = find(&der, &[0x02, 0x01, 0x01, 0x04, 0x20]).expect("no EC private key in key file");
    let scalar = &der[at + 5..at + 5 + 32];
    let lower = text.to_lowercase();
    for window in scalar.windows(8) {
        let plain = hex::encode(window);
        let colons = window
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert!(
            !lower.contains(&plain) && !lower.contains(&colons),
            "private key bytes in the output"
        );
    }
}

/// `aa:bb:...` with `n` bytes of lowercase hex.
fn is_colon_hex(text: &str, n: usize) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == n
        && parts.iter().all(|p| {
            p.len() == 2
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// The value after `label` on a text output line, e.g. "spiffe id:".
fn field<'a>(text: &'a str, label: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(label))
        .map(str::trim)
        .collect()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

/// Whether the DER CRL lists `serial` (as the INTEGER of a revokedCertificates entry).
fn crl_lists(crl: &Crl, serial: &str) -> bool {
    let serial: Serial = serial.parse().unwrap();
    let bytes = serial.as_bytes();
    let mut integer = vec![0x02];
    if bytes[0] & 0x80 != 0 {
        integer.push(u8::try_from(bytes.len() + 1).unwrap());
        integer.push(0);
    } else {
        integer.push(u8::try_from(bytes.len()).unwrap());
    }
    integer.extend_from_slice(bytes);
    find(crl.der().as_ref(), &integer).is_some()
}

/// `certs revoke --dir DIR --serial SERIAL [--cluster C]`.
fn revoke_args<'a>(dir: &'a str, serial: &'a str, cluster: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec!["certs", "revoke", "--dir", dir, "--serial", serial];
    if let Some(c) = cluster {
        args.extend(["--cluster", c]);
    }
    args
}

#[test]
fn certs_init_issue_show_revoke() {
    let tmp = TempDir::new("flow");
    let dir = tmp.0.join("ca");
    let d = s(&dir);
    let mut ctl = Ctl {
        transcript: String::new(),
    };

    // --- init
    let out = ctl.ok(&["certs", "init", "--dir", d, "--trust-domain", TD]);
    assert!(out.contains("spiffe://mesh.test\n"), "{out}");
    let root_pem = dir.join("root-ca.pem");
    let root_key = dir.join("root-ca.key");
    let bundle = dir.join("bundle.pem");
    for p in [&root_pem, &root_key, &bundle] {
        assert!(
            out.contains(s(p)),
            "init does not print {}: {out}",
            p.display()
        );
    }
    assert_eq!(field(&out, "  sha256:").len(), 1, "{out}");
    assert!(is_colon_hex(field(&out, "  sha256:")[0], 32), "{out}");
    assert_eq!(mode(&root_key), 0o600);
    assert_eq!(mode(&dir) & 0o077, 0, "CA directory open to others");
    ctl.fails(
        1,
        &["certs", "init", "--dir", d, "--trust-domain", TD],
        &[d, "already holds a mesh root CA"],
    );

    // --- issue cluster
    let out = ctl.ok(&["certs", "issue", "--dir", d, "cluster", "--cluster", "eu-1"]);
    let cluster_pem = dir.join("clusters/eu-1/ca.pem");
    let cluster_key = dir.join("clusters/eu-1/ca.key");
    assert!(out.contains("spiffe://mesh.test/cluster/eu-1\n"), "{out}");
    assert!(out.contains(s(&cluster_pem)) && out.contains(s(&cluster_key)));
    assert_eq!(mode(&cluster_key), 0o600);

    // --- issue gateway
    let out = ctl.ok(&[
        "certs",
        "issue",
        "--dir",
        d,
        "gateway",
        "--cluster",
        "eu-1",
        "--name",
        "gw-a",
        "--days",
        "30",
    ]);
    let chain = dir.join("clusters/eu-1/gateways/gw-a.pem");
    let key = dir.join("clusters/eu-1/gateways/gw-a.key");
    assert!(
        out.contains("spiffe://mesh.test/cluster/eu-1/gateway/gw-a\n"),
        "{out}"
    );
    assert!(out.contains(s(&chain)) && out.contains(s(&key)), "{out}");
    assert!(out.contains("(mode 0600)"), "{out}");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&chain), 0o644);

    // --- show, text
    let out = ctl.ok(&["certs", "show", s(&chain)]);
    assert!(out.starts_with("certificate 1 of 2: gateway\n"), "{out}");
    assert!(out.contains("certificate 2 of 2: cluster CA\n"), "{out}");
    assert_eq!(
        field(&out, "spiffe id:"),
        [
            "spiffe://mesh.test/cluster/eu-1/gateway/gw-a",
            "spiffe://mesh.test/cluster/eu-1"
        ]
    );
    assert_eq!(field(&out, "valid now:"), ["yes", "yes"], "{out}");
    assert_eq!(field(&out, "ca:"), ["no", "yes"], "{out}");
    let fingerprints = field(&out, "sha256:");
    assert_eq!(fingerprints.len(), 2);
    assert!(fingerprints.iter().all(|f| is_colon_hex(f, 32)), "{out}");
    for t in field(&out, "not before:")
        .into_iter()
        .chain(field(&out, "not after:"))
    {
        // 2026-01-31T12:00:00Z
        assert!(
            t.len() == 20 && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }

    // --- show, JSON (same facts)
    let doc = json(&ctl.ok(&["certs", "show", "--output", "json", s(&chain)]));
    let certs = doc["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2);
    let leaf = &certs[0];
    assert_eq!(leaf["kind"], "gateway");
    assert_eq!(
        leaf["spiffe_id"],
        "spiffe://mesh.test/cluster/eu-1/gateway/gw-a"
    );
    assert_eq!(leaf["is_ca"], false);
    assert_eq!(leaf["valid_now"], true);
    assert_eq!(leaf["status"], "valid");
    assert_eq!(leaf["sha256_fingerprint"], fingerprints[0]);
    assert_eq!(leaf["not_before"], field(&out, "not before:")[0]);
    assert_eq!(leaf["not_after"], field(&out, "not after:")[0]);
    let leaf_serial = leaf["serial"].as_str().unwrap().to_owned();
    assert!(is_colon_hex(&leaf_serial, 16), "{leaf_serial}");
    assert_eq!(field(&out, "serial:")[0], leaf_serial);
    let cluster_serial = certs[1]["serial"].as_str().unwrap().to_owned();
    assert_eq!(certs[1]["kind"], "cluster CA");
    // Validity: about 30 days (the gateway), within the cluster CA's.
    assert!(leaf["not_after"].as_str() < certs[1]["not_after"].as_str());
    let root = json(&ctl.ok(&["certs", "show", "-o", "json", s(&bundle)]));
    assert_eq!(root["certificates"][0]["kind"], "mesh root CA");
    assert_eq!(root["certificates"][0]["spiffe_id"], "spiffe://mesh.test");

    // --- show refuses key files, and files mixing keys and certificates
    for k in [&key, &cluster_key, &root_key] {
        ctl.fails(
            1,
            &["certs", "show", s(k)],
            &[
                s(k),
                "this is a private key; isthmusctl never prints key material",
            ],
        );
    }
    let mixed = tmp.0.join("mixed.pem");
    fs::write(
        &mixed,
        fs::read_to_string(&chain).unwrap() + &fs::read_to_string(&key).unwrap(),
    )
    .unwrap();
    fs::set_permissions(&mixed, fs::Permissions::from_mode(0o600)).unwrap();
    ctl.fails(
        1,
        &["certs", "show", s(&mixed)],
        &["private key", "never prints key material"],
    );
    ctl.fails(
        1,
        &["certs", "show", s(&tmp.0.join("nope.pem"))],
        &["nope.pem"],
    );
    ctl.fails(1, &["certs", "show", s(&tmp.0)], &["not a regular file"]);

    // --- duplicate, unknown and malformed inputs
    let gw = |cluster: &'static str, name: &'static str| {
        [
            "certs",
            "issue",
            "--dir",
            d,
            "gateway",
            "--cluster",
            cluster,
            "--name",
            name,
        ]
    };
    let before = fs::read(&key).unwrap();
    ctl.fails(
        1,
        &gw("eu-1", "gw-a"),
        &[
            "gateway gw-a of cluster eu-1 already has a certificate",
            s(&chain),
        ],
    );
    assert_eq!(fs::read(&key).unwrap(), before, "key was overwritten");
    ctl.fails(
        1,
        &gw("us-2", "gw-a"),
        &["unknown cluster \"us-2\"", "issue --dir"],
    );
    assert!(!dir.join("clusters/us-2").exists());
    ctl.fails(
        1,
        &["certs", "issue", "--dir", d, "cluster", "--cluster", "eu-1"],
        &["cluster eu-1 already has a CA"],
    );
    ctl.fails(1, &gw("EU_1", "gw-a"), &["--cluster", "\"EU_1\""]);
    ctl.fails(1, &gw("eu-1", "gw.a"), &["--name", "\"gw.a\""]);
    let missing = tmp.0.join("missing");
    ctl.fails(
        1,
        &[
            "certs",
            "issue",
            "--dir",
            s(&missing),
            "cluster",
            "--cluster",
            "eu-1",
        ],
        &[s(&missing), "no such CA directory", "certs init"],
    );
    ctl.fails(
        1,
        &[
            "certs",
            "issue",
            "--dir",
            s(&tmp.0),
            "cluster",
            "--cluster",
            "eu-1",
        ],
        &["not an initialised CA directory"],
    );
    ctl.fails(
        1,
        &[
            "certs",
            "init",
            "--dir",
            s(&tmp.0.join("td")),
            "--trust-domain",
            "Mesh.Test",
        ],
        &["--trust-domain", "'M'"],
    );
    ctl.fails(
        1,
        &[
            "certs",
            "init",
            "--dir",
            s(&tmp.0.join("td")),
            "--trust-domain",
            "spiffe://mesh.test",
        ],
        &["without \"spiffe://\""],
    );
    assert!(!tmp.0.join("td").exists());
    // Usage errors: clap's message, exit status 64.
    for args in [
        &["certs", "issue", "--dir", d, "gateway", "--cluster", "eu-1"][..],
        &["certs", "init", "--dir", d],
        &[
            "certs",
            "issue",
            "--dir",
            d,
            "cluster",
            "--cluster",
            "x",
            "--days",
            "0",
        ],
        &[
            "certs",
            "issue",
            "--dir",
            d,
            "cluster",
            "--cluster",
            "x",
            "--days",
            "many",
        ],
        &["certs", "frobnicate"],
    ] {
        let run = ctl.run(args);
        assert_eq!(run.code, 64, "{args:?}: {}", run.stderr);
        assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
    }

    // --- revoke: the gateway on its cluster CA's CRL
    let revoke = |serial, cluster| revoke_args(d, serial, cluster);
    let (leaf_serial, cluster_serial) = (leaf_serial.as_str(), cluster_serial.as_str());
    let cluster_crl = dir.join("clusters/eu-1/ca.crl.pem");
    let out = ctl.ok(&revoke(leaf_serial, Some("eu-1")));
    assert!(out.contains(s(&cluster_crl)), "{out}");
    assert!(out.contains("CRL #1 "), "{out}");
    let crls = Crl::load_all(&cluster_crl).unwrap();
    assert_eq!(crls.len(), 1);
    assert!(crl_lists(&crls[0], leaf_serial));

    // A second gateway, revoked by its serial without colons: both are listed, the CRL
    // number grows.
    ctl.ok(&gw("eu-1", "gw-b"));
    let doc = json(&ctl.ok(&[
        "certs",
        "show",
        "-o",
        "json",
        s(&dir.join("clusters/eu-1/gateways/gw-b.pem")),
    ]));
    let b_serial = doc["certificates"][0]["serial"]
        .as_str()
        .unwrap()
        .replace(':', "");
    let b_serial = b_serial.as_str();
    let out = ctl.ok(&revoke(b_serial, Some("eu-1")));
    assert!(
        out.contains("CRL #2 ") && out.contains("2 serials revoked"),
        "{out}"
    );
    let crls = Crl::load_all(&cluster_crl).unwrap();
    assert!(crl_lists(&crls[0], leaf_serial) && crl_lists(&crls[0], b_serial));
    let state = json(&fs::read_to_string(dir.join("clusters/eu-1/ca.revoked.json")).unwrap());
    assert_eq!(state["crl_number"], 2);
    assert_eq!(state["revoked"].as_array().unwrap().len(), 2);

    // Revoking again is harmless: same list, new CRL number.
    let out = ctl.ok(&revoke(leaf_serial, Some("eu-1")));
    assert!(
        out.contains("already revoked") && out.contains("CRL #3 "),
        "{out}"
    );

    // The cluster CA on the root's CRL.
    let root_crl = dir.join("root-ca.crl.pem");
    let out = ctl.ok(&revoke(cluster_serial, None));
    assert!(out.contains(s(&root_crl)), "{out}");
    let crls = Crl::load_all(&root_crl).unwrap();
    assert!(crl_lists(&crls[0], cluster_serial));
    assert!(!crl_lists(&crls[0], leaf_serial));
    assert_eq!(mode(&root_crl), 0o644);

    // Wrong CRL, unknown serial, bad serial, unknown cluster, missing directory.
    ctl.fails(
        1,
        &revoke(leaf_serial, None),
        &["gateway gw-a of cluster eu-1", "--cluster eu-1"],
    );
    ctl.fails(
        1,
        &revoke(cluster_serial, Some("eu-1")),
        &["the CA of cluster eu-1", "without --cluster"],
    );
    ctl.fails(1, &revoke("41:42:43", None), &["41:42:43", "--force"]);
    let mut forced = revoke("41:42:43", None);
    forced.push("--force");
    ctl.ok(&forced);
    assert!(crl_lists(&Crl::load_all(&root_crl).unwrap()[0], "414243"));
    ctl.fails(
        1,
        &revoke("xyz", None),
        &["--serial", "\"xyz\"", "not a serial"],
    );
    ctl.fails(
        1,
        &revoke(leaf_serial, Some("us-2")),
        &["unknown cluster \"us-2\""],
    );
    ctl.fails(
        1,
        &["certs", "revoke", "--dir", s(&missing), "--serial", "4142"],
        &["no such CA directory"],
    );

    // Keys unchanged and private; nothing printed ever showed key material.
    for k in [&root_key, &cluster_key, &key] {
        assert_eq!(mode(k), 0o600, "{}", k.display());
        assert_no_key_material(&ctl.transcript, &fs::read_to_string(k).unwrap());
    }
    assert_no_key_material(
        &ctl.transcript,
        &fs::read_to_string(dir.join("clusters/eu-1/gateways/gw-b.key")).unwrap(),
    );
}

#[test]
fn key_material_check_catches_a_leak() {
    // The checker itself: a transcript quoting a key must be caught.
    let tmp = TempDir::new("leak");
    let dir = tmp.0.join("ca");
    let mut ctl = Ctl {
        transcript: String::new(),
    };
    ctl.ok(&["certs", "init", "--dir", s(&dir), "--trust-domain", TD]);
    let key = fs::read_to_string(dir.join("root-ca.key")).unwrap();
    let body = pem_body(&key);
    for leaked in [
        key.clone(),
        body[20..40].to_owned(),
        hex::encode(base64_decode(&body)),
    ] {
        let transcript = format!("{}{leaked}", ctl.transcript);
        let caught = std::panic::catch_unwind(|| assert_no_key_material(&transcript, &key));
        assert!(caught.is_err(), "leak not detected: {leaked}");
    }
    assert_no_key_material(&ctl.transcript, &key);
}

/// The Secrets of one cluster: the file is 0600 and holds, base64-decoded, exactly the
/// bundle, the CRLs and each gateway's chain and key; `--out -` works into a pipe; what
/// isthmusctl prints about it holds no key material; a second write is refused.
#[test]
fn certs_secrets_writes_kubernetes_secrets() {
    let tmp = TempDir::new("secrets");
    let ca = tmp.0.join("ca");
    let mut ctl = Ctl {
        transcript: String::new(),
    };
    ctl.ok(&["certs", "init", "--dir", s(&ca), "--trust-domain", TD]);
    ctl.ok(&[
        "certs",
        "issue",
        "--dir",
        s(&ca),
        "cluster",
        "--cluster",
        "east",
    ]);
    for gw in ["isthmus-gateway-0", "clustermesh-api"] {
        ctl.ok(&[
            "certs",
            "issue",
            "--dir",
            s(&ca),
            "gateway",
            "--cluster",
            "east",
            "--name",
            gw,
        ]);
    }
    // Another cluster's gateway stays out of east's Secret.
    ctl.ok(&[
        "certs",
        "issue",
        "--dir",
        s(&ca),
        "cluster",
        "--cluster",
        "west",
    ]);
    ctl.ok(&[
        "certs",
        "issue",
        "--dir",
        s(&ca),
        "gateway",
        "--cluster",
        "west",
        "--name",
        "gw",
    ]);

    let out = tmp.0.join("secrets.yaml");
    let said = ctl.ok(&[
        "certs",
        "secrets",
        "--dir",
        s(&ca),
        "--cluster",
        "east",
        "--out",
        s(&out),
    ]);
    assert!(said.contains("isthmus-tls"), "{said}");
    assert_eq!(mode(&out), 0o600, "the manifests hold private keys");
    let key_path = ca.join("clusters/east/gateways/isthmus-gateway-0.key");
    let key_pem = fs::read_to_string(&key_path).unwrap();
    assert_no_key_material(&ctl.transcript, &key_pem);

    let text = fs::read_to_string(&out).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    assert_eq!(docs.len(), 2);
    let data = |name: &str| -> serde_json::Map<String, serde_json::Value> {
        let doc = docs
            .iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Secret {name}"));
        assert_eq!(doc["kind"], "Secret");
        assert_eq!(doc["metadata"]["namespace"], "isthmus-system");
        doc["data"].as_object().unwrap().clone()
    };
    let decoded = |map: &serde_json::Map<String, serde_json::Value>, key: &str| {
        base64_decode(map[key].as_str().unwrap())
    };
    let tls = data("isthmus-tls");
    let mut keys: Vec<&String> = tls.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "clustermesh-api.key",
            "clustermesh-api.pem",
            "isthmus-gateway-0.key",
            "isthmus-gateway-0.pem"
        ]
    );
    assert_eq!(decoded(&tls, "isthmus-gateway-0.key"), key_pem.as_bytes());
    assert_eq!(
        decoded(&tls, "isthmus-gateway-0.pem"),
        fs::read(ca.join("clusters/east/gateways/isthmus-gateway-0.pem")).unwrap()
    );
    let trust = data("isthmus-trust");
    assert_eq!(
        decoded(&trust, "bundle.pem"),
        fs::read(ca.join("bundle.pem")).unwrap()
    );

    // Into a pipe (as `| kubectl apply -f -`): the same manifests.
    let piped = ctl.ok(&[
        "certs",
        "secrets",
        "--dir",
        s(&ca),
        "--cluster",
        "east",
        "--out",
        "-",
    ]);
    assert_eq!(piped, text);
    ctl.fails(
        1,
        &[
            "certs",
            "secrets",
            "--dir",
            s(&ca),
            "--cluster",
            "east",
            "--out",
            s(&out),
        ],
        &["secrets.yaml"],
    );
    ctl.fails(
        1,
        &[
            "certs",
            "secrets",
            "--dir",
            s(&ca),
            "--cluster",
            "north",
            "--out",
            "-",
        ],
        &["north"],
    );
    // `--out -` redirected into a file: refused when others can read it (umask 022) or
    // it is another user's owner-only file; works into this user's owner-only file.
    for (case, mode, owner, works) in [
        ("a file others can read", 0o644, None, false),
        ("another user's owner-only file", 0o600, Some(65534), false),
        ("this user's owner-only file", 0o600, None, true),
    ] {
        let path = tmp
            .0
            .join(format!("redirected-{mode:o}-{}.yaml", owner.is_some()));
        let file = fs::File::create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(uid)).unwrap();
        }
        let status = Command::new(env!("CARGO_BIN_EXE_isthmusctl"))
            .args([
                "certs",
                "secrets",
                "--dir",
                s(&ca),
                "--cluster",
                "east",
                "--out",
                "-",
            ])
            .stdout(file)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.success(), works, "stdout into {case}");
        let written = fs::read_to_string(&path).unwrap();
        assert_eq!(written.is_empty(), !works, "stdout into {case}");
    }
}

/// Every CRL reaches the trust Secret under its own key, also for a cluster named like
/// the root's CRL file (`root-ca`): the root's revocation of a whole cluster CA must not
/// be shadowed by a cluster's CRL.
#[test]
fn certs_secrets_keeps_every_crl_apart() {
    let tmp = TempDir::new("crls");
    let ca = tmp.0.join("ca");
    let mut ctl = Ctl {
        transcript: String::new(),
    };
    ctl.ok(&["certs", "init", "--dir", s(&ca), "--trust-domain", TD]);
    for c in ["east", "root-ca"] {
        ctl.ok(&["certs", "issue", "--dir", s(&ca), "cluster", "--cluster", c]);
        ctl.ok(&[
            "certs",
            "issue",
            "--dir",
            s(&ca),
            "gateway",
            "--cluster",
            c,
            "--name",
            "gw",
        ]);
    }
    let serial = |path: &Path, i: usize| -> String {
        let doc = json(&ctl_show(path));
        doc["certificates"][i]["serial"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // The root revokes east's cluster CA; root-ca's CA revokes its gateway.
    let east_ca = serial(&ca.join("clusters/east/gateways/gw.pem"), 1);
    ctl.ok(&["certs", "revoke", "--dir", s(&ca), "--serial", &east_ca]);
    let gw = serial(&ca.join("clusters/root-ca/gateways/gw.pem"), 0);
    ctl.ok(&[
        "certs",
        "revoke",
        "--dir",
        s(&ca),
        "--cluster",
        "root-ca",
        "--serial",
        &gw,
    ]);
    let out = tmp.0.join("secrets.yaml");
    ctl.ok(&[
        "certs",
        "secrets",
        "--dir",
        s(&ca),
        "--cluster",
        "east",
        "--out",
        s(&out),
    ]);
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&fs::read_to_string(&out).unwrap()).unwrap();
    let trust = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "isthmus-trust")
        .unwrap();
    let mut keys: Vec<&String> = trust["data"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["bundle.pem", "cluster-root-ca.crl.pem", "root-ca.crl.pem"]
    );
    assert_eq!(
        base64_decode(trust["data"]["root-ca.crl.pem"].as_str().unwrap()),
        fs::read(ca.join("root-ca.crl.pem")).unwrap(),
        "the root's CRL, not the cluster's"
    );
}

fn ctl_show(path: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_isthmusctl"))
        .args(["certs", "show", "-o", "json", s(path)])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// `certs rotate --ca`, `--root` and `certs retire-root` from the command line: the
/// documented order works and says what comes next, every step out of order or with
/// bad arguments is refused with one line, a rotated-out CA is revocable without
/// --force, and nothing printed shows key material (old keys included).
#[test]
fn certs_rotate_ca_and_root() {
    let tmp = TempDir::new("rotate-ca");
    let dir = tmp.0.join("ca");
    let d = s(&dir);
    let mut ctl = Ctl {
        transcript: String::new(),
    };
    ctl.ok(&["certs", "init", "--dir", d, "--trust-domain", TD]);
    ctl.ok(&["certs", "issue", "--dir", d, "cluster", "--cluster", "one"]);
    ctl.ok(&[
        "certs",
        "issue",
        "--dir",
        d,
        "gateway",
        "--cluster",
        "one",
        "--name",
        "a",
    ]);
    let mut keys = vec![
        fs::read_to_string(dir.join("root-ca.key")).unwrap(),
        fs::read_to_string(dir.join("clusters/one/ca.key")).unwrap(),
        fs::read_to_string(dir.join("clusters/one/gateways/a.key")).unwrap(),
    ];

    // Arguments: a CA rotation names its cluster; --root takes no cluster; unknown
    // clusters and retiring with nothing to retire are refused.
    let run = ctl.run(&["certs", "rotate", "--dir", d, "--ca"]);
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("--cluster"), "{}", run.stderr);
    let run = ctl.run(&["certs", "rotate", "--dir", d, "--root", "--cluster", "one"]);
    assert_eq!(run.code, 64, "{}", run.stderr);
    let run = ctl.run(&[
        "certs",
        "rotate",
        "--dir",
        d,
        "--cluster",
        "one",
        "--name",
        "a",
        "--ca",
    ]);
    assert_eq!(run.code, 64, "{}", run.stderr);
    ctl.fails(
        1,
        &["certs", "rotate", "--dir", d, "--ca", "--cluster", "nope"],
        &["unknown cluster \"nope\""],
    );
    ctl.fails(
        1,
        &["certs", "retire-root", "--dir", d],
        &["no previous root"],
    );

    // A cluster CA: re-issues the gateway, keeps the old CA, and the old CA's serial
    // is revocable on the root's CRL without --force.
    let out = ctl.ok(&["certs", "rotate", "--dir", d, "--ca", "--cluster", "one"]);
    assert!(
        out.starts_with("rotated the CA of cluster one (was serial "),
        "{out}"
    );
    assert!(out.contains("re-issued:    gateway a, serial "), "{out}");
    let old_ca = out["rotated the CA of cluster one (was serial ".len()..]
        .split(',')
        .next()
        .unwrap()
        .to_owned();
    assert!(is_colon_hex(&old_ca, 16), "{old_ca}");
    let kept: Vec<_> = fs::read_dir(dir.join("clusters/one/previous"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    for path in kept
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
    {
        assert_eq!(mode(path), 0o600);
    }
    let out = ctl.ok(&["certs", "revoke", "--dir", d, "--serial", &old_ca]);
    assert!(out.contains("the CA of cluster one"), "{out}");
    keys.push(fs::read_to_string(dir.join("clusters/one/ca.key")).unwrap());
    keys.push(fs::read_to_string(dir.join("clusters/one/gateways/a.key")).unwrap());

    // The root: bundle of two, retiring refused until the cluster CA moved, then one.
    let out = ctl.ok(&["certs", "rotate", "--dir", d, "--root"]);
    assert!(out.contains("(2 roots"), "{out}");
    assert!(out.contains("--ca --cluster C (clusters: one)"), "{out}");
    assert!(
        out.contains("re-issued as CRL #2 of the mesh root CA"),
        "{out}"
    );
    assert_eq!(
        ctl_show(&dir.join("bundle.pem"))
            .matches("\"kind\": \"mesh root CA\"")
            .count(),
        2
    );
    ctl.fails(
        1,
        &["certs", "retire-root", "--dir", d],
        &["the CA of cluster one was issued by", "rotate it first"],
    );
    ctl.ok(&["certs", "rotate", "--dir", d, "--ca", "--cluster", "one"]);
    let out = ctl.ok(&["certs", "retire-root", "--dir", d]);
    assert!(out.contains("retired the previous root CA serial"), "{out}");
    assert!(out.contains("(1 root)"), "{out}");
    assert_eq!(
        ctl_show(&dir.join("bundle.pem"))
            .matches("\"kind\": \"mesh root CA\"")
            .count(),
        1
    );
    assert!(
        !dir.join("previous").read_dir().unwrap().any(|_| true),
        "old root's files gone"
    );

    keys.push(fs::read_to_string(dir.join("root-ca.key")).unwrap());
    for key in &keys {
        assert_no_key_material(&ctl.transcript, key);
    }
}

/// Found by the third review: `certs rotate --ca` gave a revoked gateway a new, valid
/// certificate; and an administrator's certificate could only be revoked with
/// --force (it was not in the inventory).
#[test]
fn certs_rotate_ca_leaves_revoked_gateways_revoked() {
    let tmp = TempDir::new("rotate-ca-revoked");
    let dir = tmp.0.join("ca");
    let d = s(&dir);
    let mut ctl = Ctl {
        transcript: String::new(),
    };
    ctl.ok(&["certs", "init", "--dir", d, "--trust-domain", TD]);
    ctl.ok(&["certs", "issue", "--dir", d, "cluster", "--cluster", "one"]);
    for name in ["a", "b"] {
        ctl.ok(&[
            "certs",
            "issue",
            "--dir",
            d,
            "gateway",
            "--cluster",
            "one",
            "--name",
            name,
        ]);
    }
    ctl.ok(&[
        "certs",
        "issue",
        "--dir",
        d,
        "admin",
        "--cluster",
        "one",
        "--name",
        "ops",
    ]);
    let serial = |path: &Path| -> String {
        json(&ctl_show(path))["certificates"][0]["serial"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // b's first certificate is rotated out (not revoked), its second one revoked.
    let b_chain = dir.join("clusters/one/gateways/b.pem");
    let b_first = fs::read_to_string(&b_chain).unwrap();
    ctl.ok(&[
        "certs",
        "rotate",
        "--dir",
        d,
        "--cluster",
        "one",
        "--name",
        "b",
    ]);
    let b_before = fs::read_to_string(&b_chain).unwrap();
    let b = serial(&b_chain);
    ctl.ok(&revoke_args(d, &b, Some("one")));
    // A revoked gateway gets no new certificate by accident, not even with another
    // gateway's certificate put in its chain file (third review).
    fs::copy(dir.join("clusters/one/gateways/a.pem"), &b_chain).unwrap();
    ctl.fails(
        1,
        &[
            "certs",
            "rotate",
            "--dir",
            d,
            "--cluster",
            "one",
            "--name",
            "b",
        ],
        &[
            "not a certificate of this cluster's CAs for spiffe://",
            "--force",
        ],
    );
    fs::write(&b_chain, &b_before).unwrap();
    ctl.fails(
        1,
        &[
            "certs",
            "rotate",
            "--dir",
            d,
            "--cluster",
            "one",
            "--name",
            "b",
        ],
        &["is revoked", "--force"],
    );
    assert_eq!(fs::read_to_string(&b_chain).unwrap(), b_before);
    let ops = serial(&dir.join("clusters/one/admins/ops.pem"));
    let out = ctl.ok(&revoke_args(d, &ops, Some("one")));
    assert!(out.contains("administrator ops of cluster one"), "{out}");

    let out = ctl.ok(&["certs", "rotate", "--dir", d, "--ca", "--cluster", "one"]);
    assert!(out.contains("re-issued:    gateway a, serial "), "{out}");
    assert!(!out.contains("re-issued:    gateway b"), "{out}");
    assert!(
        out.contains("not re-issued: gateway b (serial ") && out.contains("is revoked"),
        "{out}"
    );
    assert!(out.contains("not re-issued: administrator ops"), "{out}");
    assert_eq!(fs::read_to_string(&b_chain).unwrap(), b_before);

    // b's older certificate put back in place of the revoked one: not re-issued either.
    fs::write(&b_chain, &b_first).unwrap();
    let out = ctl.ok(&["certs", "rotate", "--dir", d, "--ca", "--cluster", "one"]);
    assert!(
        out.contains("not re-issued: gateway b (a certificate of spiffe://"),
        "{out}"
    );
    // Deliberately, with --force, it gets one.
    ctl.ok(&[
        "certs",
        "rotate",
        "--dir",
        d,
        "--cluster",
        "one",
        "--name",
        "b",
        "--force",
    ]);
    assert_ne!(fs::read_to_string(&b_chain).unwrap(), b_first);
}
