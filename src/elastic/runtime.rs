//! [`ElasticRuntime`]: the actor runtime over worker processes whose membership changes while it
//! trains. Membership changes only at step boundaries, in epochs:
//!
//! - **Join**: an admitted worker waits for the next step boundary; then the new plan keeps
//!   experts and dense tensors where they were, every current worker keeps its committed state,
//!   only the pieces that change owner move ([`super::handover`]), and training goes on. **Leave**
//!   (the worker asked): the same, its pieces going to the others; it is then dismissed and exits
//!   0. Should the hand-over fail, every worker receives its whole share instead.
//! - **Crash** (its connection timed out, or a peer reported it sent malformed data): the step in
//!   flight is abandoned at once; the survivors form a new epoch from the coordinator's last
//!   in-memory copy of the committed state (taken every `snapshot_every` steps), and the steps since
//!   that copy are replayed. Training is deterministic for any number of workers, so the replayed
//!   steps give the same bits, and the run goes on as if nothing had happened.
//!
//! The coordinator is the single authority: it alone holds the run directory and the in-memory
//! copy; a coordinator crash resumes from the last disk checkpoint with `semoe train --resume`.

use super::cluster::{Cluster, Member, Status};
use super::comm_ids::CommIdMaker;
use super::handover::{self, Moves, Pieces};
use super::hooks;
use super::protocol::{self, Command, Reply};
use super::proxy::{self, ProxyActor, ProxyArgs};
use crate::actors::collectives::exchange_lanes;
use crate::actors::ledger::LedgerSnapshot;
use crate::actors::traffic::TrafficEntry;
use crate::actors::worker::WorkerMsg;
use crate::actors::{ask, ActorName, Placement};
use crate::actors::{Runtime, StepOutcome};
use crate::config::{ExpertExchange, TrainConfig};
use crate::error::{Error, Result};
use crate::model::gpt::Gpt;
use crate::optimizer::AdamW;
use crate::telemetry::metrics as names;
use ractor::{Actor, ActorRef};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The committed model and optimizer state.
type TrainState = (Gpt<f32>, AdamW);

/// What happened to the membership, for the report and the summary line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MembershipStats {
    /// The current epoch (1: the first set of workers).
    pub epoch: u64,
    /// Workers in the current epoch.
    pub members: usize,
    /// Workers that joined after the first epoch formed.
    pub joins: u64,
    /// Workers that left in good order.
    pub leaves: u64,
    /// Workers lost (connection timed out or closed, evicted).
    pub crashes: u64,
    /// Steps replayed after losses.
    pub replayed_steps: u64,
    /// Bytes of committed state sent to workers when epochs formed.
    pub state_bytes: u64,
    /// Seconds each of the newest [`HISTORY_KEPT`] membership changes took (from noticing it to
    /// the new epoch ready, the steps the copy lacked replayed).
    pub recovery_seconds: Vec<f64>,
    /// Membership changes timed since the start (`recovery_seconds` holds the newest).
    pub recoveries: u64,
    /// The longest of them, in seconds.
    pub recovery_worst_seconds: f64,
    /// One entry per epoch formed, the newest [`HISTORY_KEPT`].
    pub history: Vec<EpochRecord>,
    /// Epochs formed since the start (`history` holds the newest).
    pub epochs_formed: u64,
}

/// Epoch records and recovery times a run keeps, the newest: a long run with churn forms epochs
/// without end, and the figures are copied whole where they are read.
pub const HISTORY_KEPT: usize = 1024;

impl MembershipStats {
    /// The epochs formed from the `from`-th on (0: the first), as far as they are kept.
    pub fn history_since(&self, from: u64) -> &[EpochRecord] {
        &self.history[kept_since(self.epochs_formed, self.history.len(), from)..]
    }

    /// The times of the membership changes from the `from`-th on, as far as they are kept.
    pub fn recoveries_since(&self, from: u64) -> &[f64] {
        &self.recovery_seconds[kept_since(self.recoveries, self.recovery_seconds.len(), from)..]
    }

    fn record_epoch(&mut self, record: EpochRecord) {
        self.history.push(record);
        self.epochs_formed += 1;
        if self.history.len() > HISTORY_KEPT {
            self.history.remove(0);
        }
    }

    fn record_recovery(&mut self, seconds: f64) {
        self.recovery_seconds.push(seconds);
        self.recoveries += 1;
        self.recovery_worst_seconds = self.recovery_worst_seconds.max(seconds);
        if self.recovery_seconds.len() > HISTORY_KEPT {
            self.recovery_seconds.remove(0);
        }
    }
}

/// Where the entries from the `from`-th on start in a list holding the newest `kept` of `total`.
fn kept_since(total: u64, kept: usize, from: u64) -> usize {
    let first = total.saturating_sub(kept as u64);
    from.saturating_sub(first).min(kept as u64) as usize
}

/// One epoch formed, for the metrics log and the report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochRecord {
    /// The epoch.
    pub epoch: u64,
    /// Steps committed when it formed.
    pub step: u64,
    /// Its workers.
    pub workers: usize,
    /// Why it formed.
    pub why: String,
    /// How the state reached it (see [`StateMove`]).
    pub moved: StateMove,
}

/// The state a new epoch's workers received.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateMove {
    /// Whether the kept workers kept their state and only pieces that changed owner moved (a join
    /// or leave), rather than every worker receiving its whole share (the first epoch, a loss).
    pub handed_over: bool,
    /// Expert units (one expert of one MoE block, with its moments) sent to workers.
    pub expert_units: u64,
    /// Dense tensors sent to workers.
    pub dense_tensors: u64,
    /// Values (parameters and moments) sent to workers.
    pub values: u64,
    /// Bytes of the frames sent to workers.
    pub bytes: u64,
}

/// How an [`ElasticRuntime`] forms epochs.
#[derive(Clone, Debug)]
pub struct ElasticOptions {
    /// Keep an in-memory copy of the committed state every this many steps (what a crash replays
    /// from): more often costs a state read per copy, less often replays more steps.
    pub snapshot_every: u64,
    /// How long to wait for enough workers (the first epoch, or after losing all of them).
    pub wait: Duration,
    /// Workers needed before the first epoch forms.
    pub min_workers: usize,
    /// A chaos run's link faults (empty in a real run). Each epoch's `Setup` carries those of the
    /// steps not attempted yet: a link fault fires in the epoch that first runs its step, and a
    /// step replayed after a membership change (from the in-memory copy) runs without it, so that
    /// a fault that evicts or stalls a worker does not strike again at whoever replays the step.
    pub link_faults: Vec<protocol::LinkFault>,
}

impl Default for ElasticOptions {
    fn default() -> Self {
        ElasticOptions {
            snapshot_every: 20,
            wait: Duration::from_secs(120),
            min_workers: 1,
            link_faults: Vec::new(),
        }
    }
}

/// The state of the current epoch.
struct Epoch {
    number: u64,
    runtime: Runtime,
    proxies: Vec<ActorRef<WorkerMsg>>,
    members: Vec<Member>,
}

/// Where a new epoch's state comes from.
enum Start {
    /// Every member receives its whole share of this state.
    Whole(TrainState),
    /// A join or leave: kept members keep their state and receive what they lack.
    Handover(Handover),
}

/// The pieces handed over at a join or leave, planned for one set of members.
struct Handover {
    /// The members of the new epoch it was planned for.
    members: Vec<u64>,
    plan: Placement,
    /// Per member: whether it starts from the state it kept.
    kept: Vec<bool>,
    /// The pieces that change owner (zero elsewhere), at the committed step.
    pieces: TrainState,
    moves: Moves,
}

/// The last in-memory copy of the committed state: whole (the start's, or the one an epoch was
/// formed from), or the workers' shares as they sent them. Shares are put together only when a
/// loss needs them: most copies are never used, and putting each together would copy the whole
/// model and its moments again every few steps, on the cores that train.
enum SafeCopy {
    Whole(Box<TrainState>),
    Shares { step: u64, shares: Vec<LedgerSnapshot> },
}

impl SafeCopy {
    /// The optimizer step the copy is of.
    fn step(&self) -> u64 {
        match self {
            SafeCopy::Whole(state) => state.1.step,
            SafeCopy::Shares { step, .. } => *step,
        }
    }

    /// The copy as a whole model and optimizer.
    fn state(&self, config: &TrainConfig) -> Result<TrainState> {
        match self {
            SafeCopy::Whole(state) => Ok((**state).clone()),
            SafeCopy::Shares { shares, .. } => crate::actors::runtime::assemble(config, shares),
        }
    }
}

/// Training over worker processes that join and leave (see the module documentation).
pub struct ElasticRuntime {
    cluster: Cluster,
    config: Arc<TrainConfig>,
    options: ElasticOptions,
    current: Option<Epoch>,
    /// The last in-memory copy of the committed state.
    safe: SafeCopy,
    /// Steps committed (the optimizer's step count).
    committed: u64,
    stats: MembershipStats,
    /// The test hook [`hooks::MEMBERS_AT`] (empty in a real run).
    members_at: Vec<(u64, usize)>,
    /// Non-zero: the run is asked to stop (a waiting for workers ends at once).
    stop: Arc<std::sync::atomic::AtomicUsize>,
    /// A copy of the committed state being read in the background (while the next steps run).
    copying: Option<tokio::task::JoinHandle<Result<SafeCopy>>>,
    /// The last epoch's members (by id, in worker order) and plan: the next plan moves as little
    /// as possible from it.
    last_plan: Option<(Vec<u64>, Placement)>,
    /// Every member (by id) that took part in an epoch: one that leaves without ever doing so
    /// held no state.
    took_part: std::collections::BTreeSet<u64>,
    /// Epochs formed again for a lost link since the last committed step (bounded: a link that
    /// keeps failing ends the run).
    relinks: u32,
    /// Bytes sent between members (by id) in the epochs that ended, by kind.
    traffic_closed: std::collections::BTreeMap<(u64, u64, String), u64>,
    /// The current epoch's figures of each member (by id) when it last answered: what a member
    /// lost, or one that does not answer in time, keeps of its epoch.
    traffic_last: std::collections::BTreeMap<u64, Vec<TrafficEntry>>,
    /// The current epoch's figures being asked in the background (with each in-memory copy, so
    /// that a member lost later has figures of most of its epoch).
    traffic_asking: Option<TrafficAsk>,
    /// The latest step an epoch began to run (`None`: none yet); link faults of later steps only
    /// go to new epochs ([`ElasticOptions::link_faults`]).
    attempted: Option<u64>,
    /// Steps whose metrics were recorded, shared with every epoch's runtime: a step an epoch
    /// committed (even one whose caller gave up on it at a loss) is not recorded again when the
    /// next epoch replays it.
    reported: Arc<std::sync::atomic::AtomicU64>,
    /// Members of a formed epoch counted as lost: each once, whether it was found gone as the
    /// epoch ended, during the hand-over or in a failed attempt at the next one.
    counted_lost: std::collections::BTreeSet<u64>,
}

/// A member's figures (by id): the bytes it sent each other member of its epoch, by kind.
type MemberTraffic = (u64, Vec<TrafficEntry>);

/// An ask of members' figures: the task, and the answers as they arrive (kept when the task is
/// stopped before a slow member answers).
struct TrafficAsk {
    task: tokio::task::JoinHandle<()>,
    answers: Arc<std::sync::Mutex<Vec<MemberTraffic>>>,
}

impl TrafficAsk {
    /// Ask each of `asked` (members of epoch `number`, whose members are `members`) at once, each
    /// within `wait`.
    fn start(number: u64, members: Vec<Member>, asked: Vec<Member>, wait: Duration) -> TrafficAsk {
        let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let arrived = answers.clone();
        let members = Arc::new(members);
        let task = tokio::spawn(async move {
            let mut asks = tokio::task::JoinSet::new();
            for m in asked {
                let members = members.clone();
                asks.spawn(async move { (m.id, ask_member_traffic(number, &members, &m, wait).await) });
            }
            while let Some(joined) = asks.join_next().await {
                if let Ok((id, Ok(sent))) = joined {
                    arrived
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((id, sent));
                }
            }
        });
        TrafficAsk { task, answers }
    }
}

/// The bytes member `m` of epoch `number` (whose members are `members`) sent each other member in
/// it, by kind (members by id), asked within `wait`.
async fn ask_member_traffic(number: u64, members: &[Member], m: &Member, wait: Duration) -> Result<Vec<TrafficEntry>> {
    let who = format!("member {} ({})", m.id, m.name);
    let command = Command::Traffic { epoch: number };
    let reply = tokio::time::timeout(wait, proxy::call(&m.conn, &who, &command, None, 1 << 20))
        .await
        .map_err(|_| {
            Error::runtime(format!(
                "{who} did not report its traffic within {} s",
                wait.as_secs_f64()
            ))
        })??;
    let Reply::Traffic(sent) = protocol::decode::<Reply>(&reply, "a traffic reply")? else {
        return Err(Error::protocol(who, "answered a traffic request with something else"));
    };
    let mut all: Vec<TrafficEntry> = Vec::new();
    for (to, kind, bytes) in sent {
        let to = members
            .get(to as usize)
            .ok_or_else(|| Error::protocol(who.clone(), format!("reported traffic to worker {to}")))?;
        // Kept for the rest of the run: only the kinds there are, each once per peer.
        if !crate::telemetry::metrics::ALLTOALL_KINDS.contains(&kind.as_str()) {
            let kind: String = kind.chars().take(64).collect();
            return Err(Error::protocol(
                who,
                format!("reported traffic of an unknown kind {kind:?}"),
            ));
        }
        if all.iter().any(|e| e.to == to.id && e.kind == kind) {
            return Err(Error::protocol(
                who,
                format!("reported its {kind} traffic to member {} twice", to.id),
            ));
        }
        all.push(TrafficEntry {
            from: m.id,
            to: to.id,
            kind,
            bytes,
        });
    }
    Ok(all)
}

/// Over NCCL the coordinator makes the communicators' ids (and hosts their bootstrap): say when
/// it cannot before workers are started or awaited, not at the first epoch.
pub fn check_nccl(config: &TrainConfig) -> Result<()> {
    if config.train.exchange == ExpertExchange::Nccl {
        crate::net::collective::nccl_unique_id()
            .map_err(|e| Error::config(format!("train.exchange = \"nccl\" with worker processes: {e}")))?;
    }
    Ok(())
}

impl ElasticRuntime {
    /// Train `config` from `model` and `optimizer` over the workers that join `cluster`: waits
    /// for `options.min_workers` of them, then forms the first epoch.
    pub async fn start(
        cluster: Cluster,
        config: TrainConfig,
        model: Gpt<f32>,
        optimizer: AdamW,
        options: ElasticOptions,
    ) -> Result<ElasticRuntime> {
        check_nccl(&config)?;
        let committed = optimizer.step;
        let mut rt = ElasticRuntime {
            cluster,
            config: Arc::new(config),
            options,
            current: None,
            safe: SafeCopy::Whole(Box::new((model, optimizer))),
            committed,
            stats: MembershipStats::default(),
            relinks: 0,
            members_at: hooks::members_at()?,
            stop: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            copying: None,
            last_plan: None,
            took_part: std::collections::BTreeSet::new(),
            traffic_closed: Default::default(),
            traffic_last: Default::default(),
            traffic_asking: None,
            attempted: None,
            reported: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            counted_lost: std::collections::BTreeSet::new(),
        };
        let wanted = rt.options.min_workers.max(1);
        rt.wait_for(wanted).await?;
        rt.reform("start").await?;
        Ok(rt)
    }

    /// The control plane (its address, its members).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Membership figures so far.
    pub fn stats(&self) -> &MembershipStats {
        &self.stats
    }

    /// Wait until at least `n` members wait or are active.
    async fn wait_for(&self, n: usize) -> Result<()> {
        let since = Instant::now();
        loop {
            if self.stop.load(std::sync::atomic::Ordering::SeqCst) != 0 {
                return Err(Error::runtime("the run was asked to stop while it waited for workers"));
            }
            let ready = self
                .cluster
                .members()
                .iter()
                .filter(|m| matches!(m.status, Status::Waiting | Status::Active))
                .count();
            if ready >= n {
                return Ok(());
            }
            if since.elapsed() > self.options.wait {
                return Err(Error::runtime(format!(
                    "only {ready} of {n} workers joined {} within {:.0} s (start them with `semoe worker --ticket FILE`)",
                    self.cluster.addr(),
                    self.options.wait.as_secs_f64()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The test hook: wait until exactly `wanted` members are in (not leaving, not gone).
    async fn hold_for(&self, wanted: usize) -> Result<()> {
        let since = Instant::now();
        crate::say!(
            "semoe: {}: holding before step {} until {wanted} workers are members",
            hooks::MEMBERS_AT,
            self.committed
        );
        loop {
            let staying = self
                .cluster
                .members()
                .iter()
                .filter(|m| matches!(m.status, Status::Waiting | Status::Active))
                .count();
            if staying == wanted {
                return Ok(());
            }
            if since.elapsed() > Duration::from_secs(60) {
                return Err(Error::runtime(format!(
                    "{}: {staying} members, not {wanted}, before step {}",
                    hooks::MEMBERS_AT,
                    self.committed
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The most members an epoch takes: one per data group, and beyond the groups one per expert
    /// (a member beyond the groups runs no group but hosts experts and owns dense tensors; past
    /// both it would host nothing, so further joiners wait until a member leaves).
    fn max_members(&self) -> usize {
        self.config.train.groups.max(self.config.model.experts).max(1)
    }

    /// Whether the membership changed since the current epoch formed: a member lost, leaving, or
    /// waiting to join.
    fn change(&self, losses_only: bool) -> Option<String> {
        let Some(epoch) = &self.current else {
            return Some("no epoch".into());
        };
        for a in &epoch.members {
            match self.cluster.status(a.id) {
                Some(Status::Gone(why)) => return Some(format!("member {} lost: {why}", a.id)),
                None => return Some(format!("member {} lost", a.id)),
                Some(_) => {}
            }
        }
        // Every member is there but two of them lost their link: a new epoch connects anew.
        if let Some(why) = self.lost_link(LINK_LOSS_GRACE) {
            return Some(format!("a link was lost ({why})"));
        }
        for m in &self.cluster.members() {
            let active = epoch.members.iter().any(|a| a.id == m.id);
            match (&m.status, active) {
                _ if losses_only => {}
                // A waiting member that leaves is dismissed at the boundary (see `step`): the
                // epoch it never joined does not form again for it.
                (Status::Leaving, true) => return Some(format!("member {} leaves", m.id)),
                (Status::Waiting, false) if epoch.members.len() < self.max_members() => {
                    return Some(format!("member {} joins", m.id))
                }
                _ => {}
            }
        }
        None
    }

    /// Whether a member of the current epoch is lost within `wait`.
    async fn loss_within(&self, wait: Duration) -> bool {
        let since = Instant::now();
        loop {
            if self.lost_member() {
                return true;
            }
            if since.elapsed() >= wait {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lost_member(&self) -> bool {
        self.current.as_ref().is_some_and(|e| self.member_of_lost(e))
    }

    /// Whether a member of `epoch` is lost (gone, or no longer known).
    fn member_of_lost(&self, epoch: &Epoch) -> bool {
        epoch
            .members
            .iter()
            .any(|m| matches!(self.cluster.status(m.id), Some(Status::Gone(_)) | None))
    }

    /// The link two members of the current epoch lost, reported at least `min_age` ago, while no
    /// member is lost (a crash shows as lost links first; it is handled as a loss). Between steps
    /// a loss waits [`LINK_LOSS_GRACE`] to be explained by a crash; after a failed step that
    /// already waited the grace ([`Self::loss_within`]), one reported at any time counts (its
    /// notice may have come after the step's error).
    fn lost_link(&self, min_age: Duration) -> Option<String> {
        let epoch = self.current.as_ref()?;
        let (since, why) = self.cluster.link_lost(epoch.number)?;
        (since.elapsed() >= min_age && !self.lost_member()).then_some(why)
    }

    /// The flag that asks the run to stop: a wait for workers ends as soon as it is set (after
    /// every worker left, the coordinator holds the only copy of the state: a second signal, or a
    /// pod's SIGKILL after its grace period, must not find it still waiting).
    pub fn set_stop_flag(&mut self, flag: Arc<std::sync::atomic::AtomicUsize>) {
        self.stop = flag;
    }

    /// Whether an epoch is formed (none after every worker left or was lost and none joined).
    pub fn has_epoch(&self) -> bool {
        self.current.is_some()
    }

    /// Run one step to its commit, through any membership change.
    pub async fn step(&mut self) -> Result<StepOutcome> {
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > 16 {
                return Err(Error::runtime(
                    "the membership kept changing: 16 epochs without a committed step",
                ));
            }
            // The test hook: joins and leaves land exactly at its steps (losses at once).
            let at_hook = match self.members_at.iter().position(|(s, _)| *s == self.committed) {
                Some(i) => {
                    let (_, wanted) = self.members_at.remove(i);
                    self.hold_for(wanted).await?;
                    true
                }
                None => false,
            };
            let defer = !at_hook && !self.members_at.is_empty();
            if !defer {
                self.dismiss_leavers().await;
            }
            if let Some(why) = self.change(defer) {
                self.reform(&why).await?;
            }
            let Some(epoch) = &self.current else {
                return Err(Error::runtime("no epoch"));
            };
            self.attempted = Some(self.attempted.map_or(self.committed, |a| a.max(self.committed)));
            let outcome = tokio::select! {
                r = epoch.runtime.step() => r,
                () = watch_loss(&self.cluster, epoch.number, &epoch.members) => continue,
            };
            match outcome {
                Ok(o) => {
                    self.committed = o.step;
                    self.relinks = 0;
                    self.collect_copy().await?;
                    self.take_traffic_answers(false);
                    if self.copying.is_none()
                        && self.committed.saturating_sub(self.safe.step()) >= self.options.snapshot_every.max(1)
                    {
                        self.start_copy();
                        self.start_traffic_ask();
                    }
                    return Ok(o);
                }
                // A step that failed because a worker was lost is taken again in the next epoch
                // (the loss may be recorded a moment after the step's error arrives). So is one
                // that failed because two members lost their link, every member still there: the
                // next epoch connects them anew. A crash shows as lost links too, so the links
                // count only once no member was lost meanwhile.
                Err(e) => {
                    if self.loss_within(LINK_LOSS_GRACE).await {
                        continue;
                    }
                    // The grace has passed since the error: a lost link of any age forms the next
                    // epoch now (`change` would wait for it to age, retrying on the broken one).
                    if let Some(why) = self.lost_link(Duration::ZERO) {
                        self.reform(&format!("a link was lost ({why})")).await?;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Start reading the committed state of the step just committed, in the background, while the
    /// next steps compute. Each worker's Worker actor takes its copy before it handles the next
    /// commit (the request is queued long before that commit is sent), so the copy is of this
    /// step; every share must say so, or the copy is dropped.
    fn start_copy(&mut self) {
        let Some(epoch) = &self.current else { return };
        let proxies = epoch.proxies.clone();
        let config = self.config.clone();
        let step = self.committed;
        let deadline = Duration::from_secs_f64(config.train.deadline_s).saturating_mul(4);
        self.copying = Some(tokio::spawn(async move {
            let mut asks = tokio::task::JoinSet::new();
            for (i, p) in proxies.into_iter().enumerate() {
                asks.spawn(async move {
                    let name = ActorName(format!("worker {i}"));
                    let r = ask(&p, &name, "a copy of the state", deadline, |reply| {
                        WorkerMsg::Snapshot { reply }
                    })
                    .await;
                    (i, r)
                });
            }
            let mut snaps = Vec::new();
            while let Some(joined) = asks.join_next().await {
                let (i, r) = joined.map_err(|e| Error::runtime(format!("a copy task failed: {e}")))?;
                snaps.push((i, r?));
            }
            snaps.sort_by_key(|(i, _)| *i);
            let snaps: Vec<_> = snaps.into_iter().map(|(_, s)| s).collect();
            if let Some(s) = snaps.iter().find(|s| s.step != step) {
                return Err(Error::runtime(format!(
                    "a worker's copy is of step {}, not {step}",
                    s.step
                )));
            }
            // Checked now (every tensor covered exactly once), put together only when needed.
            crate::actors::runtime::check_cover(&config, &snaps)?;
            Ok(SafeCopy::Shares { step, shares: snaps })
        }));
    }

    /// Take the background copy if it is done (a failed one is dropped: the older copy stays,
    /// and the next one is started later).
    async fn collect_copy(&mut self) -> Result<()> {
        if self.copying.as_ref().is_some_and(|t| t.is_finished()) {
            if let Some(task) = self.copying.take() {
                match task.await {
                    Ok(Ok(state)) => self.safe = state,
                    Ok(Err(e)) if !self.lost_member() => {
                        crate::say!("semoe: warning: the in-memory copy of the state failed: {e}");
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The committed state, read from the workers. Only a loss forms a new epoch first: a member
    /// that asked to leave still holds its share and answers (a terminal's Ctrl-C reaches the
    /// worker processes the coordinator started as well: every one of them asks to leave while
    /// the coordinator reads the state for its final checkpoint); joins and leaves wait for the
    /// next step.
    pub async fn state(&mut self) -> Result<(Gpt<f32>, AdamW)> {
        // No epoch (every worker left and none joined, see [`Error::NoWorkers`]): the state the
        // coordinator kept.
        if self.current.is_none() {
            return self.safe.state(&self.config);
        }
        // Members that are leaving still answer: while none is lost and every link held, the
        // current epoch's state is whole and current, read before any re-form for the leavers
        // (with every member leaving, as at a Ctrl-C to the process group, a re-form would find
        // nobody, wait for a joiner and lose the state).
        if !self.lost_member() && self.lost_link(Duration::ZERO).is_none() {
            if let Some(epoch) = &self.current {
                if let Ok(s) = epoch.runtime.state().await {
                    return Ok(s);
                }
            }
        }
        for _ in 0..16 {
            if let Some(why) = self.change(true) {
                self.reform(&why).await?;
            }
            let Some(epoch) = &self.current else { break };
            match epoch.runtime.state().await {
                Ok(s) => return Ok(s),
                Err(_) if self.lost_member() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::runtime("cannot read the state: the membership kept changing"))
    }

    /// Form a new epoch from the members waiting or active now, and replay the steps its starting
    /// state lacks; again while a member or link is lost during the replay, at most
    /// [`MAX_REPLAY_LOSSES`] times (a member that a supervisor restarts and the run loses again
    /// in every replay must not keep the run from committing, nor hold a copy of the state per
    /// attempt). The recovery is timed from the first loss.
    async fn reform(&mut self, why: &str) -> Result<()> {
        let started = Instant::now();
        let mut why = why.to_string();
        for _ in 0..MAX_REPLAY_LOSSES {
            match self.reform_once(&why, started).await? {
                Formed::Replayed => return Ok(()),
                Formed::LostInReplay(again) => why = again.to_string(),
            }
        }
        Err(Error::runtime(format!(
            "the membership kept changing: {MAX_REPLAY_LOSSES} epochs lost a worker or a link before their replay ended"
        )))
    }

    /// One epoch formed and its replay run (see [`Self::reform`]), `started` at the first loss.
    async fn reform_once(&mut self, why: &str, started: Instant) -> Result<Formed> {
        // A finished copy is taken; one still in flight is of no use once the epoch changes (its
        // proxies go).
        self.collect_copy().await?;
        if let Some(task) = self.copying.take() {
            task.abort();
        }
        // The state the new epoch starts from: the current one when every worker is there and
        // every link held, the last copy otherwise (then the steps since are replayed). A step cut
        // short by a lost link may have been committed by some members and not others (a commit
        // sends parameters over the links), so the members' state is not trusted then.
        // (`lost_link` holds only while no member is lost; of any age here: a link lost a moment
        // ago may have cut a commit short as well.)
        let relink = self.lost_link(Duration::ZERO).is_some();
        if relink {
            self.relinks += 1;
            if self.relinks > MAX_RELINKS {
                return Err(Error::runtime(format!(
                    "links between members kept failing: {MAX_RELINKS} epochs formed again without a committed step"
                )));
            }
        }
        let from_copy = self.current.is_none() || self.lost_member() || relink;
        // The ending epoch's members, counted as lost once gone (not left): now, and again after
        // the hand-over and each attempt, where one may be lost too.
        let ending: Vec<u64> = self
            .current
            .iter()
            .flat_map(|e| e.members.iter().map(|m| m.id))
            .collect();
        self.count_lost(&ending);
        // The ending epoch's traffic: asked of its members still there (a second each after a
        // loss: a recovery does not wait on a slow answer); the others keep their last figures.
        if let Some(epoch) = &self.current {
            let wait = Duration::from_secs(if from_copy { 1 } else { 5 });
            let number = epoch.number;
            let members = epoch.members.clone();
            self.refresh_traffic(number, &members, wait).await;
        }
        for e in std::mem::take(&mut self.traffic_last).into_values().flatten() {
            // Counts a worker reports: saturating, so that a forged one cannot overflow.
            let total = self.traffic_closed.entry((e.from, e.to, e.kind)).or_default();
            *total = total.saturating_add(e.bytes);
        }
        let live: std::collections::BTreeSet<u64> = self.cluster.members().iter().map(|m| m.id).collect();
        crate::actors::traffic::fold_departed(&mut self.traffic_closed, &live, crate::actors::traffic::DEPARTED_KEPT);
        let mut handover = None;
        // Nobody to hand the state over to (every member leaves, none waits to join): it is read
        // whole, and kept while the coordinator waits for a joiner (see below).
        let nobody_next = self.next_members().is_empty();
        let whole = match self.current.take() {
            Some(epoch) if !from_copy && nobody_next => {
                let s = epoch.runtime.state().await;
                dismantle(epoch).await;
                Some(match s {
                    Ok(s) => s,
                    Err(_) => self.safe.state(&self.config)?,
                })
            }
            Some(epoch) if !from_copy => match self.hand_over(&epoch).await {
                Ok(h) => {
                    dismantle(epoch).await;
                    handover = Some(h);
                    None
                }
                Err(e) => {
                    // (The epoch is out of `self.current` here: its own members are asked.)
                    if !self.member_of_lost(&epoch) {
                        crate::say!("semoe: the hand-over failed ({e}); every worker receives its whole share");
                    }
                    let s = epoch.runtime.state().await;
                    dismantle(epoch).await;
                    Some(match s {
                        Ok(s) => s,
                        Err(_) => self.safe.state(&self.config)?,
                    })
                }
            },
            Some(epoch) => {
                dismantle(epoch).await;
                None
            }
            None => None,
        };
        // Failed attempts per joining member (see below).
        let mut failures = std::collections::BTreeMap::<u64, u32>::new();
        for attempt in 0..8 {
            self.count_lost(&ending);
            let members = self.next_members();
            if members.is_empty() {
                // Every worker left (or was lost): the state read whole from the leavers becomes
                // the copy a joiner starts from, or what the run checkpoints if none comes; the
                // leavers, whose state is kept, are let go at once.
                if let Some(w) = &whole {
                    self.safe = SafeCopy::Whole(Box::new(w.clone()));
                }
                self.dismiss_leavers().await;
                self.stats.members = 0;
                metrics::gauge!(names::MEMBERS).set(0.0);
                crate::say!(
                    "semoe: no workers left at step {}; waiting up to {:.0} s for one to join",
                    self.safe.step(),
                    self.options.wait.as_secs_f64()
                );
                if self.wait_for(1).await.is_err() {
                    return Err(Error::NoWorkers {
                        step: self.safe.step(),
                        waited_s: self.options.wait.as_secs_f64(),
                    });
                }
                continue;
            }
            let epoch_no = self.stats.epoch + 1;
            let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
            let start = match handover.take() {
                Some(h) if h.members == ids => Start::Handover(h),
                // Planned for other members, or an attempt failed: the last copy, replayed.
                _ => Start::Whole(match &whole {
                    Some(w) => w.clone(),
                    None => self.safe.state(&self.config)?,
                }),
            };
            let from = match &start {
                Start::Whole(state) => state.1.step,
                Start::Handover(_) => self.committed,
            };
            // Known to the cluster before its setups go out: a member's notice about it (a lost
            // link, a peer evicted) can come as soon as its data plane is in the epoch.
            self.cluster.begin_epoch(epoch_no, ids.clone());
            match self.form(epoch_no, &members, &start).await {
                Ok((epoch, moved)) => {
                    let joins = members.iter().filter(|m| m.status == Status::Waiting).count() as u64;
                    // Not the start (an epoch formed before; a failed first attempt already
                    // counted in `stats.epoch`): its members joined, and it was a recovery (timed
                    // below, once the steps the copy lacks are replayed).
                    let recovery = self.stats.epochs_formed > 0;
                    if recovery {
                        self.stats.joins += joins;
                    }
                    self.stats.epoch = epoch_no;
                    self.stats.members = members.len();
                    self.stats.record_epoch(EpochRecord {
                        epoch: epoch_no,
                        step: self.committed,
                        workers: members.len(),
                        why: why.to_string(),
                        moved: moved.clone(),
                    });
                    for m in &members {
                        self.cluster.activate(m.id);
                    }
                    metrics::gauge!(names::EPOCH).set(epoch_no as f64);
                    metrics::gauge!(names::MEMBERS).set(members.len() as f64);
                    self.current = Some(epoch);
                    self.dismiss_leavers().await;
                    // Replay what the copy lacks; the outcomes were reported the first time.
                    for _ in from..self.committed {
                        // A member lost during the replay ends it at once, as in a step (its
                        // peers' requests to it would wait out the exchange deadline).
                        let replayed = match &self.current {
                            Some(e) => tokio::select! {
                                r = e.runtime.step() => r,
                                () = watch_loss(&self.cluster, e.number, &e.members) => {
                                    return Ok(Formed::LostInReplay("a worker was lost during the replay"));
                                }
                            },
                            None => break,
                        };
                        if let Err(e) = replayed {
                            if self.loss_within(LINK_LOSS_GRACE).await {
                                return Ok(Formed::LostInReplay("a worker was lost during the replay"));
                            }
                            if self.lost_link(Duration::ZERO).is_some() {
                                return Ok(Formed::LostInReplay("a link was lost during the replay"));
                            }
                            return Err(e);
                        }
                        self.stats.replayed_steps += 1;
                        metrics::counter!(names::REPLAYED_STEPS).increment(1);
                    }
                    if let Start::Whole(state) = start {
                        self.safe = SafeCopy::Whole(Box::new(state));
                    }
                    if recovery {
                        self.stats.record_recovery(started.elapsed().as_secs_f64());
                        metrics::histogram!(names::RECOVERY_SECONDS).record(started.elapsed().as_secs_f64());
                    }
                    crate::say!(
                        "semoe: epoch {epoch_no}: {} workers at step {} ({why}; {:.2} s; {})",
                        members.len(),
                        self.committed,
                        started.elapsed().as_secs_f64(),
                        describe(&moved)
                    );
                    return Ok(Formed::Replayed);
                }
                Err(e) => {
                    crate::say!(
                        "semoe: epoch {epoch_no} did not form (attempt {} of 8): {e}",
                        attempt + 1
                    );
                    self.stats.epoch = epoch_no;
                    // Newcomers that keep the epoch from forming (a wrong --advertise, a
                    // firewalled port) must not cost the run: one that took part in two failed
                    // attempts is refused, and the members of before go on (or, after every
                    // worker left, the coordinator waits for another). Not in the first epoch:
                    // its members are all new, and none is singled out.
                    if members.iter().any(|m| m.status != Status::Waiting) || self.stats.epochs_formed > 0 {
                        for m in members.iter().filter(|m| m.status == Status::Waiting) {
                            let failed = failures.entry(m.id).or_insert(0u32);
                            *failed += 1;
                            if *failed >= 2 {
                                let reason =
                                    format!("refused: epoch {epoch_no} did not form with it, twice (last: {e})");
                                crate::say!("semoe: member {} ({}) {reason}", m.id, m.name);
                                self.cluster.evict(m.id, &reason);
                            }
                        }
                    }
                    if attempt == 7 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(Error::runtime("no epoch could be formed after 8 attempts"))
    }

    /// The plan for `members`: where the last epoch's plan put things, moved as little as
    /// possible; the configured placement for a first epoch.
    fn plan_for(&self, members: &[Member], model: &Gpt<f32>) -> Result<Placement> {
        match &self.last_plan {
            Some((ids, plan)) => {
                let origin: Vec<Option<usize>> =
                    members.iter().map(|m| ids.iter().position(|&id| id == m.id)).collect();
                Placement::rebalanced(model.config(), self.config.train.groups, plan, &origin)
            }
            None => Placement::new(
                model,
                self.config.train.groups,
                members.len(),
                &self.config.train.placement.parse()?,
            ),
        }
    }

    /// A join or leave without a loss: plan the next epoch for the members waiting or active now,
    /// have every worker of `epoch` keep its state, and collect the pieces that change owner.
    async fn hand_over(&mut self, epoch: &Epoch) -> Result<Handover> {
        let members = self.next_members();
        let specs = self.config.model.tensor_specs();
        let old_plan = epoch.runtime.placement().clone();
        let origin: Vec<Option<usize>> = members
            .iter()
            .map(|m| epoch.members.iter().position(|o| o.id == m.id))
            .collect();
        let plan = Placement::rebalanced(&self.config.model, self.config.train.groups, &old_plan, &origin)?;
        let moves = handover::plan_moves(&self.config, &specs, &old_plan, &plan, &origin)?;
        let max_reply = proxy::max_reply_bytes(&self.config)?;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, m) in epoch.members.iter().enumerate() {
            let asked = moves.from[i].clone();
            // As a setup's: longer for more state (50 MB/s is a slow link's pace).
            let deadline = (Duration::from_secs_f64(self.config.train.deadline_s) * 2)
                .max(Duration::from_secs_f64(4.0 * asked.values(&specs)? as f64 / 50e6));
            let command = Command::Hand {
                epoch: epoch.number,
                dense: asked.dense.iter().map(|&(t, m)| (t as u64, m)).collect(),
                experts: asked.experts.iter().map(|&(b, e)| (b as u64, e as u64)).collect(),
            };
            let conn = m.conn.clone();
            let who = format!("member {} ({})", m.id, m.name);
            tasks.spawn(async move {
                let r = tokio::time::timeout(deadline, proxy::call(&conn, &who, &command, None, max_reply))
                    .await
                    .map_err(|_| Error::Deadline {
                        peer: who.clone(),
                        what: "a hand-over".into(),
                        deadline_ms: deadline.as_millis() as u64,
                    })
                    .and_then(|r| r);
                (i, who, asked, r)
            });
        }
        let mut replies = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (i, who, asked, r) = joined.map_err(|e| Error::runtime(format!("a hand-over task failed: {e}")))?;
            replies.push((i, who, asked, r?));
        }
        let (config, committed) = (self.config.clone(), self.committed);
        let decoded = tokio::task::spawn_blocking(move || -> std::result::Result<TrainState, (usize, Error)> {
            let fresh = || -> Result<TrainState> {
                let model = Gpt::<f32>::zeros(&config.model)?;
                let mut optimizer = crate::optimizer::for_model(&config.optimizer, &model)?;
                optimizer.step = committed;
                Ok((model, optimizer))
            };
            let (mut model, mut optimizer) = fresh().map_err(|e| (usize::MAX, e))?;
            for (i, who, asked, bytes) in replies {
                let header = protocol::decode_hand_into(&config, &who, &bytes, &mut model, &mut optimizer)
                    .map_err(|e| (i, e))?;
                // At step 0 the pieces' own check waives the step (a fresh state has none yet):
                // pieces of another step would move the schedule and the data on.
                if header.step != committed {
                    let detail = format!(
                        "handed over pieces of step {}, not of the committed step {committed}",
                        header.step
                    );
                    return Err((i, Error::protocol(who, detail)));
                }
                let got = Pieces {
                    dense: header.dense.iter().map(|&(t, m)| (t as usize, m)).collect(),
                    experts: header.experts.iter().map(|&(b, e)| (b as usize, e as usize)).collect(),
                };
                if got != asked {
                    return Err((i, Error::protocol(who, "handed over other pieces than asked")));
                }
            }
            Ok((model, optimizer))
        })
        .await
        .map_err(|e| Error::runtime(format!("a decoding task failed: {e}")))?;
        let pieces = match decoded {
            Ok(pieces) => pieces,
            Err((i, e)) => {
                // Malformed data from an authenticated member: evicted, as a proxy evicts one that
                // sends a malformed reply (a failure it reported is not malformed).
                if let (Some(m), Error::Parse { .. } | Error::Protocol { .. }) = (epoch.members.get(i), &e) {
                    let reason = format!("evicted: it sent a malformed hand-over ({e})");
                    m.conn.close(3u32.into(), &reason.as_bytes()[..reason.len().min(512)]);
                }
                return Err(e);
            }
        };
        Ok(Handover {
            members: members.iter().map(|m| m.id).collect(),
            plan,
            kept: origin.iter().map(Option::is_some).collect(),
            pieces,
            moves,
        })
    }

    /// Ask every member of epoch `number` still there for its figures, each within `wait`, at
    /// once; keep each answer as that member's latest (one that does not answer keeps its last).
    /// Answers asked in the background are taken first, or dropped if not in yet.
    async fn refresh_traffic(&mut self, number: u64, members: &[Member], wait: Duration) {
        self.take_traffic_answers(true);
        let there: Vec<Member> = members
            .iter()
            .filter(|m| !matches!(self.cluster.status(m.id), Some(Status::Gone(_)) | None))
            .cloned()
            .collect();
        let mut ask = TrafficAsk::start(number, members.to_vec(), there, wait);
        let _ = (&mut ask.task).await;
        self.traffic_asking = Some(ask);
        self.take_traffic_answers(true);
    }

    /// Start asking the current epoch's members for their figures in the background (nothing
    /// if an ask is still under way).
    fn start_traffic_ask(&mut self) {
        let Some(epoch) = &self.current else { return };
        if self.traffic_asking.as_ref().is_some_and(|a| !a.task.is_finished()) {
            return;
        }
        let members = epoch.members.clone();
        self.traffic_asking = Some(TrafficAsk::start(
            epoch.number,
            members.clone(),
            members,
            Duration::from_secs(5),
        ));
    }

    /// Keep the answers a background ask has had so far (`end`: the epoch ends, so an ask not
    /// finished is stopped; later answers would be of an epoch already folded).
    fn take_traffic_answers(&mut self, end: bool) {
        let Some(ask) = self.traffic_asking.take() else { return };
        let finished = ask.task.is_finished();
        if end && !finished {
            ask.task.abort();
        }
        let arrived = std::mem::take(&mut *ask.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        self.traffic_last.extend(arrived);
        if !end && !finished {
            self.traffic_asking = Some(ask);
        }
    }

    /// Bytes sent between members (by id), by kind, over the run so far: the epochs that ended
    /// and the current one (asked now; a member that cannot answer counts its last figures).
    pub async fn traffic(&mut self) -> Vec<TrafficEntry> {
        if let Some(epoch) = &self.current {
            let (number, members) = (epoch.number, epoch.members.clone());
            self.refresh_traffic(number, &members, Duration::from_secs(5)).await;
        }
        let mut all = self.traffic_closed.clone();
        for e in self.traffic_last.values().flatten() {
            let total = all.entry((e.from, e.to, e.kind.clone())).or_default();
            *total = total.saturating_add(e.bytes);
        }
        all.into_iter()
            .map(|((from, to, kind), bytes)| TrafficEntry { from, to, kind, bytes })
            .collect()
    }

    /// The members the next epoch takes: waiting or active, at most [`Self::max_members`].
    fn next_members(&self) -> Vec<Member> {
        let mut all: Vec<Member> = self
            .cluster
            .members()
            .into_iter()
            .filter(|m| matches!(m.status, Status::Waiting | Status::Active))
            .collect();
        all.truncate(self.max_members());
        all
    }

    /// Send every member its setup and the state; start the runtime over their proxies.
    async fn form(&mut self, epoch: u64, members: &[Member], start: &Start) -> Result<(Epoch, StateMove)> {
        let (plan, state) = match start {
            Start::Whole(state) => (self.plan_for(members, &state.0)?, state),
            Start::Handover(h) => (h.plan.clone(), &h.pieces),
        };
        let specs = state.0.specs();
        // What each member receives, and whether it builds on the state it kept.
        let (sends, kept): (Vec<Pieces>, Vec<bool>) = match start {
            Start::Whole(_) => (
                (0..members.len())
                    .map(|w| Pieces::held_by(&self.config, &specs, &plan, w))
                    .collect(),
                vec![false; members.len()],
            ),
            Start::Handover(h) => (h.moves.to.clone(), h.kept.clone()),
        };
        let mut moved = StateMove {
            handed_over: matches!(start, Start::Handover(_)),
            ..StateMove::default()
        };
        for p in &sends {
            moved.expert_units += p.experts.len() as u64;
            moved.dense_tensors += p.dense.len() as u64;
            moved.values += p.values(&specs)? as u64;
        }
        let shares = {
            // Tens of megabytes: encoded off the async threads, which carry the keep-alives.
            let (config, state, sends) = (self.config.clone(), state.clone(), sends);
            tokio::task::spawn_blocking(move || {
                sends
                    .iter()
                    .map(|p| protocol::encode_pieces(&config, &state.0, &state.1, p).map(Arc::new))
                    .collect::<Result<Vec<_>>>()
            })
            .await
            .map_err(|e| Error::runtime(format!("an encoding task failed: {e}")))??
        };
        let moved_bytes: usize = shares.iter().map(|s| s.len()).sum();
        moved.bytes = moved_bytes as u64;
        let owners = |v: &[usize]| -> Vec<u32> { v.iter().map(|&w| u32::try_from(w).unwrap_or(u32::MAX)).collect() };
        let peers: Vec<String> = members.iter().map(|m| m.data_addr.to_string()).collect();
        // Twice the collective deadline, longer for a state that takes longer to send (all shares
        // leave the coordinator's one link at once; 50 MB/s is a slow link's pace).
        let deadline = (Duration::from_secs_f64(self.config.train.deadline_s) * 2)
            .max(Duration::from_secs_f64(moved_bytes as f64 / 50e6));
        let link_faults: Vec<protocol::LinkFault> = self
            .options
            .link_faults
            .iter()
            .filter(|f| self.attempted.is_none_or(|a| f.step > a))
            .copied()
            .collect();
        // Expert rows over collectives: the ids of the epoch's communicators, one per lane (the
        // lanes every worker derives from the plan).
        let exchange = self.config.train.exchange;
        let comm_ids = match exchange {
            ExpertExchange::Transport => None,
            kind => {
                let lanes = exchange_lanes(kind, &plan, super::worker::PROCESS_LANES);
                let maker = Arc::new(CommIdMaker::new(kind, lanes)?);
                let first = maker.for_setup()?;
                Some((maker, protocol::comm_ids_to_wire(&first)))
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        for (i, m) in members.iter().enumerate() {
            let bytes = shares[i].clone();
            let command = Command::Setup {
                epoch,
                worker: i as u32,
                workers: members.len() as u32,
                peers: peers.clone(),
                state_sha256: crate::net::quic::sha256_hex(&bytes),
                expert_owner: owners(&plan.expert_owner),
                tensor_owner: owners(&plan.tensor_owner),
                keep: kept[i],
                link_faults: link_faults.clone(),
                comm_ids: comm_ids.as_ref().map(|(_, ids)| ids.clone()).unwrap_or_default(),
                wait_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            };
            let m = m.clone();
            tasks.spawn(async move {
                let who = format!("member {} ({})", m.id, m.name);
                let r = tokio::time::timeout(deadline, proxy::call(&m.conn, &who, &command, Some(&bytes), 1 << 20))
                    .await
                    .map_err(|_| Error::Deadline {
                        peer: who.clone(),
                        what: format!("the setup of epoch {epoch}"),
                        deadline_ms: deadline.as_millis() as u64,
                    })
                    .and_then(|r| r)
                    .and_then(|reply| match protocol::decode::<Reply>(&reply, "a setup reply")? {
                        Reply::Done => Ok(()),
                        Reply::Failed(e) => Err(e.into_error(&who)),
                        _ => Err(Error::protocol(who.clone(), "answered a setup with something else")),
                    });
                (m.id, r)
            });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(()))) => {}
                // Nobody is evicted for a failed setup: a member that cannot reach a peer reports
                // the failure, not the peer at fault. Members that are gone are left out of the
                // next attempt; otherwise the epoch is formed again, a bounded number of times.
                Ok((id, Err(e))) => {
                    first_error.get_or_insert(Error::runtime(format!("member {id}: {e}")));
                }
                Err(e) => {
                    first_error.get_or_insert(Error::runtime(format!("a setup task failed: {e}")));
                }
            }
        }
        self.stats.state_bytes += moved.bytes;
        metrics::counter!(names::STATE_BYTES).increment(moved.bytes);
        if let Some(e) = first_error {
            return Err(e);
        }
        let mut proxies = Vec::with_capacity(members.len());
        for (i, m) in members.iter().enumerate() {
            let args = ProxyArgs {
                conn: m.conn.clone(),
                name: format!("worker {i} (member {}, {})", m.id, m.name),
                epoch,
                config: self.config.clone(),
                comm_ids: comm_ids.as_ref().map(|(maker, _)| maker.clone()),
            };
            let (r, _) = Actor::spawn(None, ProxyActor, args)
                .await
                .map_err(|e| Error::runtime(format!("cannot start a worker proxy: {e}")))?;
            proxies.push(r);
        }
        let runtime = Runtime::builder((*self.config).clone())
            .remote_workers(proxies.clone())
            .plan(plan.clone())
            .deadline(Duration::from_secs_f64(self.config.train.deadline_s))
            .state(state.0.clone(), state.1.clone())
            // The steps its copy lacks are replayed: reported the first time.
            .reported_steps(self.reported.clone())
            .build()
            .await;
        let runtime = match runtime {
            Ok(r) => r,
            Err(e) => {
                for p in &proxies {
                    p.kill();
                }
                return Err(e);
            }
        };
        self.took_part.extend(members.iter().map(|m| m.id));
        self.last_plan = Some((members.iter().map(|m| m.id).collect(), plan));
        Ok((
            Epoch {
                number: epoch,
                runtime,
                proxies,
                members: members.to_vec(),
            },
            moved,
        ))
    }

    /// Dismiss the members that asked to leave and are not in the current epoch.
    async fn dismiss_leavers(&mut self) {
        let active: Vec<u64> = self
            .current
            .iter()
            .flat_map(|e| e.members.iter().map(|m| m.id))
            .collect();
        for m in self.cluster.members() {
            if m.status == Status::Leaving && !active.contains(&m.id) {
                // A member that never took part in an epoch held no state.
                let reason = if self.took_part.remove(&m.id) {
                    let kept = if self.current.is_some() {
                        "moved to the other workers"
                    } else {
                        "is the coordinator's to keep"
                    };
                    format!("left at step {}; its state {kept}", self.committed)
                } else {
                    format!("left at step {} before taking part (it held no state)", self.committed)
                };
                let command = Command::Dismiss { left: true, reason };
                let who = format!("member {}", m.id);
                self.cluster.set_status(m.id, Status::Gone("left".into()));
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    proxy::call(&m.conn, &who, &command, None, 1 << 20),
                )
                .await;
                self.stats.leaves += 1;
                metrics::counter!(names::MEMBERSHIP, "kind" => "leave").increment(1);
            }
        }
    }

    /// End the run: dismiss every member (they exit 0) and close the control plane.
    pub async fn shutdown(mut self, reason: &str) -> Result<()> {
        if let Some(epoch) = self.current.take() {
            dismantle(epoch).await;
        }
        for m in self.cluster.members() {
            let command = Command::Dismiss {
                left: true,
                reason: reason.to_string(),
            };
            self.cluster.set_status(m.id, Status::Gone("dismissed".into()));
            let who = format!("member {}", m.id);
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                proxy::call(&m.conn, &who, &command, None, 1 << 20),
            )
            .await;
        }
        self.cluster.close();
        Ok(())
    }

    /// Count the members among `ids` that are gone without leaving, each once.
    fn count_lost(&mut self, ids: &[u64]) {
        for &id in ids {
            let gone = match self.cluster.status(id) {
                Some(Status::Gone(why)) => why != "left",
                Some(_) => false,
                None => true,
            };
            if gone && self.counted_lost.insert(id) {
                self.stats.crashes += 1;
            }
        }
    }

    /// Membership crashes counted so far (members of a formed epoch gone without leaving; the
    /// figure the run's summary reports).
    pub fn crashes(&self) -> u64 {
        self.stats.crashes
    }
}

/// The membership line's account of the state sent.
fn describe(m: &StateMove) -> String {
    format!(
        "{}: {} expert units and {} dense tensors sent, {}",
        if m.handed_over { "handed over" } else { "whole shares" },
        m.expert_units,
        m.dense_tensors,
        crate::storage::tiers::format_bytes(m.bytes)
    )
}

/// Stop an epoch's runtime at once (a step in flight is dropped) and its proxies.
async fn dismantle(epoch: Epoch) {
    let _ = epoch.runtime.abandon().await;
    for p in epoch.proxies {
        p.kill();
    }
}

/// Resolve when a member of `members` is gone.
async fn watch_loss(cluster: &Cluster, epoch: u64, members: &[Member]) {
    loop {
        if members
            .iter()
            .any(|m| matches!(cluster.status(m.id), Some(Status::Gone(_)) | None))
        {
            return;
        }
        // A lost link stops the epoch too (its peers would wait for the step's deadline), once
        // [`LINK_LOSS_GRACE`] passed without a member lost: a crash shows as lost links first.
        if cluster
            .link_lost(epoch)
            .is_some_and(|(since, _)| since.elapsed() >= LINK_LOSS_GRACE)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The most epochs one recovery forms when a member or link is lost during each one's replay.
const MAX_REPLAY_LOSSES: usize = 16;

/// How one epoch of a recovery ended ([`ElasticRuntime::reform`]).
enum Formed {
    /// It formed and replayed the steps its starting state lacked.
    Replayed,
    /// A member or link was lost during the replay (why): form the next one.
    LostInReplay(&'static str),
}

/// Epochs formed again for lost links without a committed step in between, before the run ends.
const MAX_RELINKS: u32 = 8;

/// How long a lost link between two members waits to be explained by a member's loss before it
/// counts on its own: longer than it takes to notice a crash (the QUIC idle timeout, 1.5 s; a
/// local process's exit at once).
const LINK_LOSS_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    /// A run with churn keeps the newest epochs and recovery times only, counts them all, and
    /// still answers what was formed since a count it was given.
    #[test]
    fn the_membership_figures_keep_the_newest_epochs_and_count_them_all() {
        let mut stats = MembershipStats::default();
        let total = HISTORY_KEPT as u64 + 10;
        for epoch in 1..=total {
            stats.record_epoch(EpochRecord {
                epoch,
                ..Default::default()
            });
            stats.record_recovery(if epoch == 3 { 9.0 } else { epoch as f64 / 1e6 });
        }
        assert_eq!(stats.history.len(), HISTORY_KEPT);
        assert_eq!(stats.recovery_seconds.len(), HISTORY_KEPT);
        assert_eq!((stats.epochs_formed, stats.recoveries), (total, total));
        assert_eq!(stats.history[0].epoch, 11, "the oldest kept");
        assert_eq!(stats.recovery_worst_seconds, 9.0, "the worst of all, dropped or not");
        let since = stats.history_since(total - 2);
        assert_eq!(since.iter().map(|e| e.epoch).collect::<Vec<_>>(), [total - 1, total]);
        assert_eq!(
            stats.history_since(0).len(),
            HISTORY_KEPT,
            "what is kept of an older count"
        );
        assert!(stats.history_since(total).is_empty());
        assert!(stats.history_since(u64::MAX).is_empty());
        assert_eq!(stats.recoveries_since(total - 1), [total as f64 / 1e6]);
    }
}
