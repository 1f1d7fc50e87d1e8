//! The expert exchange over collectives in NCCL's model: what the runtime's workers use instead of
//! the transport's requests and replies when `train.exchange` is `sim` (the CPU stand-in:
//! `net::collective::sim` between in-process workers, `net::collective::plane` over the data plane
//! between worker processes, one rank per process) or `nccl` (`NcclCollective`, in-process worker
//! `i` on GPU `i`).
//!
//! NCCL needs every rank to issue the same collectives in the same order, while a worker's lanes
//! reach their MoE blocks in whatever order the compute allows. So each lane has its own
//! communicator (lane `l` of every worker are the ranks of communicator `l`), and within a lane the
//! order is fixed: the MoE blocks ascending forward, then descending backward. Every worker takes
//! part in every exchange of every lane, with empty buffers where it has nothing to send, also in
//! lanes where it has no groups and when it has no groups at all (it still hosts experts).
//!
//! One exchange is two all-to-all-v's of encoded packets (`net::wire`, checked on arrival like any
//! packet between processes): the **dispatch** (to each peer, the `ExpertForward` or
//! `ExpertBackward` request for the experts it hosts) and the **return** (to each requester, the
//! `Segments` its experts answered, or `Failed`). Between the two, each worker runs its experts on
//! what it received, as it serves a request from the transport. The bits are those of the
//! transport: the collectives only move bytes, and the Gate puts the answered rows back in
//! canonical order.
//!
//! A failure anywhere (an expert's, a decode's, a deadline) aborts every communicator of the
//! generation, so that no rank waits for a peer that will not come; the others' errors then take
//! the kind of the first (a failed actor: the step is replayed, and the replay builds new
//! communicators, as NCCL cannot resume a communicator whose sequence broke). Between worker
//! processes the first failure is also told to every peer (a `Collective` packet of kind abort),
//! and a generation is named by the step whose exchange built it, which every process agrees on.

use super::communicator::{check_sender, count_traffic, failure, run_experts, CommArgs};
use crate::config::{ExpertExchange, TrainConfig};
use crate::error::{Error, Result};
use crate::kernels::cuda::CudaDevice;
use crate::net::collective::alltoallv::AllToAllV;
use crate::net::collective::plane::{AbortNotice, Mailbox, PlaneCollective, PlaneMsg, PlaneOp};
use crate::net::collective::sim::SimCollective;
use crate::net::collective::{nccl_unique_id, AbortHandle, Collective, NcclCollective, NCCL_ID_BYTES};
use crate::net::wire::{clip_detail, decode_packet, encode_packet, PacketShape};
use crate::net::{Packet, Payload, Segment, StepId, Transport, WorkerId};
use crate::telemetry::metrics as names;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// One rank's end of one lane's communicator. A lane's exchanges run one after another, so the
/// lock is never contended; it only lets the blocking calls run on tokio's blocking threads.
type Endpoint = Arc<Mutex<Box<dyn Collective>>>;

/// One MoE block's exchange of one lane, as the Gate asks for it.
#[derive(Clone, Debug)]
pub struct ExpertCall {
    /// The lane (`0..lanes`), which picks the communicator.
    pub lane: usize,
    /// The step.
    pub step: StepId,
    /// The MoE block (its layer index).
    pub block: usize,
    /// Forward (expert inputs) or backward (gradients of expert outputs).
    pub forward: bool,
    /// The exchange, for errors (for example `the block-1 expert forward of step 7`).
    pub what: String,
}

/// The communicators of one generation: built together, aborted together.
#[derive(Default)]
struct Generation {
    /// Counts the generations built (the communicators' epoch).
    number: u64,
    /// The step whose exchange built this generation.
    built_for: Option<StepId>,
    /// The step during which it was aborted: exchanges of that step (and earlier) fail at once,
    /// the first of a later step builds the next generation.
    broken_at: Option<StepId>,
    /// Why it was aborted first, and whether a replay repairs that: the errors the abort causes on
    /// the other ranks take its kind, so that one failed actor does not end the run because its
    /// peers saw their communicator aborted.
    cause: Option<(bool, String)>,
    /// A rank is building the next generation (outside the lock); the others wait for it.
    building: bool,
    /// Closed for good ([`ExpertCollectives::close`]): no generation is built any more.
    closed: Option<String>,
    /// The latest step this worker itself reached an exchange of, or aborted: a peer's abort
    /// notice may be for the next step at most (the coordinator starts a step only when every
    /// worker committed the one before).
    latest: Option<StepId>,
    /// `[lane][worker]` in process; `[lane][0]`, this worker's, between processes.
    endpoints: Vec<Vec<Endpoint>>,
    aborts: Vec<AbortHandle>,
}

/// One communicator id per lane, for the next generation a worker process builds: NCCL's unique
/// ids (`nccl_unique_id`) or, for the stand-in, random bytes, made by the coordinator and given to
/// every member alike (with an epoch's setup, and with the first step after an abort).
pub type CommIds = Vec<[u8; NCCL_ID_BYTES]>;

/// Between worker processes: this worker's end of the data plane its communicators use.
struct Plane {
    me: WorkerId,
    transport: Arc<dyn Transport>,
    mailbox: Arc<Mailbox>,
    /// The ids the coordinator gave for the next generation, taken by its build.
    ids: Mutex<Option<CommIds>>,
    /// The GPU of this process's NCCL ranks.
    gpu: usize,
}

/// The lanes of an exchange over collectives of `kind` among `placement`'s workers, `wanted` at
/// most: the same on every worker (each lane is a communicator), no more than the most groups a
/// worker runs; between GPUs over NCCL one (kernels of several NCCL communicators on the same GPUs
/// can wait for each other in different orders on different GPUs: NCCL's caveat on concurrent
/// communicators).
pub fn exchange_lanes(kind: ExpertExchange, placement: &crate::actors::Placement, wanted: usize) -> usize {
    if kind == ExpertExchange::Nccl && placement.workers > 1 {
        return 1;
    }
    let most_groups = (0..placement.workers)
        .map(|w| placement.groups_of(w).len())
        .max()
        .unwrap_or(0);
    wanted.min(most_groups).max(1)
}

/// Every lane's communicator for every worker of an in-process runtime, or for the one worker of a
/// worker process ([`ExpertCollectives::over_transport`]), rebuilt after a failure.
pub struct ExpertCollectives {
    kind: ExpertExchange,
    world: usize,
    /// Set between worker processes: the communicators are this worker's ends over the data plane.
    plane: Option<Plane>,
    lanes: usize,
    deadline: Duration,
    shape: PacketShape,
    scheduler: AllToAllV,
    generation: Mutex<Generation>,
    /// Signalled when a generation has been built (or its build failed).
    built: Condvar,
}

impl std::fmt::Debug for ExpertCollectives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertCollectives")
            .field("kind", &self.kind)
            .field("world", &self.world)
            .field("lanes", &self.lanes)
            .finish()
    }
}

impl ExpertCollectives {
    /// Communicators of `kind` for `world` workers running `config`, `lanes` per worker, each
    /// collective bounded by `deadline`. A collective waits for every rank to arrive, so its
    /// deadline covers the workers' difference in compute between two exchanges, not only the
    /// transfer: the runtime gives it half the step's deadline. Nothing is built until the first
    /// exchange.
    pub fn new(
        kind: ExpertExchange,
        config: &TrainConfig,
        world: usize,
        lanes: usize,
        deadline: Duration,
    ) -> Result<Self> {
        Self::with_gpus(kind, config, world, lanes, deadline, world)
    }

    /// [`ExpertCollectives::new`], with `gpus` GPUs needed in this process over NCCL.
    fn with_gpus(
        kind: ExpertExchange,
        config: &TrainConfig,
        world: usize,
        lanes: usize,
        deadline: Duration,
        gpus: usize,
    ) -> Result<Self> {
        if kind == ExpertExchange::Transport {
            return Err(Error::config(
                "the transport exchange needs no communicators (train.exchange = \"transport\")",
            ));
        }
        if lanes == 0 || world == 0 {
            return Err(Error::config(format!(
                "an exchange over collectives needs a worker and a lane ({world} workers, {lanes} lanes)"
            )));
        }
        let shape = PacketShape::of(config, world)?;
        let scheduler = AllToAllV::new(shape.max_packet_bytes());
        let mut lanes = lanes;
        if kind == ExpertExchange::Nccl {
            // Say now, not at the first exchange, when NCCL or the GPUs are missing.
            nccl_unique_id().map_err(|e| Error::config(format!("train.exchange = \"nccl\": {e}")))?;
            let visible =
                CudaDevice::visible().map_err(|e| Error::config(format!("train.exchange = \"nccl\": {e}")))?;
            if visible < gpus {
                return Err(Error::config(if gpus == world {
                    format!("train.exchange = \"nccl\" puts worker i on GPU i: {world} worker(s) need as many GPUs, {visible} visible")
                } else {
                    format!(
                        "train.exchange = \"nccl\" on GPU {}: {visible} GPU(s) visible",
                        gpus - 1
                    )
                }));
            }
            // Kernels of several NCCL communicators on the same GPUs can wait for each other in
            // different orders on different GPUs (NCCL's caveat on concurrent communicators):
            // between GPUs, one lane.
            if world > 1 {
                lanes = 1;
            }
        }
        Ok(ExpertCollectives {
            kind,
            world,
            plane: None,
            lanes,
            deadline,
            shape,
            scheduler,
            generation: Mutex::new(Generation::default()),
            built: Condvar::new(),
        })
    }

    /// The communicators of one worker process, `transport.id()` among `transport.workers()`,
    /// over its data plane: the CPU stand-in across processes (`net::collective::plane`), for
    /// `train.exchange = "sim"` with worker processes. Every worker process of the epoch builds its
    /// own, with the same `lanes`; the packets of kind `Collective` that reach the worker go to
    /// [`ExpertCollectives::deliver`].
    ///
    /// Each generation is built from the ids the coordinator gave ([`ExpertCollectives::give_ids`]):
    /// the stand-in's messages carry them, and refuse a peer that got others; over NCCL (`kind`
    /// `Nccl`, this process's ranks on GPU `gpu`) they are NCCL's unique ids.
    pub fn over_transport(
        kind: ExpertExchange,
        config: &TrainConfig,
        transport: Arc<dyn Transport>,
        lanes: usize,
        deadline: Duration,
        gpu: usize,
    ) -> Result<Self> {
        let (me, world) = (transport.id(), transport.workers());
        let mut collectives = ExpertCollectives::with_gpus(kind, config, world, lanes, deadline, gpu + 1)?;
        // A peer is at most one collective ahead per lane: room for a few of its largest messages.
        let budget = collectives
            .shape
            .max_packet_bytes()
            .saturating_mul(4 * collectives.lanes + 4);
        collectives.plane = Some(Plane {
            me,
            transport,
            mailbox: Mailbox::with_budget(world, budget),
            ids: Mutex::new(None),
            gpu,
        });
        Ok(collectives)
    }

    /// The ids of the next generation's communicators, one per lane, from the coordinator (they
    /// replace any not used yet). In process, there is nothing to give: refused.
    pub fn give_ids(&self, ids: CommIds) -> Result<()> {
        let plane = self
            .plane
            .as_ref()
            .ok_or_else(|| Error::runtime("in-process communicators make their own ids"))?;
        if ids.len() != self.lanes {
            return Err(Error::protocol(
                "the coordinator",
                format!("{} communicator ids for {} lanes", ids.len(), self.lanes),
            ));
        }
        *plane.ids.lock().unwrap_or_else(PoisonError::into_inner) = Some(ids);
        Ok(())
    }

    /// A packet of kind `Collective` that reached this worker (from its packet pump): queued for
    /// its communicator, or, when a peer announces that it aborted, the abort applied here too (so
    /// that this worker's pending collectives fail at once, with the peer's failure as their cause).
    pub fn deliver(&self, packet: Packet) {
        let (Some(plane), Payload::Collective(msg)) = (&self.plane, packet.payload) else {
            return;
        };
        if let Some(AbortNotice {
            from,
            step,
            restartable,
            reason,
        }) = plane.mailbox.deliver(packet.from, msg)
        {
            let latest = self.lock().latest;
            if let Some(latest) = latest.filter(|latest| step.step > latest.step + 1) {
                // A notice no peer can send: ignored rather than failing the epoch's later steps.
                crate::say!(
                    "semoe worker: worker {from}'s abort notice for step {step} ignored: this worker is at step {latest}"
                );
                return;
            }
            self.abort_here(step, &format!("worker {from} aborted: {reason}"), restartable);
        }
    }

    /// The membership epoch is over, or a peer was lost: every pending and later collective of
    /// this worker fails at once with `reason` (a worker process's communicators end with its
    /// epoch's actor tree).
    pub fn close(&self, reason: &str) {
        if let Some(plane) = &self.plane {
            plane.mailbox.close(reason);
        }
        let mut g = self.lock();
        g.closed.get_or_insert_with(|| reason.to_string());
        for handle in &g.aborts {
            handle.abort(reason);
        }
        // Ranks waiting for a generation being built see the close at once.
        self.built.notify_all();
    }

    /// Lanes per worker: the same on every worker, also where a worker has fewer groups.
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// How long one exchange may take: the first collective waits for the slowest worker to
    /// reach the block (its dense compute, up to the collectives' deadline), the return for the
    /// experts (`expert_deadline`), plus as much again as slack. The calls that wait for an
    /// exchange wait this long, so that the collective's own deadline, which names the rank that
    /// did not come, fires first.
    pub fn exchange_bound(&self, expert_deadline: Duration) -> Duration {
        self.deadline + expert_deadline * 2
    }

    /// How many generations of communicators were built so far (one, plus one per replay after
    /// an aborted exchange).
    pub fn generations(&self) -> u64 {
        self.lock().number
    }

    fn lock(&self) -> MutexGuard<'_, Generation> {
        self.generation.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Abort every communicator of the current generation, because of a failure during `step`
    /// (`restartable`: one a replay repairs): every pending and later collective of that step
    /// fails at once, and the next step (or attempt) builds new ones. A failure of a step older
    /// than the generation is ignored (its communicators are gone already).
    ///
    /// Between worker processes the peers are told (a `Collective` packet of kind abort), the
    /// first time a step breaks here, so that none waits for this worker until its deadline.
    pub fn abort(&self, step: StepId, reason: &str, restartable: bool) {
        {
            let mut g = self.lock();
            g.latest = g.latest.max(Some(step));
        }
        if !self.abort_here(step, reason, restartable) {
            return;
        }
        if let Some(plane) = &self.plane {
            let reason = clip_detail(reason.to_string());
            for peer in (0..self.world).filter(|&p| p != plane.me) {
                // A peer that cannot be reached is gone already: nothing waits on it.
                let _ = plane.transport.send(Packet {
                    from: plane.me,
                    to: peer,
                    id: 0,
                    payload: Payload::Collective(PlaneMsg {
                        lane: 0,
                        generation: step,
                        comm: 0,
                        index: 0,
                        op: PlaneOp::Abort {
                            step,
                            restartable,
                            reason: reason.clone(),
                        },
                    }),
                });
            }
        }
    }

    /// [`ExpertCollectives::abort`] on this process's communicators only; true when this broke a
    /// step that had not broken before.
    fn abort_here(&self, step: StepId, reason: &str, restartable: bool) -> bool {
        let mut g = self.lock();
        // (With no generation built yet, the failure came before the first exchange: its peers
        // must not build one and wait for it.)
        if g.built_for.is_some_and(|built| built > step) {
            return false;
        }
        let first = g.broken_at.is_none_or(|at| at < step);
        // The first failure of a step is its cause (a cause left from an earlier step is stale).
        if first || g.cause.is_none() {
            g.cause = Some((restartable, reason.to_string()));
        }
        g.broken_at = Some(g.broken_at.map_or(step, |at| at.max(step)));
        for handle in &g.aborts {
            handle.abort(reason);
        }
        first
    }

    /// `error`, met in an exchange of `step`: when the generation was aborted during that step
    /// by someone else's failure, this rank's error is a consequence, of the cause's kind; else
    /// this rank is the first to fail, and aborts the others.
    fn consequence_or_abort(&self, call: &ExpertCall, worker: WorkerId, error: Error) -> Error {
        let (step, what) = (call.step, call.what.as_str());
        let cause = {
            let g = self.lock();
            match (&g.cause, g.broken_at) {
                (Some(cause), Some(broken)) if broken >= step => Some(cause.clone()),
                _ => None,
            }
        };
        match cause {
            Some((restartable, reason)) if matches!(error, Error::Collective { .. } | Error::Deadline { .. }) => {
                if restartable {
                    Error::ActorFailed {
                        actor: format!("the exchange of worker {worker}"),
                        detail: format!("{what} was aborted: {reason}"),
                    }
                } else {
                    Error::runtime(format!("{what} on worker {worker} was aborted: {reason}"))
                }
            }
            _ => {
                self.abort(
                    step,
                    &format!("worker {worker} failed {what}: {error}"),
                    error.is_restartable(),
                );
                // The collectives count ranks and sequence numbers: say which exchange it was.
                let context = format!("{what}, lane {}", call.lane);
                match error {
                    Error::Collective {
                        collective,
                        rank,
                        detail,
                    } => Error::Collective {
                        collective: format!("{collective} ({context})"),
                        rank,
                        detail,
                    },
                    Error::Deadline {
                        peer,
                        what,
                        deadline_ms,
                    } => Error::Deadline {
                        peer,
                        what: format!("{what} ({context})"),
                        deadline_ms,
                    },
                    other => other,
                }
            }
        }
    }

    /// `worker`'s end of `lane`'s communicator for `step`, building a generation when there is
    /// none yet or the last one broke before `step`. Blocking (NCCL initialises here).
    fn endpoint(&self, step: StepId, worker: WorkerId, lane: usize) -> Result<Endpoint> {
        let mut g = self.lock();
        g.latest = g.latest.max(Some(step));
        loop {
            if let Some(reason) = &g.closed {
                return Err(Error::collective(
                    format!("the lane communicators of step {step}"),
                    worker,
                    format!("closed: {reason}"),
                ));
            }
            if let Some(built) = g.built_for.filter(|built| step < *built) {
                return Err(Error::runtime(format!(
                    "an expert exchange of step {step}, after the communicators were rebuilt for step {built}"
                )));
            }
            if let Some(broken) = g.broken_at.filter(|broken| step <= *broken) {
                let reason = g.cause.as_ref().map_or("", |(_, reason)| reason.as_str());
                return Err(Error::collective(
                    format!("the lane communicators of step {broken}"),
                    worker,
                    format!("aborted: {reason}"),
                ));
            }
            if g.building {
                g = self.built.wait(g).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            if g.built_for.is_some() && g.broken_at.is_none() {
                let rank = match &self.plane {
                    Some(plane) if plane.me == worker => Some(0),
                    Some(_) => None,
                    None => Some(worker),
                };
                return rank
                    .and_then(|rank| g.endpoints.get(lane).and_then(|ranks| ranks.get(rank)))
                    .cloned()
                    .ok_or_else(|| {
                        Error::runtime(format!(
                            "no communicator for lane {lane} of worker {worker} ({} lanes, {} workers)",
                            self.lanes, self.world
                        ))
                    });
            }
            // Build the next generation without holding the lock (NCCL's initialisation can take
            // up to the deadline, and `abort` is called from async code); the other ranks wait.
            g.building = true;
            let number = g.number + 1;
            drop(g);
            // A panic while building (a driver's) must not leave `building` set: every later
            // exchange on this worker would wait for a generation that never comes.
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.build(number, step)))
                .unwrap_or_else(|p| {
                    Err(Error::runtime(format!(
                        "building the communicators of step {step} panicked: {}",
                        super::panic_text(&p)
                    )))
                });
            g = self.lock();
            g.building = false;
            self.built.notify_all();
            let (endpoints, aborts) = built?;
            metrics::counter!(names::COMMUNICATOR_GENERATIONS).increment(1);
            // An abort of this step (or a later one) while building: born aborted.
            let aborted = g.broken_at.filter(|broken| *broken >= step);
            if aborted.is_some() {
                let reason = g.cause.as_ref().map_or(String::new(), |(_, r)| r.clone());
                for handle in &aborts {
                    handle.abort(&reason);
                }
            }
            if aborted.is_none() {
                g.cause = None;
            }
            if let Some(reason) = &g.closed {
                // Closed while building: born closed.
                for handle in &aborts {
                    handle.abort(reason);
                }
            }
            // (`closed` and `latest` are the worker's, not the generation's: they stay.)
            g.number = number;
            g.built_for = Some(step);
            g.broken_at = aborted;
            g.endpoints = endpoints;
            g.aborts = aborts;
        }
    }

    /// Every lane's communicator, epoch `epoch`, for the exchanges from `step` on: all ranks in
    /// process, this worker's between processes. (Between processes each rank counts its
    /// generations on its own, so there the communicators are named by `step`, which every rank
    /// agrees on.)
    fn build(&self, epoch: u64, step: StepId) -> Result<(Vec<Vec<Endpoint>>, Vec<AbortHandle>)> {
        let mut endpoints = Vec::with_capacity(self.lanes);
        let mut aborts = Vec::new();
        if let Some(plane) = &self.plane {
            let ids = plane.ids.lock().unwrap_or_else(PoisonError::into_inner).take();
            let ids = ids.ok_or_else(|| {
                Error::runtime(format!(
                    "worker {} has no communicator ids for the exchanges of step {step}: the coordinator gives them with an epoch's setup and with the first step after an abort",
                    plane.me
                ))
            })?;
            for (lane, id) in ids.iter().enumerate() {
                let comm: Box<dyn Collective> = match self.kind {
                    ExpertExchange::Nccl => Box::new(
                        NcclCollective::new(plane.gpu, plane.me, self.world, step.step, *id, self.deadline).map_err(
                            |e| Error::runtime(format!("cannot build lane {lane}'s NCCL communicator: {e}")),
                        )?,
                    ),
                    _ => Box::new(PlaneCollective::new(
                        plane.transport.clone(),
                        plane.mailbox.clone(),
                        lane,
                        step,
                        id,
                        step.step,
                        self.deadline,
                    )?),
                };
                aborts.push(comm.abort_handle());
                endpoints.push(vec![Arc::new(Mutex::new(comm))]);
            }
            return Ok((endpoints, aborts));
        }
        for lane in 0..self.lanes {
            let ranks: Vec<Box<dyn Collective>> = match self.kind {
                ExpertExchange::Sim => SimCollective::communicator(self.world, epoch, self.deadline)?
                    .into_iter()
                    .map(|c| Box::new(c) as Box<dyn Collective>)
                    .collect(),
                ExpertExchange::Nccl => self
                    .nccl_ranks(epoch)
                    .map_err(|e| Error::runtime(format!("cannot build lane {lane}'s NCCL communicator: {e}")))?,
                ExpertExchange::Transport => return Err(Error::runtime("the transport exchange has no communicators")),
            };
            aborts.extend(ranks.iter().map(|c| c.abort_handle()));
            endpoints.push(ranks.into_iter().map(|c| Arc::new(Mutex::new(c))).collect());
        }
        Ok((endpoints, aborts))
    }

    /// The NCCL ranks of one communicator, rank `i` on GPU `i`: each initialises on its own thread
    /// at once (NCCL's initialisation waits for every rank).
    fn nccl_ranks(&self, epoch: u64) -> Result<Vec<Box<dyn Collective>>> {
        let id = nccl_unique_id()?;
        let (world, deadline) = (self.world, self.deadline);
        let started: Vec<Result<NcclCollective>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..world)
                .map(|rank| scope.spawn(move || NcclCollective::new(rank, rank, world, epoch, id, deadline)))
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(Error::runtime("an NCCL rank's initialisation panicked")))
                })
                .collect()
        });
        started
            .into_iter()
            .map(|r| r.map(|c| Box::new(c) as Box<dyn Collective>))
            .collect()
    }

    /// Run one exchange of `args.worker`: dispatch `requests` (`(peer, ExpertForward or
    /// ExpertBackward)`), serve what the peers sent with this worker's experts, return the
    /// answers; answer each requested peer's `Segments`. Any failure aborts the generation.
    pub(super) async fn exchange(
        self: Arc<Self>,
        args: CommArgs,
        call: ExpertCall,
        kind: &'static str,
        requests: Vec<(WorkerId, Payload)>,
    ) -> Result<Vec<(WorkerId, Payload)>> {
        self.clone()
            .exchange_once(&args, &call, kind, requests)
            .await
            .map_err(|e| self.consequence_or_abort(&call, args.worker, e))
    }

    async fn exchange_once(
        self: Arc<Self>,
        args: &CommArgs,
        call: &ExpertCall,
        kind: &'static str,
        requests: Vec<(WorkerId, Payload)>,
    ) -> Result<Vec<(WorkerId, Payload)>> {
        let (me, world, what) = (args.worker, self.world, call.what.clone());
        let mut requested = vec![false; world];
        let mut packets = Vec::with_capacity(requests.len());
        for (peer, payload) in requests {
            if peer >= world || std::mem::replace(&mut requested[peer], true) {
                return Err(Error::runtime(format!(
                    "{what}: a second request to worker {peer}, or one beyond the {world} workers"
                )));
            }
            count_traffic(args, peer, kind, &payload);
            packets.push(Packet {
                from: me,
                to: peer,
                id: 0,
                payload,
            });
        }

        // The dispatch.
        let this = self.clone();
        let (lane, step) = (call.lane, call.step);
        let (endpoint, epoch, received) = blocking(move || {
            let endpoint = this.endpoint(step, me, lane)?;
            let mut comm = endpoint.lock().unwrap_or_else(PoisonError::into_inner);
            let epoch = comm.epoch();
            let sends = encode_all(epoch, world, &packets)?;
            let received = this.scheduler.exchange(&mut **comm, sends)?;
            drop(comm);
            Ok((endpoint, epoch, received))
        })
        .await?;

        // Serve every peer's request with this worker's experts, all at once.
        let mut tasks = tokio::task::JoinSet::new();
        for (peer, bytes) in received.into_iter().enumerate() {
            if bytes.is_empty() {
                continue;
            }
            let segments = self.request_from(peer, me, epoch, call, &bytes, &args.placement)?;
            let (args, (step, block, forward)) = (args.clone(), (call.step, call.block, call.forward));
            tasks.spawn(async move { (peer, run_experts(&args, step, block, segments, forward).await) });
        }
        let mut answers = Vec::with_capacity(tasks.len());
        while let Some(joined) = tasks.join_next().await {
            let (peer, served) = joined.map_err(|e| Error::runtime(format!("serving {what} panicked: {e}")))?;
            let payload = match served {
                Ok(segments) => Payload::Segments(segments),
                Err(e) => Payload::failed(&e),
            };
            count_traffic(args, peer, answer_kind(call.forward), &payload);
            answers.push(Packet {
                from: me,
                to: peer,
                id: 0,
                payload,
            });
        }
        if args.chaos.silent(me, call.step.step) {
            // Injected fault: a worker that hangs. Its peers wait for the return until their
            // deadline, as for a real hung peer; its own return then finds the generation aborted.
            tokio::time::sleep(self.deadline).await;
        }

        // The return.
        let this = self.clone();
        let replies = blocking(move || {
            let mut comm = endpoint.lock().unwrap_or_else(PoisonError::into_inner);
            let sends = encode_all(epoch, world, &answers)?;
            this.scheduler.exchange(&mut **comm, sends)
        })
        .await?;
        let mut out = Vec::new();
        for (peer, bytes) in replies.into_iter().enumerate() {
            match (requested[peer], bytes.is_empty()) {
                (false, true) => {}
                (false, false) => {
                    return Err(Error::runtime(format!(
                        "worker {peer} answered {what}, but worker {me} sent it no request"
                    )))
                }
                (true, true) => return Err(Error::runtime(format!("worker {peer} sent no answer to {what}"))),
                (true, false) => {
                    let packet = self.packet_from(peer, me, epoch, &what, &bytes)?;
                    match packet.payload {
                        Payload::Segments(segments) => out.push((peer, Payload::Segments(segments))),
                        Payload::Failed { restartable, detail } => {
                            return Err(failure(peer, restartable, &detail, &what))
                        }
                        other => {
                            return Err(Error::runtime(format!(
                                "worker {peer} answered {what} with {}",
                                payload_name(&other)
                            )))
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The packet `peer` sent `me`, decoded and checked against the shape and the addresses.
    fn packet_from(&self, peer: WorkerId, me: WorkerId, epoch: u64, what: &str, bytes: &[u8]) -> Result<Packet> {
        let packet = decode_packet(bytes, epoch, &self.shape)
            .map_err(|e| Error::runtime(format!("worker {peer}'s bytes in {what}: {e}")))?;
        if packet.from != peer || packet.to != me {
            return Err(Error::runtime(format!(
                "{what}: the packet from rank {peer} to rank {me} says it is from worker {} to worker {}",
                packet.from, packet.to
            )));
        }
        Ok(packet)
    }

    /// The segments of `peer`'s request in this exchange, refused if it is another step, block or
    /// direction (its lane's sequence broke: a defect), or rows of a group `peer` does not run in
    /// `placement` (as over the transport: [`check_sender`]).
    fn request_from(
        &self,
        peer: WorkerId,
        me: WorkerId,
        epoch: u64,
        call: &ExpertCall,
        bytes: &[u8],
        placement: &crate::actors::Placement,
    ) -> Result<Vec<Segment>> {
        let packet = self.packet_from(peer, me, epoch, &call.what, bytes)?;
        check_sender(placement, peer, &packet.payload).map_err(|e| Error::runtime(format!("{}: {e}", call.what)))?;
        match packet.payload {
            Payload::ExpertForward { step, block, segments }
                if call.forward && step == call.step && block == call.block =>
            {
                Ok(segments)
            }
            Payload::ExpertBackward { step, block, segments }
                if !call.forward && step == call.step && block == call.block =>
            {
                Ok(segments)
            }
            other => Err(Error::runtime(format!(
                "{}: worker {peer} sent {} in its place (lane {} out of step)",
                call.what,
                payload_name(&other),
                call.lane
            ))),
        }
    }
}

/// Run blocking collective work on tokio's blocking threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::runtime(format!("a collective's thread panicked: {e}")))?
}

/// One buffer per rank: the encoded packet to it, or nothing.
fn encode_all(epoch: u64, world: usize, packets: &[Packet]) -> Result<Vec<Vec<u8>>> {
    let mut sends = vec![Vec::new(); world];
    for packet in packets {
        let slot = sends
            .get_mut(packet.to)
            .ok_or_else(|| Error::runtime(format!("a packet for worker {}, beyond the {world}", packet.to)))?;
        *slot = encode_packet(epoch, packet)?;
    }
    Ok(sends)
}

/// The metric label of the answers to a dispatch (`dispatch` -> `combine`).
fn answer_kind(forward: bool) -> &'static str {
    if forward {
        "combine"
    } else {
        "grad_combine"
    }
}

/// A payload's kind, for errors.
fn payload_name(payload: &Payload) -> &'static str {
    match payload {
        Payload::ExpertForward { .. } => "an expert forward",
        Payload::ExpertBackward { .. } => "an expert backward",
        Payload::DenseGrads { .. } => "dense gradients",
        Payload::Params { .. } => "parameters",
        Payload::Gather { .. } => "a gather",
        Payload::Segments(_) => "expert rows",
        Payload::Tensors(_) => "tensors",
        Payload::Ack => "an acknowledgement",
        Payload::Failed { .. } => "a failure",
        Payload::Collective(_) => "a collective's message",
    }
}

/// The communicators of worker processes, over in-process transports with a pump each (as a worker
/// process's packet pump): a failure on one worker reaches the other's pending collective at once,
/// with the first failure's kind, and the replay's generation works on both.
#[cfg(test)]
mod plane_tests {
    use super::*;
    use crate::config::small_test_config;
    use crate::net::local::network;
    use std::time::Instant;

    fn two_workers(deadline: Duration) -> Vec<Arc<ExpertCollectives>> {
        let config = small_test_config();
        network(2)
            .into_iter()
            .map(|(transport, mut inbox)| {
                let collectives = Arc::new(
                    ExpertCollectives::over_transport(
                        ExpertExchange::Sim,
                        &config,
                        Arc::new(transport),
                        1,
                        deadline,
                        0,
                    )
                    .expect("communicators"),
                );
                // The coordinator's ids of the first generation.
                collectives.give_ids(vec![[1; NCCL_ID_BYTES]]).expect("ids");
                let c = collectives.clone();
                std::thread::spawn(move || {
                    while let Some(packet) = inbox.blocking_recv() {
                        c.deliver(packet);
                    }
                });
                collectives
            })
            .collect()
    }

    fn call(step: StepId) -> ExpertCall {
        ExpertCall {
            lane: 0,
            step,
            block: 0,
            forward: true,
            what: format!("the block-0 expert forward of step {step}"),
        }
    }

    fn counts(c: &ExpertCollectives, step: StepId, worker: WorkerId) -> Result<Vec<u64>> {
        let endpoint = c.endpoint(step, worker, 0)?;
        let mut comm = endpoint.lock().unwrap_or_else(PoisonError::into_inner);
        comm.all_to_all_counts(&[worker as u64 * 10, worker as u64 * 10 + 1])
    }

    #[test]
    fn a_failure_on_one_worker_process_fails_the_others_collective_at_once_and_the_replay_works() {
        let workers = two_workers(Duration::from_secs(20));
        let step = StepId::first(3);
        // Worker 1 waits in a collective of step 3 that worker 0 will not issue: its expert failed.
        let start = Instant::now();
        let waiting = {
            let w1 = workers[1].clone();
            std::thread::spawn(move || counts(&w1, step, 1).map_err(|e| w1.consequence_or_abort(&call(step), 1, e)))
        };
        std::thread::sleep(Duration::from_millis(100));
        workers[0].abort(step, "worker 0 failed step 3: expert 0.5 panicked", true);
        let err = waiting.join().expect("thread").expect_err("aborted");
        assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
        // A consequence, of the cause's kind: the step is replayed, not the run ended.
        assert!(err.is_restartable(), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("worker 0 aborted: worker 0 failed step 3: expert 0.5 panicked"),
            "{msg}"
        );

        // The replay (attempt 2) builds the next generation on both, named by the same step, with
        // the ids its RunStep brought. (Worker 0 never built the first generation: its first ids
        // are replaced by these.)
        let replay = StepId { step: 3, attempt: 1 };
        for w in &workers {
            w.give_ids(vec![[2; NCCL_ID_BYTES]]).expect("ids");
        }
        let w1 = workers[1].clone();
        let other = std::thread::spawn(move || counts(&w1, replay, 1));
        let mine = counts(&workers[0], replay, 0).expect("worker 0's counts");
        let theirs = other.join().expect("thread").expect("worker 1's counts");
        assert_eq!((mine, theirs), (vec![0, 10], vec![1, 11]));
        assert_eq!(workers[1].generations(), 2);
        assert_eq!(
            workers[0].generations(),
            1,
            "worker 0 failed before it built a generation"
        );

        // A failure of worker 0 in step 4 before its exchange: worker 1's exchange fails at once,
        // whether the notice arrives before it builds step 4's generation or while it waits.
        let start = Instant::now();
        workers[0].abort(StepId::first(4), "worker 0 failed step 4 before its exchange", false);
        let err = counts(&workers[1], StepId::first(4), 1).expect_err("step 4 without worker 0");
        assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
        let err = workers[1].consequence_or_abort(&call(StepId::first(4)), 1, err);
        assert!(!err.is_restartable(), "{err}");
        assert!(err.to_string().contains("before its exchange"), "{err}");

        // Without new ids from the coordinator, a worker cannot build the next generation.
        workers[1].abort(StepId::first(9), "worker 1 failed step 9", true);
        let err = counts(&workers[1], StepId::first(10), 1).expect_err("no ids");
        assert!(
            err.to_string()
                .contains("worker 1 has no communicator ids for the exchanges of step 10"),
            "{err}"
        );
        assert!(
            workers[1].give_ids(vec![[3; NCCL_ID_BYTES]; 2]).is_err(),
            "one id per lane"
        );
    }

    #[test]
    fn an_abort_notice_for_a_step_no_peer_can_be_at_is_ignored() {
        let workers = two_workers(Duration::from_secs(20));
        let step = StepId::first(3);
        let w1 = workers[1].clone();
        let other = std::thread::spawn(move || counts(&w1, step, 1));
        counts(&workers[0], step, 0).expect("worker 0's counts");
        other.join().expect("thread").expect("worker 1's counts");
        // Worker 0 claims a failure at step 10 while both are at step 3: worker 1 ignores it.
        workers[0].abort(StepId::first(10), "a far step", false);
        let start = Instant::now();
        while workers[1].lock().broken_at.is_none() && start.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(workers[1].lock().broken_at, None, "the far notice was taken");
        // (A notice for the next step is taken: the first test's step 4.)
    }

    #[test]
    fn a_closed_epoch_fails_every_later_collective_at_once() {
        let workers = two_workers(Duration::from_secs(20));
        workers[1].close("epoch 3 is over");
        let start = Instant::now();
        let err = counts(&workers[1], StepId::first(0), 1).expect_err("closed");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("epoch 3 is over"), "{err}");
    }
}
