//! The same-host path of the data plane: Unix stream sockets between worker processes of one
//! machine, in place of QUIC.
//!
//! # Why
//!
//! Between two processes of one machine QUIC costs what the network does not: every byte is
//! encrypted and decrypted, cut into 1,200-byte datagrams and acknowledged, all on the workers'
//! async threads, which share the cores with the compute threads. `semoe bench runtime
//! --processes 2` measured 2 processes over loopback QUIC at 60-69% of the tokens/s of 2 in-process
//! workers with about 30% of the CPU in those threads. A Unix socket moves a frame with one copy
//! into and one out of the kernel; the tensors need no other: [`write_sealed`] writes a packet's
//! floats from the packet itself (a gathering write after the frame's head) and
//! `reader::read_split` reads them straight into the floats the packet will carry.
//!
//! # Who may connect
//!
//! Each data plane that enables the path listens on an abstract Unix socket (Linux: no file, gone
//! with the process) named after the job's token digest and the plane's UDP port, which its peers
//! learn from the coordinator anyway. Abstract sockets are visible to every process of the
//! network namespace, so both ends check the other's user id with `SO_PEERCRED` (the kernel's
//! word, not the peer's): only processes of the same user, which could read the ticket file
//! anyway, get further; then both prove they hold the job's token (below), and the acceptor checks
//! the opener's hello before it admits the connection. A peer is tried this way only when its
//! address is a loopback address or this worker's own advertised address; if nothing listens under
//! the name (another network namespace, the path disabled), the link falls back to QUIC.
//!
//! The user id alone does not prove the listener is a peer: containers that run as root and share
//! the host's network see each other's abstract names, and any of them could bind a plane's name
//! first. So the token never crosses a same-host socket. Both ends prove they hold it by a keyed
//! hash (HMAC-SHA-256, keyed with the token) of two fresh random challenges and the socket name
//! (the acceptor's own, the one the opener dialed: no relaying to another plane), the acceptor first
//! ([`answer_challenge`], [`check_answer`]): a listener that cannot prove it learns nothing it could
//! replay, and the opener falls back to QUIC, whose mutual TLS authenticates the peer. The opener's
//! proof then travels in the hello's token field, which the acceptor compares with the proof it
//! expects.
//!
//! # Frames and closing
//!
//! The opener writes its challenge ([`CHALLENGE_LEN`] bytes), then, once the acceptor's answer
//! checks out, the hello and its packets as the same length-prefixed frames as on a QUIC stream.
//! The other direction carries the answer ([`ANSWER_LEN`] bytes) and then at most one *close frame*
//! (`u32` code, `u16` length, the reason), written by the acceptor when it closes the connection:
//! the end of an epoch, a refusal, an eviction, a shutdown. The opener's watcher reads it and
//! classifies it like a QUIC close; a connection that ends without one was cut (the process ended).

use super::frame::CHECKSUM_BYTES;
use super::identity::hex;
use crate::error::{Error, Result};
use crate::net::wire::Encoded;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::AbortHandle;

/// The longest reason a close frame carries (as QUIC's close reasons here).
pub(crate) const MAX_REASON: usize = 400;

/// The first bytes of an opener's challenge and of an acceptor's answer.
const CHALLENGE_MAGIC: &[u8; 8] = b"SEMOELC1";
const ANSWER_MAGIC: &[u8; 8] = b"SEMOELA1";

/// Bytes of a random challenge.
const NONCE: usize = 32;

/// Bytes of an HMAC-SHA-256 proof.
const PROOF: usize = 32;

/// An opener's challenge: the magic and its random challenge.
pub(crate) const CHALLENGE_LEN: usize = 8 + NONCE;

/// An acceptor's answer: the magic, its own random challenge and its proof.
pub(crate) const ANSWER_LEN: usize = 8 + NONCE + PROOF;

/// The proof of the side `role` over the two challenges (the acceptor's over the opener's
/// challenge first, the opener's over the acceptor's first), keyed with the job's token. The role
/// is part of the message, so one side's proof is never the other's; so is the socket `name` the
/// connection is on (the acceptor's own, the one the opener dialed), so that a listener squatting
/// one plane's name cannot relay the handshake to another plane of the job and pass its answer off
/// as the first one's.
fn proof(token: &str, role: &[u8], name: &str, first: &[u8], second: &[u8]) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(b"semoe same-host ");
    ctx.update(role);
    ctx.update(&(name.len() as u64).to_le_bytes());
    ctx.update(name.as_bytes());
    ctx.update(first);
    ctx.update(second);
    ctx.sign()
}

fn random_nonce() -> std::result::Result<[u8; NONCE], String> {
    use ring::rand::SecureRandom;
    let mut nonce = [0u8; NONCE];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(nonce)
}

/// The opener's side, before anything else: a fresh challenge to write to the acceptor, and the
/// secret state to check its answer with.
pub(crate) fn challenge() -> std::result::Result<([u8; CHALLENGE_LEN], [u8; NONCE]), String> {
    let nonce = random_nonce()?;
    let mut out = [0u8; CHALLENGE_LEN];
    out[..8].copy_from_slice(CHALLENGE_MAGIC);
    out[8..].copy_from_slice(&nonce);
    Ok((out, nonce))
}

/// The acceptor's side, listening under `name`: its answer to the opener's `challenge` (its own
/// challenge and its proof of the token), and the opener's proof it must then find in the hello
/// (hex, as the hello's token).
pub(crate) fn answer_challenge(
    token: &str,
    name: &str,
    challenge: &[u8; CHALLENGE_LEN],
) -> std::result::Result<([u8; ANSWER_LEN], String), String> {
    if &challenge[..8] != CHALLENGE_MAGIC {
        return Err("the first bytes are not a same-host challenge".to_string());
    }
    let theirs = &challenge[8..];
    let ours = random_nonce()?;
    let mine = proof(token, b"acceptor", name, theirs, &ours);
    let mut out = [0u8; ANSWER_LEN];
    out[..8].copy_from_slice(ANSWER_MAGIC);
    out[8..8 + NONCE].copy_from_slice(&ours);
    out[8 + NONCE..].copy_from_slice(mine.as_ref());
    let expected = hex(proof(token, b"opener", name, &ours, theirs).as_ref());
    Ok((out, expected))
}

/// The opener's side, having dialed `name`: check the acceptor's `answer` to the challenge
/// `nonce`; if it proves the token, the opener's own proof (hex), to send as the hello's token.
pub(crate) fn check_answer(
    token: &str,
    name: &str,
    nonce: &[u8; NONCE],
    answer: &[u8; ANSWER_LEN],
) -> std::result::Result<String, String> {
    if &answer[..8] != ANSWER_MAGIC {
        return Err("the listener's first bytes are not a same-host answer".to_string());
    }
    let theirs = &answer[8..8 + NONCE];
    let expected = proof(token, b"acceptor", name, nonce, theirs);
    if !super::identity::constant_time_eq(expected.as_ref(), &answer[8 + NONCE..]) {
        return Err("the listener could not prove it holds the job's token".to_string());
    }
    Ok(hex(proof(token, b"opener", name, theirs, nonce).as_ref()))
}

/// The abstract socket name of the plane of the job with token digest `tag` on UDP port `port`.
pub(crate) fn socket_name(tag: &str, port: u16) -> String {
    format!("semoe-data-{tag}-{port}")
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// Listen on the abstract socket `name` (Linux only; elsewhere an error, and the plane keeps QUIC).
pub(crate) fn listen(name: &str) -> Result<UnixListener> {
    #[cfg(target_os = "linux")]
    {
        let addr =
            abstract_addr(name).map_err(|e| Error::runtime(format!("the same-host socket name {name:?}: {e}")))?;
        let listener = std::os::unix::net::UnixListener::bind_addr(&addr)
            .map_err(|e| Error::runtime(format!("cannot listen on the same-host socket {name:?}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::runtime(format!("the same-host socket {name:?}: {e}")))?;
        UnixListener::from_std(listener).map_err(|e| Error::runtime(format!("the same-host socket {name:?}: {e}")))
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(Error::runtime(format!(
            "same-host sockets ({name:?}) need Linux's abstract socket names"
        )))
    }
}

/// Connect to the abstract socket `name`; `Ok(None)` when nothing listens there or its queue of
/// connections is full (the caller falls back to QUIC). Never blocks a thread: a blocking connect
/// to a listener that never accepts (a process holding the name) would wait for ever, on one of
/// the worker's few async threads.
pub(crate) async fn connect(name: &str) -> std::result::Result<Option<UnixStream>, String> {
    #[cfg(target_os = "linux")]
    {
        let addr = tokio::net::unix::SocketAddr::from(abstract_addr(name).map_err(|e| e.to_string())?);
        let stream = match UnixStream::connect_addr(&addr).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound | io::ErrorKind::WouldBlock
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(format!("cannot connect to the same-host socket: {e}")),
        };
        check_same_user(&stream)?;
        Ok(Some(stream))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = name;
        Ok(None)
    }
}

/// The opener's handshake on a `stream` connected to `name`: write a challenge, read the acceptor's answer
/// within `within` and check it. The two halves and the opener's proof (for the hello's token),
/// or why the listener is not a peer (the caller falls back to QUIC).
pub(crate) async fn open_handshake(
    stream: UnixStream,
    token: &str,
    name: &str,
    within: std::time::Duration,
) -> std::result::Result<(OwnedReadHalf, OwnedWriteHalf, String), String> {
    let (mut read, mut write) = stream.into_split();
    let (ours, nonce) = challenge()?;
    let mut answer = [0u8; ANSWER_LEN];
    tokio::time::timeout(within, async {
        write.write_all(&ours).await?;
        read.read_exact(&mut answer).await
    })
    .await
    .map_err(|_| format!("the listener sent no answer within {} s", within.as_secs()))?
    .map_err(|e| format!("the listener's answer: {e}"))?;
    let proof = check_answer(token, name, &nonce, &answer)?;
    Ok((read, write, proof))
}

/// The acceptor's handshake on its socket `name`: read the opener's challenge from `read`, write the answer on `write`;
/// the proof the opener's hello must carry as its token. The caller bounds it in time.
pub(crate) async fn accept_handshake(
    read: &mut OwnedReadHalf,
    write: &mut OwnedWriteHalf,
    token: &str,
    name: &str,
) -> std::result::Result<String, String> {
    let mut theirs = [0u8; CHALLENGE_LEN];
    read.read_exact(&mut theirs)
        .await
        .map_err(|e| format!("the same-host challenge: {e}"))?;
    let (answer, expected) = answer_challenge(token, name, &theirs)?;
    write
        .write_all(&answer)
        .await
        .map_err(|e| format!("cannot send the same-host answer: {e}"))?;
    Ok(expected)
}

/// Refuse a peer process of another user (`SO_PEERCRED`).
pub(crate) fn check_same_user(stream: &UnixStream) -> std::result::Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the same-host peer's credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid() != me {
        return Err(format!(
            "the same-host peer runs as user {}, this worker as user {me}",
            cred.uid()
        ));
    }
    Ok(())
}

/// Write one frame: `bytes.len()` as u64 LE, then `bytes`.
pub(crate) async fn write_frame(send: &mut OwnedWriteHalf, bytes: &[u8]) -> io::Result<()> {
    // The length and the frame in one vectored write: one system call per packet, not two.
    let len = (bytes.len() as u64).to_le_bytes();
    let mut both = bytes::Buf::chain(&len[..], bytes);
    send.write_all_buf(&mut both).await
}

/// Write one sealed frame from its parts without gathering them into one buffer first: its length
/// (u64 LE), `enc`'s head and bodies, then their CRC-32 (as [`super::frame::seal`] would append it),
/// in vectored writes. The bytes on the socket are those of [`write_frame`] of the sealed frame.
pub(crate) async fn write_sealed(send: &mut OwnedWriteHalf, enc: &Encoded<'_>) -> io::Result<()> {
    let Some(bodies) = enc.body_bytes() else {
        // Big-endian: the floats are converted into one buffer.
        let mut bytes = enc.concat();
        super::frame::seal(&mut bytes);
        return write_frame(send, &bytes).await;
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&enc.head);
    for b in &bodies {
        crc.update(b);
    }
    let crc = crc.finalize().to_le_bytes();
    let len = ((enc.len() + CHECKSUM_BYTES) as u64).to_le_bytes();
    let mut parts = vec![&len[..], &enc.head[..]];
    parts.extend(bodies);
    parts.push(&crc[..]);
    send.write_all_buf(&mut Gather::new(parts)).await
}

/// Byte slices sent one after the other, offered to the socket as one gathering write per call.
struct Gather<'a> {
    /// The slices not yet fully written (empty ones left out), the first `off` bytes of
    /// `parts[at]` written.
    parts: Vec<&'a [u8]>,
    at: usize,
    off: usize,
    remaining: usize,
}

impl<'a> Gather<'a> {
    fn new(mut parts: Vec<&'a [u8]>) -> Gather<'a> {
        parts.retain(|p| !p.is_empty());
        let remaining = parts.iter().map(|p| p.len()).sum();
        Gather {
            parts,
            at: 0,
            off: 0,
            remaining,
        }
    }
}

impl bytes::Buf for Gather<'_> {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.get(self.at).map_or(&[], |p| &p[self.off..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advanced past the end of the frame");
        self.remaining -= cnt;
        while cnt > 0 {
            let left = self.parts[self.at].len() - self.off;
            if cnt < left {
                self.off += cnt;
                return;
            }
            cnt -= left;
            self.at += 1;
            self.off = 0;
        }
    }

    fn chunks_vectored<'b>(&'b self, dst: &mut [io::IoSlice<'b>]) -> usize {
        let mut n = 0;
        for (i, part) in self.parts.iter().enumerate().skip(self.at) {
            let Some(slot) = dst.get_mut(n) else { break };
            let from = if i == self.at { self.off } else { 0 };
            *slot = io::IoSlice::new(&part[from..]);
            n += 1;
        }
        n
    }
}

/// A close frame: `code` u32 LE, the reason's length u16 LE, the reason (cut to [`MAX_REASON`]).
pub(crate) fn close_frame(code: u32, reason: &[u8]) -> Vec<u8> {
    let reason = &reason[..reason.len().min(MAX_REASON)];
    let mut out = Vec::with_capacity(6 + reason.len());
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason);
    out
}

/// How the acceptor of an outgoing connection ended it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It wrote a close frame: its code and reason.
    Closed(u32, String),
    /// The connection ended without one (the peer process ended, or the socket failed).
    Cut(String),
}

/// Wait for the close frame on the back direction of an outgoing connection (the acceptor writes
/// nothing else there).
pub(crate) async fn read_ending(recv: &mut OwnedReadHalf) -> Ending {
    let mut head = [0u8; 6];
    match recv.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ending::Cut("the connection ended (the peer process is gone)".to_string())
        }
        Err(e) => return Ending::Cut(format!("the connection failed: {e}")),
    }
    let code = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let len = usize::from(u16::from_le_bytes([head[4], head[5]]));
    if len > MAX_REASON {
        return Ending::Cut(format!("a close frame with a reason of {len} bytes"));
    }
    let mut reason = vec![0u8; len];
    match recv.read_exact(&mut reason).await {
        Ok(_) => Ending::Closed(code, String::from_utf8_lossy(&reason).into_owned()),
        Err(e) => Ending::Cut(format!("the connection ended inside a close frame: {e}")),
    }
}

/// One same-host connection of an epoch, as far as closing it goes: the tasks that own its halves
/// (aborting them drops the socket) and, for an accepted connection, the half this worker writes
/// its close frame on.
pub(crate) struct LocalConn {
    back: Mutex<Option<OwnedWriteHalf>>,
    tasks: Mutex<Vec<AbortHandle>>,
    closed: AtomicBool,
}

impl LocalConn {
    /// An outgoing connection: this worker writes packets and reads the close frame.
    pub(crate) fn outgoing() -> LocalConn {
        LocalConn {
            back: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// An accepted connection: this worker reads packets and may write one close frame on `back`.
    pub(crate) fn incoming(back: OwnedWriteHalf) -> LocalConn {
        LocalConn {
            back: Mutex::new(Some(back)),
            tasks: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// The connection's tasks, aborted on close (a task added after the close is aborted at once).
    pub(crate) fn own_task(&self, task: AbortHandle) {
        if self.closed.load(Ordering::SeqCst) {
            task.abort();
            return;
        }
        lock(&self.tasks).push(task);
        if self.closed.load(Ordering::SeqCst) {
            for t in lock(&self.tasks).drain(..) {
                t.abort();
            }
        }
    }

    /// Close once: write the close frame if this worker accepted the connection (without waiting:
    /// nothing else was ever written in that direction, so the socket buffer has room), then stop
    /// the tasks, which drops the socket.
    pub(crate) fn close(&self, code: u32, reason: &[u8]) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(back) = lock(&self.back).take() {
            let _ = back.try_write(&close_frame(code, reason));
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_frame_cuts_long_reasons() {
        let f = close_frame(7, &[b'x'; 1000]);
        assert_eq!(f.len(), 6 + MAX_REASON);
        assert_eq!(&f[..4], &7u32.to_le_bytes());
        assert_eq!(u16::from_le_bytes([f[4], f[5]]) as usize, MAX_REASON);
    }

    /// A listener on the abstract socket `name` whose queue holds at most one connection and
    /// which never accepts (a process holding the name): its file descriptor.
    #[cfg(target_os = "linux")]
    fn listen_and_never_accept(name: &str) -> libc::c_int {
        // SAFETY: plain socket calls on a zeroed address of the right family and length.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket");
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, &b) in name.as_bytes().iter().enumerate() {
                addr.sun_path[i + 1] = b as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
            let bound = libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len as libc::socklen_t);
            assert_eq!(bound, 0, "bind");
            assert_eq!(libc::listen(fd, 0), 0, "listen");
            fd
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_connect_to_a_listener_that_never_accepts_does_not_block() {
        let name = format!("semoe-test-full-{}", std::process::id());
        let fd = listen_and_never_accept(&name);
        let (tx, rx) = std::sync::mpsc::channel();
        let dialer = std::thread::spawn(move || {
            let tokio = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio");
            for _ in 0..3 {
                let connected = tokio.block_on(connect(&name));
                if tx.send(connected.map(|s| s.is_some())).is_err() {
                    return;
                }
            }
        });
        let mut answers = Vec::new();
        for _ in 0..3 {
            match rx.recv_timeout(std::time::Duration::from_secs(5)) {
                Ok(answer) => answers.push(answer),
                Err(_) => break,
            }
        }
        // SAFETY: `fd` is the listener's, closed once (this wakes a connect blocked on it).
        unsafe { libc::close(fd) };
        let _ = dialer.join();
        assert_eq!(answers.len(), 3, "a connect blocked: {answers:?}");
        // The first waits in the queue; a full queue is nothing to dial (QUIC instead).
        assert_eq!(answers[0], Ok(true));
        assert_eq!(answers[1..], [Ok(false), Ok(false)]);
    }

    use super::super::frame::FrameError;
    use super::super::reader::{read_frame, read_split, SplitFrame};
    use crate::net::wire::{encode_packet, encode_packet_parts};
    use crate::net::{Packet, Payload, Segment};

    /// The two ends of a connected socket pair: one to read, one to write (dropping the writer
    /// ends the stream, as a peer process that went away).
    fn pair() -> (OwnedReadHalf, OwnedWriteHalf) {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let (_, write) = a.into_split();
        let (read, _) = b.into_split();
        (read, write)
    }

    fn packet(rows: &[usize]) -> Packet {
        let segments = rows
            .iter()
            .enumerate()
            .map(|(i, &r)| Segment {
                group: i,
                expert: i,
                rows: r,
                data: (0..r * 32).map(|j| (j as f32 * 0.1 + i as f32).sin()).collect(),
            })
            .collect();
        Packet {
            from: 1,
            to: 0,
            id: 7,
            payload: Payload::Segments(segments),
        }
    }

    fn sealed(p: &Packet) -> Vec<u8> {
        let mut bytes = encode_packet(3, p).expect("encode");
        super::super::frame::seal(&mut bytes);
        bytes
    }

    #[tokio::test]
    async fn a_gathered_frame_is_read_back_split_and_bitwise() {
        let (mut read, mut write) = pair();
        let p = packet(&[3, 0, 5]);
        let enc = encode_packet_parts(3, &p).expect("parts");
        write_sealed(&mut write, &enc).await.expect("write");
        // The same bytes as the frame sealed in one buffer, read whole.
        write_frame(&mut write, &sealed(&p)).await.expect("write whole");
        let Some(SplitFrame::Split { head, bodies }) = read_split(&mut read, 1 << 20, usize::MAX, "a frame")
            .await
            .expect("read")
        else {
            panic!("the frame was not read split");
        };
        assert_eq!(head, enc.head);
        assert_eq!(bodies.len(), 3);
        for (got, want) in bodies.iter().zip(&enc.bodies) {
            assert_eq!(got.len(), want.len());
            assert!(got.iter().zip(want.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let whole = read_frame(&mut read, 1 << 20, "a frame")
            .await
            .expect("read whole")
            .expect("a frame");
        let mut again = enc.concat();
        super::super::frame::seal(&mut again);
        assert_eq!(
            whole, again,
            "the gathered write put the sealed frame's bytes on the socket"
        );
    }

    #[tokio::test]
    async fn a_damaged_body_is_refused_as_damage_and_a_lying_head_is_read_whole() {
        let (mut read, mut write) = pair();
        let p = packet(&[4, 4]);
        let mut damaged = sealed(&p);
        super::super::frame::damage(&mut damaged);
        write_frame(&mut write, &damaged).await.expect("write");
        match read_split(&mut read, 1 << 20, usize::MAX, "a frame").await {
            Err(FrameError::Protocol(d)) => assert!(d.contains("damaged on the way"), "{d}"),
            Err(e) => panic!("not refused as damage: {e:?}"),
            Ok(_) => panic!("a damaged frame was accepted"),
        }
        // A head whose body count claims more than the frame holds: read whole, for the ordinary
        // checks (its checksum no longer matches either).
        let mut lying = sealed(&p);
        let head_len = u32::from_le_bytes([lying[0], lying[1], lying[2], lying[3]]) as usize;
        lying[4 + head_len..8 + head_len].copy_from_slice(&1000u32.to_le_bytes());
        write_frame(&mut write, &lying).await.expect("write");
        match read_split(&mut read, 1 << 20, usize::MAX, "a frame").await {
            Ok(Some(SplitFrame::Whole(bytes))) => assert_eq!(bytes, lying),
            Ok(_) => panic!("a lying head was read split"),
            Err(e) => panic!("a lying head failed the read: {e:?}"),
        }
        // A frame cut inside a body: its writer went away.
        let whole = sealed(&p);
        let len = (whole.len() as u64).to_le_bytes();
        write.write_all(&len).await.expect("write");
        write.write_all(&whole[..whole.len() / 2]).await.expect("write");
        drop(write);
        match read_split(&mut read, 1 << 20, usize::MAX, "a frame").await {
            Err(FrameError::Cut(d)) => assert!(d.contains("ended") && d.contains("bytes into a frame"), "{d}"),
            Err(e) => panic!("not a cut: {e:?}"),
            Ok(_) => panic!("a cut frame was accepted"),
        }
    }

    #[tokio::test]
    async fn a_table_of_more_bodies_than_a_packet_can_carry_is_refused_before_it_is_read() {
        // A frame of 10,000 empty bodies: its table is 80 KB, and read split it cost about five
        // times that (the lengths, then an empty body each). (Small enough for the socket's
        // buffer: the refusing reader leaves the rest unread.)
        let empty: Vec<&[f32]> = vec![&[]; 10_000];
        let mut frame = crate::net::wire::encode_frame(&7u8, &empty).expect("encode");
        super::super::frame::seal(&mut frame);
        let (mut read, mut write) = pair();
        write_frame(&mut write, &frame).await.expect("write");
        match read_split(&mut read, 1 << 20, 4, "a frame").await {
            Err(FrameError::Protocol(d)) => {
                assert!(d.contains("lists 10000 bodies, more than the 4"), "{d}")
            }
            Err(e) => panic!("not refused as a protocol violation: {e:?}"),
            Ok(_) => panic!("a table of 10,000 bodies was read"),
        }
        // Within the bound, the same frame is read split.
        let (mut read, mut write) = pair();
        write_frame(&mut write, &frame).await.expect("write");
        match read_split(&mut read, 1 << 20, 10_000, "a frame").await {
            Ok(Some(SplitFrame::Split { bodies, .. })) => assert_eq!(bodies.len(), 10_000),
            Ok(_) => panic!("not read split"),
            Err(e) => panic!("refused: {e:?}"),
        }
    }

    /// The split reader agrees with reading a frame whole and decoding it, on valid frames and on
    /// thousands of damaged ones (bits flipped, some resealed so that the decoder's checks are
    /// reached, some damaged after the seal): the same packet (its bytes re-encoded are equal), or
    /// a refusal both ways; never a panic.
    #[tokio::test]
    async fn the_split_reader_agrees_with_the_whole_frame_on_damaged_frames() {
        use super::super::frame::{open, seal};
        use crate::net::wire::{decode_packet, decode_packet_parts, PacketShape};
        let shape = PacketShape::of(&crate::config::small_test_config(), 3).expect("shape");
        let (mut read, mut write) = pair();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut same, mut refused) = (0, 0);
        for round in 0..3000usize {
            let p = packet(&[round % 4 + 1, 0, round % 3]);
            let mut frame = encode_packet(3, &p).expect("encode");
            // Most flips land in the bodies; the head is small, so aim a third of them at it.
            for _ in 0..next() % 4 {
                let span = if next() % 3 == 0 {
                    64.min(frame.len())
                } else {
                    frame.len()
                };
                let at = next() as usize % span;
                frame[at] ^= 1 << (next() % 8);
            }
            seal(&mut frame);
            if next() % 4 == 0 {
                let at = next() as usize % frame.len();
                frame[at] ^= 0x10;
            }
            let whole = open(&frame).and_then(|b| decode_packet(b, 3, &shape).map_err(|e| e.to_string()));
            write_frame(&mut write, &frame).await.expect("write");
            let split = match read_split(&mut read, 1 << 20, usize::MAX, "a frame").await {
                Ok(Some(SplitFrame::Split { head, bodies })) => {
                    decode_packet_parts(&head, bodies, 3, &shape).map_err(|e| e.to_string())
                }
                Ok(Some(SplitFrame::Whole(bytes))) => {
                    open(&bytes).and_then(|b| decode_packet(b, 3, &shape).map_err(|e| e.to_string()))
                }
                Ok(None) => panic!("round {round}: the stream ended"),
                Err(FrameError::Protocol(d)) => Err(d),
                Err(e) => panic!("round {round}: the read failed: {e:?}"),
            };
            match (whole, split) {
                (Ok(a), Ok(b)) => {
                    let (a, b) = (encode_packet(3, &a).expect("a"), encode_packet(3, &b).expect("b"));
                    assert_eq!(a, b, "round {round}: the split reader decoded another packet");
                    same += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                (a, b) => panic!("round {round}: whole {:?}, split {:?}", a.map(|_| ()), b.map(|_| ())),
            }
        }
        assert!(
            same > 500 && refused > 500,
            "{same} decoded both ways, {refused} refused both ways"
        );
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_reading_it() {
        let (mut read, mut write) = pair();
        write.write_all(&(1u64 << 40).to_le_bytes()).await.expect("write");
        match read_split(&mut read, 1 << 20, usize::MAX, "a frame").await {
            Err(FrameError::Protocol(d)) => assert!(d.contains("over the limit"), "{d}"),
            other => panic!("not refused: {:?}", other.map(|f| f.is_some())),
        }
    }

    #[test]
    fn both_sides_prove_the_token_and_neither_proof_serves_the_other() {
        let (ours, nonce) = challenge().expect("challenge");
        let (answer, expected) = answer_challenge("job-token", "n", &ours).expect("answer");
        let proof = check_answer("job-token", "n", &nonce, &answer).expect("a true answer");
        assert_eq!(proof, expected, "the opener's proof is the one the acceptor expects");
        assert_eq!(proof.len(), 2 * PROOF);
        assert!(!proof.contains("job-token"));
        // The acceptor's proof is not the opener's (a listener cannot replay it as a hello).
        assert_ne!(hex(&answer[8 + NONCE..]), proof);
        // An acceptor with another token is caught, as is a damaged answer or another magic.
        let (wrong, _) = answer_challenge("another", "n", &ours).expect("answer");
        let err = check_answer("job-token", "n", &nonce, &wrong).expect_err("a wrong token");
        assert!(err.contains("could not prove"), "{err}");
        let mut damaged = answer;
        damaged[ANSWER_LEN - 1] ^= 1;
        assert!(check_answer("job-token", "n", &nonce, &damaged).is_err());
        let mut magic = answer;
        magic[0] ^= 1;
        assert!(check_answer("job-token", "n", &nonce, &magic)
            .expect_err("magic")
            .contains("not a same-host answer"));
        // An answer to another challenge does not check out.
        // An answer made under another socket name (a listener relaying to another plane of the
        // job) does not check out for the name dialed.
        let err = check_answer("job-token", "m", &nonce, &answer).expect_err("another name");
        assert!(err.contains("could not prove"), "{err}");
        let (_, other_nonce) = challenge().expect("challenge");
        assert_ne!(other_nonce, nonce, "challenges are fresh");
        assert!(check_answer("job-token", "n", &other_nonce, &answer).is_err());
        let mut not_a_challenge = ours;
        not_a_challenge[3] ^= 1;
        assert!(answer_challenge("job-token", "n", &not_a_challenge).is_err());
    }

    /// A listener that does not hold the token gets the challenge only, and one that never answers
    /// is given up within the time.
    #[tokio::test]
    async fn an_impostor_listener_learns_nothing_and_a_silent_one_is_given_up() {
        for silent in [false, true] {
            let (opener, impostor) = UnixStream::pair().expect("socket pair");
            let spy = tokio::spawn(async move {
                let (mut read, mut write) = impostor.into_split();
                let mut got = vec![0u8; CHALLENGE_LEN];
                read.read_exact(&mut got).await.expect("the challenge");
                if !silent {
                    write.write_all(&[7u8; ANSWER_LEN]).await.expect("a false answer");
                }
                // Whatever else the opener sends, until it hangs up.
                let mut rest = Vec::new();
                let _ = read.read_to_end(&mut rest).await;
                got.extend(rest);
                got
            });
            let start = std::time::Instant::now();
            let err = match open_handshake(opener, "job-token", "n", std::time::Duration::from_millis(300)).await {
                Ok(_) => panic!("an impostor was taken for a peer"),
                Err(e) => e,
            };
            if silent {
                assert!(err.contains("no answer within"), "{err}");
                assert!(start.elapsed() < std::time::Duration::from_secs(5));
            } else {
                assert!(err.contains("not a same-host answer"), "{err}");
            }
            let got = spy.await.expect("spy");
            assert_eq!(got.len(), CHALLENGE_LEN, "the opener sent only its challenge");
            assert!(!got.windows(9).any(|w| w == b"job-token"));
        }
    }

    #[test]
    fn names_differ_by_job_and_port() {
        assert_ne!(socket_name("aa", 1), socket_name("ab", 1));
        assert_ne!(socket_name("aa", 1), socket_name("aa", 2));
    }
}
