//! The expert store: every expert unit of one worker, spread over the Device, Host and Disk tiers
//! under byte budgets, with a cache policy and prefetch.
//!
//! One manager owns the bookkeeping (where each unit is, bytes per tier, hit counters). With a Disk
//! tier it runs on a thread of its own and takes requests in batches, in arrival order, so that it
//! schedules loads and evictions having seen everything that arrived meanwhile; when everything
//! fits in memory there is nothing to schedule, and each request is handled on the thread that
//! makes it, under the manager's lock (`Books`). I/O threads read and write the Disk tier's
//! slot file, fed through a bounded queue. Nothing waits on a lock held across I/O: an acquirer
//! waits on its own answer, the manager never blocks on the disk.
//!
//! Life of a unit during a step: the Expert actor *acquires* it (the manager moves it into the
//! Device tier, making room by demoting the policy's victims Device -> Host -> Disk, loading it
//! from disk if needed), computes, and drops the lease, which returns it (marked dirty if it was
//! changed: only the commit changes a unit). Hints from the Communicator, which sees each block's
//! routing before the experts run, start loads early: the routed experts of the current block and
//! the experts expected in the next one (one block of look-ahead: the next block's experts used in
//! the last step on the way forward, this step's forward set on the way back).
//!
//! A unit is in exactly one place, so budgets are simple sums: a unit being loaded is counted in
//! the tier it goes to, a unit being written back in the tier it leaves until the write is done.
//! Values never change on the way (the encoding is bit-exact), so training is bitwise identical
//! whatever the budgets.

use super::disk::DiskTier;
use super::policy::{CachePolicy, Usage};
use super::size::format_bytes;
use super::unit::{
    decode, decode_grads, decode_params, encode, encode_grads_into, encode_into, encoded_len, grads_len, params_len,
    ExpertSlot, Pending, UnitId,
};
use crate::error::{Error, Result};
use crate::telemetry::metrics as names;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

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
    /// I/O threads.
    pub io_threads: usize,
    /// Reads and writes in flight at most (the bounded I/O queue).
    pub io_depth: usize,
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
            io_threads: 4,
            io_depth: 16,
        }
    }
}

impl StorageConfig {
    /// Whether everything stays in memory (no budget set).
    pub fn unlimited(&self) -> bool {
        self.device_budget.is_none() && self.host_budget.is_none()
    }
}

/// The two memory tiers (the Disk tier has no budget).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mem {
    Device = 0,
    Host = 1,
}

impl Mem {
    fn label(self) -> &'static str {
        match self {
            Mem::Device => "device",
            Mem::Host => "host",
        }
    }
}

/// Where a unit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// In a memory tier, not in use.
    In(Mem),
    /// Lent to an acquirer (counted in Device).
    Out,
    /// Only on disk.
    Disk,
    /// Being read from disk into a memory tier (counted there).
    Loading(Mem),
    /// Being written to disk from a memory tier (counted there until written).
    Flushing(Mem),
}

struct Entry {
    place: Place,
    slot: Option<Box<ExpertSlot>>,
    /// Bytes being written back (shared with the I/O thread), kept until the write is done.
    flush: Option<Arc<ExpertSlot>>,
    /// The copy in memory is newer than the file (or there is no file yet).
    dirty: bool,
    usage: Usage,
    /// A committed update of a unit that was on disk at the commit, applied when it is next loaded.
    deferred: Option<Deferred>,
    /// The copy in memory holds the parameters only (loaded for a forward or backward pass; the
    /// file is current). It is never written back, and a commit drops it and defers.
    partial: bool,
}

/// A deferred update: its gradient is being written to, or is in, the unit's gradient file.
struct Deferred {
    lr: f64,
    norm: f64,
    /// Whether the gradient's write is still in flight.
    writing: bool,
}

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

type Reply<T> = tokio::sync::oneshot::Sender<Result<T>>;

/// What an acquirer gets: the unit (with the update it came to apply, for a commit), or, for a
/// commit of a unit on disk, word that the update was deferred.
enum Grant {
    Slot(Box<ExpertSlot>, Option<Pending>),
    Deferred,
}

enum Request {
    Acquire {
        id: UnitId,
        commit: Option<Pending>,
        reply: Reply<Grant>,
    },
    Release {
        id: UnitId,
        slot: Box<ExpertSlot>,
        dirty: bool,
    },
    Hint {
        block: usize,
        routed: Vec<usize>,
        forward: bool,
    },
    EndStep {
        step: u64,
    },
    Snapshot {
        reply: Reply<Vec<(UnitId, ExpertSlot)>>,
    },
    Loaded {
        id: UnitId,
        /// The decoded unit, its deferred update applied when the read carried one.
        slot: Result<ExpertSlot>,
        applied: bool,
        partial: bool,
        seconds: f64,
    },
    Written {
        id: UnitId,
        result: Result<()>,
        seconds: f64,
    },
    GradWritten {
        id: UnitId,
        result: Result<()>,
        seconds: f64,
    },
    Stop,
}

impl Request {
    /// Requests after which the figures go to the metrics recorder.
    fn exports(&self) -> bool {
        matches!(self, Request::EndStep { .. } | Request::Snapshot { .. })
    }
}

/// How requests reach the manager; shared by the store, its leases and its I/O threads.
#[derive(Clone)]
enum Books {
    /// Everything fits in memory: each request is handled on the thread that makes it, under the
    /// manager's lock (`None` once the store is dropped). There is nothing to schedule, and a
    /// manager thread cost two thread wake-ups per request: a third of all context switches of a
    /// training step on two cores.
    Inline(Arc<Mutex<Option<Manager>>>),
    /// With a Disk tier: a manager thread takes requests in batches, so that it decides what to
    /// load and evict having seen every request that arrived while it was busy (handled one by
    /// one, the same runs read 5-15% more bytes per step).
    Thread(Sender<Request>),
}

impl Books {
    /// Hand `req` to the manager. False when the store has stopped (the request is dropped,
    /// closing its answer channel).
    fn send(&self, req: Request) -> bool {
        match self {
            Books::Thread(tx) => tx.send(req).is_ok(),
            Books::Inline(shared) => {
                let mut guard = lock(shared);
                let Some(manager) = guard.as_mut() else {
                    return false;
                };
                let export = req.exports();
                manager.handle(req);
                manager.step(export);
                true
            }
        }
    }

    /// Stop the manager: it drops its I/O queue (the I/O threads finish their job and stop) and
    /// every pending answer channel.
    fn stop(&self) {
        match self {
            Books::Thread(tx) => {
                let _ = tx.send(Request::Stop);
            }
            Books::Inline(shared) => drop(lock(shared).take()),
        }
    }
}

/// Work for the I/O threads. They also encode and decode units and apply deferred updates, so
/// that the manager, which every acquisition waits on, only keeps the books.
enum IoJob {
    /// A unit, and with `update` (learning rate, global norm) its deferred gradient, applied.
    Read {
        id: UnitId,
        len: usize,
        grad_len: usize,
        update: Option<(f64, f64)>,
        partial: bool,
    },
    Write {
        id: UnitId,
        slot: Arc<ExpertSlot>,
    },
    WriteGrad {
        id: UnitId,
        grads: Box<[Vec<f32>; 4]>,
    },
}

impl IoJob {
    /// The unit concerned and what the job does to it, for errors.
    fn describe(&self) -> (UnitId, &'static str) {
        match self {
            IoJob::Read { id, .. } => (*id, "a read from disk"),
            IoJob::Write { id, .. } => (*id, "a write-back to disk"),
            IoJob::WriteGrad { id, .. } => (*id, "a deferred gradient's write to disk"),
        }
    }

    /// How to answer the manager when the job fails without answering itself (it panicked).
    fn failure(&self) -> impl FnOnce(Error) -> Request {
        enum Kind {
            Read { applied: bool, partial: bool },
            Write,
            WriteGrad,
        }
        let (id, kind) = match self {
            IoJob::Read {
                id, update, partial, ..
            } => (
                *id,
                Kind::Read {
                    applied: update.is_some(),
                    partial: *partial,
                },
            ),
            IoJob::Write { id, .. } => (*id, Kind::Write),
            IoJob::WriteGrad { id, .. } => (*id, Kind::WriteGrad),
        };
        move |err| match kind {
            Kind::Read { applied, partial } => Request::Loaded {
                id,
                slot: Err(err),
                applied,
                partial,
                seconds: 0.0,
            },
            Kind::Write => Request::Written {
                id,
                result: Err(err),
                seconds: 0.0,
            },
            Kind::WriteGrad => Request::GradWritten {
                id,
                result: Err(err),
                seconds: 0.0,
            },
        }
    }
}

/// One worker's expert units across the tiers. Cheap to share (`Arc`); dropping the last handle
/// stops its threads and deletes its Disk tier's files.
pub struct ExpertStore {
    tx: Books,
    stats: Arc<Mutex<TierStats>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    disk: Option<DiskTier>,
}

/// A unit lent to an acquirer. It goes back to the store when dropped (marked changed if
/// [`Lease::slot_mut`] was called), also when the holder fails, so no unit is ever lost. A lease
/// for a forward or backward pass may hold the parameters alone (the moments stay on disk).
pub struct Lease {
    id: UnitId,
    slot: Option<Box<ExpertSlot>>,
    /// Granted for a commit (the whole unit).
    writable: bool,
    dirty: bool,
    tx: Books,
}

impl std::ops::Deref for Lease {
    type Target = ExpertSlot;
    fn deref(&self) -> &ExpertSlot {
        // The slot is only taken in `drop`.
        self.slot
            .as_deref()
            .unwrap_or_else(|| unreachable!("a lease holds its slot until dropped"))
    }
}

impl Lease {
    /// The unit, to apply a commit's update (only a lease from [`ExpertStore::commit`] allows it:
    /// a plain acquisition may hold the parameters alone). It will be written back before it
    /// leaves memory.
    pub fn slot_mut(&mut self) -> Result<&mut ExpertSlot> {
        if !self.writable {
            return Err(Error::runtime(format!(
                "expert {}.{} was borrowed for reading and cannot be changed",
                self.id.0, self.id.1
            )));
        }
        self.dirty = true;
        Ok(self
            .slot
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("a lease holds its slot until dropped")))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let _ = self.tx.send(Request::Release {
                id: self.id,
                slot,
                dirty: self.dirty,
            });
        }
    }
}

impl ExpertStore {
    /// Take `units` (every expert this worker hosts) into a store for `worker`. Fails when the
    /// Device budget cannot hold one block's experts (the working set of a layer), or when the
    /// budgets do not hold everything (in whole units, with one unit to spare for moving units
    /// between the tiers, unless Device alone holds all) and there is no disk directory.
    pub fn new(worker: usize, config: &StorageConfig, units: Vec<(UnitId, ExpertSlot)>) -> Result<Self> {
        config.policy.validate()?;
        // Every unit has the first one's shapes (an empty store has none).
        let template = units.first().map(|(_, s)| s.clone());
        let unit_bytes = template.as_ref().map_or(0, ExpertSlot::bytes);
        if let Some((id, _)) = units.iter().find(|(_, s)| s.bytes() != unit_bytes) {
            return Err(Error::runtime(format!(
                "expert {}.{} has a different size from the others",
                id.0, id.1
            )));
        }
        let budget = [
            config.device_budget.unwrap_or(u64::MAX),
            config.host_budget.unwrap_or(u64::MAX),
        ];
        let mut per_block: BTreeMap<usize, u64> = BTreeMap::new();
        for ((block, _), _) in &units {
            *per_block.entry(*block).or_default() += 1;
        }
        let widest = per_block.values().copied().max().unwrap_or(0);
        if budget[0] < widest * unit_bytes {
            return Err(Error::config(format!(
                "storage.device_budget: the device budget ({}) of worker {worker} cannot hold one MoE block's experts: {widest} experts x {} = {} ({} bytes) at least",
                format_bytes(budget[0]),
                format_bytes(unit_bytes),
                format_bytes(widest * unit_bytes),
                widest * unit_bytes
            )));
        }
        let n = units.len() as u64;
        let disk = match &config.dir {
            _ if fits_in_memory(budget, unit_bytes, n) => None,
            Some(dir) => {
                let grad_bytes = template.as_ref().map_or(0, ExpertSlot::grad_bytes);
                let ids = units.iter().map(|(id, _)| *id);
                Some(DiskTier::open(
                    &dir.join(format!("worker-{worker}")),
                    config.drop_page_cache,
                    ids,
                    unit_bytes,
                    grad_bytes,
                )?)
            }
            None => return Err(needs_a_disk(worker, budget, unit_bytes, n)),
        };
        let stats = Arc::new(Mutex::new(TierStats {
            unit_bytes,
            units: units.len(),
            budget,
            ..TierStats::default()
        }));
        let depth = config.io_depth.max(1);
        let (io_tx, io_rx) = sync_channel::<IoJob>(depth);
        let io_rx = Arc::new(Mutex::new(io_rx));
        let mut threads = Vec::new();
        let mut manager = Manager {
            worker: worker.to_string(),
            policy: config.policy,
            prefetch: config.prefetch,
            disk: disk.clone(),
            template,
            unit_bytes,
            entries: BTreeMap::new(),
            used: [0, 0],
            budget,
            waiting: VecDeque::new(),
            snapshots: Vec::new(),
            // Without a Disk tier there is nothing to read or write: a job would be a bug, and
            // `pump_io` reports it as one rather than as I/O threads that never started.
            io_tx: disk.is_some().then_some(io_tx),
            io_queue: VecDeque::new(),
            in_flight: 0,
            depth,
            clock: 0,
            stats: stats.clone(),
            local: TierStats::default(),
            exported: TierStats::default(),
            fwd_used: BTreeMap::new(),
            last_fwd_used: BTreeMap::new(),
            stalled: 0,
            stalled_since: None,
            fatal: None,
        };
        manager.local = lock(&stats).clone();
        manager.exported = manager.local.clone();
        for (id, slot) in units {
            manager.place_initially(id, slot)?;
        }
        manager.publish(true);
        let template = manager.template.clone().map(Arc::new);
        // In memory only, the manager sits behind its lock from the start; with a Disk tier it
        // starts on its thread once the I/O threads (which send it their completions) are up.
        let (tx, manager_thread) = match &disk {
            None => (Books::Inline(Arc::new(Mutex::new(Some(manager)))), None),
            Some(_) => {
                let (requests_tx, requests) = channel();
                (Books::Thread(requests_tx), Some((manager, requests)))
            }
        };
        if let Some(d) = &disk {
            for t in 0..config.io_threads.max(1) {
                let (d, rx, tx, template) = (d.clone(), io_rx.clone(), tx.clone(), template.clone());
                let h = std::thread::Builder::new()
                    .name(format!("semoe-io-{worker}-{t}"))
                    .spawn(move || io_loop(d, template, rx, tx))
                    .map_err(|e| Error::runtime(format!("cannot start an I/O thread: {e}")))?;
                threads.push(h);
            }
        }
        if let Some((manager, requests)) = manager_thread {
            let h = std::thread::Builder::new()
                .name(format!("semoe-tier-{worker}"))
                .spawn(move || manager.run(requests))
                .map_err(|e| Error::runtime(format!("cannot start the tier manager: {e}")))?;
            threads.push(h);
        }
        Ok(ExpertStore {
            tx,
            stats,
            threads: Mutex::new(threads),
            disk,
        })
    }

    /// Borrow unit `id` in the Device tier, waiting for it to be loaded if needed.
    pub async fn acquire(&self, id: UnitId) -> Result<Lease> {
        match self.request(id, None).await? {
            (Some(lease), _) => Ok(lease),
            (None, _) => Err(Error::runtime("the expert store deferred a plain acquisition")),
        }
    }

    /// Commit `update` to unit `id`. When the unit is in memory (or must be loaded anyway) the
    /// answer is the unit and the update, to be applied by the caller (on the compute threads)
    /// through [`Lease::slot_mut`]; when it is only on disk the store writes the gradient beside it
    /// and applies the update when the unit is next loaded (`None`), which saves reading and
    /// writing the whole unit once per step.
    pub async fn commit(&self, id: UnitId, update: Pending) -> Result<Option<(Lease, Pending)>> {
        match self.request(id, Some(update)).await? {
            (Some(lease), Some(update)) => Ok(Some((lease, update))),
            (None, _) => Ok(None),
            (Some(_), None) => Err(Error::runtime("the expert store lost a commit's update")),
        }
    }

    async fn request(&self, id: UnitId, commit: Option<Pending>) -> Result<(Option<Lease>, Option<Pending>)> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request::Acquire { id, commit, reply })?;
        match rx.await.map_err(|_| stopped())?? {
            Grant::Slot(slot, update) => Ok((
                Some(Lease {
                    id,
                    slot: Some(slot),
                    writable: update.is_some(),
                    dirty: false,
                    tx: self.tx.clone(),
                }),
                update,
            )),
            Grant::Deferred => Ok((None, None)),
        }
    }

    /// The experts of `block` that were just routed to (sorted); the store starts loading them and
    /// those expected in the next block (forward) or the previous one (backward).
    pub fn hint(&self, block: usize, routed: Vec<usize>, forward: bool) {
        let _ = self.tx.send(Request::Hint { block, routed, forward });
    }

    /// Step `step` has committed (the hit counters decay on the policy's schedule).
    pub fn end_step(&self, step: u64) {
        let _ = self.tx.send(Request::EndStep { step });
    }

    /// A copy of every unit, read back from disk where needed (waits until no unit is in use or in
    /// flight).
    pub async fn snapshot(&self) -> Result<Vec<(UnitId, ExpertSlot)>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request::Snapshot { reply })?;
        rx.await.map_err(|_| stopped())?
    }

    /// The figures so far.
    pub fn stats(&self) -> TierStats {
        lock(&self.stats).clone()
    }

    fn send(&self, r: Request) -> Result<()> {
        if self.tx.send(r) {
            Ok(())
        } else {
            Err(stopped())
        }
    }
}

impl std::fmt::Debug for ExpertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertStore").field("stats", &self.stats()).finish()
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        self.tx.stop();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
        if let Some(d) = &self.disk {
            d.remove();
        }
    }
}

fn stopped() -> Error {
    Error::runtime("the expert store has stopped")
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
fn fits_in_memory(budget: [u64; 2], unit: u64, n: u64) -> bool {
    if unit == 0 {
        return true;
    }
    let (device, host) = (budget[0] / unit, budget[1] / unit);
    device >= n || device.saturating_add(host) > n
}

/// The start-up error for budgets that need a Disk tier when there is no disk directory: it names
/// the two options and the least budgets that would do without one (see [`fits_in_memory`]).
fn needs_a_disk(worker: usize, budget: [u64; 2], unit: u64, n: u64) -> Error {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One I/O thread: disk reads and writes (their seconds are what the figures count as I/O time),
/// with the encoding, decoding and deferred updates around them.
///
/// Every job gets an answer, its error included, also when the work panics: the panic becomes the
/// job's error, so that the manager reports what went wrong with which unit and keeps its books
/// (a thread that died instead would leave only "no I/O thread is left" to say).
fn io_loop(disk: DiskTier, template: Option<Arc<ExpertSlot>>, jobs: Arc<Mutex<Receiver<IoJob>>>, done: Books) {
    loop {
        let job = match lock(&jobs).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let (id, what) = job.describe();
        let failure = job.failure();
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| io_job(&disk, template.as_deref(), job)))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                failure(Error::runtime(format!(
                    "{what} of expert {}.{} panicked: {why}",
                    id.0, id.1
                )))
            });
        if !done.send(answer) {
            return;
        }
    }
}

/// Do one I/O job; the answer for the manager.
fn io_job(disk: &DiskTier, template: Option<&ExpertSlot>, job: IoJob) -> Request {
    match job {
        IoJob::Read {
            id,
            len,
            grad_len,
            update,
            partial,
        } => {
            let mut seconds = 0.0;
            let slot = match template {
                None => Err(Error::runtime("an empty expert store cannot decode units")),
                Some(template) => load_unit(disk, id, template, len, grad_len, update, partial, &mut seconds),
            };
            Request::Loaded {
                id,
                slot,
                applied: update.is_some(),
                partial,
                seconds,
            }
        }
        IoJob::WriteGrad { id, grads } => {
            let t = Instant::now();
            let result = disk.write_grad_with(id, grads_len(&grads), |buf| encode_grads_into(id, &grads, buf));
            Request::GradWritten {
                id,
                result,
                seconds: t.elapsed().as_secs_f64(),
            }
        }
        IoJob::Write { id, slot } => {
            let t = Instant::now();
            let result = disk.write_with(id, encoded_len(&slot), |buf| encode_into(id, &slot, buf));
            drop(slot);
            Request::Written {
                id,
                result,
                seconds: t.elapsed().as_secs_f64(),
            }
        }
    }
}

/// Read a unit (the parameters alone when `partial`) and decode it where the bytes landed, then
/// read and apply the deferred update's gradient when there is one. `seconds` gets the time spent
/// in the reads themselves (until the bytes were there), not decoding or applying.
#[allow(clippy::too_many_arguments)]
fn load_unit(
    disk: &DiskTier,
    id: UnitId,
    template: &ExpertSlot,
    len: usize,
    grad_len: usize,
    update: Option<(f64, f64)>,
    partial: bool,
    seconds: &mut f64,
) -> Result<ExpertSlot> {
    let started = Instant::now();
    let mut unit = disk.read_with(id, len, |bytes| {
        *seconds += started.elapsed().as_secs_f64();
        if partial {
            decode_params(id, bytes, template, "the disk tier")
        } else {
            decode(id, bytes, template, "the disk tier")
        }
    })?;
    if let Some((lr, norm)) = update {
        let started = Instant::now();
        let grads = disk.read_grad_with(id, grad_len, |bytes| {
            *seconds += started.elapsed().as_secs_f64();
            decode_grads(id, bytes, template)
        })?;
        unit.apply(Pending { grads, lr, norm })?;
    }
    Ok(unit)
}

struct Waiter {
    id: UnitId,
    /// The update of a commit.
    commit: Option<Pending>,

    /// The unit was not in memory when asked for (a miss).
    missed: bool,
    reply: Reply<Grant>,
}

struct Manager {
    worker: String,
    policy: CachePolicy,
    prefetch: bool,
    disk: Option<DiskTier>,
    /// Shapes and optimizer settings of every unit (none when the store is empty).
    template: Option<ExpertSlot>,
    unit_bytes: u64,
    entries: BTreeMap<UnitId, Entry>,
    used: [u64; 2],
    budget: [u64; 2],
    waiting: VecDeque<Waiter>,
    snapshots: Vec<Reply<Vec<(UnitId, ExpertSlot)>>>,
    io_tx: Option<SyncSender<IoJob>>,
    io_queue: VecDeque<IoJob>,
    in_flight: usize,
    depth: usize,
    clock: u64,
    stats: Arc<Mutex<TierStats>>,
    local: TierStats,
    /// The figures at the last export to the metrics recorder.
    exported: TierStats,
    /// Experts used on the way forward in this step and the last, per block.
    fwd_used: BTreeMap<usize, BTreeSet<usize>>,
    last_fwd_used: BTreeMap<usize, BTreeSet<usize>>,
    /// Acquirers waiting for a unit that was not in memory, and since when one has been.
    stalled: usize,
    stalled_since: Option<Instant>,
    /// A disk failure: every later request fails with it (nothing is dropped: a unit whose write
    /// failed stays in memory).
    fatal: Option<String>,
}

const DISK: usize = 2;

impl Manager {
    /// The manager thread's loop (with a Disk tier): handle what has arrived, then schedule once.
    fn run(mut self, rx: Receiver<Request>) {
        while let Ok(req) = rx.recv() {
            if matches!(req, Request::Stop) {
                return;
            }
            let mut export = req.exports();
            self.handle(req);
            // Drain what is already queued before the (more expensive) scheduling pass.
            while let Ok(r) = rx.try_recv() {
                if matches!(r, Request::Stop) {
                    return;
                }
                export |= r.exports();
                self.handle(r);
            }
            self.step(export);
        }
    }

    /// After handling requests: grant what can be granted, publish the figures, answer snapshots.
    fn step(&mut self, export: bool) {
        self.serve();
        self.publish(export);
        // After publishing, so that figures read after a snapshot include everything before it.
        self.answer_snapshots();
    }

    fn place_initially(&mut self, id: UnitId, slot: ExpertSlot) -> Result<()> {
        let b = self.unit_bytes;
        let mut entry = Entry {
            place: Place::Disk,
            slot: None,
            flush: None,
            dirty: false,
            usage: Usage::default(),
            deferred: None,
            partial: false,
        };
        if let Some(t) = [Mem::Device, Mem::Host].into_iter().find(|&t| self.free(t) >= b) {
            self.used[t as usize] += b;
            entry.place = Place::In(t);
            entry.slot = Some(Box::new(slot));
            entry.dirty = true;
        } else if let Some(d) = &self.disk {
            d.write(id, &encode(id, &slot))?;
            self.local.disk_written += b;
        } else {
            return Err(Error::runtime("no room for an expert and no disk tier"));
        }
        self.entries.insert(id, entry);
        Ok(())
    }

    fn decode(&self, id: UnitId, bytes: &[u8], what: &str) -> Result<ExpertSlot> {
        match &self.template {
            Some(t) => decode(id, bytes, t, what),
            None => Err(Error::runtime("an empty expert store cannot decode units")),
        }
    }

    fn free(&self, t: Mem) -> u64 {
        self.budget[t as usize].saturating_sub(self.used[t as usize])
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Acquire { id, commit, reply } => {
                if !self.entries.contains_key(&id) {
                    let _ = reply.send(Err(Error::runtime(format!(
                        "worker {} stores no expert {}.{}",
                        self.worker, id.0, id.1
                    ))));
                    return;
                }
                let e = &self.entries[&id];
                let idle = !self.waiting.iter().any(|w| w.id == id);
                if commit.is_some() && e.place == Place::Disk && e.deferred.is_none() && idle && self.disk.is_some() {
                    if let Some(update) = commit {
                        self.defer(id, update);
                    }
                    let _ = reply.send(Ok(Grant::Deferred));
                    return;
                }
                let missed = !matches!(e.place, Place::In(_));
                if missed {
                    if self.stalled == 0 {
                        self.stalled_since = Some(Instant::now());
                    }
                    self.stalled += 1;
                }
                self.waiting.push_back(Waiter {
                    id,
                    commit,
                    missed,
                    reply,
                });
            }
            Request::Release { id, slot, dirty } => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.slot = Some(slot);
                    e.place = Place::In(Mem::Device);
                    e.dirty |= dirty;
                }
            }
            Request::Hint { block, routed, forward } => self.on_hint(block, routed, forward),
            Request::EndStep { step } => {
                self.policy
                    .end_step(step, self.entries.values_mut().map(|e| &mut e.usage));
                self.last_fwd_used = std::mem::take(&mut self.fwd_used);
            }
            Request::Snapshot { reply } => self.snapshots.push(reply),
            Request::Loaded {
                id,
                slot,
                applied,
                partial,
                seconds,
            } => {
                self.in_flight -= 1;
                self.local.read_seconds += seconds;
                self.on_loaded(id, slot, applied, partial);
            }
            Request::GradWritten { id, result, seconds } => {
                self.in_flight -= 1;
                self.local.write_seconds += seconds;
                let b = self.grad_bytes();
                match (result, self.entries.get_mut(&id).and_then(|e| e.deferred.as_mut())) {
                    (Ok(()), Some(d)) => {
                        d.writing = false;
                        self.local.disk_written += b;
                    }
                    (Ok(()), None) => {
                        self.fatal.get_or_insert(format!(
                            "expert {}.{}: a gradient was written for no deferred update",
                            id.0, id.1
                        ));
                    }
                    (Err(err), _) => {
                        self.fatal.get_or_insert(err.to_string());
                    }
                }
            }
            Request::Written { id, result, seconds } => {
                self.in_flight -= 1;
                self.local.write_seconds += seconds;
                self.on_written(id, result);
            }
            Request::Stop => {}
        }
    }

    fn on_loaded(&mut self, id: UnitId, slot: Result<ExpertSlot>, applied: bool, partial: bool) {
        let b = if partial { self.params_bytes() } else { self.unit_bytes };
        // The I/O thread applied the deferred update that was pending when the load started; a
        // unit is never committed to while it loads, so it is still the one pending.
        let deferred = self.entries.get_mut(&id).and_then(|e| e.deferred.take());
        let slot = match (slot, deferred.is_some(), applied) {
            (Ok(_), true, false) => Err(Error::runtime(format!(
                "expert {}.{}: a deferred update without its gradient",
                id.0, id.1
            ))),
            (Ok(_), false, true) => Err(Error::runtime(format!(
                "expert {}.{}: an update applied that was not pending",
                id.0, id.1
            ))),
            (slot, ..) => slot,
        };
        if applied && slot.is_ok() {
            self.local.disk_read += self.grad_bytes();
        }
        let Some(e) = self.entries.get_mut(&id) else { return };
        let Place::Loading(t) = e.place else { return };
        match slot {
            Ok(slot) => {
                e.slot = Some(Box::new(slot));
                e.place = Place::In(t);
                e.dirty = applied;
                e.partial = partial;
                self.local.disk_read += b;
                self.local.moved[DISK][t as usize] += b;
            }
            Err(err) => {
                e.place = Place::Disk;
                self.used[t as usize] -= self.unit_bytes;
                self.fatal.get_or_insert(err.to_string());
            }
        }
    }

    fn params_bytes(&self) -> u64 {
        self.template.as_ref().map_or(0, |t| params_len(t) as u64)
    }

    fn grad_bytes(&self) -> u64 {
        self.template.as_ref().map_or(0, ExpertSlot::grad_bytes)
    }

    /// Write a commit's gradient beside its unit (on disk) instead of loading the unit now.
    fn defer(&mut self, id: UnitId, update: Pending) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.deferred = Some(Deferred {
                lr: update.lr,
                norm: update.norm,
                writing: true,
            });
            self.local.deferred += 1;
            self.io_queue.push_back(IoJob::WriteGrad {
                id,
                grads: Box::new(update.grads),
            });
        }
    }

    fn on_written(&mut self, id: UnitId, result: Result<()>) {
        let b = self.unit_bytes;
        let Some(Place::Flushing(t)) = self.entries.get(&id).map(|e| e.place) else {
            return;
        };
        let Some(e) = self.entries.get_mut(&id) else { return };
        let flushed = e.flush.take();
        match result {
            Ok(()) => {
                e.place = Place::Disk;
                e.dirty = false;
                self.used[t as usize] -= b;
                self.local.disk_written += b;
                self.local.moved[t as usize][DISK] += b;
            }
            Err(err) => {
                // Keep the unit in memory (over budget rather than lost) and stop using the disk.
                let slot = flushed.map(|slot| Arc::try_unwrap(slot).unwrap_or_else(|shared| (*shared).clone()));
                if let Some(e) = self.entries.get_mut(&id) {
                    match slot {
                        Some(slot) => {
                            e.slot = Some(Box::new(slot));
                            e.place = Place::In(t);
                        }
                        None => e.place = Place::Disk,
                    }
                }
                self.fatal.get_or_insert(err.to_string());
            }
        }
    }

    /// Grant what can be granted, start the loads and write-backs that make room, answer snapshots.
    fn serve(&mut self) {
        if let Some(f) = &self.fatal {
            for w in self.waiting.drain(..) {
                let _ = w.reply.send(Err(Error::runtime(format!(
                    "the expert store of worker {} failed: {f}",
                    self.worker
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
        self.pump_io();
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
                self.local.moved[Mem::Host as usize][Mem::Device as usize] += b;
            }
            Place::Disk => {
                if self.loadable(w.id) && self.make_room(Mem::Device, b, wanted) {
                    self.load(w.id, Mem::Device, w.commit.is_none());
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
        if w.missed {
            self.stalled -= 1;
            if self.stalled == 0 {
                if let Some(since) = self.stalled_since.take() {
                    self.local.stall_seconds += since.elapsed().as_secs_f64();
                }
            }
        }
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

    /// Free `need` bytes in `t` by demoting victims (never a unit in `keep`, in use or in flight).
    /// False when that cannot be done now (wait for a write-back, or a release).
    fn make_room(&mut self, t: Mem, need: u64, keep: &HashSet<UnitId>) -> bool {
        loop {
            if self.free(t) >= need {
                return true;
            }
            let leaving: u64 = self
                .entries
                .values()
                .filter(|e| e.place == Place::Flushing(t))
                .map(|_| self.unit_bytes)
                .sum();
            if self.free(t) + leaving >= need {
                return false;
            }
            let candidates = self
                .entries
                .iter()
                .filter(|(id, e)| e.place == Place::In(t) && !keep.contains(id))
                .map(|(id, e)| (*id, e.usage));
            let Some(victim) = self.policy.victim(candidates) else {
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
        let no_disk = self.disk.is_none();
        if t == Mem::Device
            && self.budget[Mem::Host as usize] > 0
            && (no_disk || self.policy.admits(&self.entries[&id].usage))
        {
            let mut keep_also = keep.clone();
            keep_also.insert(id);
            let incoming = self.entries[&id].usage;
            let colder_than_the_cache = !no_disk
                && self.free(Mem::Host) < b
                && self
                    .policy
                    .victim(self.host_candidates(&keep_also))
                    .is_some_and(|v| !self.policy.replaces(&incoming, &self.entries[&v].usage));
            if !colder_than_the_cache && self.make_room(Mem::Host, b, &keep_also) {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.place = Place::In(Mem::Host);
                }
                self.used[Mem::Device as usize] -= b;
                self.used[Mem::Host as usize] += b;
                self.local.moved[Mem::Device as usize][Mem::Host as usize] += b;
                return;
            }
        }
        self.write_back(id, t);
    }

    fn host_candidates<'a>(&'a self, keep: &'a HashSet<UnitId>) -> impl Iterator<Item = (UnitId, Usage)> + 'a {
        self.entries
            .iter()
            .filter(move |(id, e)| e.place == Place::In(Mem::Host) && !keep.contains(id))
            .map(|(id, e)| (*id, e.usage))
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
        self.io_queue.push_back(IoJob::Write { id, slot });
    }

    /// Whether `id` can be loaded now (not while its deferred gradient is still being written).
    fn loadable(&self, id: UnitId) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| e.place == Place::Disk && e.deferred.as_ref().is_none_or(|d| !d.writing))
    }

    /// Start loading `id` into `t` (budgeted as a whole unit either way): the parameters alone when
    /// `params_only` and no deferred update waits for the unit, else all of it.
    fn load(&mut self, id: UnitId, t: Mem, params_only: bool) {
        let (b, g, p) = (self.unit_bytes, self.grad_bytes(), self.params_bytes());
        if let Some(e) = self.entries.get_mut(&id) {
            e.place = Place::Loading(t);
            self.used[t as usize] += b;
            let update = e.deferred.as_ref().map(|d| (d.lr, d.norm));
            let partial = params_only && update.is_none();
            self.io_queue.push_back(IoJob::Read {
                id,
                len: if partial { p as usize } else { b as usize },
                grad_len: g as usize,
                update,
                partial,
            });
        }
    }

    fn pump_io(&mut self) {
        while self.in_flight < self.depth {
            let Some(job) = self.io_queue.pop_front() else { return };
            let Some(tx) = &self.io_tx else {
                let (id, what) = job.describe();
                self.fatal.get_or_insert(format!(
                    "expert {}.{} needs {what}, but worker {} keeps every unit in memory and has no disk tier (a bug in \
                     the store's bookkeeping)",
                    id.0, id.1, self.worker
                ));
                return;
            };
            if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
                // The I/O threads turn their own failures (errors and panics) into answers and only
                // stop once the manager drops this queue, so this is not a disk failure either.
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

    /// Start loading the routed experts of `block` and the ones expected in the next block.
    fn on_hint(&mut self, block: usize, routed: Vec<usize>, forward: bool) {
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
            self.load(id, t, true);
            if let Some(e) = self.entries.get_mut(&id) {
                e.usage.unused_prefetch = true;
            }
            self.local.prefetched += 1;
        }
    }

    fn answer_snapshots(&mut self) {
        if self.snapshots.is_empty() {
            return;
        }
        let busy = self
            .entries
            .values()
            .any(|e| !matches!(e.place, Place::In(_) | Place::Disk) || e.deferred.as_ref().is_some_and(|d| d.writing));
        if busy {
            return;
        }
        let result: Result<Vec<(UnitId, ExpertSlot)>> = self
            .entries
            .iter()
            .map(|(id, e)| match (e.slot.as_ref().filter(|_| !e.partial), &self.disk) {
                (Some(s), _) => Ok((*id, (**s).clone())),
                (None, Some(d)) => {
                    let mut unit = self.decode(*id, &d.read(*id, self.unit_bytes as usize)?, "the disk tier")?;
                    if let (Some(def), Some(t)) = (&e.deferred, &self.template) {
                        let grads = decode_grads(*id, &d.read_grad(*id, self.grad_bytes() as usize)?, t)?;
                        unit.apply(Pending {
                            grads,
                            lr: def.lr,
                            norm: def.norm,
                        })?;
                    }
                    Ok((*id, unit))
                }
                (None, None) => Err(Error::runtime(format!("expert {}.{} has no stored state", id.0, id.1))),
            })
            .collect();
        let mut pending = std::mem::take(&mut self.snapshots).into_iter();
        if let Some(last) = pending.next_back() {
            for r in pending {
                let _ = r.send(
                    result
                        .as_ref()
                        .map(Clone::clone)
                        .map_err(|e| Error::runtime(e.to_string())),
                );
            }
            let _ = last.send(result);
        }
    }

    /// Copy the figures out, and with `export` (at the end of a step, at a snapshot) hand what
    /// changed since the last export to the metrics recorder.
    fn publish(&mut self, export: bool) {
        self.local.used = self.used;
        for t in 0..2 {
            self.local.peak[t] = self.local.peak[t].max(self.used[t]);
        }
        self.local.on_disk = self.entries.values().filter(|e| e.place == Place::Disk).count();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::{AdamW, OptimizerConfig};

    fn slot(seed: f32) -> ExpertSlot {
        let sizes = [64, 8, 64, 8];
        let mut optimizer = AdamW::with_decay(OptimizerConfig::default(), &sizes, &[true, false, true, false]).unwrap();
        let fill = |n: usize, k: f32| (0..n).map(|i| seed * 1000.0 + k + i as f32).collect::<Vec<f32>>();
        optimizer
            .restore(
                3,
                sizes.iter().map(|&n| fill(n, 0.5)).collect(),
                sizes.iter().map(|&n| fill(n, 0.25)).collect(),
            )
            .unwrap();
        ExpertSlot {
            params: [fill(64, 0.0), fill(8, 0.0), fill(64, 0.0), fill(8, 0.0)],
            optimizer,
        }
    }

    fn units(blocks: usize, experts: usize) -> Vec<(UnitId, ExpertSlot)> {
        (0..blocks)
            .flat_map(|b| (0..experts).map(move |e| ((b, e), slot((b * experts + e) as f32))))
            .collect()
    }

    fn dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("semoe-store-{name}-{}", std::process::id()))
    }

    fn config(device_units: u64, host_units: u64, name: &str) -> StorageConfig {
        let b = slot(0.0).bytes();
        StorageConfig {
            device_budget: Some(device_units * b),
            host_budget: Some(host_units * b),
            dir: Some(dir(name)),
            ..StorageConfig::default()
        }
    }

    #[tokio::test]
    async fn budgets_hold_and_changes_survive_eviction_to_disk() {
        let memory = ExpertStore::new(0, &StorageConfig::default(), units(4, 4)).unwrap();
        let store = ExpertStore::new(0, &config(4, 2, "evict"), units(4, 4)).unwrap();
        // Commits and uses in an order that forces evictions, loads and write-backs.
        for round in 0..3 {
            commit_all(&memory, round).await;
            commit_all(&store, round).await;
            for b in (0..4).rev() {
                for e in 0..4 {
                    let lease = store.acquire((b, e)).await.unwrap();
                    assert_eq!(lease.params[1].len(), 8);
                }
            }
        }
        let (want, snap) = (memory.snapshot().await.unwrap(), store.snapshot().await.unwrap());
        assert_eq!(snap.len(), 16);
        for ((id, x), (_, y)) in want.iter().zip(&snap) {
            assert_eq!(x.params, y.params, "expert {id:?}");
            assert_eq!(x.optimizer, y.optimizer, "expert {id:?}");
        }
        let st = store.stats();
        assert!(st.peak[0] <= st.budget[0] && st.peak[1] <= st.budget[1], "{st:?}");
        assert!(st.disk_written > 0 && st.disk_read > 0, "{st:?}");
        assert!(st.served_from[2] > 0);
        let d = dir("evict");
        assert!(d.exists());
        drop(store);
        assert!(!d.join("worker-0").exists(), "the disk tier is removed with the store");
    }

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

    #[tokio::test]
    async fn a_plain_lease_cannot_be_changed() {
        let store = ExpertStore::new(0, &StorageConfig::default(), units(1, 1)).unwrap();
        let mut lease = store.acquire((0, 0)).await.unwrap();
        assert!(lease.slot_mut().is_err());
    }

    #[tokio::test]
    async fn a_device_budget_below_one_block_is_refused_with_the_sizes() {
        let e = ExpertStore::new(3, &config(3, 10, "small"), units(2, 4))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("worker 3") && e.contains("4 experts"), "{e}");
        let mut no_disk = config(4, 0, "nodisk");
        no_disk.dir = None;
        let e = ExpertStore::new(0, &no_disk, units(2, 4)).err().unwrap().to_string();
        assert!(e.contains("no disk directory"), "{e}");
    }

    #[tokio::test]
    async fn prefetch_loads_the_next_block_ahead_of_use() {
        let store = ExpertStore::new(0, &config(2, 2, "prefetch"), units(3, 2)).unwrap();
        for _step in 0..3 {
            for b in 0..3 {
                store.hint(b, vec![0, 1], true);
                for e in 0..2 {
                    drop(store.acquire((b, e)).await.unwrap());
                }
            }
        }
        let st = store.stats();
        assert!(st.prefetched > 0, "{st:?}");
        assert!(st.prefetch_accuracy() > 0.5, "{st:?}");
        assert!(st.peak[0] <= st.budget[0] && st.peak[1] <= st.budget[1]);
    }

    #[tokio::test]
    async fn se_moe_keeps_hot_experts_that_lru_evicts() {
        // One hot expert used between scans of cold ones longer than the cache: LFU keeps it in
        // memory, LRU lets the scan push it out to disk.
        let mut rates = Vec::new();
        for policy in [CachePolicy::default(), CachePolicy::Lru] {
            let mut c = config(4, 1, policy.name());
            c.policy = policy;
            c.prefetch = false;
            let store = ExpertStore::new(0, &c, units(4, 4)).unwrap();
            for _round in 0..10 {
                drop(store.acquire((0, 0)).await.unwrap());
                drop(store.acquire((0, 0)).await.unwrap());
                for b in 1..4 {
                    for e in 0..4 {
                        drop(store.acquire((b, e)).await.unwrap());
                    }
                }
            }
            rates.push(store.stats().hit_rate());
        }
        assert!(rates[0] > rates[1], "se-moe {} vs lru {}", rates[0], rates[1]);
    }

    /// Commit the same updates to every unit through `store`, applying them as a commit does.
    async fn commit_all(store: &ExpertStore, round: usize) {
        for b in 0..4 {
            for e in 0..4 {
                let update = Pending {
                    grads: [vec![0.5; 64], vec![-0.25; 8], vec![round as f32; 64], vec![1.0; 8]],
                    lr: 1e-2,
                    norm: 3.0,
                };
                if let Some((mut lease, update)) = store.commit((b, e), update).await.unwrap() {
                    lease.slot_mut().unwrap().apply(update).unwrap();
                }
            }
        }
    }

    #[tokio::test]
    async fn commits_to_units_on_disk_are_deferred_and_give_the_same_bits() {
        let memory = ExpertStore::new(0, &StorageConfig::default(), units(4, 4)).unwrap();
        let tiered = ExpertStore::new(0, &config(4, 2, "defer"), units(4, 4)).unwrap();
        for round in 0..3 {
            commit_all(&memory, round).await;
            commit_all(&tiered, round).await;
            // Use some units between commits, as a forward pass does (loading applies the deferred).
            for e in 0..4 {
                drop(tiered.acquire((round % 4, e)).await.unwrap());
            }
        }
        let (a, b) = (memory.snapshot().await.unwrap(), tiered.snapshot().await.unwrap());
        for ((id, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(x.params, y.params, "expert {id:?}");
            assert_eq!(x.optimizer, y.optimizer, "expert {id:?}");
        }
        let st = tiered.stats();
        assert!(st.deferred > 0, "{st:?}");
        assert_eq!(memory.stats().deferred, 0);
    }

    /// The figures are published after the answers of each batch of requests: wait until `done`.
    async fn settled(store: &ExpertStore, done: impl Fn(&TierStats) -> bool) -> TierStats {
        let since = Instant::now();
        while !done(&store.stats()) && since.elapsed().as_secs() < 5 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        store.stats()
    }

    #[tokio::test]
    async fn a_scan_larger_than_memory_serves_each_acquisition_once_with_its_own_values() {
        // Device holds one block (2 units), Host one unit: half of the 6 units live on disk, and a
        // cyclic scan over all of them must keep evicting and loading.
        let mut c = config(2, 1, "scan");
        c.prefetch = false;
        let store = ExpertStore::new(0, &c, units(3, 2)).unwrap();
        let mut acquisitions = 0;
        for _round in 0..4 {
            for b in 0..3 {
                // Both experts of the block held at once: exactly the Device budget.
                let leases = [
                    store.acquire((b, 0)).await.unwrap(),
                    store.acquire((b, 1)).await.unwrap(),
                ];
                for (e, lease) in leases.iter().enumerate() {
                    let seed = (b * 2 + e) as f32;
                    // A plain lease may hold the parameters alone (the moments can stay on disk).
                    assert_eq!(lease.params, slot(seed).params, "expert ({b}, {e})");
                }
                acquisitions += 2;
            }
        }
        let st = settled(&store, |st| st.served_from.iter().sum::<u64>() >= acquisitions).await;
        assert_eq!(st.served_from.iter().sum::<u64>(), acquisitions, "{st:?}");
        assert!(
            st.served_from[2] > 0 && st.disk_read > 0,
            "the scan reads from disk: {st:?}"
        );
        assert!(st.peak[0] <= st.budget[0] && st.peak[1] <= st.budget[1], "{st:?}");
        assert_eq!(
            st.peak[0], st.budget[0],
            "two leases fill the Device tier exactly: {st:?}"
        );
    }

    #[tokio::test]
    async fn a_unit_acquired_again_while_in_device_is_a_device_hit() {
        let mut c = config(2, 1, "hit");
        c.prefetch = false;
        let store = ExpertStore::new(0, &c, units(3, 2)).unwrap();
        drop(store.acquire((2, 1)).await.unwrap());
        let before = settled(&store, |st| st.served_from.iter().sum::<u64>() >= 1).await;
        for _ in 0..3 {
            drop(store.acquire((2, 1)).await.unwrap());
        }
        let after = settled(&store, |st| st.served_from.iter().sum::<u64>() >= 4).await;
        assert_eq!(
            after.served_from[0],
            before.served_from[0] + 3,
            "{before:?} then {after:?}"
        );
        assert_eq!(after.served_from[1..], before.served_from[1..], "{after:?}");
    }

    #[tokio::test]
    async fn unlimited_keeps_everything_in_device() {
        let store = ExpertStore::new(0, &StorageConfig::default(), units(2, 2)).unwrap();
        drop(store.acquire((1, 1)).await.unwrap());
        // The figures are published after the answers of each batch of requests.
        let since = Instant::now();
        while store.stats().served_from == [0, 0, 0] && since.elapsed().as_secs() < 5 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(store.stats().served_from, [1, 0, 0]);
        assert!(store.acquire((5, 5)).await.is_err());
    }
}
