//! The disk's own bandwidth (direct I/O where the file system allows), and the disk tier's.

use crate::error::Result;
use serde::Serialize;
use std::time::Instant;

/// The disk's own bandwidth, measured the way `dd` or `fio` would (one file, large sequential
/// requests, `O_DIRECT` from aligned buffers), and once more with the Disk tier's own requests.
#[derive(Clone, Debug, Serialize)]
pub struct DiskBandwidth {
    /// What was measured, in words.
    pub method: String,
    /// Bytes written, then read.
    pub bytes: u64,
    /// Bytes per request of the sequential figures.
    pub request: u64,
    /// Whether the file system took `O_DIRECT` (else buffered, flushed, page cache dropped).
    pub direct: bool,
    /// Sequential read, bytes per second.
    pub read_bytes_per_s: f64,
    /// Sequential write, bytes per second.
    pub write_bytes_per_s: f64,
    /// Threads of the figures at depth (0: not measured): each issues every `threads`-th request
    /// of the same file, so that this many requests are in flight (what `fio --numjobs` does). A
    /// fast disk (NVMe, or a memory-backed one) reaches its bandwidth only with several requests
    /// in flight; the Disk tier's I/O threads issue that many.
    pub parallel_threads: usize,
    /// Read at depth, bytes per second.
    pub parallel_read_bytes_per_s: f64,
    /// Written at depth, bytes per second.
    pub parallel_write_bytes_per_s: f64,
    /// Bytes per request of the tier-shaped figures (one unit); 0 when not measured.
    pub tier_request: u64,
    /// Threads issuing them at once (the tier's I/O threads).
    pub tier_threads: usize,
    /// Read through a [`DiskTier`](crate::storage::tiers::disk::DiskTier) slot file, whole units,
    /// bytes per second.
    pub tier_read_bytes_per_s: f64,
    /// Written through a slot file, whole units, bytes per second.
    pub tier_write_bytes_per_s: f64,
}

/// The kind of memory-backed file system `dir` is on (`tmpfs`, `ramfs`), if it is one: its
/// "disk" figures would be the memory's. `None` also when it cannot be told (the path does not
/// exist yet is checked at its nearest existing ancestor).
pub fn memory_filesystem(dir: &std::path::Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // A relative path's last ancestor is "": the working directory.
    let existing = dir
        .ancestors()
        .map(|p| {
            if p.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                p
            }
        })
        .find(|p| p.exists())?;
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `path` is a NUL-terminated string and `stat` a buffer of the size statfs writes.
    if unsafe { libc::statfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // `f_type`'s width differs between targets (i64 here, i32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    // SAFETY: statfs returned 0, so it filled `stat`.
    let kind = unsafe { stat.assume_init() }.f_type as i64;
    match kind {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

/// Where a bench puts what stands for the disk when no `--dir` is given: the system's temporary
/// directory, unless it is memory-backed (tmpfs, as on many distributions), then `/var/tmp`, then
/// the working directory.
pub fn default_disk_dir() -> std::path::PathBuf {
    let candidates = [
        std::env::temp_dir(),
        std::path::PathBuf::from("/var/tmp"),
        std::path::PathBuf::from("."),
    ];
    candidates
        .iter()
        .find(|d| d.is_dir() && memory_filesystem(d).is_none())
        .cloned()
        .unwrap_or_else(std::env::temp_dir)
}

/// Write `bytes` to a new file under `dir` sequentially in `request`-byte pieces, then read it
/// back, with `O_DIRECT` (what `dd oflag=direct` / `iflag=direct` measure); where the file system
/// refuses `O_DIRECT`, buffered with `fdatasync` and the page cache dropped before reading.
pub fn disk_bandwidth(dir: &std::path::Path, bytes: u64, request: u64) -> Result<DiskBandwidth> {
    use crate::error::Error;
    use crate::storage::tiers::disk::{padded, ALIGN};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create the benchmark's directory", dir, e))?;
    let path = dir.join("bandwidth");
    let request = padded(request.max(1)) as usize;
    let n = bytes.div_ceil(request as u64).max(1);
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true).create(true).truncate(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(&path)
    };
    let fail = |e| Error::io("cannot measure the disk's bandwidth", &path, e);
    let mut raw = vec![0x5au8; request + ALIGN];
    let start = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
    let buf = &mut raw[start..start + request];
    let (mut file, mut direct) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(false).map_err(fail)?, false),
        Err(e) => return Err(fail(e)),
    };
    let write_all = |file: &std::fs::File, buf: &[u8]| -> std::io::Result<f64> {
        let started = Instant::now();
        for i in 0..n {
            file.write_all_at(buf, i * request as u64)?;
        }
        Ok(started.elapsed().as_secs_f64())
    };
    let written = match write_all(&file, buf) {
        Ok(s) => s,
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            (file, direct) = (open(false).map_err(fail)?, false);
            write_all(&file, buf).map_err(fail)?
        }
        Err(e) => return Err(fail(e)),
    };
    let written = if direct {
        written
    } else {
        let started = Instant::now();
        file.sync_data().map_err(fail)?;
        drop_cached(&file);
        written + started.elapsed().as_secs_f64()
    };
    let started = Instant::now();
    for i in 0..n {
        file.read_exact_at(buf, i * request as u64).map_err(fail)?;
    }
    let read = started.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    let total = n * request as u64;
    Ok(DiskBandwidth {
        method: format!(
            "{} sequential in {} requests, 1 thread, {}, new file in {}{}",
            crate::storage::tiers::format_bytes(total),
            crate::storage::tiers::format_bytes(request as u64),
            if direct {
                "O_DIRECT"
            } else {
                "buffered (O_DIRECT refused), fdatasync, page cache dropped"
            },
            dir.display(),
            match memory_filesystem(dir) {
                Some(kind) => format!(" (a {kind}: memory, not a disk)"),
                None => String::new(),
            }
        ),
        bytes: total,
        request: request as u64,
        direct,
        read_bytes_per_s: total as f64 / read,
        write_bytes_per_s: total as f64 / written,
        parallel_threads: 0,
        parallel_read_bytes_per_s: 0.0,
        parallel_write_bytes_per_s: 0.0,
        tier_request: 0,
        tier_threads: 0,
        tier_read_bytes_per_s: 0.0,
        tier_write_bytes_per_s: 0.0,
    })
}

impl DiskBandwidth {
    /// The disk's read bandwidth: the better of one request at a time and several in flight.
    pub fn best_read(&self) -> f64 {
        self.read_bytes_per_s.max(self.parallel_read_bytes_per_s)
    }

    /// The disk's write bandwidth: the better of one request at a time and several in flight.
    pub fn best_write(&self) -> f64 {
        self.write_bytes_per_s.max(self.parallel_write_bytes_per_s)
    }
}

/// The disk's bandwidth with `threads` requests in flight: `threads` threads write `bytes` to a
/// new file in `request`-byte pieces (each thread every `threads`-th piece), `O_DIRECT`, then read
/// it back the same way. Returns (read, write) bytes per second, or `None` where the file system
/// refuses `O_DIRECT` (buffered figures at depth would measure the page cache).
pub fn parallel_bandwidth(
    dir: &std::path::Path,
    bytes: u64,
    request: u64,
    threads: usize,
) -> Result<Option<(f64, f64)>> {
    use crate::error::Error;
    use crate::storage::tiers::disk::{padded, ALIGN};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create the benchmark's directory", dir, e))?;
    let path = dir.join("bandwidth-parallel");
    let request = padded(request.max(1)) as usize;
    let threads = threads.max(1);
    let n = bytes.div_ceil(request as u64).max(threads as u64);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => return Err(Error::io("cannot measure the disk's bandwidth", &path, e)),
    };
    let run = |write: bool| -> std::io::Result<f64> {
        let started = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let file = &file;
                    s.spawn(move || -> std::io::Result<()> {
                        let mut raw = vec![0x5au8; request + ALIGN];
                        let start = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
                        let buf = &mut raw[start..start + request];
                        for i in (t as u64..n).step_by(threads) {
                            if write {
                                file.write_all_at(buf, i * request as u64)?;
                            } else {
                                file.read_exact_at(buf, i * request as u64)?;
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a disk benchmark thread panicked")))
            })
        })?;
        Ok(started.elapsed().as_secs_f64())
    };
    let result = match run(true) {
        Ok(w) => run(false).map(|r| Some((r, w))),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    };
    drop(file);
    let _ = std::fs::remove_file(&path);
    let total = (n * request as u64) as f64;
    Ok(result
        .map_err(|e| Error::io("cannot measure the disk's bandwidth", &path, e))?
        .map(|(r, w)| (total / r, total / w)))
}

/// The Disk tier's own path without training: `threads` threads write `bytes` as whole units of
/// `unit` bytes into a slot file (each thread every `threads`-th unit), then read them back.
/// Returns (read, write) bytes per second.
pub fn tier_bandwidth(dir: &std::path::Path, bytes: u64, unit: u64, threads: usize) -> Result<(f64, f64)> {
    use crate::storage::tiers::disk::DiskTier;
    let unit = unit.max(1);
    let threads = threads.max(1);
    let n = bytes.div_ceil(unit).max(threads as u64) as usize;
    let disk = DiskTier::open(&dir.join("tier-bandwidth"), true, (0..n).map(|i| (0, i)), unit, 0)?;
    let data = vec![0xa5u8; unit as usize];
    let run = |write: bool| -> Result<f64> {
        let started = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (disk, data) = (&disk, &data);
                    s.spawn(move || -> Result<()> {
                        for i in (t..n).step_by(threads) {
                            if write {
                                disk.write((0, i), data)?;
                            } else {
                                disk.read_with((0, i), data.len(), |b| Ok(std::hint::black_box(b.len())))?;
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(crate::error::Error::runtime("a disk benchmark thread panicked")))
            })
        })?;
        Ok(started.elapsed().as_secs_f64())
    };
    let result = run(true).and_then(|w| Ok((run(false)?, w)));
    disk.remove();
    let (r, w) = result?;
    let total = (n as u64 * unit) as f64;
    Ok((total / r, total / w))
}

#[cfg(target_os = "linux")]
fn drop_cached(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads the descriptor, which `f` keeps open for the call.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_cached(_: &std::fs::File) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every mount point `/proc/mounts` lists as tmpfs is told memory, and the root (when it is
    /// not tmpfs itself) is not; a path not made yet is judged by where it would be made.
    #[test]
    fn memory_file_systems_are_told_from_disks() {
        let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
            eprintln!("skipped: no /proc/mounts to check against");
            return;
        };
        let kinds: Vec<(&str, &str)> = mounts
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.nth(1)?, f.next()?))
            })
            .collect();
        // A later mount over the same point hides an earlier one: judge by the last.
        let kind_of = |point: &str| kinds.iter().rev().find(|(p, _)| *p == point).map(|(_, k)| *k);
        let mut checked = 0;
        for (point, _) in &kinds {
            let path = std::path::Path::new(point);
            if kind_of(point) == Some("tmpfs") && path.is_dir() {
                assert_eq!(memory_filesystem(path), Some("tmpfs"), "{point}");
                assert_eq!(memory_filesystem(&path.join("not/made/yet")), Some("tmpfs"), "{point}");
                checked += 1;
            }
        }
        // A root on a disk (not tmpfs, ramfs, or an initramfs's rootfs, which is either).
        if kind_of("/").is_some_and(|k| !["tmpfs", "ramfs", "rootfs"].contains(&k)) {
            assert_eq!(memory_filesystem(std::path::Path::new("/")), None);
            checked += 1;
        }
        assert!(checked > 0, "nothing to check in {mounts}");
        // The default directory is on a disk wherever one of its candidates is.
        let candidates = [std::env::temp_dir(), "/var/tmp".into(), ".".into()];
        if candidates.iter().any(|d| d.is_dir() && memory_filesystem(d).is_none()) {
            assert!(memory_filesystem(&default_disk_dir()).is_none());
        }
    }
}
