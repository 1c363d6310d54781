//! The audit trail's Merkle tree: one leaf per stored event (its identity, payload
//! and metadata as stored), over ranges of log ordinals (1-based, in log order).

use alloy::primitives::{keccak256, B256};
use eventstore::StoredEvent;

/// The leaf of one event: keccak-256 over its fields, each length-prefixed
/// ([`StoredEvent::canonical_bytes`]).
pub fn leaf(event: &StoredEvent) -> B256 {
    keccak256(event.canonical_bytes())
}

/// The root over `leaves` in order: pairs hashed together level by level, an odd
/// last node carried up as it is. Zero for no leaves.
pub fn root(leaves: &[B256]) -> B256 {
    if leaves.is_empty() {
        return B256::ZERO;
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => {
                    let mut joined = [0u8; 64];
                    joined[..32].copy_from_slice(a.as_slice());
                    joined[32..].copy_from_slice(b.as_slice());
                    keccak256(joined)
                }
                [a] => *a,
                _ => B256::ZERO,
            })
            .collect();
    }
    level[0]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn h(n: u8) -> B256 {
        B256::repeat_byte(n)
    }

    fn pair(a: B256, b: B256) -> B256 {
        let mut joined = a.to_vec();
        joined.extend_from_slice(b.as_slice());
        keccak256(joined)
    }

    #[test]
    fn roots_pair_leaves_and_carry_an_odd_one_up() {
        assert_eq!(root(&[]), B256::ZERO);
        assert_eq!(root(&[h(1)]), h(1));
        assert_eq!(root(&[h(1), h(2)]), pair(h(1), h(2)));
        assert_eq!(root(&[h(1), h(2), h(3)]), pair(pair(h(1), h(2)), h(3)));
        assert_eq!(
            root(&[h(1), h(2), h(3), h(4)]),
            pair(pair(h(1), h(2)), pair(h(3), h(4)))
        );
        // Order matters: a reordered or changed leaf changes the root.
        assert_ne!(root(&[h(2), h(1)]), root(&[h(1), h(2)]));
        assert_ne!(root(&[h(1), h(5)]), root(&[h(1), h(2)]));
    }
}
