//! The MoE layer's passes cut at the expert boundary, so that experts can run somewhere else.
//!
//! [`MoeLayer::forward`](super::MoeLayer::forward) and `backward` are these stages run in one
//! place; the actor runtime runs the gate stages on the worker that holds a group and the expert
//! stages on the worker that hosts the expert. Both paths execute the same functions on the same
//! shapes (one group's rows of one expert per call), so they produce the same bits
//! (docs/architecture.md, "The determinism contract").

use super::{MoeConfig, MoeStats, Routing};
use crate::error::{Error, Result};
use crate::kernels::{check_len, reduce, Backend, Mat, Scalar, SKIP};

/// `f32::EPSILON`: the floor of the renormalisation denominator (DeepSpeed clamps at the f32 epsilon).
const NORMALIZE_EPS: f64 = f32::EPSILON as f64;

/// The gate's forward result for one group: routing, router losses, combine weights, and the
/// dispatched expert batch `xe` (`[R][d_model]`, expert `e`'s rows at `routing.offsets[e]..[e+1]`).
#[derive(Clone, Debug)]
pub struct Dispatch<T> {
    /// Gate probabilities `[S][E]`.
    pub gates: Vec<T>,
    /// logsumexp of each token's logits.
    pub lse: Vec<T>,
    /// The routing decisions.
    pub routing: Routing,
    /// Combine weight of each assignment `[k][S]` (0 when dropped).
    pub weights: Vec<T>,
    /// Concatenated expert inputs `[R][d_model]` in canonical order.
    pub xe: Vec<T>,
    /// Auxiliary load-balancing loss.
    pub l_aux: T,
    /// Router z-loss.
    pub z_loss: T,
}

impl<T> Dispatch<T> {
    /// Load and drop counts of this routing.
    pub fn stats(&self) -> MoeStats {
        MoeStats {
            expert_tokens: self.routing.expert_counts(),
            dropped: self.routing.dropped(),
            capacity: self.routing.capacity,
        }
    }
}

/// One expert's weights.
#[derive(Clone, Copy, Debug)]
pub struct ExpertWeights<'a, T> {
    /// `[d_model][d_ff]`
    pub w1: &'a [T],
    /// `[d_ff]`
    pub b1: &'a [T],
    /// `[d_ff][d_model]`
    pub w2: &'a [T],
    /// `[d_model]`
    pub b2: &'a [T],
}

/// One expert's gradient buffers (accumulated into).
#[derive(Debug)]
pub struct ExpertGrads<'a, T> {
    /// `[d_model][d_ff]`
    pub w1: &'a mut [T],
    /// `[d_ff]`
    pub b1: &'a mut [T],
    /// `[d_ff][d_model]`
    pub w2: &'a mut [T],
    /// `[d_model]`
    pub b2: &'a mut [T],
}

/// Gate forward of one group `x` (`[S][d_model]`): logits, softmax, routing, router losses, combine
/// weights and the dispatch gather.
pub fn gate_forward<T: Scalar, B: Backend>(c: &MoeConfig, backend: &B, wg: &[T], x: &[T]) -> Result<Dispatch<T>> {
    let (d, e_count) = (c.d_model, c.experts);
    if !x.len().is_multiple_of(d) {
        return Err(Error::shape(
            "MoE input",
            format!("{} elements are not whole rows of d_model={d}", x.len()),
        ));
    }
    check_len("MoE gate weights", wg, d * e_count)?;
    let s_count = x.len() / d;
    let mut logits = vec![T::ZERO; s_count * e_count];
    backend.matmul(&mut logits, Mat::new(x, s_count, d)?, Mat::new(wg, d, e_count)?, false)?;
    if let Some(i) = logits.iter().position(|v| !v.to_f64().is_finite()) {
        return Err(Error::NonFinite {
            context: "the MoE gate".into(),
            detail: format!("gate logit of token {}", i / e_count),
        });
    }
    let mut gates = vec![T::ZERO; logits.len()];
    let lse = backend.softmax_rows(&logits, e_count, &mut gates)?;
    let routing = Routing::new(c, &gates, s_count)?;

    let inv_s = T::ONE / T::from_usize(s_count.max(1));
    let mut l_aux = T::ZERO;
    for e in 0..e_count {
        let mut me = T::ZERO;
        for s in 0..s_count {
            me += gates[s * e_count + e];
        }
        l_aux += me * inv_s * T::from_usize(routing.first_choice_counts[e]) * inv_s;
    }
    let l_aux = l_aux * T::from_usize(e_count); // E^2 * mean_e(..) = E * sum_e(..)
    let z_loss = lse.iter().fold(T::ZERO, |acc, &l| acc + l * l) * inv_s;
    let weights = combine_weights(c, &gates, &routing);

    let mut xe = vec![T::ZERO; routing.kept() * d];
    backend.gather_rows(&mut xe, x, d, &routing.row_token, None)?;
    Ok(Dispatch {
        gates,
        lse,
        routing,
        weights,
        xe,
        l_aux,
        z_loss,
    })
}

/// One expert's forward over its rows `xe` (`[n][d_model]`): `h = xe @ w1 + b1`, `a = gelu(h)`,
/// `ye = a @ w2 + b2`. `h`, `a` (`[n][d_ff]`) and `ye` (`[n][d_model]`) are written.
pub fn expert_forward<T: Scalar, B: Backend>(
    c: &MoeConfig,
    b: &B,
    w: ExpertWeights<'_, T>,
    xe: &[T],
    h: &mut [T],
    a: &mut [T],
    ye: &mut [T],
) -> Result<()> {
    let (d, f) = (c.d_model, c.d_ff);
    let n = xe.len() / d;
    check_len("expert input", xe, n * d)?;
    b.broadcast_rows(h, w.b1)?;
    b.matmul(h, Mat::new(xe, n, d)?, Mat::new(w.w1, d, f)?, true)?;
    b.gelu_forward(c.gelu, h, a)?;
    b.broadcast_rows(ye, w.b2)?;
    b.matmul(ye, Mat::new(a, n, f)?, Mat::new(w.w2, f, d)?, true)
}

/// [`expert_forward`] into new buffers, `(h, a, ye)`, which are never zero-filled first (the
/// actor runtime's path, where every group's rows of an expert get buffers of their own).
pub fn expert_forward_new<T: Scalar, B: Backend>(
    c: &MoeConfig,
    b: &B,
    w: ExpertWeights<'_, T>,
    xe: &[T],
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let (d, f) = (c.d_model, c.d_ff);
    let n = xe.len() / d;
    let h = b.product(Mat::new(xe, n, d)?, Mat::new(w.w1, d, f)?, Some(w.b1))?;
    let mut a = vec![T::ZERO; h.len()];
    b.gelu_forward(c.gelu, &h, &mut a)?;
    let ye = b.product(Mat::new(&a, n, f)?, Mat::new(w.w2, f, d)?, Some(w.b2))?;
    Ok((h, a, ye))
}

/// The combine: `y[s] = sum_j w_j[s] * ye[row(j, s)]` for the group of `dispatch`.
pub fn combine<T: Scalar, B: Backend>(c: &MoeConfig, backend: &B, dispatch: &Dispatch<T>, ye: &[T]) -> Result<Vec<T>> {
    let (d, k) = (c.d_model, c.k);
    let r = &dispatch.routing;
    check_len("expert outputs", ye, r.kept() * d)?;
    let mut y = vec![T::ZERO; r.tokens * d];
    let token_weights = token_major(&dispatch.weights, k, r.tokens);
    backend.gather_sum_rows(&mut y, ye, d, k, &r.token_major_rows(), Some(&token_weights))?;
    Ok(y)
}

/// Backward of the combine given `gy = dL/dy`: the gradient of every combine weight (`[k][S]`) and
/// of every expert output row (`[R][d_model]`, canonical order).
pub fn combine_backward<T: Scalar, B: Backend>(
    c: &MoeConfig,
    backend: &B,
    dispatch: &Dispatch<T>,
    ye: &[T],
    gy: &[T],
) -> Result<(Vec<T>, Vec<T>)> {
    let (d, k) = (c.d_model, c.k);
    let routing = &dispatch.routing;
    let s_count = routing.tokens;
    check_len("MoE backward gradient gy", gy, s_count * d)?;
    check_len("expert outputs", ye, routing.kept() * d)?;
    let mut gw = vec![T::ZERO; k * s_count];
    for (a_idx, &r) in routing.row.iter().enumerate() {
        if r != SKIP {
            let s = a_idx % s_count;
            let (gy_s, ye_r) = (&gy[s * d..(s + 1) * d], &ye[r as usize * d..(r as usize + 1) * d]);
            gw[a_idx] = reduce::dot(gy_s, ye_r);
        }
    }
    let row_weights: Vec<T> = routing
        .row_assignment
        .iter()
        .map(|&a| dispatch.weights[a as usize])
        .collect();
    let mut gye = vec![T::ZERO; routing.kept() * d];
    backend.gather_rows(&mut gye, gy, d, &routing.row_token, Some(&row_weights))?;
    Ok((gw, gye))
}

/// One expert's backward: given its forward input `xe`, pre-activation `h`, `g` holding the
/// activation on entry (overwritten by the gradient of `h`), and `gye = dL/dye`, accumulate the weight
/// gradients into `grads` and write `gxe = dL/dxe`.
#[allow(clippy::too_many_arguments)]
pub fn expert_backward<T: Scalar, B: Backend>(
    c: &MoeConfig,
    b: &B,
    w: ExpertWeights<'_, T>,
    xe: &[T],
    h: &[T],
    g: &mut [T],
    gye: &[T],
    gxe: &mut [T],
    grads: ExpertGrads<'_, T>,
) -> Result<()> {
    let (d, f) = (c.d_model, c.d_ff);
    let n = xe.len() / d;
    let gye_m = Mat::new(gye, n, d)?;
    b.matmul(grads.w2, Mat::new(g, n, f)?.t(), gye_m, true)?;
    b.add_column_sums(grads.b2, gye)?;
    b.matmul(g, gye_m, Mat::new(w.w2, f, d)?.t(), false)?;
    b.gelu_backward(c.gelu, h, g)?;
    let gh_m = Mat::new(g, n, f)?;
    b.matmul(grads.w1, Mat::new(xe, n, d)?.t(), gh_m, true)?;
    b.add_column_sums(grads.b1, g)?;
    b.matmul(gxe, gh_m, Mat::new(w.w1, d, f)?.t(), false)
}

/// [`expert_backward`] into new buffers: returns the weight gradients `[w1, b1, w2, b2]` and
/// `gxe`; `g` holds the activation on entry and is overwritten, as there. The same products in the
/// same order, so the same bits as accumulating into zeroed buffers.
#[allow(clippy::too_many_arguments)]
pub fn expert_backward_new<T: Scalar, B: Backend>(
    c: &MoeConfig,
    b: &B,
    w: ExpertWeights<'_, T>,
    xe: &[T],
    h: &[T],
    g: &mut [T],
    gye: &[T],
) -> Result<([Vec<T>; 4], Vec<T>)> {
    let (d, f) = (c.d_model, c.d_ff);
    let n = xe.len() / d;
    let gye_m = Mat::new(gye, n, d)?;
    let gw2 = b.product(Mat::new(g, n, f)?.t(), gye_m, None)?;
    let mut gb2 = vec![T::ZERO; d];
    b.add_column_sums(&mut gb2, gye)?;
    b.matmul(g, gye_m, Mat::new(w.w2, f, d)?.t(), false)?;
    b.gelu_backward(c.gelu, h, g)?;
    let gh_m = Mat::new(g, n, f)?;
    let gw1 = b.product(Mat::new(xe, n, d)?.t(), gh_m, None)?;
    let mut gb1 = vec![T::ZERO; f];
    b.add_column_sums(&mut gb1, g)?;
    let gxe = b.product(gh_m, Mat::new(w.w1, d, f)?.t(), None)?;
    Ok(([gw1, gb1, gw2, gb2], gxe))
}

/// Backward of the dispatch and the gate: given the forward input `x`, the combine-weight gradients
/// `gw` and the expert-input gradients `gxe` (`[R][d_model]`), accumulate the gate weights' gradient
/// into `grad_wg` and return `dL/dx`. The router losses enter with weight `router_scale`.
#[allow(clippy::too_many_arguments)]
pub fn gate_backward<T: Scalar, B: Backend>(
    c: &MoeConfig,
    backend: &B,
    wg: &[T],
    x: &[T],
    dispatch: &Dispatch<T>,
    gw: &[T],
    gxe: &[T],
    grad_wg: &mut [T],
    router_scale: T,
) -> Result<Vec<T>> {
    let (d, e_count, k) = (c.d_model, c.experts, c.k);
    let (gates, lse, routing) = (&dispatch.gates, &dispatch.lse, &dispatch.routing);
    let s_count = routing.tokens;
    check_len("MoE backward input x", x, s_count * d)?;
    check_len("expert input gradients", gxe, routing.kept() * d)?;
    check_len("gate weight gradient", grad_wg, d * e_count)?;
    let mut grad_x = vec![T::ZERO; s_count * d];
    backend.gather_sum_rows(&mut grad_x, gxe, d, k, &routing.token_major_rows(), None)?;

    let mut g_gates = vec![T::ZERO; s_count * e_count];
    combine_weights_backward(c, gates, routing, gw, &mut g_gates);
    let aux = T::from_f64(c.aux_coef) * router_scale;
    if c.aux_coef != 0.0 {
        // d l_aux / d gates[s, e] = E * count1[e] / S^2
        let scale = aux * T::from_usize(e_count) / T::from_usize(s_count * s_count);
        for row in g_gates.chunks_exact_mut(e_count) {
            for (g, &cnt) in row.iter_mut().zip(&routing.first_choice_counts) {
                *g += scale * T::from_usize(cnt);
            }
        }
    }
    let z = T::from_f64(c.z_coef) * router_scale * T::from_f64(2.0) / T::from_usize(s_count);
    let mut g_logits = vec![T::ZERO; s_count * e_count];
    for s in 0..s_count {
        let (gt, gg, gl) = (
            &gates[s * e_count..(s + 1) * e_count],
            &g_gates[s * e_count..(s + 1) * e_count],
            &mut g_logits[s * e_count..(s + 1) * e_count],
        );
        let dot = gt.iter().zip(gg).fold(T::ZERO, |acc, (&p, &g)| acc + p * g);
        let zs = z * lse[s];
        for ((l, &p), &g) in gl.iter_mut().zip(gt).zip(gg) {
            *l = p * (g - dot) + zs * p;
        }
    }
    backend.matmul(
        grad_wg,
        Mat::new(x, s_count, d)?.t(),
        Mat::new(&g_logits, s_count, e_count)?,
        true,
    )?;
    backend.matmul(
        &mut grad_x,
        Mat::new(&g_logits, s_count, e_count)?,
        Mat::new(wg, d, e_count)?.t(),
        true,
    )?;
    Ok(grad_x)
}

/// `[k][S]` -> `[S][k]`.
fn token_major<T: Copy>(v: &[T], k: usize, s_count: usize) -> Vec<T> {
    (0..s_count * k).map(|i| v[(i % k) * s_count + i / k]).collect()
}

/// Combine weight of each assignment `[k][S]`: the kept routes' gate values, renormalised to sum to 1
/// for k >= 2 when `normalize` is set (denominator floored at the f32 epsilon), 0 for dropped routes.
pub fn combine_weights<T: Scalar>(c: &MoeConfig, gates: &[T], r: &Routing) -> Vec<T> {
    let s_count = r.tokens;
    let mut w: Vec<T> = (0..c.k * s_count)
        .map(|a| {
            if r.keep[a] {
                gates[(a % s_count) * c.experts + r.expert[a] as usize]
            } else {
                T::ZERO
            }
        })
        .collect();
    if c.k >= 2 && c.normalize {
        let eps = T::from_f64(NORMALIZE_EPS);
        for s in 0..s_count {
            let sum = (0..c.k).fold(T::ZERO, |acc, j| acc + w[j * s_count + s]);
            let denom = sum.max(eps);
            for j in 0..c.k {
                w[j * s_count + s] = w[j * s_count + s] / denom;
            }
        }
    }
    w
}

/// Backward of [`combine_weights`]: adds `dL/dgates` given `gw = dL/dweights`.
fn combine_weights_backward<T: Scalar>(c: &MoeConfig, gates: &[T], r: &Routing, gw: &[T], g_gates: &mut [T]) {
    let (s_count, e_count) = (r.tokens, c.experts);
    for s in 0..s_count {
        let kept = |j: usize| r.keep[j * s_count + s];
        let gate = |j: usize| gates[s * e_count + r.expert[j * s_count + s] as usize];
        let mut scale = vec![T::ZERO; c.k]; // dL/d(raw kept gate value) per choice
        if c.k >= 2 && c.normalize {
            let sum = (0..c.k).filter(|&j| kept(j)).fold(T::ZERO, |acc, j| acc + gate(j));
            let eps = T::from_f64(NORMALIZE_EPS);
            if sum >= eps {
                // w_j = g_j / sum  =>  dL/dg_i = (gw_i - sum_j gw_j w_j) / sum
                let dot = (0..c.k)
                    .filter(|&j| kept(j))
                    .fold(T::ZERO, |acc, j| acc + gw[j * s_count + s] * gate(j) / sum);
                for (j, sc) in scale.iter_mut().enumerate() {
                    *sc = (gw[j * s_count + s] - dot) / sum;
                }
            } else {
                for (j, sc) in scale.iter_mut().enumerate() {
                    *sc = gw[j * s_count + s] / eps;
                }
            }
        } else {
            for (j, sc) in scale.iter_mut().enumerate() {
                *sc = gw[j * s_count + s];
            }
        }
        for (j, &sc) in scale.iter().enumerate() {
            if kept(j) {
                g_gates[s * e_count + r.expert[j * s_count + s] as usize] += sc;
            }
        }
    }
}
