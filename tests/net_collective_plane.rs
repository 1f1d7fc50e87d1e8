//! The CPU stand-in of NCCL between processes (`net::collective::plane`): one rank's end over a
//! transport, each rank on its own thread with its own mailbox fed by a pump, as in a worker
//! process. The all-to-all-v round trip equals a direct exchange bitwise; each rule NCCL leaves
//! unchecked is an error naming the collective, the ranks and the counts on the rank that sees
//! it; a rank that skips a collective makes its peers miss their deadline naming it; aborts and a
//! closed mailbox fail pending and later calls at once; messages of an older generation never
//! reach a newer one. (The transport is the in-process one: the same packets as between
//! processes, without the sockets; `tests/elastic_processes.rs` runs it between processes.)

mod common;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use semoe::error::Error;
use semoe::net::collective::alltoallv::{direct_exchange, AllToAllV};
use semoe::net::collective::plane::{comm_digest, AbortNotice, Mailbox, PlaneCollective, PlaneMsg, PlaneOp};
use semoe::net::collective::{Collective, Group};
use semoe::net::local::network;
use semoe::net::{Packet, Payload, StepId, Transport};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WORLD: usize = 3;

/// One rank's transport and mailbox; the pump thread ends when the network is dropped.
struct Rank {
    transport: Arc<dyn Transport>,
    mailbox: Arc<Mailbox>,
}

/// `WORLD` ranks over in-process transports, each with a pump from its inbox to its mailbox. Abort
/// notices the pumps see are collected in the answer's second part.
fn ranks() -> (Vec<Rank>, Arc<Mutex<Vec<AbortNotice>>>) {
    let notices = Arc::new(Mutex::new(Vec::new()));
    let ranks = network(WORLD)
        .into_iter()
        .map(|(transport, mut inbox)| {
            let mailbox = Mailbox::new(WORLD);
            let (m, n) = (mailbox.clone(), notices.clone());
            std::thread::spawn(move || {
                while let Some(packet) = inbox.blocking_recv() {
                    if let Payload::Collective(msg) = packet.payload {
                        if let Some(notice) = m.deliver(packet.from, msg) {
                            n.lock().expect("notices").push(notice);
                        }
                    }
                }
            });
            Rank {
                transport: Arc::new(transport),
                mailbox,
            }
        })
        .collect();
    (ranks, notices)
}

/// The communicators of lane 0 of `generation`, one per rank, all with the same id.
fn communicators(ranks: &[Rank], generation: StepId, deadline: Duration) -> Vec<PlaneCollective> {
    with_ids(ranks, generation, deadline, &[[3u8; 128]; WORLD])
}

/// [`communicators`] with rank `i`'s id `ids[i]`.
fn with_ids(ranks: &[Rank], generation: StepId, deadline: Duration, ids: &[[u8; 128]]) -> Vec<PlaneCollective> {
    ranks
        .iter()
        .zip(ids)
        .map(|(r, id)| {
            PlaneCollective::new(r.transport.clone(), r.mailbox.clone(), 0, generation, id, 7, deadline)
                .expect("a communicator")
        })
        .collect()
}

/// Rank 0's communicator of lane 0 of `generation` over `mailbox` (id `[3; 128]`, as
/// [`communicators`]).
fn rank0(ranks: &[Rank], mailbox: Arc<Mailbox>, generation: StepId) -> PlaneCollective {
    PlaneCollective::new(
        ranks[0].transport.clone(),
        mailbox,
        0,
        generation,
        &[3; 128],
        7,
        Duration::from_secs(30),
    )
    .expect("a communicator")
}

fn message<T: std::fmt::Debug>(r: &Result<T, Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

const GEN: StepId = StepId { step: 5, attempt: 0 };

#[test]
fn many_rounds_of_random_sizes_equal_a_direct_exchange_bitwise() {
    let (ranks, notices) = ranks();
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    // About a quarter of the buffers empty, odd sizes included (bytes travel padded to floats).
    let plan: Vec<Vec<Vec<Vec<u8>>>> = (0..100)
        .map(|_| {
            (0..WORLD)
                .map(|_| {
                    (0..WORLD)
                        .map(|_| {
                            let len = if rng.random_bool(0.25) {
                                0
                            } else {
                                rng.random_range(1..=301)
                            };
                            (0..len).map(|_| rng.random()).collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let results = common::on_threads(communicators(&ranks, GEN, Duration::from_secs(10)), |c| {
        let (scheduler, me) = (AllToAllV::new(301), c.rank());
        plan.iter()
            .map(|round| scheduler.exchange(c, round[me].clone()))
            .collect::<Result<Vec<_>, _>>()
    });
    for (rank, got) in results.into_iter().enumerate() {
        let got = got.expect("every round succeeds");
        assert_eq!(got.len(), plan.len());
        for (n, round) in plan.iter().enumerate() {
            assert_eq!(got[n], direct_exchange(round, rank), "round {n}, rank {rank}");
        }
    }
    assert!(notices.lock().expect("notices").is_empty());
}

#[test]
fn ranks_issuing_collectives_in_another_order_are_an_error_naming_them() {
    let (ranks, _) = ranks();
    let start = Instant::now();
    let results = common::on_threads(communicators(&ranks, GEN, Duration::from_secs(30)), |c| {
        if c.rank() == 1 {
            c.group(Group::new()).map(|_| ())
        } else {
            c.all_to_all_counts(&[0, 0, 0]).map(|_| ())
        }
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a broken rule must not wait for the deadline"
    );
    for (rank, r) in results.iter().enumerate() {
        let msg = message(r);
        assert!(
            msg.contains("collective 0") && msg.contains(&format!("on rank {rank}")),
            "{msg}"
        );
        assert!(msg.contains("the ranks issued different collectives"), "{msg}");
    }
    assert!(message(&results[0]).contains("rank 1 issued a grouped send/recv, rank 0 an all-to-all of counts"));
    assert!(message(&results[1]).contains("rank 0 issued an all-to-all of counts, rank 1 a grouped send/recv"));
}

#[test]
fn sends_and_receives_that_do_not_match_are_errors_naming_the_counts() {
    let (ranks, _) = ranks();
    let results = common::on_threads(communicators(&ranks, GEN, Duration::from_secs(30)), |c| {
        let mut group = Group::new();
        match c.rank() {
            // Rank 0 sends 12 bytes to rank 2, which posts a receive of 10.
            0 => {
                group.send(2, vec![1; 12]);
            }
            // Rank 1 sends rank 2 bytes it posted no receive for... and expects 4 from rank 2,
            // which sends it nothing.
            1 => {
                group.send(0, vec![2; 3]).recv(2, 4);
            }
            _ => {
                group.recv(0, 10);
            }
        }
        c.group(group)
    });
    let msg = message(&results[2]);
    assert!(
        msg.contains("collective 0 (grouped send/recv) of epoch 7") && msg.contains("on rank 2"),
        "{msg}"
    );
    assert!(
        msg.contains("rank 0 sends 12 bytes to rank 2, which posted a receive of 10 bytes from rank 0"),
        "{msg}"
    );
    let msg = message(&results[0]);
    assert!(
        msg.contains("rank 1 sends 3 bytes to rank 0, which posted no receive from rank 1"),
        "{msg}"
    );
    let msg = message(&results[1]);
    assert!(
        msg.contains("rank 1 posted a receive of 4 bytes from rank 2, which sends it nothing"),
        "{msg}"
    );
}

#[test]
fn a_rank_that_skips_a_collective_makes_the_others_miss_their_deadline_naming_it() {
    let (ranks, _) = ranks();
    let deadline = Duration::from_millis(300);
    let start = Instant::now();
    let results = common::on_threads(communicators(&ranks, GEN, deadline), |c| {
        c.all_to_all_counts(&[1, 2, 3])?;
        if c.rank() == 2 {
            return Ok(Vec::new()); // rank 2 never issues collective 1
        }
        c.all_to_all_counts(&[0, 0, 0])
    });
    let elapsed = start.elapsed();
    assert!(elapsed >= deadline && elapsed < deadline * 5, "took {elapsed:?}");
    assert!(results[2].is_ok());
    for r in &results[..2] {
        match r {
            Err(e @ Error::Deadline { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("rank 2 did not answer collective 1 (all-to-all of counts) of epoch 7"),
                    "{msg}"
                );
                assert!(msg.contains("300 ms"), "{msg}");
            }
            other => panic!("expected a deadline naming rank 2, got {other:?}"),
        }
    }
}

/// Rank 0 aborted through its handle, rank 1's mailbox closed (its epoch ended), while both wait
/// for rank 2, which never comes.
#[test]
fn an_abort_or_a_closed_mailbox_fails_pending_and_later_calls_at_once() {
    let (ranks, _) = ranks();
    let start = Instant::now();
    let comms = communicators(&ranks, GEN, Duration::from_secs(30));
    let abort0 = comms[0].abort_handle();
    let mailbox1 = ranks[1].mailbox.clone();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .take(2)
            .map(|mut c| {
                s.spawn(move || {
                    let pending = c.group(Group::new());
                    let later = c.all_to_all_counts(&[0, 0, 0]);
                    (pending, later)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        abort0.abort("worker 0's gate failed");
        mailbox1.close("worker 2 left epoch 3: the connection ended");
        handles.into_iter().map(|h| h.join().expect("rank")).collect::<Vec<_>>()
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "must not wait for the deadline"
    );
    let (pending, later) = &results[0];
    let msg = message(pending);
    assert!(
        msg.contains("collective 0 (grouped send/recv) of epoch 7") && msg.contains("on rank 0"),
        "{msg}"
    );
    assert!(
        msg.contains("aborted (rank 0 aborted it: worker 0's gate failed)"),
        "{msg}"
    );
    assert!(message(later).contains("collective 1 (all-to-all of counts)"));
    let (pending, later) = &results[1];
    let msg = message(pending);
    assert!(
        msg.contains("aborted (worker 2 left epoch 3: the connection ended)"),
        "{msg}"
    );
    assert!(message(later).contains("worker 2 left epoch 3"));
}

#[test]
fn a_new_generation_never_sees_the_messages_of_an_older_one() {
    let (ranks, notices) = ranks();
    // Generation (5, 0): ranks 0 and 1 issue collective 0, rank 2 fails before it and aborts;
    // their messages are left unread in the mailboxes.
    let old = communicators(&ranks, GEN, Duration::from_millis(200));
    let results = common::on_threads(old, |c| {
        if c.rank() == 2 {
            return Ok(Vec::new());
        }
        c.all_to_all_counts(&[9, 9, 9])
    });
    for r in &results[..2] {
        let msg = match r {
            Err(e) => e.to_string(),
            Ok(v) => panic!("collective 0 without rank 2 returned {v:?}"),
        };
        assert!(msg.contains("rank 2") && msg.contains("collective 0"), "{msg}");
    }
    // A peer's abort notice is handed to the caller, not queued.
    ranks[2]
        .transport
        .send(Packet {
            from: 2,
            to: 0,
            id: 0,
            payload: Payload::Collective(PlaneMsg {
                lane: 0,
                generation: GEN,
                comm: 0,
                index: 0,
                op: PlaneOp::Abort {
                    step: GEN,
                    restartable: true,
                    reason: "worker 2 failed step 5".into(),
                },
            }),
        })
        .expect("send");
    // The replay's generation, (5, 1): the stale counts of (5, 0) are dropped, not read as its
    // collective 0.
    let replay = StepId { step: 5, attempt: 1 };
    let results = common::on_threads(communicators(&ranks, replay, Duration::from_secs(10)), |c| {
        let me = c.rank() as u64;
        c.all_to_all_counts(&[me, me + 10, me + 20])
    });
    for (rank, r) in results.into_iter().enumerate() {
        let got = r.expect("the new generation works");
        let want: Vec<u64> = (0..WORLD as u64).map(|j| j + 10 * rank as u64).collect();
        assert_eq!(got, want, "rank {rank}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while notices.lock().expect("notices").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let notices = notices.lock().expect("notices").clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(
        (notices[0].from, notices[0].step, notices[0].restartable),
        (2, GEN, true)
    );
}

#[test]
fn a_rank_given_another_communicator_id_is_refused_naming_it() {
    let (ranks, _) = ranks();
    let mut ids = [[3u8; 128]; WORLD];
    ids[1][100] = 4;
    let start = Instant::now();
    let results = common::on_threads(with_ids(&ranks, GEN, Duration::from_secs(30), &ids), |c| {
        c.all_to_all_counts(&[0, 0, 0])
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "must not wait for the deadline"
    );
    for (rank, r) in results.iter().enumerate() {
        let msg = message(r);
        assert!(msg.contains(&format!("on rank {rank}")), "{msg}");
        assert!(
            msg.contains("is in another communicator of this generation") && msg.contains("not given the same ids"),
            "{msg}"
        );
    }
    assert!(message(&results[0]).contains("rank 1 is in another communicator"));
    // Rank 1 names whichever of the others it heard from first.
    let msg = message(&results[1]);
    assert!(
        msg.contains("rank 0 is in another communicator") || msg.contains("rank 2 is in another communicator"),
        "{msg}"
    );
}

#[test]
fn a_communicator_refuses_a_mailbox_of_another_size() {
    let (ranks, _) = ranks();
    let err = PlaneCollective::new(
        ranks[0].transport.clone(),
        Mailbox::new(2),
        0,
        GEN,
        &[0; 128],
        0,
        Duration::from_secs(1),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("rank 0 among 3 with a mailbox for 2 ranks"), "{err}");
}

/// A message from rank 1 to rank 0 of lane 0 of `generation`.
fn msg(generation: StepId, comm: u64, op: PlaneOp) -> PlaneMsg {
    PlaneMsg {
        lane: 0,
        generation,
        comm,
        index: 0,
        op,
    }
}

#[test]
fn a_peer_that_floods_the_mailbox_fails_every_communicator_at_once() {
    use semoe::net::collective::plane::{PlaneData, MAX_QUEUED};
    let (ranks, _) = ranks();
    // Messages: MAX_QUEUED future generations' counts, then one more.
    let mailbox = ranks[0].mailbox.clone();
    for g in 0..=MAX_QUEUED as u64 {
        assert!(mailbox
            .deliver(1, msg(StepId::first(100 + g), 1, PlaneOp::Count(g)))
            .is_none());
    }
    let start = Instant::now();
    let mut comm = communicators(&ranks, GEN, Duration::from_secs(30)).remove(0);
    let err = comm.all_to_all_counts(&[0, 0, 0]).expect_err("closed");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(
        err.to_string()
            .contains(&format!("rank 1 sent more than {MAX_QUEUED} messages")),
        "{err}"
    );
    // Bytes too: a budget of 100 bytes per peer refuses a send of 101.
    let small = Mailbox::with_budget(WORLD, 100);
    small.deliver(1, msg(GEN, 1, PlaneOp::Group(Some(PlaneData::from_bytes(&[1; 60])))));
    small.deliver(2, msg(GEN, 1, PlaneOp::Group(Some(PlaneData::from_bytes(&[1; 60])))));
    small.deliver(1, msg(GEN, 1, PlaneOp::Group(Some(PlaneData::from_bytes(&[1; 41])))));
    let mut comm = rank0(&ranks, small, GEN);
    let err = comm.group(Group::new()).expect_err("closed");
    assert!(err.to_string().contains("rank 1 sent more than"), "{err}");
    assert!(err.to_string().contains("100 bytes"), "{err}");
}

#[test]
fn refused_messages_do_not_count_against_their_peer() {
    let (ranks, _) = ranks();
    let mailbox = ranks[0].mailbox.clone();
    // More generations than MAX_QUEUED, each with a message of another communicator from rank 1,
    // each refused by a collective of that generation.
    for g in 0..1100u64 {
        let generation = StepId::first(g);
        mailbox.deliver(1, msg(generation, 99, PlaneOp::Count(0)));
        mailbox.deliver(2, msg(generation, comm_digest(&[3; 128]), PlaneOp::Count(0)));
        let mut comm = rank0(&ranks, mailbox.clone(), generation);
        let err = comm.all_to_all_counts(&[0, 0, 0]).expect_err("another communicator");
        assert!(err.to_string().contains("rank 1 is in another communicator"), "{err}");
    }
    // The next generation's messages are still taken.
    let generation = StepId::first(2000);
    for peer in [1, 2] {
        mailbox.deliver(
            peer,
            msg(generation, comm_digest(&[3; 128]), PlaneOp::Count(peer as u64)),
        );
    }
    let mut comm = rank0(&ranks, mailbox, generation);
    assert_eq!(comm.all_to_all_counts(&[5, 0, 0]).expect("counts"), vec![5, 1, 2]);
}

#[test]
fn a_communicator_of_a_replaced_generation_fails_at_once() {
    let (ranks, _) = ranks();
    let mut old = communicators(&ranks, GEN, Duration::from_secs(30)).remove(0);
    let _new = communicators(&ranks, StepId { step: 5, attempt: 1 }, Duration::from_secs(30));
    let start = Instant::now();
    let err = old.all_to_all_counts(&[0, 0, 0]).expect_err("replaced");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(
        err.to_string()
            .contains("the generation of step 5 (attempt 2) replaced it"),
        "{err}"
    );
}
