//! `semoe serve`: text completion over HTTP, with continuous batching.
//!
//! The service is a library first, so that a program can embed it in its own tokio runtime
//! (`examples/serve.rs`); the command line only loads a checkpoint and waits for a signal.
//! [`Server::bind`] takes the address (port 0: the system picks one, see [`Server::local_addr`]),
//! [`Server::run`] serves until a future resolves, then shuts down: it stops accepting, lets the
//! requests in flight finish within [`ServeConfig::grace`], and cancels the rest.
//!
//! - [`http`]: the endpoints, the limits on requests, the connections and their shutdown.
//! - [`request`]: the body of `POST /v1/completions`, checked field by field.
//! - [`scheduler`]: the decoder thread (the batch, its queue, the channels to each request).
//! - [`stream`]: server-sent events and incremental UTF-8 decoding.
//!
//! `docs/serving.md` describes the endpoints, fields, limits, errors and metrics.

pub mod http;
pub mod request;
pub mod scheduler;
pub mod stream;

use crate::error::{Error, Result};
use crate::infer::{BatchDecoder, Decode};
use crate::kernels::Cpu;
use crate::model::gpt::Gpt;
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The settings of a server.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// `HOST:PORT` to listen on (port 0: any free port).
    pub addr: String,
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Compute threads of the decoder.
    pub threads: usize,
    /// Requests waiting for a batch slot beyond which new ones are refused with 503.
    pub queue: usize,
    /// The largest request body accepted (413 beyond).
    pub max_request_bytes: usize,
    /// The longest prompt accepted, in bytes.
    pub max_prompt_bytes: usize,
    /// The most bytes a request may ask for (`max_tokens`).
    pub max_tokens: usize,
    /// How long a client may take to send its request's headers or body, and how long a streaming
    /// client may leave its events unread before its sequence is cancelled.
    pub client_timeout: Duration,
    /// How long requests in flight may run on after shutdown begins before they are cancelled.
    pub grace: Duration,
    /// Connections open at once; one more is answered 503 and closed (each holds a file
    /// descriptor, and an idle keep-alive connection may be held for ever by a client that asks
    /// something every few seconds).
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            addr: "127.0.0.1:8080".into(),
            max_batch: 8,
            threads: 1,
            queue: 64,
            max_request_bytes: 64 * 1024,
            max_prompt_bytes: 16 * 1024,
            max_tokens: 2048,
            client_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            max_connections: 256,
        }
    }
}

/// The most connections a server may be asked to hold open at once (`max_connections`).
pub const MAX_CONNECTIONS: usize = 1 << 20;

impl ServeConfig {
    /// Refuse settings that cannot serve; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_batch", self.max_batch),
            ("threads", self.threads),
            ("queue", self.queue),
            ("max_request_bytes", self.max_request_bytes),
            ("max_tokens", self.max_tokens),
            ("max_connections", self.max_connections),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::config(format!("serve: {name} must be at least 1")));
            }
        }
        // (tokio's semaphore panics past `usize::MAX >> 3` permits; a process runs out of file
        // descriptors long before a million connections.)
        if self.max_connections > MAX_CONNECTIONS {
            return Err(Error::config(format!(
                "serve: max_connections must be at most {MAX_CONNECTIONS}, got {}",
                self.max_connections
            )));
        }
        if self.client_timeout.is_zero() {
            return Err(Error::config("serve: client_timeout must be longer than 0"));
        }
        // Added to instants: a duration beyond any clock's range panics there.
        for (name, value) in [("client_timeout", self.client_timeout), ("grace", self.grace)] {
            if value > crate::config::MAX_WAIT {
                return Err(Error::config(format!(
                    "serve: {name} must be at most a day, got {}",
                    humantime::format_duration(value)
                )));
            }
        }
        Ok(())
    }
}

/// A server's address, bound before its decoder exists ([`Server::with_listener`]): an address in
/// use is refused at once, while the socket listens only once the server is ready, so that a
/// client (or a TCP readiness probe) meanwhile is refused rather than left waiting on a model load.
pub struct Listener {
    socket: socket2::Socket,
    addr: SocketAddr,
}

impl Listener {
    /// Resolve `addr` (HOST:PORT; port 0: any free port) and bind the first of its addresses that
    /// binds; the error names the address.
    pub fn bind(addr: &str) -> Result<Listener> {
        let candidates: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| Error::config(format!("serve: --addr {addr:?} is not a HOST:PORT that resolves: {e}")))?
            .collect();
        let mut last = None;
        for candidate in &candidates {
            match bind_socket(*candidate) {
                Ok(socket) => {
                    let bound = socket
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .ok_or_else(|| Error::runtime("serve: cannot read the bound address"))?;
                    return Ok(Listener { socket, addr: bound });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => Error::runtime(format!("serve: cannot listen on {addr} ({candidates:?}): {e}")),
            None => Error::config(format!("serve: --addr {addr:?} resolves to no address")),
        })
    }

    /// The address it is bound to (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Start listening (non-blocking, for tokio).
    fn listen(self) -> Result<std::net::TcpListener> {
        let fail = |e: std::io::Error| Error::runtime(format!("serve: cannot listen on {}: {e}", self.addr));
        self.socket.listen(1024).map_err(fail)?;
        self.socket.set_nonblocking(true).map_err(fail)?;
        Ok(self.socket.into())
    }
}

/// A TCP socket bound to `addr` (with `SO_REUSEADDR`, as the standard library's listeners have
/// it on Unix: a restarted server rebinds past its old connections' TIME_WAIT).
fn bind_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A bound server, ready to [`Server::run`].
pub struct Server {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    config: ServeConfig,
    decoder: Box<dyn Decode>,
    metrics: Option<PrometheusHandle>,
}

impl Server {
    /// Check `config`, prepare the decoder for `model` and listen on `config.addr`.
    pub fn bind(model: &Gpt<f32>, config: ServeConfig) -> Result<Server> {
        config.validate()?;
        let decoder = BatchDecoder::new(model, Cpu::new(config.threads)?, config.max_batch)?;
        Server::bind_decoder(Box::new(decoder), config)
    }

    /// Listen on `config.addr` with a decoder of your own: a
    /// [`BatchDecoder::with_source`] over a [`RingWeights`](crate::infer::RingWeights) serves a
    /// checkpoint larger than memory (`semoe serve --device-budget`). Its batch size is the
    /// decoder's (it replaces `config.max_batch`); `config.threads` is not used.
    pub fn bind_decoder(decoder: Box<dyn Decode>, config: ServeConfig) -> Result<Server> {
        let listener = Listener::bind(&config.addr)?;
        Server::with_listener(listener, decoder, config)
    }

    /// Serve on a socket bound before the decoder was ready (`config.addr` is not used): a
    /// service whose model takes long to load binds first, so that an address it cannot have is
    /// refused at once and not after the load. The socket listens from here on: connections
    /// before were refused.
    pub fn with_listener(listener: Listener, decoder: Box<dyn Decode>, mut config: ServeConfig) -> Result<Server> {
        config.max_batch = decoder.max_batch();
        config.validate()?;
        let addr = listener.addr;
        Ok(Server {
            listener: listener.listen()?,
            addr,
            config,
            decoder,
            metrics: None,
        })
    }

    /// Answer `GET /metrics` from this recorder (see [`crate::telemetry::metrics::install`]);
    /// without one, `/metrics` answers 404.
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// The address it listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until `shutdown` resolves, then shut down gracefully: no new connections or requests,
    /// the requests in flight run on for up to [`ServeConfig::grace`], and those still running
    /// then end with an error event. Must run inside a tokio runtime (with the time driver); the
    /// decoder runs on a thread of its own.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Server {
            listener,
            addr,
            config,
            decoder,
            metrics,
        } = self;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| Error::runtime(format!("serve {addr}: cannot register the socket: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let vocab = decoder.vocab();
        let (scheduler, queue) =
            scheduler::Scheduler::new(decoder, config.queue, config.client_timeout, Arc::clone(&stop));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("semoe-serve-decoder".into())
            .spawn(move || {
                scheduler.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| Error::runtime(format!("serve: cannot start the decoder thread: {e}")))?;
        // The recorder keeps every histogram sample until a scrape or an upkeep drains it: without
        // this, a server nobody scrapes would grow by two samples a decoder step.
        // Aborted also when this future is dropped before its end (an embedder's `select!`).
        let upkeep = metrics.clone().map(|handle| {
            AbortOnDrop(tokio::spawn(async move {
                let mut every = tokio::time::interval(crate::telemetry::metrics::UPKEEP);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    handle.run_upkeep();
                }
            }))
        });
        let state = Arc::new(http::State {
            config: config.clone(),
            queue,
            metrics,
            vocab,
        });
        let connections = http::accept_until(listener, Arc::clone(&state), shutdown).await;
        drop(upkeep);
        // Grace is over (or every request is done): stop the decoder, which fails what it still holds.
        stop.store(true, Ordering::SeqCst);
        let stopped = tokio::time::timeout(DECODER_STOP, done_rx).await.is_ok();
        // Streams that were cancelled now write their error event and end; the rest are cut.
        http::finish(connections, CLOSE_WAIT).await;
        if !stopped {
            return Err(Error::runtime(format!(
                "serve: the decoder's step did not end within {} s of the shutdown; its thread is left behind",
                DECODER_STOP.as_secs()
            )));
        }
        // It has ended (or panicked): this does not wait.
        if thread.join().is_err() {
            return Err(Error::runtime("serve: the decoder thread panicked"));
        }
        Ok(())
    }
}

/// How long shutdown waits for the decoder thread's step in progress: longer than a ring's step
/// waits for a piece that does not come (its load deadline, then the step fails), so that the
/// step ends and fails the streams it holds with an error event rather than having them cut.
const DECODER_STOP: Duration = Duration::from_secs(crate::infer::ring::LOAD_DEADLINE.as_secs() + 10);
/// How long shutdown waits for cancelled streams to write their last event.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_cannot_serve_are_refused_by_name() {
        assert!(ServeConfig::default().validate().is_ok());
        let refused = |config: ServeConfig| config.validate().expect_err("refused").to_string();
        let e = refused(ServeConfig {
            max_batch: 0,
            ..ServeConfig::default()
        });
        assert!(e.contains("max_batch must be at least 1"), "{e}");
        let e = refused(ServeConfig {
            client_timeout: Duration::ZERO,
            ..ServeConfig::default()
        });
        assert!(e.contains("client_timeout must be longer than 0"), "{e}");
        // Durations added to an instant: one beyond a clock's range panicked at shutdown (grace)
        // or on every connection's first read (client_timeout).
        let e = refused(ServeConfig {
            grace: Duration::from_secs(u64::MAX),
            ..ServeConfig::default()
        });
        assert!(e.contains("grace must be at most a day"), "{e}");
        let e = refused(ServeConfig {
            client_timeout: crate::config::MAX_WAIT + Duration::from_secs(1),
            ..ServeConfig::default()
        });
        assert!(e.contains("client_timeout must be at most a day"), "{e}");
        assert!(ServeConfig {
            grace: crate::config::MAX_WAIT,
            ..ServeConfig::default()
        }
        .validate()
        .is_ok());
    }
}
