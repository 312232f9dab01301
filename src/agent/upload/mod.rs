//! The sending side: the uploader that drains the buffer, and the delivery
//! kinds it drains it into.
//!
//! The uploader is protocol-free. It decides which files are due
//! ([`uploader`]), how many bytes may be in flight per target
//! ([`TargetRuntime`]), how a file's pieces go out and every outcome is
//! recorded ([`file`]), how small files share requests ([`batch`]), the retry
//! schedule ([`Backoff`]) and whether a failure is retried or parks the file
//! ([`UploadError::retry`], the one place that decides). Each kind of target
//! implements [`delivery::Delivery`]: [`indexedcp`], this project's own
//! receiver protocol (v1, resumable, batches), [`s3`], object storage, and
//! [`tus`], any tus 1.0.0 server. A file's data leaves the
//! buffer only when its delivery confirmed the whole file. No SQL here: the
//! store does that, always off the executor.

mod backoff;
mod batch;
mod delivery;
mod error;
mod events;
mod file;
pub mod indexedcp;
mod once;
pub mod s3;
mod target;
pub mod tus;
mod uploader;

pub use backoff::Backoff;
pub(crate) use delivery::pieces;
pub use error::{Retry, UploadError};
pub use events::{EventStatus, NoObserver, UploadEvent, UploadObserver};
pub use file::FileOutcome;
pub use once::{FileAttempt, upload_files_once};
pub use target::TargetRuntime;
pub use uploader::{UploaderShared, run_uploader};
