//! The runtime's metric names, in one place (recorded through the `metrics` crate; served as
//! Prometheus text with `--metrics-addr`).
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `semoe_step_seconds` | histogram | | wall time of a committed step (including replays) |
//! | `semoe_tokens_per_second` | gauge | | training tokens of the last step over its wall time |
//! | `semoe_committed_step` | gauge | | the last step committed on every worker |
//! | `semoe_loss` | gauge | | mean cross-entropy of the last committed step |
//! | `semoe_expert_tokens_total` | counter | `block`, `expert` | tokens routed to (and kept by) each expert |
//! | `semoe_expert_dropped_total` | counter | `block` | assignments dropped for lack of capacity |
//! | `semoe_alltoall_bytes_total` | counter | `from`, `to`, `kind` | tensor bytes sent between workers (`kind`: `dispatch`, `combine`, `grad_dispatch`, `grad_combine`, `dense_grads`, `params`) |
//! | `semoe_restarts_total` | counter | `worker`, `actor` | actors restarted by their supervisor (`actor`: `expert`, `gate`, `tier`, `communicator`) |
//! | `semoe_replays_total` | counter | | steps rolled back and run again |
//! | `semoe_tier_bytes` | gauge | `worker`, `tier` | bytes of expert state held in each tier (`device`, `host`, `disk`) |
//! | `semoe_tier_served_total` | counter | `worker`, `tier` | expert acquisitions served from each tier (`disk`: a miss) |
//! | `semoe_tier_moved_bytes_total` | counter | `worker`, `from`, `to` | bytes of expert state moved between tiers |
//! | `semoe_prefetch_total` | counter | `worker`, `outcome` | experts prefetched (`issued`) and then used (`used`) |
//! | `semoe_tier_stall_microseconds_total` | counter | `worker` | wall time during which an expert acquisition waited for a unit not in memory |

/// Wall time of a committed step (seconds).
pub const STEP_SECONDS: &str = "semoe_step_seconds";
/// Training tokens per second of the last step.
pub const TOKENS_PER_SECOND: &str = "semoe_tokens_per_second";
/// The last committed step.
pub const COMMITTED_STEP: &str = "semoe_committed_step";
/// Mean cross-entropy of the last committed step.
pub const LOSS: &str = "semoe_loss";
/// Tokens kept by each expert (labels `block`, `expert`).
pub const EXPERT_TOKENS: &str = "semoe_expert_tokens_total";
/// Dropped assignments per MoE block (label `block`).
pub const EXPERT_DROPPED: &str = "semoe_expert_dropped_total";
/// Tensor bytes between workers (labels `from`, `to`, `kind`).
pub const ALLTOALL_BYTES: &str = "semoe_alltoall_bytes_total";
/// Actor restarts (labels `worker`, `actor`).
pub const RESTARTS: &str = "semoe_restarts_total";
/// Steps replayed after a failure.
pub const REPLAYS: &str = "semoe_replays_total";

/// Bytes of expert state per tier (labels `worker`, `tier`).
pub const TIER_BYTES: &str = "semoe_tier_bytes";
/// Expert acquisitions by the tier that served them (labels `worker`, `tier`).
pub const TIER_SERVED: &str = "semoe_tier_served_total";
/// Bytes moved between tiers (labels `worker`, `from`, `to`).
pub const TIER_MOVED_BYTES: &str = "semoe_tier_moved_bytes_total";
/// Prefetches issued and used (labels `worker`, `outcome`).
pub const PREFETCH: &str = "semoe_prefetch_total";
/// Microseconds acquirers waited for experts (label `worker`).
pub const TIER_STALL_MICROS: &str = "semoe_tier_stall_microseconds_total";

/// Register the descriptions of every metric with the installed recorder.
pub fn describe() {
    metrics::describe_histogram!(STEP_SECONDS, metrics::Unit::Seconds, "wall time of a committed step");
    metrics::describe_gauge!(TOKENS_PER_SECOND, "training tokens per second of the last step");
    metrics::describe_gauge!(COMMITTED_STEP, "the last step committed on every worker");
    metrics::describe_gauge!(LOSS, "mean cross-entropy of the last committed step");
    metrics::describe_counter!(EXPERT_TOKENS, "tokens kept by each expert");
    metrics::describe_counter!(EXPERT_DROPPED, "assignments dropped for lack of capacity");
    metrics::describe_counter!(
        ALLTOALL_BYTES,
        metrics::Unit::Bytes,
        "tensor bytes sent between workers"
    );
    metrics::describe_counter!(RESTARTS, "actors restarted by their supervisor");
    metrics::describe_counter!(REPLAYS, "steps rolled back and run again");
    metrics::describe_gauge!(
        TIER_BYTES,
        metrics::Unit::Bytes,
        "bytes of expert state held in each tier"
    );
    metrics::describe_counter!(TIER_SERVED, "expert acquisitions by the tier that served them");
    metrics::describe_counter!(
        TIER_MOVED_BYTES,
        metrics::Unit::Bytes,
        "bytes of expert state moved between tiers"
    );
    metrics::describe_counter!(PREFETCH, "experts prefetched (issued) and then used (used)");
    metrics::describe_counter!(
        TIER_STALL_MICROS,
        metrics::Unit::Microseconds,
        "time waiting for experts not in memory"
    );
}

/// Serve every metric as Prometheus text on `addr` (`HOST:PORT`, path `/metrics`). Call from
/// inside a tokio runtime; installs the global recorder, so only once per process.
pub fn serve_prometheus(addr: &str) -> crate::Result<()> {
    let socket: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| crate::Error::config(format!("--metrics-addr {addr:?} is not HOST:PORT: {e}")))?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(socket)
        .install()
        .map_err(|e| crate::Error::runtime(format!("cannot serve metrics on {addr}: {e}")))?;
    describe();
    Ok(())
}
