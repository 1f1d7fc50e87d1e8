//! The actor runtime a [`Trainer`](super::Trainer) drives (with `train.workers > 0`, or over
//! worker processes with `train.listen`/`train.processes`), on its own tokio runtime.

use crate::actors::gather::DenseStats;
use crate::actors::{ExpertPlacement, Runtime, StepOutcome};
use crate::config::TrainConfig;
use crate::data::corpus::Corpus;
use crate::elastic::cluster::{Cluster, ExitWatch};
use crate::elastic::runtime::{ElasticOptions, ElasticRuntime, MembershipStats};
use crate::error::{Error, Result};
use crate::model::gpt::Gpt;
use crate::optimizer::AdamW;
use crate::storage::run_dir;
use crate::storage::tiers::TierStats;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::elastic::cluster::TICKET_FILE;

enum Kind {
    Local(Box<Runtime>),
    Elastic(Box<ElasticRuntime>),
}

/// The engine's own async runtime. A [`Trainer`](super::Trainer) is a blocking API, and an
/// embedder may call it from async code: there tokio refuses a `block_on` and a blocking drop of
/// a runtime (it panics), so from inside one the futures run on a thread of their own and the
/// runtime is shut down in the background.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn get(&self) -> &tokio::runtime::Runtime {
        match &self.0 {
            Some(rt) => rt,
            None => unreachable!("the engine's runtime is taken only when it is dropped"),
        }
    }

    /// Run `f` to its end on this runtime.
    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let rt = self.get();
        if tokio::runtime::Handle::try_current().is_err() {
            return rt.block_on(f);
        }
        std::thread::scope(|scope| match scope.spawn(|| rt.block_on(f)).join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.get().spawn(f)
    }

    fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.get().enter()
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            }
        }
    }
}

/// A running actor runtime and the async runtime it lives on.
pub(crate) struct RuntimeEngine {
    tokio: OwnRuntime,
    kind: Option<Kind>,
    /// Worker processes this run started (reaped when it ends; watched while it runs).
    children: Arc<Mutex<Vec<Child>>>,
    /// The task that watches them.
    exit_watch: Option<tokio::task::JoinHandle<()>>,
    /// Whether the trainer's copy of the model lags behind the runtime's committed state.
    pub stale: bool,
    /// The run directory's join ticket when it holds a `train.identity`'s long-lived token:
    /// removed when the run ends, so that an archived or shared run directory does not admit
    /// to later runs of that identity (a run's own token dies with its run).
    identity_ticket: Option<PathBuf>,
}

impl RuntimeEngine {
    /// Start the runtime `config` asks for, from `model` and `optimizer`.
    pub fn start(
        config: &TrainConfig,
        corpus: &Corpus,
        model: &Gpt<f32>,
        optimizer: &AdamW,
        run_dir: &Path,
    ) -> Result<Self> {
        // One async thread in-process: it only moves messages (kernels run on the compute pool), and
        // a second one competed with the compute threads for the cores: 5% fewer tokens/s on two
        // cores (BENCHMARKS.md). Over processes it also runs QUIC: see `elastic::async_threads`.
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(if config.train.elastic() {
                crate::elastic::async_threads()
            } else {
                1
            })
            .thread_name("semoe-async")
            .enable_all()
            .build()
            .map_err(|e| Error::runtime(format!("cannot start the async runtime: {e}")))?;
        let mut engine = RuntimeEngine {
            tokio: OwnRuntime(Some(tokio)),
            kind: None,
            children: Arc::new(Mutex::new(Vec::new())),
            exit_watch: None,
            stale: false,
            identity_ticket: None,
        };
        if config.train.elastic() {
            engine.start_elastic(config, corpus, model, optimizer, run_dir)?;
        } else {
            let builder = Runtime::builder(config.clone())
                .workers(config.train.workers)
                .placement(config.train.placement.parse::<ExpertPlacement>()?)
                .deadline(Duration::from_secs_f64(config.train.deadline_s))
                .shared_text(corpus.train.clone())
                .storage(config.storage.to_config(Some(run_dir.join(run_dir::TIERS_DIR)))?)
                .state(model.clone(), optimizer.clone());
            engine.kind = Some(Kind::Local(Box::new(engine.tokio.block_on(builder.build())?)));
        }
        Ok(engine)
    }

    fn start_elastic(
        &mut self,
        config: &TrainConfig,
        corpus: &Corpus,
        model: &Gpt<f32>,
        optimizer: &AdamW,
        run_dir: &Path,
    ) -> Result<()> {
        let t = &config.train;
        let listen = t.listen_addr()?;
        crate::elastic::runtime::check_nccl(config)?;
        check_local_processes(t.processes)?;
        let ticket = run_dir.join(TICKET_FILE);
        if t.identity.is_some() {
            self.identity_ticket = Some(ticket.clone());
        }
        let cluster = {
            let _guard = self.tokio.enter();
            Cluster::start(listen, &ticket, config, &corpus.digest())?
        };
        crate::say!(
            "semoe: coordinator listening on {}; workers join with `semoe worker --ticket {}`",
            cluster.addr(),
            ticket.display()
        );
        let threads = crate::kernels::cpu::threads_each(t.threads, t.processes);
        // Over NCCL, the i-th worker process started here on GPU i.
        let nccl = t.exchange == crate::config::ExpertExchange::Nccl;
        for i in 0..t.processes {
            let scratch = run_dir.join(run_dir::TIERS_DIR).join(format!("process-{i}"));
            let child = spawn_worker(&ticket, &scratch, threads, nccl.then_some(i), false)?;
            lock(&self.children).push(child);
        }
        if t.processes > 0 {
            self.exit_watch = Some(
                self.tokio
                    .spawn(watch_exits(self.children.clone(), cluster.exit_watch())),
            );
        }
        let options = ElasticOptions {
            snapshot_every: t.snapshot_every,
            wait: Duration::from_secs_f64(t.join_wait_s),
            min_workers: if t.min_workers > 0 {
                t.min_workers
            } else {
                t.processes.max(1)
            },
            ..ElasticOptions::default()
        };
        let started = Instant::now();
        let runtime = self.tokio.block_on(ElasticRuntime::start(
            cluster,
            config.clone(),
            model.clone(),
            optimizer.clone(),
            options,
        ))?;
        crate::say!(
            "semoe: {} worker processes ready in {:.1} s",
            runtime.stats().members,
            started.elapsed().as_secs_f64()
        );
        self.kind = Some(Kind::Elastic(Box::new(runtime)));
        Ok(())
    }

    /// The flag that asks the run to stop (see `Trainer::stop_flag`): a run over worker processes
    /// waiting for a joiner stops waiting once it is set.
    pub fn set_stop_flag(&mut self, flag: Arc<std::sync::atomic::AtomicUsize>) {
        if let Some(Kind::Elastic(r)) = &mut self.kind {
            r.set_stop_flag(flag);
        }
    }

    /// Whether a run over worker processes has no epoch (every worker left or was lost, and none
    /// joined): its state is the one the coordinator kept.
    pub fn without_workers(&self) -> bool {
        matches!(&self.kind, Some(Kind::Elastic(r)) if !r.has_epoch())
    }

    /// Run one step to its commit.
    pub fn step(&mut self) -> Result<StepOutcome> {
        self.stale = true;
        match &mut self.kind {
            Some(Kind::Local(r)) => self.tokio.block_on(r.step()),
            Some(Kind::Elastic(r)) => self.tokio.block_on(r.step()),
            None => Err(Error::runtime("the runtime has stopped")),
        }
    }

    /// The committed state.
    pub fn state(&mut self) -> Result<(Gpt<f32>, AdamW)> {
        match &mut self.kind {
            Some(Kind::Local(r)) => self.tokio.block_on(r.state()),
            Some(Kind::Elastic(r)) => self.tokio.block_on(r.state()),
            None => Err(Error::runtime("the runtime has stopped")),
        }
    }

    /// Wait until the in-process workers' expert stores have no disk work left (a no-op over
    /// worker processes, whose stores are theirs).
    pub fn storage_idle(&self) -> Result<()> {
        match &self.kind {
            Some(Kind::Local(r)) => self.tokio.block_on(r.storage_idle()),
            _ => Ok(()),
        }
    }

    /// Each in-process worker's expert-store figures.
    pub fn tier_stats(&self) -> Vec<TierStats> {
        match &self.kind {
            Some(Kind::Local(r)) => r.tier_stats(),
            _ => Vec::new(),
        }
    }

    /// Each in-process worker's dense-parameter figures.
    pub fn dense_stats(&self) -> Vec<DenseStats> {
        match &self.kind {
            Some(Kind::Local(r)) => r.dense_stats(),
            _ => Vec::new(),
        }
    }

    /// Bytes each worker sent each peer, by kind, over the run (workers by index in one process;
    /// by member id over worker processes).
    pub fn traffic(&mut self) -> Vec<crate::actors::traffic::TrafficEntry> {
        match &mut self.kind {
            Some(Kind::Local(r)) => r.traffic(),
            Some(Kind::Elastic(r)) => self.tokio.block_on(r.traffic()),
            None => Vec::new(),
        }
    }

    /// The epochs of a multi-process run from the `from`-th on (what the metrics log has not
    /// recorded yet: copied each step, so not the whole history).
    pub fn epochs_since(&self, from: usize) -> Vec<crate::elastic::runtime::EpochRecord> {
        match &self.kind {
            Some(Kind::Elastic(r)) => r.stats().history_since(from as u64).to_vec(),
            _ => Vec::new(),
        }
    }

    /// Membership figures of a multi-process run.
    pub fn membership(&self) -> Option<MembershipStats> {
        match &self.kind {
            Some(Kind::Elastic(r)) => Some(r.stats().clone()),
            _ => None,
        }
    }
}

impl Drop for RuntimeEngine {
    fn drop(&mut self) {
        match self.kind.take() {
            Some(Kind::Local(r)) => {
                let _ = self.tokio.block_on(r.shutdown());
            }
            Some(Kind::Elastic(r)) => {
                let _ = self.tokio.block_on(r.shutdown("the run is over"));
            }
            None => {}
        }
        if let Some(task) = self.exit_watch.take() {
            task.abort();
        }
        reap(&mut lock(&self.children));
        if let Some(ticket) = &self.identity_ticket {
            let _ = std::fs::remove_file(ticket);
        }
    }
}

/// How often the coordinator looks whether a worker process it started has ended.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Report each worker process that ends abnormally (a signal, a non-zero exit) to the cluster at
/// once; one dismissed at the end of the run exits 0 and is not news.
pub(crate) async fn watch_exits(children: Arc<Mutex<Vec<Child>>>, watch: ExitWatch) {
    let mut reported = std::collections::HashSet::new();
    loop {
        tokio::time::sleep(EXIT_POLL).await;
        let ended: Vec<(u32, String)> = lock(&children)
            .iter_mut()
            .filter_map(|c| match c.try_wait() {
                Ok(Some(status)) if !status.success() => Some((c.id(), status.to_string())),
                _ => None,
            })
            .filter(|(pid, _)| reported.insert(*pid))
            .collect();
        for (pid, how) in ended {
            watch.process_exited(pid, &how);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a run over worker processes needs of this machine and its files, checked before anything
/// is measured or started (the time budget's measurement runs first and takes minutes; a mistake
/// here would show only after it): the listen address parses and can be bound now, the job
/// identity reads, the local processes fit, and NCCL is there when the run asks for it. A no-op
/// for a run in one process.
pub fn preflight_elastic(config: &TrainConfig) -> Result<()> {
    let t = &config.train;
    if !t.elastic() {
        return Ok(());
    }
    let listen = t.listen_addr()?;
    crate::elastic::runtime::check_nccl(config)?;
    check_local_processes(t.processes)?;
    if t.identity.is_some() {
        crate::elastic::cluster::job_identity(config)?;
    }
    // Bound and let go at once (QUIC listens on UDP): an address of another machine, or a port
    // another program holds, is refused now.
    std::net::UdpSocket::bind(listen)
        .map(drop)
        .map_err(|e| Error::runtime(format!("cannot bind the QUIC endpoint to {listen}: {e}")))
}

/// Refuse to start more worker processes on this machine than it can run (each computes on at
/// least one thread and holds the model). Checked where they are started, not in the config's
/// validation: a remote worker validates the coordinator's config with its own core count.
pub(crate) fn check_local_processes(processes: usize) -> Result<()> {
    let (cores, most) = (crate::kernels::cpu::cores(), crate::kernels::cpu::max_threads());
    if processes > most {
        return Err(Error::config(format!(
            "train.processes ({processes}) is more than this machine can run: each worker process computes on at \
             least one thread and holds the model, and it has {cores} cores (at most {most} are accepted)"
        )));
    }
    Ok(())
}

/// Start `semoe worker --ticket FILE --scratch DIR [--gpu GPU]` (this program), its error output
/// joined to ours unless `quiet` (`gpu`: its NCCL ranks' GPU, given when the run exchanges over
/// NCCL).
/// `scratch` holds its Disk tier: a folder of the run's, not the system's temporary directory
/// (often memory, which the storage budgets exist to spare), removed with the run's scratch.
pub fn spawn_worker(ticket: &Path, scratch: &Path, threads: usize, gpu: Option<usize>, quiet: bool) -> Result<Child> {
    spawn_worker_with(
        ticket,
        scratch,
        threads,
        gpu,
        if quiet { Stdio::null() } else { Stdio::inherit() },
        &[],
    )
}

/// [`spawn_worker`] with its error output sent to `stderr` and the environment variables `env`
/// added (a chaos run gives one process a test hook, and each its own log file).
///
/// The worker is killed when the thread that starts it ends (`PR_SET_PDEATHSIG`): call it
/// from a thread that lives as long as the run (the main thread, a test's, an async worker
/// thread), never from a pooled blocking thread, which ends when idle.
pub fn spawn_worker_with(
    ticket: &Path,
    scratch: &Path,
    threads: usize,
    gpu: Option<usize>,
    stderr: Stdio,
    env: &[(String, String)],
) -> Result<Child> {
    let program: PathBuf =
        std::env::current_exe().map_err(|e| Error::runtime(format!("cannot find this program: {e}")))?;
    let mut command = Command::new(&program);
    die_with_parent(&mut command);
    command
        .arg("worker")
        .arg("--ticket")
        .arg(ticket)
        .arg("--scratch")
        .arg(scratch)
        .arg("--threads")
        .arg(threads.to_string())
        .args(
            gpu.map(|gpu| ["--gpu".to_string(), gpu.to_string()])
                .into_iter()
                .flatten(),
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| Error::io("cannot start a worker process", &program, e))
}

/// Have the child killed (SIGKILL) when the thread that starts it ends, the whole process with
/// it: a worker stopped by a chaos fault (SIGSTOP) would otherwise outlive a coordinator killed
/// by a signal for ever, its scratch with it. Linux only (elsewhere such a child is not reaped).
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe calls (prctl, getppid, _exit), allocating nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent ended before the call: no signal will come.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Wait for the worker processes (dismissed, they exit on their own), killing any still running
/// after a few seconds: no child outlives the run.
fn reap(children: &mut Vec<Child>) {
    let since = Instant::now();
    for child in children.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if since.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    #[test]
    fn more_local_worker_processes_than_the_machine_can_run_are_refused() {
        let most = crate::kernels::cpu::max_threads();
        assert!(super::check_local_processes(most).is_ok());
        let err = super::check_local_processes(most + 1)
            .expect_err("too many")
            .to_string();
        assert!(err.contains("train.processes"), "{err}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_child_dies_with_the_thread_that_started_it_even_when_stopped() {
        use std::os::unix::process::ExitStatusExt;
        let child = std::thread::spawn(|| {
            let mut command = std::process::Command::new("sleep");
            command.arg("60");
            super::die_with_parent(&mut command);
            let child = command.spawn().unwrap();
            // Stopped, as a chaos fault leaves it: only SIGKILL ends it now.
            // SAFETY: signals the child just started.
            assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGSTOP) }, 0);
            child
        })
        .join()
        .unwrap();
        let mut child = child;
        let since = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if since.elapsed() > std::time::Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the child outlived the thread that started it");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }
}
