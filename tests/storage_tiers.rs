//! Hierarchical storage of expert state: a model with 64 experts per MoE block, trained with the
//! Device and Host budgets holding 25% of the expert state (the rest on disk), ends bitwise
//! identical (parameters, AdamW moments and step) to the same run with everything in memory; budgets are never exceeded; a checkpoint
//! written under one budget configuration resumes under another.

mod common;

use common::{assert_same, state_bits, trainer_state_bits};

use semoe::actors::Runtime;
use semoe::storage::tiers::{CachePolicy, ExpertSlot, StorageConfig, TierStats};
use semoe::train::config::TrainConfig;
use semoe::train::trainer::Trainer;
use std::path::PathBuf;

const STEPS: u64 = 6;

/// 8 MoE blocks of 64 experts (top-2), d_model 16: one block is 1/8 of the expert state.
fn config() -> TrainConfig {
    let mut c = common::small_config(STEPS);
    c.model.d_model = 16;
    c.model.n_layer = 8;
    c.model.n_head = 2;
    c.model.d_ff = 32;
    c.model.experts = 64;
    c.train.batch = 16;
    c
}

/// A directory (not yet created) inside a fresh temporary directory that is removed when the
/// guard is dropped, also when the test fails.
fn temp(name: &str) -> (common::TempDir, PathBuf) {
    let tmp = common::TempDir::new(name);
    let dir = tmp.path().join("run");
    (tmp, dir)
}

/// Bytes of one expert unit of `config()`: parameters and two moments.
fn unit_bytes() -> u64 {
    ExpertSlot::bytes_for(16, 32)
}

async fn train(workers: usize, storage: StorageConfig) -> (Vec<(String, Vec<u32>)>, Vec<TierStats>) {
    let rt = Runtime::builder(config())
        .workers(workers)
        .storage(storage)
        .build()
        .await
        .expect("runtime");
    for _ in 0..STEPS {
        rt.step().await.expect("step");
    }
    let (model, optimizer) = rt.state().await.expect("state");
    let stats = rt.tier_stats();
    rt.shutdown().await.expect("shutdown");
    assert_eq!(optimizer.step, STEPS, "steps taken");
    (state_bits(&model, &optimizer), stats)
}

/// Device and Host each hold 1/8 of a worker's expert state (one block's experts): 25% in memory.
fn quarter(workers: u64, dir: PathBuf, policy: CachePolicy, prefetch: bool) -> StorageConfig {
    let block = 64 / workers * unit_bytes();
    StorageConfig {
        device_budget: Some(block),
        host_budget: Some(block),
        policy,
        prefetch,
        dir: Some(dir),
        // Flushing each write to the device costs seconds here; one case keeps it on.
        drop_page_cache: workers == 1 && prefetch,
        ..StorageConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarter_in_memory_trains_bit_for_bit_like_everything_in_memory() {
    let (want, all_in_memory) = train(1, StorageConfig::default()).await;
    assert_eq!(
        all_in_memory[0].served_from[2], 0,
        "nothing comes from disk without budgets"
    );

    let cases = [
        (1, CachePolicy::default(), true),
        (1, CachePolicy::Lru, false),
        (2, CachePolicy::default(), true),
    ];
    for (workers, policy, prefetch) in cases {
        let what = format!("{workers} worker(s), {} policy, prefetch {prefetch}", policy.name());
        let (_tmp, dir) = temp(&format!("quarter-{workers}-{}-{prefetch}", policy.name()));
        let (got, stats) = train(workers, quarter(workers as u64, dir.clone(), policy, prefetch)).await;
        assert_same(&want, &got, &what);
        assert_eq!(stats.len(), workers, "{what}: one store per worker");
        for (w, st) in stats.iter().enumerate() {
            assert_eq!(st.units, 512 / workers, "{what}");
            assert!(
                st.peak[0] <= st.budget[0],
                "{what}: worker {w} device {} > {}",
                st.peak[0],
                st.budget[0]
            );
            assert!(
                st.peak[1] <= st.budget[1],
                "{what}: worker {w} host {} > {}",
                st.peak[1],
                st.budget[1]
            );
            assert!(
                st.disk_read > 0 && st.disk_written > 0,
                "{what}: the disk tier was not used: {st:?}"
            );
            assert_eq!(st.prefetched > 0, prefetch, "{what}: {st:?}");
            assert!(
                st.deferred > 0,
                "{what}: no commit was deferred to a unit on disk: {st:?}"
            );
        }
        assert!(
            !dir.join("worker-0").exists(),
            "{what}: the disk tier's files outlive the run"
        );
    }
}

#[test]
fn a_device_budget_below_one_block_is_a_clear_error_at_start() {
    let (_tmp, dir) = temp("too-small");
    let mut c = config();
    c.train.workers = 1;
    c.storage.device_budget = format!("{}", 10 * unit_bytes());
    c.storage.host_budget = "1MiB".into();
    let e = Trainer::new(c, &dir).err().expect("must fail").to_string();
    assert!(e.contains("device budget") && e.contains("64 experts"), "{e}");
    let mut c = config();
    c.train.workers = 0;
    c.storage.host_budget = "1MiB".into();
    let e = Trainer::new(c, &dir).err().expect("must fail").to_string();
    assert!(e.contains("actor runtime"), "{e}");
    let mut c = config();
    c.train.workers = 1;
    c.storage.device_budget = "a lot".into();
    let e = Trainer::new(c, &dir).err().expect("must fail").to_string();
    assert!(e.contains("storage.device_budget"), "{e}");
}

#[test]
fn a_checkpoint_resumes_under_other_budgets_bit_for_bit() {
    let reference = {
        let (_tmp, dir) = temp("resume-ref");
        let mut c = config();
        c.train.workers = 1;
        let mut t = Trainer::new(c, &dir).expect("trainer");
        for _ in 0..STEPS {
            t.step().expect("step");
        }
        let out = trainer_state_bits(&mut t);
        drop(t);
        out
    };
    let (_tmp, dir) = temp("resume");
    let mut c = config();
    c.train.workers = 1;
    c.storage.device_budget = format!("{}", 64 * unit_bytes());
    c.storage.host_budget = format!("{}", 64 * unit_bytes());
    let mut t = Trainer::new(c, &dir).expect("trainer");
    for _ in 0..STEPS / 2 {
        t.step().expect("step");
    }
    t.save_checkpoint(0.0).expect("checkpoint");
    drop(t);
    // Resume with everything in memory, and again with a device-only budget of two blocks.
    for (device, host) in [("", ""), (format!("{}", 128 * unit_bytes()).as_str(), "0")] {
        let mut t = Trainer::resume_with(&dir, None, |c| {
            c.storage.device_budget = device.to_string();
            c.storage.host_budget = host.to_string();
        })
        .expect("resume");
        assert_eq!(t.steps_done(), STEPS / 2);
        while t.steps_done() < STEPS {
            t.step().expect("step");
        }
        // The resumed run's own budgets are in effect, not the 64/64 units recorded.
        let stats = t.tier_stats();
        assert_eq!(stats.len(), 1, "{device:?}/{host:?}: one store");
        if device.is_empty() {
            assert_ne!(
                stats[0].budget,
                [64 * unit_bytes(); 2],
                "the recorded budgets: {:?}",
                stats[0]
            );
            assert_eq!(stats[0].on_disk, 0, "all in memory: {:?}", stats[0]);
            assert_eq!(stats[0].served_from[2], 0, "all in memory: {:?}", stats[0]);
        } else {
            assert_eq!(stats[0].budget, [128 * unit_bytes(), 0], "{:?}", stats[0]);
            assert!(stats[0].peak[0] <= stats[0].budget[0], "{:?}", stats[0]);
        }
        assert_same(
            &reference,
            &trainer_state_bits(&mut t),
            &format!("resumed with {device:?}/{host:?}"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_reports_idle_only_once_a_steps_disk_work_is_done() {
    let (_tmp, dir) = temp("idle");
    let rt = Runtime::builder(config())
        .workers(1)
        .storage(quarter(1, dir, CachePolicy::default(), true))
        .build()
        .await
        .expect("runtime");
    for step in 1..=2 {
        rt.step().await.expect("step");
        rt.storage_idle().await.expect("idle");
        // Nothing moves any more: no load in flight, no write-back or gradient still landing.
        let now = rt.tier_stats();
        assert_eq!(now.len(), 1, "one store");
        assert_eq!(now[0].loading, 0, "step {step}: a unit still loading: {:?}", now[0]);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let later = rt.tier_stats();
        assert_eq!(
            (now[0].disk_read, now[0].disk_written),
            (later[0].disk_read, later[0].disk_written),
            "step {step}: disk traffic after the store said it was idle"
        );
        assert!(
            now[0].disk_written > 0,
            "step {step}: the disk tier was not used: {:?}",
            now[0]
        );
    }
    rt.shutdown().await.expect("shutdown");
}
