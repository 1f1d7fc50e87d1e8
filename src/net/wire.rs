//! The bounded binary codec of the multi-process runtime: packets and the training state as frames.
//!
//! A frame is `[u32 LE header length][bincode header][u32 LE body count][u64 LE length (in f32s)
//! per body][raw LE f32 bodies]`. The header carries the metadata (a few bytes of varints), the
//! bodies the tensor data, copied once without any per-float decoding logic of bincode.
//!
//! Every length read from the wire is checked against [`Limits`] and against the bytes actually
//! present *before* anything is allocated: a peer cannot make a worker reserve gigabytes with a
//! forged length, and a malformed frame is an [`Error::Parse`] naming what is wrong, never a panic.
//! The header is decoded by bincode with an explicit limit (bincode's `standard()` has none and
//! reserves whatever a length says), chosen from the header's own size.
//!
//! The limits of a packet come from the run's [`PacketShape`]: a header of at most 144 bytes of
//! fixed fields plus 27 per possible segment, 9 per tensor or a 4 KiB failure detail; at most one
//! body per (group, expert) or per tensor; at most the whole model's floats, or every group's
//! tokens times k rows of `d_model` floats. Each kind is then checked on its own (body count,
//! indices, lengths) before its bodies are copied. The training state's limits are its config's
//! model: the tensor names, three bodies per tensor, three times the model's floats.

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::gpt::Gpt;
use crate::net::collective::plane::{PlaneData, PlaneMsg, PlaneOp};
use crate::net::{Packet, Payload, Segment, StepId};
use crate::optimizer::{self, AdamW};
use bincode::{Decode, Encode};
use std::collections::HashSet;
use std::sync::Arc;

/// Limits of one frame kind: checked before anything is allocated.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most bytes the bincode header may take.
    pub header_bytes: usize,
    /// The most bodies (tensors, segments) a frame may carry.
    pub bodies: usize,
    /// The most f32s all bodies may hold together.
    pub floats: usize,
}

impl Limits {
    /// The most bytes a frame within these limits takes: the header's length and the body count
    /// (4 bytes each), the header, a length per body (8 bytes) and the floats.
    pub fn frame_bytes(&self) -> usize {
        8usize
            .saturating_add(self.header_bytes)
            .saturating_add(self.bodies.saturating_mul(8))
            .saturating_add(self.floats.saturating_mul(4))
    }
}

/// The longest header any frame may have, whatever its [`Limits`]: the largest the control plane
/// and the state's frames ask for (a reply listing every expert of a wide model, 12 bytes each,
/// passes 512 KiB at 12 layers of 1,024 experts), and it keeps the bincode limit (at most
/// [`HEADER_EXPANSION`] times the header's bytes) within 128 MiB. A sender refuses to encode a
/// longer one (its own error, rather than a frame its peer refuses as a protocol violation).
pub const MAX_HEADER_BYTES: usize = 4 << 20;

/// How many bytes of memory bincode may claim per byte of header: a varint of one byte becomes a
/// `u64` of 8, and a `(String, u64)` of two bytes an element of 32. A forged length inside a header
/// is refused by bincode's limit before it reserves more than this many times the header's size.
pub const HEADER_EXPANSION: usize = 32;

/// The most bytes a [`Payload::Failed`] detail may have.
pub const MAX_FAILED_DETAIL: usize = 4096;

/// A failure's detail, within what a packet may carry ([`MAX_FAILED_DETAIL`]; a peer's decoder
/// refuses a longer one, and with it the sender, as a protocol violation).
pub fn clip_detail(detail: String) -> String {
    clip_to(detail, MAX_FAILED_DETAIL)
}

/// `detail` cut to at most `max` bytes (at least 3), ending in `...` where it was cut (at a
/// character boundary).
pub fn clip_to(mut detail: String, max: usize) -> String {
    if detail.len() > max {
        let mut end = max.max(3) - 3;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push_str("...");
    }
    detail
}

impl Payload {
    /// The answer to a request that failed with `e`, its detail clipped to what a packet carries.
    pub fn failed(e: &Error) -> Payload {
        Payload::Failed {
            restartable: e.is_restartable(),
            detail: clip_detail(e.to_string()),
        }
    }
}

/// The most bytes one varint of bincode's standard configuration takes (a tag and a `u64`).
const VARINT_BYTES: usize = 9;

/// Encode a frame: `header` by bincode, then the bodies as raw little-endian f32s.
pub fn encode_frame<H: Encode>(header: &H, bodies: &[&[f32]]) -> Result<Vec<u8>> {
    Ok(Encoded {
        head: frame_head(header, bodies)?,
        bodies: bodies.to_vec(),
    }
    .concat())
}

/// A frame in two parts: its head (the header's length and bytes, the body count and length
/// table) and its bodies, still the sender's floats. Written one after the other they are the
/// frame's bytes ([`Encoded::concat`]); a writer that can gather (`writev`) sends them without
/// copying the bodies into one buffer first.
pub struct Encoded<'a> {
    /// Everything before the bodies.
    pub head: Vec<u8>,
    /// The bodies, in order.
    pub bodies: Vec<&'a [f32]>,
}

impl Encoded<'_> {
    /// Bytes of the whole frame.
    pub fn len(&self) -> usize {
        self.head.len() + 4 * self.bodies.iter().map(|b| b.len()).sum::<usize>()
    }

    /// Whether the frame has no bytes (never, for a frame of [`encode_frame`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame as one buffer, with room for the data plane's checksum (`net::quic`), which it
    /// appends without a copy.
    pub fn concat(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() + crate::net::quic::CHECKSUM_BYTES);
        out.extend_from_slice(&self.head);
        for body in &self.bodies {
            crate::kernels::bytes::extend_floats_le(&mut out, body);
        }
        out
    }

    /// The bodies as little-endian bytes, as they travel (a view on a little-endian machine);
    /// `None` on a big-endian one, whose floats must be converted ([`Encoded::concat`]).
    pub fn body_bytes(&self) -> Option<Vec<&[u8]>> {
        cfg!(target_endian = "little").then(|| self.bodies.iter().map(|b| bytemuck::cast_slice(b)).collect())
    }
}

/// [`encode_frame`] in two parts, the bodies left where they are (see [`Encoded`]).
pub fn encode_frame_parts<'a, H: Encode>(header: &H, bodies: Vec<&'a [f32]>) -> Result<Encoded<'a>> {
    Ok(Encoded {
        head: frame_head(header, &bodies)?,
        bodies,
    })
}

/// The head of a frame with `header` and `bodies`: the header's length and bincode bytes, the body
/// count, each body's length in floats.
fn frame_head<H: Encode>(header: &H, bodies: &[&[f32]]) -> Result<Vec<u8>> {
    let head = bincode::encode_to_vec(header, bincode::config::standard())
        .map_err(|e| Error::parse("frame header", format!("cannot encode: {e}")))?;
    if head.len() > MAX_HEADER_BYTES {
        return Err(Error::runtime(format!(
            "a frame header of {} bytes is longer than the protocol allows ({MAX_HEADER_BYTES} bytes): the model \
             has too many tensors or experts for one message",
            head.len()
        )));
    }
    let head_len = u32::try_from(head.len())
        .map_err(|_| Error::parse("frame header", format!("{} bytes do not fit a u32 length", head.len())))?;
    let count = u32::try_from(bodies.len())
        .map_err(|_| Error::parse("frame", format!("{} bodies do not fit a u32", bodies.len())))?;
    let mut out = Vec::with_capacity(8 + head.len() + 8 * bodies.len());
    out.extend_from_slice(&head_len.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&count.to_le_bytes());
    for body in bodies {
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    }
    Ok(out)
}

/// How many bytes the head of the frame that starts with `prefix` has, as far as `prefix` tells:
/// 4 (the header's length) until those are there, then up to the body count, then the whole head.
/// A reader reads until it has as many bytes as this says and it says no more (then `prefix` is
/// the head, and [`head_body_lens`] reads its table). Saturates instead of overflowing on forged
/// lengths; the reader checks the result against the frame's length before reading on.
pub fn head_need(prefix: &[u8]) -> usize {
    let u32_at = |at: usize| {
        prefix
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let Some(head_len) = u32_at(0) else { return 4 };
    let through_count = 8usize.saturating_add(head_len);
    match u32_at(4 + head_len) {
        None => through_count,
        Some(count) => through_count.saturating_add(count.saturating_mul(8)),
    }
}

/// The body count of the frame head that starts with `prefix`, once `prefix` holds it (see
/// [`head_need`]).
pub fn head_body_count(prefix: &[u8]) -> Option<usize> {
    let head_len = u32::from_le_bytes(prefix.get(..4)?.try_into().ok()?) as usize;
    let at = 4usize.checked_add(head_len)?;
    let count = prefix.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(count.try_into().ok()?) as usize)
}

/// The body lengths (in floats) listed in a frame head that [`head_need`] says is complete; the
/// header itself is not decoded here (the codec does, with its limits). Errors name what is cut.
pub fn head_body_lens(head: &[u8], what: &str) -> Result<Vec<usize>> {
    let head_len = read_u32(head, 0, what, "header length")? as usize;
    if head_len > MAX_HEADER_BYTES {
        return Err(Error::parse(
            what,
            format!("header of {head_len} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes"),
        ));
    }
    let rest = head.get(4 + head_len..).unwrap_or_default();
    let count = read_u32(rest, 0, what, "body count")? as usize;
    let table = rest.get(4..4 + count.saturating_mul(8)).ok_or_else(|| {
        Error::parse(
            what,
            format!("truncated frame: the table of {count} body lengths is cut"),
        )
    })?;
    table
        .chunks_exact(8)
        .enumerate()
        .map(|(i, raw)| {
            let len = u64::from_le_bytes([raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7]]);
            usize::try_from(len).map_err(|_| Error::parse(what, format!("body {i} of {len} floats")))
        })
        .collect()
}

/// Decode a frame; refuses (Error::Parse naming what is wrong) a header longer than
/// `limits.header_bytes`, more bodies than `limits.bodies`, a total of floats above
/// `limits.floats`, lengths that do not add up to exactly the remaining bytes, trailing bytes, a
/// header bincode does not consume fully. Never panics; the bodies take no more memory than the
/// frame's own bytes, the decoded header at most [`HEADER_EXPANSION`] times its bytes (4 KiB at
/// least: the smallest bincode limit used).
pub fn decode_frame<H: Decode<()>>(bytes: &[u8], what: &str, limits: &Limits) -> Result<(H, Vec<Vec<f32>>)> {
    let (header, bodies) = parse_frame(bytes, what, limits)?;
    Ok((header, bodies.floats()))
}

/// A frame's checked bodies: still the frame's bytes (copied out by [`Bodies::floats`]), or read
/// straight into floats by a reader that split the frame ([`decode_packet_parts`]).
enum Bodies<'a> {
    Raw { lens: Vec<usize>, data: &'a [u8] },
    Read { lens: Vec<usize>, floats: Vec<Vec<f32>> },
}

impl Bodies<'_> {
    fn lens(&self) -> &[usize] {
        match self {
            Bodies::Raw { lens, .. } | Bodies::Read { lens, .. } => lens,
        }
    }

    /// The bodies as f32s (for raw bodies, the only allocation proportional to the frame).
    fn floats(self) -> Vec<Vec<f32>> {
        match self {
            Bodies::Raw { lens, data } => {
                let mut at = 0;
                lens.iter()
                    .map(|&len| {
                        let raw = data.get(at..at + 4 * len).unwrap_or_default();
                        at += 4 * len;
                        crate::kernels::bytes::floats_from_le(raw)
                    })
                    .collect()
            }
            Bodies::Read { floats, .. } => floats,
        }
    }
}

/// Read a little-endian u32 at `at`, or say which field is cut short.
fn read_u32(bytes: &[u8], at: usize, what: &str, field: &str) -> Result<u32> {
    match bytes.get(at..at.saturating_add(4)) {
        Some(&[a, b, c, d]) => Ok(u32::from_le_bytes([a, b, c, d])),
        _ => Err(Error::parse(
            what,
            format!("truncated frame: {} bytes end inside the {field}", bytes.len()),
        )),
    }
}

/// Decode a bincode header with the smallest of four limits (4 KiB, 64 KiB, 1 MiB, 128 MiB) that a
/// valid header of its size can need, so that a forged length inside it reserves at most
/// [`HEADER_EXPANSION`] times its size (4 KiB at least). The limit is a type parameter of bincode's
/// configuration, hence the fixed steps.
fn decode_header<H: Decode<()>>(head: &[u8], what: &str) -> Result<H> {
    fn with<H: Decode<()>, const N: usize>(head: &[u8]) -> std::result::Result<(H, usize), String> {
        bincode::decode_from_slice(head, bincode::config::standard().with_limit::<N>()).map_err(|e| e.to_string())
    }
    let need = head.len().saturating_mul(HEADER_EXPANSION);
    let decoded = if need <= 4 << 10 {
        with::<H, { 4 << 10 }>(head)
    } else if need <= 64 << 10 {
        with::<H, { 64 << 10 }>(head)
    } else if need <= 1 << 20 {
        with::<H, { 1 << 20 }>(head)
    } else {
        with::<H, { HEADER_EXPANSION * MAX_HEADER_BYTES }>(head)
    };
    let (header, used) = decoded.map_err(|e| Error::parse(what, format!("malformed header: {e}")))?;
    if used != head.len() {
        return Err(Error::parse(
            what,
            format!(
                "header of {} bytes has {} bytes bincode did not read",
                head.len(),
                head.len() - used
            ),
        ));
    }
    Ok(header)
}

/// Check a frame against `limits`: its header decoded, its bodies checked but left as bytes. The
/// packet and state decoders call the two halves separately, to validate the header (an epoch, the
/// tensor names) before the bodies are looked at.
fn parse_frame<'a, H: Decode<()>>(bytes: &'a [u8], what: &str, limits: &Limits) -> Result<(H, Bodies<'a>)> {
    let (header, rest) = split_header(bytes, what, limits.header_bytes)?;
    Ok((header, split_bodies(rest, what, limits)?))
}

/// Decode a frame's header (at most `limit` bytes) and return it with the bytes after it.
fn split_header<'a, H: Decode<()>>(bytes: &'a [u8], what: &str, limit: usize) -> Result<(H, &'a [u8])> {
    let head_len = read_u32(bytes, 0, what, "header length")? as usize;
    let limit = limit.min(MAX_HEADER_BYTES);
    if head_len > limit {
        return Err(Error::parse(
            what,
            format!("header of {head_len} bytes exceeds the limit of {limit} bytes"),
        ));
    }
    let head = bytes.get(4..4 + head_len).ok_or_else(|| {
        Error::parse(
            what,
            format!(
                "truncated frame: a header of {head_len} bytes, {} bytes follow its length",
                bytes.len() - 4
            ),
        )
    })?;
    Ok((decode_header(head, what)?, &bytes[4 + head_len..]))
}

/// Check the body count and length table after a header against `limits` and against the bytes
/// present: the lengths must fill them exactly.
fn split_bodies<'a>(bytes: &'a [u8], what: &str, limits: &Limits) -> Result<Bodies<'a>> {
    let (lens, total, data) = split_table(bytes, what, limits)?;
    let need = total.saturating_mul(4);
    if data.len() < need {
        return Err(Error::parse(
            what,
            format!(
                "truncated frame: bodies of {total} floats need {need} bytes, {} follow",
                data.len()
            ),
        ));
    }
    if data.len() > need {
        return Err(Error::parse(
            what,
            format!("{} trailing bytes after bodies of {total} floats", data.len() - need),
        ));
    }
    Ok(Bodies::Raw { lens, data })
}

/// The body count and length table at the start of `bytes`, checked against `limits`: the
/// lengths, their total in floats, and the bytes after the table.
fn split_table<'a>(bytes: &'a [u8], what: &str, limits: &Limits) -> Result<(Vec<usize>, usize, &'a [u8])> {
    let count = read_u32(bytes, 0, what, "body count")? as usize;
    if count > limits.bodies {
        return Err(Error::parse(
            what,
            format!("{count} bodies exceed the limit of {} bodies", limits.bodies),
        ));
    }
    let table = bytes.get(4..4 + 8 * count).ok_or_else(|| {
        Error::parse(
            what,
            format!(
                "truncated frame: a table of {count} body lengths needs {} bytes, {} follow",
                8 * count,
                bytes.len() - 4
            ),
        )
    })?;
    let mut lens = Vec::with_capacity(count);
    let mut total = 0usize;
    for (i, raw) in table.chunks_exact(8).enumerate() {
        let len = u64::from_le_bytes([raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= limits.floats)
            .ok_or_else(|| {
                Error::parse(
                    what,
                    format!("body {i} of {len} floats exceeds the limit of {} floats", limits.floats),
                )
            })?;
        total += len; // both at most limits.floats: no overflow while the total is checked each time
        if total > limits.floats {
            return Err(Error::parse(
                what,
                format!(
                    "bodies of {total} floats or more exceed the limit of {} floats",
                    limits.floats
                ),
            ));
        }
        lens.push(len);
    }
    Ok((lens, total, &bytes[4 + 8 * count..]))
}

/// What a packet must fit to be accepted: derived from the run's configuration.
#[derive(Clone, Debug)]
pub struct PacketShape {
    /// Number of workers (senders and receivers are `0..workers`).
    pub workers: usize,
    /// Groups per step (a segment's group is `0..groups`).
    pub groups: usize,
    /// Width of a segment's rows.
    pub d_model: usize,
    /// Experts per MoE layer.
    pub experts: usize,
    /// Number of MoE blocks.
    pub moe_blocks: usize,
    /// The transformer blocks that are MoE blocks, ascending: a packet's `block` is one of them.
    /// The runtime names an MoE block by its layer index (`Gpt::blocks`), not by its rank among
    /// the MoE blocks, so with `moe_every > 1` a check `block < moe_blocks` would refuse the last
    /// MoE blocks and accept dense ones.
    pub moe_layers: Vec<usize>,
    /// Floats of each tensor, in `Gpt::tensors` order.
    pub tensor_lens: Vec<usize>,
    /// Tokens of one group: the most rows one (group, expert) segment may hold, as top-k routing
    /// sends a token to an expert at most once.
    pub group_tokens: usize,
    /// Experts per token: a group's segments hold at most `k * group_tokens` rows in all.
    pub k: usize,
}

impl PacketShape {
    /// The shape of `config`'s packets among `workers` workers.
    pub fn of(config: &TrainConfig, workers: usize) -> Result<Self> {
        if workers == 0 || config.train.groups == 0 {
            return Err(Error::config(format!(
                "a packet shape needs a worker and a group ({workers} workers, train.groups {})",
                config.train.groups
            )));
        }
        let model = &config.model;
        model.validate()?;
        let tensor_lens = model.tensor_specs().iter().map(|s| s.shape.iter().product()).collect();
        let moe_layers: Vec<usize> = (0..model.n_layer).filter(|&l| model.is_moe(l)).collect();
        Ok(PacketShape {
            workers,
            groups: config.train.groups,
            d_model: model.d_model,
            experts: model.experts,
            moe_blocks: moe_layers.len(),
            moe_layers,
            tensor_lens,
            group_tokens: config.group_seqs().saturating_mul(model.block_size),
            k: model.k.min(model.experts),
        })
    }

    /// The most bytes an encoded packet of this shape may have (what a receiver may be asked to
    /// allocate for one peer's buffer of a collective).
    pub fn max_packet_bytes(&self) -> usize {
        self.packet_limits().frame_bytes()
    }

    /// The most bytes any frame this shape's packets decode from may have, a collective's message
    /// carrying one such packet included (the header's length, the header, the body count, the
    /// length table and the floats): what a data plane lets a peer announce, so that the bound
    /// grows with the model (a fixed one would refuse an honest packet of a large model) and stays
    /// near what the model needs (a peer cannot make a small run allocate gigabytes).
    pub fn max_frame_bytes(&self) -> usize {
        self.limits().frame_bytes()
    }

    /// The most bodies any frame this shape's packets decode from may list: a reader refuses a
    /// longer table before it allocates anything for it.
    pub fn max_frame_bodies(&self) -> usize {
        self.limits().bodies
    }

    /// The most segments a packet may carry: one per (group, expert).
    fn max_segments(&self) -> usize {
        self.groups.saturating_mul(self.experts)
    }

    /// The most floats a packet's segments may carry: every group's tokens, k rows each.
    fn segment_floats(&self) -> usize {
        self.groups
            .saturating_mul(self.group_tokens)
            .saturating_mul(self.k)
            .saturating_mul(self.d_model)
    }

    /// The frame limits of a packet of any kind (each kind is then checked on its own, before its
    /// bodies are copied): those of [`PacketShape::packet_limits`], and room for a collective's
    /// message carrying one such packet (`Payload::Collective`).
    fn limits(&self) -> Limits {
        let packets = self.packet_limits();
        Limits {
            floats: packets.floats.max(self.max_packet_bytes().div_ceil(4)),
            ..packets
        }
    }

    /// The frame limits of the packets a collective may carry: the header holds at most one entry
    /// per segment or tensor, or a failure detail; the floats at most the whole model or a step's
    /// expert rows.
    fn packet_limits(&self) -> Limits {
        let fixed = 16 * VARINT_BYTES;
        let segments = self.max_segments().saturating_mul(3 * VARINT_BYTES);
        let tensors = self.tensor_lens.len().saturating_mul(VARINT_BYTES);
        let failed = MAX_FAILED_DETAIL + VARINT_BYTES + 1;
        Limits {
            header_bytes: fixed.saturating_add(segments.max(tensors).max(failed)),
            bodies: self.max_segments().max(self.tensor_lens.len()),
            floats: self.segment_floats().max(self.tensor_lens.iter().sum()),
        }
    }
}

/// A packet's header on the wire: `usize`s as `u64`s, a segment's or tensor's metadata in the
/// order of its body.
#[derive(Encode, Decode)]
struct PacketHeader {
    epoch: u64,
    from: u64,
    to: u64,
    id: u64,
    kind: Kind,
}

/// A segment's metadata; its rows are the matching body.
#[derive(Encode, Decode)]
struct SegmentHeader {
    group: u64,
    expert: u64,
    rows: u64,
}

/// The payload's metadata (see [`Payload`]); tensor lists are tensor indices.
#[derive(Encode, Decode)]
enum Kind {
    ExpertForward {
        step: u64,
        attempt: u32,
        block: u64,
        segments: Vec<SegmentHeader>,
    },
    ExpertBackward {
        step: u64,
        attempt: u32,
        block: u64,
        segments: Vec<SegmentHeader>,
    },
    DenseGrads {
        step: u64,
        attempt: u32,
        group: u64,
        tensors: Vec<u64>,
    },
    Params {
        step: u64,
        attempt: u32,
        tensors: Vec<u64>,
    },
    Gather {
        step: u64,
        attempt: u32,
        tensors: Vec<u64>,
    },
    Segments(Vec<SegmentHeader>),
    Tensors(Vec<u64>),
    Ack,
    Failed {
        restartable: bool,
        detail: String,
    },
    Collective {
        lane: u64,
        step: u64,
        attempt: u32,
        comm: u64,
        index: u64,
        op: CollectiveOp,
    },
}

/// A collective message's content (see `collective::plane::PlaneOp`); a group's bytes are the
/// body, padded to whole floats, their length in bytes here.
#[derive(Encode, Decode)]
enum CollectiveOp {
    Count(u64),
    Group(Option<u64>),
    Abort {
        step: u64,
        attempt: u32,
        restartable: bool,
        reason: String,
    },
}

fn segment_headers(segments: &[Segment]) -> Vec<SegmentHeader> {
    segments
        .iter()
        .map(|s| SegmentHeader {
            group: s.group as u64,
            expert: s.expert as u64,
            rows: s.rows as u64,
        })
        .collect()
}

/// Encode a packet of membership epoch `epoch` (the epoch is in the header).
pub fn encode_packet(epoch: u64, packet: &Packet) -> Result<Vec<u8>> {
    Ok(encode_packet_parts(epoch, packet)?.concat())
}

/// [`encode_packet`] in two parts, the bodies left in `packet` (see [`Encoded`]).
pub fn encode_packet_parts(epoch: u64, packet: &Packet) -> Result<Encoded<'_>> {
    fn seg_bodies(s: &[Segment]) -> Vec<&[f32]> {
        s.iter().map(|s| s.data.as_slice()).collect()
    }
    fn indices(t: impl Iterator<Item = usize>) -> Vec<u64> {
        t.map(|i| i as u64).collect()
    }
    let (kind, bodies): (Kind, Vec<&[f32]>) = match &packet.payload {
        Payload::ExpertForward { step, block, segments } => (
            Kind::ExpertForward {
                step: step.step,
                attempt: step.attempt,
                block: *block as u64,
                segments: segment_headers(segments),
            },
            seg_bodies(segments),
        ),
        Payload::ExpertBackward { step, block, segments } => (
            Kind::ExpertBackward {
                step: step.step,
                attempt: step.attempt,
                block: *block as u64,
                segments: segment_headers(segments),
            },
            seg_bodies(segments),
        ),
        Payload::DenseGrads { step, group, tensors } => (
            Kind::DenseGrads {
                step: step.step,
                attempt: step.attempt,
                group: *group as u64,
                tensors: indices(tensors.iter().map(|t| t.0)),
            },
            tensors.iter().map(|t| t.1.as_slice()).collect(),
        ),
        Payload::Params { step, tensors } => (
            Kind::Params {
                step: step.step,
                attempt: step.attempt,
                tensors: indices(tensors.iter().map(|t| t.0)),
            },
            tensors.iter().map(|t| t.1.as_slice()).collect(),
        ),
        Payload::Gather { step, tensors } => (
            Kind::Gather {
                step: step.step,
                attempt: step.attempt,
                tensors: indices(tensors.iter().copied()),
            },
            Vec::new(),
        ),
        Payload::Segments(segments) => (Kind::Segments(segment_headers(segments)), seg_bodies(segments)),
        Payload::Tensors(tensors) => (
            Kind::Tensors(indices(tensors.iter().map(|t| t.0))),
            tensors.iter().map(|t| t.1.as_slice()).collect(),
        ),
        Payload::Ack => (Kind::Ack, Vec::new()),
        Payload::Failed { restartable, detail } => (
            Kind::Failed {
                restartable: *restartable,
                detail: detail.clone(),
            },
            Vec::new(),
        ),
        Payload::Collective(msg) => {
            let (op, bodies) = match &msg.op {
                PlaneOp::Count(count) => (CollectiveOp::Count(*count), Vec::new()),
                PlaneOp::Group(None) => (CollectiveOp::Group(None), Vec::new()),
                PlaneOp::Group(Some(data)) => (CollectiveOp::Group(Some(data.len() as u64)), vec![data.words()]),
                PlaneOp::Abort {
                    step,
                    restartable,
                    reason,
                } => (
                    CollectiveOp::Abort {
                        step: step.step,
                        attempt: step.attempt,
                        restartable: *restartable,
                        reason: reason.clone(),
                    },
                    Vec::new(),
                ),
            };
            let kind = Kind::Collective {
                lane: msg.lane as u64,
                step: msg.generation.step,
                attempt: msg.generation.attempt,
                comm: msg.comm,
                index: msg.index,
                op,
            };
            (kind, bodies)
        }
    };
    let header = PacketHeader {
        epoch,
        from: packet.from as u64,
        to: packet.to as u64,
        id: packet.id,
        kind,
    };
    Ok(Encoded {
        head: frame_head(&header, &bodies)?,
        bodies,
    })
}

const PACKET: &str = "packet";

/// A `u64` of the wire as an index below `bound`, or an error naming `field`.
fn index(value: u64, bound: usize, field: &str, of: &str) -> Result<usize> {
    usize::try_from(value)
        .ok()
        .filter(|&v| v < bound)
        .ok_or_else(|| Error::parse(PACKET, format!("{field} {value} is out of range ({bound} {of})")))
}

/// Check segment metadata against the shape and the body lengths, before anything is copied.
fn check_segments(segments: &[SegmentHeader], lens: &[usize], shape: &PacketShape) -> Result<()> {
    let bad = |detail: String| Err(Error::parse(PACKET, detail));
    if segments.len() > shape.max_segments() {
        return bad(format!(
            "{} segments exceed the {} (group, expert) pairs",
            segments.len(),
            shape.max_segments()
        ));
    }
    let rows: u64 = segments.iter().map(|s| s.rows.min(u32::MAX as u64)).sum();
    let most = shape.segment_floats() / shape.d_model.max(1);
    if rows > most as u64 {
        return bad(format!(
            "segments of {rows} rows exceed the {most} of a step ({} groups of {} tokens, {} experts each)",
            shape.groups, shape.group_tokens, shape.k
        ));
    }
    let mut seen = HashSet::with_capacity(segments.len());
    for (i, (s, &len)) in segments.iter().zip(lens).enumerate() {
        let group = index(s.group, shape.groups, &format!("segment {i}: group"), "groups")?;
        let expert = index(s.expert, shape.experts, &format!("segment {i}: expert"), "experts")?;
        if !seen.insert((group, expert)) {
            return bad(format!("segment {i}: group {group}, expert {expert} is repeated"));
        }
        if s.rows > shape.group_tokens as u64 {
            return bad(format!(
                "segment {i}: {} rows exceed the {} tokens of a group",
                s.rows, shape.group_tokens
            ));
        }
        let want = (s.rows as usize).saturating_mul(shape.d_model);
        if want != len {
            return bad(format!(
                "segment {i}: {} rows of width d_model {} need {want} floats, its body holds {len}",
                s.rows, shape.d_model
            ));
        }
    }
    Ok(())
}

/// Check tensor indices (in range, not repeated) and, when `lens` is given, each body's length.
fn check_tensors(tensors: &[u64], lens: Option<&[usize]>, shape: &PacketShape) -> Result<Vec<usize>> {
    let n = shape.tensor_lens.len();
    if tensors.len() > n {
        return Err(Error::parse(
            PACKET,
            format!("{} tensors listed, the model has {n}", tensors.len()),
        ));
    }
    let mut seen = vec![false; n];
    let mut out = Vec::with_capacity(tensors.len());
    for (i, &t) in tensors.iter().enumerate() {
        let t = index(t, n, "tensor index", "tensors")?;
        if std::mem::replace(&mut seen[t], true) {
            return Err(Error::parse(PACKET, format!("tensor index {t} is repeated")));
        }
        if let Some(len) = lens.and_then(|l| l.get(i)) {
            if *len != shape.tensor_lens[t] {
                return Err(Error::parse(
                    PACKET,
                    format!("tensor {t} has {len} floats, the model's has {}", shape.tensor_lens[t]),
                ));
            }
        }
        out.push(t);
    }
    Ok(out)
}

fn step_id(step: u64, attempt: u32) -> StepId {
    StepId { step, attempt }
}

fn build_segments(segments: &[SegmentHeader], bodies: Vec<Vec<f32>>) -> Vec<Segment> {
    segments
        .iter()
        .zip(bodies)
        .map(|(s, data)| Segment {
            group: s.group as usize,
            expert: s.expert as usize,
            rows: s.rows as usize,
            data,
        })
        .collect()
}

/// Decode and validate a packet: epoch must equal `epoch` (a stale epoch is an error naming both),
/// from/to < workers, block one of the MoE layers (`moe_layers`), segment group < groups, expert < experts,
/// rows * d_model == data.len(), tensor indices < tensor_lens.len() and each tensor's length equals
/// tensor_lens\[i\] (DenseGrads, Params, Tensors), Gather indices valid and not repeated, Failed
/// detail at most 4 KiB. Everything is checked before the bodies are copied.
pub fn decode_packet(bytes: &[u8], epoch: u64, shape: &PacketShape) -> Result<Packet> {
    let limits = shape.limits();
    let (header, rest): (PacketHeader, _) = split_header(bytes, PACKET, limits.header_bytes)?;
    check_epoch(&header, epoch)?;
    let raw = split_bodies(rest, PACKET, &limits)?;
    packet_of(header, raw, shape)
}

/// [`decode_packet`] of a frame whose reader split it: `head` is everything before the bodies
/// (see [`head_need`]), `bodies` the bodies already read as floats. The same checks, and the
/// bodies must have exactly the lengths the head lists.
pub fn decode_packet_parts(head: &[u8], bodies: Vec<Vec<f32>>, epoch: u64, shape: &PacketShape) -> Result<Packet> {
    let limits = shape.limits();
    let (header, rest): (PacketHeader, _) = split_header(head, PACKET, limits.header_bytes)?;
    check_epoch(&header, epoch)?;
    let (lens, _, after) = split_table(rest, PACKET, &limits)?;
    if !after.is_empty() {
        return Err(Error::parse(
            PACKET,
            format!("{} bytes after the body table in a head", after.len()),
        ));
    }
    if bodies.len() != lens.len() || bodies.iter().zip(&lens).any(|(b, &l)| b.len() != l) {
        return Err(Error::parse(
            PACKET,
            format!(
                "the head lists bodies of {lens:?} floats, {:?} were read",
                bodies.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        ));
    }
    packet_of(header, Bodies::Read { lens, floats: bodies }, shape)
}

/// Refuse a packet of another membership epoch.
fn check_epoch(header: &PacketHeader, epoch: u64) -> Result<()> {
    // An older epoch is a packet from before a membership change; a newer one, a peer that has seen
    // a change this worker has not: neither may be acted on.
    if header.epoch < epoch {
        return Err(Error::parse(
            PACKET,
            format!("stale membership epoch {} (the current epoch is {epoch})", header.epoch),
        ));
    }
    if header.epoch > epoch {
        return Err(Error::parse(
            PACKET,
            format!(
                "membership epoch {} is ahead of the current epoch {epoch}",
                header.epoch
            ),
        ));
    }
    Ok(())
}

/// The packet of a checked header and its bodies, once every index and length fits `shape`.
fn packet_of(header: PacketHeader, raw: Bodies<'_>, shape: &PacketShape) -> Result<Packet> {
    let from = index(header.from, shape.workers, "sender", "workers")?;
    let to = index(header.to, shape.workers, "receiver", "workers")?;
    let lens = raw.lens().to_vec();
    let lens = lens.as_slice();
    let expect_bodies = |n: usize, kind: &str| {
        if lens.len() == n {
            Ok(())
        } else {
            Err(Error::parse(
                PACKET,
                format!("{kind} lists {n} entries but carries {} bodies", lens.len()),
            ))
        }
    };
    let block = |b: u64| {
        usize::try_from(b)
            .ok()
            .filter(|b| shape.moe_layers.binary_search(b).is_ok())
            .ok_or_else(|| {
                Error::parse(
                    PACKET,
                    format!(
                        "block {b} is not an MoE block (the MoE blocks are {:?})",
                        shape.moe_layers
                    ),
                )
            })
    };
    let payload = match header.kind {
        Kind::ExpertForward {
            step,
            attempt,
            block: b,
            segments,
        } => {
            let block = block(b)?;
            expect_bodies(segments.len(), "ExpertForward")?;
            check_segments(&segments, lens, shape)?;
            Payload::ExpertForward {
                step: step_id(step, attempt),
                block,
                segments: build_segments(&segments, raw.floats()),
            }
        }
        Kind::ExpertBackward {
            step,
            attempt,
            block: b,
            segments,
        } => {
            let block = block(b)?;
            expect_bodies(segments.len(), "ExpertBackward")?;
            check_segments(&segments, lens, shape)?;
            Payload::ExpertBackward {
                step: step_id(step, attempt),
                block,
                segments: build_segments(&segments, raw.floats()),
            }
        }
        Kind::Segments(segments) => {
            expect_bodies(segments.len(), "Segments")?;
            check_segments(&segments, lens, shape)?;
            Payload::Segments(build_segments(&segments, raw.floats()))
        }
        Kind::DenseGrads {
            step,
            attempt,
            group,
            tensors,
        } => {
            let group = index(group, shape.groups, "group", "groups")?;
            expect_bodies(tensors.len(), "DenseGrads")?;
            let idx = check_tensors(&tensors, Some(lens), shape)?;
            Payload::DenseGrads {
                step: step_id(step, attempt),
                group,
                tensors: idx.into_iter().zip(raw.floats()).collect(),
            }
        }
        Kind::Params { step, attempt, tensors } => {
            expect_bodies(tensors.len(), "Params")?;
            let idx = check_tensors(&tensors, Some(lens), shape)?;
            Payload::Params {
                step: step_id(step, attempt),
                tensors: idx.into_iter().zip(raw.floats().into_iter().map(Arc::new)).collect(),
            }
        }
        Kind::Tensors(tensors) => {
            expect_bodies(tensors.len(), "Tensors")?;
            let idx = check_tensors(&tensors, Some(lens), shape)?;
            Payload::Tensors(idx.into_iter().zip(raw.floats()).collect())
        }
        Kind::Gather { step, attempt, tensors } => {
            expect_bodies(0, "Gather")?;
            Payload::Gather {
                step: step_id(step, attempt),
                tensors: check_tensors(&tensors, None, shape)?,
            }
        }
        Kind::Ack => {
            expect_bodies(0, "Ack")?;
            Payload::Ack
        }
        Kind::Failed { restartable, detail } => {
            expect_bodies(0, "Failed")?;
            if detail.len() > MAX_FAILED_DETAIL {
                return Err(Error::parse(
                    PACKET,
                    format!(
                        "failure detail of {} bytes exceeds {MAX_FAILED_DETAIL} bytes",
                        detail.len()
                    ),
                ));
            }
            Payload::Failed { restartable, detail }
        }
        Kind::Collective {
            lane,
            step,
            attempt,
            comm,
            index: collective,
            op,
        } => {
            // A worker runs at most one lane per group.
            let lane = index(lane, shape.groups, "lane", "lanes at most (one per group)")?;
            let op = match op {
                CollectiveOp::Count(count) => {
                    expect_bodies(0, "a collective's count")?;
                    PlaneOp::Count(count)
                }
                CollectiveOp::Group(None) => {
                    expect_bodies(0, "a collective's empty send")?;
                    PlaneOp::Group(None)
                }
                CollectiveOp::Group(Some(bytes)) => {
                    expect_bodies(1, "a collective's send")?;
                    let max = shape.max_packet_bytes();
                    let bytes = usize::try_from(bytes).ok().filter(|&b| b <= max).ok_or_else(|| {
                        Error::parse(
                            PACKET,
                            format!("a collective's send of {bytes} bytes exceeds the largest packet, {max} bytes"),
                        )
                    })?;
                    if lens[0] != bytes.div_ceil(4) {
                        return Err(Error::parse(
                            PACKET,
                            format!(
                                "a collective's send of {bytes} bytes carried in {} floats (expected {})",
                                lens[0],
                                bytes.div_ceil(4)
                            ),
                        ));
                    }
                    let words = raw.floats().pop().unwrap_or_default();
                    PlaneOp::Group(Some(PlaneData::from_words(bytes, words)?))
                }
                CollectiveOp::Abort {
                    step,
                    attempt,
                    restartable,
                    reason,
                } => {
                    expect_bodies(0, "a collective's abort")?;
                    if reason.len() > MAX_FAILED_DETAIL {
                        return Err(Error::parse(
                            PACKET,
                            format!(
                                "an abort's reason of {} bytes exceeds {MAX_FAILED_DETAIL} bytes",
                                reason.len()
                            ),
                        ));
                    }
                    PlaneOp::Abort {
                        step: step_id(step, attempt),
                        restartable,
                        reason,
                    }
                }
            };
            Payload::Collective(PlaneMsg {
                lane,
                generation: step_id(step, attempt),
                comm,
                index: collective,
                op,
            })
        }
    };
    Ok(Packet {
        from,
        to,
        id: header.id,
        payload,
    })
}

/// The training state's header: the optimizer step and each tensor's name and length, in
/// `Gpt::tensors` order. The bodies are every tensor's values, then every first moment, then every
/// second moment.
#[derive(Encode, Decode)]
struct StateHeader {
    step: u64,
    tensors: Vec<(String, u64)>,
}

const STATE: &str = "training state";

/// The full training state (every tensor's values and AdamW moments, and the step) as one frame.
pub fn encode_state(model: &Gpt<f32>, optimizer: &AdamW) -> Result<Vec<u8>> {
    let tensors = model.tensors();
    if optimizer.m.len() != tensors.len() || optimizer.v.len() != tensors.len() {
        return Err(Error::shape(
            STATE,
            format!(
                "the optimizer has {} and {} moments for {} tensors",
                optimizer.m.len(),
                optimizer.v.len(),
                tensors.len()
            ),
        ));
    }
    let header = StateHeader {
        step: optimizer.step,
        tensors: tensors.iter().map(|(n, _, b)| (n.clone(), b.len() as u64)).collect(),
    };
    let bodies: Vec<&[f32]> = tensors
        .iter()
        .map(|t| t.2.as_slice())
        .chain(optimizer.m.iter().map(Vec::as_slice))
        .chain(optimizer.v.iter().map(Vec::as_slice))
        .collect();
    encode_frame(&header, &bodies)
}

/// Decode it for `config`: the header's tensor names and lengths are checked against the config's
/// model (the error names the first mismatch) before any value is copied; the optimizer is
/// `optimizer::for_model` restored with the moments and step.
pub fn decode_state(config: &TrainConfig, bytes: &[u8]) -> Result<(Gpt<f32>, AdamW)> {
    let mut model = Gpt::<f32>::zeros(&config.model)?;
    let want: Vec<(String, usize)> = model.tensors().iter().map(|(n, _, b)| (n.clone(), b.len())).collect();
    let total: usize = want.iter().map(|t| t.1).sum();
    let names: usize = want.iter().map(|t| t.0.len() + 2 * VARINT_BYTES).sum();
    let limits = Limits {
        header_bytes: 2 * VARINT_BYTES + names,
        bodies: 3 * want.len(),
        floats: total.saturating_mul(3),
    };
    let (header, rest): (StateHeader, _) = split_header(bytes, STATE, limits.header_bytes)?;
    for (i, ((name, len), (want_name, want_len))) in header.tensors.iter().zip(&want).enumerate() {
        if name != want_name || *len != *want_len as u64 {
            return Err(Error::parse(
                STATE,
                format!("tensor {i} is {name} of {len} floats, the config's model has {want_name} of {want_len}"),
            ));
        }
    }
    if header.tensors.len() != want.len() {
        return Err(Error::parse(
            STATE,
            format!(
                "{} tensors listed, the config's model has {}",
                header.tensors.len(),
                want.len()
            ),
        ));
    }
    let raw = split_bodies(rest, STATE, &limits)?;
    if raw.lens().len() != 3 * want.len() || raw.lens().iter().zip(want.iter().cycle()).any(|(&l, w)| l != w.1) {
        return Err(Error::parse(
            STATE,
            "the bodies are not each tensor's values, first and second moments",
        ));
    }
    let mut bodies = raw.floats().into_iter();
    for buffer in model.buffers_mut() {
        *buffer = bodies.next().unwrap_or_default();
    }
    let n = want.len();
    let m: Vec<Vec<f32>> = bodies.by_ref().take(n).collect();
    let v: Vec<Vec<f32>> = bodies.collect();
    let mut optimizer = optimizer::for_model(&config.optimizer, &model)?;
    optimizer.restore(header.step, m, v)?;
    Ok((model, optimizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::small_test_config as small;

    fn shape() -> PacketShape {
        PacketShape::of(&small(), 3).expect("shape")
    }

    fn floats(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 + seed as f32 * 0.37).sin() * 3.0).collect()
    }

    fn segment(group: usize, expert: usize, rows: usize) -> Segment {
        Segment {
            group,
            expert,
            rows,
            data: floats(rows * 32, (group * 7 + expert) as u32),
        }
    }

    fn packet(payload: Payload) -> Packet {
        Packet {
            from: 2,
            to: 1,
            id: 0xdead_beef_1234,
            payload,
        }
    }

    /// One packet of every payload kind, valid for [`shape`].
    fn every_kind() -> Vec<Packet> {
        let lens = shape().tensor_lens;
        let step = StepId { step: 77, attempt: 2 };
        let tensor = |i: usize| (i, floats(lens[i], i as u32));
        vec![
            packet(Payload::ExpertForward {
                step,
                block: 1,
                segments: vec![segment(0, 1, 3), segment(0, 3, 0), segment(3, 2, 32)],
            }),
            packet(Payload::ExpertBackward {
                step,
                block: 0,
                segments: vec![segment(1, 0, 5)],
            }),
            packet(Payload::DenseGrads {
                step,
                group: 3,
                tensors: vec![tensor(2), tensor(0), tensor(lens.len() - 1)],
            }),
            packet(Payload::Params {
                step,
                tensors: vec![(3, Arc::new(floats(lens[3], 3))), (4, Arc::new(floats(lens[4], 4)))],
            }),
            packet(Payload::Gather {
                step,
                tensors: vec![5, 1, 9],
            }),
            packet(Payload::Segments(vec![segment(2, 2, 1), segment(1, 2, 4)])),
            packet(Payload::Tensors(vec![tensor(6), tensor(1)])),
            packet(Payload::Ack),
            packet(Payload::Failed {
                restartable: true,
                detail: "expert 1.3 on worker 2 panicked: ünïcode".into(),
            }),
            packet(Payload::Segments(Vec::new())),
            packet(Payload::Tensors(Vec::new())),
            packet(Payload::Collective(PlaneMsg {
                lane: 3,
                generation: step,
                comm: 0x0123_4567_89ab_cdef,
                index: 9,
                op: PlaneOp::Count(1 << 40),
            })),
            packet(Payload::Collective(PlaneMsg {
                lane: 0,
                generation: step,
                comm: u64::MAX,
                index: 10,
                op: PlaneOp::Group(None),
            })),
            // 7 bytes: padded to two floats; the bytes of a NaN too.
            packet(Payload::Collective(PlaneMsg {
                lane: 1,
                generation: step,
                comm: u64::MAX,
                index: 11,
                op: PlaneOp::Group(Some(PlaneData::from_bytes(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]))),
            })),
            packet(Payload::Collective(PlaneMsg {
                lane: 0,
                generation: StepId::NONE,
                comm: 0,
                index: 0,
                op: PlaneOp::Abort {
                    step,
                    restartable: true,
                    reason: "worker 2 failed the block-1 expert forward of step 77".into(),
                },
            })),
        ]
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn same_tensors(a: &[(usize, Vec<f32>)], b: &[(usize, Vec<f32>)]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.0, y.0);
            assert_eq!(bits(&x.1), bits(&y.1));
        }
    }

    fn assert_same(a: &Packet, b: &Packet) {
        assert_eq!((a.from, a.to, a.id), (b.from, b.to, b.id));
        use Payload::*;
        match (&a.payload, &b.payload) {
            (
                ExpertForward { step, block, segments },
                ExpertForward {
                    step: s2,
                    block: b2,
                    segments: g2,
                },
            )
            | (
                ExpertBackward { step, block, segments },
                ExpertBackward {
                    step: s2,
                    block: b2,
                    segments: g2,
                },
            ) => assert_eq!((step, block, segments), (s2, b2, g2)),
            (
                DenseGrads { step, group, tensors },
                DenseGrads {
                    step: s2,
                    group: g2,
                    tensors: t2,
                },
            ) => {
                assert_eq!((step, group), (s2, g2));
                same_tensors(tensors, t2);
            }
            (Params { step, tensors }, Params { step: s2, tensors: t2 }) => {
                assert_eq!(step, s2);
                let plain = |t: &[(usize, Arc<Vec<f32>>)]| t.iter().map(|(i, v)| (*i, v.to_vec())).collect::<Vec<_>>();
                same_tensors(&plain(tensors), &plain(t2));
            }
            (Gather { step, tensors }, Gather { step: s2, tensors: t2 }) => assert_eq!((step, tensors), (s2, t2)),
            (Segments(s), Segments(s2)) => assert_eq!(s, s2),
            (Tensors(t), Tensors(t2)) => same_tensors(t, t2),
            (Ack, Ack) => {}
            (
                Failed { restartable, detail },
                Failed {
                    restartable: r2,
                    detail: d2,
                },
            ) => assert_eq!((restartable, detail), (r2, d2)),
            (Collective(m), Collective(m2)) => assert_eq!(m, m2),
            (x, y) => panic!("payload kinds differ: {x:?} vs {y:?}"),
        }
    }

    /// The error's message, checked to be a parse error.
    fn message<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(e @ Error::Parse { .. }) => e.to_string(),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    fn assert_refused<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
        let msg = message(r);
        assert!(msg.contains(needle), "{msg:?} does not say {needle:?}");
    }

    #[test]
    fn every_payload_kind_round_trips() {
        let shape = shape();
        for p in every_kind() {
            let bytes = encode_packet(9, &p).expect("encode");
            let back = decode_packet(&bytes, 9, &shape).expect("decode");
            assert_same(&p, &back);
            assert_eq!(p.payload.data_bytes(), back.payload.data_bytes());
        }
    }

    #[test]
    fn a_frame_split_by_its_reader_decodes_as_the_whole_frame() {
        let shape = shape();
        for p in every_kind() {
            let whole = encode_packet(9, &p).expect("encode");
            let parts = encode_packet_parts(9, &p).expect("encode parts");
            assert_eq!(parts.concat(), whole, "the parts are the frame's bytes");
            assert_eq!(parts.len(), whole.len());
            // A reader learns the head's length from its prefix, step by step.
            let head = &parts.head;
            let mut got = 0;
            for _ in 0..4 {
                let need = head_need(&head[..got]);
                assert!(
                    need <= head.len(),
                    "head_need {need} overshoots the head of {}",
                    head.len()
                );
                if need == got {
                    break;
                }
                got = need;
            }
            assert_eq!(got, head.len(), "the reader stops at the head's end");
            let lens = head_body_lens(head, PACKET).expect("lens");
            let bodies: Vec<Vec<f32>> = parts.bodies.iter().map(|b| b.to_vec()).collect();
            assert_eq!(lens, bodies.iter().map(Vec::len).collect::<Vec<_>>());
            let back = decode_packet_parts(head, bodies, 9, &shape).expect("decode parts");
            assert_same(&p, &back);
            assert_eq!(p.payload.data_bytes(), back.payload.data_bytes());
        }
    }

    #[test]
    fn split_bodies_that_differ_from_the_head_are_refused() {
        let shape = shape();
        let p = packet(Payload::Segments(vec![segment(0, 1, 3), segment(1, 2, 2)]));
        let parts = encode_packet_parts(4, &p).expect("encode");
        let bodies: Vec<Vec<f32>> = parts.bodies.iter().map(|b| b.to_vec()).collect();
        let mut short = bodies.clone();
        short[1].pop();
        assert_refused(decode_packet_parts(&parts.head, short, 4, &shape), "were read");
        assert_refused(
            decode_packet_parts(&parts.head, bodies[..1].to_vec(), 4, &shape),
            "were read",
        );
        assert_refused(decode_packet_parts(&parts.head, bodies.clone(), 5, &shape), "epoch");
        let mut longer = parts.head.clone();
        longer.push(0);
        assert_refused(decode_packet_parts(&longer, bodies, 4, &shape), "after the body table");
    }

    #[test]
    fn the_shape_follows_the_config() {
        let s = shape();
        let model = Gpt::<f32>::zeros(&small().model).expect("model");
        assert_eq!(
            s.tensor_lens,
            model.tensors().iter().map(|t| t.2.len()).collect::<Vec<_>>()
        );
        assert_eq!((s.workers, s.groups, s.d_model, s.experts), (3, 4, 32, 4));
        assert_eq!((s.moe_blocks, s.group_tokens, s.k), (2, 32, 2));
        let mut c = small();
        c.model.n_layer = 4;
        c.model.moe_every = 2;
        assert_eq!(PacketShape::of(&c, 1).expect("shape").moe_blocks, 2);
        let mut every_other = small();
        every_other.model.n_layer = 4;
        every_other.model.moe_every = 2;
        let s = PacketShape::of(&every_other, 2).expect("shape");
        assert_eq!((s.moe_blocks, s.moe_layers.clone()), (2, vec![1, 3]));
        let fwd = |block| Packet {
            from: 0,
            to: 1,
            id: 0,
            payload: Payload::ExpertForward {
                step: StepId::first(0),
                block,
                segments: vec![segment(0, 0, 1)],
            },
        };
        decode_packet(&encode_packet(0, &fwd(3)).expect("encode"), 0, &s).expect("block 3 is an MoE block");
        let refused = decode_packet(&encode_packet(0, &fwd(2)).expect("encode"), 0, &s);
        assert_refused(refused, "block 2 is not an MoE block (the MoE blocks are [1, 3])");
        let err = PacketShape::of(&small(), 0).expect_err("no workers");
        assert!(err.to_string().contains("0 workers"), "{err}");
        c.train.groups = 0;
        let err = PacketShape::of(&c, 2).expect_err("no groups");
        assert!(err.to_string().contains("train.groups 0"), "{err}");
    }

    #[test]
    fn the_state_round_trips_bitwise() {
        let config = small();
        let model = Gpt::<f32>::init(&config.model, 5).expect("init");
        let mut opt = optimizer::for_model(&config.optimizer, &model).expect("optimizer");
        for (i, (m, v)) in opt.m.iter_mut().zip(opt.v.iter_mut()).enumerate() {
            *m = floats(m.len(), i as u32);
            *v = floats(v.len(), 1000 + i as u32)
                .iter()
                .map(|x| x.abs() + f32::MIN_POSITIVE)
                .collect();
        }
        opt.step = 4321;
        let bytes = encode_state(&model, &opt).expect("encode");
        let (back, back_opt) = decode_state(&config, &bytes).expect("decode");
        for (a, b) in model.tensors().iter().zip(back.tensors()) {
            assert_eq!(a.0, b.0);
            assert_eq!(bits(a.2), bits(b.2), "{}", a.0);
        }
        assert_eq!(back_opt, opt);
        for (a, b) in opt.m.iter().chain(&opt.v).zip(back_opt.m.iter().chain(&back_opt.v)) {
            assert_eq!(bits(a), bits(b));
        }
    }

    #[test]
    fn a_state_of_another_model_names_the_first_mismatch() {
        let config = small();
        let model = Gpt::<f32>::zeros(&config.model).expect("model");
        let opt = optimizer::for_model(&config.optimizer, &model).expect("optimizer");
        let bytes = encode_state(&model, &opt).expect("encode");
        let mut other = small();
        other.model.experts = 8;
        assert_refused(decode_state(&other, &bytes), "tensor 10 is h.0.moe.wg of 128 floats");
        assert_refused(decode_state(&other, &bytes), "has h.0.moe.wg of 256");
        let mut deeper = small();
        deeper.model.n_layer = 3;
        // More tensors: the body count and floats fit, the listing is short.
        assert_refused(decode_state(&deeper, &bytes), "tensor 28 is ln_f.weight");
        let mut bigger = small();
        bigger.model.vocab = 128;
        assert_refused(decode_state(&bigger, &bytes), "tensor 0 is wte of 8192 floats");
        for cut in [0, 3, 100, bytes.len() / 2, bytes.len() - 1] {
            assert_refused(decode_state(&config, &bytes[..cut]), "truncated");
        }
    }

    #[test]
    fn every_prefix_of_a_frame_is_refused_as_truncated() {
        let shape = shape();
        for p in every_kind().iter().filter(|p| p.payload.data_bytes() < 20_000) {
            let bytes = encode_packet(1, p).expect("encode");
            for cut in 0..bytes.len() {
                assert_refused(decode_packet(&bytes[..cut], 1, &shape), "truncated");
            }
        }
    }

    /// The offset of the body length table in an encoded frame.
    fn table_at(bytes: &[u8]) -> usize {
        8 + u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize
    }

    #[test]
    fn forged_lengths_are_refused_before_allocating() {
        let shape = shape();
        let p = packet(Payload::Segments(vec![segment(0, 0, 2), segment(0, 1, 1)]));
        let bytes = encode_packet(1, &p).expect("encode");
        let mut huge_body = bytes.clone();
        let at = table_at(&bytes);
        huge_body[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert_refused(
            decode_packet(&huge_body, 1, &shape),
            "body 0 of 1099511627776 floats exceeds the limit",
        );
        let mut huge_header = bytes.clone();
        huge_header[..4].copy_from_slice(&(1u32 << 31).to_le_bytes());
        assert_refused(
            decode_packet(&huge_header, 1, &shape),
            "header of 2147483648 bytes exceeds the limit",
        );
        let mut many = bytes.clone();
        many[at - 4..at].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_refused(decode_packet(&many, 1, &shape), "4294967295 bodies exceed the limit");
        // Lengths that do not add up to the bytes present.
        let mut short = bytes.clone();
        short[at..at + 8].copy_from_slice(&1u64.to_le_bytes());
        assert_refused(decode_packet(&short, 1, &shape), "trailing bytes");
        let mut long = bytes.clone();
        long[at..at + 8].copy_from_slice(&1000u64.to_le_bytes());
        assert_refused(
            decode_packet(&long, 1, &shape),
            "truncated frame: bodies of 1032 floats",
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_refused(decode_packet(&trailing, 1, &shape), "1 trailing bytes");
        // A header with a forged vector length inside: bincode's limit refuses it.
        let mut forged = 9u32.to_le_bytes().to_vec();
        forged.push(0xfd); // a u64 follows: the vector's length
        forged.extend_from_slice(&u64::MAX.to_le_bytes());
        forged.extend_from_slice(&0u32.to_le_bytes());
        let limits = Limits {
            header_bytes: 64,
            bodies: 0,
            floats: 0,
        };
        let r: Result<(Vec<u64>, _)> = decode_frame(&forged, "vec", &limits);
        assert_refused(r, "malformed header");
        forged[5..13].copy_from_slice(&1_000_000u64.to_le_bytes());
        let r: Result<(Vec<u64>, _)> = decode_frame(&forged, "vec", &limits);
        assert_refused(r, "malformed header");
    }

    #[test]
    fn frame_limits_are_enforced() {
        let limits = Limits {
            header_bytes: 4,
            bodies: 2,
            floats: 10,
        };
        let ok = encode_frame(&7u32, &[&[1.0, 2.0], &[3.0]]).expect("frame");
        let (h, b): (u32, _) = decode_frame(&ok, "test frame", &limits).expect("decode");
        assert_eq!((h, b), (7, vec![vec![1.0, 2.0], vec![3.0]]));
        let long = encode_frame(&"twelve bytes", &[]).expect("frame");
        assert_refused(
            decode_frame::<String>(&long, "test frame", &limits),
            "header of 13 bytes exceeds the limit of 4",
        );
        let bodies = encode_frame(&7u32, &[&[], &[], &[]]).expect("frame");
        assert_refused(
            decode_frame::<u32>(&bodies, "test frame", &limits),
            "3 bodies exceed the limit of 2",
        );
        // A header past 512 KiB within limits that allow 4 MiB (a control reply listing every
        // expert of a wide model) decodes: it used to be refused, and its honest sender evicted.
        let wide: Vec<u64> = (0..100_000u64).map(|i| i << 40).collect();
        let frame = encode_frame(&wide, &[]).expect("a wide header");
        let control = Limits {
            header_bytes: 4 << 20,
            bodies: 0,
            floats: 0,
        };
        assert!(frame.len() > 512 << 10, "{} bytes", frame.len());
        let (back, _): (Vec<u64>, _) = decode_frame(&frame, "wide", &control).expect("decodes");
        assert_eq!(back, wide);
        // One past the protocol's longest is refused where it is encoded.
        let too_wide = vec![0u8; MAX_HEADER_BYTES];
        let err = encode_frame(&too_wide, &[]).expect_err("too long").to_string();
        assert!(err.contains("longer than the protocol allows"), "{err}");
        let floats = encode_frame(&7u32, &[&[0.0; 6], &[0.0; 6]]).expect("frame");
        assert_refused(
            decode_frame::<u32>(&floats, "test frame", &limits),
            "exceed the limit of 10 floats",
        );
        let extra = encode_frame(&(1u8, 2u8), &[]).expect("frame");
        assert_refused(
            decode_frame::<u8>(&extra, "test frame", &limits),
            "1 bytes bincode did not read",
        );
        assert_refused(decode_frame::<u8>(&extra, "test frame", &limits), "test frame");
    }

    #[test]
    fn packets_that_do_not_fit_the_shape_are_refused() {
        let shape = shape();
        let check = |p: Packet, needle: &str| {
            let bytes = encode_packet(5, &p).expect("encode");
            assert_refused(decode_packet(&bytes, 5, &shape), needle);
        };
        let bytes = encode_packet(4, &packet(Payload::Ack)).expect("encode");
        assert_refused(
            decode_packet(&bytes, 5, &shape),
            "stale membership epoch 4 (the current epoch is 5)",
        );
        assert_refused(
            decode_packet(&bytes, 3, &shape),
            "membership epoch 4 is ahead of the current epoch 3",
        );
        check(
            Packet {
                from: 3,
                ..packet(Payload::Ack)
            },
            "sender 3 is out of range (3 workers)",
        );
        check(
            Packet {
                to: 7,
                ..packet(Payload::Ack)
            },
            "receiver 7 is out of range (3 workers)",
        );
        let step = StepId::first(1);
        let fwd = |block, segments| packet(Payload::ExpertForward { step, block, segments });
        check(
            fwd(2, vec![]),
            "block 2 is not an MoE block (the MoE blocks are [0, 1])",
        );
        let full: Vec<Segment> = (0..16).map(|i| segment(i / 4, i % 4, 32)).collect();
        check(
            packet(Payload::Segments(full)),
            "segments of 512 rows exceed the 256 of a step (4 groups of 32 tokens, 2 experts each)",
        );
        check(
            fwd(0, vec![segment(4, 0, 1)]),
            "segment 0: group 4 is out of range (4 groups)",
        );
        check(
            fwd(0, vec![segment(0, 0, 1), segment(0, 4, 1)]),
            "segment 1: expert 4 is out of range (4 experts)",
        );
        let mut wide = segment(0, 0, 3);
        wide.data.truncate(64);
        check(
            fwd(1, vec![wide]),
            "segment 0: 3 rows of width d_model 32 need 96 floats, its body holds 64",
        );
        let mut many = segment(0, 0, 33);
        many.data = vec![0.0; 33 * 32];
        check(
            packet(Payload::Segments(vec![many])),
            "33 rows exceed the 32 tokens of a group",
        );
        check(
            packet(Payload::Segments(vec![segment(1, 1, 1), segment(1, 1, 1)])),
            "segment 1: group 1, expert 1 is repeated",
        );
        let lens = shape.tensor_lens.clone();
        check(
            packet(Payload::Tensors(vec![(99, vec![])])),
            "tensor index 99 is out of range (31 tensors)",
        );
        check(
            packet(Payload::Tensors(vec![(0, vec![0.0; lens[0] - 1])])),
            &format!("tensor 0 has {} floats, the model's has {}", lens[0] - 1, lens[0]),
        );
        check(
            packet(Payload::DenseGrads {
                step,
                group: 0,
                tensors: vec![(2, vec![0.0; lens[2] + 1])],
            }),
            &format!("tensor 2 has {} floats", lens[2] + 1),
        );
        check(
            packet(Payload::DenseGrads {
                step,
                group: 4,
                tensors: vec![],
            }),
            "group 4 is out of range (4 groups)",
        );
        check(
            packet(Payload::Params {
                step,
                tensors: vec![(1, Arc::new(vec![0.0; 3]))],
            }),
            "tensor 1 has 3 floats",
        );
        check(
            packet(Payload::Gather {
                step,
                tensors: vec![3, 31],
            }),
            "tensor index 31 is out of range",
        );
        check(
            packet(Payload::Gather {
                step,
                tensors: vec![3, 5, 3],
            }),
            "tensor index 3 is repeated",
        );
        check(
            packet(Payload::Failed {
                restartable: false,
                detail: "x".repeat(MAX_FAILED_DETAIL + 1),
            }),
            "failure detail of 4097 bytes exceeds 4096 bytes",
        );
        let fine = packet(Payload::Failed {
            restartable: false,
            detail: "x".repeat(MAX_FAILED_DETAIL),
        });
        decode_packet(&encode_packet(5, &fine).expect("encode"), 5, &shape).expect("4 KiB of detail fit");
        // An answer made from a long error is clipped to what its receiver accepts.
        let long = Error::runtime("é".repeat(MAX_FAILED_DETAIL));
        let answer = packet(Payload::failed(&long));
        match decode_packet(&encode_packet(5, &answer).expect("encode"), 5, &shape).expect("a clipped detail fits") {
            Packet {
                payload: Payload::Failed { detail, .. },
                ..
            } => {
                assert!(
                    detail.len() <= MAX_FAILED_DETAIL && detail.ends_with("..."),
                    "{} bytes",
                    detail.len()
                );
                assert!(detail.contains("éé"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(clip_detail("short".into()), "short");
        assert_eq!(clip_to("abcdef".into(), 5), "ab...");
        assert_eq!(clip_to("ééé".into(), 6), "ééé");
        assert_eq!(clip_to("ééé".into(), 5), "é..."); // not inside a character

        // A collective's message: its lane, the size of the bytes it carries, its abort reason.
        let collective = |lane: usize, op: PlaneOp| {
            packet(Payload::Collective(PlaneMsg {
                lane,
                generation: step,
                comm: 7,
                index: 0,
                op,
            }))
        };
        check(collective(4, PlaneOp::Count(0)), "lane 4 is out of range");
        let max = shape.max_packet_bytes();
        check(
            collective(0, PlaneOp::Group(Some(PlaneData::from_bytes(&vec![0u8; max + 1])))),
            &format!(
                "a collective's send of {} bytes exceeds the largest packet, {max} bytes",
                max + 1
            ),
        );
        let largest = collective(0, PlaneOp::Group(Some(PlaneData::from_bytes(&vec![7u8; max]))));
        decode_packet(&encode_packet(5, &largest).expect("encode"), 5, &shape).expect("the largest packet fits");
        check(
            collective(
                0,
                PlaneOp::Abort {
                    step,
                    restartable: true,
                    reason: "x".repeat(MAX_FAILED_DETAIL + 1),
                },
            ),
            "an abort's reason of 4097 bytes exceeds 4096 bytes",
        );
        // A head that says 9 bytes over a body of one float.
        let short = collective(0, PlaneOp::Group(Some(PlaneData::from_bytes(&[1, 2, 3, 4]))));
        let mut parts = encode_packet_parts(5, &short).expect("encode");
        let head = parts.head.clone();
        let body: Vec<f32> = parts.bodies.pop().expect("one body").to_vec();
        let forged = {
            let Payload::Collective(msg) = &short.payload else {
                unreachable!()
            };
            let header = PacketHeader {
                epoch: 5,
                from: 2,
                to: 1,
                id: short.id,
                kind: Kind::Collective {
                    lane: 0,
                    step: msg.generation.step,
                    attempt: msg.generation.attempt,
                    comm: msg.comm,
                    index: 0,
                    op: CollectiveOp::Group(Some(9)),
                },
            };
            frame_head(&header, &[body.as_slice()]).expect("head")
        };
        assert_ne!(head, forged);
        assert_refused(
            decode_packet_parts(&forged, vec![body], 5, &shape),
            "a collective's send of 9 bytes carried in 1 floats (expected 3)",
        );
    }

    #[test]
    fn the_largest_legitimate_packets_fit_the_limits() {
        let shape = shape();
        let step = StepId::first(3);
        let all: Vec<usize> = (0..shape.tensor_lens.len()).collect();
        // Every token of every group routed to k = 2 experts: 2 x 32 rows per group.
        let full: Vec<Segment> = (0..4)
            .flat_map(|g| [segment(g, g, 32), segment(g, (g + 1) % 4, 32)])
            .collect();
        let packets = [
            packet(Payload::Params {
                step,
                tensors: all
                    .iter()
                    .map(|&i| (i, Arc::new(floats(shape.tensor_lens[i], 1))))
                    .collect(),
            }),
            packet(Payload::Tensors(
                all.iter().map(|&i| (i, floats(shape.tensor_lens[i], 2))).collect(),
            )),
            packet(Payload::Gather {
                step,
                tensors: all.clone(),
            }),
            packet(Payload::ExpertForward {
                step,
                block: 1,
                segments: full,
            }),
        ];
        for p in &packets {
            let bytes = encode_packet(u64::MAX, p).expect("encode");
            assert!(bytes.len() <= shape.max_frame_bytes(), "{} bytes", bytes.len());
            let back = decode_packet(&bytes, u64::MAX, &shape).expect("fits");
            assert_same(p, &back);
        }
    }

    #[test]
    fn the_frame_bound_grows_with_the_model() {
        let small = shape();
        assert!(small.max_frame_bytes() < 1 << 20, "{}", small.max_frame_bytes());
        // A model of 2^29 floats (2 GiB), more than a fixed 1 GiB bound would let through: its
        // parameters in one packet must fit.
        let large = PacketShape {
            tensor_lens: vec![1 << 28, 1 << 28],
            ..shape()
        };
        assert!(large.max_frame_bytes() > 4 << 29, "{}", large.max_frame_bytes());
    }

    #[test]
    fn a_header_whose_entries_do_not_match_its_bodies_is_refused() {
        let shape = shape();
        let header = PacketHeader {
            epoch: 0,
            from: 0,
            to: 1,
            id: 0,
            kind: Kind::Tensors(vec![1]),
        };
        let bytes = encode_frame(&header, &[&[0.0; 32], &[0.0; 32]]).expect("frame");
        assert_refused(
            decode_packet(&bytes, 0, &shape),
            "Tensors lists 1 entries but carries 2 bodies",
        );
        let ack = PacketHeader {
            kind: Kind::Ack,
            ..header
        };
        let bytes = encode_frame(&ack, &[&[0.0]]).expect("frame");
        assert_refused(
            decode_packet(&bytes, 0, &shape),
            "Ack lists 0 entries but carries 1 bodies",
        );
    }
}
