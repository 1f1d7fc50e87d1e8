//! The coordinator's stand-in for a worker process: an actor that answers [`WorkerMsg`] by sending
//! the matching [`Command`] over the worker's control connection and decoding its [`Reply`]. The
//! actor runtime's Coordinator drives it exactly like an in-process Worker.

use super::comm_ids::CommIdMaker;
use super::protocol::{self, Command, Reply};
use crate::actors::worker::WorkerMsg;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::net::quic;
use crate::net::StepId;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;

/// Largest reply frame accepted (a snapshot of the whole model with its moments, and headroom).
pub fn max_reply_bytes(config: &TrainConfig) -> Result<usize> {
    let limits = protocol::state_limits(config)?;
    Ok(limits.header_bytes + 16 + 8 * limits.bodies + 4 * limits.floats)
}

/// Send `command` (and `extra`, a second frame, for a setup's state) on a new stream of `conn`
/// and read the reply frame. A lost connection fails at once, naming `who`.
pub async fn call(
    conn: &quinn::Connection,
    who: &str,
    command: &Command,
    extra: Option<&[u8]>,
    max_reply: usize,
) -> Result<Vec<u8>> {
    let lost = |e: String| Error::runtime(format!("{who} is unreachable: {e}"));
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
    quic::write_frame(&mut send, &protocol::encode(command)?).await?;
    if let Some(extra) = extra {
        quic::write_frame(&mut send, extra).await?;
    }
    let _ = send.finish();
    quic::read_frame(&mut recv, max_reply, "a worker's reply")
        .await?
        .ok_or_else(|| lost("it closed the stream without answering".into()))
}

/// What the proxy knows of its worker.
pub struct ProxyArgs {
    /// The control connection.
    pub conn: quinn::Connection,
    /// For messages: `worker 1 (member 3, host:pid)`.
    pub name: String,
    /// The membership epoch it serves.
    pub epoch: u64,
    /// The run's configuration (to validate replies).
    pub config: Arc<TrainConfig>,
    /// The epoch's communicator ids, shared by its proxies, when expert rows travel over
    /// collectives: an abort is told to it, and the first step after one carries new ids.
    pub comm_ids: Option<Arc<CommIdMaker>>,
}

/// The proxy actor.
pub struct ProxyActor;

fn wire_step(s: StepId) -> (u64, u32) {
    (s.step, s.attempt)
}

impl Actor for ProxyActor {
    type Msg = WorkerMsg;
    type State = Arc<ProxyArgs>;
    type Arguments = ProxyArgs;

    async fn pre_start(&self, _: ActorRef<WorkerMsg>, args: ProxyArgs) -> Result<Self::State, ActorProcessingErr> {
        Ok(Arc::new(args))
    }

    async fn handle(
        &self,
        _: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Each call runs in its own task, so that the proxy never holds up a message behind a
        // network round trip (the Coordinator bounds every call with its deadline).
        let p = state.clone();
        let epoch = p.epoch;
        match msg {
            WorkerMsg::RunStep { step, reply } => {
                let comm_ids = match p.comm_ids.as_ref().map(|maker| maker.for_step(step)).transpose() {
                    Ok(ids) => ids
                        .flatten()
                        .map(|ids| protocol::comm_ids_to_wire(&ids))
                        .unwrap_or_default(),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                };
                let command = Command::RunStep {
                    epoch,
                    step: wire_step(step),
                    comm_ids,
                };
                forward(p, command, reply, |p, r| match r {
                    Reply::Outputs(o) => protocol::outputs_from_wire(&p.config, o).map_err(|e| violation(p, e)),
                    other => unexpected(p, other),
                });
            }
            WorkerMsg::Prepare { step, reply } => {
                let command = Command::Prepare {
                    epoch,
                    step: wire_step(step),
                };
                forward(p, command, reply, |p, r| match r {
                    Reply::Norms(n) => Ok(protocol::norms_from_wire(n)),
                    other => unexpected(p, other),
                });
            }
            WorkerMsg::Commit { step, lr, norm, reply } => {
                let command = Command::Commit {
                    epoch,
                    step: wire_step(step),
                    lr,
                    norm,
                };
                forward(p, command, reply, done);
            }
            WorkerMsg::Abort { step, reply } => {
                if let Some(maker) = &p.comm_ids {
                    maker.aborted(step);
                }
                let command = Command::Abort {
                    epoch,
                    step: wire_step(step),
                };
                forward(p, command, reply, done);
            }
            WorkerMsg::Snapshot { reply } => {
                tokio::spawn(async move {
                    let r = while_wanted(&reply, async {
                        let max = max_reply_bytes(&p.config)?;
                        let bytes = call(&p.conn, &p.name, &Command::Snapshot { epoch }, None, max).await?;
                        let config = p.config.clone();
                        // Tens of megabytes: decoded off the async threads, which carry the keep-alives.
                        let decoded = tokio::task::spawn_blocking(move || protocol::decode_reply(&config, &bytes))
                            .await
                            .map_err(|e| Error::runtime(format!("a decoding task failed: {e}")))?;
                        match decoded.map_err(|e| violation(&p, e))? {
                            (_, Some(s)) => Ok(s),
                            (Reply::Failed(e), None) => Err(e.into_error(&p.name)),
                            (other, None) => unexpected(&p, other),
                        }
                    })
                    .await;
                    if let Some(r) = r {
                        let _ = reply.send(r);
                    }
                });
            }
        }
        Ok(())
    }
}

/// Send `command` in a task of its own and answer `reply` with the worker's reply read by `read`.
fn forward<R: Send + 'static>(
    p: Arc<ProxyArgs>,
    command: Command,
    reply: ractor::RpcReplyPort<Result<R>>,
    read: impl FnOnce(&ProxyArgs, Reply) -> Result<R> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Some(r) = while_wanted(&reply, rpc(&p, command)).await {
            let _ = reply.send(r.and_then(|r| read(&p, r)));
        }
    });
}

/// How often a call checks whether its caller still waits for the answer.
const CALLER_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// `work` to its end, or `None` as soon as the caller stops waiting for its answer (its reply
/// port closes: its deadline passed, or it was dropped). The call's stream then goes with the
/// future (quinn resets it) rather than staying open until the worker answers: a worker stuck on
/// a long command would otherwise collect abandoned streams up to the connection's limit, and
/// every later command to it would wait for a stream for ever.
async fn while_wanted<T, R>(reply: &ractor::RpcReplyPort<R>, work: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return Some(r),
            () = tokio::time::sleep(CALLER_CHECK) => {
                if reply.is_closed() {
                    return None;
                }
            }
        }
    }
}

async fn rpc(p: &ProxyArgs, command: Command) -> Result<Reply> {
    let bytes = call(&p.conn, &p.name, &command, None, protocol::CONTROL.header_bytes + 64).await?;
    let reply: Reply = protocol::decode(&bytes, "a worker's reply").map_err(|e| violation(p, e))?;
    match reply {
        Reply::Failed(e) => Err(e.into_error(&p.name)),
        other => Ok(other),
    }
}

fn done(p: &ProxyArgs, r: Reply) -> Result<()> {
    match r {
        Reply::Done => Ok(()),
        other => unexpected(p, other),
    }
}

fn unexpected<T>(p: &ProxyArgs, r: Reply) -> Result<T> {
    Err(violation(
        p,
        format!("answered with an unexpected reply: {}", reply_kind(&r)),
    ))
}

/// A worker that broke the protocol is evicted: its control connection is closed (so the
/// coordinator's membership sees it gone and the survivors go on without it), and the error names it.
fn violation(p: &ProxyArgs, detail: impl std::fmt::Display) -> Error {
    let detail = detail.to_string();
    let reason = format!("evicted: it sent a malformed reply ({detail})");
    p.conn.close(3u32.into(), &reason.as_bytes()[..reason.len().min(512)]);
    Error::protocol(p.name.clone(), detail)
}

fn reply_kind(r: &Reply) -> &'static str {
    match r {
        Reply::Done => "done",
        Reply::Outputs(_) => "outputs",
        Reply::Norms(_) => "norms",
        Reply::Snapshot(_) => "snapshot",
        Reply::Pieces(_) => "pieces",
        Reply::Traffic(_) => "traffic",
        Reply::Failed(_) => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call whose caller has stopped waiting ends (dropping its stream) instead of waiting for
    /// ever; one whose caller waits runs to its end.
    #[tokio::test]
    async fn a_call_nobody_waits_for_is_dropped() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let port = ractor::RpcReplyPort::from(tx);
        assert_eq!(while_wanted(&port, async { 7 }).await, Some(7));
        drop(rx);
        let never = std::future::pending::<u32>();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), while_wanted(&port, never)).await;
        assert_eq!(ended.expect("ended once the caller left"), None);
    }
}
