//! Sharded dense parameters (`storage.shard_dense`, the horizontal half of 2D prefetch): each worker
//! keeps only the dense tensors it owns and gathers each leg's tensors from their owners one leg
//! ahead. The parameters after N steps are bitwise those of the plain loop, for any number of workers
//! and lanes and through a replayed step; between steps each worker holds only its own tensors, and
//! during a step at most three legs' worth.

mod common;

use common::assert_same;
use semoe::actors::Runtime;
use semoe::chaos::{FaultKind, FaultPlan, Moment, Target};
use semoe::model::gpt::Gpt;
use semoe::model::legs::{section_tensors, training_legs};
use semoe::train::config::TrainConfig;
use semoe::train::trainer::Trainer;

const STEPS: u64 = 8;

/// Eight blocks, the odd ones MoE: legs of several blocks, dense FFNs inside legs.
fn config() -> TrainConfig {
    let mut c = common::small_config(STEPS);
    c.model.n_layer = 8;
    c.model.moe_every = 2;
    c
}

fn plain_loop(config: &TrainConfig) -> Vec<(String, Vec<u32>)> {
    let dir = common::TempDir::new("dense-sharding-plain");
    let mut c = config.clone();
    c.train.workers = 0;
    let mut trainer = Trainer::new(c, dir.path()).expect("trainer");
    for _ in 0..STEPS {
        trainer.step().expect("step");
    }
    common::trainer_state_bits(&mut trainer)
}

struct Sharded {
    bits: Vec<(String, Vec<u32>)>,
    stats: Vec<semoe::actors::gather::DenseStats>,
    replays: u32,
}

async fn sharded(config: &TrainConfig, workers: usize, lanes: usize, plan: FaultPlan) -> Sharded {
    let mut c = config.clone();
    c.storage.shard_dense = true;
    let rt = Runtime::builder(c)
        .workers(workers)
        .lanes(lanes)
        .chaos(plan)
        .build()
        .await
        .expect("runtime");
    let mut replays = 0;
    for _ in 0..STEPS {
        replays += rt.step().await.expect("step").replays;
    }
    let stats = rt.dense_stats();
    let (model, optimizer) = rt.state().await.expect("state");
    rt.shutdown().await.expect("shutdown");
    Sharded {
        bits: common::state_bits(&model, &optimizer),
        stats,
        replays,
    }
}

fn bytes_of(model: &Gpt<f32>, tensors: &[usize]) -> u64 {
    let all = model.tensors();
    tensors.iter().map(|&i| 4 * all[i].2.len() as u64).sum()
}

#[test]
fn sharded_dense_parameters_train_the_same_bits() {
    let config = config();
    let want = plain_loop(&config);
    let model = Gpt::<f32>::init(&config.model, 1).expect("model");
    let legs: Vec<u64> = training_legs(&config.model)
        .iter()
        .map(|stages| bytes_of(&model, &section_tensors(&model, stages)))
        .collect();
    let dense: u64 = legs[..legs.len() / 2 + 1].iter().sum(); // the forward legs and the turn: every dense tensor once
                                                              // With one lane, a pass holds its current leg while the next is gathered and the one after is
                                                              // being prefetched: never more than three consecutive legs.
    let window = legs.windows(3).map(|w| w.iter().sum::<u64>()).max().expect("legs");
    assert!(window < dense, "the bound below must say something");

    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    for workers in 1..=3 {
        for lanes in [1, 2] {
            let what = format!("{workers} workers, {lanes} lanes, sharded");
            let got = tokio.block_on(sharded(&config, workers, lanes, FaultPlan::none()));
            assert_same(&want, &got.bits, &what);
            assert_eq!(got.stats.len(), workers);
            let resident: u64 = got.stats.iter().map(|s| s.resident_bytes).sum();
            assert_eq!(
                resident, dense,
                "{what}: each dense tensor is kept by exactly one worker"
            );
            for (w, s) in got.stats.iter().enumerate() {
                assert_eq!(
                    s.legs,
                    STEPS * legs.len() as u64,
                    "{what}: worker {w} gathers every leg once a step"
                );
                if workers > 1 {
                    assert!(
                        s.resident_bytes < dense,
                        "{what}: worker {w} keeps only its own tensors"
                    );
                    assert!(s.gathered_bytes > 0, "{what}: worker {w} gathered from its peers");
                } else {
                    assert_eq!(s.gathered_bytes, 0, "{what}: one worker owns everything");
                }
                if lanes == 1 {
                    assert!(
                        s.peak_bytes <= window,
                        "{what}: worker {w} held {} bytes of gathered parameters, more than three legs ({window})",
                        s.peak_bytes
                    );
                }
            }
        }
    }

    // A worker beyond the groups (3 workers, 2 groups) hosts experts and computes no pass: it
    // gathers nothing, and the bits are the plain loop's.
    let mut two_groups = config.clone();
    two_groups.train.groups = 2;
    let got = tokio.block_on(sharded(&two_groups, 3, 1, FaultPlan::none()));
    assert_same(&plain_loop(&two_groups), &got.bits, "3 workers, 2 groups, sharded");
    let legs_gathered: Vec<u64> = got.stats.iter().map(|s| s.legs).collect();
    assert_eq!(
        legs_gathered,
        [STEPS * legs.len() as u64, STEPS * legs.len() as u64, 0],
        "the worker without groups gathers no leg"
    );

    // A gate that panics in the backward pass: the step is replayed (its gathers too), same bits.
    let plan = FaultPlan::none().with(
        Target::Gate { worker: 1, block: 3 },
        4,
        Moment::Backward,
        FaultKind::Panic,
    );
    let got = tokio.block_on(sharded(&config, 2, 2, plan));
    assert_eq!(got.replays, 1, "the interrupted step is replayed once");
    assert_same(&want, &got.bits, "2 workers, sharded, a gate panic replayed");

    // The Trainer (what `semoe train --shard-dense` runs) gives the same bits too, and its run
    // report shows what each worker kept, gathered and held.
    let dir = common::TempDir::new("dense-sharding-trainer");
    let mut c = config.clone();
    c.train.workers = 2;
    c.storage.shard_dense = true;
    let mut trainer = Trainer::new(c, dir.path()).expect("trainer");
    trainer.run(false).expect("run");
    assert_same(
        &want,
        &common::trainer_state_bits(&mut trainer),
        "the Trainer on 2 sharded workers",
    );
    let stats = trainer.dense_stats();
    assert_eq!(stats.len(), 2, "one gatherer per worker");
    assert!(stats.iter().all(|s| s.gathered_bytes > 0), "{stats:?}");
    semoe::telemetry::write_report(dir.path()).expect("report");
    let report = std::fs::read_to_string(dir.path().join("report.md")).expect("report.md");
    let section = report
        .split("## Sharded dense parameters")
        .nth(1)
        .unwrap_or_else(|| panic!("no dense section in the report:\n{report}"));
    assert!(section.contains("| 0 |") && section.contains("| 1 |"), "{section}");
}

#[test]
fn sharding_needs_the_actor_runtime() {
    let mut c = config();
    c.train.workers = 0;
    c.storage.shard_dense = true;
    let e = c.validate().expect_err("the plain loop cannot shard").to_string();
    assert!(e.contains("storage.shard_dense"), "{e}");
}
