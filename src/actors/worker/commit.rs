//! The worker's half of the two-phase commit: `prepare` (each hosted expert's gradient norm part,
//! from the Expert actors) and `commit` (every expert's AdamW update, the dense tensors this worker
//! owns, and the new parameters sent to the workers that replicate them).

use super::step::exchange;
use super::{ledger, NormPart, WorkerState};
use crate::actors::expert::ExpertMsg;
use crate::actors::ledger::LedgerMsg;
use crate::actors::{ask, ActorName};
use crate::error::{Error, Result};
use crate::net::Payload;
use crate::net::StepId;
use crate::storage::tiers::ExpertSlot;
use ractor::ActorRef;
use std::sync::PoisonError;

/// The Expert actors this worker hosts now, by `(block, expert)`.
fn hosted_experts(state: &WorkerState) -> Vec<((usize, usize), ActorRef<ExpertMsg>)> {
    state
        .registry
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .experts
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect()
}

/// Ask every hosted expert at once; answer `(expert id, answer)` in expert order.
async fn for_each_expert<R, F, Fut>(
    experts: Vec<((usize, usize), ActorRef<ExpertMsg>)>,
    ask_one: F,
) -> Result<Vec<((usize, usize), R)>>
where
    R: Send + 'static,
    F: Fn((usize, usize), ActorRef<ExpertMsg>) -> Fut,
    Fut: std::future::Future<Output = Result<R>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for (id, actor) in experts {
        let fut = ask_one(id, actor);
        tasks.spawn(async move { (id, fut.await) });
    }
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (id, r) = joined.map_err(|e| Error::runtime(format!("an expert call panicked: {e}")))?;
        out.push((id, r?));
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

pub(super) async fn prepare(state: &mut WorkerState, step: StepId) -> Result<Vec<NormPart>> {
    let deadline = state.args.deadline;
    let t = ledger(state)?;
    let mut parts: Vec<NormPart> = ask(
        &t,
        &ActorName(format!("ledger of worker {}", state.args.worker)),
        "prepare",
        deadline,
        |reply| LedgerMsg::Prepare { step, reply },
    )
    .await?
    .into_iter()
    .map(|(i, s)| ((i, 0), s))
    .collect();
    let experts = hosted_experts(state);
    let names: Vec<String> = {
        let replica = state.args.replica.lock().unwrap_or_else(PoisonError::into_inner);
        replica.tensors().into_iter().map(|(n, _, _)| n).collect()
    };
    let worker = state.args.worker;
    let answers = for_each_expert(experts, move |(block, e), actor| async move {
        let who = ActorName(format!("expert {block}.{e} on worker {worker}"));
        ask(&actor, &who, "prepare", deadline, |reply| ExpertMsg::Prepare {
            step,
            reply,
        })
        .await
    })
    .await?;
    for ((block, e), sums) in answers {
        let idx = ExpertSlot::tensor_indices(names.iter().map(String::as_str), block)?;
        parts.extend(idx.iter().zip(sums).map(|(&i, s)| ((i, e), s)));
    }
    Ok(parts)
}

pub(super) async fn commit(state: &mut WorkerState, step: StepId, lr: f64, norm: f64) -> Result<()> {
    let a = state.args.clone();
    let t = ledger(state)?;
    let updated = ask(
        &t,
        &ActorName(format!("ledger of worker {}", a.worker)),
        "commit",
        a.deadline,
        |reply| LedgerMsg::Commit { step, lr, norm, reply },
    )
    .await?;
    let experts = hosted_experts(state);
    let (worker, deadline) = (a.worker, a.deadline);
    for_each_expert(experts, move |(block, e), actor| async move {
        let who = ActorName(format!("expert {block}.{e} on worker {worker}"));
        ask(&actor, &who, "commit", deadline, |reply| ExpertMsg::Commit {
            step,
            lr,
            norm,
            reply,
        })
        .await
    })
    .await?;
    // Broadcast the new values of the owned dense tensors to every replica (this one included);
    // sharded, only this worker keeps them, and the others gather them when a leg needs them.
    let receivers: Vec<usize> = if a.config.storage.shard_dense {
        vec![a.worker]
    } else {
        (0..a.placement.workers).collect()
    };
    let requests: Vec<(usize, Payload)> = receivers
        .into_iter()
        .map(|w| {
            (
                w,
                Payload::Params {
                    step,
                    tensors: updated.clone(),
                },
            )
        })
        .collect();
    // Committed here: the peers' work from now on is of the next step. (The driver starts it only
    // once every worker has answered this commit, so none arrives earlier.)
    state
        .next_step
        .store(step.step.saturating_add(1), std::sync::atomic::Ordering::Release);
    let what = format!("the parameter broadcast of step {step}");
    exchange(state, step, what, "params", requests).await?;
    Ok(())
}
