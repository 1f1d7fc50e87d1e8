//! Placement plans: which worker hosts each expert, runs each data group, and owns each dense tensor.
//!
//! The plan decides only *where* work runs. What is computed (every matmul's shape, every sum's
//! order) is fixed by the model and the groups, so any plan gives the same parameters, bit for bit.

use crate::error::{Error, Result};
use crate::model::gpt::{Gpt, GptConfig};

// The spelling of a placement is part of the configuration (below the runtime); the plans built
// from it are here.
pub use crate::config::ExpertPlacement;

/// A complete plan for one model, batch and worker count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Number of workers.
    pub workers: usize,
    /// `expert_owner[e]`: the worker hosting expert `e` of every MoE block.
    pub expert_owner: Vec<usize>,
    /// `group_owner[g]`: the worker running data group `g` (`g % W`).
    pub group_owner: Vec<usize>,
    /// `tensor_owner[i]`: the worker that reduces, updates and broadcasts dense tensor `i` (in
    /// `Gpt::tensors` order; expert tensors have no single owner and hold `usize::MAX`).
    pub tensor_owner: Vec<usize>,
}

/// Which worker hosts each expert (the same in every MoE block) under `experts`, over `workers`
/// workers: the experts' part of [`Placement::new`], without a model at hand.
pub fn expert_owners(model: &GptConfig, workers: usize, experts: &ExpertPlacement) -> Result<Vec<usize>> {
    let e_count = model.experts;
    if workers == 0 {
        return Err(Error::config("the runtime needs at least one worker"));
    }
    Ok(match experts {
        ExpertPlacement::RoundRobin => (0..e_count).map(|e| e % workers).collect(),
        ExpertPlacement::Blocked => (0..e_count).map(|e| e * workers / e_count.max(1)).collect(),
        ExpertPlacement::Explicit(owners) => {
            if model.has_moe() && owners.len() != e_count {
                return Err(Error::config(format!(
                    "train.placement names a worker for {} experts but the model has {e_count} experts",
                    owners.len()
                )));
            }
            if let Some(w) = owners.iter().find(|&&w| w >= workers) {
                return Err(Error::config(format!(
                    "the placement puts an expert on worker {w}, but there are {workers} workers"
                )));
            }
            owners.clone()
        }
    })
}

impl Placement {
    /// The plan for `model` with `groups` data groups on `workers` workers.
    pub fn new(model: &Gpt<f32>, groups: usize, workers: usize, experts: &ExpertPlacement) -> Result<Self> {
        let expert_owner = expert_owners(model.config(), workers, experts)?;
        // Dense tensors: largest first onto the least-loaded worker (ties: lowest index), so that
        // reduction and update work is balanced.
        let specs = model.specs();
        let mut order: Vec<usize> = (0..specs.len()).filter(|&i| !specs[i].expert).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(specs[i].unit_len()));
        let mut load = vec![0usize; workers];
        let mut tensor_owner = vec![usize::MAX; specs.len()];
        for i in order {
            let w = (0..workers).min_by_key(|&w| (load[w], w)).unwrap_or(0);
            load[w] += specs[i].unit_len();
            tensor_owner[i] = w;
        }
        Ok(Placement {
            workers,
            expert_owner,
            group_owner: (0..groups).map(|g| g % workers).collect(),
            tensor_owner,
        })
    }

    /// The plan for a new membership that moves as little state as possible from `previous`:
    /// `origin[w]` is the index that worker `w` of the new membership had in `previous` (`None` for
    /// a newcomer). A kept worker keeps its experts up to its fair share (`E / W`, one more for
    /// `E % W` of them) and all its dense tensors; the experts and tensors of departed workers, and
    /// the experts beyond a share, go to the least loaded workers; then each newcomer takes whole
    /// dense tensors from the most loaded worker until it carries three quarters of the average
    /// dense load. The configured [`ExpertPlacement`] decides only the first epoch's plan.
    pub fn rebalanced(
        model: &GptConfig,
        groups: usize,
        previous: &Placement,
        origin: &[Option<usize>],
    ) -> Result<Self> {
        let workers = origin.len();
        let e_count = model.experts;
        let specs = model.tensor_specs();
        if workers == 0 {
            return Err(Error::config("the runtime needs at least one worker"));
        }
        if previous.expert_owner.len() != e_count || previous.tensor_owner.len() != specs.len() {
            return Err(Error::config("the previous placement is of another model"));
        }
        let mut seen = vec![false; previous.workers];
        for &o in origin.iter().flatten() {
            if o >= previous.workers || std::mem::replace(&mut seen[o], true) {
                return Err(Error::config(format!(
                    "worker {o} of the previous placement is named twice or does not exist"
                )));
            }
        }
        // Experts: keep up to the fair share, then give the rest to the emptiest workers.
        let (share, mut extra) = (e_count / workers, e_count % workers);
        let mut expert_owner = vec![usize::MAX; e_count];
        let mut count = vec![0usize; workers];
        for (w, o) in origin.iter().enumerate() {
            let Some(o) = *o else { continue };
            let had = previous.experts_of(o);
            let keep = if had.len() > share && extra > 0 {
                extra -= 1;
                share + 1
            } else {
                share
            };
            for &e in had.iter().take(keep) {
                expert_owner[e] = w;
                count[w] += 1;
            }
        }
        for owner in expert_owner.iter_mut().filter(|o| **o == usize::MAX) {
            let w = (0..workers).min_by_key(|&w| (count[w], w)).unwrap_or(0);
            *owner = w;
            count[w] += 1;
        }
        // Dense tensors: keep, place the orphans largest first, then narrow the gap.
        let mut tensor_owner = vec![usize::MAX; specs.len()];
        let mut load = vec![0usize; workers];
        let mut orphans = Vec::new();
        let new_index: Vec<Option<usize>> = (0..previous.workers)
            .map(|o| origin.iter().position(|x| *x == Some(o)))
            .collect();
        for (i, spec) in specs.iter().enumerate().filter(|(_, s)| !s.expert) {
            match new_index.get(previous.tensor_owner[i]).copied().flatten() {
                Some(w) => {
                    tensor_owner[i] = w;
                    load[w] += spec.unit_len();
                }
                None => orphans.push(i),
            }
        }
        orphans.sort_by_key(|&i| (std::cmp::Reverse(specs[i].unit_len()), i));
        for i in orphans {
            let w = (0..workers).min_by_key(|&w| (load[w], w)).unwrap_or(0);
            tensor_owner[i] = w;
            load[w] += specs[i].unit_len();
        }
        // Newcomers under three quarters of the average load take tensors from the most loaded
        // worker until they reach it; nothing moves between kept workers. Each move
        // strictly lowers the sum of squared loads, so this ends; the bound is a guard.
        let total: usize = load.iter().sum();
        let light = |load: usize| load * 4 * workers < total * 3;
        let receivers: Vec<usize> = (0..workers).filter(|&w| origin[w].is_none()).collect();
        for _ in 0..specs.len() * workers {
            let Some(lo) = receivers
                .iter()
                .copied()
                .filter(|&w| light(load[w]))
                .min_by_key(|&w| (load[w], w))
            else {
                break;
            };
            let hi = (0..workers)
                .max_by_key(|&w| (load[w], std::cmp::Reverse(w)))
                .unwrap_or(0);
            let gap = load[hi] - load[lo];
            // The tensor nearest half the gap: the two end up closest.
            let best = (0..specs.len())
                .filter(|&i| tensor_owner[i] == hi && specs[i].unit_len() < gap)
                .min_by_key(|&i| ((2 * specs[i].unit_len()).abs_diff(gap), i));
            let Some(i) = best else { break };
            tensor_owner[i] = lo;
            load[hi] -= specs[i].unit_len();
            load[lo] += specs[i].unit_len();
        }
        Ok(Placement {
            workers,
            expert_owner,
            group_owner: (0..groups).map(|g| g % workers).collect(),
            tensor_owner,
        })
    }

    /// A plan received from elsewhere (the coordinator's, in a worker process): every owner is
    /// checked against `model` and `workers` before it is used.
    pub fn from_owners(
        model: &Gpt<f32>,
        groups: usize,
        workers: usize,
        expert_owner: Vec<usize>,
        tensor_owner: Vec<usize>,
    ) -> Result<Self> {
        let specs = model.specs();
        let bad = |detail: String| Error::config(format!("a placement plan {detail}"));
        if workers == 0 {
            return Err(bad("has no worker".into()));
        }
        if expert_owner.len() != model.config().experts || tensor_owner.len() != specs.len() {
            return Err(bad(format!(
                "names {} experts and {} tensors; the model has {} and {}",
                expert_owner.len(),
                tensor_owner.len(),
                model.config().experts,
                specs.len()
            )));
        }
        if let Some(w) = expert_owner.iter().find(|&&w| w >= workers) {
            return Err(bad(format!("puts an expert on worker {w} of {workers}")));
        }
        for (i, spec) in specs.iter().enumerate() {
            let owner = tensor_owner[i];
            if spec.expert != (owner == usize::MAX) || (!spec.expert && owner >= workers) {
                return Err(bad(format!(
                    "gives {} the owner {owner} ({workers} workers)",
                    spec.name
                )));
            }
        }
        Ok(Placement {
            workers,
            expert_owner,
            group_owner: (0..groups).map(|g| g % workers).collect(),
            tensor_owner,
        })
    }

    /// The groups `worker` runs, in increasing order.
    pub fn groups_of(&self, worker: usize) -> Vec<usize> {
        (0..self.group_owner.len())
            .filter(|&g| self.group_owner[g] == worker)
            .collect()
    }

    /// The experts (of each MoE block) `worker` hosts.
    pub fn experts_of(&self, worker: usize) -> Vec<usize> {
        (0..self.expert_owner.len())
            .filter(|&e| self.expert_owner[e] == worker)
            .collect()
    }

    /// The dense tensors `worker` owns.
    pub fn tensors_of(&self, worker: usize) -> Vec<usize> {
        (0..self.tensor_owner.len())
            .filter(|&i| self.tensor_owner[i] == worker)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::GptConfig;

    /// 2 MoE blocks of `experts` experts.
    fn model(experts: usize) -> Gpt<f32> {
        let config = GptConfig {
            block_size: 8,
            d_model: 16,
            n_layer: 2,
            n_head: 2,
            d_ff: 32,
            experts,
            k: 1,
            ..GptConfig::default()
        };
        Gpt::init(&config, 1).expect("model")
    }

    #[test]
    fn parses_the_named_policies_and_explicit_lists() {
        assert_eq!(
            "round-robin".parse::<ExpertPlacement>().ok(),
            Some(ExpertPlacement::RoundRobin)
        );
        assert_eq!(
            "blocked".parse::<ExpertPlacement>().ok(),
            Some(ExpertPlacement::Blocked)
        );
        assert_eq!(
            "2, 0,1 ,1".parse::<ExpertPlacement>().ok(),
            Some(ExpertPlacement::Explicit(vec![2, 0, 1, 1]))
        );
        assert_eq!(
            "3".parse::<ExpertPlacement>().ok(),
            Some(ExpertPlacement::Explicit(vec![3]))
        );
    }

    #[test]
    fn a_malformed_placement_is_an_error_naming_the_choices_and_the_input() {
        for bad in ["", "roundrobin", "Blocked", "1,,2", "0,-1", "1.5", "0,1,", "a,b"] {
            let e = bad.parse::<ExpertPlacement>().expect_err(bad).to_string();
            assert!(
                e.contains("round-robin") && e.contains("blocked") && e.contains(&format!("{bad:?}")),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn round_robin_and_blocked_spread_the_experts() {
        let m = model(8);
        let p = Placement::new(&m, 6, 3, &ExpertPlacement::RoundRobin).expect("plan");
        assert_eq!(p.expert_owner, vec![0, 1, 2, 0, 1, 2, 0, 1]);
        assert_eq!(p.group_owner, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(p.groups_of(1), vec![1, 4]);
        assert_eq!(p.experts_of(2), vec![2, 5]);
        let p = Placement::new(&m, 4, 3, &ExpertPlacement::Blocked).expect("plan");
        assert_eq!(p.expert_owner, vec![0, 0, 0, 1, 1, 1, 2, 2]);
        let p = Placement::new(&m, 2, 2, &ExpertPlacement::Explicit(vec![1, 1, 0, 1, 0, 0, 0, 1])).expect("plan");
        assert_eq!(p.experts_of(0), vec![2, 4, 5, 6]);
        assert_eq!(p.experts_of(1), vec![0, 1, 3, 7]);
    }

    #[test]
    fn every_dense_tensor_has_one_owner_and_expert_tensors_none() {
        let m = model(4);
        let specs = m.specs();
        for workers in 1..=3 {
            let p = Placement::new(&m, 3, workers, &ExpertPlacement::RoundRobin).expect("plan");
            assert_eq!(p.tensor_owner.len(), specs.len());
            for (i, s) in specs.iter().enumerate() {
                if s.expert {
                    assert_eq!(p.tensor_owner[i], usize::MAX, "expert tensor {i}");
                } else {
                    assert!(p.tensor_owner[i] < workers, "dense tensor {i}");
                }
            }
            let owned: usize = (0..workers).map(|w| p.tensors_of(w).len()).sum();
            assert_eq!(owned, specs.iter().filter(|s| !s.expert).count());
            if workers > 1 {
                assert!(
                    (0..workers).all(|w| !p.tensors_of(w).is_empty()),
                    "every worker owns some"
                );
            }
        }
    }

    #[test]
    fn workers_beyond_the_groups_host_experts_and_own_dense_tensors() {
        let m = model(4);
        let p = Placement::new(&m, 2, 3, &ExpertPlacement::RoundRobin).expect("plan");
        assert_eq!(p.group_owner, vec![0, 1]);
        assert!(p.groups_of(2).is_empty(), "worker 2 runs no group");
        assert_eq!(p.experts_of(2), vec![2], "but hosts an expert");
        assert!(!p.tensors_of(2).is_empty(), "and owns dense tensors");
    }

    #[test]
    fn invalid_plans_are_clear_errors() {
        let m = model(4);
        let err = |groups, workers, e: ExpertPlacement| {
            Placement::new(&m, groups, workers, &e)
                .expect_err("invalid plan")
                .to_string()
        };
        assert!(err(4, 0, ExpertPlacement::RoundRobin).contains("at least one worker"));
        let e = err(4, 2, ExpertPlacement::Explicit(vec![0, 1, 0]));
        assert!(
            e.contains("train.placement names a worker for 3 experts") && e.contains("4 experts"),
            "{e}"
        );
        let e = err(4, 2, ExpertPlacement::Explicit(vec![0, 1, 2, 0]));
        assert!(e.contains("worker 2") && e.contains("2 workers"), "{e}");
    }

    /// Experts and dense tensors whose owner differs between `a` and `b`, the workers of `b`
    /// mapped back through `origin`.
    fn changed(a: &Placement, b: &Placement, origin: &[Option<usize>]) -> (usize, usize) {
        let back = |w: usize| origin[w];
        let experts = (0..a.expert_owner.len())
            .filter(|&e| back(b.expert_owner[e]) != Some(a.expert_owner[e]))
            .count();
        let tensors = (0..a.tensor_owner.len())
            .filter(|&i| a.tensor_owner[i] != usize::MAX && back(b.tensor_owner[i]) != Some(a.tensor_owner[i]))
            .count();
        (experts, tensors)
    }

    fn balanced(p: &Placement) {
        let counts: Vec<usize> = (0..p.workers).map(|w| p.experts_of(w).len()).collect();
        let (lo, hi) = (counts.iter().min().copied(), counts.iter().max().copied());
        assert!(
            hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
            "experts balanced: {counts:?}"
        );
    }

    #[test]
    fn a_join_moves_only_the_newcomers_share() {
        let m = model(8);
        let two = Placement::new(&m, 4, 2, &ExpertPlacement::RoundRobin).expect("plan");
        let three = Placement::rebalanced(m.config(), 4, &two, &[Some(0), Some(1), None]).expect("plan");
        balanced(&three);
        // 8 experts over 3 workers: 3, 3, 2; the two kept workers give up one each.
        assert_eq!(three.experts_of(2).len(), 2);
        let (experts, tensors) = changed(&two, &three, &[Some(0), Some(1), None]);
        assert_eq!(experts, 2, "only the newcomer's experts move: {three:?}");
        assert_eq!(tensors, three.tensors_of(2).len(), "only the newcomer's tensors move");
        assert!(!three.tensors_of(2).is_empty(), "the newcomer owns dense tensors");
        assert_eq!(three.group_owner, vec![0, 1, 2, 0]);
    }

    #[test]
    fn a_leave_moves_only_the_leavers_share() {
        let m = model(8);
        let three = Placement::new(&m, 4, 3, &ExpertPlacement::RoundRobin).expect("plan");
        // Worker 1 leaves; workers 0 and 2 become 0 and 1.
        let origin = [Some(0), Some(2)];
        let two = Placement::rebalanced(m.config(), 4, &three, &origin).expect("plan");
        balanced(&two);
        let (experts, _) = changed(&three, &two, &origin);
        assert_eq!(experts, three.experts_of(1).len(), "only the leaver's experts move");
        for i in three.tensors_of(0) {
            assert_eq!(two.tensor_owner[i], 0, "a kept worker keeps tensor {i}");
        }
        for i in three.tensors_of(2) {
            assert_eq!(two.tensor_owner[i], 1, "a kept worker keeps tensor {i}");
        }
        // The same membership again moves nothing.
        let same = Placement::rebalanced(m.config(), 4, &two, &[Some(0), Some(1)]).expect("plan");
        assert_eq!(same, two);
    }

    #[test]
    fn a_received_plan_is_checked_before_use() {
        let m = model(4);
        let p = Placement::new(&m, 2, 2, &ExpertPlacement::RoundRobin).expect("plan");
        let ok = Placement::from_owners(&m, 2, 2, p.expert_owner.clone(), p.tensor_owner.clone()).expect("plan");
        assert_eq!(ok, p);
        let err = |experts: Vec<usize>, tensors: Vec<usize>, workers| {
            Placement::from_owners(&m, 2, workers, experts, tensors)
                .expect_err("bad plan")
                .to_string()
        };
        assert!(err(vec![0, 1, 0], p.tensor_owner.clone(), 2).contains("names 3 experts"));
        assert!(err(vec![0, 1, 0, 2], p.tensor_owner.clone(), 2).contains("worker 2 of 2"));
        let mut t = p.tensor_owner.clone();
        let dense = m.specs().iter().position(|s| !s.expert).expect("a dense tensor");
        t[dense] = usize::MAX;
        assert!(err(p.expert_owner.clone(), t, 2).contains("the owner"));
        assert!(err(p.expert_owner.clone(), p.tensor_owner.clone(), 0).contains("no worker"));
    }
}
