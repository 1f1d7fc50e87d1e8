//! `semoe worker`: a worker process that joins a run over QUIC and trains with it until the run
//! ends or it is asked to leave (SIGINT/SIGTERM: its state moves to the others at the next step
//! boundary, then it exits 0; a second signal exits at once).

use clap::Args;
use semoe::elastic::worker::{run_worker, WorkerEnd, WorkerOptions};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The run's join ticket (`RUN_DIR/join.ticket`, written by `semoe train --listen` or
    /// `--processes`): the coordinator's address, the secret token and the certificate to pin.
    #[arg(long, value_name = "FILE")]
    ticket: PathBuf,
    /// The coordinator's address, when it differs from the ticket's (a NAT, a Service name).
    #[arg(long, value_name = "HOST:PORT")]
    join: Option<String>,
    /// Compute threads (default: the run's train.threads). Threads never change the bits.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// This worker's own config file: refused unless every field that changes the bits matches
    /// the run's. Its train.threads and train.data apply (as --threads and --data, which win);
    /// every other field is the run's (one set otherwise is said).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The training text on this machine (default: the run's train.data, or the bundled corpus);
    /// its SHA-256 must match the run's.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The IP address peers reach this worker at (default: the one it reaches the coordinator from).
    #[arg(long)]
    advertise: Option<IpAddr>,
    /// Where the Disk tier's scratch goes: the worker makes a folder semoe-worker-PID-RANDOM of its own
    /// inside it, removed when it ends (default: the system's temporary directory).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Serve this worker's metrics as Prometheus text on HOST:PORT (path /metrics; port 0: the OS
    /// chooses and the address is printed): all-to-all bytes per peer and kind, restarts, tiers.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// The GPU of this worker's NCCL ranks, when the run exchanges expert rows over NCCL
    /// (`train --exchange nccl`; `train --processes N` puts its i-th worker on GPU i) [default: 0].
    /// Given for a run that exchanges otherwise, the worker says it is unused.
    #[arg(long)]
    gpu: Option<usize>,
}

pub fn run(a: &WorkerArgs) -> semoe::Result<std::process::ExitCode> {
    let stop = Arc::new(AtomicUsize::new(0));
    let _signals = super::train::install_stop_signals(&stop)?;
    let options = WorkerOptions {
        ticket: a.ticket.clone(),
        join: a.join.clone(),
        threads: a.threads,
        config: a.config.clone(),
        data: a.data.clone(),
        advertise: a.advertise,
        scratch: a.scratch.clone(),
        metrics_addr: a.metrics_addr.clone(),
        gpu: a.gpu,
    };
    match run_worker(options, stop)? {
        WorkerEnd::Left(reason) => {
            semoe::say!("semoe worker: done ({reason})");
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

/// `semoe ticket`: make a job identity and join ticket before a run.
#[derive(Args, Debug)]
pub struct TicketArgs {
    /// Directory to write `job.identity` (certificate and private key) and `join.ticket` into
    /// (both mode 0600). Give the directory to `semoe train --identity DIR` and the ticket to the
    /// workers (for example as a Kubernetes Secret).
    #[arg(long)]
    out: PathBuf,
    /// The address workers dial (written in the ticket; `semoe worker --join` overrides it, with a
    /// name if you like).
    #[arg(long, value_name = "IP:PORT")]
    addr: std::net::SocketAddr,
    /// Replace an identity and ticket already in --out (every ticket made for the old identity
    /// then stops working).
    #[arg(long)]
    force: bool,
}

pub fn ticket(a: &TicketArgs) -> semoe::Result<()> {
    use semoe::elastic::cluster::{IDENTITY_FILE, TICKET_FILE};
    if !a.force {
        if let Some(file) = [IDENTITY_FILE, TICKET_FILE].iter().find(|f| a.out.join(f).exists()) {
            return Err(semoe::Error::config(format!(
                "{} exists: a new identity would make every ticket made for the old one stop working; give \
                 --force to replace it, or another --out",
                a.out.join(file).display()
            )));
        }
    }
    let t = semoe::elastic::cluster::make_identity(&a.out, a.addr)?;
    semoe::say!(
        "wrote {} and {} (certificate SHA-256 {})",
        a.out.join(semoe::elastic::cluster::IDENTITY_FILE).display(),
        a.out.join(semoe::elastic::cluster::TICKET_FILE).display(),
        t.cert_sha256
    );
    Ok(())
}
