//! Sharded dense parameters, gathered one leg ahead: the horizontal half of SE-MoE's 2D prefetch.
//!
//! With `storage.shard_dense`, a worker's replica holds only the dense tensors it owns (ZeRO-3
//! style): each tensor's owner keeps it with its AdamW moments and installs its new values at every
//! commit, and nobody else keeps a copy between steps. During a step, a [`Gatherer`] fetches each leg's
//! tensors (see [`crate::model::legs`]) from their owners, one fused request per owner, and starts
//! fetching the next leg's while the lanes compute this one. A leg's parameters are dropped as soon
//! as every lane has moved past it; the backward legs gather again, as ZeRO-3 does.
//!
//! The values are copies of the owners' committed tensors, so a sharded run computes exactly what a
//! replicated one does, bit for bit.

use super::communicator::{CommMsg, SharedReplica};
use super::placement::Placement;
use super::{ask, ActorName};
use crate::error::{Error, Result};
use crate::model::gpt::{Ffn, Gpt};
use crate::model::legs::{section_tensors, training_legs};
use crate::net::{Payload, StepId};
use ractor::ActorRef;
use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// A worker's counters of gathered dense parameters, over the run.
#[derive(Debug, Default)]
pub struct DenseCounters {
    gathered_bytes: AtomicU64,
    legs: AtomicU64,
    wait_ns: AtomicU64,
    live_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    resident_bytes: AtomicU64,
}

/// What [`DenseCounters`] show (one worker).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DenseStats {
    /// Bytes of dense parameters received from other workers.
    pub gathered_bytes: u64,
    /// Legs gathered (each leg once per step, whatever the number of lanes).
    pub legs: u64,
    /// Seconds lanes waited for a leg's parameters (a leg prefetched in time costs nothing).
    pub wait_s: f64,
    /// The most bytes of gathered leg parameters alive at once.
    pub peak_bytes: u64,
    /// Bytes of dense parameters the worker keeps between steps (the tensors it owns, or all of
    /// them when the dense parameters are replicated).
    pub resident_bytes: u64,
}

impl DenseCounters {
    /// The counters' current values.
    pub fn stats(&self) -> DenseStats {
        DenseStats {
            gathered_bytes: self.gathered_bytes.load(Ordering::Relaxed),
            legs: self.legs.load(Ordering::Relaxed),
            wait_s: self.wait_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            peak_bytes: self.peak_bytes.load(Ordering::Relaxed),
            resident_bytes: self.resident_bytes.load(Ordering::Relaxed),
        }
    }

    /// Record the bytes the worker keeps between steps.
    pub fn set_resident(&self, bytes: u64) {
        self.resident_bytes.store(bytes, Ordering::Relaxed);
    }

    fn hold(&self, bytes: u64) {
        let live = self.live_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak_bytes.fetch_max(live, Ordering::Relaxed);
    }
}

/// Bytes held by the dense tensors of `model` (empty tensors hold none).
pub fn dense_bytes(model: &Gpt<f32>) -> u64 {
    model
        .tensors()
        .iter()
        .map(|(_, _, b)| (b.len() * std::mem::size_of::<f32>()) as u64)
        .sum()
}

/// One leg's parameters: a model whose tensors of that leg hold their values and all others are
/// empty. Dropping it releases its bytes from the worker's count.
pub struct LegParams {
    model: Gpt<f32>,
    bytes: u64,
    counters: Arc<DenseCounters>,
}

impl Deref for LegParams {
    type Target = Gpt<f32>;
    fn deref(&self) -> &Gpt<f32> {
        &self.model
    }
}

impl Drop for LegParams {
    fn drop(&mut self) {
        self.counters.live_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Where a pass reads its dense parameters: the worker's full replica, or one leg's gathered part.
#[derive(Clone)]
pub enum DenseParams {
    /// Every dense tensor (replicated dense parameters).
    Replica(Arc<Gpt<f32>>),
    /// The tensors of one leg (sharded dense parameters).
    Leg(Arc<LegParams>),
}

impl Deref for DenseParams {
    type Target = Gpt<f32>;
    fn deref(&self) -> &Gpt<f32> {
        match self {
            DenseParams::Replica(m) => m,
            DenseParams::Leg(l) => l,
        }
    }
}

/// `model` with every tensor emptied but those whose index (in [`Gpt::tensors`] order) `keep`
/// accepts: a worker's own shard (`keep` = owned by it) or the empty shell a leg is filled into.
pub fn keep_only(model: &Gpt<f32>, keep: impl Fn(usize) -> bool) -> Gpt<f32> {
    let mut out = model.clone();
    for (i, buf) in out.buffers_mut().into_iter().enumerate() {
        if !keep(i) {
            *buf = Vec::new();
        }
    }
    out
}

/// The gate weights of MoE block `block` alone, in a model of `shell`'s structure: what a Gate keeps
/// from a forward to its backward, rather than the whole leg.
pub fn gate_view(shell: &Gpt<f32>, leg: &Gpt<f32>, block: usize) -> Result<Arc<Gpt<f32>>> {
    let mut view = shell.clone();
    let wg = match leg.blocks.get(block).map(|b| &b.ffn) {
        Some(Ffn::Moe(layer)) => layer.params.wg.clone(),
        _ => return Err(Error::shape("gate", format!("block {block} is not an MoE block"))),
    };
    if let Some(Ffn::Moe(layer)) = view.blocks.get_mut(block).map(|b| &mut b.ffn) {
        layer.params.wg = wg;
    }
    Ok(Arc::new(view))
}

/// A leg's gather, done once: its parameters, or why it failed (kept, so that every lane gets the
/// first failure at once rather than trying again).
type LegResult = std::result::Result<Arc<LegParams>, GatherFailure>;

/// A failed gather, kept as its kind: the coordinator decides on a failed step by the kind (a
/// failed actor is repaired by a replay; a deadline names the worker that was silent, which the
/// coordinator may excuse; a malformed message names its sender).
#[derive(Clone, Debug)]
enum GatherFailure {
    Restartable(String),
    Deadline {
        peer: String,
        what: String,
        deadline_ms: u64,
    },
    Protocol {
        peer: String,
        detail: String,
    },
    Other(String),
}

impl GatherFailure {
    fn of(e: &Error) -> Self {
        match e {
            _ if e.is_restartable() => GatherFailure::Restartable(e.to_string()),
            Error::Deadline {
                peer,
                what,
                deadline_ms,
            } => GatherFailure::Deadline {
                peer: peer.clone(),
                what: what.clone(),
                deadline_ms: *deadline_ms,
            },
            Error::Protocol { peer, detail } => GatherFailure::Protocol {
                peer: peer.clone(),
                detail: detail.clone(),
            },
            _ => GatherFailure::Other(e.to_string()),
        }
    }

    /// The error again, of its kind.
    fn error(&self) -> Error {
        match self {
            GatherFailure::Restartable(text) => Error::ActorFailed {
                actor: "a dense gather".into(),
                detail: text.clone(),
            },
            GatherFailure::Deadline {
                peer,
                what,
                deadline_ms,
            } => Error::Deadline {
                peer: peer.clone(),
                what: what.clone(),
                deadline_ms: *deadline_ms,
            },
            GatherFailure::Protocol { peer, detail } => Error::Protocol {
                peer: peer.clone(),
                detail: detail.clone(),
            },
            GatherFailure::Other(text) => Error::runtime(text.clone()),
        }
    }
}

struct Slot {
    /// `None` once every lane has taken the leg.
    cell: Option<Arc<OnceCell<LegResult>>>,
    taken: usize,
    prefetching: bool,
}

/// One step's gathers on one worker, shared by its lanes.
pub struct Gatherer {
    step: StepId,
    worker: usize,
    deadline: Duration,
    comm: ActorRef<CommMsg>,
    /// The worker's replica at the start of the step (its own tensors' committed values).
    own: Arc<Gpt<f32>>,
    placement: Arc<Placement>,
    shell: Arc<Gpt<f32>>,
    /// Tensor indices of each leg, and each tensor's length.
    legs: Vec<Vec<usize>>,
    lens: Vec<usize>,
    lanes: usize,
    slots: Mutex<Vec<Slot>>,
    /// Background gathers, aborted by [`Gatherer::cancel`] when the step ends.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    counters: Arc<DenseCounters>,
}

/// What a [`Gatherer`] is made from.
pub struct GatherArgs {
    /// The step.
    pub step: StepId,
    /// This worker.
    pub worker: usize,
    /// Deadline of one exchange.
    pub deadline: Duration,
    /// This worker's Communicator.
    pub comm: ActorRef<CommMsg>,
    /// This worker's replica (its own tensors).
    pub replica: SharedReplica,
    /// Who owns which tensor.
    pub placement: Arc<Placement>,
    /// Lanes that will take each leg.
    pub lanes: usize,
    /// The worker's counters.
    pub counters: Arc<DenseCounters>,
}

impl Gatherer {
    /// A gatherer for one step; nothing is fetched until a lane asks.
    pub fn new(a: GatherArgs) -> Arc<Self> {
        let own = a.replica.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let legs: Vec<Vec<usize>> = training_legs(own.config())
            .iter()
            .map(|stages| section_tensors(&own, stages))
            .collect();
        let lens = own
            .tensors()
            .iter()
            .map(|(_, shape, _)| shape.iter().product())
            .collect();
        let slots = (0..legs.len())
            .map(|_| Slot {
                cell: Some(Arc::new(OnceCell::new())),
                taken: 0,
                prefetching: false,
            })
            .collect();
        Arc::new(Gatherer {
            step: a.step,
            worker: a.worker,
            deadline: a.deadline,
            comm: a.comm,
            shell: Arc::new(keep_only(&own, |_| false)),
            own,
            placement: a.placement,
            legs,
            lens,
            lanes: a.lanes.max(1),
            slots: Mutex::new(slots),
            tasks: Mutex::new(Vec::new()),
            counters: a.counters,
        })
    }

    /// The model structure with every tensor empty.
    pub fn shell(&self) -> &Gpt<f32> {
        &self.shell
    }

    /// Leg `leg`'s parameters for one lane; starts gathering leg `leg + 1`. Once every lane has
    /// taken a leg the gatherer lets go of it (the lanes' passes hold it until their next leg).
    pub async fn take(self: &Arc<Self>, leg: usize) -> Result<DenseParams> {
        let params = self.fetch(leg).await?;
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get_mut(leg) {
            slot.taken += 1;
            if slot.taken >= self.lanes {
                slot.cell = None;
            }
        }
        Ok(params)
    }

    /// Leg `leg`'s parameters without counting a lane (for the work before the lanes start).
    pub async fn fetch(self: &Arc<Self>, leg: usize) -> Result<DenseParams> {
        self.prefetch(leg + 1);
        let cell = {
            let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots
                .get(leg)
                .ok_or_else(|| Error::runtime(format!("a pass has no leg {leg}")))?
                .cell
                .clone()
                .ok_or_else(|| {
                    Error::runtime(format!(
                        "leg {leg} of step {} was asked for after every lane took it",
                        self.step
                    ))
                })?
        };
        let started = Instant::now();
        let result = cell.get_or_init(|| self.gather_once(leg)).await;
        self.counters
            .wait_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match result {
            Ok(leg_params) => Ok(DenseParams::Leg(leg_params.clone())),
            Err(failure) => Err(failure.error()),
        }
    }

    /// Stop the background gathers still running (the step is over, or failed and will be
    /// replayed with a new gatherer).
    pub fn cancel(&self) {
        for task in self.tasks.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            task.abort();
        }
    }

    async fn gather_once(&self, leg: usize) -> LegResult {
        self.gather(leg).await.map_err(|e| GatherFailure::of(&e))
    }

    /// Start gathering leg `leg` in the background (once); a failure is kept for the lanes that
    /// take the leg.
    fn prefetch(self: &Arc<Self>, leg: usize) {
        let cell = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            match slots.get_mut(leg) {
                Some(slot) if !slot.prefetching => {
                    slot.prefetching = true;
                    slot.cell.clone()
                }
                _ => None,
            }
        };
        if let Some(cell) = cell {
            let me = self.clone();
            let task = tokio::spawn(async move {
                cell.get_or_init(|| me.gather_once(leg)).await;
            });
            self.tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(task.abort_handle());
        }
    }

    /// Fetch leg `leg`'s tensors: the worker's own from its replica, the others' in one request per
    /// owner, all at once.
    async fn gather(&self, leg: usize) -> Result<Arc<LegParams>> {
        let tensors = &self.legs[leg];
        let mut by_owner: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &i in tensors {
            let owner = *self
                .placement
                .tensor_owner
                .get(i)
                .ok_or_else(|| Error::runtime(format!("tensor {i} has no owner")))?;
            by_owner.entry(owner).or_default().push(i);
        }
        let own_bufs = self.own.tensors();
        let mut got: Vec<(usize, Vec<f32>)> = by_owner
            .remove(&self.worker)
            .unwrap_or_default()
            .into_iter()
            .map(|i| (i, own_bufs[i].2.clone()))
            .collect();
        let asked: BTreeMap<usize, Vec<usize>> = by_owner;
        if !asked.is_empty() {
            let requests: Vec<(usize, Payload)> = asked
                .iter()
                .map(|(&w, ts)| {
                    (
                        w,
                        Payload::Gather {
                            step: self.step,
                            tensors: ts.clone(),
                        },
                    )
                })
                .collect();
            let what = format!("the dense gather of leg {leg} of step {}", self.step);
            let who = ActorName(format!("communicator of worker {}", self.worker));
            let replies = ask(&self.comm, &who, &what, self.deadline * 2, |reply| CommMsg::Exchange {
                step: self.step,
                what: what.clone(),
                kind: "dense_gather",
                requests,
                reply,
            })
            .await?;
            for (peer, payload) in replies {
                let Payload::Tensors(values) = payload else {
                    return Err(Error::runtime(format!(
                        "worker {peer} answered {what} with {payload:?}"
                    )));
                };
                let want = asked.get(&peer).map(Vec::as_slice).unwrap_or_default();
                if values.iter().map(|(i, _)| *i).ne(want.iter().copied()) {
                    return Err(Error::runtime(format!(
                        "worker {peer} answered {what} with other tensors than were asked"
                    )));
                }
                let bytes: usize = values.iter().map(|(_, v)| v.len() * std::mem::size_of::<f32>()).sum();
                self.counters.gathered_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                got.extend(values);
            }
        }
        let mut model = (*self.shell).clone();
        let mut bytes = 0u64;
        {
            let mut bufs = model.buffers_mut();
            for (i, values) in got {
                if values.len() != self.lens[i] {
                    return Err(Error::shape(
                        format!("gathered tensor {i}"),
                        format!("{} values, expected {}", values.len(), self.lens[i]),
                    ));
                }
                bytes += (values.len() * std::mem::size_of::<f32>()) as u64;
                *bufs[i] = values;
            }
        }
        self.counters.legs.fetch_add(1, Ordering::Relaxed);
        self.counters.hold(bytes);
        Ok(Arc::new(LegParams {
            model,
            bytes,
            counters: self.counters.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_failure_is_handed_to_every_lane_as_its_own_kind() {
        let deadline = Error::Deadline {
            peer: "worker 1".into(),
            what: "a dense gather of step 3".into(),
            deadline_ms: 500,
        };
        let again = GatherFailure::of(&deadline).error();
        assert_eq!(again.silent_worker(), Some(1), "{again}");
        assert_eq!(again.to_string(), deadline.to_string());
        let protocol = Error::protocol("worker 2", "a gather of another step");
        let again = GatherFailure::of(&protocol).error();
        assert!(matches!(again, Error::Protocol { .. }), "{again}");
        assert_eq!(again.to_string(), protocol.to_string());
        let failed = Error::ActorFailed {
            actor: "the communicator".into(),
            detail: "panicked".into(),
        };
        assert!(GatherFailure::of(&failed).error().is_restartable());
        assert!(!GatherFailure::of(&Error::runtime("disk")).error().is_restartable());
    }
}
