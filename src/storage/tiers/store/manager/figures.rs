//! The figures: copied out for `ExpertStore::stats`, and exported to the metrics recorder.

use super::{Manager, Mem, Place};
use crate::storage::tiers::store::lock;
use crate::telemetry::metrics as names;

impl Manager {
    /// Copy the figures out, and with `export` (at the end of a step, at a snapshot) hand what
    /// changed since the last export to the metrics recorder.
    pub(in crate::storage::tiers::store) fn publish(&mut self, export: bool) {
        self.local.used = self.used;
        for t in 0..2 {
            self.local.peak[t] = self.local.peak[t].max(self.used[t]);
        }
        let (mut on_disk, mut loading) = (0, 0);
        for e in self.entries.values() {
            match e.place {
                Place::Disk => on_disk += 1,
                Place::Loading(_) => loading += 1,
                _ => {}
            }
        }
        (self.local.on_disk, self.local.loading) = (on_disk, loading);
        lock(&self.stats).clone_from(&self.local);
        if !export {
            return;
        }
        let prev = std::mem::replace(&mut self.exported, self.local.clone());
        let w = self.worker.clone();
        for t in [Mem::Device, Mem::Host] {
            metrics::gauge!(names::TIER_BYTES, "worker" => w.clone(), "tier" => t.label())
                .set(self.used[t as usize] as f64);
        }
        let disk_bytes = self.local.on_disk as f64 * self.unit_bytes as f64;
        metrics::gauge!(names::TIER_BYTES, "worker" => w.clone(), "tier" => "disk").set(disk_bytes);
        let tiers = ["device", "host", "disk"];
        for (i, from) in tiers.iter().enumerate() {
            let hits = self.local.served_from[i] - prev.served_from[i];
            if hits > 0 {
                metrics::counter!(names::TIER_SERVED, "worker" => w.clone(), "tier" => *from).increment(hits);
            }
            for (j, to) in tiers.iter().enumerate() {
                let moved = self.local.moved[i][j] - prev.moved[i][j];
                if moved > 0 {
                    metrics::counter!(names::TIER_MOVED_BYTES, "worker" => w.clone(), "from" => *from, "to" => *to)
                        .increment(moved);
                }
            }
        }
        let issued = self.local.prefetched - prev.prefetched;
        if issued > 0 {
            metrics::counter!(names::PREFETCH, "worker" => w.clone(), "outcome" => "issued").increment(issued);
        }
        let used = self.local.prefetch_used - prev.prefetch_used;
        if used > 0 {
            metrics::counter!(names::PREFETCH, "worker" => w.clone(), "outcome" => "used").increment(used);
        }
        let stall = self.local.stall_seconds - prev.stall_seconds;
        if stall > 0.0 {
            metrics::counter!(names::TIER_STALL_MICROS, "worker" => w).increment((stall * 1e6) as u64);
        }
    }
}
