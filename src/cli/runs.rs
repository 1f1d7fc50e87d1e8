//! `semoe runs`: the runs under a directory, one line each.

use clap::Args;
use std::path::PathBuf;

/// Options of `semoe runs`.
#[derive(Args)]
pub struct RunsArgs {
    /// The directory holding the runs.
    #[arg(long, default_value = "runs")]
    dir: PathBuf,
}

pub fn run(a: &RunsArgs) -> semoe::Result<()> {
    let exists = a
        .dir
        .try_exists()
        .map_err(|e| semoe::Error::io("cannot look for the runs directory", &a.dir, e))?;
    if !exists {
        // Not an error: a fresh checkout has no runs yet; but say why nothing is listed.
        semoe::out!(
            "no runs under {}: it does not exist (semoe train creates runs/ where it starts; --dir looks elsewhere)",
            a.dir.display()
        );
        return Ok(());
    }
    let runs = semoe::telemetry::runs::list(&a.dir)?;
    if runs.is_empty() {
        semoe::out!("no runs under {}", a.dir.display());
        return Ok(());
    }
    semoe::out!("{:<32} {:>13} {:>9} {:>10}  status", "run", "steps", "val loss", "time");
    for r in runs {
        let val = r.val_loss.map_or("-".to_string(), |(_, v)| format!("{v:.4}"));
        let time = r
            .training_seconds
            .map_or("-".to_string(), semoe::train::trainer::format_duration);
        semoe::out!(
            "{:<32} {:>13} {:>9} {:>10}  {}",
            r.name,
            format!(
                "{}/{}",
                r.checkpoint_step.unwrap_or(0),
                r.planned_steps.map_or("?".to_string(), |s| s.to_string())
            ),
            val,
            time,
            r.status
        );
    }
    Ok(())
}
