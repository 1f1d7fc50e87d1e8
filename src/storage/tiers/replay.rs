//! The cache policy replayed on a routing trace: which expert units a training run acquires, step
//! by step, driven through the Device and Host tiers' bookkeeping under unit budgets, with no data
//! and no disk. Deterministic counts (hits per tier, loads, write-backs, deferred commits), for
//! comparing policies and their settings on the routing of a trained model (`semoe bench
//! cache-policy`).
//!
//! The decisions are the tier manager's own: the victim, the admission into the host cache and the
//! replacement of a host entry come from [`CachePolicy::victim`] and [`CachePolicy::enters_host`],
//! the kind of load from [`CachePolicy::params_only`], the hit counters from
//! [`CachePolicy::touch`] and [`CachePolicy::end_step`], and where the step is from a
//! [`StepCursor`] moved as the manager moves its own, the same calls the manager
//! (`store/manager/eviction.rs`, `admission.rs`, `mod.rs`) makes. What the replay models of the
//! manager around them:
//!
//! - the units start as the store places them: Device, then Host, in order, the rest on disk;
//! - a step acquires, for each MoE block in order, every expert its routing sent a token to
//!   (ascending, after the block's hint, as the Communicator sends it), then the same sets block
//!   by block in reverse for the backward pass, then commits
//!   every unit (ascending); the experts of the block being acquired are kept from eviction (the
//!   manager keeps every waiting unit);
//! - a miss loads the parameters alone (the moments stay on disk) unless a deferred update waits,
//!   in which case the whole unit is loaded with the gradient and updated (dirty), or the policy
//!   loads whole units at this point of the step (the step order, in the backward);
//! - a commit of a unit on disk writes its gradient beside it (deferred), unless an update is
//!   already deferred, in which case the whole unit is loaded; a parameters-only copy in memory is
//!   dropped at the commit and the update deferred; a whole unit in memory is updated there;
//! - a dirty unit demoted to disk is written back, a clean one is dropped; a write-back's room is
//!   free only after the request that started it (so a unit leaving Device goes to disk rather
//!   than into a host cache whose victim must be written back first, as in the manager), and
//!   every write is done before the next request;
//! - a unit promoted from Host into a full Device makes room there before it leaves Host, as in
//!   the manager's `try_grant`: with both tiers full, the Device victim's demotion finds Host full
//!   and pushes a third unit to disk rather than swapping (a swap would save loads wherever host
//!   hits are common);
//! - the counters decay after each step's commit, as after the ledger's `end_step`.
//!
//! Not modelled: prefetch (the replay loads on demand), concurrency (acquisitions are served one
//! at a time, so no unit is held while another waits) and time. The figures are those of loading
//! on demand; the hit rate counts the forward and backward acquisitions served from memory.
//!
//! [`belady`] gives the bound: Belady's MIN over the same acquisitions with the same memory (Device
//! and Host together) loads the fewest units any policy can, prefetching included (a commit's load
//! acts as a prefetch here), so no policy's [`ReplayCounts::loads`] is below its count.

use super::policy::{CachePolicy, Candidate, StepCursor, Usage};
use super::unit::UnitId;
use crate::error::{Error, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The routing of a run: for each step, each MoE block, each expert, the tokens routed to it (kept
/// assignments). An expert with tokens in a block is acquired there; the counts themselves only
/// describe the skew.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RoutingTrace {
    /// Experts per MoE block.
    pub experts: usize,
    /// `steps[s][b][e]`: tokens of expert `e` of MoE block `b` at step `s`.
    pub steps: Vec<Vec<Vec<u64>>>,
}

impl RoutingTrace {
    /// MoE blocks (those of the first step; [`RoutingTrace::validate`] checks the others).
    pub fn blocks(&self) -> usize {
        self.steps.first().map_or(0, Vec::len)
    }

    /// Every step has the same blocks, every block `experts` counts.
    pub fn validate(&self) -> Result<()> {
        let blocks = self.blocks();
        if self.experts == 0 || blocks == 0 {
            return Err(Error::config("the routing trace has no experts or no MoE blocks"));
        }
        for (s, step) in self.steps.iter().enumerate() {
            if step.len() != blocks || step.iter().any(|b| b.len() != self.experts) {
                return Err(Error::config(format!(
                    "the routing trace's step {s} is not {blocks} blocks of {} experts",
                    self.experts
                )));
            }
        }
        Ok(())
    }

    /// The experts acquired in block `b` of step `s` (those with tokens), ascending.
    fn routed(&self, s: usize, b: usize) -> Vec<usize> {
        self.steps[s][b]
            .iter()
            .enumerate()
            .filter(|(_, &t)| t > 0)
            .map(|(e, _)| e)
            .collect()
    }

    /// The forward and backward acquisitions of step `s`, in order, each with the block it is in
    /// and whether it is the forward.
    fn acquisitions(&self, s: usize) -> Vec<(usize, bool, Vec<usize>)> {
        let blocks = self.blocks();
        let forward = (0..blocks).map(|b| (b, true, self.routed(s, b)));
        let backward = (0..blocks).rev().map(|b| (b, false, self.routed(s, b)));
        forward.chain(backward).collect()
    }

    /// Share of (step, block, expert) with tokens: how much of the expert state a step touches.
    pub fn touched(&self) -> f64 {
        let all = self.steps.len() * self.blocks() * self.experts;
        let touched: usize = self.steps.iter().flatten().flatten().filter(|&&t| t > 0).count();
        if all == 0 {
            0.0
        } else {
            touched as f64 / all as f64
        }
    }

    /// Popularity over the whole trace, per block: the busiest expert's share of the block's tokens
    /// over the uniform share `1 / experts` (1 when balanced).
    pub fn peak_over_uniform(&self) -> Vec<f64> {
        (0..self.blocks())
            .map(|b| {
                let per_expert: Vec<u64> = (0..self.experts)
                    .map(|e| self.steps.iter().map(|s| s[b][e]).sum())
                    .collect();
                let total: u64 = per_expert.iter().sum();
                let peak = per_expert.iter().copied().max().unwrap_or(0);
                if total == 0 {
                    0.0
                } else {
                    peak as f64 * self.experts as f64 / total as f64
                }
            })
            .collect()
    }
}

/// Bytes of a unit, of its parameters alone, and of a gradient, for turning counts into bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct UnitSizes {
    /// A whole unit (parameters and moments).
    pub unit: u64,
    /// The parameters alone (a forward or backward load).
    pub params: u64,
    /// A deferred gradient.
    pub grad: u64,
}

impl UnitSizes {
    /// The sizes of an expert of `d_model` x `d_ff` (see [`super::ExpertSlot::bytes_for`]).
    pub fn for_expert(d_model: usize, d_ff: usize) -> UnitSizes {
        let params = super::ExpertSlot::params_bytes_for(d_model, d_ff);
        UnitSizes {
            unit: super::ExpertSlot::bytes_for(d_model, d_ff),
            params,
            grad: params,
        }
    }
}

/// What a replay counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplayCounts {
    /// Forward and backward acquisitions.
    pub acquisitions: u64,
    /// Of those, served from the Device tier.
    pub device_hits: u64,
    /// Served from the Host tier.
    pub host_hits: u64,
    /// Loaded from disk.
    pub misses: u64,
    /// Commits (one per unit per step).
    pub commits: u64,
    /// Commits applied to a whole unit in memory.
    pub commits_in_memory: u64,
    /// Commits deferred (the gradient written beside a unit on disk).
    pub deferred: u64,
    /// Commits that loaded the whole unit (an update was already deferred).
    pub commit_loads: u64,
    /// Loads of the parameters alone.
    pub params_loads: u64,
    /// Loads of whole units.
    pub unit_loads: u64,
    /// Deferred gradients read back with their unit.
    pub grad_reads: u64,
    /// Dirty units written back to disk.
    pub write_backs: u64,
    /// Units demoted from Device into the host cache.
    pub to_host: u64,
}

impl ReplayCounts {
    /// Share of the forward and backward acquisitions served from memory (1 with none).
    pub fn hit_rate(&self) -> f64 {
        if self.acquisitions == 0 {
            return 1.0;
        }
        (self.device_hits + self.host_hits) as f64 / self.acquisitions as f64
    }

    /// Units read from disk, for any reason.
    pub fn loads(&self) -> u64 {
        self.params_loads + self.unit_loads
    }

    /// Bytes read from disk.
    pub fn bytes_read(&self, s: &UnitSizes) -> u64 {
        self.params_loads * s.params + self.unit_loads * s.unit + self.grad_reads * s.grad
    }

    /// Bytes written to disk (write-backs and deferred gradients).
    pub fn bytes_written(&self, s: &UnitSizes) -> u64 {
        self.write_backs * s.unit + self.deferred * s.grad
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Device = 0,
    Host = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    In(Tier),
    Disk,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    place: Place,
    usage: Usage,
    dirty: bool,
    partial: bool,
    deferred: bool,
}

/// What the policy sees of a unit in memory.
fn candidate(id: UnitId, e: &Entry) -> Candidate {
    Candidate {
        id,
        usage: e.usage,
        partial: e.partial,
    }
}

/// The tiers' books under `policy`, in units.
struct Books {
    policy: CachePolicy,
    /// Where the step is, moved as the manager's: by each block's hint and by the requests.
    cursor: StepCursor,
    budget: [usize; 2],
    /// Units in each tier, not counting those being written back.
    used: [usize; 2],
    /// Units being written back from each tier: their room is free only once the write is done,
    /// after the decisions of the request that started it (as in the manager, where a make-room
    /// pass that needs a write-back's room waits for it).
    flushing: [usize; 2],
    entries: BTreeMap<UnitId, Entry>,
    clock: u64,
    counts: ReplayCounts,
}

impl Books {
    fn free(&self, t: Tier) -> usize {
        let i = t as usize;
        self.budget[i].saturating_sub(self.used[i] + self.flushing[i])
    }

    /// Free a unit's room in `t` by demoting victims (never one in `keep`); false when that
    /// cannot be done now, because a write-back must finish first or nothing can leave (as the
    /// manager's `make_room`).
    fn make_room(&mut self, t: Tier, keep: &BTreeSet<UnitId>) -> bool {
        loop {
            if self.free(t) >= 1 {
                return true;
            }
            if self.flushing[t as usize] > 0 {
                return false;
            }
            let Some(victim) = self.policy.victim(&self.cursor, self.candidates(t, keep)) else {
                return false;
            };
            self.demote(victim, t, keep);
        }
    }

    /// [`Books::make_room`] in Device, waiting for write-backs as the acquirer does; it must
    /// succeed (the acquisitions of one block fit).
    fn room_in_device(&mut self, keep: &BTreeSet<UnitId>) -> Result<()> {
        loop {
            if self.make_room(Tier::Device, keep) {
                return Ok(());
            }
            if self.flushing == [0, 0] {
                return Err(Error::runtime(format!(
                    "replay: no room in the Device tier ({} units, all kept)",
                    self.budget[Tier::Device as usize]
                )));
            }
            self.flushing = [0, 0];
        }
    }

    fn candidates<'a>(&'a self, t: Tier, keep: &'a BTreeSet<UnitId>) -> impl Iterator<Item = Candidate> + 'a {
        self.entries
            .iter()
            .filter(move |(id, e)| e.place == Place::In(t) && !keep.contains(id))
            .map(|(id, e)| candidate(*id, e))
    }

    /// Out of `t`: into the host cache when the policy lets it in, else to disk (as the manager's
    /// `demote`).
    fn demote(&mut self, id: UnitId, t: Tier, keep: &BTreeSet<UnitId>) {
        let e = self.entries[&id];
        if t == Tier::Device && self.budget[Tier::Host as usize] > 0 {
            let mut keep_also = keep.clone();
            keep_also.insert(id);
            let displaced = if self.free(Tier::Host) == 0 {
                let v = self
                    .policy
                    .victim(&self.cursor, self.candidates(Tier::Host, &keep_also));
                v.map(|v| candidate(v, &self.entries[&v]))
            } else {
                None
            };
            let incoming = candidate(id, &e);
            if self.policy.enters_host(&self.cursor, &incoming, displaced.as_ref())
                && self.make_room(Tier::Host, &keep_also)
            {
                self.set_place(id, Place::In(Tier::Host));
                self.counts.to_host += 1;
                return;
            }
        }
        if e.dirty && !e.partial {
            self.counts.write_backs += 1;
            self.flushing[t as usize] += 1;
        }
        self.set_place(id, Place::Disk);
        if let Some(e) = self.entries.get_mut(&id) {
            e.dirty = false;
            e.partial = false;
        }
    }

    fn set_place(&mut self, id: UnitId, to: Place) {
        let Some(e) = self.entries.get_mut(&id) else { return };
        if let Place::In(t) = e.place {
            self.used[t as usize] -= 1;
        }
        if let Place::In(t) = to {
            self.used[t as usize] += 1;
        }
        e.place = to;
    }

    /// Bring `id` into Device (from Host or disk): the tier it was in, `None` when loaded.
    fn bring_to_device(&mut self, id: UnitId, keep: &BTreeSet<UnitId>, params_only: bool) -> Result<Option<Tier>> {
        let e = self.entries[&id];
        match e.place {
            Place::In(Tier::Device) => Ok(Some(Tier::Device)),
            Place::In(Tier::Host) => {
                self.room_in_device(keep)?;
                self.set_place(id, Place::In(Tier::Device));
                Ok(Some(Tier::Host))
            }
            Place::Disk => {
                self.room_in_device(keep)?;
                self.set_place(id, Place::In(Tier::Device));
                let partial = params_only && !e.deferred;
                if partial {
                    self.counts.params_loads += 1;
                } else {
                    self.counts.unit_loads += 1;
                }
                if e.deferred {
                    self.counts.grad_reads += 1;
                }
                if let Some(e) = self.entries.get_mut(&id) {
                    e.partial = partial;
                    // The deferred update was applied on the way in: the file is behind.
                    e.dirty = e.deferred;
                    e.deferred = false;
                }
                Ok(None)
            }
        }
    }

    fn touch(&mut self, id: UnitId) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.entries.get_mut(&id) {
            self.policy.touch(&mut e.usage, clock);
        }
    }

    fn acquire(&mut self, id: UnitId, keep: &BTreeSet<UnitId>) -> Result<()> {
        // The write-backs of earlier requests are done by now.
        self.flushing = [0, 0];
        self.cursor.acquire(id, false, self.clock);
        self.counts.acquisitions += 1;
        let units_through = self.entries.range(..(id.0 + 1, 0)).count();
        let params_only = self
            .policy
            .params_only(&self.cursor, units_through, self.budget[0] + self.budget[1]);
        match self.bring_to_device(id, keep, params_only)? {
            Some(Tier::Device) => self.counts.device_hits += 1,
            Some(Tier::Host) => self.counts.host_hits += 1,
            None => self.counts.misses += 1,
        }
        self.touch(id);
        Ok(())
    }

    fn commit(&mut self, id: UnitId) -> Result<()> {
        self.flushing = [0, 0];
        self.cursor.acquire(id, true, self.clock);
        self.counts.commits += 1;
        let e = self.entries[&id];
        if let (Place::In(_), true) = (e.place, e.partial) {
            // A parameters-only copy cannot take the update: drop it (the file is current).
            self.set_place(id, Place::Disk);
            if let Some(e) = self.entries.get_mut(&id) {
                e.partial = false;
            }
        }
        let e = self.entries[&id];
        if e.place == Place::Disk && !e.deferred {
            self.counts.deferred += 1;
            if let Some(e) = self.entries.get_mut(&id) {
                e.deferred = true;
            }
            return Ok(());
        }
        let keep = BTreeSet::from([id]);
        match self.bring_to_device(id, &keep, false)? {
            Some(_) => self.counts.commits_in_memory += 1,
            None => self.counts.commit_loads += 1,
        }
        self.touch(id);
        if let Some(e) = self.entries.get_mut(&id) {
            e.dirty = true;
        }
        Ok(())
    }
}

/// Replay `trace` under `policy` with `device` and `host` units of memory (the units start where
/// the store puts them: Device, then Host, in order, the rest on disk). Fails when `device` cannot hold one block's experts, as the store does.
pub fn replay(trace: &RoutingTrace, policy: CachePolicy, device: usize, host: usize) -> Result<ReplayCounts> {
    run(trace, policy, device, host, true)
}

/// [`replay`] with each acquisition alone, nothing else kept from eviction: what the store does
/// when its caller acquires one unit at a time, awaiting each (the check of the replay against
/// the store in `tests/storage_policy_replay.rs`).
pub fn replay_one_at_a_time(
    trace: &RoutingTrace,
    policy: CachePolicy,
    device: usize,
    host: usize,
) -> Result<ReplayCounts> {
    run(trace, policy, device, host, false)
}

fn run(
    trace: &RoutingTrace,
    policy: CachePolicy,
    device: usize,
    host: usize,
    keep_block: bool,
) -> Result<ReplayCounts> {
    trace.validate()?;
    policy.validate()?;
    if device < trace.experts {
        return Err(Error::config(format!(
            "replay: {device} units of Device cannot hold one MoE block's {} experts",
            trace.experts
        )));
    }
    let mut books = Books {
        policy,
        cursor: StepCursor::new(0..trace.blocks()),
        budget: [device, host],
        used: [0, 0],
        flushing: [0, 0],
        entries: BTreeMap::new(),
        clock: 0,
        counts: ReplayCounts::default(),
    };
    // Placed as the store places them: Device, then Host, in order, the rest on disk; a unit in
    // memory has no file yet (dirty).
    for b in 0..trace.blocks() {
        for e in 0..trace.experts {
            let place = [Tier::Device, Tier::Host]
                .into_iter()
                .find(|&t| books.used[t as usize] < books.budget[t as usize])
                .map_or(Place::Disk, Place::In);
            if let Place::In(t) = place {
                books.used[t as usize] += 1;
            }
            let entry = Entry {
                place,
                usage: Usage::default(),
                dirty: place != Place::Disk,
                partial: false,
                deferred: false,
            };
            books.entries.insert((b, e), entry);
        }
    }
    for s in 0..trace.steps.len() {
        for (b, forward, experts) in trace.acquisitions(s) {
            // The Communicator hints each block before its experts are acquired.
            books.cursor.hint(b, forward, &experts, books.clock);
            let block: BTreeSet<UnitId> = experts.iter().map(|&e| (b, e)).collect();
            for &e in &experts {
                let keep = if keep_block {
                    block.clone()
                } else {
                    BTreeSet::from([(b, e)])
                };
                books.acquire((b, e), &keep)?;
            }
        }
        let ids: Vec<UnitId> = books.entries.keys().copied().collect();
        for id in ids {
            books.commit(id)?;
        }
        let step = s as u64 + 1;
        books
            .policy
            .end_step(step, books.entries.values_mut().map(|e| &mut e.usage));
        books.cursor.end_step(books.clock);
    }
    Ok(books.counts)
}

/// Belady's MIN over the forward and backward acquisitions of `trace` with `capacity` units of
/// memory, starting from the same units as [`replay`]: on a miss with memory full, evict the unit
/// used again furthest in the future. Only
/// `acquisitions`, the hits (all counted as `device_hits`), `misses` and `unit_loads` are set.
pub fn belady(trace: &RoutingTrace, capacity: usize) -> Result<ReplayCounts> {
    trace.validate()?;
    let seq: Vec<UnitId> = (0..trace.steps.len())
        .flat_map(|s| trace.acquisitions(s))
        .flat_map(|(b, _, experts)| experts.into_iter().map(move |e| (b, e)))
        .collect();
    let mut next = vec![usize::MAX; seq.len()];
    let mut seen: HashMap<UnitId, usize> = HashMap::new();
    for (i, id) in seq.iter().enumerate().rev() {
        if let Some(&j) = seen.get(id) {
            next[i] = j;
        }
        seen.insert(*id, i);
    }
    let mut counts = ReplayCounts::default();
    // Resident units by their next use (units never used again tie at `usize::MAX`, told apart by
    // their id).
    let mut by_next: BTreeSet<(usize, UnitId)> = BTreeSet::new();
    let mut resident: HashMap<UnitId, usize> = HashMap::new();
    // The same start as the policies': the first units in order, as the store places them.
    let first = (0..trace.blocks()).flat_map(|b| (0..trace.experts).map(move |e| (b, e)));
    for id in first.take(capacity) {
        let n = seen.get(&id).copied().unwrap_or(usize::MAX);
        resident.insert(id, n);
        by_next.insert((n, id));
    }
    for (i, id) in seq.iter().enumerate() {
        counts.acquisitions += 1;
        if let Some(n) = resident.remove(id) {
            by_next.remove(&(n, *id));
            counts.device_hits += 1;
        } else {
            counts.misses += 1;
            counts.unit_loads += 1;
            if resident.len() >= capacity {
                if let Some((_, victim)) = by_next.pop_last() {
                    resident.remove(&victim);
                }
            }
        }
        if capacity > 0 {
            resident.insert(*id, next[i]);
            by_next.insert((next[i], *id));
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(steps: &[&[&[u64]]]) -> RoutingTrace {
        RoutingTrace {
            experts: steps[0][0].len(),
            steps: steps.iter().map(|s| s.iter().map(|b| b.to_vec()).collect()).collect(),
        }
    }

    #[test]
    fn counts_of_a_tiny_trace_by_hand() {
        // Two blocks of two experts, expert 0 of each routed; Device holds one block, no host
        // cache; block 0 starts in Device (dirty: no file yet), block 1 on disk.
        let t = trace(&[&[&[3, 0], &[2, 0]], &[&[1, 0], &[5, 0]]]);
        let c = replay(&t, CachePolicy::Lru, 2, 0).unwrap();
        // Step 1: 0.0 hits; 1.0 misses (parameters only), pushing out 0.1 (written back); the
        // backward hits twice. Commits: 0.0 in memory; 0.1 on disk, deferred; 1.0 a parameters-only
        // copy, dropped and deferred; 1.1 deferred. Step 2: 0.0 hits; 1.0 loads whole with its
        // gradient (room: 1.0 was dropped); the backward hits twice. Commits: 0.0 in memory; 0.1
        // loads whole (an update is deferred), pushing out 1.0 (written back); 1.0 deferred; 1.1
        // loads whole, pushing out 0.0 (written back).
        assert_eq!(c.acquisitions, 8);
        assert_eq!((c.device_hits, c.host_hits, c.misses), (6, 0, 2));
        assert_eq!(
            (c.commits, c.commits_in_memory, c.deferred, c.commit_loads),
            (8, 2, 4, 2)
        );
        assert_eq!((c.params_loads, c.unit_loads, c.grad_reads), (1, 3, 3));
        assert_eq!(c.write_backs, 3);
    }

    #[test]
    fn a_device_smaller_than_a_block_is_refused() {
        let t = trace(&[&[&[1, 1, 1]]]);
        assert!(replay(&t, CachePolicy::Lru, 2, 8)
            .unwrap_err()
            .to_string()
            .contains("Device"));
    }
}
