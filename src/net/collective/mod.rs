//! Collectives between ranks, modelled on NCCL's rules: the data path the fused all-to-all-v of the
//! MoE layers takes between GPU workers.
//!
//! The actor runtime exchanges tokens through a [`Transport`](super::Transport): requests and
//! replies, matched by id, in any order. NCCL works differently, and this module holds what the
//! fused all-to-all-v needs in NCCL's terms, so that the scheduling can be tested on CPUs before any
//! GPU runs it:
//!
//! - a [`Collective`] is one rank's end of a communicator. A communicator belongs to one membership
//!   epoch: when the membership changes it is dropped and a new one is built (NCCL cannot add or
//!   remove ranks of a live communicator).
//! - every rank issues the **same collectives in the same order**, with matching counts: the bytes
//!   rank `i` sends to rank `j` in a group are exactly the bytes `j` posted to receive from `i`. NCCL
//!   does not check this (a mismatch hangs or corrupts memory); the CPU stand-in ([`sim`]) checks it
//!   and reports the collective's index, the ranks and the counts.
//! - the two collectives are an all-to-all of counts ([`Collective::all_to_all_counts`], so that
//!   every receiver knows its sizes before the data moves) and a [`Group`] of sends and receives,
//!   one per peer at most in each direction (NCCL's `ncclGroupStart`, the `ncclSend`/`ncclRecv`
//!   calls, `ncclGroupEnd`): a group completes only when every rank's group has matched.
//! - every collective has a deadline, and a communicator can be aborted ([`AbortHandle`], NCCL's
//!   `ncclCommAbort`): every pending and later call then fails at once with an error naming the
//!   collective and the rank, instead of hanging on a peer that died.
//! - there is **no reduction**. NCCL's all-reduce sums in an order that depends on its algorithm and
//!   on the number of ranks; the gradient sums stay in group order in the Ledger and the Experts
//!   (docs/runtime-semantics.md), so that the bits do not depend on the placement. A collective here
//!   only moves bytes.
//!
//! [`alltoallv`] schedules the fused all-to-all-v on any [`Collective`]; [`sim`] is the in-process
//! stand-in that enforces the rules (one thread per rank); [`plane`] the stand-in between processes
//! (one rank's end over a [`Transport`](super::Transport), the rules checked by the rank that sees
//! them); `NcclCollective` is the NCCL-backed one (feature `cuda`; without it a twin whose
//! constructor reports that the build has no CUDA). `actors::collectives` moves the runtime's
//! expert rows over them (docs/gpu-data-path.md).

pub mod alltoallv;
pub mod plane;
pub mod sim;

#[cfg(feature = "cuda")]
mod nccl;
#[cfg(feature = "cuda")]
pub use nccl::{nccl_unique_id, NcclCollective, NCCL_ID_BYTES};

#[cfg(not(feature = "cuda"))]
mod nccl_dummy;
#[cfg(not(feature = "cuda"))]
pub use nccl_dummy::{nccl_unique_id, NcclCollective, NCCL_ID_BYTES};

use crate::error::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

/// A rank of a communicator, `0..world`.
pub type Rank = usize;

/// Sends of a group: (peer, bytes).
pub type Sends = Vec<(Rank, Vec<u8>)>;

/// Receives of a group: (peer, number of bytes).
pub type Recvs = Vec<(Rank, usize)>;

/// What an [`AbortHandle`] calls: (the aborting rank, the reason).
pub type AbortFn = Arc<dyn Fn(Rank, &str) + Send + Sync>;

/// The kind of a collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Collective::all_to_all_counts`].
    Counts,
    /// [`Collective::group`].
    Group,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Counts => write!(f, "all-to-all of counts"),
            Op::Group => write!(f, "grouped send/recv"),
        }
    }
}

/// One collective of a communicator: its epoch, its index in the communicator's sequence (0 first,
/// counted by every rank on its own) and its kind. Errors name it through its `Display`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CollectiveId {
    /// The membership epoch of the communicator.
    pub epoch: u64,
    /// The index in the sequence of this rank's collectives.
    pub index: u64,
    /// The kind this rank issued.
    pub op: Op,
}

impl std::fmt::Display for CollectiveId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "collective {} ({}) of epoch {}", self.index, self.op, self.epoch)
    }
}

/// One rank's part of a grouped send/receive (between NCCL's `ncclGroupStart` and `ncclGroupEnd`):
/// at most one send and one receive per peer, the rank itself included. Receives give their size
/// in bytes, which the counts exchanged before announced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Group {
    sends: Sends,
    recvs: Recvs,
}

impl Group {
    /// An empty group (`ncclGroupStart`).
    pub fn new() -> Self {
        Group::default()
    }

    /// Send `data` to `peer` (`ncclSend`).
    pub fn send(&mut self, peer: Rank, data: Vec<u8>) -> &mut Self {
        self.sends.push((peer, data));
        self
    }

    /// Receive `bytes` bytes from `peer` (`ncclRecv`).
    pub fn recv(&mut self, peer: Rank, bytes: usize) -> &mut Self {
        self.recvs.push((peer, bytes));
        self
    }

    /// The sends, in the order posted.
    pub fn sends(&self) -> &[(Rank, Vec<u8>)] {
        &self.sends
    }

    /// The receives (peer, bytes), in the order posted.
    pub fn recvs(&self) -> &[(Rank, usize)] {
        &self.recvs
    }

    /// Take the group apart: sends and receives.
    pub fn into_parts(self) -> (Sends, Recvs) {
        (self.sends, self.recvs)
    }

    /// Check the group against the communicator: every peer in range, at most one send and one
    /// receive per peer, none of no bytes (NCCL skips an empty leg while the stand-ins expect the
    /// peer's side of it: posting none is what every backend agrees on). `id` and `rank` name the
    /// collective in the error.
    pub fn validate(&self, id: CollectiveId, rank: Rank, world: usize) -> Result<()> {
        let mut sent = vec![false; world];
        for (peer, data) in &self.sends {
            if *peer >= world {
                return Err(Error::collective(
                    id.to_string(),
                    rank,
                    format!(
                        "a send of {} bytes to rank {peer}, but the communicator has {world} ranks",
                        data.len()
                    ),
                ));
            }
            if data.is_empty() {
                return Err(Error::collective(
                    id.to_string(),
                    rank,
                    format!("a send of no bytes to rank {peer} (post none instead)"),
                ));
            }
            if std::mem::replace(&mut sent[*peer], true) {
                return Err(Error::collective(
                    id.to_string(),
                    rank,
                    format!("two sends to rank {peer} in one group (at most one per peer)"),
                ));
            }
        }
        let mut received = vec![false; world];
        for (peer, bytes) in &self.recvs {
            if *peer >= world {
                return Err(Error::collective(
                    id.to_string(),
                    rank,
                    format!("a receive of {bytes} bytes from rank {peer}, but the communicator has {world} ranks"),
                ));
            }
            if *bytes == 0 {
                return Err(Error::collective(
                    id.to_string(),
                    rank,
                    format!("a receive of no bytes from rank {peer} (post none instead)"),
                ));
            }
            if std::mem::replace(&mut received[*peer], true) {
                return Err(Error::collective(
                    id.to_string(),
                    rank,
                    format!("two receives from rank {peer} in one group (at most one per peer)"),
                ));
            }
        }
        Ok(())
    }
}

/// Aborts a communicator from any thread (NCCL's `ncclCommAbort`): every pending and later
/// collective of every rank that shares it fails at once with an error naming the reason.
#[derive(Clone)]
pub struct AbortHandle {
    rank: Rank,
    abort: AbortFn,
}

impl AbortHandle {
    /// A handle of `rank` that calls `abort(rank, reason)`.
    pub fn new(rank: Rank, abort: AbortFn) -> Self {
        AbortHandle { rank, abort }
    }

    /// Abort the communicator, saying why (for example `worker 2 was lost`).
    pub fn abort(&self, reason: &str) {
        (self.abort)(self.rank, reason)
    }
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortHandle").field("rank", &self.rank).finish()
    }
}

/// One rank's end of a communicator of one membership epoch. Every rank must issue the same
/// collectives in the same order, each call blocks until the collective completed on this rank
/// (or failed), and none waits past [`Collective::deadline`]. After any error the communicator is
/// aborted: build the next epoch's.
pub trait Collective: Send {
    /// This rank.
    fn rank(&self) -> Rank;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// The membership epoch the communicator belongs to.
    fn epoch(&self) -> u64;
    /// The deadline of every collective.
    fn deadline(&self) -> Duration;
    /// All-to-all of counts: `counts[j]` is what this rank will send to rank `j`; the answer's
    /// element `j` is what rank `j` will send to this rank. `counts` has `world` elements.
    fn all_to_all_counts(&mut self, counts: &[u64]) -> Result<Vec<u64>>;
    /// Run one group of sends and receives; answer each receive's bytes with its peer, in the order
    /// the receives were posted.
    fn group(&mut self, group: Group) -> Result<Vec<(Rank, Vec<u8>)>>;
    /// A handle that aborts this communicator from another thread.
    fn abort_handle(&self) -> AbortHandle;
}
