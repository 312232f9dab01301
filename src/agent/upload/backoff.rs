//! The retry schedule, the only one in the crate: the uploader and the
//! one-shot commands both wait by it.

use std::time::Duration;

use crate::config::TargetConfig;

/// The retry schedule: `min(initial * multiplier^(n-1), max)` for the n-th retry,
/// plus up to 10 % jitter (never beyond `max`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BackoffError {
    #[error("initial retry delay {initial:?} is larger than the maximum {max:?}")]
    InitialAboveMax { initial: Duration, max: Duration },
    #[error("retry multiplier {0} must be a finite number of at least 1")]
    Multiplier(f64),
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, multiplier: f64) -> Result<Backoff, BackoffError> {
        if initial > max {
            return Err(BackoffError::InitialAboveMax { initial, max });
        }
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(BackoffError::Multiplier(multiplier));
        }
        Ok(Backoff {
            initial,
            max,
            multiplier,
        })
    }

    pub fn of(target: &TargetConfig) -> Backoff {
        Backoff {
            initial: target.initial_retry_delay,
            max: target.max_retry_delay,
            multiplier: target.retry_multiplier,
        }
    }

    /// The delay before retry number `n` (1-based), without jitter.
    pub fn delay(&self, n: u64) -> Duration {
        let exponent = n.saturating_sub(1).min(1_000) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// [`Backoff::delay`] plus `jitter` (in [0, 1)) times 10 %, capped at the maximum.
    pub fn delay_with_jitter(&self, n: u64, jitter: f64) -> Duration {
        let base = self.delay(n);
        base.mul_f64(1.0 + 0.1 * jitter.clamp(0.0, 1.0))
            .min(self.max.max(base))
    }
}

pub(crate) fn random_unit() -> f64 {
    let mut buf = [0u8; 8];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    (u64::from_le_bytes(buf) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_doubles_from_one_second_and_caps_at_sixty() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 2.0).unwrap();
        let secs: Vec<u64> = (1..=8).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay(10_000), Duration::from_secs(60));
        let jittered = b.delay_with_jitter(3, 0.999);
        assert!(jittered >= Duration::from_secs(4) && jittered <= Duration::from_millis(4400));
        assert_eq!(b.delay_with_jitter(9, 0.9), Duration::from_secs(60));
    }

    #[test]
    fn backoff_is_validated() {
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1), 2.0).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 0.5).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(1), f64::NAN).is_err());
    }
}
