//! Test hooks: environment variables that the fault tests set so that a worker stops at an exact
//! point of an exact step, or the coordinator waits for a membership at an exact step, instead of
//! relying on sleeps. Never set them in a real run.

use crate::net::{Packet, Payload};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `member=M,step=N,phase=P,file=F[,action=A]`: worker process M stops at phase P of step N
/// (`forward`: when the first expert forward packet of the step arrives; `backward`: the first
/// expert backward packet; `commit`: when the commit command arrives, after it prepared), writing
/// its process id to file F first. `member=any`: whichever member this process becomes (the chaos
/// runs give the variable to one process only). The action: `hang` (the default: that thread
/// sleeps until the process is killed), `kill` (the process SIGKILLs itself: a crash at an exact
/// point) or `stop` (it SIGSTOPs itself, a straggler: whoever reads F sends the SIGCONT). A kill or
/// a stop acts once, the first time the point is reached (a replayed step does not act again).
/// `epoch=E` restricts the point to epoch E (a step replayed after a loss runs in a later epoch:
/// `epoch=2` stops a worker inside the first recovery's replay). Several points, one per member,
/// are separated by `;` (a member takes the first that names it).
pub const PAUSE: &str = "SEMOE_TEST_PAUSE";

/// `N:M,...`: before step N the coordinator waits (up to a minute) until exactly M workers are
/// members and not leaving; while the hook has steps left, joins and leaves take effect only at
/// those steps (losses at once), so that a join or a leave lands exactly at step N.
pub const MEMBERS_AT: &str = "SEMOE_TEST_MEMBERS_AT";

/// `member=M,step=N`: worker process M sends half of its first expert forward packet of step N
/// (a malformed frame from an authenticated peer: the receiver evicts it).
pub const CORRUPT: &str = "SEMOE_TEST_CORRUPT";

/// The step N of a hook variable `var` set to `member=M,step=N`, when M is `member` (`None`: the
/// variable is unset, malformed, or names another member).
fn step_for_member(var: &str, member: u64) -> Option<u64> {
    let spec = std::env::var(var).ok()?;
    let (mut m, mut step) = (None, None);
    for part in spec.split(',') {
        match part.split_once('=')? {
            ("member", v) => m = v.parse::<u64>().ok(),
            ("step", v) => step = v.parse::<u64>().ok(),
            _ => return None,
        }
    }
    (m? == member).then_some(step?)
}

/// A parsed [`CORRUPT`].
#[derive(Clone, Copy, Debug)]
pub struct Corrupt {
    step: u64,
    done: bool,
}

impl Corrupt {
    /// The hook for `member`, if [`CORRUPT`] names it.
    pub fn for_member(member: u64) -> Option<Corrupt> {
        let step = step_for_member(CORRUPT, member)?;
        Some(Corrupt { step, done: false })
    }

    /// Cut `bytes` (the encoding of `packet`) in half if this is the hook's packet.
    pub fn apply(&mut self, packet: &Packet, bytes: &mut Vec<u8>) {
        if let Payload::ExpertForward { step, .. } = &packet.payload {
            if step.step == self.step && !self.done {
                self.done = true;
                bytes.truncate(bytes.len() / 2);
                crate::say!("semoe worker: {CORRUPT}: sent half a packet at step {}", self.step);
            }
        }
    }
}

/// `member=M,step=N`: worker process M cuts its data-plane link to the peer of its first expert
/// forward packet of step N, as a network failure between two workers would (both still reach the
/// coordinator): both ends report the link lost, and the run goes on in a new epoch.
pub const CUT_LINK: &str = "SEMOE_TEST_CUT_LINK";

/// A parsed [`CUT_LINK`].
#[derive(Clone, Copy, Debug)]
pub struct CutLink {
    step: u64,
    done: bool,
}

impl CutLink {
    /// The hook for `member`, if [`CUT_LINK`] names it.
    pub fn for_member(member: u64) -> Option<CutLink> {
        let step = step_for_member(CUT_LINK, member)?;
        Some(CutLink { step, done: false })
    }

    /// The peer whose link to cut, once: when `packet` is the hook's.
    pub fn fires(&mut self, packet: &Packet) -> Option<crate::net::WorkerId> {
        if let Payload::ExpertForward { step, .. } = &packet.payload {
            if step.step == self.step && !self.done {
                self.done = true;
                crate::say!(
                    "semoe worker: {CUT_LINK}: cutting the link to worker {} at step {}",
                    packet.to,
                    self.step
                );
                return Some(packet.to);
            }
        }
        None
    }
}

/// Where a paused worker stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// An expert forward packet of the step arrived.
    Forward,
    /// An expert backward packet of the step arrived.
    Backward,
    /// The commit of the step arrived.
    Commit,
}

/// What a [`Pause`] does at its point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The thread sleeps until the process is killed.
    Hang,
    /// The process SIGKILLs itself.
    Kill,
    /// The process SIGSTOPs itself (someone else continues it).
    Stop,
}

/// A parsed [`PAUSE`].
#[derive(Clone, Debug)]
pub struct Pause {
    /// `None`: any member.
    member: Option<u64>,
    step: u64,
    phase: Phase,
    file: PathBuf,
    action: Action,
    /// `Some(E)`: only in epoch E.
    epoch: Option<u64>,
    /// Set when it acted (shared by the clones in the codec and the command handler).
    done: Arc<AtomicBool>,
}

impl Pause {
    /// The hook for `member`, if [`PAUSE`] names it.
    pub fn for_member(member: u64) -> Option<Pause> {
        let specs = std::env::var(PAUSE).ok()?;
        specs
            .split(';')
            .filter_map(Pause::parse)
            .find(|pause| pause.member.is_none_or(|m| m == member))
    }

    /// One point of [`PAUSE`] (`None`: malformed).
    fn parse(spec: &str) -> Option<Pause> {
        let mut pause = Pause {
            member: Some(u64::MAX),
            step: u64::MAX,
            phase: Phase::Forward,
            file: PathBuf::new(),
            action: Action::Hang,
            epoch: None,
            done: Arc::new(AtomicBool::new(false)),
        };
        for part in spec.split(',') {
            let (key, value) = part.split_once('=')?;
            match key {
                "member" if value == "any" => pause.member = None,
                "member" => pause.member = Some(value.parse().ok()?),
                "action" => {
                    pause.action = match value {
                        "hang" => Action::Hang,
                        "kill" => Action::Kill,
                        "stop" => Action::Stop,
                        _ => return None,
                    }
                }
                "step" => pause.step = value.parse().ok()?,
                "phase" => {
                    pause.phase = match value {
                        "forward" => Phase::Forward,
                        "backward" => Phase::Backward,
                        "commit" => Phase::Commit,
                        _ => return None,
                    }
                }
                "file" => pause.file = PathBuf::from(value),
                "epoch" => pause.epoch = Some(value.parse().ok()?),
                _ => return None,
            }
        }
        Some(pause)
    }

    /// Stop here (for ever) if `packet`, arriving in `epoch`, is the hook's point.
    pub fn at_packet(&self, packet: &Packet, epoch: u64) {
        let (phase, step) = match &packet.payload {
            Payload::ExpertForward { step, .. } => (Phase::Forward, step.step),
            Payload::ExpertBackward { step, .. } => (Phase::Backward, step.step),
            _ => return,
        };
        if phase == self.phase && step == self.step && self.in_epoch(epoch) {
            self.stop_here();
        }
    }

    /// Stop here (for ever) if a commit of `step` in `epoch` is the hook's point.
    pub fn at_commit(&self, step: u64, epoch: u64) {
        if self.phase == Phase::Commit && step == self.step && self.in_epoch(epoch) {
            self.stop_here();
        }
    }

    fn in_epoch(&self, epoch: u64) -> bool {
        self.epoch.is_none_or(|e| e == epoch)
    }

    fn stop_here(&self) {
        // A kill or a stop acts once; a hang stops every thread that reaches the point, as before.
        if self.action != Action::Hang && self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = std::fs::write(&self.file, std::process::id().to_string());
        let signal = match self.action {
            Action::Hang => None,
            Action::Kill => Some(libc::SIGKILL),
            Action::Stop => Some(libc::SIGSTOP),
        };
        crate::say!(
            "semoe worker: paused by {PAUSE} at {:?} of step {} ({:?})",
            self.phase,
            self.step,
            self.action
        );
        match signal {
            // SAFETY: kill(2) on this very process.
            Some(signal) => unsafe {
                libc::kill(std::process::id() as i32, signal);
            },
            None => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        }
    }
}

/// The parsed [`MEMBERS_AT`]: `(step, members)`.
pub fn members_at() -> Vec<(u64, usize)> {
    std::env::var(MEMBERS_AT)
        .ok()
        .map(|spec| {
            spec.split(',')
                .filter_map(|p| {
                    let (s, m) = p.split_once(':')?;
                    Some((s.trim().parse().ok()?, m.trim().parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `step=N,block=B,expert=E[,moment=forward|backward][,kind=error|panic]`: the Expert actor of
/// expert E of MoE block B fails once at step N (its handler returns an error, or panics), in
/// whichever worker process hosts it: a failed actor inside a worker process, which costs a replay
/// of the step within the epoch (every process of a run inherits the variable; only the host's
/// plan fires).
pub const EXPERT_FAULT: &str = "SEMOE_TEST_EXPERT_FAULT";

/// The fault plan of [`EXPERT_FAULT`] for this process (empty when it is not set; an error naming
/// the variable when it does not parse).
pub fn expert_fault() -> crate::Result<crate::chaos::FaultPlan> {
    use crate::chaos::{Fault, FaultKind, FaultPlan, Moment, Target};
    let plan = FaultPlan::none();
    let Ok(spec) = std::env::var(EXPERT_FAULT) else {
        return Ok(plan);
    };
    let bad = || {
        crate::Error::config(format!(
            "{EXPERT_FAULT}={spec:?}: expected step=N,block=B,expert=E[,moment=forward|backward][,kind=error|panic]"
        ))
    };
    let (mut step, mut block, mut expert) = (None, None, None);
    let (mut moment, mut kind) = (Moment::Any, FaultKind::Error);
    for part in spec.split(',') {
        match part.split_once('=').ok_or_else(bad)? {
            ("step", v) => step = Some(v.parse::<u64>().map_err(|_| bad())?),
            ("block", v) => block = Some(v.parse::<usize>().map_err(|_| bad())?),
            ("expert", v) => expert = Some(v.parse::<usize>().map_err(|_| bad())?),
            ("moment", "forward") => moment = Moment::Forward,
            ("moment", "backward") => moment = Moment::Backward,
            ("kind", "error") => kind = FaultKind::Error,
            ("kind", "panic") => kind = FaultKind::Panic,
            _ => return Err(bad()),
        }
    }
    plan.push(Fault {
        target: Target::Expert {
            block: block.ok_or_else(bad)?,
            expert: expert.ok_or_else(bad)?,
        },
        step: step.ok_or_else(bad)?,
        moment,
        kind,
        times: 1,
    });
    plan.observe(|firing| {
        crate::say!(
            "semoe worker: {EXPERT_FAULT}: the expert's fault fired at step {} ({:?})",
            firing.step,
            firing.moment
        )
    });
    Ok(plan)
}
