//! How a worker's expert state is stored, and whether the budgets hold it without a Disk tier.

use crate::error::Error;
use crate::storage::tiers::disk::DiskFaultHook;
use crate::storage::tiers::policy::CachePolicy;
use crate::storage::tiers::size::format_bytes;
use std::path::PathBuf;

/// How a worker's expert state is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageConfig {
    /// Bytes of the Device tier (the compute working set); `None`: unlimited.
    pub device_budget: Option<u64>,
    /// Bytes of the Host tier (the cache); `None`: unlimited.
    pub host_budget: Option<u64>,
    /// Eviction and admission.
    pub policy: CachePolicy,
    /// Load experts ahead of use from routing and one block of look-ahead.
    pub prefetch: bool,
    /// The Disk tier's directory (needed when the budgets do not hold every expert in whole units
    /// with one to spare; see `fits_in_memory`).
    pub dir: Option<PathBuf>,
    /// Keep the Disk tier out of the page cache: `O_DIRECT` where the file system allows it, else
    /// each write flushed and each access's pages dropped (false: through the page cache).
    pub drop_page_cache: bool,
    /// I/O threads: requests in flight at most (each thread waits on one at a time).
    pub io_threads: usize,
    /// Reads and writes handed to the I/O threads at most (queued in their lanes or in flight);
    /// the manager holds the rest, loads first. Never fewer than `io_threads`.
    pub io_depth: usize,
    /// Faults to inject into the Disk tier's reads and writes (chaos runs; `None`: no hook, and
    /// no cost).
    pub disk_faults: Option<DiskFaultHook>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            device_budget: None,
            host_budget: None,
            policy: CachePolicy::default(),
            prefetch: true,
            dir: None,
            drop_page_cache: true,
            io_threads: 8,
            io_depth: 32,
            disk_faults: None,
        }
    }
}

impl StorageConfig {
    /// Whether everything stays in memory (no budget set).
    pub fn unlimited(&self) -> bool {
        self.device_budget.is_none() && self.host_budget.is_none()
    }

    /// Whether a worker holding `n` expert units of `unit` bytes keeps them all in memory under
    /// these budgets, and so opens no Disk tier (whole units, and one to spare when Host is needed).
    pub fn keeps_in_memory(&self, unit: u64, n: u64) -> bool {
        let budget = [
            self.device_budget.unwrap_or(u64::MAX),
            self.host_budget.unwrap_or(u64::MAX),
        ];
        fits_in_memory(budget, unit, n)
    }
}

/// Whether `n` units of `unit` bytes live in memory for good under `budget` (Device, Host), so
/// that the store needs no Disk tier.
///
/// Byte sums are not enough, for two reasons. A tier holds whole units: the rest of its budget
/// (less than a unit) holds nothing, so two budgets that add up to all the expert state can hold
/// a unit less than it. And a unit in Host enters a full Device only after a Device unit has left
/// for Host, which takes a free unit's room there: with every unit in memory and none to spare,
/// that move has nowhere to go but the disk. So the tiers need one unit to spare, unless Device
/// alone holds everything (then nothing is ever in Host).
pub(super) fn fits_in_memory(budget: [u64; 2], unit: u64, n: u64) -> bool {
    if unit == 0 {
        return true;
    }
    let (device, host) = (budget[0] / unit, budget[1] / unit);
    device >= n || device.saturating_add(host) > n
}

/// The start-up error for budgets that need a Disk tier when there is no disk directory: it names
/// the two options and the least budgets that would do without one (see [`fits_in_memory`]).
pub(super) fn needs_a_disk(worker: usize, budget: [u64; 2], unit: u64, n: u64) -> Error {
    let shown = |b: u64| {
        if b == u64::MAX {
            "unlimited".to_string()
        } else {
            format_bytes(b)
        }
    };
    let held = |b: u64| b.checked_div(unit).unwrap_or(0);
    let with_spare = (n + 1).saturating_mul(unit);
    let device_alone = n.saturating_mul(unit);
    Error::config(format!(
        "the expert state of worker {worker} ({n} units of {unit} bytes, {}) does not fit in memory under \
         storage.device_budget ({}) and storage.host_budget ({}), and no disk directory is set. Each tier holds whole \
         units ({} and {} here), and moving a unit from Host into a full Device needs one unit's room to spare, so \
         without a disk storage.device_budget + storage.host_budget must hold {} whole units (at least {with_spare} \
         bytes, {}), or storage.device_budget alone all {n} (at least {device_alone} bytes, {})",
        format_bytes(device_alone),
        shown(budget[0]),
        shown(budget[1]),
        held(budget[0]),
        held(budget[1]),
        n + 1,
        format_bytes(with_spare),
        format_bytes(device_alone),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_needs_whole_units_and_one_to_spare_unless_device_holds_all() {
        let u = 100;
        // Device alone: all 8 units, not a byte less.
        assert!(fits_in_memory([800, 0], u, 8));
        assert!(!fits_in_memory([799, 0], u, 8));
        // Both tiers: 9 whole units between them (one to spare for moving a unit into Device).
        assert!(fits_in_memory([400, 500], u, 8));
        assert!(!fits_in_memory([400, 400], u, 8));
        assert!(!fits_in_memory([450, 450], u, 8), "900 bytes, but 8 whole units");
        assert!(!fits_in_memory([450, 449], u, 8));
        // Unlimited, and an empty store.
        assert!(fits_in_memory([400, u64::MAX], u, 8));
        assert!(fits_in_memory([u64::MAX, 0], u, 8));
        assert!(fits_in_memory([0, 0], 0, 0));
    }
}
