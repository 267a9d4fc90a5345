//! Reading and writing PEM files, with private keys kept private.
//!
//! - Private keys are written with mode 0600: either to a new file (`O_CREAT|O_EXCL`, never
//!   overwriting) or by atomic replacement (a fresh 0600 temporary file renamed over the
//!   old one). The mode is set when the file is created, so the key is never readable by
//!   others, not even briefly.
//! - Reading a private key refuses a file whose group or other permission bits are set,
//!   naming the path and the mode. The check is made on the opened file.
//! - Certificates, bundles and CRLs are public and written 0644, atomically.
//!
//! Errors never quote file contents (a malformed key file could be printed otherwise).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use isthmus_identity::LocalCredentials;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use zeroize::Zeroizing;

use crate::error::CertError;

/// Mode of private key files.
pub const PRIVATE_KEY_MODE: u32 = 0o600;
/// Mode of certificate, bundle and CRL files.
pub const PUBLIC_FILE_MODE: u32 = 0o644;

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::KeyExists {
                    path: path.to_owned(),
                }
            } else {
                CertError::io(path, e)
            }
        })?;
    // The umask can only remove bits; make the mode exact anyway.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| CertError::io(path, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| CertError::io(path, e))
}

fn temp_path(path: &Path) -> Result<PathBuf, CertError> {
    use ring::rand::SecureRandom;
    let mut nonce = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| CertError::Random)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(".{name}.{}.tmp", hex::encode(nonce))))
}

fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = temp_path(path)?;
    write_new(&tmp, contents, mode).map_err(|e| match e {
        CertError::KeyExists { path } => CertError::AlreadyExists { path },
        other => {
            // A half-written copy of a key must not stay behind.
            let _ = fs::remove_file(&tmp);
            other
        }
    })?;
    // A replaced file keeps its owner: the process that reads it (a gateway
    // running as its own user) must still be able to.
    if let Ok(old) = fs::metadata(path) {
        use std::os::unix::fs::MetadataExt as _;
        let new = fs::metadata(&tmp).map_err(|e| CertError::io(&tmp, e))?;
        if (old.uid(), old.gid()) != (new.uid(), new.gid()) {
            if let Err(e) = std::os::unix::fs::chown(&tmp, Some(old.uid()), Some(old.gid())) {
                let _ = fs::remove_file(&tmp);
                return Err(CertError::io(path, e));
            }
        }
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        CertError::io(path, e)
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Writes a private key PEM to a new file with mode 0600; fails with
/// [`CertError::KeyExists`] if the file exists.
pub fn write_private_key(path: &Path, pem: &str) -> Result<(), CertError> {
    write_new(path, pem.as_bytes(), PRIVATE_KEY_MODE)
}

/// Atomically replaces (or creates) a private key file, mode 0600.
pub fn replace_private_key(path: &Path, pem: &str) -> Result<(), CertError> {
    replace(path, pem.as_bytes(), PRIVATE_KEY_MODE)
}

/// Atomically replaces (or creates) a public file (certificate, bundle, CRL), mode 0644.
pub fn write_public_file(path: &Path, contents: &str) -> Result<(), CertError> {
    replace(path, contents.as_bytes(), PUBLIC_FILE_MODE)
}

/// Largest secret file read (keys and SA files are a few hundred bytes).
pub const MAX_SECRET_FILE: u64 = 1 << 20;
/// Largest public file read (a trust bundle or a CRL with many entries).
pub const MAX_PUBLIC_FILE: u64 = 64 << 20;

/// Opens `path` once, non-blocking (a FIFO cannot stall the caller), and checks on
/// that open file that it is a regular file of at most `limit` bytes.
fn open_regular(path: &Path, limit: u64) -> Result<(File, fs::Metadata), CertError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| CertError::io(path, e))?;
    let meta = file.metadata().map_err(|e| CertError::io(path, e))?;
    if !meta.is_file() {
        return Err(CertError::NotAFile {
            path: path.to_owned(),
        });
    }
    if meta.len() > limit {
        return Err(CertError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok((file, meta))
}

/// Reads a file that holds no secret (certificates, bundles, CRLs): a regular file,
/// opened without blocking, at most [`MAX_PUBLIC_FILE`] bytes.
pub fn read_public_file(path: &Path) -> Result<Vec<u8>, CertError> {
    let (file, meta) = open_regular(path, MAX_PUBLIC_FILE)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_PUBLIC_FILE)
        .read_to_end(&mut bytes)
        .map_err(|e| CertError::io(path, e))?;
    Ok(bytes)
}

/// This process's effective uid, from `/proc/self/status` (`Uid:` real, effective,
/// saved, filesystem). Not the owner of `/proc/self`, which is root for a process
/// that is not dumpable (e.g. one given file capabilities).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Reads a file holding secrets (a private key, an SA file, a WireGuard key):
/// the file is opened once and its type, size, owner and mode are checked on that
/// open file, so what is read is exactly what was checked (no check-then-open
/// race). Refuses anything but a regular file (opened non-blocking, so a FIFO
/// cannot stall the caller), a file owned by another user than this one or root,
/// and a file its group or others may access.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, CertError> {
    use std::os::unix::fs::MetadataExt as _;
    let (file, meta) = open_regular(path, MAX_SECRET_FILE)?;
    // This process's effective uid; if it cannot be learnt, only root's files are
    // accepted.
    let me = effective_uid();
    if meta.uid() != 0 && Some(meta.uid()) != me {
        return Err(CertError::KeyFileOwner {
            path: path.to_owned(),
            owner: meta.uid(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CertError::KeyFileTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.take(MAX_SECRET_FILE)
        .read_to_end(&mut bytes)
        .map_err(|e| CertError::io(path, e))?;
    Ok(bytes)
}

/// Reads a private key file after checking that only its owner may access it.
pub fn read_private_key_pem(path: &Path) -> Result<Zeroizing<String>, CertError> {
    let bytes = read_secret_file(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| CertError::BadPem {
        what: path.display().to_string(),
    })?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1) without echoing its text in errors.
pub fn parse_private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NothingFound {
            path: PathBuf::from(what),
            what: "private key",
        },
        _ => CertError::BadPem {
            what: what.to_owned(),
        },
    })
}

/// Loads a private key file (permission-checked, see [`read_private_key_pem`]).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read_private_key_pem(path)?;
    parse_private_key(&pem, &path.display().to_string())
}

fn read_public(path: &Path) -> Result<String, CertError> {
    String::from_utf8(read_public_file(path)?).map_err(|_| CertError::BadPem {
        what: path.display().to_string(),
    })
}

/// Parses every `CERTIFICATE` block of a PEM text, in order.
pub fn parse_certificates(
    pem: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CertError::BadPem {
            what: what.to_owned(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NothingFound {
            path: PathBuf::from(what),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Loads every certificate of a PEM file (e.g. a leaf followed by its intermediate).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    parse_certificates(&read_public(path)?, &path.display().to_string())
}

/// Parses every `X509 CRL` block of a PEM text.
pub fn parse_crls(
    pem: &str,
    what: &str,
) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CertError::BadPem {
            what: what.to_owned(),
        })?;
    if crls.is_empty() {
        return Err(CertError::NothingFound {
            path: PathBuf::from(what),
            what: "CRL",
        });
    }
    Ok(crls)
}

/// Loads every CRL of a PEM file.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    parse_crls(&read_public(path)?, &path.display().to_string())
}

/// Loads every CRL of every `*.crl.pem` file in `dir` (in name order): the CRLs of a
/// trust directory such as the `isthmus-trust` Secret that `isthmusctl certs secrets`
/// writes (the root's and each cluster CA's). A directory without such files has none.
pub fn load_crl_dir(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| CertError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".crl.pem") && !n.starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut crls = Vec::new();
    for path in paths {
        crls.extend(load_crls(&path)?);
    }
    Ok(crls)
}

/// Loads a gateway's certificate chain and (permission-checked) private key.
pub fn load_credentials(chain: &Path, key: &Path) -> Result<LocalCredentials, CertError> {
    Ok(LocalCredentials {
        chain: load_certificates(chain)?,
        key: load_private_key(key)?,
    })
}

/// PEM-encodes DER blocks under one tag.
pub(crate) fn encode_pem(tag: &str, ders: &[&[u8]]) -> String {
    ders.iter()
        .map(|der| pem::encode(&pem::Pem::new(tag, der.to_vec())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "isthmus-certs-{name}-{}-{}",
            std::process::id(),
            hex::encode(rand_bytes())
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn rand_bytes() -> [u8; 4] {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 4];
        ring::rand::SystemRandom::new().fill(&mut b).unwrap();
        b
    }

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";

    #[test]
    fn keys_are_written_0600_and_never_overwritten() {
        let dir = temp_dir("write");
        let path = dir.join("k.pem");
        write_private_key(&path, KEY).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            write_private_key(&path, KEY),
            Err(CertError::KeyExists { .. })
        ));
        replace_private_key(&path, KEY).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(&*read_private_key_pem(&path).unwrap(), KEY);
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn open_key_files_are_refused_naming_path_and_mode() {
        let dir = temp_dir("mode");
        let path = dir.join("k.pem");
        write_private_key(&path, KEY).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_private_key_pem(&path).unwrap_err();
            assert!(
                matches!(err, CertError::KeyFileTooOpen { mode: m, .. } if m == mode),
                "{err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(matches!(
                load_private_key(&path),
                Err(CertError::KeyFileTooOpen { .. })
            ));
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_private_key_pem(&path).is_ok());
        fs::remove_dir_all(dir).unwrap();
    }

    /// Found by review: a 0600 key owned by another user (who could have written
    /// it) was accepted; so were FIFOs and files of any size.
    #[test]
    fn secret_files_of_another_user_fifos_and_huge_files_are_refused() {
        let dir = temp_dir("owner");
        let path = dir.join("k.pem");
        write_private_key(&path, KEY).unwrap();
        if effective_uid() == Some(0) {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let err = read_private_key_pem(&path).unwrap_err();
            assert!(
                matches!(err, CertError::KeyFileOwner { owner: 65534, .. }),
                "{err}"
            );
            std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        }
        assert!(read_private_key_pem(&path).is_ok());
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        assert!(matches!(
            read_secret_file(&fifo),
            Err(CertError::NotAFile { .. })
        ));
        assert!(matches!(
            read_public_file(&fifo),
            Err(CertError::NotAFile { .. })
        ));
        let big = dir.join("big");
        fs::File::create(&big)
            .unwrap()
            .set_len(MAX_SECRET_FILE + 1)
            .unwrap();
        fs::set_permissions(&big, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_secret_file(&big),
            Err(CertError::TooLarge { .. })
        ));
        fs::remove_dir_all(dir).unwrap();
    }

    /// Found by review: a key replaced by root (`isthmusctl certs rotate`) became
    /// root's, and a gateway running as its own user could no longer read it.
    #[test]
    fn a_replaced_key_keeps_its_owner() {
        use std::os::unix::fs::MetadataExt as _;
        if effective_uid() != Some(0) {
            return;
        }
        let dir = temp_dir("keep-owner");
        let path = dir.join("k.pem");
        write_private_key(&path, KEY).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        replace_private_key(&path, KEY).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pem_errors_do_not_echo_contents() {
        let secret_line = "c2VjcmV0LWtleS1tYXRlcmlhbC10aGF0LW11c3Qtbm90LWxlYWs=";
        let bad = format!("-----BEGIN PRIVATE KEY-----\n{secret_line}\n");
        let err = parse_private_key(&bad, "test.key").unwrap_err();
        assert!(!err.to_string().contains(secret_line), "{err}");
        let err = parse_certificates(&bad, "test.pem").unwrap_err();
        assert!(!err.to_string().contains(secret_line), "{err}");
    }
}
