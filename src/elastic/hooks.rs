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

/// A hook variable that is set but does not parse: an error naming it and the form it takes (a
/// test whose hook silently did nothing would pass without testing anything, or time out).
fn malformed(var: &str, spec: &str, form: &str) -> crate::Error {
    crate::Error::config(format!("{var}={spec:?}: expected {form}"))
}

/// The value of hook variable `var` (`None`: unset; an error when it is not Unicode).
fn hook_value(var: &str) -> crate::Result<Option<String>> {
    match std::env::var(var) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(malformed(var, &v.to_string_lossy(), "Unicode text")),
    }
}

/// The step N of a hook variable `var` set to `member=M,step=N`, when M is `member` (`None`: the
/// variable is unset or names another member; an error when it does not parse).
fn step_for_member(var: &str, member: u64) -> crate::Result<Option<u64>> {
    let Some(spec) = hook_value(var)? else { return Ok(None) };
    let (m, step) = member_and_step(&spec).ok_or_else(|| malformed(var, &spec, "member=M,step=N"))?;
    Ok((m == member).then_some(step))
}

/// `member=M,step=N` as `(M, N)` (`None`: anything else).
fn member_and_step(spec: &str) -> Option<(u64, u64)> {
    let (mut m, mut step) = (None, None);
    for part in spec.split(',') {
        match part.split_once('=')? {
            ("member", v) => m = Some(v.parse::<u64>().ok()?),
            ("step", v) => step = Some(v.parse::<u64>().ok()?),
            _ => return None,
        }
    }
    Some((m?, step?))
}

/// A parsed [`CORRUPT`].
#[derive(Clone, Copy, Debug)]
pub struct Corrupt {
    step: u64,
    done: bool,
}

impl Corrupt {
    /// The hook for `member`, if [`CORRUPT`] names it.
    pub fn for_member(member: u64) -> crate::Result<Option<Corrupt>> {
        Ok(step_for_member(CORRUPT, member)?.map(|step| Corrupt { step, done: false }))
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
    pub fn for_member(member: u64) -> crate::Result<Option<CutLink>> {
        Ok(step_for_member(CUT_LINK, member)?.map(|step| CutLink { step, done: false }))
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
    /// The hook for `member`, if [`PAUSE`] names it (an error when any of its points does not
    /// parse).
    pub fn for_member(member: u64) -> crate::Result<Option<Pause>> {
        let Some(specs) = hook_value(PAUSE)? else {
            return Ok(None);
        };
        let points = specs.split(';').map(Pause::parse).collect::<crate::Result<Vec<_>>>()?;
        Ok(points
            .into_iter()
            .find(|pause| pause.member.is_none_or(|m| m == member)))
    }

    /// One point of [`PAUSE`]: `member`, `step`, `phase` and `file` are required.
    fn parse(spec: &str) -> crate::Result<Pause> {
        let bad = || {
            malformed(
                PAUSE,
                spec,
                "member=M|any,step=N,phase=forward|backward|commit,file=F[,action=hang|kill|stop][,epoch=E]",
            )
        };
        let (mut member, mut step, mut phase, mut file) = (None, None, None, None);
        let (mut action, mut epoch) = (Action::Hang, None);
        for part in spec.split(',') {
            match part.split_once('=').ok_or_else(bad)? {
                ("member", "any") => member = Some(None),
                ("member", v) => member = Some(Some(v.parse().map_err(|_| bad())?)),
                ("action", "hang") => action = Action::Hang,
                ("action", "kill") => action = Action::Kill,
                ("action", "stop") => action = Action::Stop,
                ("step", v) => step = Some(v.parse().map_err(|_| bad())?),
                ("phase", "forward") => phase = Some(Phase::Forward),
                ("phase", "backward") => phase = Some(Phase::Backward),
                ("phase", "commit") => phase = Some(Phase::Commit),
                ("file", v) if !v.is_empty() => file = Some(PathBuf::from(v)),
                ("epoch", v) => epoch = Some(v.parse().map_err(|_| bad())?),
                _ => return Err(bad()),
            }
        }
        Ok(Pause {
            member: member.ok_or_else(bad)?,
            step: step.ok_or_else(bad)?,
            phase: phase.ok_or_else(bad)?,
            file: file.ok_or_else(bad)?,
            action,
            epoch,
            done: Arc::new(AtomicBool::new(false)),
        })
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

/// The parsed [`MEMBERS_AT`]: `(step, members)` (empty when unset; an error when it does not
/// parse).
pub fn members_at() -> crate::Result<Vec<(u64, usize)>> {
    let Some(spec) = hook_value(MEMBERS_AT)? else {
        return Ok(Vec::new());
    };
    steps_and_members(&spec).ok_or_else(|| malformed(MEMBERS_AT, &spec, "STEP:MEMBERS[,STEP:MEMBERS...]"))
}

/// `N:M,...` as `[(N, M), ...]` (`None`: anything else).
fn steps_and_members(spec: &str) -> Option<Vec<(u64, usize)>> {
    spec.split(',')
        .map(|p| {
            let (s, m) = p.split_once(':')?;
            Some((s.trim().parse().ok()?, m.trim().parse().ok()?))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every hook refuses what it cannot read (it used to skip it, so that a test's hook did
    /// nothing: the test timed out, or passed without testing anything).
    #[test]
    fn hooks_parse_their_forms_and_nothing_else() {
        assert_eq!(member_and_step("member=2,step=7"), Some((2, 7)));
        for bad in [
            "member=2",
            "step=7",
            "member=2,step=x",
            "member=2;step=7",
            "member=2,step=7,at=1",
            "",
        ] {
            assert_eq!(member_and_step(bad), None, "{bad:?}");
        }
        assert_eq!(steps_and_members("5:3, 12:2"), Some(vec![(5, 3), (12, 2)]));
        for bad in ["5", "5:3,", "5:x", "5-3"] {
            assert_eq!(steps_and_members(bad), None, "{bad:?}");
        }
        let pause = Pause::parse("member=any,step=3,phase=commit,file=/tmp/f,action=stop,epoch=2").expect("parses");
        assert_eq!(
            (pause.member, pause.step, pause.phase, pause.action, pause.epoch),
            (None, 3, Phase::Commit, Action::Stop, Some(2))
        );
        for bad in [
            "member=1,step=3,phase=fwd,file=/tmp/f",
            "member=1,step=3,phase=forward",
            "member=1,phase=forward,file=/tmp/f",
            "step=3,phase=forward,file=/tmp/f",
            "member=1,step=3,phase=forward,file=",
            "member=1,step=3,phase=forward,file=/tmp/f,action=sleep",
            "member=1,step=3,phase=forward,file=/tmp/f,when=now",
        ] {
            let err = Pause::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(PAUSE) && err.contains("expected member="), "{bad}: {err}");
        }
    }
}
