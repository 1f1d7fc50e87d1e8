//! The NCCL-style collectives on the CPU stand-in, with 3 ranks (one thread each): the all-to-all-v
//! scheduler's round trip with uneven and empty buffers, each rule NCCL leaves unchecked detected
//! with an error naming the collective, the ranks and the counts (never a hang), aborts, many rounds
//! of random sizes, and the results bitwise equal to a direct exchange.

mod common;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use semoe::error::Error;
use semoe::net::collective::alltoallv::{direct_exchange, AllToAllV};
use semoe::net::collective::sim::SimCollective;
use semoe::net::collective::{Collective, Group};
use std::time::{Duration, Instant};

const WORLD: usize = 3;

/// Run `f` on every rank of a new 3-rank communicator, each on its own thread; answer in rank order.
fn on_ranks<T: Send>(deadline: Duration, f: impl Fn(&mut SimCollective) -> T + Sync) -> Vec<T> {
    common::on_threads(SimCollective::communicator(WORLD, 0, deadline).expect("3 ranks"), f)
}

/// `buffers[i][j]`: the bytes rank `i` sends rank `j`, sizes from `rng` (about a quarter empty).
fn random_buffers(rng: &mut ChaCha8Rng, max: usize) -> Vec<Vec<Vec<u8>>> {
    (0..WORLD)
        .map(|_| {
            (0..WORLD)
                .map(|_| {
                    let len = if rng.random_bool(0.25) {
                        0
                    } else {
                        rng.random_range(1..=max)
                    };
                    (0..len).map(|_| rng.random()).collect()
                })
                .collect()
        })
        .collect()
}

fn message(r: &Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn all_to_all_v_round_trip_with_uneven_and_empty_buffers() {
    // Rank i sends rank j (i * 10 + j) floats, none to itself from rank 1, none from 2 to 0.
    let sizes = [[3usize, 5, 0], [7, 0, 1], [0, 2, 9]];
    let sends = |rank: usize| -> Vec<Vec<f32>> {
        (0..WORLD)
            .map(|j| {
                (0..sizes[rank][j])
                    .map(|k| (rank * 100 + j * 10 + k) as f32 + 0.5)
                    .collect()
            })
            .collect()
    };
    let results = on_ranks(Duration::from_secs(5), |c| {
        let mine = sends(c.rank());
        AllToAllV::new(1 << 20).exchange_f32(c, mine)
    });
    assert_eq!(results.len(), WORLD);
    for (rank, got) in results.into_iter().enumerate() {
        let got = got.expect("the exchange succeeds");
        assert_eq!(got.len(), WORLD, "rank {rank}: one buffer from each rank");
        for (from, values) in got.iter().enumerate() {
            assert_eq!(values, &sends(from)[rank], "rank {rank} from rank {from}");
        }
    }
}

#[test]
fn many_rounds_of_random_sizes_equal_a_direct_exchange_bitwise() {
    let rounds = 200;
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let plan: Vec<Vec<Vec<Vec<u8>>>> = (0..rounds).map(|_| random_buffers(&mut rng, 300)).collect();
    let results = on_ranks(Duration::from_secs(10), |c| {
        let scheduler = AllToAllV::new(300);
        plan.iter()
            .map(|round| {
                let mine = round[c.rank()].clone();
                scheduler.exchange(c, mine)
            })
            .collect::<Result<Vec<_>, _>>()
    });
    for (rank, got) in results.into_iter().enumerate() {
        let got = got.expect("every round succeeds");
        for (n, round) in plan.iter().enumerate() {
            assert_eq!(got[n], direct_exchange(round, rank), "round {n}, rank {rank}");
        }
    }
}

#[test]
fn a_single_rank_exchanges_with_itself() {
    let mut comms = SimCollective::communicator(1, 4, Duration::from_secs(1)).expect("1 rank");
    let got = AllToAllV::new(64)
        .exchange(&mut comms[0], vec![vec![1, 2, 3]])
        .expect("a self-exchange");
    assert_eq!(got, vec![vec![1, 2, 3]]);
}

#[test]
fn ranks_issuing_collectives_in_another_order_are_an_error_naming_them() {
    let results = on_ranks(Duration::from_secs(5), |c| {
        if c.rank() == 1 {
            c.group(Group::new()).map(|_| ())
        } else {
            c.all_to_all_counts(&[0, 0, 0]).map(|_| ())
        }
    });
    for (rank, r) in results.iter().enumerate() {
        let msg = message(r);
        assert!(
            msg.contains("collective 0") && msg.contains(&format!("on rank {rank}")),
            "{msg}"
        );
        assert!(msg.contains("ranks 0, 2 issued an all-to-all of counts"), "{msg}");
        assert!(msg.contains("rank 1 a grouped send/recv"), "{msg}");
    }
}

#[test]
fn a_send_whose_size_differs_from_the_receive_is_an_error_naming_the_counts() {
    let results = on_ranks(Duration::from_secs(5), |c| {
        // Collective 0 agrees; in collective 1 rank 0 sends 12 bytes to rank 2, which expects 10.
        c.all_to_all_counts(&[1, 1, 1])?;
        let mut g = Group::new();
        match c.rank() {
            0 => g.send(2, vec![7; 12]),
            2 => g.recv(0, 10),
            _ => &mut g,
        };
        c.group(g)
    });
    for r in &results {
        let msg = message(r);
        assert!(msg.contains("collective 1 (grouped send/recv)"), "{msg}");
        assert!(
            msg.contains("rank 0 sends 12 bytes to rank 2, which posted a receive of 10 bytes from rank 0"),
            "{msg}"
        );
    }
    // A send nobody receives, and a receive nobody sends.
    let results = on_ranks(Duration::from_secs(5), |c| {
        let mut g = Group::new();
        if c.rank() == 1 {
            g.send(0, vec![1; 4]);
        }
        c.group(g)
    });
    assert!(message(&results[2]).contains("rank 1 sends 4 bytes to rank 0, which posted no receive from rank 1"));
    let results = on_ranks(Duration::from_secs(5), |c| {
        let mut g = Group::new();
        if c.rank() == 2 {
            g.recv(1, 8);
        }
        c.group(g)
    });
    assert!(message(&results[0]).contains("rank 2 posted a receive of 8 bytes from rank 1, which sends it nothing"));
}

#[test]
fn counts_of_the_wrong_length_and_malformed_groups_are_errors_that_fail_every_rank() {
    let results = on_ranks(Duration::from_secs(5), |c| {
        let counts: Vec<u64> = if c.rank() == 2 { vec![0, 0] } else { vec![0, 0, 0] };
        c.all_to_all_counts(&counts)
    });
    assert!(message(&results[2]).contains("2 counts posted for 3 ranks"));
    for r in &results[..2] {
        let msg = message(r);
        assert!(msg.contains("aborted") && msg.contains("2 counts posted"), "{msg}");
    }
    let results = on_ranks(Duration::from_secs(5), |c| {
        let mut g = Group::new();
        if c.rank() == 0 {
            g.send(3, vec![1]);
        }
        c.group(g)
    });
    assert!(message(&results[0]).contains("to rank 3, but the communicator has 3 ranks"));
    let results = on_ranks(Duration::from_secs(5), |c| {
        let mut g = Group::new();
        if c.rank() == 1 {
            g.recv(0, 1).recv(0, 1);
        }
        c.group(g)
    });
    assert!(message(&results[1]).contains("two receives from rank 0"));
    // Legs of no bytes are refused on every backend (NCCL would skip them; the stand-ins would
    // wait for the peer's side): the rank that posts one is told.
    let results = on_ranks(Duration::from_secs(5), |c| {
        let mut g = Group::new();
        match c.rank() {
            0 => g.send(1, Vec::new()),
            2 => g.recv(1, 0),
            _ => &mut g,
        };
        c.group(g)
    });
    assert!(
        message(&results[0]).contains("a send of no bytes to rank 1"),
        "{}",
        message(&results[0])
    );
    assert!(
        message(&results[2]).contains("a receive of no bytes from rank 1"),
        "{}",
        message(&results[2])
    );
}

#[test]
fn a_rank_that_skips_a_collective_makes_the_others_miss_their_deadline_naming_it() {
    let deadline = Duration::from_millis(300);
    let start = Instant::now();
    let results = on_ranks(deadline, |c| {
        c.all_to_all_counts(&[0, 0, 0])?;
        if c.rank() == 2 {
            return Ok(Vec::new()); // rank 2 never issues collective 1
        }
        c.all_to_all_counts(&[0, 0, 0])
    });
    let elapsed = start.elapsed();
    assert!(elapsed >= deadline && elapsed < deadline * 5, "took {elapsed:?}");
    assert!(results[2].is_ok());
    let timed_out: Vec<String> = results[..2]
        .iter()
        .filter_map(|r| match r {
            Err(e @ Error::Deadline { .. }) => Some(e.to_string()),
            _ => None,
        })
        .collect();
    // The first rank to reach the deadline reports it; the other fails at once on the abort, or
    // also reports the deadline.
    assert!(!timed_out.is_empty(), "{results:?}");
    for msg in &timed_out {
        assert!(
            msg.contains("rank 2 did not answer collective 1 (all-to-all of counts)"),
            "{msg}"
        );
        assert!(msg.contains("300 ms"), "{msg}");
    }
    for r in &results[..2] {
        let msg = message(r);
        assert!(msg.contains("collective 1") && msg.contains("rank 2"), "{msg}");
    }
}

#[test]
fn an_aborted_communicator_fails_pending_and_later_calls_at_once() {
    let deadline = Duration::from_secs(30);
    let start = Instant::now();
    let results = on_ranks(deadline, |c| {
        c.all_to_all_counts(&[0, 0, 0])?;
        if c.rank() == 2 {
            // Rank 2's worker is lost: the runtime aborts the communicator.
            std::thread::sleep(Duration::from_millis(50));
            c.abort_handle().abort("worker 2 was lost");
        }
        let pending = c.group(Group::new());
        let later = c.all_to_all_counts(&[0, 0, 0]);
        Ok::<_, Error>((pending, later))
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "an abort must not wait for the deadline"
    );
    for (rank, r) in results.into_iter().enumerate() {
        let (pending, later) = r.expect("collective 0 succeeds");
        let pending = message(&pending);
        assert!(
            pending.contains("collective 1 (grouped send/recv) of epoch 0"),
            "{pending}"
        );
        assert!(pending.contains(&format!("on rank {rank}")), "{pending}");
        assert!(
            pending.contains("aborted (rank 2 aborted it: worker 2 was lost)"),
            "{pending}"
        );
        assert!(message(&later).contains("collective 2 (all-to-all of counts)"));
    }
    // The next epoch builds a new communicator, here of the 2 survivors.
    let comms = SimCollective::communicator(2, 1, Duration::from_secs(5)).expect("2 ranks");
    let got: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let mine = vec![vec![c.rank() as u8]; 2];
                    AllToAllV::new(16).exchange(&mut c, mine)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for g in got {
        assert_eq!(g.expect("epoch 1 works"), vec![vec![0], vec![1]]);
    }
}

#[test]
fn the_scheduler_refuses_counts_that_do_not_match_or_exceed_the_limit() {
    // A count that does not match its payload: raised by rank 1 before anything is sent; the
    // others fail at once on its abort, not at their deadline.
    let start = Instant::now();
    let results = on_ranks(Duration::from_secs(30), |c| {
        let sends = vec![vec![1u8; 4], vec![2u8; 5], Vec::new()];
        let mut counts = vec![4u64, 5, 0];
        if c.rank() == 1 {
            counts[2] = 6;
        }
        AllToAllV::new(64).exchange_counted(c, &counts, sends)
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    let msg = message(&results[1]);
    assert!(
        msg.contains("the all-to-all-v of epoch 0 on rank 1")
            && msg.contains("rank 1's count for rank 2 is 6 bytes, but its payload has 0 bytes"),
        "{msg}"
    );
    for r in [&results[0], &results[2]] {
        assert!(message(r).contains("aborted"), "{}", message(r));
    }

    // Over the limit on the sender.
    let results = on_ranks(Duration::from_secs(30), |c| {
        let mut sends = vec![vec![0u8; 8]; WORLD];
        if c.rank() == 0 {
            sends[1] = vec![0u8; 100];
        }
        AllToAllV::new(64).exchange(c, sends)
    });
    assert!(message(&results[0]).contains("rank 0 would send 100 bytes to rank 1, above the limit of 64 bytes"));

    // Over the receiver's limit: rank 2 accepts at most 16 bytes from a peer.
    let results = on_ranks(Duration::from_secs(30), |c| {
        let limit = if c.rank() == 2 { 16 } else { 64 };
        let mut sends = vec![vec![0u8; 8]; WORLD];
        if c.rank() == 0 {
            sends[2] = vec![0u8; 40];
        }
        AllToAllV::new(limit).exchange(c, sends)
    });
    assert!(message(&results[2]).contains("rank 0 announced 40 bytes for rank 2, above the limit of 16 bytes"));
    assert!(message(&results[0]).contains("aborted"));
}

#[test]
fn the_nccl_communicator_without_cuda_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        // tests/net_nccl.rs runs the real one where a GPU is visible.
        eprintln!("skipping the CUDA-less NCCL check: this build has the cuda feature");
        return;
    }
    let err = semoe::net::collective::NcclCollective::new(0, 0, 1, 0, [0; 128], Duration::from_secs(1))
        .map(|_| ())
        .expect_err("no CUDA in this build")
        .to_string();
    assert!(
        err.contains("built without CUDA support") && err.contains("rank 0 of 1 on GPU 0"),
        "{err}"
    );
    assert!(semoe::net::collective::nccl_unique_id().is_err());
}

/// A rank's collectives as it issued them: `counts [..]` or `group sends [(peer, bytes)] recvs [..]`.
struct Recorder<'a> {
    inner: &'a mut SimCollective,
    log: Vec<String>,
}

impl Collective for Recorder<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }
    fn deadline(&self) -> Duration {
        self.inner.deadline()
    }
    fn all_to_all_counts(&mut self, counts: &[u64]) -> semoe::error::Result<Vec<u64>> {
        self.log.push(format!("counts {counts:?}"));
        self.inner.all_to_all_counts(counts)
    }
    fn group(&mut self, group: Group) -> semoe::error::Result<Vec<(usize, Vec<u8>)>> {
        let sends: Vec<(usize, usize)> = group.sends().iter().map(|(p, d)| (*p, d.len())).collect();
        self.log
            .push(format!("group sends {sends:?} recvs {:?}", group.recvs()));
        self.inner.group(group)
    }
    fn abort_handle(&self) -> semoe::net::collective::AbortHandle {
        self.inner.abort_handle()
    }
}

#[test]
fn the_scheduler_issues_the_same_collectives_in_a_fixed_order() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let plan: Vec<Vec<Vec<Vec<u8>>>> = (0..20).map(|_| random_buffers(&mut rng, 64)).collect();
    let run = || {
        on_ranks(Duration::from_secs(10), |c| {
            let mut rec = Recorder {
                inner: c,
                log: Vec::new(),
            };
            for round in &plan {
                let mine = round[rec.rank()].clone();
                AllToAllV::new(64).exchange(&mut rec, mine).expect("round");
            }
            rec.log
        })
    };
    let first = run();
    assert_eq!(first, run(), "the same buffers give the same collectives");
    for (rank, log) in first.iter().enumerate() {
        // One all-to-all of counts, then one group, per exchange.
        assert_eq!(log.len(), 2 * plan.len());
        for (n, round) in plan.iter().enumerate() {
            let counts: Vec<u64> = round[rank].iter().map(|b| b.len() as u64).collect();
            assert_eq!(log[2 * n], format!("counts {counts:?}"));
            // Sends, then receives, each in rank order, none for an empty buffer.
            let sends: Vec<(usize, usize)> = (0..WORLD)
                .filter(|j| !round[rank][*j].is_empty())
                .map(|j| (j, round[rank][j].len()))
                .collect();
            let recvs: Vec<(usize, usize)> = (0..WORLD)
                .filter(|i| !round[*i][rank].is_empty())
                .map(|i| (i, round[i][rank].len()))
                .collect();
            assert_eq!(log[2 * n + 1], format!("group sends {sends:?} recvs {recvs:?}"));
        }
    }
}
