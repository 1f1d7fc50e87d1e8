//! Reading length-prefixed frames (a u64 little-endian length, then that many bytes) from either
//! transport of the data plane: a QUIC stream or a same-host Unix socket. One reader serves both
//! ([`FrameSource`] says where the bytes come from and what a cut stream means there), whole
//! ([`read_frame`]) or split ([`read_split`]: a `net::wire` frame's bodies read straight into the
//! floats the packet will carry, one copy where reading the frame and then decoding it makes two).

use super::frame::{FrameError, CHECKSUM_BYTES};
use crate::net::wire;
use std::mem::MaybeUninit;
use tokio::io::AsyncRead;
use tokio::net::unix::OwnedReadHalf;

/// Where a frame's bytes come from.
pub(crate) trait FrameSource {
    /// Read at least one byte into the front of `dst` (not empty) and say how many; `Ok(0)` only
    /// when the stream ended. The bytes written are initialised.
    async fn read_some(&mut self, dst: &mut [MaybeUninit<u8>]) -> Result<usize, FrameError>;

    /// What a stream that ends inside a frame means here, described by `detail`.
    fn ended(&self, detail: String) -> FrameError;
}

/// QUIC: the stream's chunks, copied out as they arrive. A stream that ends inside a frame is the
/// peer's doing (QUIC delivers every byte it was given), a protocol violation.
impl FrameSource for quinn::RecvStream {
    async fn read_some(&mut self, dst: &mut [MaybeUninit<u8>]) -> Result<usize, FrameError> {
        match self.read_chunk(dst.len(), true).await {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len().min(dst.len());
                // SAFETY: `n` bytes fit both; `dst` is writable memory of bytes (any value is a
                // valid `u8`), and the chunk is a separate buffer, so they do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(chunk.bytes.as_ptr(), dst.as_mut_ptr().cast::<u8>(), n) };
                Ok(n)
            }
            Ok(None) => Ok(0),
            Err(e) => Err(FrameError::Lost(e)),
        }
    }

    fn ended(&self, detail: String) -> FrameError {
        FrameError::Protocol(detail)
    }
}

/// A same-host socket, read straight into the destination. Over a local socket only the writer's
/// end cuts a frame short (its process went away): a loss, not a violation.
impl FrameSource for OwnedReadHalf {
    async fn read_some(&mut self, dst: &mut [MaybeUninit<u8>]) -> Result<usize, FrameError> {
        let mut buf = tokio::io::ReadBuf::uninit(dst);
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut *self).poll_read(cx, &mut buf))
            .await
            .map_err(|e| FrameError::Cut(format!("the connection failed: {e}")))?;
        Ok(buf.filled().len())
    }

    fn ended(&self, detail: String) -> FrameError {
        FrameError::Cut(detail)
    }
}

/// One frame being read: `got` of its `n` bytes so far (for the messages).
struct Reading<'a, S> {
    src: &'a mut S,
    what: &'a str,
    n: usize,
    got: usize,
}

impl<S: FrameSource> Reading<'_, S> {
    /// Fill all of `dst`.
    async fn fill(&mut self, dst: &mut [MaybeUninit<u8>]) -> Result<(), FrameError> {
        let mut at = 0;
        while at < dst.len() {
            let k = self.src.read_some(&mut dst[at..]).await?;
            if k == 0 {
                return Err(self.src.ended(format!(
                    "the stream ended {} bytes into {} of {} bytes",
                    self.got, self.what, self.n
                )));
            }
            at += k;
            self.got += k;
        }
        Ok(())
    }

    /// Read on until `buf` holds `to` bytes, into its spare capacity (megabytes per frame, not
    /// zeroed first).
    async fn extend(&mut self, buf: &mut Vec<u8>, to: usize) -> Result<(), FrameError> {
        let more = to.saturating_sub(buf.len());
        buf.reserve_exact(more);
        let start = buf.len();
        self.fill(&mut buf.spare_capacity_mut()[..more]).await?;
        // SAFETY: `fill` initialised the `more` bytes after the first `start`.
        unsafe { buf.set_len(start + more) };
        Ok(())
    }

    /// Read `len` floats (little-endian bytes on the wire) straight into a new vector, never
    /// zeroed first.
    async fn floats(&mut self, len: usize) -> Result<Vec<f32>, FrameError> {
        let mut out = Vec::<f32>::with_capacity(len);
        // The spare capacity holds `len` f32s = `4 len` bytes (the caller checked that they fit
        // the frame), viewed as bytes for the source to fill; `out` is not touched meanwhile.
        // SAFETY: `MaybeUninit<u8>` has no validity requirement and an alignment of 1, and the
        // view covers exactly the spare capacity's bytes.
        let spare = unsafe {
            std::slice::from_raw_parts_mut(out.spare_capacity_mut().as_mut_ptr().cast::<MaybeUninit<u8>>(), 4 * len)
        };
        self.fill(spare).await?;
        // SAFETY: `fill` initialised all `4 len` bytes, and every bit pattern is a valid f32.
        unsafe { out.set_len(len) };
        crate::kernels::bytes::floats_from_le_in_place(&mut out);
        Ok(out)
    }
}

/// Read a frame's length and check it against `max`: `None` when the stream ended cleanly before
/// a frame began.
async fn read_len<S: FrameSource>(src: &mut S, max: usize, what: &str) -> Result<Option<usize>, FrameError> {
    let mut len = [MaybeUninit::<u8>::uninit(); 8];
    let first = src.read_some(&mut len).await?;
    if first == 0 {
        return Ok(None);
    }
    let mut at = first;
    while at < len.len() {
        let k = src.read_some(&mut len[at..]).await?;
        if k == 0 {
            return Err(src.ended(format!("the stream ended {at} bytes into the 8-byte length of {what}")));
        }
        at += k;
    }
    // SAFETY: all 8 bytes were written by `read_some`.
    let n = u64::from_le_bytes(len.map(|b| unsafe { b.assume_init() }));
    if n > max as u64 {
        return Err(FrameError::Protocol(format!(
            "{what} of {n} bytes is over the limit of {max} bytes"
        )));
    }
    // n <= max, a usize.
    Ok(Some(n as usize))
}

/// Read one frame of at most `max` bytes (`what` names it in errors): `None` when the stream ended
/// cleanly before a frame began; an error for a length above `max` (before allocating anything),
/// a frame cut short (what that means is the source's: [`FrameSource::ended`]), or a failed stream.
pub(crate) async fn read_frame<S: FrameSource>(
    src: &mut S,
    max: usize,
    what: &str,
) -> Result<Option<Vec<u8>>, FrameError> {
    let Some(n) = read_len(src, max, what).await? else {
        return Ok(None);
    };
    let mut buf = Vec::new();
    Reading { src, what, n, got: 0 }.extend(&mut buf, n).await?;
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

/// [`read_frame`] of a sealed `net::wire` frame, the bodies read straight into floats. The
/// checksum is checked over the bytes as read; a mismatch is a protocol violation with
/// [`super::frame::open`]'s message, and so is a table of more than `max_bodies` bodies (refused
/// before it is read: its lengths and the empty bodies they made cost about five times the
/// frame's bytes).
pub(crate) async fn read_split<S: FrameSource>(
    src: &mut S,
    max: usize,
    max_bodies: usize,
    what: &str,
) -> Result<Option<SplitFrame>, FrameError> {
    let Some(n) = read_len(src, max, what).await? else {
        return Ok(None);
    };
    let mut r = Reading { src, what, n, got: 0 };
    let mut head = Vec::new();
    loop {
        if let Some(count) = wire::head_body_count(&head).filter(|&c| c > max_bodies) {
            return Err(FrameError::Protocol(format!(
                "{what} lists {count} bodies, more than the {max_bodies} a packet of this run can carry"
            )));
        }
        let need = wire::head_need(&head);
        if need <= head.len() {
            break;
        }
        if need.saturating_add(CHECKSUM_BYTES) > n {
            return r.extend(&mut head, n).await.map(|()| Some(SplitFrame::Whole(head)));
        }
        r.extend(&mut head, need).await?;
    }
    let lens = wire::head_body_lens(&head, what).ok();
    let body_bytes = lens.as_ref().and_then(|lens| {
        lens.iter()
            .try_fold(0usize, |sum, &l| sum.checked_add(l.checked_mul(4)?))
    });
    let (Some(lens), true) = (
        lens,
        body_bytes.and_then(|b| b.checked_add(head.len() + CHECKSUM_BYTES)) == Some(n),
    ) else {
        return r.extend(&mut head, n).await.map(|()| Some(SplitFrame::Whole(head)));
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    let mut bodies = Vec::with_capacity(lens.len());
    for len in lens {
        let body = r.floats(len).await?;
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
    r.extend(&mut sent, CHECKSUM_BYTES).await?;
    let sent = u32::from_le_bytes([sent[0], sent[1], sent[2], sent[3]]);
    let got = crc.finalize();
    if got != sent {
        return Err(FrameError::Protocol(super::frame::damaged(n, got, sent)));
    }
    Ok(Some(SplitFrame::Split { head, bodies }))
}

/// A data-plane packet frame of at most `max` bytes: read split ([`read_split`]) when the codec's
/// frames are `net::wire` frames (`split`), else whole.
pub(crate) async fn read_packet<S: FrameSource>(
    src: &mut S,
    split: bool,
    max: usize,
    max_bodies: usize,
) -> Result<Option<SplitFrame>, FrameError> {
    const WHAT: &str = "a packet frame";
    if split {
        read_split(src, max, max_bodies, WHAT).await
    } else {
        Ok(read_frame(src, max, WHAT).await?.map(SplitFrame::Whole))
    }
}
