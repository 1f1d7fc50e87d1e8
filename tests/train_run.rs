//! The training loop end to end on a small model: the loss falls, the same seed gives bitwise the
//! same parameters (whatever the thread count), a resumed run ends bitwise identical to an
//! uninterrupted one, and bad data or a corrupt checkpoint is a clear error.

mod common;

use semoe::model::gpt::GptConfig;
use semoe::train::{TrainConfig, Trainer};
use std::path::PathBuf;

/// A run directory (not yet created) inside a fresh temporary directory that is removed when the
/// guard is dropped, also when the test fails.
fn temp_dir(name: &str) -> (common::TempDir, PathBuf) {
    let tmp = common::TempDir::new(name);
    let dir = tmp.path().join("run");
    (tmp, dir)
}

fn small(steps: u64) -> TrainConfig {
    let mut c = TrainConfig {
        model: GptConfig {
            block_size: 32,
            d_model: 32,
            n_layer: 2,
            n_head: 2,
            d_ff: 48,
            experts: 4,
            k: 2,
            ..GptConfig::default()
        },
        ..TrainConfig::default()
    };
    c.optimizer.warmup = 5;
    c.train.steps = steps;
    c.train.batch = 8;
    c.train.groups = 2;
    c.train.eval_every = 0;
    c.train.eval_windows = 32;
    c.train.checkpoint_every = 0;
    c
}

#[test]
fn loss_falls_on_the_bundled_corpus() {
    let (_tmp, dir) = temp_dir("falls");
    let mut t = Trainer::new(small(60), &dir).expect("trainer");
    let before = t.evaluate().expect("eval");
    let summary = t.run(false).expect("run");
    assert!(
        before > 5.0,
        "an untrained byte model starts near ln(256) = 5.5, got {before}"
    );
    // 60 steps take it to about 3.29 on the development machine; the margin absorbs other CPUs' rounding.
    assert!(
        summary.val_loss < 3.6,
        "validation loss {before} -> {} should fall below 3.6",
        summary.val_loss
    );
    let log = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    assert_eq!(log.lines().filter(|l| l.contains("\"kind\":\"train\"")).count(), 60);
    assert!(dir.join("config.toml").exists());
}

#[test]
fn same_seed_same_bits_for_one_and_two_threads() {
    let run = |threads: usize, name: &str| {
        let mut c = small(8);
        c.train.threads = threads;
        let (_tmp, dir) = temp_dir(name);
        let mut t = Trainer::new(c, &dir).expect("trainer");
        for _ in 0..8 {
            t.step().expect("step");
        }
        common::trainer_state_bits(&mut t)
    };
    let a = run(2, "seed-a");
    common::assert_same(&a, &run(2, "seed-b"), "same seed, same thread count");
    common::assert_same(&a, &run(1, "seed-c"), "one thread against two");
}

#[test]
fn resume_ends_bitwise_identical_to_an_uninterrupted_run() {
    let (_straight_tmp, straight_dir) = temp_dir("straight");
    let mut straight = Trainer::new(small(12), &straight_dir).expect("trainer");
    straight.run(false).expect("run");

    let (_tmp, dir) = temp_dir("resumed");
    let mut first = Trainer::new(small(12), &dir).expect("trainer");
    for _ in 0..5 {
        first.step().expect("step");
    }
    first.save_checkpoint(1.0).expect("checkpoint");
    for _ in 0..3 {
        first
            .step()
            .expect("steps after the checkpoint are lost, as in a crash");
    }
    drop(first);
    // The log as a crash leaves it: lines of steps after the copy, a torn last line.
    {
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("metrics.jsonl"))
            .expect("log");
        for step in [4, 6, 8] {
            writeln!(log, "{{\"kind\":\"note\",\"step\":{step}}}").expect("a line");
        }
        log.write_all(b"{\"kind\":\"note\",\"torn").expect("torn line");
    }
    let mut resumed = Trainer::resume(&dir, None).expect("resume");
    assert_eq!(resumed.steps_done(), 5);
    // The log keeps what is of the copy's steps, drops the lines after it and the torn line (it
    // holds no record).
    let log = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("log");
    assert!(log.contains("{\"kind\":\"note\",\"step\":4}\n"), "{log}");
    assert!(!log.contains("\"step\":6") && !log.contains("\"step\":8"), "{log}");
    assert!(
        log.ends_with("{\"kind\":\"note\",\"step\":4}\n") && !log.contains("torn"),
        "the torn line went: {log}"
    );
    resumed.run(false).expect("run");
    common::assert_same(
        &common::trainer_state_bits(&mut straight),
        &common::trainer_state_bits(&mut resumed),
        "resumed against straight (parameters and AdamW state)",
    );
    drop(resumed);

    // A fresh run refuses to overwrite it.
    let err = Trainer::new(small(12), &dir).err().expect("must refuse").to_string();
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn a_corrupt_checkpoint_is_refused_with_a_clear_error() {
    let (_tmp, dir) = temp_dir("corrupt");
    let mut t = Trainer::new(small(3), &dir).expect("trainer");
    t.run(false).expect("run");
    drop(t);
    let ckpt = semoe::storage::checkpoint::latest(&dir)
        .expect("list")
        .expect("a checkpoint");
    let file = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&file).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&file, bytes).expect("write");
    let err = semoe::train::trainer::load_model(&ckpt)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("SHA-256"), "{err}");
    let err = Trainer::resume(&dir, Some(6)).err().expect("must fail").to_string();
    assert!(err.contains("SHA-256") && err.contains("model.safetensors"), "{err}");
}

#[test]
fn bad_training_data_is_a_clear_error() {
    let (_tmp, dir) = temp_dir("data");
    std::fs::create_dir_all(&dir).expect("dir");
    let cases: [(&str, &[u8], &str); 3] = [
        ("empty.txt", b"  \n\n ", "empty"),
        ("binary.bin", b"PK\x03\x04\x00\x00binary", "binary"),
        ("latin1.txt", b"caf\xe9 au lait and more text", "not UTF-8"),
    ];
    for (name, bytes, word) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        let mut c = small(2);
        c.train.data = Some(path);
        let err = Trainer::new(c, &dir.join(format!("run-{name}")))
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains(word) && err.contains(name), "{name}: {err}");
    }
    let mut c = small(2);
    c.train.data = Some(dir.join("missing.txt"));
    let err = Trainer::new(c, &dir.join("run-missing"))
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("missing.txt"), "{err}");
    let short = dir.join("short.txt");
    std::fs::write(&short, "To be, or not to be.").expect("write");
    let mut c = small(2);
    c.train.data = Some(short);
    let err = Trainer::new(c, &dir.join("run-short"))
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("each split needs at least 33 bytes"), "{err}");
}

#[test]
fn bad_config_is_a_clear_error() {
    let mut c = small(2);
    c.train.batch = 6;
    c.train.groups = 4;
    assert!(c.validate().expect_err("error").to_string().contains("train.batch"));
    let mut c = small(2);
    c.model.n_head = 5;
    assert!(c.validate().expect_err("error").to_string().contains("n_head"));
    let (_tmp, dir) = temp_dir("toml");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[model]\nd_modle = 64\n").expect("write");
    let err = TrainConfig::from_file(&file).expect_err("error").to_string();
    assert!(err.contains("d_modle"), "{err}");
}

/// The traffic record of a run over 3 in-process workers: every pair exchanges, and what goes out
/// comes back in the same shape (each expert output has its input's rows; each input gradient its
/// output's), so the bytes of a kind one way equal those of its answer the other way.
#[test]
fn the_traffic_between_workers_is_logged_and_reported() {
    let (_tmp, dir) = temp_dir("traffic");
    let mut c = small(4);
    c.train.workers = 3;
    // Workers beyond the groups run no group: they answer but dispatch nothing.
    let groups = c.train.groups as u64;
    assert!(groups >= 2, "{groups} groups");
    let mut t = Trainer::new(c, &dir).expect("trainer");
    t.run(false).expect("run");
    drop(t);
    let log = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    let records: Vec<semoe::train::log::TrafficRecord> = log
        .lines()
        .filter(|l| l.contains("\"kind\":\"traffic\""))
        .map(|l| serde_json::from_str(l).expect("a traffic record"))
        .collect();
    assert_eq!(records.len(), 1, "one traffic record at the end");
    let rec = &records[0];
    assert_eq!(rec.step, 4);
    assert!(!rec.members, "in one process the cells are worker indices");
    let bytes = |from: u64, to: u64, kind: &str| {
        rec.entries
            .iter()
            .filter(|e| e.from == from && e.to == to && e.kind == kind)
            .map(|e| e.bytes)
            .sum::<u64>()
    };
    for from in 0..3 {
        for to in (0..3).filter(|&to| to != from) {
            let dispatch = bytes(from, to, "dispatch");
            assert_eq!(
                dispatch > 0,
                from < groups,
                "worker {from} to worker {to}: {:?}",
                rec.entries
            );
            assert_eq!(dispatch, bytes(to, from, "combine"), "{from} -> {to} and back");
            let grad_dispatch = bytes(from, to, "grad_dispatch");
            assert_eq!(
                grad_dispatch > 0,
                from < groups,
                "worker {from} to worker {to}, backward: {:?}",
                rec.entries
            );
            assert_eq!(
                grad_dispatch,
                bytes(to, from, "grad_combine"),
                "{from} -> {to} and back, backward"
            );
        }
    }
    assert!(rec.entries.iter().all(|e| e.from < 3 && e.to < 3 && e.bytes > 0));
    semoe::telemetry::write_report(&dir).expect("report");
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report");
    assert!(report.contains("## Traffic between workers (to step 4)"), "{report}");
    assert!(report.contains("| worker | to 0 | to 1 | to 2 | sent |"), "{report}");
}

/// A run stopped early records its traffic too, and a resumed run's record says it counts from
/// the step it resumed at (its counters start at zero), as does the report.
#[test]
fn a_stopped_and_resumed_run_records_the_traffic_of_each_part() {
    let (_tmp, dir) = temp_dir("traffic-resumed");
    let mut c = small(6);
    c.train.workers = 2;
    // The stop comes right after a periodic checkpoint: recorded all the same.
    c.train.checkpoint_every = 3;
    let mut t = Trainer::new(c, &dir).expect("trainer");
    t.stop_at(3);
    t.run(false).expect("run to the stop");
    drop(t);
    let records = |dir: &std::path::Path| -> Vec<semoe::train::log::TrafficRecord> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .filter(|l| l.contains("\"kind\":\"traffic\""))
            .map(|l| serde_json::from_str(l).expect("a traffic record"))
            .collect()
    };
    let stopped = records(&dir);
    assert_eq!(stopped.len(), 1, "a record where the run stopped");
    assert_eq!((stopped[0].since, stopped[0].step), (0, 3));
    assert!(
        stopped[0].entries.iter().any(|e| e.bytes > 0),
        "{:?}",
        stopped[0].entries
    );
    let mut resumed = Trainer::resume(&dir, None).expect("resume");
    resumed.run(false).expect("run to the end");
    drop(resumed);
    let all = records(&dir);
    assert_eq!(all.len(), 2, "one record per part");
    assert_eq!((all[1].since, all[1].step), (3, 6));
    semoe::telemetry::write_report(&dir).expect("report");
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report");
    assert!(
        report.contains("## Traffic between workers (steps 3 to 6)")
            && report.contains("counted since the run resumed at step 3"),
        "{report}"
    );
}

#[test]
fn a_run_shorter_than_its_warmup_is_told_so() {
    let (_tmp, dir) = temp_dir("short");
    let t = Trainer::new(small(3), &dir).expect("trainer");
    let notices = t.notices().join("\n");
    assert!(
        notices.contains("3 steps end inside optimizer.warmup (5 steps)"),
        "{notices}"
    );
    drop(t);
    let (_tmp, dir) = temp_dir("long-enough");
    let t = Trainer::new(small(8), &dir).expect("trainer");
    assert!(t.notices().is_empty(), "{:?}", t.notices());
}

#[test]
fn a_finished_runtime_run_resumed_reports_itself_without_starting_the_runtime() {
    let (_tmp, dir) = temp_dir("finished");
    let mut c = small(3);
    c.train.workers = 2;
    let mut t = Trainer::new(c, &dir).expect("trainer");
    t.run(false).expect("run");
    let want = common::bits(t.model().expect("model"));
    // A runtime reports its workers' figures (one entry each); without one there are none.
    assert_eq!(t.dense_stats().len(), 2, "the run trained on the runtime");
    drop(t);
    let mut resumed = Trainer::resume(&dir, None).expect("resume");
    assert_eq!(resumed.steps_done(), 3);
    assert!(
        resumed.dense_stats().is_empty(),
        "a runtime was started for a finished run"
    );
    let summary = resumed.run(false).expect("a finished run reports itself");
    assert_eq!(summary.steps, 3);
    common::assert_same(
        &want,
        &common::bits(resumed.model().expect("model")),
        "the finished run's model",
    );
}
