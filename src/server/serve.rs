//! Serving the receiver: the routes, the checks every upload route shares
//! (the API key, the CORS headers), the HTTP/1 connections on a listener, the
//! background recovery and expiry, and the graceful shutdown. With TLS
//! configured, each accepted connection does its handshake in its own task
//! (see `tls`) before HTTP is served on it. A configuration
//! reload swaps the [`Receiver`] that new connections get without closing the
//! listener.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Receiver;
use super::admission::{AcceptFailures, Slots};
use super::audit::{self, Peer, REFUSED_KEYS};
use super::batch::receive_batch;
use super::errors::{ApiError, ServerError, too_large_chunk};
use super::headers::{content_length, header_str, number, parse_extension, within_declared_limit};
use super::resumable::{receive_resumable, upload_status};
use super::tls::{self, ClientCertificate};
use super::v1::receive_v1;
use crate::config::normalize_subject;
use crate::protocol;

impl Receiver {
    /// The axum application.
    fn router(&self) -> Router {
        Router::new()
            .route("/upload", post(upload))
            .route("/upload/batch", post(receive_batch))
            .route("/upload/{upload_id}", get(upload_status))
            .route_layer(middleware::from_fn_with_state(self.clone(), authenticate))
            .route("/health", get(health))
            .fallback(not_found)
            .layer(middleware::from_fn(cors))
            .merge(super::tus::routes(self))
            .with_state(self.clone())
    }

    /// Who sent a request: the named client whose key (and, when it names
    /// one, certificate subject) it carries, or a holder of one of the
    /// unnamed `api_keys`; `None` when neither. Keys are compared in
    /// constant time, named clients' by their SHA-256.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        certificate: Option<&ClientCertificate>,
    ) -> Option<Authorized> {
        let given = headers
            .get(protocol::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))?;
        let given_sha256: [u8; 32] = Sha256::digest(given).into();
        let mut named = None;
        for client in &self.inner.clients {
            if bool::from(client.key_sha256.ct_eq(&given_sha256)) {
                named = Some(client);
            }
        }
        if let Some(client) = named {
            if let Some(want) = &client.cert_subject {
                let subject = certificate.map(|c| normalize_subject(&c.subject));
                if subject.as_deref() != Some(want.as_str()) {
                    tracing::info!(client = %client.name, certificate_subject = ?subject, expected = %want, "refused a named client's key: its certificate subject does not match cert_subject");
                    return None;
                }
            }
            return Some(Authorized {
                client: Some(client.name.clone()),
            });
        }
        let unnamed = self
            .inner
            .keys
            .iter()
            .fold(0u8, |ok, key| ok | key.as_slice().ct_eq(given).unwrap_u8());
        (unnamed == 1).then_some(Authorized { client: None })
    }
}

/// Proof that a request carries a valid API key, and whose it is (`None`
/// for the unnamed `api_keys`). The `authenticate` layer of the protected
/// routes adds it; handlers take it as an argument.
#[derive(Clone, Debug)]
pub(super) struct Authorized {
    pub(super) client: Option<String>,
}

impl FromRequestParts<Receiver> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &Receiver) -> Result<Authorized, ApiError> {
        parts
            .extensions
            .get::<Authorized>()
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

/// [`authenticate`] for the tus routes: a browser's CORS preflight and the
/// tus `OPTIONS` discovery carry no key and need none.
pub(super) async fn authenticate_except_options(
    state: State<Receiver>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() == Method::OPTIONS {
        return next.run(request).await;
    }
    authenticate(state, request, next).await
}

/// The layer in front of every protected route: answers 429 to an address
/// serving a penalty for bad keys, 401 to a request without a valid key
/// (before its body is read), and runs the others in a span that names
/// their client, so that every log line about the request says whose it is.
async fn authenticate(
    State(receiver): State<Receiver>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request.extensions().get::<Peer>().map(|p| p.0);
    if let Some(wait) = REFUSED_KEYS.penalty_left(peer) {
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(serde_json::json!({
                "error": "Too many requests",
                "message": "too many requests without a valid API key from this address; wait for Retry-After seconds",
            })),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs()));
        return response;
    }
    let certificate = request.extensions().get::<ClientCertificate>();
    let Some(sender) = receiver.authenticate(request.headers(), certificate) else {
        REFUSED_KEYS.refused(peer, request.uri().path());
        return ApiError::Unauthorized.into_response();
    };
    REFUSED_KEYS.accepted(peer);
    let span = match &sender.client {
        Some(name) => {
            crate::metrics::count_client_request(name);
            tracing::info_span!("client", client = %name)
        }
        None => tracing::Span::none(),
    };
    request.extensions_mut().insert(sender);
    next.run(request).instrument(span).await
}

/// Serves `listener` until `shutdown` is cancelled, then lets in-flight
/// requests finish for up to `grace`. Each new connection is served by the
/// receiver current in `receivers`, so a configuration reload (keys, path mode, limits) takes effect
/// without closing the listener or dropping requests in flight.
pub async fn serve_reloadable(
    listener: TcpListener,
    mut receivers: tokio::sync::watch::Receiver<Receiver>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut receiver = receivers.borrow_and_update().clone();
    let mut router = receiver.router();
    let maintenance = {
        let mut receivers = receivers.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut current = receivers.borrow_and_update().clone();
            super::tus::recover(&current).await;
            current.recover().await;
            loop {
                current.expire().await;
                let period = (current.inner.incomplete_expiry / 4)
                    .clamp(Duration::from_secs(1), Duration::from_secs(600));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(period) => {}
                    changed = receivers.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        current = receivers.borrow_and_update().clone();
                        super::tus::recover(&current).await;
                        current.recover().await;
                    }
                }
            }
        })
    };
    // Logs the counted refusals every interval, and once more at shutdown.
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(audit::INTERVAL);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = every.tick() => REFUSED_KEYS.flush(),
                }
            }
            REFUSED_KEYS.flush();
        });
    }
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut slots = Slots::new(receiver.inner.max_connections);
    let mut accept_failures = AcceptFailures::default();
    loop {
        // With every slot taken, nothing is accepted: further clients wait
        // in the listen backlog until a connection closes.
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.acquire() => slot,
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    accept_failures.failed(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if receivers.has_changed().unwrap_or(false) {
            receiver = receivers.borrow_and_update().clone();
            router = receiver.router();
            slots.resize(receiver.inner.max_connections);
        }
        let connection = Connection {
            router: router.clone(),
            peer,
            read_timeout: receiver.inner.read_timeout,
            watcher: graceful.watcher(),
        };
        let tls = receiver.inner.tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Some(tls) = tls else {
                return connection.serve(stream, None).await;
            };
            // The handshake runs here, not in the accept loop: a client that
            // stays silent holds only its own slot, and for the read timeout.
            let handshake = tokio::select! {
                _ = shutdown.cancelled() => return,
                handshake = tokio::time::timeout(connection.read_timeout, tls.accept(stream).into_fallible()) => handshake,
            };
            match handshake {
                Ok(Ok(stream)) => {
                    let certificate = tls::client_certificate(&stream);
                    if let Some(certificate) = &certificate {
                        tracing::debug!(%peer, subject = %certificate.subject, "client certificate accepted");
                    }
                    connection.serve(stream, certificate).await
                }
                Ok(Err((e, stream))) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    linger(stream).await;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
    drop(listener);
    maintenance.abort();
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("all connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!(?grace, "in-flight requests did not finish within the grace period; abandoning them"),
    }
}

/// Closes a connection whose handshake failed without resetting it. In TLS
/// 1.3 a client finishes its side of the handshake before the receiver has
/// checked its certificate, and sends its request at once. Closing with that
/// request unread makes the kernel answer with a reset, which can overtake
/// the alert that says why (certificate required, unknown CA), and the client
/// then reports "connection reset" instead of the reason. So: end the
/// receiver's side, then read and discard until the client closes, for at
/// most a second. The task holds no thread while it waits.
async fn linger(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 8192];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// What serving one accepted connection needs.
struct Connection {
    router: Router,
    peer: SocketAddr,
    read_timeout: Duration,
    watcher: hyper_util::server::graceful::Watcher,
}

impl Connection {
    /// Serves HTTP/1 on `io` (a TCP stream, or a TLS stream after its
    /// handshake) until the client closes it or a graceful shutdown ends it.
    async fn serve<I>(self, io: I, certificate: Option<ClientCertificate>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.read_timeout)
            .keep_alive(true)
            // What a connection reads at once, and keeps between requests:
            // see `body` for why 64 KiB.
            .max_buf_size(super::body::READ_BUFFER);
        let peer = self.peer;
        let service = tower::ServiceExt::map_request(
            self.router,
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(Peer(peer));
                if let Some(certificate) = &certificate {
                    request.extensions_mut().insert(certificate.clone());
                }
                request
            },
        );
        let service = hyper_util::service::TowerToHyperService::new(service);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        if let Err(e) = self.watcher.watch(conn).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// Binds the listener for `addr`, with a message that says what to do on failure.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Adds the CORS headers the original sends, answers preflight requests, and
/// announces the resumable extension on upload routes.
async fn cors(request: Request, next: Next) -> Response {
    let preflight = request.method() == Method::OPTIONS;
    let upload_route = request.uri().path().starts_with("/upload");
    let mut response = if preflight {
        StatusCode::OK.into_response()
    } else {
        next.run(request).await
    };
    crate::metrics::count_receiver_reply(response.status().as_u16());
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "Content-Type, Authorization, X-Chunk-Index, X-File-Name, X-Upload-Id, X-Chunk-Offset, X-Chunk-Sha256, X-Chunk-Crc32c, X-File-Size, X-Chunk-Count, X-File-Sha256, X-Manifest-Length",
        ),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "X-IndexedCP-Resumable, X-IndexedCP-Batch, X-IndexedCP-Streaming, X-IndexedCP-Crc32c",
        ),
    );
    if upload_route {
        h.insert(protocol::RESUMABLE, HeaderValue::from_static("1"));
        h.insert(protocol::STREAMING, HeaderValue::from_static("1"));
        h.insert(protocol::CRC32C, HeaderValue::from_static("1"));
        h.insert(
            protocol::BATCH,
            HeaderValue::from(protocol::MAX_BATCH_FILES),
        );
    }
    response
}

async fn health() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// `POST /upload`: one chunk, of the resumable extension when it carries
/// `X-Upload-Id`, of a v1 upload otherwise.
async fn upload(
    State(receiver): State<Receiver>,
    sender: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let file_name = header_str(&headers, protocol::FILE_NAME)
        .map_err(|_| ApiError::InvalidName("Filename must be valid UTF-8".to_owned()))?
        .unwrap_or(protocol::DEFAULT_FILE_NAME);
    let client_name = receiver.recorded_name(&sender, file_name);
    let chunk_idx = match header_str(&headers, protocol::CHUNK_INDEX)? {
        None => 0,
        Some(v) => number("X-Chunk-Index", v)?,
    };
    let Some(body) = within_declared_limit(&headers, body, receiver.inner.max_chunk_bytes).await
    else {
        return Err(too_large_chunk(receiver.inner.max_chunk_bytes));
    };
    match header_str(&headers, protocol::UPLOAD_ID)? {
        Some(upload_id) => {
            let ext = parse_extension(&headers, upload_id, &client_name, chunk_idx)?;
            receive_resumable(
                receiver,
                sender,
                ext,
                chunk_idx,
                content_length(&headers),
                body,
            )
            .await
        }
        None => receive_v1(receiver, client_name, chunk_idx, body).await,
    }
}
