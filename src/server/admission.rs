//! How many connections the receiver serves at once, and what it does when
//! the process runs out of descriptors.
//!
//! A connection holds a slot from before it is accepted until it closes; with
//! every slot taken the receiver stops accepting, so further clients wait in
//! the kernel's listen backlog (their connect succeeds, their request is read
//! once a slot frees up) rather than being accepted and closed. A connection
//! costs a socket, and while it uploads an open file; in memory, hyper's read
//! buffer (at most `body::READ_BUFFER`, kept between requests), the one frame
//! hyper reads ahead of the handler (as much again) and its own state (a few
//! KiB): [`MEMORY_PER_CONNECTION`] at most, whatever it sends. Body bytes
//! beyond that come from one budget shared by every request of the process
//! (`body::BODY_FRAMES` frames, 8 MiB), not from the connection. So the receiver's
//! memory is bounded by its base (about 20 MiB), that budget and
//! `max_connections` x [`MEMORY_PER_CONNECTION`], whatever the number of
//! clients. At start the receiver raises its soft descriptor limit, as far as
//! the hard limit allows, to what `max_connections` needs, and says so when it
//! cannot.
//!
//! When accepting fails anyway (descriptors used up by something else), the
//! failure is logged once per [`ACCEPT_WARNING_INTERVAL`] with the count of
//! those not logged, not once per attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors a connection may hold: its socket and an open file.
const DESCRIPTORS_PER_CONNECTION: u64 = 2;
/// Descriptors the receiver needs besides its connections: the database, the
/// directories, files being verified or renamed, the log, the listener.
const DESCRIPTORS_RESERVED: u64 = 128;

/// The most memory one connection holds of its own (see the module doc):
/// two read buffers and its state. With the default `max_connections` (400)
/// that is about 53 MiB.
pub(super) const MEMORY_PER_CONNECTION: usize = 2 * super::body::READ_BUFFER + (8 << 10);

pub(super) const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The connection slots of one listener; their number follows reloads.
pub(super) struct Slots {
    semaphore: Arc<Semaphore>,
    size: usize,
}

impl Slots {
    pub(super) fn new(size: usize) -> Slots {
        raise_descriptor_limit(size);
        tracing::debug!(
            max_connections = size,
            connections_kib = (size * MEMORY_PER_CONNECTION) >> 10,
            bodies_kib = (super::body::BODY_FRAMES * super::body::READ_BUFFER) >> 10,
            "memory the connections and the request bodies may hold at most"
        );
        Slots {
            semaphore: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Waits for a free slot; the connection keeps it until it closes.
    pub(super) async fn acquire(&self) -> OwnedSemaphorePermit {
        let Ok(slot) = self.semaphore.clone().acquire_owned().await else {
            unreachable!("the connection slots are never closed");
        };
        slot
    }

    /// Applies a reloaded `max_connections`: more slots at once, fewer as
    /// connections close.
    pub(super) fn resize(&mut self, size: usize) {
        if size == self.size {
            return;
        }
        if size > self.size {
            raise_descriptor_limit(size);
            self.semaphore.add_permits(size - self.size);
        } else {
            let fewer = u32::try_from(self.size - size).unwrap_or(u32::MAX);
            let semaphore = self.semaphore.clone();
            tokio::spawn(async move {
                if let Ok(slots) = semaphore.acquire_many_owned(fewer).await {
                    slots.forget();
                }
            });
        }
        tracing::info!(from = self.size, to = size, "max_connections changed");
        self.size = size;
    }
}

/// Raises the soft limit on open descriptors to what `connections` need, as
/// far as the hard limit allows; warns when that is not enough.
fn raise_descriptor_limit(connections: usize) {
    let needed = connections as u64 * DESCRIPTORS_PER_CONNECTION + DESCRIPTORS_RESERVED;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the call to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let (current, hard): (u64, u64) = (limit.rlim_cur, limit.rlim_max);
    if current >= needed {
        return;
    }
    limit.rlim_cur = needed.min(hard);
    // SAFETY: `limit` is a valid rlimit, read from the kernel just above.
    let raised = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0;
    if !raised || hard < needed {
        tracing::warn!(
            max_connections = connections,
            needed,
            soft_limit = current,
            hard_limit = hard,
            "the open-descriptor limit is below what max_connections needs; lower max_connections or raise LimitNOFILE= (ulimit -n)"
        );
    } else {
        tracing::debug!(
            from = current,
            to = needed,
            "raised the open-descriptor limit"
        );
    }
}

/// Counts failed accepts and says when one should be logged.
#[derive(Default)]
pub(super) struct AcceptFailures {
    last_warning: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    /// Records a failure; logs it unless one was logged less than
    /// [`ACCEPT_WARNING_INTERVAL`] ago.
    pub(super) fn failed(&mut self, error: &std::io::Error) {
        let now = Instant::now();
        if self
            .last_warning
            .is_some_and(|at| now.duration_since(at) < ACCEPT_WARNING_INTERVAL)
        {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(
            error = %error,
            failures_not_logged = self.unlogged,
            "accepting a connection failed; out of descriptors? (logged at most every {}s)",
            ACCEPT_WARNING_INTERVAL.as_secs()
        );
        self.last_warning = Some(now);
        self.unlogged = 0;
    }
}
