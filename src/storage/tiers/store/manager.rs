//! The manager: the books of where each unit is and the bytes of each tier, and the scheduling
//! over them: admission and eviction by the cache policy, loads on demand and by prefetch,
//! write-backs, deferred commits, snapshots and the figures.

use super::config::StorageConfig;
use super::io::IoJob;
use super::lock;
use super::protocol::{Grant, Reply, Request};
use super::stats::TierStats;
use crate::error::{Error, Result};
use crate::storage::tiers::disk::DiskTier;
use crate::storage::tiers::policy::{CachePolicy, Usage};
use crate::storage::tiers::unit::{decode, decode_grads, encode, params_len, ExpertSlot, Pending, UnitId};
use crate::telemetry::metrics as names;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::mpsc::{Receiver, SyncSender};
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
    prefetch: bool,
    disk: Option<DiskTier>,
    /// Shapes and optimizer settings of every unit (none when the store is empty).
    pub(super) template: Option<ExpertSlot>,
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
    /// The books of a new store: nothing placed yet, the figures starting from `stats`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        worker: usize,
        config: &StorageConfig,
        template: Option<ExpertSlot>,
        unit_bytes: u64,
        budget: [u64; 2],
        disk: Option<DiskTier>,
        io_tx: SyncSender<IoJob>,
        stats: Arc<Mutex<TierStats>>,
    ) -> Manager {
        let depth = config.io_depth.max(1);
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
    }

    pub(super) fn place_initially(&mut self, id: UnitId, slot: ExpertSlot) -> Result<()> {
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
    pub(super) fn publish(&mut self, export: bool) {
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
