//! Certificates: a self-signed server certificate for `bulwark init`, and the cluster's own CA
//! and node certificates (`bulwark certs ca|issue`). Private keys are written with mode 0600
//! from the moment the file exists, and never overwritten.

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

/// Validity of cluster certificates. Rotation is by reissuing (docs/cluster.md); a long life
/// keeps an appliance that was switched off for months from failing closed on its return.
const CLUSTER_CERT_DAYS: i64 = 825;
const CLUSTER_CA_DAYS: i64 = 3650;

fn validity(params: &mut rcgen::CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that differ between nodes.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// `bulwark certs ca --dir DIR`: a new cluster CA (`ca.pem`, `ca.key` 0600). It is meant only
/// for node certificates, never for the API.
pub fn make_cluster_ca(dir: &Path) -> Result<()> {
    use rcgen::{BasicConstraints, DnType, IsCa, KeyUsagePurpose};
    create_private_dir(dir)?;
    let key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    // A name of its own per CA: a certificate from another cluster's CA is then refused as
    // from an unknown issuer, which is what it is, not as a bad signature.
    let mut id = [0u8; 6];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("random CA id: {e}"))?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Bulwark cluster CA {}", hex::encode(id)),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CLUSTER_CA_DAYS);
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
    write_new(&dir.join("ca.pem"), cert.pem().as_bytes())
}

/// `bulwark certs issue`: a node certificate signed by the cluster CA in `ca_dir`, carrying
/// `name` as its DNS name and every address as an IP name, for server and client use.
pub fn issue_node_cert(ca_dir: &Path, name: &str, ips: &[IpAddr], out: &Path) -> Result<()> {
    use rcgen::{DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
    crate::cluster::config::validate_name(name).context("--name")?;
    let ca_key_path = ca_dir.join("ca.key");
    crate::keys::check_private_mode(&ca_key_path, "cluster CA key")?;
    let ca_key =
        rcgen::KeyPair::from_pem(&crate::files::read_small(&ca_key_path, "cluster CA key")?)
            .with_context(|| format!("parsing {}", ca_key_path.display()))?;
    let ca_pem = crate::files::read_small(&ca_dir.join("ca.pem"), "cluster CA certificate")?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("parsing {}", ca_dir.join("ca.pem").display()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = std::iter::once(Ok(SanType::DnsName(name.try_into()?)))
        .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
        .collect::<Result<Vec<_>>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, CLUSTER_CERT_DAYS);
    let key = rcgen::KeyPair::generate().context("generating the node key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the node certificate")?;
    create_private_dir(out)?;
    write_private(&out.join("key.pem"), key.serialize_pem().as_bytes())?;
    // The chain a node presents: its own certificate (the CA is configured on every node).
    write_new(&out.join("cert.pem"), cert.pem().as_bytes())
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Create `path` (mode 0644) and write `data`; refuses to overwrite.
fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
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
