//! Forward and backward passes of the MoE layer, written by hand.
//!
//! Forward: `logits = x @ wg`, `gates = softmax(logits)`, routing (top-k, capacity), combine
//! weights, one gather of every kept token into the concatenated expert batch, per expert
//! `h = xe @ w1[e] + b1[e]`, `a = gelu(h)`, `ye = a @ w2[e] + b2[e]`, and the combine
//! `y[s] = sum_j w_j[s] * ye[row(j, s)]`.
//!
//! Backward of `loss = sum(y * gy) + aux_coef * l_aux + z_coef * z_loss` walks the same steps in
//! reverse. Expert gradients accumulate into the caller's gradient buffers; the gate's gradient
//! collects the combine-weight path, the auxiliary loss and the z-loss before one softmax backward.

use super::{MoeConfig, MoeParams, Routing};
use crate::error::{Error, Result};
use crate::kernels::{check_len, Backend, Mat, Scalar, SKIP};

/// The layer: its configuration and parameters.
#[derive(Clone, Debug)]
pub struct MoeLayer<T> {
    config: MoeConfig,
    /// The parameters, public so that optimizers, tiers and checkpoints can reach the buffers.
    pub params: MoeParams<T>,
}

/// What the forward pass produces.
#[derive(Clone, Debug)]
pub struct MoeOutput<T> {
    /// The layer output `[S][d_model]`.
    pub y: Vec<T>,
    /// The auxiliary load-balancing loss `E^2 * mean_e(mean_s(gates) * mean_s(mask1))`.
    pub l_aux: T,
    /// The router z-loss `mean_s(logsumexp(logits[s])^2)` (computed whatever `z_coef` is).
    pub z_loss: T,
    /// Load and drop counts.
    pub stats: MoeStats,
}

/// Per-expert load of one forward pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeStats {
    /// Kept assignments (tokens processed) per expert.
    pub expert_tokens: Vec<usize>,
    /// Assignments dropped for lack of capacity.
    pub dropped: usize,
    /// The capacity per expert (`None` when dropless).
    pub capacity: Option<usize>,
}

/// What the backward pass needs from the forward pass. Consumed by [`MoeLayer::backward`], which
/// reuses its buffers.
#[derive(Clone, Debug)]
pub struct MoeCache<T> {
    /// Gate probabilities `[S][E]`.
    pub gates: Vec<T>,
    /// logsumexp of each token's logits.
    lse: Vec<T>,
    /// The routing decisions.
    pub routing: Routing,
    /// Combine weight of each assignment `[k][S]` (0 when dropped).
    pub weights: Vec<T>,
    /// Concatenated expert inputs `[R][d_model]`.
    xe: Vec<T>,
    /// Pre-activation `[R][d_ff]`.
    h: Vec<T>,
    /// Activation `[R][d_ff]`.
    a: Vec<T>,
    /// Expert outputs `[R][d_model]`.
    ye: Vec<T>,
}

/// `f32::EPSILON`: the floor of the renormalisation denominator (DeepSpeed clamps at the f32 epsilon).
const NORMALIZE_EPS: f64 = f32::EPSILON as f64;

impl<T: Scalar> MoeLayer<T> {
    /// A layer with the given configuration and parameters (both checked).
    pub fn new(config: MoeConfig, params: MoeParams<T>) -> Result<Self> {
        config.validate()?;
        params.check(&config)?;
        Ok(MoeLayer { config, params })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The same parameters under another configuration with the same shapes (for example dropless
    /// routing for inference).
    pub fn reconfigured(&self, config: MoeConfig) -> Result<Self> {
        MoeLayer::new(config, self.params.clone())
    }

    /// Forward pass over one group of tokens `x` (`[S][d_model]`).
    pub fn forward<B: Backend>(&self, backend: &B, x: &[T]) -> Result<(MoeOutput<T>, MoeCache<T>)> {
        let c = &self.config;
        let (d, f, e_count, k) = (c.d_model, c.d_ff, c.experts, c.k);
        if !x.len().is_multiple_of(d) {
            return Err(Error::shape(
                "MoE input",
                format!("{} elements are not whole rows of d_model={d}", x.len()),
            ));
        }
        let s_count = x.len() / d;
        let p = &self.params;

        // Gate.
        let mut logits = vec![T::ZERO; s_count * e_count];
        backend.matmul(
            &mut logits,
            Mat::new(x, s_count, d)?,
            Mat::new(&p.wg, d, e_count)?,
            false,
        )?;
        if let Some(i) = logits.iter().position(|v| !v.to_f64().is_finite()) {
            return Err(Error::shape(
                "MoE gate",
                format!(
                    "non-finite gate logit for token {} (check the input for NaN or infinity)",
                    i / e_count
                ),
            ));
        }
        let mut gates = vec![T::ZERO; logits.len()];
        let lse = backend.softmax_rows(&logits, e_count, &mut gates)?;
        let routing = Routing::new(c, &gates, s_count)?;

        // Losses of the router.
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

        // Dispatch: one gather into the concatenated expert batch.
        let rows = routing.kept();
        let mut xe = vec![T::ZERO; rows * d];
        backend.gather_rows(&mut xe, x, d, &routing.row_token, None)?;

        // Experts, side by side: each task owns one expert's rows of every buffer.
        let mut h = vec![T::ZERO; rows * f];
        let mut a = vec![T::ZERO; rows * f];
        let mut ye = vec![T::ZERO; rows * d];
        let tasks: Vec<_> = split_rows(&xe, &routing.offsets, d)
            .into_iter()
            .zip(split_rows_mut(&mut h, &routing.offsets, f))
            .zip(split_rows_mut(&mut a, &routing.offsets, f))
            .zip(split_rows_mut(&mut ye, &routing.offsets, d))
            .enumerate()
            .filter(|(_, (((xe_e, _), _), _))| !xe_e.is_empty())
            .collect();
        backend.par_for_each(tasks, |b, (e, (((xe_e, h_e), a_e), ye_e))| {
            let n = xe_e.len() / d;
            b.broadcast_rows(h_e, &p.b1[e * f..(e + 1) * f])?;
            b.matmul(
                h_e,
                Mat::new(xe_e, n, d)?,
                Mat::new(expert_w(&p.w1, e, d * f), d, f)?,
                true,
            )?;
            b.gelu_forward(c.gelu, h_e, a_e)?;
            b.broadcast_rows(ye_e, &p.b2[e * d..(e + 1) * d])?;
            b.matmul(
                ye_e,
                Mat::new(a_e, n, f)?,
                Mat::new(expert_w(&p.w2, e, f * d), f, d)?,
                true,
            )
        })?;

        // Combine.
        let mut y = vec![T::ZERO; s_count * d];
        let token_rows = routing.token_major_rows();
        let token_weights = token_major(&weights, k, s_count);
        backend.gather_sum_rows(&mut y, &ye, d, k, &token_rows, Some(&token_weights))?;

        let stats = MoeStats {
            expert_tokens: routing.expert_counts(),
            dropped: routing.dropped(),
            capacity: routing.capacity,
        };
        let out = MoeOutput {
            y,
            l_aux,
            z_loss,
            stats,
        };
        let cache = MoeCache {
            gates,
            lse,
            routing,
            weights,
            xe,
            h,
            a,
            ye,
        };
        Ok((out, cache))
    }

    /// Backward pass: given the forward's input `x`, its cache and `gy = dL/dy`, add the parameter
    /// gradients of `loss = sum(y * gy) + aux_coef * l_aux + z_coef * z_loss` into `grads` and return
    /// `dL/dx`.
    pub fn backward<B: Backend>(
        &self,
        backend: &B,
        x: &[T],
        cache: MoeCache<T>,
        gy: &[T],
        grads: &mut MoeParams<T>,
    ) -> Result<Vec<T>> {
        self.backward_scaled(backend, x, cache, gy, grads, T::ONE)
    }

    /// [`MoeLayer::backward`] with the router losses weighted by `router_scale`: the gradient of
    /// `sum(y * gy) + router_scale * (aux_coef * l_aux + z_coef * z_loss)`. A model that averages the
    /// router losses over G groups passes `1 / G`.
    pub fn backward_scaled<B: Backend>(
        &self,
        backend: &B,
        x: &[T],
        cache: MoeCache<T>,
        gy: &[T],
        grads: &mut MoeParams<T>,
        router_scale: T,
    ) -> Result<Vec<T>> {
        let c = &self.config;
        let (d, f, e_count, k) = (c.d_model, c.d_ff, c.experts, c.k);
        let s_count = cache.routing.tokens;
        check_len("MoE backward input x", x, s_count * d)?;
        check_len("MoE backward gradient gy", gy, s_count * d)?;
        grads.check(c)?;
        let p = &self.params;
        let MoeCache {
            gates,
            lse,
            routing,
            weights,
            xe,
            h,
            a,
            ye,
        } = cache;
        let rows = routing.kept();

        // Gradient of each combine weight: gw[a] = <gy[s], ye[row(a)]>.
        let mut gw = vec![T::ZERO; k * s_count];
        for (a_idx, &r) in routing.row.iter().enumerate() {
            if r != SKIP {
                let s = a_idx % s_count;
                let (gy_s, ye_r) = (&gy[s * d..(s + 1) * d], &ye[r as usize * d..(r as usize + 1) * d]);
                gw[a_idx] = gy_s.iter().zip(ye_r).fold(T::ZERO, |acc, (&u, &v)| acc + u * v);
            }
        }
        drop(ye);

        // Gradient w.r.t. expert outputs: gye[r] = w(a) * gy[token(r)].
        let row_weights: Vec<T> = routing.row_assignment.iter().map(|&a| weights[a as usize]).collect();
        let mut gye = vec![T::ZERO; rows * d];
        backend.gather_rows(&mut gye, gy, d, &routing.row_token, Some(&row_weights))?;

        // Experts side by side, each task owning its expert's rows and gradient blocks. Per expert:
        // the second matmul's gradients, GELU's backward, then the first matmul's; the activation
        // buffer is reused for its own gradient.
        let mut g_act = a;
        let mut gxe = vec![T::ZERO; rows * d];
        let offsets = &routing.offsets;
        let tasks: Vec<_> = split_rows(&xe, offsets, d)
            .into_iter()
            .zip(split_rows(&h, offsets, f))
            .zip(split_rows_mut(&mut g_act, offsets, f))
            .zip(split_rows(&gye, offsets, d))
            .zip(split_rows_mut(&mut gxe, offsets, d))
            .zip(grads.w1.chunks_exact_mut(d * f).zip(grads.b1.chunks_exact_mut(f)))
            .zip(grads.w2.chunks_exact_mut(f * d).zip(grads.b2.chunks_exact_mut(d)))
            .enumerate()
            .filter(|(_, ((((((xe_e, _), _), _), _), _), _))| !xe_e.is_empty())
            .collect();
        backend.par_for_each(
            tasks,
            |b, (e, ((((((xe_e, h_e), g_e), gye_e), gxe_e), (gw1, gb1)), (gw2, gb2)))| {
                let n = xe_e.len() / d;
                let gye_m = Mat::new(gye_e, n, d)?;
                b.matmul(gw2, Mat::new(g_e, n, f)?.t(), gye_m, true)?;
                b.add_column_sums(gb2, gye_e)?;
                b.matmul(g_e, gye_m, Mat::new(expert_w(&p.w2, e, f * d), f, d)?.t(), false)?;
                b.gelu_backward(c.gelu, h_e, g_e)?;
                let gh_m = Mat::new(g_e, n, f)?;
                b.matmul(gw1, Mat::new(xe_e, n, d)?.t(), gh_m, true)?;
                b.add_column_sums(gb1, g_e)?;
                b.matmul(gxe_e, gh_m, Mat::new(expert_w(&p.w1, e, d * f), d, f)?.t(), false)
            },
        )?;
        drop((g_act, gye, h, xe));

        // Dispatch backward: grad_x[s] = sum_j gxe[row(j, s)].
        let mut grad_x = vec![T::ZERO; s_count * d];
        backend.gather_sum_rows(&mut grad_x, &gxe, d, k, &routing.token_major_rows(), None)?;

        // Gate: combine weights, auxiliary loss and z-loss, then the softmax backward.
        let mut g_gates = vec![T::ZERO; s_count * e_count];
        combine_weights_backward(c, &gates, &routing, &gw, &mut g_gates);
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
            &mut grads.wg,
            Mat::new(x, s_count, d)?.t(),
            Mat::new(&g_logits, s_count, e_count)?,
            true,
        )?;
        backend.matmul(
            &mut grad_x,
            Mat::new(&g_logits, s_count, e_count)?,
            Mat::new(&p.wg, d, e_count)?.t(),
            true,
        )?;
        Ok(grad_x)
    }
}

fn expert_w<T>(w: &[T], e: usize, size: usize) -> &[T] {
    &w[e * size..(e + 1) * size]
}

/// Split a `[R][width]` buffer into the row ranges `offsets[e]..offsets[e+1]`.
fn split_rows<'a, T>(mut buf: &'a [T], offsets: &[usize], width: usize) -> Vec<&'a [T]> {
    offsets
        .windows(2)
        .map(|w| {
            let (head, tail) = buf.split_at((w[1] - w[0]) * width);
            buf = tail;
            head
        })
        .collect()
}

/// Mutable twin of [`split_rows`].
fn split_rows_mut<'a, T>(mut buf: &'a mut [T], offsets: &[usize], width: usize) -> Vec<&'a mut [T]> {
    offsets
        .windows(2)
        .map(|w| {
            let (head, tail) = std::mem::take(&mut buf).split_at_mut((w[1] - w[0]) * width);
            buf = tail;
            head
        })
        .collect()
}

/// `[k][S]` -> `[S][k]`.
fn token_major<T: Copy>(v: &[T], k: usize, s_count: usize) -> Vec<T> {
    (0..s_count * k).map(|i| v[(i % k) * s_count + i / k]).collect()
}

/// Combine weight of each assignment `[k][S]`: the kept routes' gate values, renormalised to sum to 1
/// for k >= 2 when `normalize` is set (denominator floored at the f32 epsilon), 0 for dropped routes.
fn combine_weights<T: Scalar>(c: &MoeConfig, gates: &[T], r: &Routing) -> Vec<T> {
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
