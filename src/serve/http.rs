//! The HTTP side: connections (hyper, HTTP/1.1), the routes, the limits on requests, and the
//! connections' part of a graceful shutdown.
//!
//! Nothing here computes: a completion request is checked, queued for the decoder thread, and its
//! events are relayed to the client, so tokio's threads stay free for connections.

use super::request::{self, Invalid};
use super::scheduler::{count_outcome, Event, FailureKind, Job, Queue, Refused, CHANNEL_EVENTS};
use super::stream::{finished_json, SseBody};
use super::ServeConfig;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// The body of every response: a whole document or a stream of events.
pub type Body = BoxBody<Bytes, Infallible>;

/// What every connection shares.
pub struct State {
    /// The server's settings.
    pub config: ServeConfig,
    /// The way to the decoder thread.
    pub queue: Queue,
    /// The recorder behind `/metrics`, if any.
    pub metrics: Option<PrometheusHandle>,
    /// The model's vocabulary: prompt bytes at or above it are refused.
    pub vocab: usize,
}

/// Accept connections until `shutdown` resolves; then refuse new requests, ask every connection to
/// close once its request in flight is answered, and wait up to the grace period for them. Answers
/// the connections still open.
pub async fn accept_until(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) -> JoinSet<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let open = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match Arc::clone(&open).try_acquire_owned() {
                    Ok(permit) => {
                        let (state, stop) = (Arc::clone(&state), stop_rx.clone());
                        connections.spawn(async move {
                            connection(stream, state, stop).await;
                            drop(permit);
                        });
                    }
                    Err(_) => refuse_connection(&stream, state.config.max_connections),
                },
                // Out of file descriptors, or a connection reset before it was accepted: wait a
                // little rather than spin, and go on.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            // Reap finished connections, so that the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    state.queue.close();
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + state.config.grace;
    while !connections.is_empty() {
        if tokio::time::timeout_at(deadline, connections.join_next())
            .await
            .is_err()
        {
            break;
        }
    }
    connections
}

/// Give the connections left `wait` to end, then cut them.
pub async fn finish(mut connections: JoinSet<()>, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while !connections.is_empty() {
        if tokio::time::timeout_at(deadline, connections.join_next())
            .await
            .is_err()
        {
            break;
        }
    }
    connections.shutdown().await;
}

/// A connection over the limit: a 503 written if the socket takes it at once (never waiting: the
/// accept loop must not stall on a client), then closed.
fn refuse_connection(stream: &tokio::net::TcpStream, limit: usize) {
    let body = format!(
        "{}\n",
        json!({ "error": format!("the server has {limit} connections open, its most: try again later") })
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

async fn connection(stream: tokio::net::TcpStream, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let header_timeout = state.config.client_timeout;
    let service = service_fn(move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(answer(request, &state).await) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    // A client that stops reading (its window closed, the socket open) would hold the connection
    // for ever: a write that cannot proceed within the client timeout ends it.
    let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
    stream.set_write_timeout(Some(header_timeout));
    let conn = http.serve_connection(TokioIo::new(Box::pin(stream)), service);
    tokio::pin!(conn);
    tokio::select! {
        // A client that went away or sent something that is not HTTP: nobody to tell.
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|stopping| *stopping) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// How much of a body beyond the limit is read and thrown away before the 413 is sent. A server
/// that answers and closes with the client's bytes unread makes its kernel reset the connection,
/// and the reset can reach the client before it reads the answer: it would see "connection reset"
/// and not why. Bodies larger than the limit by more than this are refused unread.
const DRAIN_BYTES: usize = 16 * 1024 * 1024;

/// Why a request body was not read.
enum BodyError {
    /// Larger than the limit (what arrived of it, up to [`DRAIN_BYTES`] more, was read and dropped).
    TooLarge,
    /// The connection failed or the body was malformed.
    Read(hyper::Error),
}

/// The request body, at most `limit` bytes. A larger one is read on (and dropped) up to
/// [`DRAIN_BYTES`] beyond the limit, so that the refusal reaches its client, and `over` is set;
/// the caller bounds the time.
async fn read_body(mut body: Incoming, limit: usize, over: &std::sync::atomic::AtomicBool) -> Result<Bytes, BodyError> {
    let mut kept = Vec::new();
    let mut dropped = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue; // trailers
        };
        if dropped == 0 && kept.len() + data.len() <= limit {
            kept.extend_from_slice(&data);
            continue;
        }
        dropped = dropped.saturating_add(data.len());
        over.store(true, Ordering::Relaxed);
        kept = Vec::new();
        if dropped > DRAIN_BYTES {
            break;
        }
    }
    if dropped > 0 {
        return Err(BodyError::TooLarge);
    }
    Ok(Bytes::from(kept))
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    full(status, "application/json", format!("{value}\n"))
}

/// An error as JSON: `{"error": message}`, with `"field"` when a request field is concerned.
fn error(status: StatusCode, message: &str, field: Option<&str>) -> Response<Body> {
    let mut value = json!({ "error": message });
    if let Some(f) = field {
        value["field"] = json!(f);
    }
    json_response(status, &value)
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed: use {allow}"),
        None,
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

async fn answer(request: Request<Incoming>, state: &State) -> Response<Body> {
    let get = request.method() == Method::GET || request.method() == Method::HEAD;
    match request.uri().path() {
        "/v1/completions" if request.method() == Method::POST => completion(request, state).await,
        "/v1/completions" => not_allowed("POST"),
        "/health" if get => health(state),
        "/metrics" if get => match &state.metrics {
            Some(handle) => crate::telemetry::metrics::render_response(handle).map(|b| b.boxed()),
            None => error(StatusCode::NOT_FOUND, "metrics are not enabled on this server", None),
        },
        "/health" | "/metrics" => not_allowed("GET, HEAD"),
        path => error(
            StatusCode::NOT_FOUND,
            &format!("not found: {path} (the endpoints are POST /v1/completions, GET /health, GET /metrics)"),
            None,
        ),
    }
}

/// `/health`: 200 while the server can serve (or is shutting down), 503 with the error when the
/// decoder's thread has stopped or its weights can no longer be read (a ring whose checkpoint
/// read failed or hung: for good), or when its last step failed (for [`FAILING_FOR`]), so that an
/// orchestrator restarts it.
fn health(state: &State) -> Response<Body> {
    let stats = state.queue.stats();
    // A decoder that cannot go on is said first, also while shutting down (the shutdown would
    // wait on it).
    let (status, label, error) = if stats.decoder_ended.load(Ordering::SeqCst) && !state.queue.is_closed() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "failed",
            Some("the decoder thread has stopped".to_string()),
        )
    } else if let Some(e) = stats.broken() {
        (StatusCode::SERVICE_UNAVAILABLE, "failed", Some(e))
    } else if let Some(ran) = stats.stalled(super::scheduler::STALLED_AFTER) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "failed",
            Some(format!(
                "a decoder step has run for {} s (a weight read that does not return?)",
                ran.as_secs()
            )),
        )
    } else if state.queue.is_closed() {
        (StatusCode::OK, "shutting_down", None)
    } else if let Some(e) = stats.last_error() {
        (StatusCode::SERVICE_UNAVAILABLE, "failing", Some(e))
    } else {
        (StatusCode::OK, "ok", None)
    };
    let mut value = json!({
            "status": label,
            "active": stats.active.load(Ordering::SeqCst),
            "queued": stats.queued.load(Ordering::SeqCst),
            "max_batch": state.config.max_batch,
            "peak_batch": stats.peak_batch.load(Ordering::SeqCst),
            "steps": stats.steps.load(Ordering::Relaxed),
            "generated_bytes": stats.generated_bytes.load(Ordering::Relaxed),
    });
    if let Some(e) = error {
        value["error"] = json!(e);
    }
    json_response(status, &value)
}

/// A refusal of a completion request, counted as `rejected`.
fn rejected(status: StatusCode, message: &str, field: Option<&str>) -> Response<Body> {
    count_outcome("rejected");
    error(status, message, field)
}

async fn completion(request: Request<Incoming>, state: &State) -> Response<Body> {
    let config = &state.config;
    let limit = config.max_request_bytes;
    let too_large = || {
        rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is larger than the limit of {limit} bytes (max_request_bytes)"),
            None,
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A body too large to be worth reading is refused at once (its client may see a reset
    // instead of the 413, as it would from any server); so is any body declared too large by a
    // client that waits for a `100 Continue` before sending it (reading would ask for it).
    let waits_to_send = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if declared.is_some_and(|n| n > limit.saturating_add(DRAIN_BYTES) as u64 || (waits_to_send && n > limit as u64)) {
        return too_large();
    }
    // Set once the body is known to be too large: a drain cut short by the timeout is still a 413.
    let over = std::sync::atomic::AtomicBool::new(declared.is_some_and(|n| n > limit as u64));
    let read = read_body(request.into_body(), limit, &over);
    let body = match tokio::time::timeout(config.client_timeout, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(BodyError::TooLarge)) => return too_large(),
        Err(_) if over.load(Ordering::Relaxed) => return too_large(),
        Ok(Err(BodyError::Read(e))) => {
            return rejected(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
                None,
            )
        }
        Err(_) => {
            return rejected(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the request body did not arrive within {} (client_timeout)",
                    humantime::format_duration(config.client_timeout)
                ),
                None,
            )
        }
    };
    let completion = match request::parse(&body, config) {
        Ok(c) => c,
        Err(Invalid { message, field }) => return rejected(StatusCode::BAD_REQUEST, &message, field),
    };
    if let Err(e) = crate::infer::batch::check_prompt(&completion.prompt, state.vocab) {
        let message = match e {
            crate::Error::Config(message) => message,
            other => other.to_string(),
        };
        return rejected(StatusCode::BAD_REQUEST, &message, Some("prompt"));
    }
    let (events, mut receiver) = mpsc::channel(CHANNEL_EVENTS);
    let job = Job {
        prompt: completion.prompt,
        opts: completion.opts,
        events,
        queued_at: Instant::now(),
    };
    match state.queue.submit(job) {
        Ok(()) => {}
        Err(Refused::Full) => {
            count_outcome("overloaded");
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "the server is busy: {} requests are already waiting (queue); retry later",
                    config.queue
                ),
                None,
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Err(Refused::Closed) => {
            count_outcome("shutdown");
            return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down", None);
        }
        Err(Refused::Stopped) => {
            count_outcome("error");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server cannot generate: its decoder thread has stopped",
                None,
            );
        }
    }
    if completion.stream {
        let mut response = Response::new(SseBody::new(receiver).boxed());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return response;
    }
    let mut bytes = Vec::new();
    loop {
        match receiver.recv().await {
            Some(Event::Bytes(b)) => bytes.extend_from_slice(&b),
            Some(Event::Done(f)) => {
                let mut value = finished_json(&f);
                value["text"] = json!(String::from_utf8_lossy(&bytes));
                value["bytes"] = json!(bytes);
                return json_response(StatusCode::OK, &value);
            }
            Some(Event::Failed(failure)) => {
                let status = match failure.kind {
                    FailureKind::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
                    FailureKind::Invalid => StatusCode::BAD_REQUEST,
                    FailureKind::Compute | FailureKind::Timeout => StatusCode::INTERNAL_SERVER_ERROR,
                };
                return error(status, &failure.message, None);
            }
            None => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "generation stopped unexpectedly",
                    None,
                )
            }
        }
    }
}
