//! The Ledger actor: a worker's committed parameters.
//!
//! It holds the dense tensors the worker owns (with their AdamW moments) and the slots of the
//! experts it hosts. During a step it collects every group's gradient of its dense tensors (from
//! every worker), sums them in group order at `Prepare`, and applies AdamW at `Commit`, answering
//! the new values for the broadcast. Everything committed lives in a shared store, so a restarted
//! Ledger (or Expert) starts from the last commit; only the step in flight is lost, and replayed.
//! The hosted experts' units live in the worker's [`ExpertStore`] (Device, Host and Disk tiers);
//! the Ledger tells it when a step commits (its hit counters decay on a step schedule) and reads it
//! back for snapshots.

use super::expert::ExpertSlot;
use super::{inject, offload, ActorName};
use crate::chaos::{FaultPlan, Moment, Target};
use crate::error::{Error, Result};
use crate::kernels::Cpu;
use crate::net::StepId;
use crate::optimizer::{sum_squares, AdamW};
use crate::storage::tiers::ExpertStore;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A worker's committed state.
#[derive(Debug)]
pub struct LedgerState {
    /// Owned dense tensors: `(tensor index, values)`, in increasing index order.
    pub dense: Vec<(usize, Vec<f32>)>,
    /// AdamW over `dense`, in the same order.
    pub optimizer: AdamW,
    /// The hosted experts' units, across the Device, Host and Disk tiers.
    pub experts: Arc<ExpertStore>,
}

/// The store, shared between the Ledger actor and its supervisor.
pub type SharedStore = Arc<Mutex<LedgerState>>;

fn lock_store(store: &SharedStore) -> std::sync::MutexGuard<'_, LedgerState> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `(tensor index, values, first moment, second moment)`.
pub type DenseEntry = (usize, Vec<f32>, Vec<f32>, Vec<f32>);

/// `(tensor index, committed values)`, shared with every replica.
pub type Updated = Vec<(usize, Arc<Vec<f32>>)>;

/// A copy of a worker's committed state (for checkpoints and gathering the model).
#[derive(Clone, Debug)]
pub struct LedgerSnapshot {
    /// Optimizer steps taken.
    pub step: u64,
    /// `(tensor index, values, first moment, second moment)` of the owned dense tensors.
    pub dense: Vec<DenseEntry>,
    /// The hosted experts' slots.
    pub experts: Vec<((usize, usize), ExpertSlot)>,
}

/// Messages of the Ledger actor.
pub enum LedgerMsg {
    /// One group's gradients of owned dense tensors.
    Grads {
        /// Training step.
        step: StepId,
        /// The group.
        group: usize,
        /// `(tensor index, gradient)`.
        tensors: Vec<(usize, Vec<f32>)>,
        /// Stored.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Sum every owned tensor's group gradients in group order; answer `(tensor, sum of squares)`.
    Prepare {
        /// Training step.
        step: StepId,
        /// Sums of squares.
        reply: RpcReplyPort<Result<Vec<(usize, f64)>>>,
    },
    /// Apply AdamW; answer the new values of the owned tensors.
    Commit {
        /// Training step.
        step: StepId,
        /// Learning rate.
        lr: f64,
        /// Global gradient norm.
        norm: f64,
        /// New values.
        reply: RpcReplyPort<Result<Updated>>,
    },
    /// Drop everything of the current step; answered, so that the worker knows the ledger is
    /// alive (a failed one is restarted before the replay).
    Abort {
        /// Done.
        reply: RpcReplyPort<Result<()>>,
    },
    /// A copy of the committed state.
    Snapshot {
        /// The copy.
        reply: RpcReplyPort<Result<LedgerSnapshot>>,
    },
}

/// What a Ledger actor is started with.
#[derive(Clone)]
pub struct LedgerArgs {
    /// The worker.
    pub worker: usize,
    /// Groups per batch.
    pub groups: usize,
    /// Committed state.
    pub store: SharedStore,
    /// Compute pool.
    pub cpu: Cpu,
    /// Faults to inject.
    pub chaos: FaultPlan,
}

impl LedgerArgs {
    /// The actor's name.
    pub fn name(&self) -> ActorName {
        ActorName(format!("ledger of worker {}", self.worker))
    }
}

/// The Ledger actor's state.
pub struct TierState {
    args: LedgerArgs,
    step: StepId,
    /// Per owned tensor, per group: the gradient received.
    incoming: HashMap<usize, Vec<Option<Vec<f32>>>>,
    totals: Option<Vec<Vec<f32>>>,
}

impl TierState {
    /// Adopt `step` if it is newer than the current one (dropping the older step's state); whether
    /// the message is current (false: a leftover of an attempt that was rolled back).
    fn enter(&mut self, step: StepId) -> bool {
        if step < self.step {
            return false;
        }
        if step != self.step {
            self.incoming.clear();
            self.totals = None;
            self.step = step;
        }
        true
    }
}

/// The Ledger actor.
pub struct LedgerActor;

impl Actor for LedgerActor {
    type Msg = LedgerMsg;
    type State = TierState;
    type Arguments = LedgerArgs;

    async fn pre_start(&self, _: ActorRef<LedgerMsg>, args: LedgerArgs) -> Result<TierState, ActorProcessingErr> {
        Ok(TierState {
            args,
            step: StepId::NONE,
            incoming: HashMap::new(),
            totals: None,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<LedgerMsg>,
        msg: LedgerMsg,
        state: &mut TierState,
    ) -> Result<(), ActorProcessingErr> {
        let name = state.args.name();
        match msg {
            LedgerMsg::Grads {
                step,
                group,
                tensors,
                reply,
            } => {
                let target = Target::Ledger {
                    worker: state.args.worker,
                };
                inject(&state.args.chaos, &target, step, Moment::Any, &name)?;
                if !state.enter(step) {
                    let _ = reply.send(Err(stale(&name, step)));
                    return Ok(());
                }
                let groups = state.args.groups;
                let owned: Vec<usize> = lock_store(&state.args.store).dense.iter().map(|(i, _)| *i).collect();
                // Checked whole before any of it is kept: a refused message leaves nothing behind.
                let r = if group >= groups {
                    Err(Error::runtime(format!(
                        "{name}: received gradients of group {group}; the run has {groups} groups"
                    )))
                } else if let Some((i, _)) = tensors.iter().find(|(i, _)| !owned.contains(i)) {
                    Err(Error::runtime(format!(
                        "{name}: received group {group}'s gradient of tensor {i}, which it does not own"
                    )))
                } else {
                    for (i, g) in tensors {
                        state.incoming.entry(i).or_insert_with(|| vec![None; groups])[group] = Some(g);
                    }
                    Ok(())
                };
                let _ = reply.send(r);
            }
            LedgerMsg::Prepare { step, reply } => {
                if !state.enter(step) {
                    let _ = reply.send(Err(stale(&name, step)));
                    return Ok(());
                }
                let owned: Vec<usize> = lock_store(&state.args.store).dense.iter().map(|(i, _)| *i).collect();
                let (incoming, groups, name) = (std::mem::take(&mut state.incoming), state.args.groups, name.clone());
                let r = offload(&state.args.cpu, move |_| prepare(owned, incoming, groups, &name, step))
                    .await
                    .map(|(totals, sums)| {
                        state.totals = Some(totals);
                        sums
                    });
                let _ = reply.send(r);
            }
            LedgerMsg::Commit { step, lr, norm, reply } => {
                let r = match (state.step == step, state.totals.take()) {
                    (true, Some(mut totals)) => {
                        let store = state.args.store.clone();
                        offload(&state.args.cpu, move |_| {
                            let mut s = lock_store(&store);
                            let LedgerState {
                                dense,
                                optimizer,
                                experts,
                            } = &mut *s;
                            let mut p: Vec<&mut Vec<f32>> = dense.iter_mut().map(|(_, v)| v).collect();
                            let mut g: Vec<&mut Vec<f32>> = totals.iter_mut().collect();
                            optimizer.apply(&mut p, &mut g, lr, norm)?;
                            experts.end_step(step.step);
                            Ok(dense.iter().map(|(i, v)| (*i, Arc::new(v.clone()))).collect())
                        })
                        .await
                    }
                    _ => Err(Error::runtime(format!(
                        "{name}: commit of step {step}, which it has not prepared"
                    ))),
                };
                state.incoming.clear();
                let _ = reply.send(r);
            }
            LedgerMsg::Abort { reply } => {
                state.incoming.clear();
                state.totals = None;
                let _ = reply.send(Ok(()));
            }
            LedgerMsg::Snapshot { reply } => {
                // Copied off the async threads: a large share takes seconds, and a worker
                // process's QUIC connections run on those threads (silent that long, it would be
                // taken for lost). The handler waits, so the copy is still of this step.
                let shared = state.args.store.clone();
                let r = tokio::task::spawn_blocking(move || {
                    let (step, dense, store) = {
                        let s = lock_store(&shared);
                        let dense = s
                            .dense
                            .iter()
                            .enumerate()
                            .map(|(k, (i, v))| (*i, v.clone(), s.optimizer.m[k].clone(), s.optimizer.v[k].clone()))
                            .collect();
                        (s.optimizer.step, dense, s.experts.clone())
                    };
                    tokio::runtime::Handle::current()
                        .block_on(store.snapshot())
                        .map(|experts| LedgerSnapshot { step, dense, experts })
                })
                .await
                .unwrap_or_else(|e| Err(Error::runtime(format!("the copy of the committed state failed: {e}"))));
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}

/// Sum every owned tensor's gradients in group order (group 0 first, then each later group added),
/// exactly as a single process sums its group buffers. Answers the totals and their sums of squares.
#[allow(clippy::type_complexity)]
fn prepare(
    owned: Vec<usize>,
    mut incoming: HashMap<usize, Vec<Option<Vec<f32>>>>,
    groups: usize,
    name: &ActorName,
    step: StepId,
) -> Result<(Vec<Vec<f32>>, Vec<(usize, f64)>)> {
    let mut totals = Vec::with_capacity(owned.len());
    let mut sums = Vec::with_capacity(owned.len());
    for i in owned {
        let per_group = incoming.remove(&i).unwrap_or_default();
        let missing: Vec<usize> = (0..groups)
            .filter(|&g| per_group.get(g).is_none_or(|b| b.is_none()))
            .collect();
        if !missing.is_empty() {
            return Err(Error::runtime(format!(
                "{name}: step {step} is missing the gradient of tensor {i} from groups {missing:?}"
            )));
        }
        let mut it = per_group.into_iter().flatten();
        let mut total = it.next().unwrap_or_default();
        for add in it {
            total.iter_mut().zip(&add).for_each(|(t, &a)| *t += a);
        }
        sums.push((i, sum_squares(&total)));
        totals.push(total);
    }
    Ok((totals, sums))
}

/// The answer to a message of an attempt that was rolled back.
fn stale(name: &ActorName, step: StepId) -> Error {
    Error::runtime(format!("{name}: a message of step {step}, which was rolled back"))
}
