//! The expert cache policy judged on the routing of a trained model (`semoe bench cache-policy`):
//! the routing a checkpoint's gate gives the training batches that follow it, replayed through the
//! tiers' bookkeeping ([`crate::storage::tiers::replay`]) under each policy and memory size.
//! Counts only (hits, loads, bytes): deterministic, no disk, no timing.

use crate::error::{Error, Result};
use crate::kernels::{Backend, Cpu};
use crate::model::gpt::Gpt;
use crate::storage::tiers::replay::{belady, replay, ReplayCounts, RoutingTrace, UnitSizes};
use crate::storage::tiers::CachePolicy;
use serde::Serialize;

/// Which training batches to route: `steps` steps from `first_step` on, each of `batch` sequences
/// in `groups` routing groups, drawn as training draws them (seed, step, group).
#[derive(Clone, Copy, Debug)]
pub struct TraceBatches {
    /// The sampler's seed (the run's).
    pub seed: u64,
    /// The first step.
    pub first_step: u64,
    /// Steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Routing groups per step (the capacity is per group).
    pub groups: usize,
}

impl TraceBatches {
    /// The `steps` steps a run of `config` trains after a checkpoint taken after `done` steps
    /// (the sampler's step index is 0-based: the next step's index is `done`), with the run's
    /// batch and groups unless given.
    pub fn after_checkpoint(
        config: &crate::config::TrainConfig,
        done: u64,
        steps: usize,
        batch: Option<usize>,
        groups: Option<usize>,
    ) -> TraceBatches {
        TraceBatches {
            seed: config.train.seed,
            first_step: done,
            steps,
            batch: batch.unwrap_or(config.train.batch),
            groups: groups.unwrap_or(config.train.groups),
        }
    }
}

/// The routing of `model` on the training batches `b` of `text`: per step, per MoE block, the
/// tokens each expert keeps, summed over the step's groups (the gate's own code, forward only).
pub fn record_routing(model: &Gpt<f32>, cpu: &Cpu, text: &[u8], b: &TraceBatches) -> Result<RoutingTrace> {
    let c = model.config();
    if b.steps == 0 || b.groups == 0 || b.batch == 0 || !b.batch.is_multiple_of(b.groups) {
        return Err(Error::config(format!(
            "a routing trace needs steps >= 1 and a batch ({}) that is a multiple of the groups ({})",
            b.batch, b.groups
        )));
    }
    let t = c.block_size;
    if text.len() < t + 1 {
        return Err(Error::config(format!(
            "the training text has {} bytes; the model's context needs at least {}",
            text.len(),
            t + 1
        )));
    }
    let seqs = b.batch / b.groups;
    // Refused before any allocation: the jobs and their routing counts, and a forward pass of a
    // group's tokens per thread (its activations, about 16 floats a model dimension, and logits).
    let counts = (b.steps as f64) * (b.groups as f64) * (16.0 + 8.0 * (c.n_layer * c.experts) as f64);
    let forward =
        cpu.threads() as f64 * seqs as f64 * t as f64 * 4.0 * (16.0 * c.d_model as f64 + 2.0 * c.vocab as f64);
    super::check_memory(
        &format!("a routing trace of {} steps of {} sequences", b.steps, b.batch),
        counts + forward,
    )?;
    let jobs: Vec<(usize, usize)> = (0..b.steps).flat_map(|s| (0..b.groups).map(move |g| (s, g))).collect();
    let per_group = cpu.par_map(jobs, |backend, (s, g)| {
        let step = b.first_step + s as u64;
        let (idx, _) = crate::data::sampler::group_batch(text, b.seed, step, g, seqs, t);
        model.moe_stats(backend, &idx, seqs)
    })?;
    let blocks = per_group.first().map_or(0, Vec::len);
    if blocks == 0 {
        return Err(Error::config(
            "the model has no MoE block: there is no expert routing to replay",
        ));
    }
    let mut steps = vec![vec![vec![0u64; c.experts]; blocks]; b.steps];
    for (i, stats) in per_group.iter().enumerate() {
        let s = i / b.groups;
        for (bl, st) in stats.iter().enumerate() {
            for (e, &n) in st.expert_tokens.iter().enumerate() {
                steps[s][bl][e] += n as u64;
            }
        }
    }
    Ok(RoutingTrace {
        experts: c.experts,
        steps,
    })
}

/// A memory size of the comparison: units in Device and in Host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemorySize {
    /// Units the Device tier holds (one block's experts: the least it may).
    pub device: usize,
    /// Units the Host tier holds.
    pub host: usize,
}

impl MemorySize {
    /// `percent` of `units` in memory, Device holding one block's `experts` and Host the rest;
    /// `None` when that is less than one block.
    pub fn share(percent: f64, units: usize, experts: usize) -> Option<MemorySize> {
        let total = ((percent / 100.0) * units as f64).round() as usize;
        (total >= experts).then(|| MemorySize {
            device: experts,
            host: total.min(units) - experts,
        })
    }

    /// Units in memory.
    pub fn total(&self) -> usize {
        self.device + self.host
    }
}

/// One policy's counts at each memory size.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyRow {
    /// Its name in the table.
    pub name: String,
    /// The policy (`None`: Belady's MIN, the bound).
    #[serde(skip)]
    pub policy: Option<CachePolicy>,
    /// Counts per memory size, in the order of [`CachePolicyReport::sizes`].
    pub counts: Vec<ReplayCounts>,
}

impl PolicyRow {
    /// The mean hit rate over the memory sizes.
    pub fn mean_hit_rate(&self) -> f64 {
        if self.counts.is_empty() {
            return 0.0;
        }
        self.counts.iter().map(ReplayCounts::hit_rate).sum::<f64>() / self.counts.len() as f64
    }
}

/// What [`cache_policy_bench`] found.
#[derive(Clone, Debug, Serialize)]
pub struct CachePolicyReport {
    /// MoE blocks.
    pub blocks: usize,
    /// Experts per block.
    pub experts: usize,
    /// Steps replayed.
    pub steps: usize,
    /// Share of (step, block, expert) with tokens.
    pub touched: f64,
    /// Per block, the busiest expert's share of the tokens over the uniform share.
    pub peak_over_uniform: Vec<f64>,
    /// The memory sizes compared.
    pub sizes: Vec<MemorySize>,
    /// Unit sizes, for the bytes.
    pub unit_sizes: UnitSizes,
    /// Belady's MIN with the same memory: the fewest loads possible.
    pub bound: PolicyRow,
    /// One row per policy, in the order given.
    pub rows: Vec<PolicyRow>,
}

impl CachePolicyReport {
    /// The row with the best mean hit rate (the first of equals).
    pub fn best(&self) -> Option<&PolicyRow> {
        self.rows.iter().fold(None, |best: Option<&PolicyRow>, r| match best {
            Some(b) if b.mean_hit_rate() >= r.mean_hit_rate() => Some(b),
            _ => Some(r),
        })
    }
}

/// The policies compared by default: LRU, the default policy (the step order), SE-MoE's with its
/// best settings, and a grid of SE-MoE's admission threshold, decay factor and decay period (beta 1
/// never decays: plain LFU).
pub fn policy_grid() -> Vec<(String, CachePolicy)> {
    let mut v = vec![
        ("lru".to_string(), CachePolicy::Lru),
        (
            format!("default ({})", describe(&CachePolicy::default())),
            CachePolicy::default(),
        ),
    ];
    if CachePolicy::SE_MOE != CachePolicy::default() {
        v.push((describe(&CachePolicy::SE_MOE), CachePolicy::SE_MOE));
    }
    for threshold in [0.0, 1.0, 2.0, 4.0] {
        for beta in [0.25, 0.5, 0.75, 0.9, 0.95, 1.0] {
            for decay_every in [1, 4] {
                if beta == 1.0 && decay_every != 1 {
                    continue;
                }
                let p = CachePolicy::SeMoe {
                    threshold,
                    beta,
                    decay_every,
                };
                if p != CachePolicy::default() && p != CachePolicy::SE_MOE {
                    v.push((describe(&p), p));
                }
            }
        }
    }
    v
}

/// `se-moe t=1 beta=0.5/4` (threshold, decay factor every so many steps), `lru` or `step-order`.
pub fn describe(p: &CachePolicy) -> String {
    match *p {
        CachePolicy::SeMoe {
            threshold,
            beta,
            decay_every,
        } => format!("se-moe t={threshold} beta={beta}/{decay_every}"),
        CachePolicy::Lru => "lru".into(),
        CachePolicy::StepOrder => "step-order".into(),
    }
}

/// Replay `trace` under each of `policies` at each of `sizes`, with Belady's MIN as the bound.
pub fn cache_policy_bench(
    trace: &RoutingTrace,
    sizes: &[MemorySize],
    policies: &[(String, CachePolicy)],
    unit_sizes: UnitSizes,
) -> Result<CachePolicyReport> {
    trace.validate()?;
    if sizes.is_empty() {
        return Err(Error::config(
            "no memory size to compare: each must hold at least one MoE block's experts",
        ));
    }
    let bound = PolicyRow {
        name: "Belady's MIN (bound)".into(),
        policy: None,
        counts: sizes.iter().map(|m| belady(trace, m.total())).collect::<Result<_>>()?,
    };
    let rows = policies
        .iter()
        .map(|(name, p)| {
            Ok(PolicyRow {
                name: name.clone(),
                policy: Some(*p),
                counts: sizes
                    .iter()
                    .map(|m| replay(trace, *p, m.device, m.host))
                    .collect::<Result<_>>()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CachePolicyReport {
        blocks: trace.blocks(),
        experts: trace.experts,
        steps: trace.steps.len(),
        touched: trace.touched(),
        peak_over_uniform: trace.peak_over_uniform(),
        sizes: sizes.to_vec(),
        unit_sizes,
        bound,
        rows,
    })
}
