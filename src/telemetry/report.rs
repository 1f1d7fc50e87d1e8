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
//! One JSON object per line, as the trainer writes it. Two kinds are read:
//!
//! - `{"kind":"train","step":120,"tokens":245760,"elapsed_s":31.2,"loss":2.13,"ce_loss":2.11,"aux_loss":0.021,
//!   "lr":0.003,"tokens_per_s":7900.0,"expert_tokens":[[..],[..]],"dropped":[12,3]}`: `tokens` is the
//!   cumulative number of training tokens (an integral float such as `245760.0` is accepted, as for `step`);
//!   `expert_tokens[l][e]` the assignments of MoE layer `l` kept by expert `e` in that step, and `dropped[l]` the
//!   assignments of layer `l` dropped for lack of capacity (both empty for dense models). `ce_loss`, `aux_loss`,
//!   `lr`, `expert_tokens` and `dropped` may be absent; other fields (`grad_norm`, ...) are ignored.
//! - `{"kind":"val","step":200,"elapsed_s":55.0,"val_loss":1.95}` (`elapsed_s` may be absent).
//!
//! Records of other kinds (`checkpoint`, `config`, ...) are counted and ignored; blank lines are skipped; lines
//! that are not JSON objects with a `kind`, or `train`/`val` records missing a required field, are counted as
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

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// The metrics log the trainer writes in the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The loss plot written by [`write_report`].
pub const LOSS_SVG: &str = "loss.svg";
/// The throughput plot written by [`write_report`].
pub const THROUGHPUT_SVG: &str = "throughput.svg";
/// The expert load heatmap written by [`write_report`].
pub const EXPERTS_SVG: &str = "experts.svg";
/// The Markdown summary written by [`write_report`].
pub const REPORT_MD: &str = "report.md";
/// The weight of the previous value in the exponential moving average of the training loss, for a log of
/// `records` training records: the average lags by `w / (1 - w)` records, about 1% of the run (so that the
/// smoothed curve looks alike for short and long runs), with `w` between 0.6 and 0.98.
pub fn ema_smoothing(records: usize) -> f64 {
    let lag = records as f64 / 100.0;
    (lag / (1.0 + lag)).clamp(0.6, 0.98)
}
/// The largest number of step buckets in the expert heatmap.
pub const MAX_BUCKETS: usize = 60;

/// One training record of the metrics log.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct TrainRecord {
    /// The optimizer step.
    #[serde(deserialize_with = "count")]
    pub step: u64,
    /// Training tokens seen so far (cumulative; the log may write it as a float).
    #[serde(deserialize_with = "count")]
    pub tokens: u64,
    /// Seconds since the start of the run.
    pub elapsed_s: f64,
    /// The training loss (nats/byte), NaN when the log holds `null`.
    #[serde(deserialize_with = "nullable_f64")]
    pub loss: f64,
    /// The cross-entropy part of the loss.
    #[serde(default, deserialize_with = "optional_f64")]
    pub ce_loss: Option<f64>,
    /// The auxiliary (load balancing) part of the loss.
    #[serde(default, deserialize_with = "optional_f64")]
    pub aux_loss: Option<f64>,
    /// The learning rate.
    #[serde(default, deserialize_with = "optional_f64")]
    pub lr: Option<f64>,
    /// Training throughput, NaN when the log holds `null`.
    #[serde(deserialize_with = "nullable_f64")]
    pub tokens_per_s: f64,
    /// Kept assignments per MoE layer (outer) per expert (inner) in this step.
    #[serde(default)]
    pub expert_tokens: Vec<Vec<u64>>,
    /// Dropped assignments per MoE layer in this step.
    #[serde(default)]
    pub dropped: Vec<u64>,
}

/// One validation record of the metrics log.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ValRecord {
    /// The optimizer step the model was evaluated at.
    #[serde(deserialize_with = "count")]
    pub step: u64,
    /// Seconds since the start of the run, if logged.
    #[serde(default, deserialize_with = "optional_f64")]
    pub elapsed_s: Option<f64>,
    /// The validation loss (nats/byte), NaN when the log holds `null`.
    #[serde(deserialize_with = "nullable_f64")]
    pub val_loss: f64,
}

/// The expert tiers' figures at one step (a `storage` record).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StorageRecord {
    /// The step.
    pub step: u64,
    /// The figures, summed over workers.
    pub stats: crate::storage::tiers::TierStats,
}

/// Sharded dense parameters' figures at one step (a `dense` record), one entry per worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseRecord {
    /// The step.
    pub step: u64,
    /// Each worker's figures.
    pub workers: Vec<crate::actors::gather::DenseStats>,
}

/// The parsed metrics log.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Training records in step order (superseded records of a resumed run removed).
    pub train: Vec<TrainRecord>,
    /// Validation records in step order (superseded records of a resumed run removed).
    pub val: Vec<ValRecord>,
    /// Line numbers (1-based) of the lines that could not be parsed.
    pub malformed_lines: Vec<usize>,
    /// Records of kinds other than `train`, `val`, `storage` and `dense`.
    pub other_records: usize,
    /// The last `storage` record (the expert tiers' figures, summed over workers), if any.
    pub storage: Option<StorageRecord>,
    /// The last `dense` record (sharded dense parameters, per worker), if any.
    pub dense: Option<DenseRecord>,
    /// Records dropped because a resumed run logged their steps again.
    pub superseded_records: usize,
}

/// The load of one MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerLoad {
    /// The number of experts (the longest `expert_tokens` list logged for the layer).
    pub experts: usize,
    /// Load share per expert over the last heatmap bucket (zeros if nothing was routed there).
    pub final_share: Vec<f64>,
    /// The first and last step of the last heatmap bucket.
    pub final_steps: (u64, u64),
    /// The drop rate over the last heatmap bucket.
    pub final_drop_rate: f64,
    /// Kept assignments over the whole run.
    pub kept: u64,
    /// Dropped assignments over the whole run.
    pub dropped: u64,
    /// The drop rate over the whole run (0 when nothing was routed).
    pub drop_rate: f64,
}

/// The numbers of a run report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportSummary {
    /// Training records read.
    pub train_records: usize,
    /// Validation records read.
    pub val_records: usize,
    /// The first training step logged.
    pub first_step: u64,
    /// The last training step logged.
    pub final_step: u64,
    /// The weight of the previous value in the moving average of the training loss ([`ema_smoothing`]).
    pub ema_smoothing: f64,
    /// The smoothed training loss at the last step (NaN if no loss was finite).
    pub final_train_loss: f64,
    /// The raw training loss of the last record.
    pub final_train_loss_raw: f64,
    /// The mean training loss of the last [`crate::train::trainer::MEAN_LOSS_STEPS`] records (the
    /// number `semoe train` prints at the end; NaN if there are none).
    pub mean_train_loss: f64,
    /// How many records that mean is over.
    pub mean_train_loss_steps: usize,
    /// The lowest validation loss.
    pub best_val_loss: Option<f64>,
    /// The step of the lowest validation loss (the first one on ties).
    pub best_val_step: Option<u64>,
    /// The validation loss of the last validation record.
    pub final_val_loss: Option<f64>,
    /// The step of the last validation record.
    pub final_val_step: Option<u64>,
    /// Training tokens seen (the last training record's cumulative count).
    pub total_tokens: u64,
    /// Wall time in seconds (the largest `elapsed_s` logged).
    pub elapsed_s: f64,
    /// Median training throughput over the training records (NaN if none was finite).
    pub median_tokens_per_s: f64,
    /// The load of each MoE layer (empty for dense models).
    pub layers: Vec<LayerLoad>,
    /// Lines of the log that could not be parsed.
    pub malformed_lines: usize,
    /// Records of other kinds that were ignored.
    pub other_records: usize,
}

/// Reads a non-negative integer, also written as an integral float (`2048.0`).
fn count<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    let v = serde_json::Number::deserialize(d)?;
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    match v.as_f64() {
        Some(x) if x >= 0.0 && x.fract() == 0.0 && x < u64::MAX as f64 => Ok(x as u64),
        _ => Err(serde::de::Error::custom(format!(
            "expected a non-negative integer, found {v}"
        ))),
    }
}

/// Reads `null` as NaN.
fn nullable_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Reads an optional float (`null` or absent: `None`).
fn optional_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)
}

impl Metrics {
    fn push_train(&mut self, rec: TrainRecord) {
        if self.train.last().is_some_and(|last| rec.step <= last.step) {
            self.supersede_train(rec.step);
            self.supersede_val(rec.step);
        }
        self.train.push(rec);
    }

    fn push_val(&mut self, rec: ValRecord) {
        if self.val.last().is_some_and(|last| rec.step <= last.step) {
            self.supersede_val(rec.step);
        }
        self.val.push(rec);
    }

    fn supersede_train(&mut self, step: u64) {
        let keep = self.train.partition_point(|r| r.step < step);
        self.superseded_records += self.train.len() - keep;
        self.train.truncate(keep);
    }

    fn supersede_val(&mut self, step: u64) {
        let keep = self.val.partition_point(|r| r.step < step);
        self.superseded_records += self.val.len() - keep;
        self.val.truncate(keep);
    }
}

/// One parsed, non-blank line of the log.
enum Line {
    Train(TrainRecord),
    Val(ValRecord),
    Storage(StorageRecord),
    Dense(DenseRecord),
    Other,
}

/// Parses one line; `None` if it is malformed.
fn parse_line(bytes: &[u8]) -> Option<Line> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let kind = value.as_object()?.get("kind")?.as_str()?;
    match kind {
        "train" => serde_json::from_value(value).ok().map(Line::Train),
        "val" => serde_json::from_value(value).ok().map(Line::Val),
        "storage" => serde_json::from_value(value).ok().map(Line::Storage),
        "dense" => serde_json::from_value(value).ok().map(Line::Dense),
        _ => Some(Line::Other),
    }
}

/// Reads a metrics log (see the [module documentation](self) for the format).
///
/// Malformed lines and records of other kinds are counted and skipped. Fails if the file cannot be read or
/// holds no training record.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Metrics> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening the metrics log", path, e))?;
    let mut reader = BufReader::new(file);
    let mut metrics = Metrics::default();
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io("reading the metrics log", path, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(&buf) {
            Some(Line::Train(rec)) => metrics.push_train(rec),
            Some(Line::Val(rec)) => metrics.push_val(rec),
            Some(Line::Storage(rec)) => metrics.storage = Some(rec),
            Some(Line::Dense(rec)) => metrics.dense = Some(rec),
            Some(Line::Other) => metrics.other_records += 1,
            None => metrics.malformed_lines.push(line_no),
        }
    }
    if metrics.train.is_empty() {
        let mut detail = format!(
            "no training records (`\"kind\":\"train\"`) in {} ({line_no} lines",
            path.display()
        );
        if !metrics.malformed_lines.is_empty() {
            let _ = write!(detail, ", {} malformed", metrics.malformed_lines.len());
        }
        detail.push(')');
        return Err(Error::parse("metrics log", detail));
    }
    Ok(metrics)
}

/// The debiased exponential moving average of `values` (non-finite values are skipped: the average carries
/// over; NaN until the first finite value).
pub fn ema(values: &[f64], smoothing: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut weight = 0.0;
    values
        .iter()
        .map(|&v| {
            if v.is_finite() {
                acc = smoothing * acc + (1.0 - smoothing) * v;
                weight = smoothing * weight + (1.0 - smoothing);
            }
            if weight > 0.0 {
                acc / weight
            } else {
                f64::NAN
            }
        })
        .collect()
}

/// The median of the finite values (NaN if none).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    median_of(values.filter(|x| x.is_finite()).collect())
}

/// Median of a list of seconds.
pub fn median_of(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Contiguous chunks of training records for the heatmap: `(start, end)` index ranges, at most [`MAX_BUCKETS`].
fn buckets(n: usize) -> Vec<(usize, usize)> {
    let b = n.min(MAX_BUCKETS);
    (0..b).map(|i| (i * n / b, (i + 1) * n / b)).collect()
}

/// Per-layer expert counts summed over the records of each bucket: `[layer][bucket] -> (counts, dropped)`.
struct LoadGrid {
    experts: Vec<usize>,
    cells: Vec<Vec<(Vec<u64>, u64)>>,
}

fn load_grid(train: &[TrainRecord], buckets: &[(usize, usize)]) -> LoadGrid {
    let layers = train
        .iter()
        .map(|r| r.expert_tokens.len().max(r.dropped.len()))
        .max()
        .unwrap_or(0);
    let experts: Vec<usize> = (0..layers)
        .map(|l| {
            train
                .iter()
                .map(|r| r.expert_tokens.get(l).map_or(0, Vec::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let cells = (0..layers)
        .map(|l| {
            buckets
                .iter()
                .map(|&(a, b)| {
                    let mut counts = vec![0u64; experts[l]];
                    let mut dropped = 0u64;
                    for r in &train[a..b] {
                        if let Some(row) = r.expert_tokens.get(l) {
                            for (c, &x) in counts.iter_mut().zip(row) {
                                *c += x;
                            }
                        }
                        dropped += r.dropped.get(l).copied().unwrap_or(0);
                    }
                    (counts, dropped)
                })
                .collect()
        })
        .collect();
    LoadGrid { experts, cells }
}

fn rate(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 / total as f64
    }
}

/// Computes the report's numbers from a parsed log.
///
/// Fails if the log holds no training record.
pub fn summarize(metrics: &Metrics) -> Result<ReportSummary> {
    let train = &metrics.train;
    let (first, last) = match (train.first(), train.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Err(Error::parse("metrics log", "no training records")),
    };
    let losses: Vec<f64> = train.iter().map(|r| r.loss).collect();
    let smoothing = ema_smoothing(losses.len());
    let smoothed = ema(&losses, smoothing);
    let best = metrics
        .val
        .iter()
        .filter(|v| v.val_loss.is_finite())
        .fold(None::<&ValRecord>, |best, v| match best {
            Some(b) if b.val_loss <= v.val_loss => Some(b),
            _ => Some(v),
        });
    let final_val = metrics.val.last();
    let elapsed_s = train
        .iter()
        .map(|r| r.elapsed_s)
        .chain(metrics.val.iter().filter_map(|v| v.elapsed_s))
        .filter(|x| x.is_finite())
        .fold(0.0, f64::max);

    let bks = buckets(train.len());
    let grid = load_grid(train, &bks);
    let layers = grid
        .cells
        .iter()
        .zip(&grid.experts)
        .map(|(cells, &experts)| {
            let kept: u64 = cells.iter().map(|(c, _)| c.iter().sum::<u64>()).sum();
            let dropped: u64 = cells.iter().map(|(_, d)| d).sum();
            let (final_counts, final_dropped) = cells.last().cloned().unwrap_or_default();
            let final_kept: u64 = final_counts.iter().sum();
            let (a, b) = bks.last().copied().unwrap_or((0, 1));
            LayerLoad {
                experts,
                final_share: final_counts.iter().map(|&c| rate(c, final_kept)).collect(),
                final_steps: (train[a].step, train[b - 1].step),
                final_drop_rate: rate(final_dropped, final_kept + final_dropped),
                kept,
                dropped,
                drop_rate: rate(dropped, kept + dropped),
            }
        })
        .collect();

    Ok(ReportSummary {
        train_records: train.len(),
        val_records: metrics.val.len(),
        first_step: first.step,
        final_step: last.step,
        ema_smoothing: smoothing,
        final_train_loss: smoothed.last().copied().unwrap_or(f64::NAN),
        final_train_loss_raw: last.loss,
        mean_train_loss: {
            let tail = &train[train.len().saturating_sub(crate::train::trainer::MEAN_LOSS_STEPS)..];
            tail.iter().map(|r| r.loss).sum::<f64>() / tail.len().max(1) as f64
        },
        mean_train_loss_steps: train.len().min(crate::train::trainer::MEAN_LOSS_STEPS),
        best_val_loss: best.map(|v| v.val_loss),
        best_val_step: best.map(|v| v.step),
        final_val_loss: final_val.map(|v| v.val_loss),
        final_val_step: final_val.map(|v| v.step),
        total_tokens: last.tokens,
        elapsed_s,
        median_tokens_per_s: median(train.iter().map(|r| r.tokens_per_s)),
        layers,
        malformed_lines: metrics.malformed_lines.len(),
        other_records: metrics.other_records,
    })
}

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
        &render(&path, (1000, 600), |root| draw_loss(root, &metrics, &name))?,
    )?;
    let path = run_dir.join(THROUGHPUT_SVG);
    write_file(
        &path,
        &render(&path, (1000, 420), |root| {
            draw_throughput(root, &metrics, &summary, &name)
        })?,
    )?;
    let path = run_dir.join(EXPERTS_SVG);
    let size = experts_size(&summary);
    write_file(&path, &render(&path, size, |root| draw_experts(root, &metrics, &name))?)?;
    let path = run_dir.join(REPORT_MD);
    write_file(&path, &markdown(&summary, &metrics, &name))?;
    Ok(summary)
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::io("writing the run report", path, e))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Renders an SVG into a string; drawing errors are reported against `path`.
fn render(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<String> {
    let fail =
        |e: Box<dyn std::error::Error>| Error::io("drawing the plot", path, std::io::Error::other(e.to_string()));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.into()))?;
        draw(&root).map_err(fail)?;
        root.present().map_err(|e| fail(e.into()))?;
    }
    Ok(svg)
}

/// Step axis labels: integers (the axis is continuous so that steps can be placed freely).
fn step_label(v: &f64) -> String {
    format!("{v:.0}")
}

/// A range covering the finite values, padded by 5% (and widened if empty or a single value).
fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.05 * lo.abs().max(1.0)
    };
    (lo - pad)..(hi + pad)
}

/// The step axis: from the first to the last training step (widened by one for a single step).
fn step_range(metrics: &Metrics) -> std::ops::Range<f64> {
    let first = metrics.train.first().map_or(0.0, |r| r.step as f64);
    let last = metrics
        .train
        .last()
        .map_or(1.0, |r| r.step as f64)
        .max(metrics.val.last().map_or(0.0, |v| v.step as f64));
    if last > first {
        first..last
    } else {
        first..first + 1.0
    }
}

/// Splits a series into runs of finite points (so that NaN breaks the line instead of being drawn).
fn finite_runs(points: impl Iterator<Item = (f64, f64)>) -> Vec<Vec<(f64, f64)>> {
    let mut runs = vec![Vec::new()];
    for (x, y) in points {
        if y.is_finite() {
            if let Some(run) = runs.last_mut() {
                run.push((x, y));
            }
        } else if runs.last().is_some_and(|r| !r.is_empty()) {
            runs.push(Vec::new());
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VAL_COLOR: RGBColor = RGBColor(214, 39, 40);
const MEDIAN_COLOR: RGBColor = RGBColor(255, 127, 14);

fn draw_loss(root: &Area<'_>, metrics: &Metrics, name: &str) -> DrawResult {
    let losses: Vec<f64> = metrics.train.iter().map(|r| r.loss).collect();
    let smoothing = ema_smoothing(losses.len());
    let smoothed = ema(&losses, smoothing);
    let y = padded_range(losses.iter().copied().chain(metrics.val.iter().map(|v| v.val_loss)));
    let mut chart = ChartBuilder::on(root)
        .caption(format!("Loss: {name}"), ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(step_range(metrics), y)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&step_label)
        .y_desc("loss (nats/byte)")
        .light_line_style(BLACK.mix(0.05))
        .draw()?;

    let steps = metrics.train.iter().map(|r| r.step as f64);
    for (i, run) in finite_runs(steps.clone().zip(losses.iter().copied()))
        .into_iter()
        .enumerate()
    {
        let series = chart.draw_series(LineSeries::new(run, TRAIN_COLOR.mix(0.35).stroke_width(1)))?;
        if i == 0 {
            series
                .label("train loss")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TRAIN_COLOR.mix(0.35).stroke_width(1)));
        }
    }
    for (i, run) in finite_runs(steps.zip(smoothed)).into_iter().enumerate() {
        let series = chart.draw_series(LineSeries::new(run, TRAIN_COLOR.stroke_width(2)))?;
        if i == 0 {
            series
                .label(format!("train loss (EMA {smoothing:.2})"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TRAIN_COLOR.stroke_width(2)));
        }
    }
    let val: Vec<(f64, f64)> = metrics
        .val
        .iter()
        .filter(|v| v.val_loss.is_finite())
        .map(|v| (v.step as f64, v.val_loss))
        .collect();
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val.iter().copied(), VAL_COLOR.mix(0.5).stroke_width(1)))?
            .label("validation loss")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, VAL_COLOR.filled()));
        chart.draw_series(val.iter().map(|&p| Circle::new(p, 4, VAL_COLOR.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

fn draw_throughput(root: &Area<'_>, metrics: &Metrics, summary: &ReportSummary, name: &str) -> DrawResult {
    let tps: Vec<f64> = metrics.train.iter().map(|r| r.tokens_per_s).collect();
    let hi = padded_range(tps.iter().copied()).end.max(1.0);
    let mut chart = ChartBuilder::on(root)
        .caption(format!("Throughput: {name}"), ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(step_range(metrics), 0.0..hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&step_label)
        .y_desc("tokens/s")
        .y_label_formatter(&|v| format_count(v.round() as u64))
        .light_line_style(BLACK.mix(0.05))
        .draw()?;
    let steps = metrics.train.iter().map(|r| r.step as f64);
    for (i, run) in finite_runs(steps.zip(tps.iter().copied())).into_iter().enumerate() {
        let series = chart.draw_series(LineSeries::new(run, TRAIN_COLOR.stroke_width(1)))?;
        if i == 0 {
            series
                .label("tokens/s")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TRAIN_COLOR.stroke_width(1)));
        }
    }
    let m = summary.median_tokens_per_s;
    if m.is_finite() {
        let x = step_range(metrics);
        // A dashed line: short segments along the median.
        let n = 80;
        let w = (x.end - x.start) / n as f64;
        let dashes = (0..n).map(|i| {
            let a = x.start + i as f64 * w;
            PathElement::new([(a, m), (a + 0.6 * w, m)], MEDIAN_COLOR.stroke_width(2))
        });
        chart
            .draw_series(dashes)?
            .label(format!("median {} tokens/s", format_count(m.round() as u64)))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], MEDIAN_COLOR.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

/// Panel height of the heatmap for a layer with `experts` experts.
fn panel_height(experts: usize) -> u32 {
    let e = experts.max(1) as u32;
    let row = (480 / e).clamp(4, 14);
    (70 + row * e).clamp(180, 800)
}

const EXPERTS_TITLE_H: u32 = 50;
const EXPERTS_WIDTH: u32 = 1100;
const COLORBAR_W: u32 = 140;

fn experts_size(summary: &ReportSummary) -> (u32, u32) {
    let panels: u32 = summary.layers.iter().map(|l| panel_height(l.experts)).sum();
    (EXPERTS_WIDTH, EXPERTS_TITLE_H + panels.max(200))
}

/// The viridis colour map at `t` in [0, 1] (linear interpolation between nine samples).
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (72, 40, 120),
        (62, 73, 137),
        (49, 104, 142),
        (38, 130, 142),
        (31, 158, 137),
        (53, 183, 121),
        (110, 206, 88),
        (253, 231, 37),
    ];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let lerp = |a: u8, b: u8| (a as f64 + f * (b as f64 - a as f64)).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

const EMPTY_CELL: RGBColor = RGBColor(200, 200, 200);

fn draw_experts(root: &Area<'_>, metrics: &Metrics, name: &str) -> DrawResult {
    let (title, body) = root.split_vertically(EXPERTS_TITLE_H);
    title.titled(&format!("Expert load: {name}"), ("sans-serif", 24))?;
    let train = &metrics.train;
    let bks = buckets(train.len());
    let grid = load_grid(train, &bks);
    if grid.cells.is_empty() {
        body.draw(&Text::new(
            "dense model: no MoE layers in the metrics log",
            (40, 60),
            ("sans-serif", 18),
        ))?;
        return Ok(());
    }

    // Bucket edges on the step axis: each bucket runs from its first step to the next bucket's first step;
    // the last one extends by the logging interval.
    let mut edges: Vec<f64> = bks.iter().map(|&(a, _)| train[a].step as f64).collect();
    let last = train.last().map_or(0.0, |r| r.step as f64);
    let prev = if train.len() >= 2 {
        train[train.len() - 2].step as f64
    } else {
        last - 1.0
    };
    edges.push(last + (last - prev).max(1.0));

    // Shares per layer per bucket per expert (None where the layer routed nothing).
    let shares: Vec<Vec<Option<Vec<f64>>>> = grid
        .cells
        .iter()
        .map(|cells| {
            cells
                .iter()
                .map(|(counts, _)| {
                    let total: u64 = counts.iter().sum();
                    (total > 0).then(|| counts.iter().map(|&c| rate(c, total)).collect())
                })
                .collect()
        })
        .collect();
    let max_experts = grid.experts.iter().copied().max().unwrap_or(1).max(1);
    let observed = shares.iter().flatten().flatten().flatten().copied().fold(0.0, f64::max);
    // The scale runs from 0 to at least 2/E, so that a uniform load sits mid-scale.
    let vmax = observed.max(2.0 / max_experts as f64).min(1.0);

    let (panels_area, bar_area) = body.split_horizontally(EXPERTS_WIDTH - COLORBAR_W);
    let heights: Vec<u32> = grid.experts.iter().map(|&e| panel_height(e)).collect();
    let mut rest = panels_area;
    for (l, layer_shares) in shares.iter().enumerate() {
        let (panel, below) = rest.split_vertically(heights[l]);
        rest = below;
        let experts = grid.experts[l];
        let mut chart = ChartBuilder::on(&panel)
            .caption(
                format!(
                    "MoE layer {l} ({experts} experts, uniform share {:.3})",
                    1.0 / experts.max(1) as f64
                ),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(edges[0]..edges[edges.len() - 1], -0.5..experts as f64 - 0.5)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .x_label_formatter(&step_label)
            .y_desc("expert")
            .y_labels(experts.clamp(1, 16) + 1)
            .y_label_formatter(&|v| {
                if (v - v.round()).abs() < 1e-6 && v.round() >= 0.0 {
                    format!("{}", v.round() as i64)
                } else {
                    String::new()
                }
            })
            .draw()?;
        let cells = layer_shares.iter().enumerate().flat_map(|(b, bucket)| {
            let (x0, x1) = (edges[b], edges[b + 1]);
            (0..experts).map(move |e| {
                let color = match bucket {
                    Some(s) => viridis(s.get(e).copied().unwrap_or(0.0) / vmax),
                    None => EMPTY_CELL,
                };
                Rectangle::new([(x0, e as f64 - 0.5), (x1, e as f64 + 0.5)], color.filled())
            })
        });
        chart.draw_series(cells)?;
    }
    draw_colorbar(&bar_area, vmax, &grid.experts)
}

fn draw_colorbar(area: &Area<'_>, vmax: f64, experts: &[usize]) -> DrawResult {
    let (_, h) = area.dim_in_pixel();
    let bar_h = (h as f64 * 0.6).clamp(120.0, 400.0) as u32;
    let (bar, _) = area.split_vertically(bar_h + 60);
    // Enough decimals to tell ten ticks apart.
    let decimals = (-(vmax / 10.0).log10()).ceil().clamp(2.0, 6.0) as usize;
    let mut chart = ChartBuilder::on(&bar)
        .caption("share", ("sans-serif", 15))
        .margin_top(10)
        .margin_right(50)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..1.0, 0.0..vmax)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_label_formatter(&|v| format!("{v:.decimals$}"))
        .y_label_style(("sans-serif", 12))
        .draw()?;
    let n = 100;
    chart.draw_series((0..n).map(|i| {
        let a = vmax * i as f64 / n as f64;
        let b = vmax * (i + 1) as f64 / n as f64;
        Rectangle::new([(0.0, a), (1.0, b)], viridis((a + b) / 2.0 / vmax).filled())
    }))?;
    let mut uniform: Vec<usize> = experts.iter().copied().filter(|&e| e > 0).collect();
    uniform.sort_unstable();
    uniform.dedup();
    for e in uniform {
        let u = 1.0 / e as f64;
        chart.draw_series(std::iter::once(PathElement::new(
            [(-0.15, u), (1.15, u)],
            WHITE.stroke_width(2),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("1/{e}"),
            (1.2, u),
            ("sans-serif", 13),
        )))?;
    }
    Ok(())
}

/// `1234567` -> `1,234,567`.
fn format_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as `1h 02m 03s` (or `2m 03s`, `3.4s`).
fn format_duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "n/a".into();
    }
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let t = s.round() as u64;
    let (h, m, sec) = (t / 3600, t / 60 % 60, t % 60);
    if h > 0 {
        format!("{h}h {m:02}m {sec:02}s")
    } else {
        format!("{m}m {sec:02}s")
    }
}

fn format_loss(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "n/a".into()
    }
}

/// Sharded dense parameters: what each worker keeps, gathers and holds at the peak.
fn dense_section(md: &mut String, rec: &DenseRecord) {
    use crate::storage::tiers::format_bytes;
    let _ = writeln!(md, "\n## Sharded dense parameters (at step {})\n", rec.step);
    let _ = writeln!(
        md,
        "| worker | kept between steps | gathered from peers | legs gathered | peak held in a step | waited for legs |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (w, d) in rec.workers.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {w} | {} | {} | {} | {} | {:.2} s |",
            format_bytes(d.resident_bytes),
            format_bytes(d.gathered_bytes),
            d.legs,
            format_bytes(d.peak_bytes),
            d.wait_s
        );
    }
}

/// The expert tiers: budgets and peaks, hit rate, prefetch accuracy, stalls, bytes moved.
fn storage_section(md: &mut String, rec: &StorageRecord) {
    use crate::storage::tiers::format_bytes;
    let st = &rec.stats;
    let budget = |b: u64| {
        if b == u64::MAX {
            "unlimited".to_string()
        } else {
            format_bytes(b)
        }
    };
    let _ = writeln!(md, "\n## Expert storage (at step {})\n", rec.step);
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| Expert units | {} of {} |", st.units, format_bytes(st.unit_bytes));
    for (t, name) in ["Device", "Host"].iter().enumerate() {
        let _ = writeln!(
            md,
            "| {name} tier | budget {}, peak {}, now {} |",
            budget(st.budget[t]),
            format_bytes(st.peak[t]),
            format_bytes(st.used[t])
        );
    }
    let _ = writeln!(md, "| Disk tier | {} units now |", st.on_disk);
    let _ = writeln!(
        md,
        "| Served from device / host / disk | {} / {} / {} (hit rate {:.1}%) |",
        st.served_from[0],
        st.served_from[1],
        st.served_from[2],
        100.0 * st.hit_rate()
    );
    if st.prefetched > 0 {
        let _ = writeln!(
            md,
            "| Prefetched | {} (accuracy {:.1}%) |",
            st.prefetched,
            100.0 * st.prefetch_accuracy()
        );
    } else {
        let _ = writeln!(md, "| Prefetched | none |");
    }
    let _ = writeln!(md, "| Stall waiting for experts | {:.1} s |", st.stall_seconds);
    let _ = writeln!(
        md,
        "| Disk read / written | {} / {} |",
        format_bytes(st.disk_read),
        format_bytes(st.disk_written)
    );
    let names = ["device", "host", "disk"];
    let mut moved = Vec::new();
    for (i, from) in names.iter().enumerate() {
        for (j, to) in names.iter().enumerate() {
            if st.moved[i][j] > 0 {
                moved.push(format!("{from} -> {to} {}", format_bytes(st.moved[i][j])));
            }
        }
    }
    if !moved.is_empty() {
        let _ = writeln!(md, "| Moved | {} |", moved.join(", "));
    }
}

fn markdown(s: &ReportSummary, metrics: &Metrics, name: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Run report: {name}\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| Steps | {} to {} ({} training records, {} validation records) |",
        s.first_step, s.final_step, s.train_records, s.val_records
    );
    let _ = writeln!(
        md,
        "| Mean train loss of the last {} steps | {} nats/byte (last step {}; EMA {:.2} {}) |",
        s.mean_train_loss_steps,
        format_loss(s.mean_train_loss),
        format_loss(s.final_train_loss_raw),
        s.ema_smoothing,
        format_loss(s.final_train_loss)
    );
    match (s.best_val_loss, s.best_val_step) {
        (Some(v), Some(step)) => {
            let _ = writeln!(
                md,
                "| Best validation loss | {} nats/byte at step {step} |",
                format_loss(v)
            );
        }
        _ => {
            let _ = writeln!(md, "| Best validation loss | none logged |");
        }
    }
    if let (Some(v), Some(step)) = (s.final_val_loss, s.final_val_step) {
        let _ = writeln!(
            md,
            "| Final validation loss | {} nats/byte at step {step} |",
            format_loss(v)
        );
    }
    let _ = writeln!(md, "| Total tokens | {} |", format_count(s.total_tokens));
    if s.elapsed_s.is_finite() && s.elapsed_s >= 60.0 {
        let _ = writeln!(
            md,
            "| Wall time | {} ({:.1} s) |",
            format_duration(s.elapsed_s),
            s.elapsed_s
        );
    } else {
        let _ = writeln!(md, "| Wall time | {} |", format_duration(s.elapsed_s));
    }
    let tps = if s.median_tokens_per_s.is_finite() {
        format!("{} tokens/s", format_count(s.median_tokens_per_s.round() as u64))
    } else {
        "n/a".into()
    };
    let _ = writeln!(md, "| Median throughput | {tps} |");

    // A dense model has no expert state to report on.
    if let Some(rec) = metrics.storage.as_ref().filter(|r| r.stats.units > 0) {
        storage_section(&mut md, rec);
    }
    if let Some(rec) = &metrics.dense {
        dense_section(&mut md, rec);
    }

    let _ = writeln!(md, "\n## Expert load\n");
    if s.layers.is_empty() {
        let _ = writeln!(md, "Dense model: no MoE layers logged.");
    } else {
        let (a, b) = s.layers[0].final_steps;
        let _ = writeln!(
            md,
            "Final load share per expert (kept assignments over steps {a} to {b}; uniform is 1/E) and drop rate \
             (dropped over all assignments).\n"
        );
        let max_e = s.layers.iter().map(|l| l.experts).max().unwrap_or(0);
        let columns = max_e <= 16;
        let mut header = String::from("| MoE layer |");
        let mut rule = String::from("|---|");
        if columns {
            for e in 0..max_e {
                let _ = write!(header, " e{e} |");
                rule.push_str("---|");
            }
        } else {
            header.push_str(" least loaded | most loaded (top 4) |");
            rule.push_str("---|---|");
        }
        header.push_str(" max/uniform | drop rate (final) | drop rate (run) |");
        rule.push_str("---|---|---|");
        let _ = writeln!(md, "{header}\n{rule}");
        for (l, layer) in s.layers.iter().enumerate() {
            let mut row = format!("| {l} |");
            if columns {
                for e in 0..max_e {
                    let cell = layer.final_share.get(e).map_or(String::new(), |x| format!("{x:.3}"));
                    let _ = write!(row, " {cell} |");
                }
            } else {
                // Too many experts for one column each: the extremes.
                let mut order: Vec<(usize, f64)> = layer.final_share.iter().copied().enumerate().collect();
                order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let top: Vec<String> = order.iter().take(4).map(|(e, x)| format!("e{e} {x:.3}")).collect();
                let least = order.last().map_or(String::new(), |(e, x)| format!("e{e} {x:.3}"));
                let _ = write!(row, " {least} | {} |", top.join(", "));
            }
            let max = layer.final_share.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                md,
                "{row} {:.2} | {:.2}% | {:.2}% |",
                max * layer.experts as f64,
                100.0 * layer.final_drop_rate,
                100.0 * layer.drop_rate
            );
        }
    }

    let _ = writeln!(md, "\n## Plots\n");
    let plots = [
        ("Loss", LOSS_SVG),
        ("Throughput", THROUGHPUT_SVG),
        ("Expert load", EXPERTS_SVG),
    ];
    for (title, file) in plots {
        let _ = writeln!(md, "- [{title}]({file})");
    }
    for (title, file) in plots {
        let _ = writeln!(md, "\n![{title}]({file})");
    }

    if !metrics.malformed_lines.is_empty() || metrics.superseded_records > 0 {
        let _ = writeln!(md, "\n## Log notes\n");
        if !metrics.malformed_lines.is_empty() {
            let shown: Vec<String> = metrics.malformed_lines.iter().take(10).map(|n| n.to_string()).collect();
            let more = if metrics.malformed_lines.len() > 10 {
                ", ..."
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "- Skipped {} malformed line(s) of `{METRICS_FILE}` (line {}{more}).",
                metrics.malformed_lines.len(),
                shown.join(", ")
            );
        }
        if metrics.superseded_records > 0 {
            let _ = writeln!(
                md,
                "- {} record(s) superseded by a resumed run were left out.",
                metrics.superseded_records
            );
        }
    }
    md
}

/// The paths [`write_report`] writes for `run_dir`: loss plot, throughput plot, expert heatmap, Markdown.
pub fn report_files(run_dir: &Path) -> [PathBuf; 4] {
    [LOSS_SVG, THROUGHPUT_SVG, EXPERTS_SVG, REPORT_MD].map(|f| run_dir.join(f))
}
