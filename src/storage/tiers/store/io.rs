//! The I/O threads: they read and write the Disk tier's slot file, encoding and decoding units
//! and applying deferred updates on the way, and answer the manager.
//!
//! Work reaches them in two lanes ([`IoLanes`]): loads and writes. A thread takes a load whenever
//! one is queued, so that a load (an acquirer's, or a prefetch the next block needs) never waits
//! behind write-backs of other units queued before it; writes fill the threads loads leave idle,
//! so write-backs and loads overlap. The manager's bookkeeping orders what must be ordered: a
//! unit is never read while its own write-back or its deferred gradient's write is in flight. A
//! thread taking a load also takes the queued loads whose bytes continue it in the file (units in
//! neighbouring slots, each read whole with its deferred gradient) and reads them in one request.

use super::lock;
use super::protocol::{Books, Request};
use crate::error::{Error, Result};
use crate::storage::tiers::disk::DiskTier;
use crate::storage::tiers::disk::ReadPiece;
use crate::storage::tiers::unit::{
    decode, decode_grads, decode_params, encode_grads_into, encode_into, encoded_len, grads_len, ExpertSlot, Pending,
    UnitId,
};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Work for the I/O threads. They also encode and decode units and apply deferred updates, so
/// that the manager, which every acquisition waits on, only keeps the books.
pub(super) enum IoJob {
    /// A unit, and with `update` (learning rate, global norm) its deferred gradient, applied.
    Read {
        id: UnitId,
        len: usize,
        grad_len: usize,
        update: Option<(f64, f64)>,
        partial: bool,
    },
    Write {
        id: UnitId,
        slot: Arc<ExpertSlot>,
    },
    WriteGrad {
        id: UnitId,
        grads: Box<[Vec<f32>; 4]>,
    },
}

impl IoJob {
    /// Whether the job reads (it goes in the loads' lane).
    pub(super) fn is_load(&self) -> bool {
        matches!(self, IoJob::Read { .. })
    }

    /// What a read reads, for coalescing (`None` for a write).
    fn piece(&self) -> Option<ReadPiece> {
        match self {
            IoJob::Read {
                id,
                len,
                grad_len,
                update,
                ..
            } => Some(ReadPiece {
                id: *id,
                len: *len,
                grad: update.map(|_| *grad_len),
            }),
            _ => None,
        }
    }

    /// The unit concerned and what the job does to it, for errors.
    pub(super) fn describe(&self) -> (UnitId, &'static str) {
        match self {
            IoJob::Read { id, .. } => (*id, "a read from disk"),
            IoJob::Write { id, .. } => (*id, "a write-back to disk"),
            IoJob::WriteGrad { id, .. } => (*id, "a deferred gradient's write to disk"),
        }
    }

    /// How to answer the manager when the job fails without answering itself (it panicked).
    fn failure(&self) -> impl FnOnce(Error) -> Request {
        enum Kind {
            Read { applied: bool, partial: bool },
            Write,
            WriteGrad,
        }
        let (id, kind) = match self {
            IoJob::Read {
                id, update, partial, ..
            } => (
                *id,
                Kind::Read {
                    applied: update.is_some(),
                    partial: *partial,
                },
            ),
            IoJob::Write { id, .. } => (*id, Kind::Write),
            IoJob::WriteGrad { id, .. } => (*id, Kind::WriteGrad),
        };
        move |err| match kind {
            Kind::Read { applied, partial } => Request::Loaded {
                id,
                slot: Err(err),
                applied,
                partial,
                seconds: 0.0,
            },
            Kind::Write => Request::Written {
                id,
                result: Err(err),
                seconds: 0.0,
            },
            Kind::WriteGrad => Request::GradWritten {
                id,
                result: Err(err),
                seconds: 0.0,
            },
        }
    }
}

/// The most bytes one coalesced read covers (the I/O thread's buffer holds it): 8 MiB, where the
/// sequential figures of the disks measured stop growing with the request size.
pub(super) const MAX_RUN_BYTES: u64 = 8 << 20;

/// The queued work of the I/O threads, in two lanes (see the module's documentation).
#[derive(Default)]
pub(super) struct IoLanes {
    state: Mutex<Lanes>,
    ready: Condvar,
}

#[derive(Default)]
struct Lanes {
    loads: VecDeque<IoJob>,
    writes: VecDeque<IoJob>,
    closed: bool,
}

impl IoLanes {
    /// Queue `job` in its lane; given back when the lanes are closed.
    pub(super) fn push(&self, job: IoJob) -> std::result::Result<(), IoJob> {
        let mut lanes = lock(&self.state);
        if lanes.closed {
            return Err(job);
        }
        if job.is_load() {
            lanes.loads.push_back(job);
        } else {
            lanes.writes.push_back(job);
        }
        drop(lanes);
        self.ready.notify_one();
        Ok(())
    }

    /// Stop: the threads finish the job in hand and leave; what is still queued is dropped (the
    /// store is going away with its Disk tier).
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }

    /// The next work, waiting for some: the oldest load with the queued loads whose bytes continue
    /// it in the file on either side (in file order, `max_bytes` in all at most), else the oldest
    /// write alone. `None` once closed.
    pub(super) fn take(&self, disk: &DiskTier, max_bytes: u64) -> Option<Vec<IoJob>> {
        let mut lanes = lock(&self.state);
        loop {
            if lanes.closed {
                return None;
            }
            if let Some(first) = lanes.loads.pop_front() {
                return Some(coalesce(first, &mut lanes.loads, disk, max_bytes));
            }
            if let Some(write) = lanes.writes.pop_front() {
                return Some(vec![write]);
            }
            lanes = self
                .ready
                .wait(lanes)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// `first` and the loads in `queue` that extend its run of contiguous bytes, in file order.
fn coalesce(first: IoJob, queue: &mut VecDeque<IoJob>, disk: &DiskTier, max_bytes: u64) -> Vec<IoJob> {
    let span = |job: &IoJob| job.piece().and_then(|p| disk.span(&p));
    let Some((mut start, mut end)) = span(&first) else {
        return vec![first];
    };
    let mut run = VecDeque::from([first]);
    loop {
        let next = queue.iter().position(|j| {
            span(j).is_some_and(|(s, e)| (s == end || e == start) && e.max(end) - s.min(start) <= max_bytes)
        });
        let Some(job) = next.and_then(|i| queue.remove(i)) else {
            return run.into();
        };
        let Some((s, e)) = span(&job) else {
            return run.into();
        };
        if s == end {
            end = e;
            run.push_back(job);
        } else {
            start = s;
            run.push_front(job);
        }
    }
}

/// One I/O thread: disk reads and writes (their seconds are what the figures count as I/O time),
/// with the encoding, decoding and deferred updates around them.
///
/// Every job gets an answer, its error included, also when the work panics: the panic becomes the
/// job's error, so that the manager reports what went wrong with which unit and keeps its books
/// (a thread that died instead would leave only "no I/O thread is left" to say).
pub(super) fn io_loop(disk: DiskTier, template: Option<Arc<ExpertSlot>>, lanes: Arc<IoLanes>, done: Books) {
    while let Some(jobs) = lanes.take(&disk, MAX_RUN_BYTES) {
        let failures: Vec<_> = jobs.iter().map(|j| (j.describe(), j.failure())).collect();
        let answers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            io_jobs(&disk, template.as_deref(), jobs)
        }))
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            failures
                .into_iter()
                .map(|((id, what), failure)| {
                    failure(Error::runtime(format!(
                        "{what} of expert {}.{} panicked: {why}",
                        id.0, id.1
                    )))
                })
                .collect()
        });
        for answer in answers {
            if !done.send(answer) {
                return;
            }
        }
    }
}

/// Do the jobs [`IoLanes::take`] gave (one write, or a run of contiguous loads); the answers for
/// the manager, one per job.
fn io_jobs(disk: &DiskTier, template: Option<&ExpertSlot>, jobs: Vec<IoJob>) -> Vec<Request> {
    if jobs.len() > 1 || jobs.first().is_some_and(IoJob::is_load) {
        return load_run(disk, template, jobs);
    }
    jobs.into_iter().map(|job| write_job(disk, job)).collect()
}

/// A write: a unit's write-back, or a deferred gradient beside its unit.
fn write_job(disk: &DiskTier, job: IoJob) -> Request {
    match job {
        IoJob::WriteGrad { id, grads } => {
            let t = Instant::now();
            let result = disk.write_grad_with(id, grads_len(&grads), |buf| encode_grads_into(id, &grads, buf));
            Request::GradWritten {
                id,
                result,
                seconds: t.elapsed().as_secs_f64(),
            }
        }
        IoJob::Write { id, slot } => {
            let t = Instant::now();
            let result = disk.write_with(id, encoded_len(&slot), |buf| encode_into(id, &slot, buf));
            drop(slot);
            Request::Written {
                id,
                result,
                seconds: t.elapsed().as_secs_f64(),
            }
        }
        read @ IoJob::Read { .. } => {
            let (id, what) = read.describe();
            (read.failure())(Error::runtime(format!(
                "{what} of expert {}.{} was taken for a write",
                id.0, id.1
            )))
        }
    }
}

/// Loads whose bytes are contiguous in the file, in one read: each unit (the parameters alone when
/// `partial`) decoded where its bytes landed, with its deferred update applied when it has one.
/// Each answer's `seconds` is its share (by bytes) of the time spent in the read itself (until the
/// bytes were there), not decoding or applying.
fn load_run(disk: &DiskTier, template: Option<&ExpertSlot>, jobs: Vec<IoJob>) -> Vec<Request> {
    struct Load {
        id: UnitId,
        update: Option<(f64, f64)>,
        partial: bool,
    }
    let mut loads = Vec::with_capacity(jobs.len());
    let mut pieces = Vec::with_capacity(jobs.len());
    for job in jobs {
        match (job.piece(), job) {
            (
                Some(piece),
                IoJob::Read {
                    id, update, partial, ..
                },
            ) => {
                pieces.push(piece);
                loads.push(Load { id, update, partial });
            }
            (_, job) => {
                // Not a read: cannot happen (only reads are coalesced); answered, not dropped.
                let (id, what) = job.describe();
                let fail = job.failure();
                return vec![fail(Error::runtime(format!(
                    "{what} of expert {}.{} was coalesced with reads",
                    id.0, id.1
                )))];
            }
        }
    }
    let started = Instant::now();
    let mut read_seconds = None;
    let decoded = match template {
        None => Err(Error::runtime("an empty expert store cannot decode units")),
        Some(template) => disk.read_run_with(&pieces, |i, bytes, grad| {
            read_seconds.get_or_insert_with(|| started.elapsed().as_secs_f64());
            let (id, load) = (pieces[i].id, &loads[i]);
            let mut unit = if load.partial {
                decode_params(id, bytes, template, "the disk tier")?
            } else {
                decode(id, bytes, template, "the disk tier")?
            };
            match (load.update, grad) {
                (Some((lr, norm)), Some(grad)) => {
                    let grads = decode_grads(id, grad, template)?;
                    unit.apply(Pending { grads, lr, norm })?;
                }
                (None, None) => {}
                _ => return Err(Error::runtime("a deferred update read without its gradient")),
            }
            Ok(unit)
        }),
    };
    let seconds = read_seconds.unwrap_or(0.0);
    let bytes: Vec<f64> = pieces.iter().map(|p| (p.len + p.grad.unwrap_or(0)) as f64).collect();
    let total: f64 = bytes.iter().sum::<f64>().max(1.0);
    let mut slots: Vec<Result<ExpertSlot>> = match decoded {
        Ok(slots) => slots,
        Err(e) => {
            let message = e.to_string();
            (0..loads.len()).map(|_| Err(Error::runtime(message.clone()))).collect()
        }
    };
    slots.resize_with(loads.len(), || Err(Error::runtime("a coalesced read lost a unit")));
    loads
        .into_iter()
        .zip(slots)
        .zip(bytes)
        .map(|((load, slot), b)| Request::Loaded {
            id: load.id,
            slot,
            applied: load.update.is_some(),
            partial: load.partial,
            seconds: seconds * b / total,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(id: UnitId, len: usize, update: bool) -> IoJob {
        IoJob::Read {
            id,
            len,
            grad_len: 3_000,
            update: update.then_some((0.1, 1.0)),
            partial: false,
        }
    }

    fn write(id: UnitId) -> IoJob {
        IoJob::WriteGrad {
            id,
            grads: Box::new([vec![1.0], vec![2.0], vec![3.0], vec![4.0]]),
        }
    }

    fn ids(jobs: &[IoJob]) -> Vec<UnitId> {
        jobs.iter().map(|j| j.describe().0).collect()
    }

    #[test]
    fn loads_go_before_earlier_writes_and_neighbours_are_read_together() {
        let dir = std::env::temp_dir().join(format!("semoe-io-lanes-{}", std::process::id()));
        let units: Vec<UnitId> = (0..6).map(|e| (0, e)).collect();
        let disk = DiskTier::open(&dir, true, units, 10_000, 3_000).unwrap();
        let lanes = IoLanes::default();
        lanes.push(write((0, 5))).ok().unwrap();
        // Whole units with their gradients: (0, 1), (0, 2) and (0, 3) follow one another in the
        // file, queued out of order behind an earlier write and an unrelated load.
        lanes.push(read((0, 2), 10_000, true)).ok().unwrap();
        lanes.push(read((0, 0), 100, false)).ok().unwrap();
        lanes.push(read((0, 3), 10_000, true)).ok().unwrap();
        lanes.push(read((0, 1), 10_000, true)).ok().unwrap();
        let first = lanes.take(&disk, MAX_RUN_BYTES).unwrap();
        assert_eq!(ids(&first), vec![(0, 1), (0, 2), (0, 3)], "in file order");
        // (0, 0) is read without its gradient: its bytes stop short of (0, 1)'s slot.
        assert_eq!(ids(&lanes.take(&disk, MAX_RUN_BYTES).unwrap()), vec![(0, 0)]);
        assert_eq!(
            ids(&lanes.take(&disk, MAX_RUN_BYTES).unwrap()),
            vec![(0, 5)],
            "the write last"
        );
        // A run stops at the size limit.
        lanes.push(read((0, 1), 10_000, true)).ok().unwrap();
        lanes.push(read((0, 2), 10_000, true)).ok().unwrap();
        assert_eq!(lanes.take(&disk, 20_000).unwrap().len(), 1);
        assert_eq!(lanes.take(&disk, 20_000).unwrap().len(), 1);
        lanes.close();
        assert!(lanes.take(&disk, MAX_RUN_BYTES).is_none());
        assert!(
            lanes.push(read((0, 1), 10, false)).is_err(),
            "closed lanes take nothing"
        );
        disk.remove();
    }
}
