//! tus 1.0.0 on the receiver (`[server] tus_path`, `/files/` by default), so
//! that any tus client (tus-js-client and Uppy in browsers, tuspy, TUSKit...)
//! uploads with the receiver's guarantees: the same keys, path modes, staging,
//! verification and rename into place without replacing a file.
//!
//! Supported: the core protocol and the `creation`, `creation-with-upload`,
//! `creation-defer-length`, `termination`, `expiration` and `checksum`
//! (sha1, sha256) extensions. A tus upload is recorded in the receiver's state
//! next to the resumable extension's uploads (see `state::tus`) and staged
//! the same way; `write` writes and records its bytes, and completes it the
//! moment its offset reaches its length: the `filename` of its metadata goes
//! through the path mode like `X-File-Name`, and the `sha256` of its
//! metadata, when sent, is checked before the rename. A completed upload
//! keeps answering HEAD with its full offset until it expires, so a client
//! whose last reply was lost learns that it is done; expiry, recovery after a
//! crash and the staging sweep are those of every upload.
//!
//! The routes have their own CORS headers, since browsers must read the tus
//! headers of replies, and OPTIONS answers with the server's capabilities
//! without a key (a browser's preflight carries none).

#[doc(hidden)]
pub(super) mod fuzzing;
mod headers;
mod write;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{head, post};

use super::errors::ApiError;
use super::headers::within_declared_limit;
use super::serve::Authorized;
use super::state::{NewTusUpload, TusUpload, UploadPhase};
use super::{Receiver, blocking};
use crate::protocol;
use headers::{
    METHOD_OVERRIDE, TUS_CHECKSUM_ALGORITHM, TUS_EXTENSION, TUS_MAX_SIZE, TUS_RESUMABLE,
    TUS_VERSION, UPLOAD_CONCAT, UPLOAD_DEFER_LENGTH, UPLOAD_EXPIRES, UPLOAD_LENGTH,
    UPLOAD_METADATA, UPLOAD_OFFSET, VERSION,
};

/// The extensions announced by OPTIONS.
const EXTENSIONS: &str =
    "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum";

/// The tus routes at the receiver's `tus_path`, none when it is empty. They
/// are merged after the receiver's own CORS layer, and carry their own.
pub(super) fn routes(receiver: &Receiver) -> Router<Receiver> {
    let base = receiver.inner.tus_path.as_str();
    if base.is_empty() {
        return Router::new();
    }
    let collection = post(create).options(options);
    Router::new()
        .route(base, collection.clone())
        .route(base.trim_end_matches('/'), collection)
        .route(
            &format!("{base}{{upload_id}}"),
            head(status)
                .patch(patch)
                .delete(terminate)
                .post(overridden)
                .options(options),
        )
        .route_layer(middleware::from_fn_with_state(
            receiver.clone(),
            super::serve::authenticate_except_options,
        ))
        .layer(middleware::from_fn(cors))
}

/// Completes the tus uploads whose bytes were all recorded when the receiver
/// stopped, before it sealed them for completion: the file is renamed into
/// place at start-up, as every other upload interrupted at the end, rather
/// than when the client next asks with HEAD (a client whose last PATCH got
/// no reply may never ask). Runs before the recovery of sealed uploads.
pub(super) async fn recover(receiver: &Receiver) {
    let state = receiver.inner.state.clone();
    let ids = match blocking(move || state.unsealed_tus()).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!(error = %e.message(), "cannot list the tus uploads left complete but unsealed");
            return;
        }
    };
    for upload_id in ids {
        // The lock of its PATCHes: a HEAD that completes it too waits.
        let _lock = receiver.inner.locks.lock(format!("{upload_id}#0")).await;
        match write::complete(receiver, &upload_id).await {
            Ok(name) => {
                tracing::info!(upload_id = %upload_id, file = %name, "recovered tus upload completed")
            }
            Err(e) => {
                tracing::warn!(upload_id = %upload_id, error = %e.message, "recovered tus upload could not be completed")
            }
        }
    }
}

/// A refused tus request: its status and a message in plain text, which tus
/// clients show in their errors.
#[derive(Debug)]
pub(super) struct TusError {
    status: StatusCode,
    message: String,
}

impl TusError {
    fn new(status: StatusCode, message: String) -> TusError {
        TusError { status, message }
    }

    fn bad_request(message: String) -> TusError {
        TusError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(upload_id: &str) -> TusError {
        TusError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no tus upload {upload_id:?} here (never created, terminated, or expired); create it again"
            ),
        )
    }
}

impl From<ApiError> for TusError {
    fn from(e: ApiError) -> TusError {
        TusError::new(e.status(), e.message())
    }
}

impl IntoResponse for TusError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "tus request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), error = %self.message, "tus request refused");
        }
        let mut response = (self.status, format!("{}\n", self.message)).into_response();
        if self.status == StatusCode::PRECONDITION_FAILED {
            response
                .headers_mut()
                .insert(TUS_VERSION, HeaderValue::from_static(VERSION));
        }
        response
    }
}

/// CORS for browsers and `Tus-Resumable` on every reply.
async fn cors(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    crate::metrics::count_receiver_reply(response.status().as_u16());
    let h = response.headers_mut();
    h.insert(TUS_RESUMABLE, HeaderValue::from_static(VERSION));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, HEAD, PATCH, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "Authorization, Content-Type, Origin, X-Requested-With, X-HTTP-Method-Override, Tus-Resumable, Upload-Length, Upload-Offset, Upload-Metadata, Upload-Defer-Length, Upload-Checksum, Upload-Concat",
        ),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "Location, Upload-Offset, Upload-Length, Upload-Defer-Length, Upload-Metadata, Upload-Expires, Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm",
        ),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}

/// `OPTIONS`: the server's version, extensions and limits; also the answer
/// to a browser's preflight.
async fn options(State(receiver): State<Receiver>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(TUS_VERSION, HeaderValue::from_static(VERSION));
    h.insert(TUS_EXTENSION, HeaderValue::from_static(EXTENSIONS));
    h.insert(
        TUS_CHECKSUM_ALGORITHM,
        HeaderValue::from_static("sha1,sha256"),
    );
    if receiver.inner.max_file_bytes > 0 {
        h.insert(
            TUS_MAX_SIZE,
            HeaderValue::from(receiver.inner.max_file_bytes),
        );
    }
    response
}

/// `POST <tus_path>` (creation): records a new upload and answers 201 with its
/// `Location`; with `Content-Type: application/offset+octet-stream` the body
/// is the upload's first bytes (creation-with-upload).
async fn create(
    State(receiver): State<Receiver>,
    sender: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, TusError> {
    headers::check_version(&headers)?;
    if headers.contains_key(UPLOAD_CONCAT) {
        return Err(TusError::bad_request(
            "the concatenation extension is not supported; upload the file as one upload"
                .to_owned(),
        ));
    }
    let inner = &receiver.inner;
    let length = headers::new_upload_length(&headers)?;
    if let Some(length) = length {
        let max = match inner.max_file_bytes {
            0 => i64::MAX as u64,
            max => max,
        };
        if length > max {
            return Err(TusError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "Upload-Length {length} is over Tus-Max-Size {max} (server max_file_bytes); nothing was created"
                ),
            ));
        }
    }
    let raw_metadata = match headers.get(UPLOAD_METADATA) {
        None => String::new(),
        Some(v) => v
            .to_str()
            .map_err(|_| TusError::bad_request("Upload-Metadata is not ASCII text".to_owned()))?
            .to_owned(),
    };
    let metadata = headers::metadata(&raw_metadata)?;
    let client_name = metadata
        .filename
        .unwrap_or_else(|| protocol::DEFAULT_FILE_NAME.to_owned());
    // Refuse a bad name before anything is stored.
    receiver.destination(&client_name)?;
    let with_bytes = headers::carries_bytes(&headers);
    let checksum = if with_bytes {
        headers::checksum(&headers)?
    } else {
        None
    };
    let declared_len = super::headers::content_length(&headers);
    let Some(body) = within_declared_limit(&headers, body, inner.max_chunk_bytes).await else {
        return Err(chunk_too_large(inner.max_chunk_bytes));
    };

    let upload_id = protocol::new_upload_id();
    let this = receiver.clone();
    let (id, declared_sha256) = (upload_id.clone(), metadata.sha256.clone());
    let named_client = sender.client.clone();
    blocking(move || {
        let size = length.unwrap_or(0);
        this.check_room(size).map_err(|e| match e {
            ApiError::InsufficientStorage(_) => ApiError::InsufficientStorage(format!(
                "Upload-Length {size} is more than the space free on the receiver's disk; nothing was created, upload the file once space is freed"
            )),
            e => e,
        })?;
        this.inner.state.create_tus(
            &id,
            &NewTusUpload {
                client_name: &client_name,
                named_client: named_client.as_deref(),
                length,
                metadata: &raw_metadata,
                declared_sha256: declared_sha256.as_deref(),
            },
        )?;
        Ok::<_, ApiError>(())
    })
    .await?;
    tracing::debug!(upload_id = %upload_id, ?length, "tus upload created");
    let lock = inner.locks.lock(format!("{upload_id}#0")).await;
    let upload = read_upload(&receiver, &upload_id).await?;
    let written = if with_bytes {
        write::write_patch(
            &receiver,
            &upload_id,
            &upload,
            lock,
            checksum,
            declared_len,
            body,
        )
        .await?
    } else {
        write::Written { offset: 0, lock }
    };
    if length == Some(written.offset) {
        write::complete(&receiver, &upload_id).await?;
    }
    drop(written.lock);
    let upload = read_upload(&receiver, &upload_id).await?;
    let mut response = StatusCode::CREATED.into_response();
    let location = format!("{}{upload_id}", inner.tus_path);
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::try_from(location).expect("the tus path and the id are plain ASCII"),
    );
    upload_headers(&receiver, &upload, response.headers_mut(), false);
    Ok(response)
}

/// `HEAD <tus_path><id>`: the upload's offset and length. An upload whose
/// bytes are all in but whose completion a crash interrupted is completed
/// first, so that the answer is the truth.
async fn status(
    State(receiver): State<Receiver>,
    UrlPath(upload_id): UrlPath<String>,
    _: Authorized,
    headers: HeaderMap,
) -> Result<Response, TusError> {
    headers::check_version(&headers)?;
    let mut upload = find_upload(&receiver, &upload_id).await?;
    let unfinished = upload.phase == UploadPhase::Finalizing
        || (upload.phase == UploadPhase::Receiving && upload.length == Some(upload.offset));
    if unfinished {
        let _lock = receiver.inner.locks.lock(format!("{upload_id}#0")).await;
        write::complete(&receiver, &upload_id).await?;
        upload = find_upload(&receiver, &upload_id).await?;
    }
    let mut response = StatusCode::OK.into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    upload_headers(&receiver, &upload, h, true);
    Ok(response)
}

/// `PATCH <tus_path><id>`: bytes at `Upload-Offset`, which must be the
/// upload's offset (409 otherwise); 204 with the new offset once they are
/// durable.
async fn patch(
    State(receiver): State<Receiver>,
    UrlPath(upload_id): UrlPath<String>,
    _: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, TusError> {
    headers::check_version(&headers)?;
    if !headers::carries_bytes(&headers) {
        return Err(TusError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "a PATCH must have Content-Type: {}",
                headers::OFFSET_OCTET_STREAM
            ),
        ));
    }
    let Some(offset) = headers::number(&headers, UPLOAD_OFFSET)? else {
        return Err(TusError::bad_request(
            "header Upload-Offset is required".to_owned(),
        ));
    };
    let new_length = headers::number(&headers, UPLOAD_LENGTH)?;
    let checksum = headers::checksum(&headers)?;
    let inner = &receiver.inner;
    let declared_len = super::headers::content_length(&headers);
    let Some(body) = within_declared_limit(&headers, body, inner.max_chunk_bytes).await else {
        return Err(chunk_too_large(inner.max_chunk_bytes));
    };
    // The upload must exist before anything waits for its lock.
    find_upload(&receiver, &upload_id).await?;
    let lock = inner.locks.lock(format!("{upload_id}#0")).await;
    let mut upload = find_upload(&receiver, &upload_id).await?;
    if offset != upload.offset {
        return Err(TusError::new(
            StatusCode::CONFLICT,
            format!(
                "Upload-Offset {offset} is not the upload's offset {}; ask with HEAD and continue from there",
                upload.offset
            ),
        ));
    }
    if let Some(length) = new_length {
        set_length(&receiver, &upload_id, &mut upload, length).await?;
    }
    let written = write::write_patch(
        &receiver,
        &upload_id,
        &upload,
        lock,
        checksum,
        declared_len,
        body,
    )
    .await?;
    let upload = find_upload(&receiver, &upload_id).await?;
    let upload = if upload.phase == UploadPhase::Receiving && upload.length == Some(upload.offset) {
        write::complete(&receiver, &upload_id).await?;
        find_upload(&receiver, &upload_id).await?
    } else {
        upload
    };
    drop(written.lock);
    let mut response = StatusCode::NO_CONTENT.into_response();
    upload_headers(&receiver, &upload, response.headers_mut(), false);
    Ok(response)
}

/// `DELETE <tus_path><id>` (termination): forgets the upload and its staged
/// bytes. A completed upload's file stays where it was delivered: only the
/// record goes.
async fn terminate(
    State(receiver): State<Receiver>,
    UrlPath(upload_id): UrlPath<String>,
    _: Authorized,
    headers: HeaderMap,
) -> Result<Response, TusError> {
    headers::check_version(&headers)?;
    find_upload(&receiver, &upload_id).await?;
    let _locks = receiver
        .inner
        .locks
        .lock_uploads([upload_id.as_str()])
        .await;
    let upload = find_upload(&receiver, &upload_id).await?;
    let this = receiver.clone();
    let id = upload_id.clone();
    blocking(move || {
        // A completion a crash interrupted is finished first: its final name
        // is recorded, and the file may already be there.
        if upload.phase == UploadPhase::Finalizing {
            this.finalize_blocking(&id)?;
        }
        this.inner.state.forget_upload(&id)?;
        if upload.phase == UploadPhase::Receiving {
            this.discard_staged(&id);
        }
        Ok::<_, ApiError>(())
    })
    .await?;
    tracing::info!(upload_id = %upload_id, "tus upload terminated");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST <tus_path><id>` with `X-HTTP-Method-Override: PATCH` or `DELETE`,
/// for clients that cannot send those methods.
async fn overridden(
    receiver: State<Receiver>,
    upload_id: UrlPath<String>,
    authorized: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, TusError> {
    let method = headers
        .get(METHOD_OVERRIDE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_uppercase);
    match method.as_deref() {
        Some("PATCH") => patch(receiver, upload_id, authorized, headers, body).await,
        Some("DELETE") => terminate(receiver, upload_id, authorized, headers).await,
        _ => Err(TusError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST creates uploads at the tus path itself; an upload takes HEAD, PATCH and DELETE (or POST with X-HTTP-Method-Override)".to_owned(),
        )),
    }
}

/// Records the length of an upload created with `Upload-Defer-Length`.
async fn set_length(
    receiver: &Receiver,
    upload_id: &str,
    upload: &mut TusUpload,
    length: u64,
) -> Result<(), TusError> {
    match upload.length {
        Some(known) if known == length => return Ok(()),
        Some(known) => {
            return Err(TusError::bad_request(format!(
                "Upload-Length {length} differs from the upload's length {known}, which cannot change"
            )));
        }
        None => {}
    }
    let max = match receiver.inner.max_file_bytes {
        0 => i64::MAX as u64,
        max => max,
    };
    if length > max {
        return Err(TusError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Upload-Length {length} is over Tus-Max-Size {max} (server max_file_bytes)"),
        ));
    }
    if length < upload.offset {
        return Err(TusError::bad_request(format!(
            "Upload-Length {length} is less than the {} bytes already received",
            upload.offset
        )));
    }
    let this = receiver.clone();
    let id = upload_id.to_owned();
    let offset = upload.offset;
    blocking(move || {
        this.check_room(length - offset)?;
        Ok::<_, ApiError>(this.inner.state.set_tus_length(&id, length)?)
    })
    .await?;
    upload.length = Some(length);
    Ok(())
}

/// The upload's offset, length (or that it is deferred), metadata and, until
/// it is complete, when it expires.
fn upload_headers(receiver: &Receiver, upload: &TusUpload, h: &mut HeaderMap, with_metadata: bool) {
    h.insert(UPLOAD_OFFSET, HeaderValue::from(upload.offset));
    match upload.length {
        Some(length) => h.insert(UPLOAD_LENGTH, HeaderValue::from(length)),
        None => h.insert(UPLOAD_DEFER_LENGTH, HeaderValue::from_static("1")),
    };
    if with_metadata
        && !upload.metadata.is_empty()
        && let Ok(v) = HeaderValue::try_from(upload.metadata.as_str())
    {
        h.insert(UPLOAD_METADATA, v);
    }
    if upload.phase == UploadPhase::Receiving {
        let expires = upload.updated_at + receiver.inner.incomplete_expiry.as_secs() as i64;
        if let Ok(v) = HeaderValue::try_from(headers::http_date(expires)) {
            h.insert(UPLOAD_EXPIRES, v);
        }
    }
}

/// The tus upload `upload_id`, or 404.
async fn find_upload(receiver: &Receiver, upload_id: &str) -> Result<TusUpload, TusError> {
    if !protocol::is_valid_upload_id(upload_id) {
        return Err(TusError::not_found(upload_id));
    }
    read_upload(receiver, upload_id).await
}

async fn read_upload(receiver: &Receiver, upload_id: &str) -> Result<TusUpload, TusError> {
    let state = receiver.inner.state.clone();
    let id = upload_id.to_owned();
    blocking(move || state.tus_upload(&id))
        .await?
        .ok_or_else(|| TusError::not_found(upload_id))
}

fn chunk_too_large(limit: u64) -> TusError {
    TusError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "a request body may be at most {limit} bytes (server max_chunk_bytes); nothing was written, send smaller chunks (tus-js-client: chunkSize)"
        ),
    )
}
