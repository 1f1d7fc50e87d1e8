//! `semoe serve`: an HTTP completion service for a checkpoint (see docs/serving.md), until SIGTERM
//! or Ctrl-C, which shut it down gracefully (exit 0).

use clap::Args;
use semoe::serve::{ServeConfig, Server};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Options of `semoe serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Address to listen on (HOST:PORT; port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Compute threads of the decoder.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The largest request body accepted, in bytes (413 beyond).
    #[arg(long, default_value_t = 64 * 1024)]
    max_request_bytes: usize,
    /// The longest prompt accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    max_prompt_bytes: usize,
    /// The most bytes one request may ask for (`max_tokens`).
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// How long a client may take to send its request, or leave a stream unread (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    client_timeout: Duration,
    /// Requests waiting for a batch slot beyond which new ones get 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// How long requests in flight may finish after SIGTERM or Ctrl-C before they are cancelled.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Connections open at once; one more gets 503 and is closed.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    #[command(flatten)]
    memory: super::generate::MemoryArgs,
}

pub fn run(a: &ServeArgs) -> semoe::Result<()> {
    let config = ServeConfig {
        addr: a.addr.clone(),
        max_batch: a.max_batch,
        threads: a.threads,
        queue: a.queue,
        max_request_bytes: a.max_request_bytes,
        max_prompt_bytes: a.max_prompt_bytes,
        max_tokens: a.max_tokens,
        client_timeout: a.client_timeout,
        grace: a.grace,
        max_connections: a.max_connections,
    };
    config.validate()?;
    // Bound before the checkpoint loads (which may take minutes): an address that cannot be had
    // is refused at once.
    let listener = semoe::serve::Listener::bind(&a.addr)?;
    let decoder: Box<dyn semoe::infer::Decode> = match a.memory.options(a.max_batch)? {
        None => {
            let ckpt = super::generate::checkpoint_to_read(&a.checkpoint)?;
            let model = semoe::train::trainer::model_from(ckpt)?;
            a.memory.check_cache(model.config(), a.max_batch)?;
            Box::new(semoe::infer::BatchDecoder::from_model(
                model,
                semoe::kernels::Cpu::new(a.threads)?,
                a.max_batch,
            )?)
        }
        Some(options) => {
            let file = semoe::infer::ModelFile::open(&a.checkpoint)?;
            a.memory.check_cache(file.config(), a.max_batch)?;
            let ring = semoe::infer::RingWeights::new(file, &options)?;
            let s = ring.stats();
            semoe::say!(
                "ring: {} sections of {} bytes ({} bytes on the Device side)",
                s.sections,
                s.section_bytes,
                s.device_bytes
            );
            Box::new(semoe::infer::BatchDecoder::with_source(
                ring,
                semoe::kernels::Cpu::new(a.threads)?,
                a.max_batch,
            )?)
        }
    };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| semoe::Error::runtime(format!("cannot start the tokio runtime: {e}")))?;
    tokio.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Signals are caught from before the address is printed, so that a SIGTERM right after is
        // a graceful shutdown and not the default (immediate) exit.
        let fail = |e: std::io::Error| semoe::Error::runtime(format!("cannot listen for signals: {e}"));
        let mut term = signal(SignalKind::terminate()).map_err(fail)?;
        let mut int = signal(SignalKind::interrupt()).map_err(fail)?;
        let handle = semoe::telemetry::metrics::install()?;
        semoe::telemetry::metrics::register_serve();
        let server = Server::with_listener(listener, decoder, config)?.with_metrics(handle);
        semoe::out!("listening on http://{}", server.local_addr());
        let _ = std::io::stdout().flush();
        server
            .run(async move {
                tokio::select! {
                    _ = term.recv() => semoe::say!("SIGTERM: shutting down (a second signal exits at once)"),
                    _ = int.recv() => semoe::say!("Ctrl-C: shutting down (a second signal exits at once)"),
                }
                // Tokio keeps its handlers installed: without this a second signal would be
                // swallowed until the grace period ends.
                tokio::spawn(async move {
                    let code = tokio::select! {
                        _ = term.recv() => 128 + 15,
                        _ = int.recv() => 128 + 2,
                    };
                    semoe::say!("a second signal: exiting at once");
                    std::process::exit(code);
                });
            })
            .await
    })
}
