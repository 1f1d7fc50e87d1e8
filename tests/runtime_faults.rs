//! Fault injection: failed Expert and Gate actors (errors and panics, in the forward and the
//! backward pass) are restarted and their step replayed, ending with the same parameters as an
//! undisturbed run; the restarts show in the metrics. A peer that never answers ends the run with a
//! clear error within its deadline (the failing step ends between the deadline and a second past
//! it), and a worker past its restart limit reports itself lost. Runs compare the model and the
//! optimizer state (AdamW moments and step) bit for bit, and the replays are counted exactly.
//!
//! One test, the scenarios in sequence: it installs the global metrics recorder and reads it.

mod common;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use semoe::actors::{RestartPolicy, Runtime};
use semoe::chaos::{FaultKind, FaultPlan, Moment, Target};
use semoe::telemetry::metrics as names;
use semoe::train::config::TrainConfig;
use std::time::Duration;

const STEPS: u64 = 12;

/// Margin over the deadline for the silent-peer step to fail (measured: about 2 ms over it).
const BOUND_MS: u64 = 1_000;

fn small_config() -> TrainConfig {
    common::small_config(STEPS)
}

/// Sums of the restart and replay counters (over all label sets) since the last snapshot, from
/// one snapshot (taking it resets the counters, so both are read from the same one).
fn restarts_and_replays(snap: &Snapshotter) -> (u64, u64) {
    let (mut restarts, mut replays) = (0, 0);
    for (key, _, _, value) in snap.snapshot().into_vec() {
        if let DebugValue::Counter(n) = value {
            match key.key().name() {
                names::RESTARTS => restarts += n,
                names::REPLAYS => replays += n,
                _ => {}
            }
        }
    }
    (restarts, replays)
}

/// The bits of the model and the optimizer state (moments and step) after `STEPS` steps, and the
/// replays the steps reported.
async fn train(workers: usize, plan: FaultPlan) -> semoe::Result<(Vec<(String, Vec<u32>)>, u32)> {
    let run = common::train_steps(Runtime::builder(small_config()).workers(workers), STEPS, &plan).await?;
    Ok((run.bits, run.replays))
}

/// What an undisturbed run of `STEPS` steps on 2 workers records.
fn check_instrumentation(snap: &Snapshotter) {
    let c = small_config();
    let mut committed = None;
    let (mut kept, mut dropped, mut dispatch_0_to_1, mut restarts, mut replays) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut step_samples = 0;
    for (key, _, _, value) in snap.snapshot().into_vec() {
        let name = key.key().name().to_string();
        let label = |k: &str| key.key().labels().find(|l| l.key() == k).map(|l| l.value().to_string());
        match (name.as_str(), value) {
            (names::COMMITTED_STEP, DebugValue::Gauge(v)) => committed = Some(v.into_inner()),
            (names::EXPERT_TOKENS, DebugValue::Counter(n)) => kept += n,
            (names::EXPERT_DROPPED, DebugValue::Counter(n)) => dropped += n,
            (names::RESTARTS, DebugValue::Counter(n)) => restarts += n,
            (names::REPLAYS, DebugValue::Counter(n)) => replays += n,
            (names::STEP_SECONDS, DebugValue::Histogram(h)) => step_samples += h.len(),
            (names::ALLTOALL_BYTES, DebugValue::Counter(n))
                if label("from").as_deref() == Some("0")
                    && label("to").as_deref() == Some("1")
                    && label("kind").as_deref() == Some("dispatch") =>
            {
                dispatch_0_to_1 += n
            }
            _ => {}
        }
    }
    assert_eq!(committed, Some(STEPS as f64), "committed step gauge");
    assert_eq!(step_samples, STEPS as usize, "one step-time sample per step");
    let assignments = STEPS as usize * c.train.batch * c.model.block_size * c.model.k * c.model.n_layer;
    assert_eq!(
        (kept + dropped) as usize,
        assignments,
        "every assignment is either kept or dropped"
    );
    assert!(dispatch_0_to_1 > 0, "worker 0 sent expert rows to worker 1");
    assert_eq!(restarts, 0, "no restarts in an undisturbed run");
    assert_eq!(replays, 0, "no replays in an undisturbed run");
}

#[test]
fn failed_actors_are_restarted_and_the_result_is_unchanged() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder.install().expect("the only recorder of this test binary");
    let tokio = tokio::runtime::Runtime::new().expect("tokio");

    let (want, replays) = tokio.block_on(train(2, FaultPlan::none())).expect("undisturbed run");
    assert_eq!(replays, 0, "an undisturbed run replays nothing");
    check_instrumentation(&snap);

    let expert = |block, expert| Target::Expert { block, expert };
    let gate = |worker, block| Target::Gate { worker, block };
    let scenarios = [
        (
            "expert error in the forward pass",
            expert(1, 2),
            4,
            Moment::Forward,
            FaultKind::Error,
        ),
        (
            "expert panic in the backward pass",
            expert(0, 1),
            6,
            Moment::Backward,
            FaultKind::Panic,
        ),
        (
            "gate error in the forward pass",
            gate(1, 0),
            3,
            Moment::Forward,
            FaultKind::Error,
        ),
        (
            "gate panic in the backward pass",
            gate(0, 1),
            8,
            Moment::Backward,
            FaultKind::Panic,
        ),
    ];
    for (what, target, step, moment, kind) in scenarios {
        let plan = FaultPlan::none().with(target, step, moment, kind);
        let (got, replays) = tokio.block_on(train(2, plan)).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(replays, 1, "{what}: the interrupted step is replayed once");
        common::assert_same(&want, &got, &format!("{what}: against the undisturbed run"));
        assert_eq!(
            restarts_and_replays(&snap),
            (1, 1),
            "{what}: one restart and one replay in the metrics"
        );
    }

    // Two faults in one step, on one worker: both actors restart, the step replays until it passes.
    let plan = FaultPlan::none()
        .with(expert(0, 0), 2, Moment::Forward, FaultKind::Panic)
        .with(gate(0, 1), 2, Moment::Backward, FaultKind::Error);
    let (got, replays) = tokio.block_on(train(2, plan)).expect("two faults");
    common::assert_same(&want, &got, "two faults: against the undisturbed run");
    assert_eq!(replays, 2);
    assert_eq!(
        restarts_and_replays(&snap),
        (2, 2),
        "two faults: two restarts and two replays in the metrics"
    );

    // With one replay allowed the same two faults fail the step; called again, the step runs as a
    // newer attempt than any message of the failed tries (not as attempt 0, which the actors
    // refused as rolled back), and the run ends as the undisturbed one.
    let plan = FaultPlan::none()
        .with(expert(0, 0), 2, Moment::Forward, FaultKind::Panic)
        .with(gate(0, 1), 2, Moment::Backward, FaultKind::Error);
    let (got, failures) = tokio
        .block_on(async {
            let rt = Runtime::builder(small_config())
                .workers(2)
                .max_replays(1)
                .chaos(plan.clone())
                .build()
                .await?;
            let (mut done, mut failures) = (0, Vec::new());
            while done < STEPS && failures.len() <= 1 {
                match rt.step().await {
                    Ok(_) => done += 1,
                    Err(e) => failures.push((done, e.to_string())),
                }
            }
            let (model, optimizer) = rt.state().await?;
            rt.shutdown().await?;
            Ok::<_, semoe::Error>((common::state_bits(&model, &optimizer), failures))
        })
        .expect("a step called again after its replays ran out");
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, 2, "the step of the faults failed: {failures:?}");
    assert_eq!(plan.pending(), 0, "both faults fired");
    common::assert_same(&want, &got, "a step called again: against the undisturbed run");
    assert_eq!(
        restarts_and_replays(&snap),
        (2, 1),
        "two restarts, one replay within the call that failed"
    );

    // Past the restart limit the worker reports itself lost and the run stops with that error.
    let plan = FaultPlan::none()
        .with(expert(0, 0), 1, Moment::Forward, FaultKind::Error)
        .with(expert(0, 0), 1, Moment::Backward, FaultKind::Error)
        .with(expert(1, 0), 1, Moment::Forward, FaultKind::Error);
    // Its state is not handed out afterwards either.
    let (err, state_err) = tokio.block_on(async {
        let rt = Runtime::builder(small_config())
            .workers(2)
            .restart_policy(RestartPolicy {
                max_restarts: 1,
                window: Duration::from_secs(60),
            })
            .chaos(plan)
            .build()
            .await
            .expect("runtime");
        let mut err = None;
        for _ in 0..3 {
            if let Err(e) = rt.step().await {
                err = Some(e.to_string());
                break;
            }
        }
        let state_err = rt.state().await.err().map(|e| e.to_string());
        let _ = rt.shutdown().await;
        (err, state_err)
    });
    let err = err.expect("the worker runs out of restarts");
    assert!(err.contains("worker 0 lost"), "{err}");
    // One restart within the limit; the failure past it restarts nothing. It comes in the replay,
    // or already in the first attempt: a group whose tokens all avoid expert 0.0 reaches block 1,
    // and expert 1.0's fault, before the step is called off (data and timing decide), so the
    // replays are 1 or 0.
    let (restarts, replays) = restarts_and_replays(&snap);
    assert_eq!(restarts, 1, "one restart within the limit, none past it");
    assert!(replays <= 1, "{replays} replays");
    let state_err = state_err.expect("a lost worker's state is refused");
    assert!(state_err.contains("worker 0 lost"), "{state_err}");

    a_silent_peer_is_an_error_within_its_deadline();
    shutdown_ends_a_step_its_caller_gave_up_on();
}

/// A step whose caller stopped waiting (a peer silent, the deadline a minute) runs on inside the
/// runtime; shutting down ends it after the grace period instead of at its deadline.
fn shutdown_ends_a_step_its_caller_gave_up_on() {
    use semoe::chaos::Target;
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let took = tokio.block_on(async {
        let rt = Runtime::builder(small_config())
            .workers(2)
            .deadline(Duration::from_secs(60))
            .chaos(FaultPlan::none().with(Target::Silence { worker: 1 }, 1, Moment::Any, FaultKind::Error))
            .build()
            .await
            .expect("runtime");
        rt.step().await.expect("step 0");
        let gave_up = tokio::time::timeout(Duration::from_millis(300), rt.step()).await;
        assert!(gave_up.is_err(), "step 1 waits for the silent worker");
        let started = std::time::Instant::now();
        let _ = rt.shutdown().await;
        started.elapsed()
    });
    assert!(
        took < semoe::actors::runtime::SHUTDOWN_GRACE * 2 + Duration::from_secs(5),
        "shutdown took {took:?} with a step in flight"
    );
}

/// A peer that never answers ends the run with an error naming it, within the deadline.
fn a_silent_peer_is_an_error_within_its_deadline() {
    let deadline = Duration::from_millis(400);
    let (err, step, took) = common::run_with_a_silent_worker(small_config(), deadline);
    let text = err.to_string();
    assert!(text.contains("worker 1") && text.contains("did not answer"), "{text}");
    eprintln!("the silent peer's step {step} failed after {took:?} (deadline {deadline:?})");
    assert_eq!(step, 2, "the first silent step fails");
    assert!(
        took >= deadline,
        "gave up after {took:?}, before the deadline {deadline:?}"
    );
    assert!(
        took < deadline + Duration::from_millis(BOUND_MS),
        "gave up after {took:?}, not near the deadline {deadline:?}"
    );
}
