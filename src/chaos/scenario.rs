//! Chaos scenarios: which faults to inject into a run, scripted or drawn from a seed.
//!
//! A scenario is a TOML file (or built with [`Scenario::builder`]):
//!
//! ```toml
//! seed = 7            # draws every random choice below (same seed, same faults)
//! deadline = "120s"   # the whole chaos run (both runs) never takes longer
//! collective_deadline = "2s"  # the runtime's deadline of each collective (default: train.deadline_s)
//!
//! [[fault]]           # scripted: expert 2 of MoE block 1 panics in the forward of step 4
//! actor = "expert"
//! block = 1
//! expert = 2
//! kind = "panic"
//! step = 4
//! moment = "forward"
//!
//! [[fault]]           # random: each step, with probability 0.2, a gate of a drawn worker and
//! actor = "gate"      # block returns an error in a drawn moment (forward or backward)
//! kind = "error"
//! probability = 0.2
//!
//! [[fault]]           # worker 1's communicator stops answering its peers from step 6 on
//! actor = "silence"
//! worker = 1
//! step = 6
//! ```
//!
//! A run over worker processes (`semoe chaos --processes N`) takes process faults and link faults
//! (no actor, disk or checkpoint faults: the actors of a worker process are out of the plan's
//! reach):
//!
//! ```toml
//! [[fault]]           # worker 0's process is SIGKILLed when the first expert forward packet
//! actor = "process"   # of step 3 reaches it
//! kind = "kill"
//! worker = 0
//! step = 3
//! moment = "forward"
//!
//! [[fault]]           # a new worker process joins before step 5
//! actor = "process"
//! kind = "join"
//! step = 5
//!
//! [[fault]]           # worker 1 is stopped (SIGSTOP) for 300 ms before step 8: a straggler
//! actor = "process"
//! kind = "stop"
//! duration = "300ms"
//! worker = 1
//! step = 8
//!
//! [[fault]]           # the first request worker 1 sends worker 0 in step 9 arrives twice
//! actor = "link"
//! kind = "duplicate"
//! from = 1
//! to = 0
//! step = 9
//! ```
//!
//! Between worker processes a link fault fires in the sending process's transport (the same
//! wrapper as in process, around its data plane), at the same requests as between in-process
//! workers. `from` and `to` are worker indices of the epoch that first runs the fault's step (after
//! that step's boundary process faults: the worker order follows the membership the process faults
//! make, as for `worker` below); the fault travels to the worker processes with that epoch, and a
//! step replayed by a later epoch (after a loss) runs without it. `corrupt` really flips a byte of
//! the request's frame: the receiver's checksum refuses it and the coordinator evicts the sender,
//! after which the survivors replay from the in-memory copy (so no process fault, and no link
//! fault at a later step, may follow a corrupt link fault); `drop` and `partition` stop the run at the collective deadline, as in
//! process. See `docs/runtime-semantics.md` for each kind.
//!
//! Keys of a `[[fault]]`:
//!
//! - `actor`: `expert` (names `block` and `expert`), `gate` (`worker` and `block`), `ledger`
//!   (`worker`), `communicator` (`worker`: it fails when asked to send the first exchange of the
//!   step), `silence` (`worker`: its communicator never answers a peer again), `link`
//!   (`from` and `to`: the requests `from` sends `to`, a network fault), `disk` (`worker`: the
//!   reads and writes of its Disk tier; the job needs storage budgets that put experts on disk) or
//!   `checkpoint` (the checkpoint written after the step: a chaos run with checkpoint faults
//!   checkpoints before its first step and after every step, and resumes from the newest intact
//!   checkpoint, as `--resume` does, whenever a checkpoint fault fires) or `process` (`worker`: a
//!   worker process of a run over processes, `--processes N`; see [`super::process`]).
//! - `kind`: `error` (the handler returns an error) or `panic` (the handler panics); for a link,
//!   `drop`, `duplicate`, `delay` (with `delay = "50ms"`), `reorder` (the request arrives after
//!   the next one), `corrupt` (its bytes are damaged: in process the receiver cannot decode it;
//!   between processes a byte of its frame is flipped and the frame's checksum refuses it) or
//!   `partition` (with `duration = "2s"`: from the first request of its step on that link, every
//!   packet between the two workers, both ways, replies too, is lost for that long); not for
//!   `silence`. A link fault hits the first request(s) of its step on that
//!   link (only requests: replies carry no step). For a disk, `read-error` or `write-error` (the
//!   call fails with `EIO`), `full` (a write fails with `ENOSPC`), `short-read` (a read returns
//!   half the bytes) or `slow` (with `delay = "5ms"`: every read and write waits that long, from
//!   its step to the end of the run); it hits the first read or write of its kind once the step
//!   has begun (or the first after it, if that step does no disk I/O). For a checkpoint,
//!   `interrupt` (the save fails halfway through writing its optimizer file) or `corrupt` (a byte
//!   of its model file is flipped after the save). For a process, `kill` (SIGKILL), `stop` (with
//!   `duration = "300ms"`: SIGSTOP, then SIGCONT that much later; at most 1 s is a straggler that
//!   is only slow, at least 3 s is dropped by the coordinator, never commits again and exits
//!   non-zero once continued; in between is refused, as either could happen), `leave` (SIGTERM:
//!   the worker asks to leave, its state moves to the others at the step boundary, it exits 0) or
//!   `join` (a new worker process is started and joins at the step boundary; it names no worker).
//! - `step` (0-based, the step being computed) or `probability` (per step, in (0, 1]): exactly one.
//!   A random silence starts at the first step drawn.
//! - `moment`: `forward`, `backward` or `any` (the first time the actor is asked in the step); a
//!   ledger is only asked once per step (`any`, its default); not for `silence`. For a process
//!   fault, `boundary` (the default: before the step begins, once the step before it committed;
//!   delivered by the coordinator), `forward` or `backward` (when the first expert forward or
//!   backward packet of the step reaches the worker) or `commit` (when the step's commit reaches
//!   it, after it prepared); a kill or a stop at a phase is carried out by the worker itself at that
//!   exact point, one phased fault per process; a join and a leave only at `boundary`.
//! - For a process fault, `worker` is the index among the workers of the epoch when the fault
//!   fires (member order: the oldest first; a joiner is the last). Kills, leaves and long stops
//!   remove a worker, joins add one, so the indices of later faults follow the scripted ones
//!   before them; a scripted fault naming a worker the epoch does not have then is an error.
//! - `times`: how many times a scripted fault fires (default 1; each firing fails the step's
//!   attempt, so a fault firing twice also fails the replay; a disk fault fires on that many
//!   calls in a row, so `times = 3` also fails the I/O thread's two retries).
//!
//! Whatever a fault leaves out (`worker`, `block`, `expert`, `moment`) is drawn from the seed, each
//! time it fires: a random fault entry with no target is a fault anywhere. Each entry draws from its
//! own stream of the seed, so adding an entry does not change what the others draw.

use super::process::Phase;
use super::{Fault, FaultKind, FaultPlan, Moment, Target};
use crate::error::{Error, Result};
use crate::model::gpt::GptConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

/// The overall deadline of a scenario that sets none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);

/// Which actor a fault entry hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActorKind {
    /// An Expert actor (`block`, `expert`).
    Expert,
    /// A Gate actor (`worker`, `block`).
    Gate,
    /// A Ledger actor (`worker`).
    Ledger,
    /// A worker's Communicator stops answering its peers (`worker`).
    Silence,
    /// The requests one worker sends another (`from`, `to`): dropped, duplicated, delayed or
    /// reordered.
    Link,
    /// The reads and writes of a worker's Disk tier (`worker`).
    Disk,
    /// The checkpoint written after a step.
    Checkpoint,
    /// A Communicator actor (`worker`).
    Communicator,
    /// A worker process (`worker`): killed, stopped, leaving, or a new one joining.
    Process,
}

impl ActorKind {
    /// The name in a scenario file.
    pub fn name(self) -> &'static str {
        match self {
            ActorKind::Expert => "expert",
            ActorKind::Gate => "gate",
            ActorKind::Ledger => "ledger",
            ActorKind::Silence => "silence",
            ActorKind::Link => "link",
            ActorKind::Disk => "disk",
            ActorKind::Checkpoint => "checkpoint",
            ActorKind::Communicator => "communicator",
            ActorKind::Process => "process",
        }
    }
}

/// When a fault entry fires.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum When {
    /// At this step (0-based).
    At(u64),
    /// At each step with this probability, drawn from the seed.
    Random(f64),
}

/// One `[[fault]]` entry. Fields left `None` are drawn from the seed when the fault is planned.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultSpec {
    /// The actor it hits.
    pub actor: ActorKind,
    /// Error or panic (ignored for a silence).
    pub kind: FaultKind,
    /// At a step, or at random.
    pub when: When,
    /// The moment in the step (`None`: drawn, forward or backward; a ledger is always `Any`).
    pub moment: Option<Moment>,
    /// The worker (gate, ledger, silence).
    pub worker: Option<usize>,
    /// The MoE block (expert, gate): the index of the transformer block.
    pub block: Option<usize>,
    /// The expert (expert).
    pub expert: Option<usize>,
    /// The sending worker (link).
    pub from: Option<usize>,
    /// The receiving worker (link).
    pub to: Option<usize>,
    /// How many times a scripted fault fires (random faults: once per step drawn).
    pub times: u32,
    /// Where in the step a process fault fires (`None`: at the boundary).
    pub phase: Option<Phase>,
}

impl FaultSpec {
    fn new(actor: ActorKind) -> Self {
        FaultSpec {
            actor,
            kind: FaultKind::Error,
            when: When::At(0),
            moment: None,
            worker: None,
            block: None,
            expert: None,
            from: None,
            to: None,
            times: 1,
            phase: None,
        }
    }

    /// An Expert actor fails (an error at step 0 until told otherwise; block and expert drawn
    /// unless set).
    pub fn expert() -> Self {
        FaultSpec::new(ActorKind::Expert)
    }

    /// A Gate actor fails.
    pub fn gate() -> Self {
        FaultSpec::new(ActorKind::Gate)
    }

    /// A Ledger actor fails (when it receives gradients).
    pub fn ledger() -> Self {
        FaultSpec::new(ActorKind::Ledger)
    }

    /// A Communicator actor fails (when asked to send an exchange).
    pub fn communicator() -> Self {
        FaultSpec::new(ActorKind::Communicator)
    }

    /// A worker's communicator stops answering its peers.
    pub fn silence() -> Self {
        FaultSpec::new(ActorKind::Silence)
    }

    /// A network fault on the requests one worker sends another (drop unless told otherwise;
    /// both workers drawn unless set with [`FaultSpec::from`] and [`FaultSpec::to`]).
    pub fn link() -> Self {
        FaultSpec {
            kind: FaultKind::Drop,
            ..FaultSpec::new(ActorKind::Link)
        }
    }

    /// A fault of a worker's Disk tier (a read error unless told otherwise with
    /// [`FaultSpec::kind`]: [`FaultKind::ReadError`], [`FaultKind::WriteError`],
    /// [`FaultKind::DiskFull`], [`FaultKind::ShortRead`] or [`FaultKind::Slow`]; the worker drawn
    /// unless set).
    pub fn disk() -> Self {
        FaultSpec {
            kind: FaultKind::ReadError,
            ..FaultSpec::new(ActorKind::Disk)
        }
    }

    /// A fault of the checkpoint written after a step: [`FaultKind::Interrupt`] unless told
    /// otherwise with [`FaultSpec::kind`] ([`FaultKind::Corrupt`]).
    pub fn checkpoint() -> Self {
        FaultSpec {
            kind: FaultKind::Interrupt,
            ..FaultSpec::new(ActorKind::Checkpoint)
        }
    }

    /// A fault of a worker process: [`FaultKind::Kill`] unless told otherwise with
    /// [`FaultSpec::kind`] ([`FaultKind::Stop`], [`FaultKind::Leave`], [`FaultKind::Join`]); the
    /// worker drawn unless set, at the step boundary unless [`FaultSpec::phase`] says otherwise.
    pub fn process() -> Self {
        FaultSpec {
            kind: FaultKind::Kill,
            ..FaultSpec::new(ActorKind::Process)
        }
    }

    /// Where in the step a process fault fires.
    pub fn phase(mut self, phase: Phase) -> Self {
        self.phase = Some(phase);
        self
    }

    /// The sending worker of a link fault.
    pub fn from(mut self, worker: usize) -> Self {
        self.from = Some(worker);
        self
    }

    /// The receiving worker of a link fault.
    pub fn to(mut self, worker: usize) -> Self {
        self.to = Some(worker);
        self
    }

    /// What a link fault does to the request: [`FaultKind::Drop`], [`FaultKind::Duplicate`],
    /// [`FaultKind::Delay`] or [`FaultKind::Reorder`] (and for actors, error or panic).
    pub fn kind(mut self, kind: FaultKind) -> Self {
        self.kind = kind;
        self
    }

    /// The worker.
    pub fn worker(mut self, worker: usize) -> Self {
        self.worker = Some(worker);
        self
    }

    /// The MoE block.
    pub fn block(mut self, block: usize) -> Self {
        self.block = Some(block);
        self
    }

    /// The expert.
    pub fn expert_index(mut self, expert: usize) -> Self {
        self.expert = Some(expert);
        self
    }

    /// The handler panics.
    pub fn panic(mut self) -> Self {
        self.kind = FaultKind::Panic;
        self
    }

    /// The handler returns an error (the default).
    pub fn error(mut self) -> Self {
        self.kind = FaultKind::Error;
        self
    }

    /// Fire at `step` (0-based).
    pub fn at(mut self, step: u64) -> Self {
        self.when = When::At(step);
        self
    }

    /// Fire at each step with `probability`, drawn from the seed.
    pub fn random(mut self, probability: f64) -> Self {
        self.when = When::Random(probability);
        self
    }

    /// The moment in the step.
    pub fn moment(mut self, moment: Moment) -> Self {
        self.moment = Some(moment);
        self
    }

    /// Fire this many times (scripted faults).
    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }

    /// Check the entry on its own; `at` names it in errors (`fault[2]`).
    fn check(&self, at: &str) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::config(format!("chaos scenario: {at}.{key}: {why}")));
        let actor = self.actor.name();
        let not_for = |key: &str, what: &str| format!("{actor} faults do not take `{key}` ({what})");
        // Here, not only in the file's parser, so that a built scenario is held to the same bounds:
        // a duration is added to instants (beyond the clock's range that panics), and a zero one
        // makes a fault that does nothing (a delay, a slow disk) or another fault (a partition of
        // no time loses one packet: a drop) while the report names it as given.
        let duration = match self.kind {
            FaultKind::Stop(d) | FaultKind::Partition(d) => Some(("duration", d)),
            FaultKind::Delay(d) | FaultKind::Slow(d) => Some(("delay", d)),
            _ => None,
        };
        if let Some((key, d)) = duration {
            if d.is_zero() {
                return bad(key, "must be longer than 0".into());
            }
            if d > crate::config::MAX_WAIT {
                return bad(key, format!("{} is longer than a day", humantime::format_duration(d)));
            }
        }
        if self.actor == ActorKind::Process {
            return super::process::check(self, at);
        }
        if self.kind.is_process() {
            return bad(
                "kind",
                format!("{actor} faults cannot be process faults (use actor = \"process\")"),
            );
        }
        if self.phase.is_some() {
            return bad("moment", format!("{actor} faults fire forward, backward or any"));
        }
        let disk = self.kind.is_disk();
        let checkpoint = matches!(self.kind, FaultKind::Interrupt | FaultKind::Corrupt);
        match self.actor {
            ActorKind::Checkpoint if !checkpoint => {
                return bad("kind", "a checkpoint fault is interrupt or corrupt".into())
            }
            ActorKind::Checkpoint => {
                let given = [
                    ("worker", self.worker.is_some()),
                    ("block", self.block.is_some()),
                    ("expert", self.expert.is_some()),
                    ("from", self.from.is_some()),
                    ("to", self.to.is_some()),
                    ("moment", self.moment.is_some()),
                ];
                if let Some((key, _)) = given.iter().find(|(_, set)| *set) {
                    return bad(key, not_for(key, "it hits the checkpoint written after its step"));
                }
                if self.times > 1 {
                    return bad("times", "a checkpoint is written once per step: it fails once".into());
                }
            }
            // A link may be corrupt too (its requests' bytes); nothing else but a checkpoint.
            other
                if other != ActorKind::Checkpoint
                    && checkpoint
                    && !(other == ActorKind::Link && self.kind == FaultKind::Corrupt) =>
            {
                return bad(
                    "kind",
                    format!("{actor} faults cannot be checkpoint faults (use actor = \"checkpoint\")"),
                )
            }
            ActorKind::Disk if !disk => {
                return bad(
                    "kind",
                    "a disk fault is read-error, write-error, full, short-read or slow".into(),
                )
            }
            ActorKind::Disk if self.block.is_some() || self.expert.is_some() => {
                let key = if self.block.is_some() { "block" } else { "expert" };
                return bad(key, not_for(key, "a worker's Disk tier holds all its experts"));
            }
            ActorKind::Disk if self.moment.is_some() => {
                return bad(
                    "moment",
                    not_for("moment", "it hits the first read or write of its kind in its step"),
                )
            }
            ActorKind::Disk if self.times > 1 && matches!(self.kind, FaultKind::Slow(_)) => {
                return bad("times", "a slow disk stays slow to the end of the run".into())
            }
            other if other != ActorKind::Disk && disk => {
                return bad(
                    "kind",
                    format!("{actor} faults cannot be disk faults (use actor = \"disk\")"),
                )
            }
            _ => {}
        }
        if self.actor != ActorKind::Link {
            if self.from.is_some() {
                return bad("from", not_for("from", "only link faults name a sender"));
            }
            if self.to.is_some() {
                return bad("to", not_for("to", "only link faults name a receiver"));
            }
        }
        let network = matches!(
            self.kind,
            FaultKind::Drop
                | FaultKind::Duplicate
                | FaultKind::Delay(_)
                | FaultKind::Reorder
                | FaultKind::Corrupt
                | FaultKind::Partition(_)
        );
        match self.actor {
            ActorKind::Link if !network => {
                return bad(
                    "kind",
                    "a link fault is drop, duplicate, delay, reorder, corrupt or partition".into(),
                )
            }
            ActorKind::Link if self.times > 1 && matches!(self.kind, FaultKind::Partition(_)) => {
                return bad("times", "a partition lasts its `duration`: it starts once".into())
            }
            ActorKind::Expert | ActorKind::Gate | ActorKind::Ledger | ActorKind::Communicator if network => {
                return bad("kind", format!("{actor} faults are error or panic"))
            }
            ActorKind::Link if self.worker.is_some() || self.block.is_some() || self.expert.is_some() => {
                return bad(
                    if self.worker.is_some() {
                        "worker"
                    } else if self.block.is_some() {
                        "block"
                    } else {
                        "expert"
                    },
                    "link faults name `from` and `to`".into(),
                )
            }
            ActorKind::Link if self.from.is_some() && self.from == self.to => {
                return bad("to", "a link joins two different workers".into())
            }
            ActorKind::Expert if self.worker.is_some() => {
                return bad(
                    "worker",
                    not_for("worker", "the expert's worker follows from the placement"),
                )
            }
            ActorKind::Gate | ActorKind::Ledger | ActorKind::Silence | ActorKind::Communicator
                if self.expert.is_some() =>
            {
                return bad("expert", not_for("expert", "only expert faults name an expert"))
            }
            ActorKind::Ledger | ActorKind::Silence | ActorKind::Communicator if self.block.is_some() => {
                return bad("block", not_for("block", "a worker has one of them for all blocks"))
            }
            _ => {}
        }
        match (self.actor, self.moment) {
            (ActorKind::Ledger | ActorKind::Communicator, Some(m)) if m != Moment::Any => {
                return bad(
                    "moment",
                    "a ledger is asked once per step, when it receives gradients, and a communicator fails at the first exchange of its step: only `any`".into(),
                )
            }
            (ActorKind::Silence, Some(_)) => {
                return bad("moment", not_for("moment", "a silence lasts from its step to the end"))
            }
            (ActorKind::Link, Some(_)) => {
                return bad("moment", not_for("moment", "it hits the first requests of its step"))
            }
            _ => {}
        }
        if let When::Random(p) = self.when {
            if !(p > 0.0 && p <= 1.0) {
                return bad("probability", format!("{p} is not in (0, 1]"));
            }
        }
        if self.times == 0 {
            return bad("times", "a fault fires at least once".into());
        }
        if self.times > 1 && (self.actor == ActorKind::Silence || matches!(self.when, When::Random(_))) {
            return bad(
                "times",
                "only scripted actor faults fire more than once (a silence lasts; a random fault draws its steps)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// What a scenario is planned against: the run's steps, workers and model shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Steps of the run.
    pub steps: u64,
    /// In-process workers.
    pub workers: usize,
    /// The transformer blocks that are MoE blocks.
    pub moe_blocks: Vec<usize>,
    /// Experts per MoE block.
    pub experts: usize,
}

impl Layout {
    /// The layout of a run of `steps` steps of `model` over `workers` workers.
    pub fn new(model: &GptConfig, workers: usize, steps: u64) -> Self {
        Layout {
            steps,
            workers,
            moe_blocks: (0..model.n_layer).filter(|&l| model.is_moe(l)).collect(),
            experts: model.experts,
        }
    }
}

/// A fault of a plan and the scenario entry it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedFault {
    /// The index of its `[[fault]]` entry.
    pub entry: usize,
    /// The fault (its index in the plan is its index in [`Scenario::plan`]'s list).
    pub fault: Fault,
}

/// A seeded fault scenario. Parse one with [`Scenario::from_toml`] or [`Scenario::from_file`],
/// or build one:
///
/// ```
/// use semoe::chaos::{FaultSpec, Layout, Moment, Scenario};
/// use std::time::Duration;
///
/// # fn main() -> semoe::Result<()> {
/// let scenario = Scenario::builder()
///     .seed(7)
///     .deadline(Duration::from_secs(60))
///     .fault(FaultSpec::expert().block(1).expert_index(2).panic().at(4).moment(Moment::Forward))
///     .fault(FaultSpec::gate().error().random(0.1))
///     .build()?;
/// let layout = Layout { steps: 12, workers: 2, moe_blocks: vec![0, 1], experts: 4 };
/// let (plan, faults) = scenario.plan(&layout)?;
/// assert_eq!(plan.pending(), faults.len());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// The seed of every random choice.
    pub seed: u64,
    /// The whole chaos run never takes longer.
    pub deadline: Duration,
    /// The runtime's collective deadline for both runs (`None`: the job's `train.deadline_s`).
    /// A silent peer ends its step after it.
    pub collective_deadline: Option<Duration>,
    /// The fault entries, in order.
    pub faults: Vec<FaultSpec>,
}

/// Builds a [`Scenario`]; [`ScenarioBuilder::build`] checks every entry as a file's would be.
#[derive(Clone, Debug)]
pub struct ScenarioBuilder {
    scenario: Scenario,
}

impl ScenarioBuilder {
    /// The seed (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.scenario.seed = seed;
        self
    }

    /// The overall deadline (default [`DEFAULT_DEADLINE`]).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.scenario.deadline = deadline;
        self
    }

    /// The runtime's collective deadline (default: the job's `train.deadline_s`).
    pub fn collective_deadline(mut self, deadline: Duration) -> Self {
        self.scenario.collective_deadline = Some(deadline);
        self
    }

    /// Add a fault entry.
    pub fn fault(mut self, fault: FaultSpec) -> Self {
        self.scenario.faults.push(fault);
        self
    }

    /// The scenario, checked.
    pub fn build(self) -> Result<Scenario> {
        self.scenario.check()?;
        Ok(self.scenario)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    seed: Option<u64>,
    deadline: Option<String>,
    collective_deadline: Option<String>,
    #[serde(default)]
    fault: Vec<RawFault>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    actor: Option<String>,
    kind: Option<String>,
    step: Option<u64>,
    probability: Option<f64>,
    moment: Option<String>,
    worker: Option<usize>,
    block: Option<usize>,
    expert: Option<usize>,
    from: Option<usize>,
    to: Option<usize>,
    delay: Option<String>,
    duration: Option<String>,
    times: Option<u32>,
}

impl RawFault {
    fn into_spec(self, at: &str) -> Result<FaultSpec> {
        let bad = |key: &str, why: String| Error::config(format!("chaos scenario: {at}.{key}: {why}"));
        // Durations are added to instants: one beyond the clock's range would panic there.
        let wait = |key: &str, d: &str, example: &str| {
            let value = humantime::parse_duration(d)
                .map_err(|e| bad(key, format!("{d:?} is not a duration such as \"{example}\": {e}")))?;
            if value > crate::config::MAX_WAIT {
                return Err(bad(key, format!("{d:?} is longer than a day")));
            }
            Ok(value)
        };
        let actor = match self.actor.as_deref() {
            Some("expert") => ActorKind::Expert,
            Some("gate") => ActorKind::Gate,
            Some("ledger") => ActorKind::Ledger,
            Some("silence") => ActorKind::Silence,
            Some("link") => ActorKind::Link,
            Some("disk") => ActorKind::Disk,
            Some("checkpoint") => ActorKind::Checkpoint,
            Some("communicator") => ActorKind::Communicator,
            Some("process") => ActorKind::Process,
            Some(other) => {
                return Err(bad(
                    "actor",
                    format!(
                        "{other:?} is not one of expert, gate, ledger, communicator, silence, link, disk, checkpoint, \
                         process"
                    ),
                ))
            }
            None => {
                return Err(bad(
                    "actor",
                    "missing (expert, gate, ledger, communicator, silence, link, disk, checkpoint or process)".into(),
                ))
            }
        };
        if self.delay.is_some() && !matches!(self.kind.as_deref(), Some("delay" | "slow")) {
            return Err(bad(
                "delay",
                "only a fault of kind \"delay\" (a link) or \"slow\" (a disk) takes a delay".into(),
            ));
        }
        if self.duration.is_some() && !matches!(self.kind.as_deref(), Some("partition" | "stop")) {
            return Err(bad(
                "duration",
                "only a fault of kind \"partition\" (a link) or \"stop\" (a process) takes a duration".into(),
            ));
        }
        let kind = match (actor, self.kind.as_deref()) {
            (ActorKind::Silence, Some(_)) => {
                return Err(bad(
                    "kind",
                    "a silence is neither an error nor a panic: leave `kind` out".into(),
                ))
            }
            (ActorKind::Silence, None) => FaultKind::Error,
            (ActorKind::Process, Some("kill")) => FaultKind::Kill,
            (ActorKind::Process, Some("leave")) => FaultKind::Leave,
            (ActorKind::Process, Some("join")) => FaultKind::Join,
            (ActorKind::Process, Some("stop")) => match self.duration.as_deref() {
                Some(d) => FaultKind::Stop(wait("duration", d, "300ms")?),
                None => {
                    return Err(bad(
                        "duration",
                        "missing: a stop needs `duration` (e.g. \"300ms\": a straggler; \"5s\": dropped)".into(),
                    ))
                }
            },
            (ActorKind::Process, Some(other)) => {
                return Err(bad("kind", format!("{other:?} is not kill, stop, leave or join")))
            }
            (ActorKind::Process, None) => return Err(bad("kind", "missing (kill, stop, leave or join)".into())),
            (ActorKind::Checkpoint, Some("interrupt")) => FaultKind::Interrupt,
            (ActorKind::Checkpoint, Some("corrupt")) => FaultKind::Corrupt,
            (ActorKind::Checkpoint, Some(other)) => {
                return Err(bad("kind", format!("{other:?} is not interrupt or corrupt")))
            }
            (ActorKind::Checkpoint, None) => return Err(bad("kind", "missing (interrupt or corrupt)".into())),
            (ActorKind::Disk, Some("read-error")) => FaultKind::ReadError,
            (ActorKind::Disk, Some("write-error")) => FaultKind::WriteError,
            (ActorKind::Disk, Some("full")) => FaultKind::DiskFull,
            (ActorKind::Disk, Some("short-read")) => FaultKind::ShortRead,
            (ActorKind::Disk, Some("slow")) => match self.delay.as_deref() {
                Some(d) => FaultKind::Slow(wait("delay", d, "5ms")?),
                None => {
                    return Err(bad(
                        "delay",
                        "missing: a slow disk needs `delay` (e.g. \"5ms\", added to every read and write)".into(),
                    ))
                }
            },
            (ActorKind::Disk, Some(other)) => {
                return Err(bad(
                    "kind",
                    format!("{other:?} is not read-error, write-error, full, short-read or slow"),
                ))
            }
            (ActorKind::Disk, None) => {
                return Err(bad(
                    "kind",
                    "missing (read-error, write-error, full, short-read or slow)".into(),
                ))
            }
            (ActorKind::Link, Some("drop")) => FaultKind::Drop,
            (ActorKind::Link, Some("duplicate")) => FaultKind::Duplicate,
            (ActorKind::Link, Some("reorder")) => FaultKind::Reorder,
            (ActorKind::Link, Some("corrupt")) => FaultKind::Corrupt,
            (ActorKind::Link, Some("partition")) => match self.duration.as_deref() {
                Some(d) => FaultKind::Partition(wait("duration", d, "2s")?),
                None => {
                    return Err(bad(
                        "duration",
                        "missing: a partition needs `duration` (e.g. \"2s\")".into(),
                    ))
                }
            },
            (ActorKind::Link, Some("delay")) => match self.delay.as_deref() {
                Some(d) => FaultKind::Delay(wait("delay", d, "50ms")?),
                None => {
                    return Err(bad(
                        "delay",
                        "missing: a delay fault needs `delay` (e.g. \"50ms\")".into(),
                    ))
                }
            },
            (ActorKind::Link, Some(other)) => {
                return Err(bad(
                    "kind",
                    format!("{other:?} is not drop, duplicate, delay, reorder, corrupt or partition"),
                ))
            }
            (ActorKind::Link, None) => {
                return Err(bad(
                    "kind",
                    "missing (drop, duplicate, delay, reorder, corrupt or partition)".into(),
                ))
            }
            (_, Some("error")) => FaultKind::Error,
            (_, Some("panic")) => FaultKind::Panic,
            (_, Some(other)) => return Err(bad("kind", format!("{other:?} is not error or panic"))),
            (_, None) => return Err(bad("kind", "missing (error or panic)".into())),
        };
        let when = match (self.step, self.probability) {
            (Some(step), None) => When::At(step),
            (None, Some(p)) => When::Random(p),
            (Some(_), Some(_)) => {
                return Err(bad(
                    "probability",
                    "give `step` (scripted) or `probability` (random), not both".into(),
                ))
            }
            (None, None) => {
                return Err(bad(
                    "step",
                    "missing: give `step` (scripted) or `probability` (random)".into(),
                ))
            }
        };
        let (moment, phase) = match (actor, self.moment.as_deref()) {
            (ActorKind::Process, None) => (None, None),
            (ActorKind::Process, Some(m)) => match super::process::Phase::parse(m) {
                Some(p) => (None, Some(p)),
                None => {
                    return Err(bad(
                        "moment",
                        format!("{m:?} is not boundary, forward, backward or commit (a process fault's moments)"),
                    ))
                }
            },
            (_, m) => (parse_moment(m, &bad)?, None),
        };
        let spec = FaultSpec {
            actor,
            kind,
            when,
            moment,
            worker: self.worker,
            block: self.block,
            expert: self.expert,
            from: self.from,
            to: self.to,
            times: self.times.unwrap_or(1),
            phase,
        };
        spec.check(at)?;
        Ok(spec)
    }
}

/// An actor fault's `moment`.
fn parse_moment(moment: Option<&str>, bad: &dyn Fn(&str, String) -> Error) -> Result<Option<Moment>> {
    Ok(match moment {
        None => None,
        Some("forward") => Some(Moment::Forward),
        Some("backward") => Some(Moment::Backward),
        Some("any") => Some(Moment::Any),
        Some(other) => return Err(bad("moment", format!("{other:?} is not forward, backward or any"))),
    })
}

impl Scenario {
    /// A builder: seed 0, the default deadline, no faults.
    pub fn builder() -> ScenarioBuilder {
        ScenarioBuilder {
            scenario: Scenario {
                seed: 0,
                deadline: DEFAULT_DEADLINE,
                collective_deadline: None,
                faults: Vec::new(),
            },
        }
    }

    /// Parse a scenario; every bad value is an error naming its key.
    pub fn from_toml(text: &str) -> Result<Self> {
        let raw: RawScenario = toml::from_str(text).map_err(|e| Error::parse("the chaos scenario", e.to_string()))?;
        let deadline = match raw.deadline.as_deref() {
            None => DEFAULT_DEADLINE,
            Some(d) => humantime::parse_duration(d).map_err(|e| {
                Error::config(format!(
                    "chaos scenario: deadline: {d:?} is not a duration such as \"120s\" or \"5m\": {e}"
                ))
            })?,
        };
        let collective_deadline = match raw.collective_deadline.as_deref() {
            None => None,
            Some(d) => Some(humantime::parse_duration(d).map_err(|e| {
                Error::config(format!(
                    "chaos scenario: collective_deadline: {d:?} is not a duration such as \"2s\": {e}"
                ))
            })?),
        };
        let faults = raw
            .fault
            .into_iter()
            .enumerate()
            .map(|(i, f)| f.into_spec(&format!("fault[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let scenario = Scenario {
            seed: raw.seed.unwrap_or(0),
            deadline,
            collective_deadline,
            faults,
        };
        scenario.check()?;
        Ok(scenario)
    }

    /// Read and parse a scenario file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::storage::text_file::read(path, "the chaos scenario")?;
        Scenario::from_toml(&text).map_err(|e| match e {
            Error::Parse { what, detail } => Error::Parse {
                what: format!("{what} {}", path.display()),
                detail,
            },
            Error::Config(msg) => Error::Config(format!("{msg} (in {})", path.display())),
            other => other,
        })
    }

    fn check(&self) -> Result<()> {
        if self.deadline.is_zero() {
            return Err(Error::config("chaos scenario: deadline: must be positive"));
        }
        if let Some(d) = self.collective_deadline {
            if d > crate::config::MAX_WAIT {
                return Err(Error::config(format!(
                    "chaos scenario: collective_deadline: {} is above the longest wait a run allows ({})",
                    humantime::format_duration(d),
                    humantime::format_duration(crate::config::MAX_WAIT)
                )));
            }
            if d.is_zero() || d >= self.deadline {
                return Err(Error::config(format!(
                    "chaos scenario: collective_deadline: {d:?} must be positive and below the overall deadline ({:?})",
                    self.deadline
                )));
            }
        }
        for (i, f) in self.faults.iter().enumerate() {
            f.check(&format!("fault[{i}]"))?;
        }
        Ok(())
    }

    /// The fault plan for a run of `layout`: every scripted fault, and every random one drawn
    /// from the seed (the same seed and layout always give the same plan). A target outside the
    /// layout (a worker, block or expert the run does not have, a step past its end) is an error
    /// naming the entry and key. Also returns each planned fault with its entry, in plan order.
    pub fn plan(&self, layout: &Layout) -> Result<(FaultPlan, Vec<PlannedFault>)> {
        if layout.steps == 0 {
            return Err(Error::config("a chaos run needs at least one step"));
        }
        if layout.workers == 0 || layout.experts == 0 {
            return Err(Error::config(format!(
                "a chaos run needs workers and experts (the layout has {} workers, {} experts)",
                layout.workers, layout.experts
            )));
        }
        let plan = FaultPlan::none();
        let mut planned = Vec::new();
        for (entry, spec) in self.faults.iter().enumerate() {
            let at = format!("fault[{entry}]");
            let bad = |key: &str, why: String| Error::config(format!("chaos scenario: {at}.{key}: {why}"));
            if spec.actor == ActorKind::Process {
                return Err(bad(
                    "actor",
                    "process faults need worker processes: run the chaos job with --processes N".into(),
                ));
            }
            if let Some(w) = spec.worker {
                if w >= layout.workers {
                    return Err(bad(
                        "worker",
                        format!("worker {w} does not exist: the run has {} workers", layout.workers),
                    ));
                }
            }
            if let Some(b) = spec.block {
                if !layout.moe_blocks.contains(&b) {
                    return Err(bad(
                        "block",
                        format!(
                            "block {b} is not an MoE block (the MoE blocks are {:?})",
                            layout.moe_blocks
                        ),
                    ));
                }
            }
            if let Some(e) = spec.expert {
                if e >= layout.experts {
                    return Err(bad(
                        "expert",
                        format!("expert {e} does not exist: a block has {} experts", layout.experts),
                    ));
                }
            }
            for (key, w) in [("from", spec.from), ("to", spec.to)] {
                if let Some(w) = w {
                    if w >= layout.workers {
                        return Err(bad(
                            key,
                            format!("worker {w} does not exist: the run has {} workers", layout.workers),
                        ));
                    }
                }
            }
            if spec.actor == ActorKind::Link && layout.workers < 2 {
                return Err(bad("actor", "a link fault needs 2 or more workers".into()));
            }
            if matches!(spec.actor, ActorKind::Expert | ActorKind::Gate) && layout.moe_blocks.is_empty() {
                return Err(bad("actor", "the model has no MoE block".into()));
            }
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(entry as u64);
            let steps: Vec<u64> = match spec.when {
                When::At(step) => {
                    if step >= layout.steps {
                        return Err(bad(
                            "step",
                            format!("step {step} is past the run's last step ({})", layout.steps - 1),
                        ));
                    }
                    vec![step]
                }
                When::Random(p) => {
                    let mut hits = Vec::new();
                    for step in 0..layout.steps {
                        if rng.random_bool(p) {
                            hits.push(step);
                            // A silence and a slow disk last: their first step is all there is.
                            if spec.actor == ActorKind::Silence || matches!(spec.kind, FaultKind::Slow(_)) {
                                break;
                            }
                        }
                    }
                    hits
                }
            };
            for step in steps {
                let fault = draw(spec, step, layout, &mut rng);
                plan.push(fault.clone());
                planned.push(PlannedFault { entry, fault });
            }
        }
        Ok((plan, planned))
    }
}

/// One fault of `spec` at `step`, drawing what the entry leaves out.
/// A worker of `workers` (at least two) other than `w`, drawn evenly.
fn other_worker(rng: &mut ChaCha8Rng, workers: usize, w: usize) -> usize {
    let other = rng.random_range(0..workers - 1);
    if other >= w {
        other + 1
    } else {
        other
    }
}

pub(super) fn draw(spec: &FaultSpec, step: u64, layout: &Layout, rng: &mut ChaCha8Rng) -> Fault {
    let mut pick = |given: Option<usize>, n: usize| given.unwrap_or_else(|| rng.random_range(0..n));
    let target = match spec.actor {
        ActorKind::Expert => {
            let block = layout.moe_blocks[pick(
                spec.block.and_then(|b| layout.moe_blocks.iter().position(|&m| m == b)),
                layout.moe_blocks.len(),
            )];
            Target::Expert {
                block,
                expert: pick(spec.expert, layout.experts),
            }
        }
        ActorKind::Gate => {
            let worker = pick(spec.worker, layout.workers);
            let block = layout.moe_blocks[pick(
                spec.block.and_then(|b| layout.moe_blocks.iter().position(|&m| m == b)),
                layout.moe_blocks.len(),
            )];
            Target::Gate { worker, block }
        }
        ActorKind::Ledger => Target::Ledger {
            worker: pick(spec.worker, layout.workers),
        },
        ActorKind::Silence => Target::Silence {
            worker: pick(spec.worker, layout.workers),
        },
        ActorKind::Disk => Target::Disk {
            worker: pick(spec.worker, layout.workers),
        },
        // Process entries are refused by `plan` before anything is drawn.
        ActorKind::Checkpoint | ActorKind::Process => Target::Checkpoint,
        ActorKind::Communicator => Target::Communicator {
            worker: pick(spec.worker, layout.workers),
        },
        ActorKind::Link => {
            // Two different workers (the layout has at least two): an end that is drawn avoids
            // the other, whichever of them is given.
            let (from, to) = match (spec.from, spec.to) {
                (Some(from), Some(to)) => (from, to),
                (Some(from), None) => (from, other_worker(rng, layout.workers, from)),
                (None, Some(to)) => (other_worker(rng, layout.workers, to), to),
                (None, None) => {
                    let from = pick(None, layout.workers);
                    (from, other_worker(rng, layout.workers, from))
                }
            };
            Target::Link { from, to }
        }
    };
    let moment = match spec.actor {
        ActorKind::Ledger
        | ActorKind::Silence
        | ActorKind::Link
        | ActorKind::Disk
        | ActorKind::Checkpoint
        | ActorKind::Communicator => Moment::Any,
        _ => spec.moment.unwrap_or_else(|| {
            if rng.random_bool(0.5) {
                Moment::Forward
            } else {
                Moment::Backward
            }
        }),
    };
    Fault {
        target,
        step,
        moment,
        kind: spec.kind,
        times: if matches!(spec.when, When::At(_)) {
            spec.times
        } else {
            1
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            steps: 20,
            workers: 2,
            moe_blocks: vec![0, 1],
            experts: 4,
        }
    }

    #[test]
    fn a_link_with_one_end_given_never_draws_it_for_the_other() {
        for to in [0, 1] {
            let text =
                format!("seed = 9\n[[fault]]\nactor = \"link\"\nkind = \"drop\"\nto = {to}\nprobability = 0.5\n");
            let s = Scenario::from_toml(&text).expect("parses");
            let (_, planned) = s.plan(&layout()).expect("plan");
            assert!(planned.len() >= 5, "about 10 links expected, got {}", planned.len());
            for p in &planned {
                assert_eq!(p.fault.target, Target::Link { from: 1 - to, to }, "{p:?}");
            }
        }
    }

    #[test]
    fn a_collective_deadline_beyond_a_day_is_refused_by_name() {
        let e = Scenario::from_toml("seed = 1\ndeadline = \"3days\"\ncollective_deadline = \"2days\"\n")
            .expect_err("two days")
            .to_string();
        assert!(e.contains("collective_deadline"), "{e}");
    }

    #[test]
    fn the_same_seed_draws_the_same_faults() {
        let text = "seed = 3\n[[fault]]\nactor = \"expert\"\nkind = \"panic\"\nprobability = 0.3\n\
                    [[fault]]\nactor = \"gate\"\nkind = \"error\"\nprobability = 0.3\n";
        let s = Scenario::from_toml(text).expect("parses");
        let (_, a) = s.plan(&layout()).expect("plan");
        let (_, b) = s.plan(&layout()).expect("plan");
        assert_eq!(a, b);
        assert!(
            a.len() >= 4,
            "about 12 faults expected at p = 0.3 over 2 x 20 steps, got {}",
            a.len()
        );
        let other = Scenario { seed: 4, ..s.clone() };
        let (_, c) = other.plan(&layout()).expect("plan");
        assert_ne!(a, c, "another seed, other faults");
        // Adding an entry does not change what the entries before it draw.
        let first_only = Scenario {
            faults: vec![s.faults[0].clone()],
            ..s.clone()
        };
        let (_, d) = first_only.plan(&layout()).expect("plan");
        let of_entry = |p: &[PlannedFault], entry| p.iter().filter(|f| f.entry == entry).cloned().collect::<Vec<_>>();
        assert!(!d.is_empty());
        assert_eq!(d, of_entry(&a, 0));
    }

    #[test]
    fn omitted_fields_are_drawn_inside_the_layout() {
        let s = Scenario::builder()
            .seed(11)
            .fault(FaultSpec::expert().panic().random(1.0))
            .fault(FaultSpec::gate().random(1.0))
            .fault(FaultSpec::ledger().random(1.0))
            .fault(FaultSpec::silence().random(1.0))
            .build()
            .expect("valid");
        let (plan, faults) = s.plan(&layout()).expect("plan");
        // Three actor entries fire every step; the silence starts at step 0 once.
        assert_eq!(faults.len(), 3 * 20 + 1);
        assert_eq!(plan.pending(), 3 * 20);
        for f in &faults {
            match f.fault.target {
                Target::Expert { block, expert } => assert!(block < 2 && expert < 4),
                Target::Gate { worker, block } => assert!(worker < 2 && block < 2),
                Target::Ledger { worker } | Target::Silence { worker } | Target::Disk { worker } => {
                    assert!(worker < 2)
                }
                Target::Checkpoint => {}
                Target::Communicator { worker } => assert!(worker < 2),
                Target::Link { from, to } => assert!(from < 2 && to < 2 && from != to),
            }
        }
        let moments: Vec<Moment> = faults.iter().filter(|f| f.entry == 0).map(|f| f.fault.moment).collect();
        assert!(moments.contains(&Moment::Forward) && moments.contains(&Moment::Backward));
    }

    #[test]
    fn a_wait_beyond_a_day_is_refused_naming_the_field() {
        for (kind, field, actor) in [
            ("partition", "duration", "link"),
            ("delay", "delay", "link"),
            ("slow", "delay", "disk"),
            ("stop", "duration", "process"),
        ] {
            let text = format!(
                "[[fault]]\nactor = \"{actor}\"\nkind = \"{kind}\"\nstep = 2\n{field} = \"300000000000years\"\n"
            );
            let e = Scenario::from_toml(&text).expect_err("refused").to_string();
            assert!(
                e.contains(&format!(".{field}: \"300000000000years\" is longer than a day")),
                "{e}"
            );
            let text = text.replace("300000000000years", "1day");
            Scenario::from_toml(&text).expect("a day is allowed");
        }
    }
}
