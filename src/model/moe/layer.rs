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

use super::stages::{self, Dispatch, ExpertGrads};
use super::{MoeConfig, MoeParams, Routing};
use crate::error::Result;
use crate::kernels::{check_len, Backend, Scalar};

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
    /// The gate's forward result (routing, weights, dispatched rows).
    pub dispatch: Dispatch<T>,
    /// Pre-activation `[R][d_ff]`.
    h: Vec<T>,
    /// Activation `[R][d_ff]`.
    a: Vec<T>,
    /// Expert outputs `[R][d_model]`.
    ye: Vec<T>,
}

impl<T> MoeCache<T> {
    /// The routing decisions.
    pub fn routing(&self) -> &Routing {
        &self.dispatch.routing
    }
}

impl<T: Scalar> MoeLayer<T> {
    /// A layer with the given configuration and parameters (both checked).
    pub fn new(config: MoeConfig, params: MoeParams<T>) -> Result<Self> {
        config.validate()?;
        params.check(&config)?;
        Ok(MoeLayer { config, params })
    }

    /// A layer whose parameter buffers are not checked against the config: the actor runtime's
    /// replicas and gradient buffers hold the gate weights only (experts live with their owners).
    pub(crate) fn new_partial(config: MoeConfig, params: MoeParams<T>) -> Self {
        MoeLayer { config, params }
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
        let (d, f) = (c.d_model, c.d_ff);
        let p = &self.params;
        let dispatch = stages::gate_forward(c, backend, &p.wg, x)?;
        let (rows, offsets) = (dispatch.routing.kept(), &dispatch.routing.offsets);

        // Experts, side by side: each task owns one expert's rows of every buffer.
        let mut h = vec![T::ZERO; rows * f];
        let mut a = vec![T::ZERO; rows * f];
        let mut ye = vec![T::ZERO; rows * d];
        let tasks: Vec<_> = split_rows(&dispatch.xe, offsets, d)
            .into_iter()
            .zip(split_rows_mut(&mut h, offsets, f))
            .zip(split_rows_mut(&mut a, offsets, f))
            .zip(split_rows_mut(&mut ye, offsets, d))
            .enumerate()
            .filter(|(_, (((xe_e, _), _), _))| !xe_e.is_empty())
            .collect();
        backend.par_for_each(tasks, |b, (e, (((xe_e, h_e), a_e), ye_e))| {
            stages::expert_forward(c, b, p.expert(c, e), xe_e, h_e, a_e, ye_e)
        })?;

        let y = stages::combine(c, backend, &dispatch, &ye)?;
        let out = MoeOutput {
            y,
            l_aux: dispatch.l_aux,
            z_loss: dispatch.z_loss,
            stats: dispatch.stats(),
        };
        Ok((out, MoeCache { dispatch, h, a, ye }))
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
        let (d, f) = (c.d_model, c.d_ff);
        let s_count = cache.dispatch.routing.tokens;
        check_len("MoE backward input x", x, s_count * d)?;
        check_len("MoE backward gradient gy", gy, s_count * d)?;
        grads.check(c)?;
        let p = &self.params;
        let MoeCache { dispatch, h, a, ye } = cache;
        let (gw, gye) = stages::combine_backward(c, backend, &dispatch, &ye, gy)?;
        drop(ye);

        // Experts side by side, each task owning its expert's rows and gradient blocks; the
        // activation buffer is reused for its own gradient.
        let mut g_act = a;
        let mut gxe = vec![T::ZERO; dispatch.routing.kept() * d];
        let offsets = &dispatch.routing.offsets;
        let tasks: Vec<_> = split_rows(&dispatch.xe, offsets, d)
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
            |b, (e, ((((((xe_e, h_e), g_e), gye_e), gxe_e), (w1, b1)), (w2, b2)))| {
                let grads = ExpertGrads { w1, b1, w2, b2 };
                stages::expert_backward(c, b, p.expert(c, e), xe_e, h_e, g_e, gye_e, gxe_e, grads)
            },
        )?;
        drop((g_act, gye, h));
        stages::gate_backward(c, backend, &p.wg, x, &dispatch, &gw, &gxe, &mut grads.wg, router_scale)
    }
}

/// Split a `[R][width]` buffer into the row ranges `offsets[e]..offsets[e+1]`.
pub(crate) fn split_rows<'a, T>(mut buf: &'a [T], offsets: &[usize], width: usize) -> Vec<&'a [T]> {
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
pub(crate) fn split_rows_mut<'a, T>(mut buf: &'a mut [T], offsets: &[usize], width: usize) -> Vec<&'a mut [T]> {
    offsets
        .windows(2)
        .map(|w| {
            let (head, tail) = std::mem::take(&mut buf).split_at_mut((w[1] - w[0]) * width);
            buf = tail;
            head
        })
        .collect()
}
