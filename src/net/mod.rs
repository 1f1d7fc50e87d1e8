//! Transports between workers, and the packets they carry.
//!
//! A [`Transport`] moves [`Packet`]s from one worker to another, in order per pair of workers. The
//! Communicator actor (`actors::communicator`) builds every collective on top of it: the fused
//! all-to-all-v of the MoE layers, the exact gradient reduction and the parameter broadcast. `local`
//! (in-process channels) and `quic` (between processes, over the bounded codec of `wire`) exist; an
//! NCCL data path will carry the fused all-to-all-v between GPU workers: `collective` holds its
//! NCCL-style collectives (counts, then grouped send/recv), the all-to-all-v scheduler on them, CPU
//! stand-ins that enforce NCCL's rules (in process, and between processes over a transport), and
//! the NCCL-backed communicator; `actors::collectives` moves expert rows over them
//! (docs/gpu-data-path.md). `wire` is the bounded binary codec of packets and of the training
//! state for transports between processes.

pub mod collective;
pub mod local;
pub mod quic;
pub mod wire;

use crate::error::Result;
use std::sync::Arc;

/// Which attempt of which training step a message belongs to. A step that is rolled back runs
/// again under the next attempt number, so that anything left over from the failed attempt is
/// recognised as stale and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepId {
    /// The training step (0-based).
    pub step: u64,
    /// The attempt (0 first, then one more per replay).
    pub attempt: u32,
}

impl StepId {
    /// Before any step (the state of a freshly started actor).
    pub const NONE: StepId = StepId { step: 0, attempt: 0 };

    /// The first attempt of `step`.
    pub fn first(step: u64) -> Self {
        StepId { step, attempt: 0 }
    }
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.attempt == 0 {
            write!(f, "{}", self.step)
        } else {
            write!(f, "{} (attempt {})", self.step, self.attempt + 1)
        }
    }
}

/// A worker's index, `0..workers`.
pub type WorkerId = usize;

/// One expert's rows of one group: the unit a fused all-to-all carries. `data` is `[rows][d_model]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    /// The group the rows belong to.
    pub group: usize,
    /// The expert (within its layer).
    pub expert: usize,
    /// Number of rows.
    pub rows: usize,
    /// The rows, row-major.
    pub data: Vec<f32>,
}

/// What a packet carries.
#[derive(Clone, Debug)]
pub enum Payload {
    /// Expert inputs for every expert of MoE block `block` hosted by the receiver, from every group
    /// of the sender (one message per peer: the fused all-to-all-v dispatch).
    ExpertForward {
        /// Training step.
        step: StepId,
        /// MoE block.
        block: usize,
        /// The rows, in (group, expert) order.
        segments: Vec<Segment>,
    },
    /// Gradients of expert outputs, the backward twin of [`Payload::ExpertForward`].
    ExpertBackward {
        /// Training step.
        step: StepId,
        /// MoE block.
        block: usize,
        /// The rows, in (group, expert) order.
        segments: Vec<Segment>,
    },
    /// One group's gradients of the dense tensors the receiver owns (`(tensor index, buffer)`).
    DenseGrads {
        /// Training step.
        step: StepId,
        /// The group.
        group: usize,
        /// Tensor index (in `Gpt::tensors` order) and gradient.
        tensors: Vec<(usize, Vec<f32>)>,
    },
    /// Committed values of dense tensors the sender owns, for the receiver's replica.
    Params {
        /// The step just committed.
        step: StepId,
        /// Tensor index and values.
        tensors: Vec<(usize, Arc<Vec<f32>>)>,
    },
    /// A request for the committed values of dense tensors the receiver owns (sharded dense
    /// parameters: a worker gathers each leg's tensors before the leg runs).
    Gather {
        /// The step that reads them.
        step: StepId,
        /// Tensor indices (in `Gpt::tensors` order).
        tensors: Vec<usize>,
    },
    /// The answer to an expert request: the outputs (or input gradients) in the request's order.
    Segments(Vec<Segment>),
    /// The answer to a [`Payload::Gather`]: tensor index and values, in the request's order.
    Tensors(Vec<(usize, Vec<f32>)>),
    /// The answer to a request that returns nothing.
    Ack,
    /// A message of a collective over the data plane (`train.exchange = "sim"` between worker
    /// processes: `collective::plane`). Neither a request nor a reply: it goes to the worker's
    /// communicators, not to its Communicator actor.
    Collective(collective::plane::PlaneMsg),
    /// The request failed on the receiver.
    Failed {
        /// Whether a restart and replay repair it (an actor failed).
        restartable: bool,
        /// What went wrong, naming the actor.
        detail: String,
    },
}

impl Payload {
    /// Bytes of tensor data carried (what the all-to-all metrics count).
    pub fn data_bytes(&self) -> usize {
        let floats = match self {
            Payload::ExpertForward { segments, .. }
            | Payload::ExpertBackward { segments, .. }
            | Payload::Segments(segments) => segments.iter().map(|s| s.data.len()).sum(),
            Payload::DenseGrads { tensors, .. } => tensors.iter().map(|(_, t)| t.len()).sum(),
            Payload::Params { tensors, .. } => tensors.iter().map(|(_, t)| t.len()).sum(),
            Payload::Tensors(tensors) => tensors.iter().map(|(_, t)| t.len()).sum(),
            // Its bytes are counted as the packets they carry (the collective's caller does).
            Payload::Collective(_) | Payload::Gather { .. } | Payload::Ack | Payload::Failed { .. } => 0,
        };
        floats * std::mem::size_of::<f32>()
    }

    /// Whether this payload answers a request.
    pub fn is_reply(&self) -> bool {
        matches!(
            self,
            Payload::Segments(_) | Payload::Tensors(_) | Payload::Ack | Payload::Failed { .. }
        )
    }
}

/// A message between two workers. A reply carries the `id` of its request.
#[derive(Clone, Debug)]
pub struct Packet {
    /// Sender.
    pub from: WorkerId,
    /// Receiver.
    pub to: WorkerId,
    /// Request id, chosen by the requester; a reply repeats it.
    pub id: u64,
    /// The content.
    pub payload: Payload,
}

/// Moves packets between workers. Sending never blocks; delivery is in order per pair of workers.
/// The receiving half is a channel of packets handed to the Communicator when it starts.
pub trait Transport: Send + Sync + 'static {
    /// This endpoint's worker.
    fn id(&self) -> WorkerId;
    /// Number of workers.
    fn workers(&self) -> usize;
    /// Queue `packet` for delivery to `packet.to`.
    fn send(&self, packet: Packet) -> Result<()>;
    /// Queue `packet` with a byte of its encoded frame flipped on the way (a chaos fault: bytes
    /// damaged by the link), for the receiver's checks to refuse. `None`: this transport carries
    /// values, not bytes (in process), so there is nothing to damage and the packet is not sent.
    fn send_damaged(&self, packet: Packet) -> Option<Result<()>> {
        let _ = packet;
        None
    }
}

/// The receiving half of a transport endpoint.
pub type Inbox = tokio::sync::mpsc::UnboundedReceiver<Packet>;
