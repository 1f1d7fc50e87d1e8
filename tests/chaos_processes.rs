//! Process faults in `semoe chaos --processes N`: each kind alone (a SIGKILL at a phase, a short
//! stop, a long stop, a leave, a join) and a scripted schedule, each against the same job
//! undisturbed, with the verdict, the commits, the membership epochs and the crashes asserted
//! exactly; the ready `scenarios/rolling-restart.toml`; a run that keeps its deadline; and the
//! scenario checks that refuse what a run over processes cannot do, naming the field.
//!
//! The faults fire at exact points: the coordinator delivers a boundary fault and waits until the
//! membership shows it, and a phased fault is the worker's own hook; no test sleeps to time one.
//! Every `semoe chaos` runs in a process group of its own (its worker processes with it), bounded
//! in time, and the group is killed and reaped when the test ends, also when it fails. Everything
//! listens on 127.0.0.1 with ports the OS chooses.

mod common;

use common::TempDir;
use semoe::chaos::{ProcessLayout, Scenario};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// How long one `semoe chaos` may take before the test fails (each ends in a few seconds).
const LIMIT: Duration = Duration::from_secs(50);

/// A `semoe chaos` run, its process group killed and reaped when dropped.
struct ChaosRun {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    run_dir: PathBuf,
}

impl ChaosRun {
    /// `semoe chaos` on the small model of the chaos tests over `processes` worker processes.
    fn start(dir: &Path, name: &str, scenario: &Path, steps: &str, processes: &str) -> ChaosRun {
        ChaosRun::start_with(dir, name, scenario, steps, &["--processes", processes])
    }

    /// [`ChaosRun::start`] with other arguments after the small model's.
    fn start_with(dir: &Path, name: &str, scenario: &Path, steps: &str, extra: &[&str]) -> ChaosRun {
        let run_dir = dir.join(name);
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let args = common::chaos_args(scenario, &run_dir, steps, extra);
        let child = common::procs::spawn_captured(&args, &stdout, &stderr);
        ChaosRun {
            child,
            stdout,
            stderr,
            run_dir,
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Wait (at most [`LIMIT`]) for it to end; its exit status and `chaos.json`. Every worker
    /// process it started has ended too: its process group is empty.
    fn finish(&mut self) -> (ExitStatus, Value) {
        self.finish_reading("chaos.json")
    }

    /// [`ChaosRun::finish`], reading the run directory's `report` (`soak.json` for a soak).
    fn finish_reading(&mut self, report: &str) -> (ExitStatus, Value) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                started.elapsed() < LIMIT,
                "semoe chaos did not end within {LIMIT:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // SAFETY: kill(2) with signal 0 only asks whether a process of the group this test created
        // (pgid = the chaos process's id) still exists.
        let left = unsafe { libc::kill(-(self.child.id() as i32), 0) };
        assert_eq!(left, -1, "a worker process outlived semoe chaos:\n{}", self.output());
        let text = std::fs::read_to_string(self.run_dir.join(report))
            .unwrap_or_else(|e| panic!("{report}: {e}\n{}", self.output()));
        (status, serde_json::from_str(&text).expect("the report parses"))
    }
}

impl Drop for ChaosRun {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test created for the run (pgid = its pid).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `scenario` (TOML text) for `steps` steps over `processes` processes: the exit status, the
/// report and the run's output (for messages).
fn chaos(dir: &Path, name: &str, scenario: &str, steps: u64, processes: usize) -> (ExitStatus, Value, String) {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, scenario).expect("write the scenario");
    let mut run = ChaosRun::start(dir, name, &file, &steps.to_string(), &processes.to_string());
    let (status, json) = run.finish();
    (status, json, run.output())
}

/// The verdict is bitwise equal, every step committed once in order, and the membership counts
/// are `(epochs, joins, leaves, crashes)`.
fn assert_equal_and_counted(json: &Value, out: &str, steps: u64, counts: (u64, u64, u64, u64)) {
    assert_eq!(json["verdict"]["verdict"], "bitwise_equal", "{json:#}\n{out}");
    let committed: Vec<u64> = json["disturbed_steps"]
        .as_array()
        .expect("disturbed_steps")
        .iter()
        .map(|s| s["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(committed, (0..steps).collect::<Vec<_>>(), "every step committed once");
    let p = &json["processes"];
    let got = (
        p["epochs"].as_u64().expect("epochs"),
        p["joins"].as_u64().expect("joins"),
        p["leaves"].as_u64().expect("leaves"),
        p["crashes"].as_u64().expect("crashes"),
    );
    assert_eq!(got, counts, "(epochs, joins, leaves, crashes): {:#}", p);
}

/// The epochs of the report: `(epoch, step, workers)`.
fn epochs(json: &Value) -> Vec<(u64, u64, u64)> {
    json["processes"]["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| {
            (
                e["epoch"].as_u64().expect("epoch"),
                e["step"].as_u64().expect("step"),
                e["workers"].as_u64().expect("workers"),
            )
        })
        .collect()
}

fn fault(json: &Value, i: usize) -> &Value {
    &json["processes"]["faults"][i]
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

#[test]
fn a_worker_killed_at_its_forward_costs_an_epoch_and_a_replay() {
    let dir = TempDir::new("chaos-proc-kill");
    let scenario = "deadline = \"60s\"\n[[fault]]\nactor = \"process\"\nkind = \"kill\"\nworker = 1\nstep = 4\n\
                    moment = \"forward\"\n";
    let (status, json, out) = chaos(dir.path(), "kill", scenario, 8, 3);
    assert!(status.success(), "{out}");
    assert_equal_and_counted(&json, &out, 8, (2, 0, 0, 1));
    assert_eq!(epochs(&json), vec![(1, 0, 3), (2, 4, 2)]);
    let f = fault(&json, 0);
    assert_eq!(f["process"], 1);
    assert_eq!(f["epochs"], serde_json::json!([1, 2]));
    assert!(text(&f["exit"]).contains("SIGKILL"), "{f:#}");
    assert!(text(&f["detection"]).contains("process exit watch"), "{f:#}");
    // The coordinator started the worker, so it sees the process end at once.
    let detected = f["detected_after_s"].as_f64().expect("detected");
    assert!(detected < 1.0, "seen after {detected} s");
    // The copy of the state before step 4 is the initial one (every 10 steps): 4 steps replayed.
    assert_eq!(f["steps_replayed"], 4, "{f:#}");
    assert!(f["state_bytes"].as_u64().expect("bytes") > 0);
    assert!(f["recovery_s"].as_f64().is_some());
}

#[test]
fn a_short_stop_is_only_a_straggler() {
    let dir = TempDir::new("chaos-proc-straggler");
    let scenario = "deadline = \"60s\"\n[[fault]]\nactor = \"process\"\nkind = \"stop\"\nduration = \"300ms\"\n\
                    worker = 0\nstep = 3\n";
    let (status, json, out) = chaos(dir.path(), "straggler", scenario, 6, 2);
    assert!(status.success(), "{out}");
    assert_equal_and_counted(&json, &out, 6, (1, 0, 0, 0));
    let f = fault(&json, 0);
    assert!(text(&f["detection"]).contains("a straggler, never lost"), "{f:#}");
    // Its step waited for it: it committed after the stop ended.
    let recovery = f["recovery_s"].as_f64().expect("recovery");
    assert!(recovery >= 0.3, "step 3 committed {recovery} s after the stop");
    assert_eq!(f["steps_replayed"], 0);
    // Dismissed at the end of the run, as every member.
    assert_eq!(text(&json["processes"]["exits"][0][2]), "exit status: 0", "{json:#}");
}

#[test]
fn a_long_stop_drops_the_worker_which_never_commits_again() {
    let dir = TempDir::new("chaos-proc-dropped");
    let scenario = "deadline = \"60s\"\n[[fault]]\nactor = \"process\"\nkind = \"stop\"\nduration = \"3s\"\n\
                    worker = 1\nstep = 3\nmoment = \"backward\"\n";
    let (status, json, out) = chaos(dir.path(), "dropped", scenario, 6, 3);
    assert!(status.success(), "{out}");
    assert_equal_and_counted(&json, &out, 6, (2, 0, 0, 1));
    assert_eq!(epochs(&json), vec![(1, 0, 3), (2, 3, 2)]);
    let f = fault(&json, 0);
    // The control connection's idle timeout ended it (QUIC says "timed out", or the notice stream
    // that was reading from it says the connection was lost).
    assert!(
        text(&f["detection"]).contains("connection lost"),
        "the idle timeout: {f:#}"
    );
    let detected = f["detected_after_s"].as_f64().expect("detected");
    assert!((1.0..3.0).contains(&detected), "dropped after {detected} s");
    // Continued, it found itself fenced and exited non-zero.
    let exit = text(&f["exit"]);
    assert!(exit.contains("exit status") && !exit.contains("status: 0"), "{exit}");
    let log = std::fs::read_to_string(dir.path().join("dropped/workers/process-1.log")).expect("its log");
    assert!(log.contains("no longer a member"), "{log}");
}

/// A long stop at a step boundary removes its worker before the step runs, as the plan counts
/// it: a link fault at that step hits the pair its indices name in the epoch without the stopped
/// worker (the step ran first in the old epoch, towards the stopped process, and the fault never
/// fired).
#[test]
fn a_link_fault_after_a_long_boundary_stop_hits_the_planned_pair() {
    let dir = TempDir::new("chaos-proc-stop-link");
    let scenario = "deadline = \"60s\"\n[[fault]]\nactor = \"process\"\nkind = \"stop\"\nduration = \"3s\"\n\
                    worker = 0\nstep = 3\nmoment = \"boundary\"\n[[fault]]\nactor = \"link\"\nkind = \"duplicate\"\n\
                    from = 0\nto = 1\nstep = 3\n";
    let (status, json, out) = chaos(dir.path(), "stop-link", scenario, 6, 3);
    assert!(status.success(), "{out}");
    assert_eq!(link(&json, 0)["fired"], 1, "{json:#}");
}

#[test]
fn a_leaving_worker_moves_its_state_and_exits_zero() {
    let dir = TempDir::new("chaos-proc-leave");
    let scenario = "deadline = \"60s\"\n[[fault]]\nactor = \"process\"\nkind = \"leave\"\nworker = 1\nstep = 4\n";
    let (status, json, out) = chaos(dir.path(), "leave", scenario, 8, 3);
    assert!(status.success(), "{out}");
    assert_equal_and_counted(&json, &out, 8, (2, 0, 1, 0));
    assert_eq!(epochs(&json), vec![(1, 0, 3), (2, 4, 2)]);
    let f = fault(&json, 0);
    assert_eq!(
        f["steps_replayed"], 0,
        "a leave moves the current state: nothing to replay"
    );
    assert!(f["state_bytes"].as_u64().expect("bytes") > 0);
    assert_eq!(text(&f["exit"]), "exit status: 0", "{f:#}");
}

#[test]
fn a_joining_worker_receives_the_state() {
    let dir = TempDir::new("chaos-proc-join");
    let scenario = "deadline = \"60s\"\n[[fault]]\nactor = \"process\"\nkind = \"join\"\nstep = 4\n";
    let (status, json, out) = chaos(dir.path(), "join", scenario, 8, 2);
    assert!(status.success(), "{out}");
    assert_equal_and_counted(&json, &out, 8, (2, 1, 0, 0));
    assert_eq!(epochs(&json), vec![(1, 0, 2), (2, 4, 3)]);
    let f = fault(&json, 0);
    assert_eq!(f["process"], 2);
    assert_eq!(f["members_after"], 3);
    assert_eq!(f["steps_replayed"], 0);
    assert!(text(&f["detection"]).contains("admitted as member 3"), "{f:#}");
}

#[test]
fn a_scripted_schedule_of_join_kill_and_leave_gives_its_epochs() {
    let dir = TempDir::new("chaos-proc-schedule");
    let scenario = "seed = 3\ndeadline = \"60s\"\n\
                    [[fault]]\nactor = \"process\"\nkind = \"join\"\nstep = 3\n\
                    [[fault]]\nactor = \"process\"\nkind = \"kill\"\nworker = 0\nstep = 6\n\
                    [[fault]]\nactor = \"process\"\nkind = \"leave\"\nworker = 1\nstep = 9\n";
    let (status, json, out) = chaos(dir.path(), "schedule", scenario, 12, 2);
    assert!(status.success(), "{out}");
    assert_equal_and_counted(&json, &out, 12, (4, 1, 1, 1));
    // Processes 0 and 1 start; 2 joins at 3; 0 (worker 0) is killed at 6; then 2 is worker 1 and
    // leaves at 9: process 1 alone trains the last steps.
    assert_eq!(epochs(&json), vec![(1, 0, 2), (2, 3, 3), (3, 6, 2), (4, 9, 1)]);
    let hit: Vec<u64> = (0..3)
        .map(|i| fault(&json, i)["process"].as_u64().expect("process"))
        .collect();
    assert_eq!(hit, vec![2, 0, 2]);
    let exits = &json["processes"]["exits"];
    assert!(text(&exits[0][2]).contains("SIGKILL"), "{exits}");
    assert_eq!(text(&exits[1][2]), "exit status: 0");
    assert_eq!(text(&exits[2][2]), "exit status: 0");
    let md = std::fs::read_to_string(dir.path().join("schedule/chaos.md")).expect("chaos.md");
    assert!(
        md.contains("## Worker processes") && md.contains("| 4 | 9 | 1 | member 3 leaves |"),
        "{md}"
    );
}

#[test]
fn the_rolling_restart_scenario_replaces_every_worker() {
    let dir = TempDir::new("chaos-proc-rolling");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/rolling-restart.toml");
    let mut run = ChaosRun::start(dir.path(), "rolling", &file, "16", "3");
    let (status, json) = run.finish();
    let out = run.output();
    assert!(status.success(), "{out}");
    assert!(out.contains("verdict: bitwise equal"), "{out}");
    assert_equal_and_counted(&json, &out, 16, (7, 3, 0, 3));
    assert_eq!(
        epochs(&json),
        vec![
            (1, 0, 3),
            (2, 2, 4),
            (3, 3, 3),
            (4, 7, 4),
            (5, 8, 3),
            (6, 12, 4),
            (7, 13, 3)
        ]
    );
    // Each original process killed once, at its phase.
    let kills: Vec<(u64, String)> = [1, 3, 5]
        .iter()
        .map(|&i| {
            let f = fault(&json, i);
            (f["process"].as_u64().expect("process"), text(&f["moment"]).to_string())
        })
        .collect();
    assert_eq!(
        kills,
        vec![(0, "forward".into()), (1, "backward".into()), (2, "commit".into())]
    );
}

/// Four seeds of the random process soak over 3 processes (with `extra` arguments), each checked
/// bitwise equal, faults fired; the soak's report and the output.
fn soak_of_four(dir: &Path, extra: &[&str]) -> (Value, String) {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/random-processes.toml");
    let mut args = vec!["--processes", "3", "--soak", "4"];
    args.extend_from_slice(extra);
    let mut run = ChaosRun::start_with(dir, "soak", &file, "12", &args);
    let (status, json) = run.finish_reading("soak.json");
    let out = run.output();
    assert!(status.success(), "{out}");
    let seeds = json["seeds"].as_array().expect("seeds");
    assert_eq!(seeds.len(), 4, "{json:#}");
    for s in seeds {
        assert_eq!(s["verdict"]["verdict"], "bitwise_equal", "{s:#}\n{out}");
    }
    let fired: u64 = seeds.iter().map(|s| s["faults_fired"].as_u64().expect("count")).sum();
    assert!(fired >= 4, "the seeds fire process faults: {json:#}");
    (json, out)
}

#[test]
fn the_random_process_soak_scenario_ends_bitwise_equal_for_every_seed() {
    let dir = TempDir::new("chaos-proc-soak");
    let (_, out) = soak_of_four(dir.path(), &[]);
    assert!(
        out.contains("soak: 4 seeds") && out.contains("4 bitwise equal"),
        "{out}"
    );
}

#[test]
fn the_random_process_soak_over_the_stand_in_collectives_ends_bitwise_equal() {
    let dir = TempDir::new("chaos-proc-soak-sim");
    soak_of_four(dir.path(), &["--exchange", "sim"]);
    // The workers exchanged over the stand-in (their logs are in the run directory).
    let logs: String = std::fs::read_dir(dir.path().join("soak/workers"))
        .expect("the workers' logs")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("a log"))
        .collect();
    assert!(
        logs.contains("expert rows over collectives (the CPU stand-in of NCCL over the data plane)"),
        "{logs}"
    );
}

#[test]
fn a_chaos_run_over_processes_keeps_its_deadline() {
    let dir = TempDir::new("chaos-proc-deadline");
    // The stopped worker is dropped after the idle timeout (1.5 s): past the whole run's deadline.
    let scenario = "deadline = \"1500ms\"\n[[fault]]\nactor = \"process\"\nkind = \"stop\"\nduration = \"5s\"\n\
                    worker = 0\nstep = 0\n";
    let started = Instant::now();
    let (status, json, out) = chaos(dir.path(), "deadline", scenario, 6, 2);
    assert_eq!(status.code(), Some(1), "{out}");
    assert_eq!(json["verdict"]["verdict"], "deadline_expired", "{json:#}");
    assert!(
        text(&json["verdict"]["waiting"]).contains("the disturbed run"),
        "{json:#}"
    );
    // Bounded: the deadline, then the processes continued, ended and reaped.
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
}

#[test]
fn process_faults_are_refused_naming_the_field() {
    let head = "[[fault]]\nactor = \"process\"\n";
    let cases: Vec<(String, &str)> = vec![
        (format!("{head}step = 1\n"), "fault[0].kind"),
        (format!("{head}kind = \"explode\"\nstep = 1\n"), "fault[0].kind"),
        (format!("{head}kind = \"stop\"\nstep = 1\n"), "fault[0].duration"),
        (
            format!("{head}kind = \"stop\"\nduration = \"2s\"\nstep = 1\n"),
            "fault[0].duration",
        ),
        (
            format!("{head}kind = \"kill\"\nduration = \"2s\"\nstep = 1\n"),
            "fault[0].duration",
        ),
        (
            format!("{head}kind = \"join\"\nworker = 1\nstep = 1\n"),
            "fault[0].worker",
        ),
        (
            format!("{head}kind = \"leave\"\nstep = 1\nmoment = \"forward\"\n"),
            "fault[0].moment",
        ),
        (
            format!("{head}kind = \"kill\"\nstep = 1\nmoment = \"any\"\n"),
            "fault[0].moment",
        ),
        (
            format!("{head}kind = \"kill\"\nstep = 1\ntimes = 2\n"),
            "fault[0].times",
        ),
        (
            format!("{head}kind = \"kill\"\nstep = 1\nblock = 0\n"),
            "fault[0].block",
        ),
        (
            format!("{head}kind = \"kill\"\nprobability = 1.5\n"),
            "fault[0].probability",
        ),
        (format!("{head}kind = \"kill\"\n"), "fault[0].step"),
        (
            "[[fault]]\nactor = \"expert\"\nkind = \"kill\"\nstep = 1\n".to_string(),
            "fault[0].kind",
        ),
        (
            "[[fault]]\nactor = \"gate\"\nkind = \"error\"\nstep = 1\nmoment = \"commit\"\n".to_string(),
            "fault[0].moment",
        ),
    ];
    common::assert_scenarios_refused(&cases);

    // What only the run's membership can tell: each names its entry and key.
    let layout = ProcessLayout {
        steps: 10,
        processes: 2,
        max_members: 3,
    };
    let kill = |worker: usize, step: u64, moment: &str| {
        format!("[[fault]]\nactor = \"process\"\nkind = \"kill\"\nworker = {worker}\nstep = {step}\nmoment = \"{moment}\"\n")
    };
    let join = |step: u64| format!("[[fault]]\nactor = \"process\"\nkind = \"join\"\nstep = {step}\n");
    let plan_cases: Vec<(String, &str, &str)> = vec![
        (kill(2, 1, "boundary"), "fault[0].worker", "does not exist at step 1"),
        (
            format!("{}{}", kill(0, 1, "boundary"), kill(1, 2, "boundary")),
            "fault[1].worker",
            "does not exist at step 2",
        ),
        (
            format!("{}{}", kill(0, 1, "boundary"), kill(0, 2, "boundary")),
            "fault[1].worker",
            "the only one",
        ),
        (format!("{}{}", join(1), join(2)), "fault[1].kind", "at most 3"),
        (kill(0, 10, "boundary"), "fault[0].step", "past the run's last step"),
        (
            format!(
                "{}[[fault]]\nactor = \"process\"\nkind = \"stop\"\nduration = \"100ms\"\nworker = 0\nstep = 2\n\
                 moment = \"forward\"\n",
                kill(0, 1, "boundary")
            ),
            "fault[1].moment",
            "receives no expert packets",
        ),
        (
            "[[fault]]\nactor = \"process\"\nkind = \"stop\"\nduration = \"100ms\"\nworker = 0\nstep = 1\nmoment = \
             \"forward\"\n[[fault]]\nactor = \"process\"\nkind = \"kill\"\nworker = 0\nstep = 3\nmoment = \"commit\"\n"
                .to_string(),
            "fault[1].moment",
            "one phased fault",
        ),
        (
            "[[fault]]\nactor = \"gate\"\nkind = \"error\"\nstep = 1\n".to_string(),
            "fault[0].actor",
            "takes only process and link faults",
        ),
    ];
    for (text, key, why) in plan_cases {
        let scenario = Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let err = scenario.process_plan(&layout).expect_err(&text).to_string();
        assert!(err.contains(key) && err.contains(why), "{text}\n{err}");
    }
    // Link faults follow the membership the process faults make: worker 2 is gone after a kill,
    // a lone worker has no link, and a corrupt link fault (an eviction) takes no process fault
    // after it.
    let link = |kind: &str, from: usize, to: usize, step: u64| {
        format!("[[fault]]\nactor = \"link\"\nkind = \"{kind}\"\nfrom = {from}\nto = {to}\nstep = {step}\n")
    };
    let link_cases = [
        (
            format!("{}{}{}", join(1), kill(0, 2, "boundary"), link("drop", 2, 0, 3)),
            "fault[2].from",
            "does not exist at step 3",
        ),
        (
            format!(
                "{}[[fault]]\nactor = \"link\"\nkind = \"drop\"\nstep = 2\n",
                kill(0, 1, "boundary")
            ),
            "fault[1].actor",
            "needs 2 or more workers",
        ),
        (
            format!("{}{}", kill(0, 1, "boundary"), link("drop", 0, 2, 1)),
            "fault[1].to",
            "does not exist at step 1",
        ),
        (
            format!("{}{}", link("corrupt", 1, 0, 1), kill(0, 3, "boundary")),
            "fault[0].kind",
            "no process fault after a corrupt one",
        ),
        (
            format!("{}{}", link("corrupt", 1, 0, 3), kill(0, 3, "forward")),
            "fault[0].kind",
            "evicts its sender",
        ),
        (link("drop", 0, 3, 1), "fault[0].to", "does not exist at step 1"),
        // A corrupt fault evicts its sender: the indices of a later link fault name another pair.
        (
            format!("{}{}", link("corrupt", 0, 1, 1), link("duplicate", 1, 0, 3)),
            "fault[1].step",
            "follows the corrupt link fault of fault[0] at step 1",
        ),
    ];
    for (text, key, why) in link_cases {
        let scenario = Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let processes = scenario.process_plan(&layout).unwrap_or_else(|e| panic!("{text}: {e}"));
        let err = scenario.link_plan(&layout, &processes).expect_err(&text).to_string();
        assert!(err.contains(key) && err.contains(why), "{text}\n{err}");
    }
    // What the process faults allow is planned: a kill at a phase of step 3 still counts its
    // worker in step 3 (it is the epoch that first runs the step).
    let text = format!(
        "{}{}{}delay = \"5ms\"\n",
        join(1),
        kill(2, 3, "forward"),
        link("delay", 2, 0, 3)
    );
    let scenario = Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let processes = scenario.process_plan(&layout).expect("process plan");
    let (plan, planned) = scenario.link_plan(&layout, &processes).expect("link plan");
    assert_eq!(plan.faults().len(), 1);
    assert_eq!(planned[0].entry, 2);
    // A random corrupt link fault is drawn only at steps no process fault follows (refusing it
    // refused every seed that drew an early step): with probability 1 and a join at step 6, at
    // steps 6 to 9 only.
    let text = format!(
        "{}[[fault]]\nactor = \"link\"\nkind = \"corrupt\"\nprobability = 1.0\n",
        join(6)
    );
    let scenario = Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let processes = scenario.process_plan(&layout).expect("process plan");
    let (plan, planned) = scenario
        .link_plan(&layout, &processes)
        .expect("a random corrupt fault is planned");
    // The first evicts its sender: the epochs after it are not the plan's, so the later draws
    // are left out.
    let steps: Vec<u64> = planned.iter().map(|p| p.fault.step).collect();
    assert_eq!(steps, [6], "{planned:?}");
    assert_eq!(plan.faults().len(), 1);
    // Beside a scripted link fault at step 3, a random corrupt is drawn from that step on only
    // (one drawn before it would refuse the scenario, for some seeds only); the first kept, at
    // step 3 itself, leaves out the later ones.
    let text = format!(
        "[[fault]]\nactor = \"link\"\nkind = \"corrupt\"\nprobability = 1.0\n{}",
        link("duplicate", 1, 0, 3)
    );
    let scenario = Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let processes = scenario.process_plan(&layout).expect("process plan");
    let (_, planned) = scenario.link_plan(&layout, &processes).expect("planned, not refused");
    let kept: Vec<(usize, u64)> = planned.iter().map(|p| (p.entry, p.fault.step)).collect();
    assert_eq!(kept, [(0, 3), (1, 3)], "{planned:?}");
    // And an in-process run refuses process faults, naming the flag.
    let scenario = Scenario::from_toml(&join(1)).expect("parses");
    let layout = semoe::chaos::Layout {
        steps: 10,
        workers: 2,
        moe_blocks: vec![0, 1],
        experts: 4,
    };
    let err = scenario.plan(&layout).expect_err("in-process").to_string();
    assert!(err.contains("fault[0].actor") && err.contains("--processes"), "{err}");
}

#[test]
fn a_straggler_longer_than_the_collective_deadline_is_refused() {
    let dir = TempDir::new("chaos-proc-refused");
    let file = dir.path().join("s.toml");
    std::fs::write(
        &file,
        "collective_deadline = \"500ms\"\n[[fault]]\nactor = \"process\"\nkind = \"stop\"\nduration = \"800ms\"\n\
         worker = 0\nstep = 1\n",
    )
    .expect("write");
    let mut run = ChaosRun::start(dir.path(), "refused", &file, "4", "2");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = run.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(started.elapsed() < LIMIT, "{}", run.output());
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = run.output();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("fault[0].duration") && out.contains("collective deadline"),
        "{out}"
    );
    assert!(
        !dir.path().join("refused/workers/process-0.log").exists(),
        "refused before any process started"
    );
}

#[test]
fn random_process_faults_follow_the_seed_and_the_membership() {
    let text = "seed = 9\n[[fault]]\nactor = \"process\"\nkind = \"kill\"\nprobability = 0.3\n\
                [[fault]]\nactor = \"process\"\nkind = \"join\"\nprobability = 0.3\n\
                [[fault]]\nactor = \"process\"\nkind = \"stop\"\nduration = \"200ms\"\nprobability = 0.2\n";
    let scenario = Scenario::from_toml(text).expect("parses");
    let layout = ProcessLayout {
        steps: 30,
        processes: 2,
        max_members: 4,
    };
    let plan = scenario.process_plan(&layout).expect("plan");
    assert_eq!(
        plan,
        scenario.process_plan(&layout).expect("plan"),
        "the same seed, the same faults"
    );
    let other = Scenario {
        seed: 10,
        ..scenario.clone()
    };
    assert_ne!(
        plan,
        other.process_plan(&layout).expect("plan"),
        "another seed, other faults"
    );
    assert!(plan.len() >= 8, "about 24 drawn over 30 steps, got {}", plan.len());
    // Replay the membership: every fault hits a worker the epoch has, never the last one, and no
    // join goes past the most workers.
    let mut members: Vec<usize> = vec![0, 1];
    let mut next = 2;
    let mut last = (0, semoe::chaos::Phase::Boundary);
    for f in &plan {
        assert!((f.step, f.phase) >= last, "in firing order: {plan:?}");
        last = (f.step, f.phase);
        match f.worker {
            None => {
                assert_eq!(f.process, next);
                next += 1;
                members.push(f.process);
            }
            Some(w) => {
                assert_eq!(members.get(w), Some(&f.process), "{f:?} in {members:?}");
                if f.removes() {
                    members.remove(w);
                }
            }
        }
        assert!(!members.is_empty() && members.len() <= 4, "{members:?}");
        assert_eq!(f.members_after, members.len());
    }
}

#[test]
fn random_process_faults_end_bitwise_equal() {
    let dir = TempDir::new("chaos-proc-random");
    let scenario = "seed = 4\ndeadline = \"60s\"\n\
                    [[fault]]\nactor = \"process\"\nkind = \"kill\"\nprobability = 0.15\n\
                    [[fault]]\nactor = \"process\"\nkind = \"join\"\nprobability = 0.15\n\
                    [[fault]]\nactor = \"process\"\nkind = \"stop\"\nduration = \"100ms\"\nprobability = 0.1\n";
    let plan = Scenario::from_toml(scenario)
        .expect("parses")
        .process_plan(&ProcessLayout {
            steps: 12,
            processes: 3,
            max_members: 4,
        })
        .expect("plan");
    let count = |kind: semoe::chaos::FaultKind| plan.iter().filter(|f| f.kind == kind).count() as u64;
    let (kills, joins) = (
        count(semoe::chaos::FaultKind::Kill),
        count(semoe::chaos::FaultKind::Join),
    );
    assert!(kills > 0 && joins > 0, "the seed draws kills and joins: {plan:?}");
    let (status, json, out) = chaos(dir.path(), "random", scenario, 12, 3);
    assert!(status.success(), "{out}");
    assert_eq!(json["verdict"]["verdict"], "bitwise_equal", "{json:#}\n{out}");
    let p = &json["processes"];
    assert_eq!(
        (p["joins"].as_u64(), p["crashes"].as_u64()),
        (Some(joins), Some(kills)),
        "{p:#}"
    );
    assert_eq!(p["faults"].as_array().map(Vec::len), Some(plan.len()));
    assert_eq!(json["disturbed_steps"].as_array().map(Vec::len), Some(12));
}

/// A scenario of one link fault from worker `from` to worker `to` at `step` (`extra`: its other
/// keys), with a collective deadline short enough for a lost request to end the run quickly.
fn link_fault(kind: &str, extra: &str, from: usize, to: usize, step: u64) -> String {
    format!(
        "deadline = \"60s\"\ncollective_deadline = \"2s\"\n[[fault]]\nactor = \"link\"\nkind = \"{kind}\"\n{extra}\
         from = {from}\nto = {to}\nstep = {step}\n"
    )
}

fn link(json: &Value, i: usize) -> &Value {
    &json["processes"]["link_faults"][i]
}

#[test]
fn duplicated_delayed_and_reordered_requests_between_processes_change_nothing() {
    let dir = TempDir::new("chaos-proc-links");
    for (kind, extra, what) in [
        ("duplicate", "", "served it once"),
        ("delay", "delay = \"50ms\"\n", "left late"),
        ("reorder", "", "after the next packet"),
    ] {
        let (status, json, out) = chaos(dir.path(), kind, &link_fault(kind, extra, 0, 1, 2), 5, 2);
        assert!(status.success(), "{kind}: {out}");
        // No membership change, no replay: one epoch, every step committed once, bitwise equal.
        assert_equal_and_counted(&json, &out, 5, (1, 0, 0, 0));
        let f = link(&json, 0);
        assert_eq!(f["fired"], 1, "{kind}: {f:#}\n{out}");
        assert_eq!(
            (f["from"].as_u64(), f["to"].as_u64(), f["step"].as_u64()),
            (Some(0), Some(1), Some(2))
        );
        // The sender told it, at step 2 of epoch 1: worker 0, the first process, member 1 (member
        // numbers start at 1 and the processes join one at a time).
        let first = &f["firings"][0];
        assert_eq!(
            (first[0].as_u64(), first[1].as_u64(), first[2].as_u64()),
            (Some(1), Some(1), Some(2)),
            "{kind}: {f:#}"
        );
        assert!(text(&f["detection"]).contains(what), "{kind}: {f:#}");
        assert_eq!(json["processes"]["replayed_steps"], 0, "{kind}");
    }
}

#[test]
fn a_dropped_request_between_processes_stops_the_run_at_its_deadline_naming_the_worker() {
    let dir = TempDir::new("chaos-proc-drop");
    let started = Instant::now();
    let (status, json, out) = chaos(dir.path(), "drop", &link_fault("drop", "", 1, 0, 2), 5, 2);
    // A missed deadline is not a lost member: the run stops with it (exit code 2: stopped).
    assert_eq!(status.code(), Some(2), "{out}");
    assert_eq!(json["verdict"]["verdict"], "stopped", "{json:#}\n{out}");
    assert_eq!(json["verdict"]["step"], 2, "{json:#}");
    let error = text(&json["verdict"]["error"]);
    assert!(
        error.contains("worker 0") && error.contains("did not answer"),
        "{error}"
    );
    assert_eq!(link(&json, 0)["fired"], 1, "{json:#}");
    // Steps 0 and 1 committed, nothing after; no membership change.
    let committed: Vec<u64> = json["disturbed_steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(committed, vec![0, 1]);
    assert_eq!(json["processes"]["epochs"], 1);
    assert_eq!(json["processes"]["crashes"], 0);
    assert!(started.elapsed() < Duration::from_secs(40), "{:?}", started.elapsed());
}

#[test]
fn a_corrupted_request_between_processes_evicts_its_sender_and_the_replay_is_bitwise_equal() {
    let dir = TempDir::new("chaos-proc-corrupt");
    let (status, json, out) = chaos(dir.path(), "corrupt", &link_fault("corrupt", "", 2, 0, 3), 6, 3);
    assert!(status.success(), "{out}");
    // The sender is evicted (a loss): a new epoch of the two others replays from the copy.
    assert_equal_and_counted(&json, &out, 6, (2, 0, 0, 1));
    assert_eq!(epochs(&json), vec![(1, 0, 3), (2, 3, 2)]);
    let f = link(&json, 0);
    assert_eq!(f["fired"], 1, "it fires once: the replay runs without it: {f:#}");
    assert_eq!(
        f["firings"][0][0], 3,
        "member 3 (worker 2, the third process), the sender, told it: {f:#}"
    );
    let why = text(&json["processes"]["history"][1]["why"]);
    assert!(
        why.contains("member 3 lost: evicted") && why.contains("malformed data") && why.contains("CRC-32"),
        "the eviction names the sender and the checksum: {why}"
    );
    // The sender's process was dismissed or ended; the copy before step 3 is the initial one.
    assert_eq!(json["processes"]["replayed_steps"], 3, "{json:#}");
}

#[test]
fn the_flaky_network_processes_scenario_ends_bitwise_equal_with_every_link_fault_fired_once() {
    let dir = TempDir::new("chaos-proc-flaky-network");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/flaky-network-processes.toml");
    let mut run = ChaosRun::start(dir.path(), "flaky", &file, "10", "3");
    let (status, json) = run.finish();
    let out = run.output();
    assert!(status.success(), "{out}");
    assert_eq!(json["verdict"]["verdict"], "bitwise_equal", "{json:#}\n{out}");
    let links = json["processes"]["link_faults"].as_array().expect("link faults");
    assert!(links.len() >= 3, "the seed draws link faults: {json:#}");
    // Every link between the workers of an epoch carries requests in every step (the parameter
    // broadcast at least), and a fault goes only to the epoch that first runs its step: each
    // fires exactly once, the kills and joins notwithstanding.
    for f in links {
        assert_eq!(f["fired"], 1, "{f:#}\n{out}");
    }
    let kinds: Vec<&str> = links.iter().map(|f| text(&f["kind"])).collect();
    assert_eq!(
        kinds,
        ["duplicate", "delay 10ms", "reorder"],
        "the file's seed draws one of each"
    );
    // Its seed also kills three workers and starts one (the link faults after them name the
    // workers of the smaller epochs), and the replays after the kills ran without the link faults
    // of the replayed steps (each fired once, above).
    let p = &json["processes"];
    assert_eq!(
        (p["joins"].as_u64(), p["crashes"].as_u64()),
        (Some(1), Some(3)),
        "{p:#}"
    );
    assert!(p["replayed_steps"].as_u64().expect("replayed") > 0, "{p:#}");
}

#[test]
fn a_partition_between_processes_stops_the_run_at_its_deadline_and_loses_no_member() {
    let dir = TempDir::new("chaos-proc-partition");
    let scenario = link_fault("partition", "duration = \"5s\"\n", 0, 1, 2);
    let (status, json, out) = chaos(dir.path(), "partition", &scenario, 5, 2);
    assert_eq!(status.code(), Some(2), "{out}");
    assert_eq!(json["verdict"]["verdict"], "stopped", "{json:#}\n{out}");
    assert_eq!(json["verdict"]["step"], 2, "{json:#}");
    let error = text(&json["verdict"]["error"]);
    assert!(
        error.contains("did not answer") && error.contains("within 2000 ms"),
        "{error}"
    );
    // Each end starts it at its own first request of the step: told once or twice, never more.
    let fired = link(&json, 0)["fired"].as_u64().expect("fired");
    assert!((1..=2).contains(&fired), "{json:#}");
    // Packets were lost, not connections: no member lost, no new epoch.
    assert_eq!(json["processes"]["epochs"], 1);
    assert_eq!(json["processes"]["crashes"], 0);
}
