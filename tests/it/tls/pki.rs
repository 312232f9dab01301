//! Certificates for the TLS tests, made with rcgen: a CA, server
//! certificates for 127.0.0.1 and localhost, client certificates, an expired
//! one and one for another host. Each is written as PEM files in a folder.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, date_time_ymd,
};

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority whose certificate is `ca_pem`.
pub struct Ca {
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub ca_pem: PathBuf,
}

/// What a leaf certificate is for.
pub enum Leaf<'a> {
    /// A server certificate for these names (IP addresses or DNS names).
    Server(&'a [&'a str]),
    /// A client certificate with this common name.
    Client(&'a str),
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_pem = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_pem, issuer.pem()).unwrap();
        Ca {
            dir: dir.to_owned(),
            issuer,
            ca_pem,
        }
    }

    /// Issues a certificate named `stem` with `serial`; `expired` makes one
    /// that ended in 2020.
    pub fn issue(&self, stem: &str, leaf: Leaf<'_>, serial: u64, expired: bool) -> CertFiles {
        let (names, cn, usage): (Vec<String>, String, _) = match leaf {
            Leaf::Server(names) => (
                names.iter().map(|n| n.to_string()).collect(),
                names[0].to_string(),
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            Leaf::Client(cn) => (
                Vec::new(),
                cn.to_string(),
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        };
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(serial.into());
        if expired {
            params.not_before = date_time_ymd(2019, 1, 1);
            params.not_after = date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, stem: &str, serial: u64) -> CertFiles {
        self.issue(
            stem,
            Leaf::Server(&["127.0.0.1", "localhost"]),
            serial,
            false,
        )
    }

    pub fn client(&self, stem: &str, cn: &str) -> CertFiles {
        self.issue(stem, Leaf::Client(cn), 7, false)
    }
}

/// Replaces `to`'s certificate and key with `from`'s, each by a rename as
/// certbot's deploy does, so the receiver never reads half a file.
pub fn install(from: &CertFiles, to: &CertFiles) {
    for (a, b) in [(&from.cert, &to.cert), (&from.key, &to.key)] {
        let tmp = b.with_extension("new");
        std::fs::copy(a, &tmp).unwrap();
        std::fs::rename(&tmp, b).unwrap();
    }
}
