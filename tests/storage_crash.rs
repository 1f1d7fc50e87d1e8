//! A crash in the middle of a checkpoint's disk write: `semoe train` is killed (SIGKILL) while it
//! has written half of a checkpoint's tensor file, and the previous checkpoint must still be the
//! newest complete one, load without error, and be resumable.
//!
//! The kill point comes from the test hook `SEMOE_PAUSE_IN_CHECKPOINT_WRITE` of
//! `semoe::storage::checkpoint`, which makes every tensor file write stop halfway and sleep. The
//! first checkpoint is therefore written by a run without the hook, and the hook is set only on
//! the `--resume` run that writes the second one: no timing is involved, the child sleeps until it
//! is killed.

mod common;

use common::TempDir;

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use semoe::storage::checkpoint::{self, MANIFEST_FILE, MODEL_FILE, PAUSE_IN_WRITE_ENV};
use semoe::train::Trainer;

/// The line the hook prints before it sleeps.
const PAUSE_LINE: &str = "semoe: pausing in a checkpoint write";
/// How long the paused child sleeps: far longer than the test, so only the kill ends it.
const PAUSE_MS: &str = "120000";
/// Bound of every wait on a child; a normal run takes a fraction of a second.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A running `semoe` whose stderr lines arrive on a channel (read by a thread, so that every wait
/// can have a deadline). Dropping it kills the process, so a failing test leaves nothing behind.
struct Running {
    child: Child,
    lines: Receiver<String>,
    /// Every stderr line received so far, for failure messages.
    seen: Vec<String>,
}

impl Running {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_semoe"));
        cmd.args(args)
            .env_remove(PAUSE_IN_WRITE_ENV)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn semoe");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until a stderr line starts with `prefix` and returns it; panics at the deadline or
    /// when stderr closes (the child exited) first.
    fn wait_for_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no {prefix:?} line within {TIMEOUT:?}; stderr:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "semoe exited ({:?}) before printing {prefix:?}; stderr:\n{}",
                    self.child.try_wait(),
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the child to exit (by polling, so that the wait has a deadline).
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "semoe still running after {TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The stderr lines the child printed (after it exited, or so far).
    fn stderr(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kill_in_the_middle_of_a_checkpoint_write_leaves_the_last_checkpoint_loadable() {
    let tmp = TempDir::new("kill-mid-write");
    let run_dir = tmp.path().join("run");
    let run = run_dir.to_str().expect("UTF-8 temp path");

    // The shared tiny model, one compute thread, the plain loop, a checkpoint every step.
    let mut config = common::small_config(1);
    config.train.threads = 1;
    config.train.workers = 0;
    config.train.eval_windows = 8;
    config.train.checkpoint_every = 1;
    let config_path = tmp.path().join("config.toml");
    fs::write(&config_path, config.to_toml().expect("config as TOML")).expect("write config");
    let config_arg = config_path.to_str().expect("UTF-8 temp path");
    let quiet = ["--quiet", "--sample-tokens", "0"];

    // 1. A run of one step, without the hook, writes the checkpoint of step 1 and exits.
    let mut first = Running::spawn(
        &[&["train", "--config", config_arg, "--run-dir", run], &quiet[..]].concat(),
        &[],
    );
    let status = first.wait();
    assert!(status.success(), "first run failed ({status}):\n{}", first.stderr());
    let first_dir = checkpoint::checkpoint_dir(&run_dir, 1);
    let full_len = fs::metadata(first_dir.join(MODEL_FILE))
        .expect("step 1 model file")
        .len();

    // 2. Resumed to 3 steps with the hook, the run trains step 2 and pauses halfway through the
    // model file of its checkpoint; it is killed there.
    let mut second = Running::spawn(
        &[&["train", "--resume", "--run-dir", run, "--steps", "3"], &quiet[..]].concat(),
        &[(PAUSE_IN_WRITE_ENV, PAUSE_MS)],
    );
    let pause = second.wait_for_line(PAUSE_LINE);
    let pid = second.child.id();
    second.child.kill().expect("SIGKILL the paused run");
    let status = second.wait();
    assert!(!status.success(), "the killed run cannot have succeeded: {status}");
    drop(second);

    // (a) The kill happened mid-write: the temporary directory of step 2 holds a torn model file
    // (the same model, so the same full length as step 1's) and no manifest; step 2 has no final
    // directory.
    let root = run_dir.join(checkpoint::CHECKPOINTS_DIR);
    let tmp_dir = root.join(format!(".{}.tmp-{pid}", checkpoint::step_dir_name(2)));
    let torn_len = fs::metadata(tmp_dir.join(MODEL_FILE))
        .unwrap_or_else(|e| panic!("torn model file in {}: {e} (hook said {pause:?})", tmp_dir.display()))
        .len();
    assert!(
        0 < torn_len && torn_len < full_len,
        "the model file should be torn: {torn_len} of {full_len} bytes"
    );
    assert!(
        !tmp_dir.join(MANIFEST_FILE).exists(),
        "no manifest is written before the data"
    );
    assert!(
        !checkpoint::checkpoint_dir(&run_dir, 2).exists(),
        "step 2 was never committed"
    );

    // (b) The checkpoint of step 1 is still the newest complete one and loads, verified.
    assert_eq!(checkpoint::list(&run_dir).expect("list"), vec![(1, first_dir.clone())]);
    assert_eq!(checkpoint::latest(&run_dir).expect("latest"), Some(first_dir.clone()));
    let loaded = checkpoint::load(&first_dir).expect("load step 1");
    assert_eq!(loaded.step, 1);
    assert!(!loaded.model.is_empty() && !loaded.optimizer.is_empty());

    // (c) Training resumes from it, and the next checkpoint removes the torn leftover.
    let mut trainer = Trainer::resume(&run_dir, Some(3)).expect("resume after the crash");
    assert_eq!(trainer.steps_done(), 1);
    let report = trainer.step().expect("a step after the crash");
    assert_eq!(report.step, 2);
    let second_dir = trainer.save_checkpoint(0.0).expect("checkpoint after the crash");
    assert_eq!(second_dir, checkpoint::checkpoint_dir(&run_dir, 2));
    assert_eq!(checkpoint::load(&second_dir).expect("load step 2").step, 2);
    assert!(
        !tmp_dir.exists(),
        "the torn temporary directory is cleaned by the next save"
    );
}
