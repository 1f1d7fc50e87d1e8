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
//! anyway, get further. The opener then sends the same hello as over QUIC (the job's token), which
//! the acceptor checks before it admits the connection. A peer is tried this way only when its
//! address is a loopback address or this worker's own advertised address; if nothing listens under
//! the name (another network namespace, the path disabled), the link falls back to QUIC.
//!
//! # Frames and closing
//!
//! The opener writes the hello and then its packets as the same length-prefixed frames as on a QUIC
//! stream. The other direction carries at most one *close frame* (`u32` code, `u16` length, the
//! reason), written by the acceptor when it closes the connection: the end of an epoch, a refusal,
//! an eviction, a shutdown. The opener's watcher reads it and classifies it like a QUIC close; a
//! connection that ends without one was cut (the process ended).

use super::frame::CHECKSUM_BYTES;
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

/// Connect to the abstract socket `name`; `Ok(None)` when nothing listens there (the caller falls
/// back to QUIC).
pub(crate) async fn connect(name: &str) -> std::result::Result<Option<UnixStream>, String> {
    #[cfg(target_os = "linux")]
    {
        let addr = abstract_addr(name).map_err(|e| e.to_string())?;
        let stream = match std::os::unix::net::UnixStream::connect_addr(&addr) {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
                return Ok(None)
            }
            Err(e) => return Err(format!("cannot connect to the same-host socket: {e}")),
        };
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stream = UnixStream::from_std(stream).map_err(|e| e.to_string())?;
        check_same_user(&stream)?;
        Ok(Some(stream))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = name;
        Ok(None)
    }
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
        let Some(SplitFrame::Split { head, bodies }) = read_split(&mut read, 1 << 20, "a frame").await.expect("read")
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
        match read_split(&mut read, 1 << 20, "a frame").await {
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
        match read_split(&mut read, 1 << 20, "a frame").await {
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
        match read_split(&mut read, 1 << 20, "a frame").await {
            Err(FrameError::Cut(d)) => assert!(d.contains("ended") && d.contains("bytes into a frame"), "{d}"),
            Err(e) => panic!("not a cut: {e:?}"),
            Ok(_) => panic!("a cut frame was accepted"),
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
            let split = match read_split(&mut read, 1 << 20, "a frame").await {
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
        match read_split(&mut read, 1 << 20, "a frame").await {
            Err(FrameError::Protocol(d)) => assert!(d.contains("over the limit"), "{d}"),
            other => panic!("not refused: {:?}", other.map(|f| f.is_some())),
        }
    }

    #[test]
    fn names_differ_by_job_and_port() {
        assert_ne!(socket_name("aa", 1), socket_name("ab", 1));
        assert_ne!(socket_name("aa", 1), socket_name("aa", 2));
    }
}
