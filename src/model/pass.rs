//! One group's forward and backward pass through a [`Gpt`], as a resumable state machine.
//!
//! The pass does the dense work itself (embeddings, attention, dense FFNs, head, loss) and stops at
//! every MoE block with a [`Need`]: the caller runs the MoE block (in this thread, as
//! [`Gpt::forward_backward`] does, or through the actor runtime's Gate and Expert actors) and hands
//! the result back. Whoever runs it, the arithmetic of the pass is the same, which is what lets a
//! run on any number of workers reproduce the single-process run bit for bit.

use super::gpt::{Ffn, Gpt, GroupOutput};
use super::layers::{self, AttnCache, AttnShape, LayerNormCache};
use super::legs::{check_section, Section};
use super::moe::MoeStats;
use crate::error::{Error, Result};
use crate::kernels::{Backend, Scalar};
use std::ops::{Deref, DerefMut};

/// Where a pass stopped.
#[derive(Debug)]
pub enum Need<T> {
    /// Run MoE block `block` forward on `x` (its LN2 output, `[N][d_model]`), then call
    /// [`GroupPass::moe_forward_done`].
    MoeForward {
        /// Block index.
        block: usize,
        /// The MoE layer's input.
        x: Vec<T>,
    },
    /// Run MoE block `block` backward given `dy = dL/dy`, then call
    /// [`GroupPass::moe_backward_done`] with `dL/dx`.
    MoeBackward {
        /// Block index.
        block: usize,
        /// Gradient of the layer output.
        dy: Vec<T>,
    },
    /// The pass is complete: call [`GroupPass::finish`] (or [`GroupPass::into_residual`]).
    Done,
}

/// What an MoE block's forward returns to the pass.
#[derive(Clone, Debug)]
pub struct MoeResult<T> {
    /// The layer output `[N][d_model]`.
    pub y: Vec<T>,
    /// Auxiliary loss of the group.
    pub l_aux: f64,
    /// z-loss of the group.
    pub z_loss: f64,
    /// Load statistics.
    pub stats: MoeStats,
}

struct BlockCache<T> {
    ln1: LayerNormCache<T>,
    a1: Vec<T>,
    attn: AttnCache<T>,
    att: Vec<T>,
    ln2: LayerNormCache<T>,
    /// LN2 output (dense blocks only; an MoE block's runner keeps its own copy).
    a2: Vec<T>,
    /// Dense FFN pre-activation and activation (empty for MoE blocks).
    h: Vec<T>,
    a: Vec<T>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Next: block `block`'s forward (or the head when `block == n_layer`).
    Forward,
    /// Waiting for MoE block `block`'s forward result.
    AwaitForward,
    /// Next: block `block - 1`'s backward (or the embeddings when `block == 0`).
    Backward,
    /// Waiting for MoE block `block - 1`'s input gradient.
    AwaitBackward,
    Done,
}

/// One group's pass. `M` gives the model (`&Gpt` or `Arc<Gpt>`), `G` the gradient buffers the pass
/// adds into (`&mut Gpt` or `Box<Gpt>`); without gradients the pass is forward only.
pub struct GroupPass<T, M, G> {
    model: M,
    grads: Option<G>,
    idx: Vec<u32>,
    targets: Option<Vec<u32>>,
    shape: AttnShape,
    ce_scale: T,
    phase: Phase,
    block: usize,
    /// The residual stream (forward) or its gradient (backward).
    x: Vec<T>,
    caches: Vec<BlockCache<T>>,
    /// The block waiting for its MoE result.
    pending: Option<BlockCache<T>>,
    moe_out: Vec<(f64, f64, MoeStats)>,
    ce_sum: f64,
}

impl<T, M, G> GroupPass<T, M, G>
where
    T: Scalar,
    M: Deref<Target = Gpt<T>>,
    G: DerefMut<Target = Gpt<T>>,
{
    /// A pass over `seqs` sequences of tokens `idx`. With `targets` and `grads` it runs forward and
    /// backward (see [`Gpt::forward_backward`] for the scales); without, forward only.
    pub fn new(
        model: M,
        idx: Vec<u32>,
        targets: Option<Vec<u32>>,
        seqs: usize,
        ce_scale: T,
        grads: Option<G>,
    ) -> Result<Self> {
        let t = model.check_tokens(&idx, seqs)?;
        if let Some(targets) = &targets {
            model.check_targets(&idx, targets)?;
        }
        if let Some(g) = &grads {
            if g.config() != model.config() {
                return Err(Error::shape(
                    "gradients",
                    "the gradient buffers belong to another model configuration",
                ));
            }
            if targets.is_none() {
                return Err(Error::shape("targets", "a pass with gradients needs targets"));
            }
        }
        check_section(&*model, Section::Embeddings)?;
        let c = model.config();
        let d = c.d_model;
        let shape = AttnShape {
            seqs,
            t,
            heads: c.n_head,
            dh: d / c.n_head,
        };
        let mut x = vec![T::ZERO; idx.len() * d];
        for (r, &tok) in idx.iter().enumerate() {
            let pos = r % t;
            let (e, p) = (&model.wte[tok as usize * d..][..d], &model.wpe[pos * d..][..d]);
            for (o, (&a, &b)) in x[r * d..(r + 1) * d].iter_mut().zip(e.iter().zip(p)) {
                *o = a + b;
            }
        }
        Ok(GroupPass {
            model,
            grads,
            idx,
            targets,
            shape,
            ce_scale,
            phase: Phase::Forward,
            block: 0,
            x,
            caches: Vec::new(),
            pending: None,
            moe_out: Vec::new(),
            ce_sum: 0.0,
        })
    }

    /// Give the pass the parameters of its next leg (the actor runtime's sharded dense parameters
    /// hand each leg only what it reads; see [`super::legs`]). The configuration must not change.
    pub fn set_model(&mut self, model: M) -> Result<()> {
        if model.config() != self.model.config() {
            return Err(Error::shape(
                "group pass",
                "the new parameters belong to another model configuration",
            ));
        }
        self.model = model;
        Ok(())
    }

    /// The gradient buffers (for a runner that adds MoE gradients itself).
    pub fn grads_mut(&mut self) -> Option<&mut Gpt<T>> {
        self.grads.as_deref_mut()
    }

    fn training(&self) -> bool {
        self.grads.is_some()
    }

    /// Run until the next MoE block or the end.
    pub fn advance<B: Backend>(&mut self, backend: &B) -> Result<Need<T>> {
        loop {
            match self.phase {
                Phase::Forward if self.block == self.model.blocks.len() => {
                    if !self.training() {
                        self.phase = Phase::Done;
                        return Ok(Need::Done);
                    }
                    self.head(backend)?;
                    self.phase = Phase::Backward;
                }
                Phase::Forward => {
                    if let Some(need) = self.block_forward(backend)? {
                        return Ok(need);
                    }
                }
                Phase::Backward if self.block == 0 => {
                    self.embeddings_backward()?;
                    self.phase = Phase::Done;
                    return Ok(Need::Done);
                }
                Phase::Backward => {
                    if let Some(need) = self.block_backward(backend)? {
                        return Ok(need);
                    }
                }
                Phase::AwaitForward | Phase::AwaitBackward => {
                    return Err(Error::shape(
                        "group pass",
                        format!("block {} is waiting for its MoE result", self.block),
                    ))
                }
                Phase::Done => return Ok(Need::Done),
            }
        }
    }

    /// Forward of block `self.block` up to its FFN; dense FFNs finish here.
    fn block_forward<B: Backend>(&mut self, backend: &B) -> Result<Option<Need<T>>> {
        let model = &*self.model;
        check_section(model, Section::Block(self.block))?;
        let c = model.config();
        let b = &model.blocks[self.block];
        let d = c.d_model;
        let x = &mut self.x;
        let (a1, ln1) = layers::layer_norm_forward(x, &b.ln1_w, &b.ln1_b);
        let qkv = layers::linear_forward(backend, &a1, &b.wqkv, Some(&b.bqkv), 3 * d)?;
        let (att, attn) = layers::attention_forward(backend, &qkv, self.shape)?;
        drop(qkv);
        let o = layers::linear_forward(backend, &att, &b.wo, Some(&b.bo), d)?;
        x.iter_mut().zip(&o).for_each(|(x, &o)| *x += o);
        drop(o);
        let (a2, ln2) = layers::layer_norm_forward(x, &b.ln2_w, &b.ln2_b);
        let mut cache = BlockCache {
            ln1,
            a1,
            attn,
            att,
            ln2,
            a2: Vec::new(),
            h: Vec::new(),
            a: Vec::new(),
        };
        match &b.ffn {
            Ffn::Dense(m) => {
                let (h, a, y) = layers::mlp_forward(backend, c.gelu, &a2, &m.w1, &m.b1, &m.w2, &m.b2)?;
                x.iter_mut().zip(&y).for_each(|(x, &y)| *x += y);
                if self.grads.is_some() {
                    cache.a2 = a2;
                    cache.h = h;
                    cache.a = a;
                    self.caches.push(cache);
                }
                self.block += 1;
                Ok(None)
            }
            Ffn::Moe(_) => {
                self.pending = Some(cache);
                self.phase = Phase::AwaitForward;
                Ok(Some(Need::MoeForward {
                    block: self.block,
                    x: a2,
                }))
            }
        }
    }

    /// Hand back the forward result of the MoE block the pass stopped at.
    pub fn moe_forward_done(&mut self, result: MoeResult<T>) -> Result<()> {
        if self.phase != Phase::AwaitForward {
            return Err(Error::shape("group pass", "no MoE forward result was expected"));
        }
        crate::kernels::check_len("MoE block output", &result.y, self.x.len())?;
        self.x.iter_mut().zip(&result.y).for_each(|(x, &y)| *x += y);
        let cache = self
            .pending
            .take()
            .ok_or_else(|| Error::shape("group pass", "lost block cache"))?;
        if self.training() {
            self.caches.push(cache);
        }
        self.moe_out.push((result.l_aux, result.z_loss, result.stats));
        self.block += 1;
        self.phase = Phase::Forward;
        Ok(())
    }

    /// Final layer norm, LM head and cross-entropy, and their backward: leaves `dL/dx` in `self.x`.
    fn head<B: Backend>(&mut self, backend: &B) -> Result<()> {
        let model = &*self.model;
        check_section(model, Section::Head)?;
        let c = model.config();
        let (d, v, n) = (c.d_model, c.vocab, self.idx.len());
        let grads = self
            .grads
            .as_deref_mut()
            .ok_or_else(|| Error::shape("gradients", "missing"))?;
        let targets = self
            .targets
            .as_deref()
            .ok_or_else(|| Error::shape("targets", "missing"))?;
        let x = std::mem::take(&mut self.x);
        let (xf, lnf) = layers::layer_norm_forward(&x, &model.ln_f_w, &model.ln_f_b);
        drop(x);
        let logits = layers::linear_forward(backend, &xf, &model.lm_head, None, v)?;
        let mut dlogits = vec![T::ZERO; logits.len()];
        self.ce_sum = layers::cross_entropy(&logits, targets, self.ce_scale, &mut dlogits);
        drop(logits);
        let dxf = layers::linear_backward(backend, &xf, &model.lm_head, &dlogits, v, &mut grads.lm_head, None)?;
        drop(dlogits);
        let mut dx = vec![T::ZERO; n * d];
        layers::layer_norm_backward(&lnf, &model.ln_f_w, &dxf, &mut dx, &mut grads.ln_f_w, &mut grads.ln_f_b);
        self.x = dx;
        Ok(())
    }

    /// Backward of block `self.block - 1` from its output; dense FFNs finish here.
    fn block_backward<B: Backend>(&mut self, backend: &B) -> Result<Option<Need<T>>> {
        let l = self.block - 1;
        let cache = self
            .caches
            .pop()
            .ok_or_else(|| Error::shape("group pass", "lost block cache"))?;
        let model = &*self.model;
        let c = model.config();
        let d = c.d_model;
        match &model.blocks[l].ffn {
            Ffn::Dense(m) => {
                check_section(model, Section::Block(l))?;
                let grads = self
                    .grads
                    .as_deref_mut()
                    .ok_or_else(|| Error::shape("gradients", "missing"))?;
                let Ffn::Dense(gm) = &mut grads.blocks[l].ffn else {
                    return Err(Error::shape("gradients", "block kinds of model and gradients differ"));
                };
                let f = m.b1.len();
                let mut dh =
                    layers::linear_backward(backend, &cache.a, &m.w2, &self.x, d, &mut gm.w2, Some(&mut gm.b2))?;
                backend.gelu_backward(c.gelu, &cache.h, &mut dh)?;
                let d_a2 = layers::linear_backward(backend, &cache.a2, &m.w1, &dh, f, &mut gm.w1, Some(&mut gm.b1))?;
                self.block_backward_rest(backend, cache, d_a2)?;
                Ok(None)
            }
            Ffn::Moe(_) => {
                self.pending = Some(cache);
                self.phase = Phase::AwaitBackward;
                Ok(Some(Need::MoeBackward {
                    block: l,
                    dy: self.x.clone(),
                }))
            }
        }
    }

    /// Hand back `dL/dx` of the MoE block the pass stopped at.
    pub fn moe_backward_done<B: Backend>(&mut self, backend: &B, d_a2: Vec<T>) -> Result<()> {
        if self.phase != Phase::AwaitBackward {
            return Err(Error::shape("group pass", "no MoE input gradient was expected"));
        }
        crate::kernels::check_len("MoE block input gradient", &d_a2, self.x.len())?;
        let cache = self
            .pending
            .take()
            .ok_or_else(|| Error::shape("group pass", "lost block cache"))?;
        self.phase = Phase::Backward;
        self.block_backward_rest(backend, cache, d_a2)
    }

    /// LN2, attention and LN1 backward of block `self.block - 1`, given `d_a2 = dL/dLN2(x)`.
    fn block_backward_rest<B: Backend>(&mut self, backend: &B, cache: BlockCache<T>, d_a2: Vec<T>) -> Result<()> {
        let l = self.block - 1;
        let model = &*self.model;
        check_section(model, Section::Block(l))?;
        let d = model.config().d_model;
        let b = &model.blocks[l];
        let g = &mut self
            .grads
            .as_deref_mut()
            .ok_or_else(|| Error::shape("gradients", "missing"))?
            .blocks[l];
        let dx = &mut self.x;
        layers::layer_norm_backward(&cache.ln2, &b.ln2_w, &d_a2, dx, &mut g.ln2_w, &mut g.ln2_b);
        let d_att = layers::linear_backward(backend, &cache.att, &b.wo, dx, d, &mut g.wo, Some(&mut g.bo))?;
        let d_qkv = layers::attention_backward(backend, &cache.attn, &d_att, self.shape)?;
        drop(d_a2);
        let d_a1 = layers::linear_backward(
            backend,
            &cache.a1,
            &b.wqkv,
            &d_qkv,
            3 * d,
            &mut g.wqkv,
            Some(&mut g.bqkv),
        )?;
        layers::layer_norm_backward(&cache.ln1, &b.ln1_w, &d_a1, dx, &mut g.ln1_w, &mut g.ln1_b);
        self.block -= 1;
        Ok(())
    }

    /// Embedding gradients, in token order.
    fn embeddings_backward(&mut self) -> Result<()> {
        let d = self.model.config().d_model;
        let t = self.shape.t;
        let grads = self
            .grads
            .as_deref_mut()
            .ok_or_else(|| Error::shape("gradients", "missing"))?;
        for (r, &tok) in self.idx.iter().enumerate() {
            let pos = r % t;
            let dr = &self.x[r * d..(r + 1) * d];
            grads.wte[tok as usize * d..][..d]
                .iter_mut()
                .zip(dr)
                .for_each(|(g, &v)| *g += v);
            grads.wpe[pos * d..][..d].iter_mut().zip(dr).for_each(|(g, &v)| *g += v);
        }
        Ok(())
    }

    /// The final residual stream of a forward-only pass.
    pub fn into_residual(self) -> Result<Vec<T>> {
        if self.phase != Phase::Done || self.training() {
            return Err(Error::shape("group pass", "the forward pass has not finished"));
        }
        Ok(self.x)
    }

    /// The group's losses and statistics, and the gradient buffers, once the pass is done.
    pub fn finish(self) -> Result<(GroupOutput, Option<G>)> {
        if self.phase != Phase::Done {
            return Err(Error::shape("group pass", "the pass has not finished"));
        }
        let c = self.model.config();
        let (router_loss, moe_stats) = self
            .moe_out
            .into_iter()
            .map(|(l_aux, z, stats)| (c.aux_coef * l_aux + c.z_coef * z, stats))
            .unzip();
        let out = GroupOutput {
            ce_sum: self.ce_sum,
            router_loss,
            moe_stats,
        };
        Ok((out, self.grads))
    }
}
