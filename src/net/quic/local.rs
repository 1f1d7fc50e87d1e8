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
//! floats from the packet itself (a gathering write after the frame's head) and [`read_split`]
//! reads them straight into the floats the packet will carry.
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

use super::frame::{FrameError, CHECKSUM_BYTES};
use crate::error::{Error, Result};
use crate::net::wire::{self, Encoded};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
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

/// Read one frame's length (u64 LE) and check it against `max`: `None` when the stream ended
/// cleanly before it began.
async fn read_len(recv: &mut OwnedReadHalf, max: usize, what: &str) -> std::result::Result<Option<usize>, FrameError> {
    let mut len = [0u8; 8];
    let mut got = 0;
    while got < len.len() {
        match recv.read(&mut len[got..]).await {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(FrameError::Cut(format!(
                    "the connection ended inside the length of {what}"
                )))
            }
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Cut(format!("the connection failed: {e}"))),
        }
    }
    let n = u64::from_le_bytes(len);
    if n > max as u64 {
        return Err(FrameError::Protocol(format!(
            "{what} of {n} bytes is over the limit of {max} bytes"
        )));
    }
    // n <= max, a usize.
    Ok(Some(n as usize))
}

/// Read until `buf` holds `n` bytes, into its spare capacity (megabytes per frame, not zeroed
/// first). `what` of `total` bytes names the frame in errors.
async fn read_into(
    recv: &mut OwnedReadHalf,
    buf: &mut Vec<u8>,
    n: usize,
    what: &str,
    total: usize,
) -> std::result::Result<(), FrameError> {
    buf.reserve_exact(n.saturating_sub(buf.len()));
    while buf.len() < n {
        let want = n - buf.len();
        match (&mut *recv).take(want as u64).read_buf(buf).await {
            Ok(0) => {
                return Err(FrameError::Cut(format!(
                    "the connection ended inside {what} of {total} bytes"
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(FrameError::Cut(format!("the connection failed: {e}"))),
        }
    }
    Ok(())
}

/// Read `len` floats (little-endian bytes on the socket) straight into a new vector: the socket's
/// bytes are copied once, into the floats the packet carries, and never zeroed first.
async fn read_floats(
    recv: &mut OwnedReadHalf,
    len: usize,
    what: &str,
    total: usize,
) -> std::result::Result<Vec<f32>, FrameError> {
    let mut out = Vec::<f32>::with_capacity(len);
    let bytes = 4 * len; // the caller checked that the bodies fit the frame's length
                         // SAFETY: the spare capacity of `out` holds `len` f32s = `bytes` bytes; viewed as
                         // `MaybeUninit<u8>` (no validity requirement) for the socket to fill. `out` is neither read nor
                         // moved while `spare` lives.
    let spare = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(), bytes) };
    let mut buf = tokio::io::ReadBuf::uninit(spare);
    while buf.remaining() > 0 {
        let before = buf.filled().len();
        let polled = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *recv).poll_read(cx, &mut buf)).await;
        match polled {
            Ok(()) if buf.filled().len() == before => {
                return Err(FrameError::Cut(format!(
                    "the connection ended inside {what} of {total} bytes"
                )))
            }
            Ok(()) => {}
            Err(e) => return Err(FrameError::Cut(format!("the connection failed: {e}"))),
        }
    }
    // SAFETY: `buf` was filled completely: all `bytes` bytes of the first `len` elements are
    // initialised by the socket, and every bit pattern is a valid f32.
    unsafe { out.set_len(len) };
    if cfg!(target_endian = "big") {
        for x in &mut out {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
    }
    Ok(out)
}

/// Read one frame of at most `max` bytes (`what` names it): `None` when the stream ended cleanly
/// before a frame began. A stream that ends inside a frame was cut (its writer went away), which is
/// a loss here, not a protocol violation: over a local socket nothing else cuts a frame.
pub(crate) async fn read_frame(
    recv: &mut OwnedReadHalf,
    max: usize,
    what: &str,
) -> std::result::Result<Option<Vec<u8>>, FrameError> {
    let Some(n) = read_len(recv, max, what).await? else {
        return Ok(None);
    };
    let mut buf = Vec::new();
    read_into(recv, &mut buf, n, what, n).await?;
    Ok(Some(buf))
}

/// A sealed `net::wire` frame as [`read_split`] read it.
pub(crate) enum SplitFrame {
    /// Its head (everything before the bodies) and its bodies, read straight into floats; the
    /// checksum matched.
    Split { head: Vec<u8>, bodies: Vec<Vec<f32>> },
    /// The whole frame as bytes, checksum included: its head did not describe a frame of its
    /// length, so it is checked and decoded the ordinary way ([`super::frame::open`] first, so
    /// that damaged bytes are reported as damage).
    Whole(Vec<u8>),
}

/// The frame of `n` bytes whose first bytes are `buf`, read whole.
async fn rest_of_frame(
    recv: &mut OwnedReadHalf,
    mut buf: Vec<u8>,
    n: usize,
    what: &str,
) -> std::result::Result<Option<SplitFrame>, FrameError> {
    read_into(recv, &mut buf, n, what, n).await?;
    Ok(Some(SplitFrame::Whole(buf)))
}

/// [`read_frame`] of a sealed `net::wire` frame, the bodies read straight into floats: one copy
/// (socket to floats) where reading the frame and then decoding it makes two. The checksum is
/// checked over the bytes as read; a mismatch is a protocol violation with
/// [`super::frame::open`]'s message.
pub(crate) async fn read_split(
    recv: &mut OwnedReadHalf,
    max: usize,
    what: &str,
) -> std::result::Result<Option<SplitFrame>, FrameError> {
    let Some(n) = read_len(recv, max, what).await? else {
        return Ok(None);
    };
    let mut head = Vec::new();
    loop {
        let need = wire::head_need(&head);
        if need <= head.len() {
            break;
        }
        if need.saturating_add(CHECKSUM_BYTES) > n {
            return rest_of_frame(recv, head, n, what).await;
        }
        read_into(recv, &mut head, need, what, n).await?;
    }
    let Ok(lens) = wire::head_body_lens(&head, what) else {
        return rest_of_frame(recv, head, n, what).await;
    };
    let body_bytes = lens
        .iter()
        .try_fold(0usize, |sum, &l| sum.checked_add(l.checked_mul(4)?));
    if body_bytes.and_then(|b| b.checked_add(head.len() + CHECKSUM_BYTES)) != Some(n) {
        return rest_of_frame(recv, head, n, what).await;
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    let mut bodies = Vec::with_capacity(lens.len());
    for len in lens {
        let body = read_floats(recv, len, what, n).await?;
        if cfg!(target_endian = "little") {
            crc.update(bytemuck::cast_slice(&body));
        } else {
            for x in &body {
                crc.update(&x.to_le_bytes());
            }
        }
        bodies.push(body);
    }
    let mut sent = Vec::new();
    read_into(recv, &mut sent, CHECKSUM_BYTES, what, n).await?;
    let sent = u32::from_le_bytes([sent[0], sent[1], sent[2], sent[3]]);
    let got = crc.finalize();
    if got != sent {
        return Err(FrameError::Protocol(super::frame::damaged(n, got, sent)));
    }
    Ok(Some(SplitFrame::Split { head, bodies }))
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
            Err(FrameError::Cut(d)) => assert!(d.contains("ended inside a frame"), "{d}"),
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
