//! Bytes each worker's Communicator sends its peers, by kind: the run report's traffic matrix
//! (the same figures feed the `semoe_alltoall_bytes_total` metric, which a scraper sees live).

use crate::telemetry::metrics::ALLTOALL_KINDS;
use std::sync::atomic::{AtomicU64, Ordering};

/// One worker's sent bytes, per peer and kind, over an epoch (or a whole in-process run).
#[derive(Debug)]
pub struct Traffic {
    peers: usize,
    /// `bytes[peer * kinds + kind]`.
    bytes: Vec<AtomicU64>,
}

/// One cell of a traffic matrix: `bytes` of `kind` sent from worker `from` to worker `to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct TrafficEntry {
    /// The sender (a worker index; a member id in a run over worker processes).
    pub from: u64,
    /// The receiver.
    pub to: u64,
    /// What the bytes carried (one of [`ALLTOALL_KINDS`]).
    pub kind: String,
    /// Payload bytes (the tensors' values; headers not counted).
    pub bytes: u64,
}

impl Traffic {
    /// Counters for a worker with `peers` workers in its epoch (itself included).
    pub fn new(peers: usize) -> Traffic {
        Traffic {
            peers,
            bytes: (0..peers * ALLTOALL_KINDS.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Count `bytes` of `kind` sent to `to` (an unknown kind or peer is not counted).
    pub fn add(&self, to: usize, kind: &str, bytes: u64) {
        if let (true, Some(k)) = (to < self.peers, ALLTOALL_KINDS.iter().position(|&n| n == kind)) {
            self.bytes[to * ALLTOALL_KINDS.len() + k].fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The non-zero counters as `(to, kind, bytes)`, by peer then kind.
    pub fn sent(&self) -> Vec<(usize, &'static str, u64)> {
        let kinds = ALLTOALL_KINDS.len();
        (0..self.peers * kinds)
            .filter_map(|i| {
                let n = self.bytes[i].load(Ordering::Relaxed);
                (n > 0).then_some((i / kinds, ALLTOALL_KINDS[i % kinds], n))
            })
            .collect()
    }

    /// [`Traffic::sent`] of worker `from`, as matrix entries.
    pub fn entries(&self, from: usize) -> Vec<TrafficEntry> {
        self.sent()
            .into_iter()
            .map(|(to, kind, bytes)| TrafficEntry {
                from: from as u64,
                to: to as u64,
                kind: kind.to_string(),
                bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_peer_and_kind_and_ignores_what_it_does_not_know() {
        let t = Traffic::new(3);
        t.add(1, "dispatch", 10);
        t.add(1, "dispatch", 5);
        t.add(2, "params", 7);
        t.add(3, "dispatch", 1);
        t.add(0, "no such kind", 1);
        assert_eq!(t.sent(), vec![(1, "dispatch", 15), (2, "params", 7)]);
        assert_eq!(t.entries(4)[1].from, 4);
    }
}
