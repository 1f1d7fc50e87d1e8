//! The authenticated data plane between worker processes: one per process, living across
//! membership epochs. See the module documentation of [`super`] for the topology.

use super::frame::{self, write_frame, write_frame_owned, FrameError};
use super::identity::{constant_time_eq, sha256_hex, SERVER_NAME};
use super::local::{self, Ending, LocalConn};
use super::reader::{self, SplitFrame};
use crate::error::{Error, Result};
use crate::net::wire::Encoded;
use crate::net::{Inbox, Packet, Transport, WorkerId};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

/// Turns packets into frames and back. The data plane is generic over it so that the wire format
/// (`net::wire`) is decided in one place; `epoch` is the membership epoch the frame belongs to,
/// which `decode` must check (a frame of another epoch is an error).
pub trait PacketCodec: Send + Sync + 'static {
    /// The frame of `packet`, sent in `epoch`.
    fn encode(&self, epoch: u64, packet: &Packet) -> Result<Vec<u8>>;
    /// The packet in `bytes`, which must belong to `epoch`.
    fn decode(&self, bytes: &[u8], epoch: u64) -> Result<Packet>;
    /// Whether this codec's frames are `net::wire` frames: then both paths read a packet's bodies
    /// straight into floats ([`PacketCodec::decode_parts`]) and the same-host path writes them
    /// from the packet itself ([`PacketCodec::encode_parts`]), a copy less on each side.
    fn wire_frames(&self) -> bool {
        false
    }
    /// The frame of `packet` in two parts, its bodies still in the packet (only asked when
    /// [`PacketCodec::wire_frames`]; by default the whole frame as the head).
    fn encode_parts<'a>(&self, epoch: u64, packet: &'a Packet) -> Result<Encoded<'a>> {
        Ok(Encoded {
            head: self.encode(epoch, packet)?,
            bodies: Vec::new(),
        })
    }
    /// The packet of a frame whose reader split it into its head and its bodies (only asked when
    /// [`PacketCodec::wire_frames`]).
    fn decode_parts(&self, head: &[u8], bodies: Vec<Vec<f32>>, epoch: u64) -> Result<Packet> {
        let _ = (head, bodies, epoch);
        Err(Error::runtime("this codec reads whole frames only"))
    }
    /// The longest frame (before its checksum) a peer may announce now: a longer one is a
    /// protocol violation, refused before anything is allocated. By default
    /// [`MAX_PACKET_FRAME`]; a codec that knows the run's model says what its packets can need.
    fn max_frame(&self) -> usize {
        MAX_PACKET_FRAME
    }
    /// The most bodies a `net::wire` frame's table may list now (only asked when
    /// [`PacketCodec::wire_frames`]): a longer table is refused before it is read (it cost the
    /// reader several times the frame's bytes for nothing). No bound by default.
    fn max_bodies(&self) -> usize {
        usize::MAX
    }
}

/// Something that happened to a peer of the current epoch. Each peer is reported at most once per
/// epoch, and nothing is reported about an epoch once [`DataPlane::start_epoch`] moved past it
/// (events already queued carry their `epoch`, so a consumer can drop stale ones). A peer that
/// closes its connections because it started a later epoch is not reported (the membership layer
/// that started it knows), but sends to it fail from then on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The peer broke the protocol (a frame that does not decode, a packet not from it or not for
    /// this worker, a malformed frame); its connections were closed.
    Evicted {
        /// The epoch.
        epoch: u64,
        /// The peer.
        peer: WorkerId,
        /// What it did.
        detail: String,
    },
    /// A connection with the peer was lost: it timed out (a dead or partitioned peer), was reset,
    /// or the peer closed it (shut down, or refused this worker).
    Lost {
        /// The epoch.
        epoch: u64,
        /// The peer.
        peer: WorkerId,
        /// How it was lost.
        detail: String,
    },
}

/// Application close codes of data-plane connections.
mod code {
    /// The epoch is over (the closer moved to a later one, or shut down between epochs).
    pub const EPOCH_OVER: u32 = 0;
    /// The hello presented a wrong token.
    pub const WRONG_TOKEN: u32 = 1;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 2;
    /// The data plane shut down.
    pub const SHUTDOWN: u32 = 3;
    /// The hello was for an epoch this worker has left, or from a worker not in the epoch.
    pub const REFUSED: u32 = 4;
    /// This worker could not encode a packet for the peer.
    pub const INTERNAL: u32 = 5;
    /// The link was cut on purpose (a test hook standing for a network failure).
    pub const CUT: u32 = 6;
}

/// The largest packet frame a codec accepts unless it says otherwise ([`PacketCodec::max_frame`]).
pub const MAX_PACKET_FRAME: usize = 1 << 30;

/// The longest admission token a data plane accepts (a [`super::JoinTicket`]'s is 64).
pub const MAX_TOKEN: usize = 512;

/// The largest hello frame accepted (26 bytes of header and the token).
const MAX_HELLO: usize = 26 + MAX_TOKEN;

/// How long an incoming connection may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How often `start_epoch` looks whether every peer said hello.
const POLL: Duration = Duration::from_millis(5);

const HELLO_MAGIC: &[u8; 8] = b"SEMOEHI1";

/// The first frame of a data-plane connection: who the opener is, for which epoch, and the proof
/// that it belongs to the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) token: String,
    pub(crate) epoch: u64,
    pub(crate) from: WorkerId,
}

impl Hello {
    /// Fixed layout: magic, epoch u64 LE, from u64 LE, token length u16 LE, token bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(26 + self.token.len());
        out.extend_from_slice(HELLO_MAGIC);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&(self.from as u64).to_le_bytes());
        out.extend_from_slice(&(self.token.len() as u16).to_le_bytes());
        out.extend_from_slice(self.token.as_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() < 26 || &bytes[..8] != HELLO_MAGIC {
            return Err("the first frame is not a data-plane hello".to_string());
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let epoch = u64_at(8);
        let from = usize::try_from(u64_at(16)).map_err(|_| "the hello's worker id is out of range".to_string())?;
        let len = usize::from(u16::from_le_bytes([bytes[24], bytes[25]]));
        if bytes.len() != 26 + len {
            return Err(format!(
                "the hello is {} bytes, its token length says {}",
                bytes.len(),
                26 + len
            ));
        }
        let token =
            String::from_utf8(bytes[26..].to_vec()).map_err(|_| "the hello's token is not UTF-8".to_string())?;
        Ok(Hello { token, epoch, from })
    }
}

/// The sending side of one peer in one epoch, shared by the transport, the writer and the watchers.
struct Link {
    peer: WorkerId,
    tx: UnboundedSender<Queued>,
    /// Set once, when the peer is lost or evicted: why. Sends fail from then on.
    gone: OnceLock<String>,
    /// The connection this worker opened to the peer (set once connected).
    conn: OnceLock<Conn>,
}

/// A packet queued for a peer's writer.
struct Queued {
    packet: Packet,
    /// Flip a byte of its sealed frame on the way (a chaos fault, [`Transport::send_damaged`]).
    damaged: bool,
}

/// The frame of a queued packet: encoded, sealed with its checksum (see [`frame::seal`]), and
/// damaged after the seal when a chaos fault asks, as a faulty link would damage it.
fn frame_of(inner: &Inner, epoch: u64, queued: &Queued) -> Result<Vec<u8>> {
    let mut bytes = inner.codec.encode(epoch, &queued.packet)?;
    frame::seal(&mut bytes);
    if queued.damaged {
        frame::damage(&mut bytes);
    }
    Ok(bytes)
}

/// How a link reaches its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPath {
    /// QUIC over UDP (encrypted; any machine).
    Quic,
    /// A Unix stream socket (a peer process on this machine; see `local`).
    SameHost,
}

/// A connection of an epoch, as far as closing it goes.
#[derive(Clone)]
enum Conn {
    Quic(quinn::Connection),
    Local(Arc<LocalConn>),
}

impl Conn {
    fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Conn::Quic(conn) => conn.close(code.into(), reason),
            Conn::Local(conn) => conn.close(code, reason),
        }
    }

    fn path(&self) -> LinkPath {
        match self {
            Conn::Quic(_) => LinkPath::Quic,
            Conn::Local(_) => LinkPath::SameHost,
        }
    }
}

/// An accepted connection whose hello was read, with the stream its packets arrive on.
enum Incoming {
    Quic(quinn::Connection, quinn::RecvStream),
    Local(Arc<LocalConn>, OwnedReadHalf),
}

impl Incoming {
    fn conn(&self) -> Conn {
        match self {
            Incoming::Quic(conn, _) => Conn::Quic(conn.clone()),
            Incoming::Local(conn, _) => Conn::Local(conn.clone()),
        }
    }

    fn close(&self, code: u32, reason: &[u8]) {
        self.conn().close(code, reason);
    }
}

/// An outgoing connection whose hello was sent.
enum Outgoing {
    Quic(quinn::Connection, quinn::SendStream),
    Local(OwnedReadHalf, OwnedWriteHalf),
}

/// An incoming connection whose hello arrived before this worker started the hello's epoch.
struct Pending {
    hello: Hello,
    incoming: Incoming,
}

/// The same-host path, once enabled: which peers to try it for, and the job's part of the names.
struct SameHost {
    /// The first 16 hex digits of the token's SHA-256 (socket names of different jobs differ).
    tag: String,
    /// This plane's own socket name (its handshakes prove the token for it).
    name: String,
    /// This worker's advertised address: a peer advertising the same one is on this machine.
    own_ip: IpAddr,
}

/// Everything that belongs to the current epoch.
#[derive(Default)]
struct EpochState {
    epoch: Option<u64>,
    me: WorkerId,
    members: HashSet<WorkerId>,
    links: HashMap<WorkerId, Arc<Link>>,
    /// Peers whose hello of this epoch arrived.
    arrived: HashSet<WorkerId>,
    incoming: Vec<Conn>,
    tasks: Vec<JoinHandle<()>>,
    inbox: Option<UnboundedSender<Packet>>,
    pending: Vec<Pending>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    token: String,
    codec: Arc<dyn PacketCodec>,
    runtime: tokio::runtime::Handle,
    state: Mutex<EpochState>,
    events: UnboundedSender<PeerEvent>,
    same_host: OnceLock<SameHost>,
}

/// One worker process's data plane: accepts authenticated connections from its peers and, per
/// epoch, connects to every peer and hands out a [`QuicTransport`] and an [`Inbox`].
pub struct DataPlane {
    inner: Arc<Inner>,
    events: Mutex<Option<UnboundedReceiver<PeerEvent>>>,
    accept: JoinHandle<()>,
    accept_local: Mutex<Option<JoinHandle<()>>>,
}

impl DataPlane {
    /// A data plane on `endpoint` (see [`super::endpoint`]) admitting peers that present `token`,
    /// framing packets with `codec`. Its tasks run on the tokio runtime this is called in (an error
    /// outside one). The token must be 1 to [`MAX_TOKEN`] bytes. Dropping the plane closes every
    /// connection with the reason "shut down", which its peers report as [`PeerEvent::Lost`].
    pub fn new(endpoint: quinn::Endpoint, token: String, codec: Arc<dyn PacketCodec>) -> Result<DataPlane> {
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Err(Error::config(format!(
                "the data plane's token is {} bytes; it must be 1 to {MAX_TOKEN}",
                token.len()
            )));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| Error::runtime(format!("the data plane needs a tokio runtime: {e}")))?;
        let (events, events_rx) = unbounded_channel();
        let inner = Arc::new(Inner {
            endpoint,
            token,
            codec,
            runtime: runtime.clone(),
            state: Mutex::new(EpochState::default()),
            events,
            same_host: OnceLock::new(),
        });
        let accept = runtime.spawn(accept_loop(inner.clone()));
        Ok(DataPlane {
            inner,
            events: Mutex::new(Some(events_rx)),
            accept,
            accept_local: Mutex::new(None),
        })
    }

    /// Enable the same-host path (see `local`): listen on this plane's abstract Unix socket, and
    /// from the next epoch on reach peers whose address is a loopback address or `own_ip` (this
    /// worker's advertised address) over Unix sockets where they listen too, over QUIC where not.
    /// Linux only (an error elsewhere, and the plane stays QUIC-only); call it once.
    pub fn enable_same_host(&self, own_ip: IpAddr) -> Result<()> {
        let port = self.local_addr()?.port();
        let tag = sha256_hex(self.inner.token.as_bytes())[..16].to_string();
        let name = local::socket_name(&tag, port);
        let listener = local::listen(&name)?;
        if self.inner.same_host.set(SameHost { tag, name, own_ip }).is_err() {
            return Err(Error::runtime("the same-host path is enabled already"));
        }
        let task = self
            .inner
            .runtime
            .spawn(accept_local_loop(self.inner.clone(), listener));
        *lock(&self.accept_local) = Some(task);
        Ok(())
    }

    /// Leave the current epoch in order (a dismissed worker): close its connections as at the
    /// start of the next epoch, which the peers take as "it left the epoch", not as a loss.
    pub fn leave_epoch(&self) {
        close_epoch(&mut lock(&self.inner.state), code::EPOCH_OVER, b"epoch over");
    }

    /// Cut the current epoch's link to `peer` as a network failure would (a test hook): the
    /// connection this worker opened to it closes with a code the peer takes as a loss, and this
    /// worker reports the peer lost too ([`PeerEvent::Lost`]).
    pub fn cut_link(&self, peer: WorkerId) {
        let epoch = {
            let st = lock(&self.inner.state);
            let Some(epoch) = st.epoch else { return };
            if let Some(conn) = st.links.get(&peer).and_then(|l| l.conn.get()) {
                conn.close(code::CUT, b"the link was cut");
            }
            epoch
        };
        self.inner
            .report_lost(epoch, peer, "the link was cut (test hook)".to_string());
    }

    /// How the current epoch's links reach each peer (sorted by peer; empty between epochs).
    pub fn link_paths(&self) -> Vec<(WorkerId, LinkPath)> {
        let st = lock(&self.inner.state);
        let mut paths: Vec<(WorkerId, LinkPath)> = st
            .links
            .values()
            .filter_map(|l| l.conn.get().map(|c| (l.peer, c.path())))
            .collect();
        paths.sort_unstable_by_key(|&(w, _)| w);
        paths
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(|e| Error::runtime(format!("the data plane's local address: {e}")))
    }

    /// The events about peers ([`PeerEvent`]): `Some` the first time, `None` after (one consumer).
    pub fn events(&self) -> Option<UnboundedReceiver<PeerEvent>> {
        lock(&self.events).take()
    }

    /// Start membership epoch `epoch` (greater than any before) as worker `me` of `workers`, with
    /// `peers` the address of every member (`me` included, or not). Closes the previous epoch's
    /// connections, connects to every other member and sends the hello, then waits until every
    /// other member's hello of this epoch arrived. Fails, naming the peers, if that takes longer
    /// than `deadline`, or if a peer refuses this worker or its connection fails meanwhile.
    /// Call it from one task at a time.
    pub async fn start_epoch(
        &self,
        me: WorkerId,
        epoch: u64,
        peers: Vec<(WorkerId, SocketAddr)>,
        workers: usize,
        deadline: Duration,
    ) -> Result<(QuicTransport, Inbox)> {
        let until = tokio::time::Instant::now() + deadline;
        let inner = &self.inner;
        if me >= workers {
            return Err(Error::runtime(format!("worker {me} is not one of {workers} workers")));
        }
        let mut addrs = HashMap::new();
        for (w, addr) in peers {
            if w >= workers {
                return Err(Error::runtime(format!(
                    "peer worker {w} is not one of {workers} workers"
                )));
            }
            if w != me && addrs.insert(w, addr).is_some() {
                return Err(Error::runtime(format!("worker {w} is listed twice among the peers")));
            }
        }
        let (inbox_tx, inbox) = unbounded_channel();
        let mut receivers = HashMap::new();
        let links: HashMap<WorkerId, Arc<Link>>;
        {
            let mut st = lock(&inner.state);
            if let Some(old) = st.epoch {
                if epoch <= old {
                    return Err(Error::runtime(format!("epoch {epoch} does not follow epoch {old}")));
                }
            }
            close_epoch(&mut st, code::EPOCH_OVER, b"epoch over");
            st.epoch = Some(epoch);
            st.me = me;
            st.members = addrs.keys().copied().collect();
            st.inbox = Some(inbox_tx.clone());
            for &w in addrs.keys() {
                let (tx, rx) = unbounded_channel();
                receivers.insert(w, rx);
                st.links.insert(
                    w,
                    Arc::new(Link {
                        peer: w,
                        tx,
                        gone: OnceLock::new(),
                        conn: OnceLock::new(),
                    }),
                );
            }
            links = st.links.clone();
            // Hellos of this epoch that came early are admitted now; those of older epochs refused.
            let pending = std::mem::take(&mut st.pending);
            for p in pending {
                if p.hello.epoch == epoch {
                    admit(inner, &mut st, p.hello, p.incoming);
                } else if p.hello.epoch < epoch {
                    p.incoming.close(code::REFUSED, b"stale epoch");
                } else {
                    st.pending.push(p);
                }
            }
        }

        // Connect to every peer at once.
        let mut connecting = tokio::task::JoinSet::new();
        for (&w, &addr) in &addrs {
            let endpoint = inner.endpoint.clone();
            let token = inner.token.clone();
            let hello = Hello {
                token: token.clone(),
                epoch,
                from: me,
            }
            .encode();
            let local_name = inner.same_host.get().and_then(|sh| {
                (addr.ip().is_loopback() || addr.ip() == sh.own_ip).then(|| local::socket_name(&sh.tag, addr.port()))
            });
            connecting.spawn_on(
                async move {
                    let result = async {
                        // Nothing listening under the name (another network namespace, or a
                        // peer without the path) means QUIC; so does a local failure, since QUIC
                        // authenticates the peer by itself.
                        if let Some(name) = local_name {
                            if let Ok(Some(stream)) = local::connect(&name).await {
                                match local::open_handshake(stream, &token, &name, HELLO_TIMEOUT).await {
                                    Ok((read, mut write, proof)) => {
                                        // The token itself never crosses a same-host socket.
                                        let hello = Hello {
                                            token: proof,
                                            epoch,
                                            from: me,
                                        }
                                        .encode();
                                        local::write_frame(&mut write, &hello)
                                            .await
                                            .map_err(|e| format!("cannot send the hello: {e}"))?;
                                        return Ok::<_, String>(Outgoing::Local(read, write));
                                    }
                                    Err(detail) => crate::say!(
                                        "semoe: worker {me}: the same-host socket of worker {w} was \
                                         refused ({detail}); using QUIC"
                                    ),
                                }
                            }
                        }
                        let conn = endpoint
                            .connect(addr, SERVER_NAME)
                            .map_err(|e| format!("cannot connect: {e}"))?
                            .await
                            .map_err(|e| format!("cannot connect: {e}"))?;
                        let mut send = conn
                            .open_uni()
                            .await
                            .map_err(|e| format!("cannot open a stream: {e}"))?;
                        write_frame(&mut send, &hello)
                            .await
                            .map_err(|e| format!("cannot send the hello: {e}"))?;
                        Ok(Outgoing::Quic(conn, send))
                    }
                    .await;
                    (w, addr, result)
                },
                &inner.runtime,
            );
        }
        let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        let mut unconnected: Vec<WorkerId> = addrs.keys().copied().collect();
        unconnected.sort_unstable();
        loop {
            let joined = match tokio::time::timeout_at(until, connecting.join_next()).await {
                Ok(Some(joined)) => joined,
                Ok(None) => break,
                Err(_) => {
                    return Err(Error::Deadline {
                        peer: worker_names(&unconnected),
                        what: format!("the connection of epoch {epoch} from worker {me}"),
                        deadline_ms,
                    })
                }
            };
            let (w, addr, result) = joined.map_err(|e| Error::runtime(format!("a connect task failed: {e}")))?;
            let outgoing = result
                .map_err(|e| Error::runtime(format!("epoch {epoch}: worker {me} to worker {w} at {addr}: {e}")))?;
            unconnected.retain(|&u| u != w);
            let (Some(link), Some(rx)) = (links.get(&w), receivers.remove(&w)) else {
                continue;
            };
            let mut st = lock(&inner.state);
            match outgoing {
                Outgoing::Quic(conn, send) => {
                    let _ = link.conn.set(Conn::Quic(conn.clone()));
                    if st.epoch != Some(epoch) {
                        conn.close(code::EPOCH_OVER.into(), b"epoch over");
                        return Err(Error::runtime(format!("epoch {epoch} was superseded while it started")));
                    }
                    let writer =
                        inner
                            .runtime
                            .spawn(write_loop(inner.clone(), epoch, link.clone(), conn.clone(), send, rx));
                    let watcher = inner.runtime.spawn(watch_outgoing(inner.clone(), epoch, w, conn));
                    st.tasks.push(writer);
                    st.tasks.push(watcher);
                }
                Outgoing::Local(read, write) => {
                    // Dropping the halves (here, or when the tasks are aborted) closes the socket.
                    if st.epoch != Some(epoch) {
                        return Err(Error::runtime(format!("epoch {epoch} was superseded while it started")));
                    }
                    let conn = Arc::new(LocalConn::outgoing());
                    let _ = link.conn.set(Conn::Local(conn.clone()));
                    let writer = inner
                        .runtime
                        .spawn(write_local_loop(inner.clone(), epoch, link.clone(), write, rx));
                    let watcher = inner.runtime.spawn(watch_local_outgoing(inner.clone(), epoch, w, read));
                    conn.own_task(writer.abort_handle());
                    conn.own_task(watcher.abort_handle());
                    st.tasks.push(writer);
                    st.tasks.push(watcher);
                }
            }
        }

        // Wait for every peer's hello.
        loop {
            {
                let st = lock(&inner.state);
                if st.epoch != Some(epoch) {
                    return Err(Error::runtime(format!("epoch {epoch} was superseded while it started")));
                }
                if let Some(link) = links.values().find(|l| l.gone.get().is_some()) {
                    return Err(Error::runtime(format!(
                        "epoch {epoch}: worker {}: {}",
                        link.peer,
                        link.gone.get().map_or("", String::as_str)
                    )));
                }
                let mut missing: Vec<WorkerId> = addrs.keys().copied().filter(|w| !st.arrived.contains(w)).collect();
                if missing.is_empty() {
                    break;
                }
                if tokio::time::Instant::now() >= until {
                    missing.sort_unstable();
                    return Err(Error::Deadline {
                        peer: worker_names(&missing),
                        what: format!("the hello of epoch {epoch} to worker {me}"),
                        deadline_ms,
                    });
                }
            }
            tokio::time::sleep(POLL).await;
        }
        let transport = QuicTransport {
            me,
            workers,
            epoch,
            own: inbox_tx,
            links: Arc::new(links),
        };
        Ok((transport, inbox))
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.accept.abort();
        if let Some(task) = lock(&self.accept_local).take() {
            task.abort();
        }
        // Peers see "shut down" (a loss), not the end of an epoch (which is not reported).
        close_epoch(&mut lock(&self.inner.state), code::SHUTDOWN, b"shut down");
        for p in lock(&self.inner.state).pending.drain(..) {
            p.incoming.close(code::SHUTDOWN, b"shut down");
        }
        self.inner.endpoint.close(code::SHUTDOWN.into(), b"shut down");
    }
}

/// `worker 1, worker 3`.
fn worker_names(workers: &[WorkerId]) -> String {
    let names: Vec<String> = workers.iter().map(|w| format!("worker {w}")).collect();
    names.join(", ")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Close the current epoch's connections with `error_code` and `reason` and stop its tasks (the
/// epoch's inbox closes with them once its transport is dropped).
fn close_epoch(st: &mut EpochState, error_code: u32, reason: &[u8]) {
    // Incoming connections first: a same-host peer then holds the close frame (why) before the
    // connection this worker opened to it ends.
    for conn in st.incoming.drain(..) {
        conn.close(error_code, reason);
    }
    // Connections before their writer tasks: a writer aborted mid-frame drops its stream, which
    // quinn finishes cleanly, and a peer still in this epoch would read a frame cut short (a
    // malformed sender, evicted) where a closed connection reads as the epoch's end.
    for link in st.links.values() {
        let _ = link.gone.set("the epoch is over".to_string());
        if let Some(conn) = link.conn.get() {
            conn.close(error_code, reason);
        }
    }
    for task in st.tasks.drain(..) {
        task.abort();
    }
    st.links.clear();
    st.arrived.clear();
    st.members.clear();
    st.inbox = None;
}

/// Connections whose hello may be awaited at once (each is bounded by [`HELLO_TIMEOUT`] and holds
/// at most [`super::PRE_AUTH_WINDOW`] of data meanwhile); more wait their turn, up to
/// [`HELLO_TIMEOUT`], so that the burst of a large epoch's setup (every peer dials at once) is
/// served, not refused.
pub(super) const HANDSHAKES: usize = 64;

/// Connections that may wait for a handshake place; more are refused at once (each waiting
/// one is a task and its first packets: a flood of them must not grow without bound).
pub(super) const HANDSHAKE_QUEUE: usize = 4 * HANDSHAKES;

/// Accept connections for as long as the endpoint is open.
async fn accept_loop(inner: Arc<Inner>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    let queue = Arc::new(tokio::sync::Semaphore::new(HANDSHAKE_QUEUE));
    while let Some(incoming) = inner.endpoint.accept().await {
        let Ok(place) = queue.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        inner
            .runtime
            .spawn(handle_incoming(inner.clone(), incoming, handshakes.clone(), place));
    }
}

/// Complete the handshake, read and check the hello, then admit the connection to its epoch.
/// `place` is its place in the queue, given back once it has a handshake place (or none).
async fn handle_incoming(
    inner: Arc<Inner>,
    incoming: quinn::Incoming,
    handshakes: Arc<tokio::sync::Semaphore>,
    place: tokio::sync::OwnedSemaphorePermit,
) {
    let handshake = tokio::time::timeout(HELLO_TIMEOUT, handshakes.acquire_owned()).await;
    drop(place);
    let Ok(Ok(handshake)) = handshake else {
        incoming.refuse();
        return;
    };
    // The TLS handshake is bounded too: a client that never finishes it (keeping it alive with
    // pings) would hold a handshake place for good. Dropped unfinished, the connection closes.
    let Ok(Ok(conn)) = tokio::time::timeout(HELLO_TIMEOUT, incoming).await else {
        return;
    };
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        let mut recv = conn.accept_uni().await.map_err(|e| e.to_string())?;
        match reader::read_frame(&mut recv, MAX_HELLO, "the hello").await {
            Ok(Some(bytes)) => Hello::decode(&bytes).map(|h| (h, recv)),
            Ok(None) => Err("the stream ended before the hello".to_string()),
            Err(FrameError::Lost(e)) => Err(e.to_string()),
            Err(FrameError::Protocol(detail) | FrameError::Cut(detail)) => Err(detail),
        }
    })
    .await;
    let (hello, recv) = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(detail)) => {
            conn.close(code::PROTOCOL.into(), truncate(&detail).as_bytes());
            return;
        }
        Err(_) => {
            conn.close(code::PROTOCOL.into(), b"no hello in time");
            return;
        }
    };
    drop(handshake);
    arrive(&inner, hello, Incoming::Quic(conn, recv));
}

/// Accept same-host connections for as long as the plane lives, with the QUIC path's bounds:
/// [`HANDSHAKES`] handshakes at once, [`HANDSHAKE_QUEUE`] waiting, more closed at once (each is a
/// socket and a task for up to [`HELLO_TIMEOUT`]: a flood must not use up the descriptors).
async fn accept_local_loop(inner: Arc<Inner>, listener: tokio::net::UnixListener) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    let queue = Arc::new(tokio::sync::Semaphore::new(HANDSHAKE_QUEUE));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(place) = queue.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                inner
                    .runtime
                    .spawn(handle_local_incoming(inner.clone(), stream, handshakes.clone(), place));
            }
            // A failed accept (out of descriptors, say) leaves the listener usable.
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Check the same-host peer's user and read its hello, then admit the connection to its epoch.
/// `place` is its place in the queue, given back once it has a handshake place (or none).
async fn handle_local_incoming(
    inner: Arc<Inner>,
    stream: UnixStream,
    handshakes: Arc<tokio::sync::Semaphore>,
    place: tokio::sync::OwnedSemaphorePermit,
) {
    let permit = tokio::time::timeout(HELLO_TIMEOUT, handshakes.acquire_owned()).await;
    drop(place);
    let Ok(Ok(handshake)) = permit else {
        return;
    };
    if local::check_same_user(&stream).is_err() {
        return;
    }
    // Set before the listener's task starts.
    let Some(name) = inner.same_host.get().map(|sh| sh.name.clone()) else {
        return;
    };
    let (mut read, mut write) = stream.into_split();
    // The challenge, the answer and the hello, all within the hello's time.
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        let expected = local::accept_handshake(&mut read, &mut write, &inner.token, &name).await?;
        let hello = match reader::read_frame(&mut read, MAX_HELLO, "the hello").await {
            Ok(Some(bytes)) => Hello::decode(&bytes)?,
            Ok(None) => return Err("the stream ended before the hello".to_string()),
            Err(FrameError::Protocol(detail) | FrameError::Cut(detail)) => return Err(detail),
            Err(FrameError::Lost(e)) => return Err(e.to_string()),
        };
        Ok((hello, expected))
    })
    .await;
    drop(handshake);
    let conn = Arc::new(LocalConn::incoming(write));
    match hello {
        Ok(Ok((hello, expected))) => {
            // The hello carries the opener's proof of the token, not the token.
            if !constant_time_eq(hello.token.as_bytes(), expected.as_bytes()) {
                conn.close(code::WRONG_TOKEN, b"wrong token");
                return;
            }
            arrive(&inner, hello, Incoming::Local(conn, read))
        }
        Ok(Err(detail)) => conn.close(code::PROTOCOL, truncate(&detail).as_bytes()),
        Err(_) => conn.close(code::PROTOCOL, b"no hello in time"),
    }
}

/// A connection whose hello was read: refuse a wrong token (a same-host hello's proof was checked
/// before) and a stale epoch, admit the current epoch's, keep a later epoch's until this worker
/// starts it.
fn arrive(inner: &Arc<Inner>, hello: Hello, incoming: Incoming) {
    if let Incoming::Quic(conn, _) = &incoming {
        if !constant_time_eq(hello.token.as_bytes(), inner.token.as_bytes()) {
            incoming.close(code::WRONG_TOKEN, b"wrong token");
            return;
        }
        super::authenticated(conn);
    }
    let mut st = lock(&inner.state);
    match st.epoch {
        Some(current) if hello.epoch == current => admit(inner, &mut st, hello, incoming),
        Some(current) if hello.epoch < current => incoming.close(code::REFUSED, b"stale epoch"),
        // Early hellos wait for their epoch, a bounded number of them (each peer sends one per
        // epoch it forms; a member far ahead, or one that dials again and again, is refused).
        _ if st.pending.len() >= MAX_PENDING => incoming.close(code::REFUSED, b"too many early hellos"),
        _ => st.pending.push(Pending { hello, incoming }),
    }
}

/// The most connections whose hello is for an epoch this worker has not started yet.
const MAX_PENDING: usize = 1024;

/// Admit an authenticated connection whose hello is of the current epoch: start its reader.
fn admit(inner: &Arc<Inner>, st: &mut EpochState, hello: Hello, incoming: Incoming) {
    let peer = hello.from;
    if !st.members.contains(&peer) {
        incoming.close(code::REFUSED, b"not a member of this epoch");
        return;
    }
    if !st.arrived.insert(peer) {
        incoming.close(code::REFUSED, b"a second connection from the same worker");
        return;
    }
    let (Some(epoch), Some(inbox)) = (st.epoch, st.inbox.clone()) else {
        return;
    };
    st.incoming.push(incoming.conn());
    let me = st.me;
    let task = match incoming {
        Incoming::Quic(conn, recv) => inner
            .runtime
            .spawn(read_loop(inner.clone(), epoch, me, peer, conn, recv, inbox)),
        Incoming::Local(conn, recv) => {
            let task = inner.runtime.spawn(read_local_loop(
                inner.clone(),
                epoch,
                me,
                peer,
                conn.clone(),
                recv,
                inbox,
            ));
            conn.own_task(task.abort_handle());
            task
        }
    };
    st.tasks.push(task);
}

/// Deliver the peer's packets into the inbox, in order, until the connection ends.
async fn read_loop(
    inner: Arc<Inner>,
    epoch: u64,
    me: WorkerId,
    peer: WorkerId,
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
    inbox: UnboundedSender<Packet>,
) {
    let split = inner.codec.wire_frames();
    loop {
        let frame = match reader::read_packet(&mut recv, split, inner.frame_limit(), inner.codec.max_bodies()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(FrameError::Lost(e)) => {
                match conn.close_reason() {
                    Some(reason) => connection_closed(&inner, epoch, peer, reason),
                    None => inner.report_lost(epoch, peer, format!("its stream failed: {e}")),
                }
                return;
            }
            Err(FrameError::Cut(detail)) => {
                inner.report_lost(epoch, peer, detail);
                return;
            }
            Err(FrameError::Protocol(detail)) => {
                inner.evict(epoch, peer, &Conn::Quic(conn), detail);
                return;
            }
        };
        match hand_in_frame(&inner, epoch, me, peer, frame, &inbox) {
            // The worker's inbox is gone (its actors stopped, e.g. while a setup replaces them):
            // the frame is dropped and the stream kept, since a stream dropped here would stop the
            // peer's sending and have it report this live worker lost.
            Ok(_) => {}
            Err(detail) => {
                inner.evict(epoch, peer, &Conn::Quic(conn), detail);
                return;
            }
        }
    }
}

/// [`deliver`] a frame as the reader gave it: whole, or split (its checksum already checked).
fn hand_in_frame(
    inner: &Inner,
    epoch: u64,
    me: WorkerId,
    peer: WorkerId,
    frame: SplitFrame,
    inbox: &UnboundedSender<Packet>,
) -> std::result::Result<bool, String> {
    match frame {
        SplitFrame::Whole(bytes) => deliver(inner, epoch, me, peer, &bytes, inbox),
        SplitFrame::Split { head, bodies } => hand_in(inner.codec.decode_parts(&head, bodies, epoch), me, peer, inbox),
    }
}

/// Decode a frame from `peer` and queue its packet for this worker: `Ok(false)` once the inbox is
/// closed, `Err` (what the peer did) when the frame breaks the protocol.
fn deliver(
    inner: &Inner,
    epoch: u64,
    me: WorkerId,
    peer: WorkerId,
    bytes: &[u8],
    inbox: &UnboundedSender<Packet>,
) -> std::result::Result<bool, String> {
    // Checked before anything is decoded: damaged tensor bytes would decode as valid floats.
    let bytes = frame::open(bytes)?;
    let packet = inner.codec.decode(bytes, epoch);
    hand_in(packet, me, peer, inbox)
}

/// Queue a packet decoded from `peer`'s frame for this worker once it is addressed right (see
/// [`deliver`]).
fn hand_in(
    packet: Result<Packet>,
    me: WorkerId,
    peer: WorkerId,
    inbox: &UnboundedSender<Packet>,
) -> std::result::Result<bool, String> {
    let packet = packet.map_err(|e| format!("a frame that does not decode: {e}"))?;
    if packet.from != peer || packet.to != me {
        return Err(format!(
            "a packet from worker {} to worker {} on its connection to worker {me}",
            packet.from, packet.to
        ));
    }
    Ok(inbox.send(packet).is_ok())
}

/// How long a same-host link that ended waits for the peer's close frame on the other connection
/// before it reports the peer lost: a peer that moves to the next epoch closes both connections,
/// and only the one this worker opened tells why. The peer writes that frame before it closes the
/// other connection, so the wait covers only the scheduling of this worker's watcher; a crashed
/// peer's connections both end at once, and the watcher reports it without waiting.
const ENDING_GRACE: Duration = Duration::from_millis(250);

/// [`read_loop`] over a same-host connection.
async fn read_local_loop(
    inner: Arc<Inner>,
    epoch: u64,
    me: WorkerId,
    peer: WorkerId,
    conn: Arc<LocalConn>,
    mut recv: OwnedReadHalf,
    inbox: UnboundedSender<Packet>,
) {
    let split = inner.codec.wire_frames();
    loop {
        let detail = match reader::read_packet(&mut recv, split, inner.frame_limit(), inner.codec.max_bodies()).await {
            // As over QUIC, a frame for an inbox that is gone is dropped and the link kept (a
            // read half dropped here would leave the peer's writes blocked once the socket fills).
            Ok(Some(frame)) => match hand_in_frame(&inner, epoch, me, peer, frame, &inbox) {
                Ok(_) => continue,
                Err(detail) => {
                    inner.evict(epoch, peer, &Conn::Local(conn), detail);
                    return;
                }
            },
            Ok(None) => "the connection ended (the peer process is gone)".to_string(),
            Err(FrameError::Protocol(detail)) => {
                inner.evict(epoch, peer, &Conn::Local(conn), detail);
                return;
            }
            Err(FrameError::Cut(detail)) => detail,
            Err(FrameError::Lost(e)) => e.to_string(),
        };
        inner.lost_unless_closed(epoch, peer, detail).await;
        return;
    }
}

/// [`write_loop`] over a same-host connection.
async fn write_local_loop(
    inner: Arc<Inner>,
    epoch: u64,
    link: Arc<Link>,
    mut send: OwnedWriteHalf,
    mut rx: UnboundedReceiver<Queued>,
) {
    let split = inner.codec.wire_frames();
    while let Some(queued) = rx.recv().await {
        // A damaged frame is damaged in one buffer; any other goes out from the packet's floats.
        let written = if split && !queued.damaged {
            match inner.codec.encode_parts(epoch, &queued.packet) {
                Ok(enc) => local::write_sealed(&mut send, &enc).await,
                Err(e) => return encode_failed(&inner, epoch, &link, &queued, e),
            }
        } else {
            match frame_of(&inner, epoch, &queued) {
                Ok(bytes) => local::write_frame(&mut send, &bytes).await,
                Err(e) => return encode_failed(&inner, epoch, &link, &queued, e),
            }
        };
        if let Err(e) = written {
            inner
                .lost_unless_closed(epoch, link.peer, format!("the connection failed: {e}"))
                .await;
            return;
        }
    }
}

/// A packet for the same-host link's peer could not be encoded: the link is lost (this worker's
/// fault, told to the peer by the close code).
fn encode_failed(inner: &Inner, epoch: u64, link: &Link, queued: &Queued, e: Error) {
    inner.report_lost(
        epoch,
        link.peer,
        format!("this worker could not encode packet {} for it: {e}", queued.packet.id),
    );
    if let Some(conn) = link.conn.get() {
        conn.close(code::INTERNAL, b"the sender could not encode a packet");
    }
}

/// Read why the peer closed the same-host connection this worker opened to it.
async fn watch_local_outgoing(inner: Arc<Inner>, epoch: u64, peer: WorkerId, mut recv: OwnedReadHalf) {
    match local::read_ending(&mut recv).await {
        Ending::Closed(code, reason) => peer_closed(&inner, epoch, peer, code, &reason),
        Ending::Cut(detail) => inner.report_lost(epoch, peer, detail),
    }
}

/// Encode and write the packets queued for one peer, in order.
async fn write_loop(
    inner: Arc<Inner>,
    epoch: u64,
    link: Arc<Link>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut rx: UnboundedReceiver<Queued>,
) {
    while let Some(queued) = rx.recv().await {
        let bytes = match frame_of(&inner, epoch, &queued) {
            Ok(b) => b,
            Err(e) => {
                conn.close(code::INTERNAL.into(), b"the sender could not encode a packet");
                inner.report_lost(
                    epoch,
                    link.peer,
                    format!("this worker could not encode packet {} for it: {e}", queued.packet.id),
                );
                return;
            }
        };
        if let Err(e) = write_frame_owned(&mut send, bytes).await {
            // A peer that moves to the next epoch stops reading first and closes the connection
            // just after: wait a moment for the close, whose reason says whether this is a loss.
            match tokio::time::timeout(Duration::from_secs(1), conn.closed()).await {
                Ok(reason) => connection_closed(&inner, epoch, link.peer, reason),
                Err(_) => inner.report_lost(epoch, link.peer, e.to_string()),
            }
            return;
        }
    }
}

/// Report the connection this worker opened to `peer` when it closes.
async fn watch_outgoing(inner: Arc<Inner>, epoch: u64, peer: WorkerId, conn: quinn::Connection) {
    let reason = conn.closed().await;
    connection_closed(&inner, epoch, peer, reason);
}

/// Classify a closed connection: this worker's own close and a peer's end of epoch are not losses.
fn connection_closed(inner: &Inner, epoch: u64, peer: WorkerId, reason: quinn::ConnectionError) {
    use quinn::ConnectionError as E;
    let detail = match reason {
        E::LocallyClosed => return,
        E::ApplicationClosed(close) => {
            let code = u32::try_from(close.error_code.into_inner()).unwrap_or(u32::MAX);
            return peer_closed(inner, epoch, peer, code, &String::from_utf8_lossy(&close.reason));
        }
        E::TimedOut => format!(
            "the connection timed out (nothing heard for {} ms)",
            super::config::IDLE_TIMEOUT.as_millis()
        ),
        other => format!("the connection failed: {other}"),
    };
    inner.report_lost(epoch, peer, detail);
}

/// The peer closed a connection with `code`: the end of its epoch is not a loss, anything else is.
fn peer_closed(inner: &Inner, epoch: u64, peer: WorkerId, code: u32, reason: &str) {
    if code == code::EPOCH_OVER {
        inner.mark_gone(epoch, peer, "it left the epoch".to_string());
    } else {
        inner.report_lost(epoch, peer, format!("it closed the connection: {reason}"));
    }
}

impl Inner {
    /// The longest packet frame a peer may announce now: the codec's bound and the checksum.
    fn frame_limit(&self) -> usize {
        self.codec.max_frame().saturating_add(frame::CHECKSUM_BYTES)
    }

    /// Report `peer` lost unless, within [`ENDING_GRACE`], it is marked gone otherwise (its close
    /// frame says it only left the epoch).
    async fn lost_unless_closed(&self, epoch: u64, peer: WorkerId, detail: String) {
        let until = tokio::time::Instant::now() + ENDING_GRACE;
        while tokio::time::Instant::now() < until {
            {
                let st = lock(&self.state);
                let gone = st.links.get(&peer).is_none_or(|l| l.gone.get().is_some());
                if st.epoch != Some(epoch) || gone {
                    return;
                }
            }
            tokio::time::sleep(POLL).await;
        }
        self.report_lost(epoch, peer, detail);
    }

    /// Mark `peer` gone in `epoch` without an event; true when this was the first mark.
    fn mark_gone(&self, epoch: u64, peer: WorkerId, detail: String) -> bool {
        let st = lock(&self.state);
        if st.epoch != Some(epoch) {
            return false;
        }
        st.links.get(&peer).is_some_and(|link| link.gone.set(detail).is_ok())
    }

    fn report_lost(&self, epoch: u64, peer: WorkerId, detail: String) {
        if self.mark_gone(epoch, peer, detail.clone()) {
            let _ = self.events.send(PeerEvent::Lost { epoch, peer, detail });
        }
    }

    /// Close both connections with `peer` and report it evicted.
    fn evict(&self, epoch: u64, peer: WorkerId, incoming: &Conn, detail: String) {
        let reason = truncate(&format!("protocol violation: {detail}"));
        incoming.close(code::PROTOCOL, reason.as_bytes());
        let st = lock(&self.state);
        if st.epoch != Some(epoch) {
            return;
        }
        let Some(link) = st.links.get(&peer) else { return };
        if let Some(out) = link.conn.get() {
            out.close(code::PROTOCOL, reason.as_bytes());
        }
        if link.gone.set(format!("evicted: {detail}")).is_ok() {
            let _ = self.events.send(PeerEvent::Evicted { epoch, peer, detail });
        }
    }
}

/// A close reason short enough for a CONNECTION_CLOSE frame.
fn truncate(s: &str) -> String {
    let mut end = s.len().min(400);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// One worker's transport in one epoch: packets to itself go straight into its inbox, packets to a
/// peer into that peer's queue, which a writer task drains onto the peer's stream.
#[derive(Clone)]
pub struct QuicTransport {
    me: WorkerId,
    workers: usize,
    epoch: u64,
    own: UnboundedSender<Packet>,
    links: Arc<HashMap<WorkerId, Arc<Link>>>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("me", &self.me)
            .field("workers", &self.workers)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl QuicTransport {
    /// The membership epoch this transport belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl QuicTransport {
    /// Queue `packet` for its peer (`damaged`: flip a byte of its frame after the checksum).
    fn queue(&self, packet: Packet, damaged: bool) -> Result<()> {
        let to = packet.to;
        if packet.from != self.me {
            return Err(Error::runtime(format!(
                "worker {} cannot send a packet from worker {}",
                self.me, packet.from
            )));
        }
        if to == self.me {
            return self
                .own
                .send(packet)
                .map_err(|_| Error::runtime(format!("worker {to}'s inbox of epoch {} is closed", self.epoch)));
        }
        let link = self.links.get(&to).ok_or_else(|| {
            Error::runtime(format!(
                "worker {to} is not a peer of worker {} in epoch {}",
                self.me, self.epoch
            ))
        })?;
        if let Some(why) = link.gone.get() {
            return Err(Error::runtime(format!(
                "worker {to} is gone from epoch {}: {why}",
                self.epoch
            )));
        }
        link.tx
            .send(Queued { packet, damaged })
            .map_err(|_| Error::runtime(format!("worker {to}'s connection of epoch {} is closed", self.epoch)))
    }
}

impl Transport for QuicTransport {
    fn id(&self) -> WorkerId {
        self.me
    }

    fn workers(&self) -> usize {
        self.workers
    }

    fn send(&self, packet: Packet) -> Result<()> {
        self.queue(packet, false)
    }

    /// Real bytes travel: the frame is damaged after its checksum, and the receiver refuses it
    /// and evicts this worker (a packet to itself never leaves the process and goes undamaged).
    fn send_damaged(&self, packet: Packet) -> Option<Result<()>> {
        Some(self.queue(packet, true))
    }
}
