//! The dense building blocks of the transformer, forward and backward by hand: layer norm, causal
//! multi-head self-attention, the dense GELU feed-forward network, embeddings and cross-entropy.
//!
//! Every function works on one group of sequences at a time (rows = sequences x positions), so the
//! matmul shapes follow from the config alone (docs/architecture.md, "The determinism contract").
//! Per-row reductions run in a fixed order; parameter gradients are accumulated (`+=`) into the
//! caller's buffers.

use crate::error::Result;
use crate::kernels::{reduce, Backend, Gelu, Mat, Scalar};

/// Epsilon of every layer norm (PyTorch's default).
pub const LN_EPS: f64 = 1e-5;

/// What layer norm keeps for its backward pass.
#[derive(Clone, Debug, Default)]
pub struct LayerNormCache<T> {
    /// Normalised input `(x - mean) * rstd`, `[N][D]`.
    xhat: Vec<T>,
    /// `1 / sqrt(var + eps)` per row.
    rstd: Vec<T>,
}

/// `y = (x - mean) / sqrt(var + eps) * w + b` per row of width `w.len()`; returns `y` and what the
/// backward pass needs. Both buffers are built row by row, never zero-filled first.
pub fn layer_norm_forward<T: Scalar>(x: &[T], w: &[T], b: &[T]) -> (Vec<T>, LayerNormCache<T>) {
    let d = w.len();
    let rows = x.len() / d;
    let mut xhat = Vec::with_capacity(rows * d);
    let mut y = Vec::with_capacity(rows * d);
    let mut rstd = Vec::with_capacity(rows);
    let inv_d = T::ONE / T::from_usize(d);
    let eps = T::from_f64(LN_EPS);
    for xr in x.chunks_exact(d) {
        let mean = reduce::sum(xr) * inv_d;
        let var = reduce::sum_sq_dev(xr, mean) * inv_d;
        let rs = T::ONE / T::from_f64((var + eps).to_f64().sqrt());
        rstd.push(rs);
        let start = xhat.len();
        xhat.extend(xr.iter().map(|&v| (v - mean) * rs));
        y.extend(xhat[start..].iter().zip(w).zip(b).map(|((&xh, &w), &b)| xh * w + b));
    }
    (y, LayerNormCache { xhat, rstd })
}

/// Backward of layer norm: adds `dx` into `dx` (residual streams accumulate), `dw`, `db`.
pub fn layer_norm_backward<T: Scalar>(
    cache: &LayerNormCache<T>,
    w: &[T],
    dy: &[T],
    dx: &mut [T],
    dw: &mut [T],
    db: &mut [T],
) {
    let d = w.len();
    let (dw, db) = (&mut dw[..d], &mut db[..d]);
    let inv_d = T::ONE / T::from_usize(d);
    let mut dxhat = vec![T::ZERO; d];
    for (r, &rs) in cache.rstd.iter().enumerate() {
        let (xh, dyr) = (&cache.xhat[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
        for i in 0..d {
            dxhat[i] = dyr[i] * w[i];
            dw[i] += dyr[i] * xh[i];
            db[i] += dyr[i];
        }
        let mean_dxhat = reduce::sum(&dxhat) * inv_d;
        let mean_dxhat_xhat = reduce::dot(&dxhat, xh) * inv_d;
        let dxr = &mut dx[r * d..(r + 1) * d];
        for i in 0..d {
            dxr[i] += rs * (dxhat[i] - mean_dxhat - xh[i] * mean_dxhat_xhat);
        }
    }
}

/// Shape of an attention call: `seqs` sequences of `t` positions, `heads` heads of width `dh`.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Sequences in the group.
    pub seqs: usize,
    /// Positions per sequence.
    pub t: usize,
    /// Heads.
    pub heads: usize,
    /// Width of one head.
    pub dh: usize,
}

impl AttnShape {
    fn d(&self) -> usize {
        self.heads * self.dh
    }
    fn n(&self) -> usize {
        self.seqs * self.t
    }
}

/// Rows of the score matrix computed together. Causal attention needs, for rows `i0..i1`, only the
/// keys `0..i1`: cutting the rows into blocks skips most of the masked upper triangle (75% of the
/// full products remain at T = 64, 56% at T = 256) while keeping each product large enough for gemm.
pub const ATTN_ROW_BLOCK: usize = 32;

/// The row blocks of a `t x t` causal score matrix: `(i0, i1, offset)` where `offset` is where the
/// block's `(i1 - i0) x i1` probabilities start in one sequence's compact storage.
fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut offset = 0;
    (0..t).step_by(ATTN_ROW_BLOCK).map(move |i0| {
        let i1 = (i0 + ATTN_ROW_BLOCK).min(t);
        let at = offset;
        offset += (i1 - i0) * i1;
        (i0, i1, at)
    })
}

/// Elements of one sequence's compact causal probabilities (the sum of its row blocks).
fn compact_len(t: usize) -> usize {
    row_blocks(t).map(|(i0, i1, _)| (i1 - i0) * i1).sum()
}

/// What attention keeps for its backward pass.
#[derive(Clone, Debug, Default)]
pub struct AttnCache<T> {
    /// q, k, v in head-major layout `[3][H][N][dh]`.
    qkv_heads: Vec<T>,
    /// Attention probabilities per head and sequence, by row blocks ([`row_blocks`]); zero above the
    /// diagonal inside each block.
    probs: Vec<T>,
}

/// `[N][parts * D]` (heads contiguous inside each part) -> `[parts][H][N][dh]`, built in output
/// order (no zero-fill).
fn split_heads<T: Scalar>(x: &[T], s: AttnShape, parts: usize) -> Vec<T> {
    let (n, d, dh) = (s.n(), s.d(), s.dh);
    let mut out = Vec::with_capacity(x.len());
    for part in 0..parts {
        for head in 0..s.heads {
            for r in 0..n {
                out.extend_from_slice(&x[r * parts * d + part * d + head * dh..][..dh]);
            }
        }
    }
    out
}

/// `[parts][H][N][dh]` -> `[N][parts * D]`: the inverse of [`split_heads`].
fn merge_heads<T: Scalar>(heads: &[T], s: AttnShape, parts: usize) -> Vec<T> {
    let (n, dh, plane) = (s.n(), s.dh, s.n() * s.dh);
    let mut out = Vec::with_capacity(heads.len());
    for r in 0..n {
        for part in 0..parts {
            for head in 0..s.heads {
                out.extend_from_slice(&heads[(part * s.heads + head) * plane + r * dh..][..dh]);
            }
        }
    }
    out
}

/// Causal softmax of one row block in place: row `r` (query `i0 + r`) of the `rows x width` scores
/// keeps columns `0..=i0 + r`, scaled by `scale`; the columns after the diagonal become 0.
fn causal_softmax_block<T: Scalar>(scores: &mut [T], i0: usize, width: usize, scale: T) {
    for (r, row) in scores.chunks_exact_mut(width).enumerate() {
        let (live, masked) = row.split_at_mut(i0 + r + 1);
        let max = reduce::max(live);
        T::exp_affine(live, scale, max * scale);
        let sum = reduce::sum(live);
        let inv = T::ONE / sum;
        live.iter_mut().for_each(|v| *v *= inv);
        masked.fill(T::ZERO);
    }
}

/// Causal self-attention over `qkv` (`[N][3D]`); returns the merged head outputs `[N][D]` (before
/// the output projection) and what the backward pass needs.
pub fn attention_forward<B: Backend, T: Scalar>(
    backend: &B,
    qkv: &[T],
    s: AttnShape,
) -> Result<(Vec<T>, AttnCache<T>)> {
    let (n, t, dh) = (s.n(), s.t, s.dh);
    let qkv_heads = split_heads(qkv, s, 3);
    let plane = n * dh;
    let per_seq = compact_len(t);
    let mut probs = vec![T::ZERO; s.heads * s.seqs * per_seq];
    let mut o_heads = vec![T::ZERO; s.heads * plane];
    let scale = T::ONE / T::from_f64((dh as f64).sqrt());
    for head in 0..s.heads {
        for b in 0..s.seqs {
            let rows = |part: usize| &qkv_heads[part * s.heads * plane + head * plane + b * t * dh..][..t * dh];
            let (q, k, v) = (rows(0), rows(1), rows(2));
            let seq_probs = &mut probs[(head * s.seqs + b) * per_seq..][..per_seq];
            let o = &mut o_heads[head * plane + b * t * dh..][..t * dh];
            for (i0, i1, at) in row_blocks(t) {
                let m = i1 - i0;
                let p = &mut seq_probs[at..at + m * i1];
                let q_blk = Mat::new(&q[i0 * dh..i1 * dh], m, dh)?;
                backend.matmul(p, q_blk, Mat::new(&k[..i1 * dh], i1, dh)?.t(), false)?;
                causal_softmax_block(p, i0, i1, scale);
                let p = Mat::new(&*p, m, i1)?;
                backend.matmul(&mut o[i0 * dh..i1 * dh], p, Mat::new(&v[..i1 * dh], i1, dh)?, false)?;
            }
        }
    }
    Ok((merge_heads(&o_heads, s, 1), AttnCache { qkv_heads, probs }))
}

/// Backward of [`attention_forward`]: given `d_out` (`[N][D]`), returns `d_qkv` (`[N][3D]`).
pub fn attention_backward<B: Backend, T: Scalar>(
    backend: &B,
    cache: &AttnCache<T>,
    d_out: &[T],
    s: AttnShape,
) -> Result<Vec<T>> {
    let (n, t, dh, h) = (s.n(), s.t, s.dh, s.heads);
    let plane = n * dh;
    let per_seq = compact_len(t);
    let d_o = split_heads(d_out, s, 1);
    // Zeroed: dK and dV accumulate over the row blocks.
    let mut d_heads = vec![T::ZERO; 3 * h * plane];
    let mut d_s = vec![T::ZERO; ATTN_ROW_BLOCK.min(t) * t];
    let scale = T::ONE / T::from_f64((dh as f64).sqrt());
    for head in 0..h {
        for b in 0..s.seqs {
            let at = |part: usize| part * h * plane + head * plane + b * t * dh;
            let rows = |part: usize| &cache.qkv_heads[at(part)..][..t * dh];
            let (q, k, v) = (rows(0), rows(1), rows(2));
            let seq_probs = &cache.probs[(head * s.seqs + b) * per_seq..][..per_seq];
            let d_o_b = &d_o[head * plane + b * t * dh..][..t * dh];
            let (d_q, rest) = d_heads[at(0)..].split_at_mut(at(1) - at(0));
            let (d_k, rest) = rest.split_at_mut(at(2) - at(1));
            let (d_q, d_k, d_v) = (&mut d_q[..t * dh], &mut d_k[..t * dh], &mut rest[..t * dh]);
            for (i0, i1, off) in row_blocks(t) {
                let m = i1 - i0;
                let p = &seq_probs[off..off + m * i1];
                let d_o_blk = Mat::new(&d_o_b[i0 * dh..i1 * dh], m, dh)?;
                // dV[..i1] += P^T dO ; dP = dO V^T
                backend.matmul(&mut d_v[..i1 * dh], Mat::new(p, m, i1)?.t(), d_o_blk, true)?;
                let d_s = &mut d_s[..m * i1];
                backend.matmul(d_s, d_o_blk, Mat::new(&v[..i1 * dh], i1, dh)?.t(), false)?;
                // softmax backward (causal part only), times the score scale: dS = P * (dP - <dP, P>) * scale
                for (r, (pr, dr)) in p.chunks_exact(i1).zip(d_s.chunks_exact_mut(i1)).enumerate() {
                    let live = i0 + r + 1;
                    let dot = reduce::dot(&pr[..live], &dr[..live]);
                    for j in 0..live {
                        dr[j] = pr[j] * (dr[j] - dot) * scale;
                    }
                    dr[live..].fill(T::ZERO);
                }
                // dQ[i0..i1] = dS K[..i1] ; dK[..i1] += dS^T Q[i0..i1]
                let d_s = Mat::new(&*d_s, m, i1)?;
                backend.matmul(&mut d_q[i0 * dh..i1 * dh], d_s, Mat::new(&k[..i1 * dh], i1, dh)?, false)?;
                let q_blk = Mat::new(&q[i0 * dh..i1 * dh], m, dh)?;
                backend.matmul(&mut d_k[..i1 * dh], d_s.t(), q_blk, true)?;
            }
        }
    }
    Ok(merge_heads(&d_heads, s, 3))
}

/// `out = x @ w + b` for `x` of `rows x w_rows`.
pub fn linear_forward<B: Backend, T: Scalar>(
    backend: &B,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    out_cols: usize,
) -> Result<Vec<T>> {
    let in_cols = w.len() / out_cols;
    let rows = x.len() / in_cols;
    backend.product(Mat::new(x, rows, in_cols)?, Mat::new(w, in_cols, out_cols)?, b)
}

/// Backward of [`linear_forward`]: `dw += x^T dy`, `db += colsum(dy)`; returns `dx = dy w^T`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<B: Backend, T: Scalar>(
    backend: &B,
    x: &[T],
    w: &[T],
    dy: &[T],
    out_cols: usize,
    dw: &mut [T],
    db: Option<&mut [T]>,
) -> Result<Vec<T>> {
    let in_cols = w.len() / out_cols;
    let rows = x.len() / in_cols;
    let dy_m = Mat::new(dy, rows, out_cols)?;
    backend.matmul(dw, Mat::new(x, rows, in_cols)?.t(), dy_m, true)?;
    if let Some(db) = db {
        backend.add_column_sums(db, dy)?;
    }
    backend.product(dy_m, Mat::new(w, in_cols, out_cols)?.t(), None)
}

/// The dense feed-forward network `GELU(x @ w1 + b1) @ w2 + b2`; returns (pre-activation,
/// activation, output).
pub fn mlp_forward<B: Backend, T: Scalar>(
    backend: &B,
    gelu: Gelu,
    x: &[T],
    w1: &[T],
    b1: &[T],
    w2: &[T],
    b2: &[T],
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let f = b1.len();
    let h = linear_forward(backend, x, w1, Some(b1), f)?;
    let mut a = vec![T::ZERO; h.len()];
    backend.gelu_forward(gelu, &h, &mut a)?;
    let out = linear_forward(backend, &a, w2, Some(b2), b2.len())?;
    Ok((h, a, out))
}

/// Softmax cross-entropy of `logits` (`[N][V]`) against `targets`: returns the summed loss and
/// writes `dlogits = (softmax - onehot) * grad_scale`.
pub fn cross_entropy<T: Scalar>(logits: &[T], targets: &[u32], grad_scale: T, dlogits: &mut [T]) -> f64 {
    let v = logits.len() / targets.len().max(1);
    let mut total = 0.0;
    for (r, &tg) in targets.iter().enumerate() {
        let (row, d) = (&logits[r * v..(r + 1) * v], &mut dlogits[r * v..(r + 1) * v]);
        let lse = crate::kernels::cpu::softmax_row(row, d);
        total += (lse - row[tg as usize]).to_f64();
        d.iter_mut().for_each(|p| *p *= grad_scale);
        d[tg as usize] -= grad_scale;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Cpu;

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// Full-matrix causal attention, straight from the definition.
    fn naive_attention(qkv: &[f64], s: AttnShape) -> Vec<f64> {
        let (d, t, dh) = (s.d(), s.t, s.dh);
        let mut out = vec![0.0; s.n() * d];
        for b in 0..s.seqs {
            for head in 0..s.heads {
                let at = |i: usize, part: usize, c: usize| qkv[(b * t + i) * 3 * d + part * d + head * dh + c];
                for i in 0..t {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| (0..dh).map(|c| at(i, 0, c) * at(j, 1, c)).sum::<f64>() / (dh as f64).sqrt())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..dh {
                        out[(b * t + i) * d + head * dh + c] = (0..=i).map(|j| e[j] / z * at(j, 2, c)).sum();
                    }
                }
            }
        }
        out
    }

    /// A shape whose sequences span several row blocks, the last one partial.
    fn shape() -> AttnShape {
        AttnShape {
            seqs: 2,
            t: 2 * ATTN_ROW_BLOCK + 5,
            heads: 2,
            dh: 3,
        }
    }

    #[test]
    fn row_blocks_cover_the_causal_triangle() {
        for t in [1, ATTN_ROW_BLOCK, ATTN_ROW_BLOCK + 1, 3 * ATTN_ROW_BLOCK + 7] {
            let blocks: Vec<_> = row_blocks(t).collect();
            assert_eq!(blocks.first().map(|b| b.0), Some(0));
            assert_eq!(blocks.last().map(|b| b.1), Some(t));
            for pair in blocks.windows(2) {
                assert_eq!(pair[0].1, pair[1].0, "blocks are contiguous");
                assert_eq!(pair[1].2, pair[0].2 + (pair[0].1 - pair[0].0) * pair[0].1);
            }
            assert!(compact_len(t) >= t * (t + 1) / 2 && compact_len(t) <= t * t);
        }
    }

    #[test]
    fn blocked_attention_matches_the_definition() -> Result<()> {
        let s = shape();
        let qkv = values(s.n() * 3 * s.d(), 7);
        let (out, _) = attention_forward(&Cpu::new(1)?, &qkv, s)?;
        let want = naive_attention(&qkv, s);
        assert_eq!(out.len(), want.len());
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-12, "output {i}: {a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn blocked_attention_backward_matches_finite_differences() -> Result<()> {
        let (s, cpu) = (shape(), Cpu::new(1)?);
        let qkv = values(s.n() * 3 * s.d(), 11);
        let weights = values(s.n() * s.d(), 13);
        let loss = |qkv: &[f64]| -> f64 { naive_attention(qkv, s).iter().zip(&weights).map(|(o, w)| o * w).sum() };
        let (_, cache) = attention_forward(&cpu, &qkv, s)?;
        let d_qkv = attention_backward(&cpu, &cache, &weights, s)?;
        // Every q, k and v element of positions in the first, middle and last row blocks.
        for i in (0..qkv.len()).step_by(7) {
            let (mut up, mut down) = (qkv.clone(), qkv.clone());
            up[i] += 1e-6;
            down[i] -= 1e-6;
            let numeric = (loss(&up) - loss(&down)) / 2e-6;
            assert!(
                (numeric - d_qkv[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "d_qkv[{i}]: analytic {} vs numeric {numeric}",
                d_qkv[i]
            );
        }
        Ok(())
    }
}
