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

/// The member id under which the traffic of members gone long ago is summed (a run over worker
/// processes keeps the newest [`DEPARTED_KEPT`] members that left one by one).
pub const EARLIER_MEMBERS: u64 = u64::MAX;

/// Members that left whose traffic a run keeps member by member; the older ones are summed as
/// [`EARLIER_MEMBERS`], so that a run with churn keeps a bounded table (it grew by a row per
/// pair of members, every join adding one per peer and kind).
pub const DEPARTED_KEPT: usize = 64;

/// Fold the traffic of all but the newest `keep` members that are neither `live` nor
/// [`EARLIER_MEMBERS`] into [`EARLIER_MEMBERS`] (ids grow with each join: newest is largest).
pub fn fold_departed(
    table: &mut std::collections::BTreeMap<(u64, u64, String), u64>,
    live: &std::collections::BTreeSet<u64>,
    keep: usize,
) {
    let mut departed: Vec<u64> = table
        .keys()
        .flat_map(|(from, to, _)| [*from, *to])
        .filter(|id| *id != EARLIER_MEMBERS && !live.contains(id))
        .collect();
    departed.sort_unstable();
    departed.dedup();
    let Some(fold) = departed.len().checked_sub(keep).filter(|&n| n > 0) else {
        return;
    };
    let folded: std::collections::BTreeSet<u64> = departed[..fold].iter().copied().collect();
    let map = |id: u64| if folded.contains(&id) { EARLIER_MEMBERS } else { id };
    let moved: Vec<(u64, u64, String)> = table
        .keys()
        .filter(|(from, to, _)| folded.contains(from) || folded.contains(to))
        .cloned()
        .collect();
    for key in moved {
        if let Some(bytes) = table.remove(&key) {
            let (from, to, kind) = key;
            let total = table.entry((map(from), map(to), kind)).or_default();
            *total = total.saturating_add(bytes);
        }
    }
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

#[cfg(test)]
mod fold_tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn departed_members_beyond_the_newest_are_summed_as_earlier_members() {
        let mut table: BTreeMap<(u64, u64, String), u64> = BTreeMap::new();
        // Members 0..10 came and went in pairs with 100 and 101, which are still there.
        for gone in 0..10u64 {
            for live in [100u64, 101] {
                table.insert((gone, live, "dispatch".into()), 10);
                table.insert((live, gone, "combine".into()), 1);
            }
        }
        table.insert((100, 101, "dispatch".into()), 7);
        let total = |t: &BTreeMap<(u64, u64, String), u64>| t.values().sum::<u64>();
        let before = total(&table);
        let live = BTreeSet::from([100, 101]);
        fold_departed(&mut table, &live, 3);
        assert_eq!(total(&table), before, "no byte lost");
        let ids: BTreeSet<u64> = table.keys().flat_map(|(f, t, _)| [*f, *t]).collect();
        assert_eq!(ids, BTreeSet::from([7, 8, 9, 100, 101, EARLIER_MEMBERS]));
        assert_eq!(table[&(EARLIER_MEMBERS, 100, "dispatch".to_string())], 70);
        assert_eq!(table[&(101, EARLIER_MEMBERS, "combine".to_string())], 7);
        assert_eq!(table[&(100, 101, "dispatch".to_string())], 7);
        // Folding again changes nothing; a table within the bound is left as it is.
        let folded = table.clone();
        fold_departed(&mut table, &live, 3);
        assert_eq!(table, folded);
    }
}
