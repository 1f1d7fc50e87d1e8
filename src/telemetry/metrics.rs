//! The runtime's metric names, in one place (recorded through the `metrics` crate; served as
//! Prometheus text with `--metrics-addr`, see [`serve_in_background`] and [`serve_prometheus`]).
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `semoe_step_seconds` | histogram | | wall time of a committed step (including replays) |
//! | `semoe_tokens_per_second` | gauge | | training tokens of the last step over its wall time |
//! | `semoe_committed_step` | gauge | | the last step committed on every worker |
//! | `semoe_loss` | gauge | | mean cross-entropy of the last committed step |
//! | `semoe_learning_rate` | gauge | | learning rate of the last committed step |
//! | `semoe_grad_norm` | gauge | | global gradient norm (before clipping) of the last committed step |
//! | `semoe_val_loss` | gauge | | mean cross-entropy of the last evaluation on the validation text |
//! | `semoe_expert_tokens_total` | counter | `block`, `expert` | tokens routed to (and kept by) each expert (`block`: the MoE block's ordinal among MoE blocks) |
//! | `semoe_expert_dropped_total` | counter | `block` | assignments dropped for lack of capacity |
//! | `semoe_alltoall_bytes_total` | counter | `from`, `to`, `kind` | tensor bytes sent between workers, a worker to itself included (`kind`: `dispatch`, `combine`, `grad_dispatch`, `grad_combine`, `dense_grads`, `params`, `dense_gather`) |
//! | `semoe_restarts_total` | counter | `worker`, `actor` | actors restarted by their supervisor (`actor`: `expert`, `gate`, `ledger`, `communicator`) |
//! | `semoe_replays_total` | counter | | steps rolled back and run again |
//! | `semoe_communicator_generations_total` | counter | | generations of lane communicators built (expert rows over collectives, `train.exchange`) |
//! | `semoe_tier_bytes` | gauge | `worker`, `tier` | bytes of expert state held in each tier (`device`, `host`, `disk`) |
//! | `semoe_tier_served_total` | counter | `worker`, `tier` | expert acquisitions served from each tier (`disk`: a miss) |
//! | `semoe_tier_moved_bytes_total` | counter | `worker`, `from`, `to` | bytes of expert state moved between tiers |
//! | `semoe_prefetch_total` | counter | `worker`, `outcome` | experts prefetched (`issued`) and then used (`used`) |
//! | `semoe_tier_stall_microseconds_total` | counter | `worker` | wall time during which an expert acquisition waited for a unit not in memory |
//! | `semoe_membership_epoch` | gauge | | the membership epoch of a multi-process run (1 for the first set of workers) |
//! | `semoe_members` | gauge | | worker processes in the current epoch |
//! | `semoe_membership_changes_total` | counter | `kind` | membership changes (`join`, `leave`, `crash`, `evicted`, `refused`) |
//! | `semoe_recovery_seconds` | histogram | | from noticing a change to the new epoch's first step being ready |
//! | `semoe_state_moved_bytes_total` | counter | | bytes of committed state sent to workers when epochs formed |
//! | `semoe_replayed_steps_total` | counter | | steps replayed after a lost worker |
//! | `semoe_serve_requests_total` | counter | `outcome` | completion requests of `semoe serve` by outcome (`ok`, `rejected`, `overloaded`, `cancelled`, `timeout`, `shutdown`, `error`) |
//! | `semoe_serve_active_sequences` | gauge | | sequences in the decoder's batch |
//! | `semoe_serve_queued_requests` | gauge | | requests waiting for a batch slot |
//! | `semoe_serve_generated_bytes_total` | counter | | bytes generated |
//! | `semoe_serve_batch_size` | histogram | | sequences in the batch at each decoder step |
//! | `semoe_serve_step_seconds` | histogram | | wall time of each decoder step |
//!
//! Every counter exists from the start at zero, with every label set known when the runtime
//! starts (its workers, MoE blocks and experts; see [`register`]; the membership counters when a
//! multi-process run's coordinator starts, [`register_membership`]), so that a scrape before the
//! first step, or a rate over a window in which nothing happened, sees the series rather than a
//! gap. The gauges appear with their first value: a zero loss or learning rate would be a lie.
//! The histograms have fixed buckets (`_bucket{le=...}`, so `histogram_quantile` works across
//! workers). Steps a multi-process run replays after a lost worker are reported once: the replay
//! records no step time, loss, committed step or expert load again (`semoe_replayed_steps_total`
//! counts it; the bytes it moves are counted, as they were moved).

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Wall time of a committed step (seconds).
pub const STEP_SECONDS: &str = "semoe_step_seconds";
/// Training tokens per second of the last step.
pub const TOKENS_PER_SECOND: &str = "semoe_tokens_per_second";
/// The last committed step.
pub const COMMITTED_STEP: &str = "semoe_committed_step";
/// Mean cross-entropy of the last committed step.
pub const LOSS: &str = "semoe_loss";
/// Learning rate of the last committed step.
pub const LEARNING_RATE: &str = "semoe_learning_rate";
/// Gradient norm (before clipping) of the last committed step.
pub const GRAD_NORM: &str = "semoe_grad_norm";
/// Mean cross-entropy of the last evaluation on the validation text.
pub const VAL_LOSS: &str = "semoe_val_loss";
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
/// Generations of lane communicators built when expert rows travel over collectives
/// (`train.exchange` `sim` or `nccl`): one, then one per replay after an aborted exchange.
pub const COMMUNICATOR_GENERATIONS: &str = "semoe_communicator_generations_total";

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
/// Gauge: the membership epoch of a multi-process run (1 for the first set of workers).
pub const EPOCH: &str = "semoe_membership_epoch";
/// Gauge: worker processes in the current epoch.
pub const MEMBERS: &str = "semoe_members";
/// Counter: membership changes, by `kind` ([`MEMBERSHIP_KINDS`]).
pub const MEMBERSHIP: &str = "semoe_membership_changes_total";
/// The kinds of [`MEMBERSHIP`].
pub const MEMBERSHIP_KINDS: [&str; 5] = ["join", "leave", "crash", "evicted", "refused"];
/// Histogram: seconds from noticing a change (a join, a leave, a lost worker) to the new epoch's
/// first step being ready (state moved and replayed).
pub const RECOVERY_SECONDS: &str = "semoe_recovery_seconds";
/// Counter: bytes of committed state sent to workers when epochs were formed.
pub const STATE_BYTES: &str = "semoe_state_moved_bytes_total";
/// Counter: steps replayed after a lost worker (from the last in-memory copy of the state).
pub const REPLAYED_STEPS: &str = "semoe_replayed_steps_total";

/// Counter: completion requests of `semoe serve` by `outcome` ([`SERVE_OUTCOMES`]).
pub const SERVE_REQUESTS: &str = "semoe_serve_requests_total";
/// Gauge: sequences in the serving decoder's batch.
pub const SERVE_ACTIVE: &str = "semoe_serve_active_sequences";
/// Gauge: completion requests waiting for a batch slot.
pub const SERVE_QUEUED: &str = "semoe_serve_queued_requests";
/// Counter: bytes generated by the serving decoder.
pub const SERVE_GENERATED_BYTES: &str = "semoe_serve_generated_bytes_total";
/// Histogram: sequences in the batch at each serving decoder step.
pub const SERVE_BATCH_SIZE: &str = "semoe_serve_batch_size";
/// Histogram: wall time of each serving decoder step (seconds).
pub const SERVE_STEP_SECONDS: &str = "semoe_serve_step_seconds";
/// The outcomes of [`SERVE_REQUESTS`]: completed, refused (4xx), queue full (503), client gone,
/// client too slow to read, stopped by a shutdown, failed in the decoder.
pub const SERVE_OUTCOMES: [&str; 7] = [
    "ok",
    "rejected",
    "overloaded",
    "cancelled",
    "timeout",
    "shutdown",
    "error",
];

/// Register the coordinator's membership counters at zero (every kind), so that a scrape before
/// the first change sees them. A multi-process run's coordinator calls this when it starts.
pub fn register_membership() {
    for kind in MEMBERSHIP_KINDS {
        metrics::counter!(MEMBERSHIP, "kind" => kind).increment(0);
    }
    metrics::counter!(STATE_BYTES).increment(0);
    metrics::counter!(REPLAYED_STEPS).increment(0);
}

/// Register the serving metrics at zero (the counters by outcome, the gauges), so that a scrape
/// before the first request sees them. `semoe serve` calls this when it starts.
pub fn register_serve() {
    for outcome in SERVE_OUTCOMES {
        metrics::counter!(SERVE_REQUESTS, "outcome" => outcome).increment(0);
    }
    metrics::counter!(SERVE_GENERATED_BYTES).increment(0);
    metrics::gauge!(SERVE_ACTIVE).increment(0.0);
    metrics::gauge!(SERVE_QUEUED).increment(0.0);
}

/// Register the descriptions of every metric with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(SERVE_REQUESTS, "completion requests by outcome");
    metrics::describe_gauge!(SERVE_ACTIVE, "sequences in the decoder's batch");
    metrics::describe_gauge!(SERVE_QUEUED, "completion requests waiting for a batch slot");
    metrics::describe_counter!(SERVE_GENERATED_BYTES, metrics::Unit::Bytes, "bytes generated");
    metrics::describe_histogram!(SERVE_BATCH_SIZE, "sequences in the batch at each decoder step");
    metrics::describe_histogram!(
        SERVE_STEP_SECONDS,
        metrics::Unit::Seconds,
        "wall time of each decoder step"
    );
    metrics::describe_gauge!(EPOCH, "membership epoch of a multi-process run");
    metrics::describe_gauge!(MEMBERS, "worker processes in the current membership epoch");
    metrics::describe_counter!(
        MEMBERSHIP,
        "membership changes by kind (join, leave, crash, evicted, refused)"
    );
    metrics::describe_histogram!(
        RECOVERY_SECONDS,
        metrics::Unit::Seconds,
        "from a membership change to the new epoch ready"
    );
    metrics::describe_counter!(
        STATE_BYTES,
        metrics::Unit::Bytes,
        "committed state sent to workers when epochs formed"
    );
    metrics::describe_counter!(REPLAYED_STEPS, "steps replayed after a lost worker");
    metrics::describe_histogram!(STEP_SECONDS, metrics::Unit::Seconds, "wall time of a committed step");
    metrics::describe_gauge!(TOKENS_PER_SECOND, "training tokens per second of the last step");
    metrics::describe_gauge!(COMMITTED_STEP, "the last step committed on every worker");
    metrics::describe_gauge!(LOSS, "mean cross-entropy of the last committed step");
    metrics::describe_gauge!(LEARNING_RATE, "learning rate of the last committed step");
    metrics::describe_gauge!(GRAD_NORM, "gradient norm (before clipping) of the last committed step");
    metrics::describe_gauge!(
        VAL_LOSS,
        "mean cross-entropy of the last evaluation on the validation text"
    );
    metrics::describe_counter!(EXPERT_TOKENS, "tokens kept by each expert");
    metrics::describe_counter!(EXPERT_DROPPED, "assignments dropped for lack of capacity");
    metrics::describe_counter!(
        ALLTOALL_BYTES,
        metrics::Unit::Bytes,
        "tensor bytes sent between workers"
    );
    metrics::describe_counter!(RESTARTS, "actors restarted by their supervisor");
    metrics::describe_counter!(REPLAYS, "steps rolled back and run again");
    metrics::describe_counter!(
        COMMUNICATOR_GENERATIONS,
        "generations of lane communicators built (expert rows over collectives)"
    );
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

/// The kinds of [`ALLTOALL_BYTES`] (what the bytes carried).
pub const ALLTOALL_KINDS: [&str; 7] = [
    "dispatch",
    "combine",
    "grad_dispatch",
    "grad_combine",
    "dense_grads",
    "params",
    "dense_gather",
];
/// The actors of [`RESTARTS`].
pub const RESTART_ACTORS: [&str; 4] = ["expert", "gate", "ledger", "communicator"];
/// The tiers of [`TIER_SERVED`] and [`TIER_MOVED_BYTES`].
pub const TIERS: [&str; 3] = ["device", "host", "disk"];
/// The outcomes of [`PREFETCH`].
pub const PREFETCH_OUTCOMES: [&str; 2] = ["issued", "used"];

/// The label values of the labelled counters that are known when a runtime starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Workers of the runtime (labels `worker`, `from`, `to`).
    pub workers: usize,
    /// MoE blocks of the model (label `block`).
    pub moe_blocks: usize,
    /// Experts per MoE block (label `expert`).
    pub experts: usize,
}

/// The layout of the last runtime started. A program that builds its runtime before it installs a
/// recorder (an embedder; `semoe train` installs it first) registered its zeros with no recorder:
/// [`install`] registers them again from here. Process-wide, like the recorder itself.
static LAYOUT: Mutex<Option<Layout>> = Mutex::new(None);

/// Register every counter at zero for a runtime of this layout (and remember the layout for a
/// recorder installed later). The runtime calls this when it starts.
pub fn register(layout: Layout) {
    *LAYOUT.lock().unwrap_or_else(PoisonError::into_inner) = Some(layout);
    register_zeros(layout);
}

/// `increment(0)` creates a counter's series without changing it. The labels must be given in the
/// order (and with the values) the recording sites use, or the series would be a different one.
fn register_zeros(l: Layout) {
    metrics::counter!(REPLAYS).increment(0);
    metrics::counter!(COMMUNICATOR_GENERATIONS).increment(0);
    for b in 0..l.moe_blocks {
        let block = b.to_string();
        metrics::counter!(EXPERT_DROPPED, "block" => block.clone()).increment(0);
        for e in 0..l.experts {
            metrics::counter!(EXPERT_TOKENS, "block" => block.clone(), "expert" => e.to_string()).increment(0);
        }
    }
    for w in 0..l.workers {
        let worker = w.to_string();
        for to in 0..l.workers {
            for kind in ALLTOALL_KINDS {
                metrics::counter!(ALLTOALL_BYTES, "from" => worker.clone(), "to" => to.to_string(), "kind" => kind)
                    .increment(0);
            }
        }
        for actor in RESTART_ACTORS {
            metrics::counter!(RESTARTS, "worker" => worker.clone(), "actor" => actor).increment(0);
        }
        for tier in TIERS {
            metrics::counter!(TIER_SERVED, "worker" => worker.clone(), "tier" => tier).increment(0);
            for to in TIERS.into_iter().filter(|&to| to != tier) {
                metrics::counter!(TIER_MOVED_BYTES, "worker" => worker.clone(), "from" => tier, "to" => to)
                    .increment(0);
            }
        }
        for outcome in PREFETCH_OUTCOMES {
            metrics::counter!(PREFETCH, "worker" => worker.clone(), "outcome" => outcome).increment(0);
        }
        metrics::counter!(TIER_STALL_MICROS, "worker" => worker).increment(0);
    }
}

/// Record the loss of an evaluation on the validation text ([`VAL_LOSS`]). The trainer calls it:
/// evaluation runs outside the runtime's steps, so the runtime never sees this loss.
pub fn record_validation(loss: f64) {
    metrics::gauge!(VAL_LOSS).set(loss);
}

/// Install the Prometheus recorder as the process's global recorder, describe every metric and
/// register the counters of the last runtime started at zero; answer the handle that renders them.
/// Only once per process (the `metrics` crate has one global recorder): a second call is an error.
pub fn install() -> crate::Result<PrometheusHandle> {
    let handle = builder()?
        .install_recorder()
        .map_err(|e| crate::Error::runtime(format!("cannot install the metrics recorder: {e}")))?;
    describe();
    let layout = *LAYOUT.lock().unwrap_or_else(PoisonError::into_inner);
    register_zeros(layout.unwrap_or_default());
    Ok(handle)
}

/// The bucket bounds of each histogram: without them the exporter renders a histogram as a
/// summary (quantiles over its last minute), which cannot be aggregated across workers or queried
/// with `histogram_quantile`, and forgets a rare recovery after a minute.
const BUCKETS: [(&str, &[f64]); 4] = [
    (
        STEP_SECONDS,
        &[
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
        ],
    ),
    (
        RECOVERY_SECONDS,
        &[0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0],
    ),
    (SERVE_BATCH_SIZE, &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
    (
        SERVE_STEP_SECONDS,
        &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
    ),
];

/// The recorder's builder, with every histogram's buckets ([`BUCKETS`]).
fn builder() -> crate::Result<PrometheusBuilder> {
    let mut builder = PrometheusBuilder::new();
    for (name, bounds) in BUCKETS {
        builder = builder
            .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(name.into()), bounds)
            .map_err(|e| crate::Error::runtime(format!("cannot set the buckets of {name}: {e}")))?;
    }
    Ok(builder)
}

/// How often the recorder's histograms are drained (which the exporter's own `install` would do
/// on its own thread): a scrape drains them too, this bounds their memory when nobody scrapes.
pub const UPKEEP: Duration = Duration::from_secs(5);
/// How long a client may take to send a request's headers, or to take an answer's bytes, so that
/// idle or stuck connections do not pile up.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; one more is closed as soon as it is accepted (each holds a file
/// descriptor the training run needs for its checkpoints and logs).
const MAX_CONNECTIONS: usize = 64;

/// How an endpoint bounds its clients ([`CLIENT_TIMEOUT`], [`MAX_CONNECTIONS`]; tests shorten them).
#[derive(Clone, Copy, Debug)]
struct Limits {
    client_timeout: Duration,
    max_connections: usize,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        client_timeout: CLIENT_TIMEOUT,
        max_connections: MAX_CONNECTIONS,
    };
}

/// A running `/metrics` endpoint (see [`serve`]). Dropping it leaves the endpoint running until
/// its tokio runtime shuts down; [`MetricsServer::shutdown`] stops it at once.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting connections (those open end with the runtime, or when their client closes).
    pub fn shutdown(self) {
        self.task.abort();
    }
}

/// Resolve `addr` (a host name or an IP address, and a port) and listen on the first of its
/// addresses that binds. Errors name `--metrics-addr`, the only way a user gives this address.
fn bind(addr: &str) -> crate::Result<std::net::TcpListener> {
    let candidates: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| crate::Error::config(format!("--metrics-addr {addr:?} is not a HOST:PORT that resolves: {e}")))?
        .collect();
    if candidates.is_empty() {
        return Err(crate::Error::config(format!(
            "--metrics-addr {addr:?} resolves to no address"
        )));
    }
    let listener = std::net::TcpListener::bind(&candidates[..])
        .map_err(|e| crate::Error::runtime(format!("--metrics-addr {addr}: cannot listen on {candidates:?}: {e}")))?;
    // Tokio needs a non-blocking socket.
    listener
        .set_nonblocking(true)
        .map_err(|e| crate::Error::runtime(format!("--metrics-addr {addr}: cannot configure the socket: {e}")))?;
    Ok(listener)
}

/// Check that `addr` is a `HOST:PORT` that resolves and can be listened on now, before anything is
/// started: a port in use is refused before a run directory is made (the endpoint itself binds
/// later, on its own thread, [`serve_in_background`]; the test listener is closed at once).
pub fn check_addr(addr: &str) -> crate::Result<()> {
    bind(addr).map(drop)
}

/// Run the endpoint on `listener` as a task of the current tokio runtime, so that it stops with
/// that runtime (and never holds the process open).
fn spawn(listener: std::net::TcpListener, handle: PrometheusHandle) -> crate::Result<MetricsServer> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| crate::Error::runtime(format!("the metrics endpoint needs a tokio runtime: {e}")))?;
    spawn_on(&runtime, listener, handle)
}

fn spawn_on(
    runtime: &tokio::runtime::Handle,
    listener: std::net::TcpListener,
    handle: PrometheusHandle,
) -> crate::Result<MetricsServer> {
    let addr = listener
        .local_addr()
        .map_err(|e| crate::Error::runtime(format!("--metrics-addr: cannot read the bound address: {e}")))?;
    let _entered = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| crate::Error::runtime(format!("--metrics-addr {addr}: cannot register the socket: {e}")))?;
    let task = runtime.spawn(accept_loop(listener, handle, Limits::DEFAULT));
    Ok(MetricsServer { addr, task })
}

/// Serve `handle`'s metrics as Prometheus text at `http://addr/metrics` (404 for other paths, 405
/// for methods other than GET and HEAD), on the current tokio runtime. Separate from [`install`]
/// so that a process (a test) can serve its one recorder more than once.
pub fn serve(addr: &str, handle: PrometheusHandle) -> crate::Result<MetricsServer> {
    spawn(bind(addr)?, handle)
}

/// An endpoint serving every metric from a thread of its own ([`serve_in_background`]): it
/// answers while the trainer waits for workers or computes, and a scrape never takes the
/// runtime's own threads. Dropping it stops the endpoint; drop it outside an async context (it
/// owns a tokio runtime, which cannot be dropped inside another's task).
#[derive(Debug)]
pub struct BackgroundMetrics {
    server: MetricsServer,
    _runtime: tokio::runtime::Runtime,
}

impl BackgroundMetrics {
    /// The address it listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}

/// Install the global recorder and serve every metric as Prometheus text on `addr` (`HOST:PORT`,
/// path `/metrics`) from a thread of its own, until the result is dropped: `semoe train
/// --metrics-addr`, called before the runtime starts so that nothing it records is lost (the
/// epoch and members of a run whose membership never changes were). Only once per process; the
/// address is bound before the recorder is installed, so that a bad one leaves nothing behind.
pub fn serve_in_background(addr: &str) -> crate::Result<BackgroundMetrics> {
    let listener = bind(addr)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("semoe-metrics")
        .enable_all()
        .build()
        .map_err(|e| crate::Error::runtime(format!("--metrics-addr: cannot start the endpoint's thread: {e}")))?;
    let handle = install()?;
    let server = spawn_on(runtime.handle(), listener, handle)?;
    Ok(BackgroundMetrics {
        server,
        _runtime: runtime,
    })
}

/// Serve every metric as Prometheus text on `addr` (`HOST:PORT`, path `/metrics`) until the current
/// tokio runtime shuts down. Call from inside a tokio runtime; installs the global recorder, so only
/// once per process. The address is bound before the recorder is installed, so that a bad address
/// leaves nothing behind.
pub fn serve_prometheus(addr: &str) -> crate::Result<()> {
    let listener = bind(addr)?;
    let handle = install()?;
    spawn(listener, handle)?;
    Ok(())
}

async fn accept_loop(listener: tokio::net::TcpListener, handle: PrometheusHandle, limits: Limits) {
    let mut upkeep = tokio::time::interval(UPKEEP);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        tokio::select! {
            _ = upkeep.tick() => handle.run_upkeep(),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Past the cap the connection is closed at once (dropped).
                    if let Ok(permit) = Arc::clone(&open).try_acquire_owned() {
                        let handle = handle.clone();
                        tokio::spawn(async move {
                            connection(stream, handle, limits.client_timeout).await;
                            drop(permit);
                        });
                    }
                }
                // Out of file descriptors, or a connection reset before it was accepted: wait a
                // little rather than spin, and go on (the endpoint must not end training).
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
        }
    }
}

async fn connection(stream: tokio::net::TcpStream, handle: PrometheusHandle, client_timeout: Duration) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = answer(&request, &handle);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(client_timeout);
    // A client that stops reading (requests pipelined, answers never taken) would hold the
    // connection for ever: a write that cannot proceed within the timeout ends it.
    let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
    stream.set_write_timeout(Some(client_timeout));
    // A client that went away or sent something that is not HTTP: nobody to tell.
    let _ = http.serve_connection(TokioIo::new(Box::pin(stream)), service).await;
}

fn answer(request: &Request<Incoming>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET\n".into());
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    render_response(handle)
}

/// A `200 OK` with every metric as Prometheus text: the answer to `GET /metrics`, here and in other
/// servers of the process (`semoe serve`).
pub fn render_response(handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(handle.render())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// An endpoint with `limits` over a recorder of its own holding `series` counters, on a
    /// runtime of its own (dropped with it).
    fn endpoint(limits: Limits, series: usize) -> (tokio::runtime::Runtime, SocketAddr) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for i in 0..series {
                metrics::counter!("semoe_test_series_with_a_long_name_total", "index" => i.to_string()).increment(1);
            }
        });
        let listener = bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let _entered = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).expect("register");
        runtime.spawn(accept_loop(listener, handle, limits));
        (runtime, addr)
    }

    const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n";

    /// Whether a fresh connection gets its scrape answered (within 5 s).
    fn scraped(addr: SocketAddr) -> bool {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let request = b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        if s.write_all(request).is_err() {
            return false;
        }
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer.starts_with(b"HTTP/1.1 200 OK")
    }

    /// Whether the server closes `s` (end of file or a reset) within 5 s.
    fn closed(s: &mut TcpStream) -> bool {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn connections_past_the_cap_are_closed_and_a_freed_place_is_served() {
        let limits = Limits {
            client_timeout: Duration::from_secs(30),
            max_connections: 1,
        };
        let (_runtime, addr) = endpoint(limits, 1);
        let idle = TcpStream::connect(addr).expect("connect");
        std::thread::sleep(Duration::from_millis(200));
        let mut over = TcpStream::connect(addr).expect("connect");
        assert!(closed(&mut over), "a connection past the cap is closed at once");
        drop(idle);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !scraped(addr) {
            assert!(
                std::time::Instant::now() < deadline,
                "the place of a closed connection is not freed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_client_that_stops_reading_is_cut_off_after_the_timeout() {
        let limits = Limits {
            client_timeout: Duration::from_millis(300),
            max_connections: 1,
        };
        // About 100 KB an answer: the pipelined answers overflow the socket buffers.
        let (_runtime, addr) = endpoint(limits, 1500);
        let mut stuck = TcpStream::connect(addr).expect("connect");
        stuck.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
        // Requests pipelined, answers never read: the server's writes stop, then time out.
        for _ in 0..1000 {
            if stuck.write_all(GET).is_err() {
                break;
            }
        }
        // Its place freed, the endpoint serves another client.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !scraped(addr) {
            assert!(
                std::time::Instant::now() < deadline,
                "a client that stopped reading still holds the only place"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(stuck);
    }
}
