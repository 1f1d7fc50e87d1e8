//! The authenticated data plane between worker processes: one per process, living across
//! membership epochs. See the module documentation of [`super`] for the topology.

use super::frame::{read_frame_raw, write_frame, write_frame_owned, FrameError};
use super::identity::constant_time_eq;
use super::identity::SERVER_NAME;
use crate::error::{Error, Result};
use crate::net::{Inbox, Packet, Transport, WorkerId};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
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
}

/// The largest packet frame accepted (its length is checked before anything is allocated).
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
    tx: UnboundedSender<Packet>,
    /// Set once, when the peer is lost or evicted: why. Sends fail from then on.
    gone: OnceLock<String>,
    /// The connection this worker opened to the peer (set once connected).
    conn: OnceLock<quinn::Connection>,
}

/// An incoming connection whose hello arrived before this worker started the hello's epoch.
struct Pending {
    hello: Hello,
    conn: quinn::Connection,
    recv: quinn::RecvStream,
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
    incoming: Vec<quinn::Connection>,
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
}

/// One worker process's data plane: accepts authenticated connections from its peers and, per
/// epoch, connects to every peer and hands out a [`QuicTransport`] and an [`Inbox`].
pub struct DataPlane {
    inner: Arc<Inner>,
    events: Mutex<Option<UnboundedReceiver<PeerEvent>>>,
    accept: JoinHandle<()>,
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
        });
        let accept = runtime.spawn(accept_loop(inner.clone()));
        Ok(DataPlane {
            inner,
            events: Mutex::new(Some(events_rx)),
            accept,
        })
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
                    admit(inner, &mut st, p.hello, p.conn, p.recv);
                } else if p.hello.epoch < epoch {
                    p.conn.close(code::REFUSED.into(), b"stale epoch");
                } else {
                    st.pending.push(p);
                }
            }
        }

        // Connect to every peer at once.
        let mut connecting = tokio::task::JoinSet::new();
        for (&w, &addr) in &addrs {
            let endpoint = inner.endpoint.clone();
            let hello = Hello {
                token: inner.token.clone(),
                epoch,
                from: me,
            }
            .encode();
            connecting.spawn_on(
                async move {
                    let result = async {
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
                        Ok::<_, String>((conn, send))
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
            let (conn, send) = result
                .map_err(|e| Error::runtime(format!("epoch {epoch}: worker {me} to worker {w} at {addr}: {e}")))?;
            unconnected.retain(|&u| u != w);
            let (Some(link), Some(rx)) = (links.get(&w), receivers.remove(&w)) else {
                continue;
            };
            let _ = link.conn.set(conn.clone());
            let mut st = lock(&inner.state);
            if st.epoch != Some(epoch) {
                conn.close(code::EPOCH_OVER.into(), b"epoch over");
                return Err(Error::runtime(format!("epoch {epoch} was superseded while it started")));
            }
            let writer = inner
                .runtime
                .spawn(write_loop(inner.clone(), epoch, link.clone(), conn.clone(), send, rx));
            let watcher = inner.runtime.spawn(watch_outgoing(inner.clone(), epoch, w, conn));
            st.tasks.push(writer);
            st.tasks.push(watcher);
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
        // Peers see "shut down" (a loss), not the end of an epoch (which is not reported).
        close_epoch(&mut lock(&self.inner.state), code::SHUTDOWN, b"shut down");
        for p in lock(&self.inner.state).pending.drain(..) {
            p.conn.close(code::SHUTDOWN.into(), b"shut down");
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
    for task in st.tasks.drain(..) {
        task.abort();
    }
    for link in st.links.values() {
        let _ = link.gone.set("the epoch is over".to_string());
        if let Some(conn) = link.conn.get() {
            conn.close(error_code.into(), reason);
        }
    }
    for conn in st.incoming.drain(..) {
        conn.close(error_code.into(), reason);
    }
    st.links.clear();
    st.arrived.clear();
    st.members.clear();
    st.inbox = None;
}

/// Accept connections for as long as the endpoint is open.
async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        inner.runtime.spawn(handle_incoming(inner.clone(), incoming));
    }
}

/// Complete the handshake, read and check the hello, then admit the connection to its epoch.
async fn handle_incoming(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let Ok(conn) = incoming.await else { return };
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        let mut recv = conn.accept_uni().await.map_err(|e| e.to_string())?;
        match read_frame_raw(&mut recv, MAX_HELLO, "the hello").await {
            Ok(Some(bytes)) => Hello::decode(&bytes).map(|h| (h, recv)),
            Ok(None) => Err("the stream ended before the hello".to_string()),
            Err(FrameError::Lost(e)) => Err(e.to_string()),
            Err(FrameError::Protocol(detail)) => Err(detail),
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
    if !constant_time_eq(hello.token.as_bytes(), inner.token.as_bytes()) {
        conn.close(code::WRONG_TOKEN.into(), b"wrong token");
        return;
    }
    let mut st = lock(&inner.state);
    match st.epoch {
        Some(current) if hello.epoch == current => admit(&inner, &mut st, hello, conn, recv),
        Some(current) if hello.epoch < current => conn.close(code::REFUSED.into(), b"stale epoch"),
        _ => st.pending.push(Pending { hello, conn, recv }),
    }
}

/// Admit an authenticated connection whose hello is of the current epoch: start its reader.
fn admit(inner: &Arc<Inner>, st: &mut EpochState, hello: Hello, conn: quinn::Connection, recv: quinn::RecvStream) {
    let peer = hello.from;
    if !st.members.contains(&peer) {
        conn.close(code::REFUSED.into(), b"not a member of this epoch");
        return;
    }
    if !st.arrived.insert(peer) {
        conn.close(code::REFUSED.into(), b"a second connection from the same worker");
        return;
    }
    let (Some(epoch), Some(inbox)) = (st.epoch, st.inbox.clone()) else {
        return;
    };
    st.incoming.push(conn.clone());
    let me = st.me;
    let task = inner
        .runtime
        .spawn(read_loop(inner.clone(), epoch, me, peer, conn, recv, inbox));
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
    loop {
        let bytes = match read_frame_raw(&mut recv, MAX_PACKET_FRAME, "a packet frame").await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return,
            Err(FrameError::Lost(e)) => {
                match conn.close_reason() {
                    Some(reason) => connection_closed(&inner, epoch, peer, reason),
                    None => inner.report_lost(epoch, peer, format!("its stream failed: {e}")),
                }
                return;
            }
            Err(FrameError::Protocol(detail)) => {
                inner.evict(epoch, peer, &conn, detail);
                return;
            }
        };
        let packet = match inner.codec.decode(&bytes, epoch) {
            Ok(p) => p,
            Err(e) => {
                inner.evict(epoch, peer, &conn, format!("a frame that does not decode: {e}"));
                return;
            }
        };
        if packet.from != peer || packet.to != me {
            let detail = format!(
                "a packet from worker {} to worker {} on its connection to worker {me}",
                packet.from, packet.to
            );
            inner.evict(epoch, peer, &conn, detail);
            return;
        }
        if inbox.send(packet).is_err() {
            return;
        }
    }
}

/// Encode and write the packets queued for one peer, in order.
async fn write_loop(
    inner: Arc<Inner>,
    epoch: u64,
    link: Arc<Link>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut rx: UnboundedReceiver<Packet>,
) {
    while let Some(packet) = rx.recv().await {
        let bytes = match inner.codec.encode(epoch, &packet) {
            Ok(b) => b,
            Err(e) => {
                conn.close(code::INTERNAL.into(), b"the sender could not encode a packet");
                inner.report_lost(
                    epoch,
                    link.peer,
                    format!("this worker could not encode packet {} for it: {e}", packet.id),
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
        E::ApplicationClosed(close) if close.error_code == code::EPOCH_OVER.into() => {
            inner.mark_gone(epoch, peer, "it left the epoch".to_string());
            return;
        }
        E::ApplicationClosed(close) => format!("it closed the connection: {}", String::from_utf8_lossy(&close.reason)),
        E::TimedOut => format!(
            "the connection timed out (nothing heard for {} ms)",
            super::config::IDLE_TIMEOUT.as_millis()
        ),
        other => format!("the connection failed: {other}"),
    };
    inner.report_lost(epoch, peer, detail);
}

impl Inner {
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
    fn evict(&self, epoch: u64, peer: WorkerId, incoming: &quinn::Connection, detail: String) {
        let reason = truncate(&format!("protocol violation: {detail}"));
        incoming.close(code::PROTOCOL.into(), reason.as_bytes());
        let st = lock(&self.state);
        if st.epoch != Some(epoch) {
            return;
        }
        let Some(link) = st.links.get(&peer) else { return };
        if let Some(out) = link.conn.get() {
            out.close(code::PROTOCOL.into(), reason.as_bytes());
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

impl Transport for QuicTransport {
    fn id(&self) -> WorkerId {
        self.me
    }

    fn workers(&self) -> usize {
        self.workers
    }

    fn send(&self, packet: Packet) -> Result<()> {
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
            .send(packet)
            .map_err(|_| Error::runtime(format!("worker {to}'s connection of epoch {} is closed", self.epoch)))
    }
}
