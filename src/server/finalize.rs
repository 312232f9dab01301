//! Completing resumable uploads and keeping the staging directory tidy:
//! verifying a fully received upload against its declared SHA-256, syncing
//! it and renaming it into the output directory under a name no other file
//! has; finishing at start-up (or after a reload) the uploads a crash left
//! between their last chunk and completion; and expiring abandoned uploads
//! with their staging files.
//!
//! Completion runs in this order, and may be cut off anywhere and run again:
//! the staged file's data and the staging directory are synced; the chosen
//! final name is recorded in phase finalizing with a synced commit; the file
//! is renamed without replacing anything; the destination and staging
//! directories are synced; then the upload is recorded complete (unsynced:
//! after a power cut the synced finalizing record and the missing staged file
//! tell `finalize_blocking` to record it again). Before any of it, the output
//! and staging directories are checked to be still what their paths name
//! (see `paths::current`).

use std::io;

use super::errors::{ApiError, no_free_name, open_error};
use super::hashes;
use super::paths::{self, Destination};
use super::state::{self, FileMeta, UploadPhase};
use super::{Receiver, blocking};
use crate::protocol;
use crate::sha256::Sha256Stream;
use tracing::Instrument;

impl Receiver {
    /// Finishes uploads interrupted between their last chunk and completion (a
    /// crash or SIGKILL), so their files appear without waiting for the client.
    pub(super) async fn recover(&self) {
        let state = self.inner.state.clone();
        let unfinished = match blocking(move || state.unfinished()).await {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(error = %e, "cannot list unfinished uploads");
                return;
            }
        };
        for upload in unfinished {
            // The client recorded with the upload names it in the log lines
            // of its completion, as the request's span would have.
            let span = match &upload.named_client {
                Some(name) => tracing::info_span!("client", client = %name),
                None => tracing::Span::none(),
            };
            let outcome = self
                .finalize(&upload.upload_id)
                .instrument(span.clone())
                .await;
            let _in_span = span.enter();
            match outcome {
                Ok(name) => {
                    tracing::info!(upload_id = %upload.upload_id, file = %name, "recovered upload completed")
                }
                Err(e) => {
                    tracing::warn!(upload_id = %upload.upload_id, error = %e.message(), "recovered upload could not be completed")
                }
            }
        }
        self.sweep_staging().await;
        self.trim_v1_files().await;
    }

    /// Removes staging files nothing refers to: those of a batch stopped
    /// before it recorded them, and of uploads already complete. Each is
    /// checked under its upload's locks, so a request writing it is waited for.
    async fn sweep_staging(&self) {
        let path = self.inner.staging_path.clone();
        let names = match blocking(move || {
            std::fs::read_dir(&path)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<Vec<String>>>()
        })
        .await
        {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the staging directory");
                return;
            }
        };
        let mut removed = 0usize;
        // (`v1-*` files are v1 chunks on their way in, not uploads.)
        let ids = names
            .into_iter()
            .filter(|n| protocol::is_valid_upload_id(n) && !n.starts_with("v1-"));
        for id in ids {
            let _guards = self.inner.locks.lock_uploads([id.as_str()]).await;
            let this = self.clone();
            let gone = blocking(move || {
                let orphan = match this.inner.state.upload(&id)? {
                    None => true,
                    Some(upload) => upload.phase == UploadPhase::Complete,
                };
                if orphan {
                    this.discard_staged(&id);
                }
                Ok::<_, state::StateError>(orphan)
            })
            .await;
            removed += usize::from(matches!(gone, Ok(true)));
        }
        if removed > 0 {
            tracing::info!(files = removed, "removed staging files of no upload");
        }
    }

    /// Removes uploads untouched for `incomplete_expiry` and their staging data.
    pub(super) async fn expire(&self) {
        let inner = self.inner.clone();
        let cutoff = state::now_secs() - inner.incomplete_expiry.as_secs() as i64;
        let state = inner.state.clone();
        let result = blocking(move || state.expire(cutoff)).await;
        // A batch may be writing a staging file of the same id (it holds the
        // chunk's lock): the file goes only once nobody holds it.
        let result = match result {
            Ok((stale, forgotten)) => {
                // At once: the same ids may be used again before the locks
                // below are free, and must not find the old hashes.
                stale.iter().for_each(|id| inner.hashes.forget(id));
                let _guards = inner
                    .locks
                    .lock_uploads(stale.iter().map(String::as_str))
                    .await;
                let (this, n) = (self.clone(), stale.len());
                let _ = blocking(move || {
                    stale.iter().for_each(|id| this.discard_staged(id));
                    Ok::<_, ApiError>(())
                })
                .await;
                Ok((n, forgotten))
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((0, 0)) => {}
            Ok((stale, forgotten)) => {
                tracing::info!(abandoned = stale, forgotten, "expired old upload records")
            }
            Err(e) => tracing::warn!(error = %e, "expiring old uploads failed"),
        }
    }

    /// Verifies a fully received upload and renames it into place; idempotent, and
    /// safe to call again after a crash at any point.
    pub(super) async fn finalize(&self, upload_id: &str) -> Result<String, ApiError> {
        let _guard = self.inner.locks.lock(upload_id.to_owned()).await;
        let this = self.clone();
        let id = upload_id.to_owned();
        blocking(move || this.finalize_blocking(&id)).await
    }

    pub(super) fn finalize_blocking(&self, upload_id: &str) -> Result<String, ApiError> {
        let inner = &self.inner;
        // Both directories must still be the ones their paths name (or be
        // reopened), else nothing is renamed and the client is told 503: a
        // file renamed into a directory hidden by a mount, or into a deleted
        // one, would be reported delivered and seen by nobody.
        paths::current(&inner.root)?;
        paths::current(&inner.staging)?;
        let Some(upload) = inner.state.upload(upload_id)? else {
            return Err(ApiError::NotFound);
        };
        // The verified staged file, whose cached pages are dropped once it
        // has its final name.
        let mut staged = None;
        let (dest, first_attempt) = match (upload.phase, upload.actual_name) {
            (UploadPhase::Complete, Some(name)) => return Ok(name),
            (UploadPhase::Finalizing, Some(name)) => {
                let dest = Destination::from_display(&name);
                // The staged file's name was made durable before the final name
                // was recorded, so a missing staged file means the rename
                // happened (the final file may have been taken away since).
                let renamed = !paths::exists_in(&inner.staging, upload_id)?;
                let parent = paths::open_parent(&inner.root, &dest).map_err(open_error)?;
                // Where rename is emulated by link + unlink, a crash between
                // the two leaves both names on one file.
                let linked =
                    !renamed && paths::same_file(&inner.staging, upload_id, &parent, &dest.name)?;
                if renamed || linked {
                    if linked {
                        rustix::fs::unlinkat(
                            &inner.staging,
                            upload_id,
                            rustix::fs::AtFlags::empty(),
                        )
                        .map_err(io::Error::from)?;
                    }
                    paths::fsync_dir(&parent)?;
                    paths::fsync_dir(&inner.staging)?;
                    inner.state.complete(upload_id, &name)?;
                    return Ok(name);
                }
                (dest, 0)
            }
            _ => {
                staged = Some(self.verify_staged(upload_id, &upload.meta)?);
                (self.destination(&upload.meta.client_name)?, 0)
            }
        };
        let parent = paths::open_parent(&inner.root, &dest).map_err(open_error)?;
        let millis = paths::now_millis();
        for attempt in first_attempt..10_000u32 {
            let candidate = dest.with_name(paths::unique_candidate(&dest.name, millis, attempt));
            let final_name = candidate.display();
            // The chosen name is durable before the rename, so recovery knows where
            // the file went.
            inner
                .state
                .set_phase(upload_id, UploadPhase::Finalizing, Some(&final_name))?;
            crate::failpoint::hit(crate::failpoint::SERVER_BEFORE_RENAME);
            if paths::rename_no_replace(&inner.staging, upload_id, &parent, &candidate.name)? {
                paths::fsync_dir(&parent)?;
                paths::fsync_dir(&inner.staging)?;
                crate::failpoint::hit(crate::failpoint::SERVER_AFTER_RENAME);
                inner.state.complete(upload_id, &final_name)?;
                tracing::info!(upload_id, client_name = %upload.meta.client_name, file = %final_name, size = upload.meta.file_size, "file complete");
                if let Some(file) = staged {
                    drop_cached_pages(file);
                }
                return Ok(final_name);
            }
        }
        Err(no_free_name(&dest))
    }

    /// Checks that the recorded chunks tile the file and that the staged bytes
    /// hash to the declared SHA-256, then syncs them and returns the file; on a
    /// mismatch the staging data is discarded.
    fn verify_staged(&self, upload_id: &str, meta: &FileMeta) -> Result<std::fs::File, ApiError> {
        let inner = &self.inner;
        // Callers complete only uploads whose hash is known; this keeps one
        // that is not from being discarded as damaged.
        if meta.file_sha256.is_empty() {
            return Err(ApiError::Conflict(format!(
                "upload {upload_id} has every chunk but no X-File-Sha256 yet; send any chunk again with it"
            )));
        }
        let chunks = inner.state.chunks(upload_id)?;
        let mut expected_offset = 0u64;
        let mut tiled = chunks.len() as u64 == meta.chunk_count;
        for (i, chunk) in chunks.iter().enumerate() {
            tiled &= chunk.chunk_idx == i as u64 && chunk.offset == expected_offset;
            expected_offset += chunk.length;
        }
        tiled &= expected_offset == meta.file_size;
        let discard = |why: String| -> Result<std::fs::File, ApiError> {
            self.discard_staged(upload_id);
            inner.state.forget_upload(upload_id)?;
            tracing::warn!(upload_id, client_name = %meta.client_name, reason = %why, "upload discarded");
            Err(ApiError::FileMismatch(format!(
                "{why}; the upload was discarded, send the file again from its first chunk"
            )))
        };
        if !tiled {
            return discard(format!(
                "the chunks do not cover the file exactly ({} chunks ending at byte {expected_offset}, X-File-Size {})",
                chunks.len(),
                meta.file_size
            ));
        }
        let path = inner.staging_path.join(upload_id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        file.set_len(meta.file_size)?;
        // Only what the hash followed as chunks arrived is not read back.
        let actual = match inner.hashes.take(upload_id) {
            hashes::Known::Whole(sha256) => sha256,
            known => {
                // Read back what the hash did not follow: all of it when
                // nothing was followed.
                let (mut hasher, len) = match known {
                    hashes::Known::Prefix { hasher, len } if len <= meta.file_size => (hasher, len),
                    _ => (Sha256Stream::new(), 0),
                };
                hashes::hash_range(&file, len, meta.file_size - len, &mut hasher)?;
                hasher.finalize_hex()
            }
        };
        if actual != meta.file_sha256 {
            return discard(format!(
                "the received file has SHA-256 {actual}, not X-File-Sha256 {}",
                meta.file_sha256
            ));
        }
        file.sync_all()?;
        // The staged name too: recovery reads a missing staged file as renamed.
        paths::fsync_dir(&inner.staging)?;
        Ok(file)
    }
}

/// Drops a delivered file's pages from the page cache (it is synced, so this
/// only frees memory), on a thread of its own when there is a runtime: for a
/// GiB it takes about 0.1 s, which the client's reply does not wait for.
fn drop_cached_pages(file: std::fs::File) {
    let drop_pages = move || {
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(drop_pages)),
        Err(_) => drop_pages(),
    }
}
