//! The job's identity (one self-signed certificate every worker serves) and the join ticket that
//! carries the address, the admission token and the certificate's fingerprint to the workers.
//!
//! Workers pin the certificate by its SHA-256 instead of trusting a CA: the job makes its own
//! certificate at start, and the ticket (a file readable only by its owner) is the one channel
//! through which the fingerprint and the token travel.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The name in the job certificate (its subject alternative name) and the server name clients ask
/// for. It names no host: the certificate is pinned by its fingerprint, not checked against a name.
pub const SERVER_NAME: &str = "semoe-job";

/// The first line of a join ticket file: names the format and its version.
pub const TICKET_HEADER: &str = "semoe-join-ticket v1";

/// The job's TLS identity: a self-signed certificate and its private key, both DER.
#[derive(Clone)]
pub struct JobIdentity {
    /// The certificate (DER).
    pub cert_der: Vec<u8>,
    /// The private key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for JobIdentity {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobIdentity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl JobIdentity {
    /// A fresh self-signed certificate for [`SERVER_NAME`] with a new key.
    pub fn generate() -> Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| Error::runtime(format!("cannot generate the job certificate: {e}")))?;
        Ok(JobIdentity {
            cert_der: certified.cert.der().to_vec(),
            key_der: certified.signing_key.serialize_der(),
        })
    }

    /// The SHA-256 of the certificate's DER, lowercase hex: what clients pin.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&self.cert_der)
    }
}

/// The first line of a job identity file.
pub const IDENTITY_HEADER: &str = "semoe-job-identity v1";

impl JobIdentity {
    /// Write the certificate and its private key to `path` (mode 0600, atomically): a job identity
    /// made once (`semoe ticket`) that a coordinator restarted elsewhere serves again, so that the
    /// workers' ticket stays valid.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = format!(
            "{IDENTITY_HEADER}\ncert = {}\nkey = {}\n",
            hex(&self.cert_der),
            hex(&self.key_der)
        );
        write_private(path, &text, "the job identity")
    }

    /// Read a job identity written by [`JobIdentity::write`]; refuses a file others may read.
    pub fn read(path: &Path) -> Result<Self> {
        let what = format!("job identity {}", path.display());
        let meta = std::fs::metadata(path).map_err(|e| Error::io("read the job identity", path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::config(format!(
                "{what} may be read by others (mode {:o}); it holds the job's private key: chmod 600 it",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = crate::storage::text_file::read(path, "the job identity")?;
        let mut lines = text.lines();
        if lines.next() != Some(IDENTITY_HEADER) {
            return Err(Error::parse(
                &what,
                format!("the first line is not {IDENTITY_HEADER:?}"),
            ));
        }
        let (mut cert, mut key) = (None, None);
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| Error::parse(&what, format!("{line:?} is not `key = value`")))?;
            let bytes = unhex(v.trim()).ok_or_else(|| Error::parse(&what, format!("{} is not hex", k.trim())))?;
            match k.trim() {
                "cert" => cert = Some(bytes),
                "key" => key = Some(bytes),
                other => return Err(Error::parse(&what, format!("unknown field {other:?}"))),
            }
        }
        match (cert, key) {
            (Some(cert_der), Some(key_der)) => Ok(JobIdentity { cert_der, key_der }),
            _ => Err(Error::parse(&what, "it needs both `cert` and `key`")),
        }
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Write `text` to `path`, readable and writable by its owner only (mode 0600): to a temporary
/// file next to it, then renamed, so a reader never sees half of it.
fn write_private(path: &Path, text: &str, what: &str) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::config(format!("the path of {what} ({}) names no file", path.display())))?;
    let mut tmp_name = file_name.to_os_string();
    let nonce: u64 = rand::random();
    tmp_name.push(format!(".tmp.{}.{nonce:016x}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(format!("create {what}"), &tmp, e))?;
    let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_all());
    drop(file);
    let result = written
        .map_err(|e| Error::io(format!("write {what}"), &tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("move {what} into place"), path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths (a token comparison
/// must not tell an attacker how many leading bytes were right).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// What a worker needs to join the job: where to connect, the admission token to present and the
/// fingerprint of the certificate to pin.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTicket {
    /// The address to connect to.
    pub addr: SocketAddr,
    /// The admission token (64 hex digits: 32 random bytes).
    pub token: String,
    /// SHA-256 of the job certificate (64 hex digits).
    pub cert_sha256: String,
}

impl std::fmt::Debug for JoinTicket {
    // Never print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTicket")
            .field("addr", &self.addr)
            .field("cert_sha256", &self.cert_sha256)
            .finish_non_exhaustive()
    }
}

impl JoinTicket {
    /// A ticket for `addr` with a fresh random token and `identity`'s fingerprint.
    pub fn new(addr: SocketAddr, identity: &JobIdentity) -> Self {
        let token: [u8; 32] = rand::random();
        JoinTicket {
            addr,
            token: hex(&token),
            cert_sha256: identity.fingerprint(),
        }
    }

    /// Whether `presented` is this ticket's token (compared in constant time).
    pub fn token_matches(&self, presented: &str) -> bool {
        constant_time_eq(self.token.as_bytes(), presented.as_bytes())
    }

    /// Write the ticket to `path`, readable and writable by its owner only (mode 0600). It is
    /// written to a temporary file next to `path` and renamed, so a reader never sees half a ticket.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = format!(
            "{TICKET_HEADER}\naddr = {}\ntoken = {}\ncert_sha256 = {}\n",
            self.addr, self.token, self.cert_sha256
        );
        write_private(path, &text, "the join ticket")
    }

    /// Read a ticket written by [`JoinTicket::write`]. Refuses a file that its group or others may
    /// read or write (the token admits anyone who holds it), a file of another format, and a
    /// missing, repeated, unknown or malformed field, naming it.
    pub fn read(path: &Path) -> Result<Self> {
        let what = format!("join ticket {}", path.display());
        let meta = std::fs::metadata(path).map_err(|e| Error::io("read the join ticket", path, e))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(Error::config(format!(
                "the join ticket {} has mode {:o}: it holds the job's admission token, so only its \
                 owner may read it (chmod 600 {})",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
        let text = crate::storage::text_file::read(path, "the join ticket")?;
        let mut lines = text.lines();
        match lines.next() {
            Some(first) if first.trim() == TICKET_HEADER => {}
            Some(first) => {
                return Err(Error::parse(
                    what,
                    format!("the first line is {first:?}, not {TICKET_HEADER:?}: not a join ticket"),
                ))
            }
            None => return Err(Error::parse(what, "the file is empty")),
        }
        let (mut addr, mut token, mut cert) = (None, None, None);
        for (n, line) in lines.enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let line_no = n + 2;
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| Error::parse(&what, format!("line {line_no} is not `key = value`")))?;
            let (key, value) = (key.trim(), value.trim());
            let slot = match key {
                "addr" => &mut addr,
                "token" => &mut token,
                "cert_sha256" => &mut cert,
                _ => return Err(Error::parse(&what, format!("unknown field {key:?} on line {line_no}"))),
            };
            if slot.replace(value.to_string()).is_some() {
                return Err(Error::parse(&what, format!("field {key} appears twice")));
            }
        }
        let addr = addr.ok_or_else(|| Error::parse(&what, "field addr is missing"))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| Error::parse(&what, format!("field addr ({addr:?}) is not a socket address: {e}")))?;
        let token = token.ok_or_else(|| Error::parse(&what, "field token is missing"))?;
        check_hex(&what, "token", &token)?;
        let cert_sha256 = cert.ok_or_else(|| Error::parse(&what, "field cert_sha256 is missing"))?;
        check_hex(&what, "cert_sha256", &cert_sha256)?;
        Ok(JoinTicket {
            addr,
            token,
            cert_sha256,
        })
    }
}

/// Check that `value` is 64 lowercase hex digits (32 bytes).
fn check_hex(what: &str, field: &str, value: &str) -> Result<()> {
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(Error::parse(
            what,
            format!(
                "field {field} is not 64 lowercase hex digits ({} characters)",
                value.len()
            ),
        ));
    }
    Ok(())
}
