//! The cache-policy replay (`semoe bench cache-policy`): its counts on synthetic skewed traces with
//! known answers, Belady's MIN as the bound of every policy, the routing recorded from a model's
//! gate, and the command's error for a bad checkpoint path.

mod common;

use semoe::bench::{cache_policy_bench, policy_grid, record_routing, MemorySize, TraceBatches};
use semoe::kernels::Cpu;
use semoe::model::gpt::{Gpt, GptConfig};
use semoe::optimizer::{AdamW, OptimizerConfig};
use semoe::storage::tiers::policy::{Candidate, Phase, StepCursor, Usage};
use semoe::storage::tiers::replay::{belady, replay, replay_one_at_a_time, ReplayCounts, RoutingTrace, UnitSizes};
use semoe::storage::tiers::{CachePolicy, ExpertSlot, ExpertStore, Pending, StorageConfig};

/// A skewed trace: `blocks` x `experts`, expert `e` of each block routed at step `s` when
/// `(s * 7 + e * 3 + block) % (e + 1) == 0` (expert 0 every step, expert e about one step in e + 1),
/// with tokens falling off with e; every expert routed in steps 0 and 1 (a warm start).
fn skewed(blocks: usize, experts: usize, steps: usize) -> RoutingTrace {
    let steps = (0..steps)
        .map(|s| {
            (0..blocks)
                .map(|b| {
                    (0..experts)
                        .map(|e| {
                            let routed = s < 2 || (s * 7 + e * 3 + b) % (e + 1) == 0;
                            if routed {
                                (64 / (e + 1)) as u64 + 1
                            } else {
                                0
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    RoutingTrace { experts, steps }
}

fn routed(t: &RoutingTrace) -> u64 {
    t.steps.iter().flatten().flatten().filter(|&&n| n > 0).count() as u64
}

fn check_sums(t: &RoutingTrace, c: &ReplayCounts) {
    let units = (t.blocks() * t.experts) as u64;
    assert_eq!(
        c.acquisitions,
        2 * routed(t),
        "forward and backward: one acquisition per routed expert each"
    );
    assert_eq!(c.device_hits + c.host_hits + c.misses, c.acquisitions);
    assert_eq!(c.commits, units * t.steps.len() as u64);
    assert_eq!(c.commits_in_memory + c.deferred + c.commit_loads, c.commits);
    assert_eq!(
        c.loads(),
        c.misses + c.commit_loads,
        "every miss and every commit load reads a unit"
    );
    assert!(c.grad_reads <= c.deferred);
}

#[test]
fn counts_add_up_and_belady_bounds_every_policy() {
    let t = skewed(4, 8, 60);
    for (device, host) in [(8, 0), (8, 4), (8, 8), (8, 16)] {
        let bound = belady(&t, device + host).unwrap();
        assert_eq!(bound.acquisitions, 2 * routed(&t));
        assert_eq!(bound.device_hits + bound.misses, bound.acquisitions);
        for (name, p) in policy_grid() {
            let c = replay(&t, p, device, host).unwrap();
            check_sums(&t, &c);
            assert!(
                bound.misses <= c.loads(),
                "{name} at {device}+{host}: {} loads, fewer than Belady's {}",
                c.loads(),
                bound.misses
            );
            if host == 0 {
                assert_eq!(c.host_hits + c.to_host, 0, "{name}: no host cache, no host hits");
            }
        }
    }
}

#[test]
fn a_cache_that_holds_everything_never_loads() {
    // The store starts with the units in memory while they fit (Device, then Host, in order), so
    // with room for all nothing is ever loaded, deferred or written back, under any policy that
    // admits every unit into the host cache. Room
    // for all is one unit more than all with a host cache, as the store requires: a unit promoted
    // from a full Host into a full Device would push a third one to disk (the manager's order).
    let t = skewed(3, 6, 40);
    let units = 18;
    for (name, p) in policy_grid() {
        for (device, host) in [(18, 0), (6, 13), (6, 30)] {
            let c = replay(&t, p, device, host).unwrap();
            check_sums(&t, &c);
            let what = format!("{name} at {device}+{host}");
            if matches!(p, CachePolicy::SeMoe { threshold, .. } if threshold > 0.0) && host > 0 {
                // An admission threshold sends a cold unit leaving Device to disk, even with
                // room in Host.
                assert!(c.device_hits + c.host_hits > 0, "{what}");
                continue;
            }
            assert_eq!(c.device_hits + c.host_hits, c.acquisitions, "{what}");
            assert_eq!((c.loads(), c.deferred, c.write_backs), (0, 0, 0), "{what}");
            assert_eq!(c.commits_in_memory, c.commits, "{what}");
        }
    }
    // With room for all but one, after the first steps every unit is routed again and again:
    // the loads stay few.
    let c = replay(&t, CachePolicy::Lru, 6, 11).unwrap();
    assert!(c.loads() > 0 && c.loads() < c.acquisitions / 4, "{c:?}");
    assert_eq!(belady(&t, units as usize).unwrap().misses, 0, "MIN with room for all");
    let cold = RoutingTrace {
        experts: 6,
        steps: t.steps.clone(),
    };
    assert_eq!(belady(&cold, 6).unwrap().acquisitions, 2 * routed(&t));
}

#[test]
fn the_replay_is_deterministic_and_tells_policies_apart() {
    let t = skewed(4, 8, 60);
    let lru = replay(&t, CachePolicy::Lru, 8, 8).unwrap();
    assert_eq!(lru, replay(&t, CachePolicy::Lru, 8, 8).unwrap());
    let strict = CachePolicy::SeMoe {
        threshold: 4.0,
        beta: 0.25,
        decay_every: 1,
    };
    let s = replay(&t, strict, 8, 8).unwrap();
    // A threshold the decayed counters rarely reach keeps the host cache nearly empty.
    assert!(s.to_host < lru.to_host, "{} vs {}", s.to_host, lru.to_host);
    assert!(s.host_hits < lru.host_hits);
}

#[test]
fn the_bench_reports_every_policy_at_every_size_and_the_bound() {
    let t = skewed(4, 8, 30);
    let sizes: Vec<MemorySize> = [25.0, 50.0, 75.0]
        .iter()
        .filter_map(|&p| MemorySize::share(p, 32, 8))
        .collect();
    assert_eq!(
        sizes,
        vec![
            MemorySize { device: 8, host: 0 },
            MemorySize { device: 8, host: 8 },
            MemorySize { device: 8, host: 16 }
        ]
    );
    assert_eq!(MemorySize::share(20.0, 32, 8), None, "less than one block");
    let grid = policy_grid();
    let r = cache_policy_bench(&t, &sizes, &grid, UnitSizes::for_expert(16, 32)).unwrap();
    assert_eq!(r.rows.len(), grid.len());
    assert!(r.rows.iter().all(|row| row.counts.len() == 3));
    assert_eq!(r.bound.counts.len(), 3);
    let best = r.best().unwrap();
    assert!(r.rows.iter().all(|row| row.mean_hit_rate() <= best.mean_hit_rate()));
    assert!(
        r.peak_over_uniform.iter().all(|&x| x > 1.0),
        "the synthetic trace is skewed"
    );
    assert!(r.touched < 1.0);
    let c = &r.rows[0].counts[1];
    let s = r.unit_sizes;
    assert_eq!(
        c.bytes_read(&s),
        c.params_loads * s.params + c.unit_loads * s.unit + c.grad_reads * s.grad
    );
    assert!(cache_policy_bench(&t, &[], &grid, s).is_err());
}

#[test]
fn the_routing_is_recorded_from_the_models_gate() {
    let config = GptConfig {
        block_size: 16,
        d_model: 16,
        n_layer: 2,
        n_head: 2,
        d_ff: 32,
        experts: 4,
        dropless: true,
        ..GptConfig::default()
    };
    let model = Gpt::<f32>::init(&config, 3).unwrap();
    let text: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let cpu = Cpu::new(1).unwrap();
    let b = TraceBatches {
        seed: 1,
        first_step: 10,
        steps: 3,
        batch: 4,
        groups: 2,
    };
    let t = record_routing(&model, &cpu, &text, &b).unwrap();
    assert_eq!((t.steps.len(), t.blocks(), t.experts), (3, 2, 4));
    for step in &t.steps {
        for block in step {
            // Dropless: every token's k assignments are kept.
            assert_eq!(block.iter().sum::<u64>(), 4 * 16 * 2);
        }
    }
    assert_eq!(
        t,
        record_routing(&model, &cpu, &text, &b).unwrap(),
        "the same batches route the same"
    );
    let bad = TraceBatches { groups: 3, ..b };
    assert!(record_routing(&model, &cpu, &text, &bad).is_err());
    // Sizes that would abort on their allocation are refused first, naming what they need.
    for absurd in [
        TraceBatches { steps: 1 << 40, ..b },
        TraceBatches {
            batch: 1 << 40,
            groups: 1,
            ..b
        },
    ] {
        let err = match record_routing(&model, &cpu, &text, &absurd) {
            Ok(_) => panic!("an absurd trace was recorded"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("a routing trace of") && err.contains("needs about"),
            "{err}"
        );
    }
}

#[test]
fn a_bad_checkpoint_path_is_named() {
    let missing = std::env::temp_dir().join(format!("semoe-no-such-checkpoint-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_semoe"))
        .args(["bench", "cache-policy", "--checkpoint"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

fn slot(d: usize, f: usize) -> ExpertSlot {
    let sizes = [d * f, f, f * d, d];
    let optimizer = AdamW::with_decay(OptimizerConfig::default(), &sizes, &[true, false, true, false]).unwrap();
    ExpertSlot {
        params: sizes.map(|n| vec![0.5; n]),
        optimizer,
    }
}

/// The replay against the store itself: the same trace driven through an `ExpertStore` with a disk
/// tier, one request at a time (each awaited, so no two decisions race), each block hinted first as
/// the Communicator does, gives the replay's counts: the step-order policy's positions, victims and
/// whole-unit loads in the backward are the store's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_counts_what_the_store_does() {
    let (d, f) = (8, 16);
    let t = skewed(3, 4, 12);
    for policy in [CachePolicy::StepOrder, CachePolicy::SE_MOE, CachePolicy::Lru] {
        for (device, host) in [(4, 0), (4, 3), (4, 6)] {
            let sizes = UnitSizes::for_expert(d, f);
            let dir = std::env::temp_dir().join(format!(
                "semoe-replay-store-{}-{}-{device}-{host}",
                std::process::id(),
                policy.name()
            ));
            let config = StorageConfig {
                device_budget: Some(device * sizes.unit),
                host_budget: Some(host * sizes.unit),
                dir: Some(dir.clone()),
                prefetch: false,
                policy,
                ..StorageConfig::default()
            };
            let units = (0..3).flat_map(|b| (0..4).map(move |e| ((b, e), slot(d, f)))).collect();
            let store = ExpertStore::new(0, &config, units).unwrap();
            for s in 0..t.steps.len() {
                let step = &t.steps[s];
                for (i, b) in (0..3).chain((0..3).rev()).enumerate() {
                    let routed: Vec<usize> = (0..4).filter(|&e| step[b][e] > 0).collect();
                    store.hint(b, routed.clone(), i < 3);
                    for e in routed {
                        drop(store.acquire((b, e)).await.unwrap());
                        // Every write done before the next request, as the replay has it.
                        let _ = store.snapshot().await.unwrap();
                    }
                }
                for id in (0..3).flat_map(|b| (0..4).map(move |e| (b, e))) {
                    let update = Pending {
                        grads: slot(d, f).params,
                        lr: 1e-3,
                        norm: 1.0,
                    };
                    if let Some((mut lease, update)) = store.commit(id, update).await.unwrap() {
                        lease.slot_mut().unwrap().apply(update).unwrap();
                    }
                    let _ = store.snapshot().await.unwrap();
                }
                store.end_step(s as u64 + 1);
            }
            let _ = store.snapshot().await.unwrap();
            let st = store.stats();
            let c = replay_one_at_a_time(&t, policy, device as usize, host as usize).unwrap();
            let what = format!("{} at {device}+{host}: store {st:?}, replay {c:?}", policy.name());
            assert_eq!(st.deferred, c.deferred, "{what}");
            assert_eq!(
                st.served_from[0] + st.served_from[1],
                c.device_hits + c.host_hits + c.commits_in_memory,
                "{what}"
            );
            assert_eq!(st.served_from[2], c.misses + c.commit_loads, "{what}");
            assert_eq!(st.disk_read, c.bytes_read(&sizes), "{what}");
            drop(store);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// The step-order policy's victims along a hand-made step of three blocks, the cursor moved by the
/// requests alone (no hints): forward 0, 1, 2, backward 2, 1, 0, then the commits.
#[test]
fn step_order_evicts_what_the_step_needs_last() {
    let p = CachePolicy::StepOrder;
    let mut at = StepCursor::new([0, 1, 2]);
    let mut clock = 0;
    let mut last_use = std::collections::BTreeMap::new();
    // One resident unit of each block besides the one being acquired; whole units, equal hits.
    let resident = |last_use: &std::collections::BTreeMap<(usize, usize), u64>, skip: usize| -> Vec<Candidate> {
        (0..3)
            .filter(|&b| b != skip)
            .map(|b| Candidate {
                id: (b, 9),
                usage: Usage {
                    hits: 1.0,
                    last_use: last_use.get(&(b, 9)).copied().unwrap_or(0),
                    unused_prefetch: false,
                },
                partial: false,
            })
            .collect()
    };
    // (block acquired, the victim among the other blocks' units, LRU's victim)
    let walk = [
        (0, (2, 9), (1, 9)), // F0: block 1 is next (F1), then 2 (F2), so 2 goes; LRU: the first of equals
        (1, (0, 9), (2, 9)), // F1: block 0 waits for B0, the last of the step; LRU: block 2, needed next
        (2, (0, 9), (0, 9)), // F2: still block 0 (B1 comes first)
        (1, (2, 9), (0, 9)), // B1: block 2 is done until the next step's F2; LRU: block 0, needed next
        (0, (2, 9), (2, 9)), // B0: the next step needs block 1 (F1) before block 2 (F2)
    ];
    for (block, want, lru) in walk {
        clock += 1;
        at.acquire((block, 0), false, clock);
        let c = resident(&last_use, block);
        assert_eq!(p.victim(&at, c.iter().copied()), Some(want), "at {:?}", at.phase());
        assert_eq!(
            CachePolicy::Lru.victim(&at, c.iter().copied()),
            Some(lru),
            "LRU at {:?}",
            at.phase()
        );
        // The resident unit of the block is used here.
        last_use.insert((block, 9), clock);
    }
    assert_eq!(at.phase(), Phase::Backward(0));
    at.acquire((1, 0), true, clock + 1);
    assert_eq!(at.phase(), Phase::Commit);
    // At the commit the next step's forward comes first: block 2 goes, then block 1.
    let c = resident(&last_use, 0);
    assert_eq!(p.victim(&at, c.iter().copied()), Some((2, 9)));
    // A parameters-only copy of block 1 goes before block 2's whole unit: the commit drops it.
    let mut c = resident(&last_use, 0);
    c[0].partial = true;
    assert_eq!(p.victim(&at, c.iter().copied()), Some((1, 9)));
    // Misses load whole units in the backward only (their commit follows), when they will still
    // be in memory at the commit, and only under the step order.
    let mut at = StepCursor::new([0, 1, 2]);
    // (units of the block and those below it, units in memory)
    for (forward, units, whole) in [(true, (1, 2), false), (false, (2, 2), true), (false, (3, 2), false)] {
        at.hint(1, forward, &[0], 0);
        assert_eq!(
            !p.params_only(&at, units.0, units.1),
            whole,
            "forward {forward}, units {units:?}"
        );
        assert!(
            CachePolicy::Lru.params_only(&at, units.0, units.1)
                && CachePolicy::SE_MOE.params_only(&at, units.0, units.1)
        );
    }
}

/// The trace of `semoe bench cache-policy` starts with the step a resumed run trains next: its
/// routing is that step's, token for token (it started one step late).
#[test]
fn the_trace_after_a_checkpoint_is_the_routing_of_the_next_steps() {
    let tmp = common::TempDir::new("trace-after");
    let dir = tmp.path().join("run");
    let mut config = common::small_config(6);
    config.model.dropless = true;
    config.train.workers = 0;
    let mut trainer = semoe::train::trainer::Trainer::new(config.clone(), &dir).unwrap();
    for _ in 0..3 {
        trainer.step().unwrap();
    }
    let done = trainer.steps_done();
    assert_eq!(done, 3);
    // One step: only the first is routed by the parameters the trace uses (training goes on).
    let batches = TraceBatches::after_checkpoint(&config, done, 1, None, None);
    let text = trainer.corpus().train.clone();
    let cpu = Cpu::new(1).unwrap();
    let trace = record_routing(trainer.model().unwrap(), &cpu, &text, &batches).unwrap();
    let trained: Vec<Vec<u64>> = trainer
        .step()
        .unwrap()
        .expert_tokens
        .iter()
        .map(|block| block.iter().map(|&n| n as u64).collect())
        .collect();
    assert_eq!(trace.steps.len(), 1);
    assert_eq!(trace.steps[0], trained, "the routing of the step after the checkpoint");
}
