use super::*;

fn block(n: u8) -> BlockId {
    BlockId([n; 32])
}

fn s(off: u64, len: u32, b: u8, block_off: u32) -> Slice {
    Slice {
        off,
        len,
        block: block(b),
        block_off,
        block_len: 1 << 20,
    }
}

/// Lays `writes` over an empty layout and compares the layout and the net reference changes.
fn check(writes: &[Slice], expected: &[Slice], expected_refs: &[(u8, i64)]) {
    let mut slices = Vec::new();
    let mut refs = RefDelta::default();
    for w in writes {
        overlay(&mut slices, *w, &mut refs);
    }
    assert_eq!(slices, expected);
    let refs: Vec<(u8, i64)> = refs
        .0
        .iter()
        .filter(|(_, n)| **n != 0)
        .map(|(b, n)| (b.0[0], *n))
        .collect();
    assert_eq!(refs, expected_refs);
}

#[test]
fn disjoint_writes_are_kept_in_order() {
    check(
        &[s(100, 10, 2, 0), s(0, 10, 1, 0)],
        &[s(0, 10, 1, 0), s(100, 10, 2, 0)],
        &[(1, 1), (2, 1)],
    );
}

#[test]
fn full_overwrite_drops_the_old_reference() {
    check(
        &[s(0, 10, 1, 0), s(0, 10, 2, 0)],
        &[s(0, 10, 2, 0)],
        &[(2, 1)],
    );
}

#[test]
fn overwrite_in_the_middle_splits_and_adds_a_reference() {
    check(
        &[s(0, 30, 1, 0), s(10, 10, 2, 0)],
        &[s(0, 10, 1, 0), s(10, 10, 2, 0), s(20, 10, 1, 20)],
        &[(1, 2), (2, 1)],
    );
}

#[test]
fn overlapping_edges_are_trimmed() {
    check(
        &[s(0, 10, 1, 0), s(20, 10, 2, 0), s(5, 20, 3, 0)],
        &[s(0, 5, 1, 0), s(5, 20, 3, 0), s(25, 5, 2, 5)],
        &[(1, 1), (2, 1), (3, 1)],
    );
}

#[test]
fn punch_removes_and_splits() {
    let mut slices = vec![s(0, 10, 1, 0), s(10, 10, 2, 0)];
    let mut refs = RefDelta::default();
    punch(&mut slices, 5, 20, &mut refs);
    assert_eq!(slices, vec![s(0, 5, 1, 0)]);
    assert_eq!(refs.0.get(&block(2)), Some(&-1));
}

#[test]
fn split_by_chunk_cuts_at_boundaries() {
    let big = Slice {
        off: CHUNK_SIZE - 4,
        len: 10,
        block: block(1),
        block_off: 0,
        block_len: 10,
    };
    let parts = split_by_chunk(big);
    assert_eq!(parts.len(), 2);
    assert_eq!(
        (parts[0].0, parts[0].1.len, parts[0].1.block_off),
        (0, 4, 0)
    );
    assert_eq!(
        (
            parts[1].0,
            parts[1].1.off,
            parts[1].1.len,
            parts[1].1.block_off
        ),
        (1, CHUNK_SIZE, 6, 4)
    );
}

#[test]
fn extract_trims_to_the_range() {
    let slices = vec![s(0, 10, 1, 0), s(20, 10, 2, 0)];
    assert_eq!(extract(&slices, 5, 25), vec![s(5, 5, 1, 5), s(20, 5, 2, 0)]);
    assert_eq!(chunks_of(0, 0), 0..0);
    assert_eq!(chunks_of(0, CHUNK_SIZE + 1), 0..2);
}
