//! Scenario 5 of the fault-injection suite: the receiver answers 503 for a while, then 429 with
//! `Retry-After`, then 401 until the agent's key is fixed and it gets SIGHUP:
//! everything is delivered, and the buffer holds the files throughout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::fixtures::*;
use crate::support::*;

const UNAVAILABLE: u8 = 0;
const TOO_MANY: u8 = 1;
const FORWARD: u8 = 2;

struct Front {
    mode: AtomicU8,
    upstream: String,
    client: reqwest::Client,
    refused: [AtomicUsize; 2],
}

async fn front(
    State(front): State<Arc<Front>>,
    uri: axum::http::Uri,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match front.mode.load(Ordering::SeqCst) {
        UNAVAILABLE => {
            front.refused[0].fetch_add(1, Ordering::SeqCst);
            (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response()
        }
        TOO_MANY => {
            front.refused[1].fetch_add(1, Ordering::SeqCst);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                "slow down",
            )
                .into_response()
        }
        _ => {
            let mut request = front
                .client
                .request(method, format!("{}{}", front.upstream, uri.path()))
                .body(body);
            for (name, value) in &headers {
                if name != "host" && name != "content-length" {
                    request = request.header(name, value);
                }
            }
            let reply = request.send().await.unwrap();
            let status = reply.status();
            let resumable = reply.headers().get("x-indexedcp-resumable").cloned();
            let bytes = reply.bytes().await.unwrap();
            let mut response = (status, bytes).into_response();
            if let Some(v) = resumable {
                response.headers_mut().insert("x-indexedcp-resumable", v);
            }
            response
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unavailable_then_throttled_then_wrong_key_then_fixed_by_sighup() {
    let (dir, out, spool, staging) = agent_dirs();
    let receiver = Server::start(&out, &[]).await;
    let state = Arc::new(Front {
        mode: AtomicU8::new(UNAVAILABLE),
        upstream: receiver.url.clone(),
        client: reqwest::Client::new(),
        refused: [AtomicUsize::new(0), AtomicUsize::new(0)],
    });
    let app = axum::Router::new()
        .fallback(front)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/upload", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let config = agent_config(
        dir.path(),
        &url,
        &spool,
        "",
        "max_retry_delay = \"30s\"\ninitial_retry_delay = \"100ms\"",
    );
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace(KEY, "a-wrong-key-123456")).unwrap();
    let mut daemon = Daemon::start(&config);
    let mut files = BTreeMap::new();
    for i in 0..8 {
        let rel = format!("outage-{i}.bin");
        files.insert(rel.clone(), pseudo_random(i * 40_000 + 1, i as u64));
        drop_file(&staging, &spool, &rel, &files[&rel]);
    }
    eventually(Duration::from_secs(30), "503s", async || {
        (state.refused[0].load(Ordering::SeqCst) >= 10).then_some(())
    })
    .await;
    assert_eq!(
        status_json(&config)
            .iter()
            .filter(|f| f["state"] == "queued")
            .count(),
        8,
        "the buffer holds every file"
    );
    state.mode.store(TOO_MANY, Ordering::SeqCst);
    eventually(Duration::from_secs(30), "429s", async || {
        (state.refused[1].load(Ordering::SeqCst) >= 5).then_some(())
    })
    .await;
    state.mode.store(FORWARD, Ordering::SeqCst);
    // The receiver refuses the wrong key (401): retried at the maximum delay,
    // nothing parked, nothing lost.
    eventually(Duration::from_secs(30), "401s recorded", async || {
        status_json(&config)
            .iter()
            .any(|f| f["last_error"].as_str().is_some_and(|e| e.contains("401")))
            .then_some(())
    })
    .await;
    let listing = status_json(&config);
    assert_eq!(listing.len(), 8);
    assert!(
        listing.iter().all(|f| f["state"] == "queued"),
        "{listing:?}"
    );
    assert!(visible_files(&out).is_empty());
    std::fs::write(&config, &good).unwrap();
    unsafe_kill(daemon.child.id(), 1);
    // The 401s earned a 30 s delay; a reload that changes the target makes its
    // files due at once.
    wait_for_files(&out, &files, Duration::from_secs(15)).await;
    eventually(
        Duration::from_secs(20),
        "every file confirmed",
        async || {
            status_json(&config)
                .iter()
                .all(|f| f["state"] == "confirmed")
                .then_some(())
        },
    )
    .await;
    println!(
        "scenario 5: {} x 503, {} x 429, then 401 until SIGHUP: lost 0, duplicated 0, corrupted 0",
        state.refused[0].load(Ordering::SeqCst),
        state.refused[1].load(Ordering::SeqCst)
    );
    assert_eq!(
        daemon.signal_and_wait(15, Duration::from_secs(20)).code(),
        Some(0)
    );
}
