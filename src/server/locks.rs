//! Keyed async locks, the receiver's only coordination between requests,
//! shared by every receiver of the process. `<upload id>#<chunk index>` is
//! held while a resumable chunk is checked, written and recorded, and
//! `<upload id>` while an upload completes. A batch holds both
//! `<upload id>#0` and `<upload id>` of every one of its files at once, from
//! before it reads them until they are settled; the staging sweep and expiry
//! do the same for each staging file they may remove. `v1:<client name>` is
//! held for the whole of a v1 chunk. A tus PATCH holds `<upload id>#0` (so a
//! tus upload's PATCHes run one at a time) and completes under `<upload id>`.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Async mutexes by key (an upload id, a chunk, a v1 client name), created on
/// demand and dropped when nobody holds them.
#[derive(Default)]
pub(super) struct KeyedLocks {
    map: std::sync::Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Waits for, then holds, the lock of `key`.
    pub(super) async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let mutex = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, weak| weak.strong_count() > 0);
            }
            match map.get(&key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&m));
                    m
                }
            }
        };
        mutex.lock_owned().await
    }

    /// The locks a single request takes on the way for each of `ids` (its
    /// first chunk, then the upload), held together: taken in id order, so
    /// that two holders of several cannot wait on each other.
    pub(super) async fn lock_uploads<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut ids: Vec<&str> = ids.into_iter().collect();
        ids.sort_unstable();
        let mut guards = Vec::with_capacity(ids.len() * 2);
        for id in ids {
            guards.push(self.lock(format!("{id}#0")).await);
            guards.push(self.lock(id.to_owned()).await);
        }
        guards
    }
}

/// The locks of the process: every [`super::Receiver`] takes them from here,
/// so that after a reload the new receiver's recovery waits for requests still
/// running on the old one.
pub(super) static UPLOAD_LOCKS: std::sync::LazyLock<KeyedLocks> =
    std::sync::LazyLock::new(KeyedLocks::default);
