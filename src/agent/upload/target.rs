//! One target's runtime: its delivery, the byte budget that bounds what is in
//! flight, and the throttle on its warnings.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::agent::store::FileRecord;
use crate::config::{TargetConfig, TargetKind};

use super::delivery::Delivery;
use super::error::UploadError;
use super::indexedcp::IndexedCp;
use super::s3::S3;
use super::tus::Tus;

/// The unit of a target's byte budget: a piece in flight holds one permit
/// per started unit of its length.
const BUDGET_UNIT: u64 = 4096;

/// Everything one target's uploads need.
pub struct TargetRuntime {
    pub config: TargetConfig,
    /// How files reach this target.
    pub delivery: Arc<dyn Delivery>,
    /// Bytes in flight for this target at most: the piece size (`chunk_size`,
    /// or the delivery's minimum piece if larger) times `concurrency`,
    /// whatever the number of files or the window, so that memory stays
    /// bounded by that product.
    budget: Arc<tokio::sync::Semaphore>,
    /// When a failed attempt was last logged at warning level, and how many
    /// were logged at debug level since.
    last_warning: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// Replaced by a reload: a failure of an attempt still running with these
    /// settings says nothing about the new ones.
    retired: std::sync::atomic::AtomicBool,
    /// The most bytes one piece holds (the budget's share of one permit set).
    piece_bytes: u64,
}

/// Failed attempts of one target are logged as warnings at most this often:
/// with a receiver down and thousands of files waiting, one line per attempt
/// would bury the journal. The others go to the debug level.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

impl TargetRuntime {
    /// Builds the target's delivery from its settings.
    pub fn new(config: TargetConfig) -> Result<TargetRuntime, UploadError> {
        // The one place that knows the kinds: everything after asks the
        // delivery for what it can do.
        let delivery: Arc<dyn Delivery> = match &config.kind {
            TargetKind::IndexedCp => Arc::new(IndexedCp::new(&config)?),
            TargetKind::S3(s3) => Arc::new(S3::new(&config, s3)?),
            TargetKind::Tus => Arc::new(Tus::new(&config)?),
        };
        Ok(TargetRuntime::with_delivery(config, delivery))
    }

    /// Discards what the target holds of `file`, which an operator purges
    /// from the buffer (an unfinished multipart upload, say).
    pub async fn abort(&self, file: &FileRecord) -> Result<(), UploadError> {
        self.delivery
            .abort(file, file.delivery_state.as_deref())
            .await
    }

    /// A target that delivers through `delivery`.
    pub fn with_delivery(config: TargetConfig, delivery: Arc<dyn Delivery>) -> TargetRuntime {
        // A piece is a run of whole chunks of at least the delivery's
        // minimum, so it may exceed that minimum by up to one chunk.
        let min_piece = delivery.min_piece_bytes();
        let piece_bytes = if min_piece > config.chunk_size {
            min_piece + config.chunk_size
        } else {
            config.chunk_size
        }
        .max(1);
        let units = (piece_bytes.div_ceil(BUDGET_UNIT) * config.concurrency.max(1) as u64)
            .min(tokio::sync::Semaphore::MAX_PERMITS as u64);
        TargetRuntime {
            config,
            delivery,
            budget: Arc::new(tokio::sync::Semaphore::new(units as usize)),
            last_warning: std::sync::Mutex::new(None),
            retired: std::sync::atomic::AtomicBool::new(false),
            piece_bytes,
        }
    }

    /// Whether a reload replaced these settings.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Marks these settings as replaced by a reload: attempts still running
    /// with them retry at once when they fail.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Waits until `length` more bytes may be in flight; they may until the
    /// returned permit is dropped.
    pub(crate) async fn reserve(&self, length: u64) -> tokio::sync::SemaphorePermit<'_> {
        let units = length
            .div_ceil(BUDGET_UNIT)
            .clamp(1, self.piece_bytes.div_ceil(BUDGET_UNIT)) as u32;
        self.budget
            .acquire_many(units)
            .await
            .expect("the budget semaphore is never closed")
    }

    /// Whether a failed attempt should be logged as a warning now; if so, also
    /// how many were logged at debug level since the last one.
    pub(crate) fn warning_due(&self) -> Option<u64> {
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match &mut *last {
            Some((at, quiet)) if now.duration_since(*at) < WARNING_INTERVAL => {
                *quiet += 1;
                None
            }
            _ => {
                let quiet = last.map_or(0, |(_, quiet)| quiet);
                *last = Some((now, 0));
                Some(quiet)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_in_flight_stay_within_chunk_size_times_concurrency() {
        let mut config = TargetConfig::new("t", "http://127.0.0.1:9/upload");
        config.chunk_size = 1 << 20;
        config.concurrency = 2;
        let target = TargetRuntime::new(config).unwrap();
        let wait = Duration::from_millis(50);
        let first = target.reserve(1 << 20).await;
        let small = target.reserve(4096).await;
        // A whole chunk more does not fit until something is released.
        assert!(
            tokio::time::timeout(wait, target.reserve(1 << 20))
                .await
                .is_err()
        );
        drop(small);
        let second = tokio::time::timeout(wait, target.reserve(1 << 20)).await;
        assert!(second.is_ok());
        drop(first);
        // A chunk larger than chunk_size (buffered before a reload) still fits.
        drop(second);
        assert!(
            tokio::time::timeout(wait, target.reserve(8 << 20))
                .await
                .is_ok()
        );
    }
}
