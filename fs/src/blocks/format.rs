// PERF-CRITICAL: every block read from disk is parsed and verified here.
//! The on-disk format of a block file.
//!
//! ```text
//! [data: len bytes][chunk hashes: n × 32 bytes][footer: 48 bytes]
//! footer = magic "SHOALBK1" | len: u32 le | chunk size: u32 le | blake3(chunk hashes ‖ len ‖ chunk size)
//! ```
//!
//! The block's name is blake3 of its data. The chunk hashes (blake3 of each 64 KiB of data) let a
//! small read verify only the chunks it touches instead of the whole block; the footer hash
//! protects the chunk hashes themselves. Any flipped bit in the data, the hashes or the footer
//! is caught before a byte is returned.

use shoal_raft::BlockId;

pub const CHUNK: usize = 64 << 10;
pub const MAGIC: &[u8; 8] = b"SHOALBK1";
pub const FOOTER: usize = 48;

/// The verified chunk hashes of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    pub len: u32,
    pub hashes: Vec<[u8; 32]>,
}

pub fn chunks_in(len: usize) -> usize {
    len.div_ceil(CHUNK)
}

fn footer_hash(hashes: &[[u8; 32]], len: u32) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for c in hashes {
        h.update(c);
    }
    h.update(&len.to_le_bytes());
    h.update(&(CHUNK as u32).to_le_bytes());
    *h.finalize().as_bytes()
}

/// The trailer (chunk hashes and footer) to write after `data`.
pub fn trailer(data: &[u8]) -> Vec<u8> {
    let hashes: Vec<[u8; 32]> = data
        .chunks(CHUNK)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    let len = data.len() as u32;
    let mut out = Vec::with_capacity(hashes.len() * 32 + FOOTER);
    for h in &hashes {
        out.extend_from_slice(h);
    }
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(CHUNK as u32).to_le_bytes());
    out.extend_from_slice(&footer_hash(&hashes, len));
    out
}

/// The size of the trailer of a block of `len` bytes.
pub fn trailer_len(len: usize) -> usize {
    chunks_in(len) * 32 + FOOTER
}

/// The data length of a block whose file is `total` bytes long, if some length fits.
pub fn len_from_file_size(total: u64) -> Option<u32> {
    let body = total.checked_sub(FOOTER as u64)?;
    // len + 32 * ceil(len / CHUNK) == body; len is within one chunk's hashes of the estimate.
    let estimate = body * CHUNK as u64 / (CHUNK as u64 + 32);
    (estimate.saturating_sub(64)..=estimate + 64)
        .find(|len| len + 32 * len.div_ceil(CHUNK as u64) == body)
        .and_then(|len| u32::try_from(len).ok())
}

/// Why a trailer or chunk failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    Footer,
    Chunk(usize),
    WholeBlock,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Footer => write!(f, "its footer or chunk hash list is damaged"),
            Damage::Chunk(i) => write!(f, "chunk {i} does not match its hash"),
            Damage::WholeBlock => write!(f, "its bytes do not hash to its name"),
        }
    }
}

/// Parses and verifies a trailer read from offset `len` of a block file.
pub fn parse_trailer(trailer: &[u8], len: u32) -> Result<ChunkIndex, Damage> {
    let n = chunks_in(len as usize);
    if trailer.len() != n * 32 + FOOTER {
        return Err(Damage::Footer);
    }
    let (hash_bytes, footer) = trailer.split_at(n * 32);
    let hashes: Vec<[u8; 32]> = hash_bytes
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32-byte chunks"))
        .collect();
    let field = |a: usize| u32::from_le_bytes(footer[a..a + 4].try_into().expect("4 bytes"));
    if &footer[..8] != MAGIC
        || field(8) != len
        || field(12) != CHUNK as u32
        || footer[16..48] != footer_hash(&hashes, len)
    {
        return Err(Damage::Footer);
    }
    Ok(ChunkIndex { len, hashes })
}

/// Verifies the chunks `first..` held back to back in `data`.
pub fn verify_chunks(index: &ChunkIndex, first: usize, data: &[u8]) -> Result<(), Damage> {
    for (i, c) in data.chunks(CHUNK).enumerate() {
        let at = first + i;
        if index.hashes.get(at) != Some(blake3::hash(c).as_bytes()) {
            return Err(Damage::Chunk(at));
        }
    }
    Ok(())
}

/// Verifies a whole block: every chunk, and the name.
pub fn verify_block(id: &BlockId, index: &ChunkIndex, data: &[u8]) -> Result<(), Damage> {
    verify_chunks(index, 0, data)?;
    if BlockId::of(data) != *id {
        return Err(Damage::WholeBlock);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(len: usize) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        let t = trailer(&data);
        assert_eq!(t.len(), trailer_len(len));
        assert_eq!(len_from_file_size((len + t.len()) as u64), Some(len as u32));
        let index = parse_trailer(&t, len as u32).unwrap();
        assert_eq!(index.hashes.len(), chunks_in(len));
        verify_block(&BlockId::of(&data), &index, &data).unwrap();
        if len > CHUNK {
            verify_chunks(&index, 1, &data[CHUNK..]).unwrap();
        }
        // Every single flipped bit in the trailer is caught.
        for i in (0..t.len()).step_by(7) {
            let mut bad = t.clone();
            bad[i] ^= 0x10;
            assert_eq!(
                parse_trailer(&bad, len as u32),
                Err(Damage::Footer),
                "byte {i}"
            );
        }
        if len > 0 {
            let mut bad = data.clone();
            bad[len - 1] ^= 1;
            assert_eq!(
                verify_chunks(&index, 0, &bad),
                Err(Damage::Chunk((len - 1) / CHUNK))
            );
        }
    }

    #[test]
    fn trailers_round_trip_and_catch_damage() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            check(len);
        }
    }

    #[test]
    fn a_trailer_for_another_length_is_refused() {
        let data = vec![1u8; 1000];
        assert_eq!(parse_trailer(&trailer(&data), 999), Err(Damage::Footer));
    }
}
