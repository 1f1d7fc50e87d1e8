//! Processes of the `semoe` binary for the process tests: spawned in a process group of their
//! own (optionally inside a network namespace), killed and reaped when dropped, also when a test
//! fails; the small model they train, and the checkpoint comparisons against the plain loop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const SEMOE: &str = env!("CARGO_BIN_EXE_semoe");

/// A small model (2 MoE blocks of 8 experts, 4 groups): a few milliseconds a step.
pub const SMALL: &[&str] = &[
    "--d-model",
    "32",
    "--layers",
    "2",
    "--heads",
    "2",
    "--d-ff",
    "64",
    "--block-size",
    "16",
    "--batch",
    "8",
    "--groups",
    "4",
    "--threads",
    "1",
    "--eval-every",
    "0",
    "--checkpoint-every",
    "0",
    "--sample-tokens",
    "0",
];

/// A process (and every process it started) killed and reaped when dropped.
pub struct Proc {
    child: std::process::Child,
    log: PathBuf,
    /// The command line, for messages.
    what: String,
}

impl Proc {
    /// Start `semoe args` in `dir` (its own process group), its stderr going to `dir/name.log`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str], env: &[(&str, String)]) -> Proc {
        Proc::spawn_in(None, dir, name, args, env)
    }

    /// [`Proc::spawn`] inside the network namespace `netns` (`ip netns exec`, which enters it and
    /// then executes `semoe` itself: the child is still the `semoe` process).
    pub fn spawn_in(netns: Option<&str>, dir: &Path, name: &str, args: &[&str], env: &[(&str, String)]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, SEMOE]);
                c
            }
            None => Command::new(SEMOE),
        };
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn semoe");
        Proc {
            child,
            log,
            what: format!("semoe {}", args.join(" ")),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped yet.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Wait at most `limit` for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "`{}` did not exit within {limit:?}; its log:\n{}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait at most `limit` for the process, and fail unless it exited 0 and left no process of
    /// its group behind.
    pub fn success(&mut self, limit: Duration) {
        let status = self.wait(limit);
        assert!(
            status.success(),
            "`{}` exited with {status}; its log:\n{}",
            self.what,
            self.log()
        );
        // SAFETY: kill(2) with signal 0 only checks whether the test's own process group (pgid =
        // the reaped child's pid) still has members.
        let alive = unsafe { libc::kill(-self.pid(), 0) } == 0;
        assert!(
            !alive,
            "`{}` exited, but its process group still has processes",
            self.what
        );
    }

    /// Wait at most `limit` until the log holds `text`; the time it took.
    pub fn wait_for(&mut self, text: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.log().contains(text) {
                return started.elapsed();
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("exited ({status}) before printing {text:?}; its log:\n{}", self.log());
            }
            assert!(
                started.elapsed() < limit,
                "{text:?} did not appear within {limit:?}; the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test created for the child (pgid = its pid).
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `semoe args`, run to its end within `limit` in a process group of its own, its output captured
/// in files under `scratch` (named after `name`): the group is killed and reaped when the limit
/// passes (the test fails with what the process printed) or the test fails while it runs.
pub fn output_within(scratch: &Path, name: &str, args: &[std::ffi::OsString], limit: Duration) -> std::process::Output {
    let stdout = scratch.join(format!("{name}.stdout"));
    let stderr = scratch.join(format!("{name}.stderr"));
    let child = spawn_captured(args, &stdout, &stderr);
    let mut proc = Proc {
        child,
        log: stderr.clone(),
        what: format!(
            "semoe {}",
            args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
        ),
    };
    let status = proc.wait(limit);
    std::process::Output {
        status,
        stdout: std::fs::read(&stdout).unwrap_or_default(),
        stderr: std::fs::read(&stderr).unwrap_or_default(),
    }
}

/// `semoe args` in a process group of its own, its stdout and stderr written to those files (the
/// caller kills and reaps it).
pub fn spawn_captured(args: &[std::ffi::OsString], stdout: &Path, stderr: &Path) -> std::process::Child {
    Command::new(SEMOE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(stdout).expect("stdout file"))
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .process_group(0)
        .spawn()
        .expect("spawn semoe")
}

pub fn train_args<'a>(run: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", "--run-dir", run, "--steps", steps];
    v.extend_from_slice(SMALL);
    v.extend_from_slice(extra);
    v
}

/// The model and optimizer files of the run's checkpoint after `steps` steps.
pub fn state_files(run: &Path, steps: u64) -> Vec<(String, Vec<u8>)> {
    let dir = run.join("checkpoints").join(format!("step-{steps:08}"));
    ["model.safetensors", "optimizer.safetensors"]
        .iter()
        .map(|f| {
            let path = dir.join(f);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(bytes.len() > 1000, "{} is too small to hold the state", path.display());
            (f.to_string(), bytes)
        })
        .collect()
}

/// Fail naming the file whose bytes differ (the checkpoint holds every tensor and both moments).
pub fn assert_same_state(want: &[(String, Vec<u8>)], got: &[(String, Vec<u8>)], what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: number of files");
    for ((name, a), (other, b)) in want.iter().zip(got) {
        assert_eq!(name, other, "{what}: file names");
        assert_eq!(a.len(), b.len(), "{what}: {name} differs in length");
        let first = a.iter().zip(b).position(|(x, y)| x != y);
        assert!(first.is_none(), "{what}: {name} differs at byte {first:?}");
    }
}

/// The plain loop's state after `steps` steps (the reference), computed once per test.
pub fn reference(dir: &Path, steps: u64, extra: &[&str]) -> Vec<(String, Vec<u8>)> {
    let steps_s = steps.to_string();
    let mut args = train_args("reference", &steps_s, &["--workers", "0"]);
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(dir, "reference", &args, &[]);
    assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.log());
    state_files(&dir.join("reference"), steps)
}

/// The membership line's figures: `(joined, left, lost)`.
pub fn membership(log: &str) -> (u64, u64, u64) {
    let line = log
        .lines()
        .find(|l| l.starts_with("membership:"))
        .unwrap_or_else(|| panic!("no membership line in:\n{log}"));
    let number_before = |word: &str| -> u64 {
        let at = line.find(word).unwrap_or_else(|| panic!("{word:?} not in {line:?}"));
        line[..at]
            .trim_end()
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count before {word:?} in {line:?}"))
    };
    (number_before(" joined"), number_before(" left"), number_before(" lost"))
}
