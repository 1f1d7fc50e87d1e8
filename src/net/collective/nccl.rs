//! The NCCL-backed communicator (feature `cuda`, cudarc's NCCL bindings loaded at run time).
//!
//! An NCCL communicator must not leave the thread that uses it (cudarc's `Comm` is not `Send`, and
//! NCCL wants one thread per GPU and communicator), so each [`NcclCollective`] starts one OS thread
//! that binds the GPU's context, owns the raw communicator and a stream, and serves the
//! collectives sent to it over a channel; the handle itself is `Send` and implements
//! [`Collective`].
//!
//! - **Initialisation is non-blocking** (`ncclCommInitRankConfig` with `blocking = 0`): the thread
//!   polls `ncclCommGetAsyncError` until the communicator is ready, with the deadline and the abort
//!   flag checked on every poll, so a rank whose peers never arrive fails instead of hanging in
//!   `ncclCommInitRank`. cudarc's safe `Comm` only offers the blocking initialisation and hides its
//!   handle, so this module drives the raw `result`/`sys` calls itself.
//! - **Every collective is polled**: after `ncclGroupEnd` (which returns `ncclInProgress` on a
//!   non-blocking communicator) the thread polls the communicator's asynchronous error and a CUDA
//!   event recorded after the group, until both are done, the deadline passes or an abort is asked
//!   for; then it calls `ncclCommAbort` itself (on its own thread) and every later call fails at
//!   once.
//! - **Data moves as bytes** (`ncclUint8`), bit for bit. The buffers are host memory copied to and
//!   from the device around each group: the device-resident variant comes with the GPU backend.
//! - **Library checks without panics**: cudarc panics when libnccl is missing or lacks a symbol it
//!   looks up, so the library's presence is probed first and its version read (inside
//!   `catch_unwind`) before any other call; an NCCL older than [`MIN_NCCL`] is refused.
//!
//! None of this has run on a GPU yet (the development machines have none): see
//! docs/gpu-data-path.md for what is verified and what is not.

use super::{AbortHandle, Collective, CollectiveId, Group, Op, Rank};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Bytes of an NCCL unique id (what travels over the control plane to every rank).
pub const NCCL_ID_BYTES: usize = 128;

/// The oldest NCCL accepted (2.19.0): non-blocking initialisation and `ncclCommGetAsyncError` are
/// older, and the bindings' symbols that this module calls all exist there.
const MIN_NCCL: i32 = 21900;

/// How long the handle waits for its thread beyond the collective's deadline (the thread enforces
/// the deadline itself; this only guards against a driver call that never returns).
const HANDLE_MARGIN: Duration = Duration::from_secs(5);

fn cuda_error(detail: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda",
        detail: detail.into(),
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// Check that libnccl loads and is recent enough; answer its version code.
fn nccl_library() -> Result<i32> {
    // SAFETY: the probe dlopens each candidate name of the NCCL library and closes it again (no
    // symbol is called); a panic inside it is caught.
    let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err(cuda_error(
            "the NCCL library was not found (cudarc looks for libnccl.so: link libnccl.so.2 to that name \
             in a directory on LD_LIBRARY_PATH)",
        ));
    }
    let version = catch_unwind(nccl::get_nccl_version)
        .map_err(|p| cuda_error(format!("cannot read the NCCL version: {}", panic_text(p))))?
        .map_err(|e| cuda_error(format!("cannot read the NCCL version: {:?}", e.0)))?;
    if version < MIN_NCCL {
        return Err(cuda_error(format!(
            "NCCL {} is too old: semoe needs NCCL {} or newer",
            version_text(version),
            version_text(MIN_NCCL)
        )));
    }
    Ok(version)
}

/// `2.21.5` from `22105`.
fn version_text(code: i32) -> String {
    format!("{}.{}.{}", code / 10000, (code / 100) % 100, code % 100)
}

/// A new NCCL unique id, made by the rank that creates the communicator and sent to every other
/// rank over the control plane.
pub fn nccl_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
    nccl_library()?;
    let id = catch_unwind(nccl::get_uniqueid)
        .map_err(|p| cuda_error(format!("cannot create an NCCL unique id: {}", panic_text(p))))?
        .map_err(|e| cuda_error(format!("cannot create an NCCL unique id: {:?}", e.0)))?;
    Ok(id.internal.map(|c| c as u8))
}

/// The abort flag shared by a handle, its [`AbortHandle`]s and its thread.
#[derive(Default)]
struct AbortFlag {
    set: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl AbortFlag {
    fn abort(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        r.get_or_insert(reason);
        self.set.store(true, Ordering::SeqCst);
    }

    fn reason(&self) -> Option<String> {
        if !self.set.load(Ordering::SeqCst) {
            return None;
        }
        self.reason.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

type Reply<T> = mpsc::SyncSender<Result<T>>;

enum Command {
    Counts(CollectiveId, Vec<u64>, Reply<Vec<u64>>),
    Group(CollectiveId, Group, Reply<Vec<(Rank, Vec<u8>)>>),
}

/// One rank of an NCCL communicator of one membership epoch, owned by its own OS thread on GPU
/// `ordinal`. Dropping the handle ends the thread, which aborts the communicator.
pub struct NcclCollective {
    rank: Rank,
    world: usize,
    epoch: u64,
    deadline: Duration,
    next: u64,
    commands: mpsc::Sender<Command>,
    abort: Arc<AbortFlag>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl NcclCollective {
    /// Join the communicator of `epoch` as rank `rank` of `world` on GPU `ordinal`, with the unique
    /// id rank 0 made ([`nccl_unique_id`]). Every rank calls this at about the same time; the
    /// initialisation fails (never hangs) when the others do not arrive within `deadline`.
    pub fn new(
        ordinal: usize,
        rank: Rank,
        world: usize,
        epoch: u64,
        id: [u8; NCCL_ID_BYTES],
        deadline: Duration,
    ) -> Result<Self> {
        let what = format!("NCCL rank {rank} of {world} (epoch {epoch}) on GPU {ordinal}");
        if world == 0 || rank >= world || i32::try_from(world).is_err() {
            return Err(Error::config(format!(
                "{what}: the rank must be below the number of ranks"
            )));
        }
        nccl_library().map_err(|e| cuda_error(format!("cannot start {what}: {e}")))?;
        let visible =
            crate::kernels::cuda::CudaDevice::visible().map_err(|e| cuda_error(format!("cannot start {what}: {e}")))?;
        if ordinal >= visible {
            return Err(cuda_error(format!("cannot start {what}: {visible} GPU(s) visible")));
        }
        let abort = Arc::new(AbortFlag::default());
        let (commands, inbox) = mpsc::channel();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let flag = abort.clone();
        let thread_what = what.clone();
        std::thread::Builder::new()
            .name(format!("nccl-rank-{rank}"))
            .spawn(move || {
                let started = catch_unwind(AssertUnwindSafe(|| {
                    Owner::start(ordinal, rank, world, epoch, id, deadline, flag)
                }));
                let owner = match started {
                    Ok(Ok(owner)) => {
                        let _ = ready_tx.send(Ok(()));
                        owner
                    }
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    Err(p) => {
                        let _ = ready_tx.send(Err(cuda_error(format!(
                            "{thread_what}: initialisation panicked: {}",
                            panic_text(p)
                        ))));
                        return;
                    }
                };
                owner.serve(inbox);
            })
            .map_err(|e| Error::runtime(format!("cannot start the thread of {what}: {e}")))?;
        match ready.recv_timeout(deadline + HANDLE_MARGIN) {
            Ok(Ok(())) => Ok(NcclCollective {
                rank,
                world,
                epoch,
                deadline,
                next: 0,
                commands,
                abort,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                abort.abort(format!("{what} did not initialise in time"));
                Err(Error::Deadline {
                    peer: what,
                    what: "the NCCL communicator's initialisation".into(),
                    deadline_ms: deadline.as_millis() as u64,
                })
            }
        }
    }

    fn id(&mut self, op: Op) -> CollectiveId {
        let id = CollectiveId {
            epoch: self.epoch,
            index: self.next,
            op,
        };
        self.next += 1;
        id
    }

    fn call<T>(&self, id: CollectiveId, command: Command, reply: mpsc::Receiver<Result<T>>) -> Result<T> {
        let gone = || Error::collective(id.to_string(), self.rank, "the communicator's thread has ended");
        if let Some(reason) = self.abort.reason() {
            return Err(Error::collective(
                id.to_string(),
                self.rank,
                format!("the communicator was aborted ({reason})"),
            ));
        }
        self.commands.send(command).map_err(|_| gone())?;
        match reply.recv_timeout(self.deadline + HANDLE_MARGIN) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.abort.abort(format!("rank {}'s {id} did not return", self.rank));
                Err(Error::Deadline {
                    peer: format!("the NCCL thread of rank {}", self.rank),
                    what: id.to_string(),
                    deadline_ms: self.deadline.as_millis() as u64,
                })
            }
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn deadline(&self) -> Duration {
        self.deadline
    }

    fn all_to_all_counts(&mut self, counts: &[u64]) -> Result<Vec<u64>> {
        let id = self.id(Op::Counts);
        let (tx, rx) = mpsc::sync_channel(1);
        self.call(id, Command::Counts(id, counts.to_vec(), tx), rx)
    }

    fn group(&mut self, group: Group) -> Result<Vec<(Rank, Vec<u8>)>> {
        let id = self.id(Op::Group);
        let (tx, rx) = mpsc::sync_channel(1);
        self.call(id, Command::Group(id, group, tx), rx)
    }

    fn abort_handle(&self) -> AbortHandle {
        let flag = self.abort.clone();
        AbortHandle::new(
            self.rank,
            Arc::new(move |rank, reason| flag.abort(format!("rank {rank} aborted it: {reason}"))),
        )
    }
}

/// The thread that owns the communicator.
struct Owner {
    rank: Rank,
    world: usize,
    deadline: Duration,
    abort: Arc<AbortFlag>,
    stream: Arc<CudaStream>,
    comm: sys::ncclComm_t,
    /// Why the communicator is unusable, once it is (it has been aborted then).
    dead: Option<String>,
}

impl Owner {
    fn start(
        ordinal: usize,
        rank: Rank,
        world: usize,
        epoch: u64,
        id: [u8; NCCL_ID_BYTES],
        deadline: Duration,
        abort: Arc<AbortFlag>,
    ) -> Result<Owner> {
        let what = format!("NCCL rank {rank} of {world} (epoch {epoch}) on GPU {ordinal}");
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_error(format!("{what}: cannot open the GPU: {e:?}")))?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error(format!("{what}: cannot bind the GPU: {e:?}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_error(format!("{what}: cannot create a stream: {e:?}")))?;
        let version = nccl_library()?;
        let mut config = nonblocking_config(version);
        let unique = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call; the config is initialised as NCCL's
        // `NCCL_CONFIG_INITIALIZER` would, with `blocking = 0`; rank and world were checked.
        let started = unsafe { nccl::comm_init_rank_config(&mut comm, world as i32, unique, rank as i32, &mut config) };
        if let Err(e) = started {
            if !comm.is_null() {
                // SAFETY: a communicator NCCL handed out before failing; it is not used afterwards.
                let _ = unsafe { nccl::comm_abort(comm) };
            }
            return Err(cuda_error(format!("{what}: ncclCommInitRankConfig failed: {:?}", e.0)));
        }
        let mut owner = Owner {
            rank,
            world,
            deadline,
            abort,
            stream,
            comm,
            dead: None,
        };
        owner.wait("the communicator's initialisation", Instant::now() + deadline, None)?;
        Ok(owner)
    }

    fn serve(mut self, inbox: mpsc::Receiver<Command>) {
        // cudarc panics on a symbol missing from libnccl at its first call: such a panic becomes
        // the collective's error (and kills the communicator) rather than ending the thread.
        while let Ok(command) = inbox.recv() {
            match command {
                Command::Counts(id, counts, reply) => {
                    let result = catch_unwind(AssertUnwindSafe(|| self.counts(id, &counts)));
                    let _ = reply.send(result.unwrap_or_else(|p| Err(self.fail(id, panic_text(p)))));
                }
                Command::Group(id, group, reply) => {
                    let result = catch_unwind(AssertUnwindSafe(|| self.group(id, group)));
                    let _ = reply.send(result.unwrap_or_else(|p| Err(self.fail(id, panic_text(p)))));
                }
            }
        }
        self.kill("the handle was dropped".into());
    }

    /// Abort the communicator (once) and remember why.
    fn kill(&mut self, reason: String) {
        if self.dead.is_none() && !self.comm.is_null() {
            // SAFETY: `comm` is this thread's live communicator; it is never used after the abort.
            let _ = unsafe { nccl::comm_abort(self.comm) };
        }
        self.dead.get_or_insert(reason);
    }

    /// Kill the communicator: `name` (a collective, or the initialisation) failed.
    fn fail(&mut self, name: impl std::fmt::Display, detail: String) -> Error {
        self.kill(format!("{name} failed: {detail}"));
        Error::collective(name.to_string(), self.rank, detail)
    }

    /// Poll until the communicator has no operation in progress and `event` (if any) completed:
    /// an NCCL error, the deadline or an abort kills the communicator.
    fn wait(&mut self, name: &str, until: Instant, event: Option<&cudarc::driver::CudaEvent>) -> Result<()> {
        loop {
            if let Some(reason) = self.abort.reason() {
                return Err(self.fail(name, format!("the communicator was aborted ({reason})")));
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is live (not killed: callers check `dead` first) and `state` outlives the call.
            let polled = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if polled != sys::ncclResult_t::ncclSuccess {
                return Err(self.fail(name, format!("ncclCommGetAsyncError failed: {polled:?}")));
            }
            let comm_done = match state {
                sys::ncclResult_t::ncclSuccess => true,
                sys::ncclResult_t::ncclInProgress => false,
                other => return Err(self.fail(name, format!("NCCL reported {other:?}"))),
            };
            let stream_done = match event {
                None => true,
                Some(event) => event
                    .try_is_complete()
                    .map_err(|e| self.fail(name, format!("the stream failed: {e:?}")))?,
            };
            if comm_done && stream_done {
                return Ok(());
            }
            if Instant::now() >= until {
                let ms = self.deadline.as_millis() as u64;
                self.kill(format!("{name} missed its deadline of {ms} ms"));
                return Err(Error::Deadline {
                    peer: format!("a peer of NCCL rank {} of {}", self.rank, self.world),
                    what: format!("{name} on rank {}", self.rank),
                    deadline_ms: ms,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn counts(&mut self, id: CollectiveId, counts: &[u64]) -> Result<Vec<u64>> {
        if counts.len() != self.world {
            let detail = format!("{} counts posted for {} ranks", counts.len(), self.world);
            return Err(self.fail(id, detail));
        }
        let mut group = Group::new();
        for (peer, count) in counts.iter().enumerate() {
            group.send(peer, count.to_le_bytes().to_vec());
            group.recv(peer, 8);
        }
        let received = self.group(id, group)?;
        let mut out = vec![0u64; self.world];
        for (peer, bytes) in received {
            let bytes: [u8; 8] = bytes
                .try_into()
                .map_err(|_| self.fail(id, format!("rank {peer}'s count did not arrive whole")))?;
            out[peer] = u64::from_le_bytes(bytes);
        }
        Ok(out)
    }

    fn group(&mut self, id: CollectiveId, group: Group) -> Result<Vec<(Rank, Vec<u8>)>> {
        if let Some(reason) = &self.dead {
            return Err(Error::collective(
                id.to_string(),
                self.rank,
                format!("the communicator was aborted ({reason})"),
            ));
        }
        if let Err(e) = group.validate(id, self.rank, self.world) {
            self.kill(e.to_string());
            return Err(e);
        }
        let until = Instant::now() + self.deadline;
        let stream = self.stream.clone();
        let (sends, recvs) = group.into_parts();
        let mut send_bufs: Vec<(Rank, CudaSlice<u8>)> = Vec::with_capacity(sends.len());
        for (peer, data) in &sends {
            if data.is_empty() {
                continue;
            }
            let buf = stream
                .clone_htod(data.as_slice())
                .map_err(|e| self.fail(id, format!("cannot copy the send to rank {peer} to the GPU: {e:?}")))?;
            send_bufs.push((*peer, buf));
        }
        let mut recv_bufs: Vec<(Rank, usize, Option<CudaSlice<u8>>)> = Vec::with_capacity(recvs.len());
        for (peer, bytes) in &recvs {
            let buf = if *bytes == 0 {
                None
            } else {
                Some(stream.alloc_zeros::<u8>(*bytes).map_err(|e| {
                    self.fail(
                        id,
                        format!("cannot allocate {bytes} bytes for the receive from rank {peer}: {e:?}"),
                    )
                })?)
            };
            recv_bufs.push((*peer, *bytes, buf));
        }

        let posted = self.post(&stream, &send_bufs, &mut recv_bufs);
        if let Err(detail) = posted {
            return Err(self.fail(id, detail));
        }
        // On a non-blocking communicator `ncclGroupEnd` may return while NCCL still enqueues the
        // kernels: an event recorded now could come before them and complete at once (and the
        // copy back below would then block on them with neither the deadline nor an abort heard).
        // NCCL asks for the communicator to leave `ncclInProgress` before any stream operation.
        self.wait(&id.to_string(), until, None)?;
        let event = stream
            .record_event(None)
            .map_err(|e| self.fail(id, format!("cannot record an event after the group: {e:?}")))?;
        self.wait(&id.to_string(), until, Some(&event))?;

        let mut out = Vec::with_capacity(recv_bufs.len());
        for (peer, bytes, buf) in recv_bufs {
            let data = match buf {
                None => Vec::new(),
                Some(buf) => stream.clone_dtoh(&buf).map_err(|e| {
                    self.fail(
                        id,
                        format!("cannot copy {bytes} bytes from rank {peer} back from the GPU: {e:?}"),
                    )
                })?,
            };
            out.push((peer, data));
        }
        Ok(out)
    }

    /// `ncclGroupStart`, one `ncclSend`/`ncclRecv` per buffer, `ncclGroupEnd`.
    fn post(
        &self,
        stream: &Arc<CudaStream>,
        sends: &[(Rank, CudaSlice<u8>)],
        recvs: &mut [(Rank, usize, Option<CudaSlice<u8>>)],
    ) -> std::result::Result<(), String> {
        let raw_stream = stream.cu_stream() as sys::cudaStream_t;
        nccl::group_start().map_err(|e| format!("ncclGroupStart failed: {:?}", e.0))?;
        let mut guards = Vec::with_capacity(sends.len() + recvs.len());
        let mut first_error = None;
        for (peer, buf) in sends {
            let (ptr, guard) = buf.device_ptr(stream);
            guards.push(guard);
            // SAFETY: `ptr` points at `buf.len()` bytes on this communicator's GPU that stay
            // allocated until the group completed (the buffers outlive `wait`).
            let r = unsafe {
                nccl::send(
                    ptr as *const c_void,
                    buf.len(),
                    sys::ncclDataType_t::ncclUint8,
                    *peer as i32,
                    self.comm,
                    raw_stream,
                )
            };
            if let Err(e) = r {
                first_error.get_or_insert(format!("ncclSend to rank {peer} failed: {:?}", e.0));
            }
        }
        for (peer, bytes, buf) in recvs.iter_mut() {
            let Some(buf) = buf.as_mut() else { continue };
            let (ptr, guard) = buf.device_ptr_mut(stream);
            guards.push(guard);
            // SAFETY: as above, `bytes` writable bytes that stay allocated until the group completed.
            let r = unsafe {
                nccl::recv(
                    ptr as *mut c_void,
                    *bytes,
                    sys::ncclDataType_t::ncclUint8,
                    *peer as i32,
                    self.comm,
                    raw_stream,
                )
            };
            if let Err(e) = r {
                first_error.get_or_insert(format!("ncclRecv from rank {peer} failed: {:?}", e.0));
            }
        }
        // The group is always closed, also after a failed post (NCCL needs the pair balanced).
        let ended = nccl::group_end();
        drop(guards);
        if let Some(e) = first_error {
            return Err(e);
        }
        ended.map(|_| ()).map_err(|e| format!("ncclGroupEnd failed: {:?}", e.0))
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.kill("the communicator's thread ended".into());
    }
}

/// NCCL's `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every option undefined (NCCL's
/// defaults), the struct's size and magic, and the version of the library that reads it (capped at
/// the bindings' own, so that a newer library reads only the fields the bindings know).
fn nonblocking_config(library: i32) -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    const BINDINGS: i32 = 23000;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: library.min(BINDINGS) as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}
