//! The TLS client configuration of a bridge: the CA to trust (or the system's roots),
//! an optional client certificate, and the name the remote's certificate must carry.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::BridgeConfig;
use crate::transport::tls::{certs, key};

use super::BridgeError;

fn tls_error(e: impl std::fmt::Display) -> BridgeError {
    BridgeError::Config(format!("TLS: {e:#}"))
}

/// The rustls client configuration of `config`.
pub fn client_config(config: &BridgeConfig) -> Result<Arc<ClientConfig>, BridgeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &config.tls_ca_file {
        Some(path) => {
            for cert in certs(path).map_err(tls_error)? {
                roots.add(cert).map_err(tls_error)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(tls_error(
                    "no system root certificates found; set tls_ca_file",
                ));
            }
        }
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(tls_error)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(tls_error)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedVerifier { webpki, name }))
        }
        None => builder.with_webpki_verifier(webpki),
    };
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(k)) => builder
            .with_client_auth_cert(certs(cert).map_err(tls_error)?, key(k).map_err(tls_error)?)
            .map_err(tls_error)?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(tls))
}

/// Full WebPKI verification, against the configured name instead of the address's
/// host (`tls_server_name`: a remote reached by IP address or through a tunnel).
#[derive(Debug)]
struct NamedVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
