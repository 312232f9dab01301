//! The audit trail of refused API keys. Every refusal is counted by the
//! address it came from: the first from an address is logged at once, at
//! info, with the address; later ones are counted and logged as one line per
//! address every [`INTERVAL`], with their number. So a client guessing keys
//! leaves a trace whatever its rate, and the log grows by at most one line per
//! address and interval. The table holds at most [`MAX_PEERS`] addresses;
//! refusals from further addresses are counted together.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the counts of refusals not yet logged are.
pub(super) const INTERVAL: Duration = Duration::from_secs(10);
/// Addresses followed at once (a few dozen bytes each).
const MAX_PEERS: usize = 4096;

/// The peer address of a connection, added to each of its requests.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer(pub(super) SocketAddr);

#[derive(Default)]
pub(super) struct RefusedKeys {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// Refusals not logged yet, by address, and since when it is followed.
    peers: HashMap<IpAddr, (Instant, u64)>,
    /// Refusals from addresses beyond [`MAX_PEERS`].
    others: u64,
}

/// Every receiver of the process counts into the same table.
pub(super) static REFUSED_KEYS: std::sync::LazyLock<RefusedKeys> =
    std::sync::LazyLock::new(RefusedKeys::default);

impl RefusedKeys {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every update is a single insertion or increment.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request from `peer` had no valid API key.
    pub(super) fn refused(&self, peer: Option<SocketAddr>, path: &str) {
        let ip = peer.map(|p| p.ip());
        let mut table = self.table();
        let Some(ip) = ip else {
            table.others += 1;
            return;
        };
        if let Some((_, count)) = table.peers.get_mut(&ip) {
            *count += 1;
        } else if table.peers.len() < MAX_PEERS {
            table.peers.insert(ip, (Instant::now(), 0));
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

    /// Logs the refusals counted for at least [`INTERVAL`], one line per
    /// address, and forgets addresses that stayed quiet for that long.
    pub(super) fn flush(&self) {
        let now = Instant::now();
        let mut lines = Vec::new();
        let others = {
            let mut table = self.table();
            table.peers.retain(|ip, (since, count)| {
                if now.duration_since(*since) < INTERVAL {
                    return true;
                }
                if *count == 0 {
                    return false;
                }
                lines.push((*ip, *count, now.duration_since(*since)));
                *since = now;
                *count = 0;
                true
            });
            std::mem::take(&mut table.others)
        };
        for (ip, count, over) in lines {
            tracing::info!(
                peer = %ip,
                refused = count,
                "refused {count} more requests without a valid API key (401) from {ip} in the last {}s",
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
                table.peers[&a.ip()].1,
                4,
                "the first is logged, not counted"
            );
            assert_eq!(table.peers[&b.ip()].1, 0);
            assert_eq!(table.others, 1);
        }
        // Age both entries past the interval: `a` is logged and kept, the
        // quiet `b` forgotten.
        for (since, _) in log.table().peers.values_mut() {
            *since = since.checked_sub(INTERVAL).unwrap();
        }
        log.flush();
        let table = log.table();
        assert_eq!(table.peers.len(), 1);
        assert_eq!(table.peers[&a.ip()].1, 0);
        assert_eq!(table.others, 0);
    }
}
