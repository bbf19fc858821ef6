//! The TLS side of the listeners: the rustls server configuration built from PEM
//! files (certificate chain, private key, and optionally the CAs that client
//! certificates must chain to), swapped on SIGHUP without touching established
//! connections, and the identity a client certificate stands for.

use std::io::BufReader;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{Config, TlsIdentity};

pub(crate) fn certs(path: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot read certificates from {path}"))?;
    anyhow::ensure!(!certs.is_empty(), "{path} holds no PEM certificate");
    Ok(certs)
}

pub(crate) fn key(path: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .with_context(|| format!("cannot read the private key from {path}"))?
        .with_context(|| format!("{path} holds no PEM private key"))
}

/// The server configuration of the MQTT/TLS or secure WebSocket `listener` ("tls",
/// "wss"), or of the HTTPS admin listener ("https": HTTP/1.1, no client certificates,
/// the API has its own credentials), from `config`'s TLS files.
pub fn server_config(config: &Config, listener: &str) -> anyhow::Result<Arc<ServerConfig>> {
    let cert_file = config
        .tls_cert_file
        .as_deref()
        .context("tls_cert_file is not set")?;
    let key_file = config
        .tls_key_file
        .as_deref()
        .context("tls_key_file is not set")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let https = listener == "https";
    let builder = match config.tls_ca_file.as_deref() {
        _ if https => builder.with_no_client_auth(),
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for ca in certs(ca_file)? {
                roots
                    .add(ca)
                    .with_context(|| format!("bad CA certificate in {ca_file}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.tls_require_client_cert.on(listener) {
                verifier.build()
            } else {
                verifier.allow_unauthenticated().build()
            }
            .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(certs(cert_file)?, key(key_file)?)
        .with_context(|| {
            format!("{cert_file} and {key_file} do not make a certificate and its key")
        })?;
    server.alpn_protocols = vec![if https {
        b"http/1.1".to_vec()
    } else {
        b"mqtt".to_vec()
    }];
    Ok(Arc::new(server))
}

/// The TLS server configuration in force: new handshakes take the latest, and a
/// reload leaves established connections on the one they started with.
pub struct TlsSlot {
    listener: &'static str,
    config: RwLock<Arc<ServerConfig>>,
}

impl TlsSlot {
    /// The slot of `listener` ("tls", "wss" or "https"), loaded from `config`'s files.
    pub fn load(config: &Config, listener: &'static str) -> anyhow::Result<Self> {
        Ok(TlsSlot {
            listener,
            config: RwLock::new(server_config(config, listener)?),
        })
    }

    /// An acceptor over the configuration in force.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Read the certificate, key and CA files again; on failure the configuration in
    /// force stays and the error says why.
    pub fn reload(&self, config: &Config) -> anyhow::Result<()> {
        let fresh = server_config(config, self.listener)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

/// The username a verified client certificate stands for under `mode`: the subject's
/// common name, or its first DNS, e-mail or URI subject alternative name. `None`
/// without a certificate, or when it holds no such name.
pub fn identity(certificates: Option<&[CertificateDer<'_>]>, mode: TlsIdentity) -> Option<String> {
    let leaf = certificates?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    match mode {
        TlsIdentity::Off => None,
        TlsIdentity::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        TlsIdentity::San => {
            use x509_parser::extensions::GeneralName;
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::DNSName(n) | GeneralName::RFC822Name(n) | GeneralName::URI(n) => {
                    Some((*n).to_owned())
                }
                _ => None,
            })
        }
    }
}
