//! Process-wide counters and the Prometheus text rendering served on
//! `[daemon] metrics_listen` at `/metrics`.
//!
//! Counters are plain atomics bumped where things happen (ingest, upload,
//! receiver); queue gauges are read from the store at scrape time, so a scrape
//! always agrees with `indexedcp status`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonically increasing count.
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub static INGESTED_FILES: Counter = Counter::new();
pub static INGESTED_BYTES: Counter = Counter::new();
pub static UPLOADED_CHUNKS: Counter = Counter::new();
pub static UPLOADED_BYTES: Counter = Counter::new();
pub static CONFIRMED_FILES: Counter = Counter::new();
pub static CONFIRMED_BYTES: Counter = Counter::new();
pub static BATCHED_FILES: Counter = Counter::new();
pub static PARKED_FILES: Counter = Counter::new();
pub static RETRIES: Counter = Counter::new();

/// Upper bounds (seconds) of the chunk upload latency histogram.
const LATENCY_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

static LATENCY: Histogram = Histogram {
    buckets: [const { AtomicU64::new(0) }; LATENCY_BOUNDS.len()],
    count: AtomicU64::new(0),
    sum_micros: AtomicU64::new(0),
};

/// Records how long one chunk request took (successful or not).
pub fn observe_upload_latency(elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    for (bound, bucket) in LATENCY_BOUNDS.iter().zip(&LATENCY.buckets) {
        if secs <= *bound {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
    }
    LATENCY.count.fetch_add(1, Ordering::Relaxed);
    LATENCY
        .sum_micros
        .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
}

/// Receiver replies by status code (100..=599).
static RECEIVER_STATUS: [AtomicU64; 500] = [const { AtomicU64::new(0) }; 500];

pub fn count_receiver_reply(status: u16) {
    if (100..600).contains(&status) {
        RECEIVER_STATUS[(status - 100) as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Requests the receiver accepted from each named client; as many entries
/// as `[[server.client]]` sections have ever been configured in the process.
static CLIENT_REQUESTS: std::sync::Mutex<std::collections::BTreeMap<String, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

pub fn count_client_request(client: &str) {
    let mut counts = CLIENT_REQUESTS.lock().unwrap_or_else(|e| e.into_inner());
    match counts.get_mut(client) {
        Some(n) => *n += 1,
        None => {
            counts.insert(client.to_owned(), 1);
        }
    }
}

/// One target's queue, read from the store at scrape time.
pub struct QueueGauge {
    pub target: String,
    pub queued_files: u64,
    pub queued_bytes: u64,
    pub failed_files: u64,
    pub oldest_queued_age_secs: f64,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of every metric.
pub fn render(queues: &[QueueGauge]) -> String {
    let mut out = String::new();
    let counters: [(&str, &str, &Counter); 9] = [
        (
            "indexedcp_ingested_files_total",
            "Files buffered from spools.",
            &INGESTED_FILES,
        ),
        (
            "indexedcp_ingested_bytes_total",
            "Bytes buffered from spools.",
            &INGESTED_BYTES,
        ),
        (
            "indexedcp_uploaded_chunks_total",
            "Chunks acknowledged by receivers.",
            &UPLOADED_CHUNKS,
        ),
        (
            "indexedcp_uploaded_bytes_total",
            "Bytes acknowledged by receivers.",
            &UPLOADED_BYTES,
        ),
        (
            "indexedcp_confirmed_files_total",
            "Files confirmed complete by receivers.",
            &CONFIRMED_FILES,
        ),
        (
            "indexedcp_confirmed_bytes_total",
            "Bytes of files confirmed complete.",
            &CONFIRMED_BYTES,
        ),
        (
            "indexedcp_batched_files_total",
            "Files confirmed through batch requests (many small files per request).",
            &BATCHED_FILES,
        ),
        (
            "indexedcp_failed_files_total",
            "Files parked as failed (permanent refusals or retries exhausted).",
            &PARKED_FILES,
        ),
        (
            "indexedcp_upload_retries_total",
            "Failed chunk attempts scheduled for a retry.",
            &RETRIES,
        ),
    ];
    for (name, help, counter) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            counter.get()
        );
    }
    type Gauge = (&'static str, &'static str, fn(&QueueGauge) -> f64);
    let gauges: [Gauge; 4] = [
        (
            "indexedcp_queue_files",
            "Files buffered and waiting for upload.",
            |q| q.queued_files as f64,
        ),
        (
            "indexedcp_queue_bytes",
            "Bytes buffered and waiting for upload.",
            |q| q.queued_bytes as f64,
        ),
        (
            "indexedcp_failed_files",
            "Files parked as failed, waiting for `indexedcp retry`.",
            |q| q.failed_files as f64,
        ),
        (
            "indexedcp_oldest_queued_seconds",
            "Age of the oldest file waiting for upload.",
            |q| q.oldest_queued_age_secs,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for q in queues {
            let _ = writeln!(
                out,
                "{name}{{target=\"{}\"}} {}",
                escape(&q.target),
                value(q)
            );
        }
    }
    let name = "indexedcp_chunk_upload_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time of one chunk request.\n# TYPE {name} histogram"
    );
    for (bound, bucket) in LATENCY_BOUNDS.iter().zip(&LATENCY.buckets) {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{bound}\"}} {}",
            bucket.load(Ordering::Relaxed)
        );
    }
    let count = LATENCY.count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(
        out,
        "{name}_sum {}",
        LATENCY.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(out, "{name}_count {count}");
    let name = "indexedcp_receiver_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} Receiver replies by HTTP status.\n# TYPE {name} counter"
    );
    for (i, n) in RECEIVER_STATUS.iter().enumerate() {
        let n = n.load(Ordering::Relaxed);
        if n > 0 {
            let _ = writeln!(out, "{name}{{status=\"{}\"}} {n}", i + 100);
        }
    }
    let name = "indexedcp_receiver_client_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} Requests the receiver accepted, by named client.\n# TYPE {name} counter"
    );
    for (client, n) in CLIENT_REQUESTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(out, "{name}{{client=\"{}\"}} {n}", escape(client));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_is_prometheus_text() {
        observe_upload_latency(Duration::from_millis(30));
        count_receiver_reply(201);
        let text = render(&[QueueGauge {
            target: "a\"b".into(),
            queued_files: 2,
            queued_bytes: 10,
            failed_files: 1,
            oldest_queued_age_secs: 1.5,
        }]);
        assert!(
            text.contains("indexedcp_queue_files{target=\"a\\\"b\"} 2"),
            "{text}"
        );
        assert!(text.contains("indexedcp_chunk_upload_seconds_bucket{le=\"0.05\"}"));
        assert!(text.contains("indexedcp_receiver_requests_total{status=\"201\"}"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        }
    }
}
