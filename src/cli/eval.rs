//! `semoe eval`: the loss of a checkpoint on its validation text or on any text.

use clap::Args;
use semoe::kernels::Cpu;
use std::path::PathBuf;

use super::generate::checkpoint_to_read;

/// Options of `semoe eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// A UTF-8 text file or directory to evaluate on, whole (default: the validation split of the
    /// checkpoint's own training data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Windows of the model's context length, evenly spaced over the text (default: as many as
    /// fit without overlap, at most 4,096; with the run's own validation text, its eval_windows).
    #[arg(long)]
    windows: Option<usize>,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

pub fn run(a: &EvalArgs) -> semoe::Result<()> {
    let ckpt = checkpoint_to_read(&a.checkpoint)?;
    let step = ckpt.step;
    let dir = ckpt.dir.clone();
    let config = semoe::train::trainer::checkpoint_config(&ckpt)?;
    let recorded_digest = ckpt
        .extra
        .get("data_sha256")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let model = semoe::train::trainer::model_from(ckpt)?;
    let t = config.model.block_size;
    let (text, source, windows) = match &a.data {
        Some(path) => {
            let text = semoe::train::data::read_text(path)?;
            // A byte the model has no embedding for fails with a clear error, not deep inside it.
            semoe::data::corpus::check_vocab(
                &config,
                [text.as_slice()],
                &format!("--data {}", path.display()),
                Some(path),
            )?;
            let fit = (text.len().saturating_sub(1) / t).clamp(1, 4096);
            (text, path.display().to_string(), a.windows.unwrap_or(fit))
        }
        None => {
            semoe::train::trainer::refuse_a_recorded_pipe(&config)?;
            let corpus = semoe::train::trainer::corpus_for(&config)?;
            // The split of another text may hold bytes the model was trained on: said, not hidden.
            let digest = corpus.digest();
            let changed = match &recorded_digest {
                Some(recorded) if *recorded != digest => {
                    semoe::say!(
                        "notice: the training text ({}) is not the text checkpoint {} was trained on (SHA-256 \
                         {recorded}, now {digest}): its validation split may hold bytes the model was trained on",
                        corpus.source,
                        dir.display()
                    );
                    " (a changed text)"
                }
                _ => "",
            };
            (
                corpus.val,
                format!("the validation split of {}{changed}", corpus.source),
                a.windows.unwrap_or(config.train.eval_windows),
            )
        }
    };
    if windows == 0 || windows > semoe::config::MAX_EVAL_WINDOWS {
        return Err(semoe::Error::config(format!(
            "--windows must be between 1 and {}, got {windows}",
            semoe::config::MAX_EVAL_WINDOWS
        )));
    }
    let cpu = Cpu::new(a.threads)?;
    let seqs = (config.train.batch / config.train.groups).max(1);
    let loss = semoe::train::trainer::text_loss(&model, &cpu, &text, windows, seqs)?;
    // The result is the command's only output: a failure to write it is the command's failure.
    semoe::console::write_stdout(
        &format!(
            "{loss:.4} nats/byte ({:.4} bits/byte) on {source} ({} bytes, {windows} windows of {t}); checkpoint {} \
             (step {step})\n",
            loss / std::f64::consts::LN_2,
            text.len(),
            dir.display()
        ),
        "the evaluation's result",
    )
}
