//! Loads from disk and the bounded I/O queue that feeds the I/O threads.

use super::{Manager, Mem, Place};
use crate::storage::tiers::store::io::IoJob;
use crate::storage::tiers::unit::UnitId;

impl Manager {
    /// Whether `id` can be loaded now (not while its deferred gradient is still being written).
    pub(super) fn loadable(&self, id: UnitId) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| e.place == Place::Disk && e.deferred.as_ref().is_none_or(|d| !d.writing))
    }

    /// Start loading `id` into `t` (budgeted as a whole unit either way): the parameters alone when
    /// `params_only` and no deferred update waits for the unit, else all of it.
    pub(super) fn load(&mut self, id: UnitId, t: Mem, params_only: bool) {
        let (b, g, p) = (self.unit_bytes, self.grad_bytes(), self.params_bytes());
        if let Some(e) = self.entries.get_mut(&id) {
            e.place = Place::Loading(t);
            self.used[t as usize] += b;
            // The high-water mark at every growth, not only when published.
            self.local.peak[t as usize] = self.local.peak[t as usize].max(self.used[t as usize]);
            let update = e.deferred.as_ref().map(|d| (d.lr, d.norm));
            let partial = params_only && update.is_none();
            self.queue_io(IoJob::Read {
                id,
                len: if partial { p as usize } else { b as usize },
                grad_len: g as usize,
                update,
                partial,
            });
        }
    }

    /// Queue `job` for the I/O threads (loads ahead of writes once `depth` are in flight).
    pub(super) fn queue_io(&mut self, job: IoJob) {
        let lane = usize::from(!job.is_load());
        self.io_queue[lane].push_back(job);
    }

    /// Hand queued jobs to the I/O threads, loads first, while fewer than `depth` are in flight.
    pub(super) fn pump_io(&mut self) {
        while self.in_flight < self.depth {
            let Some(job) = self.io_queue[0].pop_front().or_else(|| self.io_queue[1].pop_front()) else {
                return;
            };
            let Some(lanes) = &self.io else {
                let (id, what) = job.describe();
                self.fatal.get_or_insert(format!(
                    "expert {}.{} needs {what}, but worker {} keeps every unit in memory and has no disk tier (a bug in \
                     the store's bookkeeping)",
                    id.0, id.1, self.worker
                ));
                return;
            };
            if let Err(job) = lanes.push(job) {
                // The I/O threads turn their own failures (errors and panics) into answers and only
                // stop once the manager closes the lanes, so this is not a disk failure either.
                let (id, what) = job.describe();
                self.fatal.get_or_insert(format!(
                    "the I/O threads of worker {} are gone, with {what} of expert {}.{} to do",
                    self.worker, id.0, id.1
                ));
                return;
            }
            self.in_flight += 1;
        }
    }
}
