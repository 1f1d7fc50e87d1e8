//! The Communicator actor: owns a worker's transport endpoint and builds the collectives on it.
//!
//! Outgoing, an `Exchange` sends one request per peer (the fused all-to-all-v: every row bound for
//! any expert a peer hosts travels in one message, with its counts) and waits for every answer, with
//! a deadline; a peer that does not answer in time is named in the error. Incoming, it hands expert
//! rows to the local Expert actors, gradients to the Ledger, parameters to the replica, and answers.
//! When the runtime moves expert rows over collectives (`train.exchange` `sim` or `nccl`), a Gate's
//! `ExpertExchange` goes to the lane's communicator instead ([`super::collectives`]), and this
//! actor serves the rows that arrive there with the same code.

use super::collectives::{ExpertCall, ExpertCollectives};
use super::expert::ExpertMsg;
use super::ledger::LedgerMsg;
use super::placement::Placement;
use super::{ask, ActorName};
use crate::chaos::{FaultPlan, Moment, Target};
use crate::error::{Error, Result};
use crate::model::gpt::Gpt;
use crate::net::StepId;
use crate::net::{Packet, Payload, Segment, Transport, WorkerId};
use crate::storage::tiers::ExpertStore;
use crate::telemetry::metrics as names;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::oneshot;

/// A worker's dense parameters (expert tensors empty), replaced after each commit. Passes hold an
/// `Arc` of the version they started with.
pub type SharedReplica = Arc<Mutex<Arc<Gpt<f32>>>>;

/// The current references of a worker's children (updated by the supervisor on restart).
#[derive(Default)]
pub struct Registry {
    /// Hosted experts by `(block, expert)`.
    pub experts: HashMap<(usize, usize), ActorRef<ExpertMsg>>,
    /// The Ledger.
    pub tier: Option<ActorRef<LedgerMsg>>,
    /// The Communicator.
    pub comm: Option<ActorRef<CommMsg>>,
}

/// The registry, shared.
pub type SharedRegistry = Arc<RwLock<Registry>>;

/// How many of the latest requests a Communicator remembers, to serve a duplicate only once. A
/// worker receives a few requests per peer, block and direction in a step, so this covers many
/// steps.
const SERVED_WINDOW: usize = 16_384;

/// The next request id of this process.
static NEXT_REQUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Messages of the Communicator.
pub enum CommMsg {
    /// Send each `(peer, request)` and answer every peer's reply, in the same order.
    Exchange {
        /// The attempt of the step the exchange belongs to (an injected fault fires at most once
        /// per attempt).
        step: StepId,
        /// The collective, for errors (for example `the layer-1 expert forward of step 7`).
        what: String,
        /// The metric label of the traffic.
        kind: &'static str,
        /// Requests.
        requests: Vec<(WorkerId, Payload)>,
        /// Replies.
        reply: RpcReplyPort<Result<Vec<(WorkerId, Payload)>>>,
    },
    /// One MoE block's exchange of expert rows for one lane: over the transport as an
    /// [`CommMsg::Exchange`], or over the lane's communicator when the runtime exchanges through
    /// collectives ([`super::collectives`]; then also with no requests, as every worker takes part
    /// in every exchange).
    ExpertExchange {
        /// The lane, block, step and direction (boxed: it keeps the message small).
        call: Box<ExpertCall>,
        /// The metric label of the traffic (`dispatch` or `grad_dispatch`).
        kind: &'static str,
        /// Requests (`ExpertForward` or `ExpertBackward`, one per peer at most).
        requests: Vec<(WorkerId, Payload)>,
        /// Each requested peer's `Segments`.
        reply: RpcReplyPort<Result<Vec<(WorkerId, Payload)>>>,
    },
    /// A packet from the transport.
    Incoming(Packet),
    /// Requests whose exchange gave up (deadline): forget them.
    Forget(Vec<u64>),
}

/// What a Communicator is started with.
#[derive(Clone)]
pub struct CommArgs {
    /// The worker.
    pub worker: WorkerId,
    /// The transport endpoint.
    pub transport: Arc<dyn Transport>,
    /// Children to deliver to.
    pub registry: SharedRegistry,
    /// The replica parameters arrive into.
    pub replica: SharedReplica,
    /// The hosted experts' store (told each block's routing as it arrives, to prefetch).
    pub experts: Arc<ExpertStore>,
    /// Deadline of every collective.
    pub deadline: Duration,
    /// Faults to inject.
    pub chaos: FaultPlan,
    /// Bytes sent to each peer, by kind (the run report's traffic matrix).
    pub traffic: Arc<super::traffic::Traffic>,
    /// The communicators expert rows travel through instead of the transport (`train.exchange`
    /// `sim` or `nccl`), shared by every worker of the runtime.
    pub collectives: Option<Arc<ExpertCollectives>>,
    /// The epoch's placement: which worker runs each group and owns each dense tensor, so that a
    /// peer's request is taken only for what that peer computes.
    pub placement: Arc<Placement>,
    /// The step the worker runs next (the steps it has committed): a peer's rows and gradients
    /// are taken only for it, its broadcast only of it or of the step just committed.
    pub next_step: Arc<std::sync::atomic::AtomicU64>,
}

impl CommArgs {
    /// The actor's name.
    pub fn name(&self) -> ActorName {
        ActorName(format!("communicator of worker {}", self.worker))
    }
}

/// The Communicator's state.
pub struct CommState {
    args: CommArgs,
    /// The requests awaiting replies: the worker asked, and where its reply goes.
    pending: HashMap<u64, (WorkerId, oneshot::Sender<Payload>)>,
    /// The requests served lately: a duplicate of one is dropped.
    served: Served,
}

/// The requests a Communicator served lately, by `(sender, id)`, so that none is served twice.
/// (Served twice at once, the second answer could be an error that arrives first: a backward whose
/// forward state the first one already spent.) Only the latest [`SERVED_WINDOW`] are remembered.
#[derive(Default)]
struct Served {
    ids: HashSet<(WorkerId, u64)>,
    /// The same requests in arrival order, the oldest forgotten first.
    order: VecDeque<(WorkerId, u64)>,
}

impl Served {
    /// Remember a request; false if it was served already.
    fn first_time(&mut self, from: WorkerId, id: u64) -> bool {
        if !self.ids.insert((from, id)) {
            return false;
        }
        self.order.push_back((from, id));
        if self.order.len() > SERVED_WINDOW {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }
}

/// The Communicator actor.
pub struct CommActor;

impl Actor for CommActor {
    type Msg = CommMsg;
    type State = CommState;
    type Arguments = CommArgs;

    async fn pre_start(&self, _: ActorRef<CommMsg>, args: CommArgs) -> Result<CommState, ActorProcessingErr> {
        Ok(CommState {
            args,
            pending: HashMap::new(),
            served: Served::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<CommMsg>,
        msg: CommMsg,
        state: &mut CommState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CommMsg::Exchange {
                step,
                what,
                kind,
                requests,
                reply,
            } => start_exchange(myself, state, step, what, kind, requests, reply)?,
            CommMsg::ExpertExchange {
                call,
                kind,
                requests,
                reply,
            } => match state.args.collectives.clone() {
                Some(collectives) => {
                    inject_exchange_fault(state, call.step)?;
                    let args = state.args.clone();
                    tokio::spawn(async move {
                        let _ = reply.send(collectives.exchange(args, *call, kind, requests).await);
                    });
                }
                None => start_exchange(myself, state, call.step, call.what, kind, requests, reply)?,
            },
            CommMsg::Incoming(packet) => {
                if packet.payload.is_reply() {
                    // Only the worker asked answers: a reply with the id of a request to another
                    // worker (a confused or forged peer) is not taken for that worker's answer.
                    if let Entry::Occupied(asked) = state.pending.entry(packet.id) {
                        if asked.get().0 == packet.from {
                            let _ = asked.remove().1.send(packet.payload);
                        }
                    }
                } else if state.served.first_time(packet.from, packet.id) {
                    let args = state.args.clone();
                    tokio::spawn(async move { serve(args, packet).await });
                }
            }
            CommMsg::Forget(ids) => ids.iter().for_each(|id| {
                state.pending.remove(id);
            }),
        }
        Ok(())
    }
}

/// Injected faults strike before anything is sent: the exchange's caller sees the actor fail (its
/// reply port dropped), as after a real failure at that point. A fault fires at most once per
/// attempt of its step (the other lanes' exchanges of the failed attempt, which still reach the
/// restarted actor, do not spend it: `times = 2` fails the replay too).
fn inject_exchange_fault(state: &CommState, step: StepId) -> Result<(), ActorProcessingErr> {
    if state.args.chaos.current_step().is_some() {
        let target = Target::Communicator {
            worker: state.args.worker,
        };
        super::inject(&state.args.chaos, &target, step, Moment::Any, &state.args.name())?;
    }
    Ok(())
}

/// Send each `(peer, request)` over the transport and answer the replies (in a task of its own).
fn start_exchange(
    myself: ActorRef<CommMsg>,
    state: &mut CommState,
    step: StepId,
    what: String,
    kind: &'static str,
    requests: Vec<(WorkerId, Payload)>,
    reply: RpcReplyPort<Result<Vec<(WorkerId, Payload)>>>,
) -> Result<(), ActorProcessingErr> {
    let me = state.args.worker;
    inject_exchange_fault(state, step)?;
    let mut waits = Vec::with_capacity(requests.len());
    for (peer, payload) in requests {
        // Ids are unique in the process, also across restarts of this actor, so that a
        // late reply can never be taken for the answer to a newer request.
        let id = NEXT_REQUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        state.pending.insert(id, (peer, tx));
        count_traffic(&state.args, peer, kind, &payload);
        let sent = state.args.transport.send(Packet {
            from: me,
            to: peer,
            id,
            payload,
        });
        if let Err(e) = sent {
            state.pending.remove(&id);
            for (_, id, _) in &waits {
                state.pending.remove(id);
            }
            let _ = reply.send(Err(e));
            return Ok(());
        }
        waits.push((peer, id, rx));
    }
    let deadline = state.args.deadline;
    tokio::spawn(async move {
        let r = gather(waits, &what, deadline, &myself).await;
        let _ = reply.send(r);
    });
    Ok(())
}

/// Wait for every reply of an exchange, until the deadline. Replies are awaited all at once, so a
/// peer's failure is reported as soon as it arrives, whatever the other peers do.
async fn gather(
    waits: Vec<(WorkerId, u64, oneshot::Receiver<Payload>)>,
    what: &str,
    deadline: Duration,
    comm: &ActorRef<CommMsg>,
) -> Result<Vec<(WorkerId, Payload)>> {
    let until = tokio::time::Instant::now() + deadline;
    let ids: Vec<u64> = waits.iter().map(|(_, id, _)| *id).collect();
    let order: Vec<WorkerId> = waits.iter().map(|(peer, _, _)| *peer).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (peer, _, rx)) in waits.into_iter().enumerate() {
        tasks.spawn(async move { (i, peer, tokio::time::timeout_at(until, rx).await) });
    }
    let mut out: Vec<Option<Payload>> = (0..order.len()).map(|_| None).collect();
    let fail = |e: Error| {
        let _ = comm.cast(CommMsg::Forget(ids.clone()));
        Err(e)
    };
    while let Some(joined) = tasks.join_next().await {
        let (i, peer, r) = match joined {
            Ok(x) => x,
            Err(e) => return fail(Error::runtime(format!("waiting for {what} panicked: {e}"))),
        };
        match r {
            Ok(Ok(Payload::Failed { restartable, detail })) => return fail(failure(peer, restartable, &detail, what)),
            Ok(Ok(payload)) => out[i] = Some(payload),
            Ok(Err(_)) => {
                return fail(Error::ActorFailed {
                    actor: format!("the communicator waiting for worker {peer}"),
                    detail: format!("restarted while waiting for {what}"),
                })
            }
            Err(_) => {
                return fail(Error::Deadline {
                    peer: format!("worker {peer}"),
                    what: what.to_string(),
                    deadline_ms: deadline.as_millis() as u64,
                })
            }
        }
    }
    order
        .into_iter()
        .zip(out)
        .map(|(peer, p)| {
            p.map(|p| (peer, p))
                .ok_or_else(|| Error::runtime(format!("no reply from worker {peer} to {what}")))
        })
        .collect()
}

/// Count `payload`'s bytes to `peer` in the metrics and the run report's traffic matrix.
pub(super) fn count_traffic(args: &CommArgs, peer: WorkerId, kind: &'static str, payload: &Payload) {
    let bytes = payload.data_bytes() as u64;
    metrics::counter!(names::ALLTOALL_BYTES, "from" => args.worker.to_string(), "to" => peer.to_string(), "kind" => kind)
        .increment(bytes);
    args.traffic.add(peer, kind, bytes);
}

/// The error a requester sees when `peer` answered `what` with a failure: an actor failure (the
/// step is replayed) when a restart repairs it.
pub(super) fn failure(peer: WorkerId, restartable: bool, detail: &str, what: &str) -> Error {
    if restartable {
        Error::ActorFailed {
            actor: format!("worker {peer}"),
            detail: format!("{detail} (during {what})"),
        }
    } else {
        Error::runtime(format!("worker {peer} failed {what}: {detail}"))
    }
}

/// Answer one request from a peer.
async fn serve(args: CommArgs, packet: Packet) -> Result<()> {
    let step = match &packet.payload {
        Payload::ExpertForward { step, .. }
        | Payload::ExpertBackward { step, .. }
        | Payload::DenseGrads { step, .. }
        | Payload::Gather { step, .. }
        | Payload::Params { step, .. } => *step,
        _ => StepId::NONE,
    };
    let kind = match &packet.payload {
        Payload::ExpertForward { .. } => "combine",
        Payload::ExpertBackward { .. } => "grad_combine",
        Payload::Gather { .. } => "dense_gather",
        _ => "",
    };
    if args.chaos.silent(args.worker, step.step) {
        return Ok(()); // injected fault: a peer that never answers
    }
    // A request the sender may not make is answered with the refusal (the sender's exchange
    // fails naming it); nothing of it is delivered.
    let next = args.next_step.load(std::sync::atomic::Ordering::Acquire);
    let checked = check_sender(&args.placement, packet.from, &packet.payload)
        .and_then(|()| check_step(next, packet.from, &packet.payload));
    let answer = match checked {
        Ok(()) => answer(&args, packet.payload).await,
        Err(e) => Err(e),
    };
    let answer = answer.unwrap_or_else(|e| Payload::failed(&e));
    if !kind.is_empty() {
        count_traffic(&args, packet.from, kind, &answer);
    }
    args.transport.send(Packet {
        from: args.worker,
        to: packet.from,
        id: packet.id,
        payload: answer,
    })
}

/// Whether `from` may make the request `payload`: rows and gradients only of the groups it runs,
/// parameters only of the dense tensors it owns (in this epoch's placement). The wire checks a
/// packet's shape and the job token its sender; this checks what the sender speaks for. Without
/// it, a confused or forged peer's rows for another worker's group replaced that group's forward
/// state in the experts, its gradient that group's share of a dense gradient in the ledger, and
/// its parameters a tensor's committed values in the replica, each in silence.
pub(super) fn check_sender(placement: &Placement, from: WorkerId, payload: &Payload) -> Result<()> {
    let runs = |group: usize| placement.group_owner.get(group) == Some(&from);
    let refuse = |what: String| {
        Err(Error::runtime(format!(
            "worker {from} sent {what}, which it does not compute in this epoch's placement"
        )))
    };
    match payload {
        Payload::ExpertForward { segments, .. } | Payload::ExpertBackward { segments, .. } => {
            match segments.iter().find(|s| !runs(s.group)) {
                Some(s) => refuse(format!("expert rows of group {}", s.group)),
                None => Ok(()),
            }
        }
        Payload::DenseGrads { group, .. } if !runs(*group) => refuse(format!("group {group}'s dense gradients")),
        Payload::Params { tensors, .. } => {
            match tensors
                .iter()
                .find(|(i, _)| placement.tensor_owner.get(*i) != Some(&from))
            {
                Some((i, _)) => refuse(format!("the committed values of tensor {i}")),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// Whether `payload`, from `from`, is of a step the worker can take it for, `next` being the step
/// it runs next: rows and dense gradients of that step only, a broadcast of it or of the step
/// before (a peer may commit first). Every worker commits a step before the driver starts the
/// next, so a peer is never ahead, and an older step's request is a late copy (a rolled-back
/// attempt's leftovers are of the same step and are left to the ledger and experts to tell).
/// A request of a later step would otherwise make the ledger or an expert adopt that step and
/// refuse the real one's messages as stale, every replay included: the run would fail.
pub(super) fn check_step(next: u64, from: WorkerId, payload: &Payload) -> Result<()> {
    let (step, earliest) = match payload {
        Payload::ExpertForward { step, .. }
        | Payload::ExpertBackward { step, .. }
        | Payload::DenseGrads { step, .. } => (step.step, next),
        Payload::Params { step, .. } => (step.step, next.saturating_sub(1)),
        _ => return Ok(()),
    };
    if step < earliest || step > next {
        return Err(Error::runtime(format!(
            "worker {from} sent a request of step {step}; this worker is at step {next}"
        )));
    }
    Ok(())
}

async fn answer(args: &CommArgs, payload: Payload) -> Result<Payload> {
    match payload {
        Payload::ExpertForward { step, block, segments } => run_experts(args, step, block, segments, true)
            .await
            .map(Payload::Segments),
        Payload::ExpertBackward { step, block, segments } => run_experts(args, step, block, segments, false)
            .await
            .map(Payload::Segments),
        Payload::DenseGrads { step, group, tensors } => {
            let tier = read_registry(&args.registry)
                .tier
                .clone()
                .ok_or_else(|| Error::runtime("the tier is not running"))?;
            let who = ActorName(format!("ledger of worker {}", args.worker));
            ask(&tier, &who, "a gradient delivery", args.deadline, |reply| {
                LedgerMsg::Grads {
                    step,
                    group,
                    tensors,
                    reply,
                }
            })
            .await
            .map(|()| Payload::Ack)
        }
        Payload::Params { tensors, .. } => {
            let mut replica = args.replica.lock().unwrap_or_else(PoisonError::into_inner);
            install_params(Arc::make_mut(&mut replica), &tensors)?;
            Ok(Payload::Ack)
        }
        Payload::Gather { tensors, .. } => {
            // The owner's replica holds its tensors' committed values (installed at each commit).
            let replica = args.replica.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let bufs = replica.tensors();
            tensors
                .into_iter()
                .map(|i| match bufs.get(i) {
                    Some((_, _, values)) if !values.is_empty() => Ok((i, values.to_vec())),
                    Some((name, _, _)) => Err(Error::runtime(format!(
                        "worker {} was asked for tensor {name}, which it does not hold",
                        args.worker
                    ))),
                    None => Err(Error::runtime(format!("a gather of tensor {i}, which the model lacks"))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Payload::Tensors)
        }
        other => Err(Error::runtime(format!("unexpected request {other:?}"))),
    }
}

/// Install a broadcast's committed values of dense tensors into `model` (the replica), after
/// checking every tensor first: a broadcast is taken whole or not at all. (Values that are not
/// finite are installed: an update that overflows is divergence, which the next step's norm
/// reports as such; refused here, it would fail the commit instead.)
fn install_params(model: &mut Gpt<f32>, tensors: &[(usize, Arc<Vec<f32>>)]) -> Result<()> {
    let mut bufs = model.buffers_mut();
    for (i, values) in tensors {
        let buf = bufs
            .get(*i)
            .ok_or_else(|| Error::runtime(format!("parameters for tensor {i}, which the model lacks")))?;
        if buf.len() != values.len() {
            return Err(Error::shape(
                format!("broadcast of tensor {i}"),
                format!("{} values for {} elements", values.len(), buf.len()),
            ));
        }
    }
    for (i, values) in tensors {
        bufs[*i].copy_from_slice(values);
    }
    Ok(())
}

fn read_registry(r: &SharedRegistry) -> std::sync::RwLockReadGuard<'_, Registry> {
    r.read().unwrap_or_else(PoisonError::into_inner)
}

/// Hand each expert its rows (all experts at once) and put the answers back in request order.
pub(super) async fn run_experts(
    args: &CommArgs,
    step: StepId,
    block: usize,
    segments: Vec<Segment>,
    forward: bool,
) -> Result<Vec<Segment>> {
    let order: Vec<(usize, usize, usize)> = segments.iter().map(|s| (s.group, s.expert, s.rows)).collect();
    let mut per_expert: HashMap<usize, Vec<(usize, Vec<f32>)>> = HashMap::new();
    for s in segments {
        per_expert.entry(s.expert).or_default().push((s.group, s.data));
    }
    let mut routed: Vec<usize> = per_expert.keys().copied().collect();
    routed.sort_unstable();
    args.experts.hint(block, routed, forward);
    let mut tasks = tokio::task::JoinSet::new();
    for (expert, items) in per_expert {
        let actor = read_registry(&args.registry)
            .experts
            .get(&(block, expert))
            .cloned()
            .ok_or_else(|| Error::runtime(format!("worker {} does not host expert {block}.{expert}", args.worker)))?;
        let who = ActorName(format!("expert {block}.{expert} on worker {}", args.worker));
        let deadline = args.deadline;
        tasks.spawn(async move {
            let what = format!("the {} of step {step}", if forward { "forward" } else { "backward" });
            let r = ask(&actor, &who, &what, deadline, |reply| {
                if forward {
                    ExpertMsg::Forward { step, items, reply }
                } else {
                    ExpertMsg::Backward { step, items, reply }
                }
            })
            .await;
            (expert, r)
        });
    }
    let mut answers: HashMap<(usize, usize), Vec<f32>> = HashMap::new();
    let mut first_err = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((expert, Ok(rows))) => {
                for (group, data) in rows {
                    answers.insert((group, expert), data);
                }
            }
            Ok((_, Err(e))) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(Error::runtime(format!("an expert call panicked: {e}")));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    order
        .into_iter()
        .map(|(group, expert, rows)| {
            let data = answers
                .remove(&(group, expert))
                .ok_or_else(|| Error::runtime(format!("expert {block}.{expert} gave no rows for group {group}")))?;
            Ok(Segment {
                group,
                expert,
                rows,
                data,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_served_once_and_the_window_is_bounded() {
        let mut served = Served::default();
        assert!(served.first_time(0, 7));
        assert!(!served.first_time(0, 7), "the duplicate is dropped");
        assert!(
            served.first_time(1, 7),
            "the same id from another worker is another request"
        );
        for id in 100..100 + SERVED_WINDOW as u64 {
            assert!(served.first_time(2, id));
        }
        assert_eq!(served.ids.len(), SERVED_WINDOW);
        assert_eq!(served.order.len(), SERVED_WINDOW);
        // The oldest two were forgotten; the newest is still remembered.
        assert!(served.first_time(0, 7));
        assert!(!served.first_time(2, 99 + SERVED_WINDOW as u64));
    }

    /// Two workers, four groups (0 and 2 on worker 0), dense tensor 0 owned by worker 0 and 2 by
    /// worker 1; tensor 1 is an expert tensor (no single owner).
    fn placement() -> Placement {
        Placement {
            workers: 2,
            expert_owner: vec![0, 1],
            group_owner: vec![0, 1, 0, 1],
            tensor_owner: vec![0, usize::MAX, 1],
        }
    }

    fn rows(groups: &[usize]) -> Vec<Segment> {
        groups
            .iter()
            .map(|&group| Segment {
                group,
                expert: 0,
                rows: 1,
                data: vec![0.0; 4],
            })
            .collect()
    }

    #[test]
    fn a_peer_speaks_only_for_its_own_groups_and_tensors() {
        let p = placement();
        let step = StepId::first(3);
        let forward = |groups: &[usize]| Payload::ExpertForward {
            step,
            block: 1,
            segments: rows(groups),
        };
        let backward = |groups: &[usize]| Payload::ExpertBackward {
            step,
            block: 1,
            segments: rows(groups),
        };
        let grads = |group| Payload::DenseGrads {
            step,
            group,
            tensors: vec![(0, vec![1.0])],
        };
        let params = |tensors: &[usize]| Payload::Params {
            step,
            tensors: tensors.iter().map(|&i| (i, Arc::new(vec![1.0]))).collect(),
        };
        let allowed = [
            (0, forward(&[0, 2])),
            (1, backward(&[1, 3])),
            (0, grads(2)),
            (1, grads(1)),
            (0, params(&[0])),
            (1, params(&[2])),
            (1, Payload::Gather { step, tensors: vec![0] }),
        ];
        for (from, payload) in &allowed {
            assert!(check_sender(&p, *from, payload).is_ok(), "{from}: {payload:?}");
        }
        let refused = [
            (1, forward(&[1, 2]), "expert rows of group 2"),
            (0, backward(&[0, 1]), "expert rows of group 1"),
            (0, forward(&[7]), "expert rows of group 7"),
            (1, grads(0), "group 0's dense gradients"),
            (0, grads(4), "group 4's dense gradients"),
            (0, params(&[0, 2]), "tensor 2"),
            (1, params(&[1]), "tensor 1"),
            (1, params(&[9]), "tensor 9"),
        ];
        for (from, payload, what) in &refused {
            let e = check_sender(&p, *from, payload).expect_err(what).to_string();
            assert!(
                e.contains(&format!("worker {from} sent")) && e.contains(what) && e.contains("does not compute"),
                "{e}"
            );
        }
    }

    fn replica() -> Gpt<f32> {
        let config = crate::model::gpt::GptConfig {
            block_size: 8,
            d_model: 16,
            n_layer: 2,
            n_head: 2,
            d_ff: 32,
            experts: 2,
            k: 1,
            ..Default::default()
        };
        Gpt::init(&config, 1).expect("model")
    }

    #[test]
    fn a_broadcast_is_installed_whole_or_not_at_all() {
        let mut model = replica();
        let before: Vec<Vec<f32>> = model.buffers_mut().iter().map(|b| b.to_vec()).collect();
        let (a, b) = (0, 1);
        let (len_a, len_b) = (before[a].len(), before[b].len());
        let good = |i: usize, len: usize| (i, Arc::new(vec![0.5f32; len]));
        // The second tensor is bad in each case: the first must not be installed either.
        let cases = [
            (vec![good(a, len_a), good(b, len_b + 1)], "elements"),
            (vec![good(a, len_a), good(before.len(), 1)], "which the model lacks"),
        ];
        for (tensors, what) in cases {
            let e = install_params(&mut model, &tensors).expect_err(what).to_string();
            assert!(e.contains(what), "{what}: {e}");
            let now: Vec<Vec<f32>> = model.buffers_mut().iter().map(|b| b.to_vec()).collect();
            assert_eq!(now.len(), before.len());
            assert!(now == before, "{what}: a refused broadcast changed the replica");
        }
        install_params(&mut model, &[good(a, len_a), good(b, len_b)]).expect("a good broadcast");
        let now = model.buffers_mut();
        assert!(now[a].iter().chain(now[b].iter()).all(|&v| v == 0.5));
        assert_eq!(now[a].len(), len_a);
        drop(now);
        // Values that are not finite are divergence, left to the next step's norm to report.
        install_params(&mut model, &[(b, Arc::new(vec![f32::NAN; len_b]))]).expect("installed");
        assert!(model.buffers_mut()[b].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn a_peer_s_work_is_taken_only_for_the_step_this_worker_runs() {
        let at = |step: u64, attempt: u32| StepId { step, attempt };
        let forward = |step| Payload::ExpertForward {
            step,
            block: 0,
            segments: rows(&[1]),
        };
        let backward = |step| Payload::ExpertBackward {
            step,
            block: 0,
            segments: rows(&[1]),
        };
        let grads = |step| Payload::DenseGrads {
            step,
            group: 1,
            tensors: vec![(0, vec![1.0])],
        };
        let params = |step| Payload::Params {
            step,
            tensors: vec![(2, Arc::new(vec![1.0]))],
        };
        // The worker runs step 7 next.
        for ok in [
            forward(at(7, 0)),
            backward(at(7, 2)),
            grads(at(7, 1)),
            params(at(7, 0)),
            params(at(6, 0)),
            Payload::Gather {
                step: at(9, 0),
                tensors: vec![0],
            },
            Payload::Ack,
        ] {
            assert!(check_step(7, 1, &ok).is_ok(), "{ok:?}");
        }
        for (bad, step) in [
            (forward(at(8, 0)), 8),
            (forward(at(u64::MAX, 0)), u64::MAX),
            (backward(at(6, 3)), 6),
            (grads(at(1_000_000, 0)), 1_000_000),
            (params(at(5, 0)), 5),
            (params(at(8, 0)), 8),
        ] {
            let e = check_step(7, 1, &bad).expect_err("refused").to_string();
            assert!(
                e.contains(&format!("worker 1 sent a request of step {step};")) && e.contains("at step 7"),
                "{e}"
            );
        }
        // Before the first commit: step 0 only, its broadcast included.
        assert!(check_step(0, 1, &params(at(0, 0))).is_ok());
        assert!(check_step(0, 1, &forward(at(1, 0))).is_err());
    }
}
