//! The Disk tier: one preallocated slot file per worker (`experts.slots` under a directory of the
//! run), every expert unit and its deferred gradient at a fixed offset.
//!
//! Each unit has a slot sized for its encoding and, right after it, a slot for its deferred
//! gradient, both padded to [`ALIGN`] bytes; the file is allocated in full when the tier opens
//! (every unit of the worker gets its slots, in id order). Units are read and written with
//! positional I/O (`pread`/`pwrite`: no shared cursor), so the store's I/O threads use one file
//! concurrently, and a parameters-only load reads a prefix of the unit's slot.
//!
//! The file is working storage, not a checkpoint (checkpoints are written atomically elsewhere;
//! the tier is rebuilt from the last checkpoint on restart): nothing is flushed with `fsync`.
//!
//! With `drop_page_cache` (the default) the file is opened with `O_DIRECT`: reads and writes go
//! past the page cache to the disk, from 4096-aligned buffers, with lengths padded to 4096, so the
//! page cache never acts as a hidden, unbudgeted extra tier. A file system that refuses `O_DIRECT`
//! (at the open or at the first aligned write) gets buffered I/O instead, each write flushed
//! (`fdatasync`) and the pages of every access dropped afterwards (`posix_fadvise(DONTNEED)`), the
//! same property reached the slow way; [`DiskTier::mode`] says which path was taken. Without
//! `drop_page_cache` the file is read and written through the page cache.
//!
//! Every positional read and write goes through one loop per direction ([`DiskTier`]'s `pread_all`
//! and `pwrite_all`), which a chaos run can disturb through a [`DiskFaults`] hook (an error, a short
//! read, a delay before the call); without a hook the loop costs one `None` check per call. A
//! transient error (`EIO`, `EAGAIN`, `EBUSY`, `ETIMEDOUT`) is retried, the whole read or write
//! again, up to [`ATTEMPTS`] times: the slot's bytes do not change in between, so a retried read
//! returns what the first would have, and a retried write leaves what the first would have left.
//! Any other error (a full disk, `ENOSPC`, above all) fails at once.

use super::unit::UnitId;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Alignment of direct I/O: buffers, offsets and lengths are multiples of it.
pub const ALIGN: usize = 4096;

/// `n` rounded up to a multiple of [`ALIGN`].
pub fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// The name of the slot file in the tier's directory.
pub const FILE_NAME: &str = "experts.slots";

/// How many times a read or write of a slot is tried when it fails with a transient error.
pub const ATTEMPTS: u32 = 3;

/// The direction of one I/O of the slot file, for a [`DiskFaults`] hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskOp {
    /// A `pread`.
    Read,
    /// A `pwrite`.
    Write,
}

/// What an injected fault does to one `pread` or `pwrite` of the slot file.
#[derive(Debug)]
pub enum InjectedIo {
    /// The call fails with this error and moves no byte.
    Fail(io::Error),
    /// A read returns at most this many bytes (rounded down to [`ALIGN`], and at least [`ALIGN`],
    /// with `O_DIRECT`); the tier reads the rest with further calls, as it does for any short read.
    Short(usize),
    /// The call first waits this long (a slow disk).
    Delay(Duration),
}

/// Fault injection into the Disk tier (chaos runs): asked before every `pread` and `pwrite` of a
/// worker's slot file, on the I/O thread that makes it. The storage layer only defines the seam;
/// `chaos::FaultPlan` implements it from a scenario.
pub trait DiskFaults: Send + Sync {
    /// What to do to the call of `worker`'s tier that is about to move `len` bytes of unit `id`
    /// (`None`: nothing).
    fn before(&self, worker: usize, op: DiskOp, id: UnitId, len: usize) -> Option<InjectedIo>;
}

/// A shared [`DiskFaults`] hook, as [`super::StorageConfig`] carries it (equal when it is the same
/// hook).
#[derive(Clone)]
pub struct DiskFaultHook(pub Arc<dyn DiskFaults>);

impl std::fmt::Debug for DiskFaultHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskFaultHook")
    }
}

impl PartialEq for DiskFaultHook {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

/// How the slot file is read and written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`: past the page cache.
    Direct,
    /// Through the page cache; with `drop` each write is flushed and the accessed pages are
    /// dropped from the page cache afterwards.
    Buffered {
        /// Flush and drop pages after each access.
        drop: bool,
    },
}

/// One unit's part of a coalesced read ([`DiskTier::read_run_with`]): the first `len` bytes of
/// its slot, and with `grad` the first that many bytes of its deferred gradient's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadPiece {
    /// The unit.
    pub id: UnitId,
    /// Bytes of the unit's slot to read (its parameters alone, or all of it).
    pub len: usize,
    /// Bytes of its gradient's slot to read, when a deferred update waits for it.
    pub grad: Option<usize>,
}

/// The unit and gradient slots of one expert.
#[derive(Debug)]
struct Slot {
    offset: u64,
    unit_len: u64,
    grad_len: u64,
    unit_written: AtomicBool,
    grad_written: AtomicBool,
}

impl Slot {
    fn grad_offset(&self) -> u64 {
        self.offset + padded(self.unit_len)
    }
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    mode: IoMode,
    slots: BTreeMap<UnitId, Slot>,
    len: u64,
}

/// The Disk tier of one worker: its directory, its slot file and the slots' layout. Cheap to
/// clone (the I/O threads share one open file).
#[derive(Clone, Debug)]
pub struct DiskTier {
    inner: Arc<Inner>,
    /// The fault hook and the worker it is asked for (chaos runs only).
    faults: Option<(DiskFaultHook, usize)>,
}

impl DiskTier {
    /// Create (or reuse) `dir` and create its slot file (replacing any old one) with a slot of
    /// `unit_len` bytes and one of `grad_len` bytes for each of `units`, allocated in full.
    pub fn open(
        dir: &Path,
        drop_page_cache: bool,
        units: impl IntoIterator<Item = UnitId>,
        unit_len: u64,
        grad_len: u64,
    ) -> Result<Self> {
        Self::open_with(dir, drop_page_cache, units, unit_len, grad_len, probe_direct)
    }

    /// [`DiskTier::open`] with the check that `O_DIRECT` works given (tests simulate a file system
    /// that refuses it).
    fn open_with(
        dir: &Path,
        drop_page_cache: bool,
        units: impl IntoIterator<Item = UnitId>,
        unit_len: u64,
        grad_len: u64,
        probe: fn(&File) -> io::Result<()>,
    ) -> Result<Self> {
        let existed = dir.is_dir();
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create the disk tier's directory", dir, e))?;
        let path = dir.join(FILE_NAME);
        let mut slots = BTreeMap::new();
        let mut len = 0u64;
        for id in units {
            let slot = Slot {
                offset: len,
                unit_len,
                grad_len,
                unit_written: AtomicBool::new(false),
                grad_written: AtomicBool::new(false),
            };
            if let std::collections::btree_map::Entry::Vacant(v) = slots.entry(id) {
                v.insert(slot);
                len += padded(unit_len) + padded(grad_len);
            }
        }
        // A file left there is unlinked first, not truncated: a store still closing (a runtime
        // dropped a moment ago, an I/O thread left in a read) keeps writing to its own inode,
        // never into this one's slots.
        let _ = std::fs::remove_file(&path);
        let create = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true).create(true).truncate(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            match o.open(&path) {
                // The directory removed under us, empty, by a store of before closing late:
                // made again, once.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(dir)?;
                    o.open(&path)
                }
                opened => opened,
            }
        };
        let fail = |e| Error::io("cannot create the disk tier's slot file", &path, e);
        let opened = (|| -> Result<(File, IoMode)> {
            let (file, mode) = if drop_page_cache {
                match create(true) {
                    Ok(f) => {
                        allocate(&f, len).map_err(fail)?;
                        match probe(&f) {
                            Ok(()) => (f, IoMode::Direct),
                            Err(e) if refuses_direct(&e) => {
                                drop(f);
                                (create(false).map_err(fail)?, IoMode::Buffered { drop: true })
                            }
                            Err(e) => return Err(fail(e)),
                        }
                    }
                    Err(e) if refuses_direct(&e) => (create(false).map_err(fail)?, IoMode::Buffered { drop: true }),
                    Err(e) => return Err(fail(e)),
                }
            } else {
                (create(false).map_err(fail)?, IoMode::Buffered { drop: false })
            };
            if mode != IoMode::Direct {
                allocate(&file, len).map_err(fail)?;
            }
            Ok((file, mode))
        })();
        // A slot file that could not be made whole goes (a failed allocation may keep the blocks
        // it got: the next start would find the disk fuller), and the directory if made here.
        let (file, mode) = opened.inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
            if !existed {
                let _ = std::fs::remove_dir(dir);
            }
        })?;
        Ok(DiskTier {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                path,
                file,
                mode,
                slots,
                len,
            }),
            faults: None,
        })
    }

    /// The same tier with every `pread` and `pwrite` first shown to `hook`, as `worker`'s.
    pub fn with_faults(mut self, hook: DiskFaultHook, worker: usize) -> Self {
        self.faults = Some((hook, worker));
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The slot file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The slot file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.inner.len
    }

    /// Whether I/O goes past the page cache (`O_DIRECT`) or through it.
    pub fn mode(&self) -> IoMode {
        self.inner.mode
    }

    /// Write a unit's bytes (at most the slot's length).
    pub fn write(&self, id: UnitId, bytes: &[u8]) -> Result<()> {
        self.write_with(id, bytes.len(), |buf| buf.copy_from_slice(bytes))
    }

    /// Write `len` bytes of a unit that `fill` puts straight into the I/O buffer (no copy of an
    /// encoding made beforehand).
    pub fn write_with(&self, id: UnitId, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<()> {
        let what = "cannot write an expert to the disk tier";
        let s = self.slot(id, what)?;
        self.write_at(s.offset, s.unit_len, len, fill, id, what)?;
        s.unit_written.store(true, Ordering::Release);
        Ok(())
    }

    /// Read the first `len` bytes of a unit's slot.
    pub fn read(&self, id: UnitId, len: usize) -> Result<Vec<u8>> {
        self.read_with(id, len, |bytes| Ok(bytes.to_vec()))
    }

    /// Read the first `len` bytes of a unit's slot and hand them to `f` where they landed (decode
    /// them there, without a copy first).
    pub fn read_with<T>(&self, id: UnitId, len: usize, f: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
        let what = "cannot read an expert from the disk tier";
        let s = self.slot(id, what)?;
        self.check_written(&s.unit_written, id, what, "it was never written")?;
        self.read_at(s.offset, s.unit_len, len, f, id, what)
    }

    /// Write a unit's deferred gradient (at most the gradient slot's length).
    pub fn write_grad(&self, id: UnitId, bytes: &[u8]) -> Result<()> {
        self.write_grad_with(id, bytes.len(), |buf| buf.copy_from_slice(bytes))
    }

    /// [`DiskTier::write_with`] for a unit's deferred gradient.
    pub fn write_grad_with(&self, id: UnitId, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<()> {
        let what = "cannot write a deferred gradient to the disk tier";
        let s = self.slot(id, what)?;
        self.write_at(s.grad_offset(), s.grad_len, len, fill, id, what)?;
        s.grad_written.store(true, Ordering::Release);
        Ok(())
    }

    /// Read a unit's deferred gradient (`len` bytes).
    pub fn read_grad(&self, id: UnitId, len: usize) -> Result<Vec<u8>> {
        self.read_grad_with(id, len, |bytes| Ok(bytes.to_vec()))
    }

    /// [`DiskTier::read_with`] for a unit's deferred gradient.
    pub fn read_grad_with<T>(&self, id: UnitId, len: usize, f: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
        let what = "cannot read a deferred gradient from the disk tier";
        let s = self.slot(id, what)?;
        self.check_written(&s.grad_written, id, what, "no gradient was written")?;
        self.read_at(s.grad_offset(), s.grad_len, len, f, id, what)
    }

    /// The bytes of the file that `piece` reads, `[start, end)`, padded to [`ALIGN`]: its unit's
    /// slot up to the length it needs, and with its gradient up to the end of that. A unit read
    /// whole with its gradient ends where the next unit's slot starts, so that the next unit's read
    /// can continue it in the same request. `None` for a unit without a slot.
    pub fn span(&self, piece: &ReadPiece) -> Option<(u64, u64)> {
        let s = self.inner.slots.get(&piece.id)?;
        Some(match piece.grad {
            Some(g) => (s.offset, s.grad_offset() + padded(g as u64)),
            None => (s.offset, s.offset + padded(piece.len as u64)),
        })
    }

    /// Read `pieces`, whose [`DiskTier::span`]s follow one another in the file, in one request, and
    /// hand each piece's unit bytes (and gradient bytes, when it reads them) to `f` where they
    /// landed, with the piece's index. Fewer, larger requests reach more of a disk's bandwidth
    /// than one per unit, and a unit read with its deferred gradient costs one request, not two.
    ///
    /// The outer error is the read's, or a piece that cannot be read (naming the slot file and the
    /// expert); the inner ones are `f`'s, one per piece. Like every read it goes through the
    /// fault hook and the retries of transient errors.
    pub fn read_run_with<T>(
        &self,
        pieces: &[ReadPiece],
        mut f: impl FnMut(usize, &[u8], Option<&[u8]>) -> Result<T>,
    ) -> Result<Vec<Result<T>>> {
        let what = "cannot read an expert from the disk tier";
        let Some(first) = pieces.first() else {
            return Ok(Vec::new());
        };
        // Where each piece's unit and gradient bytes start in the request.
        let mut layout = Vec::with_capacity(pieces.len());
        let start = self.slot(first.id, what)?.offset;
        let mut end = start;
        for p in pieces {
            let s = self.slot(p.id, what)?;
            self.check_written(&s.unit_written, p.id, what, "it was never written")?;
            if p.len as u64 > s.unit_len {
                return Err(self.io_error(p.id, what, too_long(p.len, s.unit_len)));
            }
            if let Some(g) = p.grad {
                let what = "cannot read a deferred gradient from the disk tier";
                self.check_written(&s.grad_written, p.id, what, "no gradient was written")?;
                if g as u64 > s.grad_len {
                    return Err(self.io_error(p.id, what, too_long(g, s.grad_len)));
                }
            }
            let (from, to) = self
                .span(p)
                .ok_or_else(|| self.error(p.id, what, "it has no slot in this file"))?;
            if from != end {
                let why = "its slot does not continue the previous unit's (a coalesced read must be contiguous)";
                return Err(self.error(p.id, what, why));
            }
            end = to;
            layout.push(((s.offset - start) as usize, (s.grad_offset() - start) as usize));
        }
        let total = (end - start) as usize;
        // The request covers every piece: its failure names them all, not the first alone.
        let last = pieces[pieces.len() - 1].id;
        let fail = |e: io::Error| match pieces.len() {
            1 => self.io_error(first.id, what, e),
            n => {
                let subject = format!(
                    "experts {}.{} to {}.{} (one read of {n})",
                    first.id.0, first.id.1, last.0, last.1
                );
                self.io_error_of(&subject, what, e)
            }
        };
        let mut split = |buf: &[u8]| -> Vec<Result<T>> {
            pieces
                .iter()
                .zip(&layout)
                .enumerate()
                .map(|(i, (p, &(u, g)))| f(i, &buf[u..u + p.len], p.grad.map(|n| &buf[g..g + n])))
                .collect()
        };
        let file = &self.inner.file;
        match self.inner.mode {
            IoMode::Direct => {
                // The pieces are handed over on the thread's aligned buffer, outside the I/O error
                // mapping.
                let mut result = None;
                with_aligned(total, |buf| {
                    retrying(|| self.pread_all(buf, start, first.id))?;
                    result = Some(split(buf));
                    Ok(())
                })
                .map_err(fail)?;
                result.ok_or_else(|| Error::runtime("a disk read produced nothing"))
            }
            IoMode::Buffered { drop } => {
                let mut buf = vec![0u8; total];
                retrying(|| self.pread_all(&mut buf, start, first.id)).map_err(fail)?;
                if drop {
                    drop_cached_pages(file, start, total as u64);
                }
                Ok(split(&buf))
            }
        }
    }

    fn slot(&self, id: UnitId, what: &str) -> Result<&Slot> {
        self.inner
            .slots
            .get(&id)
            .ok_or_else(|| self.error(id, what, "it has no slot in this file"))
    }

    fn check_written(&self, flag: &AtomicBool, id: UnitId, what: &str, why: &str) -> Result<()> {
        if flag.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self.error(id, what, why))
        }
    }

    fn error(&self, id: UnitId, what: &str, why: &str) -> Error {
        self.io_error(id, what, io::Error::new(io::ErrorKind::NotFound, why.to_string()))
    }

    /// An I/O error naming the operation, the expert and the slot file (and for a full disk, the
    /// directory and what the tier holds there).
    fn io_error(&self, id: UnitId, what: &str, e: io::Error) -> Error {
        self.io_error_of(&format!("expert {}.{}", id.0, id.1), what, e)
    }

    /// [`Self::io_error`] for what `subject` names (an expert, or a run of them).
    fn io_error_of(&self, subject: &str, what: &str, e: io::Error) -> Error {
        let mut context = format!("{what}: {subject}");
        if e.raw_os_error() == Some(libc::ENOSPC) {
            context.push_str(&format!(
                ": the disk tier's directory {} is full (its slot file takes {} bytes, allocated when the \
                 tier opened; the budgets left the rest of the expert state on disk)",
                self.inner.dir.display(),
                self.inner.len
            ));
        }
        Error::io(context, &self.inner.path, e)
    }

    /// Ask the fault hook about a call; a delay is served here. `Some(n)`: read at most `n` bytes.
    fn inject(&self, op: DiskOp, id: UnitId, len: usize) -> io::Result<Option<usize>> {
        let Some((hook, worker)) = &self.faults else {
            return Ok(None);
        };
        match hook.0.before(*worker, op, id, len) {
            None => Ok(None),
            Some(InjectedIo::Fail(e)) => Err(e),
            Some(InjectedIo::Delay(d)) => {
                std::thread::sleep(d);
                Ok(None)
            }
            Some(InjectedIo::Short(n)) => Ok(Some(match self.inner.mode {
                IoMode::Direct => (n / ALIGN * ALIGN).max(ALIGN),
                IoMode::Buffered { .. } => n.max(1),
            })),
        }
    }

    /// Read all of `buf` from `offset`, one `pread` after another until it is full (a short read
    /// is followed by another call for the rest; an end of file is an error).
    fn pread_all(&self, buf: &mut [u8], offset: u64, id: UnitId) -> io::Result<()> {
        let f = &self.inner.file;
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let limit = self
                .inject(DiskOp::Read, id, rest.len())?
                .map_or(rest.len(), |n| n.min(rest.len()));
            match f.read_at(&mut rest[..limit], offset + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the file ended {done} bytes into a read of {}", buf.len()),
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Write all of `buf` at `offset` (as `write_all_at`, each call shown to the fault hook first).
    fn pwrite_all(&self, buf: &[u8], offset: u64, id: UnitId) -> io::Result<()> {
        let f = &self.inner.file;
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            self.inject(DiskOp::Write, id, rest.len())?;
            match f.write_at(rest, offset + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("the disk took no byte {done} bytes into a write of {}", buf.len()),
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(
        &self,
        offset: u64,
        cap: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
        id: UnitId,
        what: &str,
    ) -> Result<()> {
        let fail = |e| self.io_error(id, what, e);
        if len as u64 > cap {
            return Err(fail(too_long(len, cap)));
        }
        let f = &self.inner.file;
        match self.inner.mode {
            IoMode::Direct => with_aligned(padded(len as u64) as usize, |buf| {
                fill(&mut buf[..len]);
                buf[len..].fill(0);
                retrying(|| self.pwrite_all(buf, offset, id))
            })
            .map_err(fail),
            IoMode::Buffered { drop } => {
                let mut buf = vec![0u8; len];
                fill(&mut buf);
                retrying(|| {
                    self.pwrite_all(&buf, offset, id)?;
                    if drop {
                        f.sync_data()?;
                    }
                    Ok(())
                })
                .map_err(fail)?;
                if drop {
                    drop_cached_pages(f, offset, len as u64);
                }
                Ok(())
            }
        }
    }

    fn read_at<T>(
        &self,
        offset: u64,
        cap: u64,
        len: usize,
        use_bytes: impl FnOnce(&[u8]) -> Result<T>,
        id: UnitId,
        what: &str,
    ) -> Result<T> {
        let fail = |e| self.io_error(id, what, e);
        if len as u64 > cap {
            return Err(fail(too_long(len, cap)));
        }
        let f = &self.inner.file;
        match self.inner.mode {
            IoMode::Direct => {
                // The closure runs on the thread's aligned buffer, outside the I/O error mapping.
                let mut result = None;
                with_aligned(padded(len as u64) as usize, |buf| {
                    retrying(|| self.pread_all(buf, offset, id))?;
                    result = Some(use_bytes(&buf[..len]));
                    Ok(())
                })
                .map_err(fail)?;
                result.unwrap_or_else(|| Err(Error::runtime("a disk read produced nothing")))
            }
            IoMode::Buffered { drop } => {
                let mut buf = vec![0u8; len];
                retrying(|| self.pread_all(&mut buf, offset, id)).map_err(fail)?;
                if drop {
                    drop_cached_pages(f, offset, len as u64);
                }
                use_bytes(&buf)
            }
        }
    }

    /// Delete the directory and its file (best effort: it holds nothing that is not also in memory
    /// or in a checkpoint once the store is gone). The parent directory goes too when nothing
    /// else is left in it.
    ///
    /// Only this tier's own file is unlinked, and the directories only when empty: a store
    /// dropped late (its runtime shut down while a new one starts in the same place) must not
    /// delete the new store's file or directory.
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        let ours = self.inner.file.metadata().ok().map(|m| (m.dev(), m.ino()));
        let there = std::fs::symlink_metadata(&self.inner.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == there {
            let _ = std::fs::remove_file(&self.inner.path);
        }
        let _ = std::fs::remove_dir(&self.inner.dir);
        if let Some(parent) = self.inner.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Whether an error may go away when the call is made again (a disk or a controller that
/// recovers, a busy device); a full disk is not.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EAGAIN | libc::EBUSY | libc::ETIMEDOUT)
    )
}

/// Run `op` until it succeeds, it fails with an error that is not [`transient`], or it has failed
/// [`ATTEMPTS`] times (then the error says so); waits 5 ms, then 20 ms, between attempts.
fn retrying(mut op: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut attempt = 1;
    loop {
        match op() {
            Ok(()) => return Ok(()),
            Err(e) if transient(&e) && attempt < ATTEMPTS => {
                std::thread::sleep(Duration::from_millis(5 << (2 * (attempt - 1))));
                attempt += 1;
            }
            Err(e) if attempt > 1 => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{e} (attempt {attempt} of {ATTEMPTS}; the earlier attempts failed too)"),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

fn too_long(len: usize, cap: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{len} bytes do not fit the slot of {cap} bytes"),
    )
}

/// Whether an error means the file system does not do `O_DIRECT` (Linux answers `EINVAL`, at the
/// open or at the first aligned access).
fn refuses_direct(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Check that direct I/O works on `f`: write and read back one aligned block of zeros at the
/// start (the file is new and allocated as zeros).
fn probe_direct(f: &File) -> io::Result<()> {
    with_aligned(ALIGN, |buf| {
        buf.fill(0);
        f.write_all_at(buf, 0)?;
        f.read_exact_at(buf, 0)
    })
}

/// Reserve `len` bytes of disk for `f` (zeros), so that slot writes never allocate; where the
/// file system cannot, the file is only extended.
fn allocate(f: &File, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let n = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "slot file too large"))?;
        // SAFETY: posix_fallocate only uses the descriptor, which `f` keeps open for the call.
        let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, n) };
        if rc == 0 {
            return Ok(());
        }
        if rc != libc::EOPNOTSUPP && rc != libc::EINVAL {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    f.set_len(len)
}

/// The largest staging buffer a thread keeps between calls: the default coalesced request (8 MiB)
/// and a unit of the default models fit. A larger one (a unit of a large model) is freed after its
/// call, so that each I/O thread keeps at most this much outside the budgets.
pub const KEEP_STAGING: usize = 16 << 20;

/// A buffer of `len` bytes aligned to [`ALIGN`] (one per thread, reused across calls up to
/// [`KEEP_STAGING`]), given to `f`.
fn with_aligned<T>(len: usize, f: impl FnOnce(&mut [u8]) -> io::Result<T>) -> io::Result<T> {
    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| {
        let mut raw = cell
            .try_borrow_mut()
            .map_err(|_| io::Error::other("the aligned buffer is in use"))?;
        if raw.len() < len + ALIGN {
            *raw = vec![0u8; len + ALIGN];
        }
        let start = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
        let result = f(&mut raw[start..start + len]);
        if raw.len() > KEEP_STAGING + ALIGN {
            *raw = Vec::new();
        }
        result
    })
}

/// Ask the kernel to drop a range's clean pages from the page cache.
#[cfg(target_os = "linux")]
fn drop_cached_pages(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise only reads the descriptor, which `f` keeps open for the call.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), o, l, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_cached_pages(_: &File, _: u64, _: u64) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("semoe-disk-tier-{name}-{}", std::process::id()))
    }

    /// Bytes that differ at every position (a misplaced or shifted slot shows).
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    fn round_trip(disk: &DiskTier) {
        let ids: Vec<UnitId> = vec![(0, 0), (0, 1), (1, 0), (2, 7)];
        let (u, g) = (10_001, 3_333);
        for (k, &id) in ids.iter().enumerate() {
            disk.write(id, &pattern(u, k as u8)).unwrap();
            disk.write_grad(id, &pattern(g, 100 + k as u8)).unwrap();
        }
        // Rewrite one in the middle with shorter contents: the neighbours are untouched.
        disk.write((0, 1), &pattern(17, 50)).unwrap();
        for (k, &id) in ids.iter().enumerate() {
            let want = if id == (0, 1) {
                pattern(17, 50)
            } else {
                pattern(u, k as u8)
            };
            assert_eq!(disk.read(id, want.len()).unwrap(), want, "{id:?}");
            assert_eq!(disk.read_grad(id, g).unwrap(), pattern(g, 100 + k as u8), "{id:?}");
        }
        // A prefix (a parameters-only load).
        assert_eq!(disk.read((2, 7), 4097).unwrap(), pattern(u, 3)[..4097]);
    }

    fn open(dir: &Path, drop: bool) -> DiskTier {
        DiskTier::open(dir, drop, [(0, 0), (0, 1), (1, 0), (2, 7)], 10_001, 3_333).unwrap()
    }

    #[test]
    fn slots_are_aligned_and_preallocated() {
        let dir = temp("layout");
        let disk = open(&dir, true);
        // 10,001 -> 12,288 and 3,333 -> 4,096 per unit.
        assert_eq!(padded(10_001), 12_288);
        assert_eq!(padded(4096), 4096);
        assert_eq!(padded(0), 0);
        assert_eq!(disk.file_len(), 4 * (12_288 + 4_096));
        assert_eq!(std::fs::metadata(disk.path()).unwrap().len(), disk.file_len());
        assert_eq!(disk.path(), dir.join(FILE_NAME));
        disk.remove();
        assert!(!dir.exists());
    }

    #[test]
    fn odd_sized_units_round_trip_in_every_mode() {
        let dir = temp("direct");
        let disk = open(&dir, true);
        if disk.mode() != IoMode::Direct {
            // Not a failure of the code: the file system here refuses O_DIRECT.
            eprintln!(
                "notice: {} refuses O_DIRECT: the direct mode is not covered by this run",
                dir.display()
            );
        }
        round_trip(&disk);
        disk.remove();
        let dir = temp("buffered");
        let disk = open(&dir, false);
        assert_eq!(disk.mode(), IoMode::Buffered { drop: false });
        round_trip(&disk);
        disk.remove();
        assert!(!dir.exists());
    }

    #[test]
    fn falls_back_to_buffered_io_when_direct_io_is_refused() {
        let dir = temp("refused");
        let refuse = |_: &File| Err(io::Error::from_raw_os_error(libc::EINVAL));
        let disk = DiskTier::open_with(&dir, true, [(0, 0), (0, 1), (1, 0), (2, 7)], 10_001, 3_333, refuse).unwrap();
        assert_eq!(disk.mode(), IoMode::Buffered { drop: true });
        round_trip(&disk);
        disk.remove();
        // Any other failure of the check is an error naming the file.
        let dir = temp("broken");
        let broken = |_: &File| Err(io::Error::from_raw_os_error(libc::EIO));
        let e = DiskTier::open_with(&dir, true, [(0, 0)], 10, 10, broken)
            .unwrap_err()
            .to_string();
        assert!(e.contains(FILE_NAME), "{e}");
        // Nothing is left of the failed start: neither the slot file (a failed allocation keeps
        // blocks) nor the directory made for it.
        assert!(!dir.exists(), "{} is left", dir.display());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_the_file_and_the_expert() {
        let dir = temp("errors");
        let disk = open(&dir, true);
        let e = disk.read((3, 4), 10).unwrap_err().to_string();
        assert!(
            e.contains(FILE_NAME) && e.contains("expert 3.4") && e.contains("no slot"),
            "{e}"
        );
        let e = disk.read((0, 0), 10).unwrap_err().to_string();
        assert!(e.contains(FILE_NAME) && e.contains("never written"), "{e}");
        let e = disk.read_grad((0, 0), 10).unwrap_err().to_string();
        assert!(e.contains("expert 0.0") && e.contains("no gradient"), "{e}");
        let e = disk.write((0, 0), &[0u8; 10_002]).unwrap_err().to_string();
        assert!(e.contains(FILE_NAME) && e.contains("do not fit"), "{e}");
        disk.write((0, 0), &[7u8; 10_001]).unwrap();
        let e = disk.read((0, 0), 10_002).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
        disk.remove();
        // A directory that cannot be created.
        let file = temp("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let e = DiskTier::open(&file.join("sub"), true, [(0, 0)], 10, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain-file"), "{e}");
        let _ = std::fs::remove_file(&file);
    }

    /// A hook that answers the calls from a script, one entry per call, and counts the calls.
    struct Script {
        answers: std::sync::Mutex<std::collections::VecDeque<Option<InjectedIo>>>,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Script {
        fn hook(answers: Vec<Option<InjectedIo>>) -> (Arc<Script>, DiskFaultHook) {
            let script = Arc::new(Script {
                answers: std::sync::Mutex::new(answers.into()),
                calls: Default::default(),
            });
            (script.clone(), DiskFaultHook(script))
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl DiskFaults for Script {
        fn before(&self, worker: usize, _: DiskOp, _: UnitId, _: usize) -> Option<InjectedIo> {
            assert_eq!(worker, 3, "asked as the worker it was given for");
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.answers.lock().unwrap().pop_front().flatten()
        }
    }

    fn eio() -> Option<InjectedIo> {
        Some(InjectedIo::Fail(io::Error::from_raw_os_error(libc::EIO)))
    }

    #[test]
    fn injected_faults_are_retried_cut_short_or_reported() {
        let dir = temp("faults");
        let plain = open(&dir, false);
        let want = pattern(10_001, 9);
        plain.write((0, 0), &want).unwrap();
        let with = |answers| {
            let (script, hook) = Script::hook(answers);
            (script, plain.clone().with_faults(hook, 3))
        };
        // Two failed attempts, then the third reads the slot: the same bytes.
        let (script, disk) = with(vec![eio(), eio()]);
        assert_eq!(disk.read((0, 0), want.len()).unwrap(), want);
        assert_eq!(script.calls(), 3);
        // A third failure in a row is the error, naming the file, the expert and the attempts.
        let (script, disk) = with(vec![eio(), eio(), eio(), None]);
        let e = disk.read((0, 0), want.len()).unwrap_err().to_string();
        assert!(
            e.contains(FILE_NAME)
                && e.contains("expert 0.0")
                && e.contains("os error 5")
                && e.contains("attempt 3 of 3"),
            "{e}"
        );
        assert_eq!(script.calls(), 3);
        // A short read is followed by calls for the rest.
        let (script, disk) = with(vec![Some(InjectedIo::Short(1000)), Some(InjectedIo::Short(10))]);
        assert_eq!(disk.read((0, 0), want.len()).unwrap(), want);
        assert_eq!(script.calls(), 3, "1,000 bytes, then 10, then the rest");
        // A full disk is not retried; the error names the directory.
        let (script, disk) = with(vec![
            Some(InjectedIo::Fail(io::Error::from_raw_os_error(libc::ENOSPC))),
            None,
        ]);
        let e = disk.write((0, 1), &want).unwrap_err().to_string();
        assert!(
            e.contains("is full") && e.contains("os error 28") && e.contains("faults"),
            "{e}"
        );
        assert_eq!(script.calls(), 1);
        // A transient write error is retried, and the write lands.
        let (script, disk) = with(vec![eio(), Some(InjectedIo::Delay(Duration::from_millis(1)))]);
        disk.write((0, 1), &want).unwrap();
        assert_eq!(script.calls(), 2);
        assert_eq!(plain.read((0, 1), want.len()).unwrap(), want);
        plain.remove();
    }

    #[test]
    fn a_coalesced_read_returns_the_bytes_of_separate_reads() {
        for drop in [true, false] {
            let dir = temp(&format!("run-{drop}"));
            let ids: Vec<UnitId> = (0..4).map(|e| (1, e)).collect();
            let disk = DiskTier::open(&dir, drop, ids.clone(), 10_001, 3_333).unwrap();
            for (k, &id) in ids.iter().enumerate() {
                disk.write(id, &pattern(10_001, k as u8)).unwrap();
                disk.write_grad(id, &pattern(3_333, 200 + k as u8)).unwrap();
            }
            // Whole units with their gradients, then a last one read in part: contiguous spans.
            let pieces: Vec<ReadPiece> = ids
                .iter()
                .enumerate()
                .map(|(k, &id)| ReadPiece {
                    id,
                    len: if k == 3 { 4_097 } else { 10_001 },
                    grad: (k < 3).then_some(3_333),
                })
                .collect();
            let got = disk
                .read_run_with(&pieces, |i, unit, grad| {
                    Ok((i, unit.to_vec(), grad.map(<[u8]>::to_vec)))
                })
                .unwrap();
            assert_eq!(got.len(), 4);
            for (k, r) in got.into_iter().enumerate() {
                let (i, unit, grad) = r.unwrap();
                assert_eq!(i, k);
                assert_eq!(unit, disk.read(ids[k], pieces[k].len).unwrap(), "unit {k}, drop {drop}");
                assert_eq!(unit, pattern(10_001, k as u8)[..pieces[k].len]);
                match grad {
                    Some(g) => assert_eq!(g, disk.read_grad(ids[k], 3_333).unwrap()),
                    None => assert_eq!(k, 3),
                }
            }
            // A piece's own error stays its own.
            let got = disk
                .read_run_with(
                    &pieces[..2],
                    |i, _, _| if i == 1 { Err(Error::runtime("bad")) } else { Ok(i) },
                )
                .unwrap();
            assert!(got[0].is_ok() && got[1].is_err());
            // Pieces that do not follow one another are refused, naming the expert and the file.
            let gap = [pieces[0], pieces[2]];
            let e = disk.read_run_with(&gap, |_, _, _| Ok(())).unwrap_err().to_string();
            assert!(
                e.contains("expert 1.2") && e.contains(FILE_NAME) && e.contains("contiguous"),
                "{e}"
            );
            // A unit read without its gradient stops short of the next slot.
            let short = [
                ReadPiece {
                    grad: None,
                    ..pieces[0]
                },
                pieces[1],
            ];
            assert!(disk.read_run_with(&short, |_, _, _| Ok(())).is_err());
            disk.remove();
        }
    }

    #[test]
    fn a_tier_removed_late_leaves_the_newer_tier_in_its_place_alone() {
        let dir = temp("late").join("worker-0");
        let old = open(&dir, true);
        old.write((0, 0), &pattern(10_001, 1)).unwrap();
        // A new store opens in the same place before the old one is removed.
        let new = open(&dir, true);
        new.write((0, 0), &pattern(10_001, 2)).unwrap();
        old.remove();
        assert!(new.path().exists(), "the newer tier's file was removed");
        assert_eq!(new.read((0, 0), 10_001).unwrap(), pattern(10_001, 2));
        new.remove();
        assert!(
            !dir.exists() && !temp("late").exists(),
            "the directories are left behind"
        );
    }

    #[test]
    fn a_failed_read_names_the_file_and_the_expert() {
        let dir = temp("truncated");
        let disk = open(&dir, true);
        disk.write((0, 0), &pattern(10_001, 1)).unwrap();
        disk.write_grad((0, 0), &pattern(3_333, 3)).unwrap();
        disk.write((0, 1), &pattern(10_001, 2)).unwrap();
        // The file cut short under the tier (a disk that lost its data): the read fails with the
        // file's name rather than returning short or stale bytes.
        std::fs::OpenOptions::new()
            .write(true)
            .open(disk.path())
            .unwrap()
            .set_len(4096)
            .unwrap();
        let pieces = [ReadPiece {
            id: (0, 1),
            len: 10_001,
            grad: None,
        }];
        let e = disk.read_run_with(&pieces, |_, _, _| Ok(())).unwrap_err().to_string();
        assert!(e.contains(FILE_NAME) && e.contains("expert 0.1"), "{e}");
        // A read of several units names them all.
        let both = [
            ReadPiece {
                id: (0, 0),
                len: 10_001,
                grad: Some(3_333),
            },
            pieces[0],
        ];
        let e = disk.read_run_with(&both, |_, _, _| Ok(())).unwrap_err().to_string();
        assert!(
            e.contains(FILE_NAME) && e.contains("experts 0.0 to 0.1 (one read of 2)"),
            "{e}"
        );
        disk.remove();
    }

    #[test]
    fn threads_share_the_file() {
        let dir = temp("threads");
        let ids: Vec<UnitId> = (0..4).flat_map(|b| (0..8).map(move |e| (b, e))).collect();
        let disk = DiskTier::open(&dir, true, ids.clone(), 20_000, 5_000).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let (disk, ids) = (disk.clone(), &ids);
                s.spawn(move || {
                    for round in 0..5u8 {
                        for (k, &id) in ids.iter().enumerate().filter(|(k, _)| k % 4 == t as usize) {
                            let seed = (k as u8).wrapping_add(round);
                            disk.write(id, &pattern(20_000, seed)).unwrap();
                            disk.write_grad(id, &pattern(5_000, seed ^ 0x55)).unwrap();
                            assert_eq!(disk.read(id, 20_000).unwrap(), pattern(20_000, seed));
                            assert_eq!(disk.read_grad(id, 5_000).unwrap(), pattern(5_000, seed ^ 0x55));
                        }
                    }
                });
            }
        });
        disk.remove();
        assert!(!dir.exists());
    }
}
