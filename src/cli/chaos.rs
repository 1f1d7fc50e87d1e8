//! `semoe chaos`: train a job on the in-process actor runtime (or, with `--processes N`, on worker
//! processes it starts) under a fault scenario and again undisturbed, compare the final state bit
//! for bit, and report (stdout, `chaos.md` and `chaos.json` in the run directory).

use clap::Args;
use semoe::chaos::Scenario;
use semoe::storage::run_dir::{self, RunDirLock};
use semoe::train::chaos::{self, Verdict};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::train::{resolve_config_unchecked, TrainArgs};

/// Steps of a chaos run when neither --steps nor --config sets them.
const DEFAULT_STEPS: u64 = 20;

/// Options of `semoe chaos`: the scenario, and the job's training options.
///
/// It shares `semoe train`'s options; those a chaos run refuses ([`TrainArgs::chaos_refusal`]) are
/// hidden from its help, and the run directory's default is its own.
#[derive(Args)]
#[command(after_help = CHAOS_AFTER_HELP)]
#[command(mut_arg("run_dir", |a| a.help(CHAOS_RUN_DIR_HELP)))]
#[command(mut_args(hide_refused))]
pub struct ChaosArgs {
    /// The fault scenario (TOML: seed, deadline and [[fault]] entries; see scenarios/).
    #[arg(long, value_name = "FILE")]
    scenario: PathBuf,
    /// A soak: run the scenario under this many seeds (its own, then the next ones), print one line
    /// per seed and list those whose state differed or whose deadline expired (`soak.json`).
    #[arg(long, value_name = "SEEDS")]
    soak: Option<u64>,
    #[command(flatten)]
    train: TrainArgs,
}

/// The training options a chaos run refuses (the ids of [`TrainArgs::chaos_refusal`]'s flags, and
/// `--allow-data-change`, which needs `--resume`).
const REFUSED: [&str; 16] = [
    "resume",
    "allow_data_change",
    "listen",
    "identity",
    "min_workers",
    "join_wait",
    "metrics_addr",
    "time_budget",
    "print_config",
    "device",
    "time_limit",
    "eval_every",
    "checkpoint_every",
    "sample_tokens",
    "sample_prompt",
    "quiet",
];

/// Hide a training option that a chaos run refuses.
fn hide_refused(a: clap::Arg) -> clap::Arg {
    if REFUSED.contains(&a.get_id().as_str()) {
        a.hide(true)
    } else {
        a
    }
}

const CHAOS_RUN_DIR_HELP: &str = "Run directory for the report, both runs' state and their logs (default: a new \
runs/chaos-YYYYMMDD-HHMMSS, UTC). One process at a time: a directory in use is refused";

const CHAOS_AFTER_HELP: &str = "The job runs on the in-process actor runtime (--workers, default from the config; \
without --steps, or a --config that sets train.steps, it runs 20 steps); with --processes N it runs on N `semoe worker` processes started \
here (127.0.0.1, ports from the OS, their logs under the run directory's workers/), the scenario holds process \
faults (kill, stop, leave, join) and link faults between the processes (drop, duplicate, delay, reorder, corrupt, \
partition; from and to are worker indices of the epoch that first runs the step), and the undisturbed run uses N \
in-process workers. Disk faults need storage budgets that leave experts on disk \
(--device-budget, --host-budget); the Disk tiers live under the run directory's tiers/, and with checkpoint faults \
the disturbed run's checkpoints under its checkpoints/. Exit status: 0 when the final parameters and optimizer \
state are bitwise equal to the undisturbed run's and every scripted fault (an entry with `step`) fired; 3 when the \
state is bitwise equal but a scripted fault never fired (nothing was tested by it: the output names it); 2 when the \
disturbed run stopped with an error (the report names it); 1 when the state differs or the scenario's deadline \
expired; 4 when no verdict could be reached (a bad scenario, config or flag, a run directory in use, a failure \
outside the two runs). With --soak: 1 when any seed differs, expired or could not run; else 2 when no seed ended \
bitwise equal (every one stopped with an error); else 0 (4 as above).";

/// The exit status of a chaos run that reached no verdict: the scenario, the config or a flag was
/// refused, its directory was in use, or something outside the two runs failed. (The statuses 1
/// to 3 are verdicts; a usage error of the command line exits with this one too.)
pub const COULD_NOT_RUN: u8 = 4;

pub fn run(a: &ChaosArgs) -> semoe::Result<ExitCode> {
    if let Some(flag) = a.train.chaos_refusal() {
        return Err(semoe::Error::config(format!(
            "semoe chaos runs a fresh job on in-process workers or worker processes it starts: {flag} does not apply"
        )));
    }
    let scenario = Scenario::from_file(&a.scenario)?;
    // Validated once adjusted for a chaos run (below).
    let mut config = resolve_config_unchecked(&a.train)?;
    if config.train.device == semoe::config::ComputeDevice::Cuda {
        return Err(semoe::Error::config(
            "semoe chaos runs its job on the CPU: the config's train.device = \"cuda\" does not apply",
        ));
    }
    if !a.train.sets_steps()? {
        config.train.steps = DEFAULT_STEPS;
    }
    // A config file written for `semoe train` may set what a chaos run does not do: said, since
    // the run's config.toml will still hold them.
    let d = semoe::train::TrainConfig::default().train;
    let unused: Vec<&str> = [
        ("train.time_limit_s", config.train.time_limit_s != d.time_limit_s),
        ("train.eval_every", config.train.eval_every != d.eval_every),
        (
            "train.checkpoint_every",
            config.train.checkpoint_every != d.checkpoint_every,
        ),
        (
            "train.keep_checkpoints",
            config.train.keep_checkpoints != d.keep_checkpoints,
        ),
        ("train.time_budget_s", config.train.time_budget_s != d.time_budget_s),
        // Over processes the run waits for all of its own; in process there is nobody to wait for.
        ("train.min_workers", config.train.min_workers != d.min_workers),
        ("train.join_wait_s", config.train.join_wait_s != d.join_wait_s),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect();
    if !unused.is_empty() {
        semoe::say!(
            "notice: a chaos run computes its steps without evaluating, checkpointing (but where a checkpoint \
             fault asks), a time limit or budget, or waiting for workers to join: {} from the config not used",
            unused.join(", ")
        );
    }
    config.train.time_budget_s = 0.0;
    config.validate()?;
    // Both runs (and every seed of a soak, every worker process) read the text: a pipe gives it
    // once, and a second open of a named pipe waits for ever.
    if let Some(data) = config
        .train
        .data
        .as_deref()
        .filter(|d| semoe::train::trainer::is_pipe(d))
    {
        return Err(semoe::Error::config(format!(
            "--data {} is a pipe, which can be read once, and a chaos run reads its text more than once (the \
             disturbed and the undisturbed run): write the text to a file",
            data.display()
        )));
    }
    // Everything the run would refuse, refused before its directory is made or written.
    if let Some(seeds) = a.soak {
        if seeds == 0 || scenario.seed.checked_add(seeds).is_none() {
            return Err(semoe::Error::config(format!(
                "--soak {seeds}: a soak runs at least one seed, and the scenario's seed ({}) plus the count must \
                 stay below 2^64",
                scenario.seed
            )));
        }
    }
    chaos::preflight(&config, &scenario)?;
    let dir = match a.train.run_dir() {
        Some(dir) => {
            // A chaos run replaces its directory's checkpoints and config: only an earlier chaos
            // run's directory (its scenario beside the lock semoe leaves) or a fresh one may be
            // given, not a folder of the user's own that happens to hold a scenario.
            let earlier_chaos_run = dir.join("scenario.toml").is_file() && dir.join(run_dir::LOCK_FILE).is_file();
            if !earlier_chaos_run {
                run_dir::check_fresh(dir)?;
            }
            std::fs::create_dir_all(dir).map_err(|e| semoe::Error::io("cannot create the run directory", dir, e))?;
            dir.to_path_buf()
        }
        None => {
            let name = run_dir::default_name(std::time::SystemTime::now()).replacen("run-", "chaos-", 1);
            run_dir::create_unique(Path::new("runs"), &name)?
        }
    };
    let _lock = RunDirLock::acquire(&dir)?;
    write(&dir.join("config.toml"), &config.to_toml()?)?;
    let scenario_text = semoe::storage::text_file::read(&a.scenario, "the chaos scenario")?;
    write(&dir.join("scenario.toml"), &scenario_text)?;
    semoe::say!(
        "semoe chaos: {} fault entries, seed {}, deadline {}; {} steps on {}; run directory {}",
        scenario.faults.len(),
        scenario.seed,
        humantime::format_duration(scenario.deadline),
        config.train.steps,
        if config.train.processes > 0 {
            format!("{} worker processes", config.train.processes)
        } else {
            format!("{} workers", config.train.workers)
        },
        dir.display()
    );
    quiet_injected_panics();
    if let Some(seeds) = a.soak {
        return soak(&config, &scenario, seeds, &dir);
    }
    let report = chaos::run_in(&config, &scenario, &dir)?;
    let json =
        serde_json::to_string_pretty(&report).map_err(|e| semoe::Error::parse("the chaos report", e.to_string()))?;
    write(&dir.join("chaos.json"), &json)?;
    let md = report.markdown();
    write(&dir.join("chaos.md"), &md)?;
    if report.processes.is_none() {
        semoe::out!(
            "{} faults planned, {} fired, {} restarts, {} steps replayed",
            report.faults.len(),
            report.faults.iter().filter(|f| f.fired > 0).count(),
            report.restarts,
            report.replays
        );
    }
    for f in &report.faults {
        semoe::out!(
            "  fault {}: {} {} at step {} ({}): fired {}x; {}{}",
            f.index,
            f.target,
            f.kind,
            f.step,
            f.moment,
            f.fired,
            f.detection,
            f.recovery_s
                .map_or(String::new(), |r| format!("; step committed {r:.3} s after the fault"))
        );
    }
    if let Some(p) = &report.processes {
        semoe::out!(
            "worker processes: {} at the start; {} epochs: {} joined, {} left, {} lost; {} steps replayed",
            p.processes,
            p.epochs,
            p.joins,
            p.leaves,
            p.crashes,
            p.replayed_steps
        );
        for f in &p.faults {
            semoe::out!(
                "  process fault {}: {} of {} at step {} ({}): {}{}",
                f.index,
                f.kind,
                f.worker.map_or("a new worker".to_string(), |w| format!("worker {w}")),
                f.step,
                f.moment,
                f.detection,
                f.recovery_s
                    .map_or(String::new(), |r| format!("; step committed {r:.3} s after the fault"))
            );
        }
        for f in &p.link_faults {
            semoe::out!(
                "  link fault {}: {} from worker {} to worker {} at step {}: fired {}x; {}",
                f.index,
                f.kind,
                f.from,
                f.to,
                f.step,
                f.fired,
                f.detection
            );
        }
    }
    semoe::out!("verdict: {}", report.verdict_line());
    let unfired = unfired_scripted(&report, &scenario);
    if !unfired.is_empty() {
        semoe::out!(
            "not exercised: scripted fault(s) {} never fired, so the run did not test them",
            unfired.join(", ")
        );
    }
    semoe::out!("report: {}", dir.join("chaos.md").display());
    Ok(match report.verdict {
        Verdict::BitwiseEqual { .. } if !unfired.is_empty() => ExitCode::from(3),
        Verdict::BitwiseEqual { .. } => ExitCode::SUCCESS,
        Verdict::Stopped { .. } => ExitCode::from(2),
        Verdict::Differs { .. } | Verdict::DeadlineExpired { .. } => ExitCode::FAILURE,
    })
}

/// The scripted faults (entries with a `step`) that never fired, as `fault I (entry E)`: a random
/// fault may rightly draw a step where it cannot fire, a scripted one that does not has tested
/// nothing, and a run that reads "bitwise equal" must not pass for a test of it.
fn unfired_scripted(report: &semoe::train::chaos::ChaosReport, scenario: &Scenario) -> Vec<String> {
    let scripted = |entry: usize| {
        scenario
            .faults
            .get(entry)
            .is_some_and(|f| matches!(f.when, semoe::chaos::When::At(_)))
    };
    let name = |kind: &str, index: usize, entry: usize| format!("{kind}{index} (entry {entry})");
    let mut unfired: Vec<String> = report
        .faults
        .iter()
        .filter(|f| f.fired == 0 && scripted(f.entry))
        .map(|f| name("fault ", f.index, f.entry))
        .collect();
    if let Some(p) = &report.processes {
        unfired.extend(
            p.faults
                .iter()
                .filter(|f| f.injected_at_s.is_none() && scripted(f.entry))
                .map(|f| name("process fault ", f.index, f.entry)),
        );
        unfired.extend(
            p.link_faults
                .iter()
                .filter(|f| f.fired == 0 && scripted(f.entry))
                .map(|f| name("link fault ", f.index, f.entry)),
        );
    }
    unfired
}

/// Injected panics are expected: one line each instead of the default hook's message (and
/// backtrace); any other panic is reported as usual.
fn quiet_injected_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.starts_with("injected panic") {
            semoe::say!("chaos: {text}");
        } else {
            default(info);
        }
    }));
}

/// Run `scenario` under `seeds` seeds from its own; failing seeds are listed (and make the exit
/// status 1); a soak in which no seed ended bitwise equal exits with 2.
fn soak(config: &semoe::train::TrainConfig, scenario: &Scenario, seeds: u64, dir: &Path) -> semoe::Result<ExitCode> {
    let mut rows = Vec::new();
    let mut failing = Vec::new();
    let (mut equal, mut stopped) = (0, 0);
    let started = std::time::Instant::now();
    for seed in scenario.seed..scenario.seed + seeds {
        let s = Scenario {
            seed,
            ..scenario.clone()
        };
        let report = match chaos::run_in(config, &s, dir) {
            Ok(report) => report,
            Err(e) => {
                // Recorded and counted as failing: the other seeds still run, and soak.json is written.
                semoe::out!("seed {seed}: could not run: {e}");
                failing.push(seed);
                rows.push(serde_json::json!({ "seed": seed, "error": e.to_string() }));
                continue;
            }
        };
        // In-process faults count their firings; a process fault fires once or not at all; a link
        // fault between processes counts what the workers told.
        let fired: usize = report.faults.iter().map(|f| f.fired).sum::<usize>()
            + report.processes.as_ref().map_or(0, |p| {
                p.faults.iter().filter(|f| f.injected_at_s.is_some()).count()
                    + p.link_faults.iter().map(|f| f.fired).sum::<usize>()
            });
        semoe::out!(
            "seed {seed}: {fired} faults fired, {} replays: {}",
            report.replays,
            report.verdict_line()
        );
        match report.verdict {
            Verdict::BitwiseEqual { .. } => equal += 1,
            Verdict::Stopped { .. } => stopped += 1,
            Verdict::Differs { .. } | Verdict::DeadlineExpired { .. } => failing.push(seed),
        }
        rows.push(serde_json::json!({
            "seed": seed,
            "faults_fired": fired,
            "replays": report.replays,
            "verdict": report.verdict,
        }));
    }
    let json = serde_json::to_string_pretty(&serde_json::json!({ "seeds": rows, "failing": failing }))
        .map_err(|e| semoe::Error::parse("the soak report", e.to_string()))?;
    write(&dir.join("soak.json"), &json)?;
    semoe::out!(
        "soak: {seeds} seeds in {:.1} s: {equal} bitwise equal, {stopped} stopped with an error, {} failing{}",
        started.elapsed().as_secs_f64(),
        failing.len(),
        if failing.is_empty() {
            String::new()
        } else {
            format!(" (seeds {failing:?}: replay one with `seed = N` in the scenario)")
        }
    );
    Ok(if !failing.is_empty() {
        ExitCode::FAILURE
    } else if equal == 0 {
        // Every seed stopped with an error: the soak showed no repair at all.
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Write a file of the run directory whole or not at all (a rerun in an earlier chaos run's
/// directory replaces its report: a crash or a full disk mid-write leaves the old one).
fn write(path: &Path, text: &str) -> semoe::Result<()> {
    semoe::storage::checkpoint::write_file_durably(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use semoe::train::chaos::{ChaosReport, FaultReport};

    fn fault(index: usize, entry: usize, fired: usize) -> FaultReport {
        FaultReport {
            index,
            entry,
            target: "expert 2 of block 1".into(),
            kind: "panic".into(),
            step: 1,
            moment: "forward".into(),
            fired,
            fired_at_s: None,
            detection: String::new(),
            recovery_s: None,
            step_replays: None,
        }
    }

    #[test]
    fn only_scripted_faults_that_never_fired_are_not_exercised() {
        let scenario = Scenario::from_toml(
            "seed = 1\n\
             [[fault]]\nactor = \"expert\"\nblock = 1\nexpert = 2\nkind = \"panic\"\nstep = 1\nmoment = \"forward\"\n\
             [[fault]]\nactor = \"gate\"\nkind = \"error\"\nprobability = 0.5\n\
             [[fault]]\nactor = \"expert\"\nblock = 1\nexpert = 3\nkind = \"error\"\nstep = 2\nmoment = \"backward\"\n",
        )
        .expect("scenario");
        let mut report = ChaosReport {
            seed: 1,
            deadline_s: 60.0,
            steps: 4,
            workers: 2,
            collective_deadline_s: 1.0,
            // Entry 0 fired; entry 1 (random) drew a step where it could not fire; entry 2
            // (scripted) never fired.
            faults: vec![fault(0, 0, 1), fault(1, 1, 0), fault(2, 2, 0)],
            restarts: 1,
            restarts_per_worker: vec![1, 0],
            replays: 1,
            disturbed_steps: Vec::new(),
            undisturbed_steps: Vec::new(),
            disturbed_s: 1.0,
            undisturbed_s: 1.0,
            disk_bytes: [0, 0],
            verdict: Verdict::BitwiseEqual { tensors: 3, values: 9 },
            processes: None,
        };
        assert_eq!(
            unfired_scripted(&report, &scenario),
            vec!["fault 2 (entry 2)".to_string()]
        );
        report.faults[2].fired = 2;
        assert!(unfired_scripted(&report, &scenario).is_empty());
    }
}
