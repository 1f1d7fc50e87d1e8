//! Storage budgets at the edges: every Device/Host budget pair the store accepts at start-up
//! trains bit for bit like everything in memory, in particular budgets that together hold all the
//! expert state with less than one unit to spare (which once failed mid-step with "the I/O
//! threads stopped"); a pair that cannot work without a disk is refused at start-up, naming the
//! fields and the minimum.

mod common;

use common::{assert_same, state_bits, TempDir};

use semoe::actors::Runtime;
use semoe::storage::tiers::{CachePolicy, ExpertSlot, StorageConfig, TierStats};
use semoe::train::config::TrainConfig;

const STEPS: u64 = 3;
const BLOCKS: u64 = 2;
const EXPERTS: u64 = 8;

/// 2 MoE blocks of 8 experts (top-2), d_model 16: 16 units, small enough for a sweep of runs.
fn config() -> TrainConfig {
    let mut c = common::small_config(STEPS);
    c.model.d_model = 16;
    c.model.n_layer = BLOCKS as usize;
    c.model.n_head = 2;
    c.model.d_ff = 32;
    c.model.experts = EXPERTS as usize;
    c.train.batch = 8;
    c
}

/// Bytes of one expert unit of `config()`: parameters and two moments.
const UNIT: u64 = ExpertSlot::bytes_for(16, 32);

async fn train(workers: usize, storage: StorageConfig) -> semoe::Result<(Vec<(String, Vec<u32>)>, Vec<TierStats>)> {
    let rt = Runtime::builder(config())
        .workers(workers)
        .storage(storage)
        .build()
        .await?;
    for _ in 0..STEPS {
        rt.step().await?;
    }
    // Model and moments: a moment written back wrong in the last step shows only there.
    let (model, optimizer) = rt.state().await?;
    let stats = rt.tier_stats();
    rt.shutdown().await?;
    Ok((state_bits(&model, &optimizer), stats))
}

/// One budget pair to try (per worker), with the policy and prefetch to try it under.
#[derive(Debug)]
struct Case {
    workers: usize,
    device: u64,
    host: u64,
    policy: CachePolicy,
    prefetch: bool,
}

/// Budgets around the edges, for one worker: `all` is the worker's expert state, `block` one MoE
/// block's experts (the least Device budget the store accepts). Deterministic edges plus a few
/// seeded random pairs near them.
fn edge_cases(workers: usize) -> Vec<(u64, u64)> {
    let all = BLOCKS * EXPERTS / workers as u64 * UNIT;
    let block = EXPERTS / workers as u64 * UNIT;
    let (u, half) = (UNIT, UNIT / 2);
    let mut pairs = Vec::new();
    // Device exactly one block; Host the rest, minus and plus a little (Device + Host around all).
    for host in [
        all - block - 2 * u,
        all - block - u - 1,
        all - block - u,
        all - block - u + 1,
        all - block - half,
        all - block - 1,
        all - block,
        all - block + 1,
        all - block + half,
        all - block + u - 1,
        all - block + u,
        all - block + u + 1,
    ] {
        pairs.push((block, host));
    }
    // The sum split mid-unit: each tier holds a fraction of a unit it cannot use.
    for spare in [0, 1, half, u - 1, u, u + 1] {
        pairs.push((block + half, all - block - half + spare));
    }
    // Host 0: Device alone around all of it.
    for device in [all - u - 1, all - u, all - half, all - 1, all, all + 1, all + u] {
        pairs.push((device, 0));
    }
    // Device exactly one block (the least accepted), or just over it, with Host 0 or under a unit.
    for (device, host) in [
        (block, 0),
        (block, 1),
        (block, half),
        (block + u - 1, 0),
        (block + u, u - 1),
    ] {
        pairs.push((device, host));
    }
    // Device one unit short of all, Host the unit and around it.
    for host in [u - 1, u, u + 1, 2 * u] {
        pairs.push((all - u, host));
    }
    // Seeded random pairs with Device + Host within two units of all.
    let mut seed: u64 = 0x5eed_0018;
    let mut next = move |n: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    for _ in 0..6 {
        let device = block + next(all - block + 1);
        let sum = (all - 2 * u + next(4 * u + 1)).max(device);
        pairs.push((device, sum - device));
    }
    pairs
}

fn cases() -> Vec<Case> {
    let policies = [
        (CachePolicy::default(), true),
        (CachePolicy::Lru, false),
        (CachePolicy::SE_MOE, true),
        // A cold expert is not admitted into the host cache: without a disk it must still go there.
        (
            CachePolicy::SeMoe {
                threshold: 3.0,
                beta: 0.5,
                decay_every: 2,
            },
            false,
        ),
    ];
    let mut out = Vec::new();
    for workers in [1, 2] {
        for (i, (device, host)) in edge_cases(workers).into_iter().enumerate() {
            // Two workers: only every third pair, to keep the sweep fast.
            if workers == 2 && i % 3 != 0 {
                continue;
            }
            let (policy, prefetch) = policies[i % policies.len()];
            out.push(Case {
                workers,
                device,
                host,
                policy,
                prefetch,
            });
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_budget_accepted_at_start_trains_bit_for_bit_like_everything_in_memory() {
    let (want, _) = train(1, StorageConfig::default()).await.expect("all in memory");
    let dir = TempDir::new("budgets");
    let mut failures = Vec::new();
    for (n, case) in cases().into_iter().enumerate() {
        let what = format!("{case:?} (unit {UNIT} B)");
        let run = dir.path().join(format!("case-{n}"));
        let storage = StorageConfig {
            device_budget: Some(case.device),
            host_budget: Some(case.host),
            policy: case.policy,
            prefetch: case.prefetch,
            dir: Some(run.clone()),
            drop_page_cache: false,
            ..StorageConfig::default()
        };
        let (got, stats) = match train(case.workers, storage).await {
            Ok(out) => out,
            Err(e) => {
                failures.push(format!("{what}: {e}"));
                continue;
            }
        };
        assert_same(&want, &got, &what);
        assert_eq!(stats.len(), case.workers, "{what}: one store per worker");
        for (w, st) in stats.iter().enumerate() {
            assert!(
                st.peak[0] <= st.budget[0] && st.peak[1] <= st.budget[1],
                "{what}: worker {w} over budget: {st:?}"
            );
        }
        for w in 0..case.workers {
            assert!(
                !run.join(format!("worker-{w}")).exists(),
                "{what}: the disk tier's files outlive the run"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} budget pairs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_that_need_a_disk_without_one_are_refused_at_start_naming_the_fields_and_the_minimum() {
    let all = BLOCKS * EXPERTS * UNIT;
    let block = EXPERTS * UNIT;
    // Device + Host hold all of it with no unit to spare, and the sum split mid-unit.
    for (device, host) in [(block, all - block), (block + UNIT / 2, all - block - UNIT / 2)] {
        let storage = StorageConfig {
            device_budget: Some(device),
            host_budget: Some(host),
            dir: None,
            ..StorageConfig::default()
        };
        let e = match train(1, storage).await {
            Ok(_) => panic!("{device}/{host}: must be refused without a disk directory"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("storage.device_budget") && e.contains("storage.host_budget"),
            "{device}/{host}: {e}"
        );
        assert!(
            e.contains(&format!("{}", all + UNIT)),
            "{device}/{host}: the minimum ({} B) is not named: {e}",
            all + UNIT
        );
        assert!(!e.contains("I/O threads"), "{e}");
    }
    // Exactly everything in Device, or one unit to spare over both: no disk needed.
    for (device, host) in [(all, 0), (block, all - block + UNIT)] {
        let storage = StorageConfig {
            device_budget: Some(device),
            host_budget: Some(host),
            dir: None,
            ..StorageConfig::default()
        };
        let (_, stats) = train(1, storage).await.expect("fits in memory");
        assert_eq!(stats[0].on_disk, 0);
        assert_eq!(stats[0].served_from[2], 0, "{device}/{host}");
    }
}

/// A runtime dropped without a shutdown (an embedder's `?` after a failed call) does not leave
/// its actors running: they stop, and with them the stores, which delete their Disk tier files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_dropped_without_a_shutdown_stops_its_actors_and_deletes_its_tier_files() {
    let dir = TempDir::new("budgets-dropped");
    // Per worker: one MoE block's experts (half of them each) in Device, one unit in Host.
    let storage = StorageConfig {
        device_budget: Some(EXPERTS / 2 * UNIT),
        host_budget: Some(UNIT),
        dir: Some(dir.path().to_path_buf()),
        drop_page_cache: false,
        ..StorageConfig::default()
    };
    let rt = Runtime::builder(config())
        .workers(2)
        .storage(storage)
        .build()
        .await
        .expect("runtime");
    rt.step().await.expect("a step");
    let tier_files = || {
        (0..2)
            .filter(|w| dir.path().join(format!("worker-{w}")).exists())
            .count()
    };
    assert_eq!(tier_files(), 2, "each worker keeps a Disk tier");
    drop(rt);
    let since = std::time::Instant::now();
    while tier_files() > 0 {
        assert!(
            since.elapsed() < std::time::Duration::from_secs(10),
            "the Disk tier files outlive a dropped runtime by 10 s: its actors still run"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
