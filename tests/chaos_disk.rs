//! Disk tier faults in chaos runs, on a job whose storage budgets keep half of each worker's
//! experts on disk (so every step reads and writes the Disk tier): bad `disk` entries are errors
//! naming the key; a transient read or write error (retried by the I/O thread), a short read and a
//! slow disk end with the state bitwise equal to the undisturbed run's, without a replay; an error
//! that outlasts the retries and a full disk stop the run with an error naming the worker, the slot
//! file, the expert and the errno (and for a full disk the directory and the budgets);
//! `scenarios/dying-disk.toml` ends as its comment says; and 20 seeds of random recoverable disk
//! faults end bitwise equal.

mod common;

use semoe::chaos::{FaultKind, FaultSpec, Scenario};
use semoe::storage::tiers::ExpertSlot;
use semoe::train::chaos::{self, ChaosReport, Verdict};
use semoe::train::config::TrainConfig;
use std::time::{Duration, Instant};

/// The small model on 2 workers (2 experts of each MoE block per worker, 4 in all): the Device
/// budget holds one block's 2 experts and the Host tier nothing, so the other block's experts are
/// read from and written back to disk in every step.
fn config(steps: u64) -> TrainConfig {
    let mut c = common::small_config(steps);
    c.train.workers = 2;
    let unit = ExpertSlot::bytes_for(c.model.d_model, c.model.d_ff);
    c.storage.device_budget = (2 * unit).to_string();
    c.storage.host_budget = "0".into();
    // Buffered I/O through the page cache: the faults are injected above the file system either way.
    c.storage.drop_page_cache = false;
    c
}

fn run(c: &TrainConfig, spec: FaultSpec, what: &str) -> ChaosReport {
    let scenario = Scenario::builder()
        .deadline(Duration::from_secs(60))
        .fault(spec)
        .build()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let started = Instant::now();
    let report = chaos::run(c, &scenario).unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: {} in {:.2?}", report.verdict_line(), started.elapsed());
    assert!(
        report.disk_bytes[0] > 0 && report.disk_bytes[1] > 0,
        "{what}: the Disk tier was used: {:?}",
        report.disk_bytes
    );
    report
}

#[test]
fn bad_disk_entries_are_errors_naming_the_key() {
    let fault = |body: &str| format!("seed = 1\n[[fault]]\nactor = \"disk\"\n{body}\n");
    let cases = [
        (fault("kind = \"crash\"\nstep = 1"), "fault[0].kind"),
        (fault("kind = \"error\"\nstep = 1"), "fault[0].kind"),
        (fault("step = 1"), "fault[0].kind"),
        (fault("kind = \"slow\"\nstep = 1"), "fault[0].delay"),
        (fault("kind = \"slow\"\ndelay = \"soon\"\nstep = 1"), "fault[0].delay"),
        (
            fault("kind = \"read-error\"\ndelay = \"5ms\"\nstep = 1"),
            "fault[0].delay",
        ),
        (fault("kind = \"read-error\"\nstep = 1\nblock = 0"), "fault[0].block"),
        (fault("kind = \"read-error\"\nstep = 1\nexpert = 0"), "fault[0].expert"),
        (
            fault("kind = \"full\"\nstep = 1\nmoment = \"forward\""),
            "fault[0].moment",
        ),
        (fault("kind = \"write-error\"\nstep = 1\nfrom = 0"), "fault[0].from"),
        (
            fault("kind = \"slow\"\ndelay = \"5ms\"\nstep = 1\ntimes = 2"),
            "fault[0].times",
        ),
        (
            "[[fault]]\nactor = \"expert\"\nkind = \"read-error\"\nstep = 1\n".to_string(),
            "fault[0].kind",
        ),
    ];
    common::assert_scenarios_refused(&cases);
    // A worker the run does not have.
    let c = config(4);
    let layout = semoe::chaos::Layout::new(&c.model, 2, 4);
    let scenario = Scenario::builder()
        .fault(FaultSpec::disk().worker(2).at(1))
        .build()
        .expect("valid on its own");
    let err = scenario.plan(&layout).expect_err("worker 2").to_string();
    assert!(err.contains("fault[0].worker"), "{err}");
    // A disk fault on a job without a Disk tier would never fire: refused before anything runs.
    let mut memory = config(4);
    memory.storage.device_budget.clear();
    memory.storage.host_budget.clear();
    // (The tiers' own settings go with them: without a Device budget they would be refused.)
    let defaults = semoe::train::TrainConfig::default().storage;
    memory.storage.drop_page_cache = defaults.drop_page_cache;
    memory.storage.io_threads = defaults.io_threads;
    let scenario = Scenario::builder()
        .fault(FaultSpec::disk().at(1))
        .build()
        .expect("valid");
    let err = chaos::run(&memory, &scenario).expect_err("no disk").to_string();
    assert!(
        err.contains("fault[0]") && err.contains("storage.device_budget"),
        "{err}"
    );
    // Nor on a worker whose budgets, though set, hold all its experts (it opens no Disk tier):
    // each worker's 4 units fit in Device (4 units), the Host (1 unit) to spare. It used to run
    // the whole job and end "not exercised".
    let mut roomy = config(4);
    let unit = ExpertSlot::bytes_for(roomy.model.d_model, roomy.model.d_ff);
    roomy.storage.device_budget = (4 * unit).to_string();
    roomy.storage.host_budget = unit.to_string();
    let scenario = Scenario::builder()
        .fault(FaultSpec::disk().worker(1).at(1))
        .build()
        .expect("valid");
    let err = chaos::run(&roomy, &scenario)
        .expect_err("no disk on worker 1")
        .to_string();
    assert!(
        err.contains("fault[0] is a disk fault on worker 1, which keeps its 4 expert units")
            && err.contains("never fire"),
        "{err}"
    );
}

#[test]
fn transient_disk_faults_end_bitwise_equal_without_a_replay() {
    let c = config(8);
    let cases = [
        (
            "read-error",
            FaultSpec::disk().worker(0).kind(FaultKind::ReadError).at(2).times(2),
            2,
            "tried the call again",
        ),
        (
            "write-error",
            FaultSpec::disk().worker(1).kind(FaultKind::WriteError).at(3).times(2),
            2,
            "tried the call again",
        ),
        (
            "short-read",
            FaultSpec::disk().worker(0).kind(FaultKind::ShortRead).at(4).times(3),
            3,
            "read the rest",
        ),
        (
            "slow",
            FaultSpec::disk()
                .worker(1)
                .kind(FaultKind::Slow(Duration::from_millis(2)))
                .at(5),
            1,
            "waited 2ms more",
        ),
    ];
    for (what, spec, fired, detection) in cases {
        let report = run(&c, spec, what);
        match &report.verdict {
            Verdict::BitwiseEqual { tensors: n, values } => {
                assert_eq!(*n, common::chaos_state_tensors(&c), "{what}: every tensor compared");
                assert!(*values > 0);
            }
            other => panic!("{what}: {other:?}\n{}", report.markdown()),
        }
        assert_eq!(report.disturbed_steps.len(), 8, "{what}");
        let f = &report.faults[0];
        assert_eq!(f.fired, fired, "{what}: {}", report.markdown());
        assert!(
            f.detection.contains(detection)
                && f.detection.contains("its step went on")
                && f.detection.contains("expert"),
            "{what}: {}",
            f.detection
        );
        assert_eq!(f.kind.split(' ').next(), Some(what));
        assert_eq!((report.replays, report.restarts), (0, 0), "{what}: nothing to replay");
    }
}

#[test]
fn a_lasting_read_error_or_a_full_disk_stops_the_run_naming_the_file() {
    let c = config(8);
    // Three failures in a row outlast the two retries.
    let report = run(
        &c,
        FaultSpec::disk().worker(0).kind(FaultKind::ReadError).at(2).times(3),
        "lasting read-error",
    );
    match &report.verdict {
        Verdict::Stopped { step, error, after_s } => {
            assert_eq!(*step, 2, "{error}");
            for want in [
                "expert store of worker 0",
                "cannot read an expert from the disk tier",
                "worker-0",
                "experts.slots",
                "os error 5",
                "attempt 3 of 3",
            ] {
                assert!(error.contains(want), "{want}: {error}");
            }
            assert!(*after_s < 10.0, "stopped at once, not at a deadline: {after_s} s");
        }
        other => panic!("lasting read-error: {other:?}\n{}", report.markdown()),
    }
    assert_eq!(report.faults[0].fired, 3);
    assert!(
        report.faults[0].detection.contains("failed with EIO"),
        "{}",
        report.faults[0].detection
    );

    let report = run(&c, FaultSpec::disk().worker(1).kind(FaultKind::DiskFull).at(3), "full");
    match &report.verdict {
        Verdict::Stopped { step, error, after_s } => {
            assert!((3..=4).contains(step), "step {step}: {error}");
            for want in [
                "expert store of worker 1",
                "storage.device_budget",
                "cannot write",
                "worker-1",
                "is full",
                "os error 28",
            ] {
                assert!(error.contains(want), "{want}: {error}");
            }
            assert!(*after_s < 10.0, "stopped at once, not at a deadline: {after_s} s");
        }
        other => panic!("full: {other:?}\n{}", report.markdown()),
    }
    assert_eq!(report.faults[0].fired, 1, "a full disk is not retried");
}

/// `scenarios/dying-disk.toml`: the slow disk, the short read and the retried errors of steps 2 to
/// 5 change nothing; the read that fails three times in a row at step 6 stops the run, in the
/// library and through `semoe chaos` (exit status 2, the report naming the fault).
#[test]
fn the_dying_disk_scenario_stops_at_step_6_naming_the_file() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/dying-disk.toml");
    let scenario = Scenario::from_file(&file).expect("parses");
    let c = config(8);
    let started = Instant::now();
    let report = chaos::run(&c, &scenario).expect("runs");
    eprintln!("dying-disk: {} in {:.2?}", report.verdict_line(), started.elapsed());
    match &report.verdict {
        Verdict::Stopped { step, error, .. } => {
            assert_eq!(*step, 6, "{error}");
            assert!(
                error.contains("worker-0") && error.contains("experts.slots") && error.contains("os error 5"),
                "{error}"
            );
        }
        other => panic!("dying-disk: {other:?}\n{}", report.markdown()),
    }
    assert_eq!(report.disturbed_steps.len(), 6, "steps 0 to 5 committed");
    let fired: Vec<usize> = report.faults.iter().map(|f| f.fired).collect();
    assert_eq!(fired, vec![1, 1, 1, 2, 3], "{}", report.markdown());
    for f in &report.faults[..4] {
        assert!(f.detection.contains("its step went on"), "{}", f.detection);
    }
    assert!(
        report.faults[4].detection.contains("step 6 failed"),
        "{}",
        report.faults[4].detection
    );
    assert_eq!(report.replays, 0);

    let dir = common::TempDir::new("chaos-disk-cli");
    let unit = ExpertSlot::bytes_for(c.model.d_model, c.model.d_ff);
    let budget = (2 * unit).to_string();
    let run = dir.path().join("run");
    let out = common::chaos_command(&file, &run, "8", &["--host-budget", "0", "--device-budget", &budget]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verdict: stopped at step 6"), "{stdout}");
    let md = std::fs::read_to_string(run.join("chaos.md")).expect("chaos.md");
    assert!(
        md.contains("disk tier of worker 0") && md.contains("short-read") && md.contains("Disk tiers read"),
        "{md}"
    );
}

/// The scenario of seed `seed`: random disk faults the tier gets past (single read and write
/// errors, short reads) and random expert panics (the same as `scenarios/flaky-disk.toml`).
fn disk_soak_scenario(seed: u64) -> Scenario {
    Scenario::builder()
        .seed(seed)
        .deadline(Duration::from_secs(600))
        .fault(FaultSpec::disk().kind(FaultKind::ReadError).random(0.2))
        .fault(FaultSpec::disk().kind(FaultKind::WriteError).random(0.2))
        .fault(FaultSpec::disk().kind(FaultKind::ShortRead).random(0.2))
        .fault(FaultSpec::expert().panic().random(0.05))
        .build()
        .expect("valid")
}

/// [`disk_soak_scenario`] over 20 seeds, 2 workers for even seeds and 3 for odd ones: every seed
/// ends bitwise equal, with restarts from the expert panics alone. A failure names its seed.
#[test]
fn a_randomised_disk_soak_over_20_seeds_ends_bitwise_equal() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/flaky-disk.toml");
    let from_file = Scenario::from_file(&file).expect("parses");
    assert_eq!(
        from_file,
        disk_soak_scenario(from_file.seed),
        "the file is the suite's soak"
    );
    let started = Instant::now();
    let (mut fired, mut disk_fired) = (0, 0);
    for seed in 0..20u64 {
        let mut c = config(10);
        c.train.workers = 2 + (seed as usize % 2);
        let scenario = disk_soak_scenario(seed);
        let what = format!(
            "disk soak seed {seed} on {} workers (replay it: `semoe chaos --scenario scenarios/flaky-disk.toml` with \
             `seed = {seed}` and the small model and budgets of this test)",
            c.train.workers
        );
        let report = chaos::run(&c, &scenario).unwrap_or_else(|e| panic!("{what}: {e}"));
        match &report.verdict {
            Verdict::BitwiseEqual { tensors: n, .. } => assert_eq!(*n, common::chaos_state_tensors(&c), "{what}"),
            other => panic!("{what}: {other:?}\n{}", report.markdown()),
        }
        let panics: usize = report
            .faults
            .iter()
            .filter(|f| f.kind == "panic")
            .map(|f| f.fired)
            .sum();
        assert_eq!(report.restarts, panics, "{what}: restarts come from the panics alone");
        assert!(report.disk_bytes[0] > 0, "{what}: the Disk tier was used");
        fired += report.faults.iter().map(|f| f.fired).sum::<usize>();
        disk_fired += report
            .faults
            .iter()
            .filter(|f| f.target.starts_with("disk"))
            .map(|f| f.fired)
            .sum::<usize>();
    }
    eprintln!(
        "disk soak: 20 seeds, {fired} faults fired ({disk_fired} of the disk), in {:.1?}",
        started.elapsed()
    );
    assert!(disk_fired >= 60, "only {disk_fired} disk faults fired");
}
