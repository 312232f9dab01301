//! Named clients of the receiver (`[[server.client]]`) and where their files
//! go (`[server] output_layout`). A client is a name, the SHA-256 of its API
//! key (from `api_key_sha256`, or computed from `api_key_file`, so the
//! receiver keeps only hashes) and, with client certificates, the subject its
//! certificate must have. The name becomes a folder with the `by-client`
//! layout, so it is checked as one.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::check::Checker;
use super::raw::Field;
use super::values::{check_api_key, read_key_file, resolve_key_file};

/// One `[[server.client]]`, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    name: Field<String>,
    api_key_file: Field<String>,
    api_key_sha256: Field<String>,
    cert_subject: Field<String>,
}

/// A client the receiver knows by name.
#[derive(Clone, PartialEq, Eq)]
pub struct NamedClient {
    /// Unique; a folder name with `output_layout = "by-client"`.
    pub name: String,
    /// The SHA-256 of the key the client sends as `Authorization: Bearer`.
    pub key_sha256: [u8; 32],
    /// With client certificates (`tls_client_ca`): the subject the client's
    /// certificate must have, such as `CN=clinic-12`.
    pub cert_subject: Option<String>,
}

/// The key hash is not a secret, but a log line has no use for it.
impl fmt::Debug for NamedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamedClient")
            .field("name", &self.name)
            .field("cert_subject", &self.cert_subject)
            .finish_non_exhaustive()
    }
}

/// Where received files go below `output_dir`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputLayout {
    /// As the path mode says, for every client. The default.
    #[default]
    Flat,
    /// A named client's files under `<output_dir>/<client name>/`; files of
    /// unnamed keys (`api_keys`) as with `Flat`.
    ByClient,
}

impl OutputLayout {
    /// The spelling in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flat => "flat",
            Self::ByClient => "by-client",
        }
    }
}

impl FromStr for OutputLayout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flat" => Ok(Self::Flat),
            "by-client" => Ok(Self::ByClient),
            other => Err(format!(
                "unknown output_layout {other:?}; use \"flat\" or \"by-client\""
            )),
        }
    }
}

/// Normalises a certificate subject for comparison: `CN=a,O=b` and
/// `CN=a, O=b` are the same subject.
pub fn normalize_subject(subject: &str) -> String {
    subject
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The SHA-256 of an API key, as `api_key_sha256` holds it.
pub fn key_sha256(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a usable client name: it becomes a folder name, so use 1 to 64 \
             letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

impl Checker<'_> {
    pub(super) fn check_output_layout(&mut self, raw: Field<String>) -> OutputLayout {
        self.field(raw, "server.output_layout", OutputLayout::Flat, |v| {
            v.parse()
        })
    }

    pub(super) fn check_clients(
        &mut self,
        raw: Field<Vec<Spanned<RawClient>>>,
        client_ca: bool,
    ) -> Vec<NamedClient> {
        let mut clients: Vec<NamedClient> = Vec::new();
        for raw in raw.map(Spanned::into_inner).unwrap_or_default() {
            let section = raw.span();
            if let Some(client) = self.check_client(section.clone(), raw.into_inner(), client_ca) {
                if clients.iter().any(|c| c.name == client.name) {
                    self.problem(
                        section.clone(),
                        "server.client.name",
                        format!(
                            "{:?} is used by another client; names must be unique",
                            client.name
                        ),
                    );
                } else if clients.iter().any(|c| c.key_sha256 == client.key_sha256) {
                    self.problem(
                        section.clone(),
                        "server.client.api_key_file",
                        format!(
                            "client {:?} has the same key as another client; give each its own key",
                            client.name
                        ),
                    );
                } else {
                    clients.push(client);
                }
            }
        }
        clients
    }

    fn check_client(
        &mut self,
        section: Range<usize>,
        raw: RawClient,
        client_ca: bool,
    ) -> Option<NamedClient> {
        let name = self.field(raw.name.clone(), "server.client.name", None, |name| {
            check_name(name).map(|()| Some(name.clone()))
        });
        if raw.name.is_none() {
            self.problem(
                section.clone(),
                "server.client.name",
                "missing; set name = \"clinic-12\" (shown in logs and metrics)",
            );
        }
        let source = self.source;
        let key = match (raw.api_key_file, raw.api_key_sha256) {
            (Some(_), Some(hash)) => {
                self.problem(
                    hash.span(),
                    "server.client.api_key_sha256",
                    "api_key_file is set too; set one of them",
                );
                None
            }
            (None, None) => {
                self.problem(
                    section.clone(),
                    "server.client.api_key_file",
                    "missing; set api_key_file = \"/etc/indexedcp/clients/NAME.key\" or api_key_sha256 = \"<64 hex digits>\"",
                );
                None
            }
            (Some(file), None) => self.field(Some(file), "server.client.api_key_file", None, |file| {
                let path = resolve_key_file(source, file);
                let key = read_key_file(&path)?;
                let key = key.trim();
                check_api_key(key).map_err(|m| format!("{}: {m}", path.display()))?;
                Ok(Some(key_sha256(key)))
            }),
            (None, Some(hash)) => self.field(Some(hash), "server.client.api_key_sha256", None, |hex_text| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(hex_text.trim(), &mut out).map_err(|_| {
                    "is not a SHA-256 in hex (64 digits); compute it with `printf %s KEY | sha256sum`"
                        .to_owned()
                })?;
                Ok(Some(out))
            }),
        };
        let cert_span = raw.cert_subject.as_ref().map(Spanned::span);
        let cert_subject = raw.cert_subject.map(|s| normalize_subject(s.get_ref()));
        if let Some(span) = cert_span
            && !client_ca
        {
            self.problem(
                span,
                "server.client.cert_subject",
                "needs tls_client_ca: without client certificates there is no subject to check",
            );
        }
        Some(NamedClient {
            name: name?,
            key_sha256: key?,
            cert_subject,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{messages, parse};

    #[test]
    fn clients_are_checked_and_keep_only_key_hashes() {
        let hash = hex::encode(key_sha256("k"));
        let config = parse(&format!(
            "[server]\noutput_dir = \"o\"\noutput_layout = \"by-client\"\n\
             [[server.client]]\nname = \"clinic-12\"\napi_key_sha256 = \"{hash}\"\n"
        ))
        .unwrap();
        let server = config.server.unwrap();
        assert_eq!(server.output_layout, OutputLayout::ByClient);
        assert_eq!(server.clients[0].name, "clinic-12");
        assert_eq!(server.clients[0].key_sha256, key_sha256("k"));

        let problems = messages(&format!(
            "[server]\noutput_dir = \"o\"\noutput_layout = \"nested\"\n\
             [[server.client]]\nname = \"../up\"\napi_key_sha256 = \"{hash}\"\n\
             [[server.client]]\nname = \"b\"\napi_key_sha256 = \"xyz\"\ncert_subject = \"CN=b\"\n\
             [[server.client]]\nname = \"c\"\n"
        ));
        for expected in [
            "unknown output_layout",
            "not a usable client name",
            "not a SHA-256 in hex",
            "needs tls_client_ca",
            "missing; set api_key_file",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected:?} not in {problems:#?}"
            );
        }
        assert_eq!(
            normalize_subject("CN=a,O=b"),
            normalize_subject("CN=a,  O=b")
        );
    }
}
