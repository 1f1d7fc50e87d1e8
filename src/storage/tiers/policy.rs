//! Which cached expert leaves a full tier, and which may enter the host cache.
//!
//! The default, the step order ([`CachePolicy::StepOrder`]), uses what a training step always
//! does: the forward through the MoE blocks in ascending order, the backward in descending order,
//! then the commit of every unit. Only the routing within a block is unknown, and in training
//! nearly every expert is acquired every step (all of them in the traces of trained models that
//! `semoe bench cache-policy` replays, 99.9% at 4 sequences per step), so a unit's next use is its
//! block's next slot in that order: the policy evicts the unit used furthest ahead ([`StepCursor`]
//! says where the step is), Belady's MIN with the known order in place of the future. Units of one
//! block tie; among them a parameters-only copy goes first (the commit drops it anyway), then the
//! least hit (counters decayed by 0.9 every step, so that the same units stay and the rest miss,
//! rather than all of them in turn), then the least recently used. A backward miss loads the whole
//! unit rather than its parameters alone ([`CachePolicy::params_only`]) when it will still be in
//! memory at the commit (the blocks from there down to the first fit in the budgets): the commit
//! then applies in memory. A unit that will have left by then loads its parameters alone, since
//! its update is deferred either way and the moments read now would be read again in the next
//! forward.
//!
//! SE-MoE caches hot experts in host memory with hit counters: a counter grows on every use and
//! decays by a factor `beta` every `decay_every` steps, the least-hit entry is evicted, and an
//! expert must have been hit at least `threshold` times (after decay) to be admitted into the
//! cache at all (a cold expert goes straight back to disk instead of pushing a warmer one out).
//! LRU is available for comparison. Under every policy an entry that was prefetched and not used
//! yet is evicted only when nothing else can be, so that prefetching does not undo itself.
//!
//! On the replayed routing of trained checkpoints (`semoe bench cache-policy`: [`super::replay`]
//! drives the same calls as the manager through the tiers' bookkeeping, checked against the store;
//! BENCHMARKS.md, sessions 16 and 19) the step order hits 39.6 / 43.8 / 72.6% of the acquisitions
//! on the default model (3 blocks of 8 experts) with 42 / 50 / 75% of its units in memory, against
//! 20.9 / 27.3 / 54.1% for SE-MoE (threshold 0, beta 0.9 every step, the earlier default:
//! [`CachePolicy::SE_MOE`]) and 20.9 / 29.2 / 48.7% for LRU, where Belady's MIN reaches 41.7 / 50
//! / 75%; on 4 blocks of 32 experts at 25 / 42 / 50 / 75%: 25.0 / 41.1 / 48.8 / 73.7% against
//! 12.6 / 20.4 / 27.9 / 57.9% (SE-MoE), 12.6 / 18.9 / 24.7 / 50.7% (LRU) and 25 / 42.2 / 50 / 75%
//! (MIN): the best of the policies compared in every case. Most of the gain is the whole-unit
//! load in the backward (ablations in BENCHMARKS.md, session 16); limiting it to the units that
//! stay to the commit (session 19) cost 4.1 points at 50% of the default model and at most 0.6
//! elsewhere, and reads up to 19% fewer bytes.

use super::unit::UnitId;
use crate::error::{Error, Result};
use std::cmp::Reverse;
use std::collections::HashMap;
use std::str::FromStr;

/// The decay of the hit counters under [`CachePolicy::StepOrder`], every step: they only order
/// the units of one block, whose next uses tie.
const STEP_ORDER_DECAY: f64 = 0.9;

/// The cache policy of the Device and Host tiers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum CachePolicy {
    /// Evict the unit whose next use in the step's known order is furthest away (see
    /// [`StepCursor`]); ties go to a parameters-only copy, then to the least hit, then to the
    /// least recently used. The default: on the replayed routing of trained models (`semoe bench
    /// cache-policy`) ahead of SE-MoE's counters and of LRU; see the module docs.
    #[default]
    StepOrder,
    /// Least-hit eviction with decayed hit counters and an admission threshold (SE-MoE).
    SeMoe {
        /// Hits an expert needs to be admitted into the host cache.
        threshold: f64,
        /// Decay factor of the counters, in (0, 1].
        beta: f64,
        /// Decay every this many steps (at least 1).
        decay_every: u64,
    },
    /// Least recently used.
    Lru,
}

impl CachePolicy {
    /// SE-MoE's policy with its best settings on the replayed routing (threshold 0, decay by 0.9
    /// every step: ahead of 0.5 every 4 steps and of LRU there; BENCHMARKS.md, session 15).
    pub const SE_MOE: CachePolicy = CachePolicy::SeMoe {
        threshold: 0.0,
        beta: 0.9,
        decay_every: 1,
    };

    /// Check the parameters.
    pub fn validate(&self) -> Result<()> {
        if let CachePolicy::SeMoe {
            threshold,
            beta,
            decay_every,
        } = *self
        {
            if !(beta > 0.0 && beta <= 1.0) {
                return Err(Error::config(format!("storage.cache_beta = {beta}: must be in (0, 1]")));
            }
            if decay_every == 0 {
                return Err(Error::config("storage.cache_decay_every = 0: must be at least 1"));
            }
            if !(threshold >= 0.0 && threshold.is_finite()) {
                return Err(Error::config(format!(
                    "storage.cache_threshold = {threshold}: must be a finite number >= 0"
                )));
            }
        }
        Ok(())
    }

    /// A short name (`step-order`, `se-moe`, `lru`), as [`CachePolicy::from_str`] reads it.
    pub fn name(&self) -> &'static str {
        match self {
            CachePolicy::StepOrder => "step-order",
            CachePolicy::SeMoe { .. } => "se-moe",
            CachePolicy::Lru => "lru",
        }
    }
}

impl FromStr for CachePolicy {
    type Err = Error;

    /// `step-order`, `se-moe` (with [`CachePolicy::SE_MOE`]'s settings) or `lru`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "step-order" | "step" => Ok(CachePolicy::StepOrder),
            "se-moe" | "semoe" | "lfu" => Ok(CachePolicy::SE_MOE),
            "lru" => Ok(CachePolicy::Lru),
            other => Err(Error::config(format!(
                "storage.cache_policy = {other:?}: expected step-order, se-moe or lru"
            ))),
        }
    }
}

/// What the policy knows about one cached entry.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Decayed hit count.
    pub hits: f64,
    /// The store's clock at the last use (or load).
    pub last_use: u64,
    /// Loaded by a prefetch and not used since.
    pub unused_prefetch: bool,
}

/// A unit in memory that the policy may evict or admit into the host cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// The unit: (MoE block, expert).
    pub id: UnitId,
    /// Its hit counter and last use.
    pub usage: Usage,
    /// Memory holds its parameters alone: the commit will drop the copy, so keeping it past the
    /// commit gains nothing.
    pub partial: bool,
}

/// Where a training step is, in the order every step takes through a store's units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The forward pass of a MoE block.
    Forward(usize),
    /// The backward pass of a MoE block.
    Backward(usize),
    /// The commit of every unit (also the state between steps).
    Commit,
}

/// The step's known order and where in it the step is, for [`CachePolicy::StepOrder`].
///
/// Every training step goes through a store's units in the same order: the forward through the
/// MoE blocks in ascending order, the backward in descending order, then the commit of every unit.
/// Only the routing within a block is unknown, and in a trained model nearly every expert is used
/// every step (the replay of `semoe bench cache-policy` finds 99.9-100%), so the block order alone
/// tells which unit is needed next: a unit's next use is its block's next slot in that order. That
/// is Belady's MIN with the order in place of the future, which no popularity counter can see.
///
/// The store moves the cursor with the Communicator's hints (each block's direction and routed
/// experts, sent before those experts are acquired) and, for callers that send none, by the
/// acquisitions themselves (a commit is the commit phase, a lower block after a higher one the
/// backward), so that the replay and the store see the same positions.
///
/// The groups of a step go through the blocks a little apart (one group's backward of block 1
/// beside another's of block 2), each sending its own hint per block. The cursor stands where the
/// last group is: a unit the laggards still need must not look finished because the leader has
/// moved on. It learns how many hints a slot gets from the step before, and counts the
/// acquisitions each hint announced that have not come yet: those units are needed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepCursor {
    /// The MoE blocks the store holds units of, ascending.
    blocks: Vec<usize>,
    phase: Phase,
    /// The store's clock when the phase began: a unit of the phase's block last used after it has
    /// had its use in this phase (used without hints; with them, `pending` says it).
    since: u64,
    /// A hint has come in this step: the hints alone move the cursor until the commit.
    hinted: bool,
    /// Hints of this step per slot of the order.
    reached: Vec<u32>,
    /// Hints a slot got in the last step that had any (0 before one): the number of groups the
    /// cursor waits for before it leaves a slot.
    groups: u32,
    /// Acquisitions announced by this step's hints and not made yet, per unit.
    pending: HashMap<UnitId, u32>,
}

impl Default for StepCursor {
    fn default() -> Self {
        StepCursor {
            blocks: Vec::new(),
            phase: Phase::Commit,
            since: 0,
            hinted: false,
            reached: Vec::new(),
            groups: 0,
            pending: HashMap::new(),
        }
    }
}

impl StepCursor {
    /// A cursor between steps over `blocks`.
    pub fn new(blocks: impl IntoIterator<Item = usize>) -> StepCursor {
        let mut c = StepCursor::default();
        blocks.into_iter().for_each(|b| c.hold(b));
        c
    }

    /// The store holds units of `block`.
    pub fn hold(&mut self, block: usize) {
        if let Err(i) = self.blocks.binary_search(&block) {
            self.blocks.insert(i, block);
        }
    }

    /// Where the step is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Move to `phase`, never back within a step (only after the commit does the order start
    /// again): a lagging group's request must not send the cursor back or, seen as a lower block
    /// after a higher one, into a new step's forward.
    fn enter(&mut self, phase: Phase, clock: u64) {
        if phase == self.phase {
            return;
        }
        if self.phase != Phase::Commit && phase != Phase::Commit && self.slot_of(phase) < self.slot() {
            return;
        }
        self.phase = phase;
        self.since = clock;
    }

    /// The phase at slot `s` of the order.
    fn phase_at(&self, s: usize) -> Phase {
        let n = self.blocks.len();
        match s {
            s if s < n => Phase::Forward(self.blocks[s]),
            s if s < 2 * n => Phase::Backward(self.blocks[2 * n - 1 - s]),
            _ => Phase::Commit,
        }
    }

    /// The Communicator's hint: the experts `routed` of `block` are about to run forward (or
    /// backward), one acquisition each.
    pub fn hint(&mut self, block: usize, forward: bool, routed: &[usize], clock: u64) {
        let phase = if forward {
            Phase::Forward(block)
        } else {
            Phase::Backward(block)
        };
        let s = self.slot_of(phase);
        // Every group has been here already: the step was abandoned and this is a new try.
        let again = self.groups > 0 && self.reached.get(s).is_some_and(|&r| r >= self.groups);
        if self.phase == Phase::Commit || again {
            // A new step: the last one's hints per slot are the groups to wait for.
            if let Some(&most) = self.reached.iter().max().filter(|_| !again) {
                self.groups = most;
            }
            self.reached = vec![0; 2 * self.blocks.len()];
            self.pending.clear();
            self.phase = Phase::Commit;
        }
        self.hinted = true;
        if let Some(r) = self.reached.get_mut(s) {
            *r += 1;
        }
        for &e in routed {
            *self.pending.entry((block, e)).or_default() += 1;
        }
        // The last slot every group has reached; before a whole step has been seen, or before
        // every group has reached the first slot, the slot of this hint.
        let last = match self.groups {
            0 => None,
            g => self.reached.iter().rposition(|&r| r >= g),
        };
        let laggard = last.map_or(phase, |s| self.phase_at(s));
        self.enter(laggard, clock);
    }

    /// Unit `id` is asked for (for a commit when `commit`), the store's clock at `clock`. Once a
    /// hint has come in the step only a commit moves the cursor (to the commit phase); without
    /// hints, the order of the requests tells the phase: a higher block than the last (or any
    /// block after the commit) the forward, a lower one the backward; the same block stays where
    /// it is.
    pub fn acquire(&mut self, id: UnitId, commit: bool, clock: u64) {
        let block = id.0;
        if let Some(n) = self.pending.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&id);
            }
        }
        if self.hinted && !commit {
            return;
        }
        let phase = match self.phase {
            _ if commit => Phase::Commit,
            Phase::Forward(c) | Phase::Backward(c) if c == block => self.phase,
            Phase::Forward(c) if block < c => Phase::Backward(block),
            Phase::Backward(c) if block < c => Phase::Backward(block),
            Phase::Forward(_) | Phase::Backward(_) | Phase::Commit => Phase::Forward(block),
        };
        self.enter(phase, clock);
    }

    /// The step has committed: the next request begins a new step.
    pub fn end_step(&mut self, clock: u64) {
        self.enter(Phase::Commit, clock);
        self.hinted = false;
    }

    /// The slot of the order the step is in: forward of the `i`-th held block at `i`, its
    /// backward at `2n - 1 - i`, the commit at `2n` (of `n` held blocks); a block the store holds
    /// no unit of stands at the next held block's slot.
    fn slot(&self) -> usize {
        self.slot_of(self.phase)
    }

    /// The slot of `phase` in the step's order (see [`StepCursor::slot`]).
    fn slot_of(&self, phase: Phase) -> usize {
        let n = self.blocks.len();
        match phase {
            Phase::Forward(b) => self.blocks.partition_point(|&x| x < b),
            Phase::Backward(b) => 2 * n - self.blocks.partition_point(|&x| x <= b),
            Phase::Commit => 2 * n,
        }
    }

    /// Slots of the order until `c` is next used (0: in this slot, not yet served), or
    /// `u64::MAX` when it is not used before it leaves memory anyway (a parameters-only copy
    /// whose next use is after the commit, which drops it) or its block is unknown.
    pub fn next_use(&self, c: &Candidate) -> u64 {
        let Ok(i) = self.blocks.binary_search(&c.id.0) else {
            return u64::MAX;
        };
        let n = self.blocks.len();
        let period = 2 * n + 1;
        let at = self.slot();
        if self.pending.contains_key(&c.id) {
            return 0;
        }
        // With hints, every use still to come in this slot is pending: the unit is done here.
        let served = self.hinted || c.usage.last_use > self.since;
        let d = [i, 2 * n - 1 - i]
            .into_iter()
            .map(|u| match (u + period - at) % period {
                0 if served => period,
                d => d,
            })
            .min()
            .unwrap_or(period);
        if c.partial && at + d > 2 * n {
            return u64::MAX;
        }
        d as u64
    }
}

impl CachePolicy {
    /// Record a use at `clock`.
    pub fn touch(&self, u: &mut Usage, clock: u64) {
        u.hits += 1.0;
        u.last_use = clock;
        u.unused_prefetch = false;
    }

    /// Called once per step: decay the counters when it is time.
    pub fn end_step<'a>(&self, step: u64, all: impl Iterator<Item = &'a mut Usage>) {
        match *self {
            CachePolicy::SeMoe { beta, decay_every, .. } => {
                if step > 0 && step.is_multiple_of(decay_every) {
                    all.for_each(|u| u.hits *= beta);
                }
            }
            CachePolicy::StepOrder => all.for_each(|u| u.hits *= STEP_ORDER_DECAY),
            CachePolicy::Lru => {}
        }
    }

    /// Whether a miss of a forward or backward pass (at `at`) loads the parameters alone, the
    /// moments staying on disk. `units_through` counts the units of the missed unit's block and
    /// of every block below it, `memory_units` the units the Device and Host budgets hold
    /// together. Under the step order a backward miss loads the whole unit when those units fit:
    /// the backward takes them last, so the unit stays in memory to its commit, which then
    /// applies in memory (a parameters-only copy would be dropped at the commit, the update
    /// deferred, and the unit loaded again, whole, in the next forward). A unit that will have
    /// left memory before the commit has its update deferred anyway: its moments, read now, would
    /// only be read again in the next forward, so it loads its parameters alone.
    pub fn params_only(&self, at: &StepCursor, units_through: usize, memory_units: usize) -> bool {
        let stays_to_commit = units_through <= memory_units;
        !(matches!(self, CachePolicy::StepOrder) && matches!(at.phase(), Phase::Backward(_)) && stays_to_commit)
    }

    /// Whether an entry leaving the Device tier may enter the Host cache at all.
    pub fn admits(&self, u: &Usage) -> bool {
        match *self {
            CachePolicy::SeMoe { threshold, .. } => u.unused_prefetch || u.hits >= threshold,
            CachePolicy::Lru | CachePolicy::StepOrder => true,
        }
    }

    /// The order of eviction: the least key goes first. A prefetched entry not used yet goes last
    /// under every policy, so that prefetching does not undo itself.
    fn key(&self, at: &StepCursor, c: &Candidate) -> (bool, Reverse<u64>, bool, f64, u64) {
        let (next, partial, hits) = match self {
            CachePolicy::StepOrder => (at.next_use(c), c.partial, c.usage.hits),
            CachePolicy::SeMoe { .. } => (0, false, c.usage.hits),
            CachePolicy::Lru => (0, false, 0.0),
        };
        (c.usage.unused_prefetch, Reverse(next), !partial, hits, c.usage.last_use)
    }

    fn cmp_keys(
        a: &(bool, Reverse<u64>, bool, f64, u64),
        b: &(bool, Reverse<u64>, bool, f64, u64),
    ) -> std::cmp::Ordering {
        a.0.cmp(&b.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.total_cmp(&b.3))
            .then(a.4.cmp(&b.4))
    }

    /// Whether `incoming` (leaving the Device tier) should take the place of `victim` in a full
    /// host cache: under SE-MoE only when it is at least as hot, under LRU always, under the step
    /// order when the victim would be evicted first (its next use is further).
    pub fn replaces(&self, at: &StepCursor, incoming: &Candidate, victim: &Candidate) -> bool {
        match self {
            CachePolicy::SeMoe { .. } => incoming.usage.unused_prefetch || incoming.usage.hits >= victim.usage.hits,
            CachePolicy::Lru => true,
            CachePolicy::StepOrder => {
                Self::cmp_keys(&self.key(at, victim), &self.key(at, incoming)) == std::cmp::Ordering::Less
            }
        }
    }

    /// Whether an entry leaving the Device tier goes into the host cache: the policy admits it,
    /// and `displaced` (the host entry it would push out, `None` when the cache has room or
    /// nothing to push out) does not deserve the place more. The tier manager's demotion and the
    /// replay ([`super::replay`]) both decide with this.
    pub fn enters_host(&self, at: &StepCursor, incoming: &Candidate, displaced: Option<&Candidate>) -> bool {
        self.admits(&incoming.usage) && displaced.is_none_or(|v| self.replaces(at, incoming, v))
    }

    /// The entry to evict among `candidates` with the step at `at`, or `None` when there is none
    /// (the first of equals).
    pub fn victim(&self, at: &StepCursor, candidates: impl Iterator<Item = Candidate>) -> Option<UnitId> {
        candidates
            .map(|c| (self.key(at, &c), c.id))
            .min_by(|(a, _), (b, _)| Self::cmp_keys(a, b))
            .map(|(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(hits: f64, last_use: u64) -> Usage {
        Usage {
            hits,
            last_use,
            unused_prefetch: false,
        }
    }

    /// Candidates of block 0, experts 0, 1, ...
    fn cands(us: &[Usage]) -> Vec<Candidate> {
        us.iter()
            .enumerate()
            .map(|(e, &usage)| Candidate {
                id: (0, e),
                usage,
                partial: false,
            })
            .collect()
    }

    #[test]
    fn se_moe_evicts_the_least_hit_and_lru_the_oldest() {
        let at = StepCursor::new([0]);
        let entries = cands(&[usage(5.0, 1), usage(1.0, 9), usage(3.0, 2)]);
        assert_eq!(CachePolicy::SE_MOE.victim(&at, entries.iter().copied()), Some((0, 1)));
        assert_eq!(CachePolicy::Lru.victim(&at, entries.iter().copied()), Some((0, 0)));
        assert_eq!(CachePolicy::Lru.victim(&at, std::iter::empty()), None);
    }

    #[test]
    fn ties_go_to_the_least_recent_and_fresh_prefetches_go_last() {
        let at = StepCursor::new([0]);
        let mut fresh = usage(0.0, 0);
        fresh.unused_prefetch = true;
        let entries = cands(&[fresh, usage(2.0, 7), usage(2.0, 3)]);
        for p in [CachePolicy::SE_MOE, CachePolicy::Lru, CachePolicy::StepOrder] {
            assert_eq!(p.victim(&at, entries.iter().copied()), Some((0, 2)), "{p:?}");
            assert_eq!(p.victim(&at, entries[..1].iter().copied()), Some((0, 0)), "{p:?}");
        }
    }

    #[test]
    fn counters_decay_every_k_steps_and_gate_admission() {
        let at = StepCursor::new([0]);
        let p = CachePolicy::SeMoe {
            threshold: 2.0,
            beta: 0.5,
            decay_every: 2,
        };
        let mut u = Usage::default();
        for clock in 0..4 {
            p.touch(&mut u, clock);
        }
        assert!(p.admits(&u));
        let mut us = [u];
        p.end_step(1, us.iter_mut());
        assert_eq!(us[0].hits, 4.0);
        p.end_step(2, us.iter_mut());
        assert_eq!(us[0].hits, 2.0);
        p.end_step(4, us.iter_mut());
        assert_eq!(us[0].hits, 1.0);
        assert!(!p.admits(&us[0]));
        assert!(CachePolicy::Lru.admits(&us[0]));
        let c = cands(&[us[0], usage(3.0, 1)]);
        assert!(!p.replaces(&at, &c[0], &c[1]) && p.replaces(&at, &c[1], &c[0]));
        assert!(CachePolicy::Lru.replaces(&at, &c[0], &c[1]));
    }

    fn unit(block: usize, expert: usize, last_use: u64, partial: bool) -> Candidate {
        Candidate {
            id: (block, expert),
            usage: usage(1.0, last_use),
            partial,
        }
    }

    #[test]
    fn the_cursor_follows_hints_and_infers_the_phase_from_requests() {
        let mut c = StepCursor::new([2, 0, 1]);
        assert_eq!(c.phase(), Phase::Commit);
        for (block, commit, want) in [
            (0, false, Phase::Forward(0)),
            (1, false, Phase::Forward(1)),
            (2, false, Phase::Forward(2)),
            (2, false, Phase::Forward(2)),
            (1, false, Phase::Backward(1)),
            (0, false, Phase::Backward(0)),
            (1, true, Phase::Commit),
            (0, true, Phase::Commit),
            (1, false, Phase::Forward(1)),
        ] {
            c.acquire((block, 0), commit, 0);
            assert_eq!(c.phase(), want, "block {block}, commit {commit}");
        }
        c.hint(2, false, &[0], 0);
        assert_eq!(c.phase(), Phase::Backward(2));
        c.acquire((2, 0), false, 0);
        assert_eq!(
            c.phase(),
            Phase::Backward(2),
            "a hint is not overruled by its block's requests"
        );
        c.end_step(0);
        assert_eq!(c.phase(), Phase::Commit);
    }

    #[test]
    fn step_order_evicts_the_unit_used_furthest_ahead() {
        // Three blocks: the order is F0 F1 F2 B2 B1 B0 C (slots 0..=6).
        let p = CachePolicy::StepOrder;
        let mut at = StepCursor::new([0, 1, 2]);
        // In the forward of block 1 (since clock 10): block 2 is next (F2, 1 slot), block 0 only
        // in the backward (B0, 4 slots): block 0 goes first, the least recently used of it first.
        at.hint(1, true, &[1], 10);
        let resident = [unit(2, 0, 1, false), unit(0, 1, 4, false), unit(0, 0, 3, false)];
        assert_eq!(at.next_use(&resident[0]), 1);
        assert_eq!(at.next_use(&resident[1]), 4);
        assert_eq!(p.victim(&at, resident.iter().copied()), Some((0, 0)));
        // A unit of block 1 not routed to in this forward (or already used) is next used in B1 (3
        // slots); one the hint announced and not yet acquired is needed now.
        assert_eq!(at.next_use(&unit(1, 0, 11, false)), 3);
        assert_eq!(at.next_use(&unit(1, 1, 9, false)), 0);
        // In the backward of block 1: block 2 is next used in the next step's F2 (5 slots), block
        // 0 in B0 (1 slot): block 2 goes first, and a parameters-only copy of it before a whole
        // unit (the commit drops the copy anyway).
        at.hint(1, false, &[], 20);
        let resident = [unit(0, 0, 3, false), unit(2, 0, 15, false), unit(2, 1, 16, true)];
        assert_eq!(at.next_use(&resident[0]), 1);
        assert_eq!(at.next_use(&resident[1]), 5);
        assert_eq!(at.next_use(&resident[2]), u64::MAX);
        assert_eq!(p.victim(&at, resident.iter().copied()), Some((2, 1)));
        assert_eq!(p.victim(&at, resident[..2].iter().copied()), Some((2, 0)));
        // LRU would evict block 0's unit, the oldest, which the backward needs next.
        assert_eq!(
            CachePolicy::Lru.victim(&at, resident[..2].iter().copied()),
            Some((0, 0))
        );
        // Between steps, block 0 is next (F0) and block 2 furthest (F2).
        at.end_step(30);
        let resident = [unit(2, 0, 15, false), unit(0, 0, 3, false), unit(1, 0, 12, false)];
        assert_eq!(p.victim(&at, resident.iter().copied()), Some((2, 0)));
        // Into a full host cache only in place of a unit used later.
        assert!(p.enters_host(&at, &resident[1], Some(&resident[0])));
        assert!(!p.enters_host(&at, &resident[0], Some(&resident[1])));
        assert!(p.enters_host(&at, &resident[0], None));
    }

    #[test]
    fn the_cursor_waits_for_the_last_group_and_keeps_what_hints_announced() {
        // Three blocks, slots F0 F1 F2 B2 B1 B0 C; two groups send a hint per block each.
        let p = CachePolicy::StepOrder;
        let mut at = StepCursor::new([0, 1, 2]);
        let order = [(0, true), (1, true), (2, true), (2, false), (1, false), (0, false)];
        // The first step: the number of groups is not known yet, the cursor follows the hints.
        for &(b, forward) in &order {
            for _group in 0..2 {
                at.hint(b, forward, &[0, 1], 0);
                at.acquire((b, 0), false, 0);
                at.acquire((b, 1), false, 0);
            }
        }
        at.acquire((0, 0), true, 0);
        at.end_step(0);
        // The second step: the leader's hints run ahead, the cursor stays where both groups are.
        at.hint(0, true, &[0, 1], 1);
        at.hint(0, true, &[0, 1], 1);
        assert_eq!(at.phase(), Phase::Forward(0));
        at.hint(1, true, &[0], 2);
        assert_eq!(at.phase(), Phase::Forward(0), "one group of two has reached block 1");
        // The laggard has acquired expert 0 of block 0, not yet expert 1: that one is needed now.
        at.acquire((0, 0), false, 3);
        at.acquire((0, 0), false, 3);
        at.acquire((0, 1), false, 3);
        assert_eq!(at.next_use(&unit(0, 1, 3, false)), 0);
        assert_eq!(at.next_use(&unit(0, 0, 3, false)), 5, "done until B0");
        // Block 1's expert 0 was announced; expert 1 was not (yet): the laggard may still route to
        // it, one slot ahead of where the cursor stands.
        assert_eq!(at.next_use(&unit(1, 0, 0, false)), 0);
        assert_eq!(at.next_use(&unit(1, 1, 0, false)), 1);
        assert_eq!(
            p.victim(&at, [unit(1, 1, 0, false), unit(0, 0, 3, false)].into_iter()),
            Some((0, 0))
        );
        at.hint(1, true, &[1], 4);
        assert_eq!(at.phase(), Phase::Forward(1), "both groups are in block 1");
        // A lagging hint never sends the cursor back, nor a request for a lower block into the
        // backward.
        at.acquire((0, 1), false, 5);
        assert_eq!(at.phase(), Phase::Forward(1));
        // The step is abandoned and tried again: a hint for a slot every group has passed starts
        // over, forgetting what the abandoned try announced.
        at.hint(0, true, &[1], 6);
        assert_eq!(at.phase(), Phase::Forward(0));
        assert_eq!(at.next_use(&unit(1, 0, 0, false)), 1);
        assert_eq!(at.next_use(&unit(0, 1, 0, false)), 0);
    }

    #[test]
    fn parses_and_validates() {
        assert_eq!("lru".parse::<CachePolicy>().unwrap(), CachePolicy::Lru);
        assert_eq!("se-moe".parse::<CachePolicy>().unwrap(), CachePolicy::SE_MOE);
        assert_eq!("step-order".parse::<CachePolicy>().unwrap(), CachePolicy::StepOrder);
        for p in [CachePolicy::default(), CachePolicy::SE_MOE, CachePolicy::Lru] {
            assert_eq!(p.name().parse::<CachePolicy>().unwrap(), p);
        }
        assert!("fifo".parse::<CachePolicy>().is_err());
        let bad = CachePolicy::SeMoe {
            threshold: 0.0,
            beta: 1.5,
            decay_every: 1,
        };
        assert!(bad.validate().unwrap_err().to_string().contains("beta"));
    }
}
