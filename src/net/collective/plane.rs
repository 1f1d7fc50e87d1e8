//! The CPU stand-in of an NCCL communicator between processes: one rank's end, over the worker's
//! data plane (any [`Transport`]: QUIC or Unix sockets between worker processes, channels in
//! tests). It keeps NCCL's rules as strictly as the in-process stand-in ([`super::sim`]) does, with
//! what one rank can see:
//!
//! - every collective sends a message to **every** peer, also where the rank has nothing to send
//!   (a group's message then says "nothing"), tagged with the lane, the generation and the
//!   collective's index. So a receiver sees every peer's side of every collective, and refuses
//!   another kind of collective, another index, a send it posted no receive for, a receive the peer
//!   sends nothing to, or another size, naming the ranks and the counts.
//! - a peer that never issues a collective makes this rank fail at its deadline with an error
//!   naming the peer, never hang.
//! - an abort (this rank's, through [`super::AbortHandle`], or the whole [`Mailbox`] closed when the
//!   membership epoch ends) fails the pending and every later call at once.
//!
//! Messages arrive through the worker's packet pump into a [`Mailbox`] shared by every lane of the
//! worker; they are kept per (generation, lane) and per peer, in arrival order (the transport keeps
//! each pair of workers in order). A generation is named by the step (and attempt) whose exchange
//! built it, which every rank agrees on: a replay after an abort builds the next one at the same
//! step and attempt on every rank. Messages of older generations are dropped.
//!
//! Telling peers about an abort is the caller's (`actors::collectives`): an [`PlaneOp::Abort`]
//! message carries it, and [`Mailbox::deliver`] hands it back rather than queueing it.

use super::sim::list;
use super::{AbortHandle, Collective, CollectiveId, Group, Op, Rank};
use crate::error::{Error, Result};
use crate::net::{Packet, Payload, StepId, Transport};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The most messages one peer may have queued ahead of this rank: a rank runs at most one
/// collective ahead of its peers per lane (each collective waits for every rank's message), so more
/// is a broken peer: every communicator of the mailbox then fails, rather than buffering without
/// bound. (The bytes queued are bounded too: [`Mailbox::with_budget`].)
pub const MAX_QUEUED: usize = 1024;

/// Bytes carried as floats: the data plane's bodies are `f32`s (raw little-endian bytes on the
/// wire), so a byte buffer travels padded to whole floats, with its length in bytes. The bits are
/// copied, never computed on.
#[derive(Clone, Debug)]
pub struct PlaneData {
    bytes: usize,
    words: Vec<f32>,
}

/// Equal when the bytes are (the floats compared by their bits: bytes may spell a NaN).
impl PartialEq for PlaneData {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
            && bytemuck::cast_slice::<f32, u8>(&self.words) == bytemuck::cast_slice::<f32, u8>(&other.words)
    }
}

impl PlaneData {
    /// `bytes`, padded with zeros to a whole number of floats.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut words = vec![0f32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<f32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        PlaneData {
            bytes: bytes.len(),
            words,
        }
    }

    /// `bytes` bytes carried in `words`, which must be exactly the floats that hold them.
    pub fn from_words(bytes: usize, words: Vec<f32>) -> Result<Self> {
        if words.len() != bytes.div_ceil(4) {
            return Err(Error::runtime(format!(
                "{bytes} bytes of a collective carried in {} floats (expected {})",
                words.len(),
                bytes.div_ceil(4)
            )));
        }
        Ok(PlaneData { bytes, words })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether it carries no byte.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The floats that carry the bytes (the wire's body).
    pub fn words(&self) -> &[f32] {
        &self.words
    }

    /// The bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        bytemuck::cast_slice::<f32, u8>(&self.words)[..self.bytes].to_vec()
    }
}

/// What a message of the stand-in carries.
#[derive(Clone, Debug, PartialEq)]
pub enum PlaneOp {
    /// The sender's count for the receiver, in an all-to-all of counts.
    Count(u64),
    /// The sender's send to the receiver in a group, or `None`: it posted none to it.
    Group(Option<PlaneData>),
    /// The sender aborted its communicators during `step`, because of `reason` (`restartable`: a
    /// replay repairs it). Not queued: [`Mailbox::deliver`] hands it to the caller.
    Abort {
        /// The step during which it failed.
        step: StepId,
        /// Whether a replay repairs it.
        restartable: bool,
        /// Why, naming the worker.
        reason: String,
    },
}

impl PlaneOp {
    fn name(&self) -> &'static str {
        match self {
            PlaneOp::Count(_) => "an all-to-all of counts",
            PlaneOp::Group(_) => "a grouped send/recv",
            PlaneOp::Abort { .. } => "an abort",
        }
    }
}

/// One message of the stand-in between two ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct PlaneMsg {
    /// The lane (one communicator per lane).
    pub lane: usize,
    /// The generation: the step whose exchange built the communicator.
    pub generation: StepId,
    /// The communicator's name: a digest of the id the coordinator gave every rank for it
    /// ([`comm_digest`]); a rank that got another id is refused.
    pub comm: u64,
    /// The collective's index in the communicator's sequence.
    pub index: u64,
    /// What it carries.
    pub op: PlaneOp,
}

/// An abort a peer announced (see [`PlaneOp::Abort`]).
#[derive(Clone, Debug, PartialEq)]
pub struct AbortNotice {
    /// The peer.
    pub from: Rank,
    /// The step during which it failed.
    pub step: StepId,
    /// Whether a replay repairs it.
    pub restartable: bool,
    /// Why.
    pub reason: String,
}

/// A communicator id's name in messages: FNV-1a of its bytes.
pub fn comm_digest(id: &[u8]) -> u64 {
    id.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

type Key = (StepId, usize);

/// A message as it waits in a mailbox.
struct Queued {
    index: u64,
    comm: u64,
    op: PlaneOp,
}

impl Queued {
    /// The bytes it holds (what the mailbox's budget counts).
    fn bytes(&self) -> usize {
        match &self.op {
            PlaneOp::Group(Some(data)) => data.len(),
            _ => 0,
        }
    }
}

#[derive(Default)]
struct MailState {
    /// Generations below this one are over: their messages are dropped.
    floor: Option<StepId>,
    /// Per (generation, lane), per peer, in arrival order.
    queues: BTreeMap<Key, Vec<VecDeque<Queued>>>,
    /// Communicators aborted on this rank, with the reason.
    aborted: BTreeMap<Key, String>,
    /// Every communicator is over (the membership epoch ended, or a peer was lost).
    closed: Option<String>,
    /// Messages and bytes queued per peer, for [`MAX_QUEUED`] and the budget.
    queued: Vec<(usize, usize)>,
}

/// The messages that arrived for one worker's communicators, from its packet pump.
pub struct Mailbox {
    world: usize,
    /// The most bytes one peer may have queued.
    budget: usize,
    state: Mutex<MailState>,
    changed: Condvar,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").field("world", &self.world).finish()
    }
}

impl Mailbox {
    /// A mailbox for a rank among `world`, a peer's queued bytes bounded only by [`MAX_QUEUED`]
    /// messages.
    pub fn new(world: usize) -> Arc<Self> {
        Self::with_budget(world, usize::MAX)
    }

    /// A mailbox for a rank among `world` in which one peer may have at most `budget` bytes queued
    /// (a few of its largest messages: see [`MAX_QUEUED`]).
    pub fn with_budget(world: usize, budget: usize) -> Arc<Self> {
        Arc::new(Mailbox {
            world,
            budget,
            state: Mutex::new(MailState {
                queued: vec![(0, 0); world],
                ..MailState::default()
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, MailState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A message from rank `from`: queued for its communicator, dropped when its generation is
    /// over, or (an abort) handed back for the caller to act on.
    pub fn deliver(&self, from: Rank, msg: PlaneMsg) -> Option<AbortNotice> {
        if from >= self.world {
            return None;
        }
        if let PlaneOp::Abort {
            step,
            restartable,
            reason,
        } = msg.op
        {
            return Some(AbortNotice {
                from,
                step,
                restartable,
                reason,
            });
        }
        let mut st = self.lock();
        if st.closed.is_some() || st.floor.is_some_and(|floor| msg.generation < floor) {
            return None;
        }
        let key = (msg.generation, msg.lane);
        let queued = Queued {
            index: msg.index,
            comm: msg.comm,
            op: msg.op,
        };
        let (count, bytes) = st.queued[from];
        if count >= MAX_QUEUED || bytes.saturating_add(queued.bytes()) > self.budget {
            // A broken peer: every communicator fails (one reason, kept once), its messages
            // dropped.
            st.closed = Some(format!(
                "rank {from} sent more than {} messages or {} bytes ahead of this rank",
                MAX_QUEUED, self.budget
            ));
            st.queues.clear();
            st.queued = vec![(0, 0); self.world];
        } else {
            st.queued[from] = (count + 1, bytes + queued.bytes());
            let world = self.world;
            let queues = st
                .queues
                .entry(key)
                .or_insert_with(|| (0..world).map(|_| VecDeque::new()).collect());
            if let Some(queue) = queues.get_mut(from) {
                queue.push_back(queued);
            }
        }
        drop(st);
        self.changed.notify_all();
        None
    }

    /// The generation `generation` starts on this rank: the messages of older ones are dropped.
    pub fn advance(&self, generation: StepId) {
        let mut st = self.lock();
        if st.floor.is_some_and(|floor| floor >= generation) {
            return;
        }
        st.floor = Some(generation);
        let old: Vec<Key> = st.queues.range(..(generation, 0)).map(|(k, _)| *k).collect();
        for key in old {
            if let Some(queues) = st.queues.remove(&key) {
                for (peer, q) in queues.iter().enumerate() {
                    let (count, bytes) = &mut st.queued[peer];
                    *count = count.saturating_sub(q.len());
                    *bytes = bytes.saturating_sub(q.iter().map(Queued::bytes).sum());
                }
            }
        }
        st.aborted = st.aborted.split_off(&(generation, 0));
    }

    /// Every communicator is over (the epoch ended, or a peer was lost): pending and later calls
    /// fail at once, naming `reason`.
    pub fn close(&self, reason: &str) {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(reason.to_string());
        }
        drop(st);
        self.changed.notify_all();
    }

    fn abort(&self, key: Key, reason: String) {
        self.lock().aborted.entry(key).or_insert(reason);
        self.changed.notify_all();
    }

    /// Why `key`'s communicator can no longer be used, if it cannot (also when a newer
    /// generation replaced it: its peers have dropped it).
    fn broken(st: &MailState, key: &Key) -> Option<String> {
        st.closed.clone().or_else(|| st.aborted.get(key).cloned()).or_else(|| {
            st.floor
                .filter(|floor| key.0 < *floor)
                .map(|floor| format!("the generation of step {floor} replaced it"))
        })
    }
}

/// One rank of a communicator over the data plane: lane `lane` of generation `generation`.
pub struct PlaneCollective {
    rank: Rank,
    world: usize,
    lane: usize,
    generation: StepId,
    comm: u64,
    epoch: u64,
    deadline: Duration,
    next: u64,
    transport: Arc<dyn Transport>,
    mailbox: Arc<Mailbox>,
}

impl PlaneCollective {
    /// This worker's end of lane `lane`'s communicator of `generation`, with the id the
    /// coordinator gave every rank for it (`id`), named `epoch` in errors; over `transport`,
    /// reading `mailbox`; every collective bounded by `deadline`. Building it exchanges nothing:
    /// the first collective meets the peers.
    pub fn new(
        transport: Arc<dyn Transport>,
        mailbox: Arc<Mailbox>,
        lane: usize,
        generation: StepId,
        id: &[u8],
        epoch: u64,
        deadline: Duration,
    ) -> Result<Self> {
        let (rank, world) = (transport.id(), transport.workers());
        if mailbox.world != world || rank >= world {
            return Err(Error::config(format!(
                "a communicator of rank {rank} among {world} with a mailbox for {} ranks",
                mailbox.world
            )));
        }
        mailbox.advance(generation);
        Ok(PlaneCollective {
            rank,
            world,
            lane,
            generation,
            comm: comm_digest(id),
            epoch,
            deadline,
            next: 0,
            transport,
            mailbox,
        })
    }

    fn key(&self) -> Key {
        (self.generation, self.lane)
    }

    fn next_id(&mut self, op: Op) -> CollectiveId {
        let id = CollectiveId {
            epoch: self.epoch,
            index: self.next,
            op,
        };
        self.next += 1;
        id
    }

    /// Fail `id` with `detail`, aborting this rank's end: it will not issue the rest.
    fn fail(&self, id: CollectiveId, detail: String) -> Error {
        self.mailbox
            .abort(self.key(), format!("rank {}'s {id} failed: {detail}", self.rank));
        Error::collective(id.to_string(), self.rank, detail)
    }

    /// Send `op(peer)` to every peer (this rank excluded).
    fn send_all(&self, id: CollectiveId, mut op: impl FnMut(Rank) -> PlaneOp) -> Result<()> {
        if let Some(reason) = Mailbox::broken(&self.mailbox.lock(), &self.key()) {
            return Err(Error::collective(
                id.to_string(),
                self.rank,
                format!("the communicator was aborted ({reason})"),
            ));
        }
        for peer in (0..self.world).filter(|&p| p != self.rank) {
            let packet = Packet {
                from: self.rank,
                to: peer,
                id: 0,
                payload: Payload::Collective(PlaneMsg {
                    lane: self.lane,
                    generation: self.generation,
                    comm: self.comm,
                    index: id.index,
                    op: op(peer),
                }),
            };
            if let Err(e) = self.transport.send(packet) {
                return Err(self.fail(id, format!("cannot send to rank {peer}: {e}")));
            }
        }
        Ok(())
    }

    /// Every peer's message of collective `id` (element `j` from rank `j`; this rank's `None`),
    /// each checked to be the same collective, waiting until the deadline.
    fn receive_all(&self, id: CollectiveId) -> Result<Vec<Option<PlaneOp>>> {
        let until = Instant::now() + self.deadline;
        let key = self.key();
        let mut got: Vec<Option<PlaneOp>> = (0..self.world).map(|_| None).collect();
        let mut st = self.mailbox.lock();
        loop {
            if let Some(reason) = Mailbox::broken(&st, &key) {
                return Err(Error::collective(
                    id.to_string(),
                    self.rank,
                    format!("the communicator was aborted ({reason})"),
                ));
            }
            let st_ = &mut *st;
            if let Some(queues) = st_.queues.get_mut(&key) {
                for (peer, queue) in queues.iter_mut().enumerate() {
                    if peer == self.rank || got[peer].is_some() {
                        continue;
                    }
                    if let Some(queued) = queue.pop_front() {
                        let (count, bytes) = &mut st_.queued[peer];
                        *count = count.saturating_sub(1);
                        *bytes = bytes.saturating_sub(queued.bytes());
                        let Queued { index, comm, op } = queued;
                        got[peer] = Some(op);
                        if comm != self.comm {
                            drop(st);
                            return Err(self.fail(
                                id,
                                format!(
                                    "rank {peer} is in another communicator of this generation (id {comm:016x}, this rank's {:016x}): the ranks were not given the same ids",
                                    self.comm
                                ),
                            ));
                        }
                        if index != id.index {
                            let name = got[peer].as_ref().map_or("", PlaneOp::name);
                            drop(st);
                            return Err(self.fail(
                                id,
                                format!(
                                    "rank {peer} sent its collective {index} ({name}) where this rank is at collective {}: the ranks issued different sequences",
                                    id.index
                                ),
                            ));
                        }
                    }
                }
            }
            let missing: Vec<Rank> = (0..self.world)
                .filter(|&p| p != self.rank && got[p].is_none())
                .collect();
            if missing.is_empty() {
                return Ok(got);
            }
            let now = Instant::now();
            if now >= until {
                drop(st);
                let ranks = list(&missing);
                self.mailbox.abort(
                    key,
                    format!(
                        "rank {}'s {id} missed its deadline: {ranks} did not issue it",
                        self.rank
                    ),
                );
                return Err(Error::Deadline {
                    peer: ranks,
                    what: format!("{id} (rank {} waited for it)", self.rank),
                    deadline_ms: self.deadline.as_millis() as u64,
                });
            }
            st = self
                .mailbox
                .changed
                .wait_timeout(st, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Collective for PlaneCollective {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn deadline(&self) -> Duration {
        self.deadline
    }

    fn all_to_all_counts(&mut self, counts: &[u64]) -> Result<Vec<u64>> {
        let id = self.next_id(Op::Counts);
        if counts.len() != self.world {
            return Err(self.fail(id, format!("{} counts posted for {} ranks", counts.len(), self.world)));
        }
        self.send_all(id, |peer| PlaneOp::Count(counts[peer]))?;
        let got = self.receive_all(id)?;
        let mut out = vec![0u64; self.world];
        for (peer, op) in got.into_iter().enumerate() {
            out[peer] = match op {
                None => counts[self.rank],
                Some(PlaneOp::Count(count)) => count,
                Some(other) => {
                    return Err(self.fail(
                        id,
                        format!(
                            "the ranks issued different collectives: rank {peer} issued {}, rank {} an all-to-all of counts (every rank must issue the same collectives in the same order)",
                            other.name(),
                            self.rank
                        ),
                    ))
                }
            };
        }
        Ok(out)
    }

    fn group(&mut self, group: Group) -> Result<Vec<(Rank, Vec<u8>)>> {
        let id = self.next_id(Op::Group);
        let (me, world) = (self.rank, self.world);
        if let Err(e) = group.validate(id, me, world) {
            self.mailbox
                .abort(self.key(), format!("rank {me} posted an invalid group: {e}"));
            return Err(e);
        }
        let (sends, recvs) = group.into_parts();
        let mut outgoing: Vec<Option<Vec<u8>>> = vec![None; world];
        for (peer, data) in sends {
            outgoing[peer] = Some(data);
        }
        let own = outgoing[me].take();
        self.send_all(id, |peer| {
            PlaneOp::Group(outgoing[peer].take().map(|data| PlaneData::from_bytes(&data)))
        })?;
        let got = self.receive_all(id)?;
        let mut posted: Vec<Option<usize>> = vec![None; world];
        for &(peer, bytes) in &recvs {
            posted[peer] = Some(bytes);
        }
        let mut incoming: Vec<Option<Vec<u8>>> = vec![None; world];
        incoming[me] = own;
        for (peer, op) in got.into_iter().enumerate() {
            match op {
                None => {}
                Some(PlaneOp::Group(data)) => incoming[peer] = data.map(PlaneData::into_bytes),
                Some(other) => {
                    return Err(self.fail(
                        id,
                        format!(
                            "the ranks issued different collectives: rank {peer} issued {}, rank {me} a grouped send/recv (every rank must issue the same collectives in the same order)",
                            other.name()
                        ),
                    ))
                }
            }
        }
        for peer in 0..world {
            let broken = match (&incoming[peer], posted[peer]) {
                (Some(data), Some(bytes)) if data.len() != bytes => Some(format!(
                    "rank {peer} sends {} bytes to rank {me}, which posted a receive of {bytes} bytes from rank {peer}",
                    data.len()
                )),
                (Some(data), None) => Some(format!(
                    "rank {peer} sends {} bytes to rank {me}, which posted no receive from rank {peer}",
                    data.len()
                )),
                (None, Some(bytes)) => Some(format!(
                    "rank {me} posted a receive of {bytes} bytes from rank {peer}, which sends it nothing"
                )),
                _ => None,
            };
            if let Some(detail) = broken {
                return Err(self.fail(id, detail));
            }
        }
        Ok(recvs
            .iter()
            .map(|&(peer, _)| (peer, incoming[peer].take().unwrap_or_default()))
            .collect())
    }

    fn abort_handle(&self) -> AbortHandle {
        let (mailbox, key) = (self.mailbox.clone(), self.key());
        AbortHandle::new(
            self.rank,
            Arc::new(move |rank, reason| mailbox.abort(key, format!("rank {rank} aborted it: {reason}"))),
        )
    }
}
