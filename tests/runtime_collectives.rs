//! Expert rows over collectives in NCCL's model (`train.exchange = "sim"`: the CPU stand-in, which
//! refuses any collective issued out of order or with counts that do not match): the runtime ends
//! with the bits of the transport (and of the plain loop) for any number of workers, lanes and
//! placements, also with workers that run no group; a failed actor aborts the lane communicators,
//! the step is replayed on new ones, and the bits are unchanged; a worker that hangs in an exchange
//! ends the run with an error, never a hang. `train.exchange = "nccl"` runs one worker on GPU 0
//! where there is one (the transport's bits again), and says what it skipped elsewhere.

mod common;

use common::{assert_same, Trained};
use semoe::actors::{ExpertPlacement, Runtime};
use semoe::chaos::{FaultKind, FaultPlan, Moment, Target};
use semoe::config::ExpertExchange;
use semoe::train::config::TrainConfig;
use std::time::Duration;

const STEPS: u64 = 12;

fn config(exchange: ExpertExchange) -> TrainConfig {
    let mut c = common::small_config(STEPS);
    c.train.exchange = exchange;
    c
}

async fn train(
    config: &TrainConfig,
    workers: usize,
    placement: ExpertPlacement,
    lanes: usize,
    plan: FaultPlan,
) -> semoe::Result<Trained> {
    let builder = Runtime::builder(config.clone())
        .workers(workers)
        .lanes(lanes)
        .placement(placement);
    common::train_steps(builder, STEPS, &plan).await
}

#[test]
fn expert_rows_over_the_nccl_stand_in_give_the_transports_bits() {
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let transport = config(ExpertExchange::Transport);
    let sim = config(ExpertExchange::Sim);
    let want = tokio
        .block_on(train(&transport, 2, ExpertPlacement::RoundRobin, 2, FaultPlan::none()))
        .expect("over the transport");
    assert_eq!(want.generations, None, "the transport builds no communicators");
    for workers in 1..=3 {
        for lanes in [1, 2] {
            let what = format!("{workers} workers, {lanes} lanes over the stand-in");
            let got = tokio
                .block_on(train(
                    &sim,
                    workers,
                    ExpertPlacement::RoundRobin,
                    lanes,
                    FaultPlan::none(),
                ))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_same(&want.bits, &got.bits, &what);
            assert_eq!(got.replays, 0, "{what}: no replays");
            assert_eq!(
                got.generations,
                Some(1),
                "{what}: one generation of communicators for the run"
            );
        }
    }
    // Workers beyond the groups run none but host experts: they take part in every exchange of
    // every lane with nothing to send. Uneven groups per worker give idle lanes too.
    let mut fewer_groups = sim.clone();
    fewer_groups.train.groups = 2;
    let mut fewer_groups_transport = fewer_groups.clone();
    fewer_groups_transport.train.exchange = ExpertExchange::Transport;
    let want_fewer = tokio
        .block_on(train(
            &fewer_groups_transport,
            1,
            ExpertPlacement::RoundRobin,
            2,
            FaultPlan::none(),
        ))
        .expect("two groups over the transport");
    let mut sharded = fewer_groups.clone();
    sharded.storage.shard_dense = true;
    for (config, workers, placement) in [
        (&fewer_groups, 3, ExpertPlacement::RoundRobin),
        (&fewer_groups, 4, ExpertPlacement::Explicit(vec![3, 3, 0, 1])),
        (&sharded, 3, ExpertPlacement::Blocked),
    ] {
        let what = format!(
            "{workers} workers for 2 groups, {placement:?}, sharded dense {}",
            config.storage.shard_dense
        );
        let got = tokio
            .block_on(train(config, workers, placement, 2, FaultPlan::none()))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_same(&want_fewer.bits, &got.bits, &what);
        assert_eq!(got.generations, Some(1), "{what}: one generation");
    }
}

#[test]
fn a_failed_actor_aborts_the_communicators_and_the_replay_gives_the_same_bits() {
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let sim = config(ExpertExchange::Sim);
    let want = tokio
        .block_on(train(&sim, 2, ExpertPlacement::RoundRobin, 2, FaultPlan::none()))
        .expect("undisturbed");
    let scenarios = [
        (
            "expert error in the forward pass",
            Target::Expert { block: 1, expert: 2 },
            4,
            Moment::Forward,
            FaultKind::Error,
        ),
        (
            "expert panic in the backward pass",
            Target::Expert { block: 0, expert: 1 },
            6,
            Moment::Backward,
            FaultKind::Panic,
        ),
        (
            "gate error in the forward pass (before its exchange)",
            Target::Gate { worker: 1, block: 0 },
            3,
            Moment::Forward,
            FaultKind::Error,
        ),
        (
            "communicator error",
            Target::Communicator { worker: 0 },
            5,
            Moment::Any,
            FaultKind::Error,
        ),
        (
            "gate error in the first step, before any communicator exists",
            Target::Gate { worker: 0, block: 0 },
            0,
            Moment::Forward,
            FaultKind::Error,
        ),
    ];
    for (what, target, step, moment, kind) in scenarios {
        let plan = FaultPlan::none().with(target, step, moment, kind);
        let got = tokio
            .block_on(train(&sim, 2, ExpertPlacement::RoundRobin, 2, plan))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.replays, 1, "{what}: the interrupted step is replayed once");
        // In the first step the peer may or may not have built the first generation before the
        // abort; the replay runs on a new one either way.
        let generations = if step == 0 { 1..=2 } else { 2..=2 };
        assert!(
            got.generations.is_some_and(|g| generations.contains(&g)),
            "{what}: the replay ran on a new generation of communicators ({:?} built)",
            got.generations
        );
        assert_same(&want.bits, &got.bits, &format!("{what}: against the undisturbed run"));
    }
}

#[test]
fn a_worker_that_hangs_in_an_exchange_ends_the_run_with_an_error() {
    let deadline = Duration::from_millis(200);
    let (err, step, took) = common::run_with_a_silent_worker(config(ExpertExchange::Sim), deadline);
    let text = err.to_string();
    eprintln!("the hung worker's step {step} failed after {took:?} (deadline {deadline:?}): {text}");
    assert_eq!(step, 2, "the first step with the hung worker fails");
    assert!(text.contains("deadline") || text.contains("did not"), "{text}");
    // Over collectives a collective waits for the slowest worker's compute too: up to half the
    // step's deadline (10 x the collective deadline), which the hung worker's peers wait out.
    let collective_deadline = deadline * 5;
    assert!(
        took >= collective_deadline,
        "gave up after {took:?}, before the collectives' deadline {collective_deadline:?}"
    );
    assert!(
        took < deadline * 10,
        "gave up after {took:?}, after the step's deadline {:?}",
        deadline * 10
    );
}

#[test]
fn the_exchange_setting_is_refused_where_it_cannot_apply() {
    let mut c = config(ExpertExchange::Sim);
    c.train.workers = 0;
    let err = c.validate().expect_err("the plain loop").to_string();
    assert!(
        err.contains("train.exchange = \"sim\"") && err.contains("plain loop"),
        "{err}"
    );
    // Between worker processes both run: each process holds its ranks (the stand-in over the
    // data plane, or NCCL on its `--gpu`), with the coordinator's communicator ids.
    for exchange in [ExpertExchange::Sim, ExpertExchange::Nccl] {
        let mut c = config(exchange);
        c.train.processes = 2;
        c.validate().expect("collectives between worker processes");
    }
    let err = "gloo".parse::<ExpertExchange>().expect_err("unknown").to_string();
    assert!(err.contains("train.exchange") && err.contains("gloo"), "{err}");
}

/// One worker over NCCL on GPU 0 (a single-rank communicator per lane: every exchange a
/// self-exchange through the real library) ends with the transport's bits. Without the `cuda`
/// feature, a GPU or libnccl, the first step fails with a clear error, and the test says so.
#[test]
fn one_worker_over_nccl_gives_the_transports_bits() {
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let want = tokio
        .block_on(train(
            &config(ExpertExchange::Transport),
            1,
            ExpertPlacement::RoundRobin,
            2,
            FaultPlan::none(),
        ))
        .expect("over the transport");
    match tokio.block_on(train(
        &config(ExpertExchange::Nccl),
        1,
        ExpertPlacement::RoundRobin,
        2,
        FaultPlan::none(),
    )) {
        Ok(got) => {
            assert_same(&want.bits, &got.bits, "one worker over NCCL");
            assert_eq!(got.generations, Some(1));
        }
        Err(e) => {
            // Skipped only where NCCL cannot run: built without CUDA, no GPU visible, or no
            // libnccl. Any other error (every communicator error names its GPU) is a failure.
            let msg = e.to_string();
            let cannot_run = (!cfg!(feature = "cuda") && msg.contains("without CUDA"))
                || (semoe::kernels::cuda::CudaDevice::count() == 0 && msg.contains("GPU"))
                || msg.contains("the NCCL library was not found");
            assert!(
                msg.contains("NCCL") && cannot_run,
                "the runtime over NCCL failed where NCCL can run: {msg}"
            );
            eprintln!("skipping the NCCL runtime test: {msg}");
        }
    }
}
