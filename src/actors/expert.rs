//! The Expert actor: one expert of one MoE block, hosted by the worker the placement plan names.
//!
//! It runs its expert's forward and backward over the rows that gates send it, one group at a time
//! (the canonical shapes), keeps one gradient per group during the step, sums them in group order at
//! `Prepare`, and applies AdamW to its own parameters at `Commit`. Its committed parameters and
//! optimizer state are an [`ExpertSlot`] in the worker's [`ExpertStore`] (Device, Host or Disk tier),
//! borrowed for each use and given back, so a restarted Expert starts from exactly the last
//! committed state. The gradient is step state: it stays here until the commit and is dropped by
//! an abort, so the store only ever holds committed values.

use super::{inject, offload, ActorName};
use crate::chaos::{FaultPlan, Moment, Target};
use crate::error::{Error, Result};
use crate::kernels::{Backend, Cpu};
use crate::model::moe::stages;
use crate::model::moe::MoeConfig;
use crate::net::StepId;
use crate::optimizer::sum_squares;
use crate::storage::tiers::{ExpertStore, Pending};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::sync::Arc;

pub use crate::storage::tiers::ExpertSlot;

/// Rows of one group, in or out.
pub type GroupRows = Vec<(usize, Vec<f32>)>;

/// Messages of the Expert actor.
pub enum ExpertMsg {
    /// Forward over each group's rows; answers the outputs in the same order.
    Forward {
        /// Training step.
        step: StepId,
        /// `(group, rows)`.
        items: GroupRows,
        /// `(group, outputs)`.
        reply: RpcReplyPort<Result<GroupRows>>,
    },
    /// Backward given each group's output gradients; answers the input gradients.
    Backward {
        /// Training step.
        step: StepId,
        /// `(group, output gradients)`.
        items: GroupRows,
        /// `(group, input gradients)`.
        reply: RpcReplyPort<Result<GroupRows>>,
    },
    /// Sum the group gradients in group order; answer the sums of squares of `[w1, b1, w2, b2]`.
    Prepare {
        /// Training step.
        step: StepId,
        /// Sums of squares.
        reply: RpcReplyPort<Result<[f64; 4]>>,
    },
    /// Apply AdamW with the step's learning rate and global gradient norm.
    Commit {
        /// Training step.
        step: StepId,
        /// Learning rate.
        lr: f64,
        /// Global gradient norm.
        norm: f64,
        /// Done.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Drop everything of the current step (answered: see `LedgerMsg::Abort`).
    Abort {
        /// Done.
        reply: RpcReplyPort<Result<()>>,
    },
}

/// What an Expert actor is started with (also what its supervisor restarts it with).
#[derive(Clone)]
pub struct ExpertArgs {
    /// MoE block.
    pub block: usize,
    /// Expert index in the block.
    pub expert: usize,
    /// Hosting worker.
    pub worker: usize,
    /// Groups per batch.
    pub groups: usize,
    /// The layer's configuration.
    pub config: MoeConfig,
    /// The worker's expert store, where this expert's committed state lives between uses.
    pub store: Arc<ExpertStore>,
    /// Compute pool.
    pub cpu: Cpu,
    /// Faults to inject.
    pub chaos: FaultPlan,
}

impl ExpertArgs {
    /// The unit id in the store.
    pub fn id(&self) -> (usize, usize) {
        (self.block, self.expert)
    }

    /// The actor's name in logs and errors.
    pub fn name(&self) -> ActorName {
        ActorName(format!(
            "expert {}.{} on worker {}",
            self.block, self.expert, self.worker
        ))
    }
}

struct FwdCache {
    xe: Vec<f32>,
    h: Vec<f32>,
    a: Vec<f32>,
}

/// The Expert actor's state.
pub struct ExpertState {
    args: ExpertArgs,
    step: StepId,
    cache: HashMap<usize, FwdCache>,
    grads: HashMap<usize, [Vec<f32>; 4]>,
    totals: Option<[Vec<f32>; 4]>,
    /// The step (and attempt) of the first message this actor handled. A backward of that same
    /// step that finds no forward state belongs to forwards the failed actor it replaces served
    /// (another lane's forward may have reached this one first): the step is replayed. In any
    /// later step a missing forward is a defect, and an error.
    born: Option<StepId>,
}

impl ExpertState {
    /// Adopt `step` if it is newer than the current one (dropping the older step's state); whether
    /// the message is current (false: a leftover of an attempt that was rolled back).
    fn enter(&mut self, step: StepId) -> bool {
        if step < self.step {
            return false;
        }
        if step != self.step {
            self.clear();
            self.step = step;
        }
        true
    }

    fn clear(&mut self) {
        self.cache.clear();
        self.grads.clear();
        self.totals = None;
    }
}

/// The Expert actor.
pub struct ExpertActor;

impl Actor for ExpertActor {
    type Msg = ExpertMsg;
    type State = ExpertState;
    type Arguments = ExpertArgs;

    async fn pre_start(&self, _: ActorRef<ExpertMsg>, args: ExpertArgs) -> Result<ExpertState, ActorProcessingErr> {
        Ok(ExpertState {
            args,
            step: StepId::NONE,
            cache: HashMap::new(),
            grads: HashMap::new(),
            totals: None,
            born: None,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<ExpertMsg>,
        msg: ExpertMsg,
        state: &mut ExpertState,
    ) -> Result<(), ActorProcessingErr> {
        let target = Target::Expert {
            block: state.args.block,
            expert: state.args.expert,
        };
        let name = state.args.name();
        match msg {
            ExpertMsg::Forward { step, items, reply } => {
                inject(&state.args.chaos, &target, step, Moment::Forward, &name)?;
                state.born.get_or_insert(step);
                if !state.enter(step) {
                    let _ = reply.send(Err(stale(&name, step)));
                    return Ok(());
                }
                let r = forward(&state.args, items).await.map(|outs| {
                    let mut answer = Vec::with_capacity(outs.len());
                    for (group, cache, ye) in outs {
                        state.cache.insert(group, cache);
                        answer.push((group, ye));
                    }
                    answer
                });
                let _ = reply.send(r);
            }
            ExpertMsg::Backward { step, items, reply } => {
                inject(&state.args.chaos, &target, step, Moment::Backward, &name)?;
                state.born.get_or_insert(step);
                if !state.enter(step) {
                    let _ = reply.send(Err(stale(&name, step)));
                    return Ok(());
                }
                let mut work = Vec::with_capacity(items.len());
                for (group, gye) in items {
                    match state.cache.remove(&group) {
                        Some(cache) => work.push((group, cache, gye)),
                        // Another lane's backward reached the restarted expert: the step is replayed.
                        None if state.born == Some(step) => {
                            let _ = reply.send(Err(Error::ActorFailed {
                                actor: name.to_string(),
                                detail: format!(
                                    "restarted during step {step}: the forward state of group {group} was lost with \
                                     the failed actor"
                                ),
                            }));
                            return Ok(());
                        }
                        None => {
                            let _ = reply.send(Err(Error::runtime(format!(
                                "{name}: backward of group {group} in step {step} without its forward"
                            ))));
                            return Ok(());
                        }
                    }
                }
                let r = backward(&state.args, work).await.map(|outs| {
                    let mut answer = Vec::with_capacity(outs.len());
                    for (group, grads, gxe) in outs {
                        state.grads.insert(group, grads);
                        answer.push((group, gxe));
                    }
                    answer
                });
                let _ = reply.send(r);
            }
            ExpertMsg::Prepare { step, reply } => {
                if !state.enter(step) {
                    let _ = reply.send(Err(stale(&name, step)));
                    return Ok(());
                }
                let (args, grads) = (state.args.clone(), std::mem::take(&mut state.grads));
                let r = offload(&state.args.cpu, move |_| {
                    let totals = total_in_group_order(&args, grads);
                    let sums = [0, 1, 2, 3].map(|k| sum_squares(&totals[k]));
                    Ok((totals, sums))
                })
                .await
                .map(|(totals, sums)| {
                    state.totals = Some(totals);
                    sums
                });
                let _ = reply.send(r);
            }
            ExpertMsg::Commit { step, lr, norm, reply } => {
                let r = match (state.step == step, state.totals.take()) {
                    (true, Some(grads)) => {
                        let update = Pending { grads, lr, norm };
                        match state.args.store.commit(state.args.id(), update).await {
                            // In memory: apply it here, on the compute threads.
                            Ok(Some((mut lease, update))) => {
                                offload(&state.args.cpu, move |_| lease.slot_mut()?.apply(update)).await
                            }
                            // On disk: the store applies it when the unit is next loaded.
                            Ok(None) => Ok(()),
                            Err(e) => Err(e),
                        }
                    }
                    _ => Err(Error::runtime(format!(
                        "{name}: commit of step {step}, which it has not prepared"
                    ))),
                };
                state.clear();
                let _ = reply.send(r);
            }
            ExpertMsg::Abort { reply } => {
                state.clear();
                let _ = reply.send(Ok(()));
            }
        }
        Ok(())
    }
}

/// The expert's forward over every group's rows, groups side by side.
async fn forward(args: &ExpertArgs, items: GroupRows) -> Result<Vec<(usize, FwdCache, Vec<f32>)>> {
    let c = args.config.clone();
    let lease = args.store.acquire(args.id()).await?;
    offload(&args.cpu, move |cpu| {
        let w = lease.weights();
        let out = cpu.par_map(items, |b, (group, xe)| {
            let (h, a, ye) = stages::expert_forward_new(&c, b, w, &xe)?;
            Ok((group, FwdCache { xe, h, a }, ye))
        });
        drop(lease);
        out
    })
    .await
}

/// The expert's backward for every group, groups side by side, each into its own gradient buffers.
#[allow(clippy::type_complexity)]
async fn backward(
    args: &ExpertArgs,
    work: Vec<(usize, FwdCache, Vec<f32>)>,
) -> Result<Vec<(usize, [Vec<f32>; 4], Vec<f32>)>> {
    let c = args.config.clone();
    let lease = args.store.acquire(args.id()).await?;
    offload(&args.cpu, move |cpu| {
        let w = lease.weights();
        let out = cpu.par_map(work, |b, (group, mut cache, gye)| {
            let (grads, gxe) = stages::expert_backward_new(&c, b, w, &cache.xe, &cache.h, &mut cache.a, &gye)?;
            Ok((group, grads, gxe))
        });
        drop(lease);
        out
    })
    .await
}

/// The step's gradient: group 0's, then every later group's added in group order. A group that sent
/// no rows contributes zeros, added all the same, so that the bits equal a single-process run's.
fn total_in_group_order(args: &ExpertArgs, mut grads: HashMap<usize, [Vec<f32>; 4]>) -> [Vec<f32>; 4] {
    let (d, f) = (args.config.d_model, args.config.d_ff);
    let zeros = || [vec![0.0; d * f], vec![0.0; f], vec![0.0; f * d], vec![0.0; d]];
    let mut total = grads.remove(&0).unwrap_or_else(zeros);
    for g in 1..args.groups {
        match grads.remove(&g) {
            Some(add) => {
                for (t, a) in total.iter_mut().zip(&add) {
                    t.iter_mut().zip(a).for_each(|(t, &a)| *t += a);
                }
            }
            None => total.iter_mut().for_each(|t| t.iter_mut().for_each(|t| *t += 0.0)),
        }
    }
    total
}

/// The answer to a message of an attempt that was rolled back.
fn stale(name: &ActorName, step: StepId) -> Error {
    Error::runtime(format!("{name}: a message of step {step}, which was rolled back"))
}
