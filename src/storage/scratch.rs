//! Scratch directories of one process (a bench's run directories, a worker process's Disk tier):
//! each holds a lock on its [`OWNER_FILE`] while its process lives, so that what a process killed
//! by a signal left (its drop never ran) is found and removed by the next process of its kind.
//!
//! A lock, not a pid: the kernel drops it when the process ends however it ends, and it works
//! between containers that share the folder but not the pid numbers.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// The file in a scratch directory whose lock says its process is alive.
pub const OWNER_FILE: &str = ".semoe-owner";

/// Create `dir` (and its parents) and lock its [`OWNER_FILE`]; the lock lasts as long as the
/// returned file is open.
pub fn claim(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create the scratch directory", dir, e))?;
    let path = dir.join(OWNER_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("cannot open the scratch directory's owner file", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::config(format!(
            "the scratch directory {} is in use by another process",
            dir.display()
        ))),
        Err(TryLockError::Error(e)) => Err(Error::io("cannot lock the scratch directory", &path, e)),
    }
}

/// Remove the directories in `parent` named `prefix...` whose owner is gone (their
/// [`OWNER_FILE`] exists and its lock is free); the paths removed. A directory without the
/// file is left alone: its process may be about to lock it.
pub fn remove_abandoned(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(prefix) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = File::open(dir.join(OWNER_FILE)) else {
            continue;
        };
        // Removed while holding the lock, so no process can claim it in between.
        if owner.try_lock().is_ok() && std::fs::remove_dir_all(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_gone_process_left_is_removed_and_a_live_ones_is_not() {
        let parent = std::env::temp_dir().join(format!("semoe-scratch-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let live = parent.join("kind-1");
        let held = claim(&live).unwrap();
        assert!(claim(&live).is_err(), "a directory in use is claimed twice");
        // One whose process ended: its lock went with it.
        let gone = parent.join("kind-2");
        drop(claim(&gone).unwrap());
        std::fs::write(gone.join("slots"), b"x").unwrap();
        // One without an owner file (a process about to lock it), and another kind's.
        let unowned = parent.join("kind-3");
        std::fs::create_dir_all(&unowned).unwrap();
        let other = parent.join("other-4");
        drop(claim(&other).unwrap());
        assert_eq!(remove_abandoned(&parent, "kind-"), vec![gone.clone()]);
        assert!(!gone.exists() && live.exists() && unowned.exists() && other.exists());
        drop(held);
        assert_eq!(remove_abandoned(&parent, "kind-"), vec![live.clone()]);
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
