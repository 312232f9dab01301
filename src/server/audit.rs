//! The audit trail of refused API keys, and the brake on guessing them.
//! Every refusal is counted by the address it came from: the first from an
//! address is logged at once, at info, with the address; later ones are
//! counted and logged as one line per address every [`INTERVAL`], with their
//! number. So a client guessing keys leaves a trace whatever its rate, and
//! the log grows by at most one line per address and interval.
//!
//! An address that sends [`STRIKES`] bad keys in a row is answered 429, with
//! `Retry-After`, for a penalty that starts at [`FIRST_PENALTY`] and doubles
//! with each further run of bad keys, up to [`MAX_PENALTY`]; while it lasts no
//! key from that address is checked, a good one neither, so guessing is
//! slowed whatever the guesser's rate. Each penalty is logged once when it
//! starts. An address that stays quiet for [`INTERVAL`] (and is not serving a
//! penalty) is forgotten. The table holds at most [`MAX_PEERS`] addresses;
//! refusals from further addresses are counted together and not braked,
//! which bounds the memory an attacker with many addresses can take.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the counts of refusals not yet logged are.
pub(super) const INTERVAL: Duration = Duration::from_secs(10);
/// Addresses followed at once (a few dozen bytes each).
const MAX_PEERS: usize = 4096;
/// Bad keys in a row from one address before it is answered 429.
pub(super) const STRIKES: u32 = 10;
/// The first penalty, doubled by each further run of bad keys.
const FIRST_PENALTY: Duration = Duration::from_secs(1);
const MAX_PENALTY: Duration = Duration::from_secs(15 * 60);

/// The peer address of a connection, added to each of its requests.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer(pub(super) SocketAddr);

#[derive(Default)]
pub(super) struct RefusedKeys {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// What is known of each address followed.
    peers: HashMap<IpAddr, PeerRecord>,
    /// Refusals from addresses beyond [`MAX_PEERS`].
    others: u64,
}

struct PeerRecord {
    /// Since when the refusals not logged yet were counted.
    since: Instant,
    /// Refusals (401 and 429) not logged yet.
    unlogged: u64,
    /// Bad keys since the last penalty.
    strikes: u32,
    /// The last penalty given; the next is twice as long.
    penalty: Duration,
    blocked_until: Option<Instant>,
}

/// Every receiver of the process counts into the same table.
pub(super) static REFUSED_KEYS: std::sync::LazyLock<RefusedKeys> =
    std::sync::LazyLock::new(RefusedKeys::default);

impl RefusedKeys {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every update is a single insertion or increment.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `peer` must still wait when it is serving a penalty (the
    /// request is then answered 429 and counted); `None` to check its key.
    pub(super) fn penalty_left(&self, peer: Option<SocketAddr>) -> Option<Duration> {
        let ip = peer?.ip();
        let mut table = self.table();
        let record = table.peers.get_mut(&ip)?;
        let left = record
            .blocked_until?
            .checked_duration_since(Instant::now())?;
        record.unlogged += 1;
        Some(left.max(Duration::from_secs(1)))
    }

    /// A request from `peer` had no valid API key.
    pub(super) fn refused(&self, peer: Option<SocketAddr>, path: &str) {
        let ip = peer.map(|p| p.ip());
        let mut table = self.table();
        let Some(ip) = ip else {
            table.others += 1;
            return;
        };
        let now = Instant::now();
        if let Some(record) = table.peers.get_mut(&ip) {
            record.unlogged += 1;
            record.strikes += 1;
            if record.strikes >= STRIKES {
                record.strikes = 0;
                record.penalty = (record.penalty * 2).clamp(FIRST_PENALTY, MAX_PENALTY);
                record.blocked_until = Some(now + record.penalty);
                let penalty = record.penalty;
                drop(table);
                tracing::warn!(
                    peer = %ip,
                    penalty = ?penalty,
                    "{STRIKES} bad API keys in a row from {ip}: answering it 429 for {}s (doubled for each further run)",
                    penalty.as_secs()
                );
            }
        } else if table.peers.len() < MAX_PEERS {
            table.peers.insert(
                ip,
                PeerRecord {
                    since: now,
                    unlogged: 0,
                    strikes: 1,
                    penalty: Duration::ZERO,
                    blocked_until: None,
                },
            );
            drop(table);
            tracing::info!(
                peer = %ip,
                path,
                "refused a request without a valid API key (401); further refusals from this address are counted and logged every {}s",
                INTERVAL.as_secs()
            );
        } else {
            table.others += 1;
        }
    }

    /// A request from `peer` carried a valid key: its run of bad keys ends.
    pub(super) fn accepted(&self, peer: Option<SocketAddr>) {
        if let Some(peer) = peer
            && let Some(record) = self.table().peers.get_mut(&peer.ip())
        {
            record.strikes = 0;
        }
    }

    /// Logs the refusals counted for at least [`INTERVAL`], one line per
    /// address, and forgets addresses that stayed quiet for that long.
    pub(super) fn flush(&self) {
        let now = Instant::now();
        let mut lines = Vec::new();
        let others = {
            let mut table = self.table();
            table.peers.retain(|ip, record| {
                if now.duration_since(record.since) < INTERVAL
                    || record.blocked_until.is_some_and(|until| until > now)
                {
                    return true;
                }
                if record.unlogged == 0 {
                    return false;
                }
                lines.push((*ip, record.unlogged, now.duration_since(record.since)));
                record.since = now;
                record.unlogged = 0;
                true
            });
            std::mem::take(&mut table.others)
        };
        for (ip, count, over) in lines {
            tracing::info!(
                peer = %ip,
                refused = count,
                "refused {count} more requests without a valid API key (401, or 429 while braked) from {ip} in the last {}s",
                over.as_secs()
            );
        }
        if others > 0 {
            tracing::info!(
                refused = others,
                "refused {others} requests without a valid API key (401) from addresses not followed one by one"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_per_address_and_quiet_addresses_forgotten() {
        let log = RefusedKeys::default();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        for port in 0..5 {
            log.refused(Some(SocketAddr::new(a.ip(), port)), "/upload");
        }
        log.refused(Some(b), "/upload");
        log.refused(None, "/upload");
        {
            let table = log.table();
            assert_eq!(
                table.peers[&a.ip()].unlogged,
                4,
                "the first is logged, not counted"
            );
            assert_eq!(table.peers[&b.ip()].unlogged, 0);
            assert_eq!(table.others, 1);
        }
        // Age both entries past the interval: `a` is logged and kept, the
        // quiet `b` forgotten.
        for record in log.table().peers.values_mut() {
            record.since = record.since.checked_sub(INTERVAL).unwrap();
        }
        log.flush();
        let table = log.table();
        assert_eq!(table.peers.len(), 1);
        assert_eq!(table.peers[&a.ip()].unlogged, 0);
        assert_eq!(table.others, 0);
    }

    #[test]
    fn runs_of_bad_keys_earn_doubling_penalties_and_a_good_key_ends_a_run() {
        let log = RefusedKeys::default();
        let addr: SocketAddr = "192.0.2.9:1".parse().unwrap();
        let peer = Some(addr);
        for _ in 0..STRIKES - 1 {
            log.refused(peer, "/upload");
        }
        log.accepted(peer);
        log.refused(peer, "/upload");
        assert_eq!(log.penalty_left(peer), None, "a good key ended the run");
        for _ in 0..STRIKES - 1 {
            log.refused(peer, "/upload");
        }
        let first = log.penalty_left(peer).expect("braked after a run");
        assert!(first <= FIRST_PENALTY, "{first:?}");
        // A second run (as after the penalty) doubles it.
        for _ in 0..STRIKES {
            log.refused(peer, "/upload");
        }
        let second = log.table().peers[&addr.ip()].penalty;
        assert_eq!(second, FIRST_PENALTY * 2);
        let other = Some("192.0.2.10:1".parse().unwrap());
        assert_eq!(
            log.penalty_left(other),
            None,
            "other addresses are not braked"
        );
    }
}
