//! The Worker actor: one per device. It runs the dense layers of its data groups (a
//! [`GroupPass`](crate::model::pass::GroupPass) per group, side by side on the compute pool, in
//! lanes that each go through the MoE blocks in lockstep, so that each MoE block is one fused
//! exchange per peer for the lane's groups), sends each group's dense gradients to their owners,
//! and supervises its Gate, Expert, Ledger and Communicator actors:
//! a failed child is restarted from the committed state, up to the restart policy's limit, past
//! which the worker reports itself lost.

mod commit;
mod step;

use super::collectives::ExpertCollectives;
use super::communicator::{CommActor, CommArgs, CommMsg, Registry, SharedRegistry, SharedReplica};
use super::expert::{ExpertActor, ExpertArgs, ExpertMsg};
use super::gate::{GateActor, GateArgs, GateMsg};
use super::gather::DenseCounters;
use super::ledger::{LedgerActor, LedgerArgs, LedgerMsg, LedgerSnapshot, SharedStore};
use super::placement::Placement;
use super::runtime::RestartPolicy;
use super::{ask, ActorName};
use crate::chaos::{FaultPlan, Target};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::kernels::Cpu;
use crate::model::gpt::{Ffn, Gpt, GroupOutput};
use crate::model::moe::MoeConfig;
use crate::net::StepId;
use crate::net::{Inbox, Payload, Transport};
use crate::storage::tiers::ExpertStore;
use crate::telemetry::metrics as names;
use commit::{commit, prepare};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort, SupervisionEvent};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use step::run_step;

/// A child the worker asks at an abort (see `WorkerMsg::Abort`).
enum AbortAsk {
    Gate(ActorRef<GateMsg>),
    Expert(ActorRef<ExpertMsg>),
    Ledger(ActorRef<LedgerMsg>),
}

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
        reply: RpcReplyPort<Result<LedgerSnapshot>>,
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
    /// Bytes sent to each peer, by kind.
    pub traffic: Arc<super::traffic::Traffic>,
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
    /// The lanes' communicators when expert rows travel over collectives (`train.exchange` `sim`
    /// or `nccl`); `None`: over the transport. Then every worker runs
    /// [`ExpertCollectives::lanes`] lanes, and takes part in every lane's exchanges.
    pub collectives: Option<Arc<ExpertCollectives>>,
}

impl WorkerArgs {
    /// How long a Gate waits for its Communicator's exchange: twice the deadline over the
    /// transport; over collectives, the exchange's bound (it waits for the slowest worker too).
    pub(super) fn exchange_deadline(&self) -> Duration {
        match &self.collectives {
            Some(collectives) => collectives.exchange_bound(self.deadline),
            None => self.deadline * 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Child {
    Gate(usize),
    Expert(usize, usize),
    Ledger,
    Comm,
}

impl Child {
    fn label(self) -> &'static str {
        match self {
            Child::Gate(_) => "gate",
            Child::Expert(..) => "expert",
            Child::Ledger => "ledger",
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
    /// The step this worker runs next (the steps it has committed), shared with its Communicator,
    /// which takes a peer's work only for that step.
    next_step: Arc<std::sync::atomic::AtomicU64>,
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
                    deadline: a.exchange_deadline(),
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
            Child::Ledger => {
                let args = LedgerArgs {
                    worker: a.worker,
                    groups: a.config.train.groups,
                    store: a.store.clone(),
                    cpu: a.cpu.clone(),
                    chaos: a.chaos.clone(),
                };
                let (r, _) = Actor::spawn_linked(None, LedgerActor, args, sup).await.map_err(fail)?;
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
                    traffic: a.traffic.clone(),
                    collectives: a.collectives.clone(),
                    placement: a.placement.clone(),
                    next_step: self.next_step.clone(),
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
        let worker = self.args.worker;
        let target = match child {
            Child::Gate(block) => Some(Target::Gate { worker, block }),
            Child::Expert(block, expert) => Some(Target::Expert { block, expert }),
            Child::Ledger => Some(Target::Ledger { worker }),
            Child::Comm => Some(Target::Communicator { worker }),
        };
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
        let label = child.label();
        match self.spawn(myself, child).await {
            // Counted (and told to a chaos run's report) once it is running again: a failure
            // past the limit restarts nothing.
            Ok(()) => {
                self.args.chaos.record_restart(worker, label, target);
                metrics::counter!(names::RESTARTS, "worker" => worker.to_string(), "actor" => label).increment(1)
            }
            Err(e) => self.lost = Some(e.to_string()),
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
        let committed = args.store.lock().unwrap_or_else(PoisonError::into_inner).optimizer.step;
        let mut state = WorkerState {
            next_step: Arc::new(std::sync::atomic::AtomicU64::new(committed)),
            registry: Arc::new(std::sync::RwLock::new(Registry::default())),
            gates: BTreeMap::new(),
            children: HashMap::new(),
            restarts: VecDeque::new(),
            restarted: false,
            lost: None,
            pump: None,
            args,
        };
        state.spawn(&myself, Child::Ledger).await?;
        state.spawn(&myself, Child::Comm).await?;
        let c = state.args.config.model.clone();
        for block in (0..c.n_layer).filter(|&l| c.is_moe(l)) {
            state.spawn(&myself, Child::Gate(block)).await?;
            for e in state.args.placement.experts_of(state.args.worker) {
                state.spawn(&myself, Child::Expert(block, e)).await?;
            }
        }
        state.pump = Some(tokio::spawn(pump(
            inbox,
            state.registry.clone(),
            state.args.collectives.clone(),
            myself.get_cell(),
            state.args.worker,
            // A restarted Communicator starts once the worker's step handler returns, at most a
            // step deadline later.
            state.args.deadline.saturating_mul(10),
        )));
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
                state.args.chaos.begin_step(step.step);
                let r = match &state.lost {
                    Some(lost) => Err(Error::runtime(lost.clone())),
                    None => run_step(state, step).await,
                };
                if let (Err(e), Some(collectives)) = (&r, &state.args.collectives) {
                    // Peers may be waiting in an exchange this worker will not issue.
                    let reason = format!("worker {} failed step {step}: {e}", state.args.worker);
                    collectives.abort(step, &reason, e.is_restartable());
                }
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
            WorkerMsg::Abort { step, reply } => {
                if let Some(collectives) = &state.args.collectives {
                    collectives.abort(step, &format!("step {step} was aborted"), true);
                }
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
                // Every child is asked, not told: a child that failed a moment ago can still read as
                // running (ractor drops its mailbox, and the callers see the failure, before its
                // status changes and this supervisor hears of it). One that cannot answer is
                // restarted here, or the replay would run into it and fail a second time. One that
                // is only busy (a late request of the aborted attempt) is left to finish.
                let mut children: Vec<(ActorId, ActorName, AbortAsk)> = state
                    .gates
                    .iter()
                    .map(|(block, g)| {
                        (
                            g.get_id(),
                            ActorName(format!("gate {block} on worker {}", state.args.worker)),
                            AbortAsk::Gate(g.clone()),
                        )
                    })
                    .collect();
                {
                    let reg = state.registry.read().unwrap_or_else(PoisonError::into_inner);
                    for (&(block, expert), e) in &reg.experts {
                        children.push((
                            e.get_id(),
                            ActorName(format!("expert {block}.{expert} on worker {}", state.args.worker)),
                            AbortAsk::Expert(e.clone()),
                        ));
                    }
                    if let Some(t) = &reg.tier {
                        children.push((
                            t.get_id(),
                            ActorName(format!("ledger of worker {}", state.args.worker)),
                            AbortAsk::Ledger(t.clone()),
                        ));
                    }
                }
                // Asked at once, each within half the deadline, which the coordinator's wait for
                // this answer is.
                let deadline = state.args.deadline / 2;
                let mut asks = tokio::task::JoinSet::new();
                for (id, who, child) in children {
                    asks.spawn(async move {
                        let asked = match child {
                            AbortAsk::Gate(g) => {
                                ask(&g, &who, "the abort", deadline, |reply| GateMsg::Abort { reply }).await
                            }
                            AbortAsk::Expert(e) => {
                                ask(&e, &who, "the abort", deadline, |reply| ExpertMsg::Abort { reply }).await
                            }
                            AbortAsk::Ledger(t) => {
                                ask(&t, &who, "the abort", deadline, |reply| LedgerMsg::Abort { reply }).await
                            }
                        };
                        (id, asked)
                    });
                }
                while let Some(joined) = asks.join_next().await {
                    let Ok((id, asked)) = joined else { continue };
                    if let Err(Error::ActorFailed { detail, .. }) = asked {
                        state
                            .child_failed(&myself, id, format!("found failed at the abort: it {detail}"))
                            .await;
                    }
                }
                let r = match &state.lost {
                    Some(lost) => Err(Error::runtime(lost.clone())),
                    None => Ok(()),
                };
                let _ = reply.send(r);
            }
            WorkerMsg::Snapshot { reply } => {
                // A lost worker answers every call with why (its state may be part-way through a
                // step its children did not finish).
                let r = match (&state.lost, ledger(state)) {
                    (Some(lost), _) => Err(Error::runtime(lost.clone())),
                    (None, Ok(t)) => {
                        ask(
                            &t,
                            &ActorName(format!("the ledger of worker {}", state.args.worker)),
                            "a snapshot",
                            state.args.deadline,
                            |reply| LedgerMsg::Snapshot { reply },
                        )
                        .await
                    }
                    (None, Err(e)) => Err(e),
                };
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}

/// Forward packets from the transport to whichever Communicator is running, and the messages of
/// collectives over the data plane to the worker's communicators.
///
/// While the Communicator restarts, a packet is held (and those behind it wait) for up to `hold`:
/// the restart happens only once the worker's step handler returns, which may take a whole dense
/// leg. A packet still undelivered then is dropped, saying so; its requester's deadline reports it.
/// Once the worker itself has stopped (`cell`; a kill skips the stop that ends this task), nothing
/// will restart the Communicator: the pump ends, also while no packet comes (with collectives it
/// holds their transport, which holds a sender of its own inbox: the inbox never closes).
async fn pump(
    mut inbox: Inbox,
    registry: SharedRegistry,
    collectives: Option<Arc<ExpertCollectives>>,
    cell: ractor::ActorCell,
    worker: crate::net::WorkerId,
    hold: Duration,
) {
    loop {
        let mut packet = tokio::select! {
            packet = inbox.recv() => match packet {
                Some(packet) => packet,
                None => return,
            },
            _ = cell.wait(None) => return,
        };
        if let Payload::Collective(_) = &packet.payload {
            if let Some(collectives) = &collectives {
                collectives.deliver(packet);
            }
            continue;
        }
        let (from, started) = (packet.from, tokio::time::Instant::now());
        let mut pause = Duration::from_millis(1);
        loop {
            let comm = registry.read().unwrap_or_else(PoisonError::into_inner).comm.clone();
            let why = match comm.map(|c| c.cast(CommMsg::Incoming(packet))) {
                Some(Ok(())) => break,
                Some(Err(MessagingErr::SendErr(CommMsg::Incoming(p)))) => {
                    packet = p;
                    if !ractor::ACTIVE_STATES.contains(&cell.get_status()) {
                        return;
                    }
                    if started.elapsed() < hold {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(20));
                        continue;
                    }
                    format!("its communicator did not come back within {hold:?}")
                }
                Some(Err(e)) => format!("it could not be handed to the communicator: {e}"),
                None => return,
            };
            crate::say!("semoe: worker {worker} dropped a packet from worker {from}: {why}");
            break;
        }
    }
}

fn ledger(state: &WorkerState) -> Result<ActorRef<LedgerMsg>> {
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
