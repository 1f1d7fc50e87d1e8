//! Telemetry: run reports and plots, and the runtime's live metrics.
//!
//! [`metrics`] names every metric the runtime records (and serves them as Prometheus text).
//! [`report`] turns a run's `metrics.jsonl` into `loss.svg`, `throughput.svg`, `experts.svg` and `report.md`
//! (see [`write_report`]); [`read_metrics`] parses the log on its own.

pub mod metrics;
pub mod report;
pub mod runs;

pub use report::{
    ema_smoothing, read_metrics, summarize, write_report, LayerLoad, Metrics, ReportSummary, TrainRecord, ValRecord,
    EXPERTS_SVG, LOSS_SVG, METRICS_FILE, REPORT_MD, THROUGHPUT_SVG,
};

/// Print one line on stderr in a single write (see [`crate::say!`]).
pub fn say_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut line = args.to_string();
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `eprintln!` in one write: the coordinator and the worker processes it starts share a stderr,
/// and `eprintln!` may write a line in pieces, so that two processes' lines could interleave
/// mid-line. Lines up to the pipe buffer (4 KiB) stay whole.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::telemetry::say_line(format_args!($($arg)*))
    };
}
