//! SHA-256 as chunks stream through: a hasher that can take the same bytes
//! into two hashes in one pass. On the receiver, a chunk that extends its
//! upload's hashed prefix and carries X-Chunk-Sha256 feeds its chunk hash and
//! the file's hash (X-File-Sha256) with the same bytes; with the x86 SHA extensions the two
//! compressions share each block's message schedule and run interleaved, which
//! hides most of the latency of `sha256rnds2` (one stream alone waits on it):
//! about 1.5 times the speed of hashing the bytes twice.
//!
//! Blocks are compressed by `sha2`'s `compress256` (which picks the fastest
//! code the CPU has) except where two hashes take the same blocks; those go
//! through [`compress_pair`] when the CPU has the SHA extensions, and through
//! `compress256` twice otherwise. Every path is checked against `sha2`'s
//! `Sha256` by the tests below.

use sha2::block_api::compress256;

const BLOCK: usize = 64;

const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A SHA-256 being computed.
#[derive(Clone)]
pub(crate) struct Sha256Stream {
    state: [u32; 8],
    /// The bytes after the last whole block.
    partial: [u8; BLOCK],
    partial_len: usize,
    /// Bytes taken in all.
    total: u64,
}

impl Default for Sha256Stream {
    fn default() -> Self {
        Sha256Stream {
            state: H0,
            partial: [0; BLOCK],
            partial_len: 0,
            total: 0,
        }
    }
}

impl Sha256Stream {
    pub(crate) fn new() -> Sha256Stream {
        Sha256Stream::default()
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.partial_len > 0 {
            let take = (BLOCK - self.partial_len).min(data.len());
            self.partial[self.partial_len..self.partial_len + take].copy_from_slice(&data[..take]);
            self.partial_len += take;
            data = &data[take..];
            if self.partial_len < BLOCK {
                return;
            }
            compress256(&mut self.state, &[self.partial]);
            self.partial_len = 0;
        }
        let whole = data.len() / BLOCK * BLOCK;
        compress_blocks(&mut self.state, &data[..whole]);
        let rest = &data[whole..];
        self.partial[..rest.len()].copy_from_slice(rest);
        self.partial_len = rest.len();
    }

    /// The digest, in lower-case hex as the protocol carries it.
    pub(crate) fn finalize_hex(self) -> String {
        hex::encode(self.finalize())
    }

    pub(crate) fn finalize(mut self) -> [u8; 32] {
        let bit_len = self.total.wrapping_mul(8);
        let mut tail = [0u8; 2 * BLOCK];
        tail[..self.partial_len].copy_from_slice(&self.partial[..self.partial_len]);
        tail[self.partial_len] = 0x80;
        // The length goes in the last 8 bytes of the first block that has room.
        let blocks = if self.partial_len < BLOCK - 8 { 1 } else { 2 };
        let end = blocks * BLOCK;
        tail[end - 8..end].copy_from_slice(&bit_len.to_be_bytes());
        compress_blocks(&mut self.state, &tail[..end]);
        let mut out = [0u8; 32];
        for (bytes, word) in out.chunks_exact_mut(4).zip(self.state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        out
    }
}

/// Feeds the same bytes to `a` and `b`. When both stand at the same place in
/// a block (always, for two hashes that started together, or a chunk at an
/// offset that is a multiple of 64), their whole blocks are compressed
/// together.
pub(crate) fn update_both(a: &mut Sha256Stream, b: &mut Sha256Stream, data: &[u8]) {
    if a.partial_len != b.partial_len || !pair_available() {
        a.update(data);
        b.update(data);
        return;
    }
    // Each finishes its own partial block (their contents may differ)...
    let head = ((BLOCK - a.partial_len) % BLOCK).min(data.len());
    a.update(&data[..head]);
    b.update(&data[..head]);
    let data = &data[head..];
    // ...then the whole blocks go through both at once...
    let whole = data.len() / BLOCK * BLOCK;
    if whole > 0 {
        compress_pair_checked(&mut a.state, &mut b.state, &data[..whole]);
        a.total += whole as u64;
        b.total += whole as u64;
    }
    // ...and the rest waits in both.
    a.update(&data[whole..]);
    b.update(&data[whole..]);
}

/// Compresses `bytes` (whole blocks) into `state`.
fn compress_blocks(state: &mut [u32; 8], bytes: &[u8]) {
    let (blocks, rest) = bytes.as_chunks::<BLOCK>();
    debug_assert!(rest.is_empty(), "whole blocks only");
    compress256(state, blocks);
}

#[cfg(target_arch = "x86_64")]
fn pair_available() -> bool {
    std::arch::is_x86_feature_detected!("sha")
        && std::arch::is_x86_feature_detected!("sse2")
        && std::arch::is_x86_feature_detected!("ssse3")
        && std::arch::is_x86_feature_detected!("sse4.1")
}

#[cfg(not(target_arch = "x86_64"))]
fn pair_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn compress_pair_checked(a: &mut [u32; 8], b: &mut [u32; 8], bytes: &[u8]) {
    assert_eq!(bytes.len() % BLOCK, 0, "whole blocks only");
    // SAFETY: `update_both` calls this only when `pair_available()` found
    // every feature `compress_pair` is compiled with; it reads `bytes` only
    // within its length, which is a whole number of blocks (asserted above).
    unsafe { x86::compress_pair(a, b, bytes) }
}

#[cfg(not(target_arch = "x86_64"))]
fn compress_pair_checked(a: &mut [u32; 8], b: &mut [u32; 8], bytes: &[u8]) {
    compress_blocks(a, bytes);
    compress_blocks(b, bytes);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// The next four message words from the previous sixteen.
    #[inline(always)]
    unsafe fn schedule(w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
        // SAFETY: only inlined into `compress_pair`, which has the features.
        unsafe {
            let t1 = _mm_sha256msg1_epu32(w0, w1);
            let t2 = _mm_alignr_epi8(w3, w2, 4);
            _mm_sha256msg2_epu32(_mm_add_epi32(t1, t2), w3)
        }
    }

    /// The state as the SHA instructions hold it: (ABEF, CDGH).
    #[inline(always)]
    unsafe fn load(state: &[u32; 8]) -> (__m128i, __m128i) {
        // SAFETY: reads the 32 bytes of `state`; see `schedule`.
        unsafe {
            let dcba = _mm_loadu_si128(state.as_ptr().cast());
            let efgh = _mm_loadu_si128(state.as_ptr().add(4).cast());
            let cdab = _mm_shuffle_epi32(dcba, 0xB1);
            let efhg = _mm_shuffle_epi32(efgh, 0x1B);
            (
                _mm_alignr_epi8(cdab, efhg, 8),
                _mm_blend_epi16(efhg, cdab, 0xF0),
            )
        }
    }

    #[inline(always)]
    unsafe fn store(state: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
        // SAFETY: writes the 32 bytes of `state`; see `schedule`.
        unsafe {
            let feba = _mm_shuffle_epi32(abef, 0x1B);
            let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
            _mm_storeu_si128(state.as_mut_ptr().cast(), _mm_blend_epi16(feba, dchg, 0xF0));
            _mm_storeu_si128(
                state.as_mut_ptr().add(4).cast(),
                _mm_alignr_epi8(dchg, feba, 8),
            );
        }
    }

    /// Compresses the whole blocks of `bytes` into both states: one message
    /// schedule per block, two interleaved chains of rounds.
    ///
    /// # Safety
    /// The CPU must have SHA, SSE2, SSSE3 and SSE4.1, and `bytes.len()` must
    /// be a multiple of 64.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn compress_pair(a: &mut [u32; 8], b: &mut [u32; 8], bytes: &[u8]) {
        // SAFETY: the caller guarantees the features; every load below is
        // within `bytes` (16-byte pieces of its whole 64-byte blocks) or `K`.
        unsafe {
            let byte_swap = _mm_set_epi64x(
                0x0C0D_0E0F_0809_0A0Bu64 as i64,
                0x0405_0607_0001_0203u64 as i64,
            );
            let (mut abef_a, mut cdgh_a) = load(a);
            let (mut abef_b, mut cdgh_b) = load(b);
            for block in bytes.chunks_exact(64) {
                let saved = (abef_a, cdgh_a, abef_b, cdgh_b);
                let p = block.as_ptr().cast::<__m128i>();
                let mut w = [
                    _mm_shuffle_epi8(_mm_loadu_si128(p), byte_swap),
                    _mm_shuffle_epi8(_mm_loadu_si128(p.add(1)), byte_swap),
                    _mm_shuffle_epi8(_mm_loadu_si128(p.add(2)), byte_swap),
                    _mm_shuffle_epi8(_mm_loadu_si128(p.add(3)), byte_swap),
                ];
                for i in 0..16 {
                    if i >= 4 {
                        w[i % 4] =
                            schedule(w[i % 4], w[(i + 1) % 4], w[(i + 2) % 4], w[(i + 3) % 4]);
                    }
                    let wk = _mm_add_epi32(w[i % 4], _mm_loadu_si128(K.as_ptr().add(4 * i).cast()));
                    let wk_high = _mm_shuffle_epi32(wk, 0x0E);
                    cdgh_a = _mm_sha256rnds2_epu32(cdgh_a, abef_a, wk);
                    cdgh_b = _mm_sha256rnds2_epu32(cdgh_b, abef_b, wk);
                    abef_a = _mm_sha256rnds2_epu32(abef_a, cdgh_a, wk_high);
                    abef_b = _mm_sha256rnds2_epu32(abef_b, cdgh_b, wk_high);
                }
                abef_a = _mm_add_epi32(abef_a, saved.0);
                cdgh_a = _mm_add_epi32(cdgh_a, saved.1);
                abef_b = _mm_add_epi32(abef_b, saved.2);
                cdgh_b = _mm_add_epi32(cdgh_b, saved.3);
            }
            store(a, abef_a, cdgh_a);
            store(b, abef_b, cdgh_b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    fn reference(parts: &[&[u8]]) -> String {
        let mut h = Sha256::new();
        parts.iter().for_each(|p| h.update(p));
        hex::encode(h.finalize())
    }

    #[test]
    fn matches_sha2_for_every_length_around_the_block_edges() {
        for n in (0..300).chain([4095, 4096, 4097, 65_536 + 55, 65_536 + 56, 1 << 20]) {
            let data = bytes(n, n as u32);
            let mut h = Sha256Stream::new();
            h.update(&data);
            assert_eq!(h.finalize_hex(), reference(&[&data]), "{n} bytes");
        }
    }

    #[test]
    fn matches_sha2_whatever_the_pieces() {
        let data = bytes(100_000, 9);
        for step in [1, 7, 63, 64, 65, 1000, 16_384, 40_000] {
            let mut h = Sha256Stream::new();
            data.chunks(step).for_each(|piece| h.update(piece));
            assert_eq!(h.finalize_hex(), reference(&[&data]), "pieces of {step}");
        }
    }

    /// A chunk's hash and its file's hash, fed together as the receiver does:
    /// aligned (the pair path) and not (each on its own), in pieces of
    /// awkward sizes.
    #[test]
    fn two_hashes_fed_together_match_sha2() {
        let before = bytes(300_000, 1);
        let chunk = bytes(200_003, 2);
        for prefix_len in [0, 64, 128, 4096, 262_144, 1, 63, 100, 299_999] {
            for step in [1, 64, 65, 1000, 65_536, 200_003] {
                let mut file = Sha256Stream::new();
                file.update(&before[..prefix_len]);
                let mut alone = Sha256Stream::new();
                for piece in chunk.chunks(step) {
                    update_both(&mut alone, &mut file, piece);
                }
                assert_eq!(
                    alone.finalize_hex(),
                    reference(&[&chunk]),
                    "chunk hash, prefix {prefix_len}, pieces of {step}"
                );
                assert_eq!(
                    file.finalize_hex(),
                    reference(&[&before[..prefix_len], &chunk]),
                    "file hash, prefix {prefix_len}, pieces of {step}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_paired_blocks_match_two_single_compressions() {
        if !pair_available() {
            eprintln!("no SHA extensions here: the paired path is not used");
            return;
        }
        let data = bytes(64 * 1000, 5);
        let (mut a, mut b) = ([1, 2, 3, 4, 5, 6, 7, 8], H0);
        compress_pair_checked(&mut a, &mut b, &data);
        let (mut ra, mut rb) = ([1, 2, 3, 4, 5, 6, 7, 8], H0);
        compress_blocks(&mut ra, &data);
        compress_blocks(&mut rb, &data);
        assert_eq!((a, b), (ra, rb));
    }
}
