//! The store's figures: tier occupancy, hits, prefetch, bytes moved, stalls.

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
        let total: u64 = self.served_from.iter().sum();
        if total == 0 {
            return 1.0;
        }
        (self.served_from[0] + self.served_from[1]) as f64 / total as f64
    }

    /// Share of prefetched units that were used.
    pub fn prefetch_accuracy(&self) -> f64 {
        if self.prefetched == 0 {
            return 0.0;
        }
        self.prefetch_used as f64 / self.prefetched as f64
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
        self.disk_read += o.disk_read;
        self.disk_written += o.disk_written;
        self.read_seconds += o.read_seconds;
        self.write_seconds += o.write_seconds;
    }
}
