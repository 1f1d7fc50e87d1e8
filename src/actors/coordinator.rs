//! The Coordinator actor: runs each step as a barrier and a two-phase commit over the workers, and
//! replays a step that an actor failure interrupted.
//!
//! Step N: (1a) every worker runs its groups (`RunStep`); (1b) every worker totals the gradients it
//! owns and answers its norm parts (`Prepare`); the coordinator adds the parts in canonical order
//! into the global norm; (2) every worker applies AdamW and broadcasts (`Commit`). If anything
//! before the commit fails, every worker rolls back (`Abort`) and, if the failure was an actor's
//! (restarted by its supervisor), the step runs again; otherwise the error ends the run.

use super::worker::{NormPart, WorkerActor, WorkerArgs, WorkerMsg};
use super::{ask, ActorName};
use crate::error::{Error, Result};
use crate::model::gpt::GroupOutput;
use crate::net::StepId;
use crate::optimizer::{norm_from_parts, OptimizerConfig};
use crate::telemetry::metrics as names;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::time::{Duration, Instant};

use super::ledger::LedgerSnapshot;

/// What a committed step reports.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    /// Steps committed so far (this step's number, 1-based).
    pub step: u64,
    /// Each group's losses and statistics, in group order.
    pub outputs: Vec<GroupOutput>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// How many times the step was replayed after a failure.
    pub replays: u32,
    /// Wall time of the step, replays included.
    pub seconds: f64,
}

/// Messages of the Coordinator.
pub enum CoordMsg {
    /// Run the next step to its commit.
    Step {
        /// The outcome.
        reply: RpcReplyPort<Result<StepOutcome>>,
    },
    /// Every worker's committed state.
    Snapshot {
        /// One snapshot per worker.
        reply: RpcReplyPort<Result<Vec<LedgerSnapshot>>>,
    },
}

/// A worker of the coordinator: one it starts in this process (and supervises), or one already
/// running elsewhere behind a proxy actor (a worker process; `elastic::proxy`), whose liveness its
/// owner watches.
pub enum WorkerSpec {
    /// Start a Worker actor in this process, linked to the coordinator.
    Local(Box<WorkerArgs>),
    /// A running actor that answers [`WorkerMsg`].
    Running(ActorRef<WorkerMsg>),
}

/// What the Coordinator is started with.
pub struct CoordArgs {
    /// One per worker.
    pub workers: Vec<WorkerSpec>,
    /// Steps already committed (a resumed run).
    pub first_step: u64,
    /// Total steps (the learning-rate schedule).
    pub total_steps: u64,
    /// The schedule.
    pub optimizer: OptimizerConfig,
    /// Tokens per step (for the throughput metric).
    pub tokens_per_step: usize,
    /// Data groups per step: the workers' outputs must cover each exactly once.
    pub groups: usize,
    /// Deadline of one worker's part of a step.
    pub step_deadline: Duration,
    /// Deadline of prepare, commit and abort.
    pub deadline: Duration,
    /// Replays of one step before giving up.
    pub max_replays: u32,
    /// The gradient norm's parts, `(tensor, expert)` in order: every dense tensor's `(i, 0)` and
    /// each expert's part of each expert tensor (see [`expected_norm_parts`]).
    pub norm_parts: Vec<(usize, usize)>,
    /// The model's tensors by index, each its name and whether it is an expert tensor: a norm that
    /// is not finite names the parts that made it.
    pub tensors: Vec<(String, bool)>,
    /// Steps whose metrics were recorded ([`super::RuntimeBuilder::reported_steps`]): a step up
    /// to it is not recorded again.
    pub reported: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The parts of the gradient norm of a model of `config`, in order: `(i, 0)` for each dense tensor
/// `i`, `(i, e)` for each expert `e` of each expert tensor `i` (how the workers answer them).
pub fn expected_norm_parts(config: &crate::model::gpt::GptConfig) -> Vec<(usize, usize)> {
    config
        .tensor_specs()
        .iter()
        .enumerate()
        .flat_map(|(i, spec)| {
            let experts = if spec.expert { spec.experts } else { 1 };
            (0..experts).map(move |e| (i, e))
        })
        .collect()
}

/// Where a gradient norm that is not finite came from: the first few parts that are not, with the
/// worker that computed each (`parts[w]` is worker `w`'s answer), as " (worker 1: expert 3 of
/// blocks.0.moe.w1 is NaN, ...)"; empty when every part is finite (the sum overflowed).
fn non_finite_parts(parts: &[Vec<NormPart>], tensors: &[(String, bool)]) -> String {
    const SHOWN: usize = 4;
    let bad: Vec<String> = parts
        .iter()
        .enumerate()
        .flat_map(|(w, answered)| {
            answered
                .iter()
                .filter(|(_, sum)| !sum.is_finite())
                .map(move |&((tensor, expert), sum)| (w, tensor, expert, sum))
        })
        .map(|(w, tensor, expert, sum)| {
            let what = match tensors.get(tensor) {
                Some((name, true)) => format!("expert {expert} of {name}"),
                Some((name, false)) => name.clone(),
                None => format!("tensor {tensor}"),
            };
            format!("worker {w}: {what} is {sum}")
        })
        .collect();
    match bad.len() {
        0 => String::new(),
        n if n <= SHOWN => format!(" ({})", bad.join(", ")),
        n => format!(" ({}, and {} more parts)", bad[..SHOWN].join(", "), n - SHOWN),
    }
}

/// Sort the norm parts the workers answered for step `n` and check them against `expected`:
/// each part once (its owner's), none missing or unknown, none negative. A forged, doubled or
/// missing part would change the clipping, and with it every worker's bits. (A part may be
/// infinite or NaN: that is divergence, reported by the caller.)
fn check_norm_parts(n: u64, parts: &mut [NormPart], expected: &[(usize, usize)]) -> Result<()> {
    parts.sort_by_key(|p| p.0);
    if let Some(w) = parts.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::runtime(format!(
            "step {n}: two workers answered the gradient norm's part {:?}",
            w[0].0
        )));
    }
    if let Some(p) = parts.iter().find(|p| p.1 < 0.0) {
        return Err(Error::runtime(format!(
            "step {n}: the gradient norm's part {:?} is negative ({})",
            p.0, p.1
        )));
    }
    let answered = || parts.iter().map(|p| p.0);
    if !answered().eq(expected.iter().copied()) {
        let missing = expected
            .iter()
            .find(|k| parts.binary_search_by_key(*k, |p| p.0).is_err());
        let unknown = answered().find(|k| expected.binary_search(k).is_err());
        let what = match (missing, unknown) {
            (_, Some(k)) => format!("part {k:?}, which the model does not have"),
            (Some(k), None) => format!("no part {k:?}"),
            (None, None) => "parts out of order".to_string(),
        };
        return Err(Error::runtime(format!(
            "step {n}: the workers answered {} of the gradient norm's {} parts, with {what}",
            parts.len(),
            expected.len()
        )));
    }
    Ok(())
}

/// The Coordinator's state.
pub struct CoordState {
    workers: Vec<ActorRef<WorkerMsg>>,
    step: u64,
    /// The attempt the next try of `step` runs as. Attempts go on counting across calls: a call
    /// after one that failed (its replays spent) runs a newer attempt than any message of the
    /// failed tries, which the actors then refuse as stale.
    attempt: u32,
    args: CoordArgs,
    /// Why the run cannot go on (a worker lost, a commit that failed part-way): every later step
    /// is refused with it.
    lost: Option<String>,
}

/// The Coordinator actor.
pub struct CoordActor;

impl Actor for CoordActor {
    type Msg = CoordMsg;
    type State = CoordState;
    type Arguments = CoordArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<CoordMsg>,
        mut args: CoordArgs,
    ) -> Result<CoordState, ActorProcessingErr> {
        let mut workers = Vec::with_capacity(args.workers.len());
        for w in std::mem::take(&mut args.workers) {
            match w {
                WorkerSpec::Local(w) => {
                    let (r, _) = Actor::spawn_linked(None, WorkerActor, *w, myself.get_cell()).await?;
                    workers.push(r);
                }
                WorkerSpec::Running(r) => workers.push(r),
            }
        }
        names::describe();
        Ok(CoordState {
            workers,
            step: args.first_step,
            attempt: 0,
            args,
            lost: None,
        })
    }

    async fn post_stop(&self, myself: ActorRef<CoordMsg>, _: &mut CoordState) -> Result<(), ActorProcessingErr> {
        myself.stop_children(None);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<CoordMsg>,
        event: SupervisionEvent,
        state: &mut CoordState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, _) | SupervisionEvent::ActorTerminated(cell, _, _) = &event {
            if let Some(w) = state.workers.iter().position(|r| r.get_id() == cell.get_id()) {
                state.lost.get_or_insert(format!("worker {w} stopped: {event:?}"));
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<CoordMsg>,
        msg: CoordMsg,
        state: &mut CoordState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordMsg::Step { reply } => {
                let r = match &state.lost {
                    Some(lost) => Err(Error::runtime(lost.clone())),
                    None => step(state).await,
                };
                let _ = reply.send(r);
            }
            CoordMsg::Snapshot { reply } => {
                // Every worker at once, each within one deadline (one after another, the caller's
                // bound ran out with many workers or slow Disk tiers); none after a failed commit,
                // whose workers may hold different steps.
                let r = match &state.lost {
                    Some(lost) => Err(Error::runtime(lost.clone())),
                    None => all(&state.workers, "a snapshot", state.args.deadline, |reply| {
                        WorkerMsg::Snapshot { reply }
                    })
                    .await
                    .and_then(|snaps| snapshots_of_step(snaps, state.step)),
                };
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}

/// The workers' snapshots, each of the committed `step` (the state they hold after it): one of
/// another step (a worker process's stale answer) would make a checkpoint, or a new epoch's
/// state, of mixed steps.
fn snapshots_of_step(snaps: Vec<LedgerSnapshot>, step: u64) -> Result<Vec<LedgerSnapshot>> {
    match snaps.iter().position(|s| s.step != step) {
        Some(w) => Err(Error::runtime(format!(
            "worker {w} answered a snapshot of step {}, not of the committed step {step}",
            snaps[w].step
        ))),
        None => Ok(snaps),
    }
}

/// Ask every worker the same question at once; answer in worker order. The most serious error wins
/// (one that a replay does not repair).
async fn all<R: Send + 'static>(
    workers: &[ActorRef<WorkerMsg>],
    what: &str,
    deadline: Duration,
    build: impl Fn(RpcReplyPort<Result<R>>) -> WorkerMsg + Clone + Send + 'static,
) -> Result<Vec<R>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, w) in workers.iter().enumerate() {
        let (w, what, build) = (w.clone(), what.to_string(), build.clone());
        tasks.spawn(async move {
            (
                i,
                ask(&w, &ActorName(format!("worker {i}")), &what, deadline, build).await,
            )
        });
    }
    let mut results: Vec<Option<R>> = (0..workers.len()).map(|_| None).collect();
    let mut errors: Vec<(usize, Error)> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((i, Ok(r))) => results[i] = Some(r),
            Ok((i, Err(e))) => errors.push((i, e)),
            Err(e) => errors.push((usize::MAX, Error::runtime(format!("a call to a worker panicked: {e}")))),
        }
    }
    match deciding_error(errors) {
        Some(e) => Err(e),
        None => results
            .into_iter()
            .map(|r| r.ok_or_else(|| Error::runtime("a worker gave no answer")))
            .collect(),
    }
}

/// The error a call to every worker ends with, from each worker's (by index): the first that a
/// restart does not repair, else the first. A worker that did not answer a peer within the
/// deadline is explained by that peer's own restartable failure in the same call: a request
/// queued in a failed communicator's mailbox is lost with the actor, so the peer that sent it
/// waits for its deadline, and a replay (on the restarted communicator) repairs both.
fn deciding_error(mut errors: Vec<(usize, Error)>) -> Option<Error> {
    // In worker order, not the order the answers arrived in: which error ends a run must not
    // depend on timing.
    errors.sort_by_key(|(i, _)| *i);
    let restarted: Vec<usize> = errors
        .iter()
        .filter(|(_, e)| e.is_restartable())
        .map(|(i, _)| *i)
        .collect();
    let mut unrepaired = None;
    let mut repaired = None;
    for (_, e) in errors {
        if e.is_restartable() {
            repaired.get_or_insert(e);
        } else if !e.silent_worker().is_some_and(|w| restarted.contains(&w)) {
            unrepaired.get_or_insert(e);
        }
    }
    unrepaired.or(repaired)
}

async fn step(state: &mut CoordState) -> Result<StepOutcome> {
    let started = Instant::now();
    let n = state.step;
    let mut replays = 0u32;
    loop {
        let id = StepId {
            step: n,
            attempt: state.attempt,
        };
        match attempt(state, id).await {
            Ok((outputs, grad_norm, lr)) => {
                state.step += 1;
                state.attempt = 0;
                let seconds = started.elapsed().as_secs_f64();
                // `fetch_max` answers the count before: this step is new if it was below.
                let reported = state
                    .args
                    .reported
                    .fetch_max(state.step, std::sync::atomic::Ordering::SeqCst);
                if state.step > reported {
                    metrics::histogram!(names::STEP_SECONDS).record(seconds);
                    metrics::gauge!(names::COMMITTED_STEP).set(state.step as f64);
                    metrics::gauge!(names::TOKENS_PER_SECOND)
                        .set(state.args.tokens_per_step as f64 / seconds.max(1e-9));
                    let ce: f64 = outputs.iter().map(|o| o.ce_sum).sum::<f64>() / state.args.tokens_per_step as f64;
                    metrics::gauge!(names::LOSS).set(ce);
                    metrics::gauge!(names::LEARNING_RATE).set(lr);
                    metrics::gauge!(names::GRAD_NORM).set(grad_norm);
                    record_load(&outputs);
                }
                return Ok(StepOutcome {
                    step: state.step,
                    outputs,
                    grad_norm,
                    lr,
                    replays,
                    seconds,
                });
            }
            Err(e) => {
                let deadline = state.args.deadline;
                let aborted = all(
                    &state.workers,
                    &format!("the abort of step {id}"),
                    deadline,
                    move |reply| WorkerMsg::Abort { step: id, reply },
                )
                .await;
                if let Err(abort) = aborted {
                    let e = format!("{e}; then the rollback failed: {abort}");
                    state.lost.get_or_insert(e.clone());
                    return Err(Error::runtime(e));
                }
                state.attempt = state.attempt.saturating_add(1);
                if !e.is_restartable() || replays >= state.args.max_replays {
                    return Err(e);
                }
                replays += 1;
                metrics::counter!(names::REPLAYS).increment(1);
            }
        }
    }
}

fn record_load(outputs: &[GroupOutput]) {
    let Some(first) = outputs.first() else { return };
    for (l, stats) in first.moe_stats.iter().enumerate() {
        for e in 0..stats.expert_tokens.len() {
            let total: usize = outputs.iter().map(|o| o.moe_stats[l].expert_tokens[e]).sum();
            metrics::counter!(names::EXPERT_TOKENS, "block" => l.to_string(), "expert" => e.to_string())
                .increment(total as u64);
        }
        let dropped: usize = outputs.iter().map(|o| o.moe_stats[l].dropped).sum();
        metrics::counter!(names::EXPERT_DROPPED, "block" => l.to_string()).increment(dropped as u64);
    }
}

async fn attempt(state: &mut CoordState, id: StepId) -> Result<(Vec<GroupOutput>, f64, f64)> {
    let a = &state.args;
    let n = id.step;
    let ran = all(&state.workers, &format!("step {n}"), a.step_deadline, move |reply| {
        WorkerMsg::RunStep { step: id, reply }
    })
    .await?;
    let mut outputs: Vec<(usize, GroupOutput)> = ran.into_iter().flatten().collect();
    outputs.sort_by_key(|(g, _)| *g);
    // Every group once: a worker process that answers for none, or twice for one, would otherwise
    // make the loss and the statistics silently wrong.
    if outputs.len() != a.groups || outputs.iter().enumerate().any(|(i, (g, _))| *g != i) {
        let answered: Vec<usize> = outputs.iter().map(|(g, _)| *g).collect();
        return Err(Error::runtime(format!(
            "step {n}: the workers answered for groups {answered:?}, not for each of the {} groups once",
            a.groups
        )));
    }
    let outputs: Vec<GroupOutput> = outputs.into_iter().map(|(_, o)| o).collect();

    let parts = all(
        &state.workers,
        &format!("the prepare of step {n}"),
        a.deadline,
        move |reply| WorkerMsg::Prepare { step: id, reply },
    )
    .await?;
    let not_finite = non_finite_parts(&parts, &a.tensors);
    let mut parts: Vec<NormPart> = parts.into_iter().flatten().collect();
    check_norm_parts(n, &mut parts, &a.norm_parts)?;
    let grad_norm = norm_from_parts(parts.iter().map(|(_, s)| *s));
    let lr = a.optimizer.lr_at(n, a.total_steps);
    // Refused before any worker applies it (a commit that fails on some leaves them disagreeing).
    if let Some(what) = a.optimizer.divergence(grad_norm) {
        return Err(Error::Diverged {
            step: n + 1,
            what: format!("{what}{not_finite}"),
            lr,
        });
    }
    let committed = all(
        &state.workers,
        &format!("the commit of step {n}"),
        a.deadline.saturating_mul(4),
        move |reply| WorkerMsg::Commit {
            step: id,
            lr,
            norm: grad_norm,
            reply,
        },
    )
    .await;
    if let Err(e) = committed {
        // No advice to resume here: the coordinator cannot know whether the run has a checkpoint
        // (a run that fails at its first commit has none), so it only says what failed and why the
        // run cannot go on. Some workers may have applied the step: running it again would apply
        // it twice there, so every later step is refused.
        let e =
            format!("the commit of step {n} failed ({e}); the workers may now disagree, so the run cannot continue");
        state.lost = Some(e.clone());
        return Err(Error::runtime(e));
    }
    Ok((outputs, grad_norm, lr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_norm_that_is_not_finite_names_its_parts_and_their_workers() {
        let tensors = vec![("wte".to_string(), false), ("h.0.moe.w1".to_string(), true)];
        let finite = vec![((0, 0), 1.0), ((1, 0), 2.0)];
        assert_eq!(non_finite_parts(&[finite.clone(), vec![((1, 1), 3.0)]], &tensors), "");
        let parts = vec![finite, vec![((1, 1), f64::NAN), ((0, 0), f64::INFINITY)]];
        assert_eq!(
            non_finite_parts(&parts, &tensors),
            " (worker 1: expert 1 of h.0.moe.w1 is NaN, worker 1: wte is inf)"
        );
        let many = vec![vec![((1, 0), f64::NAN); 6]];
        let said = non_finite_parts(&many, &tensors);
        assert!(said.ends_with(", and 2 more parts)"), "{said}");
        assert_eq!(said.matches("worker 0: expert 0 of h.0.moe.w1 is NaN").count(), 4);
    }

    fn failed(worker: usize) -> Error {
        Error::ActorFailed {
            actor: format!("the communicator of worker {worker}"),
            detail: "panicked".into(),
        }
    }

    fn silent(worker: usize) -> Error {
        Error::Deadline {
            peer: format!("worker {worker}"),
            what: "the block-1 expert forward of step 5".into(),
            deadline_ms: 1000,
        }
    }

    #[test]
    fn a_snapshot_of_another_step_is_refused() {
        let snap = |step| LedgerSnapshot {
            step,
            dense: Vec::new(),
            experts: Vec::new(),
        };
        assert_eq!(
            snapshots_of_step(vec![snap(7), snap(7)], 7).expect("same step").len(),
            2
        );
        let e = snapshots_of_step(vec![snap(7), snap(6)], 7)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("worker 1 answered a snapshot of step 6, not of the committed step 7"),
            "{e}"
        );
    }

    #[test]
    fn the_norm_parts_are_each_tensors_and_each_experts() {
        let config = crate::model::gpt::GptConfig {
            experts: 3,
            ..Default::default()
        };
        let specs = config.tensor_specs();
        let parts = expected_norm_parts(&config);
        let expert_tensors = specs.iter().filter(|s| s.expert).count();
        assert!(expert_tensors > 0);
        assert_eq!(parts.len(), specs.len() + 2 * expert_tensors);
        assert!(parts.windows(2).all(|w| w[0] < w[1]), "in order: {parts:?}");
    }

    #[test]
    fn norm_parts_missing_unknown_doubled_or_negative_are_refused() {
        let expected = vec![(0, 0), (1, 0), (1, 1), (2, 0)];
        let good: Vec<NormPart> = vec![((2, 0), 1.0), ((1, 1), 2.0), ((0, 0), 3.0), ((1, 0), 4.0)];
        let mut parts = good.clone();
        check_norm_parts(5, &mut parts, &expected).expect("every part once");
        assert_eq!(parts.iter().map(|p| p.0).collect::<Vec<_>>(), expected, "sorted");
        let refused = |mut parts: Vec<NormPart>| {
            check_norm_parts(5, &mut parts, &expected)
                .expect_err("refused")
                .to_string()
        };
        let missing = refused(good[..3].to_vec());
        assert!(
            missing.contains("answered 3 of the gradient norm's 4 parts, with no part (1, 0)"),
            "{missing}"
        );
        let mut extra = good.clone();
        extra.push(((9, 0), 0.5));
        let extra = refused(extra);
        assert!(extra.contains("part (9, 0), which the model does not have"), "{extra}");
        let mut swapped = good[..3].to_vec();
        swapped.push(((1, 2), 4.0));
        let swapped = refused(swapped);
        assert!(
            swapped.contains("part (1, 2), which the model does not have"),
            "{swapped}"
        );
        let mut doubled = good.clone();
        doubled.push(((1, 1), 2.0));
        assert!(refused(doubled).contains("two workers answered the gradient norm's part (1, 1)"));
        let mut negative = good;
        negative[0].1 = -1.0;
        assert!(refused(negative).contains("part (2, 0) is negative (-1)"));
    }

    #[test]
    fn a_deadline_on_a_worker_that_failed_restartably_is_replayed() {
        // Worker 1 waited for a request lost in worker 0's failed communicator.
        let e = deciding_error(vec![(1, silent(0)), (0, failed(0))]).unwrap();
        assert!(e.is_restartable(), "{e}");
        assert!(e.to_string().contains("communicator of worker 0"), "{e}");
    }

    #[test]
    fn a_deadline_not_explained_by_a_failure_ends_the_call() {
        // Worker 0 answered; it is silent, not restarted.
        let e = deciding_error(vec![(1, silent(0))]).unwrap();
        assert_eq!(e.silent_worker(), Some(0), "{e}");
        // Worker 2 failed, but the deadline is worker 0's.
        let e = deciding_error(vec![(2, failed(2)), (1, silent(0))]).unwrap();
        assert_eq!(e.silent_worker(), Some(0), "{e}");
        // A worker that did not answer the coordinator explains nothing by itself.
        let e = deciding_error(vec![(0, silent(0)), (1, silent(0))]).unwrap();
        assert!(!e.is_restartable(), "{e}");
        // Any other error a restart does not repair wins over restartable ones.
        let e = deciding_error(vec![(0, failed(0)), (1, Error::runtime("disk full"))]).unwrap();
        assert_eq!(e.to_string(), "runtime: disk full");
        assert!(deciding_error(Vec::new()).is_none());
        // Of two such errors, the lower worker's, in whichever order they arrived.
        for arrived in [[1, 2], [2, 1]] {
            let errors = arrived.map(|w| (w, Error::runtime(format!("worker {w}'s disk"))));
            let e = deciding_error(errors.into()).unwrap();
            assert_eq!(e.to_string(), "runtime: worker 1's disk", "arrived {arrived:?}");
        }
    }

    #[test]
    fn only_a_deadline_names_a_silent_worker() {
        assert_eq!(silent(12).silent_worker(), Some(12));
        assert_eq!(failed(3).silent_worker(), None);
        let coordinator = Error::Deadline {
            peer: "the coordinator".into(),
            what: "a setup".into(),
            deadline_ms: 10,
        };
        assert_eq!(coordinator.silent_worker(), None);
    }
}
