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

/// A scratch directory of this process: created (mode 0700) under `parent` with a name that no
/// other process can have chosen, `{prefix}{pid}-{random}`, and claimed; the claim lasts as long
/// as the returned file is open.
///
/// The directory is made and locked under a hidden name first, then renamed into place, so that
/// [`remove_abandoned`] of another process never sees it unlocked; a name made fresh (never
/// reused, as a pid is across containers) is never another's, whoever can write `parent`.
pub fn claim(parent: &Path, prefix: &str) -> Result<(PathBuf, File)> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::create_dir_all(parent)
        .map_err(|e| Error::io("cannot create the scratch directory's parent", parent, e))?;
    let name = format!("{prefix}{}-{:016x}", std::process::id(), rand::random::<u64>());
    let staging = parent.join(format!(".{name}.claiming"));
    let dir = parent.join(&name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| Error::io("cannot create the scratch directory", &staging, e))?;
    let claimed = (|| {
        let path = staging.join(OWNER_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io("cannot create the scratch directory's owner file", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::runtime(format!(
                    "{} was locked by another process",
                    path.display()
                )))
            }
            Err(TryLockError::Error(e)) => return Err(Error::io("cannot lock the scratch directory", &path, e)),
        }
        std::fs::rename(&staging, &dir)
            .map_err(|e| Error::io("cannot move the scratch directory into place", &dir, e))?;
        Ok(file)
    })();
    match claimed {
        Ok(file) => Ok((dir, file)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// Remove the directories in `parent` named `prefix...` whose owner is gone (their
/// [`OWNER_FILE`] exists and its lock is free); the paths removed. A directory without the
/// file is left alone (not one of ours).
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
        // Opened for writing: an exclusive lock over NFS (fcntl underneath) needs it.
        let Ok(owner) = OpenOptions::new().read(true).write(true).open(dir.join(OWNER_FILE)) else {
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
        use std::os::unix::fs::PermissionsExt;
        let parent = std::env::temp_dir().join(format!("semoe-scratch-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let (live, held) = claim(&parent, "kind-").unwrap();
        assert!(live
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("kind-{}-", std::process::id())));
        let mode = std::fs::metadata(&live).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        // One whose process ended: its lock went with it.
        let (gone, lock) = claim(&parent, "kind-").unwrap();
        assert_ne!(gone, live, "two claims, two names");
        drop(lock);
        std::fs::write(gone.join("slots"), b"x").unwrap();
        // One without an owner file (not ours), and another kind's.
        let unowned = parent.join("kind-3");
        std::fs::create_dir_all(&unowned).unwrap();
        let (other, other_lock) = claim(&parent, "other-").unwrap();
        drop(other_lock);
        assert_eq!(remove_abandoned(&parent, "kind-"), vec![gone.clone()]);
        assert!(!gone.exists() && live.exists() && unowned.exists() && other.exists());
        drop(held);
        assert_eq!(remove_abandoned(&parent, "kind-"), vec![live.clone()]);
        let left: Vec<_> = std::fs::read_dir(&parent)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "no staging name left: {left:?}");
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
