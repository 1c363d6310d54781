//! `afyachain audit verify`: recomputes the Merkle roots of the anchored log ranges
//! from the local event log (not from any kept leaf) and compares them with the roots
//! on chain.

use alloy::primitives::{Address, B256};
use anyhow::Context;
use eventstore::{LogCursor, Store};

use super::{merkle, AuditAnchor, Chain};

/// One anchored range and whether the local log still hashes to its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub from: u64,
    pub to: u64,
    pub on_chain: B256,
    /// `None`: the local log is shorter than the range.
    pub local: Option<B256>,
}

impl Checked {
    pub fn matches(&self) -> bool {
        self.local == Some(self.on_chain)
    }
}

/// Checks every anchored range that overlaps ordinals `from..=to`.
pub async fn verify(
    store: &Store,
    chain: &Chain,
    anchor: Address,
    from: u64,
    to: u64,
) -> anyhow::Result<Vec<Checked>> {
    let contract = AuditAnchor::new(anchor, chain.provider.clone());
    let count = contract
        .anchorCount()
        .call()
        .await
        .context("reading the anchors on chain")?;
    let count = u64::try_from(count).unwrap_or(u64::MAX);
    let mut ranges = Vec::new();
    for i in 0..count {
        let a = contract
            .anchorAt(alloy::primitives::U256::from(i))
            .call()
            .await
            .context("reading an anchor")?;
        if a.toPosition >= from && a.fromPosition <= to {
            ranges.push((a.fromPosition, a.toPosition, a.root));
        }
    }
    let needed = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    // The log in log order, one leaf per event, as far as the ranges reach.
    let mut leaves = Vec::new();
    let mut cursor = LogCursor::START;
    while (leaves.len() as u64) < needed {
        let events = store.read_log(cursor, 1000).await?;
        let Some(last) = events.last().map(|e| e.cursor()) else {
            break;
        };
        leaves.extend(events.iter().map(merkle::leaf));
        cursor = last;
    }
    Ok(ranges
        .into_iter()
        .map(|(a, b, root)| {
            let start = usize::try_from(a.saturating_sub(1)).unwrap_or(usize::MAX);
            let end = usize::try_from(b).unwrap_or(usize::MAX);
            Checked {
                from: a,
                to: b,
                on_chain: root,
                local: leaves.get(start..end).map(merkle::root),
            }
        })
        .collect())
}
