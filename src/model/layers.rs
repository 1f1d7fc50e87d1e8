//! The dense building blocks of the transformer, forward and backward by hand: layer norm, causal
//! multi-head self-attention, the dense GELU feed-forward network, embeddings and cross-entropy.
//!
//! Every function works on one group of sequences at a time (rows = sequences x positions), so the
//! matmul shapes follow from the config alone (DESIGN.md, Determinism). Per-row reductions run in a
//! fixed order; parameter gradients are accumulated (`+=`) into the caller's buffers.

use crate::error::Result;
use crate::kernels::{Backend, Gelu, Mat, Scalar};

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

/// `y = (x - mean) / sqrt(var + eps) * w + b` per row of width `w.len()`.
pub fn layer_norm_forward<T: Scalar>(x: &[T], w: &[T], b: &[T], y: &mut [T]) -> LayerNormCache<T> {
    let d = w.len();
    let rows = x.len() / d;
    let mut xhat = vec![T::ZERO; x.len()];
    let mut rstd = vec![T::ZERO; rows];
    let inv_d = T::ONE / T::from_usize(d);
    let eps = T::from_f64(LN_EPS);
    for r in 0..rows {
        let xr = &x[r * d..(r + 1) * d];
        let mean = xr.iter().fold(T::ZERO, |a, &v| a + v) * inv_d;
        let var = xr.iter().fold(T::ZERO, |a, &v| a + (v - mean) * (v - mean)) * inv_d;
        let rs = T::ONE / T::from_f64((var + eps).to_f64().sqrt());
        rstd[r] = rs;
        let (xh, yr) = (&mut xhat[r * d..(r + 1) * d], &mut y[r * d..(r + 1) * d]);
        for i in 0..d {
            xh[i] = (xr[i] - mean) * rs;
            yr[i] = xh[i] * w[i] + b[i];
        }
    }
    LayerNormCache { xhat, rstd }
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
    let inv_d = T::ONE / T::from_usize(d);
    for (r, &rs) in cache.rstd.iter().enumerate() {
        let (xh, dyr) = (&cache.xhat[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
        let mut mean_dxhat = T::ZERO;
        let mut mean_dxhat_xhat = T::ZERO;
        for i in 0..d {
            let dxh = dyr[i] * w[i];
            mean_dxhat += dxh;
            mean_dxhat_xhat += dxh * xh[i];
            dw[i] += dyr[i] * xh[i];
            db[i] += dyr[i];
        }
        mean_dxhat *= inv_d;
        mean_dxhat_xhat *= inv_d;
        let dxr = &mut dx[r * d..(r + 1) * d];
        for i in 0..d {
            dxr[i] += rs * (dyr[i] * w[i] - mean_dxhat - xh[i] * mean_dxhat_xhat);
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

/// What attention keeps for its backward pass.
#[derive(Clone, Debug, Default)]
pub struct AttnCache<T> {
    /// q, k, v in head-major layout `[3][H][N][dh]`.
    qkv_heads: Vec<T>,
    /// Attention probabilities `[H][seqs][T][T]` (zero above the diagonal).
    probs: Vec<T>,
}

/// `[N][3D]` (q | k | v, heads contiguous inside each) -> `[3][H][N][dh]`.
fn split_heads<T: Scalar>(qkv: &[T], s: AttnShape) -> Vec<T> {
    let (n, d, dh, h) = (s.n(), s.d(), s.dh, s.heads);
    let mut out = vec![T::ZERO; qkv.len()];
    for r in 0..n {
        for part in 0..3 {
            for head in 0..h {
                let src = &qkv[r * 3 * d + part * d + head * dh..][..dh];
                out[((part * h + head) * n + r) * dh..][..dh].copy_from_slice(src);
            }
        }
    }
    out
}

/// `[H][N][dh]` -> `[N][D]`, added into `out` when `add` is set (else overwritten).
fn merge_heads<T: Scalar>(heads: &[T], s: AttnShape, out: &mut [T], stride: usize, offset: usize) {
    let (n, dh) = (s.n(), s.dh);
    for head in 0..s.heads {
        for r in 0..n {
            out[r * stride + offset + head * dh..][..dh].copy_from_slice(&heads[(head * n + r) * dh..][..dh]);
        }
    }
}

/// Causal self-attention over `qkv` (`[N][3D]`); writes the merged head outputs `[N][D]` into `out`
/// (before the output projection).
pub fn attention_forward<B: Backend, T: Scalar>(
    backend: &B,
    qkv: &[T],
    s: AttnShape,
    out: &mut [T],
) -> Result<AttnCache<T>> {
    let (n, t, dh) = (s.n(), s.t, s.dh);
    let qkv_heads = split_heads(qkv, s);
    let plane = n * dh;
    let mut probs = vec![T::ZERO; s.heads * s.seqs * t * t];
    let mut o_heads = vec![T::ZERO; s.heads * plane];
    let scale = T::ONE / T::from_f64((dh as f64).sqrt());
    for head in 0..s.heads {
        for b in 0..s.seqs {
            let rows = |part: usize| &qkv_heads[part * s.heads * plane + head * plane + b * t * dh..][..t * dh];
            let p = &mut probs[(head * s.seqs + b) * t * t..][..t * t];
            backend.matmul(p, Mat::new(rows(0), t, dh)?, Mat::new(rows(1), t, dh)?.t(), false)?;
            for i in 0..t {
                let row = &mut p[i * t..(i + 1) * t];
                let max = row[..=i].iter().fold(row[0] * scale, |m, &v| m.max(v * scale));
                let mut sum = T::ZERO;
                for v in row[..=i].iter_mut() {
                    *v = (*v * scale - max).exp();
                    sum += *v;
                }
                let inv = T::ONE / sum;
                row[..=i].iter_mut().for_each(|v| *v *= inv);
                row[i + 1..].iter_mut().for_each(|v| *v = T::ZERO);
            }
            let o = &mut o_heads[head * plane + b * t * dh..][..t * dh];
            backend.matmul(o, Mat::new(p, t, t)?, Mat::new(rows(2), t, dh)?, false)?;
        }
    }
    merge_heads(&o_heads, s, out, s.d(), 0);
    Ok(AttnCache { qkv_heads, probs })
}

/// Backward of [`attention_forward`]: given `d_out` (`[N][D]`), writes `d_qkv` (`[N][3D]`).
pub fn attention_backward<B: Backend, T: Scalar>(
    backend: &B,
    cache: &AttnCache<T>,
    d_out: &[T],
    s: AttnShape,
    d_qkv: &mut [T],
) -> Result<()> {
    let (n, t, dh, h) = (s.n(), s.t, s.dh, s.heads);
    let plane = n * dh;
    // d_out -> [H][N][dh]
    let mut d_o = vec![T::ZERO; h * plane];
    for r in 0..n {
        for head in 0..h {
            d_o[(head * n + r) * dh..][..dh].copy_from_slice(&d_out[r * s.d() + head * dh..][..dh]);
        }
    }
    let mut d_heads = vec![T::ZERO; 3 * h * plane];
    let mut d_p = vec![T::ZERO; t * t];
    let scale = T::ONE / T::from_f64((dh as f64).sqrt());
    for head in 0..h {
        for b in 0..s.seqs {
            let at = |part: usize| part * h * plane + head * plane + b * t * dh;
            let rows = |part: usize| &cache.qkv_heads[at(part)..][..t * dh];
            let p = &cache.probs[(head * s.seqs + b) * t * t..][..t * t];
            let d_o_b = &d_o[head * plane + b * t * dh..][..t * dh];
            // dP = dO V^T ; dV = P^T dO
            backend.matmul(&mut d_p, Mat::new(d_o_b, t, dh)?, Mat::new(rows(2), t, dh)?.t(), false)?;
            backend.matmul(
                &mut d_heads[at(2)..][..t * dh],
                Mat::new(p, t, t)?.t(),
                Mat::new(d_o_b, t, dh)?,
                false,
            )?;
            // softmax backward (causal part only), times the score scale: dS = P * (dP - <dP, P>) * scale
            for i in 0..t {
                let (pr, dr) = (&p[i * t..(i + 1) * t], &mut d_p[i * t..(i + 1) * t]);
                let dot = (0..=i).fold(T::ZERO, |a, j| a + pr[j] * dr[j]);
                for j in 0..=i {
                    dr[j] = pr[j] * (dr[j] - dot) * scale;
                }
                dr[i + 1..].iter_mut().for_each(|v| *v = T::ZERO);
            }
            // dQ = dS K ; dK = dS^T Q
            backend.matmul(
                &mut d_heads[at(0)..][..t * dh],
                Mat::new(&d_p, t, t)?,
                Mat::new(rows(1), t, dh)?,
                false,
            )?;
            backend.matmul(
                &mut d_heads[at(1)..][..t * dh],
                Mat::new(&d_p, t, t)?.t(),
                Mat::new(rows(0), t, dh)?,
                false,
            )?;
        }
    }
    for part in 0..3 {
        merge_heads(
            &d_heads[part * h * plane..(part + 1) * h * plane],
            s,
            d_qkv,
            3 * s.d(),
            part * s.d(),
        );
    }
    Ok(())
}

/// `out = x @ w + b` for `x` of `rows x w_rows`.
pub fn linear_forward<B: Backend, T: Scalar>(
    backend: &B,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    out_cols: usize,
    out: &mut [T],
) -> Result<()> {
    let in_cols = w.len() / out_cols;
    let rows = x.len() / in_cols;
    match b {
        Some(b) => {
            backend.broadcast_rows(out, b)?;
            backend.matmul(out, Mat::new(x, rows, in_cols)?, Mat::new(w, in_cols, out_cols)?, true)
        }
        None => backend.matmul(out, Mat::new(x, rows, in_cols)?, Mat::new(w, in_cols, out_cols)?, false),
    }
}

/// Backward of [`linear_forward`]: `dw += x^T dy`, `db += colsum(dy)`, and `dx (+)= dy w^T`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<B: Backend, T: Scalar>(
    backend: &B,
    x: &[T],
    w: &[T],
    dy: &[T],
    out_cols: usize,
    dw: &mut [T],
    db: Option<&mut [T]>,
    dx: Option<&mut [T]>,
    accumulate_dx: bool,
) -> Result<()> {
    let in_cols = w.len() / out_cols;
    let rows = x.len() / in_cols;
    backend.matmul(dw, Mat::new(x, rows, in_cols)?.t(), Mat::new(dy, rows, out_cols)?, true)?;
    if let Some(db) = db {
        backend.add_column_sums(db, dy)?;
    }
    if let Some(dx) = dx {
        backend.matmul(
            dx,
            Mat::new(dy, rows, out_cols)?,
            Mat::new(w, in_cols, out_cols)?.t(),
            accumulate_dx,
        )?;
    }
    Ok(())
}

/// The dense feed-forward network `GELU(x @ w1 + b1) @ w2 + b2`; returns (pre-activation, activation).
#[allow(clippy::too_many_arguments)]
pub fn mlp_forward<B: Backend, T: Scalar>(
    backend: &B,
    gelu: Gelu,
    x: &[T],
    w1: &[T],
    b1: &[T],
    w2: &[T],
    b2: &[T],
    out: &mut [T],
) -> Result<(Vec<T>, Vec<T>)> {
    let f = b1.len();
    let rows = x.len() / (w1.len() / f);
    let mut h = vec![T::ZERO; rows * f];
    linear_forward(backend, x, w1, Some(b1), f, &mut h)?;
    let mut a = vec![T::ZERO; h.len()];
    backend.gelu_forward(gelu, &h, &mut a)?;
    linear_forward(backend, &a, w2, Some(b2), b2.len(), out)?;
    Ok((h, a))
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
