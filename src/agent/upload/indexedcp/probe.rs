//! Why a receiver hung up: in TLS 1.3 a client finishes its side of the
//! handshake before the receiver has checked the client's certificate, so a
//! receiver that refuses it (none presented, another CA) says so in an alert
//! that may arrive after the HTTP client has already given up on the
//! connection, with nothing but "connection was not ready" or "connection
//! closed". When a request to an `https://` receiver fails that way, one
//! bare handshake with the same client certificate asks again, and reads
//! what the receiver answers.
//!
//! The probe checks nothing about the receiver's certificate: it sends no
//! request and no secret (the client certificate is public, and the proof
//! of its key is bound to this one handshake), and its only result is the
//! reason the receiver gives for refusing us.

use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::AsyncReadExt;

use crate::agent::upload::error::certificate_problem;
use crate::config::TargetTls;

/// How long the whole probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The certificate problem the receiver at `url` reports when this client
/// connects with `tls`'s client certificate (or none), if it reports one.
pub(crate) async fn refusal_reason(url: &str, tls: &TargetTls) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    if url.scheme() != "https" {
        return None;
    }
    let host = url
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = url.port_or_known_default()?;
    let config = client_config(tls)?;
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let probe = async {
        let stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut tls_stream = match connector.connect(name, stream).await {
            Ok(stream) => stream,
            Err(e) => return certificate_problem(&e),
        };
        // The receiver's verdict on our certificate comes as an alert right
        // after the handshake; a receiver that accepted us waits for a
        // request, and the read times out.
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(1), tls_stream.read(&mut byte)).await {
            // Any alert right after the handshake is the receiver's verdict
            // on our certificate (rustls answers one from an unknown CA
            // with "decrypt error", for instance).
            Ok(Err(e)) => certificate_problem(&e).or_else(|| {
                let alert = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .filter(|inner| matches!(inner, rustls::Error::AlertReceived(_)))?;
                Some(format!(
                    "the receiver refused this client's certificate ({alert})"
                ))
            }),
            _ => None,
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .ok()
        .flatten()
}

fn client_config(tls: &TargetTls) -> Option<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(cert.certificate_ders().ok()?, key.private_key_der().ok()?)
            .ok()?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Some(config)
}

/// Accepts any server certificate: the probe sends nothing the server may
/// not see, and only listens for its refusal of ours. Signatures are still
/// checked, so the handshake is a real one.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PemFile;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    use rustls::RootCertStore;
    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    fn ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf(
        issuer: &CertifiedIssuer<'static, KeyPair>,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (rcgen::Certificate, KeyPair) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, issuer).unwrap(), key)
    }

    /// A TLS listener on 127.0.0.1 that requires a client certificate from
    /// `clients`, completes handshakes and then waits; returns its URL.
    async fn receiver(clients: &CertifiedIssuer<'static, KeyPair>) -> String {
        let server_ca = ca();
        let (cert, key) = leaf(
            &server_ca,
            &["127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(clients.der().clone()).unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(stream).await {
                        let mut sink = [0u8; 64];
                        let _ = tls.read(&mut sink).await;
                    }
                });
            }
        });
        format!("https://127.0.0.1:{port}/upload")
    }

    fn pem(text: String) -> Option<PemFile> {
        Some(PemFile {
            path: "test.pem".into(),
            pem: text.into_bytes(),
        })
    }

    #[tokio::test]
    async fn a_receiver_that_refuses_our_certificate_says_why_and_one_that_accepts_it_says_nothing()
    {
        let clients = ca();
        let url = receiver(&clients).await;

        let without = refusal_reason(&url, &TargetTls::default()).await;
        assert!(
            without
                .as_deref()
                .is_some_and(|r| r.contains("CertificateRequired")),
            "{without:?}"
        );

        let stranger_ca = ca();
        let (cert, key) = leaf(&stranger_ca, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let stranger = TargetTls {
            ca_file: None,
            client_cert: pem(cert.pem()),
            client_key: pem(key.serialize_pem()),
        };
        let refused = refusal_reason(&url, &stranger).await;
        assert!(refused.is_some(), "a certificate from another CA passed");

        let (cert, key) = leaf(&clients, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let member = TargetTls {
            ca_file: None,
            client_cert: pem(cert.pem()),
            client_key: pem(key.serialize_pem()),
        };
        assert_eq!(refusal_reason(&url, &member).await, None);
        // Plain http is never probed.
        assert_eq!(
            refusal_reason("http://127.0.0.1:9/upload", &TargetTls::default()).await,
            None
        );
    }
}
