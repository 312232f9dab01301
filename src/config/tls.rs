//! The TLS keys of the configuration: the receiver's certificate, key and
//! client CA (`[server] tls_cert`, `tls_key`, `tls_client_ca`), and a
//! target's trust and identity (`[[target]] ca_file`, `client_cert`,
//! `client_key`). Each names a PEM file, read when the configuration is
//! loaded: its contents are part of the configuration, so a SIGHUP after a
//! certificate file was replaced (a renewal) is a change that the reload
//! applies, and a file that holds no certificate or key is reported with the
//! other problems of the file instead of at the first connection. Whether a
//! key matches its certificate needs a crypto provider, so the receiver and
//! the agent check that when they build their TLS settings.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::check::Checker;
use super::raw::Field;
use super::values::resolve_key_file;

/// A PEM file named in the configuration, with what it held when read.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    /// The path as resolved (relative to the configuration file's directory).
    pub path: PathBuf,
    /// The file's bytes.
    pub pem: Vec<u8>,
}

/// Shows the path only: a private key never reaches a log line.
impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PemFile({})", self.path.display())
    }
}

/// What a PEM file must hold.
#[derive(Clone, Copy)]
enum PemKind {
    Certificates,
    PrivateKey,
}

impl PemFile {
    /// Reads a file of one or more certificates (a chain, or CA bundle).
    pub fn certificates(path: &Path) -> Result<PemFile, String> {
        PemFile::read(path, PemKind::Certificates)
    }

    /// Reads a file holding a private key (PKCS#8, PKCS#1 or SEC1).
    pub fn private_key(path: &Path) -> Result<PemFile, String> {
        PemFile::read(path, PemKind::PrivateKey)
    }

    fn read(path: &Path, kind: PemKind) -> Result<PemFile, String> {
        let pem = std::fs::read(path).map_err(|error| {
            format!(
                "cannot read {}: {error}; create it or fix the path",
                path.display()
            )
        })?;
        let file = PemFile {
            path: path.to_owned(),
            pem,
        };
        match kind {
            PemKind::Certificates => {
                file.certificate_ders()?;
            }
            PemKind::PrivateKey => {
                file.private_key_der()?;
            }
        }
        Ok(file)
    }

    /// The certificates, in file order; an error when there is none.
    pub fn certificate_ders(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_slice_iter(&self.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not valid PEM ({e})", self.path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
                self.path.display()
            ));
        }
        Ok(certs)
    }

    /// The private key.
    pub fn private_key_der(&self) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_slice(&self.pem).map_err(|e| {
            format!(
                "{} holds no private key ({e}; expected -----BEGIN PRIVATE KEY----- or a PKCS#1/SEC1 key)",
                self.path.display()
            )
        })
    }
}

/// `[server] tls_cert`, `tls_key` and `tls_client_ca`: with them the receiver
/// speaks HTTPS only on its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The certificate chain, the receiver's own certificate first.
    pub cert: PemFile,
    /// The private key of the first certificate.
    pub key: PemFile,
    /// When set, a client must present a certificate signed by one of these CAs.
    pub client_ca: Option<PemFile>,
}

impl ServerTls {
    /// Reads the files named by `--tls-cert`, `--tls-key` and `--tls-client-ca`.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerTls, String> {
        Ok(ServerTls {
            cert: PemFile::certificates(cert)?,
            key: PemFile::private_key(key)?,
            client_ca: client_ca.map(PemFile::certificates).transpose()?,
        })
    }
}

/// A target's `ca_file`, `client_cert` and `client_key`, for `https://` URLs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetTls {
    /// CAs trusted besides the system's roots.
    pub ca_file: Option<PemFile>,
    /// The certificate (chain) shown to a receiver that asks for one (mTLS),
    /// and its key; both or neither.
    pub client_cert: Option<PemFile>,
    /// The private key of `client_cert`.
    pub client_key: Option<PemFile>,
}

/// The raw TLS keys of a `[server]` section.
pub(super) struct RawServerTls {
    pub(super) tls_cert: Field<String>,
    pub(super) tls_key: Field<String>,
    pub(super) tls_client_ca: Field<String>,
}

/// The raw TLS keys of a `[[target]]`.
pub(super) struct RawTargetTls {
    pub(super) ca_file: Field<String>,
    pub(super) client_cert: Field<String>,
    pub(super) client_key: Field<String>,
}

impl Checker<'_> {
    fn pem_field(
        &mut self,
        field: Field<String>,
        key: &str,
        read: fn(&Path) -> Result<PemFile, String>,
    ) -> Option<PemFile> {
        let source = self.source;
        self.field(field, key, None, |file: &String| {
            if file.is_empty() {
                return Err("is empty; name a PEM file or remove the setting".to_owned());
            }
            read(&resolve_key_file(source, file)).map(Some)
        })
    }

    pub(super) fn check_server_tls(
        &mut self,
        section: &std::ops::Range<usize>,
        raw: RawServerTls,
    ) -> Option<ServerTls> {
        let (cert_written, key_written) = (raw.tls_cert.is_some(), raw.tls_key.is_some());
        let client_ca_span = raw.tls_client_ca.as_ref().map(|f| f.span());
        let cert = self.pem_field(raw.tls_cert, "server.tls_cert", PemFile::certificates);
        let key = self.pem_field(raw.tls_key, "server.tls_key", PemFile::private_key);
        let client_ca = self.pem_field(
            raw.tls_client_ca,
            "server.tls_client_ca",
            PemFile::certificates,
        );
        match (cert, key) {
            (Some(cert), Some(key)) => Some(ServerTls {
                cert,
                key,
                client_ca,
            }),
            (None, None) if !cert_written && !key_written => {
                if let Some(span) = client_ca_span {
                    self.problem(
                        span,
                        "server.tls_client_ca",
                        "needs tls_cert and tls_key: client certificates are asked for only over HTTPS",
                    );
                }
                None
            }
            (cert, key) => {
                // A missing partner is reported; an unreadable file already was.
                if cert.is_none() && !cert_written {
                    self.problem(
                        section.clone(),
                        "server.tls_cert",
                        "missing; tls_key is set, so set tls_cert = \"cert.pem\" (the certificate chain) too",
                    );
                }
                if key.is_none() && !key_written {
                    self.problem(
                        section.clone(),
                        "server.tls_key",
                        "missing; tls_cert is set, so set tls_key = \"key.pem\" (its private key) too",
                    );
                }
                None
            }
        }
    }

    pub(super) fn check_target_tls(
        &mut self,
        section: &std::ops::Range<usize>,
        url: &str,
        raw: RawTargetTls,
    ) -> TargetTls {
        let https = url.to_ascii_lowercase().starts_with("https://");
        for (field, key) in [
            (&raw.ca_file, "target.ca_file"),
            (&raw.client_cert, "target.client_cert"),
            (&raw.client_key, "target.client_key"),
        ] {
            if let Some(field) = field
                && !https
                && !url.is_empty()
            {
                self.problem(
                    field.span(),
                    key,
                    format!("is used only with https:// URLs, and the url is {url:?}; use https:// or remove the setting"),
                );
            }
        }
        let (cert_written, key_written) = (raw.client_cert.is_some(), raw.client_key.is_some());
        let tls = TargetTls {
            ca_file: self.pem_field(raw.ca_file, "target.ca_file", PemFile::certificates),
            client_cert: self.pem_field(
                raw.client_cert,
                "target.client_cert",
                PemFile::certificates,
            ),
            client_key: self.pem_field(raw.client_key, "target.client_key", PemFile::private_key),
        };
        match (cert_written, key_written) {
            (true, false) => self.problem(
                section.clone(),
                "target.client_key",
                "missing; client_cert is set, so set client_key = \"client.key\" (its private key) too",
            ),
            (false, true) => self.problem(
                section.clone(),
                "target.client_cert",
                "missing; client_key is set, so set client_cert = \"client.pem\" (its certificate) too",
            ),
            _ => {}
        }
        tls
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::testing::messages;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n";

    #[test]
    fn pem_files_are_read_relative_to_the_config_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), CERT).unwrap();
        std::fs::write(dir.path().join("key.pem"), KEY).unwrap();
        let source = dir.path().join("indexedcp.toml");
        let text = "[[target]]\nname = \"t\"\nurl = \"https://h/upload\"\nca_file = \"cert.pem\"\n\
                    client_cert = \"cert.pem\"\nclient_key = \"key.pem\"\n\
                    [server]\noutput_dir = \"out\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n";
        let config = Config::parse(text, &source).unwrap();
        let tls = config.server.unwrap().tls.unwrap();
        assert_eq!(tls.cert.path, dir.path().join("cert.pem"));
        assert_eq!(tls.key.pem, KEY.as_bytes());
        assert!(format!("{tls:?}").contains("key.pem") && !format!("{tls:?}").contains("MAA="));
        assert_eq!(
            config.targets[0].tls.client_key.as_ref().unwrap().path,
            dir.path().join("key.pem")
        );

        // A key where a certificate belongs, and the other way round.
        let swapped = text.replace("tls_cert = \"cert.pem\"", "tls_cert = \"key.pem\"");
        let problems = Config::parse(&swapped, &source).unwrap_err().messages();
        assert!(problems[0].contains("holds no certificate"), "{problems:?}");
    }

    #[test]
    fn partners_and_schemes_are_checked() {
        let problems =
            messages("[server]\noutput_dir = \"o\"\ntls_key = \"/nonexistent/key.pem\"\n");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("missing; tls_key is set"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("cannot read /nonexistent/key.pem"),
            "{problems:?}"
        );
        let problems = messages("[server]\noutput_dir = \"o\"\ntls_cert = \"\"\ntls_key = \"\"\n");
        assert!(
            problems
                .iter()
                .all(|p| p.contains("is empty; name a PEM file"))
                && problems.len() == 2
        );
        let problems = messages("[server]\noutput_dir = \"o\"\ntls_client_ca = \"/x.pem\"\n");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("needs tls_cert and tls_key")),
            "{problems:?}"
        );
        let problems = messages(
            "[[target]]\nname = \"t\"\nurl = \"http://h/upload\"\nca_file = \"/nonexistent.pem\"\n",
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("used only with https:// URLs")),
            "{problems:?}"
        );
    }
}
