//! The report's SVG plots: the loss curve, throughput, and the expert load heatmap.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};

use super::markdown::format_count;
use super::summary::{buckets, ema, ema_smoothing, rate};
use super::{Metrics, ReportSummary};

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Renders an SVG into a string; drawing errors are reported against `path`.
pub(super) fn render(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<String> {
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

/// The largest magnitude drawn: beyond it (only a hand-edited log gets there) a range's width or
/// padding would overflow, and the plotting library never finishes placing ticks on an infinite
/// axis; such points break a line as NaN does.
const PLOTTABLE: f64 = 1e300;

/// Whether a value is drawn.
fn plottable(v: f64) -> bool {
    v.is_finite() && v.abs() <= PLOTTABLE
}

/// A range covering the plottable values, padded by 5% (and widened if empty or a single value).
fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|&v| plottable(v))
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

/// The most points a line of a plot keeps (a few per pixel of its width): a long run's series
/// are thinned to them ([`thin`]), or its SVG would hold a point per step.
const MAX_LINE_POINTS: usize = 4_000;

/// `run` with at most [`MAX_LINE_POINTS`] points: in each chunk of consecutive points, the lowest
/// and the highest (in step order), so that the line keeps its envelope, spikes included.
fn thin(run: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    if run.len() <= MAX_LINE_POINTS {
        return run;
    }
    let chunk = run.len().div_ceil(MAX_LINE_POINTS / 2);
    let mut out = Vec::with_capacity(MAX_LINE_POINTS);
    for part in run.chunks(chunk) {
        let by_y = |a: &&(f64, f64), b: &&(f64, f64)| a.1.total_cmp(&b.1);
        let (Some(lo), Some(hi)) = (part.iter().min_by(by_y), part.iter().max_by(by_y)) else {
            continue;
        };
        let (first, second) = if lo.0 <= hi.0 { (lo, hi) } else { (hi, lo) };
        out.push(*first);
        if second != first {
            out.push(*second);
        }
    }
    out
}

/// Splits a series into runs of plottable points (so that NaN breaks the line instead of being
/// drawn), each thinned to at most [`MAX_LINE_POINTS`].
fn finite_runs(points: impl Iterator<Item = (f64, f64)>) -> Vec<Vec<(f64, f64)>> {
    let mut runs = vec![Vec::new()];
    for (x, y) in points {
        if plottable(y) {
            if let Some(run) = runs.last_mut() {
                run.push((x, y));
            }
        } else if runs.last().is_some_and(|r| !r.is_empty()) {
            runs.push(Vec::new());
        }
    }
    runs.retain(|r| !r.is_empty());
    runs.into_iter().map(thin).collect()
}

const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VAL_COLOR: RGBColor = RGBColor(214, 39, 40);
const MEDIAN_COLOR: RGBColor = RGBColor(255, 127, 14);

/// Colour of the membership changes (a run over worker processes).
const MEMBERSHIP_COLOR: RGBColor = RGBColor(120, 120, 120);

/// A vertical line from `lo` to `hi` at each step where a new membership epoch formed after the
/// first (a worker joined, left or was lost).
fn membership_lines(metrics: &Metrics, lo: f64, hi: f64) -> Vec<PathElement<(f64, f64)>> {
    metrics
        .membership
        .iter()
        .filter(|m| m.epoch > 1)
        .map(|m| {
            PathElement::new(
                [(m.step as f64, lo), (m.step as f64, hi)],
                MEMBERSHIP_COLOR.stroke_width(2),
            )
        })
        .collect()
}

pub(super) fn draw_loss(root: &Area<'_>, metrics: &Metrics, name: &str) -> DrawResult {
    let losses: Vec<f64> = metrics.train.iter().map(|r| r.nats_per_byte()).collect();
    let smoothing = ema_smoothing(losses.len());
    let smoothed = ema(&losses, smoothing);
    let y = padded_range(losses.iter().copied().chain(metrics.val.iter().map(|v| v.val_loss)));
    let changes = membership_lines(metrics, y.start, y.end);
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
        .filter(|v| plottable(v.val_loss))
        .map(|v| (v.step as f64, v.val_loss))
        .collect();
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val.iter().copied(), VAL_COLOR.mix(0.5).stroke_width(1)))?
            .label("validation loss")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, VAL_COLOR.filled()));
        chart.draw_series(val.iter().map(|&p| Circle::new(p, 4, VAL_COLOR.filled())))?;
    }
    if !changes.is_empty() {
        chart
            .draw_series(changes)?
            .label("membership change")
            .legend(|(x, y)| PathElement::new([(x + 10, y - 6), (x + 10, y + 6)], MEMBERSHIP_COLOR.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

pub(super) fn draw_throughput(root: &Area<'_>, metrics: &Metrics, summary: &ReportSummary, name: &str) -> DrawResult {
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
    let changes = membership_lines(metrics, 0.0, hi);
    if !changes.is_empty() {
        chart
            .draw_series(changes)?
            .label("membership change")
            .legend(|(x, y)| PathElement::new([(x + 10, y - 6), (x + 10, y + 6)], MEMBERSHIP_COLOR.stroke_width(2)));
    }
    let m = summary.median_tokens_per_s;
    if plottable(m) {
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

pub(super) fn experts_size(summary: &ReportSummary) -> (u32, u32) {
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

pub(super) fn draw_experts(root: &Area<'_>, metrics: &Metrics, name: &str) -> DrawResult {
    let (title, body) = root.split_vertically(EXPERTS_TITLE_H);
    title.titled(&format!("Expert load: {name}"), ("sans-serif", 24))?;
    let train = &metrics.train;
    let bks = buckets(train.len());
    let grid = &metrics.expert_load;
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
                    let total = super::summary::total(counts);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_series_is_thinned_to_its_envelope() {
        // A million steps of a slow ramp with one spike.
        let points: Vec<(f64, f64)> = (0..1_000_000)
            .map(|i| (i as f64, if i == 654_321 { 50.0 } else { i as f64 * 1e-6 }))
            .collect();
        let runs = finite_runs(points.into_iter());
        assert_eq!(runs.len(), 1);
        let run = &runs[0];
        assert!(run.len() <= MAX_LINE_POINTS, "{} points", run.len());
        assert!(run.len() >= MAX_LINE_POINTS / 2, "{} points", run.len());
        assert!(run.windows(2).all(|w| w[0].0 < w[1].0), "in step order");
        assert!(run.contains(&(654_321.0, 50.0)), "the spike is kept");
        assert_eq!(run.first(), Some(&(0.0, 0.0)));
        // A short one is drawn as it is.
        let short: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 1.0)).collect();
        assert_eq!(finite_runs(short.clone().into_iter()), vec![short]);
    }
}
