//! The CPU stand-in of an NCCL communicator: in-process, one thread per rank, and strict where NCCL
//! is not. NCCL trusts its callers: ranks that issue collectives in different orders, or a send
//! whose size differs from the matching receive, hang or corrupt memory on a GPU. Here every
//! collective is matched across all ranks before any byte moves, and a broken rule is an error
//! naming the collective's index, the ranks and the counts, returned to every rank; a rank that
//! never issues a collective makes the others miss their deadline (an error naming it), never hang.
//! Either failure aborts the communicator, as the runtime will abort an NCCL one, so every later
//! call fails at once.
//!
//! This is what the scheduling logic ([`super::alltoallv`]) is tested on in CI, with 3 ranks.

use super::{AbortHandle, Collective, CollectiveId, Group, Op, Rank};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What one rank posted for one collective.
enum Post {
    Counts(Vec<u64>),
    Group(Group),
}

impl Post {
    fn op(&self) -> Op {
        match self {
            Post::Counts(_) => Op::Counts,
            Post::Group(_) => Op::Group,
        }
    }
}

/// What one rank gets back.
enum Outcome {
    Counts(Vec<u64>),
    Group(Vec<(Rank, Vec<u8>)>),
}

/// One collective, as the ranks reach it.
struct Slot {
    posts: Vec<Option<Post>>,
    /// Set once every rank posted: each rank's outcome, or the broken rule.
    outcome: Option<std::result::Result<Vec<Option<Outcome>>, String>>,
    /// Ranks that took their outcome (the slot is dropped when all did).
    taken: usize,
}

struct State {
    slots: BTreeMap<u64, Slot>,
    /// Why the communicator was aborted, once it was.
    aborted: Option<String>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn abort(&self, reason: String) {
        let mut state = self.lock();
        if state.aborted.is_none() {
            state.aborted = Some(reason);
        }
        drop(state);
        self.changed.notify_all();
    }
}

/// One rank of an in-process communicator that enforces NCCL's rules. Build all ranks of an epoch
/// with [`SimCollective::communicator`] and move each to its own thread.
pub struct SimCollective {
    rank: Rank,
    epoch: u64,
    deadline: Duration,
    next: u64,
    shared: Arc<Shared>,
}

impl SimCollective {
    /// The `world` ranks of a new communicator of membership epoch `epoch`, each collective with
    /// `deadline`.
    pub fn communicator(world: usize, epoch: u64, deadline: Duration) -> Result<Vec<SimCollective>> {
        if world == 0 {
            return Err(Error::config("a communicator needs at least one rank"));
        }
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: BTreeMap::new(),
                aborted: None,
            }),
            changed: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| SimCollective {
                rank,
                epoch,
                deadline,
                next: 0,
                shared: shared.clone(),
            })
            .collect())
    }

    fn run(&mut self, post: Post) -> Result<Outcome> {
        let id = CollectiveId {
            epoch: self.epoch,
            index: self.next,
            op: post.op(),
        };
        self.next += 1;
        let rank = self.rank;
        let world = self.shared.world;
        let fail = |detail: String| Error::collective(id.to_string(), rank, detail);
        let aborted = |reason: &str| fail(format!("the communicator was aborted ({reason})"));

        if let Post::Group(group) = &post {
            if let Err(e) = group.validate(id, rank, world) {
                // This rank cannot take part: the others would wait for it until their deadline.
                self.shared.abort(format!("rank {rank} posted an invalid group: {e}"));
                return Err(e);
            }
        }
        if let Post::Counts(counts) = &post {
            if counts.len() != world {
                let detail = format!("{} counts posted for {world} ranks", counts.len());
                self.shared.abort(format!("rank {rank}'s {id}: {detail}"));
                return Err(fail(detail));
            }
        }

        let mut state = self.shared.lock();
        if let Some(reason) = &state.aborted {
            return Err(aborted(reason));
        }
        let slot = state.slots.entry(id.index).or_insert_with(|| Slot {
            posts: (0..world).map(|_| None).collect(),
            outcome: None,
            taken: 0,
        });
        slot.posts[rank] = Some(post);
        if slot.posts.iter().all(Option::is_some) {
            let outcome = resolve(world, &mut slot.posts);
            if let Err(detail) = &outcome {
                let reason = format!("collective {} broke the rules: {detail}", id.index);
                state.aborted.get_or_insert(reason);
            }
            if let Some(slot) = state.slots.get_mut(&id.index) {
                slot.outcome = Some(outcome);
            }
            self.shared.changed.notify_all();
        }

        let until = Instant::now() + self.deadline;
        loop {
            let st = &mut *state;
            let Some(slot) = st.slots.get_mut(&id.index) else {
                return Err(fail("the collective's record vanished (a bug in the stand-in)".into()));
            };
            if let Some(outcome) = slot.outcome.as_mut() {
                let mine = match outcome {
                    Ok(outcomes) => outcomes[rank].take(),
                    Err(detail) => return Err(fail(detail.clone())),
                };
                slot.taken += 1;
                if slot.taken == world {
                    st.slots.remove(&id.index);
                }
                return mine.ok_or_else(|| fail("the outcome was taken twice (a bug in the stand-in)".into()));
            }
            if let Some(reason) = &st.aborted {
                return Err(aborted(reason));
            }
            let now = Instant::now();
            if now >= until {
                let missing: Vec<Rank> = (0..world).filter(|r| slot.posts[*r].is_none()).collect();
                let ranks = list(&missing);
                drop(state);
                self.shared.abort(format!(
                    "rank {rank}'s {id} missed its deadline: {ranks} did not issue it"
                ));
                return Err(Error::Deadline {
                    peer: ranks,
                    what: format!("{id} (rank {rank} waited for it)"),
                    deadline_ms: self.deadline.as_millis() as u64,
                });
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// `ranks 0, 2`, `rank 1`.
pub(super) fn list(ranks: &[Rank]) -> String {
    match ranks {
        [one] => format!("rank {one}"),
        _ => {
            let names: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
            format!("ranks {}", names.join(", "))
        }
    }
}

/// Match one collective across all ranks: every rank issued the same kind, and every send meets a
/// receive of the same size (and the other way round). The error names the ranks and the counts.
fn resolve(world: usize, posts: &mut [Option<Post>]) -> std::result::Result<Vec<Option<Outcome>>, String> {
    let ops: Vec<Option<Op>> = posts.iter().map(|p| p.as_ref().map(Post::op)).collect();
    let first = ops[0];
    if ops.iter().any(|op| *op != first) {
        let by_op = |op: Op| -> Vec<Rank> { (0..world).filter(|r| ops[*r] == Some(op)).collect() };
        return Err(format!(
            "the ranks issued different collectives: {} issued an {}, {} a {} (every rank must issue the same collectives in the same order)",
            list(&by_op(Op::Counts)),
            Op::Counts,
            list(&by_op(Op::Group)),
            Op::Group
        ));
    }
    match first {
        Some(Op::Counts) => {
            let counts: Vec<&Vec<u64>> = posts
                .iter()
                .filter_map(|p| match p {
                    Some(Post::Counts(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if counts.len() != world {
                return Err("a rank's counts are missing".into());
            }
            Ok((0..world)
                .map(|r| Some(Outcome::Counts((0..world).map(|j| counts[j][r]).collect())))
                .collect())
        }
        Some(Op::Group) => {
            // recv_of[j][i]: what rank j posted to receive from rank i.
            let mut recv_of: Vec<Vec<Option<usize>>> = vec![vec![None; world]; world];
            let mut sends: Vec<Vec<Option<Vec<u8>>>> = vec![vec![None; world]; world];
            let mut order: Vec<Vec<Rank>> = vec![Vec::new(); world];
            for (j, post) in posts.iter_mut().enumerate() {
                let Some(Post::Group(group)) = post.take() else {
                    return Err(format!("rank {j}'s group is missing"));
                };
                let (group_sends, group_recvs) = group.into_parts();
                for (peer, data) in group_sends {
                    sends[j][peer] = Some(data);
                }
                for (peer, bytes) in group_recvs {
                    recv_of[j][peer] = Some(bytes);
                    order[j].push(peer);
                }
            }
            for i in 0..world {
                for j in 0..world {
                    match (&sends[i][j], recv_of[j][i]) {
                        (Some(data), Some(bytes)) if data.len() != bytes => {
                            return Err(format!(
                                "rank {i} sends {} bytes to rank {j}, which posted a receive of {bytes} bytes from rank {i}",
                                data.len()
                            ))
                        }
                        (Some(data), None) => {
                            return Err(format!(
                                "rank {i} sends {} bytes to rank {j}, which posted no receive from rank {i}",
                                data.len()
                            ))
                        }
                        (None, Some(bytes)) => {
                            return Err(format!(
                                "rank {j} posted a receive of {bytes} bytes from rank {i}, which sends it nothing"
                            ))
                        }
                        _ => {}
                    }
                }
            }
            Ok((0..world)
                .map(|j| {
                    let received = order[j]
                        .iter()
                        .map(|&i| (i, sends[i][j].take().unwrap_or_default()))
                        .collect();
                    Some(Outcome::Group(received))
                })
                .collect())
        }
        None => Err("no rank posted anything".into()),
    }
}

impl Collective for SimCollective {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn deadline(&self) -> Duration {
        self.deadline
    }

    fn all_to_all_counts(&mut self, counts: &[u64]) -> Result<Vec<u64>> {
        match self.run(Post::Counts(counts.to_vec()))? {
            Outcome::Counts(counts) => Ok(counts),
            Outcome::Group(_) => Err(Error::runtime("the stand-in answered counts with a group")),
        }
    }

    fn group(&mut self, group: Group) -> Result<Vec<(Rank, Vec<u8>)>> {
        match self.run(Post::Group(group))? {
            Outcome::Group(received) => Ok(received),
            Outcome::Counts(_) => Err(Error::runtime("the stand-in answered a group with counts")),
        }
    }

    fn abort_handle(&self) -> AbortHandle {
        let shared = self.shared.clone();
        AbortHandle::new(
            self.rank,
            Arc::new(move |rank, reason| shared.abort(format!("rank {rank} aborted it: {reason}"))),
        )
    }
}
