//! `semoe train` and friends as processes, the way a user runs them: signals stop a run gracefully
//! at a step boundary, a run directory serves one process at a time, default run directories never
//! collide, a failed start leaves nothing behind, progress shows without a terminal, and bad input
//! gets a clear message. Every child is killed and reaped when its test ends, also on failure.

mod common;

use common::TempDir;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const SEMOE: &str = env!("CARGO_BIN_EXE_semoe");

/// A tiny model: about a millisecond a step.
const TINY: &[&str] = &[
    "--d-model",
    "16",
    "--layers",
    "1",
    "--heads",
    "2",
    "--d-ff",
    "32",
    "--experts",
    "4",
    "--block-size",
    "16",
    "--batch",
    "4",
    "--groups",
    "2",
    "--threads",
    "1",
    "--sample-tokens",
    "0",
];

/// A child process that is killed and reaped when dropped.
struct Child {
    child: std::process::Child,
    stderr_path: PathBuf,
}

impl Child {
    fn spawn(cwd: &Path, args: &[&str], name: &str) -> Child {
        let stderr_path = cwd.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = Command::new(SEMOE)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn semoe");
        Child { child, stderr_path }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Wait at most `limit` for the child to exit.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "semoe did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run semoe to completion (at most `limit`), returning its status, stdout and stderr.
fn run(cwd: &Path, args: &[&str], limit: Duration) -> (ExitStatus, String, String) {
    run_with_env(cwd, args, &[], limit)
}

/// [`run`] with environment variables set.
fn run_with_env(cwd: &Path, args: &[&str], env: &[(&str, &Path)], limit: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new(SEMOE)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn semoe");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    // Bytes, decoded after: a sample from a barely trained model is not always UTF-8.
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let mut guard = Child {
        child,
        stderr_path: cwd.join("unused"),
    };
    let status = guard.wait(limit);
    (
        status,
        out.join().expect("stdout reader"),
        err.join().expect("stderr reader"),
    )
}

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = vec!["train"];
    v.extend_from_slice(TINY);
    v.extend_from_slice(extra);
    v
}

/// Train records in a run's metrics log.
fn train_steps_logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"kind\":\"train\""))
        .count()
}

/// Wait (bounded) until the run has logged at least `n` steps.
fn wait_for_steps(run: &Path, n: usize, child: &Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while train_steps_logged(run) < n {
        assert!(
            Instant::now() < deadline,
            "the run logged no {n} steps within 60 s; stderr:\n{}",
            child.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The newest checkpoint's step and the SHA-256 of its model file and of its optimizer file
/// (from the manifest).
fn newest_checkpoint(run: &Path) -> (u64, String, String) {
    let ckpt = semoe::storage::checkpoint::latest(run)
        .expect("list checkpoints")
        .expect("a checkpoint");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("manifest.json")).expect("manifest")).expect("json");
    let step = manifest["step"].as_u64().expect("step");
    let files = manifest["files"].as_array().expect("files");
    assert_eq!(files.len(), 2, "model and optimizer files");
    let sha = |name: &str| {
        let file = files.iter().find(|f| f["name"] == name).expect(name);
        file["sha256"].as_str().expect("sha").to_string()
    };
    (step, sha("model.safetensors"), sha("optimizer.safetensors"))
}

#[test]
fn sigint_stops_at_a_step_boundary_and_resume_ends_bitwise_identical() {
    let tmp = TempDir::new("cli-sigint");
    let steps = "3000";
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", steps, "--run-dir", "straight", "--eval-every", "0"]),
        Duration::from_secs(300),
    );
    assert!(status.success(), "{err}");
    let straight = newest_checkpoint(&tmp.path().join("straight"));
    assert_eq!(straight.0, 3000);

    let run_dir = tmp.path().join("stopped");
    let mut child = Child::spawn(
        tmp.path(),
        &args(&["--steps", steps, "--run-dir", "stopped", "--eval-every", "0"]),
        "stopped",
    );
    wait_for_steps(&run_dir, 50, &child);
    child.signal(libc::SIGINT);
    let status = child.wait(Duration::from_secs(60));
    let err = child.stderr();
    assert_eq!(status.code(), Some(130), "exit code after Ctrl-C; stderr:\n{err}");
    assert!(err.contains("stopped by Ctrl-C (SIGINT) after step"), "{err}");
    assert!(err.contains("semoe train --resume --run-dir stopped"), "{err}");
    let (stopped_at, _, _) = newest_checkpoint(&run_dir);
    assert!((50..3000).contains(&stopped_at), "stopped at {stopped_at}");
    assert_eq!(
        train_steps_logged(&run_dir),
        stopped_at as usize,
        "every step run is checkpointed"
    );
    assert!(run_dir.join("report.md").is_file(), "the report is written");
    assert!(!run_dir.join("tiers").exists(), "no scratch files left");

    let (status, _, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "stopped"],
        Duration::from_secs(300),
    );
    assert!(status.success(), "{err}");
    assert_eq!(
        newest_checkpoint(&run_dir),
        straight,
        "resumed run against the uninterrupted one"
    );
}

#[test]
fn sigterm_stops_gracefully_too() {
    let tmp = TempDir::new("cli-sigterm");
    let run_dir = tmp.path().join("r");
    let mut child = Child::spawn(tmp.path(), &args(&["--steps", "100000", "--run-dir", "r"]), "r");
    wait_for_steps(&run_dir, 20, &child);
    child.signal(libc::SIGTERM);
    let status = child.wait(Duration::from_secs(60));
    let err = child.stderr();
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    let (step, _, _) = newest_checkpoint(&run_dir);
    assert_eq!(train_steps_logged(&run_dir), step as usize);
}

#[test]
fn a_run_directory_serves_one_process_at_a_time() {
    let tmp = TempDir::new("cli-lock");
    let run_dir = tmp.path().join("r");
    let mut first = Child::spawn(tmp.path(), &args(&["--steps", "100000", "--run-dir", "r"]), "first");
    wait_for_steps(&run_dir, 5, &first);
    let (status, _, err) = run(tmp.path(), &args(&["--run-dir", "r"]), Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("is in use by another semoe process (pid"), "{err}");
    let (status, _, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "r"],
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("is in use"), "{err}");
    let (status, out, _) = run(tmp.path(), &["runs", "--dir", "."], Duration::from_secs(60));
    assert!(status.success());
    assert!(
        out.lines().any(|l| l.starts_with("r ") && l.ends_with("running")),
        "{out}"
    );
    first.signal(libc::SIGINT);
    assert_eq!(
        first.wait(Duration::from_secs(60)).code(),
        Some(130),
        "{}",
        first.stderr()
    );
    // The first run's log holds its own steps only.
    let (step, _, _) = newest_checkpoint(&run_dir);
    assert_eq!(train_steps_logged(&run_dir), step as usize);
}

#[test]
fn a_new_run_never_takes_over_a_folder_of_other_files_or_a_finished_run() {
    let tmp = TempDir::new("cli-take-over");
    let proj = tmp.path().join("proj");
    std::fs::create_dir_all(proj.join("tiers")).expect("proj");
    std::fs::write(proj.join("config.toml"), "# my notes\n").expect("config");
    std::fs::write(proj.join("tiers/keep.txt"), "mine").expect("a file of the user's");
    let (status, _, err) = run(tmp.path(), &args(&["--run-dir", "proj"]), Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not empty and is not a semoe run (config.toml, tiers)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(proj.join("config.toml")).expect("config"),
        "# my notes\n"
    );
    assert!(proj.join("tiers/keep.txt").is_file(), "the tiers folder was removed");
    assert!(!proj.join(".lock").exists() && !proj.join("metrics.jsonl").exists());

    // `semoe chaos` into a finished training run: refused, the run's checkpoint untouched.
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "3", "--run-dir", "r"]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    let before = newest_checkpoint(&tmp.path().join("r"));
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/torn-checkpoints.toml");
    let scenario = scenario.to_str().expect("a UTF-8 path");
    let (status, _, err) = run(
        tmp.path(),
        &["chaos", "--scenario", scenario, "--run-dir", "r", "--steps", "8"],
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(4), "no verdict: {err}");
    assert!(err.contains("already holds a run with checkpoints"), "{err}");
    assert_eq!(newest_checkpoint(&tmp.path().join("r")), before);
}

/// The time budget's measurement runs beside the run (on its disk), not in the system's temporary
/// directory: here `TMPDIR` is a file, where nothing can be written.
#[test]
fn the_time_budget_is_measured_beside_the_run_not_in_tmp() {
    let tmp = TempDir::new("cli-budget");
    let not_a_dir = tmp.path().join("tmp-is-a-file");
    std::fs::write(&not_a_dir, "").expect("a file");
    let (status, _, err) = run_with_env(
        tmp.path(),
        &args(&["--time-budget", "3", "--run-dir", "runs/r"]),
        &[("TMPDIR", &not_a_dir)],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(err.contains("time budget 3s: measured"), "{err}");
    // The run also stops at the budget, less its last evaluation and checkpoint: recorded as its
    // time limit.
    assert!(err.contains("training stops at "), "{err}");
    let config = std::fs::read_to_string(tmp.path().join("runs/r/config.toml")).expect("config");
    let limit: f64 = config
        .lines()
        .find_map(|l| l.strip_prefix("time_limit_s = "))
        .and_then(|v| v.parse().ok())
        .expect("a time limit");
    assert!(limit > 1.5 && limit <= 3.0, "{config}");
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("runs"))
        .expect("runs")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, ["r"], "the scratch run was not removed");
}

/// `--steps N` with a config file that holds a time budget (a run's recorded config holds the
/// main job's) runs N steps, saying that the budget is not applied; `--time-budget` beside them
/// still fits the steps in it.
#[test]
fn steps_given_beside_a_config_files_time_budget_are_run_in_full() {
    let tmp = TempDir::new("cli-steps-budget");
    let (status, out, err) = run(tmp.path(), &args(&["--print-config"]), Duration::from_secs(60));
    assert!(status.success(), "{err}");
    let file = tmp.path().join("budget.toml");
    let with_budget = out.replace("time_budget_s = 0.0", "time_budget_s = 3.0");
    assert_ne!(with_budget, out, "the printed config names its budget: {out}");
    std::fs::write(&file, with_budget).expect("config file");
    let file = file.to_str().expect("a UTF-8 path");
    let (status, _, err) = run(
        tmp.path(),
        &["train", "--config", file, "--steps", "4", "--run-dir", "fixed"],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(
        err.contains("--steps 4 runs 4 steps: the config file's train.time_budget_s (3 s) is not applied"),
        "{err}"
    );
    assert!(!err.contains("time budget 3s: measured"), "{err}");
    assert_eq!(train_steps_logged(&tmp.path().join("fixed")), 4);
    // Resumed with the same file: its budget (and the 5,000 steps the budget would have fitted)
    // do not replace the run's 4 steps, which fix its learning-rate schedule.
    let (status, _, err) = run(
        tmp.path(),
        &[
            "train",
            "--resume",
            "--run-dir",
            "fixed",
            "--config",
            file,
            "--time-limit",
            "5",
        ],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(
        err.contains("the config file's train.steps (5000) is not applied: the run keeps its 4 steps"),
        "{err}"
    );
    assert_eq!(train_steps_logged(&tmp.path().join("fixed")), 4, "{err}");
    let (status, _, err) = run(
        tmp.path(),
        &[
            "train",
            "--config",
            file,
            "--steps",
            "4",
            "--time-budget",
            "3",
            "--run-dir",
            "fitted",
        ],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(err.contains("time budget 3s: measured"), "{err}");
}

/// Ctrl-C while the time budget is measured stops the measurement (it used to kill the process
/// and leave the scratch run, a checkpoint, in a run directory nobody would resume).
#[test]
fn a_signal_while_the_time_budget_is_measured_stops_it_and_leaves_nothing() {
    let tmp = TempDir::new("cli-budget-signal");
    // Slower steps than TINY's, so that the measurement is still running when the signal lands.
    let slow = [
        "train",
        "--d-model",
        "64",
        "--layers",
        "2",
        "--heads",
        "2",
        "--d-ff",
        "128",
        "--experts",
        "4",
        "--block-size",
        "128",
        "--batch",
        "16",
        "--groups",
        "2",
        "--threads",
        "1",
        "--sample-tokens",
        "0",
        "--time-budget",
        "600",
        "--run-dir",
        "runs/r",
    ];
    let mut child = Child::spawn(tmp.path(), &slow, "run");
    let run_dir = tmp.path().join("runs/r");
    let deadline = Instant::now() + Duration::from_secs(60);
    let measuring = || {
        std::fs::read_dir(&run_dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".semoe-calibration-"))
        })
    };
    while !measuring() {
        assert!(
            child.child.try_wait().expect("try_wait").is_none(),
            "semoe exited before measuring; stderr:\n{}",
            child.stderr()
        );
        assert!(
            Instant::now() < deadline,
            "no measurement began; stderr:\n{}",
            child.stderr()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.signal(libc::SIGINT);
    let status = child.wait(Duration::from_secs(60));
    let err = child.stderr();
    assert_eq!(status.code(), Some(130), "exit code after Ctrl-C; stderr:\n{err}");
    assert!(
        err.contains("stopped by Ctrl-C (SIGINT) while measuring the time budget: nothing was trained"),
        "{err}"
    );
    assert!(!run_dir.exists(), "the run directory the measurement made is removed");
}

#[test]
fn a_run_whose_directory_is_removed_stops_with_an_error() {
    let tmp = TempDir::new("cli-removed");
    let run_dir = tmp.path().join("r");
    let mut child = Child::spawn(tmp.path(), &args(&["--steps", "1000000", "--run-dir", "r"]), "run");
    wait_for_steps(&run_dir, 5, &child);
    // Moved away in one step (a removal could race the run's next checkpoint), then removed.
    let gone = tmp.path().join("gone");
    std::fs::rename(&run_dir, &gone).expect("move the run directory away");
    std::fs::remove_dir_all(&gone).expect("remove the run directory");
    let status = child.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", child.stderr());
    assert!(
        child
            .stderr()
            .contains("was removed or replaced while the run was writing it"),
        "{}",
        child.stderr()
    );
}

#[test]
fn default_run_directories_never_collide_and_failed_starts_leave_none() {
    let tmp = TempDir::new("cli-names");
    let mut children: Vec<Child> = (0..3)
        .map(|i| Child::spawn(tmp.path(), &args(&["--steps", "3"]), &format!("c{i}")))
        .collect();
    for c in &mut children {
        let status = c.wait(Duration::from_secs(120));
        assert!(status.success(), "{}", c.stderr());
    }
    let mut names: Vec<String> = std::fs::read_dir(tmp.path().join("runs"))
        .expect("runs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    for n in &names {
        assert!(n.starts_with("run-2"), "{n}");
        assert!(tmp.path().join("runs").join(n).join("checkpoints").is_dir(), "{n}");
    }

    // A start that fails (no such data file) leaves no directory: with the time budget's
    // measurement, and without it (--steps).
    for extra in [&[][..], &["--steps", "3"][..]] {
        let mut flags = vec!["--data", "no-such-file.txt"];
        flags.extend_from_slice(extra);
        let (status, _, err) = run(tmp.path(), &args(&flags), Duration::from_secs(60));
        assert_eq!(status.code(), Some(1));
        assert!(err.contains("no-such-file.txt"), "{err}");
        let count = std::fs::read_dir(tmp.path().join("runs")).expect("runs").count();
        assert_eq!(count, 3, "the failed start ({flags:?}) left a directory");
    }
    // Nor does one that fails after the time budget's measurement made the --run-dir named (fewer
    // worker processes joined than it waits for).
    let flags = [
        "--time-budget",
        "2",
        "--run-dir",
        "fresh",
        "--processes",
        "2",
        "--min-workers",
        "3",
        "--join-wait",
        "1",
    ];
    let (status, _, err) = run(tmp.path(), &args(&flags), Duration::from_secs(120));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("measured") && err.contains("of 3 workers joined"), "{err}");
    assert!(
        !tmp.path().join("fresh").exists(),
        "the failed start left its --run-dir"
    );
    // What worker processes need of this machine and its files is refused before the
    // measurement, not after it: a missing job identity, an address that cannot be bound (a
    // documentation address, of no machine).
    for (flag, value) in [("--identity", "no-such-identity"), ("--listen", "192.0.2.1:0")] {
        let flags = [
            "--time-budget",
            "2",
            "--run-dir",
            "fresh",
            "--processes",
            "2",
            flag,
            value,
        ];
        let (status, _, err) = run(tmp.path(), &args(&flags), Duration::from_secs(120));
        assert_eq!(status.code(), Some(1), "{flag}: {err}");
        assert!(err.contains(value) && !err.contains("measured"), "{flag}: {err}");
        assert!(
            !tmp.path().join("fresh").exists(),
            "{flag}: the refused start left its --run-dir"
        );
    }
}

#[test]
fn a_run_trained_from_a_pipe_is_refused_the_pipe_again_not_hung() {
    let tmp = TempDir::new("cli-pipe");
    let text: String = (0..400)
        .map(|i| format!("line {i} of a text read from a pipe\n"))
        .collect();
    std::fs::write(tmp.path().join("text.txt"), &text).expect("text");
    // A shell's process substitution (`/dev/fd/N`) and a named pipe, each written once.
    let mut line = format!("'{SEMOE}' train");
    for a in args(&["--steps", "3", "--run-dir", "subst"]).iter().skip(1) {
        line.push_str(&format!(" '{a}'"));
    }
    line.push_str(" --data <(cat text.txt)");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&line)
        .current_dir(tmp.path())
        .output()
        .expect("bash");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = std::fs::read_to_string(tmp.path().join("subst/config.toml")).expect("config");
    assert!(config.contains("/dev/fd/"), "{config}");

    let fifo = tmp.path().join("fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("path")).expect("c path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let writer = {
        let (fifo, text) = (fifo.clone(), text.clone());
        std::thread::spawn(move || std::fs::write(fifo, text))
    };
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "3", "--run-dir", "named", "--data", "fifo"]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    writer.join().expect("the writer").expect("written");

    for run_dir in ["subst", "named"] {
        let (status, _, err) = run(
            tmp.path(),
            &["train", "--resume", "--run-dir", run_dir, "--steps", "5"],
            Duration::from_secs(60),
        );
        assert_eq!(status.code(), Some(1), "{run_dir}: {err}");
        assert!(
            err.contains("which cannot be read again: give --data FILE"),
            "{run_dir}: {err}"
        );
        let (status, _, err) = run(tmp.path(), &["eval", "--checkpoint", run_dir], Duration::from_secs(60));
        assert_eq!(status.code(), Some(1), "{run_dir}: {err}");
        assert!(err.contains("which cannot be read again"), "{run_dir}: {err}");
        // The same text as a file resumes it.
        let (status, _, err) = run(
            tmp.path(),
            &[
                "train",
                "--resume",
                "--run-dir",
                run_dir,
                "--steps",
                "5",
                "--data",
                "text.txt",
            ],
            Duration::from_secs(60),
        );
        assert!(status.success(), "{run_dir}: {err}");
    }
}

#[test]
fn progress_lines_without_a_terminal() {
    let tmp = TempDir::new("cli-progress");
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "40", "--eval-every", "20", "--run-dir", "r"]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("step     1/40") && l.contains("ETA")),
        "{err}"
    );
    let evals = err
        .lines()
        .filter(|l| l.contains("val loss") && l.contains("tokens/s"))
        .count();
    assert_eq!(evals, 2, "{err}");
    let done = err.lines().find(|l| l.starts_with("done:")).expect("summary line");
    assert!(
        done.contains("40 of 40 steps") && done.contains("validation loss") && done.contains("at step 40"),
        "{done}"
    );
    assert!(done.contains("mean train loss of the last 40 steps"), "{done}");

    // Resuming a finished run says so and appends nothing; nothing to drop, so the log is not
    // even rewritten (the same file: a rewrite would need its size in free disk space).
    use std::os::unix::fs::MetadataExt;
    let inode = || {
        std::fs::metadata(tmp.path().join("r/metrics.jsonl"))
            .expect("log")
            .ino()
    };
    let before = inode();
    let log = std::fs::read(tmp.path().join("r/metrics.jsonl")).expect("log");
    let (status, _, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "r"],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(err.contains("is already finished: 40 of 40 steps"), "{err}");
    assert_eq!(std::fs::read(tmp.path().join("r/metrics.jsonl")).expect("log"), log);
    assert_eq!(inode(), before, "the log was rewritten");
    // Nor does asking for fewer steps than it ran: its config still says 40.
    let config = std::fs::read_to_string(tmp.path().join("r/config.toml")).expect("config");
    let (status, _, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "r", "--steps", "10", "--threads", "2"],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(err.contains("is already finished"), "{err}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("r/config.toml")).expect("config"),
        config,
        "a finished run's config was rewritten"
    );

    // Flags a resumed run would ignore are refused, as on a fresh start, the config untouched.
    let refused: &[(&[&str], &str)] = &[
        (&["--time-budget", "60"], "a resumed run keeps its steps"),
        (
            &["--snapshot-every", "5"],
            "--snapshot-every applies to a run over worker processes",
        ),
        (
            &["--metrics-addr", "127.0.0.1:0", "--workers", "0"],
            "--metrics-addr serves the actor runtime's",
        ),
    ];
    for (extra, want) in refused {
        let mut line = vec!["train", "--resume", "--run-dir", "r"];
        line.extend_from_slice(extra);
        let (status, _, err) = run(tmp.path(), &line, Duration::from_secs(60));
        assert_eq!(status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("r/config.toml")).expect("config"),
        config
    );
    // A config file's time budget does not apply to a resumed run (its steps are fixed), so it is
    // neither reported as a change nor recorded.
    assert!(config.contains("time_budget_s = "), "{config}");
    let budget_line = config
        .lines()
        .find(|l| l.starts_with("time_budget_s = "))
        .expect("the budget's line");
    std::fs::write(
        tmp.path().join("budget.toml"),
        config.replace(budget_line, "time_budget_s = 600.0"),
    )
    .expect("config file");
    let (status, _, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "r", "--config", "budget.toml"],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(
        err.contains("notice: the config file's train.time_budget_s (600 s) is not applied")
            && !err.contains("resume changes train.time_budget_s"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("r/config.toml")).expect("config"),
        config
    );

    // `semoe chaos` refuses the training flags it would ignore.
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/flaky-actors.toml");
    let scenario = scenario.to_str().expect("a UTF-8 path");
    for flag in [
        &["--quiet"][..],
        &["--eval-every", "5"],
        &["--time-limit", "10"],
        &["--sample-tokens", "5"],
        &["--device", "cpu"],
    ] {
        let mut line = vec!["chaos", "--scenario", scenario, "--run-dir", "chaos"];
        line.extend_from_slice(flag);
        let (status, _, err) = run(tmp.path(), &line, Duration::from_secs(60));
        assert_eq!(status.code(), Some(4), "{flag:?}: {err}");
        assert!(err.contains(&format!("{} does not apply", flag[0])), "{flag:?}: {err}");
    }
    assert!(!tmp.path().join("chaos").exists());
}

#[test]
fn resume_refuses_flags_that_change_the_bits_and_applies_the_others() {
    let tmp = TempDir::new("cli-resume-flags");
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "20", "--run-dir", "r", "--time-limit", "0.001"]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{err}");
    assert!(err.contains("time limit of 0.001 s reached: ran"), "{err}");
    let (status, _, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "r", "--lr", "0.01", "--experts", "8"],
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(1));
    assert!(
        err.contains("--resume cannot change") && err.contains("optimizer.lr") && err.contains("model.experts"),
        "{err}"
    );
    let (status, out, err) = run(
        tmp.path(),
        &[
            "train",
            "--resume",
            "--run-dir",
            "r",
            "--workers",
            "2",
            "--print-config",
        ],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(out.contains("workers = 2"), "{out}");
    // A config file changes what it names; the rest stays the run's (its model, given by flags at
    // the start, and its time limit), not the defaults.
    std::fs::write(tmp.path().join("partial.toml"), "[train]\nworkers = 2\n").expect("config file");
    let (status, out, err) = run(
        tmp.path(),
        &[
            "train",
            "--resume",
            "--run-dir",
            "r",
            "--config",
            "partial.toml",
            "--print-config",
        ],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(
        out.contains("workers = 2") && out.contains("time_limit_s = 0.001"),
        "{out}"
    );
    // A config printed for editing holds no time budget: run with --steps N, it runs N steps.
    let (status, out, err) = run(tmp.path(), &["train", "--print-config"], Duration::from_secs(60));
    assert!(status.success(), "{err}");
    assert!(out.contains("time_budget_s = 0.0"), "{out}");
    // The recorded time limit can be lifted.
    let (status, _, err) = run(
        tmp.path(),
        &[
            "train",
            "--resume",
            "--run-dir",
            "r",
            "--time-limit",
            "0",
            "--workers",
            "2",
        ],
        Duration::from_secs(120),
    );
    assert!(status.success(), "{err}");
    assert!(
        err.contains("warning: resume changes train.workers (run: 1, asked: 2)"),
        "{err}"
    );
    assert!(err.contains("20 of 20 steps"), "{err}");
}

#[test]
fn bad_input_gets_clear_messages() {
    let tmp = TempDir::new("cli-bad-input");
    let cases: &[(&[&str], &str)] = &[
        (&["train", "--threads", "100000"], "train.threads (100000)"),
        (
            &["generate", "--checkpoint", "x", "--temperature", "-1"],
            "--temperature must be a non-negative number",
        ),
        (
            &["generate", "--checkpoint", "x", "--prompt", "a\\q"],
            "unknown escape \\q",
        ),
        (
            &[
                "serve",
                "--checkpoint",
                "x",
                "--max-connections",
                "18446744073709551615",
            ],
            "serve: max_connections must be at most 1048576",
        ),
        (&["bench", "moe-layer", "--iters", "0"], "must be at least 1"),
        (
            // Dropless keeps every assignment: a capacity factor would be ignored.
            &["bench", "moe-layer", "--dropless", "--capacity-factor", "2"],
            "'--dropless' cannot be used with '--capacity-factor",
        ),
        (&["bench", "recovery", "--kill-after", "0"], "must be at least 1"),
        (&["bench", "generate", "--rounds", "0"], "must be at least 1"),
        (&["bench", "generate", "--tokens", "0"], "must be at least 1"),
        (&["bench", "generate", "--recompute-tokens", "0"], "must be at least 1"),
        (&["bench", "generate", "--batch", "1,0"], "must be at least 1"),
        (&["bench", "ring", "--tokens", "0"], "must be at least 1"),
        (&["bench", "ring", "--batch", "0"], "must be at least 1"),
        (&["bench", "storage", "--steps", "0"], "must be at least 1"),
        (
            &["bench", "storage", "--io-threads", "0"],
            "--io-threads must be between 1 and 256, got 0",
        ),
        (
            &["train", "--time-limit", "-1"],
            "train.time_limit_s (--time-limit) must be a non-negative",
        ),
        (&["train", "--placement", "x"], "train.placement (--placement) must be"),
        (
            &["train", "--layers", "100000"],
            "model.n_layer (100000) must be at most 65536",
        ),
        (
            &[
                "train",
                "--experts",
                "10000000",
                "--d-model",
                "1048576",
                "--heads",
                "1",
                "--d-ff",
                "1048576",
            ],
            "is too large for the experts' weights",
        ),
        (&["bench", "runtime", "--steps", "0"], "must be at least 1"),
        (
            // Collectives chosen for no engine: the bench would measure without them.
            &["bench", "runtime", "--collective", "sim"],
            "give one of them (e.g. --collective-workers 2)",
        ),
        (
            &["bench", "storage", "--batch", "6"],
            "--batch 6 must be a positive multiple of the bench's 4 routing groups",
        ),
        (
            &["bench", "ring", "--d-model", "100"],
            "--d-model 100 must be a positive multiple of the bench's 8 attention heads",
        ),
        (
            // About 137 GB of experts per block: refused before anything is allocated.
            &[
                "bench",
                "ring",
                "--d-model",
                "1024",
                "--d-ff",
                "8192",
                "--experts",
                "4096",
                "--layers",
                "8",
            ],
            "the initialised model takes",
        ),
        (
            // The shape flags describe the model the bench initialises, not a given checkpoint.
            &["bench", "ring", "--checkpoint", "x", "--experts", "8"],
            "cannot be used with",
        ),
        (
            &["bench", "cache-policy", "--checkpoint", "x", "--steps", "0"],
            "must be at least 1",
        ),
        (
            &["bench", "moe-layer", "--device", "cuda", "--threads", "4"],
            "--threads 4 sets the CPU's compute threads; --device cuda computes on the GPU",
        ),
        (
            &["bench", "moe-layer", "--precision", "bf16"],
            "--precision bf16 applies to the GPU's products (--device cuda)",
        ),
        (
            &["bench", "recovery", "--processes", "100000"],
            "train.processes (100000) is more than this machine can run",
        ),
        (
            &["bench", "matmul", "--size", "5000000000"],
            "--size 5000000000 needs about",
        ),
        (
            &["bench", "moe-layer", "--tokens", "100000000000"],
            "--tokens 100000000000 at this layer's size needs about",
        ),
        (
            &["eval", "--checkpoint", "nowhere"],
            "neither a checkpoint nor a run directory",
        ),
        (
            &["generate", "--checkpoint", "x", "--device-budget", "12 parsecs"],
            "--device-budget",
        ),
        (
            &[
                "generate",
                "--checkpoint",
                "x",
                "--device-budget",
                "1MiB",
                "--prefetch",
                "sometimes",
            ],
            "prefetch must be routed, whole-block or on-demand",
        ),
        (
            &["generate", "--checkpoint", "x", "--prefetch", "whole-block"],
            "--prefetch sets up ring-memory inference",
        ),
        (
            &[
                "generate",
                "--checkpoint",
                "x",
                "--batch",
                "2",
                "--tokens",
                "1000000000",
            ],
            "--batch 2 with --tokens 1000000000 holds 1.86 GiB of samples until all are done (at most 1.00 GiB)",
        ),
    ];
    for (argv, want) in cases {
        let (status, out, err) = run(tmp.path(), argv, Duration::from_secs(60));
        assert!(!status.success(), "{argv:?} succeeded: {out}");
        assert!(err.contains(want), "{argv:?}: {err}");
    }
}

/// Values a config file or the command line may hold that used to panic, abort on an allocation,
/// wrap around, or fail only after the whole run: each is refused at once, by name, and leaves no
/// run directory.
#[test]
fn absurd_values_are_refused_before_anything_starts() {
    let tmp = TempDir::new("cli-absurd");
    let files: &[(&str, &str, &str)] = &[
        (
            "deadline.toml",
            "[train]\ndeadline_s = 1e20\n",
            "train.deadline_s must be a positive number of seconds up to 86400",
        ),
        (
            "join-wait.toml",
            "[train]\nprocesses = 1\njoin_wait_s = 0.0\n",
            "train.join_wait_s must be a positive number of seconds up to 86400",
        ),
        (
            "vocab.toml",
            "[model]\nvocab = 300\n",
            "model.vocab must be at most 256",
        ),
        (
            "small-vocab.toml",
            "[model]\nvocab = 64\n",
            "model.vocab is 64, but the text",
        ),
        (
            "fraction.toml",
            "[train]\nval_fraction = 5.0\n",
            "train.val_fraction must be between 0 and 1",
        ),
        (
            "windows.toml",
            "[train]\neval_windows = 1000000000000\n",
            "train.eval_windows must be between 1 and 1048576",
        ),
        // Settings that would be ignored without a word.
        (
            "io-threads.toml",
            "[storage]\nio_threads = 2\n",
            "storage.io_threads applies only with storage.device_budget",
        ),
        (
            "identity.toml",
            "[train]\nidentity = \"/secrets/job\"\n",
            "train.identity applies to a run over worker processes",
        ),
    ];
    for (name, text, want) in files {
        std::fs::write(tmp.path().join(name), text).expect("config");
        let (status, _, err) = run(
            tmp.path(),
            // No sample: the default prompt is outside a vocabulary of 64 too.
            &["train", "--config", name, "--run-dir", "r", "--sample-tokens", "0"],
            Duration::from_secs(60),
        );
        assert_eq!(status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
    }
    let cases: &[(&[&str], &str)] = &[
        (
            &["train", "--sample-prompt", "a\\q", "--run-dir", "r"],
            "unknown escape \\q",
        ),
        (
            &[
                "train",
                "--d-model",
                "2",
                "--heads",
                "1",
                "--d-ff",
                "4611686018427387904",
                "--run-dir",
                "r",
            ],
            "is too large for the experts' weights",
        ),
        (
            &["train", "--snapshot-every", "5", "--run-dir", "r"],
            "--snapshot-every applies to a run over worker processes",
        ),
        (
            &["train", "--join-wait", "5", "--run-dir", "r"],
            "--join-wait applies to a run over worker processes",
        ),
        (
            &["train", "--workers", "0", "--placement", "blocked", "--run-dir", "r"],
            "--placement places experts on the actor runtime's workers",
        ),
        (
            &["train", "--processes", "2", "--workers", "3", "--run-dir", "r"],
            "--workers sets the in-process workers; a run over worker processes has one worker per process",
        ),
        (
            &["train", "--device", "cuda", "--workers", "1", "--run-dir", "r"],
            "--workers applies to the actor runtime on the CPU; --device cuda trains the plain loop",
        ),
        (
            &["train", "--device", "cuda", "--cache-policy", "lru", "--run-dir", "r"],
            "--cache-policy applies to the actor runtime on the CPU; --device cuda trains the plain loop",
        ),
        (
            &[
                "train",
                "--config",
                "vocab-128.toml",
                "--sample-prompt",
                "café",
                "--run-dir",
                "r",
            ],
            "--sample-prompt holds byte 195, outside the model's vocabulary of 128",
        ),
    ];
    let cases_of_files: &[(&[&str], &str)] = &[
        (
            &["train", "--workers", "2000", "--run-dir", "r"],
            "train.workers (2000) is more than the 1024 in-process workers accepted",
        ),
        (
            &["train", "--config", "/dev/zero", "--run-dir", "r"],
            "the config file /dev/zero is not a regular file",
        ),
        (
            &["train", "--data", "fifo", "--run-dir", "r"],
            "--data fifo is a pipe, which can be read once",
        ),
        (
            &[
                "train",
                "--data",
                "fifo",
                "--steps",
                "3",
                "--processes",
                "2",
                "--run-dir",
                "r",
            ],
            "each worker process reads it",
        ),
    ];
    let fifo = std::ffi::CString::new(tmp.path().join("fifo").to_str().expect("path")).expect("c path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    std::fs::write(tmp.path().join("vocab-128.toml"), "[model]\nvocab = 128\n").expect("config");
    for (extra, want) in cases.iter().chain(cases_of_files) {
        let (status, _, err) = run(tmp.path(), extra, Duration::from_secs(60));
        assert_eq!(status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    assert!(!tmp.path().join("r").exists(), "a refused start left its run directory");
    let (status, out, err) = run(tmp.path(), &["runs", "--dir", "nowhere"], Duration::from_secs(60));
    assert!(status.success(), "{err}");
    assert!(out.contains("no runs under nowhere: it does not exist"), "{out}");

    // A checkpoint, then sizes that would abort generation and evaluation on their allocation.
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "2", "--run-dir", "c"]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    let (status, _, err) = run(
        tmp.path(),
        // No tokens: nothing held, so the batch reaches the key/value cache's check.
        &[
            "generate",
            "--checkpoint",
            "c",
            "--batch",
            "100000000000",
            "--tokens",
            "0",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("a batch of 100000000000 needs"), "{err}");
    let (status, _, err) = run(
        tmp.path(),
        &["eval", "--checkpoint", "c", "--windows", "100000000000"],
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("--windows must be between 1 and 1048576"), "{err}");
    // The evaluation's result is its only output: one that cannot be written is a failure.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = Command::new(SEMOE)
        .args(["eval", "--checkpoint", "c", "--windows", "4"])
        .current_dir(tmp.path())
        .stdout(full)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("eval");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write the evaluation's result"), "{err}");
}

/// Spawn semoe with stdout and stderr pipes whose readers are gone at once (`2>&1 | head -1`
/// that already exited), and wait for it.
fn run_with_closed_pipes(cwd: &Path, args: &[&str], limit: Duration) -> ExitStatus {
    let mut child = Command::new(SEMOE)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn semoe");
    drop(child.stdout.take());
    drop(child.stderr.take());
    let mut guard = Child {
        child,
        stderr_path: cwd.join("unused"),
    };
    guard.wait(limit)
}

#[test]
fn a_run_whose_output_nobody_reads_still_finishes_and_saves() {
    let tmp = TempDir::new("cli-closed-stderr");
    let status = run_with_closed_pipes(
        tmp.path(),
        &args(&["--steps", "30", "--eval-every", "10", "--run-dir", "r"]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "exit {status:?}");
    assert_eq!(newest_checkpoint(&tmp.path().join("r")).0, 30);
    assert_eq!(train_steps_logged(&tmp.path().join("r")), 30);
    let status = run_with_closed_pipes(tmp.path(), &["runs", "--dir", "."], Duration::from_secs(60));
    assert!(status.success(), "runs: exit {status:?}");

    // A config that no longer parses plans no known step count (it used to read as 30/0 finished).
    std::fs::write(tmp.path().join("r/config.toml"), "[train\n").expect("spoil the config");
    let (status, out, err) = run(tmp.path(), &["runs", "--dir", "."], Duration::from_secs(60));
    assert!(status.success(), "{err}");
    let line = out.lines().find(|l| l.starts_with("r ")).expect("the run's line");
    assert!(
        line.contains("30/?") && line.ends_with("config.toml unreadable"),
        "{line}"
    );
}

#[test]
fn generate_into_a_closed_pipe_ends_quietly() {
    let tmp = TempDir::new("cli-pipe");
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "2", "--run-dir", "r"]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    let stderr_path = tmp.path().join("generate.stderr");
    let child = Command::new(SEMOE)
        .args([
            "generate",
            "--checkpoint",
            "r",
            "--tokens",
            "100000",
            "--prompt",
            "A\\tB\\\\n",
        ])
        .current_dir(tmp.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn");
    // Killed and reaped if the test fails from here on.
    let mut guard = Child { child, stderr_path };
    let mut stdout = guard.child.stdout.take().expect("stdout");
    // The first bytes, read on a thread of their own so that the wait is bounded; the pipe closes
    // when that thread ends.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = [0u8; 5];
        let _ = tx.send(stdout.read_exact(&mut first).map(|()| first));
    });
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no output within 60 s; stderr:\n{}", guard.stderr()))
        .expect("read the first bytes");
    assert_eq!(&first[..4], b"A\tB\\", "escapes in the prompt");
    let status = guard.wait(Duration::from_secs(60));
    let err = guard.stderr();
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(!err.contains("Broken pipe"), "{err}");
}

#[test]
fn generate_through_the_ring_prints_what_resident_generation_prints() {
    let tmp = TempDir::new("cli-ring");
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "2", "--run-dir", "r"]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    let sample = |extra: &[&str]| {
        let mut argv = vec![
            "generate",
            "--checkpoint",
            "r",
            "--tokens",
            "80",
            "--seed",
            "3",
            "--batch",
            "2",
        ];
        argv.extend_from_slice(extra);
        let (status, out, err) = run(tmp.path(), &argv, Duration::from_secs(60));
        (status.success(), out, err)
    };
    let (ok, resident, err) = sample(&[]);
    assert!(ok, "{err}");
    assert_eq!(resident.matches("--- sample").count(), 2, "{resident}");
    let (ok, ring, err) = sample(&["--device-budget", "300KiB", "--host-budget", "100KiB"]);
    assert!(ok, "{err}");
    assert_eq!(ring, resident, "the ring prints the same samples");
    assert!(err.contains("ring: ") && err.contains("peak resident memory"), "{err}");
    // A batch whose key/value cache exceeds --kv-budget is refused, naming what fits.
    let (ok, _, err) = sample(&["--kv-budget", "1KiB"]);
    assert!(
        !ok && err.contains("--kv-budget") && err.contains("0 sequence(s)"),
        "{err}"
    );
    // One sequence of no bytes: the prompt on a line of its own, through the ring as without it
    // (the ring printed no newline); a Host budget of zero, however written, sets up no ring.
    let none = |extra: &[&str]| {
        let mut argv = vec!["generate", "--checkpoint", "r", "--tokens", "0", "--prompt", "Hi"];
        argv.extend_from_slice(extra);
        let (status, out, err) = run(tmp.path(), &argv, Duration::from_secs(60));
        assert!(status.success(), "{argv:?}: {err}");
        out
    };
    assert_eq!(none(&[]), "Hi\n");
    assert_eq!(none(&["--device-budget", "300KiB"]), "Hi\n");
    assert_eq!(none(&["--host-budget", "0B"]), "Hi\n");
    assert_eq!(none(&["--host-budget", "0 MiB"]), "Hi\n");
}

#[test]
fn eval_reports_the_loss_of_a_checkpoint_on_any_text() {
    let tmp = TempDir::new("cli-eval");
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "5", "--run-dir", "r"]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    std::fs::write(
        tmp.path().join("t.txt"),
        "To be, or not to be: that is the question.\n".repeat(20),
    )
    .expect("text");
    let (status, out, err) = run(
        tmp.path(),
        &["eval", "--checkpoint", "r", "--data", "t.txt"],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    let loss: f64 = out
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .expect("a loss");
    assert!(loss > 0.5 && loss < 6.0, "{out}");
    assert!(out.contains("windows of 16") && out.contains("(step 5)"), "{out}");
    let (status, out, err) = run(tmp.path(), &["eval", "--checkpoint", "r"], Duration::from_secs(60));
    assert!(status.success(), "{err}");
    assert!(
        out.contains("the validation split of bundled Shakespeare corpus") && !out.contains("changed"),
        "{out}"
    );
    // A run on a text that has changed since: its validation split is said to be of another text.
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "2", "--run-dir", "d", "--data", "t.txt"]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    let (status, out, err) = run(tmp.path(), &["eval", "--checkpoint", "d"], Duration::from_secs(60));
    assert!(
        status.success() && !out.contains("changed") && !err.contains("notice"),
        "{out}{err}"
    );
    std::fs::write(
        tmp.path().join("t.txt"),
        "Whether 'tis nobler in the mind to suffer.\n".repeat(20),
    )
    .expect("text");
    let (status, out, err) = run(tmp.path(), &["eval", "--checkpoint", "d"], Duration::from_secs(60));
    assert!(status.success(), "{err}");
    assert!(out.contains("t.txt (a changed text)"), "{out}");
    assert!(
        err.contains("notice: the training text") && err.contains("is not the text checkpoint"),
        "{err}"
    );
    // A manifest whose recorded config splits the batch into no groups (edited by hand, without
    // its own digest): an error naming the field, not a division by zero.
    let ckpt = semoe::storage::checkpoint::latest(&tmp.path().join("d"))
        .expect("list checkpoints")
        .expect("a checkpoint");
    let path = ckpt.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("json");
    manifest["extra"]["config"]["train"]["groups"] = 0.into();
    manifest.as_object_mut().expect("an object").remove("manifest_sha256");
    std::fs::write(&path, serde_json::to_vec(&manifest).expect("json")).expect("write manifest");
    let (status, _, err) = run(tmp.path(), &["eval", "--checkpoint", "d"], Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("train.batch") && err.contains("train.groups (0)") && !err.contains("panicked"),
        "{err}"
    );
    // A text holding a byte outside a small model's vocabulary: an error naming the byte and the
    // file, not a failure deep inside the model.
    std::fs::write(tmp.path().join("vocab-128.toml"), "[model]\nvocab = 128\n").expect("config");
    let mut small = args(&["--steps", "2", "--run-dir", "v"]);
    small.extend_from_slice(&["--config", "vocab-128.toml"]);
    let (status, _, err) = run(tmp.path(), &small, Duration::from_secs(60));
    assert!(status.success(), "{err}");
    std::fs::write(tmp.path().join("accents.txt"), "Un café, s'il vous plaît.\n".repeat(20)).expect("text");
    let (status, _, err) = run(
        tmp.path(),
        &["eval", "--checkpoint", "v", "--data", "accents.txt"],
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("model.vocab is 128, but --data accents.txt holds byte 195 at offset 6")
            && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn help_shows_every_default_and_the_file_only_settings() {
    let tmp = TempDir::new("cli-help");
    let (status, out, err) = run(tmp.path(), &["train", "--help"], Duration::from_secs(60));
    assert!(status.success(), "{err}");
    for want in [
        "[default: 5000]",
        "[default: 1337]",
        "[default: round-robin]",
        "[default: 0.003]",
        "Settings without a flag are set in the --config file",
        "optimizer.min_lr",
        "drop_page_cache, io_threads",
        "a second Ctrl-C stops at once",
    ] {
        assert!(out.contains(want), "--help lacks {want:?}:\n{out}");
    }
    // Every flag of the config's train settings has a default shown or a default of its own.
    let mut checked = 0;
    for line in out.lines().filter(|l| l.trim_start().starts_with("--")) {
        let flag = line.split_whitespace().next().unwrap_or("");
        if matches!(flag, "--steps" | "--seed" | "--batch" | "--lr" | "--workers") {
            checked += 1;
            let help = out.split(flag).nth(1).unwrap_or("");
            let until_next = help.split("\n  -").next().unwrap_or("");
            assert!(
                until_next.contains("[default:"),
                "{flag} shows no default:\n{until_next}"
            );
        }
    }
    assert_eq!(checked, 5, "each of the five flags is in --help:\n{out}");
}

/// A run directory that lost its config.toml (deleted, or not copied) resumes from the config its
/// newest checkpoint records, bitwise as if nothing was lost.
#[test]
fn a_run_without_its_config_resumes_from_the_checkpoints_record() {
    let tmp = TempDir::new("cli-lost-config");
    let (status, _, err) = run(
        tmp.path(),
        &args(&["--steps", "6", "--run-dir", "straight", "--eval-every", "0"]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    let (status, _, err) = run(
        tmp.path(),
        &args(&[
            "--steps",
            "6",
            "--run-dir",
            "r",
            "--eval-every",
            "0",
            "--time-limit",
            "0.001",
        ]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    let config = tmp.path().join("r/config.toml");
    let recorded = std::fs::read_to_string(&config).expect("config");
    std::fs::remove_file(&config).expect("lose the config");
    // Flags the run would ignore are checked against the rebuilt config, as against a kept one.
    let (status, _, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "r", "--snapshot-every", "5"],
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("--snapshot-every applies to a run over worker processes"),
        "{err}"
    );
    std::fs::remove_file(&config).expect("lose the rebuilt config again");
    // --print-config prints the recorded config and writes nothing.
    let (status, out, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "r", "--print-config"],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(err.contains("is missing: printing the config checkpoint"), "{err}");
    let printed: semoe::train::TrainConfig = toml::from_str(&out).expect("the printed config");
    let original: semoe::train::TrainConfig = toml::from_str(&recorded).expect("a config");
    assert_eq!(printed.to_toml().expect("toml"), original.to_toml().expect("toml"));
    assert!(!config.exists(), "--print-config wrote the config");
    // `semoe runs` lists it all the same, with its checkpoint's figures: lines a crash left
    // after the checkpoint (done again by the resume) are not its figures.
    let (ckpt_step, _, _) = newest_checkpoint(&tmp.path().join("r"));
    let later = ckpt_step + 50;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(tmp.path().join("r/metrics.jsonl"))
        .expect("the log");
    writeln!(
        log,
        "{{\"kind\":\"train\",\"step\":{later},\"tokens\":1,\"elapsed_s\":9999.0,\"loss\":1.0,\"tokens_per_s\":1.0}}\n\
         {{\"kind\":\"val\",\"step\":{later},\"val_loss\":0.123}}"
    )
    .expect("lines after the checkpoint");
    drop(log);
    let (status, out, err) = run(tmp.path(), &["runs", "--dir", "."], Duration::from_secs(60));
    assert!(status.success(), "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("r "))
        .unwrap_or_else(|| panic!("r is not listed:\n{out}"));
    assert!(row.contains("config.toml missing"), "{row}");
    assert!(row.contains(&format!("{ckpt_step}/?")), "{row}");
    assert!(!row.contains("0.1230") && !row.contains("2h 46m"), "{row}");
    let (status, _, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "r", "--time-limit", "0"],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{err}");
    assert!(
        err.contains("config.toml was missing: rebuilt from the config checkpoint"),
        "{err}"
    );
    let rebuilt: semoe::train::TrainConfig =
        toml::from_str(&std::fs::read_to_string(&config).expect("rebuilt")).expect("a config");
    let mut original: semoe::train::TrainConfig = toml::from_str(&recorded).expect("a config");
    original.train.time_limit_s = 0.0; // as the resume asked
    assert_eq!(rebuilt.to_toml().expect("toml"), original.to_toml().expect("toml"));
    assert_eq!(
        newest_checkpoint(&tmp.path().join("r")),
        newest_checkpoint(&tmp.path().join("straight")),
        "the resumed run ends where the straight one did, bitwise"
    );
    // Nothing to rebuild from: the error says so.
    std::fs::create_dir_all(tmp.path().join("empty")).expect("dir");
    let (status, _, err) = run(
        tmp.path(),
        &["train", "--resume", "--run-dir", "empty"],
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("is not a run directory (it has no config.toml)"), "{err}");
}

#[test]
fn chaos_refuses_what_its_run_would_refuse_before_making_its_directory() {
    let tmp = TempDir::new("cli-chaos-preflight");
    let scenario = tmp.path().join("s.toml");
    std::fs::write(
        &scenario,
        "seed = 1\n[[fault]]\nactor = \"gate\"\nworker = 1\nblock = 0\nkind = \"panic\"\nstep = 2\n",
    )
    .expect("scenario");
    let s = scenario.to_str().expect("path");
    // Its text read by both runs: a pipe is refused (a second open of a named pipe waited for ever).
    let fifo = tmp.path().join("text.fifo");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8 path")).expect("path");
    // SAFETY: mkfifo(3) on a NUL-terminated path the test owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let cases: [(&[&str], &str); 9] = [
        (&["--data", "text.fifo"], "--data text.fifo is a pipe"),
        // A usage error: not clap's 2, which is a verdict of chaos ("stopped").
        (&["--steps", "x"], "invalid value 'x'"),
        (&["--no-such-flag"], "--no-such-flag"),
        (&["--d-model", "65536", "--heads", "4"], "GiB"),
        (&["--min-workers", "1"], "--min-workers does not apply"),
        (&["--join-wait", "5"], "--join-wait does not apply"),
        (&["--soak", "0"], "--soak 0"),
        (&["--workers", "1"], "fault[0].worker: worker 1 does not exist"),
        (&["--steps", "2"], "fault[0].step: step 2 is past the run's last step"),
    ];
    for (extra, want) in cases {
        let run = tmp.path().join("run");
        let mut argv = vec!["chaos", "--scenario", s, "--run-dir", "run"];
        // Each flag once: clap refuses a repeated flag itself (exit status 2), before any check
        // of semoe's would run.
        for (flag, value) in [("--workers", "2"), ("--steps", "4")] {
            if !extra.contains(&flag) {
                argv.extend([flag, value]);
            }
        }
        argv.extend_from_slice(extra);
        let (status, _, err) = run_in_dir(tmp.path(), &argv);
        assert_eq!(status.code(), Some(4), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!run.exists(), "{extra:?}: a refused chaos run made its directory");
    }
    // A folder of the user's own that holds a scenario and a config is not an earlier chaos run.
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).expect("dir");
    std::fs::write(mine.join("scenario.toml"), "seed = 1\n").expect("scenario");
    std::fs::write(mine.join("config.toml"), "# my notes\n[train]\nsteps = 4\n").expect("config");
    let (status, _, err) = run_in_dir(
        tmp.path(),
        &[
            "chaos",
            "--scenario",
            s,
            "--run-dir",
            "mine",
            "--workers",
            "2",
            "--steps",
            "4",
        ],
    );
    assert!(!status.success(), "{err}");
    let kept = std::fs::read_to_string(mine.join("config.toml")).expect("config");
    assert!(
        kept.starts_with("# my notes"),
        "the user's config was overwritten: {kept}"
    );
    // A --config that does not set train.steps leaves them at the chaos run's 20 (it ran the
    // config's default 5,000, twice).
    std::fs::write(tmp.path().join("workers.toml"), "[train]\nworkers = 2\n").expect("config");
    // The tiny model, without the flag chaos refuses (its last two, --sample-tokens 0).
    let small = &TINY[..TINY.len() - 2];
    let mut argv = vec![
        "chaos",
        "--scenario",
        s,
        "--run-dir",
        "from-config",
        "--config",
        "workers.toml",
    ];
    argv.extend_from_slice(small);
    let (status, _, err) = run_in_dir(tmp.path(), &argv);
    assert!(err.contains("; 20 steps on 2 workers"), "{err}");
    assert_eq!(status.code(), Some(0), "{err}");
}

#[test]
fn a_second_ticket_into_the_same_folder_needs_force() {
    let tmp = TempDir::new("cli-ticket");
    let ticket = ["ticket", "--out", "id", "--addr", "127.0.0.1:7070"];
    let (status, _, err) = run_in_dir(tmp.path(), &ticket);
    assert!(status.success(), "{err}");
    let first = std::fs::read(tmp.path().join("id/join.ticket")).expect("ticket");
    let (status, _, err) = run_in_dir(tmp.path(), &ticket);
    assert!(!status.success() && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(tmp.path().join("id/join.ticket")).expect("ticket"),
        first,
        "kept"
    );
    let mut forced = ticket.to_vec();
    forced.push("--force");
    let (status, _, err) = run_in_dir(tmp.path(), &forced);
    assert!(status.success(), "{err}");
    assert_ne!(
        std::fs::read(tmp.path().join("id/join.ticket")).expect("ticket"),
        first,
        "replaced"
    );
}

#[test]
fn dense_of_no_width_is_refused() {
    let tmp = TempDir::new("cli-dense-k0");
    let (status, _, err) = run_in_dir(
        tmp.path(),
        &["train", "--dense", "--k", "0", "--steps", "1", "--run-dir", "r"],
    );
    assert!(!status.success() && err.contains("--dense"), "{err}");
    assert!(!tmp.path().join("r").exists());
}

/// [`run`] in `dir`, within a minute.
fn run_in_dir(dir: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    run(dir, args, Duration::from_secs(60))
}

#[test]
fn the_ring_bench_removes_its_checkpoint_and_the_folders_made_for_it() {
    let tmp = TempDir::new("cli-ring-bench-scratch");
    let (status, out, err) = run(
        tmp.path(),
        &[
            "bench",
            "ring",
            "--d-model",
            "16",
            "--d-ff",
            "16",
            "--layers",
            "1",
            "--experts",
            "4",
            "--tokens",
            "1",
            "--rounds",
            "1",
            "--batch",
            "1",
            "--load",
            "map",
            "--device-budget",
            "60000",
            "--dir",
            "made/on/the/way",
        ],
        Duration::from_secs(120),
    );
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("batch   1  ring, routed, map"), "{out}");
    assert!(!tmp.path().join("made").exists(), "the bench left its folders: {err}");
}
