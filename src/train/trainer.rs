//! The training loop: sample a batch, run its groups side by side (each on one compute thread, into
//! its own gradient buffers), sum the group gradients in group order (so the result does not depend
//! on which thread ran which group), clip, take an AdamW step, log, evaluate, checkpoint.
//!
//! A run directory holds `config.toml`, `metrics.jsonl` (one JSON object per line), `checkpoints/`
//! and, at the end, the report (`report.md` and SVG plots). `Trainer::resume` continues from the
//! newest checkpoint and ends bitwise identical to an uninterrupted run: the sampler is a pure
//! function of (seed, step, group), and the checkpoint holds the parameters and both Adam moments.

use super::config::TrainConfig;
use super::data::Corpus;
use super::optimizer::{self, AdamW};
use super::sampler;
use crate::actors::{ExpertPlacement, Runtime};
use crate::error::{Error, Result};
use crate::kernels::{Backend, Cpu};
use crate::model::gpt::{Gpt, GroupOutput};
use crate::storage::checkpoint::{self, NamedTensor};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What one optimizer step reports.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The step just taken (1-based: the number of steps done).
    pub step: u64,
    /// Mean cross-entropy of the batch (nats per byte).
    pub ce_loss: f64,
    /// Router losses summed over MoE blocks (each the mean over groups).
    pub aux_loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens routed to each expert, per MoE block (summed over groups).
    pub expert_tokens: Vec<Vec<usize>>,
    /// Dropped assignments per MoE block.
    pub dropped: Vec<usize>,
    /// Seconds the step took.
    pub seconds: f64,
}

/// The result of [`Trainer::run`].
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Steps done in total.
    pub steps: u64,
    /// The last validation loss.
    pub val_loss: f64,
    /// The last smoothed training loss.
    pub train_loss: f64,
    /// Training tokens per second (excluding evaluation and checkpoints).
    pub tokens_per_s: f64,
    /// Wall-clock seconds of this invocation.
    pub elapsed_s: f64,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
}

/// The actor runtime a [`Trainer`] drives (with `train.workers > 0`), on its own tokio runtime.
struct RuntimeEngine {
    tokio: tokio::runtime::Runtime,
    runtime: Runtime,
    /// Whether `Trainer::model`/`optimizer` lag behind the runtime's committed state.
    stale: bool,
}

/// A training run.
pub struct Trainer {
    config: TrainConfig,
    corpus: Corpus,
    model: Gpt<f32>,
    optimizer: AdamW,
    cpu: Cpu,
    run_dir: PathBuf,
    group_grads: Vec<Gpt<f32>>,
    engine: Option<RuntimeEngine>,
    /// Training seconds before this invocation (from the checkpoint), for the time axis of the log.
    prior_seconds: f64,
}

fn corpus_for(config: &TrainConfig) -> Result<Corpus> {
    match &config.train.data {
        Some(path) => Corpus::from_path(path, config.train.val_fraction, config.model.block_size + 1),
        None => Corpus::bundled(),
    }
}

impl Trainer {
    /// Start a fresh run in `run_dir` (created; an existing run there is an error, to never overwrite
    /// a previous run's checkpoints).
    pub fn new(mut config: TrainConfig, run_dir: &Path) -> Result<Self> {
        config.validate()?;
        // Record the data path absolutely, so the run resumes (and its checkpoints evaluate) from
        // any working directory.
        if let Some(path) = &config.train.data {
            config.train.data =
                Some(std::fs::canonicalize(path).map_err(|e| Error::io("cannot read the training data", path, e))?);
        }
        if checkpoint::latest(run_dir)?.is_some() {
            return Err(Error::config(format!(
                "{} already holds a run with checkpoints; use --resume to continue it or choose another --run-dir",
                run_dir.display()
            )));
        }
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io("cannot create the run directory", run_dir, e))?;
        let corpus = corpus_for(&config)?;
        let model = Gpt::init(&config.model, config.train.seed)?;
        let optimizer = new_optimizer(&config, &model)?;
        let config_path = run_dir.join("config.toml");
        std::fs::write(&config_path, config.to_toml()?).map_err(|e| Error::io("cannot write", &config_path, e))?;
        let metrics = run_dir.join("metrics.jsonl");
        std::fs::write(&metrics, "").map_err(|e| Error::io("cannot create", &metrics, e))?;
        Trainer::assemble(config, corpus, model, optimizer, run_dir, 0.0)
    }

    /// Continue the run in `run_dir` from its newest checkpoint, with the run's own `config.toml`.
    /// Metrics logged after that checkpoint (by an interrupted invocation) are dropped, so the log
    /// reads as one run.
    pub fn resume(run_dir: &Path, override_steps: Option<u64>) -> Result<Self> {
        Trainer::resume_with(run_dir, override_steps, |_| {})
    }

    /// [`Trainer::resume`], with the run's configuration adjusted first by `adjust` (for settings
    /// that do not change the result, such as the storage budgets: a checkpoint loads into any).
    pub fn resume_with(
        run_dir: &Path,
        override_steps: Option<u64>,
        adjust: impl FnOnce(&mut TrainConfig),
    ) -> Result<Self> {
        let mut config = TrainConfig::from_file(&run_dir.join("config.toml"))?;
        if let Some(steps) = override_steps {
            config.train.steps = steps;
        }
        adjust(&mut config);
        config.validate()?;
        let dir = checkpoint::latest(run_dir)?.ok_or_else(|| {
            Error::config(format!(
                "{} has no complete checkpoint to resume from",
                run_dir.display()
            ))
        })?;
        let (model, optimizer, prior_seconds) = load_state(&config, &dir)?;
        truncate_metrics(&run_dir.join("metrics.jsonl"), optimizer.step)?;
        let corpus = corpus_for(&config)?;
        Trainer::assemble(config, corpus, model, optimizer, run_dir, prior_seconds)
    }

    fn assemble(
        config: TrainConfig,
        corpus: Corpus,
        model: Gpt<f32>,
        optimizer: AdamW,
        run_dir: &Path,
        prior_seconds: f64,
    ) -> Result<Self> {
        let cpu = Cpu::new(config.train.threads)?;
        let (group_grads, engine) = if config.train.workers == 0 {
            let grads = (0..config.train.groups)
                .map(|_| model.zeros_like())
                .collect::<Result<Vec<_>>>()?;
            (grads, None)
        } else {
            // One async thread: it only moves messages (kernels run on the compute pool), and a
            // second one competed with the compute threads for the cores: 5% fewer tokens/s on two
            // cores (BENCHMARKS.md).
            let tokio = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("semoe-async")
                .enable_all()
                .build()
                .map_err(|e| Error::runtime(format!("cannot start the async runtime: {e}")))?;
            let builder = Runtime::builder(config.clone())
                .workers(config.train.workers)
                .placement(config.train.placement.parse::<ExpertPlacement>()?)
                .deadline(Duration::from_secs_f64(config.train.deadline_s))
                .text(corpus.train.clone())
                .storage(config.storage.to_config(Some(run_dir.join("tiers")))?)
                .state(model.clone(), optimizer.clone());
            let runtime = tokio.block_on(builder.build())?;
            let engine = RuntimeEngine {
                tokio,
                runtime,
                stale: false,
            };
            (Vec::new(), Some(engine))
        };
        Ok(Trainer {
            config,
            corpus,
            model,
            optimizer,
            cpu,
            run_dir: run_dir.to_path_buf(),
            group_grads,
            engine,
            prior_seconds,
        })
    }

    /// Serve the runtime's metrics as Prometheus text on `addr` (`HOST:PORT`).
    pub fn serve_metrics(&self, addr: &str) -> Result<()> {
        match &self.engine {
            Some(engine) => {
                let _guard = engine.tokio.enter();
                crate::telemetry::metrics::serve_prometheus(addr)
            }
            None => Err(Error::config(
                "--metrics-addr needs the actor runtime (train.workers of 1 or more)",
            )),
        }
    }

    /// Bring `model` and `optimizer` up to the runtime's committed state (a no-op for the plain loop).
    pub fn sync(&mut self) -> Result<()> {
        if let Some(engine) = &mut self.engine {
            if engine.stale {
                let (model, optimizer) = engine.tokio.block_on(engine.runtime.state())?;
                self.model = model;
                self.optimizer = optimizer;
                engine.stale = false;
            }
        }
        Ok(())
    }

    /// The model being trained, as of the last committed step.
    pub fn model(&mut self) -> Result<&Gpt<f32>> {
        self.sync()?;
        Ok(&self.model)
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Steps done.
    pub fn steps_done(&self) -> u64 {
        self.optimizer.step
    }

    /// The corpus.
    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    /// One optimizer step.
    pub fn step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let (outputs, lr, grad_norm) = match &mut self.engine {
            Some(engine) => {
                let outcome = engine.tokio.block_on(engine.runtime.step())?;
                engine.stale = true;
                self.optimizer.step = outcome.step;
                (outcome.outputs, outcome.lr, outcome.grad_norm)
            }
            None => self.direct_step()?,
        };
        let c = &self.config;
        let t = c.model.block_size;
        let groups = c.train.groups;
        let ce_loss = outputs.iter().map(|o| o.ce_sum).sum::<f64>() / (c.train.batch * t) as f64;
        let moe_blocks = outputs[0].router_loss.len();
        let aux_loss = (0..moe_blocks)
            .map(|l| outputs.iter().map(|o| o.router_loss[l]).sum::<f64>())
            .sum::<f64>()
            / groups as f64;
        let expert_tokens = (0..moe_blocks)
            .map(|l| {
                let e = c.model.experts;
                (0..e)
                    .map(|i| outputs.iter().map(|o| o.moe_stats[l].expert_tokens[i]).sum())
                    .collect()
            })
            .collect();
        let dropped = (0..moe_blocks)
            .map(|l| outputs.iter().map(|o| o.moe_stats[l].dropped).sum())
            .collect();
        Ok(StepReport {
            step: self.optimizer.step,
            ce_loss,
            aux_loss,
            lr,
            grad_norm,
            expert_tokens,
            dropped,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One step of the plain loop: groups side by side on the compute pool, gradients summed in
    /// group order, AdamW. Returns the group outputs, the learning rate and the gradient norm.
    fn direct_step(&mut self) -> Result<(Vec<GroupOutput>, f64, f64)> {
        let c = &self.config;
        let (t, groups) = (c.model.block_size, c.train.groups);
        let seqs = c.train.batch / groups;
        let step = self.optimizer.step;
        let seed = c.train.seed;
        let text = &self.corpus.train;
        let ce_scale = 1.0 / (c.train.batch * t) as f32;
        let router_scale = 1.0 / groups as f32;
        let model = &self.model;

        // Groups side by side, each into its own gradient buffers.
        let tasks: Vec<(usize, &mut Gpt<f32>)> = self.group_grads.iter_mut().enumerate().collect();
        let outputs = std::sync::Mutex::new(vec![None; groups]);
        self.cpu.par_for_each(tasks, |backend, (g, grads)| {
            grads.buffers_mut().into_iter().for_each(|b| b.fill(0.0));
            let starts = sampler::window_starts(seed, step, g as u64, seqs, text.len(), t);
            let (idx, targets) = sampler::windows(text, &starts, t);
            let out = model.forward_backward(backend, &idx, &targets, seqs, ce_scale, router_scale, grads)?;
            if let Ok(mut o) = outputs.lock() {
                o[g] = Some(out);
            }
            Ok(())
        })?;
        let outputs: Vec<_> = outputs
            .into_inner()
            .map_err(|_| compute_failure("a group task panicked"))?
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| compute_failure("a group produced no output"))?;

        // Sum the group gradients in group order into group 0's buffers.
        let (first, rest) = self.group_grads.split_at_mut(1);
        let mut total = first[0].buffers_mut();
        for other in rest.iter_mut() {
            for (acc, g) in total.iter_mut().zip(other.buffers_mut()) {
                acc.iter_mut().zip(g.iter()).for_each(|(a, &v)| *a += v);
            }
        }
        let lr = c.optimizer.lr_at(step, c.train.steps);
        let grad_norm = model_grad_norm(&self.model, &total);
        let mut params = self.model.buffers_mut();
        let optimizer = &mut self.optimizer;
        self.cpu
            .install(|| optimizer.apply(&mut params, &mut total, lr, grad_norm))?;

        Ok((outputs, lr, grad_norm))
    }

    /// Each worker's expert-store figures (empty for the plain loop).
    pub fn tier_stats(&self) -> Vec<crate::storage::tiers::TierStats> {
        self.engine.as_ref().map(|e| e.runtime.tier_stats()).unwrap_or_default()
    }

    /// Each worker's dense-parameter figures (empty for the plain loop).
    pub fn dense_stats(&self) -> Vec<crate::actors::gather::DenseStats> {
        self.engine
            .as_ref()
            .map(|e| e.runtime.dense_stats())
            .unwrap_or_default()
    }

    /// Mean cross-entropy (nats per byte) over the evaluation windows of the validation text.
    pub fn evaluate(&mut self) -> Result<f64> {
        self.sync()?;
        let c = &self.config;
        let t = c.model.block_size;
        let starts = sampler::eval_starts(self.corpus.val.len(), t, c.train.eval_windows);
        let seqs = (c.train.batch / c.train.groups).max(1);
        let chunks: Vec<&[usize]> = starts.chunks(seqs).collect();
        let sums = std::sync::Mutex::new(vec![0.0f64; chunks.len()]);
        let model = &self.model;
        let val = &self.corpus.val;
        self.cpu
            .par_for_each(chunks.iter().copied().enumerate().collect(), |backend, (i, chunk)| {
                let (idx, targets) = sampler::windows(val, chunk, t);
                let out = model.evaluate(backend, &idx, &targets, chunk.len())?;
                if let Ok(mut s) = sums.lock() {
                    s[i] = out.ce_sum;
                }
                Ok(())
            })?;
        let total: f64 = sums
            .into_inner()
            .map_err(|_| compute_failure("an evaluation task panicked"))?
            .iter()
            .sum();
        Ok(total / (starts.len() * t) as f64)
    }

    /// Write a checkpoint of the current state.
    pub fn save_checkpoint(&mut self, training_seconds: f64) -> Result<PathBuf> {
        self.sync()?;
        let dir = write_checkpoint(
            &self.run_dir,
            &self.config,
            &self.model,
            &self.optimizer,
            training_seconds,
        )?;
        checkpoint::prune(&self.run_dir, self.config.train.keep_checkpoints)?;
        Ok(dir)
    }

    /// Run to `train.steps` (or the time limit), logging to `metrics.jsonl`, evaluating and
    /// checkpointing on the configured cadence; shows a progress bar when `progress` is set.
    pub fn run(&mut self, progress: bool) -> Result<RunSummary> {
        let c = self.config.clone();
        let tokens_per_step = (c.train.batch * c.model.block_size) as f64;
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&metrics_path)
            .map_err(|e| Error::io("cannot open the metrics log", &metrics_path, e))?;
        let started = Instant::now();
        let bar = if progress {
            let bar = indicatif::ProgressBar::new(c.train.steps);
            let style = indicatif::ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
            )
            .map_err(|e| Error::config(format!("progress bar template: {e}")))?;
            bar.set_style(style);
            bar.set_position(self.optimizer.step);
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut train_seconds = 0.0f64;
        let mut steps_run = 0u64;
        let mut smoothed: Option<f64> = None;
        let mut val_loss = f64::NAN;
        let mut last_checkpoint = PathBuf::new();
        let mut checkpointed_step = None;
        let write = |log: &mut std::fs::File, v: serde_json::Value| -> Result<()> {
            writeln!(log, "{v}").map_err(|e| Error::io("cannot append to the metrics log", &metrics_path, e))
        };
        while self.optimizer.step < c.train.steps {
            if c.train.time_limit_s > 0.0 && started.elapsed().as_secs_f64() >= c.train.time_limit_s {
                bar.println(format!(
                    "time limit of {} s reached at step {}",
                    c.train.time_limit_s, self.optimizer.step
                ));
                break;
            }
            let r = self.step()?;
            train_seconds += r.seconds;
            steps_run += 1;
            let loss = r.ce_loss + r.aux_loss;
            smoothed = Some(smoothed.map_or(loss, |s| 0.95 * s + 0.05 * loss));
            let elapsed = self.prior_seconds + started.elapsed().as_secs_f64();
            let tps = tokens_per_step / r.seconds;
            write(
                &mut log,
                json!({"kind": "train", "step": r.step, "tokens": r.step as f64 * tokens_per_step,
                       "elapsed_s": elapsed, "loss": loss, "ce_loss": r.ce_loss, "aux_loss": r.aux_loss,
                       "lr": r.lr, "grad_norm": r.grad_norm, "tokens_per_s": tps,
                       "expert_tokens": r.expert_tokens, "dropped": r.dropped}),
            )?;
            let last = r.step == c.train.steps;
            if (c.train.eval_every > 0 && r.step % c.train.eval_every == 0) || last {
                val_loss = self.evaluate()?;
                crate::telemetry::metrics::record_validation(val_loss);
                write(
                    &mut log,
                    json!({"kind": "val", "step": r.step, "elapsed_s": elapsed, "val_loss": val_loss}),
                )?;
                let tiers = self.tier_stats();
                if !tiers.is_empty() {
                    let mut total = crate::storage::tiers::TierStats::default();
                    tiers.iter().for_each(|t| total.add(t));
                    write(&mut log, json!({"kind": "storage", "step": r.step, "stats": total}))?;
                }
                if c.storage.shard_dense {
                    write(
                        &mut log,
                        json!({"kind": "dense", "step": r.step, "workers": self.dense_stats()}),
                    )?;
                }
                bar.println(format!(
                    "step {:>5}  train loss {:.4}  val loss {:.4}  {:.0} tokens/s",
                    r.step,
                    smoothed.unwrap_or(loss),
                    val_loss,
                    tokens_per_step * steps_run as f64 / train_seconds.max(1e-9)
                ));
            }
            if (c.train.checkpoint_every > 0 && r.step % c.train.checkpoint_every == 0) || last {
                last_checkpoint = self.save_checkpoint(self.prior_seconds + started.elapsed().as_secs_f64())?;
                checkpointed_step = Some(r.step);
                write(
                    &mut log,
                    json!({"kind": "checkpoint", "step": r.step, "path": last_checkpoint}),
                )?;
            }
            bar.set_position(r.step);
            bar.set_message(format!(
                "loss {:.3}  val {:.3}  {:.0} tok/s",
                smoothed.unwrap_or(loss),
                val_loss,
                tps
            ));
        }
        bar.finish_and_clear();
        if checkpointed_step != Some(self.optimizer.step) {
            // Stopped by the time limit (or nothing to do): evaluate and checkpoint where we are.
            val_loss = self.evaluate()?;
            crate::telemetry::metrics::record_validation(val_loss);
            let elapsed = self.prior_seconds + started.elapsed().as_secs_f64();
            write(
                &mut log,
                json!({"kind": "val", "step": self.optimizer.step, "elapsed_s": elapsed, "val_loss": val_loss}),
            )?;
            if c.storage.shard_dense {
                write(
                    &mut log,
                    json!({"kind": "dense", "step": self.optimizer.step, "workers": self.dense_stats()}),
                )?;
            }
            last_checkpoint = self.save_checkpoint(elapsed)?;
        }
        Ok(RunSummary {
            steps: self.optimizer.step,
            val_loss,
            train_loss: smoothed.unwrap_or(f64::NAN),
            tokens_per_s: if train_seconds > 0.0 {
                tokens_per_step * steps_run as f64 / train_seconds
            } else {
                0.0
            },
            elapsed_s: started.elapsed().as_secs_f64(),
            checkpoint: last_checkpoint,
        })
    }
}

/// Write a checkpoint of a training state into `run_dir/checkpoints/` (the model, both Adam moments
/// as `m.<name>`/`v.<name>`, and a manifest with the config and the data position): what
/// [`Trainer::resume`], [`load_model`] and `tools/reference/eval_checkpoint.py` read.
pub fn write_checkpoint(
    run_dir: &Path,
    config: &TrainConfig,
    model: &Gpt<f32>,
    optimizer: &AdamW,
    training_seconds: f64,
) -> Result<PathBuf> {
    let tensors = model.tensors();
    if optimizer.m.len() != tensors.len() {
        return Err(Error::shape(
            "checkpoint",
            "the optimizer state does not match the model",
        ));
    }
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(n, s, b)| NamedTensor::new(n.as_str(), s.clone(), b.as_slice()))
        .collect();
    let names_m: Vec<String> = tensors.iter().map(|(n, _, _)| format!("m.{n}")).collect();
    let names_v: Vec<String> = tensors.iter().map(|(n, _, _)| format!("v.{n}")).collect();
    let mut opt = Vec::new();
    for (i, (_, s, _)) in tensors.iter().enumerate() {
        opt.push(NamedTensor::new(
            names_m[i].as_str(),
            s.clone(),
            optimizer.m[i].as_slice(),
        ));
        opt.push(NamedTensor::new(
            names_v[i].as_str(),
            s.clone(),
            optimizer.v[i].as_slice(),
        ));
    }
    let extra = json!({
        "config": config,
        "data_position": { "sampler": "pure function of (seed, step, group)", "next_step": optimizer.step },
        "rng": { "seed": config.train.seed },
        "optimizer_step": optimizer.step,
        "training_seconds": training_seconds,
    });
    checkpoint::save(run_dir, optimizer.step, &named, &opt, &extra)
}

/// Load a model and optimizer state from a checkpoint directory written by [`Trainer`].
pub fn load_state(config: &TrainConfig, dir: &Path) -> Result<(Gpt<f32>, AdamW, f64)> {
    let mut ckpt = checkpoint::load(dir)?;
    let mut model = Gpt::<f32>::zeros(&config.model)?;
    let specs: Vec<(String, Vec<usize>)> = model.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
    for ((name, shape), buf) in specs.iter().zip(model.buffers_mut()) {
        *buf = ckpt.take_model(name, shape)?;
    }
    if let Some(extra) = ckpt.model.keys().next() {
        return Err(Error::shape(
            format!("checkpoint {}", dir.display()),
            format!("it holds tensor {extra:?}, which this model does not have"),
        ));
    }
    let mut m = Vec::new();
    let mut v = Vec::new();
    for (name, shape) in &specs {
        m.push(ckpt.take_optimizer(&format!("m.{name}"), shape)?);
        v.push(ckpt.take_optimizer(&format!("v.{name}"), shape)?);
    }
    let mut optimizer = new_optimizer(config, &model)?;
    optimizer.restore(ckpt.step, m, v)?;
    let seconds = ckpt
        .extra
        .get("training_seconds")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    Ok((model, optimizer, seconds))
}

/// Load only the model (for generation) from a checkpoint directory, with the config saved in it.
pub fn load_model(dir: &Path) -> Result<Gpt<f32>> {
    let mut ckpt = checkpoint::load(dir)?;
    let config: TrainConfig = serde_json::from_value(ckpt.extra.get("config").cloned().unwrap_or_default())
        .map_err(|e| Error::parse(format!("checkpoint {} manifest config", dir.display()), e.to_string()))?;
    config.model.validate()?;
    let mut model = Gpt::<f32>::zeros(&config.model)?;
    let specs: Vec<(String, Vec<usize>)> = model.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
    for ((name, shape), buf) in specs.iter().zip(model.buffers_mut()) {
        *buf = ckpt.take_model(name, shape)?;
    }
    Ok(model)
}

/// Fresh AdamW state for `model`, with weight decay on its matrices (see [`crate::model::gpt::TensorSpec`]).
pub fn new_optimizer(config: &TrainConfig, model: &Gpt<f32>) -> Result<AdamW> {
    let specs = model.specs();
    let sizes: Vec<usize> = specs.iter().map(|s| s.shape.iter().product()).collect();
    let decay: Vec<bool> = specs.iter().map(|s| s.decay).collect();
    AdamW::with_decay(config.optimizer.clone(), &sizes, &decay)
}

/// The global gradient norm of a model's gradient buffers (in [`Gpt::tensors`] order), with every
/// dense tensor one part and every expert's slice of an expert tensor one part (see
/// [`optimizer::norm_from_parts`]): the same number the actor runtime assembles from its owners.
pub fn model_grad_norm(model: &Gpt<f32>, grads: &[&mut Vec<f32>]) -> f64 {
    let parts = model.specs().into_iter().zip(grads).flat_map(|(spec, g)| {
        let unit = spec.unit_len().max(1);
        g.chunks(unit).map(optimizer::sum_squares).collect::<Vec<_>>()
    });
    optimizer::norm_from_parts(parts)
}

/// A failure inside the compute pool (not the user's input).
fn compute_failure(detail: &str) -> Error {
    Error::Backend {
        backend: "cpu",
        detail: detail.to_string(),
    }
}

/// Keep only the records of steps <= `step` in a metrics log (after a resume).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("cannot read the metrics log", path, e)),
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_none_or(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(|e| Error::io("cannot rewrite the metrics log", path, e))
}
