//! The coordinator's side of the control plane: the QUIC endpoint workers join, the join
//! handshake (token, protocol and binary version, configuration, corpus digest, kernel
//! fingerprint), and the membership list that epochs are formed from. It changes nothing by
//! itself: `elastic::runtime` reads it at step boundaries.

use super::fingerprint::{self, KernelFingerprint};
use super::protocol::{self, Answer, Hello, Notice, Ready};
use crate::config::{resume_differences, TrainConfig};
use crate::error::{Error, Result};
use crate::net::quic::{self, JobIdentity, JoinTicket};
use crate::telemetry::metrics as names;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The job identity file in a `train.identity` directory.
pub const IDENTITY_FILE: &str = "job.identity";
/// The join ticket in a run directory or a `train.identity` directory.
pub const TICKET_FILE: &str = "join.ticket";

/// Make a job identity ahead of a run: `dir/job.identity` (certificate and key) and
/// `dir/join.ticket` (the address workers dial, a fresh token, the certificate's fingerprint).
pub fn make_identity(dir: &Path, addr: SocketAddr) -> Result<JoinTicket> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create the identity directory", dir, e))?;
    let identity = JobIdentity::generate()?;
    identity.write(&dir.join(IDENTITY_FILE))?;
    let ticket = JoinTicket::new(addr, &identity);
    ticket.write(&dir.join(TICKET_FILE))?;
    Ok(ticket)
}

/// How long an evicted member's control connection stays open after it is marked gone (to read
/// the notices already on their way).
const EVICTION_GRACE: Duration = Duration::from_millis(500);

/// Where a member stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Admitted; it takes part from the next epoch.
    Waiting,
    /// Part of the current epoch.
    Active,
    /// Asked to leave; dismissed at the next step boundary, once its state moved.
    Leaving,
    /// No longer a member, and why (its connection closed, it was evicted, it left).
    Gone(String),
}

/// One worker process that joined.
#[derive(Clone, Debug)]
pub struct Member {
    /// Member number, unique within the run (the order of joining).
    pub id: u64,
    /// `host:pid` of the process.
    pub name: String,
    /// The control connection.
    pub conn: quinn::Connection,
    /// Its data plane's address.
    pub data_addr: SocketAddr,
    /// Where it stands.
    pub status: Status,
}

#[derive(Default)]
struct Book {
    next_id: u64,
    /// The members not gone (waiting, active or leaving).
    members: BTreeMap<u64, Member>,
    /// What is kept of the newest [`DEPARTED_KEPT`] members that are gone: a long elastic run
    /// with churn must not keep every member it ever had, nor its QUIC connection's state.
    departed: BTreeMap<u64, Departed>,
    /// Member ids of each worker index of an epoch (to name the peer of a worker's notice).
    epochs: BTreeMap<u64, Vec<u64>>,
    /// The link faults of a chaos run that fired, as the workers told them.
    link_firings: Vec<LinkFiring>,
    /// Per epoch, the first link between two members reported lost ([`Notice::PeerLost`]): both
    /// may still be members, but that epoch cannot run a step any more.
    links_lost: BTreeMap<u64, (std::time::Instant, String)>,
}

/// The epochs whose notices the book still resolves.
const EPOCHS_KEPT: usize = 8;

/// The gone members the book still answers for (by id and by process name): far more than an
/// epoch has, so the runtime still reads why each member of an ending epoch went.
const DEPARTED_KEPT: usize = 4096;

/// A member that is gone: its name and why (its connection handle is let go).
#[derive(Clone, Debug)]
struct Departed {
    name: String,
    reason: String,
}

impl Book {
    /// Where member `id` stands (`None`: never admitted, or gone long ago).
    fn status(&self, id: u64) -> Option<Status> {
        match self.members.get(&id) {
            Some(m) => Some(m.status.clone()),
            None => self.departed.get(&id).map(|d| Status::Gone(d.reason.clone())),
        }
    }

    /// The member of process `name`, and where it stands (a gone one too, while kept).
    fn find_by_name(&self, name: &str) -> Option<(u64, Status)> {
        if let Some(m) = self.members.values().find(|m| m.name == name) {
            return Some((m.id, m.status.clone()));
        }
        let (id, d) = self.departed.iter().rev().find(|(_, d)| d.name == name)?;
        Some((*id, Status::Gone(d.reason.clone())))
    }

    /// Member `id` is gone for `reason`: it leaves the members (its connection, to close, is
    /// returned) and is kept among the departed. `None`: it was not a member (or already gone).
    fn depart(&mut self, id: u64, reason: String) -> Option<Member> {
        let member = self.members.remove(&id)?;
        self.departed.insert(
            id,
            Departed {
                name: member.name.clone(),
                reason,
            },
        );
        while self.departed.len() > DEPARTED_KEPT {
            self.departed.pop_first();
        }
        Some(member)
    }

    /// See [`Cluster::begin_epoch`]. The newest [`EPOCHS_KEPT`] epochs are kept, with their lost
    /// links.
    fn begin_epoch(&mut self, epoch: u64, members: Vec<u64>) {
        self.epochs.insert(epoch, members);
        self.links_lost.remove(&epoch);
        while self.epochs.len() > EPOCHS_KEPT {
            self.epochs.pop_first();
        }
        let oldest = self.epochs.keys().next().copied().unwrap_or(epoch);
        self.links_lost.retain(|&e, _| e >= oldest);
    }

    /// Member `reporter` lost its link to worker `peer` of `epoch`: kept for the runtime, which
    /// forms the epoch again (which connects anew); only for epochs it knows (a later one would
    /// be a lie), from a member of that epoch about a worker of it (anyone else's report would
    /// make the run form epochs again for nothing, and end it after a few), and the first report
    /// of each (bounded). Whether it was kept.
    fn link_lost(&mut self, reporter: u64, peer: u32, epoch: u64, detail: &str) -> bool {
        let believed = self
            .epochs
            .get(&epoch)
            .is_some_and(|ids| ids.contains(&reporter) && (peer as usize) < ids.len());
        if believed {
            self.links_lost.entry(epoch).or_insert_with(|| {
                let why = format!("member {reporter} lost its link to worker {peer}: {detail}");
                (std::time::Instant::now(), why)
            });
        }
        believed
    }
}

/// A link fault of a chaos run that fired in a worker's transport ([`Notice::LinkFault`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LinkFiring {
    /// The member that told it (the fault's sender, or an end of a partition).
    pub member: u64,
    /// The fault's index in the chaos run's plan.
    pub index: u32,
    /// The epoch.
    pub epoch: u64,
    /// The step of the request it hit.
    pub step: u64,
    /// What it hit, when the fault does not say it all.
    pub detail: String,
    /// When the coordinator heard of it.
    pub at: std::time::Instant,
}

/// What must match between the coordinator and a joining worker.
struct Expect {
    config: TrainConfig,
    config_toml: String,
    corpus_sha256: String,
    kernel: KernelFingerprint,
    identity: Arc<JobIdentity>,
    ticket: JoinTicket,
}

/// The control plane of a run.
pub struct Cluster {
    endpoint: quinn::Endpoint,
    ticket: JoinTicket,
    book: Arc<Mutex<Book>>,
    accept: tokio::task::JoinHandle<()>,
}

/// Marks gone at once the member whose worker process, started by this coordinator on this
/// machine, ended abnormally (`semoe train --processes N`): the parent learns of a SIGKILL the
/// moment it happens, where the control connection would take its idle timeout.
#[derive(Clone)]
pub struct ExitWatch {
    book: Arc<Mutex<Book>>,
    host: String,
}

impl ExitWatch {
    /// The link faults that fired so far, in the order the coordinator heard of them.
    pub fn link_firings(&self) -> Vec<LinkFiring> {
        self.book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .link_firings
            .clone()
    }

    /// The member that process `pid` of this machine is, and where it stands (`None`: it has not
    /// joined). A chaos run over processes reads it to say when and how a fault was noticed.
    pub fn member_of(&self, pid: u32) -> Option<(u64, Status)> {
        let name = format!("{}:{pid}", self.host);
        self.book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .find_by_name(&name)
    }

    /// Process `pid` of this machine ended (`how`); true when it was a member not already gone.
    pub fn process_exited(&self, pid: u32, how: &str) -> bool {
        let name = format!("{}:{pid}", self.host);
        let id = {
            let book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
            match book.members.values().find(|m| m.name == name) {
                Some(m) => m.id,
                None => return false,
            }
        };
        let reason = format!("its process ended ({how})");
        let Some(conn) = mark_gone(&self.book, id, &reason) else {
            return false;
        };
        crate::say!("semoe: lost member {id} ({name}): {reason}");
        metrics::counter!(names::MEMBERSHIP, "kind" => "crash").increment(1);
        conn.close(3u32.into(), b"the worker process ended");
        true
    }
}

/// Mark member `id` gone for `reason`: its control connection (to close) if it was not gone yet.
fn mark_gone(book: &Mutex<Book>, id: u64, reason: &str) -> Option<quinn::Connection> {
    let mut book = book.lock().unwrap_or_else(PoisonError::into_inner);
    book.depart(id, reason.to_string()).map(|m| m.conn)
}

/// The run's job identity and ticket token: `config.train.identity`'s (checked to belong
/// together), or a new identity and no token (one is made with the ticket).
pub fn job_identity(config: &TrainConfig) -> Result<(JobIdentity, Option<String>)> {
    let Some(dir) = &config.train.identity else {
        return Ok((JobIdentity::generate()?, None));
    };
    let identity = JobIdentity::read(&dir.join(IDENTITY_FILE))?;
    let given = JoinTicket::read(&dir.join(TICKET_FILE))?;
    if given.cert_sha256 != identity.fingerprint() {
        return Err(Error::config(format!(
            "{} pins another certificate than {} holds",
            dir.join(TICKET_FILE).display(),
            dir.join(IDENTITY_FILE).display()
        )));
    }
    Ok((identity, Some(given.token)))
}

impl Cluster {
    /// An [`ExitWatch`] over this cluster's members.
    pub fn exit_watch(&self) -> ExitWatch {
        ExitWatch {
            book: self.book.clone(),
            host: super::worker::hostname(),
        }
    }

    /// Listen on `listen` (port 0: one the OS chooses), write the join ticket to `ticket_path`
    /// (mode 0600) and admit workers whose handshake matches `config` and `corpus_sha256`. The job
    /// identity and token are `config.train.identity`'s when set (see [`IDENTITY_FILE`]), else new.
    pub fn start(listen: SocketAddr, ticket_path: &Path, config: &TrainConfig, corpus_sha256: &str) -> Result<Cluster> {
        names::register_membership();
        let (identity, token) = job_identity(config)?;
        let identity = Arc::new(identity);
        let pin = identity.fingerprint();
        let endpoint = quic::endpoint(listen, &identity, &pin)?;
        let addr = endpoint
            .local_addr()
            .map_err(|e| Error::runtime(format!("the control endpoint has no address: {e}")))?;
        let mut ticket = JoinTicket::new(addr, &identity);
        if let Some(token) = token {
            ticket.token = token;
        }
        ticket.write(ticket_path)?;
        let expect = Arc::new(Expect {
            config: config.clone(),
            config_toml: config.to_toml()?,
            corpus_sha256: corpus_sha256.to_string(),
            kernel: fingerprint::compute()?,
            identity,
            ticket: JoinTicket {
                addr,
                token: ticket.token.clone(),
                cert_sha256: ticket.cert_sha256.clone(),
            },
        });
        let book = Arc::new(Mutex::new(Book::default()));
        let accept = tokio::spawn(accept_loop(endpoint.clone(), expect, book.clone()));
        Ok(Cluster {
            endpoint,
            ticket,
            book,
            accept,
        })
    }

    /// The address workers join (the ticket's).
    pub fn addr(&self) -> SocketAddr {
        self.ticket.addr
    }

    /// A copy of every member not gone (waiting, active or leaving), in member order.
    pub fn members(&self) -> Vec<Member> {
        self.lock().members.values().cloned().collect()
    }

    /// The first link loss between members reported in `epoch`, and when it was heard of
    /// (`None`: none).
    pub fn link_lost(&self, epoch: u64) -> Option<(std::time::Instant, String)> {
        self.lock().links_lost.get(&epoch).cloned()
    }

    /// The member `id`'s status (`None`: never admitted, or gone before the newest 4,096 members
    /// that went).
    pub fn status(&self, id: u64) -> Option<Status> {
        self.lock().status(id)
    }

    /// Set member `id`'s status (a member already gone stays gone; one set gone leaves the
    /// members).
    pub fn set_status(&self, id: u64, status: Status) {
        let mut book = self.lock();
        match status {
            Status::Gone(reason) => {
                book.depart(id, reason);
            }
            status => {
                if let Some(m) = book.members.get_mut(&id) {
                    m.status = status;
                }
            }
        }
    }

    /// Mark member `id` active if it is waiting (a member that asked to leave meanwhile stays
    /// leaving).
    pub fn activate(&self, id: u64) {
        if let Some(m) = self.lock().members.get_mut(&id) {
            if m.status == Status::Waiting {
                m.status = Status::Active;
            }
        }
    }

    /// Remove member `id` for `reason` and close its connection (a fenced worker cannot commit:
    /// every command reaches it on this connection).
    pub fn evict(&self, id: u64, reason: &str) {
        if let Some(conn) = mark_gone(&self.book, id, reason) {
            conn.close(2u32.into(), reason.as_bytes());
        }
    }

    /// Record which member is which worker index in `epoch`, before it is formed: an attempt
    /// to form it again (the same number) starts with no lost link on record, as it connects
    /// its members anew.
    pub fn begin_epoch(&self, epoch: u64, members: Vec<u64>) {
        self.lock().begin_epoch(epoch, members);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stop accepting and close every connection.
    pub fn close(&self) {
        self.accept.abort();
        self.endpoint.close(0u32.into(), b"the run is over");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.close();
    }
}

/// The most link-fault firings the coordinator keeps for a chaos run's report.
const MAX_LINK_FIRINGS: usize = 1 << 16;

/// The most bytes of a member's notice detail the coordinator keeps or prints (a member may send
/// notices without end: 64 K firings of 1 KiB at most).
const MAX_NOTICE_DETAIL: usize = 1024;

/// `detail`, cut to [`MAX_NOTICE_DETAIL`] bytes.
fn clipped(detail: String) -> String {
    crate::net::wire::clip_to(detail, MAX_NOTICE_DETAIL)
}

/// Joins whose handshake may run at once (each is bounded in time, so a flood of connections that
/// never say hello cannot hold the coordinator's memory).
const HANDSHAKES: usize = 64;

/// Connections that may wait for a handshake place; more are refused at once. Each may hold its
/// pre-token flow-control window (1 MiB) while it waits: with the places, 128 MiB at most.
const HANDSHAKE_QUEUE: usize = 64;

/// How long a connection waits for a handshake place before it is refused: a burst of joiners
/// (a Deployment's replicas starting together) queues, within the minute a joiner waits for its
/// answer.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(45);

/// The most handshake places, and the most places in the queue, that connections from one IP
/// address (an IPv6 /64) other than this machine's may hold at once: anyone may open a connection
/// to the coordinator (a joiner holds no certificate), and one host that opens many and never
/// says hello must leave the other half to the joiners elsewhere. (A connection from an address
/// it cannot receive at never gets this far: it must answer a QUIC Retry first.)
const PER_SOURCE: usize = HANDSHAKES / 2;

/// How long the TLS handshake of a connection may take: a client that starts one and never
/// finishes it (keeping it alive with pings) must not hold a place in the queue.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// How long one frame of the handshake may take to send: a peer that does not take it (its
/// receive window closed) must not hold a handshake place.
const HANDSHAKE_WRITE: Duration = Duration::from_secs(10);

async fn accept_loop(endpoint: quinn::Endpoint, expect: Arc<Expect>, book: Arc<Mutex<Book>>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    let queue = Arc::new(tokio::sync::Semaphore::new(HANDSHAKE_QUEUE));
    let sources = Arc::new(Sources::default());
    while let Some(incoming) = endpoint.accept().await {
        // A Retry first (stateless: no task, no state kept): the client proves it receives at its
        // address, so that the places an address holds are counted against an address that is
        // real, not against addresses a flood of spoofed packets names.
        if !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            continue;
        }
        // Connections from this machine (the worker processes it starts, all from one address)
        // are not capped per address: only strangers elsewhere are.
        let remote = incoming.remote_address().ip();
        let this_machine = remote.is_loopback() || incoming.local_ip() == Some(remote);
        let source = if this_machine {
            None
        } else {
            match sources.enter(source_key(remote)) {
                Some(entry) => Some(entry),
                None => {
                    incoming.refuse();
                    continue;
                }
            }
        };
        let Ok(place) = queue.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let (handshakes, expect, book) = (handshakes.clone(), expect.clone(), book.clone());
        tokio::spawn(async move {
            // The connection is accepted at once, within TLS_HANDSHAKE (dropped unfinished, it
            // closes); it stays alive while it waits for a handshake place (one of its address's
            // own, then one of all), then its hello is read.
            let Ok(Ok(conn)) = tokio::time::timeout(TLS_HANDSHAKE, incoming).await else {
                return;
            };
            let peer = conn.remote_address();
            // Which wait ran out: its address's places, or all of them.
            let mut own_held = false;
            let places = async {
                let own = match &source {
                    Some(entry) => Some(entry.places().acquire_owned().await?),
                    None => None,
                };
                own_held = true;
                let any = handshakes.acquire_owned().await?;
                Ok::<_, tokio::sync::AcquireError>((own, any))
            };
            let permit = match tokio::time::timeout(HANDSHAKE_WAIT, places).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    metrics::counter!(names::MEMBERSHIP, "kind" => "refused").increment(1);
                    let (count, whose) = if own_held {
                        (HANDSHAKES, "in all")
                    } else {
                        (PER_SOURCE, "from its address")
                    };
                    crate::say!(
                        "semoe: refused a worker from {peer}: {count} joins {whose} were under way for {} s",
                        HANDSHAKE_WAIT.as_secs()
                    );
                    conn.close(1u32.into(), b"too many joins at once");
                    return;
                }
            };
            drop(place);
            // Counted as its address's until its task ends.
            let _counted = source.map(SourceEntry::placed);
            match admit(&conn, &expect, &book, permit).await {
                Ok(()) => {}
                Err(e) => {
                    metrics::counter!(names::MEMBERSHIP, "kind" => "refused").increment(1);
                    crate::say!("semoe: refused a worker from {peer}: {e}");
                    conn.close(1u32.into(), b"refused");
                }
            }
        });
    }
}

/// The key a connection from `ip` is counted under: the address, or for IPv6 its /64 (one host
/// commonly holds a whole /64).
fn source_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            std::net::IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

/// The connections of each source address waiting for a handshake, and the handshake places of
/// each (see [`PER_SOURCE`]). An address's entry goes with its last connection.
#[derive(Default)]
struct Sources {
    by_ip: Mutex<std::collections::HashMap<std::net::IpAddr, Source>>,
}

struct Source {
    /// Its connections waiting for a place.
    waiting: usize,
    /// Its connections (waiting, in the handshake or admitted): the entry goes with the last.
    connections: usize,
    /// Its handshake places.
    places: Arc<tokio::sync::Semaphore>,
}

impl Sources {
    /// A place in the queue for a connection from `ip`; `None` when that address holds
    /// [`PER_SOURCE`] of them already.
    fn enter(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<SourceEntry> {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(PoisonError::into_inner);
        let source = by_ip.entry(ip).or_insert_with(|| Source {
            waiting: 0,
            connections: 0,
            places: Arc::new(tokio::sync::Semaphore::new(PER_SOURCE)),
        });
        if source.waiting >= PER_SOURCE {
            return None;
        }
        source.waiting += 1;
        source.connections += 1;
        Some(SourceEntry {
            sources: self.clone(),
            ip,
            places: source.places.clone(),
            waiting: true,
        })
    }

    /// Connections of `ip` waiting, and all of them (for tests).
    #[cfg(test)]
    fn counts(&self, ip: std::net::IpAddr) -> Option<(usize, usize)> {
        let by_ip = self.by_ip.lock().unwrap_or_else(PoisonError::into_inner);
        by_ip.get(&ip).map(|s| (s.waiting, s.connections))
    }
}

/// One connection's part of its address's counts, given back when it is dropped.
struct SourceEntry {
    sources: Arc<Sources>,
    ip: std::net::IpAddr,
    places: Arc<tokio::sync::Semaphore>,
    waiting: bool,
}

impl SourceEntry {
    /// The handshake places of its address.
    fn places(&self) -> Arc<tokio::sync::Semaphore> {
        self.places.clone()
    }

    /// It holds a handshake place now: no longer waiting.
    fn placed(mut self) -> SourceEntry {
        self.leave_queue();
        self
    }

    fn leave_queue(&mut self) {
        if std::mem::take(&mut self.waiting) {
            let mut by_ip = self.sources.by_ip.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = by_ip.get_mut(&self.ip) {
                s.waiting -= 1;
            }
        }
    }
}

impl Drop for SourceEntry {
    fn drop(&mut self) {
        self.leave_queue();
        let mut by_ip = self.sources.by_ip.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = by_ip.get_mut(&self.ip) {
            s.connections -= 1;
            if s.connections == 0 {
                by_ip.remove(&self.ip);
            }
        }
    }
}

/// The join handshake, then the member's notices until its connection ends.
async fn admit(
    conn: &quinn::Connection,
    expect: &Expect,
    book: &Arc<Mutex<Book>>,
    // Its address's handshake place (none from this machine) and one of all, given back once it
    // is admitted.
    handshake: (
        Option<tokio::sync::OwnedSemaphorePermit>,
        tokio::sync::OwnedSemaphorePermit,
    ),
) -> Result<()> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(5), conn.accept_bi())
        .await
        .map_err(|_| Error::runtime("no hello within 5 s"))?
        .map_err(|e| Error::runtime(format!("connection closed before the hello: {e}")))?;
    // A hello carries a token, names and at most a config file: 64 KiB is plenty, and nothing
    // larger is read from a peer that has not shown the token yet.
    let max = 64 << 10;
    let hello_bytes = tokio::time::timeout(Duration::from_secs(5), quic::read_frame(&mut recv, max, "a hello"))
        .await
        .map_err(|_| Error::runtime("no hello within 5 s"))??
        .ok_or_else(|| Error::runtime("the stream ended before the hello"))?;
    let hello: Hello = protocol::decode(&hello_bytes, "a hello")?;
    if let Err(reason) = check_hello(&hello, expect) {
        return refuse(&mut send, conn, reason).await;
    }
    quic::authenticated(conn);
    let offer = Answer::Offer {
        config: expect.config_toml.clone(),
    };
    write_within(&mut send, &protocol::encode(&offer)?, "the offer").await?;
    let ready_bytes = tokio::time::timeout(Duration::from_secs(120), quic::read_frame(&mut recv, max, "a ready"))
        .await
        .map_err(|_| Error::runtime(format!("{} sent no ready within 120 s", hello.name)))??
        .ok_or_else(|| Error::runtime("the stream ended before the ready"))?;
    let ready: Ready = protocol::decode(&ready_bytes, "a ready")?;
    let data_addr = match check_ready(&ready, expect) {
        // A worker that does not know its own address is reached where its connection came from.
        Ok(a) if a.ip().is_unspecified() => SocketAddr::new(conn.remote_address().ip(), a.port()),
        Ok(a) => a,
        Err(reason) => return refuse(&mut send, conn, reason).await,
    };
    let id = {
        let mut b = book.lock().unwrap_or_else(PoisonError::into_inner);
        b.next_id += 1;
        let id = b.next_id;
        b.members.insert(
            id,
            Member {
                id,
                name: hello.name.clone(),
                conn: conn.clone(),
                data_addr,
                status: Status::Waiting,
            },
        );
        id
    };
    let admitted = Answer::Admitted {
        member: id,
        cert: expect.identity.cert_der.clone(),
        key: expect.identity.key_der.clone(),
    };
    let sent = match protocol::encode(&admitted) {
        Ok(bytes) => write_within(&mut send, &bytes, "the admission").await,
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        // Never admitted after all: it must not stay in the book as a member that is joining.
        let mut b = book.lock().unwrap_or_else(PoisonError::into_inner);
        b.depart(id, format!("its admission could not be sent: {e}"));
        return Err(e);
    }
    drop(handshake);
    metrics::counter!(names::MEMBERSHIP, "kind" => "join").increment(1);
    crate::say!(
        "semoe: worker {} joined as member {id} (data plane {data_addr})",
        hello.name
    );
    // The session stream now carries the worker's notices, until the connection ends.
    let closed = loop {
        let frame = tokio::select! {
            f = quic::read_frame(&mut recv, max, "a notice") => f,
            e = conn.closed() => break e.to_string(),
        };
        // A member whose session cannot go on is closed too, so that its process is fenced (it
        // would otherwise idle, still connected, until the run ends).
        let notice: Notice = match frame.and_then(|f| f.ok_or_else(|| Error::runtime("the session stream ended"))) {
            Ok(bytes) => match protocol::decode(&bytes, "a notice") {
                Ok(n) => n,
                Err(e) => {
                    let reason = format!("malformed notice: {e}");
                    conn.close(3u32.into(), reason.as_bytes());
                    break reason;
                }
            },
            Err(e) => {
                let reason = e.to_string();
                conn.close(3u32.into(), reason.as_bytes());
                break reason;
            }
        };
        let mut b = book.lock().unwrap_or_else(PoisonError::into_inner);
        match notice {
            Notice::Leaving => {
                if let Some(m) = b.members.get_mut(&id) {
                    if matches!(m.status, Status::Active | Status::Waiting) {
                        m.status = Status::Leaving;
                        crate::say!("semoe: member {id} ({}) asked to leave", hello.name);
                    }
                }
            }
            Notice::PeerEvicted { peer, epoch, detail } => {
                let detail = clipped(detail);
                // Only a member of that epoch (joining, active or leaving; not gone) speaks for its
                // peers in it.
                let reporter_in_epoch =
                    b.epochs.get(&epoch).is_some_and(|ids| ids.contains(&id)) && b.members.contains_key(&id);
                let culprit = b.epochs.get(&epoch).and_then(|ids| ids.get(peer as usize)).copied();
                let reason = format!("evicted: member {id} reports it sent malformed data ({detail})");
                if let Some(m) = culprit
                    .filter(|_| reporter_in_epoch)
                    .and_then(|c| b.depart(c, reason.clone()))
                {
                    crate::say!("semoe: member {} ({}) {reason}", m.id, m.name);
                    // Gone at once (the runtime abandons the step); its connection closes a moment
                    // later, so that the notices it sent before its bad frame arrived (a chaos run's
                    // link fault firing: told before the damaged frame left) are still read.
                    let conn = m.conn;
                    tokio::spawn(async move {
                        tokio::time::sleep(EVICTION_GRACE).await;
                        conn.close(3u32.into(), reason.as_bytes());
                    });
                    metrics::counter!(names::MEMBERSHIP, "kind" => "evicted").increment(1);
                }
            }
            Notice::LinkFault {
                index,
                epoch,
                step,
                detail,
            } => {
                // A chaos run fires a handful; a member sending them without end is not kept.
                if b.link_firings.len() < MAX_LINK_FIRINGS {
                    b.link_firings.push(LinkFiring {
                        member: id,
                        index,
                        epoch,
                        step,
                        detail: clipped(detail),
                        at: std::time::Instant::now(),
                    });
                }
            }
            Notice::PeerLost { peer, epoch, detail } => {
                let detail = clipped(detail);
                if b.link_lost(id, peer, epoch, &detail) {
                    crate::say!("semoe: member {id} lost its link to worker {peer} of epoch {epoch}: {detail}");
                } else {
                    crate::say!(
                        "semoe: ignored member {id}'s report of a lost link to worker {peer} of epoch {epoch}: \
                         not a member and a worker of that epoch, or an epoch no longer kept"
                    );
                }
            }
        }
    };
    let mut b = book.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(m) = b.depart(id, format!("connection lost: {closed}")) {
        crate::say!("semoe: lost member {id} ({}): {closed}", m.name);
        metrics::counter!(names::MEMBERSHIP, "kind" => "crash").increment(1);
    }
    Ok(())
}

/// Send one frame of the handshake, within [`HANDSHAKE_WRITE`].
async fn write_within(send: &mut quinn::SendStream, bytes: &[u8], what: &str) -> Result<()> {
    tokio::time::timeout(HANDSHAKE_WRITE, quic::write_frame(send, bytes))
        .await
        .map_err(|_| Error::runtime(format!("{what} was not taken within {} s", HANDSHAKE_WRITE.as_secs())))?
}

async fn refuse(send: &mut quinn::SendStream, conn: &quinn::Connection, reason: String) -> Result<()> {
    let refused = protocol::encode(&Answer::Refused { reason: reason.clone() })?;
    write_within(send, &refused, "the refusal").await?;
    let _ = send.finish();
    // Let the worker read the reason before the connection goes.
    let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
    Err(Error::runtime(reason))
}

fn check_hello(hello: &Hello, expect: &Expect) -> std::result::Result<(), String> {
    if !expect.ticket.token_matches(&hello.token) {
        return Err("wrong token (use the ticket this run wrote)".into());
    }
    if hello.protocol != protocol::PROTOCOL {
        return Err(format!(
            "protocol version differs (worker {}, coordinator {})",
            hello.protocol,
            protocol::PROTOCOL
        ));
    }
    if hello.version != protocol::VERSION {
        return Err(format!(
            "semoe version differs (worker {}, coordinator {}): every process must run the same build",
            hello.version,
            protocol::VERSION
        ));
    }
    if let Some(toml_text) = &hello.config {
        let theirs: TrainConfig =
            toml::from_str(toml_text).map_err(|e| format!("the worker's configuration does not parse: {e}"))?;
        let (_, refused) = resume_differences(&expect.config, &theirs).map_err(|e| e.to_string())?;
        let steps = (theirs.train.steps != expect.config.train.steps).then(|| {
            format!(
                "train.steps (run: {}, worker: {})",
                expect.config.train.steps, theirs.train.steps
            )
        });
        let fields: Vec<String> = refused.into_iter().chain(steps).collect();
        if !fields.is_empty() {
            return Err(format!(
                "configuration differs in fields that change the bits: {}",
                fields.join(", ")
            ));
        }
    }
    Ok(())
}

fn check_ready(ready: &Ready, expect: &Expect) -> std::result::Result<SocketAddr, String> {
    if ready.corpus_sha256 != expect.corpus_sha256 {
        return Err(format!(
            "corpus differs: the worker's text has SHA-256 {}, the run's {} (point --data at the same text)",
            ready.corpus_sha256, expect.corpus_sha256
        ));
    }
    if ready.kernel.digest != expect.kernel.digest {
        return Err(format!(
            "kernel fingerprint differs (worker: {}, digest {}; coordinator: {}, digest {}): its matrix kernels \
             compute different bits, so it cannot join this run",
            ready.kernel.isa,
            ready.kernel.digest.chars().take(16).collect::<String>(),
            expect.kernel.isa,
            expect.kernel.digest.chars().take(16).collect::<String>()
        ));
    }
    ready
        .data_addr
        .parse::<SocketAddr>()
        .map_err(|e| format!("data-plane address {:?}: {e}", ready.data_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_lost_while_an_epoch_forms_is_kept_and_a_new_attempt_starts_clean() {
        let mut book = Book::default();
        // Reported before the coordinator knows the epoch: not believed.
        book.link_lost(1, 1, 4, "reset");
        assert!(book.links_lost.is_empty());
        // Known from before its setups go out, so a loss during the forming counts.
        book.begin_epoch(4, vec![1, 2]);
        // Not a member of it, or about a worker it does not have: not believed either.
        assert!(!book.link_lost(3, 0, 4, "a stranger's report"));
        assert!(!book.link_lost(1, 2, 4, "worker 2 of two"));
        assert!(book.links_lost.is_empty());
        assert!(book.link_lost(1, 1, 4, "reset"));
        book.link_lost(2, 0, 4, "reset as well");
        assert_eq!(book.links_lost.len(), 1, "one entry per epoch");
        let (_, why) = &book.links_lost[&4];
        assert_eq!(
            why, "member 1 lost its link to worker 1: reset",
            "the first report is kept"
        );
        // Formed again under the same number: its new connections have lost nothing yet.
        book.begin_epoch(4, vec![1, 3]);
        assert!(book.links_lost.is_empty());
        assert_eq!(book.epochs[&4], [1, 3]);
    }

    /// One address holds at most half of the queue and half of the handshake places; another
    /// address is not affected; an address's entry goes with its last connection.
    #[test]
    fn one_source_address_holds_half_of_the_places_at_most() {
        let sources = Arc::new(Sources::default());
        let (flood, joiner): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let v6 = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(v6("2001:db8::1"), v6("2001:db8::ffff:2"), "one /64 is one source");
        assert_ne!(v6("2001:db8::1"), v6("2001:db8:0:1::1"));
        assert_eq!(source_key(flood), flood);
        let mut waiting: Vec<SourceEntry> = (0..PER_SOURCE)
            .map(|_| sources.enter(flood).expect("within the address's share"))
            .collect();
        assert!(
            sources.enter(flood).is_none(),
            "the address's share of the queue is full"
        );
        let other = sources.enter(joiner).expect("another address is not affected");
        assert_eq!(sources.counts(flood), Some((PER_SOURCE, PER_SOURCE)));
        // Its own handshake places: PER_SOURCE of them, shared by its connections.
        let places = waiting[0].places();
        let held: Vec<_> = (0..PER_SOURCE)
            .map(|_| places.clone().try_acquire_owned().expect("a place"))
            .collect();
        assert!(
            places.clone().try_acquire_owned().is_err(),
            "the address's places are all held"
        );
        assert_eq!(other.places().available_permits(), PER_SOURCE, "not another address's");
        // Placed connections leave the queue (others of the address may wait again), and stay
        // counted until they end.
        let placed = waiting.pop().expect("one").placed();
        assert_eq!(sources.counts(flood), Some((PER_SOURCE - 1, PER_SOURCE)));
        let again = sources.enter(flood).expect("a queue place was given back");
        drop((held, placed, again, waiting));
        assert_eq!(
            sources.counts(flood),
            None,
            "the address's entry went with its last connection"
        );
        drop(other);
        assert!(sources.by_ip.lock().unwrap().is_empty());
    }

    #[test]
    fn the_book_keeps_the_newest_epochs_and_their_lost_links_only() {
        let mut book = Book::default();
        for epoch in 1..=20 {
            book.begin_epoch(epoch, vec![epoch, epoch + 1]);
            assert!(book.link_lost(epoch, 1, epoch, "gone"));
        }
        assert_eq!(book.epochs.len(), EPOCHS_KEPT);
        assert_eq!(book.epochs.keys().next(), Some(&(20 - EPOCHS_KEPT as u64 + 1)));
        assert_eq!(book.links_lost.len(), EPOCHS_KEPT);
        assert!(book.links_lost.keys().eq(book.epochs.keys()));
    }

    /// A live control connection over 127.0.0.1 (the book holds one per member).
    async fn connection() -> (quinn::Endpoint, quinn::Connection) {
        let identity = JobIdentity::generate().unwrap();
        let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let endpoint = quic::endpoint(localhost, &identity, &identity.fingerprint()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (client, server) = tokio::time::timeout(Duration::from_secs(10), async {
            let connecting = endpoint.connect(addr, quic::SERVER_NAME).unwrap();
            let incoming = endpoint.accept().await.unwrap();
            tokio::join!(connecting, incoming)
        })
        .await
        .expect("a connection within 10 s");
        drop(server.unwrap());
        (endpoint, client.unwrap())
    }

    #[tokio::test]
    async fn a_member_that_goes_leaves_the_members_and_only_the_newest_departed_are_kept() {
        let (_endpoint, conn) = connection().await;
        let mut book = Book::default();
        let admit = |book: &mut Book, id: u64| {
            book.members.insert(
                id,
                Member {
                    id,
                    name: format!("host:{id}"),
                    conn: conn.clone(),
                    data_addr: "127.0.0.1:9".parse().unwrap(),
                    status: Status::Active,
                },
            );
        };
        let churn = DEPARTED_KEPT as u64 + 10;
        for id in 1..=churn {
            admit(&mut book, id);
            let reason = if id % 2 == 0 { "left" } else { "connection lost" };
            assert_eq!(book.depart(id, reason.into()).map(|m| m.id), Some(id));
            assert!(book.depart(id, "again".into()).is_none(), "a member goes once");
        }
        admit(&mut book, churn + 1);
        assert_eq!(book.members.len(), 1, "only the member still there is held");
        assert_eq!(book.departed.len(), DEPARTED_KEPT);
        // The newest departed still answer with why they went, by id and by process name.
        assert_eq!(book.status(churn), Some(Status::Gone("left".into())));
        assert_eq!(
            book.find_by_name(&format!("host:{}", churn - 1)),
            Some((churn - 1, Status::Gone("connection lost".into())))
        );
        assert_eq!(book.status(churn + 1), Some(Status::Active));
        // The oldest are forgotten.
        assert_eq!(book.status(1), None);
        assert_eq!(book.find_by_name("host:1"), None);
    }
}
