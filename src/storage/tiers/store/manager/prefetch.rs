//! Prefetch from routing hints: the routed experts of the current block and those expected in
//! the next one, loaded as room frees up (not only at the hint).

use super::{Manager, Mem, Place};
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
        self.plan_keep = order.iter().copied().collect();
        self.plan = order;
        self.advance_prefetch();
    }

    /// Load what the plan still has on disk, in its order, while there is room: straight into
    /// Device when it has free room, else into the host cache (never pushing out a unit the plan
    /// or an acquirer wants). Called at each hint and again whenever a scheduling pass may have
    /// freed room, so that a block's loads start as soon as the block before it leaves the host
    /// cache for Device, not only at the next hint (with a block of Host, the next block's loads
    /// would otherwise wait for its own routing: no look-ahead at all).
    pub(super) fn advance_prefetch(&mut self) {
        if self.plan.is_empty() {
            return;
        }
        let b = self.unit_bytes;
        let mut keep: Option<HashSet<UnitId>> = None;
        let mut i = 0;
        while i < self.plan.len() {
            let id = self.plan[i];
            if self.entries.get(&id).is_none_or(|e| e.place != Place::Disk) {
                // In memory, loading or gone: nothing more to do for it.
                self.plan.remove(i);
                continue;
            }
            if !self.loadable(id) {
                // Its deferred gradient is still being written: load it on a later pass.
                i += 1;
                continue;
            }
            let t = if self.free(Mem::Device) >= b {
                Mem::Device
            } else {
                if self.budget[Mem::Host as usize] < b {
                    return;
                }
                let keep = keep.get_or_insert_with(|| {
                    let mut k = self.plan_keep.clone();
                    k.extend(self.waiting.iter().map(|w| w.id));
                    k
                });
                if !self.make_room(Mem::Host, b, keep) {
                    return;
                }
                Mem::Host
            };
            self.plan.remove(i);
            self.load(id, t, self.params_only(id.0));
            if let Some(e) = self.entries.get_mut(&id) {
                e.usage.unused_prefetch = true;
            }
            self.local.prefetched += 1;
        }
    }
}
