//! `broker-node cluster-certs`: a private CA for one cluster and a node certificate it
//! signs, the files that `cluster.tls_cert_file`, `cluster.tls_key_file` and
//! `cluster.tls_ca_file` name. Meant for clusters without a PKI of their own (the
//! docker-compose file runs it as an init step); with one, issue the certificates
//! there.
//!
//! One certificate serves every node: it holds every node's host name (or IP
//! address, or a wildcard such as `*.flockmq-headless.mqtt.svc.cluster.local`) and is
//! good for TLS servers and clients alike, as nodes are both. It never overwrites:
//! a directory that already holds a CA keeps it, so running it again (each
//! `docker-compose up`) changes nothing. It only writes files.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The files written in the directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key, kept beside it to issue more certificates later.
pub const CA_KEY: &str = "ca.key";
/// The node certificate.
pub const NODE_CERT: &str = "node.pem";
/// The node certificate's private key.
pub const NODE_KEY: &str = "node.key";

/// What [`make`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Made {
    /// A new CA and node certificate were written.
    Created,
    /// The directory already held them; nothing was written.
    Kept,
}

/// Write a new CA and a node certificate for `hosts` into `dir` (created if missing),
/// both valid for `valid_for` from now, unless `dir` already holds them.
pub fn make(dir: &Path, hosts: &[String], valid_for: Duration) -> anyhow::Result<Made> {
    let all = [CA_CERT, CA_KEY, NODE_CERT, NODE_KEY];
    let present: Vec<&str> = all
        .iter()
        .copied()
        .filter(|f| dir.join(f).exists())
        .collect();
    if present.len() == all.len() {
        return Ok(Made::Kept);
    }
    if !present.is_empty() {
        bail!(
            "{} holds {} but not all of {}: remove them to make a new CA",
            dir.display(),
            present.join(", "),
            all.join(", ")
        );
    }
    if hosts.is_empty() {
        bail!("name at least one host the nodes are reached at (--host)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let not_after = not_before
        + time::Duration::try_from(valid_for).context("validity too long")?
        + time::Duration::hours(1);

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "FlockMQ cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut node = CertificateParams::new(hosts.to_vec())
        .context("a host is neither a DNS name nor an IP address")?;
    node.distinguished_name
        .push(DnType::CommonName, "flockmq-node");
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    node.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    node.not_before = not_before;
    node.not_after = not_after;
    let node_key = KeyPair::generate()?;
    let ca_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    let node_cert = node.signed_by(&node_key, &issuer)?;

    write(dir, CA_KEY, &ca_pem, 0o600)?;
    write(dir, NODE_KEY, &node_key.serialize_pem(), 0o600)?;
    write(dir, NODE_CERT, &node_cert.pem(), 0o644)?;
    // The CA certificate last: its presence is what makes a later run keep the rest.
    write(dir, CA_CERT, &ca_cert.pem(), 0o644)?;
    Ok(Made::Created)
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier;

    use super::*;

    #[test]
    fn makes_a_ca_and_a_node_certificate_once_and_then_keeps_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        let hosts = vec!["node1".to_owned(), "127.0.0.1".to_owned()];
        let year = Duration::from_secs(365 * 86_400);
        assert_eq!(make(&certs, &hosts, year).expect("made"), Made::Created);
        let read = |name| std::fs::read_to_string(certs.join(name)).expect("file");
        let (ca, node) = (read(CA_CERT), read(NODE_CERT));
        assert_eq!(make(&certs, &hosts, year).expect("kept"), Made::Kept);
        assert_eq!(read(CA_CERT), ca, "a second run must not replace the CA");

        let der = |pem: &str| {
            rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .expect("one certificate")
                .expect("PEM")
        };
        let (ca_der, node_der) = (der(&ca), der(&node));
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).expect("CA parses");
        assert!(ca_x509.is_ca());
        let (_, node_x509) = x509_parser::parse_x509_certificate(&node_der).expect("node parses");
        assert_eq!(node_x509.issuer(), ca_x509.subject());
        // rustls, as the nodes use it, accepts it for both names under that CA.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone()).expect("CA as a root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        for host in ["node1", "127.0.0.1"] {
            let name = rustls::pki_types::ServerName::try_from(host).expect("name");
            verifier
                .verify_server_cert(
                    &node_der,
                    &[],
                    &name,
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{host}: {e}"));
        }
        let eku = node_x509
            .extended_key_usage()
            .expect("EKU parses")
            .expect("EKU present")
            .value;
        assert!(eku.server_auth && eku.client_auth, "{eku:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(certs.join(NODE_KEY))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key must not be readable by others");
        }
    }

    #[test]
    fn a_directory_with_part_of_the_files_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(CA_CERT), "x").expect("write");
        let e = make(dir.path(), &["node1".into()], Duration::from_secs(86_400)).unwrap_err();
        assert!(e.to_string().contains("remove them"), "{e}");
    }
}
