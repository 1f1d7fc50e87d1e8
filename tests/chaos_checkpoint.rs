//! Checkpoint faults in chaos runs: bad `checkpoint` entries are errors naming the key; a save
//! interrupted halfway through its optimizer file fails naming the file and the errno, leaves no
//! `step-*` directory, and the run resumes from the previous checkpoint (still intact and verified)
//! and ends bitwise equal to the undisturbed run; a byte flipped in a checkpoint's model file is
//! caught by its SHA-256 when the run resumes, the damaged checkpoint is named and set aside, and
//! the run resumes from the one before and ends bitwise equal.

mod common;

use semoe::chaos::{FaultKind, FaultSpec, Scenario};
use semoe::train::chaos::{self, ChaosReport, Verdict};
use semoe::train::config::TrainConfig;
use std::path::Path;
use std::time::{Duration, Instant};

fn config(steps: u64) -> TrainConfig {
    let mut c = common::small_config(steps);
    c.train.workers = 2;
    c
}

fn run_in(c: &TrainConfig, spec: FaultSpec, dir: &Path, what: &str) -> ChaosReport {
    let scenario = Scenario::builder()
        .deadline(Duration::from_secs(60))
        .fault(spec)
        .build()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let started = Instant::now();
    let report = chaos::run_in(c, &scenario, dir).unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: {} in {:.2?}", report.verdict_line(), started.elapsed());
    match &report.verdict {
        Verdict::BitwiseEqual { tensors, values } => {
            assert_eq!(
                *tensors,
                common::chaos_state_tensors(c),
                "{what}: every tensor compared"
            );
            assert!(*values > 0, "{what}: values compared");
        }
        other => panic!("{what}: {other:?}\n{}", report.markdown()),
    }
    assert_eq!(
        report.disturbed_steps.len() as u64,
        c.train.steps,
        "{what}: every step committed once in the end"
    );
    assert_eq!(report.faults[0].fired, 1, "{what}");
    report
}

fn checkpoints(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .expect("checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn bad_checkpoint_entries_are_errors_naming_the_key() {
    let fault = |body: &str| format!("[[fault]]\nactor = \"checkpoint\"\n{body}\n");
    let cases = [
        (fault("kind = \"crash\"\nstep = 1"), "fault[0].kind"),
        (fault("kind = \"panic\"\nstep = 1"), "fault[0].kind"),
        (fault("step = 1"), "fault[0].kind"),
        (fault("kind = \"corrupt\"\nstep = 1\nworker = 0"), "fault[0].worker"),
        (
            fault("kind = \"corrupt\"\nstep = 1\nmoment = \"any\""),
            "fault[0].moment",
        ),
        (fault("kind = \"interrupt\"\nstep = 1\ntimes = 2"), "fault[0].times"),
        (
            fault("kind = \"interrupt\"\nstep = 1\ndelay = \"1s\""),
            "fault[0].delay",
        ),
        (fault("kind = \"interrupt\""), "fault[0].step"),
        (
            "[[fault]]\nactor = \"ledger\"\nkind = \"corrupt\"\nstep = 1\n".to_string(),
            "fault[0].kind",
        ),
    ];
    common::assert_scenarios_refused(&cases);
    let c = config(4);
    let layout = semoe::chaos::Layout::new(&c.model, 2, 4);
    let scenario = Scenario::builder()
        .fault(FaultSpec::checkpoint().at(4))
        .build()
        .expect("valid on its own");
    let err = scenario.plan(&layout).expect_err("step 4").to_string();
    assert!(err.contains("fault[0].step"), "{err}");
}

#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint_and_the_run_resumes_bitwise_equal() {
    let c = config(6);
    let dir = common::TempDir::new("chaos-interrupt");
    // The save after step 3 (of the state at step 4) fails; the one after step 2 is the newest.
    let report = run_in(&c, FaultSpec::checkpoint().at(3), dir.path(), "interrupt");
    let d = &report.faults[0].detection;
    for want in [
        "the save failed",
        "optimizer.safetensors",
        "of ",
        "bytes written",
        "os error 5",
        "resumed from",
        "step-00000003",
        "SHA-256 verified",
        "1 step(s) trained again",
    ] {
        assert!(d.contains(want), "{want}: {d}");
    }
    assert_eq!(report.faults[0].kind, "interrupt");
    // One checkpoint per step and the one before the first; no leftover of the interrupted save.
    let want: Vec<String> = (0..=6).map(|s| format!("step-{s:08}")).collect();
    assert_eq!(checkpoints(dir.path()), want);
}

#[test]
fn a_corrupted_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_one_before() {
    let c = config(6);
    let dir = common::TempDir::new("chaos-corrupt");
    // The checkpoint written after step 4 (step-00000005) gets a flipped bit.
    let report = run_in(
        &c,
        FaultSpec::checkpoint().kind(FaultKind::Corrupt).at(4),
        dir.path(),
        "corrupt",
    );
    let d = &report.faults[0].detection;
    for want in [
        "model.safetensors",
        "flipped",
        "step-00000005",
        "SHA-256 mismatch",
        "damaged-step-00000005",
        "resumed from",
        "step-00000004",
        "1 step(s) trained again",
    ] {
        assert!(d.contains(want), "{want}: {d}");
    }
    let mut want: Vec<String> = (0..=6).map(|s| format!("step-{s:08}")).collect();
    want.insert(0, "damaged-step-00000005".into());
    assert_eq!(checkpoints(dir.path()), want);
    // The damaged copy stays as it was found: loading it still fails on its digest.
    let err = semoe::storage::checkpoint::load(&dir.path().join("checkpoints/damaged-step-00000005"))
        .expect_err("damaged")
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("SHA-256 mismatch"),
        "{err}"
    );
}

/// `scenarios/torn-checkpoints.toml` through `semoe chaos`: exit status 0 (bitwise equal), both
/// faults in the report, the damaged checkpoint set aside in the run directory.
#[test]
fn the_torn_checkpoints_scenario_ends_bitwise_equal_through_the_command() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/torn-checkpoints.toml");
    let dir = common::TempDir::new("chaos-torn-cli");
    let run = dir.path().join("run");
    let out = common::chaos_command(&file, &run, "8", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verdict: bitwise equal"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("chaos.json")).expect("chaos.json")).expect("json");
    let kinds: Vec<&str> = json["faults"]
        .as_array()
        .expect("faults")
        .iter()
        .map(|f| f["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["interrupt", "corrupt"]);
    for fault in json["faults"].as_array().expect("faults") {
        assert_eq!(fault["fired"], 1, "each fault fired once: {fault}");
    }
    assert!(json["faults"][1]["detection"]
        .as_str()
        .is_some_and(|d| d.contains("SHA-256 mismatch")));
    let names = checkpoints(&run);
    assert!(
        names.contains(&"damaged-step-00000005".to_string()) && names.contains(&"step-00000008".to_string()),
        "{names:?}"
    );
}
