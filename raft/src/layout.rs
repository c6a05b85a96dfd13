//! File layouts: each chunk of a file is a sorted list of non-overlapping slices.
//!
//! These are pure functions on slice lists; `RefDelta` records how block reference counts
//! change so the caller can update them in the same atomic batch.

use std::collections::BTreeMap;

use crate::types::{BlockId, CHUNK_SIZE, Slice};

/// Changes to block reference counts made while editing layouts.
#[derive(Default, Debug)]
pub struct RefDelta(pub BTreeMap<BlockId, i64>);

impl RefDelta {
    pub fn add(&mut self, id: BlockId, n: i64) {
        *self.0.entry(id).or_default() += n;
    }
}

/// Removes the byte range `[start, end)` from `slices`, trimming and splitting slices as needed.
pub fn punch(slices: &mut Vec<Slice>, start: u64, end: u64, refs: &mut RefDelta) {
    if start >= end {
        return;
    }
    let mut out = Vec::with_capacity(slices.len() + 1);
    for s in slices.drain(..) {
        if s.end() <= start || s.off >= end {
            out.push(s);
            continue;
        }
        let keep_left = s.off < start;
        let keep_right = s.end() > end;
        if keep_left {
            out.push(Slice {
                len: (start - s.off) as u32,
                ..s
            });
        }
        if keep_right {
            let cut = (end - s.off) as u32;
            out.push(Slice {
                off: end,
                len: s.len - cut,
                block_off: s.block_off + cut,
                ..s
            });
        }
        match (keep_left, keep_right) {
            (false, false) => refs.add(s.block, -1),
            (true, true) => refs.add(s.block, 1),
            _ => {}
        }
    }
    *slices = out;
}

/// Lays `new` over `slices`: the bytes it covers now come from it.
pub fn overlay(slices: &mut Vec<Slice>, new: Slice, refs: &mut RefDelta) {
    if new.len == 0 {
        return;
    }
    punch(slices, new.off, new.end(), refs);
    let at = slices.partition_point(|s| s.off < new.off);
    slices.insert(at, new);
    refs.add(new.block, 1);
}

/// Splits a slice at chunk boundaries: one piece per chunk, with its chunk index.
pub fn split_by_chunk(s: Slice) -> Vec<(u64, Slice)> {
    let mut out = Vec::new();
    let mut cur = s;
    while cur.len > 0 {
        let index = cur.off / CHUNK_SIZE;
        let chunk_end = (index + 1) * CHUNK_SIZE;
        if cur.end() <= chunk_end {
            out.push((index, cur));
            break;
        }
        let head = (chunk_end - cur.off) as u32;
        out.push((index, Slice { len: head, ..cur }));
        cur = Slice {
            off: chunk_end,
            len: cur.len - head,
            block_off: cur.block_off + head,
            ..cur
        };
    }
    out
}

/// The parts of `slices` inside `[start, end)`, trimmed to it.
pub fn extract(slices: &[Slice], start: u64, end: u64) -> Vec<Slice> {
    let mut out = Vec::new();
    for s in slices {
        if s.end() <= start || s.off >= end {
            continue;
        }
        let from = s.off.max(start);
        let to = s.end().min(end);
        out.push(Slice {
            off: from,
            len: (to - from) as u32,
            block_off: s.block_off + (from - s.off) as u32,
            ..*s
        });
    }
    out
}

/// The chunk indexes that hold bytes of `[start, end)`.
pub fn chunks_of(start: u64, end: u64) -> std::ops::Range<u64> {
    if start >= end {
        return 0..0;
    }
    start / CHUNK_SIZE..(end - 1) / CHUNK_SIZE + 1
}

#[cfg(test)]
mod tests;
