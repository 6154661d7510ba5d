//! Every rustls configuration the binary builds, in one place (ring provider throughout):
//! - the API's server (TLS 1.2 and 1.3, ALPN h2 and http/1.1, optional client certificates);
//! - the audit's client (any server, verified against a CA bundle or, on request, not at all);
//! - the cluster's server and client (TLS 1.3 only, client certificates required, one CA, the
//!   cluster's own ALPN), with the peer's identity checked by name once the handshake is done.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::keys::check_private_mode;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let text = crate::files::read_small(path, "certificate file")?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    // A private key that others can read is refused, not merely warned about.
    check_private_mode(path, "TLS private key")?;
    let text = crate::files::read_small(path, "private key")?;
    PrivateKeyDer::from_pem_slice(text.as_bytes())
        .with_context(|| format!("reading the private key in {}", path.display()))
}

pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerConfig> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("adding a CA from {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .context("the TLS certificate and private key do not form a usable pair")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Bundle of trusted CAs used by `bulwark audit` when no `--ca` is given.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The audit's client: verifies the server against `ca` (or the system bundle), or, with
/// `insecure`, accepts any certificate (it still checks the handshake's signatures).
pub fn audit_client_config(ca: Option<&Path>, insecure: bool) -> Result<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(ca.unwrap_or(Path::new(SYSTEM_CA_BUNDLE)))? {
            // A bundle may hold certificates webpki cannot use; the others still count.
            let _ = roots.add(c);
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// ALPN of the cluster protocol; a peer that does not offer it is refused in the handshake.
pub const CLUSTER_ALPN: &[u8] = b"bulwark-cluster/1";

/// A node's cluster identity: the CA, its certificate chain and key, loaded once.
pub struct ClusterIdentity {
    roots: Arc<rustls::RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ClusterIdentity {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(ca)? {
            roots
                .add(c)
                .with_context(|| format!("adding the cluster CA from {}", ca.display()))?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            certs: load_certs(cert)?,
            key: load_key(key)?,
        })
    }

    /// A worker's server side: TLS 1.3 only, a client certificate signed by the cluster CA
    /// required in the handshake (the name is checked afterwards, [`peer_has_name`]).
    pub fn server_config(&self) -> Result<ServerConfig> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .context("building the cluster client verifier")?;
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .context("the cluster certificate and key do not form a usable pair")?;
        cfg.alpn_protocols = vec![CLUSTER_ALPN.to_vec()];
        Ok(cfg)
    }

    /// The head's client side: TLS 1.3 only, the stage verified against the cluster CA by the
    /// name it is dialled with, this node's certificate presented.
    pub fn client_config(&self) -> Result<ClientConfig> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .context("the cluster certificate and key do not form a usable pair")?;
        cfg.alpn_protocols = vec![CLUSTER_ALPN.to_vec()];
        Ok(cfg)
    }
}

/// Whether the end-entity certificate (already verified against the cluster CA by the
/// handshake) is valid for the DNS name `name`.
pub fn peer_has_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&server_name).is_ok()
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
