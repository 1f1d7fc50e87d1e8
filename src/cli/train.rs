//! `semoe train`: flags over the config file over defaults, a new run or `--resume`, the time
//! budget, graceful stops on SIGINT/SIGTERM, the summary, the report and the sample.

use clap::Args;
use semoe::infer::SampleOptions;
use semoe::storage::run_dir;
use semoe::train::trainer::{ResumeOptions, StopReason};
use semoe::train::{TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use super::generate::{stream_sample, unescape};

/// Options of `semoe train`. Flags override the config file; the config file overrides defaults.
#[derive(Args)]
#[command(allow_negative_numbers = true, after_help = TRAIN_AFTER_HELP)]
pub struct TrainArgs {
    /// TOML config file with [model], [optimizer] and [train] tables (see `semoe train --print-config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory for config, metrics, checkpoints and report (default: a new
    /// runs/run-YYYYMMDD-HHMMSS, UTC). One process at a time: a directory in use is refused.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its newest intact checkpoint, with the run's own config.
    /// Settings that do not change the bits may be given again (threads, workers, placement,
    /// storage, time limit, eval and checkpoint cadence, steps); others are refused.
    #[arg(long, requires = "run_dir")]
    resume: bool,
    /// With --resume: continue even if the training text differs from the checkpoint's.
    #[arg(long, requires = "resume")]
    allow_data_change: bool,
    /// Train on this UTF-8 text file or directory instead of the bundled corpus (a directory's
    /// files in sorted path order, joined with a blank line; links followed, a file under two
    /// names read once, names starting with `.` left out; the last train.val_fraction validates).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Optimizer steps (the learning-rate schedule spans them); run in full unless --time-budget
    /// is given too (a config file's time budget is then not applied).
    #[arg(long)]
    steps: Option<u64>,
    /// Fit the run in this many seconds of training and evaluation: a few steps are measured
    /// first, and the steps lowered to what fits (0: no budget). Without --steps, --time-budget
    /// or --config, the main job uses a 270 s budget.
    #[arg(long, value_name = "SECONDS")]
    time_budget: Option<f64>,
    /// Stop after this many seconds even if the steps are not done (0: no limit).
    #[arg(long)]
    time_limit: Option<f64>,
    /// Compute threads (0: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// In-process workers of the actor runtime (experts and groups spread over them); 0 runs the
    /// plain loop without actors. Every count gives the same parameters, bit for bit.
    #[arg(long)]
    workers: Option<usize>,
    /// Compute on `cpu` or on `cuda` (GPU 0: the whole model and optimizer on the device, the plain
    /// loop; a build with `--features cuda`). A run keeps its device on --resume.
    #[arg(long, value_parser = ["cpu", "cuda"])]
    device: Option<String>,
    /// How the workers exchange expert rows: `transport` (requests and replies), `sim`
    /// (collectives in NCCL's model on its CPU stand-in; in process, or between worker processes
    /// over their data plane) or `nccl` (collectives through NCCL: in-process worker i on GPU i,
    /// worker process i started here on GPU i; a build with `--features cuda`). Same parameters,
    /// bit for bit.
    #[arg(long, value_parser = ["transport", "sim", "nccl"])]
    exchange: Option<String>,
    /// Where experts live: round-robin, blocked, or a comma-separated worker per expert.
    #[arg(long)]
    placement: Option<String>,
    /// Train over this many worker processes started on this machine (`semoe worker`, reaped at
    /// the end); more may join and leave while it runs. Same parameters, bit for bit.
    #[arg(long)]
    processes: Option<usize>,
    /// Listen for worker processes on IP:PORT (0.0.0.0 for every interface; port 0: the OS
    /// chooses); they join with `semoe worker --ticket RUN_DIR/join.ticket`.
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<String>,
    /// Serve the job identity made by `semoe ticket --out DIR` (its certificate, and its ticket's
    /// token), so workers can hold the ticket before the run starts.
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Worker processes needed before training starts (default: --processes, at least 1).
    #[arg(long)]
    min_workers: Option<usize>,
    /// With worker processes: keep an in-memory copy of the state every this many steps (a lost
    /// worker costs a replay of the steps since).
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// With worker processes: how long to wait for workers, in seconds (--min-workers of them at
    /// the start, one after every worker left; then the run stops with a checkpoint, exit code 75).
    #[arg(long, value_name = "SECONDS")]
    join_wait: Option<f64>,
    /// With worker processes: those on this machine exchange data over QUIC too, as between
    /// machines (by default they use Unix sockets: the same bytes, no encryption, less CPU).
    #[arg(long)]
    quic_only: bool,
    /// Serve the runtime's metrics as Prometheus text on HOST:PORT (path /metrics).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Bytes of expert state each worker keeps in the Device tier (the compute working set; e.g.
    /// 64MiB). It must hold one MoE block's experts. Unset: everything stays in memory. With
    /// --device cuda: the GPU memory the model's tensors may take (one pool of that size).
    #[arg(long, value_name = "SIZE")]
    device_budget: Option<String>,
    /// Bytes of expert state each worker caches in the Host tier (e.g. 128MiB); what fits in
    /// neither budget lives in the Disk tier under the run directory.
    #[arg(long, value_name = "SIZE")]
    host_budget: Option<String>,
    /// Cache policy of the tiers: step-order (the default: evict the expert whose next use in the
    /// step's order of blocks is furthest), se-moe (decayed hit counters) or lru.
    #[arg(long, value_name = "POLICY")]
    cache_policy: Option<String>,
    /// Load experts only when used, without prefetching them from the routing.
    #[arg(long)]
    no_prefetch: bool,
    /// Shard the dense parameters across workers (ZeRO-3 style): each keeps the tensors it owns
    /// and gathers the others' one leg ahead while it computes (needs --workers 2 or more to matter).
    #[arg(long)]
    shard_dense: bool,
    /// Seed of initialisation and sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Sequences per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Groups per step (MoE routing and capacity are per group).
    #[arg(long)]
    groups: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Context length in bytes.
    #[arg(long)]
    block_size: Option<usize>,
    /// Residual width.
    #[arg(long)]
    d_model: Option<usize>,
    /// Transformer blocks.
    #[arg(long)]
    layers: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Hidden width of each expert.
    #[arg(long)]
    d_ff: Option<usize>,
    /// Experts per MoE block.
    #[arg(long)]
    experts: Option<usize>,
    /// Experts per token.
    #[arg(long)]
    k: Option<usize>,
    /// A dense model with the same active parameters: every block a dense FFN of width k * d_ff.
    #[arg(long)]
    dense: bool,
    /// Evaluate every this many steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Checkpoint every this many steps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Bytes to sample after training (0: none).
    #[arg(long, default_value_t = DEFAULT_SAMPLE_TOKENS)]
    sample_tokens: usize,
    /// Prompt of the sample after training.
    #[arg(long, default_value = DEFAULT_SAMPLE_PROMPT)]
    sample_prompt: String,
    /// No progress bar or progress lines (evaluations and the summary are still printed).
    #[arg(long)]
    quiet: bool,
    /// Print the resolved config as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// The bytes sampled after training, unless `--sample-tokens` says otherwise.
const DEFAULT_SAMPLE_TOKENS: usize = 400;
/// The prompt of that sample.
const DEFAULT_SAMPLE_PROMPT: &str = "ROMEO.\n";

impl TrainArgs {
    /// The first flag `semoe chaos` cannot honour (it runs a fresh job on the CPU, on in-process
    /// workers or on worker processes it starts itself, for its steps; checkpoints only where a
    /// checkpoint fault asks; no evaluation, sample or progress bar).
    pub fn chaos_refusal(&self) -> Option<&'static str> {
        [
            (self.resume, "--resume"),
            (self.listen.is_some(), "--listen"),
            (self.identity.is_some(), "--identity"),
            // The disturbed run waits for all its --processes.
            (self.min_workers.is_some(), "--min-workers"),
            (self.join_wait.is_some(), "--join-wait"),
            (self.metrics_addr.is_some(), "--metrics-addr"),
            (self.time_budget.is_some(), "--time-budget"),
            (self.print_config, "--print-config"),
            (self.device.is_some(), "--device"),
            (self.time_limit.is_some(), "--time-limit"),
            (self.eval_every.is_some(), "--eval-every"),
            (self.checkpoint_every.is_some(), "--checkpoint-every"),
            (self.sample_tokens != DEFAULT_SAMPLE_TOKENS, "--sample-tokens"),
            (self.sample_prompt != DEFAULT_SAMPLE_PROMPT, "--sample-prompt"),
            (self.quiet, "--quiet"),
        ]
        .into_iter()
        .find(|(set, _)| *set)
        .map(|(_, flag)| flag)
    }

    /// Whether the steps come from a flag or a config file that sets `train.steps` (one that does
    /// not leaves them to the command's default).
    pub fn sets_steps(&self) -> semoe::Result<bool> {
        if self.steps.is_some() {
            return Ok(true);
        }
        let Some(path) = &self.config else { return Ok(false) };
        let (_, keys) = TrainConfig::from_file_with_keys(path)?;
        Ok(sets_train_steps(&keys))
    }

    /// The --run-dir given.
    pub fn run_dir(&self) -> Option<&Path> {
        self.run_dir.as_deref()
    }
}

/// File-only settings of `semoe train`, listed under its `--help`.
pub const TRAIN_AFTER_HELP: &str = "Settings without a flag are set in the --config file (--print-config prints them \
all): model.vocab, dense_d_ff, moe_every, capacity_factor, min_capacity, dropless, drop_policy, normalize, aux_coef, \
z_coef, gelu; optimizer.min_lr, warmup, schedule, cooldown, beta1, beta2, eps, weight_decay, clip; \
train.eval_windows, keep_checkpoints, val_fraction, deadline_s; storage.cache_threshold, cache_beta, \
cache_decay_every, drop_page_cache, io_threads.\n\nCtrl-C (or SIGTERM) stops at the next step boundary, evaluates, \
checkpoints and writes the report; a second Ctrl-C stops at once. --resume continues bitwise.";

/// `semoe train --help` shows the default of every flag whose default comes from the config
/// (clap cannot show them itself: the flags are optional so that the config file can set them).
pub fn with_config_defaults(cmd: clap::Command) -> clap::Command {
    let d = TrainConfig::default();
    let defaults: Vec<(&str, String)> = vec![
        ("steps", d.train.steps.to_string()),
        ("time_limit", d.train.time_limit_s.to_string()),
        (
            "time_budget",
            format!("{DEFAULT_TIME_BUDGET_S} without --steps or --config, else 0"),
        ),
        ("threads", d.train.threads.to_string()),
        ("workers", d.train.workers.to_string()),
        ("placement", d.train.placement.clone()),
        ("processes", d.train.processes.to_string()),
        ("snapshot_every", d.train.snapshot_every.to_string()),
        ("join_wait", d.train.join_wait_s.to_string()),
        ("cache_policy", d.storage.cache_policy.clone()),
        ("seed", d.train.seed.to_string()),
        ("batch", d.train.batch.to_string()),
        ("groups", d.train.groups.to_string()),
        ("lr", d.optimizer.lr.to_string()),
        ("block_size", d.model.block_size.to_string()),
        ("d_model", d.model.d_model.to_string()),
        ("layers", d.model.n_layer.to_string()),
        ("heads", d.model.n_head.to_string()),
        ("d_ff", d.model.d_ff.to_string()),
        ("experts", d.model.experts.to_string()),
        ("k", d.model.k.to_string()),
        ("eval_every", d.train.eval_every.to_string()),
        ("checkpoint_every", d.train.checkpoint_every.to_string()),
    ];
    cmd.mut_subcommand("train", |mut train| {
        for (id, value) in defaults {
            train = train.mut_arg(id, |arg| {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                arg.help(format!("{help} [default: {value}]"))
            });
        }
        train
    })
}

/// Apply the flags of `semoe train` to a config (a new run's, or the recorded one on `--resume`,
/// where [`Trainer::resume_with_options`] refuses the changes that would change the bits).
pub fn apply_flags(a: &TrainArgs, c: &mut TrainConfig) -> semoe::Result<()> {
    macro_rules! set {
        ($field:expr, $flag:expr) => {
            if let Some(v) = $flag.clone() {
                $field = v;
            }
        };
    }
    let t = &mut c.train;
    if let Some(v) = &a.data {
        t.data = Some(v.clone());
    }
    set!(t.steps, a.steps);
    set!(t.time_limit_s, a.time_limit);
    set!(t.time_budget_s, a.time_budget);
    set!(t.threads, a.threads);
    set!(t.workers, a.workers);
    if let Some(device) = &a.device {
        // The value parser admits only the names `ComputeDevice` parses.
        if let Ok(d) = device.parse() {
            t.device = d;
        }
    }
    if let Some(exchange) = &a.exchange {
        // The value parser admits only the names `ExpertExchange` parses.
        if let Ok(e) = exchange.parse() {
            t.exchange = e;
        }
    }
    set!(t.placement, a.placement);
    set!(t.processes, a.processes);
    set!(t.listen, a.listen);
    set!(t.min_workers, a.min_workers);
    if let Some(dir) = &a.identity {
        t.identity = Some(dir.clone());
    }
    set!(t.snapshot_every, a.snapshot_every);
    set!(t.join_wait_s, a.join_wait);
    if a.quic_only {
        t.same_host = false;
    }
    set!(t.seed, a.seed);
    set!(t.batch, a.batch);
    set!(t.groups, a.groups);
    set!(t.eval_every, a.eval_every);
    set!(t.checkpoint_every, a.checkpoint_every);
    let st = &mut c.storage;
    set!(st.device_budget, a.device_budget);
    set!(st.host_budget, a.host_budget);
    set!(st.cache_policy, a.cache_policy);
    if a.no_prefetch {
        st.prefetch = false;
    }
    if a.shard_dense {
        st.shard_dense = true;
    }
    set!(c.optimizer.lr, a.lr);
    let m = &mut c.model;
    set!(m.block_size, a.block_size);
    set!(m.d_model, a.d_model);
    set!(m.n_layer, a.layers);
    set!(m.n_head, a.heads);
    set!(m.d_ff, a.d_ff);
    set!(m.experts, a.experts);
    set!(m.k, a.k);
    if a.dense {
        // The dense model of the same compute per token: k experts' width.
        m.moe_every = 0;
        m.dense_d_ff = match m.k.checked_mul(m.d_ff) {
            Some(width) if width > 0 => width,
            _ => {
                return Err(semoe::Error::config(format!(
                    "--dense makes the feed-forward k x d_ff wide: model.k ({}) and model.d_ff ({}) must be positive \
                     and their product a size",
                    m.k, m.d_ff
                )))
            }
        };
    }
    Ok(())
}

pub fn resolve_config(a: &TrainArgs) -> semoe::Result<TrainConfig> {
    let c = resolve_config_unchecked(a)?;
    c.validate()?;
    if let Some(key) = c.unused_process_setting() {
        return Err(semoe::Error::config(format!(
            "{key} applies to a run over worker processes (train.processes or train.listen), and this run has none"
        )));
    }
    Ok(c)
}

/// Whether a config file's keys (see [`TrainConfig::from_file_with_keys`]) set `train.steps`.
fn sets_train_steps(keys: &toml::Table) -> bool {
    keys.get("train")
        .and_then(|t| t.as_table())
        .is_some_and(|t| t.contains_key("steps"))
}

/// [`resolve_config`] before its validation: for a command that adjusts the config first (and
/// validates it then).
pub fn resolve_config_unchecked(a: &TrainArgs) -> semoe::Result<TrainConfig> {
    let mut c = match &a.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::default(),
    };
    apply_flags(a, &mut c)?;
    // The flag first: a flag the run would ignore is named as typed, before the config key it set.
    check_flags_apply(a, &c)?;
    Ok(c)
}

/// Refuse a flag that the run would ignore (given by hand, it means the user expects an effect).
fn check_flags_apply(a: &TrainArgs, c: &TrainConfig) -> semoe::Result<()> {
    let on_gpu = c.train.device == semoe::config::ComputeDevice::Cuda;
    if on_gpu {
        let cpu_flags = [
            ("--workers", a.workers.is_some_and(|w| w > 0)),
            ("--placement", a.placement.is_some()),
            ("--shard-dense", a.shard_dense),
            ("--no-prefetch", a.no_prefetch),
            ("--cache-policy", a.cache_policy.is_some()),
        ];
        if let Some((flag, _)) = cpu_flags.iter().find(|(_, given)| *given) {
            return Err(semoe::Error::config(format!(
                "{flag} applies to the actor runtime on the CPU; --device cuda trains the plain loop on one GPU"
            )));
        }
    }
    let actor_runtime = !on_gpu && (c.train.workers > 0 || c.train.elastic());
    if a.metrics_addr.is_some() && !actor_runtime {
        return Err(semoe::Error::config(
            "--metrics-addr serves the actor runtime's metrics (train.workers of 1 or more, or worker processes); \
             this run has none (the plain loop, or --device cuda)",
        ));
    }
    if c.train.elastic() && a.workers.is_some() {
        return Err(semoe::Error::config(
            "--workers sets the in-process workers; a run over worker processes has one worker per process \
             (--processes N starts them here)",
        ));
    }
    if !c.train.elastic() {
        let process_flags = [
            ("--min-workers", a.min_workers.is_some()),
            ("--snapshot-every", a.snapshot_every.is_some()),
            ("--join-wait", a.join_wait.is_some()),
            ("--quic-only", a.quic_only),
            ("--identity", a.identity.is_some()),
        ];
        if let Some((flag, _)) = process_flags.iter().find(|(_, given)| *given) {
            return Err(semoe::Error::config(format!(
                "{flag} applies to a run over worker processes (--processes N or --listen IP:PORT), and this run has none"
            )));
        }
        if a.placement.is_some() && c.train.workers == 0 {
            return Err(semoe::Error::config(
                "--placement places experts on the actor runtime's workers (--workers 1 or more); the plain loop has none",
            ));
        }
    }
    Ok(())
}

/// The sample after training starts from `prompt`: each of its bytes must be a token of the
/// model, or the sample is refused after the whole run.
fn check_sample_prompt(a: &TrainArgs, prompt: &str, c: &TrainConfig) -> semoe::Result<()> {
    if a.sample_tokens == 0 {
        return Ok(());
    }
    match prompt.bytes().find(|&b| usize::from(b) >= c.model.vocab) {
        Some(byte) => Err(semoe::Error::config(format!(
            "--sample-prompt holds byte {byte}, outside the model's vocabulary of {} (model.vocab): choose another \
             prompt, or --sample-tokens 0",
            c.model.vocab
        ))),
        // An empty prompt starts from a newline, which a small vocabulary may lack.
        None if prompt.is_empty() && usize::from(semoe::infer::batch::EMPTY_PROMPT_TOKEN) >= c.model.vocab => {
            Err(semoe::Error::config(format!(
                "--sample-prompt is empty, and an empty prompt starts from a newline (byte {}), outside the \
                 model's vocabulary of {} (model.vocab): give a prompt, or --sample-tokens 0",
                semoe::infer::batch::EMPTY_PROMPT_TOKEN,
                c.model.vocab
            )))
        }
        None => Ok(()),
    }
}

/// Stop at the next step boundary on the first SIGINT or SIGTERM; exit at once on the second.
pub fn install_stop_signals(stop: &Arc<AtomicUsize>) -> semoe::Result<StopSignals> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let twice = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        let fail = |e: std::io::Error| semoe::Error::runtime(format!("cannot handle signal {signal}: {e}"));
        // Registered first, so it sees the flag as the previous signal left it: the second
        // signal exits with 128 + its number, the first only sets the flags below.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&twice)).map_err(fail)?;
        signal_hook::flag::register(signal, Arc::clone(&twice)).map_err(fail)?;
        signal_hook::flag::register_usize(signal, Arc::clone(stop), signal as usize).map_err(fail)?;
    }
    Ok(StopSignals(twice))
}

/// The graceful stop while training runs. Dropped, the next SIGINT or SIGTERM exits at once
/// (during the report and the sample there is nothing to save). signal-hook cannot restore the
/// default action, so this arms the exit that a second signal takes.
pub struct StopSignals(Arc<AtomicBool>);

impl StopSignals {
    /// The next signal exits at once (as dropping does).
    pub fn exit_on_next(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next signal stops at a step boundary again (the one after it exits at once).
    pub fn stop_gracefully(&self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        self.exit_on_next();
    }
}

pub fn signal_name(signal: usize) -> &'static str {
    match signal as i32 {
        signal_hook::consts::SIGINT => "Ctrl-C (SIGINT)",
        signal_hook::consts::SIGTERM => "SIGTERM",
        _ => "a stop request",
    }
}

pub fn print_notices(trainer: &Trainer) {
    for notice in trainer.notices() {
        semoe::say!("warning: {notice}");
    }
}

/// `--metrics-addr`: the endpoint on a thread of its own, its address printed (the port the
/// system chose for port 0).
fn start_metrics(a: &TrainArgs) -> semoe::Result<Option<semoe::telemetry::metrics::BackgroundMetrics>> {
    let Some(addr) = &a.metrics_addr else {
        return Ok(None);
    };
    let server = semoe::telemetry::metrics::serve_in_background(addr)?;
    semoe::say!("metrics: http://{}/metrics", server.local_addr());
    Ok(Some(server))
}

pub fn run(a: &TrainArgs) -> semoe::Result<ExitCode> {
    // Checked before a run directory is created or locked (a bad prompt must not wait for the
    // end of the run to be refused).
    if let Some(addr) = &a.metrics_addr {
        semoe::telemetry::metrics::check_addr(addr)?;
    }
    let sample_prompt = unescape(&a.sample_prompt)?;
    // Ctrl-C or SIGTERM: one flag for the time budget's measurement and the run after it.
    let stop = Arc::new(AtomicUsize::new(0));
    let mut signals = None;
    // The endpoint starts right before the trainer (after the time budget's measurement, whose
    // steps are not the run's), so that what the runtime records while it starts is served.
    let metrics;
    let mut trainer = if a.resume {
        let dir = a.run_dir.clone().unwrap_or_default();
        if a.time_budget.is_some() {
            return Err(semoe::Error::config(
                "--time-budget chooses how many steps a new run takes (the count fixes its learning-rate schedule); \
                 a resumed run keeps its steps: --time-limit bounds this invocation, --steps changes the count",
            ));
        }
        let file = a.config.as_deref().map(TrainConfig::from_file_with_keys).transpose()?;
        // The file's train.steps applies only where the file sets it and no time budget: a budget
        // chose the run's steps when it started (recorded in its config), and the file's own
        // count (or the default, where it sets none) was never the run's.
        let file_sets_steps = file.as_ref().is_some_and(|(_, keys)| sets_train_steps(keys));
        let file_steps_apply = file_sets_steps && file.as_ref().is_some_and(|(f, _)| f.train.time_budget_s <= 0.0);
        if let Some((f, _)) = &file {
            let recorded = TrainConfig::from_file(&dir.join("config.toml")).ok();
            let file_sets_budget = file.as_ref().is_some_and(|(_, keys)| {
                keys.get("train")
                    .and_then(|t| t.as_table())
                    .is_some_and(|t| t.contains_key("time_budget_s"))
            });
            if file_sets_budget
                && recorded
                    .as_ref()
                    .is_some_and(|r| r.train.time_budget_s != f.train.time_budget_s)
            {
                semoe::say!(
                    "notice: the config file's train.time_budget_s ({} s) is not applied: a resumed run keeps its \
                     steps (--steps changes them, --time-limit bounds this invocation)",
                    f.train.time_budget_s
                );
            }
            // Said where the file sets steps that are not applied (not its default, nor where
            // --steps sets them).
            let unapplied = file_sets_steps && !file_steps_apply && a.steps.is_none();
            if let Some(r) = recorded.filter(|r| unapplied && r.train.steps != f.train.steps) {
                semoe::say!(
                    "notice: the config file's train.steps ({}) is not applied: the run keeps its {} steps, which its \
                     time budget or its first start chose (--steps changes them; a file changes them where it \
                     sets train.steps without a time budget)",
                    f.train.steps,
                    r.train.steps
                );
            }
        }
        // Set if the file's settings could not be laid over the run's (not expected: both read).
        let overlay_failed = std::cell::RefCell::new(None);
        let adjust = |c: &mut TrainConfig| {
            if let Some((_, keys)) = &file {
                // The file changes what it names; the rest stays as the run recorded it (its
                // data, budgets, cadence: not reset to their defaults). A time budget chooses a
                // new run's steps (as the flag, refused above): the run keeps its recorded one,
                // rather than recording one that never applies; and its recorded steps, unless
                // the file sets its own (see `file_steps_apply`).
                let budget = c.train.time_budget_s;
                let steps = c.train.steps;
                match c.overlaid(keys) {
                    Ok(overlaid) => *c = overlaid,
                    Err(e) => *overlay_failed.borrow_mut() = Some(e),
                }
                c.train.time_budget_s = budget;
                if !file_steps_apply {
                    c.train.steps = steps;
                }
            }
            // A flag that cannot apply (--dense of a zero width) leaves the config changed where
            // it was set, and the resume refuses what changed: a model flag changes the bits.
            let _ = apply_flags(a, c);
        };
        let options = ResumeOptions {
            steps: None,
            allow_data_change: a.allow_data_change,
        };
        let overlay_ok = || overlay_failed.borrow_mut().take().map_or(Ok(()), Err);
        let config_path = dir.join("config.toml");
        let lost = !config_path.is_file() && !semoe::storage::checkpoint::step_dirs(&dir)?.is_empty();
        if a.print_config {
            // Printed, and nothing written: a lost config is rebuilt in memory only.
            let (config, _) = if lost {
                let (recorded, ckpt) = semoe::train::trainer::config_of_newest_checkpoint(&dir)?;
                semoe::say!(
                    "warning: {} is missing: printing the config checkpoint {} records (a resume writes it back)",
                    config_path.display(),
                    ckpt.display()
                );
                semoe::train::trainer::resumed_config_from(recorded, &options, adjust)?
            } else {
                semoe::train::trainer::resumed_config(&dir, &options, adjust)?
            };
            overlay_ok()?;
            semoe::console::write_stdout(&config.to_toml()?, "the config")?;
            return Ok(ExitCode::SUCCESS);
        }
        if lost {
            // Lost: rebuilt from the newest checkpoint first, so that the flags are checked
            // against the run's own config below.
            let notice = semoe::train::trainer::rebuild_config(&dir)?;
            semoe::say!("warning: {notice}");
        }
        if config_path.is_file() {
            // Flags the resumed run would ignore are refused as on a fresh start, before anything
            // in the run directory changes.
            let (config, _) = semoe::train::trainer::resumed_config(&dir, &options, adjust)?;
            overlay_ok()?;
            refuse_a_pipe_read_twice(&config, true)?;
            check_flags_apply(a, &config)?;
            check_sample_prompt(a, &sample_prompt, &config)?;
        }
        metrics = start_metrics(a)?;
        let trainer = Trainer::resume_with_options(&dir, &options, adjust)?;
        overlay_ok()?;
        trainer
    } else {
        let mut config = resolve_config(a)?;
        // Printed without the main job's default budget: a config made from it and run with
        // --steps N runs N steps.
        if a.print_config {
            semoe::console::write_stdout(&config.to_toml()?, "the config")?;
            return Ok(ExitCode::SUCCESS);
        }
        check_sample_prompt(a, &sample_prompt, &config)?;
        if a.steps.is_none() && a.time_budget.is_none() && a.config.is_none() {
            config.train.time_budget_s = DEFAULT_TIME_BUDGET_S;
        }
        // --steps N runs N steps: a budget that a config file brought (a run's recorded config
        // holds the main job's) would lower them unasked.
        if let (Some(steps), None) = (a.steps, a.time_budget) {
            if config.train.time_budget_s > 0.0 {
                semoe::say!(
                    "notice: --steps {steps} runs {steps} steps: the config file's train.time_budget_s ({} s) is not \
                     applied (--time-budget S fits them in a budget)",
                    config.train.time_budget_s
                );
                config.train.time_budget_s = 0.0;
            }
        }
        refuse_a_pipe_read_twice(&config, false)?;
        let dir = match &a.run_dir {
            Some(dir) => dir.clone(),
            None => run_dir::create_unique(Path::new("runs"), &run_dir::default_name(std::time::SystemTime::now()))?,
        };
        // Made by this start (the default one above, or a --run-dir not there yet, which the
        // time budget's measurement makes): a failed start removes it again.
        let ours = a.run_dir.is_none() || !dir.exists();
        if config.train.time_budget_s > 0.0 {
            // Measured inside the run directory (on the run's disk); a directory in use or one
            // that would be refused is refused before the measurement.
            if run_dir::is_locked(&dir) {
                run_dir::RunDirLock::acquire(&dir)?;
            }
            // A signal during the measurement stops it (its scratch run removed), not the process.
            signals = Some(install_stop_signals(&stop)?);
            let measured = run_dir::check_fresh(&dir)
                .and_then(|()| semoe::train::engine::preflight_elastic(&config))
                .and_then(|()| fit_time_budget(&mut config, &dir, &stop));
            if let Err(e) = measured {
                if a.run_dir.is_none() {
                    // The default directory was made above, and is still empty.
                    let _ = std::fs::remove_dir(&dir);
                }
                let signal = stop.load(std::sync::atomic::Ordering::SeqCst);
                if signal != 0 {
                    semoe::say!(
                        "stopped by {} while measuring the time budget: nothing was trained",
                        signal_name(signal)
                    );
                    return Ok(ExitCode::from((128 + signal).min(255) as u8));
                }
                return Err(e);
            }
            // Until the run starts (it may wait for worker processes), a signal exits at once,
            // as it would without the measurement's handlers.
            if let Some(installed) = &signals {
                installed.exit_on_next();
            }
        }
        // (The endpoint starts after the time budget's measurement, whose steps it must not count.)
        let started = match start_metrics(a) {
            Ok(m) => {
                metrics = m;
                Trainer::new(config, &dir)
            }
            Err(e) => {
                metrics = None;
                Err(e)
            }
        };
        if started.is_err() && ours {
            // Made above or by the measurement (the trainer found it there, so it leaves it).
            run_dir::remove_failed_start(&dir);
        }
        started?
    };
    // Served until this function returns.
    let _metrics_endpoint = metrics;
    print_notices(&trainer);
    let dir = trainer.run_dir().to_path_buf();
    let c = trainer.config().clone();
    if trainer.steps_done() >= c.train.steps {
        let summary = trainer.run(false)?;
        semoe::say!(
            "{} is already finished: {} of {} steps, validation loss {:.4} at step {}; pass --steps N (more than {}) \
             with --resume to train further",
            dir.display(),
            summary.steps,
            summary.planned_steps,
            summary.val_loss,
            summary.val_step,
            summary.steps
        );
        return Ok(ExitCode::SUCCESS);
    }
    let model = trainer.model()?;
    semoe::say!(
        "semoe train: {} parameters ({} active per token), {} blocks ({} MoE, {} experts, top-{}), d_model {}, context {}",
        model.num_params(),
        model.active_params(),
        c.model.n_layer,
        (0..c.model.n_layer).filter(|&l| c.model.is_moe(l)).count(),
        c.model.experts,
        c.model.k,
        c.model.d_model,
        c.model.block_size
    );
    semoe::say!(
        "data: {} ({} training bytes, {} validation bytes); {} steps of {} sequences in {} groups; {} threads; {}",
        trainer.corpus().source,
        trainer.corpus().train.len(),
        trainer.corpus().val.len(),
        c.train.steps,
        c.train.batch,
        c.train.groups,
        c.train.threads,
        if c.train.device == semoe::config::ComputeDevice::Cuda {
            "the plain loop on GPU 0 (CUDA)".to_string()
        } else if c.train.elastic() {
            format!(
                "actor runtime over worker processes ({} started here, at least {} needed), {} experts{}",
                c.train.processes,
                if c.train.min_workers > 0 {
                    c.train.min_workers
                } else {
                    c.train.processes.max(1)
                },
                c.train.placement,
                match c.train.exchange {
                    semoe::config::ExpertExchange::Transport => "",
                    semoe::config::ExpertExchange::Sim =>
                        ", expert rows over collectives (the CPU stand-in of NCCL, over the data plane)",
                    semoe::config::ExpertExchange::Nccl => ", expert rows over NCCL (each worker process on its GPU)",
                }
            )
        } else if c.train.workers == 0 {
            "plain loop (no actors)".to_string()
        } else {
            let exchange = match c.train.exchange {
                semoe::config::ExpertExchange::Transport => "",
                semoe::config::ExpertExchange::Sim => ", expert rows over collectives (the CPU stand-in of NCCL)",
                semoe::config::ExpertExchange::Nccl => ", expert rows over NCCL",
            };
            format!(
                "actor runtime with {} worker(s), {} experts{exchange}",
                c.train.workers, c.train.placement
            )
        }
    );
    semoe::say!(
        "run directory: {}; memory: about {} estimated",
        dir.display(),
        semoe::storage::tiers::format_bytes(semoe::config::memory::estimate(&c).total())
    );
    trainer.set_stop_flag(Arc::clone(&stop));
    let signals = match signals {
        Some(installed) => {
            installed.stop_gracefully();
            installed
        }
        None => install_stop_signals(&stop)?,
    };
    let summary = trainer.run(!a.quiet)?;
    drop(signals);
    let resume_hint = format!("semoe train --resume --run-dir {}", dir.display());
    match summary.stop {
        StopReason::TimeLimit => semoe::say!(
            "time limit of {} s reached: ran {} of the {} planned steps (this invocation: {}); continue with: {resume_hint}",
            format!("{:.3}", c.train.time_limit_s).trim_end_matches('0').trim_end_matches('.'),
            summary.steps,
            summary.planned_steps,
            summary.steps_run
        ),
        StopReason::Requested(signal) => semoe::say!(
            "stopped by {} after step {} of {}; the newest checkpoint is {}; continue with: {resume_hint}",
            signal_name(signal),
            summary.steps,
            summary.planned_steps,
            summary.checkpoint.display()
        ),
        // The state the coordinator kept is of `summary.steps`: the committed step when the
        // workers left, its last in-memory copy when they were lost.
        StopReason::NoWorkers if summary.checkpoint.as_os_str().is_empty() => semoe::say!(
            "every worker left or was lost, and none joined within {} s: the run stopped at step {} of {} with no \
             checkpoint to continue from (start it again)",
            c.train.join_wait_s,
            summary.steps,
            summary.planned_steps
        ),
        StopReason::NoWorkers => semoe::say!(
            "every worker left or was lost, and none joined within {} s: the run stopped with the state of step {} \
             (of {}); the newest checkpoint is {}; continue, once workers can join, with: {resume_hint}",
            c.train.join_wait_s,
            summary.steps,
            summary.planned_steps,
            summary.checkpoint.display()
        ),
        StopReason::Finished | StopReason::AlreadyFinished | StopReason::StopAt => {}
    }
    semoe::say!(
        "done: {} of {} steps; validation loss {:.4} nats/byte at step {}; mean train loss of the last {} steps {:.4}; \
         {:.0} tokens/s, {:.1} s; checkpoint {}",
        summary.steps,
        summary.planned_steps,
        summary.val_loss,
        summary.val_step,
        summary.mean_train_loss_steps,
        summary.mean_train_loss,
        summary.tokens_per_s,
        summary.elapsed_s,
        summary.checkpoint.display()
    );
    match trainer.gpu_memory() {
        Ok(Some(m)) => semoe::say!(
            "GPU memory: at most {} in the model's tensors, gradients, optimizer state and activations, {} reserved, \
             of the Device budget of {}",
            semoe::storage::tiers::format_bytes(m.peak),
            semoe::storage::tiers::format_bytes(m.reserved_peak),
            semoe::storage::tiers::format_bytes(m.budget),
        ),
        Ok(None) => {}
        Err(e) => semoe::say!("warning: the GPU's memory figures could not be read: {e}"),
    }
    if let Some(m) = trainer.membership() {
        let recovery = if m.recoveries == 0 {
            String::new()
        } else {
            format!("; membership changes took up to {:.2} s", m.recovery_worst_seconds)
        };
        semoe::say!(
            "membership: epoch {}, {} workers at the end; {} joined, {} left, {} lost; {} steps replayed; {} of state moved{recovery}",
            m.epoch,
            m.members,
            m.joins,
            m.leaves,
            m.crashes,
            m.replayed_steps,
            semoe::storage::tiers::format_bytes(m.state_bytes),
        );
    }
    match semoe::telemetry::write_report(&dir) {
        Ok(_) => semoe::say!("report: {}", dir.join("report.md").display()),
        Err(e) => semoe::say!("warning: no report: {e}"),
    }
    match summary.stop {
        StopReason::Requested(signal) => return Ok(ExitCode::from((128 + signal).min(255) as u8)),
        StopReason::NoWorkers => return Ok(ExitCode::from(NO_WORKERS_EXIT)),
        _ => {}
    }
    if a.sample_tokens > 0 {
        semoe::say!("sample (temperature 0.8, top-k 40):");
        let opts = SampleOptions {
            max_tokens: a.sample_tokens,
            ..SampleOptions::default()
        };
        let mut decoder = semoe::infer::BatchDecoder::new(trainer.model()?, semoe::kernels::Cpu::new(1)?, 1)?;
        stream_sample(&mut decoder, &sample_prompt, &opts)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The exit code of a run over worker processes that stopped because every worker left and none
/// joined within `train.join_wait_s` (`EX_TEMPFAIL` of sysexits.h: a resume later can go on).
pub const NO_WORKERS_EXIT: u8 = 75;

/// The time budget of the main job when neither `--steps`, `--time-budget` nor `--config` is
/// given: 4 min 30 s of training and evaluation, so that with start-up, the report and the sample
/// the run takes about five minutes on any machine. On the 2-core Zen 5 machine the default 5,000
/// steps fit in about 3 minutes and are kept; a machine a third as fast gets fewer steps.
pub const DEFAULT_TIME_BUDGET_S: f64 = 270.0;

/// Lower `config.train.steps` to what fits in `config.train.time_budget_s` on this machine, saying
/// what was measured and chosen.
pub fn fit_time_budget(config: &mut TrainConfig, run_dir: &Path, stop: &AtomicUsize) -> semoe::Result<()> {
    let budget = config.train.time_budget_s;
    let cal = semoe::train::calibrate::calibrate(config, budget, run_dir, stop)?;
    let wanted = config.train.steps;
    // The steps fit at the pace measured; a machine that slows down later (a busy neighbour)
    // would overrun the budget. So the run also stops once the budget, less its last evaluation
    // and checkpoint, has passed (`--resume` finishes the schedule); a time limit of the user's
    // that is shorter stays.
    let guard = (budget - cal.eval_seconds - cal.checkpoint_seconds).max(budget / 2.0);
    if config.train.time_limit_s <= 0.0 || config.train.time_limit_s > guard {
        config.train.time_limit_s = guard;
    }
    semoe::say!(
        "time budget {}: measured {:.1} ms a step, {:.2} s an evaluation, {:.2} s a checkpoint; {} (planned {}){}; \
         training stops at {:.1} s if this machine slows down",
        semoe::train::trainer::format_duration(budget),
        cal.step_seconds * 1e3,
        cal.eval_seconds,
        cal.checkpoint_seconds,
        if cal.steps < wanted {
            format!("{} of the {wanted} steps fit", cal.steps)
        } else {
            format!("all {wanted} steps fit")
        },
        semoe::train::trainer::format_duration(cal.planned_seconds),
        if cal.steps < wanted {
            "; the schedule spans them (--steps N for a fixed run)"
        } else {
            ""
        },
        config.train.time_limit_s
    );
    config.train.steps = cal.steps;
    Ok(())
}

/// A pipe as `--data` is read to its end once; a run that reads its text again (the time budget's
/// measurement trains on it first, worker processes read it each) would wait for ever on the
/// second open.
fn refuse_a_pipe_read_twice(config: &TrainConfig, resumed: bool) -> semoe::Result<()> {
    let Some(data) = &config.train.data else {
        return Ok(());
    };
    // (A resumed run keeps its steps: no time budget is measured.)
    let reader = if config.train.time_budget_s > 0.0 && !resumed {
        "the time budget's measurement reads it before the run"
    } else if config.train.elastic() {
        "each worker process reads it"
    } else {
        return Ok(());
    };
    if semoe::train::trainer::is_pipe(data) {
        return Err(semoe::Error::config(format!(
            "--data {} is a pipe, which can be read once, and this run reads its text more than once ({reader}): \
             write the text to a file, or give --steps N to a run in one process",
            data.display()
        )));
    }
    Ok(())
}
