//! The one seam between the uploader and the wire: a [`Delivery`] takes a
//! buffered file's pieces to one kind of peer.
//!
//! The uploader owns everything that is the same for every kind: which files
//! are due, the byte budget, the retry schedule, parking, and recording each
//! outcome in the buffer. A delivery owns the conversation with its peer and
//! nothing else; it never touches the buffer. Every kind can say how far its
//! peer got ([`Delivery::resume`]), send a piece ([`Delivery::send`]) and
//! finish a file whose pieces all arrived ([`Delivery::finish`]). What only
//! some kinds have is a capability the kind declares and the uploader asks
//! for: pieces in flight side by side ([`Delivery::window`]), a minimum piece
//! size ([`Delivery::min_piece_bytes`]), an upload created before its first
//! byte ([`Delivery::begin`]), and many small files in one request
//! ([`Delivery::batches`]).
//!
//! Resume state belongs to the kind and is kept by the buffer: an opaque text
//! per file (a multipart upload id, an upload URL) returned by
//! [`Delivery::begin`], and an opaque acknowledgement per piece (a part's
//! ETag) returned by [`Delivery::send`]. The uploader records either before it
//! relies on it, so an agent killed at any moment resumes the same upload
//! instead of starting a second copy.

use crate::agent::store::{ChunkMeta, Durability, FileRecord};

use super::error::UploadError;

/// A run of consecutive buffer chunks that a delivery sends as one piece. For
/// a kind without a minimum piece size every piece is one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The piece's position among the file's pieces, from 0 (a part's
    /// number, less one).
    pub index: usize,
    /// The piece's chunks, in order; never empty.
    pub chunks: Vec<ChunkMeta>,
}

impl Piece {
    /// The index of the piece's first chunk, which names the piece.
    pub fn first_idx(&self) -> u64 {
        self.chunks[0].idx
    }

    /// The piece's length in bytes.
    pub fn length(&self) -> u64 {
        self.chunks.iter().map(|c| c.length).sum()
    }

    /// The indices of the piece's chunks.
    pub fn idxs(&self) -> Vec<u64> {
        self.chunks.iter().map(|c| c.idx).collect()
    }

    /// The most retries any of its chunks has had.
    pub fn retry_count(&self) -> u64 {
        self.chunks.iter().map(|c| c.retry_count).max().unwrap_or(0)
    }
}

/// What a peer knows of a file that has progress.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The peer holds the whole file (an earlier reply was lost).
    Complete { server_name: Option<String> },
    /// The peer holds exactly these chunks (by index); send the rest.
    Received(Vec<u64>),
    /// The peer forgot the upload (it expired): send every piece again, after
    /// [`Delivery::begin`] if the kind has it.
    Forgotten,
    /// The peer cannot say: trust the buffer's record.
    Unknown,
}

/// How a sent piece was answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// The piece arrived; `ack` is what the kind needs to remember about it
    /// to finish the file later (a part's ETag), if anything.
    Acknowledged { ack: Option<String> },
    /// The piece arrived and the peer holds the whole file.
    Complete { server_name: Option<String> },
}

/// How finishing a file whose pieces all arrived went.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// The peer holds the whole file.
    Complete { server_name: Option<String> },
    /// The peer has every piece but did not say the file is complete; ask it
    /// again at the next attempt.
    NotYet,
}

/// One file of a batch: its record, its single chunk and that chunk's bytes.
pub struct BatchFile<'a> {
    pub file: &'a FileRecord,
    pub chunk: &'a ChunkMeta,
    pub data: Vec<u8>,
}

/// How a batch request was answered.
#[derive(Debug)]
pub enum BatchSent {
    /// The peer does not take this batch (it predates batches, or its limits
    /// are tighter): nothing was recorded; send the files one by one.
    Refused,
    /// One answer per file, in the order of the request: the name the peer
    /// stored it under, or why it did not.
    Answered(Vec<Result<Option<String>, UploadError>>),
}

/// The capability to send many small files, each a single chunk, in one
/// request.
#[async_trait::async_trait]
pub trait Batches: Send + Sync {
    /// The most files one batch may hold now; below 2, batches are off.
    fn max_files(&self) -> usize;

    /// A generous estimate of the request overhead `file` adds to a batch.
    fn overhead(&self, file: &FileRecord) -> usize;

    /// The overhead one batch may add up to.
    fn max_overhead(&self) -> usize;

    /// Sends the files in one request.
    async fn send_batch(&self, files: Vec<BatchFile<'_>>) -> Result<BatchSent, UploadError>;
}

/// One kind of target: how a buffered file's pieces reach where they belong.
#[async_trait::async_trait]
pub trait Delivery: Send + Sync {
    /// The kind's name, as the config spells it.
    fn kind(&self) -> &'static str;

    /// Where it delivers, for log lines.
    fn endpoint(&self) -> &str;

    /// Pieces of one file that may be in flight at once right now (the
    /// target's byte budget bounds them too). Asked before each send, since a
    /// kind may learn what its peer takes from the first reply.
    fn window(&self) -> usize {
        1
    }

    /// Every piece but a file's last is at least this long: consecutive
    /// chunks are joined until it is reached. 0: each chunk is a piece.
    fn min_piece_bytes(&self) -> u64 {
        0
    }

    /// How progress with this peer is recorded. [`Durability::Unsynced`] only
    /// where the peer can tell again what a power cut made the buffer forget.
    fn durability(&self) -> Durability {
        Durability::Synced
    }

    /// The batch capability, when the peer has it.
    fn batches(&self) -> Option<&dyn Batches> {
        None
    }

    /// Whether the peer takes a file's pieces before the file's hash is
    /// known, so that a large file is sent while it is still being buffered
    /// ([`FileRecord::is_buffering`]): `None` until the kind knows (see
    /// [`Delivery::learn_streaming`]). A kind that says yes must never let
    /// the peer finish a file before the uploader hands it the file's hash
    /// (which comes with the last chunk, after the file is sealed).
    fn streams(&self) -> Option<bool> {
        Some(false)
    }

    /// Finds out [`Delivery::streams`] when it is `None`, before the first
    /// piece of a file still being buffered is sent.
    async fn learn_streaming(&self) -> Result<bool, UploadError> {
        Ok(self.streams() == Some(true))
    }

    /// Prepares a file's upload before its first piece when the kind must
    /// create it on the peer first. The text returned is the file's resume
    /// state: the uploader records it before any piece is sent. `state` is
    /// the one recorded before, if any.
    async fn begin(
        &self,
        _file: &FileRecord,
        state: Option<&str>,
    ) -> Result<Option<String>, UploadError> {
        Ok(state.map(str::to_owned))
    }

    /// Asks the peer how far a file with progress got. `state` is the file's
    /// recorded resume state.
    async fn resume(&self, file: &FileRecord, state: Option<&str>) -> Result<Resume, UploadError>;

    /// Sends one piece.
    async fn send(
        &self,
        file: &FileRecord,
        state: Option<&str>,
        piece: &Piece,
        data: Vec<u8>,
    ) -> Result<Sent, UploadError>;

    /// Finishes a file every piece of which the peer acknowledged without
    /// saying it is complete. `acks` has each piece's acknowledgement, in
    /// order.
    async fn finish(
        &self,
        file: &FileRecord,
        state: Option<&str>,
        acks: &[(Piece, Option<String>)],
    ) -> Result<Finished, UploadError>;

    /// Discards what the peer holds of a file that will not be finished (an
    /// operator purged it): a kind whose uploads live on until they are
    /// completed or aborted releases them here. `state` is the file's
    /// recorded resume state.
    async fn abort(&self, _file: &FileRecord, _state: Option<&str>) -> Result<(), UploadError> {
        Ok(())
    }
}

/// Splits a file's chunks (in order) into pieces of at least `min_bytes`,
/// the last one taking what is left.
pub fn pieces(chunks: Vec<ChunkMeta>, min_bytes: u64) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut current: Vec<ChunkMeta> = Vec::new();
    let mut bytes = 0;
    for chunk in chunks {
        bytes += chunk.length;
        current.push(chunk);
        if bytes >= min_bytes {
            pieces.push(Piece {
                index: pieces.len(),
                chunks: std::mem::take(&mut current),
            });
            bytes = 0;
        }
    }
    if !current.is_empty() {
        pieces.push(Piece {
            index: pieces.len(),
            chunks: current,
        });
    }
    pieces
}

/// The SHA-256 of a chunk buffered without it (the chunks of a file of
/// several chunks keep their CRC-32C only), for a peer that needs it: worked
/// out from the bytes read back, once they match the CRC-32C taken from the
/// source, so that a chunk damaged in the buffer is never sent with a hash
/// of the damage. Returns the bytes too.
pub(crate) async fn checked_chunk_sha256(
    file: &FileRecord,
    chunk: &ChunkMeta,
    data: bytes::Bytes,
) -> Result<(bytes::Bytes, [u8; 32]), UploadError> {
    let what = || format!("chunk {} of {:?}", chunk.idx, file.remote_name);
    let Some(expected) = chunk.crc32c else {
        return Err(UploadError::Request {
            what: what(),
            message: "the buffer holds neither its SHA-256 nor its CRC-32C; stop the daemon and run `indexedcp doctor`".into(),
        });
    };
    let hashed = tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        let crc = crc32c::crc32c(&data);
        let sha256: Option<[u8; 32]> =
            (crc == expected).then(|| sha2::Sha256::digest(&data).into());
        (data, crc, sha256)
    })
    .await;
    match hashed {
        Ok((data, _, Some(sha256))) => Ok((data, sha256)),
        Ok((_, crc, None)) => Err(UploadError::Request {
            what: what(),
            message: format!(
                "its bytes in the buffer have CRC-32C {}, not the {} taken when they were read from the source: the buffer is damaged; stop the daemon and run `indexedcp doctor`",
                crate::protocol::crc32c_hex(crc),
                crate::protocol::crc32c_hex(expected)
            ),
        }),
        Err(e) => Err(UploadError::Request {
            what: what(),
            message: format!("hashing it failed: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(idx: u64, length: u64) -> ChunkMeta {
        ChunkMeta {
            idx,
            offset: idx * 10,
            length,
            sha256: String::new(),
            crc32c: None,
            uploaded: false,
            retry_count: idx,
            ack: None,
        }
    }

    #[test]
    fn chunks_join_into_pieces_of_the_minimum_size_and_the_last_takes_the_rest() {
        let chunks: Vec<ChunkMeta> = (0..7).map(|i| chunk(i, 10)).collect();
        let shapes = |min| -> Vec<Vec<u64>> {
            pieces(chunks.clone(), min)
                .iter()
                .map(Piece::idxs)
                .collect()
        };
        assert_eq!(shapes(0), [[0], [1], [2], [3], [4], [5], [6]]);
        assert_eq!(shapes(10), shapes(0));
        assert_eq!(shapes(25), [vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(shapes(30), [vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(shapes(70), [vec![0, 1, 2, 3, 4, 5, 6]]);
        assert_eq!(shapes(1000), [vec![0, 1, 2, 3, 4, 5, 6]]);
        let piece = &pieces(chunks.clone(), 25)[1];
        assert_eq!(piece.index, 1);
        assert_eq!(
            (
                piece.first_idx(),
                piece.chunks[0].offset,
                piece.length(),
                piece.retry_count()
            ),
            (3, 30, 30, 5)
        );
        // An empty file is one chunk of length 0: one piece.
        assert_eq!(pieces(vec![chunk(0, 0)], 25).len(), 1);
    }
}
