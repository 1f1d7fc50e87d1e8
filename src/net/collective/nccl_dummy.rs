//! Stand-in for the NCCL-backed communicator when semoe is built without the `cuda` feature: the
//! same API, whose constructors report that the build has no CUDA support.

use super::{AbortHandle, Collective, Group, Rank};
use crate::error::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

/// Bytes of an NCCL unique id (what travels over the control plane to every rank).
pub const NCCL_ID_BYTES: usize = 128;

fn no_cuda(what: &str) -> Error {
    Error::Backend {
        backend: "cuda",
        detail: format!("{what}: semoe was built without CUDA support; rebuild with `--features cuda`"),
    }
}

/// A new NCCL unique id. This build has no CUDA support: always an error.
pub fn nccl_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
    Err(no_cuda("cannot create an NCCL unique id"))
}

/// One rank of an NCCL communicator. This build has no CUDA support, so [`NcclCollective::new`]
/// always fails.
#[derive(Debug)]
pub struct NcclCollective {
    rank: Rank,
    world: usize,
    epoch: u64,
    deadline: Duration,
}

impl NcclCollective {
    /// Always an error: this build of semoe has no CUDA support.
    pub fn new(
        ordinal: usize,
        rank: Rank,
        world: usize,
        _epoch: u64,
        _id: [u8; NCCL_ID_BYTES],
        _deadline: Duration,
    ) -> Result<Self> {
        Err(no_cuda(&format!(
            "cannot start NCCL rank {rank} of {world} on GPU {ordinal}"
        )))
    }
}

impl Collective for NcclCollective {
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

    fn all_to_all_counts(&mut self, _counts: &[u64]) -> Result<Vec<u64>> {
        Err(no_cuda("cannot run an NCCL collective"))
    }

    fn group(&mut self, _group: Group) -> Result<Vec<(Rank, Vec<u8>)>> {
        Err(no_cuda("cannot run an NCCL collective"))
    }

    fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(self.rank, Arc::new(|_, _| {}))
    }
}
