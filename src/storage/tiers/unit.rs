//! The unit that moves between tiers: one expert's parameters with their AdamW moments, and its
//! byte encoding on disk.

use crate::error::{Error, Result};
use crate::kernels::bytes::{floats_from_le, put_floats_le};
use crate::model::moe::stages::ExpertWeights;
use crate::optimizer::AdamW;

/// An expert's committed state: parameters and their AdamW moments. It moves between the Device,
/// Host and Disk tiers as one unit.
#[derive(Clone, Debug)]
pub struct ExpertSlot {
    /// `[w1, b1, w2, b2]`: `[d_model][d_ff]`, `[d_ff]`, `[d_ff][d_model]`, `[d_model]`.
    pub params: [Vec<f32>; 4],
    /// AdamW over the four tensors (decay on `w1`, `w2`).
    pub optimizer: AdamW,
}

impl ExpertSlot {
    /// The weights as the expert kernels take them.
    pub fn weights(&self) -> ExpertWeights<'_, f32> {
        let [w1, b1, w2, b2] = &self.params;
        ExpertWeights { w1, b1, w2, b2 }
    }

    /// Floats held (parameters and both moments).
    pub fn floats(&self) -> usize {
        let p: usize = self.params.iter().map(Vec::len).sum();
        let m: usize = self.optimizer.m.iter().map(Vec::len).sum();
        let v: usize = self.optimizer.v.iter().map(Vec::len).sum();
        p + m + v
    }

    /// Bytes of the unit in memory and on disk.
    pub fn bytes(&self) -> u64 {
        (HEADER + 4 * self.floats()) as u64
    }

    /// The model tensors a unit of `block` is cut from, in the order of [`ExpertSlot::params`]: the
    /// indices of `h.{block}.moe.{w1,b1,w2,b2}` among `names` (the model's tensor order).
    pub fn tensor_indices<'a>(names: impl Iterator<Item = &'a str> + Clone, block: usize) -> Result<[usize; 4]> {
        let find = |s: &str| {
            let want = format!("h.{block}.moe.{s}");
            names
                .clone()
                .position(|n| n == want)
                .ok_or_else(|| Error::runtime(format!("the model has no tensor {want}")))
        };
        Ok([find("w1")?, find("b1")?, find("w2")?, find("b2")?])
    }

    /// Bytes of the unit of an expert of `d_model` and `d_ff` ([`ExpertSlot::bytes`] without a
    /// slot at hand): the header, then the parameters and both moments.
    pub const fn bytes_for(d_model: usize, d_ff: usize) -> u64 {
        (HEADER + 4 * 3 * (2 * d_model * d_ff + d_model + d_ff)) as u64
    }

    /// Bytes of the parameters alone of such a unit (a forward or backward load, and a deferred
    /// gradient: [`params_len`] and [`ExpertSlot::grad_bytes`]).
    pub const fn params_bytes_for(d_model: usize, d_ff: usize) -> u64 {
        (HEADER + 4 * (2 * d_model * d_ff + d_model + d_ff)) as u64
    }
}

/// An expert's identity: `(block, expert)`.
pub type UnitId = (usize, usize);

const MAGIC: &[u8; 8] = b"SEMOEXU1";
const GRAD_MAGIC: &[u8; 8] = b"SEMOEXG1";

/// A committed update not yet applied to its unit: the step's gradient with the learning rate and
/// global gradient norm the commit gave. Applying it later gives the same bits as applying it at
/// the commit (AdamW is element-wise and the unit holds its own step count).
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    /// Gradients of `[w1, b1, w2, b2]`.
    pub grads: [Vec<f32>; 4],
    /// Learning rate of the step.
    pub lr: f64,
    /// Global gradient norm of the step.
    pub norm: f64,
}

impl ExpertSlot {
    /// Apply a committed update.
    pub fn apply(&mut self, mut pending: Pending) -> Result<()> {
        let ExpertSlot { params, optimizer } = self;
        let mut p: Vec<&mut Vec<f32>> = params.iter_mut().collect();
        let mut g: Vec<&mut Vec<f32>> = pending.grads.iter_mut().collect();
        optimizer.apply(&mut p, &mut g, pending.lr, pending.norm)
    }

    /// Bytes of a deferred gradient on disk.
    pub fn grad_bytes(&self) -> u64 {
        (HEADER + 4 * self.params.iter().map(Vec::len).sum::<usize>()) as u64
    }
}

/// `len` little-endian f32 from `bytes` at `*at`, advancing `*at` (the caller checked the length).
fn floats_at(bytes: &[u8], at: &mut usize, len: usize) -> Vec<f32> {
    let v = floats_from_le(&bytes[*at..*at + 4 * len]);
    *at += 4 * len;
    v
}

/// Write `floats` as little-endian bytes at `*at`, advancing `*at` (the caller sized `out`).
fn put_floats(out: &mut [u8], at: &mut usize, floats: &[f32]) {
    put_floats_le(&mut out[*at..*at + 4 * floats.len()], floats);
    *at += 4 * floats.len();
}

/// Write the 32-byte header (magic, block, expert, optimizer step, float count) at the start of
/// `out`; returns where the floats begin.
fn put_header(out: &mut [u8], magic: &[u8; 8], id: UnitId, step: u64, floats: usize) -> usize {
    out[..8].copy_from_slice(magic);
    out[8..12].copy_from_slice(&(id.0 as u32).to_le_bytes());
    out[12..16].copy_from_slice(&(id.1 as u32).to_le_bytes());
    out[16..24].copy_from_slice(&step.to_le_bytes());
    out[24..32].copy_from_slice(&(floats as u64).to_le_bytes());
    HEADER
}

/// Bytes at the start of a unit's encoding that hold its header and parameters (what a forward
/// or backward pass needs).
pub fn params_len(template: &ExpertSlot) -> usize {
    HEADER + 4 * template.params.iter().map(Vec::len).sum::<usize>()
}

/// Decode only the parameters from the first [`params_len`] bytes of a unit's encoding. The
/// result has no optimizer moments (empty buffers: AdamW refuses to step it), so it can serve a
/// forward or backward pass but never a commit.
pub fn decode_params(id: UnitId, bytes: &[u8], template: &ExpertSlot, what: &str) -> Result<ExpertSlot> {
    let bad = |detail: String| Error::Parse {
        what: format!("the stored parameters of expert {}.{} ({what})", id.0, id.1),
        detail,
    };
    if bytes.len() != params_len(template) || &bytes[..8] != MAGIC {
        return Err(bad(format!("{} bytes, expected {}", bytes.len(), params_len(template))));
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    if (word(8) as usize, word(12) as usize) != id {
        return Err(bad(format!("it holds expert {}.{}", word(8), word(12))));
    }
    let mut at = HEADER;
    let params = [0, 1, 2, 3].map(|k| floats_at(bytes, &mut at, template.params[k].len()));
    Ok(ExpertSlot {
        params,
        optimizer: template.optimizer.without_moments(),
    })
}

/// Bytes of a deferred gradient's encoding ([`encode_grads_into`]).
pub fn grads_len(grads: &[Vec<f32>; 4]) -> usize {
    HEADER + 4 * grads.iter().map(Vec::len).sum::<usize>()
}

/// The disk encoding of a deferred gradient (header as for units, then the four gradients) into
/// `out`, which holds exactly [`grads_len`] bytes.
pub fn encode_grads_into(id: UnitId, grads: &[Vec<f32>; 4], out: &mut [u8]) {
    let floats: usize = grads.iter().map(Vec::len).sum();
    let mut at = put_header(out, GRAD_MAGIC, id, 0, floats);
    for buf in grads {
        put_floats(out, &mut at, buf);
    }
}

/// [`encode_grads_into`] a new buffer.
pub fn encode_grads(id: UnitId, grads: &[Vec<f32>; 4]) -> Vec<u8> {
    let mut out = vec![0u8; grads_len(grads)];
    encode_grads_into(id, grads, &mut out);
    out
}

/// Decode a deferred gradient written by [`encode_grads`], shaped like `template`'s parameters.
pub fn decode_grads(id: UnitId, bytes: &[u8], template: &ExpertSlot) -> Result<[Vec<f32>; 4]> {
    let floats: usize = template.params.iter().map(Vec::len).sum();
    let bad = |detail: String| Error::Parse {
        what: format!("the deferred gradient of expert {}.{}", id.0, id.1),
        detail,
    };
    if bytes.len() != HEADER + 4 * floats || &bytes[..8] != GRAD_MAGIC {
        return Err(bad(format!(
            "{} bytes, expected {} with the gradient magic",
            bytes.len(),
            HEADER + 4 * floats
        )));
    }
    let mut at = HEADER;
    Ok([0, 1, 2, 3].map(|k| floats_at(bytes, &mut at, template.params[k].len())))
}
const HEADER: usize = 32;

/// Bytes of a unit's encoding ([`encode_into`]).
pub fn encoded_len(slot: &ExpertSlot) -> usize {
    HEADER + 4 * slot.floats()
}

/// The disk encoding: a 32-byte header (magic, block, expert, optimizer step, float count), then
/// the parameters, first moments and second moments, little-endian f32, into `out`, which holds
/// exactly [`encoded_len`] bytes.
pub fn encode_into(id: UnitId, slot: &ExpertSlot, out: &mut [u8]) {
    let mut at = put_header(out, MAGIC, id, slot.optimizer.step, slot.floats());
    for buf in slot.params.iter().chain(&slot.optimizer.m).chain(&slot.optimizer.v) {
        put_floats(out, &mut at, buf);
    }
}

/// [`encode_into`] a new buffer.
pub fn encode(id: UnitId, slot: &ExpertSlot) -> Vec<u8> {
    let mut out = vec![0u8; encoded_len(slot)];
    encode_into(id, slot, &mut out);
    out
}

/// Decode a unit written by [`encode`]; `template` gives the shapes and the optimizer settings.
/// `what` names the source in errors.
pub fn decode(id: UnitId, bytes: &[u8], template: &ExpertSlot, what: &str) -> Result<ExpertSlot> {
    let bad = |detail: String| Error::Parse {
        what: format!("the stored state of expert {}.{} ({what})", id.0, id.1),
        detail,
    };
    let floats = template.floats();
    if bytes.len() != HEADER + 4 * floats {
        return Err(bad(format!("{} bytes, expected {}", bytes.len(), HEADER + 4 * floats)));
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let long = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if &bytes[..8] != MAGIC {
        return Err(bad("not a semoe expert unit (bad magic)".into()));
    }
    if (word(8) as usize, word(12) as usize) != id || long(24) != floats as u64 {
        return Err(bad(format!(
            "it holds expert {}.{} with {} floats",
            word(8),
            word(12),
            long(24)
        )));
    }
    let mut at = HEADER;
    let mut take = |len: usize| floats_at(bytes, &mut at, len);
    let params = [0, 1, 2, 3].map(|k| take(template.params[k].len()));
    let m = template.optimizer.m.iter().map(|t| take(t.len())).collect();
    let v = template.optimizer.v.iter().map(|t| take(t.len())).collect();
    let optimizer = template.optimizer.with_moments(long(16), m, v)?;
    Ok(ExpertSlot { params, optimizer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::OptimizerConfig;

    pub(crate) fn slot(seed: f32) -> ExpertSlot {
        let sizes = [6, 3, 6, 2];
        let mut optimizer = AdamW::with_decay(OptimizerConfig::default(), &sizes, &[true, false, true, false]).unwrap();
        let fill = |n: usize, k: f32| (0..n).map(|i| seed + k + i as f32 * 0.25).collect::<Vec<f32>>();
        optimizer
            .restore(
                7,
                sizes.iter().map(|&n| fill(n, 100.0)).collect(),
                sizes.iter().map(|&n| fill(n, 200.0)).collect(),
            )
            .unwrap();
        ExpertSlot {
            params: [fill(6, 0.0), fill(3, 1.0), fill(6, 2.0), fill(2, 3.0)],
            optimizer,
        }
    }

    #[test]
    fn round_trips_bit_for_bit() {
        let s = slot(0.5);
        let bytes = encode((2, 5), &s);
        assert_eq!(bytes.len() as u64, s.bytes());
        let back = decode((2, 5), &bytes, &slot(0.0), "test").unwrap();
        assert_eq!(back.params, s.params);
        assert_eq!(back.optimizer, s.optimizer);
    }

    #[test]
    fn the_size_from_the_shapes_is_the_size_of_a_unit() {
        // `slot` is an expert of d_model 2 and d_ff 3.
        assert_eq!(ExpertSlot::bytes_for(2, 3), slot(0.5).bytes());
    }

    #[test]
    fn parameters_alone_decode_from_the_front_of_a_unit() {
        let s = slot(0.5);
        let bytes = encode((2, 5), &s);
        let p = decode_params((2, 5), &bytes[..params_len(&s)], &slot(0.0), "test").unwrap();
        assert_eq!(p.params, s.params);
        assert!(p.optimizer.m.iter().all(Vec::is_empty));
        assert!(decode_params((2, 6), &bytes[..params_len(&s)], &s, "test").is_err());
    }

    #[test]
    fn gradients_round_trip() {
        let s = slot(0.5);
        let g = s.params.clone();
        let back = decode_grads((1, 1), &encode_grads((1, 1), &g), &s).unwrap();
        assert_eq!(back, g);
        assert!(decode_grads((1, 1), &encode((1, 1), &s), &s).is_err());
    }

    #[test]
    fn refuses_the_wrong_unit_or_a_truncated_file() {
        let bytes = encode((2, 5), &slot(0.5));
        let e = decode((2, 6), &bytes, &slot(0.0), "test").unwrap_err().to_string();
        assert!(e.contains("expert 2.6") && e.contains("holds expert 2.5"), "{e}");
        let e = decode((2, 5), &bytes[..40], &slot(0.0), "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("40 bytes"), "{e}");
    }
}
