//! The run report: a synthetic metrics log in, four files and the right numbers out.
//!
//! Set `SEMOE_KEEP_TEST_OUTPUT=1` to keep the generated run directories (their paths are printed).

mod common;

use common::TempDir;

use std::fmt::Write as _;
use std::path::Path;

use semoe::telemetry::{read_metrics, write_report, EXPERTS_SVG, LOSS_SVG, METRICS_FILE, REPORT_MD, THROUGHPUT_SVG};
use semoe::Error;

const STEPS: u64 = 300;
const TOKENS_PER_STEP: u64 = 2048;
const EXPERTS: usize = 4;
const K: u64 = 2;
/// Points the loss and throughput curves of the run draw at least: one per step.
const MIN_POINTS: usize = STEPS as usize;

/// A small deterministic pseudo-random number in [-1, 1).
fn noise(i: u64) -> f64 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ 0xD1B5_4A32_D192_ED03;
    (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

struct Synthetic {
    log: String,
    losses: Vec<f64>,
    tps: Vec<f64>,
    /// `[step-1][layer][expert]`
    expert_tokens: Vec<[[u64; EXPERTS]; 2]>,
    dropped: Vec<[u64; 2]>,
    val: Vec<(u64, f64)>,
    last_elapsed: f64,
}

fn synthetic() -> Synthetic {
    let mut s = Synthetic {
        log: String::new(),
        losses: Vec::new(),
        tps: Vec::new(),
        expert_tokens: Vec::new(),
        dropped: Vec::new(),
        val: Vec::new(),
        last_elapsed: 0.0,
    };
    s.log
        .push_str("{\"kind\":\"config\",\"model\":{\"layers\":4,\"experts\":4}}\n");
    let val_losses = [
        (50, 2.9),
        (100, 2.1),
        (150, 1.8),
        (200, 1.62),
        (250, 1.571_25),
        (300, 1.58),
    ];
    for step in 1..=STEPS {
        let loss = 1.4 + 4.1 * (-(step as f64) / 60.0).exp() + 0.08 * noise(step);
        let tps = 7800.0 + 400.0 * noise(step + 1000);
        let elapsed = step as f64 * 0.26;
        // Layer 0: starts collapsed on expert 0, balances over the run; layer 1: roughly uniform.
        let assignments = TOKENS_PER_STEP * K;
        let skew = (-(step as f64) / 80.0).exp();
        let mut l0 = [0u64; EXPERTS];
        let weights = [
            0.25 + 0.6 * skew,
            0.25 - 0.2 * skew,
            0.25 - 0.2 * skew,
            0.25 - 0.2 * skew,
        ];
        for e in 0..EXPERTS {
            l0[e] = (weights[e] * assignments as f64 * 0.97) as u64;
        }
        let mut l1 = [0u64; EXPERTS];
        for (e, c) in l1.iter_mut().enumerate() {
            *c = (0.25 * assignments as f64 * (1.0 + 0.1 * noise(step * 7 + e as u64))) as u64;
        }
        let d0 = assignments - l0.iter().sum::<u64>();
        let d1 = step % 5;
        let _ = writeln!(
            s.log,
            "{{\"kind\":\"train\",\"step\":{step},\"tokens\":{}.0,\"elapsed_s\":{elapsed},\"loss\":{loss},\
             \"ce_loss\":{},\"aux_loss\":0.02,\"lr\":0.003,\"tokens_per_s\":{tps},\
             \"expert_tokens\":[{:?},{:?}],\"dropped\":[{d0},{d1}]}}",
            step * TOKENS_PER_STEP,
            loss - 0.02,
            l0,
            l1,
        );
        // The report's train loss in nats/byte is the cross-entropy, not the logged objective
        // (which holds the routers' auxiliary loss too).
        s.losses.push(loss - 0.02);
        s.tps.push(tps);
        s.expert_tokens.push([l0, l1]);
        s.dropped.push([d0, d1]);
        s.last_elapsed = elapsed;
        if let Some(&(_, v)) = val_losses.iter().find(|(vs, _)| *vs == step) {
            let velapsed = elapsed + 0.5;
            let _ = writeln!(
                s.log,
                "{{\"kind\":\"val\",\"step\":{step},\"elapsed_s\":{velapsed},\"val_loss\":{v}}}"
            );
            s.val.push((step, v));
            s.last_elapsed = velapsed;
        }
        if step == 120 {
            s.log.push_str("{\"kind\":\"train\",\"step\":120,\"tokens\":\n");
            s.log
                .push_str("{\"kind\":\"checkpoint\",\"step\":120,\"path\":\"ckpt/step-120\"}\n");
            s.log.push('\n');
        }
    }
    s
}

fn ema(values: &[f64], w: f64) -> f64 {
    let (mut acc, mut norm) = (0.0, 0.0);
    for &v in values {
        acc = w * acc + (1.0 - w) * v;
        norm = w * norm + (1.0 - w);
    }
    acc / norm
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

/// The most points drawn by one `<polyline>` (its `points`) or `<path>` (the coordinate pairs of its
/// `d`): the data series, where axes and ticks have two or a few.
fn most_points(svg: &str) -> usize {
    let mut best = 0;
    for (tag, attr) in [("<polyline", "points=\""), ("<path", " d=\"")] {
        for (i, _) in svg.match_indices(tag) {
            let element = &svg[i..];
            let element = &element[..element.find('>').unwrap_or(element.len())];
            if let Some(a) = element.find(attr) {
                let value = &element[a + attr.len()..];
                let value = &value[..value.find('"').unwrap_or(value.len())];
                let numbers = value
                    .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
                    .filter(|t| t.parse::<f64>().is_ok())
                    .count();
                best = best.max(numbers / 2);
            }
        }
    }
    best
}

/// A well-formed SVG whose longest line has at least `min_points` points (0: no line needed).
fn check_svg(path: &Path, min_points: usize) -> String {
    let svg = std::fs::read_to_string(path).unwrap();
    assert!(
        svg.trim_start().starts_with("<svg"),
        "{} does not start with <svg",
        path.display()
    );
    assert!(svg.trim_end().ends_with("</svg>"), "{} is not closed", path.display());
    assert!(svg.contains("<rect"), "{} draws nothing", path.display());
    let points = most_points(&svg);
    assert!(
        points >= min_points,
        "{} plots no data: its longest line has {points} points, want {min_points} or more",
        path.display()
    );
    svg
}

#[test]
fn report_of_a_synthetic_moe_run() {
    let dir = TempDir::new("moe");
    let s = synthetic();
    std::fs::write(dir.path().join(METRICS_FILE), &s.log).unwrap();

    let summary = write_report(dir.path()).unwrap();

    for f in [LOSS_SVG, THROUGHPUT_SVG, EXPERTS_SVG, REPORT_MD] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let loss_svg = check_svg(&dir.path().join(LOSS_SVG), MIN_POINTS);
    assert!(loss_svg.contains("<polyline") && loss_svg.contains("<circle"));
    assert!(loss_svg.contains("nats/byte"));
    check_svg(&dir.path().join(THROUGHPUT_SVG), MIN_POINTS);
    // A heat map: its data are the cells.
    let experts_svg = check_svg(&dir.path().join(EXPERTS_SVG), 0);
    // 60 buckets x 4 experts x 2 layers of cells, plus the colour bar.
    assert!(experts_svg.matches("<rect").count() >= 60 * 4 * 2);
    assert!(experts_svg.contains("MoE layer 1"));

    // The numbers.
    assert_eq!(summary.train_records, STEPS as usize);
    assert_eq!(summary.val_records, s.val.len());
    assert_eq!((summary.first_step, summary.final_step), (1, STEPS));
    assert_eq!(summary.total_tokens, STEPS * TOKENS_PER_STEP);
    assert!(close(summary.elapsed_s, s.last_elapsed, 1e-12));
    assert_eq!(summary.malformed_lines, 1);
    assert_eq!(summary.other_records, 2);
    assert!(close(
        summary.final_train_loss,
        ema(&s.losses, summary.ema_smoothing),
        1e-12
    ));
    assert!(close(summary.final_train_loss_raw, s.losses[s.losses.len() - 1], 1e-12));
    assert_eq!(summary.best_val_loss, Some(1.571_25));
    assert_eq!(summary.best_val_step, Some(250));
    assert_eq!(summary.final_val_loss, Some(1.58));
    assert_eq!(summary.final_val_step, Some(300));
    let mut tps = s.tps.clone();
    tps.sort_by(f64::total_cmp);
    let median = 0.5 * (tps[tps.len() / 2 - 1] + tps[tps.len() / 2]);
    assert!(close(summary.median_tokens_per_s, median, 1e-12));

    assert_eq!(summary.layers.len(), 2);
    for (l, layer) in summary.layers.iter().enumerate() {
        assert_eq!(layer.experts, EXPERTS);
        let kept: u64 = s.expert_tokens.iter().map(|r| r[l].iter().sum::<u64>()).sum();
        let dropped: u64 = s.dropped.iter().map(|d| d[l]).sum();
        assert_eq!((layer.kept, layer.dropped), (kept, dropped));
        assert!(close(layer.drop_rate, dropped as f64 / (kept + dropped) as f64, 1e-12));
        // The final share is over the steps of the last bucket.
        let (a, b) = layer.final_steps;
        assert!(a > 1 && b == STEPS && b - a < 10, "final bucket {a}..{b}");
        let rows = &s.expert_tokens[(a - 1) as usize..b as usize];
        let total: u64 = rows.iter().map(|r| r[l].iter().sum::<u64>()).sum();
        for e in 0..EXPERTS {
            let c: u64 = rows.iter().map(|r| r[l][e]).sum();
            assert!(close(layer.final_share[e], c as f64 / total as f64, 1e-12));
        }
        assert!(close(layer.final_share.iter().sum::<f64>(), 1.0, 1e-12));
    }
    // Layer 0 ends nearly balanced (the skew has decayed to ~2.5%), expert 0 still a little ahead.
    assert!(summary.layers[0].final_share[0] > 0.25 && summary.layers[0].final_share[0] < 0.28);

    // The Markdown.
    let md = std::fs::read_to_string(dir.path().join(REPORT_MD)).unwrap();
    assert!(md.contains("1.5713"), "best val loss missing:\n{md}");
    assert!(md.contains("step 250"));
    assert!(md.contains("614,400"), "total tokens missing:\n{md}");
    for f in [LOSS_SVG, THROUGHPUT_SVG, EXPERTS_SVG] {
        assert!(md.contains(&format!("({f})")), "link to {f} missing");
    }
    assert!(md.contains("malformed"));
}

#[test]
fn dense_run_reports_without_experts() {
    let dir = TempDir::new("dense");
    let mut log = String::new();
    for step in 1..=20u64 {
        let _ = writeln!(
            log,
            "{{\"kind\":\"train\",\"step\":{step},\"tokens\":{},\"elapsed_s\":{},\"loss\":{},\"tokens_per_s\":{},\
             \"expert_tokens\":[],\"dropped\":[]}}",
            step * 100,
            step as f64,
            3.0 - 0.05 * step as f64,
            1000 + step
        );
    }
    std::fs::write(dir.path().join(METRICS_FILE), log).unwrap();
    let summary = write_report(dir.path()).unwrap();
    assert!(summary.layers.is_empty());
    assert_eq!(summary.best_val_loss, None);
    assert_eq!(summary.final_val_loss, None);
    assert_eq!(summary.median_tokens_per_s, 1010.5);
    assert_eq!(summary.total_tokens, 2000);
    // One point per step.
    check_svg(&dir.path().join(LOSS_SVG), 20);
    let experts = std::fs::read_to_string(dir.path().join(EXPERTS_SVG)).unwrap();
    assert!(experts.starts_with("<svg") && experts.contains("no MoE layers"));
}

#[test]
fn resumed_run_supersedes_repeated_steps() {
    let dir = TempDir::new("resume");
    let mut log = String::new();
    let train = |step: u64, loss: f64| {
        format!(
            "{{\"kind\":\"train\",\"step\":{step},\"tokens\":{},\"elapsed_s\":{step},\"loss\":{loss},\
             \"tokens_per_s\":1000.0}}\n",
            step * 10
        )
    };
    for step in 1..=10 {
        log.push_str(&train(step, 9.0));
        if step == 8 {
            log.push_str("{\"kind\":\"val\",\"step\":8,\"val_loss\":9.5}\n");
        }
    }
    // Resumed from the checkpoint at step 5.
    for step in 6..=12 {
        log.push_str(&train(step, 1.0));
    }
    log.push_str(
        "{\"kind\":\"train\",\"step\":13,\"tokens\":130,\"elapsed_s\":13,\"loss\":null,\"tokens_per_s\":null}\n",
    );
    let path = dir.path().join(METRICS_FILE);
    std::fs::write(&path, log).unwrap();
    let m = read_metrics(&path).unwrap();
    let steps: Vec<u64> = m.train.iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=13).collect::<Vec<_>>());
    assert!(m.train[5..12].iter().all(|r| r.loss == 1.0));
    assert!(m.train[12].loss.is_nan());
    assert!(m.val.is_empty());
    assert_eq!(m.superseded_records, 6);
    let summary = write_report(dir.path()).unwrap();
    // The NaN loss is skipped by the moving average, the median and the mean (which it made
    // "n/a"), and not counted among the mean's steps.
    assert!(summary.final_train_loss.is_finite());
    assert_eq!(summary.median_tokens_per_s, 1000.0);
    assert!(summary.mean_train_loss.is_finite(), "{}", summary.mean_train_loss);
    assert_eq!(summary.mean_train_loss_steps, 12);
}

#[test]
fn a_log_whose_losses_are_all_null_has_no_mean_loss() {
    let dir = TempDir::new("all-null");
    let log: String = (1..=3)
        .map(|step| {
            format!(
                "{{\"kind\":\"train\",\"step\":{step},\"tokens\":{},\"elapsed_s\":{step},\"loss\":null,\
                 \"tokens_per_s\":1000.0}}\n",
                step * 10
            )
        })
        .collect();
    std::fs::write(dir.path().join(METRICS_FILE), log).unwrap();
    let summary = write_report(dir.path()).expect("a report");
    assert_eq!(summary.train_records, 3);
    assert_eq!(summary.mean_train_loss_steps, 0);
    assert!(
        summary.mean_train_loss.is_nan(),
        "{} (NaN, as documented)",
        summary.mean_train_loss
    );
}

#[test]
fn a_hand_edited_log_with_values_at_the_ends_of_their_types_still_reports() {
    // Counts whose sums overflow u64, and losses whose padded range overflows f64 (which left the
    // plotting library placing ticks for ever).
    let dir = TempDir::new("extremes");
    let max = u64::MAX;
    let mut log = String::new();
    for (step, loss) in [(1u64, -1e308), (2, 1e308), (3, 1.0)] {
        let _ = writeln!(
            log,
            "{{\"kind\":\"train\",\"step\":{step},\"tokens\":{},\"elapsed_s\":{step},\"loss\":{loss:e},\
             \"tokens_per_s\":1000.0,\"expert_tokens\":[[{max},{max}]],\"dropped\":[{max}]}}",
            step * 10
        );
    }
    std::fs::write(dir.path().join(METRICS_FILE), log).unwrap();
    let summary = write_report(dir.path()).expect("a report of extreme values");
    assert_eq!(summary.layers.len(), 1, "one MoE layer");
    let layer = &summary.layers[0];
    assert_eq!(layer.kept, max, "a saturated count");
    assert!(
        layer.drop_rate.is_finite() && (0.0..=1.0).contains(&layer.drop_rate),
        "{}",
        layer.drop_rate
    );
    assert_eq!(layer.final_share.len(), 2, "one share per expert");
    assert!(
        layer.final_share.iter().all(|s| s.is_finite()),
        "{:?}",
        layer.final_share
    );
    check_svg(&dir.path().join(LOSS_SVG), 1);
}

#[test]
fn missing_log_is_an_error_naming_the_path() {
    let dir = TempDir::new("missing");
    let err = write_report(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        msg.contains(&dir.path().join(METRICS_FILE).display().to_string()),
        "{msg}"
    );
}

#[test]
fn log_without_training_records_is_an_error() {
    let dir = TempDir::new("empty");
    let path = dir.path().join(METRICS_FILE);
    std::fs::write(
        &path,
        "{\"kind\":\"config\",\"experts\":4}\n{\"kind\":\"val\",\"step\":10,\"val_loss\":2.0}\ngarbage\n",
    )
    .unwrap();
    let err = read_metrics(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Parse { .. }), "{err:?}");
    assert!(
        msg.contains("no training records") && msg.contains("1 malformed"),
        "{msg}"
    );
    assert!(write_report(dir.path()).is_err());
    assert!(!dir.path().join(REPORT_MD).exists());
}
