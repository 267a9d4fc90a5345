//! `isthmusctl certs`: the mesh PKI from the command line.
//!
//! - `init` creates the mesh root CA and the trust bundle in a CA directory
//!   ([`CaDirectory`], layout in certs/README.md).
//! - `issue cluster` / `issue gateway` issue a cluster intermediate CA or a gateway leaf.
//! - `show` summarises every certificate of a PEM file (text or JSON).
//! - `revoke` adds a serial to the root's CRL (cluster CAs) or to a cluster CA's CRL
//!   (gateways). The revoked serials and the CRL number live next to the CRL in
//!   `*.revoked.json`, so repeated revokes accumulate and the CRL number grows.
//!
//! - `secrets` writes a cluster's certificates as Kubernetes Secret manifests.
//!
//! Nothing here prints key material: keys are only ever written (0600, by
//! `isthmus-certs`), and `show` refuses a file holding a private key. Paths and public
//! certificate fields are the only things printed. The one exception is `secrets --out -`,
//! which writes its manifests (with keys) to a pipe, never to a terminal.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use clap::{Subcommand, ValueEnum};
use isthmus_certs::{CaDirectory, CertificateSummary, Crl, LeafKind, Serial, Validity};
use isthmus_identity::{ClusterName, GatewayName, TrustDomain};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Longest validity `--days` accepts (100 years).
const MAX_DAYS: i64 = 36_500;

/// `isthmusctl certs ...`
#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create the mesh root CA and the trust bundle in a new CA directory.
    Init {
        /// CA directory (created 0700 if missing); refused if it already holds a root CA.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Trust domain of the mesh, e.g. mesh.example.org (no spiffe:// prefix).
        #[arg(long, value_name = "TD")]
        trust_domain: String,
        /// Validity of the root CA in days.
        #[arg(long, value_name = "N", default_value_t = 3650,
              value_parser = clap::value_parser!(u32).range(1..=MAX_DAYS))]
        days: u32,
    },
    /// Issue a cluster intermediate CA or a gateway certificate.
    Issue {
        /// CA directory made by `isthmusctl certs init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[command(subcommand)]
        what: IssueCmd,
    },
    /// Rotate a gateway's certificate (--cluster C --name GW), a cluster CA
    /// (--cluster C --ca) or the mesh root (--root). Files are replaced atomically and
    /// running gateways pick them up without a restart (`[identity]
    /// reload_interval_ms`), renewing their peer channels with the new certificate;
    /// tunnels are untouched.
    ///
    /// A gateway: new key and serial; the old certificate stays valid until it expires
    /// or is revoked. A cluster CA: a new CA under the root in force (the old one is
    /// kept under clusters/C/previous/ and keeps signing the cluster's CRL), every
    /// gateway and administrator certificate of the cluster re-issued under it. The
    /// root: a new root is added to the trust bundle (both are trusted); give that
    /// bundle to every gateway, rotate every cluster CA, then `certs retire-root`.
    Rotate {
        /// CA directory made by `isthmusctl certs init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Cluster of the gateway, or whose CA to rotate (with --ca).
        #[arg(long, value_name = "NAME", required_unless_present = "root")]
        cluster: Option<String>,
        /// Gateway name; it must have a certificate in DIR.
        #[arg(long, value_name = "GW", required_unless_present_any = ["ca", "root"],
              conflicts_with_all = ["ca", "root"])]
        name: Option<String>,
        /// Rotate the cluster's CA and re-issue all its certificates.
        #[arg(long, requires = "cluster", conflicts_with = "root")]
        ca: bool,
        /// Rotate the mesh root CA (a new root added to the trust bundle).
        #[arg(long, conflicts_with = "cluster")]
        root: bool,
        /// Validity in days (clamped to the issuer's) [default: 90 for a gateway, 365
        /// for a cluster CA, 3650 for the root; re-issued leaves keep their lifetime].
        #[arg(long, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=MAX_DAYS))]
        days: Option<u32>,
        /// Give a gateway whose certificate is revoked a new one (it is trusted again:
        /// a new key, a new host). Without it, that is refused.
        #[arg(long, requires = "name")]
        force: bool,
    },
    /// Take the roots rotated out (`certs rotate --root`) out of the trust bundle and
    /// delete their keys. Refused while a cluster CA or certificate in DIR still chains
    /// to one of them. Give the new bundle to every gateway afterwards: a peer still
    /// presenting a certificate under a retired root is cut when its gateway reloads.
    RetireRoot {
        /// CA directory made by `isthmusctl certs init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print subject, issuer, SPIFFE ID, validity, serial and SHA-256 fingerprint of
    /// every certificate in a PEM file. Refuses private key files.
    Show {
        /// PEM file with one or more certificates (a certificate, chain or bundle).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = ShowOutput::Text)]
        output: ShowOutput,
    },
    /// Revoke a certificate: a cluster CA on the root's CRL, or (with --cluster) a
    /// gateway certificate on its cluster CA's CRL. Writes the CRL file.
    Revoke {
        /// CA directory made by `isthmusctl certs init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Serial number in hex, optionally ':'-separated (as `certs show` prints it).
        #[arg(long, value_name = "HEX")]
        serial: String,
        /// Revoke on this cluster CA's CRL (gateway certificates) instead of the root's
        /// (cluster CA certificates).
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// Days until the CRL's nextUpdate.
        #[arg(long, value_name = "N", default_value_t = 30,
              value_parser = clap::value_parser!(u32).range(1..=MAX_DAYS))]
        days: u32,
        /// Revoke even if no certificate with this serial is on file in DIR
        /// (e.g. its files were deleted).
        #[arg(long)]
        force: bool,
    },
    /// Write a cluster's certificates as Kubernetes Secret manifests: `isthmus-trust`
    /// (the trust bundle and every CRL in DIR) and `isthmus-tls` (each gateway's chain
    /// and key, as `<gateway>.pem` and `<gateway>.key`). For `kubectl apply -f`.
    Secrets {
        /// CA directory made by `isthmusctl certs init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The cluster whose gateway certificates go into `isthmus-tls`.
        #[arg(long, value_name = "NAME")]
        cluster: String,
        /// Namespace of the Secrets.
        #[arg(long, value_name = "NS", default_value = "isthmus-system")]
        namespace: String,
        /// Where to write the manifests (created mode 0600, refused if it exists), or
        /// `-` for standard output, refused on a terminal: they hold private keys.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// `isthmusctl certs issue --dir DIR ...`
#[derive(Subcommand, Debug)]
pub enum IssueCmd {
    /// Issue the intermediate CA of a cluster (signed by the root).
    Cluster {
        /// Cluster name (a DNS label: lowercase letters, digits, '-').
        #[arg(long, value_name = "NAME")]
        cluster: String,
        /// Validity in days (clamped to the root's).
        #[arg(long, value_name = "N", default_value_t = 365,
              value_parser = clap::value_parser!(u32).range(1..=MAX_DAYS))]
        days: u32,
    },
    /// Issue a gateway certificate (signed by its cluster CA), URI SAN
    /// spiffe://TD/cluster/NAME/gateway/GW.
    Gateway {
        /// Cluster of the gateway; its CA must have been issued.
        #[arg(long, value_name = "NAME")]
        cluster: String,
        /// Gateway name (a DNS label: lowercase letters, digits, '-').
        #[arg(long, value_name = "GW")]
        name: String,
        /// Validity in days (clamped to the cluster CA's).
        #[arg(long, value_name = "N", default_value_t = 90,
              value_parser = clap::value_parser!(u32).range(1..=MAX_DAYS))]
        days: u32,
    },
    /// Issue an administrator's client certificate (signed by the cluster CA), URI
    /// SAN spiffe://TD/cluster/NAME/admin/ADMIN: `isthmusctl --remote` presents it to
    /// the gateways of that cluster (`[admin] listen`).
    Admin {
        /// Cluster whose gateways the administrator may manage.
        #[arg(long, value_name = "NAME")]
        cluster: String,
        /// Administrator name (a DNS label).
        #[arg(long, value_name = "ADMIN")]
        name: String,
        /// Validity in days (clamped to the cluster CA's).
        #[arg(long, value_name = "N", default_value_t = 30,
              value_parser = clap::value_parser!(u32).range(1..=MAX_DAYS))]
        days: u32,
    },
}

/// Output format of `certs show`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ShowOutput {
    Text,
    Json,
}

/// Runs one `certs` subcommand, printing to stdout.
pub fn run(cmd: CertsCmd) -> anyhow::Result<()> {
    let text = match cmd {
        CertsCmd::Init {
            dir,
            trust_domain,
            days,
        } => init(&dir, &trust_domain, days)?,
        CertsCmd::Rotate {
            dir,
            cluster,
            name,
            ca,
            root,
            days,
            force,
        } => match (cluster, name) {
            _ if root => rotate_root(&dir, days.unwrap_or(3650))?,
            (Some(cluster), _) if ca => rotate_cluster_ca(&dir, &cluster, days.unwrap_or(365))?,
            (Some(cluster), Some(name)) => {
                rotate_gateway(&dir, &cluster, &name, days.unwrap_or(90), force)?
            }
            _ => bail!("certs rotate: give --cluster and --name, --cluster and --ca, or --root"),
        },
        CertsCmd::RetireRoot { dir } => retire_root(&dir)?,
        CertsCmd::Issue { dir, what } => match what {
            IssueCmd::Cluster { cluster, days } => issue_cluster(&dir, &cluster, days)?,
            IssueCmd::Gateway {
                cluster,
                name,
                days,
            } => issue_leaf(&dir, LeafKind::Gateway, &cluster, &name, days)?,
            IssueCmd::Admin {
                cluster,
                name,
                days,
            } => issue_leaf(&dir, LeafKind::Admin, &cluster, &name, days)?,
        },
        CertsCmd::Show { file, output } => show(&file, output)?,
        CertsCmd::Revoke {
            dir,
            serial,
            cluster,
            days,
            force,
        } => revoke(&dir, &serial, cluster.as_deref(), days, force)?,
        CertsCmd::Secrets {
            dir,
            cluster,
            namespace,
            out,
        } => secrets(&dir, &cluster, &namespace, &out)?,
    };
    use std::io::Write as _;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Kubernetes Secrets

/// One Secret manifest, written by hand into one pre-sized buffer that is zeroed when
/// dropped (a serializer would leave base64 copies of the keys in freed memory). Names
/// are checked DNS labels; every data key is checked here to be a Secret key (letters,
/// digits, `-`, `_`, `.`) used once, so nothing needs escaping.
fn secret_manifest(
    name: &str,
    namespace: &str,
    data: &[(String, Zeroizing<Vec<u8>>)],
) -> anyhow::Result<Zeroizing<String>> {
    use base64::Engine as _;
    for (i, (key, _)) in data.iter().enumerate() {
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            bail!("Secret {name}: {key:?} is not a valid Secret key");
        }
        if data[..i].iter().any(|(k, _)| k == key) {
            bail!("Secret {name}: key {key:?} twice");
        }
    }
    let size: usize = data
        .iter()
        .map(|(k, v)| k.len() + v.len().div_ceil(3) * 4 + 16)
        .sum();
    let mut out = Zeroizing::new(String::with_capacity(256 + size));
    let _ = write!(
        out,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels:\n    app.kubernetes.io/part-of: isthmus\ntype: Opaque\ndata:\n"
    );
    for (key, value) in data {
        let _ = write!(out, "  \"{key}\": ");
        base64::engine::general_purpose::STANDARD.encode_string(&**value, &mut out);
        out.push('\n');
    }
    Ok(out)
}

fn secrets(dir: &Path, cluster: &str, namespace: &str, out: &Path) -> anyhow::Result<String> {
    let cluster = parse_cluster(cluster)?;
    if namespace.is_empty()
        || namespace.len() > 63
        || namespace.starts_with('-')
        || namespace.ends_with('-')
        || !namespace
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("--namespace {namespace:?}: not a Kubernetes namespace name (a DNS label)");
    }
    let to_stdout = out.as_os_str() == "-";
    if to_stdout {
        check_stdout_for_secrets()?;
    }
    let store = open_dir(dir)?;
    // Read under the lock: never half of a rotation in progress.
    let _lock = lock_dir(&store)?;
    if !store.cluster_cert_path(&cluster).is_file() {
        bail!(
            "unknown cluster \"{cluster}\": no cluster CA in {}",
            dir.display()
        );
    }
    let read = |path: &Path| -> anyhow::Result<Zeroizing<Vec<u8>>> {
        Ok(Zeroizing::new(
            fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        ))
    };
    // The trust Secret: the bundle and every CRL, the root's as `root-ca.crl.pem` and
    // each cluster CA's as `cluster-<name>.crl.pem` (distinct whatever the names).
    let mut trust = vec![("bundle.pem".to_owned(), read(&store.bundle_path())?)];
    let root_crl = store.path().join("root-ca.crl.pem");
    if root_crl.is_file() {
        trust.push(("root-ca.crl.pem".to_owned(), read(&root_crl)?));
    }
    let clusters_dir = store.path().join("clusters");
    let mut clusters: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(&clusters_dir)
        .with_context(|| format!("reading {}", clusters_dir.display()))?
    {
        clusters.push(
            entry
                .with_context(|| format!("reading {}", clusters_dir.display()))?
                .path(),
        );
    }
    clusters.sort();
    for c in clusters {
        let crl = c.join("ca.crl.pem");
        if !crl.is_file() {
            continue;
        }
        let name = c.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let name = ClusterName::new(name)
            .map_err(|e| anyhow!("{}: not a cluster's folder: {e}", c.display()))?;
        trust.push((format!("cluster-{name}.crl.pem"), read(&crl)?));
    }
    // The TLS Secret: every gateway certificate of the cluster with its key.
    let gateways_dir = store.cluster_cert_path(&cluster).with_file_name("gateways");
    let mut names: Vec<String> = fs::read_dir(&gateways_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.strip_suffix(".pem")?.to_owned();
                    Some(name)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        bail!(
            "cluster {cluster} has no gateway certificates in {} (issue them with \
             `isthmusctl certs issue --dir {} gateway --cluster {cluster} --name NAME`)",
            gateways_dir.display(),
            dir.display()
        );
    }
    let mut tls = Vec::new();
    for name in &names {
        let gw = parse_gateway(name)?;
        let files = store.gateway_files(&cluster, &gw);
        tls.push((format!("{name}.pem"), read(&files.chain)?));
        // Checked as the gateway checks it (owner-only mode), on the open file.
        let key = isthmus_certs::files::read_private_key_pem(&files.key)?;
        tls.push((
            format!("{name}.key"),
            Zeroizing::new(key.as_bytes().to_vec()),
        ));
    }
    let docs = [
        secret_manifest("isthmus-trust", namespace, &trust)?,
        secret_manifest("isthmus-tls", namespace, &tls)?,
    ];
    let write = |sink: &mut dyn std::io::Write| -> std::io::Result<()> {
        sink.write_all(docs[0].as_bytes())?;
        sink.write_all(b"---\n")?;
        sink.write_all(docs[1].as_bytes())?;
        sink.flush()
    };
    if to_stdout {
        write(&mut std::io::stdout().lock())?;
        return Ok(String::new());
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    write(&mut file)?;
    Ok(format!(
        "wrote Secrets isthmus-trust ({} files) and isthmus-tls (gateways: {}) of namespace {namespace} to {} (mode 0600)\n",
        trust.len(),
        names.join(", "),
        out.display()
    ))
}

/// `--out -` writes private keys to standard output: only into a pipe or socket, or a
/// file nobody else can read; never onto a terminal.
fn check_stdout_for_secrets() -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::FileTypeExt as _;
    let stdout = std::io::stdout();
    if std::io::IsTerminal::is_terminal(&stdout) {
        bail!(
            "--out -: refusing to print private keys on a terminal \
             (pipe it into `kubectl apply -f -`, or give --out FILE)"
        );
    }
    let meta = File::from(stdout.as_fd().try_clone_to_owned()?).metadata()?;
    let kind = meta.file_type();
    if kind.is_fifo() || kind.is_socket() {
        return Ok(());
    }
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "--out -: standard output is a file that group or others can read (mode {:o}); \
             refusing to write private keys into it (use --out FILE, created 0600)",
            meta.permissions().mode() & 0o777
        );
    }
    // Someone else's owner-only file is theirs to read.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let owner = std::os::unix::fs::MetadataExt::uid(&meta);
    if owner != euid {
        bail!(
            "--out -: standard output is a file owned by uid {owner}, not by this user; \
             refusing to write private keys into it (use --out FILE, created 0600)"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Input validation

fn parse_trust_domain(s: &str) -> anyhow::Result<TrustDomain> {
    if let Some(rest) = s.strip_prefix("spiffe://") {
        bail!(
            "--trust-domain {s:?}: give the trust domain name without \"spiffe://\" \
             (e.g. {rest:?})"
        );
    }
    TrustDomain::new(s).map_err(|e| anyhow!("--trust-domain {s:?}: {e}"))
}

fn parse_cluster(s: &str) -> anyhow::Result<ClusterName> {
    ClusterName::new(s).map_err(|e| anyhow!("--cluster: {e}"))
}

fn parse_gateway(s: &str) -> anyhow::Result<GatewayName> {
    GatewayName::new(s).map_err(|e| anyhow!("--name: {e}"))
}

fn parse_serial(s: &str) -> anyhow::Result<Serial> {
    Serial::from_str(s.trim()).map_err(|e| anyhow!("--serial: {e}"))
}

/// Opens an initialised CA directory, saying precisely what is wrong otherwise.
fn open_dir(dir: &Path) -> anyhow::Result<CaDirectory> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{}: no such CA directory (create one with `isthmusctl certs init --dir {} \
             --trust-domain TD`)",
            dir.display(),
            dir.display()
        ),
        Err(e) => bail!("{}: {e}", dir.display()),
        Ok(meta) if !meta.is_dir() => bail!("{}: not a directory", dir.display()),
        Ok(_) => {}
    }
    Ok(CaDirectory::open(dir)?)
}

fn validity_days(days: u32) -> Validity {
    Validity::days(days)
}

// ---------------------------------------------------------------------------------------
// Formatting

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC), the same form the certificate summaries print.
fn rfc3339(t: SystemTime) -> String {
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (eras of 400 years).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are in range by construction (1..=31, 1..=12).
    (year, day_u32(month), day_u32(day))
}

fn day_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn colon_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// What a certificate is in the mesh hierarchy.
fn kind(s: &CertificateSummary) -> &'static str {
    match &s.spiffe_id {
        Some(id) if s.is_ca && id.path().is_empty() => "mesh root CA",
        Some(id) if s.is_ca && id.as_cluster().is_some() => "cluster CA",
        Some(id) if !s.is_ca && id.as_gateway().is_some() => "gateway",
        _ if s.is_ca => "CA (not a mesh CA)",
        _ => "certificate (not a mesh gateway)",
    }
}

/// "valid", "expired" or "not yet valid" at `now`.
fn status(s: &CertificateSummary, now: SystemTime) -> &'static str {
    if s.is_valid_at(now) {
        "valid"
    } else if now > s.not_after {
        "expired"
    } else {
        "not yet valid"
    }
}

fn mode_of(path: &Path) -> anyhow::Result<u32> {
    Ok(fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .permissions()
        .mode()
        & 0o7777)
}

/// The first certificate of a file we just wrote.
fn summary_of(path: &Path) -> anyhow::Result<CertificateSummary> {
    CertificateSummary::from_file(path)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("{}: no certificate", path.display()))
}

/// Lines describing a freshly created certificate.
fn describe_new(out: &mut String, s: &CertificateSummary, requested_days: u32) {
    let id = s
        .spiffe_id
        .as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string);
    let _ = writeln!(out, "  spiffe id:    {id}");
    let _ = writeln!(out, "  subject:      {}", s.subject);
    let _ = writeln!(out, "  serial:       {}", s.serial);
    let _ = writeln!(out, "  sha256:       {}", colon_hex(&s.sha256_fingerprint));
    let _ = write!(
        out,
        "  valid:        {} to {}",
        rfc3339(s.not_before),
        rfc3339(s.not_after)
    );
    let requested = SystemTime::now() + Duration::from_secs(u64::from(requested_days) * 86_400);
    if s.not_after + Duration::from_secs(3600) < requested {
        out.push_str(" (shortened to the issuing CA's validity)");
    }
    out.push('\n');
}

fn describe_key(out: &mut String, path: &Path) -> anyhow::Result<()> {
    let _ = writeln!(
        out,
        "  private key:  {} (mode {:04o})",
        path.display(),
        mode_of(path)?
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// init / issue

fn init(dir: &Path, trust_domain: &str, days: u32) -> anyhow::Result<String> {
    let td = parse_trust_domain(trust_domain)?;
    if let Ok(meta) = fs::metadata(dir) {
        if !meta.is_dir() {
            bail!("{}: exists and is not a directory", dir.display());
        }
    }
    // CaDirectory::init refuses these too; say what it means.
    let probe = CaDirectory::open(dir).ok();
    if let Some(existing) = probe {
        bail!(
            "{}: already holds a mesh root CA ({}); refusing to overwrite it",
            dir.display(),
            existing.root_cert_path().display()
        );
    }
    let key_path = dir.join("root-ca.key");
    if key_path.exists() {
        bail!(
            "{}: already exists; refusing to overwrite a private key",
            key_path.display()
        );
    }
    let store = CaDirectory::init(dir, &td, validity_days(days))?;
    let root = summary_of(&store.root_cert_path())?;
    let mut out = format!(
        "created the mesh root CA of trust domain {td} in {}\n",
        store.path().display()
    );
    describe_new(&mut out, &root, days);
    let _ = writeln!(out, "  certificate:  {}", store.root_cert_path().display());
    describe_key(&mut out, &key_path)?;
    let _ = writeln!(
        out,
        "  trust bundle: {} (give it to every gateway)",
        store.bundle_path().display()
    );
    Ok(out)
}

fn issue_cluster(dir: &Path, cluster: &str, days: u32) -> anyhow::Result<String> {
    let cluster = parse_cluster(cluster)?;
    let store = open_dir(dir)?;
    let _lock = lock_dir(&store)?;
    let cert_path = store.cluster_cert_path(&cluster);
    if cert_path.exists() {
        bail!(
            "cluster {cluster} already has a CA ({}); refusing to overwrite it",
            cert_path.display()
        );
    }
    let key_path = cert_path.with_file_name("ca.key");
    let cert_path = store.issue_cluster_ca(&cluster, validity_days(days))?;
    let ca = summary_of(&cert_path)?;
    let mut out = format!("issued the CA of cluster {cluster}\n");
    describe_new(&mut out, &ca, days);
    let _ = writeln!(out, "  certificate:  {}", cert_path.display());
    describe_key(&mut out, &key_path)?;
    Ok(out)
}

fn issue_leaf(
    dir: &Path,
    kind: LeafKind,
    cluster: &str,
    name: &str,
    days: u32,
) -> anyhow::Result<String> {
    let what = match kind {
        LeafKind::Gateway => "gateway",
        LeafKind::Admin => "administrator",
    };
    let cluster = parse_cluster(cluster)?;
    let name = parse_gateway(name)?;
    let store = open_dir(dir)?;
    if !store.cluster_cert_path(&cluster).is_file() {
        bail!(
            "unknown cluster \"{cluster}\": no cluster CA in {} (issue one with \
             `isthmusctl certs issue --dir {} cluster --cluster {cluster}`)",
            dir.display(),
            dir.display()
        );
    }
    let _lock = lock_dir(&store)?;
    let files = store.leaf_files(kind, &cluster, &name);
    for path in [&files.chain, &files.key] {
        if path.exists() {
            bail!(
                "{what} {name} of cluster {cluster} already has a certificate ({} exists); \
                 refusing to overwrite it (revoke it, move its files away, then issue again)",
                path.display()
            );
        }
    }
    let files = store.issue_leaf(kind, &cluster, &name, validity_days(days))?;
    let leaf = summary_of(&files.chain)?;
    let mut out = format!("issued the certificate of {what} {name} in cluster {cluster}\n");
    describe_new(&mut out, &leaf, days);
    let _ = writeln!(
        out,
        "  chain:        {} ({what} certificate, then cluster CA)",
        files.chain.display()
    );
    describe_key(&mut out, &files.key)?;
    let _ = writeln!(out, "  trust bundle: {}", store.bundle_path().display());
    Ok(out)
}

pub(crate) fn rotate_gateway(
    dir: &Path,
    cluster: &str,
    name: &str,
    days: u32,
    force: bool,
) -> anyhow::Result<String> {
    let cluster = parse_cluster(cluster)?;
    let name = parse_gateway(name)?;
    let store = open_dir(dir)?;
    let _lock = lock_dir(&store)?;
    let files = store.gateway_files(&cluster, &name);
    let old = summary_of(&files.chain).with_context(|| {
        format!(
            "gateway {name} of cluster {cluster} has no certificate to rotate (issue one with \
             `isthmusctl certs issue --dir {} gateway --cluster {cluster} --name {name}`)",
            dir.display()
        )
    })?;
    let (_, _, state_path) = crl_files(&store, Some(&cluster));
    let state = load_state(&state_path)?;
    let serials = state_serials(&state, &state_path)?;
    let check = |leaf: &CertificateSummary| revoked_in(&state, &serials, leaf);
    let check: Option<&isthmus_certs::LeafCheck<'_>> = if force { None } else { Some(&check) };
    match store.rotate_gateway(&cluster, &name, validity_days(days), check) {
        Err(isthmus_certs::CertError::RotationRefused(why)) => bail!(
            "gateway {name} of cluster {cluster}: {why}; a new certificate would make it \
             trusted again. If it is (a new key, a new host), pass --force"
        ),
        other => other?,
    };
    let leaf = summary_of(&files.chain)?;
    let mut out = format!(
        "rotated the certificate of gateway {name} in cluster {cluster} (was serial {})\n",
        old.serial
    );
    describe_new(&mut out, &leaf, days);
    let _ = writeln!(out, "  chain:        {}", files.chain.display());
    describe_key(&mut out, &files.key)?;
    let _ = writeln!(
        out,
        "  the old certificate stays valid until it expires. The running gateway renews \
         its WireGuard peers' channels under the new one (ESP peers' at their next \
         reconnect): revoke the old one (isthmusctl certs revoke --dir {} --cluster \
         {cluster} --serial {}) only when no peer's `isthmusctl status` shows it as \
         peer_serial any more, or those peers are cut at once",
        dir.display(),
        old.serial
    );
    Ok(out)
}

/// Why `leaf` counts as revoked by a cluster's revocation records: its serial is listed,
/// or a certificate of its identity was revoked after it was issued (an older
/// certificate put back in place of a revoked one does not count as new).
fn revoked_in(
    state: &RevocationState,
    serials: &[Serial],
    leaf: &CertificateSummary,
) -> Option<String> {
    if serials.contains(&leaf.serial) {
        return Some(format!("serial {} is revoked", leaf.serial));
    }
    let id = leaf.spiffe_id.as_ref()?.to_string();
    // not_before is set back by the clock skew allowance from when it was issued.
    let issued = rfc3339(leaf.not_before + isthmus_certs::ca::CLOCK_SKEW_ALLOWANCE);
    state
        .revoked
        .iter()
        .filter(|e| e.spiffe_id.as_deref() == Some(id.as_str()))
        .map(|e| e.revoked_at.as_str())
        // Whole seconds: issued in the second of a revocation counts as before it.
        .find(|at| issued.as_str() <= *at)
        .map(|at| format!("a certificate of {id} was revoked at {at}, after this one was issued"))
}

/// One command at a time changes a CA directory (released when the file is dropped).
fn lock_dir(store: &CaDirectory) -> anyhow::Result<File> {
    File::open(store.path())
        .and_then(|f| f.lock().map(|()| f))
        .with_context(|| format!("locking {}", store.path().display()))
}

fn rotate_cluster_ca(dir: &Path, cluster: &str, days: u32) -> anyhow::Result<String> {
    let cluster = parse_cluster(cluster)?;
    let store = open_dir(dir)?;
    let _lock = lock_dir(&store)?;
    if !store.cluster_cert_path(&cluster).is_file() {
        bail!(
            "unknown cluster \"{cluster}\": no cluster CA in {} to rotate (issue one with \
             `isthmusctl certs issue --dir {} cluster --cluster {cluster}`)",
            dir.display(),
            dir.display()
        );
    }
    // A revoked gateway must not come back with a new certificate.
    let (_, _, state_path) = crl_files(&store, Some(&cluster));
    let state = load_state(&state_path)?;
    let serials = state_serials(&state, &state_path)?;
    let skip = |leaf: &CertificateSummary| revoked_in(&state, &serials, leaf);
    let rotation = store.rotate_cluster_ca(&cluster, validity_days(days), &skip)?;
    let mut out = format!(
        "rotated the CA of cluster {cluster} (was serial {}, {})\n",
        rotation.old.serial, rotation.old.subject
    );
    describe_new(&mut out, &rotation.new, days);
    let cert = store.cluster_cert_path(&cluster);
    let _ = writeln!(out, "  certificate:  {}", cert.display());
    describe_key(&mut out, &cert.with_file_name("ca.key"))?;
    let _ = writeln!(
        out,
        "  previous CA:  kept in {} (its certificates stay valid until they expire or it \
         is revoked; it signs the cluster's CRL next to the new CA)",
        cert.with_file_name("previous").display()
    );
    if rotation.reissued.is_empty() {
        out.push_str("  re-issued:    no certificates on file for this cluster\n");
    }
    for (kind, name, files, serial) in &rotation.reissued {
        let what = match kind {
            LeafKind::Gateway => "gateway",
            LeafKind::Admin => "administrator",
        };
        let _ = writeln!(
            out,
            "  re-issued:    {what} {name}, serial {serial} ({})",
            files.chain.display()
        );
    }
    for (kind, name, files, why) in &rotation.skipped {
        let what = match kind {
            LeafKind::Gateway => "gateway",
            LeafKind::Admin => "administrator",
        };
        let _ = writeln!(
            out,
            "  not re-issued: {what} {name} ({why}; {} left as it is)",
            files.chain.display()
        );
    }
    if let Some(crls) = reissue_crls(&store, Some(&cluster))? {
        let _ = writeln!(out, "{crls}");
    }
    let _ = writeln!(
        out,
        "  running gateways pick up their new certificates without a restart; once none \
         uses the old CA's any more, revoke it: isthmusctl certs revoke --dir {} --serial {}",
        dir.display(),
        rotation.old.serial
    );
    Ok(out)
}

fn rotate_root(dir: &Path, days: u32) -> anyhow::Result<String> {
    let store = open_dir(dir)?;
    let _lock = lock_dir(&store)?;
    let rotation = store.rotate_root(validity_days(days))?;
    let mut out = format!(
        "rotated the mesh root CA (was serial {}, {})\n",
        rotation.old.serial, rotation.old.subject
    );
    describe_new(&mut out, &rotation.new, days);
    let _ = writeln!(out, "  certificate:  {}", store.root_cert_path().display());
    describe_key(&mut out, &dir.join("root-ca.key"))?;
    let _ = writeln!(
        out,
        "  trust bundle: {} ({} roots: the previous one is kept until retired)",
        store.bundle_path().display(),
        rotation.bundle_roots
    );
    if let Some(crls) = reissue_crls(&store, None)? {
        let _ = writeln!(out, "{crls}");
    }
    let clusters: Vec<String> = store.clusters()?.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "  next: 1. give the new bundle to every gateway (they reload it without a restart);\n\
         \x20       2. rotate each cluster CA under the new root: isthmusctl certs rotate --dir {} \
         --ca --cluster C (clusters: {});\n\
         \x20       3. retire the previous root: isthmusctl certs retire-root --dir {}",
        dir.display(),
        if clusters.is_empty() {
            "none yet".to_owned()
        } else {
            clusters.join(", ")
        },
        dir.display()
    );
    Ok(out)
}

fn retire_root(dir: &Path) -> anyhow::Result<String> {
    let store = open_dir(dir)?;
    let _lock = lock_dir(&store)?;
    let retired = store.retire_previous_roots()?;
    let mut out = String::new();
    for root in &retired {
        let _ = writeln!(
            out,
            "retired the previous root CA serial {} ({})",
            root.serial, root.subject
        );
    }
    let _ = writeln!(
        out,
        "  trust bundle: {} ({} root{})",
        store.bundle_path().display(),
        store.bundle()?.roots().len(),
        if store.bundle()?.roots().len() == 1 {
            ""
        } else {
            "s"
        }
    );
    let mut levels = vec![None];
    levels.extend(store.clusters()?.into_iter().map(Some));
    for level in &levels {
        if let Some(crls) = reissue_crls(&store, level.as_ref())? {
            let _ = writeln!(out, "{crls}");
        }
    }
    out.push_str(
        "  give the new bundle to every gateway: a peer still presenting a certificate under \
         a retired root is cut when its gateway reloads it\n",
    );
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// show

#[derive(Serialize)]
struct ShowJson<'a> {
    file: String,
    certificates: Vec<CertJson<'a>>,
}

#[derive(Serialize)]
struct CertJson<'a> {
    kind: &'a str,
    subject: &'a str,
    issuer: &'a str,
    spiffe_id: Option<String>,
    is_ca: bool,
    not_before: String,
    not_after: String,
    valid_now: bool,
    status: &'a str,
    serial: String,
    sha256_fingerprint: String,
}

/// Whether a PEM text has a private key block (`PRIVATE KEY`, `EC PRIVATE KEY`,
/// `RSA PRIVATE KEY`, `ENCRYPTED PRIVATE KEY`, ...).
fn has_private_key(bytes: &[u8]) -> bool {
    const MARK: &[u8] = b"PRIVATE KEY-----";
    bytes.windows(MARK.len()).any(|w| w == MARK)
}

fn has_certificate(bytes: &[u8]) -> bool {
    const MARK: &[u8] = b"-----BEGIN CERTIFICATE-----";
    bytes.windows(MARK.len()).any(|w| w == MARK)
}

/// Largest file `show` reads (a PEM bundle of many certificates is far smaller).
const MAX_SHOW_BYTES: u64 = 4 << 20;

fn read_limited(file: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    use std::io::Read as _;
    let what = || file.display().to_string();
    let f = File::open(file).with_context(what)?;
    if !f.metadata().with_context(what)?.is_file() {
        bail!("{}: not a regular file", file.display());
    }
    let mut bytes = Zeroizing::new(Vec::new());
    f.take(MAX_SHOW_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(what)?;
    if bytes.len() as u64 > MAX_SHOW_BYTES {
        bail!(
            "{}: larger than {} MiB; not a certificate file",
            file.display(),
            MAX_SHOW_BYTES >> 20
        );
    }
    Ok(bytes)
}

fn show(file: &Path, output: ShowOutput) -> anyhow::Result<String> {
    // The contents may be a key: keep them out of every message and wipe them after.
    let bytes = read_limited(file)?;
    if has_private_key(&bytes) {
        if has_certificate(&bytes) {
            bail!(
                "{}: this file holds a private key besides certificates; isthmusctl never \
                 prints key material (show a file with the certificates only)",
                file.display()
            );
        }
        bail!(
            "{}: this is a private key; isthmusctl never prints key material",
            file.display()
        );
    }
    let Ok(text) = std::str::from_utf8(&bytes) else {
        bail!(
            "{}: not a PEM file (binary data; DER is not supported)",
            file.display()
        );
    };
    let summaries = CertificateSummary::from_pem(text, &file.display().to_string())?;
    let now = SystemTime::now();
    let total = summaries.len();
    match output {
        ShowOutput::Text => {
            let mut out = String::new();
            for (i, s) in summaries.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                let _ = writeln!(out, "certificate {} of {total}: {}", i + 1, kind(s));
                let _ = writeln!(out, "{s}");
                let _ = writeln!(
                    out,
                    "valid now:   {}",
                    match status(s, now) {
                        "valid" => "yes",
                        "expired" => "no (expired)",
                        _ => "no (not yet valid)",
                    }
                );
            }
            Ok(out)
        }
        ShowOutput::Json => {
            let doc = ShowJson {
                file: file.display().to_string(),
                certificates: summaries
                    .iter()
                    .map(|s| CertJson {
                        kind: kind(s),
                        subject: &s.subject,
                        issuer: &s.issuer,
                        spiffe_id: s.spiffe_id.as_ref().map(ToString::to_string),
                        is_ca: s.is_ca,
                        not_before: rfc3339(s.not_before),
                        not_after: rfc3339(s.not_after),
                        valid_now: s.is_valid_at(now),
                        status: status(s, now),
                        serial: s.serial.to_string(),
                        sha256_fingerprint: colon_hex(&s.sha256_fingerprint),
                    })
                    .collect(),
            };
            Ok(serde_json::to_string_pretty(&doc)? + "\n")
        }
    }
}

// ---------------------------------------------------------------------------------------
// revoke

/// The revoked serials and last CRL number of one CA, kept next to its CRL.
#[derive(Serialize, Deserialize, Default, Debug)]
struct RevocationState {
    /// Number of the last CRL written (0: none yet).
    crl_number: u64,
    revoked: Vec<RevokedEntry>,
}

#[derive(Serialize, Deserialize, Debug)]
struct RevokedEntry {
    /// Colon-separated hex, as `certs show` prints it.
    serial: String,
    /// When `isthmusctl certs revoke` added it.
    revoked_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
}

/// Whose certificate a serial is, according to the files in the CA directory.
#[derive(Debug)]
enum Owner {
    Root,
    ClusterCa(ClusterName),
    Gateway(ClusterName, GatewayName),
    Admin(ClusterName, GatewayName),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Root => f.write_str("the mesh root CA"),
            Owner::ClusterCa(c) => write!(f, "the CA of cluster {c}"),
            Owner::Gateway(c, g) => write!(f, "gateway {g} of cluster {c}"),
            Owner::Admin(c, a) => write!(f, "administrator {a} of cluster {c}"),
        }
    }
}

/// Every certificate on file in the CA directory (unreadable files are skipped).
fn inventory(store: &CaDirectory) -> Vec<(Owner, CertificateSummary)> {
    let first = |path: &Path| {
        CertificateSummary::from_file(path)
            .ok()
            .and_then(|v| v.into_iter().next())
    };
    let mut found = Vec::new();
    if let Some(s) = first(&store.root_cert_path()) {
        found.push((Owner::Root, s));
    }
    // One unreadable file hides no other.
    for path in store.previous_ca_files(None).unwrap_or_default() {
        if let Some(s) = first(&path) {
            found.push((Owner::Root, s));
        }
    }
    let Ok(clusters) = fs::read_dir(store.path().join("clusters")) else {
        return found;
    };
    for entry in clusters.flatten() {
        let Some(cluster) = entry
            .file_name()
            .to_str()
            .and_then(|n| ClusterName::new(n).ok())
        else {
            continue;
        };
        if let Some(s) = first(&store.cluster_cert_path(&cluster)) {
            found.push((Owner::ClusterCa(cluster.clone()), s));
        }
        // Cluster CAs rotated out are still revocable (on the root's CRL).
        for path in store.previous_ca_files(Some(&cluster)).unwrap_or_default() {
            if let Some(s) = first(&path) {
                found.push((Owner::ClusterCa(cluster.clone()), s));
            }
        }
        for (kind, name, files) in store.leaves(&cluster).unwrap_or_default() {
            if let Some(s) = first(&files.chain) {
                let owner = match kind {
                    LeafKind::Gateway => Owner::Gateway(cluster.clone(), name),
                    LeafKind::Admin => Owner::Admin(cluster.clone(), name),
                };
                found.push((owner, s));
            }
        }
    }
    found
}

fn load_state(path: &Path) -> anyhow::Result<RevocationState> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid revocation state", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevocationState::default()),
        Err(e) => Err(anyhow!("{}: {e}", path.display())),
    }
}

/// Who signs a level's CRL (for messages), its CRL file and its revocation state file.
fn crl_files(store: &CaDirectory, cluster: Option<&ClusterName>) -> (String, PathBuf, PathBuf) {
    let crl = store.crl_path(cluster);
    let state = crl.with_file_name(match cluster {
        None => "root-ca.revoked.json",
        Some(_) => "ca.revoked.json",
    });
    let who = match cluster {
        None => "the mesh root CA".to_owned(),
        Some(c) => format!("the CA of cluster {c}"),
    };
    (who, crl, state)
}

fn state_serials(state: &RevocationState, path: &Path) -> anyhow::Result<Vec<Serial>> {
    state
        .revoked
        .iter()
        .map(|e| {
            Serial::from_str(&e.serial)
                .map_err(|err| anyhow!("{}: revoked entry: {err}", path.display()))
        })
        .collect()
}

/// After a CA of a level changed (rotated or retired), signs that level's CRL again with
/// every CA it has now, under the next CRL number, if it has one. Returns a line saying
/// so.
fn reissue_crls(
    store: &CaDirectory,
    cluster: Option<&ClusterName>,
) -> anyhow::Result<Option<String>> {
    let (who, crl_path, state_path) = crl_files(store, cluster);
    let mut state = load_state(&state_path)?;
    if state.crl_number == 0 {
        return Ok(None);
    }
    let serials = state_serials(&state, &state_path)?;
    state.crl_number = state
        .crl_number
        .checked_add(1)
        .ok_or_else(|| anyhow!("{}: CRL number overflow", state_path.display()))?;
    let json = serde_json::to_string_pretty(&state)? + "\n";
    isthmus_certs::write_public_file(&state_path, &json)?;
    let written = store.write_crls(cluster, &serials, state.crl_number, validity_days(30))?;
    let signers = written.signed;
    Crl::load_all(&crl_path)?;
    Ok(Some(format!(
        "  crl:          {} re-issued as CRL #{} of {who}, signed by {} (distribute it to \
         every gateway){}",
        crl_path.display(),
        state.crl_number,
        if signers == 1 {
            "its CA".to_owned()
        } else {
            format!("each of its {signers} CAs, the rotated-out ones too")
        },
        crl_warnings(&written)
    )))
}

fn revoke(
    dir: &Path,
    serial: &str,
    cluster: Option<&str>,
    days: u32,
    force: bool,
) -> anyhow::Result<String> {
    let serial = parse_serial(serial)?;
    let cluster = cluster.map(parse_cluster).transpose()?;
    let store = open_dir(dir)?;
    // One revoke at a time per CA directory (released when `_lock` is dropped).
    let _lock = lock_dir(&store)?;

    // Which CA signs the CRL, and where it and its state live.
    if let Some(c) = &cluster {
        if !store.cluster_cert_path(c).is_file() {
            bail!(
                "unknown cluster \"{c}\": no cluster CA in {}",
                store.path().display()
            );
        }
    }
    let (issuer_name, crl_path, state_path) = crl_files(&store, cluster.as_ref());

    // A serial revoked on the wrong CRL is silently useless: check whose it is.
    let known = inventory(&store);
    let owner = known.iter().find(|(_, s)| s.serial == serial);
    match (owner, &cluster) {
        (Some((Owner::Root, _)), _) => bail!(
            "serial {serial} is the mesh root CA itself; a root is not revoked by a CRL, \
             it is rotated out of the trust bundle"
        ),
        (Some((Owner::ClusterCa(_), _)), None) => {}
        (Some((owner @ Owner::ClusterCa(_), _)), Some(_)) => bail!(
            "serial {serial} is {owner}, which the root signed: revoke it on the root's CRL \
             (without --cluster)"
        ),
        (Some((Owner::Gateway(c, _) | Owner::Admin(c, _), _)), Some(wanted)) if c == wanted => {}
        (Some((owner @ (Owner::Gateway(c, _) | Owner::Admin(c, _)), _)), _) => bail!(
            "serial {serial} is {owner}, which the CA of cluster {c} signed: revoke it with \
             --cluster {c}"
        ),
        (None, _) if force => {}
        (None, _) => bail!(
            "no certificate with serial {serial} is on file in {}; check the serial \
             (`isthmusctl certs show FILE`), or pass --force to revoke it anyway",
            store.path().display()
        ),
    }

    let mut state = load_state(&state_path)?;
    if state.crl_number == 0 && crl_path.exists() {
        bail!(
            "{} exists but its revocation state {} is missing; refusing to start a new CRL \
             numbering (restore the state file)",
            crl_path.display(),
            state_path.display()
        );
    }
    let mut serials = state_serials(&state, &state_path)?;
    let already = serials.contains(&serial);
    if !already {
        serials.push(serial.clone());
        let summary = owner.map(|(_, s)| s);
        state.revoked.push(RevokedEntry {
            serial: serial.to_string(),
            revoked_at: rfc3339(SystemTime::now()),
            spiffe_id: summary.and_then(|s| s.spiffe_id.as_ref().map(ToString::to_string)),
            subject: summary.map(|s| s.subject.clone()),
        });
    }
    state.crl_number = state
        .crl_number
        .checked_add(1)
        .ok_or_else(|| anyhow!("{}: CRL number overflow", state_path.display()))?;

    let validity = validity_days(days);
    // State first: if the CRL write then fails, the next revoke uses a higher number.
    let json = serde_json::to_string_pretty(&state)? + "\n";
    isthmus_certs::write_public_file(&state_path, &json)?;
    let written = store.write_crls(cluster.as_ref(), &serials, state.crl_number, validity)?;
    let signers = written.signed;
    // Read back what gateways will load.
    Crl::load_all(&crl_path)?;

    let what = match owner {
        Some((owner, _)) => owner.to_string(),
        None => "not on file".to_owned(),
    };
    let mut out = if already {
        format!("serial {serial} ({what}) was already revoked; CRL re-issued\n")
    } else {
        format!("revoked serial {serial} ({what})\n")
    };
    let _ = writeln!(
        out,
        "  crl:          {} (CRL #{} of {issuer_name}, {} serial{} revoked, next update {}{})",
        crl_path.display(),
        state.crl_number,
        serials.len(),
        if serials.len() == 1 { "" } else { "s" },
        rfc3339(validity.not_after),
        if signers > 1 {
            format!("; signed by each of its {signers} CAs, the rotated-out ones too")
        } else {
            String::new()
        }
    );
    let _ = writeln!(out, "  state:        {}", state_path.display());
    let warnings = crl_warnings(&written);
    if !warnings.is_empty() {
        let _ = writeln!(out, "{}", warnings.trim_start_matches('\n'));
    }
    out.push_str("  distribute the CRL to every gateway\n");
    Ok(out)
}

/// Lines on what a CRL write could not sign anew.
fn crl_warnings(written: &isthmus_certs::CrlsWritten) -> String {
    let mut out = String::new();
    for issuer in &written.carried_over {
        let _ = write!(
            out,
            "\n  warning:      the key of archived CA {issuer} does not load: its last CRL is \
             kept as it was and lapses at its next update (put the key back to sign it anew)"
        );
    }
    for path in &written.unreadable {
        let _ = write!(
            out,
            "\n  warning:      {} does not parse: that CA signs no CRL",
            path.display()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        let at = |secs: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
        assert_eq!(at(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1969-12-31T23:59:59Z"
        );
    }

    #[test]
    fn private_key_blocks_are_detected() {
        for label in [
            "PRIVATE KEY",
            "EC PRIVATE KEY",
            "RSA PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
        ] {
            let pem = format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
            assert!(has_private_key(pem.as_bytes()), "{label}");
        }
        assert!(!has_private_key(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        ));
    }
}
