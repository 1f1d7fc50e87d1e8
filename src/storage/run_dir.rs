//! Run directories: one process at a time, names that never collide.
//!
//! A run directory holds a run's config, metrics log, checkpoints, report and the Disk tier's
//! scratch files. Two processes writing one would interleave their metrics and overwrite each
//! other's checkpoints, so every process that writes a run directory first takes [`RunDirLock`]:
//! an exclusive advisory lock (`flock`) on `<run_dir>/.lock`, released when the lock is dropped or
//! the process dies (the kernel releases it even after `SIGKILL`, so a crashed run never leaves a
//! stale lock behind). The lock file holds the holder's process id, for the error message.
//!
//! Default run directories are named after the start time in UTC, readable and sortable
//! (`runs/run-20261204-201804`); [`create_unique`] creates the directory atomically and adds `-2`,
//! `-3`, ... when another run started in the same second.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// The directory under a run directory that holds the Disk tier's slot files: scratch state that a
/// checkpoint makes redundant, removed when the run ends.
pub const TIERS_DIR: &str = "tiers";

/// An exclusive lock on a run directory, held for as long as this value lives.
#[derive(Debug)]
pub struct RunDirLock {
    file: File,
    dir: PathBuf,
}

impl RunDirLock {
    /// Lock `dir` (which must exist), or fail naming the process that holds it (after a fifth of
    /// a second: a reader's probe, [`is_locked`], holds it for an instant).
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("cannot open the run directory's lock file", &path, e))?;
        // A reader probing the lock ([`is_locked`]: `semoe runs`) holds it for an instant: try a
        // few times before naming a holder.
        let mut tries = 0;
        let locked = loop {
            match file.try_lock() {
                Err(TryLockError::WouldBlock) if tries < PROBE_RETRIES => {
                    tries += 1;
                    std::thread::sleep(PROBE_RETRY_WAIT);
                }
                other => break other,
            }
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("another semoe process (pid {pid})"),
                };
                return Err(Error::config(format!(
                    "the run directory {} is in use by {holder}; wait for it to finish, stop it, or choose another --run-dir",
                    dir.display()
                )));
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::io("cannot lock the run directory", &path, e));
            }
        }
        // Record who holds it (best effort: the lock itself is what protects the directory).
        let pid = std::process::id().to_string();
        let _ = file
            .set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()));
        Ok(RunDirLock {
            file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Check that the locked directory is still where the run writes: a directory removed (or
    /// moved away and replaced) during a run would take every later line of the metrics log with
    /// it, and its checkpoints would land in a new directory without the run's config.
    pub fn still_in_place(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(LOCK_FILE);
        let held = self
            .file
            .metadata()
            .map_err(|e| Error::io("cannot read the lock file", &path, e))?;
        // Removed: the held file has no name left, or the path is gone. Replaced: another file at
        // the path. Device numbers are compared first, as some file systems (an old overlayfs)
        // report another device for the same file through a path than through a descriptor.
        let in_place = held.nlink() > 0
            && std::fs::metadata(&path).is_ok_and(|now| now.dev() != held.dev() || now.ino() == held.ino());
        if in_place {
            Ok(())
        } else {
            Err(Error::config(format!(
                "the run directory {} was removed or replaced while the run was writing it (its lock file is \
                 gone); the run stops here, as what it would write next has no run directory to go to",
                self.dir.display()
            )))
        }
    }
}

impl Drop for RunDirLock {
    fn drop(&mut self) {
        // Empty the pid before unlocking, so a later reader never names a finished process.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// How often, and how far apart, [`RunDirLock::acquire`] tries again a lock held for an instant.
const PROBE_RETRIES: u32 = 10;
const PROBE_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether a process holds the lock of `dir` now (without creating a lock file where none is,
/// and read-only: a run directory one may only read is probed too). A shared lock probes it:
/// it conflicts only with the holder's exclusive one.
pub fn is_locked(dir: &Path) -> bool {
    let Ok(file) = OpenOptions::new().read(true).open(dir.join(LOCK_FILE)) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(_)) => false,
    }
}

/// The default name of a run started at `time`: `run-YYYYMMDD-HHMMSS` (UTC).
pub fn default_name(time: std::time::SystemTime) -> String {
    // RFC 3339 in UTC, e.g. 2026-12-04T20:18:04Z: keep the digits, in order.
    let stamp = humantime::format_rfc3339_seconds(time).to_string();
    let digits: String = stamp.chars().filter(char::is_ascii_digit).collect();
    match (digits.get(..8), digits.get(8..14)) {
        (Some(date), Some(time)) => format!("run-{date}-{time}"),
        _ => format!("run-{digits}"),
    }
}

/// Create a new directory `parent/<name>`, or `parent/<name>-2`, `-3`, ... if that exists
/// (another run started in the same second). Creation is atomic, so two processes never get the
/// same directory.
pub fn create_unique(parent: &Path, name: &str) -> Result<PathBuf> {
    let made = crate::storage::checkpoint::create_dirs(parent)
        .map_err(|e| Error::io("cannot create the runs directory", parent, e))?;
    // Best effort, as for the run directory's own entry below.
    let _ = crate::storage::checkpoint::sync_parents(&made);
    for n in 1..=1000u32 {
        let dir = if n == 1 {
            parent.join(name)
        } else {
            parent.join(format!("{name}-{n}"))
        };
        match std::fs::create_dir(&dir) {
            // Its entry durable: the checkpoints saved in it (each synced) must not vanish with
            // it in a power loss (best effort, as for a run directory given by name).
            Ok(()) => {
                let _ = crate::storage::checkpoint::sync_dir(parent);
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("cannot create the run directory", &dir, e)),
        }
    }
    Err(Error::config(format!(
        "{} already holds 1000 runs named {name}; choose a --run-dir",
        parent.display()
    )))
}

/// Whether `dir` holds nothing a user would miss: only the lock file, an empty metrics log, the
/// config, scratch tier files and a join ticket (what a start that failed before its first step
/// leaves).
pub fn holds_no_results(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().all(|entry| {
        let name = entry.file_name();
        match name.to_str() {
            // A ticket of a start that failed admits to a coordinator that is gone.
            Some(LOCK_FILE) | Some("config.toml") | Some("join.ticket") => true,
            // Only if it holds nothing but tier folders: a user's own `tiers` is not scratch.
            Some(TIERS_DIR) => tier_scratch(&entry.path()).is_some(),
            Some("metrics.jsonl") => entry.metadata().map(|m| m.len() == 0).unwrap_or(false),
            _ => false,
        }
    })
}

/// The entries of a run's `tiers` folder, when it holds only what the storage tiers write there
/// (`worker-N` and `process-N` folders); `None` when it holds anything else (then it is not ours
/// to remove) or does not read.
pub fn tier_scratch(tiers: &Path) -> Option<Vec<std::path::PathBuf>> {
    let ours = |name: &str| {
        ["worker-", "process-"].iter().any(|prefix| {
            name.strip_prefix(prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(tiers).ok()? {
        let entry = entry.ok()?;
        let is_dir = entry.file_type().ok()?.is_dir();
        if !is_dir || !entry.file_name().to_str().is_some_and(ours) {
            return None;
        }
        paths.push(entry.path());
    }
    Some(paths)
}

/// Remove the Disk tier's folders under `run_dir` (scratch state: the checkpoints hold the run),
/// and `tiers` itself once empty. A `tiers` folder holding anything else is left alone.
pub fn remove_tier_scratch(run_dir: &Path) {
    let tiers = run_dir.join(TIERS_DIR);
    let Some(paths) = tier_scratch(&tiers) else {
        return;
    };
    for path in paths {
        let _ = std::fs::remove_dir_all(path);
    }
    let _ = std::fs::remove_dir(&tiers);
}

/// Create the run directory `dir` (and its parents); whether this call made `dir` itself (false:
/// it was there, the user's or a process's that raced this one).
pub fn create_dir(dir: &Path) -> Result<bool> {
    let cannot = |e| Error::io("cannot create the run directory", dir, e);
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let made = crate::storage::checkpoint::create_dirs(parent).map_err(cannot)?;
        // The parents' entries durable (best effort, as the caller syncs the run directory's).
        let _ = crate::storage::checkpoint::sync_parents(&made);
    }
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) => Err(cannot(e)),
    }
}

/// Remove the run directory `dir` that a failed start made, when it holds nothing of value
/// ([`holds_no_results`]) and no other process holds its lock (one that took it since is using
/// it); removed under the lock, so no start can take it in between.
pub fn remove_failed_start(dir: &Path) {
    let Ok(lock) = RunDirLock::acquire(dir) else {
        return;
    };
    if holds_no_results(dir) {
        let _ = std::fs::remove_dir_all(dir);
    }
    drop(lock);
}

/// What a run writes into its run directory besides its lock: a directory that semoe locked
/// (its `.lock` is there) and that holds only these is a run that stopped before its first
/// checkpoint, which a fresh start begins again (a restarted coordinator pod does exactly that).
pub const RUN_FILES: &[&str] = &[
    "config.toml",
    "metrics.jsonl",
    "join.ticket",
    "job.identity",
    TIERS_DIR,
    crate::storage::checkpoint::CHECKPOINTS_DIR,
    "report.md",
    "loss.svg",
    "throughput.svg",
    "experts.svg",
];

/// The file a resume that fell back past damaged checkpoints moves the metrics log's later
/// lines to: `metrics.after-step-NNNNNNNN.jsonl` for the `n`-th such file of step `step` (from 1;
/// `-n` added from the second on), so that a checkpoint only unreadable for a while keeps its log.
pub fn metrics_side_file(step: u64, n: u32) -> String {
    let again = if n <= 1 { String::new() } else { format!("-{n}") };
    format!("metrics.after-step-{step:08}{again}.jsonl")
}

/// Whether `name` is one of [`metrics_side_file`]'s names: a run file like [`RUN_FILES`].
pub fn is_metrics_side_file(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix("metrics.after-step-")
        .and_then(|rest| rest.strip_suffix(".jsonl"))
        .is_some_and(|rest| match rest.split_once('-') {
            Some((step, n)) => step.len() >= 8 && digits(step) && digits(n),
            None => rest.len() >= 8 && digits(rest),
        })
}

/// Whether `name` is a file a run writes into its run directory ([`RUN_FILES`] or a metrics side
/// file).
fn is_run_file(name: &str) -> bool {
    RUN_FILES.contains(&name) || is_metrics_side_file(name)
}

/// The prefix of the time-budget measurement's scratch run inside a run directory (removed when
/// the measurement ends; one left by a killed process is removed by the next start).
pub const CALIBRATION_PREFIX: &str = ".semoe-calibration-";

/// Check that a fresh run may start in `dir`: it does not exist; it is empty; it is a run that
/// stopped before its first checkpoint (its lock file, and only [`RUN_FILES`]); or it holds only
/// what a failed start leaves (see [`holds_no_results`]; without a lock file, no `config.toml`,
/// so that a folder holding the user's own config is never taken for a run). Anything else is
/// refused, naming what is there: a fresh start overwrites the config and the metrics log and
/// removes the Disk tier's directory. A run with a checkpoint is refused with `--resume`'s name.
pub fn check_fresh(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("cannot read the run directory", dir, e)),
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(CALIBRATION_PREFIX) && !is_interrupted_write(n))
        .collect();
    let steps = crate::storage::checkpoint::step_dirs(dir)?;
    let aside = crate::storage::checkpoint::replaced_aside(dir)?;
    if !aside.is_empty() {
        return Err(Error::config(format!(
            "{} holds a checkpoint set aside by a replace that was interrupted ({}); use --resume (it \
             puts it back) or choose another --run-dir",
            dir.display(),
            aside[0].display()
        )));
    }
    if !steps.is_empty() && crate::storage::checkpoint::latest(dir)?.is_some() {
        return Err(Error::config(format!(
            "{} already holds a run with checkpoints; use --resume to continue it or choose another --run-dir",
            dir.display()
        )));
    }
    // Checkpoints whose manifest does not read (damaged, or from a newer semoe) are a run's too:
    // a fresh run would overwrite its config and log, and replace them when it saves their steps.
    let unreadable = steps;
    if !unreadable.is_empty() {
        let names: Vec<String> = unreadable
            .iter()
            .rev()
            .take(3)
            .map(|(_, path)| {
                path.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            })
            .collect();
        return Err(Error::config(format!(
            "{} holds checkpoints whose manifest does not read ({}{}: damaged, or written by a newer semoe); \
             a new run would replace them: use --resume (it names what is wrong with each and sets the damaged ones aside) or choose another --run-dir",
            dir.display(),
            names.join(", "),
            if unreadable.len() > 3 { ", ..." } else { "" }
        )));
    }
    let ours = names.iter().any(|n| n == LOCK_FILE);
    let run_of_ours = ours && names.iter().all(|n| n == LOCK_FILE || is_run_file(n));
    // Without our lock, a config or a ticket is the user's (a ticket other workers read).
    let failed_start =
        holds_no_results(dir) && (ours || !names.iter().any(|n| n == "config.toml" || n == "join.ticket"));
    if names.is_empty() || run_of_ours || failed_start {
        return Ok(());
    }
    // The names that are not a run's first: they are why.
    let mut shown: Vec<&str> = names.iter().map(String::as_str).filter(|n| *n != LOCK_FILE).collect();
    shown.sort_unstable_by_key(|n| (is_run_file(n), *n));
    let more = shown.len().saturating_sub(4);
    shown.truncate(4);
    Err(Error::config(format!(
        "{} is not empty and is not a semoe run ({}{}); a new run would overwrite or remove files there: \
         choose a new or empty --run-dir",
        dir.display(),
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )))
}

/// Whether `name` is a run file's write that a killed process left half done: the temporary
/// file of a durable write (`.config.toml.tmp-<pid>`, `.metrics.jsonl.tmp-<pid>`, ...) or of the
/// join ticket's (`join.ticket.tmp.<pid>.<nonce>`). Only the holder of the run directory's lock
/// writes them, so under the lock any such file is stale.
pub fn is_interrupted_write(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let durable = name
        .strip_prefix('.')
        .and_then(|rest| rest.split_once(".tmp-"))
        .is_some_and(|(base, pid)| base != TIERS_DIR && is_run_file(base) && digits(pid));
    let ticket = name
        .strip_prefix("join.ticket.tmp.")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(pid, nonce)| digits(pid) && !nonce.is_empty() && nonce.bytes().all(|b| b.is_ascii_hexdigit()));
    durable || ticket
}

/// Remove what a killed process left in `dir`, which the caller has locked: a time-budget
/// measurement's scratch run (see [`CALIBRATION_PREFIX`]) and run files' interrupted writes
/// ([`is_interrupted_write`]; a resume's rewrite of a long metrics log leaves up to its size).
pub fn remove_stale_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(CALIBRATION_PREFIX) {
            let _ = std::fs::remove_dir_all(entry.path());
        } else if is_interrupted_write(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("semoe-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_reader_probing_the_lock_neither_misreads_it_nor_keeps_a_run_from_taking_it() {
        let d = temp("probe");
        std::fs::create_dir_all(&d).expect("dir");
        assert!(!is_locked(&d), "no lock file yet");
        let held = RunDirLock::acquire(&d).expect("lock");
        assert!(is_locked(&d), "held by a run");
        drop(held);
        assert!(!is_locked(&d), "released");
        // `semoe runs` probing at the instant a run starts: the run waits the probe out.
        let probe = std::fs::File::open(d.join(LOCK_FILE)).expect("open");
        probe.lock_shared().expect("probe");
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            probe.unlock().expect("unlock");
        });
        let taken = RunDirLock::acquire(&d);
        release.join().expect("probe thread");
        assert!(
            taken.is_ok(),
            "a probe held for 50 ms refused the run: {:?}",
            taken.err()
        );
        drop(taken);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_fresh_start_takes_only_an_empty_folder_or_a_run_of_ours_without_checkpoints() {
        let d = temp("fresh");
        assert!(check_fresh(&d).is_ok(), "a folder to be created");
        std::fs::create_dir_all(&d).expect("dir");
        assert!(check_fresh(&d).is_ok(), "an empty folder");
        std::fs::write(d.join("config.toml"), "# the user's").expect("config");
        let err = check_fresh(&d)
            .expect_err("a folder with the user's config")
            .to_string();
        assert!(
            err.contains("is not empty and is not a semoe run (config.toml)"),
            "{err}"
        );
        // Nor one holding only a ticket that no run of ours locked (other workers may read it).
        std::fs::remove_file(d.join("config.toml")).expect("remove");
        std::fs::write(d.join("join.ticket"), "another job's").expect("ticket");
        let err = check_fresh(&d).expect_err("a folder with a ticket").to_string();
        assert!(err.contains("(join.ticket)"), "{err}");
        std::fs::write(d.join("config.toml"), "# the user's").expect("config");
        // A run of ours that stopped before its first checkpoint (a coordinator killed early).
        std::fs::write(d.join(LOCK_FILE), "").expect("lock");
        std::fs::write(d.join("metrics.jsonl"), "{}\n").expect("log");
        std::fs::write(d.join("join.ticket"), "ticket").expect("ticket");
        std::fs::create_dir_all(d.join("checkpoints/.step-00000001.tmp-1")).expect("an interrupted save");
        std::fs::create_dir_all(d.join(".semoe-calibration-1-2")).expect("a killed measurement");
        std::fs::write(d.join(".metrics.jsonl.tmp-77"), "{}").expect("a killed rewrite");
        std::fs::write(d.join("join.ticket.tmp.77.00c0ffee00c0ffee"), "t").expect("a killed ticket write");
        // A resume that fell back past damaged checkpoints kept their log lines in a side file
        // (and one was being written when it was killed).
        std::fs::write(d.join(metrics_side_file(4, 1)), "{}\n").expect("a side file");
        std::fs::write(d.join(metrics_side_file(4, 2)), "{}\n").expect("a second one");
        std::fs::write(d.join(format!(".{}.tmp-78", metrics_side_file(4, 3))), "{}").expect("a killed side file");
        assert!(check_fresh(&d).is_ok(), "a run of ours without a checkpoint");
        for i in 0..5 {
            std::fs::write(d.join(format!("note{i}")), "").expect("note");
        }
        let err = check_fresh(&d).expect_err("the user's files beside a run").to_string();
        assert!(err.contains("(note0, note1, note2, note3 and 7 more)"), "{err}");
        // (A run with a checkpoint is refused naming --resume: tests/cli_train.rs, with a real one.)
        // One whose checkpoint's manifest does not read is refused too, naming it.
        let damaged = d.join("checkpoints").join("step-00000010");
        std::fs::create_dir_all(&damaged).expect("checkpoint dir");
        std::fs::write(damaged.join("manifest.json"), "{ not json").expect("manifest");
        let err = check_fresh(&d).expect_err("a damaged checkpoint").to_string();
        assert!(
            err.contains("holds checkpoints whose manifest does not read (step-00000010:"),
            "{err}"
        );
        std::fs::remove_dir_all(d.join("checkpoints")).expect("remove it");
        std::fs::write(d.join(".notes.tmp-3"), "the user's").expect("not a run file's");
        remove_stale_leftovers(&d);
        assert!(!d.join(".semoe-calibration-1-2").exists());
        assert!(!d.join(".metrics.jsonl.tmp-77").exists());
        assert!(!d.join("join.ticket.tmp.77.00c0ffee00c0ffee").exists());
        assert!(!d.join(".metrics.after-step-00000004-3.jsonl.tmp-78").exists());
        assert!(
            d.join("metrics.after-step-00000004-2.jsonl").exists(),
            "a side file is a run's file"
        );
        for not_ours in [
            "metrics.after-step-4.jsonl",
            "metrics.after-step-00000004-.jsonl",
            "metrics.after-step-x.jsonl",
        ] {
            assert!(!is_metrics_side_file(not_ours), "{not_ours}");
        }
        assert!(d.join(".notes.tmp-3").exists(), "only run files' writes go");
        std::fs::remove_dir_all(&d).expect("clean up");
    }

    #[test]
    fn names_are_readable_utc_stamps() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_415_484);
        assert_eq!(default_name(t), "run-20261204-201804");
    }

    #[test]
    fn same_name_twice_gets_a_suffix() {
        let root = temp("unique");
        let a = create_unique(&root, "run-x").expect("first");
        let b = create_unique(&root, "run-x").expect("second");
        let c = create_unique(&root, "run-x").expect("third");
        assert_eq!(a, root.join("run-x"));
        assert_eq!(b, root.join("run-x-2"));
        assert_eq!(c, root.join("run-x-3"));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_directories_a_creation_makes_are_listed_outermost_first_for_their_sync() {
        let root = temp("missing");
        let nested = root.join("a").join("b");
        let missing = crate::storage::checkpoint::missing_dirs(&nested);
        assert_eq!(missing, vec![root.clone(), root.join("a"), nested.clone()]);
        let made = create_dir(&nested.join("run")).expect("create");
        assert!(made && nested.join("run").is_dir());
        assert_eq!(crate::storage::checkpoint::missing_dirs(&nested), Vec::<PathBuf>::new());
        assert_eq!(
            crate::storage::checkpoint::missing_dirs(&nested.join("c")),
            vec![nested.join("c")]
        );
        crate::storage::checkpoint::sync_parents(&missing).expect("their parents sync");
        // A relative directory of one component is entered in the working directory.
        use crate::storage::checkpoint::parent_dir;
        assert_eq!(parent_dir(Path::new("runs")), Some(Path::new(".")));
        assert_eq!(parent_dir(Path::new("runs/r")), Some(Path::new("runs")));
        assert_eq!(parent_dir(&nested), Some(root.join("a").as_path()));
        assert_eq!(parent_dir(Path::new("/")), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = temp("lock");
        std::fs::create_dir_all(&dir).expect("dir");
        let first = RunDirLock::acquire(&dir).expect("first lock");
        let err = RunDirLock::acquire(&dir).expect_err("second lock must fail");
        let msg = err.to_string();
        assert!(msg.contains("in use by another semoe process"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        drop(first);
        RunDirLock::acquire(&dir).expect("lock after release");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn empty_starts_hold_no_results() {
        let dir = temp("empty");
        std::fs::create_dir_all(dir.join(TIERS_DIR).join("worker-0")).expect("dir");
        std::fs::create_dir_all(dir.join(TIERS_DIR).join("process-12")).expect("dir");
        std::fs::write(dir.join("config.toml"), "x").expect("config");
        std::fs::write(dir.join("metrics.jsonl"), "").expect("metrics");
        std::fs::write(dir.join("join.ticket"), "x").expect("ticket");
        assert!(holds_no_results(&dir));
        std::fs::write(dir.join("metrics.jsonl"), "{}\n").expect("metrics");
        assert!(!holds_no_results(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_users_own_tiers_folder_is_neither_scratch_nor_removed() {
        let dir = temp("users-tiers");
        let tiers = dir.join(TIERS_DIR);
        std::fs::create_dir_all(tiers.join("worker-0")).expect("dir");
        std::fs::write(tiers.join("worker-0").join("slots"), "x").expect("slots");
        std::fs::write(tiers.join("pricing.csv"), "1,2").expect("user file");
        assert!(!holds_no_results(&dir), "a tiers folder with a user's file");
        let e = check_fresh(&dir).expect_err("refused").to_string();
        assert!(e.contains("is not a semoe run"), "{e}");
        remove_tier_scratch(&dir);
        assert!(tiers.join("pricing.csv").exists(), "the user's file kept");
        assert!(
            tiers.join("worker-0").exists(),
            "nothing removed from a folder not ours"
        );

        std::fs::remove_file(tiers.join("pricing.csv")).expect("remove");
        assert!(holds_no_results(&dir));
        remove_tier_scratch(&dir);
        assert!(!tiers.exists(), "the scratch and its folder removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
