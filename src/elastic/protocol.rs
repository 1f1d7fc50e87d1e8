//! The control protocol between the coordinator and its worker processes: what travels on the QUIC
//! control connection, and how each message is framed and bounded.
//!
//! Every message is one frame (`net::wire`): a bincode 2 header, decoded with an explicit size
//! limit, then raw little-endian tensor bodies. Joining is two rounds on the session stream the
//! worker opens:
//!
//! ```text
//! worker -> Hello { protocol, version, token, name, config? }
//! coord  -> Offer { config }                                  or Refused { reason }
//! worker -> Ready { corpus digest, kernel fingerprint, data address }
//! coord  -> Admitted { member, job certificate and key }      or Refused { reason }
//! worker -> Notice ...   (the session stream then carries the worker's notices)
//! ```
//!
//! After that the coordinator opens one bidirectional stream per command ([`Command`]) and reads
//! one [`Reply`]. Every command names the membership epoch; a worker refuses a command of an epoch
//! other than its own.

use super::handover::Pieces;
use crate::actors::collectives::CommIds;
use crate::actors::ledger::LedgerSnapshot;
use crate::actors::worker::NormPart;
use crate::chaos::{Fault, FaultKind, Moment, Target};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::gpt::{Gpt, GroupOutput};
use crate::model::moe::MoeStats;
use crate::net::collective::NCCL_ID_BYTES;
use crate::net::wire::{self, Limits};
use crate::optimizer::AdamW;
use crate::storage::tiers::ExpertSlot;

pub use super::fingerprint::KernelFingerprint;

/// The protocol's version: both sides must speak the same one.
pub const PROTOCOL: u32 = 6;

/// The binary's version, compared at the join (different builds may compute different bits).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Limits of the small control frames (no tensor bodies).
pub const CONTROL: Limits = Limits {
    header_bytes: 4 << 20,
    bodies: 0,
    floats: 0,
};

/// The first message of a worker.
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub struct Hello {
    /// [`PROTOCOL`] of the worker.
    pub protocol: u32,
    /// [`VERSION`] of the worker.
    pub version: String,
    /// The job's secret (from the ticket).
    pub token: String,
    /// Host and process id, for logs.
    pub name: String,
    /// The worker's own configuration (TOML), when it was started with one: it must not differ
    /// from the coordinator's in any field that changes the bits.
    pub config: Option<String>,
}

/// The coordinator's answer to a [`Hello`] or a [`Ready`].
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub enum Answer {
    /// The run's configuration (TOML), for the worker's checks.
    Offer {
        /// The run's configuration.
        config: String,
    },
    /// The worker is a member; it takes part from the next membership epoch. Only now does it
    /// receive the job identity its data plane serves with (a refused worker never holds the key).
    Admitted {
        /// Its member number (unique within the run).
        member: u64,
        /// The job certificate (DER).
        cert: Vec<u8>,
        /// Its private key (DER).
        key: Vec<u8>,
    },
    /// Refused, and why (naming the field that differs).
    Refused {
        /// The reason.
        reason: String,
    },
}

/// The worker's second message: what it computed with the run's configuration.
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub struct Ready {
    /// SHA-256 of its training and validation text.
    pub corpus_sha256: String,
    /// Its kernel fingerprint.
    pub kernel: KernelFingerprint,
    /// Where its data plane listens (`IP:PORT`).
    pub data_addr: String,
}

/// What a worker tells the coordinator unasked, on its session stream.
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub enum Notice {
    /// It wants to leave (SIGTERM or a command): at the next step boundary its state moves to the
    /// others and it is dismissed.
    Leaving,
    /// A peer sent it malformed data; the coordinator evicts that peer.
    PeerEvicted {
        /// The peer's worker index in the notice's epoch.
        peer: u32,
        /// The epoch.
        epoch: u64,
        /// What was wrong.
        detail: String,
    },
    /// Its connection to a peer was lost.
    PeerLost {
        /// The peer's worker index in the notice's epoch.
        peer: u32,
        /// The epoch.
        epoch: u64,
        /// Why.
        detail: String,
    },
    /// A link fault of a chaos run ([`LinkFault`]) fired in this worker's transport (told at once,
    /// before the faulted request leaves: a corrupt one gets this worker evicted).
    LinkFault {
        /// The fault's [`LinkFault::index`].
        index: u32,
        /// The epoch.
        epoch: u64,
        /// The step of the request it hit.
        step: u64,
        /// What it hit, when the fault does not say it all (a partition's first lost packet).
        detail: String,
    },
}

/// What a link fault does, on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub enum LinkKind {
    /// The request is lost.
    Drop,
    /// It arrives twice.
    Duplicate,
    /// It arrives this many nanoseconds later.
    Delay(u64),
    /// It arrives after the next one on its link.
    Reorder,
    /// A byte of its frame is flipped on the way.
    Corrupt,
    /// Every packet between the two workers is lost for this many nanoseconds.
    Partition(u64),
}

/// A link fault of a chaos run over worker processes, as [`Command::Setup`] carries it: the
/// worker process wraps its data plane's transport in `chaos::net::FaultyTransport` with these,
/// so that they fire at the same requests as between in-process workers. `from` and `to` are
/// worker indices of the epoch being set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct LinkFault {
    /// The fault's index in the chaos run's plan (what the worker's notices name).
    pub index: u32,
    /// The sending worker.
    pub from: u32,
    /// The receiving worker.
    pub to: u32,
    /// The step whose requests it hits.
    pub step: u64,
    /// What it does.
    pub kind: LinkKind,
    /// How many requests it hits.
    pub times: u32,
}

impl LinkFault {
    /// `fault` (number `index` of the plan) on the wire; `None` when it is not a link fault.
    pub fn from_fault(index: usize, fault: &Fault) -> Option<LinkFault> {
        let Target::Link { from, to } = fault.target else {
            return None;
        };
        let nanos = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let kind = match fault.kind {
            FaultKind::Drop => LinkKind::Drop,
            FaultKind::Duplicate => LinkKind::Duplicate,
            FaultKind::Delay(d) => LinkKind::Delay(nanos(d)),
            FaultKind::Reorder => LinkKind::Reorder,
            FaultKind::Corrupt => LinkKind::Corrupt,
            FaultKind::Partition(d) => LinkKind::Partition(nanos(d)),
            _ => return None,
        };
        Some(LinkFault {
            index: u32::try_from(index).ok()?,
            from: u32::try_from(from).ok()?,
            to: u32::try_from(to).ok()?,
            step: fault.step,
            kind,
            times: fault.times,
        })
    }

    /// The fault for the worker's own plan.
    pub fn to_fault(&self) -> Fault {
        let d = std::time::Duration::from_nanos;
        Fault {
            target: Target::Link {
                from: self.from as usize,
                to: self.to as usize,
            },
            step: self.step,
            moment: Moment::Any,
            kind: match self.kind {
                LinkKind::Drop => FaultKind::Drop,
                LinkKind::Duplicate => FaultKind::Duplicate,
                LinkKind::Delay(n) => FaultKind::Delay(d(n)),
                LinkKind::Reorder => FaultKind::Reorder,
                LinkKind::Corrupt => FaultKind::Corrupt,
                LinkKind::Partition(n) => FaultKind::Partition(d(n)),
            },
            times: self.times,
        }
    }
}

/// A step in a command: `(step, attempt)`.
pub type WireStep = (u64, u32);

/// What the coordinator asks a worker.
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub enum Command {
    /// Start membership epoch `epoch` as worker `worker` of `workers`, with the data-plane addresses
    /// of every worker (index order); this worker's share of the committed state follows as a
    /// second frame ([`encode_share`]).
    Setup {
        /// The epoch.
        epoch: u64,
        /// This worker's index.
        worker: u32,
        /// Workers of the epoch.
        workers: u32,
        /// Each worker's data-plane address.
        peers: Vec<String>,
        /// SHA-256 of the state frame that follows (checked before the state is used).
        state_sha256: String,
        /// The epoch's plan: the worker hosting each expert.
        expert_owner: Vec<u32>,
        /// The worker owning each dense tensor (`u32::MAX` for expert tensors).
        tensor_owner: Vec<u32>,
        /// Start from the state this worker kept at the last [`Command::Hand`], overlaid with the
        /// frame that follows (only what it lacks), instead of from the frame alone.
        keep: bool,
        /// A chaos run's link faults for this epoch (empty in a real run): those of the steps not
        /// yet attempted, so that a step replayed after a membership change runs undisturbed.
        link_faults: Vec<LinkFault>,
        /// With expert rows over collectives (`train.exchange` other than `transport`): the ids of
        /// the epoch's first communicators, one per lane (empty otherwise; [`comm_ids_from_wire`]).
        comm_ids: Vec<Vec<u8>>,
        /// How long this worker waits for its peers to connect, in milliseconds: the
        /// coordinator's deadline for the setup, which covers the largest share's transfer (a
        /// worker given little state must wait for one given much).
        wait_ms: u64,
    },
    /// A membership change at a step boundary, before the next epoch's setups: keep a copy of
    /// this worker's committed state (for a `Setup` with `keep`), and send these pieces of it, the
    /// ones that change owner ([`Reply::Pieces`]).
    Hand {
        /// Epoch (the current one).
        epoch: u64,
        /// `(tensor index, with moments)` of the dense tensors to send.
        dense: Vec<(u64, bool)>,
        /// `(block, expert)` of the expert units to send.
        experts: Vec<(u64, u64)>,
    },
    /// `WorkerMsg::RunStep`.
    RunStep {
        /// Epoch.
        epoch: u64,
        /// Step.
        step: WireStep,
        /// With expert rows over collectives, on the first step after an abort: the ids of the
        /// communicators the step builds, one per lane (empty otherwise).
        comm_ids: Vec<Vec<u8>>,
    },
    /// `WorkerMsg::Prepare`.
    Prepare {
        /// Epoch.
        epoch: u64,
        /// Step.
        step: WireStep,
    },
    /// `WorkerMsg::Commit`.
    Commit {
        /// Epoch.
        epoch: u64,
        /// Step.
        step: WireStep,
        /// Learning rate.
        lr: f64,
        /// Global gradient norm.
        norm: f64,
    },
    /// `WorkerMsg::Abort`.
    Abort {
        /// Epoch.
        epoch: u64,
        /// Step.
        step: WireStep,
    },
    /// The bytes this worker sent each peer of the epoch, by kind ([`Reply::Traffic`]).
    Traffic {
        /// Epoch.
        epoch: u64,
    },
    /// `WorkerMsg::Snapshot`.
    Snapshot {
        /// Epoch.
        epoch: u64,
    },
    /// Stop and exit: `left` (exit 0: it asked to leave, or the run is over) or not (exit 1, the
    /// reason printed).
    Dismiss {
        /// Whether the worker leaves in good order.
        left: bool,
        /// Why.
        reason: String,
    },
}

impl Command {
    /// The command's epoch (`None` for a dismissal, which any epoch accepts).
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Command::Setup { epoch, .. }
            | Command::RunStep { epoch, .. }
            | Command::Prepare { epoch, .. }
            | Command::Commit { epoch, .. }
            | Command::Abort { epoch, .. }
            | Command::Hand { epoch, .. }
            | Command::Traffic { epoch }
            | Command::Snapshot { epoch } => Some(*epoch),
            Command::Dismiss { .. } => None,
        }
    }
}

/// The most communicator ids a command may carry (a worker process runs at most this many lanes).
pub const MAX_COMM_IDS: usize = 16;

/// Communicator ids as they travel.
pub fn comm_ids_to_wire(ids: &CommIds) -> Vec<Vec<u8>> {
    ids.iter().map(|id| id.to_vec()).collect()
}

/// Communicator ids from a command: at most [`MAX_COMM_IDS`], each of NCCL's size.
pub fn comm_ids_from_wire(ids: Vec<Vec<u8>>) -> Result<CommIds> {
    if ids.len() > MAX_COMM_IDS {
        return Err(Error::protocol(
            "the coordinator",
            format!("{} communicator ids (at most {MAX_COMM_IDS})", ids.len()),
        ));
    }
    ids.into_iter()
        .enumerate()
        .map(|(lane, id)| {
            let len = id.len();
            <[u8; NCCL_ID_BYTES]>::try_from(id).map_err(|_| {
                Error::protocol(
                    "the coordinator",
                    format!("lane {lane}'s communicator id has {len} bytes, not {NCCL_ID_BYTES}"),
                )
            })
        })
        .collect()
}

/// One group's output on the wire.
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub struct WireOutput {
    /// The group.
    pub group: u32,
    /// `GroupOutput::ce_sum`.
    pub ce_sum: f64,
    /// `GroupOutput::router_loss`.
    pub router_loss: Vec<f64>,
    /// Per MoE block: (tokens per expert, dropped, capacity).
    pub moe_stats: Vec<(Vec<u64>, u64, Option<u64>)>,
}

/// How an error crosses the wire: its kind decides whether the coordinator replays the step.
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub enum WireError {
    /// `Error::ActorFailed` (restartable).
    ActorFailed {
        /// Actor.
        actor: String,
        /// Detail.
        detail: String,
    },
    /// `Error::Deadline`.
    Deadline {
        /// Peer.
        peer: String,
        /// Request.
        what: String,
        /// Deadline.
        deadline_ms: u64,
    },
    /// Anything else, as its message.
    Other(String),
    /// `Error::NonFinite`: the trainer reports it as divergence, with its advice.
    NonFinite {
        /// The operation.
        context: String,
        /// The first non-finite value.
        detail: String,
    },
}

/// A worker's answer to a [`Command`].
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub enum Reply {
    /// Done (Setup, Commit, Abort, Dismiss).
    Done,
    /// RunStep's group outputs.
    Outputs(Vec<WireOutput>),
    /// Prepare's norm parts: `(tensor, expert, sum of squares)`.
    Norms(Vec<(u64, u64, f64)>),
    /// Snapshot: the header of a [`LedgerSnapshot`]; the tensors are the frame's bodies.
    Snapshot(SnapshotHeader),
    /// Hand: the pieces asked for, laid out as a share ([`encode_pieces`]).
    Pieces(ShareHeader),
    /// Traffic: `(peer, kind, bytes)` sent in this epoch.
    Traffic(Vec<(u32, String, u64)>),
    /// The command failed.
    Failed(WireError),
}

/// The layout of a snapshot's bodies: per dense entry three bodies (values, m, v); per expert
/// twelve (four parameter tensors, their m, their v).
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub struct SnapshotHeader {
    /// Optimizer steps taken.
    pub step: u64,
    /// Tensor index of each dense entry.
    pub dense: Vec<u64>,
    /// `(block, expert)` of each expert slot.
    pub experts: Vec<(u64, u64)>,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        match e {
            Error::ActorFailed { actor, detail } => WireError::ActorFailed {
                actor: actor.clone(),
                detail: detail.clone(),
            },
            Error::Deadline {
                peer,
                what,
                deadline_ms,
            } => WireError::Deadline {
                peer: peer.clone(),
                what: what.clone(),
                deadline_ms: *deadline_ms,
            },
            Error::NonFinite { context, detail } => WireError::NonFinite {
                context: context.clone(),
                detail: detail.clone(),
            },
            other => WireError::Other(other.to_string()),
        }
    }
}

impl WireError {
    /// Back into an [`Error`], saying which worker process reported it.
    pub fn into_error(self, worker: &str) -> Error {
        match self {
            WireError::ActorFailed { actor, detail } => Error::ActorFailed {
                actor: format!("{actor} ({worker})"),
                detail,
            },
            WireError::Deadline {
                peer,
                what,
                deadline_ms,
            } => Error::Deadline {
                peer,
                what: format!("{what} (reported by {worker})"),
                deadline_ms,
            },
            WireError::Other(m) => Error::runtime(format!("{worker}: {m}")),
            WireError::NonFinite { context, detail } => Error::NonFinite {
                context: format!("{context} ({worker})"),
                detail,
            },
        }
    }
}

/// Encode a header-only control message.
pub fn encode<H: bincode::Encode>(header: &H) -> Result<Vec<u8>> {
    wire::encode_frame(header, &[])
}

/// Decode a header-only control message.
pub fn decode<H: bincode::Decode<()>>(bytes: &[u8], what: &str) -> Result<H> {
    Ok(wire::decode_frame(bytes, what, &CONTROL)?.0)
}

/// Group outputs to the wire.
pub fn outputs_to_wire(outputs: &[(usize, GroupOutput)]) -> Vec<WireOutput> {
    outputs
        .iter()
        .map(|(g, o)| WireOutput {
            group: *g as u32,
            ce_sum: o.ce_sum,
            router_loss: o.router_loss.clone(),
            moe_stats: o
                .moe_stats
                .iter()
                .map(|s| {
                    (
                        s.expert_tokens.iter().map(|&t| t as u64).collect(),
                        s.dropped as u64,
                        s.capacity.map(|c| c as u64),
                    )
                })
                .collect(),
        })
        .collect()
}

/// Group outputs from the wire, checked against the configuration (group range, block and expert
/// counts), so that nothing malformed reaches the coordinator's sums.
pub fn outputs_from_wire(config: &TrainConfig, outputs: Vec<WireOutput>) -> Result<Vec<(usize, GroupOutput)>> {
    let blocks = (0..config.model.n_layer).filter(|&l| config.model.is_moe(l)).count();
    outputs
        .into_iter()
        .map(|o| {
            let g = o.group as usize;
            if g >= config.train.groups {
                return Err(Error::parse("a step's outputs", format!("group {g} does not exist")));
            }
            if o.router_loss.len() != blocks || o.moe_stats.len() != blocks {
                return Err(Error::parse(
                    "a step's outputs",
                    format!(
                        "group {g} reports router losses of {} and statistics of {} MoE blocks; the model has {blocks}",
                        o.router_loss.len(),
                        o.moe_stats.len()
                    ),
                ));
            }
            if o.moe_stats.iter().any(|(t, _, _)| t.len() != config.model.experts) {
                return Err(Error::parse(
                    "a step's outputs",
                    format!("group {g} reports loads for a wrong number of experts"),
                ));
            }
            // A group routes at most its tokens times k assignments a block: larger counts would
            // overflow the coordinator's sums (and its metrics).
            let assignments = config
                .group_seqs()
                .saturating_mul(config.model.block_size)
                .saturating_mul(config.model.k) as u64;
            let too_many =
                |&(ref t, d, _): &(Vec<u64>, u64, Option<u64>)| d > assignments || t.iter().any(|&x| x > assignments);
            if o.moe_stats.iter().any(too_many) {
                return Err(Error::parse(
                    "a step's outputs",
                    format!("group {g} reports more expert assignments than its {assignments} a block"),
                ));
            }
            Ok((
                g,
                GroupOutput {
                    ce_sum: o.ce_sum,
                    router_loss: o.router_loss,
                    moe_stats: o
                        .moe_stats
                        .into_iter()
                        .map(|(t, d, c)| MoeStats {
                            expert_tokens: t.into_iter().map(|x| x as usize).collect(),
                            dropped: d as usize,
                            capacity: c.map(|c| c as usize),
                        })
                        .collect(),
                },
            ))
        })
        .collect()
}

/// Norm parts to the wire.
pub fn norms_to_wire(parts: &[NormPart]) -> Vec<(u64, u64, f64)> {
    parts.iter().map(|((t, e), s)| (*t as u64, *e as u64, *s)).collect()
}

/// Norm parts from the wire.
pub fn norms_from_wire(parts: Vec<(u64, u64, f64)>) -> Vec<NormPart> {
    parts
        .into_iter()
        .map(|(t, e, s)| ((t as usize, e as usize), s))
        .collect()
}

/// Limits of a frame carrying up to three copies of a model of `config` (a snapshot, the state).
pub fn state_limits(config: &TrainConfig) -> Result<Limits> {
    config.model.validate()?;
    let floats = config.model.num_params();
    Ok(Limits {
        header_bytes: 4 << 20,
        bodies: 64 + 12 * (config.model.n_layer * config.model.experts + 4 * config.model.n_layer + 8),
        floats: 3 * floats + 1024,
    })
}

/// Encode a worker's snapshot as a [`Reply::Snapshot`] frame.
pub fn encode_snapshot(s: &LedgerSnapshot) -> Result<Vec<u8>> {
    Ok(encode_snapshot_parts(s)?.concat())
}

/// [`encode_snapshot`] in two parts, the bodies left in the snapshot, in the frame's order
/// ([`snapshot_bodies`]).
pub fn encode_snapshot_parts(s: &LedgerSnapshot) -> Result<wire::Encoded<'_>> {
    let header = Reply::Snapshot(SnapshotHeader {
        step: s.step,
        dense: s.dense.iter().map(|(i, ..)| *i as u64).collect(),
        experts: s.experts.iter().map(|((b, e), _)| (*b as u64, *e as u64)).collect(),
    });
    let mut bodies: Vec<&[f32]> = Vec::new();
    for (_, p, m, v) in &s.dense {
        bodies.extend([p.as_slice(), m.as_slice(), v.as_slice()]);
    }
    for (_, slot) in &s.experts {
        bodies.extend(slot.params.iter().map(Vec::as_slice));
        bodies.extend(slot.optimizer.m.iter().map(Vec::as_slice));
        bodies.extend(slot.optimizer.v.iter().map(Vec::as_slice));
    }
    wire::encode_frame_parts(&header, bodies)
}

/// The snapshot's tensors, moved out in the order its frame carries them
/// ([`encode_snapshot_parts`]): per dense entry values, m, v; per expert its four tensors, their
/// four m, their four v.
pub fn snapshot_bodies(s: LedgerSnapshot) -> Vec<Vec<f32>> {
    let mut bodies = Vec::with_capacity(3 * s.dense.len() + 12 * s.experts.len());
    for (_, p, m, v) in s.dense {
        bodies.extend([p, m, v]);
    }
    for (_, slot) in s.experts {
        bodies.extend(slot.params);
        bodies.extend(slot.optimizer.m);
        bodies.extend(slot.optimizer.v);
    }
    bodies
}

/// Decode a [`Reply`] that may carry a snapshot; lengths are checked against the model's tensors.
pub fn decode_reply(config: &TrainConfig, bytes: &[u8]) -> Result<(Reply, Option<LedgerSnapshot>)> {
    let (reply, bodies) = wire::decode_frame::<Reply>(bytes, "a worker's reply", &state_limits(config)?)?;
    let Reply::Snapshot(header) = &reply else {
        if !bodies.is_empty() {
            return Err(Error::parse(
                "a worker's reply",
                "a reply other than a snapshot carries tensors",
            ));
        }
        return Ok((reply, None));
    };
    let specs = config.model.tensor_specs();
    let bad = |detail: String| Error::parse("a worker's snapshot", detail);
    if bodies.len() != 3 * header.dense.len() + 12 * header.experts.len() {
        return Err(bad(format!(
            "{} tensors for {} dense entries and {} experts",
            bodies.len(),
            header.dense.len(),
            header.experts.len()
        )));
    }
    let mut it = bodies.into_iter();
    let mut dense = Vec::with_capacity(header.dense.len());
    for &i in &header.dense {
        let i = i as usize;
        let spec = specs.get(i).ok_or_else(|| bad(format!("tensor {i} does not exist")))?;
        let n: usize = spec.shape.iter().product();
        let mut take = || {
            it.next()
                .filter(|b| b.len() == n)
                .ok_or_else(|| bad(format!("{} has a wrong length", spec.name)))
        };
        let (p, m, v) = (take()?, take()?, take()?);
        dense.push((i, p, m, v));
    }
    let mut experts = Vec::with_capacity(header.experts.len());
    for &(block, e) in &header.experts {
        let (block, e) = (block as usize, e as usize);
        if e >= config.model.experts {
            return Err(bad(format!("expert {e} does not exist")));
        }
        let idx = ExpertSlot::tensor_indices(specs.iter().map(|t| t.name.as_str()), block)?;
        let mut next = |k: usize| {
            let spec = &specs[idx[k]];
            it.next()
                .filter(|b| b.len() == spec.unit_len())
                .ok_or_else(|| bad(format!("expert {block}.{e}'s {} has a wrong length", spec.name)))
        };
        let params = [next(0)?, next(1)?, next(2)?, next(3)?];
        let m = vec![next(0)?, next(1)?, next(2)?, next(3)?];
        let v = vec![next(0)?, next(1)?, next(2)?, next(3)?];
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        let decay: Vec<bool> = idx.iter().map(|&i| specs[i].decay).collect();
        let mut optimizer = AdamW::with_decay(config.optimizer.clone(), &sizes, &decay)?;
        optimizer.restore(header.step, m, v)?;
        experts.push(((block, e), ExpertSlot { params, optimizer }));
    }
    let step = header.step;
    Ok((reply, Some(LedgerSnapshot { step, dense, experts })))
}

/// The layout of a worker's share of the state (the frame after a [`Command::Setup`]): the dense
/// tensors its replica holds (with their AdamW moments when it owns them), then its experts'
/// units. Everything else of the model stays zero on the worker: nothing reads it.
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub struct ShareHeader {
    /// Optimizer steps taken.
    pub step: u64,
    /// `(tensor index, with moments)` of each dense tensor: one body, or three (values, m, v).
    pub dense: Vec<(u64, bool)>,
    /// `(block, expert)` of each expert unit: twelve bodies (four tensors, their m, their v).
    pub experts: Vec<(u64, u64)>,
}

/// Encode worker `worker`'s share of `model` and `optimizer` under `placement`: the dense tensors
/// its replica keeps (all of them, or only its own with `storage.shard_dense`), the moments of the
/// dense tensors it owns, and the units of the experts it hosts. About `1/W` of the state, plus the
/// dense values, instead of all of it.
pub fn encode_share(
    config: &TrainConfig,
    model: &Gpt<f32>,
    optimizer: &AdamW,
    placement: &crate::actors::Placement,
    worker: usize,
) -> Result<Vec<u8>> {
    let pieces = Pieces::held_by(config, &model.specs(), placement, worker);
    encode_pieces(config, model, optimizer, &pieces)
}

/// Encode `pieces` of `model` and `optimizer` as a share frame (what a `Setup` carries).
pub fn encode_pieces(config: &TrainConfig, model: &Gpt<f32>, optimizer: &AdamW, pieces: &Pieces) -> Result<Vec<u8>> {
    let (header, bodies) = piece_bodies(config, model, optimizer, pieces)?;
    wire::encode_frame(&header, &bodies)
}

/// Encode `pieces` as the answer to a [`Command::Hand`].
pub fn encode_hand(config: &TrainConfig, model: &Gpt<f32>, optimizer: &AdamW, pieces: &Pieces) -> Result<Vec<u8>> {
    let (header, bodies) = piece_bodies(config, model, optimizer, pieces)?;
    wire::encode_frame(&Reply::Pieces(header), &bodies)
}

/// The header and bodies of `pieces`, in the order [`decode_pieces_into`] reads them.
fn piece_bodies<'a>(
    config: &TrainConfig,
    model: &'a Gpt<f32>,
    optimizer: &'a AdamW,
    pieces: &Pieces,
) -> Result<(ShareHeader, Vec<&'a [f32]>)> {
    let specs = model.specs();
    let tensors = model.tensors();
    if optimizer.m.len() != specs.len() || optimizer.v.len() != specs.len() {
        return Err(Error::shape("optimizer state", "it does not match the model's tensors"));
    }
    let mut header = ShareHeader {
        step: optimizer.step,
        dense: Vec::new(),
        experts: Vec::new(),
    };
    let mut bodies: Vec<&[f32]> = Vec::new();
    for &(i, with_moments) in &pieces.dense {
        if specs.get(i).is_none_or(|s| s.expert) {
            return Err(Error::runtime(format!("tensor {i} is not a dense tensor of the model")));
        }
        header.dense.push((i as u64, with_moments));
        bodies.push(tensors[i].2);
        if with_moments {
            bodies.extend([optimizer.m[i].as_slice(), optimizer.v[i].as_slice()]);
        }
    }
    let values: Vec<&Vec<f32>> = tensors.iter().map(|t| t.2).collect();
    let firsts: Vec<&Vec<f32>> = optimizer.m.iter().collect();
    let seconds: Vec<&Vec<f32>> = optimizer.v.iter().collect();
    for &(block, e) in &pieces.experts {
        if e >= config.model.experts || !config.model.is_moe(block) {
            return Err(Error::runtime(format!("expert {block}.{e} does not exist")));
        }
        let idx = ExpertSlot::tensor_indices(specs.iter().map(|t| t.name.as_str()), block)?;
        header.experts.push((block as u64, e as u64));
        for source in [&values, &firsts, &seconds] {
            for &i in &idx {
                let n = specs[i].unit_len();
                bodies.push(&source[i][e * n..(e + 1) * n]);
            }
        }
    }
    Ok((header, bodies))
}

/// Decode a share into a whole model and optimizer whose other parts are zero; every index,
/// length and repetition is checked against `config`'s model first.
pub fn decode_share(config: &TrainConfig, bytes: &[u8]) -> Result<(Gpt<f32>, AdamW)> {
    let mut model = Gpt::<f32>::zeros(&config.model)?;
    let mut optimizer = crate::optimizer::for_model(&config.optimizer, &model)?;
    decode_share_into(config, bytes, &mut model, &mut optimizer)?;
    Ok((model, optimizer))
}

/// Decode a share into `model` and `optimizer` (overwriting the pieces it carries; the step must
/// be the optimizer's unless that is a fresh, zero-step one), checking it as [`decode_share`] does.
pub fn decode_share_into(
    config: &TrainConfig,
    bytes: &[u8],
    model: &mut Gpt<f32>,
    optimizer: &mut AdamW,
) -> Result<()> {
    let (header, bodies) =
        wire::decode_frame::<ShareHeader>(bytes, "a worker's share of the state", &state_limits(config)?)?;
    decode_pieces_into(
        config,
        &header,
        bodies,
        model,
        optimizer,
        "a worker's share of the state",
    )
}

/// Decode the answer to a [`Command::Hand`] into `model` and `optimizer` (pieces of one step).
pub fn decode_hand_into(
    config: &TrainConfig,
    who: &str,
    bytes: &[u8],
    model: &mut Gpt<f32>,
    optimizer: &mut AdamW,
) -> Result<ShareHeader> {
    let (reply, bodies) = wire::decode_frame::<Reply>(bytes, "a worker's hand-over", &state_limits(config)?)?;
    match reply {
        Reply::Pieces(header) => {
            decode_pieces_into(config, &header, bodies, model, optimizer, "a worker's hand-over")?;
            Ok(header)
        }
        Reply::Failed(e) => Err(e.into_error(who)),
        _ => Err(Error::protocol(
            who.to_string(),
            "answered a hand-over with something else",
        )),
    }
}

fn decode_pieces_into(
    config: &TrainConfig,
    header: &ShareHeader,
    bodies: Vec<Vec<f32>>,
    model: &mut Gpt<f32>,
    optimizer: &mut AdamW,
    what: &str,
) -> Result<()> {
    let specs = model.specs();
    let bad = |detail: String| Error::parse(what, detail);
    if model.config() != &config.model || optimizer.m.len() != specs.len() {
        return Err(Error::shape(what, "the model to fill is not the configured one"));
    }
    if optimizer.step != header.step && optimizer.step != 0 {
        return Err(bad(format!(
            "pieces of step {} for a state of step {}",
            header.step, optimizer.step
        )));
    }
    let want = header.dense.iter().map(|&(_, m)| if m { 3 } else { 1 }).sum::<usize>() + 12 * header.experts.len();
    if bodies.len() != want {
        return Err(bad(format!("{} tensors where the header lists {want}", bodies.len())));
    }
    let mut seen = vec![false; specs.len()];
    let mut it = bodies.into_iter();
    let mut bufs = model.buffers_mut();
    for &(i, with_moments) in &header.dense {
        let i = i as usize;
        let spec = specs
            .get(i)
            .filter(|s| !s.expert)
            .ok_or_else(|| bad(format!("tensor {i} is not a dense tensor of the model")))?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(bad(format!("{} appears twice", spec.name)));
        }
        let n: usize = spec.shape.iter().product();
        let mut next = || {
            it.next()
                .filter(|b| b.len() == n)
                .ok_or_else(|| bad(format!("{} has a wrong length", spec.name)))
        };
        *bufs[i] = next()?;
        if with_moments {
            optimizer.m[i] = next()?;
            optimizer.v[i] = next()?;
        }
    }
    let mut units = std::collections::BTreeSet::new();
    for &(block, e) in &header.experts {
        let (block, e) = (block as usize, e as usize);
        if e >= config.model.experts || !config.model.is_moe(block) || !units.insert((block, e)) {
            return Err(bad(format!("expert {block}.{e} does not exist or appears twice")));
        }
        let idx = ExpertSlot::tensor_indices(specs.iter().map(|t| t.name.as_str()), block)?;
        for part in 0..3 {
            for &i in &idx {
                let n = specs[i].unit_len();
                let body = it
                    .next()
                    .filter(|b| b.len() == n)
                    .ok_or_else(|| bad(format!("expert {block}.{e}'s {} has a wrong length", specs[i].name)))?;
                let target = match part {
                    0 => &mut *bufs[i],
                    1 => &mut optimizer.m[i],
                    _ => &mut optimizer.v[i],
                };
                let slot = target
                    .get_mut(e * n..(e + 1) * n)
                    .ok_or_else(|| bad(format!("expert {block}.{e} lies outside {}", specs[i].name)))?;
                slot.copy_from_slice(&body);
            }
        }
    }
    drop(bufs);
    optimizer.step = header.step;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_worker_processs_overflow_stays_an_overflow() {
        let e = Error::NonFinite {
            context: "the MoE gate".into(),
            detail: "gate logit of token 3".into(),
        };
        let wire: WireError = (&e).into();
        let bytes = bincode::encode_to_vec(&wire, bincode::config::standard()).unwrap();
        let (back, _): (WireError, usize) = bincode::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        match back.into_error("worker 2") {
            Error::NonFinite { context, detail } => {
                assert_eq!(context, "the MoE gate (worker 2)");
                assert_eq!(detail, "gate logit of token 3");
            }
            other => panic!("became {other:?}"),
        }
    }

    #[test]
    fn link_faults_travel_in_a_setup_unchanged() {
        let link = |kind| Fault {
            target: Target::Link { from: 2, to: 0 },
            step: 7,
            moment: Moment::Any,
            kind,
            times: 2,
        };
        let kinds = [
            FaultKind::Drop,
            FaultKind::Duplicate,
            FaultKind::Delay(Duration::from_micros(1500)),
            FaultKind::Reorder,
            FaultKind::Corrupt,
            FaultKind::Partition(Duration::from_secs(2)),
        ];
        let wire: Vec<LinkFault> = kinds
            .iter()
            .enumerate()
            .map(|(i, &k)| LinkFault::from_fault(i + 3, &link(k)).expect("a link fault"))
            .collect();
        let setup = Command::Setup {
            epoch: 4,
            worker: 1,
            workers: 3,
            peers: vec![],
            state_sha256: String::new(),
            expert_owner: vec![],
            tensor_owner: vec![],
            keep: false,
            link_faults: wire.clone(),
            comm_ids: vec![vec![7; 128]],
            wait_ms: 60_000,
        };
        let bytes = encode(&setup).expect("encode");
        let Command::Setup { link_faults, .. } = decode::<Command>(&bytes, "a command").expect("decode") else {
            panic!("not a setup")
        };
        assert_eq!(link_faults, wire);
        for (i, (f, k)) in link_faults.iter().zip(kinds).enumerate() {
            assert_eq!(f.index as usize, i + 3);
            assert_eq!(f.to_fault(), link(k), "the worker's plan has the coordinator's fault");
        }
        // Other faults are not link faults.
        let expert = Fault {
            target: Target::Expert { block: 0, expert: 1 },
            ..link(FaultKind::Panic)
        };
        assert_eq!(LinkFault::from_fault(0, &expert), None);
    }

    /// A worker's step report whose counts are larger than its group can route is refused by
    /// name (the coordinator's sums of them overflowed); the largest honest counts pass.
    #[test]
    fn step_reports_with_impossible_counts_are_refused() {
        let config = crate::config::small_test_config();
        let blocks = (0..config.model.n_layer).filter(|&l| config.model.is_moe(l)).count();
        let most = (config.group_seqs() * config.model.block_size * config.model.k) as u64;
        let report = |tokens: u64, dropped: u64| WireOutput {
            group: 0,
            ce_sum: 1.0,
            router_loss: vec![0.0; blocks],
            moe_stats: vec![(vec![tokens; config.model.experts], dropped, None); blocks],
        };
        outputs_from_wire(&config, vec![report(most, most)]).expect("the largest honest counts");
        for (tokens, dropped) in [(u64::MAX, 0), (0, u64::MAX), (most + 1, 0)] {
            let err = outputs_from_wire(&config, vec![report(tokens, dropped)])
                .expect_err("impossible counts")
                .to_string();
            assert!(err.contains("more expert assignments than its"), "{err}");
        }
    }
}
