//! The store's figures: tier occupancy, hits, prefetch, bytes moved, stalls.

/// The causes of a stall, in the order of [`TierStats::stall_causes`].
pub const STALL_CAUSES: [&str; 4] = ["load", "write-back for room", "own write", "units in use"];

/// Figures of one worker's store since it started (also exported as metrics, and logged as
/// `storage` records in a run's metrics log).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TierStats {
    /// Bytes of one expert unit.
    pub unit_bytes: u64,
    /// Expert units.
    pub units: usize,
    /// Budgets of Device and Host (`u64::MAX`: unlimited).
    pub budget: [u64; 2],
    /// Bytes held now in Device and Host.
    pub used: [u64; 2],
    /// The most bytes ever held in Device and Host.
    pub peak: [u64; 2],
    /// Units only on disk now.
    pub on_disk: usize,
    /// Units being read from disk now.
    pub loading: usize,
    /// Acquisitions served from Device, from Host, and from Disk (a load, or waiting on one).
    pub served_from: [u64; 3],
    /// Commits of units on disk whose update was deferred to the unit's next load (their
    /// gradient written beside it instead of the unit being read and written back).
    pub deferred: u64,
    /// Units loaded by prefetch, and those of them used before being evicted.
    pub prefetched: u64,
    /// Prefetched units that were then used.
    pub prefetch_used: u64,
    /// Wall seconds during which at least one acquirer waited for a unit not in memory.
    pub stall_seconds: f64,
    /// `stall_seconds` split by what the longest-waiting acquirer waited for, in the order of
    /// [`STALL_CAUSES`]: its load (queued or being read), room in Device while write-backs that
    /// free it were in flight, its own unit's write (a write-back, or a deferred gradient, that
    /// must reach the disk before the unit is read again), and room in Device held by units in use.
    pub stall_causes: [f64; 4],
    /// Bytes moved, `[from][to]` over Device, Host, Disk.
    pub moved: [[u64; 3]; 3],
    /// Bytes read from and written to disk, and the I/O threads' seconds doing it.
    pub disk_read: u64,
    /// Bytes written to disk.
    pub disk_written: u64,
    /// Seconds spent reading.
    pub read_seconds: f64,
    /// Seconds spent writing.
    pub write_seconds: f64,
}

impl TierStats {
    /// Share of acquisitions served from memory (Device or Host).
    pub fn hit_rate(&self) -> f64 {
        // Saturating: the figures may come from a log a person edited.
        let total = self.served_from.iter().fold(0u64, |s, &n| s.saturating_add(n));
        if total == 0 {
            return 1.0;
        }
        self.served_from[0].saturating_add(self.served_from[1]) as f64 / total as f64
    }

    /// Share of prefetched units that were used.
    pub fn prefetch_accuracy(&self) -> f64 {
        if self.prefetched == 0 {
            return 0.0;
        }
        self.prefetch_used as f64 / self.prefetched as f64
    }

    /// The counters accumulated since `earlier` (a snapshot of the same store): what a span of
    /// steps served, moved, stalled and read, so that its rates come from the methods above. Gauges
    /// (occupancy, budgets, peaks, units) are this snapshot's.
    pub fn since(&self, earlier: &TierStats) -> TierStats {
        let mut d = self.clone();
        for i in 0..3 {
            d.served_from[i] = self.served_from[i].saturating_sub(earlier.served_from[i]);
            for j in 0..3 {
                d.moved[i][j] = self.moved[i][j].saturating_sub(earlier.moved[i][j]);
            }
        }
        d.prefetched = self.prefetched.saturating_sub(earlier.prefetched);
        d.deferred = self.deferred.saturating_sub(earlier.deferred);
        d.prefetch_used = self.prefetch_used.saturating_sub(earlier.prefetch_used);
        d.stall_seconds = self.stall_seconds - earlier.stall_seconds;
        for c in 0..STALL_CAUSES.len() {
            d.stall_causes[c] = self.stall_causes[c] - earlier.stall_causes[c];
        }
        d.disk_read = self.disk_read.saturating_sub(earlier.disk_read);
        d.disk_written = self.disk_written.saturating_sub(earlier.disk_written);
        d.read_seconds = self.read_seconds - earlier.read_seconds;
        d.write_seconds = self.write_seconds - earlier.write_seconds;
        d
    }

    /// Add another worker's figures (for totals over workers).
    pub fn add(&mut self, o: &TierStats) {
        self.units += o.units;
        for t in 0..2 {
            self.used[t] = self.used[t].saturating_add(o.used[t]);
            self.peak[t] = self.peak[t].saturating_add(o.peak[t]);
            self.budget[t] = self.budget[t].saturating_add(o.budget[t]);
        }
        self.unit_bytes = self.unit_bytes.max(o.unit_bytes);
        self.on_disk += o.on_disk;
        self.loading += o.loading;
        for i in 0..3 {
            self.served_from[i] += o.served_from[i];
            for j in 0..3 {
                self.moved[i][j] += o.moved[i][j];
            }
        }
        self.prefetched += o.prefetched;
        self.deferred += o.deferred;
        self.prefetch_used += o.prefetch_used;
        self.stall_seconds += o.stall_seconds;
        for c in 0..STALL_CAUSES.len() {
            self.stall_causes[c] += o.stall_causes[c];
        }
        self.disk_read += o.disk_read;
        self.disk_written += o.disk_written;
        self.read_seconds += o.read_seconds;
        self.write_seconds += o.write_seconds;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rates_of_a_span_come_from_its_counters() {
        let earlier = TierStats {
            served_from: [10, 5, 5],
            prefetched: 4,
            prefetch_used: 2,
            disk_read: 100,
            stall_seconds: 1.0,
            stall_causes: [0.5, 0.25, 0.25, 0.0],
            ..TierStats::default()
        };
        let later = TierStats {
            served_from: [16, 7, 7],
            prefetched: 8,
            prefetch_used: 5,
            disk_read: 400,
            stall_seconds: 1.5,
            stall_causes: [0.75, 0.25, 0.5, 0.0],
            ..TierStats::default()
        };
        let d = later.since(&earlier);
        assert_eq!(d.served_from, [6, 2, 2]);
        assert_eq!((d.prefetched, d.prefetch_used, d.disk_read), (4, 3, 300));
        assert_eq!(d.hit_rate(), 0.8);
        assert_eq!(d.prefetch_accuracy(), 0.75);
        assert_eq!(d.stall_seconds, 0.5);
        assert_eq!(d.stall_causes, [0.25, 0.0, 0.25, 0.0]);
    }
}
