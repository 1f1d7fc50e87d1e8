//! The manager: the books of where each unit is and the bytes of each tier, and the scheduling
//! over them: admission and eviction by the cache policy, loads on demand and by prefetch,
//! write-backs, deferred commits, snapshots and the figures.
//!
//! This file holds the books and the handling of each request; the scheduling over them is in
//! `admission` (granting acquisitions), `eviction` (demotions and write-backs), `loading` (loads
//! and the I/O queue), `prefetch` (loads from routing hints), and `figures`.

mod admission;
mod eviction;
mod figures;
mod loading;
mod prefetch;

use super::config::StorageConfig;
use super::io::{IoJob, IoLanes};
use super::lock;
use super::protocol::{Grant, Reply, Request};
use super::stats::TierStats;
use crate::error::{Error, Result};
use crate::storage::tiers::disk::DiskTier;
use crate::storage::tiers::policy::{CachePolicy, StepCursor, Usage};
use crate::storage::tiers::unit::{decode, decode_grads, encode, params_len, ExpertSlot, Pending, UnitId};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

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

struct Waiter {
    id: UnitId,
    /// The update of a commit.
    commit: Option<Pending>,

    /// The unit was not in memory when asked for (a miss).
    missed: bool,
    reply: Reply<Grant>,
}

pub(super) struct Manager {
    worker: String,
    policy: CachePolicy,
    /// Where the step is, for the step-order policy (moved by hints and requests).
    cursor: StepCursor,
    prefetch: bool,
    disk: Option<DiskTier>,
    /// Shapes and optimizer settings of every unit (none when the store is empty).
    pub(super) template: Option<ExpertSlot>,
    unit_bytes: u64,
    entries: BTreeMap<UnitId, Entry>,
    used: [u64; 2],
    /// Units of each tier being written back (their room is free once the write is done).
    flushing: [usize; 2],
    budget: [u64; 2],
    waiting: VecDeque<Waiter>,
    snapshots: Vec<Reply<Vec<(UnitId, ExpertSlot)>>>,
    /// Waiting for no disk work in flight or queued ([`Request::Idle`]).
    idle_waiters: Vec<Reply<()>>,
    /// The I/O threads' lanes (none without a Disk tier).
    io: Option<Arc<IoLanes>>,
    /// Jobs not yet handed to the I/O threads (over `depth` in flight): loads, then writes.
    io_queue: [VecDeque<IoJob>; 2],
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
    /// The units of the last routing hint still to prefetch, in the order they will be used
    /// (`prefetch::advance_prefetch` loads them as room frees up).
    plan: Vec<UnitId>,
    /// Every unit the last hint expects to be used soon: prefetching never evicts one of them.
    plan_keep: HashSet<UnitId>,
    /// Acquirers waiting for a unit that was not in memory, and since when one has been.
    stalled: usize,
    stalled_since: Option<Instant>,
    /// While an acquirer waits: since when, and the cause (an index into `STALL_CAUSES`) of the
    /// longest-waiting one, as of the last scheduling pass.
    stall_mark: Option<(Instant, usize)>,
    /// A disk failure: every later request fails with it (nothing is dropped: a unit whose write
    /// failed stays in memory).
    fatal: Option<String>,
}

const DISK: usize = 2;

impl Drop for Manager {
    /// The I/O threads stop with the manager (they would wait on the lanes for good otherwise),
    /// and the store's gauges read that it holds nothing (a worker process's next epoch may run
    /// under another index: the old one's would stay at their last values for good).
    fn drop(&mut self) {
        if let Some(lanes) = &self.io {
            lanes.close();
        }
        for tier in ["device", "host", "disk"] {
            metrics::gauge!(crate::telemetry::metrics::TIER_BYTES, "worker" => self.worker.clone(), "tier" => tier)
                .set(0.0);
        }
    }
}

impl Manager {
    /// The books of a new store: nothing placed yet, the figures starting from `stats`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        worker: usize,
        config: &StorageConfig,
        template: Option<ExpertSlot>,
        unit_bytes: u64,
        budget: [u64; 2],
        disk: Option<DiskTier>,
        lanes: Arc<IoLanes>,
        stats: Arc<Mutex<TierStats>>,
    ) -> Manager {
        // At least one request per I/O thread: a shallower depth would leave threads idle.
        let depth = config.io_depth.max(config.io_threads).max(1);
        let mut manager = Manager {
            worker: worker.to_string(),
            policy: config.policy,
            cursor: StepCursor::default(),
            prefetch: config.prefetch,
            disk: disk.clone(),
            template,
            unit_bytes,
            entries: BTreeMap::new(),
            used: [0, 0],
            flushing: [0, 0],
            budget,
            waiting: VecDeque::new(),
            snapshots: Vec::new(),
            idle_waiters: Vec::new(),
            // Without a Disk tier there is nothing to read or write: a job would be a bug, and
            // `pump_io` reports it as one rather than as I/O threads that never started.
            io: disk.is_some().then_some(lanes),
            io_queue: [VecDeque::new(), VecDeque::new()],
            in_flight: 0,
            depth,
            clock: 0,
            stats: stats.clone(),
            local: TierStats::default(),
            exported: TierStats::default(),
            fwd_used: BTreeMap::new(),
            last_fwd_used: BTreeMap::new(),
            plan: Vec::new(),
            plan_keep: HashSet::new(),
            stalled: 0,
            stalled_since: None,
            stall_mark: None,
            fatal: None,
        };
        manager.local = lock(&stats).clone();
        manager.exported = manager.local.clone();
        manager
    }

    /// The manager thread's loop (with a Disk tier): handle what has arrived, then schedule once.
    pub(super) fn run(mut self, rx: Receiver<Request>) {
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
    pub(super) fn step(&mut self, export: bool) {
        self.serve();
        self.publish(export);
        // After publishing, so that figures read after a snapshot include everything before it.
        self.answer_snapshots();
        self.answer_idle();
    }

    pub(super) fn place_initially(&mut self, id: UnitId, slot: ExpertSlot) -> Result<()> {
        let b = self.unit_bytes;
        self.cursor.hold(id.0);
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
            // The high-water mark at every growth, not only when published.
            self.local.peak[t as usize] = self.local.peak[t as usize].max(self.used[t as usize]);
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

    pub(super) fn handle(&mut self, req: Request) {
        match req {
            Request::Acquire { id, commit, reply } => {
                if !self.entries.contains_key(&id) {
                    let _ = reply.send(Err(Error::runtime(format!(
                        "worker {} stores no expert {}.{}",
                        self.worker, id.0, id.1
                    ))));
                    return;
                }
                self.cursor.acquire(id, commit.is_some(), self.clock);
                let e = &self.entries[&id];
                let idle = !self.waiting.iter().any(|w| w.id == id);
                // Deferred at once to the disk, unless the store has failed (then it waits, and is
                // answered with the failure like every other request).
                if commit.is_some()
                    && e.place == Place::Disk
                    && e.deferred.is_none()
                    && idle
                    && self.disk.is_some()
                    && self.fatal.is_none()
                {
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
            Request::Hint { block, routed, forward } => {
                self.cursor.hint(block, forward, &routed, self.clock);
                self.on_hint(block, routed, forward)
            }
            Request::EndStep { step } => {
                self.cursor.end_step(self.clock);
                self.policy
                    .end_step(step, self.entries.values_mut().map(|e| &mut e.usage));
                self.last_fwd_used = std::mem::take(&mut self.fwd_used);
            }
            Request::Snapshot { reply } => self.snapshots.push(reply),
            Request::Idle { reply } => self.idle_waiters.push(reply),
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

    /// Whether a load of a unit of `block` now reads the parameters alone (see
    /// [`CachePolicy::params_only`]).
    fn params_only(&self, block: usize) -> bool {
        let units_through = self.entries.range(..(block + 1, 0)).count();
        // Whole units in each tier (as the replay counts them): a unit does not straddle tiers.
        let unit = self.unit_bytes.max(1);
        let memory = (self.budget[0] / unit).saturating_add(self.budget[1] / unit);
        self.policy.params_only(
            &self.cursor,
            units_through,
            usize::try_from(memory).unwrap_or(usize::MAX),
        )
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
            self.queue_io(IoJob::WriteGrad {
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
        self.flushing[t as usize] -= 1;
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

    /// Whether a unit is on its way between tiers or a deferred gradient is being written.
    fn units_moving(&self) -> bool {
        self.entries
            .values()
            .any(|e| !matches!(e.place, Place::In(_) | Place::Disk) || e.deferred.as_ref().is_some_and(|d| d.writing))
    }

    fn answer_idle(&mut self) {
        if self.idle_waiters.is_empty() {
            return;
        }
        let quiet = self.in_flight == 0 && self.io_queue.iter().all(VecDeque::is_empty) && !self.units_moving();
        // A failed store does no more work: say why instead of waiting for ever.
        let answer = match &self.fatal {
            Some(f) => Err(format!("the expert store of worker {} failed: {f}", self.worker)),
            None if quiet => Ok(()),
            None => return,
        };
        for r in std::mem::take(&mut self.idle_waiters) {
            let _ = r.send(answer.clone().map_err(Error::runtime));
        }
    }

    fn answer_snapshots(&mut self) {
        if self.snapshots.is_empty() {
            return;
        }
        // After a disk failure no snapshot is taken, even when every unit is still at hand (a
        // write that failed keeps its unit in memory): the store has stopped, and says why.
        if let Some(f) = &self.fatal {
            for r in std::mem::take(&mut self.snapshots) {
                let _ = r.send(Err(Error::runtime(format!(
                    "the expert store of worker {} failed: {f}",
                    self.worker
                ))));
            }
            return;
        }
        if self.units_moving() {
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
}
