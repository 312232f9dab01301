//! HTTPS for the receiver: the rustls settings built from `[server]
//! tls_cert`, `tls_key` and `tls_client_ca`, and the handshake of each
//! accepted connection.
//!
//! Only TLS 1.2 and 1.3 are offered, with rustls' default cipher suites (all
//! with forward secrecy and AEAD), from the same aws-lc-rs provider that
//! reqwest uses. The settings belong to a [`Receiver`](super::Receiver): a
//! reload that changes a certificate file (a renewal) builds a new receiver
//! with new settings, which the connections accepted from then on get, while
//! connections already open keep the session they negotiated. Settings that
//! fail to build (a key that does not match its certificate) fail the reload,
//! so the running certificate stays in use.
//!
//! The handshake runs in the connection's own task, after the accept, with
//! the receiver's read timeout: a client that connects and stays silent holds
//! its connection slot for that long, never the accept loop.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;

use super::errors::ServerError;
use crate::config::ServerTls;

/// The subject of the certificate a client presented (with mTLS), added to
/// each of its connection's requests: `CN=clinic-12, O=Example`.
#[derive(Clone, Debug)]
pub(super) struct ClientCertificate {
    pub(super) subject: String,
}

/// Builds the acceptor for `tls`: the certificate chain and key, and the
/// client CA when client certificates are required.
pub(super) fn acceptor(tls: &ServerTls) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ServerError::Settings(format!("cannot set up TLS: {e}")))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in ca.certificate_ders().map_err(ServerError::Settings)? {
                roots.add(cert).map_err(|e| {
                    ServerError::Settings(format!(
                        "server.tls_client_ca {}: a certificate is not usable as a CA ({e})",
                        ca.path.display()
                    ))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    ServerError::Settings(format!(
                        "server.tls_client_ca {}: {e}",
                        ca.path.display()
                    ))
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = tls.cert.certificate_ders().map_err(ServerError::Settings)?;
    let key = tls.key.private_key_der().map_err(ServerError::Settings)?;
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        ServerError::Settings(format!(
            "server.tls_cert {} and server.tls_key {} do not make a usable certificate ({e}); \
             check that the key belongs to the first certificate of the chain",
            tls.cert.path.display(),
            tls.key.path.display()
        ))
    })?;
    // The receiver speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The subject of a client's certificate, in the form `cert_subject` is
/// written in (`CN=clinic-12, O=Example`); `None` for a certificate that
/// does not parse (the handshake verified it, so this does not happen).
pub(super) fn subject_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.subject().to_string())
}

/// The certificate a TLS connection's client presented, if any.
pub(super) fn client_certificate<S>(
    stream: &tokio_rustls::server::TlsStream<S>,
) -> Option<ClientCertificate> {
    let (_, session) = stream.get_ref();
    let first = session.peer_certificates()?.first()?;
    Some(ClientCertificate {
        subject: subject_of(first)?,
    })
}
