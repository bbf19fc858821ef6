//! The TLS side of the listeners: the rustls server configuration built from PEM
//! files (certificate chain, private key, and optionally the CAs that client
//! certificates must chain to), swapped on SIGHUP without touching established
//! connections, the identity a client certificate stands for, and the stream of an
//! established TLS connection ([`ServerStream`]), which can be parked.

use std::io::{BufReader, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Bare, ClientStream};

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

/// A client's MQTT byte stream once its TLS handshake is done: the socket and the
/// rustls session above it, boxed (kept out of the connection task's future, and
/// moved as one pointer when the connection parks).
///
/// Unlike `tokio_rustls`'s stream, it can be taken apart into the bare socket and the
/// session and put together again, so that an idle TLS connection parks as a plain one
/// does (see [`ClientStream::into_socket`]), and it tells when a read would find data
/// (rustls holds no plaintext and no complete record: only the socket can bring more),
/// so that an idle connection waits without a read buffer.
pub struct ServerStream<S> {
    io: S,
    tls: Box<ServerConnection>,
}

impl<S> ServerStream<S> {
    /// The stream of a finished handshake (`tokio_rustls`'s, taken apart).
    pub fn new(io: S, tls: ServerConnection) -> Self {
        ServerStream {
            io,
            tls: Box::new(tls),
        }
    }

    /// The stream of a parked connection's socket and session.
    fn from_parts(io: S, tls: Box<ServerConnection>) -> Self {
        ServerStream { io, tls }
    }

    /// The rustls session (the client's certificates, its SNI).
    pub fn session(&self) -> &ServerConnection {
        &self.tls
    }
}

/// `Read` and `Write` over an async stream within one poll: `Pending` is `WouldBlock`
/// (and the waker is registered), as rustls's `read_tls`/`write_tls` expect.
struct Polled<'a, 'b, S> {
    io: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncRead + Unpin> std::io::Read for Polled<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> std::io::Write for Polled<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerStream<S> {
    /// Write out what rustls has to send; `Ready(Ok)` once nothing is left.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.tls.wants_write() {
            let mut io = Polled {
                io: &mut self.io,
                cx,
            };
            match self.tls.write_tls(&mut io) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.tls.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    // 0: the client's close_notify, the end of the stream.
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // The socket closed without a close_notify.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Poll::Ready(Ok(()))
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
            let mut io = Polled {
                io: &mut this.io,
                cx,
            };
            match this.tls.read_tls(&mut io) {
                // End of stream: rustls's reader says so (cleanly or not) next round.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
            if let Err(e) = this.tls.process_new_packets() {
                // Send the alert that says why, if it can go at once.
                let _ = this.poll_send(cx);
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)));
            }
            // Whatever the client's records asked to send (a key update's answer).
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        // Encrypt only as much as there is room for in rustls's send buffer: what does
        // not fit waits for the socket.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        let n = this.tls.writer().write(buf)?;
        if n == 0 && !buf.is_empty() {
            return match this.poll_send(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(this.tls.writer().write(buf)?)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            };
        }
        // Start sending; a full socket is left to the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // Idempotent within rustls: a second call queues nothing.
        this.tls.send_close_notify();
        std::task::ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<S: ClientStream> ClientStream for ServerStream<S> {
    fn read_ready(&self) -> impl std::future::Future<Output = ()> + Send {
        // rustls wants to read only when it holds no plaintext, has seen no
        // close_notify and has nothing to send; and after every read of ours it has
        // processed each complete record: until the socket brings more, a read would
        // find nothing.
        let socket = self.tls.wants_read().then(|| self.io.read_ready());
        async move {
            if let Some(socket) = socket {
                socket.await;
            }
        }
    }

    const PARKABLE: bool = S::PARKABLE;

    fn into_socket(self) -> Result<std::io::Result<Bare>, Self> {
        if self.tls.wants_write() || !self.tls.wants_read() {
            // Bytes still to send, plaintext not yet read or the client's close_notify:
            // not at rest (the socket's readiness would not show them).
            return Err(self);
        }
        let ServerStream { io, tls } = self;
        match io.into_socket() {
            Err(io) => Err(ServerStream { io, tls }),
            Ok(Err(e)) => Ok(Err(e)),
            Ok(Ok(bare)) => Ok(Ok(Bare {
                socket: bare.socket,
                tls: Some(tls),
            })),
        }
    }

    fn from_socket(bare: Bare) -> std::io::Result<Self> {
        let Bare { socket, tls } = bare;
        let tls = tls
            .ok_or_else(|| std::io::Error::other("a parked TLS connection without its session"))?;
        let io = S::from_socket(Bare { socket, tls: None })?;
        Ok(ServerStream::from_parts(io, tls))
    }
}
