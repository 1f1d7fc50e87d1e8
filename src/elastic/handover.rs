//! What state moves at a membership change without a loss (a join or a leave at a step boundary).
//!
//! Every worker of the old epoch is alive and holds the committed state of its share, so only what
//! changes hands moves: the new plan keeps experts and dense tensors where they were
//! ([`Placement::rebalanced`]); each old worker keeps a copy of its share ([`Command::Hand`]) and
//! sends the coordinator the pieces a new owner lacks; each kept worker then starts the new epoch
//! from its copy plus those pieces, and a newcomer from its pieces alone. A loss cannot work this
//! way (the lost share exists only in the coordinator's older copy, and the survivors must go back
//! to that copy's step), so it still sends every worker its whole share.
//!
//! [`Command::Hand`]: super::protocol::Command::Hand

use crate::actors::ledger::LedgerSnapshot;
use crate::actors::Placement;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::gpt::{Gpt, TensorSpec};
use crate::optimizer::AdamW;
use crate::storage::tiers::ExpertSlot;
use std::collections::BTreeSet;

/// A set of pieces of the training state: dense tensors (values, with or without their AdamW
/// moments) and expert units (an expert's four tensors of one MoE block with their moments).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pieces {
    /// `(tensor index, with moments)`, in increasing index order.
    pub dense: Vec<(usize, bool)>,
    /// `(block, expert)`, in increasing order.
    pub experts: Vec<(usize, usize)>,
}

impl Pieces {
    /// What worker `w` of `plan` holds: the dense values its replica keeps (all of them, or only
    /// its own with `storage.shard_dense`), the moments of the tensors it owns, and the units of the
    /// experts it hosts in every MoE block.
    pub fn held_by(config: &TrainConfig, specs: &[TensorSpec], plan: &Placement, w: usize) -> Pieces {
        let dense = (0..specs.len())
            .filter(|&i| !specs[i].expert)
            .filter_map(|i| {
                let own = plan.tensor_owner.get(i) == Some(&w);
                (own || !config.storage.shard_dense).then_some((i, own))
            })
            .collect();
        let hosted = plan.experts_of(w);
        let experts = (0..config.model.n_layer)
            .filter(|&l| config.model.is_moe(l))
            .flat_map(|block| hosted.iter().map(move |&e| (block, e)))
            .collect();
        Pieces { dense, experts }
    }

    /// The pieces of `self` that `have` lacks (a tensor whose moments are wanted but not held is
    /// sent whole).
    pub fn minus(&self, have: &Pieces) -> Pieces {
        let held: std::collections::BTreeMap<usize, bool> = have.dense.iter().copied().collect();
        let units: BTreeSet<(usize, usize)> = have.experts.iter().copied().collect();
        Pieces {
            dense: self
                .dense
                .iter()
                .copied()
                .filter(|&(i, m)| match held.get(&i) {
                    Some(&with_moments) => m && !with_moments,
                    None => true,
                })
                .collect(),
            experts: self.experts.iter().copied().filter(|u| !units.contains(u)).collect(),
        }
    }

    /// Whether nothing is in it.
    pub fn is_empty(&self) -> bool {
        self.dense.is_empty() && self.experts.is_empty()
    }

    /// Add `other`'s pieces (a tensor wanted with moments by either is taken with them).
    fn merge(&mut self, other: &Pieces) {
        let mut dense: std::collections::BTreeMap<usize, bool> = self.dense.iter().copied().collect();
        for &(i, m) in &other.dense {
            *dense.entry(i).or_insert(m) |= m;
        }
        self.dense = dense.into_iter().collect();
        let units: BTreeSet<(usize, usize)> = self.experts.iter().chain(&other.experts).copied().collect();
        self.experts = units.into_iter().collect();
    }

    /// The number of values (parameters and moments) these pieces carry.
    pub fn values(&self, specs: &[TensorSpec]) -> Result<usize> {
        let mut n: usize = self
            .dense
            .iter()
            .map(|&(i, m)| specs.get(i).map_or(0, |s| s.shape.iter().product::<usize>()) * if m { 3 } else { 1 })
            .sum();
        for &(block, _) in &self.experts {
            let idx = ExpertSlot::tensor_indices(specs.iter().map(|t| t.name.as_str()), block)?;
            n += 3 * idx.iter().map(|&i| specs[i].unit_len()).sum::<usize>();
        }
        Ok(n)
    }
}

/// Who sends and who receives what at a membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moves {
    /// Per worker of the new epoch: the pieces it lacks.
    pub to: Vec<Pieces>,
    /// Per worker of the old epoch: the pieces it hands over (each piece from its old owner).
    pub from: Vec<Pieces>,
}

impl Moves {
    /// Expert units and dense tensors that reach a worker that did not hold them.
    pub fn counts(&self) -> (usize, usize) {
        let units = self.to.iter().map(|p| p.experts.len()).sum();
        let tensors = self.to.iter().map(|p| p.dense.len()).sum();
        (units, tensors)
    }
}

/// The moves from `old` to `new`, where `origin[w]` is the index worker `w` of `new` had in `old`.
pub fn plan_moves(
    config: &TrainConfig,
    specs: &[TensorSpec],
    old: &Placement,
    new: &Placement,
    origin: &[Option<usize>],
) -> Result<Moves> {
    if origin.len() != new.workers {
        return Err(Error::runtime(format!(
            "{} origins for {} workers",
            origin.len(),
            new.workers
        )));
    }
    let mut from = vec![Pieces::default(); old.workers];
    let mut to = Vec::with_capacity(new.workers);
    for (w, o) in origin.iter().enumerate() {
        let need = Pieces::held_by(config, specs, new, w);
        let lacks = match *o {
            Some(o) if o < old.workers => need.minus(&Pieces::held_by(config, specs, old, o)),
            Some(o) => return Err(Error::runtime(format!("worker {o} was not in the old epoch"))),
            None => need,
        };
        // Each piece comes from its old owner, which holds the values and the moments.
        for &(i, m) in &lacks.dense {
            let source = old.tensor_owner[i];
            from.get_mut(source)
                .ok_or_else(|| Error::runtime(format!("tensor {i} had no owner")))?
                .merge(&Pieces {
                    dense: vec![(i, m)],
                    experts: Vec::new(),
                });
        }
        for &(block, e) in &lacks.experts {
            from[old.expert_owner[e]].merge(&Pieces {
                dense: Vec::new(),
                experts: vec![(block, e)],
            });
        }
        to.push(lacks);
    }
    Ok(Moves { to, from })
}

/// The whole state a worker holds, from its Ledger's snapshot (the dense tensors it owns with their
/// moments, its experts) and its replica (the dense values it keeps): other parts are zero.
pub fn held_state(config: &TrainConfig, snapshot: &LedgerSnapshot, replica: &Gpt<f32>) -> Result<(Gpt<f32>, AdamW)> {
    let mut model = Gpt::<f32>::zeros(&config.model)?;
    let mut optimizer = crate::optimizer::for_model(&config.optimizer, &model)?;
    let specs = model.specs();
    let wrong = |name: &str| Error::shape("the state this worker keeps", format!("{name} has a wrong length"));
    let mut bufs = model.buffers_mut();
    for (i, (_, _, values)) in replica.tensors().into_iter().enumerate() {
        if values.is_empty() || specs[i].expert {
            continue;
        }
        bufs.get_mut(i)
            .filter(|b| b.len() == values.len())
            .ok_or_else(|| wrong(&specs[i].name))?
            .copy_from_slice(values);
    }
    for (i, p, m, v) in &snapshot.dense {
        let i = *i;
        let n = specs.get(i).map_or(0, |s| s.shape.iter().product::<usize>());
        if n == 0 || [p.len(), m.len(), v.len()] != [n; 3] {
            return Err(wrong(specs.get(i).map_or("a dense tensor", |s| s.name.as_str())));
        }
        bufs[i].copy_from_slice(p);
        optimizer.m[i].copy_from_slice(m);
        optimizer.v[i].copy_from_slice(v);
    }
    for ((block, e), slot) in &snapshot.experts {
        let idx = ExpertSlot::tensor_indices(specs.iter().map(|t| t.name.as_str()), *block)?;
        for (k, &i) in idx.iter().enumerate() {
            let n = specs[i].unit_len();
            let range = e * n..(e + 1) * n;
            for (target, source) in [
                (&mut *bufs[i], slot.params.get(k)),
                (&mut optimizer.m[i], slot.optimizer.m.get(k)),
                (&mut optimizer.v[i], slot.optimizer.v.get(k)),
            ] {
                match (target.get_mut(range.clone()), source) {
                    (Some(t), Some(s)) if s.len() == n => t.copy_from_slice(s),
                    _ => return Err(wrong(&format!("expert {block}.{e}'s {}", specs[i].name))),
                }
            }
        }
    }
    drop(bufs);
    optimizer.step = snapshot.step;
    Ok((model, optimizer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elastic::protocol::{self, Reply, WireError};
    use crate::net::wire;

    use crate::config::small_test_config as small;

    /// A trained-looking state: every value and moment distinct, at step 7.
    fn state(config: &TrainConfig) -> (Gpt<f32>, AdamW) {
        let model = Gpt::<f32>::init(&config.model, 3).expect("model");
        let mut optimizer = crate::optimizer::for_model(&config.optimizer, &model).expect("optimizer");
        for (i, (m, v)) in optimizer.m.iter_mut().zip(optimizer.v.iter_mut()).enumerate() {
            for (j, (a, b)) in m.iter_mut().zip(v.iter_mut()).enumerate() {
                *a = (i * 1000 + j) as f32 * 1e-3;
                *b = (i * 1000 + j) as f32 * 2e-3;
            }
        }
        optimizer.step = 7;
        (model, optimizer)
    }

    #[test]
    fn a_join_sends_the_newcomer_its_share_and_the_kept_workers_nothing() {
        let config = small();
        let (model, _) = state(&config);
        let specs = model.specs();
        let two = Placement::new(&model, 4, 2, &crate::config::ExpertPlacement::RoundRobin).expect("plan");
        let origin = [Some(0), Some(1), None];
        let three = Placement::rebalanced(model.config(), 4, &two, &origin).expect("plan");
        let moves = plan_moves(&config, &specs, &two, &three, &origin).expect("moves");
        assert!(moves.to[0].is_empty() && moves.to[1].is_empty(), "{moves:?}");
        assert_eq!(moves.to[2], Pieces::held_by(&config, &specs, &three, 2));
        // 4 experts over 3 workers: the newcomer hosts one, in both MoE blocks.
        assert_eq!(moves.to[2].experts.len(), 2);
        let dense = specs.iter().filter(|s| !s.expert).count();
        assert_eq!(moves.counts(), (2, dense));
        // Each piece is asked of its old owner, once.
        let asked: usize = moves.from.iter().map(|p| p.dense.len()).sum();
        assert_eq!(asked, dense);
        for (o, p) in moves.from.iter().enumerate() {
            assert!(p.dense.iter().all(|&(i, _)| two.tensor_owner[i] == o));
            assert!(p.experts.iter().all(|&(_, e)| two.expert_owner[e] == o));
        }
        // The same membership moves nothing.
        let same = Placement::rebalanced(model.config(), 4, &three, &[Some(0), Some(1), Some(2)]).expect("plan");
        let none = plan_moves(&config, &specs, &three, &same, &[Some(0), Some(1), Some(2)]).expect("moves");
        assert_eq!(none.counts(), (0, 0));
    }

    #[test]
    fn handed_over_pieces_arrive_bit_for_bit_and_nothing_else() {
        let config = small();
        let (model, optimizer) = state(&config);
        let specs = model.specs();
        let plan = Placement::new(&model, 4, 2, &crate::config::ExpertPlacement::RoundRobin).expect("plan");
        let pieces = Pieces::held_by(&config, &specs, &plan, 1);
        let bytes = protocol::encode_hand(&config, &model, &optimizer, &pieces).expect("encode");
        let mut got = Gpt::<f32>::zeros(&config.model).expect("model");
        let mut opt = crate::optimizer::for_model(&config.optimizer, &got).expect("optimizer");
        let header = protocol::decode_hand_into(&config, "worker 1", &bytes, &mut got, &mut opt).expect("decode");
        assert_eq!(header.step, 7);
        assert_eq!(opt.step, 7);
        assert_eq!(pieces.values(&specs).expect("values"), {
            let n: usize = header
                .dense
                .iter()
                .map(|&(i, m)| specs[i as usize].shape.iter().product::<usize>() * if m { 3 } else { 1 })
                .sum();
            n + header.experts.len()
                * 3
                * (specs
                    .iter()
                    .filter(|s| s.expert)
                    .map(TensorSpec::unit_len)
                    .sum::<usize>()
                    / 2)
        });
        let (want, have) = (model.tensors(), got.tensors());
        assert_eq!(want.len(), have.len());
        assert_eq!(
            (want.len(), opt.m.len(), opt.v.len()),
            (specs.len(), specs.len(), specs.len())
        );
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        for (i, spec) in specs.iter().enumerate() {
            assert_eq!(
                (want[i].0.as_str(), have[i].0.as_str()),
                (spec.name.as_str(), spec.name.as_str())
            );
            if spec.expert {
                let n = spec.unit_len();
                for e in 0..config.model.experts {
                    let r = e * n..(e + 1) * n;
                    let hosted = plan.expert_owner[e] == 1;
                    let equal = bits(&want[i].2[r.clone()]) == bits(&have[i].2[r.clone()])
                        && bits(&optimizer.m[i][r.clone()]) == bits(&opt.m[i][r.clone()])
                        && bits(&optimizer.v[i][r.clone()]) == bits(&opt.v[i][r.clone()]);
                    let zero = have[i].2[r].iter().all(|x| *x == 0.0);
                    assert!(if hosted { equal } else { zero }, "{} expert {e}", spec.name);
                }
            } else {
                assert_eq!(bits(want[i].2), bits(have[i].2), "{}: every dense value", spec.name);
                let own = plan.tensor_owner[i] == 1;
                let moments = bits(&optimizer.m[i]) == bits(&opt.m[i]) && bits(&optimizer.v[i]) == bits(&opt.v[i]);
                assert_eq!(moments, own, "{}: moments only when owned", spec.name);
            }
        }
        // Pieces of another step do not mix with these.
        let mut other = optimizer.clone();
        other.step = 8;
        let later = protocol::encode_hand(&config, &model, &other, &pieces).expect("encode");
        let e = protocol::decode_hand_into(&config, "worker 1", &later, &mut got, &mut opt).expect_err("mixed steps");
        assert!(e.to_string().contains("step 8"), "{e}");
        // A failure is the worker's error; another reply is a protocol error naming the worker.
        let failed =
            wire::encode_frame::<Reply>(&Reply::Failed(WireError::Other("disk gone".into())), &[]).expect("frame");
        let e = protocol::decode_hand_into(&config, "worker 1", &failed, &mut got, &mut opt).expect_err("failed");
        assert!(e.to_string().contains("disk gone"), "{e}");
        let done = wire::encode_frame::<Reply>(&Reply::Done, &[]).expect("frame");
        let e = protocol::decode_hand_into(&config, "worker 1", &done, &mut got, &mut opt).expect_err("done");
        assert!(e.to_string().contains("worker 1"), "{e}");
        // A piece that is not of the model is refused before anything is sent.
        let bad = Pieces {
            dense: Vec::new(),
            experts: vec![(0, 9)],
        };
        assert!(protocol::encode_hand(&config, &model, &optimizer, &bad).is_err());
    }
}
