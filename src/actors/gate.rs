//! The Gate actor: one MoE block's router on one worker.
//!
//! Forward, for all of its worker's groups at once: gate logits, routing, router losses and the
//! dispatch of every kept row to its expert's host (one fused message per peer), then the combine of
//! the experts' outputs. Backward: the combine's backward, the fused dispatch of output gradients,
//! and the gate's own backward (its weight gradient goes back to the worker with the group's other
//! dense gradients). The gate's weights are read from the worker's replica, so a restarted Gate has
//! nothing to recover: the step it was in is replayed.

use super::collectives::ExpertCall;
use super::communicator::{CommMsg, SharedRegistry};
use super::placement::Placement;
use super::{ask, inject, offload, ActorName};
use crate::chaos::{FaultPlan, Moment, Target};
use crate::error::{Error, Result};
use crate::kernels::Cpu;
use crate::kernels::{Backend, Scalar};
use crate::model::gpt::{Ffn, Gpt};
use crate::model::moe::stages::{self, Dispatch};
use crate::model::moe::MoeConfig;
use crate::model::pass::MoeResult;
use crate::net::StepId;
use crate::net::{Payload, Segment};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `(group, output of the MoE block)`.
pub type GateOutputs = Vec<(usize, MoeResult<f32>)>;

/// A group's routed batch with its input and expert outputs.
type Combined = (usize, Vec<f32>, Dispatch<f32>, Vec<f32>);

/// `(group, dL/dx, gradient of the gate weights)`.
pub type GateGrads = Vec<(usize, Vec<f32>, Vec<f32>)>;

/// Messages of the Gate actor.
pub enum GateMsg {
    /// The MoE block's forward for each `(group, LN2 output)`.
    Forward {
        /// Training step.
        step: StepId,
        /// The worker's lane the groups run in (picks the lane's communicator).
        lane: usize,
        /// The parameters of this step.
        replica: Arc<Gpt<f32>>,
        /// `(group, input)`.
        groups: Vec<(usize, Vec<f32>)>,
        /// `(group, result)`.
        reply: RpcReplyPort<Result<GateOutputs>>,
    },
    /// The MoE block's backward for each `(group, dL/dy)`.
    Backward {
        /// Training step.
        step: StepId,
        /// The worker's lane the groups run in.
        lane: usize,
        /// `(group, output gradient)`.
        groups: Vec<(usize, Vec<f32>)>,
        /// Input and gate-weight gradients.
        reply: RpcReplyPort<Result<GateGrads>>,
    },
    /// Drop everything of the current step (answered: see `LedgerMsg::Abort`).
    Abort {
        /// Done.
        reply: RpcReplyPort<Result<()>>,
    },
}

/// What a Gate actor is started with.
#[derive(Clone)]
pub struct GateArgs {
    /// The worker.
    pub worker: usize,
    /// The MoE block.
    pub block: usize,
    /// The layer's configuration.
    pub config: MoeConfig,
    /// Groups per batch (the router losses are averaged over them).
    pub groups: usize,
    /// Where experts live.
    pub placement: Arc<Placement>,
    /// The worker's children (the Communicator).
    pub registry: SharedRegistry,
    /// Compute pool.
    pub cpu: Cpu,
    /// Deadline of the communicator call (the exchange's own deadline plus slack).
    pub deadline: Duration,
    /// Faults to inject.
    pub chaos: FaultPlan,
}

impl GateArgs {
    /// The actor's name.
    pub fn name(&self) -> ActorName {
        ActorName(format!("gate {} on worker {}", self.block, self.worker))
    }
}

struct GroupCache {
    replica: Arc<Gpt<f32>>,
    x: Vec<f32>,
    dispatch: Dispatch<f32>,
    ye: Vec<f32>,
    gw: Vec<f32>,
}

/// Per-group forward state between a group's forward and backward. Shared with the tasks that run
/// the exchanges, so that several lanes' requests are in flight at once; a restarted Gate starts
/// with a new one.
type SharedCache = Arc<Mutex<GateCache>>;

/// The forward state of one step's attempt, by group. A forward task that outlives its attempt
/// (replayed meanwhile) must not put its state in the replay's place: it is kept only while the
/// cache is still its attempt's.
#[derive(Default)]
struct GateCache {
    step: Option<StepId>,
    groups: BTreeMap<usize, GroupCache>,
}

impl std::ops::Deref for GateCache {
    type Target = BTreeMap<usize, GroupCache>;
    fn deref(&self) -> &Self::Target {
        &self.groups
    }
}

impl std::ops::DerefMut for GateCache {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.groups
    }
}

/// The Gate actor's state.
pub struct GateState {
    args: GateArgs,
    step: StepId,
    cache: SharedCache,
    /// The step (and attempt) of the first message this actor handled. A backward of that same
    /// step that finds no forward state belongs to forwards the failed actor it replaces served
    /// (another lane's forward may have reached this one first): the step is replayed. In any
    /// later step a missing forward is a defect, and an error.
    born: Option<StepId>,
}

fn lock(cache: &SharedCache) -> std::sync::MutexGuard<'_, GateCache> {
    cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The Gate actor.
pub struct GateActor;

impl Actor for GateActor {
    type Msg = GateMsg;
    type State = GateState;
    type Arguments = GateArgs;

    async fn pre_start(&self, _: ActorRef<GateMsg>, args: GateArgs) -> Result<GateState, ActorProcessingErr> {
        Ok(GateState {
            args,
            step: StepId::NONE,
            cache: Arc::new(Mutex::new(GateCache::default())),
            born: None,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<GateMsg>,
        msg: GateMsg,
        state: &mut GateState,
    ) -> Result<(), ActorProcessingErr> {
        let target = Target::Gate {
            worker: state.args.worker,
            block: state.args.block,
        };
        let name = state.args.name();
        match msg {
            GateMsg::Forward {
                step,
                lane,
                replica,
                groups,
                reply,
            } => {
                inject(&state.args.chaos, &target, step, Moment::Forward, &name)?;
                state.born.get_or_insert(step);
                if step < state.step {
                    let _ = reply.send(Err(Error::runtime(format!(
                        "{name}: a forward of step {step}, which was rolled back"
                    ))));
                    return Ok(());
                }
                if state.step != step {
                    state.step = step;
                    lock(&state.cache).clear();
                }
                lock(&state.cache).step = Some(step);
                // The exchange runs in its own task: the Gate takes the next lane's request meanwhile.
                let (args, cache) = (state.args.clone(), state.cache.clone());
                tokio::spawn(async move {
                    let r = forward(args, cache, (step, lane), replica, groups).await;
                    let _ = reply.send(r);
                });
            }
            GateMsg::Backward {
                step,
                lane,
                groups,
                reply,
            } => {
                inject(&state.args.chaos, &target, step, Moment::Backward, &name)?;
                state.born.get_or_insert(step);
                let lost = state.born == Some(step) && {
                    let cache = lock(&state.cache);
                    state.step != step || groups.iter().any(|(g, _)| !cache.contains_key(g))
                };
                if lost {
                    // Another lane's backward reached the restarted gate: the step is replayed.
                    let _ = reply.send(Err(Error::ActorFailed {
                        actor: name.to_string(),
                        detail: format!(
                            "restarted during step {step}: its forward state was lost with the failed actor"
                        ),
                    }));
                } else if state.step == step {
                    let (args, cache) = (state.args.clone(), state.cache.clone());
                    tokio::spawn(async move {
                        let r = backward(args, cache, (step, lane), groups).await;
                        let _ = reply.send(r);
                    });
                } else {
                    let _ = reply.send(Err(Error::runtime(format!(
                        "{name}: backward of step {step} without its forward"
                    ))));
                }
            }
            GateMsg::Abort { reply } => {
                let mut cache = lock(&state.cache);
                cache.clear();
                cache.step = None;
                drop(cache);
                let _ = reply.send(Ok(()));
            }
        }
        Ok(())
    }
}

fn gate_weights(replica: &Gpt<f32>, block: usize) -> Result<&[f32]> {
    match replica.blocks.get(block).map(|b| &b.ffn) {
        Some(Ffn::Moe(layer)) => Ok(&layer.params.wg),
        _ => Err(Error::shape("gate", format!("block {block} is not an MoE block"))),
    }
}

/// Split each group's expert rows into one request per host (group order, then expert order).
fn requests(
    args: &GateArgs,
    step: StepId,
    per_group: &[(usize, &Dispatch<f32>, &[f32])],
    forward: bool,
) -> Vec<(usize, Payload)> {
    let d = args.config.d_model;
    let mut by_peer: BTreeMap<usize, Vec<Segment>> = BTreeMap::new();
    for &(group, dispatch, rows) in per_group {
        let offsets = &dispatch.routing.offsets;
        for (e, w) in offsets.windows(2).enumerate() {
            if w[1] > w[0] {
                by_peer
                    .entry(args.placement.expert_owner[e])
                    .or_default()
                    .push(Segment {
                        group,
                        expert: e,
                        rows: w[1] - w[0],
                        data: rows[w[0] * d..w[1] * d].to_vec(),
                    });
            }
        }
    }
    by_peer
        .into_iter()
        .map(|(peer, segments)| {
            let payload = if forward {
                Payload::ExpertForward {
                    step,
                    block: args.block,
                    segments,
                }
            } else {
                Payload::ExpertBackward {
                    step,
                    block: args.block,
                    segments,
                }
            };
            (peer, payload)
        })
        .collect()
}

/// Run an exchange through the worker's Communicator and put every answered row back into its
/// group's canonical buffer (`[kept rows][d_model]`).
async fn exchange(
    args: &GateArgs,
    (step, lane): (StepId, usize),
    requests: Vec<(usize, Payload)>,
    kind: &'static str,
    layouts: &HashMap<usize, Vec<usize>>,
) -> Result<HashMap<usize, Vec<f32>>> {
    let d = args.config.d_model;
    let comm = args
        .registry
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .comm
        .clone()
        .ok_or_else(|| Error::runtime("the communicator is not running"))?;
    let what = format!(
        "the block-{} {} of step {step}",
        args.block,
        if kind == "dispatch" {
            "expert forward"
        } else {
            "expert backward"
        }
    );
    let who = ActorName(format!("communicator of worker {}", args.worker));
    let call = ExpertCall {
        lane,
        step,
        block: args.block,
        forward: kind == "dispatch",
        what: what.clone(),
    };
    let replies = ask(&comm, &who, &what, args.deadline, |reply| CommMsg::ExpertExchange {
        call: Box::new(call),
        kind,
        requests,
        reply,
    })
    .await?;
    // Each group's answered rows by expert, then laid end to end in expert order: one copy, and
    // an expert whose rows no peer answered is an error rather than silent zeros.
    let mut answered: HashMap<usize, Vec<Option<Vec<f32>>>> = layouts
        .iter()
        .map(|(&g, offsets)| (g, vec![None; offsets.len().saturating_sub(1)]))
        .collect();
    for (peer, payload) in replies {
        let Payload::Segments(segments) = payload else {
            return Err(Error::runtime(format!(
                "worker {peer} answered {what} with the wrong message"
            )));
        };
        for s in segments {
            let (offsets, slots) = layouts
                .get(&s.group)
                .zip(answered.get_mut(&s.group))
                .ok_or_else(|| Error::runtime(format!("worker {peer} answered for unknown group {}", s.group)))?;
            let Some(slot) = slots.get_mut(s.expert) else {
                return Err(Error::runtime(format!(
                    "worker {peer} answered {what} for expert {}, which does not exist",
                    s.expert
                )));
            };
            let rows = offsets[s.expert + 1] - offsets[s.expert];
            if s.data.len() != rows * d {
                return Err(Error::shape(
                    format!("rows of expert {} for group {} from worker {peer}", s.expert, s.group),
                    format!("{} values for {rows} rows", s.data.len()),
                ));
            }
            if slot.replace(s.data).is_some() {
                return Err(Error::runtime(format!(
                    "{what}: expert {} of group {} was answered twice",
                    s.expert, s.group
                )));
            }
        }
    }
    let mut out = HashMap::with_capacity(answered.len());
    for (g, slots) in answered {
        let offsets = &layouts[&g];
        let mut rows = Vec::with_capacity(offsets.last().copied().unwrap_or(0) * d);
        for (e, slot) in slots.into_iter().enumerate() {
            match slot {
                Some(data) => rows.extend_from_slice(&data),
                None if offsets[e + 1] == offsets[e] => {}
                None => {
                    return Err(Error::runtime(format!(
                        "{what}: no answer for the {} rows of expert {e} of group {g}",
                        offsets[e + 1] - offsets[e]
                    )))
                }
            }
        }
        out.insert(g, rows);
    }
    Ok(out)
}

async fn forward(
    args: GateArgs,
    cache: SharedCache,
    (step, lane): (StepId, usize),
    replica: Arc<Gpt<f32>>,
    groups: Vec<(usize, Vec<f32>)>,
) -> Result<GateOutputs> {
    let (c, block) = (args.config.clone(), args.block);
    // Route every group side by side.
    let rep = replica.clone();
    let routed = offload(&args.cpu, move |cpu| {
        let wg = gate_weights(&rep, block)?;
        cpu.par_map(groups, |b, (g, x)| {
            let d = stages::gate_forward(&c, b, wg, &x)?;
            Ok((g, x, d))
        })
    })
    .await?;
    let view: Vec<(usize, &Dispatch<f32>, &[f32])> = routed.iter().map(|(g, _, d)| (*g, d, d.xe.as_slice())).collect();
    let reqs = requests(&args, step, &view, true);
    let layouts: HashMap<usize, Vec<usize>> = routed.iter().map(|(g, _, d)| (*g, d.routing.offsets.clone())).collect();
    let mut outputs = exchange(&args, (step, lane), reqs, "dispatch", &layouts).await?;

    // Combine, group by group.
    let c = args.config.clone();
    let work: Vec<Combined> = routed
        .into_iter()
        .map(|(g, x, mut d)| {
            d.xe = Vec::new(); // the experts keep their own copy for the backward pass
            let ye = outputs.remove(&g).unwrap_or_default();
            (g, x, d, ye)
        })
        .collect();
    let combined = offload(&args.cpu, move |cpu| {
        let mut ys: Vec<Vec<f32>> = vec![Vec::new(); work.len()];
        cpu.par_for_each(work.iter().zip(ys.iter_mut()).collect(), |b, ((_, _, d, ye), y)| {
            *y = stages::combine(&c, b, d, ye)?;
            Ok(())
        })?;
        Ok((work, ys))
    })
    .await?;
    let (work, ys) = combined;
    let mut answer = Vec::with_capacity(work.len());
    for ((g, x, dispatch, ye), y) in work.into_iter().zip(ys) {
        answer.push((
            g,
            MoeResult {
                y,
                l_aux: dispatch.l_aux.to_f64(),
                z_loss: dispatch.z_loss.to_f64(),
                stats: dispatch.stats(),
            },
        ));
        let mut kept = lock(&cache);
        if kept.step == Some(step) {
            kept.insert(
                g,
                GroupCache {
                    replica: replica.clone(),
                    x,
                    dispatch,
                    ye,
                    gw: Vec::new(),
                },
            );
        }
    }
    Ok(answer)
}

async fn backward(
    args: GateArgs,
    shared: SharedCache,
    (step, lane): (StepId, usize),
    groups: Vec<(usize, Vec<f32>)>,
) -> Result<GateGrads> {
    let c = args.config.clone();
    let mut work = Vec::with_capacity(groups.len());
    for (g, dy) in groups {
        let cache = lock(&shared)
            .remove(&g)
            .ok_or_else(|| Error::runtime(format!("{}: backward of group {g} without its forward", args.name())))?;
        work.push((g, cache, dy, Vec::new()));
    }
    // Combine backward: combine-weight gradients and expert-output gradients.
    let mut work = offload(&args.cpu, move |cpu| {
        cpu.par_for_each(work.iter_mut().collect(), |b, (_, cache, dy, gye)| {
            let (gw, g) = stages::combine_backward(&c, b, &cache.dispatch, &cache.ye, dy)?;
            cache.gw = gw;
            cache.ye = Vec::new();
            *gye = g;
            Ok(())
        })?;
        Ok(work)
    })
    .await?;
    let view: Vec<(usize, &Dispatch<f32>, &[f32])> = work
        .iter()
        .map(|(g, cache, _, gye)| (*g, &cache.dispatch, gye.as_slice()))
        .collect();
    let reqs = requests(&args, step, &view, false);
    let layouts: HashMap<usize, Vec<usize>> = work
        .iter()
        .map(|(g, cache, _, _)| (*g, cache.dispatch.routing.offsets.clone()))
        .collect();
    let mut gxe = exchange(&args, (step, lane), reqs, "grad_dispatch", &layouts).await?;
    for (g, _, _, gye) in work.iter_mut() {
        *gye = gxe.remove(g).unwrap_or_default(); // reuse the slot for dL/dxe
    }

    // Dispatch and gate backward.
    let replica = work
        .first()
        .map(|(_, cache, _, _)| cache.replica.clone())
        .ok_or_else(|| Error::runtime(format!("{}: backward without groups", args.name())))?;
    let (c, block, groups) = (args.config.clone(), args.block, args.groups);
    offload(&args.cpu, move |cpu| {
        let wg = gate_weights(&replica, block)?;
        let router_scale = 1.0 / groups as f32;
        let mut out: Vec<(usize, Vec<f32>, Vec<f32>)> = work
            .iter()
            .map(|(g, _, _, _)| (*g, Vec::new(), vec![0.0; wg.len()]))
            .collect();
        cpu.par_for_each(
            work.iter().zip(out.iter_mut()).collect(),
            |b, ((_, cache, _, gxe), (_, dx, gwg))| {
                *dx = stages::gate_backward(&c, b, wg, &cache.x, &cache.dispatch, &cache.gw, gxe, gwg, router_scale)?;
                Ok(())
            },
        )?;
        Ok(out)
    })
    .await
}
