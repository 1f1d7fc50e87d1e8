//! One step of a worker: its data groups' passes, in lanes that go through the MoE blocks in
//! lockstep (each block one fused exchange per peer), and the dense gradients sent to their owners.

use super::{comm, WorkerArgs, WorkerState};
use crate::actors::collectives::ExpertCall;
use crate::actors::communicator::CommMsg;
use crate::actors::gate::GateMsg;
use crate::actors::gather::{gate_view, DenseParams, GatherArgs, Gatherer};
use crate::actors::{ask, offload, ActorName};
use crate::data::sampler;
use crate::error::{Error, Result};
use crate::kernels::Backend;
use crate::model::gpt::{Ffn, Gpt, GroupOutput};
use crate::model::pass::{GroupPass, MoeResult, Need};
use crate::net::Payload;
use crate::net::StepId;
use ractor::ActorRef;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError};

type Pass = GroupPass<f32, DenseParams, Box<Gpt<f32>>>;

/// Cancels a step's background gathers when dropped: when the step ends, also by an error.
struct CancelGathers(Option<Arc<Gatherer>>);

impl Drop for CancelGathers {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.cancel();
        }
    }
}

/// Where a lane's passes read dense parameters from.
#[derive(Clone)]
enum DenseSource {
    /// The worker's replica of every dense tensor.
    Replica(Arc<Gpt<f32>>),
    /// The step's gatherer (sharded dense parameters): one leg at a time.
    Sharded(Arc<Gatherer>),
}

/// A pass, the input gradient it waits for, and where it stopped.
type PassWork = (Pass, Option<Vec<f32>>, Option<Need<f32>>);

/// `(group, (dL/dx, gate-weight gradient))`.
type GroupGrads = Vec<(usize, (Vec<f32>, Vec<f32>))>;

/// What a lane's passes resume with after an exchange: nothing (the first round), the experts'
/// outputs of a forward MoE block, or the gradients of a backward one (`storage::tiers` has its own,
/// unrelated `Pending`: a unit's deferred gradient).
enum ExchangeResult {
    None,
    Forward(Vec<MoeResult<f32>>),
    Backward(usize, Vec<(Vec<f32>, Vec<f32>)>),
}

pub(super) async fn run_step(state: &mut WorkerState, step: StepId) -> Result<Vec<(usize, GroupOutput)>> {
    let a = state.args.clone();
    let replica: Arc<Gpt<f32>> = a.replica.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let groups = a.placement.groups_of(a.worker);
    let c = &a.config;
    let t = c.model.block_size;
    let (seqs, ce_scale) = (c.group_seqs(), c.ce_scale());
    let seed = c.train.seed;

    // The groups run in lanes, each lane in lockstep through the MoE blocks: while one lane waits
    // for its experts, the other computes its dense layers.
    // Over collectives every worker runs the same lanes, and takes part in every lane's
    // exchanges also where it has no groups.
    let lanes = match &a.collectives {
        Some(collectives) => collectives.lanes(),
        None => a.lanes.min(groups.len()).max(1),
    };
    // A worker without groups runs no pass and reads no dense parameter: it gathers nothing.
    let (source, first, _cancel_gathers) = if c.storage.shard_dense && !groups.is_empty() {
        let gatherer = Gatherer::new(GatherArgs {
            step,
            worker: a.worker,
            deadline: a.deadline,
            comm: comm(state)?,
            replica: a.replica.clone(),
            placement: a.placement.clone(),
            // The lanes that read parameters: those with groups.
            lanes: lanes.min(groups.len()).max(1),
            counters: a.dense.clone(),
        });
        let cancel = CancelGathers(Some(gatherer.clone()));
        let first = gatherer.fetch(0).await?;
        (DenseSource::Sharded(gatherer), first, cancel)
    } else {
        let replicated = DenseParams::Replica(replica.clone());
        (DenseSource::Replica(replica.clone()), replicated, CancelGathers(None))
    };

    let (text, gs) = (a.text.clone(), groups.clone());
    let passes: Vec<Pass> = offload(&a.cpu, move |_| {
        gs.iter()
            .map(|&g| {
                let (idx, targets) = sampler::group_batch(&text, seed, step.step, g, seqs, t);
                let grads = Box::new(Gpt::dense_zeros(first.config())?);
                GroupPass::new(first.clone(), idx, Some(targets), seqs, ce_scale, Some(grads))
            })
            .collect()
    })
    .await?;

    let mut lane_groups: Vec<Vec<usize>> = vec![Vec::new(); lanes];
    let mut lane_passes: Vec<Vec<Pass>> = (0..lanes).map(|_| Vec::new()).collect();
    for (i, (g, p)) in groups.iter().zip(passes).enumerate() {
        lane_groups[i % lanes].push(*g);
        lane_passes[i % lanes].push(p);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (lane, (gs, ps)) in lane_groups.into_iter().zip(lane_passes).enumerate() {
        if gs.is_empty() {
            if a.collectives.is_some() {
                let (a, comm) = (a.clone(), comm(state)?);
                tasks.spawn(async move { (lane, gs, idle_lane(a, comm, step, lane).await) });
            }
            continue;
        }
        let (a, gates, source) = (a.clone(), state.gates.clone(), source.clone());
        tasks.spawn(async move { (lane, gs.clone(), run_lane(a, gates, step, source, lane, gs, ps).await) });
    }
    drop(source);
    let mut done: Vec<(usize, Pass)> = Vec::with_capacity(groups.len());
    let mut first_err = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, gs, Ok(ps))) => done.extend(gs.into_iter().zip(ps)),
            Ok((lane, _, Err(e))) => {
                if let Some(collectives) = &a.collectives {
                    // At once: this lane's peers on other workers wait in its next exchange.
                    let reason = format!("lane {lane} of worker {} failed step {step}: {e}", a.worker);
                    collectives.abort(step, &reason, e.is_restartable());
                }
                if first_err
                    .as_ref()
                    .is_none_or(|p: &Error| p.is_restartable() && !e.is_restartable())
                {
                    first_err = Some(e);
                }
            }
            Err(e) => {
                let e = Error::runtime(format!("a lane of worker {} panicked: {e}", a.worker));
                if let Some(collectives) = &a.collectives {
                    collectives.abort(step, &e.to_string(), false);
                }
                first_err = Some(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    done.sort_by_key(|(g, _)| *g);
    let passes: Vec<Pass> = done.into_iter().map(|(_, p)| p).collect();

    // Every pass is done: collect outputs, send each group's dense gradients to their owners.
    let mut outputs = Vec::with_capacity(passes.len());
    let mut requests = Vec::new();
    for (&g, pass) in groups.iter().zip(passes) {
        let (out, grads) = pass.finish()?;
        outputs.push((g, out));
        let mut grads = grads.ok_or_else(|| Error::runtime("a training pass without gradients"))?;
        let mut bufs = grads.buffers_mut();
        for w in 0..a.placement.workers {
            let tensors: Vec<(usize, Vec<f32>)> = a
                .placement
                .tensors_of(w)
                .into_iter()
                .map(|i| (i, std::mem::take(&mut *bufs[i])))
                .collect();
            if !tensors.is_empty() {
                requests.push((
                    w,
                    Payload::DenseGrads {
                        step,
                        group: g,
                        tensors,
                    },
                ));
            }
        }
    }
    let what = format!("the gradient reduction of step {step}");
    exchange(state, step, what, "dense_grads", requests).await?;
    Ok(outputs)
}

/// One exchange through this worker's Communicator (which applies the collective deadline).
pub(super) async fn exchange(
    state: &WorkerState,
    step: StepId,
    what: String,
    kind: &'static str,
    requests: Vec<(usize, Payload)>,
) -> Result<Vec<(usize, Payload)>> {
    let comm = comm(state)?;
    let who = ActorName(format!("communicator of worker {}", state.args.worker));
    ask(&comm, &who, &what, state.args.deadline * 2, |reply| CommMsg::Exchange {
        step,
        what: what.clone(),
        kind,
        requests,
        reply,
    })
    .await
}

/// Drive the passes of one lane through every MoE block to the end.
async fn run_lane(
    a: WorkerArgs,
    gates: BTreeMap<usize, ActorRef<GateMsg>>,
    step: StepId,
    source: DenseSource,
    lane: usize,
    groups: Vec<usize>,
    mut passes: Vec<Pass>,
) -> Result<Vec<Pass>> {
    let mut pending = ExchangeResult::None;
    for leg in 0.. {
        // Sharded: this leg's parameters (gathered while the previous leg computed, the next
        // leg's gather starts now).
        let params = match &source {
            DenseSource::Replica(_) => None,
            DenseSource::Sharded(gatherer) => Some(gatherer.take(leg).await?),
        };
        let leg_params = params.clone();
        let (ps, needs) = offload(&a.cpu, move |cpu| {
            if let Some(params) = leg_params {
                for p in passes.iter_mut() {
                    p.set_model(params.clone())?;
                }
            }
            let mut work: Vec<PassWork> = Vec::with_capacity(passes.len());
            match pending {
                ExchangeResult::None => work.extend(passes.into_iter().map(|p| (p, None, None))),
                ExchangeResult::Forward(results) => {
                    for (mut p, r) in passes.into_iter().zip(results) {
                        p.moe_forward_done(r)?;
                        work.push((p, None, None));
                    }
                }
                ExchangeResult::Backward(block, grads) => {
                    for (mut p, (dx, gwg)) in passes.into_iter().zip(grads) {
                        if let Some(Ffn::Moe(g)) =
                            p.grads_mut().and_then(|g| g.blocks.get_mut(block)).map(|b| &mut b.ffn)
                        {
                            g.params.wg = gwg;
                        }
                        work.push((p, Some(dx), None));
                    }
                }
            }
            cpu.par_for_each(work.iter_mut().collect(), |b, (pass, dx, need)| {
                if let Some(dx) = dx.take() {
                    pass.moe_backward_done(b, dx)?;
                }
                *need = Some(pass.advance(b)?);
                Ok(())
            })?;
            let mut passes = Vec::with_capacity(work.len());
            let mut needs = Vec::with_capacity(work.len());
            for (p, _, n) in work {
                passes.push(p);
                needs.push(n.ok_or_else(|| Error::runtime("a pass did not advance"))?);
            }
            Ok((passes, needs))
        })
        .await?;
        passes = ps;
        let block = match needs.first() {
            Some(Need::MoeForward { block, .. }) | Some(Need::MoeBackward { block, .. }) => *block,
            _ => break,
        };
        let gate = gates
            .get(&block)
            .cloned()
            .ok_or_else(|| Error::runtime(format!("worker {} has no gate for block {block}", a.worker)))?;
        let who = ActorName(format!("gate {block} on worker {}", a.worker));
        let forward = matches!(needs[0], Need::MoeForward { .. });
        let mut inputs = Vec::with_capacity(needs.len());
        for (&g, need) in groups.iter().zip(needs) {
            match need {
                Need::MoeForward { block: b, x } if forward && b == block => inputs.push((g, x)),
                Need::MoeBackward { block: b, dy } if !forward && b == block => inputs.push((g, dy)),
                _ => return Err(Error::runtime("the groups of a worker fell out of lockstep")),
            }
        }
        // The Gate's exchange, and its compute around it.
        let deadline = a.exchange_deadline() + a.deadline;
        if forward {
            let what = format!("the block-{block} forward of step {step}");
            let rep = match (&source, &params) {
                (DenseSource::Replica(replica), _) => replica.clone(),
                (DenseSource::Sharded(gatherer), Some(params)) => gate_view(gatherer.shell(), params, block)?,
                (DenseSource::Sharded(_), None) => return Err(Error::runtime("a sharded leg without parameters")),
            };
            let results = ask(&gate, &who, &what, deadline, |reply| GateMsg::Forward {
                step,
                lane,
                replica: rep,
                groups: inputs,
                reply,
            })
            .await?;
            pending = ExchangeResult::Forward(in_group_order(&groups, results)?);
        } else {
            let what = format!("the block-{block} backward of step {step}");
            let results = ask(&gate, &who, &what, deadline, |reply| GateMsg::Backward {
                step,
                lane,
                groups: inputs,
                reply,
            })
            .await?;
            let results: GroupGrads = results.into_iter().map(|(g, dx, gwg)| (g, (dx, gwg))).collect();
            pending = ExchangeResult::Backward(block, in_group_order(&groups, results)?);
        }
    }

    Ok(passes)
}

/// A lane without groups on this worker, when expert rows travel over collectives: it takes part
/// in the lane's exchanges all the same (every rank issues every collective), with nothing to send,
/// serving its experts: every MoE block forward in order, then backward in reverse.
async fn idle_lane(a: WorkerArgs, comm: ActorRef<CommMsg>, step: StepId, lane: usize) -> Result<Vec<Pass>> {
    let model = &a.config.model;
    let blocks: Vec<usize> = (0..model.n_layer).filter(|&l| model.is_moe(l)).collect();
    let order = blocks
        .iter()
        .map(|&b| (b, true))
        .chain(blocks.iter().rev().map(|&b| (b, false)));
    let who = ActorName(format!("communicator of worker {}", a.worker));
    for (block, forward) in order {
        let what = format!(
            "the block-{block} expert {} of step {step} (lane {lane}, no groups here)",
            if forward { "forward" } else { "backward" }
        );
        let call = ExpertCall {
            lane,
            step,
            block,
            forward,
            what: what.clone(),
        };
        let kind = if forward { "dispatch" } else { "grad_dispatch" };
        let answers = ask(&comm, &who, &what, a.exchange_deadline(), |reply| {
            CommMsg::ExpertExchange {
                call: Box::new(call),
                kind,
                requests: Vec::new(),
                reply,
            }
        })
        .await?;
        if !answers.is_empty() {
            return Err(Error::runtime(format!("{what}: answers to requests it did not send")));
        }
    }
    Ok(Vec::new())
}

pub(super) fn in_group_order<R>(groups: &[usize], results: Vec<(usize, R)>) -> Result<Vec<R>> {
    let mut by_group: HashMap<usize, R> = results.into_iter().collect();
    groups
        .iter()
        .map(|g| {
            by_group
                .remove(g)
                .ok_or_else(|| Error::runtime(format!("the gate gave no result for group {g}")))
        })
        .collect()
}
