//! Admission: granting waiting acquisitions in Device, making room for them or starting their
//! loads, and the choice for a commit between applying it in memory and deferring it.

use super::{Manager, Mem, Place, Waiter};
use crate::error::Error;
use crate::storage::tiers::size::format_bytes;
use crate::storage::tiers::store::protocol::Grant;
use crate::storage::tiers::unit::UnitId;
use std::collections::{HashSet, VecDeque};
use std::time::Instant;

impl Manager {
    /// A waiter leaves (granted or deferred): when it had missed, one stalled acquirer fewer, and
    /// the stall's time counted when none is left.
    fn stall_ended(&mut self, missed: bool) {
        if !missed {
            return;
        }
        self.stalled = self.stalled.saturating_sub(1);
        if self.stalled == 0 {
            if let Some(since) = self.stalled_since.take() {
                self.local.stall_seconds += since.elapsed().as_secs_f64();
            }
        }
    }

    /// Grant what can be granted, start the loads and write-backs that make room, answer snapshots.
    pub(super) fn serve(&mut self) {
        self.account_stall();
        if let Some(f) = &self.fatal {
            // The budgets are named: they decide how much of the expert state the disk holds.
            let shown = |b: u64| {
                if b == u64::MAX {
                    "unlimited".to_string()
                } else {
                    format_bytes(b)
                }
            };
            for w in self.waiting.drain(..) {
                let _ = w.reply.send(Err(Error::runtime(format!(
                    "the expert store of worker {} (storage.device_budget {}, storage.host_budget {}) failed: {f}",
                    self.worker,
                    shown(self.budget[0]),
                    shown(self.budget[1])
                ))));
            }
        }
        let wanted: HashSet<UnitId> = self.waiting.iter().map(|w| w.id).collect();
        let mut still = VecDeque::new();
        while let Some(w) = self.waiting.pop_front() {
            if let Some(w) = self.try_grant(w, &wanted) {
                still.push_back(w);
            }
        }
        self.waiting = still;
        self.advance_prefetch();
        self.pump_io();
        self.mark_stall();
    }

    /// Add the time since the last scheduling pass to the cause the stall had then.
    fn account_stall(&mut self) {
        if let Some((since, cause)) = self.stall_mark.take() {
            self.local.stall_causes[cause] += since.elapsed().as_secs_f64();
        }
    }

    /// Note what the longest-waiting acquirer of a unit that was not in memory waits for now (the
    /// causes of `STALL_CAUSES`), so that the time until the next pass goes to that cause.
    fn mark_stall(&mut self) {
        let Some(id) = self.waiting.iter().find(|w| w.missed).map(|w| w.id) else {
            return;
        };
        let cause = match self.entries.get(&id).map(|e| e.place) {
            Some(Place::Loading(_)) => 0,
            Some(Place::Flushing(_)) => 2,
            Some(Place::Disk) if !self.loadable(id) => 2,
            _ if self.flushing[Mem::Device as usize] > 0 => 1,
            _ => 3,
        };
        self.stall_mark = Some((Instant::now(), cause));
    }

    /// Grant `w` if its unit can be in Device now (else start getting it there and give `w` back).
    fn try_grant(&mut self, w: Waiter, wanted: &HashSet<UnitId>) -> Option<Waiter> {
        let b = self.unit_bytes;
        let place = self.entries[&w.id].place;
        if w.commit.is_some() && matches!(place, Place::In(_)) && self.entries[&w.id].partial {
            // A commit needs the moments: drop the parameters-only copy (the file is current) and
            // defer the update, or load the whole unit if an update is already deferred.
            if let (Place::In(t), Some(e)) = (place, self.entries.get_mut(&w.id)) {
                e.slot = None;
                e.partial = false;
                e.place = Place::Disk;
                self.used[t as usize] -= b;
            }
            if self.entries[&w.id].deferred.is_none() && self.disk.is_some() {
                self.stall_ended(w.missed);
                if let Some(update) = w.commit {
                    self.defer(w.id, update);
                }
                let _ = w.reply.send(Ok(Grant::Deferred));
                return None;
            }
            return Some(w);
        }
        match place {
            Place::In(Mem::Device) => {}
            Place::In(Mem::Host) => {
                if !self.make_room(Mem::Device, b, wanted) {
                    return Some(w);
                }
                self.used[Mem::Host as usize] -= b;
                self.used[Mem::Device as usize] += b;
                // The high-water mark at every growth, not only when published.
                self.local.peak[Mem::Device as usize] =
                    self.local.peak[Mem::Device as usize].max(self.used[Mem::Device as usize]);
                self.local.moved[Mem::Host as usize][Mem::Device as usize] += b;
            }
            Place::Disk => {
                if self.loadable(w.id) && self.make_room(Mem::Device, b, wanted) {
                    let params_only = w.commit.is_none() && self.params_only(w.id.0);
                    self.load(w.id, Mem::Device, params_only);
                }
                return Some(w);
            }
            Place::Out | Place::Loading(_) | Place::Flushing(_) => return Some(w),
        }
        self.clock += 1;
        let clock = self.clock;
        let e = self.entries.get_mut(&w.id)?;
        let was_prefetch = e.usage.unused_prefetch;
        self.policy.touch(&mut e.usage, clock);
        let Some(slot) = e.slot.take() else {
            self.fatal
                .get_or_insert(format!("expert {}.{} lost its state", w.id.0, w.id.1));
            return None;
        };
        e.place = Place::Out;
        if was_prefetch {
            self.local.prefetch_used += 1;
        }
        let source = match place {
            _ if w.missed => 2,
            Place::In(Mem::Host) => 1,
            _ => 0,
        };
        self.local.served_from[source] += 1;
        self.stall_ended(w.missed);
        if let Err(Ok(Grant::Slot(slot, _))) = w.reply.send(Ok(Grant::Slot(slot, w.commit))) {
            // The acquirer is gone: take the unit back (a commit's update is lost with its caller,
            // which failed: the step did not complete).
            if let Some(e) = self.entries.get_mut(&w.id) {
                e.slot = Some(slot);
                e.place = Place::In(Mem::Device);
            }
        }
        None
    }
}
