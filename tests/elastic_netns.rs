//! Training across hosts, simulated on one machine: the coordinator and each worker run in a
//! network namespace of their own (their own address, their own loopback, no same-host sockets
//! between them), joined by a bridge whose links are limited to 1 Gbit/s where the kernel has the
//! `tbf` queueing discipline. Everything crosses the network as between machines: the join over
//! QUIC, the data plane worker to worker over QUIC, crash detection by QUIC's idle timeout (the
//! coordinator is not the workers' parent, so no process exit tells it anything), and a network
//! partition (a worker's link cut while it keeps running).
//!
//! It needs root and iproute2, and it changes the machine's network configuration while it runs
//! (a bridge and four namespaces per test, named after the test's process id, removed at the end,
//! also on failure), so it runs only when asked: `SEMOE_NETNS_TESTS=1 cargo test --test elastic_netns`.
//! Without the variable it passes after saying that it skipped.

mod common;

use common::procs::{assert_same_state, membership, reference, state_files, train_args, Proc};
use common::TempDir;
use std::process::Command;
use std::time::{Duration, Instant};

/// The variable that runs this test.
const ENABLE: &str = "SEMOE_NETNS_TESTS";

/// Run `ip`/`tc` with `args`; the error names the command and what it printed.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `hosts` network namespaces on one bridge, host `k` at 10.77.0.(k+1)/24; removed when dropped.
struct Lan {
    bridge: String,
    hosts: Vec<Host>,
    /// Whether the links are limited to 1 Gbit/s (`tbf` present).
    shaped: bool,
}

struct Host {
    netns: String,
    /// The bridge's end of the host's link (set down to cut the host off).
    port: String,
    ip: String,
}

impl Lan {
    fn new(hosts: usize) -> Result<Lan, String> {
        // Unique per network: the tests of this file run side by side.
        static NETWORKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NETWORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let mut lan = Lan {
            bridge: format!("smbr{id}"),
            hosts: Vec::new(),
            shaped: true,
        };
        run("ip", &["link", "add", &lan.bridge, "type", "bridge"])?;
        run("ip", &["link", "set", &lan.bridge, "up"])?;
        for k in 0..hosts {
            let host = Host {
                netns: format!("semoe-{id}-{k}"),
                port: format!("smv{id}-{k}"),
                ip: format!("10.77.0.{}", k + 1),
            };
            run("ip", &["netns", "add", &host.netns])?;
            lan.hosts.push(host);
            let host = &lan.hosts[k];
            let ns = host.netns.as_str();
            run(
                "ip",
                &[
                    "link", "add", &host.port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            run("ip", &["link", "set", &host.port, "master", &lan.bridge, "up"])?;
            let cidr = format!("{}/24", host.ip);
            run("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            let shape = ["netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf"];
            let rate = ["rate", "1gbit", "burst", "256kb", "latency", "20ms"];
            if let Err(e) = run("ip", &[&shape[..], &rate[..]].concat()) {
                eprintln!("links not shaped ({e})");
                lan.shaped = false;
            }
        }
        Ok(lan)
    }

    fn netns(&self, k: usize) -> &str {
        &self.hosts[k].netns
    }

    /// Cut host `k` off the network (`up = false`) or connect it again.
    fn link(&self, k: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        run("ip", &["link", "set", &self.hosts[k].port, state]).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the link, and with it the bridge's end.
        for h in &self.hosts {
            if let Err(e) = run("ip", &["netns", "del", &h.netns]) {
                eprintln!("cleanup: {e}");
            }
        }
        if let Err(e) = run("ip", &["link", "del", &self.bridge]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Whether to run (the variable is set; then it must run as root): otherwise say it skipped.
fn enabled() -> bool {
    if std::env::var_os(ENABLE).is_none() {
        eprintln!(
            "skipped: set {ENABLE}=1 to run it (needs root and iproute2; it creates a bridge and \
             four network namespaces while it runs)"
        );
        return false;
    }
    // SAFETY: geteuid(2) reads the process's effective user id; it cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "{ENABLE} is set but the test is not running as root (network namespaces need it)"
    );
    true
}

/// A worker process on host `k` of `lan`.
fn worker(lan: &Lan, k: usize, dir: &std::path::Path, ticket: &str) -> Proc {
    let name = format!("w{k}");
    Proc::spawn_in(
        Some(lan.netns(k)),
        dir,
        &name,
        &["worker", "--ticket", ticket, "--threads", "1"],
        &[],
    )
}

#[test]
fn workers_on_separate_hosts_join_crash_and_are_cut_off_bitwise() {
    if !enabled() {
        return;
    }
    let dir = TempDir::new("elastic-netns");
    let want = reference(dir.path(), 20, &[]);
    // Declared before the processes, so dropped after them: no process outlives its network.
    let lan = Lan::new(4).unwrap_or_else(|e| panic!("cannot build the network: {e}"));
    let listen = format!("{}:0", lan.hosts[0].ip);
    let mut args = train_args("run", "20", &["--listen", &listen, "--min-workers", "2"]);
    // Joins and leaves land exactly at these steps; losses at once.
    let hold = ("SEMOE_TEST_MEMBERS_AT", "5:3,10:2,15:1".to_string());
    args.extend_from_slice(&["--snapshot-every", "4"]);
    let mut coord = Proc::spawn_in(Some(lan.netns(0)), dir.path(), "coordinator", &args, &[hold]);
    coord.wait_for("workers join with", Duration::from_secs(30));
    let ticket = dir.path().join("run/join.ticket").to_string_lossy().into_owned();

    // Two hosts start the run; a third joins at step 5.
    let mut w1 = worker(&lan, 1, dir.path(), &ticket);
    let mut w2 = worker(&lan, 2, dir.path(), &ticket);
    coord.wait_for("epoch 1: 2 workers at step 0", Duration::from_secs(30));
    let mut w3 = worker(&lan, 3, dir.path(), &ticket);
    coord.wait_for("epoch 2: 3 workers at step 5", Duration::from_secs(30));
    for w in [&mut w1, &mut w2, &mut w3] {
        // Each reaches its two peers over QUIC: they are different hosts to it.
        w.wait_for(
            "epoch 2: 0 peer(s) over same-host sockets, 2 over QUIC",
            Duration::from_secs(30),
        );
    }

    // A crash: nothing but the network tells the coordinator.
    coord.wait_for("holding before step 10", Duration::from_secs(30));
    w1.signal(libc::SIGKILL);
    let detected = coord.wait_for("lost member", Duration::from_secs(10));
    coord.wait_for("epoch 3: 2 workers at step 10", Duration::from_secs(30));

    // A partition: w2 keeps running but no packet reaches it or leaves it.
    coord.wait_for("holding before step 15", Duration::from_secs(30));
    let cut = Instant::now();
    lan.link(2, false);
    coord.wait_for("epoch 4: 1 workers at step 15", Duration::from_secs(30));
    let replaced = cut.elapsed();
    let fenced = w2.wait(Duration::from_secs(30));
    lan.link(2, true);
    assert!(!fenced.success(), "the cut-off worker must not go on: {fenced}");
    assert!(w2.log().contains("no longer a member"), "{}", w2.log());

    assert!(coord.wait(Duration::from_secs(60)).success(), "{}", coord.log());
    let left = w3.wait(Duration::from_secs(30));
    assert!(
        left.success(),
        "the last worker ends with the run: {left}; {}",
        w3.log()
    );
    let log = coord.log();
    assert_eq!(membership(&log), (1, 0, 2), "{log}");
    assert_same_state(
        &want,
        &state_files(&dir.path().join("run"), 20),
        "across hosts: a join, a crash and a partition",
    );
    // QUIC's idle timeout is 1.5 s; the issue asks for detection within 2 s.
    assert!(
        detected <= Duration::from_secs(2),
        "the crash was detected after {detected:?}"
    );
    eprintln!(
        "links shaped to 1 Gbit/s: {}; crash detected in {detected:?}; cut-off worker replaced in \
         {replaced:?}",
        lan.shaped
    );
}

/// `args` with the value after `flag` replaced by `value` (the small model's arguments set every
/// flag once; clap refuses a flag given twice).
fn with_value<'a>(mut args: Vec<&'a str>, flag: &str, value: &'a str) -> Vec<&'a str> {
    let at = args
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[at + 1] = value;
    args
}

#[test]
fn a_coordinator_lost_across_hosts_resumes_from_its_checkpoint_bitwise() {
    if !enabled() {
        return;
    }
    let dir = TempDir::new("elastic-netns-resume");
    let want = reference(dir.path(), 20, &[]);
    let lan = Lan::new(4).unwrap_or_else(|e| panic!("cannot build the network: {e}"));
    let listen = format!("{}:0", lan.hosts[0].ip);
    let first = train_args("run", "20", &["--listen", &listen, "--min-workers", "2"]);
    let first = with_value(first, "--checkpoint-every", "5");
    // Before step 12 the coordinator waits for a third worker that never comes: it is lost there,
    // after its checkpoint of step 10.
    let hold = ("SEMOE_TEST_MEMBERS_AT", "12:3".to_string());
    let mut coord = Proc::spawn_in(Some(lan.netns(0)), dir.path(), "coordinator", &first, &[hold]);
    coord.wait_for("workers join with", Duration::from_secs(30));
    let ticket = dir.path().join("run/join.ticket").to_string_lossy().into_owned();
    let mut w1 = worker(&lan, 1, dir.path(), &ticket);
    let mut w2 = worker(&lan, 2, dir.path(), &ticket);
    coord.wait_for("holding before step 12", Duration::from_secs(30));
    coord.signal(libc::SIGKILL);
    coord.wait(Duration::from_secs(10));
    for w in [&mut w1, &mut w2] {
        let end = w.wait(Duration::from_secs(10));
        assert!(!end.success(), "a worker of a lost coordinator must stop: {end}");
        assert!(w.log().contains("lost the coordinator"), "{}", w.log());
    }
    // The coordinator again, on the same host, from the run's newest checkpoint; new workers.
    let args = [
        "train",
        "--resume",
        "--run-dir",
        "run",
        "--listen",
        &listen,
        "--min-workers",
        "2",
    ];
    let mut again = Proc::spawn_in(Some(lan.netns(0)), dir.path(), "resumed", &args, &[]);
    again.wait_for("workers join with", Duration::from_secs(30));
    let _w2 = worker(&lan, 2, dir.path(), &ticket);
    let _w3 = worker(&lan, 3, dir.path(), &ticket);
    assert!(again.wait(Duration::from_secs(60)).success(), "{}", again.log());
    assert!(again.log().contains("step 10"), "resumed from step 10: {}", again.log());
    assert_same_state(
        &want,
        &state_files(&dir.path().join("run"), 20),
        "a coordinator lost at step 12, resumed from step 10",
    );
}
