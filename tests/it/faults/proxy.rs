//! A fault proxy between an agent and a receiver on 127.0.0.1 (there is no
//! `tc netem` or toxiproxy on these machines). It understands just enough
//! HTTP/1.1 to act per request: it reads a request head and its
//! `Content-Length` body (the agent always sends one), picks a fault with a
//! seeded generator (request number n uses `seed` and n, so a run replays), and
//! then passes the request on, cuts or resets the connection part-way, loses
//! the reply after the receiver processed the request, stalls, delays, answers
//! 500/503/429 itself, or flips one bit of the body. Every request goes to the
//! receiver on a fresh connection marked `Connection: close`, so the proxy reads
//! each reply to its end; towards the agent, connections are kept alive when
//! the reply has a `Content-Length`.
//!
//! It counts requests per fault and the receiver's statuses per fault, so a
//! scenario can check, for instance, that every flipped body was refused (422).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Rng;

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// Forward the request and the reply unchanged.
    Pass,
    /// Wait, then pass.
    Delay(Duration),
    /// Forward only the first n bytes of the request, then close both sides.
    Cut(usize),
    /// Forward the first n bytes, then reset both connections (RST).
    Reset(usize),
    /// Forward the whole request, read the whole reply, then close the client's
    /// connection without replying: a lost acknowledgement.
    LoseReply,
    /// Hold the request without forwarding it, then close.
    Stall(Duration),
    /// Answer this status without forwarding (with `Retry-After: 1` for 429/503).
    Refuse(u16),
    /// Flip one bit of the body byte at this index, then forward.
    Flip(usize),
}

impl Fault {
    /// The fault's name without its parameter, for the counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Pass => "pass",
            Fault::Delay(_) => "delay",
            Fault::Cut(_) => "cut",
            Fault::Reset(_) => "reset",
            Fault::LoseReply => "lost-reply",
            Fault::Stall(_) => "stall",
            Fault::Refuse(500) => "answer-500",
            Fault::Refuse(503) => "answer-503",
            Fault::Refuse(429) => "answer-429",
            Fault::Refuse(_) => "answer-other",
            Fault::Flip(_) => "flip",
        }
    }
}

/// How often each fault is picked, in parts per thousand (the rest pass).
#[derive(Debug, Clone)]
pub struct Profile {
    pub delay: u32,
    pub cut: u32,
    pub reset: u32,
    pub lose_reply: u32,
    pub stall: u32,
    pub refuse_500: u32,
    pub refuse_503: u32,
    pub refuse_429: u32,
    pub flip: u32,
    /// Upper bound of `Delay`.
    pub max_delay: Duration,
    /// Upper bound of `Stall`.
    pub max_stall: Duration,
    /// Only the first this many requests are faulted; later ones pass.
    pub fault_budget: u64,
}

impl Profile {
    /// Everything passes: the proxy only counts.
    pub fn pass_through() -> Profile {
        Profile {
            delay: 0,
            cut: 0,
            reset: 0,
            lose_reply: 0,
            stall: 0,
            refuse_500: 0,
            refuse_503: 0,
            refuse_429: 0,
            flip: 0,
            max_delay: Duration::ZERO,
            max_stall: Duration::ZERO,
            fault_budget: 0,
        }
    }

    /// Picks the fault for a request of `len` bytes with a `body_len`-byte body.
    fn pick(&self, rng: &mut Rng, len: usize, body_len: usize) -> Fault {
        let mut roll = rng.below(1000) as u32;
        let table: [(u32, u8); 9] = [
            (self.delay, 0),
            (self.cut, 1),
            (self.reset, 2),
            (self.lose_reply, 3),
            (self.stall, 4),
            (self.refuse_500, 5),
            (self.refuse_503, 6),
            (self.refuse_429, 7),
            (self.flip, 8),
        ];
        for (weight, which) in table {
            if roll >= weight {
                roll -= weight;
                continue;
            }
            return match which {
                0 => Fault::Delay(Duration::from_millis(
                    rng.range(1, self.max_delay.as_millis().max(1) as u64),
                )),
                1 => Fault::Cut(rng.below(len as u64) as usize),
                2 => Fault::Reset(rng.below(len as u64) as usize),
                3 => Fault::LoseReply,
                4 => Fault::Stall(Duration::from_millis(
                    rng.range(1, self.max_stall.as_millis().max(1) as u64),
                )),
                5 => Fault::Refuse(500),
                6 => Fault::Refuse(503),
                7 => Fault::Refuse(429),
                _ if body_len == 0 => Fault::Pass,
                _ => Fault::Flip(rng.below(body_len as u64) as usize),
            };
        }
        Fault::Pass
    }
}

/// Counters, shared with the proxy's tasks.
#[derive(Default)]
pub struct Stats {
    requests: AtomicU64,
    /// Requests per fault kind.
    faults: Mutex<BTreeMap<&'static str, u64>>,
    /// The receiver's status per fault kind, for requests it answered.
    upstream: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Request heads whose receiver status was not the expected one, for reports.
    notes: Mutex<Vec<String>>,
    /// Requests whose line starts with the first string and contains the
    /// second lose their reply, as many times as the count says.
    lose_next: Mutex<Option<(String, String, u32)>>,
}

/// A copy of the counters.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub requests: u64,
    pub faults: BTreeMap<&'static str, u64>,
    pub upstream: BTreeMap<(&'static str, u16), u64>,
    pub notes: Vec<String>,
}

impl Snapshot {
    pub fn count(&self, kind: &str) -> u64 {
        self.faults.get(kind).copied().unwrap_or(0)
    }

    /// How many requests of `kind` the receiver answered with `status`.
    pub fn upstream(&self, kind: &str, status: u16) -> u64 {
        self.upstream
            .iter()
            .filter(|((k, s), _)| *k == kind && *s == status)
            .map(|(_, n)| n)
            .sum()
    }

    /// How many requests of `kind` the receiver answered at all.
    pub fn upstream_total(&self, kind: &str) -> u64 {
        self.upstream
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// How many replies of the receiver had this status, whatever the fault.
    pub fn status(&self, status: u16) -> u64 {
        self.upstream
            .iter()
            .filter(|((_, s), _)| *s == status)
            .map(|(_, n)| n)
            .sum()
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} requests:", self.requests)?;
        for (kind, n) in &self.faults {
            write!(f, " {kind} {n}")?;
        }
        write!(f, "; receiver statuses:")?;
        let mut by_status: BTreeMap<u16, u64> = BTreeMap::new();
        for ((_, status), n) in &self.upstream {
            *by_status.entry(*status).or_default() += n;
        }
        for (status, n) in by_status {
            write!(f, " {status}x{n}")?;
        }
        Ok(())
    }
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, seed: u64, profile: Profile) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let profile = Arc::new(profile);
        let (s, p) = (stats.clone(), profile.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                tokio::spawn(serve_connection(
                    client,
                    upstream,
                    seed,
                    s.clone(),
                    p.clone(),
                ));
            }
        });
        FaultProxy { addr, stats, task }
    }

    /// The URL an agent uploads to through the proxy.
    pub fn upload_url(&self) -> String {
        format!("http://{}/upload", self.addr)
    }

    /// The next `times` requests whose request line starts with `start`
    /// and contains `part` lose their reply (whatever else the profile
    /// picks), e.g. `("POST ", "uploadId=", 3)` for S3's
    /// CompleteMultipartUpload.
    pub fn lose_replies_to(&self, start: &str, part: &str, times: u32) {
        *self.stats.lose_next.lock().unwrap() = Some((start.to_owned(), part.to_owned(), times));
    }

    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests: self.requests(),
            faults: self.stats.faults.lock().unwrap().clone(),
            upstream: self.stats.upstream.lock().unwrap().clone(),
            notes: self.stats.notes.lock().unwrap().clone(),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request read from the client.
struct Request {
    /// The head with its `Connection` header replaced by `Connection: close`.
    head: Vec<u8>,
    body: Vec<u8>,
    /// The request line, for notes.
    line: String,
}

/// Reads a request head (up to the blank line) and its `Content-Length` body.
/// `None` when the client closed the connection (or sent something unusable).
async fn read_request(client: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 256 << 10 {
            return None;
        }
        let mut chunk = [0u8; 16 << 10];
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head_text = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head_text.split("\r\n");
    let line = lines.next().unwrap_or_default().to_owned();
    let mut length = 0usize;
    let mut head = Vec::with_capacity(head_end + 20);
    head.extend_from_slice(line.as_bytes());
    head.extend_from_slice(b"\r\n");
    for header in lines.filter(|l| !l.is_empty()) {
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let name_lc = name.trim().to_ascii_lowercase();
        if name_lc == "content-length" {
            length = value.trim().parse().ok()?;
        }
        if name_lc == "transfer-encoding" {
            // The agent never sends chunked bodies; this proxy cannot frame them.
            return None;
        }
        if name_lc == "connection" || name_lc == "keep-alive" {
            continue;
        }
        head.extend_from_slice(header.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    buf.drain(..head_end);
    while buf.len() < length {
        let mut chunk = vec![0u8; (length - buf.len()).min(256 << 10)];
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    Some(Request { head, body, line })
}

/// A reply from the receiver, read to the end of its connection.
struct Reply {
    status: u16,
    /// Head without `Connection` headers, ending in the blank line; `None` when
    /// the reply has no `Content-Length` (then it is relayed as is, and the
    /// client connection closed after it).
    keep_alive_head: Option<Vec<u8>>,
    raw: Vec<u8>,
    body_start: usize,
}

async fn forward(upstream: SocketAddr, request: &[u8]) -> Option<Reply> {
    let mut conn = TcpStream::connect(upstream).await.ok()?;
    let _ = conn.set_nodelay(true);
    conn.write_all(request).await.ok()?;
    let mut raw = Vec::new();
    // The receiver closes after replying (Connection: close); a stuck one is
    // given up on well after any agent timeout.
    tokio::time::timeout(Duration::from_secs(120), conn.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut head = Vec::new();
    head.extend_from_slice(status_line.as_bytes());
    head.extend_from_slice(b"\r\n");
    let mut has_length = false;
    for header in lines.filter(|l| !l.is_empty()) {
        let name = header
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if name == "connection" || name == "keep-alive" {
            continue;
        }
        has_length |= name == "content-length";
        head.extend_from_slice(header.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Some(Reply {
        status,
        keep_alive_head: has_length.then_some(head),
        raw,
        body_start: head_end,
    })
}

async fn serve_connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    seed: u64,
    stats: Arc<Stats>,
    profile: Arc<Profile>,
) {
    let mut buf = Vec::new();
    while let Some(mut request) = read_request(&mut client, &mut buf).await {
        let n = stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut rng = Rng::new(seed ^ n.wrapping_mul(0xA076_1D64_78BD_642F));
        let targeted = {
            let mut next = stats.lose_next.lock().unwrap();
            match next.as_mut() {
                Some((start, part, times))
                    if *times > 0
                        && request.line.starts_with(start.as_str())
                        && request.line.contains(part.as_str()) =>
                {
                    *times -= 1;
                    true
                }
                _ => false,
            }
        };
        let fault = if targeted {
            Fault::LoseReply
        } else if n < profile.fault_budget {
            profile.pick(
                &mut rng,
                request.head.len() + request.body.len(),
                request.body.len(),
            )
        } else {
            Fault::Pass
        };
        *stats
            .faults
            .lock()
            .unwrap()
            .entry(fault.kind())
            .or_default() += 1;
        let mut whole = std::mem::take(&mut request.head);
        match fault {
            Fault::Cut(len) | Fault::Reset(len) => {
                let reset = matches!(fault, Fault::Reset(_));
                whole.extend_from_slice(&request.body);
                if let Ok(mut conn) = TcpStream::connect(upstream).await {
                    let _ = conn.write_all(&whole[..len]).await;
                    if reset {
                        let _ = conn.set_zero_linger();
                    }
                    drop(conn);
                }
                if reset {
                    let _ = client.set_zero_linger();
                }
                return;
            }
            Fault::Stall(d) => {
                tokio::time::sleep(d).await;
                return;
            }
            Fault::Refuse(status) => {
                let body = format!(r#"{{"error":"fault proxy","message":"answered {status}"}}"#);
                let reason = match status {
                    429 => "Too Many Requests",
                    503 => "Service Unavailable",
                    _ => "Internal Server Error",
                };
                let retry = if status == 429 || status == 503 {
                    "Retry-After: 1\r\n"
                } else {
                    ""
                };
                let reply = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{retry}Content-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if client.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Flip(i) => {
                let mask = 1u8 << rng.below(8);
                request.body[i] ^= mask;
            }
            Fault::Pass | Fault::LoseReply => {}
        }
        whole.extend_from_slice(&request.body);
        let Some(reply) = forward(upstream, &whole).await else {
            // The receiver went away (killed, or refused the connection): the
            // client sees its connection closed, as it would without a proxy.
            return;
        };
        *stats
            .upstream
            .lock()
            .unwrap()
            .entry((fault.kind(), reply.status))
            .or_default() += 1;
        if matches!(fault, Fault::Flip(_)) && reply.status != 422 {
            let body = String::from_utf8_lossy(&reply.raw[reply.body_start..]).into_owned();
            stats.notes.lock().unwrap().push(format!(
                "flipped {} answered {}: {}",
                request.line, reply.status, body
            ));
        }
        if fault == Fault::LoseReply {
            stats
                .notes
                .lock()
                .unwrap()
                .push(format!("lost the reply to {}", request.line));
            return;
        }
        match reply.keep_alive_head {
            Some(head) => {
                let mut out = head;
                out.extend_from_slice(&reply.raw[reply.body_start..]);
                if client.write_all(&out).await.is_err() {
                    return;
                }
            }
            None => {
                let _ = client.write_all(&reply.raw).await;
                return;
            }
        }
    }
}
