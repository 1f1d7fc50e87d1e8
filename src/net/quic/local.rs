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
//! into and one out of the kernel.
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

use super::frame::FrameError;
use crate::error::{Error, Result};
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

/// Read one frame of at most `max` bytes (`what` names it): `None` when the stream ended cleanly
/// before a frame began. A stream that ends inside a frame was cut (its writer went away), which is
/// a loss here, not a protocol violation: over a local socket nothing else cuts a frame.
pub(crate) async fn read_frame(
    recv: &mut OwnedReadHalf,
    max: usize,
    what: &str,
) -> std::result::Result<Option<Vec<u8>>, FrameError> {
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
    // n <= max, a usize. Read into the spare capacity: megabytes per frame, not zeroed first.
    let n = n as usize;
    let mut buf = Vec::with_capacity(n);
    while buf.len() < n {
        match recv.read_buf(&mut buf).await {
            Ok(0) => {
                return Err(FrameError::Cut(format!(
                    "the connection ended inside {what} of {n} bytes"
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(FrameError::Cut(format!("the connection failed: {e}"))),
        }
    }
    Ok(Some(buf))
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

    #[test]
    fn names_differ_by_job_and_port() {
        assert_ne!(socket_name("aa", 1), socket_name("ab", 1));
        assert_ne!(socket_name("aa", 1), socket_name("aa", 2));
    }
}
