//! The I/O threads: they read and write the Disk tier's slot file, encoding and decoding units
//! and applying deferred updates on the way, and answer the manager.

use super::lock;
use super::protocol::{Books, Request};
use crate::error::{Error, Result};
use crate::storage::tiers::disk::DiskTier;
use crate::storage::tiers::unit::{
    decode, decode_grads, decode_params, encode_grads_into, encode_into, encoded_len, grads_len, ExpertSlot, Pending,
    UnitId,
};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
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

/// One I/O thread: disk reads and writes (their seconds are what the figures count as I/O time),
/// with the encoding, decoding and deferred updates around them.
///
/// Every job gets an answer, its error included, also when the work panics: the panic becomes the
/// job's error, so that the manager reports what went wrong with which unit and keeps its books
/// (a thread that died instead would leave only "no I/O thread is left" to say).
pub(super) fn io_loop(
    disk: DiskTier,
    template: Option<Arc<ExpertSlot>>,
    jobs: Arc<Mutex<Receiver<IoJob>>>,
    done: Books,
) {
    loop {
        let job = match lock(&jobs).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let (id, what) = job.describe();
        let failure = job.failure();
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| io_job(&disk, template.as_deref(), job)))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                failure(Error::runtime(format!(
                    "{what} of expert {}.{} panicked: {why}",
                    id.0, id.1
                )))
            });
        if !done.send(answer) {
            return;
        }
    }
}

/// Do one I/O job; the answer for the manager.
fn io_job(disk: &DiskTier, template: Option<&ExpertSlot>, job: IoJob) -> Request {
    match job {
        IoJob::Read {
            id,
            len,
            grad_len,
            update,
            partial,
        } => {
            let mut seconds = 0.0;
            let slot = match template {
                None => Err(Error::runtime("an empty expert store cannot decode units")),
                Some(template) => load_unit(disk, id, template, len, grad_len, update, partial, &mut seconds),
            };
            Request::Loaded {
                id,
                slot,
                applied: update.is_some(),
                partial,
                seconds,
            }
        }
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
    }
}

/// Read a unit (the parameters alone when `partial`) and decode it where the bytes landed, then
/// read and apply the deferred update's gradient when there is one. `seconds` gets the time spent
/// in the reads themselves (until the bytes were there), not decoding or applying.
#[allow(clippy::too_many_arguments)]
fn load_unit(
    disk: &DiskTier,
    id: UnitId,
    template: &ExpertSlot,
    len: usize,
    grad_len: usize,
    update: Option<(f64, f64)>,
    partial: bool,
    seconds: &mut f64,
) -> Result<ExpertSlot> {
    let started = Instant::now();
    let mut unit = disk.read_with(id, len, |bytes| {
        *seconds += started.elapsed().as_secs_f64();
        if partial {
            decode_params(id, bytes, template, "the disk tier")
        } else {
            decode(id, bytes, template, "the disk tier")
        }
    })?;
    if let Some((lr, norm)) = update {
        let started = Instant::now();
        let grads = disk.read_grad_with(id, grad_len, |bytes| {
            *seconds += started.elapsed().as_secs_f64();
            decode_grads(id, bytes, template)
        })?;
        unit.apply(Pending { grads, lr, norm })?;
    }
    Ok(unit)
}
