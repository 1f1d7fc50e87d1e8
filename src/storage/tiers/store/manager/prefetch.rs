//! Prefetch from routing hints: the routed experts of the current block and those expected in
//! the next one (one block of look-ahead).

use super::{Manager, Mem};
use crate::storage::tiers::unit::UnitId;
use std::collections::{BTreeSet, HashSet};

impl Manager {
    /// Start loading the routed experts of `block` and the ones expected in the next block.
    pub(super) fn on_hint(&mut self, block: usize, routed: Vec<usize>, forward: bool) {
        if forward {
            self.fwd_used.entry(block).or_default().extend(routed.iter().copied());
        }
        if !self.prefetch || self.disk.is_none() {
            return;
        }
        let blocks: BTreeSet<usize> = self.entries.keys().map(|(b, _)| *b).collect();
        let next = if forward {
            blocks.range(block + 1..).next().copied()
        } else {
            blocks.range(..block).next_back().copied()
        };
        let mut order: Vec<UnitId> = routed.iter().map(|&e| (block, e)).collect();
        if let Some(n) = next {
            let expected = if forward {
                self.last_fwd_used.get(&n).cloned()
            } else {
                self.fwd_used.get(&n).cloned()
            };
            match expected {
                Some(set) => order.extend(set.into_iter().map(|e| (n, e))),
                None => order.extend(self.entries.keys().filter(|(b, _)| *b == n).copied()),
            }
        }
        let mut keep: HashSet<UnitId> = order.iter().copied().collect();
        keep.extend(self.waiting.iter().map(|w| w.id));
        let b = self.unit_bytes;
        for id in order {
            if !self.loadable(id) {
                continue;
            }
            // Straight into Device when it has free room; else into the host cache.
            let t = if self.free(Mem::Device) >= b {
                Mem::Device
            } else if self.budget[Mem::Host as usize] >= b && self.make_room(Mem::Host, b, &keep) {
                Mem::Host
            } else {
                break;
            };
            self.load(id, t, self.policy.params_only(&self.cursor));
            if let Some(e) = self.entries.get_mut(&id) {
                e.usage.unused_prefetch = true;
            }
            self.local.prefetched += 1;
        }
    }
}
