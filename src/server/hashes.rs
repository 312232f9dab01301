//! Whole-file SHA-256s advanced while chunks arrive, so that completing an
//! upload does not read its staged file back: without them every byte is
//! hashed twice, as its chunk (X-Chunk-Sha256) and again for X-File-Sha256,
//! the second time after copying it out of the page cache.
//!
//! A chunk written at the end of an upload's hashed prefix is hashed into it
//! as it is written. A chunk that arrives ahead of it (a client sends several
//! at once) is written unhashed, then waits, on the executor and briefly, for
//! the chunks in front of it to join the prefix; it is then read back (from
//! the page cache) and hashed for itself and for the file in one pass. One
//! whose wait runs out is hashed alone, and read back again as soon as the
//! prefix reaches it. A chunk checked by its CRC-32C (X-Chunk-Crc32c) has no
//! hash of its own: its CRC is worked out as it is written, and its bytes
//! go through SHA-256 only for the file. Completion waits for a claimant to hand the prefix back
//! rather than start over. Only what the prefix has not reached when the last
//! chunk arrives is read at completion, and the whole
//! file when nothing is known (after a restart or a reload: this is memory
//! only, so a power cut that loses unsynced data is still caught by reading
//! the file back).
//!
//! Why the prefix stays equal to the staged file's first bytes: each chunk is
//! written once, under its chunk lock, and completion demands that the
//! recorded chunks tile the file, so a recorded chunk never overwrites another
//! one's bytes in a file that completes. Any write that is not recorded (a bad
//! hash, a body cut off, a full disk, a request given up) may have written
//! anywhere, so it spoils its upload's entry, and that file is read back whole.
//! It does so after the writer thread has made its last write (even when the
//! request was dropped: the spoil guard travels with the bytes to the writer,
//! see `body`), and before
//! its chunk lock is released, so before the upload can complete. A write into
//! bytes already hashed spoils the entry at once. The maps are shared by
//! every receiver of the process with the same staging directory (see
//! [`for_staging_dir`]), so requests still running on a receiver that a
//! reload replaced spoil the same entries.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sha256::{Sha256Stream, update_both};

/// Uploads followed at once; more are read back at completion as before. An
/// entry is a hasher's state (about 100 bytes) and its upload id.
const MAX_ENTRIES: usize = 4096;

/// Read-back buffer for chunks that arrived ahead of the prefix.
const READ_BUF: usize = 256 << 10;

/// Read-back buffer of a chunk hashed after its write ([`hash_chunk`]): one
/// per chunk written ahead of its prefix, so many at once when many clients
/// send; a quarter of [`READ_BUF`] hashes as fast.
const CHUNK_READ_BUF: usize = 64 << 10;

/// The hashes followed for the uploads staged in `staging_dir`: one map per
/// directory for the life of the process.
pub(super) fn for_staging_dir(staging_dir: &std::path::Path) -> std::sync::Arc<FileHashes> {
    static MAPS: Mutex<Vec<(std::path::PathBuf, std::sync::Arc<FileHashes>)>> =
        Mutex::new(Vec::new());
    let dir = std::fs::canonicalize(staging_dir).unwrap_or_else(|_| staging_dir.to_owned());
    let mut maps = MAPS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, map)) = maps.iter().find(|(d, _)| *d == dir) {
        return map.clone();
    }
    let map = std::sync::Arc::new(FileHashes::default());
    maps.push((dir, map.clone()));
    map
}

/// How long completion waits for a claimant to hand its upload's prefix back
/// (see [`FileHashes::take`]) before reading the whole file instead.
const CLAIM_WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
pub(super) struct FileHashes {
    entries: Mutex<HashMap<String, Entry>>,
    /// Signalled whenever an entry stops being claimed (for completion,
    /// which blocks) ...
    released: Condvar,
    /// ... and the same for chunks waiting on the executor to be hashed
    /// together with their upload's prefix ([`FileHashes::wait_for_prefix`]).
    changed: tokio::sync::Notify,
    /// Completions waiting on `released` (for the tests).
    waiting: AtomicUsize,
    next_generation: AtomicU64,
}

struct Entry {
    /// Tells an entry from a later one under the same upload id (after the
    /// first was discarded), so that a late writer cannot update the new one.
    generation: u64,
    progress: Progress,
}

impl Entry {
    /// Takes the prefix out, leaving the entry claimed from its end:
    /// `(hasher, len, next_idx)`. The entry must hold a prefix.
    fn claim_prefix(&mut self) -> (Sha256Stream, u64, u64) {
        let from = match &self.progress {
            Progress::Prefix { len, .. } => *len,
            _ => unreachable!("only a prefix is claimed"),
        };
        let claimed = Progress::Claimed {
            from,
            recheck: false,
        };
        match std::mem::replace(&mut self.progress, claimed) {
            Progress::Prefix {
                hasher,
                len,
                next_idx,
            } => (hasher, len, next_idx),
            _ => unreachable!("only a prefix is claimed"),
        }
    }
}

enum Progress {
    /// The file's first `len` bytes, chunks `0..next_idx`.
    Prefix {
        hasher: Sha256Stream,
        len: u64,
        next_idx: u64,
    },
    /// Someone is extending the prefix from byte `from`; `recheck`: a chunk
    /// was recorded meanwhile that the claimant may not have seen.
    Claimed { from: u64, recheck: bool },
    /// The whole file arrived as one chunk: its hash is the chunk's.
    Whole { sha256: String },
    /// A write went wrong: the file is read back whole.
    Spoiled,
}

/// The right to extend an upload's prefix with one chunk as it is written.
pub(super) struct Claim {
    generation: u64,
    /// `None` when the chunk is the whole file: its own hash will do.
    hasher: Option<Sha256Stream>,
    len: u64,
    next_idx: u64,
}

impl Claim {
    /// Feeds the chunk's bytes, in order, as they are written, to the chunk's
    /// own hash and the file's (in one pass where the CPU allows).
    pub(super) fn update(&mut self, chunk: &mut Sha256Stream, bytes: &[u8]) {
        match &mut self.hasher {
            Some(file) => update_both(chunk, file, bytes),
            None => chunk.update(bytes),
        }
    }

    /// Whether the chunk is the whole file, so that the chunk's own hash is
    /// the file's and must be worked out ([`Claim::update`]).
    pub(super) fn is_whole(&self) -> bool {
        self.hasher.is_none()
    }

    /// Feeds the chunk's bytes to the file's hash only, for a writer that
    /// needs no hash of the chunk itself (a tus PATCH without
    /// `Upload-Checksum: sha256`); not for a claim that [`Claim::is_whole`].
    pub(super) fn update_file(&mut self, bytes: &[u8]) {
        if let Some(file) = &mut self.hasher {
            file.update(bytes);
        }
    }
}

/// What is known of a file's hash when its upload completes.
pub(super) enum Known {
    /// The file's SHA-256 (hex).
    Whole(String),
    /// The hash of its first `len` bytes: read the rest.
    Prefix {
        hasher: Sha256Stream,
        len: u64,
    },
    Nothing,
}

impl FileHashes {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map stays consistent whatever a panicking holder was doing:
        // every update is a single assignment.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called before writing a new chunk at `offset`: returns a claim if the
    /// chunk continues its upload's prefix (or starts it), so that it is
    /// hashed as it is written.
    pub(super) fn claim(
        &self,
        upload_id: &str,
        chunk_idx: u64,
        offset: u64,
        chunk_count: u64,
    ) -> Option<Claim> {
        let mut entries = self.entries();
        match entries.get_mut(upload_id) {
            None => {
                if chunk_idx != 0 || offset != 0 || entries.len() >= MAX_ENTRIES {
                    return None;
                }
                let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                entries.insert(
                    upload_id.to_owned(),
                    Entry {
                        generation,
                        progress: Progress::Claimed {
                            from: 0,
                            recheck: false,
                        },
                    },
                );
                Some(Claim {
                    generation,
                    hasher: (chunk_count > 1).then(Sha256Stream::new),
                    len: 0,
                    next_idx: 0,
                })
            }
            Some(entry) => match &entry.progress {
                Progress::Prefix { len, next_idx, .. }
                    if *len == offset && *next_idx == chunk_idx =>
                {
                    let (hasher, len, next_idx) = entry.claim_prefix();
                    Some(Claim {
                        generation: entry.generation,
                        hasher: Some(hasher),
                        len,
                        next_idx,
                    })
                }
                // A write into bytes already hashed (or being hashed) belongs
                // to no upload that completes (recorded chunks must tile the
                // file), but it changes the file: no hash can be trusted.
                Progress::Prefix { len: end, .. } | Progress::Claimed { from: end, .. }
                    if offset < *end =>
                {
                    entry.progress = Progress::Spoiled;
                    self.handed_back();
                    None
                }
                _ => None,
            },
        }
    }

    /// The claimed chunk (`length` bytes, hash `sha256`) is written and
    /// recorded: the prefix now ends after it.
    pub(super) fn extend(&self, upload_id: &str, claim: Claim, length: u64, sha256: &str) {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(upload_id) else {
            return;
        };
        if entry.generation != claim.generation
            || !matches!(entry.progress, Progress::Claimed { .. })
        {
            return;
        }
        entry.progress = match claim.hasher {
            Some(hasher) => Progress::Prefix {
                hasher,
                len: claim.len + length,
                next_idx: claim.next_idx + 1,
            },
            None => Progress::Whole {
                sha256: sha256.to_owned(),
            },
        };
        self.handed_back();
    }

    /// A write to the upload's staging file was not recorded: what it wrote
    /// is unknown, so the file will be read back whole.
    pub(super) fn spoil(&self, upload_id: &str) {
        if let Some(entry) = self.entries().get_mut(upload_id) {
            entry.progress = Progress::Spoiled;
            self.handed_back();
        }
    }

    /// The upload is gone (discarded, expired, or its staging file replaced).
    pub(super) fn forget(&self, upload_id: &str) {
        if self.entries().remove(upload_id).is_some() {
            self.handed_back();
        }
    }

    /// The caller worked out the whole file's hash (a tus upload, whose
    /// SHA-256 the client need not declare): completion takes it from here
    /// instead of reading the file back again.
    pub(super) fn settle(&self, upload_id: &str, sha256: String) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.entries().insert(
            upload_id.to_owned(),
            Entry {
                generation,
                progress: Progress::Whole { sha256 },
            },
        );
    }

    fn handed_back(&self) {
        self.released.notify_all();
        self.changed.notify_waiters();
    }

    /// Whether a chunk at `offset` lies beyond the end of its upload's
    /// followed prefix: one that got no [`Claim`] before its write, and may
    /// get one once the chunks in front of it are in the prefix
    /// ([`FileHashes::wait_for_prefix`]).
    pub(super) fn ahead_of_prefix(&self, upload_id: &str, offset: u64) -> bool {
        self.entries()
            .get(upload_id)
            .is_some_and(|e| match e.progress {
                Progress::Prefix { len: end, .. } | Progress::Claimed { from: end, .. } => {
                    offset > end
                }
                _ => false,
            })
    }

    /// Waits, for at most `limit`, until the upload's prefix ends at
    /// `offset` and is not claimed, so that a chunk written there can be
    /// hashed together with it; returns early once that cannot happen (the
    /// entry spoiled, completed or gone, or the prefix beyond `offset`).
    /// Waits on the executor, holding no thread.
    pub(super) async fn wait_for_prefix(&self, upload_id: &str, offset: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let waiting = match self.entries().get(upload_id).map(|e| &e.progress) {
                Some(Progress::Prefix { len, .. }) => *len < offset,
                Some(Progress::Claimed { from, .. }) => *from <= offset,
                _ => false,
            };
            if !waiting || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// Takes what is known of the file's hash, at completion. Every chunk is
    /// recorded by then, but the prefix may still be claimed: by the request
    /// that recorded the last chunk, between its record and its
    /// [`FileHashes::extend`], or by another request's [`FileHashes::catch_up`]
    /// reading chunks back. Taking it then would leave nothing known, and the
    /// whole file would be read back a second time, so this waits (up to
    /// [`CLAIM_WAIT`]) for the claimant to hand it back. Blocks.
    pub(super) fn take(&self, upload_id: &str) -> Known {
        let deadline = Instant::now() + CLAIM_WAIT;
        let mut entries = self.entries();
        loop {
            let claimed = entries
                .get(upload_id)
                .is_some_and(|e| matches!(e.progress, Progress::Claimed { .. }));
            let left = deadline.saturating_duration_since(Instant::now());
            if !claimed || left.is_zero() {
                break;
            }
            self.waiting.fetch_add(1, Ordering::SeqCst);
            entries = self
                .released
                .wait_timeout(entries, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        match entries.remove(upload_id).map(|e| e.progress) {
            Some(Progress::Whole { sha256 }) => Known::Whole(sha256),
            Some(Progress::Prefix { hasher, len, .. }) => Known::Prefix { hasher, len },
            _ => Known::Nothing,
        }
    }

    /// Extends the upload's prefix over chunks already recorded beyond it,
    /// reading them back from `staged`: `recorded(idx)` gives chunk `idx`'s
    /// offset and length if it is recorded. A chunk recorded while another
    /// thread is extending is left to that thread.
    pub(super) fn catch_up<E>(
        &self,
        upload_id: &str,
        staged: impl Fn() -> io::Result<File>,
        mut recorded: impl FnMut(u64) -> Result<Option<(u64, u64)>, E>,
    ) {
        let mut file = None;
        loop {
            let (generation, mut hasher, mut len, mut next_idx) = {
                let mut entries = self.entries();
                let Some(entry) = entries.get_mut(upload_id) else {
                    return;
                };
                match &mut entry.progress {
                    Progress::Prefix { .. } => {}
                    Progress::Claimed { recheck, .. } => {
                        *recheck = true;
                        return;
                    }
                    Progress::Whole { .. } | Progress::Spoiled => return,
                }
                let (hasher, len, next_idx) = entry.claim_prefix();
                (entry.generation, hasher, len, next_idx)
            };
            let mut read_ok = true;
            while let Ok(Some((offset, length))) = recorded(next_idx) {
                if offset != len {
                    break;
                }
                if file.is_none() {
                    file = staged().ok();
                }
                let Some(f) = &file else {
                    read_ok = false;
                    break;
                };
                if hash_range(f, offset, length, &mut hasher).is_err() {
                    read_ok = false;
                    break;
                }
                len += length;
                next_idx += 1;
            }
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(upload_id) else {
                return;
            };
            if entry.generation != generation {
                return;
            }
            let recheck = match entry.progress {
                Progress::Claimed { recheck, .. } => recheck,
                _ => return,
            };
            self.handed_back();
            if !read_ok {
                entry.progress = Progress::Spoiled;
                return;
            }
            entry.progress = Progress::Prefix {
                hasher,
                len,
                next_idx,
            };
            if !recheck {
                return;
            }
        }
    }
}

/// The SHA-256 (hex) of the chunk of `length` bytes that was written at
/// `offset` of `file`, read back; with a `claim`, its bytes extend the file's
/// hash in the same pass. Without `own`, only the file's hash takes them and
/// the result is empty (a chunk checked by its CRC).
pub(super) fn hash_chunk(
    file: &File,
    offset: u64,
    length: u64,
    mut claim: Option<&mut Claim>,
    own: bool,
) -> io::Result<String> {
    let mut chunk = own.then(Sha256Stream::new);
    read_range(file, offset, length, CHUNK_READ_BUF, |bytes| {
        match (claim.as_deref_mut(), chunk.as_mut()) {
            (Some(claim), Some(chunk)) => claim.update(chunk, bytes),
            (Some(claim), None) => claim.update_file(bytes),
            (None, Some(chunk)) => chunk.update(bytes),
            (None, None) => {}
        }
    })?;
    Ok(chunk.map(Sha256Stream::finalize_hex).unwrap_or_default())
}

/// Hashes `length` bytes of `file` from `offset`; an error if it ends first.
pub(super) fn hash_range(
    file: &File,
    offset: u64,
    length: u64,
    hasher: &mut Sha256Stream,
) -> io::Result<()> {
    read_range(file, offset, length, READ_BUF, |bytes| hasher.update(bytes))
}

/// Hands `length` bytes of `file` from `offset` to `take`, read through a
/// buffer of at most `buf_size`; an error if the file ends first.
fn read_range(
    file: &File,
    offset: u64,
    length: u64,
    buf_size: usize,
    mut take: impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut buf = vec![0u8; length.clamp(1, buf_size as u64) as usize];
    let mut done = 0u64;
    while done < length {
        let want = buf.len().min((length - done) as usize);
        file.read_exact_at(&mut buf[..want], offset + done)?;
        take(&buf[..want]);
        done += want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;
    use std::io::Write;

    fn staged(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staged");
        File::create(&path).unwrap().write_all(bytes).unwrap();
        (dir, path)
    }

    fn digest(bytes: &[u8]) -> String {
        hex::encode(sha2::Sha256::digest(bytes))
    }

    fn finish(known: Known, file: &[u8]) -> Option<String> {
        match known {
            Known::Whole(sha) => Some(sha),
            Known::Prefix { mut hasher, len } => {
                hasher.update(&file[len as usize..]);
                Some(hasher.finalize_hex())
            }
            Known::Nothing => None,
        }
    }

    #[test]
    fn chunks_in_order_are_hashed_as_written() {
        let file: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let hashes = FileHashes::default();
        for (idx, part) in file.chunks(100).enumerate() {
            let mut claim = hashes
                .claim("u", idx as u64, idx as u64 * 100, 3)
                .expect("claim");
            claim.update(&mut Sha256Stream::new(), part);
            hashes.extend("u", claim, part.len() as u64, &digest(part));
        }
        assert_eq!(finish(hashes.take("u"), &file), Some(digest(&file)));
        assert!(matches!(hashes.take("u"), Known::Nothing), "taken once");
    }

    #[test]
    fn a_single_chunk_file_keeps_the_chunk_hash() {
        let hashes = FileHashes::default();
        let mut claim = hashes.claim("u", 0, 0, 1).expect("claim");
        claim.update(&mut Sha256Stream::new(), b"abc");
        hashes.extend("u", claim, 3, &digest(b"abc"));
        assert!(matches!(hashes.take("u"), Known::Whole(s) if s == digest(b"abc")));
    }

    #[test]
    fn chunks_ahead_of_the_prefix_are_read_back() {
        let file: Vec<u8> = (0..400u32).map(|i| (i * 7) as u8).collect();
        let (_dir, path) = staged(&file);
        let hashes = FileHashes::default();
        let mut claim = hashes.claim("u", 0, 0, 4).expect("claim");
        // Chunks 1 and 2 are written while chunk 0 is: no claim for them.
        assert!(hashes.claim("u", 1, 100, 4).is_none());
        assert!(hashes.claim("u", 2, 200, 4).is_none());
        let recorded = |idx: u64| Ok::<_, ()>((1..3).contains(&idx).then_some((idx * 100, 100)));
        // Chunk 1's catch-up finds the prefix claimed and leaves it a note.
        hashes.catch_up("u", || File::open(&path), recorded);
        claim.update(&mut Sha256Stream::new(), &file[..100]);
        hashes.extend("u", claim, 100, &digest(&file[..100]));
        hashes.catch_up("u", || File::open(&path), recorded);
        // Chunk 3 continues the prefix again.
        let mut claim = hashes
            .claim("u", 3, 300, 4)
            .expect("claim after catching up");
        claim.update(&mut Sha256Stream::new(), &file[300..]);
        hashes.extend("u", claim, 100, &digest(&file[300..]));
        match hashes.take("u") {
            Known::Prefix { hasher, len } => {
                assert_eq!(len, 400);
                assert_eq!(hasher.finalize_hex(), digest(&file));
            }
            _ => panic!("expected the whole prefix"),
        }
    }

    #[test]
    fn completion_waits_for_a_claimant_to_hand_the_prefix_back() {
        let file = b"first chunk, second chunk";
        let hashes = std::sync::Arc::new(FileHashes::default());
        let mut first = hashes.claim("u", 0, 0, 2).expect("claim");
        first.update(&mut Sha256Stream::new(), &file[..13]);
        hashes.extend("u", first, 13, &digest(&file[..13]));
        // The last chunk is recorded, and its writer still holds the claim
        // when another request completes the upload.
        let mut last = hashes.claim("u", 1, 13, 2).expect("claim");
        let taker = std::thread::spawn({
            let hashes = hashes.clone();
            move || hashes.take("u")
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while hashes.waiting.load(Ordering::SeqCst) == 0 && !taker.is_finished() {
            assert!(
                Instant::now() < deadline,
                "take() neither waited nor returned"
            );
            std::thread::yield_now();
        }
        assert!(!taker.is_finished(), "took the prefix while it was claimed");
        last.update(&mut Sha256Stream::new(), &file[13..]);
        hashes.extend("u", last, 12, &digest(&file[13..]));
        match taker.join().unwrap() {
            Known::Prefix { hasher, len } => {
                assert_eq!(len, file.len() as u64);
                assert_eq!(hasher.finalize_hex(), digest(file));
            }
            _ => panic!("expected the whole file's prefix"),
        }
    }

    #[tokio::test]
    async fn a_chunk_written_ahead_is_hashed_with_the_prefix_once_it_arrives() {
        let file: Vec<u8> = (0..300u32).map(|i| (i * 13) as u8).collect();
        let (_dir, path) = staged(&file);
        let hashes = std::sync::Arc::new(FileHashes::default());
        let mut first = hashes.claim("u", 0, 0, 3).expect("claim");
        // Chunks 1 and 2 are written while chunk 0 is: no claim for them,
        // and both are ahead of the prefix.
        assert!(hashes.claim("u", 1, 100, 3).is_none());
        assert!(hashes.ahead_of_prefix("u", 100) && hashes.ahead_of_prefix("u", 200));
        assert!(!hashes.ahead_of_prefix("u", 0));
        assert!(!hashes.ahead_of_prefix("other", 100));
        let deferred = |idx: u64| {
            let (hashes, path) = (hashes.clone(), path.clone());
            tokio::spawn(async move {
                let offset = idx * 100;
                hashes
                    .wait_for_prefix("u", offset, Duration::from_secs(30))
                    .await;
                let mut claim = hashes.claim("u", idx, offset, 3);
                let file = File::open(&path).unwrap();
                let sha = hash_chunk(&file, offset, 100, claim.as_mut(), true).unwrap();
                let paired = claim.is_some();
                if let Some(claim) = claim {
                    hashes.extend("u", claim, 100, &sha);
                }
                (sha, paired)
            })
        };
        let (second, third) = (deferred(2), deferred(1));
        // Both start waiting while chunk 0 is still being written.
        tokio::task::yield_now().await;
        first.update(&mut Sha256Stream::new(), &file[..100]);
        hashes.extend("u", first, 100, &digest(&file[..100]));
        assert_eq!(third.await.unwrap(), (digest(&file[100..200]), true));
        assert_eq!(second.await.unwrap(), (digest(&file[200..]), true));
        match hashes.take("u") {
            Known::Prefix { hasher, len } => {
                assert_eq!(len, 300);
                assert_eq!(hasher.finalize_hex(), digest(&file));
            }
            _ => panic!("expected the whole file's prefix"),
        }
    }

    #[tokio::test]
    async fn a_chunk_ahead_stops_waiting_for_a_chunk_that_never_comes() {
        let file = b"0123456789";
        let (_dir, path) = staged(file);
        let hashes = FileHashes::default();
        let _stalled = hashes.claim("u", 0, 0, 2).expect("claim");
        let started = std::time::Instant::now();
        hashes
            .wait_for_prefix("u", 5, Duration::from_millis(50))
            .await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        let claim = hashes.claim("u", 1, 5, 2);
        assert!(claim.is_none(), "the prefix is still claimed");
        let sha = hash_chunk(&File::open(&path).unwrap(), 5, 5, None, true).unwrap();
        assert_eq!(sha, digest(&file[5..]));
        // A spoiled entry ends the wait at once.
        hashes.spoil("u");
        let started = std::time::Instant::now();
        hashes
            .wait_for_prefix("u", 5, Duration::from_secs(30))
            .await;
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn an_unrecorded_write_spoils_the_entry_for_good() {
        let hashes = FileHashes::default();
        let mut claim = hashes.claim("u", 0, 0, 2).expect("claim");
        claim.update(&mut Sha256Stream::new(), b"first");
        hashes.spoil("u");
        hashes.extend("u", claim, 5, &digest(b"first"));
        assert!(hashes.claim("u", 1, 5, 2).is_none());
        assert!(matches!(hashes.take("u"), Known::Nothing));
    }

    #[test]
    fn a_write_into_hashed_bytes_spoils_the_entry() {
        let hashes = FileHashes::default();
        let mut claim = hashes.claim("u", 0, 0, 3).expect("claim");
        claim.update(&mut Sha256Stream::new(), b"first");
        hashes.extend("u", claim, 5, &digest(b"first"));
        // Chunk 2 declared at offset 3, inside chunk 0's bytes.
        assert!(hashes.claim("u", 2, 3, 3).is_none());
        assert!(hashes.claim("u", 1, 5, 3).is_none(), "spoiled for good");
        assert!(matches!(hashes.take("u"), Known::Nothing));
    }

    #[test]
    fn a_late_writer_cannot_update_a_newer_upload_of_the_same_id() {
        let hashes = FileHashes::default();
        let old = hashes.claim("u", 0, 0, 2).expect("claim");
        hashes.forget("u");
        let mut new = hashes.claim("u", 0, 0, 2).expect("claim of the new upload");
        hashes.extend("u", old, 5, &digest(b"stale"));
        new.update(&mut Sha256Stream::new(), b"fresh");
        hashes.extend("u", new, 5, &digest(b"fresh"));
        match hashes.take("u") {
            Known::Prefix { hasher, len } => {
                assert_eq!(len, 5);
                assert_eq!(hasher.finalize_hex(), digest(b"fresh"));
            }
            _ => panic!("expected the new upload's prefix"),
        }
    }

    #[test]
    fn only_a_bounded_number_of_uploads_are_followed() {
        let hashes = FileHashes::default();
        for i in 0..MAX_ENTRIES {
            assert!(hashes.claim(&format!("u{i}"), 0, 0, 2).is_some());
        }
        assert!(hashes.claim("one-more", 0, 0, 2).is_none());
        assert!(matches!(hashes.take("one-more"), Known::Nothing));
    }
}
