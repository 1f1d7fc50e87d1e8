//! Training over worker processes, as a user runs it: `semoe train --processes N` or `--listen`
//! with `semoe worker --ticket` processes, on 127.0.0.1 with ports the OS chooses. The parameters
//! and AdamW moments after the run are bitwise those of the plain loop (`--workers 0`) through
//! every placement, worker count, crash (SIGKILL at an exact phase of a step), join, leave and
//! stopped worker; joins that cannot give the same bits are refused, naming why. Every process a
//! test starts runs in its own process group, killed and reaped when the test ends, also on
//! failure.

mod common;

use common::procs::{assert_same_state, membership, reference, state_files, train_args, Proc};
use common::TempDir;
use semoe::net::quic::JoinTicket;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn worker_processes_train_bitwise_like_the_plain_loop() {
    let dir = TempDir::new("elastic-counts");
    let want = reference(dir.path(), 20, &[]);
    // (processes, placement, sharded dense, QUIC between the processes instead of Unix sockets)
    let cases = [
        (1, "round-robin", false, false),
        (2, "round-robin", false, false),
        (3, "round-robin", false, false),
        (4, "round-robin", false, false),
        (2, "blocked", false, false),
        (3, "blocked", false, false),
        (3, "round-robin", true, false),
        (3, "round-robin", false, true),
    ];
    for (n, placement, shard, quic) in cases {
        let run = format!(
            "p{n}-{placement}{}{}",
            if shard { "-sharded" } else { "" },
            if quic { "-quic" } else { "" }
        );
        let n_s = n.to_string();
        let mut args = train_args(&run, "20", &["--processes", &n_s, "--placement", placement]);
        if shard {
            args.push("--shard-dense");
        }
        if quic {
            args.push("--quic-only");
        }
        let mut p = Proc::spawn(dir.path(), &run, &args, &[]);
        assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.log());
        let log = p.log();
        assert!(log.contains(&format!("epoch 1: {n} workers at step 0")), "{log}");
        // Every worker says how it reaches its peers: all over one path.
        let peers = n - 1;
        let paths = if quic {
            format!("epoch 1: 0 peer(s) over same-host sockets, {peers} over QUIC")
        } else {
            format!("epoch 1: {peers} peer(s) over same-host sockets, 0 over QUIC")
        };
        if n > 1 {
            assert_eq!(log.matches(&paths).count(), n, "{run}: {paths:?} in\n{log}");
        }
        assert_eq!(membership(&log), (0, 0, 0), "{log}");
        // Workers dismissed at the end leave their epoch in order: no peer reports a loss.
        assert!(!log.contains("lost its link"), "{run}: {log}");
        assert_same_state(&want, &state_files(&dir.path().join(&run), 20), &run);
        // The coordinator alone writes the run directory: no file of a worker in it.
        let files: Vec<String> = std::fs::read_dir(dir.path().join(&run))
            .expect("run dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        let mut files = files;
        files.sort();
        let want = [
            ".lock",
            "checkpoints",
            "config.toml",
            "experts.svg",
            "join.ticket",
            "loss.svg",
            "metrics.jsonl",
            "report.md",
            "throughput.svg",
        ];
        assert_eq!(
            files, want,
            "{run}: the run directory holds the coordinator's files alone"
        );
    }
}

#[test]
fn worker_processes_exchange_expert_rows_over_the_stand_in_collectives_bitwise() {
    let dir = TempDir::new("elastic-collectives");
    let want = reference(dir.path(), 20, &[]);
    // (processes, placement, extra arguments)
    let cases: [(usize, &str, &[&str]); 4] = [
        (1, "round-robin", &[]),
        (2, "round-robin", &[]),
        (3, "blocked", &["--shard-dense"]),
        (3, "round-robin", &["--quic-only"]),
    ];
    for (n, placement, extra) in cases {
        let run = format!("sim-p{n}-{placement}{}", extra.join(""));
        let n_s = n.to_string();
        let mut args = train_args(
            &run,
            "20",
            &["--processes", &n_s, "--placement", placement, "--exchange", "sim"],
        );
        args.extend_from_slice(extra);
        let mut p = Proc::spawn(dir.path(), &run, &args, &[]);
        assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.log());
        let log = p.log();
        assert!(log.contains(&format!("epoch 1: {n} workers at step 0")), "{log}");
        // Every worker process exchanges over its own communicators: SMALL's 4 groups give each
        // worker at most 4 lanes, and every worker has the same number.
        let lanes = match n {
            1 => 4,
            2 => 2,
            _ => 2,
        };
        let line = format!(
            "epoch 1: expert rows over collectives (the CPU stand-in of NCCL over the data plane), {lanes} lane(s)"
        );
        assert_eq!(log.matches(&line).count(), n, "{run}: {line:?} in\n{log}");
        assert_eq!(membership(&log), (0, 0, 0), "{log}");
        assert_same_state(&want, &state_files(&dir.path().join(&run), 20), &run);
    }
}

/// An Expert actor failing inside a worker process costs a replay of its step within the epoch
/// (no member is lost), over the transport and over the stand-in collectives: there the replay
/// builds new communicators on every worker, from the ids the coordinator sends with the replay's
/// step (without them the workers could not build them, and the run would stop).
#[test]
fn an_actor_failure_in_a_worker_process_costs_a_replay_within_the_epoch() {
    let dir = TempDir::new("elastic-actor-fault");
    let want = reference(dir.path(), 20, &[]);
    for (exchange, kind) in [("transport", "error"), ("sim", "error"), ("sim", "panic")] {
        let run = format!("fault-{exchange}-{kind}");
        let args = train_args(&run, "20", &["--processes", "3", "--exchange", exchange]);
        let fault = format!("step=7,block=1,expert=4,kind={kind}");
        let mut p = Proc::spawn(dir.path(), &run, &args, &[("SEMOE_TEST_EXPERT_FAULT", fault)]);
        assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.log());
        let log = p.log();
        assert_eq!(
            log.matches("SEMOE_TEST_EXPERT_FAULT: the expert's fault fired at step 7")
                .count(),
            1,
            "{run}: {log}"
        );
        assert_eq!(membership(&log), (0, 0, 0), "{run}: {log}");
        assert!(log.contains("epoch 1, 3 workers at the end"), "{run}: {log}");
        assert_same_state(&want, &state_files(&dir.path().join(&run), 20), &run);
    }
}

/// One worker process over NCCL on GPU 0: the coordinator makes the NCCL ids and the worker builds
/// its single-rank communicators from them; the bits are the plain loop's. Without the `cuda`
/// feature, a GPU or libnccl, the run stops at once with a clear error, and the test says so.
#[test]
fn a_worker_process_over_nccl_gives_the_plain_loops_bits() {
    let dir = TempDir::new("elastic-nccl");
    let args = train_args("nccl", "20", &["--processes", "1", "--exchange", "nccl"]);
    let started = Instant::now();
    let mut p = Proc::spawn(dir.path(), "nccl", &args, &[]);
    let status = p.wait(Duration::from_secs(120));
    let log = p.log();
    if !status.success() {
        // Skipped only where NCCL cannot run: no NCCL (refused before the workers start), or no
        // GPU visible (the worker's communicator names its GPU). Any other failure fails.
        let no_nccl =
            log.contains("train.exchange = \"nccl\" with worker processes") && log.to_lowercase().contains("nccl");
        let no_gpu = semoe::kernels::cuda::CudaDevice::count() == 0 && log.contains("GPU");
        assert!(no_nccl || no_gpu, "the run over NCCL failed where NCCL can run:\n{log}");
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
        eprintln!("skipped: no NCCL here ({})", log.lines().last().unwrap_or_default());
        return;
    }
    let want = reference(dir.path(), 20, &[]);
    assert_same_state(&want, &state_files(&dir.path().join("nccl"), 20), "1 process over NCCL");
}

#[test]
fn worker_processes_beyond_the_groups_host_experts() {
    let dir = TempDir::new("elastic-beyond");
    // SMALL's 4 groups become 2.
    let two_groups = |mut args: Vec<&'static str>| {
        let at = args.iter().position(|a| *a == "--groups").expect("SMALL sets --groups");
        args[at + 1] = "2";
        args
    };
    let reference_args = two_groups(train_args("reference", "20", &["--workers", "0"]));
    let mut r = Proc::spawn(dir.path(), "reference", &reference_args, &[]);
    assert!(r.wait(Duration::from_secs(60)).success(), "{}", r.log());
    let want = state_files(&dir.path().join("reference"), 20);
    let args = two_groups(train_args("p3-g2", "20", &["--processes", "3"]));
    let mut p = Proc::spawn(dir.path(), "p3-g2", &args, &[]);
    assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.log());
    let log = p.log();
    assert!(log.contains("epoch 1: 3 workers at step 0"), "{log}");
    assert_same_state(
        &want,
        &state_files(&dir.path().join("p3-g2"), 20),
        "3 processes, 2 groups",
    );
}

/// Ctrl-C at a terminal reaches the whole foreground process group: the coordinator and every
/// worker process it started. The workers ask to leave; the coordinator still reads their state,
/// writes its checkpoint and stops (it used to form an epoch for the leavers, wait for workers
/// that never came, and end without a checkpoint).
#[test]
fn a_terminals_ctrl_c_to_every_process_stops_the_run_with_a_checkpoint() {
    let dir = TempDir::new("elastic-ctrl-c");
    let run = "ctrl-c";
    // Steps of about 100 ms (SMALL's take a few): the workers' leave notices reach the coordinator
    // before the step in progress ends, as they do with the main job's model.
    let args = [
        "train",
        "--run-dir",
        run,
        "--steps",
        "1000000",
        "--d-model",
        "128",
        "--layers",
        "2",
        "--heads",
        "2",
        "--d-ff",
        "256",
        "--block-size",
        "64",
        "--batch",
        "32",
        "--groups",
        "4",
        "--threads",
        "1",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
        "--sample-tokens",
        "0",
        "--processes",
        "2",
    ];
    let mut p = Proc::spawn(dir.path(), run, &args, &[]);
    p.wait_for("step     1/", Duration::from_secs(60));
    // SAFETY: kill(2) on the process group this test created for the coordinator (pgid = its pid),
    // which holds the workers it started.
    assert_eq!(unsafe { libc::kill(-p.pid(), libc::SIGINT) }, 0);
    let status = p.wait(Duration::from_secs(60));
    let log = p.log();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("stopped by Ctrl-C (SIGINT) after step"), "{log}");
    // --checkpoint-every 0: the one checkpoint is the stop's.
    let ckpt = semoe::storage::checkpoint::latest(&dir.path().join(run))
        .expect("list the checkpoints")
        .expect("a checkpoint written at the stop");
    assert!(
        ckpt.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("step-")),
        "{ckpt:?}"
    );
}

#[test]
fn a_worker_killed_mid_step_costs_a_replay_not_the_run() {
    let dir = TempDir::new("elastic-kill");
    let want = reference(dir.path(), 20, &[]);
    // Over the transport, and over the stand-in collectives (the survivors then wait in a
    // collective for the killed worker: the next epoch's setup closes their communicators, as
    // does the loss when seen first, not the collective's deadline, 5 x train.deadline_s).
    let cases = [
        ("transport", "forward"),
        ("transport", "backward"),
        ("transport", "commit"),
        ("sim", "forward"),
        ("sim", "backward"),
    ];
    for (exchange, phase) in cases {
        let run = format!("kill-{exchange}-{phase}");
        let marker = dir.path().join(format!("{exchange}-{phase}.paused"));
        let pause = format!("member=2,step=7,phase={phase},file={}", marker.display());
        let args = train_args(
            &run,
            "20",
            &["--processes", "3", "--snapshot-every", "5", "--exchange", exchange],
        );
        let mut p = Proc::spawn(dir.path(), &run, &args, &[("SEMOE_TEST_PAUSE", pause)]);
        p.wait_for("paused by SEMOE_TEST_PAUSE", Duration::from_secs(30));
        let pid: i32 = std::fs::read_to_string(&marker)
            .expect("the paused worker wrote its pid")
            .trim()
            .parse()
            .expect("a pid");
        // SAFETY: kill(2) on a worker process that this test's coordinator started (its group).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let killed = Instant::now();
        p.wait_for("epoch 2: 2 workers at step 7", Duration::from_secs(10));
        let recovered = killed.elapsed();
        assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.log());
        let log = p.log();
        // The coordinator started the worker, so it sees the process end at once (elsewhere QUIC's
        // idle timeout, 1.5 s, detects it); the new epoch forms in milliseconds after that.
        assert!(
            recovered < Duration::from_secs(3),
            "{phase}: the survivors took {recovered:?} to form the next epoch"
        );
        assert_eq!(membership(&log), (0, 0, 1), "{phase}: {log}");
        assert!(
            log.contains("2 steps replayed"),
            "{phase}: copy at step 5, lost at 7: {log}"
        );
        assert_same_state(&want, &state_files(&dir.path().join(&run), 20), &run);
        // The lost epoch's traffic is kept as far as the survivors can tell it: what they sent
        // the killed member (it was dropped with the epoch when nobody had asked for it before).
        let log_text = std::fs::read_to_string(dir.path().join(&run).join("metrics.jsonl")).expect("metrics log");
        let traffic = traffic_record(&log_text);
        assert!(
            traffic.entries.iter().any(|e| e.to == 2 && e.from != 2 && e.bytes > 0),
            "{phase}: nothing sent to the killed member 2 was counted: {:?}",
            traffic.entries
        );
        // And what it sent itself, as far as it told before it was killed: its figures are asked
        // with each in-memory copy (the one of step 5 here).
        assert!(
            traffic.entries.iter().any(|e| e.from == 2 && e.bytes > 0),
            "{phase}: nothing the killed member 2 sent was counted: {:?}",
            traffic.entries
        );
        eprintln!("{exchange}, {phase}: kill -> next epoch in {recovered:?}");
    }
}

/// The one traffic record of a run's metrics log.
fn traffic_record(log_text: &str) -> semoe::train::log::TrafficRecord {
    let mut traffic: Vec<semoe::train::log::TrafficRecord> = log_text
        .lines()
        .filter(|l| l.contains("\"kind\":\"traffic\""))
        .map(|l| serde_json::from_str(l).expect("a traffic record"))
        .collect();
    assert_eq!(traffic.len(), 1, "one traffic record: {log_text}");
    traffic.remove(0)
}

/// The steps replayed after a lost worker are recorded once in the coordinator's metrics (each
/// epoch builds a runtime of its own; they share the mark of the last step reported): a worker
/// killed at step 7 with the last copy at step 5 costs 2 replayed steps, and at the hold before
/// step 15 the endpoint counts 15 steps, no more, and the tokens of 15.
#[test]
fn steps_replayed_after_a_lost_worker_are_recorded_once_in_the_metrics() {
    let dir = TempDir::new("elastic-kill-metrics");
    let marker = dir.path().join("killed");
    let args = train_args(
        "run",
        "20",
        &[
            "--processes",
            "3",
            "--snapshot-every",
            "5",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let env = [
        (
            "SEMOE_TEST_PAUSE",
            format!("member=2,step=7,phase=forward,file={},action=kill", marker.display()),
        ),
        // Held before step 15 for 3 members, of which 2 are left: the endpoint is scraped there
        // (the process is killed with its group when the test ends).
        ("SEMOE_TEST_MEMBERS_AT", "15:3".to_string()),
    ];
    let mut p = Proc::spawn(dir.path(), "run", &args, &env);
    p.wait_for("holding before step 15", Duration::from_secs(60));
    let log = p.log();
    assert!(marker.exists(), "the hook killed member 2: {log}");
    assert!(log.contains("epoch 2: 2 workers at step 7"), "{log}");
    let body = scrape(&printed_metrics_addr(&log, "metrics: http://"));
    let value = |name: &str| value_of(&body, name).unwrap_or_else(|| panic!("no {name}: {body}"));
    assert_eq!(
        value("semoe_replayed_steps_total"),
        2.0,
        "copy at step 5, lost at 7: {body}"
    );
    assert_eq!(value("semoe_committed_step"), 15.0, "{body}");
    // The per-worker counters are the worker processes' to serve: none on the coordinator, where
    // they would read 0 while the workers move data.
    for per_worker in [
        "semoe_alltoall_bytes_total{",
        "semoe_restarts_total{",
        "semoe_tier_served_total{",
    ] {
        assert!(!body.contains(per_worker), "{per_worker} on the coordinator: {body}");
    }
    assert_eq!(value("semoe_step_seconds_count"), 15.0, "each step timed once: {body}");
    // The recovery is timed to the new epoch ready with steps 6 and 7 replayed: as long as the
    // epoch's line says (printed to 10 ms), not only the state's move.
    let line = log
        .lines()
        .find(|l| l.contains("epoch 2: 2 workers at step 7"))
        .unwrap_or_else(|| panic!("{log}"));
    let printed: f64 = line
        .split("; ")
        .find_map(|part| part.strip_suffix(" s")?.parse().ok())
        .unwrap_or_else(|| panic!("no seconds in {line:?}"));
    assert_eq!(value("semoe_recovery_seconds_count"), 1.0, "{body}");
    let recorded = value("semoe_recovery_seconds_sum");
    assert!(
        recorded >= printed - 0.006 && recorded <= printed + 0.5,
        "recovery {recorded} s recorded, {printed} s printed: {line}"
    );
    let summed = |name: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // 8 sequences of 16 bytes, 2 experts a token, 2 MoE blocks (`SMALL`), 15 steps.
    let assignments = summed("semoe_expert_tokens_total") + summed("semoe_expert_dropped_total");
    assert_eq!(assignments, (15 * 8 * 16 * 2 * 2) as f64, "{body}");
}

/// A second worker lost while the survivors replay the steps since the last copy: the epoch
/// that replay ran in is given up and the next one, of the one worker left, replays from the same
/// copy; the run ends with the plain loop's bits, each loss counted once and the recovery timed
/// once, from the first loss.
#[test]
fn a_worker_lost_inside_a_recovery_replay_costs_another_epoch_not_the_run() {
    let dir = TempDir::new("elastic-kill-in-replay");
    let want = reference(dir.path(), 20, &[]);
    let first = dir.path().join("first.killed");
    let second = dir.path().join("second.killed");
    // Member 2 dies at step 7 (epoch 1); epoch 2 replays steps 5 and 6 from the copy of step 5,
    // and member 1 dies at step 6 of that replay (its step 6 of epoch 1 is left alone).
    let pause = format!(
        "member=2,step=7,phase=forward,action=kill,file={};member=1,step=6,phase=forward,action=kill,epoch=2,file={}",
        first.display(),
        second.display()
    );
    let args = train_args("run", "20", &["--processes", "3", "--snapshot-every", "5"]);
    let mut p = Proc::spawn(dir.path(), "run", &args, &[("SEMOE_TEST_PAUSE", pause)]);
    assert!(p.wait(Duration::from_secs(90)).success(), "{}", p.log());
    let log = p.log();
    assert!(first.exists() && second.exists(), "both hooks fired: {log}");
    // Epoch 2 never finished its replay (the line comes once the replay is done).
    assert!(!log.contains("semoe: epoch 2: "), "{log}");
    assert!(
        log.contains("epoch 3: 1 workers at step 7 (a worker was lost during the replay;"),
        "{log}"
    );
    assert_eq!(membership(&log), (0, 0, 2), "{log}");
    // Step 5 replayed in epoch 2, then steps 5 and 6 in epoch 3.
    assert!(log.contains("; 3 steps replayed;"), "{log}");
    assert_same_state(&want, &state_files(&dir.path().join("run"), 20), "lost inside a replay");
}

#[test]
fn a_worker_that_sends_malformed_data_is_evicted() {
    let dir = TempDir::new("elastic-malformed");
    let want = reference(dir.path(), 20, &[]);
    let args = train_args("run", "20", &["--processes", "3", "--snapshot-every", "5"]);
    let corrupt = ("SEMOE_TEST_CORRUPT", "member=2,step=7".to_string());
    let mut p = Proc::spawn(dir.path(), "run", &args, &[corrupt]);
    assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.log());
    let log = p.log();
    assert!(log.contains("sent half a packet at step 7"), "the hook fired: {log}");
    assert!(
        log.contains("evicted: member") && log.contains("sent malformed data"),
        "the eviction names the sender and why: {log}"
    );
    assert!(log.contains("epoch 2: 2 workers at step 7"), "{log}");
    assert_eq!(membership(&log), (0, 0, 1), "{log}");
    assert_same_state(&want, &state_files(&dir.path().join("run"), 20), "after an eviction");
}

/// Two members lose the link between them while both still reach the coordinator (a network
/// failure between two hosts): the step in flight is taken again in a new epoch of the same
/// members, which connects them anew. No member is lost, and the bits are the plain loop's.
#[test]
fn a_lost_link_between_two_members_costs_a_new_epoch_not_the_run() {
    let dir = TempDir::new("elastic-cut-link");
    let want = reference(dir.path(), 20, &[]);
    let args = train_args("run", "20", &["--processes", "3"]);
    let cut = ("SEMOE_TEST_CUT_LINK", "member=2,step=7".to_string());
    let mut p = Proc::spawn(dir.path(), "run", &args, &[cut]);
    assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.log());
    let log = p.log();
    assert_eq!(
        log.matches("SEMOE_TEST_CUT_LINK: cutting the link to worker").count(),
        1,
        "the hook fired once: {log}"
    );
    assert!(log.contains("lost its link to worker"), "{log}");
    assert!(log.contains("a link was lost"), "the new epoch says why: {log}");
    assert!(log.contains("epoch 2: 3 workers at step 7"), "{log}");
    assert_eq!(membership(&log), (0, 0, 0), "{log}");
    assert_same_state(&want, &state_files(&dir.path().join("run"), 20), "after a lost link");
}

/// A coordinator listening on 127.0.0.1 (port from the OS) for `min_workers` workers, with the
/// test hook `SEMOE_TEST_MEMBERS_AT` when `members_at` is not empty; and the path of its ticket.
fn listening_coordinator(dir: &Path, min_workers: &str, members_at: &str) -> (Proc, String) {
    listening_coordinator_with(dir, min_workers, members_at, &[])
}

/// [`listening_coordinator`] with more `semoe train` arguments.
fn listening_coordinator_with(dir: &Path, min_workers: &str, members_at: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = train_args("run", "20", &["--listen", "127.0.0.1:0", "--min-workers", min_workers]);
    args.extend_from_slice(extra);
    let env: Vec<(&str, String)> = if members_at.is_empty() {
        Vec::new()
    } else {
        vec![("SEMOE_TEST_MEMBERS_AT", members_at.to_string())]
    };
    let mut coord = Proc::spawn(dir, "coordinator", &args, &env);
    coord.wait_for("workers join with", Duration::from_secs(30));
    (coord, dir.join("run/join.ticket").to_string_lossy().into_owned())
}

/// `GET /metrics` from `addr`, answered within 10 s: the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().expect("a metrics address");
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

/// The address a process printed as `{prefix}ADDR/metrics`.
fn printed_metrics_addr(log: &str, prefix: &str) -> String {
    log.split(prefix)
        .nth(1)
        .and_then(|rest| rest.split("/metrics").next())
        .expect("the printed address")
        .to_string()
}

/// The value of the series `line_start` (a name with its labels) in a scrape.
fn value_of(body: &str, line_start: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(line_start) && l[line_start.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_worker_serves_its_traffic_per_peer_as_metrics() {
    let dir = TempDir::new("elastic-worker-metrics");
    let args = train_args(
        "run",
        "400",
        &[
            "--listen",
            "127.0.0.1:0",
            "--min-workers",
            "2",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let mut coord = Proc::spawn(dir.path(), "coordinator", &args, &[]);
    coord.wait_for("workers join with", Duration::from_secs(30));
    // The coordinator's endpoint serves from before the workers join, at the port it was given.
    let coord_addr = printed_metrics_addr(&coord.log(), "metrics: http://");
    assert!(!coord_addr.ends_with(":0"), "the chosen port is printed: {coord_addr}");
    let before = scrape(&coord_addr);
    assert_eq!(
        value_of(&before, "semoe_membership_changes_total{kind=\"crash\"}"),
        Some(0.0),
        "{before}"
    );
    let ticket = dir.path().join("run/join.ticket").to_string_lossy().into_owned();
    let mut watched = Proc::spawn(
        dir.path(),
        "watched",
        &[
            "worker",
            "--ticket",
            &ticket,
            "--threads",
            "1",
            "--metrics-addr",
            "127.0.0.1:0",
            // Not used: the run exchanges over the transport, which the worker says.
            "--gpu",
            "1",
        ],
        &[],
    );
    let other = worker(dir.path(), "other", &ticket);
    watched.wait_for("metrics on http://", Duration::from_secs(30));
    watched.wait_for(
        "notice: --gpu 1 is not used: this run exchanges expert rows over transport",
        Duration::from_secs(30),
    );
    let addr = printed_metrics_addr(&watched.log(), "metrics on http://");
    coord.wait_for("epoch 1: 2 workers", Duration::from_secs(30));
    // What the coordinator recorded while its runtime started (the joins, the first epoch).
    let body = scrape(&coord_addr);
    assert_eq!(value_of(&body, "semoe_membership_epoch"), Some(1.0), "{body}");
    assert_eq!(value_of(&body, "semoe_members"), Some(2.0), "{body}");
    assert_eq!(
        value_of(&body, "semoe_membership_changes_total{kind=\"join\"}"),
        Some(2.0),
        "{body}"
    );
    // Both workers run groups and host experts, so each sends the other expert rows every step.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sent = loop {
        let body = scrape(&addr);
        let sent: Vec<f64> = body
            .lines()
            .filter(|l| l.starts_with("semoe_alltoall_bytes_total{") && l.contains("kind=\"dispatch\""))
            .filter(|l| !l.contains("from=\"0\",to=\"0\"") && !l.contains("from=\"1\",to=\"1\""))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
            .collect();
        if sent.iter().any(|&b| b > 0.0) {
            assert!(body.contains("semoe_membership_epoch 1"), "{body}");
            break sent;
        }
        assert!(
            Instant::now() < deadline,
            "no dispatch bytes to a peer within 30 s:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!sent.is_empty());
    assert!(coord.wait(Duration::from_secs(120)).success(), "{}", coord.log());
    assert!(!other.log().contains("--gpu"), "{}", other.log());
}

/// A worker process joining with `ticket`.
fn worker(dir: &Path, name: &str, ticket: &str) -> Proc {
    Proc::spawn(dir, name, &["worker", "--ticket", ticket, "--threads", "1"], &[])
}

#[test]
fn workers_join_and_leave_at_step_boundaries() {
    let dir = TempDir::new("elastic-join-leave");
    let want = reference(dir.path(), 20, &[]);
    let (mut coord, ticket) = listening_coordinator(dir.path(), "2", "5:3,12:2");
    let _w1 = worker(dir.path(), "w1", &ticket);
    let _w2 = worker(dir.path(), "w2", &ticket);
    coord.wait_for("epoch 1: 2 workers at step 0", Duration::from_secs(30));
    let mut w3 = worker(dir.path(), "w3", &ticket);
    coord.wait_for("epoch 2: 3 workers at step 5", Duration::from_secs(30));
    coord.wait_for("holding before step 12", Duration::from_secs(30));
    w3.signal(libc::SIGTERM);
    coord.wait_for("epoch 3: 2 workers at step 12", Duration::from_secs(30));
    let left = w3.wait(Duration::from_secs(30));
    assert!(left.success(), "the leaving worker exits 0: {left}; {}", w3.log());
    assert!(coord.wait(Duration::from_secs(60)).success(), "{}", coord.log());
    let log = coord.log();
    assert_eq!(membership(&log), (1, 1, 0), "{log}");
    assert!(log.contains("0 steps replayed"), "{log}");
    assert_same_state(
        &want,
        &state_files(&dir.path().join("run"), 20),
        "join at 5, leave at 12",
    );
    // The metrics log and the report show the three epochs.
    let log_text = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).expect("metrics log");
    let epochs: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("\"kind\":\"membership\""))
        .collect();
    assert_eq!(epochs.len(), 3, "{epochs:?}");
    assert!(
        epochs[1].contains("\"step\":5") && epochs[1].contains("\"workers\":3"),
        "{}",
        epochs[1]
    );
    assert!(
        epochs[2].contains("\"step\":12") && epochs[2].contains("\"workers\":2"),
        "{}",
        epochs[2]
    );
    // The state moved at the join and the leave is what changed owner, and only that: the kept
    // workers keep their experts and tensors (the plan's minimality is proven in
    // `actors::placement`'s tests; here, the counts a whole run reports).
    let config: semoe::config::TrainConfig =
        toml::from_str(&std::fs::read_to_string(dir.path().join("run/config.toml")).expect("config")).expect("parse");
    let shape = semoe::model::gpt::Gpt::<f32>::zeros(&config.model).expect("model");
    let dense = shape.specs().iter().filter(|s| !s.expert).count() as u64;
    let blocks = (0..config.model.n_layer).filter(|&l| config.model.is_moe(l)).count() as u64;
    let experts = config.model.experts as u64;
    assert!(blocks > 0 && experts >= 3 && !config.storage.shard_dense, "{config:?}");
    let sent: Vec<semoe::train::log::MembershipRecord> = epochs
        .iter()
        .map(|l| serde_json::from_str(l).expect("a membership record"))
        .collect();
    let figures = |r: &semoe::train::log::MembershipRecord| (r.handed_over, r.expert_units_sent, r.dense_tensors_sent);
    // Epoch 1: each of 2 workers gets its whole share (its experts, every dense value).
    assert_eq!(figures(&sent[0]), (false, experts * blocks, 2 * dense), "{:?}", sent[0]);
    // 2 -> 3: the newcomer gets floor(E/3) experts per block (the extra ones stay) and every dense
    // value; the kept workers receive nothing.
    assert_eq!(figures(&sent[1]), (true, experts / 3 * blocks, dense), "{:?}", sent[1]);
    // 3 -> 2: the leaver's experts and its dense tensors (with their moments) go to the others.
    assert_eq!(sent[2].expert_units_sent, experts / 3 * blocks, "{:?}", sent[2]);
    assert!(
        sent[2].handed_over && (1..dense).contains(&sent[2].dense_tensors_sent),
        "{:?}",
        sent[2]
    );
    for r in &sent[1..] {
        assert!(
            r.state_bytes_sent > 0 && r.state_bytes_sent < sent[0].state_bytes_sent / 2,
            "{r:?}"
        );
    }
    assert!(log.contains("handed over: "), "{log}");
    // The traffic between members over the whole run, the departed member's epoch included.
    let traffic = traffic_record(&log_text);
    assert!(traffic.members, "over worker processes the cells are member ids");
    let members: std::collections::BTreeSet<u64> = traffic.entries.iter().map(|e| e.from).collect();
    assert_eq!(members.len(), 3, "three members sent data: {:?}", traffic.entries);
    let report = std::fs::read_to_string(dir.path().join("run/report.md")).expect("report");
    assert!(report.contains("## Membership (worker processes)"), "{report}");
    assert!(report.contains("| 3 | 12 | 2 | member 3 leaves |"), "{report}");
    assert!(report.contains("## Traffic between workers"), "{report}");
    for plot in [
        semoe::telemetry::report::LOSS_SVG,
        semoe::telemetry::report::THROUGHPUT_SVG,
    ] {
        let svg = std::fs::read_to_string(dir.path().join("run").join(plot)).expect("plot");
        assert!(svg.contains("membership change"), "{plot} marks the membership changes");
    }
}

/// A coordinator listening for 2 workers whose both workers leave (SIGTERM to each) before step
/// 5, waiting `join_wait` seconds for another; both leavers checked to exit 0, told their state is
/// kept.
fn every_worker_leaves_at_step_5(dir: &Path, join_wait: &str) -> Proc {
    let (mut coord, ticket) = listening_coordinator_with(dir, "2", "5:0", &["--join-wait", join_wait]);
    let mut w1 = worker(dir, "w1", &ticket);
    let mut w2 = worker(dir, "w2", &ticket);
    coord.wait_for("holding before step 5", Duration::from_secs(60));
    w1.signal(libc::SIGTERM);
    w2.signal(libc::SIGTERM);
    for w in [&mut w1, &mut w2] {
        let status = w.wait(Duration::from_secs(30));
        let log = w.log();
        assert!(status.success(), "a leaving worker exits 0: {status}; {log}");
        assert!(
            log.contains("left at step 5; its state is the coordinator's to keep"),
            "{log}"
        );
    }
    coord
}

/// Every worker leaving while the coordinator goes on (SIGTERM to each; a Deployment scaled to
/// zero): the coordinator reads the state they hold, lets them go at once, waits `--join-wait`
/// for a joiner, then stops with a checkpoint of that state (exit 75). It used to wait 120 s and
/// end with an error, losing every step since the last checkpoint. A resume with new workers ends
/// bitwise where the uninterrupted run does. A stop asked while it waits (a pod's SIGTERM) ends
/// the wait at once, with the same checkpoint.
#[test]
fn every_worker_leaving_stops_the_run_with_their_state_checkpointed() {
    let dir = TempDir::new("elastic-all-leave");
    let want = reference(dir.path(), 20, &[]);
    let mut coord = every_worker_leaves_at_step_5(dir.path(), "10");
    let status = coord.wait(Duration::from_secs(60));
    let log = coord.log();
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(log.contains("no workers left at step 5"), "{log}");
    assert!(
        log.contains("none joined within 10 s: the run stopped with the state of step 5 (of 20)"),
        "{log}"
    );
    assert_eq!(membership(&log), (0, 2, 0), "{log}");
    assert!(log.contains("0 workers at the end"), "{log}");
    // --checkpoint-every 0 (SMALL): the one checkpoint is the stop's.
    let run = dir.path().join("run");
    let ckpt = semoe::storage::checkpoint::latest(&run)
        .expect("list the checkpoints")
        .expect("a checkpoint written at the stop");
    assert!(ckpt.ends_with("checkpoints/step-00000005"), "{ckpt:?}");
    let mut resumed = Proc::spawn(
        dir.path(),
        "resumed",
        &["train", "--resume", "--run-dir", "run", "--processes", "2"],
        &[],
    );
    assert!(resumed.wait(Duration::from_secs(120)).success(), "{}", resumed.log());
    assert_same_state(&want, &state_files(&run, 20), "every worker left at step 5, resumed");

    let stopped = TempDir::new("elastic-all-leave-stopped");
    let mut coord = every_worker_leaves_at_step_5(stopped.path(), "600");
    coord.wait_for("no workers left at step 5", Duration::from_secs(30));
    coord.signal(libc::SIGTERM);
    let status = coord.wait(Duration::from_secs(30));
    let log = coord.log();
    assert_eq!(status.code(), Some(143), "{log}");
    assert!(log.contains("stopped by SIGTERM after step 5"), "{log}");
    let ckpt = semoe::storage::checkpoint::latest(&stopped.path().join("run"))
        .expect("list the checkpoints")
        .expect("a checkpoint written at the stop");
    assert!(ckpt.ends_with("checkpoints/step-00000005"), "{ckpt:?}");
}

#[test]
fn joins_and_leaves_of_any_worker_hand_over_sharded_state_bitwise() {
    // Sharded dense tensors (a worker holds only its own) and blocked experts; the first worker to
    // leave is one of the originals, so the kept workers change index.
    let extra = ["--shard-dense", "--placement", "blocked"];
    let dir = TempDir::new("elastic-handover-sharded");
    // The plain loop has nothing to shard or place; its bits are the same.
    let want = reference(dir.path(), 20, &[]);
    let (mut coord, ticket) = listening_coordinator_with(dir.path(), "2", "4:3,8:4,12:3,16:2", &extra);
    let mut w1 = worker(dir.path(), "w1", &ticket);
    let _w2 = worker(dir.path(), "w2", &ticket);
    coord.wait_for("epoch 1: 2 workers at step 0", Duration::from_secs(30));
    let mut w3 = worker(dir.path(), "w3", &ticket);
    coord.wait_for("epoch 2: 3 workers at step 4", Duration::from_secs(30));
    let _w4 = worker(dir.path(), "w4", &ticket);
    coord.wait_for("epoch 3: 4 workers at step 8", Duration::from_secs(30));
    coord.wait_for("holding before step 12", Duration::from_secs(30));
    w1.signal(libc::SIGTERM);
    coord.wait_for("epoch 4: 3 workers at step 12", Duration::from_secs(30));
    coord.wait_for("holding before step 16", Duration::from_secs(30));
    w3.signal(libc::SIGTERM);
    coord.wait_for("epoch 5: 2 workers at step 16", Duration::from_secs(30));
    for w in [&mut w1, &mut w3] {
        let left = w.wait(Duration::from_secs(30));
        assert!(left.success(), "a leaving worker exits 0: {left}; {}", w.log());
    }
    assert!(coord.wait(Duration::from_secs(60)).success(), "{}", coord.log());
    let log = coord.log();
    assert_eq!(membership(&log), (2, 2, 0), "{log}");
    assert!(log.contains("0 steps replayed"), "{log}");
    assert_eq!(
        log.matches("handed over: ").count(),
        4,
        "four changes handed over: {log}"
    );
    assert_same_state(&want, &state_files(&dir.path().join("run"), 20), "sharded hand-overs");
}

/// A worker that joins but that its peers cannot reach (it advertises an address nobody answers
/// at): the epoch with it cannot form; after the second attempt it is refused and the members of
/// before go on. It exits non-zero; the bits are the plain loop's.
#[test]
fn a_joiner_its_peers_cannot_reach_is_refused_and_the_run_goes_on() {
    let dir = TempDir::new("elastic-unreachable-joiner");
    let want = reference(dir.path(), 20, &[]);
    // QUIC only (the same-host sockets would reach it whatever it advertises), short deadlines.
    let config = dir.path().join("quic-only.toml");
    std::fs::write(&config, "[train]\nsame_host = false\ndeadline_s = 2.0\n").expect("config");
    let config = config.to_str().expect("a UTF-8 path").to_string();
    let (mut coord, ticket) = listening_coordinator_with(dir.path(), "2", "5:3", &["--config", &config]);
    let _w1 = worker(dir.path(), "w1", &ticket);
    let _w2 = worker(dir.path(), "w2", &ticket);
    coord.wait_for("epoch 1: 2 workers at step 0", Duration::from_secs(30));
    // TEST-NET-1 (RFC 5737): nothing answers there.
    let args = [
        "worker",
        "--ticket",
        &ticket,
        "--threads",
        "1",
        "--advertise",
        "192.0.2.1",
    ];
    let mut w3 = Proc::spawn(dir.path(), "w3", &args, &[]);
    coord.wait_for("did not form with it, twice", Duration::from_secs(60));
    let refused = w3.wait(Duration::from_secs(30));
    assert!(
        !refused.success(),
        "the refused worker must not go on: {refused}; {}",
        w3.log()
    );
    assert!(coord.wait(Duration::from_secs(60)).success(), "{}", coord.log());
    let log = coord.log();
    assert!(log.contains("2 workers at step 5"), "{log}");
    assert_eq!(membership(&log), (0, 0, 0), "{log}");
    assert_same_state(&want, &state_files(&dir.path().join("run"), 20), "a joiner refused");
}

#[test]
fn a_stopped_worker_is_replaced_and_fenced() {
    let dir = TempDir::new("elastic-sigstop");
    let want = reference(dir.path(), 20, &[]);
    // Before step 3 the coordinator holds until only two workers are left, so the stop always
    // lands during the run.
    let (mut coord, ticket) = listening_coordinator(dir.path(), "3", "3:2");
    let _w1 = worker(dir.path(), "w1", &ticket);
    let _w2 = worker(dir.path(), "w2", &ticket);
    let mut w3 = worker(dir.path(), "w3", &ticket);
    coord.wait_for("epoch 1: 3 workers", Duration::from_secs(30));
    w3.signal(libc::SIGSTOP);
    coord.wait_for("epoch 2: 2 workers", Duration::from_secs(30));
    w3.signal(libc::SIGCONT);
    let fenced = w3.wait(Duration::from_secs(30));
    assert!(!fenced.success(), "the stopped worker must not go on: {fenced}");
    assert!(w3.log().contains("no longer a member"), "{}", w3.log());
    assert!(coord.wait(Duration::from_secs(60)).success(), "{}", coord.log());
    let log = coord.log();
    assert_eq!(membership(&log), (0, 0, 1), "{log}");
    assert_same_state(
        &want,
        &state_files(&dir.path().join("run"), 20),
        "a worker stopped and replaced",
    );
}

#[test]
fn joins_that_cannot_give_the_same_bits_are_refused_naming_why() {
    let dir = TempDir::new("elastic-refusals");
    let want = reference(dir.path(), 20, &[]);
    let (mut coord, good) = listening_coordinator(dir.path(), "2", "");
    let ticket = JoinTicket::read(Path::new(&good)).expect("the run's ticket");

    let wrong_token = dir.path().join("wrong-token.ticket");
    JoinTicket {
        token: "00".repeat(32),
        ..ticket.clone()
    }
    .write(&wrong_token)
    .expect("write");
    let wrong_cert = dir.path().join("wrong-cert.ticket");
    JoinTicket {
        cert_sha256: "ab".repeat(32),
        ..ticket.clone()
    }
    .write(&wrong_cert)
    .expect("write");
    let other_config = dir.path().join("other.toml");
    let mut config: semoe::config::TrainConfig =
        toml::from_str(&std::fs::read_to_string(dir.path().join("run/config.toml")).expect("config")).expect("parse");
    config.train.seed += 1;
    config.optimizer.lr *= 2.0;
    std::fs::write(&other_config, config.to_toml().expect("toml")).expect("write");
    let other_text = dir.path().join("other.txt");
    std::fs::write(&other_text, "Not the run's text at all. ".repeat(2000)).expect("write");

    // (name, worker arguments, environment, what the refusal names)
    type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "token",
            vec!["--ticket".into(), wrong_token.to_string_lossy().into()],
            vec![],
            "wrong token",
        ),
        (
            "cert",
            vec!["--ticket".into(), wrong_cert.to_string_lossy().into()],
            vec![],
            "did not match",
        ),
        (
            "config",
            vec![
                "--ticket".into(),
                good.clone(),
                "--config".into(),
                other_config.to_string_lossy().into(),
            ],
            vec![],
            "train.seed",
        ),
        (
            "corpus",
            vec![
                "--ticket".into(),
                good.clone(),
                "--data".into(),
                other_text.to_string_lossy().into(),
            ],
            vec![],
            "corpus differs",
        ),
        (
            "kernel",
            vec!["--ticket".into(), good.clone()],
            vec![("SEMOE_TEST_KERNEL_FINGERPRINT", "0".repeat(64))],
            "kernel fingerprint differs",
        ),
    ];
    for (name, extra, env, reason) in cases {
        let mut args = vec!["worker".to_string()];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let mut w = Proc::spawn(dir.path(), &format!("refused-{name}"), &args, &env);
        let status = w.wait(Duration::from_secs(10));
        let took = started.elapsed();
        assert!(!status.success(), "{name}: the worker must be refused");
        assert!(
            w.log().contains(reason),
            "{name}: the refusal names {reason:?}: {}",
            w.log()
        );
        assert!(took < Duration::from_secs(2), "{name}: refused after {took:?}");
        eprintln!("{name}: refused in {took:?}");
    }
    if let Some(config_line) = std::fs::read_to_string(dir.path().join("refused-config.log"))
        .ok()
        .and_then(|l| l.lines().find(|l| l.contains("train.seed")).map(str::to_string))
    {
        assert!(
            config_line.contains("optimizer.lr"),
            "every differing field is named: {config_line}"
        );
    }
    // Training is unaffected: two good workers join and the run ends with the plain loop's bits.
    // The second brings its own config file: its threads are its own; its evaluation cadence,
    // the run's, is said not to apply.
    let mut own: semoe::config::TrainConfig =
        toml::from_str(&std::fs::read_to_string(dir.path().join("run/config.toml")).expect("config")).expect("parse");
    own.train.threads = 1;
    own.train.eval_every += 7;
    let own_config = dir.path().join("own.toml");
    std::fs::write(&own_config, own.to_toml().expect("toml")).expect("write");
    let own_config = own_config.to_string_lossy().to_string();
    let _w1 = worker(dir.path(), "w1", &good);
    let w2 = Proc::spawn(
        dir.path(),
        "w2",
        &["worker", "--ticket", &good, "--config", &own_config],
        &[],
    );
    assert!(coord.wait(Duration::from_secs(60)).success(), "{}", coord.log());
    let w2_log = w2.log();
    assert!(
        w2_log.contains("not its config file's")
            && w2_log.contains("train.eval_every")
            && !w2_log.contains("train.threads"),
        "{w2_log}"
    );
    assert_eq!(membership(&coord.log()), (0, 0, 0), "{}", coord.log());
    assert_same_state(&want, &state_files(&dir.path().join("run"), 20), "after refused joins");
}

#[test]
fn a_long_run_with_four_processes_sees_no_false_failure() {
    let dir = TempDir::new("elastic-long");
    let args = train_args("run", "500", &["--processes", "4", "--snapshot-every", "50"]);
    let mut p = Proc::spawn(dir.path(), "run", &args, &[]);
    assert!(p.wait(Duration::from_secs(120)).success(), "{}", p.log());
    let log = p.log();
    assert!(log.contains("done: 500 of 500 steps"), "{log}");
    assert_eq!(membership(&log), (0, 0, 0), "keep-alives keep every worker: {log}");
    assert!(log.contains("membership: epoch 1,"), "{log}");
}
