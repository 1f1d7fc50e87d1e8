//! The report's numbers: the smoothed loss, the validation optimum, throughput, and the expert load per
//! MoE layer over heatmap buckets.

use serde::Serialize;

use crate::error::{Error, Result};

use super::{Metrics, TrainRecord, ValRecord};

/// The weight of the previous value in the exponential moving average of the training loss, for a log of
/// `records` training records: the average lags by `w / (1 - w)` records, about 1% of the run (so that the
/// smoothed curve looks alike for short and long runs), with `w` between 0.6 and 0.98.
pub fn ema_smoothing(records: usize) -> f64 {
    let lag = records as f64 / 100.0;
    (lag / (1.0 + lag)).clamp(0.6, 0.98)
}
/// The largest number of step buckets in the expert heatmap.
pub const MAX_BUCKETS: usize = 60;

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
pub(super) fn median(values: impl Iterator<Item = f64>) -> f64 {
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
pub(super) fn buckets(n: usize) -> Vec<(usize, usize)> {
    let b = n.min(MAX_BUCKETS);
    (0..b).map(|i| (i * n / b, (i + 1) * n / b)).collect()
}

/// The most (layer, expert) cells the heatmap's grid holds, counting a layer without experts as
/// one: 64 layers of 4,096 experts (each cell is kept per bucket).
pub const MAX_GRID_CELLS: usize = 1 << 18;

/// Per-layer expert counts summed over the records of each bucket: `[layer][bucket] -> (counts,
/// dropped)`. Built while the log is read ([`LoadGrid::add`]), so that the records need not keep
/// their counts (a long run of a wide model logs kilobytes of them a step).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoadGrid {
    /// Experts of each layer (the longest `expert_tokens` list logged for it).
    pub(super) experts: Vec<usize>,
    pub(super) cells: Vec<Vec<(Vec<u64>, u64)>>,
    /// The buckets' record ranges ([`buckets`] of the records kept).
    #[serde(skip)]
    pub(super) buckets: usize,
}

impl LoadGrid {
    /// An empty grid of `buckets` buckets.
    pub(super) fn new(buckets: usize) -> LoadGrid {
        LoadGrid {
            buckets,
            ..LoadGrid::default()
        }
    }

    /// Add a record's counts to bucket `bucket`; false (nothing added) when they would make the
    /// grid wider than [`MAX_GRID_CELLS`] (a hand-edited or hostile log: every bucket holds a
    /// row as wide as the widest record, so one record of a million counts would cost gigabytes).
    pub(super) fn add(&mut self, bucket: usize, rec: &TrainRecord) -> bool {
        if bucket >= self.buckets {
            return true;
        }
        let layers = rec.expert_tokens.len().max(rec.dropped.len());
        let cells: usize = (0..layers)
            .map(|l| {
                let logged = rec.expert_tokens.get(l).map_or(0, Vec::len);
                self.experts.get(l).copied().unwrap_or(0).max(logged).max(1)
            })
            .sum::<usize>()
            + self.experts.iter().skip(layers).map(|&e| e.max(1)).sum::<usize>();
        if cells > MAX_GRID_CELLS {
            return false;
        }
        if layers > self.cells.len() {
            self.cells.resize_with(layers, || vec![(Vec::new(), 0); self.buckets]);
            self.experts.resize(layers, 0);
        }
        for (l, row) in rec.expert_tokens.iter().enumerate() {
            self.experts[l] = self.experts[l].max(row.len());
            let counts = &mut self.cells[l][bucket].0;
            if counts.len() < row.len() {
                counts.resize(row.len(), 0);
            }
            for (c, &x) in counts.iter_mut().zip(row) {
                *c = c.saturating_add(x);
            }
        }
        for (l, &d) in rec.dropped.iter().enumerate() {
            let dropped = &mut self.cells[l][bucket].1;
            *dropped = dropped.saturating_add(d);
        }
        true
    }

    /// Every layer's counts as long as its widest record (a bucket whose records logged fewer
    /// experts, or none, reads 0 for the rest).
    pub(super) fn finish(&mut self) {
        for (cells, &experts) in self.cells.iter_mut().zip(&self.experts) {
            for (counts, _) in cells.iter_mut() {
                counts.resize(experts, 0);
            }
        }
    }
}

/// The sum of counts read from a log, saturating: a hand-edited log may hold any u64, and a
/// report must not overflow on it.
pub(super) fn total<'a>(counts: impl IntoIterator<Item = &'a u64>) -> u64 {
    counts.into_iter().fold(0u64, |sum, &c| sum.saturating_add(c))
}

pub(super) fn rate(part: u64, total: u64) -> f64 {
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
    let losses: Vec<f64> = train.iter().map(|r| r.nats_per_byte()).collect();
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
    let grid = &metrics.expert_load;
    let layers = grid
        .cells
        .iter()
        .zip(&grid.experts)
        .map(|(cells, &experts)| {
            let kept = cells.iter().fold(0u64, |sum, (c, _)| sum.saturating_add(total(c)));
            let dropped = total(cells.iter().map(|(_, d)| d));
            let (final_counts, final_dropped) = cells.last().cloned().unwrap_or_default();
            let final_kept = total(&final_counts);
            let (a, b) = bks.last().copied().unwrap_or((0, 1));
            LayerLoad {
                experts,
                final_share: final_counts.iter().map(|&c| rate(c, final_kept)).collect(),
                final_steps: (train[a].step, train[b - 1].step),
                final_drop_rate: rate(final_dropped, final_kept.saturating_add(final_dropped)),
                kept,
                dropped,
                drop_rate: rate(dropped, kept.saturating_add(dropped)),
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
        final_train_loss_raw: last.nats_per_byte(),
        // As the trainer's end-of-run figure: the last losses that are numbers (a `null` loss is
        // read as NaN and left out, not made the mean's value).
        mean_train_loss: {
            let tail = last_losses(train);
            if tail.is_empty() {
                f64::NAN
            } else {
                tail.iter().sum::<f64>() / tail.len() as f64
            }
        },
        mean_train_loss_steps: last_losses(train).len(),
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

/// The last [`crate::train::trainer::MEAN_LOSS_STEPS`] training losses that are not NaN, oldest
/// first.
fn last_losses(train: &[TrainRecord]) -> Vec<f64> {
    let mut losses: Vec<f64> = train
        .iter()
        .rev()
        .map(|r| r.nats_per_byte())
        .filter(|l| !l.is_nan())
        .take(crate::train::trainer::MEAN_LOSS_STEPS)
        .collect();
    losses.reverse();
    losses
}
