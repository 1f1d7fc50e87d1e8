//! The training configuration: a TOML file with `[model]`, `[optimizer]`, `[train]` and `[storage]` tables, every
//! key optional (defaults below), unknown keys rejected so that a typo is an error, not a silent
//! default.

pub mod memory;

use crate::error::{Error, Result};
use crate::model::gpt::GptConfig;
use crate::optimizer::OptimizerConfig;
use crate::storage::tiers::{parse_bytes, CachePolicy, StorageConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything a training run needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The model.
    pub model: GptConfig,
    /// The optimizer and learning-rate schedule.
    pub optimizer: OptimizerConfig,
    /// The loop: batch, steps, evaluation, checkpoints.
    pub train: TrainSettings,
    /// Where expert state lives while training (the actor runtime's tiers).
    pub storage: StorageSettings,
}

/// Where expert state lives: byte budgets of the Device and Host tiers per worker (the rest goes
/// to the Disk tier, files under the run directory), the cache policy and prefetch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Bytes of the Device tier per worker (`512MiB`, `2GiB`, ...); empty: unlimited. On the CPU
    /// it is the compute working set in RAM, and must hold one MoE block's experts; with
    /// `train.device = "cuda"` it bounds the GPU memory the model's tensors, gradients, optimizer
    /// state and activations take (one memory pool of that size; an allocation past it fails).
    pub device_budget: String,
    /// Bytes of the Host tier (the cache of experts) per worker; empty: unlimited.
    pub host_budget: String,
    /// `step-order` (evict the unit whose next use in the step's order of blocks is furthest;
    /// the default), `se-moe` (decayed hit counters, least-hit eviction) or `lru`.
    pub cache_policy: String,
    /// SE-MoE: hits an expert needs to be admitted into the host cache.
    pub cache_threshold: f64,
    /// SE-MoE: factor the hit counters decay by.
    pub cache_beta: f64,
    /// SE-MoE: decay every this many steps.
    pub cache_decay_every: u64,
    /// Load experts ahead of use from the routing and one block of look-ahead (false: on demand).
    pub prefetch: bool,
    /// Keep the disk tier out of the page cache, so that reads reach the disk and the page cache
    /// is not an unbudgeted extra tier: `O_DIRECT` where the file system allows it, else each
    /// write flushed and each access's pages dropped; false: through the page cache.
    pub drop_page_cache: bool,
    /// Threads reading and writing the disk tier (default 8: a fast disk reaches its bandwidth only
    /// with several requests in flight, and each thread has one; with 2 on a slow disk, the
    /// threads sat idle a third of the time between a block's write-backs and its loads;
    /// BENCHMARKS.md).
    pub io_threads: usize,
    /// Shard the dense parameters across workers (ZeRO-3 style): each worker keeps only the dense
    /// tensors it owns, and gathers each leg's tensors from their owners during a step, the next
    /// leg's while the current one computes. False: every worker keeps a replica of all of them.
    pub shard_dense: bool,
}

impl Default for StorageSettings {
    fn default() -> Self {
        // SE-MoE's settings, used when `cache_policy` is `se-moe`.
        let (threshold, beta, decay_every) = match CachePolicy::SE_MOE {
            CachePolicy::SeMoe {
                threshold,
                beta,
                decay_every,
            } => (threshold, beta, decay_every),
            CachePolicy::Lru | CachePolicy::StepOrder => (0.0, 0.9, 1),
        };
        StorageSettings {
            device_budget: String::new(),
            host_budget: String::new(),
            cache_policy: CachePolicy::default().name().into(),
            cache_threshold: threshold,
            cache_beta: beta,
            cache_decay_every: decay_every,
            prefetch: true,
            drop_page_cache: true,
            io_threads: 8,
            shard_dense: false,
        }
    }
}

impl StorageSettings {
    /// The store's configuration, with the Disk tier under `dir`.
    pub fn to_config(&self, dir: Option<PathBuf>) -> Result<StorageConfig> {
        let budget = |name: &str, text: &str| -> Result<Option<u64>> {
            if text.trim().is_empty() {
                Ok(None)
            } else {
                parse_bytes(name, text).map(Some)
            }
        };
        let policy = match self.cache_policy.parse::<CachePolicy>()? {
            CachePolicy::SeMoe { .. } => CachePolicy::SeMoe {
                threshold: self.cache_threshold,
                beta: self.cache_beta,
                decay_every: self.cache_decay_every,
            },
            other @ (CachePolicy::Lru | CachePolicy::StepOrder) => other,
        };
        policy.validate()?;
        if self.io_threads == 0 || self.io_threads > MAX_IO_THREADS {
            return Err(Error::config(format!(
                "storage.io_threads must be between 1 and {MAX_IO_THREADS} (each worker starts that many), got {}",
                self.io_threads
            )));
        }
        Ok(StorageConfig {
            device_budget: budget("storage.device_budget", &self.device_budget)?,
            host_budget: budget("storage.host_budget", &self.host_budget)?,
            policy,
            prefetch: self.prefetch,
            dir,
            drop_page_cache: self.drop_page_cache,
            io_threads: self.io_threads,
            ..StorageConfig::default()
        })
    }
}

/// Settings of the training loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    /// Seed of the initialisation and of the sampler.
    pub seed: u64,
    /// Optimizer steps (the learning-rate schedule spans them).
    pub steps: u64,
    /// Sequences per step. Default 32 in 4 groups (2,048 tokens, 512 per group) for 5,000 steps:
    /// over the same tokens it ended 0.02 nats/byte below 16 in 2 groups (10,000 steps) on one
    /// seed and level on another, 0.02 below 64 in 8 (2,500 steps), and runs about 5% faster than
    /// 16 (BENCHMARKS.md).
    pub batch: usize,
    /// Groups per step: the batch is split into this many groups of `batch / groups` sequences; MoE
    /// routing and capacity are per group, and groups run side by side on the compute threads.
    pub groups: usize,
    /// Evaluate the validation loss every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation windows (of `block_size` bytes, evenly spaced over the validation text).
    pub eval_windows: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Compute threads (0: one per core).
    pub threads: usize,
    /// Stop after this many seconds of training even if `steps` are not done (0: no limit).
    pub time_limit_s: f64,
    /// Seconds of training, evaluation and checkpoints the run should fit in (0: no budget). The
    /// command line measures a few steps first and lowers `steps` to what fits (never raises it),
    /// recording the count chosen in the run's config (see `train::calibrate`).
    pub time_budget_s: f64,
    /// A UTF-8 text file or directory to train on instead of the bundled corpus.
    pub data: Option<PathBuf>,
    /// Fraction of a user-given text held out for validation.
    pub val_fraction: f64,
    /// In-process workers of the actor runtime (experts spread over them, groups run by them);
    /// 0 runs the plain loop without actors (the reference the runtime reproduces bit for bit).
    pub workers: usize,
    /// Where experts live: "round-robin", "blocked", or a comma-separated worker per expert.
    pub placement: String,
    /// Deadline of every collective of the runtime, in seconds. Over collectives
    /// (`exchange` `sim` or `nccl`) an expert exchange waits up to 5 times this for the slowest
    /// worker to arrive (it covers the workers' difference in compute too).
    pub deadline_s: f64,
    /// Train over worker processes instead of in-process workers: the address the coordinator
    /// listens on for them (`IP:PORT`, e.g. `0.0.0.0:7000`; port 0 lets the OS choose). Empty: in-process (or
    /// loopback when `processes` is set). Workers join with `semoe worker --ticket RUN/join.ticket`.
    pub listen: String,
    /// Worker processes to start on this machine (`semoe worker`, reaped when the run ends); more
    /// may join through `listen` at any time.
    pub processes: usize,
    /// Worker processes needed before training starts (0: `processes`, at least 1).
    pub min_workers: usize,
    /// A job identity made beforehand (`semoe ticket --out DIR`): the directory holding its
    /// `job.identity` and `join.ticket`. The coordinator then serves that certificate and admits
    /// that ticket's token, so workers can be given the ticket before the run starts (Kubernetes
    /// Secrets, shared file systems). Unset: a fresh identity per run.
    pub identity: Option<PathBuf>,
    /// Multi-process runs keep an in-memory copy of the committed state every this many steps;
    /// after a worker is lost the survivors replay the steps since. Default 20: on the main job's
    /// model a copy costs about a tenth of a step's CPU per step at 10 (2 worker processes on two
    /// cores at 83.5% of the in-process runtime's tokens/s, 85.5% at 20, 86-89% without copies),
    /// and 20 steps replay in about 1.5 s there.
    pub snapshot_every: u64,
    /// How long the coordinator waits, in seconds, for enough worker processes: `min_workers` of
    /// them before the first epoch, and one after every worker left or was lost. A run whose
    /// workers all left and none joined in time stops with a checkpoint of the state the
    /// coordinator kept (exit code 75: resume it once workers can join).
    pub join_wait_s: f64,
    /// Worker processes on the same machine exchange their data over Unix sockets instead of QUIC
    /// (no encryption, one copy each way; the same bytes). Peers on other machines use QUIC.
    pub same_host: bool,
    /// Where the steps are computed: `cpu`, or `cuda` (GPU 0, the plain loop on the device; a build
    /// with `--features cuda`). A run keeps its device: the two give different bits.
    pub device: ComputeDevice,
    /// How the runtime's workers exchange expert rows (the fused all-to-all-v of the MoE blocks):
    /// `transport` (requests and replies over the workers' transport), `sim` (collectives in
    /// NCCL's model on the CPU stand-in, which checks NCCL's rules: in process, or between worker
    /// processes over their data plane) or `nccl` (collectives through NCCL: in-process worker `i`
    /// on GPU `i`, a worker process on its `--gpu`; a build with `--features cuda`). The bits are
    /// the same.
    pub exchange: ExpertExchange,
}

/// How the runtime's workers exchange expert rows (docs/gpu-data-path.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertExchange {
    /// Requests and replies over the transport (in-process channels, or QUIC between processes).
    #[default]
    Transport,
    /// Collectives (counts, then grouped sends and receives) on the CPU stand-in of NCCL: shared
    /// memory between in-process workers, the data plane between worker processes.
    Sim,
    /// Collectives through NCCL: in-process worker `i` on GPU `i`, a worker process on its GPU.
    Nccl,
}

impl std::str::FromStr for ExpertExchange {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "transport" => Ok(ExpertExchange::Transport),
            "sim" => Ok(ExpertExchange::Sim),
            "nccl" => Ok(ExpertExchange::Nccl),
            other => Err(Error::config(format!(
                "train.exchange must be \"transport\", \"sim\" or \"nccl\", got {other:?}"
            ))),
        }
    }
}

impl std::fmt::Display for ExpertExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExpertExchange::Transport => "transport",
            ExpertExchange::Sim => "sim",
            ExpertExchange::Nccl => "nccl",
        })
    }
}

/// Where a run computes its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDevice {
    /// The CPU backend (the plain loop, the in-process runtime or worker processes).
    #[default]
    Cpu,
    /// One GPU through CUDA: the whole model and its optimizer on the device (src/kernels/cuda/).
    Cuda,
}

impl std::str::FromStr for ComputeDevice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(ComputeDevice::Cpu),
            "cuda" => Ok(ComputeDevice::Cuda),
            other => Err(Error::config(format!(
                "train.device must be \"cpu\" or \"cuda\", got {other:?}"
            ))),
        }
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            seed: 1337,
            steps: 5000,
            batch: 32,
            groups: 4,
            eval_every: 500,
            eval_windows: 256,
            checkpoint_every: 1000,
            keep_checkpoints: 2,
            threads: 2,
            time_limit_s: 0.0,
            time_budget_s: 0.0,
            data: None,
            val_fraction: 0.1,
            workers: 1,
            placement: "round-robin".into(),
            deadline_s: 30.0,
            listen: String::new(),
            processes: 0,
            min_workers: 0,
            identity: None,
            snapshot_every: 20,
            join_wait_s: 120.0,
            same_host: true,
            device: ComputeDevice::Cpu,
            exchange: ExpertExchange::Transport,
        }
    }
}

impl TrainSettings {
    /// Whether the run trains over worker processes (`listen` or `processes` set).
    pub fn elastic(&self) -> bool {
        !self.listen.is_empty() || self.processes > 0
    }

    /// The address the coordinator listens on: `listen`, or the loopback with a port the system
    /// chooses when it is empty.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr> {
        let text = if self.listen.is_empty() {
            "127.0.0.1:0"
        } else {
            &self.listen
        };
        text.parse().map_err(|e| {
            Error::config(format!(
                "train.listen = {:?}: not an IP:PORT to listen on ({e}; e.g. 0.0.0.0:7000, or 127.0.0.1:0 for a \
                 port the system chooses)",
                self.listen
            ))
        })
    }
}

impl TrainConfig {
    /// Read a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(Self::from_file_with_keys(path)?.0)
    }

    /// [`Self::from_file`], and the keys the file itself sets (a table per section; every other
    /// field has its default).
    pub fn from_file_with_keys(path: &Path) -> Result<(Self, toml::Table)> {
        let text = crate::storage::text_file::read(path, "the config file")?;
        let what = || format!("config file {}", path.display());
        let config: TrainConfig = toml::from_str(&text).map_err(|e| Error::parse(what(), e.to_string()))?;
        let keys: toml::Table = toml::from_str(&text).map_err(|e| Error::parse(what(), e.to_string()))?;
        Ok((config, keys))
    }

    /// This config with the settings `keys` sets (as [`Self::from_file_with_keys`] returns them)
    /// in place of its own.
    pub fn overlaid(&self, keys: &toml::Table) -> Result<Self> {
        let mut base: toml::Table =
            toml::from_str(&self.to_toml()?).map_err(|e| Error::parse("config", e.to_string()))?;
        for (name, value) in keys {
            match (base.get_mut(name), value) {
                (Some(toml::Value::Table(section)), toml::Value::Table(set)) => {
                    section.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                _ => {
                    base.insert(name.clone(), value.clone());
                }
            }
        }
        let text = toml::to_string(&base).map_err(|e| Error::parse("config", e.to_string()))?;
        toml::from_str(&text).map_err(|e| Error::parse("config", e.to_string()))
    }

    /// The config as TOML (what a run directory keeps).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::parse("config", e.to_string()))
    }

    /// Sequences in each group of a step (`train.batch / train.groups`).
    pub fn group_seqs(&self) -> usize {
        self.train.batch / self.train.groups
    }

    /// The factor of each token's cross-entropy gradient: one over the tokens of the whole step,
    /// so that the group gradients, summed in group order, are the gradient of the step's mean.
    pub fn ce_scale(&self) -> f32 {
        1.0 / (self.train.batch * self.model.block_size) as f32
    }

    /// The factor of each group's router losses: one over the groups (their mean).
    pub fn router_scale(&self) -> f32 {
        1.0 / self.train.groups as f32
    }

    /// The first setting of a run over worker processes (`min_workers`, `snapshot_every`,
    /// `join_wait_s`, `same_host`, `identity`) that this config sets although it runs in one process, where it
    /// would be ignored. Checked where a user's config starts a run (`semoe train`), not by
    /// [`Self::validate`]: the runtime's own in-process runs made from a multi-process config (the
    /// time budget's measurement, a chaos run's undisturbed twin) keep them.
    pub fn unused_process_setting(&self) -> Option<&'static str> {
        let (t, d) = (&self.train, TrainSettings::default());
        if t.elastic() {
            return None;
        }
        [
            ("train.min_workers", t.min_workers != d.min_workers),
            ("train.snapshot_every", t.snapshot_every != d.snapshot_every),
            ("train.join_wait_s", t.join_wait_s != d.join_wait_s),
            ("train.same_host", t.same_host != d.same_host),
            ("train.identity", t.identity.is_some()),
        ]
        .into_iter()
        .find_map(|(key, set)| set.then_some(key))
    }

    /// Check every value; errors name the option.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.optimizer.validate()?;
        let t = &self.train;
        if t.steps == 0 {
            return Err(Error::config("train.steps must be positive"));
        }
        if t.batch == 0 || t.groups == 0 || !t.batch.is_multiple_of(t.groups) {
            return Err(Error::config(format!(
                "train.batch ({}) must be a positive multiple of train.groups ({})",
                t.batch, t.groups
            )));
        }
        let (cores, max_threads) = (crate::kernels::cpu::cores(), crate::kernels::cpu::max_threads());
        if t.threads > max_threads {
            return Err(Error::config(format!(
                "train.threads ({}) is more than this machine can use: it has {cores} cores (at most {max_threads} \
                 threads are accepted; 0 means one per core)",
                t.threads
            )));
        }
        // Each in-process worker holds a replica, a traffic table and a sender to every other: the
        // cost grows with the square of the count, which the memory estimate does not follow.
        if t.workers > MAX_WORKERS {
            return Err(Error::config(format!(
                "train.workers ({}) is more than the {MAX_WORKERS} in-process workers accepted (for more, run worker \
                 processes: train.processes or train.listen)",
                t.workers
            )));
        }
        let listen = t.listen_addr()?;
        if t.processes > 0 && listen.ip().is_unspecified() {
            return Err(Error::config(format!(
                "train.listen (--listen) = {listen} with train.processes (--processes) = {}: the worker processes \
                 started here join the address their ticket holds, and {} is not one to dial; listen on this \
                 machine's address (e.g. 10.0.0.5:{}), which workers elsewhere reach too",
                t.processes,
                listen.ip(),
                listen.port()
            )));
        }
        if self.model.vocab > BYTE_VOCAB {
            return Err(Error::config(format!(
                "model.vocab must be at most {BYTE_VOCAB}: the model reads and writes bytes (got {})",
                self.model.vocab
            )));
        }
        if !(t.val_fraction > 0.0 && t.val_fraction < 1.0) {
            return Err(Error::config(format!(
                "train.val_fraction must be between 0 and 1 (the share of the text kept for validation), got {}",
                t.val_fraction
            )));
        }
        if t.eval_windows == 0 || t.eval_windows > MAX_EVAL_WINDOWS {
            return Err(Error::config(format!(
                "train.eval_windows must be between 1 and {MAX_EVAL_WINDOWS}, got {}",
                t.eval_windows
            )));
        }
        if !(t.time_limit_s.is_finite() && t.time_limit_s >= 0.0) {
            return Err(Error::config(format!(
                "train.time_limit_s (--time-limit) must be a non-negative number of seconds, got {}",
                t.time_limit_s
            )));
        }
        if !(t.time_budget_s.is_finite() && t.time_budget_s >= 0.0) {
            return Err(Error::config(format!(
                "train.time_budget_s must be a non-negative number of seconds, got {}",
                t.time_budget_s
            )));
        }
        t.placement.parse::<ExpertPlacement>()?;
        if !(t.deadline_s.is_finite() && t.deadline_s > 0.0 && t.deadline_s <= MAX_DEADLINE_S) {
            return Err(Error::config(format!(
                "train.deadline_s must be a positive number of seconds up to {MAX_DEADLINE_S} (a day), got {}",
                t.deadline_s
            )));
        }
        if !(t.join_wait_s.is_finite() && t.join_wait_s > 0.0 && t.join_wait_s <= MAX_DEADLINE_S) {
            return Err(Error::config(format!(
                "train.join_wait_s must be a positive number of seconds up to {MAX_DEADLINE_S} (a day), got {}",
                t.join_wait_s
            )));
        }
        if t.keep_checkpoints == 0 {
            return Err(Error::config("train.keep_checkpoints must be at least 1"));
        }
        if t.device == ComputeDevice::Cuda {
            if t.elastic() || t.workers > 1 {
                return Err(Error::config(
                    "train.device = \"cuda\" trains on one GPU in one process: it cannot be combined with \
                     train.workers above 1, train.processes or train.listen",
                ));
            }
            if self.storage.to_config(None)?.host_budget.is_some() {
                return Err(Error::config(
                    "train.device = \"cuda\" keeps the whole model in GPU memory, with no Host tier behind it: \
                     storage.host_budget is not supported with it (storage.device_budget bounds the GPU memory \
                     the model's tensors take)",
                ));
            }
            // Settings of the actor runtime and its tiers, which a GPU run does not have: set to
            // anything but their default, they would be ignored.
            // (Compared as parsed: "Step-Order" is the default policy too.)
            let (set, default) = (
                self.storage.to_config(None)?,
                StorageSettings::default().to_config(None)?,
            );
            let placement: ExpertPlacement = t.placement.parse()?;
            let ignored = [
                ("train.placement", placement != ExpertPlacement::default()),
                (
                    "storage.cache_policy (and its cache_ settings)",
                    set.policy != default.policy,
                ),
                ("storage.prefetch", set.prefetch != default.prefetch),
                (
                    "storage.drop_page_cache",
                    set.drop_page_cache != default.drop_page_cache,
                ),
                ("storage.io_threads", set.io_threads != default.io_threads),
                ("storage.shard_dense", self.storage.shard_dense),
            ];
            if let Some((key, _)) = ignored.iter().find(|(_, set)| *set) {
                return Err(Error::config(format!(
                    "train.device = \"cuda\" trains the plain loop on one GPU, without the actor runtime's \
                     workers or tiers: {key} does not apply to it (remove it from the config file, or set \
                     its default)"
                )));
            }
            if self.model.has_moe() {
                crate::model::cuda::check_moe_config(&self.model.moe_config()).map_err(|e| match e {
                    Error::Config(msg) => Error::Config(format!("train.device = \"cuda\": {msg}")),
                    other => other,
                })?;
            }
        }
        if t.exchange != ExpertExchange::Transport {
            let refused = if t.elastic() {
                // Between processes each worker process holds its ranks, with the coordinator's
                // communicator ids (docs/gpu-data-path.md).
                None
            } else if t.workers == 0 {
                Some("the plain loop (train.workers = 0) has no workers to exchange between")
            } else if t.device == ComputeDevice::Cuda {
                Some("train.device = \"cuda\" runs the plain loop on one GPU, without an exchange")
            } else {
                None
            };
            if let Some(why) = refused {
                return Err(Error::config(format!("train.exchange = \"{}\": {why}", t.exchange)));
            }
        }
        let storage = self.storage.to_config(None)?;
        // Worker processes are the actor runtime whatever train.workers says.
        let plain_loop = t.workers == 0 && !t.elastic();
        // On a GPU the Device budget bounds the device's memory pool (kernels::cuda::budget).
        if !storage.unlimited() && plain_loop && t.device != ComputeDevice::Cuda {
            return Err(Error::config(
                "storage budgets need the actor runtime (train.workers >= 1, or worker processes); the plain loop \
                 keeps everything in memory",
            ));
        }
        // The tiers' settings act only where a Device budget bounds memory: without one every
        // expert stays in Device memory, nothing is evicted or loaded, and they would be ignored.
        if t.device != ComputeDevice::Cuda && storage.device_budget.is_none() {
            let default = StorageSettings::default().to_config(None)?;
            let ignored = [
                ("storage.host_budget (--host-budget)", storage.host_budget.is_some()),
                (
                    "storage.cache_policy (--cache-policy, and its cache_ settings)",
                    storage.policy != default.policy,
                ),
                ("storage.prefetch (--no-prefetch)", storage.prefetch != default.prefetch),
                ("storage.io_threads", storage.io_threads != default.io_threads),
                (
                    "storage.drop_page_cache",
                    storage.drop_page_cache != default.drop_page_cache,
                ),
            ];
            if let Some((key, _)) = ignored.iter().find(|(_, set)| *set) {
                return Err(Error::config(format!(
                    "{key} applies only with storage.device_budget (--device-budget): without a Device budget every \
                     expert stays in Device memory, so nothing is evicted or loaded"
                )));
            }
        }
        if self.storage.shard_dense && plain_loop {
            return Err(Error::config(
                "storage.shard_dense needs the actor runtime (train.workers >= 1); the plain loop has no workers to shard across",
            ));
        }
        Ok(())
    }
}

/// The largest vocabulary of a trained model: its tokens are the bytes of the text (a smaller one
/// serves a text whose bytes are all below it, checked when the text is loaded).
pub const BYTE_VOCAB: usize = 256;

/// The most evaluation windows a run may ask for (each is a forward pass over a block; a million
/// already takes hours on a CPU).
pub const MAX_EVAL_WINDOWS: usize = 1 << 20;

/// The most disk threads a worker's expert store starts (`storage.io_threads`): a fast disk is
/// busy with 8-16, and an absurd count would hang the process creating the threads.
pub const MAX_IO_THREADS: usize = 256;

/// The most in-process workers (`train.workers`).
pub const MAX_WORKERS: usize = 1024;

/// The longest deadline of a collective: a day. The runtime multiplies it (a step's bound covers
/// its replays), so a larger one would overflow a `Duration`.
pub const MAX_DEADLINE_S: f64 = MAX_WAIT.as_secs_f64();

/// The longest wait any setting may ask for (a day): durations are added to instants, and one
/// beyond the clock's range panics there.
pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The settings `--resume` may change: none of them changes a bit of the parameters (the runtime is
/// bitwise identical for any thread count, worker count, placement and storage budgets;
/// evaluation and checkpoints only read the state). `train.steps` is the one exception that is
/// allowed all the same: it extends (or shortens) the run, and the learning-rate schedule spans the
/// new count from the resumed step on. `train.data` may point elsewhere, but the text must be the
/// same (checked against the checkpoint's digest).
pub const RESUMABLE: &[&str] = &[
    "train.steps",
    "train.threads",
    "train.workers",
    "train.placement",
    "train.time_limit_s",
    "train.time_budget_s",
    "train.eval_every",
    "train.eval_windows",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.deadline_s",
    "train.data",
    "train.listen",
    "train.processes",
    "train.min_workers",
    "train.identity",
    "train.snapshot_every",
    "train.join_wait_s",
    "train.same_host",
    "train.exchange",
    "storage.*",
];

/// Every leaf of a config as (`table.key`, value), for comparisons that name the field.
fn leaves(config: &TrainConfig) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
    let value = serde_json::to_value(config).map_err(|e| Error::parse("config", e.to_string()))?;
    let mut out = std::collections::BTreeMap::new();
    if let serde_json::Value::Object(tables) = value {
        for (table, fields) in tables {
            if let serde_json::Value::Object(fields) = fields {
                for (key, v) in fields {
                    out.insert(format!("{table}.{key}"), v);
                }
            }
        }
    }
    Ok(out)
}

fn resumable(field: &str) -> bool {
    RESUMABLE.iter().any(|r| {
        r.strip_suffix('*')
            .map_or(*r == field, |prefix| field.starts_with(prefix))
    })
}

/// The fields that differ between a run's recorded config and the one asked for on resume, as
/// `field (run: X, asked: Y)`, split into those resume may change and those it may not.
pub fn resume_differences(recorded: &TrainConfig, requested: &TrainConfig) -> Result<(Vec<String>, Vec<String>)> {
    let (a, b) = (leaves(recorded)?, leaves(requested)?);
    let (mut allowed, mut refused) = (Vec::new(), Vec::new());
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for key in keys {
        let (x, y) = (a.get(key), b.get(key));
        if x == y {
            continue;
        }
        let show = |v: Option<&serde_json::Value>| v.map_or("unset".to_string(), |v| v.to_string());
        let line = format!("{key} (run: {}, asked: {})", show(x), show(y));
        if resumable(key) {
            allowed.push(line);
        } else {
            refused.push(line);
        }
    }
    Ok((allowed, refused))
}

/// How experts are spread over workers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ExpertPlacement {
    /// Expert `e` on worker `e % W` (the default).
    #[default]
    RoundRobin,
    /// Contiguous runs: expert `e` on worker `e * W / E`.
    Blocked,
    /// Expert `e` of every MoE block on worker `owners[e]`.
    Explicit(Vec<usize>),
}

impl std::str::FromStr for ExpertPlacement {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "round-robin" => Ok(ExpertPlacement::RoundRobin),
            "blocked" => Ok(ExpertPlacement::Blocked),
            list => list
                .split(',')
                .map(|w| w.trim().parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(ExpertPlacement::Explicit)
                .map_err(|_| {
                    Error::config(format!(
                        "train.placement (--placement) must be \"round-robin\", \"blocked\" or a comma-separated worker per expert, got {list:?}"
                    ))
                }),
        }
    }
}

/// The small model of the unit tests (as `tests/common`'s `small_config`): 2 MoE blocks of 4
/// experts, d_model 32, 4 groups of 2 sequences of 16 tokens.
#[cfg(test)]
pub(crate) fn small_test_config() -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.d_model = 32;
    c.model.n_layer = 2;
    c.model.n_head = 2;
    c.model.block_size = 16;
    c.model.d_ff = 64;
    c.model.experts = 4;
    c.model.k = 2;
    c.train.batch = 8;
    c.train.groups = 4;
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's own config file sets only what it names: the run's other settings (its threads
    /// among them) are not replaced by the defaults the file left unset.
    #[test]
    fn a_file_overlays_only_the_keys_it_sets() {
        let path = std::env::temp_dir().join(format!("semoe-overlay-{}.toml", std::process::id()));
        std::fs::write(&path, "[train]\ndata = \"/d/t.txt\"\neval_every = 7\n").expect("write");
        let (own, keys) = TrainConfig::from_file_with_keys(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        assert_eq!(own.train.threads, TrainConfig::default().train.threads);
        let train = keys.get("train").and_then(|t| t.as_table()).expect("a [train] table");
        let mut set: Vec<&str> = train.keys().map(String::as_str).collect();
        set.sort_unstable();
        assert_eq!(set, ["data", "eval_every"]);
        assert_eq!(keys.len(), 1, "{keys:?}");
        let mut run = TrainConfig::default();
        run.train.threads = 16;
        run.train.batch = 64;
        let mine = run.overlaid(&keys).expect("overlay");
        assert_eq!(mine.train.threads, 16);
        assert_eq!(mine.train.batch, 64);
        assert_eq!(mine.train.eval_every, 7);
        assert_eq!(mine.train.data.as_deref(), Some(Path::new("/d/t.txt")));
        let (differ, _) = resume_differences(&run, &mine).expect("compare");
        assert!(differ.iter().any(|d| d.contains("train.eval_every")), "{differ:?}");
        assert!(
            !differ.iter().any(|d| d.contains("threads") || d.contains("batch")),
            "{differ:?}"
        );
    }

    #[test]
    fn runtime_and_tier_settings_are_refused_on_the_gpu_by_name() {
        let gpu = || {
            let mut c = TrainConfig::default();
            c.train.device = ComputeDevice::Cuda;
            c
        };
        gpu().validate().expect("the defaults train on the GPU");
        type Set = fn(&mut TrainConfig);
        let cases: [(&str, Set); 6] = [
            ("storage.shard_dense", |c| c.storage.shard_dense = true),
            ("storage.prefetch", |c| c.storage.prefetch = false),
            ("storage.cache_policy", |c| c.storage.cache_policy = "lru".into()),
            ("storage.cache_policy", |c| {
                c.storage.cache_policy = "se-moe".into();
                c.storage.cache_beta = 0.5;
            }),
            ("train.placement", |c| c.train.placement = "blocked".into()),
            ("storage.io_threads", |c| c.storage.io_threads = 2),
        ];
        for (key, set) in cases {
            let mut c = gpu();
            set(&mut c);
            let err = c.validate().expect_err(key).to_string();
            assert!(err.contains(key) && err.contains("does not apply"), "{err}");
        }
        // Another spelling of a default is the default.
        let mut c = gpu();
        c.storage.cache_policy = "Step-Order".into();
        c.storage.cache_beta = 0.5;
        c.validate()
            .expect("the default policy, however spelt (its SE-MoE settings unused)");
    }

    #[test]
    fn storage_budgets_need_workers_in_process_or_worker_processes() {
        let mut c = TrainConfig::default();
        c.train.workers = 0;
        c.storage.device_budget = "1MiB".into();
        let err = c.validate().expect_err("the plain loop").to_string();
        assert!(err.contains("storage budgets need the actor runtime"), "{err}");
        c.train.processes = 2;
        c.validate().expect("worker processes hold tiers");
        c.train.processes = 0;
        c.train.workers = 2;
        c.validate().expect("in-process workers hold tiers");
    }

    #[test]
    fn counts_that_would_hang_or_addresses_that_cannot_bind_are_refused_naming_the_key() {
        let refused = |edit: &dyn Fn(&mut TrainConfig), key: &str| {
            let mut c = TrainConfig::default();
            edit(&mut c);
            let err = c.validate().expect_err(key).to_string();
            assert!(err.contains(key), "{key}: {err}");
        };
        refused(&|c| c.storage.io_threads = 100_000, "storage.io_threads");
        refused(&|c| c.storage.io_threads = 0, "storage.io_threads");
        refused(&|c| c.train.listen = "myhost:7000".into(), "train.listen");
        // Workers started here could not dial the ticket's address.
        for every_address in ["0.0.0.0:7000", "[::]:0"] {
            refused(
                &|c| {
                    c.train.listen = every_address.into();
                    c.train.processes = 2;
                },
                "train.listen (--listen)",
            );
        }
        refused(&|c| c.storage.cache_policy = "mru".into(), "storage.cache_policy");
        // Tier settings without a Device budget would do nothing.
        let in_process = |c: &mut TrainConfig| c.train.workers = 2;
        refused(
            &|c| {
                in_process(c);
                c.storage.host_budget = "1GiB".into();
            },
            "storage.host_budget (--host-budget) applies only with storage.device_budget",
        );
        refused(
            &|c| {
                in_process(c);
                c.storage.cache_policy = "lru".into();
            },
            "storage.cache_policy (--cache-policy",
        );
        refused(
            &|c| {
                in_process(c);
                c.storage.prefetch = false;
            },
            "storage.prefetch (--no-prefetch)",
        );
        let mut c = TrainConfig::default();
        in_process(&mut c);
        c.storage.device_budget = "1GiB".into();
        c.storage.host_budget = "1GiB".into();
        c.storage.cache_policy = "lru".into();
        c.storage.prefetch = false;
        c.validate().expect("tier settings with a Device budget");
        refused(
            &|c| {
                c.storage.cache_policy = "se-moe".into();
                c.storage.cache_beta = 2.0;
            },
            "storage.cache_beta",
        );
        let mut c = TrainConfig::default();
        c.storage.io_threads = MAX_IO_THREADS;
        // (I/O threads move experts between tiers, which only a Device budget makes them do.)
        c.storage.device_budget = "1GiB".into();
        c.train.listen = "127.0.0.1:0".into();
        c.validate().expect("the largest io_threads and an IP:PORT are valid");
        c.train.listen = "0.0.0.0:7000".into();
        c.validate()
            .expect("every address, with workers that join from elsewhere only");
    }

    #[test]
    fn on_a_gpu_the_device_budget_bounds_the_gpu_and_there_is_no_host_tier() {
        let mut c = TrainConfig::default();
        c.train.device = ComputeDevice::Cuda;
        c.storage.device_budget = "4GiB".into();
        c.validate().expect("the Device budget bounds the GPU's memory pool");
        c.storage.host_budget = "8GiB".into();
        let err = c.validate().expect_err("no Host tier on the GPU").to_string();
        assert!(err.contains("storage.host_budget is not supported"), "{err}");
        c.storage.device_budget = String::new();
        let err = c.validate().expect_err("a Host budget alone").to_string();
        assert!(err.contains("storage.host_budget is not supported"), "{err}");
    }
}
