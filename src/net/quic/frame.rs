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
    write_chunks(send, vec![bytes::Bytes::from(bytes)]).await
}

/// Write one frame whose bytes are `chunks`, one after the other: they move into quinn's send
/// buffer without a copy (a state copy's tensors, each owned by its chunk).
pub async fn write_chunks(send: &mut quinn::SendStream, chunks: Vec<bytes::Bytes>) -> Result<()> {
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut all = Vec::with_capacity(1 + chunks.len());
    all.push(bytes::Bytes::copy_from_slice(&(total as u64).to_le_bytes()));
    all.extend(chunks);
    send.write_all_chunks(&mut all)
        .await
        .map_err(|e| Error::runtime(format!("cannot write a frame: {e}")))
}

/// Read one frame of at most `max` bytes (`what` names it in errors). `None` when the stream ended
/// cleanly before a frame began; an error for a length above `max` (before allocating anything), a
/// frame cut short, or a failed stream.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize, what: &str) -> Result<Option<Vec<u8>>> {
    super::reader::read_frame(recv, max, what).await.map_err(|e| match e {
        FrameError::Lost(e) => Error::runtime(format!("cannot read {what}: {e}")),
        FrameError::Cut(e) => Error::runtime(format!("cannot read {what}: {e}")),
        FrameError::Protocol(detail) => Error::parse(what, detail),
    })
}

/// Bytes of the checksum that ends every packet frame of the data plane.
pub const CHECKSUM_BYTES: usize = 4;

/// End a packet frame with the CRC-32 of its bytes (little-endian), so that the receiver can tell
/// damaged bytes from a valid packet: a flipped byte of tensor data still decodes (as another
/// float), and only the checksum refuses it. One pass over the bytes, and no copy when the
/// encoder left [`CHECKSUM_BYTES`] of spare capacity (`net::wire`'s encoder does).
pub fn seal(bytes: &mut Vec<u8>) {
    let crc = crc32fast::hash(bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
}

/// The bytes of a frame [`seal`] ended, without its checksum, once the checksum matches (one pass,
/// no copy: a slice of `frame`); what is wrong otherwise.
pub fn open(frame: &[u8]) -> std::result::Result<&[u8], String> {
    let Some(split) = frame.len().checked_sub(CHECKSUM_BYTES) else {
        return Err(format!(
            "a frame of {} bytes, shorter than its {CHECKSUM_BYTES}-byte checksum",
            frame.len()
        ));
    };
    let (body, tail) = frame.split_at(split);
    let mut sent = [0u8; CHECKSUM_BYTES];
    sent.copy_from_slice(tail);
    let sent = u32::from_le_bytes(sent);
    let got = crc32fast::hash(body);
    if got != sent {
        return Err(damaged(frame.len(), got, sent));
    }
    Ok(body)
}

/// What is wrong with a frame of `len` bytes whose checksum is `got`, not `sent`.
pub(crate) fn damaged(len: usize, got: u32, sent: u32) -> String {
    format!(
        "a frame of {len} bytes whose CRC-32 is {got:08x}, not the {sent:08x} it was sent with: its bytes were \
         damaged on the way"
    )
}

/// Damage a sealed frame as a faulty link would (a chaos fault): flip every bit of the byte in its
/// middle (in a packet that carries tensors, a byte of tensor data, which would decode as a valid
/// float). An empty frame stays empty.
pub fn damage(frame: &mut [u8]) {
    let at = frame.len() / 2;
    if let Some(b) = frame.get_mut(at) {
        *b ^= 0xff;
    }
}

#[cfg(test)]
mod checksum_tests {
    use super::*;

    #[test]
    fn a_flipped_byte_anywhere_in_a_frame_is_refused() {
        let mut frame: Vec<u8> = (0..257u32).map(|i| (i * 31 % 251) as u8).collect();
        seal(&mut frame);
        assert_eq!(open(&frame).expect("intact").len(), 257);
        for at in 0..frame.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = frame.clone();
                bad[at] ^= flip;
                let e = open(&bad).expect_err("a damaged frame");
                assert!(e.contains("damaged"), "{e}");
            }
        }
        let mut bad = frame.clone();
        damage(&mut bad);
        assert!(open(&bad).is_err(), "the chaos fault's damage is refused");
        assert!(open(&[1, 2, 3]).expect_err("too short").contains("shorter"));
    }

    #[test]
    fn the_checksum_is_taken_in_place_without_a_copy() {
        // A packet frame as the data plane sends it: the wire encoder leaves room for the checksum,
        // so sealing it appends in place, and opening it hands back a slice of the same buffer.
        let packet = crate::net::Packet {
            from: 0,
            to: 1,
            id: 7,
            payload: crate::net::Payload::Tensors(vec![(3, vec![0.5f32; 1000])]),
        };
        let mut frame = crate::net::wire::encode_packet(2, &packet).expect("encode");
        let (at, len) = (frame.as_ptr(), frame.len());
        assert!(frame.capacity() >= len + CHECKSUM_BYTES, "room for the checksum");
        seal(&mut frame);
        assert_eq!(frame.as_ptr(), at, "sealing did not move (copy) the frame");
        assert_eq!(frame.len(), len + CHECKSUM_BYTES);
        let body = open(&frame).expect("intact");
        assert_eq!(body.as_ptr(), at, "the opened body is the frame's own bytes");
        assert_eq!(body.len(), len);
    }
}
