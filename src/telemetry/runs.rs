//! `semoe runs`: what each run directory under a folder holds, read from its files alone (the
//! config, the checkpoints, the metrics log and the lock), without loading any tensor.

use crate::error::{Error, Result};
use crate::storage::checkpoint;
use crate::storage::run_dir;
use crate::train::log::{LogReader, Parsed, Record, METRICS_FILE};
use std::path::{Path, PathBuf};

/// One run directory, summarised.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    /// The directory's name.
    pub name: String,
    /// The directory.
    pub dir: PathBuf,
    /// Steps planned (`train.steps` of its config; `None` when the config does not parse).
    pub planned_steps: Option<u64>,
    /// The step of its newest checkpoint, if it has one.
    pub checkpoint_step: Option<u64>,
    /// The last validation loss logged, with its step.
    pub val_loss: Option<(u64, f64)>,
    /// Training seconds at the last logged step.
    pub training_seconds: Option<f64>,
    /// `running`, `finished`, `stopped at step N`, `no checkpoint`, `config.toml unreadable` or
    /// `missing`, `checkpoints unreadable`, or `unreadable: ` and why.
    pub status: String,
}

/// The runs directly under `dir` (directories holding a `config.toml` or checkpoints), sorted by name. A
/// missing `dir` holds no runs.
pub fn list(dir: &Path) -> Result<Vec<RunInfo>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot list the runs", dir, e)),
    };
    let mut runs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list the runs", dir, e))?;
        let path = entry.path();
        // A run whose config was lost still holds its checkpoints (a resume rebuilds the config).
        let a_run = path.join("config.toml").is_file()
            || (path.is_dir() && checkpoint::step_dirs(&path).is_ok_and(|d| !d.is_empty()));
        if a_run {
            // One run that cannot be read (its checkpoints' permissions) is listed as such; the
            // others are still listed.
            runs.push(describe(&path).unwrap_or_else(|e| RunInfo {
                name: entry.file_name().to_string_lossy().into_owned(),
                dir: path.clone(),
                planned_steps: None,
                checkpoint_step: None,
                val_loss: None,
                training_seconds: None,
                status: format!("unreadable: {e}"),
            }));
        }
    }
    runs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(runs)
}

/// Summarise one run directory.
pub fn describe(dir: &Path) -> Result<RunInfo> {
    let name = dir
        .file_name()
        .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    // A config that does not parse (hand-edited, or from another version) plans nothing known.
    let planned_steps = crate::train::TrainConfig::from_file(&dir.join("config.toml"))
        .map(|c| c.train.steps)
        .ok();
    let checkpoint_step = checkpoint::list(dir)?.last().map(|(step, _)| *step);
    let running = run_dir::is_locked(dir);
    // A run that stopped (or crashed) resumes from its checkpoint: the steps logged after it are
    // done again, so its figures are the checkpoint's (a running one shows its progress).
    let shown = |step: u64| running || checkpoint_step.is_none_or(|c| step <= c);
    let (mut val_loss, mut training_seconds) = (None, None);
    // A log that cannot be read, or a line that is not a record (a run killed mid-write), says nothing.
    if let Ok(reader) = LogReader::open(&dir.join(METRICS_FILE)) {
        for entry in reader {
            let Ok(entry) = entry else { break };
            match entry.parsed {
                Parsed::Record(Record::Train(r)) if shown(r.step) => training_seconds = Some(r.elapsed_s),
                Parsed::Record(Record::Val(r)) if shown(r.step) => {
                    if let Some(s) = r.elapsed_s {
                        training_seconds = Some(s);
                    }
                    // A `null` loss (NaN) is not a loss to show.
                    if !r.val_loss.is_nan() {
                        val_loss = Some((r.step, r.val_loss));
                    }
                }
                _ => {}
            }
        }
    }
    let status = if running {
        "running".to_string()
    } else {
        match (checkpoint_step, planned_steps) {
            (_, None) if !dir.join("config.toml").exists() => {
                "config.toml missing (--resume rebuilds it from the newest checkpoint)".to_string()
            }
            (_, None) => "config.toml unreadable".to_string(),
            // Step folders whose manifests this version does not read (another semoe version, or
            // damage): "no checkpoint" would say there is nothing to keep, while a fresh start in
            // the directory is refused for what it holds.
            (None, _) if checkpoint::step_dirs(dir).is_ok_and(|d| !d.is_empty()) => {
                "checkpoints unreadable (another semoe version, or damaged)".to_string()
            }
            (None, _) => "no checkpoint".to_string(),
            (Some(step), Some(planned)) if step >= planned => "finished".to_string(),
            (Some(step), _) => format!("stopped at step {step}"),
        }
    };
    Ok(RunInfo {
        name,
        dir: dir.to_path_buf(),
        planned_steps,
        checkpoint_step,
        val_loss,
        training_seconds,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_cannot_be_read_is_listed_as_such_beside_the_others() {
        let root = std::env::temp_dir().join(format!("semoe-runs-list-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for name in ["a", "b"] {
            std::fs::create_dir_all(root.join(name)).expect("run dir");
            std::fs::write(root.join(name).join("config.toml"), "").expect("config");
        }
        // A checkpoint whose manifest is a directory: reading it is an I/O error, not damage.
        std::fs::create_dir_all(root.join("b/checkpoints/step-00000001/manifest.json")).expect("odd manifest");
        let runs = list(&root).expect("the listing");
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].name.as_str(), runs[1].name.as_str()), ("a", "b"));
        assert_eq!(runs[0].status, "no checkpoint");
        assert!(runs[1].status.starts_with("unreadable: "), "{:?}", runs[1]);
        // A checkpoint of another format version is not "no checkpoint".
        let step = root.join("a/checkpoints/step-00000005");
        std::fs::create_dir_all(&step).expect("step folder");
        std::fs::write(step.join("manifest.json"), r#"{"format_version":999}"#).expect("manifest");
        let a = describe(&root.join("a")).expect("described");
        assert_eq!(a.checkpoint_step, None);
        assert_eq!(a.status, "checkpoints unreadable (another semoe version, or damaged)");
        let _ = std::fs::remove_dir_all(&root);
    }
}
