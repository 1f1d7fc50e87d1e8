//! The deployment examples under `deploy/` run as written: every `semoe` command line in them is
//! found, counted, checked against `semoe <command> --help`, and run on 127.0.0.1 with its
//! deployment-specific parts replaced (the Kubernetes coordinator and workers; the Slurm script's
//! ticket, coordinator and workers), each run to completion.
//!
//! # The convention
//!
//! A semoe command line in a file under `deploy/` stands on a line of its own: after leading
//! whitespace and an optional `exec ` (a shell that hands PID 1 to semoe, as in the Kubernetes
//! block scalars `command: ["sh", "-c"]` + `args: - |`), the line starts with `semoe ` and the
//! command ends at the end of the line (a trailing `&`, backgrounding it in a shell script, is
//! dropped; a trailing `\` continuation is refused). Words split at whitespace as a shell splits
//! them, with double quotes grouping; `$VAR`, `${VAR}` and `$(VAR)` (Kubernetes' own expansion)
//! are replaced from a table per deployment, and a variable missing from it fails the test, as
//! does a file whose command lines are not the ones [`EXPECTED`] lists. Lines that mention semoe
//! any other way (comments, prose, `echo`) are not command lines.
//!
//! Every process a test starts runs in its own process group, killed and reaped when the test
//! ends, also on failure.

mod common;

use common::procs::{Proc, SEMOE};
use common::TempDir;
use semoe::net::quic::JoinTicket;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The semoe subcommands of every file under `deploy/`, in order (files without any listed with
/// none, so that a new file is looked at).
const EXPECTED: &[(&str, &[&str])] = &[
    ("Dockerfile", &[]),
    ("kubernetes/README.md", &["ticket"]),
    ("kubernetes/coordinator.yaml", &["train"]),
    ("kubernetes/secret.sh", &[]),
    ("kubernetes/workers.yaml", &["worker"]),
    ("slurm/semoe.sbatch", &["ticket", "train", "worker"]),
];

/// A small model trained 20 steps (a few milliseconds a step), replacing the deployment's own
/// values of these flags.
const SMALL: &[(&str, &str)] = &[
    ("--d-model", "32"),
    ("--layers", "2"),
    ("--heads", "2"),
    ("--d-ff", "64"),
    ("--block-size", "16"),
    ("--batch", "8"),
    ("--groups", "4"),
    ("--threads", "1"),
    ("--eval-every", "0"),
    ("--checkpoint-every", "0"),
    ("--sample-tokens", "0"),
    ("--steps", "20"),
];

/// How long any one process may take (each runs in about a second).
const LIMIT: Duration = Duration::from_secs(40);

/// `semoe args` in `dir` as a [`Proc`] (its stderr in `dir/name.log`).
fn spawn(dir: &Path, name: &str, args: &[String]) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn(dir, name, &args, &[])
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every file under `deploy/`, relative to it, sorted.
fn deploy_files() -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("under deploy/");
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir(), &deploy_dir(), &mut out);
    out.sort();
    out
}

/// A semoe command line of a deploy file: its words after `semoe`, unexpanded.
#[derive(Clone, Debug)]
struct Found {
    place: String,
    words: Vec<String>,
}

impl Found {
    fn subcommand(&self) -> &str {
        self.words.first().map(String::as_str).unwrap_or("")
    }

    /// The value after `flag` (`--flag value` or `--flag=value`), unexpanded.
    fn value(&self, flag: &str) -> Option<&str> {
        let eq = format!("{flag}=");
        self.words.iter().enumerate().find_map(|(i, w)| {
            if w == flag {
                self.words.get(i + 1).map(String::as_str)
            } else {
                w.strip_prefix(&eq)
            }
        })
    }
}

/// Split a command line into words as a shell does (whitespace, double and single quotes); the
/// `$` references stay for [`expand`].
fn split_words(line: &str, place: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "{place}: an unclosed quote");
    if in_word {
        words.push(word);
    }
    words
}

/// The semoe command lines of `deploy/REL` (see the convention at the top of this file).
fn commands(rel: &str) -> Vec<Found> {
    let path = deploy_dir().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let place = format!("deploy/{rel}:{}", i + 1);
        let start = line.trim_start();
        let start = start.strip_prefix("exec ").map(str::trim_start).unwrap_or(start);
        let Some(rest) = start.strip_prefix("semoe ") else {
            continue;
        };
        let rest = rest.trim_end();
        assert!(
            !rest.ends_with('\\'),
            "{place}: a semoe command line must end on its line"
        );
        let rest = rest.strip_suffix('&').unwrap_or(rest);
        let words = split_words(rest, &place);
        assert!(!words.is_empty(), "{place}: `semoe` without a command");
        out.push(Found { place, words });
    }
    out
}

/// `word` with its `$VAR`, `${VAR}` and `$(VAR)` replaced from `vars`.
fn expand(word: &str, vars: &BTreeMap<&str, String>, place: &str) -> String {
    let mut out = String::new();
    let mut rest = word;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.chars().next() {
            Some(open @ ('(' | '{')) => {
                let close = if open == '(' { ')' } else { '}' };
                let end = after
                    .find(close)
                    .unwrap_or_else(|| panic!("{place}: unclosed {open} in {word:?}"));
                (&after[1..end], end + 1)
            }
            _ => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        let value = vars
            .get(name)
            .unwrap_or_else(|| panic!("{place}: the test has no value for ${name} (in {word:?})"));
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// `HOST:PORT` on the loopback interface: the host replaced by 127.0.0.1, the port by `port`
/// when given.
fn loopback(addr: &str, port: Option<u16>, place: &str) -> String {
    let (_, given) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{place}: {addr:?} is not HOST:PORT"));
    let given: u16 = given.parse().unwrap_or_else(|_| panic!("{place}: no port in {addr:?}"));
    format!("127.0.0.1:{}", port.unwrap_or(given))
}

/// How a deployment's command lines become loopback ones.
struct Local<'a> {
    /// Values of the `$` references.
    vars: BTreeMap<&'a str, String>,
    /// Absolute path prefixes of the deployment and the temporary directories that stand for them.
    paths: Vec<(&'a str, PathBuf)>,
    /// The port of the coordinator and the ticket (0: one the OS chooses; None: the deployment's).
    port: Option<u16>,
    /// The coordinator's real address, for `--join`.
    join: Option<String>,
}

impl Local<'_> {
    /// The arguments of `found` on 127.0.0.1; a `train` gets the small model of [`SMALL`].
    fn args(&self, found: &Found) -> Vec<String> {
        let place = &found.place;
        let mut words: Vec<String> = found
            .words
            .iter()
            .map(|w| expand(w, &self.vars, place))
            .filter(|w| !w.is_empty()) // an unquoted empty expansion is no word in a shell
            .collect();
        let mut i = 0;
        while i < words.len() {
            let flag = words[i].clone();
            if let Some(value) = words.get_mut(i + 1) {
                match flag.as_str() {
                    "--listen" | "--addr" => *value = loopback(value, self.port, place),
                    "--join" => {
                        *value = self
                            .join
                            .clone()
                            .unwrap_or_else(|| panic!("{place}: no address for --join"))
                    }
                    "--advertise" => *value = "127.0.0.1".into(),
                    _ => {}
                }
                for (prefix, local) in &self.paths {
                    if let Some(tail) = value.strip_prefix(prefix) {
                        *value = format!("{}{tail}", local.display());
                    }
                }
            }
            i += 1;
        }
        if found.subcommand() == "train" {
            for (flag, _) in SMALL {
                if let Some(at) = words.iter().position(|w| w == flag) {
                    words.drain(at..at + 2);
                }
            }
            for (flag, value) in SMALL {
                words.push(flag.to_string());
                words.push(value.to_string());
            }
        }
        words
    }
}

/// The one command line of `found` whose subcommand is `sub`.
fn the<'a>(found: &'a [Found], sub: &str) -> &'a Found {
    let mut it = found.iter().filter(|f| f.subcommand() == sub);
    let one = it.next().unwrap_or_else(|| panic!("no `semoe {sub}` in {found:?}"));
    assert!(it.next().is_none(), "more than one `semoe {sub}` in {found:?}");
    one
}

/// The number after `key` on the first line of `deploy/REL` that starts with it.
fn number_after(rel: &str, key: &str) -> usize {
    let text = std::fs::read_to_string(deploy_dir().join(rel)).expect("deploy file");
    let line = text
        .lines()
        .map(str::trim_start)
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no line starting with {key:?} in deploy/{rel}"));
    let digits: String = line[key.len()..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?} in {line:?}"))
}

/// A UDP port on 127.0.0.1 that was free a moment ago (the OS chose it).
fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    socket.local_addr().expect("its address").port()
}

/// Run the coordinator and `workers` workers to completion; the coordinator's log.
fn train_with_workers(dir: &Path, local: &mut Local<'_>, train: &Found, worker: &Found, workers: usize) -> String {
    let mut coord = spawn(dir, "coordinator", &local.args(train));
    coord.wait_for("workers join with", LIMIT);
    let run_dir = dir.join(
        local
            .args(train)
            .iter()
            .skip_while(|w| *w != "--run-dir")
            .nth(1)
            .expect("the coordinator's --run-dir"),
    );
    let ticket = JoinTicket::read(&run_dir.join("join.ticket")).expect("the run directory's ticket");
    if let Some(port) = local.port.filter(|p| *p != 0) {
        assert_eq!(
            ticket.addr.port(),
            port,
            "the coordinator listens where the ticket says"
        );
    }
    local.join = Some(ticket.addr.to_string());
    let mut procs: Vec<Proc> = (0..workers)
        .map(|i| spawn(dir, &format!("worker-{i}"), &local.args(worker)))
        .collect();
    for p in &mut procs {
        p.success(LIMIT);
        assert!(p.log().contains("semoe worker: done"), "{}", p.log());
    }
    coord.success(LIMIT);
    let log = coord.log();
    assert!(log.contains("done: 20 of 20 steps"), "the run did not finish:\n{log}");
    assert!(
        log.contains(&format!("{workers} workers at the end; 0 joined, 0 left, 0 lost")),
        "{workers} workers trained to the end:\n{log}"
    );
    log
}

#[test]
fn every_semoe_command_line_in_deploy_is_counted() {
    let files = deploy_files();
    let listed: Vec<String> = EXPECTED.iter().map(|(f, _)| f.to_string()).collect();
    assert_eq!(files, listed, "the files under deploy/ are not those EXPECTED lists");
    for (rel, want) in EXPECTED {
        let got: Vec<String> = commands(rel).iter().map(|f| f.subcommand().to_string()).collect();
        assert_eq!(got, *want, "the semoe command lines of deploy/{rel}");
    }
}

#[test]
fn flags_in_deploy_files_are_accepted() {
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = 0;
    for (rel, _) in EXPECTED {
        for found in commands(rel) {
            let sub = found.subcommand().to_string();
            let text = help.entry(sub.clone()).or_insert_with(|| {
                let out = Command::new(SEMOE)
                    .args([sub.as_str(), "--help"])
                    .output()
                    .expect("run semoe --help");
                assert!(out.status.success(), "{}: `semoe {sub} --help` failed", found.place);
                String::from_utf8_lossy(&out.stdout).into_owned()
            });
            for word in found.words.iter().filter(|w| w.starts_with("--")) {
                let flag = word.split('=').next().expect("a flag");
                let known = text.match_indices(flag).any(|(at, _)| {
                    let next = text[at + flag.len()..].chars().next();
                    !matches!(next, Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_')
                });
                assert!(known, "{}: `semoe {sub} --help` does not list {flag}", found.place);
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 15,
        "only {checked} flags found: the command lines were not found"
    );
}

#[test]
fn kubernetes_example_trains_on_loopback() {
    let dir = TempDir::new("deploy-kubernetes");
    let readme = commands("kubernetes/README.md");
    let coordinator = commands("kubernetes/coordinator.yaml");
    let workers = commands("kubernetes/workers.yaml");
    let (ticket, train, worker) = (
        the(&readme, "ticket"),
        the(&coordinator, "train"),
        the(&workers, "worker"),
    );

    // The manifests agree: the workers dial the coordinator's Service on the port it listens on,
    // and there are as many workers as the coordinator waits for.
    let join = worker.value("--join").expect("the workers' --join");
    let (service, port) = join.rsplit_once(':').expect("--join HOST:PORT");
    let yaml = std::fs::read_to_string(deploy_dir().join("kubernetes/coordinator.yaml")).expect("coordinator.yaml");
    assert!(
        yaml.contains(&format!("name: {service}\n")),
        "no Service {service} in coordinator.yaml"
    );
    assert!(
        yaml.contains(&format!("port: {port}\n")),
        "the Service does not expose port {port}"
    );
    assert!(yaml.contains("protocol: UDP"), "QUIC needs UDP");
    let listen = train.value("--listen").expect("the coordinator's --listen");
    assert!(
        listen.ends_with(&format!(":{port}")),
        "--listen {listen} vs --join {join}"
    );
    let replicas = number_after("kubernetes/workers.yaml", "replicas:");
    let min: usize = train
        .value("--min-workers")
        .expect("--min-workers")
        .parse()
        .expect("a number");
    assert_eq!(
        replicas, min,
        "the worker Deployment's replicas and the coordinator's --min-workers"
    );

    // The identity the Secret is made from, made by the README's own command line (its --out is
    // relative: it lands in the test's directory). The Secret's mount stands for it.
    let identity = dir.path().join(ticket.value("--out").expect("--out"));
    let mut local = Local {
        vars: BTreeMap::from([("POD_IP", "127.0.0.1".to_string()), ("RESUME", String::new())]),
        paths: vec![("/etc/semoe", identity.clone()), ("/runs", dir.path().join("runs"))],
        port: Some(0),
        join: None,
    };
    spawn(dir.path(), "ticket", &local.args(ticket)).success(LIMIT);
    assert!(identity.join("job.identity").is_file() && identity.join("join.ticket").is_file());
    // The coordinator listens on a port the OS chooses (port 0); the workers' --join dials it.
    train_with_workers(dir.path(), &mut local, train, worker, replicas);
}

#[test]
fn slurm_script_trains_on_loopback() {
    let dir = TempDir::new("deploy-slurm");
    let script = commands("slurm/semoe.sbatch");
    let (ticket, train, worker) = (the(&script, "ticket"), the(&script, "train"), the(&script, "worker"));
    assert!(
        worker.value("--join").is_none(),
        "the Slurm workers dial the ticket's address"
    );
    let nodes = number_after("slurm/semoe.sbatch", "#SBATCH --nodes=");

    // The script's variables on one machine: the shared file system is the test's directory, the
    // first node is 127.0.0.1, and the port one the OS chose (the ticket is made before the
    // coordinator listens, as in the script).
    let port = free_udp_port();
    let mut local = Local {
        vars: BTreeMap::from([
            ("JOB_DIR", dir.path().join("job").to_string_lossy().into_owned()),
            ("PORT", port.to_string()),
            ("COORD_IP", "127.0.0.1".to_string()),
            ("SLURM_JOB_NUM_NODES", nodes.to_string()),
        ]),
        paths: Vec::new(),
        port: Some(port),
        join: None,
    };
    spawn(dir.path(), "ticket", &local.args(ticket)).success(LIMIT);
    let given = JoinTicket::read(&dir.path().join("job/identity/join.ticket")).expect("the script's ticket");
    assert_eq!(given.addr.to_string(), format!("127.0.0.1:{port}"));
    train_with_workers(dir.path(), &mut local, train, worker, nodes);
    // The run directory's copy of the identity's long-lived token goes with the run; the
    // identity's own ticket stays for the next one.
    assert!(
        !dir.path().join("job/run/join.ticket").exists(),
        "the run directory keeps a ticket that admits to later runs"
    );
    assert!(dir.path().join("job/identity/join.ticket").is_file());
}
