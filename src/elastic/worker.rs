//! A worker process (`semoe worker --ticket FILE`): joins a run over QUIC, hosts one Worker actor
//! subtree (Gates, Experts, Ledger, Communicator) per membership epoch, and answers the
//! coordinator's commands for it. It writes nothing but scratch storage: the coordinator is the
//! single authority over the run directory.

use super::fingerprint;
use super::handover::{self, Pieces};
use super::hooks::{Corrupt, CutLink, Pause};
use super::protocol::{self, Answer, Command, Hello, LinkFault, Notice, Ready, Reply, WireError};
use super::proxy::max_reply_bytes;
use crate::actors::collectives::{CommIds, ExpertCollectives};
use crate::actors::communicator::SharedReplica;
use crate::actors::runtime::{start_standalone_worker, StandaloneWorker};
use crate::actors::traffic::Traffic;
use crate::actors::worker::WorkerMsg;
use crate::actors::Placement;
use crate::actors::{ask, ActorName};
use crate::chaos::net::FaultyTransport;
use crate::chaos::FaultPlan;
use crate::config::TrainConfig;
use crate::data::corpus::Corpus;
use crate::error::{Error, Result};
use crate::kernels::Cpu;
use crate::model::gpt::Gpt;
use crate::net::collective::plane::{PlaneMsg, PlaneOp};
use crate::net::quic::{self, DataPlane, JobIdentity, JoinTicket, LinkPath, PacketCodec, PeerEvent};
use crate::net::wire::{self, PacketShape};
use crate::net::{Packet, Payload, StepId, Transport, WorkerId};
use crate::optimizer::AdamW;
use crate::storage::tiers::ExpertStore;
use ractor::ActorRef;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The lanes of a worker process: as many of its groups as this run concurrently.
pub const PROCESS_LANES: usize = 4;

/// How a worker process is started.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The join ticket the coordinator wrote (address, token, certificate fingerprint).
    pub ticket: PathBuf,
    /// The coordinator's address (`HOST:PORT`, a name or an IP), when it differs from the
    /// ticket's (a NAT, a Kubernetes Service name).
    pub join: Option<String>,
    /// Compute threads (0: the run's `train.threads`). Threads never change the bits.
    pub threads: usize,
    /// The worker's own configuration file: refused unless every field that changes the bits
    /// equals the coordinator's.
    pub config: Option<PathBuf>,
    /// Where this machine keeps the training text (default: the run's `train.data`).
    pub data: Option<PathBuf>,
    /// The address peers reach this worker's data plane at (default: the address it uses to reach
    /// the coordinator).
    pub advertise: Option<IpAddr>,
    /// Where the Disk tier's scratch goes: a folder `semoe-worker-<pid>-<random>` (mode 0700) of
    /// the worker's own is made inside it and removed when the worker ends (default: the system's
    /// temporary directory).
    pub scratch: Option<PathBuf>,
    /// Serve this worker's metrics (its all-to-all bytes per peer and kind, restarts, tiers,
    /// epoch) as Prometheus text on `HOST:PORT` (port 0: the OS chooses; the address is printed).
    pub metrics_addr: Option<String>,
    /// The GPU of this worker's NCCL ranks when the run exchanges expert rows over NCCL
    /// (`train.exchange = "nccl"`; default GPU 0). Given for a run that does not, it is said to
    /// be unused.
    pub gpu: Option<usize>,
}

/// How a worker process ended well.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerEnd {
    /// Dismissed after it asked to leave, or at the end of the run.
    Left(String),
}

/// The codec of the data plane: `net::wire` checked against the current epoch's shape.
/// The epochs whose packet shapes a worker keeps: the current one and the one ending.
const SHAPES_KEPT: usize = 2;

struct WireCodec {
    /// The packet shape of each of the newest epochs ([`SHAPES_KEPT`]; shared, not copied, by
    /// every packet decoded in the epoch): a reader of the epoch ending decodes against its own
    /// epoch's shape while the next one's is set.
    shapes: Mutex<std::collections::BTreeMap<u64, Arc<PacketShape>>>,
    pause: Option<Pause>,
    corrupt: Option<Mutex<Corrupt>>,
    /// The test hook [`hooks::CUT_LINK`], and where it tells the worker's loop which link to cut.
    cut: Option<(Mutex<CutLink>, tokio::sync::mpsc::UnboundedSender<WorkerId>)>,
}

impl PacketCodec for WireCodec {
    fn encode(&self, epoch: u64, p: &Packet) -> Result<Vec<u8>> {
        self.cut_if_due(p);
        let mut bytes = wire::encode_packet(epoch, p)?;
        if let Some(corrupt) = &self.corrupt {
            corrupt.lock().unwrap_or_else(|p| p.into_inner()).apply(p, &mut bytes);
        }
        Ok(bytes)
    }
    fn decode(&self, bytes: &[u8], epoch: u64) -> Result<Packet> {
        let packet = wire::decode_packet(bytes, epoch, self.shape(epoch)?.as_ref())?;
        self.arrived(packet, epoch)
    }
    fn wire_frames(&self) -> bool {
        true
    }
    fn encode_parts<'a>(&self, epoch: u64, p: &'a Packet) -> Result<wire::Encoded<'a>> {
        if self.corrupt.is_some() {
            // A corrupting run damages encoded bytes: the whole frame as the head.
            return Ok(wire::Encoded {
                head: self.encode(epoch, p)?,
                bodies: Vec::new(),
            });
        }
        self.cut_if_due(p);
        wire::encode_packet_parts(epoch, p)
    }
    fn decode_parts(&self, head: &[u8], bodies: Vec<Vec<f32>>, epoch: u64) -> Result<Packet> {
        let packet = wire::decode_packet_parts(head, bodies, epoch, self.shape(epoch)?.as_ref())?;
        self.arrived(packet, epoch)
    }
    /// What the kept epochs' packets can need (before the first epoch, nothing is decoded, so
    /// the default bound only keeps the frame from being read).
    fn max_frame(&self) -> usize {
        let shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
        shapes
            .values()
            .map(|shape| shape.max_frame_bytes())
            .max()
            .unwrap_or(quic::MAX_PACKET_FRAME)
    }
    /// What the kept epochs' packets can list (before the first epoch, no bound: the frame
    /// length alone bounds the table).
    fn max_bodies(&self) -> usize {
        let shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
        shapes
            .values()
            .map(|shape| shape.max_frame_bodies())
            .max()
            .unwrap_or(usize::MAX)
    }
}

impl WireCodec {
    /// The cut-link test hook: the worker's loop cuts the link (not this sender's thread).
    fn cut_if_due(&self, p: &Packet) {
        if let Some((hook, tell)) = &self.cut {
            if let Some(peer) = hook.lock().unwrap_or_else(|p| p.into_inner()).fires(p) {
                let _ = tell.send(peer);
            }
        }
    }

    /// Epoch `epoch`'s packet shape.
    fn shape(&self, epoch: u64) -> Result<Arc<PacketShape>> {
        let shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
        shapes
            .get(&epoch)
            .cloned()
            .ok_or_else(|| Error::runtime(format!("a packet of epoch {epoch}, which this worker is not in")))
    }

    /// Set epoch `epoch`'s packet shape, keeping the newest [`SHAPES_KEPT`].
    fn set_shape(&self, epoch: u64, shape: PacketShape) {
        let mut shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
        shapes.insert(epoch, Arc::new(shape));
        while shapes.len() > SHAPES_KEPT {
            shapes.pop_first();
        }
    }

    /// A decoded packet, through the pause hook of a test (which looks inside the expert rows a
    /// collective carries too: `train.exchange = "sim"`).
    fn arrived(&self, packet: Packet, epoch: u64) -> Result<Packet> {
        if let Some(pause) = &self.pause {
            pause.at_packet(&packet, epoch);
            if let Payload::Collective(PlaneMsg {
                generation,
                op: PlaneOp::Group(Some(data)),
                ..
            }) = &packet.payload
            {
                // The packets inside carry the communicator's epoch: the step that built it.
                let inner =
                    wire::decode_packet(&data.clone().into_bytes(), generation.step, self.shape(epoch)?.as_ref());
                if let Ok(inner) = inner {
                    pause.at_packet(&inner, epoch);
                }
            }
        }
        Ok(packet)
    }
}

/// The worker's share of the current epoch.
struct Current {
    epoch: u64,
    actor: Option<ActorRef<WorkerMsg>>,
    store: Option<Arc<ExpertStore>>,
    /// The epoch's replica of the dense values (what [`Command::Hand`] keeps of them).
    replica: Option<SharedReplica>,
    /// The committed state kept at the last [`Command::Hand`], for a `Setup` with `keep`.
    held: Option<Held>,
    /// Bytes sent to each peer of the epoch.
    traffic: Option<Arc<Traffic>>,
}

/// A worker's committed state, kept across a membership change.
struct Held {
    epoch: u64,
    model: Gpt<f32>,
    optimizer: AdamW,
}

struct Shared {
    config: TrainConfig,
    text: Arc<Vec<u8>>,
    cpu: Cpu,
    plane: DataPlane,
    codec: Arc<WireCodec>,
    current: tokio::sync::Mutex<Current>,
    scratch: PathBuf,
    deadline: Duration,
    gpu: usize,
    /// A test's expert fault ([`super::hooks::EXPERT_FAULT`]), kept across epochs so that it
    /// fires once.
    faults: FaultPlan,
    pause: Option<Pause>,
    /// The notices of the link faults that fire in this worker's transport (a chaos run's), for
    /// the session stream.
    fired: tokio::sync::mpsc::UnboundedSender<Notice>,
    /// The current epoch's communicators when expert rows travel over collectives (`train.exchange
    /// = "sim"`): closed when the epoch ends or a peer is lost, so that no collective waits for a
    /// peer that will not come.
    collectives: Mutex<Option<(u64, Arc<ExpertCollectives>)>>,
    /// Why the last communicators were closed (a step asked of them after names it).
    collectives_closed: Mutex<Option<String>>,
}

impl Shared {
    /// Close the communicators of `epoch` (`None`: whichever epoch's are open), saying why.
    fn close_collectives(&self, epoch: Option<u64>, reason: &str) {
        let mut open = self.collectives.lock().unwrap_or_else(|p| p.into_inner());
        if open
            .as_ref()
            .is_some_and(|(e, _)| epoch.is_none_or(|epoch| epoch == *e))
        {
            if let Some((e, collectives)) = open.take() {
                collectives.close(reason);
                *self.collectives_closed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("epoch {e}'s communicators were closed: {reason}"));
            }
        }
    }
}

/// Join the run the ticket names and serve it until dismissed. `stop` is set by SIGINT/SIGTERM
/// (the CLI's handler): the worker then asks to leave and exits 0 once its state moved.
pub fn run_worker(options: WorkerOptions, stop: Arc<AtomicUsize>) -> Result<WorkerEnd> {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(super::async_threads())
        .thread_name("semoe-worker-async")
        .enable_all()
        .build()
        .map_err(|e| Error::runtime(format!("cannot start the async runtime: {e}")))?;
    let r = tokio.block_on(serve(options, stop));
    tokio.shutdown_timeout(Duration::from_secs(2));
    r
}

async fn serve(options: WorkerOptions, stop: Arc<AtomicUsize>) -> Result<WorkerEnd> {
    let ticket = JoinTicket::read(&options.ticket)?;
    // Before joining: a bad address is refused before the run counts on this worker.
    let _metrics = match &options.metrics_addr {
        Some(addr) => {
            let server = crate::telemetry::metrics::serve(addr, crate::telemetry::metrics::install()?)?;
            crate::say!("semoe worker: metrics on http://{}/metrics", server.local_addr());
            Some(server)
        }
        None => None,
    };
    let addr = match &options.join {
        Some(name) => within(
            JOIN_STEP_DEADLINE,
            &format!("cannot resolve --join {name}: no answer from the resolver"),
            tokio::net::lookup_host(name.as_str()),
        )
        .await?
        .map_err(|e| Error::config(format!("cannot resolve --join {name}: {e}")))?
        .next()
        .ok_or_else(|| Error::config(format!("--join {name} resolves to no address")))?,
        None if ticket.addr.ip().is_unspecified() => {
            return Err(Error::config(format!(
                "the ticket's address is {} (the coordinator listens on every address): give --join HOST:PORT",
                ticket.addr
            )))
        }
        None => ticket.addr,
    };
    let unspecified: IpAddr = if addr.ip().is_loopback() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        IpAddr::from([0, 0, 0, 0])
    };
    let mut client = quinn::Endpoint::client(SocketAddr::new(unspecified, 0))
        .map_err(|e| Error::runtime(format!("cannot open a QUIC endpoint: {e}")))?;
    client.set_default_client_config(quic::client_config(&ticket.cert_sha256)?);
    let connecting = client
        .connect(addr, "semoe-job")
        .map_err(|e| Error::runtime(format!("cannot connect to the coordinator at {addr}: {e}")))?;
    let conn = within(
        JOIN_STEP_DEADLINE,
        &format!("the coordinator at {addr} did not answer"),
        connecting,
    )
    .await?
    .map_err(|e| Error::runtime(format!("cannot connect to the coordinator at {addr}: {e}")))?;
    let (mut send, mut recv) = within(
        JOIN_STEP_DEADLINE,
        &format!("the coordinator at {addr} opened no join stream"),
        conn.open_bi(),
    )
    .await?
    .map_err(|e| Error::runtime(format!("the coordinator closed the connection: {e}")))?;

    let own = options
        .config
        .as_deref()
        .map(TrainConfig::from_file_with_keys)
        .transpose()?;
    let own_config = own.as_ref().map(|(c, _)| c.to_toml()).transpose()?;
    let hello = Hello {
        protocol: protocol::PROTOCOL,
        version: protocol::VERSION.into(),
        token: ticket.token.clone(),
        name: format!("{}:{}", hostname(), std::process::id()),
        config: own_config,
    };
    quic::write_frame(&mut send, &protocol::encode(&hello)?).await?;
    let config = match read_answer(&mut recv).await? {
        Answer::Offer { config } => config,
        Answer::Refused { reason } => {
            return Err(Error::runtime(format!("the coordinator refused this worker: {reason}")))
        }
        Answer::Admitted { .. } => return Err(Error::protocol("the coordinator", "admitted before offering")),
    };
    let mut config: TrainConfig = toml::from_str(&config)
        .map_err(|e| Error::parse("the run's configuration from the coordinator", e.to_string()))?;
    // This machine's own settings: the flags, else its config file's. Every other field is the
    // run's; one the file sets otherwise is said (the coordinator refused it already where it
    // would change the bits).
    if let Some((own, keys)) = &own {
        // (The file's only where it sets them: left unset, the run's stay.)
        let sets = |key: &str| keys.get("train").and_then(|t| t.get(key)).is_some();
        // The run's settings with the file's in their place: what differs is what the file set.
        let mut mine = config.overlaid(keys)?;
        if sets("threads") {
            config.train.threads = own.train.threads;
        }
        if sets("data") {
            config.train.data = own.train.data.clone();
        }
        if let Some(data) = &options.data {
            config.train.data = Some(data.clone());
        }
        if options.threads > 0 {
            config.train.threads = options.threads;
        }
        mine.train.threads = config.train.threads;
        mine.train.data = config.train.data.clone();
        let (differ, _) = crate::config::resume_differences(&config, &mine)?;
        if !differ.is_empty() {
            crate::say!(
                "notice: this worker runs with the run's settings, not its config file's (only the training \
                 text and the threads are its own): {}",
                differ.join(", ")
            );
        }
    }
    if let Some(data) = &options.data {
        config.train.data = Some(data.clone());
    }
    if options.threads > 0 {
        config.train.threads = options.threads;
    }
    config.validate()?;
    let corpus = match &config.train.data {
        Some(path) => Corpus::from_path(path, config.train.val_fraction, config.model.block_size + 1)?,
        None => Corpus::bundled()?,
    };
    let kernel = fingerprint::compute()?;
    let advertise = match options.advertise {
        Some(ip) => ip,
        None if addr.ip().is_loopback() => IpAddr::from([127, 0, 0, 1]),
        // The address this machine reaches the coordinator from (a connected UDP socket sends
        // nothing; it only asks the kernel for the route).
        None => std::net::UdpSocket::bind(SocketAddr::new(unspecified, 0))
            .and_then(|s| s.connect(addr).and_then(|()| s.local_addr()))
            .map(|a| a.ip())
            .map_err(|e| {
                Error::runtime(format!(
                    "cannot find this machine's address towards {addr} (give --advertise IP): {e}"
                ))
            })?,
    };
    // The data plane's socket is bound now (its port goes in the ready); its QUIC endpoint starts
    // once the job identity arrives with the admission.
    let bind = SocketAddr::new(unspecified, 0);
    let socket = std::net::UdpSocket::bind(bind)
        .map_err(|e| Error::runtime(format!("cannot bind the data plane to {bind}: {e}")))?;
    let data_port = socket
        .local_addr()
        .map_err(|e| Error::runtime(format!("the data socket has no address: {e}")))?
        .port();
    let ready = Ready {
        corpus_sha256: corpus.digest(),
        kernel,
        data_addr: SocketAddr::new(advertise, data_port).to_string(),
    };
    quic::write_frame(&mut send, &protocol::encode(&ready)?).await?;
    let (member, identity) = match read_answer(&mut recv).await? {
        Answer::Admitted { member, cert, key } => (
            member,
            JobIdentity {
                cert_der: cert,
                key_der: key,
            },
        ),
        Answer::Refused { reason } => {
            return Err(Error::runtime(format!("the coordinator refused this worker: {reason}")))
        }
        Answer::Offer { .. } => return Err(Error::protocol("the coordinator", "offered twice")),
    };
    crate::say!("semoe worker: joined {addr} as member {member}");
    if identity.fingerprint() != ticket.cert_sha256 {
        return Err(Error::protocol(
            "the coordinator",
            "the job certificate it sent is not the one the ticket pins",
        ));
    }
    let endpoint = quic::data_plane_endpoint(socket, &identity)?;

    let pause = Pause::for_member(member)?;
    let (cut_tx, mut cut_rx) = tokio::sync::mpsc::unbounded_channel::<WorkerId>();
    let codec = Arc::new(WireCodec {
        shapes: Mutex::new(std::collections::BTreeMap::new()),
        pause: pause.clone(),
        corrupt: Corrupt::for_member(member)?.map(Mutex::new),
        cut: CutLink::for_member(member)?.map(|hook| (Mutex::new(hook), cut_tx)),
    });
    let plane = DataPlane::new(endpoint, ticket.token.clone(), codec.clone())?;
    if config.train.same_host {
        // Without it the plane is QUIC-only, which works everywhere: say so, and go on.
        if let Err(e) = plane.enable_same_host(advertise) {
            crate::say!("semoe worker: peers on this machine use QUIC: {e}");
        }
    }
    let mut events = plane
        .events()
        .ok_or_else(|| Error::runtime("the data plane's events were taken twice"))?;
    // A folder of its own inside the one given (removed when the worker ends: never the user's),
    // claimed while it lives; those of workers that are gone (killed: their ends never ran, and
    // the default folder is often memory) are removed first.
    let scratch_parent = options.scratch.clone().unwrap_or_else(std::env::temp_dir);
    for left in crate::storage::scratch::remove_abandoned(&scratch_parent, "semoe-worker-") {
        crate::say!(
            "semoe worker: removed {}, left by a worker process that is gone",
            left.display()
        );
    }
    // A worker that cannot claim one (a read-only file system) still runs: it needs it only for
    // a Disk tier, which then says what is wrong.
    let (scratch, _scratch_owner) = match crate::storage::scratch::claim(&scratch_parent, "semoe-worker-") {
        Ok((dir, owner)) => (dir, Some(owner)),
        Err(e) => {
            crate::say!("semoe worker: its scratch directory goes unclaimed: {e}");
            (
                scratch_parent.join(format!("semoe-worker-{}", std::process::id())),
                None,
            )
        }
    };
    let deadline = Duration::from_secs_f64(config.train.deadline_s);
    if let (Some(gpu), false) = (
        options.gpu,
        config.train.exchange == crate::config::ExpertExchange::Nccl,
    ) {
        crate::say!(
            "semoe worker: notice: --gpu {gpu} is not used: this run exchanges expert rows over {} (train.exchange), \
             not NCCL",
            config.train.exchange
        );
    }
    let (fired, mut link_faults_fired) = tokio::sync::mpsc::unbounded_channel::<Notice>();
    let shared = Arc::new(Shared {
        cpu: Cpu::new(config.train.threads)?,
        text: corpus.train,
        config,
        plane,
        codec,
        current: tokio::sync::Mutex::new(Current {
            epoch: 0,
            actor: None,
            store: None,
            replica: None,
            held: None,
            traffic: None,
        }),
        scratch: scratch.clone(),
        deadline,
        gpu: options.gpu.unwrap_or(0),
        faults: super::hooks::expert_fault()?,
        pause,
        fired,
        collectives: Mutex::new(None),
        collectives_closed: Mutex::new(None),
    });
    let (dismissed_tx, mut dismissed) = tokio::sync::mpsc::unbounded_channel::<(bool, String)>();
    let mut asked_to_leave = false;
    let mut was_dismissed = false;
    // The coordinator's commands under way, aborted if they keep the worker from stopping: a
    // setup holds the epoch's lock while it waits for its peers (up to its `wait`, minutes for a
    // large state), and a worker whose coordinator is gone must not wait that long to exit.
    let mut commands: Vec<tokio::task::AbortHandle> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let end = loop {
        tokio::select! {
            biased;
            Some((left, reason)) = dismissed.recv() => {
                was_dismissed = true;
                break if left { Ok(WorkerEnd::Left(reason)) } else { Err(Error::runtime(format!("dismissed by the coordinator: {reason}"))) };
            }
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => {
                    let (shared, dismissed_tx) = (shared.clone(), dismissed_tx.clone());
                    commands.retain(|c| !c.is_finished());
                    commands.push(tokio::spawn(async move { handle(shared, s, r, dismissed_tx).await }).abort_handle());
                }
                Err(e) => {
                    // A dismissal answered just before the coordinator closed is an orderly end.
                    if let Ok((left, reason)) = dismissed.try_recv() {
                        was_dismissed = true;
                        break if left { Ok(WorkerEnd::Left(reason)) } else { Err(Error::runtime(format!("dismissed by the coordinator: {reason}"))) };
                    }
                    break Err(fenced(e));
                }
            },
            Some(peer) = cut_rx.recv() => shared.plane.cut_link(peer),
            Some(notice) = link_faults_fired.recv() => {
                if let Notice::LinkFault { index, epoch, step, .. } = &notice {
                    crate::say!("semoe worker: chaos: link fault {index} fired at step {step} of epoch {epoch}");
                }
                if let Err(e) = quic::write_frame(&mut send, &protocol::encode(&notice)?).await {
                    break Err(fenced(e));
                }
            }
            Some(event) = events.recv() => {
                // Collectives wait for every peer: one that is gone ends them at once.
                let (PeerEvent::Evicted { epoch, peer, detail } | PeerEvent::Lost { epoch, peer, detail }) = &event;
                shared.close_collectives(Some(*epoch), &format!("worker {peer} left epoch {epoch}: {detail}"));
                let notice = match event {
                    PeerEvent::Evicted { epoch, peer, detail } => Notice::PeerEvicted { peer: peer as u32, epoch, detail },
                    PeerEvent::Lost { epoch, peer, detail } => Notice::PeerLost { peer: peer as u32, epoch, detail },
                };
                if let Err(e) = quic::write_frame(&mut send, &protocol::encode(&notice)?).await {
                    break Err(fenced(e));
                }
            }
            _ = tick.tick() => {
                if !asked_to_leave && stop.load(Ordering::SeqCst) != 0 {
                    asked_to_leave = true;
                    crate::say!("semoe worker: leaving at the next step boundary (a second signal exits at once)");
                    if let Err(e) = quic::write_frame(&mut send, &protocol::encode(&Notice::Leaving)?).await {
                        break Err(fenced(e));
                    }
                }
            }
        }
    };
    // A dismissed worker leaves its epoch in order: its peers learn it left, not that it was lost.
    if was_dismissed {
        shared.plane.leave_epoch();
    }
    // Stop the actor tree first (its Disk tier files go with its store), then the connections.
    shared.close_collectives(None, "the worker is stopping");
    // A command that holds the epoch's lock past a moment is a setup waiting for its peers: it is
    // aborted (the others, a dismissal's answer among them, have their moment to finish).
    let mut current = match tokio::time::timeout(Duration::from_secs(2), shared.current.lock()).await {
        Ok(current) => current,
        Err(_) => {
            for command in &commands {
                command.abort();
            }
            shared.current.lock().await
        }
    };
    if let Some(actor) = current.actor.take() {
        let _ = actor.kill_and_wait(Some(Duration::from_secs(5))).await;
    }
    current.store = None;
    drop(current);
    let _ = std::fs::remove_dir_all(&scratch);
    conn.close(0u32.into(), b"worker done");
    end
}

/// Run `f` (tens of megabytes of encoding or decoding) off the async threads, which must keep
/// QUIC's keep-alives flowing.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::runtime(format!("a blocking task failed: {e}")))?
}

/// The end of a worker that lost its coordinator: it may have been replaced while it could not
/// answer (stopped, partitioned), so it must never commit again.
fn fenced(e: impl std::fmt::Display) -> Error {
    Error::runtime(format!(
        "lost the coordinator ({e}); this worker is no longer a member and stops without committing anything more"
    ))
}

/// How long each step of joining (resolving `--join`, connecting, opening the join stream) may
/// take.
const JOIN_STEP_DEADLINE: Duration = Duration::from_secs(10);

/// How long the coordinator may take to answer a hello or a ready message: its handshakes queue
/// behind a burst of joiners (each bounded by its hello timeout), so this is generous.
const JOIN_ANSWER_DEADLINE: Duration = Duration::from_secs(60);

/// `f`'s output, or an error saying `what` within `limit`.
async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| Error::runtime(format!("{what} within {} s", limit.as_secs())))
}

async fn read_answer(recv: &mut quinn::RecvStream) -> Result<Answer> {
    let read = quic::read_frame(recv, protocol::CONTROL.header_bytes + 64, "the coordinator's answer");
    let bytes = within(JOIN_ANSWER_DEADLINE, "the coordinator did not answer", read)
        .await??
        .ok_or_else(|| Error::runtime("the coordinator closed the join stream without answering"))?;
    protocol::decode(&bytes, "the coordinator's answer")
}

/// This machine's host name (a worker's name is `host:pid`).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Serve one command stream: decode, check the epoch, act, answer.
async fn handle(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    dismissed: tokio::sync::mpsc::UnboundedSender<(bool, String)>,
) {
    let reply = async {
        let bytes = quic::read_frame(&mut recv, protocol::CONTROL.header_bytes + 64, "a command")
            .await?
            .ok_or_else(|| Error::protocol("the coordinator", "an empty command stream"))?;
        let command: Command = protocol::decode(&bytes, "a command")?;
        execute(&shared, command, &mut recv, &dismissed).await
    }
    .await;
    let answer = match reply {
        Ok(answer) => answer,
        Err(e) => match protocol::encode(&Reply::Failed(WireError::from(&e))) {
            Ok(b) => Outgoing::Frame(b),
            Err(_) => return,
        },
    };
    // Moved into quinn's send buffer, not copied: a state copy is megabytes every few steps.
    let _ = quic::write_chunks(&mut send, answer.chunks()).await;
    let _ = send.finish();
}

async fn execute(
    shared: &Shared,
    command: Command,
    recv: &mut quinn::RecvStream,
    dismissed: &tokio::sync::mpsc::UnboundedSender<(bool, String)>,
) -> Result<Outgoing> {
    if let Command::Dismiss { left, reason } = command {
        let _ = dismissed.send((left, reason));
        return protocol::encode(&Reply::Done).map(Outgoing::Frame);
    }
    if let Command::Setup {
        epoch,
        worker,
        workers,
        peers,
        state_sha256,
        expert_owner,
        tensor_owner,
        keep,
        link_faults,
        comm_ids,
        wait_ms,
    } = command
    {
        let state = quic::read_frame(recv, max_reply_bytes(&shared.config)?, "the run's state")
            .await?
            .ok_or_else(|| Error::protocol("the coordinator", "a setup without the state"))?;
        // Hashed off the async threads (a large share takes seconds, which the connection's
        // keep-alives cannot wait).
        let (state, got) = blocking(move || {
            let got = quic::sha256_hex(&state);
            Ok((state, got))
        })
        .await?;
        if got != state_sha256 {
            return Err(Error::protocol(
                "the coordinator",
                format!("the state of epoch {epoch} has SHA-256 {got}, not the {state_sha256} announced"),
            ));
        }
        let owners = |v: Vec<u32>| -> Vec<usize> {
            v.into_iter()
                .map(|w| if w == u32::MAX { usize::MAX } else { w as usize })
                .collect()
        };
        let plan = SetupPlan {
            epoch,
            worker: worker as usize,
            workers: workers as usize,
            peers,
            expert_owner: owners(expert_owner),
            tensor_owner: owners(tensor_owner),
            keep,
            link_faults,
            comm_ids: protocol::comm_ids_from_wire(comm_ids)?,
            // Never shorter than the run's own deadline, nor longer than any wait may be.
            wait: Duration::from_millis(wait_ms)
                .max(shared.deadline)
                .min(crate::config::MAX_WAIT),
        };
        setup(shared, plan, state).await?;
        return protocol::encode(&Reply::Done).map(Outgoing::Frame);
    }
    let (actor, epoch) = {
        let current = shared.current.lock().await;
        (current.actor.clone(), current.epoch)
    };
    if command.epoch() != Some(epoch) {
        return Err(Error::runtime(format!(
            "a command of epoch {:?} reached a worker in epoch {epoch}; refused",
            command.epoch()
        )));
    }
    let actor = actor.ok_or_else(|| Error::runtime("no epoch has been set up yet"))?;
    let me = ActorName("the worker".into());
    let d = shared.deadline;
    let id = |(step, attempt): (u64, u32)| StepId { step, attempt };
    let frame = match command {
        Command::RunStep { step, comm_ids, .. } => {
            if !comm_ids.is_empty() {
                let ids = protocol::comm_ids_from_wire(comm_ids)?;
                let collectives = shared.collectives.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match collectives {
                    Some((_, collectives)) => collectives.give_ids(ids)?,
                    None => {
                        let closed = shared
                            .collectives_closed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone();
                        return Err(match closed {
                            // A peer was lost or left: the epoch must form again.
                            Some(why) => Error::runtime(format!("cannot run step {}: {why}", step.0)),
                            None => Error::protocol(
                                "the coordinator",
                                "communicator ids for a worker that exchanges over the transport",
                            ),
                        });
                    }
                }
            }
            let out = ask(&actor, &me, "a step", d * 10, |reply| WorkerMsg::RunStep {
                step: id(step),
                reply,
            })
            .await?;
            protocol::encode(&Reply::Outputs(protocol::outputs_to_wire(&out)))
        }
        Command::Prepare { step, .. } => {
            let parts = ask(&actor, &me, "a prepare", d, |reply| WorkerMsg::Prepare {
                step: id(step),
                reply,
            })
            .await?;
            protocol::encode(&Reply::Norms(protocol::norms_to_wire(&parts)))
        }
        Command::Commit { step, lr, norm, .. } => {
            if let Some(pause) = &shared.pause {
                pause.at_commit(step.0, epoch);
            }
            ask(&actor, &me, "a commit", d * 4, |reply| WorkerMsg::Commit {
                step: id(step),
                lr,
                norm,
                reply,
            })
            .await?;
            protocol::encode(&Reply::Done)
        }
        Command::Abort { step, .. } => {
            ask(&actor, &me, "an abort", d, |reply| WorkerMsg::Abort {
                step: id(step),
                reply,
            })
            .await?;
            protocol::encode(&Reply::Done)
        }
        Command::Hand { epoch, dense, experts } => {
            // A committed step is the last thing the Worker did; its Ledger and replica hold it.
            let snapshot = ask(&actor, &me, "a snapshot", d * 11, |reply| WorkerMsg::Snapshot { reply }).await?;
            let replica = {
                let current = shared.current.lock().await;
                let replica = current
                    .replica
                    .as_ref()
                    .ok_or_else(|| Error::runtime("no epoch has been set up yet"))?;
                let r = replica.lock().unwrap_or_else(|p| p.into_inner()).clone();
                r
            };
            let config = shared.config.clone();
            let pieces = Pieces {
                dense: dense.into_iter().map(|(i, m)| (i as usize, m)).collect(),
                experts: experts.into_iter().map(|(b, e)| (b as usize, e as usize)).collect(),
            };
            let (bytes, model, optimizer) = blocking(move || {
                let (model, optimizer) = handover::held_state(&config, &snapshot, &replica)?;
                let bytes = protocol::encode_hand(&config, &model, &optimizer, &pieces)?;
                Ok((bytes, model, optimizer))
            })
            .await?;
            shared.current.lock().await.held = Some(Held {
                epoch,
                model,
                optimizer,
            });
            Ok(bytes)
        }
        Command::Traffic { .. } => {
            let sent = match &shared.current.lock().await.traffic {
                Some(t) => t
                    .sent()
                    .into_iter()
                    .map(|(to, kind, bytes)| (to as u32, kind.to_string(), bytes))
                    .collect(),
                None => Vec::new(),
            };
            protocol::encode(&Reply::Traffic(sent))
        }
        Command::Snapshot { .. } => {
            // It may wait behind a whole step in the Worker's mailbox (a background copy).
            let s = ask(&actor, &me, "a snapshot", d * 11, |reply| WorkerMsg::Snapshot { reply }).await?;
            let head = protocol::encode_snapshot_parts(&s)?.head;
            return Ok(Outgoing::Snapshot(head, s));
        }
        Command::Setup { .. } | Command::Dismiss { .. } => Err(Error::runtime("handled above")),
    };
    frame.map(Outgoing::Frame)
}

/// A command's answer as it goes back to the coordinator.
enum Outgoing {
    /// One encoded frame.
    Frame(Vec<u8>),
    /// A state copy: its frame's head, then the snapshot's tensors, handed to quinn's send buffer
    /// as they are (megabytes every few steps, not copied into one frame first).
    Snapshot(Vec<u8>, crate::actors::ledger::LedgerSnapshot),
}

impl Outgoing {
    /// The answer's frame as chunks for quinn, owning their bytes.
    fn chunks(self) -> Vec<bytes::Bytes> {
        match self {
            Outgoing::Frame(bytes) => vec![bytes::Bytes::from(bytes)],
            Outgoing::Snapshot(head, s) => {
                let bodies = protocol::snapshot_bodies(s);
                let mut chunks = Vec::with_capacity(1 + bodies.len());
                chunks.push(bytes::Bytes::from(head));
                if cfg!(target_endian = "little") {
                    chunks.extend(bodies.into_iter().map(|b| bytes::Bytes::from_owner(FloatBytes(b))));
                } else {
                    let mut rest = Vec::new();
                    for b in &bodies {
                        for x in b {
                            rest.extend_from_slice(&x.to_le_bytes());
                        }
                    }
                    chunks.push(bytes::Bytes::from(rest));
                }
                chunks
            }
        }
    }
}

/// Floats lent to quinn as their bytes (little-endian machines only: the wire's byte order).
struct FloatBytes(Vec<f32>);

impl AsRef<[u8]> for FloatBytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// The epoch's transport, wrapped in a [`FaultyTransport`] when a chaos run gave this epoch link
/// faults: they fire at the same requests as between in-process workers (`from`, `to`: worker
/// indices of this epoch), and each firing is told to the coordinator at once.
fn faulty(shared: &Shared, epoch: u64, transport: quic::QuicTransport, faults: &[LinkFault]) -> Arc<dyn Transport> {
    if faults.is_empty() {
        return Arc::new(transport);
    }
    let plan = FaultPlan::none();
    for f in faults {
        plan.push(f.to_fault());
    }
    let indices: Vec<u32> = faults.iter().map(|f| f.index).collect();
    let fired = shared.fired.clone();
    plan.observe(move |firing| {
        if let Some(&index) = indices.get(firing.fault) {
            let _ = fired.send(Notice::LinkFault {
                index,
                epoch,
                step: firing.step,
                detail: firing.detail.clone(),
            });
        }
    });
    crate::say!(
        "semoe worker: epoch {epoch}: {} link fault(s) of a chaos run in this worker's transport",
        faults.len()
    );
    Arc::new(FaultyTransport::new(transport, plan))
}

/// What a `Setup` says besides the state.
struct SetupPlan {
    epoch: u64,
    worker: usize,
    workers: usize,
    peers: Vec<String>,
    expert_owner: Vec<usize>,
    tensor_owner: Vec<usize>,
    keep: bool,
    link_faults: Vec<LinkFault>,
    /// The ids of the epoch's first communicators (expert rows over collectives).
    comm_ids: CommIds,
    /// How long to wait for the peers to connect (the coordinator's setup deadline).
    wait: Duration,
}

/// Start epoch `plan.epoch`: stop the previous epoch's actors, connect the data plane to every
/// peer, and start this worker's share of the actor tree from the given state (overlaid on the
/// state kept at the last hand-over when `plan.keep`).
async fn setup(shared: &Shared, plan: SetupPlan, state: Vec<u8>) -> Result<()> {
    let SetupPlan {
        epoch,
        worker,
        workers,
        peers,
        expert_owner,
        tensor_owner,
        keep,
        link_faults,
        comm_ids,
        wait,
    } = plan;
    let mut current = shared.current.lock().await;
    if epoch <= current.epoch && current.actor.is_some() {
        return Err(Error::runtime(format!(
            "setup of epoch {epoch} refused: this worker is already in epoch {}",
            current.epoch
        )));
    }
    shared.close_collectives(None, &format!("epoch {} is over", current.epoch));
    if let Some(actor) = current.actor.take() {
        let _ = actor.kill_and_wait(Some(Duration::from_secs(5))).await;
    }
    // The last epoch's store is dropped off the async threads (it joins its I/O threads and
    // deletes its Disk tier file), as the new one is built: the QUIC connections run on them.
    if let Some(store) = current.store.take() {
        // The killed actors' children (experts, communicator) hold the store too, and drop it in
        // their own tasks a moment later: waited for (bounded), or the last of them would drop it
        // on an async thread.
        let since = std::time::Instant::now();
        while Arc::strong_count(&store) > 1 && since.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        blocking(move || {
            drop(store);
            Ok(())
        })
        .await?;
    }
    current.replica = None;
    let held = current.held.take();
    if peers.len() != workers || worker >= workers {
        return Err(Error::protocol(
            "the coordinator",
            format!("setup of worker {worker} of {workers} with {} addresses", peers.len()),
        ));
    }
    let peers = peers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse::<SocketAddr>()
                .map(|a| (i, a))
                .map_err(|e| Error::protocol("the coordinator", format!("peer address {a:?}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let config = shared.config.clone();
    let (model, optimizer) = blocking(move || match (keep, held) {
        (false, _) => protocol::decode_share(&config, &state),
        (true, Some(mut held)) if held.epoch < epoch => {
            protocol::decode_share_into(&config, &state, &mut held.model, &mut held.optimizer)?;
            Ok((held.model, held.optimizer))
        }
        (true, _) => Err(Error::protocol(
            "the coordinator",
            format!("the setup of epoch {epoch} builds on a state this worker did not keep"),
        )),
    })
    .await?;
    let placement = Placement::from_owners(&model, shared.config.train.groups, workers, expert_owner, tensor_owner)
        .map_err(|e| Error::protocol("the coordinator", e.to_string()))?;

    shared.codec.set_shape(epoch, PacketShape::of(&shared.config, workers)?);
    let (transport, inbox) = shared.plane.start_epoch(worker, epoch, peers, workers, wait).await?;
    metrics::gauge!(crate::telemetry::metrics::EPOCH).set(epoch as f64);
    let paths = shared.plane.link_paths();
    let same_host = paths.iter().filter(|(_, p)| *p == LinkPath::SameHost).count();
    if !paths.is_empty() {
        crate::say!(
            "semoe worker: epoch {epoch}: {same_host} peer(s) over same-host sockets, {} over QUIC",
            paths.len() - same_host
        );
    }
    // The ids of the epoch's first communicators come with the setup exactly when the run
    // exchanges over collectives: checked before anything starts.
    match (shared.config.train.exchange, comm_ids.is_empty()) {
        (crate::config::ExpertExchange::Transport, true) => {}
        (crate::config::ExpertExchange::Transport, false) => {
            return Err(Error::protocol(
                "the coordinator",
                format!("the setup of epoch {epoch} has communicator ids, and the run exchanges over the transport"),
            ))
        }
        (_, true) => {
            return Err(Error::protocol(
                "the coordinator",
                format!("the setup of epoch {epoch} has no communicator ids, and the run exchanges over collectives"),
            ))
        }
        (_, false) => {}
    }
    let storage = shared
        .config
        .storage
        .to_config(Some(shared.scratch.join(format!("epoch-{epoch}"))))?;
    let started = start_standalone_worker(StandaloneWorker {
        config: shared.config.clone(),
        text: shared.text.clone(),
        model,
        optimizer,
        worker,
        workers,
        transport: faulty(shared, epoch, transport, &link_faults),
        inbox,
        storage,
        cpu: shared.cpu.clone(),
        lanes: PROCESS_LANES,
        placement: Some(placement),
        gpu: shared.gpu,
        chaos: shared.faults.clone(),
    })
    .await?;
    if let Some(collectives) = &started.collectives {
        if let Err(e) = collectives.give_ids(comm_ids) {
            let _ = started.actor.kill_and_wait(Some(Duration::from_secs(5))).await;
            return Err(e);
        }
    }
    if let Some(collectives) = &started.collectives {
        crate::say!(
            "semoe worker: epoch {epoch}: expert rows over collectives ({}), {} lane(s)",
            match shared.config.train.exchange {
                crate::config::ExpertExchange::Nccl => format!("NCCL on GPU {}", shared.gpu),
                _ => "the CPU stand-in of NCCL over the data plane".to_string(),
            },
            collectives.lanes()
        );
    }
    {
        // The reason cleared under the communicators' lock: a close for a peer lost at this
        // moment (which takes that lock first) keeps its own.
        let mut open = shared.collectives.lock().unwrap_or_else(|p| p.into_inner());
        *shared.collectives_closed.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *open = started.collectives.map(|c| (epoch, c));
    }
    *current = Current {
        epoch,
        actor: Some(started.actor),
        store: Some(started.experts),
        replica: Some(started.replica),
        held: None,
        traffic: Some(started.traffic),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::ledger::LedgerSnapshot;
    use crate::config::small_test_config;
    use crate::optimizer::AdamW;
    use crate::storage::tiers::ExpertSlot;

    /// A share of one dense tensor and one expert, every float distinct.
    fn share(config: &TrainConfig) -> LedgerSnapshot {
        let specs = config.model.tensor_specs();
        let block = (0..config.model.n_layer)
            .find(|&l| config.model.is_moe(l))
            .expect("an MoE block");
        let idx = ExpertSlot::tensor_indices(specs.iter().map(|t| t.name.as_str()), block).expect("experts");
        let mut next = 0.0f32;
        let mut fill = |n: usize| {
            (0..n)
                .map(|_| {
                    next += 0.25;
                    next
                })
                .collect::<Vec<f32>>()
        };
        let n0: usize = specs[0].shape.iter().product();
        let dense = vec![(0, fill(n0), fill(n0), fill(n0))];
        let sizes = idx.map(|i| specs[i].unit_len());
        let mut optimizer =
            AdamW::with_decay(config.optimizer.clone(), &sizes, &[true, false, true, false]).expect("adamw");
        optimizer.m = sizes.iter().map(|&n| fill(n)).collect();
        optimizer.v = sizes.iter().map(|&n| fill(n)).collect();
        let params = sizes.map(&mut fill);
        LedgerSnapshot {
            step: 12,
            dense,
            experts: vec![((block, 1), ExpertSlot { params, optimizer })],
        }
    }

    #[test]
    fn a_state_copy_sent_in_chunks_is_the_encoded_frame() {
        let config = small_test_config();
        let s = share(&config);
        let whole = protocol::encode_snapshot(&s).expect("encode");
        let head = protocol::encode_snapshot_parts(&s).expect("parts").head;
        let chunks = Outgoing::Snapshot(head, s).chunks();
        assert_eq!(chunks.len(), 1 + 3 + 12, "the head, 3 dense bodies, 12 expert bodies");
        let sent: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(sent, whole, "the chunks are the frame's bytes");
        let (_, back) = protocol::decode_reply(&config, &sent).expect("decode");
        let back = back.expect("a snapshot");
        let original = share(&config);
        assert_eq!(back.step, 12);
        assert_eq!(protocol::snapshot_bodies(back), protocol::snapshot_bodies(original));
    }
}
