//! The Disk tier: one file per expert unit under a directory of the run.
//!
//! The files are working storage, not checkpoints (checkpoints are written atomically elsewhere;
//! the tier is rebuilt from the last checkpoint on restart). With `drop_page_cache` every write is
//! flushed and every file's pages are dropped from the page cache after a read or write
//! (`posix_fadvise(DONTNEED)`), so reads really reach the disk and the page cache does not act as
//! a hidden, unbudgeted extra tier.

use super::unit::UnitId;
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The Disk tier's directory and settings.
#[derive(Clone, Debug)]
pub struct DiskTier {
    dir: PathBuf,
    drop_page_cache: bool,
}

impl DiskTier {
    /// Create (or reuse) `dir`.
    pub fn open(dir: &Path, drop_page_cache: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create the disk tier's directory", dir, e))?;
        Ok(DiskTier {
            dir: dir.to_path_buf(),
            drop_page_cache,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of one unit.
    pub fn path(&self, id: UnitId) -> PathBuf {
        self.dir.join(format!("expert-{}-{}.bin", id.0, id.1))
    }

    /// The file of a unit's deferred gradient.
    pub fn grad_path(&self, id: UnitId) -> PathBuf {
        self.dir.join(format!("expert-{}-{}.grad", id.0, id.1))
    }

    /// Write a unit's bytes (replacing the file's contents).
    pub fn write(&self, id: UnitId, bytes: &[u8]) -> Result<()> {
        self.write_file(&self.path(id), bytes)
    }

    /// Read a unit's bytes (`len` of them).
    pub fn read(&self, id: UnitId, len: usize) -> Result<Vec<u8>> {
        self.read_file(&self.path(id), len)
    }

    /// Write a unit's deferred gradient.
    pub fn write_grad(&self, id: UnitId, bytes: &[u8]) -> Result<()> {
        self.write_file(&self.grad_path(id), bytes)
    }

    /// Read a unit's deferred gradient (`len` bytes).
    pub fn read_grad(&self, id: UnitId, len: usize) -> Result<Vec<u8>> {
        self.read_file(&self.grad_path(id), len)
    }

    fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let fail = |e| Error::io("cannot write an expert to the disk tier", path, e);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(fail)?;
        f.write_all(bytes).map_err(fail)?;
        if self.drop_page_cache {
            f.sync_data().map_err(fail)?;
            drop_cached_pages(&f);
        }
        Ok(())
    }

    fn read_file(&self, path: &Path, len: usize) -> Result<Vec<u8>> {
        let fail = |e| Error::io("cannot read an expert from the disk tier", path, e);
        let mut f = File::open(path).map_err(fail)?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).map_err(fail)?;
        if self.drop_page_cache {
            drop_cached_pages(&f);
        }
        Ok(buf)
    }

    /// Delete the directory and its files (best effort: it holds nothing that is not also in memory
    /// or in a checkpoint once the store is gone).
    /// The parent directory goes too when nothing else is left in it.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Ask the kernel to drop a file's clean pages from the page cache.
#[cfg(target_os = "linux")]
fn drop_cached_pages(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads the descriptor, which `f` keeps open for the call.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_cached_pages(_: &File) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_back_and_names_missing_files() {
        let dir = std::env::temp_dir().join(format!("semoe-disk-tier-{}", std::process::id()));
        let disk = DiskTier::open(&dir, true).unwrap();
        disk.write((1, 2), b"hello tier").unwrap();
        assert_eq!(disk.read((1, 2), 10).unwrap(), b"hello tier");
        let e = disk.read((3, 4), 10).unwrap_err().to_string();
        assert!(e.contains("expert-3-4.bin"), "{e}");
        disk.remove();
        assert!(!dir.exists());
    }
}
