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
