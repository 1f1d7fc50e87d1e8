//! What the manager is asked (by the store, its leases and the I/O threads) and how it answers,
//! and how a request reaches it: inline under its lock, or through its thread's channel.

use super::lock;
use super::manager::Manager;
use crate::error::Result;
use crate::storage::tiers::unit::{ExpertSlot, Pending, UnitId};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

pub(super) type Reply<T> = tokio::sync::oneshot::Sender<Result<T>>;

/// What an acquirer gets: the unit (with the update it came to apply, for a commit), or, for a
/// commit of a unit on disk, word that the update was deferred.
pub(super) enum Grant {
    Slot(Box<ExpertSlot>, Option<Pending>),
    Deferred,
}

pub(super) enum Request {
    Acquire {
        id: UnitId,
        commit: Option<Pending>,
        reply: Reply<Grant>,
    },
    Release {
        id: UnitId,
        slot: Box<ExpertSlot>,
        dirty: bool,
    },
    Hint {
        block: usize,
        routed: Vec<usize>,
        forward: bool,
    },
    EndStep {
        step: u64,
    },
    Snapshot {
        reply: Reply<Vec<(UnitId, ExpertSlot)>>,
    },
    /// Answered once no disk work is in flight or queued and no unit is on its way.
    Idle {
        reply: Reply<()>,
    },
    Loaded {
        id: UnitId,
        /// The decoded unit, its deferred update applied when the read carried one.
        slot: Result<ExpertSlot>,
        applied: bool,
        partial: bool,
        seconds: f64,
    },
    Written {
        id: UnitId,
        result: Result<()>,
        seconds: f64,
    },
    GradWritten {
        id: UnitId,
        result: Result<()>,
        seconds: f64,
    },
    Stop,
}

impl Request {
    /// Requests after which the figures go to the metrics recorder.
    pub(super) fn exports(&self) -> bool {
        matches!(
            self,
            Request::EndStep { .. } | Request::Snapshot { .. } | Request::Idle { .. }
        )
    }
}

/// How requests reach the manager; shared by the store, its leases and its I/O threads.
#[derive(Clone)]
pub(super) enum Books {
    /// Everything fits in memory: each request is handled on the thread that makes it, under the
    /// manager's lock (`None` once the store is dropped). There is nothing to schedule, and a
    /// manager thread cost two thread wake-ups per request: a third of all context switches of a
    /// training step on two cores.
    Inline(Arc<Mutex<Option<Manager>>>),
    /// With a Disk tier: a manager thread takes requests in batches, so that it decides what to
    /// load and evict having seen every request that arrived while it was busy (handled one by
    /// one, the same runs read 5-15% more bytes per step).
    Thread(Sender<Request>),
}

impl Books {
    /// Hand `req` to the manager. False when the store has stopped (the request is dropped,
    /// closing its answer channel).
    pub(super) fn send(&self, req: Request) -> bool {
        match self {
            Books::Thread(tx) => tx.send(req).is_ok(),
            Books::Inline(shared) => {
                let mut guard = lock(shared);
                let Some(manager) = guard.as_mut() else {
                    return false;
                };
                let export = req.exports();
                manager.handle(req);
                manager.step(export);
                true
            }
        }
    }

    /// Stop the manager: it drops its I/O queue (the I/O threads finish their job and stop) and
    /// every pending answer channel.
    pub(super) fn stop(&self) {
        match self {
            Books::Thread(tx) => {
                let _ = tx.send(Request::Stop);
            }
            Books::Inline(shared) => drop(lock(shared).take()),
        }
    }
}
