//! The expert store: every expert unit of one worker, spread over the Device, Host and Disk tiers
//! under byte budgets, with a cache policy and prefetch.
//!
//! One manager owns the bookkeeping (where each unit is, bytes per tier, hit counters). With a Disk
//! tier it runs on a thread of its own and takes requests in batches, in arrival order, so that it
//! schedules loads and evictions having seen everything that arrived meanwhile; when everything
//! fits in memory there is nothing to schedule, and each request is handled on the thread that
//! makes it, under the manager's lock (`Books`). I/O threads read and write the Disk tier's
//! slot file, fed through a bounded queue. Nothing waits on a lock held across I/O: an acquirer
//! waits on its own answer, the manager never blocks on the disk, except to read the units that
//! are only on disk for a snapshot (a checkpoint), which then waits for them.
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
//!
//! The files: `config` (the settings and the start-up check of the budgets), `stats` (the
//! figures), `protocol` (the requests the manager takes and how they reach it), `manager` (the
//! books, and in its own files the scheduling: admission, eviction, loading, prefetch, figures),
//! `io` (the I/O threads).

mod config;
mod io;
mod manager;
mod protocol;
mod stats;

pub use config::StorageConfig;
pub use stats::{TierStats, STALL_CAUSES};

use super::disk::DiskTier;
use super::size::format_bytes;
use super::unit::{ExpertSlot, Pending, UnitId};
use crate::error::{Error, Result};
use config::needs_a_disk;
use io::{io_loop, IoLanes};
use manager::Manager;
use protocol::{Books, Grant, Request};
use std::collections::BTreeMap;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, PoisonError};

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

/// The wait for a grant, made safe to cancel: a caller that gives up (a timeout, an aborted
/// task) after the manager sent the unit but before reading it would drop the unit inside the
/// channel, and the store would count it in use for ever (every later snapshot waiting for it).
struct GrantWait<'a> {
    rx: tokio::sync::oneshot::Receiver<Result<Grant>>,
    id: UnitId,
    tx: &'a Books,
    answered: bool,
}

impl Drop for GrantWait<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        // Closed first: a grant not yet sent fails to send and the manager takes the unit back;
        // one already sent is read here and released as a lease would be (a commit's update is
        // dropped with its caller, whose step did not complete).
        self.rx.close();
        if let Ok(Ok(Grant::Slot(slot, _))) = self.rx.try_recv() {
            drop(Lease {
                id: self.id,
                slot: Some(slot),
                writable: false,
                dirty: false,
                tx: self.tx.clone(),
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
            _ if config.keeps_in_memory(unit_bytes, n) => None,
            Some(dir) => {
                let grad_bytes = template.as_ref().map_or(0, ExpertSlot::grad_bytes);
                let ids = units.iter().map(|(id, _)| *id);
                let disk = DiskTier::open(
                    &dir.join(format!("worker-{worker}")),
                    config.drop_page_cache,
                    ids,
                    unit_bytes,
                    grad_bytes,
                )?;
                Some(match &config.disk_faults {
                    Some(hook) => disk.with_faults(hook.clone(), worker),
                    None => disk,
                })
            }
            None => return Err(needs_a_disk(worker, budget, unit_bytes, n)),
        };
        let stats = Arc::new(Mutex::new(TierStats {
            unit_bytes,
            units: units.len(),
            budget,
            ..TierStats::default()
        }));
        let lanes = Arc::new(IoLanes::default());
        // A start that fails from here leaves no slot file (the disk may be full) and no thread.
        let mut unwind = StartUnwind {
            lanes: lanes.clone(),
            disk: disk.clone(),
        };
        let mut threads = Vec::new();
        let mut manager = Manager::new(
            worker,
            config,
            template,
            unit_bytes,
            budget,
            disk.clone(),
            lanes.clone(),
            stats.clone(),
        );
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
                let (d, lanes, tx, template) = (d.clone(), lanes.clone(), tx.clone(), template.clone());
                let h = std::thread::Builder::new()
                    .name(format!("semoe-io-{worker}-{t}"))
                    .spawn(move || io_loop(d, template, lanes, tx))
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
        unwind.disk = None;
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
        let mut waiting = GrantWait {
            rx,
            id,
            tx: &self.tx,
            answered: false,
        };
        let answer = (&mut waiting.rx).await;
        waiting.answered = true;
        match answer.map_err(|_| stopped())?? {
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

    /// Wait until the store has no disk work in flight or queued (loads, write-backs, deferred
    /// gradients): what a step left running in the background is done. Benchmarks call it so
    /// that a step's I/O is counted in its own time, not in whatever runs next.
    pub async fn idle(&self) -> Result<()> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request::Idle { reply })?;
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
        // The tier file is removed even while a thread is still in a read of it (its descriptor
        // keeps the file until that call returns).
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        super::threads::join_within(threads, super::threads::DROP_WAIT, "expert store");
        if let Some(d) = &self.disk {
            d.remove();
        }
    }
}

/// A store's start under way: dropped before it is disarmed (`disk` taken), on an error, it
/// closes the I/O lanes (the threads started leave) and removes the Disk tier's file.
struct StartUnwind {
    lanes: Arc<IoLanes>,
    disk: Option<DiskTier>,
}

impl Drop for StartUnwind {
    fn drop(&mut self) {
        if let Some(d) = self.disk.take() {
            self.lanes.close();
            d.remove();
        }
    }
}

fn stopped() -> Error {
    Error::runtime("the expert store has stopped")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::{AdamW, OptimizerConfig};
    use crate::storage::tiers::policy::CachePolicy;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

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
        assert_eq!(want.len(), snap.len(), "units in each snapshot");
        for ((id, x), (other, y)) in want.iter().zip(&snap) {
            assert_eq!(id, other, "the snapshots list the same units in the same order");
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

    /// A disk whose every read takes this long (an hour: one that never answers, as a hard NFS
    /// mount whose server is gone).
    struct ReadsDelayed(Duration);

    impl crate::storage::tiers::disk::DiskFaults for ReadsDelayed {
        fn before(
            &self,
            _worker: usize,
            op: crate::storage::tiers::disk::DiskOp,
            _id: UnitId,
            _len: usize,
        ) -> Option<crate::storage::tiers::disk::InjectedIo> {
            (op == crate::storage::tiers::disk::DiskOp::Read)
                .then_some(crate::storage::tiers::disk::InjectedIo::Delay(self.0))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acquisition_given_up_after_its_unit_was_sent_loses_no_unit() {
        let mut c = config(2, 1, "given-up");
        c.drop_page_cache = false;
        c.disk_faults = Some(crate::storage::tiers::disk::DiskFaultHook(Arc::new(ReadsDelayed(
            Duration::from_millis(300),
        ))));
        let store = ExpertStore::new(0, &c, units(3, 2)).unwrap();
        assert!(store.stats().on_disk > 0, "{:?}", store.stats());
        let mut given_up = 0;
        for id in (0..3).flat_map(|b| (0..2).map(move |e| (b, e))) {
            let mut acquiring = Box::pin(store.acquire(id));
            match tokio::time::timeout(Duration::from_millis(50), acquiring.as_mut()).await {
                Ok(lease) => drop(lease.unwrap()),
                Err(_) => {
                    // The read finishes and the unit is sent while nobody waits; then the wait
                    // is dropped unread.
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    drop(acquiring);
                    given_up += 1;
                }
            }
        }
        assert!(given_up > 0, "no acquisition waited on the disk");
        let snapshot = tokio::time::timeout(Duration::from_secs(20), store.snapshot())
            .await
            .expect("the snapshot waits for a unit nobody holds")
            .unwrap();
        assert_eq!(snapshot.len(), 6);
        let want = units(3, 2);
        for ((id, got), (other, want)) in snapshot.iter().zip(&want) {
            assert_eq!(id, other);
            assert_eq!(got.params, want.params, "expert {id:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_whose_disk_stops_answering_is_dropped_within_its_wait() {
        let mut c = config(2, 1, "stuck");
        c.drop_page_cache = false;
        c.disk_faults = Some(crate::storage::tiers::disk::DiskFaultHook(Arc::new(ReadsDelayed(
            Duration::from_secs(3600),
        ))));
        let store = Arc::new(ExpertStore::new(0, &c, units(3, 2)).unwrap());
        assert!(store.stats().on_disk > 0, "{:?}", store.stats());
        // Ask for every unit of the last block: one of them is on disk, and its read never returns.
        let waiting = {
            let store = store.clone();
            tokio::spawn(async move {
                for e in 0..2 {
                    drop(store.acquire((2, e)).await);
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "the read was answered");
        waiting.abort();
        let _ = waiting.await;
        let started = Instant::now();
        let dropped = std::thread::spawn(move || drop(store));
        while !dropped.is_finished() {
            assert!(
                started.elapsed() < super::super::threads::DROP_WAIT + Duration::from_secs(5),
                "the drop waits for a read that never returns"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And the tier's files are removed all the same.
        assert!(
            !dir("stuck").join("worker-0").exists(),
            "the Disk tier's files outlive the store"
        );
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
    async fn prefetch_goes_on_as_room_frees_up() {
        // Device and Host hold one block each. Block b+1 waits in Host while block b is in use;
        // the moment it moves to Device, its room in Host must go to block b+2. Loading only at
        // the hints would leave each block's loads to its own routing: no look-ahead at all.
        let store = ExpertStore::new(0, &config(2, 2, "lookahead"), units(5, 2)).unwrap();
        // A first step shows the routing (and places the units).
        for b in 0..5 {
            store.hint(b, vec![0, 1], true);
            for e in 0..2 {
                drop(store.acquire((b, e)).await.unwrap());
            }
        }
        store.end_step(1);
        for b in 0..5 {
            let before = store.stats().served_from[2];
            store.hint(b, vec![0, 1], true);
            for e in 0..2 {
                drop(store.acquire((b, e)).await.unwrap());
            }
            // The loads the releases started finish (as the block's compute would let them).
            // Asked of the manager behind the releases: polling `loading` could see 0 before the
            // manager had started them (a busy machine failed the check at block 2).
            tokio::time::timeout(std::time::Duration::from_secs(10), store.idle())
                .await
                .expect("the store's disk work ends within 10 s")
                .unwrap();
            // Read after the manager answered a later request: the counters of the last grant
            // are published after its reply.
            if b >= 2 {
                let misses = store.stats().served_from[2] - before;
                assert_eq!(misses, 0, "block {b} was not loaded ahead: {:?}", store.stats());
            }
        }
        let st = store.stats();
        assert!(st.peak[0] <= st.budget[0] && st.peak[1] <= st.budget[1], "{st:?}");
    }

    /// A store's tier gauges read 0 once it is gone: a worker process's next epoch may run under
    /// another index, and the old index's would hold their last values for good.
    #[test]
    fn a_dropped_store_zeroes_its_gauges() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let device = |snapshotter: &metrics_util::debugging::Snapshotter| {
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .find(|(key, ..)| {
                    key.key().name() == crate::telemetry::metrics::TIER_BYTES
                        && key.key().labels().any(|l| l.key() == "worker" && l.value() == "7")
                        && key.key().labels().any(|l| l.key() == "tier" && l.value() == "device")
                })
                .map(|(.., value)| match value {
                    DebugValue::Gauge(g) => g.into_inner(),
                    other => panic!("{other:?}"),
                })
        };
        metrics::with_local_recorder(&recorder, || {
            // All in memory (no disk tier): its books run on this thread, under this recorder. (A
            // snapshot takes the values it reads: one, once the store is gone.)
            let store = ExpertStore::new(7, &StorageConfig::default(), units(2, 2)).unwrap();
            assert_eq!(store.stats().used[0], 4 * slot(0.0).bytes(), "four units in Device");
            drop(store);
            assert_eq!(device(&snapshotter), Some(0.0));
        });
    }

    #[tokio::test]
    async fn se_moe_keeps_hot_experts_that_lru_evicts() {
        // One hot expert used between scans of cold ones longer than the cache: LFU keeps it in
        // memory, LRU lets the scan push it out to disk.
        let mut rates = Vec::new();
        for policy in [CachePolicy::SE_MOE, CachePolicy::Lru] {
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
    /// Writes fail with "no space left" once `full` is set.
    struct FillsUp(std::sync::atomic::AtomicBool);

    impl crate::storage::tiers::disk::DiskFaults for FillsUp {
        fn before(
            &self,
            _: usize,
            op: crate::storage::tiers::disk::DiskOp,
            _: UnitId,
            _: usize,
        ) -> Option<crate::storage::tiers::disk::InjectedIo> {
            let full = self.0.load(std::sync::atomic::Ordering::SeqCst);
            (full && op == crate::storage::tiers::disk::DiskOp::Write)
                .then(|| crate::storage::tiers::disk::InjectedIo::Fail(std::io::Error::from_raw_os_error(libc::ENOSPC)))
        }
    }

    #[tokio::test]
    async fn a_start_that_fails_leaves_no_slot_file() {
        // The disk is full from the start: placing the units that do not fit in memory fails.
        let mut c = config(2, 1, "full-at-start");
        c.disk_faults = Some(crate::storage::tiers::disk::DiskFaultHook(Arc::new(FillsUp(
            std::sync::atomic::AtomicBool::new(true),
        ))));
        let e = ExpertStore::new(0, &c, units(4, 2)).err().unwrap().to_string();
        assert!(e.contains("os error 28"), "{e}");
        assert!(
            !dir("full-at-start").join("worker-0").exists(),
            "the failed start left its Disk tier"
        );
    }

    #[tokio::test]
    async fn once_a_write_has_failed_no_commit_is_taken() {
        let disk = Arc::new(FillsUp(Default::default()));
        let mut c = config(4, 4, "fills-up");
        c.disk_faults = Some(crate::storage::tiers::disk::DiskFaultHook(disk.clone()));
        let store = ExpertStore::new(0, &c, units(4, 4)).unwrap();
        disk.0.store(true, std::sync::atomic::Ordering::SeqCst);
        let update = || Pending {
            grads: [vec![0.5; 64], vec![-0.25; 8], vec![1.0; 64], vec![1.0; 8]],
            lr: 1e-2,
            norm: 3.0,
        };
        // Commits until the failed writes (a deferred gradient's, a write-back's) are known.
        let mut refused = false;
        for b in 0..4 {
            for e in 0..4 {
                match store.commit((b, e), update()).await {
                    Ok(committed) => {
                        assert!(!refused, "expert ({b}, {e}) committed after a refusal");
                        if let Some((mut lease, update)) = committed {
                            lease.slot_mut().unwrap().apply(update).unwrap();
                        }
                    }
                    Err(err) => {
                        assert!(err.to_string().contains("os error 28"), "{err}");
                        refused = true;
                    }
                }
            }
        }
        // The store has failed once a snapshot is refused (polled: the writes fail on I/O threads).
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while store.snapshot().await.is_ok() {
            assert!(Instant::now() < deadline, "no write failed");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // From then on every commit is refused, those of units only on disk included.
        for b in 0..4 {
            for e in 0..4 {
                let err = store
                    .commit((b, e), update())
                    .await
                    .err()
                    .unwrap_or_else(|| panic!("expert ({b}, {e}) committed after the disk failed"));
                assert!(err.to_string().contains("os error 28"), "{err}");
            }
        }
    }

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
    async fn a_unit_wanted_back_during_its_write_back_is_read_after_the_write() {
        // Device holds one block, Host nothing: a changed unit pushed out is written back, and
        // wanting it again at once must wait for that write and then read its new bytes (the loads'
        // lane goes first, so nothing but the manager's books orders the two).
        let mut c = config(2, 0, "ordered");
        c.prefetch = false;
        c.io_threads = 8;
        let memory = ExpertStore::new(0, &StorageConfig::default(), units(3, 2)).unwrap();
        let store = ExpertStore::new(0, &c, units(3, 2)).unwrap();
        for round in 0..4 {
            for b in 0..3 {
                for s in [&memory, &store] {
                    for e in 0..2 {
                        drop(s.acquire((b, e)).await.unwrap());
                        let update = Pending {
                            grads: [vec![0.5; 64], vec![-0.25; 8], vec![round as f32; 64], vec![1.0; 8]],
                            lr: 1e-2,
                            norm: 2.0,
                        };
                        if let Some((mut lease, update)) = s.commit((b, e), update).await.unwrap() {
                            lease.slot_mut().unwrap().apply(update).unwrap();
                        }
                    }
                }
                // The next block pushes this one out (two write-backs), then this one is wanted.
                let next = (b + 1) % 3;
                let leases = [
                    store.acquire((next, 0)).await.unwrap(),
                    store.acquire((next, 1)).await.unwrap(),
                ];
                drop(leases);
                for e in 0..2 {
                    let (want, got) = (
                        memory.acquire((b, e)).await.unwrap(),
                        store.acquire((b, e)).await.unwrap(),
                    );
                    assert_eq!(want.params, got.params, "round {round}, expert ({b}, {e})");
                }
            }
        }
        let (a, b) = (memory.snapshot().await.unwrap(), store.snapshot().await.unwrap());
        assert_eq!(a.len(), b.len(), "units in each snapshot");
        assert!(!a.is_empty());
        for ((id, x), (other, y)) in a.iter().zip(&b) {
            assert_eq!(id, other, "the snapshots list the same units in the same order");
            assert_eq!(x.params, y.params, "expert {id:?}");
            assert_eq!(x.optimizer, y.optimizer, "expert {id:?}");
        }
        let st = store.stats();
        assert!(st.disk_written > 0 && st.served_from[2] > 0, "{st:?}");
        let stalled: f64 = st.stall_causes.iter().sum();
        assert!(
            stalled <= st.stall_seconds + 0.05 && stalled >= 0.0,
            "the causes split the stall: {st:?}"
        );
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
        assert_eq!(a.len(), b.len(), "units in each snapshot");
        assert!(!a.is_empty());
        for ((id, x), (other, y)) in a.iter().zip(&b) {
            assert_eq!(id, other, "the snapshots list the same units in the same order");
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
