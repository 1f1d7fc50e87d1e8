//! The run report: plots and a Markdown summary of a training run, built from its metrics log.
//!
//! [`write_report`] reads `<run_dir>/metrics.jsonl` ([`METRICS_FILE`]) and writes four files next to it:
//!
//! - `loss.svg` ([`LOSS_SVG`]): the training loss per logged step (thin line), its debiased exponential moving
//!   average ([`ema_smoothing`], bold line) and the validation loss (markers) against the step, in nats/byte.
//! - `throughput.svg` ([`THROUGHPUT_SVG`]): training throughput (tokens/s) against the step, with the run's
//!   median as a dashed line.
//! - `experts.svg` ([`EXPERTS_SVG`]): the expert load heatmap, one panel per MoE layer stacked vertically.
//!   x: the step, in at most [`MAX_BUCKETS`] buckets of consecutive records; y: the expert index; colour: the
//!   fraction of the layer's kept assignments in that bucket that went to that expert, on a viridis scale from 0
//!   to the largest share seen (at least 2/E, so that a uniform load sits mid-scale). The colour bar on the right
//!   is shared by all panels and marks the uniform share 1/E; buckets where a layer routed nothing are grey.
//!   Dense models get a placeholder saying there are no MoE layers.
//! - `report.md` ([`REPORT_MD`]): the numbers of [`ReportSummary`] as Markdown (final smoothed train loss, best
//!   and final validation loss with their steps, total tokens, wall time, median throughput, and per MoE layer
//!   the final load share per expert and the drop rates), with links to the three plots.
//!
//! # The metrics log
//!
//! One JSON object per line, as the trainer writes it; the schema is [`crate::train::log`]. Six kinds are read:
//!
//! - `{"kind":"train","step":120,"tokens":245760,"elapsed_s":31.2,"loss":2.13,"ce_loss":2.11,"aux_loss":0.021,
//!   "lr":0.003,"tokens_per_s":7900.0,"expert_tokens":[[..],[..]],"dropped":[12,3]}`: `tokens` is the
//!   cumulative number of training tokens (an integral float such as `245760.0` is accepted, as for `step`);
//!   `expert_tokens[l][e]` the assignments of MoE layer `l` kept by expert `e` in that step, and `dropped[l]` the
//!   assignments of layer `l` dropped for lack of capacity (both empty for dense models). `ce_loss`, `aux_loss`,
//!   `lr`, `expert_tokens` and `dropped` may be absent; other fields (`grad_norm`, ...) are ignored.
//! - `{"kind":"val","step":200,"elapsed_s":55.0,"val_loss":1.95}` (`elapsed_s` may be absent).
//! - `storage` and `dense`: the last of each gives the report's storage and dense-sharding sections.
//! - `membership` (every one: the epochs of a multi-process run) and `traffic` (the last: bytes between
//!   workers by kind).
//!
//! Records of other kinds (`checkpoint`, `config`, ...) are counted and ignored; blank lines are skipped; lines
//! that are not JSON objects with a `kind`, or records of a known kind that do not fit its schema, are counted as
//! malformed and skipped (a run killed mid-write leaves a partial last line). A loss or throughput of `null`
//! (how `serde_json` writes NaN and infinities) is read as NaN and left out of plots and statistics.
//!
//! A resumed run appends to the same log and repeats steps from its checkpoint on: a training record whose step
//! is not after the previous one supersedes the training and validation records at or after its step (and a
//! validation record likewise supersedes earlier validation records at or after its step), so that the report
//! shows the run that was kept.
//!
//! # Definitions
//!
//! - *Load share*: expert `e`'s kept assignments over all kept assignments of its layer (uniform load is 1/E).
//!   The final load share of a layer is taken over the last heatmap bucket.
//! - *Drop rate*: dropped assignments over all assignments (kept + dropped) of the layer.
//! - *Wall time*: the largest `elapsed_s` among the records kept, as the trainer's clock reports it.
//!
//! # Layout
//!
//! `read.rs` parses the log into [`Metrics`], `summary.rs` computes the numbers ([`summarize`]), `plots.rs` draws
//! the SVGs and `markdown.rs` writes `report.md`; [`write_report`] runs them in turn.

use std::path::{Path, PathBuf};

use crate::error::Result;

mod markdown;
mod plots;
mod read;
mod summary;

pub use crate::train::log::{DenseRecord, StorageRecord, TrainRecord, ValRecord, METRICS_FILE};
pub use read::{read_metrics, Metrics};
pub use summary::{ema, ema_smoothing, median_of, summarize, LayerLoad, ReportSummary, MAX_BUCKETS};

/// The loss plot written by [`write_report`].
pub const LOSS_SVG: &str = "loss.svg";
/// The throughput plot written by [`write_report`].
pub const THROUGHPUT_SVG: &str = "throughput.svg";
/// The expert load heatmap written by [`write_report`].
pub const EXPERTS_SVG: &str = "experts.svg";
/// The Markdown summary written by [`write_report`].
pub const REPORT_MD: &str = "report.md";

/// Reads `<run_dir>/metrics.jsonl` and writes `loss.svg`, `throughput.svg`, `experts.svg` and `report.md` into
/// `run_dir` (see the [module documentation](self)).
pub fn write_report(run_dir: &Path) -> Result<ReportSummary> {
    let metrics = read_metrics(run_dir.join(METRICS_FILE))?;
    let summary = summarize(&metrics)?;
    let name = run_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| run_dir.display().to_string());

    let path = run_dir.join(LOSS_SVG);
    write_file(
        &path,
        &plots::render(&path, (1000, 600), |root| plots::draw_loss(root, &metrics, &name))?,
    )?;
    let path = run_dir.join(THROUGHPUT_SVG);
    write_file(
        &path,
        &plots::render(&path, (1000, 420), |root| {
            plots::draw_throughput(root, &metrics, &summary, &name)
        })?,
    )?;
    let path = run_dir.join(EXPERTS_SVG);
    let size = plots::experts_size(&summary);
    write_file(
        &path,
        &plots::render(&path, size, |root| plots::draw_experts(root, &metrics, &name))?,
    )?;
    let path = run_dir.join(REPORT_MD);
    write_file(&path, &markdown::markdown(&summary, &metrics, &name))?;
    Ok(summary)
}

/// Replace a report file whole (a full disk leaves the previous report, never a torn one).
fn write_file(path: &Path, contents: &str) -> Result<()> {
    crate::storage::checkpoint::write_file_durably(path, contents.as_bytes())
}

/// The paths [`write_report`] writes for `run_dir`: loss plot, throughput plot, expert heatmap, Markdown.
pub fn report_files(run_dir: &Path) -> [PathBuf; 4] {
    [LOSS_SVG, THROUGHPUT_SVG, EXPERTS_SVG, REPORT_MD].map(|f| run_dir.join(f))
}
