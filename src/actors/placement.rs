//! Placement plans: which worker hosts each expert, runs each data group, and owns each dense tensor.
//!
//! The plan decides only *where* work runs. What is computed (every matmul's shape, every sum's
//! order) is fixed by the model and the groups, so any plan gives the same parameters, bit for bit.

use crate::error::{Error, Result};
use crate::model::gpt::Gpt;

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

impl Placement {
    /// The plan for `model` with `groups` data groups on `workers` workers.
    pub fn new(model: &Gpt<f32>, groups: usize, workers: usize, experts: &ExpertPlacement) -> Result<Self> {
        let e_count = model.config().experts;
        if workers == 0 {
            return Err(Error::config("the runtime needs at least one worker"));
        }
        let expert_owner = match experts {
            ExpertPlacement::RoundRobin => (0..e_count).map(|e| e % workers).collect(),
            ExpertPlacement::Blocked => (0..e_count).map(|e| e * workers / e_count.max(1)).collect(),
            ExpertPlacement::Explicit(owners) => {
                if model.config().has_moe() && owners.len() != e_count {
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
        };
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
}
