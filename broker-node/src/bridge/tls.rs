//! The TLS client configuration of a bridge: the CA to trust (or the system's roots)
//! and an optional client certificate. The name the remote's certificate must carry
//! is the one the client sends as SNI (`remote.rs`).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore};

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
    let builder = builder.with_webpki_verifier(webpki);
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(k)) => builder
            .with_client_auth_cert(certs(cert).map_err(tls_error)?, key(k).map_err(tls_error)?)
            .map_err(tls_error)?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(tls))
}
