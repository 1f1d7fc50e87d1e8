//! The actor runtime's contract: parameters and optimizer state (AdamW moments and step) after N
//! steps are bitwise identical for any number of workers and any expert placement, and identical
//! to the single-process training loop.

mod common;

use common::{assert_same, state_bits};

use semoe::actors::{ExpertPlacement, Runtime};
use semoe::train::config::TrainConfig;
use semoe::train::trainer::Trainer;

const STEPS: u64 = 20;

fn small_config() -> TrainConfig {
    common::small_config(STEPS)
}

/// The training loop, without actors (`workers = 0`) or on the runtime through the `Trainer`: the
/// bits of its model and optimizer state (read back from a checkpoint, which stores both exactly).
fn trainer(config: &TrainConfig, workers: usize) -> Vec<(String, Vec<u32>)> {
    // Unique per call (and removed on drop), so tests running side by side never share a run.
    let tmp = common::TempDir::new(&format!("runtime-trainer-{workers}"));
    let dir = tmp.path().join("run");
    let mut config = config.clone();
    config.train.workers = workers;
    let mut trainer = Trainer::new(config, &dir).expect("trainer");
    for _ in 0..STEPS {
        trainer.step().expect("step");
    }
    assert_eq!(trainer.steps_done(), STEPS, "steps taken");
    common::trainer_state_bits(&mut trainer)
}

async fn runtime(
    config: &TrainConfig,
    workers: usize,
    placement: ExpertPlacement,
    lanes: usize,
) -> Vec<(String, Vec<u32>)> {
    let rt = Runtime::builder(config.clone())
        .workers(workers)
        .lanes(lanes)
        .placement(placement)
        .build()
        .await
        .expect("runtime");
    for _ in 0..STEPS {
        rt.step().await.expect("runtime step");
    }
    let (model, optimizer) = rt.state().await.expect("gather");
    rt.shutdown().await.expect("shutdown");
    assert_eq!(optimizer.step, STEPS, "steps taken");
    state_bits(&model, &optimizer)
}

#[test]
fn same_bits_for_any_worker_count_and_placement() {
    let config = small_config();
    let want = trainer(&config, 0);
    assert_same(&want, &trainer(&config, 2), "the Trainer on 2 workers");
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    for workers in 1..=4 {
        for lanes in [1, 2] {
            let got = tokio.block_on(runtime(&config, workers, ExpertPlacement::RoundRobin, lanes));
            assert_same(&want, &got, &format!("{workers} workers, round-robin, {lanes} lanes"));
        }
    }
    for (workers, placement) in [
        (2, ExpertPlacement::Blocked),
        (3, ExpertPlacement::Explicit(vec![2, 2, 0, 1])),
    ] {
        let what = format!("{workers} workers, {placement:?}");
        let got = tokio.block_on(runtime(&config, workers, placement, 2));
        assert_same(&want, &got, &what);
    }
    // More workers than data groups: the workers beyond the groups run none, but host experts
    // and own dense tensors (sharded or not).
    let mut fewer_groups = config.clone();
    fewer_groups.train.groups = 2;
    let want = trainer(&fewer_groups, 0);
    let mut sharded = fewer_groups.clone();
    sharded.storage.shard_dense = true;
    for (config, workers, placement) in [
        (&fewer_groups, 3, ExpertPlacement::RoundRobin),
        (&fewer_groups, 4, ExpertPlacement::Blocked),
        (&sharded, 4, ExpertPlacement::RoundRobin),
    ] {
        let what = format!(
            "{workers} workers for 2 groups, {placement:?}, sharded dense {}",
            config.storage.shard_dense
        );
        let got = tokio.block_on(runtime(config, workers, placement, 2));
        assert_same(&want, &got, &what);
    }
}

/// One expert (top-1) is an MoE block whose expert tensors have a leading dimension of 1: the
/// runtime must still treat them as expert tensors (hosted by the expert's worker), not as dense
/// ones, and end where the plain loop ends (issue 18).
#[test]
fn a_single_expert_trains_on_the_runtime_as_in_the_plain_loop() {
    let mut config = small_config();
    config.model.experts = 1;
    config.model.k = 1;
    let want = trainer(&config, 0);
    for workers in [1, 2] {
        assert_same(
            &want,
            &trainer(&config, workers),
            &format!("one expert, the Trainer on {workers} workers"),
        );
    }
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    for (workers, placement) in [(2, ExpertPlacement::Blocked), (2, ExpertPlacement::Explicit(vec![1]))] {
        let what = format!("one expert, {workers} workers, {placement:?}");
        let got = tokio.block_on(runtime(&config, workers, placement, 2));
        assert_same(&want, &got, &what);
    }
}

/// An embedder's checkpoint records the corpus it trained on, which `semoe train --resume` checks
/// its text against (given bytes with `text`, it records none).
#[test]
fn a_runtime_given_a_corpus_records_its_digest_in_its_checkpoints() {
    let corpus = semoe::data::Corpus {
        train: std::sync::Arc::new(b"To be, or not to be, that is the question.\n".repeat(40)),
        val: b"Whether 'tis nobler in the mind to suffer.\n".repeat(10),
        source: "a test".into(),
    };
    let tmp = common::TempDir::new("runtime-corpus-digest");
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let recorded = |builder: semoe::actors::RuntimeBuilder, name: &str| {
        let dir = tmp.path().join(name);
        tokio.block_on(async {
            let rt = builder.workers(2).build().await.expect("runtime");
            rt.step().await.expect("step");
            let saved = rt.save_checkpoint(&dir).await.expect("save");
            rt.shutdown().await.expect("shutdown");
            let manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(saved.join("manifest.json")).expect("manifest")).expect("json");
            manifest["extra"]["data_sha256"].as_str().map(str::to_string)
        })
    };
    let with_corpus = recorded(Runtime::builder(small_config()).corpus(&corpus), "corpus");
    assert_eq!(with_corpus.as_deref(), Some(corpus.digest().as_str()));
    let with_text = recorded(
        Runtime::builder(small_config()).shared_text(corpus.train.clone()),
        "text",
    );
    assert_eq!(with_text, None);
}

/// The runtime trains on the shortest text the plain loop trains on: one window of block_size + 1
/// bytes (it asked for one more byte).
#[test]
fn the_runtime_trains_on_a_text_of_one_window() {
    let config = small_config();
    let t = config.model.block_size;
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    tokio.block_on(async {
        let text: Vec<u8> = (0..t + 1).map(|i| b'a' + (i % 26) as u8).collect();
        let rt = Runtime::builder(config.clone())
            .text(text)
            .workers(2)
            .build()
            .await
            .expect("a text of one window");
        rt.step().await.expect("step");
        rt.shutdown().await.expect("shutdown");
        let err = Runtime::builder(config)
            .text(vec![b'a'; t])
            .workers(2)
            .build()
            .await
            .err()
            .expect("a text shorter than a window")
            .to_string();
        assert!(err.contains("needs at least block_size + 1"), "{err}");
    });
}

/// An embedder's builder is refused what the trainer refuses, by name, before anything is
/// allocated: a model larger than the machine (its allocation aborted the process) and a text
/// with bytes outside the vocabulary (it failed at some later step, naming a token).
#[test]
fn the_builder_refuses_a_model_too_large_and_a_text_outside_the_vocabulary() {
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    tokio.block_on(async {
        let mut huge = small_config();
        huge.model.d_model = 65536;
        huge.model.n_head = 4;
        let err = Runtime::builder(huge)
            .text(vec![b'a'; 100])
            .build()
            .await
            .err()
            .expect("a model larger than the machine")
            .to_string();
        assert!(
            err.contains("this config needs about") && err.contains("model.d_model (65536)"),
            "{err}"
        );
        let mut small_vocab = small_config();
        small_vocab.model.vocab = 128;
        let mut text = vec![b'a'; 100];
        text[40] = 200;
        let err = Runtime::builder(small_vocab)
            .text(text)
            .build()
            .await
            .err()
            .expect("a byte outside the vocabulary")
            .to_string();
        assert!(
            err.contains("the runtime's training text holds byte 200 at offset 40"),
            "{err}"
        );
    });
}

/// An embedder's checkpoint into a run directory another process holds (a running `semoe
/// train`) is refused by the directory's lock: it would take that run's checkpoint in progress
/// for a leftover and remove it.
#[test]
fn a_checkpoint_into_a_run_directory_in_use_is_refused() {
    let tmp = common::TempDir::new("runtime-checkpoint-lock");
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    tokio.block_on(async {
        let rt = Runtime::builder(small_config()).build().await.expect("runtime");
        rt.step().await.expect("step");
        let held = semoe::storage::run_dir::RunDirLock::acquire(tmp.path()).expect("the other run's lock");
        let err = rt
            .save_checkpoint(tmp.path())
            .await
            .expect_err("a directory in use")
            .to_string();
        assert!(err.contains("is in use by"), "{err}");
        assert!(
            !tmp.path().join("checkpoints").exists(),
            "it wrote into the directory in use"
        );
        drop(held);
        let saved = rt.save_checkpoint(tmp.path()).await.expect("saved once free");
        assert!(saved.join("manifest.json").is_file(), "{}", saved.display());
        rt.shutdown().await.expect("shutdown");
    });
}
