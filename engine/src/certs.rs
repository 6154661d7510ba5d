//! Certificates for first boot and tests: a self-signed server certificate for `bulwark init`.
//! Private keys are written with mode 0600 from the moment the file exists.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Subject alternative names for a listener: its address (loopback and localhost when it
/// listens on every interface) so that clients can verify it by the name they dial.
pub fn names_for_listen(listen: SocketAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    match listen.ip() {
        ip if ip.is_unspecified() => {
            names.push("127.0.0.1".into());
            names.push("::1".into());
        }
        IpAddr::V4(v4) => names.push(v4.to_string()),
        IpAddr::V6(v6) => names.push(v6.to_string()),
    }
    names.dedup();
    names
}

/// Write a self-signed certificate (PEM) and its private key (PEM, 0600).
pub fn write_self_signed(names: Vec<String>, cert_path: &Path, key_path: &Path) -> Result<()> {
    let ck = rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
    write_private(key_path, ck.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(cert_path, ck.cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok(())
}

/// Create `path` with mode 0600 and write `data`; refuses to overwrite.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}
