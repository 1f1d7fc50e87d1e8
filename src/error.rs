//! The one error type of semoe: every fallible operation returns [`Result`], and every error names
//! what was wrong (the option, the tensor, the file) so that a user can act on it.

use std::path::PathBuf;

/// Everything that can go wrong in semoe.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or inconsistent with another one.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A tensor or buffer does not have the shape an operation needs.
    #[error("shape mismatch in {context}: {detail}")]
    Shape {
        /// The operation or tensor concerned.
        context: String,
        /// What was expected and what was found.
        detail: String,
    },

    /// A computation produced (or was given) NaN or infinity where a finite number is needed.
    #[error("{context} computed a non-finite {detail} (check the input for NaN or infinity)")]
    NonFinite {
        /// The operation concerned (for example `the MoE gate`).
        context: String,
        /// The first non-finite value (for example `gate logit of token 3`).
        detail: String,
    },

    /// Reading or writing a file failed.
    #[error("{context} ({path}): {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A data file or message could not be parsed.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was being parsed.
        what: String,
        /// Why it failed.
        detail: String,
    },

    /// A compute backend is unavailable or failed (for example CUDA on a machine without a GPU).
    #[error("backend {backend}: {detail}")]
    Backend {
        /// The backend concerned (`cpu`, `cuda`).
        backend: &'static str,
        /// What went wrong.
        detail: String,
    },

    /// A checkpoint is incomplete, corrupt or does not hold what the caller asked for.
    #[error("checkpoint {path}: {detail}")]
    Checkpoint {
        /// The checkpoint directory or the file in it concerned.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// An actor of the runtime failed (returned an error or panicked). Its supervisor restarts it
    /// and the coordinator replays the step.
    #[error("actor {actor} failed: {detail}")]
    ActorFailed {
        /// Which actor (for example `expert 1.3 on worker 0`).
        actor: String,
        /// The error or panic message.
        detail: String,
    },

    /// A peer did not answer within its deadline (the runtime never waits without one).
    #[error("{peer} did not answer {what} within {deadline_ms} ms")]
    Deadline {
        /// Who did not answer (for example `worker 1`).
        peer: String,
        /// The request (for example `the layer-0 expert forward of step 3`).
        what: String,
        /// The deadline.
        deadline_ms: u64,
    },

    /// Training diverged: the loss or the gradients stopped being finite numbers.
    #[error(
        "training diverged at step {step}: {what} (learning rate {lr:.3e}); lower optimizer.lr (--lr), \
         raise the warmup or lower optimizer.clip, and start a new run (a resume keeps the recorded optimizer \
         settings and would take the same steps again)"
    )]
    Diverged {
        /// The step whose loss or gradient norm was not finite (1-based).
        step: u64,
        /// What was not finite (for example `the gradient norm is NaN`).
        what: String,
        /// The learning rate of that step.
        lr: f64,
    },

    /// A peer broke the wire protocol (a malformed or oversized frame, a stale epoch, a shape that
    /// does not fit the model). The peer is evicted; this is never repaired by a replay.
    #[error("{peer} broke the protocol and is evicted: {detail}")]
    Protocol {
        /// Who sent it (for example `worker 2 (127.0.0.1:40001)`).
        peer: String,
        /// What was wrong with it.
        detail: String,
    },

    /// A collective of a communicator (the fused all-to-all's counts or grouped send/receive) failed:
    /// the ranks broke the communicator's rules (another order, counts that do not match), or the
    /// communicator was aborted. The communicator is unusable afterwards; the next membership epoch
    /// builds a new one.
    #[error("{collective} on rank {rank}: {detail}")]
    Collective {
        /// Which collective (for example `collective 3 (grouped send/recv) of epoch 0`).
        collective: String,
        /// The rank that reports it.
        rank: usize,
        /// What went wrong, naming the ranks and counts concerned.
        detail: String,
    },

    /// Every worker process of a run left or was lost, and none joined within
    /// `train.join_wait_s`. The coordinator kept the state of `step` (the committed one when the
    /// workers left, the last in-memory copy when they were lost); the trainer checkpoints it and
    /// stops, to be resumed once workers can join.
    #[error("every worker left or was lost, and none joined within {waited_s:.0} s (the coordinator holds the state of step {step})")]
    NoWorkers {
        /// The step of the state the coordinator kept.
        step: u64,
        /// How long it waited for a worker, in seconds.
        waited_s: f64,
    },

    /// The runtime cannot go on: a worker was lost, or the runtime has shut down.
    #[error("runtime: {0}")]
    Runtime(String),
}

/// The result type of semoe.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A configuration error.
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    /// A shape error for `context`.
    pub fn shape(context: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Shape {
            context: context.into(),
            detail: detail.into(),
        }
    }

    /// An I/O error while doing `context` on `path`.
    pub fn io(context: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            path: path.into(),
            source,
        }
    }

    /// A parse error for `what`.
    pub fn parse(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Parse {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// A runtime error.
    pub fn runtime(msg: impl Into<String>) -> Self {
        Error::Runtime(msg.into())
    }

    /// Whether the error is an actor failure that a restart and a replay of the step repair.
    pub fn is_restartable(&self) -> bool {
        matches!(self, Error::ActorFailed { .. })
    }

    /// The worker that did not answer, when this is a [`Error::Deadline`] naming one
    /// (`worker N`, as exchanges and the coordinator name workers).
    pub fn silent_worker(&self) -> Option<usize> {
        match self {
            Error::Deadline { peer, .. } => peer.strip_prefix("worker ")?.parse().ok(),
            _ => None,
        }
    }

    /// A protocol violation by `peer`.
    pub fn protocol(peer: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Protocol {
            peer: peer.into(),
            detail: detail.into(),
        }
    }

    /// A collective error reported by `rank` about `collective`.
    pub fn collective(collective: impl Into<String>, rank: usize, detail: impl Into<String>) -> Self {
        Error::Collective {
            collective: collective.into(),
            rank,
            detail: detail.into(),
        }
    }

    /// A checkpoint error about `path` (the checkpoint directory or a file in it).
    pub fn checkpoint(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            detail: detail.into(),
        }
    }
}
