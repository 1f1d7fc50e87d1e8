//! Length-prefixed frames on QUIC streams: a u64 little-endian length, then that many bytes.

use crate::error::{Error, Result};

/// Why a frame could not be read: the connection or stream went away, or the peer sent something
/// that is not a frame (which is the peer's fault, not the network's).
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The stream or its connection failed (reset, closed, timed out).
    Lost(quinn::ReadError),
    /// The peer broke the framing: an oversized length or a truncated frame.
    Protocol(String),
    /// A same-host connection ended or failed (over a local socket only the writer's end cuts a
    /// frame short, so this is a loss, not a violation).
    Cut(String),
}

/// Write one frame: `bytes.len()` as u64 LE, then `bytes`.
pub async fn write_frame(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<()> {
    let len = (bytes.len() as u64).to_le_bytes();
    send.write_all(&len)
        .await
        .map_err(|e| Error::runtime(format!("cannot write a frame: {e}")))?;
    send.write_all(bytes)
        .await
        .map_err(|e| Error::runtime(format!("cannot write a frame: {e}")))
}

/// Write one frame that the caller no longer needs: the bytes move into quinn's send buffer
/// without a copy (the data plane's packets, megabytes per step).
pub async fn write_frame_owned(send: &mut quinn::SendStream, bytes: Vec<u8>) -> Result<()> {
    let len = bytes::Bytes::copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    let mut chunks = [len, bytes::Bytes::from(bytes)];
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(|e| Error::runtime(format!("cannot write a frame: {e}")))
}

/// Read one frame of at most `max` bytes (`what` names it in errors). `None` when the stream ended
/// cleanly before a frame began; an error for a length above `max` (before allocating anything), a
/// frame cut short, or a failed stream.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize, what: &str) -> Result<Option<Vec<u8>>> {
    read_frame_raw(recv, max, what).await.map_err(|e| match e {
        FrameError::Lost(e) => Error::runtime(format!("cannot read {what}: {e}")),
        FrameError::Cut(e) => Error::runtime(format!("cannot read {what}: {e}")),
        FrameError::Protocol(detail) => Error::parse(what, detail),
    })
}

/// [`read_frame`], telling a lost stream from a peer's protocol violation.
pub(crate) async fn read_frame_raw(
    recv: &mut quinn::RecvStream,
    max: usize,
    what: &str,
) -> std::result::Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 8];
    let mut got = 0;
    while got < len.len() {
        match recv.read(&mut len[got..]).await {
            Ok(Some(n)) => got += n,
            Ok(None) if got == 0 => return Ok(None),
            Ok(None) => {
                return Err(FrameError::Protocol(format!(
                    "the stream ended {got} bytes into the 8-byte length of {what}"
                )))
            }
            Err(e) => return Err(FrameError::Lost(e)),
        }
    }
    let n = u64::from_le_bytes(len);
    if n > max as u64 {
        return Err(FrameError::Protocol(format!(
            "{what} of {n} bytes is over the limit of {max} bytes"
        )));
    }
    // n <= max, a usize.
    let mut buf = vec![0u8; n as usize];
    match recv.read_exact(&mut buf).await {
        Ok(()) => Ok(Some(buf)),
        Err(quinn::ReadExactError::FinishedEarly(read)) => Err(FrameError::Protocol(format!(
            "the stream ended {read} bytes into {what} of {n} bytes"
        ))),
        Err(quinn::ReadExactError::ReadError(e)) => Err(FrameError::Lost(e)),
    }
}
