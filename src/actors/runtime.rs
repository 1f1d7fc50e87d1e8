//! [`Runtime`]: build the actor tree from code, train step by step, gather the state, shut down.

use super::collectives::{exchange_lanes, ExpertCollectives};
use super::communicator::SharedReplica;
pub use super::coordinator::StepOutcome;
use super::coordinator::{CoordActor, CoordArgs, CoordMsg, WorkerSpec};
use super::gather::{dense_bytes, keep_only, DenseCounters, DenseStats};
use super::ledger::{LedgerSnapshot, LedgerState};
use super::placement::{ExpertPlacement, Placement};
use super::traffic::{Traffic, TrafficEntry};
use super::worker::{strip_experts, WorkerArgs, WorkerMsg};
use super::{ask, ActorName};
use crate::chaos::FaultPlan;
use crate::config::{ExpertExchange, TrainConfig};
use crate::data::corpus::Corpus;
use crate::error::{Error, Result};
use crate::kernels::Cpu;
use crate::model::gpt::{Ffn, Gpt};
use crate::net::{local, Transport};
use crate::optimizer::AdamW;
use crate::storage::tiers::disk::DiskFaultHook;
use crate::storage::tiers::{ExpertSlot, ExpertStore, StorageConfig, TierStats};
use ractor::{Actor, ActorRef};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the runtime's async methods return. Boxed on purpose: an `async fn`'s body is compiled in
/// every crate that polls it, so a plain `async fn` here would compile the whole actor tree again
/// in each program and test that awaits it; behind a boxed future it is compiled once, here.
pub type RuntimeFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// How many times a worker restarts failed children within a window before it reports itself lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed within `window`.
    pub max_restarts: u32,
    /// The sliding window.
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// Builds a [`Runtime`]: everything has a default except the training configuration.
#[derive(Clone)]
pub struct RuntimeBuilder {
    config: TrainConfig,
    workers: usize,
    placement: ExpertPlacement,
    restart: RestartPolicy,
    deadline: Duration,
    step_deadline: Duration,
    max_replays: u32,
    reported: Arc<std::sync::atomic::AtomicU64>,
    lanes: usize,
    chaos: FaultPlan,
    text: Option<Arc<Vec<u8>>>,
    data_digest: Option<String>,
    state: Option<(Gpt<f32>, AdamW)>,
    storage: StorageConfig,
    remote: Option<Vec<ActorRef<WorkerMsg>>>,
    plan: Option<Placement>,
}

impl RuntimeBuilder {
    /// Where expert state lives: Device/Host budgets, cache policy, prefetch, the disk directory
    /// (default: everything in memory). Each worker gets these budgets for its own experts.
    pub fn storage(mut self, storage: StorageConfig) -> Self {
        self.storage = storage;
        self
    }

    /// Lanes per worker (default 4, at most one per group): a worker's groups are split into this many lanes, each going
    /// through the MoE blocks in lockstep, so that one lane computes while another waits for its
    /// experts. 1 sends exactly one message per peer, MoE block and direction for all of a worker's
    /// groups. The parameters do not depend on it.
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes;
        self
    }

    /// Number of in-process workers (default 1).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Where experts live (default round-robin).
    pub fn placement(mut self, placement: ExpertPlacement) -> Self {
        self.placement = placement;
        self
    }

    /// Use this exact plan instead of one computed from [`RuntimeBuilder::placement`] (a
    /// membership change keeps experts and tensors where they were: `Placement::rebalanced`).
    /// It must be for this model, the configured groups and the number of workers.
    pub fn plan(mut self, plan: Placement) -> Self {
        self.plan = Some(plan);
        self
    }

    /// The restart policy of every worker.
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// The deadline of every collective (default 30 s); a worker's share of a step gets a
    /// deadline ten times as long.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self.step_deadline = deadline.saturating_mul(10);
        self
    }

    /// How many times one step is replayed after actor failures before the run gives up (default 8).
    pub fn max_replays(mut self, replays: u32) -> Self {
        self.max_replays = replays;
        self
    }

    /// The count of steps whose metrics were recorded, shared with the runtimes before and after
    /// this one (default: this runtime's own, from 0). A step up to it is a replay (a
    /// multi-process run rebuilt after a lost worker runs again the steps its copy of the state
    /// lacks): computed and committed as any step, but not recorded again in the step metrics
    /// (step time, loss, committed step, expert load), which would count it twice. The runtime
    /// raises it as it records.
    pub fn reported_steps(mut self, reported: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.reported = reported;
        self
    }

    /// Faults to inject (tests and chaos runs).
    pub fn chaos(mut self, plan: FaultPlan) -> Self {
        self.chaos = plan;
        self
    }

    /// Train on these bytes instead of the configured data (or the bundled corpus). No digest
    /// of them goes into [`Runtime::save_checkpoint`]'s checkpoints: [`RuntimeBuilder::corpus`]
    /// records one, which `semoe train --resume` checks its text against.
    pub fn text(self, text: impl Into<Vec<u8>>) -> Self {
        self.shared_text(Arc::new(text.into()))
    }

    /// [`Self::text`] without a copy: the runtime shares these bytes (a corpus of gigabytes the
    /// caller keeps too is held once).
    pub fn shared_text(mut self, text: Arc<Vec<u8>>) -> Self {
        self.text = Some(text);
        self.data_digest = None;
        self
    }

    /// Train on `corpus`'s training part, recording its digest ([`Corpus::digest`], training
    /// and validation parts) in the checkpoints [`Runtime::save_checkpoint`] writes.
    ///
    /// [`Corpus::digest`]: crate::data::Corpus::digest
    pub fn corpus(mut self, corpus: &crate::data::Corpus) -> Self {
        self.text = Some(corpus.train.clone());
        self.data_digest = Some(corpus.digest());
        self
    }

    /// Start from this model and optimizer state (a resumed run) instead of a fresh initialisation.
    pub fn state(mut self, model: Gpt<f32>, optimizer: AdamW) -> Self {
        self.state = Some((model, optimizer));
        self
    }

    /// Drive workers that already run elsewhere (worker processes, behind proxy actors answering
    /// [`WorkerMsg`]) instead of starting in-process ones: the number of workers is their number,
    /// and each worker holds its own share of the state (`elastic` sets them up).
    pub fn remote_workers(mut self, workers: Vec<ActorRef<WorkerMsg>>) -> Self {
        self.workers = workers.len();
        self.remote = Some(workers);
        self
    }

    /// Start the actor tree (inside the current tokio runtime).
    pub fn build(self) -> RuntimeFuture<'static, Runtime> {
        Box::pin(self.start())
    }

    async fn start(self) -> Result<Runtime> {
        let config = self.config;
        config.validate()?;
        if self.lanes == 0 {
            return Err(Error::config("a worker needs at least one lane"));
        }
        if self.deadline.is_zero() {
            return Err(Error::config("the collective deadline must be positive"));
        }
        // The waits derived from it (a step's ten, a commit's four) must not overflow.
        if self.deadline > crate::config::MAX_WAIT {
            return Err(Error::config(format!(
                "the collective deadline of {:?} is above the longest wait the runtime allows ({:?})",
                self.deadline,
                crate::config::MAX_WAIT
            )));
        }
        let text = match self.text {
            Some(t) => t,
            // Worker processes read their own text (its digest was checked when they joined).
            None if self.remote.is_some() => Arc::new(vec![0; config.model.block_size + 2]),
            None => {
                let corpus = match &config.train.data {
                    Some(path) => Corpus::from_path(path, config.train.val_fraction, config.model.block_size + 1)?,
                    None => Corpus::bundled()?,
                };
                corpus.train
            }
        };
        // A model the builder would allocate itself, too large for the machine, is refused with
        // the estimate (its allocation would abort the process). Given a state, the model and
        // moments are in memory already (the estimate would count them twice against what is
        // left); the coordinator of worker processes checked its own run.
        if self.remote.is_none() && self.state.is_none() {
            let mut job = config.clone();
            job.train.workers = self.workers;
            crate::config::memory::check_fits(&job, crate::config::memory::available_bytes())?;
        }
        crate::data::corpus::check_vocab(&config, [text.as_slice()], "the runtime's training text", None)?;
        // One window of block_size + 1 bytes, as the plain loop needs (data::sampler).
        if text.len() < config.model.block_size + 1 {
            return Err(Error::config(format!(
                "the training text has {} bytes; it needs at least block_size + 1 = {}",
                text.len(),
                config.model.block_size + 1
            )));
        }
        let (model, optimizer) = match self.state {
            Some(s) => s,
            None => {
                let model = Gpt::init(&config.model, config.train.seed)?;
                let optimizer = crate::optimizer::for_model(&config.optimizer, &model)?;
                (model, optimizer)
            }
        };
        if model.config() != &config.model {
            return Err(Error::config("the given model does not have the configured shape"));
        }
        let placement = Arc::new(match self.plan {
            Some(plan) => checked_plan(&model, config.train.groups, self.workers, plan)?,
            None => Placement::new(&model, config.train.groups, self.workers, &self.placement)?,
        });
        // Every counter at zero from the start, for the workers, MoE blocks and experts of this run
        // (over worker processes, the per-worker counters are counted, and served, by the workers:
        // here they would read 0 for the whole run).
        crate::telemetry::metrics::register(crate::telemetry::metrics::Layout {
            workers: if self.remote.is_some() { 0 } else { self.workers },
            moe_blocks: model.blocks.iter().filter(|b| matches!(b.ffn, Ffn::Moe(_))).count(),
            experts: config.model.experts,
        });
        let first_step = optimizer.step;
        let exchange = config.train.exchange;
        let collectives = match (exchange, &self.remote) {
            (ExpertExchange::Transport, _) => None,
            // The worker processes hold their own communicators (`start_standalone_worker`).
            (_, Some(_)) => None,
            (kind, None) => {
                let lanes = exchange_lanes(kind, &placement, self.lanes);
                // A collective waits for the slowest worker's compute as well: half a step's deadline.
                let deadline = self.step_deadline / 2;
                Some(Arc::new(ExpertCollectives::new(
                    kind,
                    &config,
                    self.workers,
                    lanes,
                    deadline,
                )?))
            }
        };
        let (workers, expert_stores, counters) = match self.remote {
            Some(remote) => (
                remote.into_iter().map(WorkerSpec::Running).collect(),
                Vec::new(),
                (Vec::new(), Vec::new()),
            ),
            None => {
                let cpu = Cpu::new(config.train.threads)?;
                let mut storage = self.storage.clone();
                if self.chaos.has_disk_faults() {
                    storage.disk_faults = Some(DiskFaultHook(Arc::new(self.chaos.clone())));
                }
                let stores = distribute(&config, &model, &optimizer, &placement, &storage, 0..self.workers)?;
                let expert_stores: Vec<Arc<ExpertStore>> = stores.iter().map(|s| s.experts.clone()).collect();
                let mut replica = model.clone();
                strip_experts(&mut replica);
                let shard = config.storage.shard_dense;
                let mut dense_counters = Vec::with_capacity(self.workers);
                let mut traffic_counters = Vec::with_capacity(self.workers);
                let mut workers = Vec::with_capacity(self.workers);
                for ((transport, inbox), store) in local::network(self.workers).into_iter().zip(stores) {
                    let worker = transport.id();
                    let own = if shard {
                        keep_only(&replica, |i| placement.tensor_owner.get(i) == Some(&worker))
                    } else {
                        replica.clone()
                    };
                    let dense = Arc::new(DenseCounters::default());
                    dense.set_resident(dense_bytes(&own));
                    dense_counters.push(dense.clone());
                    let traffic = Arc::new(Traffic::new(self.workers));
                    traffic_counters.push(traffic.clone());
                    workers.push(WorkerSpec::Local(Box::new(WorkerArgs {
                        worker,
                        config: config.clone(),
                        text: text.clone(),
                        placement: placement.clone(),
                        transport: if self.chaos.has_link_faults() {
                            Arc::new(crate::chaos::net::FaultyTransport::new(transport, self.chaos.clone()))
                        } else {
                            Arc::new(transport)
                        },
                        inbox: Arc::new(Mutex::new(Some(inbox))),
                        replica: Arc::new(Mutex::new(Arc::new(own))),
                        dense,
                        traffic,
                        store: Arc::new(Mutex::new(store)),
                        cpu: cpu.clone(),
                        restart: self.restart,
                        deadline: self.deadline,
                        lanes: self.lanes,
                        chaos: self.chaos.clone(),
                        collectives: collectives.clone(),
                    })));
                }
                (workers, expert_stores, (dense_counters, traffic_counters))
            }
        };
        let (dense_counters, traffic) = counters;
        let args = CoordArgs {
            workers,
            first_step,
            total_steps: config.train.steps,
            optimizer: config.optimizer.clone(),
            tokens_per_step: config.train.batch * config.model.block_size,
            groups: config.train.groups,
            step_deadline: self.step_deadline,
            deadline: self.deadline,
            max_replays: self.max_replays,
            norm_parts: super::coordinator::expected_norm_parts(&config.model),
            tensors: config
                .model
                .tensor_specs()
                .into_iter()
                .map(|s| (s.name, s.expert))
                .collect(),
            reported: self.reported.clone(),
        };
        let (coordinator, join) = Actor::spawn(None, CoordActor, args)
            .await
            .map_err(|e| Error::runtime(format!("cannot start the coordinator: {e}")))?;
        Ok(Runtime {
            coordinator,
            join,
            config,
            placement,
            deadline: self.step_deadline,
            max_replays: self.max_replays,
            expert_stores,
            dense_counters,
            traffic,
            collectives,
            data_digest: self.data_digest,
            stopped: false,
        })
    }
}

/// `plan`, checked against the model, the groups and the worker count.
fn checked_plan(model: &Gpt<f32>, groups: usize, workers: usize, plan: Placement) -> Result<Placement> {
    if plan.workers != workers || plan.group_owner.len() != groups {
        return Err(Error::config(format!(
            "a placement plan for {} workers and {} groups, where there are {workers} and {groups}",
            plan.workers,
            plan.group_owner.len()
        )));
    }
    Placement::from_owners(model, groups, workers, plan.expert_owner, plan.tensor_owner)
}

/// Split a model and its optimizer state into the committed stores of `workers`.
fn distribute(
    config: &TrainConfig,
    model: &Gpt<f32>,
    opt: &AdamW,
    placement: &Placement,
    storage: &StorageConfig,
    workers: std::ops::Range<usize>,
) -> Result<Vec<LedgerState>> {
    let specs = model.specs();
    let tensors = model.tensors();
    if opt.m.len() != specs.len() {
        return Err(Error::shape("optimizer state", "it does not match the model's tensors"));
    }
    let mut stores = Vec::with_capacity(workers.len());
    for w in workers {
        let owned = placement.tensors_of(w);
        let dense: Vec<(usize, Vec<f32>)> = owned.iter().map(|&i| (i, tensors[i].2.clone())).collect();
        let sizes: Vec<usize> = dense.iter().map(|(_, v)| v.len()).collect();
        let decay: Vec<bool> = owned.iter().map(|&i| specs[i].decay).collect();
        let mut optimizer = AdamW::with_decay(config.optimizer.clone(), &sizes, &decay)?;
        optimizer.restore(
            opt.step,
            owned.iter().map(|&i| opt.m[i].clone()).collect(),
            owned.iter().map(|&i| opt.v[i].clone()).collect(),
        )?;
        let mut experts = Vec::new();
        for (block, b) in model.blocks.iter().enumerate() {
            if !matches!(b.ffn, Ffn::Moe(_)) {
                continue;
            }
            let idx = ExpertSlot::tensor_indices(specs.iter().map(|t| t.name.as_str()), block)?;
            for e in placement.experts_of(w) {
                let slice = |buf: &Vec<f32>, i: usize| {
                    let n = specs[i].unit_len();
                    buf[e * n..(e + 1) * n].to_vec()
                };
                let params = [0, 1, 2, 3].map(|k| slice(tensors[idx[k]].2, idx[k]));
                let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
                let decay: Vec<bool> = idx.iter().map(|&i| specs[i].decay).collect();
                let mut optimizer = AdamW::with_decay(config.optimizer.clone(), &sizes, &decay)?;
                optimizer.restore(
                    opt.step,
                    idx.iter().map(|&i| slice(&opt.m[i], i)).collect(),
                    idx.iter().map(|&i| slice(&opt.v[i], i)).collect(),
                )?;
                experts.push(((block, e), ExpertSlot { params, optimizer }));
            }
        }
        experts.sort_by_key(|(id, _)| *id);
        stores.push(LedgerState {
            dense,
            optimizer,
            experts: Arc::new(ExpertStore::new(w, storage, experts)?),
        });
    }
    Ok(stores)
}

/// A running actor tree. Create it with [`Runtime::builder`]; call [`Runtime::step`] to train,
/// [`Runtime::state`] to gather the model and optimizer, [`Runtime::shutdown`] to stop. Dropped
/// without a shutdown (an error returned with `?`), it kills its actors as [`Runtime::abandon`]
/// does, without waiting: each stops at its next wait, and the stores (their threads, their Disk
/// tier files) go with the last of them, moments later.
pub struct Runtime {
    coordinator: ActorRef<CoordMsg>,
    join: tokio::task::JoinHandle<()>,
    config: TrainConfig,
    placement: Arc<Placement>,
    deadline: Duration,
    max_replays: u32,
    expert_stores: Vec<Arc<ExpertStore>>,
    dense_counters: Vec<Arc<DenseCounters>>,
    traffic: Vec<Arc<Traffic>>,
    collectives: Option<Arc<ExpertCollectives>>,
    /// The corpus's digest, for the checkpoints (see [`RuntimeBuilder::corpus`]).
    data_digest: Option<String>,
    /// Set once [`Runtime::shutdown`] or [`Runtime::abandon`] has stopped the actors (the drop
    /// has nothing left to do).
    stopped: bool,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        // The actors live as long as their tasks, not their references: kill the tree (the
        // coordinator's children go with it), and end the lanes waiting in a collective.
        if let Some(collectives) = &self.collectives {
            collectives.close("the runtime was dropped");
        }
        self.coordinator.kill();
    }
}

impl Runtime {
    /// With expert rows over collectives (`train.exchange` `sim` or `nccl`): how many generations
    /// of communicators were built (one at the first exchange, one more for each replay of a step
    /// whose exchanges were aborted). `None` over the transport.
    pub fn communicator_generations(&self) -> Option<u64> {
        self.collectives.as_ref().map(|c| c.generations())
    }

    /// Each worker's expert-store figures (tier occupancy, hits, prefetch, bytes moved, stalls).
    pub fn tier_stats(&self) -> Vec<TierStats> {
        self.expert_stores.iter().map(|s| s.stats()).collect()
    }

    /// Wait until no worker's expert store has disk work in flight or queued (the write-backs and
    /// deferred gradients a step leaves running after its commit): a benchmark's timed window ends
    /// here, so that a step's I/O is not charged to what runs next.
    pub async fn storage_idle(&self) -> Result<()> {
        for store in &self.expert_stores {
            store.idle().await?;
        }
        Ok(())
    }

    /// Each worker's dense-parameter figures: bytes kept between steps and, with
    /// `storage.shard_dense`, bytes gathered, the peak held during a step and the time waited.
    pub fn dense_stats(&self) -> Vec<DenseStats> {
        self.dense_counters.iter().map(|c| c.stats()).collect()
    }

    /// Bytes each in-process worker sent each peer, by kind, since the start (empty over worker
    /// processes: the elastic runtime asks them).
    pub fn traffic(&self) -> Vec<TrafficEntry> {
        self.traffic
            .iter()
            .enumerate()
            .flat_map(|(w, t)| t.entries(w))
            .collect()
    }

    /// A builder for a runtime training with `config`.
    pub fn builder(config: TrainConfig) -> RuntimeBuilder {
        RuntimeBuilder {
            config,
            workers: 1,
            placement: ExpertPlacement::default(),
            restart: RestartPolicy::default(),
            deadline: Duration::from_secs(30),
            step_deadline: Duration::from_secs(300),
            max_replays: 8,
            reported: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            lanes: 4,
            chaos: FaultPlan::none(),
            text: None,
            data_digest: None,
            state: None,
            storage: StorageConfig::default(),
            remote: None,
            plan: None,
        }
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The placement plan.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Run one step to its commit (replaying it after actor failures).
    pub fn step(&self) -> RuntimeFuture<'_, StepOutcome> {
        let who = ActorName("the coordinator".into());
        // The coordinator bounds each attempt: the workers' share of the step (the step deadline),
        // then the prepare (a tenth of it), the commit (four tenths) and an abort (a tenth): at
        // most 1.6 step deadlines. This bound covers every attempt it may run, with room to
        // spare: a caller that gave up first would take a step the coordinator then commits for
        // a failed one.
        let attempts = self.max_replays.saturating_add(1);
        let deadline = self
            .deadline
            .saturating_mul(attempts.saturating_mul(2).saturating_add(1));
        Box::pin(async move {
            ask(&self.coordinator, &who, "a step", deadline, |reply| CoordMsg::Step {
                reply,
            })
            .await
        })
    }

    /// The committed model and optimizer state, gathered from every worker.
    pub fn state(&self) -> RuntimeFuture<'_, (Gpt<f32>, AdamW)> {
        Box::pin(async move {
            let who = ActorName("the coordinator".into());
            let snaps = ask(&self.coordinator, &who, "a snapshot", self.deadline, |reply| {
                CoordMsg::Snapshot { reply }
            })
            .await?;
            assemble(&self.config, &snaps)
        })
    }

    /// The committed model.
    pub fn model(&self) -> RuntimeFuture<'_, Gpt<f32>> {
        Box::pin(async move { Ok(self.state().await?.0) })
    }

    /// Gather the committed state and write it as a checkpoint under `run_dir/checkpoints/` (the
    /// format of `semoe train`: `semoe generate --checkpoint` and `Trainer::resume` read it). The
    /// run directory is locked while it is written, as every writer of one does: a directory a
    /// running `semoe train` holds is refused (its checkpoint in progress would be taken for a
    /// leftover and removed).
    pub fn save_checkpoint<'a>(&'a self, run_dir: &'a std::path::Path) -> RuntimeFuture<'a, std::path::PathBuf> {
        Box::pin(async move {
            let (model, optimizer) = self.state().await?;
            std::fs::create_dir_all(run_dir).map_err(|e| Error::io("cannot create the run directory", run_dir, e))?;
            let _lock = crate::storage::run_dir::RunDirLock::acquire(run_dir)?;
            crate::storage::state::save(
                run_dir,
                &self.config,
                self.config.train.seed,
                &model,
                &optimizer,
                0.0,
                self.data_digest.as_deref(),
            )
        })
    }

    /// Stop the actor tree at once, also in the middle of a step (ractor's kill: handlers in
    /// progress are dropped). For a membership change after a worker process was lost, when the
    /// step in flight can never finish; the workers' committed state is not read again.
    pub fn abandon(mut self) -> RuntimeFuture<'static, ()> {
        Box::pin(async move {
            let _ = self.coordinator.kill_and_wait(Some(Duration::from_secs(5))).await;
            let _ = (&mut self.join).await;
            // (The drop's kill after it finds the tree gone: nothing to do.)
            Ok(())
        })
    }

    /// Stop every actor and wait for them.
    /// A step still in flight (its caller gave up waiting for it) runs on for at most
    /// [`SHUTDOWN_GRACE`]; then the actors are killed where they wait. The expert stores are
    /// dropped last (their Disk tier files are deleted then), once every actor holding them has
    /// stopped, waiting up to a few seconds for that.
    pub fn shutdown(self) -> RuntimeFuture<'static, ()> {
        Box::pin(self.stop())
    }

    async fn stop(mut self) -> Result<()> {
        self.coordinator.stop(Some("shutdown".into()));
        let stopped = |joined: std::result::Result<(), tokio::task::JoinError>| {
            joined.map_err(|e| Error::runtime(format!("the coordinator did not stop cleanly: {e}")))
        };
        let r = match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.join).await {
            Ok(joined) => stopped(joined),
            Err(_) => {
                // A stop waits for the message in hand: a step whose caller is gone, up to its
                // whole deadline and replays. A kill ends it where it waits, and closing the
                // collectives ends the lanes blocked in one.
                if let Some(collectives) = &self.collectives {
                    collectives.close("the runtime is shutting down");
                }
                self.coordinator.kill();
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.join).await {
                    Ok(joined) => stopped(joined),
                    Err(_) => Err(Error::runtime(format!(
                        "the coordinator did not stop within {:?} of being killed",
                        SHUTDOWN_GRACE
                    ))),
                }
            }
        };
        let since = std::time::Instant::now();
        while self.expert_stores.iter().any(|s| Arc::strong_count(s) > 1) && since.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(std::mem::take(&mut self.expert_stores));
        // (Cancelled before here, the drop kills what is left.)
        self.stopped = true;
        r
    }
}

/// How long [`Runtime::shutdown`] lets a step in flight run on before it kills the actors.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Put the workers' snapshots back together as one model and optimizer (whole tensors).
pub fn assemble(config: &TrainConfig, snaps: &[LedgerSnapshot]) -> Result<(Gpt<f32>, AdamW)> {
    check_cover(config, snaps)?;
    let mut model = Gpt::<f32>::zeros(&config.model)?;
    let mut opt = crate::optimizer::for_model(&config.optimizer, &model)?;
    let specs = model.specs();
    {
        let mut bufs = model.buffers_mut();
        for s in snaps {
            for (i, p, m, v) in &s.dense {
                bufs[*i].copy_from_slice(p);
                opt.m[*i].copy_from_slice(m);
                opt.v[*i].copy_from_slice(v);
            }
            for ((block, e), slot) in &s.experts {
                let idx = ExpertSlot::tensor_indices(specs.iter().map(|t| t.name.as_str()), *block)?;
                for (k, &i) in idx.iter().enumerate() {
                    let n = specs[i].unit_len();
                    bufs[i][e * n..(e + 1) * n].copy_from_slice(&slot.params[k]);
                    opt.m[i][e * n..(e + 1) * n].copy_from_slice(&slot.optimizer.m[k]);
                    opt.v[i][e * n..(e + 1) * n].copy_from_slice(&slot.optimizer.v[k]);
                }
            }
        }
    }
    opt.step = snaps.first().map_or(0, |s| s.step);
    Ok((model, opt))
}

/// Check, without copying anything, that the workers' snapshots put together make the whole
/// state of one step: all of the same step, no tensor or expert held twice, every tensor covered
/// exactly once with values and both moments of its length. [`assemble`] relies on it.
pub fn check_cover(config: &TrainConfig, snaps: &[LedgerSnapshot]) -> Result<()> {
    let specs = config.model.tensor_specs();
    let step = snaps.first().map_or(0, |s| s.step);
    let mut filled = vec![0usize; specs.len()];
    // Lengths alone could balance a duplicated unit against a missing one.
    let mut seen = std::collections::HashSet::new();
    if let Some(s) = snaps.iter().find(|s| s.step != step) {
        return Err(Error::runtime(format!(
            "the workers' state is of different steps ({} and {step})",
            s.step
        )));
    }
    let len = |i: usize| specs[i].shape.iter().product::<usize>();
    for s in snaps {
        for (i, p, m, v) in &s.dense {
            let spec = specs
                .get(*i)
                .ok_or_else(|| Error::runtime(format!("a worker holds tensor {i}, which does not exist")))?;
            if !seen.insert((*i, usize::MAX, 0)) {
                return Err(Error::runtime(format!("two workers hold tensor {}", spec.name)));
            }
            if [p.len(), m.len(), v.len()] != [len(*i); 3] {
                return Err(Error::runtime(format!(
                    "a worker's copy of {} has a wrong length",
                    spec.name
                )));
            }
            filled[*i] += p.len();
        }
        for ((block, e), slot) in &s.experts {
            if !seen.insert((usize::MAX, *block, *e)) {
                return Err(Error::runtime(format!("two workers hold expert {block}.{e}")));
            }
            // Every expert's update of every committed step applied (a deferred one lost would
            // otherwise reach a checkpoint in silence).
            if slot.optimizer.step != step {
                return Err(Error::runtime(format!(
                    "a worker's copy of expert {block}.{e} is of step {}, the state of step {step}",
                    slot.optimizer.step
                )));
            }
            let idx = ExpertSlot::tensor_indices(specs.iter().map(|t| t.name.as_str()), *block)?;
            for (k, &i) in idx.iter().enumerate() {
                let n = specs[i].unit_len();
                let lens =
                    [slot.params.get(k), slot.optimizer.m.get(k), slot.optimizer.v.get(k)].map(|t| t.map(Vec::len));
                if *e >= config.model.experts || lens != [Some(n); 3] {
                    return Err(Error::runtime(format!(
                        "a worker's copy of expert {block}.{e} does not fit {}",
                        specs[i].name
                    )));
                }
                filled[i] += n;
            }
        }
    }
    if let Some(i) = (0..specs.len()).find(|&i| filled[i] != len(i)) {
        return Err(Error::runtime(format!(
            "the workers' state does not cover tensor {} exactly once",
            specs[i].name
        )));
    }
    Ok(())
}

/// Everything one worker of a multi-process run needs to start its share of the actor tree.
pub struct StandaloneWorker {
    /// The run's configuration.
    pub config: TrainConfig,
    /// Training text (the worker process read it; its digest was checked at the join).
    pub text: Arc<Vec<u8>>,
    /// The committed model and optimizer state (this worker keeps its share).
    pub model: Gpt<f32>,
    /// The optimizer state.
    pub optimizer: AdamW,
    /// This worker's index and the number of workers of the epoch.
    pub worker: usize,
    /// Number of workers.
    pub workers: usize,
    /// The transport endpoint of this epoch, and its inbox.
    pub transport: Arc<dyn Transport>,
    /// Its inbox.
    pub inbox: crate::net::Inbox,
    /// Storage tiers of this worker.
    pub storage: StorageConfig,
    /// Compute pool of the process.
    pub cpu: Cpu,
    /// Lanes (see [`RuntimeBuilder::lanes`]).
    pub lanes: usize,
    /// The coordinator's plan; `None`: computed from the configuration exactly as the
    /// coordinator computes a first epoch's.
    pub placement: Option<Placement>,
    /// The GPU of this worker's NCCL ranks (`train.exchange = "nccl"`).
    pub gpu: usize,
    /// Faults to inject in this worker's actors (a test's; `FaultPlan::none()` in a real run).
    pub chaos: FaultPlan,
}

/// A started standalone worker: its actor, and what its process keeps of it.
pub struct StartedWorker {
    /// The Worker actor.
    pub actor: ActorRef<WorkerMsg>,
    /// Its expert store (the Disk tier's files go when the last holder drops it).
    pub experts: Arc<ExpertStore>,
    /// Its replica of the dense values (kept up to date by every commit's broadcast).
    pub replica: SharedReplica,
    /// Bytes it sent each peer of its epoch, by kind.
    pub traffic: Arc<Traffic>,
    /// Its communicators, when expert rows travel over collectives (`train.exchange = "sim"`):
    /// closed when the epoch ends or a peer is lost, so that nothing waits on them.
    pub collectives: Option<Arc<ExpertCollectives>>,
}

/// Start one Worker actor (with its Gates, Experts, Ledger and Communicator), not linked to any
/// coordinator: a worker process hosts it and answers the coordinator's calls for it.
pub async fn start_standalone_worker(w: StandaloneWorker) -> Result<StartedWorker> {
    let config = w.config;
    config.validate()?;
    if w.worker >= w.workers {
        return Err(Error::config(format!(
            "worker {} of {} does not exist",
            w.worker, w.workers
        )));
    }
    let placement = Arc::new(match w.placement {
        Some(plan) => checked_plan(&w.model, config.train.groups, w.workers, plan)?,
        None => Placement::new(
            &w.model,
            config.train.groups,
            w.workers,
            &config.train.placement.parse::<ExpertPlacement>()?,
        )?,
    });
    // Off the async threads: the store writes the units that fit in no memory tier to its disk
    // (seconds for a large share), and a worker process's QUIC connections run on those threads:
    // silent that long, its coordinator and peers would take it for lost.
    let (mut stores, model) = {
        let (config, placement, storage, worker) = (config.clone(), placement.clone(), w.storage.clone(), w.worker);
        let (model, optimizer) = (w.model, w.optimizer);
        tokio::task::spawn_blocking(move || {
            let stores = distribute(&config, &model, &optimizer, &placement, &storage, worker..worker + 1);
            stores.map(|stores| (stores, model))
        })
        .await
        .map_err(|e| Error::runtime(format!("the expert store's set-up failed: {e}")))??
    };
    let store = stores
        .pop()
        .ok_or_else(|| Error::runtime("no committed state for this worker"))?;
    let experts = store.experts.clone();
    let mut replica = model;
    strip_experts(&mut replica);
    let own = if config.storage.shard_dense {
        keep_only(&replica, |i| placement.tensor_owner.get(i) == Some(&w.worker))
    } else {
        replica
    };
    let dense = Arc::new(DenseCounters::default());
    dense.set_resident(dense_bytes(&own));
    let deadline = Duration::from_secs_f64(config.train.deadline_s);
    // Expert rows over collectives on the data plane: this worker's ends, with the in-process
    // runtime's deadlines (a step waits 10 times the deadline, a collective half of that).
    let collectives = match config.train.exchange {
        ExpertExchange::Transport => None,
        kind => Some(Arc::new(ExpertCollectives::over_transport(
            kind,
            &config,
            w.transport.clone(),
            exchange_lanes(kind, &placement, w.lanes),
            deadline * 5,
            w.gpu,
        )?)),
    };
    let replica: SharedReplica = Arc::new(Mutex::new(Arc::new(own)));
    let traffic = Arc::new(Traffic::new(w.workers));
    let args = WorkerArgs {
        worker: w.worker,
        config,
        text: w.text,
        placement,
        transport: w.transport,
        inbox: Arc::new(Mutex::new(Some(w.inbox))),
        replica: replica.clone(),
        dense,
        traffic: traffic.clone(),
        store: Arc::new(Mutex::new(store)),
        cpu: w.cpu,
        restart: RestartPolicy::default(),
        deadline,
        lanes: w.lanes,
        chaos: w.chaos,
        collectives: collectives.clone(),
    };
    let (actor, _) = Actor::spawn(None, super::worker::WorkerActor, args)
        .await
        .map_err(|e| Error::runtime(format!("cannot start worker {}: {e}", w.worker)))?;
    Ok(StartedWorker {
        actor,
        experts,
        replica,
        traffic,
        collectives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::small_test_config;

    #[tokio::test]
    async fn deadlines_out_of_range_are_refused_before_anything_starts() {
        for (deadline, want) in [
            (Duration::ZERO, "must be positive"),
            (Duration::MAX / 3, "above the longest wait"),
        ] {
            let err = Runtime::builder(small_test_config())
                .deadline(deadline)
                .build()
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(want), "{deadline:?}: {err}");
        }
    }

    /// The whole state of `config`'s model (zeros) as two workers' shares: the dense tensors in
    /// one, the experts in the other.
    fn two_shares(config: &TrainConfig, step: u64) -> Vec<LedgerSnapshot> {
        let specs = config.model.tensor_specs();
        let names = || specs.iter().map(|t| t.name.as_str());
        let moe: Vec<usize> = (0..config.model.n_layer).filter(|&l| config.model.is_moe(l)).collect();
        let mut expert_tensors = std::collections::HashSet::new();
        let mut experts = Vec::new();
        for &b in &moe {
            let idx = ExpertSlot::tensor_indices(names(), b).expect("expert tensors");
            expert_tensors.extend(idx);
            let sizes = idx.map(|i| specs[i].unit_len());
            for e in 0..config.model.experts {
                let mut optimizer =
                    AdamW::with_decay(config.optimizer.clone(), &sizes, &[true, false, true, false]).expect("adamw");
                optimizer.step = step;
                let params = sizes.map(|n| vec![0.0; n]);
                experts.push(((b, e), ExpertSlot { params, optimizer }));
            }
        }
        let dense = (0..specs.len())
            .filter(|i| !expert_tensors.contains(i))
            .map(|i| {
                let n = specs[i].shape.iter().product();
                (i, vec![0.0; n], vec![0.0; n], vec![0.0; n])
            })
            .collect();
        vec![
            LedgerSnapshot {
                step,
                dense,
                experts: Vec::new(),
            },
            LedgerSnapshot {
                step,
                dense: Vec::new(),
                experts,
            },
        ]
    }

    fn refused(config: &TrainConfig, shares: &[LedgerSnapshot], needle: &str) {
        match check_cover(config, shares) {
            Ok(()) => panic!("shares that should say {needle:?} were accepted"),
            Err(e) => assert!(e.to_string().contains(needle), "{e} does not say {needle:?}"),
        }
        assert!(
            assemble(config, shares).is_err(),
            "assemble put together what the check refuses"
        );
    }

    #[test]
    fn shares_are_checked_without_being_put_together() {
        let config = small_test_config();
        let shares = two_shares(&config, 7);
        assert!(!shares[0].dense.is_empty() && !shares[1].experts.is_empty());
        check_cover(&config, &shares).expect("a whole cover");
        let (_, opt) = assemble(&config, &shares).expect("assembled");
        assert_eq!(opt.step, 7);

        let mut other_step = two_shares(&config, 7);
        other_step[1].step = 8;
        refused(&config, &other_step, "different steps");

        let mut twice = two_shares(&config, 7);
        let first = twice[0].dense[0].clone();
        twice[1].dense.push(first);
        refused(&config, &twice, "two workers hold tensor");

        let mut missing = two_shares(&config, 7);
        missing[1].experts.pop();
        refused(&config, &missing, "does not cover");

        let mut short = two_shares(&config, 7);
        short[0].dense[0].2.pop();
        refused(&config, &short, "wrong length");

        let mut no_such_expert = two_shares(&config, 7);
        let ((b, _), slot) = no_such_expert[1].experts.pop().expect("an expert");
        no_such_expert[1].experts.push(((b, config.model.experts), slot));
        refused(&config, &no_such_expert, "does not fit");

        let mut behind = two_shares(&config, 7);
        behind[1].experts[0].1.optimizer.step = 6;
        refused(&config, &behind, "is of step 6, the state of step 7");
    }

    /// Slows every write of the slot file (a slow disk).
    struct SlowWrites;

    impl crate::storage::tiers::disk::DiskFaults for SlowWrites {
        fn before(
            &self,
            _worker: usize,
            op: crate::storage::tiers::disk::DiskOp,
            _id: crate::storage::tiers::UnitId,
            _len: usize,
        ) -> Option<crate::storage::tiers::disk::InjectedIo> {
            (op == crate::storage::tiers::disk::DiskOp::Write).then_some(
                crate::storage::tiers::disk::InjectedIo::Delay(Duration::from_millis(300)),
            )
        }
    }

    /// A worker process's set-up writes the units that fit in no memory tier to its disk off the
    /// async thread: a task beside it (as QUIC's drivers run beside it) keeps running.
    #[tokio::test]
    async fn a_standalone_worker_writes_its_disk_share_off_the_async_thread() {
        let config = small_test_config();
        let model = Gpt::<f32>::init(&config.model, 1).expect("model");
        let optimizer = crate::optimizer::for_model(&config.optimizer, &model).expect("optimizer");
        let dir = std::env::temp_dir().join(format!("semoe-standalone-slow-{}", std::process::id()));
        let unit = ExpertSlot::bytes_for(config.model.d_model, config.model.d_ff);
        // 2 blocks of 4 experts: Device holds one block, Host one unit, 3 units go to the disk.
        let storage = StorageConfig {
            device_budget: Some(4 * unit),
            host_budget: Some(unit),
            dir: Some(dir.clone()),
            drop_page_cache: false,
            disk_faults: Some(crate::storage::tiers::disk::DiskFaultHook(Arc::new(SlowWrites))),
            ..StorageConfig::default()
        };
        let (transport, inbox) = crate::net::local::network(1).pop().expect("a transport");
        // The test's only async thread: a gap between its ticks is time the set-up held it.
        let ticker = tokio::spawn(async {
            let mut longest = Duration::ZERO;
            let mut last = std::time::Instant::now();
            for _ in 0..150 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                longest = longest.max(last.elapsed());
                last = std::time::Instant::now();
            }
            longest
        });
        // The ticker running before the set-up starts.
        tokio::time::sleep(Duration::from_millis(15)).await;
        let started = start_standalone_worker(StandaloneWorker {
            config: config.clone(),
            text: Arc::new(b"some text to train on, long enough for a window or two".repeat(4)),
            model,
            optimizer,
            worker: 0,
            workers: 1,
            transport: Arc::new(transport),
            inbox,
            storage,
            cpu: Cpu::new(1).expect("cpu"),
            lanes: 1,
            placement: None,
            gpu: 0,
            chaos: crate::chaos::FaultPlan::none(),
        })
        .await
        .expect("started");
        assert!(started.experts.stats().on_disk >= 3, "{:?}", started.experts.stats());
        let longest = ticker.await.expect("ticker");
        let _ = started.actor.kill_and_wait(Some(Duration::from_secs(5))).await;
        drop(started);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            longest < Duration::from_millis(450),
            "the set-up held the async thread for {longest:?} (3 writes of 300 ms)"
        );
    }

    /// A standalone worker's epoch ends with a kill (no `post_stop`): its packet pump ends too,
    /// and with it the pump's hold on the collectives (whose transport holds a sender of the
    /// pump's own inbox, so the inbox never closes by itself).
    #[tokio::test]
    async fn a_killed_standalone_worker_lets_its_collectives_go() {
        let mut config = small_test_config();
        config.train.exchange = ExpertExchange::Sim;
        let model = Gpt::<f32>::init(&config.model, 1).expect("model");
        let optimizer = crate::optimizer::for_model(&config.optimizer, &model).expect("optimizer");
        let (transport, inbox) = crate::net::local::network(1).pop().expect("a transport");
        let started = start_standalone_worker(StandaloneWorker {
            config,
            text: Arc::new(b"some text to train on, long enough for a window or two".repeat(4)),
            model,
            optimizer,
            worker: 0,
            workers: 1,
            transport: Arc::new(transport),
            inbox,
            storage: StorageConfig::default(),
            cpu: Cpu::new(1).expect("cpu"),
            lanes: 1,
            placement: None,
            gpu: 0,
            chaos: crate::chaos::FaultPlan::none(),
        })
        .await
        .expect("started");
        let collectives = started.collectives.clone().expect("collectives for the sim exchange");
        let _ = started.actor.kill_and_wait(Some(Duration::from_secs(5))).await;
        drop(started);
        let since = std::time::Instant::now();
        while Arc::strong_count(&collectives) > 1 && since.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            Arc::strong_count(&collectives),
            1,
            "something of the killed worker still holds its collectives"
        );
    }
}
