//! Why an attempt failed, and the one rule that decides between retrying and
//! parking a file.

use std::time::Duration;

use crate::agent::store::StoreError;
use crate::protocol;

/// The certificate problem behind a failed request, if that is what it was:
/// a rustls error somewhere in its chain of sources (inside an `io::Error`
/// too, whose `source()` skips the error it wraps) that says a certificate
/// was refused, by us or by the peer.
pub(crate) fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        let rustls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls) = rustls {
            use rustls::AlertDescription as A;
            return match rustls {
                rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::AlertReceived(
                    A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::CertificateRequired
                    | A::UnknownCA
                    | A::AccessDenied,
                ) => Some(rustls.to_string()),
                _ => None,
            };
        }
        // The connector may box the rustls error in a way no downcast sees
        // through; its message is rustls' own.
        let text = e.to_string();
        if let Some(at) = text.find("invalid peer certificate") {
            return Some(text[at..].to_owned());
        }
        next = e.source();
    }
    None
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        error: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{url} sent an unexpected reply: {message}")]
    Protocol { url: String, message: String },
    #[error("cannot send {what}: {message}")]
    Request { what: String, message: String },
    /// The peer no longer knows the upload the resume state names (it
    /// expired, or was aborted): it must start again.
    #[error("{url} forgot the upload: {message}")]
    Forgotten { url: String, message: String },
    /// The TLS handshake failed on a certificate: the peer's was not
    /// trusted (unknown CA, expired, issued for another name), or the peer
    /// refused ours. Either way the configuration, not the network, is wrong.
    #[error(
        "TLS with {host} failed: {reason} ({url}); trust the receiver's CA with ca_file (--cacert), or fix its certificate or this client's client_cert, then send SIGHUP"
    )]
    Certificate {
        url: String,
        host: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Retry {
    /// Retry on the backoff schedule.
    Backoff,
    /// Retry on the schedule, but not before this (429/503 `Retry-After`).
    NotBefore(Duration),
    /// A configuration problem (key, URL): retry at the maximum delay, so that
    /// fixing the config and reloading resumes delivery.
    AtMaximum,
    /// Like `Backoff`, and the peer discarded the upload: forget its resume
    /// state and send every piece again, in a new upload.
    Restart,
    /// Permanent: park the file as failed until an operator retries it.
    Never,
}

impl UploadError {
    /// The same error again, for each file of a batch it ended. (A buffer
    /// error never comes from the receiver; it is copied as its message.)
    pub(crate) fn same(&self) -> UploadError {
        match self {
            UploadError::Transport { url, message } => UploadError::Transport {
                url: url.clone(),
                message: message.clone(),
            },
            UploadError::Status {
                url,
                status,
                error,
                message,
                retry_after,
            } => UploadError::Status {
                url: url.clone(),
                status: *status,
                error: error.clone(),
                message: message.clone(),
                retry_after: *retry_after,
            },
            UploadError::Protocol { url, message } => UploadError::Protocol {
                url: url.clone(),
                message: message.clone(),
            },
            UploadError::Request { what, message } => UploadError::Request {
                what: what.clone(),
                message: message.clone(),
            },
            UploadError::Forgotten { url, message } => UploadError::Forgotten {
                url: url.clone(),
                message: message.clone(),
            },
            UploadError::Certificate { url, host, reason } => UploadError::Certificate {
                url: url.clone(),
                host: host.clone(),
                reason: reason.clone(),
            },
            UploadError::Store(e) => UploadError::Protocol {
                url: String::new(),
                message: e.to_string(),
            },
        }
    }

    /// The one place that decides retry versus park.
    pub fn retry(&self) -> Retry {
        match self {
            UploadError::Transport { .. }
            | UploadError::Protocol { .. }
            | UploadError::Store(_) => Retry::Backoff,
            UploadError::Request { .. } => Retry::Never,
            // Fixing it takes an operator: retry rarely, and at once after a
            // reload (the uploader retries a replaced target's files at once).
            UploadError::Certificate { .. } => Retry::AtMaximum,
            UploadError::Forgotten { .. } => Retry::Restart,
            UploadError::Status {
                status,
                error,
                retry_after,
                ..
            } => match *status {
                401 | 403 | 404 | 405 => Retry::AtMaximum,
                408 => Retry::Backoff,
                422 if error == protocol::FILE_MISMATCH_ERROR => Retry::Restart,
                // A chunk damaged in transit: send it again.
                422 => Retry::Backoff,
                429 | 503 => retry_after.map_or(Retry::Backoff, Retry::NotBefore),
                500..=599 => Retry::Backoff,
                _ => Retry::Never,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, error: &str, retry_after: Option<u64>) -> UploadError {
        UploadError::Status {
            url: "u".into(),
            status: code,
            error: error.into(),
            message: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn retry_decisions() {
        assert_eq!(status(500, "", None).retry(), Retry::Backoff);
        assert_eq!(status(507, "", None).retry(), Retry::Backoff);
        assert_eq!(status(408, "", None).retry(), Retry::Backoff);
        assert_eq!(
            status(429, "", Some(7)).retry(),
            Retry::NotBefore(Duration::from_secs(7))
        );
        assert_eq!(status(429, "", None).retry(), Retry::Backoff);
        assert_eq!(status(401, "", None).retry(), Retry::AtMaximum);
        assert_eq!(status(403, "", None).retry(), Retry::AtMaximum);
        assert_eq!(
            status(422, protocol::CHUNK_MISMATCH_ERROR, None).retry(),
            Retry::Backoff
        );
        assert_eq!(
            status(422, protocol::FILE_MISMATCH_ERROR, None).retry(),
            Retry::Restart
        );
        assert_eq!(status(400, "Invalid filename", None).retry(), Retry::Never);
        assert_eq!(status(413, "", None).retry(), Retry::Never);
        assert_eq!(status(409, "", None).retry(), Retry::Never);
        let transport = UploadError::Transport {
            url: "u".into(),
            message: "refused".into(),
        };
        assert_eq!(transport.retry(), Retry::Backoff);
        let forgotten = UploadError::Forgotten {
            url: "u".into(),
            message: "NoSuchUpload".into(),
        };
        assert_eq!(forgotten.retry(), Retry::Restart);
        let certificate = UploadError::Certificate {
            url: "https://h/upload".into(),
            host: "h".into(),
            reason: "invalid peer certificate: UnknownIssuer".into(),
        };
        assert_eq!(certificate.retry(), Retry::AtMaximum);
        // Object storage: a missing bucket or a refused key is the
        // configuration's problem; SlowDown is retried.
        assert_eq!(status(404, "NoSuchBucket", None).retry(), Retry::AtMaximum);
        assert_eq!(
            status(403, "SignatureDoesNotMatch", None).retry(),
            Retry::AtMaximum
        );
        assert_eq!(status(503, "SlowDown", None).retry(), Retry::Backoff);
    }
}
