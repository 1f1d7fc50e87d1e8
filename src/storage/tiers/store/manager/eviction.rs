//! Eviction: making room in a tier by demoting the policy's victims Device -> Host -> Disk, and
//! the write-backs that take a changed unit to disk.

use super::{Entry, Manager, Mem, Place};
use crate::storage::tiers::policy::Candidate;
use crate::storage::tiers::store::io::IoJob;
use crate::storage::tiers::unit::{ExpertSlot, UnitId};
use std::collections::HashSet;
use std::sync::Arc;

/// What the policy sees of a unit in memory.
fn candidate(id: UnitId, e: &Entry) -> Candidate {
    Candidate {
        id,
        usage: e.usage,
        partial: e.partial,
    }
}

impl Manager {
    /// Free `need` bytes in `t` by demoting victims (never a unit in `keep`, in use or in flight).
    /// False when that cannot be done now (wait for a write-back, or a release).
    pub(super) fn make_room(&mut self, t: Mem, need: u64, keep: &HashSet<UnitId>) -> bool {
        loop {
            if self.free(t) >= need {
                return true;
            }
            let leaving = self.flushing[t as usize] as u64 * self.unit_bytes;
            if self.free(t) + leaving >= need {
                return false;
            }
            let candidates = self
                .entries
                .iter()
                .filter(|(id, e)| e.place == Place::In(t) && !keep.contains(id))
                .map(|(id, e)| candidate(*id, e));
            let Some(victim) = self.policy.victim(&self.cursor, candidates) else {
                return false;
            };
            self.demote(victim, t, keep);
        }
    }

    /// Move `id` out of `t`: Device -> Host when the policy admits it and there is room, else to disk.
    fn demote(&mut self, id: UnitId, t: Mem, keep: &HashSet<UnitId>) {
        let b = self.unit_bytes;
        // Admission decides between the host cache and the disk; without a Disk tier there is no
        // choice to make, and the budgets leave a unit's room in Host whenever Device is full
        // (`fits_in_memory`).
        // (The replay of `semoe bench cache-policy` decides with the same `enters_host`.)
        let no_disk = self.disk.is_none();
        if t == Mem::Device && self.budget[Mem::Host as usize] > 0 {
            let mut keep_also = keep.clone();
            keep_also.insert(id);
            let incoming = candidate(id, &self.entries[&id]);
            let enters = no_disk || {
                // The host entry it would push out, when the cache is full.
                let displaced = (self.free(Mem::Host) < b)
                    .then(|| self.policy.victim(&self.cursor, self.host_candidates(&keep_also)))
                    .flatten()
                    .map(|v| candidate(v, &self.entries[&v]));
                self.policy.enters_host(&self.cursor, &incoming, displaced.as_ref())
            };
            if enters && self.make_room(Mem::Host, b, &keep_also) {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.place = Place::In(Mem::Host);
                }
                self.used[Mem::Device as usize] -= b;
                self.used[Mem::Host as usize] += b;
                // The high-water mark at every growth, not only when published.
                self.local.peak[Mem::Host as usize] =
                    self.local.peak[Mem::Host as usize].max(self.used[Mem::Host as usize]);
                self.local.moved[Mem::Device as usize][Mem::Host as usize] += b;
                return;
            }
        }
        self.write_back(id, t);
    }

    fn host_candidates<'a>(&'a self, keep: &'a HashSet<UnitId>) -> impl Iterator<Item = Candidate> + 'a {
        self.entries
            .iter()
            .filter(move |(id, e)| e.place == Place::In(Mem::Host) && !keep.contains(id))
            .map(|(id, e)| candidate(*id, e))
    }

    fn write_back(&mut self, id: UnitId, t: Mem) {
        let b = self.unit_bytes;
        let Some(e) = self.entries.get_mut(&id) else { return };
        if e.partial && e.dirty {
            self.fatal
                .get_or_insert(format!("expert {}.{}: a parameters-only copy was changed", id.0, id.1));
        }
        if !e.dirty || e.partial {
            e.slot = None;
            e.partial = false;
            e.place = Place::Disk;
            self.used[t as usize] -= b;
            return;
        }
        let Some(slot) = e.slot.take() else {
            e.place = Place::Disk;
            self.used[t as usize] -= b;
            self.fatal
                .get_or_insert(format!("expert {}.{} lost its state", id.0, id.1));
            return;
        };
        let slot: Arc<ExpertSlot> = Arc::new(*slot);
        e.flush = Some(slot.clone());
        e.place = Place::Flushing(t);
        self.flushing[t as usize] += 1;
        self.queue_io(IoJob::Write { id, slot });
    }
}
