//! The Worker actor: one per device. It runs the dense layers of its data groups (a
//! [`GroupPass`] per group, side by side on the compute pool, in
//! lanes that each go through the MoE blocks in lockstep, so that each MoE block is one fused
//! exchange per peer for the lane's groups), sends each group's dense gradients to their owners,
//! and supervises its Gate, Expert, Tier and Communicator actors:
//! a failed child is restarted from the committed state, up to the restart policy's limit, past
//! which the worker reports itself lost.

use super::communicator::{CommActor, CommArgs, CommMsg, Registry, SharedRegistry, SharedReplica};
use super::expert::{ExpertActor, ExpertArgs, ExpertMsg};
use super::gate::{GateActor, GateArgs, GateMsg};
use super::gather::{gate_view, DenseCounters, DenseParams, GatherArgs, Gatherer};
use super::placement::Placement;
use super::runtime::RestartPolicy;
use super::tier::{SharedStore, TierActor, TierArgs, TierMsg, TierSnapshot};
use super::{ask, offload, ActorName};
use crate::chaos::FaultPlan;
use crate::config::TrainConfig;
use crate::data::sampler;
use crate::error::{Error, Result};
use crate::kernels::{Backend, Cpu};
use crate::model::gpt::{Ffn, Gpt, GroupOutput};
use crate::model::moe::MoeConfig;
use crate::model::pass::{GroupPass, MoeResult, Need};
use crate::net::StepId;
use crate::net::{Inbox, Payload, Transport};
use crate::storage::tiers::{ExpertSlot, ExpertStore};
use crate::telemetry::metrics as names;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort, SupervisionEvent};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A norm part: `((tensor index, expert or 0), sum of squares)`.
pub type NormPart = ((usize, usize), f64);

/// Messages of the Worker actor.
pub enum WorkerMsg {
    /// Phase 1a: forward and backward of the worker's groups; deliver dense gradients to owners.
    RunStep {
        /// Training step.
        step: StepId,
        /// Each group's losses and statistics.
        reply: RpcReplyPort<Result<Vec<(usize, GroupOutput)>>>,
    },
    /// Phase 1b: total the step's gradients of everything this worker owns; answer the norm parts.
    Prepare {
        /// Training step.
        step: StepId,
        /// Norm parts.
        reply: RpcReplyPort<Result<Vec<NormPart>>>,
    },
    /// Phase 2: apply the update and broadcast the new dense values.
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
    /// Roll back the step in flight (and make sure every child is running again).
    Abort {
        /// Training step.
        step: StepId,
        /// Done, or the worker is lost.
        reply: RpcReplyPort<Result<()>>,
    },
    /// A copy of the committed state this worker owns.
    Snapshot {
        /// The copy.
        reply: RpcReplyPort<Result<TierSnapshot>>,
    },
}

/// What a Worker is started with.
#[derive(Clone)]
pub struct WorkerArgs {
    /// This worker.
    pub worker: usize,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Training text.
    pub text: Arc<Vec<u8>>,
    /// The placement plan.
    pub placement: Arc<Placement>,
    /// Transport endpoint.
    pub transport: Arc<dyn Transport>,
    /// Its inbox (taken when the worker starts).
    pub inbox: Arc<Mutex<Option<Inbox>>>,
    /// The dense parameters (expert tensors empty; with `storage.shard_dense`, only the tensors
    /// this worker owns).
    pub replica: SharedReplica,
    /// Figures of the dense parameters' gathers (sharded) and residence.
    pub dense: Arc<DenseCounters>,
    /// Committed state this worker owns.
    pub store: SharedStore,
    /// Compute pool.
    pub cpu: Cpu,
    /// Restart limit.
    pub restart: RestartPolicy,
    /// Deadline of every collective.
    pub deadline: Duration,
    /// The worker's groups run in this many lanes, each in lockstep through the MoE blocks, so that
    /// one lane's dense compute overlaps another's expert exchange (1: one fused message per peer,
    /// MoE block and direction for all of the worker's groups).
    pub lanes: usize,
    /// Faults to inject.
    pub chaos: FaultPlan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Child {
    Gate(usize),
    Expert(usize, usize),
    Tier,
    Comm,
}

impl Child {
    fn label(self) -> &'static str {
        match self {
            Child::Gate(_) => "gate",
            Child::Expert(..) => "expert",
            Child::Tier => "tier",
            Child::Comm => "communicator",
        }
    }
}

/// The Worker's state.
pub struct WorkerState {
    args: WorkerArgs,
    registry: SharedRegistry,
    gates: BTreeMap<usize, ActorRef<GateMsg>>,
    children: HashMap<ActorId, (Child, ActorCell)>,
    /// Whether a child was restarted since the step in flight started (its share of the step is
    /// lost: the step must be replayed).
    restarted: bool,
    restarts: VecDeque<Instant>,
    lost: Option<String>,
    pump: Option<tokio::task::JoinHandle<()>>,
}

/// The Worker actor.
pub struct WorkerActor;

impl WorkerState {
    fn moe_config(&self) -> MoeConfig {
        self.args.config.model.moe_config()
    }

    fn expert_store(&self) -> Arc<ExpertStore> {
        self.args
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .experts
            .clone()
    }

    /// Start (or restart) one child and record it.
    async fn spawn(&mut self, myself: &ActorRef<WorkerMsg>, child: Child) -> Result<()> {
        let a = &self.args;
        let sup = myself.get_cell();
        let fail = |e: ractor::SpawnErr| {
            Error::runtime(format!("worker {} cannot start its {}: {e}", a.worker, child.label()))
        };
        let cell: ActorCell = match child {
            Child::Gate(block) => {
                let args = GateArgs {
                    worker: a.worker,
                    block,
                    config: self.moe_config(),
                    groups: a.config.train.groups,
                    placement: a.placement.clone(),
                    registry: self.registry.clone(),
                    cpu: a.cpu.clone(),
                    deadline: a.deadline * 2,
                    chaos: a.chaos.clone(),
                };
                let (r, _) = Actor::spawn_linked(None, GateActor, args, sup).await.map_err(fail)?;
                self.gates.insert(block, r.clone());
                r.get_cell()
            }
            Child::Expert(block, expert) => {
                let args = ExpertArgs {
                    block,
                    expert,
                    worker: a.worker,
                    groups: a.config.train.groups,
                    config: self.moe_config(),
                    store: self.expert_store(),
                    cpu: a.cpu.clone(),
                    chaos: a.chaos.clone(),
                };
                let (r, _) = Actor::spawn_linked(None, ExpertActor, args, sup).await.map_err(fail)?;
                write(&self.registry).experts.insert((block, expert), r.clone());
                r.get_cell()
            }
            Child::Tier => {
                let args = TierArgs {
                    worker: a.worker,
                    groups: a.config.train.groups,
                    store: a.store.clone(),
                    cpu: a.cpu.clone(),
                    chaos: a.chaos.clone(),
                };
                let (r, _) = Actor::spawn_linked(None, TierActor, args, sup).await.map_err(fail)?;
                write(&self.registry).tier = Some(r.clone());
                r.get_cell()
            }
            Child::Comm => {
                let args = CommArgs {
                    worker: a.worker,
                    transport: a.transport.clone(),
                    registry: self.registry.clone(),
                    replica: a.replica.clone(),
                    experts: self.expert_store(),
                    deadline: a.deadline,
                    chaos: a.chaos.clone(),
                };
                let (r, _) = Actor::spawn_linked(None, CommActor, args, sup).await.map_err(fail)?;
                write(&self.registry).comm = Some(r.clone());
                r.get_cell()
            }
        };
        self.children.insert(cell.get_id(), (child, cell));
        Ok(())
    }

    /// A child stopped: restart it unless the restart budget is spent (then the worker is lost).
    async fn child_failed(&mut self, myself: &ActorRef<WorkerMsg>, id: ActorId, why: String) {
        let Some((child, _)) = self.children.remove(&id) else {
            return; // an actor this worker already replaced
        };
        self.restarted = true;
        metrics::counter!(names::RESTARTS, "worker" => self.args.worker.to_string(), "actor" => child.label())
            .increment(1);
        let now = Instant::now();
        let policy = self.args.restart;
        self.restarts.push_back(now);
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 > policy.max_restarts {
            self.lost = Some(format!(
                "worker {} lost: {} restarts within {:?} (limit {}); the last: {} {why}",
                self.args.worker,
                self.restarts.len(),
                policy.window,
                policy.max_restarts,
                child.label()
            ));
            return;
        }
        if let Err(e) = self.spawn(myself, child).await {
            self.lost = Some(e.to_string());
        }
    }
}

fn write(r: &SharedRegistry) -> std::sync::RwLockWriteGuard<'_, Registry> {
    r.write().unwrap_or_else(PoisonError::into_inner)
}

impl Actor for WorkerActor {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerState, ActorProcessingErr> {
        let inbox = args
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| Error::runtime(format!("worker {}'s inbox was already taken", args.worker)))?;
        let mut state = WorkerState {
            registry: Arc::new(std::sync::RwLock::new(Registry::default())),
            gates: BTreeMap::new(),
            children: HashMap::new(),
            restarts: VecDeque::new(),
            restarted: false,
            lost: None,
            pump: None,
            args,
        };
        state.spawn(&myself, Child::Tier).await?;
        state.spawn(&myself, Child::Comm).await?;
        let c = state.args.config.model.clone();
        for block in (0..c.n_layer).filter(|&l| c.is_moe(l)) {
            state.spawn(&myself, Child::Gate(block)).await?;
            for e in state.args.placement.experts_of(state.args.worker) {
                state.spawn(&myself, Child::Expert(block, e)).await?;
            }
        }
        state.pump = Some(tokio::spawn(pump(inbox, state.registry.clone())));
        Ok(state)
    }

    async fn post_stop(&self, myself: ActorRef<WorkerMsg>, state: &mut WorkerState) -> Result<(), ActorProcessingErr> {
        if let Some(p) = state.pump.take() {
            p.abort();
        }
        state.children.clear();
        myself.stop_children(None);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<WorkerMsg>,
        event: SupervisionEvent,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                state
                    .child_failed(&myself, cell.get_id(), format!("failed: {err}"))
                    .await
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let why = format!("stopped ({})", reason.unwrap_or_else(|| "no reason".into()));
                state.child_failed(&myself, cell.get_id(), why).await
            }
            _ => {}
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::RunStep { step, reply } => {
                state.restarted = false;
                let r = match &state.lost {
                    Some(lost) => Err(Error::runtime(lost.clone())),
                    None => run_step(state, step).await,
                };
                let _ = reply.send(r);
            }
            WorkerMsg::Prepare { step, reply } => {
                let r = if let Some(lost) = &state.lost {
                    Err(Error::runtime(lost.clone()))
                } else if state.restarted {
                    Err(Error::ActorFailed {
                        actor: format!("a child of worker {}", state.args.worker),
                        detail: format!("restarted during step {step}: its share of the step is lost"),
                    })
                } else {
                    prepare(state, step).await
                };
                let _ = reply.send(r);
            }
            WorkerMsg::Commit { step, lr, norm, reply } => {
                let r = match &state.lost {
                    Some(lost) => Err(Error::runtime(lost.clone())),
                    None => commit(state, step, lr, norm).await,
                };
                let _ = reply.send(r);
            }
            WorkerMsg::Abort { reply, .. } => {
                // A child whose failure has not been handled yet (its reply port was dropped
                // before ractor told this supervisor) is restarted now, so the replay finds it.
                let stopped: Vec<ActorId> = state
                    .children
                    .iter()
                    .filter(|(_, (_, cell))| {
                        !matches!(
                            cell.get_status(),
                            ractor::ActorStatus::Running
                                | ractor::ActorStatus::Starting
                                | ractor::ActorStatus::Unstarted
                        )
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in stopped {
                    state
                        .child_failed(&myself, id, "found stopped at the abort".into())
                        .await;
                }
                for g in state.gates.values() {
                    let _ = g.cast(GateMsg::Abort);
                }
                let reg = state.registry.read().unwrap_or_else(PoisonError::into_inner);
                for e in reg.experts.values() {
                    let _ = e.cast(ExpertMsg::Abort);
                }
                if let Some(t) = &reg.tier {
                    let _ = t.cast(TierMsg::Abort);
                }
                drop(reg);
                let r = match &state.lost {
                    Some(lost) => Err(Error::runtime(lost.clone())),
                    None => Ok(()),
                };
                let _ = reply.send(r);
            }
            WorkerMsg::Snapshot { reply } => {
                let r = match tier(state) {
                    Ok(t) => {
                        ask(
                            &t,
                            &ActorName("tier".into()),
                            "a snapshot",
                            state.args.deadline,
                            |reply| TierMsg::Snapshot { reply },
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}

/// Forward packets from the transport to whichever Communicator is running.
async fn pump(mut inbox: Inbox, registry: SharedRegistry) {
    while let Some(mut packet) = inbox.recv().await {
        // While the Communicator restarts, hold the packet (up to a few seconds; the requester's
        // deadline covers the rest).
        for _ in 0..5000 {
            let comm = registry.read().unwrap_or_else(PoisonError::into_inner).comm.clone();
            match comm.map(|c| c.cast(CommMsg::Incoming(packet))) {
                Some(Ok(())) => break,
                Some(Err(MessagingErr::SendErr(CommMsg::Incoming(p)))) => packet = p,
                Some(Err(_)) => break,
                None => return,
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn tier(state: &WorkerState) -> Result<ActorRef<TierMsg>> {
    state
        .registry
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .tier
        .clone()
        .ok_or_else(|| Error::runtime("the tier is not running"))
}

fn comm(state: &WorkerState) -> Result<ActorRef<CommMsg>> {
    state
        .registry
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .comm
        .clone()
        .ok_or_else(|| Error::runtime("the communicator is not running"))
}

/// Empty the expert tensors of `model` (keeping the gate weights, which are dense).
pub fn strip_experts(model: &mut Gpt<f32>) {
    for b in &mut model.blocks {
        if let Ffn::Moe(layer) = &mut b.ffn {
            let p = &mut layer.params;
            p.w1 = Vec::new();
            p.b1 = Vec::new();
            p.w2 = Vec::new();
            p.b2 = Vec::new();
        }
    }
}

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

enum Pending {
    None,
    Forward(Vec<MoeResult<f32>>),
    Backward(usize, Vec<(Vec<f32>, Vec<f32>)>),
}

async fn run_step(state: &mut WorkerState, step: StepId) -> Result<Vec<(usize, GroupOutput)>> {
    let a = state.args.clone();
    let replica: Arc<Gpt<f32>> = a.replica.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let groups = a.placement.groups_of(a.worker);
    let c = &a.config;
    let t = c.model.block_size;
    let seqs = c.train.batch / c.train.groups;
    let ce_scale = 1.0 / (c.train.batch * t) as f32;
    let seed = c.train.seed;

    // The groups run in lanes, each lane in lockstep through the MoE blocks: while one lane waits
    // for its experts, the other computes its dense layers.
    let lanes = a.lanes.min(groups.len()).max(1);
    let (source, first, _cancel_gathers) = if c.storage.shard_dense {
        let gatherer = Gatherer::new(GatherArgs {
            step,
            worker: a.worker,
            deadline: a.deadline,
            comm: comm(state)?,
            replica: a.replica.clone(),
            placement: a.placement.clone(),
            lanes,
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
                let starts = sampler::window_starts(seed, step.step, g as u64, seqs, text.len(), t);
                let (idx, targets) = sampler::windows(&text, &starts, t);
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
        let (a, gates, source) = (a.clone(), state.gates.clone(), source.clone());
        tasks.spawn(async move { (lane, gs.clone(), run_lane(a, gates, step, source, gs, ps).await) });
    }
    drop(source);
    let mut done: Vec<(usize, Pass)> = Vec::with_capacity(groups.len());
    let mut first_err = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, gs, Ok(ps))) => done.extend(gs.into_iter().zip(ps)),
            Ok((_, _, Err(e))) => {
                if first_err
                    .as_ref()
                    .is_none_or(|p: &Error| p.is_restartable() && !e.is_restartable())
                {
                    first_err = Some(e);
                }
            }
            Err(e) => first_err = Some(Error::runtime(format!("a lane of worker {} panicked: {e}", a.worker))),
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
    exchange(state, what, "dense_grads", requests).await?;
    Ok(outputs)
}

/// One exchange through this worker's Communicator (which applies the collective deadline).
async fn exchange(
    state: &WorkerState,
    what: String,
    kind: &'static str,
    requests: Vec<(usize, Payload)>,
) -> Result<Vec<(usize, Payload)>> {
    let comm = comm(state)?;
    let who = ActorName(format!("communicator of worker {}", state.args.worker));
    ask(&comm, &who, &what, state.args.deadline * 2, |reply| CommMsg::Exchange {
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
    groups: Vec<usize>,
    mut passes: Vec<Pass>,
) -> Result<Vec<Pass>> {
    let mut pending = Pending::None;
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
                Pending::None => work.extend(passes.into_iter().map(|p| (p, None, None))),
                Pending::Forward(results) => {
                    for (mut p, r) in passes.into_iter().zip(results) {
                        p.moe_forward_done(r)?;
                        work.push((p, None, None));
                    }
                }
                Pending::Backward(block, grads) => {
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
        let deadline = a.deadline * 3;
        if forward {
            let what = format!("the block-{block} forward of step {step}");
            let rep = match (&source, &params) {
                (DenseSource::Replica(replica), _) => replica.clone(),
                (DenseSource::Sharded(gatherer), Some(params)) => gate_view(gatherer.shell(), params, block)?,
                (DenseSource::Sharded(_), None) => return Err(Error::runtime("a sharded leg without parameters")),
            };
            let results = ask(&gate, &who, &what, deadline, |reply| GateMsg::Forward {
                step,
                replica: rep,
                groups: inputs,
                reply,
            })
            .await?;
            pending = Pending::Forward(in_group_order(&groups, results)?);
        } else {
            let what = format!("the block-{block} backward of step {step}");
            let results = ask(&gate, &who, &what, deadline, |reply| GateMsg::Backward {
                step,
                groups: inputs,
                reply,
            })
            .await?;
            let results: GroupGrads = results.into_iter().map(|(g, dx, gwg)| (g, (dx, gwg))).collect();
            pending = Pending::Backward(block, in_group_order(&groups, results)?);
        }
    }

    Ok(passes)
}

fn in_group_order<R>(groups: &[usize], results: Vec<(usize, R)>) -> Result<Vec<R>> {
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

/// Ask every hosted expert at once; answer `(expert id, answer)` in expert order.
async fn for_each_expert<R, F, Fut>(
    experts: Vec<((usize, usize), ActorRef<ExpertMsg>)>,
    ask_one: F,
) -> Result<Vec<((usize, usize), R)>>
where
    R: Send + 'static,
    F: Fn((usize, usize), ActorRef<ExpertMsg>) -> Fut,
    Fut: std::future::Future<Output = Result<R>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for (id, actor) in experts {
        let fut = ask_one(id, actor);
        tasks.spawn(async move { (id, fut.await) });
    }
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (id, r) = joined.map_err(|e| Error::runtime(format!("an expert call panicked: {e}")))?;
        out.push((id, r?));
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

async fn prepare(state: &mut WorkerState, step: StepId) -> Result<Vec<NormPart>> {
    let deadline = state.args.deadline;
    let t = tier(state)?;
    let mut parts: Vec<NormPart> = ask(
        &t,
        &ActorName(format!("tier of worker {}", state.args.worker)),
        "prepare",
        deadline,
        |reply| TierMsg::Prepare { step, reply },
    )
    .await?
    .into_iter()
    .map(|(i, s)| ((i, 0), s))
    .collect();
    let experts: Vec<((usize, usize), ActorRef<ExpertMsg>)> = state
        .registry
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .experts
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let names: Vec<String> = {
        let replica = state.args.replica.lock().unwrap_or_else(PoisonError::into_inner);
        replica.tensors().into_iter().map(|(n, _, _)| n).collect()
    };
    let worker = state.args.worker;
    let answers = for_each_expert(experts, move |(block, e), actor| async move {
        let who = ActorName(format!("expert {block}.{e} on worker {worker}"));
        ask(&actor, &who, "prepare", deadline, |reply| ExpertMsg::Prepare {
            step,
            reply,
        })
        .await
    })
    .await?;
    for ((block, e), sums) in answers {
        let idx = ExpertSlot::tensor_indices(names.iter().map(String::as_str), block)?;
        parts.extend(idx.iter().zip(sums).map(|(&i, s)| ((i, e), s)));
    }
    Ok(parts)
}

async fn commit(state: &mut WorkerState, step: StepId, lr: f64, norm: f64) -> Result<()> {
    let a = state.args.clone();
    let t = tier(state)?;
    let updated = ask(
        &t,
        &ActorName(format!("tier of worker {}", a.worker)),
        "commit",
        a.deadline,
        |reply| TierMsg::Commit { step, lr, norm, reply },
    )
    .await?;
    let experts: Vec<((usize, usize), ActorRef<ExpertMsg>)> = state
        .registry
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .experts
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let (worker, deadline) = (a.worker, a.deadline);
    for_each_expert(experts, move |(block, e), actor| async move {
        let who = ActorName(format!("expert {block}.{e} on worker {worker}"));
        ask(&actor, &who, "commit", deadline, |reply| ExpertMsg::Commit {
            step,
            lr,
            norm,
            reply,
        })
        .await
    })
    .await?;
    // Broadcast the new values of the owned dense tensors to every replica (this one included);
    // sharded, only this worker keeps them, and the others gather them when a leg needs them.
    let receivers: Vec<usize> = if a.config.storage.shard_dense {
        vec![a.worker]
    } else {
        (0..a.placement.workers).collect()
    };
    let requests: Vec<(usize, Payload)> = receivers
        .into_iter()
        .map(|w| {
            (
                w,
                Payload::Params {
                    step,
                    tensors: updated.clone(),
                },
            )
        })
        .collect();
    let what = format!("the parameter broadcast of step {step}");
    exchange(state, what, "params", requests).await?;
    Ok(())
}
