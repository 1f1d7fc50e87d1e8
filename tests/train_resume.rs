//! Resume's rules, through the library: the settings that do not change the bits may change and
//! the run still ends bitwise identical; the others are refused by name; the training text is
//! checked against the checkpoint's digest; a damaged newest checkpoint is passed over with a
//! notice and kept aside; a finished run appends nothing; a stop request checkpoints where it
//! stopped; divergence is reported as divergence.

mod common;

use common::TempDir;
use semoe::storage::checkpoint;
use semoe::train::trainer::{ResumeOptions, StopReason};
use semoe::train::{TrainConfig, Trainer};
use std::sync::atomic::Ordering;

fn small(steps: u64) -> TrainConfig {
    let mut c = common::small_config(steps);
    c.train.eval_windows = 16;
    c
}

/// The step, and every parameter and both AdamW moments as bits, by name.
type State = (u64, Vec<(String, Vec<u32>)>);

/// [`State`] of `t`, through a checkpoint.
fn state(t: &mut Trainer) -> State {
    let dir = t.save_checkpoint(0.0).expect("checkpoint");
    let ckpt = checkpoint::load(&dir).expect("load");
    let mut bits = Vec::new();
    for (part, tensors) in [("model", &ckpt.model), ("optimizer", &ckpt.optimizer)] {
        for (name, tensor) in tensors {
            bits.push((
                format!("{part}/{name}"),
                tensor.data.iter().map(|v| v.to_bits()).collect(),
            ));
        }
    }
    assert!(
        !ckpt.model.is_empty() && !ckpt.optimizer.is_empty(),
        "both parts are compared"
    );
    (ckpt.step, bits)
}

/// Fail unless `got` is `want`: the same step, then the same tensors by name, length and bits.
fn assert_state(got: &State, want: &State, what: &str) {
    assert_eq!(got.0, want.0, "{what}: step");
    common::assert_same(&want.1, &got.1, what);
}

fn straight(steps: u64) -> State {
    let tmp = TempDir::new("resume-straight");
    let mut t = Trainer::new(small(steps), &tmp.path().join("run")).expect("trainer");
    t.run(false).expect("run");
    state(&mut t)
}

/// A run stopped after `stop_after` steps, its trainer dropped.
fn stopped_run(dir: &std::path::Path, config: TrainConfig, stop_after: u64) {
    let mut t = Trainer::new(config, dir).expect("trainer");
    t.stop_at(stop_after);
    let summary = t.run(false).expect("run");
    assert_eq!(summary.stop, StopReason::StopAt);
    assert_eq!(summary.steps, stop_after);
    assert_eq!(summary.steps_run, stop_after);
}

#[test]
fn a_stop_request_checkpoints_where_it_stopped() {
    let tmp = TempDir::new("resume-stop-flag");
    let dir = tmp.path().join("run");
    let mut t = Trainer::new(small(12), &dir).expect("trainer");
    for _ in 0..3 {
        t.step().expect("step");
    }
    t.stop_flag().store(15, Ordering::SeqCst);
    let summary = t.run(false).expect("run");
    assert_eq!(summary.stop, StopReason::Requested(15));
    assert_eq!((summary.steps, summary.steps_run), (3, 0));
    assert_eq!(summary.checkpoint, checkpoint::checkpoint_dir(&dir, 3));
    assert!(summary.val_loss.is_finite());
}

#[test]
fn resume_applies_settings_that_keep_the_bits_and_ends_identical() {
    let want = straight(12);
    let tmp = TempDir::new("resume-applies");
    let dir = tmp.path().join("run");
    stopped_run(&dir, small(12), 5);
    let mut t = Trainer::resume_with(&dir, None, |c| {
        c.train.threads = 1;
        c.train.workers = 2;
        c.train.placement = "blocked".into();
        c.train.eval_every = 4;
        c.train.checkpoint_every = 3;
    })
    .expect("resume");
    assert_eq!(t.steps_done(), 5);
    let notices = t.notices().join("\n");
    assert!(notices.contains("train.workers (run: 1, asked: 2)"), "{notices}");
    assert!(notices.contains("train.threads (run: 2, asked: 1)"), "{notices}");
    let summary = t.run(false).expect("run");
    assert_eq!(summary.stop, StopReason::Finished);
    assert_state(&state(&mut t), &want, "resumed with other threads and workers");
    drop(t);
    let recorded = TrainConfig::from_file(&dir.join("config.toml")).expect("config");
    assert_eq!(recorded.train.workers, 2, "the run's config says what it ran with");
}

#[test]
fn resume_refuses_settings_that_change_the_bits_naming_each() {
    let tmp = TempDir::new("resume-refuses");
    let dir = tmp.path().join("run");
    stopped_run(&dir, small(12), 3);
    let err = Trainer::resume_with(&dir, None, |c| {
        c.optimizer.lr = 0.01;
        c.model.d_ff = 32;
        c.train.seed = 7;
        c.train.threads = 1;
    })
    .err()
    .expect("must refuse")
    .to_string();
    for field in ["optimizer.lr (run: 0.003, asked: 0.01)", "model.d_ff", "train.seed"] {
        assert!(err.contains(field), "{field} not named: {err}");
    }
    assert!(!err.contains("train.threads"), "threads may change: {err}");
}

#[test]
fn a_config_toml_edited_by_hand_cannot_change_the_bits_either() {
    let tmp = TempDir::new("resume-edited-config");
    let dir = tmp.path().join("run");
    stopped_run(&dir, small(12), 3);
    // config.toml says another seed than the one the checkpoint was trained with; no temporary
    // file is left beside it by the run's own writes.
    let path = dir.join("config.toml");
    let mut edited = small(12);
    edited.train.seed += 1;
    std::fs::write(&path, edited.to_toml().expect("toml")).expect("edit config.toml");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("run dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let err = Trainer::resume_with(&dir, None, |_| {})
        .err()
        .expect("must refuse")
        .to_string();
    assert!(err.contains("config.toml disagrees"), "{err}");
    assert!(err.contains("train.seed"), "{err}");
    // Restored, the run resumes.
    std::fs::write(&path, small(12).to_toml().expect("toml")).expect("restore config.toml");
    Trainer::resume_with(&dir, None, |_| {}).expect("resume with the checkpoint's settings");
}

#[test]
fn resume_on_different_text_is_refused_unless_allowed() {
    let tmp = TempDir::new("resume-data");
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "Now is the winter of our discontent.\n".repeat(60)).expect("text");
    let mut c = small(12);
    c.train.data = Some(text.clone());
    let dir = tmp.path().join("run");
    stopped_run(&dir, c, 3);
    std::fs::write(&text, "Made glorious summer by this sun of York.\n".repeat(60)).expect("text");
    let err = Trainer::resume(&dir, None).err().expect("must refuse").to_string();
    assert!(err.contains("SHA-256") && err.contains("--allow-data-change"), "{err}");
    let options = ResumeOptions {
        allow_data_change: true,
        ..ResumeOptions::default()
    };
    let t = Trainer::resume_with_options(&dir, &options, |_| {}).expect("allowed");
    assert!(
        t.notices().iter().any(|n| n.contains("differs from the checkpoint's")),
        "{:?}",
        t.notices()
    );
}

#[test]
fn a_damaged_newest_checkpoint_is_passed_over_with_a_notice_and_kept() {
    for damage in ["flip a byte", "remove the manifest", "garble the manifest"] {
        let want = straight(8);
        let tmp = TempDir::new("resume-damaged");
        let dir = tmp.path().join("run");
        let mut c = small(8);
        c.train.checkpoint_every = 3;
        c.train.keep_checkpoints = 3;
        let mut t = Trainer::new(c, &dir).expect("trainer");
        for _ in 0..6 {
            t.step().expect("step");
            if t.steps_done().is_multiple_of(3) {
                t.save_checkpoint(0.0).expect("checkpoint");
            }
        }
        drop(t);
        let newest = checkpoint::checkpoint_dir(&dir, 6);
        match damage {
            "flip a byte" => {
                let file = newest.join("model.safetensors");
                let mut bytes = std::fs::read(&file).expect("read");
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x01;
                std::fs::write(&file, bytes).expect("write");
            }
            "remove the manifest" => std::fs::remove_file(newest.join("manifest.json")).expect("remove"),
            _ => std::fs::write(newest.join("manifest.json"), "{ not json").expect("write"),
        }
        let resolved = checkpoint::newest_intact(&dir).expect("resolve");
        assert_eq!(resolved.checkpoint.as_ref().map(|c| c.step), Some(3), "{damage}");
        assert_eq!(resolved.damaged.len(), 1, "{damage}");
        assert_eq!(resolved.damaged[0].dir, newest, "{damage}");

        let mut t = Trainer::resume(&dir, None).expect("resume");
        assert_eq!(t.steps_done(), 3, "{damage}");
        let notices = t.notices().join("\n");
        assert!(
            notices.contains("step-00000006 is damaged") && notices.contains("resumes from"),
            "{damage}: {notices}"
        );
        assert!(
            dir.join("checkpoints/damaged-step-00000006").is_dir(),
            "{damage}: set aside"
        );
        t.run(false).expect("run");
        assert_state(&state(&mut t), &want, damage);
    }
}

#[test]
fn no_intact_checkpoint_names_each_damaged_one_and_sets_it_aside_for_a_fresh_start() {
    let tmp = TempDir::new("resume-none");
    let dir = tmp.path().join("run");
    let mut t = Trainer::new(small(3), &dir).expect("trainer");
    t.run(false).expect("run");
    drop(t);
    let ckpt = checkpoint::latest(&dir).expect("list").expect("one");
    let file = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[100] ^= 0x10;
    std::fs::write(&file, bytes).expect("write");
    // Before the resume, a fresh start is refused (it would replace the run's checkpoints).
    let err = Trainer::new(small(3), &dir).err().expect("refused").to_string();
    assert!(err.contains("--resume"), "{err}");
    let err = Trainer::resume(&dir, None).err().expect("must fail").to_string();
    assert!(err.contains("no intact checkpoint"), "{err}");
    assert!(err.contains("SHA-256") && err.contains("model.safetensors"), "{err}");
    assert!(err.contains("moved to") && err.contains("a fresh start"), "{err}");
    // Kept for inspection, out of the way: the directory takes a fresh start, as the error says.
    assert!(!ckpt.exists());
    assert!(dir.join("checkpoints/damaged-step-00000003").is_dir());
    let mut t = Trainer::new(small(3), &dir).expect("a fresh start after the resume set it aside");
    t.run(false).expect("run");
    assert!(dir
        .join("checkpoints/damaged-step-00000003/model.safetensors")
        .is_file());
}

/// Falling back past a checkpoint set aside keeps the log lines of its steps in a file of their
/// own (the checkpoint may have been unreadable only for a while), and the resumed run writes
/// those steps' lines again.
#[test]
fn a_fall_back_keeps_the_dropped_log_lines_in_their_own_file() {
    let tmp = TempDir::new("resume-fallback-log");
    let dir = tmp.path().join("run");
    let mut c = small(6);
    c.train.checkpoint_every = 3;
    c.train.keep_checkpoints = 3;
    Trainer::new(c, &dir).expect("trainer").run(false).expect("run");
    let log_steps = |path: &std::path::Path| -> Vec<u64> {
        let text = std::fs::read_to_string(path).expect("log");
        text.lines()
            .filter(|l| l.contains("\"kind\":\"train\""))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a record");
                v["step"].as_u64().expect("step")
            })
            .collect()
    };
    let log = dir.join("metrics.jsonl");
    assert_eq!(log_steps(&log), [1, 2, 3, 4, 5, 6]);
    std::fs::write(checkpoint::checkpoint_dir(&dir, 6).join("manifest.json"), "{ not json").expect("damage");
    let mut t = Trainer::resume(&dir, None).expect("resume");
    assert_eq!(t.steps_done(), 3);
    let side = dir.join("metrics.after-step-00000003.jsonl");
    assert_eq!(log_steps(&side), [4, 5, 6], "the dropped lines are kept");
    assert_eq!(log_steps(&log), [1, 2, 3]);
    let notices = t.notices().join("\n");
    assert!(notices.contains("metrics.after-step-00000003.jsonl"), "{notices}");
    t.run(false).expect("run");
    assert_eq!(log_steps(&log), [1, 2, 3, 4, 5, 6]);
}

/// A fall-back resume that fails before it has kept the dropped log lines (here: their file
/// cannot be written) leaves the damaged checkpoint where it was, so that the next resume keeps
/// the lines. (The checkpoint was set aside first: the next resume found nothing damaged and
/// dropped the lines for good.)
#[test]
fn a_fall_back_that_fails_midway_loses_no_log_line() {
    let tmp = TempDir::new("resume-fallback-interrupted");
    let dir = tmp.path().join("run");
    let mut c = small(6);
    c.train.checkpoint_every = 3;
    c.train.keep_checkpoints = 3;
    Trainer::new(c, &dir).expect("trainer").run(false).expect("run");
    let damaged = checkpoint::checkpoint_dir(&dir, 6);
    std::fs::write(damaged.join("manifest.json"), "{ not json").expect("damage");
    // The side file's temporary name taken by a directory: writing it fails.
    let blocker = dir.join(format!(".metrics.after-step-00000003.jsonl.tmp-{}", std::process::id()));
    std::fs::create_dir_all(blocker.join("x")).expect("blocker");
    let err = Trainer::resume(&dir, None)
        .err()
        .expect("the side file cannot be written");
    assert!(err.to_string().contains("metrics.after-step-00000003"), "{err}");
    assert!(damaged.is_dir(), "the damaged checkpoint is still there to be found");
    std::fs::remove_dir_all(&blocker).expect("unblock");
    let t = Trainer::resume(&dir, None).expect("resume");
    assert_eq!(t.steps_done(), 3);
    let side = std::fs::read_to_string(dir.join("metrics.after-step-00000003.jsonl")).expect("the kept lines");
    assert_eq!(side.matches("\"kind\":\"train\"").count(), 3, "{side}");
    assert!(!damaged.exists() && dir.join("checkpoints/damaged-step-00000006").is_dir());
}

/// A checkpoint another version of semoe wrote is not damage: the resume stops naming it, and
/// nothing is set aside or dropped from the log.
#[test]
fn a_checkpoint_of_another_format_version_is_refused_not_set_aside() {
    let tmp = TempDir::new("resume-newer");
    let dir = tmp.path().join("run");
    let mut c = small(6);
    c.train.checkpoint_every = 3;
    c.train.keep_checkpoints = 3;
    Trainer::new(c, &dir).expect("trainer").run(false).expect("run");
    let newest = checkpoint::checkpoint_dir(&dir, 6);
    let manifest = newest.join("manifest.json");
    let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).expect("read")).expect("json");
    value["format_version"] = serde_json::json!(2);
    std::fs::write(&manifest, serde_json::to_vec(&value).expect("ser")).expect("write");
    let log = std::fs::read(dir.join("metrics.jsonl")).expect("log");
    let err = Trainer::resume(&dir, None).err().expect("refused").to_string();
    assert!(
        err.contains("format_version 2") && err.contains("another version"),
        "{err}"
    );
    assert!(newest.is_dir(), "left where it is");
    assert!(!dir.join("checkpoints/damaged-step-00000006").exists());
    assert_eq!(
        std::fs::read(dir.join("metrics.jsonl")).expect("log"),
        log,
        "the log is untouched"
    );
}

/// A log line cut short by a crash (no line end, not a record) is dropped at the resume, not kept
/// as a malformed record between the steps.
#[test]
fn a_torn_last_log_line_is_dropped_at_the_resume() {
    let tmp = TempDir::new("resume-torn");
    let dir = tmp.path().join("run");
    stopped_run(&dir, small(6), 3);
    let log = dir.join("metrics.jsonl");
    let before = std::fs::read_to_string(&log).expect("log");
    let mut torn = before.clone();
    torn.push_str("{\"kind\":\"train\",\"step\":3,\"to");
    std::fs::write(&log, &torn).expect("write");
    let mut t = Trainer::resume(&dir, None).expect("resume");
    assert_eq!(
        std::fs::read_to_string(&log).expect("log"),
        before,
        "the torn line went"
    );
    t.run(false).expect("run");
    let after = std::fs::read_to_string(&log).expect("log");
    assert!(after.ends_with('\n'));
    for (n, line) in after.lines().enumerate() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("line {}: {e}: {line}", n + 1));
    }
    // A complete last record without its line end is kept (and given one).
    let dir = tmp.path().join("run2");
    stopped_run(&dir, small(6), 3);
    let log = dir.join("metrics.jsonl");
    let before = std::fs::read_to_string(&log).expect("log");
    std::fs::write(&log, before.trim_end_matches('\n')).expect("write");
    drop(Trainer::resume(&dir, None).expect("resume"));
    assert_eq!(std::fs::read_to_string(&log).expect("log"), before);
}

/// A resumed run stopped before it takes a step (a Ctrl-C during its start-up) leaves the
/// checkpoint it resumed from as it was, and appends nothing to the log: it used to evaluate
/// again, log the step's evaluation and checkpoint twice, and replace the verified checkpoint
/// with a new copy.
#[test]
fn a_resume_stopped_before_its_first_step_saves_nothing_again() {
    use std::os::unix::fs::MetadataExt;
    let tmp = TempDir::new("resume-stopped-at-once");
    let dir = tmp.path().join("run");
    stopped_run(&dir, small(12), 3);
    let ckpt = checkpoint::checkpoint_dir(&dir, 3);
    let inode = |d: &std::path::Path| {
        std::fs::metadata(d.join(checkpoint::MANIFEST_FILE))
            .expect("manifest")
            .ino()
    };
    let (manifest, log) = (inode(&ckpt), std::fs::read(dir.join("metrics.jsonl")).expect("log"));
    let mut t = Trainer::resume(&dir, None).expect("resume");
    t.stop_flag().store(2, Ordering::SeqCst);
    let summary = t.run(false).expect("run");
    assert_eq!(summary.stop, StopReason::Requested(2));
    assert_eq!((summary.steps, summary.steps_run), (3, 0));
    assert_eq!(
        summary.checkpoint, ckpt,
        "the checkpoint it resumed from is the run's newest"
    );
    assert!(
        summary.val_loss.is_finite(),
        "the logged validation loss: {}",
        summary.val_loss
    );
    assert_eq!(inode(&ckpt), manifest, "the checkpoint was written again");
    assert_eq!(
        std::fs::read(dir.join("metrics.jsonl")).expect("log"),
        log,
        "lines were appended"
    );
}

#[test]
fn a_finished_run_appends_nothing() {
    let tmp = TempDir::new("resume-finished");
    let dir = tmp.path().join("run");
    let mut t = Trainer::new(small(4), &dir).expect("trainer");
    let first = t.run(false).expect("run");
    drop(t);
    let log = std::fs::read(dir.join("metrics.jsonl")).expect("log");
    let mut t = Trainer::resume(&dir, None).expect("resume");
    let again = t.run(false).expect("run");
    assert_eq!(again.stop, StopReason::AlreadyFinished);
    assert_eq!(again.steps_run, 0);
    assert_eq!(again.val_loss.to_bits(), first.val_loss.to_bits());
    assert_eq!(again.mean_train_loss.to_bits(), first.mean_train_loss.to_bits());
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).expect("log"), log);
}

#[test]
fn the_mean_train_loss_is_the_same_however_the_run_was_interrupted() {
    let tmp = TempDir::new("resume-mean");
    let mut t = Trainer::new(small(10), &tmp.path().join("a")).expect("trainer");
    let whole = t.run(false).expect("run");
    assert_eq!(whole.mean_train_loss_steps, 10);
    assert!(whole.mean_train_loss.is_finite());
    let dir = tmp.path().join("b");
    stopped_run(&dir, small(10), 4);
    let mut t = Trainer::resume(&dir, None).expect("resume");
    let resumed = t.run(false).expect("run");
    assert_eq!(resumed.mean_train_loss_steps, 10);
    assert_eq!(resumed.mean_train_loss.to_bits(), whole.mean_train_loss.to_bits());
    assert_eq!(resumed.val_loss.to_bits(), whole.val_loss.to_bits());
}

#[test]
fn a_run_directory_is_locked_while_a_trainer_lives() {
    let tmp = TempDir::new("resume-lock");
    let dir = tmp.path().join("run");
    let t = Trainer::new(small(4), &dir).expect("trainer");
    let err = Trainer::new(small(4), &dir).err().expect("must refuse").to_string();
    assert!(err.contains("in use by another semoe process"), "{err}");
    drop(t);
    // A start that fails before anything is written leaves no directory.
    let mut bad = small(4);
    bad.train.data = Some(tmp.path().join("missing.txt"));
    let fresh = tmp.path().join("fresh");
    let err = Trainer::new(bad, &fresh)
        .err()
        .expect("a missing data file must refuse")
        .to_string();
    assert!(err.contains("missing.txt"), "{err}");
    assert!(!fresh.exists(), "a failed start left {}", fresh.display());
    // One that fails after making its directory (a text too short to train on) removes it; a
    // directory that was there before, empty, is the user's and stays.
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "too short").expect("text");
    let mut bad = small(4);
    bad.train.data = Some(short);
    let made = tmp.path().join("made");
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).expect("the user's directory");
    for dir in [&made, &mine] {
        let err = Trainer::new(bad.clone(), dir)
            .err()
            .expect("a short text must refuse")
            .to_string();
        assert!(err.contains("short.txt"), "{err}");
    }
    assert!(!made.exists(), "a failed start left {}", made.display());
    assert!(mine.is_dir(), "a failed start removed the user's own directory");
}

/// `small(steps)` with steps of about lr = 1e30 each: activations overflow within a few steps.
/// (With decay, lr * weight_decay >= 1 is refused before the run.)
fn exploding(steps: u64, moe_every: usize, workers: usize) -> TrainConfig {
    let mut c = small(steps);
    c.model.moe_every = moe_every;
    c.optimizer.lr = 1e30;
    c.optimizer.weight_decay = 0.0;
    c.optimizer.warmup = 0;
    c.train.workers = workers;
    c
}

#[test]
fn divergence_is_reported_as_divergence() {
    // A dense model too: with no gate to meet the overflow first, the runtime finds it in the
    // gradient norm (it reported a runtime error there).
    for (workers, moe_every) in [(0, 1), (1, 1), (0, 0), (1, 0)] {
        let tmp = TempDir::new("resume-diverge");
        let c = exploding(50, moe_every, workers);
        let mut t = Trainer::new(c, &tmp.path().join("run")).expect("trainer");
        let err = t.run(false).expect_err("must diverge");
        match &err {
            semoe::Error::Diverged { step, lr, .. } => {
                assert!(*step >= 1 && *step <= 50, "{err}");
                assert!(*lr > 0.0, "{err}");
            }
            other => panic!("workers {workers}, moe_every {moe_every}: expected divergence, got {other}"),
        }
        assert!(err.to_string().contains("training diverged at step"), "{err}");
    }
}

#[test]
fn gradients_whose_squares_may_overflow_unclipped_are_divergence_on_every_path() {
    // The final layer norm's gain at 1e20: the output layer's gradient is about 1e20, finite, and
    // its square would overflow the float32 second moment. Without clipping, the plain loop and
    // the runtime both report divergence before any update (a worker refusing it in its commit
    // failed the run as "the workers may now disagree").
    for workers in [0, 1] {
        let tmp = TempDir::new("overflow-diverge");
        let run = tmp.path().join("run");
        let mut c = small(3);
        c.optimizer.clip = 0.0;
        c.train.workers = workers;
        let t = Trainer::new(c.clone(), &run).expect("trainer");
        let digest = t.corpus().digest();
        drop(t);
        let mut model = semoe::model::gpt::Gpt::init(&c.model, c.train.seed).expect("model");
        let names: Vec<String> = model.tensors().into_iter().map(|(n, _, _)| n).collect();
        let gain = names.iter().position(|n| n == "ln_f.weight").expect("ln_f.weight");
        model.buffers_mut()[gain].fill(1e20);
        let optimizer = semoe::train::trainer::new_optimizer(&c, &model).expect("optimizer");
        semoe::train::trainer::write_checkpoint(&run, &c, &model, &optimizer, 0.0, Some(&digest)).expect("checkpoint");
        let mut t = Trainer::resume(&run, None).expect("resume");
        let err = t.run(false).expect_err("must diverge");
        match &err {
            semoe::Error::Diverged { step, what, .. } => {
                assert_eq!(*step, 1, "{err}");
                assert!(what.contains("may overflow"), "workers {workers}: {err}");
            }
            other => panic!("workers {workers}: expected divergence, got {other}"),
        }
    }
}

#[test]
fn an_update_that_wrecks_the_parameters_before_validation_is_divergence_and_not_saved() {
    // One step: its forward is finite, its update (of about lr) overflows what the validation
    // pass right after it computes. An MoE model meets it in a gate, a dense one as a NaN loss
    // (which was logged and checkpointed, the run ending well).
    for moe_every in [1, 0] {
        let tmp = TempDir::new("diverge-in-validation");
        let c = exploding(1, moe_every, 0);
        let run = tmp.path().join("run");
        let mut t = Trainer::new(c, &run).expect("trainer");
        let err = t.run(false).expect_err("must diverge");
        match &err {
            semoe::Error::Diverged { step, what, .. } => {
                assert_eq!(*step, 1, "{err}");
                assert!(what.contains("validation"), "moe_every {moe_every}: {err}");
            }
            other => panic!("moe_every {moe_every}: expected divergence, got {other}"),
        }
        assert!(
            semoe::storage::checkpoint::latest(&run).expect("list").is_none(),
            "moe_every {moe_every}: the wrecked parameters were checkpointed"
        );
    }
}

#[test]
fn optimizer_errors_name_their_own_field() {
    let mut c = small(4);
    c.optimizer.clip = -1.0;
    let err = c.validate().expect_err("must refuse").to_string();
    assert!(err.contains("optimizer.clip") && !err.contains("eps"), "{err}");
    let mut c = small(4);
    c.optimizer.weight_decay = f64::NAN;
    let err = c.validate().expect_err("must refuse").to_string();
    assert!(err.contains("optimizer.weight_decay"), "{err}");
    // Values that are fine as f64 but not in the f32 update.
    let mut c = small(4);
    c.optimizer.beta2 = 1.0 - 1e-9;
    let err = c.validate().expect_err("must refuse").to_string();
    assert!(err.contains("optimizer.beta2 must be below 1 as a float32"), "{err}");
    let mut c = small(4);
    c.optimizer.lr = 1e38;
    c.optimizer.weight_decay = 0.0;
    let err = c.validate().expect_err("must refuse").to_string();
    assert!(err.contains("optimizer.lr (1e38) is too large"), "{err}");
    let mut c = small(4);
    c.model.k = 9;
    let err = c.validate().expect_err("must refuse").to_string();
    assert!(err.contains("model.k (experts per token)"), "{err}");
}

#[test]
fn thread_counts_beyond_the_machine_are_refused() {
    let mut c = small(4);
    c.train.threads = 100_000;
    let err = c.validate().expect_err("must refuse").to_string();
    assert!(err.contains("train.threads (100000)") && err.contains("cores"), "{err}");
}

/// A `Trainer` is a blocking API; an embedder may call it from async code (a handler of its
/// service): with the actor runtime (`train.workers` 1, the default) it trains, checkpoints and
/// drops there as it does on a plain thread, bitwise the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_with_the_actor_runtime_runs_inside_an_async_runtime() {
    let tmp = TempDir::new("resume-async");
    let mut config = small(3);
    config.train.workers = 1;
    let inside = {
        let mut t = Trainer::new(config.clone(), &tmp.path().join("inside")).expect("a trainer in async code");
        t.run(false).expect("the run");
        state(&mut t)
    };
    let outside = std::thread::spawn({
        let dir = tmp.path().join("outside");
        move || {
            let mut t = Trainer::new(config, &dir).expect("a trainer on a plain thread");
            t.run(false).expect("the run");
            state(&mut t)
        }
    })
    .join()
    .expect("the plain thread");
    assert_eq!(inside.0, 3);
    assert!(
        inside == outside,
        "the run inside an async runtime differs from the plain one"
    );
}

/// A checkpoint a replace renamed aside, left so by a crash between its two renames (a file
/// system without `RENAME_EXCHANGE`), is the run's newest: a fresh start refuses the directory,
/// and a resume puts it back and continues from it (it went back to an older step, or found none).
#[test]
fn a_checkpoint_renamed_aside_by_an_interrupted_replace_is_resumed_from() {
    let tmp = TempDir::new("resume-aside");
    let dir = tmp.path().join("run");
    let mut t = Trainer::new(small(4), &dir).expect("trainer");
    for _ in 0..2 {
        t.step().expect("step");
    }
    let saved = t.save_checkpoint(0.0).expect("checkpoint");
    drop(t);
    let name = saved.file_name().expect("a name").to_string_lossy().into_owned();
    let aside = saved.with_file_name(format!(".{name}.old-12345"));
    std::fs::rename(&saved, &aside).expect("set aside");
    let err = Trainer::new(small(4), &dir)
        .err()
        .expect("a fresh start must refuse")
        .to_string();
    assert!(err.contains("set aside by a replace that was interrupted"), "{err}");
    let t = Trainer::resume(&dir, None).expect("resume");
    assert_eq!(t.steps_done(), 2, "resumed from the checkpoint set aside");
    assert!(saved.is_dir() && !aside.exists(), "put back under its name");
}

/// A run recorded before tier settings without a Device budget were refused (they did nothing)
/// still resumes: they are dropped, and said. Given on the resume itself, they are refused.
#[test]
fn a_run_recorded_with_tier_settings_that_did_nothing_still_resumes() {
    let tmp = TempDir::new("resume-inert-tiers");
    let dir = tmp.path().join("run");
    let mut c = small(6);
    c.train.workers = 1;
    stopped_run(&dir, c.clone(), 3);
    let mut recorded = c;
    recorded.storage.host_budget = "1MiB".into();
    recorded.storage.cache_policy = "lru".into();
    recorded.storage.io_threads = 3;
    recorded.storage.drop_page_cache = !recorded.storage.drop_page_cache;
    std::fs::write(dir.join("config.toml"), recorded.to_toml().expect("toml")).expect("config.toml");
    let t = Trainer::resume_with(&dir, None, |_| {}).expect("resume");
    let notices = t.notices().join("\n");
    assert!(
        notices.contains(
            "storage.host_budget, storage.cache_policy, storage.io_threads, storage.drop_page_cache of the run's \
             config did nothing"
        ),
        "{notices}"
    );
    drop(t);
    let err = Trainer::resume_with(&dir, None, |c| c.storage.host_budget = "2MiB".into())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("storage.host_budget (--host-budget) applies only"),
        "{err}"
    );
}
