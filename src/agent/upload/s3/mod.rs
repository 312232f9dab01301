//! The `s3` kind: each file goes straight into an S3 or S3-compatible
//! bucket, under the target's prefix and the file's remote name, through the
//! `object_store` crate (it signs the requests; `x-amz-checksum-sha256` lets
//! the store verify each request's bytes; a store that does not, like moto,
//! is caught by its ETag, which must be the MD5 of the bytes sent: a part
//! whose ETag is not is sent again before it is recorded, and a single
//! object whose ETag is not is written again). A file up to `part_size` is one
//! PUT; a larger one is a multipart upload whose parts are runs of buffer
//! chunks, several in flight at once within the target's byte budget.
//!
//! Exactly once: a small file is written with `If-None-Match: *`, and a large
//! file's key, multipart upload id and every part's ETag are recorded in the
//! buffer (synced) before anything depends on them, so an agent killed at any
//! moment resumes the same upload and never sends a recorded part again.
//! Every object carries the file's SHA-256 as metadata, so an object already
//! at the key (a PUT or CompleteMultipartUpload whose reply was lost, or a
//! NoSuchUpload after a completion that did happen) is recognised by a HEAD
//! showing our size and SHA-256, and an ETag that fits the bytes sent (the
//! MD5 of a single object, the MD5 of the recorded parts' MD5s of a
//! multipart one), and counted as confirmed, never written twice (with an
//! ETag that does not fit, it is written again, or deleted and uploaded
//! again). A small object with the file's size and MD5 but no metadata at
//! all is ours too, its metadata lost by a store that writes it apart from
//! the bytes when the writer went away (s3s-fs does): it is written again
//! with the metadata. An object with other bytes is handled by `on_conflict`, and renamed
//! keys are derived from the file's ingest time so that every retry tries the
//! same ones. An upload the store forgot, or one whose parts no longer fit
//! the settings, is aborted and started again from its recorded key.
//!
//! No upload is left open behind the buffer's back either: before a file
//! without a recorded upload creates one, and when an operator purges it, the
//! uploads the store holds open at the file's own keys (a create whose reply
//! was lost, or whose id a kill kept from being recorded) are aborted.
//!
//! Operators should add a bucket lifecycle rule that aborts incomplete
//! multipart uploads after some days: an upload purged from a buffer that
//! could not reach the store is otherwise kept (and billed) by the store.

mod client;
mod uploads;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use object_store::aws::AmazonS3;
use object_store::multipart::{MultipartStore, PartId};
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload,
};
use serde::{Deserialize, Serialize};

use crate::agent::store::FileRecord;
use crate::config::{OnConflict, S3Target, TargetConfig};

use super::delivery::{Delivery, Finished, Piece, Resume, Sent};
use super::error::UploadError;
use client::{
    Head, attributes, e_tag_differs, e_tag_is_not, head, location, md5_hex, multipart_e_tag,
    object_key, part_e_tag, renamed_key, upload_error,
};

/// Parts of one file in flight at once, as far as the byte budget allows.
/// Three keep a loopback store as busy as four did (scenario 7: 0.88 of
/// rclone's speed with three, 0.85 with four) and hold one part buffer less:
/// the agent's peak went from 72 to 59-63 MiB with 8 MiB parts.
const PART_WINDOW: usize = 3;

/// What the store's ETags have shown themselves to be, in [`S3::etags`].
const ETAGS_UNKNOWN: u8 = 0;
const ETAGS_MD5: u8 = 1;
const ETAGS_OTHER: u8 = 2;

/// ETags that were no MD5 of the bytes sent, with none that was, after which
/// a store is taken to give other ETags (SSE-KMS encryption does).
const UNMATCHED_ETAGS: u32 = 3;

/// How many renamed keys `on_conflict = "rename"` tries before giving up.
const MAX_RENAMES: u32 = 100;

/// An S3 bucket as a delivery.
pub struct S3 {
    store: Arc<AmazonS3>,
    /// For the one request the crate has no call for (listing the open
    /// multipart uploads), signed by `store`.
    http: reqwest::Client,
    /// Whether the store's lack of ListMultipartUploads was logged.
    said_no_listing: AtomicBool,
    /// Whether the store's ETags are the MD5 of the bytes it keeps (one ETag
    /// that was settles it), or something else (SSE-KMS): only the former
    /// tell a body changed on the way.
    etags: AtomicU8,
    /// ETags that were not the MD5 of the bytes sent while `etags` is
    /// unknown.
    unmatched: AtomicU32,
    /// `s3://bucket/prefix/`, for messages.
    url: String,
    prefix: String,
    part_size: u64,
    on_conflict: OnConflict,
}

/// A large file's resume state, recorded before its first part is sent.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct State {
    v: u32,
    /// The key chosen for the file (after `on_conflict`).
    key: String,
    /// The multipart upload; `None` when our object was already at the key.
    multipart: Option<String>,
    /// The part size the parts were cut with.
    part_size: u64,
}

impl State {
    fn parse(url: &str, state: &str) -> Result<State, UploadError> {
        serde_json::from_str(state).map_err(|e| UploadError::Forgotten {
            url: url.to_owned(),
            message: format!("unreadable resume state {state:?}: {e}"),
        })
    }
}

/// How a key turned out for a file.
enum Chosen {
    /// Nothing is there (or `on_conflict = "overwrite"` replaces it).
    Free(String),
    /// Our own object is there already.
    Ours(String),
}

impl S3 {
    pub fn new(config: &TargetConfig, s3: &S3Target) -> Result<S3, UploadError> {
        Ok(S3 {
            store: Arc::new(client::build(config, s3)?),
            http: reqwest::Client::builder()
                .timeout(config.timeout)
                .build()
                .map_err(|e| UploadError::Request {
                    what: format!("to target {:?}", config.name),
                    message: format!("cannot set up the http client: {e}"),
                })?,
            said_no_listing: AtomicBool::new(false),
            etags: AtomicU8::new(ETAGS_UNKNOWN),
            unmatched: AtomicU32::new(0),
            url: format!("s3://{}/{}", s3.bucket, s3.prefix),
            prefix: s3.prefix.clone(),
            part_size: s3.part_size,
            on_conflict: s3.on_conflict,
        })
    }

    /// Whether `e_tag`, the store's answer to bytes whose MD5 is `md5`,
    /// shows that it keeps other bytes. A store whose ETags were never the
    /// MD5 of what was sent, [`UNMATCHED_ETAGS`] times in a row, gives ETags
    /// of another kind (SSE-KMS): from then on they tell nothing, and it is
    /// logged once.
    fn changed_on_the_way(&self, e_tag: Option<&str>, md5: &str) -> bool {
        if !e_tag_differs(e_tag, md5) {
            // `e_tag_differs` against an empty MD5 is true of every plain
            // MD5: this one is ours.
            if e_tag_differs(e_tag, "") {
                self.etags.store(ETAGS_MD5, Ordering::Relaxed);
            }
            return false;
        }
        match self.etags.load(Ordering::Relaxed) {
            ETAGS_MD5 => true,
            ETAGS_OTHER => false,
            _ => {
                if self.unmatched.fetch_add(1, Ordering::Relaxed) + 1 < UNMATCHED_ETAGS {
                    return true;
                }
                if self
                    .etags
                    .compare_exchange(
                        ETAGS_UNKNOWN,
                        ETAGS_OTHER,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    tracing::info!(target = %self.url, "the store's ETags are not the MD5 of the bytes sent (an encrypted bucket?): they cannot tell a body changed on the way, only the store's own checksum check can");
                }
                false
            }
        }
    }

    /// The ETag the object completed from `parts` must have, when the
    /// store's ETags are known to be MD5s.
    fn expected_multipart_e_tag(&self, parts: &[PartId]) -> Option<String> {
        if self.etags.load(Ordering::Relaxed) != ETAGS_MD5 {
            return None;
        }
        multipart_e_tag(parts.iter().map(|p| part_e_tag(&p.content_id)))
    }

    fn is_large(&self, file: &FileRecord) -> bool {
        file.size > self.part_size
    }

    fn conflict(&self, file: &FileRecord, key: &str) -> UploadError {
        UploadError::Request {
            what: file.remote_name.clone(),
            message: format!(
                "an object with other bytes is already at {key:?} and on_conflict = \"fail\"; \
                 move it away (or set on_conflict), then run `indexedcp retry`"
            ),
        }
    }

    /// Picks the key for a file: its own, or under `on_conflict = "rename"`
    /// the first renamed candidate that is free or already ours.
    async fn choose_key(&self, file: &FileRecord) -> Result<Chosen, UploadError> {
        let base = object_key(&self.prefix, file)?;
        let mut key = base.clone();
        for attempt in 1..=MAX_RENAMES {
            match head(&self.store, &self.url, &key).await? {
                None => return Ok(Chosen::Free(key)),
                Some(found) if found.is(file) => return Ok(Chosen::Ours(key)),
                Some(_) => match self.on_conflict {
                    OnConflict::Fail => return Err(self.conflict(file, &key)),
                    OnConflict::Overwrite => return Ok(Chosen::Free(key)),
                    OnConflict::Rename => key = renamed_key(&base, file.created_at, attempt),
                },
            }
        }
        Err(self.too_many_renames(file))
    }

    fn too_many_renames(&self, file: &FileRecord) -> UploadError {
        UploadError::Request {
            what: file.remote_name.clone(),
            message: format!("{MAX_RENAMES} renamed keys are all taken by other objects"),
        }
    }

    /// HEADs `key` after a write: the object must be `file`, else the write
    /// is not confirmed.
    async fn verify(&self, file: &FileRecord, key: &str) -> Result<(), UploadError> {
        match head(&self.store, &self.url, key).await? {
            Some(found) if found.is(file) => Ok(()),
            found => Err(UploadError::Protocol {
                url: self.url.clone(),
                message: format!(
                    "after the write, {key:?} shows {} instead of {} bytes with SHA-256 {}",
                    describe(found.as_ref()),
                    file.size,
                    file.sha256
                ),
            }),
        }
    }

    /// A small file: one PUT that never replaces an object (unless
    /// `on_conflict = "overwrite"`), trying renamed keys when told to. An
    /// object that is ours (our size and SHA-256 metadata) but whose ETag is
    /// not the MD5 of the file holds a body changed on the way to a store
    /// that does not check checksums: it is written again.
    async fn put_small(&self, file: &FileRecord, data: Vec<u8>) -> Result<Sent, UploadError> {
        let base = object_key(&self.prefix, file)?;
        let (data, md5) = md5_off_executor(data).await?;
        let payload = PutPayload::from(data);
        let mut key = base.clone();
        for attempt in 1..=MAX_RENAMES {
            let path = location(&key);
            let options = PutOptions {
                mode: PutMode::Create,
                attributes: attributes(file),
                ..PutOptions::default()
            };
            match self
                .store
                .put_opts(&path, payload.clone(), options.clone())
                .await
            {
                Ok(put) if self.changed_on_the_way(put.e_tag.as_deref(), &md5) => {
                    return self.rewrite(file, &key, &payload, &md5).await;
                }
                Ok(_) => {
                    self.verify(file, &key).await?;
                    return Ok(complete(key));
                }
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {}
                Err(e) => return Err(upload_error(&self.url, &e)),
            }
            // Something is there: our own earlier write whose reply was
            // lost, or another object.
            match head(&self.store, &self.url, &key).await? {
                Some(found) if found.is(file) => {
                    if self.changed_on_the_way(found.e_tag.as_deref(), &md5) {
                        return self.rewrite(file, &key, &payload, &md5).await;
                    }
                    return Ok(complete(key));
                }
                // This file's bytes (its size, and their MD5 as the ETag)
                // without our metadata: our own write, whose metadata a
                // store that saves it apart from the bytes lost when the
                // writer went away (s3s-fs stores the bytes, then the
                // metadata). Written again over itself, with the metadata,
                // rather than a second copy under another key.
                Some(found)
                    if found.size == file.size
                        && found.sha256.is_none()
                        && !e_tag_differs(found.e_tag.as_deref(), &md5) =>
                {
                    tracing::info!(file = %file.remote_name, %key, "the key holds this file's bytes without their metadata (a write cut off in between): writing it again with the metadata");
                    return self.overwrite(file, key, &payload, options, &md5).await;
                }
                // Gone again since: try the same key once more.
                None => continue,
                Some(_) => match self.on_conflict {
                    OnConflict::Fail => return Err(self.conflict(file, &key)),
                    OnConflict::Rename => key = renamed_key(&base, file.created_at, attempt),
                    OnConflict::Overwrite => {
                        return self.overwrite(file, key, &payload, options, &md5).await;
                    }
                },
            }
        }
        Err(self.too_many_renames(file))
    }

    /// Writes the file at `key` over whatever is there, then makes sure it
    /// arrived as sent (written again while its ETag is not the MD5 of the
    /// bytes, then checked by a HEAD).
    async fn overwrite(
        &self,
        file: &FileRecord,
        key: String,
        payload: &PutPayload,
        mut options: PutOptions,
        md5: &str,
    ) -> Result<Sent, UploadError> {
        options.mode = PutMode::Overwrite;
        let put = self
            .store
            .put_opts(&location(&key), payload.clone(), options)
            .await
            .map_err(|e| upload_error(&self.url, &e))?;
        if self.changed_on_the_way(put.e_tag.as_deref(), md5) {
            return self.rewrite(file, &key, payload, md5).await;
        }
        self.verify(file, &key).await?;
        Ok(complete(key))
    }

    /// Writes our object at `key` again, over a copy of it whose bytes
    /// changed on the way (its ETag is not the MD5 of the file). The object
    /// is ours to replace: it carries our size and SHA-256 metadata. A few
    /// tries; when every one arrives changed, the attempt fails and the next
    /// one finds the damaged copy the same way.
    async fn rewrite(
        &self,
        file: &FileRecord,
        key: &str,
        payload: &PutPayload,
        md5: &str,
    ) -> Result<Sent, UploadError> {
        const TRIES: usize = 3;
        for _ in 0..TRIES {
            tracing::info!(file = %file.remote_name, %key, "the store holds other bytes than were sent (its ETag is not their MD5): writing the object again");
            let options = PutOptions {
                mode: PutMode::Overwrite,
                attributes: attributes(file),
                ..PutOptions::default()
            };
            let put = self
                .store
                .put_opts(&location(key), payload.clone(), options)
                .await
                .map_err(|e| upload_error(&self.url, &e))?;
            if !self.changed_on_the_way(put.e_tag.as_deref(), md5) {
                self.verify(file, key).await?;
                return Ok(complete(key.to_owned()));
            }
        }
        Err(UploadError::Protocol {
            url: self.url.clone(),
            message: format!(
                "{key:?} arrived with other bytes than were sent {TRIES} times in a row (its ETag is not their MD5 {md5})"
            ),
        })
    }

    /// Aborts a multipart upload, ignoring one the store no longer knows.
    async fn abort_upload(&self, key: &str, id: &str) -> Result<(), UploadError> {
        match self
            .store
            .abort_multipart(&location(key), &id.to_owned())
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => self.upload_refused(key, &e).await,
        }
    }

    /// Whether an error about a multipart upload means only that the store
    /// no longer has the upload: `Ok` then, the error as it stands otherwise.
    /// S3 says so with NoSuchUpload (404); s3s-fs answers 403 AccessDenied
    /// for an upload id it does not know (after an abort, or a completion
    /// cut short, which it starts by dropping the id). A 403 also means
    /// wrong credentials: a HEAD of the key, with the same credentials,
    /// tells the two apart.
    async fn upload_refused(
        &self,
        key: &str,
        error: &object_store::Error,
    ) -> Result<(), UploadError> {
        if !matches!(error, object_store::Error::PermissionDenied { .. }) {
            return Err(upload_error(&self.url, error));
        }
        head(&self.store, &self.url, key).await?;
        Ok(())
    }

    /// Aborts the multipart uploads open at `file`'s own keys: its object
    /// key and the renamed candidates. Only a file without a recorded upload
    /// calls it, so every one found is a leftover of its own earlier
    /// attempts (a create whose answer was lost or never recorded).
    async fn abort_leftovers(&self, file: &FileRecord) -> Result<usize, UploadError> {
        let base = object_key(&self.prefix, file)?;
        let open = match uploads::list_open(&self.store, &self.http, &self.url, key_stem(&base))
            .await
        {
            Ok(open) => open,
            // Some S3-compatible stores (s3s-fs among them) cannot list
            // multipart uploads: there, only the bucket's lifecycle rule
            // removes what a crash left open.
            Err(UploadError::Status { status: 501, .. }) => {
                if !self.said_no_listing.swap(true, Ordering::Relaxed) {
                    tracing::info!(target = %self.url, "the store does not list multipart uploads (ListMultipartUploads answers 501): an upload left open by a crash between its creation and its record is removed only by the bucket's lifecycle rule");
                }
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        let mut aborted = 0;
        for upload in open {
            let ours = upload.key == base
                || (1..=MAX_RENAMES).any(|n| renamed_key(&base, file.created_at, n) == upload.key);
            if ours {
                self.abort_upload(&upload.key, &upload.upload_id).await?;
                tracing::info!(file = %file.remote_name, key = %upload.key, upload_id = %upload.upload_id, "aborted a multipart upload left open by an earlier attempt");
                aborted += 1;
            }
        }
        Ok(aborted)
    }

    /// A multipart upload that cannot go on (its parts were cut with another
    /// part size, or the store lost some): aborted, and started again.
    async fn restart(&self, state: &State, why: &str) -> UploadError {
        if let Some(id) = &state.multipart
            && let Err(e) = self.abort_upload(&state.key, id).await
        {
            return e;
        }
        UploadError::Forgotten {
            url: self.url.clone(),
            message: format!("{why}; starting the upload of {:?} again", state.key),
        }
    }

    /// Deletes the object just completed at `key` from other bytes than our
    /// parts (its ETag is not the one our parts' MD5s give: the completion
    /// request, which carries no checksum, changed on the way and named
    /// other parts). It carries our size and SHA-256 metadata, so left there
    /// it would pass for the file; the upload starts again.
    async fn discard(&self, key: &str, found: Option<&str>, expected: &str) -> UploadError {
        const TRIES: usize = 3;
        let mut last = None;
        for _ in 0..TRIES {
            match self.store.delete(&location(key)).await {
                Ok(()) => {
                    return UploadError::Forgotten {
                        url: self.url.clone(),
                        message: format!(
                            "the store completed {key:?} from other parts than were sent (ETag {}, expected {expected}); deleted it",
                            found.unwrap_or("")
                        ),
                    };
                }
                Err(e) => last = Some(upload_error(&self.url, &e)),
            }
        }
        tracing::error!(%key, found = found.unwrap_or(""), %expected, "an object completed from other parts than were sent could not be deleted: it passes for the file; delete it by hand");
        last.expect("at least one try")
    }

    /// After the store answered NoSuchUpload: the upload was completed (our
    /// object is there) or forgotten.
    async fn completed_or_forgotten(
        &self,
        file: &FileRecord,
        key: &str,
    ) -> Result<Finished, UploadError> {
        self.completed_as(file, key, None).await
    }

    /// [`Self::completed_or_forgotten`], where the object completed from our
    /// parts must have the ETag `expected`, when known.
    async fn completed_as(
        &self,
        file: &FileRecord,
        key: &str,
        expected: Option<&str>,
    ) -> Result<Finished, UploadError> {
        match head(&self.store, &self.url, key).await? {
            Some(found) if found.is(file) => match expected {
                Some(expected) if e_tag_is_not(found.e_tag.as_deref(), expected) => {
                    Err(self.discard(key, found.e_tag.as_deref(), expected).await)
                }
                _ => Ok(Finished::Complete {
                    server_name: Some(key.to_owned()),
                }),
            },
            _ => Err(UploadError::Forgotten {
                url: self.url.clone(),
                message: format!("the store no longer knows the multipart upload of {key:?}"),
            }),
        }
    }
}

/// The part of `key` that it shares with its renamed candidates: all but the
/// last segment's extension.
fn key_stem(key: &str) -> &str {
    let name_at = key.rfind('/').map_or(0, |slash| slash + 1);
    match key[name_at..].rfind('.') {
        Some(dot) if dot > 0 => &key[..name_at + dot],
        _ => key,
    }
}

/// The MD5 of `data` (hex), computed on the blocking pool: a part is
/// megabytes.
async fn md5_off_executor(data: Vec<u8>) -> Result<(Vec<u8>, String), UploadError> {
    tokio::task::spawn_blocking(move || {
        let md5 = md5_hex(&data);
        (data, md5)
    })
    .await
    .map_err(|e| UploadError::Protocol {
        url: String::new(),
        message: format!("hashing a part failed: {e}"),
    })
}

fn complete(key: String) -> Sent {
    Sent::Complete {
        server_name: Some(key),
    }
}

fn describe(found: Option<&Head>) -> String {
    match found {
        None => "no object".to_owned(),
        Some(head) => format!(
            "{} bytes with SHA-256 {}",
            head.size,
            head.sha256.as_deref().unwrap_or("(none)")
        ),
    }
}

#[async_trait::async_trait]
impl Delivery for S3 {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn endpoint(&self) -> &str {
        &self.url
    }

    fn window(&self) -> usize {
        PART_WINDOW
    }

    fn min_piece_bytes(&self) -> u64 {
        self.part_size
    }

    /// A large file's key is chosen and its multipart upload created here,
    /// so that both are recorded before the first part. A small file needs
    /// no state: its single PUT is recognised by the object's SHA-256.
    async fn begin(
        &self,
        file: &FileRecord,
        state: Option<&str>,
    ) -> Result<Option<String>, UploadError> {
        if state.is_some() || !self.is_large(file) {
            return Ok(state.map(str::to_owned));
        }
        let (key, multipart) = match self.choose_key(file).await? {
            Chosen::Ours(key) => (key, None),
            Chosen::Free(key) => {
                self.abort_leftovers(file).await?;
                let options = PutMultipartOptions {
                    attributes: attributes(file),
                    ..PutMultipartOptions::default()
                };
                let id = self
                    .store
                    .create_multipart_opts(&location(&key), options)
                    .await
                    .map_err(|e| upload_error(&self.url, &e))?;
                tracing::debug!(file = %file.remote_name, %key, upload_id = %id, "multipart upload created");
                (key, Some(id))
            }
        };
        let state = State {
            v: 1,
            key,
            multipart,
            part_size: self.part_size,
        };
        Ok(Some(
            serde_json::to_string(&state).expect("a state serialises"),
        ))
    }

    /// Never `Complete` on the strength of a HEAD alone: our size and
    /// SHA-256 metadata are on an object whose body changed on the way too
    /// (moto keeps such a body), and only the bytes at hand can tell. A small
    /// file's PUT finds the object and checks its ETag against the bytes; a
    /// multipart upload's completion, asked again, checks the object's ETag
    /// against the recorded parts'.
    async fn resume(&self, _file: &FileRecord, state: Option<&str>) -> Result<Resume, UploadError> {
        if let Some(state) = state {
            let state = State::parse(&self.url, state)?;
            if state.part_size != self.part_size {
                if let Some(id) = &state.multipart {
                    self.abort_upload(&state.key, id).await?;
                }
                return Ok(Resume::Forgotten);
            }
        }
        Ok(Resume::Unknown)
    }

    async fn send(
        &self,
        file: &FileRecord,
        state: Option<&str>,
        piece: &Piece,
        data: Vec<u8>,
    ) -> Result<Sent, UploadError> {
        let Some(state) = state else {
            return self.put_small(file, data).await;
        };
        let state = State::parse(&self.url, state)?;
        if state.part_size != self.part_size {
            return Err(self.restart(&state, "part_size changed").await);
        }
        let Some(id) = &state.multipart else {
            // Our object was at the key when the upload began.
            return match head(&self.store, &self.url, &state.key).await? {
                Some(found) if found.is(file) => Ok(complete(state.key)),
                _ => Err(UploadError::Forgotten {
                    url: self.url.clone(),
                    message: format!("the object at {:?} changed", state.key),
                }),
            };
        };
        let (data, md5) = md5_off_executor(data).await?;
        let part = self
            .store
            .put_part(
                &location(&state.key),
                id,
                piece.index,
                PutPayload::from(data),
            )
            .await;
        match part {
            // A store that does not check checksums (moto) keeps a body
            // changed on the way; its ETag, the MD5 of what it kept, tells.
            // The part is not recorded, so the next attempt sends it again
            // under the same number, which replaces it.
            Ok(part) if self.changed_on_the_way(Some(part_e_tag(&part.content_id)), &md5) => {
                Err(UploadError::Protocol {
                    url: self.url.clone(),
                    message: format!(
                        "part {} of {:?} arrived with other bytes than were sent (ETag {}, not their MD5 {md5}); sending it again",
                        piece.index + 1,
                        state.key,
                        part_e_tag(&part.content_id)
                    ),
                })
            }
            Ok(part) => Ok(Sent::Acknowledged {
                ack: Some(part.content_id),
            }),
            Err(e) => {
                if !matches!(e, object_store::Error::NotFound { .. }) {
                    self.upload_refused(&state.key, &e).await?;
                }
                match self.completed_or_forgotten(file, &state.key).await? {
                    Finished::Complete { server_name } => Ok(Sent::Complete { server_name }),
                    Finished::NotYet => unreachable!("completed_or_forgotten never says not yet"),
                }
            }
        }
    }

    async fn finish(
        &self,
        file: &FileRecord,
        state: Option<&str>,
        acks: &[(Piece, Option<String>)],
    ) -> Result<Finished, UploadError> {
        let Some(state) = state else {
            // A small file's PUT answers with its confirmation.
            return Ok(Finished::NotYet);
        };
        let state = State::parse(&self.url, state)?;
        let Some(id) = &state.multipart else {
            return self.completed_or_forgotten(file, &state.key).await;
        };
        let mut parts = Vec::with_capacity(acks.len());
        for (piece, ack) in acks {
            match ack {
                Some(etag) if piece.index == parts.len() => parts.push(PartId {
                    content_id: etag.clone(),
                }),
                _ => return Err(self.restart(&state, "a part's ETag was not recorded").await),
            }
        }
        let expected = self.expected_multipart_e_tag(&parts);
        let key = location(&state.key);
        match self.store.complete_multipart(&key, id, parts).await {
            Ok(done) => match &expected {
                Some(expected) if e_tag_is_not(done.e_tag.as_deref(), expected) => Err(self
                    .discard(&state.key, done.e_tag.as_deref(), expected)
                    .await),
                _ => {
                    self.verify(file, &state.key).await?;
                    Ok(Finished::Complete {
                        server_name: Some(state.key),
                    })
                }
            },
            // A completion whose reply was lost answers NoSuchUpload when
            // asked again: the object tells.
            Err(object_store::Error::NotFound { .. }) => {
                self.completed_as(file, &state.key, expected.as_deref())
                    .await
            }
            Err(e) => match upload_error(&self.url, &e) {
                UploadError::Status { error, .. } if error.starts_with("InvalidPart") => Err(self
                    .restart(&state, "the store lost parts of the upload")
                    .await),
                _ => {
                    self.upload_refused(&state.key, &e).await?;
                    self.completed_as(file, &state.key, expected.as_deref())
                        .await
                }
            },
        }
    }

    async fn abort(&self, file: &FileRecord, state: Option<&str>) -> Result<(), UploadError> {
        let Some(state) = state else {
            // Killed before its upload was recorded, the file may still have
            // one open.
            if self.is_large(file) {
                self.abort_leftovers(file).await?;
            }
            return Ok(());
        };
        let state = State::parse(&self.url, state)?;
        match &state.multipart {
            Some(id) => self.abort_upload(&state.key, id).await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3() -> S3 {
        let mut s3 = S3Target::new("s3://bucket/in/").unwrap();
        s3.endpoint = Some("http://127.0.0.1:9".into());
        s3.region = Some("us-east-1".into());
        S3::new(&TargetConfig::new("t", "s3://bucket/in/"), &s3).unwrap()
    }

    #[test]
    fn an_e_tag_tells_a_changed_body_only_once_the_store_has_shown_md5_e_tags() {
        let md5 = md5_hex(b"part");
        let other = md5_hex(b"other");
        // Unknown yet: a mismatch is a changed body, up to the limit; then
        // the store is taken to give other ETags, and they tell nothing.
        let kms = s3();
        for _ in 1..UNMATCHED_ETAGS {
            assert!(kms.changed_on_the_way(Some(&other), &md5));
        }
        assert!(!kms.changed_on_the_way(Some(&other), &md5));
        assert!(!kms.changed_on_the_way(Some(&other), &md5));
        assert_eq!(kms.expected_multipart_e_tag(&[]), None);
        // One ETag that is the MD5 settles it: every mismatch after that is
        // a changed body, however many.
        let plain = s3();
        assert!(!plain.changed_on_the_way(Some(&format!("\"{md5}\"")), &md5));
        for _ in 0..2 * UNMATCHED_ETAGS {
            assert!(plain.changed_on_the_way(Some(&other), &md5));
        }
        // An ETag of no MD5 shape says nothing either way.
        assert!(!plain.changed_on_the_way(Some("\"abc-2\""), &md5));
        let part = PartId {
            content_id: format!("<PartMetadata><e_tag>\"{md5}\"</e_tag></PartMetadata>"),
        };
        assert_eq!(
            plain.expected_multipart_e_tag(std::slice::from_ref(&part)),
            multipart_e_tag([md5.as_str()])
        );
    }

    #[test]
    fn a_key_stem_is_what_its_renamed_candidates_start_with() {
        for key in [
            "in/a.tar.gz",
            "in/a.csv",
            "noext",
            "d.x/.hidden",
            "d.x/noext",
        ] {
            let stem = key_stem(key);
            assert!(key.starts_with(stem), "{key}");
            assert!(renamed_key(key, 7, 1).starts_with(stem), "{key}");
            assert!(renamed_key(key, 7, 42).starts_with(stem), "{key}");
        }
        assert_eq!(key_stem("in/a.tar.gz"), "in/a.tar");
        assert_eq!(key_stem("d.x/noext"), "d.x/noext");
    }
}
