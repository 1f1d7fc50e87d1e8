//! The fused all-to-all-v on a [`Collective`]: every rank has one buffer per peer (of any size,
//! empty included); the counts go first (an all-to-all of counts), then one group with a send per
//! non-empty outgoing buffer and a receive per non-empty incoming one, posted in rank order (sends,
//! then receives). Every rank derives the same plan from the same counts, so every rank issues the
//! same two collectives in the same order, which is what NCCL needs.
//!
//! What arrives is validated before it is used: a count that does not match its payload, or above
//! the limit, is an error naming the rank and the peer. The result is a pure function of the
//! buffers: bitwise what a direct exchange (each buffer handed to its receiver) gives.

use super::{Collective, Group, Rank};
use crate::error::{Error, Result};

/// The all-to-all-v scheduler, with the most bytes one rank may send one peer in one exchange (a
/// bound on what a receiver allocates from a peer's count).
#[derive(Clone, Copy, Debug)]
pub struct AllToAllV {
    /// The most bytes of one (sender, receiver) buffer.
    pub max_bytes: usize,
}

impl AllToAllV {
    /// A scheduler refusing buffers above `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        AllToAllV { max_bytes }
    }

    /// Exchange `sends[j]` (the bytes for rank `j`, this rank's own included) and answer what every
    /// rank sent this one (element `j` from rank `j`).
    pub fn exchange(&self, comm: &mut dyn Collective, sends: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let counts: Vec<u64> = sends.iter().map(|b| b.len() as u64).collect();
        self.exchange_counted(comm, &counts, sends)
    }

    /// As [`AllToAllV::exchange`], with the counts given separately (as a caller that computed them
    /// from its routing does): a count that does not match its payload is an error, raised before
    /// anything is sent.
    ///
    /// A rank that finds an error itself (its own counts, or a peer's above the limit) will not
    /// issue the rest of the exchange, so it aborts its side of the communicator. Whether the
    /// other ranks then fail at once depends on the backend: the in-process stand-in shares its
    /// state (they do); over the data plane and NCCL the abort is this rank's, and the runtime
    /// tells the peers itself (`actors::collectives` sends an abort), else they fail at their
    /// deadline.
    pub fn exchange_counted(
        &self,
        comm: &mut dyn Collective,
        counts: &[u64],
        sends: Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        let mut sends = sends;
        let rank = comm.rank();
        let world = comm.world();
        let what = format!("the all-to-all-v of epoch {}", comm.epoch());
        let abort = comm.abort_handle();
        let fail = |detail: String| {
            let e = Error::collective(what.clone(), rank, detail);
            abort.abort(&e.to_string());
            e
        };
        if counts.len() != world || sends.len() != world {
            return Err(fail(format!(
                "{} counts and {} buffers for {world} ranks",
                counts.len(),
                sends.len()
            )));
        }
        for (peer, (count, data)) in counts.iter().zip(&sends).enumerate() {
            if *count != data.len() as u64 {
                return Err(fail(format!(
                    "rank {rank}'s count for rank {peer} is {count} bytes, but its payload has {} bytes",
                    data.len()
                )));
            }
            if data.len() > self.max_bytes {
                return Err(fail(format!(
                    "rank {rank} would send {} bytes to rank {peer}, above the limit of {} bytes",
                    data.len(),
                    self.max_bytes
                )));
            }
        }

        let incoming = comm.all_to_all_counts(counts)?;
        if incoming.len() != world {
            return Err(fail(format!("{} counts came back for {world} ranks", incoming.len())));
        }
        let mut expected = Vec::with_capacity(world);
        for (peer, count) in incoming.iter().enumerate() {
            let bytes = usize::try_from(*count)
                .ok()
                .filter(|b| *b <= self.max_bytes)
                .ok_or_else(|| {
                    fail(format!(
                        "rank {peer} announced {count} bytes for rank {rank}, above the limit of {} bytes",
                        self.max_bytes
                    ))
                })?;
            expected.push(bytes);
        }

        let mut group = Group::new();
        for (peer, data) in sends.iter_mut().enumerate() {
            if !data.is_empty() {
                group.send(peer, std::mem::take(data));
            }
        }
        for (peer, bytes) in expected.iter().enumerate() {
            if *bytes > 0 {
                group.recv(peer, *bytes);
            }
        }
        let received = comm.group(group)?;

        let mut out: Vec<Option<Vec<u8>>> = expected.iter().map(|b| (*b == 0).then(Vec::new)).collect();
        for (peer, data) in received {
            let slot = out.get_mut(peer).ok_or_else(|| {
                fail(format!(
                    "bytes came back from rank {peer}, which is not in the communicator"
                ))
            })?;
            if data.len() != expected[peer] || slot.is_some() {
                return Err(fail(format!(
                    "rank {peer} announced {} bytes for rank {rank}, but {} bytes arrived",
                    expected[peer],
                    data.len()
                )));
            }
            *slot = Some(data);
        }
        out.into_iter()
            .enumerate()
            .map(|(peer, data)| data.ok_or_else(|| fail(format!("nothing arrived from rank {peer}"))))
            .collect()
    }

    /// [`AllToAllV::exchange`] of `f32` buffers (little-endian bytes on the wire, bit for bit).
    pub fn exchange_f32(&self, comm: &mut dyn Collective, sends: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let rank = comm.rank();
        let bytes = sends.iter().map(|s| f32_to_bytes(s)).collect();
        let received = self.exchange(comm, bytes)?;
        received
            .into_iter()
            .enumerate()
            .map(|(peer, b)| {
                bytes_to_f32(&b).ok_or_else(|| {
                    Error::collective(
                        format!("the all-to-all-v of epoch {}", comm.epoch()),
                        rank,
                        format!("rank {peer} sent {} bytes, not a whole number of f32 values", b.len()),
                    )
                })
            })
            .collect()
    }
}

/// The little-endian bytes of `values`.
pub fn f32_to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The `f32` values of little-endian `bytes`, or `None` when the length is not a multiple of 4.
pub fn bytes_to_f32(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// What rank `rank` receives in a direct exchange of `buffers` (`buffers[i][j]`: from rank `i` to
/// rank `j`): the reference the scheduler's results are compared with.
pub fn direct_exchange(buffers: &[Vec<Vec<u8>>], rank: Rank) -> Vec<Vec<u8>> {
    buffers
        .iter()
        .map(|from| from.get(rank).cloned().unwrap_or_default())
        .collect()
}
