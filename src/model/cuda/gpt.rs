//! The whole model on one GPU: [`CudaGpt`], the forward and backward of [`Gpt`] with every tensor in
//! device memory, and AdamW on the device.
//!
//! The same arithmetic as `model/pass.rs` and `model/layers.rs`, step for step: embeddings, per block
//! layer norm, attention (q|k|v product, heads, causal softmax, output product), residual sums, the
//! dense MLP or the MoE layer ([`CudaMoeLayer`]), the final layer norm, the head and the
//! cross-entropy, then the backward in reverse. Attention computes the full `T x T` score matrix
//! per head and sequence (masked above the diagonal) as one strided batched product, where the CPU
//! skips most of the masked triangle by row blocks: the same values, other rounding.
//!
//! Only a group's token ids, targets and the per-row losses and MoE statistics cross between host
//! and device during a step; the parameters come to the host only when asked for
//! ([`CudaGpt::to_model`], [`CudaGpt::gradients`]).

use super::moe::{CudaMoeCache, CudaMoeLayer, DeviceBuffer};
use crate::error::{Error, Result};
use crate::kernels::cuda::gpu::{elementwise, grid, int, launch, per_element, Gpu, Product, BLOCK, WIDE_BLOCK};
use crate::kernels::cuda::{guarded_try, GpuMemory};
use crate::kernels::{AdamwStep, Gelu};
use crate::model::gpt::{Ffn, Gpt, GptConfig, GroupOutput};
use crate::model::layers::LN_EPS;
use crate::model::moe::{MoeParams, MoeStats};
use cudarc::driver::{CudaSlice, DeviceSlice, PushKernelArg};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A named device tensor and its gradient.
struct DeviceTensor {
    param: CudaSlice<f32>,
    grad: CudaSlice<f32>,
}

/// The model on one GPU (see the module documentation).
pub struct CudaGpt {
    config: GptConfig,
    gpu: Arc<Gpu>,
    /// Every tensor except the MoE blocks' (`h.{l}.moe.*`), by name.
    dense: BTreeMap<String, DeviceTensor>,
    /// The MoE blocks, by block index.
    moe: BTreeMap<usize, CudaMoeLayer>,
    /// AdamW's first and second moments of every tensor, by name (zero until loaded or updated).
    moments: BTreeMap<String, (CudaSlice<f32>, CudaSlice<f32>)>,
}

/// Layer norm's saved `(xhat, rstd)`.
type NormCache = (CudaSlice<f32>, CudaSlice<f32>);

/// What a block's backward needs from its forward.
struct BlockCache {
    ln1: NormCache,
    a1: CudaSlice<f32>,
    heads: CudaSlice<f32>,
    probs: CudaSlice<f32>,
    att: CudaSlice<f32>,
    ln2: NormCache,
    a2: CudaSlice<f32>,
    ffn: FfnCache,
}

enum FfnCache {
    Dense { h: CudaSlice<f32>, a: CudaSlice<f32> },
    Moe(Box<CudaMoeCache>),
}

/// Sizes of one group.
#[derive(Clone, Copy)]
struct Shape {
    /// Rows (sequences x positions).
    n: usize,
    t: usize,
    seqs: usize,
    d: usize,
    heads: usize,
    dh: usize,
}

impl Shape {
    /// Batches of the attention products: one per head and sequence.
    fn pairs(&self) -> usize {
        self.heads * self.seqs
    }
    /// Elements of one of q, k, v in head layout.
    fn plane(&self) -> usize {
        self.n * self.d
    }
}

fn tensor<'a>(map: &'a BTreeMap<String, DeviceTensor>, name: &str) -> Result<&'a DeviceTensor> {
    map.get(name)
        .ok_or_else(|| Error::shape("CUDA model", format!("tensor {name} is missing")))
}

fn tensor_mut<'a>(map: &'a mut BTreeMap<String, DeviceTensor>, name: &str) -> Result<&'a mut DeviceTensor> {
    map.get_mut(name)
        .ok_or_else(|| Error::shape("CUDA model", format!("tensor {name} is missing")))
}

impl CudaGpt {
    /// The model `model` on `gpu` (its parameters copied; gradients zero).
    pub fn new(gpu: &Arc<Gpu>, model: &Gpt<f32>) -> Result<Self> {
        guarded_try("copying the model to the GPU", || {
            let config = model.config().clone();
            config.validate()?;
            let mut dense = BTreeMap::new();
            for (name, _shape, buf) in model.tensors() {
                if name.contains(".moe.") {
                    continue;
                }
                dense.insert(
                    name,
                    DeviceTensor {
                        param: gpu.upload(buf)?,
                        grad: gpu.alloc_zeros(buf.len())?,
                    },
                );
            }
            let mut moe = BTreeMap::new();
            for (l, block) in model.blocks.iter().enumerate() {
                if let Ffn::Moe(layer) = &block.ffn {
                    moe.insert(l, CudaMoeLayer::on(gpu, config.moe_config(), &layer.params)?);
                }
            }
            Ok(CudaGpt {
                config,
                gpu: gpu.clone(),
                dense,
                moe,
                moments: BTreeMap::new(),
            })
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The GPU it runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// What the GPU's Device budget counted (`None` without a budget): see [`Gpu::memory`].
    pub fn memory(&self) -> Result<Option<GpuMemory>> {
        guarded_try("reading the GPU's memory pool", || self.gpu.memory())
    }

    /// The parameters, copied to the host as a [`Gpt`].
    pub fn to_model(&self) -> Result<Gpt<f32>> {
        guarded_try("copying the model from the GPU", || {
            self.collect(|t| &t.param, |layer| layer.parameters())
        })
    }

    /// The accumulated gradients, copied to the host (a [`Gpt`] of the same shapes).
    pub fn gradients(&self) -> Result<Gpt<f32>> {
        guarded_try("copying the gradients from the GPU", || {
            self.collect(|t| &t.grad, |layer| layer.gradients())
        })
    }

    fn collect(
        &self,
        pick: impl Fn(&DeviceTensor) -> &CudaSlice<f32>,
        moe: impl Fn(&CudaMoeLayer) -> Result<MoeParams<f32>>,
    ) -> Result<Gpt<f32>> {
        let mut out = Gpt::zeros(&self.config)?;
        let mut moe_params: BTreeMap<usize, MoeParams<f32>> = BTreeMap::new();
        for (&l, layer) in &self.moe {
            moe_params.insert(l, moe(layer)?);
        }
        let names: Vec<String> = self.config.tensor_shapes().into_iter().map(|(n, _)| n).collect();
        for (name, buf) in names.iter().zip(out.buffers_mut()) {
            if let Some((block, part)) = moe_tensor(name) {
                let p = moe_params
                    .get(&block)
                    .ok_or_else(|| Error::shape("CUDA model", format!("no MoE layer for {name}")))?;
                let (_, src) = p
                    .named()
                    .into_iter()
                    .find(|(n, _)| *n == part)
                    .ok_or_else(|| Error::shape("CUDA model", format!("no MoE tensor {part}")))?;
                buf.clone_from(src);
            } else {
                let mut v = self.gpu.download(pick(tensor(&self.dense, name)?))?;
                v.truncate(buf.len());
                *buf = v;
            }
        }
        Ok(out)
    }

    /// Set every gradient to zero.
    pub fn zero_gradients(&mut self) -> Result<()> {
        guarded_try("zeroing the gradients on the GPU", || {
            for t in self.dense.values_mut() {
                self.gpu.zero(&mut t.grad)?;
            }
            for layer in self.moe.values_mut() {
                layer.zero_gradients()?;
            }
            Ok(())
        })
    }

    fn shape(&self, idx: &[u32], seqs: usize) -> Result<Shape> {
        let c = &self.config;
        let t = c.check_tokens(idx, seqs)?;
        Ok(Shape {
            n: idx.len(),
            t,
            seqs,
            d: c.d_model,
            heads: c.n_head,
            dh: c.d_model / c.n_head,
        })
    }

    /// Forward only: the group's summed cross-entropy (evaluation), as [`Gpt::evaluate`].
    pub fn evaluate(&mut self, idx: &[u32], targets: &[u32], seqs: usize) -> Result<GroupOutput> {
        guarded_try("an evaluation on the GPU", || {
            self.pass(idx, targets, seqs, 0.0, 0.0, false)
        })
    }

    /// Forward and backward of one group, adding into the gradients what [`Gpt::forward_backward`]
    /// adds: the gradient of `ce_scale * sum(cross-entropy) + router_scale * sum over MoE blocks of
    /// (aux_coef * l_aux + z_coef * z_loss)`.
    pub fn forward_backward(
        &mut self,
        idx: &[u32],
        targets: &[u32],
        seqs: usize,
        ce_scale: f32,
        router_scale: f32,
    ) -> Result<GroupOutput> {
        guarded_try("a forward and backward pass on the GPU", || {
            self.pass(idx, targets, seqs, ce_scale, router_scale, true)
        })
    }

    fn pass(
        &mut self,
        idx: &[u32],
        targets: &[u32],
        seqs: usize,
        ce_scale: f32,
        router_scale: f32,
        train: bool,
    ) -> Result<GroupOutput> {
        let s = self.shape(idx, seqs)?;
        let c = self.config.clone();
        c.check_targets(idx, targets)?;
        let gpu = self.gpu.clone();
        let g = &*gpu;
        let (n, d, v) = (s.n, s.d, c.vocab);
        let idx_d = g.upload(idx)?;
        let targets_d = g.upload(targets)?;

        let mut x = g.alloc::<f32>(n * d)?;
        {
            let (wte, wpe) = (&tensor(&self.dense, "wte")?.param, &tensor(&self.dense, "wpe")?.param);
            let (t_i, d_i) = (int(s.t, "positions")?, int(d, "d_model")?);
            // SAFETY: the arguments follow gpt_embed_forward's parameters; idx holds n tokens below
            // the vocabulary (checked), x n rows.
            unsafe {
                g.stream
                    .launch_builder(g.kernel("gpt_embed_forward")?)
                    .arg(&idx_d)
                    .arg(wte)
                    .arg(wpe)
                    .arg(&t_i)
                    .arg(&d_i)
                    .arg(&mut x)
                    .launch(grid(int(n, "rows")? as u32, BLOCK, 0))
            }
            .map_err(launch("gpt_embed_forward"))?;
        }

        let mut caches = Vec::with_capacity(c.n_layer);
        let mut moe_out: Vec<(f32, f32, MoeStats)> = Vec::new();
        for l in 0..c.n_layer {
            let name = |p: &str| format!("h.{l}.{p}");
            let p = |p: &str| tensor(&self.dense, &name(p)).map(|t| &t.param);
            let (a1, ln1) = layer_norm(g, &x, p("ln1.weight")?, p("ln1.bias")?, n, d)?;
            let qkv = linear(g, &a1, p("attn.wqkv")?, Some(p("attn.bqkv")?), n, d, 3 * d)?;
            let heads = split_heads(g, &qkv, s, 3)?;
            drop(qkv);
            let (att, probs) = attention(g, &heads, s)?;
            let o = linear(g, &att, p("attn.wo")?, Some(p("attn.bo")?), n, d, d)?;
            add_into(g, &mut x, &o, n * d)?;
            drop(o);
            let (a2, ln2) = layer_norm(g, &x, p("ln2.weight")?, p("ln2.bias")?, n, d)?;
            let ffn = if c.is_moe(l) {
                let layer = self
                    .moe
                    .get(&l)
                    .ok_or_else(|| Error::shape("CUDA model", format!("block {l} has no MoE layer")))?;
                let input = DeviceBuffer { data: a2, len: n * d };
                let (y, cache) = layer.forward(&input)?;
                add_into(g, &mut x, &y.data, n * d)?;
                moe_out.push((cache.l_aux, cache.z_loss, cache.stats.clone()));
                let a2 = input.data;
                (a2, FfnCache::Moe(Box::new(cache)))
            } else {
                let f = c.dense_width();
                let (h, a) = dense_up(g, &a2, p("mlp.w1")?, p("mlp.b1")?, n, d, f, c.gelu)?;
                let y = linear(g, &a, p("mlp.w2")?, Some(p("mlp.b2")?), n, f, d)?;
                add_into(g, &mut x, &y, n * d)?;
                (a2, FfnCache::Dense { h, a })
            };
            if train {
                caches.push(BlockCache {
                    ln1,
                    a1,
                    heads,
                    probs,
                    att,
                    ln2,
                    a2: ffn.0,
                    ffn: ffn.1,
                });
            }
        }

        // The head: final layer norm, logits, cross-entropy (and its gradient when training).
        let p = |name: &str| tensor(&self.dense, name).map(|t| &t.param);
        let (xf, lnf) = layer_norm(g, &x, p("ln_f.weight")?, p("ln_f.bias")?, n, d)?;
        drop(x);
        let logits = linear(g, &xf, p("lm_head")?, None, n, d, v)?;
        let mut dlogits = g.alloc::<f32>(n * v)?;
        let mut losses = g.alloc::<f32>(n)?;
        let v_i = int(v, "vocab")?;
        let grad_scale = if train { ce_scale } else { 0.0 };
        // SAFETY: the arguments follow gpt_cross_entropy's parameters; logits and dlogits hold n
        // rows of v, targets n entries below v (checked), losses n.
        unsafe {
            g.stream
                .launch_builder(g.kernel("gpt_cross_entropy")?)
                .arg(&logits)
                .arg(&targets_d)
                .arg(&v_i)
                .arg(&grad_scale)
                .arg(&mut dlogits)
                .arg(&mut losses)
                .launch(grid(int(n, "rows")? as u32, BLOCK, BLOCK * 4))
        }
        .map_err(launch("gpt_cross_entropy"))?;
        drop(logits);

        if train {
            let lm = tensor_mut(&mut self.dense, "lm_head")?;
            let dxf = linear_backward(g, &xf, &lm.param, &dlogits, n, d, v, &mut lm.grad, None)?;
            drop(dlogits);
            let mut dx = g.alloc_zeros::<f32>(n * d)?;
            layer_norm_backward(g, &mut self.dense, "ln_f", &lnf, &dxf, &mut dx, n, d)?;
            for l in (0..c.n_layer).rev() {
                let cache = caches
                    .pop()
                    .ok_or_else(|| Error::shape("CUDA model", "lost a block cache"))?;
                self.block_backward(l, cache, &mut dx, s, router_scale)?;
            }
            // The two embedding tables' gradients are updated by one kernel: take one out of the
            // map for the call.
            let mut wte = self
                .dense
                .remove("wte")
                .ok_or_else(|| Error::shape("CUDA model", "tensor wte is missing"))?;
            let result = tensor_mut(&mut self.dense, "wpe")
                .and_then(|wpe| embeddings_backward(g, &idx_d, &dx, s, v, &mut wte.grad, &mut wpe.grad));
            self.dense.insert("wte".into(), wte);
            result?;
        }

        let losses = g.download(&losses)?;
        let ce_sum = losses[..n].iter().map(|&l| l as f64).sum();
        // As `Gpt::evaluate`: an evaluation reports the cross-entropy alone.
        let (router_loss, moe_stats) = moe_out
            .into_iter()
            .filter(|_| train)
            .map(|(l_aux, z, stats)| (c.aux_coef * l_aux as f64 + c.z_coef * z as f64, stats))
            .unzip();
        Ok(GroupOutput {
            ce_sum,
            router_loss,
            moe_stats,
        })
    }

    fn block_backward(
        &mut self,
        l: usize,
        cache: BlockCache,
        dx: &mut CudaSlice<f32>,
        s: Shape,
        router_scale: f32,
    ) -> Result<()> {
        let gpu = self.gpu.clone();
        let g = &*gpu;
        let c = &self.config;
        let (n, d) = (s.n, s.d);
        let name = |p: &str| format!("h.{l}.{p}");
        let BlockCache {
            ln1,
            a1,
            heads,
            probs,
            att,
            ln2,
            a2,
            ffn,
        } = cache;
        let d_a2 = match ffn {
            FfnCache::Dense { h, a } => {
                let f = c.dense_width();
                let w2 = tensor_mut(&mut self.dense, &name("mlp.w2"))?;
                product_backward_weights(g, &a, dx, n, f, d, &mut w2.grad)?;
                let mut dh = dx_through(g, dx, &w2.param, n, f, d)?;
                column_sums(g, dx, n, d, &mut tensor_mut(&mut self.dense, &name("mlp.b2"))?.grad)?;
                gelu_backward(g, &h, &mut dh, n * f, c.gelu)?;
                let w1 = tensor_mut(&mut self.dense, &name("mlp.w1"))?;
                product_backward_weights(g, &a2, &dh, n, d, f, &mut w1.grad)?;
                let d_a2 = dx_through(g, &dh, &w1.param, n, d, f)?;
                column_sums(g, &dh, n, f, &mut tensor_mut(&mut self.dense, &name("mlp.b1"))?.grad)?;
                d_a2
            }
            FfnCache::Moe(moe_cache) => {
                let layer = self
                    .moe
                    .get_mut(&l)
                    .ok_or_else(|| Error::shape("CUDA model", format!("block {l} has no MoE layer")))?;
                let input = DeviceBuffer { data: a2, len: n * d };
                let gy = DeviceBuffer {
                    data: std::mem::replace(dx, g.alloc::<f32>(1)?),
                    len: n * d,
                };
                let d_a2 = layer.backward(&input, *moe_cache, &gy, router_scale)?;
                *dx = gy.data;
                d_a2.data
            }
        };
        layer_norm_backward(g, &mut self.dense, &name("ln2"), &ln2, &d_a2, dx, n, d)?;
        drop(d_a2);

        let wo = tensor_mut(&mut self.dense, &name("attn.wo"))?;
        product_backward_weights(g, &att, dx, n, d, d, &mut wo.grad)?;
        let d_att = dx_through(g, dx, &wo.param, n, d, d)?;
        column_sums(g, dx, n, d, &mut tensor_mut(&mut self.dense, &name("attn.bo"))?.grad)?;
        let d_qkv = attention_backward(g, &heads, &probs, &d_att, s)?;
        drop((d_att, heads, probs));
        let wqkv = tensor_mut(&mut self.dense, &name("attn.wqkv"))?;
        product_backward_weights(g, &a1, &d_qkv, n, d, 3 * d, &mut wqkv.grad)?;
        let d_a1 = dx_through(g, &d_qkv, &wqkv.param, n, d, 3 * d)?;
        column_sums(
            g,
            &d_qkv,
            n,
            3 * d,
            &mut tensor_mut(&mut self.dense, &name("attn.bqkv"))?.grad,
        )?;
        layer_norm_backward(g, &mut self.dense, &name("ln1"), &ln1, &d_a1, dx, n, d)?;
        Ok(())
    }

    /// Load AdamW's first and second moments, one buffer per tensor in [`Gpt::tensors`] order (as
    /// `optimizer::AdamW` keeps them; empty buffers: zeros).
    pub fn load_moments(&mut self, m: &[Vec<f32>], v: &[Vec<f32>]) -> Result<()> {
        guarded_try("copying the optimizer state to the GPU", || {
            let shapes = self.config.tensor_shapes();
            if m.len() != shapes.len() || v.len() != shapes.len() {
                return Err(Error::shape(
                    "optimizer state",
                    format!("{} moment buffers for {} tensors", m.len(), shapes.len()),
                ));
            }
            self.moments.clear();
            for ((name, shape), (m, v)) in shapes.iter().zip(m.iter().zip(v)) {
                let len: usize = shape.iter().product();
                if m.is_empty() && v.is_empty() {
                    continue; // never stepped: zeros at the first update
                }
                if m.len() != len || v.len() != len {
                    return Err(Error::shape(
                        "optimizer state",
                        format!(
                            "the moments of {name} have {} and {} elements, the tensor {len}",
                            m.len(),
                            v.len()
                        ),
                    ));
                }
                self.moments
                    .insert(name.clone(), (self.gpu.upload(m)?, self.gpu.upload(v)?));
            }
            Ok(())
        })
    }

    /// AdamW's moments copied to the host, `(m, v)`, one buffer per tensor in [`Gpt::tensors`]
    /// order (zeros for a tensor never updated).
    pub fn moments(&self) -> Result<super::Moments> {
        guarded_try("copying the optimizer state from the GPU", || {
            let mut m = Vec::new();
            let mut v = Vec::new();
            for (name, shape) in self.config.tensor_shapes() {
                let len: usize = shape.iter().product();
                match self.moments.get(&name) {
                    Some((dm, dv)) => {
                        let (mut hm, mut hv) = (self.gpu.download(dm)?, self.gpu.download(dv)?);
                        hm.truncate(len);
                        hv.truncate(len);
                        m.push(hm);
                        v.push(hv);
                    }
                    None => {
                        m.push(vec![0.0; len]);
                        v.push(vec![0.0; len]);
                    }
                }
            }
            Ok((m, v))
        })
    }

    /// The global gradient norm: the square root of the sum of every gradient element's square,
    /// each tensor summed on the device in double precision (`gpt_sum_squares`), the tensors' sums
    /// added on the host in [`Gpt::tensors`] order. Only one number per tensor leaves the device.
    pub fn gradient_norm(&mut self) -> Result<f64> {
        guarded_try("the gradient norm on the GPU", || {
            let gpu = self.gpu.clone();
            let names: Vec<String> = self.config.tensor_shapes().into_iter().map(|(n, _)| n).collect();
            let mut sums = gpu.alloc_zeros::<f64>(names.len())?;
            let mut grads: BTreeMap<String, &CudaSlice<f32>> =
                self.dense.iter().map(|(name, t)| (name.clone(), &t.grad)).collect();
            for (&l, layer) in self.moe.iter_mut() {
                for (part, _, grad) in layer.parameters_and_gradients() {
                    grads.insert(format!("h.{l}.moe.{part}"), grad);
                }
            }
            for (slot, name) in names.iter().enumerate() {
                let grad = grads
                    .get(name)
                    .ok_or_else(|| Error::shape("CUDA model", format!("no gradient for {name}")))?;
                let (n_l, slot_i) = (DeviceSlice::len(*grad) as i64, int(slot, "tensor index")?);
                // SAFETY: the arguments follow gpt_sum_squares's parameters; grad holds n elements,
                // sums one slot per tensor; WIDE_BLOCK doubles of shared memory.
                unsafe {
                    gpu.stream
                        .launch_builder(gpu.kernel("gpt_sum_squares")?)
                        .arg(*grad)
                        .arg(&n_l)
                        .arg(&mut sums)
                        .arg(&slot_i)
                        .launch(grid(1, WIDE_BLOCK, WIDE_BLOCK * 8))
                }
                .map_err(launch("gpt_sum_squares"))?;
            }
            let sums = gpu.download(&sums)?;
            Ok(sums[..names.len()].iter().sum::<f64>().sqrt())
        })
    }

    /// One AdamW step on the device with the scalars `scalars` (`optimizer::AdamW::scalars`: its
    /// `keep` applies to the decayed tensors, the matrices; biases and norms keep 1), every gradient
    /// multiplied by `grad_scale` first (the global-norm clipping, `AdamW::clip_scale`): the
    /// arithmetic of `AdamW::apply` on the CPU.
    pub(crate) fn apply_adamw(&mut self, scalars: &AdamwStep, grad_scale: f32) -> Result<()> {
        guarded_try("AdamW on the GPU", || {
            let gpu = self.gpu.clone();
            let decays: BTreeMap<String, bool> = self
                .config
                .tensor_specs()
                .into_iter()
                .map(|s| (s.name, s.decay))
                .collect();
            let mut tensors: Vec<(String, &mut CudaSlice<f32>, &CudaSlice<f32>)> = self
                .dense
                .iter_mut()
                .map(|(name, t)| (name.clone(), &mut t.param, &t.grad))
                .collect();
            for (&l, layer) in self.moe.iter_mut() {
                for (part, param, grad) in layer.parameters_and_gradients() {
                    tensors.push((format!("h.{l}.moe.{part}"), param, grad));
                }
            }
            for (name, param, grad) in tensors {
                let len = DeviceSlice::len(grad);
                if !self.moments.contains_key(&name) {
                    self.moments
                        .insert(name.clone(), (gpu.alloc_zeros(len)?, gpu.alloc_zeros(len)?));
                }
                let (m, v) = self
                    .moments
                    .get_mut(&name)
                    .ok_or_else(|| Error::runtime("AdamW moments were not allocated"))?;
                let decay = decays.get(&name).copied().unwrap_or(false);
                adamw(&gpu, param, grad, m, v, len, scalars, decay, grad_scale)?;
            }
            Ok(())
        })
    }
}

/// `h.{l}.moe.{part}` -> `(l, part)`.
fn moe_tensor(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("h.")?;
    let (l, part) = rest.split_once(".moe.")?;
    Some((l.parse().ok()?, part))
}

/// `y = x @ w (+ bias)` for `x` of `rows x k`, `w` of `k x n`.
fn linear(
    g: &Gpu,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<CudaSlice<f32>> {
    let mut y = g.alloc::<f32>(rows * n)?;
    g.product(Product::new(rows, n, k, false, false, false), x, w, &mut y)?;
    if let Some(b) = bias {
        let (rows_l, rows_i, n_i) = (rows as i64, int(rows, "rows")?, int(n, "width")?);
        // SAFETY: the arguments follow moe_add_expert_bias's parameters (one "expert" of `rows`
        // rows); y holds rows x n, b n.
        unsafe {
            g.stream
                .launch_builder(g.kernel("moe_add_expert_bias")?)
                .arg(&mut y)
                .arg(b)
                .arg(&rows_l)
                .arg(&rows_i)
                .arg(&n_i)
                .launch(elementwise((rows * n) as u64))
        }
        .map_err(launch("moe_add_expert_bias"))?;
    }
    Ok(y)
}

/// `gw += x^T dy` for `x` of `rows x k`, `dy` of `rows x n`.
fn product_backward_weights(
    g: &Gpu,
    x: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    rows: usize,
    k: usize,
    n: usize,
    gw: &mut CudaSlice<f32>,
) -> Result<()> {
    g.product(Product::new(k, n, rows, true, false, true), x, dy, gw)
}

/// `dx = dy w^T` for `dy` of `rows x n`, `w` of `k x n`.
fn dx_through(
    g: &Gpu,
    dy: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<CudaSlice<f32>> {
    let mut dx = g.alloc::<f32>(rows * k)?;
    g.product(Product::new(rows, k, n, false, true, false), dy, w, &mut dx)?;
    Ok(dx)
}

/// The head's backward: `gw += x^T dy` (and `gb += colsum(dy)`), returns `dy w^T`.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    g: &Gpu,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    rows: usize,
    k: usize,
    n: usize,
    gw: &mut CudaSlice<f32>,
    gb: Option<&mut CudaSlice<f32>>,
) -> Result<CudaSlice<f32>> {
    product_backward_weights(g, x, dy, rows, k, n, gw)?;
    if let Some(gb) = gb {
        column_sums(g, dy, rows, n, gb)?;
    }
    dx_through(g, dy, w, rows, k, n)
}

/// `acc[j] += sum_r m[r][j]`, rows in order.
fn column_sums(g: &Gpu, m: &CudaSlice<f32>, rows: usize, width: usize, acc: &mut CudaSlice<f32>) -> Result<()> {
    let (one, rows_i, w_i) = (1i32, int(rows, "rows")?, int(width, "width")?);
    // SAFETY: the arguments follow moe_expert_column_sums's parameters (one "expert" of `rows`
    // rows); m holds rows x width, acc width.
    unsafe {
        g.stream
            .launch_builder(g.kernel("moe_expert_column_sums")?)
            .arg(m)
            .arg(&one)
            .arg(&rows_i)
            .arg(&w_i)
            .arg(acc)
            .launch(per_element(width as u64))
    }
    .map(|_| ())
    .map_err(launch("moe_expert_column_sums"))
}

/// The dense MLP's first half: `h = x @ w1 + b1`, `a = gelu(h)`.
#[allow(clippy::too_many_arguments)]
fn dense_up(
    g: &Gpu,
    x: &CudaSlice<f32>,
    w1: &CudaSlice<f32>,
    b1: &CudaSlice<f32>,
    rows: usize,
    d: usize,
    f: usize,
    gelu: Gelu,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let mut h = g.alloc::<f32>(rows * f)?;
    g.product(Product::new(rows, f, d, false, false, false), x, w1, &mut h)?;
    let mut a = g.alloc::<f32>(rows * f)?;
    let (rows_l, rows_i, f_i) = (rows as i64, int(rows, "rows")?, int(f, "width")?);
    let tanh_form = i32::from(gelu == Gelu::Tanh);
    // SAFETY: the arguments follow moe_bias_gelu_forward's parameters (one "expert" of `rows`
    // rows); h and a hold rows x f, b1 f.
    unsafe {
        g.stream
            .launch_builder(g.kernel("moe_bias_gelu_forward")?)
            .arg(&mut h)
            .arg(&mut a)
            .arg(b1)
            .arg(&rows_l)
            .arg(&rows_i)
            .arg(&f_i)
            .arg(&tanh_form)
            .launch(elementwise((rows * f) as u64))
    }
    .map_err(launch("moe_bias_gelu_forward"))?;
    Ok((h, a))
}

/// `dh *= gelu'(h)` over `n` elements.
fn gelu_backward(g: &Gpu, h: &CudaSlice<f32>, dh: &mut CudaSlice<f32>, n: usize, gelu: Gelu) -> Result<()> {
    let (n_l, tanh_form) = (n as i64, i32::from(gelu == Gelu::Tanh));
    // SAFETY: the arguments follow moe_gelu_backward's parameters; h and dh hold n elements.
    unsafe {
        g.stream
            .launch_builder(g.kernel("moe_gelu_backward")?)
            .arg(h)
            .arg(dh)
            .arg(&n_l)
            .arg(&tanh_form)
            .launch(elementwise(n as u64))
    }
    .map(|_| ())
    .map_err(launch("moe_gelu_backward"))
}

/// `x += y` over `n` elements.
fn add_into(g: &Gpu, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
    let n_l = n as i64;
    // SAFETY: the arguments follow gpt_add_into's parameters; x and y hold n elements.
    unsafe {
        g.stream
            .launch_builder(g.kernel("gpt_add_into")?)
            .arg(x)
            .arg(y)
            .arg(&n_l)
            .launch(elementwise(n as u64))
    }
    .map(|_| ())
    .map_err(launch("gpt_add_into"))
}

/// Layer norm of `rows` rows of `d`: returns `y` and `(xhat, rstd)`.
fn layer_norm(
    g: &Gpu,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    rows: usize,
    d: usize,
) -> Result<(CudaSlice<f32>, NormCache)> {
    let mut y = g.alloc::<f32>(rows * d)?;
    let mut xhat = g.alloc::<f32>(rows * d)?;
    let mut rstd = g.alloc::<f32>(rows)?;
    let (d_i, eps) = (int(d, "d_model")?, LN_EPS as f32);
    // SAFETY: the arguments follow gpt_layer_norm_forward's parameters; x, y, xhat hold rows x d,
    // w and b d, rstd rows; BLOCK floats of shared memory for the block sums.
    unsafe {
        g.stream
            .launch_builder(g.kernel("gpt_layer_norm_forward")?)
            .arg(x)
            .arg(w)
            .arg(b)
            .arg(&d_i)
            .arg(&eps)
            .arg(&mut y)
            .arg(&mut xhat)
            .arg(&mut rstd)
            .launch(grid(int(rows, "rows")? as u32, BLOCK, BLOCK * 4))
    }
    .map_err(launch("gpt_layer_norm_forward"))?;
    Ok((y, (xhat, rstd)))
}

/// Layer norm `prefix`'s backward: `dx += ...`, and its weight and bias gradients.
#[allow(clippy::too_many_arguments)]
fn layer_norm_backward(
    g: &Gpu,
    dense: &mut BTreeMap<String, DeviceTensor>,
    prefix: &str,
    cache: &NormCache,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    rows: usize,
    d: usize,
) -> Result<()> {
    let (xhat, rstd) = cache;
    let (d_i, rows_i) = (int(d, "d_model")?, int(rows, "rows")?);
    let w = &tensor(dense, &format!("{prefix}.weight"))?.param;
    // SAFETY: the arguments follow gpt_layer_norm_backward's parameters; xhat, dy, dx hold rows x
    // d, rstd rows, w d.
    unsafe {
        g.stream
            .launch_builder(g.kernel("gpt_layer_norm_backward")?)
            .arg(xhat)
            .arg(rstd)
            .arg(w)
            .arg(dy)
            .arg(&d_i)
            .arg(&mut *dx)
            .launch(grid(rows_i as u32, BLOCK, BLOCK * 4))
    }
    .map_err(launch("gpt_layer_norm_backward"))?;
    let mut gb = dense
        .remove(&format!("{prefix}.bias"))
        .ok_or_else(|| Error::shape("CUDA model", format!("tensor {prefix}.bias is missing")))?;
    let gw = tensor_mut(dense, &format!("{prefix}.weight"));
    let result = gw.and_then(|gw| {
        // SAFETY: the arguments follow gpt_layer_norm_param_grads's parameters; xhat and dy hold
        // rows x d, the gradients d.
        unsafe {
            g.stream
                .launch_builder(g.kernel("gpt_layer_norm_param_grads")?)
                .arg(xhat)
                .arg(dy)
                .arg(&rows_i)
                .arg(&d_i)
                .arg(&mut gw.grad)
                .arg(&mut gb.grad)
                .launch(per_element(d as u64))
        }
        .map(|_| ())
        .map_err(launch("gpt_layer_norm_param_grads"))
    });
    dense.insert(format!("{prefix}.bias"), gb);
    result
}

/// `[N][parts * D]` -> `[parts][H][N][dh]`.
fn split_heads(g: &Gpu, x: &CudaSlice<f32>, s: Shape, parts: usize) -> Result<CudaSlice<f32>> {
    heads_layout(g, "gpt_split_heads", x, s, parts)
}

/// `[parts][H][N][dh]` -> `[N][parts * D]`.
fn merge_heads(g: &Gpu, x: &CudaSlice<f32>, s: Shape, parts: usize) -> Result<CudaSlice<f32>> {
    heads_layout(g, "gpt_merge_heads", x, s, parts)
}

fn heads_layout(g: &Gpu, kernel: &'static str, x: &CudaSlice<f32>, s: Shape, parts: usize) -> Result<CudaSlice<f32>> {
    let total = parts * s.plane();
    let mut out = g.alloc::<f32>(total)?;
    let (total_l, n_i, h_i, dh_i, parts_i) = (
        total as i64,
        int(s.n, "rows")?,
        int(s.heads, "heads")?,
        int(s.dh, "head width")?,
        int(parts, "parts")?,
    );
    // SAFETY: the arguments follow the kernel's parameters (gpt_split_heads and gpt_merge_heads
    // share them); x and out hold `total` elements.
    unsafe {
        g.stream
            .launch_builder(g.kernel(kernel)?)
            .arg(x)
            .arg(&total_l)
            .arg(&n_i)
            .arg(&h_i)
            .arg(&dh_i)
            .arg(&parts_i)
            .arg(&mut out)
            .launch(elementwise(total as u64))
    }
    .map_err(launch(kernel))?;
    Ok(out)
}

/// Causal attention over `heads` (`[3][H][N][dh]`): returns the merged outputs `[N][D]` and the
/// probabilities `[H * seqs][T][T]`.
fn attention(g: &Gpu, heads: &CudaSlice<f32>, s: Shape) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let (t, dh, pairs, plane) = (s.t, s.dh, s.pairs(), s.plane());
    let q = heads.slice(..plane);
    let k = heads.slice(plane..2 * plane);
    let v = heads.slice(2 * plane..3 * plane);
    let mut probs = g.alloc::<f32>(pairs * t * t)?;
    g.product(
        Product::new(t, t, dh, false, true, false).batched(pairs),
        &q,
        &k,
        &mut probs,
    )?;
    let (t_i, scale) = (int(t, "positions")?, 1.0f32 / (dh as f32).sqrt());
    // SAFETY: the arguments follow gpt_causal_softmax's parameters; probs holds pairs x t rows of t.
    unsafe {
        g.stream
            .launch_builder(g.kernel("gpt_causal_softmax")?)
            .arg(&mut probs)
            .arg(&t_i)
            .arg(&scale)
            .launch(grid(int(pairs * t, "score rows")? as u32, BLOCK, BLOCK * 4))
    }
    .map_err(launch("gpt_causal_softmax"))?;
    let mut o = g.alloc::<f32>(plane)?;
    g.product(
        Product::new(t, dh, t, false, false, false).batched(pairs),
        &probs,
        &v,
        &mut o,
    )?;
    Ok((merge_heads(g, &o, s, 1)?, probs))
}

/// Attention's backward: given the heads, the probabilities and `d_out` (`[N][D]`), returns `d_qkv`
/// (`[N][3D]`).
fn attention_backward(
    g: &Gpu,
    heads: &CudaSlice<f32>,
    probs: &CudaSlice<f32>,
    d_out: &CudaSlice<f32>,
    s: Shape,
) -> Result<CudaSlice<f32>> {
    let (t, dh, pairs, plane) = (s.t, s.dh, s.pairs(), s.plane());
    let d_o = split_heads(g, d_out, s, 1)?;
    let q = heads.slice(..plane);
    let k = heads.slice(plane..2 * plane);
    let v = heads.slice(2 * plane..3 * plane);
    let mut d_heads = g.alloc::<f32>(3 * plane)?;
    // dV = P^T dO
    g.product(
        Product::new(t, dh, t, true, false, false).batched(pairs),
        probs,
        &d_o,
        &mut d_heads.slice_mut(2 * plane..3 * plane),
    )?;
    // dP = dO V^T, then dS = P (dP - <dP, P>) scale
    let mut d_s = g.alloc::<f32>(pairs * t * t)?;
    g.product(
        Product::new(t, t, dh, false, true, false).batched(pairs),
        &d_o,
        &v,
        &mut d_s,
    )?;
    let (t_i, scale) = (int(t, "positions")?, 1.0f32 / (dh as f32).sqrt());
    // SAFETY: the arguments follow gpt_causal_softmax_backward's parameters; probs and d_s hold
    // pairs x t rows of t.
    unsafe {
        g.stream
            .launch_builder(g.kernel("gpt_causal_softmax_backward")?)
            .arg(probs)
            .arg(&mut d_s)
            .arg(&t_i)
            .arg(&scale)
            .launch(grid(int(pairs * t, "score rows")? as u32, BLOCK, BLOCK * 4))
    }
    .map_err(launch("gpt_causal_softmax_backward"))?;
    // dQ = dS K ; dK = dS^T Q
    g.product(
        Product::new(t, dh, t, false, false, false).batched(pairs),
        &d_s,
        &k,
        &mut d_heads.slice_mut(..plane),
    )?;
    g.product(
        Product::new(t, dh, t, true, false, false).batched(pairs),
        &d_s,
        &q,
        &mut d_heads.slice_mut(plane..2 * plane),
    )?;
    merge_heads(g, &d_heads, s, 3)
}

/// The embeddings' backward: `gwte[idx[r]] += dx[r]`, `gwpe[r % T] += dx[r]`.
fn embeddings_backward(
    g: &Gpu,
    idx: &CudaSlice<u32>,
    dx: &CudaSlice<f32>,
    s: Shape,
    vocab: usize,
    gwte: &mut CudaSlice<f32>,
    gwpe: &mut CudaSlice<f32>,
) -> Result<()> {
    let (n_i, t_i, v_i, d_i) = (
        int(s.n, "rows")?,
        int(s.t, "positions")?,
        int(vocab, "vocab")?,
        int(s.d, "d_model")?,
    );
    let threads = ((vocab + s.t) * s.d) as u64;
    // SAFETY: the arguments follow gpt_embed_backward's parameters; idx holds n tokens below the
    // vocabulary, dx n rows of d, gwte vocab rows, gwpe at least t rows.
    unsafe {
        g.stream
            .launch_builder(g.kernel("gpt_embed_backward")?)
            .arg(idx)
            .arg(dx)
            .arg(&n_i)
            .arg(&t_i)
            .arg(&v_i)
            .arg(&d_i)
            .arg(gwte)
            .arg(gwpe)
            .launch(per_element(threads))
    }
    .map(|_| ())
    .map_err(launch("gpt_embed_backward"))
}

/// One AdamW update of `len` elements.
#[allow(clippy::too_many_arguments)]
fn adamw(
    g: &Gpu,
    param: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    len: usize,
    s: &AdamwStep,
    decay: bool,
    grad_scale: f32,
) -> Result<()> {
    let keep = if decay { s.keep } else { 1.0 };
    let n_l = len as i64;
    // SAFETY: the arguments follow gpt_adamw's parameters; the four buffers hold len elements.
    unsafe {
        g.stream
            .launch_builder(g.kernel("gpt_adamw")?)
            .arg(param)
            .arg(grad)
            .arg(m)
            .arg(v)
            .arg(&n_l)
            .arg(&grad_scale)
            .arg(&keep)
            .arg(&s.b1)
            .arg(&s.b2)
            .arg(&s.bc2_sqrt)
            .arg(&s.step_size)
            .arg(&s.eps)
            .launch(elementwise(len as u64))
    }
    .map(|_| ())
    .map_err(launch("gpt_adamw"))
}
