//! `semoe runs`: what each run directory under a folder holds, read from its files alone (the
//! config, the checkpoints, the metrics log and the lock), without loading any tensor.

use crate::error::{Error, Result};
use crate::storage::checkpoint;
use crate::storage::run_dir;
use crate::train::log::{Parsed, Record, TailReader, METRICS_FILE};
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
    let (val_loss, training_seconds, _) = last_figures(&dir.join(METRICS_FILE), shown);
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

/// The last validation loss (with its step) and the training seconds of the last step that
/// `shown` admits, read from the end of the log backwards (a long run's log is not parsed whole),
/// and the bytes read. A log that cannot be read says nothing; a line that is not a record (a run
/// killed mid-write) is passed over.
fn last_figures(log: &Path, shown: impl Fn(u64) -> bool) -> (Option<(u64, f64)>, Option<f64>, u64) {
    let (mut val_loss, mut training_seconds) = (None, None);
    let Ok(mut reader) = TailReader::open(log) else {
        return (None, None, 0);
    };
    for entry in reader.by_ref() {
        let Ok(entry) = entry else { break };
        match entry.parsed {
            Parsed::Record(Record::Train(r)) if shown(r.step) => {
                training_seconds.get_or_insert(r.elapsed_s);
            }
            Parsed::Record(Record::Val(r)) if shown(r.step) => {
                if let Some(s) = r.elapsed_s {
                    training_seconds.get_or_insert(s);
                }
                // A `null` loss (NaN) is not a loss to show.
                if !r.val_loss.is_nan() {
                    val_loss.get_or_insert((r.step, r.val_loss));
                }
            }
            _ => {}
        }
        if val_loss.is_some() && training_seconds.is_some() {
            break;
        }
    }
    (val_loss, training_seconds, reader.bytes_read())
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

    #[test]
    fn the_last_figures_come_from_the_end_of_a_long_log() {
        use crate::train::log::{MetricsLog, TrainRecord, ValRecord};
        let root = std::env::temp_dir().join(format!("semoe-runs-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("dir");
        let path = root.join(METRICS_FILE);
        let mut log = MetricsLog::append(&path).expect("log");
        let train = |step: u64| {
            Record::Train(TrainRecord {
                step,
                tokens: 256,
                elapsed_s: step as f64 / 10.0,
                loss: 2.0,
                ce_loss: None,
                aux_loss: None,
                lr: None,
                grad_norm: None,
                tokens_per_s: 1.0,
                expert_tokens: Vec::new(),
                dropped: Vec::new(),
            })
        };
        let val = |step: u64, val_loss: f64| {
            Record::Val(ValRecord {
                step,
                elapsed_s: None,
                val_loss,
            })
        };
        for step in 1..=20_000 {
            log.write(&train(step)).expect("write");
            if step % 1000 == 0 {
                // The last validation loss of the log is NaN: the one before it is shown.
                log.write(&val(step, if step == 20_000 { f64::NAN } else { step as f64 }))
                    .expect("write");
            }
        }
        log.sync().expect("sync");
        drop(log);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"kind\":\"tra"))
            .expect("a partial last line");
        let size = std::fs::metadata(&path).expect("size").len();
        let (val_loss, seconds, read) = last_figures(&path, |_| true);
        assert_eq!(val_loss, Some((19_000, 19_000.0)));
        assert_eq!(seconds, Some(2_000.0));
        assert!(read < size / 10, "read {read} of {size} bytes");
        // A crashed run's figures are its checkpoint's (step 12,345 here).
        let (val_loss, seconds, _) = last_figures(&path, |s| s <= 12_345);
        assert_eq!(val_loss, Some((12_000, 12_000.0)));
        assert_eq!(seconds, Some(1_234.5));
        let _ = std::fs::remove_dir_all(&root);
    }
}
